//! fal's own Python client, unchanged (fal-client pinned by `.ci/python-env.sh` into `.ci/.venv`), against the
//! real `dispatcher` binary serving HTTPS with an API key and the real `worker` binary on the tiny checkpoints,
//! over the real RabbitMQ and S3 (Garage). The client is pointed at the dispatcher only through the settings it
//! offers: `FAL_QUEUE_RUN_HOST`/`FAL_RUN_HOST`, `FAL_KEY`, and `SSL_CERT_FILE` for the self-signed certificate.
//! `tests/fal_client_compat.py` drives the client and prints a JSON summary; this test starts the worker when
//! the script says its worker-less phase (auth, validation, cancel of queued requests) is done, then checks the
//! summary and, on the result stream, that the cancelled requests never ran.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::http::{wait_ready, Spawned, TempDir};
use common::EventLog;
use fleet::events::EventKind;
use fleet::queue::Topology;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader};
use tokio::process::{Child, Command};

/// The whole script: two tiny-model jobs on the CPU plus polling.
const WAIT: Duration = Duration::from_secs(300);
const API_KEY: &str = "compat-test-key";
/// The version `.ci/python-env.sh` pins; a different one means the venv is not the one this test was written for.
const FAL_CLIENT_VERSION: &str = "1.0.3";

fn repo_path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn venv_python() -> PathBuf {
    let python = repo_path(".ci/.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run .ci/python-env.sh (it installs the pinned fal-client into .ci/.venv)",
        python.display()
    );
    python
}

fn tiny(name: &str) -> String {
    repo_path("tests/fixtures/tiny")
        .join(name)
        .to_string_lossy()
        .into_owned()
}

/// The worker binary on the test topology with the tiny checkpoints (as in `tests/worker_process.rs`).
fn spawn_worker(topology: &Topology) -> Child {
    common::worker_binary(topology)
        .args(["--worker-id", "fal-compat", "--device", "cpu"])
        .args(["--base-model", &tiny("sana")])
        .args(["--sprint-model", &tiny("sana_sprint")])
        .args(["--safety-model", &tiny("nsfw_vit")])
        .spawn()
        .expect("spawn the worker binary")
}

/// What the script left behind: its exit status, the summary line and its stderr.
struct ScriptRun {
    success: bool,
    summary: Option<Value>,
    stderr: String,
    worker: Option<Child>,
}

/// Runs the script, starting the worker when it prints `READY_FOR_WORKER`.
async fn run_script(topology: &Topology, host: &str, cert: &std::path::Path) -> ScriptRun {
    let fal_home = TempDir::new();
    let mut child = Command::new(venv_python())
        .arg(repo_path("tests/fal_client_compat.py"))
        .env("FAL_KEY", API_KEY)
        .env("FAL_QUEUE_RUN_HOST", host)
        .env("FAL_RUN_HOST", host)
        .env("SSL_CERT_FILE", cert)
        .env("FAL_HOME_DIR", &fal_home.0)
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env("FAL_COMPAT_DEADLINE_S", WAIT.as_secs().to_string())
        .env_remove("FAL_KEY_ID")
        .env_remove("FAL_KEY_SECRET")
        .env_remove("FAL_FORCE_AUTH_BY_USER")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn the fal_client script");
    let mut stderr_pipe = child.stderr.take().expect("stderr");
    let stderr_task = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr_pipe.read_to_string(&mut text).await;
        text
    });
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let (mut summary, mut worker) = (None, None);
    while let Some(line) = lines.next_line().await.expect("read script stdout") {
        if line == "READY_FOR_WORKER" {
            worker = Some(spawn_worker(topology));
        } else if let Some(json) = line.strip_prefix("SUMMARY ") {
            summary = Some(serde_json::from_str(json).expect("summary JSON"));
        } else {
            eprintln!("script: {line}");
        }
    }
    let status = child.wait().await.expect("wait for the script");
    let stderr = stderr_task.await.unwrap_or_default();
    ScriptRun {
        success: status.success(),
        summary,
        stderr,
        worker,
    }
}

