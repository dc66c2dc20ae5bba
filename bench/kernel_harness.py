"""Check and time the fleet CUDA kernels from Python, with no Rust build (docs: bench/README.md).

Run on the GPU machine from the repository root:  python3 bench/kernel_harness.py
It compiles src/pipelines/kernels/*.cu exactly as the Rust side does (common.cuh prepended, NVRTC through
CuPy), runs each kernel at the real shapes of Sana 1600M / DC-AE f32c32 on fresh random inputs, compares
with a torch reference computed in f32 from the same bf16 inputs (relative L2, bound beside it), checks that
every output element was written (outputs are poisoned with NaN first), and times kernel and torch with CUDA
events (median of 50 after warm-up). Exit status 1 if any check fails.
"""
import os
import sys
import warnings

import cupy
import numpy as np
import torch
import torch.nn.functional as F

warnings.filterwarnings("ignore", category=DeprecationWarning)
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
KDIR = os.path.join(ROOT, "src", "pipelines", "kernels")
if not os.path.isdir(KDIR):
    KDIR = os.path.join(ROOT, "pipelines", "src", "kernels")


def module(name, defines=()):
    src = open(os.path.join(KDIR, "common.cuh")).read() + "\n" + open(os.path.join(KDIR, name)).read()
    return cupy.RawModule(code=src, options=("--std=c++17",) + tuple(f"-D{d}" for d in defines))


def ptr(t):
    return np.uint64(t.data_ptr()) if t is not None else np.uint64(0)


def i32(v):
    return np.int32(v)


def i64(v):
    return np.int64(v)


def launch(fn, grid, block, args, shared=0):
    stream = torch.cuda.current_stream().cuda_stream
    with cupy.cuda.ExternalStream(stream):
        fn(grid, block, args, shared_mem=shared)


def bench(f, n=15, inner=20, graph=False):
    """Median over n of (time of `inner` back-to-back calls) / inner, in µs. The calls are captured once in
    a CUDA graph with `graph` (our kernels: CuPy launches only), so Python's launch cost (about 10-25 µs
    a launch) is not in the figure; otherwise (torch eager) they run back to back from Python and a kernel
    shorter than its launch cost reads as that cost."""
    if graph:
        return _bench_graph(f, n, inner)
    for _ in range(3):
        f()
    torch.cuda.synchronize()
    times = []
    for _ in range(n):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(inner):
            f()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1000.0 / inner)
    return float(np.median(times))


def _bench_graph(f, n, inner):
    s = cupy.cuda.Stream(non_blocking=True)
    ts = torch.cuda.ExternalStream(s.ptr)
    with torch.cuda.stream(ts):
        f()
        s.synchronize()
        s.begin_capture()
        try:
            for _ in range(inner):
                f()
        finally:
            g = s.end_capture()
    for _ in range(3):
        g.launch(stream=s)
    s.synchronize()
    times = []
    for _ in range(n):
        a, b = cupy.cuda.Event(), cupy.cuda.Event()
        a.record(s)
        g.launch(stream=s)
        b.record(s)
        b.synchronize()
        times.append(cupy.cuda.get_elapsed_time(a, b) * 1000.0 / inner)
    return float(np.median(times))


def rel_l2(out, ref):
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


ROWS = []
FAILED = []


def report(name, out, ref, bound, us_ours, us_torch):
    err = rel_l2(out, ref)
    unwritten = int(torch.isnan(out.float()).sum())
    ok = err <= bound and unwritten == 0 and not torch.isnan(ref).any()
    ROWS.append((name, err, bound, unwritten, us_ours, us_torch, ok))
    if not ok:
        FAILED.append(name)


