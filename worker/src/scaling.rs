//! The fleet's scaling decision, as a pure function of what a supervisor observes (issue 12): fal's
//! documented semantics for `min_concurrency`, `max_concurrency`, `concurrency_buffer` (and its percentage
//! form), `max_multiplexing`, `keep_alive` and `scaling_delay`, plus the startup-failure backoff. No clock,
//! no processes: the caller passes the time and executes the [`Plan`].
//!
//! * demand = waiting + running jobs (of the endpoint kinds the workers serve);
//! * buffer = max(`concurrency_buffer`, ⌈`concurrency_buffer_perc` · demand / 100⌉);
//! * target = min(max, max(min, ⌈demand / `max_multiplexing`⌉ + buffer));
//! * workers that are starting count as capacity (no over-provisioning while models load);
//! * `scaling_delay`: until the oldest waiting job has waited that long, demand does not start workers
//!   (min and the fixed buffer still do);
//! * scale-down only takes idle workers, longest idle first: one idle for `keep_alive`, or one that never
//!   got a job for [`NEVER_USED_REAP`] when min and both buffers are 0; busy and starting workers are never
//!   chosen (the supervisor drains what it stops: cancel the consumer, finish and ack, exit).

use std::time::Duration;

/// A worker that never got a job is reaped after this long when min and buffer are both 0 (fal).
pub const NEVER_USED_REAP: Duration = Duration::from_secs(10);

/// The knobs, named as fal names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScalingPolicy {
    pub min_concurrency: u32,
    pub max_concurrency: u32,
    pub concurrency_buffer: u32,
    /// Percent of demand kept as extra warm workers (0 = off).
    pub concurrency_buffer_perc: u32,
    /// Jobs one worker takes at once (the worker's `--max-concurrency`, a pipelining depth).
    pub max_multiplexing: u32,
    pub keep_alive: Duration,
    pub scaling_delay: Duration,
}

impl Default for ScalingPolicy {
    /// The reproduced app's settings: `keep_alive=600, min_concurrency=0, max_concurrency=10`.
    fn default() -> Self {
        ScalingPolicy {
            min_concurrency: 0,
            max_concurrency: 10,
            concurrency_buffer: 0,
            concurrency_buffer_perc: 0,
            max_multiplexing: 1,
            keep_alive: Duration::from_secs(600),
            scaling_delay: Duration::ZERO,
        }
    }
}

/// What one worker is doing, as the supervisor sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    /// Process started, models not yet loaded and warmed up.
    Starting,
    /// Ready with no job; `idle_for` since its last job ended (or since it became ready), `served` whether
    /// it ever ran a job.
    Idle {
        idle_for: Duration,
        served: bool,
    },
    Busy,
}

/// One supervised worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    pub id: String,
    pub state: WorkerState,
}

/// The supervisor's view at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observation {
    /// Jobs on the queues, not yet taken by a worker.
    pub waiting: u32,
    /// Jobs taken by a worker and not yet settled.
    pub running: u32,
    /// How long the oldest waiting job has waited (zero when none waits).
    pub oldest_wait: Duration,
    pub workers: Vec<WorkerView>,
}

/// What to do now: start `start` workers, drain and stop the listed ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    /// The worker count the policy asks for.
    pub target: u32,
    pub start: u32,
    pub stop: Vec<String>,
}

fn div_ceil(a: u32, b: u32) -> u32 {
    a.div_ceil(b.max(1))
}

impl ScalingPolicy {
    /// The worker count for `demand` jobs; `demand_counts` is false while `scaling_delay` holds it back.
    pub fn target(&self, demand: u32, demand_counts: bool) -> u32 {
        let perc = div_ceil(self.concurrency_buffer_perc.saturating_mul(demand), 100);
        let buffer = if demand_counts {
            self.concurrency_buffer.max(perc)
        } else {
            self.concurrency_buffer
        };
        let for_demand = if demand_counts {
            div_ceil(demand, self.max_multiplexing)
        } else {
            0
        };
        self.max_concurrency
            .min(self.min_concurrency.max(for_demand.saturating_add(buffer)))
    }

