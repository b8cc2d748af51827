//! Prometheus metrics: the process-wide recorder, the `/metrics` endpoint,
//! and the tower layer that records rate, errors and duration per RPC.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tonic::codegen::http;

/// Latency buckets fit for a server that answers in well under a millisecond
/// when it hits its cache, and in milliseconds when it goes to PostgreSQL.
const LATENCY_BUCKETS: &[f64] =
    &[0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5];

/// Buckets for the age of served values: from a second to a week, since
/// feature pipelines run from streaming to weekly batch.
const AGE_BUCKETS: &[f64] = &[
    1.0,
    10.0,
    60.0,
    300.0,
    900.0,
    3_600.0,
    3.0 * 3_600.0,
    6.0 * 3_600.0,
    12.0 * 3_600.0,
    86_400.0,
    2.0 * 86_400.0,
    7.0 * 86_400.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide recorder, installed on first use. Several servers in one
/// process (tests) share it, as they share the process.
pub fn handle() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .expect("the bucket list is not empty")
            // A full match wins over the suffix.
            .set_buckets_for_metric(Matcher::Full("strata_served_age_seconds".into()), AGE_BUCKETS)
            .expect("the bucket list is not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Fails only if another recorder was installed first; then metrics
        // go there and ours renders empty, which start-up logs.
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
        }
        describe();
        handle
    })
}

/// What a metric is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Durations in seconds (`_seconds`) with [`LATENCY_BUCKETS`].
    Histogram,
}

/// One metric Strata exports.
#[derive(Clone, Copy, Debug)]
pub struct Metric {
    pub name: &'static str,
    pub kind: Kind,
    pub help: &'static str,
}

