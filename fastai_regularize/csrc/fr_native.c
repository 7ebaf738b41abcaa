/* fastai_regularize's CPU kernel: label-smoothed, K-target cross-entropy over the rows of a logits matrix.

   fastai_regularize.native compiles this file with the machine's C compiler (its flags: native._FLAGS plus one of
   native._VARIANTS) into a cache directory only this user can write, and calls the fr_* functions below through
   ctypes. `make native-check` compiles it with -Wall -Wextra -Werror and runs tests/native_check.c over it under
   AddressSanitizer and UndefinedBehaviorSanitizer. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define FR_VERSION 6   /* native._VERSION: a library of another version is not loaded */

#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__) && !defined(FR_NO_CLONES)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* e^x for x <= ~0 (x - max or x - lse): Cephes expf, rounded by the 1.5 * 2^23 trick instead of floorf so that
   loops vectorise; within 2 ulp. Below -87 (where e^x is no longer a normal float) it returns 0. For an inf or a
   NaN it returns garbage (the forward pass reports such rows and the caller recomputes them with PyTorch); the
   exponent is assembled in unsigned arithmetic, so even then nothing is undefined behaviour. */
static inline float exp_f(float x) {
    float xc = x < -87.0f ? -87.0f : x;
    float t = xc * 1.44269504088896341f + 12582912.0f;
    uint32_t ti; memcpy(&ti, &t, 4);
    float n = t - 12582912.0f;
    float r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f; p = p * r + 8.3334519073e-3f; p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f; p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    uint32_t bi = (ti - 0x4B400000u + 127u) << 23; float s; memcpy(&s, &bi, 4);
    return x < -87.0f ? 0.0f : p * s;
}
static inline double exp_d(double x) { return exp(x); }

/* The row kernels fwd_f, bwd_f (float) and fwd_d, bwd_d (double): fr_rows.h, included once per type. */
#define T float
#define FN(name) name##_f
#define EXP exp_f
#define LOG logf
#include "fr_rows.h"
#undef T
#undef FN
#undef EXP
#undef LOG

#define T double
#define FN(name) name##_d
#define EXP exp_d
#define LOG log
#include "fr_rows.h"
#undef T
#undef FN
#undef EXP
#undef LOG

typedef struct {
    int dbl; const void *z; void *o; int64_t N, C; const int64_t *y; int64_t K; const void *a; const void *w; int tw;
    double W, eps; int64_t ignore; void *mx, *ls, *loss; const void *g; int64_t gs; double scale; int64_t r0, r1, bad;
} job_t;

static void *fwd_job(void *p) {
    job_t *j = (job_t *)p;
    j->bad = j->dbl ? fwd_d(j->z, j->N, j->C, j->y, j->K, j->a, j->w, j->tw, j->W, j->eps, j->ignore, j->mx, j->ls, j->loss,
                            j->r0, j->r1)
                    : fwd_f(j->z, j->N, j->C, j->y, j->K, j->a, j->w, j->tw, (float)j->W, (float)j->eps, j->ignore, j->mx,
                            j->ls, j->loss, j->r0, j->r1);
    return NULL;
}
static void *bwd_job(void *p) {
    job_t *j = (job_t *)p;
    if (j->dbl) bwd_d(j->z, j->o, j->N, j->C, j->y, j->K, j->a, j->w, j->tw, j->W, j->eps, j->ignore, j->mx, j->ls, j->g,
                      j->gs, j->scale, j->r0, j->r1);
    else bwd_f(j->z, j->o, j->N, j->C, j->y, j->K, j->a, j->w, j->tw, (float)j->W, (float)j->eps, j->ignore, j->mx, j->ls,
               j->g, j->gs, (float)j->scale, j->r0, j->r1);
    return NULL;
}

#define MAX_THREADS 256
#define MIN_WORK 65536   /* logits per thread: below this, waking a thread costs more than it saves */

/* Rows split into contiguous blocks, one per thread. Built with -fopenmp the blocks run on the OpenMP pool, which
   is PyTorch's own where PyTorch uses libgomp (the library shares its soname, so the loader maps one copy):
   no second pool competes with PyTorch's spinning threads. Without OpenMP the blocks run one after another. */
