// ReLU linear attention (diffusers `SanaLinearAttnProcessor2_0`, `SanaMultiscaleAttnProcessor2_0`;
// NVlabs/Sana `TritonLiteMLA`), f32 accumulation whatever the input dtype, no casts or copies:
//   kv[b,g] = Σ_n relu(k_n)ᵀ · [v_n ; 1]                         (d × (d+1), f32)
//   out_n   = (relu(q_n) · kv[:, :d]) / (relu(q_n) · kv[:, d] + eps)
// q, k, v are strided views: element (b, n, g, e) lives at base + b·sb + n·sn + g·sg + e, which covers
// the transformer's (B, N, heads·d) projections and the DC-AE's interleaved (B, N, G, 3d) q|k|v groups.
// out holds (B, N, Gout, d) contiguous (= (B, N, Gout·d), the merged-heads layout the output projection
// reads); the apply writes groups 0..G of it from the pointer it is given, so the DC-AE's scales (each its
// own q|k|v tensor) write their groups side by side into one output without concatenating their inputs.
// Three launches, deterministic (no atomics): per-chunk partial sums, their reduction, the apply.
// Head dim 32 (every Sana model) has its own bodies below: 16-byte loads, register-blocked kv.

#define LA_TILE 32
#define LA_THREADS 256
#define LA_MAXP 17 /* ceil(64·65 / 256): head dims up to 64 */

// DT > 0: the head dim as a compile-time constant (32 for every Sana model): index arithmetic folds and
// the token loop unrolls. DT = 0: any d ≤ 64 at run time.
template <typename T, int DT>
__device__ __forceinline__ void la_kv_partial(const T* __restrict__ k, const T* __restrict__ v,
                                              float* __restrict__ partial, int G, int N, int d_rt,
                                              long long sb, long long sn, long long sg, int chunk) {
    constexpr int MAXP = DT > 0 ? (DT * (DT + 1) + LA_THREADS - 1) / LA_THREADS : LA_MAXP;
    const int d = DT > 0 ? DT : d_rt;
    __shared__ float ks[LA_TILE][64];
    __shared__ float vs[LA_TILE][65];
    const int bg = blockIdx.x, c = blockIdx.y, nchunks = gridDim.y;
    const int b = bg / G, g = bg % G;
    const int P = d * (d + 1);
    const T* kb = k + b * sb + g * sg;
    const T* vb = v + b * sb + g * sg;
    float acc[MAXP];
#pragma unroll
    for (int r = 0; r < MAXP; r++) acc[r] = 0.f;
    const int n0 = c * chunk, n1 = min(N, n0 + chunk);
    for (int t0 = n0; t0 < n1; t0 += LA_TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < LA_TILE * d; i += LA_THREADS) {
            int tn = i / d, e = i % d, n = t0 + tn;
            float kv_ = 0.f, vv = 0.f;
            if (n < n1) {
                kv_ = fmaxf(to_f32(kb[n * sn + e]), 0.f);
                vv = to_f32(vb[n * sn + e]);
            }
            ks[tn][e] = kv_;
            vs[tn][e] = vv;
            if (e == 0) vs[tn][d] = n < n1 ? 1.f : 0.f;
        }
        __syncthreads();
        const int tn_max = min(LA_TILE, n1 - t0);
#pragma unroll
        for (int r = 0; r < MAXP; r++) {
            int p = threadIdx.x + r * LA_THREADS;
            if (p < P) {
                int i = p / (d + 1), j = p % (d + 1);
                float a = acc[r];
                if (tn_max == LA_TILE) {
#pragma unroll 8
                    for (int tn = 0; tn < LA_TILE; tn++) a = fmaf(ks[tn][i], vs[tn][j], a);
                } else {
                    for (int tn = 0; tn < tn_max; tn++) a = fmaf(ks[tn][i], vs[tn][j], a);
                }
                acc[r] = a;
            }
        }
    }
    float* dst = partial + ((long long)bg * nchunks + c) * P;
#pragma unroll
    for (int r = 0; r < MAXP; r++) {
        int p = threadIdx.x + r * LA_THREADS;
        if (p < P) dst[p] = acc[r];
    }
}

// kv[bg, p] = Σ_c partial[bg, c, p], in chunk order.
extern "C" __global__ void la_kv_reduce(const float* __restrict__ partial, float* __restrict__ kv,
                                        int BG, int nchunks, int P) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)BG * P) return;
    long long bg = idx / P, p = idx % P;
    const float* src = partial + bg * nchunks * P + p;
    float s = 0.f;
    for (int c = 0; c < nchunks; c++) s += src[(long long)c * P];
    kv[idx] = s;
}

#define LA_APPLY_TOK 64

