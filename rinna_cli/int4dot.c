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
 * Each row of x is quantized to int8 per group (step = max|x| / 127 of the group,
 * q = round-half-even(x / step)), as llama.cpp quantizes activations for its Q4_0 dot
 * products; then per group the exact int32 sum D = sum(code * q) (codes are unsigned, so
 * vpmaddubsw / vpdpbusd take them as they are) and S = sum(q), and
 *   out = sum over g of (float)D * (scale * step)  +  sum over g of (zero - 8 * scale) * (step * S),
 * each sum in the order of g. Every row goes through the same operations whatever the rows multiplied
 * with it, so its output does not depend on them: a decode step, a batch and a prompt give a row the
 * same bits. Rows are taken MR at a time against NR panels, their sums in registers; a thread's
 * panels are read from memory once per call, and for a prompt unpacked to bytes once, for all its
 * rows. Built like int8dot.c (-march=native: AVX-512 VNNI, AVX2 or plain C).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define PANEL 16
#define CHUNK 64 /* bytes of a panel per 8 inputs */

static inline float bf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

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

/* out[i][16j + l] for rows i < m and panels j < np, from the codes at `codes` (packed: as stored; else unpacked
 * to bytes, a panel's 4-input groups of 64 bytes in order), sz at the first panel's groups */
static inline __attribute__((always_inline)) void micro(const int8_t *q, const float *st, const float *tt,
                                                         const uint8_t *codes, const int packed, const uint16_t *sz,
                                                         float *out, const int m, const int np, int N, int K, int qg) {
    const int G = K / qg;
    const size_t stride = packed ? (size_t)K * 8 : (size_t)K * 16; /* bytes per panel */
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
                if (packed) {
                    const uint8_t *at = codes + j * stride + (size_t)c * CHUNK;
                    _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
                    __m512i v = _mm512_loadu_si512((const void *)at);
                    lo[j] = _mm512_and_si512(v, low);
                    hi[j] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
                } else {
                    lo[j] = _mm512_loadu_si512((const void *)(codes + j * stride + (size_t)c * 2 * CHUNK));
                    hi[j] = _mm512_loadu_si512((const void *)(codes + j * stride + (size_t)c * 2 * CHUNK + CHUNK));
                }
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

/* np panels of codes as stored, to bytes: 4-input groups of 64 bytes in order */
static void unpack(const uint8_t *w, uint8_t *to, int np, int K) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (size_t c = 0; c < (size_t)np * K / 8; c++) {
        __m512i v = _mm512_loadu_si512((const void *)(w + c * CHUNK));
        _mm512_storeu_si512((void *)(to + 2 * c * CHUNK), _mm512_and_si512(v, low));
        _mm512_storeu_si512((void *)(to + 2 * c * CHUNK + CHUNK), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
    }
}

#elif defined(__AVX2__)
#define PATH "avx2"
#define MR 2 /* rows against one panel (two halves of 8 lanes): 16-bit and 32-bit sums in the 16 registers */
#define NR 1

/* out[i][l] for rows i < m and the panel at `codes` (packed: as stored; else unpacked to bytes) */
static inline __attribute__((always_inline)) void micro(const int8_t *q, const float *st, const float *tt,
                                                         const uint8_t *codes, const int packed, const uint16_t *sz,
                                                         float *out, const int m, const int np, int N, int K, int qg) {
    (void)np;
    const int G = K / qg;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    float acc[MR][PANEL];
    for (int i = 0; i < m; i++)
        for (int l = 0; l < PANEL; l++) acc[i][l] = 0.0f;
    for (int g = 0; g < G; g++) {
        __m256i d[MR][2];
        for (int i = 0; i < m; i++) d[i][0] = d[i][1] = _mm256_setzero_si256();
        /* codes <= 15 and |q| <= 127: a 16-bit lane sums 2 products per vpmaddubsw, at most 3810, so eight of them
         * (four chunks) fit before they are widened */
        for (int c0 = g * (qg / 8); c0 < (g + 1) * (qg / 8); c0 += 4) {
            __m256i p[MR][2];
            for (int i = 0; i < m; i++) p[i][0] = p[i][1] = _mm256_setzero_si256();
            for (int c = c0; c < c0 + 4; c++)
                for (int h = 0; h < 2; h++) {
                    __m256i lo, hi;
                    if (packed) {
                        const uint8_t *at = codes + (size_t)c * CHUNK + 32 * h;
                        _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
                        __m256i v = _mm256_loadu_si256((const __m256i *)at);
                        lo = _mm256_and_si256(v, low);
                        hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    } else {
                        lo = _mm256_loadu_si256((const __m256i *)(codes + (size_t)c * 2 * CHUNK + 32 * h));
                        hi = _mm256_loadu_si256((const __m256i *)(codes + (size_t)c * 2 * CHUNK + CHUNK + 32 * h));
                    }
                    for (int i = 0; i < m; i++) {
                        __m256i b0 = _mm256_set1_epi32(four(q + (size_t)i * K + 8 * c));
                        __m256i b1 = _mm256_set1_epi32(four(q + (size_t)i * K + 8 * c + 4));
                        p[i][h] = _mm256_add_epi16(p[i][h], _mm256_maddubs_epi16(lo, b0));
                        p[i][h] = _mm256_add_epi16(p[i][h], _mm256_maddubs_epi16(hi, b1));
                    }
                }
            for (int i = 0; i < m; i++)
                for (int h = 0; h < 2; h++) d[i][h] = _mm256_add_epi32(d[i][h], _mm256_madd_epi16(p[i][h], ones));
        }
        const uint16_t *at = sz + (size_t)g * 32;
        for (int h = 0; h < 2; h++) {
            __m256 scale = _mm256_castsi256_ps(
                _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(at + 8 * h))), 16));
            for (int i = 0; i < m; i++) {
                __m256 factor = _mm256_mul_ps(scale, _mm256_set1_ps(st[(size_t)i * G + g]));
                _mm256_storeu_ps(acc[i] + 8 * h,
                                 _mm256_fmadd_ps(_mm256_cvtepi32_ps(d[i][h]), factor, _mm256_loadu_ps(acc[i] + 8 * h)));
            }
        }
    }
    for (int i = 0; i < m; i++)
        for (int h = 0; h < 2; h++) {
            __m256 shifted = _mm256_setzero_ps();
            for (int g = 0; g < G; g++) {
                const uint16_t *at = sz + (size_t)g * 32 + 8 * h;
                __m256 scale = _mm256_castsi256_ps(
                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)at)), 16));
                __m256 zero = _mm256_castsi256_ps(
                    _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(at + 16))), 16));
                __m256 shift = _mm256_sub_ps(zero, _mm256_mul_ps(_mm256_set1_ps(8.0f), scale));
                shifted = _mm256_fmadd_ps(shift, _mm256_set1_ps(tt[(size_t)i * G + g]), shifted);
            }
            _mm256_storeu_ps(out + (size_t)i * N + 8 * h, _mm256_add_ps(_mm256_loadu_ps(acc[i] + 8 * h), shifted));
        }
}

