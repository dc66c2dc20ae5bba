"""Tiled depthwise variants (bench/dwtile_variants.cu) against the tree's dwtile_bf16_k3_glu / dwtile_bf16_k5:
bit-equality and time, "hot" (one input buffer, replayed: it may sit in L2) and "cold" (four buffers in turn,
more than L2), each in a CUDA graph of 20 launches (kernel_harness.bench). A GPU tool, not a test:
`python3 bench/dwtile_variants.py` on the GPU machine (torch + CuPy there)."""
import os, sys
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch, cupy
from kernel_harness import launch, ptr, i32, bench

KD = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "pipelines", "src", "kernels")
HERE = os.path.dirname(os.path.abspath(__file__))
common = open(os.path.join(KD, "common.cuh")).read()
# Reference: the tree's dwconv.cu (or REF_DWCONV, e.g. an older copy), plus the variants.
ref_src = open(os.environ.get("REF_DWCONV", os.path.join(KD, "dwconv.cu"))).read()
mod = cupy.RawModule(code=common + ref_src + open(os.path.join(HERE, "dwtile_variants.cu")).read(), options=("--std=c++17",))
new = cupy.RawModule(code=common + open(os.path.join(KD, "dwconv.cu")).read(), options=("--std=c++17",))
VAR = {  # name: (TH, TW, NT, chfast)
    "v_8x8_256": (8, 8, 256, False), "v_8x8_256_ch": (8, 8, 256, True), "v_8x8_256_m6": (8, 8, 256, False),
    "v_8x16_256": (8, 16, 256, False), "v_8x16_512": (8, 16, 512, False),
    "v_4x32_256": (4, 32, 256, False), "v_8x8_128": (8, 8, 128, False), "v_8x16_256_ch": (8, 16, 256, True),
}
PVAR = {"p5_8x8_256": (8, 8, 256, False), "p5_8x16_256": (8, 16, 256, False)}
NBUF = 4


def case(B, H, W, Cin, glu=True, K=3):
    torch.manual_seed(0)
    cout = Cin // 2 if glu else Cin
    xs = [torch.randn(B, H, W, Cin, device="cuda").to(torch.bfloat16) for _ in range(NBUF)]
    taps = (torch.randn(K, K, Cin, device="cuda") / K).to(torch.bfloat16)
    b = torch.randn(Cin, device="cuda").to(torch.bfloat16) if glu else None
    ib = torch.randn(Cin, device="cuda").to(torch.bfloat16) if glu else None
    outs = [torch.full((B, H, W, cout), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in range(NBUF)]

    def mk(fn, tiles, ch, chfast, nt):
        grid = (ch, tiles) if chfast else (tiles, ch)
        st = {"k": 0}
        def one(k):
            launch(fn, grid, (nt,), (ptr(xs[k]), ptr(taps), ptr(b), ptr(ib), ptr(outs[k]), i32(B), i32(H), i32(W), i32(Cin)))
        def hot():
            one(0)
        def cold():
            st["k"] = (st["k"] + 1) % NBUF
            one(st["k"])
        return one, hot, cold

    ref_name = "dwtile_bf16_k3_glu" if glu else f"dwtile_bf16_k{K}"
    tiles = B * (-(-H // 8)) * (-(-W // 8))
    one, hot, cold = mk(mod.get_function(ref_name), tiles, cout // 32, False, 256)
    one(0); torch.cuda.synchronize()
    ref = outs[0].clone()
    base_hot, base_cold = bench(hot, graph=True), bench(cold, graph=True, inner=20)
    gb = (xs[0].numel() + outs[0].numel()) * 2 / 1e9
    print(f"({B},{H},{W},{Cin}) glu={glu} K={K}  {ref_name}: hot {base_hot:.1f} µs, cold {base_cold:.1f} µs  (DRAM bound {gb / 3.35e-6:.1f} µs at 3.35 TB/s)")
    for name, (th, tw, nt, chf) in [("tree", (8, 8, 256, False))] + list((VAR if glu else PVAR).items()):
        t2 = B * (-(-H // th)) * (-(-W // tw))
        fn = new.get_function(ref_name) if name == "tree" else mod.get_function(name)
        one, hot, cold = mk(fn, t2, cout // 32, chf, nt)
        outs[0].fill_(float("nan")); one(0); torch.cuda.synchronize()
        same = bool(torch.equal(outs[0], ref))
        h, c = bench(hot, graph=True), bench(cold, graph=True)
        print(f"    {name:16s} bit-equal {same}  hot {h:6.1f} µs ({base_hot / h:.2f}x)  cold {c:6.1f} µs ({base_cold / c:.2f}x)")


print(torch.cuda.get_device_name())
for shp in [(2, 32, 32, 11200), (1, 32, 32, 11200), (4, 32, 32, 11200), (1, 128, 128, 4096), (1, 64, 64, 8192), (1, 68, 120, 11200), (1, 13, 11, 128), (2, 24, 42, 11200)]:
    case(*shp)
for shp in [(1, 128, 128, 1536), (1, 32, 32, 3072), (2, 13, 11, 64)]:
    case(*shp, glu=False, K=5)
