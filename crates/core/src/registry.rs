use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::{Entity, EntityError, FeatureType, JoinKey};

/// An entity as declared in configuration: what a view's rows are about,
/// with its typed join keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntitySpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub join_keys: Vec<JoinKey>,
}

/// A feature service as declared in configuration: the features one model
/// reads, as projections of views, in order.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureServiceSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    pub projections: Vec<ProjectionSpec>,
}

/// Features of one view in a feature service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProjectionSpec {
    pub view: String,
    /// Which features, in this order; empty means all, in the view's order.
    #[serde(default)]
    pub features: Vec<String>,
    /// The name that prefixes the features in qualified output names
    /// (`alias__feature`) instead of the view's.
    #[serde(default)]
    pub alias: Option<String>,
}

/// A validated feature service.
#[derive(Debug)]
pub struct FeatureService {
    pub name: String,
    pub description: String,
    pub projections: Vec<Projection>,
}

/// Features of one view in a feature service, as column indexes of the view.
#[derive(Debug)]
pub struct Projection {
    pub view: Arc<FeatureView>,
    pub columns: Vec<usize>,
    /// Prefix of qualified output names: the alias, or the view's name.
    pub prefix: String,
}

/// A feature view as declared in configuration, before validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureViewSpec {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// The entity whose keys the view's rows are filed under; none means
    /// the implicit one, a single string `entity_key`.
    #[serde(default)]
    pub entity: Option<String>,
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
    /// Feast push sources whose pushes (`POST /push`) write into this view.
    #[serde(default)]
    pub push_sources: Vec<String>,
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
    /// What the view's keys are: their join keys and canonical encoding.
    pub entity: Arc<Entity>,
    pub features: Vec<Feature>,
    pub l1_ttl: Duration,
    pub l2_ttl: Duration,
    pub jitter: f64,
    pub refresh_ahead: f64,
    pub negative_ttl: Duration,
    pub max_age: Option<Duration>,
    /// Feast push sources that write into this view.
    pub push_sources: Vec<String>,
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
    #[error(
        "entity name {0:?} is not a valid identifier (lowercase letters, digits and '_', starting with a letter or '_', at most 63 bytes)"
    )]
    BadEntityName(String),
    #[error(
        "entity {entity}: join key name {join_key:?} is not a valid identifier or is reserved (entity_key, event_time, updated_at, deleted)"
    )]
    BadJoinKeyName { entity: String, join_key: String },
    #[error(transparent)]
    Entity(#[from] EntityError),
    #[error("entity {0} is declared twice")]
    DuplicateEntity(String),
    #[error("view {view}: entity {entity} is not declared")]
    UnknownEntity { view: String, entity: String },
    #[error("view {view}: feature {feature} has the name of a join key of entity {entity}")]
    FeatureNamedLikeJoinKey { view: String, feature: String, entity: String },
    #[error(
        "feature service name {0:?} is not a valid identifier (lowercase letters, digits and '_', starting with a letter or '_', at most 63 bytes)"
    )]
    BadServiceName(String),
    #[error("feature service {0} is declared twice")]
    DuplicateService(String),
    #[error("feature service {0}: has no projections")]
    EmptyService(String),
    #[error("feature service {service}: view {view} is not declared")]
    UnknownServiceView { service: String, view: String },
    #[error("feature service {service}: view {view} has no feature {feature}")]
    UnknownServiceFeature { service: String, view: String, feature: String },
    #[error("feature service {service}: {name} is named twice (give one projection an alias)")]
    DuplicateOutput { service: String, name: String },
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
            entity: None,
            features,
            l1_ttl: Duration::from_secs(30),
            l2_ttl: Duration::from_secs(600),
            jitter: default_jitter(),
            refresh_ahead: default_refresh_ahead(),
            negative_ttl: default_negative_ttl(),
            max_age: None,
            push_sources: Vec::new(),
        }
    }

    pub fn validate(self) -> Result<FeatureView, RegistryError> {
        let FeatureViewSpec {
            name,
            description,
            entity: _,
            features,
            l1_ttl,
            l2_ttl,
            jitter,
            refresh_ahead,
            negative_ttl,
            max_age,
            push_sources,
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
            entity: Arc::new(Entity::implicit()),
            features: features.into_iter().map(|f| Feature { name: f.name, ty: f.ty }).collect(),
            l1_ttl,
            l2_ttl,
            jitter,
            refresh_ahead,
            negative_ttl,
            max_age,
            push_sources,
            fingerprint,
            positions,
        })
    }
}

