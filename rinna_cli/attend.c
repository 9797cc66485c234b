/* One decode step's attention: one query row per head against that head's cached keys and values,
 *   out[h] = softmax(scale * q[h] . k[h, t] over t) . v[h, t],
 * in float32 (bfloat16 inputs are widened, the output rounded to bfloat16 as torch rounds).
 *
 * torch's CPU scaled_dot_product_attention spends about 130 us a layer on one query over a
 * short cache and reads a long one at half the memory's speed (docs/benchmarks.md, Zen 4);
 * this reads each head's keys, then its values, once, the heads split among the threads.
 * The cache may be a view into a larger buffer (rinna_cli.engine._GrowingLayer): head h,
 * token t is at base + h * hs + t * ts, its D values contiguous. The sums run in a fixed
 * order per build, the same for every sequence, so a reply does not depend on what else
 * decodes beside it.
 *
 * The vector paths (AVX-512, AVX2) read a bfloat16 cache as 32-bit pairs of values, widened by a shift (the even
 * value) and a mask (the odd one), the query and the output split the same way: two operations widen 2W values,
 * where widening them in order held a long bfloat16 cache to 22 GB/s on the Zen 5 of 2026-12-08 (now 32-46). The
 * rows ahead are prefetched (the hardware's prefetcher alone read them at 14-31 GB/s there) and the softmax's
 * exponentials are taken W at a time.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#define MAXD 1024 /* values a head */
#define AHEAD 16  /* token rows ahead of the one read that are prefetched */

/* exp(x) for x <= 0 (a score less the largest): Cody-Waite reduction by ln 2 and a degree-5 polynomial, within
 * 1 ulp of exp (0.97 at worst over [-104, 0], every build); 0 below -104. The vector paths take the same steps. */
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693145751953125f
#define LN2_LO 1.428606765330187045e-06f
#define EXP_C5 0.000198527617612853646278381f
#define EXP_C4 0.00139304355252534151077271f
#define EXP_C3 0.00833336077630519866943359f
#define EXP_C2 0.0416664853692054748535156f
#define EXP_C1 0.166666671633720397949219f

static inline float exp_scalar(float x) {
    if (!(x >= -104.0f)) return x != x ? x : 0.0f;
    float q = nearbyintf(x * LOG2E);
    float s = fmaf(q, -LN2_LO, fmaf(q, -LN2_HI, x));
    float u = fmaf(fmaf(fmaf(fmaf(fmaf(EXP_C5, s, EXP_C4), s, EXP_C3), s, EXP_C2), s, EXP_C1), s, 0.5f);
    return ldexpf(1.0f + fmaf(s * s, u, s), (int)q);
}

#if defined(__AVX512F__)
#define W 16
typedef __m512 vf;
typedef __mmask16 vmask;
#define vzero() _mm512_setzero_ps()
#define vset(a) _mm512_set1_ps(a)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, a) _mm512_storeu_ps(p, a)
#define vsum(a) _mm512_reduce_add_ps(a)
#define vhmax(a) _mm512_reduce_max_ps(a)
#define FULL(m) ((m) == (vmask)0xFFFF)
static inline vmask lanes(int n) { return n >= W ? (vmask)0xFFFF : (vmask)((1u << n) - 1); }
/* the first lanes of m; the rest 0. A whole vector is loaded plainly (a masked load is not prefetched for) */
static inline vf vload_n(const float *p, vmask m) { return FULL(m) ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(m, p); }
static inline void vstore_n(float *p, vf a, vmask m) { _mm512_mask_storeu_ps(p, m, a); }
static inline vf vload_or(const float *p, vmask m, float fill) { return _mm512_mask_loadu_ps(vset(fill), m, p); }
/* W pairs of bfloat16 values (the lanes of m): the even ones, the odd ones */
static inline void pairs(const void *p, vmask m, vf *even, vf *odd) {
    __m512i u = FULL(m) ? _mm512_loadu_si512(p) : _mm512_maskz_loadu_epi32(m, p);
    *even = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    *odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xFFFF0000u)));
}
static inline vf vround(vf a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale(vf u, vf q) { return _mm512_scalef_ps(u, q); } /* u * 2^q, as ldexpf */
static inline vf vabove(vf u, vf x, float low) { /* u where x >= low (or NaN), else 0 */
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset(low), _CMP_NLT_UQ), u);
}

