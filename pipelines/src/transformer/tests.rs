//! Tests of the Sana transformer: config defaults, load errors, text-cache reuse, masking, parameter
//! counts of the real configs, and parity with diffusers 0.42.1 on the tiny random checkpoints
//! (`tests/fixtures/`, see `tests/fixtures/README.md`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{VarBuilder, VarMap};

use super::{SanaTransformer2DModel, Tap, TransformerConfig};
use crate::loader::ComponentFiles;
use crate::param_count::ParamCounter;
use crate::rng::test_randn;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

/// The tiny Sprint transformer of the fixture contract (HELPERS.md), as test data.
const TINY_SPRINT: &str = r#"{
  "in_channels": 8, "out_channels": 8, "num_attention_heads": 2, "attention_head_dim": 16,
  "num_layers": 2, "num_cross_attention_heads": 2, "cross_attention_head_dim": 16,
  "cross_attention_dim": 32, "caption_channels": 64, "mlp_ratio": 2.5, "sample_size": 16,
  "patch_size": 1, "guidance_embeds": true, "qk_norm": "rms_norm_across_heads",
  "guidance_embeds_scale": 0.1
}"#;

fn tiny_cfg() -> TransformerConfig {
    serde_json::from_str(TINY_SPRINT).expect("TINY_SPRINT is valid JSON")
}

/// Every weight the model requests, filled with N(0, 0.2²) (the VarMap's own inits include zeros,
/// which would make the modulation and norms trivial).
fn random_weights(cfg: &TransformerConfig) -> Result<HashMap<String, Tensor>> {
    let dev = Device::Cpu;
    let varmap = VarMap::new();
    SanaTransformer2DModel::load(VarBuilder::from_varmap(&varmap, DType::F32, &dev), cfg)?;
    let data = varmap
        .data()
        .lock()
        .expect("VarMap lock is never poisoned in tests");
    let mut out = HashMap::new();
    for (name, var) in data.iter() {
        let r = test_randn(name, 0.2, var.as_tensor().dims())?;
        out.insert(name.clone(), r);
    }
    Ok(out)
}

fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f32> {
    let a = a.to_dtype(DType::F32)?.flatten_all()?;
    let b = b.to_dtype(DType::F32)?.flatten_all()?;
    let num = (&a - &b)?.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    let den = b.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    Ok(num / den.max(f32::MIN_POSITIVE))
}

#[test]
fn config_defaults_match_diffusers_init() {
    let cfg: TransformerConfig = serde_json::from_str("{}").expect("empty object parses");
    assert_eq!(cfg.in_channels, 32);
    assert_eq!(cfg.out_channels(), 32);
    assert_eq!(cfg.inner_dim(), 2240);
    assert_eq!(cfg.num_layers, 20);
    assert_eq!(
        cfg.cross_attention().expect("defaults set"),
        (20, 112, 2240)
    );
    assert_eq!(cfg.caption_channels, 2304);
    assert_eq!(cfg.ff_hidden(), 5600);
    assert!(!cfg.attention_bias && !cfg.guidance_embeds && !cfg.norm_elementwise_affine);
    assert_eq!((cfg.patch_size, cfg.sample_size), (1, 32));
    assert_eq!(cfg.norm_eps, 1e-6);
    assert_eq!(cfg.interpolation_scale, None);
    assert_eq!(cfg.qk_norm, None);
    assert_eq!((cfg.guidance_embeds_scale, cfg.timestep_scale), (0.1, 1.0));
    let nulls: TransformerConfig = serde_json::from_str(
        r#"{"out_channels": null, "in_channels": 4, "interpolation_scale": null}"#,
    )
    .expect("nulls parse");
    assert_eq!(nulls.out_channels(), 4);
}

