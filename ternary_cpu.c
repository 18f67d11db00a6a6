/*
ternary_cpu.c -- 1.58-bit (ternary) x int8 matrix kernels for packed CPU inference of a
BitNet Distillation model (arXiv 2510.13998, section 2, Eq. 1-3). Built by build_ffi.py (cffi),
called from packed.py.

THE MATH (what every kernel here computes)
    weights      W ~ scale[n] * C,   C in {-1, 0, +1}^(N x K)          (Eq. 1-2; scale = Delta)
    activations  x ~ gamma/127 * q,  q in int8^K, gamma = max|x|        (Eq. 3, one per token)
    acc[m][n]  = sum_k q[m][k] * C[n][k]                                 int32, exact
    y[m][n]    = ((float)acc[m][n] * (gamma[m] / 127.0f)) * scale[n]     fp32, in this order
  One scale per output row (not per tensor) so that fused q/k/v and gate/up keep their own Delta;
  the same order of the two fp32 multiplies as bitlinear.bitlinear_int_reference, so the results
  are equal bit for bit.

PACKED TERNARY LAYOUT (2 bits per weight, 4 weights per byte)
  K is padded to Kp = a multiple of QK = 256. The packed matrix is (N, Kp/4) bytes, row-major.
  Row n, block b (weights k = 256b .. 256b+255) is 64 bytes; byte j (0..63) of the block holds
      bits 0-1: k = 256b       + j
      bits 2-3: k = 256b +  64 + j
      bits 4-5: k = 256b + 128 + j
      bits 6-7: k = 256b + 192 + j
  each weight stored as u = C + 1 in {0, 1, 2} (3 is never used). Padding weights are u = 1 (C = 0).
  Why this order: one 64-byte load, shifted right by 0/2/4/6 and masked with 3, gives 64
  consecutive weights that line up with 64 consecutive activation bytes (AVX-512); the AVX2 path
  reads each block as two 32-byte halves the same way.

ACTIVATIONS
  q is (M, Kp) int8 row-major, zero padded past K; qsum[m] = sum_k q[m][k].
  SIMD paths multiply the unsigned u = C + 1 with the signed q (exactly what vpdpbusd and
  vpmaddubsw do) and correct afterwards:  sum_k u*q = acc + qsum  =>  acc = sum_k u*q - qsum.

INT8 HEAD (optional lm_head, not part of the paper's quantization)
  W8 is (N, Kp) int8 row-major, zero padded; scale[n] = max|W[n]|/127; wsum[n] = sum_k W8[n][k].
  AVX-512 VNNI needs unsigned x signed, so it uses q + 128 (unsigned):  acc = sum (q+128)*w - 128*wsum.
  AVX2 uses |w| x sign(q, w), which needs q != -128: the quantizer below never produces -128
  (|x| <= gamma, so |x * 127/(gamma+eps)| < 127.5).

BF16 HEAD (optional lm_head kept in bf16; no int8 anywhere)
  W16 is (N, K) bf16 (as uint16 bits) row-major; y[m][n] = sum_k x[m][k] * W16[n][k] in fp32. To
  be the same float on every path the order is fixed: 16 lanes, lane l sums k = l (mod 16) in
  increasing k (product rounded, then added: no FMA), the tail k >= K - K%16 goes to lanes
  0.. in scalar, then lanes fold l += l+8, l += l+4, l += l+2, l += l+1.

ENTRY POINTS (declared, with every struct, in ternary.h)
  tl_pack_ternary / tl_unpack_ternary      codes (N, K) int8 <-> packed (N, Kp/4)
  tl_quantize                              Eq. (3): x fp32 -> q, gamma/127, qsum
  tl_ternary_gemm / tl_int8_gemm           the integer core: acc int32, or y fp32 when y != NULL
  tl_peak_gmacs                            the ISA's int8 multiply-accumulate peak, measured
  In layers_cpu.c, on top of these: tl_ternary_linear / tl_int8_linear (a whole layer: [silu(gate)
  *up] -> [RMSNorm] -> Eq. (3) -> core -> y, one call per linear per token), tl_bf16_linear (the
  bf16 head), tl_qk_norm_rope, tl_rmsnorm; in decode_cpu.c, one decode token in one call.
  The core runs a 4-row x 4-token register tile for prefill (many tokens per pass over the
  weights) and a 4-row x 1-token tile for decode (matrix-vector), which also prefetches the rows
  PF_DIST bytes ahead: decode streams ~110 MB of packed weights per token, mostly from DRAM.

PATHS, chosen at run time (tl_cpu_path), all equal to the plain-C path bit for bit:
  0 = plain C (the reference, written to be read, in this file), 1 = AVX2, 2 = AVX-512 VNNI (their
  tiles in ternary_x86.c).
  OpenMP splits the output rows across threads; every row is computed by one thread in the same
  order whatever the thread count, so results do not depend on the number of threads either.
*/
#include <stdlib.h>
#include <math.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "ternary.h"

