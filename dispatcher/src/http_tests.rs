//! Handler tests through `Router` + `oneshot`, with the in-memory bus standing in for the broker
//! (events go straight into the registry, as the stream follower would apply them).

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;

use super::http::{router, AppState, HttpConfig};
use super::metrics::Metrics;
use super::submit::testing::MemoryBus;
use fleet::events::{
    testing, Completed, ErrorType, Event, EventBody, EventKind, Progress, Started,
};
use fleet::job::EndpointKind;

struct Harness {
    app: Router,
    bus: Arc<MemoryBus>,
    ready: Arc<watch::Sender<bool>>,
}

fn harness(cfg: HttpConfig) -> Harness {
    let bus = Arc::new(MemoryBus::default());
    let (ready, rx) = watch::channel(true);
    let metrics = Arc::new(Metrics::new().expect("metrics"));
    let state = AppState::new(cfg, bus.registry.clone(), bus.clone(), metrics, rx);
    Harness {
        app: router(state),
        bus,
        ready: Arc::new(ready),
    }
}

async fn call(
    app: &Router,
    method: Method,
    uri: &str,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (StatusCode, axum::http::HeaderMap, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(uri)
        .header("host", "api.test");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = match body {
        Some(b) => req
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => req.body(Body::empty()),
    }
    .expect("request");
    let resp = app.clone().oneshot(req).await.expect("infallible");
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .expect("body");
    let v = serde_json::from_slice(&bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    assert!(
        ![408, 409, 429].contains(&status.as_u16()),
        "fal clients retry {status}"
    );
    (status, headers, v)
}

#[tokio::test]
async fn every_validation_rule_is_a_422_naming_the_field_and_enqueues_nothing() {
    let h = harness(HttpConfig::default());
    let cases = [
        ("/local/sana", json!({}), "prompt"),
        ("/local/sana", json!({"prompt": "  "}), "prompt"),
        (
            "/local/sana",
            json!({"prompt": "x".repeat(10_001)}),
            "prompt",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "negative_prompt": "y".repeat(10_001)}),
            "negative_prompt",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "image_size": "huge"}),
            "image_size",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "image_size": {"width": 0, "height": 5}}),
            "width",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "image_size": {"width": 5, "height": 14143}}),
            "height",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "num_inference_steps": 51}),
            "num_inference_steps",
        ),
        (
            "/local/sana/sprint",
            json!({"prompt": "x", "num_inference_steps": 21}),
            "num_inference_steps",
        ),
        ("/local/sana", json!({"prompt": "x", "seed": -1}), "seed"),
        (
            "/local/sana",
            json!({"prompt": "x", "guidance_scale": 21}),
            "guidance_scale",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "enable_safety_checker": "yes"}),
            "enable_safety_checker",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "num_images": 5}),
            "num_images",
        ),
        (
            "/local/sana",
            json!({"prompt": "x", "output_format": "gif"}),
            "output_format",
        ),
    ];
    for (path, body, field) in cases {
        let (status, headers, v) = call(&h.app, Method::POST, path, Some(body.clone()), &[]).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(headers["x-fal-billable-units"], "0");
        let loc = v["detail"][0]["loc"].as_array().expect("loc");
        assert_eq!(loc.last().and_then(Value::as_str), Some(field), "{v}");
    }
    let (status, _, v) = call(
        &h.app,
        Method::POST,
        "/local/sana",
        Some(json!({"prompt": "x"})),
        &[("x-fal-queue-priority", "urgent")],
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        v["detail"][0]["loc"],
        json!(["header", "x-fal-queue-priority"])
    );
    assert!(
        h.bus.jobs.lock().expect("lock").is_empty(),
        "no job may be enqueued"
    );
    assert!(
        h.bus.events.lock().expect("lock").is_empty(),
        "no event may be published"
    );
}

