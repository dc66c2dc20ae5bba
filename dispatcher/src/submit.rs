//! Accepting a request: validate, publish `queued`, publish the job, each confirmed by the broker
//! (service-contract §4, §5). Shared by the HTTP API and the AMQP ingress.
//!
//! The `queued` event goes first so a worker's `started` can never precede it in the stream. A request
//! with a start deadline then gets its broker-side timer ([`fleet::queue::DeadlineTimer`]) *before* its
//! job, so no job with a deadline exists without the timer that alone may time it out. If the timer or
//! the job publish fails, a `failed` event (internal_error) closes the request so it does not sit
//! `IN_QUEUE` forever. Publishing goes through [`Bus`], which the dispatcher's [`StreamReader`] (its
//! confirmed publisher and its view of the results stream) implements; handler tests plug in an
//! in-memory bus.

use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::Value;

use fleet::events::{now_unix, ErrorType, Event, EventBody, Failure, JobMessage, Queued};
use fleet::job::{validate, EndpointKind, JobInput, ValidationError};
use fleet::queue::{DeadlineTimer, QueueError, StreamReader};

/// Where the dispatcher publishes, and how it catches up with what other dispatchers published. Every
/// publish returns only once the broker confirmed.
pub trait Bus: Send + Sync + 'static {
    fn publish_event<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), QueueError>>;
    fn publish_deadline_timer<'a>(
        &'a self,
        timer: &'a DeadlineTimer,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    fn publish_job<'a>(
        &'a self,
        job: &'a JobMessage,
        priority: Option<u8>,
    ) -> BoxFuture<'a, Result<(), QueueError>>;
    /// Returns once the view holds every event published to the results stream before the call, by
    /// any dispatcher (a request submitted on one replica is then known to this one), or an error
    /// after `within`.
    fn catch_up(&self, within: Duration) -> BoxFuture<'_, Result<(), QueueError>>;
}

impl Bus for StreamReader {
    fn publish_event<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.publisher().publish_event(event))
    }

    fn publish_deadline_timer<'a>(
        &'a self,
        timer: &'a DeadlineTimer,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.publisher().publish_deadline_timer(timer))
    }

    fn publish_job<'a>(
        &'a self,
        job: &'a JobMessage,
        priority: Option<u8>,
    ) -> BoxFuture<'a, Result<(), QueueError>> {
        Box::pin(self.publisher().publish_job_with_priority(job, priority))
    }

    fn catch_up(&self, within: Duration) -> BoxFuture<'_, Result<(), QueueError>> {
        // A marker round trip through the stream: everything published before it is read before it.
        Box::pin(self.sync_within(within))
    }
}

/// fal's queue priority (`X-Fal-Queue-Priority`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    #[default]
    Normal,
    Low,
}

impl Priority {
    /// AMQP priority of the job message. RabbitMQ 4 quorum queues have two levels (> 4 is high, unset
    /// is normal), so `normal` requests go out high and `low` ones unset; 3.x quorum queues ignore it.
    pub fn amqp(self) -> Option<u8> {
        match self {
            Priority::Normal => Some(5),
            Priority::Low => None,
        }
    }
}

impl std::str::FromStr for Priority {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "normal" => Ok(Priority::Normal),
            "low" => Ok(Priority::Low),
            other => Err(format!("priority must be 'normal' or 'low', got {other:?}")),
        }
    }
}

/// Everything a submission carries besides the input.
#[derive(Debug, Clone, Default)]
pub struct SubmitOptions {
    /// Client-chosen id (AMQP ingress); a uuid v4 otherwise.
    pub request_id: Option<String>,
    pub webhook_url: Option<String>,
    /// Seconds from now within which the job must start.
    pub start_timeout: Option<f64>,
    pub priority: Priority,
}

/// A request the broker has confirmed.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub request_id: String,
    pub input: JobInput,
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("broker: {0}")]
    Broker(#[from] QueueError),
}

