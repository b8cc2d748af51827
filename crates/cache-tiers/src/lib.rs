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
//! - [`InvalidationListener`]: drops keys written elsewhere from L1, as
//!   announced over Redis pub/sub; clears L1 when announcements may have
//!   been missed.
//!
//! Stale-set protection: every Redis store compares event times in a Lua
//! script (an older value never replaces a newer one), and an L1 fill is
//! refused for keys invalidated after its load began ([`Stamp`]).
//!
//! Everything works on whole batches. This crate knows nothing about gRPC
//! or PostgreSQL; the server decides what to do with a miss or an error.

#![forbid(unsafe_code)]

mod invalidation;
mod l1;
mod l2;
mod refresh;
mod single_flight;

pub use invalidation::{
    Invalidation, InvalidationListener, KEYS_PER_MESSAGE, decode_invalidation, invalidation_messages,
};
pub use l1::{Cached, L1Cache, L1Hit, Stamp};
pub use l2::{L2Cache, L2Config, L2Error, L2Hit, Put, RedisTls, hash_tag};
pub use refresh::{RefreshQueue, RefreshTier, Reloader};
pub use single_flight::{Claim, Leader, SingleFlight, Waiter};
