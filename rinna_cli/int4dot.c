/* float rows times groupwise int4 weights (rinna_cli/int4.py's layout), for decode steps and prompts alike.
 *
 * The N weight rows of K inputs come in panels of 16 rows; a panel is K/8 chunks of 64 bytes, chunk c
 * of panel p at w + 64 * (p * K/8 + c): byte 4l + b holds, for row 16p + l, the 4-bit code of input
 * 8c + b in its low half and of input 8c + 4 + b in its high half. So a chunk's low halves are the
 * 16 rows' codes of 4 inputs, which one vpdpbusd multiplies against 4 inputs of an activation row
 * broadcast to every lane: a lane is an output, and no sum is ever reduced across lanes. Groups of QG
 * inputs (64, 128 or 256) share a scale: group g of panel p has 16 scales then 16 zeros in bfloat16 at
 * sz + 32 * (p * G + g); a code dequantizes to (code - 8) * scale + zero.
 *
 * The rows come in float32 or bfloat16, and the outputs leave in either with the layer's bias added (native.h's
 * finish(), as int8dot.c's).
 *
 * Each row of x is quantized to int8 per group (step = max|x| / 127 of the group,
 * q = round-half-even(x / step)), as llama.cpp quantizes activations for its Q4_0 dot
 * products; then per group the exact int32 sum D = sum(code * q) (codes are unsigned, so
 * vpmaddubsw / vpdpbusd take them as they are) and S = sum(q), and
 *   out = sum over g of (float)D * (scale * step)  +  sum over g of (zero - 8 * scale) * (step * S),
 * each sum in the order of g. Every row goes through the same operations whatever the rows multiplied
 * with it, so its output does not depend on them: a decode step, a batch and a prompt give a row the
 * same bits. Rows are taken MR at a time against NR panels, their sums in registers; a thread's
 * panels are read from memory once per call, by its first MR rows, the others finding them in the
 * caches (unpacking them to bytes once for all rows was slower: 4.8 against 4.2 ms for 48 rows of
 * 11264 x 2816 on the Zen 4 of 2026-12-04). Built like int8dot.c (-march=native: AVX-512 VNNI,
 * AVX2 or plain C).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PANEL 16
#define CHUNK 64 /* bytes of a panel per 8 inputs */

static inline int32_t four(const int8_t *q) {
    int32_t v;
    memcpy(&v, q, 4);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PATH "avx512-vnni"
#define MR 5 /* rows */
#define NR 2 /* panels: 10 int32 and 10 float accumulators, the codes and the broadcasts fit the 32 registers */

static inline __m512 bf16x16(const uint16_t *at) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)at)), 16));
}

/* out[i][16j + l] for rows i < m and panels j < np from the codes at `codes`, sz at the first panel's groups */
static inline __attribute__((always_inline)) void micro(const int8_t *q, const float *st, const float *tt,
                                                         const uint8_t *codes, const uint16_t *sz, float *out,
                                                         const int m, const int np, int N, int K, int qg) {
    const int G = K / qg;
    const size_t stride = (size_t)K * 8; /* bytes per panel */
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[MR][NR];
    for (int i = 0; i < m; i++)
        for (int j = 0; j < np; j++)
            acc[i][j] = _mm512_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m512i d[MR][NR];
        for (int i = 0; i < m; i++)
            for (int j = 0; j < np; j++) d[i][j] = _mm512_setzero_si512();
        for (int c = g * (qg / 8); c < (g + 1) * (qg / 8); c++) {
            __m512i lo[NR], hi[NR];
            for (int j = 0; j < np; j++) {
                const uint8_t *at = codes + j * stride + (size_t)c * CHUNK;
                _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
                __m512i v = _mm512_loadu_si512((const void *)at);
                lo[j] = _mm512_and_si512(v, low);
                hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            }
            for (int i = 0; i < m; i++) {
                __m512i b0 = _mm512_set1_epi32(four(q + (size_t)i * K + 8 * c));
                __m512i b1 = _mm512_set1_epi32(four(q + (size_t)i * K + 8 * c + 4));
                for (int j = 0; j < np; j++) {
                    d[i][j] = _mm512_dpbusd_epi32(d[i][j], lo[j], b0);
                    d[i][j] = _mm512_dpbusd_epi32(d[i][j], hi[j], b1);
                }
            }
        }
        for (int j = 0; j < np; j++) {
            __m512 scale = bf16x16(sz + ((size_t)j * G + g) * 32);
            for (int i = 0; i < m; i++) {
                __m512 factor = _mm512_mul_ps(scale, _mm512_set1_ps(st[(size_t)i * G + g]));
                acc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i][j]), factor, acc[i][j]);
            }
        }
    }
    for (int j = 0; j < np; j++)
        for (int i = 0; i < m; i++) {
            __m512 shifted = _mm512_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint16_t *at = sz + ((size_t)j * G + g) * 32;
                __m512 shift = _mm512_sub_ps(bf16x16(at + 16), _mm512_mul_ps(_mm512_set1_ps(8.0f), bf16x16(at)));
                shifted = _mm512_fmadd_ps(shift, _mm512_set1_ps(tt[(size_t)i * G + g]), shifted);
            }
            _mm512_storeu_ps(out + (size_t)i * N + PANEL * j, _mm512_add_ps(acc[i][j], shifted));
        }
}

