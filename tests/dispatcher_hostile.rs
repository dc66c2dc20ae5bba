//! Hostile submissions against the real RabbitMQ (own uuid topology per test), issue 10: an AMQP
//! envelope with an oversized id must neither crash the dispatcher nor stay on `fleet.submit`; every
//! envelope that carries an id ends in exactly one `failed` event for it; an invalid submission reusing
//! a queued request's id leaves that request alone; request ids are validated on both paths.

mod common;

use common::http::{jobs_enqueued, send, wait_ready, InProcess, WAIT};
use fleet::events::{ErrorType, EventBody, EventKind};
use fleet::queue::Publisher;
use fleet_dispatcher::http::HttpConfig;
use lapin::BasicProperties;
use serde_json::{json, Value};

/// Publishes raw bytes on the submit queue, without a `message_id`.
async fn publish_raw_submit(
    publisher: &Publisher,
    topology: &fleet::queue::Topology,
    body: &Value,
) {
    let bytes = serde_json::to_vec(body).expect("json");
    publisher
        .publish_raw(
            "",
            &topology.submit_queue(),
            &bytes,
            BasicProperties::default(),
        )
        .await
        .expect("publish submit");
}

/// The `loc` of the first `detail[]` entry of a failed event, as a field name.
fn failed_field(ev: &fleet::events::Event) -> String {
    let EventBody::Failed(failure) = &ev.body else {
        panic!("not failed: {ev:?}");
    };
    let detail = failure.detail.clone().expect("detail[]");
    detail[0]["loc"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

#[tokio::test]
async fn amqp_long_request_id_neither_crashes_nor_poisons_the_submit_queue() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = common::EventLog::open(&conn, &topology).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let long = "L".repeat(300);
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "input": {"prompt": "a fox"}, "request_id": long}),
    )
    .await;
    // The ingress handles messages in order: once the next one is queued, the long one was dealt with.
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "input": {"prompt": "a fox"}, "request_id": "after-long"}),
    )
    .await;
    let ev = log
        .wait_for(WAIT, "the submission after the long id", |e| {
            e.request_id == "after-long"
        })
        .await;
    assert_eq!(ev.kind(), EventKind::Queued);
    let ch = conn.create_channel().await.expect("channel");
    assert_eq!(
        fleet::queue::queue_depth(&ch, &topology.submit_queue())
            .await
            .expect("depth"),
        0,
        "the long-id message must not stay on the submit queue"
    );
    assert_eq!(log.count(&long, EventKind::Queued), 0);
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn amqp_envelopes_with_an_id_always_end_in_one_failed_event() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = common::EventLog::open(&conn, &topology).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let input = json!({"prompt": "a fox"});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "no-endpoint",
            json!({"input": input, "request_id": "no-endpoint"}),
            "endpoint",
        ),
        (
            "int-endpoint",
            json!({"endpoint": 7, "input": input, "request_id": "int-endpoint"}),
            "endpoint",
        ),
        (
            "no-input",
            json!({"endpoint": "sprint", "request_id": "no-input"}),
            "input",
        ),
        (
            "42",
            json!({"endpoint": "sprint", "input": input, "request_id": 42}),
            "request_id",
        ),
        (
            "bad-timeout",
            json!({"endpoint": "sprint", "input": input, "request_id": "bad-timeout", "start_timeout": "soon"}),
            "start_timeout",
        ),
        (
            "neg-timeout",
            json!({"endpoint": "sprint", "input": input, "request_id": "neg-timeout", "start_timeout": -1}),
            "start_timeout",
        ),
        (
            "bad-hook",
            json!({"endpoint": "sprint", "input": input, "request_id": "bad-hook", "webhook_url": 5}),
            "webhook_url",
        ),
        (
            "bad-priority",
            json!({"endpoint": "sprint", "input": input, "request_id": "bad-priority", "priority": 3}),
            "priority",
        ),
        (
            "evil",
            json!({"endpoint": "sprint", "input": input, "request_id": "../../evil-x"}),
            "request_id",
        ),
    ];
    for (id, body, field) in &cases {
        publish_raw_submit(&publisher, &topology, body).await;
        let id = if *id == "evil" { "../../evil-x" } else { id };
        let ev = log.terminal(id, WAIT).await;
        assert_eq!(ev.kind(), EventKind::Failed, "{body}");
        assert_eq!(ev.error_type(), Some(ErrorType::ValidationError), "{body}");
        assert_eq!(failed_field(&ev), *field, "{body}");
    }

    // A 10 MB input is answered with a bounded echo of it, not the whole of it.
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "input": "x".repeat(10 << 20), "request_id": "huge-input"}),
    )
    .await;
    let ev = log.terminal("huge-input", WAIT).await;
    assert_eq!(ev.error_type(), Some(ErrorType::ValidationError));
    let size = serde_json::to_string(&ev).expect("json").len();
    assert!(size < 10_000, "failed event is {size} bytes");

    // An invalid submission reusing the id of a queued request must not end that request.
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "input": input, "request_id": "owner-1"}),
    )
    .await;
    log.wait_for(WAIT, "owner-1 queued", |e| {
        e.request_id == "owner-1" && e.kind() == EventKind::Queued
    })
    .await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    let status_url = format!("{}/local/sana/requests/owner-1/status", d.base);
    // Wait until the dispatcher's own view has the request (read-your-writes through the stream).
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (status, _, _) = send(client.get(&status_url)).await;
        if status == 202 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "owner-1 never visible"
        );
        tokio::task::yield_now().await;
    }
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "request_id": "owner-1"}),
    )
    .await;
    // Ordered ingress: once the marker's failure is out, the hijack attempt was handled.
    publish_raw_submit(
        &publisher,
        &topology,
        &json!({"endpoint": "sprint", "request_id": "marker-1"}),
    )
    .await;
    log.terminal("marker-1", WAIT).await;
    assert_eq!(
        log.count("owner-1", EventKind::Failed),
        0,
        "owner-1 was ended by someone else's submission"
    );
    let (status, _, body) = send(client.get(&status_url)).await;
    assert_eq!((status, body["status"].as_str()), (202, Some("IN_QUEUE")));
    for (id, _, _) in &cases {
        let id = if *id == "evil" { "../../evil-x" } else { id };
        assert_eq!(log.count(id, EventKind::Failed), 1, "{id}");
        assert_eq!(log.count(id, EventKind::Queued), 0, "{id}");
    }
    assert_eq!(
        jobs_enqueued(&conn, &topology).await,
        1,
        "only owner-1 is enqueued"
    );
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn http_request_ids_are_validated() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    let long = "x".repeat(300);
    for id in ["..%2F..%2Fevil-x", "a%20b", long.as_str()] {
        for url in [
            format!("{}/local/sana/requests/{id}/status", d.base),
            format!("{}/local/sana/requests/{id}", d.base),
        ] {
            let (status, _, body) = send(client.get(&url)).await;
            assert_eq!(status, 422, "{url}: {body}");
            assert_eq!(
                body["detail"][0]["loc"],
                json!(["path", "request_id"]),
                "{url}"
            );
        }
        let url = format!("{}/local/sana/requests/{id}/cancel", d.base);
        let (status, _, body) = send(client.put(&url)).await;
        assert_eq!(
            (status, &body["detail"][0]["loc"]),
            (422, &json!(["path", "request_id"]))
        );
    }
    // A well-formed unknown id is still a 404.
    let (status, _, _) =
        send(client.get(format!("{}/local/sana/requests/unknown-1/status", d.base))).await;
    assert_eq!(status, 404);
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

