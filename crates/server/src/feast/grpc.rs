//! Feast's gRPC APIs on Strata's gRPC port: `feast.serving.ServingService`
//! (what Feast's Go and Java servers answer and the Java client speaks) and
//! `GrpcFeatureServer` (Python's `feast listen`). Same translation as the
//! HTTP API: reads become a grouped GetFeatureVectors, writes and pushes a
//! frame of rows through WriteFeatures; errors become statuses through
//! `ServiceError`'s mapping and [`FeastError`]'s below.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value as Json;
use strata_core::{FeatureType, FeatureView, KeyType, Value};
use strata_proto::feast::grpc_feature_server_server::GrpcFeatureServer;
use strata_proto::feast::serving::get_online_features_request::Kind as FeaturesKind;
use strata_proto::feast::serving::get_online_features_response::FeatureVector;
use strata_proto::feast::serving::serving_service_server::ServingService;
use strata_proto::feast::serving::{
    FeatureList, FieldStatus, GetFeastServingInfoRequest, GetFeastServingInfoResponse, GetOnlineFeaturesRequest,
    GetOnlineFeaturesResponse, GetOnlineFeaturesResponseMetadata,
};
use strata_proto::feast::types::{self as ft, value::Val};
use strata_proto::feast::{PushRequest, PushResponse, WriteToOnlineStoreRequest, WriteToOnlineStoreResponse};
use strata_proto::prost_types;
use strata_proto::{echo, v1};
use tonic::{Request, Response, Status};

use super::{Feast, FeastError, feature_columns, frame_rows, push_views, view_of, write_rows};
use crate::auth::{Access, Operation};
use crate::service::ServiceError;

#[tonic::async_trait]
impl ServingService for Feast {
    async fn get_feast_serving_info(
        &self,
        _: Request<GetFeastServingInfoRequest>,
    ) -> Result<Response<GetFeastServingInfoResponse>, Status> {
        Ok(Response::new(GetFeastServingInfoResponse { version: format!("strata {}", env!("CARGO_PKG_VERSION")) }))
    }

    async fn get_online_features(
        &self,
        request: Request<GetOnlineFeaturesRequest>,
    ) -> Result<Response<GetOnlineFeaturesResponse>, Status> {
        online_features(self, request).await
    }
}

#[tonic::async_trait]
impl GrpcFeatureServer for Feast {
    async fn get_online_features(
        &self,
        request: Request<GetOnlineFeaturesRequest>,
    ) -> Result<Response<GetOnlineFeaturesResponse>, Status> {
        online_features(self, request).await
    }

    async fn push(&self, request: Request<PushRequest>) -> Result<Response<PushResponse>, Status> {
        let deadline = self.service.deadline_of(&request);
        let access = Access::of(request.extensions());
        let PushRequest { features, stream_feature_view, allow_registry_cache: _, to, typed_features } =
            request.into_inner();
        if !to.is_empty() && to != "online" {
            return Err(FeastError::OnlineOnly(echo(&to)).into());
        }
        let views = push_views(&self.registry, &stream_feature_view)?;
        for view in &views {
            access.check(Operation::Write, &view.name).map_err(ServiceError::from).map_err(FeastError::from)?;
        }
        let mut writes = Vec::with_capacity(views.len());
        for view in views {
            writes.push((view, frame_rows(view, &one_row(view, &features, &typed_features)?)?));
        }
        for (view, rows) in writes {
            write_rows(self, &access, view, rows, Some(deadline)).await?;
        }
        Ok(Response::new(PushResponse { status: true }))
    }

    async fn write_to_online_store(
        &self,
        request: Request<WriteToOnlineStoreRequest>,
    ) -> Result<Response<WriteToOnlineStoreResponse>, Status> {
        let deadline = self.service.deadline_of(&request);
        let access = Access::of(request.extensions());
        let WriteToOnlineStoreRequest { features, feature_view_name, allow_registry_cache: _, typed_features } =
            request.into_inner();
        let view = view_of(&self.registry, &feature_view_name)?;
        access.check(Operation::Write, &view.name).map_err(ServiceError::from).map_err(FeastError::from)?;
        let rows = frame_rows(view, &one_row(view, &features, &typed_features)?)?;
        write_rows(self, &access, view, rows, Some(deadline)).await?;
        Ok(Response::new(WriteToOnlineStoreResponse { status: true }))
    }
}

