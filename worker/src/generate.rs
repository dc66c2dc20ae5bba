//! `worker generate`: one text-to-image run from the command line, without broker or storage.
//!
//! The flags are turned into the service's JSON input and checked by `fleet::job::validate`, so defaults
//! and limits are exactly the service's (steps per endpoint, sizes, presets, num_images ≤ 4, …). The
//! pipeline is loaded from a Hub repo id or a local diffusers directory and run with the request's seed
//! (torch-CUDA-compatible noise), or with recorded latents (`--latents`, for parity checks against
//! diffusers). Images are written as `<out>/0.png`, `<out>/1.png`, … (or `.jpeg`, quality 95).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use fleet::job::{self, EndpointKind, OutputFormat};
use fleet_worker::generate_request;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::sana::{
    load_pipelines, seeded_noise, InjectedNoise, NoiseSource, PipelinesConfig, RunOptions,
};
use sana_pipelines::{PipelineError, StepObserver};
use serde_json::{json, Map, Value};

/// Generate images with one pipeline and write them to a directory.
#[derive(Debug, Clone, clap::Args)]
pub struct GenerateArgs {
    /// Hugging Face repo id or local directory in the diffusers layout.
    #[arg(long, env = "FLEET_GENERATE_MODEL")]
    pub model: String,
    /// Hub revision (branch, tag or commit) to pin; ignored for local directories.
    #[arg(long, env = "FLEET_GENERATE_REVISION")]
    pub revision: Option<String>,
    /// Which pipeline the model is: `base` (Sana, CFG + DPM-Solver) or `sprint` (Sana-Sprint, SCM).
    #[arg(long, env = "FLEET_GENERATE_ENDPOINT", default_value = "base")]
    pub endpoint: EndpointKind,
    /// The prompt.
    #[arg(long, env = "FLEET_GENERATE_PROMPT")]
    pub prompt: String,
    /// Negative prompt (base only; default empty).
    #[arg(long, env = "FLEET_GENERATE_NEGATIVE_PROMPT")]
    pub negative_prompt: Option<String>,
    /// `WIDTHxHEIGHT` (e.g. `1024x768`) or a preset name (`square_hd`, `landscape_16_9`, …); default 3840x2160.
    #[arg(long, env = "FLEET_GENERATE_SIZE")]
    pub size: Option<String>,
    /// Denoising steps (default 18 for base, 2 for sprint).
    #[arg(long, env = "FLEET_GENERATE_STEPS")]
    pub steps: Option<u32>,
    /// Guidance scale (default 5.0).
    #[arg(long, env = "FLEET_GENERATE_GUIDANCE_SCALE")]
    pub guidance_scale: Option<f64>,
    /// Seed of the torch-CUDA-compatible noise.
    #[arg(long, env = "FLEET_GENERATE_SEED")]
    pub seed: u64,
    /// Images per prompt (1–4).
    #[arg(long, env = "FLEET_GENERATE_NUM_IMAGES")]
    pub num_images: Option<u32>,
    /// Output format: `png` or `jpeg` (quality 95). Default jpeg, like the service.
    #[arg(long, env = "FLEET_GENERATE_FORMAT")]
    pub format: Option<String>,
    /// Output directory (created if missing).
    #[arg(long, env = "FLEET_GENERATE_OUT")]
    pub out: PathBuf,
    /// `auto` (first CUDA GPU if built with `cuda`, else CPU), `cpu`, `cuda` or `cuda:N`.
    #[arg(long, env = "FLEET_GENERATE_DEVICE", default_value = "auto")]
    pub device: String,
    /// `bf16` or `f32`; default bf16 on a GPU, f32 on the CPU.
    #[arg(long, env = "FLEET_GENERATE_DTYPE")]
    pub dtype: Option<String>,
    /// Safetensors with recorded draws instead of the seeded ones: `latents` `(n, C, h, w)` and, for
    /// sprint, `noises` `(steps, n, C, h, w)`.
    #[arg(long, env = "FLEET_GENERATE_LATENTS")]
    pub latents: Option<PathBuf>,
    /// Generate at the requested size instead of the nearest aspect-ratio bin (must be a multiple of 32).
    #[arg(long, env = "FLEET_GENERATE_NO_BINNING")]
    pub no_resolution_binning: bool,
}

/// Prints `step/total` to stderr.
struct PrintProgress;

impl StepObserver for PrintProgress {
    fn on_step(&mut self, step: u32, total: u32) -> Result<(), PipelineError> {
        eprintln!("step {step}/{total}");
        Ok(())
    }
}

/// The service's JSON input for these flags.
fn raw_input(args: &GenerateArgs) -> anyhow::Result<Value> {
    let mut o = Map::new();
    o.insert("prompt".into(), json!(args.prompt));
    o.insert("seed".into(), json!(args.seed));
    if let Some(n) = &args.negative_prompt {
        o.insert("negative_prompt".into(), json!(n));
    }
    if let Some(size) = &args.size {
        let v = match size.split_once(['x', 'X']) {
            Some((w, h)) => {
                let w: u64 = w
                    .trim()
                    .parse()
                    .with_context(|| format!("--size {size}: bad width"))?;
                let h: u64 = h
                    .trim()
                    .parse()
                    .with_context(|| format!("--size {size}: bad height"))?;
                json!({ "width": w, "height": h })
            }
            None => json!(size),
        };
        o.insert("image_size".into(), v);
    }
    if let Some(s) = args.steps {
        o.insert("num_inference_steps".into(), json!(s));
    }
    if let Some(g) = args.guidance_scale {
        o.insert("guidance_scale".into(), json!(g));
    }
    if let Some(n) = args.num_images {
        o.insert("num_images".into(), json!(n));
    }
    if let Some(f) = &args.format {
        o.insert("output_format".into(), json!(f));
    }
    Ok(Value::Object(o))
}

