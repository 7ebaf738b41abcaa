/* The row kernels of fr_native.c, written once for an element type and included once per type (as CPython's
   stringlib is): before each inclusion fr_native.c defines T (float or double), FN(name) (the name with a suffix
   for that type), EXP and LOG (its exp and log). No include guard: it is meant to be included twice. */

/* Row i's K targets, those equal to `ignore` skipped, with a_k = a[k N + i] (or 1) and w the class weights (or 1):
   *S = sum a_k, *A = sum a_k w[y_k] and, when `x` is given, *t = sum a_k w[y_k] (m - x[y_k]). */
static inline void FN(targets)(const int64_t *y, int64_t N, int64_t K, int64_t i, const T *a, const T *w,
                               int64_t ignore, const T *x, T m, T *S, T *A, T *t) {
    T s = 0, aw = 0, tt = 0;
    for (int64_t k = 0; k < K; k++) {
        int64_t c = y[k * N + i];
        if (c == ignore) continue;
        T ak = a ? a[k * N + i] : (T)1, awk = ak * (w ? w[c] : (T)1);
        s += ak;
        aw += awk;
        if (x) tt += awk * (m - x[c]);
    }
    *S = s;
    *A = aw;
    if (t) *t = tt;
}

/* The largest of x[0..C) (-inf for C = 0; NaN-blind, but a row holding NaN is reported by the caller). */
static inline T FN(row_max)(const T *x, int64_t C) {
    T m = -INFINITY;
    #pragma omp simd reduction(max:m)
    for (int64_t j = 0; j < C; j++) m = x[j] > m ? x[j] : m;
    return m;
}

/* Rows [r0, r1): per row its loss, max and log-sum-exp below the max. With m = max, ls = log sum e^(x - m) (so
   -log p_c = ls + m - x_c), class weights w (W = sum w, or w = 1 and W = C), a_k the weight of target k (0 if
   ignored) and S = sum a_k, PyTorch's formula (`tw` = 0) is
     loss = (1 - eps) sum_k a_k w[y_k] (ls + m - x[y_k]) + S eps / C (W ls - sum_c w_c (x_c - m))
   with every term formed from x - m, which is exact near the max, as in PyTorch's log-softmax. Target weighting
   (`tw` = 1, class_weighting='target') weights each target's whole smoothed loss by w[y_k] and smooths uniformly:
   the same formula with S = A = sum_k a_k w[y_k] and the smoothing term unweighted (w_c = 1, W = C). Returns the
   number of rows holding an inf or a NaN: their loss is NaN, and the caller recomputes them with PyTorch. */
CLONES static int64_t FN(fwd)(const T *z, int64_t N, int64_t C, const int64_t *y, int64_t K, const T *a,
                              const T *w, int tw, T W, T eps, int64_t ignore, T *mx, T *lsum, T *loss, int64_t r0,
                              int64_t r1) {
    int64_t bad = 0;
    const T *ws = tw ? NULL : w;                                   /* the smoothing term's class weights */
    for (int64_t i = r0; i < r1; i++) {
        const T *x = z + i * C;
        T m = FN(row_max)(x, C), se = 0, sd = 0, swd = 0;
        if (ws) {
            #pragma omp simd reduction(+:se) reduction(+:sd) reduction(+:swd)
            for (int64_t j = 0; j < C; j++) { T d = x[j] - m; se += EXP(d); sd += d; swd += ws[j] * d; }
        } else {
            #pragma omp simd reduction(+:se) reduction(+:sd)
            for (int64_t j = 0; j < C; j++) { T d = x[j] - m; se += EXP(d); sd += d; }
            swd = sd;
        }
        if (!isfinite(sd)) { bad++; mx[i] = lsum[i] = loss[i] = NAN; continue; }    /* an inf or a NaN */
        T ls = LOG(se), S, A, t;
        FN(targets)(y, N, K, i, a, w, ignore, x, m, &S, &A, &t);
        if (tw) S = A;
        mx[i] = m;
        lsum[i] = ls;
        loss[i] = (1 - eps) * (A * ls + t) + (eps != 0 ? S * eps / (T)C * (W * ls - swd) : (T)0);
    }
    return bad;
}

/* Rows [r0, r1) of o = g[i gs] scale d(loss_i)/dz_i, from the max and log-sum-exp the forward pass kept:
     d loss / dz_c = p_c ((1 - eps) A + S eps W / C) - S eps w_c / C - (1 - eps) sum_k a_k w[y_k] [c = y_k]
   (with `tw`: S = A, w_c = 1 and W = C in the smoothing terms, as in the forward pass) */
CLONES static void FN(bwd)(const T *z, T *o, int64_t N, int64_t C, const int64_t *y, int64_t K, const T *a,
                           const T *w, int tw, T W, T eps, int64_t ignore, const T *mx, const T *lsum, const T *g,
                           int64_t gs, T scale, int64_t r0, int64_t r1) {
    const T *ws = tw ? NULL : w;
    for (int64_t i = r0; i < r1; i++) {
        const T *x = z + i * C;
        T *oi = o + i * C, S, A;
        FN(targets)(y, N, K, i, a, w, ignore, NULL, 0, &S, &A, NULL);
        if (tw) S = A;
        T c = g[i * gs] * scale, P = c * ((1 - eps) * A + S * eps * W / (T)C), B = c * S * eps / (T)C;
        T m = mx[i], ls = lsum[i];
        if (ws) {
            #pragma omp simd
            for (int64_t j = 0; j < C; j++) oi[j] = P * EXP((x[j] - m) - ls) - B * ws[j];
        } else {
            #pragma omp simd
            for (int64_t j = 0; j < C; j++) oi[j] = P * EXP((x[j] - m) - ls) - B;
        }
        for (int64_t k = 0; k < K; k++) {
            int64_t cl = y[k * N + i];
            if (cl == ignore) continue;
            oi[cl] -= c * (1 - eps) * (a ? a[k * N + i] : (T)1) * (w ? w[cl] : (T)1);
        }
    }
}
