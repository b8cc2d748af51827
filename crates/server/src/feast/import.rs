//! `strata feast import`: Strata's entities, views and feature services
//! from the registry that `feast apply` writes (a file registry is one
//! serialized `feast.core.Registry`), as configuration to add to Strata's,
//! so definitions are written once. What has no Strata equivalent is listed
//! (in the output, as comments, and by the CLI on stderr), never dropped
//! silently.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use prost::Message as _;
use strata_core::{FeatureType, KeyType, Registry};
use strata_proto::feast::core::{self as fc, data_source::SourceType};
use strata_proto::feast::types::value_type::Enum as FeastType;

use crate::config::FileConfig;

/// The configuration made from a registry, and what was left out.
#[derive(Debug)]
pub struct Imported {
    /// TOML: `[[entities]]`, `[[views]]`, `[[feature_services]]`.
    pub toml: String,
    /// One line per object or feature not imported, saying why.
    pub skipped: Vec<String>,
    pub project: String,
}

/// Reads a registry's bytes; `project` chooses one where it holds several.
pub fn import(registry: &[u8], project: Option<&str>) -> Result<Imported> {
    let registry = fc::Registry::decode(registry).context("not a Feast registry (feast.core.Registry)")?;
    let project = choose_project(&registry, project)?;
    let in_project = |p: &str| p == project;
    let mut skipped = Vec::new();

    let feast_entities: BTreeMap<&str, &fc::EntitySpecV2> = registry
        .entities
        .iter()
        .filter_map(|e| e.spec.as_ref())
        .filter(|e| in_project(&e.project))
        .map(|e| (e.name.as_str(), e))
        .collect();

    let mut entities: BTreeMap<String, Vec<(String, KeyType)>> = BTreeMap::new();
    let mut views: Vec<(String, String)> = Vec::new(); // (name, TOML)
    let mut imported: BTreeMap<String, Vec<String>> = BTreeMap::new(); // view -> features
    for spec in registry.feature_views.iter().filter_map(|v| v.spec.as_ref()).filter(|v| in_project(&v.project)) {
        let name = &spec.name;
        if !spec.online {
            skipped.push(format!("feature view {name}: not online"));
            continue;
        }
        let join_keys = match join_keys(spec, &feast_entities) {
            Ok(keys) => keys,
            Err(why) => {
                skipped.push(format!("feature view {name}: {why}"));
                continue;
            }
        };
        let entity = spec.entities.join("_");
        if let Some(existing) = entities.get(&entity)
            && *existing != join_keys
        {
            skipped.push(format!("feature view {name}: entity {entity} has other join keys in another view"));
            continue;
        }
        entities.insert(entity.clone(), join_keys);

        let mut features = Vec::new();
        for feature in &spec.features {
            match feature_type(feature.value_type) {
                Ok(ty) => features.push((feature.name.clone(), ty)),
                Err(why) => skipped.push(format!("feature {name}:{}: {why}", feature.name)),
            }
        }
        if features.is_empty() {
            skipped.push(format!("feature view {name}: no feature of a type Strata stores"));
            continue;
        }
        let mut toml = String::new();
        let _ = writeln!(toml, "[[views]]\nname = {}\nentity = {}", quote(name), quote(&entity));
        if !spec.description.is_empty() {
            let _ = writeln!(toml, "description = {}", quote(&spec.description));
        }
        // Strata's caches are its own: Feast has no such settings.
        toml.push_str("l1_ttl = \"30s\"\nl2_ttl = \"10m\"\n");
        if let Some(ttl) = spec.ttl.filter(|t| t.seconds > 0 || t.nanos > 0) {
            let _ = writeln!(toml, "# Feast's TTL\nmax_age = \"{}s\"", ttl.seconds);
        }
        let push: Vec<&str> = [&spec.stream_source, &spec.batch_source]
            .into_iter()
            .flatten()
            .filter(|s| s.r#type == SourceType::PushSource as i32 && !s.name.is_empty())
            .map(|s| s.name.as_str())
            .collect();
        if !push.is_empty() {
            let list: Vec<String> = push.iter().map(|s| quote(s)).collect();
            let _ = writeln!(toml, "push_sources = [{}]", list.join(", "));
        }
        toml.push_str("features = [\n");
        for (feature, ty) in &features {
            let _ = writeln!(toml, "  {{ name = {}, type = \"{}\" }},", quote(feature), ty.name());
        }
        toml.push_str("]\n");
        imported.insert(name.clone(), features.into_iter().map(|(n, _)| n).collect());
        views.push((name.clone(), toml));
    }

    let mut services = Vec::new();
    'services: for spec in
        registry.feature_services.iter().filter_map(|s| s.spec.as_ref()).filter(|s| in_project(&s.project))
    {
        let mut toml = format!("[[feature_services]]\nname = {}\n", quote(&spec.name));
        if !spec.description.is_empty() {
            let _ = writeln!(toml, "description = {}", quote(&spec.description));
        }
        toml.push_str("projections = [\n");
        for projection in &spec.features {
            let view = &projection.feature_view_name;
            let Some(features) = imported.get(view) else {
                skipped.push(format!("feature service {}: its view {view} is not imported", spec.name));
                continue 'services;
            };
            let columns: Vec<&str> = projection.feature_columns.iter().map(|c| c.name.as_str()).collect();
            if let Some(missing) = columns.iter().find(|c| !features.iter().any(|f| f == *c)) {
                skipped.push(format!("feature service {}: feature {view}:{missing} is not imported", spec.name));
                continue 'services;
            }
            let list: Vec<String> = columns.iter().map(|c| quote(c)).collect();
            let _ = write!(toml, "  {{ view = {}, features = [{}]", quote(view), list.join(", "));
            if !projection.feature_view_name_alias.is_empty() {
                let _ = write!(toml, ", alias = {}", quote(&projection.feature_view_name_alias));
            }
            toml.push_str(" },\n");
        }
        toml.push_str("]\n");
        services.push(toml);
    }

    for (kind, names) in [
        (
            "on-demand feature view",
            names(
                registry
                    .on_demand_feature_views
                    .iter()
                    .filter_map(|v| v.spec.as_ref())
                    .filter(|v| in_project(&v.project))
                    .map(|v| &v.name),
            ),
        ),
        (
            "stream feature view",
            names(
                registry
                    .stream_feature_views
                    .iter()
                    .filter_map(|v| v.spec.as_ref())
                    .filter(|v| in_project(&v.project))
                    .map(|v| &v.name),
            ),
        ),
        ("feature table", names(registry.feature_tables.iter().filter_map(|v| v.spec.as_ref()).map(|v| &v.name))),
        ("label view", names(registry.label_views.iter().filter_map(|v| v.spec.as_ref()).map(|v| &v.name))),
    ] {
        for name in names {
            skipped.push(format!("{kind} {name}: Strata has no equivalent"));
        }
    }

    let mut toml = format!(
        "# Strata's definitions of Feast project {project}, made by `strata feast import`.\n\
         # Add them to Strata's configuration (a file of its own after -c works);\n\
         # l1_ttl and l2_ttl are Strata's cache lifetimes, Feast has none: adjust them.\n\n"
    );
    for (name, join_keys) in &entities {
        let keys: Vec<String> = join_keys
            .iter()
            .map(|(key, ty)| format!("{{ name = {}, type = \"{}\" }}", quote(key), ty.name()))
            .collect();
        let _ = writeln!(toml, "[[entities]]\nname = {}\njoin_keys = [{}]\n", quote(name), keys.join(", "));
    }
    for (_, view) in &views {
        toml.push_str(view);
        toml.push('\n');
    }
    for service in &services {
        toml.push_str(service);
        toml.push('\n');
    }
    if !skipped.is_empty() {
        toml.push_str("# Not imported:\n");
        for line in &skipped {
            let _ = writeln!(toml, "# - {line}");
        }
    }
    check(&toml)?;
    Ok(Imported { toml, skipped, project })
}

fn names<'a>(names: impl Iterator<Item = &'a String>) -> Vec<&'a str> {
    names.map(String::as_str).collect()
}

