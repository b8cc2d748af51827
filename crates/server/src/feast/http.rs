//! Feast's HTTP API, as `feast serve` answers it, on its own port: a Feast
//! SDK whose `feature_store.yaml` names Strata as its remote online store
//! reads and writes through Strata without changing a call. Errors are
//! Feast's error body (a JSON string holding `{module, class, message}`,
//! which the SDK raises as its own exception), in one mapping below.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;
use std::time::Instant as StdInstant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Extension, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use serde::Deserialize;
use serde::de::{MapAccess, Visitor};
use serde_json::{Value as Json, json};
use strata_core::{Registry, Value};
use strata_proto::{InvalidRequest, echo, v1};

use super::{Feast, FeastError, feature_columns, frame_rows, join_key_to_wire, push_views, view_of, write_rows};
use crate::admission::Refusal;
use crate::auth::{AUTHORIZATION, Access, Operation};
use crate::listener::Peer;
use crate::service::ServiceError;

/// `POST /get-online-features`, `/write-to-online-store`, `/push`, and
/// `GET /health`. Bodies over `max_request_bytes` are refused before they
/// are read whole.
pub(crate) fn router(api: Arc<Feast>, max_request_bytes: usize) -> Router {
    Router::new()
        .route("/get-online-features", post(get_online_features))
        .route("/write-to-online-store", post(write_to_online_store))
        .route("/push", post(push))
        .route("/health", get(health))
        .route("/materialize", post(materialize))
        .route("/materialize-incremental", post(materialize))
        .layer(DefaultBodyLimit::max(max_request_bytes))
        // Before any body is read.
        .layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .with_state(api)
}

/// Authenticates a call from its headers (or its client certificate)
/// before its body is read, and hands its [`Access`] on; `/health` is
/// open, as probes carry no token.
async fn authenticate(State(api): State<Arc<Feast>>, mut request: Request, next: Next) -> Response {
    if request.uri().path() == "/health" {
        return next.run(request).await;
    }
    let authorization = request.headers().get(AUTHORIZATION).map(|v| v.as_bytes());
    let certificate =
        request.extensions().get::<ConnectInfo<Peer>>().and_then(|ConnectInfo(peer)| peer.certificate.as_deref());
    match api.auth.authenticate(authorization, certificate) {
        Ok(access) => {
            request.extensions_mut().insert(access);
            next.run(request).await
        }
        Err(reason) => FeastError::Unauthenticated(reason).into_response(),
    }
}

