/* One Mamba-2 decode position for each of S sequences, in one pass over each sequence's states:
 * the causal depthwise conv step (its window shifted in place), SiLU, then the SSD update
 *     dt = softplus(dt + dt_bias), clamped;   state = exp(dt A) state + dt x B^T;   y = state C + D x
 * reading and writing each SSM state once. The torch fast path (kernels/fast/conv1d.py conv_step_,
 * kernels/fast/ssd.py ssd_update_) issues ~30 ops and three passes over the states for the same numbers;
 * kernels/fast/native.py builds this file and tests/unit/kernels/test_native_mamba.py checks it against
 * the reference ops.
 *
 * Shapes (float32, row-major, contiguous unless a stride is given):
 *   rows[S], slots[S]     the sequences' rows in xbc/dt/y and their cache slots
 *   xbc (T, C) row stride xbc_stride: conv input, C = H*P + 2*G*N (x, B, C of the SSD after the conv)
 *   dt  (T, H) row stride dt_stride
 *   conv (num_slots, C, K-1): the last K-1 inputs, oldest first;  conv_w (C, K); conv_b (C) or NULL
 *   ssm (num_slots, H, P, N);  A, D, dt_bias (H);  y (T, H*P) row stride y_stride
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

static inline float softplus_f(float v) { return v > 20.0f ? v : log1pf(expf(v)); }   /* torch's threshold */
static inline float silu_f(float v) { return v / (1.0f + expf(-v)); }

void mamba_decode_f32(int64_t S, int64_t C, int64_t K, int64_t H, int64_t P, int64_t N, int64_t G,
                      const int64_t *rows, const int64_t *slots,
                      const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride,
                      float *conv, float *ssm, const float *conv_w, const float *conv_b,
                      const float *A, const float *D, const float *dt_bias,
                      float dt_lo, float dt_hi, int clamp,
                      float *y, int64_t y_stride)
{
    const int64_t W = K - 1, R = H / G, HP = H * P;
    float work[C];                                       /* the conv step's outputs: x, B, C */
    for (int64_t s = 0; s < S; ++s) {
        const float *xr = xbc + rows[s] * xbc_stride;
        float *window = conv + slots[s] * C * W;
        for (int64_t c = 0; c < C; ++c) {                 /* conv step: taps over the window, then shift */
            float *st = window + c * W;
            const float *w = conv_w + c * K;
            float acc = 0.0f;
            for (int64_t k = 0; k < W; ++k)
                acc += w[k] * st[k];
            acc += w[W] * xr[c];
            if (conv_b)
                acc += conv_b[c];
            for (int64_t k = 0; k + 1 < W; ++k)
                st[k] = st[k + 1];
            if (W > 0)
                st[W - 1] = xr[c];
            work[c] = acc;
        }
#pragma omp simd
        for (int64_t c = 0; c < C; ++c)                   /* SiLU apart, so it vectorizes (libmvec's expf) */
            work[c] = silu_f(work[c]);
        const float *x = work, *Bm = work + HP, *Cm = work + HP + G * N;
        const float *dr = dt + rows[s] * dt_stride;
        float *state = ssm + slots[s] * HP * N;
        float *yr = y + rows[s] * y_stride;
        for (int64_t h = 0; h < H; ++h) {
            float d = softplus_f(dr[h] + dt_bias[h]);
            if (clamp)
                d = fminf(fmaxf(d, dt_lo), dt_hi);
            const float decay = expf(d * A[h]);
            const float *Bg = Bm + (h / R) * N, *Cg = Cm + (h / R) * N;
            for (int64_t p = 0; p < P; ++p) {
                const float xv = x[h * P + p], dx = d * xv;
                float *sp = state + (h * P + p) * N;
                float acc = 0.0f;
#pragma omp simd reduction(+:acc)
                for (int64_t n = 0; n < N; ++n) {
                    const float v = sp[n] * decay + dx * Bg[n];
                    sp[n] = v;
                    acc += v * Cg[n];
                }
                yr[h * P + p] = acc + D[h] * xv;
            }
        }
    }
}

/* Verification of T positions (the token and its drafts) for each of S sequences, from their slots' states,
 * which stay as they are: outputs y for every position, and in the slots' scratch what the commit needs to
 * build the state after any position (model_shards/cache.py; kernels/fast/ssd.py ssd_advance_):
 *   scratch_conv (num_slots, Tmax, C, K-1): the conv window after each position
 *   scratch_cum (num_slots, H, Tmax): cum[t] = sum_{i<=t} dt_i A;  scratch_dtx (num_slots, H, Tmax, P): dt_t x_t
 *   scratch_B (num_slots, Tmax, G, N)
 * The SSD runs as its recurrence, one (head, p) row of N state values at a time in registers: the same
 * numbers as ssd_verify's dual form (kernels/fast/ssd.py) up to rounding, without a T x T decay matrix.
 * rows0[s]: the row of sequence s's first position (its T rows are consecutive). */
