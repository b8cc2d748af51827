//! Feast's APIs on Strata, so that a Feast SDK or server client moves to
//! Strata by changing its online store's address: the HTTP API of
//! `feast serve` on its own port ([`http`]), and the gRPC services of
//! Feast's servers on Strata's gRPC port ([`grpc`]); and [`import`], which
//! turns Feast's registry into Strata's definitions.
//!
//! Both translate Feast's requests into the ones the gRPC API validates and
//! runs (`GetFeatureVectors`, `WriteFeatures`), so limits, deadlines,
//! degradation and the event-time rule are the same. This module holds what
//! they share: the data-frame rows of writes and pushes, and [`FeastError`]
//! with its mapping to gRPC statuses (the HTTP codes and Feast's error body
//! are in `http`).

pub(crate) mod grpc;
pub(crate) mod http;
pub mod import;

use std::sync::Arc;

use serde_json::Value as Json;
use strata_core::{EventTime, FeatureType, FeatureView, Registry, Value};
use strata_proto::{InvalidRequest, echo, v1};
use tokio::time::Instant;

use crate::admission::{Admission, Refusal};
use crate::auth::{Access, Authenticator, Unauthenticated};
use crate::load::{json_join_key, json_value};
use crate::service::{FeatureStoreService, ServiceError};

/// What the Feast front ends share.
pub(crate) struct Feast {
    pub service: Arc<FeatureStoreService>,
    pub registry: Arc<Registry>,
    pub admission: Arc<Admission>,
    pub auth: Arc<Authenticator>,
}

/// Every way a Feast call can fail; `http` maps it to Feast's error classes
/// and HTTP codes, `From<FeastError> for Status` to gRPC statuses.
#[derive(Debug)]
pub(crate) enum FeastError {
    /// The request is not what the endpoint takes.
    BadRequest(String),
    Service(ServiceError),
    Refused(Refusal, String),
    /// No valid credential (the HTTP API authenticates itself; gRPC calls
    /// are refused before they reach a service).
    Unauthenticated(Unauthenticated),
    /// No view takes pushes from this source (the name is cut short).
    PushSourceNotFound(String),
    /// A push to anything but the online store (the value is cut short).
    OnlineOnly(String),
    /// The body could not be read: too large (413), or cut off.
    BodyUnreadable(axum::http::StatusCode, String),
    /// An endpoint of Feast's server that Strata does not serve.
    Unsupported(&'static str),
    /// Some rows of a write were not stored; the rest were.
    PartlyWritten {
        failed: u64,
        total: usize,
        errors: Vec<String>,
    },
}

impl From<ServiceError> for FeastError {
    fn from(e: ServiceError) -> FeastError {
        FeastError::Service(e)
    }
}

impl From<InvalidRequest> for FeastError {
    fn from(e: InvalidRequest) -> FeastError {
        FeastError::Service(ServiceError::Invalid(e))
    }
}

impl From<FeastError> for tonic::Status {
    fn from(e: FeastError) -> tonic::Status {
        use tonic::Status;
        match e {
            FeastError::BadRequest(message) => Status::invalid_argument(message),
            FeastError::Service(e) => e.into(),
            FeastError::Refused(Refusal::Draining, message) => Status::unavailable(message),
            FeastError::Refused(Refusal::Overloaded | Refusal::RateLimited, message) => {
                Status::resource_exhausted(message)
            }
            FeastError::Refused(Refusal::BadClientId, message) => Status::invalid_argument(message),
            FeastError::Unauthenticated(reason) => reason.status(),
            e @ FeastError::PushSourceNotFound(_) => Status::not_found(e.message()),
            e @ FeastError::OnlineOnly(_) => Status::invalid_argument(e.message()),
            FeastError::BodyUnreadable(_, message) => Status::invalid_argument(message),
            FeastError::Unsupported(message) => Status::unimplemented(message),
            e @ FeastError::PartlyWritten { .. } => Status::unavailable(e.message()),
        }
    }
}

impl FeastError {
    /// The message of the variants that build theirs.
    fn message(&self) -> String {
        match self {
            FeastError::PushSourceNotFound(name) => {
                format!("Unable to find push source {name} (no view lists it in push_sources).")
            }
            FeastError::OnlineOnly(to) => format!(
                "to is {to}: Strata is an online store and takes pushes \"online\" only; push to the offline store with Feast"
            ),
            FeastError::PartlyWritten { failed, total, errors } => {
                format!("{failed} of {total} rows were not written ({}); retrying is safe", errors.join("; "))
            }
            other => format!("{other:?}"),
        }
    }
}

/// The view of that name, or the error that names the known ones.
fn view_of<'a>(registry: &'a Registry, name: &str) -> Result<&'a Arc<FeatureView>, FeastError> {
    registry.get(name).ok_or_else(|| {
        FeastError::from(InvalidRequest::UnknownView {
            name: echo(name),
            known: registry.views().iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", "),
        })
    })
}

