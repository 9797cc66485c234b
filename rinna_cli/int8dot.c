/* float rows times int8 weights, bit for bit what rinna_cli.int8.int_mm computes with torch:
 * each row quantized to int8 by its absmax (step = max|x| / 127, q = round-half-even(x / step)),
 * exact int32 sums against the int8 weight rows, then out = ((float)sum * step) * scale.
 * Every float operation is one IEEE operation in torch's order (no -ffast-math), so the
 * results are equal, not close.
 *
 * The rows come in float32 or bfloat16 (widened exactly), and the outputs leave in either with the layer's bias
 * added, rounded as torch rounds them (native.h's finish()), so that a layer's output needs no torch operation after.
 *
 * For the few rows of a batched decode step (rinna_cli/native.py says why): each weight
 * row is read from memory once for all the rows (up to MAXM at a time), one or two output
 * channels at a time (NB), the weights ahead prefetched; the inputs are cut into spans whose
 * quantized rows fit the L1 cache, the int32 sums of the spans added up. For a prompt on the
 * AVX-512 path (more rows, compute-bound): chunks of weight rows that stay in the L2 cache
 * while all the rows multiply them, 6 rows against 2 weight rows at a time (prompt(); 14 %
 * faster than oneDNN's _int_mm for 48 rows on the Zen 4 of 2026-12-04; on the AVX2 path the
 * same tiling was no faster than block()). Built on the machine with -march=native, so the
 * path is the widest the CPU has: AVX-512 VNNI, AVX2, or plain C.
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

#define MAXM 8  /* rows per pass over the weights */
#define GROUP 4 /* rows per block: GCC keeps no more accumulators in registers (8 went to the stack) */
#define L1_BYTES 32768 /* of quantized rows per span */

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpdpbusd multiplies unsigned by signed bytes: x + 128 is unsigned, and 128 times the
 * weights' sum (also taken with vpdpbusd, against ones) is subtracted again. */
#define PATH "avx512-vnni"
#define NB 1 /* one weight row at a time, 4 KB ahead prefetched: 1.1 ms for 11264 x 2816 on Zen 4, 1.5 with two rows */
typedef uint8_t xtype;
static xtype convert(int8_t v) { return (uint8_t)(v ^ 0x80); }

/* part[i][n0 + j] += the sums of inputs k0..k1 of row i and output n0 + j */
static inline __attribute__((always_inline)) void block(const xtype *x, const int8_t *w, int32_t *part, const int m,
                                                         int n0, int N, int K, int k0, int k1) {
    __m512i acc[GROUP][NB], sum[NB];
    const __m512i ones = _mm512_set1_epi8(1);
    const int8_t *row[NB];
    for (int j = 0; j < NB; j++) {
        row[j] = w + (size_t)(n0 + j) * K;
        sum[j] = _mm512_setzero_si512();
        for (int i = 0; i < m; i++) acc[i][j] = _mm512_setzero_si512();
    }
    for (int k = k0; k < k1; k += 64) {
        __mmask64 mask = k1 - k >= 64 ? ~0ULL : (~0ULL) >> (64 - (k1 - k));
        __m512i wv[NB];
        for (int j = 0; j < NB; j++) {
            wv[j] = _mm512_maskz_loadu_epi8(mask, row[j] + k);
            /* 4 KB ahead of what this thread reads: on in this span of the row, else in the next block's (a
             * span's end prefetching the row's next span, read a whole pass later, doubled the traffic: 2816 x
             * 11264 at 8 rows in 3.2 ms against 1.0 on the Zen 5 of 2026-12-04) */
            int ahead = k + 4096;
            _mm_prefetch((const char *)(ahead < k1 ? row[j] + ahead : row[j] + (size_t)NB * K + k0 + (ahead - k1)),
                         _MM_HINT_T0);
            sum[j] = _mm512_dpbusd_epi32(sum[j], ones, wv[j]);
        }
        for (int i = 0; i < m; i++) {
            __m512i xv = _mm512_maskz_loadu_epi8(mask, x + (size_t)i * K + k);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
        }
    }
    for (int j = 0; j < NB; j++) {
        int32_t shift = 128 * _mm512_reduce_add_epi32(sum[j]);
        for (int i = 0; i < m; i++) part[(size_t)i * N + n0 + j] += _mm512_reduce_add_epi32(acc[i][j]) - shift;
    }
}

