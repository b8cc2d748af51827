//! The integration-test harness: one real stack (a Redis Cluster of 3
//! primaries and 3 replicas, 2 PostgreSQL shards) per test binary, started
//! by the same code as `strata dev`, in a temporary folder on free ports,
//! and stopped when the tests end.
//!
//! Tests are `async fn name(env: &'static Env) -> anyhow::Result<()>`,
//! listed in [`integration_tests!`]; they run in parallel on one runtime,
//! each with its own server(s), so they must use their own keys or views.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::OnceLock;

pub mod feast;
pub mod load;
pub mod tls;

use anyhow::{Context, Result, ensure};
use strata_devstack::{PortPlan, Stack, StackOptions};
use strata_proto::v1::feature_store_client::FeatureStoreClient;
use strata_server::RunningServer;
use strata_server::config::FileConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;
use tonic::transport::Channel;

pub type TestFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;
pub type Test = (&'static str, fn(&'static Env) -> TestFuture);

/// Declares the test binary's `main` from a list of async test functions.
#[macro_export]
macro_rules! integration_tests {
    (shards = $shards:expr; $($name:ident),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            $crate::run_with_shards($shards, vec![$((stringify!($name), |env| Box::pin($name(env)))),*])
        }
    };
    ($($name:ident),* $(,)?) => {
        fn main() -> std::process::ExitCode {
            $crate::run(vec![$((stringify!($name), |env| Box::pin($name(env)))),*])
        }
    };
}

/// Feature views the tests use besides the shipped `user_features`; each
/// test that reads metrics has a view of its own, so counts do not mix.
pub const TEST_VIEWS: &str = r#"
[[entities]]
name = "t_user"
join_keys = [{ name = "uid", type = "int64" }]

[[entities]]
name = "t_pair"
join_keys = [{ name = "uid", type = "int64" }, { name = "sku", type = "string" }]

[[entities]]
name = "t_sku"
join_keys = [{ name = "sku", type = "string" }]

[[views]]
name = "mv_user"
entity = "t_user"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "age", type = "int64" }, { name = "score", type = "double" }]

[[views]]
name = "mv_pair"
entity = "t_pair"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "clicks", type = "int64" }, { name = "note", type = "string" }]

[[views]]
name = "mv_sku"
entity = "t_sku"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "age", type = "int64" }]

[[feature_services]]
name = "t_ranker"
projections = [
  { view = "mv_pair", features = ["note", "clicks"] },
  { view = "mv_user", features = ["score"], alias = "u" },
]

# The Feast repo of tests/feast (tests/feast/repo/features.py).
[[entities]]
name = "fe_driver"
join_keys = [{ name = "driver_id", type = "int64" }]

[[entities]]
name = "fe_customer"
join_keys = [{ name = "customer_id", type = "string" }]

[[entities]]
name = "fe_driver_customer"
join_keys = [{ name = "driver_id", type = "int64" }, { name = "customer_id", type = "string" }]

[[views]]
name = "fe_driver"
entity = "fe_driver"
l1_ttl = "5m"
l2_ttl = "10m"
# Feast's TTL for the view (tests/feast/repo/features.py).
max_age = "3650days"
push_sources = ["fe_driver_push"]
features = [
  { name = "conv_rate", type = "double" },
  { name = "trips", type = "int64" },
  { name = "name", type = "string" },
  { name = "active", type = "bool" },
  { name = "raw", type = "bytes" },
  { name = "emb", type = "float_list" },
  { name = "ids", type = "int64_list" },
  { name = "rank", type = "int32" },
  { name = "score", type = "float" },
  { name = "seen", type = "timestamp" },
]

[[views]]
name = "fe_customer"
entity = "fe_customer"
l1_ttl = "5m"
l2_ttl = "10m"
max_age = "3650days"
features = [{ name = "tier", type = "string" }, { name = "spend", type = "double" }]

[[views]]
name = "fe_pair"
entity = "fe_driver_customer"
l1_ttl = "5m"
l2_ttl = "10m"
max_age = "3650days"
features = [{ name = "orders", type = "int64" }]

[[feature_services]]
name = "fe_ranker"
projections = [
  { view = "fe_driver", features = ["conv_rate", "trips"] },
  { view = "fe_pair", features = ["orders"] },
  { view = "fe_customer", features = ["tier"] },
]