/// A 20 MB submit gets a JSON 413 over HTTP/1.1 and over HTTP/2: the dispatcher drains what the client is
/// still sending, so an HTTP/2 stream is answered, not reset. curl is the HTTP/2 client because it reports
/// the reset (exit 92, no status) where reqwest's client returns the early answer regardless.
#[tokio::test]
async fn oversized_bodies_get_a_json_413_over_http1_and_http2() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    let file = std::env::temp_dir().join(format!("fleet-20mb-{}", uuid::Uuid::new_v4()));
    std::fs::write(&file, vec![b'a'; 20_000_000]).expect("write body");
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code} %{http_version}", version])
            .args(["-H", "content-type: application/json", "--data-binary"])
            .arg(format!("@{}", file.display()))
            .arg(format!("{}/local/sana/sprint", d.base))
            .output()
            .await
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{version}: curl {:?}: {}{stdout}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, status) = stdout.rsplit_once('\n').expect("status line");
        assert!(status.starts_with("413 "), "{version}: {status}: {body}");
        let json: serde_json::Value = serde_json::from_str(body).expect("JSON body");
        assert_eq!(
            json["detail"], "Failed to buffer the request body: length limit exceeded",
            "{version}"
        );
    }
    let _ = std::fs::remove_file(&file);
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}
