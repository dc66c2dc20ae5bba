//! Two `dispatcher` processes side by side (as deploy/k8s runs them, ≥ 2 replicas behind one Service)
//! with the real worker binary on the tiny checkpoints: a request submitted on one is served by the other
//! — status (queue, progress, completion), the status stream, the result and its billing header — with the
//! same answers as the dispatcher that took it, and a cancel sent to the other one reaches the request.
//! The other one answers at once: it never says 404 for an id that was handed out (it catches up with the
//! results stream first).

mod common;

use std::time::Duration;

use common::http::{send, submit, wait_ready, Spawned, SseReader};
use common::workerproc::{self, tiny_model_args};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(180);

fn urls(base: &str, submitted: &Value) -> (String, String) {
    let id = submitted["request_id"].as_str().expect("request_id");
    (
        format!("{base}/local/sana/requests/{id}/status"),
        format!("{base}/local/sana/requests/{id}"),
    )
}

/// Polls a status URL until its `status` is `want`, failing after `WAIT`.
async fn wait_status(client: &reqwest::Client, url: &str, want: &str) -> Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, _, body) = send(client.get(url)).await;
        if body["status"] == want {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{url} never {want}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_request_submitted_on_one_dispatcher_is_served_by_the_other() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let client = reqwest::Client::new();
    let a = Spawned::start(&topology, &[]).await;
    let b = Spawned::start(&topology, &[]).await;
    wait_ready(&client, &a.base).await;
    wait_ready(&client, &b.base).await;

    // No worker yet: the request waits, and both dispatchers say so.
    let submitted = submit(
        &client,
        &a.base,
        "/sprint",
        json!({"prompt": "two dispatchers", "image_size": "square"}),
    )
    .await;
    let (status_b, result_b) = urls(&b.base, &submitted);
    let (status_a, result_a) = urls(&a.base, &submitted);
    // B answers at once, without polling: before it says an id is unknown it catches up with the
    // results stream, where A's `queued` event was confirmed before A answered the submit.
    let (code, _, queued) = send(client.get(&status_b)).await;
    assert_eq!(
        (code, queued["status"].as_str()),
        (202, Some("IN_QUEUE")),
        "{queued}"
    );
    assert_eq!(queued["queue_position"], 0, "{queued}");
    let mut stream_b = SseReader::open(&client, &format!("{status_b}/stream")).await;

    // A cancel through B of a second waiting request submitted on A, sent right after the submit.
    let second = submit(&client, &a.base, "/sprint", json!({"prompt": "cancel me"})).await;
    let id2 = second["request_id"].as_str().expect("id");
    let (code, _, body) =
        send(client.put(format!("{}/local/sana/requests/{id2}/cancel", b.base))).await;
    assert_eq!(
        (code, body["status"].as_str()),
        (202, Some("CANCELLATION_REQUESTED")),
        "{body}"
    );

    let mut args = vec!["--worker-id".to_string(), "pair-w".to_string()];
    args.extend(tiny_model_args());
    let mut worker = workerproc::spawn(&topology, &args);

    let completed = wait_status(&client, &status_b, "COMPLETED").await;
    let last = loop {
        let s = stream_b
            .next()
            .await
            .expect("the stream ends after COMPLETED, not before");
        if s["status"] == "COMPLETED" {
            break s;
        }
    };
    assert_eq!(last["status"], "COMPLETED");
    let (code_b, headers_b, body_b) = send(client.get(&result_b)).await;
    assert_eq!(code_b, 200, "{body_b}");
    assert_eq!(
        body_b["images"].as_array().map(Vec::len),
        Some(1),
        "{body_b}"
    );
    assert_eq!(headers_b["x-fal-billable-units"], "1");
    // A, which took the submit, answers the same.
    let (code_a, headers_a, body_a) = send(client.get(&result_a)).await;
    assert_eq!((code_a, &body_a), (code_b, &body_b));
    assert_eq!(
        headers_a["x-fal-billable-units"],
        headers_b["x-fal-billable-units"]
    );
    let (_, _, status_from_a) = send(client.get(&status_a)).await;
    assert_eq!(status_from_a["status"], completed["status"]);
    // The request cancelled through B ended cancelled on A.
    let cancelled_on_a = wait_status(
        &client,
        &format!("{}/local/sana/requests/{id2}/status", a.base),
        "COMPLETED",
    )
    .await;
    assert_eq!(
        cancelled_on_a["error_type"], "client_cancelled",
        "{cancelled_on_a}"
    );

    workerproc::signal(&worker, "-TERM");
    assert!(workerproc::wait_exit(&mut worker, WAIT).await.success());
    common::drop_topology(&conn, &topology).await;
}
