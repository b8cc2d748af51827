//! The operator commands of the `strata` binary that look at a running
//! stack: `get` and `views` ask a server over gRPC, `health` asks its gRPC
//! health service, `shards` counts rows on every shard (a fan-out count
//! through the configuration's pools). Each prints a readable table, or
//! JSON with `--json`.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value as Json, json};
use strata_proto::v1;
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_shard_router::ShardRouter;
use tonic::metadata::{AsciiMetadataValue, MetadataValue};
use tonic::service::Interceptor;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::config::Config;

/// How long a command waits for the server to answer.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Where the lookup commands find a server unless told.
pub const DEFAULT_ADDR: &str = "http://127.0.0.1:50051";

/// The server a lookup command asks, and how it proves who it is.
#[derive(clap::Args, Clone)]
pub struct Target {
    /// The server's gRPC address (`host:port` or a URL; `https://`, or a
    /// CA file, for TLS).
    #[arg(long, default_value = DEFAULT_ADDR, env = "STRATA_ADDR")]
    pub addr: String,
    /// PEM CA certificates the server's certificate must chain to (else
    /// the system's roots, for an `https://` address).
    #[arg(long, env = "STRATA_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// A client certificate and key (PEM), for a server with mutual TLS.
    #[arg(long, env = "STRATA_CERT_FILE", requires = "key_file")]
    pub cert_file: Option<PathBuf>,
    #[arg(long, env = "STRATA_KEY_FILE", requires = "cert_file")]
    pub key_file: Option<PathBuf>,
    /// A bearer token. Prefer STRATA_TOKEN or --token-file: a command
    /// line is visible to every user of the machine.
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    pub token: Option<String>,
    /// A file holding the bearer token (surrounding white space ignored).
    #[arg(long, env = "STRATA_TOKEN_FILE")]
    pub token_file: Option<PathBuf>,
}

impl Target {
    /// A target at `addr` with no TLS and no token.
    pub fn plain(addr: &str) -> Target {
        Target { addr: addr.to_owned(), ca_file: None, cert_file: None, key_file: None, token: None, token_file: None }
    }
}

/// Sends the bearer token, if any, with every call.
#[derive(Clone)]
pub struct Bearer(Option<AsciiMetadataValue>);

impl Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert(crate::auth::AUTHORIZATION, value.clone());
        }
        Ok(request)
    }
}

/// A channel that sends the target's token.
pub type Connection = InterceptedService<Channel, Bearer>;

