/* x @ W^T for up to a few tens of rows, with W held as bfloat16: y (R, O) = x (R, I) W^T.
 * Why: a decode step of a few sequences is bound by reading the weights, and a checkpoint stored in
 * bfloat16 (the model card's dtype) loses nothing in that form, so reading it costs half the bytes of the
 * float32 copy the CPU path computes with (and fits in a last-level cache twice as often). Each product
 * and sum is float32: a weight widened to float32 is exactly the float32 weight; only the order of the
 * sum differs from torch's. kernels/fast/linear.py uses it where the weight is exactly bfloat16. */
#include "bf16.h"

/* W packed for it: Wp (ceil(O/16), I, 16) holds W's bfloat16 bits sixteen output features at a time,
 * feature-minor (kernels/fast/linear.py packs it once per weight; a last block past O is zeros). Why: each
 * step along I then loads 16 consecutive weights as one vector and multiplies it by one x element per row, so the sums of eight rows x sixteen features stay in sixteen-lane registers and no
 * sum is reduced across lanes. Weights are read once per eight rows (from L1: a block is 32 I bytes) and
 * from memory once per call (`python -m benchmarks.linear` compares it with oneDNN's float32 GEMM on its
 * own reordered weight). Each output is the plain float32 sum over I. */
typedef float v16f __attribute__((vector_size(64)));
typedef uint32_t v16u __attribute__((vector_size(64)));
typedef uint16_t v16h __attribute__((vector_size(32)));

static inline v16f widen16(const uint16_t *p)
{
    v16h h;
    memcpy(&h, p, sizeof h);
    const v16u u = __builtin_convertvector(h, v16u) << 16;
    v16f f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#define PACKED_ROWS 8                                    /* rows sharing one pass over a weight block */

/* acc[r] = sum_i x[r][i] * w[i][0..15] for r < NR: NR a constant at each call site (the switch below), so
 * the NR accumulators live in registers whatever the batch's remainder is (one row: a decode step). */
static inline __attribute__((always_inline)) void block_rows(const int NR, int64_t I, const float *xr,
                                                             int64_t x_stride, const uint16_t *w, v16f *acc)
{
    for (int r = 0; r < NR; ++r)
        acc[r] = (v16f){0};
    for (int64_t i = 0; i < I; ++i) {
        const v16f wv = widen16(w + i * 16);
        for (int r = 0; r < NR; ++r)
            acc[r] += xr[r * x_stride + i] * wv;
    }
}

void linear_bf16p_f32(int64_t R, int64_t O, int64_t I, const float *x, int64_t x_stride,
                      const uint16_t *Wp, float *y, int64_t y_stride)
{
    for (int64_t ob = 0; ob * 16 < O; ++ob) {
        const uint16_t *w = Wp + ob * I * 16;
        const int64_t width = O - ob * 16 < 16 ? O - ob * 16 : 16;
        for (int64_t r0 = 0; r0 < R; r0 += PACKED_ROWS) {
            const int64_t n = R - r0 < PACKED_ROWS ? R - r0 : PACKED_ROWS;
            const float *xr = x + r0 * x_stride;
            v16f acc[PACKED_ROWS];
            switch (n) {
            case 1: block_rows(1, I, xr, x_stride, w, acc); break;
            case 2: block_rows(2, I, xr, x_stride, w, acc); break;
            case 3: block_rows(3, I, xr, x_stride, w, acc); break;
            case 4: block_rows(4, I, xr, x_stride, w, acc); break;
            case 5: block_rows(5, I, xr, x_stride, w, acc); break;
            case 6: block_rows(6, I, xr, x_stride, w, acc); break;
            case 7: block_rows(7, I, xr, x_stride, w, acc); break;
            default: block_rows(8, I, xr, x_stride, w, acc); break;
            }
            for (int64_t r = 0; r < n; ++r)
                memcpy(y + (r0 + r) * y_stride + ob * 16, &acc[r], (size_t)width * sizeof(float));
        }
    }
}
