//! `SANA_BENCH_ONLY=batch`: cross-request batching (issue 14) against the same burst run one at a time.
//!
//! For Sprint 1024² (2 steps) and base 1024² (18 steps, CFG), and bursts of 1, 2, 4 and 8 requests that
//! arrive together (distinct prompts and seeds, one image each):
//! - `one at a time`: `ImagePipeline::generate` per request in arrival order; a request's latency is the
//!   time from the burst's start to the end of its own run (it waited for those before it);
//! - `batched`: one `ImagePipeline::generate_batch` over the whole burst; every request's latency is the
//!   batch's wall time (the worker answers a batch's requests when the batch returns).
//!
//! Each mode: one untimed warm-up, one warm-up that samples device memory (`MemPoller`: device-wide peak,
//! context and pool included), then `SANA_BENCH_RUNS` (default 5) timed bursts between `synchronize()`
//! calls. Reported: images/s (images of all timed bursts / their total time), p50 and p99 request latency
//! over every request of the timed bursts (nearest rank), peak GiB; the JSON (`SANA_BENCH_JSON`) also has
//! the batched/one-at-a-time ratios of images/s and p50.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use sana_pipelines::{BatchEntry, GenerateRequest, NoProgress, PipelineKind, Pipelines};

use crate::{MemPoller, GIB, PROMPT};

/// Burst sizes measured.
const CONCURRENCY: [u32; 4] = [1, 2, 4, 8];

/// One mode of one burst.
struct Measured {
    images_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    peak_gib: f64,
    runs: usize,
}

fn burst(kind: PipelineKind, n: u32) -> Vec<GenerateRequest> {
    (0..n)
        .map(|i| GenerateRequest {
            endpoint: kind,
            prompt: format!("{PROMPT}, variation {i}"),
            negative_prompt: String::new(),
            width: 1024,
            height: 1024,
            num_inference_steps: kind.default_steps(),
            guidance_scale: 5.0,
            seed: u64::from(i) + 1,
            num_images: 1,
        })
        .collect()
}

