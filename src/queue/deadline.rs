//! Start-deadline timers kept by the broker (issue 11, "two dispatchers"): one timer message per request
//! with an `X-Fal-Request-Timeout`, so exactly one process decides whether it timed out.
//!
//! At submit the dispatcher publishes a [`DeadlineTimer`] (persistent, confirmed) into a *wait queue*
//! that nobody consumes: `{prefix}.deadlines.wait.{secs}s`, a durable classic queue whose
//! `x-message-ttl` is `secs` plus [`GRACE`]. When the TTL runs out the broker dead-letters the message to
//! the fanout exchange `{prefix}.deadlines` and from there into the quorum queue `{prefix}.deadlines.due`,
//! which every dispatcher consumes as a competing consumer: the broker hands each timer to one of them.
//! That one syncs with the results stream and publishes `failed` with `request_timeout` only when the
//! request neither started nor ended (dispatcher `deadlines`).
//!
//! Why a queue per timeout and not one queue with per-message `expiration`: RabbitMQ expires messages
//! only at the head of a queue, so a short timeout queued behind a long one would fire late. Within one
//! wait queue every message has the same TTL, so the head is always the next one due. Timeouts are
//! rounded up to [`bucket`]s (whole seconds up to a minute, whole minutes up to an hour, whole hours up
//! to [`MAX_WAIT`]), which bounds the number of wait queues to 286 and makes a timer fire at most one
//! bucket step late, never early. A timer that is consumed before its deadline (a timeout longer than
//! [`MAX_WAIT`], or clocks that disagree) is published again for the time left. Each publish redeclares
//! its wait queue, and `x-expires` deletes a wait queue [`WAIT_QUEUE_IDLE`] after its last redeclare,
//! when its last message has long been dead-lettered.

use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use lapin::BasicProperties;
use serde::{Deserialize, Serialize};

use super::{Publisher, QueueError, Topology, HEADER_ENDPOINT};
use crate::job::EndpointKind;

/// Time past a deadline before its timer fires. A worker checks the deadline right before it publishes
/// `started`; the grace keeps that `started` (and small clock skew between hosts) ahead of the timer.
pub const GRACE: Duration = Duration::from_secs(1);
/// Longest wait of one timer message; a longer timeout is waited out in several rounds.
pub const MAX_WAIT: Duration = Duration::from_secs(7 * 24 * 3600);
/// A wait queue is deleted this long after it was last declared (its messages have left by then).
pub const WAIT_QUEUE_IDLE: Duration = Duration::from_secs(600);

/// The body of a timer message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadlineTimer {
    pub request_id: String,
    pub endpoint: EndpointKind,
    /// Unix seconds by which the request must have started.
    pub deadline: f64,
}

/// The wait of a timer that must fire no earlier than `remaining` from now: whole seconds up to a
/// minute, whole minutes up to an hour, whole hours up to [`MAX_WAIT`] (rounded up; at least 1 s).
pub fn bucket(remaining: Duration) -> Duration {
    const MINUTE: u64 = 60;
    const HOUR: u64 = 3600;
    let secs = remaining
        .as_secs()
        .saturating_add(u64::from(remaining.subsec_nanos() > 0))
        .max(1);
    let rounded = if secs <= MINUTE {
        secs
    } else if secs <= HOUR {
        secs.div_ceil(MINUTE) * MINUTE
    } else {
        secs.div_ceil(HOUR) * HOUR
    };
    Duration::from_secs(rounded).min(MAX_WAIT)
}

impl Topology {
    /// `{prefix}.deadlines`: fanout exchange the wait queues dead-letter expired timers to.
    pub fn deadlines_exchange(&self) -> String {
        format!("{}.deadlines", self.prefix)
    }

    /// `{prefix}.deadlines.due`: quorum queue of timers that fired, consumed by the dispatchers.
    pub fn deadlines_due_queue(&self) -> String {
        format!("{}.deadlines.due", self.prefix)
    }