/// The views a push source writes into (`views[].push_sources`).
fn push_views<'a>(registry: &'a Registry, source: &str) -> Result<Vec<&'a Arc<FeatureView>>, FeastError> {
    let views: Vec<&Arc<FeatureView>> =
        registry.views().iter().filter(|v| v.push_sources.iter().any(|s| s == source)).collect();
    if views.is_empty() {
        return Err(FeastError::PushSourceNotFound(echo(source)));
    }
    Ok(views)
}

/// Chunks of a frame written at once.
const WRITES_AT_ONCE: usize = 4;

/// Writes rows into `view` in chunks of `limits.max_rows_per_write` (a
/// materialization batch may be larger), every chunk checked before any is
/// written. Fails if any row was not stored: the SDK retries, and what was
/// stored is skipped then as not newer.
/// `deadline`: the caller's; by default the longest a client may ask for,
/// as the SDK sends no budget and a materialization job would rather wait
/// than fail.
async fn write_rows(
    feast: &Feast,
    access: &Access,
    view: &FeatureView,
    rows: Vec<v1::WriteRow>,
    deadline: Option<Instant>,
) -> Result<(), FeastError> {
    use futures::StreamExt as _;
    let total = rows.len();
    let mut writes = Vec::new();
    let mut rows = rows.into_iter().peekable();
    while rows.peek().is_some() {
        let chunk: Vec<v1::WriteRow> = rows.by_ref().take(feast.service.max_rows_per_write()).collect();
        writes.push(
            feast
                .service
                .check_write(v1::WriteFeaturesRequest { feature_view: view.name.clone(), rows: chunk }, access)?,
        );
    }
    let results: Vec<Result<v1::WriteFeaturesResponse, ServiceError>> = futures::stream::iter(writes)
        .map(|write| feast.service.write(write, deadline.unwrap_or_else(|| feast.service.longest_deadline())))
        .buffer_unordered(WRITES_AT_ONCE)
        .collect()
        .await;
    let (mut failed, mut errors) = (0, Vec::new());
    for result in results {
        match result {
            Ok(response) => {
                failed += response.rows_failed;
                errors.extend(response.results.into_iter().filter(|r| !r.error.is_empty()).map(|r| r.error).take(1));
            }
            Err(ServiceError::WriteFailed { total, errors: chunk_errors, retry_may_help: true }) => {
                failed += total as u64;
                errors.extend(chunk_errors.into_iter().take(1));
            }
            Err(e) => return Err(e.into()),
        }
    }
    if failed > 0 {
        errors.dedup();
        return Err(FeastError::PartlyWritten { failed, total, errors });
    }
    Ok(())
}

/// The rows of a data frame for `view`: its join keys, its features (one
/// left out is null), `event_timestamp` (naive UTC ISO, as the SDK sends it,
/// or RFC 3339) and `created` (ignored: the event time decides). Any other
/// column is refused, so a misspelt feature is not dropped silently.
fn frame_rows(view: &FeatureView, frame: &[(String, Vec<Json>)]) -> Result<Vec<v1::WriteRow>, FeastError> {
    let rows = frame.first().map_or(0, |(_, v)| v.len());
    if let Some((name, values)) = frame.iter().find(|(_, v)| v.len() != rows) {
        return Err(FeastError::BadRequest(format!(
            "df: column {} has {} values, {} has {rows}: every column must be as long",
            echo(name),
            values.len(),
            echo(&frame[0].0)
        )));
    }
    let mut out: Vec<v1::WriteRow> = (0..rows).map(|_| v1::WriteRow::default()).collect();
    let mut has_time = false;
    for (name, values) in frame {
        let bad = |row: usize, message: String| {
            FeastError::BadRequest(format!("df[{}][{row}]: {message} (view {})", echo(name), view.name))
        };
        if name == "event_timestamp" {
            has_time = true;
            for (row, value) in values.iter().enumerate() {
                let time = frame_time(value).map_err(|e| bad(row, e))?;
                out[row].event_time = Some(strata_proto::event_time_to_wire(time));
            }
        } else if name == "created" {
        } else if let Some(key) = view.entity.join_keys().iter().find(|k| k.name == *name) {
            for (row, value) in values.iter().enumerate() {
                let value = join_key_to_wire(value, key.ty).map_err(|e| bad(row, e))?;
                if view.entity.name == "entity_key" {
                    out[row].entity_key = match value.kind {
                        Some(v1::value::Kind::StringValue(s)) => s,
                        _ => return Err(bad(row, "not a string".into())),
                    };
                } else {
                    out[row].join_keys.insert(name.clone(), value);
                }
            }
        } else if let Some(column) = view.position(name) {
            let ty = view.features[column].ty;
            for (row, value) in values.iter().enumerate() {
                // Feast writes a null timestamp as NaT's integer.
                let nat = ty == FeatureType::Timestamp && value.as_i64() == Some(i64::MIN);
                let value = if nat { Value::Null } else { json_value(value.clone(), ty).map_err(|e| bad(row, e))? };
                out[row].features.insert(name.clone(), strata_proto::value_to_wire(&value));
            }
        } else {
            return Err(FeastError::BadRequest(format!(
                "df has a column {} that is neither a feature nor a join key of view {} ({})",
                echo(name),
                view.name,
                view.features.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
            )));
        }
    }
    if !has_time && rows > 0 {
        return Err(FeastError::BadRequest("df has no event_timestamp column".into()));
    }
    Ok(out)
}