async fn online_features(
    feast: &Feast,
    request: Request<GetOnlineFeaturesRequest>,
) -> Result<Response<GetOnlineFeaturesResponse>, Status> {
    let deadline = feast.service.deadline_of(&request);
    let access = Access::of(request.extensions());
    let GetOnlineFeaturesRequest {
        kind,
        entities,
        full_feature_names,
        request_context,
        include_feature_view_version_metadata: _,
    } = request.into_inner();
    if !request_context.is_empty() {
        return Err(Status::invalid_argument(
            "request_context is for on-demand feature views, which Strata does not have; leave it empty",
        ));
    }
    let (features, feature_service) = match kind {
        Some(FeaturesKind::Features(FeatureList { val })) => (val, String::new()),
        Some(FeaturesKind::FeatureService(name)) => (Vec::new(), name),
        None => return Err(Status::invalid_argument("give features or feature_service")),
    };
    // Join-key columns first in the answer, by name: a map has no order.
    let mut join_keys: Vec<(String, Vec<ft::Value>)> = entities.into_iter().map(|(k, v)| (k, v.val)).collect();
    join_keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut columns = HashMap::with_capacity(join_keys.len());
    for (name, values) in &join_keys {
        let values = values
            .iter()
            .enumerate()
            .map(|(row, value)| join_key_from_feast(value).map_err(|got| entity_error(name, row, got)))
            .collect::<Result<_, _>>()?;
        columns.insert(name.clone(), v1::JoinKeyColumn { values });
    }
    let read = v1::GetFeatureVectorsRequest {
        features,
        feature_service,
        entities: columns,
        full_feature_names,
        grouped: true,
    };
    let answer = feast.service.vectors(read, &access, deadline).await?;

    // A one-value join-key list applies to every row (Strata's rule).
    let rows = join_keys.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    let epoch = prost_types::Timestamp::default();
    let mut names: Vec<String> = join_keys.iter().map(|(n, _)| n.clone()).collect();
    names.extend(answer.feature_names.iter().cloned());
    let mut results: Vec<FeatureVector> = join_keys
        .into_iter()
        .map(|(_, values)| FeatureVector {
            values: if values.len() == 1 { vec![values[0].clone(); rows] } else { values },
            statuses: vec![FieldStatus::Present as i32; rows],
            event_timestamps: vec![epoch; rows],
        })
        .collect();
    let columns = feature_columns(&answer, |value, status, micros| {
        (value_to_feast(&value), field_status(status) as i32, timestamp(micros))
    });
    let missing = (ft::Value::default(), FieldStatus::Invalid as i32, epoch);
    for column in &columns {
        let mut vector = FeatureVector {
            values: Vec::with_capacity(rows),
            statuses: Vec::with_capacity(rows),
            event_timestamps: Vec::with_capacity(rows),
        };
        let mut push = |(value, status, time): &(ft::Value, i32, prost_types::Timestamp)| {
            vector.values.push(value.clone());
            vector.statuses.push(*status);
            vector.event_timestamps.push(*time);
        };
        match column {
            Some(column) => column.rows().for_each(|cell| push(cell.unwrap_or(&missing))),
            None => (0..rows).for_each(|_| push(&missing)),
        }
        results.push(vector);
    }
    Ok(Response::new(GetOnlineFeaturesResponse {
        metadata: Some(GetOnlineFeaturesResponseMetadata {
            feature_names: Some(FeatureList { val: names }),
            feature_view_metadata: Vec::new(),
        }),
        results,
        status: true,
    }))
}

fn entity_error(join_key: &str, row: usize, got: &str) -> Status {
    Status::invalid_argument(format!(
        "entities[{}][{row}] is {got}: a join key is an int64, int32, string or bytes value",
        echo(join_key)
    ))
}

/// A join key value: int32 widens to int64 (Feast's int32 entities then
/// find their rows, unlike through Feast's JSON API: #4110).
fn join_key_from_feast(value: &ft::Value) -> Result<v1::Value, &'static str> {
    use v1::value::Kind;
    let kind = match &value.val {
        Some(Val::Int64Val(n)) => Kind::Int64Value(*n),
        Some(Val::Int32Val(n)) => Kind::Int64Value(i64::from(*n)),
        Some(Val::StringVal(s)) => Kind::StringValue(s.clone()),
        Some(Val::BytesVal(b)) => Kind::BytesValue(b.clone()),
        None | Some(Val::NullVal(_)) => return Err("null"),
        Some(other) => return Err(feast_type_name(other)),
    };
    Ok(v1::Value { kind: Some(kind) })
}