#[tokio::test]
async fn submit_status_result_lifecycle() {
    let h = harness(HttpConfig::default());
    let body = json!({"prompt": "a fox", "image_size": "square_hd", "seed": 3});
    let (status, headers, first) = call(
        &h.app,
        Method::POST,
        "/local/sana/sprint?fal_webhook=http://hook.test/x",
        Some(body.clone()),
        &[
            ("x-fal-queue-priority", "low"),
            ("x-fal-request-timeout", "30"),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{first}");
    let id = first["request_id"].as_str().expect("id").to_string();
    assert_eq!(headers["x-fal-request-id"], id.as_str());
    assert_eq!(first["status"], "IN_QUEUE");
    assert_eq!(first["queue_position"], 0);
    assert_eq!(
        first["response_url"],
        format!("http://api.test/local/sana/requests/{id}")
    );
    assert_eq!(
        first["status_url"],
        format!("http://api.test/local/sana/requests/{id}/status")
    );
    assert_eq!(
        first["cancel_url"],
        format!("http://api.test/local/sana/requests/{id}/cancel")
    );
    let (_, _, second) = call(&h.app, Method::POST, "/local/sana/sprint", Some(body), &[]).await;
    assert_eq!(second["queue_position"], 1);
    {
        let jobs = h.bus.jobs.lock().expect("lock");
        assert_eq!(jobs.len(), 2);
        assert_eq!(
            (jobs[0].0.endpoint, jobs[0].1),
            (EndpointKind::Sprint, None),
            "low priority goes out unprioritised"
        );
        assert!(jobs[0].0.deadline.is_some());
    }
    let view = h.bus.registry.read(|r| r.get(&id).cloned()).expect("view");
    assert_eq!(view.webhook_url.as_deref(), Some("http://hook.test/x"));

    let status_uri = format!("/local/sana/requests/{id}/status?logs=1");
    let second_id = second["request_id"].as_str().expect("id").to_string();
    let (code, _, s) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{second_id}/status"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, s["status"].as_str(), s["queue_position"].as_u64()),
        (StatusCode::ACCEPTED, Some("IN_QUEUE"), Some(1))
    );
    assert!(
        s.get("logs").is_some_and(Value::is_null),
        "logs key present, null without ?logs"
    );

    h.bus.registry.apply(
        100,
        &Event::new(
            id.clone(),
            EndpointKind::Sprint,
            EventBody::Started(Started {
                worker: "w".into(),
                attempt: 1,
            }),
        ),
    );
    h.bus.registry.apply(
        101,
        &Event::new(
            id.clone(),
            EndpointKind::Sprint,
            EventBody::Progress(Progress {
                worker: "w".into(),
                step: 1,
                total: 2,
                message: None,
            }),
        ),
    );
    let (code, _, s) = call(&h.app, Method::GET, &status_uri, None, &[]).await;
    assert_eq!(
        (code, s["status"].as_str()),
        (StatusCode::ACCEPTED, Some("IN_PROGRESS"))
    );
    assert_eq!(s["logs"][1]["message"], "step 1/2");
    let (_, _, s2) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{second_id}/status"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        s2["queue_position"], 0,
        "position counts down once the first one started"
    );
    let (code, _, r) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{id}"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, r["detail"].as_str()),
        (
            StatusCode::BAD_REQUEST,
            Some("Request is still in progress")
        )
    );

    let result =
        json!({"images": [{"url": "http://s3/x.jpeg", "width": 1024, "height": 1024}], "seed": 3});
    h.bus.registry.apply(
        102,
        &Event::new(
            id.clone(),
            EndpointKind::Sprint,
            EventBody::Completed(Completed {
                worker: "w".into(),
                attempt: 1,
                result: result.clone(),
                billable_units: 1,
                inference_time: 0.25,
            }),
        ),
    );
    let (code, _, s) = call(&h.app, Method::GET, &status_uri, None, &[]).await;
    assert_eq!(
        (code, s["status"].as_str()),
        (StatusCode::OK, Some("COMPLETED"))
    );
    assert_eq!(s["metrics"]["inference_time"], 0.25);
    assert!(s.get("error").is_none());
    let (code, headers, r) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{id}"),
        None,
        &[],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(r, result);
    assert_eq!(headers["x-fal-billable-units"], "1");
    assert_eq!(headers["x-fal-request-id"], id.as_str());
    let (code, _, c) = call(
        &h.app,
        Method::PUT,
        &format!("/local/sana/requests/{id}/cancel"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, c["status"].as_str()),
        (StatusCode::BAD_REQUEST, Some("ALREADY_COMPLETED"))
    );
}