/// Every metric Strata exports, described once (the alert rules and the
/// dashboard in deploy/ are checked against this list).
pub const METRICS: &[Metric] = &[
    Metric {
        name: "strata_grpc_requests_total",
        kind: Kind::Counter,
        help: "gRPC requests handled, by method and status code",
    },
    Metric {
        name: "strata_grpc_request_duration_seconds",
        kind: Kind::Histogram,
        help: "gRPC request duration, by method",
    },
    Metric {
        name: "strata_feast_http_requests_total",
        kind: Kind::Counter,
        help: "Requests to Feast's HTTP API, by endpoint and HTTP status code",
    },
    Metric {
        name: "strata_feast_http_request_duration_seconds",
        kind: Kind::Histogram,
        help: "Duration of requests to Feast's HTTP API, by endpoint",
    },
    Metric {
        name: "strata_cache_hits_total",
        kind: Kind::Counter,
        help: "Keys found in a cache tier, by tier and view",
    },
    Metric {
        name: "strata_cache_misses_total",
        kind: Kind::Counter,
        help: "Keys not found in a cache tier, by tier and view",
    },
    Metric {
        name: "strata_cache_errors_total",
        kind: Kind::Counter,
        help: "Failed cache tier operations, by tier and operation",
    },
    Metric {
        name: "strata_rows_served_total",
        kind: Kind::Counter,
        help: "Rows answered by GetFeatures, by view, source tier and status",
    },
    Metric {
        name: "strata_rows_written_total",
        kind: Kind::Counter,
        help: "Rows applied by WriteFeatures or DeleteFeatures, by view and op",
    },
    Metric {
        name: "strata_rows_failed_total",
        kind: Kind::Counter,
        help: "Rows WriteFeatures or DeleteFeatures could not apply, by view and op",
    },
    Metric {
        name: "strata_cache_fills_refused_total",
        kind: Kind::Counter,
        help: "Cache fills refused because the tier held a newer version (L2) or the key was invalidated during the load (L1), by tier and view",
    },
    Metric {
        name: "strata_cache_repairs_total",
        kind: Kind::Counter,
        help: "Keys of writes whose cache step failed, repaired in the background, by view and outcome",
    },
    Metric {
        name: "strata_invalidations_received_total",
        kind: Kind::Counter,
        help: "Invalidation announcements received from other instances",
    },
    Metric {
        name: "strata_invalidated_keys_total",
        kind: Kind::Counter,
        help: "Keys dropped from L1 on other instances' announcements",
    },
    Metric {
        name: "strata_l1_clears_total",
        kind: Kind::Counter,
        help: "Whole-L1 clears after invalidations may have been missed, by reason (reconnected, cluster_changed, lagged, silent, subscribed_late)",
    },
    Metric {
        name: "strata_l2_undecodable_total",
        kind: Kind::Counter,
        help: "Redis entries that could not be decoded (another shape of the view), read as misses, by view",
    },
    Metric {
        name: "strata_rows_skipped_older_total",
        kind: Kind::Counter,
        help: "Rows skipped as older by WriteFeatures or DeleteFeatures, by view and op",
    },
    Metric {
        name: "strata_shard_query_duration_seconds",
        kind: Kind::Histogram,
        help: "PostgreSQL query duration, by shard and operation",
    },
    Metric {
        name: "strata_refreshes_total",
        kind: Kind::Counter,
        help: "Refresh-ahead reloads, by tier, view and outcome (started, completed, failed, dropped)",
    },
    Metric {
        name: "strata_coalesced_waits_total",
        kind: Kind::Counter,
        help: "Keys that waited on another request's load, by view",
    },
    Metric {
        name: "strata_leases_total",
        kind: Kind::Counter,
        help: "Redis reload leases, by view and outcome (acquired, lost)",
    },
    Metric {
        name: "strata_negative_hits_total",
        kind: Kind::Counter,
        help: "Hits on cached \"does not exist\" entries, by view and tier",
    },
    Metric {
        name: "strata_shard_errors_total",
        kind: Kind::Counter,
        help: "Failed PostgreSQL operations, by shard, operation and reason (timeout, connect, query)",
    },
    Metric {
        name: "strata_shard_refused_total",
        kind: Kind::Counter,
        help: "PostgreSQL operations refused without trying because the shard's breaker was open, by shard and operation",
    },
    Metric { name: "strata_shard_retries_total", kind: Kind::Counter, help: "Retried PostgreSQL reads, by shard" },
    Metric {
        name: "strata_shard_map_epoch",
        kind: Kind::Gauge,
        help: "Epoch of the shard map this instance routes by (it changes twice per reshard)",
    },
    Metric {
        name: "strata_shard_reads_total",
        kind: Kind::Counter,
        help: "Batch reads of shards that have replicas, by shard and what answered: primary, replica (within postgres.replica_max_lag), replica_behind (the primary could not answer; rows served STALE)",
    },
    Metric {
        name: "strata_replica_lag_seconds",
        kind: Kind::Gauge,
        help: "Replay lag of each replica at its last check, by shard (<index>-replica-<n>); NaN when unknown (not streaming from a primary, or not answering)",
    },
    Metric {
        name: "strata_shard_map_stale_writes_total",
        kind: Kind::Counter,
        help: "Write transactions a shard refused because it knows a newer shard map than the writer, by shard",
    },
    Metric {
        name: "strata_breaker_state",
        kind: Kind::Gauge,
        help: "Circuit breaker state by dependency (redis, postgres:<shard>): 0 closed, 1 half-open, 2 open",
    },
    Metric {
        name: "strata_breaker_transitions_total",
        kind: Kind::Counter,
        help: "Circuit breaker state changes, by dependency and new state",
    },
    Metric {
        name: "strata_stale_served_total",
        kind: Kind::Counter,
        help: "Rows answered STALE (from a cache while their shard could not be read), by view",
    },
    Metric { name: "strata_l1_entries", kind: Kind::Gauge, help: "Entries in L1 (this process)" },
    Metric { name: "strata_l1_bytes", kind: Kind::Gauge, help: "Approximate bytes held by L1 (this process)" },
    Metric { name: "strata_in_flight_requests", kind: Kind::Gauge, help: "FeatureStore requests being served now" },
    Metric {
        name: "strata_ready",
        kind: Kind::Gauge,
        help: "1 while readiness is SERVING (some shard, Redis or L1 can answer)",
    },
    Metric {
        name: "strata_pool_connections",
        kind: Kind::Gauge,
        help: "PostgreSQL connections open, by shard and state (idle, in_use)",
    },
    Metric { name: "strata_pool_max_connections", kind: Kind::Gauge, help: "PostgreSQL pool size limit, by shard" },
    Metric {
        name: "strata_pool_waiting",
        kind: Kind::Gauge,
        help: "Callers waiting for a PostgreSQL connection, by shard",
    },
    Metric { name: "strata_build_info", kind: Kind::Gauge, help: "Always 1; the version is a label" },
    Metric {
        name: "strata_redis_duration_seconds",
        kind: Kind::Histogram,
        help: "Redis call duration, by operation (get, get_or_lease, fill, put, lease, release, publish)",
    },
    Metric {
        name: "strata_served_age_seconds",
        kind: Kind::Histogram,
        help: "Age of each value served (now minus its event time), by view",
    },
    Metric {
        name: "strata_connections_refused_total",
        kind: Kind::Counter,
        help: "Connections (gRPC, Feast HTTP) closed at once because server.max_connections were open",
    },
    Metric {
        name: "strata_requests_refused_total",
        kind: Kind::Counter,
        help: "FeatureStore requests refused before any work, by reason (draining, rate_limited, overloaded, bad_client_id)",
    },
    Metric {
        name: "strata_auth_refusals_total",
        kind: Kind::Counter,
        help: "Requests refused by authentication or authorization, by reason (missing_credential, malformed_credential, unknown_token, unknown_certificate, read_denied, write_denied)",
    },
    Metric {
        name: "strata_tls_reloads_total",
        kind: Kind::Counter,
        help: "Checks that found the TLS files changed, by outcome (reloaded, failed: the previous files stay in use)",
    },
    Metric {
        name: "strata_tls_handshake_failures_total",
        kind: Kind::Counter,
        help: "TLS handshakes that failed, by reason (refused: a bad or missing client certificate, a protocol error; timeout)",
    },
];