/// The HTTP code, the Feast exception class (in `feast.errors`) and the
/// message of an error.
fn parts(error: &FeastError) -> (StatusCode, &'static str, String) {
    use InvalidRequest as I;
    match error {
        FeastError::BadRequest(message) => (StatusCode::UNPROCESSABLE_ENTITY, "FeastError", message.clone()),
        FeastError::Service(ServiceError::Invalid(e @ (I::UnknownView { .. } | I::NoView))) => {
            (StatusCode::NOT_FOUND, "FeatureViewNotFoundException", e.to_string())
        }
        FeastError::Service(ServiceError::Invalid(e @ I::UnknownService { .. })) => {
            (StatusCode::NOT_FOUND, "FeatureServiceNotFoundException", e.to_string())
        }
        FeastError::Service(ServiceError::Invalid(e)) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "FeastError", e.to_string())
        }
        // Retrying the same call cannot make the answer smaller.
        FeastError::Service(e @ ServiceError::AnswerTooLarge { .. }) => {
            (StatusCode::PAYLOAD_TOO_LARGE, "FeastError", e.to_string())
        }
        // The SDK retries 503: safe, as a repeated write is skipped as
        // not newer.
        FeastError::Service(e @ ServiceError::WriteFailed { retry_may_help: true, .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "FeastError", e.to_string())
        }
        FeastError::Service(e @ ServiceError::WriteFailed { retry_may_help: false, .. }) => {
            (StatusCode::INTERNAL_SERVER_ERROR, "FeastError", e.to_string())
        }
        // The SDK raises both as FeastPermissionError, a PermissionError.
        FeastError::Unauthenticated(reason) => {
            (StatusCode::UNAUTHORIZED, "FeastPermissionError", reason.message().to_owned())
        }
        FeastError::Service(ServiceError::Denied(e)) => (StatusCode::FORBIDDEN, "FeastPermissionError", e.to_string()),
        FeastError::Refused(Refusal::Draining | Refusal::Overloaded, message) => {
            (StatusCode::SERVICE_UNAVAILABLE, "FeastError", message.clone())
        }
        FeastError::Refused(Refusal::RateLimited, message) => {
            (StatusCode::TOO_MANY_REQUESTS, "FeastError", message.clone())
        }
        FeastError::Refused(Refusal::BadClientId, message) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "FeastError", message.clone())
        }
        e @ FeastError::PushSourceNotFound(_) => {
            (StatusCode::UNPROCESSABLE_ENTITY, "PushSourceNotFoundException", e.message())
        }
        e @ FeastError::OnlineOnly(_) => (StatusCode::UNPROCESSABLE_ENTITY, "FeastError", e.message()),
        FeastError::BodyUnreadable(code, message) => {
            let limit = if *code == StatusCode::PAYLOAD_TOO_LARGE { " (limits.max_request_bytes)" } else { "" };
            (*code, "FeastError", format!("the request body cannot be read: {message}{limit}"))
        }
        FeastError::Unsupported(message) => (StatusCode::NOT_IMPLEMENTED, "FeastError", (*message).to_owned()),
        // The SDK retries 503; rows already written are skipped then.
        e @ FeastError::PartlyWritten { .. } => (StatusCode::SERVICE_UNAVAILABLE, "FeastError", e.message()),
    }
}

impl IntoResponse for FeastError {
    fn into_response(self) -> Response {
        let (code, class, message) = parts(&self);
        // Feast's server sends `to_error_detail()`, a JSON document in a
        // JSON string; the SDK parses it twice.
        let detail = json!({ "module": "feast.errors", "class": class, "message": message }).to_string();
        (code, [(header::CONTENT_TYPE, "application/json")], Json::String(detail).to_string()).into_response()
    }
}

type Answer = Result<Response, FeastError>;

/// Runs `call` under admission (drain, the in-flight cap, rate limits by
/// `x-client-id`) and counts it by endpoint and HTTP code.
async fn admitted<F>(api: &Feast, endpoint: &'static str, headers: &HeaderMap, access: &Access, call: F) -> Response
where
    F: Future<Output = Answer>,
{
    let started = StdInstant::now();
    let client = headers.get(crate::admission::CLIENT_ID_HEADER).map(|v| v.as_bytes());
    let response = match api.admission.admit_access(access, client) {
        Ok(_permit) => call.await.unwrap_or_else(IntoResponse::into_response),
        Err((refusal, status)) => FeastError::Refused(refusal, status.message().to_owned()).into_response(),
    };
    let code = response.status().as_u16().to_string();
    metrics::counter!("strata_feast_http_requests_total", "endpoint" => endpoint, "code" => code).increment(1);
    metrics::histogram!("strata_feast_http_request_duration_seconds", "endpoint" => endpoint)
        .record(started.elapsed().as_secs_f64());
    response
}

/// A request body, or why it could not be read (over the size limit, say),
/// which is answered in Feast's error shape like every other error.
type Body = Result<Bytes, BytesRejection>;

impl From<BytesRejection> for FeastError {
    fn from(e: BytesRejection) -> FeastError {
        FeastError::BodyUnreadable(e.status(), e.body_text())
    }
}

/// Parses a JSON body whatever its Content-Type (Feast's SDKs up to 0.60
/// sent none), naming what is wrong without echoing it.
fn parse_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, FeastError> {
    serde_json::from_slice(body).map_err(|e| {
        // serde_json's messages name the field and position, not the input.
        FeastError::BadRequest(format!("the request body is not a valid request: {}", echo(&e.to_string())))
    })
}

/// Feast 0.67's `store.materialize()` hands a remote online store's
/// materialization to the server, which would read the offline store.
/// Strata does not; it says what works instead.
async fn materialize() -> Response {
    FeastError::Unsupported(
        "Strata does not read Feast's offline store, so it cannot run /materialize: run Feast's materialization \
         engine where the offline store is reachable (see README, Coming from Feast); its batches reach Strata \
         through /write-to-online-store",
    )
    .into_response()
}

async fn health(State(api): State<Arc<Feast>>) -> StatusCode {
    if api.admission.is_draining() { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK }
}

/// A JSON object's entries in the order they were written: the answer's
/// join-key columns follow the request's order.
#[derive(Debug, Default)]
struct Ordered<V>(Vec<(String, V)>);

impl<'de, V: Deserialize<'de>> Deserialize<'de> for Ordered<V> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Entries<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Entries<V> {
            type Value = Ordered<V>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered<V>, A::Error> {
                let mut entries: Vec<(String, V)> = Vec::new();
                while let Some((key, value)) = map.next_entry::<String, V>()? {
                    if entries.iter().any(|(k, _)| *k == key) {
                        return Err(serde::de::Error::custom(format!("{} is given twice", echo(&key))));
                    }
                    entries.push((key, value));
                }
                Ok(Ordered(entries))
            }
        }
        deserializer.deserialize_map(Entries(std::marker::PhantomData))
    }
}

