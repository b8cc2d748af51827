//! Strata's cache tiers, above the PostgreSQL source of truth:
//!
//! - [`L1Cache`]: in-process moka cache, bounded by bytes, with soft and
//!   hard expiry per entry and negative entries.
//! - [`L2Cache`]: a Redis Cluster through fred, every batch pipelined so
//!   each key goes to the node that owns its slot (no cross-slot commands),
//!   entries carrying their own soft expiry, and short leases (`SET NX PX`)
//!   so that of many server instances one reloads a key.
//! - [`SingleFlight`]: concurrent misses of one key in one process cause
//!   one load, across overlapping batches.
//! - [`RefreshQueue`]: bounded background reloads for refresh-ahead.
//!
//! Everything works on whole batches. This crate knows nothing about gRPC
//! or PostgreSQL; the server decides what to do with a miss or an error.

#![forbid(unsafe_code)]

mod l1;
mod l2;
mod refresh;
mod single_flight;

pub use l1::{Cached, L1Cache, L1Hit};
pub use l2::{L2Cache, L2Config, L2Error, L2Hit};
pub use refresh::{RefreshQueue, RefreshTier, Reloader};
pub use single_flight::{Claim, Leader, SingleFlight, Waiter};
