/* RMSNorm and Mamba's gated grouped RMSNorm, one call over all rows (kernels/fast/norm.py has the torch
 * form, kernels/reference/norm.py the definition):
 *   rms_norm:        out = x / sqrt(mean(x^2) + eps) * w                       x (R, D), w (D)
 *   gated_rms_norm:  h = x * silu(z), normalised per group of gs channels, * w  x, z (R, D)
 * float32 throughout; rows may be strided (x_stride, z_stride), out is (R, D) contiguous. */
#include <math.h>
#include <stdint.h>

static inline float silu_f(float v) { return v / (1.0f + expf(-v)); }

void rms_norm_f32(int64_t R, int64_t D, const float *x, int64_t x_stride, const float *w, float eps, float *out)
{
    for (int64_t r = 0; r < R; ++r) {
        const float *xr = x + r * x_stride;
        float *o = out + r * D;
        float ss = 0.0f;
#pragma omp simd reduction(+:ss)
        for (int64_t i = 0; i < D; ++i)
            ss += xr[i] * xr[i];
        const float scale = 1.0f / sqrtf(ss / (float)D + eps);
#pragma omp simd
        for (int64_t i = 0; i < D; ++i)
            o[i] = xr[i] * scale * w[i];
    }
}

void gated_rms_norm_f32(int64_t R, int64_t D, int64_t gs, const float *x, int64_t x_stride, const float *z,
                        int64_t z_stride, const float *w, float eps, float *out)
{
    for (int64_t r = 0; r < R; ++r) {
        const float *xr = x + r * x_stride, *zr = z + r * z_stride;
        float *o = out + r * D;
#pragma omp simd
        for (int64_t i = 0; i < D; ++i)
            o[i] = xr[i] * silu_f(zr[i]);
        for (int64_t g0 = 0; g0 < D; g0 += gs) {
            float ss = 0.0f;
#pragma omp simd reduction(+:ss)
            for (int64_t i = g0; i < g0 + gs; ++i)
                ss += o[i] * o[i];
            const float scale = 1.0f / sqrtf(ss / (float)gs + eps);
#pragma omp simd
            for (int64_t i = g0; i < g0 + gs; ++i)
                o[i] = o[i] * scale * w[i];
        }
    }
}
