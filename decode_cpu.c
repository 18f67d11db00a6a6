/*
decode_cpu.c -- one decode token of the packed 1.58-bit Qwen3 in one C call, in the manner of
llama2.c's run.c: the whole forward of a single token (every layer, the final norm and the lm_head)
on preallocated buffers, with no Python between the operations. It calls the kernels of
ternary_cpu.c and the pre-ops of layers_cpu.c (declared in ternary.h); packed.py fills the model
struct from a PackedQwen3 and keeps the readable PyTorch forward as the reference this step must
equal (test_decode.py: bit for bit, logits and 64 greedy tokens).

ONE TOKEN (x is the residual stream, C = hidden size; every buffer fp32 unless marked)
  x (C)           = embedding row of the token (int8 row * its scale, or bf16 -> fp32)
  per layer:
    xb (C)        = RMSNorm(x) * input_layernorm                  } one int8 quantization (Eq. 3)
    qkv (Nqkv)    = W_qkv . xb (+ bias)       Nqkv = (nq + 2 nkv) hd  ternary GEMV
    q/k heads     : per-head RMSNorm (Qwen3) + RoPE at position pos, in place
    k/v cache     : cache[l][g][pos] = fp16(k_g), fp16(v_g)  (nkv, max_len, hd) each, batch row 0
    att (nq, pos+1)  = softmax(q_h . k_g[t] / sqrt(hd))           g = h / (nq / nkv)  (GQA)
    y (nq hd)     = sum_t att[h][t] v_g[t]                        (Eq. 6, the attention output)
    x            += W_o . SubLN(y)                                 (Eq. 4)
    gu (2I)       = W_gate_up . RMSNorm(x) * post_attention_layernorm
    x            += W_down . SubLN(silu(gate) * up)                (Eq. 5)
  logits (V)      = lm_head . RMSNorm(x) * norm                    int8 or bf16 head

THREADS: one OpenMP parallel region per token. The matrix products split their output rows
across the threads (my_rows, as ternary_cpu.c's own entry points do) and attention splits the
query heads; the small vector operations run on one thread (omp single), with a barrier after
each step. Every number is computed by one thread in one order: the result does not depend on the
thread count. The operations are the same C functions the PyTorch reference calls through
ckernels.py (pre-ops, quantization, GEMV, q/k norm + RoPE), so only attention differs from it in
rounding (SDPA sums in another order).
*/
/* The structs (tl_part, tl_layer, tl_model) with the shape of every field: ternary.h. */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "ternary.h"

static int max3(int a, int b, int c) { return a > b ? (a > c ? a : c) : (b > c ? b : c); }

/* Bytes of scratch tl_decode_token needs for this model (the caller allocates it once). */
size_t tl_decode_scratch_bytes(const tl_model *m) {
    int C = m->dim, I = m->hidden, Q = m->n_q * m->head_dim, Nqkv = (m->n_q + 2 * m->n_kv) * m->head_dim;
    size_t floats = (size_t)C + max3(C, Q, I) + Nqkv + Q + 2 * (size_t)I + C
                    + (size_t)m->n_q * m->max_len + C;
    size_t bytes = (size_t)tl_padded_k(max3(C, Q, I));
    return floats * 4 + 2 * bytes + 256;
}

/* The scratch, carved into its buffers (shapes as in the comment at the top). */
typedef struct {
    float *x, *xb, *qkv, *y, *gu, *ob, *att, *h;
    int8_t *q; uint8_t *qu; float srow; int32_t qsum;
    int clamp;                                    /* tl_model.quant_clamp */
} bufs;

