//! Property tests (issue 10) against the real RabbitMQ: generated HTTP bodies and AMQP envelopes —
//! arbitrary JSON values, wrong types per field, unicode edge cases (NUL, lone surrogates, RTL, emoji),
//! sizes at and past every limit, oversized bodies and ids. Properties: never a 5xx or a non-JSON error;
//! every `fleet.submit` message carrying a usable id ends in exactly one event for it (`queued` or
//! `failed`); only accepted requests are enqueued; the dispatcher still serves afterwards; then a worker on
//! the real tiny pipelines runs every accepted job, each ends in exactly one terminal event, and the worker
//! still serves afterwards.
//! The generator is a seeded xorshift (override with `FLEET_FUZZ_SEED`), so a failure replays.

mod common;

use std::time::Duration;

use common::http::{jobs_enqueued, wait_ready, InProcess, WAIT};
use common::realpipe::{ObservedFactory, Probe};
use common::RunningWorker;
use fleet::events::EventKind;
use fleet::queue::Publisher;
use fleet_dispatcher::http::HttpConfig;
use lapin::BasicProperties;
use serde_json::{json, Map, Value};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn edge_string(rng: &mut Rng) -> String {
    let pieces = [
        "",
        " ",
        "\u{0}",
        "a fox\u{0}in the snow",
        "\u{202e}RTL override\u{202c}",
        "🦊🌨️👩‍👩‍👧",
        "é́",
        "\u{feff}",
        "../../evil-x",
        "square_hd",
        "jpeg",
        "sprint",
        "base",
        "low",
    ];
    match rng.below(6) {
        0 => "x".repeat(*rng.pick(&[255usize, 256, 10_000, 10_001, 70_000])),
        1 => "🦊".repeat(*rng.pick(&[128usize, 10_000, 10_001])),
        _ => rng.pick(&pieces).to_string(),
    }
}

fn number(rng: &mut Rng) -> Value {
    let n = [
        json!(0),
        json!(-1),
        json!(1),
        json!(4),
        json!(5),
        json!(14142),
        json!(14143),
        json!(944),
        json!(256),
        json!(1u64 << 63),
        json!(u64::MAX),
        json!(i64::MIN),
        json!(0.5),
        json!(1e308),
        json!(-0.0),
        json!(20.000001),
    ];
    rng.pick(&n).clone()
}

