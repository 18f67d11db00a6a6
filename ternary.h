/*
ternary.h -- the packed CPU inference kernels' one header: the structs of a packed model with the
shape of every field, and every entry point, written once. build_ffi.py hands the first part (up
to the line "end of the Python API") to cffi as the declarations Python may call; the second part
is what the four .c files share with each other (ternary_cpu.c: quantization and the integer
products, plain C; ternary_x86.c: their AVX2 / AVX-512 VNNI tiles; layers_cpu.c: the float
operations around them; decode_cpu.c: one decode token in one call). The math and the packed
layout are described at the top of ternary_cpu.c.

Shapes: C hidden size, I intermediate size, nq / nkv query / key-value heads, hd head_dim, V vocab,
Kp = K padded to a multiple of 256 (tl_padded_k), rows = output rows of a matrix.
Return codes of every int entry point: 0 ok, -1 a bad argument, -2 a path this CPU lacks, -3 out
of memory. nthreads <= 0 means all OpenMP threads; path < 0 means tl_cpu_path().
*/
#ifndef TERNARY_H
#define TERNARY_H
#include <stddef.h>
#include <stdint.h>

enum { TL_PATH_C = 0, TL_PATH_AVX2 = 1, TL_PATH_AVX512VNNI = 2 };   /* chosen at run time */
enum { TL_PRE_RMSNORM = 1, TL_PRE_SWIGLU = 2 };   /* pre-ops fused in front of a linear (layers_cpu.c) */
enum { TL_QUANT_CLAMP = 4 };   /* in a linear's flags: Eq. (3) with max(γ, ε) (the authors' clamp), else γ + ε */
enum { TL_HEAD_BF16 = 1, TL_HEAD_INT8 = 2 };      /* the lm_head's kind */

/* One projection's part: a ternary matrix with its row scales (Δ), an optional bias, and the SubLN
   of its own in front (NULL: the block's norm is the only one). */
typedef struct {
    const uint8_t *w;          /* (rows, Kp/4) packed ternary codes */
    const float *scale;        /* (rows) Δ of each output row */
    const float *bias;         /* (rows), or NULL */
    const float *norm;         /* (K) its own SubLN weight, or NULL */
    int rows;
} tl_part;

/* One layer's weights (packed.py fills these from a PackedBlock; NULL where the model lacks one).
   q/k/v and gate/up are one fused part each, or, with a SubLN before every projection (the
   authors' layout, config.subln_all), 3 and 2 parts with their own norms. */
typedef struct {
    const float *in_norm;      /* (C) input_layernorm */
    int n_qkv, n_gate_up;      /* 1 and 1, or 3 and 2 */
    tl_part qkv[3];            /* rows: q (nq hd) | k (nkv hd) | v (nkv hd) */
    tl_part gate_up[2];        /* rows: gate (I) | up (I) */
    const float *q_norm;       /* (hd), NULL without q/k norm (Qwen2, Llama) */
    const float *k_norm;       /* (hd), NULL without q/k norm */
    const float *attn_subln;   /* (nq hd) Eq. (4)'s SubLN, or NULL (no SubLN) */
    const uint8_t *o;          /* (C, Qp/4) o_proj, Qp = nq hd padded */
    const float *o_scale;      /* (C) */
    const float *post_norm;    /* (C) post_attention_layernorm */
    const float *mlp_subln;    /* (I) Eq. (5)'s SubLN, or NULL */
    const uint8_t *down;       /* (C, Ip/4) down_proj, Ip = I padded */
    const float *down_scale;   /* (C) */
    uint16_t *k_cache;         /* (nkv, max_len, hd) fp16, written at each position */
    uint16_t *v_cache;         /* (nkv, max_len, hd) fp16 */
} tl_layer;

/* A whole packed model (packed.py's DecodeStep fills it; every pointer stays owned by Python). */
typedef struct {
    int dim, hidden;           /* C, I */
    int n_layers, n_q, n_kv, head_dim, vocab, max_len;
    float eps;                 /* rms_norm_eps of every norm */
    const float *rope_cos;     /* (max_len, hd): row p = position p */
    const float *rope_sin;     /* (max_len, hd) */
    const tl_layer *layers;    /* (n_layers) */
    const float *final_norm;   /* (C) */
    int head_kind;             /* TL_HEAD_BF16: head_w (V, C) bf16; TL_HEAD_INT8: head_w (V, Cp) int8 */
    const void *head_w;
    const int32_t *head_wsum;  /* (V) row sums of the int8 head, else NULL */
    const float *head_scale;   /* (V) row scales of the int8 head, else NULL */
    const void *embed_w;       /* the embedding table, same kind and layout as the head (tied: the same) */
    const float *embed_scale;  /* (V) int8 rows' scales, else NULL */
    int quant_clamp;           /* Eq. (3)'s ε form: 1 = max(γ, ε) (the authors' clamp), 0 = γ + ε (the paper) */
} tl_model;