static bufs carve(const tl_model *m, void *scratch) {
    int C = m->dim, I = m->hidden, Q = m->n_q * m->head_dim, Nqkv = (m->n_q + 2 * m->n_kv) * m->head_dim;
    bufs b;
    float *f = scratch;
    b.x = f;               f += C;                /* (C) residual */
    b.xb = f;              f += max3(C, Q, I);    /* (max(C, Q, I)) the normalized input of a linear */
    b.qkv = f;             f += Nqkv;             /* (Nqkv) q | k | v */
    b.y = f;               f += Q;                /* (nq hd) attention output */
    b.gu = f;              f += 2 * I;            /* (2I) gate | up */
    b.ob = f;              f += C;                /* (C) o_proj / down_proj output */
    b.att = f;             f += (size_t)m->n_q * m->max_len;  /* (nq, max_len) scores */
    b.h = f;               f += C;                /* (C) the block's norm, when parts have their own */
    b.q = (int8_t *)f;                            /* (Kp) int8 activations */
    b.qu = (uint8_t *)f + tl_padded_k(max3(C, Q, I));  /* (Kp) q + 128, the VNNI int8 head */
    b.clamp = m->quant_clamp;
    return b;
}

/* [pre-op] then Eq. (3) on one vector of K: b->q, b->srow, b->qsum (one thread). */
CLONES static void prep(bufs *b, const float *x, int K, int pre, const float *normw, float eps) {
    const float *src = x;
    if (pre) { pre_op(x, 1, K, pre, normw, eps, b->xb, 1); src = b->xb; }
    quantize_row(src, K, tl_padded_k(K), b->q, &b->srow, &b->qsum, b->clamp);
}

/* This thread's rows of y (N) = W . q, W ternary (N, Kp/4). Caller puts a barrier after it. */
static void gemv_rows(int path, bufs *b, int Kp, const uint8_t *w, const float *scale, int N, float *y) {
    gemm_args g = {b->q, NULL, &b->qsum, 1, Kp, w, NULL, N, NULL, y, &b->srow, scale};
    int lo, hi;
    my_rows(N, &lo, &hi);
    gemm_rows(0, path, &g, lo, hi);
}

/* THE KV CACHE holds fp16 (half the bytes of fp32: memory, and the reads of a long context).
   Conversions in software, exact and the same on every path: fp16 -> fp32 is exact; fp32 -> fp16
   rounds to nearest even like PyTorch's .half() (overflow to inf, subnormals kept, NaN -> 0x7e00).
   The SIMD paths read the cache with the hardware conversion (F16C / AVX-512), which is exact too. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    float f;
    if (e == 0x1f) bits = sign | 0x7f800000u | (man << 13);            /* inf, NaN */
    else if (e) bits = sign | ((e + 112) << 23) | (man << 13);           /* normal: bias 15 -> 127 */
    else {                                                                /* zero, subnormal: man 2^-24 */
        f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_half(float f) {
    uint32_t x, sign, ax;
    memcpy(&x, &f, 4);
    sign = (x >> 16) & 0x8000;
    ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00);             /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);            /* >= 65520 (or inf): inf */
    if (ax < 0x38800000u) {                                              /* below 2^-14: subnormal */
        float v;
        memcpy(&v, &ax, 4);
        return (uint16_t)(sign | (uint32_t)((v * 16777216.0f + ROUND_MAGIC) - ROUND_MAGIC));  /* v 2^24, RNE */
    }
    uint32_t m = ax - 0x38000000u;                                       /* exponent bias 127 -> 15 */
    m += 0xfff + ((m >> 13) & 1);                                        /* round the 13 dropped bits, RNE */
    return (uint16_t)(sign | (m >> 13));
}

/* n values, for tests: fp32 -> fp16 bits, and back. */
void tl_f32_to_f16(const float *x, size_t n, uint16_t *y) { for (size_t i = 0; i < n; i++) y[i] = float_to_half(x[i]); }
void tl_f16_to_f32(const uint16_t *x, size_t n, float *y) { for (size_t i = 0; i < n; i++) y[i] = half_to_float(x[i]); }

#define TL_MAX_HD 512   /* attention converts one cache row at a time into a stack buffer */

