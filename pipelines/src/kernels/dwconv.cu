// Depthwise k×k convolution, stride 1, zero padding k/2, channels-last (B, H, W, C), f32 accumulation.
// Replaces `ops::depthwise_conv2d_nhwc` (k² shifted multiply-adds) and, in the GLU form, the whole middle
// of GLUMBConv:  y = silu(x + in_bias)  ->  depthwise(y) + bias  ->  value · silu(gate)  (C -> C/2).
//
// x: (B, H, W, Cin); taps: (k, k, Cin) (the PyTorch (Cin, 1, k, k) weight, transposed once at load);
// bias, in_bias: (Cin) or null; out: (B, H, W, Cout) with Cout = Cin / 2 (GLU) or Cin.
// One thread computes V consecutive output channels of one pixel (V = 8 bf16 / 4 f32: 16-byte accesses);
// the k² neighbours are re-read through L1/L2.

template <typename T, int V, int KT, bool GLU>
__device__ __forceinline__ void dwconv_nhwc(const T* __restrict__ x, const T* __restrict__ taps,
                                            const T* __restrict__ bias, const T* __restrict__ in_bias,
                                            int in_silu, T* __restrict__ out, int B, int H, int W,
                                            int Cin, int Krt) {
    const int K = KT > 0 ? KT : Krt;
    const int Cout = GLU ? Cin / 2 : Cin;
    const int groups = Cout / V;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)B * H * W * groups;
    if (idx >= total) return;
    int cg = (int)(idx % groups);
    long long pix = idx / groups;
    int px = (int)(pix % W);
    int py = (int)((pix / W) % H);
    int b = (int)(pix / ((long long)W * H));
    int c0 = cg * V;

    float acc[V], accg[GLU ? V : 1];
    float ib[V], ibg[GLU ? V : 1];
#pragma unroll
    for (int i = 0; i < V; i++) { acc[i] = 0.f; ib[i] = 0.f; }
#pragma unroll
    for (int i = 0; i < (GLU ? V : 1); i++) { accg[i] = 0.f; ibg[i] = 0.f; }
    if (bias) {
        Vec<T, V>::load(bias + c0, acc);
        if (GLU) Vec<T, V>::load(bias + c0 + Cout, accg);
    }
    if (in_bias) {
        Vec<T, V>::load(in_bias + c0, ib);
        if (GLU) Vec<T, V>::load(in_bias + c0 + Cout, ibg);
    }
    const int r = K / 2;
    const T* xb = x + (long long)b * H * W * Cin;
#pragma unroll
    for (int i = 0; i < K; i++) {
        int yy = py + i - r;
        if (yy < 0 || yy >= H) continue;
#pragma unroll
        for (int j = 0; j < K; j++) {
            int xx = px + j - r;
            if (xx < 0 || xx >= W) continue;
            const T* xp = xb + ((long long)yy * W + xx) * Cin + c0;
            const T* tp = taps + (long long)(i * K + j) * Cin + c0;
            float xv[V], tv[V];
            Vec<T, V>::load(xp, xv);
            Vec<T, V>::load(tp, tv);
#pragma unroll
            for (int e = 0; e < V; e++) {
                float v = xv[e] + ib[e];
                if (in_silu) v = silu_f(v);
                acc[e] = fmaf(v, tv[e], acc[e]);
            }
            if (GLU) {
                Vec<T, V>::load(xp + Cout, xv);
                Vec<T, V>::load(tp + Cout, tv);
#pragma unroll
                for (int e = 0; e < V; e++) {
                    float v = xv[e] + ibg[e];
                    if (in_silu) v = silu_f(v);
                    accg[e] = fmaf(v, tv[e], accg[e]);
                }
            }
        }
    }
    if (GLU) {
#pragma unroll
        for (int e = 0; e < V; e++) acc[e] = acc[e] * silu_f(accg[e]);
    }
    Vec<T, V>::store(out + pix * Cout + c0, acc);
}

#define DWCONV(NAME, T, V, KT, GLU)                                                              \
    extern "C" __global__ void NAME(const T* x, const T* taps, const T* bias, const T* in_bias,  \
                                    int in_silu, T* out, int B, int H, int W, int Cin, int K) { \
        dwconv_nhwc<T, V, KT, GLU>(x, taps, bias, in_bias, in_silu, out, B, H, W, Cin, K);      \
    }

