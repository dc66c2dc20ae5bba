//! `gpu-check`: correctness checks of the CUDA build on a real GPU, in one run, ending with a short table.
//!
//! 1. Every case of `tests/fixtures/torch_cuda_randn/` (torch 2.11 CUDA `randn` draws recorded on an H200)
//!    drawn again on this GPU by [`sana_pipelines::rng_cuda`]: count of bit-identical values (target: all),
//!    next to the CPU port's count ([`sana_pipelines::rng`]).
//! 2. Both tiny pipelines (`tests/fixtures/tiny/sana`, `tiny/sana_sprint`) on CUDA with the reference run's
//!    latents (and Sprint step noises) injected, as `tests/pipeline_e2e.rs` does on the CPU: PSNR against
//!    the diffusers PNGs, in f32 (must reach [`MIN_PSNR_F32_DB`]) and in bf16 (reported only).
//! 3. With the real-size random checkpoints (third argument): fused ops against the portable path, and
//!    batch invariance (issue 14): a batch row against the same row alone, bit for bit.
//! 4. Seeded generation on CUDA (the GPU generator through `ImagePipeline::generate`): repeatable, and the
//!    same images as with the CPU port's noise up to its last-ulp differences (PSNR reported).
//!
//! Usage: `gpu-check [REPO_ROOT [EXTRA_RANDN_DIR [BASE_REAL_DIR [SPRINT_REAL_DIR]]]]` (default `.`; the extra
//! directory holds draws in the fixtures' format made live on this card by `bench/torch_randn_extra.py`;
//! the real-size random checkpoints of `make_real_random_checkpoints.py`, Sprint's for its forward's row).
//! Exit status 1 when a required check fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sana_pipelines::image_ops::psnr;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::ops;
use sana_pipelines::rng::TorchCudaGenerator;
use sana_pipelines::rng_cuda::{CudaTorchGenerator, DeviceShape};
use sana_pipelines::sana::{
    load_pipelines, InjectedNoise, NoiseSource, Pipelines, PipelinesConfig, RunOptions,
};
use sana_pipelines::{GenerateRequest, NoProgress, PipelineKind, StepObserver};

/// Same bound as the CPU parity test (`tests/pipeline_e2e.rs`): f32 differs only in summation order.
const MIN_PSNR_F32_DB: f64 = 40.0;

/// One line of the final table.
struct Row {
    check: String,
    result: String,
    pass: Option<bool>,
}

fn row(
    rows: &mut Vec<Row>,
    check: impl Into<String>,
    result: impl Into<String>,
    pass: Option<bool>,
) {
    let r = Row {
        check: check.into(),
        result: result.into(),
        pass,
    };
    println!("{:<44} {}", r.check, r.result);
    rows.push(r);
}

fn randn_cases(
    dir: &Path,
    label: &str,
    cuda: &candle_core::CudaDevice,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("torch_cuda_randn.json"))?)?;
    println!(
        "randn {label}: recorded by torch {} on {} ({} SMs)",
        meta["torch"], meta["device"], meta["sm_count"]
    );
    let want_all =
        candle_core::safetensors::load(dir.join("torch_cuda_randn.safetensors"), &Device::Cpu)?;
    let cases = meta["cases"].as_array().context("json: cases")?;
    let (mut total, mut gpu_exact, mut cpu_exact) = (0usize, 0usize, 0usize);
    let mut gpu_max = 0f32;
    for case in cases {
        let name = case["name"].as_str().context("case name")?;
        let seed = case["seed"].as_u64().context("seed")?;
        let stride = case["stride"].as_u64().context("stride")? as usize;
        let mut gpu = CudaTorchGenerator::new(seed, cuda)?;
        let mut cpu = TorchCudaGenerator::new(seed);
        let shapes = case["shapes"].as_array().context("shapes")?;
        for (i, shape) in shapes.iter().enumerate() {
            let dims: Vec<usize> = shape
                .as_array()
                .context("shape")?
                .iter()
                .map(|d| d.as_u64().map(|d| d as usize).context("dim"))
                .collect::<anyhow::Result<_>>()?;
            let numel: usize = dims.iter().product();
            let g: Vec<f32> = gpu
                .randn_tensor(dims.as_slice())?
                .flatten_all()?
                .to_vec1::<f32>()?
                .into_iter()
                .step_by(stride)
                .collect();
            let c: Vec<f32> = cpu.randn(numel).into_iter().step_by(stride).collect();
            let key = format!("{name}.{i}");
            let want = want_all
                .get(&key)
                .with_context(|| format!("fixture {key}"))?
                .to_vec1::<f32>()?;
            if g.len() != want.len() {
                bail!("{key}: {} values drawn, {} recorded", g.len(), want.len());
            }
            let ge = g
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            let ce = c
                .iter()
                .zip(&want)
                .filter(|(a, b)| a.to_bits() == b.to_bits())
                .count();
            let gm = g
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            println!(
                "  randn {key:<14} {dims:?} offset→{:>3}: GPU {ge}/{} bit-exact (max |Δ| {gm:e}), CPU port {ce}/{}",
                gpu.offset(),
                want.len(),
                want.len()
            );
            total += want.len();
            gpu_exact += ge;
            cpu_exact += ce;
            gpu_max = gpu_max.max(gm);
        }
    }
    row(
        rows,
        format!("randn {label}, GPU kernel (bit-exact)"),
        format!("{gpu_exact}/{total} (max |Δ| {gpu_max:e})"),
        Some(gpu_exact == total),
    );
    row(
        rows,
        format!("randn {label}, CPU port (bit-exact)"),
        format!("{cpu_exact}/{total}"),
        None,
    );
    Ok(())
}