static int32_t single(const xtype *x, const int8_t *w, int k0, int k1) {
    int32_t s = 0, sum = 0;
    for (int k = k0; k < k1; k++) {
        s += (int32_t)x[k] * w[k];
        sum += w[k];
    }
    return s - 128 * sum;
}

/* For a prompt: sums of rows i < m against weight rows n0..n0+nn-1 over all K, from the rows' sums of the
 * weights (128 times which vpdpbusd's unsigned x adds); TM defined is what says the path has it */
#define TM 6
#define TN 2 /* 12 accumulators: GCC kept 16 (4 x 4) in registers but stored them to the stack every step */
static inline __attribute__((always_inline)) void tile(const xtype *x, const int8_t *w, const int32_t *wsum,
                                                        int32_t *sums, const int m, const int nn, int n0, int N,
                                                        int K) {
    __m512i acc[TM][TN];
    for (int i = 0; i < m; i++)
        for (int j = 0; j < nn; j++) acc[i][j] = _mm512_setzero_si512();
#define STEP(MASK)                                                                                     \
    {                                                                                                  \
        __m512i wv[TN];                                                                                \
        for (int j = 0; j < nn; j++) wv[j] = _mm512_maskz_loadu_epi8(MASK, w + (size_t)(n0 + j) * K + k); \
        for (int i = 0; i < m; i++) {                                                                  \
            __m512i xv = _mm512_maskz_loadu_epi8(MASK, x + (size_t)i * K + k);                         \
            for (int j = 0; j < nn; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);        \
        }                                                                                              \
    }
    int k = 0;
    for (; k + 64 <= K; k += 64) STEP(~0ULL)
    if (k < K) STEP((~0ULL) >> (64 - (K - k)))
#undef STEP
    for (int i = 0; i < m; i++)
        for (int j = 0; j < nn; j++) sums[(size_t)i * N + n0 + j] = _mm512_reduce_add_epi32(acc[i][j]) - 128 * wsum[j];
}

/* the sums of weight rows n0..n1-1 */
static void weight_sums(const int8_t *w, int32_t *wsum, int n0, int n1, int K) {
    const __m512i ones = _mm512_set1_epi8(1);
    for (int n = n0; n < n1; n++) {
        __m512i sum = _mm512_setzero_si512();
        for (int k = 0; k < K; k += 64) {
            __mmask64 mask = K - k >= 64 ? ~0ULL : (~0ULL) >> (64 - (K - k));
            sum = _mm512_dpbusd_epi32(sum, ones, _mm512_maskz_loadu_epi8(mask, w + (size_t)n * K + k));
        }
        wsum[n - n0] = _mm512_reduce_add_epi32(sum);
    }
}

#elif defined(__AVX2__)
/* Bytes widened to 16 bits (x once, the weights as they are read), then vpmaddwd: exact. */
#define PATH "avx2"
#define NB 2
typedef int16_t xtype;
static xtype convert(int8_t v) { return v; }