static int64_t run(job_t *base, int nthreads, void *(*fn)(void *)) {
    int64_t nt = nthreads < 1 ? 1 : nthreads, per = base->N * base->C / MIN_WORK;
    if (nt > MAX_THREADS) nt = MAX_THREADS;
    if (nt > per) nt = per;
    if (nt > base->N) nt = base->N;
    if (nt < 1) nt = 1;
    if (nt == 1) { base->r0 = 0; base->r1 = base->N; base->bad = 0; fn(base); return base->bad; }
    job_t jobs[MAX_THREADS];
    for (int64_t t = 0; t < nt; t++) { jobs[t] = *base; jobs[t].r0 = base->N * t / nt; jobs[t].r1 = base->N * (t + 1) / nt; jobs[t].bad = 0; }
    #pragma omp parallel for num_threads(nt) schedule(static, 1)
    for (int64_t t = 0; t < nt; t++) fn(&jobs[t]);
    int64_t bad = 0;
    for (int64_t t = 0; t < nt; t++) bad += jobs[t].bad;
    return bad;
}

static double wsum(int dbl, const void *w, int64_t C) {
    double s = 0;
    if (!w) return (double)C;
    for (int64_t c = 0; c < C; c++) s += dbl ? ((const double *)w)[c] : (double)((const float *)w)[c];
    return s;
}

int fr_version(void) { return FR_VERSION; }

/* Index of the first target outside [0, C) that is not `ignore`, or -1; `*n_valid` counts the others and `*w_valid`
   sums their class weights (`w`, or 1 each). */
int64_t fr_check_targets(const int64_t *y, int64_t n, int64_t C, int64_t ignore, int dbl, const void *w,
                         int64_t *n_valid, double *w_valid) {
    int64_t v = 0; double s = 0;
    for (int64_t i = 0; i < n; i++) {
        if (y[i] == ignore) continue;
        if (y[i] < 0 || y[i] >= C) return i;
        v++;
        s += !w ? 1.0 : dbl ? ((const double *)w)[y[i]] : (double)((const float *)w)[y[i]];
    }
    *n_valid = v; *w_valid = s;
    return -1;
}

/* Per-row loss, max and log-sum-exp below the max; `*total` = sum of the row losses in double. `tw` = 1: target
   weighting (each target's smoothed loss times its class weight, smoothed uniformly), 0: PyTorch's. Returns the
   number of rows holding a non-finite logit (their loss is NaN and the caller should not use the result). */
int64_t fr_sce_forward(int dbl, const void *z, int64_t N, int64_t C, const int64_t *y, int64_t K, const void *a,
                       const void *w, int tw, double eps, int64_t ignore, void *mx, void *ls, void *loss, double *total,
                       int nthreads) {
    job_t b = {dbl, z, NULL, N, C, y, K, a, w, tw, tw ? (double)C : wsum(dbl, w, C), eps, ignore, mx, ls, loss, NULL, 0,
               1.0, 0, N, 0};
    int64_t bad = run(&b, nthreads, fwd_job);
    double s = 0;
    for (int64_t i = 0; i < N; i++) s += dbl ? ((const double *)loss)[i] : (double)((const float *)loss)[i];
    *total = s;
    return bad;
}

/* grad[i, :] = g[i * gs] * scale * d(loss_i)/dz_i, written over the whole of `grad` (N x C, contiguous). */
void fr_sce_backward(int dbl, const void *z, void *grad, int64_t N, int64_t C, const int64_t *y, int64_t K,
                     const void *a, const void *w, int tw, double eps, int64_t ignore, const void *mx, const void *ls,
                     const void *g, int64_t gs, double scale, int nthreads) {
    job_t b = {dbl, z, grad, N, C, y, K, a, w, tw, tw ? (double)C : wsum(dbl, w, C), eps, ignore, (void *)mx, (void *)ls,
               NULL, g, gs, scale, 0, N, 0};
    run(&b, nthreads, bwd_job);
}
