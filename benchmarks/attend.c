/* A decode step's attention over the caches of all 36 layers, rinna_cli/attend.c alone: ms and GB/s read.
 *
 *   cc -O3 -march=native -fopenmp benchmarks/attend.c rinna_cli/attend.c -lm -o /tmp/attend
 *   /tmp/attend TOKENS [BF16=1] [LAYERS=36]
 *
 * rinna's shape (32 heads of 88 values), random keys and values, each layer's cache apart (36 of them are more than
 * a CPU cache holds; a few layers, e.g. 2, time it from the caches), 2 threads, best of 7 passes. Another version's
 * attend.c (git show REV:rinna_cli/attend.c) built the same way times it against this one; -march=x86-64-v3 holds it
 * to AVX2, -march=x86-64 to plain C.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

int rinna_attend(const void *q, const void *k, const void *v, void *out, int H, int T, int D, long qs, long khs,
                 long kts, long vhs, long vts, float scale, int bf16, int threads);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* a random value in [-2, 2) at element i, as float32 or bfloat16 */
static void put_random(char *base, size_t i, int bf16) {
    float f = ((float)rand() / (float)RAND_MAX - 0.5f) * 4.0f;
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if (bf16)
        ((uint16_t *)base)[i] = (uint16_t)(bits >> 16);
    else
        ((float *)base)[i] = f;
}

int main(int argc, char **argv) {
    const int H = 32, D = 88, T = argc > 1 ? atoi(argv[1]) : 1024, bf16 = argc > 2 ? atoi(argv[2]) : 1,
              L = argc > 3 ? atoi(argv[3]) : 36;
    if (T <= 0 || L <= 0) {
        fprintf(stderr, "usage: %s TOKENS [BF16=1] [LAYERS=36]\n", argv[0]);
        return 2;
    }
    const size_t size = bf16 ? 2 : 4, n = (size_t)H * T * D;
    char *k = malloc(n * size * L), *v = malloc(n * size * L), *q = malloc((size_t)H * D * 4),
         *out = malloc((size_t)H * D * 4);
    if (!k || !v || !q || !out) return 1;
    srand(1);
    for (size_t i = 0; i < n * L; i++) {
        put_random(k, i, bf16);
        put_random(v, i, bf16);
    }
    for (int i = 0; i < H * D; i++) put_random(q, (size_t)i, bf16);
    double best = 1e9;
    for (int pass = 0; pass < 7; pass++) {
        double began = now();
        for (int l = 0; l < L; l++)
            rinna_attend(q, k + l * n * size, v + l * n * size, out, H, T, D, D, (long)T * D, D, (long)T * D, D,
                         0.1066f, bf16, 2);
        double took = now() - began;
        best = took < best ? took : best;
    }
    printf("%d tokens, %s, %d layers: %.2f ms, %.1f GB/s\n", T, bf16 ? "bfloat16" : "float32", L, best * 1e3,
           2.0 * (double)(n * size * L) / best / 1e9);
    free(k);
    free(v);
    free(q);
    free(out);
    return 0;
}
