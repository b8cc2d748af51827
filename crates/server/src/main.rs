//! The `strata` binary.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};
use strata_server::RunningServer;
use strata_server::config::FileConfig;
use strata_server::dev::{self, DevOptions};
use strata_shard_router::ShardRouter;

#[derive(Parser)]
#[command(name = "strata", version, about = "Strata: an online feature store server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC and metrics with the given configuration.
    Serve {
        /// Configuration files (TOML), merged in order; STRATA_* environment
        /// variables override them.
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
    },
    /// Create the feature views' tables on every shard, then exit.
    Migrate {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
    },
    /// Start a whole local stack (Redis Cluster, PostgreSQL shards, demo
    /// data) as local processes and serve it until Ctrl-C.
    Dev {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// Folder for the stack's data and logs; emptied at start.
        #[arg(long, default_value = ".strata")]
        data_dir: PathBuf,
        #[arg(long, default_value_t = 2)]
        shards: usize,
        /// Entities of the demo data set written to user_features.
        #[arg(long, default_value_t = 100_000)]
        demo_entities: u64,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fred=warn")),
        )
        .init();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve { config } => {
            let config = FileConfig::load(&config)?.validate()?;
            let server = RunningServer::start(config).await?;
            shutdown_signal().await;
            server.shutdown().await;
            Ok(())
        }
        Command::Migrate { config } => {
            let config = FileConfig::load(&config)?.validate()?;
            let shards = ShardRouter::new(&config.shards, &config.pool)?;
            shards.migrate(config.registry.views()).await?;
            println!("{} views migrated on {} shards", config.registry.views().len(), config.shards.len());
            Ok(())
        }
        Command::Dev { config, data_dir, shards, demo_entities } => {
            dev::run(DevOptions { config, data_dir, shards, demo_entities }).await
        }
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