/// Validates `raw` for `kind` and enqueues it. Nothing is published when validation fails.
pub async fn submit(
    bus: &dyn Bus,
    kind: EndpointKind,
    raw: &Value,
    opts: SubmitOptions,
) -> Result<Accepted, SubmitError> {
    let input = validate(kind, raw, rand::random::<u64>)?;
    let request_id = opts
        .request_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let submitted_at = now_unix();
    let deadline = opts.start_timeout.map(|s| submitted_at + s);
    let queued = Event {
        at: submitted_at,
        ..Event::new(
            request_id.clone(),
            kind,
            EventBody::Queued(Queued {
                input: input.clone(),
                deadline,
                webhook_url: opts.webhook_url,
            }),
        )
    };
    bus.publish_event(&queued).await?;
    let job = JobMessage {
        request_id: request_id.clone(),
        endpoint: kind,
        submitted_at,
        deadline,
        deadline_timer: deadline.is_some(),
        input: input.clone(),
    };
    let priority = opts.priority.amqp();
    let enqueued = async {
        if let Some(deadline) = deadline {
            let timer = DeadlineTimer {
                request_id: request_id.clone(),
                endpoint: kind,
                deadline,
            };
            bus.publish_deadline_timer(&timer).await?;
        }
        bus.publish_job(&job, priority).await
    };
    if let Err(e) = enqueued.await {
        tracing::error!(request_id, error = %e, "timer or job publish failed after the queued event; closing the request");
        let failed = Event::failed(
            request_id.clone(),
            kind,
            ErrorType::InternalError,
            "The request could not be enqueued",
        );
        if let Err(e2) = bus.publish_event(&failed).await {
            tracing::error!(request_id, error = %e2, "could not publish the failure event either");
        }
        return Err(e.into());
    }
    Ok(Accepted { request_id, input })
}

/// The `failed` event of a submission that did not validate (AMQP ingress): billing 0, the FastAPI
/// `detail[]` attached.
pub fn validation_failed(request_id: &str, kind: EndpointKind, err: &ValidationError) -> Event {
    let failure = Failure {
        detail: Some(err.to_body()["detail"].clone()),
        ..Failure::new(ErrorType::ValidationError, err.to_string())
    };
    Event::new(request_id, kind, EventBody::Failed(failure))
}

#[cfg(test)]
pub(crate) mod testing {
    //! An in-memory bus for handler tests: events go straight into a registry, jobs into a list.
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::state::SharedRegistry;

    #[derive(Default)]
    pub struct MemoryBus {
        pub registry: SharedRegistry,
        pub jobs: Mutex<Vec<(JobMessage, Option<u8>)>>,
        pub events: Mutex<Vec<Event>>,
        pub timers: Mutex<Vec<DeadlineTimer>>,
        offset: Mutex<u64>,
        /// While true every publish fails as it does while the broker is away.
        pub down: AtomicBool,
        /// Events another dispatcher published that this view has not read yet: `catch_up` applies them.
        pub elsewhere: Mutex<Vec<Event>>,
    }

    impl MemoryBus {
        fn next_offset(&self) -> Result<u64, QueueError> {
            let mut o = self
                .offset
                .lock()
                .map_err(|_| QueueError::Closed("poisoned".into()))?;
            *o += 1;
            Ok(*o)
        }

        fn check_up(&self) -> Result<(), QueueError> {
            if self.down.load(Ordering::SeqCst) {
                return Err(QueueError::Timeout("the publisher confirm"));
            }
            Ok(())
        }
    }

    impl Bus for MemoryBus {
        fn publish_event<'a>(&'a self, event: &'a Event) -> BoxFuture<'a, Result<(), QueueError>> {
            Box::pin(async move {
                self.check_up()?;
                let offset = self.next_offset()?;
                self.events
                    .lock()
                    .map_err(|_| QueueError::Closed("poisoned".into()))?
                    .push(event.clone());
                self.registry.apply(offset, event);
                Ok(())
            })
        }