/// The project to import: the one asked for, or the registry's only one.
fn choose_project(registry: &fc::Registry, asked: Option<&str>) -> Result<String> {
    let mut projects: Vec<&str> = registry
        .feature_views
        .iter()
        .filter_map(|v| v.spec.as_ref().map(|s| s.project.as_str()))
        .chain(registry.entities.iter().filter_map(|e| e.spec.as_ref().map(|s| s.project.as_str())))
        .chain(registry.projects.iter().filter_map(|p| p.spec.as_ref().map(|s| s.name.as_str())))
        .collect();
    projects.sort_unstable();
    projects.dedup();
    match (asked, projects.as_slice()) {
        (Some(asked), known) if known.contains(&asked) => Ok(asked.to_owned()),
        (Some(asked), known) => bail!("the registry has no project {asked:?} (it has {})", known.join(", ")),
        (None, [only]) => Ok((*only).to_owned()),
        (None, []) => bail!("the registry is empty"),
        (None, known) => bail!("the registry holds projects {}: choose one with --project", known.join(", ")),
    }
}

/// The join keys of a view: its entity columns (which carry their types),
/// else its entities' join keys.
fn join_keys(
    spec: &fc::FeatureViewSpec,
    entities: &BTreeMap<&str, &fc::EntitySpecV2>,
) -> Result<Vec<(String, KeyType)>, String> {
    if spec.entities.is_empty() || spec.entities.iter().any(|e| e == "__dummy") {
        return Err("it has no entity (Strata keys such a view by entity_key; give it one)".into());
    }
    let columns: Vec<(String, i32)> = if spec.entity_columns.is_empty() {
        spec.entities
            .iter()
            .map(|e| {
                let entity =
                    entities.get(e.as_str()).ok_or_else(|| format!("its entity {e} is not in the registry"))?;
                Ok((entity.join_key.clone(), entity.value_type))
            })
            .collect::<Result<_, String>>()?
    } else {
        spec.entity_columns.iter().map(|c| (c.name.clone(), c.value_type)).collect()
    };
    let mut keys = Vec::with_capacity(columns.len());
    for (name, ty) in columns {
        let ty = match FeastType::try_from(ty) {
            Ok(FeastType::Int64 | FeastType::Int32) => KeyType::Int64,
            Ok(FeastType::String) => KeyType::String,
            Ok(FeastType::Bytes) => KeyType::Bytes,
            other => return Err(format!("join key {name} is {}, not int64, int32, string or bytes", type_name(other))),
        };
        keys.push((name, ty));
    }
    // Strata's encoding orders join keys by name.
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(keys)
}

