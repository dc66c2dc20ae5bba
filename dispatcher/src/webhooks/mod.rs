//! Durable, signed webhooks (issue 13): fal's `fal_webhook` URL gets the request's result once it ends.
//!
//! Delivery is a job of its own, kept only in RabbitMQ, so any number of dispatchers send each webhook
//! once and a restart loses nothing:
//!
//! 1. `{prefix}.webhooks.terminal`, a quorum queue bound to the events exchange for `*.completed`,
//!    `*.failed` and `*.cancelled`, receives a copy of every terminal event. The dispatchers consume it
//!    as competing consumers, so each terminal event is handled by exactly one of them. That is the single
//!    writer of the delivery job. The alternatives were worse: every dispatcher reads the whole results
//!    stream, so enqueueing from the stream follower would enqueue N times and need a shared dedupe
//!    store; and the worker cannot do it alone because dispatchers publish terminal events too
//!    (cancel, start deadlines, dead-lettered jobs, validation). The handler waits until its own view
//!    has applied the event (a stream sync when it has not yet), takes the URL from the `queued` event
//!    and the body from the view, publishes the [`DeliveryMessage`] (confirmed) and only then acks.
//!    Duplicate terminal events (the first one wins in every reader) are recognised by their timestamp
//!    and enqueue nothing.
//! 2. `{prefix}.webhooks` holds delivery jobs; every dispatcher consumes it ([`deliver`]). A job is acked
//!    after a 2xx answer, or after it was handed on (confirmed) to a retry queue or the dead queue.
//! 3. `{prefix}.webhooks.retry.{n}` are delay queues without consumers: a message waits there for its
//!    per-message TTL and is dead-lettered (at least once) back to `{prefix}.webhooks`. A message only
//!    expires at the head of its queue, so each retry round `n` has its own queue: all its messages
//!    have delays within the same jitter band, and one long delay never holds up a short one.
//! 4. `{prefix}.webhooks.dead` keeps deliveries that were given up on (the retry window, 2 hours by
//!    default, ran out, or the target is refused); each is logged and counted in
//!    `fleet_webhook_deliveries_total{outcome="dead"}`.
//!
//! Delivery is at least once: a dispatcher killed after the receiver answered but before the ack
//! leaves the job to be sent again. Receivers dedupe on `webhook-id` (the request id), as the Standard
//! Webhooks spec asks. Deliveries are signed ([`sign`]) and only go to public http(s) targets ([`target`]).

pub mod deliver;
pub mod sign;
pub mod target;

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::state::{Outcome, RequestView, SharedRegistry};
use fleet::events::{now_unix, Event};
use fleet::queue::{self, Backoff, Link, Publisher, QueueError, StreamReader, Topology};
pub use sign::Secret;

/// Settings of webhook delivery.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Consume the terminal-event and delivery queues (a dispatcher with this off sends none).
    pub enabled: bool,
    /// Signing key; unsigned deliveries when absent.
    pub secret: Option<Secret>,
    /// Allow loopback, private and link-local targets (tests, private deployments).
    pub allow_private: bool,
    /// Whole-request timeout of one POST.
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// POSTs in flight per dispatcher (the delivery queue's prefetch).
    pub concurrency: u16,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            enabled: true,
            secret: None,
            allow_private: false,
            timeout: Duration::from_secs(10),
            retry: RetryPolicy::default(),
            concurrency: 32,
        }
    }
}

/// Exponential backoff with jitter: the `n`-th retry waits `min(initial * 2^(n-1), max_delay)` times a
/// random factor in [0.5, 1]; no retry is scheduled past `give_up_after` from the first attempt.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max_delay: Duration,
    pub give_up_after: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_secs(5),
            max_delay: Duration::from_secs(30 * 60),
            give_up_after: Duration::from_secs(2 * 3600),
        }
    }
}

/// Most retry queues declared, whatever the policy.
const MAX_TIERS: u32 = 24;

impl RetryPolicy {
    /// Undithered delay before retry `n` (1-based).
    fn base_delay(&self, n: u32) -> Duration {
        let factor = 2u32.saturating_pow(n.saturating_sub(1).min(30));
        self.initial.saturating_mul(factor).min(self.max_delay)
    }

    /// Number of retry queues: one per distinct undithered delay.
    pub fn tiers(&self) -> u32 {
        (1..MAX_TIERS)
            .find(|&n| self.base_delay(n) >= self.max_delay)
            .unwrap_or(MAX_TIERS)
    }

    /// Retry queue index of retry `n` (1-based).
    pub fn tier(&self, n: u32) -> u32 {
        n.saturating_sub(1).min(self.tiers() - 1)
    }