[[views]]
name = "typed"
l1_ttl = "5m"
l2_ttl = "10m"
features = [
  { name = "i", type = "int64" },
  { name = "d", type = "double" },
  { name = "s", type = "string" },
  { name = "b", type = "bool" },
  { name = "raw", type = "bytes" },
  { name = "emb", type = "float_list" },
  { name = "ids", type = "int64_list" },
  { name = "i32", type = "int32" },
  { name = "f", type = "float" },
  { name = "at", type = "timestamp" },
]

[[views]]
name = "fallthrough"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "routing"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "stampede_on"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "stampede_off"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "hot"
l1_ttl = "1s"
l2_ttl = "2s"
jitter = 0.1
refresh_ahead = 0.8
features = [{ name = "n", type = "int64" }]

[[views]]
name = "guarded"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "private"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "horizon"
l1_ttl = "1m"
l2_ttl = "1h"
jitter = 0.1
refresh_ahead = 0.8
features = [{ name = "n", type = "int64" }]

[[views]]
name = "unknown"
l1_ttl = "5m"
l2_ttl = "10m"
negative_ttl = "1m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "aged"
l1_ttl = "5m"
l2_ttl = "10m"
max_age = "1h"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "visibility"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "ordering"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }, { name = "s", type = "string" }]

[[views]]
name = "race"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "resubscribe"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "bulk"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }, { name = "s", type = "string" }]

[[views]]
name = "bulk_bad"
l1_ttl = "5m"
l2_ttl = "10m"
features = [
  { name = "n", type = "int64" },
  { name = "b", type = "bool" },
  { name = "emb", type = "float_list" },
]

[[views]]
name = "repair"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "warming"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "rejects"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }, { name = "s", type = "string" }]

[[views]]
name = "chaos"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "chaos_l2"
l1_ttl = "20ms"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "chaos_pg"
l1_ttl = "50ms"
l2_ttl = "100ms"
jitter = 0.0
features = [{ name = "n", type = "int64" }]

[[views]]
name = "ops"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "cli"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "contended"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }]

[[views]]
name = "hostile"
l1_ttl = "5m"
l2_ttl = "10m"
features = [{ name = "n", type = "int64" }, { name = "s", type = "string" }, { name = "emb", type = "float_list" }]
"#;

/// The shared environment of one test binary.
pub struct Env {
    runtime: Runtime,
    /// The stack and its folder, taken and stopped when the tests end (a
    /// static is never dropped).
    stack: tokio::sync::Mutex<Option<(Stack, tempfile::TempDir)>>,
    /// Held by tests that break the shared stack, so they run one at a time.
    exclusive: tokio::sync::Mutex<()>,
    redis_nodes: Vec<String>,
    shard_urls: Vec<String>,
}

static ENV: OnceLock<Env> = OnceLock::new();
/// Shards of the binary's stack: 2 unless it asks for more.
static SHARDS: OnceLock<usize> = OnceLock::new();

fn env() -> &'static Env {
    ENV.get_or_init(|| Env::start().unwrap_or_else(|e| panic!("cannot start the test stack: {e:#}")))
}

/// [`run`] with a stack of `shards` PostgreSQL shards.
pub fn run_with_shards(shards: usize, tests: Vec<Test>) -> std::process::ExitCode {
    let _ = SHARDS.set(shards);
    run(tests)
}