int tl_padded_k(int K) { return (K + QK - 1) / QK * QK; }

/* The best path this CPU (and OS) supports. */
int tl_cpu_path(void) {
#ifdef TL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vnni"))
        return TL_PATH_AVX512VNNI;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return TL_PATH_AVX2;
#endif
    return TL_PATH_C;
}

/* Threads used when a call passes nthreads <= 0; 1 without OpenMP. */
int tl_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int tl_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int threads_or_default(int nthreads) { return nthreads > 0 ? nthreads : tl_max_threads(); }
#ifdef _OPENMP
static int thread_count(void) { return omp_get_num_threads(); }
static int thread_id(void) { return omp_get_thread_num(); }
#else
static int thread_count(void) { return 1; }
static int thread_id(void) { return 0; }
#endif

/* ------------------------------------------------------------------------------------------ */
/* Packing                                                                                      */

/* codes (N, K) int8 in {-1,0,1} -> packed (N, Kp/4). Returns 0, or -1 if a code is not ternary. */
int tl_pack_ternary(const int8_t *codes, int N, int K, uint8_t *packed) {
    int Kp = tl_padded_k(K), rb = Kp / 4;
    for (int n = 0; n < N; n++) {
        uint8_t *row = packed + (size_t)n * rb;
        memset(row, 0x55, rb);  /* 0b01010101: u = 1 (C = 0) in all four slots */
        for (int k = 0; k < K; k++) {
            int c = codes[(size_t)n * K + k];
            if (c < -1 || c > 1) return -1;
            int b = k / QK, r = k % QK, j = r % 64, s = 2 * (r / 64);
            row[b * 64 + j] = (uint8_t)((row[b * 64 + j] & ~(3 << s)) | ((c + 1) << s));
        }
    }
    return 0;
}

/* packed (N, Kp/4) -> codes (N, K). */
void tl_unpack_ternary(const uint8_t *packed, int N, int K, int8_t *codes) {
    int rb = tl_padded_k(K) / 4;
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            int r = k % QK;
            int u = (packed[(size_t)n * rb + (k / QK) * 64 + r % 64] >> (2 * (r / 64))) & 3;
            codes[(size_t)n * K + k] = (int8_t)(u - 1);
        }
}

/* ------------------------------------------------------------------------------------------ */
/* Eq. (3): q = RoundClip(127/(gamma+eps) * x, -128, 127), gamma = max|x|, per token.           */
/* Same fp32 operations as bitlinear.activation_quant_int: torch evaluates 127.0/(g+eps) as     */
/* reciprocal(g+eps) * 127, and rounds half to even. srow = gamma/127 is the token's scale.     */

/* quantize_row (one token) is in ternary.h: decode_cpu.c inlines it too. Compiled once per path
   below, equal on all of them. */

#define QUANTIZE_ROWS                                                                     \
    int Kp = tl_padded_k(K);                                                              \
    _Pragma("omp parallel for schedule(static) num_threads(nthreads) if(M > 1)")          \
    for (int m = 0; m < M; m++)                                                           \
        quantize_row(x + (size_t)m * K, K, Kp, q + (size_t)m * Kp, srow + m, qsum + m, clamp);

static void quantize_c(const float *x, int M, int K, int8_t *q, float *srow, int32_t *qsum,
                       int clamp, int nthreads) { QUANTIZE_ROWS }
#ifdef TL_X86
__attribute__((target("avx512f,avx512bw")))
static void quantize_512(const float *x, int M, int K, int8_t *q, float *srow, int32_t *qsum,
                         int clamp, int nthreads) { QUANTIZE_ROWS }
__attribute__((target("avx2")))
static void quantize_avx2(const float *x, int M, int K, int8_t *q, float *srow, int32_t *qsum,
                          int clamp, int nthreads) { QUANTIZE_ROWS }
