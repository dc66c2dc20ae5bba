//! Sending one delivery job (see the module docs of [`super`]): check the target, POST the signed body,
//! and on failure hand the job to the retry queue of its round or, when the retry window is spent or
//! the failure is permanent, to the dead queue. The job is acked only after one of those happened.

use lapin::message::Delivery;
use rand::Rng;
use reqwest::redirect::Policy;
use reqwest::StatusCode;

use super::sign::{HEADER_ID, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use super::target::{self, redact, PublicResolver, TargetError};
use super::{ack, publish, DeliveryMessage, WebhookConfig, Webhooks};
use fleet::events::now_unix;
use fleet::queue::QueueError;

/// Most bytes of a receiver's answer read (and thrown away) before the connection is dropped.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// The delivery client: no redirects, no proxies from the environment, a whole-request timeout, and
/// the public-address rule applied to every address it connects to.
pub fn client(cfg: &WebhookConfig) -> Result<reqwest::Client, reqwest::Error> {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .no_proxy()
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .dns_resolver(std::sync::Arc::new(PublicResolver {
            allow_private: cfg.allow_private,
        }))
        .user_agent(concat!("fleet-dispatcher/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// Why one attempt did not deliver.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("target refused: {0}")]
    Target(#[from] TargetError),
    #[error("receiver answered {0}")]
    Status(StatusCode),
    #[error("POST failed: {0}")]
    Transport(reqwest::Error),
}

impl Failure {
    /// Whether a later attempt may succeed. Any non-2xx answer is retried, as the spec's senders do.
    pub fn is_retryable(&self) -> bool {
        match self {
            Failure::Target(e) => e.is_retryable(),
            Failure::Status(_) => true,
            Failure::Transport(_) => true,
        }
    }

    fn label(&self) -> &'static str {
        match self {
            Failure::Target(_) => "target",
            Failure::Status(_) => "status",
            Failure::Transport(_) => "transport",
        }
    }
}

/// Handles one job of the delivery queue; an `Err` (broker trouble) puts it back on the queue.
pub(crate) async fn handle(hooks: &Webhooks<'_>, d: &Delivery) -> Result<(), QueueError> {
    let msg: DeliveryMessage = match serde_json::from_slice(&d.data) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(error = %e, "malformed webhook job dropped");
            hooks.metrics.webhooks.with_label_values(&["dead"]).inc();
            return ack(d).await;
        }
    };
    let target = redact(&msg.url);
    let (request_id, attempt) = (msg.request_id.as_str(), msg.attempt);
    let failure = match post(hooks.cfg, &hooks.http, &msg).await {
        Ok(()) => {
            ack(d).await?;
            tracing::info!(request_id, %target, attempt, "webhook delivered");
            hooks
                .metrics
                .webhooks
                .with_label_values(&["delivered"])
                .inc();
            return Ok(());
        }
        Err(f) => f,
    };
    let policy = &hooks.cfg.retry;
    let delay = policy.delay(attempt, rand::rng().random_range(0.0..=1.0));
    let window_end = msg.first_at + policy.give_up_after.as_secs_f64();
    if failure.is_retryable() && now_unix() + delay.as_secs_f64() <= window_end {
        let tier = policy.tier(attempt);
        let next = DeliveryMessage {
            attempt: attempt + 1,
            ..msg.clone()
        };
        let ttl = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX).max(1);
        publish(
            hooks.link.publisher(),
            &hooks.queues.retry(tier),
            &next,
            Some(ttl),
            None,
        )
        .await?;
        ack(d).await?;
        tracing::warn!(request_id, %target, attempt, error = %failure, retry_in = ?delay, "webhook not delivered; retrying");
        hooks.metrics.webhooks.with_label_values(&["retried"]).inc();
    } else {
        let reason = if failure.is_retryable() {
            "retry window spent"
        } else {
            failure.label()
        };
        publish(
            hooks.link.publisher(),
            &hooks.queues.dead,
            &msg,
            None,
            Some(reason),
        )
        .await?;
        ack(d).await?;
        tracing::error!(request_id, %target, attempt, error = %failure, reason, "webhook given up; dead-lettered");
        hooks.metrics.webhooks.with_label_values(&["dead"]).inc();
    }
    // Counted after the ack: a count means the job is off this dispatcher's hands.
    Ok(())
}

/// One signed POST; Ok on a 2xx answer.
async fn post(
    cfg: &WebhookConfig,
    http: &reqwest::Client,
    msg: &DeliveryMessage,
) -> Result<(), Failure> {
    let url = target::check(&msg.url, cfg.allow_private).await?;
    let timestamp = now_unix().floor() as i64;
    let mut req = http
        .post(url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(HEADER_ID, &msg.request_id)
        .header(HEADER_TIMESTAMP, timestamp.to_string());
    if let Some(secret) = &cfg.secret {
        let sig = secret.sign(&msg.request_id, timestamp, msg.body.as_bytes());
        req = req.header(HEADER_SIGNATURE, sig);
    }
    let mut resp = req
        .body(msg.body.clone())
        .send()
        .await
        .map_err(|e| Failure::Transport(e.without_url()))?;
    let status = resp.status();
    // Read a bounded part of the answer so the connection can be reused; never more.
    let mut read = 0usize;
    while read < MAX_RESPONSE_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => read += chunk.len(),
            Ok(None) | Err(_) => break,
        }
    }
    if status.is_success() {
        Ok(())
    } else {
        Err(Failure::Status(status))
    }
}