    /// The plan for one observation.
    pub fn decide(&self, obs: &Observation) -> Plan {
        let demand = obs.waiting.saturating_add(obs.running);
        let demand_counts = obs.waiting == 0 || obs.oldest_wait >= self.scaling_delay;
        let target = self.target(demand, demand_counts);
        let live = u32::try_from(obs.workers.len()).unwrap_or(u32::MAX);
        if target > live {
            return Plan {
                target,
                start: target - live,
                stop: Vec::new(),
            };
        }
        let reap_never_used = self.min_concurrency == 0
            && self.concurrency_buffer == 0
            && self.concurrency_buffer_perc == 0;
        let mut idle: Vec<(&str, Duration)> = obs
            .workers
            .iter()
            .filter_map(|w| match w.state {
                WorkerState::Idle { idle_for, served } => {
                    let expired = idle_for >= self.keep_alive
                        || (!served && reap_never_used && idle_for >= NEVER_USED_REAP);
                    expired.then_some((w.id.as_str(), idle_for))
                }
                _ => None,
            })
            .collect();
        idle.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(b.0)));
        let surplus = (live - target) as usize;
        Plan {
            target,
            start: 0,
            stop: idle
                .into_iter()
                .take(surplus)
                .map(|(id, _)| id.to_string())
                .collect(),
        }
    }
}

/// Backoff after workers that failed to start: +`step` (30 s) per consecutive failure, capped at 20 steps
/// (10 minutes), reset by a worker that starts. The step is configurable so tests can run it in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartBackoff {
    failures: u32,
    step: Duration,
}

impl Default for StartBackoff {
    fn default() -> Self {
        StartBackoff::with_step(Self::STEP)
    }
}

impl StartBackoff {
    pub const STEP: Duration = Duration::from_secs(30);
    pub const CAP: Duration = Duration::from_secs(600);

    /// A backoff of `step` per failure, capped at `CAP / STEP` (20) steps.
    pub fn with_step(step: Duration) -> Self {
        StartBackoff { failures: 0, step }
    }

    pub fn failed(&mut self) {
        self.failures = self.failures.saturating_add(1);
    }