/// Strata's type for a Feast feature type, of the same width.
fn feature_type(ty: i32) -> Result<FeatureType, String> {
    match FeastType::try_from(ty) {
        Ok(FeastType::Int64) => Ok(FeatureType::Int64),
        Ok(FeastType::Int32) => Ok(FeatureType::Int32),
        Ok(FeastType::Float) => Ok(FeatureType::Float),
        Ok(FeastType::UnixTimestamp) => Ok(FeatureType::Timestamp),
        Ok(FeastType::Double) => Ok(FeatureType::Double),
        Ok(FeastType::String) => Ok(FeatureType::String),
        Ok(FeastType::Bool) => Ok(FeatureType::Bool),
        Ok(FeastType::Bytes) => Ok(FeatureType::Bytes),
        Ok(FeastType::FloatList) => Ok(FeatureType::FloatList),
        Ok(FeastType::Int64List) => Ok(FeatureType::Int64List),
        other => Err(format!("type {} has no Strata equivalent yet", type_name(other))),
    }
}

fn type_name(ty: Result<FeastType, prost::UnknownEnumValue>) -> String {
    match ty {
        Ok(ty) => ty.as_str_name().to_owned(),
        Err(prost::UnknownEnumValue(n)) => format!("value type {n}"),
    }
}

