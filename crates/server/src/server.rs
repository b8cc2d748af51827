//! Starting and stopping one Strata server: tiers, gRPC (FeatureStore,
//! health, reflection) and the metrics endpoint; the health monitor that
//! keeps the gRPC health status true; the drain on shutdown.
//!
//! Health services: `""` and `strata.v1.FeatureStore` are readiness (SERVING
//! while the server can answer: some shard reachable, or something cached;
//! NOT_SERVING while draining), `liveness` is SERVING while the process
//! runs, whatever its backends do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use strata_cache_tiers::{InvalidationListener, L1Cache, L2Cache};
use strata_proto::v1::feature_store_server::FeatureStoreServer;
use strata_shard_router::ShardRouter;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admission::{Admission, AdmissionLayer};
use crate::client_errors::ClientErrorsLayer;
use crate::config::Config;
use crate::metrics::{self, GrpcMetricsLayer};
use crate::service::FeatureStoreService;
use crate::tls::Tls;
use strata_engine::Tiers;

/// The health service name of the liveness check.
pub const LIVENESS: &str = "liveness";
/// How often the health monitor probes the shards and updates readiness.
const HEALTH_EVERY: Duration = Duration::from_secs(1);
/// How long a shard probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often shards that could not be migrated at start-up are tried again.
const MIGRATE_RETRY: Duration = Duration::from_secs(2);

/// A server that is accepting requests.
pub struct RunningServer {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    feast_http_addr: Option<SocketAddr>,
    tiers: Tiers,
    invalidations: InvalidationListener,
    health: HealthReporter,
    admission: Arc<Admission>,
    /// Readiness as `/ready` on the metrics port tells it.
    ready: Arc<AtomicBool>,
    drain_timeout: Duration,
    monitor: JoinHandle<()>,
    stop: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: JoinHandle<std::io::Result<()>>,
    feast: Option<JoinHandle<std::io::Result<()>>>,
}