    pub fn started(&mut self) {
        self.failures = 0;
    }

    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// How long to wait before the next start attempt.
    pub fn delay(&self) -> Duration {
        let cap_steps = (Self::CAP.as_secs() / Self::STEP.as_secs()) as u32;
        self.step.saturating_mul(self.failures.min(cap_steps))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn idle(id: &str, idle_for: u64, served: bool) -> WorkerView {
        WorkerView {
            id: id.into(),
            state: WorkerState::Idle {
                idle_for: secs(idle_for),
                served,
            },
        }
    }

    fn with(state: WorkerState, id: &str) -> WorkerView {
        WorkerView {
            id: id.into(),
            state,
        }
    }

    #[test]
    fn target_follows_the_documented_formula() {
        let p = ScalingPolicy {
            min_concurrency: 1,
            max_concurrency: 10,
            concurrency_buffer: 2,
            concurrency_buffer_perc: 50,
            max_multiplexing: 2,
            ..ScalingPolicy::default()
        };
        // demand 0: max(min 1, 0 + max(2, 0)) = 2.
        assert_eq!(p.target(0, true), 2);
        // demand 5: ⌈5/2⌉ = 3, buffer max(2, ⌈2.5⌉ = 3) = 3 → 6.
        assert_eq!(p.target(5, true), 6);
        // demand 30: 15 + 15 → capped at max 10.
        assert_eq!(p.target(30, true), 10);
        // min wins over a smaller demand-driven count.
        let p = ScalingPolicy {
            min_concurrency: 4,
            ..ScalingPolicy::default()
        };
        assert_eq!(p.target(1, true), 4);
        // fal's app: min 0, max 10, no buffer: one worker per job up to 10, none when idle.
        let p = ScalingPolicy::default();
        assert_eq!(
            (0..=12).map(|d| p.target(d, true)).collect::<Vec<_>>(),
            vec![0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 10]
        );
    }

    #[test]
    fn a_burst_scales_from_zero_to_max_and_never_above() {
        let p = ScalingPolicy::default();
        let obs = Observation {
            waiting: 25,
            ..Observation::default()
        };
        assert_eq!(p.decide(&obs).start, 10);
        // Starting workers count as capacity: no second wave while they load.
        let starting: Vec<_> = (0..10)
            .map(|i| with(WorkerState::Starting, &format!("w{i}")))
            .collect();
        let obs = Observation {
            waiting: 25,
            workers: starting,
            ..Observation::default()
        };
        assert_eq!(
            p.decide(&obs),
            Plan {
                target: 10,
                start: 0,
                stop: vec![]
            }
        );
    }

    #[test]
    fn idle_workers_go_after_keep_alive_longest_idle_first_busy_never() {
        let p = ScalingPolicy {
            keep_alive: secs(600),
            ..ScalingPolicy::default()
        };
        let obs = Observation {
            waiting: 0,
            running: 1,
            workers: vec![
                with(WorkerState::Busy, "busy"),
                idle("young", 30, true),
                idle("old", 900, true),
                idle("older", 1200, true),
            ],
            ..Observation::default()
        };
        // target 1 (the running job); surplus 3, but only the two past keep-alive go, oldest first.
        assert_eq!(
            p.decide(&obs),
            Plan {
                target: 1,
                start: 0,
                stop: vec!["older".into(), "old".into()]
            }
        );
        // With min 3 only one may go.
        let p3 = ScalingPolicy {
            min_concurrency: 3,
            ..p
        };
        assert_eq!(p3.decide(&obs).stop, vec!["older".to_string()]);
    }

    #[test]
    fn a_never_used_worker_is_reaped_after_ten_seconds_only_without_min_and_buffer() {
        let p = ScalingPolicy::default();
        let obs = Observation {
            workers: vec![idle("fresh", 11, false), idle("used", 11, true)],
            ..Observation::default()
        };
        assert_eq!(p.decide(&obs).stop, vec!["fresh".to_string()]);
        let obs9 = Observation {
            workers: vec![idle("fresh", 9, false)],
            ..Observation::default()
        };
        assert!(p.decide(&obs9).stop.is_empty());
        let buffered = ScalingPolicy {
            concurrency_buffer: 1,
            ..p
        };
        assert!(buffered.decide(&obs).stop.is_empty());
    }

    #[test]
    fn a_buffer_keeps_extra_warm_workers() {
        let p = ScalingPolicy {
            concurrency_buffer: 2,
            keep_alive: secs(1),
            ..ScalingPolicy::default()
        };
        // Nothing asked: two warm workers anyway; they are not reaped however long idle.
        assert_eq!(p.decide(&Observation::default()).start, 2);
        let obs = Observation {
            workers: vec![idle("a", 3600, false), idle("b", 3600, true)],
            ..Observation::default()
        };
        assert_eq!(p.decide(&obs).stop, Vec::<String>::new());
        // One job running on a: 1 + 2 = 3 wanted.
        let obs = Observation {
            running: 1,
            workers: vec![with(WorkerState::Busy, "a"), idle("b", 5, true)],
            ..Observation::default()
        };
        assert_eq!(p.decide(&obs).start, 1);
    }

    #[test]
    fn scaling_delay_holds_back_demand_but_not_min() {
        let p = ScalingPolicy {
            min_concurrency: 1,
            scaling_delay: secs(5),
            ..ScalingPolicy::default()
        };
        let waiting = |wait: u64| Observation {
            waiting: 4,
            oldest_wait: secs(wait),
            ..Observation::default()
        };
        assert_eq!(p.decide(&waiting(2)).start, 1, "only min before the delay");
        assert_eq!(
            p.decide(&waiting(5)).start,
            4,
            "demand once a job waited 5 s"
        );
    }

    #[test]
    fn multiplexing_divides_demand() {
        let p = ScalingPolicy {
            max_multiplexing: 4,
            ..ScalingPolicy::default()
        };
        assert_eq!(p.target(9, true), 3);
        assert_eq!(p.target(8, true), 2);
    }

    #[test]
    fn start_backoff_grows_by_thirty_seconds_to_ten_minutes_and_resets() {
        let mut b = StartBackoff::default();
        assert_eq!(b.delay(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..25 {
            b.failed();
            seen.push(b.delay().as_secs());
        }
        assert_eq!(&seen[..4], &[30, 60, 90, 120]);
        assert_eq!(seen[19], 600);
        assert!(seen.iter().all(|&s| s <= 600));
        b.started();
        assert_eq!((b.failures(), b.delay()), (0, Duration::ZERO));
        // A shorter step (tests) keeps the shape: +step per failure, at most 20 steps.
        let mut fast = StartBackoff::with_step(Duration::from_millis(100));
        let delays: Vec<u128> = (0..25)
            .map(|_| {
                fast.failed();
                fast.delay().as_millis()
            })
            .collect();
        assert_eq!(&delays[..3], &[100, 200, 300]);
        assert_eq!(delays[24], 2000);
    }
}
