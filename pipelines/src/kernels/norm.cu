// Norms and modulation of the Sana block and the DC-AE decoder, one pass each, f32 statistics.
//
// ln_modulate: LayerNorm without affine over the last dim D (two-pass mean/variance, like
//   `layer_norm_no_affine`), then `· (1 + scale) + shift`, where scale/shift are rows of the AdaLN table
//   plus the timestep embedding: `table[i] + temb6[b, i]` (table (6, D), temb6 (B, 6·D)). One block a row.
// gated_residual: `x + y · (table[i] + temb6[b, i])` (the gate_msa / gate_mlp residuals).

// The row in registers, 16-byte accesses: D % V == 0 and D ≤ 2·V·blockDim.x (Sana: D = 2240, 256 threads).
template <typename T>
__device__ __forceinline__ void ln_modulate_vec(const T* __restrict__ x, const T* __restrict__ table,
                                                const T* __restrict__ temb6, T* __restrict__ out,
                                                int rows_per_batch, int D, int shift_i, int scale_i,
                                                float eps) {
    constexpr int V = 16 / sizeof(T);
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const int b = (int)(row / rows_per_batch);
    const T* xr = x + row * D;
    const int nv = D / V;
    float xv[2][V];
    float s = 0.f;
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int vi = threadIdx.x + u * blockDim.x;
        if (vi < nv) {
            Vec<T, V>::load(xr + vi * V, xv[u]);
#pragma unroll
            for (int e = 0; e < V; e++) s += xv[u][e];
        }
    }
    const float mean = block_sum(s, scratch) / D;
    float s2 = 0.f;
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int vi = threadIdx.x + u * blockDim.x;
        if (vi < nv) {
#pragma unroll
            for (int e = 0; e < V; e++) {
                float c = xv[u][e] - mean;
                s2 += c * c;
            }
        }
    }
    const float rstd = rsqrtf(block_sum(s2, scratch) / D + eps);
    const T* tb = temb6 + (long long)b * 6 * D;
#pragma unroll
    for (int u = 0; u < 2; u++) {
        const int vi = threadIdx.x + u * blockDim.x;
        if (vi < nv) {
            float sh[V], sc[V], tsh[V], tsc[V], o[V];
            Vec<T, V>::load(table + shift_i * D + vi * V, sh);
            Vec<T, V>::load(table + scale_i * D + vi * V, sc);
            Vec<T, V>::load(tb + shift_i * D + vi * V, tsh);
            Vec<T, V>::load(tb + scale_i * D + vi * V, tsc);
#pragma unroll
            for (int e = 0; e < V; e++) {
                float h = (xv[u][e] - mean) * rstd;
                o[e] = h * (1.f + (sc[e] + tsc[e])) + (sh[e] + tsh[e]);
            }
            Vec<T, V>::store(out + row * D + vi * V, o);
        }
    }
}

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

