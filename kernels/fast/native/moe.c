/* The latent MoE of a few rows (kernels/reference/moe.py is the definition; kernels/fast/moe.py the torch
 * form): the sigmoid router's top-k and the chosen relu² experts, each in one call.
 *   moe_route:   scores = sigmoid(x W_r^T) (T, E); the k largest of scores + bias (the bias chooses, never
 *                weighs; ties: the lower expert id), weights = their scores, normalised to sum 1 if asked,
 *                times `scaling`. ids sorted by choice value, largest first (torch.topk(sorted=True)).
 *   moe_experts: out (T, D) = sum over row t's choices of this shard's experts (first .. first+E-1)
 *                w * down_e(relu(up_e x_t)^2), with up (E, I, D) and down (E, D, I) as bfloat16 bits
 *                (exact: a checkpoint stored in bfloat16), float32 products and sums; expert by expert,
 *                each weight row widened once for all the rows that chose the expert. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

void moe_route_f32(int64_t T, int64_t E, int64_t D, const float *x, int64_t x_stride, const float *Wr,
                   const float *bias, int64_t k, int normalize, float scaling, int64_t *ids, float *weights)
{
    float scores[E], choice[E];
    char taken[E];                                        /* not -inf: compiled with finite math */
    for (int64_t t = 0; t < T; ++t) {
        const float *xr = x + t * x_stride;
        for (int64_t e = 0; e < E; ++e) {
            const float *w = Wr + e * D;
            float acc = 0.0f;
#pragma omp simd reduction(+:acc)
            for (int64_t i = 0; i < D; ++i)
                acc += xr[i] * w[i];
            scores[e] = 1.0f / (1.0f + expf(-acc));
            choice[e] = bias ? scores[e] + bias[e] : scores[e];
            taken[e] = 0;
        }
        float sum = 0.0f;
        for (int64_t j = 0; j < k; ++j) {               /* k rounds of arg-max: k and E are small */
            int64_t best = -1;
            for (int64_t e = 0; e < E; ++e)
                if (!taken[e] && (best < 0 || choice[e] > choice[best]))
                    best = e;
            ids[t * k + j] = best;
            weights[t * k + j] = scores[best];
            sum += scores[best];
            taken[best] = 1;
        }
        for (int64_t j = 0; j < k; ++j) {
            float w = weights[t * k + j];
            if (normalize)
                w = w / (sum + 1e-20f);
            weights[t * k + j] = w * scaling;
        }
    }
}

void moe_experts_bf16w_f32(int64_t T, int64_t k, int64_t D, int64_t I, int64_t E, int64_t first,
                           const float *x, int64_t x_stride, const int64_t *ids, const float *weights,
                           const uint16_t *up, const uint16_t *down, float *out)
{
    float h[T * I];
    int64_t rows[T];
    float gate[T];
    for (int64_t i = 0; i < T * D; ++i)
        out[i] = 0.0f;
    for (int64_t e = 0; e < E; ++e) {
        int64_t n = 0;                                     /* the rows that chose expert e */
        for (int64_t t = 0; t < T; ++t)
            for (int64_t j = 0; j < k; ++j)
                if (ids[t * k + j] - first == e) {
                    rows[n] = t;
                    gate[n++] = weights[t * k + j];
                }
        if (n == 0)
            continue;
        const uint16_t *u = up + e * I * D, *dn = down + e * D * I;
        const float *xs[n], *hs[n];
        for (int64_t m = 0; m < n; ++m) {
            xs[m] = x + rows[m] * x_stride;
            hs[m] = h + m * I;
        }
        float acc[4];
        for (int64_t i = 0; i < I; ++i)                    /* h = relu(up_e x)^2 * gate, four rows at a time */
            for (int64_t m0 = 0; m0 < n; m0 += 4) {
                const int64_t nn = n - m0 < 4 ? n - m0 : 4;
                dots_bf16(u + i * D, D, xs + m0, nn, acc);
                for (int64_t q = 0; q < nn; ++q) {
                    const float a = acc[q] > 0.0f ? acc[q] : 0.0f;
                    h[(m0 + q) * I + i] = a * a * gate[m0 + q];
                }
            }
        for (int64_t d = 0; d < D; ++d)                    /* out += down_e h */
            for (int64_t m0 = 0; m0 < n; m0 += 4) {
                const int64_t nn = n - m0 < 4 ? n - m0 : 4;
                dots_bf16(dn + d * I, I, hs + m0, nn, acc);
                for (int64_t q = 0; q < nn; ++q)
                    out[rows[m0 + q] * D + d] += acc[q];
            }
    }
}
