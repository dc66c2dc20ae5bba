//! `SANA_BENCH_ONLY=batch`: cross-request batching (issue 14) against the same burst run one at a time.
//!
//! For Sprint 1024² (2 steps) and base 1024² (18 steps, CFG), and bursts of 1, 2, 4 and 8 requests that
//! arrive together (distinct prompts and seeds, one image each):
//! - `one at a time`: `ImagePipeline::generate` per request in arrival order; a request's latency is the
//!   time from the burst's start to the end of its own run (it waited for those before it);
//! - `batched`: one `ImagePipeline::generate_batch_each` over the whole burst (the worker with
//!   `--max-batch` ≥ the burst); a request's latency is the time from the burst's start to the moment its
//!   images are handed over (after the shared steps, its own decode and those of the requests before it:
//!   the worker answers each request at that moment);
//! - `batched, max batch M` (bursts larger than M, M = 2 and 4): the burst in arrival order as
//!   consecutive batches of at most M, one `generate_batch_each` each, as the worker's model thread takes
//!   them with `--max-batch M` (the oldest job and the next M − 1 compatible ones); latency as above, from
//!   the burst's start.
//!
//! Each mode: one untimed warm-up, one warm-up that samples device memory (`MemPoller`: device-wide peak,
//! context and pool included), then `SANA_BENCH_RUNS` (default 5) timed bursts between `synchronize()`
//! calls. Reported: images/s (images of all timed bursts / their total time, each burst timed until its last
//! call has returned, in both modes), p50 and p99 request latency
//! over every request of the timed bursts (nearest rank), peak GiB; the JSON (`SANA_BENCH_JSON`) also has
//! the batched/one-at-a-time ratios of images/s and p50. Exactness on this card: each request's image of
//! the last timed batched burst against its image of the last one-at-a-time burst (same seed): bit
//! equality and the lowest PSNR over the burst (a second table, and the JSON). `SANA_BENCH_BATCH_INVARIANT=off`
//! runs everything with batch invariance off (`ops::set_batch_invariant`), for the before/after on one card.

use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::Device;
use sana_pipelines::image_ops::psnr;
use sana_pipelines::{BatchEntry, GenerateRequest, NoProgress, PipelineKind, Pipelines};

use crate::{MemPoller, GIB, PROMPT};

/// Burst sizes measured.
const CONCURRENCY: [u32; 4] = [1, 2, 4, 8];

