/*
layers_cpu.c -- the float operations around the ternary kernels of ternary_cpu.c, and the
whole-layer entry points packed.py calls: RMSNorm / SubLN and silu(gate)*up fused in front of a
linear (one C call per linear), Qwen3's q/k norm + RoPE, the block norm alone, and the bf16 head.
decode_cpu.c runs these same functions inside its one-call decode step.
*/
#include <math.h>
#include <stdlib.h>
#include "ternary.h"

/* ------------------------------------------------------------------------------------------ */
/* Pre-ops fused in front of a linear, so that packed.py makes one C call per linear:            */
/*   TL_PRE_RMSNORM  y = x * (1/sqrt(mean(x^2) + eps)) * w   (model.RMSNorm / SubLN; w NULL = 1) */
/*   TL_PRE_SWIGLU   x rows hold (gate | up), 2K wide: h = silu(gate) * up  (applied first)      */
/* Not bit-equal to PyTorch (sum order, exp): the int8 rounding right after may rarely differ.  */
/* Compiled per ISA with CLONES (ternary.h); exp_fast, the exp they use, is in ternary.h too.   */

/* The sum of squares in double, 8 lanes (lane l sums k = l mod 8, in increasing k), then folded
   in a fixed order: vectorizable without reassociation, the same double on every path. */
CLONES static void rmsnorm_row(const float *x, int K, const float *w, float eps, float *y) {
    double s8[8] = {0};
    int k8 = K / 8 * 8;
    for (int k = 0; k < k8; k += 8)
        for (int l = 0; l < 8; l++) s8[l] = s8[l] + (double)x[k + l] * x[k + l];
    for (int k = k8, l = 0; k < K; k++, l++) s8[l] = s8[l] + (double)x[k] * x[k];
    double ss = ((s8[0] + s8[4]) + (s8[2] + s8[6])) + ((s8[1] + s8[5]) + (s8[3] + s8[7]));
    float r = 1.0f / sqrtf((float)(ss / K) + eps);
    for (int k = 0; k < K; k++) y[k] = w ? (x[k] * r) * w[k] : x[k] * r;
}

CLONES void pre_op(const float *x, int M, int K, int pre, const float *normw, float eps,
                   float *out, int nthreads) {
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(M > 1)
    for (int m = 0; m < M; m++) {
        float *o = out + (size_t)m * K;
        const float *xm = x + (size_t)m * K * (pre & TL_PRE_SWIGLU ? 2 : 1);
        if (pre & TL_PRE_SWIGLU) {
            #pragma omp simd
            for (int k = 0; k < K; k++) o[k] = (xm[k] / (1.0f + exp_fast(-xm[k]))) * xm[K + k];
            xm = o;
        }
        if (pre & TL_PRE_RMSNORM) rmsnorm_row(xm, K, normw, eps, o);
        else if (xm != o) memcpy(o, xm, (size_t)K * 4);
    }
}

/* y (M, K) = RMSNorm of each row of x times w: the pre-op alone (packed.py's block norm in front
   of projections that carry a SubLN of their own, the same operation decode_cpu.c runs). */
int tl_rmsnorm(const float *x, int M, int K, const float *w, float eps, float *y, int nthreads) {
    if (M < 0 || K <= 0) return -1;
    pre_op(x, M, K, TL_PRE_RMSNORM, w, eps, y, threads_or_default(nthreads));
    return 0;
}

/* In place on the (M, row_stride) output of the fused q/k/v projection: for each of the first
   n_q + n_kv heads (q then k; v is left alone) RMSNorm over head_dim with q_w / k_w (skipped when
   q_w is NULL: Qwen2), then rotary embedding in the "rotate half" layout of model.apply_rope:
   x1' = x1*cos - x2*sin, x2' = x2*cos + x1*sin, with cos/sin (M, hd) for each row's position. */
