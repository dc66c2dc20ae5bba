#!/usr/bin/env python3
"""Generate the tiny random-weight checkpoints and reference tensors under `tests/fixtures/`.

Every file this script writes is documented in `tests/fixtures/README.md`, which the script also writes
(the per-key tables are generated from the tensors actually saved, so shapes/dtypes cannot drift).

Pinned reference environment (CPU only, float32; `pip freeze` of the venv that produced the committed fixtures):

    python -m venv /work/refvenv
    /work/refvenv/bin/pip install torch==2.11.0 diffusers==0.42.1 transformers==5.24.0 tokenizers==0.23.3 \
        safetensors==0.8.0 numpy==2.4.6 pillow==13.0.0 sentencepiece==0.2.3 protobuf==7.36.2 huggingface_hub==2.4.0

    (the torch wheel used was 2.11.0+cu130 from PyPI; everything runs on the CPU, no GPU needed)

Run from the repository root:

    /work/refvenv/bin/python tools/make_tiny_fixtures.py            # writes tests/fixtures/ (about 1-2 min, 2 cores)

The script is deterministic: each fixture group seeds torch with its own fixed seed (see SEEDS), all models are
float32 on the CPU, and `torch.use_deterministic_algorithms(True)` is on. Re-running it overwrites the fixtures;
values may differ in the last ulp on another CPU/BLAS, the checkpoints themselves are bit-identical.

Notes recorded here because they affect what the references mean:
* transformers 5.24 marks Gemma2 `_supports_sdpa = False`, so `Gemma2Model` defaults to **eager** attention (softcapping
  applied), and its `sdpa_attention_forward` raises on a softcap instead of silently dropping it as 5.17 did (spec
  §1.4). The main references use eager; one embedding is recomputed with SDPA attention and softcap disabled
  (cross-checked against eager without softcap) so the Rust softcap switch can be tested.
* transformers 5 renamed the PIL-based image processors: `ViTImageProcessorPil` / `CLIPImageProcessorPil` are the
  PIL-resampling processors that `ViTImageProcessor` / `CLIPImageProcessor` were in transformers 4.x (what fal uses);
  the 5.x names without `Pil` are torchvision-based. The references use the PIL ones.
* diffusers' `SanaSprintPipeline` raises "Invalid sample size" with resolution binning unless `sample_size == 32`; the
  tiny transformer has `sample_size == 16` (512 bins, per the fixture contract), so the Sprint end-to-end reference runs
  with `use_resolution_binning=False` at 512x512 (which is also exactly what 512-binning would produce for 512x512).
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

import diffusers
import tokenizers
import transformers
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    SanaPipeline,
    SanaSprintPipeline,
    SanaTransformer2DModel,
    SCMScheduler,
)
from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_512_BIN
from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
from transformers import (
    CLIPConfig,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizerFast,
    ViTConfig,
    ViTForImageClassification,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = Path(__file__).resolve().parents[1]
FIX = ROOT / "tests" / "fixtures"
TINY = FIX / "tiny"
REF = FIX / "reference"
REAL = FIX / "real_configs"

SEEDS = {
    "tokenizer": 0,
    "text_encoder": 1,
    "transformer": 2,
    "transformer_sprint": 3,
    "vae": 4,
    "vae_sprint": 5,
    "text_ref": 10,
    "transformer_ref": 11,
    "vae_ref": 12,
    "scheduler_ref": 13,
    "e2e": 14,
    "safety": 15,
}

# The CHI text is taken from diffusers itself so it is byte-identical to what the pipelines use.
CHI = inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default
assert CHI == inspect.signature(SanaSprintPipeline.__call__).parameters["complex_human_instruction"].default

TEXT_PROMPTS = [
    "a red fox sitting in fresh snow at golden hour",
    "  A Small CAT\tsleeping on a\nWarm Windowsill!  ",
    # long enough to be truncated (> 298 tokens after the CHI), with a few bytes outside the trained alphabet
    " ".join(
        [
            "an extremely detailed panoramic illustration of a quiet harbour town, with boats, gulls, lanterns,"
            " cobblestone streets, bakeries, flower stalls, children flying kites and a lighthouse on the cliff"
        ]
        * 12
    )
    + " café ünïcode ☕ end",
]
NEG_PROMPTS = ["", "Blurry, LOW quality, watermark"]

TINY_GEMMA = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,
    query_pre_attn_scalar=32,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
TINY_TRANSFORMER = dict(
    in_channels=8,
    out_channels=8,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_cross_attention_heads=2,
    cross_attention_head_dim=16,
    cross_attention_dim=32,
    caption_channels=64,
    mlp_ratio=2.5,
    sample_size=16,
    patch_size=1,
)
TINY_SPRINT_EXTRA = dict(guidance_embeds=True, qk_norm="rms_norm_across_heads", guidance_embeds_scale=0.1)
_BT = ["ResBlock", "ResBlock", "ResBlock", "EfficientViTBlock", "EfficientViTBlock", "EfficientViTBlock"]
_MS = [[], [], [], [5], [5], [5]]
TINY_VAE = dict(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=_BT,
    decoder_block_types=_BT,
    encoder_block_out_channels=[8, 8, 16, 16, 32, 32],
    decoder_block_out_channels=[8, 8, 16, 16, 32, 32],
    encoder_layers_per_block=[1] * 6,
    decoder_layers_per_block=[1] * 6,
    encoder_qkv_multiscales=_MS,
    decoder_qkv_multiscales=_MS,
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
DPM_KWARGS = dict(flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction")
SCM_KWARGS = dict(prediction_type="trigflow", sigma_data=0.5)

# ----------------------------------------------------------------------------------------------------------------
# Documentation registry: every saved file/tensor registers a description; write_readme() renders it.
# ----------------------------------------------------------------------------------------------------------------
DOCS: dict[str, dict] = {}


def save_st(name: str, entries: dict, about: str) -> None:
    """Save `{key: (tensor, description)}` to reference/<name> and register the docs."""
    tensors = {}
    rows = []
    for key, (t, desc) in entries.items():
        t = t.detach().contiguous().cpu()
        assert t.dtype in (torch.float32, torch.int64, torch.uint8), (key, t.dtype)
        tensors[key] = t
        rows.append((key, list(t.shape), str(t.dtype).replace("torch.", ""), desc))
    path = REF / name
    save_file(tensors, str(path))
    DOCS[f"reference/{name}"] = {"about": about, "rows": rows}


def save_json(name: str, obj, about: str) -> None:
    path = REF / name
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    DOCS[f"reference/{name}"] = {"about": about, "rows": None}


def save_png(name: str, arr: np.ndarray, about: str) -> None:
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3
    Image.fromarray(arr).save(REF / name)
    DOCS[f"reference/{name}"] = {"about": f"{about} ({arr.shape[0]}x{arr.shape[1]} HxW, RGB8)", "rows": None}


def f32_list(t) -> list:
    """Exact f32 values as JSON numbers (repr of the f32 value widened to f64 round-trips exactly)."""
    return [float(x) for x in np.asarray(t, dtype=np.float32).reshape(-1)]


def randn(gen: torch.Generator, *shape) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


@torch.no_grad()
def perturb_constant_params(model: torch.nn.Module, gen: torch.Generator, scale: float = 0.1) -> list[str]:
    """Add noise to every parameter whose entries are all equal (norm weights = 1 / biases = 0 / zero inits), so a
    Rust port that ignores a norm weight/bias or the Gemma `(1 + w)` convention fails the parity tests."""
    touched = []
    for name, p in model.named_parameters():
        flat = p.reshape(-1)
        if flat.numel() >= 1 and bool(torch.all(flat == flat[0])):
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
            touched.append(name)
    return touched


# ----------------------------------------------------------------------------------------------------------------
# 1. Tokenizer
# ----------------------------------------------------------------------------------------------------------------
def build_tokenizer() -> GemmaTokenizerFast:
    """Train a small BPE (Gemma-style pipeline: ' ' -> '▁', byte fallback, BOS template) and wrap it."""
    chi = "\n".join(CHI)
    corpus = [
        chi,
        *CHI,
        "a red fox sitting in fresh snow at golden hour",
        "a small cat sleeping on a warm windowsill",
        "a bustling city street at dusk with glowing lamps and a double-decker bus",
        "portrait of an astronaut riding a horse on the moon, highly detailed, 4k",
        "an oil painting of a lighthouse on a cliff above a stormy sea",
        "a bowl of ramen with a soft boiled egg, studio lighting, shallow depth of field",
        "blurry, low quality, watermark, text, deformed",
    ]
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>"))
    trainer_tok.normalizer = normalizers.Replace(" ", "\u2581")
    trainer_tok.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    trainer = trainers.BpeTrainer(vocab_size=560, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(corpus * 4, trainer)
    trained = json.loads(trainer_tok.to_str())["model"]

    # Final vocab: specials 0..4 (pad 0, eos 1, bos 2, unk 3, mask 4), byte-fallback tokens <0x00>..<0xFF> 5..260,
    # then the trained symbols and merges in training order.
    vocab = {tok: i for i, tok in enumerate(specials)}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        if tok not in vocab:
            vocab[tok] = len(vocab)
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in trained["merges"]]
    tok = GemmaTokenizerFast(
        vocab=vocab,
        merges=merges,
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        add_bos_token=True,
        add_eos_token=False,
    )
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert tok.encode("a cat")[0] == 2 and tok.encode("a cat")[-1] != 1
    return tok


# ----------------------------------------------------------------------------------------------------------------
# 2. Tiny models and pipelines
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def build_text_encoder(vocab_size: int) -> Gemma2Model:
    torch.manual_seed(SEEDS["text_encoder"])
    cfg = Gemma2Config(vocab_size=vocab_size, **TINY_GEMMA)
    model = Gemma2Model._from_config(cfg, attn_implementation="eager").eval()
    gen = torch.Generator().manual_seed(SEEDS["text_encoder"])
    # Default init (std 0.02) makes attention logits ~1e-3, where softcapping is invisible. Scale q/k so raw
    # logits reach O(50) and the eager(softcap) vs sdpa(no softcap) difference is large.
    for layer in model.layers:
        layer.self_attn.q_proj.weight.normal_(0.0, 0.6, generator=gen)
        layer.self_attn.k_proj.weight.normal_(0.0, 0.6, generator=gen)
        layer.self_attn.v_proj.weight.normal_(0.0, 0.2, generator=gen)
        layer.self_attn.o_proj.weight.normal_(0.0, 0.2, generator=gen)
        for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj):
            lin.weight.normal_(0.0, 0.15, generator=gen)
    model.embed_tokens.weight.normal_(0.0, 0.2, generator=gen)
    perturb_constant_params(model, gen, scale=0.3)
    return model


@torch.no_grad()
def build_transformer(sprint: bool) -> SanaTransformer2DModel:
    torch.manual_seed(SEEDS["transformer_sprint" if sprint else "transformer"])
    cfg = dict(TINY_TRANSFORMER, **(TINY_SPRINT_EXTRA if sprint else {}))
    model = SanaTransformer2DModel(**cfg).eval()
    gen = torch.Generator().manual_seed(SEEDS["transformer_sprint" if sprint else "transformer"] + 100)
    perturb_constant_params(model, gen, scale=0.2)
    return model


@torch.no_grad()
def build_vae(sprint: bool) -> AutoencoderDC:
    torch.manual_seed(SEEDS["vae_sprint" if sprint else "vae"])
    model = AutoencoderDC(**TINY_VAE).eval()
    gen = torch.Generator().manual_seed(SEEDS["vae_sprint" if sprint else "vae"] + 100)
    perturb_constant_params(model, gen, scale=0.2)
    return model


def build_pipelines(tok):
    te = build_text_encoder(len(tok))
    base = SanaPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=build_vae(sprint=False),
        transformer=build_transformer(sprint=False),
        scheduler=DPMSolverMultistepScheduler(**DPM_KWARGS),
    )
    sprint = SanaSprintPipeline(
        tokenizer=tok,
        text_encoder=te,
        vae=build_vae(sprint=True),
        transformer=build_transformer(sprint=True),
        scheduler=SCMScheduler(**SCM_KWARGS),
    )
    for p in (base, sprint):
        p.set_progress_bar_config(disable=True)
    check_scheduler_config(base.scheduler)
    for name, pipe in (("sana", base), ("sana_sprint", sprint)):
        out = TINY / name
        shutil.rmtree(out, ignore_errors=True)
        pipe.save_pretrained(str(out), safe_serialization=True)
    DOCS["tiny/sana/"] = {
        "about": "SanaPipeline.save_pretrained (model_index.json, transformer/, vae/, text_encoder/, tokenizer/, "
        "scheduler/), all weights fp32 safetensors",
        "rows": None,
    }
    DOCS["tiny/sana_sprint/"] = {
        "about": "SanaSprintPipeline.save_pretrained; its own transformer/ (guidance_embeds, qk_norm), vae/ (different "
        "random weights from tiny/sana/vae) and scheduler/ (SCMScheduler); text_encoder/ and tokenizer/ are "
        "identical copies of tiny/sana's",
        "rows": None,
    }
    return base, sprint


def check_scheduler_config(s: DPMSolverMultistepScheduler) -> None:
    """Spec §1.3 values."""
    c = s.config
    expect = dict(
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        final_sigmas_type="zero",
        lower_order_final=True,
        euler_at_final=False,
        timestep_spacing="linspace",
        num_train_timesteps=1000,
        thresholding=False,
        use_karras_sigmas=False,
        use_exponential_sigmas=False,
        use_beta_sigmas=False,
        use_lu_lambdas=False,
        variance_type=None,
        steps_offset=0,
        rescale_betas_zero_snr=False,
    )
    for k, v in expect.items():
        assert c[k] == v, (k, c[k], v)
    assert c["lambda_min_clipped"] == -float("inf")


# ----------------------------------------------------------------------------------------------------------------
# 3. Real configs (meta device: no weights allocated) + parameter counts
# ----------------------------------------------------------------------------------------------------------------
REAL_TRANSFORMER = dict(
    in_channels=32,
    out_channels=32,
    num_attention_heads=70,
    attention_head_dim=32,
    num_layers=20,
    num_cross_attention_heads=20,
    cross_attention_head_dim=112,
    cross_attention_dim=2240,
    caption_channels=2304,
    mlp_ratio=2.5,
    dropout=0.0,
    attention_bias=False,
    sample_size=32,
    patch_size=1,
    norm_elementwise_affine=False,
    norm_eps=1e-6,
)
REAL_SPRINT = dict(
    REAL_TRANSFORMER,
    guidance_embeds=True,
    guidance_embeds_scale=0.1,
    qk_norm="rms_norm_across_heads",
    interpolation_scale=None,
    timestep_scale=1.0,
)
REAL_VAE = dict(
    in_channels=3,
    latent_channels=32,
    attention_head_dim=32,
    encoder_block_types=_BT,
    decoder_block_types=_BT,
    encoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    decoder_block_out_channels=[128, 256, 512, 512, 1024, 1024],
    encoder_layers_per_block=[2, 2, 2, 3, 3, 3],
    decoder_layers_per_block=[3, 3, 3, 3, 3, 3],
    encoder_qkv_multiscales=_MS,
    decoder_qkv_multiscales=_MS,
    upsample_block_type="interpolate",
    downsample_block_type="Conv",
    decoder_norm_types="rms_norm",
    decoder_act_fns="silu",
    scaling_factor=0.41407,
)
REAL_GEMMA = dict(
    vocab_size=256000,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=26,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    max_position_embeddings=8192,
    rms_norm_eps=1e-6,
    query_pre_attn_scalar=256,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=2,
)
EXPECTED_PARAMS = {
    "transformer_base": 1_604_462_752,
    "transformer_sprint": 1_610_237_472,
    "vae_decoder": 159_223_171,
    "text_encoder": 2_614_341_888,
}


def write_real_configs() -> dict:
    REAL.mkdir(parents=True, exist_ok=True)
    counts = {}
    with torch.device("meta"):
        tb = SanaTransformer2DModel(**REAL_TRANSFORMER)
        ts = SanaTransformer2DModel(**REAL_SPRINT)
        vae = AutoencoderDC(**REAL_VAE)
        gcfg = Gemma2Config(**REAL_GEMMA)
        gcfg.architectures = ["Gemma2Model"]
        gemma = Gemma2Model._from_config(gcfg, attn_implementation="eager")
    counts["transformer_base"] = sum(p.numel() for p in tb.parameters())
    counts["transformer_sprint"] = sum(p.numel() for p in ts.parameters())
    counts["vae_total"] = sum(p.numel() for p in vae.parameters())
    counts["vae_decoder"] = sum(p.numel() for n, p in vae.named_parameters() if n.startswith("decoder."))
    counts["text_encoder"] = sum(p.numel() for p in gemma.parameters())
    for k, v in EXPECTED_PARAMS.items():
        assert counts[k] == v, (k, counts[k], v)
    assert counts["vae_total"] == 312_250_275, counts["vae_total"]

    def dump(name, text):
        (REAL / f"{name}.json").write_text(text if text.endswith("\n") else text + "\n")

    dump("transformer_base", tb.to_json_string())
    dump("transformer_sprint", ts.to_json_string())
    dump("vae", vae.to_json_string())
    dump("text_encoder", gemma.config.to_json_string())
    dump("scheduler_base", DPMSolverMultistepScheduler(**DPM_KWARGS).to_json_string())
    dump("scheduler_sprint", SCMScheduler(**SCM_KWARGS).to_json_string())
    DOCS["real_configs/"] = {
        "about": "config.json of the real models (spec §1) as diffusers 0.42.1 / transformers 5.24 serialise them "
        "(all __init__ fields incl. defaults; not byte-identical to the Hub files). Parameter counts from "
        f"meta-device instantiation: {json.dumps(counts)}",
        "rows": None,
    }
    return counts


# ----------------------------------------------------------------------------------------------------------------
# 4a. Text references
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ref_text(pipe: SanaPipeline) -> dict:
    tok, te = pipe.tokenizer, pipe.text_encoder
    assert te.config._attn_implementation == "eager"
    chi = "\n".join(CHI)
    n_chi = len(tok.encode(chi))
    max_length = n_chi + 300 - 2
    tok.padding_side = "right"
    processed = pipe._text_preprocessing(TEXT_PROMPTS, clean_caption=False)
    enc = tok([chi + p for p in processed], padding="max_length", max_length=max_length, truncation=True,
              add_special_tokens=True, return_tensors="pt")
    ids, mask = enc.input_ids, enc.attention_mask
    last_hidden = te(ids, attention_mask=mask)[0]
    embeds, emask, _, _ = pipe.encode_prompt(TEXT_PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                             complex_human_instruction=CHI)
    select = [0] + list(range(-299, 0))
    assert torch.equal(embeds, last_hidden[:, select]) and torch.equal(emask, mask[:, select])
    untruncated = [len(tok.encode(chi + p)) for p in processed]
    assert untruncated[2] > max_length and max(untruncated[:2]) < max_length, untruncated

    neg_embeds, neg_mask = pipe._get_gemma_prompt_embeds(NEG_PROMPTS, "cpu", torch.float32,
                                                         max_sequence_length=300, complex_human_instruction=False)
    neg_ids = tok(pipe._text_preprocessing(NEG_PROMPTS), padding="max_length", max_length=300, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids
    _, _, ne0, _ = pipe.encode_prompt(TEXT_PROMPTS[0], do_classifier_free_guidance=True, negative_prompt="",
                                      device="cpu", complex_human_instruction=CHI)
    assert torch.allclose(ne0[0], neg_embeds[0], atol=1e-6)

    # No-softcap variant for prompt 0 (= what transformers <= 5.17's SDPA path computed: it silently dropped
    # `softcap`). transformers 5.24 refuses sdpa for Gemma2 and its sdpa_attention_forward raises on a softcap, so:
    # (a) eager with attn_logit_softcapping=None, (b) real SDPA (config._attn_implementation = "sdpa", which the
    # forward dispatches on) with softcap None; (a) and (b) must agree.
    def set_softcap(value):
        for layer in te.layers:
            layer.self_attn.attn_logit_softcapping = value

    set_softcap(None)
    nocap, _, _, _ = pipe.encode_prompt(TEXT_PROMPTS[0], do_classifier_free_guidance=False, device="cpu",
                                        complex_human_instruction=CHI)
    te.config._attn_implementation = "sdpa"
    sdpa_embeds, _, _, _ = pipe.encode_prompt(TEXT_PROMPTS[0], do_classifier_free_guidance=False, device="cpu",
                                              complex_human_instruction=CHI)
    te.config._attn_implementation = "eager"
    set_softcap(TINY_GEMMA["attn_logit_softcapping"])
    sdpa_vs_nocap = (sdpa_embeds - nocap).abs().max().item()
    sdpa_vs_eager = (sdpa_embeds - embeds[:1]).abs().max().item()
    assert sdpa_vs_nocap < 1e-4 and sdpa_vs_eager > 1e-2, (sdpa_vs_nocap, sdpa_vs_eager)
    again, _, _, _ = pipe.encode_prompt(TEXT_PROMPTS[0], do_classifier_free_guidance=False, device="cpu",
                                        complex_human_instruction=CHI)
    assert torch.equal(again, embeds[:1])

    L = max_length
    save_st("text.safetensors", {
        "prompt_ids": (ids, f"(3, L={L}) token ids of tokenizer(CHI + lower().strip()(prompt)), right-padded with 0 to "
                            "L = n_chi + 298, truncated at L; BOS=2 first"),
        "prompt_mask": (mask, "(3, L) attention mask (1 = BOS/real token, 0 = pad)"),
        "prompt_last_hidden": (last_hidden, "(3, L, 64) Gemma2Model(ids, mask)[0] (last_hidden_state after final norm), "
                                            "eager attention (softcap 50), all positions incl. pads"),
        "prompt_embeds": (embeds, "(3, 300, 64) encode_prompt output = last_hidden[:, [0] + range(-299, 0)]"),
        "prompt_embeds_mask": (emask, "(3, 300) mask after select_index"),
        "neg_ids": (neg_ids, "(2, 300) ids of NEG_PROMPTS without CHI (max_length 300, right pad)"),
        "neg_mask": (neg_mask, "(2, 300) mask of neg_ids"),
        "neg_embeds": (neg_embeds, "(2, 300, 64) Gemma last hidden state for the negative prompts (no select_index)"),
        "prompt0_embeds_sdpa": (sdpa_embeds, "(1, 300, 64) prompt 0 WITHOUT attention softcapping (SDPA attention, "
                                             "softcap None; equals eager with softcap None to "
                                             f"{sdpa_vs_nocap:.1e}; differs from the eager/softcap reference by "
                                             f"{sdpa_vs_eager:.3f} max abs)"),
    }, "Text-encoder path (tiny tokenizer + tiny Gemma2, fp32, eager attention unless noted)")
    meta = {
        "prompts": TEXT_PROMPTS,
        "prompts_preprocessed": processed,
        "negative_prompts": NEG_PROMPTS,
        "complex_human_instruction": CHI,
        "chi_joined": chi,
        "n_chi": n_chi,
        "max_length": max_length,
        "untruncated_lengths": untruncated,
        "select_index": "[0] + list(range(-299, 0))",
        "attn_implementation": "eager",
        "attn_implementation_sdpa_key": "prompt0_embeds_sdpa",
        "transformers_default_attn_implementation_for_Gemma2Model": "eager (transformers 5.24: _supports_sdpa=False; "
        "its sdpa_attention_forward raises on softcap). transformers 5.17 defaulted to sdpa and dropped the softcap, "
        "which is what prompt0_embeds_sdpa reproduces",
        "tokenizer_vocab_size": len(tok),
    }
    save_json("text.json", meta, "Settings of text.safetensors: prompts (raw and lower().strip()), CHI lines and joined "
              "text, n_chi (= len(tokenizer.encode(chi)), incl. BOS), max_length, attention implementation")
    return meta


# ----------------------------------------------------------------------------------------------------------------
# 4b. Transformer references
# ----------------------------------------------------------------------------------------------------------------
def _hooked_forward(model: SanaTransformer2DModel, prefix: str, with_caption: bool, **kwargs):
    captured = {}
    hooks = []

    def grab(name):
        def hook(_m, _inp, out):
            captured[name] = out

        return hook

    hooks.append(model.time_embed.register_forward_hook(grab("time_embed")))
    hooks.append(model.caption_norm.register_forward_hook(grab("caption")))
    for i, blk in enumerate(model.transformer_blocks):
        hooks.append(blk.register_forward_hook(grab(f"block{i}")))
    out = model(**kwargs, return_dict=False)[0]
    for h in hooks:
        h.remove()
    t6, emb_t = captured.pop("time_embed")
    inter = {
        f"{prefix}_time_t6": (t6, "(B, 6*32) time_embed first output (adaLN-single modulation, before reshape)"),
        f"{prefix}_time_emb": (emb_t, "(B, 32) time_embed second output (embedded_timestep, used by norm_out)"),
    }
    if with_caption:
        inter[f"{prefix}_caption"] = (captured["caption"], "(B, 300, 32) caption_projection + caption_norm output")
    for i in range(len(model.transformer_blocks)):
        inter[f"{prefix}_block{i}"] = (captured[f"block{i}"], f"(B, H*W, 32) output of transformer_blocks.{i}")
    return out, inter


@torch.no_grad()
def ref_transformer(base: SanaPipeline, sprint: SanaSprintPipeline) -> None:
    gen = torch.Generator().manual_seed(SEEDS["transformer_ref"])
    tb, ts = base.transformer, sprint.transformer
    e = {}
    # base, B=2 (CFG-like batch), 16x16 latent
    x = randn(gen, 2, 8, 16, 16)
    ehs = randn(gen, 2, 300, 64)
    m = torch.zeros(2, 300, dtype=torch.int64)
    m[0, :37] = 1
    m[1, :300] = 1
    m[1, 250:] = 0
    t = torch.tensor([999.0, 437.0])
    out, inter = _hooked_forward(tb, "base_b2", True, hidden_states=x, encoder_hidden_states=ehs, timestep=t,
                                 encoder_attention_mask=m)
    e.update({
        "base_b2_x": (x, "(2, 8, 16, 16) latent input"),
        "base_b2_ehs": (ehs, "(2, 300, 64) encoder_hidden_states (random)"),
        "base_b2_mask": (m, "(2, 300) encoder_attention_mask (row0: 37 ones; row1: 250 ones)"),
        "base_b2_t": (t, "(2,) timesteps (float, integer-valued as the pipeline feeds them)"),
        "base_b2_out": (out, "(2, 8, 16, 16) tiny/sana transformer output"),
    })
    e.update(inter)
    # base, B=1, non-square 12x20 latent
    x = randn(gen, 1, 8, 12, 20)
    ehs = randn(gen, 1, 300, 64)
    m = torch.zeros(1, 300, dtype=torch.int64)
    m[0, :123] = 1
    t = torch.tensor([500.0])
    out = tb(x, encoder_hidden_states=ehs, timestep=t, encoder_attention_mask=m, return_dict=False)[0]
    e.update({
        "base_b1_x": (x, "(1, 8, 12, 20) latent input (H=12, W=20)"),
        "base_b1_ehs": (ehs, "(1, 300, 64) encoder_hidden_states"),
        "base_b1_mask": (m, "(1, 300) mask (123 ones)"),
        "base_b1_t": (t, "(1,) timestep 500"),
        "base_b1_out": (out, "(1, 8, 12, 20) tiny/sana transformer output"),
    })
    # sprint: SAME inputs as base_b2 / base_b1 (x, ehs, mask), plus guidance; tau from the SCM timesteps exactly as
    # the pipeline computes them
    s = torch.tensor([1.57080, 1.3], dtype=torch.float32)
    tau = torch.sin(s) / (torch.cos(s) + torch.sin(s))
    g2 = torch.tensor([5.0, 4.5], dtype=torch.float32) * 0.1  # as the pipeline: full(guidance_scale) * scale
    out, inter = _hooked_forward(ts, "sprint_b2", False, hidden_states=e["base_b2_x"][0],
                                 encoder_hidden_states=e["base_b2_ehs"][0], timestep=tau, guidance=g2,
                                 encoder_attention_mask=e["base_b2_mask"][0])
    e.update({
        "sprint_b2_t": (tau, "(2,) tau = sin(s)/(cos(s)+sin(s)) for s = f32(1.5708), f32(1.3) (~1.0000036, ~0.78)"),
        "sprint_b2_guidance": (g2, "(2,) guidance already scaled: f32(5.0)*0.1, f32(4.5)*0.1 (what the pipeline passes)"),
        "sprint_b2_out": (out, "(2, 8, 16, 16) tiny/sana_sprint transformer output (raw, before the TrigFlow formula) "
                               "for inputs base_b2_x, base_b2_ehs, base_b2_mask"),
    })
    e.update(inter)
    tau1 = torch.tensor([0.3], dtype=torch.float32)
    g1 = torch.tensor([0.5], dtype=torch.float32)
    out = ts(e["base_b1_x"][0], encoder_hidden_states=e["base_b1_ehs"][0], timestep=tau1, guidance=g1,
             encoder_attention_mask=e["base_b1_mask"][0], return_dict=False)[0]
    e.update({
        "sprint_b1_t": (tau1, "(1,) tau 0.3"),
        "sprint_b1_guidance": (g1, "(1,) guidance 0.5 (already scaled)"),
        "sprint_b1_out": (out, "(1, 8, 12, 20) tiny/sana_sprint transformer output for base_b1_x/_ehs/_mask"),
    })
    save_st("transformer.safetensors", e, "SanaTransformer2DModel forward (tiny/sana/transformer = base_*, "
            "tiny/sana_sprint/transformer = sprint_*; the sprint cases reuse the base_* inputs), fp32; *_time_*, *_caption, *_block{i} are forward-hook captures (block outputs are token-major (B, H*W, D), row-major over H, W)")


# ----------------------------------------------------------------------------------------------------------------
# 4c. VAE references
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ref_vae(base: SanaPipeline) -> None:
    gen = torch.Generator().manual_seed(SEEDS["vae_ref"])
    vae = base.vae
    sf = vae.config.scaling_factor
    e = {}
    for name, shape in (("l146", (1, 8, 4, 6)), ("l233", (2, 8, 3, 3)), ("l123", (1, 8, 2, 3))):
        z = randn(gen, *shape)
        captured = {}
        hooks = [vae.decoder.up_blocks[i].register_forward_hook(
            (lambda i: lambda _m, _in, out: captured.__setitem__(i, out))(i)) for i in range(6)]
        out = vae.decode(z / sf).sample
        for h in hooks:
            h.remove()
        b, _, h, w = shape
        e[f"{name}_latent"] = (z, f"{shape} latent (before / scaling_factor)")
        e[f"{name}_decoded"] = (out, f"({b}, 3, {32 * h}, {32 * w}) vae.decode(latent / 0.41407).sample")
        if name == "l233":
            for i in (5, 4, 3, 2):
                e[f"{name}_up_block{i}"] = (captured[i], f"output of decoder.up_blocks.{i} (run order 5 -> 0)")
    save_st("vae.safetensors", e, "AutoencoderDC decode with tiny/sana/vae (fp32). l123 has H*W = 6 <= attention_head_dim "
            "(8) at up_blocks.5, so diffusers takes the QUADRATIC (softmax-free ReLU) attention branch there; the other "
            "cases use linear attention everywhere")


# ----------------------------------------------------------------------------------------------------------------
# 4d. Scheduler references
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def ref_scheduler() -> None:
    gen = torch.Generator().manual_seed(SEEDS["scheduler_ref"])
    meta = {"dpm": {}, "scm": {}}
    st = {}
    for n in (2, 5, 18, 20):
        s = DPMSolverMultistepScheduler(**DPM_KWARGS)
        s.set_timesteps(n)
        assert s.sigmas.dtype == torch.float32 and s.timesteps.dtype == torch.int64
        meta["dpm"][str(n)] = {"sigmas": f32_list(s.sigmas), "timesteps": [int(t) for t in s.timesteps]}
    for n in (5, 18):
        s = DPMSolverMultistepScheduler(**DPM_KWARGS)
        s.set_timesteps(n)
        x = randn(gen, 1, 8, 4, 4)
        st[f"dpm{n}_sample"] = (x.clone(), "(1, 8, 4, 4) initial sample x_0 (fp32)")
        outs, prevs, x0s = [], [], []
        for t in s.timesteps:
            v = randn(gen, 1, 8, 4, 4)
            x = s.step(v, t, x, return_dict=False)[0]
            outs.append(v)
            prevs.append(x.clone())
            x0s.append(s.model_outputs[-1].clone())
        st[f"dpm{n}_model_outputs"] = (torch.stack(outs), f"({n}, 1, 8, 4, 4) model_output (flow velocity) fed at step i")
        st[f"dpm{n}_x0"] = (torch.stack(x0s), f"({n}, 1, 8, 4, 4) converted model output x0_i = x - sigma_i * v")
        st[f"dpm{n}_prev"] = (torch.stack(prevs), f"({n}, 1, 8, 4, 4) prev_sample returned by step i")

    # SCM
    for n, inter in ((2, 1.3), (4, None)):
        s = SCMScheduler(**SCM_KWARGS)
        s.set_timesteps(n, max_timesteps=1.57080, intermediate_timesteps=inter)
        meta["scm"][str(n)] = {"intermediate_timesteps": inter, "max_timesteps": 1.5708,
                               "timesteps": f32_list(s.timesteps)}
    for n, inter in ((2, 1.3), (4, None)):
        s = SCMScheduler(**SCM_KWARGS)
        s.set_timesteps(n, max_timesteps=1.57080, intermediate_timesteps=inter)
        s.set_begin_index(0)
        sd = s.config.sigma_data
        latents = randn(gen, 1, 8, 4, 4) * sd
        p = f"scm{n}"
        st[f"{p}_latents_init"] = (latents.clone(), "(1, 8, 4, 4) initial latents = randn * sigma_data")
        rec = {k: [] for k in ("tau", "model_input", "model_output", "F", "noise", "denoised", "prev")}
        noise_q = []
        real_randn = diffusers.schedulers.scheduling_scm.randn_tensor

        def fake_randn(shape, **kw):
            z = randn(gen, *shape)
            noise_q.append(z)
            return z

        diffusers.schedulers.scheduling_scm.randn_tensor = fake_randn
        try:
            for t in s.timesteps[:-1]:
                timestep = t.expand(latents.shape[0])
                lmi = latents / sd
                scm_t = torch.sin(timestep) / (torch.cos(timestep) + torch.sin(timestep))
                te = scm_t.view(-1, 1, 1, 1)
                lmi = lmi * torch.sqrt(te**2 + (1 - te) ** 2)
                v = randn(gen, 1, 8, 4, 4)  # stands in for the transformer output
                f = ((1 - 2 * te) * lmi + (1 - 2 * te + 2 * te**2) * v) / torch.sqrt(te**2 + (1 - te) ** 2)
                f = f.float() * sd
                latents, denoised = s.step(f, timestep, latents, return_dict=False)
                for k, val in (("tau", scm_t), ("model_input", lmi), ("model_output", v), ("F", f),
                               ("denoised", denoised), ("prev", latents)):
                    rec[k].append(val.clone())
        finally:
            diffusers.schedulers.scheduling_scm.randn_tensor = real_randn
        rec["noise"] = noise_q
        final = denoised / sd
        desc = {
            "tau": "(n, 1) scm_timestep = sin(s)/(cos(s)+sin(s)) per step",
            "model_input": "(n, 1, 8, 4, 4) latent_model_input = latents/sigma_data * sqrt(tau^2+(1-tau)^2)",
            "model_output": "(n, 1, 8, 4, 4) random stand-in for the transformer output",
            "F": "(n, 1, 8, 4, 4) noise_pred after the TrigFlow formula, * sigma_data (fed to scheduler.step)",
            "noise": "(n, 1, 8, 4, 4) N(0,1) draw consumed inside SCMScheduler.step (scaled by sigma_data there)",
            "denoised": "(n, 1, 8, 4, 4) pred_x0 = cos(s)*x - sin(s)*F",
            "prev": "(n, 1, 8, 4, 4) prev_sample = cos(t_next)*pred_x0 + sin(t_next)*noise*sigma_data",
        }
        for k, vals in rec.items():
            st[f"{p}_{k}"] = (torch.stack(vals), desc[k].replace("(n,", f"({n},"))
        st[f"{p}_final_latents"] = (final, "(1, 8, 4, 4) denoised_last / sigma_data (what goes to the VAE)")
    save_json("scheduler.json", meta, "DPMSolverMultistepScheduler (flow, shift 3) sigmas (exact f32 values) and int64 "
              "timesteps for N = 2, 5, 18, 20; SCMScheduler timesteps (f32) for N=2 (intermediate 1.3) and N=4 (linspace)")
    save_st("scheduler.safetensors", st, "Full sampler runs with random model outputs: DPM N=5 and N=18 (dpm5_*, dpm18_*), "
            "SCM loop reproduced from pipeline_sana_sprint.py for N=2 (intermediate 1.3) and N=4 (linspace) (scm2_*, scm4_*)")


# ----------------------------------------------------------------------------------------------------------------
# 4e. End-to-end references
# ----------------------------------------------------------------------------------------------------------------
class StepRecorder:
    """Wraps scheduler.step to record (model_output, prev_sample[, denoised]) of every step."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.orig = scheduler.step
        self.model_outputs, self.prev, self.denoised = [], [], []

    def __enter__(self):
        def step(model_output, timestep, sample, *a, **kw):
            out = self.orig(model_output, timestep, sample, *a, **kw)
            self.model_outputs.append(model_output.detach().clone())
            self.prev.append(out[0].detach().clone())
            if len(out) > 1:
                self.denoised.append(out[1].detach().clone())
            return out

        self.scheduler.step = step
        return self

    def __exit__(self, *exc):
        self.scheduler.step = self.orig


