/* Exercises fastai_regularize/csrc/fr_native.c's entry points once, against a plain double-precision reference, for
   `make native-check`, which builds the two together with -fsanitize=address,undefined: every buffer is allocated to
   its exact size, so a read or write past one, a leak or undefined behaviour stops the run. Exit status 0 if all agree. */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

int fr_version(void);
int64_t fr_check_targets(const int64_t *y, int64_t n, int64_t C, int64_t ignore, int dbl, const void *w,
                         int64_t *n_valid, double *w_valid);
int64_t fr_sce_forward(int dbl, const void *z, int64_t N, int64_t C, const int64_t *y, int64_t K, const void *a,
                       const void *w, int tw, double eps, int64_t ignore, void *mx, void *ls, void *loss, double *total,
                       int nthreads);
void fr_sce_backward(int dbl, const void *z, void *grad, int64_t N, int64_t C, const int64_t *y, int64_t K,
                     const void *a, const void *w, int tw, double eps, int64_t ignore, const void *mx, const void *ls,
                     const void *g, int64_t gs, double scale, int nthreads);

static uint64_t state = 42;
static double uniform(void) { state = state * 6364136223846793005ULL + 1442695040888963407ULL; return (state >> 11) * 0x1.0p-53; }

static void *alloc(size_t n, size_t size) {
    void *p = malloc(n * size > 0 ? n * size : 1);
    if (!p) { fprintf(stderr, "out of memory\n"); exit(2); }
    return p;
}

/* One case: logits N x C of the given precision, K targets per row (every 5th ignored), optional class weights and
   target weights, PyTorch's class weighting or target weighting (`tw`: each target's smoothed loss times its class
   weight, smoothed uniformly), checked value by value (loss rows, total, gradient) against the reference. Returns
   the failures. */
