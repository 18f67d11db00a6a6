/*
ternary_x86.c -- the SIMD paths of ternary_cpu.c: AVX-512 VNNI and AVX2 register tiles for the
ternary and int8 products (prefill: 4 rows x 4 tokens; decode: one row at a time, prefetched), the
bf16 head's dot product, and the loops that measure the ISA's int8 peak. ternary_cpu.c's gemm_rows
calls them (the layouts are described at its top; gemm_args and store() are in ternary.h). Each
function is compiled for its ISA with a target attribute and chosen at run time; every path equals
ternary_cpu.c's plain C bit for bit (test_ternary.py, 1,000 random shapes per path).
*/
#include "ternary.h"
#ifdef TL_X86
/* ------------------------------------------------------------------------------------------ */
/* SIMD tiles: R output rows x T tokens per tile, R and T compile-time constants after inlining, */
/* so the R*T accumulators live in registers. out[r][t] receives the exact int32 acc.           */

#define T_512 __attribute__((target("avx512f,avx512bw,avx512vnni")))
#define T_AVX2 __attribute__((target("avx2")))
#define INLINE static inline __attribute__((always_inline))
/* acc += u . q per 32-bit lane (u unsigned, q signed bytes): vpdpbusd */
#define DPBUSD(acc, u, q) ((acc) = _mm512_dpbusd_epi32((acc), (u), (q)))

/* The lane sums of 16 accumulators v[0..15] at once, as one vector (lane j = sum of v[j]): pairs
   interleaved and added (epi32, then epi64 within 128-bit lanes), then the 128-bit lanes folded.
   About 30 instructions where 16 separate horizontal sums take ~150; integer sums, so exact in any
   order. Used by the prefill tile, whose 4 x 4 accumulators each cover only K/64 products. */
T_512 INLINE __m512i hsum16_512(const __m512i v[16]) {
    __m512i u[8], w[4];
    for (int i = 0; i < 8; i++)      /* per 128-bit lane: (a0+a2, b0+b2, a1+a3, b1+b3) */
        u[i] = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_epi32(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)      /* per 128-bit lane: that lane's sums of v[4i], .., v[4i+3] */
        w[i] = _mm512_add_epi32(_mm512_unpacklo_epi64(u[2 * i], u[2 * i + 1]),
                                _mm512_unpackhi_epi64(u[2 * i], u[2 * i + 1]));
    __m512i y0 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[0], w[1], 0x88), _mm512_shuffle_i32x4(w[0], w[1], 0xdd));
    __m512i y1 = _mm512_add_epi32(_mm512_shuffle_i32x4(w[2], w[3], 0x88), _mm512_shuffle_i32x4(w[2], w[3], 0xdd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(y0, y1, 0x88), _mm512_shuffle_i32x4(y0, y1, 0xdd));
}

T_512 INLINE void tile_ternary_512(const uint8_t *w, int rb, const int8_t *q, int Kp,
                                   const int32_t *qsum, int R, int T, int32_t out[4][4]) {
    __m512i acc[4][4];
    const __m512i m3 = _mm512_set1_epi8(3);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    for (int b = 0; b < Kp / QK; b++) {
        __m512i wv[4];
        for (int r = 0; r < R; r++) wv[r] = _mm512_loadu_si512(w + (size_t)r * rb + b * 64);
        for (int i = 0; i < 4; i++) {
            __m512i u[4];  /* 64 weights k = 256b + 64i + (0..63) of each row, as u = C+1 */
            for (int r = 0; r < R; r++) u[r] = _mm512_and_si512(_mm512_srli_epi16(wv[r], 2 * i), m3);
            for (int t = 0; t < T; t++) {
                __m512i a = _mm512_loadu_si512(q + (size_t)t * Kp + b * QK + 64 * i);
                for (int r = 0; r < R; r++) DPBUSD(acc[r][t], u[r], a);
            }
        }
    }
    if (R * T < 8) {   /* few accumulators: one horizontal sum each */
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) out[r][t] = _mm512_reduce_add_epi32(acc[r][t]) - qsum[t];
        return;
    }
    for (int r = 0; r < 4; r++)   /* unused slots: zero, so that the 16 sums below are defined */
        for (int t = 0; t < 4; t++)
            if (r >= R || t >= T) acc[r][t] = _mm512_setzero_si512();
    int32_t sums[16];
    _mm512_storeu_si512(sums, hsum16_512((const __m512i *)acc));  /* sums[4r + t] = sum of acc[r][t]'s lanes */
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r][t] = sums[4 * r + t] - qsum[t];
}

