//! `sana-bench`: speed of our Sana / Sana-Sprint pipelines at the real model sizes on a CUDA card, next to
//! the diffusers numbers of the same run (`diffusers_reference_bench.py` writes them as JSON).
//!
//! Both pipelines are loaded in bf16 through [`load_pipelines`] from two diffusers-layout directories
//! (random weights at the real configs, written by `bench/make_real_random_checkpoints.py`). Every case:
//! one untimed warm-up, one warm-up that also samples device memory, then the median of up to
//! `SANA_BENCH_RUNS` (default 5) runs, each between two `synchronize()` calls (only as many as fit in
//! `SANA_BENCH_CASE_BUDGET_S`, default 60 s, at the second warm-up's time, at least one; the table says how
//! many ran).
//!
//! What each of our cases includes:
//! - pipeline cases: `ImagePipeline::generate` (seeded GPU noise), i.e. tokenisation + Gemma-2 encoding
//!   (prompt with the complex human instruction, plus the negative prompt for base), denoising, VAE decode,
//!   resize/crop and conversion to 8-bit RGB on the host. Diffusers is given prompt embeddings, so the
//!   column "ours − text" subtracts the median of the matching text-encoding case, timed apart.
//! - `gemma2 encode pos(510)+neg(300)`: `Gemma2Encoder::forward` on random ids of 510 and 300 tokens, all
//!   attended (the diffusers case), no tokeniser.
//! - `dc-ae decode 1024x1024`: `latents / scaling_factor` + `DcAeDecoder::decode`, latents (1, 32, 32, 32);
//!   `dc-ae decode 4x 1024x1024 in one call`: the same with latents (4, 32, 32, 32).
//! - `base transformer fwd B=2 1024^2`: `prepare_text` (caption projection, cross K/V) + `forward`, the
//!   diffusers case's inputs (B=2, 300 text tokens of which 40 attended, timestep 999); `B=1` and `B=4`:
//!   the same with one row, and with 4 copies of it (a step of one and of 4 batched Sprint requests).
//! - `ours: text encode, tokenizer + 4 pos in one call`: the one Gemma-2 call of 4 batched requests.
//!
//! Memory: the lowest free device memory (`cuMemGetInfo`, polled every millisecond from another thread
//! during the second warm-up) against the total: device-wide usage, CUDA context and the stream-ordered
//! pool included. The diffusers column is `torch.cuda.max_memory_allocated` (live tensors only).
//!
//! Usage: `sana-bench BASE_DIR SPRINT_DIR [DIFFUSERS_JSON [DIFFUSERS_COMPILED_JSON]]`.
//!
//! Environment: `SANA_BENCH_ONLY="a|b"` runs only the cases whose name contains one of the parts;
//! `SANA_BENCH_JSON=path` writes the results as JSON (a list of cases with `case`, `ours_ms`,
//! `diffusers_ms`, `diffusers_compiled_ms`, `ratio`, `ratio_compiled`, `peak_gib`, `diffusers_peak_gib`);
//! `SANA_BENCH_ONLY=batch` runs only the cross-request batching cases (`sana_bench_batch.rs`: Sprint and
//! base 1024² bursts of 1, 2, 4, 8 requests, batched against one at a time; images/s, p50/p99 latency,
//! peak memory; its own JSON shape; `SANA_BENCH_BATCH_KINDS=sprint` or `base` for one pipeline only);
//! `SANA_BENCH_INVARIANT=off` runs every case with batch invariance off (`ops::set_batch_invariant`);
//! `SANA_BENCH_PROFILE=fwd|decode|gemma|sprint` loads only that component (gemma: one 510-token prompt; sprint:
//! the Sprint pipeline, one whole 1024² request), runs it twice, then once more between
//! `cuProfilerStart`/`cuProfilerStop` (for `ncu --profile-from-start off`) and exits.

