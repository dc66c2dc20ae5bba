//! A worker process killed with SIGKILL mid-job: the broker redelivers the job (the quorum queue counts
//! the failed delivery) and a second worker completes it exactly once — one `completed` event, by the
//! second worker, with `attempt = 2`, and one set of objects.
//!
//! Both workers run the REAL tiny Sana-Sprint pipeline and NSFW checker (`tests/common/realpipe.rs`).
//! The killed worker is a real separate process: this test binary re-runs itself with `--exact
//! child_worker --ignored`, and that child runs the worker runtime with its real pipeline held at a closed
//! gate inside the first denoising step, so it is mid-job when the parent kills it.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::realpipe::{Gate, ObservedFactory, Probe};
use common::{EventLog, RunningWorker};
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use fleet::storage::Storage;
use serde_json::json;

/// Generous bound for a model load plus a tiny CPU job on a shared 2-core machine.
const WAIT: Duration = Duration::from_secs(120);
const CHILD_PREFIX_ENV: &str = "FLEET_TEST_CHILD_TOPOLOGY";
const CHILD_ID_ENV: &str = "FLEET_TEST_CHILD_WORKER_ID";

#[tokio::test]
#[ignore = "entry point of the child process spawned by killed_worker_job_is_redelivered_and_completed_once"]
async fn child_worker() {
    let prefix =
        std::env::var(CHILD_PREFIX_ENV).expect("only run as the child of the SIGKILL test");
    let worker_id = std::env::var(CHILD_ID_ENV).expect("child worker id");
    let topology = Topology {
        prefix,
        ..common::test_topology_settings()
    };
    let (probe, _freed) = Probe::new();
    let worker = RunningWorker::spawn(
        common::worker_config(&topology, &worker_id, common::s3_config()),
        ObservedFactory::boxed(probe, Some(Gate::closed())),
    );
    // The gate never opens: the parent kills this process while the job is in flight.
    worker.join(Duration::from_secs(600)).await;
}

#[tokio::test]
async fn killed_worker_job_is_redelivered_and_completed_once() {
    let storage_config = common::s3_config();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "survive", "image_size": "square"}),
    );
    publisher.publish_job(&job).await.expect("publish");

    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args(["child_worker", "--exact", "--ignored", "--nocapture"])
        .env(CHILD_PREFIX_ENV, &topology.prefix)
        .env(CHILD_ID_ENV, "w-killed")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn the child worker");
    let started = log
        .wait_for(WAIT, "the child to start the job", |e| {
            e.request_id == job.request_id && e.kind() == EventKind::Started
        })
        .await;
    assert_eq!(
        (started.worker(), started.attempt()),
        (Some("w-killed"), Some(1))
    );
    child.kill().expect("SIGKILL the child");
    let status = child.wait().expect("reap the child");
    assert!(!status.success(), "killed, not exited: {status:?}");

    let (probe, _freed) = Probe::new();
    let second = RunningWorker::spawn(
        common::worker_config(&topology, "w-second", storage_config.clone()),
        ObservedFactory::boxed(probe, None),
    );
    let done = log.terminal(&job.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    assert_eq!((done.worker(), done.attempt()), (Some("w-second"), Some(2)));
    assert_eq!(log.count(&job.request_id, EventKind::Completed), 1);
    let attempts: Vec<_> = log
        .of(&job.request_id)
        .iter()
        .filter(|e| e.kind() == EventKind::Started)
        .map(|e| (e.worker().unwrap_or_default().to_string(), e.attempt()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("w-killed".to_string(), Some(1)),
            ("w-second".to_string(), Some(2))
        ]
    );
    let keys = Storage::new(storage_config)
        .expect("storage")
        .list_keys(&format!("sprint/{}/", job.request_id))
        .await
        .expect("list");
    assert_eq!(
        keys,
        [format!("sprint/{}/0.jpeg", job.request_id)],
        "one set of objects"
    );
    let result = done.result().expect("result body");
    let meta = &result["images"][0];
    let (status, _, body) = common::http_get(meta["url"].as_str().expect("url")).await;
    assert_eq!(status, 200);
    let img = image::load_from_memory_with_format(&body, image::ImageFormat::Jpeg)
        .expect("a JPEG")
        .to_rgb8();
    assert_eq!(img.dimensions(), (512, 512), "the requested square size");
    let flagged = result["has_nsfw_concepts"][0]
        .as_bool()
        .expect("one flag per image");
    assert_eq!(
        img.pixels().all(|p| p.0 == [0, 0, 0]),
        flagged,
        "black exactly when flagged, else the real pipeline's pixels"
    );
    second.stop(WAIT).await;
    common::drop_topology(&conn, &topology).await;
}
