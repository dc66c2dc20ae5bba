"""Extra torch CUDA randn draws made live on the GPU machine, in the format of
tests/fixtures/torch_cuda_randn/ (see tools/torch_cuda_randn_reference.py), for `gpu-check`'s second pass:
odd sizes, long consecutive sequences and grid-stride sizes, drawn on the very card the check runs on.

Usage: python3 bench/torch_randn_extra.py OUT_DIR
"""
import json, sys, torch
from safetensors.torch import save_file

out = sys.argv[1]
cases = [  # name, seed, shapes drawn in order, stride
    ("odd_small", 1, [(3, 7, 11), (1,), (5, 1, 1, 1)], 1),
    ("odd_large", 31337, [(1000003,)], 1),
    ("sequence", 2**64 - 1, [(1, 32, 32, 32)] * 5, 1),
    ("sprint_steps", 77, [(2, 32, 24, 42)] * 3, 1),
    ("stride2", 2**40 + 3, [(4, 32, 128, 128), (4, 32, 128, 128)], 7),
    ("huge", 11, [(4, 32, 135, 240), (1, 8, 16, 16)], 13),
]
tensors, meta = {}, {"torch": torch.__version__, "device": torch.cuda.get_device_name(0),
                     "sm_count": torch.cuda.get_device_properties(0).multi_processor_count, "cases": []}
for name, seed, shapes, stride in cases:
    g = torch.Generator(device="cuda").manual_seed(seed)
    for i, shape in enumerate(shapes):
        x = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32)
        tensors[f"{name}.{i}"] = x.flatten()[::stride].cpu().contiguous()
    meta["cases"].append({"name": name, "seed": seed, "shapes": shapes, "stride": stride})
save_file(tensors, f"{out}/torch_cuda_randn.safetensors")
json.dump(meta, open(f"{out}/torch_cuda_randn.json", "w"), indent=1)
print(json.dumps({k: v for k, v in meta.items() if k != "cases"}))