fn randn_timing(
    cuda: &candle_core::CudaDevice,
    device: &Device,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    for dims in [[1usize, 32, 32, 32], [4, 32, 68, 120]] {
        let mut gpu = CudaTorchGenerator::new(1, cuda)?;
        gpu.randn_tensor(dims.as_slice())?; // compile + load + warm-up
        device.synchronize()?;
        let iters = 50;
        let t = Instant::now();
        for _ in 0..iters {
            gpu.randn_tensor(dims.as_slice())?;
        }
        device.synchronize()?;
        let gpu_us = t.elapsed().as_secs_f64() * 1e6 / f64::from(iters);
        let mut cpu = TorchCudaGenerator::new(1);
        let t = Instant::now();
        let x = cpu.randn_tensor(dims.as_slice(), device)?;
        device.synchronize()?;
        let cpu_us = t.elapsed().as_secs_f64() * 1e6;
        drop(x);
        row(
            rows,
            format!("randn {dims:?} time"),
            format!("GPU {gpu_us:.1} µs, CPU port + upload {cpu_us:.0} µs"),
            None,
        );
    }
    Ok(())
}

fn load(fixtures: &Path, device: &Device, dtype: DType) -> anyhow::Result<Pipelines> {
    let cfg = PipelinesConfig {
        base: Some(ModelSource::new(
            fixtures.join("tiny/sana").to_string_lossy(),
        )),
        sprint: Some(ModelSource::new(
            fixtures.join("tiny/sana_sprint").to_string_lossy(),
        )),
        device: device.clone(),
        dtype,
    };
    Ok(load_pipelines(&cfg)?)
}

fn request(
    meta: &serde_json::Value,
    case: &serde_json::Value,
    endpoint: PipelineKind,
) -> anyhow::Result<GenerateRequest> {
    let u = |k: &str| case[k].as_u64().with_context(|| format!("case.{k}"));
    Ok(GenerateRequest {
        endpoint,
        prompt: meta["prompt"].as_str().context("prompt")?.to_string(),
        negative_prompt: meta["negative_prompt"]
            .as_str()
            .context("negative_prompt")?
            .to_string(),
        width: u("width")? as u32,
        height: u("height")? as u32,
        num_inference_steps: u("num_inference_steps")? as u32,
        guidance_scale: case["guidance_scale"].as_f64().context("guidance_scale")?,
        seed: 0,
        num_images: u("num_images_per_prompt")? as u32,
    })
}

/// The e2e cases with injected reference noise; returns the worst PSNR per case.
/// Host-blocking CUDA driver calls so far, from `bench/sync_count.c` when it is `LD_PRELOAD`ed (None otherwise).
fn sync_count() -> Option<i64> {
    extern "C" {
        fn dlsym(
            handle: *mut std::ffi::c_void,
            symbol: *const std::ffi::c_char,
        ) -> *mut std::ffi::c_void;
    }
    // SAFETY: RTLD_DEFAULT (null on glibc) searches the global scope; the symbol, when found, is the shim's
    // `long fleet_sync_count(void)`.
    unsafe {
        let f = dlsym(std::ptr::null_mut(), c"fleet_sync_count".as_ptr());
        if f.is_null() {
            return None;
        }
        let f: extern "C" fn() -> std::ffi::c_long = std::mem::transmute(f);
        Some(f() as i64)
    }
}

/// Records the shim's count after each denoising step.
struct SyncCounter(Vec<i64>);

impl StepObserver for SyncCounter {
    fn on_step(&mut self, _step: u32, _total: u32) -> Result<(), sana_pipelines::PipelineError> {
        self.0.extend(sync_count());
        Ok(())
    }
}

fn e2e_cases(
    fixtures: &Path,
    pipes: &mut Pipelines,
    dtype: DType,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    let dir = fixtures.join("reference");
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("e2e.json"))?)?;
    let st: HashMap<String, Tensor> =
        candle_core::safetensors::load(dir.join("e2e.safetensors"), &Device::Cpu)?;
    for name in ["base_512", "base_300x200", "base_n2", "sprint_512"] {
        let case = &meta["cases"][name];
        let sprint = name.starts_with("sprint");
        let kind = if sprint {
            PipelineKind::Sprint
        } else {
            PipelineKind::Base
        };
        let req = request(&meta, case, kind)?;
        let opts = RunOptions {
            use_resolution_binning: case["use_resolution_binning"]
                .as_bool()
                .context("binning")?,
            ..RunOptions::default()
        };
        let init = st
            .get(&format!("{name}_latents_init"))
            .context("latents_init")?
            .clone();
        let mut draws = vec![init];
        if sprint {
            let noises = st.get(&format!("{name}_noises")).context("noises")?;
            for i in 0..noises.dim(0)? {
                draws.push(noises.get(i)?);
            }
        }
        let mut noise = InjectedNoise::new(draws);
        let mut syncs = SyncCounter(Vec::new());
        let t = Instant::now();
        let images = if sprint {
            pipes
                .sprint()
                .context("sprint")?
                .generate_with_noise(&req, &mut noise, opts, &mut syncs)?
        } else {
            pipes
                .base()
                .context("base")?
                .generate_with_noise(&req, &mut noise, opts, &mut syncs)?
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
        if syncs.0.len() >= 2 {
            // Between the first and the last step's callback: whole steps only (prepare and decode excluded).
            let per_step: Vec<i64> = syncs.0.windows(2).map(|w| w[1] - w[0]).collect();
            let worst = per_step.iter().copied().max().unwrap_or(0);
            row(
                rows,
                format!(
                    "host syncs per denoising step, {name} {dtype:?} (LD_PRELOAD sync_count.c)"
                ),
                format!(
                    "{worst} at most over {} steps (blocking driver calls: {per_step:?})",
                    per_step.len()
                ),
                Some(worst == 0),
            );
        }
        let pngs = case["pngs"].as_array().context("pngs")?;
        if images.len() != pngs.len() {
            bail!(
                "{name}: {} images, {} reference PNGs",
                images.len(),
                pngs.len()
            );
        }
        let mut worst = f64::INFINITY;
        for (img, png) in images.iter().zip(pngs) {
            let want = image::open(dir.join(png.as_str().context("png")?))?.to_rgb8();
            if img.dimensions() != want.dimensions() {
                bail!(
                    "{name}: size {:?} vs {:?}",
                    img.dimensions(),
                    want.dimensions()
                );
            }
            worst = worst.min(psnr(img, &want));
        }
        let pass = (dtype == DType::F32).then_some(worst >= MIN_PSNR_F32_DB);
        row(
            rows,
            format!("e2e {name} {dtype:?} PSNR vs diffusers"),
            format!(
                "{worst:.2} dB ({ms:.0} ms, noise left {})",
                noise.remaining()
            ),
            pass.map(|p| p && noise.remaining() == 0),
        );
    }
    Ok(())
}

