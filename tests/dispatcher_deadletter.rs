//! Nothing accepted is left hanging (dispatcher `deadletter` and `deadlines`), against the real
//! RabbitMQ with an in-process dispatcher and a uuid topology per test:
//! - a job the quorum queue dead-letters after `x-delivery-limit` failed deliveries, with no `failed`
//!   event (a worker SIGKILLed on every attempt), ends as 500 `runner_server_error`, billing 0, and the
//!   inspection queue `{prefix}.dead` still holds it;
//! - a job whose worker published `failed` before rejecting it gets no second `failed`;
//! - a queued request past its `X-Fal-Request-Timeout` start deadline turns COMPLETED with
//!   `request_timeout` (504) without a worker, while a started one with the same timeout does not.

mod common;

use std::time::{Duration, Instant};

use common::http::{send, submit, wait_ready, FakeWorker, InProcess, SseReader, WAIT};
use common::EventLog;
use fleet::events::{ErrorType, Event, EventBody, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::{delivery_attempt, message_id, Publisher, Topology};
use fleet_dispatcher::deadletter::death_reason;
use fleet_dispatcher::http::HttpConfig;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicQosOptions, BasicRejectOptions};
use lapin::{Channel, Connection, Consumer};
use serde_json::{json, Value};

/// A consumer on `queue` with prefetch 1 (on its own channel, returned so it stays open).
async fn consumer(conn: &Connection, queue: &str) -> (Channel, Consumer) {
    let ch = conn.create_channel().await.expect("channel");
    ch.basic_qos(1, BasicQosOptions::default())
        .await
        .expect("qos");
    let c = ch
        .basic_consume(
            queue.into(),
            "".into(),
            Default::default(),
            Default::default(),
        )
        .await
        .expect("consume");
    (ch, c)
}

async fn next_delivery(c: &mut Consumer, what: &str) -> Delivery {
    tokio::time::timeout(WAIT, c.next())
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("consumer open")
        .expect("delivery")
}

/// Result of a request over HTTP: status, billable-units header, body.
async fn result(client: &reqwest::Client, submitted: &Value) -> (u16, Option<String>, Value) {
    let url = submitted["response_url"].as_str().expect("response_url");
    let (status, headers, body) = send(client.get(url)).await;
    let units = headers
        .get("x-fal-billable-units")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    (status, units, body)
}

/// Follows the request's SSE status stream until COMPLETED (the dispatcher's own view, which the
/// result endpoint serves) and returns that status body. Every earlier status must be one of `allowed`.
async fn wait_completed(client: &reqwest::Client, submitted: &Value, allowed: &[&str]) -> Value {
    let url = submitted["status_url"]
        .as_str()
        .expect("status_url")
        .replace("/status", "/status/stream");
    let mut sse = SseReader::open(client, &url).await;
    let follow = async {
        loop {
            let s = sse
                .next()
                .await
                .expect("the stream ends only after COMPLETED");
            if s["status"] == "COMPLETED" {
                return s;
            }
            assert!(
                allowed.iter().any(|a| s["status"] == *a),
                "unexpected status {s}"
            );
        }
    };
    tokio::time::timeout(Duration::from_secs(10), follow)
        .await
        .expect("COMPLETED within 10 s")
}

fn id(submitted: &Value) -> String {
    submitted["request_id"]
        .as_str()
        .expect("request_id")
        .to_string()
}

/// Takes the `n` messages of the inspection queue `{prefix}.dead`: (message_id, x-death reason).
async fn inspect_dead(conn: &Connection, topology: &Topology, n: usize) -> Vec<(String, String)> {
    let (_ch, mut c) = consumer(conn, &topology.dead_queue()).await;
    let mut out = Vec::new();
    for _ in 0..n {
        let d = next_delivery(&mut c, "a message in the dead queue").await;
        out.push((
            message_id(&d.properties).unwrap_or_default(),
            death_reason(&d.properties).unwrap_or_default(),
        ));
        d.ack(BasicAckOptions::default()).await.expect("ack");
    }
    out
}

fn assert_failed(ev: &Event, error_type: ErrorType) {
    assert_eq!(ev.kind(), EventKind::Failed, "{ev:?}");
    assert_eq!(ev.error_type(), Some(error_type), "{ev:?}");
    assert_eq!(ev.billable_units(), Some(0), "{ev:?}");
}

