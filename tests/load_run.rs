//! Load run (issue 11): one real `dispatcher` and four real `worker` processes (CPU, the tiny random-weight
//! checkpoints) on the shared RabbitMQ and Garage, under a burst of 2000 sprint requests: 1000 over HTTP
//! (`POST /local/sana/sprint`) and 1000 published straight onto the AMQP ingress queue `{prefix}.submit`,
//! interleaved, with at most 32 submits in flight. It prints (and writes to
//! `bench/results/2026-12-06-load-run.md`) submit latency, queue wait, end-to-end time, inference time,
//! service overhead, the dispatcher's RSS, and checks that the queue position of 50 sampled requests
//! never increases while they wait and that every accepted request ends in exactly one terminal event
//! with one set of objects (lost = 0, duplicated = 0). The figures are printed, not asserted.
//!
//! By hand (`#[ignore]`d; several minutes on 2 cores):
//! `eval "$(bash .ci/garage-up.sh)" && cargo test --test load_run -- --ignored --nocapture`.
//! `LOAD_RUN_REQUESTS=N` runs a smaller burst (half HTTP, half AMQP); the results file is then not written.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::faults::{poll_until, spawn_dispatcher, spawn_worker, Tally};
use common::EventLog;
use fleet::events::{now_unix, EventBody};
use fleet::job::EndpointKind;
use fleet::queue::Publisher;
use futures::StreamExt;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

/// Requests of the full run (half over HTTP, half over AMQP).
const REQUESTS: usize = 2000;
const WORKERS: usize = 4;
/// Submits in flight at once (both channels together).
const IN_FLIGHT: usize = 32;
/// Requests whose queue position is polled while they wait.
const SAMPLED: usize = 50;
/// Pause between two polling rounds over the sampled requests.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Smallest image size the input validation allows (the tiny pipeline generates at its 512 bin and
/// resizes), one image, the sprint default of 2 steps.
const WIDTH: u32 = 1;
const HEIGHT: u32 = 1;
/// Longest wait for the next terminal event (not for the whole run).
const NEXT_EVENT: Duration = Duration::from_secs(300);
const RESULTS_FILE: &str = "bench/results/2026-12-06-load-run.md";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    Http,
    Amqp,
}

/// One accepted submit, as the client saw it.
#[derive(Debug)]
struct Submitted {
    id: String,
    via: Via,
    /// Unix seconds when the submit was sent.
    sent_at: f64,
    /// HTTP: request → 200. AMQP: publish → broker confirm of the submit message.
    latency: f64,
}

/// What the polling of one sampled request saw.
#[derive(Debug, Default)]
struct Track {
    positions: Vec<u64>,
    not_found: usize,
    left_queue: bool,
}

fn input(i: usize) -> Value {
    json!({
        "prompt": format!("load run {i}"),
        "image_size": {"width": WIDTH, "height": HEIGHT},
        "num_images": 1,
        "seed": i,
    })
}

async fn submit_http(client: &reqwest::Client, base: &str, i: usize) -> Result<Submitted, String> {
    let sent_at = now_unix();
    let t0 = Instant::now();
    let resp = client
        .post(format!("{base}/local/sana/sprint"))
        .json(&input(i))
        .timeout(Duration::from_secs(60))
        .send()
        .await
        .map_err(|e| format!("POST {i}: {e}"))?;
    let code = resp.status().as_u16();
    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
    let latency = t0.elapsed().as_secs_f64();
    if code != 200 {
        return Err(format!("POST {i}: {code} {body}"));
    }
    let id = body["request_id"]
        .as_str()
        .ok_or_else(|| format!("POST {i}: no request_id in {body}"))?;
    Ok(Submitted {
        id: id.to_string(),
        via: Via::Http,
        sent_at,
        latency,
    })
}