/// Strata's value as Feast's; null is the empty value, as Feast sends it.
fn value_to_feast(value: &Value) -> ft::Value {
    let val = match value {
        Value::Null => None,
        Value::Int64(n) => Some(Val::Int64Val(*n)),
        Value::Double(f) => Some(Val::DoubleVal(*f)),
        Value::String(s) => Some(Val::StringVal(s.clone())),
        Value::Bool(b) => Some(Val::BoolVal(*b)),
        Value::Bytes(b) => Some(Val::BytesVal(b.clone())),
        Value::FloatList(list) => Some(Val::FloatListVal(ft::FloatList { val: list.clone() })),
        Value::Int64List(list) => Some(Val::Int64ListVal(ft::Int64List { val: list.clone() })),
        Value::Int32(n) => Some(Val::Int32Val(*n)),
        Value::Float(f) => Some(Val::FloatVal(*f)),
        // Feast's timestamps are whole Unix seconds.
        Value::Timestamp(micros) => Some(Val::UnixTimestampVal(micros.div_euclid(1_000_000))),
    };
    ft::Value { val }
}

fn field_status(status: v1::FeatureStatus) -> FieldStatus {
    use v1::FeatureStatus as S;
    match status {
        S::Present | S::StaleValue => FieldStatus::Present,
        S::NullValue => FieldStatus::NullValue,
        S::EntityNotFound => FieldStatus::NotFound,
        S::ValueOutsideMaxAge => FieldStatus::OutsideMaxAge,
        S::ValueUnavailable | S::Unspecified => FieldStatus::Invalid,
    }
}

fn timestamp(micros: i64) -> prost_types::Timestamp {
    if micros == 0 {
        return prost_types::Timestamp::default();
    }
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: (micros.rem_euclid(1_000_000) * 1_000) as i32,
    }
}

/// One row of a push or write as a frame: `features` (values as text,
/// parsed by the column's type) or `typed_features`, not both.
fn one_row(
    view: &FeatureView,
    features: &HashMap<String, String>,
    typed: &HashMap<String, ft::Value>,
) -> Result<Vec<(String, Vec<Json>)>, FeastError> {
    match (features.is_empty(), typed.is_empty()) {
        (false, false) => Err(FeastError::BadRequest("give features or typed_features, not both".into())),
        (true, true) => Err(FeastError::BadRequest("features and typed_features are both empty".into())),
        (false, true) => {
            features.iter().map(|(name, text)| Ok((name.clone(), vec![text_to_json(view, name, text)?]))).collect()
        }
        (true, false) => {
            typed.iter().map(|(name, value)| Ok((name.clone(), vec![typed_to_json(name, value)?]))).collect()
        }
    }
}

/// A value given as text, as JSON of its column's type (the frame parser
/// then checks it like any other).
fn text_to_json(view: &FeatureView, name: &str, text: &str) -> Result<Json, FeastError> {
    let bad = |what: &str| FeastError::BadRequest(format!("features[{}]: {} is not {what}", echo(name), echo(text)));
    let number =
        |what| serde_json::from_str::<serde_json::Number>(text.trim()).map(Json::Number).map_err(|_| bad(what));
    if let Some(key) = view.entity.join_keys().iter().find(|k| k.name == name) {
        return match key.ty {
            KeyType::Int64 => number("an int64"),
            KeyType::String | KeyType::Bytes => Ok(Json::String(text.to_owned())),
        };
    }
    let Some(column) = view.position(name) else { return Ok(Json::String(text.to_owned())) };
    match view.features[column].ty {
        FeatureType::Int64 => number("an int64"),
        FeatureType::Int32 => number("an int32"),
        FeatureType::Double | FeatureType::Float => number("a number"),
        // Unix seconds, or text the frame parser reads as a time.
        FeatureType::Timestamp => Ok(serde_json::from_str::<serde_json::Number>(text.trim())
            .map_or_else(|_| Json::String(text.to_owned()), Json::Number)),
        FeatureType::Bool => match text.trim() {
            "true" | "True" => Ok(Json::Bool(true)),
            "false" | "False" => Ok(Json::Bool(false)),
            _ => Err(bad("a bool")),
        },
        FeatureType::FloatList | FeatureType::Int64List => serde_json::from_str(text).map_err(|_| bad("a JSON list")),
        FeatureType::String | FeatureType::Bytes => Ok(Json::String(text.to_owned())),
    }
}