#elif defined(__AVX2__)
#define W 8
typedef __m256 vf;
typedef __m256i vmask;
#define vzero() _mm256_setzero_ps()
#define vset(a) _mm256_set1_ps(a)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, a) _mm256_storeu_ps(p, a)
#define FULL(m) (_mm256_movemask_ps(_mm256_castsi256_ps(m)) == 0xFF)
static inline float vsum(vf a) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}
static inline float vhmax(vf a) {
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h)));
}
static inline vmask lanes(int n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
static inline vf vload_n(const float *p, vmask m) { return FULL(m) ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, m); }
static inline void vstore_n(float *p, vf a, vmask m) { _mm256_maskstore_ps(p, m, a); }
static inline vf vload_or(const float *p, vmask m, float fill) {
    return _mm256_blendv_ps(vset(fill), _mm256_maskload_ps(p, m), _mm256_castsi256_ps(m));
}
static inline void pairs(const void *p, vmask m, vf *even, vf *odd) {
    __m256i u = FULL(m) ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskload_epi32((const int *)p, m);
    *even = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    *odd = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xFFFF0000u)));
}
static inline vf vround(vf a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
static inline vf vscale(vf u, vf q) { /* u * 2^q in two steps (2^q alone is no float below q = -126) */
    __m256i e = _mm256_cvtps_epi32(q), h = _mm256_srai_epi32(e, 1), bias = _mm256_set1_epi32(127);
    vf first = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    vf second = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(e, h), bias), 23));
    return vmul(vmul(u, first), second);
}
static inline vf vabove(vf u, vf x, float low) { return _mm256_and_ps(u, _mm256_cmp_ps(x, vset(low), _CMP_NLT_UQ)); }
#endif

#ifdef W
static inline vf vexp(vf x) {
    vf q = vround(vmul(x, vset(LOG2E)));
    vf s = vfma(q, vset(-LN2_LO), vfma(q, vset(-LN2_HI), x));
    vf u = vfma(vfma(vfma(vfma(vfma(vset(EXP_C5), s, vset(EXP_C4)), s, vset(EXP_C3)), s, vset(EXP_C2)), s,
                     vset(EXP_C1)),
                s, vset(0.5f));
    return vabove(vscale(vadd(vset(1.0f), vfma(vmul(s, s), u, s)), q), x, -104.0f);
}

/* the bytes of the row of token t, `stride` bytes a token, into the caches */
static inline void fetch(const void *base, size_t stride, size_t bytes, int t) {
    for (size_t o = 0; o < bytes; o += 64) __builtin_prefetch((const char *)base + (size_t)t * stride + o);
}

/* s[t] = scale * q . k_t for t < T of one head, q as the cache holds it: n float32 values (padded with zeros to
 * whole vectors) in qe, or, for bfloat16, n pairs: the even values in qe, the odd ones in qo */
static void scores_of(const float *qe, const float *qo, const void *k, size_t kts, int T, int n, int bf16,
                      float scale, float *s) {
    const size_t stride = kts * (bf16 ? 2 : 4), bytes = (size_t)n * 4;
    for (int t = 0; t < T; t++) {
        if (t + AHEAD < T) fetch(k, stride, bytes, t + AHEAD);
        vf acc = vzero();
        for (int j = 0; j < n; j += W) {
            vmask m = lanes(n - j);
            if (bf16) {
                vf e, o;
                pairs((const uint16_t *)k + (size_t)t * kts + 2 * j, m, &e, &o);
                acc = vfma(vload(qo + j), o, vfma(vload(qe + j), e, acc));
            } else {
                acc = vfma(vload(qe + j), vload_n((const float *)k + (size_t)t * kts + j, m), acc);
            }
        }
        s[t] = vsum(acc) * scale;
    }
}

/* s[t] = exp(s[t] - max s) for t < T; their sum */
static float exponentials(float *s, int T) {
    vf top = vset(-INFINITY);
    for (int t = 0; t < T; t += W) top = vmax(top, vload_or(s + t, lanes(T - t), -INFINITY));
    const vf peak = vset(vhmax(top));
    vf total = vzero();
    for (int t = 0; t < T; t += W) {
        vmask m = lanes(T - t);
        vstore_n(s + t, vexp(vsub(vload_n(s + t, m), peak)), m);
        total = vadd(total, vload_n(s + t, m));
    }
    return vsum(total);
}