/// Both shapes of the read request: the whole request (0.64 and later), or
/// one view per call with its first join key (0.63 and earlier): the same
/// fields, fewer of them.
#[derive(Deserialize)]
struct OnlineFeaturesRequest {
    entities: Ordered<Vec<Json>>,
    #[serde(default)]
    features: Vec<String>,
    #[serde(default)]
    feature_service: Option<String>,
    #[serde(default)]
    full_feature_names: bool,
    /// Accepted; Strata's views have no versions.
    #[serde(default, rename = "include_feature_view_version_metadata")]
    _include_versions: bool,
}

async fn get_online_features(
    State(api): State<Arc<Feast>>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admitted(&api, "/get-online-features", &headers, &access, async { read(&api, &access, &body?).await }).await
}

async fn read(api: &Feast, access: &Access, body: &[u8]) -> Answer {
    let request: OnlineFeaturesRequest = parse_body(body)?;
    let mut entities = HashMap::with_capacity(request.entities.0.len());
    for (name, values) in &request.entities.0 {
        // A column no entity has is no view's business: it is only echoed.
        let Some(ty) = join_key_type(&api.registry, name) else { continue };
        let values = values
            .iter()
            .enumerate()
            .map(|(row, value)| join_key_to_wire(value, ty).map_err(|e| entity_error(name, row, &e)))
            .collect::<Result<_, _>>()?;
        entities.insert(name.clone(), v1::JoinKeyColumn { values });
    }
    let grpc = v1::GetFeatureVectorsRequest {
        features: request.features,
        feature_service: request.feature_service.unwrap_or_default(),
        entities,
        full_feature_names: request.full_feature_names,
        grouped: true,
    };
    let answer = api.service.vectors(grpc, access, api.service.default_deadline()).await?;
    let body = online_response(&request.entities.0, &answer);
    Ok(([(header::CONTENT_TYPE, "application/json")], body).into_response())
}

/// The type of a join key of that name in the registry (`entity_key`, the
/// key of views without an entity, is a string); `None` if no entity has it.
fn join_key_type(registry: &Registry, name: &str) -> Option<strata_core::KeyType> {
    if name == "entity_key" {
        return Some(strata_core::KeyType::String);
    }
    registry.entities().iter().flat_map(|e| e.join_keys()).find(|k| k.name == name).map(|k| k.ty)
}

fn entity_error(join_key: &str, row: usize, message: &str) -> FeastError {
    FeastError::BadRequest(format!("entities[{}][{row}]: {message}", echo(join_key)))
}

