//! Worker end to end on the real RabbitMQ and S3 (Garage) with the REAL models: the tiny Sana and
//! Sana-Sprint checkpoints and the tiny NSFW ViT, loaded by the worker binary's factory. A published job
//! yields `started`, one `progress` per step and a `completed` event whose URLs download to images of the
//! requested size and format, with the billing units of contract §6 and the checker's flags applied.
//!
//! Every request is also run here, outside the worker, through the real pipelines and checker
//! ([`reference`]): each unflagged upload must be that image (PSNR bound per format), each flag the
//! checker's verdict on it, each flagged upload black.
//! - Stock tiny checker: base and sprint, JPEG and PNG, 1024², 3840×2160, num_images = 4, a custom size;
//!   the random-weight classifier flags some of these and not others, and both kinds are asserted.
//! - A copy of the checker biased to flag everything: a flagged request is uploaded black; the same
//!   request with `enable_safety_checker: false` keeps its image (no model call: that checker would flag it).

mod common;

use std::time::Duration;

use candle_core::{DType, Device};
use common::realpipe::{self, ObservedFactory, Probe};
use common::{EventLog, RunningWorker};
use fleet::events::{EventBody, EventKind, JobMessage};
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use fleet::storage::{Storage, StorageConfig};
use image::RgbImage;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::{NoProgress, PipelinesConfig};
use serde_json::{json, Value};

/// Generous bound for one tiny CPU job on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(120);

/// PSNR bound of an unflagged upload against the reference run: PNG is lossless, so only float
/// reassociation in threaded kernels may differ (observed: identical, inf dB); JPEG quality 95 loses a
/// little on these noisy random-weight images (observed: 42.3 dB at 1024²).
const MIN_PSNR_PNG: f64 = 40.0;
const MIN_PSNR_JPEG: f64 = 35.0;

struct Case {
    kind: EndpointKind,
    input: Value,
    size: (u32, u32),
    format: image::ImageFormat,
    content_type: &'static str,
    units: u64,
}

/// One case as the worker delivered it.
struct Delivered {
    job: JobMessage,
    flags: Vec<bool>,
    images: Vec<RgbImage>,
}

/// The real pipelines and the v2 checker in `checker`, run here on each job's validated input: the
/// images and the checker's verdict on each (computed even when the request turned the checker off).
fn reference(jobs: &[JobMessage], checker: &std::path::Path) -> Vec<(Vec<RgbImage>, Vec<bool>)> {
    let local = |p: std::path::PathBuf| Some(ModelSource::new(p.to_string_lossy()));
    let mut pipelines = sana_pipelines::load_pipelines(&PipelinesConfig {
        base: local(realpipe::tiny("sana")),
        sprint: local(realpipe::tiny("sana_sprint")),
        device: Device::Cpu,
        dtype: DType::F32,
    })
    .expect("tiny pipelines");
    let source = ModelSource::new(checker.to_string_lossy());
    let checker =
        fleet_worker::safety::load_vit(&source, &Device::Cpu, DType::F32).expect("checker");
    jobs.iter()
        .map(|job| {
            let input = &job.input;
            let req = fleet_worker::generate_request(job.endpoint, input);
            let images = pipelines
                .get_mut(req.endpoint)
                .expect("pipeline loaded")
                .generate(&req, &mut NoProgress)
                .expect("reference generation");
            let pixels = checker.pixel_values(&images).expect("preprocess");
            let logits = checker.logits(&pixels).expect("logits");
            let p = checker.nsfw_probabilities(&logits).expect("probabilities");
            println!("reference p(nsfw) of {:?}: {p:?}", input.prompt);
            // fal's strict threshold: flagged iff p > 0.5.
            (images, p.iter().map(|&p| p > 0.5).collect())
        })
        .collect()
}