/// Runs the tests (honouring the usual test-binary arguments), then stops
/// the stack if any test started it.
pub fn run(tests: Vec<Test>) -> std::process::ExitCode {
    // Server logs, when asked for: RUST_LOG=info cargo test --test …
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    }
    let args = libtest_mimic::Arguments::from_args();
    let trials = tests
        .into_iter()
        .map(|(name, test)| {
            libtest_mimic::Trial::test(name, move || {
                let env = env();
                env.runtime.block_on(test(env)).map_err(|e| format!("{e:#}").into())
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if let Some(env) = ENV.get() {
        let stack = env.stack.blocking_lock().take();
        if let Some((stack, dir)) = stack {
            env.runtime.block_on(stack.stop());
            drop(dir);
        }
    }
    conclusion.exit_code()
}

impl Env {
    fn start() -> Result<Env> {
        let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
        let dir = tempfile::Builder::new().prefix("strata-test-").tempdir()?;
        let stack = runtime.block_on(Stack::start(StackOptions {
            data_dir: dir.path().join("stack"),
            ports: PortPlan::Ephemeral,
            shards: *SHARDS.get().unwrap_or(&2),
            replicas: false,
            security: None,
        }))?;
        let redis_nodes = stack.redis_nodes();
        let shard_urls = stack.shard_urls();
        Ok(Env {
            runtime,
            stack: tokio::sync::Mutex::new(Some((stack, dir))),
            exclusive: tokio::sync::Mutex::new(()),
            redis_nodes,
            shard_urls,
        })
    }

    /// The shipped `config/strata.toml` plus [`TEST_VIEWS`], pointed at the
    /// test stack, listening on free ports.
    pub fn config(&self) -> Result<FileConfig> {
        config_for(&self.redis_nodes, &self.shard_urls)
    }

    /// Starts a server with [`Env::config`].
    pub async fn server(&self) -> Result<RunningServer> {
        RunningServer::start(self.config()?.validate()?).await
    }

    /// Starts a server with [`Env::config`] changed by `change`.
    pub async fn server_with(&self, change: impl FnOnce(&mut FileConfig)) -> Result<RunningServer> {
        let mut config = self.config()?;
        change(&mut config);
        RunningServer::start(config.validate()?).await
    }
    /// How many times PostgreSQL ran Strata's batch read of `view`.
    pub async fn postgres_reads(&self, view: &str) -> Result<u64> {
        postgres_reads(&self.shard_urls, view).await
    }

    /// The Redis Cluster's seed nodes, `host:port`.
    pub fn redis_nodes(&self) -> &[String] {
        &self.redis_nodes
    }

    /// Kills, on every Redis node, the connections of the client named
    /// `name` (as `CLIENT LIST` shows it). Returns how many were killed.
    pub async fn kill_redis_connections(&self, name: &str) -> Result<usize> {
        use fred::prelude::*;
        use fred::types::client::ClientKillFilter;
        // Every node of the cluster, primaries and replicas.
        let mut nodes = self.redis_nodes.clone();
        let all: Vec<String> = {
            let seed = &self.redis_nodes[0];
            let (host, port) = seed.rsplit_once(':').context("node address")?;
            let client = Builder::from_config(Config {
                server: ServerConfig::new_centralized(host, port.parse()?),
                ..Default::default()
            })
            .build()?;
            client.init().await?;
            let text: String = client.cluster_nodes().await?;
            let _ = client.quit().await;
            text.lines()
                .filter_map(|l| l.split_whitespace().nth(1))
                .filter_map(|a| a.split('@').next())
                .map(str::to_owned)
                .collect()
        };
        nodes.extend(all);
        nodes.sort();
        nodes.dedup();
        let mut killed = 0;
        for node in nodes {
            let (host, port) = node.rsplit_once(':').context("node address")?;
            let client = Builder::from_config(Config {
                server: ServerConfig::new_centralized(host, port.parse()?),
                ..Default::default()
            })
            .build()?;
            client.init().await?;
            let list: String = client.client_list::<String, String>(None, None).await?;
            for line in list.lines() {
                let field = |k: &str| line.split(' ').find_map(|f| f.strip_prefix(k).map(str::to_owned));
                if field("name=").as_deref() == Some(name)
                    && let Some(id) = field("id=")
                {
                    let _: Value = client.client_kill(vec![ClientKillFilter::ID(id)]).await?;
                    killed += 1;
                }
            }
            let _ = client.quit().await;
        }
        Ok(killed)
    }

    /// Taken by a test that breaks the shared stack (kills a node, stops a
    /// shard), so that no other such test runs meanwhile.
    pub async fn exclusive(&self) -> tokio::sync::MutexGuard<'_, ()> {
        self.exclusive.lock().await
    }

    async fn with_stack<T>(&self, f: impl AsyncFnOnce(&mut Stack) -> Result<T>) -> Result<T> {
        let mut stack = self.stack.lock().await;
        let (stack, _) = stack.as_mut().context("the stack is stopped")?;
        f(stack).await
    }

    /// Kills (SIGKILL) the Redis node on `port`.
    pub async fn kill_redis(&self, port: u16) -> Result<()> {
        self.with_stack(async |s| s.kill_redis(port).await).await
    }

    /// Starts the Redis node on `port` again; it rejoins the cluster.
    pub async fn restart_redis(&self, port: u16) -> Result<()> {
        self.with_stack(async |s| s.restart_redis(port).await).await
    }

    /// Stops shard `i` (fast shutdown).
    pub async fn stop_shard(&self, i: usize) -> Result<()> {
        self.with_stack(async |s| s.stop_shard(i).await).await
    }

    /// Starts shard `i` again and waits until it accepts connections.
    pub async fn start_shard(&self, i: usize) -> Result<()> {
        self.with_stack(async |s| s.start_shard(i).await).await
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) every process of shard `i`.
    pub async fn freeze_shard(&self, i: usize, frozen: bool) -> Result<()> {
        self.with_stack(async |s| if frozen { s.freeze_shard(i) } else { s.thaw_shard(i) }).await
    }

    /// What the cluster says about itself, asked of the first node that
    /// answers: `(port, is_primary, failed)` per node, and whether the
    /// cluster state is ok.
    pub async fn redis_cluster(&self) -> Result<(Vec<(u16, bool, bool)>, bool)> {
        use fred::prelude::*;
        for seed in &self.redis_nodes {
            let (host, port) = seed.rsplit_once(':').context("node address")?;
            let client = Builder::from_config(Config {
                server: ServerConfig::new_centralized(host, port.parse()?),
                fail_fast: true,
                ..Default::default()
            })
            .with_connection_config(|c| c.connection_timeout = std::time::Duration::from_millis(500))
            .build()?;
            if client.init().await.is_err() {
                continue;
            }
            let nodes: Result<String, _> = client.cluster_nodes().await;
            let info: Result<String, _> = client.cluster_info().await;
            let _ = client.quit().await;
            let (Ok(nodes), Ok(info)) = (nodes, info) else { continue };
            let nodes = nodes
                .lines()
                .filter_map(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    let port = fields.get(1)?.split('@').next()?.rsplit_once(':')?.1.parse().ok()?;
                    let flags = fields.get(2)?;
                    Some((port, flags.contains("master"), flags.contains("fail")))
                })
                .collect();
            return Ok((nodes, info.contains("cluster_state:ok")));
        }
        anyhow::bail!("no redis node answers")
    }

    /// A connected client of its own to each Redis primary, for commands
    /// that go to every primary (a cluster client routes by key).
    async fn primary_clients(&self) -> Result<Vec<fred::prelude::Client>> {
        use fred::prelude::*;
        let (nodes, _) = self.redis_cluster().await?;
        let host = self.redis_nodes[0].rsplit_once(':').context("node address")?.0.to_owned();
        let mut clients = Vec::new();
        for (port, primary, _) in nodes {
            if !primary {
                continue;
            }
            let client = Builder::from_config(Config {
                server: ServerConfig::new_centralized(&host, port),
                ..Default::default()
            })
            .build()?;
            client.init().await?;
            clients.push(client);
        }
        Ok(clients)
    }

    /// Makes every Redis primary hold the write commands of every client
    /// (`CLIENT PAUSE ms WRITE`) for `ms` milliseconds, or, with `None`,
    /// stop holding them (`CLIENT UNPAUSE`): Redis answering reads but not
    /// writes, as while it is overloaded or failing over.
    pub async fn pause_redis_writes(&self, ms: Option<i64>) -> Result<()> {
        use fred::prelude::*;
        use fred::types::client::ClientPauseKind;
        for client in self.primary_clients().await? {
            match ms {
                Some(ms) => client.client_pause(ms, Some(ClientPauseKind::Write)).await?,
                None => client.client_unpause().await?,
            }
            let _ = client.quit().await;
        }
        Ok(())
    }

    /// How many times the Redis primaries have read from their clients'
    /// sockets (`total_reads_processed`, summed): a pipeline sent in one
    /// write is read in one go, one sent a command per write is not.
    pub async fn redis_primary_reads(&self) -> Result<u64> {
        use fred::prelude::*;
        let mut reads = 0;
        for client in self.primary_clients().await? {
            let stats: String = client.info(Some(fred::types::InfoKind::Stats)).await?;
            let _ = client.quit().await;
            reads += stats
                .lines()
                .find_map(|line| line.strip_prefix("total_reads_processed:"))
                .context("INFO stats has no total_reads_processed")?
                .trim()
                .parse::<u64>()?;
        }
        Ok(reads)
    }

    /// The validated registry of [`Env::config`].
    pub fn registry(&self) -> Result<std::sync::Arc<strata_core::Registry>> {
        Ok(self.config()?.validate()?.registry)
    }

    /// Connection strings of the stack's shards, in shard order.
    pub fn shard_urls(&self) -> &[String] {
        &self.shard_urls
    }

    pub fn shard_count(&self) -> usize {
        self.shard_urls.len()
    }

    /// A direct connection to shard `i`, bypassing Strata.
    pub async fn shard(&self, i: usize) -> Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(&self.shard_urls[i], tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        Ok(client)
    }

    /// Entity keys of `view` stored on shard `i`, read directly.
    pub async fn keys_on_shard(&self, i: usize, view: &str) -> Result<Vec<String>> {
        let rows = self.shard(i).await?.query(&format!("SELECT entity_key FROM strata.\"{view}\""), &[]).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }
}

/// How many times PostgreSQL ran Strata's batch read of `view`, over all
/// shards, as pg_stat_statements (which the local stack enables) counts them.
pub async fn postgres_reads(shard_urls: &[String], view: &str) -> Result<u64> {
    let pattern = format!("SELECT entity_key, event_time%FROM strata.\"{view}\" WHERE%");
    let mut calls = 0;
    for url in shard_urls {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        let row = client
            .query_one(
                "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements WHERE query LIKE $1",
                &[&pattern],
            )
            .await?;
        calls += row.get::<_, i64>(0).unsigned_abs();
    }
    Ok(calls)
}

/// A gRPC client of a server.
/// The shipped `config/strata.toml` plus [`TEST_VIEWS`], pointed at a
/// stack's Redis nodes and shards (named `shard-0`, `shard-1`, …),
/// listening on free ports.
pub fn config_for(redis_nodes: &[String], shard_urls: &[String]) -> Result<FileConfig> {
    let shipped = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    let mut file = FileConfig::from_toml(&format!("{shipped}\n{TEST_VIEWS}"))?;
    file.server.grpc_addr = "127.0.0.1:0".into();
    file.server.metrics_addr = "127.0.0.1:0".into();
    file.server.feast_http_addr = "127.0.0.1:0".into();
    // Tests fire a thousand concurrent reads on a debug build: neither
    // shedding nor the default deadline is what they test.
    file.server.max_in_flight = 100_000;
    // The stampede tests hold 1,000 reads in flight over one connection
    // per server; a client would otherwise queue those past 128.
    file.server.max_concurrent_streams = 2_000;
    file.server.default_deadline = std::time::Duration::from_secs(10);
    file.redis.nodes = redis_nodes.to_vec();
    file.postgres.shards = shard_urls
        .iter()
        .enumerate()
        .map(|(i, url)| strata_server::config::ShardSection::new(format!("shard-{i}"), url))
        .collect();
    Ok(file)
}

/// Configuration files for the `strata` binary on a stack, as
/// [`config_for`] sees it: `strata.toml` (the shipped file and
/// [`TEST_VIEWS`]) and `stack.toml` (the stack's addresses), written into
/// `dir`; pass each with `--config`.
pub fn config_files(dir: &std::path::Path, redis_nodes: &[String], shard_urls: &[String]) -> Result<[PathBuf; 2]> {
    let shipped = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    let shards: String = shard_urls
        .iter()
        .enumerate()
        .map(|(i, url)| format!("[[postgres.shards]]\nname = \"shard-{i}\"\nurl = {url:?}\n\n"))
        .collect();
    let files = [dir.join("strata.toml"), dir.join("stack.toml")];
    std::fs::write(&files[0], format!("{shipped}\n{TEST_VIEWS}"))?;
    std::fs::write(&files[1], format!("[redis]\nnodes = {redis_nodes:?}\n\n{shards}"))?;
    Ok(files)
}

/// Runs the `strata` binary; its exit status, stdout and stderr.
pub async fn strata(args: &[&std::ffi::OsStr]) -> Result<(bool, String, String)> {
    let out = tokio::process::Command::new(strata_binary()?).args(args).env("NO_COLOR", "1").output().await?;
    Ok((out.status.success(), String::from_utf8(out.stdout)?, String::from_utf8(out.stderr)?))
}

pub async fn client(server: &RunningServer) -> Result<FeatureStoreClient<Channel>> {
    Ok(FeatureStoreClient::connect(format!("http://{}", server.grpc_addr())).await?)
}

/// The server's `/metrics` page, fetched over HTTP.
pub async fn scrape(server: &RunningServer) -> Result<String> {
    scrape_at(&server.metrics_addr().to_string()).await
}

/// The `/metrics` page at `addr` (`host:port`), for a server in another
/// process.
pub async fn scrape_at(addr: &str) -> Result<String> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: strata\r\n\r\n").await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    anyhow::ensure!(head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"), "metrics: {head}");
    Ok(body.to_owned())
}