impl RunningServer {
    /// Connects to the tiers, creates the views' tables on every shard
    /// (a shard that is down is migrated in the background once it is
    /// back), and starts serving. Port 0 in the config's addresses picks a
    /// free port; the chosen ones are [`RunningServer::grpc_addr`] and
    /// [`RunningServer::metrics_addr`].
    pub async fn start(config: Config) -> Result<RunningServer> {
        metrics::handle();
        metrics::record_build_info();
        let shards = ShardRouter::new(&config.shards, &config.pool)?;
        migrate(&shards, &config).await?;
        // Routed by the shard map the shards hold, followed from now on.
        if let Err(error) = shards.claim_map(config.pool.connect_timeout).await {
            tracing::warn!(%error, "cannot read the shard map yet; routing by the configuration until it is read");
        }
        shards.follow(config.map_refresh);
        // Replicas answer reads only while their lag checks allow.
        shards.watch_replicas();
        // A cluster that does not answer yet is connected to in the
        // background; meanwhile reads are answered from L1 and PostgreSQL.
        let l2 = L2Cache::connect(&config.redis).await.context("bad redis configuration")?;
        let l1 = L1Cache::new(config.l1_max_bytes).keep_stale(config.l1_max_stale);
        let tiers = Tiers::new(
            l1.clone(),
            l2,
            shards,
            config.protection.clone(),
            config.writes.clone(),
            config.hot_keys.clone(),
        );
        // Subscribed before serving, so no write announced after the first
        // answer can be missed.
        let views = config.registry.views().iter().map(|v| (v.name.clone(), v.id)).collect();
        let invalidations = InvalidationListener::start(
            &config.redis,
            tiers.l2().clone(),
            config.writes.channel.clone(),
            tiers.origin(),
            l1,
            views,
        )
        .await
        .context("cannot subscribe to invalidations")?;

        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<FeatureStoreServer<FeatureStoreService>>().await;
        health.set_service_status(LIVENESS, ServingStatus::Serving).await;
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(strata_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        // Refuses FeatureStore work at once while draining, over a client's
        // rate limit, or over the in-flight cap (load shedding: no queue
        // builds up in front of a busy server).
        let admission = Admission::new(config.max_in_flight, &config.rate_limits, &config.auth);
        let service = Arc::new(FeatureStoreService::new(
            config.registry.clone(),
            config.limits.clone(),
            config.max_response_bytes,
            config.deadlines,
            tiers.clone(),
        ));
        // Feast's APIs: its gRPC services beside Strata's, its HTTP API on a
        // port of its own.
        let feast = Arc::new(crate::feast::Feast {
            service: service.clone(),
            registry: config.registry.clone(),
            admission: admission.clone(),
            auth: config.auth.clone(),
        });
        let (feast_serving, feast_server) = crate::feast::grpc::services(feast.clone(), config.max_request_bytes);

        let transport = config.transport;
        warn_if_open(&config);
        // One set of TLS files, loaded for each listener with the protocols
        // it speaks, each checked for changes on its own.
        let tls = |alpn: &[&[u8]]| -> Result<Option<Arc<Tls>>> {
            let Some(settings) = &config.tls else { return Ok(None) };
            let tls = Tls::load(settings.files.clone(), alpn).context("bad TLS configuration")?;
            tls.watch(settings.reload_every);
            Ok(Some(tls))
        };
        let incoming = crate::listener::bind(config.grpc_addr, transport.max_connections, tls(&[b"h2"])?)
            .await
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_addr))?;
        let grpc_addr = incoming.local_addr();
        let metrics_tls = if config.tls.as_ref().is_some_and(|t| t.metrics) { tls(&[b"http/1.1"])? } else { None };
        let metrics_listener = metrics::bind(config.metrics_addr, metrics_tls)
            .await
            .with_context(|| format!("cannot listen for metrics on {}", config.metrics_addr))?;
        let metrics_addr = metrics_listener.local_addr();
        let feast_listener = match config.feast_http_addr {
            Some(addr) => Some(
                crate::listener::bind(addr, transport.max_connections, tls(&[b"http/1.1"])?)
                    .await
                    .with_context(|| format!("cannot listen for Feast's HTTP API on {addr}"))?,
            ),
            None => None,
        };
        let feast_http_addr = feast_listener.as_ref().map(|l| l.local_addr());