async fn submit_amqp(publisher: &Publisher, i: usize) -> Result<Submitted, String> {
    let id = format!("load-{}", uuid::Uuid::new_v4().simple());
    let msg = json!({"endpoint": "sprint", "input": input(i), "request_id": id});
    let sent_at = now_unix();
    let t0 = Instant::now();
    publisher
        .publish_submit(&msg, Some(&id))
        .await
        .map_err(|e| format!("publish {i}: {e}"))?;
    Ok(Submitted {
        id,
        via: Via::Amqp,
        sent_at,
        latency: t0.elapsed().as_secs_f64(),
    })
}

/// `VmRSS` of a process in bytes.
fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Consumers on `queue`, from a passive declare.
async fn consumers(conn: &lapin::Connection, queue: &str) -> u32 {
    let ch = conn.create_channel().await.expect("channel");
    let opts = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let n = ch
        .queue_declare(queue.into(), opts, FieldTable::default())
        .await
        .map(|q| q.consumer_count())
        .unwrap_or(0);
    let _ = ch.close(200, "probe".into()).await;
    n
}

/// p50, p99 and max (nearest rank) of `xs`, in milliseconds; `None` when empty.
fn stats(xs: &[f64]) -> Option<(f64, f64, f64)> {
    if xs.is_empty() {
        return None;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |q: f64| v[((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1] * 1000.0;
    Some((rank(0.50), rank(0.99), v[v.len() - 1] * 1000.0))
}

/// Per request: the first `queued`, `started`, `completed` times and the worker's inference time.
#[derive(Debug, Default)]
struct Timeline {
    queued: Option<f64>,
    started: Option<f64>,
    completed: Option<f64>,
    inference: Option<f64>,
    starts: usize,
}

#[tokio::test]
#[ignore = "load run, by hand: cargo test --test load_run -- --ignored --nocapture"]
async fn load_run() {
    let total: usize = std::env::var("LOAD_RUN_REQUESTS")
        .ok()
        .map(|s| s.parse().expect("LOAD_RUN_REQUESTS is a number"))
        .unwrap_or(REQUESTS);
    let run_started = Instant::now();
    let url = common::amqp_url();
    let conn = common::connect().await;
    let topology = common::fresh_topology(&conn).await;
    let s3 = common::s3_config();

    let mut workers: Vec<_> = (0..WORKERS)
        .map(|n| {
            spawn_worker(
                &url,
                &topology,
                &s3,
                &format!("w-load-{n}"),
                &["--retry-backoff-ms", "0"],
            )
        })
        .collect();
    let (mut dispatcher, base) = spawn_dispatcher(&url, &topology).await;
    let pid = dispatcher.id().expect("dispatcher pid");
    let client = reqwest::Client::new();
    common::http::wait_ready(&client, &base).await;
    // The clock starts once every worker has loaded its models and consumes the sprint queue.
    let sprint_queue = topology.job_queue(EndpointKind::Sprint);
    poll_until(
        Duration::from_secs(300),
        "4 workers consuming the sprint queue",
        || {
            let (conn, q) = (&conn, sprint_queue.clone());
            async move { consumers(conn, &q).await as usize >= WORKERS }
        },
    )
    .await;
    let rss_start = rss_bytes(pid).expect("dispatcher RSS");
    let rss_peak = Arc::new(AtomicU64::new(rss_start));
    let stop = CancellationToken::new();
    let sampler = tokio::spawn({
        let (peak, stop) = (rss_peak.clone(), stop.clone());
        async move {
            while !stop.is_cancelled() {
                if let Some(rss) = rss_bytes(pid) {
                    peak.fetch_max(rss, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });

    // Queue positions of the sampled requests, polled from the moment they are accepted until they
    // leave IN_QUEUE (or the run ends).
    let (sample_tx, mut sample_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let poller = tokio::spawn({
        let (client, base, stop) = (client.clone(), base.clone(), stop.clone());
        async move {
            let mut tracks: HashMap<String, Track> = HashMap::new();
            let mut active: Vec<String> = Vec::new();
            let mut inflow_open = true;
            let mut polls = 0usize;
            while !stop.is_cancelled() {
                loop {
                    match sample_rx.try_recv() {
                        Ok(id) => {
                            tracks.insert(id.clone(), Track::default());
                            active.push(id);
                        }
                        Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                        Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                            inflow_open = false;
                            break;
                        }
                    }
                }
                if !inflow_open && active.is_empty() {
                    break;
                }
                let mut still = Vec::new();
                for id in active.drain(..) {
                    let resp = client
                        .get(format!("{base}/local/sana/sprint/requests/{id}/status"))
                        .timeout(Duration::from_secs(30))
                        .send()
                        .await
                        .expect("GET status");
                    polls += 1;
                    let code = resp.status().as_u16();
                    let body = resp.json::<Value>().await.unwrap_or(Value::Null);
                    let track = tracks.get_mut(&id).expect("tracked");
                    match (code, body["status"].as_str()) {
                        (404, _) => {
                            track.not_found += 1;
                            still.push(id);
                        }
                        (_, Some("IN_QUEUE")) => {
                            let pos = body["queue_position"]
                                .as_u64()
                                .unwrap_or_else(|| panic!("IN_QUEUE without a position: {body}"));
                            track.positions.push(pos);
                            still.push(id);
                        }
                        (_, Some("IN_PROGRESS" | "COMPLETED")) => track.left_queue = true,
                        _ => panic!("status of {id}: {code} {body}"),
                    }
                }
                active = still;
                tokio::time::sleep(POLL_EVERY).await;
            }
            (tracks, polls)
        }
    });

    // The burst: even indices over HTTP, odd ones over AMQP, at most IN_FLIGHT at once.
    let publisher = Publisher::new(&conn, topology.clone())
        .await
        .expect("publisher");
    let stride = (total / SAMPLED).max(1);
    let burst_started = Instant::now();
    let results: Vec<Result<Submitted, String>> = futures::stream::iter(0..total)
        .map(|i| {
            let (client, base, publisher, sample_tx) =
                (&client, &base, &publisher, sample_tx.clone());
            async move {
                let r = if i % 2 == 0 {
                    submit_http(client, base, i).await
                } else {
                    submit_amqp(publisher, i).await
                };
                if let Ok(s) = &r {
                    if i % stride == stride / 2 {
                        let _ = sample_tx.send(s.id.clone());
                    }
                }
                r
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    drop(sample_tx);
    let burst_took = burst_started.elapsed();
    let mut submitted = Vec::new();
    let mut refused = Vec::new();
    for r in results {
        match r {
            Ok(s) => submitted.push(s),
            Err(e) => refused.push(e),
        }
    }
    if !refused.is_empty() {
        println!(
            "load_run: {} submits refused, first: {}",
            refused.len(),
            refused[0]
        );
    }

    // Every accepted request's terminal event, then a marker event after them, so that a late duplicate
    // published before the marker is counted.
    let mut log = EventLog::open(&conn, &topology).await;
    let mut pending: HashSet<&str> = submitted.iter().map(|s| s.id.as_str()).collect();
    pending.retain(|id| {
        !log.seen
            .iter()
            .any(|(_, e)| e.request_id == *id && e.kind().is_terminal())
    });
    while !pending.is_empty() {
        let ev = log
            .next_matching(
                NEXT_EVENT,
                &format!("terminal events ({} to go)", pending.len()),
                |e| e.kind().is_terminal(),
            )
            .await;
        pending.remove(ev.request_id.as_str());
    }
    let all_done = burst_started.elapsed();
    let probe = format!("load-end-{}", uuid::Uuid::new_v4().simple());
    publisher
        .publish_event(&fleet::events::Event::cancelled(
            probe.clone(),
            EndpointKind::Sprint,
        ))
        .await
        .expect("end marker");
    log.terminal(&probe, NEXT_EVENT).await;
    stop.cancel();
    let (tracks, polls) = poller.await.expect("poller");
    sampler.await.expect("RSS sampler");
    let rss_end = rss_bytes(pid).expect("dispatcher RSS at the end");
    let rss_peak = rss_peak.load(Ordering::Relaxed).max(rss_end);

    // Timelines from the stream.
    let mut lines: HashMap<&str, Timeline> = HashMap::new();
    for (_, e) in &log.seen {
        let t = lines.entry(e.request_id.as_str()).or_default();
        match &e.body {
            EventBody::Queued(_) => {
                t.queued.get_or_insert(e.at);
            }
            EventBody::Started(_) => {
                t.starts += 1;
                t.started.get_or_insert(e.at);
            }
            EventBody::Completed(c) => {
                t.completed.get_or_insert(e.at);
                t.inference.get_or_insert(c.inference_time);
            }
            _ => {}
        }
    }
    let mut submit_http_s = Vec::new();
    let mut submit_amqp_confirm = Vec::new();
    let mut submit_amqp_queued = Vec::new();
    let (mut wait, mut inference, mut run, mut e2e, mut overhead) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut overhead_no_wait, mut worker_extra) = (Vec::new(), Vec::new());
    let mut generations = 0usize;
    let mut last_completed = f64::MIN;
    let first_sent = submitted.iter().map(|s| s.sent_at).fold(f64::MAX, f64::min);
    for s in &submitted {
        let t = lines.get(s.id.as_str());
        match s.via {
            Via::Http => submit_http_s.push(s.latency),
            Via::Amqp => {
                submit_amqp_confirm.push(s.latency);
                if let Some(q) = t.and_then(|t| t.queued) {
                    submit_amqp_queued.push(q - s.sent_at);
                }
            }
        }
        let Some(t) = t else { continue };
        generations += t.starts;
        if let (Some(q), Some(st)) = (t.queued, t.started) {
            wait.push(st - q);
        }
        if let (Some(st), Some(c)) = (t.started, t.completed) {
            run.push(c - st);
        }
        if let (Some(c), Some(inf)) = (t.completed, t.inference) {
            inference.push(inf);
            e2e.push(c - s.sent_at);
            overhead.push(c - s.sent_at - inf);
            last_completed = last_completed.max(c);
            if let (Some(q), Some(st)) = (t.queued, t.started) {
                overhead_no_wait.push(c - s.sent_at - inf - (st - q));
                worker_extra.push(c - st - inf);
            }
        }
    }

    let tally = Tally::count(
        &submitted.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
        &log.seen,
        &s3,
        EndpointKind::Sprint,
        1,
    )
    .await;

    // Queue positions: monotone non-increasing while IN_QUEUE.
    let mut increases = Vec::new();
    let (mut observed, mut sampled_waiting, mut max_pos, mut drops) = (0usize, 0usize, 0u64, 0u64);
    for (id, t) in &tracks {
        observed += t.positions.len();
        if !t.positions.is_empty() {
            sampled_waiting += 1;
            max_pos = max_pos.max(t.positions[0]);
            drops += t.positions[0].saturating_sub(t.positions[t.positions.len() - 1]);
        }
        if t.positions.windows(2).any(|w| w[1] > w[0]) {
            increases.push(format!("{id}: {:?}", t.positions));
        }
    }
    let never_left = tracks.values().filter(|t| !t.left_queue).count();
    let not_found: usize = tracks.values().map(|t| t.not_found).sum();

    let throughput = tally.completed as f64 / (last_completed - first_sent).max(1e-9);
    let row = |name: &str, what: &str, xs: &[f64]| -> String {
        match stats(xs) {
            Some((p50, p99, max)) => format!(
                "| {name} | {what} | {} | {p50:.1} | {p99:.1} | {max:.1} |",
                xs.len()
            ),
            None => format!("| {name} | {what} | 0 | – | – | – |"),
        }
    };
    let table = [
        "| metric | measured as | n | p50 ms | p99 ms | max ms |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
        row("submit, HTTP", "POST → 200 (client clock)", &submit_http_s),
        row(
            "submit, AMQP",
            "publish → broker confirm of the submit message",
            &submit_amqp_confirm,
        ),
        row(
            "submit, AMQP",
            "publish → `queued` event `at` (dispatcher clock, same host)",
            &submit_amqp_queued,
        ),
        row("queue wait", "`queued.at` → `started.at`", &wait),
        row(
            "inference",
            "`completed.inference_time` (worker's own)",
            &inference,
        ),
        row("run", "`started.at` → `completed.at`", &run),
        row("end-to-end", "submit sent → `completed.at`", &e2e),
        row(
            "service overhead",
            "end-to-end − `inference_time`",
            &overhead,
        ),
        row(
            "service overhead, queue wait excluded",
            "end-to-end − queue wait − `inference_time`",
            &overhead_no_wait,
        ),
        row(
            "worker overhead",
            "`started.at` → `completed.at` − `inference_time` (encode, upload, events)",
            &worker_extra,
        ),
    ]
    .join("\n");
    let summary = format!(
        "- date: 2026-12-06; machine: 2-core CI VM, 24 GiB; RabbitMQ and Garage shared, on the same VM\n\
         - 1 dispatcher, {WORKERS} workers (CPU, tiny random-weight checkpoints, `--max-concurrency 1`), \
         sprint, {WIDTH}×{HEIGHT}, 1 image, 2 steps\n\
         - requests: {total} ({} over HTTP, {} over AMQP), at most {IN_FLIGHT} submits in flight; \
         accepted {}, refused {}\n\
         - tally: completed {}, failed {} {:?}, lost {}, duplicated {}; {generations} `started` events \
         (generations)\n\
         - burst submitted in {:.1} s; all terminal in {:.1} s; throughput {throughput:.2} completed/s \
         (first submit → last `completed`)\n\
         - dispatcher RSS (VmRSS): start {:.1} MiB, peak {:.1} MiB, end {:.1} MiB (sampled every 100 ms)\n\
         - queue positions: {} sampled requests polled every {} ms while IN_QUEUE ({} seen waiting, {observed} \
         positions read, {polls} status polls, {not_found} answers 404 before the view had them); \
         largest position seen {max_pos}, positions dropped by {drops} in total; increases: {}; \
         never seen leaving IN_QUEUE: {never_left}\n\
         - whole test, processes started to end: {:.1} s",
        total.div_ceil(2),
        total / 2,
        submitted.len(),
        refused.len(),
        tally.completed,
        tally.failed,
        tally.failures,
        tally.lost,
        tally.duplicated,
        burst_took.as_secs_f64(),
        all_done.as_secs_f64(),
        mib(rss_start),
        mib(rss_peak),
        mib(rss_end),
        tracks.len(),
        POLL_EVERY.as_millis(),
        sampled_waiting,
        increases.len(),
        run_started.elapsed().as_secs_f64(),
    );
    println!("\nload_run:\n{summary}\n\n{table}\n");
    if total == REQUESTS {
        let doc = format!(
            "# Load run (issue 11), 2-core CI VM, 2026-12-06\n\n\
             `cargo test --test load_run -- --ignored --nocapture` (`tests/load_run.rs`).\n\n\
             {summary}\n\n{table}\n"
        );
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(RESULTS_FILE);
        std::fs::create_dir_all(path.parent().expect("results dir")).expect("results dir");
        std::fs::write(&path, doc).expect("write the results file");
        println!("written to {}", path.display());
    }

    assert!(
        dispatcher.try_wait().expect("poll dispatcher").is_none(),
        "dispatcher exited"
    );
    for w in &mut workers {
        assert!(
            w.try_wait().expect("poll worker").is_none(),
            "worker exited"
        );
    }
    assert!(
        increases.is_empty(),
        "queue positions increased: {increases:?}"
    );
    assert!(refused.is_empty(), "submits refused: {refused:?}");
    assert_eq!(tally.accepted, total);
    assert_eq!((tally.lost, tally.duplicated), (0, 0), "{tally:?}");
    for w in &mut workers {
        let _ = w.kill().await;
    }
    let _ = dispatcher.kill().await;
    common::drop_topology(&conn, &topology).await;
}
