//! DC-AE decoder tests against the committed fixtures (`tests/fixtures/`, see its README): parameter
//! count of the real Sana VAE config, parity with diffusers on the tiny random-weight VAE, tiling.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use super::{blocks, DcAeConfig, DcAeDecoder, DcAeTiling};
use crate::param_count::ParamCounter;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn config(path: PathBuf) -> DcAeConfig {
    DcAeConfig::from_json_file(&path).unwrap_or_else(|e| panic!("{e}"))
}

/// The tiny VAE of the `sana` fixture pipeline, f32 on CPU.
fn tiny_decoder() -> Result<DcAeDecoder> {
    let dir = fixtures().join("tiny/sana/vae");
    let cfg = config(dir.join("config.json"));
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    DcAeDecoder::load(vb, &cfg)
}

/// ‖a − b‖₂ / ‖b‖₂ over all elements.
fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    let num = (a - b)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    let den = b.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    Ok((num / den).sqrt())
}

#[test]
fn real_config_decoder_parameter_count() -> Result<()> {
    let cfg = config(fixtures().join("real_configs/vae.json"));
    assert_eq!(cfg.spatial_compression_ratio(), 32);
    let counter = ParamCounter::new();
    let _decoder = DcAeDecoder::load(counter.var_builder(DType::BF16, &Device::Cpu), &cfg)?;
    assert_eq!(
        counter.total_under("encoder."),
        0,
        "the encoder must not be loaded"
    );
    // sana-port-spec §1.2 / §3.2: decoder of dc-ae-f32c32-sana-1.x = 159,223,171 (VERIFIED upstream).
    assert_eq!(counter.total(), 159_223_171);
    Ok(())
}

#[test]
fn missing_weight_fails_at_load_with_its_name() -> Result<()> {
    let cfg = config(fixtures().join("tiny/sana/vae/config.json"));
    let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    let err = DcAeDecoder::load(vb, &cfg)
        .expect_err("no weights at all")
        .to_string();
    assert!(
        err.contains("decoder.conv_in.weight"),
        "error does not name the weight: {err}"
    );
    Ok(())
}

/// `reference/vae.safetensors`: `{name}_latent` (before `/ scaling_factor`) and diffusers'
/// `vae.decode(latent / scaling_factor).sample` as `{name}_decoded`.
fn reference() -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(fixtures().join("reference/vae.safetensors"), &Device::Cpu)
}

/// `latent / scaling_factor` as torch computes it in f32 (a true division, not a reciprocal multiply).
fn unscale(dec: &DcAeDecoder, latent: &Tensor) -> Result<Tensor> {
    let sf = Tensor::new(dec.config().scaling_factor as f32, latent.device())?;
    latent.broadcast_div(&sf)
}

#[test]
fn tiny_decode_matches_diffusers() -> Result<()> {
    let dec = tiny_decoder()?;
    let refs = reference()?;
    // l146, l233: linear attention everywhere; l123: H·W = 6 ≤ head_dim 8 at up_blocks.5, so the
    // quadratic branch runs there; l233 has batch 2.
    for name in ["l146", "l233", "l123"] {
        let latent = &refs[&format!("{name}_latent")];
        let want = &refs[&format!("{name}_decoded")];
        let got = dec.decode(&unscale(&dec, latent)?)?;
        assert_eq!(got.dims(), want.dims(), "{name}");
        let err = rel_l2(&got, want)?;
        // f32 on CPU vs torch f32 on CPU: only summation order differs.
        assert!(err <= 1e-4, "{name}: relative L2 {err:e} > 1e-4");
    }
    Ok(())
}

#[test]
fn tiny_up_block_outputs_match_diffusers() -> Result<()> {
    let dec = tiny_decoder()?;
    let refs = reference()?;
    let z = dec.decode_head(&unscale(&dec, &refs["l233_latent"])?)?;
    let mut h = z;
    // README documents up_blocks.5 ..= 2; stages 1, 0 and the head are covered by the end-to-end test.
    for i in (2..=5).rev() {
        h = dec.up_blocks[i].forward(&h)?;
        // The decoder runs channels-last; the reference is NCHW.
        let err = rel_l2(
            &blocks::to_channels_first(&h)?,
            &refs[&format!("l233_up_block{i}")],
        )?;
        // Per-stage check so a failure points at its stage; same f32 tolerance as the end-to-end test.
        assert!(err <= 1e-4, "up_blocks.{i}: relative L2 {err:e} > 1e-4");
    }
    Ok(())
}

