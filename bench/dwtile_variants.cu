// Tiled depthwise k×k variants for bench/dwtile_variants.py (appended to common.cuh and dwconv.cu there): the
// tile of dwconv.cu generalised to TH×TW pixels and NT threads, every halo load issued before any is used,
// the grid tile-major or channel-major (CHFAST). Not compiled into the pipelines.
template <int K, bool GLU, int TH, int TW, int NT, bool CHFAST>
__device__ __forceinline__ void dwtile2(const bf16_t* __restrict__ x, const bf16_t* __restrict__ taps,
                                        const bf16_t* __restrict__ bias, const bf16_t* __restrict__ in_bias,
                                        bf16_t* __restrict__ out, int B, int H, int W, int Cin) {
    constexpr int CC = 32, G2 = GLU ? 2 : 1, PV = CC / 8, NV = G2 * PV;
    constexpr int ROW = GLU ? 96 : 32;
    constexpr int R = K / 2, HH = TH + K - 1, HW = TW + K - 1;
    constexpr int TOTAL = HH * HW * NV, ITERS = (TOTAL + NT - 1) / NT;
    __shared__ __align__(16) bf16_t halo[HH * HW * ROW];
    __shared__ __align__(16) bf16_t tap_s[K * K][G2 * CC];
    __shared__ __align__(16) bf16_t ib_s[G2 * CC];
    const int Cout = GLU ? Cin / 2 : Cin;
    const int tiles_x = (W + TW - 1) / TW, tiles_y = (H + TH - 1) / TH;
    int t = CHFAST ? blockIdx.y : blockIdx.x;
    const int cgi = CHFAST ? blockIdx.x : blockIdx.y;
    const int tx = t % tiles_x;
    t /= tiles_x;
    const int ty = t % tiles_y;
    const int b = t / tiles_y;
    const int c0 = cgi * CC;
    const int y0 = ty * TH, x0 = tx * TW;
    const bf16_t* xb = x + (long long)b * H * W * Cin;
    auto chan = [&](int part) { return part < PV ? c0 + part * 8 : Cout + c0 + (part - PV) * 8; };
    uint4 raw[ITERS];
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int i = threadIdx.x + it * NT;
        raw[it] = make_uint4(0u, 0u, 0u, 0u);
        if (i < TOTAL) {
            const int hp = i / NV, part = i % NV;
            const int gy = y0 - R + hp / HW, gx = x0 - R + hp % HW;
            if (gy >= 0 && gy < H && gx >= 0 && gx < W)
                raw[it] = __ldg(reinterpret_cast<const uint4*>(xb + ((long long)gy * W + gx) * Cin + chan(part)));
        }
    }
    for (int i = threadIdx.x; i < K * K * NV; i += NT) {
        const int tap = i / NV, part = i % NV;
        *reinterpret_cast<uint4*>(&tap_s[tap][part * 8]) =
            *reinterpret_cast<const uint4*>(taps + (long long)tap * Cin + chan(part));
    }
    if (in_bias && threadIdx.x < NV)
        *reinterpret_cast<uint4*>(&ib_s[threadIdx.x * 8]) = *reinterpret_cast<const uint4*>(in_bias + chan(threadIdx.x));
    if (in_bias) __syncthreads();
#pragma unroll
    for (int it = 0; it < ITERS; it++) {
        const int i = threadIdx.x + it * NT;
        if (i < TOTAL) {
            const int hp = i / NV, part = i % NV;
            const int gy = y0 - R + hp / HW, gx = x0 - R + hp % HW;
            uint4 packed = raw[it];
            if (in_bias && gy >= 0 && gy < H && gx >= 0 && gx < W) {
                float f[8], ib[8];
                Vec<bf16_t, 8>::load(reinterpret_cast<const bf16_t*>(&packed), f);
                Vec<bf16_t, 8>::load(&ib_s[part * 8], ib);
#pragma unroll
                for (int e = 0; e < 8; e++) f[e] = silu_f(f[e] + ib[e]);
                Vec<bf16_t, 8>::store(reinterpret_cast<bf16_t*>(&packed), f);
            }
            *reinterpret_cast<uint4*>(&halo[hp * ROW + part * 8]) = packed;
        }
    }
    __syncthreads();
    const int cv = threadIdx.x % PV;
    float bv[8], bg[8];
#pragma unroll
    for (int e = 0; e < 8; e++) { bv[e] = 0.f; bg[e] = 0.f; }
    if (bias) {
        Vec<bf16_t, 8>::load(bias + c0 + cv * 8, bv);
        if (GLU) Vec<bf16_t, 8>::load(bias + Cout + c0 + cv * 8, bg);
    }
    constexpr int PPP = NT / PV, PASSES = (TH * TW + PPP - 1) / PPP;
#pragma unroll
    for (int pass = 0; pass < PASSES; pass++) {
        const int p = threadIdx.x / PV + pass * PPP;
        if (p >= TH * TW) break;
        const int oy = p / TW, ox = p % TW;
        if (y0 + oy >= H || x0 + ox >= W) continue;
        float acc[8], accg[8];
#pragma unroll
        for (int e = 0; e < 8; e++) { acc[e] = bv[e]; accg[e] = bg[e]; }
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
                    Vec<bf16_t, 8>::load(hp + CC + cv * 8, gv);
                    Vec<bf16_t, 8>::load(tp + CC + cv * 8, tgv);
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
}

#define DWT2(NAME, K, GLU, TH, TW, NT, CHF, MINB)                                                           \
    extern "C" __global__ void __launch_bounds__(NT, MINB) NAME(const bf16_t* x, const bf16_t* taps,      \
            const bf16_t* bias, const bf16_t* in_bias, bf16_t* out, int B, int H, int W, int Cin) {        \
        dwtile2<K, GLU, TH, TW, NT, CHF>(x, taps, bias, in_bias, out, B, H, W, Cin);                        \
    }
DWT2(v_8x8_256, 3, true, 8, 8, 256, false, 1)
DWT2(v_8x8_256_ch, 3, true, 8, 8, 256, true, 1)
DWT2(v_8x8_256_m6, 3, true, 8, 8, 256, false, 6)
DWT2(v_8x16_256, 3, true, 8, 16, 256, false, 1)
DWT2(v_8x16_512, 3, true, 8, 16, 512, false, 1)
DWT2(v_4x32_256, 3, true, 4, 32, 256, false, 1)
DWT2(v_8x8_128, 3, true, 8, 8, 128, false, 1)
DWT2(v_8x16_256_ch, 3, true, 8, 16, 256, true, 1)
DWT2(p5_8x8_256, 5, false, 8, 8, 256, false, 1)
DWT2(p5_8x16_256, 5, false, 8, 16, 256, false, 1)