#elif defined(__AVX2__)
#define PATH "avx2"
/* rows against half a panel (8 lanes) at a time: their 16-bit sums stay in registers (7 rows took a prompt 9 % faster
 * than 5 on the Zen 5 held to AVX2 of 2026-12-07, its 32-bit sums spilled; 6 gained 5 %, 8 no more than 7) */
#define MR 7
#define NR 1

static inline __m256 bf16x8(const uint16_t *at) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)at)), 16));
}

/* out[i][8h + l] for rows i < m and halves h0..h0+H-1 of the panel at `codes` */
static inline __attribute__((always_inline)) void halves(const int8_t *q, const float *st, const float *tt,
                                                          const uint8_t *codes, const uint16_t *sz, float *out,
                                                          const int m, int N, int K, int qg, int h0, const int H) {
    const int G = K / qg;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[MR][2];
    for (int i = 0; i < m; i++)
        for (int h = 0; h < H; h++) acc[i][h] = _mm256_setzero_ps();
    for (int g = 0; g < G; g++) {
        __m256i d[MR][2];
        for (int i = 0; i < m; i++)
            for (int h = 0; h < H; h++) d[i][h] = _mm256_setzero_si256();
        /* codes <= 15 and |q| <= 127: a 16-bit lane sums 2 products per vpmaddubsw, at most 3810, so eight of them
         * (four chunks) fit before they are widened */
        for (int c0 = g * (qg / 8); c0 < (g + 1) * (qg / 8); c0 += 4) {
            __m256i p[MR][2];
            for (int i = 0; i < m; i++)
                for (int h = 0; h < H; h++) p[i][h] = _mm256_setzero_si256();
            for (int c = c0; c < c0 + 4; c++)
                for (int h = 0; h < H; h++) {
                    const uint8_t *at = codes + (size_t)c * CHUNK + 32 * (h0 + h);
                    _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
                    __m256i v = _mm256_loadu_si256((const __m256i *)at);
                    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    for (int i = 0; i < m; i++) {
                        __m256i b0 = _mm256_set1_epi32(four(q + (size_t)i * K + 8 * c));
                        __m256i b1 = _mm256_set1_epi32(four(q + (size_t)i * K + 8 * c + 4));
                        p[i][h] = _mm256_add_epi16(p[i][h], _mm256_maddubs_epi16(lo, b0));
                        p[i][h] = _mm256_add_epi16(p[i][h], _mm256_maddubs_epi16(hi, b1));
                    }
                }
            for (int i = 0; i < m; i++)
                for (int h = 0; h < H; h++) d[i][h] = _mm256_add_epi32(d[i][h], _mm256_madd_epi16(p[i][h], ones));
        }
        for (int h = 0; h < H; h++) {
            __m256 scale = bf16x8(sz + (size_t)g * 32 + 8 * (h0 + h));
            for (int i = 0; i < m; i++) {
                __m256 factor = _mm256_mul_ps(scale, _mm256_set1_ps(st[(size_t)i * G + g]));
                acc[i][h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][h]), factor, acc[i][h]);
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int h = 0; h < H; h++) {
            __m256 shifted = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint16_t *at = sz + (size_t)g * 32 + 8 * (h0 + h);
                __m256 shift = _mm256_sub_ps(bf16x8(at + 16), _mm256_mul_ps(_mm256_set1_ps(8.0f), bf16x8(at)));
                shifted = _mm256_fmadd_ps(shift, _mm256_set1_ps(tt[(size_t)i * G + g]), shifted);
            }
            _mm256_storeu_ps(out + (size_t)i * N + 8 * (h0 + h), _mm256_add_ps(acc[i][h], shifted));
        }
}

