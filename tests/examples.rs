//! The Python examples in `examples/` (issue 13), run as a user runs them, against the real `dispatcher`
//! and `worker` binaries (tiny checkpoints on the CPU), the real RabbitMQ and S3 (Garage), with the
//! pinned clients of `.ci/python-env.sh` (fal-client, pika) in `.ci/.venv`:
//! `fal_client_generate.py` over HTTPS with an API key, as fal's client needs, and `amqp_pika.py` over
//! AMQP alone. Each must end with its result on stdout and its image saved at the requested size; the
//! results stream must show the request completed once.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use common::http::{wait_ready, Spawned, TempDir};
use common::workerproc::tiny_model_args;
use common::EventLog;
use fleet::events::EventKind;
use fleet::queue::Topology;
use serde_json::Value;
use tokio::process::{Child, Command};

/// Worker start (model load, warm-up) plus one tiny-model job on the CPU.
const WAIT: Duration = Duration::from_secs(300);
const API_KEY: &str = "examples-test-key";

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn venv_python() -> PathBuf {
    let python = repo_path(".ci/.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/python-env.sh (it installs the pinned fal-client and pika into .ci/.venv)",
        python.display()
    );
    python
}

fn spawn_worker(topology: &Topology) -> Child {
    common::worker_binary(topology)
        .args(["--worker-id", "examples-worker"])
        .args(tiny_model_args())
        .spawn()
        .expect("spawn the worker binary")
}

/// What an example printed.
struct Run {
    stderr: String,
    /// The JSON object on the last line of stdout: `{request_id, result}`.
    summary: Value,
}

/// Runs `python examples/<script> <args>` with `env`, failing with its stderr when it does not succeed.
async fn run_example(script: &str, args: &[&str], env: &[(&str, &str)]) -> Run {
    let mut cmd = Command::new(venv_python());
    cmd.arg(repo_path("examples").join(script))
        .args(args)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("{script} did not finish within {WAIT:?}"))
        .unwrap_or_else(|e| panic!("run {script}: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{script}: {:?}\nstderr:\n{stderr}",
        out.status
    );
    eprintln!("{script} stderr:\n{stderr}");
    let last = stdout.lines().last().unwrap_or_default();
    let summary = serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{script}: last stdout line is not JSON ({e}): {stdout:?}"));
    Run { stderr, summary }
}

/// The example saved the result's image under `out/<request_id>/`, at `width`×`height`.
fn assert_saved(out: &Path, run: &Run, format: image::ImageFormat, width: u32, height: u32) {
    let id = run.summary["request_id"].as_str().expect("request_id");
    let image = &run.summary["result"]["images"][0];
    assert_eq!(image["width"], width);
    assert_eq!(image["height"], height);
    let path = out
        .join(id)
        .join(image["file_name"].as_str().expect("file_name"));
    assert!(
        run.stderr.contains(&format!("saved {}", path.display())),
        "{}",
        run.stderr
    );
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let decoded = image::load_from_memory_with_format(&bytes, format).expect("a decodable image");
    assert_eq!((decoded.width(), decoded.height()), (width, height));
}

#[tokio::test]
async fn fal_client_example_generates_and_saves_an_image() {
    venv_python();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = EventLog::open(&conn, &topology).await;
    let dir = TempDir::new();
    let cert =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("self-signed cert");
    let (cert_path, key_path) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let cert_arg = cert_path.to_str().expect("utf-8 path");
    let dispatcher = Spawned::start(
        &topology,
        &[
            "--tls-cert",
            cert_arg,
            "--tls-key",
            key_path.to_str().expect("utf-8 path"),
            "--api-keys",
            API_KEY,
        ],
    )
    .await;
    let host = dispatcher
        .base
        .strip_prefix("https://")
        .expect("https")
        .to_string();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("cert"),
        )
        .build()
        .expect("client");
    wait_ready(&trusting, &dispatcher.base).await;
    let _worker = spawn_worker(&topology);

    let out = dir.0.join("images");
    let fal_home = TempDir::new();
    let run = run_example(
        "fal_client_generate.py",
        &[
            "--endpoint",
            "sprint",
            "--prompt",
            "a red fox in the snow",
            "--size",
            "320x192",
            "--seed",
            "5",
            "--format",
            "png",
            "--out",
            out.to_str().expect("utf-8 path"),
        ],
        &[
            ("FAL_KEY", API_KEY),
            ("FAL_QUEUE_RUN_HOST", host.as_str()),
            ("FAL_RUN_HOST", host.as_str()),
            ("SSL_CERT_FILE", cert_arg),
            ("FAL_HOME_DIR", fal_home.0.to_str().expect("utf-8 path")),
        ],
    )
    .await;
    assert_eq!(run.summary["result"]["seed"], 5);
    assert_eq!(
        run.summary["result"]["images"][0]["content_type"],
        "image/png"
    );
    assert_saved(&out, &run, image::ImageFormat::Png, 320, 192);
    // The worker's log lines reached the client: Sprint's default 2 steps.
    for line in ["step 1/2", "step 2/2", "completed"] {
        assert!(
            run.stderr.contains(line),
            "{line:?} missing:\n{}",
            run.stderr
        );
    }
    let id = run.summary["request_id"].as_str().expect("request_id");
    assert_eq!(log.terminal(id, WAIT).await.kind(), EventKind::Completed);
    assert_eq!(log.count(id, EventKind::Completed), 1);

    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn pika_example_submits_over_amqp_and_reads_the_result_stream() {
    venv_python();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = EventLog::open(&conn, &topology).await;
    // The dispatcher's ingress validates and routes what the example publishes; no HTTP is used.
    let dispatcher = Spawned::start(&topology, &[]).await;
    wait_ready(&reqwest::Client::new(), &dispatcher.base).await;
    let _worker = spawn_worker(&topology);

    let dir = TempDir::new();
    let amqp_url = common::amqp_url();
    let run = run_example(
        "amqp_pika.py",
        &[
            "--amqp-url",
            &amqp_url,
            "--prefix",
            &topology.prefix,
            "--endpoint",
            "base",
            "--prompt",
            "a lighthouse at dusk",
            "--size",
            "256x160",
            "--steps",
            "3",
            "--seed",
            "9",
            "--out",
            dir.0.to_str().expect("utf-8 path"),
            "--timeout",
            "300",
        ],
        &[],
    )
    .await;
    assert_eq!(run.summary["result"]["seed"], 9);
    assert_saved(&dir.0, &run, image::ImageFormat::Jpeg, 256, 160);
    for line in [
        "queued (stream offset ",
        "started on examples-worker",
        "step 3/3",
        "completed: 1 billable units",
    ] {
        assert!(
            run.stderr.contains(line),
            "{line:?} missing:\n{}",
            run.stderr
        );
    }
    let id = run.summary["request_id"].as_str().expect("request_id");
    let done = log.terminal(id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    assert_eq!(log.count(id, EventKind::Completed), 1);
    assert_eq!(log.count(id, EventKind::Progress), 3);

    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}
