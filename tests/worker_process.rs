//! The `worker` binary as a process, with the real Sana pipelines on the tiny random-weight checkpoints
//! (`tests/fixtures/tiny/`), against the real RabbitMQ and S3: jobs of both kinds complete with
//! downloadable images of the requested size and format; SIGTERM drains and exits 0; an idle worker with
//! `--keep-alive 1 --idle-action exit` exits 0; a worker killed with SIGKILL mid-job loses nothing (the
//! job is redelivered and completed exactly once by the second process).

mod common;

use std::path::PathBuf;
use std::process::ExitStatus;

use std::time::Duration;
use tokio::process::Child;

use common::EventLog;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);

fn tiny(name: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/tiny")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// Starts the worker binary on a test topology with the tiny checkpoints.
fn spawn_worker(topology: &Topology, worker_id: &str, extra: &[&str]) -> Child {
    common::worker_binary(topology)
        .args(["--worker-id", worker_id, "--device", "cpu"])
        .args(["--retry-backoff-ms", "0"])
        .args([
            "--base-model",
            &tiny("sana"),
            "--sprint-model",
            &tiny("sana_sprint"),
        ])
        .args([
            "--safety-model",
            &tiny("nsfw_vit"),
            "--safety-checker",
            "v2",
        ])
        .args(extra)
        .spawn()
        .expect("spawn the worker binary")
}

fn signal(child: &Child, sig: &str) {
    let pid = child.id().expect("the child is running");
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

async fn wait_exit(mut child: Child, timeout: Duration) -> ExitStatus {
    tokio::time::timeout(timeout, child.wait())
        .await
        .unwrap_or_else(|_| panic!("worker process did not exit within {timeout:?}"))
        .expect("wait for the worker process")
}

#[tokio::test]
async fn binary_completes_jobs_and_drains_on_sigterm() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let child = spawn_worker(&topology, "p-e2e", &[]);
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let cases = [
        (
            EndpointKind::Sprint,
            json!({"prompt": "a red fox", "image_size": "square", "num_images": 2, "output_format": "png"}),
            (512, 512),
            2,
        ),
        (
            EndpointKind::Base,
            json!({"prompt": "a lighthouse", "image_size": {"width": 300, "height": 200}, "num_inference_steps": 4}),
            (300, 200),
            1,
        ),
    ];
    let jobs: Vec<_> = cases
        .iter()
        .map(|(k, input, _, _)| common::job(*k, input.clone()))
        .collect();
    for job in &jobs {
        publisher.publish_job(job).await.expect("publish");
    }
    for ((_, input, size, units), job) in cases.iter().zip(&jobs) {
        let done = log.terminal(&job.request_id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        assert_eq!(done.billable_units(), Some(*units));
        let result = done.result().expect("result body");
        let n = input["num_images"].as_u64().unwrap_or(1) as usize;
        assert_eq!(
            result["has_nsfw_concepts"].as_array().map(Vec::len),
            Some(n)
        );
        assert_eq!(
            log.count(&job.request_id, EventKind::Progress) as u32,
            job.input.num_inference_steps
        );
        for meta in result["images"].as_array().expect("images") {
            let (status, _, body) = common::http_get(meta["url"].as_str().expect("url")).await;
            assert_eq!(status, 200);
            let img = image::load_from_memory(&body).expect("decodes");
            assert_eq!((img.width(), img.height()), *size);
            assert_eq!(meta["content_type"], job.input.output_format.content_type());
        }
    }
    signal(&child, "-TERM");
    let status = wait_exit(child, WAIT).await;
    assert!(status.success(), "SIGTERM drains and exits 0: {status:?}");
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn idle_binary_exits_zero_after_keep_alive() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let child = spawn_worker(
        &topology,
        "p-idle",
        &["--keep-alive", "1", "--idle-action", "exit"],
    );
    let status = wait_exit(child, WAIT).await;
    assert!(status.success(), "keep-alive exit is status 0: {status:?}");
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn binary_killed_mid_job_is_redelivered_and_completed_once() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    // A long job (50 CFG steps, 4 images, 4K output) so the kill lands while it runs.
    let job = common::job(
        EndpointKind::Base,
        json!({"prompt": "a long job", "num_images": 4, "num_inference_steps": 50}),
    );
    publisher.publish_job(&job).await.expect("publish");
    let first = spawn_worker(&topology, "p-killed", &[]);
    log.wait_for(WAIT, "the first process to report progress", |e| {
        e.request_id == job.request_id && e.kind() == EventKind::Progress
    })
    .await;
    signal(&first, "-KILL");
    let status = wait_exit(first, WAIT).await;
    assert!(!status.success(), "killed: {status:?}");

    let second = spawn_worker(&topology, "p-second", &[]);
    let done = log.terminal(&job.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    assert_eq!((done.worker(), done.attempt()), (Some("p-second"), Some(2)));
    assert_eq!(
        done.billable_units(),
        Some(32),
        "ceil(3840·2160 / 1024²) · 4"
    );
    assert_eq!(log.count(&job.request_id, EventKind::Completed), 1);
    signal(&second, "-TERM");
    assert!(wait_exit(second, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}
