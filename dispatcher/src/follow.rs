//! Following the `fleet.results` stream into the [`SharedRegistry`] (service-contract §5).
//!
//! The follower is a sink of the dispatcher's one reader of the stream (`fleet::queue::StreamReader`,
//! beside the deadline watch): the reader replays from `first`, and the follower flips `ready` when the
//! replay is complete: from then on the view holds everything published before the dispatcher started.
//! Webhooks are not sent from here: every dispatcher reads the whole stream, so they have a queue of
//! their own (`crate::webhooks`).

use std::sync::Arc;

use tokio::sync::watch;

use super::metrics::Metrics;
use super::state::SharedRegistry;
use fleet::events::{Event, Notice};
use fleet::job::EndpointKind;
use fleet::queue::EventSink;

/// What the follower needs: where it applies events, and where it reports.
pub struct Follower {
    pub registry: SharedRegistry,
    pub metrics: Arc<Metrics>,
    /// Set to true once the replay is complete.
    pub ready: watch::Sender<bool>,
}

impl EventSink for Follower {
    fn apply(&self, offset: u64, event: &Event, _live: bool) {
        self.follow(offset, event);
    }

    fn notice(&self, offset: u64, notice: &Notice, _live: bool) {
        let n = self.registry.apply_notice(offset, notice);
        tracing::debug!(
            offset,
            endpoint = notice.endpoint.as_str(),
            requests = n,
            "notice applied"
        );
    }

    fn caught_up(&self) {
        let n = self.registry.read(|r| r.len());
        tracing::info!(requests = n, "replay complete");
        self.ready.send_replace(true);
    }
}

impl Follower {
    fn follow(&self, offset: u64, event: &Event) {
        self.registry.apply(offset, event);
        self.metrics.observe_event(event);
        for kind in EndpointKind::ALL {
            let n = self.registry.read(|r| r.queued_count(kind));
            self.metrics
                .in_queue
                .with_label_values(&[kind.as_str()])
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}