/* out[i][l] for rows i < m and the panel at `codes`: both halves in one pass over the codes for a decode step's
 * few rows, else a half at a time (the sums of more rows against both do not fit the 16 registers) */
static inline __attribute__((always_inline)) void micro(const int8_t *q, const float *st, const float *tt,
                                                         const uint8_t *codes, const uint16_t *sz, float *out,
                                                         const int m, const int np, int N, int K, int qg) {
    (void)np;
    if (m <= 2) {
        halves(q, st, tt, codes, sz, out, m, N, K, qg, 0, 2);
    } else {
        halves(q, st, tt, codes, sz, out, m, N, K, qg, 0, 1);
        halves(q, st, tt, codes, sz, out, m, N, K, qg, 1, 1);
    }
}

#else
#define PATH "c"
#define MR 1
#define NR 1

static inline void micro(const int8_t *q, const float *st, const float *tt, const uint8_t *codes, const uint16_t *sz,
                         float *out, const int m, const int np, int N, int K, int qg) {
    (void)np;
    (void)m;
    (void)N;
    const int G = K / qg;
    for (int l = 0; l < PANEL; l++) {
        float acc = 0.0f, shifted = 0.0f;
        for (int g = 0; g < G; g++) {
            int32_t d = 0;
            for (int c = g * (qg / 8); c < (g + 1) * (qg / 8); c++)
                for (int b = 0; b < 4; b++) {
                    uint8_t v = codes[(size_t)c * CHUNK + 4 * l + b];
                    d += (v & 15) * q[8 * c + b] + (v >> 4) * q[8 * c + 4 + b];
                }
            float scale = from_bf16(sz[(size_t)g * 32 + l]), zero = from_bf16(sz[(size_t)g * 32 + 16 + l]);
            acc = fmaf((float)d, scale * st[g], acc);
            shifted = fmaf(zero - 8.0f * scale, tt[g], shifted);
        }
        out[l] = acc + shifted;
    }
}
#endif

const char *rinna_int4dot_path(void) { return PATH; }

/* One row's groups: q = round(x / step) with step = max(max|x|, 1e-8) / 127, and step * sum(q). */
static void quantize(const float *row, int8_t *q, float *steps, float *totals, int K, int qg) {
    for (int g = 0; g < K / qg; g++) {
        const float *xg = row + (size_t)g * qg;
        float amax = absmax(xg, qg);
        float step = (amax > 1e-8f ? amax : 1e-8f) / 127.0f;
        int32_t sum = 0;
        for (int k = 0; k < qg; k++) {
            int8_t v = (int8_t)nearbyintf(xg[k] / step);
            q[(size_t)g * qg + k] = v;
            sum += v;
        }
        steps[g] = step;
        totals[g] = step * (float)sum;
    }
}

#define FEW 2 /* rows that stream the weights one panel at a time */

/* Constant row and panel counts, so that the sums stay in registers. */
#define ROWS(M_)                                                                                          \
    case M_:                                                                                              \
        if (np == NR) micro(x, st, tt, codes, s, o, M_, NR, N, K, qg);                                    \
        else micro(x, st, tt, codes, s, o, M_, 1, N, K, qg);                                              \
        break;

