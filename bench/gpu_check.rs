//! `gpu-check`: correctness checks of the CUDA build on a real GPU, in one run, ending with a short table.
//!
//! 1. Every case of `tests/fixtures/torch_cuda_randn/` (torch 2.11 CUDA `randn` draws recorded on an H200)
//!    drawn again on this GPU by [`sana_pipelines::rng_cuda`]: count of bit-identical values (target: all),
//!    next to the CPU port's count ([`sana_pipelines::rng`]).
//! 2. Both tiny pipelines (`tests/fixtures/tiny/sana`, `tiny/sana_sprint`) on CUDA with the reference run's
//!    latents (and Sprint step noises) injected, as `tests/pipeline_e2e.rs` does on the CPU: PSNR against
//!    the diffusers PNGs, in f32 (must reach [`MIN_PSNR_F32_DB`]) and in bf16 (reported only).
//! 3. Seeded generation on CUDA (the GPU generator through `ImagePipeline::generate`): repeatable, and the
//!    same images as with the CPU port's noise up to its last-ulp differences (PSNR reported).
//!
//! Usage: `gpu-check [REPO_ROOT [EXTRA_RANDN_DIR]]` (default `.`; the extra directory holds draws in the
//! fixtures' format made live on this card by `bench/torch_randn_extra.py`). Exit status 1 when a required
//! check fails.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sana_pipelines::image_ops::psnr;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::rng::TorchCudaGenerator;
use sana_pipelines::rng_cuda::{CudaTorchGenerator, DeviceShape};
use sana_pipelines::sana::{
    load_pipelines, InjectedNoise, NoiseSource, Pipelines, PipelinesConfig, RunOptions,
};
use sana_pipelines::{GenerateRequest, NoProgress, PipelineKind};

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
        let t = Instant::now();
        let images = if sprint {
            pipes.sprint().context("sprint")?.generate_with_noise(
                &req,
                &mut noise,
                opts,
                &mut NoProgress,
            )?
        } else {
            pipes.base().context("base")?.generate_with_noise(
                &req,
                &mut noise,
                opts,
                &mut NoProgress,
            )?
        };
        let ms = t.elapsed().as_secs_f64() * 1e3;
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
