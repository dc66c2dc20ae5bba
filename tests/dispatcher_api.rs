//! Dispatcher against the real RabbitMQ (in-process server, own uuid topology per test): validation
//! over HTTP and AMQP enqueues nothing, queue positions count down as a worker takes jobs, the SSE
//! status stream follows a request to COMPLETED, webhooks, cancel, API keys and TLS.
//! The worker is played by the test (`FakeWorker`); the real worker is covered by the end-to-end tests.

mod common;

use std::time::Duration;

use common::http::{
    jobs_enqueued, send, submit, wait_ready, FakeWorker, InProcess, SseReader, TempDir, WAIT,
};
use fleet::events::{ErrorType, EventBody, EventKind};
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use fleet_dispatcher::http::HttpConfig;
use fleet_dispatcher::ingress::SubmitMessage;
use serde_json::{json, Value};

/// Every validation rule of contract §2, with the path and the field the 422 must name.
fn invalid_inputs() -> Vec<(&'static str, Value, &'static str)> {
    vec![
        ("base", json!({}), "prompt"),
        ("base", json!({"prompt": " \t"}), "prompt"),
        ("base", json!({"prompt": 7}), "prompt"),
        ("base", json!({"prompt": "x".repeat(10_001)}), "prompt"),
        (
            "base",
            json!({"prompt": "x", "negative_prompt": "n".repeat(10_001)}),
            "negative_prompt",
        ),
        (
            "base",
            json!({"prompt": "x", "image_size": "square_xl"}),
            "image_size",
        ),
        (
            "base",
            json!({"prompt": "x", "image_size": {"width": 0, "height": 512}}),
            "width",
        ),
        (
            "base",
            json!({"prompt": "x", "image_size": {"width": 512, "height": 14143}}),
            "height",
        ),
        (
            "base",
            json!({"prompt": "x", "image_size": {"width": 512}}),
            "height",
        ),
        (
            "base",
            json!({"prompt": "x", "num_inference_steps": 0}),
            "num_inference_steps",
        ),
        (
            "base",
            json!({"prompt": "x", "num_inference_steps": 51}),
            "num_inference_steps",
        ),
        (
            "sprint",
            json!({"prompt": "x", "num_inference_steps": 21}),
            "num_inference_steps",
        ),
        ("base", json!({"prompt": "x", "seed": -1}), "seed"),
        (
            "base",
            json!({"prompt": "x", "seed": 9_223_372_036_854_775_808u64}),
            "seed",
        ),
        (
            "base",
            json!({"prompt": "x", "guidance_scale": 20.5}),
            "guidance_scale",
        ),
        (
            "base",
            json!({"prompt": "x", "enable_safety_checker": "yes"}),
            "enable_safety_checker",
        ),
        (
            "base",
            json!({"prompt": "x", "num_images": 0}),
            "num_images",
        ),
        (
            "base",
            json!({"prompt": "x", "num_images": 5}),
            "num_images",
        ),
        (
            "base",
            json!({"prompt": "x", "output_format": "webp"}),
            "output_format",
        ),
    ]
}

fn path_of(kind: &str) -> &'static str {
    if kind == "sprint" {
        "/sprint"
    } else {
        ""
    }
}