/* The decode case (one token): memory-bound, so the unpacking must be cheap. Instead of shift +
   mask, mask only: (byte & 0x03, 0x0C, 0x30, 0xC0) are u*1, u*4, u*16, u*64 (still <= 128, a
   valid unsigned byte) and go into four accumulators, which are exact multiples of 1, 4, 16, 64;
   shifting them back right and adding gives the same int32 sum. One AND per 64 weights. */
T_512 INLINE void tile_ternary_512_gemv(const uint8_t *w, int rb, const int8_t *q, int Kp,
                                        const int32_t *qsum, int R, int32_t out[4][4]) {
    __m512i acc[4][4];
    __m512i mask[4];
    for (int i = 0; i < 4; i++) mask[i] = _mm512_set1_epi8((char)(3 << (2 * i)));
    for (int r = 0; r < R; r++)
        for (int i = 0; i < 4; i++) acc[r][i] = _mm512_setzero_si512();
    for (int b = 0; b < Kp / QK; b++) {
        __m512i wv[4];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm512_loadu_si512(w + (size_t)r * rb + b * 64);
            _mm_prefetch((const char *)(w + (size_t)r * rb + b * 64 + PF_DIST), _MM_HINT_T0);
        }
        for (int i = 0; i < 4; i++) {
            __m512i a = _mm512_loadu_si512(q + b * QK + 64 * i);
            for (int r = 0; r < R; r++)
                DPBUSD(acc[r][i], _mm512_and_si512(wv[r], mask[i]), a);
        }
    }
    for (int r = 0; r < R; r++) {
        __m512i s = _mm512_add_epi32(_mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2)),
                                     _mm512_add_epi32(_mm512_srai_epi32(acc[r][2], 4), _mm512_srai_epi32(acc[r][3], 6)));
        out[r][0] = _mm512_reduce_add_epi32(s) - qsum[0];
    }
}

T_512 INLINE void tile_int8_512(const int8_t *w, const uint8_t *qu, int Kp, const int32_t *wsum,
                                int R, int T, int32_t out[4][4]) {
    __m512i acc[4][4];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm512_setzero_si512();
    for (int k = 0; k < Kp; k += 64) {
        __m512i wv[4];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm512_loadu_si512(w + (size_t)r * Kp + k);
            if (T == 1) _mm_prefetch((const char *)(w + (size_t)r * Kp + k + PF_DIST), _MM_HINT_T0);
        }
        for (int t = 0; t < T; t++) {
            __m512i a = _mm512_loadu_si512(qu + (size_t)t * Kp + k);   /* q + 128, unsigned */
            for (int r = 0; r < R; r++) DPBUSD(acc[r][t], a, wv[r]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r][t] = _mm512_reduce_add_epi32(acc[r][t]) - 128 * wsum[r];
}

T_AVX2 INLINE int32_t hsum_256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* vpmaddubsw gives u0*q0 + u1*q1 in int16 (|.| <= 2*2*128 = 512); the 8 products of one block
   per lane are summed in int16 (<= 4096, no saturation) and widened to int32 once per block. */
T_AVX2 INLINE void tile_ternary_avx2(const uint8_t *w, int rb, const int8_t *q, int Kp,
                                     const int32_t *qsum, int R, int T, int32_t out[4][4]) {
    __m256i acc[4][4];
    const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    for (int b = 0; b < Kp / QK; b++) {
        __m256i s16[4][4];
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) s16[r][t] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) {
            __m256i wv[4];
            for (int r = 0; r < R; r++) {
                wv[r] = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * rb + b * 64 + 32 * h));
                if (T == 1 && h == 0) _mm_prefetch((const char *)(w + (size_t)r * rb + b * 64 + PF_DIST), _MM_HINT_T0);
            }
            for (int i = 0; i < 4; i++) {
                __m256i u[4];
                for (int r = 0; r < R; r++) u[r] = _mm256_and_si256(_mm256_srli_epi16(wv[r], 2 * i), m3);
                for (int t = 0; t < T; t++) {
                    __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)t * Kp + b * QK + 64 * i + 32 * h));
                    for (int r = 0; r < R; r++)
                        s16[r][t] = _mm256_add_epi16(s16[r][t], _mm256_maddubs_epi16(u[r], a));
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int t = 0; t < T; t++) acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(s16[r][t], ones));
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r][t] = hsum_256(acc[r][t]) - qsum[t];
}

