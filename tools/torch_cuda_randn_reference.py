"""Reference draws of torch.randn on CUDA, for the Philox port in pipelines/src/rng.rs.

Run on the GPU machine (torch with CUDA): python3 tools/torch_cuda_randn_reference.py OUT_DIR
Writes OUT_DIR/torch_cuda_randn.safetensors and .json. Each case seeds a fresh CUDA generator and draws
one or more consecutive float32 tensors, exactly as diffusers' randn_tensor does (one call per tensor).
Large tensors are stored with a stride (every `stride`-th element of the flattened draw) to keep the file small.
"""
import json, sys, torch
from safetensors.torch import save_file

out = sys.argv[1]
cases = [  # name, seed, shapes drawn in order, stride
    ("tiny_base", 42, [(1, 8, 16, 16)], 1),
    ("tiny_n2", 7, [(2, 8, 16, 16)], 1),
    ("tiny_sprint", 123, [(1, 8, 16, 16), (1, 8, 16, 16), (1, 8, 16, 16)], 1),
    ("real_1024", 0, [(1, 32, 32, 32)], 1),
    ("real_16x9", 2024, [(1, 32, 24, 42)], 1),
    ("real_n4", 5, [(4, 32, 32, 32)], 16),
    ("grid_stride", 9, [(2, 32, 68, 120), (2, 32, 68, 120)], 16),
    ("big_seed", 2**63 - 1, [(1, 32, 32, 32)], 1),
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
print(json.dumps(meta))