static void unpack(const uint8_t *w, uint8_t *to, int np, int K) {
    const __m256i low = _mm256_set1_epi8(0x0F);
    for (size_t c = 0; c < (size_t)np * K / 8; c++)
        for (int h = 0; h < 2; h++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + c * CHUNK + 32 * h));
            _mm256_storeu_si256((__m256i *)(to + 2 * c * CHUNK + 32 * h), _mm256_and_si256(v, low));
            _mm256_storeu_si256((__m256i *)(to + 2 * c * CHUNK + CHUNK + 32 * h),
                                _mm256_and_si256(_mm256_srli_epi16(v, 4), low));
        }
}

#else
#define PATH "c"
#define MR 1
#define NR 1

static inline void micro(const int8_t *q, const float *st, const float *tt, const uint8_t *codes, const int packed,
                         const uint16_t *sz, float *out, const int m, const int np, int N, int K, int qg) {
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
                    int lo, hi;
                    if (packed) {
                        uint8_t v = codes[(size_t)c * CHUNK + 4 * l + b];
                        lo = v & 15, hi = v >> 4;
                    } else {
                        lo = codes[(size_t)c * 2 * CHUNK + 4 * l + b], hi = codes[(size_t)c * 2 * CHUNK + CHUNK + 4 * l + b];
                    }
                    d += lo * q[8 * c + b] + hi * q[8 * c + 4 + b];
                }
            float scale = bf16(sz[(size_t)g * 32 + l]), zero = bf16(sz[(size_t)g * 32 + 16 + l]);
            acc = fmaf((float)d, scale * st[g], acc);
            shifted = fmaf(zero - 8.0f * scale, tt[g], shifted);
        }
        out[l] = acc + shifted;
    }
}

static void unpack(const uint8_t *w, uint8_t *to, int np, int K) {
    for (size_t c = 0; c < (size_t)np * K / 8; c++)
        for (int j = 0; j < CHUNK; j++) {
            to[2 * c * CHUNK + j] = w[c * CHUNK + j] & 15;
            to[2 * c * CHUNK + CHUNK + j] = w[c * CHUNK + j] >> 4;
        }
}
#endif