template <typename T, int DT>
__device__ __forceinline__ void la_apply(const T* __restrict__ q, const float* __restrict__ kv,
                                         T* __restrict__ out, int G, int Gout, int N, int d_rt, long long sb,
                                         long long sn, long long sg, float eps) {
    const int d = DT > 0 ? DT : d_rt;
    __shared__ float kvs[64 * 65];
    __shared__ float qs[LA_APPLY_TOK][65];
    const int bg = blockIdx.x, b = bg / G, g = bg % G;
    const int P = d * (d + 1);
    const int n0 = blockIdx.y * LA_APPLY_TOK;
    for (int p = threadIdx.x; p < P; p += blockDim.x) kvs[p] = kv[(long long)bg * P + p];
    const T* qb = q + b * sb + g * sg;
    for (int i = threadIdx.x; i < LA_APPLY_TOK * d; i += blockDim.x) {
        int tn = i / d, e = i % d, n = n0 + tn;
        qs[tn][e] = n < N ? fmaxf(to_f32(qb[n * sn + e]), 0.f) : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < LA_APPLY_TOK * d; i += blockDim.x) {
        int tn = i / d, e = i % d, n = n0 + tn;
        if (n >= N) continue;
        float num = 0.f, den = 0.f;
#pragma unroll 8
        for (int j = 0; j < d; j++) {
            float qj = qs[tn][j];
            num = fmaf(qj, kvs[j * (d + 1) + e], num);
            den = fmaf(qj, kvs[j * (d + 1) + d], den);
        }
        out[(((long long)b * N + n) * Gout + g) * d + e] = from_f32<T>(num / (den + eps));
    }
}

#define LINEAR_ATTN(SUFFIX, T, DT)                                                                 \
    extern "C" __global__ void la_kv_partial_##SUFFIX(const T* k, const T* v, float* partial,     \
                                                      int G, int N, int d, long long sb,           \
                                                      long long sn, long long sg, int chunk) {     \
        la_kv_partial<T, DT>(k, v, partial, G, N, d, sb, sn, sg, chunk);                           \
    }                                                                                              \
    extern "C" __global__ void la_apply_##SUFFIX(const T* q, const float* kv, T* out, int G,       \
                                                 int Gout, int N, int d, long long sb, long long sn, \
                                                 long long sg, float eps) {                        \
        la_apply<T, DT>(q, kv, out, G, Gout, N, d, sb, sn, sg, eps);                               \
    }

// Head dim 32, 16-byte loads (`la_*_d32` when q, k, v and their strides are 16-byte aligned; otherwise the
// DT = 32 scalar bodies above). kv: the tile's k (ReLU'd) and v are staged as f32 in shared memory; warp w
// owns rows 4w..4w+3 of kvᵀ, lane j column j, so each token costs one broadcast float4 and one
// conflict-free float per four FMAs (the generic body reads two shared floats per FMA). The ones column
// (Σ relu(k)) is spread over the lanes: lane t adds token t of each tile, then a warp sum.
template <typename T>
__device__ __forceinline__ bool la_aligned16(const T* a, const T* b, long long sb, long long sn,
                                             long long sg) {
    constexpr int V = 16 / sizeof(T);
    return ((((unsigned long long)a) | ((unsigned long long)b)) & 15ull) == 0 && sb % V == 0 &&
           sn % V == 0 && sg % V == 0;
}

template <typename T>
__device__ __forceinline__ void la_kv_partial_d32v(const T* __restrict__ k, const T* __restrict__ v,
                                                   float* __restrict__ partial, int G, int N,
                                                   long long sb, long long sn, long long sg, int chunk) {
    constexpr int D = 32, V = 16 / sizeof(T), VPR = D / V, P = D * (D + 1);
    __shared__ __align__(16) float ks[LA_TILE][D];
    __shared__ __align__(16) float vs[LA_TILE][D];
    const int bg = blockIdx.x, c = blockIdx.y, nchunks = gridDim.y;
    const int b = bg / G, g = bg % G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const T* kb = k + b * sb + g * sg;
    const T* vb = v + b * sb + g * sg;
    float acc[4] = {0.f, 0.f, 0.f, 0.f}, dacc[4] = {0.f, 0.f, 0.f, 0.f};
    const int n0 = c * chunk, n1 = min(N, n0 + chunk);
    for (int t0 = n0; t0 < n1; t0 += LA_TILE) {
        __syncthreads();
        for (int i = threadIdx.x; i < 2 * LA_TILE * VPR; i += blockDim.x) {
            const int which = i / (LA_TILE * VPR), r = i % (LA_TILE * VPR);
            const int tn = r / VPR, part = r % VPR, n = t0 + tn;
            float f[V];
            if (n < n1) {
                Vec<T, V>::load((which ? vb : kb) + n * sn + part * V, f);
            } else {
#pragma unroll
                for (int e = 0; e < V; e++) f[e] = 0.f;
            }
            float* dst = which ? &vs[tn][part * V] : &ks[tn][part * V];
#pragma unroll
            for (int e = 0; e < V; e++) dst[e] = which ? f[e] : fmaxf(f[e], 0.f);
        }
        __syncthreads();
#pragma unroll 8
        for (int tn = 0; tn < LA_TILE; tn++) {
            const float4 kk = *reinterpret_cast<const float4*>(&ks[tn][warp * 4]);
            const float vv = vs[tn][lane];
            acc[0] = fmaf(kk.x, vv, acc[0]);
            acc[1] = fmaf(kk.y, vv, acc[1]);
            acc[2] = fmaf(kk.z, vv, acc[2]);
            acc[3] = fmaf(kk.w, vv, acc[3]);
        }
        const float4 kk = *reinterpret_cast<const float4*>(&ks[lane][warp * 4]);
        dacc[0] += kk.x;
        dacc[1] += kk.y;
        dacc[2] += kk.z;
        dacc[3] += kk.w;
    }
#pragma unroll
    for (int r = 0; r < 4; r++)
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) dacc[r] += __shfl_xor_sync(0xffffffffu, dacc[r], o);
    float* dst = partial + ((long long)bg * nchunks + c) * P;