#define NORMS(SUFFIX, T)                                                                          \
    extern "C" __global__ void ln_modulate_##SUFFIX(const T* x, const T* table, const T* temb6,  \
                                                    T* out, int rows_per_batch, int D,           \
                                                    int shift_i, int scale_i, float eps) {       \
        constexpr int V = 16 / sizeof(T);                                                         \
        if (D % V == 0 && D <= 2 * V * (int)blockDim.x &&                                         \
            (((unsigned long long)x | (unsigned long long)table | (unsigned long long)temb6 |      \
              (unsigned long long)out) & 15ull) == 0)                                             \
            ln_modulate_vec<T>(x, table, temb6, out, rows_per_batch, D, shift_i, scale_i, eps);   \
        else                                                                                      \
            ln_modulate<T>(x, table, temb6, out, rows_per_batch, D, shift_i, scale_i, eps);       \
    }                                                                                             \
    extern "C" __global__ void gated_residual_##SUFFIX(const T* x, const T* y, const T* table,   \
                                                       const T* temb6, T* out, long long total,  \
                                                       int rows_per_batch, int D, int gate_i) {  \
        gated_residual<T>(x, y, table, temb6, out, total, rows_per_batch, D, gate_i);             \
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

// gated_residual with V elements a thread (D % V == 0, 16-byte aligned): launch total / V threads.
template <typename T, int V>
__device__ __forceinline__ void gated_residual_vec(const T* __restrict__ x, const T* __restrict__ y,
                                                   const T* __restrict__ table,
                                                   const T* __restrict__ temb6, T* __restrict__ out,
                                                   long long total, int rows_per_batch, int D, int gate_i) {
    long long idx = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * V;
    if (idx >= total) return;
    const int d = (int)(idx % D);
    const int b = (int)(idx / ((long long)D * rows_per_batch));
    float xv[V], yv[V], g[V], tg[V];
    Vec<T, V>::load(x + idx, xv);
    Vec<T, V>::load(y + idx, yv);
    Vec<T, V>::load(table + gate_i * D + d, g);
    Vec<T, V>::load(temb6 + (long long)b * 6 * D + gate_i * D + d, tg);
#pragma unroll
    for (int e = 0; e < V; e++) xv[e] = xv[e] + yv[e] * (g[e] + tg[e]);
    Vec<T, V>::store(out + idx, xv);
}
extern "C" __global__ void gated_residual_bf16_v8(const bf16_t* x, const bf16_t* y, const bf16_t* table,
                                                  const bf16_t* temb6, bf16_t* out, long long total,
                                                  int rows_per_batch, int D, int gate_i) {
    gated_residual_vec<bf16_t, 8>(x, y, table, temb6, out, total, rows_per_batch, D, gate_i);
}
extern "C" __global__ void gated_residual_f32_v4(const float* x, const float* y, const float* table,
                                                 const float* temb6, float* out, long long total,
                                                 int rows_per_batch, int D, int gate_i) {
    gated_residual_vec<float, 4>(x, y, table, temb6, out, total, rows_per_batch, D, gate_i);
}

// Channels-last DC-AE (the decoder keeps (B, H, W, C) from conv_in to conv_out):
// rms_rows: diffusers `RMSNorm(C, eps, weight, bias)` over the last dim of a contiguous (rows, C) tensor,
//   the rounding of the unfused ops (normalise in f32, round to T, · weight + bias + residual in f32, round),
//   then optionally an activation of the rounded value (`act` 1: SiLU, 2: ReLU; the decoder's norm_out →
//   conv_act; ReLU of the rounded value is the rounded ReLU, so both equal the unfused ops' bits). `lpr` lanes a row (a power
//   of two ≤ 32, chosen by the caller so each lane holds 1..MAXV vectors: C % V == 0, C/V ≤ lpr·MAXV; MAXV = 2
//   or 4, the `_m2` / `_m4` kernels: the row and residual live in registers, so MAXV sets the occupancy),
//   32/lpr rows a warp; the residual is loaded with the row, before the reduction, so a row costs one round
//   trip to memory.
template <typename T, int RMS_MAXV>
__device__ __forceinline__ void rms_rows(const T* __restrict__ h, const T* __restrict__ w,
                                         const T* __restrict__ bias, const T* __restrict__ res,
                                         T* __restrict__ out, long long rows, int C, float eps, int act,
                                         int lpr) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const int sub = lane & (lpr - 1);
    const long long row = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * (32 / lpr) + lane / lpr;
    const bool live = row < rows;
    const int nv = C / V;
    const T* hr = h + row * C;
    float xv[RMS_MAXV][V], rv[RMS_MAXV][V];
    float ss = 0.f;
#pragma unroll
    for (int u = 0; u < RMS_MAXV; u++) {
        const int vi = sub + lpr * u;
        if (live && vi < nv) {
            Vec<T, V>::load(hr + vi * V, xv[u]);
            if (res) Vec<T, V>::load(res + row * C + vi * V, rv[u]);
#pragma unroll
            for (int e = 0; e < V; e++) ss = fmaf(xv[u][e], xv[u][e], ss);
        }
    }
    for (int o = lpr >> 1; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if (!live) return;
    const float r = rsqrtf(ss / C + eps);
#pragma unroll
    for (int u = 0; u < RMS_MAXV; u++) {
        const int vi = sub + lpr * u;
        if (vi < nv) {
            float wv[V], bv[V];
            Vec<T, V>::load(w + vi * V, wv);
            if (bias) Vec<T, V>::load(bias + vi * V, bv);
#pragma unroll
            for (int e = 0; e < V; e++) {
                float v = to_f32(from_f32<T>(xv[u][e] * r)) * wv[e];
                if (bias) v += bv[e];
                if (res) v += rv[u][e];
                xv[u][e] = act == 1   ? silu_f(to_f32(from_f32<T>(v)))
                           : act == 2 ? fmaxf(to_f32(from_f32<T>(v)), 0.0f)
                                      : v;
            }
            Vec<T, V>::store(out + row * C + vi * V, xv[u]);
        }
    }
}
#define RMS_ROWS(SUFFIX, T, M)                                                                          \
    extern "C" __global__ void rms_rows_##SUFFIX##_m##M(const T* h, const T* w, const T* bias, const T* res, \
                                                        T* out, long long rows, int C, float eps, int act,   \
                                                        int lpr) {                                          \
        rms_rows<T, M>(h, w, bias, res, out, rows, C, eps, act, lpr);                                        \
    }