    /// `{prefix}.deadlines.wait.{secs}s`: the unconsumed queue holding timers of one [`bucket`].
    pub fn deadline_wait_queue(&self, wait: Duration) -> String {
        format!("{}.deadlines.wait.{}s", self.prefix, wait.as_secs())
    }
}

/// The arguments of a wait queue; a function of its wait only, so every redeclare matches.
fn wait_queue_args(topology: &Topology, wait: Duration) -> FieldTable {
    let ms = |d: Duration| AMQPValue::LongLongInt(i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), ms(wait + GRACE));
    args.insert("x-expires".into(), ms(wait + GRACE + WAIT_QUEUE_IDLE));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(topology.deadlines_exchange().into()),
    );
    args
}

impl Publisher {
    /// Starts the broker-side timer of `timer` (see the module docs); returns once the broker confirmed it.
    pub async fn publish_deadline_timer(&self, timer: &DeadlineTimer) -> Result<(), QueueError> {
        let left = timer.deadline - crate::events::now_unix();
        let remaining = if left.is_nan() || left <= 0.0 {
            Duration::ZERO
        } else {
            // Too large for a Duration: a later round waits out the rest.
            Duration::try_from_secs_f64(left).unwrap_or(MAX_WAIT)
        };
        let wait = bucket(remaining);
        let queue = self.topology().deadline_wait_queue(wait);
        self.channel()
            .queue_declare(
                queue.as_str().into(),
                QueueDeclareOptions::durable(),
                wait_queue_args(self.topology(), wait),
            )
            .await
            .map_err(QueueError::broker("declare deadline wait queue"))?;
        let mut headers = FieldTable::default();
        headers.insert(
            HEADER_ENDPOINT.into(),
            AMQPValue::LongString(timer.endpoint.as_str().into()),
        );
        let props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_headers(headers);
        let props = if super::publish::fits_short_string(&timer.request_id) {
            props.with_message_id(timer.request_id.as_str().into())
        } else {
            props
        };
        let body = serde_json::to_vec(timer).map_err(QueueError::Serialize)?;
        self.publish_raw("", &queue, &body, props).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_round_up_and_never_fire_early() {
        let s = Duration::from_secs;
        assert_eq!(bucket(Duration::ZERO), s(1));
        assert_eq!(bucket(Duration::from_millis(1500)), s(2));
        assert_eq!(bucket(s(60)), s(60));
        assert_eq!(bucket(s(61)), s(120));
        assert_eq!(bucket(s(3600)), s(3600));
        assert_eq!(bucket(s(3601)), s(7200));
        assert_eq!(bucket(s(30 * 24 * 3600)), MAX_WAIT);
        for secs in [1, 59, 60, 61, 599, 3599, 3601, 86_399] {
            assert!(bucket(s(secs)) >= s(secs), "{secs} s fires early");
        }
        let distinct: std::collections::BTreeSet<_> = (0..=MAX_WAIT.as_secs())
            .step_by(7)
            .map(|t| bucket(s(t)))
            .collect();
        assert!(
            distinct.len() <= 60 + 59 + 167,
            "{} wait queues",
            distinct.len()
        );
    }

    #[test]
    fn wait_queue_names_and_ttl_follow_the_bucket() {
        let t = Topology::with_prefix("t1");
        assert_eq!(
            t.deadline_wait_queue(Duration::from_secs(5)),
            "t1.deadlines.wait.5s"
        );
        let args = wait_queue_args(&t, Duration::from_secs(5));
        assert_eq!(
            args.inner().get("x-message-ttl"),
            Some(&AMQPValue::LongLongInt(6000)),
            "wait + 1 s grace"
        );
        assert_eq!(
            args.inner().get("x-dead-letter-exchange"),
            Some(&AMQPValue::LongString("t1.deadlines".into()))
        );
    }
}
