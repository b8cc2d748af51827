use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use strata_core::{EventTime, FeatureType, FeatureView, KeyType, KeyValue, Registry, Row, Value};

use crate::v1;

/// Request size limits, from the server's configuration.
#[derive(Clone, Debug)]
pub struct Limits {
    pub max_keys_per_request: usize,
    pub max_key_bytes: usize,
    pub max_rows_per_write: usize,
    /// Bytes of one value at most ([`Value::payload_bytes`]).
    pub max_value_bytes: usize,
    /// How far ahead of the server's clock an event time may be: a write
    /// dated far in the future would make every real write of its key
    /// SKIPPED_OLDER until then.
    pub max_future_event_time: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_keys_per_request: 1_000,
            max_key_bytes: 256,
            max_rows_per_write: 1_000,
            max_value_bytes: 1 << 20,
            max_future_event_time: std::time::Duration::from_secs(3_600),
        }
    }
}

/// How much of a piece of user input an error message repeats: enough to
/// recognise it, never megabytes.
const ECHO_CHARS: usize = 64;

/// `text` as an error message may quote it: whole if short, else its first
/// [`ECHO_CHARS`] characters and its length.
pub fn echo(text: &str) -> String {
    match text.char_indices().nth(ECHO_CHARS) {
        None => format!("{text:?}"),
        Some((end, _)) => format!("{:?}… ({} bytes)", &text[..end], text.len()),
    }
}

/// A validated GetFeatures request.
#[derive(Debug)]
pub struct FeatureRead {
    pub view: Arc<FeatureView>,
    /// As requested: in order, duplicates kept.
    pub keys: Vec<String>,
    /// Positions of the requested features in the view, in answer order.
    pub columns: Vec<usize>,
}

/// A validated WriteFeatures request.
#[derive(Debug)]
pub struct FeatureWrite {
    pub view: Arc<FeatureView>,
    /// One row per distinct key, with one value per feature of the view.
    pub rows: Vec<(String, Row)>,
    /// Rows dropped because the same key came again in the request with a
    /// newer event time (or the same one, later in the request).
    pub superseded: usize,
    /// For each request row, in request order: the index in `rows` of its
    /// key, and whether its values are the ones kept there (false for a
    /// superseded row).
    pub requested: Vec<(usize, bool)>,
}

/// A validated DeleteFeatures request.
#[derive(Debug)]
pub struct FeatureDelete {
    pub view: Arc<FeatureView>,
    /// Distinct keys, in first-seen order.
    pub keys: Vec<String>,
    /// For each requested key, in request order, its index in `keys`.
    pub requested: Vec<usize>,
    pub at: EventTime,
}