void mamba_verify_f32(int64_t S, int64_t T, int64_t C, int64_t K, int64_t H, int64_t P, int64_t N, int64_t G,
                      const int64_t *rows0, const int64_t *slots,
                      const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride,
                      const float *conv, const float *ssm, const float *conv_w, const float *conv_b,
                      const float *A, const float *D, const float *dt_bias,
                      float dt_lo, float dt_hi, int clamp,
                      float *y, int64_t y_stride,
                      float *scratch_conv, float *scratch_cum, float *scratch_dtx, float *scratch_B, int64_t Tmax)
{
    const int64_t W = K - 1, R = H / G, HP = H * P, GN = G * N;
    float work[T * C];                                   /* conv outputs per position: x, B, C */
    float inputs[W + T];                                 /* one channel's window and new inputs */
    float dts[T], decays[T], state[N];
    for (int64_t s = 0; s < S; ++s) {
        const int64_t slot = slots[s];
        const float *window = conv + slot * C * W;
        for (int64_t c = 0; c < C; ++c) {
            const float *w = conv_w + c * K;
            for (int64_t k = 0; k < W; ++k)
                inputs[k] = window[c * W + k];
            for (int64_t t = 0; t < T; ++t)
                inputs[W + t] = xbc[(rows0[s] + t) * xbc_stride + c];
            for (int64_t t = 0; t < T; ++t) {
                float acc = 0.0f;
                for (int64_t k = 0; k <= W; ++k)
                    acc += w[k] * inputs[t + k];
                if (conv_b)
                    acc += conv_b[c];
                work[t * C + c] = acc;
                float *kept = scratch_conv + ((slot * Tmax + t) * C + c) * W;
                for (int64_t k = 0; k < W; ++k)
                    kept[k] = inputs[t + 1 + k];
            }
        }
#pragma omp simd
        for (int64_t i = 0; i < T * C; ++i)
            work[i] = silu_f(work[i]);
        for (int64_t t = 0; t < T; ++t)
            for (int64_t i = 0; i < GN; ++i)
                scratch_B[(slot * Tmax + t) * GN + i] = work[t * C + HP + i];
        const float *st0 = ssm + slot * HP * N;
        for (int64_t h = 0; h < H; ++h) {
            float cum = 0.0f;
            for (int64_t t = 0; t < T; ++t) {
                float d = softplus_f(dt[(rows0[s] + t) * dt_stride + h] + dt_bias[h]);
                if (clamp)
                    d = fminf(fmaxf(d, dt_lo), dt_hi);
                dts[t] = d;
                decays[t] = expf(d * A[h]);
                cum += d * A[h];
                scratch_cum[(slot * H + h) * Tmax + t] = cum;
            }
            const int64_t g = h / R;
            for (int64_t p = 0; p < P; ++p) {
                const float *sp = st0 + (h * P + p) * N;
                for (int64_t n = 0; n < N; ++n)
                    state[n] = sp[n];
                for (int64_t t = 0; t < T; ++t) {
                    const float *wt = work + t * C;
                    const float xv = wt[h * P + p], dx = dts[t] * xv, decay = decays[t];
                    const float *Bg = wt + HP + g * N, *Cg = wt + HP + GN + g * N;
                    scratch_dtx[((slot * H + h) * Tmax + t) * P + p] = dx;
                    float acc = 0.0f;
#pragma omp simd reduction(+:acc)
                    for (int64_t n = 0; n < N; ++n) {
                        const float v = state[n] * decay + dx * Bg[n];
                        state[n] = v;
                        acc += v * Cg[n];
                    }
                    y[(rows0[s] + t) * y_stride + h * P + p] = acc + D[h] * xv;
                }
            }
        }
    }
}

/* The commit after verification, for S sequences and all L Mamba layers of a stage in one call
 * (model_shards/cache.py MambaStateCache.commit; kernels/fast/ssd.py ssd_advance_ is the torch form): each
 * slot's state becomes the state after its verified position `index`:
 *   conv = the window kept after that position;
 *   ssm  = exp(cum[index]) ssm + sum_{j<=index} exp(cum[index] - cum[j]) dtx_j B_j^T
 * All tensors whole and contiguous: conv (L, num_slots, C, K-1), ssm (L, num_slots, H, P, N), and the
 * scratch: conv (L, num_slots, Tmax, C, K-1), cum (L, num_slots, H, Tmax), dtx (L, num_slots, H, Tmax, P),
 * B (L, num_slots, Tmax, G, N). */
void mamba_commit_f32(int64_t S, int64_t L, int64_t num_slots, int64_t C, int64_t K, int64_t H, int64_t P,
                      int64_t N, int64_t G, int64_t Tmax, const int64_t *slots, const int64_t *indices,
                      float *conv, float *ssm, const float *s_conv, const float *s_cum, const float *s_dtx,
                      const float *s_B)
{
    const int64_t W = K - 1, R = H / G;
    for (int64_t s = 0; s < S; ++s) {
        const int64_t slot = slots[s], index = indices[s];
        for (int64_t l = 0; l < L; ++l) {
            const int64_t ls = l * num_slots + slot;
            memcpy(conv + ls * C * W, s_conv + (ls * Tmax + index) * C * W, sizeof(float) * (size_t)(C * W));
            float *state = ssm + ls * H * P * N;
            for (int64_t h = 0; h < H; ++h) {
                const float *cum = s_cum + (ls * H + h) * Tmax;
                const float last = cum[index], decay = expf(last);
                float w[Tmax];
                for (int64_t j = 0; j <= index; ++j)
                    w[j] = expf(last - cum[j]);
                const int64_t g = h / R;
                for (int64_t p = 0; p < P; ++p) {
                    float *sp = state + (h * P + p) * N;
#pragma omp simd
                    for (int64_t n = 0; n < N; ++n)
                        sp[n] *= decay;
                    for (int64_t j = 0; j <= index; ++j) {
                        const float u = s_dtx[((ls * H + h) * Tmax + j) * P + p] * w[j];
                        const float *Bj = s_B + ((ls * Tmax + j) * G + g) * N;
#pragma omp simd
                        for (int64_t n = 0; n < N; ++n)
                            sp[n] += u * Bj[n];
                    }
                }
            }
        }
    }
}