fn read_file(path: &std::path::Path) -> Result<Vec<u8>> {
    std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

/// A gRPC channel to the target, connected (with TLS where asked).
pub async fn connect(target: &Target) -> Result<Connection> {
    let addr = &target.addr;
    let tls = target.ca_file.is_some() || target.cert_file.is_some() || addr.starts_with("https://");
    let url = match (addr.contains("://"), tls) {
        (true, _) => addr.to_owned(),
        (false, false) => format!("http://{addr}"),
        (false, true) => format!("https://{addr}"),
    };
    let mut endpoint = Endpoint::from_shared(url.clone())
        .with_context(|| format!("bad server address {addr:?}"))?
        .connect_timeout(TIMEOUT)
        .timeout(TIMEOUT);
    if tls {
        let mut config = ClientTlsConfig::new();
        config = match &target.ca_file {
            Some(ca) => config.ca_certificate(Certificate::from_pem(read_file(ca)?)),
            None => config.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&target.cert_file, &target.key_file) {
            config = config.identity(Identity::from_pem(read_file(cert)?, read_file(key)?));
        }
        endpoint = endpoint.tls_config(config).context("bad TLS settings")?;
    }
    let token = match (&target.token, &target.token_file) {
        (Some(token), _) => Some(token.trim().to_owned()),
        (None, Some(path)) => Some(String::from_utf8_lossy(&read_file(path)?).trim().to_owned()),
        (None, None) => None,
    };
    let bearer = token
        .map(|t| MetadataValue::try_from(format!("Bearer {t}")))
        .transpose()
        .map_err(|_| anyhow::anyhow!("the token must be printable ASCII"))?;
    let channel = endpoint.connect().await.with_context(|| format!("cannot connect to {url}"))?;
    Ok(InterceptedService::new(channel, Bearer(bearer)))
}

/// A gRPC error as one line: its code as the gRPC spec spells it
/// (INVALID_ARGUMENT) and its message.
fn status_line(status: tonic::Status) -> anyhow::Error {
    let mut code = String::new();
    for (i, c) in format!("{:?}", status.code()).chars().enumerate() {
        if c.is_uppercase() && i > 0 {
            code.push('_');
        }
        code.push(c.to_ascii_uppercase());
    }
    anyhow::anyhow!("{code}: {}", status.message())
}

/// `strata get VIEW KEY...`: the rows of `keys`, one per line.
pub async fn get(
    target: &Target,
    view: &str,
    keys: Vec<String>,
    features: Vec<String>,
    as_json: bool,
) -> Result<String> {
    if keys.is_empty() {
        bail!("no keys given");
    }
    let mut client = FeatureStoreClient::new(connect(target).await?);
    let request = v1::GetFeaturesRequest { feature_view: view.to_owned(), entity_keys: keys, features };
    let response = client.get_features(request).await.map_err(status_line)?.into_inner();
    Ok(if as_json { rows_json(&response).to_string() + "\n" } else { rows_table(&response) })
}

/// What `strata get --service` (or with `view:feature` references) asks.
pub struct VectorsArgs {
    pub service: Option<String>,
    pub features: Vec<String>,
    pub full_names: bool,
    /// `NAME=VALUE,VALUE,...` each.
    pub join_keys: Vec<String>,
}

/// `strata get --service NAME JOIN_KEY=VALUES...`: one line per entity row,
/// its join keys, then each feature's value (or its status where it has
/// none). Values are typed by the join keys' declared types, which the
/// server's registry gives.
pub async fn get_vectors(target: &Target, read: VectorsArgs, as_json: bool) -> Result<String> {
    let mut client = FeatureStoreClient::new(connect(target).await?);
    let registry = client.list_feature_views(v1::ListFeatureViewsRequest {}).await.map_err(status_line)?.into_inner();
    let types: std::collections::HashMap<&str, v1::JoinKeyType> =
        registry.views.iter().flat_map(|v| v.join_keys.iter()).map(|k| (k.name.as_str(), k.r#type())).collect();
    let mut columns: Vec<(String, Vec<String>)> = Vec::new();
    for arg in &read.join_keys {
        let Some((name, values)) = arg.split_once('=') else {
            bail!("{arg:?} is not JOIN_KEY=VALUE[,VALUE...]");
        };
        columns.push((name.to_owned(), values.split(',').map(str::to_owned).collect()));
    }
    let rows = columns.iter().map(|(_, v)| v.len()).max().context("no join keys given")?;
    let mut entities = std::collections::HashMap::new();
    for (name, values) in &columns {
        if values.len() != rows && values.len() != 1 {
            bail!("{name} has {} values, another join key {rows}: give one value or {rows}", values.len());
        }
        let ty = types.get(name.as_str()).copied().unwrap_or(v1::JoinKeyType::JoinKeyString);
        let mut wire = Vec::with_capacity(rows);
        for row in 0..rows {
            let text = &values[if values.len() == 1 { 0 } else { row }];
            wire.push(join_key_value(name, ty, text)?);
        }
        entities.insert(name.clone(), v1::JoinKeyColumn { values: wire });
    }
    let request = v1::GetFeatureVectorsRequest {
        features: read.features,
        feature_service: read.service.unwrap_or_default(),
        entities,
        full_feature_names: read.full_names,
        grouped: false,
    };
    let response = client.get_feature_vectors(request).await.map_err(status_line)?.into_inner();
    let key_of = |row: usize| -> Vec<(String, String)> {
        columns
            .iter()
            .map(|(name, values)| (name.clone(), values[if values.len() == 1 { 0 } else { row }].clone()))
            .collect()
    };
    if as_json {
        let vectors: Vec<Json> = response
            .vectors
            .iter()
            .enumerate()
            .map(|(row, vector)| {
                let keys: serde_json::Map<String, Json> = key_of(row).into_iter().map(|(k, v)| (k, json!(v))).collect();
                let features: serde_json::Map<String, Json> = response
                    .feature_names
                    .iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let status = v1::FeatureStatus::try_from(vector.statuses[i]).unwrap_or_default();
                        let source = v1::Source::try_from(vector.sources[i]).unwrap_or_default();
                        (
                            name.clone(),
                            json!({ "value": value_json(&vector.values[i]), "status": status.as_str_name(), "source": source.as_str_name() }),
                        )
                    })
                    .collect();
                json!({ "join_keys": keys, "features": features })
            })
            .collect();
        return Ok(json!({ "features": response.feature_names, "vectors": vectors }).to_string() + "\n");
    }
    let mut header: Vec<String> = columns.iter().map(|(name, _)| name.clone()).collect();
    header.extend(response.feature_names.iter().cloned());
    let lines = response.vectors.iter().enumerate().map(|(row, vector)| {
        let mut cells: Vec<String> = key_of(row).into_iter().map(|(_, v)| v).collect();
        cells.extend(vector.values.iter().zip(&vector.statuses).map(|(value, &status)| {
            match v1::FeatureStatus::try_from(status).unwrap_or_default() {
                v1::FeatureStatus::Present | v1::FeatureStatus::NullValue => value_text(value),
                other => other.as_str_name().to_owned(),
            }
        }));
        cells
    });
    Ok(table(&header, lines, WIDEST))
}

/// A join key's value from the command line, by its declared type (bytes
/// as base64).
fn join_key_value(name: &str, ty: v1::JoinKeyType, text: &str) -> Result<v1::Value> {
    use base64::Engine as _;
    use v1::value::Kind;
    let kind = match ty {
        v1::JoinKeyType::JoinKeyInt64 => {
            Kind::Int64Value(text.parse().with_context(|| format!("{name}={text:?}: {name} is an int64 join key"))?)
        }
        v1::JoinKeyType::JoinKeyBytes => Kind::BytesValue(
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .with_context(|| format!("{name}={text:?}: {name} is a bytes join key (give base64)"))?,
        ),
        v1::JoinKeyType::JoinKeyString | v1::JoinKeyType::Unspecified => Kind::StringValue(text.to_owned()),
    };
    Ok(v1::Value { kind: Some(kind) })
}

/// The row's status as the proto names it (FOUND, NOT_FOUND, …).
fn status_name(row: &v1::FeatureRow) -> &'static str {
    row.status().as_str_name()
}