def _resize_before_crop(gen_hw, out_hw):
    """PixArtImageProcessor.resize_and_crop_tensor's intermediate size (bilinear, align_corners=False), or None."""
    if tuple(gen_hw) == tuple(out_hw):
        return None
    ratio = max(out_hw[0] / gen_hw[0], out_hw[1] / gen_hw[1])
    return [int(gen_hw[0] * ratio), int(gen_hw[1] * ratio)]


def _pil_to_u8(images) -> np.ndarray:
    return np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in images])


@torch.no_grad()
def ref_e2e(base: SanaPipeline, sprint: SanaSprintPipeline) -> None:
    gen = torch.Generator().manual_seed(SEEDS["e2e"])
    prompt = "A Red Fox in the snow, golden hour"
    st, meta = {}, {"prompt": prompt, "negative_prompt": "", "cases": {}}
    pe, pm, ne, nm = base.encode_prompt(prompt, True, negative_prompt="", device="cpu", complex_human_instruction=CHI)
    st["prompt_embeds"] = (pe, "(1, 300, 64) encode_prompt(prompt) (CHI, select_index) used by every case")
    st["prompt_mask"] = (pm, "(1, 300) its mask")
    st["neg_embeds"] = (ne, "(1, 300, 64) negative embeddings of '' (no CHI)")
    st["neg_mask"] = (nm, "(1, 300) its mask ([1, 0 x 299])")

    base_cases = [
        ("base_512", dict(height=512, width=512, num_images_per_prompt=1), (1, 8, 16, 16)),
        ("base_300x200", dict(height=200, width=300, num_images_per_prompt=1), (1, 8, 13, 19)),
        ("base_n2", dict(height=128, width=192, num_images_per_prompt=2, use_resolution_binning=False), (2, 8, 4, 6)),
    ]
    for name, kw, lshape in base_cases:
        # injected latents are not shape-checked by diffusers: make sure they match the (binned) size it would use
        gen_hw = (kw["height"], kw["width"])
        if kw.get("use_resolution_binning", True):
            gen_hw = base.image_processor.classify_height_width_bin(*gen_hw, ratios=ASPECT_RATIO_512_BIN)
        assert (lshape[2] * 32, lshape[3] * 32) == tuple(gen_hw), (name, gen_hw)
        lat = randn(gen, *lshape)
        common = dict(prompt=prompt, negative_prompt="", num_inference_steps=18, guidance_scale=5.0, latents=lat, **kw)
        with StepRecorder(base.scheduler) as rec:
            pt = base(**common, output_type="pt").images
        pil = base(**common, output_type="pil").images
        u8 = _pil_to_u8(pil)
        assert np.array_equal(np.round(pt.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8), u8)
        st[f"{name}_latents_init"] = (lat, f"{lshape} injected initial latents (N(0,1), pipeline `latents=`)")
        if name == "base_n2":
            st[f"{name}_guided_v"] = (torch.stack(rec.model_outputs), "(18, 2, 8, 4, 6) CFG-combined velocity fed to "
                                      "scheduler.step at each step (v_u + 5*(v_c - v_u))")
            st[f"{name}_step_latents"] = (torch.stack(rec.prev), "(18, 2, 8, 4, 6) latents after each step (last = x0)")
        else:
            st[f"{name}_final_latents"] = (rec.prev[-1], f"{lshape} latents after the last step (x0, before / 0.41407 "
                                           "and VAE decode)")
        pngs = []
        for i, img in enumerate(u8):
            fname = f"e2e_{name}.png" if len(u8) == 1 else f"e2e_{name}_{i}.png"
            save_png(fname, img, f"{name} final image {i} (output_type='pil')")
            pngs.append(fname)
        meta["cases"][name] = {
            "pipeline": "tiny/sana",
            **{k: v for k, v in kw.items()},
            "use_resolution_binning": kw.get("use_resolution_binning", True),
            "binned_hw": list(gen_hw),
            "resize_before_crop_hw": _resize_before_crop(gen_hw, (kw["height"], kw["width"])),
            "output_hw": list(u8.shape[1:3]),
            "num_inference_steps": 18,
            "guidance_scale": 5.0,
            "latent_shape": list(lshape),
            "pngs": pngs,
        }

    # Sprint: initial latents injected; the per-step noises drawn inside SCMScheduler.step are injected too.
    lshape = (1, 8, 16, 16)
    lat = randn(gen, *lshape)
    noises = [randn(gen, *lshape) for _ in range(2)]
    real_randn = diffusers.schedulers.scheduling_scm.randn_tensor
    outputs = {}
    for output_type in ("pt", "pil"):
        queue = list(noises)

        def fake_randn(shape, **kw):
            z = queue.pop(0)
            assert tuple(shape) == tuple(z.shape)
            return z.clone()

        diffusers.schedulers.scheduling_scm.randn_tensor = fake_randn
        try:
            with StepRecorder(sprint.scheduler) as rec:
                outputs[output_type] = sprint(prompt=prompt, num_inference_steps=2, guidance_scale=5.0, height=512,
                                              width=512, latents=lat, use_resolution_binning=False,
                                              output_type=output_type).images
        finally:
            diffusers.schedulers.scheduling_scm.randn_tensor = real_randn
        assert not queue
        if output_type == "pt":
            sprint_rec = rec
    u8 = _pil_to_u8(outputs["pil"])
    assert np.array_equal(np.round(outputs["pt"].permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8), u8)
    st["sprint_512_latents_init"] = (lat, "(1, 8, 16, 16) injected initial latents, N(0,1) BEFORE the pipeline's "
                                     "* sigma_data (0.5)")
    st["sprint_512_noises"] = (torch.stack(noises), "(2, 1, 8, 16, 16) N(0,1) noises returned by randn_tensor inside "
                               "SCMScheduler.step at steps 0 and 1 (scaled by sigma_data there)")
    st["sprint_512_F"] = (torch.stack(sprint_rec.model_outputs), "(2, 1, 8, 16, 16) TrigFlow F*sigma_data fed to step")
    st["sprint_512_denoised"] = (torch.stack(sprint_rec.denoised), "(2, 1, 8, 16, 16) pred_x0 after each step")
    st["sprint_512_step_latents"] = (torch.stack(sprint_rec.prev), "(2, 1, 8, 16, 16) prev_sample after each step")
    save_png("e2e_sprint_512.png", u8[0], "sprint_512 final image (output_type='pil')")
    meta["cases"]["sprint_512"] = {
        "pipeline": "tiny/sana_sprint",
        "height": 512,
        "width": 512,
        "num_images_per_prompt": 1,
        "use_resolution_binning": False,
        "binning_note": "diffusers' Sprint pipeline only bins with sample_size 32 (raises otherwise); for 512x512 "
        "the 512 table gives 512x512 anyway",
        "num_inference_steps": 2,
        "guidance_scale": 5.0,
        "max_timesteps": 1.5708,
        "intermediate_timesteps": 1.3,
        "latent_shape": list(lshape),
        "output_hw": list(u8.shape[1:3]),
        "pngs": ["e2e_sprint_512.png"],
    }
    save_st("e2e.safetensors", st, "Full pipeline runs (tiny/sana, tiny/sana_sprint; fp32 CPU) with injected latents "
            "(and Sprint step noises); final images are the e2e_*.png files (uint8, identical to round(pt*255))")
    save_json("e2e.json", meta, "Prompts and settings of every e2e case, with binned and output sizes and PNG names")