/* ATTENTION of one new token (Eq. 6 with grouped-query heads), the one both the C step and
   packed.py's PyTorch forward use for a decode token. Sums in a fixed order, so that every path
   gives the same floats: a dot product runs 16 lanes (lane l sums d = l mod 16 in increasing d,
   product rounded then added), the tail d >= hd - hd%16 goes to lanes 0.. , then the lanes fold
   l += l+8, +4, +2, +1; softmax: exp_fast, summed in increasing t; y accumulates p_t * v_t in
   increasing t. */
static inline __attribute__((always_inline)) float dot_lanes(const float *a, const float *b, int n) {
    float s[16] = {0};
    int n16 = n / 16 * 16;
    for (int d = 0; d < n16; d += 16)
        for (int l = 0; l < 16; l++) s[l] = s[l] + a[d + l] * b[d + l];
    for (int d = n16, l = 0; d < n; d++, l++) s[l] = s[l] + a[d] * b[d];
    for (int w = 8; w >= 1; w /= 2)
        for (int l = 0; l < w; l++) s[l] = s[l] + s[l + w];
    return s[0];
}

/* KV group g over cache positions 0..n-1: for each of its rep = n_q / n_kv query heads h = g rep
   + r, att_h (n) = softmax(q_h . k_t / sqrt(hd)) and y_h = sum_t att_h,t v_t. Each cache row is
   converted once (row_to_f32) and serves the group's heads (GQA); per head the operations and their
   order are those of a single head. q (nq hd), caches (nkv, max_len, hd), att (rep rows of stride
   att_ld). Inlined into one function per path (below), with that path's row conversion and dot. */
#define TL_MAX_REP 64
typedef void (*row_fn)(const uint16_t *src, float *dst, int n);
typedef float (*dot_fn)(const float *a, const float *b, int n);

static inline __attribute__((always_inline))
void attend_group(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                  int max_len, int n, int g, float *att, size_t att_ld, float *y, row_fn row_to_f32, dot_fn dot) {
    int rep = n_q / n_kv;
    const uint16_t *kc = k_cache + (size_t)g * max_len * hd, *vc = v_cache + (size_t)g * max_len * hd;
    float scale = 1.0f / sqrtf((float)hd), row[TL_MAX_HD], mx[TL_MAX_REP], sum[TL_MAX_REP];
    for (int r = 0; r < rep; r++) { mx[r] = -INFINITY; sum[r] = 0.0f; }
    for (int t = 0; t < n; t++) {                          /* scores: q_h . k_t / sqrt(hd) */
        row_to_f32(kc + (size_t)t * hd, row, hd);
        for (int r = 0; r < rep; r++) {
            float s = dot(q + (size_t)(g * rep + r) * hd, row, hd) * scale;
            att[(size_t)r * att_ld + t] = s;
            mx[r] = s > mx[r] ? s : mx[r];
        }
    }
    for (int r = 0; r < rep; r++) {                        /* softmax, summed in increasing t */
        float *ar = att + (size_t)r * att_ld;
        for (int t = 0; t < n; t++) ar[t] = exp_fast(ar[t] - mx[r]);
        for (int t = 0; t < n; t++) sum[r] = sum[r] + ar[t];
        for (int d = 0; d < hd; d++) y[(size_t)(g * rep + r) * hd + d] = 0.0f;
    }
    for (int t = 0; t < n; t++) {                          /* y_h += p_t v_t, in increasing t */
        row_to_f32(vc + (size_t)t * hd, row, hd);
        for (int r = 0; r < rep; r++) {
            float p = att[(size_t)r * att_ld + t] / sum[r], *yh = y + (size_t)(g * rep + r) * hd;
            for (int d = 0; d < hd; d++) yh[d] = yh[d] + p * row[d];
        }
    }
}

static inline void row_c(const uint16_t *src, float *dst, int n) {
    for (int d = 0; d < n; d++) dst[d] = half_to_float(src[d]);
}

static void attend_c(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                     int max_len, int n, int g, float *att, size_t att_ld, float *y) {
    attend_group(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y, row_c, dot_lanes);
}

