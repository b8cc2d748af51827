use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::FeatureType;

/// A feature view as declared in configuration, before validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureViewSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub features: Vec<FeatureSpec>,
    /// How long a row may live in a server's in-process cache.
    #[serde(with = "humantime_serde")]
    pub l1_ttl: Duration,
    /// How long a row may live in Redis.
    #[serde(with = "humantime_serde")]
    pub l2_ttl: Duration,
    /// Each TTL is multiplied by a random factor in `1 ± jitter`, so entries
    /// filled together do not expire together.
    #[serde(default = "default_jitter")]
    pub jitter: f64,
    /// Soft expiry, as a fraction of the TTL: a hit past it is answered from
    /// the cache and schedules one background reload.
    #[serde(default = "default_refresh_ahead")]
    pub refresh_ahead: f64,
    /// How long "this key does not exist" is cached, in L1 and L2.
    #[serde(default = "default_negative_ttl", with = "humantime_serde")]
    pub negative_ttl: Duration,
    /// Values whose event time is older than this are answered with status
    /// OUTSIDE_MAX_AGE. None: no limit.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
}

fn default_jitter() -> f64 {
    0.1
}

fn default_refresh_ahead() -> f64 {
    0.8
}

fn default_negative_ttl() -> Duration {
    Duration::from_secs(5)
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureSpec {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: FeatureType,
}

/// A validated feature view: a named set of typed features stored together,
/// one row per entity key.
#[derive(Debug)]
pub struct FeatureView {
    /// Position in the registry; a compact stand-in for the name in cache keys.
    pub id: u32,
    pub name: String,
    pub description: String,
    pub features: Vec<Feature>,
    pub l1_ttl: Duration,
    pub l2_ttl: Duration,
    pub jitter: f64,
    pub refresh_ahead: f64,
    pub negative_ttl: Duration,
    pub max_age: Option<Duration>,
    /// Hash of the feature names and types, in order. A cached row encoded
    /// under another fingerprint belongs to an older shape of the view and
    /// is treated as a miss.
    pub fingerprint: u32,
    positions: HashMap<String, usize>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Feature {
    pub name: String,
    pub ty: FeatureType,
}

impl FeatureView {
    /// The column index of a feature, by name.
    pub fn position(&self, feature: &str) -> Option<usize> {
        self.positions.get(feature).copied()
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RegistryError {
    #[error(
        "view name {0:?} is not a valid identifier (lowercase letters, digits and '_', starting with a letter or '_', at most 63 bytes)"
    )]
    BadViewName(String),
    #[error(
        "view {view}: feature name {feature:?} is not a valid identifier (lowercase letters, digits and '_', starting with a letter or '_', at most 63 bytes)"
    )]
    BadFeatureName { view: String, feature: String },
    #[error("view {view}: feature name {feature:?} is reserved")]
    ReservedFeatureName { view: String, feature: String },
    #[error("view {view}: feature {feature:?} is declared twice")]
    DuplicateFeature { view: String, feature: String },
    #[error("view {0}: declares no features")]
    NoFeatures(String),
    #[error("view {view}: {field} must be greater than zero")]
    ZeroTtl { view: String, field: &'static str },
    #[error("view {view}: {field} must be between {min} and {max}, not {value}")]
    OutOfRange { view: String, field: &'static str, min: f64, max: f64, value: f64 },
    #[error("view {0} is declared twice")]
    DuplicateView(String),
}

/// Column names every view table has besides its features.
const RESERVED: [&str; 4] = ["entity_key", "event_time", "updated_at", "deleted"];

fn is_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some('a'..='z' | '_'))
        && chars.all(|c| matches!(c, 'a'..='z' | '0'..='9' | '_'))
        && s.len() <= 63
}

impl FeatureViewSpec {
    /// A view with the default TTL policy: 30s in L1, 10m in L2, the
    /// default jitter, refresh-ahead point and negative TTL, no max age.
    pub fn new(name: &str, features: Vec<FeatureSpec>) -> FeatureViewSpec {
        FeatureViewSpec {
            name: name.to_owned(),
            description: String::new(),
            features,
            l1_ttl: Duration::from_secs(30),
            l2_ttl: Duration::from_secs(600),
            jitter: default_jitter(),
            refresh_ahead: default_refresh_ahead(),
            negative_ttl: default_negative_ttl(),
            max_age: None,
        }
    }