/// A TOML basic string.
fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The output is configuration Strata accepts.
fn check(toml: &str) -> Result<()> {
    let file = FileConfig::from_toml(toml).context("the imported configuration does not parse (a bug)")?;
    Registry::with(file.entities, file.views, file.feature_services)
        .context("the imported definitions are not a valid registry")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(name: &str, entities: &[&str], features: &[(&str, FeastType)]) -> fc::FeatureView {
        fc::FeatureView {
            spec: Some(fc::FeatureViewSpec {
                name: name.into(),
                project: "p".into(),
                entities: entities.iter().map(|e| (*e).to_owned()).collect(),
                features: features
                    .iter()
                    .map(|(n, t)| fc::FeatureSpecV2 { name: (*n).into(), value_type: *t as i32, ..Default::default() })
                    .collect(),
                online: true,
                ..Default::default()
            }),
        }
    }

    #[test]
    fn what_strata_cannot_hold_is_listed_and_the_rest_imported() {
        let entity = |name: &str, key: &str, ty: FeastType| fc::Entity {
            spec: Some(fc::EntitySpecV2 {
                name: name.into(),
                project: "p".into(),
                join_key: key.into(),
                value_type: ty as i32,
                ..Default::default()
            }),
        };
        let registry = fc::Registry {
            entities: vec![entity("user", "user_id", FeastType::Int32), entity("geo", "point", FeastType::DoubleList)],
            feature_views: vec![
                view("users", &["user"], &[("age", FeastType::Int32), ("seen", FeastType::StringList)]),
                view("places", &["geo"], &[("n", FeastType::Int64)]),
                view("global", &["__dummy"], &[("n", FeastType::Int64)]),
            ],
            feature_services: vec![fc::FeatureService {
                spec: Some(fc::FeatureServiceSpec {
                    name: "model".into(),
                    project: "p".into(),
                    features: vec![fc::FeatureViewProjection {
                        feature_view_name: "users".into(),
                        feature_columns: vec![fc::FeatureSpecV2 { name: "seen".into(), ..Default::default() }],
                        ..Default::default()
                    }],
                    ..Default::default()
                }),
            }],
            on_demand_feature_views: vec![fc::OnDemandFeatureView {
                spec: Some(fc::OnDemandFeatureViewSpec { name: "odfv".into(), project: "p".into() }),
            }],
            ..Default::default()
        };
        let imported = import(&registry.encode_to_vec(), None).unwrap();
        assert_eq!(
            imported.skipped,
            [
                "feature users:seen: type STRING_LIST has no Strata equivalent yet",
                "feature view places: join key point is DOUBLE_LIST, not int64, int32, string or bytes",
                "feature view global: it has no entity (Strata keys such a view by entity_key; give it one)",
                "feature service model: feature users:seen is not imported",
                "on-demand feature view odfv: Strata has no equivalent",
            ]
        );
        let file = FileConfig::from_toml(&imported.toml).unwrap();
        assert_eq!(file.views.len(), 1);
        assert_eq!(file.entities[0].join_keys[0].ty, KeyType::Int64, "an int32 join key is an int64 one");
        assert_eq!(file.views[0].features[0].ty, FeatureType::Int32, "an int32 feature keeps its width");
        assert!(import(b"\xff\xff", None).is_err());
        assert!(import(&registry.encode_to_vec(), Some("q")).unwrap_err().to_string().contains("no project \"q\""));
    }
}
