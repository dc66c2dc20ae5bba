// Cross-attention over the text tokens, flash style, head dim D a multiple of 16 (Sana 1600M and Sprint:
// 20 heads × 112; D = 32 and 64 are built too), on tensor cores: `mma.sync.m16n8k16` bf16 with f32
// accumulation through inline PTX (no CUDA headers, so NVRTC and CuPy compile it as is). Replaces cuBLAS
// scores GEMM → f32 scores in memory → masked softmax → bf16 probs → cuBLAS PV GEMM: here the scores never
// leave registers.
//
// q (B, N, H·D) token-major, k and v (B, H, T, D), mask (B, T) additive f32 (0 or a large negative / -inf),
// out (B, N, H·D): out = softmax(q kᵀ · scale + mask) v per (batch, head). Block: 4 warps, 16 query rows
// each; grid (ceil(N / 64), H, B). Keys stream through shared memory in chunks of 64 (K row-major, V
// transposed so that both mma B-operands are 32-bit loads), with an online softmax per query row: running
// max and sum in f32, in the log2 domain (exp2f). P is rounded to bf16 for the PV product (as the unfused
// path rounds its probabilities), the division by the row sum is done once at the end.
//
// Chunks of padding are skipped. A key whose mask is <= XA_DEAD (Sana's -10000 for caption padding, or
// -inf) gets the weight exp2((s - 10000) * log2 e - max), which is exactly 0 in f32 once one key of the
// row has mask 0 and the scores differ by less than ~9.9e3; the unskipped loop then multiplies by 1 and
// adds zeros. So when (b) has at least one live key, a chunk of only dead keys is not loaded or computed
// and the output bits are those of the whole loop. A row with no live key runs every chunk (softmax over
// all keys, as the unfused path). Sana's captions are 300 tokens of which a prompt fills a few dozen, so
// most chunks are padding.

#define XA_CHUNK 64
#define XA_VS 72  // Vᵀ row stride in shared memory (bf16): conflict-free fragment loads
#define XA_DEAD -1e4f  // mask at or below: a padding key (module comment)
#ifndef XA_SKIP_DEAD
#define XA_SKIP_DEAD 1  // the harness builds it with 0 too, to check that skipping keeps the bits
#endif

