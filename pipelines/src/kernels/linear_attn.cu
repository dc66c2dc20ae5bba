// ReLU linear attention (diffusers `SanaLinearAttnProcessor2_0`, `SanaMultiscaleAttnProcessor2_0`;
// NVlabs/Sana `TritonLiteMLA`), f32 accumulation whatever the input dtype, no casts or copies:
//   kv[b,g] = Σ_n relu(k_n)ᵀ · [v_n ; 1]                         (d × (d+1), f32)
//   out_n   = (relu(q_n) · kv[:, :d]) / (relu(q_n) · kv[:, d] + eps)
// q, k, v are strided views: element (b, n, g, e) lives at base + b·sb + n·sn + g·sg + e, which covers
// the transformer's (B, N, heads·d) projections and the DC-AE's interleaved (B, N, G, 3d) q|k|v groups.
// out is (B, N, G, d) contiguous (= (B, N, G·d), the merged-heads layout the output projection reads).
// Three launches, deterministic (no atomics): per-chunk partial sums, their reduction, the apply.

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
                                         T* __restrict__ out, int G, int N, int d_rt, long long sb,
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
        out[(((long long)b * N + n) * G + g) * d + e] = from_f32<T>(num / (den + eps));
    }
}

#define LINEAR_ATTN(SUFFIX, T, DT)                                                                 \
    extern "C" __global__ void la_kv_partial_##SUFFIX(const T* k, const T* v, float* partial,     \
                                                      int G, int N, int d, long long sb,           \
                                                      long long sn, long long sg, int chunk) {     \
        la_kv_partial<T, DT>(k, v, partial, G, N, d, sb, sn, sg, chunk);                           \
    }                                                                                              \
    extern "C" __global__ void la_apply_##SUFFIX(const T* q, const float* kv, T* out, int G, int N, \
                                                 int d, long long sb, long long sn, long long sg,  \
                                                 float eps) {                                      \
        la_apply<T, DT>(q, kv, out, G, N, d, sb, sn, sg, eps);                                     \
    }

LINEAR_ATTN(bf16, bf16_t, 0)
LINEAR_ATTN(f32, float, 0)
LINEAR_ATTN(bf16_d32, bf16_t, 32)
LINEAR_ATTN(f32_d32, float, 32)