/// Feast's column-major answer: join-key columns first (as given,
/// PRESENT), then one column per feature. Written straight into the text:
/// each key's cell is rendered once and copied onto its rows (a 100-row
/// answer built as a `serde_json::Value` tree cost most of the call).
fn online_response(entities: &[(String, Vec<Json>)], answer: &v1::GetFeatureVectorsResponse) -> String {
    // A one-value join-key list applies to every row (Strata's rule).
    let rows = entities.iter().map(|(_, v)| v.len()).max().unwrap_or(0);
    const EPOCH: &str = "\"1970-01-01T00:00:00Z\"";
    const PRESENT: &str = "\"PRESENT\"";
    let mut names: Vec<&str> = entities.iter().map(|(n, _)| n.as_str()).collect();
    names.extend(answer.feature_names.iter().map(String::as_str));
    let mut out = String::with_capacity(64 + rows * names.len() * 40);
    out.push_str("{\"metadata\":{\"feature_names\":");
    out.push_str(&Json::from(names).to_string());
    out.push_str("},\"results\":[");
    for (_, values) in entities {
        let rendered: Vec<String> = values.iter().map(Json::to_string).collect();
        let cell = |row: usize| (rendered[if rendered.len() == 1 { 0 } else { row }].as_str(), PRESENT, EPOCH);
        if !out.ends_with('[') {
            out.push(',');
        }
        write_column(&mut out, (0..rows).map(cell));
    }
    let columns = feature_columns(answer, |value, status, micros| {
        let time = match micros {
            0 => EPOCH.to_owned(),
            micros => format!("\"{}\"", timestamp(micros)),
        };
        (value_json(&value).to_string(), format!("\"{}\"", status_name(status)), time)
    });
    const MISSING: (&str, &str, &str) = ("null", "\"INVALID\"", EPOCH);
    for column in &columns {
        if !out.ends_with('[') {
            out.push(',');
        }
        match column {
            Some(column) => write_column(
                &mut out,
                column.rows().map(|cell| cell.map_or(MISSING, |(v, s, t)| (v.as_str(), s.as_str(), t.as_str()))),
            ),
            None => write_column(&mut out, (0..rows).map(|_| MISSING)),
        }
    }
    out.push_str("],\"status\":true}");
    out
}

/// One result column, `{"values": [...], "statuses": [...],
/// "event_timestamps": [...]}`, from each row's rendered JSON.
fn write_column<'a>(out: &mut String, cells: impl Iterator<Item = (&'a str, &'a str, &'a str)> + Clone) {
    let list = |out: &mut String, items: &mut dyn Iterator<Item = &'a str>| {
        for (i, item) in items.enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(item);
        }
    };
    out.push_str("{\"values\":[");
    list(out, &mut cells.clone().map(|c| c.0));
    out.push_str("],\"statuses\":[");
    list(out, &mut cells.clone().map(|c| c.1));
    out.push_str("],\"event_timestamps\":[");
    list(out, &mut cells.map(|c| c.2));
    out.push_str("]}");
}

/// Feast's status names. Feast has no word for "served from a cache while
/// the source of truth is down": that value is PRESENT (it is the last one
/// written); a value no tier could answer is INVALID, never NOT_FOUND.
fn status_name(status: v1::FeatureStatus) -> &'static str {
    use v1::FeatureStatus as S;
    match status {
        S::Present | S::StaleValue => "PRESENT",
        S::NullValue => "NULL_VALUE",
        S::EntityNotFound => "NOT_FOUND",
        S::ValueOutsideMaxAge => "OUTSIDE_MAX_AGE",
        S::ValueUnavailable | S::Unspecified => "INVALID",
    }
}

