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

// In place on an NCHW tensor: x[b, c, p] = act(x[b, c, p] + bias[c]), act = identity or SiLU. The conv
// bias (and the ResBlock's SiLU) after cuDNN, in one vectorised pass (candle's broadcast add of a
// (1, C, 1, 1) bias walks strided indices). HW % V == 0 for the vector form.
template <typename T, int V>
__device__ __forceinline__ void bias_act_nchw(T* __restrict__ x, const T* __restrict__ bias, long long total,
                                              int C, long long HW, int silu) {
    long long idx = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (idx >= total) return;
    int c = (int)((idx / HW) % C);
    float b = bias ? to_f32(bias[c]) : 0.f;
    float v[V];
    Vec<T, V>::load(x + idx, v);
#pragma unroll
    for (int e = 0; e < V; e++) {
        float t = v[e] + b;
        v[e] = silu ? silu_f(t) : t;
    }
    Vec<T, V>::store(x + idx, v);
}

extern "C" __global__ void bias_act_nchw_bf16_v8(bf16_t* x, const bf16_t* bias, long long total, int C, long long HW, int silu) {
    bias_act_nchw<bf16_t, 8>(x, bias, total, C, HW, silu);
}
extern "C" __global__ void bias_act_nchw_bf16_v1(bf16_t* x, const bf16_t* bias, long long total, int C, long long HW, int silu) {
    bias_act_nchw<bf16_t, 1>(x, bias, total, C, HW, silu);
}
extern "C" __global__ void bias_act_nchw_f32_v4(float* x, const float* bias, long long total, int C, long long HW, int silu) {
    bias_act_nchw<float, 4>(x, bias, total, C, HW, silu);
}
extern "C" __global__ void bias_act_nchw_f32_v1(float* x, const float* bias, long long total, int C, long long HW, int silu) {
    bias_act_nchw<float, 1>(x, bias, total, C, HW, silu);
}

// Row-broadcast bias (+ residual) on a contiguous (rows, N) tensor: out[r, n] = act(y[r, n] + bias[n] (+ res[r, n])),
// act = identity or SiLU. The bias of every linear layer (candle: matmul, then a strided broadcast add), the
// residual after it, and GLUMBConv's `silu(expand(x) + b)` before its depthwise conv (applied once per
// element here rather than k² times inside the conv, where the SFU's exp and reciprocal were the limit).
template <typename T, int V>
__device__ __forceinline__ void bias_rows(const T* __restrict__ y, const T* __restrict__ bias,
                                          const T* __restrict__ res, T* __restrict__ out, long long total, int N,
                                          int silu) {
    long long idx = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (idx >= total) return;
    int n = (int)(idx % N);
    float v[V], b[V], r[V];
    Vec<T, V>::load(y + idx, v);
    Vec<T, V>::load(bias + n, b);
    if (res) Vec<T, V>::load(res + idx, r);
#pragma unroll
    for (int e = 0; e < V; e++) {
        float t = v[e] + b[e] + (res ? r[e] : 0.f);
        v[e] = silu ? silu_f(t) : t;
    }
    Vec<T, V>::store(out + idx, v);
}

#define BIAS_ROWS(NAME, T, V)                                                                            \
    extern "C" __global__ void NAME(const T* y, const T* bias, const T* res, T* out, long long total, int N, \
                                    int silu) {                                                          \
        bias_rows<T, V>(y, bias, res, out, total, N, silu);                                               \
    }
BIAS_ROWS(bias_rows_bf16_v8, bf16_t, 8)
BIAS_ROWS(bias_rows_bf16_v1, bf16_t, 1)
BIAS_ROWS(bias_rows_f32_v4, float, 4)
BIAS_ROWS(bias_rows_f32_v1, float, 1)

// (P, A, C, D) -> (P, C, A, D), contiguous in and out, with a dtype change on the way: split or merge
// heads (`(B, N, H, d) <-> (B, H, N, d)`) in one coalesced pass, V elements of D per thread.
template <typename Ti, typename To, int V>
__device__ __forceinline__ void permute0213(const Ti* __restrict__ in, To* __restrict__ out, int P, int A,
                                            int C, int D) {
    long long idx = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    long long total = (long long)P * A * C * D;
    if (idx >= total) return;
    int d0 = (int)(idx % D);
    long long r = idx / D;
    int a = (int)(r % A);
    r /= A;
    int c = (int)(r % C);
    long long p = r / C;
    float v[V];
    Vec<Ti, V>::load(in + ((p * A + a) * C + c) * D + d0, v);
    Vec<To, V>::store(out + idx, v);
}

extern "C" __global__ void permute0213_bf16_f32_v4(const bf16_t* in, float* out, int P, int A, int C, int D) {
    permute0213<bf16_t, float, 4>(in, out, P, A, C, D);
}
extern "C" __global__ void permute0213_bf16_bf16_v8(const bf16_t* in, bf16_t* out, int P, int A, int C, int D) {
    permute0213<bf16_t, bf16_t, 8>(in, out, P, A, C, D);
}
extern "C" __global__ void permute0213_f32_f32_v4(const float* in, float* out, int P, int A, int C, int D) {
    permute0213<float, float, 4>(in, out, P, A, C, D);
}

// DCUpBlock2d's shortcut fused with its residual add, NCHW:
//   out = main + pixel_shuffle(repeat_interleave(x, r, dim=1), 2)
// out/main (B, Co, 2H, 2W), x (B, Ci, H, W), Ci·r = 4·Co: out channel o at (2i+a, 2j+b) reads input channel
// (4o + 2a + b) / r at (i, j). One pass instead of two layout copies and an add.
template <typename T>
__device__ __forceinline__ void up_shortcut_add(const T* __restrict__ main_, const T* __restrict__ x,
                                                T* __restrict__ out, int B, int Co, int Ci, int H, int W, int r) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const int W2 = 2 * W, H2 = 2 * H;
    long long total = (long long)B * Co * H2 * W2;
    if (idx >= total) return;
    int col = (int)(idx % W2);
    long long t = idx / W2;
    int row = (int)(t % H2);
    t /= H2;
    int o = (int)(t % Co);
    int b = (int)(t / Co);
    int src = (4 * o + 2 * (row & 1) + (col & 1)) / r;
    float s = to_f32(x[(((long long)b * Ci + src) * H + (row >> 1)) * W + (col >> 1)]);
    out[idx] = from_f32<T>(to_f32(main_[idx]) + s);
}

extern "C" __global__ void up_shortcut_add_bf16(const bf16_t* m, const bf16_t* x, bf16_t* out, int B, int Co, int Ci, int H, int W, int r) {
    up_shortcut_add<bf16_t>(m, x, out, B, Co, Ci, H, W, r);
}
extern "C" __global__ void up_shortcut_add_f32(const float* m, const float* x, float* out, int B, int Co, int Ci, int H, int W, int r) {
    up_shortcut_add<float>(m, x, out, B, Co, Ci, H, W, r);
}
