//! Validation of GetFeatureVectors: feature references or a service, and
//! entity rows given column-wise, turned into one batch of distinct keys
//! per view.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use strata_core::{FeatureView, KeyValue, Registry};

use crate::convert::{
    InvalidRequest, Limits, echo, encode_key_bytes, join_key_list, key_text_of, key_value_from_wire, view,
};
use crate::v1;

/// Feature references per request at most.
pub const MAX_FEATURES_PER_REQUEST: usize = 1_000;

/// A validated GetFeatureVectors request.
#[derive(Debug)]
pub struct VectorsRead {
    /// Output names, in answer order.
    pub names: Vec<String>,
    /// Entity rows.
    pub rows: usize,
    /// One read per view, in order of first reference.
    pub views: Vec<ViewRead>,
    /// Answer one group per view (values once per distinct key) rather
    /// than one vector per row.
    pub grouped: bool,
}

/// What one view contributes to a GetFeatureVectors answer.
#[derive(Debug)]
pub struct ViewRead {
    pub view: Arc<FeatureView>,
    /// `(column in the view, position in the answer)`.
    pub outputs: Vec<(usize, usize)>,
    /// Distinct key texts of the view's entity, in first-seen order.
    pub keys: Vec<String>,
    /// For each entity row, its key's index in `keys`.
    pub slot_of: Vec<usize>,
}

/// Validates a GetFeatureVectors request against the registry; every
/// reference and every join key value is checked before anything is read.
pub fn vectors_request(
    request: v1::GetFeatureVectorsRequest,
    registry: &Registry,
    limits: &Limits,
) -> Result<VectorsRead, InvalidRequest> {
    let v1::GetFeatureVectorsRequest { features, feature_service, entities, full_feature_names, grouped } = request;
    // (view, column, qualified prefix)
    let wanted = resolve(registry, features, &feature_service)?;
    if wanted.len() > MAX_FEATURES_PER_REQUEST {
        return Err(InvalidRequest::TooManyFeatures { count: wanted.len(), limit: MAX_FEATURES_PER_REQUEST });
    }
    let rows = check_columns(&entities, limits)?;

    let mut names = Vec::with_capacity(wanted.len());
    let mut seen_names: HashMap<String, ()> = HashMap::with_capacity(wanted.len());
    let mut views: Vec<ViewRead> = Vec::new();
    for (position, (view, column, prefix)) in wanted.into_iter().enumerate() {
        let feature = &view.features[column].name;
        let name = if full_feature_names { format!("{prefix}__{feature}") } else { feature.clone() };
        if seen_names.insert(name.clone(), ()).is_some() {
            return Err(InvalidRequest::DuplicateOutput(name));
        }
        names.push(name);
        match views.iter_mut().find(|r| Arc::ptr_eq(&r.view, &view)) {
            Some(read) => read.outputs.push((column, position)),
            None => {
                views.push(ViewRead { view, outputs: vec![(column, position)], keys: Vec::new(), slot_of: Vec::new() })
            }
        }
    }
    for read in &mut views {
        keys_of(read, &entities, rows, limits)?;
    }
    Ok(VectorsRead { names, rows, views, grouped })
}

type Wanted = Vec<(Arc<FeatureView>, usize, String)>;

/// The features asked for, by reference or by service, in answer order.
fn resolve(registry: &Registry, features: Vec<String>, service: &str) -> Result<Wanted, InvalidRequest> {
    match (features.is_empty(), service.is_empty()) {
        (false, false) => return Err(InvalidRequest::FeaturesAndService),
        (true, true) => return Err(InvalidRequest::NoFeatures),
        (true, false) => {
            let service = registry.service(service).ok_or_else(|| InvalidRequest::UnknownService {
                name: echo(service),
                known: registry.services().iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(", "),
            })?;
            let mut wanted = Vec::new();
            for p in &service.projections {
                wanted.extend(p.columns.iter().map(|&c| (p.view.clone(), c, p.prefix.clone())));
            }
            return Ok(wanted);
        }
        (false, true) => {}
    }
    if features.len() > MAX_FEATURES_PER_REQUEST {
        return Err(InvalidRequest::TooManyFeatures { count: features.len(), limit: MAX_FEATURES_PER_REQUEST });
    }
    let mut wanted: Wanted = Vec::with_capacity(features.len());
    for (index, reference) in features.iter().enumerate() {
        let Some((view_name, feature)) = reference.split_once(':') else {
            return Err(InvalidRequest::BadFeatureReference { index, reference: echo(reference) });
        };
        let view = view(registry, view_name)?;
        let column = view
            .position(feature)
            .ok_or_else(|| InvalidRequest::UnknownFeature { view: view.name.clone(), feature: echo(feature) })?;
        if wanted.iter().any(|(v, c, _)| Arc::ptr_eq(v, view) && *c == column) {
            return Err(InvalidRequest::DuplicateFeature(echo(reference)));
        }
        wanted.push((view.clone(), column, view.name.clone()));
    }
    Ok(wanted)
}

