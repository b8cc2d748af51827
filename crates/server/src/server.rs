//! Starting and stopping one Strata server: tiers, gRPC (FeatureStore,
//! health, reflection) and the metrics endpoint.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, Result};
use strata_cache_tiers::{InvalidationListener, L1Cache, L2Cache};
use strata_proto::v1::feature_store_server::FeatureStoreServer;
use strata_shard_router::ShardRouter;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::metrics::{self, GrpcMetricsLayer};
use crate::service::FeatureStoreService;
use crate::tiers::Tiers;

/// How long in-flight requests get to finish once shutdown starts.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A server that is accepting requests.
pub struct RunningServer {
    grpc_addr: SocketAddr,
    metrics_addr: SocketAddr,
    tiers: Tiers,
    invalidations: InvalidationListener,
    health: HealthReporter,
    stop: watch::Sender<bool>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
    metrics: JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Connects to the tiers, creates the views' tables on every shard, and
    /// starts serving. Port 0 in the config's addresses picks a free port;
    /// the chosen ones are [`RunningServer::grpc_addr`] and
    /// [`RunningServer::metrics_addr`].
    pub async fn start(config: Config) -> Result<RunningServer> {
        metrics::handle();
        let shards = ShardRouter::new(&config.shards, &config.pool)?;
        shards.migrate(config.registry.views()).await.context("cannot create the feature view tables")?;
        let l2 = L2Cache::connect(&config.redis).await.context("cannot connect to the redis cluster")?;
        let l1 = L1Cache::new(config.l1_max_bytes);
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
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(strata_proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let service = FeatureStoreService::new(config.registry.clone(), config.limits.clone(), tiers.clone());

        let incoming = TcpIncoming::bind(config.grpc_addr)
            .with_context(|| format!("cannot listen for gRPC on {}", config.grpc_addr))?
            .with_nodelay(Some(true));
        let grpc_addr = incoming.local_addr()?;
        let metrics_listener = metrics::bind(config.metrics_addr)
            .await
            .with_context(|| format!("cannot listen for metrics on {}", config.metrics_addr))?;
        let metrics_addr = metrics_listener.local_addr()?;

        let (stop, stopped) = watch::channel(false);
        let signal = |mut rx: watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|stop| *stop).await;
        };
        let router = Server::builder()
            // One span per request, opened outermost.
            .trace_fn(|request| tracing::info_span!("grpc", method = %request.uri().path()))
            // Rate, errors and duration of every RPC, including refused ones.
            .layer(GrpcMetricsLayer)
            .add_service(health_service)
            // grpcurl 1.8 speaks reflection v1alpha; newer tools speak v1.
            .add_service(reflection().build_v1alpha()?)
            .add_service(reflection().build_v1()?)
            .add_service(FeatureStoreServer::new(service));
        let grpc = tokio::spawn(router.serve_with_incoming_shutdown(incoming, signal(stopped.clone())));
        let metrics = tokio::spawn(metrics::serve(metrics_listener, signal(stopped)));
        health.set_service_status("", ServingStatus::Serving).await;
        tracing::info!(%grpc_addr, %metrics_addr, views = config.registry.views().len(), shards = config.shards.len(), "serving");
        Ok(RunningServer { grpc_addr, metrics_addr, tiers, invalidations, health, stop, grpc, metrics })
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.grpc_addr
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
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

    /// Turns health to NOT_SERVING, stops accepting, lets in-flight requests
    /// finish (up to a drain timeout), and closes the tiers.
    pub async fn shutdown(self) {
        self.health.set_service_status("", ServingStatus::NotServing).await;
        self.health.set_not_serving::<FeatureStoreServer<FeatureStoreService>>().await;
        let _ = self.stop.send(true);
        match tokio::time::timeout(DRAIN_TIMEOUT, self.grpc).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(error))) => tracing::warn!(%error, "grpc server ended with an error"),
            Ok(Err(error)) => tracing::warn!(%error, "grpc server task failed"),
            Err(_) => tracing::warn!("in-flight requests did not finish within {DRAIN_TIMEOUT:?}"),
        }
        let _ = tokio::time::timeout(DRAIN_TIMEOUT, self.metrics).await;
        self.invalidations.close().await;
        self.tiers.l2().close().await;
    }
}