/* ternary_cpu.c: the packing, Eq. (3), the integer products */
int tl_padded_k(int K);                        /* Kp */
int tl_cpu_path(void);                         /* the best path this CPU has */
int tl_max_threads(void);
int tl_has_openmp(void);
int tl_pack_ternary(const int8_t *codes, int N, int K, uint8_t *packed);     /* (N, K) -> (N, Kp/4) */
void tl_unpack_ternary(const uint8_t *packed, int N, int K, int8_t *codes);
int tl_quantize(const float *x, int M, int K, int8_t *q, float *srow, int32_t *qsum, int clamp,
                int path, int nthreads);       /* x (M, K) -> q (M, Kp), srow (M) = γ/127, qsum (M) */
int tl_ternary_gemm(const int8_t *q, const int32_t *qsum, int M, int Kp, const uint8_t *w, int N,
                    int32_t *acc, float *y, const float *srow, const float *scale,
                    int path, int nthreads);   /* acc (M, N) int32, or y (M, N) fp32 when y != NULL */
int tl_int8_gemm(const int8_t *q, int M, int Kp, const int8_t *w, const int32_t *wsum, int N,
                 int32_t *acc, float *y, const float *srow, const float *scale,
                 int path, int nthreads);      /* w (N, Kp) int8, wsum (N) */
double tl_peak_gmacs(int path, int nthreads, long iters);   /* the ISA's int8 MAC peak, GMAC/s */

/* layers_cpu.c: a whole linear per call ([silu(gate) * up] -> [RMSNorm] -> Eq. 3 -> product) */
int tl_ternary_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                      const uint8_t *w, const float *scale, int N, float *y, int path, int nthreads);
int tl_int8_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                   const int8_t *w, const int32_t *wsum, const float *scale, int N, float *y,
                   int path, int nthreads);
int tl_bf16_linear(const float *x, int M, int K, int pre, const float *normw, float eps,
                   const uint16_t *w, int N, float *y, int path, int nthreads);
int tl_rmsnorm(const float *x, int M, int K, const float *w, float eps, float *y, int nthreads);
int tl_qk_norm_rope(float *qkv, int M, int row_stride, int n_q, int n_kv, int hd, const float *q_w,
                    const float *k_w, float eps, const float *cos, const float *sin, int nthreads);

/* decode_cpu.c: attention of one token over the fp16 cache, and one decode token in one call */
void tl_f32_to_f16(const float *x, size_t n, uint16_t *y);
void tl_f16_to_f32(const uint16_t *x, size_t n, float *y);
int tl_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                 int max_len, int n, float *y, float *att, int path, int nthreads);
size_t tl_decode_scratch_bytes(const tl_model *m);
int tl_decode_token(const tl_model *m, int token, int pos, float *logits, void *scratch,
                    double *timing, int path, int nthreads);   /* logits (V); timing (3) or NULL */

/* ---------------------------------------------------------- end of the Python API (build_ffi.py) */

/* What the .c files share with each other (hidden: not exported from the module). */
#include <string.h>
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define TL_X86 1
#endif
#define HIDDEN __attribute__((visibility("hidden")))

#define QK 256   /* weights per packed block: 64 bytes */
#ifndef PF_DIST
#define PF_DIST 8192  /* decode: prefetch the weights this many bytes ahead (prefetches never fault) */
#endif
#define TL_EPS 1e-5f
#define ROUND_MAGIC 12582912.0f  /* 1.5 * 2^23: (v + M) - M rounds |v| < 2^22 half to even */

/* The vector operations around the kernels are compiled for AVX-512, AVX2 and plain x86-64 and
   picked by the CPU at load time (GCC's target_clones): each step is one IEEE fp32 operation or a
   fixed-order sum, so every clone gives the same floats. */
#if defined(TL_X86) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define CLONES
#endif

/* The arguments of one matrix product, shared by every path: q (M, Kp) int8 with qsum (M,) (and
   qu = q + 128 for the int8 VNNI path), weights w (N, Kp/4 packed ternary, or N x Kp int8 with row
   sums wsum), output acc (M, N) int32, or y (M, N) fp32 when y != NULL. */
