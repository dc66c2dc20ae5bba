//! `worker fleet`: the local executor of the scaling policy ([`crate::scaling`]) on one host (issue 12).
//! It owns a list of slots (GPUs, or CPU slots in tests) and starts and stops `worker serve` children, at
//! most one per slot, from queue demand.
//!
//! Every tick it observes: the ready jobs on the served endpoints' queues ([`demand`]), and each child's
//! `/metrics` (phase, jobs in flight, settled jobs, idle seconds). A child is `Starting` until its
//! `/health` phase is ready (models loaded, one warm-up run, consuming), then `Busy` with jobs in flight
//! or `Idle { idle_for, served }`. Children being drained are left out of the policy's view and their
//! jobs out of demand (they finish them), but they keep their slot until they exit. Then it executes the
//! policy's [`Plan`]: starts on free slots, SIGTERM for the listed idle children (the worker drains:
//! cancel the consumers, finish and ack, exit). Every decision that changes something is logged.
//!
//! `scaling_delay`: the supervisor does not see message ages through a passive declare; "the oldest job
//! has waited" is measured as how long the queues have been continuously non-empty.
//!
//! Start failures (a child that exits before it is ready) are retried with [`StartBackoff`] (+step per
//! consecutive failure, capped at 20 steps, reset by a child that gets ready); while failures are
//! pending, one child at a time is started. Each failure is a log line,
//! `fleet_supervisor_start_failures_total`, and a `worker_start_failed` notice per served endpoint kind in
//! the results stream, which the dispatchers add to the `logs` of every request of that kind still
//! waiting (`fleet::events::Notice`): the client sees why nothing starts its request.

pub mod child;
pub mod demand;
pub mod metrics;

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::scaling::{Observation, Plan, ScalingPolicy, StartBackoff, WorkerState, WorkerView};
use crate::WorkerError;
use child::{ChildSpec, Slot, WorkerChild};
use demand::QueueDepth;
use fleet::events::{Notice, NoticeBody, WorkerStartFailed};
use fleet::job::EndpointKind;
use fleet::queue::Topology;
use metrics::SupervisorMetrics;

/// Most notices kept for a broker that cannot take them now; older ones are dropped first.
const MAX_PENDING_NOTICES: usize = 64;

/// Everything the supervisor needs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Prefix of the children's worker ids (`{name}-s{slot}-{n}`).
    pub name: String,
    pub slots: Vec<Slot>,
    pub policy: ScalingPolicy,
    pub child: ChildSpec,
    pub amqp_url: String,
    pub topology: Topology,
    pub endpoints: Vec<EndpointKind>,
    /// How often demand and the children are observed.
    pub tick: Duration,
    /// The start backoff's step (30 s; shorter in tests).
    pub backoff_step: Duration,
}

/// The supervisor's state between ticks.
struct Fleet {
    config: SupervisorConfig,
    children: BTreeMap<String, WorkerChild>,
    depth: QueueDepth,
    backoff: StartBackoff,
    /// No start before this instant (the backoff after a failure).
    next_start: Instant,
    /// Since when the queues have been non-empty.
    waiting_since: Option<Instant>,
    started: u64,
    http: reqwest::Client,
    metrics: Arc<SupervisorMetrics>,
    last_plan: Option<(u32, u32, u32)>,
    /// Notices not yet confirmed by the broker (published at the end of each tick).
    notices: VecDeque<Notice>,
}

/// Why the supervisor cannot run.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("no slots: give --gpus or --cpu-slots")]
    NoSlots,
    #[error("no endpoints to serve")]
    NoEndpoints,
}

/// Runs until `shutdown`, then drains every child and returns once all have exited.
pub async fn run(
    config: SupervisorConfig,
    metrics: Arc<SupervisorMetrics>,
    shutdown: CancellationToken,
) -> Result<(), SupervisorError> {
    if config.slots.is_empty() {
        return Err(SupervisorError::NoSlots);
    }
    if config.endpoints.is_empty() {
        return Err(SupervisorError::NoEndpoints);
    }
    tracing::info!(
        slots = config.slots.len(),
        policy = ?config.policy,
        endpoints = ?config.endpoints,
        "supervisor starting"
    );
    let mut fleet = Fleet {
        depth: QueueDepth::new(
            config.amqp_url.clone(),
            config.topology.clone(),
            config.endpoints.clone(),
        ),
        backoff: StartBackoff::with_step(config.backoff_step),
        config,
        children: BTreeMap::new(),
        next_start: Instant::now(),
        waiting_since: None,
        started: 0,
        http: reqwest::Client::new(),
        metrics,
        last_plan: None,
        notices: VecDeque::new(),
    };
    let mut tick = tokio::time::interval(fleet.config.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tick.tick() => fleet.step().await,
        }
    }
    fleet.drain_all().await;
    Ok(())
}