static int check(int dbl, int64_t N, int64_t C, int64_t K, int weighted, int mixed, int tw, double eps, int nthreads) {
    const int64_t ignore = C > 2 ? 1 : -100;                       /* an ignore_index inside [0, C) when there is room */
    size_t es = dbl ? sizeof(double) : sizeof(float);
    double *x = alloc(N * C, sizeof(double)), *wd = alloc(C, sizeof(double)), *ad = alloc(K * N, sizeof(double));
    double *gd = alloc(N, sizeof(double));
    int64_t *y = alloc(K * N, sizeof(int64_t));
    void *z = alloc(N * C, es), *w = alloc(C, es), *a = alloc(K * N, es), *g = alloc(N, es);
    void *mx = alloc(N, es), *ls = alloc(N, es), *loss = alloc(N, es), *grad = alloc(N * C, es);
    for (int64_t i = 0; i < N * C; i++) x[i] = (uniform() - 0.5) * 20;
    for (int64_t c = 0; c < C; c++) wd[c] = 0.2 + uniform();
    for (int64_t i = 0; i < K * N; i++) { y[i] = (int64_t)(uniform() * C) % C; ad[i] = uniform(); if (i % 5 == 3) y[i] = ignore; }
    for (int64_t i = 0; i < N; i++) gd[i] = uniform() - 0.5;
    for (int64_t i = 0; i < N * C; i++) if (dbl) ((double *)z)[i] = x[i]; else { ((float *)z)[i] = (float)x[i]; x[i] = ((float *)z)[i]; }
    for (int64_t c = 0; c < C; c++) if (dbl) ((double *)w)[c] = wd[c]; else { ((float *)w)[c] = (float)wd[c]; wd[c] = ((float *)w)[c]; }
    for (int64_t i = 0; i < K * N; i++) if (dbl) ((double *)a)[i] = ad[i]; else { ((float *)a)[i] = (float)ad[i]; ad[i] = ((float *)a)[i]; }
    for (int64_t i = 0; i < N; i++) if (dbl) ((double *)g)[i] = gd[i]; else { ((float *)g)[i] = (float)gd[i]; gd[i] = ((float *)g)[i]; }
    const void *wp = weighted ? w : NULL, *ap = mixed ? a : NULL;
    double W = 0;
    for (int64_t c = 0; c < C; c++) W += weighted ? wd[c] : 1;

    int fails = 0;
    double tol = dbl ? 1e-10 : 2e-5, total = 0, wvalid = 0;
    int64_t nvalid = 0;
    if (fr_check_targets(y, N, C, ignore, dbl, wp, &nvalid, &wvalid) != -1) { fprintf(stderr, "check_targets: a bad index\n"); fails++; }
    if (fr_sce_forward(dbl, z, N, C, y, K, ap, wp, tw, eps, ignore, mx, ls, loss, &total, nthreads)) { fprintf(stderr, "forward: a bad row\n"); fails++; }
    fr_sce_backward(dbl, z, grad, N, C, y, K, ap, wp, tw, eps, ignore, mx, ls, g, 1, 0.5, nthreads);
    double sum = 0;
    for (int64_t i = 0; i < N; i++) {
        const double *xi = x + i * C;
        double m = -INFINITY, se = 0;
        for (int64_t c = 0; c < C; c++) m = xi[c] > m ? xi[c] : m;
        for (int64_t c = 0; c < C; c++) se += exp(xi[c] - m);
        double lse = m + log(se), ref = 0, S = 0;
        for (int64_t k = 0; k < K; k++) {
            int64_t c = y[k * N + i];
            if (c == ignore) continue;
            double ak = mixed ? ad[k * N + i] : 1, wc = weighted ? wd[c] : 1, smooth = 0;
            for (int64_t j = 0; j < C; j++) smooth += (weighted && !tw ? wd[j] : 1) * (lse - xi[j]);
            /* PyTorch: (1 - eps) w_c CE_c + eps / C sum_j w_j CE_j; target weighting: w_c ((1 - eps) CE_c + eps / C sum_j CE_j) */
            ref += ak * (tw ? wc * ((1 - eps) * (lse - xi[c]) + eps / C * smooth)
                            : (1 - eps) * wc * (lse - xi[c]) + eps / C * smooth);
            S += ak;
        }
        sum += ref;
        double got = dbl ? ((double *)loss)[i] : ((float *)loss)[i];
        if (fabs(got - ref) > tol * (1 + fabs(ref)) && fails++ < 5) fprintf(stderr, "row %lld: loss %.17g, reference %.17g\n", (long long)i, got, ref);
        for (int64_t j = 0; j < C; j++) {                          /* d loss_i / dz_ij times g_i * 0.5 */
            double p = exp(xi[j] - lse), d = 0;
            for (int64_t k = 0; k < K; k++) {
                int64_t c = y[k * N + i];
                if (c == ignore) continue;
                double ak = mixed ? ad[k * N + i] : 1, wc = weighted ? wd[c] : 1, wj = weighted ? wd[j] : 1;
                d += tw ? ak * wc * ((1 - eps) * (p - (j == c)) + eps / C * (C * p - 1))
                        : ak * ((1 - eps) * wc * (p - (j == c)) + eps / C * (W * p - wj));
            }
            d *= gd[i] * 0.5;
            double gg = dbl ? ((double *)grad)[i * C + j] : ((float *)grad)[i * C + j];
            if (fabs(gg - d) > tol * (1 + S * (1 + W)) && fails++ < 5)
                fprintf(stderr, "row %lld class %lld: gradient %.17g, reference %.17g\n", (long long)i, (long long)j, gg, d);
        }
    }
    if (fabs(total - sum) > tol * (1 + fabs(sum))) { fprintf(stderr, "total %.17g, reference %.17g\n", total, sum); fails++; }
    if (N > 1) {                                                   /* a non-finite logit is reported, not computed */
        if (dbl) ((double *)z)[C] = NAN; else ((float *)z)[C] = INFINITY;
        if (fr_sce_forward(dbl, z, N, C, y, K, ap, wp, tw, eps, ignore, mx, ls, loss, &total, nthreads) != 1) { fprintf(stderr, "non-finite row not reported\n"); fails++; }
    }
    if (fails) fprintf(stderr, "  in case %s N=%lld C=%lld K=%lld weighted=%d mixed=%d tw=%d eps=%g threads=%d\n",
                       dbl ? "double" : "float", (long long)N, (long long)C, (long long)K, weighted, mixed, tw, eps, nthreads);
    free(x); free(wd); free(ad); free(gd); free(y); free(z); free(w); free(a); free(g); free(mx); free(ls); free(loss); free(grad);
    return fails;
}

int main(void) {
    int fails = 0, cases = 0;
    static const int64_t shapes[][2] = {{0, 3}, {1, 1}, {3, 2}, {7, 37}, {64, 1000}, {300, 500}};   /* the last: two threads */
    for (int dbl = 0; dbl < 2; dbl++)
        for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
            for (int variant = 0; variant < 6; variant++) {           /* 4, 5: target weighting, plain and mixed */
                int weighted = variant & 1 || variant >= 4, mixed = variant == 2 || variant == 3 || variant == 5, tw = variant >= 4;
                fails += check(dbl, shapes[s][0], shapes[s][1], mixed ? 2 : 1, weighted, mixed, tw, variant == 0 ? 0.0 : 0.1, 2);
                cases++;
            }
    printf("native_check: fr_version %d, %d cases, %d failures\n", fr_version(), cases, fails);
    return fails != 0;
}