#pragma unroll
    for (int r = 0; r < 4; r++) {
        dst[(warp * 4 + r) * (D + 1) + lane] = acc[r];
        if (lane == 0) dst[(warp * 4 + r) * (D + 1) + D] = dacc[r];
    }
}

// Apply, head dim 32: lane e keeps column e of kv (and kv[e, d] for the denominator) in registers; each
// warp takes every 8th token of the block's LA_APPLY_TOK, loads its q row (64 coalesced bytes), and
// computes num_e = Σ_j q_j kv[j, e] from a per-warp shared copy of the row (broadcast float4 reads) and
// den = Σ_j q_j kv[j, d] as a warp sum. Needs blockDim.x = 256.
template <typename T>
__device__ __forceinline__ void la_apply_d32v(const T* __restrict__ q, const float* __restrict__ kv,
                                              T* __restrict__ out, int G, int Gout, int N, long long sb,
                                              long long sn, long long sg, float eps) {
    constexpr int D = 32, PER = LA_APPLY_TOK / 8;
    __shared__ __align__(16) float qs[8][D];
    const int bg = blockIdx.x, b = bg / G, g = bg % G;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const float* kvb = kv + (long long)bg * D * (D + 1);
    float col[D];
#pragma unroll
    for (int j = 0; j < D; j++) col[j] = kvb[j * (D + 1) + lane];
    const float dencol = kvb[lane * (D + 1) + D];
    const T* qb = q + b * sb + g * sg;
    const int n0 = blockIdx.y * LA_APPLY_TOK;
    float qv[PER];
#pragma unroll
    for (int t = 0; t < PER; t++) {
        const int n = n0 + warp + 8 * t;
        qv[t] = n < N ? fmaxf(to_f32(qb[n * sn + lane]), 0.f) : 0.f;
    }
#pragma unroll
    for (int t = 0; t < PER; t++) {
        const int n = n0 + warp + 8 * t;
        if (n >= N) break;
        float den = qv[t] * dencol;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) den += __shfl_xor_sync(0xffffffffu, den, o);
        __syncwarp();
        qs[warp][lane] = qv[t];
        __syncwarp();
        float num = 0.f;
#pragma unroll
        for (int j = 0; j < D; j += 4) {
            const float4 q4 = *reinterpret_cast<const float4*>(&qs[warp][j]);
            num = fmaf(q4.x, col[j], num);
            num = fmaf(q4.y, col[j + 1], num);
            num = fmaf(q4.z, col[j + 2], num);
            num = fmaf(q4.w, col[j + 3], num);
        }
        out[(((long long)b * N + n) * Gout + g) * D + lane] = from_f32<T>(num / (den + eps));
    }
}

#define LINEAR_ATTN_D32(SUFFIX, T)                                                                 \
    extern "C" __global__ void la_kv_partial_##SUFFIX##_d32(const T* k, const T* v, float* partial, \
                                                            int G, int N, int d, long long sb,     \
                                                            long long sn, long long sg, int chunk) { \
        if (la_aligned16(k, v, sb, sn, sg))                                                        \
            la_kv_partial_d32v<T>(k, v, partial, G, N, sb, sn, sg, chunk);                         \
        else                                                                                       \
            la_kv_partial<T, 32>(k, v, partial, G, N, d, sb, sn, sg, chunk);                       \
    }                                                                                              \
    extern "C" __global__ void la_apply_##SUFFIX##_d32(const T* q, const float* kv, T* out, int G, \
                                                       int Gout, int N, int d, long long sb,       \
                                                       long long sn, long long sg, float eps) {    \
        la_apply_d32v<T>(q, kv, out, G, Gout, N, sb, sn, sg, eps);                                 \
    }

LINEAR_ATTN(bf16, bf16_t, 0)
LINEAR_ATTN(f32, float, 0)
LINEAR_ATTN_D32(bf16, bf16_t)
LINEAR_ATTN_D32(f32, float)