#[tokio::test]
async fn http_validation_rejects_every_rule_and_enqueues_nothing() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    for (kind, input, field) in invalid_inputs() {
        let url = format!("{}/local/sana{}", d.base, path_of(kind));
        let (status, headers, body) = send(client.post(&url).json(&input)).await;
        assert_eq!(status, 422, "{input}: {body}");
        assert_eq!(headers["x-fal-billable-units"], "0");
        let loc = body["detail"][0]["loc"]
            .as_array()
            .expect("FastAPI detail[].loc");
        assert_eq!(loc[0], "body");
        assert_eq!(
            loc.last().and_then(Value::as_str),
            Some(field),
            "{input}: {body}"
        );
    }
    let (status, _, _) = send(
        client
            .post(format!("{}/local/sana", d.base))
            .header("content-type", "application/json")
            .body("{not json"),
    )
    .await;
    assert_eq!(status, 422);
    assert_eq!(
        jobs_enqueued(&conn, &topology).await,
        0,
        "a rejected submit must not enqueue a job"
    );
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn amqp_validation_publishes_failed_events_and_enqueues_nothing() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = common::EventLog::open(&conn, &topology).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let mut cases: Vec<(String, Value, &str)> = invalid_inputs()
        .into_iter()
        .map(|(k, input, field)| (k.to_string(), input, field))
        .collect();
    cases.push(("turbo".into(), json!({"prompt": "x"}), "endpoint"));
    for (i, (endpoint, input, field)) in cases.into_iter().enumerate() {
        let request_id = format!("bad-{i}");
        let msg = SubmitMessage {
            endpoint,
            input: input.clone(),
            request_id: Some(request_id.clone()),
            webhook_url: None,
            priority: None,
            start_timeout: None,
        };
        publisher
            .publish_submit(&msg, Some(&request_id))
            .await
            .expect("publish submit");
        let ev = log.terminal(&request_id, WAIT).await;
        assert_eq!(ev.kind(), EventKind::Failed, "{input}");
        assert_eq!(ev.error_type(), Some(ErrorType::ValidationError));
        assert_eq!(ev.billable_units(), Some(0));
        let EventBody::Failed(failure) = ev.body else {
            panic!("not failed: {ev:?}");
        };
        let detail = failure.detail.expect("detail[]");
        assert_eq!(
            detail[0]["loc"]
                .as_array()
                .and_then(|l| l.last())
                .and_then(Value::as_str),
            Some(field),
            "{input}"
        );
        assert_eq!(log.count(&request_id, EventKind::Queued), 0);
    }
    assert_eq!(
        jobs_enqueued(&conn, &topology).await,
        0,
        "no invalid submission may enqueue a job"
    );

    // A valid one goes through, and the HTTP API serves it like any other.
    let msg = SubmitMessage {
        endpoint: "sprint".into(),
        input: json!({"prompt": "a lighthouse"}),
        request_id: Some("good".into()),
        webhook_url: None,
        priority: Some("low".into()),
        start_timeout: None,
    };
    publisher
        .publish_submit(&msg, Some("good"))
        .await
        .expect("publish submit");
    let queued = log
        .wait_for(WAIT, "queued event of the valid submission", |e| {
            e.request_id == "good"
        })
        .await;
    assert_eq!(
        (queued.kind(), queued.endpoint),
        (EventKind::Queued, EndpointKind::Sprint)
    );
    let job = FakeWorker::new(&conn, &topology)
        .await
        .wait_job(&conn, EndpointKind::Sprint)
        .await;
    assert_eq!(job.request_id, "good");
    assert_eq!(job.input.prompt, "a lighthouse");
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    let (status, _, body) =
        send(client.get(format!("{}/local/sana/requests/bad-3/status", d.base))).await;
    assert_eq!(
        (status, body["status"].as_str(), body["error_type"].as_str()),
        (200, Some("COMPLETED"), Some("validation_error"))
    );
    let (status, _, body) = send(client.get(format!("{}/local/sana/requests/bad-3", d.base))).await;
    assert_eq!(status, 422);
    assert_eq!(body["detail"][0]["loc"], json!(["body", "prompt"]));
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn queue_position_counts_down_and_the_stream_follows_to_completion() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;

    // A webhook receiver, to check the POST the dispatcher sends on completion.
    let (hook_tx, mut hook_rx) = tokio::sync::mpsc::channel::<Value>(4);
    let hook_app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
            let tx = hook_tx.clone();
            async move {
                let _ = tx.send(body).await;
                "ok"
            }
        }),
    );
    let hook_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind hook");
    let hook_url = format!("http://{}/hook", hook_listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(hook_listener, hook_app).await });

    let input = json!({"prompt": "a red fox", "image_size": "square_hd", "num_images": 2});
    let first = submit(&client, &d.base, "/sprint", input.clone()).await;
    let second = submit(&client, &d.base, "/sprint", input.clone()).await;
    let third = submit(
        &client,
        &d.base,
        &format!("/sprint?fal_webhook={hook_url}"),
        input.clone(),
    )
    .await;
    let other_kind = submit(&client, &d.base, "", json!({"prompt": "a base request"})).await;
    let positions: Vec<_> = [&first, &second, &third, &other_kind]
        .iter()
        .map(|b| b["queue_position"].as_u64())
        .collect();
    assert_eq!(positions, [Some(0), Some(1), Some(2), Some(0)]);

    let third_id = third["request_id"].as_str().expect("id").to_string();
    let mut sse = SseReader::open(
        &client,
        &format!("{}?logs=1", third["status_url"].as_str().expect("url"))
            .replace("/status?", "/status/stream?"),
    )
    .await;
    let s = sse.next().await.expect("first status");
    assert_eq!(
        (s["status"].as_str(), s["queue_position"].as_u64()),
        (Some("IN_QUEUE"), Some(2))
    );

    let worker = FakeWorker::new(&conn, &topology).await;
    let mut taken = Vec::new();
    for expected in [1, 0] {
        let job = worker.take(EndpointKind::Sprint).await.expect("a job");
        worker.start(&job).await;
        let s = sse.next().await.expect("status after a job started");
        assert_eq!(
            (s["status"].as_str(), s["queue_position"].as_u64()),
            (Some("IN_QUEUE"), Some(expected)),
            "{s}"
        );
        taken.push(job);
    }
    let taken_ids: Vec<_> = taken.iter().map(|j| j.request_id.as_str()).collect();
    assert_eq!(
        taken_ids,
        [
            first["request_id"].as_str().expect("id"),
            second["request_id"].as_str().expect("id")
        ],
        "FIFO"
    );

    let job = worker.take(EndpointKind::Sprint).await.expect("third job");
    assert_eq!(job.request_id, third_id);
    assert!(worker.take(EndpointKind::Sprint).await.is_none());
    worker.start(&job).await;
    let s = sse.next().await.expect("in progress");
    assert_eq!(s["status"], "IN_PROGRESS");
    worker.step(&job, 1, 2).await;
    let s = sse.next().await.expect("progress");
    assert_eq!(
        s["logs"]
            .as_array()
            .and_then(|l| l.last())
            .and_then(|l| l["message"].as_str()),
        Some("step 1/2")
    );
    let result = worker.complete(&job).await;
    let s = sse.next().await.expect("completed");
    assert_eq!(s["status"], "COMPLETED");
    assert_eq!(s["metrics"]["inference_time"], 0.1);
    assert!(sse.next().await.is_none(), "the stream ends at COMPLETED");

    let (status, headers, body) =
        send(client.get(third["response_url"].as_str().expect("url"))).await;
    assert_eq!(status, 200);
    assert_eq!(body, result);
    assert_eq!(
        headers["x-fal-billable-units"], "2",
        "ceil(1024²/1024²) × 2 images"
    );
    let (status, _, s) = send(client.get(third["status_url"].as_str().expect("url"))).await;
    assert_eq!((status, s["status"].as_str()), (200, Some("COMPLETED")));
    let (status, _, s) = send(client.get(other_kind["status_url"].as_str().expect("url"))).await;
    assert_eq!(
        (status, s["queue_position"].as_u64()),
        (202, Some(0)),
        "the other kind's queue is separate"
    );

    let hook = tokio::time::timeout(WAIT, hook_rx.recv())
        .await
        .expect("webhook in time")
        .expect("webhook body");
    assert_eq!(hook["request_id"], third_id.as_str());
    assert_eq!(hook["status"], "OK");
    assert_eq!(hook["payload"], result);
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn cancel_of_a_queued_request_ends_it_as_client_cancelled() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = common::EventLog::open(&conn, &topology).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;
    let sub = submit(&client, &d.base, "", json!({"prompt": "never drawn"})).await;
    let id = sub["request_id"].as_str().expect("id").to_string();
    let (status, _, body) = send(client.put(sub["cancel_url"].as_str().expect("url"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (202, Some("CANCELLATION_REQUESTED"))
    );
    let ev = log.terminal(&id, WAIT).await;
    assert_eq!(
        (ev.kind(), ev.error_type()),
        (EventKind::Cancelled, Some(ErrorType::ClientCancelled))
    );

    // A worker that took the job anyway (workers skip cancelled ids) cannot revive it: first terminal wins.
    let worker = FakeWorker::new(&conn, &topology).await;
    let job = worker
        .take(EndpointKind::Base)
        .await
        .expect("the job is still in the queue");
    worker.start(&job).await;
    worker.complete(&job).await;
    // Submit answers only once the dispatcher read its own `queued` back, which the stream orders after
    // the stray completion: from here on the dispatcher has applied it.
    submit(&client, &d.base, "", json!({"prompt": "sync point"})).await;
    let (status, headers, body) =
        send(client.get(sub["response_url"].as_str().expect("url"))).await;
    assert_eq!(
        (status, body["error_type"].as_str()),
        (499, Some("client_cancelled"))
    );
    assert_eq!(headers["x-fal-billable-units"], "0");
    let (status, _, body) = send(client.put(sub["cancel_url"].as_str().expect("url"))).await;
    assert_eq!(
        (status, body["status"].as_str()),
        (400, Some("ALREADY_COMPLETED"))
    );
    let (status, _, body) =
        send(client.put(format!("{}/local/sana/requests/unknown/cancel", d.base))).await;
    assert_eq!((status, body["status"].as_str()), (404, Some("NOT_FOUND")));
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}

#[tokio::test]
async fn tls_and_api_keys() {
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let dir = TempDir::new();
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .expect("self-signed cert");
    let (cert_path, key_path) = (dir.0.join("cert.pem"), dir.0.join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).expect("write cert");
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).expect("write key");
    let http = HttpConfig {
        api_keys: vec!["test-key".into()],
        ..HttpConfig::default()
    };
    let d = InProcess::start(&topology, http, Some((cert_path, key_path))).await;
    assert!(d.base.starts_with("https://localhost:"));

    let root = reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).expect("cert");
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .timeout(Duration::from_secs(20))
        .build()
        .expect("client");
    wait_ready(&client, &d.base).await;
    let input = json!({"prompt": "over tls"});
    let (status, _, _) = send(client.post(format!("{}/local/sana", d.base)).json(&input)).await;
    assert_eq!(status, 401, "no key");
    let (status, _, _) = send(
        client
            .post(format!("{}/local/sana", d.base))
            .header("authorization", "Key nope")
            .json(&input),
    )
    .await;
    assert_eq!(status, 401, "wrong key");
    let (status, _, body) = send(
        client
            .post(format!("{}/local/sana", d.base))
            .header("authorization", "Key test-key")
            .json(&input),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(
        body["status_url"]
            .as_str()
            .expect("url")
            .starts_with("https://localhost:"),
        "URLs keep the https scheme: {body}"
    );
    let (status, _, _) = send(
        client
            .get(body["status_url"].as_str().expect("url"))
            .header("authorization", "Key test-key"),
    )
    .await;
    assert_eq!(status, 202);

    let untrusting = reqwest::Client::new();
    assert!(
        untrusting
            .get(format!("{}/health", d.base))
            .send()
            .await
            .is_err(),
        "an untrusted self-signed cert is refused"
    );
    let plain = d.base.replace("https://", "http://");
    let plain_answer = reqwest::Client::new()
        .get(format!("{plain}/health"))
        .send()
        .await;
    assert!(
        plain_answer.map(|r| r.status() != 200).unwrap_or(true),
        "plain HTTP is not served on the TLS port"
    );
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}