fn any_value(rng: &mut Rng, depth: u32) -> Value {
    match rng.below(if depth > 2 { 4 } else { 7 }) {
        0 => Value::Null,
        1 => Value::Bool(rng.below(2) == 0),
        2 => number(rng),
        3 => Value::String(edge_string(rng)),
        4 => Value::Array(
            (0..rng.below(4))
                .map(|_| any_value(rng, depth + 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.below(4) {
                m.insert(edge_string(rng), any_value(rng, depth + 1));
            }
            Value::Object(m)
        }
    }
}

const FIELDS: [&str; 10] = [
    "prompt",
    "negative_prompt",
    "image_size",
    "num_inference_steps",
    "seed",
    "guidance_scale",
    "enable_safety_checker",
    "num_images",
    "output_format",
    "width",
];

/// A valid input with some fields replaced by arbitrary values, or an arbitrary value outright.
fn input(rng: &mut Rng) -> Value {
    if rng.below(5) == 0 {
        return any_value(rng, 0);
    }
    let mut v = json!({"prompt": "a fox", "image_size": "square", "num_inference_steps": 2});
    for _ in 0..rng.below(3) {
        let field = *rng.pick(&FIELDS);
        let value = if field == "width" {
            json!({"width": number(rng), "height": number(rng)})
        } else {
            any_value(rng, 1)
        };
        let key = if field == "width" {
            "image_size"
        } else {
            field
        };
        v[key] = value;
    }
    v
}

/// Bytes that are not valid UTF-8 JSON in a way serde_json rejects (lone surrogate escapes, NUL bytes).
fn broken_json(rng: &mut Rng) -> Vec<u8> {
    let bodies: [&[u8]; 5] = [
        br#"{"prompt": "\ud800"}"#,
        br#"{"prompt": "a\udfff b"}"#,
        b"{\"prompt\": \"a\x00\"}",
        b"\xff\xfe{}",
        b"{\"prompt\": ",
    ];
    rng.pick(&bodies).to_vec()
}

#[tokio::test]
async fn fuzz_http_bodies_and_amqp_envelopes() {
    let seed = std::env::var("FLEET_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f1ee7u64);
    let mut rng = Rng(seed | 1);
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let mut log = common::EventLog::open(&conn, &topology).await;
    let d = InProcess::start(&topology, HttpConfig::default(), None).await;
    let client = reqwest::Client::new();
    wait_ready(&client, &d.base).await;

    // HTTP: every answer is JSON, never a server error; count what was accepted.
    let mut http_accepted = 0u32;
    let mut accepted_ids: Vec<String> = Vec::new();
    for i in 0..120 {
        let path = rng.pick(&["/local/sana", "/local/sana/sprint"]).to_string();
        let body: Vec<u8> = match rng.below(10) {
            0 => broken_json(&mut rng),
            1 if i % 4 == 1 => json!({"prompt": "x".repeat(3 << 20)})
                .to_string()
                .into_bytes(),
            _ => input(&mut rng).to_string().into_bytes(),
        };
        let resp = client
            .post(format!("{}{path}", d.base))
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .unwrap_or_else(|e| panic!("seed {seed} case {i}: {e}"));
        let status = resp.status().as_u16();
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        let text = resp.text().await.expect("body");
        let shown: String = text.chars().take(300).collect();
        let what = format!("seed {seed} case {i}: {status} {shown}");
        assert!([200, 400, 413, 422].contains(&status), "{what}");
        assert!(ct.starts_with("application/json"), "{what}");
        let parsed: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("{what}"));
        assert!(
            text.len() < 20_000,
            "{what}: answer of {} bytes",
            text.len()
        );
        if status == 200 {
            http_accepted += 1;
            assert!(parsed["request_id"].is_string(), "{what}");
            accepted_ids.push(parsed["request_id"].as_str().unwrap_or_default().into());
        }
    }

    // AMQP: each envelope carries a usable id; each must end in exactly one queued-or-failed event.
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let n = 80;
    for i in 0..n {
        let id = format!("fz-{i}");
        let mut env = Map::new();
        env.insert("request_id".into(), json!(id));
        if rng.below(8) != 0 {
            let endpoint = match rng.below(4) {
                0 => any_value(&mut rng, 1),
                _ => json!(rng.pick(&["sprint", "base"])),
            };
            env.insert("endpoint".into(), endpoint);
        }
        if rng.below(8) != 0 {
            env.insert("input".into(), input(&mut rng));
        }
        for field in ["start_timeout", "priority", "webhook_url"] {
            if rng.below(4) == 0 {
                env.insert(field.into(), any_value(&mut rng, 1));
            }
        }
        let bytes = serde_json::to_vec(&Value::Object(env)).expect("json");
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
    // Oversized and unanswerable ids: dropped, never a crash.
    for body in [
        json!({"endpoint": "sprint", "input": {"prompt": "a"}, "request_id": "i".repeat(300)}),
        json!({"endpoint": "sprint", "input": {"prompt": "a"}, "request_id": {"a": 1}}),
        json!("not an envelope"),
    ] {
        let bytes = serde_json::to_vec(&body).expect("json");
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
    // Ordered ingress: once the end marker is answered, everything before it was.
    let end = json!({"endpoint": "sprint", "request_id": "fz-end"});
    publisher
        .publish_raw(
            "",
            &topology.submit_queue(),
            &serde_json::to_vec(&end).expect("json"),
            BasicProperties::default(),
        )
        .await
        .expect("publish submit");
    log.terminal("fz-end", WAIT).await;
    let mut amqp_queued = 0;
    for i in 0..n {
        let id = format!("fz-{i}");
        let (q, f) = (
            log.count(&id, EventKind::Queued),
            log.count(&id, EventKind::Failed),
        );
        assert_eq!(
            q + f,
            1,
            "seed {seed}: {id} has {q} queued and {f} failed events"
        );
        amqp_queued += q as u32;
        if q == 1 {
            accepted_ids.push(id);
        }
    }
    assert_eq!(
        jobs_enqueued(&conn, &topology).await,
        http_accepted + amqp_queued,
        "seed {seed}: only accepted requests are enqueued"
    );

    // Still serving.
    let resp = client
        .post(format!("{}/local/sana/sprint", d.base))
        .json(&json!({"prompt": "still here"}))
        .send()
        .await
        .expect("submit");
    assert_eq!(resp.status().as_u16(), 200);
    let last: Value = resp.json().await.expect("JSON");
    accepted_ids.push(last["request_id"].as_str().expect("request_id").into());

    // A worker on the real tiny pipelines runs every accepted job: each ends in exactly one terminal event
    // (generous sizes meet the worker's image-memory budget, 64 MiB here, as `validation_error`), the
    // worker survives them all, and the last, plain request completes.
    let (probe, _freed) = Probe::new();
    let mut config = common::worker_config(&topology, "w-fuzz", common::s3_config());
    config.image_memory_budget = 64 << 20;
    let worker = RunningWorker::spawn(config, ObservedFactory::boxed(probe, None));
    let job_wait = Duration::from_secs(300);
    for id in &accepted_ids {
        let end = log.terminal(id, job_wait).await;
        assert!(
            matches!(end.kind(), EventKind::Completed | EventKind::Failed),
            "seed {seed}: {id} ended {end:?}"
        );
    }
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for id in &accepted_ids {
        let ends: Vec<_> = log
            .of(id)
            .into_iter()
            .filter(|e| matches!(e.kind(), EventKind::Completed | EventKind::Failed))
            .collect();
        assert_eq!(
            ends.len(),
            1,
            "seed {seed}: {id} has {} terminal events",
            ends.len()
        );
        let key = match ends[0].error_type() {
            Some(t) => format!("failed {t:?}"),
            None => format!("{:?}", ends[0].kind()),
        };
        *outcomes.entry(key).or_default() += 1;
    }
    eprintln!(
        "seed {seed}: {} accepted jobs ran: {outcomes:?}",
        accepted_ids.len()
    );
    let last_id = accepted_ids.last().expect("the plain request");
    assert_eq!(
        log.terminal(last_id, job_wait).await.kind(),
        EventKind::Completed,
        "the worker still serves after the fuzzed jobs"
    );
    worker.stop(job_wait).await;
    d.stop().await;
    common::drop_topology(&conn, &topology).await;
}