#[tokio::test]
async fn job_dropped_by_the_delivery_limit_fails_the_request() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    wait_ready(&client, &d.base).await;
    let mut log = EventLog::open(&conn, &topology).await;

    let submitted = submit(&client, &d.base, "", json!({"prompt": "dropped"})).await;
    let request_id = id(&submitted);
    // A worker that dies on every attempt: the job comes back until the quorum queue gives up on it
    // (delivery_limit + 1 deliveries, as contract §5 records for 3.10.8) and dead-letters it.
    let (_ch, mut jobs) = consumer(&conn, &topology.job_queue(EndpointKind::Base)).await;
    for attempt in 1..=topology.delivery_limit + 1 {
        let delivery = next_delivery(&mut jobs, "a job delivery").await;
        assert_eq!(
            message_id(&delivery.properties).as_deref(),
            Some(request_id.as_str())
        );
        assert_eq!(delivery_attempt(&delivery.properties), attempt);
        let requeue = BasicNackOptions {
            requeue: true,
            ..BasicNackOptions::default()
        };
        delivery.nack(requeue).await.expect("nack");
    }

    let ev = log.terminal(&request_id, WAIT).await;
    assert_failed(&ev, ErrorType::RunnerServerError);
    assert_eq!(ev.worker(), None, "published by the dispatcher");
    let s = wait_completed(&client, &submitted, &["IN_QUEUE"]).await;
    assert_eq!(s["error_type"], "runner_server_error", "{s}");
    let (status, units, body) = result(&client, &submitted).await;
    assert_eq!(
        (status, units.as_deref(), body["error_type"].as_str()),
        (500, Some("0"), Some("runner_server_error"))
    );
    assert!(body["detail"].is_string(), "{body}");
    // The inspection queue is untouched by the watch queue beside it.
    assert_eq!(
        inspect_dead(&conn, &topology, 1).await,
        [(request_id.clone(), "delivery_limit".to_string())]
    );
    assert_eq!(log.count(&request_id, EventKind::Failed), 1);

    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn job_failed_by_its_worker_gets_no_second_failure() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    wait_ready(&client, &d.base).await;
    let mut log = EventLog::open(&conn, &topology).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");

    let reported = submit(&client, &d.base, "", json!({"prompt": "reported"})).await;
    let silent = submit(&client, &d.base, "", json!({"prompt": "silent"})).await;
    let (reported_id, silent_id) = (id(&reported), id(&silent));
    let (_ch, mut jobs) = consumer(&conn, &topology.job_queue(EndpointKind::Base)).await;

    // As the worker does on a permanent failure: `failed` (confirmed), then reject without requeue.
    let first = next_delivery(&mut jobs, "the first job").await;
    assert_eq!(
        message_id(&first.properties).as_deref(),
        Some(reported_id.as_str())
    );
    let mut worker_failed = Event::failed(
        &reported_id,
        EndpointKind::Base,
        ErrorType::BadRequest,
        "image generation failed",
    );
    if let EventBody::Failed(failure) = &mut worker_failed.body {
        failure.worker = Some("fake".into());
    }
    publisher
        .publish_event(&worker_failed)
        .await
        .expect("publish failed");
    first
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");
    // Then a job rejected without any event (the broker's view of a worker that vanished).
    let second = next_delivery(&mut jobs, "the second job").await;
    assert_eq!(
        message_id(&second.properties).as_deref(),
        Some(silent_id.as_str())
    );
    second
        .reject(BasicRejectOptions { requeue: false })
        .await
        .expect("reject");

    let ev = log.terminal(&silent_id, WAIT).await;
    assert_failed(&ev, ErrorType::RunnerServerError);
    // The dispatcher handles dead letters one by one in queue order, and `reported` was dead-lettered
    // first: a second `failed` for it would sit before `silent`'s in the stream, which the log has read.
    let reported_failures: Vec<_> = log
        .of(&reported_id)
        .into_iter()
        .filter(|e| e.kind() == EventKind::Failed)
        .collect();
    assert_eq!(reported_failures.len(), 1, "{reported_failures:?}");
    assert_eq!(reported_failures[0].worker(), Some("fake"));
    wait_completed(&client, &silent, &["IN_QUEUE"]).await;
    let (status, units, body) = result(&client, &reported).await;
    assert_eq!(
        (status, units.as_deref(), body["error_type"].as_str()),
        (400, Some("0"), Some("bad_request"))
    );
    let (status, _, body) = result(&client, &silent).await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (500, Some("runner_server_error"))
    );
    // `basic.reject(requeue=false)` on a quorum queue with a DLX dead-letters (reason `rejected`).
    let mut dead = inspect_dead(&conn, &topology, 2).await;
    dead.sort();
    let mut expected = vec![
        (reported_id, "rejected".to_string()),
        (silent_id, "rejected".to_string()),
    ];
    expected.sort();
    assert_eq!(dead, expected);

    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

