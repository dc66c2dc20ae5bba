// Gemma-2 text encoder (gemma2.rs), bf16: the element-wise work between its GEMMs, one pass each.
// The unfused candle path runs about 39 kernels a decoder layer, these bring it to 12 (with the GEMMs).
//
// gemma_norm: Gemma's RMSNorm of a row h (D % 8 == 0, one block a row, at most MAXV 8-element vectors a
//   thread; the launcher gives each thread as few as the 1024-thread limit allows):
//   n = bf16((h · rsqrt(mean(h²) + eps)) · sa), in f32 with `sa` = 1 + w in f32 (candle's rms_norm on the f32
//   cast, as transformers' Gemma2RMSNorm computes it; one rounding). With `res`: out_x = bf16(res + n) (the
//   residual add of the rounded values), else out_x = n. With `sb`: out_h = the same norm of the rounded
//   out_x with `sb` (the next norm: post-attention → pre-feed-forward, post-feed-forward → the next layer's
//   input norm or the final norm), so a residual and the norm after it cost one read of the row.
// gemma_rope_split: (B, L, (nh + 2·nkv)·d) q|k|v rows of the fused projection → q (B, nh, L, d) and
//   k (B, nkv, L, d) rotated (rotate-half RoPE, model-dtype cos/sin tables (max_pos, d/2); each product and
//   the sum rounded to bf16, as candle's bf16 rope kernel and torch's bf16 ops round them), v (B, nkv, L, d).
// gemma_softmax: eager attention weights of bf16 scores s (rows, Lk), rows = B·H·Lq (Lq queries, Lk keys;
//   Lq < Lk after a cached prefix):
//   p = softmax(cap · tanh((s · scale) · (1/cap)) + mask) in f32, rounded once to bf16 (cap ≤ 0: no
//   softcap). Each product as its own rounded f32 op (as candle's affine / tanh / add ops, no fma
//   contraction). mask (B, 1, Lq, Lk) additive f32: row r reads mask row (b·Lq + r % Lq), b = r / (H·Lq).
//   One warp a row; `_r16` keeps the row in registers (Lk ≤ 512), the plain kernel makes three passes.
// gemma_gelu_mul: gate|up rows (rows, 2·I) of the fused gate/up projection →
//   bf16(bf16(gelu_tanh(gate)) · up), gelu_tanh in f32 as torch's `gelu(approximate="tanh")` computes it.

template <int MAXV>
__device__ __forceinline__ float sq_sum(const float (&v)[MAXV][8], int nv) {
    float s = 0.0f;
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        if ((int)threadIdx.x + j * (int)blockDim.x < nv) {
#pragma unroll
            for (int i = 0; i < 8; i++) s += v[j][i] * v[j][i];
        }
    }
    return s;
}

template <int MAXV>
__device__ __forceinline__ void gemma_norm(const bf16_t* h, const bf16_t* res, const float* sa, const float* sb,
                                           bf16_t* out_x, bf16_t* out_h, int D, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const int nv = D / 8;
    float v[MAXV][8];
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c < nv) Vec<bf16_t, 8>::load(h + row * D + c * 8, v[j]);
    }
    float r = rsqrtf(block_sum(sq_sum<MAXV>(v, nv), scratch) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c >= nv) continue;
        float w[8], x[8];
        Vec<float, 4>::load(sa + c * 8, w);
        Vec<float, 4>::load(sa + c * 8 + 4, w + 4);
        if (res) Vec<bf16_t, 8>::load(res + row * D + c * 8, x);
#pragma unroll
        for (int i = 0; i < 8; i++) {
            float n = to_f32(from_f32<bf16_t>(__fmul_rn(__fmul_rn(r, v[j][i]), w[i])));
            v[j][i] = res ? to_f32(from_f32<bf16_t>(__fadd_rn(x[i], n))) : n;
        }
        Vec<bf16_t, 8>::store(out_x + row * D + c * 8, v[j]);
    }
    if (!sb) return;
    r = rsqrtf(block_sum(sq_sum<MAXV>(v, nv), scratch) / (float)D + eps);
#pragma unroll
    for (int j = 0; j < MAXV; j++) {
        int c = threadIdx.x + j * blockDim.x;
        if (c >= nv) continue;
        float w[8], o[8];
        Vec<float, 4>::load(sb + c * 8, w);
        Vec<float, 4>::load(sb + c * 8 + 4, w + 4);
#pragma unroll
        for (int i = 0; i < 8; i++) o[i] = __fmul_rn(__fmul_rn(r, v[j][i]), w[i]);
        Vec<bf16_t, 8>::store(out_h + row * D + c * 8, o);
    }
}

extern "C" __global__ void gemma_norm_bf16_m4(const bf16_t* h, const bf16_t* res, const float* sa, const float* sb,
                                              bf16_t* out_x, bf16_t* out_h, int D, float eps) {
    gemma_norm<4>(h, res, sa, sb, out_x, out_h, D, eps);
}

__device__ __forceinline__ float round_bf16(float v) { return to_f32(from_f32<bf16_t>(v)); }