/* |w| x sign(q, w): |.| <= 2*128*127 = 32512 fits int16 (q is never -128, see top of file). */
T_AVX2 INLINE void tile_int8_avx2(const int8_t *w, const int8_t *q, int Kp, int R, int T,
                                  int32_t out[4][4]) {
    __m256i acc[4][4];
    const __m256i ones = _mm256_set1_epi16(1);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) acc[r][t] = _mm256_setzero_si256();
    for (int k = 0; k < Kp; k += 32) {
        __m256i wv[4], wa[4];
        for (int r = 0; r < R; r++) {
            wv[r] = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * Kp + k));
            wa[r] = _mm256_abs_epi8(wv[r]);
        }
        for (int t = 0; t < T; t++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(q + (size_t)t * Kp + k));
            for (int r = 0; r < R; r++) {
                __m256i p = _mm256_maddubs_epi16(wa[r], _mm256_sign_epi8(a, wv[r]));
                acc[r][t] = _mm256_add_epi32(acc[r][t], _mm256_madd_epi16(p, ones));
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int t = 0; t < T; t++) out[r][t] = hsum_256(acc[r][t]);
}

/* One tile with run-time R, T (1..4) -> a call with constant R, T (so the loops unroll). */
#define DISPATCH_RT(R, T, CALL)                                                          \
    switch ((R) * 8 + (T)) {                                                             \
    case 33: CALL(4, 1); break; case 34: CALL(4, 2); break;                              \
    case 35: CALL(4, 3); break; case 36: CALL(4, 4); break;                              \
    case 25: CALL(3, 1); break; case 26: CALL(3, 2); break;                              \
    case 27: CALL(3, 3); break; case 28: CALL(3, 4); break;                              \
    case 17: CALL(2, 1); break; case 18: CALL(2, 2); break;                              \
    case 19: CALL(2, 3); break; case 20: CALL(2, 4); break;                              \
    case 9:  CALL(1, 1); break; case 10: CALL(1, 2); break;                              \
    case 11: CALL(1, 3); break; case 12: CALL(1, 4); break;                              \
    }

/* Rows [lo, hi) of the output: tokens in groups of 4 (outer), row tiles of 4 (inner), so the
   group's activations stay in L1 while the rows (4x smaller than int8 activations) stream from L2. */
#define TILE_RANGE(BODY)                                                                 \
    int M = g->M, Kp = g->Kp, N = g->N;                                                  \
    for (int m0 = 0; m0 < M; m0 += 4) {                                                  \
        int T = M - m0 < 4 ? M - m0 : 4;                                                 \
        for (int n0 = lo; n0 < hi; n0 += 4) {                                            \
            int R = hi - n0 < 4 ? hi - n0 : 4;                                           \
            int32_t out[4][4];                                                           \
            BODY                                                                         \
            for (int r = 0; r < R; r++)                                                  \
                for (int t = 0; t < T; t++)                                              \
                    store(out[r][t], m0 + t, n0 + r, N, g->acc, g->y, g->srow, g->scale); \
        }                                                                                \
    }

/* Decode (one token): one row at a time, so that the weights stream in address order (measured
   1.1-1.25x faster than 4-row tiles on Zen 4, whose rows interleave four streams). */
T_512 static void ternary_512_gemv_rows(const gemm_args *g, int lo, int hi) {
    int rb = g->Kp / 4;
    for (int n = lo; n < hi; n++) {
        int32_t out[4][4];
        tile_ternary_512_gemv((const uint8_t *)g->w + (size_t)n * rb, rb, g->q, g->Kp, g->qsum, 1, out);
        store(out[0][0], 0, n, g->N, g->acc, g->y, g->srow, g->scale);
    }
}

/* The int8 head's decode row: two accumulators, the weights in address order (the head is 155 MB
   of DRAM per token; this reads it at the speed of a plain streaming read, 4-row tiles at ~0.75). */
T_512 static void int8_512_gemv_rows(const gemm_args *g, int lo, int hi) {
    int Kp = g->Kp;
    for (int n = lo; n < hi; n++) {
        const int8_t *wn = (const int8_t *)g->w + (size_t)n * Kp;
        __m512i acc0 = _mm512_setzero_si512(), acc1 = _mm512_setzero_si512();
        for (int k = 0; k < Kp; k += 128) {
            _mm_prefetch((const char *)(wn + k + PF_DIST), _MM_HINT_T0);
            _mm_prefetch((const char *)(wn + k + 64 + PF_DIST), _MM_HINT_T0);
            DPBUSD(acc0, _mm512_loadu_si512(g->qu + k), _mm512_loadu_si512(wn + k));
            DPBUSD(acc1, _mm512_loadu_si512(g->qu + k + 64), _mm512_loadu_si512(wn + k + 64));
        }
        int32_t a = _mm512_reduce_add_epi32(_mm512_add_epi32(acc0, acc1)) - 128 * g->wsum[n];
        store(a, 0, n, g->N, g->acc, g->y, g->srow, g->scale);
    }
}