#[test]
fn unsupported_configs_fail_at_load_with_reason() {
    for (patch, expect) in [
        (r#"{"patch_size": 2}"#, "patch_size 2"),
        (r#"{"interpolation_scale": 1}"#, "interpolation_scale"),
        (r#"{"qk_norm": "layer_norm"}"#, "layer_norm"),
        (r#"{"cross_attention_dim": null}"#, "cross_attention_dim"),
    ] {
        let mut v: serde_json::Value = serde_json::from_str(TINY_SPRINT).expect("valid");
        let p: serde_json::Value = serde_json::from_str(patch).expect("valid");
        for (k, val) in p.as_object().expect("object") {
            v[k] = val.clone();
        }
        let cfg: TransformerConfig = serde_json::from_value(v).expect("parses");
        let counter = ParamCounter::new();
        let err = SanaTransformer2DModel::load(counter.var_builder(DType::F32, &Device::Cpu), &cfg)
            .expect_err("unsupported config must not load")
            .to_string();
        assert!(err.contains(expect), "{patch}: {err}");
    }
}

#[test]
fn missing_weight_fails_at_load_with_its_name() -> Result<()> {
    let cfg = tiny_cfg();
    let mut weights = random_weights(&cfg)?;
    // Sanity: the complete map loads.
    SanaTransformer2DModel::load(
        VarBuilder::from_tensors(weights.clone(), DType::F32, &Device::Cpu),
        &cfg,
    )?;
    let missing = "transformer_blocks.1.attn2.norm_k.weight";
    assert!(
        weights.remove(missing).is_some(),
        "{missing} is a Sprint weight"
    );
    let err = SanaTransformer2DModel::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
    )
    .expect_err("a missing weight must fail the load")
    .to_string();
    assert!(
        err.contains(missing),
        "error does not name the weight: {err}"
    );
    Ok(())
}

/// Inputs for one tiny forward: text (B, T, 64), mask with the last `pad` tokens dropped in row 1.
fn tiny_text(b: usize, t: usize, pad: usize) -> Result<(Tensor, Tensor)> {
    let dev = Device::Cpu;
    let text = test_randn("text", 1., (b, t, 64))?;
    let mut m = vec![1f32; b * t];
    for j in t - pad..t {
        m[t + j] = 0.; // row 1
    }
    Ok((text, Tensor::from_vec(m, (b, t), &dev)?))
}

#[test]
fn cached_text_context_matches_recomputation_across_steps() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_cfg();
    let model = SanaTransformer2DModel::load(
        VarBuilder::from_tensors(random_weights(&cfg)?, DType::F32, &dev),
        &cfg,
    )?;
    let (text, mask) = tiny_text(2, 7, 3)?;
    let cached = model.prepare_text(&text, &mask)?;
    let guidance = Tensor::new(&[4.5f32, 4.5], &dev)?;
    let mut outputs = Vec::new();
    for (step, t) in [0.9f32, 0.4].into_iter().enumerate() {
        let x = test_randn(&format!("x{step}"), 1., (2, 8, 4, 6))?;
        let ts = Tensor::new(&[t, t], &dev)?;
        let reused = model.forward(&x, &ts, Some(&guidance), &cached)?;
        let fresh = model.forward(&x, &ts, Some(&guidance), &model.prepare_text(&text, &mask)?)?;
        assert_eq!(reused.dims(), &[2, 8, 4, 6]);
        // Same ops on the same inputs: identical up to f32 noise (1e-6 relative L2).
        let d = rel_l2(&reused, &fresh)?;
        assert!(d <= 1e-6, "step {step}: cached vs recomputed rel L2 {d}");
        outputs.push(reused);
    }
    // The two steps really differ (the cache does not freeze the output).
    assert!(rel_l2(&outputs[0], &outputs[1])? > 1e-2);
    Ok(())
}

#[test]
fn masked_caption_tokens_do_not_influence_output() -> Result<()> {
    let dev = Device::Cpu;
    let cfg = tiny_cfg();
    let model = SanaTransformer2DModel::load(
        VarBuilder::from_tensors(random_weights(&cfg)?, DType::F32, &dev),
        &cfg,
    )?;
    let (text, mask) = tiny_text(2, 7, 3)?;
    // Change only the masked tokens of row 1 (positions 4..7).
    let noise = test_randn("noise", 5., (1, 3, 64))?;
    let row1 = Tensor::cat(&[&text.get(1)?.narrow(0, 0, 4)?.unsqueeze(0)?, &noise], 1)?;
    let text2 = Tensor::cat(&[&text.narrow(0, 0, 1)?, &row1], 0)?;
    let x = test_randn("x", 1., (2, 8, 3, 3))?;
    let ts = Tensor::new(&[0.7f32], &dev)?; // one value for both rows
    let g = Tensor::new(&[3.0f32, 3.0], &dev)?;
    let a = model.forward(&x, &ts, Some(&g), &model.prepare_text(&text, &mask)?)?;
    let b = model.forward(&x, &ts, Some(&g), &model.prepare_text(&text2, &mask)?)?;
    // exp(-10000) underflows to 0 in f32: masked keys contribute exactly nothing (1e-6 for matmul order).
    let d = rel_l2(&a, &b)?;
    assert!(d <= 1e-6, "masked tokens changed the output: rel L2 {d}");
    // Control: the same change with everything unmasked does move the output.
    let ones = Tensor::ones((2, 7), DType::F32, &dev)?;
    let c = model.forward(&x, &ts, Some(&g), &model.prepare_text(&text, &ones)?)?;
    let e = model.forward(&x, &ts, Some(&g), &model.prepare_text(&text2, &ones)?)?;
    let moved = rel_l2(&c, &e)?;
    assert!(
        moved > 1e-3,
        "unmasked tokens changed nothing: rel L2 {moved}"
    );
    // Guidance is required for a guidance-embedding checkpoint.
    assert!(model
        .forward(&x, &ts, None, &model.prepare_text(&text, &mask)?)
        .is_err());
    Ok(())
}

fn count_params(config_file: &str) -> std::result::Result<usize, Box<dyn std::error::Error>> {
    let path = fixtures().join("real_configs").join(config_file);
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let cfg: TransformerConfig = serde_json::from_str(&text)?;
    let counter = ParamCounter::new();
    SanaTransformer2DModel::load(counter.var_builder(DType::BF16, &Device::Cpu), &cfg)?;
    Ok(counter.total())
}

#[test]
fn parameter_count_base() -> std::result::Result<(), Box<dyn std::error::Error>> {
    // docs/sana-port-spec.md §1.1 (VERIFIED by instantiating the diffusers model).
    assert_eq!(count_params("transformer_base.json")?, 1_604_462_752);
    Ok(())
}

#[test]
fn parameter_count_sprint() -> std::result::Result<(), Box<dyn std::error::Error>> {
    assert_eq!(count_params("transformer_sprint.json")?, 1_610_237_472);
    Ok(())
}

/// Name of a tap in `tests/fixtures/reference/transformer.safetensors`.
fn tap_key(tap: Tap) -> String {
    match tap {
        Tap::PatchEmbed => "patch_embed".into(),
        Tap::TimeT6 => "time_t6".into(),
        Tap::TimeEmb => "time_emb".into(),
        Tap::Caption => "caption".into(),
        Tap::Block(i) => format!("block{i}"),
        Tap::NormOut => "norm_out".into(),
    }
}

/// Loads `tiny/<pipeline>/transformer` and checks every case `<variant>_<case>_*` of the reference
/// file: the output always, the intermediates where the reference has them.
fn parity(pipeline: &str, variant: &str) -> std::result::Result<(), Box<dyn std::error::Error>> {
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny").join(pipeline).join("transformer");
    let files = ComponentFiles {
        config: dir.join("config.json"),
        weights: vec![dir.join("diffusion_pytorch_model.safetensors")],
        dir,
    };
    let model = SanaTransformer2DModel::load_component(&files, DType::F32, &dev)?;
    let refs =
        candle_core::safetensors::load(fixtures().join("reference/transformer.safetensors"), &dev)?;
    for (case, required) in [
        ("b1", &["out"][..]),
        (
            "b2",
            &["out", "time_t6", "time_emb", "block0", "block1"][..],
        ),
    ] {
        // Inputs are shared (`base_*`); timesteps, guidance and outputs are per variant.
        let key = |prefix: &str, name: &str| -> std::result::Result<Tensor, String> {
            let key = format!("{prefix}_{case}_{name}");
            refs.get(&key)
                .cloned()
                .ok_or(format!("reference lacks {key}"))
        };
        let guidance = if model.config().guidance_embeds {
            Some(key(variant, "guidance")?)
        } else {
            None
        };
        let mut got: HashMap<String, Tensor> = HashMap::new();
        let ehs = key("base", "ehs")?;
        let text = model.prepare_text_tapped(&ehs, &key("base", "mask")?, &mut |tap, t| {
            got.insert(tap_key(tap), t.clone());
        })?;
        let x = key("base", "x")?;
        let out = model.forward_tapped(
            &x,
            &key(variant, "t")?,
            guidance.as_ref(),
            &text,
            &mut |tap, t| {
                got.insert(tap_key(tap), t.clone());
            },
        )?;
        got.insert("out".into(), out);
        let mut checked = Vec::new();
        for (name, ours) in &got {
            // Intermediates the reference did not capture are skipped; `required` says which must exist.
            let Ok(want) = key(variant, name) else {
                continue;
            };
            assert_eq!(ours.dims(), want.dims(), "{variant}_{case}_{name}: shape");
            // Tolerance: relative L2 ≤ 1e-4 (f32 on both sides; differences are summation order only).
            let d = rel_l2(ours, &want)?;
            eprintln!("{variant}_{case}_{name}: rel L2 {d:e}");
            assert!(d <= 1e-4, "{variant}_{case}_{name}: rel L2 {d:e} > 1e-4");
            checked.push(name.as_str());
        }
        for r in required {
            assert!(checked.contains(r), "{variant}_{case}_{r} was not compared");
        }
    }
    Ok(())
}

#[test]
fn parity_with_diffusers_base() -> std::result::Result<(), Box<dyn std::error::Error>> {
    parity("sana", "base")
}

#[test]
fn parity_with_diffusers_sprint() -> std::result::Result<(), Box<dyn std::error::Error>> {
    parity("sana_sprint", "sprint")
}

#[test]
fn bf16_weights_run_end_to_end_close_to_f32_reference(
) -> std::result::Result<(), Box<dyn std::error::Error>> {
    // The GPU runs bf16; this catches dtype mismatches (f32 islands meeting bf16 tensors) on the CPU.
    let dev = Device::Cpu;
    let dir = fixtures().join("tiny/sana_sprint/transformer");
    let files = ComponentFiles {
        config: dir.join("config.json"),
        weights: vec![dir.join("diffusion_pytorch_model.safetensors")],
        dir,
    };
    let model = SanaTransformer2DModel::load_component(&files, DType::BF16, &dev)?;
    assert_eq!(model.dtype(), DType::BF16);
    let refs =
        candle_core::safetensors::load(fixtures().join("reference/transformer.safetensors"), &dev)?;
    let get = |k: &str| refs.get(k).cloned().ok_or(format!("reference lacks {k}"));
    let text = model.prepare_text(&get("base_b2_ehs")?, &get("base_b2_mask")?)?;
    let out = model.forward(
        &get("base_b2_x")?,
        &get("sprint_b2_t")?,
        Some(&get("sprint_b2_guidance")?),
        &text,
    )?;
    assert_eq!(out.dtype(), DType::BF16);
    // bf16 has an 8-bit mantissa (≈4e-3 relative per rounding); two tiny blocks stay within 3e-2.
    let d = rel_l2(&out, &get("sprint_b2_out")?)?;
    assert!(d <= 3e-2, "bf16 vs f32 reference rel L2 {d:e}");
    Ok(())
}