/// The tier that answered (L1, L2, L3), or "-" for none.
fn source_name(row: &v1::FeatureRow) -> &'static str {
    match row.source() {
        v1::Source::Unspecified => "-",
        source => source.as_str_name(),
    }
}

fn event_time(row: &v1::FeatureRow) -> Option<String> {
    rfc3339(row.event_time.as_ref()?)
}

fn rfc3339(t: &strata_proto::prost_types::Timestamp) -> Option<String> {
    let time = chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))?;
    Some(time.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
}

fn value_json(value: &v1::Value) -> Json {
    use base64::Engine as _;
    use v1::value::Kind;
    match &value.kind {
        None | Some(Kind::NullValue(_)) => Json::Null,
        Some(Kind::Int64Value(n)) => json!(n),
        Some(Kind::DoubleValue(x)) => json!(x),
        Some(Kind::StringValue(s)) => json!(s),
        Some(Kind::BoolValue(b)) => json!(b),
        Some(Kind::BytesValue(b)) => json!(base64::engine::general_purpose::STANDARD.encode(b)),
        Some(Kind::FloatListValue(l)) => json!(l.values),
        Some(Kind::Int64ListValue(l)) => json!(l.values),
        Some(Kind::Int32Value(n)) => json!(n),
        Some(Kind::FloatValue(x)) => json!(x),
        Some(Kind::TimestampValue(t)) => rfc3339(t).map_or(Json::Null, Json::String),
    }
}

fn value_text(value: &v1::Value) -> String {
    match value_json(value) {
        Json::Null => "null".to_owned(),
        Json::String(s) => s,
        other => other.to_string(),
    }
}

fn rows_json(response: &v1::GetFeaturesResponse) -> Json {
    let rows: Vec<Json> = response
        .rows
        .iter()
        .map(|row| {
            let values: serde_json::Map<String, Json> =
                response.features.iter().cloned().zip(row.values.iter().map(value_json)).collect();
            json!({
                "entity_key": row.entity_key,
                "status": status_name(row),
                "source": source_name(row),
                "event_time": event_time(row),
                "features": values,
            })
        })
        .collect();
    json!({ "features": response.features, "rows": rows })
}