/// Why a request was rejected. Every message names the offending field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvalidRequest {
    #[error("feature_view is empty")]
    NoView,
    /// `name` is already cut short for echoing ([`echo`]).
    #[error("unknown feature_view {name} (known: {known})")]
    UnknownView { name: String, known: String },
    #[error("feature view {view:?} has no feature {feature}")]
    UnknownFeature { view: String, feature: String },
    #[error("features lists {0} twice")]
    DuplicateFeature(String),
    #[error("{field} is {len} bytes, over the limit of {limit} (limits.max_value_bytes)")]
    ValueTooLarge { field: String, len: usize, limit: usize },
    #[error("{field} is more than {limit:?} ahead of the server's clock (limits.max_future_event_time)")]
    EventTimeInFuture { field: String, limit: std::time::Duration },
    #[error("entity_keys is empty")]
    NoKeys,
    #[error("{count} entity_keys, over the limit of {limit} per request")]
    TooManyKeys { count: usize, limit: usize },
    #[error("{field} is empty")]
    EmptyKey { field: String },
    #[error("{field} is {len} bytes, over the limit of {limit}")]
    KeyTooLong { field: String, len: usize, limit: usize },
    #[error("{field} contains a NUL character")]
    NulCharacter { field: String },
    #[error("rows is empty")]
    NoRows,
    #[error("{count} rows, over the limit of {limit} per request")]
    TooManyRows { count: usize, limit: usize },
    #[error("{field} is required")]
    MissingEventTime { field: String },
    #[error("{field} is out of range (years 1 to 9999)")]
    BadEventTime { field: String },
    #[error("{field}: timestamp out of range (years 1 to 9999, nanos 0 to 999999999)")]
    BadTimestamp { field: String },
    #[error("{field}: expected {expected}, got {got}")]
    WrongType { field: String, expected: FeatureType, got: FeatureType },
    #[error(
        "{field}: not a key of entity {entity} (view {view} is keyed by {join_keys}: read it with GetFeatureVectors, write it with join_keys)"
    )]
    BadEntityKey { field: String, view: String, entity: String, join_keys: String },
    #[error("{field}: {message}")]
    BadJoinKeys { field: String, message: String },
    #[error("give features or feature_service, not both")]
    FeaturesAndService,
    #[error("give features (view:feature references) or a feature_service")]
    NoFeatures,
    #[error("{count} features, over the limit of {limit} per request")]
    TooManyFeatures { count: usize, limit: usize },
    #[error("features[{index}] is {reference}: want view:feature")]
    BadFeatureReference { index: usize, reference: String },
    #[error("unknown feature_service {name} (known: {known})")]
    UnknownService { name: String, known: String },
    #[error("two features would both be named {0} in the answer; ask with full_feature_names")]
    DuplicateOutput(String),
    #[error("entities is empty: give one list of values per join key")]
    NoEntities,
    #[error(
        "entities: join key {join_key} has {len} values, {first} has {first_len}: every list must be as long, or hold one value for every row"
    )]
    RaggedEntities { join_key: String, len: usize, first: String, first_len: usize },
    #[error("entities: {count} rows, over the limit of {limit} per request")]
    TooManyEntityRows { count: usize, limit: usize },
    #[error("entities: view {view} needs join key {join_key} ({ty})")]
    MissingJoinKey { view: String, join_key: String, ty: KeyType },
    #[error("entities[{join_key:?}][{row}] is {got}, the join key is {want}")]
    JoinKeyType { join_key: String, row: usize, want: KeyType, got: String },
}

impl From<InvalidRequest> for tonic::Status {
    fn from(e: InvalidRequest) -> tonic::Status {
        tonic::Status::invalid_argument(e.to_string())
    }
}

pub(crate) fn view<'r>(registry: &'r Registry, name: &str) -> Result<&'r Arc<FeatureView>, InvalidRequest> {
    if name.is_empty() {
        return Err(InvalidRequest::NoView);
    }
    registry.get(name).ok_or_else(|| InvalidRequest::UnknownView {
        name: echo(name),
        known: registry.views().iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", "),
    })
}

/// The join keys of a view's entity, for messages: `user_id (int64), item_id (string)`.
pub(crate) fn join_key_list(view: &FeatureView) -> String {
    let keys: Vec<String> = view.entity.join_keys().iter().map(|k| format!("{} ({})", k.name, k.ty)).collect();
    keys.join(", ")
}

/// Checks a key given as text: within the limits, and for a view whose
/// entity declares join keys, the text of one of its keys.
fn check_key_of(
    view: &FeatureView,
    key: &str,
    field: impl Fn() -> String,
    limits: &Limits,
) -> Result<(), InvalidRequest> {
    check_key(key, &field, limits)?;
    if !view.entity.is_single_string() && view.entity.parse_key_text(key).is_none() {
        return Err(InvalidRequest::BadEntityKey {
            field: field(),
            view: view.name.clone(),
            entity: view.entity.name.clone(),
            join_keys: join_key_list(view),
        });
    }
    Ok(())
}