fn describe() {
    for metric in METRICS {
        match metric.kind {
            Kind::Counter => metrics::describe_counter!(metric.name, metric.help),
            Kind::Gauge => metrics::describe_gauge!(metric.name, metric.help),
            Kind::Histogram => metrics::describe_histogram!(metric.name, metrics::Unit::Seconds, metric.help),
        }
    }
}

/// What the server's monitor samples each second.
pub struct State<'a> {
    pub l1_entries: u64,
    pub l1_bytes: u64,
    pub in_flight: usize,
    pub ready: bool,
    /// Each shard's name and pool.
    pub shards: Vec<(&'a str, strata_shard_router::PoolUsage)>,
}

/// Sets the gauges of [`State`].
pub fn record_state(state: &State<'_>) {
    metrics::gauge!("strata_l1_entries").set(state.l1_entries as f64);
    metrics::gauge!("strata_l1_bytes").set(state.l1_bytes as f64);
    metrics::gauge!("strata_in_flight_requests").set(state.in_flight as f64);
    metrics::gauge!("strata_ready").set(if state.ready { 1.0 } else { 0.0 });
    for (shard, pool) in &state.shards {
        let shard = (*shard).to_owned();
        metrics::gauge!("strata_pool_connections", "shard" => shard.clone(), "state" => "idle").set(pool.idle as f64);
        metrics::gauge!("strata_pool_connections", "shard" => shard.clone(), "state" => "in_use")
            .set(pool.open.saturating_sub(pool.idle) as f64);
        metrics::gauge!("strata_pool_max_connections", "shard" => shard.clone()).set(pool.max as f64);
        metrics::gauge!("strata_pool_waiting", "shard" => shard).set(pool.waiting as f64);
    }
}

/// Sets `strata_build_info{version}` to 1.
pub fn record_build_info() {
    metrics::gauge!("strata_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Serves `GET /metrics`, and `GET /live` and `GET /ready` (200 or 503,
/// as the gRPC health services `liveness` and `""` answer, for probes that
/// cannot speak gRPC over TLS), on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: crate::listener::Incoming,
    ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let handle = handle().clone();
    let upkeep = handle.clone();
    // Upkeep bounds the memory of histograms between scrapes.
    let upkeep = tokio::spawn(async move {
        let mut every = tokio::time::interval(Duration::from_secs(5));
        loop {
            every.tick().await;
            upkeep.run_upkeep();
        }
    });
    let app = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let handle = handle.clone();
                async move { handle.render() }
            }),
        )
        .route("/live", axum::routing::get(|| async { "SERVING\n" }))
        .route(
            "/ready",
            axum::routing::get(move || {
                let ready = ready.load(std::sync::atomic::Ordering::SeqCst);
                async move {
                    if ready {
                        (axum::http::StatusCode::OK, "SERVING\n")
                    } else {
                        (axum::http::StatusCode::SERVICE_UNAVAILABLE, "NOT_SERVING\n")
                    }
                }
            }),
        );
    let result = axum::serve(listener, app).with_graceful_shutdown(shutdown).await;
    upkeep.abort();
    result
}

/// Connections to the metrics endpoint open at once at most: a scraper or
/// two, and people looking.
const MAX_METRICS_CONNECTIONS: usize = 64;

/// Binds the metrics listener, with TLS if `tls` is set.
pub async fn bind(
    addr: SocketAddr,
    tls: Option<std::sync::Arc<crate::tls::Tls>>,
) -> std::io::Result<crate::listener::Incoming> {
    crate::listener::bind(addr, MAX_METRICS_CONNECTIONS, tls).await
}

/// Records `strata_grpc_requests_total{method, code}` and
/// `strata_grpc_request_duration_seconds{method}` for every request,
/// including those refused by layers further in.
#[derive(Clone, Copy, Debug, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> GrpcMetrics<S> {
        GrpcMetrics { inner }
    }
}