int tl_qk_norm_rope(float *qkv, int M, int row_stride, int n_q, int n_kv, int hd, const float *q_w,
                    const float *k_w, float eps, const float *cos, const float *sin, int nthreads) {
    if (M < 0 || hd <= 0 || hd % 2 || (n_q + n_kv) * hd > row_stride) return -1;
    int half = hd / 2;
    nthreads = threads_or_default(nthreads);
    #pragma omp parallel for schedule(static) num_threads(nthreads) if(M > 1)
    for (int m = 0; m < M; m++) {
        const float *c = cos + (size_t)m * hd, *s = sin + (size_t)m * hd;
        for (int h = 0; h < n_q + n_kv; h++) {
            float *x = qkv + (size_t)m * row_stride + (size_t)h * hd;
            if (q_w) rmsnorm_row(x, hd, h < n_q ? q_w : k_w, eps, x);
            for (int i = 0; i < half; i++) {
                float x1 = x[i], x2 = x[i + half];
                x[i] = x1 * c[i] + (-x2) * s[i];
                x[i + half] = x2 * c[i + half] + x1 * s[i + half];
            }
        }
    }
    return 0;
}

/* The whole linear layer: x (M, K) fp32 -> y (M, N) fp32 (x is (M, 2K) with TL_PRE_SWIGLU).
   Runs the pre-op, quantizes (Eq. 3) into a scratch buffer, then one pass over the weights.
   wsum may be NULL for the ternary kind. */
static int linear(int kind, const float *x, int M, int K, int pre, const float *normw, float eps,
                  const void *w, const int32_t *wsum, const float *scale, int N, float *y,
                  int path, int nthreads) {
    if (M < 0 || K <= 0 || N < 0 || pre < 0 || pre > 7) return -1;
    int clamp = pre & TL_QUANT_CLAMP;                  /* Eq. (3)'s ε form, not a pre-op */
    pre &= ~TL_QUANT_CLAMP;
    int Kp = tl_padded_k(K);
    nthreads = threads_or_default(nthreads);
    /* one allocation: q (M*Kp bytes, 64-aligned), srow (M floats), qsum (M ints), pre-op rows */
    size_t qbytes = ((size_t)M * Kp + 63) / 64 * 64, fbytes = pre ? (size_t)M * K * 4 : 0;
    char *buf = aligned_alloc(64, (qbytes + (size_t)M * 8 + fbytes + 127) / 64 * 64);
    if (!buf) return -3;
    int8_t *q = (int8_t *)buf;
    float *srow = (float *)(buf + qbytes);
    int32_t *qsum = (int32_t *)(srow + M);
    if (pre) {
        float *xp = (float *)(qsum + M);
        pre_op(x, M, K, pre, normw, eps, xp, nthreads);
        x = xp;
    }
    int err = tl_quantize(x, M, K, q, srow, qsum, clamp, path, nthreads);
    if (!err) err = kind == 0 ? tl_ternary_gemm(q, qsum, M, Kp, w, N, NULL, y, srow, scale, path, nthreads)
                              : tl_int8_gemm(q, M, Kp, w, wsum, N, NULL, y, srow, scale, path, nthreads);
    free(buf);
    return err;
}

int tl_ternary_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                      const uint8_t *w, const float *scale, int N, float *y, int path, int nthreads) {
    return linear(0, x, M, K, pre, normw, eps, w, NULL, scale, N, y, path, nthreads);
}

int tl_int8_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                   const int8_t *w, const int32_t *wsum, const float *scale, int N, float *y,
                   int path, int nthreads) {
    return linear(1, x, M, K, pre, normw, eps, w, wsum, scale, N, y, path, nthreads);
}

/* y (M, N) fp32 = [RMSNorm](x) (M, K) times the bf16 matrix w (N, K), fp32 sums in the fixed order. */
int tl_bf16_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                   const uint16_t *w, int N, float *y, int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (M < 0 || K <= 0 || N < 0 || (pre != 0 && pre != TL_PRE_RMSNORM)) return -1;
    nthreads = threads_or_default(nthreads);
    float *xn = NULL;
    if (pre) {
        if (!(xn = malloc((size_t)M * K * 4 + 4))) return -3;
        pre_op(x, M, K, pre, normw, eps, xn, nthreads);
        x = xn;
    }
    float (*dot)(const float *, const uint16_t *, int) = bf16_dot_c;
#ifdef TL_X86
    if (path == TL_PATH_AVX512VNNI) dot = bf16_dot_512;
    if (path == TL_PATH_AVX2) dot = bf16_dot_avx2;
#endif
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int n = 0; n < N; n++)
        for (int m = 0; m < M; m++)
            y[(size_t)m * N + n] = dot(x + (size_t)m * K, w + (size_t)n * K, K);
    free(xn);
    return 0;
}