/// Every entity, feature view and feature service the server knows.
#[derive(Debug, Default)]
pub struct Registry {
    entities: Vec<Arc<Entity>>,
    views: Vec<Arc<FeatureView>>,
    by_name: HashMap<String, Arc<FeatureView>>,
    services: Vec<Arc<FeatureService>>,
    services_by_name: HashMap<String, Arc<FeatureService>>,
}

impl Registry {
    /// Views keyed by the implicit entity only.
    pub fn new(specs: Vec<FeatureViewSpec>) -> Result<Registry, RegistryError> {
        Registry::with(Vec::new(), specs, Vec::new())
    }

    pub fn with(
        entities: Vec<EntitySpec>,
        views: Vec<FeatureViewSpec>,
        services: Vec<FeatureServiceSpec>,
    ) -> Result<Registry, RegistryError> {
        let mut registry = Registry::default();
        let mut entities_by_name: HashMap<String, Arc<Entity>> = HashMap::new();
        for spec in entities {
            if !is_identifier(&spec.name) {
                return Err(RegistryError::BadEntityName(spec.name));
            }
            if let Some(key) =
                spec.join_keys.iter().find(|k| !is_identifier(&k.name) || RESERVED.contains(&k.name.as_str()))
            {
                return Err(RegistryError::BadJoinKeyName { entity: spec.name.clone(), join_key: key.name.clone() });
            }
            let mut entity = Entity::new(spec.name, spec.join_keys)?;
            entity.description = spec.description;
            let entity = Arc::new(entity);
            if entities_by_name.insert(entity.name.clone(), entity.clone()).is_some() {
                return Err(RegistryError::DuplicateEntity(entity.name.clone()));
            }
            registry.entities.push(entity);
        }
        for (id, spec) in views.into_iter().enumerate() {
            let entity =
                match &spec.entity {
                    None => None,
                    Some(name) => Some(entities_by_name.get(name).cloned().ok_or_else(|| {
                        RegistryError::UnknownEntity { view: spec.name.clone(), entity: name.clone() }
                    })?),
                };
            let mut view = spec.validate()?;
            view.id = u32::try_from(id).unwrap_or(u32::MAX);
            if let Some(entity) = entity {
                if let Some(f) = view.features.iter().find(|f| entity.join_keys().iter().any(|k| k.name == f.name)) {
                    return Err(RegistryError::FeatureNamedLikeJoinKey {
                        view: view.name.clone(),
                        feature: f.name.clone(),
                        entity: entity.name.clone(),
                    });
                }
                view.entity = entity;
            }
            let view = Arc::new(view);
            if registry.by_name.insert(view.name.clone(), view.clone()).is_some() {
                return Err(RegistryError::DuplicateView(view.name.clone()));
            }
            registry.views.push(view);
        }
        for spec in services {
            let service = Arc::new(registry.service_of(spec)?);
            if registry.services_by_name.insert(service.name.clone(), service.clone()).is_some() {
                return Err(RegistryError::DuplicateService(service.name.clone()));
            }
            registry.services.push(service);
        }
        Ok(registry)
    }

    fn service_of(&self, spec: FeatureServiceSpec) -> Result<FeatureService, RegistryError> {
        let FeatureServiceSpec { name, description, projections } = spec;
        if !is_identifier(&name) {
            return Err(RegistryError::BadServiceName(name));
        }
        if projections.is_empty() {
            return Err(RegistryError::EmptyService(name));
        }
        let mut outputs = std::collections::HashSet::new();
        let mut validated = Vec::with_capacity(projections.len());
        for p in projections {
            let Some(view) = self.get(&p.view) else {
                return Err(RegistryError::UnknownServiceView { service: name, view: p.view });
            };
            let columns = if p.features.is_empty() {
                (0..view.features.len()).collect()
            } else {
                let mut columns = Vec::with_capacity(p.features.len());
                for feature in &p.features {
                    let Some(c) = view.position(feature) else {
                        return Err(RegistryError::UnknownServiceFeature {
                            service: name,
                            view: p.view,
                            feature: feature.clone(),
                        });
                    };
                    columns.push(c);
                }
                columns
            };
            let prefix = p.alias.unwrap_or_else(|| view.name.clone());
            for &c in &columns {
                let output = format!("{prefix}__{}", view.features[c].name);
                if !outputs.insert(output.clone()) {
                    return Err(RegistryError::DuplicateOutput { service: name, name: output });
                }
            }
            validated.push(Projection { view: view.clone(), columns, prefix });
        }
        Ok(FeatureService { name, description, projections: validated })
    }

    pub fn get(&self, name: &str) -> Option<&Arc<FeatureView>> {
        self.by_name.get(name)
    }