/// A value as Feast's server writes it: numbers as JSON numbers (a 32-bit
/// float widened exactly, as Python does), non-finite floats as protobuf
/// JSON's strings, bytes in base64, timestamps in Unix seconds.
fn value_json(value: &Value) -> Json {
    fn float(f: f64) -> Json {
        match serde_json::Number::from_f64(f) {
            Some(n) => Json::Number(n),
            None if f.is_nan() => Json::String("NaN".into()),
            None if f > 0.0 => Json::String("Infinity".into()),
            None => Json::String("-Infinity".into()),
        }
    }
    match value {
        Value::Null => Json::Null,
        Value::Int64(n) => json!(n),
        Value::Double(f) => float(*f),
        Value::String(s) => Json::String(s.clone()),
        Value::Bool(b) => Json::Bool(*b),
        Value::Bytes(b) => Json::String(base64::engine::general_purpose::STANDARD.encode(b)),
        Value::FloatList(list) => Json::Array(list.iter().map(|&f| float(f64::from(f))).collect()),
        Value::Int64List(list) => json!(list),
        Value::Int32(n) => json!(n),
        Value::Float(f) => float(f64::from(*f)),
        // Feast's timestamps are whole Unix seconds.
        Value::Timestamp(micros) => json!(micros.div_euclid(1_000_000)),
    }
}

/// RFC 3339 in UTC with as many fraction digits as the time needs, as
/// Feast's server writes event timestamps.
fn timestamp(micros: i64) -> String {
    let Some(time) = chrono::DateTime::from_timestamp_micros(micros) else { return "1970-01-01T00:00:00Z".into() };
    let base = time.format("%Y-%m-%dT%H:%M:%S");
    match micros.rem_euclid(1_000_000) {
        0 => format!("{base}Z"),
        sub if sub % 1_000 == 0 => format!("{base}.{:03}Z", sub / 1_000),
        sub => format!("{base}.{sub:06}Z"),
    }
}

/// `POST /write-to-online-store`'s body.
#[derive(Deserialize)]
struct WriteRequest {
    feature_view_name: String,
    df: Ordered<Vec<Json>>,
    #[serde(default, rename = "allow_registry_cache")]
    _allow_registry_cache: Option<bool>,
    #[serde(default, rename = "transform_on_write")]
    _transform_on_write: Option<bool>,
}

/// `POST /push`'s body.
#[derive(Deserialize)]
struct PushRequest {
    push_source_name: String,
    df: Ordered<Vec<Json>>,
    #[serde(default = "online")]
    to: String,
    #[serde(default, rename = "allow_registry_cache")]
    _allow_registry_cache: Option<bool>,
    #[serde(default, rename = "transform_on_write")]
    _transform_on_write: Option<bool>,
}

fn online() -> String {
    "online".into()
}

async fn write_to_online_store(
    State(api): State<Arc<Feast>>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admitted(&api, "/write-to-online-store", &headers, &access, async {
        let request: WriteRequest = parse_body(&body?)?;
        let view = view_of(&api.registry, &request.feature_view_name)?;
        // Before the rows are looked at: a caller that may not write learns nothing from them.
        access.check(Operation::Write, &view.name).map_err(ServiceError::from)?;
        let rows = frame_rows(view, &request.df.0)?;
        write_rows(&api, &access, view, rows, None).await?;
        Ok(Json::Null.to_string().into_response())
    })
    .await
}