        let (stop, stopped) = watch::channel(false);
        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let layers = tower::ServiceBuilder::new()
            // Rate, errors and duration of every RPC, including refused ones.
            .layer(GrpcMetricsLayer)
            // Refuses FeatureStore calls before their bodies are read or
            // decoded: the memory of requests in decoding is bounded by
            // max_in_flight times max_request_bytes.
            .layer(AdmissionLayer::new(admission.clone(), config.auth.clone()))
            // The codec's answers to a client's own mistakes (too large, not
            // decodable) become client-error codes, inside the metrics layer
            // so the metrics count them as such.
            .layer(ClientErrorsLayer { max_request_bytes: config.max_request_bytes });
        let router = Server::builder()
            // Bounded HTTP/2: streams per connection, dead peers found by
            // keepalive pings, and calls (reading the request included) cut
            // off after request_timeout, so a client that opens streams and
            // stalls does not hold them.
            .max_concurrent_streams(Some(transport.max_concurrent_streams))
            .http2_keepalive_interval(Some(transport.keepalive_interval))
            .http2_keepalive_timeout(Some(transport.keepalive_timeout))
            .timeout(transport.request_timeout)
            // One span per request, opened outermost.
            .trace_fn(|request| tracing::info_span!("grpc", method = %request.uri().path()))
            .layer(layers)
            .add_service(health_service)
            // grpcurl 1.8 speaks reflection v1alpha; newer tools speak v1.
            .add_optional_service(config.reflection.then(|| reflection().build_v1alpha()).transpose()?)
            .add_optional_service(config.reflection.then(|| reflection().build_v1()).transpose()?)
            .add_service(FeatureStoreServer::from_arc(service).max_decoding_message_size(config.max_request_bytes))
            .add_service(feast_serving)
            .add_service(feast_server);
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal(stopped.clone())));
        let feast = feast_listener.map(|listener| {
            let app = crate::feast::http::router(feast, config.max_request_bytes)
                .into_make_service_with_connect_info::<crate::listener::Peer>();
            tokio::spawn(axum::serve(listener, app).with_graceful_shutdown(signal(stopped.clone())).into_future())
        });
        let ready = Arc::new(AtomicBool::new(true));
        let metrics = tokio::spawn(metrics::serve(metrics_listener, ready.clone(), signal(stopped)));
        health.set_service_status("", ServingStatus::Serving).await;
        let monitor = tokio::spawn(monitor(tiers.clone(), health.clone(), admission.clone(), ready.clone()));
        tracing::info!(%grpc_addr, %metrics_addr, feast_http_addr = ?feast_http_addr, views = config.registry.views().len(), shards = config.shards.len(), "serving");
        Ok(RunningServer {
            grpc_addr,
            metrics_addr,
            feast_http_addr,
            tiers,
            invalidations,
            health,
            admission,
            ready,
            drain_timeout: config.drain_timeout,
            monitor,
            stop,
            grpc,
            metrics,
            feast,
        })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    /// Where Feast's HTTP API is served, unless `server.feast_http_addr`
    /// is empty.
    pub fn feast_http_addr(&self) -> Option<SocketAddr> {
        self.feast_http_addr
    }

    /// The server's tiers, for tools running in the same process (the demo
    /// loader, tests that clear L1).
    pub fn tiers(&self) -> &Tiers {
        &self.tiers
    }

    /// The subscription that keeps this instance's L1 in step with writes
    /// made anywhere.
    pub fn invalidations(&self) -> &InvalidationListener {
        &self.invalidations
    }

    /// Requests being served now.
    pub fn in_flight(&self) -> usize {
        self.admission.in_flight()
    }

    /// Drains and stops, all within the drain timeout: health turns
    /// NOT_SERVING (so load balancers stop sending), new requests are
    /// refused with UNAVAILABLE, the listener closes, in-flight requests
    /// finish, then cache fills still running end and the tiers are
    /// closed. Requests still running when the time is up are cut (and
    /// logged).
    pub async fn shutdown(self) {
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        // Stopped for good before readiness turns, so it cannot turn it back.
        self.monitor.abort();
        let _ = self.monitor.await;
        self.admission.drain();
        self.ready.store(false, Ordering::SeqCst);
        self.health.set_service_status("", ServingStatus::NotServing).await;
        self.health.set_not_serving::<FeatureStoreServer<FeatureStoreService>>().await;
        tracing::info!(in_flight = self.admission.in_flight(), drain_timeout = ?self.drain_timeout, "draining");
        let _ = self.stop.send(true);
        let mut grpc = self.grpc;
        match tokio::time::timeout_at(deadline, &mut grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "grpc server ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "grpc server task failed"),
            Err(_) => {
                tracing::warn!(
                    in_flight = self.admission.in_flight(),
                    "in-flight requests did not finish within the drain timeout"
                );
                grpc.abort();
            }
        }
        // Feast calls in flight end within what is left of the drain time.
        if let Some(mut feast) = self.feast
            && tokio::time::timeout_at(deadline, &mut feast).await.is_err()
        {
            feast.abort();
        }
        // Closing connections is quick, but never worth overrunning the
        // drain time by more than a moment.
        let close = async {
            // Cache fills of answered reads, so Redis keeps what they loaded.
            self.tiers.settle().await;
            let _ = self.metrics.await;
            self.invalidations.close().await;
            self.tiers.l2().close().await;
        };
        let _ = tokio::time::timeout_at(deadline.max(tokio::time::Instant::now() + Duration::from_millis(250)), close)
            .await;
    }
}