/// Seeded runs through `ImagePipeline::generate` (GPU generator) vs the CPU port's noise.
fn seeded(pipes: &mut Pipelines, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    for kind in PipelineKind::ALL {
        let req = GenerateRequest {
            endpoint: kind,
            prompt: "a lighthouse at dusk".into(),
            negative_prompt: String::new(),
            width: 200,
            height: 136,
            num_inference_steps: kind.default_steps().min(4),
            guidance_scale: 5.0,
            seed: 7,
            num_images: 2,
        };
        let p = pipes.get_mut(kind).context("pipeline loaded")?;
        let a = p.generate(&req, &mut NoProgress)?;
        let b = p.generate(&req, &mut NoProgress)?;
        let mut cpu: Box<dyn NoiseSource> = Box::new(TorchCudaGenerator::new(req.seed));
        let c = match kind {
            PipelineKind::Base => pipes.base().context("base")?.generate_with_noise(
                &req,
                cpu.as_mut(),
                RunOptions::default(),
                &mut NoProgress,
            )?,
            PipelineKind::Sprint => pipes.sprint().context("sprint")?.generate_with_noise(
                &req,
                cpu.as_mut(),
                RunOptions::default(),
                &mut NoProgress,
            )?,
        };
        let worst = a
            .iter()
            .zip(&c)
            .map(|(x, y)| psnr(x, y))
            .fold(f64::INFINITY, f64::min);
        let repeat = a == b;
        let differ = a.len() == 2 && a[0] != a[1];
        row(
            rows,
            format!("seeded {kind} f32: GPU noise vs CPU-port noise"),
            format!("PSNR {worst:.2} dB, repeatable {repeat}, 2 images differ {differ}"),
            Some(repeat && differ),
        );
    }
    Ok(())
}