/// Runs the burst once; returns each request's latency in ms (from the burst's start).
fn run_burst(
    pipes: &mut Pipelines,
    device: &Device,
    reqs: &[GenerateRequest],
    batched: bool,
) -> anyhow::Result<Vec<f64>> {
    let kind = reqs[0].endpoint;
    let pipe = pipes.get_mut(kind).context("pipeline loaded")?;
    device.synchronize()?;
    let t = Instant::now();
    let mut lat = Vec::with_capacity(reqs.len());
    if batched {
        let mut observers: Vec<NoProgress> = reqs.iter().map(|_| NoProgress).collect();
        let mut entries: Vec<BatchEntry<'_>> = reqs
            .iter()
            .zip(observers.iter_mut())
            .map(|(request, o)| BatchEntry {
                request,
                observer: o,
            })
            .collect();
        let out = pipe.generate_batch(&mut entries)?;
        device.synchronize()?;
        let ms = t.elapsed().as_secs_f64() * 1e3;
        for r in out {
            let images = r?;
            if images.len() != 1 || images[0].dimensions() != (1024, 1024) {
                bail!("a batched request gave {} images", images.len());
            }
            lat.push(ms);
        }
    } else {
        for req in reqs {
            let images = pipe.generate(req, &mut NoProgress)?;
            device.synchronize()?;
            if images.len() != 1 {
                bail!("a request gave {} images", images.len());
            }
            lat.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(lat)
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn measure(
    pipes: &mut Pipelines,
    device: &Device,
    cuda: &candle_core::CudaDevice,
    reqs: &[GenerateRequest],
    batched: bool,
    runs: usize,
) -> anyhow::Result<Measured> {
    run_burst(pipes, device, reqs, batched)?;
    let poller = MemPoller::start(cuda)?;
    let warm = run_burst(pipes, device, reqs, batched);
    let peak = poller.finish();
    warm?;
    let mut all = Vec::with_capacity(runs * reqs.len());
    let mut total_s = 0.0;
    for _ in 0..runs {
        let lat = run_burst(pipes, device, reqs, batched)?;
        total_s += lat.iter().copied().fold(0.0, f64::max) / 1e3;
        all.extend(lat);
    }
    all.sort_by(f64::total_cmp);
    Ok(Measured {
        images_per_s: all.len() as f64 / total_s.max(1e-9),
        p50_ms: percentile(&all, 50.0),
        p99_ms: percentile(&all, 99.0),
        peak_gib: peak as f64 / GIB,
        runs,
    })
}

/// Runs every batch case, prints a table and writes `SANA_BENCH_JSON` when set.
pub fn run(
    pipes: &mut Pipelines,
    device: &Device,
    cuda: &candle_core::CudaDevice,
    card: &str,
    runs: usize,
) -> anyhow::Result<()> {
    println!("\n## sana-bench batch on {card} (bf16, random weights at the real configs)\n");
    println!("| case | requests | mode | images/s | p50 ms | p99 ms | peak GiB | runs |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut cases = Vec::new();
    let mut errors = Vec::new();
    // `SANA_BENCH_BATCH_KINDS=sprint` (or `base`) runs one pipeline's cases only.
    let kinds = match std::env::var("SANA_BENCH_BATCH_KINDS").as_deref() {
        Ok("sprint") => vec![PipelineKind::Sprint],
        Ok("base") => vec![PipelineKind::Base],
        _ => vec![PipelineKind::Sprint, PipelineKind::Base],
    };
    for kind in kinds {
        for n in CONCURRENCY {
            let reqs = burst(kind, n);
            let name = format!("batch {kind} 1024x1024 {} steps", kind.default_steps());
            let mut pair = Vec::new();
            for batched in [false, true] {
                let mode = if batched { "batched" } else { "one at a time" };
                match measure(pipes, device, cuda, &reqs, batched, runs) {
                    Ok(m) => {
                        println!(
                            "| {name} | {n} | {mode} | {:.2} | {:.1} | {:.1} | {:.2} | {} |",
                            m.images_per_s, m.p50_ms, m.p99_ms, m.peak_gib, m.runs
                        );
                        pair.push(serde_json::json!({
                            "mode": mode,
                            "images_per_s": m.images_per_s,
                            "p50_ms": m.p50_ms,
                            "p99_ms": m.p99_ms,
                            "peak_gib": m.peak_gib,
                            "runs": m.runs,
                        }));
                    }
                    Err(e) => {
                        println!("| {name} | {n} | {mode} | FAILED: {e:#} |");
                        errors.push(format!("{name} n={n} {mode}: {e:#}"));
                    }
                }
            }
            let ratio = |key: &str| match (pair.first(), pair.get(1)) {
                (Some(a), Some(b)) => match (b[key].as_f64(), a[key].as_f64()) {
                    (Some(b), Some(a)) if a > 0.0 => Some(b / a),
                    _ => None,
                },
                _ => None,
            };
            cases.push(serde_json::json!({
                "case": name,
                "endpoint": kind.as_str(),
                "requests": n,
                "modes": pair,
                "images_per_s_ratio": ratio("images_per_s"),
                "p50_ratio": ratio("p50_ms"),
            }));
        }
    }
    if let Ok(path) = std::env::var("SANA_BENCH_JSON") {
        let doc = serde_json::json!({
            "card": card,
            "date": std::env::var("SANA_BENCH_DATE").unwrap_or_default(),
            "mode": "batch",
            "cases": cases,
        });
        std::fs::write(&path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {path}"))?;
        println!("wrote {path}");
    }
    for e in &errors {
        println!("ERROR {e}");
    }
    if !errors.is_empty() {
        bail!("{} batch cases failed", errors.len());
    }
    Ok(())
}