T_512 void ternary_512_rows(const gemm_args *g, int lo, int hi) {
    if (g->M == 1) { ternary_512_gemv_rows(g, lo, hi); return; }
    const uint8_t *w = g->w;
    int rb = g->Kp / 4;
#define CALL(RR, TT) if (TT == 1) tile_ternary_512_gemv(w + (size_t)n0 * rb, rb, g->q + (size_t)m0 * Kp, Kp, g->qsum + m0, RR, out); \
                     else tile_ternary_512(w + (size_t)n0 * rb, rb, g->q + (size_t)m0 * Kp, Kp, g->qsum + m0, RR, TT, out)
    TILE_RANGE(DISPATCH_RT(R, T, CALL))
#undef CALL
}

T_AVX2 void ternary_avx2_rows(const gemm_args *g, int lo, int hi) {
    const uint8_t *w = g->w;
    int rb = g->Kp / 4;
#define CALL(RR, TT) tile_ternary_avx2(w + (size_t)n0 * rb, rb, g->q + (size_t)m0 * Kp, Kp, g->qsum + m0, RR, TT, out)
    TILE_RANGE(DISPATCH_RT(R, T, CALL))
#undef CALL
}

T_512 void int8_512_rows(const gemm_args *g, int lo, int hi) {
    if (g->M == 1) { int8_512_gemv_rows(g, lo, hi); return; }
    const int8_t *w = g->w;
#define CALL(RR, TT) tile_int8_512(w + (size_t)n0 * Kp, g->qu + (size_t)m0 * Kp, Kp, g->wsum + n0, RR, TT, out)
    TILE_RANGE(DISPATCH_RT(R, T, CALL))
#undef CALL
}

T_AVX2 void int8_avx2_rows(const gemm_args *g, int lo, int hi) {
    const int8_t *w = g->w;
#define CALL(RR, TT) tile_int8_avx2(w + (size_t)n0 * Kp, g->q + (size_t)m0 * Kp, Kp, RR, TT, out)
    TILE_RANGE(DISPATCH_RT(R, T, CALL))
#undef CALL
}

/* The ISA's peak (tl_peak_gmacs in ternary_cpu.c): the core instruction alone, 12 accumulators. */
T_512 int32_t peak_512(long iters) {
    __m512i acc[12], a = _mm512_set1_epi8(1), b = _mm512_set1_epi8(2);
    for (int i = 0; i < 12; i++) acc[i] = _mm512_set1_epi32(i);
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 12; i++) DPBUSD(acc[i], a, b);
        __asm__ volatile("" : "+v"(a));   /* a may change: the loop cannot be folded */
    }
    for (int i = 1; i < 12; i++) acc[0] = _mm512_add_epi32(acc[0], acc[i]);
    return _mm512_reduce_add_epi32(acc[0]);
}

T_AVX2 int32_t peak_avx2(long iters) {
    __m256i acc[12], a = _mm256_set1_epi8(1), b = _mm256_set1_epi8(2);
    for (int i = 0; i < 12; i++) acc[i] = _mm256_set1_epi16((short)i);
    for (long it = 0; it < iters; it++) {
        for (int i = 0; i < 12; i++) acc[i] = _mm256_add_epi16(acc[i], _mm256_maddubs_epi16(a, b));
        __asm__ volatile("" : "+x"(a));
    }
    for (int i = 1; i < 12; i++) acc[0] = _mm256_add_epi16(acc[0], acc[i]);
    return _mm256_extract_epi16(acc[0], 0);
}

/* The bf16 head (ternary_cpu.c's bf16_dot_c): the same 16 lanes held in registers. */
__attribute__((target("avx512f")))
float bf16_dot_512(const float *x, const uint16_t *w, int K) {
    __m512 acc = _mm512_setzero_ps();
    for (int k = 0; k + 16 <= K; k += 16) {
        __m512i wi = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(w + k))), 16);
        acc = _mm512_add_ps(acc, _mm512_mul_ps(_mm512_loadu_ps(x + k), _mm512_castsi512_ps(wi)));
    }
    float a[16];
    _mm512_storeu_ps(a, acc);
    return bf16_finish(a, x, w, K);
}

T_AVX2 float bf16_dot_avx2(const float *x, const uint16_t *w, int K) {
    __m256 lo = _mm256_setzero_ps(), hi = _mm256_setzero_ps();  /* lanes 0-7 and 8-15 */
    for (int k = 0; k + 16 <= K; k += 16) {
        __m256i w0 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k))), 16);
        __m256i w1 = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(w + k + 8))), 16);
        lo = _mm256_add_ps(lo, _mm256_mul_ps(_mm256_loadu_ps(x + k), _mm256_castsi256_ps(w0)));
        hi = _mm256_add_ps(hi, _mm256_mul_ps(_mm256_loadu_ps(x + k + 8), _mm256_castsi256_ps(w1)));
    }
    float a[16];
    _mm256_storeu_ps(a, lo);
    _mm256_storeu_ps(a + 8, hi);
    return bf16_finish(a, x, w, K);
}
#endif /* TL_X86 */
