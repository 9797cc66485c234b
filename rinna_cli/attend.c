/* One decode step's attention: one query row per head against that head's cached keys and values,
 *   out[h] = softmax(scale * q[h] . k[h, t] over t) . v[h, t],
 * in float32 (bfloat16 inputs are widened, the output rounded to bfloat16 as torch rounds).
 *
 * torch's CPU scaled_dot_product_attention spends about 130 us a layer on one query over a
 * short cache and reads a long one at half the memory's speed (docs/benchmarks.md, Zen 4);
 * this reads each head's keys, then its values, once, the heads split among the threads.
 * The cache may be a view into a larger buffer (rinna_cli.engine._GrowingLayer): head h,
 * token t is at base + h * hs + t * ts, its D values contiguous. The sums run in a fixed
 * order per build (omp simd), the same for every sequence, so a reply does not depend on
 * what else decodes beside it.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

/* q: head h at q + h * qs; out: (H, D) contiguous; every element in float32 or (bf16 != 0) bfloat16.
 * 0 on success, 1 if the scratch could not be allocated, 2 for no cached token or a head wider than 1024. */
int rinna_attend(const void *q, const void *k, const void *v, void *out, int H, int T, int D, long qs, long khs,
                 long kts, long vhs, long vts, float scale, int bf16, int threads) {
    if (H <= 0) return 0;
    if (T <= 0 || D <= 0 || D > 1024) return 2;
    float *scores = malloc(sizeof(float) * (size_t)H * T);
    if (!scores) return 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int h = 0; h < H; h++) {
        float qh[1024], o[1024], *s = scores + (size_t)h * T, top = -INFINITY, total = 0.0f;
        for (int d = 0; d < D; d++) qh[d] = widen(q, (size_t)h * qs + d, bf16);
        for (int t = 0; t < T; t++) {
            size_t at = (size_t)h * khs + (size_t)t * kts;
            float acc = 0.0f;
            if (bf16) {
#pragma omp simd reduction(+ : acc)
                for (int d = 0; d < D; d++) acc += qh[d] * widen(k, at + d, 1);
            } else {
                const float *kt = (const float *)k + at;
#pragma omp simd reduction(+ : acc)
                for (int d = 0; d < D; d++) acc += qh[d] * kt[d];
            }
            s[t] = acc * scale;
            top = s[t] > top ? s[t] : top;
        }
        for (int t = 0; t < T; t++) {
            s[t] = expf(s[t] - top);
            total += s[t];
        }
        for (int d = 0; d < D; d++) o[d] = 0.0f;
        for (int t = 0; t < T; t++) {
            size_t at = (size_t)h * vhs + (size_t)t * vts;
            float p = s[t];
            if (bf16) {
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] += p * widen(v, at + d, 1);
            } else {
                const float *vt = (const float *)v + at;
#pragma omp simd
                for (int d = 0; d < D; d++) o[d] += p * vt[d];
            }
        }
        float inverse = 1.0f / total;
        for (int d = 0; d < D; d++) {
            float value = o[d] * inverse;
            if (bf16)
                ((uint16_t *)out)[(size_t)h * D + d] = to_bf16(value);
            else
                ((float *)out)[(size_t)h * D + d] = value;
        }
    }
    free(scores);
    return 0;
}
