//! Following the `fleet.results` stream into the [`SharedRegistry`] (service-contract §5), and
//! delivering fal webhooks when a request finishes.
//!
//! The follower is a sink of the dispatcher's one reader of the stream (`fleet::queue::StreamReader`,
//! beside the deadline watch): the reader replays from `first`, and the follower flips `ready` when the
//! replay is complete: from then on the view holds everything published before the dispatcher started. Webhooks are POSTed for requests that finish after that point, and for
//! those whose terminal event is younger than `webhook_replay_window` when replayed (so a restart
//! does not lose the webhooks of requests that finished while it was down, without re-sending old ones).
//! Every dispatcher that has webhooks enabled sends them: like fal's, delivery is at least once.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::sync::watch;

use super::metrics::Metrics;
use super::state::{Applied, Outcome, RequestView, SharedRegistry};
use fleet::events::{now_unix, Event};
use fleet::job::EndpointKind;
use fleet::queue::EventSink;

/// Settings of webhook delivery.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub enabled: bool,
    /// Seconds: replayed terminal events younger than this still get their webhook.
    pub replay_window: f64,
    pub timeout: Duration,
    pub attempts: u32,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            enabled: true,
            replay_window: 300.0,
            timeout: Duration::from_secs(10),
            attempts: 3,
        }
    }
}

/// What the follower needs: where it applies events, and where it reports.
pub struct Follower {
    pub registry: SharedRegistry,
    pub metrics: Arc<Metrics>,
    pub webhooks: WebhookConfig,
    pub http: reqwest::Client,
    /// Set to true once the replay is complete.
    pub ready: watch::Sender<bool>,
}

impl EventSink for Follower {
    fn apply(&self, offset: u64, event: &Event, live: bool) {
        self.follow(offset, event, live);
    }

    fn caught_up(&self) {
        let n = self.registry.read(|r| r.len());
        tracing::info!(requests = n, "replay complete");
        self.ready.send_replace(true);
    }
}

impl Follower {
    fn follow(&self, offset: u64, event: &Event, live: bool) {
        let applied = self.registry.apply(offset, event);
        self.metrics.observe_event(event);
        for kind in EndpointKind::ALL {
            let n = self.registry.read(|r| r.queued_count(kind));
            self.metrics
                .in_queue
                .with_label_values(&[kind.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if applied != Applied::Finished || !self.webhooks.enabled {
            return;
        }
        let recent = now_unix() - event.at <= self.webhooks.replay_window;
        if !(live || recent) {
            return;
        }
        let Some(view) = self.registry.read(|r| r.get(&event.request_id).cloned()) else {
            return;
        };
        let Some(url) = view.webhook_url.clone() else {
            return;
        };
        let client = self.http.clone();
        let metrics = self.metrics.clone();
        let cfg = self.webhooks.clone();
        tokio::spawn(async move {
            let outcome = deliver(&client, &url, &webhook_body(&view), &cfg).await;
            metrics.webhooks.with_label_values(&[outcome]).inc();
        });
    }
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

/// POSTs `body` with bounded retries (exponential backoff between attempts); returns the metric label.
async fn deliver(
    client: &reqwest::Client,
    url: &str,
    body: &Value,
    cfg: &WebhookConfig,
) -> &'static str {
    let mut backoff = Duration::from_millis(500);
    for attempt in 1..=cfg.attempts.max(1) {
        match client
            .post(url)
            .timeout(cfg.timeout)
            .json(body)
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => return "delivered",
            Ok(resp) => tracing::warn!(url, attempt, status = %resp.status(), "webhook rejected"),
            Err(e) => tracing::warn!(url, attempt, error = %e, "webhook POST failed"),
        }
        if attempt < cfg.attempts {
            tokio::time::sleep(backoff).await;
            backoff *= 2;
        }
    }
    "failed"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::Registry;
    use fleet::events::{Completed, ErrorType, EventBody, EventKind};

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
