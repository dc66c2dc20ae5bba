//! Prometheus metrics of the dispatcher (`GET /metrics`).
//!
//! Names carry the `fleet_` prefix and a unit suffix; labels stay low-cardinality (route template,
//! method, status code, endpoint kind, channel, outcome, event, error type), never request ids.
//! Each `Metrics` owns its own `prometheus::Registry`, so several dispatchers in one test process
//! do not collide.

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use fleet::events::Event;
use fleet::job::EndpointKind;

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub http_in_flight: IntGauge,
    pub submissions: IntCounterVec,
    pub events: IntCounterVec,
    pub in_queue: IntGaugeVec,
    pub webhooks: IntCounterVec,
    /// What the dispatcher holds in memory: `views` (requests answered), `ended` (of which ended,
    /// evicted after the retention), `tombstones` (evicted ids kept for the replay window).
    pub retained: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new(
                "fleet_http_requests_total",
                "HTTP requests answered, by route template, method and status",
            ),
            &["route", "method", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "fleet_http_request_duration_seconds",
                "HTTP handling time by route template",
            ),
            &["route"],
        )?;
        let http_in_flight = IntGauge::new(
            "fleet_http_in_flight_requests",
            "HTTP requests being handled",
        )?;
        let submissions = IntCounterVec::new(
            Opts::new(
                "fleet_submissions_total",
                "Submissions by endpoint, channel (http|amqp) and outcome",
            ),
            &["endpoint", "channel", "outcome"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "fleet_events_total",
                "Lifecycle events read from the result stream",
            ),
            &["endpoint", "event", "error_type"],
        )?;
        let in_queue = IntGaugeVec::new(
            Opts::new(
                "fleet_requests_in_queue",
                "Requests waiting for a worker, per endpoint",
            ),
            &["endpoint"],
        )?;
        let webhooks = IntCounterVec::new(
            Opts::new(
                "fleet_webhook_deliveries_total",
                "Webhook delivery attempts by outcome (delivered, retried, dead)",
            ),
            &["outcome"],
        )?;
        let retained = IntGaugeVec::new(
            Opts::new(
                "fleet_dispatcher_retained",
                "Requests held in memory: views, ended (evicted after the retention), tombstones",
            ),
            &["what"],
        )?;
        registry.register(Box::new(retained.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(http_in_flight.clone()))?;
        registry.register(Box::new(submissions.clone()))?;
        registry.register(Box::new(events.clone()))?;
        registry.register(Box::new(in_queue.clone()))?;
        registry.register(Box::new(webhooks.clone()))?;
        for kind in EndpointKind::ALL {
            in_queue.with_label_values(&[kind.as_str()]).set(0);
        }
        Ok(Metrics {
            registry,
            http_requests,
            http_duration,
            http_in_flight,
            submissions,
            events,
            in_queue,
            webhooks,
            retained,
        })
    }

    pub fn observe_event(&self, ev: &Event) {
        let error_type = ev.error_type().map_or("", |e| e.as_str());
        self.events
            .with_label_values(&[ev.endpoint.as_str(), ev.kind().as_str(), error_type])
            .inc();
    }

    pub fn submission(&self, kind: EndpointKind, channel: &str, outcome: &str) {
        self.submissions
            .with_label_values(&[kind.as_str(), channel, outcome])
            .inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::warn!(error = %e, "encoding metrics failed");
        }
        String::from_utf8_lossy(&buf).into_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleet::events::{ErrorType, EventKind};

    #[test]
    fn renders_prefixed_low_cardinality_series() {
        let m = Metrics::new().expect("metrics");
        m.observe_event(&fleet::events::testing::event(
            "req-123",
            EndpointKind::Sprint,
            EventKind::Queued,
        ));
        m.observe_event(&Event::failed(
            "req-9",
            EndpointKind::Base,
            ErrorType::ValidationError,
            "x",
        ));
        m.submission(EndpointKind::Sprint, "http", "accepted");
        let text = m.render();
        assert!(
            text.contains(
                r#"fleet_events_total{endpoint="sprint",error_type="",event="queued"} 1"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"fleet_events_total{endpoint="base",error_type="validation_error",event="failed"} 1"#
        ));
        assert!(text.contains(
            r#"fleet_submissions_total{channel="http",endpoint="sprint",outcome="accepted"} 1"#
        ));
        assert!(
            !text.contains("req-123"),
            "request ids must never be labels"
        );
    }
}