const char *rinna_int4dot_path(void) { return PATH; }

/* One row's groups: q = round(x / step) with step = max(max|x|, 1e-8) / 127, and step * sum(q). */
static void quantize(const float *row, int8_t *q, float *steps, float *totals, int K, int qg) {
    for (int g = 0; g < K / qg; g++) {
        const float *xg = row + (size_t)g * qg;
        uint32_t top = 0; /* max |x| compared as integers (a float's magnitude bits order as it does): vectorized */
        for (int k = 0; k < qg; k++) {
            uint32_t bits;
            memcpy(&bits, xg + k, 4);
            bits &= 0x7fffffffu;
            top = bits > top ? bits : top;
        }
        float amax;
        memcpy(&amax, &top, 4);
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

/* Constant row and panel counts and form of the codes, so that the sums stay in registers. */
#define ROWS(M_, PACKED)                                                                                  \
    case M_:                                                                                              \
        if (np == NR) micro(x, st, tt, codes, PACKED, s, o, M_, NR, N, K, qg);                            \
        else micro(x, st, tt, codes, PACKED, s, o, M_, 1, N, K, qg);                                      \
        break;
#if MR >= 5
#define CASES(PACKED) ROWS(5, PACKED) ROWS(4, PACKED) ROWS(3, PACKED) ROWS(2, PACKED) ROWS(1, PACKED)
#elif MR >= 2
#define CASES(PACKED) ROWS(2, PACKED) ROWS(1, PACKED)
#else
#define CASES(PACKED) ROWS(1, PACKED)
#endif

/* all M rows, MR at a time, against panels p0..p0+np-1 (codes: theirs as stored if packed, else as bytes) */
static void panels(const int8_t *q, const float *steps, const float *totals, const uint8_t *codes, int packed,
                   const uint16_t *sz, float *out, int M, int N, int K, int qg, int p0, int np) {
    const int G = K / qg;
    for (int m0 = 0; m0 < M; m0 += MR) {
        const int8_t *x = q + (size_t)m0 * K;
        const float *st = steps + (size_t)m0 * G, *tt = totals + (size_t)m0 * G;
        const uint16_t *s = sz + (size_t)p0 * G * 32;
        float *o = out + (size_t)m0 * N + (size_t)PANEL * p0;
        if (packed) {
            switch (M - m0 < MR ? M - m0 : MR) { CASES(1) }
        } else {
            switch (M - m0 < MR ? M - m0 : MR) { CASES(0) }
        }
    }
}

/* out (M x N) = rows (M x K) times the dequantized weights transposed, in groups of qg inputs (64, 128 or
 * 256; K a multiple of it, N of 16). 0 on success. */
int rinna_int4dot(const float *rows, const uint8_t *w, const uint16_t *sz, float *out, int M, int N, int K,
                  int qg, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (qg % 64 || qg < 64 || qg > 256 || K % qg || N % PANEL) return 2;
    const int G = K / qg, P = N / PANEL, units = P / NR + P % NR; /* NR panels a unit, single panels at the end */
    int8_t *q = malloc((size_t)M * K);
    float *steps = malloc(sizeof(float) * (size_t)M * G), *totals = malloc(sizeof(float) * (size_t)M * G);
    int failed = !q || !steps || !totals;
    if (!failed) {
#pragma omp parallel for num_threads(threads) if (M > 1)
        for (int i = 0; i < M; i++)
            quantize(rows + (size_t)i * K, q + (size_t)i * K, steps + (size_t)i * G, totals + (size_t)i * G, K, qg);
#pragma omp parallel num_threads(threads) reduction(| : failed)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int lo = (int)((long)units * t / nt), hi = (int)((long)units * (t + 1) / nt);
            /* for more rows than one pass takes, a unit's codes unpacked once for all of them */
            uint8_t *bytes = M > MR ? malloc((size_t)NR * PANEL * K) : NULL;
            failed = M > MR && !bytes;
            for (int u = lo; u < hi && !failed; u++) {
                int full = P / NR, p0 = u < full ? u * NR : full * NR + (u - full), np = u < full ? NR : 1;
                const uint8_t *codes = w + (size_t)p0 * K * 8;
                if (bytes) unpack(codes, bytes, np, K);
                panels(q, steps, totals, bytes ? bytes : codes, !bytes, sz, out, M, N, K, qg, p0, np);
            }
            free(bytes);
        }
    }
    free(q);
    free(steps);
    free(totals);
    return failed;
}