async fn submit_with_timeout(
    client: &reqwest::Client,
    base: &str,
    path: &str,
    prompt: &str,
    seconds: &str,
) -> Value {
    let (status, _, body) = send(
        client
            .post(format!("{base}/local/sana{path}"))
            .header("X-Fal-Request-Timeout", seconds)
            .json(&json!({ "prompt": prompt })),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn queued_request_past_its_start_deadline_times_out() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    wait_ready(&client, &d.base).await;
    let mut log = EventLog::open(&conn, &topology).await;

    let t0 = Instant::now();
    let submitted = submit_with_timeout(&client, &d.base, "", "nobody takes me", "1").await;
    // Nothing starts it: IN_QUEUE until the deadline passes.
    let done = wait_completed(&client, &submitted, &["IN_QUEUE"]).await;
    let elapsed = t0.elapsed();
    assert_eq!(done["error_type"], "request_timeout", "{done}");
    // Not before the deadline (1 s after submission); the dispatcher adds a 1 s grace.
    assert!(
        elapsed >= Duration::from_secs(1),
        "timed out after {elapsed:?}"
    );
    let (status, units, body) = result(&client, &submitted).await;
    assert_eq!(
        (status, units.as_deref(), body["error_type"].as_str()),
        (504, Some("0"), Some("request_timeout"))
    );
    let ev = log.terminal(&id(&submitted), WAIT).await;
    assert_failed(&ev, ErrorType::RequestTimeout);
    let deadline = log
        .of(&id(&submitted))
        .iter()
        .find(|e| e.kind() == EventKind::Queued)
        .and_then(|e| match &e.body {
            EventBody::Queued(queued) => queued.deadline,
            _ => None,
        })
        .expect("the queued event carries the deadline");
    assert!(
        ev.at >= deadline,
        "failed at {} before the deadline {deadline}",
        ev.at
    );
    // The job stays queued; a worker that reaches it sees the terminal event and acks it unrun.
    assert_eq!(common::http::jobs_enqueued(&conn, &topology).await, 1);

    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn started_request_is_not_timed_out() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    wait_ready(&client, &d.base).await;
    let mut log = EventLog::open(&conn, &topology).await;
    let worker = FakeWorker::new(&conn, &topology).await;

    let running = submit_with_timeout(&client, &d.base, "/sprint", "taken in time", "2").await;
    let job = worker.wait_job(&conn, EndpointKind::Sprint).await;
    assert_eq!(job.request_id, id(&running));
    worker.start(&job).await;
    // Same timeout, submitted later: its deadline comes after `running`'s, and deadlines fire in order.
    let waiting = submit_with_timeout(&client, &d.base, "/sprint", "never taken", "2").await;
    let ev = log.terminal(&id(&waiting), WAIT).await;
    assert_failed(&ev, ErrorType::RequestTimeout);

    assert_eq!(
        log.count(&id(&running), EventKind::Failed),
        0,
        "{:?}",
        log.of(&id(&running))
    );
    let (_, _, s) = send(client.get(running["status_url"].as_str().expect("url"))).await;
    assert_eq!(s["status"], "IN_PROGRESS", "{s}");
    worker.complete(&job).await;
    wait_completed(&client, &running, &["IN_PROGRESS"]).await;
    let (status, units, _) = result(&client, &running).await;
    assert_eq!(status, 200);
    assert_eq!(
        units,
        Some(job.input.billable_units().to_string()),
        "billed on success"
    );

    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}
