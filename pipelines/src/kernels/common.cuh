// Shared prelude of every fleet kernel (prepended to each .cu before NVRTC compiles it, and by
// bench/kernel_harness.py before CuPy compiles it). Self-contained: no CUDA headers, so NVRTC needs no
// include path on the machine that runs it. bf16 is carried as its 16 raw bits; arithmetic is f32.

typedef unsigned short bf16_t;
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned int)v) << 16); }

template <typename T> __device__ __forceinline__ T from_f32(float v);
template <> __device__ __forceinline__ float from_f32<float>(float v) { return v; }
// Round to nearest even, NaN kept quiet (as torch's and candle's f32 -> bf16 casts do).
template <> __device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
    unsigned int u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Fast reciprocal and exp (about 2 ulp): far below bf16 rounding, and the depthwise GLU evaluates it k² times.
__device__ __forceinline__ float silu_f(float v) { return __fdividef(v, 1.0f + __expf(-v)); }

// V consecutive elements <-> float[V]; V = 8 (bf16) or 4 (f32) use one 16-byte access, V = 1 is scalar.
template <typename T, int V> struct Vec {
    static __device__ __forceinline__ void load(const T* p, float* o) {
#pragma unroll
        for (int i = 0; i < V; i++) o[i] = to_f32(p[i]);
    }
    static __device__ __forceinline__ void store(T* p, const float* o) {
#pragma unroll
        for (int i = 0; i < V; i++) p[i] = from_f32<T>(o[i]);
    }
};
template <> struct Vec<bf16_t, 8> {
    static __device__ __forceinline__ void load(const bf16_t* p, float* o) {
        uint4 u = *reinterpret_cast<const uint4*>(p);
        unsigned int w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int i = 0; i < 4; i++) {
            o[2 * i] = __uint_as_float(w[i] << 16);
            o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
        }
    }
    static __device__ __forceinline__ void store(bf16_t* p, const float* o) {
        unsigned int w[4];
#pragma unroll
        for (int i = 0; i < 4; i++)
            w[i] = (unsigned int)from_f32<bf16_t>(o[2 * i]) |
                   ((unsigned int)from_f32<bf16_t>(o[2 * i + 1]) << 16);
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
    }
};
template <> struct Vec<float, 4> {
    static __device__ __forceinline__ void load(const float* p, float* o) {
        float4 u = *reinterpret_cast<const float4*>(p);
        o[0] = u.x; o[1] = u.y; o[2] = u.z; o[3] = u.w;
    }
    static __device__ __forceinline__ void store(float* p, const float* o) {
        *reinterpret_cast<float4*>(p) = make_float4(o[0], o[1], o[2], o[3]);
    }
};

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
__device__ __forceinline__ float block_sum(float v, float* scratch /* 32 floats */) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = blockDim.x >> 5;
    v = lane < nw ? scratch[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
