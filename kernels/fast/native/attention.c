/* Attention over the paged KV cache for S sequences' short chunks (decode steps, verification, MTP
 * catch-ups) in one call (kernels/fast/attention.py has the torch forms, kernels/reference/attention.py the
 * definition): write each chunk's k, v at its positions, then each query at position start + t attends
 * causally over positions 0..start + t of its sequence, its KV head shared by H / Hkv query heads (GQA).
 * Shapes (float32): q (T, H*Dh), k_new, v_new (T, Hkv*Dh) with row strides; sequence s's rows are
 * rows0[s] .. rows0[s] + lens[s] - 1, at positions starts[s] ..; k_cache, v_cache (num_blocks, bs, Hkv, Dh)
 * contiguous; tables[s]: its block ids (int64); out (T, H*Dh) at the same rows. Returns -1 when out of
 * memory for the scores, else 0. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int paged_attention_f32(int64_t S, int64_t H, int64_t Hkv, int64_t Dh, int64_t bs, const int64_t *rows0,
                        const int64_t *lens, const int64_t *starts, const int64_t *const *tables,
                        const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                        const float *v_new, int64_t v_stride, float *k_cache, float *v_cache, float scale,
                        float *out, int64_t out_stride)
{
    int64_t longest = 0;
    for (int64_t s = 0; s < S; ++s)
        if (starts[s] + lens[s] > longest)
            longest = starts[s] + lens[s];
    float *scores = malloc(sizeof(float) * (size_t)longest);
    int64_t *cache_rows = malloc(sizeof(int64_t) * (size_t)longest);
    if (!scores || !cache_rows) {
        free(scores);
        free(cache_rows);
        return -1;
    }
    const int64_t R = H / Hkv, width = Hkv * Dh;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t *table = tables[s];
        const int64_t end = starts[s] + lens[s];
        for (int64_t p = 0; p < end; ++p)
            cache_rows[p] = table[p / bs] * bs + p % bs;
        for (int64_t t = 0; t < lens[s]; ++t) {             /* the chunk's keys and values first */
            const int64_t row = rows0[s] + t, at = cache_rows[starts[s] + t];
            memcpy(k_cache + at * width, k_new + row * k_stride, sizeof(float) * (size_t)width);
            memcpy(v_cache + at * width, v_new + row * v_stride, sizeof(float) * (size_t)width);
        }
        for (int64_t t = 0; t < lens[s]; ++t) {
            const int64_t row = rows0[s] + t, last = starts[s] + t;
            for (int64_t h = 0; h < H; ++h) {
                const int64_t g = h / R;
                const float *qh = q + row * q_stride + h * Dh;
                float best = -3.0e38f;
                for (int64_t p = 0; p <= last; ++p) {
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
                for (int64_t p = 0; p <= last; ++p) {
                    scores[p] = expf(scores[p] - best);
                    total += scores[p];
                }
                float *o = out + row * out_stride + h * Dh;
                for (int64_t d = 0; d < Dh; ++d)
                    o[d] = 0.0f;
                for (int64_t p = 0; p <= last; ++p) {
                    const float *vp = v_cache + cache_rows[p] * width + g * Dh;
                    const float w = scores[p] / total;
#pragma omp simd
                    for (int64_t d = 0; d < Dh; ++d)
                        o[d] += w * vp[d];
                }
            }
        }
    }
    free(scores);
    free(cache_rows);
    return 0;
}