impl Fleet {
    /// One observe-decide-execute round.
    async fn step(&mut self) {
        self.reap_exited();
        let poll_timeout = self.config.tick.max(Duration::from_millis(500));
        for child in self.children.values_mut() {
            child.poll(&self.http, poll_timeout).await;
        }
        self.note_ready();
        let waiting = match self.depth.waiting().await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the job queues; no scaling decision this tick");
                self.publish_metrics(None, 0);
                return;
            }
        };
        let now = Instant::now();
        self.waiting_since = match (waiting, self.waiting_since) {
            (0, _) => None,
            (_, Some(t)) => Some(t),
            (_, None) => Some(now),
        };
        let obs = self.observe(waiting, now);
        let plan = self.config.policy.decide(&obs);
        self.publish_metrics(Some(&obs), plan.target);
        self.execute(&obs, plan, now);
        self.send_notices().await;
    }

    /// Publishes the pending notices in order; what the broker does not take waits for the next tick.
    async fn send_notices(&mut self) {
        while let Some(notice) = self.notices.front() {
            if let Err(e) = self.depth.notify(notice).await {
                tracing::warn!(error = %e, pending = self.notices.len(), "cannot publish a notice; retrying next tick");
                return;
            }
            self.notices.pop_front();
        }
    }

    fn observe(&self, waiting: u32, now: Instant) -> Observation {
        let mut running = 0u32;
        let mut workers = Vec::new();
        for c in self.children.values().filter(|c| !c.draining) {
            let state = match (c.ready_at, c.reading) {
                (Some(_), Some(r)) if r.in_flight > 0 => {
                    running = running.saturating_add(r.in_flight);
                    WorkerState::Busy
                }
                (Some(_), Some(r)) => WorkerState::Idle {
                    idle_for: Duration::from_secs_f64(r.idle_seconds.max(0.0)),
                    served: r.jobs > 0,
                },
                _ => WorkerState::Starting,
            };
            workers.push(WorkerView {
                id: c.id.clone(),
                state,
            });
        }
        Observation {
            waiting,
            running,
            oldest_wait: self.waiting_since.map_or(Duration::ZERO, |t| now - t),
            workers,
        }
    }

    fn execute(&mut self, obs: &Observation, plan: Plan, now: Instant) {
        let key = (plan.target, plan.start, plan.stop.len() as u32);
        // One line per change of the plan (and per stop), not one per tick while a plan holds.
        if self.last_plan != Some(key) || !plan.stop.is_empty() {
            tracing::info!(
                waiting = obs.waiting,
                running = obs.running,
                oldest_wait_s = obs.oldest_wait.as_secs_f64(),
                workers = obs.workers.len(),
                target = plan.target,
                start = plan.start,
                stop = ?plan.stop,
                "scaling decision"
            );
        }
        self.last_plan = Some(key);
        for id in &plan.stop {
            if let Some(child) = self.children.get_mut(id) {
                tracing::info!(worker = %id, pid = ?child.pid(), "draining an idle worker (SIGTERM)");
                child.terminate();
                self.metrics.decisions.with_label_values(&["stop"]).inc();
            }
        }
        if plan.start == 0 {
            return;
        }
        if now < self.next_start {
            tracing::debug!(
                wait_s = (self.next_start - now).as_secs_f64(),
                failures = self.backoff.failures(),
                "start held back by the start backoff"
            );
            return;
        }
        let starting = obs
            .workers
            .iter()
            .filter(|w| w.state == WorkerState::Starting)
            .count();
        let mut want = plan.start as usize;
        if self.backoff.failures() > 0 {
            // After failures: one probe at a time.
            want = usize::from(starting == 0);
        }
        let free: Vec<Slot> = self
            .config
            .slots
            .iter()
            .filter(|s| !self.children.values().any(|c| c.slot.index == s.index))
            .take(want)
            .cloned()
            .collect();
        if free.len() < want {
            tracing::debug!(want, free = free.len(), "fewer free slots than wanted");
        }
        for slot in free {
            self.started += 1;
            let id = format!("{}-s{}-{}", self.config.name, slot.index, self.started);
            match WorkerChild::spawn(&self.config.child, slot, id.clone()) {
                Ok(child) => {
                    tracing::info!(worker = %id, slot = child.slot.index, gpu = ?child.slot.gpu, pid = ?child.pid(), "worker started");
                    self.metrics.decisions.with_label_values(&["start"]).inc();
                    self.children.insert(id, child);
                }
                Err(e) => {
                    tracing::error!(worker = %id, error = %e, "worker could not be spawned");
                    self.start_failed(now, &id, "it could not be spawned".into());
                }
            }
        }
    }

    /// Children that reported ready since the last tick: cold start observed, backoff reset.
    fn note_ready(&mut self) {
        for c in self.children.values_mut() {
            let ready = c.reading.is_some_and(|r| r.phase >= 1);
            if ready && c.ready_at.is_none() {
                let cold = c.started_at.elapsed();
                c.ready_at = Some(Instant::now());
                tracing::info!(worker = %c.id, cold_start_s = cold.as_secs_f64(), "worker ready");
                self.metrics.cold_start.observe(cold.as_secs_f64());
                self.backoff.started();
            }
        }
    }

    /// A start failure of worker `id`: backoff, metric, log line, and a notice for the waiting requests.
    fn start_failed(&mut self, now: Instant, id: &str, cause: String) {
        self.backoff.failed();
        let delay = self.backoff.delay();
        self.next_start = now + delay;
        self.metrics.start_failures.inc();
        self.metrics.backoff_seconds.set(delay.as_secs_f64());
        tracing::error!(
            worker = %id,
            %cause,
            failures = self.backoff.failures(),
            retry_in_s = delay.as_secs_f64(),
            "worker failed to start; backing off"
        );
        for kind in &self.config.endpoints {
            let body = WorkerStartFailed {
                worker: id.to_string(),
                cause: cause.clone(),
                failures: self.backoff.failures(),
                retry_in: delay.as_secs_f64(),
            };
            let notice = Notice::new(*kind, NoticeBody::WorkerStartFailed(body));
            if self.notices.len() >= MAX_PENDING_NOTICES {
                self.notices.pop_front();
            }
            self.notices.push_back(notice);
        }
    }

    /// Removes children that exited, telling drained, failed-to-start and crashed ones apart.
    fn reap_exited(&mut self) {
        let now = Instant::now();
        let mut gone = Vec::new();
        for (id, c) in self.children.iter_mut() {
            if let Some(status) = c.exited() {
                gone.push((id.clone(), status, c.draining, c.ready_at.is_some()));
            }
        }
        for (id, status, draining, was_ready) in gone {
            self.children.remove(&id);
            match (draining, was_ready) {
                (true, _) => {
                    tracing::info!(worker = %id, %status, "worker drained and exited");
                    self.metrics.exits.with_label_values(&["drained"]).inc();
                }
                (false, false) => {
                    tracing::error!(worker = %id, %status, "worker exited before it was ready");
                    self.metrics
                        .exits
                        .with_label_values(&["start_failed"])
                        .inc();
                    self.start_failed(now, &id, WorkerError::exit_cause(status));
                }
                (false, true) => {
                    tracing::error!(worker = %id, %status, "worker exited unasked");
                    self.metrics.exits.with_label_values(&["crashed"]).inc();
                }
            }
        }
    }

    fn publish_metrics(&self, obs: Option<&Observation>, target: u32) {
        let m = &self.metrics;
        let mut counts = [0i64; 4];
        for c in self.children.values() {
            let i = match (c.draining, c.ready_at, c.reading) {
                (true, _, _) => 3,
                (false, None, _) => 0,
                (false, Some(_), Some(r)) if r.in_flight > 0 => 2,
                (false, Some(_), _) => 1,
            };
            counts[i] += 1;
        }
        for (state, n) in ["starting", "idle", "busy", "draining"].iter().zip(counts) {
            m.workers.with_label_values(&[state]).set(n);
        }
        if let Some(obs) = obs {
            m.demand
                .with_label_values(&["waiting"])
                .set(i64::from(obs.waiting));
            m.demand
                .with_label_values(&["running"])
                .set(i64::from(obs.running));
            m.target.set(i64::from(target));
        }
    }

    /// SIGTERM to every child, then wait for all to exit (each bounds its own drain).
    async fn drain_all(&mut self) {
        tracing::info!(
            workers = self.children.len(),
            "supervisor stopping; draining every worker"
        );
        for c in self.children.values_mut() {
            if !c.draining {
                c.terminate();
            }
        }
        while !self.children.is_empty() {
            self.reap_exited();
            self.publish_metrics(None, 0);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tracing::info!("every worker exited");
    }
}