#ifdef TL_X86
__attribute__((target("avx512f"))) static inline void row_512(const uint16_t *src, float *dst, int n) {
    int d = 0;
    for (; d + 16 <= n; d += 16)
        _mm512_storeu_ps(dst + d, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + d))));
    for (; d < n; d++) dst[d] = half_to_float(src[d]);
}

__attribute__((target("avx2,f16c"))) static inline void row_f16c(const uint16_t *src, float *dst, int n) {
    int d = 0;
    for (; d + 8 <= n; d += 8)
        _mm256_storeu_ps(dst + d, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + d))));
    for (; d < n; d++) dst[d] = half_to_float(src[d]);
}

/* dot_lanes with the 16 lanes in one register and the fold as vector adds of the same pairs
   (l + 8, + 4, + 2, + 1): the same float as dot_lanes, without its 15 scalar adds. */
__attribute__((target("avx512f"))) static inline float dot_lanes_512(const float *a, const float *b, int n) {
    __m512 acc = _mm512_setzero_ps();
    int n16 = n / 16 * 16;
    for (int d = 0; d < n16; d += 16)
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(a + d), _mm512_loadu_ps(b + d)));
    if (n16 < n) {                                        /* the tail, to lanes 0.. in scalar */
        float s[16];
        _mm512_storeu_ps(s, acc);
        for (int d = n16, l = 0; d < n; d++, l++) s[l] = s[l] + a[d] * b[d];
        acc = _mm512_loadu_ps(s);
    }
    __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(acc),
                              _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

__attribute__((target("avx512f")))
static void attend_512(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                       int max_len, int n, int g, float *att, size_t att_ld, float *y) {
    attend_group(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y, row_512, dot_lanes_512);
}

__attribute__((target("avx2,f16c")))
static void attend_avx2(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                        int max_len, int n, int g, float *att, size_t att_ld, float *y) {
    attend_group(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y, row_f16c, dot_lanes);
}
#endif

static void attend(int path, const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv,
                   int hd, int max_len, int n, int g, float *att, size_t att_ld, float *y) {
#ifdef TL_X86
    if (path == TL_PATH_AVX512VNNI) { attend_512(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y); return; }
    if (path == TL_PATH_AVX2) { attend_avx2(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y); return; }
#endif
    attend_c(q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att, att_ld, y);
}

/* Every query head of one token: y (nq hd) from q (nq hd) and the first n positions of the fp16
   caches (n_kv, max_len, hd); att is scratch (nq, n). Returns 0, -1 for a bad argument, -2 for a path this CPU lacks. */
int tl_attention(const float *q, const uint16_t *k_cache, const uint16_t *v_cache, int n_q, int n_kv, int hd,
                 int max_len, int n, float *y, float *att, int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (n_q <= 0 || n_kv <= 0 || n_q % n_kv || n_q / n_kv > TL_MAX_REP || hd <= 0 || hd > TL_MAX_HD || n <= 0 ||
        n > max_len) return -1;
    nthreads = threads_or_default(nthreads);
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int g = 0; g < n_kv; g++)     /* one KV group (its n_q / n_kv query heads) per iteration */
        attend(path, q, k_cache, v_cache, n_q, n_kv, hd, max_len, n, g, att + (size_t)g * (n_q / n_kv) * n, n, y);
    return 0;
}

/* After the q/k/v projection (one thread): q/k norm + RoPE, append k and v to the cache. */
static void qkv_post(const tl_model *m, const tl_layer *ly, float *qkv, int pos) {
    int hd = m->head_dim, Q = m->n_q * hd, KV = m->n_kv * hd, Nqkv = Q + 2 * KV;
    tl_qk_norm_rope(qkv, 1, Nqkv, m->n_q, m->n_kv, hd, ly->q_norm, ly->k_norm, m->eps,
                    m->rope_cos + (size_t)pos * hd, m->rope_sin + (size_t)pos * hd, 1);
    for (int g = 0; g < m->n_kv; g++)
        for (int d = 0; d < hd; d++) {
            ly->k_cache[((size_t)g * m->max_len + pos) * hd + d] = float_to_half(qkv[Q + (size_t)g * hd + d]);
            ly->v_cache[((size_t)g * m->max_len + pos) * hd + d] = float_to_half(qkv[Q + KV + (size_t)g * hd + d]);
        }
}

