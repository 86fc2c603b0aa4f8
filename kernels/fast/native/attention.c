/* Decode attention over the paged KV cache for S sequences, one new token each, in one call
 * (kernels/fast/attention.py decode_attention is the torch form, kernels/reference/attention.py the
 * definition): write each token's k, v at its position, then each query head attends over positions
 * 0..pos of its sequence, its KV head shared by H / Hkv query heads (GQA).
 * Shapes (float32): q (T, H*Dh), k_new, v_new (T, Hkv*Dh) rows `rows[s]` (row strides given);
 * k_cache, v_cache (num_blocks, bs, Hkv, Dh) contiguous; tables[s]: sequence s's block ids (int64);
 * out (T, H*Dh) at the same rows. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int decode_attention_f32(int64_t S, int64_t H, int64_t Hkv, int64_t Dh, int64_t bs, const int64_t *rows,
                         const int64_t *const *tables, const int64_t *positions,
                         const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                         const float *v_new, int64_t v_stride, float *k_cache, float *v_cache, float scale,
                         float *out, int64_t out_stride)
{
    int64_t longest = 0;
    for (int64_t s = 0; s < S; ++s)
        if (positions[s] + 1 > longest)
            longest = positions[s] + 1;
    float *scores = malloc(sizeof(float) * (size_t)longest);
    int64_t *cache_rows = malloc(sizeof(int64_t) * (size_t)longest);
    if (!scores || !cache_rows) {
        free(scores);
        free(cache_rows);
        return -1;
    }
    const int64_t R = H / Hkv, width = Hkv * Dh;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t pos = positions[s], row = rows[s];
        const int64_t *table = tables[s];
        for (int64_t p = 0; p <= pos; ++p)
            cache_rows[p] = table[p / bs] * bs + p % bs;
        memcpy(k_cache + cache_rows[pos] * width, k_new + row * k_stride, sizeof(float) * (size_t)width);
        memcpy(v_cache + cache_rows[pos] * width, v_new + row * v_stride, sizeof(float) * (size_t)width);
        for (int64_t h = 0; h < H; ++h) {
            const int64_t g = h / R;
            const float *qh = q + row * q_stride + h * Dh;
            float best = -3.0e38f;
            for (int64_t p = 0; p <= pos; ++p) {
                const float *kp = k_cache + cache_rows[p] * width + g * Dh;
                float acc = 0.0f;
#pragma omp simd reduction(+:acc)
                for (int64_t d = 0; d < Dh; ++d)
                    acc += qh[d] * kp[d];
                scores[p] = acc * scale;
                if (scores[p] > best)
                    best = scores[p];
            }
            float total = 0.0f;
#pragma omp simd reduction(+:total)
            for (int64_t p = 0; p <= pos; ++p) {
                scores[p] = expf(scores[p] - best);
                total += scores[p];
            }
            float *o = out + row * out_stride + h * Dh;
            for (int64_t d = 0; d < Dh; ++d)
                o[d] = 0.0f;
            for (int64_t p = 0; p <= pos; ++p) {
                const float *vp = v_cache + cache_rows[p] * width + g * Dh;
                const float w = scores[p] / total;
#pragma omp simd
                for (int64_t d = 0; d < Dh; ++d)
                    o[d] += w * vp[d];
            }
        }
    }
    free(scores);
    free(cache_rows);
    return 0;
}