#[derive(Clone, Debug)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // The service that was polled ready is the one to call.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let method = method_label(request.uri().path());
        Box::pin(async move {
            let started = Instant::now();
            let result = inner.call(request).await;
            let code = match &result {
                // Unary errors come back "trailers-only": the status is in the
                // headers. A success carries it in the trailers, as OK.
                Ok(response) => response
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<i32>().ok())
                    .map_or("OK", code_name),
                Err(_) => "INTERNAL",
            };
            metrics::counter!("strata_grpc_requests_total", "method" => method, "code" => code).increment(1);
            metrics::histogram!("strata_grpc_request_duration_seconds", "method" => method).record(started.elapsed());
            result
        })
    }
}

/// The method name of a gRPC path, from a fixed set so that a client
/// cannot grow the label space.
fn method_label(path: &str) -> &'static str {
    match path {
        "/feast.serving.ServingService/GetOnlineFeatures" => return "feast.ServingService.GetOnlineFeatures",
        "/feast.serving.ServingService/GetFeastServingInfo" => return "feast.ServingService.GetFeastServingInfo",
        "/GrpcFeatureServer/GetOnlineFeatures" => return "feast.GrpcFeatureServer.GetOnlineFeatures",
        "/GrpcFeatureServer/Push" => return "feast.GrpcFeatureServer.Push",
        "/GrpcFeatureServer/WriteToOnlineStore" => return "feast.GrpcFeatureServer.WriteToOnlineStore",
        _ => {}
    }
    match path.rsplit('/').next() {
        Some("GetFeatureVectors") => "GetFeatureVectors",
        Some("GetFeatures") => "GetFeatures",
        Some("WriteFeatures") => "WriteFeatures",
        Some("DeleteFeatures") => "DeleteFeatures",
        Some("ListFeatureViews") => "ListFeatureViews",
        Some("Check") => "Health.Check",
        Some("Watch") => "Health.Watch",
        Some("ServerReflectionInfo") => "ServerReflectionInfo",
        _ => "other",
    }
}

fn code_name(code: i32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "OTHER",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_served_rpc_has_a_method_label_of_its_own() {
        for (path, label) in [
            ("/strata.v1.FeatureStore/GetFeatures", "GetFeatures"),
            ("/strata.v1.FeatureStore/GetFeatureVectors", "GetFeatureVectors"),
            ("/feast.serving.ServingService/GetOnlineFeatures", "feast.ServingService.GetOnlineFeatures"),
            ("/GrpcFeatureServer/GetOnlineFeatures", "feast.GrpcFeatureServer.GetOnlineFeatures"),
            ("/GrpcFeatureServer/Push", "feast.GrpcFeatureServer.Push"),
            ("/nope/Nope", "other"),
        ] {
            assert_eq!(method_label(path), label, "{path}");
        }
    }

    /// Metric names recorded (`counter!`, `gauge!`, `histogram!`) anywhere
    /// in the workspace's crates.
    fn recorded() -> std::collections::BTreeSet<String> {
        fn sources(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    sources(&path, out);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    out.push(path);
                }
            }
        }
        let mut files = Vec::new();
        sources(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".."), &mut files);
        let mut names = std::collections::BTreeSet::new();
        {
            for file in files {
                let text = std::fs::read_to_string(file).unwrap();
                for call in ["counter!(", "gauge!(", "histogram!("] {
                    for (at, _) in text.match_indices(call) {
                        let rest = text[at + call.len()..].trim_start();
                        if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next())
                            && name.starts_with("strata_")
                        {
                            names.insert(name.to_owned());
                        }
                    }
                }
            }
        }
        names
    }

    #[test]
    fn every_recorded_metric_is_described_and_every_described_one_recorded() {
        let recorded = recorded();
        let described: std::collections::BTreeSet<String> = METRICS.iter().map(|m| m.name.to_owned()).collect();
        assert!(recorded.len() > 20, "the source scan found only {recorded:?}");
        let undescribed: Vec<_> = recorded.difference(&described).collect();
        assert!(undescribed.is_empty(), "recorded but not in METRICS: {undescribed:?}");
        let unrecorded: Vec<_> = described.difference(&recorded).collect();
        assert!(unrecorded.is_empty(), "in METRICS but never recorded: {unrecorded:?}");
        for metric in METRICS {
            let suffix_ok = match metric.kind {
                Kind::Counter => metric.name.ends_with("_total"),
                Kind::Histogram => metric.name.ends_with("_seconds"),
                Kind::Gauge => !metric.name.ends_with("_total"),
            };
            assert!(suffix_ok, "{} is named against its kind {:?}", metric.name, metric.kind);
        }
    }
}
