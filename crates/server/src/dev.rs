//! `strata dev`: the whole local stack in one command. Starts a Redis
//! Cluster and PostgreSQL shards as local processes, loads the demo data,
//! serves, and stops everything on Ctrl-C.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use strata_devstack::{PortPlan, Stack, StackOptions};

use crate::config::{FileConfig, ShardSection};
use crate::demo;
use crate::server::RunningServer;

pub struct DevOptions {
    pub config: Vec<PathBuf>,
    pub data_dir: PathBuf,
    pub shards: usize,
    /// A streaming replica per shard.
    pub replicas: bool,
    pub demo_entities: u64,
}

/// Redis on 7000-7005 and PostgreSQL from 5433, as `config/strata.toml` says.
pub const DEV_PORTS: PortPlan = PortPlan::Fixed { redis: 7000, postgres: 5433 };

pub async fn run(options: DevOptions) -> Result<()> {
    let mut file = FileConfig::load(&options.config)?;
    let started = Instant::now();
    println!("starting the local stack under {} ...", options.data_dir.display());
    let mut stack = Stack::start(StackOptions {
        data_dir: options.data_dir.clone(),
        ports: DEV_PORTS,
        shards: options.shards,
        replicas: options.replicas,
        security: None,
    })
    .await?;
    let replicas = if options.replicas { ", each with a replica," } else { "" };
    println!("redis cluster and {} postgres shards{replicas} up in {:.1?}", options.shards, started.elapsed());

    // The rest may fail; the stack is stopped whatever happens.
    let result = serve_on(&mut stack, &mut file, &options).await;
    stack.stop().await;
    result
}

/// Points a configuration at a running stack's Redis nodes and shards.
pub fn use_stack(file: &mut FileConfig, stack: &Stack) {
    file.redis.nodes = stack.redis_nodes();
    file.postgres.shards = stack
        .description()
        .shards
        .iter()
        .map(|s| ShardSection {
            replicas: s.replica.iter().map(|r| r.url.clone()).collect(),
            ..ShardSection::new(&s.name, &s.url)
        })
        .collect();
}

async fn serve_on(stack: &mut Stack, file: &mut FileConfig, options: &DevOptions) -> Result<()> {
    use_stack(file, stack);
    let config = std::mem::take(file).validate()?;
    let registry = config.registry.clone();
    let server = RunningServer::start(config).await?;
    stack.add_service("grpc", server.grpc_addr().to_string())?;
    stack.add_service("metrics", format!("http://{}/metrics", server.metrics_addr()))?;
    if let Some(feast) = server.feast_http_addr() {
        stack.add_service("feast-http", format!("http://{feast}"))?;
    }

    if let Some(view) = registry.get("user_features") {
        let started = Instant::now();
        let written = demo::load(server.tiers(), view, options.demo_entities).await.context("demo data")?;
        println!(
            "demo data: {written} user_features rows written in {:.1?} (user_000001 .. {})",
            started.elapsed(),
            demo::demo_key(options.demo_entities)
        );
        if let (Some(items), Some(pairs)) = (registry.get("item_features"), registry.get("user_item_features")) {
            let started = Instant::now();
            let (items_written, pairs_written) =
                demo::load_items(server.tiers(), view, items, pairs, options.demo_entities)
                    .await
                    .context("demo data")?;
            println!(
                "demo data: {items_written} item_features and {pairs_written} user_item_features rows written in {:.1?}",
                started.elapsed()
            );
        }
    }

    println!();
    println!("Strata is serving gRPC on {}", server.grpc_addr());
    println!("metrics:      http://{}/metrics", server.metrics_addr());
    if let Some(feast) = server.feast_http_addr() {
        println!("Feast's HTTP API: http://{feast} (online_store: {{type: remote, path: http://{feast}}})");
    }
    println!("stack:        {}", stack.description_path().display());
    println!();
    println!("try:");
    println!("  grpcurl -plaintext {} list", server.grpc_addr());
    println!(
        "  grpcurl -plaintext -d '{{\"feature_view\":\"user_features\",\"entity_keys\":[\"user_000001\",\"user_000002\"]}}' {} strata.v1.FeatureStore/GetFeatures",
        server.grpc_addr()
    );
    println!(
        "  grpcurl -plaintext -d '{}' {} strata.v1.FeatureStore/GetFeatureVectors",
        demo::RANKER_EXAMPLE,
        server.grpc_addr()
    );
    println!();
    println!("Ctrl-C (or SIGTERM) drains the server and stops the stack.");
    crate::shutdown_signal().await;
    println!("stopping ...");
    server.shutdown().await;
    Ok(())
}