#endif

/* x (M, K) fp32 -> q (M, Kp) int8 zero padded, srow[m] = gamma/127, qsum[m] = sum_k q[m][k]. */
int tl_quantize(const float *x, int M, int K, int8_t *q, float *srow, int32_t *qsum, int clamp,
                int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (M < 0 || K <= 0) return -1;
    nthreads = threads_or_default(nthreads);
#ifdef TL_X86
    if (path == TL_PATH_AVX512VNNI) { quantize_512(x, M, K, q, srow, qsum, clamp, nthreads); return 0; }
    if (path == TL_PATH_AVX2) { quantize_avx2(x, M, K, q, srow, qsum, clamp, nthreads); return 0; }
#endif
    quantize_c(x, M, K, q, srow, qsum, clamp, nthreads);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Plain C: the reference every SIMD path must equal. One output at a time, straight from the   */
/* layout above.                                                                                */

/* (gemm_args, the arguments of one product, and store(), its one float scale, are in ternary.h.) */

/* Rows [lo, hi) of the output (every token), one output at a time, straight from the layout. */
static void ternary_c_rows(const gemm_args *g, int lo, int hi) {
    int rb = g->Kp / 4;
    for (int n = lo; n < hi; n++) {
        const uint8_t *wn = (const uint8_t *)g->w + (size_t)n * rb;
        for (int m = 0; m < g->M; m++) {
            const int8_t *qm = g->q + (size_t)m * g->Kp;
            int32_t a = 0;
            for (int b = 0; b < g->Kp / QK; b++)
                for (int i = 0; i < 4; i++)
                    for (int j = 0; j < 64; j++) {
                        int c = ((wn[b * 64 + j] >> (2 * i)) & 3) - 1;     /* C in {-1,0,1} */
                        a += c * qm[b * QK + 64 * i + j];
                    }
            store(a, m, n, g->N, g->acc, g->y, g->srow, g->scale);
        }
    }
}

static void int8_c_rows(const gemm_args *g, int lo, int hi) {
    for (int n = lo; n < hi; n++) {
        const int8_t *wn = (const int8_t *)g->w + (size_t)n * g->Kp;
        for (int m = 0; m < g->M; m++) {
            const int8_t *qm = g->q + (size_t)m * g->Kp;
            int32_t a = 0;
            for (int k = 0; k < g->Kp; k++) a += wn[k] * qm[k];
            store(a, m, n, g->N, g->acc, g->y, g->srow, g->scale);
        }
    }
}

/* The SIMD paths (AVX2, AVX-512 VNNI): register tiles, the decode rows and the ISA peak's loops
   live in ternary_x86.c; each path equals the plain C above bit for bit (test_ternary.py). */

/* Rows [lo, hi) of a ternary (kind 0) or int8 (kind 1) product on the given path. */
void gemm_rows(int kind, int path, const gemm_args *g, int lo, int hi) {
#ifdef TL_X86
    if (path == TL_PATH_AVX512VNNI) { (kind ? int8_512_rows : ternary_512_rows)(g, lo, hi); return; }
    if (path == TL_PATH_AVX2) { (kind ? int8_avx2_rows : ternary_avx2_rows)(g, lo, hi); return; }
#endif
    (kind ? int8_c_rows : ternary_c_rows)(g, lo, hi);
}

/* Called inside a parallel region: this thread's rows, one contiguous run of 4-row tiles. Every
   row is computed by one thread in one order, so no result depends on the thread count. */
void my_rows(int N, int *lo, int *hi) {
    int nt = thread_count(), id = thread_id(), tiles = (N + 3) / 4, per = (tiles + nt - 1) / nt;
    *lo = id * per * 4 < N ? id * per * 4 : N;
    *hi = (id + 1) * per * 4 < N ? (id + 1) * per * 4 : N;
}

static void gemm(int kind, int path, const gemm_args *g, int nthreads) {
    #pragma omp parallel num_threads(nthreads)
    {
        int lo, hi;
        my_rows(g->N, &lo, &hi);
        gemm_rows(kind, path, g, lo, hi);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The ISA's peak, measured: the int8 multiply-accumulate rate of a path's core instruction with  */
/* 12 independent accumulators and no memory traffic, on nthreads threads. bench.py divides each  */
/* kernel's GMAC/s by it. VNNI: vpdpbusd, 64 MACs; AVX2: vpmaddubsw + vpaddw, 32 MACs (the loops: */
/* peak_512 / peak_avx2 in ternary_x86.c).                                                        */

double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* GMAC/s of the path's core instruction; 0 for plain C (no ISA peak), -1 for a bad path. */
double tl_peak_gmacs(int path, int nthreads, long iters) {
    if (check_path(&path) || iters <= 0) return -1.0;
    if (path == TL_PATH_C) return 0.0;
    nthreads = threads_or_default(nthreads);
    volatile int32_t sink = 0;
    double t0 = now_s();
#ifdef TL_X86
    #pragma omp parallel num_threads(nthreads)
    { int32_t r = path == TL_PATH_AVX512VNNI ? peak_512(iters) : peak_avx2(iters); sink += r; }
#endif
    double dt = now_s() - t0;
    (void)sink;
    return (double)iters * 12 * (path == TL_PATH_AVX512VNNI ? 64 : 32) * nthreads / dt / 1e9;
}

/* ------------------------------------------------------------------------------------------ */
/* bf16 head: the 16 lanes of one row (order at the top of the file), then tail and fold.      */

float bf16_finish(float a[16], const float *x, const uint16_t *w, int K) {
    for (int k = K / 16 * 16, l = 0; k < K; k++, l++) a[l] = a[l] + x[k] * bf16_to_f32(w[k]);
    for (int s = 8; s >= 1; s /= 2)
        for (int l = 0; l < s; l++) a[l] = a[l] + a[l + s];
    return a[0];
}

float bf16_dot_c(const float *x, const uint16_t *w, int K) {
    float a[16] = {0};
    for (int k = 0; k + 16 <= K; k += 16)
        for (int l = 0; l < 16; l++) a[l] = a[l] + x[k + l] * bf16_to_f32(w[k + l]);
    return bf16_finish(a, x, w, K);
}

/* bf16_dot_512 / bf16_dot_avx2: the same 16 lanes in registers, in ternary_x86.c. */

/* ------------------------------------------------------------------------------------------ */
/* Entry points. Return 0 on success, -1 for a bad argument, -2 for a path this CPU lacks,      */
/* -3 when out of memory. nthreads <= 0 means all OpenMP threads; path < 0 means tl_cpu_path(). */

int check_path(int *path) {
    if (*path < 0) *path = tl_cpu_path();
    if (*path > TL_PATH_AVX512VNNI) return -1;
    if (*path > tl_cpu_path()) return -2;
    return 0;
}

/* Integer core: q (M, Kp) int8 with qsum (M,), packed w (N, Kp/4). Writes acc (M, N) int32 when
   y is NULL, else y (M, N) fp32 = ((float)acc * srow[m]) * scale[n]. */
int tl_ternary_gemm(const int8_t *q, const int32_t *qsum, int M, int Kp, const uint8_t *w, int N,
                    int32_t *acc, float *y, const float *srow, const float *scale,
                    int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (M < 0 || N < 0 || Kp <= 0 || Kp % QK) return -1;
    nthreads = threads_or_default(nthreads);
    gemm_args g = {q, NULL, qsum, M, Kp, w, NULL, N, acc, y, srow, scale};
    gemm(0, path, &g, nthreads);
    return 0;
}

/* Same for an int8 weight matrix w (N, Kp) with wsum (N,) = its row sums. */
int tl_int8_gemm(const int8_t *q, int M, int Kp, const int8_t *w, const int32_t *wsum, int N,
                 int32_t *acc, float *y, const float *srow, const float *scale,
                 int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (M < 0 || N < 0 || Kp <= 0 || Kp % QK) return -1;
    nthreads = threads_or_default(nthreads);
    gemm_args g = {q, NULL, NULL, M, Kp, w, wsum, N, acc, y, srow, scale};
    uint8_t *qu = NULL;
    if (path == TL_PATH_AVX512VNNI) {   /* VNNI multiplies unsigned x signed: q + 128 */
        if (!(qu = aligned_alloc(64, (size_t)M * Kp + 64))) return -3;
        for (size_t i = 0; i < (size_t)M * Kp; i++) qu[i] = (uint8_t)(q[i] + 128);
        g.qu = qu;
    }
    gemm(1, path, &g, nthreads);
    free(qu);
    return 0;
}
