//! Strata's domain vocabulary, shared by every other crate: feature views and
//! their typed features (the registry), feature values, rows with their event
//! time, the compact encoding a row has in a cache, and the circuit breaker
//! and retry backoff every tier uses around its dependency.
//!
//! This crate knows nothing about gRPC, Redis or PostgreSQL; the crates that
//! talk to those translate to and from these types at their edges.

#![forbid(unsafe_code)]

mod codec;
mod entity;
mod registry;
mod resilience;
mod ttl;
mod value;

pub use codec::{Content, DecodeError, Entry, VERSION_OFFSET, decode_entry, encode_entry, version_bytes};
pub use entity::{COMPOSITE, Entity, EntityError, EntityKeyError, JoinKey, KeyType, KeyValue, OwnedKeyValue};
pub use registry::{
    EntitySpec, Feature, FeatureService, FeatureServiceSpec, FeatureSpec, FeatureView, FeatureViewSpec, Projection,
    ProjectionSpec, Registry, RegistryError,
};
pub use resilience::{Breaker, BreakerConfig, BreakerState, Call, Guarded, RetryPolicy, TIMEOUT_FLOOR};
pub use ttl::{Lifetime, jittered, soft_after};
pub use value::{EventTime, FeatureType, Row, Value};