__device__ __forceinline__ void mma_bf16_16816(float* c, const unsigned* a, const unsigned* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Two f32 → packed bf16 pair (round to nearest even), `lo` in the low half (the lower index).
__device__ __forceinline__ unsigned pack_bf16(float lo, float hi) {
    return (unsigned)from_f32<bf16_t>(lo) | ((unsigned)from_f32<bf16_t>(hi) << 16);
}

// K row stride D + 8 (bf16): (D + 8) / 2 words per row keeps the fragment loads conflict-free for D ≡ 0 mod 16.
template <int XA_D>
__device__ __forceinline__ void xattn(const bf16_t* __restrict__ q, const bf16_t* __restrict__ k,
                                      const bf16_t* __restrict__ v, const float* __restrict__ mask,
                                      bf16_t* __restrict__ out, int N, int H, int T, float scale_log2) {
    constexpr int XA_KS = XA_D + 8, KSTEPS = XA_D / 16, NT = XA_D / 8, PARTS = XA_D / 8;
    __shared__ __align__(16) bf16_t ks[XA_CHUNK * XA_KS];
    __shared__ __align__(16) bf16_t vt[XA_D * XA_VS];
    __shared__ float ms[XA_CHUNK];
    const float LOG2E = 1.4426950408889634f;
    const int b = blockIdx.z, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t4 = lane & 3;
    const int inner = H * XA_D;
    const int r0 = blockIdx.x * 64 + warp * 16 + g, r1 = r0 + 8;
    // Q as mma A-fragments: 16 rows × D dims = D/16 k16 steps; rows past N read as zero (never stored).
    unsigned qa[KSTEPS][4];
    {
        const unsigned* q0 = (const unsigned*)(q + ((long long)b * N + (r0 < N ? r0 : 0)) * inner + h * XA_D);
        const unsigned* q1 = (const unsigned*)(q + ((long long)b * N + (r1 < N ? r1 : 0)) * inner + h * XA_D);
#pragma unroll
        for (int kk = 0; kk < KSTEPS; kk++) {
            qa[kk][0] = r0 < N ? q0[kk * 8 + t4] : 0u;
            qa[kk][1] = r1 < N ? q1[kk * 8 + t4] : 0u;
            qa[kk][2] = r0 < N ? q0[kk * 8 + 4 + t4] : 0u;
            qa[kk][3] = r1 < N ? q1[kk * 8 + 4 + t4] : 0u;
        }
    }
    float o[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++)
#pragma unroll
        for (int e = 0; e < 4; e++) o[n][e] = 0.f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.f, 0.f};
    const long long kv_off = ((long long)b * H + h) * T * XA_D;
    const bf16_t* kb = k + kv_off;
    const bf16_t* vb = v + kv_off;
    const float* mb = mask + (long long)b * T;
    int live = 0;
    for (int i = threadIdx.x; i < T; i += 128) live |= mb[i] > XA_DEAD;
    const bool skip_dead = __syncthreads_or(live) && XA_SKIP_DEAD;
    for (int c0 = 0; c0 < T; c0 += XA_CHUNK) {
        // A barrier as well: the previous chunk's reads are done. Uniform over the block.
        const int chunk_live = c0 + (int)threadIdx.x < T && threadIdx.x < XA_CHUNK && mb[c0 + threadIdx.x] > XA_DEAD;
        if (!__syncthreads_or(chunk_live) && skip_dead) continue;
        for (int i = threadIdx.x; i < XA_CHUNK * PARTS; i += 128) {
            const int key = i / PARTS, part = i % PARTS;
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = make_uint4(0u, 0u, 0u, 0u);
            if (c0 + key < T) {
                kv = *(const uint4*)(kb + (long long)(c0 + key) * XA_D + part * 8);
                vv = *(const uint4*)(vb + (long long)(c0 + key) * XA_D + part * 8);
            }
            *(uint4*)(ks + key * XA_KS + part * 8) = kv;
            const bf16_t* ve = (const bf16_t*)&vv;
#pragma unroll
            for (int e = 0; e < 8; e++) vt[(part * 8 + e) * XA_VS + key] = ve[e];
        }
        for (int i = threadIdx.x; i < XA_CHUNK; i += 128) ms[i] = c0 + i < T ? mb[c0 + i] * LOG2E : -INFINITY;
        __syncthreads();
        // S = Q Kᵀ over the chunk: 8 tiles of 8 keys.
        float s[8][4];
#pragma unroll
        for (int j = 0; j < 8; j++) {
            s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
            for (int kk = 0; kk < KSTEPS; kk++) {
                const unsigned* kr = (const unsigned*)(ks + (j * 8 + g) * XA_KS + kk * 16);
                const unsigned bb[2] = {kr[t4], kr[4 + t4]};
                mma_bf16_16816(s[j], qa[kk], bb);
            }
        }
        float cmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float x = s[j][e] * scale_log2 + ms[j * 8 + t4 * 2 + (e & 1)];
                s[j][e] = x;
                cmax[e >> 1] = fmaxf(cmax[e >> 1], x);
            }
        float msafe[2];
#pragma unroll
        for (int r = 0; r < 2; r++) {
            cmax[r] = fmaxf(cmax[r], __shfl_xor_sync(0xffffffffu, cmax[r], 1));
            cmax[r] = fmaxf(cmax[r], __shfl_xor_sync(0xffffffffu, cmax[r], 2));
            const float mnew = fmaxf(mrow[r], cmax[r]);
            msafe[r] = mnew == -INFINITY ? 0.f : mnew;  // a row with every key so far masked by -inf
            const float alpha = exp2f(mrow[r] - msafe[r]);
            lrow[r] *= alpha;
#pragma unroll
            for (int n = 0; n < NT; n++) {
                o[n][2 * r] *= alpha;
                o[n][2 * r + 1] *= alpha;
            }
            mrow[r] = mnew;
        }
#pragma unroll
        for (int j = 0; j < 8; j++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                const float p = exp2f(s[j][e] - msafe[e >> 1]);
                s[j][e] = p;
                lrow[e >> 1] += p;
            }
        // O += P V: four k16 steps over the chunk's keys, D/8 tiles of 8 along the head dim.
#pragma unroll
        for (int kk = 0; kk < 4; kk++) {
            const unsigned pa[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                                    pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                    pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int n = 0; n < NT; n++) {
                const unsigned* vr = (const unsigned*)(vt + (n * 8 + g) * XA_VS + kk * 16);
                const unsigned bb[2] = {vr[t4], vr[4 + t4]};
                mma_bf16_16816(o[n], pa, bb);
            }
        }
    }
    float inv[2];
#pragma unroll
    for (int r = 0; r < 2; r++) {
        float l = lrow[r];
        l += __shfl_xor_sync(0xffffffffu, l, 1);
        l += __shfl_xor_sync(0xffffffffu, l, 2);
        inv[r] = l > 0.f ? 1.f / l : 0.f;
    }
    if (r0 < N) {
        unsigned* dst = (unsigned*)(out + ((long long)b * N + r0) * inner + h * XA_D);
#pragma unroll
        for (int n = 0; n < NT; n++) dst[n * 4 + t4] = pack_bf16(o[n][0] * inv[0], o[n][1] * inv[0]);
    }
    if (r1 < N) {
        unsigned* dst = (unsigned*)(out + ((long long)b * N + r1) * inner + h * XA_D);
#pragma unroll
        for (int n = 0; n < NT; n++) dst[n * 4 + t4] = pack_bf16(o[n][2] * inv[1], o[n][3] * inv[1]);
    }
}

#define XATTN(NAME, D)                                                                                      \
    extern "C" __global__ void __launch_bounds__(128)                                                       \
        NAME(const bf16_t* q, const bf16_t* k, const bf16_t* v, const float* mask, bf16_t* out, int N, int H, \
             int T, float scale_log2) {                                                                     \
        xattn<D>(q, k, v, mask, out, N, H, T, scale_log2);                                                  \
    }
XATTN(xattn_bf16_d32, 32)
XATTN(xattn_bf16_d64, 64)
XATTN(xattn_bf16_d112, 112)
