/* x @ W^T for a few rows, with W held as bfloat16: y (R, O) = x (R, I) W^T, W (O, I) the bfloat16 bits.
 * Why: a decode step of a few sequences is bound by reading the weights, and a checkpoint stored in
 * bfloat16 (the model card's dtype) loses nothing in that form, so reading it costs half the bytes of the
 * float32 copy the CPU path computes with (and fits in a last-level cache twice as often). Each product
 * and sum is float32: a weight widened to float32 is exactly the float32 weight; only the order of the
 * sum differs from torch's. kernels/fast/linear.py uses it where the weight is exactly bfloat16. */
#include "bf16.h"

void linear_bf16w_f32(int64_t R, int64_t O, int64_t I, const float *x, int64_t x_stride,
                      const uint16_t *W, float *y, int64_t y_stride)
{
    const float *xs[R];
    for (int64_t r = 0; r < R; ++r)
        xs[r] = x + r * x_stride;
    for (int64_t o = 0; o < O; ++o) {                    /* a weight row stays in L1 across the rows */
        for (int64_t r = 0; r < R; r += 4) {             /* four rows per pass over it */
            const int64_t n = R - r < 4 ? R - r : 4;
            float acc[4];
            dots_bf16(W + o * I, I, xs + r, n, acc);
            for (int64_t m = 0; m < n; ++m)
                y[(r + m) * y_stride + o] = acc[m];
        }
    }
}
