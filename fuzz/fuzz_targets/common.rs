//! The registry and limits every target validates against: one view with a
//! feature of every type.

#![allow(dead_code)]

use std::sync::{Arc, OnceLock};

use strata_core::{FeatureSpec, FeatureType, FeatureView, FeatureViewSpec, Registry, Row};
use strata_proto::Limits;

pub fn registry() -> &'static Registry {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let features = [
            ("i", FeatureType::Int64),
            ("d", FeatureType::Double),
            ("s", FeatureType::String),
            ("b", FeatureType::Bool),
            ("raw", FeatureType::Bytes),
            ("emb", FeatureType::FloatList),
            ("ids", FeatureType::Int64List),
            ("i32", FeatureType::Int32),
            ("f", FeatureType::Float),
            ("at", FeatureType::Timestamp),
        ];
        let spec = FeatureViewSpec::new(
            "v",
            features.iter().map(|(name, ty)| FeatureSpec { name: (*name).into(), ty: *ty }).collect(),
        );
        Registry::new(vec![spec]).expect("a valid registry")
    })
}

pub fn view() -> &'static Arc<FeatureView> {
    registry().get("v").expect("view v")
}

/// Small limits, so the fuzzer reaches them.
pub fn limits() -> Limits {
    Limits {
        max_keys_per_request: 8,
        max_key_bytes: 16,
        max_rows_per_write: 8,
        max_value_bytes: 64,
        ..Limits::default()
    }
}

/// What every accepted row must be: one value per feature, each of its
/// type or null, each within the value limit.
pub fn check_row(view: &FeatureView, row: &Row, limits: &Limits) {
    assert_eq!(row.values.len(), view.features.len());
    for (value, feature) in row.values.iter().zip(&view.features) {
        assert!(value.fits(feature.ty), "{value:?} stored as {}", feature.ty);
        assert!(value.payload_bytes() <= limits.max_value_bytes);
    }
}

pub fn check_key(key: &str, limits: &Limits) {
    assert!(!key.is_empty() && key.len() <= limits.max_key_bytes && !key.contains('\0'), "{key:?}");
}