RMS_ROWS(bf16, bf16_t, 2)
RMS_ROWS(bf16, bf16_t, 4)
RMS_ROWS(f32, float, 2)
RMS_ROWS(f32, float, 4)

// rms_segments: diffusers `RMSNorm(C, eps, weight)` of each C-column segment of a contiguous (rows, S·C)
//   tensor that has a weight (w0, w1, w2 for segments 0, 1, 2; a null weight copies its segment unchanged):
//   Sana-Sprint's `rms_norm_across_heads` q and k norms on the fused q|k|v projection in one pass, v copied.
//   The rounding of the unfused ops (normalise in f32, round to T, · weight in f32, round). One warp a
//   (row, segment), blockIdx.y the segment; the segment is read twice, the second time from L1/L2.
template <typename T>
__device__ __forceinline__ void rms_segments(const T* __restrict__ x, const T* __restrict__ w0,
                                             const T* __restrict__ w1, const T* __restrict__ w2,
                                             T* __restrict__ out, long long rows, int S, int C, float eps) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= rows) return;
    const int seg = blockIdx.y;
    const T* w = seg == 0 ? w0 : seg == 1 ? w1 : w2;
    const long long off = row * S * C + (long long)seg * C;
    const T* xr = x + off;
    T* yr = out + off;
    const int nv = C / V;
    float v[V];
    if (!w) {
        for (int vi = lane; vi < nv; vi += 32) {
            Vec<T, V>::load(xr + vi * V, v);
            Vec<T, V>::store(yr + vi * V, v);
        }
        return;
    }
    float ss = 0.f;
    for (int vi = lane; vi < nv; vi += 32) {
        Vec<T, V>::load(xr + vi * V, v);
#pragma unroll
        for (int e = 0; e < V; e++) ss = fmaf(v[e], v[e], ss);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    const float r = rsqrtf(ss / C + eps);
    for (int vi = lane; vi < nv; vi += 32) {
        float wv[V];
        Vec<T, V>::load(xr + vi * V, v);
        Vec<T, V>::load(w + vi * V, wv);
#pragma unroll
        for (int e = 0; e < V; e++) v[e] = to_f32(from_f32<T>(v[e] * r)) * wv[e];
        Vec<T, V>::store(yr + vi * V, v);
    }
}
extern "C" __global__ void rms_segments_bf16(const bf16_t* x, const bf16_t* w0, const bf16_t* w1, const bf16_t* w2,
                                             bf16_t* out, long long rows, int S, int C, float eps) {
    rms_segments<bf16_t>(x, w0, w1, w2, out, rows, S, C, eps);
}
extern "C" __global__ void rms_segments_f32(const float* x, const float* w0, const float* w1, const float* w2,
                                            float* out, long long rows, int S, int C, float eps) {
    rms_segments<float>(x, w0, w1, w2, out, rows, S, C, eps);
}