fn rows_table(response: &v1::GetFeaturesResponse) -> String {
    let mut header = vec!["entity_key".to_owned(), "status".to_owned(), "source".to_owned(), "event_time".to_owned()];
    header.extend(response.features.iter().cloned());
    let rows = response.rows.iter().map(|row| {
        let mut cells = vec![
            row.entity_key.clone(),
            status_name(row).to_owned(),
            source_name(row).to_owned(),
            event_time(row).unwrap_or_else(|| "-".to_owned()),
        ];
        cells.extend(row.values.iter().map(value_text));
        cells
    });
    table(&header, rows, WIDEST)
}

/// The widest cell of a row table; embeddings are cut there.
const WIDEST: usize = 60;

/// Left-aligned columns, two spaces apart; cells longer than `widest` are
/// cut.
fn table(header: &[String], rows: impl IntoIterator<Item = Vec<String>>, widest: usize) -> String {
    let cut = |cell: String| {
        if cell.chars().count() > widest { cell.chars().take(widest - 1).collect::<String>() + "…" } else { cell }
    };
    let rows: Vec<Vec<String>> =
        std::iter::once(header.to_vec()).chain(rows).map(|r| r.into_iter().map(cut).collect()).collect();
    let mut widths = vec![0; header.len()];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row.iter().zip(&widths).map(|(cell, w)| format!("{cell:<w$}")).collect();
        let _ = writeln!(out, "{}", line.join("  ").trim_end());
    }
    out
}

fn duration_text(d: Option<&strata_proto::prost_types::Duration>) -> String {
    d.map_or_else(
        || "-".to_owned(),
        |d| {
            let d = Duration::new(d.seconds.unsigned_abs(), u32::try_from(d.nanos).unwrap_or(0));
            humantime_serde::re::humantime::format_duration(d).to_string()
        },
    )
}

/// `strata views`: the feature views a server serves.
pub async fn views(target: &Target, as_json: bool) -> Result<String> {
    let mut client = FeatureStoreClient::new(connect(target).await?);
    let views = client.list_feature_views(v1::ListFeatureViewsRequest {}).await.map_err(status_line)?.into_inner();
    let feature_type = |f: &v1::Feature| f.r#type().as_str_name().to_lowercase();
    if as_json {
        let views: Vec<Json> = views
            .views
            .iter()
            .map(|v| {
                json!({
                    "name": v.name, "description": v.description,
                    "features": v.features.iter().map(|f| json!({ "name": f.name, "type": feature_type(f) })).collect::<Vec<_>>(),
                    "l1_ttl": duration_text(v.l1_ttl.as_ref()), "l2_ttl": duration_text(v.l2_ttl.as_ref()),
                    "negative_ttl": duration_text(v.negative_ttl.as_ref()), "max_age": duration_text(v.max_age.as_ref()),
                    "jitter": v.jitter, "refresh_ahead": v.refresh_ahead,
                })
            })
            .collect();
        return Ok(Json::Array(views).to_string() + "\n");
    }
    let header: Vec<String> =
        ["view", "l1_ttl", "l2_ttl", "max_age", "features"].iter().map(|s| (*s).to_owned()).collect();
    let rows = views.views.iter().map(|v| {
        let features: Vec<String> = v.features.iter().map(|f| format!("{}:{}", f.name, feature_type(f))).collect();
        vec![
            v.name.clone(),
            duration_text(v.l1_ttl.as_ref()),
            duration_text(v.l2_ttl.as_ref()),
            duration_text(v.max_age.as_ref()),
            features.join(" "),
        ]
    });
    Ok(table(&header, rows, usize::MAX))
}

/// `strata health`: the server's readiness (`service` "" is the whole
/// server). Fails unless it is SERVING.
pub async fn health(target: &Target, service: &str) -> Result<String> {
    let mut client = HealthClient::new(connect(target).await?);
    let status = client
        .check(HealthCheckRequest { service: service.to_owned() })
        .await
        .map_err(status_line)?
        .into_inner()
        .status();
    let name = status.as_str_name();
    if status != ServingStatus::Serving {
        bail!("{name}");
    }
    Ok(format!("{name}\n"))
}

/// Rows of one view on each shard.
pub struct Spread {
    pub view: String,
    pub counts: Vec<u64>,
}