#[tokio::test]
async fn cancel_and_failures_map_to_error_statuses() {
    let h = harness(HttpConfig::default());
    let (_, _, sub) = call(
        &h.app,
        Method::POST,
        "/local/sana",
        Some(json!({"prompt": "x"})),
        &[],
    )
    .await;
    let id = sub["request_id"].as_str().expect("id").to_string();
    let (code, _, c) = call(
        &h.app,
        Method::PUT,
        &format!("/local/sana/requests/{id}/cancel"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, c["status"].as_str()),
        (StatusCode::ACCEPTED, Some("CANCELLATION_REQUESTED"))
    );
    let cancelled = h
        .bus
        .events
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("event");
    assert_eq!(
        (cancelled.kind(), cancelled.error_type()),
        (EventKind::Cancelled, Some(ErrorType::ClientCancelled))
    );
    let (code, headers, r) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{id}"),
        None,
        &[],
    )
    .await;
    assert_eq!(code.as_u16(), 499);
    assert_eq!(r["error_type"], "client_cancelled");
    assert_eq!(headers["x-fal-billable-units"], "0");
    let (code, _, s) = call(
        &h.app,
        Method::GET,
        &format!("/local/sana/requests/{id}/status"),
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, s["status"].as_str(), s["error_type"].as_str()),
        (StatusCode::OK, Some("COMPLETED"), Some("client_cancelled"))
    );
    let (code, _, c) = call(
        &h.app,
        Method::PUT,
        "/local/sana/requests/nope/cancel",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, c["status"].as_str()),
        (StatusCode::NOT_FOUND, Some("NOT_FOUND"))
    );
    let (code, _, _) = call(
        &h.app,
        Method::GET,
        "/local/sana/requests/nope/status",
        None,
        &[],
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);

    h.bus.registry.apply(
        50,
        &Event::failed(
            "late",
            EndpointKind::Base,
            ErrorType::RequestTimeout,
            "did not start in time",
        ),
    );
    let (code, headers, r) =
        call(&h.app, Method::GET, "/local/sana/requests/late", None, &[]).await;
    assert_eq!(
        (code.as_u16(), r["error_type"].as_str()),
        (504, Some("request_timeout"))
    );
    assert_eq!(
        headers["x-fal-request-timeout-type"], "user",
        "so fal clients do not retry it"
    );
}