    /// Delay before retry `n` with `jitter` in [0, 1] (0 = half the base delay, 1 = all of it).
    pub fn delay(&self, n: u32, jitter: f64) -> Duration {
        self.base_delay(n)
            .mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

/// The webhook queues of a topology.
#[derive(Debug, Clone)]
pub struct Queues {
    pub terminal: String,
    pub deliveries: String,
    pub dead: String,
    retry_prefix: String,
    events_exchange: String,
}

impl Queues {
    pub fn new(topology: &Topology) -> Self {
        let base = format!("{}.webhooks", topology.prefix);
        Queues {
            terminal: format!("{base}.terminal"),
            dead: format!("{base}.dead"),
            retry_prefix: format!("{base}.retry."),
            deliveries: base,
            events_exchange: topology.events_exchange(),
        }
    }

    pub fn retry(&self, tier: u32) -> String {
        format!("{}{tier}", self.retry_prefix)
    }

    /// Declares every webhook queue (idempotent; arguments never change between calls).
    pub async fn declare(&self, ch: &Channel, tiers: u32) -> Result<(), QueueError> {
        let mut quorum = FieldTable::default();
        quorum.insert("x-queue-type".into(), text("quorum"));
        for name in [&self.terminal, &self.deliveries, &self.dead] {
            declare(ch, name, quorum.clone()).await?;
        }
        for kind in ["completed", "failed", "cancelled"] {
            ch.queue_bind(
                self.terminal.as_str().into(),
                self.events_exchange.as_str().into(),
                format!("*.{kind}").as_str().into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(QueueError::broker("bind the terminal-event queue"))?;
        }
        let mut delay = quorum;
        delay.insert("x-dead-letter-exchange".into(), text(""));
        delay.insert("x-dead-letter-routing-key".into(), text(&self.deliveries));
        // At-least-once dead-lettering (RabbitMQ 3.10+) needs reject-publish overflow.
        delay.insert("x-dead-letter-strategy".into(), text("at-least-once"));
        delay.insert("x-overflow".into(), text("reject-publish"));
        for tier in 0..tiers {
            declare(ch, &self.retry(tier), delay.clone()).await?;
        }
        Ok(())
    }

    /// Deletes every webhook queue (tests clean up their uuid-named topology).
    pub async fn delete(&self, ch: &Channel, tiers: u32) -> Result<(), QueueError> {
        let mut names = vec![
            self.terminal.clone(),
            self.deliveries.clone(),
            self.dead.clone(),
        ];
        names.extend((0..tiers).map(|t| self.retry(t)));
        for name in names {
            ch.queue_delete(name.as_str().into(), Default::default())
                .await
                .map_err(QueueError::broker("delete webhook queue"))?;
        }
        Ok(())
    }
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(s.into())
}

async fn declare(ch: &Channel, name: &str, args: FieldTable) -> Result<(), QueueError> {
    ch.queue_declare(name.into(), QueueDeclareOptions::durable(), args)
        .await
        .map(|_| ())
        .map_err(QueueError::broker("declare webhook queue"))
}

/// One delivery job: everything needed to POST it, so retries need no view of the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryMessage {
    pub request_id: String,
    pub url: String,
    /// The exact JSON body, signed and sent as is on every attempt.
    pub body: String,
    /// 1-based number of the next attempt.
    pub attempt: u32,
    /// Unix seconds of the first attempt's enqueueing (the retry window starts there).
    pub first_at: f64,
}

/// Publishes `msg` (persistent, `message_id` = request id, optional TTL in ms) to `queue`, confirmed.
pub(crate) async fn publish(
    publisher: &Publisher,
    queue_name: &str,
    msg: &DeliveryMessage,
    ttl_ms: Option<u64>,
    reason: Option<&str>,
) -> Result<(), QueueError> {
    let body = serde_json::to_vec(msg).map_err(QueueError::Serialize)?;
    let mut props = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2);
    // An id longer than an AMQP short string would panic the encoder; the body carries it anyway.
    if msg.request_id.len() <= 255 {
        props = props.with_message_id(msg.request_id.as_str().into());
    }
    if let Some(ms) = ttl_ms {
        props = props.with_expiration(ms.to_string().as_str().into());
    }
    if let Some(reason) = reason {
        let mut headers = FieldTable::default();
        headers.insert("x-webhook-dead-reason".into(), text(reason));
        props = props.with_headers(headers);
    }
    publisher.publish_raw("", queue_name, &body, props).await
}

/// fal's webhook payload: `{request_id, gateway_request_id, status: OK|ERROR, payload, error?}`.
pub fn webhook_body(view: &RequestView) -> Value {
    match &view.outcome {
        Some(Outcome::Succeeded { result, .. }) => json!({
            "request_id": view.request_id, "gateway_request_id": view.request_id,
            "status": "OK", "payload": result,
        }),
        Some(Outcome::Failed {
            error,
            error_type,
            detail,
        }) => json!({
            "request_id": view.request_id, "gateway_request_id": view.request_id,
            "status": "ERROR", "error": error,
            "payload": {"detail": detail.clone().unwrap_or_else(|| json!(error)), "error_type": error_type.as_str()},
        }),
        None => {
            json!({"request_id": view.request_id, "status": "ERROR", "error": "request has not finished"})
        }
    }
}

/// The two kinds of webhook work, each with its queue.
#[derive(Debug, Clone, Copy)]
enum Job {
    /// A terminal event, maybe to become a delivery job.
    Terminal,
    /// A delivery job to POST.
    Delivery,
}

/// What the webhook consumers share.
pub struct Webhooks<'a> {
    pub link: &'a Link,
    pub registry: &'a SharedRegistry,
    pub reader: &'a StreamReader,
    pub metrics: &'a super::metrics::Metrics,
    pub cfg: &'a WebhookConfig,
    pub http: reqwest::Client,
    pub queues: Queues,
}