// Nearest ×2 upsample, channels-last: out (B, 2H, 2W, C)[b, y, x] = in (B, H, W, C)[b, y/2, x/2]; V channels
// a thread (C % V == 0).
template <typename T, int V>
__device__ __forceinline__ void upsample2x_nhwc(const T* __restrict__ in, T* __restrict__ out, int B, int H,
                                                int W, int C) {
    const int cv = C / V;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)B * 2 * H * 2 * W * cv;
    if (idx >= total) return;
    const int c = (int)(idx % cv);
    long long t = idx / cv;
    const int x = (int)(t % (2 * W));
    t /= 2 * W;
    const int y = (int)(t % (2 * H));
    const long long b = t / (2 * H);
    float v[V];
    Vec<T, V>::load(in + ((b * H + (y >> 1)) * W + (x >> 1)) * C + c * V, v);
    Vec<T, V>::store(out + idx * V, v);
}
extern "C" __global__ void upsample2x_nhwc_bf16_v8(const bf16_t* in, bf16_t* out, int B, int H, int W, int C) {
    upsample2x_nhwc<bf16_t, 8>(in, out, B, H, W, C);
}
extern "C" __global__ void upsample2x_nhwc_f32_v4(const float* in, float* out, int B, int H, int W, int C) {
    upsample2x_nhwc<float, 4>(in, out, B, H, W, C);
}

// DCUpBlock2d's shortcut + add, channels-last: out (B, 2H, 2W, Co) = main + pixel_shuffle(repeat_interleave(x, r)),
// x (B, H, W, Ci): out channel o at (2i+a, 2j+b) reads channel (4o + 2a + b) / r of x at (i, j). V output
// channels a thread (Co % V == 0), the x values gathered one by one.
template <typename T, int V>
__device__ __forceinline__ void up_shortcut_add_nhwc(const T* __restrict__ main_, const T* __restrict__ x,
                                                     T* __restrict__ out, int B, int Co, int Ci, int H, int W,
                                                     int r) {
    const int cv = Co / V;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)B * 2 * H * 2 * W * cv;
    if (idx >= total) return;
    const int c = (int)(idx % cv);
    long long t = idx / cv;
    const int col = (int)(t % (2 * W));
    t /= 2 * W;
    const int row = (int)(t % (2 * H));
    const long long b = t / (2 * H);
    const T* xp = x + ((b * H + (row >> 1)) * W + (col >> 1)) * Ci;
    const int sub = 2 * (row & 1) + (col & 1);
    float v[V];
    Vec<T, V>::load(main_ + idx * V, v);
#pragma unroll
    for (int e = 0; e < V; e++) v[e] += to_f32(xp[(4 * (c * V + e) + sub) / r]);
    Vec<T, V>::store(out + idx * V, v);
}
extern "C" __global__ void up_shortcut_add_nhwc_bf16_v8(const bf16_t* m, const bf16_t* x, bf16_t* out, int B, int Co,
                                                        int Ci, int H, int W, int r) {
    up_shortcut_add_nhwc<bf16_t, 8>(m, x, out, B, Co, Ci, H, W, r);
}
extern "C" __global__ void up_shortcut_add_nhwc_f32_v4(const float* m, const float* x, float* out, int B, int Co,
                                                       int Ci, int H, int W, int r) {
    up_shortcut_add_nhwc<float, 4>(m, x, out, B, Co, Ci, H, W, r);
}