/// ‖a − b‖ / ‖b‖ in f64 on the host.
fn rel_l2(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let b: Vec<f64> = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    anyhow::ensure!(a.len() == b.len(), "length {} vs {}", a.len(), b.len());
    let (mut num, mut den) = (0.0, 0.0);
    for (x, y) in a.iter().zip(&b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    let r = (num / den.max(1e-300)).sqrt();
    anyhow::ensure!(r.is_finite(), "non-finite output");
    Ok(r)
}

/// Runs `f` once on the fused kernels and once on the portable bodies (same device, same inputs).
fn fused_vs_portable(
    f: &dyn Fn() -> candle_core::Result<Tensor>,
) -> anyhow::Result<(Tensor, Tensor)> {
    ops::force_portable(false);
    let fused = f()?;
    ops::force_portable(true);
    let portable = f();
    ops::force_portable(false);
    Ok((fused, portable?))
}

/// Each fused op against the portable path at the real model shapes (Sana 1600M block, DC-AE f32c32).
/// Bounds: bf16 1e-2 (the portable path rounds to bf16 after every op, the kernels once, in f32 inside);
/// f32 1e-5 (summation order).
fn fused_op_cases(device: &Device, dtype: DType, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    let bound = if dtype == DType::BF16 { 1e-2 } else { 1e-5 };
    let rnd = |shape: &[usize], std: f64| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, std as f32, shape, device)?.to_dtype(dtype)
    };
    let mut check =
        |name: &str, f: &dyn Fn() -> candle_core::Result<Tensor>| -> anyhow::Result<()> {
            let (a, b) = fused_vs_portable(f)?;
            anyhow::ensure!(
                a.dims() == b.dims(),
                "{name}: {:?} vs {:?}",
                a.dims(),
                b.dims()
            );
            let r = rel_l2(&a, &b)?;
            row(
                rows,
                format!("fused {name} {dtype:?} vs portable"),
                format!("rel L2 {r:.2e} (bound {bound:.0e})"),
                Some(r <= bound),
            );
            Ok(())
        };
    // Transformer GLUMBConv middle, (2, 32, 32, 2·5600).
    let x = rnd(&[2, 32, 32, 11200], 1.0)?;
    let ib = rnd(&[11200], 1.0)?;
    let dw = ops::DepthwiseWeight::new(rnd(&[11200, 1, 3, 3], 0.3)?);
    let db = rnd(&[11200], 1.0)?;
    check("glu_depthwise (2,32,32,11200)", &|| {
        ops::glu_depthwise(&x, &ib, &dw, &db)
    })?;
    // DC-AE multiscale 5×5 on (1, 128, 128, 3·512).
    let x5 = rnd(&[1, 128, 128, 1536], 1.0)?;
    let dw5 = ops::DepthwiseWeight::new(rnd(&[1536, 1, 5, 5], 0.2)?);
    check("depthwise 5x5 (1,128,128,1536)", &|| {
        ops::depthwise_conv(&x5, &dw5, None)
    })?;
    // Linear attention: transformer (2, 1024, 70, 32); DC-AE interleaved q|k|v (1, 16384, 32, 3·32).
    let (q, k, v) = (
        rnd(&[2, 1024, 70, 32], 1.0)?,
        rnd(&[2, 1024, 70, 32], 1.0)?,
        rnd(&[2, 1024, 70, 32], 1.0)?,
    );
    check("linear attention (2,1024,70,32)", &|| {
        ops::relu_linear_attention_tokens(&q, &k, &v, 1e-15)
    })?;
    let all = rnd(&[1, 16384, 32, 96], 1.0)?;
    check("linear attention q|k|v views (1,16384,32,3·32)", &|| {
        ops::relu_linear_attention_tokens(
            &all.narrow(3, 0, 32)?,
            &all.narrow(3, 32, 32)?,
            &all.narrow(3, 64, 32)?,
            1e-15,
        )
    })?;
    // DC-AE multiscale: the q|k|v scale and its 5×5 aggregate (1, 16384, 16·3·32 each), 32 groups.
    let (s0, s1) = (rnd(&[1, 16384, 1536], 1.0)?, rnd(&[1, 16384, 1536], 1.0)?);
    check("linear attention of 2 scales (1,16384,2·1536)", &|| {
        ops::relu_linear_attention_scales(&[s0.clone(), s1.clone()], 32, 1e-15)
    })?;
    // Sana-Sprint's q and k norms on the fused q|k|v projection (2, 1024, 3·2240), v copied.
    let qkv = rnd(&[2, 1024, 3 * 2240], 1.0)?;
    let (wq, wk) = (rnd(&[2240], 1.0)?, rnd(&[2240], 1.0)?);
    check("rms_norm_segments q|k|v (2,1024,3·2240)", &|| {
        ops::rms_norm_segments(&qkv, &[Some(&wq), Some(&wk), None], 1e-5)
    })?;
    // AdaLN: LayerNorm + modulate, gated residual on (2, 1024, 2240).
    let h = (rnd(&[2, 1024, 2240], 3.0)? + 0.5)?;
    let y = rnd(&[2, 1024, 2240], 1.0)?;
    let table = rnd(&[6, 2240], 0.2)?;
    let temb = rnd(&[2, 6 * 2240], 0.2)?;
    check("layer_norm_modulate (2,1024,2240)", &|| {
        ops::layer_norm_modulate(&h, &table, &temb, 0, 1, 1e-6)
    })?;
    check("gated_residual (2,1024,2240)", &|| {
        ops::gated_residual(&h, &y, &table, &temb, 2)
    })?;
    // DC-AE ResBlock norm + residual, channels-last (1, 1024, 1024, 128); norm_out + SiLU or ReLU; 1024 channels.
    let hn = rnd(&[1, 1024, 1024, 128], 1.0)?;
    let res = rnd(&[1, 1024, 1024, 128], 1.0)?;
    let w = rnd(&[128], 1.0)?;
    let b = rnd(&[128], 1.0)?;
    check("rms_norm_rows + residual (1,1024,1024,128)", &|| {
        ops::rms_norm_rows(&hn, &w, &b, Some(&res), 1e-5, ops::RowAct::Identity)
    })?;
    check("rms_norm_rows + silu (1,1024,1024,128)", &|| {
        ops::rms_norm_rows(&hn, &w, &b, None, 1e-5, ops::RowAct::Silu)
    })?;
    check("rms_norm_rows + relu (1,1024,1024,128)", &|| {
        ops::rms_norm_rows(&hn, &w, &b, None, 1e-5, ops::RowAct::Relu)
    })?;
    let hw = rnd(&[1, 32, 32, 1024], 1.0)?;
    let (w1, b1) = (rnd(&[1024], 1.0)?, rnd(&[1024], 1.0)?);
    check("rms_norm_rows + residual (1,32,32,1024)", &|| {
        ops::rms_norm_rows(&hw, &w1, &b1, Some(&hw), 1e-5, ops::RowAct::Identity)
    })?;
    // Up-block: nearest ×2 and the shortcut add, channels-last (1, 256, 256, 512) -> 256 channels.
    let xu = rnd(&[1, 256, 256, 512], 1.0)?;
    let mu = rnd(&[1, 512, 512, 256], 1.0)?;
    check("upsample_nearest2x_nhwc (1,256,256,512)", &|| {
        ops::upsample_nearest2x_nhwc(&xu)
    })?;
    check("up_shortcut_add nhwc (1,256,256,512)->256", &|| {
        ops::up_shortcut_add(&mu, &xu, 2)
    })?;
    // DC-AE dense 3×3 conv + bias + SiLU through cuDNN, channels-last (1, 256, 256, 256) -> 256.
    let xc = rnd(&[1, 256, 256, 256], 1.0)?;
    let conv = ops::Conv2dLayer::new(rnd(&[256, 256, 3, 3], 0.02)?, Some(rnd(&[256], 1.0)?), 1);
    check("conv3x3+bias+silu cuDNN NHWC (1,256,256,256)", &|| {
        conv.forward_act(&xc, true)
    })?;
    // Linear bias + residual (2, 1024, 2240).
    let lin = candle_nn::Linear::new(rnd(&[2240, 2240], 0.02)?, Some(rnd(&[2240], 1.0)?));
    check("linear bias+residual (2,1024,2240)", &|| {
        ops::linear(&lin, &y, Some(&h))
    })?;
    // Cross-attention over 300 text tokens, the last 180 of batch 1 masked (the flash kernel): Sana's
    // 20 heads × 112, and 70 × 32.
    if dtype == DType::BF16 {
        let xq = rnd(&[2, 1024, 2240], 1.0)?;
        let keep: Vec<f32> = (0..600)
            .map(|i| if i >= 300 + 120 { -10000.0 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(keep, (2, 1, 1, 300), device)?;
        for (heads, d) in [(20usize, 112usize), (70, 32)] {
            let (xk, xv) = (
                rnd(&[2, heads, 300, d], 1.0)?,
                rnd(&[2, heads, 300, d], 1.0)?,
            );
            check(
                &format!("cross_attention (2,1024,{heads}·{d}) T=300 masked"),
                &|| ops::cross_attention(&xq, &xk, &xv, &mask, (d as f64).powf(-0.5)),
            )?;
        }
    }
    // Fused q|k|v projection with bias, (2, 1024, 2240) -> 3·2240 (cuBLASLt bias epilogue).
    let qkv = candle_nn::Linear::new(rnd(&[6720, 2240], 0.02)?, Some(rnd(&[6720], 1.0)?));
    check("linear bias (2,1024,2240)->6720", &|| {
        ops::linear(&qkv, &y, None)
    })?;
    // Decoder output to 8-bit RGB on the device: 1344×768 resized/cropped to 3840×2160, and unresized.
    let img = rnd(&[1, 3, 768, 1344], 0.6)?;
    for (oh, ow) in [(2160usize, 3840usize), (768, 1344)] {
        ops::force_portable(false);
        let fused = sana_pipelines::image_ops::resize_crop_to_rgb(&img, oh, ow)?;
        ops::force_portable(true);
        let portable = sana_pipelines::image_ops::resize_crop_to_rgb(&img, oh, ow);
        ops::force_portable(false);
        let (a, b) = (fused[0].as_raw(), portable?[0].as_raw().clone());
        anyhow::ensure!(
            a.len() == b.len(),
            "rgb_u8 {ow}x{oh}: {} vs {} bytes",
            a.len(),
            b.len()
        );
        let max = a
            .iter()
            .zip(&b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0);
        let off = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        row(
            rows,
            format!("fused rgb_u8 768x1344 -> {ow}x{oh} {dtype:?} vs portable"),
            format!(
                "max |Δ| {max} LSB, {off} of {} bytes differ (bound 1 LSB)",
                a.len()
            ),
            Some(max <= 1),
        );
    }
    Ok(())
}

/// One real-size transformer forward (B=2, 1024², bf16), one Sana-Sprint forward (B=2, its q/k norms) when
/// `sprint_dir` is given, and one DC-AE decode 1024², fused against portable on the same random weights
/// (`make_real_random_checkpoints.py` output). bf16 through 20 blocks / the whole decoder: bound 3e-2
/// (reported alongside).
fn real_size_fused_vs_portable(
    base_dir: &Path,
    sprint_dir: Option<&Path>,
    device: &Device,
    rows: &mut Vec<Row>,
) -> anyhow::Result<()> {
    use sana_pipelines::dcae::{DcAeConfig, DcAeDecoder};
    use sana_pipelines::loader::{self, ModelRepo, ModelSource};
    use sana_pipelines::transformer::SanaTransformer2DModel;
    let x = Tensor::randn(0f32, 1f32, (2, 32, 32, 32), device)?.to_dtype(DType::BF16)?;
    let emb = Tensor::randn(0f32, 1f32, (2, 300, 2304), device)?.to_dtype(DType::BF16)?;
    let mask_row: Vec<u32> = (0..300).map(|i| u32::from(i < 40)).collect();
    let mask = Tensor::from_vec(mask_row, (1, 300), device)?.repeat((2, 1))?;
    let ts = Tensor::new(&[999f32, 500f32], device)?;
    // A Sprint step's inputs: SCM timestep, guidance 4.5 per row.
    let (tau, guidance) = (
        Tensor::new(&[1.3f32], device)?,
        Tensor::new(&[4.5f32, 4.5], device)?,
    );
    let forwards = [
        Some((base_dir, "transformer", &ts, None)),
        sprint_dir.map(|dir| (dir, "Sprint transformer", &tau, Some(&guidance))),
    ];
    for (dir, name, t, g) in forwards.into_iter().flatten() {
        let tr = SanaTransformer2DModel::load_component(
            &ModelRepo::open(&ModelSource::new(dir.display().to_string()))?
                .component_for("transformer", DType::BF16)?,
            DType::BF16,
            device,
        )?;
        let (a, b) = fused_vs_portable(&|| {
            let ctx = tr.prepare_text(&emb, &mask)?;
            tr.forward(&x, t, g, &ctx)
        })?;
        let r = rel_l2(&a, &b)?;
        row(
            rows,
            format!("real-size {name} fwd B=2 1024² bf16 fused vs portable"),
            format!("rel L2 {r:.2e} (bound 3e-2)"),
            Some(r <= 3e-2),
        );
    }
    let mut repo = ModelRepo::open(&ModelSource::new(base_dir.display().to_string()))?;
    let v_files = repo.component_for("vae", DType::BF16)?;
    let vae_cfg = DcAeConfig::from_json_file(&v_files.config)?;
    let vae = DcAeDecoder::load(
        loader::var_builder(&v_files.weights, DType::BF16, device)?,
        &vae_cfg,
    )?;
    let lat = Tensor::randn(0f32, 1f32, (1, 32, 32, 32), device)?.to_dtype(DType::BF16)?;
    let (a, b) = fused_vs_portable(&|| vae.decode(&lat))?;
    let r = rel_l2(&a, &b)?;
    row(
        rows,
        "real-size DC-AE decode 1024² bf16 fused vs portable",
        format!("rel L2 {r:.2e} (bound 3e-2)"),
        Some(r <= 3e-2),
    );
    drop(vae);
    // Gemma-2 (`kernels/gemma.cu`): two prompts, one padded, 26 layers. Both bf16 paths are measured
    // against the f32 model on the same weights (the fused kernels compute in f32 between bf16 roundings, the
    // portable path also rounds inside candle's bf16 GELU): the fused path must be no further from it than
    // the portable one (× 1.1). Every row's valid tokens.
    use sana_pipelines::gemma2::{Config as GemmaConfig, Gemma2Encoder};
    let te = repo.component_for("text_encoder", DType::BF16)?;
    let te_cfg: GemmaConfig = loader::read_json(&te.config)?;
    let ids = Tensor::rand(0f32, 256_000f32, (2, 300), device)?.to_dtype(DType::U32)?;
    let mask_rows: Vec<u32> = [300usize, 120]
        .iter()
        .flat_map(|&v| (0..300).map(move |i| u32::from(i < v)))
        .collect();
    let mask = Tensor::from_vec(mask_rows, (2, 300), device)?;
    let valid_err = |a: &Tensor, b: &Tensor| -> anyhow::Result<f64> {
        Ok(rel_l2(&a.narrow(1, 0, 120)?, &b.narrow(1, 0, 120)?)?
            .max(rel_l2(&a.narrow(0, 0, 1)?, &b.narrow(0, 0, 1)?)?))
    };
    // Prefix cache (text.rs): both rows start with the same 100 tokens.
    let p = 100;
    let shared = ids.narrow(0, 0, 1)?.narrow(1, 0, p)?;
    let ids_p = Tensor::cat(&[&shared.repeat((2, 1))?, &ids.narrow(1, p, 300 - p)?], 1)?;
    let (reference, reference_p) = {
        let g32 = Gemma2Encoder::load(
            loader::var_builder(&te.weights, DType::F32, device)?,
            &te_cfg,
        )?;
        (g32.forward(&ids, &mask)?, g32.forward(&ids_p, &mask)?)
    };
    let gemma = Gemma2Encoder::load(
        loader::var_builder(&te.weights, DType::BF16, device)?,
        &te_cfg,
    )?;
    let (a, b) = fused_vs_portable(&|| gemma.forward(&ids, &mask))?;
    let (fused, portable) = (
        valid_err(&a.to_dtype(DType::F32)?, &reference)?,
        valid_err(&b.to_dtype(DType::F32)?, &reference)?,
    );
    row(
        rows,
        "real-size Gemma-2 B=2 x 300 (one padded) bf16 vs f32 model",
        format!(
            "rel L2 fused {fused:.2e}, portable {portable:.2e} (fused ≤ 1.1 × portable); fused vs portable {:.2e}",
            valid_err(&a, &b)?
        ),
        Some(fused <= 1.1 * portable),
    );
    // The positions after a cached 100-token prefix (prefilled once, `Gemma2Encoder::forward_after`, what
    // the text encoder does with the instruction) against the f32 model's whole run: no further from it
    // than the bf16 whole run (× 1.1). Row 1's valid positions after the prefix are 100..120.
    let prefix_ids: Vec<u32> = shared.flatten_all()?.to_vec1()?;
    let cache = gemma.prefill(&prefix_ids)?;
    let after = gemma.forward_after(
        &cache,
        &ids_p.narrow(1, p, 300 - p)?,
        &mask.narrow(1, p, 300 - p)?,
    )?;
    let whole = gemma.forward(&ids_p, &mask)?.narrow(1, p, 300 - p)?;
    let reference_p = reference_p.narrow(1, p, 300 - p)?;
    let tail_err = |a: &Tensor| -> anyhow::Result<f64> {
        let a = a.to_dtype(DType::F32)?;
        Ok(
            rel_l2(&a.narrow(0, 0, 1)?, &reference_p.narrow(0, 0, 1)?)?.max(rel_l2(
                &a.narrow(0, 1, 1)?.narrow(1, 0, 120 - p)?,
                &reference_p.narrow(0, 1, 1)?.narrow(1, 0, 120 - p)?,
            )?),
        )
    };
    let (cached, whole_err) = (tail_err(&after)?, tail_err(&whole)?);
    row(
        rows,
        "real-size Gemma-2 after a cached 100-token prefix bf16 vs f32 model",
        format!("rel L2 cached {cached:.2e}, whole {whole_err:.2e} (cached ≤ 1.1 × whole)"),
        Some(cached <= 1.1 * whole_err),
    );
    // Trimmed padding (text.rs): row 1 (120 real tokens) run only to position 128, as the text encoder runs
    // a prompt to its last real token rounded up to 64, against the f32 model's whole run on its 120 real
    // positions: no further from it than the bf16 run over all 300 positions (× 1.1).
    let real = |t: &Tensor| -> anyhow::Result<Tensor> {
        Ok(t.narrow(0, 1, 1)?.narrow(1, 0, 120)?.to_dtype(DType::F32)?)
    };
    let trimmed = gemma.forward(
        &ids.narrow(0, 1, 1)?.narrow(1, 0, 128)?,
        &mask.narrow(0, 1, 1)?.narrow(1, 0, 128)?,
    )?;
    let want = real(&reference)?;
    let (trimmed_err, whole_err) = (rel_l2(&real(&trimmed)?, &want)?, rel_l2(&real(&a)?, &want)?);
    row(
        rows,
        "real-size Gemma-2 run to position 128 of 300 (120 real tokens) bf16 vs f32 model",
        format!(
            "rel L2 trimmed {trimmed_err:.2e}, all 300 {whole_err:.2e} (trimmed ≤ 1.1 × all 300)"
        ),
        Some(trimmed_err <= 1.1 * whole_err),
    );
    Ok(())
}

/// Largest |a - b| over all elements (f64), 0 exactly when the tensors are equal.
fn max_abs_diff(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    anyhow::ensure!(a.dims() == b.dims(), "{:?} vs {:?}", a.dims(), b.dims());
    let d = (a.to_dtype(DType::F64)? - b.to_dtype(DType::F64)?)?.abs()?;
    Ok(d.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// `f` on the whole batch against `f` on each batch row alone (its own contiguous copy, as a solo run
/// holds it): the largest difference over the rows. `f` maps a `(B, ..)` input to a `(B, ..)` output.
fn batch_vs_rows(
    x: &Tensor,
    f: &dyn Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> anyhow::Result<f64> {
    let whole = f(x)?;
    let mut worst = 0f64;
    for i in 0..x.dim(0)? {
        let alone = f(&x.narrow(0, i, 1)?.contiguous()?)?;
        worst = worst.max(max_abs_diff(&whole.narrow(0, i, 1)?, &alone)?);
    }
    Ok(worst)
}

/// Issue 14: a batch row computes exactly what it computes alone. With batch invariance on (the default,
/// `ops::set_batch_invariant`) every case must be bit-equal (difference 0); with it off the differences
/// are reported. Op level at the real shapes (cuBLASLt linears of the transformer and Gemma-2, the
/// timestep embedding's 2-D linear, the linear attention), then a real-size transformer forward of 4
/// rows against each row alone, tap by tap (the first tap that differs names the block), and the real-size
/// Gemma-2 encoder on 4 prompts' tokens against each alone. `real` is the base directory of
/// `make_real_random_checkpoints.py`.
fn batch_invariance_cases(real: &Path, device: &Device, rows: &mut Vec<Row>) -> anyhow::Result<()> {
    use sana_pipelines::gemma2::{Config as GemmaConfig, Gemma2Encoder};
    use sana_pipelines::loader::{self, ModelRepo};
    use sana_pipelines::transformer::SanaTransformer2DModel;
    let rnd = |shape: &[usize], std: f32| -> candle_core::Result<Tensor> {
        Tensor::randn(0f32, std, shape, device)?.to_dtype(DType::BF16)
    };
    let lin = |n: usize, k: usize, bias: bool| -> candle_core::Result<candle_nn::Linear> {
        let b = if bias { Some(rnd(&[n], 0.1)?) } else { None };
        Ok(candle_nn::Linear::new(rnd(&[n, k], 0.02)?, b))
    };
    let linears = [
        (
            "linear (4,1024,2240)->2240 +bias",
            vec![4, 1024, 2240],
            lin(2240, 2240, true)?,
        ),
        (
            "linear (4,1024,2240)->11200 +bias",
            vec![4, 1024, 2240],
            lin(11200, 2240, true)?,
        ),
        (
            "linear (4,1024,5600)->2240",
            vec![4, 1024, 5600],
            lin(2240, 5600, false)?,
        ),
        (
            "linear (4,300,2304)->9216",
            vec![4, 300, 2304],
            lin(9216, 2304, false)?,
        ),
        (
            "linear (4,300,9216)->2304",
            vec![4, 300, 9216],
            lin(2304, 9216, false)?,
        ),
        (
            "linear (8,2240)->13440 +bias",
            vec![8, 2240],
            lin(13440, 2240, true)?,
        ),
    ];
    let qkv = (
        rnd(&[4, 1024, 70, 32], 1.0)?,
        rnd(&[4, 1024, 70, 32], 1.0)?,
        rnd(&[4, 1024, 70, 32], 1.0)?,
    );
    let mut repo = ModelRepo::open(&ModelSource::new(real.display().to_string()))?;
    let tr = SanaTransformer2DModel::load_component(
        &repo.component_for("transformer", DType::BF16)?,
        DType::BF16,
        device,
    )?;
    let te = repo.component_for("text_encoder", DType::BF16)?;
    let te_cfg: GemmaConfig = loader::read_json(&te.config)?;
    let gemma = Gemma2Encoder::load(
        loader::var_builder(&te.weights, DType::BF16, device)?,
        &te_cfg,
    )?;
    let text =
        sana_pipelines::sana::load_text_encoder(&mut repo, DType::BF16, device, &mut Vec::new())?;
    let lat = rnd(&[4, 32, 32, 32], 1.0)?;
    let emb = rnd(&[4, 300, 2304], 1.0)?;
    let valid = [40usize, 300, 7, 120];
    let mask_rows: Vec<u32> = valid
        .iter()
        .flat_map(|&v| (0..300).map(move |i| u32::from(i < v)))
        .collect();
    let mask = Tensor::from_vec(mask_rows, (4, 300), device)?;
    let ts = Tensor::new(&[999f32, 500.0, 250.0, 10.0], device)?;
    let ids = Tensor::rand(0f32, 256_000f32, (4, 300), device)?.to_dtype(DType::U32)?;
    for invariant in [true, false] {
        ops::set_batch_invariant(invariant);
        let tag = if invariant { "on" } else { "off" };
        let mut check = |name: &str, worst: f64| {
            row(
                rows,
                format!("batch invariance {tag}: {name}"),
                format!("max |batch row - alone| {worst:.3e}"),
                invariant.then_some(worst == 0.0),
            )
        };
        for (name, shape, l) in &linears {
            let x = rnd(shape, 1.0)?;
            check(name, batch_vs_rows(&x, &|x| ops::linear(l, x, None))?);
        }
        let (q, k, v) = &qkv;
        let whole = ops::relu_linear_attention_tokens(q, k, v, 1e-15)?;
        let mut worst = 0f64;
        for i in 0..4 {
            let one = |t: &Tensor| t.narrow(0, i, 1)?.contiguous();
            let alone = ops::relu_linear_attention_tokens(&one(q)?, &one(k)?, &one(v)?, 1e-15)?;
            worst = worst.max(max_abs_diff(&whole.narrow(0, i, 1)?, &alone)?);
        }
        check("linear attention (4,1024,70,32)", worst);

        // Transformer forward, tap by tap.
        let mut taps: Vec<(String, Tensor)> = Vec::new();
        let ctx = tr.prepare_text(&emb, &mask)?;
        let out = tr.forward_tapped(&lat, &ts, None, &ctx, &mut |t, x| {
            taps.push((format!("{t:?}"), x.clone()))
        })?;
        let mut first = None;
        let mut worst_out = 0f64;
        for i in 0..4 {
            let one = |t: &Tensor| t.narrow(0, i, 1)?.contiguous();
            let ctx1 = tr.prepare_text(&one(&emb)?, &one(&mask)?)?;
            let mut solo: Vec<Tensor> = Vec::new();
            let out1 = tr.forward_tapped(&one(&lat)?, &one(&ts)?, None, &ctx1, &mut |_, x| {
                solo.push(x.clone())
            })?;
            worst_out = worst_out.max(max_abs_diff(&out.narrow(0, i, 1)?, &out1)?);
            for (j, ((name, b), s)) in taps.iter().zip(&solo).enumerate() {
                let d = max_abs_diff(&b.narrow(0, i, 1)?, s)?;
                if d > 0.0 && first.as_ref().is_none_or(|(fj, _, _)| j < *fj) {
                    first = Some((j, name.clone(), d));
                }
            }
        }
        let first = first.map_or("none".to_string(), |(_, n, d)| format!("{n} ({d:.2e})"));
        check(
            &format!("transformer fwd B=4 1024² (first differing tap: {first})"),
            worst_out,
        );
        // Gemma-2's linears take the fastest algorithm for their rows (`ops::linear_fastest`): the text
        // encoder keeps invariance by running each prompt alone, so the encoder itself is only reported.
        let whole = gemma.forward(&ids, &mask)?;
        let mut worst = 0f64;
        for i in 0..4 {
            let alone = gemma.forward(&ids.narrow(0, i, 1)?, &mask.narrow(0, i, 1)?)?;
            worst = worst.max(max_abs_diff(&whole.narrow(0, i, 1)?, &alone)?);
        }
        row(
            rows,
            format!(
                "batch invariance {tag}: Gemma-2 encoder B=4 x 300 tokens in one call (reported)"
            ),
            format!("max |batch row - alone| {worst:.3e}"),
            None,
        );
        // What the pipelines call: 4 prompts of different lengths in one text-encoder call against each alone.
        let prompts: Vec<String> = [
            "a cat",
            "a lighthouse on a cliff at dusk, waves crashing below, dramatic sky, 35mm photo",
            "",
            "an extremely long prompt about a city street at night with neon signs, wet asphalt \
             reflecting the lights, people with umbrellas, a tram passing by, steam rising from a manhole, \
             and a dog sitting under an awning watching the rain, cinematic lighting, 85mm lens",
        ]
        .map(String::from)
        .to_vec();
        let (together, _) = text.encode_prompts(&prompts, true)?;
        let mut worst = 0f64;
        for (i, p) in prompts.iter().enumerate() {
            let (alone, _) = text.encode_prompts(std::slice::from_ref(p), true)?;
            worst = worst.max(max_abs_diff(&together.narrow(0, i, 1)?, &alone)?);
        }
        row(
            rows,
            format!(
                "batch invariance {tag}: text encoder, 4 prompts of 2 to ~60 tokens in one call"
            ),
            format!("max |batch row - alone| {worst:.3e}"),
            invariant.then_some(worst == 0.0),
        );
        // The empty negative prompt is served from a cache made at load: it must be what a call computes.
        let empty = [String::new()];
        let (cached, _) = text.encode_prompts(&empty, false)?;
        let (computed, _) = text.encode_computed(&empty, false, None, true)?;
        let diff = max_abs_diff(&cached, &computed)?;
        row(
            rows,
            format!(
                "batch invariance {tag}: text encoder, cached empty negative prompt vs computed"
            ),
            format!("max |cached - computed| {diff:.3e}"),
            Some(diff == 0.0),
        );
    }
    ops::set_batch_invariant(true);
    row(
        rows,
        "cuBLASLt plans without the one-row algorithm",
        format!("{}", sana_pipelines::kernels::lt_unpinned_plans()),
        Some(sana_pipelines::kernels::lt_unpinned_plans() == 0),
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let root = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    let fixtures = root.join("tests/fixtures");
    let device = Device::new_cuda(0).context("CUDA device 0")?;
    let Device::Cuda(cuda) = &device else {
        bail!("Device::new_cuda returned a non-CUDA device");
    };
    let name = cuda.cuda_stream().context().name()?;
    let shape = DeviceShape::query(cuda)?;
    println!(
        "device: {name}, {} SMs × {} threads, compute {}.{}",
        shape.sm_count,
        shape.max_threads_per_sm,
        shape.compute_capability.0,
        shape.compute_capability.1
    );
    let mut rows = Vec::new();
    let mut errors = Vec::new();
    let fixture_randn = fixtures.join("torch_cuda_randn");
    if let Err(e) = randn_cases(&fixture_randn, "fixtures", cuda, &mut rows) {
        errors.push(format!("randn fixtures: {e:#}"));
    }
    if let Some(extra) = std::env::args().nth(2).map(PathBuf::from) {
        if let Err(e) = randn_cases(&extra, "live torch", cuda, &mut rows) {
            errors.push(format!("randn live: {e:#}"));
        }
    }
    if let Err(e) = randn_timing(cuda, &device, &mut rows) {
        errors.push(format!("randn timing: {e:#}"));
    }
    for dtype in [DType::BF16, DType::F32] {
        if let Err(e) = fused_op_cases(&device, dtype, &mut rows) {
            errors.push(format!("fused ops {dtype:?}: {e:#}"));
        }
    }
    if let Some(real) = std::env::args().nth(3).map(PathBuf::from) {
        let sprint = std::env::args().nth(4).map(PathBuf::from);
        if let Err(e) = real_size_fused_vs_portable(&real, sprint.as_deref(), &device, &mut rows) {
            errors.push(format!("real-size fused vs portable: {e:#}"));
        }
    }
    if let Some(real) = std::env::args().nth(3).map(PathBuf::from) {
        if let Err(e) = batch_invariance_cases(&real, &device, &mut rows) {
            errors.push(format!("batch invariance: {e:#}"));
        }
    }
    for dtype in [DType::F32, DType::BF16] {
        let t = Instant::now();
        match load(&fixtures, &device, dtype) {
            Ok(mut pipes) => {
                println!(
                    "loaded tiny pipelines {dtype:?} in {:.2}s",
                    t.elapsed().as_secs_f64()
                );
                if let Err(e) = e2e_cases(&fixtures, &mut pipes, dtype, &mut rows) {
                    errors.push(format!("e2e {dtype:?}: {e:#}"));
                }
                if dtype == DType::F32 {
                    if let Err(e) = seeded(&mut pipes, &mut rows) {
                        errors.push(format!("seeded: {e:#}"));
                    }
                }
            }
            Err(e) => errors.push(format!("load {dtype:?}: {e:#}")),
        }
    }

    println!("\n## gpu-check on {name}\n");
    println!("| check | result | pass |\n|---|---|---|");
    for r in &rows {
        let p = match r.pass {
            Some(true) => "yes",
            Some(false) => "**NO**",
            None => "(reported)",
        };
        println!("| {} | {} | {p} |", r.check, r.result);
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    if !errors.is_empty() || rows.iter().any(|r| r.pass == Some(false)) {
        std::process::exit(1);
    }
    Ok(())
}