/// `GET path` over plain HTTP/1.0 at `addr`: the status code and the body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: strata\r\n\r\n").as_bytes()).await?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await?;
    let (head, body) = response.split_once("\r\n\r\n").context("malformed HTTP response")?;
    let code = head.split(' ').nth(1).and_then(|c| c.parse().ok()).context("no status code")?;
    Ok((code, body.to_owned()))
}

/// The value of one sample in a Prometheus text page, 0 if absent. Labels
/// are matched as written, in any order.
pub fn sample(page: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    page.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter(|(series, _)| {
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            metric == name && labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|(_, value)| value.parse::<f64>().ok())
        .sum()
}

/// The `strata` binary next to the test binaries (`scripts/test` builds
/// it first), or `STRATA_BIN`.
pub fn strata_binary() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("STRATA_BIN") {
        return Ok(path.into());
    }
    // target/debug/deps/chaos-… → target/debug/strata
    let exe = std::env::current_exe()?;
    let path = exe.parent().and_then(|deps| deps.parent()).context("test binary path")?.join("strata");
    ensure!(path.is_file(), "{} not found: build it first (cargo build -p strata-server)", path.display());
    Ok(path)
}

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Building and reading wire messages tersely.
pub mod wire {
    use strata_proto::prost_types::Timestamp;
    use strata_proto::v1::{self, value::Kind};

