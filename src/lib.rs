//! fleet: the core every process of the Sana text-to-image service shares.
//!
//! `job` (input schema, validation, billing), `events` (lifecycle messages on the result topic),
//! `queue` (RabbitMQ topology, confirmed publishing, consuming), `storage` (S3), `telemetry` (logging,
//! redaction of secrets), `signal` (the binaries' one shutdown signal). The `fleet-dispatcher` and
//! `fleet-worker` crates build on it; the models live in `sana-pipelines`, which knows nothing of this
//! crate (README, "Layout").

pub mod duration;
pub mod events;
pub mod job;
pub mod queue;
pub mod signal;
pub mod storage;
pub mod telemetry;