impl<'a> Webhooks<'a> {
    pub fn new(
        link: &'a Link,
        registry: &'a SharedRegistry,
        reader: &'a StreamReader,
        metrics: &'a super::metrics::Metrics,
        cfg: &'a WebhookConfig,
    ) -> Result<Self, reqwest::Error> {
        Ok(Webhooks {
            link,
            registry,
            reader,
            metrics,
            cfg,
            http: deliver::client(cfg)?,
            queues: Queues::new(link.topology()),
        })
    }

    /// Declares the webhook queues (when enabled) before the dispatcher serves anything: a terminal
    /// event published once the dispatcher is up must find its queue bound.
    pub async fn declare(&self) -> Result<(), QueueError> {
        if !self.cfg.enabled {
            return Ok(());
        }
        self.queues
            .declare(&self.link.publisher().channel(), self.cfg.retry.tiers())
            .await
    }

    /// Runs both consumers until `shutdown` (or a permanent broker error).
    pub async fn run(&self, shutdown: &CancellationToken) -> Result<(), QueueError> {
        if !self.cfg.enabled {
            shutdown.cancelled().await;
            return Ok(());
        }
        if self.cfg.secret.is_none() {
            tracing::warn!("no --webhook-secret: webhooks are sent unsigned");
        }
        // Decisions about terminal events need the view: wait for the replay first.
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = self.reader.caught_up() => {}
        }
        tokio::try_join!(
            self.consume(Job::Terminal, 16, shutdown),
            self.consume(Job::Delivery, self.cfg.concurrency.max(1), shutdown),
        )
        .map(|_| ())
    }

    async fn handle(&self, job: Job, d: &Delivery) -> Result<(), QueueError> {
        match job {
            Job::Terminal => self.enqueue(d).await,
            Job::Delivery => deliver::handle(self, d).await,
        }
    }

    /// Turns one terminal event into a delivery job when its request asked for a webhook; see the
    /// module docs.
    async fn enqueue(&self, d: &Delivery) -> Result<(), QueueError> {
        let event: Event = match serde_json::from_slice(&d.data) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(error = %e, "malformed terminal event; no webhook");
                return ack(d).await;
            }
        };
        let id = &event.request_id;
        let applied =
            |reg: &SharedRegistry| reg.read(|r| r.get(id).is_some_and(RequestView::is_terminal));
        if !applied(self.registry) {
            // The copy in this queue can overtake the stream reader: catch up with the stream.
            self.reader.sync().await?;
        }
        let Some(view) = self.registry.read(|r| r.get(id).cloned()) else {
            return ack(d).await;
        };
        // Not the event that ended the request (a later duplicate): its winner enqueued the webhook.
        if view.finished_at != Some(event.at) {
            return ack(d).await;
        }
        let Some(url) = view.webhook_url.clone() else {
            return ack(d).await;
        };
        let msg = DeliveryMessage {
            request_id: id.clone(),
            url,
            body: webhook_body(&view).to_string(),
            attempt: 1,
            first_at: now_unix(),
        };
        publish(
            self.link.publisher(),
            &self.queues.deliveries,
            &msg,
            None,
            None,
        )
        .await?;
        tracing::debug!(request_id = %id, target = %target::redact(&msg.url), "webhook enqueued");
        ack(d).await
    }

    /// Consumes `queue_name` with `prefetch`, running up to `prefetch` handlers at once, until
    /// `shutdown`; consumes again on the link's next connection when the broker goes away. A handler's
    /// error puts its message back on the queue.
    async fn consume(
        &self,
        job: Job,
        prefetch: u16,
        shutdown: &CancellationToken,
    ) -> Result<(), QueueError> {
        let queue_name = match job {
            Job::Terminal => self.queues.terminal.as_str(),
            Job::Delivery => self.queues.deliveries.as_str(),
        };
        let mut backoff = Backoff::reconnect();
        loop {
            let conn = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                conn = self.link.connection() => conn,
            };
            let Some(conn) = conn else { return Ok(()) };
            match self
                .consume_once(&conn, job, queue_name, prefetch, shutdown)
                .await
            {
                Ok(()) => return Ok(()),
                Err(e) if e.is_retryable() => {
                    tracing::warn!(queue = queue_name, error = %e, "webhook consumer interrupted; consuming again after a pause");
                    if !backoff.wait(shutdown).await {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn consume_once(
        &self,
        conn: &Connection,
        job: Job,
        queue_name: &str,
        prefetch: u16,
        shutdown: &CancellationToken,
    ) -> Result<(), QueueError> {
        let channel = queue::open_channel(conn).await?;
        self.queues
            .declare(&channel, self.cfg.retry.tiers())
            .await?;
        let mut consumer = queue::consume(&channel, queue_name, "", prefetch).await?;
        tracing::info!(queue = queue_name, "consuming webhook jobs");
        let mut running = FuturesUnordered::new();
        let result = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break Ok(()),
                Some(()) = running.next(), if !running.is_empty() => {}
                next = consumer.next() => match next {
                    None => break Err(QueueError::Closed("webhook consumer cancelled".into())),
                    Some(Err(source)) => break Err(QueueError::Broker { op: "webhook delivery", source }),
                    Some(Ok(d)) => running.push(async move {
                        if let Err(e) = self.handle(job, &d).await {
                            tracing::warn!(queue = queue_name, error = %e, "webhook job not handled; back to the queue");
                            let requeue = BasicNackOptions { requeue: true, ..BasicNackOptions::default() };
                            if let Err(e) = d.nack(requeue).await {
                                tracing::debug!(error = %e, "requeue failed; the broker redelivers on channel close");
                            }
                        }
                    }),
                },
            }
        };
        // In-flight handlers are dropped unacknowledged: the broker hands their messages out again.
        drop(running);
        if let Err(e) = channel.close(200, "dispatcher stopping".into()).await {
            tracing::debug!(error = %e, "closing the webhook channel");
        }
        result
    }
}

pub(crate) async fn ack(d: &Delivery) -> Result<(), QueueError> {
    d.ack(BasicAckOptions::default())
        .await
        .map(|_| ())
        .map_err(QueueError::broker("basic.ack"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Registry;
    use fleet::events::{Completed, ErrorType, EventBody, EventKind};
    use fleet::job::EndpointKind;

    #[test]
    fn backoff_doubles_to_its_cap_with_jitter_and_one_queue_per_round() {
        let p = RetryPolicy::default();
        let secs: Vec<u64> = (1..=11).map(|n| p.delay(n, 1.0).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 320, 640, 1280, 1800, 1800]);
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(2500));
        assert_eq!(p.tiers(), 10);
        assert_eq!((p.tier(1), p.tier(10), p.tier(50)), (0, 9, 9));
        // The default schedule keeps retrying for the two hours and no longer.
        let total: Duration = (1..=13).map(|n| p.delay(n, 1.0)).sum();
        assert!(total > p.give_up_after, "{total:?}");
    }

    fn completed_body() -> Completed {
        match fleet::events::testing::body(EndpointKind::Sprint, EventKind::Completed) {
            EventBody::Completed(c) => c,
            other => unreachable!("testing::body(Completed) gave {other:?}"),
        }
    }

    #[test]
    fn webhook_bodies_follow_fal() {
        let mut reg = Registry::new();
        let k = EndpointKind::Sprint;
        reg.apply(
            1,
            &Event::new(
                "ok",
                k,
                EventBody::Completed(Completed {
                    result: json!({"seed": 1}),
                    ..completed_body()
                }),
            ),
        );
        reg.apply(
            2,
            &Event::failed("bad", k, ErrorType::RequestTimeout, "too late"),
        );
        let ok = webhook_body(reg.get("ok").expect("view"));
        assert_eq!(
            (ok["status"].as_str(), ok["payload"]["seed"].as_i64()),
            (Some("OK"), Some(1))
        );
        let bad = webhook_body(reg.get("bad").expect("view"));
        assert_eq!(bad["status"], "ERROR");
        assert_eq!(bad["payload"]["error_type"], "request_timeout");
    }
}