/* all M rows, MR at a time, against panels p0..p0+np-1 (read from memory by the first rows, then from the caches) */
static void panels(const int8_t *q, const float *steps, const float *totals, const uint8_t *codes,
                   const uint16_t *sz, float *out, int M, int N, int K, int qg, int p0, int np) {
    const int G = K / qg;
    for (int m0 = 0; m0 < M; m0 += MR) {
        const int8_t *x = q + (size_t)m0 * K;
        const float *st = steps + (size_t)m0 * G, *tt = totals + (size_t)m0 * G;
        const uint16_t *s = sz + (size_t)p0 * G * 32;
        float *o = out + (size_t)m0 * N + (size_t)PANEL * p0;
        switch (M - m0 < MR ? M - m0 : MR) {
#if MR >= 7
            ROWS(7) ROWS(6)
#endif
#if MR >= 5
            ROWS(5) ROWS(4) ROWS(3) ROWS(2)
#endif
            ROWS(1)
        }
    }
}

/* out (M x N) = rows (M x K) times the dequantized weights transposed, in groups of qg inputs (64, 128 or
 * 256; K a multiple of it, N of 16), plus the bias (NULL for none); rows in float32 or bfloat16 (rows_bf16), out and
 * the bias in float32 or bfloat16 (out_bf16), finished as native.h's finish() says. 0 on success. */
int rinna_int4dot(const void *rows, int rows_bf16, const uint8_t *w, const uint16_t *sz, const void *bias, void *out,
                  int out_bf16, int M, int N, int K, int qg, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (qg % 64 || qg < 64 || qg > 256 || K % qg || N % PANEL) return 2;
    /* NR panels a unit, single panels at the end; a decode step's one or two rows stream one panel at a time (two
     * streams a thread read 11264 x 2816 at 44 GB/s where one read it at 50, Zen 5 of 2026-12-07; the same sums) */
    const int nr = M <= FEW ? 1 : NR;
    const int G = K / qg, P = N / PANEL, units = P / nr + P % nr;
    const int full = P / nr;
    int8_t *q = malloc((size_t)M * K);
    float *steps = malloc(sizeof(float) * (size_t)M * G), *totals = malloc(sizeof(float) * (size_t)M * G);
    float *widened = rows_bf16 ? malloc(sizeof(float) * (size_t)K * threads) : NULL;
    const int as_they_are = direct(out_bf16, bias);
    float *sums = as_they_are ? (float *)out : malloc(sizeof(float) * (size_t)M * N);
    int failed = !q || !steps || !totals || (rows_bf16 && !widened) || !sums;
    if (!failed) {
#pragma omp parallel for num_threads(threads) if (M > 1)
        for (int i = 0; i < M; i++) {
            float *scratch = rows_bf16 ? widened + (size_t)omp_get_thread_num() * K : NULL;
            quantize(row_floats(rows, rows_bf16, i, K, scratch), q + (size_t)i * K, steps + (size_t)i * G,
                     totals + (size_t)i * G, K, qg);
        }
#pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int lo = (int)((long)units * t / nt), hi = (int)((long)units * (t + 1) / nt);
#define FIRST(u) ((u) < full ? (u) * nr : full * nr + ((u) - full)) /* unit u's first panel */
            for (int u = lo; u < hi; u++) {
                int p0 = FIRST(u), np = u < full ? nr : 1;
                panels(q, steps, totals, w + (size_t)p0 * K * 8, sz, sums, M, N, K, qg, p0, np);
            }
            int n0 = PANEL * FIRST(lo), n1 = PANEL * FIRST(hi); /* this thread's outputs */
#undef FIRST
            for (int i = 0; !as_they_are && i < M && n1 > n0; i++)
                finish(sums + (size_t)i * N + n0, out, out_bf16, bias, i, N, n0, n1);
        }
    }
    free(q);
    free(steps);
    free(totals);
    free(widened);
    if (!as_they_are) free(sums);
    return failed;
}
