#!/usr/bin/env python3
"""Reference for the tiled DC-AE decode: `tests/fixtures/reference/vae_tiled.safetensors`.

diffusers' `AutoencoderDC.enable_tiling(...)` + `decode` on the committed tiny VAE (`tests/fixtures/tiny/sana/vae`,
made by `tools/make_tiny_fixtures.py`), float32 on the CPU, in the pinned environment of that script's header
(diffusers 0.42.1, torch 2.11.0). It reads the committed checkpoint and writes only this one file, so the other
fixtures are untouched. Run from the repository root:

    /work/refvenv/bin/python tools/make_tiled_decode_fixture.py

Cases (the tiny VAE compresses 32x, so tiles are counted in latents as pixels / 32):
* `default`: diffusers' tiling defaults (512-px tiles every 448 px: 16-latent tiles every 14, 64-px blends) on a
  (1, 8, 17, 17) latent -> 2 x 2 tiles, the last row and column 3 latents wide.
* `custom`: 256 x 192-px tiles every 160 px (blends of 96 and 32 px) on a (2, 8, 9, 7) latent -> 2 x 2 tiles.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderDC
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
VAE = ROOT / "tests/fixtures/tiny/sana/vae"
OUT = ROOT / "tests/fixtures/reference/vae_tiled.safetensors"
SEED = 21

CASES = {
    "default": ((1, 8, 17, 17), dict(tile_sample_min_height=512, tile_sample_min_width=512,
                                     tile_sample_stride_height=448, tile_sample_stride_width=448)),
    "custom": ((2, 8, 9, 7), dict(tile_sample_min_height=256, tile_sample_min_width=192,
                                   tile_sample_stride_height=160, tile_sample_stride_width=160)),
}


@torch.no_grad()
def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    vae = AutoencoderDC.from_pretrained(VAE, torch_dtype=torch.float32).eval()
    sf = vae.config.scaling_factor
    gen = torch.Generator().manual_seed(SEED)
    out = {}
    for name, (shape, tiling) in CASES.items():
        z = torch.randn(*shape, generator=gen, dtype=torch.float32)
        vae.enable_tiling(**tiling)
        tiled = vae.decode(z / sf).sample
        vae.disable_tiling()
        untiled = vae.decode(z / sf).sample
        # Tiles see only their own latents (attention is per tile), so a tiled decode differs from untiled.
        assert not torch.allclose(tiled, untiled, atol=1e-4), name
        out[f"{name}_latent"] = z.contiguous()
        out[f"{name}_tiled"] = tiled.contiguous()
        print(name, tuple(z.shape), "->", tuple(tiled.shape),
              f"max |tiled - untiled| = {(tiled - untiled).abs().max().item():.3e}")
    meta = {f"{n}_tiling": ",".join(str(v) for v in t.values()) for n, (_, t) in CASES.items()}
    meta["about"] = "tools/make_tiled_decode_fixture.py: AutoencoderDC.enable_tiling + decode, tiny/sana/vae, fp32 CPU"
    save_file(out, str(OUT), metadata=meta)
    print("wrote", OUT)


if __name__ == "__main__":
    main()