/// One mode of one burst.
struct Measured {
    /// Each request's images of the last timed burst (for the batched-vs-solo comparison).
    images: Vec<image::RgbImage>,
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

/// How a burst runs: one request at a time, or in consecutive batches of at most `max_batch`.
#[derive(Clone, Copy)]
enum Mode {
    OneAtATime,
    Batched { max_batch: usize },
}

impl Mode {
    fn label(self, burst: usize) -> String {
        match self {
            Mode::OneAtATime => "one at a time".into(),
            Mode::Batched { max_batch } if max_batch >= burst => "batched".into(),
            Mode::Batched { max_batch } => format!("batched, max batch {max_batch}"),
        }
    }
}

/// Runs the burst once; returns each request's latency in ms (from the burst's start), its image, in
/// request order, and the burst's whole time in ms (until the last call returned and the device is idle:
/// when the model thread could take the next work).
fn run_burst(
    pipes: &mut Pipelines,
    device: &Device,
    reqs: &[GenerateRequest],
    mode: Mode,
) -> anyhow::Result<(Vec<f64>, Vec<image::RgbImage>, f64)> {
    let kind = reqs[0].endpoint;
    let pipe = pipes.get_mut(kind).context("pipeline loaded")?;
    device.synchronize()?;
    let t = Instant::now();
    let mut lat = Vec::with_capacity(reqs.len());
    let mut out = Vec::with_capacity(reqs.len());
    if let Mode::Batched { max_batch } = mode {
        for chunk in reqs.chunks(max_batch.max(1)) {
            let mut observers: Vec<NoProgress> = chunk.iter().map(|_| NoProgress).collect();
            let mut entries: Vec<BatchEntry<'_>> = chunk
                .iter()
                .zip(observers.iter_mut())
                .map(|(request, o)| BatchEntry {
                    request,
                    observer: o,
                })
                .collect();
            // The images are host memory when handed over, so the hand-over time needs no device sync.
            let mut handed = Vec::with_capacity(chunk.len());
            pipe.generate_batch_each(&mut entries, &mut |i, r| {
                handed.push((i, t.elapsed().as_secs_f64() * 1e3, r))
            })?;
            device.synchronize()?;
            if handed.len() != chunk.len() {
                bail!(
                    "{} of {} batched requests answered",
                    handed.len(),
                    chunk.len()
                );
            }
            handed.sort_by_key(|h| h.0);
            for (_, ms, r) in handed {
                let mut images = r?;
                if images.len() != 1 || images[0].dimensions() != (1024, 1024) {
                    bail!("a batched request gave {} images", images.len());
                }
                lat.push(ms);
                out.extend(images.pop());
            }
        }
    } else {
        for req in reqs {
            let mut images = pipe.generate(req, &mut NoProgress)?;
            device.synchronize()?;
            if images.len() != 1 {
                bail!("a request gave {} images", images.len());
            }
            lat.push(t.elapsed().as_secs_f64() * 1e3);
            out.extend(images.pop());
        }
    }
    device.synchronize()?;
    Ok((lat, out, t.elapsed().as_secs_f64() * 1e3))
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
    mode: Mode,
    runs: usize,
) -> anyhow::Result<Measured> {
    run_burst(pipes, device, reqs, mode)?;
    let poller = MemPoller::start(cuda)?;
    let warm = run_burst(pipes, device, reqs, mode);
    let peak = poller.finish();
    warm?;
    let mut all = Vec::with_capacity(runs * reqs.len());
    let mut total_s = 0.0;
    let mut images = Vec::new();
    for _ in 0..runs {
        let (lat, last, whole_ms) = run_burst(pipes, device, reqs, mode)?;
        total_s += whole_ms / 1e3;
        all.extend(lat);
        images = last;
    }
    all.sort_by(f64::total_cmp);
    Ok(Measured {
        images,
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
    // `SANA_BENCH_BATCH_INVARIANT=off` (or sana-bench's `SANA_BENCH_INVARIANT=off`) measures the size-tuned
    // kernels (batch rows not bit-equal to solo runs) instead of the default batch-invariant ones.
    if std::env::var("SANA_BENCH_BATCH_INVARIANT").is_ok_and(|v| v == "off" || v == "0") {
        sana_pipelines::ops::set_batch_invariant(false);
    }
    let invariant = sana_pipelines::ops::batch_invariant();
    let inv = if invariant { "on" } else { "off" };
    println!(
        "\n## sana-bench batch on {card} (bf16, random weights at the real configs, batch invariance {inv})\n"
    );
    println!("| case | requests | mode | images/s | p50 ms | p99 ms | peak GiB | runs |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut exactness = Vec::new();
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
            // One at a time first (the baseline), then the whole burst as one batch, then smaller caps.
            let mut modes = vec![
                Mode::OneAtATime,
                Mode::Batched {
                    max_batch: n as usize,
                },
            ];
            modes.extend(
                [2, 4]
                    .into_iter()
                    .filter(|&m| m < n as usize)
                    .map(|max_batch| Mode::Batched { max_batch }),
            );
            let mut measured: Vec<serde_json::Value> = Vec::new();
            let mut solo: Option<(f64, f64, Vec<image::RgbImage>)> = None;
            let mut whole_ratio = (None, None);
            for mode in modes {
                let label = mode.label(n as usize);
                match measure(pipes, device, cuda, &reqs, mode, runs) {
                    Ok(m) => {
                        println!(
                            "| {name} | {n} | {label} | {:.2} | {:.1} | {:.1} | {:.2} | {} |",
                            m.images_per_s, m.p50_ms, m.p99_ms, m.peak_gib, m.runs
                        );
                        let mut entry = serde_json::json!({
                            "mode": label,
                            "images_per_s": m.images_per_s,
                            "p50_ms": m.p50_ms,
                            "p99_ms": m.p99_ms,
                            "peak_gib": m.peak_gib,
                            "runs": m.runs,
                        });
                        match (&mode, &solo) {
                            (Mode::OneAtATime, _) => {
                                solo = Some((m.images_per_s, m.p50_ms, m.images));
                            }
                            (Mode::Batched { max_batch }, Some((ips, p50, solo_images))) => {
                                // Each batched request's image against the same request run alone
                                // (same seed).
                                let bit_exact = *solo_images == m.images;
                                let min_psnr = solo_images
                                    .iter()
                                    .zip(&m.images)
                                    .map(|(a, b)| psnr(a, b))
                                    .fold(f64::INFINITY, f64::min);
                                let (r_ips, r_p50) = (m.images_per_s / ips, m.p50_ms / p50);
                                exactness.push(format!(
                                    "| {name} | {n} | {label} | {bit_exact} | {min_psnr:.2} |"
                                ));
                                entry["max_batch"] = serde_json::json!(max_batch);
                                entry["images_per_s_ratio"] = serde_json::json!(r_ips);
                                entry["p50_ratio"] = serde_json::json!(r_p50);
                                entry["batched_equals_solo_bit_exact"] =
                                    serde_json::json!(bit_exact);
                                // JSON has no infinity: a bit-exact burst writes "inf".
                                entry["batched_vs_solo_min_psnr_db"] = if min_psnr.is_finite() {
                                    serde_json::json!(min_psnr)
                                } else {
                                    serde_json::json!(min_psnr.to_string())
                                };
                                if *max_batch >= n as usize {
                                    whole_ratio = (Some(r_ips), Some(r_p50));
                                }
                            }
                            (Mode::Batched { .. }, None) => {}
                        }
                        measured.push(entry);
                    }
                    Err(e) => {
                        println!("| {name} | {n} | {label} | FAILED: {e:#} |");
                        errors.push(format!("{name} n={n} {label}: {e:#}"));
                    }
                }
            }
            cases.push(serde_json::json!({
                "case": name,
                "endpoint": kind.as_str(),
                "requests": n,
                "modes": measured,
                // The whole burst as one batch against one at a time (each mode has its own ratios).
                "images_per_s_ratio": whole_ratio.0,
                "p50_ratio": whole_ratio.1,
            }));
        }
    }
    println!(
        "\n| case | requests | mode | batched images bit-exact to solo | min PSNR batched vs solo dB |"
    );
    println!("|---|---|---|---|---|");
    for line in &exactness {
        println!("{line}");
    }
    if let Ok(path) = std::env::var("SANA_BENCH_JSON") {
        let doc = serde_json::json!({
            "card": card,
            "date": std::env::var("SANA_BENCH_DATE").unwrap_or_default(),
            "mode": "batch",
            "batch_invariant": invariant,
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