    pub fn validate(self) -> Result<FeatureView, RegistryError> {
        let FeatureViewSpec {
            name,
            description,
            features,
            l1_ttl,
            l2_ttl,
            jitter,
            refresh_ahead,
            negative_ttl,
            max_age,
        } = self;
        if !is_identifier(&name) {
            return Err(RegistryError::BadViewName(name));
        }
        if features.is_empty() {
            return Err(RegistryError::NoFeatures(name));
        }
        for (field, value, min, max) in [("jitter", jitter, 0.0, 0.5), ("refresh_ahead", refresh_ahead, 0.1, 1.0)] {
            // Written so that NaN is out of range too.
            if !(value >= min && value <= max) {
                return Err(RegistryError::OutOfRange { view: name, field, min, max, value });
            }
        }
        for (field, ttl) in [("l1_ttl", l1_ttl), ("l2_ttl", l2_ttl), ("negative_ttl", negative_ttl)] {
            if ttl.is_zero() {
                return Err(RegistryError::ZeroTtl { view: name, field });
            }
        }
        let mut positions = HashMap::with_capacity(features.len());
        let mut shape = String::new();
        for (i, f) in features.iter().enumerate() {
            if !is_identifier(&f.name) {
                return Err(RegistryError::BadFeatureName { view: name, feature: f.name.clone() });
            }
            if RESERVED.contains(&f.name.as_str()) {
                return Err(RegistryError::ReservedFeatureName { view: name, feature: f.name.clone() });
            }
            if positions.insert(f.name.clone(), i).is_some() {
                return Err(RegistryError::DuplicateFeature { view: name, feature: f.name.clone() });
            }
            shape.push_str(&f.name);
            shape.push(':');
            shape.push_str(f.ty.name());
            shape.push(';');
        }
        // Truncation keeps 32 bits of a 64-bit hash: enough to tell shapes apart.
        let fingerprint = xxh3_64(shape.as_bytes()) as u32;
        Ok(FeatureView {
            id: 0,
            name,
            description,
            features: features.into_iter().map(|f| Feature { name: f.name, ty: f.ty }).collect(),
            l1_ttl,
            l2_ttl,
            jitter,
            refresh_ahead,
            negative_ttl,
            max_age,
            fingerprint,
            positions,
        })
    }
}

/// Every feature view the server knows, by name.
#[derive(Debug, Default)]
pub struct Registry {
    views: Vec<Arc<FeatureView>>,
    by_name: HashMap<String, Arc<FeatureView>>,
}

impl Registry {
    pub fn new(specs: Vec<FeatureViewSpec>) -> Result<Registry, RegistryError> {
        let mut registry = Registry::default();
        for (id, spec) in specs.into_iter().enumerate() {
            let mut view = spec.validate()?;
            view.id = u32::try_from(id).unwrap_or(u32::MAX);
            let view = Arc::new(view);
            if registry.by_name.insert(view.name.clone(), view.clone()).is_some() {
                return Err(RegistryError::DuplicateView(view.name.clone()));
            }
            registry.views.push(view);
        }
        Ok(registry)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<FeatureView>> {
        self.by_name.get(name)
    }

    /// Views in declaration order.
    pub fn views(&self) -> &[Arc<FeatureView>] {
        &self.views
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, features: &[(&str, FeatureType)]) -> FeatureViewSpec {
        FeatureViewSpec::new(name, features.iter().map(|(n, ty)| FeatureSpec { name: (*n).into(), ty: *ty }).collect())
    }

    #[test]
    fn positions_follow_declaration_order() {
        let view = spec("v", &[("a", FeatureType::Int64), ("b", FeatureType::String)]).validate().unwrap();
        assert_eq!(view.position("a"), Some(0));
        assert_eq!(view.position("b"), Some(1));
        assert_eq!(view.position("c"), None);
    }

    #[test]
    fn fingerprint_changes_with_shape_but_not_with_ttl() {
        let a = spec("v", &[("a", FeatureType::Int64)]).validate().unwrap();
        let mut longer = spec("v", &[("a", FeatureType::Int64)]);
        longer.l1_ttl = Duration::from_secs(1);
        assert_eq!(a.fingerprint, longer.validate().unwrap().fingerprint);
        let retyped = spec("v", &[("a", FeatureType::Double)]).validate().unwrap();
        assert_ne!(a.fingerprint, retyped.fingerprint);
    }

    #[test]
    fn invalid_declarations_are_rejected_with_the_offending_name() {
        let err = spec("Bad-Name", &[("a", FeatureType::Int64)]).validate().unwrap_err();
        assert_eq!(err, RegistryError::BadViewName("Bad-Name".into()));
        let err = spec("v", &[("a", FeatureType::Int64), ("a", FeatureType::Bool)]).validate().unwrap_err();
        assert!(err.to_string().contains("\"a\" is declared twice"), "{err}");
        let err = spec("v", &[("event_time", FeatureType::Int64)]).validate().unwrap_err();
        assert!(matches!(err, RegistryError::ReservedFeatureName { .. }));
        let mut jittery = spec("v", &[("a", FeatureType::Int64)]);
        jittery.jitter = 0.9;
        assert_eq!(jittery.validate().unwrap_err().to_string(), "view v: jitter must be between 0 and 0.5, not 0.9");
        let err = spec("v", &[]).validate().unwrap_err();
        assert_eq!(err, RegistryError::NoFeatures("v".into()));
        let err = Registry::new(vec![spec("v", &[("a", FeatureType::Int64)]), spec("v", &[("b", FeatureType::Int64)])])
            .unwrap_err();
        assert_eq!(err, RegistryError::DuplicateView("v".into()));
    }
}
