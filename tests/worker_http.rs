//! `worker serve --http` as a process on the tiny checkpoints, against the real RabbitMQ and S3:
//! `/health` turns 200 once the models are loaded and warmed up, `/metrics` counts a completed job by
//! outcome with its duration and the model load time, SIGTERM turns `/health` to 503 `draining` while the
//! in-flight job finishes (it completes exactly once) and the process exits 0; a worker that cannot start
//! exits with the status of its cause (4 models, 5 broker).

mod common;

use std::time::Duration;

use common::workerproc::{self, sample, tiny_model_args};
use common::EventLog;
use fleet::events::EventKind;
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(180);

fn args(id: &str, extra: &[&str]) -> Vec<String> {
    let mut a = vec!["--worker-id".to_string(), id.to_string()];
    a.extend(tiny_model_args());
    a.extend(["--http".to_string(), "127.0.0.1:0".to_string()]);
    a.extend(extra.iter().map(|s| s.to_string()));
    a
}

/// [`args`] with the sprint model taken from `sprint` instead of the tiny checkpoint.
fn args_with_sprint(id: &str, sprint: &str) -> Vec<String> {
    let mut a = args(id, &[]);
    let i = a
        .iter()
        .position(|x| x == "--sprint-model")
        .expect("tiny_model_args sets --sprint-model");
    a[i + 1] = sprint.to_string();
    a
}

#[tokio::test]
async fn health_and_metrics_follow_load_jobs_and_drain() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let mut child = workerproc::spawn(&topology, &args("h-1", &["--drain-grace", "600"]));
    let addr = workerproc::http_addr(&mut child, WAIT).await;
    let (_, body) = workerproc::wait_http(addr, "/health", WAIT, "ready", |c, _| c == 200).await;
    assert!(body.contains("\"ready\""), "{body}");
    let (code, text) = workerproc::get(addr, "/metrics").await.expect("metrics");
    assert_eq!(code, 200);
    let load = sample(&text, "fleet_worker_model_load_seconds").expect("model load gauge");
    assert!(load > 0.0, "model load seconds recorded once ready: {load}");
    assert_eq!(sample(&text, "fleet_worker_phase"), Some(1.0));

    let quick = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "a fox", "image_size": "square"}),
    );
    publisher.publish_job(&quick).await.expect("publish");
    let done = log.terminal(&quick.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    let (_, text) = workerproc::wait_http(addr, "/metrics", WAIT, "the job counted", |_, t| {
        sample(
            t,
            "fleet_worker_jobs_total{endpoint=\"sprint\",outcome=\"completed\"}",
        ) == Some(1.0)
    })
    .await;
    assert_eq!(
        sample(
            &text,
            "fleet_worker_job_duration_seconds_count{endpoint=\"sprint\",outcome=\"completed\"}"
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "fleet_worker_inference_seconds_count{endpoint=\"sprint\"}"
        ),
        Some(1.0)
    );
    assert_eq!(sample(&text, "fleet_worker_jobs_in_flight"), Some(0.0));
    assert_eq!(
        sample(
            &text,
            "fleet_worker_step_duration_seconds_count{endpoint=\"sprint\"}"
        ),
        Some(f64::from(quick.input.num_inference_steps)),
        "one observation per denoising step"
    );

    // A long job, then SIGTERM while it runs: draining answers 503 and the job still completes once.
    let long = common::job(
        EndpointKind::Base,
        json!({"prompt": "a long job", "image_size": "square", "num_images": 2, "num_inference_steps": 50}),
    );
    publisher.publish_job(&long).await.expect("publish");
    log.wait_for(WAIT, "the long job's first step", |e| {
        e.request_id == long.request_id && e.kind() == EventKind::Progress
    })
    .await;
    workerproc::signal(&child, "-TERM");
    let (_, body) = workerproc::wait_http(addr, "/health", WAIT, "draining", |c, _| c == 503).await;
    assert!(body.contains("\"draining\""), "{body}");
    assert!(
        body.contains("\"jobs_in_flight\":1"),
        "503 while the job is still in flight: {body}"
    );
    let done = log.terminal(&long.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed, "{done:?}");
    assert_eq!(done.worker(), Some("h-1"));
    let status = workerproc::wait_exit(&mut child, WAIT).await;
    assert!(status.success(), "drained exit is status 0: {status:?}");
    assert_eq!(log.count(&long.request_id, EventKind::Completed), 1);
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_worker_that_cannot_start_exits_with_the_status_of_its_cause() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut bad_model = workerproc::spawn(
        &topology,
        &args_with_sprint("h-bad-model", &workerproc::empty_dir()),
    );
    let status = workerproc::wait_exit(&mut bad_model, WAIT).await;
    assert_eq!(status.code(), Some(4), "models: {status:?}");
    let mut no_broker = workerproc::spawn(
        &topology,
        &args(
            "h-no-broker",
            &["--amqp-url", "amqp://guest:guest@127.0.0.1:1/%2f"],
        ),
    );
    let status = workerproc::wait_exit(&mut no_broker, WAIT).await;
    assert_eq!(status.code(), Some(5), "broker: {status:?}");
    common::drop_topology(&conn, &topology).await;
}