DWCONV(dwconv_bf16_v8_k3, bf16_t, 8, 3, false)
DWCONV(dwconv_bf16_v8_k5, bf16_t, 8, 5, false)
DWCONV(dwconv_bf16_v1_kn, bf16_t, 1, 0, false)
DWCONV(dwconv_bf16_v8_k3_glu, bf16_t, 8, 3, true)
DWCONV(dwconv_bf16_v1_kn_glu, bf16_t, 1, 0, true)
DWCONV(dwconv_f32_v4_k3, float, 4, 3, false)
DWCONV(dwconv_f32_v4_k5, float, 4, 5, false)
DWCONV(dwconv_f32_v1_kn, float, 1, 0, false)
DWCONV(dwconv_f32_v4_k3_glu, float, 4, 3, true)
DWCONV(dwconv_f32_v1_kn_glu, float, 1, 0, true)

// Strip form: one thread computes V channels of R vertically adjacent output pixels, so each input vector
// is loaded once per tap column and reused by up to K output rows, and each tap once per R pixels
// (≈ (R+K−1)·K/R loads per output instead of K²). K and R are compile-time, so every array stays in registers.
template <typename T, int V, int K, int R, bool GLU>
__device__ __forceinline__ void dwconv_strip(const T* __restrict__ x, const T* __restrict__ taps,
                                             const T* __restrict__ bias, const T* __restrict__ in_bias,
                                             int in_silu, T* __restrict__ out, int B, int H, int W,
                                             int Cin) {
    constexpr int G2 = GLU ? 2 : 1;
    const int Cout = GLU ? Cin / 2 : Cin;
    const int groups = Cout / V;
    const int strips = (H + R - 1) / R;
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    long long total = (long long)B * strips * W * groups;
    if (idx >= total) return;
    int cg = (int)(idx % groups);
    long long rest = idx / groups;
    int px = (int)(rest % W);
    rest /= W;
    int strip = (int)(rest % strips);
    int b = (int)(rest / strips);
    int c0 = cg * V, y0 = strip * R;
    constexpr int r = K / 2;

    float acc[G2][R][V];
    float ib[G2][V];
#pragma unroll
    for (int g = 0; g < G2; g++) {
        float bv[V];
#pragma unroll
        for (int e = 0; e < V; e++) { bv[e] = 0.f; ib[g][e] = 0.f; }
        if (bias) Vec<T, V>::load(bias + c0 + g * Cout, bv);
        if (in_bias) Vec<T, V>::load(in_bias + c0 + g * Cout, ib[g]);
#pragma unroll
        for (int o = 0; o < R; o++)
#pragma unroll
            for (int e = 0; e < V; e++) acc[g][o][e] = bv[e];
    }
    const T* xb = x + (long long)b * H * W * Cin;
#pragma unroll
    for (int j = 0; j < K; j++) {
        int xx = px + j - r;
        if (xx < 0 || xx >= W) continue;
        float tv[G2][K][V];
#pragma unroll
        for (int g = 0; g < G2; g++)
#pragma unroll
            for (int i = 0; i < K; i++) Vec<T, V>::load(taps + (long long)(i * K + j) * Cin + c0 + g * Cout, tv[g][i]);
#pragma unroll
        for (int rr = 0; rr < R + K - 1; rr++) {
            int yy = y0 - r + rr;
            if (yy < 0 || yy >= H) continue;
            const T* xp = xb + ((long long)yy * W + xx) * Cin + c0;
#pragma unroll
            for (int g = 0; g < G2; g++) {
                float xv[V];
                Vec<T, V>::load(xp + g * Cout, xv);
#pragma unroll
                for (int e = 0; e < V; e++) {
                    float v = xv[e] + ib[g][e];
                    xv[e] = in_silu ? silu_f(v) : v;
                }
#pragma unroll
                for (int i = 0; i < K; i++) {
                    const int o = rr - i;
                    if (o >= 0 && o < R) {
#pragma unroll
                        for (int e = 0; e < V; e++) acc[g][o][e] = fmaf(xv[e], tv[g][i][e], acc[g][o][e]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int o = 0; o < R; o++) {
        int yy = y0 + o;
        if (yy >= H) break;
        float res[V];
#pragma unroll
        for (int e = 0; e < V; e++) res[e] = GLU ? acc[0][o][e] * silu_f(acc[G2 - 1][o][e]) : acc[0][o][e];
        Vec<T, V>::store(out + (((long long)b * H + yy) * W + px) * Cout + c0, res);
    }
}

#define DWSTRIP(NAME, T, V, K, R, GLU)                                                           \
    extern "C" __global__ void NAME(const T* x, const T* taps, const T* bias, const T* in_bias,  \
                                    int in_silu, T* out, int B, int H, int W, int Cin, int Kr) { \
        dwconv_strip<T, V, K, R, GLU>(x, taps, bias, in_bias, in_silu, out, B, H, W, Cin);      \
    }

DWSTRIP(dwstrip_bf16_v8_k3_r4_glu, bf16_t, 8, 3, 4, true)
DWSTRIP(dwstrip_bf16_v8_k3_r8_glu, bf16_t, 8, 3, 8, true)
DWSTRIP(dwstrip_bf16_v8_k5_r4, bf16_t, 8, 5, 4, false)
DWSTRIP(dwstrip_bf16_v8_k5_r8, bf16_t, 8, 5, 8, false)
DWSTRIP(dwstrip_bf16_v8_k3_r4, bf16_t, 8, 3, 4, false)
DWSTRIP(dwstrip_f32_v4_k3_r4_glu, float, 4, 3, 4, true)
DWSTRIP(dwstrip_f32_v4_k5_r4, float, 4, 5, 4, false)
DWSTRIP(dwstrip_f32_v4_k3_r4, float, 4, 3, 4, false)

// Tiled depthwise k×k through shared memory (bf16, C % 32 == 0, 16-byte aligned), two forms:
//   GLU (GLUMBConv's middle, k = 3): y = silu(x + in_bias) rounded to bf16 (what the unfused path stores),
//     depthwise + bias, out = value · silu(gate) (Cin = 2·Cout);
//   plain (the DC-AE multiscale projection, k = 5): out = depthwise(x) (+ bias).
// A block owns an 8×8 pixel tile and 32 output channels (and, with GLU, their 32 gate channels): it stages
// the (8+k−1)² halo once (each input element activated once, loaded once per block instead of k² times
// through L1/L2), then each thread computes 8 channels of one pixel from shared memory. Halo and taps are
// kept as bf16 (the activated values are bf16 numbers: exact), so one 16-byte shared load brings 8 of them;
// halo rows are pitched so the two pixels of a quarter-warp hit disjoint banks.
#define DWT_TH 8
#define DWT_TW 8
#define DWT_CC 32
template <int K, bool GLU>
__device__ __forceinline__ void dwtile(const bf16_t* __restrict__ x, const bf16_t* __restrict__ taps,
                                       const bf16_t* __restrict__ bias, const bf16_t* __restrict__ in_bias,
                                       bf16_t* __restrict__ out, int B, int H, int W, int Cin) {
    // Row pitch: 192 bytes with GLU, 64 without: consecutive pixels start 64 bytes (16 banks) apart.
    constexpr int G2 = GLU ? 2 : 1, NV = G2 * DWT_CC / 8, ROW = GLU ? 96 : 32;
    constexpr int R = K / 2, HH = DWT_TH + K - 1, HW = DWT_TW + K - 1;
    __shared__ __align__(16) bf16_t halo[HH * HW * ROW];
    __shared__ __align__(16) bf16_t tap_s[K * K][G2 * DWT_CC];
    const int Cout = GLU ? Cin / 2 : Cin;
    const int tiles_x = (W + DWT_TW - 1) / DWT_TW, tiles_y = (H + DWT_TH - 1) / DWT_TH;
    int t = blockIdx.x;
    const int tx = t % tiles_x;
    t /= tiles_x;
    const int ty = t % tiles_y;
    const int b = t / tiles_y;
    const int c0 = blockIdx.y * DWT_CC;
    const int y0 = ty * DWT_TH, x0 = tx * DWT_TW;
    const bf16_t* xb = x + (long long)b * H * W * Cin;
    // Vector `part` of a staged row: parts 0..3 the value channels, 4..7 (GLU) the gate channels.
    auto chan = [&](int part) { return part < 4 ? c0 + part * 8 : Cout + c0 + (part - 4) * 8; };
    for (int i = threadIdx.x; i < K * K * NV; i += blockDim.x) {
        const int tap = i / NV, part = i % NV;
        *reinterpret_cast<uint4*>(&tap_s[tap][part * 8]) =
            *reinterpret_cast<const uint4*>(taps + (long long)tap * Cin + chan(part));
    }
    for (int i = threadIdx.x; i < HH * HW * NV; i += blockDim.x) {
        const int hp = i / NV, part = i % NV;
        const int gy = y0 - R + hp / HW, gx = x0 - R + hp % HW;
        uint4 packed = make_uint4(0u, 0u, 0u, 0u);
        if (gy >= 0 && gy < H && gx >= 0 && gx < W) {
            const bf16_t* src = xb + ((long long)gy * W + gx) * Cin + chan(part);
            if (in_bias) {
                float f[8], ib[8];
                Vec<bf16_t, 8>::load(src, f);
                Vec<bf16_t, 8>::load(in_bias + chan(part), ib);
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] = silu_f(f[e] + ib[e]);
                Vec<bf16_t, 8>::store(reinterpret_cast<bf16_t*>(&packed), f);
            } else {
                packed = *reinterpret_cast<const uint4*>(src);
            }
        }
        *reinterpret_cast<uint4*>(&halo[hp * ROW + part * 8]) = packed;
    }
    __syncthreads();
    // One pixel × 8 channels a thread: cv = 8-channel group (0..3), p = pixel of the 8×8 tile.
    const int cv = threadIdx.x & 3, p = threadIdx.x >> 2;
    const int oy = p / DWT_TW, ox = p % DWT_TW;
    if (y0 + oy >= H || x0 + ox >= W) return;
    float acc[8], accg[8];
#pragma unroll
    for (int e = 0; e < 8; e++) { acc[e] = 0.f; accg[e] = 0.f; }
    if (bias) {
        Vec<bf16_t, 8>::load(bias + c0 + cv * 8, acc);
        if (GLU) Vec<bf16_t, 8>::load(bias + Cout + c0 + cv * 8, accg);
    }
#pragma unroll
    for (int i = 0; i < K; i++) {
#pragma unroll
        for (int j = 0; j < K; j++) {
            const bf16_t* hp = &halo[((oy + i) * HW + ox + j) * ROW];
            const bf16_t* tp = tap_s[i * K + j];
            float av[8], tav[8];
            Vec<bf16_t, 8>::load(hp + cv * 8, av);
            Vec<bf16_t, 8>::load(tp + cv * 8, tav);
#pragma unroll
            for (int e = 0; e < 8; e++) acc[e] = fmaf(av[e], tav[e], acc[e]);
            if (GLU) {
                float gv[8], tgv[8];
                Vec<bf16_t, 8>::load(hp + DWT_CC + cv * 8, gv);
                Vec<bf16_t, 8>::load(tp + DWT_CC + cv * 8, tgv);
#pragma unroll
                for (int e = 0; e < 8; e++) accg[e] = fmaf(gv[e], tgv[e], accg[e]);
            }
        }
    }
    if (GLU) {
#pragma unroll
        for (int e = 0; e < 8; e++) acc[e] = acc[e] * silu_f(accg[e]);
    }
    Vec<bf16_t, 8>::store(out + (((long long)b * H + y0 + oy) * W + x0 + ox) * Cout + c0 + cv * 8, acc);
}

extern "C" __global__ void __launch_bounds__(256) dwtile_bf16_k3_glu(const bf16_t* x, const bf16_t* taps,
                                                                     const bf16_t* bias, const bf16_t* in_bias,
                                                                     bf16_t* out, int B, int H, int W, int Cin) {
    dwtile<3, true>(x, taps, bias, in_bias, out, B, H, W, Cin);
}
extern "C" __global__ void __launch_bounds__(256) dwtile_bf16_k3(const bf16_t* x, const bf16_t* taps,
                                                                 const bf16_t* bias, const bf16_t* in_bias,
                                                                 bf16_t* out, int B, int H, int W, int Cin) {
    dwtile<3, false>(x, taps, bias, in_bias, out, B, H, W, Cin);
}
extern "C" __global__ void __launch_bounds__(256) dwtile_bf16_k5(const bf16_t* x, const bf16_t* taps,
                                                                 const bf16_t* bias, const bf16_t* in_bias,
                                                                 bf16_t* out, int B, int H, int W, int Cin) {
    dwtile<5, false>(x, taps, bias, in_bias, out, B, H, W, Cin);
}