fn device(spec: &str) -> anyhow::Result<Device> {
    Ok(match spec {
        "auto" => Device::cuda_if_available(0)?,
        "cpu" => Device::Cpu,
        "cuda" => Device::new_cuda(0)?,
        other => match other.strip_prefix("cuda:") {
            Some(n) => Device::new_cuda(n.parse().with_context(|| format!("--device {other}"))?)?,
            None => bail!("--device must be auto, cpu, cuda or cuda:N (got {other})"),
        },
    })
}

fn dtype(spec: Option<&str>, device: &Device) -> anyhow::Result<DType> {
    Ok(match spec {
        None if device.is_cpu() => DType::F32,
        None | Some("bf16") => DType::BF16,
        Some("f32") => DType::F32,
        Some(other) => bail!("--dtype must be bf16 or f32 (got {other})"),
    })
}

fn injected(path: &PathBuf, device: &Device) -> anyhow::Result<InjectedNoise> {
    let mut st = candle_core::safetensors::load(path, device)
        .with_context(|| format!("reading {}", path.display()))?;
    let latents = st
        .remove("latents")
        .with_context(|| format!("{}: no `latents` tensor", path.display()))?;
    let mut draws = vec![latents];
    if let Some(noises) = st.remove("noises") {
        for i in 0..noises.dim(0)? {
            draws.push(noises.get(i)?);
        }
    }
    Ok(InjectedNoise::new(draws))
}

fn write_image(img: &image::RgbImage, path: &PathBuf, format: OutputFormat) -> anyhow::Result<()> {
    match format {
        OutputFormat::Png => img.save_with_format(path, image::ImageFormat::Png)?,
        OutputFormat::Jpeg => {
            let file = std::fs::File::create(path)?;
            let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(
                std::io::BufWriter::new(file),
                95,
            );
            enc.encode_image(img)?;
        }
    }
    Ok(())
}

/// Runs the `generate` subcommand.
pub fn run(args: GenerateArgs) -> anyhow::Result<()> {
    let input = job::validate(args.endpoint, &raw_input(&args)?, || args.seed)
        .map_err(|e| anyhow::anyhow!("invalid input: {e}"))?;
    let device = device(&args.device)?;
    let dtype = dtype(args.dtype.as_deref(), &device)?;
    let source = ModelSource {
        id: args.model.clone(),
        revision: args.revision.clone(),
    };
    let (base, sprint) = match args.endpoint {
        EndpointKind::Base => (Some(source), None),
        EndpointKind::Sprint => (None, Some(source)),
    };
    let t_load = Instant::now();
    let mut pipelines = load_pipelines(&PipelinesConfig {
        base,
        sprint,
        device: device.clone(),
        dtype,
    })
    .with_context(|| format!("loading {}", args.model))?;
    eprintln!(
        "loaded {} in {:.1}s ({dtype:?} on {device:?})",
        args.model,
        t_load.elapsed().as_secs_f64()
    );

    let req = generate_request(args.endpoint, &input);
    let opts = RunOptions {
        use_resolution_binning: !args.no_resolution_binning,
        ..RunOptions::default()
    };
    let mut noise: Box<dyn NoiseSource> = match &args.latents {
        Some(p) => Box::new(injected(p, &device)?),
        None => seeded_noise(req.seed, &device)?,
    };
    let t_run = Instant::now();
    let images = match args.endpoint {
        EndpointKind::Base => pipelines
            .base()
            .context("base pipeline not loaded")?
            .generate_with_noise(&req, noise.as_mut(), opts, &mut PrintProgress),
        EndpointKind::Sprint => pipelines
            .sprint()
            .context("sprint pipeline not loaded")?
            .generate_with_noise(&req, noise.as_mut(), opts, &mut PrintProgress),
    }
    .context("generation failed")?;
    let elapsed = t_run.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    let mut paths = Vec::with_capacity(images.len());
    for (i, img) in images.iter().enumerate() {
        let path = args
            .out
            .join(format!("{i}.{}", input.output_format.extension()));
        write_image(img, &path, input.output_format)
            .with_context(|| format!("writing {}", path.display()))?;
        paths.push(path.display().to_string());
    }
    println!(
        "{}",
        json!({
            "endpoint": args.endpoint.as_str(),
            "seed": input.seed,
            "width": req.width,
            "height": req.height,
            "num_inference_steps": req.num_inference_steps,
            "generate_seconds": elapsed,
            "images": paths,
            "peak_rss_bytes": peak_rss_bytes(),
        })
    );
    Ok(())
}

/// The process's peak resident set (`VmHWM` of `/proc/self/status`); `None` where there is no procfs.
fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