/// One output feature's column of Strata's grouped answer: each distinct
/// key's cell, made once, and each entity row's index into them.
pub(crate) struct FeatureColumn<'a, C> {
    cells: Vec<C>,
    row_keys: &'a [u32],
}

impl<C> FeatureColumn<'_, C> {
    /// Each entity row's cell (`None` for a row the answer gives no key).
    pub(crate) fn rows(&self) -> impl Iterator<Item = Option<&C>> + Clone {
        self.row_keys.iter().map(|&index| self.cells.get(index as usize))
    }
}

/// Feast's feature columns, in output order, from Strata's grouped answer
/// (both of Feast's APIs answer column-major): `cell` renders a key's
/// value, status and event time (microseconds, 0 for none) once for all
/// the rows that share the key. `None` for an output no group fills.
pub(crate) fn feature_columns<'a, C>(
    answer: &'a v1::GetFeatureVectorsResponse,
    mut cell: impl FnMut(Value, v1::FeatureStatus, i64) -> C,
) -> Vec<Option<FeatureColumn<'a, C>>> {
    let mut columns: Vec<Option<FeatureColumn<'a, C>>> = answer.feature_names.iter().map(|_| None).collect();
    for group in &answer.groups {
        for (i, &at) in group.features.iter().enumerate() {
            let cells = group
                .keys
                .iter()
                .map(|key| {
                    let status = key.statuses.get(i).and_then(|&s| v1::FeatureStatus::try_from(s).ok());
                    // Strata's own answer: every timestamp in it is in range.
                    let value = key.values.get(i).cloned().and_then(strata_proto::value_from_wire);
                    cell(value.unwrap_or(Value::Null), status.unwrap_or_default(), key.event_time_micros)
                })
                .collect();
            if let Some(slot) = columns.get_mut(at as usize) {
                *slot = Some(FeatureColumn { cells, row_keys: &group.row_keys });
            }
        }
    }
    columns
}

/// An event time as Feast's SDK sends it: naive ISO 8601 in UTC
/// (`2024-01-01T00:00:00`, with or without a fraction), RFC 3339 with an
/// offset, or Unix seconds.
fn frame_time(value: &Json) -> Result<EventTime, String> {
    match value {
        Json::String(text) => crate::load::parse_instant(text),
        Json::Number(n) => crate::load::parse_instant(&n.to_string()),
        other => Err(format!("{} is not a timestamp", echo(&other.to_string()))),
    }
}

pub(crate) fn join_key_to_wire(value: &Json, ty: strata_core::KeyType) -> Result<v1::Value, String> {
    use strata_core::OwnedKeyValue as K;
    use v1::value::Kind;
    let kind = match json_join_key(value.clone(), ty)? {
        K::Int64(n) => Kind::Int64Value(n),
        K::String(s) => Kind::StringValue(s),
        K::Bytes(b) => Kind::BytesValue(b),
    };
    Ok(v1::Value { kind: Some(kind) })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn naive_iso_times_are_utc_and_offsets_are_honoured() {
        let at = |s: &str| frame_time(&json!(s)).unwrap().to_parts();
        assert_eq!(at("2024-01-01T00:00:00"), (1_704_067_200, 0));
        assert_eq!(at("2024-01-01T00:00:00.5"), (1_704_067_200, 500_000_000));
        assert_eq!(at("2024-01-01T01:00:00+01:00"), (1_704_067_200, 0));
        assert_eq!(frame_time(&json!(1_704_067_200)).unwrap().to_parts(), (1_704_067_200, 0));
        assert!(frame_time(&json!("yesterday")).is_err());
        assert!(frame_time(&json!(true)).is_err());
    }
}