#[tokio::test]
async fn api_keys_guard_everything_but_health_and_metrics() {
    let cfg = HttpConfig {
        api_keys: vec!["k1".into(), "k2".into()],
        ..HttpConfig::default()
    };
    let h = harness(cfg);
    let body = json!({"prompt": "x"});
    let (code, _, _) = call(&h.app, Method::POST, "/local/sana", Some(body.clone()), &[]).await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = call(
        &h.app,
        Method::POST,
        "/local/sana",
        Some(body.clone()),
        &[("authorization", "Key wrong")],
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = call(
        &h.app,
        Method::GET,
        "/openapi.json",
        None,
        &[("authorization", "Bearer k1")],
    )
    .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    let (code, _, _) = call(
        &h.app,
        Method::POST,
        "/local/sana",
        Some(body),
        &[("authorization", "Key k2")],
    )
    .await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(h.bus.jobs.lock().expect("lock").len(), 1);
    assert_eq!(
        call(&h.app, Method::GET, "/health", None, &[]).await.0,
        StatusCode::OK
    );
    assert_eq!(
        call(&h.app, Method::GET, "/metrics", None, &[]).await.0,
        StatusCode::OK
    );
}

#[tokio::test]
async fn health_metrics_and_openapi() {
    let h = harness(HttpConfig {
        owner: "acme".into(),
        app: "img".into(),
        ..HttpConfig::default()
    });
    h.ready.send_replace(false);
    let (code, _, v) = call(&h.app, Method::GET, "/health", None, &[]).await;
    assert_eq!(
        (code, v["status"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("replaying"))
    );
    let ready = h.ready.clone();
    let waiter = tokio::spawn({
        let app = h.app.clone();
        async move {
            call(&app, Method::GET, "/health?wait_ms=10000", None, &[])
                .await
                .0
        }
    });
    ready.send_replace(true);
    assert_eq!(
        waiter.await.expect("join"),
        StatusCode::OK,
        "long-poll returns once ready"
    );
    let (code, _, doc) = call(&h.app, Method::GET, "/openapi.json", None, &[]).await;
    assert_eq!(code, StatusCode::OK);
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/acme/img/sprint"]["post"].is_object());
    assert_eq!(
        call(
            &h.app,
            Method::POST,
            "/acme/img",
            Some(json!({"prompt": "x"})),
            &[]
        )
        .await
        .0,
        StatusCode::OK
    );
    assert_eq!(
        call(
            &h.app,
            Method::POST,
            "/local/sana",
            Some(json!({"prompt": "x"})),
            &[]
        )
        .await
        .0,
        StatusCode::NOT_FOUND
    );
    let (_, _, text) = call(&h.app, Method::GET, "/metrics", None, &[]).await;
    let text = text.as_str().expect("text").to_string();
    assert!(
        text.contains(
            r#"fleet_http_requests_total{method="POST",route="/acme/img",status="200"} 1"#
        ),
        "{text}"
    );
    assert!(
        text.contains(
            r#"fleet_submissions_total{channel="http",endpoint="base",outcome="accepted"} 1"#
        ),
        "{text}"
    );
}

#[tokio::test]
async fn status_stream_sends_each_change_until_completed() {
    let h = harness(HttpConfig::default());
    let (_, _, sub) = call(
        &h.app,
        Method::POST,
        "/local/sana/sprint",
        Some(json!({"prompt": "x"})),
        &[],
    )
    .await;
    let id = sub["request_id"].as_str().expect("id").to_string();
    let req = Request::get(format!("/local/sana/requests/{id}/status/stream?logs=1"))
        .body(Body::empty())
        .expect("req");
    let resp = h.app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.into_body().into_data_stream();
    let mut next_status = async || -> Value {
        let chunk = body.next().await.expect("an event").expect("bytes");
        let text = String::from_utf8_lossy(&chunk).into_owned();
        let data = text
            .lines()
            .find_map(|l| l.strip_prefix("data: "))
            .expect("data line");
        serde_json::from_str(data).expect("json")
    };
    assert_eq!(next_status().await["status"], "IN_QUEUE");
    h.bus.registry.apply(
        10,
        &testing::event(&id, EndpointKind::Sprint, EventKind::Started),
    );
    assert_eq!(next_status().await["status"], "IN_PROGRESS");
    h.bus.registry.apply(
        11,
        &Event::new(
            id.clone(),
            EndpointKind::Sprint,
            EventBody::Completed(Completed {
                worker: "w".into(),
                attempt: 1,
                result: json!({"images": []}),
                billable_units: 0,
                inference_time: 0.0,
            }),
        ),
    );
    let last = next_status().await;
    assert_eq!(last["status"], "COMPLETED");
    assert!(
        body.next().await.is_none(),
        "the stream ends after COMPLETED"
    );
}

#[tokio::test]
async fn oversized_bodies_get_a_json_413_and_huge_inputs_are_echoed_bounded() {
    let h = harness(HttpConfig::default());
    // Over axum's 2 MB body limit: JSON like every other error, nothing enqueued.
    let big = json!({"prompt": "x".repeat(3 << 20)});
    let (code, headers, body) = call(&h.app, Method::POST, "/local/sana", Some(big), &[]).await;
    assert_eq!(code, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(
        headers.get("content-type").and_then(|v| v.to_str().ok()),
        Some("application/json")
    );
    assert!(body["detail"].is_string(), "{body}");
    // A 1 MB prompt fits the body limit but not the schema: the 422 echoes a bounded prefix.
    let req = Request::builder()
        .method(Method::POST)
        .uri("/local/sana/sprint")
        .header("host", "api.test")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"prompt": "p".repeat(1 << 20)}).to_string(),
        ))
        .expect("request");
    let resp = h.app.clone().oneshot(req).await.expect("infallible");
    assert_eq!(resp.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 22)
        .await
        .expect("body");
    assert!(bytes.len() < 2_000, "422 body is {} bytes", bytes.len());
    let v: Value = serde_json::from_slice(&bytes).expect("json");
    assert_eq!(v["detail"][0]["loc"], json!(["body", "prompt"]));
    assert!(h.bus.jobs.lock().expect("lock").is_empty());
}

#[tokio::test]
async fn submits_answer_503_with_retry_after_while_the_broker_is_away() {
    let h = harness(HttpConfig::default());
    h.bus.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, headers, body) = call(
        &h.app,
        Method::POST,
        "/local/sana/sprint",
        Some(json!({"prompt": "x"})),
        &[],
    )
    .await;
    assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(
        headers.get("retry-after").and_then(|v| v.to_str().ok()),
        Some("2")
    );
    assert_eq!(body["error_type"], "internal_error", "{body}");
    assert!(body["detail"].is_string(), "{body}");
    h.bus.down.store(false, std::sync::atomic::Ordering::SeqCst);
    let (code, _, _) = call(
        &h.app,
        Method::POST,
        "/local/sana/sprint",
        Some(json!({"prompt": "x"})),
        &[],
    )
    .await;
    assert_eq!(
        code,
        StatusCode::OK,
        "accepted again once the broker is back"
    );
}

