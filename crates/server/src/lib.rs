//! The Strata server: the `strata.v1.FeatureStore` gRPC front end over the
//! engine (`strata-engine`: moka L1, Redis Cluster L2, sharded PostgreSQL
//! L3), its configuration, metrics, and the `strata` binary's commands.
//!
//! This is the only crate that knows gRPC status codes; the engine and the
//! tier crates report domain errors, mapped to statuses in `service`.

#![forbid(unsafe_code)]

pub mod admission;
pub mod auth;
pub mod backup;
pub mod cli;
mod client_errors;
pub mod config;
pub mod demo;
pub mod dev;
pub mod feast;
pub mod listener;
pub mod load;
pub mod metrics;
pub mod reshard;
mod server;
mod service;
pub mod tls;
mod vectors;
pub mod warm;

pub use server::{RunningServer, shutdown_signal};
