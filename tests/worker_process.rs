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

/// A worker process and the file its stderr goes to (shown when it does not exit in time).
struct Worker {
    child: Child,
    log: PathBuf,
}

/// Starts the worker binary on a test topology with the tiny checkpoints, its log in a temp file
/// (or on the test's stderr with `FLEET_TEST_WORKER_LOGS`).
fn spawn_worker(topology: &Topology, worker_id: &str, extra: &[&str]) -> Worker {
    let log = std::env::temp_dir().join(format!(
        "fleet-worker-{worker_id}-{}.log",
        uuid::Uuid::new_v4().simple()
    ));
    let mut cmd = common::worker_binary(topology);
    cmd.args(["--worker-id", worker_id, "--device", "cpu"])
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
        .args(extra);
    if std::env::var_os("FLEET_TEST_WORKER_LOGS").is_none() {
        cmd.stderr(std::fs::File::create(&log).expect("worker log file"));
    }
    Worker {
        child: cmd.spawn().expect("spawn the worker binary"),
        log,
    }
}

fn signal(worker: &Worker, sig: &str) {
    let pid = worker.child.id().expect("the child is running");
    let status = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {sig} failed");
}

/// What a process that does not exit is doing: its threads' names and kernel wait channels, and
/// their stacks when `gdb` is installed.
fn threads_of(pid: u32) -> String {
    let mut out = String::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let read = |f: &str| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
            out.push_str(&format!(
                "{} {} wchan={}\n",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan").trim()
            ));
        }
    }
    if let Ok(gdb) = std::process::Command::new("gdb")
        .args([
            "-p",
            &pid.to_string(),
            "-batch",
            "-ex",
            "thread apply all bt 25",
        ])
        .output()
    {
        out.push_str(&String::from_utf8_lossy(&gdb.stdout));
    }
    out
}

/// Waits for the worker to exit; when it does not within `timeout`, fails with its log's tail and
/// its threads (then kills it).
async fn wait_exit(mut worker: Worker, timeout: Duration) -> ExitStatus {
    let status = tokio::time::timeout(timeout, worker.child.wait()).await;
    let log = std::fs::read_to_string(&worker.log).unwrap_or_default();
    let _ = std::fs::remove_file(&worker.log);
    match status {
        Ok(status) => status.expect("wait for the worker process"),
        Err(_) => {
            let threads = worker.child.id().map(threads_of).unwrap_or_default();
            let tail: String = log
                .lines()
                .rev()
                .take(40)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n");
            panic!(
                "worker process did not exit within {timeout:?}\n--- its log (last 40 lines) ---\n{tail}\n--- its threads ---\n{threads}"
            )
        }
    }
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