/// Serves `PATCH /api/v1/namespaces/{ns}/pods/{name}` on a free port, sending each request's path and
/// body to the returned channel (the worker's side of `--pod-deletion-cost` against a local listener).
async fn patch_recorder() -> (
    std::net::SocketAddr,
    tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value)>,
) {
    use axum::routing::patch;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/api/v1/namespaces/{ns}/pods/{name}",
        patch(move |uri: axum::http::Uri, body: String| {
            let tx = tx.clone();
            async move {
                let value: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let _ = tx.send((uri.path().to_string(), value));
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, rx)
}

/// The deletion cost carried by the next PATCH of the pod.
async fn next_cost(
    patches: &mut tokio::sync::mpsc::UnboundedReceiver<(String, serde_json::Value)>,
) -> String {
    let (path, body) = tokio::time::timeout(WAIT, patches.recv())
        .await
        .expect("a PATCH within the wait")
        .expect("recorder running");
    assert_eq!(path, "/api/v1/namespaces/fleet/pods/fleet-worker-abc");
    body["metadata"]["annotations"]["controller.kubernetes.io/pod-deletion-cost"]
        .as_str()
        .expect("the annotation as a string")
        .to_string()
}

#[tokio::test]
async fn pod_deletion_cost_is_raised_while_a_job_runs_and_lowered_after() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut log = EventLog::open(&conn, &topology).await;
    let (api, mut patches) = patch_recorder().await;
    let api_url = format!("http://{api}");
    let mut cmd = common::worker_binary(&topology);
    cmd.args(args(
        "h-cost",
        &["--pod-deletion-cost", "--kube-api-url", &api_url],
    ))
    .env("POD_NAME", "fleet-worker-abc")
    .env("POD_NAMESPACE", "fleet")
    .stdout(std::process::Stdio::piped());
    let mut child = cmd.spawn().expect("spawn");
    let addr = workerproc::http_addr(&mut child, WAIT).await;
    workerproc::wait_http(addr, "/health", WAIT, "ready", |c, _| c == 200).await;
    assert_eq!(next_cost(&mut patches).await, "0", "idle at start");
    let job = common::job(
        EndpointKind::Sprint,
        json!({"prompt": "cost", "image_size": "square"}),
    );
    publisher.publish_job(&job).await.expect("publish");
    assert_eq!(
        next_cost(&mut patches).await,
        "1000",
        "busy while the job runs"
    );
    assert_eq!(next_cost(&mut patches).await, "0", "idle after it");
    let done = log.terminal(&job.request_id, WAIT).await;
    assert_eq!(done.kind(), EventKind::Completed);
    workerproc::signal(&child, "-TERM");
    assert!(workerproc::wait_exit(&mut child, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}