mod sana_bench_batch;

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use sana_pipelines::dcae::{DcAeConfig, DcAeDecoder};
use sana_pipelines::loader::{self, ModelRepo, ModelSource};
use sana_pipelines::transformer::SanaTransformer2DModel;
use sana_pipelines::{load_pipelines, GenerateRequest, NoProgress, PipelineKind, PipelinesConfig};

/// Diffusers' medians and peaks by case name: `(ms, peak GiB)`.
type DiffusersRows = HashMap<String, (f64, f64)>;

/// A pipeline case: name, endpoint, width, height, images, text-encoding case to subtract.
type PipelineCase = (
    &'static str,
    PipelineKind,
    u32,
    u32,
    u32,
    Option<&'static str>,
);

const GIB: f64 = (1u64 << 30) as f64;
const PROMPT: &str =
    "a lighthouse on a cliff at dusk, waves crashing below, dramatic sky, 35mm photo";

/// One timed case.
struct Row {
    case: String,
    ms: f64,
    runs: usize,
    /// Device-wide peak usage in bytes during the second warm-up.
    peak: Option<usize>,
    /// Text-encoding case whose median is subtracted to compare with diffusers (pipeline cases only).
    text_case: Option<&'static str>,
}

/// Samples `cuMemGetInfo` every millisecond on its own thread; keeps the lowest free value.
struct MemPoller {
    stop: Arc<AtomicBool>,
    min_free: Arc<AtomicUsize>,
    handle: Option<std::thread::JoinHandle<()>>,
    total: usize,
}

impl MemPoller {
    fn start(cuda: &candle_core::CudaDevice) -> anyhow::Result<Self> {
        let ctx = cuda.cuda_stream().context().clone();
        let (free, total) = ctx.mem_get_info()?;
        let stop = Arc::new(AtomicBool::new(false));
        let min_free = Arc::new(AtomicUsize::new(free));
        let (s, m) = (Arc::clone(&stop), Arc::clone(&min_free));
        let handle = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                if let Ok((f, _)) = ctx.mem_get_info() {
                    m.fetch_min(f, Ordering::Relaxed);
                }
                // Polling interval of a sampler, not a synchronisation.
                std::thread::sleep(Duration::from_millis(1));
            }
        });
        Ok(MemPoller {
            stop,
            min_free,
            handle: Some(handle),
            total,
        })
    }

    /// Peak device usage (bytes) seen since `start`.
    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.total - self.min_free.load(Ordering::Relaxed)
    }
}

fn used_bytes(cuda: &candle_core::CudaDevice) -> anyhow::Result<usize> {
    let (free, total) = cuda.cuda_stream().context().mem_get_info()?;
    Ok(total - free)
}

struct Bench {
    device: Device,
    cuda: candle_core::CudaDevice,
    runs: usize,
    budget_s: f64,
    rows: Vec<Row>,
    errors: Vec<String>,
}

impl Bench {
    fn sync(&self) -> anyhow::Result<()> {
        Ok(self.device.synchronize()?)
    }

    /// Times `f` (warm-up 2, median of up to `self.runs`) and records the row; errors are recorded too.
    fn case(
        &mut self,
        name: &str,
        text_case: Option<&'static str>,
        mut f: impl FnMut() -> anyhow::Result<()>,
    ) {
        if let Ok(only) = std::env::var("SANA_BENCH_ONLY") {
            if !only.split('|').any(|k| !k.is_empty() && name.contains(k)) {
                return;
            }
        }
        match self.measure(&mut f) {
            Ok((ms, runs, peak)) => {
                println!(
                    "{name:<48} {ms:10.1} ms  ({runs} runs)  peak {:6.2} GiB",
                    peak as f64 / GIB
                );
                self.rows.push(Row {
                    case: name.to_string(),
                    ms,
                    runs,
                    peak: Some(peak),
                    text_case,
                });
            }
            Err(e) => {
                println!("{name:<48} FAILED: {e:#}");
                self.errors.push(format!("{name}: {e:#}"));
            }
        }
    }