/// A typed value as JSON for the frame parser; types Strata does not have
/// are refused by name.
fn typed_to_json(name: &str, value: &ft::Value) -> Result<Json, FeastError> {
    use base64::Engine as _;
    Ok(match &value.val {
        // Feast's null timestamp is NaT's integer.
        None | Some(Val::NullVal(_)) | Some(Val::UnixTimestampVal(i64::MIN)) => Json::Null,
        Some(Val::Int64Val(n) | Val::UnixTimestampVal(n)) => Json::from(*n),
        Some(Val::Int32Val(n)) => Json::from(*n),
        Some(Val::DoubleVal(f)) => Json::from(*f),
        Some(Val::FloatVal(f)) => Json::from(f64::from(*f)),
        Some(Val::StringVal(s)) => Json::String(s.clone()),
        Some(Val::BoolVal(b)) => Json::Bool(*b),
        Some(Val::BytesVal(b)) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Some(Val::FloatListVal(l)) => Json::from(l.val.iter().map(|&f| f64::from(f)).collect::<Vec<_>>()),
        Some(Val::DoubleListVal(l)) => Json::from(l.val.clone()),
        Some(Val::Int64ListVal(l)) => Json::from(l.val.clone()),
        Some(Val::Int32ListVal(l)) => Json::from(l.val.clone()),
        Some(other) => {
            return Err(FeastError::BadRequest(format!(
                "typed_features[{}] is a {}, which Strata does not store",
                echo(name),
                feast_type_name(other)
            )));
        }
    })
}

/// Feast's name of a value's type, for messages.
fn feast_type_name(val: &Val) -> &'static str {
    match val {
        Val::BytesVal(_) => "bytes",
        Val::StringVal(_) => "string",
        Val::Int32Val(_) => "int32",
        Val::Int64Val(_) => "int64",
        Val::DoubleVal(_) => "double",
        Val::FloatVal(_) => "float",
        Val::BoolVal(_) => "bool",
        Val::UnixTimestampVal(_) => "unix_timestamp",
        Val::BytesListVal(_) => "bytes_list",
        Val::StringListVal(_) => "string_list",
        Val::Int32ListVal(_) => "int32_list",
        Val::Int64ListVal(_) => "int64_list",
        Val::DoubleListVal(_) => "double_list",
        Val::FloatListVal(_) => "float_list",
        Val::BoolListVal(_) => "bool_list",
        Val::UnixTimestampListVal(_) => "unix_timestamp_list",
        Val::NullVal(_) => "null",
        Val::MapVal(_) => "map",
        Val::MapListVal(_) => "map_list",
        Val::BytesSetVal(_) => "bytes_set",
        Val::StringSetVal(_) => "string_set",
        Val::Int32SetVal(_) => "int32_set",
        Val::Int64SetVal(_) => "int64_set",
        Val::DoubleSetVal(_) => "double_set",
        Val::FloatSetVal(_) => "float_set",
        Val::BoolSetVal(_) => "bool_set",
        Val::UnixTimestampSetVal(_) => "unix_timestamp_set",
        Val::JsonVal(_) => "json",
        Val::JsonListVal(_) => "json_list",
        Val::StructVal(_) => "struct",
        Val::StructListVal(_) => "struct_list",
        Val::UuidVal(_) => "uuid",
        Val::TimeUuidVal(_) => "time_uuid",
        Val::UuidListVal(_) => "uuid_list",
        Val::TimeUuidListVal(_) => "time_uuid_list",
        Val::UuidSetVal(_) => "uuid_set",
        Val::TimeUuidSetVal(_) => "time_uuid_set",
        Val::ListVal(_) => "list",
        Val::SetVal(_) => "set",
        Val::DecimalVal(_) => "decimal",
        Val::DecimalListVal(_) => "decimal_list",
        Val::DecimalSetVal(_) => "decimal_set",
        Val::ScalarMapVal(_) => "scalar_map",
        Val::ZonedTimestampVal(_) => "zoned_timestamp",
    }
}

/// The services, sharing one [`Feast`].
pub(crate) fn services(
    feast: Arc<Feast>,
    max_request_bytes: usize,
) -> (
    strata_proto::feast::serving::serving_service_server::ServingServiceServer<Feast>,
    strata_proto::feast::grpc_feature_server_server::GrpcFeatureServerServer<Feast>,
) {
    use strata_proto::feast::grpc_feature_server_server::GrpcFeatureServerServer;
    use strata_proto::feast::serving::serving_service_server::ServingServiceServer;
    (
        ServingServiceServer::from_arc(feast.clone()).max_decoding_message_size(max_request_bytes),
        GrpcFeatureServerServer::from_arc(feast).max_decoding_message_size(max_request_bytes),
    )
}
