//! The dispatcher's memory bound (issue 11): an ended request is answered for `--retention` after its
//! terminal event, then evicted and answered 404 with `error_type: request_expired` (a late event of
//! it does not bring it back); a start replays only `--replay-window` of the results stream; and a start
//! timeout whose timer would fire outside the window is refused with 422. The `dispatcher` binary
//! against the real RabbitMQ; a test worker publishes the lifecycle events.

mod common;

use std::time::Duration;

use common::faults::poll_until;
use common::http::{send, submit, wait_ready, FakeWorker, Spawned};
use fleet::events::{now_unix, Event, EventBody, Queued};
use fleet::job::EndpointKind;
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(30);

async fn status(client: &reqwest::Client, base: &str, id: &str) -> (u16, Value) {
    let (code, _, body) = send(client.get(format!("{base}/local/sana/requests/{id}/status"))).await;
    (code, body)
}

/// Publishes `queued` for a job the test made, as a dispatcher would have.
async fn publish_queued(worker: &FakeWorker, job: &fleet::events::JobMessage) {
    worker
        .publish(Event::new(
            job.request_id.clone(),
            job.endpoint,
            EventBody::Queued(Queued {
                input: job.input.clone(),
                deadline: None,
                webhook_url: None,
            }),
        ))
        .await;
}

#[tokio::test]
async fn an_ended_request_expires_after_the_retention_and_stays_expired() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = Spawned::start(&topology, &["--retention", "1s", "--replay-window", "60s"]).await;
    wait_ready(&client, &d.base).await;

    let accepted = submit(&client, &d.base, "/sprint", json!({"prompt": "kept 1 s"})).await;
    let id = accepted["request_id"].as_str().expect("id").to_string();
    let worker = FakeWorker::new(&conn, &topology).await;
    let job = worker.take(EndpointKind::Sprint).await.expect("job");
    worker.start(&job).await;
    worker.complete(&job).await;
    poll_until(WAIT, "the request to complete", || {
        let (client, base, id) = (client.clone(), d.base.clone(), id.clone());
        async move { status(&client, &base, &id).await.0 == 200 }
    })
    .await;
    let completed_at = std::time::Instant::now();

    poll_until(WAIT, "the request to expire", || {
        let (client, base, id) = (client.clone(), d.base.clone(), id.clone());
        async move { status(&client, &base, &id).await.0 == 404 }
    })
    .await;
    let expired_after = completed_at.elapsed();
    // Answered for the retention (1 s, less the poll's own lag), evicted by the sweep (every 250 ms).
    assert!(
        expired_after >= Duration::from_millis(700),
        "expired {expired_after:?} after completing"
    );
    let (_, body) = status(&client, &d.base, &id).await;
    assert_eq!(body["error_type"], "request_expired", "{body}");
    assert_eq!(body["retention_seconds"], 1, "{body}");
    let (code, _, body) = send(client.get(format!("{}/local/sana/requests/{id}", d.base))).await;
    assert_eq!(
        (code, &body["error_type"]),
        (404, &json!("request_expired"))
    );
    let (code, _, body) =
        send(client.put(format!("{}/local/sana/requests/{id}/cancel", d.base))).await;
    assert_eq!(
        (code, &body["status"]),
        (400, &json!("ALREADY_COMPLETED")),
        "an expired request is not cancellable"
    );
    // An id never seen is plain "not found".
    let (code, body) = status(&client, &d.base, "0f8fad5b-d9cb-469f-a165-70867728950e").await;
    assert_eq!(code, 404);
    assert!(body.get("error_type").is_none(), "{body}");

    // A straggler of the evicted request (a late progress) does not bring it back. The submit below
    // answers only after the dispatcher read its own `queued`, which the stream orders after it.
    worker.step(&job, 1, 2).await;
    submit(&client, &d.base, "/sprint", json!({"prompt": "sentinel"})).await;
    let (code, body) = status(&client, &d.base, &id).await;
    assert_eq!(
        (code, &body["error_type"]),
        (404, &json!("request_expired"))
    );

    // The gauges say what is held: the sentinel (queued) is the one view; one tombstone.
    let metrics = client
        .get(format!("{}/metrics", d.base))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    assert!(
        metrics.contains("fleet_dispatcher_retained{what=\"tombstones\"} 1"),
        "{metrics}"
    );
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_start_replays_only_the_window_and_keeps_what_ended_within_the_retention() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let worker = FakeWorker::new(&conn, &topology).await;

    // Written more than the window (3 s) before the dispatcher starts.
    let old = common::job(EndpointKind::Sprint, json!({"prompt": "old"}));
    publish_queued(&worker, &old).await;
    worker.start(&old).await;
    worker.complete(&old).await;
    let written = now_unix();
    // The window is wall-clock time: wait it out.
    while now_unix() < written + 4.0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Written within the window: one ended, one still queued.
    let recent = common::job(EndpointKind::Sprint, json!({"prompt": "recent"}));
    publish_queued(&worker, &recent).await;
    worker.start(&recent).await;
    worker.complete(&recent).await;
    let waiting = common::job(EndpointKind::Sprint, json!({"prompt": "waiting"}));
    publish_queued(&worker, &waiting).await;

    let d = Spawned::start(&topology, &["--retention", "3s", "--replay-window", "3s"]).await;
    wait_ready(&client, &d.base).await;
    let (code, body) = status(&client, &d.base, &recent.request_id).await;
    assert_eq!(
        (code, &body["status"]),
        (200, &json!("COMPLETED")),
        "{body}"
    );
    let (code, body) = status(&client, &d.base, &waiting.request_id).await;
    assert_eq!((code, &body["status"]), (202, &json!("IN_QUEUE")), "{body}");
    // Not replayed at all: plain 404. (Replayed and evicted it would say `request_expired`.)
    let (code, body) = status(&client, &d.base, &old.request_id).await;
    assert_eq!(code, 404, "{body}");
    assert!(body.get("error_type").is_none(), "{body}");
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn a_start_timeout_beyond_the_replay_window_is_refused() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let d = Spawned::start(&topology, &["--retention", "10s", "--replay-window", "10s"]).await;
    wait_ready(&client, &d.base).await;
    let url = format!("{}/local/sana/sprint", d.base);
    let body = json!({"prompt": "a timeout"});
    // 8 s + 1 s grace fires within 10 s; 10 s does not.
    let (code, _, ok) = send(
        client
            .post(&url)
            .header("X-Fal-Request-Timeout", "8")
            .json(&body),
    )
    .await;
    assert_eq!(code, 200, "{ok}");
    let (code, _, refused) = send(
        client
            .post(&url)
            .header("X-Fal-Request-Timeout", "10")
            .json(&body),
    )
    .await;
    assert_eq!(code, 422, "{refused}");
    assert_eq!(
        refused["detail"][0]["loc"],
        json!(["header", "x-fal-request-timeout"]),
        "{refused}"
    );
    d.kill().await;
    common::drop_topology(&conn, &topology).await;
}
