//! Cross-request batching in the worker (issue 14) on the real RabbitMQ and S3 (Garage) with the REAL
//! tiny Sana-Sprint checkpoint: sprint jobs submitted together with `max_batch = 4` run as one batch
//! (observed: the batch sizes the pipeline was called with, `Probe::batches`), every request keeps its
//! own `started`/`progress`/`completed` events, and every uploaded PNG is pixel for pixel the image of the
//! request's solo run (the bound of `sana_pipelines`' batching on the CPU: bit-exact); each job is
//! answered when its own images are decoded, not when the batch ends (`timings.inference`). A batch that
//! panics on the model is run again request by request: the request that breaks the model fails alone.

mod common;

use std::time::Duration;

use candle_core::{DType, Device};
use common::realpipe::{self, ObservedFactory, Probe, PANIC_PROMPT};
use common::{EventLog, RunningWorker};
use fleet::events::{EventBody, EventKind, JobMessage};
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use sana_pipelines::loader::ModelSource;
use sana_pipelines::{NoProgress, PipelinesConfig};
use serde_json::json;

/// Generous bound for a few tiny CPU jobs on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(180);
/// Long enough for every job published together to reach the model thread; a full batch runs at once,
/// so this is only waited when the test would fail anyway.
const BATCH_WAIT: Duration = Duration::from_secs(30);

/// Solo runs of the jobs through the real pipelines, outside the worker.
fn solo_images(jobs: &[JobMessage]) -> Vec<Vec<image::RgbImage>> {
    let local = |p: std::path::PathBuf| Some(ModelSource::new(p.to_string_lossy()));
    let mut pipelines = sana_pipelines::load_pipelines(&PipelinesConfig {
        base: None,
        sprint: local(realpipe::tiny("sana_sprint")),
        device: Device::Cpu,
        dtype: DType::F32,
    })
    .expect("tiny pipelines");
    jobs.iter()
        .map(|job| {
            let req = fleet_worker::generate_request(job.endpoint, &job.input);
            pipelines
                .get_mut(req.endpoint)
                .expect("sprint loaded")
                .generate(&req, &mut NoProgress)
                .expect("solo run")
        })
        .collect()
}

fn batching_worker(
    topology: &fleet::queue::Topology,
    worker_id: &str,
    max_batch: u16,
    probe: Probe,
) -> RunningWorker {
    let mut config = common::worker_config(topology, worker_id, common::s3_config());
    config.endpoints = vec![EndpointKind::Sprint];
    config.max_batch = max_batch;
    config.max_concurrency = 2 * max_batch;
    config.batch_wait = BATCH_WAIT;
    RunningWorker::spawn(config, ObservedFactory::boxed(probe, None))
}

#[tokio::test]
async fn sprint_jobs_submitted_together_run_as_one_batch_and_equal_their_solo_runs() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let worker_id = format!("w-batch-{}", uuid::Uuid::new_v4().simple());
    let worker = batching_worker(&topology, &worker_id, 4, probe.clone());
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;

    // One bin (2:3 in the tiny model's 512 table), four output sizes, seeds, guidance scales, counts.
    let png = |prompt: &str, (w, h): (u32, u32), seed: u64, g: f64, n: u32| {
        json!({"prompt": prompt, "image_size": {"width": w, "height": h}, "seed": seed,
               "guidance_scale": g, "num_images": n, "output_format": "png",
               "enable_safety_checker": false})
    };
    let jobs: Vec<JobMessage> = [
        png("a fox in the snow", (300, 200), 1, 5.0, 1),
        png("two owls", (600, 400), 2, 4.5, 2),
        png("a red barn", (300, 200), 3, 7.0, 1),
        png("a lighthouse at dusk", (450, 300), 4, 5.0, 1),
    ]
    .into_iter()
    .map(|input| common::job(EndpointKind::Sprint, input))
    .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish job");
    }

    let mut delivered = Vec::new();
    let mut inference = Vec::new();
    for job in &jobs {
        let done = log.terminal(&job.request_id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        assert_eq!(log.count(&job.request_id, EventKind::Started), 1);
        let steps: Vec<(u32, u32)> = log
            .of(&job.request_id)
            .into_iter()
            .filter_map(|e| match &e.body {
                EventBody::Progress(p) => Some((p.step, p.total)),
                _ => None,
            })
            .collect();
        assert_eq!(steps, vec![(1, 2), (2, 2)], "its own progress events");
        let result = done.result().expect("result body");
        inference.push(
            result["timings"]["inference"]
                .as_f64()
                .expect("timings.inference"),
        );
        let mut images = Vec::new();
        for meta in result["images"].as_array().expect("images") {
            let (status, _, body) = common::http_get(meta["url"].as_str().expect("url")).await;
            assert_eq!(status, 200);
            images.push(image::load_from_memory(&body).expect("png").to_rgb8());
        }
        delivered.push(images);
    }
    worker.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;

    let batches = probe.batches.lock().expect("probe").clone();
    assert_eq!(batches, vec![4], "the four jobs ran as one batch");
    // Each job is answered when its own images are decoded: its inference time (batch start to its
    // answer) includes the decodes of the jobs answered before it, so no two are alike. Were the batch
    // answered at its end, all four would be the batch's time plus a check of microseconds (no safety
    // check here).
    let mut sorted = inference.clone();
    sorted.sort_by(f64::total_cmp);
    eprintln!("inference times of the batch, sorted: {sorted:?} s");
    for pair in sorted.windows(2) {
        assert!(
            pair[1] - pair[0] >= 1e-3,
            "answers at least one decode apart: {sorted:?}"
        );
    }

    let solo = {
        let jobs = jobs.clone();
        tokio::task::spawn_blocking(move || solo_images(&jobs))
            .await
            .expect("solo task")
    };
    for ((job, got), want) in jobs.iter().zip(&delivered).zip(&solo) {
        assert_eq!(got.len(), want.len(), "{}", job.input.prompt);
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert_eq!(
                a.dimensions(),
                (job.input.image_size.width, job.input.image_size.height)
            );
            assert!(
                a == b,
                "image {i} of {:?}: the batched upload is not its solo run (PSNR {:.2} dB)",
                job.input.prompt,
                sana_pipelines::image_ops::psnr(a, b)
            );
        }
    }
}

#[tokio::test]
async fn a_batch_that_panics_is_retried_per_request_and_only_the_culprit_fails() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let (probe, _freed) = Probe::new();
    let worker_id = format!("w-batch-panic-{}", uuid::Uuid::new_v4().simple());
    let worker = batching_worker(&topology, &worker_id, 3, probe.clone());
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let size = json!({"width": 300, "height": 200});
    let jobs: Vec<JobMessage> = ["a fox", PANIC_PROMPT, "an owl"]
        .into_iter()
        .map(|prompt| {
            common::job(
                EndpointKind::Sprint,
                json!({"prompt": prompt, "image_size": size, "enable_safety_checker": false}),
            )
        })
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish job");
    }
    let kinds: Vec<EventKind> = {
        let mut kinds = Vec::new();
        for job in &jobs {
            kinds.push(log.terminal(&job.request_id, WAIT).await.kind());
        }
        kinds
    };
    worker.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;
    assert_eq!(
        kinds,
        vec![
            EventKind::Completed,
            EventKind::Failed,
            EventKind::Completed
        ]
    );
    let batches = probe.batches.lock().expect("probe").clone();
    assert_eq!(
        batches,
        vec![3, 1, 1, 1],
        "one batch, then each request alone"
    );
}
