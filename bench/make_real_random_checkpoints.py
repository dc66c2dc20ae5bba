"""Random-weight checkpoints at the REAL Sana / Sana-Sprint configs, in the diffusers layout, for sana-bench.

Run on the GPU machine (diffusers 0.42.1 wheel installed, see docs/gpu-workflow.md), from the repository root:
  python3 bench/make_real_random_checkpoints.py /tmp/sana_real /tmp/sana_sprint_real
Builds every model from tests/fixtures/real_configs/*.json (the same configs diffusers_reference_bench.py
spells out) with random weights on the GPU, casts to bf16 and save_pretrained()s it:
  BASE/   model_index.json, transformer/, vae/, text_encoder/ (Gemma2Model), tokenizer/, scheduler/
  SPRINT/ model_index.json, transformer/ (guidance_embeds), vae/ (its own random VAE), scheduler/,
          text_encoder -> BASE/text_encoder and tokenizer -> BASE/tokenizer (symlinks; our loader reads the
          text encoder of the base directory only, as the pipelines share it).
The tokenizer is the tiny fixture's (tests/fixtures/tiny/sana/tokenizer, vocab 816 < 256000): its ids are valid
for the real Gemma vocabulary, but its complex-human-instruction length differs from the real tokenizer's,
so the positive prompt is shorter than the real ~510 tokens (sana-bench prints the length).
Overrides for a CPU dry run of the layout: SANA_CFG_DIR (a directory with the same six JSON names, e.g. the tiny
configs) and SANA_INIT_DEVICE=cpu.
"""
import json, os, shutil, sys, time
import torch
from diffusers import (AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel, SCMScheduler)
from transformers import Gemma2Config, Gemma2Model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = os.environ.get("SANA_CFG_DIR", os.path.join(ROOT, "tests/fixtures/real_configs"))
TINY = os.path.join(ROOT, "tests/fixtures/tiny")


def cfg(name):
    with open(os.path.join(CFG, name)) as f:
        return json.load(f)


def save(model, out):
    t = time.perf_counter()
    model.to(torch.bfloat16).save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(f"  {out}: {n:,} params, saved in {time.perf_counter() - t:.1f} s", flush=True)


def main(base_dir, sprint_dir):
    torch.manual_seed(0)
    for d in (base_dir, sprint_dir):
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
    t0 = time.perf_counter()
    with torch.device(os.environ.get("SANA_INIT_DEVICE", "cuda")):
        te_cfg = cfg("text_encoder.json")
        save(Gemma2Model(Gemma2Config.from_dict(te_cfg)).eval(), os.path.join(base_dir, "text_encoder"))
        torch.cuda.empty_cache()
        for d, tr_name in ((base_dir, "transformer_base.json"), (sprint_dir, "transformer_sprint.json")):
            save(SanaTransformer2DModel.from_config(cfg(tr_name)), os.path.join(d, "transformer"))
            save(AutoencoderDC.from_config(cfg("vae.json")), os.path.join(d, "vae"))
            torch.cuda.empty_cache()
    DPMSolverMultistepScheduler.from_config(cfg("scheduler_base.json")).save_pretrained(os.path.join(base_dir, "scheduler"))
    SCMScheduler.from_config(cfg("scheduler_sprint.json")).save_pretrained(os.path.join(sprint_dir, "scheduler"))
    shutil.copytree(os.path.join(TINY, "sana/tokenizer"), os.path.join(base_dir, "tokenizer"))
    shutil.copy(os.path.join(TINY, "sana/model_index.json"), base_dir)
    shutil.copy(os.path.join(TINY, "sana_sprint/model_index.json"), sprint_dir)
    for comp in ("text_encoder", "tokenizer"):
        os.symlink(os.path.join(os.path.abspath(base_dir), comp), os.path.join(sprint_dir, comp))
    print(f"checkpoints written in {time.perf_counter() - t0:.1f} s", flush=True)
    for d in (base_dir, sprint_dir):
        for dirpath, _, files in sorted(os.walk(d, followlinks=False)):
            for f in sorted(files):
                p = os.path.join(dirpath, f)
                print(f"  {os.path.relpath(p, os.path.dirname(d))}  {os.path.getsize(p) / 2**20:.1f} MiB")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sana_real", sys.argv[2] if len(sys.argv) > 2 else "/tmp/sana_sprint_real")