/* NV vectors of lanes from j0 (values, or pairs: even ones to oe, odd ones to oo) of sum over t of s[t] * v_t */
static inline __attribute__((always_inline)) void weighted(const float *s, const void *v, size_t vts, int T, int n,
                                                            int j0, int bf16, float *oe, float *oo, const int NV) {
    const size_t stride = vts * (bf16 ? 2 : 4), bytes = (size_t)n * 4;
    vf ae[4], ao[4];
    vmask m[4];
    for (int i = 0; i < NV; i++) {
        ae[i] = ao[i] = vzero();
        m[i] = lanes(n - j0 - i * W);
    }
    for (int t = 0; t < T; t++) {
        if (j0 == 0 && t + AHEAD < T) fetch(v, stride, bytes, t + AHEAD);
        vf p = vset(s[t]);
        for (int i = 0; i < NV; i++) {
            if (bf16) {
                vf e, o;
                pairs((const uint16_t *)v + (size_t)t * vts + 2 * (j0 + i * W), m[i], &e, &o);
                ae[i] = vfma(p, e, ae[i]);
                ao[i] = vfma(p, o, ao[i]);
            } else {
                ae[i] = vfma(p, vload_n((const float *)v + (size_t)t * vts + j0 + i * W, m[i]), ae[i]);
            }
        }
    }
    for (int i = 0; i < NV; i++) {
        vstore(oe + j0 + i * W, ae[i]);
        if (bf16) vstore(oo + j0 + i * W, ao[i]);
    }
}

/* head h's output before the softmax's division, into out; the softmax's denominator */
static float head(const void *q, const void *k, const void *v, int D, long kts, long vts, float scale, int bf16,
                  float *s, int T, float *out) {
    float qe[MAXD + W], qo[MAXD / 2 + W], oe[MAXD + W], oo[MAXD / 2 + W];
    const int n = bf16 ? D / 2 : D, padded = (n + W - 1) / W * W; /* zeros to the last vector's end, no further */
    for (int j = 0; j < padded; j++) {
        qe[j] = j < n ? widen(q, bf16 ? 2 * (size_t)j : (size_t)j, bf16) : 0.0f;
        if (bf16) qo[j] = j < n ? widen(q, 2 * (size_t)j + 1, 1) : 0.0f;
    }
    scores_of(qe, qo, k, (size_t)kts, T, n, bf16, scale, s);
    float total = exponentials(s, T);
    int j = 0;
    for (; j + 4 * W <= n; j += 4 * W) weighted(s, v, (size_t)vts, T, n, j, bf16, oe, oo, 4);
    for (; j < n; j += W) weighted(s, v, (size_t)vts, T, n, j, bf16, oe, oo, 1);
    for (int d = 0; d < D; d++) out[d] = bf16 ? (d % 2 ? oo[d / 2] : oe[d / 2]) : oe[d];
    return total;
}
#endif

/* q: head h at q + h * qs; out: (H, D) contiguous; every element in float32 or (bf16 != 0) bfloat16.
 * 0 on success, 1 if the scratch could not be allocated, 2 for no cached token or a head wider than 1024. */
int rinna_attend(const void *q, const void *k, const void *v, void *out, int H, int T, int D, long qs, long khs,
                 long kts, long vhs, long vts, float scale, int bf16, int threads) {
    if (H <= 0) return 0;
    if (T <= 0 || D <= 0 || D > MAXD) return 2;
    float *scores = malloc(sizeof(float) * (size_t)H * T);
    if (!scores) return 1;
    const size_t size = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) {
        float *s = scores + (size_t)h * T, result[MAXD], total = 0.0f;
        const char *qh = (const char *)q + size * (size_t)h * qs, *kh = (const char *)k + size * (size_t)h * khs,
                   *vh = (const char *)v + size * (size_t)h * vhs;
#ifdef W
        if (!bf16 || D % 2 == 0) {
            total = head(qh, kh, vh, D, kts, vts, scale, bf16, s, T, result);
        } else
#endif
        { /* plain C, and a bfloat16 head of an odd size */
            float qv[MAXD], top = -INFINITY;
            for (int d = 0; d < D; d++) qv[d] = widen(qh, (size_t)d, bf16);
            for (int t = 0; t < T; t++) {
                float acc = 0.0f;
                for (int d = 0; d < D; d++) acc += qv[d] * widen(kh, (size_t)t * kts + d, bf16);
                s[t] = acc * scale;
                top = s[t] > top ? s[t] : top;
            }
            for (int d = 0; d < D; d++) result[d] = 0.0f;
            for (int t = 0; t < T; t++) {
                s[t] = exp_scalar(s[t] - top);
                total += s[t];
                for (int d = 0; d < D; d++) result[d] += s[t] * widen(vh, (size_t)t * vts + d, bf16);
            }
        }
        float inverse = 1.0f / total;
        for (int d = 0; d < D; d++) {
            float value = result[d] * inverse;
            if (bf16)
                ((uint16_t *)out)[(size_t)h * D + d] = to_bf16(value);
            else
                ((float *)out)[(size_t)h * D + d] = value;
        }
    }
    free(scores);
    return 0;
}
