/* bfloat16 weights read as float32, and the few-rows dot products over them (linear.c, moe.c). */
#ifndef HYBRIDSERVE_BF16_H
#define HYBRIDSERVE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_f(uint16_t b)
{
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* out[m] = sum_i bf16(w[i]) * xs[m][i] for m < n (n <= 4), the four rows in one pass over w: each weight
 * element is read and widened once for all of them (a short group repeats its last row, unused). */
static inline void dots_bf16(const uint16_t *w, int64_t I, const float *const *xs, int64_t n, float *out)
{
    const float *x0 = xs[0], *x1 = xs[n > 1 ? 1 : 0], *x2 = xs[n > 2 ? 2 : 0], *x3 = xs[n > 3 ? 3 : 0];
    float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
    if (n == 1) {
#pragma omp simd reduction(+:a0)
        for (int64_t i = 0; i < I; ++i)
            a0 += bf16_f(w[i]) * x0[i];
        out[0] = a0;
        return;
    }
#pragma omp simd reduction(+:a0, a1, a2, a3)
    for (int64_t i = 0; i < I; ++i) {
        const float wi = bf16_f(w[i]);
        a0 += wi * x0[i];
        a1 += wi * x1[i];
        a2 += wi * x2[i];
        a3 += wi * x3[i];
    }
    const float acc[4] = {a0, a1, a2, a3};
    for (int64_t m = 0; m < n; ++m)
        out[m] = acc[m];
}
#endif