static inline __attribute__((always_inline)) void block(const xtype *x, const int8_t *w, int32_t *part, const int m,
                                                         int n0, int N, int K, int k0, int k1) {
    __m256i acc[GROUP][NB];
    const int8_t *row[NB];
    for (int j = 0; j < NB; j++) {
        row[j] = w + (size_t)(n0 + j) * K;
        for (int i = 0; i < m; i++) acc[i][j] = _mm256_setzero_si256();
    }
    int k = k0;
    for (; k + 16 <= k1; k += 16) {
        __m256i wv[NB];
        for (int j = 0; j < NB; j++) {
            wv[j] = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row[j] + k)));
            _mm_prefetch((const char *)(row[j] + (size_t)NB * K + k), _MM_HINT_T0);
        }
        for (int i = 0; i < m; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (size_t)i * K + k));
            for (int j = 0; j < NB; j++) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv, wv[j]));
        }
    }
    for (int i = 0; i < m; i++)
        for (int j = 0; j < NB; j++) {
            __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[i][j]), _mm256_extracti128_si256(acc[i][j], 1));
            half = _mm_hadd_epi32(half, half);
            half = _mm_hadd_epi32(half, half);
            int32_t s = _mm_cvtsi128_si32(half);
            for (int t = k; t < k1; t++) s += (int32_t)x[(size_t)i * K + t] * row[j][t];
            part[(size_t)i * N + n0 + j] += s;
        }
}

#else
#define PATH "c"
#define NB 1
typedef int8_t xtype;
static xtype convert(int8_t v) { return v; }
static int32_t single(const xtype *x, const int8_t *w, int k0, int k1);

static inline void block(const xtype *x, const int8_t *w, int32_t *part, const int m, int n0, int N, int K, int k0,
                         int k1) {
    for (int i = 0; i < m; i++) part[(size_t)i * N + n0] += single(x + (size_t)i * K, w + (size_t)n0 * K, k0, k1);
}
#endif

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__))
/* One output channel of one row, for the channels past the last whole block: signed rows, plain sums. */
static int32_t single(const xtype *x, const int8_t *w, int k0, int k1) {
    int32_t s = 0;
    for (int k = k0; k < k1; k++) s += (int32_t)x[k] * w[k];
    return s;
}
#endif

const char *rinna_int8dot_path(void) { return PATH; }

/* torch: step = rows.abs().amax(dim=1).clamp(min=1e-8) / 127.0; q = round(rows / step).to(int8). */
static float quantize(const float *row, xtype *q, int K) {
    float amax = absmax(row, K);
    float step = (amax > (float)1e-8 ? amax : (float)1e-8) / 127.0f;
    for (int k = 0; k < K; k++) q[k] = convert((int8_t)nearbyintf(row[k] / step));
    return step;
}

/* Constant row counts, so that the accumulators stay in registers; rows past GROUP in a second
 * block, which finds the same weights in the L1 cache. */
#define ROWS(M)                                                                                      \
    case M:                                                                                          \
        for (int b = lo; b < hi; b++) {                                                              \
            block(x, w, part, M < GROUP ? M : GROUP, b * NB, N, K, k0, k1);                          \
            if (M > GROUP) block(x + (size_t)GROUP * K, w, part + (size_t)GROUP * N, M - GROUP, b * NB, N, K, k0, k1); \
        }                                                                                            \
        break;

#ifdef TM
#define L2_BYTES 262144 /* of weight rows per chunk, multiplied by every row of a prompt while in the L2 cache */

/* Constant row and weight-row counts, so that the sums stay in registers. */
#define TILES(M_)                                                                                     \
    case M_:                                                                                          \
        for (; n + TN <= c1; n += TN) tile(xm, w, wsum + (n - c0), s, M_, TN, n, N, K);              \
        for (; n < c1; n++) tile(xm, w, wsum + (n - c0), s, M_, 1, n, N, K);                          \
        break;

/* A prompt's sums for weight rows lo..hi-1: chunks of them that stay in the L2 cache while every row, TM at a
 * time, multiplies them TN at a time; each sum exact, so the same as block()'s. 0 on success. */