/// Publishes every case and checks each `completed` event, its stream of events, the downloads and
/// the stored objects; returns what was delivered.
async fn run_cases(
    conn: &lapin::Connection,
    topology: &Topology,
    worker_id: &str,
    storage_config: &StorageConfig,
    cases: &[Case],
) -> Vec<Delivered> {
    let publisher = Publisher::new(conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(conn, topology).await;
    let jobs: Vec<_> = cases
        .iter()
        .map(|c| common::job(c.kind, c.input.clone()))
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish job");
    }
    let storage = Storage::new(storage_config.clone()).expect("storage");
    let mut out = Vec::new();
    for (case, job) in cases.iter().zip(jobs) {
        let done = log.terminal(&job.request_id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        assert_eq!(
            done.billable_units(),
            Some(case.units),
            "billing of {}",
            case.input
        );
        assert_eq!(done.worker(), Some(worker_id));
        let EventBody::Completed(completed) = &done.body else {
            panic!("not completed: {done:?}");
        };
        assert!(completed.inference_time > 0.0);
        let result = done.result().expect("completed carries the result body");
        assert_eq!(result["seed"], 42);
        assert_eq!(result["prompt"], case.input["prompt"]);
        assert!(result["timings"]["inference"].as_f64().is_some());
        let flags: Vec<bool> = serde_json::from_value(result["has_nsfw_concepts"].clone())
            .expect("has_nsfw_concepts is a list of booleans");

        let started: Vec<_> = log
            .of(&job.request_id)
            .into_iter()
            .filter(|e| e.kind() == EventKind::Started)
            .collect();
        assert_eq!(started.len(), 1);
        assert_eq!(
            (started[0].attempt(), started[0].worker()),
            (Some(1), Some(worker_id))
        );
        let steps: Vec<_> = log
            .of(&job.request_id)
            .into_iter()
            .filter(|e| e.kind() == EventKind::Progress)
            .map(|e| match &e.body {
                EventBody::Progress(p) => (Some(p.step), Some(p.total)),
                _ => (None, None),
            })
            .collect();
        let n = job.input.num_inference_steps;
        assert_eq!(
            steps,
            (1..=n).map(|s| (Some(s), Some(n))).collect::<Vec<_>>(),
            "one progress event per denoising step, in order"
        );

        let metas = result["images"].as_array().expect("images array");
        assert_eq!(metas.len() as u32, job.input.num_images);
        assert_eq!(flags.len(), metas.len());
        let ext = if case.content_type == "image/png" {
            "png"
        } else {
            "jpeg"
        };
        let mut images = Vec::new();
        for (i, meta) in metas.iter().enumerate() {
            assert_eq!(meta["width"], case.size.0);
            assert_eq!(meta["height"], case.size.1);
            assert_eq!(meta["content_type"], case.content_type);
            assert_eq!(meta["file_name"], format!("{i}.{ext}"));
            let url = meta["url"].as_str().expect("url");
            let (status, _, body) = common::http_get(url).await;
            assert_eq!(status, 200, "GET {url}");
            assert_eq!(meta["file_size"], body.len());
            assert_eq!(
                image::guess_format(&body).expect("image bytes"),
                case.format
            );
            let img = image::load_from_memory(&body).expect("decodes").to_rgb8();
            assert_eq!(img.dimensions(), case.size);
            images.push(img);
        }
        let prefix = format!("{}/{}/", case.kind.as_str(), job.request_id);
        let keys = storage.list_keys(&prefix).await.expect("list");
        let expected: Vec<_> = (0..metas.len())
            .map(|i| format!("{prefix}{i}.{ext}"))
            .collect();
        assert_eq!(keys, expected, "deterministic keys, one set");
        out.push(Delivered { job, flags, images });
    }
    out
}

/// Compares what the worker delivered with the reference run: flags = verdict (when the request checks),
/// flagged uploads black, unflagged uploads the reference image. Returns every expected flag.
async fn check_against_reference(
    cases: &[Case],
    delivered: &[Delivered],
    checker: &std::path::Path,
) -> Vec<bool> {
    let jobs: Vec<JobMessage> = delivered.iter().map(|d| d.job.clone()).collect();
    let checker = checker.to_path_buf();
    let refs = tokio::task::spawn_blocking(move || reference(&jobs, &checker))
        .await
        .expect("reference task");
    let mut all = Vec::new();
    for ((case, got), (ref_images, verdict)) in cases.iter().zip(delivered).zip(&refs) {
        let checks = got.job.input.enable_safety_checker;
        let expected: Vec<bool> = verdict.iter().map(|&v| v && checks).collect();
        assert_eq!(got.flags, expected, "flags of {}", case.input);
        for (i, img) in got.images.iter().enumerate() {
            if expected[i] {
                assert!(
                    img.pixels().all(|p| p.0 == [0, 0, 0]),
                    "flagged image {i} of {} is uploaded black",
                    case.input
                );
                continue;
            }
            let psnr = sana_pipelines::image_ops::psnr(img, &ref_images[i]);
            let min = if case.format == image::ImageFormat::Png {
                MIN_PSNR_PNG
            } else {
                MIN_PSNR_JPEG
            };
            println!(
                "PSNR of image {i} of {} vs the reference: {psnr:.2} dB",
                case.input
            );
            assert!(
                psnr >= min,
                "image {i} of {}: PSNR {psnr} dB < {min}",
                case.input
            );
        }
        all.extend(expected);
    }
    all
}

#[tokio::test]
async fn jobs_complete_with_downloadable_images_and_billing() {
    let storage_config = common::s3_config();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let worker_id = format!("w-e2e-{}", uuid::Uuid::new_v4().simple());
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, &worker_id, storage_config.clone()),
        ObservedFactory::boxed(probe.clone(), None),
    );

    let cases = [
        Case {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "a fox", "image_size": "square_hd"}),
            size: (1024, 1024),
            format: image::ImageFormat::Jpeg,
            content_type: "image/jpeg",
            units: 1,
        },
        Case {
            kind: EndpointKind::Base,
            input: json!({"prompt": "a city at night", "num_inference_steps": 3}),
            size: (3840, 2160),
            format: image::ImageFormat::Jpeg,
            content_type: "image/jpeg",
            units: 8, // ceil(8 294 400 / 1 048 576) = 8
        },
        Case {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "four owls", "image_size": "square_hd", "num_images": 4, "output_format": "png"}),
            size: (1024, 1024),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 4,
        },
        Case {
            kind: EndpointKind::Base,
            input: json!({"prompt": "a lighthouse", "image_size": {"width": 300, "height": 200},
                          "num_inference_steps": 2, "output_format": "png"}),
            size: (300, 200),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 1,
        },
    ];
    let delivered = run_cases(&conn, &topology, &worker_id, &storage_config, &cases).await;
    assert_eq!(worker.stop(WAIT).await, fleet_worker::WorkerExit::Shutdown);
    common::drop_topology(&conn, &topology).await;
    assert_eq!(
        probe.runs.load(std::sync::atomic::Ordering::SeqCst),
        cases.len(),
        "every job ran the real pipeline once"
    );
    let flags = check_against_reference(&cases, &delivered, &realpipe::tiny("nsfw_vit")).await;
    // Fixed seeds and fixtures: this set covers both outcomes of the stock checker (if a fixture change
    // breaks that, pick other prompts; the printed p(nsfw) values show which way each image went).
    assert!(
        flags.contains(&true) && flags.contains(&false),
        "both flagged and unflagged images: {flags:?}"
    );
}

