/* Whole pre-norm residual blocks for a few rows, in one call: out = h + mixer(rms_norm(h)).

   Why: at a few rows a block is a handful of small kernels (norm, products, the mixer's own kernel),
   and calling each from Python costs more than it computes (docs/KERNELS.md, "Fused blocks"). These
   functions call the very kernels of the other files in the order model_shards/ runs them, with the
   same inputs, so their outputs are the unfused native path's, bit for bit: each sum below has two
   operands (no reassociation can change it). Dense weights are exact bfloat16 bits packed for
   linear.c's packed kernel (kernels/fast/linear.py packed_bf16), the experts' as they are (bf16_bits);
   activations float32. Scratch is the caller's (sizes in kernels/fast/native.py). */
#include <stdint.h>

void linear_bf16p_f32(int64_t R, int64_t O, int64_t I, const float *x, int64_t x_stride,
                      const uint16_t *Wp, float *y, int64_t y_stride);
void rms_norm_f32(int64_t R, int64_t D, const float *x, int64_t x_stride, const float *w, float eps, float *out);
void gated_rms_norm_f32(int64_t R, int64_t D, int64_t gs, const float *x, int64_t x_stride, const float *z,
                        int64_t z_stride, const float *w, float eps, float *out);
void moe_route_f32(int64_t T, int64_t E, int64_t D, const float *x, int64_t x_stride, const float *Wr,
                   const float *bias, int64_t k, int normalize, float scaling, int64_t *ids, float *weights);
void moe_experts_bf16w_f32(int64_t T, int64_t k, int64_t D, int64_t I, int64_t E, int64_t first,
                           const float *x, int64_t x_stride, const int64_t *ids, const float *weights,
                           const uint16_t *up, const uint16_t *down, float *out);
void mamba_decode_f32(int64_t S, int64_t C, int64_t K, int64_t H, int64_t P, int64_t N, int64_t G,
                      const int64_t *rows, const int64_t *slots,
                      const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride,
                      float *conv, float *ssm, const float *conv_w, const float *conv_b,
                      const float *A, const float *D, const float *dt_bias,
                      float dt_lo, float dt_hi, int clamp,
                      float *y, int64_t y_stride);
void mamba_verify_f32(int64_t S, int64_t T, int64_t C, int64_t K, int64_t H, int64_t P, int64_t N, int64_t G,
                      const int64_t *rows0, const int64_t *slots,
                      const float *xbc, int64_t xbc_stride, const float *dt, int64_t dt_stride,
                      const float *conv, const float *ssm, const float *conv_w, const float *conv_b,
                      const float *A, const float *D, const float *dt_bias,
                      float dt_lo, float dt_hi, int clamp,
                      float *y, int64_t y_stride,
                      float *scratch_conv, float *scratch_cum, float *scratch_dtx, float *scratch_B, int64_t Tmax);
int paged_attention_f32(int64_t S, int64_t H, int64_t Hkv, int64_t Dh, int64_t bs, const int64_t *rows0,
                        const int64_t *lens, const int64_t *starts, const int64_t *const *tables,
                        const float *q, int64_t q_stride, const float *k_new, int64_t k_stride,
                        const float *v_new, int64_t v_stride, float *k_cache, float *v_cache, float scale,
                        float *out, int64_t out_stride);

/* out = a + b, elementwise (its own function: one addition per element, in this order) */
static void __attribute__((noinline)) add_f32(int64_t n, const float *a, const float *b, float *out)
{
    for (int64_t i = 0; i < n; ++i)
        out[i] = a[i] + b[i];
}

/* Latent MoE block (model_shards/moe.py LatentMoE inside layers.py Block), T rows of width D:
     x = rms_norm(h); topk = route(x @ Wr^T); x_lat = x @ fc1^T (L wide; fc1 NULL: x itself, L = D);
     routed = experts(x_lat); routed = routed @ fc2^T (fc2 NULL: as is);
     shared = relu(x @ su^T)^2 @ sd^T (Is wide inside); out = h + (routed + shared).
   h and out (T, D) contiguous rows; scratch: T * (3 * k + 2 * D + 2 * L + Is) floats, 8-byte aligned. */
void moe_block_f32(int64_t T, int64_t D, int64_t L, int64_t I, int64_t E, int64_t k, int64_t Is, int64_t first,
                   const float *h, const float *norm_w, float eps, const float *Wr, const float *bias,
                   int normalize, float scaling, const uint16_t *fc1, const uint16_t *fc2, const uint16_t *up,
                   const uint16_t *down, const uint16_t *su, const uint16_t *sd, float *out, float *scratch)
{
    int64_t *ids = (int64_t *)scratch;                           /* 2 * T * k floats of room, first: aligned */
    float *weights = scratch + 2 * T * k, *x = weights + T * k, *xl = x + T * D, *routed = xl + T * L;
    float *mixed = routed + T * L, *hs = mixed + T * D;
    rms_norm_f32(T, D, h, D, norm_w, eps, x);
    moe_route_f32(T, E, D, x, D, Wr, bias, k, normalize, scaling, ids, weights);
    const float *lat = x;
    if (fc1) {
        linear_bf16p_f32(T, L, D, x, D, fc1, xl, L);
        lat = xl;
    }
    moe_experts_bf16w_f32(T, k, L, I, E, first, lat, L, ids, weights, up, down, routed);
    if (fc2)
        linear_bf16p_f32(T, D, L, routed, L, fc2, mixed, D);     /* mixed = routed back to width D */
    else
        for (int64_t i = 0; i < T * D; ++i)
            mixed[i] = routed[i];
    linear_bf16p_f32(T, Is, D, x, D, su, hs, Is);
    for (int64_t i = 0; i < T * Is; ++i) {
        float v = hs[i] > 0.0f ? hs[i] : 0.0f;
        hs[i] = v * v;
    }
    linear_bf16p_f32(T, D, Is, hs, Is, sd, out, D);              /* out = shared, for now */
    add_f32(T * D, mixed, out, mixed);                           /* routed + shared */
    add_f32(T * D, h, mixed, out);                               /* h + mixer */
}

