/* x @ W^T for a few rows, with W held as bfloat16: y (R, O) = x (R, I) W^T, W (O, I) the bfloat16 bits.
 * Why: a decode step of a few sequences is bound by reading the weights, and a checkpoint stored in
 * bfloat16 (the model card's dtype) loses nothing in that form, so reading it costs half the bytes of the
 * float32 copy the CPU path computes with (and fits in a last-level cache twice as often). Each product
 * and sum is float32: a weight widened to float32 is exactly the float32 weight; only the order of the
 * sum differs from torch's. kernels/fast/linear.py uses it where the weight is exactly bfloat16. */
#include <stdint.h>
#include <string.h>

static inline float bf16_f(uint16_t b)
{
    const uint32_t bits = (uint32_t)b << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

void linear_bf16w_f32(int64_t R, int64_t O, int64_t I, const float *x, int64_t x_stride,
                      const uint16_t *W, float *y, int64_t y_stride)
{
    float wf[I];                                         /* one weight row widened, for rows > 1 */
    for (int64_t o = 0; o < O; ++o) {
        const uint16_t *w = W + o * I;
        if (R == 1) {
            float acc = 0.0f;
#pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < I; ++i)
                acc += bf16_f(w[i]) * x[i];
            y[o] = acc;
            continue;
        }
#pragma omp simd
        for (int64_t i = 0; i < I; ++i)
            wf[i] = bf16_f(w[i]);
        for (int64_t r = 0; r < R; ++r) {                /* the widened row stays in L1 across the rows */
            const float *xr = x + r * x_stride;
            float acc = 0.0f;
#pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < I; ++i)
                acc += wf[i] * xr[i];
            y[r * y_stride + o] = acc;
        }
    }
}
