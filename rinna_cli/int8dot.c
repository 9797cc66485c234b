/* int8 rows times an int8 weight matrix, exact int32 sums: what torch._int_mm(x, w.t()) returns.
 *
 * For the few rows of a batched decode step (rinna_cli/int8dot.py says why): each weight
 * row is read from memory once for all the rows of x (up to MAXM at a time), two output
 * channels at a time, the next two prefetched. Built on the machine with -march=native,
 * so the path is the widest the CPU has: AVX-512 VNNI, AVX2, or plain C.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAXM 8

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* vpdpbusd multiplies unsigned by signed bytes: x + 128 is unsigned, and 128 times the
 * weight row's sum (also taken with vpdpbusd, against ones) is subtracted again. */
#define PATH "avx512-vnni"
#define NB 2
typedef uint8_t xtype;
static xtype convert(int8_t v) { return (uint8_t)(v ^ 0x80); }

static inline __attribute__((always_inline)) void block(const xtype *x, const int8_t *w, int32_t *out, const int m,
                                                         int n0, int N, int K) {
    __m512i acc[MAXM][NB], sum[NB];
    const __m512i ones = _mm512_set1_epi8(1);
    const int8_t *row[NB];
    for (int j = 0; j < NB; j++) {
        row[j] = w + (size_t)(n0 + j) * K;
        sum[j] = _mm512_setzero_si512();
        for (int i = 0; i < m; i++) acc[i][j] = _mm512_setzero_si512();
    }
    for (int k = 0; k < K; k += 64) {
        __mmask64 mask = K - k >= 64 ? ~0ULL : (~0ULL) >> (64 - (K - k));
        __m512i wv[NB];
        for (int j = 0; j < NB; j++) {
            wv[j] = _mm512_maskz_loadu_epi8(mask, row[j] + k);
            _mm_prefetch((const char *)(row[j] + (size_t)NB * K + k), _MM_HINT_T0);
            sum[j] = _mm512_dpbusd_epi32(sum[j], ones, wv[j]);
        }
        for (int i = 0; i < m; i++) {
            __m512i xv = _mm512_maskz_loadu_epi8(mask, x + (size_t)i * K + k);
            for (int j = 0; j < NB; j++) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv, wv[j]);
        }
    }
    for (int j = 0; j < NB; j++) {
        int32_t shift = 128 * _mm512_reduce_add_epi32(sum[j]);
        for (int i = 0; i < m; i++) out[(size_t)i * N + n0 + j] = _mm512_reduce_add_epi32(acc[i][j]) - shift;
    }
}

static int32_t single(const xtype *x, const int8_t *w, int K) {
    int32_t s = 0, sum = 0;
    for (int k = 0; k < K; k++) {
        s += (int32_t)x[k] * w[k];
        sum += w[k];
    }
    return s - 128 * sum;
}

#elif defined(__AVX2__)
/* Bytes widened to 16 bits (x once, the weights as they are read), then vpmaddwd: exact. */
#define PATH "avx2"
#define NB 1
typedef int16_t xtype;
static xtype convert(int8_t v) { return v; }

static inline __attribute__((always_inline)) void block(const xtype *x, const int8_t *w, int32_t *out, const int m,
                                                         int n0, int N, int K) {
    __m256i acc[MAXM];
    const int8_t *row = w + (size_t)n0 * K;
    for (int i = 0; i < m; i++) acc[i] = _mm256_setzero_si256();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(row + k)));
        _mm_prefetch((const char *)(row + (size_t)NB * K + k), _MM_HINT_T0);
        for (int i = 0; i < m; i++) {
            __m256i xv = _mm256_loadu_si256((const __m256i *)(x + (size_t)i * K + k));
            acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(xv, wv));
        }
    }
    for (int i = 0; i < m; i++) {
        __m128i half = _mm_add_epi32(_mm256_castsi256_si128(acc[i]), _mm256_extracti128_si256(acc[i], 1));
        half = _mm_hadd_epi32(half, half);
        half = _mm_hadd_epi32(half, half);
        int32_t s = _mm_cvtsi128_si32(half);
        for (int t = k; t < K; t++) s += (int32_t)x[(size_t)i * K + t] * row[t];
        out[(size_t)i * N + n0] = s;
    }
}

static int32_t single(const xtype *x, const int8_t *w, int K) {
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += (int32_t)x[k] * w[k];
    return s;
}

#else
#define PATH "c"
#define NB 1
typedef int8_t xtype;
static xtype convert(int8_t v) { return v; }

static int32_t single(const xtype *x, const int8_t *w, int K) {
    int32_t s = 0;
    for (int k = 0; k < K; k++) s += (int32_t)x[k] * w[k];
    return s;
}

static inline void block(const xtype *x, const int8_t *w, int32_t *out, const int m, int n0, int N, int K) {
    for (int i = 0; i < m; i++) out[(size_t)i * N + n0] = single(x + (size_t)i * K, w + (size_t)n0 * K, K);
}
#endif

/* Constant row counts, so that the accumulators stay in registers. */
#define ROWS(M) \
    case M:     \
        for (int b = lo; b < hi; b++) block(x, w, out, M, b * NB, N, K); \
        break;

const char *rinna_int8dot_path(void) { return PATH; }

/* out (M x N) = x (M x K) times w (N x K) transposed; all row-major and contiguous. 0 on success. */
int rinna_int8dot(const int8_t *x8, const int8_t *w, int32_t *out0, int M, int N, int K, int threads) {
    xtype *converted = malloc(sizeof(xtype) * (size_t)M * K);
    if (!converted) return 1;
    for (size_t i = 0; i < (size_t)M * K; i++) converted[i] = convert(x8[i]);
    int blocks = N / NB;
    for (int m0 = 0; m0 < M; m0 += MAXM) {
        int m = M - m0 < MAXM ? M - m0 : MAXM;
        const xtype *x = converted + (size_t)m0 * K;
        int32_t *out = out0 + (size_t)m0 * N;
#pragma omp parallel num_threads(threads)
        {
            int t = omp_get_thread_num(), nt = omp_get_num_threads();
            int lo = (int)((long)blocks * t / nt), hi = (int)((long)blocks * (t + 1) / nt);
            switch (m) { ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8) }
            if (t == nt - 1)
                for (int n = blocks * NB; n < N; n++)
                    for (int i = 0; i < m; i++) out[(size_t)i * N + n] = single(x + (size_t)i * K, w + (size_t)n * K, K);
        }
    }
    free(converted);
    return 0;
}
