/* float rows times groupwise int4 weights (rinna_cli/int4.py's layout), for decode steps.
 *
 * A weight row (N rows of K inputs) is cut into blocks of 64 inputs, 32 bytes each at
 * w + n*K/2 + 32b: byte j holds the 4-bit code of input 64b + j in its low half and of
 * input 64b + 32 + j in its high half. Groups of QG inputs (64, 128 or 256) share a scale:
 * group g of row n dequantizes to (code - 8) * scale + zero with (scale, zero) in bfloat16
 * at sz + 2*(n*G + g).
 *
 * Each row of x is quantized to int8 per group (step = max|x| / 127 of the group,
 * q = round-half-even(x / step)), as llama.cpp quantizes activations for its Q4_0 dot
 * products; then per group the exact int32 sum D = sum(code * q) (codes are unsigned, so
 * vpmaddubsw / vpdpbusd take them as they are) and S = sum(q), and
 *   out = sum over g of (float)D * (scale * step)  +  sum over g of (zero - 8 * scale) * (step * S),
 * the second sum a dot product per row after the first. The order of the float operations
 * is fixed per path and the same for every row, so a row's output does not depend on the
 * other rows multiplied with it. Each weight row is read from memory once per call, for
 * all the rows; built like int8dot.c (-march=native: AVX-512 VNNI, AVX2 or plain C).
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define GROUP 4  /* rows per block, their accumulators in registers */
#define L2_BYTES 131072 /* of weight rows per chunk, kept in the L2 cache while every row multiplies them */

static inline float bf16(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

#define MAXG 1024 /* groups per row at most (K <= 65536 at groups of 64) */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
/* sum of a[g] * b[g], eight lanes, in a fixed order (the same for every row) */
static inline float dot(const float *a, const float *b, int n) {
    __m256 acc = _mm256_setzero_ps();
    int g = 0;
    for (; g + 8 <= n; g += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + g), _mm256_loadu_ps(b + g), acc);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float sum = _mm_cvtss_f32(h);
    for (; g < n; g++) sum = fmaf(a[g], b[g], sum);
    return sum;
}
#endif

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define PATH "avx512-vnni"

/* a block's 32 bytes as its 64 codes in input order: the low halves, then the high ones */
static inline __m512i codes64(const uint8_t *at) {
    __m256i v = _mm256_loadu_si256((const __m256i *)at);
    __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4), 1);
    return _mm512_and_si512(both, _mm512_set1_epi8(0x0F));
}

static inline __attribute__((always_inline)) void block(const int8_t *x, const uint8_t *w, const uint16_t *sz,
                                                         const float *steps, const float *totals, float *out,
                                                         const int m, int n, int N, int K, int qg) {
    const int G = K / qg, blocks = qg / 64;
    __m512 acc[GROUP];
    float shifts[MAXG]; /* zero - 8 * scale per group: the sums of q times it are a dot product per row, after */
    for (int i = 0; i < m; i++) acc[i] = _mm512_setzero_ps();
    const uint8_t *row = w + (size_t)n * (K / 2);
    for (int g = 0; g < G; g++) {
        const uint8_t *at = row + (size_t)g * (qg / 2);
        _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
        float scale = bf16(sz[2 * ((size_t)n * G + g)]), zero = bf16(sz[2 * ((size_t)n * G + g) + 1]);
        shifts[g] = zero - 8.0f * scale;
        __m512i d[GROUP];
        for (int i = 0; i < m; i++) d[i] = _mm512_setzero_si512();
        for (int b = 0; b < blocks; b++) {
            __m512i c = codes64(at + 32 * b);
            for (int i = 0; i < m; i++)
                d[i] = _mm512_dpbusd_epi32(d[i], c, _mm512_loadu_si512((const void *)(x + (size_t)i * K + (size_t)g * qg + 64 * b)));
        }
        for (int i = 0; i < m; i++) {
            acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d[i]), _mm512_set1_ps(scale * steps[(size_t)i * G + g]), acc[i]);
        }
    }
    for (int i = 0; i < m; i++)
        out[(size_t)i * N + n] = _mm512_reduce_add_ps(acc[i]) + dot(shifts, totals + (size_t)i * G, G);
}

#elif defined(__AVX2__)
#define PATH "avx2"