/// A join key's value from the wire, if it is one of the three key types.
pub(crate) fn key_value_from_wire(value: &v1::Value) -> Result<KeyValue<'_>, &'static str> {
    use v1::value::Kind;
    match &value.kind {
        Some(Kind::Int64Value(n)) => Ok(KeyValue::Int64(*n)),
        Some(Kind::StringValue(s)) => Ok(KeyValue::String(s)),
        Some(Kind::BytesValue(b)) => Ok(KeyValue::Bytes(b)),
        None | Some(Kind::NullValue(_)) => Err("null"),
        Some(Kind::DoubleValue(_)) => Err("double"),
        Some(Kind::BoolValue(_)) => Err("bool"),
        Some(Kind::FloatListValue(_)) => Err("float_list"),
        Some(Kind::Int64ListValue(_)) => Err("int64_list"),
        Some(Kind::Int32Value(_)) => Err("int32"),
        Some(Kind::FloatValue(_)) => Err("float"),
        Some(Kind::TimestampValue(_)) => Err("timestamp"),
    }
}

/// The key text of a view's entity from join key values; a string value
/// holds no NUL (PostgreSQL text cannot).
pub(crate) fn encode_key<'a>(
    view: &FeatureView,
    values: impl IntoIterator<Item = (&'a str, KeyValue<'a>)>,
    field: impl Fn() -> String,
    limits: &Limits,
) -> Result<String, InvalidRequest> {
    let encoded = encode_key_bytes(view, values, &field, limits)?;
    key_text_of(view, &encoded, field, limits)
}

/// The canonical encoding of a key of the view's entity, checked.
pub(crate) fn encode_key_bytes<'a>(
    view: &FeatureView,
    values: impl IntoIterator<Item = (&'a str, KeyValue<'a>)>,
    field: impl Fn() -> String,
    limits: &Limits,
) -> Result<Vec<u8>, InvalidRequest> {
    let mut nul = false;
    let values = values.into_iter().inspect(|(_, v)| nul |= matches!(v, KeyValue::String(s) if s.contains('\0')));
    let encoded = view
        .entity
        .encode(values, limits.max_key_bytes)
        .map_err(|e| InvalidRequest::BadJoinKeys { field: field(), message: e.to_string() })?;
    if nul {
        return Err(InvalidRequest::NulCharacter { field: field() });
    }
    Ok(encoded)
}

/// The text of an encoded key, as the tiers and results name it, checked.
pub(crate) fn key_text_of(
    view: &FeatureView,
    encoded: &[u8],
    field: impl Fn() -> String,
    limits: &Limits,
) -> Result<String, InvalidRequest> {
    let text = view.entity.key_text(encoded);
    check_key(&text, field, limits)?;
    Ok(text)
}

fn check_key(key: &str, field: impl Fn() -> String, limits: &Limits) -> Result<(), InvalidRequest> {
    if key.is_empty() {
        return Err(InvalidRequest::EmptyKey { field: field() });
    }
    if key.len() > limits.max_key_bytes {
        return Err(InvalidRequest::KeyTooLong { field: field(), len: key.len(), limit: limits.max_key_bytes });
    }
    // PostgreSQL text cannot hold NUL.
    if key.contains('\0') {
        return Err(InvalidRequest::NulCharacter { field: field() });
    }
    Ok(())
}

/// Checks a request's `entity_keys`: some, at most `limit`, each valid.
fn check_keys(view: &FeatureView, keys: &[String], limit: usize, limits: &Limits) -> Result<(), InvalidRequest> {
    if keys.is_empty() {
        return Err(InvalidRequest::NoKeys);
    }
    if keys.len() > limit {
        return Err(InvalidRequest::TooManyKeys { count: keys.len(), limit });
    }
    for (i, key) in keys.iter().enumerate() {
        check_key_of(view, key, || format!("entity_keys[{i}]"), limits)?;
    }
    Ok(())
}

/// Validates a GetFeatures request against the registry.
pub fn read_request(
    request: v1::GetFeaturesRequest,
    registry: &Registry,
    limits: &Limits,
) -> Result<FeatureRead, InvalidRequest> {
    let v1::GetFeaturesRequest { feature_view, entity_keys, features } = request;
    let view = view(registry, &feature_view)?.clone();
    check_keys(&view, &entity_keys, limits.max_keys_per_request, limits)?;
    let columns = if features.is_empty() {
        (0..view.features.len()).collect()
    } else {
        let mut columns = Vec::with_capacity(features.len());
        for name in features {
            let position = view
                .position(&name)
                .ok_or_else(|| InvalidRequest::UnknownFeature { view: view.name.clone(), feature: echo(&name) })?;
            if columns.contains(&position) {
                return Err(InvalidRequest::DuplicateFeature(echo(&name)));
            }
            columns.push(position);
        }
        columns
    };
    Ok(FeatureRead { view, keys: entity_keys, columns })
}