async fn push(
    State(api): State<Arc<Feast>>,
    Extension(access): Extension<Access>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    admitted(&api, "/push", &headers, &access, async {
        let request: PushRequest = parse_body(&body?)?;
        if request.to != "online" {
            return Err(FeastError::OnlineOnly(echo(&request.to)));
        }
        let views = push_views(&api.registry, &request.push_source_name)?;
        for view in &views {
            access.check(Operation::Write, &view.name).map_err(ServiceError::from)?;
        }
        // Every view's rows are checked before any is written.
        let mut writes = Vec::with_capacity(views.len());
        for view in views {
            writes.push((view, frame_rows(view, &request.df.0)?));
        }
        for (view, rows) in writes {
            write_rows(&api, &access, view, rows, None).await?;
        }
        Ok(Json::Null.to_string().into_response())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_timestamps_have_as_many_fraction_digits_as_they_need() {
        assert_eq!(timestamp(1_704_067_200_000_000), "2024-01-01T00:00:00Z");
        assert_eq!(timestamp(1_704_067_200_250_000), "2024-01-01T00:00:00.250Z");
        assert_eq!(timestamp(1_704_067_200_000_123), "2024-01-01T00:00:00.000123Z");
    }

    #[test]
    fn the_answer_is_feasts_column_major_json_with_each_keys_cell_on_its_rows() {
        let key = |value: Value, status: v1::FeatureStatus, micros: i64| v1::KeyFeatures {
            values: vec![strata_proto::value_to_wire(&value)],
            statuses: vec![status as i32],
            event_time_micros: micros,
            source: 0,
        };
        let answer = v1::GetFeatureVectorsResponse {
            feature_names: vec!["trips".into()],
            vectors: Vec::new(),
            groups: vec![v1::FeatureGroup {
                view: "v".into(),
                features: vec![0],
                keys: vec![
                    key(Value::Int64(7), v1::FeatureStatus::Present, 1_704_067_200_000_000),
                    key(Value::Null, v1::FeatureStatus::EntityNotFound, 0),
                ],
                row_keys: vec![0, 1, 0],
            }],
        };
        let entities =
            vec![("driver_id".to_owned(), vec![json!(1), json!(2), json!(1)]), ("c".to_owned(), vec![json!("x")])];
        let text = online_response(&entities, &answer);
        let epoch = "1970-01-01T00:00:00Z";
        let at = "2024-01-01T00:00:00Z";
        assert_eq!(
            serde_json::from_str::<Json>(&text).unwrap(),
            json!({
                "metadata": {"feature_names": ["driver_id", "c", "trips"]},
                "results": [
                    {"values": [1, 2, 1], "statuses": ["PRESENT", "PRESENT", "PRESENT"], "event_timestamps": [epoch, epoch, epoch]},
                    {"values": ["x", "x", "x"], "statuses": ["PRESENT", "PRESENT", "PRESENT"], "event_timestamps": [epoch, epoch, epoch]},
                    {"values": [7, null, 7], "statuses": ["PRESENT", "NOT_FOUND", "PRESENT"], "event_timestamps": [at, epoch, at]},
                ],
                "status": true
            })
        );
    }

    #[test]
    fn values_are_written_as_feasts_server_writes_them() {
        assert_eq!(value_json(&Value::Int64(i64::MAX)), json!(9_223_372_036_854_775_807_i64));
        assert_eq!(value_json(&Value::FloatList(vec![0.1])), json!([0.10000000149011612]));
        assert_eq!(value_json(&Value::Double(f64::NAN)), json!("NaN"));
        assert_eq!(value_json(&Value::Double(f64::NEG_INFINITY)), json!("-Infinity"));
        assert_eq!(value_json(&Value::Bytes(vec![0, 255])), json!("AP8="));
        assert_eq!(value_json(&Value::Null), Json::Null);
        assert_eq!(value_json(&Value::Int32(i32::MIN)), json!(-2_147_483_648));
        assert_eq!(value_json(&Value::Float(0.1)), json!(0.10000000149011612));
        assert_eq!(value_json(&Value::Timestamp(-1)), json!(-1), "whole Unix seconds, rounded down");
        assert_eq!(value_json(&Value::Timestamp(1_700_000_000_999_999)), json!(1_700_000_000));
    }

    #[test]
    fn the_error_body_is_a_json_string_holding_feasts_error_detail() {
        let response = FeastError::BadRequest("no".into()).into_response();
        assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let missing = FeastError::from(InvalidRequest::UnknownService { name: "s".into(), known: String::new() });
        assert_eq!(parts(&missing).0, StatusCode::NOT_FOUND);
        assert_eq!(parts(&missing).1, "FeatureServiceNotFoundException");
    }
}