static inline float hsum(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

static inline __attribute__((always_inline)) void block(const int8_t *x, const uint8_t *w, const uint16_t *sz,
                                                         const float *steps, const float *totals, float *out,
                                                         const int m, int n, int N, int K, int qg) {
    const int G = K / qg, blocks = qg / 64;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    __m256 acc[GROUP];
    float shifts[MAXG]; /* zero - 8 * scale per group: the sums of q times it are a dot product per row, after */
    for (int i = 0; i < m; i++) acc[i] = _mm256_setzero_ps();
    const uint8_t *row = w + (size_t)n * (K / 2);
    for (int g = 0; g < G; g++) {
        const uint8_t *at = row + (size_t)g * (qg / 2);
        _mm_prefetch((const char *)(at + 4096), _MM_HINT_T0);
        float scale = bf16(sz[2 * ((size_t)n * G + g)]), zero = bf16(sz[2 * ((size_t)n * G + g) + 1]);
        shifts[g] = zero - 8.0f * scale;
        /* codes <= 15 and |q| <= 127: a 16-bit pair sum is at most 3810, eight of them (256 inputs) 30480 */
        __m256i p[GROUP];
        for (int i = 0; i < m; i++) p[i] = _mm256_setzero_si256();
        for (int b = 0; b < blocks; b++) {
            __m256i v = _mm256_loadu_si256((const __m256i *)(at + 32 * b));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            for (int i = 0; i < m; i++) {
                const int8_t *xb = x + (size_t)i * K + (size_t)g * qg + 64 * b;
                p[i] = _mm256_add_epi16(p[i], _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)xb)));
                p[i] = _mm256_add_epi16(p[i], _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(xb + 32))));
            }
        }
        for (int i = 0; i < m; i++) {
            __m256 d = _mm256_cvtepi32_ps(_mm256_madd_epi16(p[i], ones));
            acc[i] = _mm256_fmadd_ps(d, _mm256_set1_ps(scale * steps[(size_t)i * G + g]), acc[i]);
        }
    }
    for (int i = 0; i < m; i++) out[(size_t)i * N + n] = hsum(acc[i]) + dot(shifts, totals + (size_t)i * G, G);
}

#else
#define PATH "c"

static inline void block(const int8_t *x, const uint8_t *w, const uint16_t *sz, const float *steps,
                         const float *totals, float *out, const int m, int n, int N, int K, int qg) {
    const int G = K / qg;
    const uint8_t *row = w + (size_t)n * (K / 2);
    for (int i = 0; i < m; i++) {
        float acc = 0.0f, bias = 0.0f;
        for (int g = 0; g < G; g++) {
            int32_t d = 0;
            for (int b = 0; b < qg / 64; b++) {
                const uint8_t *codes = row + (size_t)g * (qg / 2) + 32 * b;
                const int8_t *xb = x + (size_t)i * K + (size_t)g * qg + 64 * b;
                for (int j = 0; j < 32; j++) d += (codes[j] & 15) * xb[j] + (codes[j] >> 4) * xb[32 + j];
            }
            float scale = bf16(sz[2 * ((size_t)n * G + g)]), zero = bf16(sz[2 * ((size_t)n * G + g) + 1]);
            acc = fmaf((float)d, scale * steps[(size_t)i * G + g], acc);
            bias = fmaf(zero - 8.0f * scale, totals[(size_t)i * G + g], bias);
        }
        out[(size_t)i * N + n] = acc + bias;
    }
}
#endif

const char *rinna_int4dot_path(void) { return PATH; }

/* One row's groups: q = round(x / step) with step = max(max|x|, 1e-8) / 127, and step * sum(q). */
static void quantize(const float *row, int8_t *q, float *steps, float *totals, int K, int qg) {
    for (int g = 0; g < K / qg; g++) {
        const float *xg = row + (size_t)g * qg;
        float amax = 0.0f;
        for (int k = 0; k < qg; k++) amax = fmaxf(amax, fabsf(xg[k]));
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

/* Constant row counts, so that the accumulators stay in registers. */
#define ROWS(M)                                                                                           \
    case M:                                                                                               \
        for (int n = n0; n < n1; n++) block(x, w, sz, st, tt, o, M, n, N, K, qg);                         \
        break;

/* out (M x N) = rows (M x K) times the dequantized weights transposed, in groups of qg inputs (64, 128 or
 * 256; K a multiple of it). 0 on success. */
int rinna_int4dot(const float *rows, const uint8_t *w, const uint16_t *sz, float *out, int M, int N, int K,
                  int qg, int threads) {
    if (M <= 0 || N <= 0) return 0;
    if (qg % 64 || qg < 64 || qg > 256 || K % qg || K / qg > MAXG) return 2;
    const int G = K / qg;
    int8_t *q = malloc((size_t)M * K);
    float *steps = malloc(sizeof(float) * (size_t)M * G), *totals = malloc(sizeof(float) * (size_t)M * G);
    if (!q || !steps || !totals) {
        free(q);
        free(steps);
        free(totals);
        return 1;
    }
    for (int i = 0; i < M; i++)
        quantize(rows + (size_t)i * K, q + (size_t)i * K, steps + (size_t)i * G, totals + (size_t)i * G, K, qg);
    /* Weight rows in chunks of about L2_BYTES, each read from memory once for all the rows, GROUP at a time */
    int chunk = L2_BYTES / (K / 2);
    chunk = chunk < 1 ? 1 : chunk;
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int lo = (int)((long)N * t / nt), hi = (int)((long)N * (t + 1) / nt);
        for (int n0 = lo; n0 < hi; n0 += chunk) {
            int n1 = hi - n0 < chunk ? hi : n0 + chunk;
            for (int m0 = 0; m0 < M; m0 += GROUP) {
                const int8_t *x = q + (size_t)m0 * K;
                const float *st = steps + (size_t)m0 * G, *tt = totals + (size_t)m0 * G;
                float *o = out + (size_t)m0 * N;
                switch (M - m0 < GROUP ? M - m0 : GROUP) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) }
            }
        }
    }
    free(q);
    free(steps);
    free(totals);
    return 0;
}