/// The number of entity rows: the length of the longest list, which every
/// other list has too, or one value that applies to every row (one user
/// for 500 items); some rows, at most the per-request limit.
fn check_columns(entities: &HashMap<String, v1::JoinKeyColumn>, limits: &Limits) -> Result<usize, InvalidRequest> {
    // Sorted, so the message names the same pair whatever the map's order.
    let mut columns: Vec<(&String, usize)> = entities.iter().map(|(k, c)| (k, c.values.len())).collect();
    columns.sort();
    let Some(&(longest, rows)) = columns.iter().max_by_key(|&&(name, len)| (len, std::cmp::Reverse(name))) else {
        return Err(InvalidRequest::NoEntities);
    };
    if let Some(&(join_key, len)) = columns.iter().find(|&&(_, len)| len != rows && len != 1) {
        return Err(InvalidRequest::RaggedEntities {
            join_key: echo(join_key),
            len,
            first: echo(longest),
            first_len: rows,
        });
    }
    if rows == 0 {
        return Err(InvalidRequest::NoEntities);
    }
    if rows > limits.max_keys_per_request {
        return Err(InvalidRequest::TooManyEntityRows { count: rows, limit: limits.max_keys_per_request });
    }
    Ok(rows)
}

/// Each entity row's key of the view's entity, deduplicated.
fn keys_of(
    read: &mut ViewRead,
    entities: &HashMap<String, v1::JoinKeyColumn>,
    rows: usize,
    limits: &Limits,
) -> Result<(), InvalidRequest> {
    let view = read.view.clone();
    let mut columns = Vec::with_capacity(view.entity.join_keys().len());
    for key in view.entity.join_keys() {
        let Some(column) = entities.get(&key.name) else {
            return Err(InvalidRequest::MissingJoinKey {
                view: view.name.clone(),
                join_key: key.name.clone(),
                ty: key.ty,
            });
        };
        columns.push((key, &column.values));
    }
    // A view whose join keys each hold one value has one key for every row.
    let once = columns.iter().all(|(_, column)| column.len() == 1);
    let distinct_rows = if once { 1 } else { rows };
    // By canonical encoding: a key's text is built once, for its first row.
    let mut index: HashMap<Vec<u8>, usize> = HashMap::with_capacity(distinct_rows);
    let mut values: Vec<(&str, KeyValue<'_>)> = Vec::with_capacity(columns.len());
    read.slot_of.reserve(rows);
    for row in 0..distinct_rows {
        for (key, column) in &columns {
            // A one-value list applies to every row.
            let value = &column[if column.len() == 1 { 0 } else { row }];
            let value = key_value_from_wire(value).map_err(|got| InvalidRequest::JoinKeyType {
                join_key: key.name.clone(),
                row,
                want: key.ty,
                got: got.into(),
            })?;
            if value.key_type() != key.ty {
                return Err(InvalidRequest::JoinKeyType {
                    join_key: key.name.clone(),
                    row,
                    want: key.ty,
                    got: value.key_type().name().into(),
                });
            }
            values.push((key.name.as_str(), value));
        }
        let field = || format!("entities (row {row}, view {}: {})", view.name, join_key_list(&view));
        let encoded = encode_key_bytes(&view, values.drain(..), field, limits)?;
        let slot = match index.entry(encoded) {
            Entry::Occupied(entry) => *entry.get(),
            Entry::Vacant(entry) => {
                read.keys.push(key_text_of(&view, entry.key(), field, limits)?);
                *entry.insert(read.keys.len() - 1)
            }
        };
        read.slot_of.push(slot);
    }
    if once {
        read.slot_of.resize(rows, 0);
    }
    Ok(())
}