/// Says loudly, at start-up, that a server anyone on the network can
/// reach lets anyone read, write and delete every view.
fn warn_if_open(config: &Config) {
    if config.auth.required() {
        return;
    }
    let exposed: Vec<String> = [Some(config.grpc_addr), config.feast_http_addr]
        .into_iter()
        .flatten()
        .filter(|addr| !addr.ip().is_loopback())
        .map(|addr| addr.to_string())
        .collect();
    if !exposed.is_empty() {
        tracing::warn!(
            listening = ?exposed,
            "authentication is off (auth.enabled = false) on a non-loopback address: anyone who can reach it may \
             read, write and delete every feature view; turn auth on before exposing this server"
        );
    }
}

/// Creates the views' tables on every shard. A shard that cannot be
/// reached is left to a background task that tries again until it
/// succeeds: a server restarted during a shard's outage still serves the
/// other shards (and its own caches). Fails only if no shard could be
/// migrated, which is most likely a configuration error.
async fn migrate(shards: &ShardRouter, config: &Config) -> Result<()> {
    let views = config.registry.views();
    let results = shards.migrate_each(views).await;
    let mut pending = Vec::new();
    for (i, result) in results.iter().enumerate() {
        if let Err(error) = result {
            tracing::warn!(shard = shards.names()[i], %error, "cannot migrate shard; will retry in the background");
            pending.push(i);
        }
    }
    if pending.len() == results.len() {
        let error = results.into_iter().find_map(Result::err).context("no shards")?;
        return Err(anyhow::Error::new(error).context("cannot create the feature view tables on any shard"));
    }
    if !pending.is_empty() {
        let (shards, views) = (shards.clone(), views.to_vec());
        tokio::spawn(async move {
            while !pending.is_empty() {
                tokio::time::sleep(MIGRATE_RETRY).await;
                let results = shards.migrate_each(&views).await;
                pending.retain(|&i| results[i].is_err());
            }
            tracing::info!("every shard is migrated");
        });
    }
    Ok(())
}

/// Probes the shards every second (so a shard that died while idle is
/// noticed, and one that came back closes its breaker without waiting for
/// traffic), forgets idle rate-limit buckets, and keeps readiness true:
/// SERVING while some shard answers, or Redis does, or L1 holds anything;
/// NOT_SERVING otherwise.
async fn monitor(tiers: Tiers, health: HealthReporter, admission: Arc<Admission>, ready_flag: Arc<AtomicBool>) {
    let mut every = tokio::time::interval(HEALTH_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut ready = true;
    loop {
        every.tick().await;
        let shards_up = tiers.shards().probe(PROBE_TIMEOUT).await;
        admission.forget_idle_clients();
        let (l1_entries, l1_bytes) = tiers.l1.size().await;
        let cached = tiers.l2().breaker().is_closed() || l1_entries > 0;
        let now_ready = shards_up.iter().any(|up| *up) || cached;
        crate::metrics::record_state(&crate::metrics::State {
            l1_entries,
            l1_bytes,
            in_flight: admission.in_flight(),
            ready: now_ready,
            shards: tiers.shards().names().into_iter().zip(tiers.shards().pool_usage()).collect(),
        });
        if now_ready != ready {
            ready = now_ready;
            ready_flag.store(ready, Ordering::SeqCst);
            let status = if ready { ServingStatus::Serving } else { ServingStatus::NotServing };
            tracing::warn!(?status, shards_up = ?shards_up, cached, "readiness changed");
            health.set_service_status("", status).await;
            if ready {
                health.set_serving::<FeatureStoreServer<FeatureStoreService>>().await;
            } else {
                health.set_not_serving::<FeatureStoreServer<FeatureStoreService>>().await;
            }
        }
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM (what Kubernetes and
/// `docker stop` send): the signal to drain and stop.
pub async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
