//! One `worker serve` child of the supervisor: spawned on a slot (`CUDA_VISIBLE_DEVICES` for a GPU slot)
//! with `--http 127.0.0.1:0`, its listener address read from the `http <address>` line it prints on
//! stdout, its state read from its `/metrics`, stopped with SIGTERM (the worker drains).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::watch;

/// A place a worker can run: one GPU, or one CPU slot (tests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Index in the supervisor's slot list.
    pub index: usize,
    /// `CUDA_VISIBLE_DEVICES` of the worker on this slot; `None` for a CPU slot (left as inherited).
    pub gpu: Option<String>,
}

/// How to start a worker.
#[derive(Debug, Clone)]
pub struct ChildSpec {
    pub exe: PathBuf,
    /// Arguments after `serve`. The supervisor sets `--worker-id`, `--http`, `--max-concurrency` and
    /// `--keep-alive` itself; these must not repeat them (clap rejects a repeated flag).
    pub args: Vec<String>,
    pub max_multiplexing: u32,
}

/// What the supervisor reads from a child's `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    /// `fleet_worker_phase`: 0 starting, 1 ready, 2 draining.
    pub phase: u8,
    pub in_flight: u32,
    /// Settled deliveries of any outcome.
    pub jobs: u64,
    pub idle_seconds: f64,
}

impl Reading {
    /// Parses the samples the supervisor needs from a Prometheus text body; `None` when one is missing.
    pub fn parse(text: &str) -> Option<Reading> {
        let value = |name: &str| {
            text.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .strip_prefix(' ')?
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
        };
        let jobs: f64 = text
            .lines()
            .filter(|l| l.starts_with("fleet_worker_jobs_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        Some(Reading {
            phase: value("fleet_worker_phase")? as u8,
            in_flight: value("fleet_worker_jobs_in_flight")?.max(0.0) as u32,
            jobs: jobs as u64,
            idle_seconds: value("fleet_worker_idle_seconds")?,
        })
    }
}

/// A running child.
pub struct WorkerChild {
    pub id: String,
    pub slot: Slot,
    pub started_at: Instant,
    /// When it first reported ready; `None` while starting.
    pub ready_at: Option<Instant>,
    /// SIGTERM sent: it drains and exits on its own.
    pub draining: bool,
    /// The last reading of its `/metrics`.
    pub reading: Option<Reading>,
    process: Child,
    addr: watch::Receiver<Option<SocketAddr>>,
}

impl WorkerChild {
    /// Starts `worker serve` on `slot`. The child's stderr (its log) is the supervisor's stderr.
    pub fn spawn(spec: &ChildSpec, slot: Slot, id: String) -> std::io::Result<Self> {
        let mut cmd = Command::new(&spec.exe);
        cmd.arg("serve")
            .args(["--worker-id", &id])
            .args(["--http", "127.0.0.1:0"])
            .args(["--max-concurrency", &spec.max_multiplexing.to_string()])
            // The supervisor decides when a worker goes (keep-alive is its policy's, not the worker's).
            .args(["--keep-alive", "0"])
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        if let Some(gpu) = &slot.gpu {
            cmd.env("CUDA_VISIBLE_DEVICES", gpu);
        }
        let mut process = cmd.spawn()?;
        let (tx, addr) = watch::channel(None);
        if let Some(stdout) = process.stdout.take() {
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(a) = line.strip_prefix("http ") {
                        if let Ok(a) = a.trim().parse::<SocketAddr>() {
                            let _ = tx.send(Some(a));
                        }
                    }
                }
            });
        }
        Ok(WorkerChild {
            id,
            slot,
            started_at: Instant::now(),
            ready_at: None,
            draining: false,
            reading: None,
            process,
            addr,
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.id()
    }

    /// The exit status once the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        match self.process.try_wait() {
            Ok(status) => status,
            Err(e) => {
                tracing::warn!(worker = %self.id, error = %e, "cannot poll the worker process");
                None
            }
        }
    }

    /// Reads `/metrics` (bounded by `timeout`); keeps the last reading when the child does not answer.
    pub async fn poll(&mut self, http: &reqwest::Client, timeout: Duration) {
        let Some(addr) = *self.addr.borrow() else {
            return;
        };
        let read = async {
            let resp = http.get(format!("http://{addr}/metrics")).send().await?;
            resp.text().await
        };
        match tokio::time::timeout(timeout, read).await {
            Ok(Ok(text)) => match Reading::parse(&text) {
                Some(r) => self.reading = Some(r),
                None => tracing::warn!(worker = %self.id, "metrics without the worker's samples"),
            },
            Ok(Err(e)) => tracing::debug!(worker = %self.id, error = %e, "metrics not read"),
            Err(_) => tracing::debug!(worker = %self.id, "metrics read timed out"),
        }
    }

    /// SIGTERM: the worker cancels its consumers, finishes and acks its jobs, and exits.
    pub fn terminate(&mut self) {
        self.draining = true;
        let Some(pid) = self.pid() else { return };
        let Ok(pid) = libc::pid_t::try_from(pid) else {
            return;
        };
        // SAFETY: kill(2) with a pid of our own child and a valid signal number has no memory effects.
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        if rc != 0 {
            tracing::warn!(worker = %self.id, error = %std::io::Error::last_os_error(), "SIGTERM failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reading_sums_jobs_of_every_outcome() {
        let text = "# HELP x\n\
            fleet_worker_idle_seconds 12.5\n\
            fleet_worker_jobs_in_flight 0\n\
            fleet_worker_jobs_total{endpoint=\"sprint\",outcome=\"completed\"} 3\n\
            fleet_worker_jobs_total{endpoint=\"base\",outcome=\"failed\"} 1\n\
            fleet_worker_phase 1\n";
        assert_eq!(
            Reading::parse(text),
            Some(Reading {
                phase: 1,
                in_flight: 0,
                jobs: 4,
                idle_seconds: 12.5
            })
        );
        assert_eq!(Reading::parse("fleet_worker_phase 1\n"), None);
    }
}