        fn publish_deadline_timer<'a>(
            &'a self,
            timer: &'a DeadlineTimer,
        ) -> BoxFuture<'a, Result<(), QueueError>> {
            Box::pin(async move {
                self.check_up()?;
                self.timers
                    .lock()
                    .map_err(|_| QueueError::Closed("poisoned".into()))?
                    .push(timer.clone());
                Ok(())
            })
        }

        fn publish_job<'a>(
            &'a self,
            job: &'a JobMessage,
            priority: Option<u8>,
        ) -> BoxFuture<'a, Result<(), QueueError>> {
            Box::pin(async move {
                self.check_up()?;
                self.jobs
                    .lock()
                    .map_err(|_| QueueError::Closed("poisoned".into()))?
                    .push((job.clone(), priority));
                Ok(())
            })
        }

        fn catch_up(&self, _within: Duration) -> BoxFuture<'_, Result<(), QueueError>> {
            // This bus's own events are applied as they are published; other dispatchers' are read now.
            Box::pin(async move {
                self.check_up()?;
                let pending = std::mem::take(
                    &mut *self
                        .elsewhere
                        .lock()
                        .map_err(|_| QueueError::Closed("poisoned".into()))?,
                );
                for event in &pending {
                    self.registry.apply(self.next_offset()?, event);
                }
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::testing::MemoryBus;
    use super::*;
    use serde_json::json;

    #[tokio::test]
    async fn valid_input_publishes_queued_then_job() {
        let bus = MemoryBus::default();
        let opts = SubmitOptions {
            webhook_url: Some("http://h".into()),
            start_timeout: Some(30.0),
            ..Default::default()
        };
        let acc = submit(
            &bus,
            EndpointKind::Sprint,
            &json!({"prompt": "a fox", "seed": 9}),
            opts,
        )
        .await
        .expect("accepted");
        let events = bus.events.lock().expect("lock").clone();
        assert_eq!(events.len(), 1);
        let EventBody::Queued(queued) = &events[0].body else {
            panic!("not queued: {:?}", events[0]);
        };
        assert_eq!(queued.webhook_url.as_deref(), Some("http://h"));
        let deadline = queued.deadline.expect("deadline");
        assert!(
            (deadline - events[0].at - 30.0).abs() < 1e-6,
            "deadline is submit time + timeout (±1e-6 s)"
        );
        let jobs = bus.jobs.lock().expect("lock").clone();
        assert_eq!(jobs.len(), 1);
        assert_eq!(jobs[0].0.request_id, acc.request_id);
        assert_eq!(jobs[0].0.input.seed, 9);
        assert_eq!(jobs[0].1, Some(5));
        assert!(jobs[0].0.deadline_timer, "the job says its timer exists");
        let timers = bus.timers.lock().expect("lock").clone();
        assert_eq!(timers.len(), 1, "one broker-side timer per request");
        assert_eq!(timers[0].request_id, acc.request_id);
        assert_eq!(timers[0].deadline.to_bits(), deadline.to_bits());
    }

    #[tokio::test]
    async fn invalid_input_publishes_nothing() {
        let bus = MemoryBus::default();
        let err = submit(
            &bus,
            EndpointKind::Base,
            &json!({"prompt": "x", "num_images": 9}),
            SubmitOptions::default(),
        )
        .await
        .expect_err("invalid");
        match err {
            SubmitError::Invalid(v) => assert_eq!(v.0[0].field(), "num_images"),
            SubmitError::Broker(e) => panic!("unexpected broker error {e}"),
        }
        assert!(bus.events.lock().expect("lock").is_empty());
        assert!(bus.jobs.lock().expect("lock").is_empty());
    }

    #[test]
    fn validation_failure_event_carries_detail() {
        let err = validate(EndpointKind::Base, &json!({}), || 0).expect_err("invalid");
        let ev = validation_failed("r", EndpointKind::Base, &err);
        assert_eq!(ev.error_type(), Some(ErrorType::ValidationError));
        assert_eq!(ev.billable_units(), Some(0));
        let EventBody::Failed(failure) = ev.body else {
            panic!("not failed: {ev:?}");
        };
        assert_eq!(
            failure.detail.expect("detail")[0]["loc"],
            json!(["body", "prompt"])
        );
        assert_eq!("low".parse::<Priority>(), Ok(Priority::Low));
        assert!("urgent".parse::<Priority>().is_err());
    }
}
