//! Two dispatcher processes side by side (the Kubernetes layout), against the real RabbitMQ with a uuid
//! topology: every request submitted with `X-Fal-Request-Timeout` that no worker takes gets exactly one
//! `request_timeout` event, whichever dispatcher accepted it, and both dispatchers answer 504 for it.
//! The timeout has one writer: the broker-side timer (`fleet::queue::DeadlineTimer`) that the broker
//! hands to one of the two dispatchers.

mod common;

use std::time::Duration;

use common::http::{send, wait_ready, Spawned, WAIT};
use common::EventLog;
use fleet::events::{ErrorType, Event, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::{Publisher, Topology};
use serde_json::{json, Value};

const REQUESTS: usize = 12;

/// Messages (ready plus unacknowledged) in `queue`, from `rabbitmqctl` of the local node (the test
/// broker, as in CI); `None` when the queue does not exist.
fn queue_messages(queue: &str) -> Option<u64> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "list_queues",
            "-q",
            "--no-table-headers",
            "name",
            "messages",
        ])
        .output()
        .expect("run rabbitmqctl list_queues");
    assert!(out.status.success(), "rabbitmqctl list_queues failed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|line| {
            let mut cols = line.split_whitespace();
            (cols.next() == Some(queue)).then(|| cols.next()?.parse().ok())?
        })
}

/// Polls until every timer left the wait queue and `{prefix}.deadlines.due` (handled and acked).
async fn wait_timers_settled(topology: &Topology, wait_queue: &str) {
    let due = topology.deadlines_due_queue();
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (waiting, fired) = (queue_messages(wait_queue), queue_messages(&due));
        if waiting.unwrap_or(0) == 0 && fired == Some(0) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timers not settled after {WAIT:?}: wait queue {waiting:?}, due queue {fired:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn two_dispatchers_time_out_each_request_exactly_once() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let a = Spawned::start(&topology, &[]).await;
    let b = Spawned::start(&topology, &[]).await;
    wait_ready(&client, &a.base).await;
    wait_ready(&client, &b.base).await;
    let mut log = EventLog::open(&conn, &topology).await;

    let mut submitted: Vec<Value> = Vec::new();
    for i in 0..REQUESTS {
        let base = if i % 2 == 0 { &a.base } else { &b.base };
        let path = if i % 3 == 0 { "/sprint" } else { "" };
        let (status, _, body) = send(
            client
                .post(format!("{base}/local/sana{path}"))
                .header("X-Fal-Request-Timeout", "1")
                .json(&json!({ "prompt": format!("nobody takes me {i}") })),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        submitted.push(body);
    }
    let ids: Vec<String> = submitted
        .iter()
        .map(|s| s["request_id"].as_str().expect("request_id").to_string())
        .collect();
    for id in &ids {
        let ev = log.terminal(id, WAIT).await;
        assert_eq!(
            (ev.kind(), ev.error_type()),
            (EventKind::Failed, Some(ErrorType::RequestTimeout)),
            "{ev:?}"
        );
    }
    // Every timer has been handled and acknowledged; then a sentinel published now lands after any
    // event either dispatcher published for them, so reading up to it shows every duplicate there is.
    wait_timers_settled(
        &topology,
        &topology.deadline_wait_queue(Duration::from_secs(1)),
    )
    .await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let sentinel = Event::failed(
        format!("sentinel-{}", uuid::Uuid::new_v4()),
        EndpointKind::Base,
        ErrorType::InternalError,
        "sentinel",
    );
    publisher
        .publish_event(&sentinel)
        .await
        .expect("publish sentinel");
    log.terminal(&sentinel.request_id, WAIT).await;

    for id in &ids {
        let terminal: Vec<_> = log
            .of(id)
            .into_iter()
            .filter(|e| e.kind().is_terminal())
            .collect();
        assert_eq!(terminal.len(), 1, "{id}: {terminal:?}");
    }
    // Both views agree: 504 request_timeout from either dispatcher, billing 0.
    for (i, s) in submitted.iter().enumerate() {
        let url = s["response_url"].as_str().expect("response_url");
        let other = if i % 2 == 0 { &b.base } else { &a.base };
        let path = url.split_once("/local/sana").expect("local/sana path").1;
        for url in [url.to_string(), format!("{other}/local/sana{path}")] {
            let (status, headers, body) = send(client.get(&url)).await;
            assert_eq!(
                (status, body["error_type"].as_str()),
                (504, Some("request_timeout")),
                "{url}: {body}"
            );
            assert_eq!(
                headers
                    .get("x-fal-billable-units")
                    .and_then(|v| v.to_str().ok()),
                Some("0")
            );
        }
    }
    assert_eq!(
        common::http::jobs_enqueued(&conn, &topology).await,
        REQUESTS as u32,
        "the jobs stay queued; a worker that reaches one acks it unrun"
    );

    a.kill().await;
    b.kill().await;
    common::drop_topology(&conn, &topology).await;
}