#[tokio::test]
async fn fal_python_client_works_against_the_dispatcher_unchanged() {
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
    let dispatcher = Spawned::start(
        &topology,
        &[
            "--tls-cert",
            cert_path.to_str().expect("utf-8 path"),
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
        .unwrap_or_else(|| panic!("the dispatcher serves https: {}", dispatcher.base))
        .to_string();
    let trusting = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("cert"),
        )
        .build()
        .expect("client");
    wait_ready(&trusting, &dispatcher.base).await;

    let run = tokio::time::timeout(WAIT, run_script(&topology, &host, &cert_path))
        .await
        .expect("the fal_client script finished in time");
    assert!(
        run.success,
        "the fal_client script failed; its stderr:\n{}",
        run.stderr
    );
    let s = run
        .summary
        .unwrap_or_else(|| panic!("no SUMMARY line; stderr:\n{}", run.stderr));
    eprintln!("fal_client summary: {s}");
    let mut worker = run.worker.expect("the worker was started");

    assert_eq!(s["fal_client_version"], FAL_CLIENT_VERSION);
    assert_eq!(s["queue_url_format"], format!("https://{host}/"));
    assert_eq!(s["wrong_key_status"], 401, "{s}");
    assert_eq!(
        s["validation"],
        json!({"status_code": 422, "loc": ["body", "num_images"], "billable_units": "0"})
    );

    // Queued requests cancelled through the client: positions 0 and 1, then 0 once the first is gone;
    // the client sees COMPLETED with error_type client_cancelled, and get() raises the 499.
    let cancel = &s["cancel"];
    assert_eq!(cancel["positions_before"], json!([0, 1]), "{s}");
    assert_eq!(cancel["position_after_first_cancel"], 0, "{s}");
    let cancelled = cancel["requests"].as_array().expect("cancelled requests");
    assert_eq!(cancelled.len(), 2);
    for req in cancelled {
        assert_eq!(req["final_status"], "Completed", "{req}");
        assert_eq!(req["error_type"], "client_cancelled", "{req}");
        assert_eq!(req["get_error"]["status_code"], 499, "{req}");
        assert_eq!(req["get_error"]["error_type"], "client_cancelled", "{req}");
    }
    assert_eq!(s["second_cancel_status"], 400, "ALREADY_COMPLETED: {s}");
    assert_eq!(s["cancelled_still_cancelled"], true);

    // submit → status → iter_events → get on sprint; subscribe on base.
    let sprint = &s["sprint"];
    assert_eq!(
        sprint["statuses"].as_array().and_then(|v| v.last()),
        Some(&json!("Completed")),
        "{sprint}"
    );
    assert!(
        sprint["inference_time"].as_f64().is_some_and(|t| t > 0.0),
        "{sprint}"
    );
    assert!(
        sprint["log_count"].as_u64().is_some_and(|n| n > 0),
        "{sprint}"
    );
    assert_eq!(
        sprint["log_keys"],
        json!(["level", "message", "source", "timestamp"]),
        "fal's log object"
    );
    assert_eq!(sprint["seed"], 1234);
    assert_eq!(sprint["sizes"], json!([[320, 192], [320, 192]]));
    assert_eq!(sprint["module_status"], "Completed");
    let base = &s["base"];
    assert_eq!(
        base["updates"].as_array().and_then(|v| v.last()),
        Some(&json!("Completed")),
        "{base}"
    );
    assert_eq!(base["seed"], 99);
    assert_eq!(base["sizes"], json!([[256, 160]]));

    // The stream agrees: both jobs completed once; the cancelled ones never started.
    for key in ["sprint", "base"] {
        let id = s[key]["request_id"].as_str().expect("request id");
        let done = log.terminal(id, WAIT).await;
        assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
        assert_eq!(log.count(id, EventKind::Completed), 1);
    }
    for req in cancelled {
        let id = req["request_id"].as_str().expect("request id");
        assert_eq!(log.count(id, EventKind::Started), 0, "{id} ran");
        assert_eq!(log.count(id, EventKind::Completed), 0, "{id} completed");
        assert_eq!(log.count(id, EventKind::Cancelled), 1);
    }

    let pid = worker.id().expect("worker running").to_string();
    let term = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(term.success());
    let exit = tokio::time::timeout(WAIT, worker.wait())
        .await
        .expect("worker drains in time")
        .expect("wait for the worker");
    assert!(exit.success(), "worker exit after SIGTERM: {exit:?}");
    drop(dispatcher);
    common::drop_topology(&conn, &topology).await;
}
