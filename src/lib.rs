//! fleet: the shared library of the Sana text-to-image service.
//!
//! The `worker` and `dispatcher` binaries are thin wiring over these modules:
//! `job` (input schema, validation, billing), `events` (lifecycle messages on the result topic),
//! `queue` (RabbitMQ topology, confirmed publishing, consuming), `storage` (S3), `pipelines`
//! (the candle models and samplers), `safety` (NSFW checkers), `telemetry` (logging, metrics).

pub mod dispatcher;
pub mod events;
pub mod job;
pub mod pipelines;
pub mod queue;
pub mod safety;
pub mod storage;
pub mod telemetry;
pub mod worker;