/* Mamba-2 block for S sequences of T tokens each, sequence s in rows s*T .. s*T+T-1, width D:
     x = rms_norm(h); zxbcdt = x @ Win^T = [z (Di) | xBC (C) | dt (H)]; then either decode steps (T = 1,
     s_cum NULL: conv step + SSD update of the states in slots[s], in place; mamba.c mamba_decode_f32) or
     verification (the states untouched, outputs and the commit's scratch; mamba.c mamba_verify_f32)
     -> y (Di); g = gated_rms_norm(y, z) (groups of gs); out = h + g @ Wout^T.
   scratch: S * T * (D + 3 * Di + C + H) floats. */
void mamba_block_f32(int64_t S, int64_t T, int64_t D, int64_t Di, int64_t C, int64_t K, int64_t H, int64_t P,
                     int64_t N, int64_t G, const int64_t *slots, const float *h, const float *norm_w, float eps,
                     const uint16_t *Win, float *conv, float *ssm, const float *conv_w, const float *conv_b,
                     const float *A, const float *Dp, const float *dt_bias, float dt_lo, float dt_hi, int clamp,
                     const float *gnorm_w, int64_t gs, float geps, const uint16_t *Wout,
                     float *s_conv, float *s_cum, float *s_dtx, float *s_B, int64_t Tmax,
                     float *out, float *scratch)
{
    const int64_t F = Di + C + H, R = S * T;
    float *x = scratch, *zxbcdt = x + R * D, *y = zxbcdt + R * F, *g = y + R * Di;
    int64_t rows[S];
    for (int64_t s = 0; s < S; ++s)
        rows[s] = s * T;
    rms_norm_f32(R, D, h, D, norm_w, eps, x);
    linear_bf16p_f32(R, F, D, x, D, Win, zxbcdt, F);
    if (s_cum)
        mamba_verify_f32(S, T, C, K, H, P, N, G, rows, slots, zxbcdt + Di, F, zxbcdt + Di + C, F, conv, ssm,
                         conv_w, conv_b, A, Dp, dt_bias, dt_lo, dt_hi, clamp, y, Di, s_conv, s_cum, s_dtx, s_B,
                         Tmax);
    else
        mamba_decode_f32(S, C, K, H, P, N, G, rows, slots, zxbcdt + Di, F, zxbcdt + Di + C, F, conv, ssm,
                         conv_w, conv_b, A, Dp, dt_bias, dt_lo, dt_hi, clamp, y, Di);
    gated_rms_norm_f32(R, Di, gs, y, Di, zxbcdt, F, gnorm_w, geps, g);
    linear_bf16p_f32(R, D, Di, g, Di, Wout, x, D);               /* x = the mixer's output */
    add_f32(R * D, h, x, out);
}

/* Attention block (model_shards/attention.py, NoPE, grouped-query) for short chunks: sequence s's rows
   rows0[s] .. rows0[s]+lens[s]-1 at positions starts[s] ..; x = rms_norm(h); q, k, v = x @ Wq^T, Wk^T,
   Wv^T; k, v written into the paged cache and causal attention (attention.c paged_attention_f32) -> a;
   out = h + a @ Wo^T. T rows in all. scratch: T * (D + 2 * H * Dh + 2 * Hkv * Dh) floats.
   Returns paged_attention_f32's code (nonzero: out of memory for the scores). */
int attention_block_f32(int64_t S, int64_t T, int64_t D, int64_t H, int64_t Hkv, int64_t Dh, int64_t bs,
                        const int64_t *rows0, const int64_t *lens, const int64_t *starts,
                        const int64_t *const *tables, const float *h, const float *norm_w, float eps,
                        const uint16_t *Wq, const uint16_t *Wk, const uint16_t *Wv, const uint16_t *Wo,
                        float *k_cache, float *v_cache, float scale, float *out, float *scratch)
{
    const int64_t Q = H * Dh, KV = Hkv * Dh;
    float *x = scratch, *q = x + T * D, *k = q + T * Q, *v = k + T * KV, *a = v + T * KV;
    rms_norm_f32(T, D, h, D, norm_w, eps, x);
    linear_bf16p_f32(T, Q, D, x, D, Wq, q, Q);
    linear_bf16p_f32(T, KV, D, x, D, Wk, k, KV);
    linear_bf16p_f32(T, KV, D, x, D, Wv, v, KV);
    int rc = paged_attention_f32(S, H, Hkv, Dh, bs, rows0, lens, starts, tables, q, Q, k, KV, v, KV, k_cache,
                                 v_cache, scale, a, Q);
    if (rc != 0)
        return rc;
    linear_bf16p_f32(T, D, Q, a, Q, Wo, x, D);                   /* x = the mixer's output */
    add_f32(T * D, h, x, out);
    return 0;
}