static int prompt(const xtype *x, const int8_t *w, int32_t *sums, int M, int N, int K, int lo, int hi) {
    int chunk = L2_BYTES / K / TN * TN;
    chunk = chunk < TN ? TN : chunk;
    int32_t *wsum = malloc(sizeof(int32_t) * (size_t)chunk);
    if (!wsum) return 1;
    for (int c0 = lo; c0 < hi; c0 += chunk) {
        int c1 = hi - c0 < chunk ? hi : c0 + chunk;
        weight_sums(w, wsum, c0, c1, K);
        for (int m0 = 0; m0 < M; m0 += TM) {
            const xtype *xm = x + (size_t)m0 * K;
            int32_t *s = sums + (size_t)m0 * N;
            int n = c0;
            switch (M - m0 < TM ? M - m0 : TM) { TILES(6) TILES(5) TILES(4) TILES(3) TILES(2) TILES(1) }
        }
    }
    free(wsum);
    return 0;
}
#endif

/* out (M x N) = rows (M x K) times the dequantized w (N x K) transposed, as above, plus the bias (NULL for none);
 * rows in float32 or bfloat16 (rows_bf16), out and the bias in float32 or bfloat16 (out_bf16), finished as
 * native.h's finish() says; row-major and contiguous. 0 on success. */
int rinna_int8dot(const void *rows, int rows_bf16, const int8_t *w, const float *scale, const void *bias, void *out,
                  int out_bf16, int M, int N, int K, int threads) {
    if (M <= 0 || N <= 0) return 0;
    xtype *converted = malloc(sizeof(xtype) * (size_t)M * K);
    float *steps = malloc(sizeof(float) * (size_t)M);
    int32_t *sums = calloc((size_t)M * N, sizeof(int32_t));
    float *widened = rows_bf16 ? malloc(sizeof(float) * (size_t)K * threads) : NULL;
    int failed = !converted || !steps || !sums || (rows_bf16 && !widened);
    if (failed) goto done;
#pragma omp parallel for num_threads(threads) if (M > 1)
    for (int i = 0; i < M; i++) {
        float *scratch = rows_bf16 ? widened + (size_t)omp_get_thread_num() * K : NULL;
        const float *row = row_floats(rows, rows_bf16, i, K, scratch);
        steps[i] = quantize(row, converted + (size_t)i * K, K);
    }
    int blocks = N / NB;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int lo = (int)((long)blocks * t / nt), hi = (int)((long)blocks * (t + 1) / nt);
        int first = lo * NB, last = t == nt - 1 ? N : hi * NB;
#ifdef TM
        if (M > MAXM) /* a prompt: prompt() takes every row */
            failed = prompt(converted, w, sums, M, N, K, first, last);
        else
#endif
        for (int m0 = 0; m0 < M; m0 += MAXM) {
            int m = M - m0 < MAXM ? M - m0 : MAXM;
            const xtype *x = converted + (size_t)m0 * K;
            int32_t *part = sums + (size_t)m0 * N;
            int span = L1_BYTES / (m * (int)sizeof(xtype)) / 64 * 64;
            span = span < 64 ? 64 : span;
            for (int k0 = 0; k0 < K; k0 += span) {
                int k1 = K - k0 < span ? K : k0 + span;
                switch (m) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) }
            }
            if (t == nt - 1)
                for (int n = blocks * NB; n < N; n++)
                    for (int i = 0; i < m; i++) part[(size_t)i * N + n] = single(x + (size_t)i * K, w + (size_t)n * K, 0, K);
        }
        const int as_they_are = direct(out_bf16, bias);
        float *values = failed || as_they_are || last <= first ? NULL : malloc(sizeof(float) * (size_t)(last - first));
        failed |= !as_they_are && last > first && !values;
        for (int i = 0; !failed && i < M; i++) {
            float *v = as_they_are ? (float *)out + (size_t)i * N + first : values; /* row i's outputs first.. */
            for (int n = first; n < last; n++) {
                float scaled = (float)sums[(size_t)i * N + n] * steps[i]; /* torch: summed * step * scale */
                v[n - first] = scaled * scale[n];
            }
            if (!as_they_are) finish(values, out, out_bf16, bias, i, N, first, last);
        }
        free(values);
    }
done:
    free(converted);
    free(steps);
    free(sums);
    free(widened);
    return failed;
}