impl Spread {
    /// The fullest shard over the mean: 1.0 is perfectly even.
    pub fn max_over_mean(&self) -> f64 {
        let total: u64 = self.counts.iter().sum();
        if total == 0 {
            return 1.0;
        }
        let mean = total as f64 / self.counts.len() as f64;
        *self.counts.iter().max().unwrap_or(&0) as f64 / mean
    }
}

/// `strata shards`: counts the rows of each view (or of `only`) on every
/// shard, all shards at once.
pub async fn shards(config: &Config, only: Option<&str>, as_json: bool) -> Result<String> {
    let router = ShardRouter::new(&config.shards, &config.pool)?;
    let views: Vec<_> = match only {
        Some(name) => vec![config.registry.get(name).with_context(|| format!("no feature view {name:?}"))?.clone()],
        None => config.registry.views().to_vec(),
    };
    let mut spreads = Vec::new();
    for view in &views {
        let counts = router.count_rows(view).await.with_context(|| format!("counting rows of {}", view.name))?;
        spreads.push(Spread { view: view.name.clone(), counts });
    }
    let names = router.names();
    if as_json {
        let out: Vec<Json> = spreads
            .iter()
            .map(|s| {
                let shards: serde_json::Map<String, Json> =
                    names.iter().map(|n| (*n).to_owned()).zip(s.counts.iter().map(|c| json!(c))).collect();
                json!({ "view": s.view, "rows": s.counts.iter().sum::<u64>(), "shards": shards, "max_over_mean": s.max_over_mean() })
            })
            .collect();
        return Ok(Json::Array(out).to_string() + "\n");
    }
    let mut header = vec!["view".to_owned(), "rows".to_owned()];
    header.extend(names.iter().map(|n| (*n).to_owned()));
    header.push("max/mean".to_owned());
    let rows = spreads.iter().map(|s| {
        let total: u64 = s.counts.iter().sum();
        let mut cells = vec![s.view.clone(), total.to_string()];
        cells.extend(s.counts.iter().map(|c| {
            let share = if total == 0 { 0.0 } else { 100.0 * *c as f64 / total as f64 };
            format!("{c} ({share:.1}%)")
        }));
        cells.push(format!("{:.3}", s.max_over_mean()));
        cells
    });
    Ok(table(&header, rows, usize::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_aligns_columns_and_cuts_long_cells() {
        let header = vec!["key".to_owned(), "value".to_owned()];
        let rows = vec![vec!["a".to_owned(), "x".repeat(100)], vec!["long_key".to_owned(), "1".into()]];
        let out = table(&header, rows, WIDEST);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "key       value");
        assert!(lines[1].starts_with("a         xxx") && lines[1].ends_with('…'), "{}", lines[1]);
        assert_eq!(lines[1].chars().count(), 10 + 60);
        assert_eq!(lines[2], "long_key  1");
    }

    #[test]
    fn the_spread_of_rows_is_the_fullest_shard_over_the_mean() {
        assert_eq!(Spread { view: "v".into(), counts: vec![50, 50] }.max_over_mean(), 1.0);
        assert_eq!(Spread { view: "v".into(), counts: vec![75, 25] }.max_over_mean(), 1.5);
        assert_eq!(Spread { view: "v".into(), counts: vec![0, 0] }.max_over_mean(), 1.0);
    }

    #[test]
    fn rows_print_as_json_with_named_features() {
        let response = v1::GetFeaturesResponse {
            features: vec!["n".into(), "emb".into()],
            rows: vec![v1::FeatureRow {
                entity_key: "u:1".into(),
                values: vec![
                    v1::Value { kind: Some(v1::value::Kind::Int64Value(7)) },
                    v1::Value { kind: Some(v1::value::Kind::FloatListValue(v1::FloatList { values: vec![0.5] })) },
                ],
                status: v1::RowStatus::Found as i32,
                event_time: Some(strata_proto::prost_types::Timestamp { seconds: 0, nanos: 0 }),
                source: v1::Source::L1 as i32,
            }],
        };
        let out = rows_json(&response);
        assert_eq!(out["rows"][0]["features"], json!({ "n": 7, "emb": [0.5] }));
        assert_eq!(out["rows"][0]["status"], "FOUND");
        assert_eq!(out["rows"][0]["event_time"], "1970-01-01T00:00:00Z");
        let text = rows_table(&response);
        assert!(text.contains("u:1         FOUND   L1      1970-01-01T00:00:00Z  7  [0.5]"), "{text}");
    }
}
