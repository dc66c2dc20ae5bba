// Decoder output (B, 3, H, W) in [-1, 1] -> 8-bit RGB (B, OH, OW, 3), one pass on the device, so only the
// output bytes cross to the host. Reproduces the tensor path it replaces (`image_ops::resize_and_crop`
// then `to_rgb_images`): with `resize`, candle's CUDA `upsample_bilinear2d` (align_corners = false, double
// arithmetic, result rounded to T) to the cover size (RH, RW) and the centre crop at (SY, SX); then
// `x·0.5` and `+ 0.5` each rounded to T (candle's `affine` on T), clamp to [0, 1], `·255` rounded half to
// even. One thread an output pixel.
template <typename T>
__device__ __forceinline__ void rgb_u8(const T* __restrict__ src, unsigned char* __restrict__ out, int B,
                                       int H, int W, int RH, int RW, int OH, int OW, int SY, int SX,
                                       int resize) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)B * OH * OW) return;
    const int x = (int)(idx % OW);
    const int y = (int)((idx / OW) % OH);
    const long long b = idx / ((long long)OW * OH);
    const long long plane = (long long)H * W;
    long long i00, i01, i10, i11;
    double wh = 0.0, ww = 0.0;
    if (resize) {
        const double hs = (double)H / RH, ws = (double)W / RW;
        const double sh = fmax(0.0, hs * (y + SY + 0.5) - 0.5), sw = fmax(0.0, ws * (x + SX + 0.5) - 0.5);
        const int h0 = (int)floor(sh), w0 = (int)floor(sw);
        const int h1 = min(h0 + 1, H - 1), w1 = min(w0 + 1, W - 1);
        wh = fmin(fmax(sh - h0, 0.0), 1.0);
        ww = fmin(fmax(sw - w0, 0.0), 1.0);
        i00 = (long long)h0 * W + w0;
        i01 = (long long)h0 * W + w1;
        i10 = (long long)h1 * W + w0;
        i11 = (long long)h1 * W + w1;
    } else {
        i00 = i01 = i10 = i11 = (long long)(y + SY) * W + (x + SX);
    }
#pragma unroll
    for (int c = 0; c < 3; c++) {
        const T* p = src + (b * 3 + c) * plane;
        float v;
        if (resize) {
            const double top = (double)to_f32(p[i00]) * (1.0 - ww) + (double)to_f32(p[i01]) * ww;
            const double bot = (double)to_f32(p[i10]) * (1.0 - ww) + (double)to_f32(p[i11]) * ww;
            v = to_f32(from_f32<T>((float)(top * (1.0 - wh) + bot * wh)));
        } else {
            v = to_f32(p[i00]);
        }
        v = to_f32(from_f32<T>(v * 0.5f));
        v = to_f32(from_f32<T>(v + 0.5f));
        v = fminf(fmaxf(v, 0.f), 1.f);
        out[idx * 3 + c] = (unsigned char)rintf(v * 255.f);
    }
}

extern "C" __global__ void rgb_u8_bf16(const bf16_t* src, unsigned char* out, int B, int H, int W, int RH,
                                       int RW, int OH, int OW, int SY, int SX, int resize) {
    rgb_u8<bf16_t>(src, out, B, H, W, RH, RW, OH, OW, SY, SX, resize);
}
extern "C" __global__ void rgb_u8_f32(const float* src, unsigned char* out, int B, int H, int W, int RH,
                                      int RW, int OH, int OW, int SY, int SX, int resize) {
    rgb_u8<float>(src, out, B, H, W, RH, RW, OH, OW, SY, SX, resize);
}