# ----------------------------------------------------------------------------------------------------------------
# 4f. Safety checkers
# ----------------------------------------------------------------------------------------------------------------
FALCONSAI_PREPROCESSOR = {
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_processor_type": "ViTImageProcessor",
    "image_std": [0.5, 0.5, 0.5],
    "resample": 2,
    "rescale_factor": 0.00392156862745098,
    "size": {"height": 224, "width": 224},
}
COMPVIS_PREPROCESSOR = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}


def make_safety_images() -> list[tuple[str, np.ndarray]]:
    rng = np.random.default_rng(SEEDS["safety"])
    imgs = []
    imgs.append(("noise_64x64", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    yy, xx = np.mgrid[0:200, 0:300].astype(np.float64)
    g = np.stack([xx / 299 * 255, yy / 199 * 255, (xx + yy) / 498 * 255], -1)
    imgs.append(("gradient_300x200", np.clip(np.round(g), 0, 255).astype(np.uint8)))
    yy, xx = np.mgrid[0:512, 0:512].astype(np.float64)
    r = np.hypot(yy - 256, xx - 200) / 362
    g = np.stack([255 * (1 - r), 128 + 127 * np.sin(xx / 23), 255 * r * (yy / 511)], -1)
    imgs.append(("radial_512x512", np.clip(np.round(g), 0, 255).astype(np.uint8)))
    yy, xx = np.mgrid[0:320, 0:200]
    chk = (((yy // 8) + (xx // 8)) % 2).astype(np.uint8) * 200 + 30
    imgs.append(("checker_200x320", np.stack([chk, 255 - chk, np.full_like(chk, 90)], -1)))
    yy, xx = np.mgrid[0:224, 0:224].astype(np.float64)
    g = np.stack([127.5 + 127.5 * np.sin(xx / 9.0) * np.cos(yy / 13.0), yy / 223 * 255, 255 - xx / 223 * 255], -1)
    imgs.append(("waves_224x224", np.clip(np.round(g), 0, 255).astype(np.uint8)))
    yy, xx = np.mgrid[0:96, 0:480]
    stripes = (((xx + 2 * yy) // 5) % 2).astype(np.float64)
    g = np.stack([stripes * 255, xx / 479 * 255, (1 - stripes) * 180], -1)
    imgs.append(("stripes_480x96", np.clip(np.round(g), 0, 255).astype(np.uint8)))
    return imgs


def _split_threshold(values: np.ndarray) -> float:
    """A threshold in the middle of the widest gap between sorted values (so both sides are non-empty and robust)."""
    v = np.sort(values.astype(np.float64))
    gaps = np.diff(v)
    i = int(np.argmax(gaps))
    return float((v[i] + v[i + 1]) / 2)


@torch.no_grad()
def build_and_ref_safety() -> None:
    torch.manual_seed(SEEDS["safety"])
    gen = torch.Generator().manual_seed(SEEDS["safety"] + 100)
    images = make_safety_images()
    pils = [Image.fromarray(a) for _, a in images]
    st = {}
    meta = {"images": [], "vit": {}, "sd_v1": {}}
    for i, (name, arr) in enumerate(images):
        fname = f"safety_src_{i}.png"
        save_png(fname, arr, f"safety source image {i} '{name}'")
        meta["images"].append({"index": i, "name": name, "png": fname, "hw": list(arr.shape[:2])})

    # --- v2: tiny ViT classifier (Falconsai layout) -------------------------------------------------------
    vcfg = ViTConfig(image_size=224, patch_size=16, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, id2label={0: "normal", 1: "nsfw"}, label2id={"normal": 0, "nsfw": 1})
    vit = ViTForImageClassification(vcfg).eval()
    perturb_constant_params(vit, gen, scale=0.2)
    vproc = ViTImageProcessorPil(**{k: v for k, v in FALCONSAI_PREPROCESSOR.items() if k != "image_processor_type"})
    vpix = torch.cat([vproc(images=p.convert("RGB"), return_tensors="pt").pixel_values for p in pils])
    # Make the classifier decisive and put the decision threshold in a wide gap between images.
    feats = vit.vit(vpix).last_hidden_state[:, 0]  # already post-layernorm, what the classifier sees
    vit.classifier.weight.normal_(0.0, 2.0, generator=gen)
    vit.classifier.bias.zero_()
    d = (vit.classifier(feats)[:, 1] - vit.classifier(feats)[:, 0]).numpy()
    shift = _split_threshold(d)
    vit.classifier.bias[1] = -shift / 2
    vit.classifier.bias[0] = shift / 2
    logits = vit(pixel_values=vpix).logits
    probs = torch.softmax(logits, dim=-1)
    flags = probs[:, vcfg.label2id["nsfw"]] > 0.5
    assert 0 < int(flags.sum()) < len(images), flags
    out = TINY / "nsfw_vit"
    shutil.rmtree(out, ignore_errors=True)
    vit.save_pretrained(str(out), safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(FALCONSAI_PREPROCESSOR, indent=2) + "\n")
    DOCS["tiny/nsfw_vit/"] = {"about": "ViTForImageClassification (config.json, model.safetensors; image 224, patch 16, "
                              "hidden 32, 2 layers, 2 heads, MLP 64, id2label {0: normal, 1: nsfw}) + "
                              "preprocessor_config.json in the Falconsai format (224x224 bilinear(2), rescale 1/255, "
                              "mean = std = 0.5). classifier weights/bias set so that some test images flag.",
                              "rows": None}
    st["vit_logits"] = (logits, "(6, 2) ViT logits per source image (pixel_values from ViTImageProcessorPil)")
    st["vit_probs"] = (probs, "(6, 2) softmax(logits)")
    st["vit_flags"] = (flags.to(torch.uint8), "(6,) 1 if p(nsfw) > 0.5 (strict)")
    meta["vit"] = {"label2id": vcfg.label2id, "threshold": 0.5, "flags": [bool(f) for f in flags],
                   "how_flags_were_forced": "classifier.weight ~ N(0, 2); classifier.bias = [s/2, -s/2] with s the "
                   f"midpoint of the widest gap of the per-image logit differences (s = {shift:.6f})",
                   "processor_class_used": "transformers ViTImageProcessorPil (PIL resampling)"}

    # --- v1: tiny StableDiffusionSafetyChecker ---------------------------------------------------------------
    ccfg = CLIPConfig(
        vision_config=dict(image_size=224, patch_size=14, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=64, projection_dim=16),
        text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                         projection_dim=16),
        projection_dim=16,
    )
    sc = StableDiffusionSafetyChecker(ccfg).eval()
    perturb_constant_params(sc, gen, scale=0.2)
    sc.concept_embeds.copy_(randn(gen, 17, 16))
    sc.special_care_embeds.copy_(randn(gen, 3, 16))
    cproc = CLIPImageProcessorPil(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224}, resample=3,
                                  do_center_crop=True, do_resize=True, do_rescale=True, do_normalize=True,
                                  do_convert_rgb=True, image_mean=COMPVIS_PREPROCESSOR["image_mean"],
                                  image_std=COMPVIS_PREPROCESSOR["image_std"])
    cpix = torch.cat([cproc(images=p, return_tensors="pt").pixel_values for p in pils])
    pooled = sc.vision_model(cpix)[1]
    emb = sc.visual_projection(pooled)
    from diffusers.pipelines.stable_diffusion.safety_checker import cosine_distance

    cs = cosine_distance(emb, sc.special_care_embeds).numpy()
    cc = cosine_distance(emb, sc.concept_embeds).numpy()
    # thresholds: special 0 splits the images; special 1,2 never fire; concept 0 splits the images in its own gap;
    # concept 1 fires only through the +0.01 special-care adjustment for one special-flagged image; others never.
    sw = torch.full((3,), 1.5)
    sw[0] = _split_threshold(cs[:, 0])
    special_hit = cs[:, 0] - float(sw[0]) > 0
    cw = torch.full((17,), 1.5)
    cw[0] = _split_threshold(cc[:, 0])
    hit_idx = [i for i in range(len(images)) if special_hit[i] and not (cc[i, 0] > float(cw[0]))]
    assert hit_idx, "no image is special-flagged but concept-0-clean; change SEEDS['safety']"
    k = hit_idx[0]
    # concept 1 := image k's own embedding (cos ~ 1 for k, clearly less for the others), threshold just above it
    sc.concept_embeds[1].copy_(emb[k])
    cc = cosine_distance(emb, sc.concept_embeds).numpy()
    cw[1] = float(cc[k, 1]) + 0.005
    for i in range(len(images)):
        if i != k:
            assert cc[i, 1] + 0.01 - float(cw[1]) < -0.002, (i, cc[:, 1])
    sc.special_care_embeds_weights.copy_(sw)
    sc.concept_embeds_weights.copy_(cw)
    np_images = [np.asarray(p, dtype=np.float32) / 255 for p in pils]
    _, has_nsfw = sc(clip_input=cpix, images=list(np_images))
    # Re-derive the per-concept scores exactly as StableDiffusionSafetyChecker.forward does.
    special_scores = np.zeros((len(images), 3), dtype=np.float32)
    concept_scores = np.zeros((len(images), 17), dtype=np.float32)
    adjustments = np.zeros((len(images),), dtype=np.float32)
    for i in range(len(images)):
        adjustment = 0.0
        for j in range(3):
            special_scores[i, j] = round(cs[i][j] - sc.special_care_embeds_weights[j].item() + adjustment, 3)
            if special_scores[i, j] > 0:
                adjustment = 0.01
        for j in range(17):
            concept_scores[i, j] = round(cc[i][j] - sc.concept_embeds_weights[j].item() + adjustment, 3)
        adjustments[i] = adjustment
    flags_v1 = (concept_scores > 0).any(axis=1)
    assert list(flags_v1) == list(has_nsfw), (flags_v1, has_nsfw)
    assert 0 < int(flags_v1.sum()) < len(images), flags_v1
    out = TINY / "sd_safety_checker"
    shutil.rmtree(out, ignore_errors=True)
    sc.save_pretrained(str(out), safe_serialization=True)
    (out / "preprocessor_config.json").write_text(json.dumps(COMPVIS_PREPROCESSOR, indent=2) + "\n")
    DOCS["tiny/sd_safety_checker/"] = {"about": "StableDiffusionSafetyChecker (CLIPConfig; vision: image 224, patch 14, "
                                       "hidden 32, 2 layers, 2 heads, MLP 64, quick_gelu; projection_dim 16) + "
                                       "preprocessor_config.json in the CompVis format (shortest edge 224 bicubic(3), "
                                       "centre crop 224, CLIP mean/std). Thresholds (concept/special weights) set so "
                                       "that some test images flag.", "rows": None}
    st["v1_image_embeds"] = (emb, "(6, 16) visual_projection(pooled CLIP output)")
    st["v1_special_cos"] = (torch.from_numpy(cs), "(6, 3) cosine_distance(image_embeds, special_care_embeds)")
    st["v1_concept_cos"] = (torch.from_numpy(cc), "(6, 17) cosine_distance(image_embeds, concept_embeds)")
    st["v1_special_scores"] = (torch.from_numpy(special_scores), "(6, 3) round(cos - w + adjustment, 3) (np.float32)")
    st["v1_concept_scores"] = (torch.from_numpy(concept_scores), "(6, 17) round(cos - w + adjustment, 3) (np.float32)")
    st["v1_adjustment"] = (torch.from_numpy(adjustments), "(6,) final adjustment (0 or 0.01) per image")
    st["v1_flags"] = (torch.from_numpy(flags_v1.astype(np.uint8)), "(6,) has_nsfw_concepts from forward()")
    st["v1_pixel_values_1"] = (cpix[1:2], "(1, 3, 224, 224) CLIP pixel_values of image 1 (gradient_300x200: "
                               "bicubic to 336x224, centre crop x 56..280, (x/255 - mean)/std)")
    meta["sd_v1"] = {
        "flags": [bool(f) for f in flags_v1],
        "special_care_embeds_weights": f32_list(sw),
        "concept_embeds_weights": f32_list(cw),
        "special_hit_images": [int(i) for i in np.nonzero(special_hit)[0]],
        "concept1_adjustment_image": k,
        "how_flags_were_forced": "special_care_embeds_weights[0] and concept_embeds_weights[0] are set to the midpoint "
        "of the widest gap of that column's cosines over the 6 images; concept_embeds[1] = the image "
        "embedding of one special-flagged, concept-0-clean image k, concept_embeds_weights[1] = its cos + 0.005, so it "
        "fires only for k and only through the +0.01 special-care adjustment; all other weights 1.5 (never)",
        "processor_class_used": "transformers CLIPImageProcessorPil (PIL resampling)",
    }

    # --- PIL resize references for the Rust resize tests (PNG = lossless uint8 RGB) -------------------------
    mean = np.asarray(COMPVIS_PREPROCESSOR["image_mean"], dtype=np.float32)
    std = np.asarray(COMPVIS_PREPROCESSOR["image_std"], dtype=np.float32)
    meta["resize_pngs"] = []
    for i, p in enumerate(pils):
        bil = np.asarray(p.resize((224, 224), resample=Image.BILINEAR))
        w, h = p.size
        nw, nh = (224, int(224 * h / w)) if w <= h else (int(224 * w / h), 224)
        bic_short = np.asarray(p.resize((nw, nh), resample=Image.BICUBIC))
        top, left = (nh - 224) // 2, (nw - 224) // 2
        crop = bic_short[top:top + 224, left:left + 224]
        # The processors' pixel values are exactly these PIL resizes, rescaled and normalised (checked for all 6):
        # ViT: (u8/255 - 0.5)/0.5 of the 224x224 bilinear resize; CLIP: (u8/255 - mean)/std of the centre crop
        # (top = (h'-224)//2, left = (w'-224)//2) of the shortest-edge-224 bicubic resize (w' = int(224*w/h) etc).
        assert np.allclose(((bil.astype(np.float32) / 255 - 0.5) / 0.5).transpose(2, 0, 1), vpix[i].numpy(), atol=1e-6)
        assert np.allclose(((crop.astype(np.float32) / 255 - mean) / std).transpose(2, 0, 1), cpix[i].numpy(),
                           atol=1e-5)
        if i < 3:
            bic = np.asarray(p.resize((224, 224), resample=Image.BICUBIC))
            names = {"bilinear_224": bil, "bicubic_short224": bic_short}
            if bic.shape != bic_short.shape:  # square sources: identical to bicubic_short224, not duplicated
                names["bicubic_224"] = bic
            for kind, arr in names.items():
                fname = f"resize_{kind}_{i}.png"
                desc = {"bilinear_224": "Image.resize((224, 224), BILINEAR) (= the ViT processor's resize)",
                        "bicubic_224": "Image.resize((224, 224), BICUBIC)",
                        "bicubic_short224": f"Image.resize(({nw}, {nh}), BICUBIC): CLIP shortest-edge-224 resize "
                                            "before the centre crop"}[kind]
                save_png(fname, np.ascontiguousarray(arr), f"PIL {desc} of safety_src_{i}.png")
                meta["resize_pngs"].append({"source": i, "kind": kind, "png": fname, "hw": list(arr.shape[:2])})
    save_st("safety.safetensors", st, "Safety checkers on the 6 safety_src_*.png images: tiny ViT (v2, Falconsai) and "
            "tiny StableDiffusionSafetyChecker (v1); the PIL resize references are the resize_*.png files")
    save_json("safety.json", meta, "Safety image list, flags, thresholds and how the flags were forced")


# ----------------------------------------------------------------------------------------------------------------
# 5. Reload check: the saved checkpoints (loaded the way a consumer would) reproduce the references
# ----------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def verify_reload() -> None:
    from safetensors.torch import load_file

    text = load_file(str(REF / "text.safetensors"))
    tr = load_file(str(REF / "transformer.safetensors"))
    vae_ref = load_file(str(REF / "vae.safetensors"))
    safety = load_file(str(REF / "safety.safetensors"))
    base = SanaPipeline.from_pretrained(str(TINY / "sana"), dtype=torch.float32)
    sprint = SanaSprintPipeline.from_pretrained(str(TINY / "sana_sprint"), dtype=torch.float32)
    assert base.text_encoder.config._attn_implementation == "eager"
    emb, mask, _, _ = base.encode_prompt(TEXT_PROMPTS, do_classifier_free_guidance=False, device="cpu",
                                         complex_human_instruction=CHI)
    assert torch.allclose(emb, text["prompt_embeds"], atol=1e-5) and torch.equal(mask, text["prompt_embeds_mask"])
    emb_s, _ = sprint.encode_prompt(TEXT_PROMPTS[:1], device="cpu", complex_human_instruction=CHI)
    assert torch.allclose(emb_s, text["prompt_embeds"][:1], atol=1e-5)
    out = base.transformer(tr["base_b2_x"], encoder_hidden_states=tr["base_b2_ehs"], timestep=tr["base_b2_t"],
                           encoder_attention_mask=tr["base_b2_mask"], return_dict=False)[0]
    assert torch.allclose(out, tr["base_b2_out"], atol=1e-5)
    out = sprint.transformer(tr["base_b1_x"], encoder_hidden_states=tr["base_b1_ehs"], timestep=tr["sprint_b1_t"],
                             guidance=tr["sprint_b1_guidance"], encoder_attention_mask=tr["base_b1_mask"],
                             return_dict=False)[0]
    assert torch.allclose(out, tr["sprint_b1_out"], atol=1e-5)
    dec = base.vae.decode(vae_ref["l233_latent"] / base.vae.config.scaling_factor).sample
    assert torch.allclose(dec, vae_ref["l233_decoded"], atol=1e-5)
    vit = ViTForImageClassification.from_pretrained(str(TINY / "nsfw_vit")).eval()
    sc = StableDiffusionSafetyChecker.from_pretrained(str(TINY / "sd_safety_checker")).eval()
    pils = [Image.open(REF / f"safety_src_{i}.png").convert("RGB") for i in range(6)]
    vproc = ViTImageProcessorPil(**{k: v for k, v in FALCONSAI_PREPROCESSOR.items() if k != "image_processor_type"})
    vpix = torch.cat([vproc(images=p, return_tensors="pt").pixel_values for p in pils])
    assert torch.allclose(vit(pixel_values=vpix).logits, safety["vit_logits"], atol=1e-5)
    emb = sc.visual_projection(sc.vision_model(safety["v1_pixel_values_1"])[1])
    assert torch.allclose(emb, safety["v1_image_embeds"][1:2], atol=1e-5)
    print("reload check: OK")


# ----------------------------------------------------------------------------------------------------------------
# README
# ----------------------------------------------------------------------------------------------------------------
README_HEAD = """# Test fixtures (tiny random-weight checkpoints + reference tensors)

Generated by `tools/make_tiny_fixtures.py` (see its header for the pinned versions and how to run it):
diffusers {diffusers}, transformers {transformers}, tokenizers {tokenizers}, torch {torch}, numpy {numpy},
Pillow {pil}. Everything is float32 on the CPU; integer tensors are int64 (ids, masks) or uint8 (images, flags).
**Do not edit by hand** — regenerate. This file is regenerated too.

## Tiny configs

* Tokenizer: BPE trained with `tokenizers` on the CHI text + a few prompts, Gemma pipeline
  (normalizer `' ' -> '▁'`, BPE with byte fallback, TemplateProcessing `<bos> $A`), saved as `GemmaTokenizer`
  (transformers 5 name of GemmaTokenizerFast). Vocab {vocab}: `<pad>`=0, `<eos>`=1, `<bos>`=2, `<unk>`=3, `<mask>`=4,
  `<0x00>`..`<0xFF>` = 5..260, then trained symbols/merges. Python's default padding side is *left*; the pipelines
  switch to right — so must Rust.
* Gemma2Model: hidden 64, intermediate 128, 2 layers, 2 heads, 1 KV head, head_dim 32, query_pre_attn_scalar 32,
  attn softcap 50, final softcap 30 (unused), sliding_window 4096, max_position_embeddings 1024; q/k weights scaled up
  (std 0.6) so attention softcapping changes results; all norm weights perturbed (nonzero, tests `1 + w`).
  Reference attention: **eager** (softcap applied). transformers 5.24 defaults Gemma2 to eager (`_supports_sdpa=False`),
  unlike 5.17 (spec §1.4); `text.safetensors:prompt0_embeds_sdpa` is the no-softcap variant.
* Transformer: in/out 8, 2 layers, 2 heads x 16 (D = 32), cross 2 x 16, cross_attention_dim 32, caption_channels 64,
  mlp_ratio 2.5 (GLUMBConv hidden 80), sample_size 16 (-> ASPECT_RATIO_512_BIN), patch 1. Sprint adds
  guidance_embeds, qk_norm "rms_norm_across_heads", guidance_embeds_scale 0.1.
* DC-AE: latent 8, attention_head_dim 8, 6 stages [8, 8, 16, 16, 32, 32], blocks [Res x 3, EViT x 3], 1 layer each,
  qkv_multiscales [[],[],[],[5],[5],[5]], upsample "interpolate", downsample "Conv", rms_norm/silu,
  scaling_factor 0.41407 -> spatial compression 32, in_shortcut repeats 32/8 = 4. Note: diffusers uses quadratic
  attention when H*W <= attention_head_dim (8 here, 32 in the real model).
* Constant-initialised parameters (norm weights = 1, biases = 0) of every tiny model were perturbed with noise so
  a port ignoring them fails.

## Parameter counts of the real configs (meta-device instantiation)

{counts}

## Notes for consumers

* Tolerances: the references are fp32 on the CPU; a faithful fp32 candle port should match component outputs to
  ~1e-4 relative (different GEMM/conv accumulation order) and the e2e uint8 images to within a few levels (PSNR).
  Token ids, masks, timesteps, sigmas and flags must match exactly.
* The tiny pipelines run entirely in fp32, so the bf16 casts of the production path (spec §3, §1.6) do not occur here:
  `latents / scaling_factor` and the postprocess `(x * 0.5 + 0.5).clamp(0, 1)` are fp32, then
  `(x * 255).round()` (ties-to-even) -> uint8.
* e2e cases (settings in `e2e.json`): `base_512` (512x512 -> 512 bin "1.0"), `base_300x200` (w 300 x h 200 -> bin
  "0.68" = 416x608, decoded at 416x608, bilinear (align_corners=False) to 205x300, centre-crop rows 2..202 -> 200x300),
  `base_n2` (num_images_per_prompt 2, 128x192, `use_resolution_binning=False`), `sprint_512` (2 steps, guidance 5.0,
  `use_resolution_binning=False`, see the script header). Base: 18 steps, CFG 5.0, negative prompt "".
* Image processors: the references use transformers' PIL-backed processors (`ViTImageProcessorPil`,
  `CLIPImageProcessorPil`; in transformers 4.x these were `ViTImageProcessor`/`CLIPImageProcessor`); the
  `preprocessor_config.json` files are written in the Hub formats of Falconsai/nsfw_image_detection and
  CompVis/stable-diffusion-safety-checker. ViT pixel_values == `(resize_bilinear_224 / 255 - 0.5) / 0.5` and CLIP
  pixel_values == `(centre_crop(resize_bicubic_short224) / 255 - mean) / std` (asserted by the script for all 6 images).
* `tiny/*/model_index.json` names the tokenizer class `GemmaTokenizer` (transformers 5 name; the Hub repos say
  `GemmaTokenizerFast`). Gemma2 weights are saved without a `model.` prefix (`embed_tokens.weight`, `layers.N...`,
  `norm.weight`), like the real `text_encoder/`.
* The script ends by reloading every saved checkpoint with `from_pretrained` and checking it reproduces the references.

## Files
"""


README_MARKER = "<!-- END OF GENERATED PART -->"


def write_readme(counts: dict, vocab: int) -> None:
    lines = [README_HEAD.format(diffusers=diffusers.__version__, transformers=transformers.__version__,
                                tokenizers=tokenizers.__version__, torch=torch.__version__, numpy=np.__version__,
                                pil=PIL.__version__, vocab=vocab,
                                counts="\n".join(f"* {k}: {v:,}" for k, v in counts.items()))]
    for path in sorted(DOCS):
        d = DOCS[path]
        lines.append(f"### `{path}`\n\n{d['about']}\n")
        if d["rows"]:
            lines.append("| key | shape | dtype | meaning |\n|---|---|---|---|")
            for key, shape, dtype, desc in d["rows"]:
                lines.append(f"| `{key}` | {shape} | {dtype} | {desc} |")
            lines.append("")
    # Text after the marker (documentation of fixtures made by other tools, e.g. torch_cuda_randn/) is preserved.
    readme = FIX / "README.md"
    note = ("(Anything below this line is kept verbatim when the script regenerates this file; document fixtures "
            "produced by other tools here.)")
    tail = ""
    if readme.exists() and README_MARKER in readme.read_text():
        tail = readme.read_text().split(README_MARKER, 1)[1].replace(note, "", 1).strip("\n")
    lines += [README_MARKER, note, "", tail]
    readme.write_text("\n".join(lines).rstrip("\n") + "\n")


def main() -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(2)
    for d in (TINY, REF, REAL):
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    base, sprint = build_pipelines(tok)
    counts = write_real_configs()
    ref_text(base)
    ref_transformer(base, sprint)
    ref_vae(base)
    ref_scheduler()
    ref_e2e(base, sprint)
    build_and_ref_safety()
    write_readme(counts, len(tok))
    verify_reload()
    total = sum(f.stat().st_size for f in FIX.rglob("*") if f.is_file())
    print(f"wrote {FIX} ({total / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