typedef struct {
    const int8_t *q; const uint8_t *qu; const int32_t *qsum; int M, Kp;
    const void *w; const int32_t *wsum; int N;
    int32_t *acc; float *y; const float *srow, *scale;
} gemm_args;

/* y = ((float)acc * srow[m]) * scale[n]: the one float scale per output, written by every path. */
static inline void store(int32_t a, int m, int n, int N, int32_t *acc, float *y,
                         const float *srow, const float *scale) {
    if (y) y[(size_t)m * N + n] = ((float)a * srow[m]) * scale[n];
    else acc[(size_t)m * N + n] = a;
}

/* Eq. (3) on one token (ternary_cpu.c explains it): q = RoundClip(127/(γ+ε) x), γ = max|x|;
   clamp: q = RoundClip(127/max(γ, ε) x) and the token's scale max(γ, ε)/127 (bitlinear.py, eps="clamp").
   Written so the compiler vectorizes it; inlined into each path's code, equal on all of them:
   every step is one IEEE fp32 operation or exact integer arithmetic. */
static inline __attribute__((always_inline))
void quantize_row(const float *xm, int K, int Kp, int8_t *qm, float *srow, int32_t *qsum, int clamp) {
    /* γ = max|x|: for non-negative floats the order of the bit patterns is the order of
       the values, so an integer max (which vectorizes) gives the same result */
    int32_t gbits = 0;
    for (int k = 0; k < K; k++) {
        int32_t b;
        float a = xm[k];
        memcpy(&b, &a, 4);
        b &= 0x7fffffff;                                 /* |x| */
        gbits = b > gbits ? b : gbits;
    }
    float g;
    memcpy(&g, &gbits, 4);
    if (clamp) g = g > TL_EPS ? g : TL_EPS;
    float inv = (1.0f / (clamp ? g : g + TL_EPS)) * 127.0f;
    int32_t s = 0;
    for (int k = 0; k < K; k++) {
        float v = (xm[k] * inv + ROUND_MAGIC) - ROUND_MAGIC;
        v = v < -128.0f ? -128.0f : v;
        v = v > 127.0f ? 127.0f : v;
        int32_t qi = (int32_t)v;
        qm[k] = (int8_t)qi;
        s += qi;
    }
    memset(qm + K, 0, Kp - K);
    *srow = g / 127.0f;
    *qsum = s;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* exp(x) for silu and softmax, in plain fp32 operations the compiler vectorizes (libm's expf is a
   scalar call): x = n ln2 + r with n = round(x log2 e) and ln2 in two parts (Cody-Waite), e^r by
   the degree-6 polynomial of Cephes' expf (|r| <= ln2/2; within 1.3 ulp of exp on [-87, 88]),
   times 2^n built in the exponent bits. x is clamped to [-87, 88], where 2^n stays normal. */
static inline float exp_fast(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float n = (x * 1.44269504089f + ROUND_MAGIC) - ROUND_MAGIC;
    float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &bits, 4);
    return ((p * (r * r) + r) + 1.0f) * two_n;
}

/* ternary_cpu.c */
HIDDEN int check_path(int *path);                     /* resolves path < 0; -1 / -2 as above */
HIDDEN int threads_or_default(int nthreads);
HIDDEN void my_rows(int N, int *lo, int *hi);         /* inside a parallel region: this thread's rows */
HIDDEN void gemm_rows(int kind, int path, const gemm_args *g, int lo, int hi);   /* kind 0 ternary, 1 int8 */
HIDDEN double now_s(void);
HIDDEN float bf16_dot_c(const float *x, const uint16_t *w, int K);
HIDDEN float bf16_finish(float a[16], const float *x, const uint16_t *w, int K);
/* layers_cpu.c */
HIDDEN void pre_op(const float *x, int M, int K, int pre, const float *normw, float eps, float *out, int nthreads);
#ifdef TL_X86
/* ternary_x86.c: the SIMD paths (rows [lo, hi) of a product; the ISA peak's loops; the bf16 dot) */
HIDDEN void ternary_512_rows(const gemm_args *g, int lo, int hi);
HIDDEN void ternary_avx2_rows(const gemm_args *g, int lo, int hi);
HIDDEN void int8_512_rows(const gemm_args *g, int lo, int hi);
HIDDEN void int8_avx2_rows(const gemm_args *g, int lo, int hi);
HIDDEN int32_t peak_512(long iters);
HIDDEN int32_t peak_avx2(long iters);
HIDDEN float bf16_dot_512(const float *x, const uint16_t *w, int K);
HIDDEN float bf16_dot_avx2(const float *x, const uint16_t *w, int K);
#endif
#endif /* TERNARY_H */