#[tokio::test]
async fn request_routes_wait_for_the_replay_instead_of_answering_404() {
    // Short wait: the replay does not finish, so the routes answer 503, never 404.
    let h = harness(HttpConfig {
        replay_wait: std::time::Duration::from_millis(50),
        ..HttpConfig::default()
    });
    h.ready.send_replace(false);
    for (method, path) in [
        (Method::GET, "/local/sana/requests/r-1/status"),
        (Method::GET, "/local/sana/requests/r-1"),
        (Method::PUT, "/local/sana/requests/r-1/cancel"),
        (Method::GET, "/local/sana/requests/r-1/status/stream"),
    ] {
        let (code, headers, body) = call(&h.app, method.clone(), path, None, &[]).await;
        assert_eq!(
            code,
            StatusCode::SERVICE_UNAVAILABLE,
            "{method} {path}: {body}"
        );
        assert_eq!(
            headers.get("retry-after").and_then(|v| v.to_str().ok()),
            Some("1"),
            "{method} {path}"
        );
        assert!(body["detail"].is_string(), "{method} {path}: {body}");
    }

    // Long wait: a poll during the replay answers from the complete view once the replay ends.
    let h = harness(HttpConfig {
        replay_wait: std::time::Duration::from_secs(10),
        ..HttpConfig::default()
    });
    h.ready.send_replace(false);
    let poll = tokio::spawn({
        let app = h.app.clone();
        async move {
            call(
                &app,
                Method::GET,
                "/local/sana/requests/r-2/status",
                None,
                &[],
            )
            .await
        }
    });
    let queued = testing::body(EndpointKind::Sprint, EventKind::Queued);
    use super::submit::Bus as _;
    h.bus
        .publish_event(&Event::new("r-2", EndpointKind::Sprint, queued))
        .await
        .expect("apply queued");
    h.ready.send_replace(true);
    let (code, _, body) = poll.await.expect("join");
    assert_eq!(code, StatusCode::ACCEPTED, "{body}");
    assert_eq!(body["status"], "IN_QUEUE");
}

#[tokio::test]
async fn request_routes_catch_up_with_the_stream_before_answering_404() {
    // Requests submitted on another dispatcher whose `queued` events this view has not read yet.
    let h = harness(HttpConfig::default());
    for id in ["r-status", "r-result", "r-stream", "r-cancel"] {
        queued_elsewhere(&h.bus, id);
    }
    let (code, _, body) = call(
        &h.app,
        Method::GET,
        "/local/sana/requests/r-status/status",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("IN_QUEUE")),
        "{body}"
    );
    // The catch-up read all four events; each other route is checked on a fresh view.
    for id in ["r-result", "r-stream", "r-cancel"] {
        assert!(h.bus.registry.read(|r| r.get(id).is_some()), "{id}");
    }
    let h = harness(HttpConfig::default());
    queued_elsewhere(&h.bus, "r-result");
    let (code, _, body) = call(
        &h.app,
        Method::GET,
        "/local/sana/requests/r-result",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::BAD_REQUEST, Some("IN_PROGRESS")),
        "{body}"
    );
    queued_elsewhere(&h.bus, "r-stream");
    let stream = h
        .app
        .clone()
        .oneshot(
            Request::get("/local/sana/requests/r-stream/status/stream")
                .header("host", "api.test")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("infallible");
    assert_eq!(stream.status(), StatusCode::OK);
    queued_elsewhere(&h.bus, "r-cancel");
    let (code, _, body) = call(
        &h.app,
        Method::PUT,
        "/local/sana/requests/r-cancel/cancel",
        None,
        &[],
    )
    .await;
    assert_eq!(
        (code, body["status"].as_str()),
        (StatusCode::ACCEPTED, Some("CANCELLATION_REQUESTED")),
        "{body}"
    );

    // An id no dispatcher handed out is still a 404 after catching up, and so is an unknown id while
    // the broker is away (the view answers as it stands).
    let (code, _, _) = call(
        &h.app,
        Method::GET,
        "/local/sana/requests/nope/status",
        None,
        &[],
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
    h.bus.down.store(true, std::sync::atomic::Ordering::SeqCst);
    let (code, _, _) = call(
        &h.app,
        Method::GET,
        "/local/sana/requests/nope/status",
        None,
        &[],
    )
    .await;
    assert_eq!(code, StatusCode::NOT_FOUND);
}

/// A `queued` event that another dispatcher published and this view has not read yet.
fn queued_elsewhere(bus: &MemoryBus, id: &str) {
    let queued = testing::body(EndpointKind::Sprint, EventKind::Queued);
    bus.elsewhere
        .lock()
        .expect("lock")
        .push(Event::new(id, EndpointKind::Sprint, queued));
}