    fn measure(
        &self,
        f: &mut dyn FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<(f64, usize, usize)> {
        self.sync()?;
        f()?; // warm-up 1 (first launches, PTX JIT)
        self.sync()?;
        let poller = MemPoller::start(&self.cuda)?;
        let t = Instant::now();
        let warm2 = f().and_then(|()| self.sync());
        let warm_s = t.elapsed().as_secs_f64();
        let peak = poller.finish();
        warm2?;
        let runs = ((self.budget_s / warm_s.max(1e-6)) as usize).clamp(1, self.runs);
        let mut ts = Vec::with_capacity(runs);
        for _ in 0..runs {
            self.sync()?;
            let t = Instant::now();
            f()?;
            self.sync()?;
            ts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        ts.sort_by(f64::total_cmp);
        let mid = ts.len() / 2;
        let median = if ts.len() % 2 == 1 {
            ts[mid]
        } else {
            0.5 * (ts[mid - 1] + ts[mid])
        };
        Ok((median, runs, peak))
    }

    fn median_of(&self, case: &str) -> Option<f64> {
        self.rows.iter().find(|r| r.case == case).map(|r| r.ms)
    }
}

/// Deterministic token ids in `[1, 256000)` (an LCG: any valid ids do for timing).
fn token_ids(n: usize, seed: u64, device: &Device) -> anyhow::Result<Tensor> {
    let mut s = seed;
    let ids: Vec<u32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            1 + ((s >> 33) % 255_999) as u32
        })
        .collect();
    Ok(Tensor::from_vec(ids, (1, n), device)?)
}

fn request(kind: PipelineKind, width: u32, height: u32, n: u32) -> GenerateRequest {
    GenerateRequest {
        endpoint: kind,
        prompt: PROMPT.to_string(),
        negative_prompt: String::new(),
        width,
        height,
        num_inference_steps: kind.default_steps(),
        guidance_scale: 5.0,
        seed: 0,
        num_images: n,
    }
}