#[test]
fn tiled_decode_below_one_tile_is_untiled() -> Result<()> {
    let dec = tiny_decoder()?;
    let refs = reference()?;
    let z = unscale(&dec, &refs["l146_latent"])?; // 4×6 latents < 16×16-latent default tile
    let tiled = dec.decode_tiled(&z, &DcAeTiling::default())?;
    let plain = dec.decode(&z)?;
    let diff = (tiled - plain)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(
        diff, 0.0,
        "diffusers decodes latents no larger than a tile without tiling"
    );
    Ok(())
}

#[test]
fn tiled_decode_of_large_latent_has_full_size() -> Result<()> {
    let dec = tiny_decoder()?;
    // 128×128 px tiles (4 latents) every 96 px (3 latents): 3×4 tiles over 7×10 latents, blend 32 px.
    let tiling = DcAeTiling {
        tile_sample_min_height: 128,
        tile_sample_min_width: 128,
        tile_sample_stride_height: 96,
        tile_sample_stride_width: 96,
    };
    let z = crate::rng::test_randn("dcae/tests:153", 1.0, (1, 8, 7, 10))?;
    let tiled = dec.decode_tiled(&z, &tiling)?;
    assert_eq!(tiled.dims(), &[1, 3, 7 * 32, 10 * 32]);
    let finite = tiled
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite());
    assert!(finite, "tiled output has non-finite values");
    // Tiles see only their own latents, so the result differs from untiled decoding, but the
    // top-left corner (covered by the first tile only, before any blend) equals decoding that tile.
    let corner = dec.decode(&z.narrow(2, 0, 4)?.narrow(3, 0, 4)?)?;
    let want = corner.narrow(2, 0, 96)?.narrow(3, 0, 96)?;
    let got = tiled.narrow(2, 0, 96)?.narrow(3, 0, 96)?;
    let diff = (got - want)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    assert_eq!(diff, 0.0);
    Ok(())
}

/// diffusers' `enable_tiling(...)` + `decode` on the same tiny VAE and latents
/// (`tools/make_tiled_decode_fixture.py`): tile split, per-tile decode, blending and cropping all match.
#[test]
fn tiled_decode_matches_diffusers_tiled_decode() -> Result<()> {
    let dec = tiny_decoder()?;
    let refs = candle_core::safetensors::load(
        fixtures().join("reference/vae_tiled.safetensors"),
        &Device::Cpu,
    )?;
    let cases = [
        // diffusers' defaults: 16-latent tiles every 14 on 17×17 latents → 2×2 tiles, blends 64 px.
        ("default", DcAeTiling::default()),
        // non-square tiles, blends of 96 and 32 px, batch 2, on 9×7 latents → 2×2 tiles.
        (
            "custom",
            DcAeTiling {
                tile_sample_min_height: 256,
                tile_sample_min_width: 192,
                tile_sample_stride_height: 160,
                tile_sample_stride_width: 160,
            },
        ),
    ];
    for (name, tiling) in cases {
        let z = unscale(&dec, &refs[&format!("{name}_latent")])?;
        let want = &refs[&format!("{name}_tiled")];
        let got = dec.decode_tiled(&z, &tiling)?;
        assert_eq!(got.dims(), want.dims(), "{name}");
        let max_abs = (&got - want)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        let untiled = dec.decode(&z)?;
        let untiled_err = rel_l2(&untiled, want)?;
        let err = rel_l2(&got, want)?;
        assert!(
            err < 1e-5 && max_abs < 1e-4,
            "{name}: tiled decode vs diffusers: rel L2 {err:.3e}, max |Δ| {max_abs:.3e}"
        );
        // The comparison can fail: untiled decoding of the same latents is far from the reference.
        assert!(
            untiled_err > 1e-3,
            "{name}: untiled rel L2 {untiled_err:.3e}"
        );
    }
    Ok(())
}

#[test]
fn sprint_vae_loads_with_its_own_weights() -> Result<()> {
    // Sana-Sprint ships its own VAE (spec §1.2): same architecture, different weights.
    let dir = fixtures().join("tiny/sana_sprint/vae");
    let cfg = config(dir.join("config.json"));
    // SAFETY: the fixture file is not modified while the test runs.
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("diffusion_pytorch_model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )?
    };
    let sprint = DcAeDecoder::load(vb, &cfg)?;
    let base = tiny_decoder()?;
    let z = reference()?["l146_latent"].clone();
    let (a, b) = (sprint.decode(&z)?, base.decode(&z)?);
    assert_eq!(a.dims(), b.dims());
    assert!(
        rel_l2(&a, &b)? > 1e-2,
        "sprint and base VAEs have different random weights"
    );
    Ok(())
}