    pub fn ts(seconds: i64, nanos: i32) -> Timestamp {
        Timestamp { seconds, nanos }
    }

    pub fn v(kind: Kind) -> v1::Value {
        v1::Value { kind: Some(kind) }
    }

    pub fn null() -> v1::Value {
        v(Kind::NullValue(v1::Null {}))
    }

    pub fn row(key: &str, time: Timestamp, features: Vec<(&str, v1::Value)>) -> v1::WriteRow {
        v1::WriteRow {
            entity_key: key.into(),
            features: features.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
            event_time: Some(time),
            join_keys: Default::default(),
        }
    }

    /// A row of a view whose entity declares join keys, keyed by them.
    pub fn keyed_row(
        join_keys: Vec<(&str, v1::Value)>,
        time: Timestamp,
        features: Vec<(&str, v1::Value)>,
    ) -> v1::WriteRow {
        v1::WriteRow {
            join_keys: join_keys.into_iter().map(|(n, v)| (n.to_owned(), v)).collect(),
            ..row("", time, features)
        }
    }

    pub fn write(view: &str, rows: Vec<v1::WriteRow>) -> v1::WriteFeaturesRequest {
        v1::WriteFeaturesRequest { feature_view: view.into(), rows }
    }

    pub fn get(view: &str, keys: &[&str], features: &[&str]) -> v1::GetFeaturesRequest {
        v1::GetFeaturesRequest {
            feature_view: view.into(),
            entity_keys: keys.iter().map(|k| (*k).to_owned()).collect(),
            features: features.iter().map(|f| (*f).to_owned()).collect(),
        }
    }

    pub fn status(row: &v1::FeatureRow) -> v1::RowStatus {
        v1::RowStatus::try_from(row.status).unwrap_or(v1::RowStatus::Unspecified)
    }

    pub fn source(row: &v1::FeatureRow) -> v1::Source {
        v1::Source::try_from(row.source).unwrap_or(v1::Source::Unspecified)
    }
}
