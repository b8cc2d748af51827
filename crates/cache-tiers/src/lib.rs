//! Strata's cache tiers, above the PostgreSQL source of truth:
//!
//! - [`L1Cache`]: in-process moka cache, bounded by bytes, TTL per view.
//! - [`L2Cache`]: a Redis Cluster through fred, every batch pipelined so
//!   each key goes to the node that owns its slot (no cross-slot commands).
//!
//! Both work on whole batches. This crate knows nothing about gRPC or
//! PostgreSQL; the server decides what to do with a miss or an error.

#![forbid(unsafe_code)]

mod l1;
mod l2;

pub use l1::L1Cache;
pub use l2::{L2Cache, L2Config, L2Error};