fn diffusers_rows(path: Option<&Path>) -> anyhow::Result<(String, DiffusersRows)> {
    let Some(path) = path else {
        return Ok(("(no diffusers JSON given)".into(), HashMap::new()));
    };
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?,
    )?;
    let mut out = HashMap::new();
    for c in v["cases"].as_array().context("cases")? {
        let name = c["case"].as_str().context("case")?.to_string();
        let ms = c["diffusers_ms"].as_f64().context("diffusers_ms")?;
        let peak = c["peak_gib"].as_f64().context("peak_gib")?;
        out.insert(name, (ms, peak));
    }
    let info = format!(
        "diffusers: card {}, torch {}, resident {:.2} GiB",
        v["card"],
        v["torch"],
        v["resident_gib"].as_f64().unwrap_or(f64::NAN)
    );
    Ok((info, out))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!("usage: sana-bench BASE_DIR SPRINT_DIR [DIFFUSERS_JSON]");
    }
    let env_num = |k: &str, d: f64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(d)
    };
    let device = Device::new_cuda(0).context("CUDA device 0")?;
    let Device::Cuda(cuda) = &device else {
        bail!("Device::new_cuda returned a non-CUDA device");
    };
    let cuda = cuda.clone();
    let card = cuda.cuda_stream().context().name()?;
    println!("device: {card}");
    let mut bench = Bench {
        device: device.clone(),
        cuda: cuda.clone(),
        runs: env_num("SANA_BENCH_RUNS", 5.0).max(1.0) as usize,
        budget_s: env_num("SANA_BENCH_CASE_BUDGET_S", 60.0),
        rows: Vec::new(),
        errors: Vec::new(),
    };
    // `SANA_BENCH_INVARIANT=off`: every case with batch invariance off (`ops::set_batch_invariant`), so one
    // lease can measure what it costs per component.
    if std::env::var("SANA_BENCH_INVARIANT").is_ok_and(|v| v == "off" || v == "0") {
        sana_pipelines::ops::set_batch_invariant(false);
        println!("batch invariance: off");
    }
    let before = used_bytes(&cuda)?;
    if let Ok(which) = std::env::var("SANA_BENCH_PROFILE") {
        return profile(&which, &args[1], &args[2], &device);
    }

    let t = Instant::now();
    let mut pipes = load_pipelines(&PipelinesConfig {
        base: Some(ModelSource::new(args[1].clone())),
        sprint: Some(ModelSource::new(args[2].clone())),
        device: device.clone(),
        dtype: DType::BF16,
    })?;
    bench.sync()?;
    let resident = used_bytes(&cuda)? - before;
    println!(
        "loaded both pipelines (bf16) in {:.1} s; device memory +{:.2} GiB (context before: {:.2} GiB)",
        t.elapsed().as_secs_f64(),
        resident as f64 / GIB,
        before as f64 / GIB
    );
    let text = Arc::clone(pipes.base().context("base pipeline")?.text_encoder());
    println!(
        "tokenizer: n_chi {} → positive prompt length {} (negative {})",
        text.n_chi(),
        text.max_length(true),
        text.max_length(false)
    );

    if std::env::var("SANA_BENCH_ONLY").is_ok_and(|only| only == "batch") {
        return sana_bench_batch::run(&mut pipes, &device, &cuda, &card, bench.runs);
    }

    // Components.
    let ids510 = token_ids(510, 1, &device)?;
    let ids300 = token_ids(300, 2, &device)?;
    let m510 = Tensor::ones((1, 510), DType::U32, &device)?;
    let m300 = Tensor::ones((1, 300), DType::U32, &device)?;
    let enc = text.encoder().clone();
    bench.case("gemma2 encode pos(510)+neg(300)", None, || {
        enc.forward(&ids510, &m510)?;
        enc.forward(&ids300, &m300)?;
        Ok(())
    });
    let prompt = [PROMPT.to_string()];
    let empty = [String::new()];
    // The empty negative prompt comes from the text encoder's cache; the second case computes it.
    bench.case("ours: text encode, tokenizer + pos + neg", None, || {
        text.encode_prompts(&prompt, true)?;
        text.encode_prompts(&empty, false)?;
        Ok(())
    });
    bench.case(
        "ours: text encode, tokenizer + pos + neg computed",
        None,
        || {
            text.encode_prompts(&prompt, true)?;
            text.encode_computed(&empty, false, None, true)?;
            Ok(())
        },
    );
    bench.case("ours: text encode, tokenizer + pos", None, || {
        text.encode_prompts(&prompt, true)?;
        Ok(())
    });
    // What a batch of 4 Sprint requests encodes in its one Gemma-2 call (issue 14).
    let prompts4: Vec<String> = (0..4).map(|i| format!("{PROMPT}, variation {i}")).collect();
    bench.case(
        "ours: text encode, tokenizer + 4 pos in one call",
        None,
        || {
            text.encode_prompts(&prompts4, true)?;
            Ok(())
        },
    );

    let mut repo = ModelRepo::open(&ModelSource::new(args[1].clone()))?;
    let v_files = repo.component_for("vae", DType::BF16)?;
    let vae_cfg = DcAeConfig::from_json_file(&v_files.config)?;
    let vae = DcAeDecoder::load(
        loader::var_builder(&v_files.weights, DType::BF16, &device)?,
        &vae_cfg,
    )?;
    let lat = Tensor::randn(0f32, 1f32, (1, 32, 32, 32), &device)?.to_dtype(DType::BF16)?;
    let inv = 1.0 / vae_cfg.scaling_factor;
    bench.case("dc-ae decode 1024x1024", None, || {
        vae.decode(&lat.affine(inv, 0.0)?)?;
        Ok(())
    });
    // The same decode over 4 latents in one call (the pipelines decode one image at a time): whether
    // a batched decode is cheaper per image (issue 14).
    let lat4 = Tensor::randn(0f32, 1f32, (4, 32, 32, 32), &device)?.to_dtype(DType::BF16)?;
    bench.case("dc-ae decode 4x 1024x1024 in one call", None, || {
        vae.decode(&lat4.affine(inv, 0.0)?)?;
        Ok(())
    });
    drop(vae);

    let tr = SanaTransformer2DModel::load_component(
        &repo.component_for("transformer", DType::BF16)?,
        DType::BF16,
        &device,
    )?;
    let x = Tensor::randn(0f32, 1f32, (2, 32, 32, 32), &device)?.to_dtype(DType::BF16)?;
    let emb = Tensor::randn(0f32, 1f32, (1, 300, 2304), &device)?
        .to_dtype(DType::BF16)?
        .repeat((2, 1, 1))?;
    let mask_row: Vec<u32> = (0..300).map(|i| u32::from(i < 40)).collect();
    let mask = Tensor::from_vec(mask_row, (1, 300), &device)?.repeat((2, 1))?;
    let ts = Tensor::new(&[999f32, 999f32], &device)?;
    bench.case("base transformer fwd B=2 1024^2", None, || {
        let ctx = tr.prepare_text(&emb, &mask)?;
        tr.forward(&x, &ts, None, &ctx)?;
        Ok(())
    });
    // One row (a Sprint step alone) and 4 rows (a step of 4 batched Sprint requests), same inputs per row.
    for rows in [1usize, 4] {
        let xr = x.narrow(0, 0, 1)?.repeat((rows, 1, 1, 1))?;
        let er = emb.narrow(0, 0, 1)?.repeat((rows, 1, 1))?;
        let mr = mask.narrow(0, 0, 1)?.repeat((rows, 1))?;
        let tr_ts = Tensor::full(999f32, rows, &device)?;
        bench.case(
            &format!("base transformer fwd B={rows} 1024^2"),
            None,
            || {
                let ctx = tr.prepare_text(&er, &mr)?;
                tr.forward(&xr, &tr_ts, None, &ctx)?;
                Ok(())
            },
        );
    }
    drop(tr);

    // Pipelines (through the worker's entry point, seeded GPU noise).
    let pn = Some("ours: text encode, tokenizer + pos + neg");
    let p = Some("ours: text encode, tokenizer + pos");
    let cases: [PipelineCase; 6] = [
        (
            "base 1024x1024 18 steps CFG n=1 (no text enc)",
            PipelineKind::Base,
            1024,
            1024,
            1,
            pn,
        ),
        (
            "sprint 1024x1024 2 steps n=1 (no text enc)",
            PipelineKind::Sprint,
            1024,
            1024,
            1,
            p,
        ),
        (
            "base 3840x2160 request n=1 (no text enc)",
            PipelineKind::Base,
            3840,
            2160,
            1,
            pn,
        ),
        (
            "sprint 3840x2160 request n=1 (no text enc)",
            PipelineKind::Sprint,
            3840,
            2160,
            1,
            p,
        ),
        (
            "sprint 1024x1024 n=4 (no text enc)",
            PipelineKind::Sprint,
            1024,
            1024,
            4,
            p,
        ),
        (
            "base 1024x1024 n=4 (no text enc)",
            PipelineKind::Base,
            1024,
            1024,
            4,
            pn,
        ),
    ];
    for (name, kind, w, h, n, text_case) in cases {
        let req = request(kind, w, h, n);
        let pipe = pipes.get_mut(kind).context("pipeline loaded")?;
        bench.case(name, text_case, || {
            let images = pipe.generate(&req, &mut NoProgress)?;
            if images.len() != n as usize || images[0].dimensions() != (w, h) {
                bail!(
                    "{} images of {:?}, expected {n} of {w}x{h}",
                    images.len(),
                    images.first().map(|i| i.dimensions())
                );
            }
            Ok(())
        });
    }

    let (dinfo, dref) = diffusers_rows(args.get(3).map(Path::new))?;
    let (cinfo, cref) = diffusers_rows(args.get(4).map(Path::new))?;
    println!("\n## sana-bench on {card} (bf16, random weights at the real configs)\n");
    println!(
        "ours: resident after loading both pipelines +{:.2} GiB; {dinfo}; compiled {cinfo}\n",
        resident as f64 / GIB
    );
    let mut json_rows = Vec::new();
    println!("| case | ours ms (runs) | ours − text ms | diffusers ms | ratio ours/diffusers | diffusers compiled ms | ratio ours/compiled | ours peak GiB (device) | diffusers peak GiB (allocated) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for r in &bench.rows {
        let text_ms = r.text_case.and_then(|c| bench.median_of(c));
        let cmp_ms = match (r.text_case, text_ms) {
            (Some(_), Some(t)) => Some(r.ms - t),
            (Some(_), None) => None,
            (None, _) => Some(r.ms),
        };
        let minus_text = match (r.text_case, cmp_ms) {
            (Some(_), Some(v)) => format!("{v:.1}"),
            (Some(_), None) => "n/a".into(),
            (None, _) => "–".into(),
        };
        let (d_ms, d_peak, ratio) = match (dref.get(&r.case), cmp_ms) {
            (Some((d, pk)), Some(c)) => (
                format!("{d:.1}"),
                format!("{pk:.2}"),
                format!("{:.2}", c / d),
            ),
            (Some((d, pk)), None) => (format!("{d:.1}"), format!("{pk:.2}"), "n/a".into()),
            (None, _) => ("–".into(), "–".into(), "–".into()),
        };
        let compiled = cref.get(&r.case).map(|(c, _)| *c);
        let ratio_c = match (compiled, cmp_ms) {
            (Some(c), Some(o)) => Some(o / c),
            _ => None,
        };
        let peak = r
            .peak
            .map_or("–".into(), |p| format!("{:.2}", p as f64 / GIB));
        let opt =
            |v: Option<f64>, prec: usize| v.map_or("–".to_string(), |x| format!("{x:.prec$}"));
        println!(
            "| {} | {:.1} ({}) | {minus_text} | {d_ms} | {ratio} | {} | {} | {peak} | {d_peak} |",
            r.case,
            r.ms,
            r.runs,
            opt(compiled, 1),
            opt(ratio_c, 2)
        );
        let diff = dref.get(&r.case);
        json_rows.push(serde_json::json!({
            "case": r.case,
            "ours_ms": cmp_ms,
            "ours_total_ms": r.ms,
            "runs": r.runs,
            "diffusers_ms": diff.map(|d| d.0),
            "diffusers_compiled_ms": compiled,
            "ratio": match (diff, cmp_ms) { (Some(d), Some(o)) => Some(o / d.0), _ => None },
            "ratio_compiled": ratio_c,
            "peak_gib": r.peak.map(|p| p as f64 / GIB),
            "diffusers_peak_gib": diff.map(|d| d.1),
        }));
    }
    if let Ok(path) = std::env::var("SANA_BENCH_JSON") {
        let doc = serde_json::json!({
            "card": card,
            "date": std::env::var("SANA_BENCH_DATE").unwrap_or_default(),
            "ours_resident_gib": resident as f64 / GIB,
            "diffusers": dinfo,
            "diffusers_compiled": cinfo,
            "cases": json_rows,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    for e in &bench.errors {
        println!("ERROR {e}");
    }
    if !bench.errors.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}

/// One component call between `cuProfilerStart` and `cuProfilerStop`, after two warm-up calls.
fn profile(which: &str, base_dir: &str, sprint_dir: &str, device: &Device) -> anyhow::Result<()> {
    let mut repo = ModelRepo::open(&ModelSource::new(base_dir.to_string()))?;
    let mut run: Box<dyn FnMut() -> anyhow::Result<()>> = match which {
        "decode" => {
            let v_files = repo.component_for("vae", DType::BF16)?;
            let vae_cfg = DcAeConfig::from_json_file(&v_files.config)?;
            let vae = DcAeDecoder::load(
                loader::var_builder(&v_files.weights, DType::BF16, device)?,
                &vae_cfg,
            )?;
            let lat = Tensor::randn(0f32, 1f32, (1, 32, 32, 32), device)?.to_dtype(DType::BF16)?;
            let inv = 1.0 / vae_cfg.scaling_factor;
            Box::new(move || {
                vae.decode(&lat.affine(inv, 0.0)?)?;
                Ok(())
            })
        }
        "fwd" => {
            let tr = SanaTransformer2DModel::load_component(
                &repo.component_for("transformer", DType::BF16)?,
                DType::BF16,
                device,
            )?;
            let x = Tensor::randn(0f32, 1f32, (2, 32, 32, 32), device)?.to_dtype(DType::BF16)?;
            let emb = Tensor::randn(0f32, 1f32, (1, 300, 2304), device)?
                .to_dtype(DType::BF16)?
                .repeat((2, 1, 1))?;
            let mask_row: Vec<u32> = (0..300).map(|i| u32::from(i < 40)).collect();
            let mask = Tensor::from_vec(mask_row, (1, 300), device)?.repeat((2, 1))?;
            let ts = Tensor::new(&[999f32, 999f32], device)?;
            Box::new(move || {
                let ctx = tr.prepare_text(&emb, &mask)?;
                tr.forward(&x, &ts, None, &ctx)?;
                Ok(())
            })
        }
        "gemma" => {
            let te = repo.component_for("text_encoder", DType::BF16)?;
            let cfg: sana_pipelines::gemma2::Config = loader::read_json(&te.config)?;
            let enc = sana_pipelines::gemma2::Gemma2Encoder::load(
                loader::var_builder(&te.weights, DType::BF16, device)?,
                &cfg,
            )?;
            let ids = token_ids(510, 1, device)?;
            let mask = Tensor::ones((1, 510), DType::U32, device)?;
            Box::new(move || {
                enc.forward(&ids, &mask)?;
                Ok(())
            })
        }
        "sprint" => {
            // A whole Sprint 1024² request (text encoding, 2 steps, decode, u8 image on the host): its
            // kernels' summed time against its wall time shows what the host adds between them.
            let mut pipes = load_pipelines(&PipelinesConfig {
                base: None,
                sprint: Some(ModelSource::new(sprint_dir.to_string())),
                device: device.clone(),
                dtype: DType::BF16,
            })?;
            let req = GenerateRequest {
                endpoint: PipelineKind::Sprint,
                prompt: PROMPT.to_string(),
                negative_prompt: String::new(),
                width: 1024,
                height: 1024,
                num_inference_steps: 2,
                guidance_scale: 4.5,
                seed: 7,
                num_images: 1,
            };
            Box::new(move || {
                let pipe = pipes
                    .get_mut(PipelineKind::Sprint)
                    .context("sprint pipeline")?;
                pipe.generate(&req, &mut NoProgress)?;
                Ok(())
            })
        }
        other => bail!("SANA_BENCH_PROFILE={other}: expected fwd, decode, gemma or sprint"),
    };
    for _ in 0..2 {
        run()?;
    }
    device.synchronize()?;
    // The runtime API's profiler switches (libcudart, linked by candle); ncu honours either API's.
    extern "C" {
        fn cudaProfilerStart() -> i32;
        fn cudaProfilerStop() -> i32;
    }
    anyhow::ensure!(
        unsafe { cudaProfilerStart() } == 0,
        "cudaProfilerStart failed"
    );
    let t = Instant::now();
    run()?;
    device.synchronize()?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    anyhow::ensure!(
        unsafe { cudaProfilerStop() } == 0,
        "cudaProfilerStop failed"
    );
    println!("profiled one {which}: {ms:.1} ms wall");
    Ok(())
}
