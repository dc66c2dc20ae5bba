// Norms and modulation of the Sana block and the DC-AE decoder, one pass each, f32 statistics.
//
// ln_modulate: LayerNorm without affine over the last dim D (two-pass mean/variance, like
//   `layer_norm_no_affine`), then `· (1 + scale) + shift`, where scale/shift are rows of the AdaLN table
//   plus the timestep embedding: `table[i] + temb6[b, i]` (table (6, D), temb6 (B, 6·D)). One block a row.
// gated_residual: `x + y · (table[i] + temb6[b, i])` (the gate_msa / gate_mlp residuals).
// rms_nchw: diffusers `RMSNorm(C, eps, weight, bias)` over the channels of an NCHW tensor (the DC-AE
//   ResBlock's `norm(x.movedim(1, -1)).movedim(-1, 1)`), plus an optional residual, with no layout copies.
//   One thread a pixel; channels strided by H·W, coalesced across the warp.

template <typename T>
__device__ __forceinline__ void ln_modulate(const T* __restrict__ x, const T* __restrict__ table,
                                            const T* __restrict__ temb6, T* __restrict__ out,
                                            int rows_per_batch, int D, int shift_i, int scale_i,
                                            float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const int b = (int)(row / rows_per_batch);
    const T* xr = x + row * D;
    float s = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) s += to_f32(xr[i]);
    const float mean = block_sum(s, scratch) / D;
    float s2 = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float c = to_f32(xr[i]) - mean;
        s2 += c * c;
    }
    const float rstd = rsqrtf(block_sum(s2, scratch) / D + eps);
    const T* tb = temb6 + (long long)b * 6 * D;
    for (int i = threadIdx.x; i < D; i += blockDim.x) {
        float shift = to_f32(table[shift_i * D + i]) + to_f32(tb[shift_i * D + i]);
        float scale = to_f32(table[scale_i * D + i]) + to_f32(tb[scale_i * D + i]);
        float h = (to_f32(xr[i]) - mean) * rstd;
        out[row * D + i] = from_f32<T>(h * (1.f + scale) + shift);
    }
}

template <typename T>
__device__ __forceinline__ void gated_residual(const T* __restrict__ x, const T* __restrict__ y,
                                               const T* __restrict__ table,
                                               const T* __restrict__ temb6, T* __restrict__ out,
                                               long long total, int rows_per_batch, int D,
                                               int gate_i) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= total) return;
    int d = (int)(idx % D);
    int b = (int)(idx / ((long long)D * rows_per_batch));
    float gate = to_f32(table[gate_i * D + d]) + to_f32(temb6[(long long)b * 6 * D + gate_i * D + d]);
    out[idx] = from_f32<T>(to_f32(x[idx]) + to_f32(y[idx]) * gate);
}

template <typename T>
__device__ __forceinline__ void rms_nchw(const T* __restrict__ h, const T* __restrict__ w,
                                         const T* __restrict__ bias, const T* __restrict__ res,
                                         T* __restrict__ out, int B, int C, long long HW, float eps) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * HW) return;
    long long b = idx / HW, p = idx % HW;
    const long long base = b * C * HW + p;
    float ss = 0.f;
    for (int c = 0; c < C; c++) {
        float v = to_f32(h[base + c * HW]);
        ss = fmaf(v, v, ss);
    }
    const float r = rsqrtf(ss / C + eps);
    for (int c = 0; c < C; c++) {
        long long o = base + c * HW;
        // diffusers RMSNorm: normalise in f32, round to the weight dtype, then · weight (+ bias).
        float v = to_f32(from_f32<T>(to_f32(h[o]) * r)) * to_f32(w[c]);
        if (bias) v += to_f32(bias[c]);
        if (res) v += to_f32(res[o]);
        out[o] = from_f32<T>(v);
    }
}

#define NORMS(SUFFIX, T)                                                                          \
    extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const T* table, const T* temb6,  \
                                                    T* out, int rows_per_batch, int D,           \
                                                    int shift_i, int scale_i, float eps) {       \
        ln_modulate<T>(x, table, temb6, out, rows_per_batch, D, shift_i, scale_i, eps);           \
    }                                                                                             \
    extern "C" __global__ void gated_residual_##SUFFIX(const T* x, const T* y, const T* table,   \
                                                       const T* temb6, T* out, long long total,  \
                                                       int rows_per_batch, int D, int gate_i) {  \
        gated_residual<T>(x, y, table, temb6, out, total, rows_per_batch, D, gate_i);             \
    }                                                                                             \
    extern "C" __global__ void rms_nchw_##SUFFIX(const T* h, const T* w, const T* bias,          \
                                                 const T* res, T* out, int B, int C,             \
                                                 long long HW, float eps) {                      \
        rms_nchw<T>(h, w, bias, res, out, B, C, HW, eps);                                         \
    }

NORMS(bf16, bf16_t)
NORMS(f32, float)

// Softmax over the last dim of f32 scores (rows, T) after `· scale + mask[b]` (mask: (B, T) additive f32,
// b = row / rows_per_batch), written in the output dtype: the cross-attention's scale, mask add, softmax and
// cast in one pass (candle: four). One warp a row; exp via expf (not the SFU approximation).
template <typename T>
__device__ __forceinline__ void masked_softmax(const float* __restrict__ s, const float* __restrict__ mask,
                                               T* __restrict__ out, long long rows, int rows_per_batch,
                                               int Tn, float scale) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const float* sr = s + row * Tn;
    const float* mr = mask + (row / rows_per_batch) * Tn;
    float m = -INFINITY;
    for (int j = lane; j < Tn; j += 32) m = fmaxf(m, sr[j] * scale + mr[j]);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float sum = 0.f;
    for (int j = lane; j < Tn; j += 32) sum += expf(sr[j] * scale + mr[j] - m);
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    const float inv = 1.f / sum;
    for (int j = lane; j < Tn; j += 32) out[row * Tn + j] = from_f32<T>(expf(sr[j] * scale + mr[j] - m) * inv);
}

extern "C" __global__ void masked_softmax_bf16(const float* s, const float* mask, bf16_t* out, long long rows,
                                               int rows_per_batch, int Tn, float scale) {
    masked_softmax<bf16_t>(s, mask, out, rows, rows_per_batch, Tn, scale);
}
extern "C" __global__ void masked_softmax_f32(const float* s, const float* mask, float* out, long long rows,
                                              int rows_per_batch, int Tn, float scale) {
    masked_softmax<float>(s, mask, out, rows, rows_per_batch, Tn, scale);
}
