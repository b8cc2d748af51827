//! The `strata` binary.

/// mimalloc: the read path allocates many small, short-lived objects, and
/// glibc's allocator was a sixth of the CPU profile of a Redis-hit load.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::{Parser, Subcommand};
use strata_server::RunningServer;
use strata_server::backup::{self, BackupOptions, RestoreOptions};
use strata_server::cli;
use strata_server::config::FileConfig;
use strata_server::dev::{self, DevOptions};
use strata_server::load::{self, Format, LoadOptions};
use strata_server::reshard::{self, ReshardOptions};
use strata_server::warm::{self, WarmOptions};
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
    /// Bulk-load rows of a feature view from CSV or JSON Lines into the
    /// shards (COPY in batches, per shard in parallel). Older rows never
    /// replace newer ones, so a load can be re-run. Bad rows are reported by
    /// line and do not stop the others.
    Load {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// The feature view to load into.
        #[arg(long)]
        view: String,
        /// CSV with a header (entity_key, event_time, feature names), or
        /// JSON Lines with the same names as keys.
        file: PathBuf,
        /// csv or jsonl; by default guessed from the file name.
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Rows per COPY batch (one transaction each).
        #[arg(long, default_value_t = 20_000)]
        batch_rows: usize,
        /// Batches in flight per shard.
        #[arg(long, default_value_t = 2)]
        concurrency: usize,
        /// Longest time one batch may take in PostgreSQL; a shard that does
        /// not answer by then fails the batch (run the load again).
        #[arg(long, default_value = "2m", value_parser = humantime_serde::re::humantime::parse_duration)]
        batch_timeout: std::time::Duration,
        /// How long the Redis step of a batch is retried for; keys Redis has
        /// not taken by then are reported as at risk, and the load exits
        /// non-zero.
        #[arg(long, default_value = "1m", value_parser = humantime_serde::re::humantime::parse_duration)]
        cache_timeout: std::time::Duration,
    },
    /// Preload keys of a feature view from PostgreSQL into Redis, so a cold
    /// deploy does not start with a wall of misses.
    Warm {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        #[arg(long)]
        view: String,
        /// Keys to warm.
        keys: Vec<String>,
        /// A file of keys, one per line (`-` for standard input).
        #[arg(long)]
        keys_file: Option<PathBuf>,
        /// Warm the N keys most read recently, as the servers sampled them.
        #[arg(long)]
        top: Option<usize>,
    },
    /// Back up every shard into a new folder: each view's table from one
    /// snapshot per shard (shards in parallel), the most-read keys from
    /// Redis, and a manifest with each file's rows and SHA-256, written last.
    Backup {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// The folder to create (it must not exist or be empty).
        dir: PathBuf,
        /// Most-read keys saved per view, for `strata restore --warm`.
        #[arg(long, default_value_t = 10_000)]
        hot_keys: usize,
    },
    /// Restore a backup into the configured shards (the backup's, by name
    /// and order): files are checked first, tables created, and rows merged
    /// with the event-time rule, so it can be run again.
    Restore {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// A folder `strata backup` wrote.
        dir: PathBuf,
        /// Afterwards, load the backup's most-read keys into Redis.
        #[arg(long)]
        warm: bool,
    },
    /// Add shards to a running deployment: list the new ones at the end of
    /// postgres.shards and run this. Only keys whose shard changes move,
    /// while reads and writes go on; every server follows the shard map
    /// without a restart. Resumable: run it again after a crash.
    Reshard {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// Count the keys that would move, per view and shard; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Keys scanned per batch.
        #[arg(long, default_value_t = 5_000)]
        batch: usize,
        /// Wait after each change of the shard map for every server to follow
        /// it (at least a few times postgres.map_refresh).
        #[arg(long, default_value = "5s", value_parser = humantime_serde::re::humantime::parse_duration)]
        settle: std::time::Duration,
        /// Shards in use now, where no shard map is stored yet.
        #[arg(long)]
        from: Option<usize>,
    },
    /// Look up entities of a feature view on a running server, as a table
    /// (or JSON).
    ///
    /// `strata get VIEW KEY...` reads keys of one view. With `--service NAME`
    /// (or `--features view:feature,...` naming several views), the arguments
    /// are join keys instead, `NAME=VALUE,VALUE,...`, one value per entity
    /// row; a single value is used for every row:
    /// `strata get --service ranker_v1 user_id=user_000001 item_id=8485,5676`.
    Get {
        #[command(flatten)]
        target: cli::Target,
        /// VIEW KEY..., or JOIN_KEY=VALUES... with --service or view:feature
        /// references.
        #[arg(required = true)]
        args: Vec<String>,
        /// Only these features, in this order (comma-separated); `view:feature`
        /// references read several views in one call.
        #[arg(long, value_delimiter = ',')]
        features: Vec<String>,
        /// A feature service: its features, for the join keys given.
        #[arg(long)]
        service: Option<String>,
        /// Output names as view__feature.
        #[arg(long)]
        full_names: bool,
        #[arg(long)]
        json: bool,
    },
    /// List the feature views a running server serves.
    Views {
        #[command(flatten)]
        target: cli::Target,
        #[arg(long)]
        json: bool,
    },
    /// Count the rows of each feature view on every shard (a query per
    /// shard, all at once) and show how even the spread is.
    Shards {
        #[arg(long, short, default_value = "config/strata.toml")]
        config: Vec<PathBuf>,
        /// Only this view.
        #[arg(long)]
        view: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Ask a running server's gRPC health service; exits non-zero unless it
    /// is SERVING.
    Health {
        #[command(flatten)]
        target: cli::Target,
        /// "" for the whole server, `strata.v1.FeatureStore`, or `liveness`.
        #[arg(long, default_value = "")]
        service: String,
    },
    /// Feast: `strata feast import REGISTRY` prints Strata's entities, views
    /// and feature services for the registry `feast apply` wrote.
    Feast {
        #[command(subcommand)]
        command: FeastCommand,
    },
    /// Tokens for `auth.principals`: `strata auth new-token` makes one and
    /// prints it with its hash; `strata auth hash-token` hashes the token
    /// it reads on stdin.
    Auth {
        #[command(subcommand)]
        command: AuthCommand,
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
        /// A streaming replica for every shard (reads may go to it; the
        /// primary waits for it on every commit).
        #[arg(long)]
        replicas: bool,
        /// Entities of the demo data set written to user_features.
        #[arg(long, default_value_t = 100_000)]
        demo_entities: u64,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// A new random token (for the client) and its SHA-256 (for
    /// `token_sha256` in the server's config).
    NewToken,
    /// The SHA-256 of the token on stdin (one line), for `token_sha256`.
    HashToken,
}

#[derive(Subcommand)]
enum FeastCommand {
    /// Print (or write) Strata's configuration for a Feast registry: its
    /// entities, feature views (TTL as max_age, push sources) and feature
    /// services. What has no Strata equivalent is listed on stderr and in
    /// the output.
    Import {
        /// The file registry `feast apply` wrote (registry.db).
        registry: PathBuf,
        /// The Feast project, where the registry holds several.
        #[arg(long)]
        project: Option<String>,
        /// Write the configuration here instead of to stdout.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fred=warn,tokio_postgres=warn"));
    // The lookup commands print their answer on stdout, for pipes: their
    // logs, if any, go to stderr.
    let lookup = matches!(
        cli.command,
        Command::Get { .. }
            | Command::Views { .. }
            | Command::Shards { .. }
            | Command::Health { .. }
            | Command::Feast { .. }
    );
    if lookup {
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    match run(cli).await {
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
            strata_server::shutdown_signal().await;
            server.shutdown().await;
            Ok(())
        }
        Command::Feast { command: FeastCommand::Import { registry, project, output } } => {
            let bytes = std::fs::read(&registry).with_context(|| format!("cannot read {}", registry.display()))?;
            let imported = strata_server::feast::import::import(&bytes, project.as_deref())
                .with_context(|| format!("{}", registry.display()))?;
            for line in &imported.skipped {
                eprintln!("not imported: {line}");
            }
            match output {
                Some(path) => {
                    std::fs::write(&path, &imported.toml)
                        .with_context(|| format!("cannot write {}", path.display()))?;
                    eprintln!("wrote {} (Feast project {})", path.display(), imported.project);
                }
                None => print!("{}", imported.toml),
            }
            Ok(())
        }
        Command::Migrate { config } => {
            let config = FileConfig::load(&config)?.validate()?;
            let shards = ShardRouter::new(&config.shards, &config.pool)?;
            shards.migrate(config.registry.views()).await?;
            println!("{} views migrated on {} shards", config.registry.views().len(), config.shards.len());
            Ok(())
        }
        Command::Load { config, view, file, format, batch_rows, concurrency, batch_timeout, cache_timeout } => {
            let config = FileConfig::load(&config)?.validate()?;
            let format = format.unwrap_or_else(|| Format::from_path(&file));
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let options = LoadOptions {
                batch_rows,
                concurrency,
                progress,
                batch_timeout,
                cache_timeout,
                ..LoadOptions::new(view, file.clone(), format)
            };
            let report = load::run(&config, &options).await?;
            load::print_report(&report, &file);
            report.check()
        }
        Command::Warm { config, view, mut keys, keys_file, top } => {
            let config = FileConfig::load(&config)?.validate()?;
            if let Some(path) = keys_file {
                keys.extend(warm::read_keys(&path)?);
            }
            anyhow::ensure!(!keys.is_empty() || top.is_some(), "no keys to warm: give keys, --keys-file or --top");
            warm::print_report(&warm::run(&config, &WarmOptions { view, keys, top }).await?);
            Ok(())
        }
        Command::Backup { config, dir, hot_keys } => {
            let config = FileConfig::load(&config)?.validate()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let manifest = backup::backup(&config, &BackupOptions { dir: dir.clone(), hot_keys, progress }).await?;
            println!(
                "backed up {} rows and {} deletions of {} views from {} shards ({} bytes) into {}",
                manifest.rows(),
                manifest.tombstones(),
                manifest.views.len(),
                manifest.shards.len(),
                manifest.bytes(),
                dir.display()
            );
            Ok(())
        }
        Command::Restore { config, dir, warm } => {
            let config = FileConfig::load(&config)?.validate()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let report = backup::restore(&config, &RestoreOptions { dir: dir.clone(), warm, progress }).await?;
            println!(
                "restored {} rows and {} deletions ({} applied, the rest not newer than the shards' own) from {} in {:.1?}; \
                 {} keys warmed",
                report.rows,
                report.tombstones,
                report.applied,
                dir.display(),
                report.elapsed,
                report.warmed
            );
            Ok(())
        }
        Command::Reshard { config, dry_run, batch, settle, from } => {
            let config = FileConfig::load(&config)?.validate()?;
            let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
            let options = ReshardOptions { dry_run, batch: batch.max(1), settle, from, progress };
            let report = reshard::run(&config, &options).await?;
            reshard::print_report(&report, dry_run);
            Ok(())
        }
        Command::Get { target, args, features, service, full_names, json } => {
            let vectors = service.is_some() || features.iter().any(|f| f.contains(':'));
            let out = if vectors {
                let read = cli::VectorsArgs { service, features, full_names, join_keys: args };
                cli::get_vectors(&target, read, json).await?
            } else {
                let (view, keys) = args.split_first().context("no view given")?;
                cli::get(&target, view, keys.to_vec(), features, json).await?
            };
            print!("{out}");
            Ok(())
        }
        Command::Views { target, json } => {
            print!("{}", cli::views(&target, json).await?);
            Ok(())
        }
        Command::Shards { config, view, json } => {
            let config = FileConfig::load(&config)?.validate()?;
            print!("{}", cli::shards(&config, view.as_deref(), json).await?);
            Ok(())
        }
        Command::Health { target, service } => {
            print!("{}", cli::health(&target, &service).await?);
            Ok(())
        }
        Command::Auth { command: AuthCommand::NewToken } => {
            let token = strata_server::auth::new_token();
            println!("token = {token}");
            println!("token_sha256 = \"{}\"", strata_server::auth::hex(&strata_server::auth::token_hash(&token)));
            Ok(())
        }
        Command::Auth { command: AuthCommand::HashToken } => {
            let mut line = String::new();
            std::io::stdin().read_line(&mut line).context("cannot read the token from stdin")?;
            anyhow::ensure!(!line.trim().is_empty(), "no token on stdin");
            println!("{}", strata_server::auth::hex(&strata_server::auth::token_hash(line.trim())));
            Ok(())
        }
        Command::Dev { config, data_dir, shards, replicas, demo_entities } => {
            dev::run(DevOptions { config, data_dir, shards, replicas, demo_entities }).await
        }
    }
}
