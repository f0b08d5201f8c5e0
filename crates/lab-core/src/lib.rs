//! Plumbing every lab service shares, and nothing a lab is about.
//!
//! A lab crate should read like its idea: handlers, a domain core, a worker.
//! Everything a production service needs but that teaches nothing new from one
//! lab to the next lives here instead: reading config from the environment,
//! tracing, the shutdown signal, `/healthz` `/readyz` `/metrics`, the JSON
//! error body, getting a Postgres pool with its migrations applied, and a
//! Redis connection that reconnects by itself.
//!
//! Think twice before adding to this crate: it is for plumbing used the same
//! way by three or more labs, never for a lab's domain types.

pub mod amqp;
pub mod backoff;
pub mod config;
pub mod error;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod openapi;
pub mod postgres;
pub mod proxy;
pub mod redis;
pub mod shutdown;

pub use error::{ApiError, Json, Path, Query};