/* A projection of x (K) into out, called by every thread of the region: each part's input is
   RMSNorm(x) * norm, or, for a part with a SubLN of its own, SubLN(RMSNorm(x) * norm) -- the same
   C pre-ops the PyTorch forward calls -- then Eq. (3) and the GEMV (+ bias). t_lin, t0: shared. */
static void project(int path, bufs *b, const float *x, int K, const float *norm, float eps,
                    const tl_part *parts, int n, float *out, double *t_lin, double *t0) {
    for (int p = 0, off = 0; p < n; off += parts[p].rows, p++) {
        #pragma omp single
        {
            if (parts[p].norm) {
                if (p == 0) pre_op(x, 1, K, TL_PRE_RMSNORM, norm, eps, b->h, 1);
                prep(b, b->h, K, TL_PRE_RMSNORM, parts[p].norm, eps);
            } else {
                prep(b, x, K, TL_PRE_RMSNORM, norm, eps);
            }
            *t0 = now_s();
        }
        gemv_rows(path, b, tl_padded_k(K), parts[p].w, parts[p].scale, parts[p].rows, out + off);
        #pragma omp barrier
        #pragma omp single
        {
            *t_lin += now_s() - *t0;
            if (parts[p].bias)
                for (int r = 0; r < parts[p].rows; r++) out[off + r] = out[off + r] + parts[p].bias[r];
        }
    }
}

/* The lm_head rows of this thread: int8 (Eq. 3 activations, int8 weights) or bf16. */
static void head_rows(const tl_model *m, int path, bufs *b, float *logits) {
    int lo, hi, C = m->dim, Cp = tl_padded_k(C);
    if (m->head_kind == TL_HEAD_INT8) {
        gemm_args g = {b->q, b->qu, &b->qsum, 1, Cp, m->head_w, m->head_wsum, m->vocab, NULL, logits,
                       &b->srow, m->head_scale};
        my_rows(m->vocab, &lo, &hi);
        gemm_rows(1, path, &g, lo, hi);
        return;
    }
    float (*dot)(const float *, const uint16_t *, int) = bf16_dot_c;
#ifdef TL_X86
    if (path == TL_PATH_AVX512VNNI) dot = bf16_dot_512;
    if (path == TL_PATH_AVX2) dot = bf16_dot_avx2;
#endif
    my_rows(m->vocab, &lo, &hi);
    for (int n = lo; n < hi; n++) logits[n] = dot(b->xb, (const uint16_t *)m->head_w + (size_t)n * C, C);
}

/* One token at position pos (the cache holds positions 0..pos-1) -> logits (V). timing, when not
   NULL, receives seconds spent in [0] the 196 linears (GEMVs), [1] the lm_head, [2] the whole call.
   Returns 0, -1 for a bad argument, -2 for a path this CPU lacks. */