/// Validates a WriteFeatures request against the registry: every row, every
/// value, before anything is written.
pub fn write_request(
    request: v1::WriteFeaturesRequest,
    registry: &Registry,
    limits: &Limits,
) -> Result<FeatureWrite, InvalidRequest> {
    let v1::WriteFeaturesRequest { feature_view, rows } = request;
    let view = view(registry, &feature_view)?.clone();
    if rows.is_empty() {
        return Err(InvalidRequest::NoRows);
    }
    if rows.len() > limits.max_rows_per_write {
        return Err(InvalidRequest::TooManyRows { count: rows.len(), limit: limits.max_rows_per_write });
    }
    let mut out: Vec<(String, Row)> = Vec::with_capacity(rows.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(rows.len());
    let mut superseded = 0;
    // For each distinct row, the request row whose values it holds.
    let mut kept_from: Vec<usize> = Vec::with_capacity(rows.len());
    let mut row_of: Vec<usize> = Vec::with_capacity(rows.len());
    for (i, row) in rows.into_iter().enumerate() {
        let v1::WriteRow { entity_key, features, event_time, join_keys } = row;
        let entity_key = if join_keys.is_empty() {
            check_key_of(&view, &entity_key, || format!("rows[{i}].entity_key"), limits)?;
            entity_key
        } else {
            let field = || format!("rows[{i}].join_keys");
            let mut values = Vec::with_capacity(join_keys.len());
            for (name, value) in &join_keys {
                let value = key_value_from_wire(value).map_err(|got| InvalidRequest::BadJoinKeys {
                    field: format!("rows[{i}].join_keys[{}]", echo(name)),
                    message: format!("a join key cannot be {got}"),
                })?;
                values.push((name.as_str(), value));
            }
            if !entity_key.is_empty() {
                return Err(InvalidRequest::BadJoinKeys {
                    field: format!("rows[{i}]"),
                    message: "give entity_key or join_keys, not both".into(),
                });
            }
            encode_key(&view, values, field, limits)?
        };
        let event_time =
            event_time.ok_or_else(|| InvalidRequest::MissingEventTime { field: format!("rows[{i}].event_time") })?;
        let event_time = event_time_from_wire(event_time, || format!("rows[{i}].event_time"), limits)?;
        let mut values = vec![Value::Null; view.features.len()];
        for (name, value) in features {
            let position = view
                .position(&name)
                .ok_or_else(|| InvalidRequest::UnknownFeature { view: view.name.clone(), feature: echo(&name) })?;
            // A known feature's name is short: quoting it is safe.
            let field = || format!("rows[{i}].features[{name:?}]");
            let value = value_from_wire(value).ok_or_else(|| InvalidRequest::BadTimestamp { field: field() })?;
            let expected = view.features[position].ty;
            if let Some(got) = value.feature_type().filter(|got| *got != expected) {
                return Err(InvalidRequest::WrongType { field: field(), expected, got });
            }
            let len = value.payload_bytes();
            if len > limits.max_value_bytes {
                return Err(InvalidRequest::ValueTooLarge { field: field(), len, limit: limits.max_value_bytes });
            }
            if matches!(&value, Value::String(s) if s.contains('\0')) {
                return Err(InvalidRequest::NulCharacter { field: field() });
            }
            values[position] = value;
        }
        let row = Row { event_time, values };
        match index.entry(entity_key) {
            Entry::Vacant(slot) => {
                out.push((slot.key().clone(), row));
                kept_from.push(i);
                row_of.push(out.len() - 1);
                slot.insert(out.len() - 1);
            }
            Entry::Occupied(slot) => {
                superseded += 1;
                let at = *slot.get();
                row_of.push(at);
                if row.event_time >= out[at].1.event_time {
                    out[at].1 = row;
                    kept_from[at] = i;
                }
            }
        }
    }
    let requested = row_of.iter().enumerate().map(|(i, &at)| (at, kept_from[at] == i)).collect();
    Ok(FeatureWrite { view, rows: out, superseded, requested })
}

/// An event time from the wire: in range, and not further ahead of the
/// server's clock than the limit allows.
fn event_time_from_wire(
    time: crate::prost_types::Timestamp,
    field: impl Fn() -> String,
    limits: &Limits,
) -> Result<EventTime, InvalidRequest> {
    let at = EventTime::from_parts(time.seconds, time.nanos)
        .ok_or_else(|| InvalidRequest::BadEventTime { field: field() })?;
    check_not_future(at, limits).map_err(|limit| InvalidRequest::EventTimeInFuture { field: field(), limit })?;
    Ok(at)
}

/// Whether `at` is at most `limits.max_future_event_time` ahead of the
/// server's clock; the limit if not.
pub fn check_not_future(at: EventTime, limits: &Limits) -> Result<(), std::time::Duration> {
    let latest = EventTime::from_system_time(std::time::SystemTime::now() + limits.max_future_event_time);
    if at > latest { Err(limits.max_future_event_time) } else { Ok(()) }
}

/// Validates a DeleteFeatures request against the registry.
pub fn delete_request(
    request: v1::DeleteFeaturesRequest,
    registry: &Registry,
    limits: &Limits,
) -> Result<FeatureDelete, InvalidRequest> {
    let v1::DeleteFeaturesRequest { feature_view, entity_keys, event_time } = request;
    let view = view(registry, &feature_view)?.clone();
    check_keys(&view, &entity_keys, limits.max_rows_per_write, limits)?;
    let at = event_time.ok_or_else(|| InvalidRequest::MissingEventTime { field: "event_time".into() })?;
    let at = event_time_from_wire(at, || "event_time".into(), limits)?;
    let mut keys = Vec::with_capacity(entity_keys.len());
    let mut index: HashMap<String, usize> = HashMap::with_capacity(entity_keys.len());
    let mut requested = Vec::with_capacity(entity_keys.len());
    for key in entity_keys {
        let at = *index.entry(key).or_insert_with_key(|key| {
            keys.push(key.clone());
            keys.len() - 1
        });
        requested.push(at);
    }
    Ok(FeatureDelete { view, keys, requested, at })
}

/// A value from the wire; `None` for a timestamp outside the range of a
/// protobuf Timestamp.
pub fn value_from_wire(value: v1::Value) -> Option<Value> {
    use v1::value::Kind;
    Some(match value.kind {
        None | Some(Kind::NullValue(_)) => Value::Null,
        Some(Kind::Int64Value(v)) => Value::Int64(v),
        Some(Kind::DoubleValue(v)) => Value::Double(v),
        Some(Kind::StringValue(v)) => Value::String(v),
        Some(Kind::BoolValue(v)) => Value::Bool(v),
        Some(Kind::BytesValue(v)) => Value::Bytes(v),
        Some(Kind::FloatListValue(v)) => Value::FloatList(v.values),
        Some(Kind::Int64ListValue(v)) => Value::Int64List(v.values),
        Some(Kind::Int32Value(v)) => Value::Int32(v),
        Some(Kind::FloatValue(v)) => Value::Float(v),
        Some(Kind::TimestampValue(t)) => Value::Timestamp(EventTime::from_parts(t.seconds, t.nanos)?.0),
    })
}

pub fn value_to_wire(value: &Value) -> v1::Value {
    use v1::value::Kind;
    let kind = match value {
        Value::Null => Kind::NullValue(v1::Null {}),
        Value::Int64(v) => Kind::Int64Value(*v),
        Value::Double(v) => Kind::DoubleValue(*v),
        Value::String(v) => Kind::StringValue(v.clone()),
        Value::Bool(v) => Kind::BoolValue(*v),
        Value::Bytes(v) => Kind::BytesValue(v.clone()),
        Value::FloatList(v) => Kind::FloatListValue(v1::FloatList { values: v.clone() }),
        Value::Int64List(v) => Kind::Int64ListValue(v1::Int64List { values: v.clone() }),
        Value::Int32(v) => Kind::Int32Value(*v),
        Value::Float(v) => Kind::FloatValue(*v),
        Value::Timestamp(micros) => Kind::TimestampValue(event_time_to_wire(EventTime(*micros))),
    };
    v1::Value { kind: Some(kind) }
}

pub fn event_time_to_wire(time: EventTime) -> prost_types::Timestamp {
    let (seconds, nanos) = time.to_parts();
    prost_types::Timestamp { seconds, nanos }
}

fn feature_type_to_wire(ty: FeatureType) -> v1::FeatureType {
    match ty {
        FeatureType::Int64 => v1::FeatureType::Int64,
        FeatureType::Double => v1::FeatureType::Double,
        FeatureType::String => v1::FeatureType::String,
        FeatureType::Bool => v1::FeatureType::Bool,
        FeatureType::Bytes => v1::FeatureType::Bytes,
        FeatureType::FloatList => v1::FeatureType::FloatList,
        FeatureType::Int64List => v1::FeatureType::Int64List,
        FeatureType::Int32 => v1::FeatureType::Int32,
        FeatureType::Float => v1::FeatureType::Float,
        FeatureType::Timestamp => v1::FeatureType::Timestamp,
    }
}

fn duration_to_wire(d: std::time::Duration) -> prost_types::Duration {
    prost_types::Duration {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        // Sub-second nanoseconds are below 1e9 and fit an i32.
        nanos: d.subsec_nanos() as i32,
    }
}

pub fn view_to_wire(view: &FeatureView) -> v1::FeatureView {
    v1::FeatureView {
        name: view.name.clone(),
        description: view.description.clone(),
        features: view
            .features
            .iter()
            .map(|f| v1::Feature { name: f.name.clone(), r#type: feature_type_to_wire(f.ty) as i32 })
            .collect(),
        l1_ttl: Some(duration_to_wire(view.l1_ttl)),
        l2_ttl: Some(duration_to_wire(view.l2_ttl)),
        jitter: view.jitter,
        refresh_ahead: view.refresh_ahead,
        negative_ttl: Some(duration_to_wire(view.negative_ttl)),
        max_age: view.max_age.map(duration_to_wire),
        entity: view.entity.name.clone(),
        join_keys: join_keys_to_wire(&view.entity),
    }
}

fn join_keys_to_wire(entity: &strata_core::Entity) -> Vec<v1::JoinKey> {
    let ty = |ty: KeyType| match ty {
        KeyType::Int64 => v1::JoinKeyType::JoinKeyInt64,
        KeyType::String => v1::JoinKeyType::JoinKeyString,
        KeyType::Bytes => v1::JoinKeyType::JoinKeyBytes,
    };
    entity.join_keys().iter().map(|k| v1::JoinKey { name: k.name.clone(), r#type: ty(k.ty) as i32 }).collect()
}

pub fn entity_to_wire(entity: &strata_core::Entity) -> v1::Entity {
    v1::Entity {
        name: entity.name.clone(),
        description: entity.description.clone(),
        join_keys: join_keys_to_wire(entity),
    }
}

pub fn service_to_wire(service: &strata_core::FeatureService) -> v1::FeatureService {
    v1::FeatureService {
        name: service.name.clone(),
        description: service.description.clone(),
        projections: service
            .projections
            .iter()
            .map(|p| v1::FeatureProjection {
                view: p.view.name.clone(),
                features: p.columns.iter().map(|&c| p.view.features[c].name.clone()).collect(),
                alias: if p.prefix == p.view.name { String::new() } else { p.prefix.clone() },
            })
            .collect(),
    }
}

#[cfg(test)]
mod tests;