extern "C" __global__ void gemma_rope_split_bf16(const bf16_t* qkv, const bf16_t* cos, const bf16_t* sin, bf16_t* q,
                                                 bf16_t* k, bf16_t* v, int B, int L, int nh, int nkv, int d) {
    const int half = d / 2, heads = nh + 2 * nkv;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * L * heads * half) return;
    const int i = (int)(idx % half);
    long long t = idx / half;
    const int head = (int)(t % heads);
    t /= heads;
    const int l = (int)(t % L), b = (int)(t / L);
    const bf16_t* src = qkv + ((long long)(b * L + l) * heads + head) * d;
    if (head >= nh + nkv) {
        bf16_t* dst = v + (((long long)b * nkv + (head - nh - nkv)) * L + l) * d;
        dst[i] = src[i];
        dst[i + half] = src[i + half];
        return;
    }
    bf16_t* dst = head < nh ? q + (((long long)b * nh + head) * L + l) * d
                            : k + (((long long)b * nkv + (head - nh)) * L + l) * d;
    const float x1 = to_f32(src[i]), x2 = to_f32(src[i + half]);
    const float c = to_f32(cos[l * half + i]), s = to_f32(sin[l * half + i]);
    // bf16 × bf16 is exact in f32, so rounding the f32 product is the bf16 multiply.
    dst[i] = from_f32<bf16_t>(__fsub_rn(round_bf16(__fmul_rn(x1, c)), round_bf16(__fmul_rn(x2, s))));
    dst[i + half] = from_f32<bf16_t>(__fadd_rn(round_bf16(__fmul_rn(x1, s)), round_bf16(__fmul_rn(x2, c))));
}

__device__ __forceinline__ float gemma_logit(const bf16_t* s, const float* m, int c, float scale, float inv_cap,
                                             float cap) {
    float x = __fmul_rn(to_f32(s[c]), scale);
    if (cap > 0.0f) x = __fmul_rn(tanhf(__fmul_rn(x, inv_cap)), cap);
    return __fadd_rn(x, m[c]);
}

// PER > 0: the row's logits stay in registers (L ≤ 32·PER), else they are recomputed in each pass. Both
// sum a lane's elements in the same order, so both give the same bits. L is the key count Lk.
template <int PER>
__device__ __forceinline__ void gemma_softmax(const bf16_t* s, const float* mask, bf16_t* out, long long rows, int H,
                                              int Lq, int L, float scale, float inv_cap, float cap) {
    const long long row = (long long)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const long long b = row / ((long long)H * Lq);
    const int qi = (int)(row % Lq);
    const bf16_t* sr = s + row * L;
    const float* mr = mask + (b * Lq + qi) * L;
    bf16_t* orow = out + row * L;
    float mx = -INFINITY, sum = 0.0f;
    if (PER > 0) {
        float v[PER > 0 ? PER : 1];
#pragma unroll
        for (int j = 0; j < PER; j++) {
            int c = lane + 32 * j;
            v[j] = c < L ? gemma_logit(sr, mr, c, scale, inv_cap, cap) : -INFINITY;
            mx = fmaxf(mx, v[j]);
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
#pragma unroll
        for (int j = 0; j < PER; j++) {
            if (lane + 32 * j < L) {
                v[j] = expf(__fsub_rn(v[j], mx));
                sum += v[j];
            }
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
        const float inv = 1.0f / sum;
#pragma unroll
        for (int j = 0; j < PER; j++) {
            int c = lane + 32 * j;
            if (c < L) orow[c] = from_f32<bf16_t>(__fmul_rn(v[j], inv));
        }
        return;
    }
    for (int c = lane; c < L; c += 32) mx = fmaxf(mx, gemma_logit(sr, mr, c, scale, inv_cap, cap));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
    for (int c = lane; c < L; c += 32) sum += expf(__fsub_rn(gemma_logit(sr, mr, c, scale, inv_cap, cap), mx));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.0f / sum;
    for (int c = lane; c < L; c += 32)
        orow[c] = from_f32<bf16_t>(__fmul_rn(expf(__fsub_rn(gemma_logit(sr, mr, c, scale, inv_cap, cap), mx)), inv));
}

extern "C" __global__ void gemma_softmax_bf16(const bf16_t* s, const float* mask, bf16_t* out, long long rows, int H,
                                              int Lq, int Lk, float scale, float inv_cap, float cap) {
    gemma_softmax<0>(s, mask, out, rows, H, Lq, Lk, scale, inv_cap, cap);
}
extern "C" __global__ void gemma_softmax_bf16_r16(const bf16_t* s, const float* mask, bf16_t* out, long long rows,
                                                  int H, int Lq, int Lk, float scale, float inv_cap, float cap) {
    gemma_softmax<16>(s, mask, out, rows, H, Lq, Lk, scale, inv_cap, cap);
}

extern "C" __global__ void gemma_gelu_mul_bf16(const bf16_t* gu, bf16_t* out, long long rows, int I) {
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int nv = I / 8;
    if (idx >= rows * nv) return;
    const long long r = idx / nv;
    const int c = (int)(idx % nv) * 8;
    float g[8], u[8], o[8];
    Vec<bf16_t, 8>::load(gu + r * 2 * I + c, g);
    Vec<bf16_t, 8>::load(gu + r * 2 * I + I + c, u);
    const float beta = 0.7978845608028654f, kappa = 0.044715f;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        float x = g[i];
        float inner = beta * (x + kappa * (x * x * x));
        o[i] = round_bf16(0.5f * x * (1.0f + tanhf(inner))) * u[i];
    }
    Vec<bf16_t, 8>::store(out + r * I + c, o);
}