#[tokio::test]
async fn flagged_images_are_uploaded_black_and_unchecked_ones_kept() {
    let storage_config = common::s3_config();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let checker = realpipe::forced_nsfw_checker();
    let (probe, _freed) = Probe::new();
    let worker_id = format!("w-e2e-nsfw-{}", uuid::Uuid::new_v4().simple());
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, &worker_id, storage_config.clone()),
        ObservedFactory::with_checker(&checker.0, probe, None),
    );
    let size = json!({"width": 300, "height": 200});
    let cases = [
        Case {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "a red barn", "image_size": size, "num_images": 2, "output_format": "png"}),
            size: (300, 200),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 2,
        },
        Case {
            kind: EndpointKind::Sprint,
            input: json!({"prompt": "a red barn", "image_size": size, "output_format": "png",
                          "enable_safety_checker": false}),
            size: (300, 200),
            format: image::ImageFormat::Png,
            content_type: "image/png",
            units: 1,
        },
    ];
    let delivered = run_cases(&conn, &topology, &worker_id, &storage_config, &cases).await;
    assert_eq!(worker.stop(WAIT).await, fleet_worker::WorkerExit::Shutdown);
    common::drop_topology(&conn, &topology).await;
    let flags = check_against_reference(&cases, &delivered, &checker.0).await;
    assert_eq!(
        flags,
        [true, true, false],
        "forced: flagged, unless unchecked"
    );
    assert!(
        delivered[1].images[0].pixels().any(|p| p.0 != [0, 0, 0]),
        "the unchecked image is kept"
    );
}