    /// Views in declaration order.
    pub fn views(&self) -> &[Arc<FeatureView>] {
        &self.views
    }

    /// Declared entities, in declaration order (not the implicit one).
    pub fn entities(&self) -> &[Arc<Entity>] {
        &self.entities
    }

    pub fn service(&self, name: &str) -> Option<&Arc<FeatureService>> {
        self.services_by_name.get(name)
    }

    /// Feature services in declaration order.
    pub fn services(&self) -> &[Arc<FeatureService>] {
        &self.services
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

    fn entity(name: &str, keys: &[(&str, crate::KeyType)]) -> EntitySpec {
        EntitySpec {
            name: name.into(),
            description: String::new(),
            join_keys: keys.iter().map(|(n, ty)| JoinKey { name: (*n).into(), ty: *ty }).collect(),
        }
    }

    fn keyed(name: &str, entity: &str, features: &[(&str, FeatureType)]) -> FeatureViewSpec {
        let mut view = spec(name, features);
        view.entity = Some(entity.into());
        view
    }

    fn projection(view: &str, features: &[&str], alias: Option<&str>) -> ProjectionSpec {
        ProjectionSpec {
            view: view.into(),
            features: features.iter().map(|f| (*f).into()).collect(),
            alias: alias.map(Into::into),
        }
    }

    fn service(name: &str, projections: Vec<ProjectionSpec>) -> FeatureServiceSpec {
        FeatureServiceSpec { name: name.into(), description: String::new(), projections }
    }

    #[test]
    fn views_name_their_entity_and_services_project_views() {
        use crate::KeyType::{Int64, String as Str};
        let registry = Registry::with(
            vec![entity("user", &[("user_id", Int64)]), entity("user_item", &[("user_id", Int64), ("item_id", Str)])],
            vec![
                keyed("users", "user", &[("age", FeatureType::Int64), ("country", FeatureType::String)]),
                keyed("pairs", "user_item", &[("clicks", FeatureType::Int64)]),
                spec("legacy", &[("a", FeatureType::Int64)]),
            ],
            vec![service("ranker", vec![projection("pairs", &[], None), projection("users", &["country"], Some("u"))])],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(registry.get("users").map(|v| v.entity.name.as_str()), Some("user"));
        assert_eq!(registry.get("legacy").map(|v| v.entity.is_single_string()), Some(true));
        let ranker = registry.service("ranker").unwrap_or_else(|| panic!("no service"));
        let shape: Vec<(&str, &[usize], &str)> = ranker
            .projections
            .iter()
            .map(|p| (p.view.name.as_str(), p.columns.as_slice(), p.prefix.as_str()))
            .collect();
        assert_eq!(shape, [("pairs", &[0][..], "pairs"), ("users", &[1][..], "u")]);
        assert_eq!(registry.entities().len(), 2);
    }

    #[test]
    fn bad_entities_and_services_are_rejected_with_the_culprit_named() {
        use crate::KeyType::Int64;
        let users = || keyed("users", "user", &[("age", FeatureType::Int64)]);
        let user = || entity("user", &[("user_id", Int64)]);
        let err = |e: Vec<EntitySpec>, v: Vec<FeatureViewSpec>, s: Vec<FeatureServiceSpec>| {
            Registry::with(e, v, s).err().map(|e| e.to_string()).unwrap_or_default()
        };
        assert_eq!(err(vec![], vec![users()], vec![]), "view users: entity user is not declared");
        assert!(err(vec![entity("user", &[("event_time", Int64)])], vec![], vec![]).contains("\"event_time\""));
        assert_eq!(err(vec![user(), user()], vec![], vec![]), "entity user is declared twice");
        assert_eq!(
            err(vec![user()], vec![keyed("users", "user", &[("user_id", FeatureType::Int64)])], vec![]),
            "view users: feature user_id has the name of a join key of entity user"
        );
        let with = |s: FeatureServiceSpec| err(vec![user()], vec![users()], vec![s]);
        assert_eq!(with(service("s", vec![])), "feature service s: has no projections");
        assert_eq!(
            with(service("s", vec![projection("nope", &[], None)])),
            "feature service s: view nope is not declared"
        );
        assert_eq!(
            with(service("s", vec![projection("users", &["height"], None)])),
            "feature service s: view users has no feature height"
        );
        assert_eq!(
            with(service("s", vec![projection("users", &[], None), projection("users", &[], None)])),
            "feature service s: users__age is named twice (give one projection an alias)"
        );
        assert!(
            with(service("s", vec![projection("users", &[], None), projection("users", &[], Some("u2"))])).is_empty()
        );
    }
}