def dwconv_case(mod, name, B, H, W, C, K, glu, in_bias, in_silu, bias, dtype=torch.bfloat16, strip=0):
    dev = "cuda"
    x = torch.randn(B, H, W, C, device=dev).to(dtype)
    wt = (torch.randn(C, 1, K, K, device=dev) / K).to(dtype)
    taps = wt.squeeze(1).permute(1, 2, 0).contiguous()
    b = torch.randn(C, device=dev).to(dtype) if bias else None
    ib = torch.randn(C, device=dev).to(dtype) if in_bias else None
    cout = C // 2 if glu else C
    out = torch.full((B, H, W, cout), float("nan"), device=dev, dtype=dtype)
    tag = "bf16" if dtype == torch.bfloat16 else "f32"
    vec = 8 if tag == "bf16" else 4
    v = vec if cout % vec == 0 else 1
    fast = v > 1 and ((not glu and K in (3, 5)) or (glu and K == 3))
    kname = f"dwconv_{tag}_" + (f"v{v}_k{K}" if fast else "v1_kn") + ("_glu" if glu else "")
    if strip:
        kname = f"dwstrip_{tag}_v{v}_k{K}_r{strip}" + ("_glu" if glu else "")
    fn = mod.get_function(kname)
    total = B * H * W * (cout // v) if not strip else B * (-(-H // strip)) * W * (cout // v)
    args = (ptr(x), ptr(taps), ptr(b), ptr(ib), i32(in_silu), ptr(out), i32(B), i32(H), i32(W), i32(C), i32(K))
    run = lambda: launch(fn, ((total + 255) // 256,), (256,), args)
    run()
    torch.cuda.synchronize()

    def ref_fn(xin):
        y = xin.float()
        if ib is not None:
            y = y + ib.float()
        if in_silu:
            y = F.silu(y)
        y = F.conv2d(y.permute(0, 3, 1, 2), wt.float(), b.float() if b is not None else None, padding=K // 2, groups=C)
        y = y.permute(0, 2, 3, 1)
        if glu:
            a, g = y.chunk(2, dim=-1)
            y = a * F.silu(g)
        return y

    ref = ref_fn(x)

    def torch_eager():  # what diffusers runs, in the model dtype
        y = x
        if ib is not None:
            y = y + ib
        if in_silu:
            y = F.silu(y)
        y = F.conv2d(y.permute(0, 3, 1, 2), wt, b, padding=K // 2, groups=C)
        if glu:
            a, g = y.chunk(2, dim=1)
            y = a * F.silu(g)
        return y

    report(f"{name} [{kname}]", out.float(), ref, 1e-2 if dtype == torch.bfloat16 else 1e-5, bench(run, graph=True), bench(torch_eager))


def linear_attn_case(mod, name, B, N, G, d, interleaved, dtype=torch.bfloat16):
    dev = "cuda"
    tag = "bf16" if dtype == torch.bfloat16 else "f32"
    if interleaved:  # DC-AE: (B, N, G, 3d) with q | k | v per group
        allt = torch.randn(B, N, G, 3 * d, device=dev).to(dtype)
        q, k, v = allt[..., :d], allt[..., d:2 * d], allt[..., 2 * d:]
        base = allt
        sb, sn, sg = N * G * 3 * d, G * 3 * d, 3 * d
        qp, kp, vp = allt.data_ptr(), allt.data_ptr() + d * allt.element_size(), allt.data_ptr() + 2 * d * allt.element_size()
    else:  # transformer: three (B, N, G·d) projections
        q, k, v = [torch.randn(B, N, G, d, device=dev).to(dtype) for _ in range(3)]
        sb, sn, sg = N * G * d, G * d, d
        qp, kp, vp = q.data_ptr(), k.data_ptr(), v.data_ptr()
    P = d * (d + 1)
    nchunks = max(1, min((N + 31) // 32, -(-4 * 132 // (B * G))))
    chunk = -(-N // nchunks)
    chunk = -(-chunk // 32) * 32
    nchunks = -(-N // chunk)
    partial = torch.empty(B * G * nchunks * P, device=dev, dtype=torch.float32)
    kv = torch.empty(B * G * P, device=dev, dtype=torch.float32)
    out = torch.full((B, N, G, d), float("nan"), device=dev, dtype=dtype)
    if d == 32:
        tag = tag + "_d32"
    f1 = mod.get_function(f"la_kv_partial_{tag}")
    f2 = mod.get_function("la_kv_reduce")
    f3 = mod.get_function(f"la_apply_{tag}")

    def run():
        launch(f1, (B * G, nchunks), (256,), (np.uint64(kp), np.uint64(vp), ptr(partial), i32(G), i32(N), i32(d), i64(sb), i64(sn), i64(sg), i32(chunk)))
        launch(f2, ((B * G * P + 255) // 256,), (256,), (ptr(partial), ptr(kv), i32(B * G), i32(nchunks), i32(P)))
        launch(f3, (B * G, (N + 63) // 64), (256,), (np.uint64(qp), ptr(kv), ptr(out), i32(G), i32(G), i32(N), i32(d), i64(sb), i64(sn), i64(sg), np.float32(1e-15)))

    run()
    # The same apply into the second half of a (B, N, 2G, d) output (a DC-AE scale writing its own
    # columns): those columns must equal `out`, the first half must stay untouched (NaN).
    wide = torch.full((B, N, 2 * G, d), float("nan"), device=dev, dtype=dtype)
    launch(f3, (B * G, (N + 63) // 64), (256,), (np.uint64(qp), ptr(kv), np.uint64(wide.data_ptr() + G * d * wide.element_size()), i32(G), i32(2 * G), i32(N), i32(d), i64(sb), i64(sn), i64(sg), np.float32(1e-15)))
    torch.cuda.synchronize()
    wide_ok = torch.equal(wide[:, :, G:], out) and bool(torch.isnan(wide[:, :, :G].float()).all())

    def reference(q, k, v):  # SanaLinearAttnProcessor2_0 in f32
        qf, kf, vf = [t.float().permute(0, 2, 3, 1) for t in (q, k, v)]  # (B, G, d, N)
        qf, kf = F.relu(qf), F.relu(kf)
        vf = F.pad(vf, (0, 0, 0, 1), mode="constant", value=1.0)
        scores = torch.matmul(vf, kf.transpose(-1, -2))
        o = torch.matmul(scores, qf)
        o = o[:, :, :-1] / (o[:, :, -1:] + 1e-15)
        return o.permute(0, 3, 1, 2)  # (B, N, G, d)

    ref = reference(q, k, v)
    report(f"{name} [la_*_{tag}], into columns {G}..{2 * G} of {2 * G} groups alike: {wide_ok}", out.float() if wide_ok else out.float() * float("nan"), ref, 1e-2 if dtype == torch.bfloat16 else 1e-5, bench(run, graph=True), bench(lambda: reference(q, k, v)))


def norm_cases(mod, dtype=torch.bfloat16):
    dev = "cuda"
    tag = "bf16" if dtype == torch.bfloat16 else "f32"
    B, N, D = 2, 1024, 2240
    x = (torch.randn(B, N, D, device=dev) * 3 + 0.5).to(dtype)
    table = (torch.randn(6, D, device=dev) * 0.2).to(dtype)
    temb = (torch.randn(B, 6 * D, device=dev) * 0.2).to(dtype)
    out = torch.full_like(x, float("nan"))
    fn = mod.get_function(f"ln_modulate_{tag}")
    run = lambda: launch(fn, (B * N,), (256,), (ptr(x), ptr(table), ptr(temb), ptr(out), i32(N), i32(D), i32(0), i32(1), np.float32(1e-6)))
    run()
    torch.cuda.synchronize()
    mods = table.float()[None] + temb.float().reshape(B, 6, D)
    ref = F.layer_norm(x.float(), (D,), eps=1e-6) * (1 + mods[:, 1:2]) + mods[:, 0:1]
    modsb = table[None] + temb.reshape(B, 6, D)
    eager = lambda: F.layer_norm(x, (D,), eps=1e-6) * (1 + modsb[:, 1:2]) + modsb[:, 0:1]
    report(f"ln+modulate (2,1024,2240) [ln_modulate_{tag}]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))

    y = torch.randn(B, N, D, device=dev).to(dtype)
    out = torch.full_like(x, float("nan"))
    fn = mod.get_function(f"gated_residual_{tag}")
    total = B * N * D
    run = lambda: launch(fn, ((total + 255) // 256,), (256,), (ptr(x), ptr(y), ptr(table), ptr(temb), ptr(out), i64(total), i32(N), i32(D), i32(2)))
    run()
    torch.cuda.synchronize()
    ref = x.float() + y.float() * mods[:, 2:3]
    eager = lambda: x + y * modsb[:, 2:3]
    report(f"gated residual (2,1024,2240) [gated_residual_{tag}]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))


def softmax_case(mod):
    dev = "cuda"
    B, H, N, T = 2, 20, 1024, 300
    s = torch.randn(B, H, N, T, device=dev) * 4
    mask = torch.zeros(B, 1, 1, T, device=dev)
    mask[:, :, :, 40:] = float("-inf")
    mask[1, :, :, 200:] = -10000.0
    out = torch.full((B, H, N, T), float("nan"), device=dev, dtype=torch.bfloat16)
    fn = mod.get_function("masked_softmax_bf16")
    rows = B * H * N
    scale = 112 ** -0.5
    run = lambda: launch(fn, ((rows + 7) // 8,), (256,), (ptr(s), ptr(mask), ptr(out), i64(rows), i32(H * N), i32(T), np.float32(scale)))
    run()
    torch.cuda.synchronize()
    ref = torch.softmax(s * scale + mask, dim=-1)
    eager = lambda: torch.softmax(s * scale + mask, dim=-1).to(torch.bfloat16)
    report("scale+mask+softmax (2,20,1024,300) [masked_softmax_bf16]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))


def dwtile_case(dw, nm, name, B, H, W, Cin):
    """GLUMBConv middle, tiled kernel vs the two-launch path it replaces (bias_rows_act + dwconv GLU)."""
    dev = "cuda"
    cout = Cin // 2
    x = torch.randn(B, H, W, Cin, device=dev).to(torch.bfloat16)
    wt = (torch.randn(Cin, 1, 3, 3, device=dev) / 3).to(torch.bfloat16)
    taps = wt.squeeze(1).permute(1, 2, 0).contiguous()
    b = torch.randn(Cin, device=dev).to(torch.bfloat16)
    ib = torch.randn(Cin, device=dev).to(torch.bfloat16)
    out = torch.full((B, H, W, cout), float("nan"), device=dev, dtype=torch.bfloat16)
    fn = dw.get_function("dwtile_bf16_k3_glu")
    tiles = B * (-(-H // 8)) * (-(-W // 8))
    run = lambda: launch(fn, (tiles, cout // 32), (256,), (ptr(x), ptr(taps), ptr(b), ptr(ib), ptr(out), i32(B), i32(H), i32(W), i32(Cin)))
    run()
    torch.cuda.synchronize()
    y = F.silu(x.float() + ib.float()).to(torch.bfloat16).float()
    y = F.conv2d(y.permute(0, 3, 1, 2), wt.float(), b.float(), padding=1, groups=Cin).permute(0, 2, 3, 1)
    a, g = y.chunk(2, dim=-1)
    ref = a * F.silu(g)
    # The path it replaces: silu(x + ib) in one pass, then the per-thread GLU conv.
    act = torch.empty_like(x)
    mid = torch.empty_like(out)
    f_bias = nm.get_function("bias_rows_bf16_v8")
    f_old = dw.get_function("dwconv_bf16_v8_k3_glu")
    total = x.numel()

    def old():
        launch(f_bias, ((total // 8 + 255) // 256,), (256,), (ptr(x), ptr(ib), ptr(None), ptr(act), i64(total), i32(Cin), i32(1)))
        n = B * H * W * (cout // 8)
        launch(f_old, ((n + 255) // 256,), (256,), (ptr(act), ptr(taps), ptr(b), ptr(None), i32(0), ptr(mid), i32(B), i32(H), i32(W), i32(Cin), i32(3)))

    old()
    torch.cuda.synchronize()
    same = bool(torch.equal(out, mid))
    report(f"{name} [dwtile_bf16_k3_glu; old 2-launch path in torch column; bit-equal to it: {same}]", out.float(), ref, 1e-2, bench(run, graph=True), bench(old, graph=True))


def dwtile_plain_case(dw, name, B, H, W, C, K):
    """Plain depthwise k×k (DC-AE multiscale projection), tiled kernel vs the per-thread one."""
    dev = "cuda"
    x = torch.randn(B, H, W, C, device=dev).to(torch.bfloat16)
    wt = (torch.randn(C, 1, K, K, device=dev) / K).to(torch.bfloat16)
    taps = wt.squeeze(1).permute(1, 2, 0).contiguous()
    out = torch.full((B, H, W, C), float("nan"), device=dev, dtype=torch.bfloat16)
    fn = dw.get_function(f"dwtile_bf16_k{K}")
    tiles = B * (-(-H // 8)) * (-(-W // 8))
    run = lambda: launch(fn, (tiles, C // 32), (256,), (ptr(x), ptr(taps), ptr(None), ptr(None), ptr(out), i32(B), i32(H), i32(W), i32(C)))
    run()
    torch.cuda.synchronize()
    ref = F.conv2d(x.float().permute(0, 3, 1, 2), wt.float(), None, padding=K // 2, groups=C).permute(0, 2, 3, 1)
    old_out = torch.empty_like(out)
    f_old = dw.get_function(f"dwconv_bf16_v8_k{K}")
    n = B * H * W * (C // 8)
    old = lambda: launch(f_old, ((n + 255) // 256,), (256,), (ptr(x), ptr(taps), ptr(None), ptr(None), i32(0), ptr(old_out), i32(B), i32(H), i32(W), i32(C), i32(K)))
    report(f"{name} [dwtile_bf16_k{K}; per-thread dwconv_bf16_v8_k{K} in torch column]", out.float(), ref, 1e-2, bench(run, graph=True), bench(old, graph=True))


def rgb_u8_case(im, name, B, H, W, OH, OW):
    """Decoder output to 8-bit RGB (resize to the cover size, centre crop, denormalise, quantise) against
    torch's bilinear interpolate in f32: at most 1 LSB apart (bf16 rounding of the interpolated value)."""
    dev = "cuda"
    x = (torch.rand(B, 3, H, W, device=dev) * 2.2 - 1.1).to(torch.bfloat16)
    ratio = max(OH / H, OW / W)
    RH, RW = max(int(H * ratio), OH), max(int(W * ratio), OW)
    SY, SX = (RH - OH) // 2, (RW - OW) // 2
    resize = int((RH, RW) != (H, W))
    out = torch.full((B, OH, OW, 3), 7, device=dev, dtype=torch.uint8)
    fn = im.get_function("rgb_u8_bf16")
    n = B * OH * OW
    run = lambda: launch(fn, ((n + 255) // 256,), (256,), (ptr(x), ptr(out), i32(B), i32(H), i32(W), i32(RH), i32(RW), i32(OH), i32(OW), i32(SY), i32(SX), i32(resize)))
    run()
    torch.cuda.synchronize()
    y = x.float()
    if resize:
        y = F.interpolate(y, size=(RH, RW), mode="bilinear", align_corners=False)[:, :, SY:SY + OH, SX:SX + OW]
    ref = ((y * 0.5 + 0.5).clamp(0, 1) * 255).round().permute(0, 2, 3, 1)
    diff = (out.float() - ref).abs().max().item()
    ok = diff <= 1.0
    ROWS.append((f"{name} [rgb_u8_bf16] (max |Δ| {diff:.0f} LSB vs torch f32)", diff / 255.0, 1 / 255.0, 0, bench(run, graph=True), float("nan"), ok))
    if not ok:
        FAILED.append(name)


def layout_cases(nm):
    dev = "cuda"
    bf = torch.bfloat16
    # gated residual, vectorised
    B, N, D = 2, 1024, 2240
    x = torch.randn(B, N, D, device=dev).to(bf)
    y = torch.randn(B, N, D, device=dev).to(bf)
    table = (torch.randn(6, D, device=dev) * 0.2).to(bf)
    temb = (torch.randn(B, 6 * D, device=dev) * 0.2).to(bf)
    out = torch.full_like(x, float("nan"))
    fn = nm.get_function("gated_residual_bf16_v8")
    total = B * N * D
    run = lambda: launch(fn, ((total // 8 + 255) // 256,), (256,), (ptr(x), ptr(y), ptr(table), ptr(temb), ptr(out), i64(total), i32(N), i32(D), i32(2)))
    run()
    torch.cuda.synchronize()
    mods = table.float()[None] + temb.float().reshape(B, 6, D)
    ref = x.float() + y.float() * mods[:, 2:3]
    modsb = table[None] + temb.reshape(B, 6, D)
    report("gated residual (2,1024,2240) [gated_residual_bf16_v8]", out.float(), ref, 1e-2, bench(run, graph=True), bench(lambda: x + y * modsb[:, 2:3]))
    # channels-last RMSNorm (+ bias, residual, silu) at the decoder's sizes
    # act: 0 none, 1 SiLU, 2 ReLU (the Sana decoder's norm_out -> ReLU)
    for (rows, C, res, act) in [(1024 * 1024, 128, True, 0), (256 * 256, 512, True, 0), (1024 * 1024, 128, False, 1), (1024 * 1024, 128, False, 2), (64 * 64, 1024, True, 0), (37, 24, True, 1)]:
        h = torch.randn(rows, C, device=dev).to(bf)
        r_ = torch.randn(rows, C, device=dev).to(bf) if res else None
        w = torch.randn(C, device=dev).to(bf)
        bias = torch.randn(C, device=dev).to(bf)
        out = torch.full_like(h, float("nan"))
        nv = C // 8
        lpr = 32 if nv >= 64 else 16 if nv >= 32 else 8 if nv >= 16 else 4 if nv >= 8 else 2 if nv >= 4 else 1
        m = 2 if nv <= 2 * lpr else 4
        fn = nm.get_function(f"rms_rows_bf16_m{m}")
        per_block = 8 * (32 // lpr)
        run = lambda: launch(fn, ((rows + per_block - 1) // per_block,), (256,), (ptr(h), ptr(w), ptr(bias), ptr(r_), ptr(out), i64(rows), i32(C), np.float32(1e-5), i32(act), i32(lpr)))
        run()
        torch.cuda.synchronize()
        hf = h.float()
        ref = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf).float() * w.float() + bias.float()
        if res:
            ref = ref + r_.float()
        if act == 1:
            ref = F.silu(ref.to(bf).float())
        if act == 2:
            ref = F.relu(ref.to(bf).float())

        def eager():
            var = h.float().pow(2).mean(-1, keepdim=True)
            t = (h.float() * torch.rsqrt(var + 1e-5)).to(bf) * w + bias
            if res:
                t = t + r_
            return F.silu(t) if act == 1 else F.relu(t) if act == 2 else t

        report(f"rms rows ({rows},{C}) res={res} act={act} [rms_rows_bf16_m{m}]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))
    # Sana-Sprint's q and k norms on the fused q|k|v projection (rows, 3·2240), v copied: one pass against
    # torch's three ops (two RMSNorms of the narrowed columns and the copy out of v).
    rows, C = 2 * 1024, 2240
    qkv = torch.randn(rows, 3 * C, device=dev).to(bf)
    wq, wk = torch.randn(C, device=dev).to(bf), torch.randn(C, device=dev).to(bf)
    out = torch.full_like(qkv, float("nan"))
    fn = nm.get_function("rms_segments_bf16")
    run = lambda: launch(fn, ((rows + 7) // 8, 3), (256,), (ptr(qkv), ptr(wq), ptr(wk), ptr(None), ptr(out), i64(rows), i32(3), i32(C), np.float32(1e-5)))
    run()
    torch.cuda.synchronize()

    def rms(t, w):
        return (t.float() * torch.rsqrt(t.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(bf) * w

    ref = torch.cat([rms(qkv[:, :C], wq).float(), rms(qkv[:, C:2 * C], wk).float(), qkv[:, 2 * C:].float()], -1)
    v_equal = bool(torch.equal(out[:, 2 * C:], qkv[:, 2 * C:]))
    eager = lambda: (rms(qkv[:, :C], wq), rms(qkv[:, C:2 * C], wk), qkv[:, 2 * C:].contiguous())
    report(f"Sprint q|k norms + v copy ({rows},3·{C}) [rms_segments_bf16], v bits equal: {v_equal}", out.float(), ref, 1e-2 if v_equal else -1, bench(run, graph=True), bench(eager))
    # nearest ×2 upsample and the up-block shortcut, channels-last
    for (B, H, W, C) in [(1, 256, 256, 256), (1, 512, 512, 128)]:
        xin = torch.randn(B, H, W, C, device=dev).to(bf)
        out = torch.full((B, 2 * H, 2 * W, C), float("nan"), device=dev, dtype=bf)
        fn = nm.get_function("upsample2x_nhwc_bf16_v8")
        n = B * 4 * H * W * C // 8
        run = lambda: launch(fn, ((n + 255) // 256,), (256,), (ptr(xin), ptr(out), i32(B), i32(H), i32(W), i32(C)))
        run()
        torch.cuda.synchronize()
        ref = F.interpolate(xin.permute(0, 3, 1, 2).float(), scale_factor=2, mode="nearest").permute(0, 2, 3, 1)
        eager = lambda: F.interpolate(xin.permute(0, 3, 1, 2), scale_factor=2, mode="nearest")
        report(f"upsample2x nhwc ({B},{H},{W},{C}) [upsample2x_nhwc_bf16_v8]", out.float(), ref, 0.0, bench(run, graph=True), bench(eager))
    for (B, H, W, Ci, Co) in [(1, 256, 256, 512, 256), (1, 128, 128, 1024, 512), (1, 3, 5, 16, 8)]:
        r = 4 * Co // Ci
        xin = torch.randn(B, H, W, Ci, device=dev).to(bf)
        main_ = torch.randn(B, 2 * H, 2 * W, Co, device=dev).to(bf)
        out = torch.full_like(main_, float("nan"))
        fn = nm.get_function("up_shortcut_add_nhwc_bf16_v8")
        n = B * 4 * H * W * Co // 8
        run = lambda: launch(fn, ((n + 255) // 256,), (256,), (ptr(main_), ptr(xin), ptr(out), i32(B), i32(Co), i32(Ci), i32(H), i32(W), i32(r)))
        run()
        torch.cuda.synchronize()
        sc = F.pixel_shuffle(xin.permute(0, 3, 1, 2).float().repeat_interleave(r, dim=1), 2).permute(0, 2, 3, 1)
        ref = main_.float() + sc
        eager = lambda: main_ + F.pixel_shuffle(xin.permute(0, 3, 1, 2).repeat_interleave(r, dim=1), 2).permute(0, 2, 3, 1)
        report(f"up shortcut add nhwc ({B},{H},{W},{Ci}->{Co}) [up_shortcut_add_nhwc_bf16_v8]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))


def xattn_case(mod, name, B, N, H, T, masked_from=None, d=32, live=None, whole=None):
    """Flash cross-attention (attention.cu) against torch in f32 from the same bf16 inputs; the comparison
    column is the path it replaces (f32 scores GEMM, masked softmax, bf16 PV GEMM) in torch eager.
    `live`: per batch row, the number of leading keys with mask 0 (the rest -10000, Sana's caption padding).
    `whole`: the module built with XA_SKIP_DEAD=0; the name then says whether skipping kept every bit."""
    dev = "cuda"
    q = torch.randn(B, N, H * d, device=dev).to(torch.bfloat16)
    k = torch.randn(B, H, T, d, device=dev).to(torch.bfloat16)
    v = torch.randn(B, H, T, d, device=dev).to(torch.bfloat16)
    mask = torch.zeros(B, T, device=dev)
    if masked_from is not None:
        mask[B - 1, masked_from:] = -10000.0
        if B > 1:
            mask[0, T - 3:] = float("-inf")
    for i, n in enumerate(live or []):
        mask[i, n:] = -10000.0
    out = torch.full((B, N, H * d), float("nan"), device=dev, dtype=torch.bfloat16)
    fn = mod.get_function(f"xattn_bf16_d{d}")
    scale = d ** -0.5
    args = lambda o: (ptr(q), ptr(k), ptr(v), ptr(mask), ptr(o), i32(N), i32(H), i32(T), np.float32(scale * 1.4426950408889634))
    run = lambda: launch(fn, ((N + 63) // 64, H, B), (128,), args(out))
    run()
    torch.cuda.synchronize()
    if whole is not None:
        out_whole = torch.full_like(out, float("nan"))
        fw = whole.get_function(f"xattn_bf16_d{d}")
        run_whole = lambda: launch(fw, ((N + 63) // 64, H, B), (128,), args(out_whole))
        run_whole()
        torch.cuda.synchronize()
        same = bool(torch.equal(out.view(torch.int16), out_whole.view(torch.int16)))
        name = f"{name}; bits equal to every chunk run: {same}, which takes {bench(run_whole, graph=True):.1f} µs"
        if not same:
            FAILED.append(name)
    qh = q.float().view(B, N, H, d).transpose(1, 2)
    att = torch.softmax(qh @ k.float().transpose(2, 3) * scale + mask[:, None, None, :], dim=-1)
    ref = (att @ v.float()).transpose(1, 2).reshape(B, N, H * d)

    def eager():
        s = q.view(B, N, H, d).transpose(1, 2).float() @ k.float().transpose(2, 3)
        p = torch.softmax(s * scale + mask[:, None, None, :], dim=-1).to(torch.bfloat16)
        return (p @ v).transpose(1, 2).reshape(B, N, H * d)

    report(f"{name} [xattn_bf16_d{d}]", out.float(), ref, 1e-2, bench(run, graph=True), bench(eager))


def gemma_cases(mod):
    """gemma.cu at Gemma-2 2B's shapes (one 510-token prompt; hidden 2304, 8 query / 4 kv heads of 256,
    intermediate 9216), against torch in f32 with the roundings the unfused ops make."""
    dev, bf = "cuda", torch.bfloat16
    L, D, nh, nkv, d, I, eps = 510, 2304, 8, 4, 256, 9216, 1e-6

    def rms(x, scale):
        x = x.float()
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * scale

    h = torch.randn(L, D, device=dev).to(bf)
    res = (torch.randn(L, D, device=dev) * 4).to(bf)
    sa = 1 + (torch.randn(D, device=dev) * 0.1).to(bf).float()
    sb = 1 + (torch.randn(D, device=dev) * 0.1).to(bf).float()
    ox = torch.full((L, D), float("nan"), device=dev, dtype=bf)
    oh = torch.full((L, D), float("nan"), device=dev, dtype=bf)
    fn = mod.get_function("gemma_norm_bf16_m4")
    nv = D // 8  # 8-element vectors a row, as few a thread as 1024 threads allow (the launcher's choice)
    per = -(-nv // 1024)
    threads = min(1024, (-(-nv // per) + 31) // 32 * 32)
    run = lambda: launch(fn, (L,), (threads,), (ptr(h), ptr(res), ptr(sa), ptr(sb), ptr(ox), ptr(oh), i32(D), np.float32(eps)))
    run()
    torch.cuda.synchronize()
    ref_x = (res.float() + rms(h, sa).to(bf).float()).to(bf)
    ref_h = rms(ref_x, sb)
    eager = lambda: rms((res.float() + rms(h, sa).to(bf).float()).to(bf), sb).to(bf)
    us, ut = bench(run, graph=True), bench(eager)
    report("Gemma norm+residual+norm (510,2304): x [gemma_norm_bf16_m4]", ox.float(), ref_x.float(), 1e-2, us, ut)
    report("Gemma norm+residual+norm (510,2304): next norm", oh.float(), ref_h, 1e-2, us, ut)

    half = d // 2
    inv = 1.0 / (10000.0 ** (torch.arange(0, half, device=dev, dtype=torch.float32) * 2 / d))
    ang = torch.arange(8192, device=dev, dtype=torch.float32)[:, None] * inv[None, :]
    cos, sin = ang.cos().to(bf).contiguous(), ang.sin().to(bf).contiguous()
    width = (nh + 2 * nkv) * d
    qkv = torch.randn(1, L, width, device=dev).to(bf)
    q = torch.full((1, nh, L, d), float("nan"), device=dev, dtype=bf)
    k = torch.full((1, nkv, L, d), float("nan"), device=dev, dtype=bf)
    v = torch.full((1, nkv, L, d), float("nan"), device=dev, dtype=bf)
    fn = mod.get_function("gemma_rope_split_bf16")
    total = L * (nh + 2 * nkv) * half
    run = lambda: launch(fn, ((total + 255) // 256,), (256,), (ptr(qkv), ptr(cos), ptr(sin), ptr(q), ptr(k), ptr(v), i32(1), i32(L), i32(nh), i32(nkv), i32(d)))
    run()
    torch.cuda.synchronize()

    def rot(x):  # transformers' apply_rotary_pos_emb in bf16
        c = torch.cat([cos[:L], cos[:L]], -1)
        s_ = torch.cat([sin[:L], sin[:L]], -1)
        x1, x2 = x[..., :half], x[..., half:]
        return x * c + torch.cat([-x2, x1], -1) * s_

    def ref_split():
        heads = qkv.view(1, L, nh + 2 * nkv, d).transpose(1, 2)
        return rot(heads[:, :nh]), rot(heads[:, nh:nh + nkv]), heads[:, nh + nkv:]

    rq, rk, rv = ref_split()
    us, ut = bench(run, graph=True), bench(lambda: [t.contiguous() for t in ref_split()])
    report("Gemma RoPE + head split (1,510,4096): q [gemma_rope_split_bf16]", q.float(), rq.float(), 1e-2, us, ut)
    report("Gemma RoPE + head split (1,510,4096): k", k.float(), rk.float(), 1e-2, us, ut)
    report("Gemma RoPE + head split (1,510,4096): v", v.float(), rv.float(), 1e-6, us, ut)

    # (B, keys of each row valid, queries): Lq = L is the whole sequence; Lq = 299 the positions after a
    # cached 160-token prefix (queries at positions Lk - Lq .. Lk - 1).
    # After a cached prefix of P positions the launcher passes the tables from row P (a narrowed view).
    P = 160
    S = L - P
    qkv_s = qkv[:, P:].contiguous()
    qs = torch.full((1, nh, S, d), float("nan"), device=dev, dtype=bf)
    ks = torch.full((1, nkv, S, d), float("nan"), device=dev, dtype=bf)
    vs = torch.full((1, nkv, S, d), float("nan"), device=dev, dtype=bf)
    launch(fn, ((S * (nh + 2 * nkv) * half + 255) // 256,), (256,), (ptr(qkv_s), ptr(cos[P:]), ptr(sin[P:]), ptr(qs), ptr(ks), ptr(vs), i32(1), i32(S), i32(nh), i32(nkv), i32(d)))
    torch.cuda.synchronize()
    same = torch.equal(qs, q[:, :, P:]) and torch.equal(ks, k[:, :, P:]) and torch.equal(vs, v[:, :, P:])
    report(f"Gemma RoPE + head split at positions {P}..{L} (tables from row {P}): q, bits equal to the whole run: {same}", qs.float() if same else qs.float() * float("nan"), rq[:, :, P:].float(), 1e-2, us, ut)

    for B, valid, Lq in ((1, [L], L), (2, [L, 300], L), (2, [L, 300], 299)):
        scores = (torch.randn(B, nkv, 2 * Lq, L, device=dev) * 30).to(bf)
        mask = torch.full((B, 1, Lq, L), torch.finfo(torch.float32).min, device=dev)
        for b, n in enumerate(valid):
            keep = torch.ones(L, L, device=dev, dtype=torch.bool).tril()[L - Lq:]
            keep[:, n:] = False
            mask[b, 0][keep] = 0.0
        rows = B * nh * Lq
        scale, cap = 256 ** -0.5, 50.0
        outs = {}
        for kname in ("gemma_softmax_bf16", "gemma_softmax_bf16_r16"):
            fn = mod.get_function(kname)
            out = torch.full(scores.shape, float("nan"), device=dev, dtype=bf)
            run = lambda: launch(fn, ((rows + 7) // 8,), (256,), (ptr(scores), ptr(mask), ptr(out), i64(rows), i32(nh), i32(Lq), i32(L), np.float32(scale), np.float32(1 / cap), np.float32(cap)))
            run()
            torch.cuda.synchronize()
            outs[kname] = (out, bench(run, graph=True))
        out = outs["gemma_softmax_bf16"][0]
        same = torch.equal(outs["gemma_softmax_bf16"][0], outs["gemma_softmax_bf16_r16"][0])

        def ref_p():
            s_ = scores.float() * scale
            s_ = torch.tanh(s_ / cap) * cap
            return torch.softmax(s_.view(B, nh, Lq, L) + mask, dim=-1).view(scores.shape)

        ut = bench(lambda: ref_p().to(bf))
        report(f"Gemma softcap+mask+softmax ({B},8,{Lq},{L}) [gemma_softmax_bf16]", out.float(), ref_p(), 1e-2, outs["gemma_softmax_bf16"][1], ut)
        # The register variant must give the same bits (NaN-poisoned output compared whole).
        r16 = outs["gemma_softmax_bf16_r16"][0].float()
        report(f"Gemma softcap+mask+softmax ({B},8,{Lq},{L}) [gemma_softmax_bf16_r16], bits equal: {same}", r16 if same else r16 * float("nan"), ref_p(), 1e-2, outs["gemma_softmax_bf16_r16"][1], ut)

    gu = torch.randn(L, 2 * I, device=dev).to(bf)
    out = torch.full((L, I), float("nan"), device=dev, dtype=bf)
    fn = mod.get_function("gemma_gelu_mul_bf16")
    run = lambda: launch(fn, ((L * I // 8 + 255) // 256,), (256,), (ptr(gu), ptr(out), i64(L), i32(I)))
    run()
    torch.cuda.synchronize()
    ref_g = lambda: F.gelu(gu[:, :I].float(), approximate="tanh").to(bf).float() * gu[:, I:].float()
    report("Gemma gelu_tanh(gate)*up (510,2*9216) [gemma_gelu_mul_bf16]", out.float(), ref_g(), 1e-2, bench(run, graph=True), bench(lambda: (F.gelu(gu[:, :I], approximate="tanh") * gu[:, I:])))


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), "torch", torch.__version__, "cupy", cupy.__version__)
    at = module("attention.cu")
    at_whole = module("attention.cu", ("XA_SKIP_DEAD=0",))
    # As served: base's CFG pair (the negative "" keeps one live key, <bos>; a prompt of 23 tokens after
    # <bos>), Sprint's one prompt, and a row with no live key at all (that row runs every chunk).
    xattn_case(at, "cross-attn Sana (2,1024,20·112) T=300, 1 and 24 live keys", 2, 1024, 20, 300, d=112, live=[1, 24], whole=at_whole)
    xattn_case(at, "cross-attn Sprint (1,1024,20·112) T=300, 24 live keys", 1, 1024, 20, 300, d=112, live=[24], whole=at_whole)
    xattn_case(at, "cross-attn (2,1024,20·112) T=300, 0 and 130 live keys", 2, 1024, 20, 300, d=112, live=[0, 130], whole=at_whole)
    xattn_case(at, "cross-attn (2,1024,20·112) T=300, padded keys", 2, 1024, 20, 300, masked_from=120, d=112, whole=at_whole)
    xattn_case(at, "cross-attn Sana (2,1024,20·112) T=300, padded keys", 2, 1024, 20, 300, masked_from=120, d=112)
    xattn_case(at, "cross-attn Sana (2,1024,20·112) T=459", 2, 1024, 20, 459, d=112)
    xattn_case(at, "cross-attn ragged (1,77,3·112) T=13", 1, 77, 3, 13, masked_from=5, d=112)
    xattn_case(at, "cross-attn (1,8160,20·112) T=300 (3840x2160 latent)", 1, 8160, 20, 300, masked_from=200, d=112)
    xattn_case(at, "cross-attn (2,1024,35·64) T=300", 2, 1024, 35, 300, masked_from=120, d=64)
    xattn_case(at, "cross-attn (2,1024,70·32) T=300, padded keys", 2, 1024, 70, 300, masked_from=120)
    xattn_case(at, "cross-attn (2,1024,70·32) T=459", 2, 1024, 70, 459)
    xattn_case(at, "cross-attn ragged (1,77,3·32) T=13", 1, 77, 3, 13, masked_from=5)
    xattn_case(at, "cross-attn (1,8160,70·32) T=300 (3840x2160 latent)", 1, 8160, 70, 300, masked_from=200)
    if os.environ.get("HARNESS_ONLY") == "attention":
        return summary()
    gemma_cases(module("gemma.cu"))
    if os.environ.get("HARNESS_ONLY") == "gemma":
        return summary()
    dw = module("dwconv.cu")
    la = module("linear_attn.cu")
    nm = module("norm.cu")
    # Transformer GLUMBConv middle: silu(x + b_inv) -> dw3x3 + b -> GLU, 11 200 -> 5 600 channels.
    dwconv_case(dw, "GLUMBConv dw3x3+GLU (2,32,32,11200)", 2, 32, 32, 11200, 3, True, True, 1, True)
    # DC-AE GLUMBConv at 128² (512 ch: hidden 2·2048), and the multiscale 5×5 (3·512 channels, no bias).
    for r in (4, 8):
        dwconv_case(dw, f"GLUMBConv dw3x3+GLU (2,32,32,11200) strip {r}", 2, 32, 32, 11200, 3, True, True, 1, True, strip=r)
        dwconv_case(dw, f"DC-AE multiscale dw5x5 (1,128,128,1536) strip {r}", 1, 128, 128, 1536, 5, False, False, 0, False, strip=r)
    dwconv_case(dw, "DC-AE GLUMBConv dw3x3+GLU (1,128,128,4096) strip 4", 1, 128, 128, 4096, 3, True, True, 1, True, strip=4)
    dwconv_case(dw, "strip edge dw3x3+GLU (1,7,5,16) f32", 1, 7, 5, 16, 3, True, True, 1, True, dtype=torch.float32, strip=4)
    dwconv_case(dw, "strip edge dw5x5 (2,9,6,8) f32", 2, 9, 6, 8, 5, False, False, 0, True, dtype=torch.float32, strip=4)
    dwconv_case(dw, "strip edge dw3x3 (1,6,3,16) bf16", 1, 6, 3, 16, 3, False, True, 1, True, strip=4)
    dwconv_case(dw, "DC-AE GLUMBConv dw3x3+GLU (1,128,128,4096)", 1, 128, 128, 4096, 3, True, True, 1, True)
    dwconv_case(dw, "DC-AE multiscale dw5x5 (1,128,128,1536)", 1, 128, 128, 1536, 5, False, False, 0, False)
    dwconv_case(dw, "odd shape dw3x3 (2,5,7,6) f32", 2, 5, 7, 6, 3, False, False, 0, True, dtype=torch.float32)
    dwconv_case(dw, "odd shape dw3x3+GLU (2,5,7,6) f32", 2, 5, 7, 6, 3, True, True, 1, True, dtype=torch.float32)
    dwconv_case(dw, "dw3x3+GLU (1,6,5,16) f32 v4", 1, 6, 5, 16, 3, True, True, 1, True, dtype=torch.float32)
    dwconv_case(dw, "dw5x5 (1,6,5,16) f32 v4", 1, 6, 5, 16, 5, False, False, 0, False, dtype=torch.float32)
    dwconv_case(dw, "odd shape dw5x5 (1,3,4,10) bf16", 1, 3, 4, 10, 5, False, False, 0, True)
    linear_attn_case(la, "linear attn transformer (2,1024,70,32)", 2, 1024, 70, 32, False)
    linear_attn_case(la, "linear attn DC-AE (1,16384,32,3·32)", 1, 16384, 32, 32, True)
    linear_attn_case(la, "linear attn DC-AE (1,1024,64,3·32)", 1, 1024, 64, 32, True)
    linear_attn_case(la, "linear attn odd (1,37,3,5) f32", 1, 37, 3, 5, False, dtype=torch.float32)
    linear_attn_case(la, "linear attn d32 ragged (1,77,3,32) f32", 1, 77, 3, 32, False, dtype=torch.float32)
    norm_cases(nm)
    softmax_case(nm)
    dwtile_case(dw, nm, "GLUMBConv tiled dw3x3+GLU (2,32,32,11200)", 2, 32, 32, 11200)
    dwtile_case(dw, nm, "DC-AE GLUMBConv tiled dw3x3+GLU (1,128,128,4096)", 1, 128, 128, 4096)
    dwtile_case(dw, nm, "ragged tiled dw3x3+GLU (1,13,11,128)", 1, 13, 11, 128)
    dwtile_case(dw, nm, "tiled dw3x3+GLU (1,68,120,11200)", 1, 68, 120, 11200)
    dwtile_plain_case(dw, "DC-AE multiscale tiled dw5x5 (1,128,128,1536)", 1, 128, 128, 1536, 5)
    dwtile_plain_case(dw, "DC-AE multiscale tiled dw5x5 (1,32,32,3072)", 1, 32, 32, 3072, 5)
    dwtile_plain_case(dw, "ragged tiled dw5x5 (2,13,11,64)", 2, 13, 11, 64, 5)
    layout_cases(nm)
    im = module("image.cu")
    rgb_u8_case(im, "rgb 768x1344 -> 3840x2160", 1, 768, 1344, 2160, 3840)
    rgb_u8_case(im, "rgb 1024x1024 unresized, batch 2", 2, 1024, 1024, 1024, 1024)
    summary()


def summary():
    print()
    print("| kernel (shape) | rel L2 vs f32 torch | bound | unwritten | ours µs | torch eager µs | pass |")
    print("|---|---|---|---|---|---|---|")
    for name, err, bound, unw, us, ut, ok in ROWS:
        print(f"| {name} | {err:.2e} | {bound:.0e} | {unw} | {us:.1f} | {ut:.1f} | {'yes' if ok else 'NO'} |")
    if FAILED:
        print("FAILED:", ", ".join(FAILED))
        sys.exit(1)


if __name__ == "__main__":
    main()