int tl_decode_token(const tl_model *m, int token, int pos, float *logits, void *scratch,
                    double *timing, int path, int nthreads) {
    int err = check_path(&path);
    if (err) return err;
    if (token < 0 || token >= m->vocab || pos < 0 || pos >= m->max_len || m->n_q % m->n_kv || m->head_dim > TL_MAX_HD ||
        m->n_q / m->n_kv > TL_MAX_REP ||
        (m->head_kind != TL_HEAD_BF16 && m->head_kind != TL_HEAD_INT8)) return -1;
    int C = m->dim, I = m->hidden, hd = m->head_dim, Q = m->n_q * hd, Nqkv = (m->n_q + 2 * m->n_kv) * hd;
    for (int l = 0; l < m->n_layers; l++) {      /* the parts must tile q | k | v and gate | up */
        const tl_layer *ly = m->layers + l;
        int nq = 0, ng = 0;
        if ((ly->n_qkv != 1 && ly->n_qkv != 3) || (ly->n_gate_up != 1 && ly->n_gate_up != 2)) return -1;
        for (int p = 0; p < ly->n_qkv; p++) nq += ly->qkv[p].rows;
        for (int p = 0; p < ly->n_gate_up; p++) ng += ly->gate_up[p].rows;
        if (nq != Nqkv || ng != 2 * I) return -1;
    }
    nthreads = threads_or_default(nthreads);
    int Cp = tl_padded_k(C), Qp = tl_padded_k(Q), Ip = tl_padded_k(I);
    bufs b = carve(m, scratch);
    double t_start = now_s(), t0 = 0, t_lin = 0, t_head = 0;
    if (m->head_kind == TL_HEAD_INT8) {          /* embedding: the int8 row times its scale */
        const int8_t *row = (const int8_t *)m->embed_w + (size_t)token * Cp;
        for (int k = 0; k < C; k++) b.x[k] = (float)row[k] * m->embed_scale[token];
    } else {
        const uint16_t *row = (const uint16_t *)m->embed_w + (size_t)token * C;
        for (int k = 0; k < C; k++) b.x[k] = bf16_to_f32(row[k]);
    }
    #pragma omp parallel num_threads(nthreads)
    for (int l = 0; l < m->n_layers; l++) {
        const tl_layer *ly = m->layers + l;
        project(path, &b, b.x, C, ly->in_norm, m->eps, ly->qkv, ly->n_qkv, b.qkv, &t_lin, &t0);
        #pragma omp single
        qkv_post(m, ly, b.qkv, pos);
        #pragma omp for schedule(static)
        for (int g = 0; g < m->n_kv; g++)
            attend(path, b.qkv, ly->k_cache, ly->v_cache, m->n_q, m->n_kv, hd, m->max_len, pos + 1, g,
                   b.att + (size_t)g * (m->n_q / m->n_kv) * m->max_len, m->max_len, b.y);
        #pragma omp single
        { prep(&b, b.y, Q, ly->attn_subln ? TL_PRE_RMSNORM : 0, ly->attn_subln, m->eps); t0 = now_s(); }
        gemv_rows(path, &b, Qp, ly->o, ly->o_scale, C, b.ob);
        #pragma omp barrier
        #pragma omp single
        {
            t_lin += now_s() - t0;
            for (int k = 0; k < C; k++) b.x[k] = b.x[k] + b.ob[k];                 /* Eq. (4) residual */
        }
        project(path, &b, b.x, C, ly->post_norm, m->eps, ly->gate_up, ly->n_gate_up, b.gu, &t_lin, &t0);
        #pragma omp single
        {
            prep(&b, b.gu, I, TL_PRE_SWIGLU | (ly->mlp_subln ? TL_PRE_RMSNORM : 0), ly->mlp_subln, m->eps);
            t0 = now_s();
        }
        gemv_rows(path, &b, Ip, ly->down, ly->down_scale, C, b.ob);
        #pragma omp barrier
        #pragma omp single
        {
            t_lin += now_s() - t0;
            for (int k = 0; k < C; k++) b.x[k] = b.x[k] + b.ob[k];                 /* Eq. (5) residual */
        }
    }
    /* the final norm and the lm_head */
    if (m->head_kind == TL_HEAD_INT8) {
        prep(&b, b.x, C, TL_PRE_RMSNORM, m->final_norm, m->eps);
        for (int k = 0; k < Cp; k++) b.qu[k] = (uint8_t)(b.q[k] + 128);
    } else {
        pre_op(b.x, 1, C, TL_PRE_RMSNORM, m->final_norm, m->eps, b.xb, 1);
    }
    t0 = now_s();
    #pragma omp parallel num_threads(nthreads)
    head_rows(m, path, &b, logits);
    t_head = now_s() - t0;
    if (timing) { timing[0] = t_lin; timing[1] = t_head; timing[2] = now_s() - t_start; }
    return 0;
}
