//! Starts the backing services of a local Strata stack as plain processes
//! under one data folder: a Redis Cluster (3 primaries, 3 replicas) and
//! PostgreSQL shards, from the binaries installed on the machine.
//!
//! The demo command (`strata dev`) and the integration tests both start
//! their stack with [`Stack::start`], so the two never drift apart. This
//! crate knows nothing about Strata's server; it only runs Redis and
//! PostgreSQL and describes what it started in `stack.json`.

#![forbid(unsafe_code)]

mod ports;
mod postgres;
mod process;
mod redis;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nix::sys::signal::Signal;
use serde::{Deserialize, Serialize};

pub use ports::PortPlan;
use process::Managed;

/// What to start.
#[derive(Clone, Debug)]
pub struct StackOptions {
    /// Everything the stack writes goes under this folder.
    pub data_dir: PathBuf,
    pub ports: PortPlan,
    /// Number of PostgreSQL shards.
    pub shards: usize,
    /// A streaming replica for every shard, which the primary waits for on
    /// each commit (so a promotion loses nothing acknowledged).
    pub replicas: bool,
    /// TLS and passwords on every service; `None`: plaintext, no passwords.
    pub security: Option<Security>,
}

/// TLS and a password for the stack's services, to test a client's TLS
/// and authentication towards them: every Redis node listens with TLS only
/// (`tls-cluster`, `tls-replication`), its default user off and an ACL user
/// `strata`; every shard takes TLS connections only, for the role `strata`
/// with a scram-sha-256 password.
#[derive(Clone)]
pub struct Security {
    /// A PEM certificate naming 127.0.0.1, which every node and shard serves.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// The CA that signed it.
    pub ca_file: PathBuf,
    /// The password of `strata`, in Redis and in PostgreSQL.
    pub password: String,
}

impl std::fmt::Debug for Security {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Security")
            .field("cert_file", &self.cert_file)
            .field("ca_file", &self.ca_file)
            .finish_non_exhaustive()
    }
}

/// The machine-readable description of a running stack, written to
/// `<data_dir>/stack.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Description {
    pub redis_nodes: Vec<RedisNode>,
    pub shards: Vec<ShardInfo>,
    /// Endpoints added by whoever runs on top of the stack (the server's
    /// gRPC and metrics addresses).
    #[serde(default)]
    pub services: BTreeMap<String, String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RedisNode {
    pub host: String,
    pub port: u16,
    /// "master" or "replica", as the cluster first assigned them.
    pub role: String,
    pub pid: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShardInfo {
    pub name: String,
    /// A libpq connection string.
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub pid: u32,
    /// The shard's streaming replica, if the stack started one. The
    /// shard's `url` then lists both hosts with
    /// `target_session_attrs=read-write`, so it reaches whichever of the
    /// two takes writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaInfo>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicaInfo {
    /// A libpq connection string of the replica alone.
    pub url: String,
    pub port: u16,
    pub data_dir: PathBuf,
    pub pid: u32,
}

/// A running stack. Stop it with [`Stack::stop`]; dropping it kills the
/// processes without ceremony.
pub struct Stack {
    data_dir: PathBuf,
    description: Description,
    redis_cli: redis::Cli,
    redis: Vec<Managed>,
    postgres: Vec<postgres::ShardProcesses>,
    security: Option<Security>,
}

impl Stack {
    /// Starts Redis and PostgreSQL under `options.data_dir`, which is
    /// emptied first. Leftover processes of an earlier stack in the same
    /// folder (one that was killed without stopping) are stopped first.
    pub async fn start(options: StackOptions) -> Result<Stack> {
        let data_dir = &options.data_dir;
        process::stop_leftovers(&data_dir.join("stack.json")).await;
        if data_dir.exists() {
            std::fs::remove_dir_all(data_dir).with_context(|| format!("cannot empty {}", data_dir.display()))?;
        }
        std::fs::create_dir_all(data_dir).with_context(|| format!("cannot create {}", data_dir.display()))?;
        let data_dir = std::fs::canonicalize(data_dir)?;
        // PostgreSQL may run as another user (see `postgres::run_as`), who
        // must be able to reach its folder.
        process::make_traversable(&data_dir)?;

        let redis_ports = options.ports.redis_ports(6)?;
        let servers = if options.replicas { 2 * options.shards } else { options.shards };
        let mut pg_ports = options.ports.postgres_ports(servers)?;
        let replica_ports = pg_ports.split_off(options.shards);
        let security = options.security.as_ref();
        let redis_cli = redis::Cli::new(security)?;
        let (redis, postgres) = tokio::try_join!(
            redis::start_cluster(&data_dir, &redis_ports, &redis_cli, security),
            postgres::start_shards(&data_dir, &pg_ports, &replica_ports, security)
        )?;
        let description = Description {
            redis_nodes: redis.iter().map(|(node, _)| node.clone()).collect(),
            shards: postgres.iter().map(|(shard, _)| shard.clone()).collect(),
            services: BTreeMap::new(),
        };
        let stack = Stack {
            data_dir,
            description,
            redis_cli,
            redis: redis.into_iter().map(|(_, p)| p).collect(),
            postgres: postgres.into_iter().map(|(_, p)| p).collect(),
            security: options.security.clone(),
        };
        stack.write_description()?;
        Ok(stack)
    }

    pub fn description(&self) -> &Description {
        &self.description
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where the description is written.
    pub fn description_path(&self) -> PathBuf {
        self.data_dir.join("stack.json")
    }

    /// Redis nodes as `host:port`, primaries first.
    pub fn redis_nodes(&self) -> Vec<String> {
        let mut nodes: Vec<&RedisNode> = self.description.redis_nodes.iter().collect();
        nodes.sort_by_key(|n| n.role != "master");
        nodes.iter().map(|n| format!("{}:{}", n.host, n.port)).collect()
    }

    /// Connection strings of the shards, in shard order.
    pub fn shard_urls(&self) -> Vec<String> {
        self.description.shards.iter().map(|s| s.url.clone()).collect()
    }

    /// Connection strings of the shards' replicas, in shard order (none
    /// where a shard has no replica).
    pub fn replica_urls(&self) -> Vec<Option<String>> {
        self.description.shards.iter().map(|s| s.replica.as_ref().map(|r| r.url.clone())).collect()
    }

    /// Records an endpoint of a service running on top of the stack and
    /// rewrites the description.
    pub fn add_service(&mut self, name: &str, endpoint: String) -> Result<()> {
        self.description.services.insert(name.to_owned(), endpoint);
        self.write_description()
    }

    fn write_description(&self) -> Result<()> {
        let json = serde_json::to_string_pretty(&self.description)?;
        std::fs::write(self.description_path(), json + "\n").context("cannot write stack.json")
    }

    /// Kills the Redis node on `port` outright (SIGKILL, as a crash would)
    /// and waits until it is gone. For failure tests.
    pub async fn kill_redis(&mut self, port: u16) -> Result<()> {
        self.redis_process(port)?.end(Signal::SIGKILL).await
    }

    /// Starts the Redis node on `port` again, with its cluster state: it
    /// rejoins the cluster (as a replica, if it was failed over).
    pub async fn restart_redis(&mut self, port: u16) -> Result<()> {
        let process = self.redis_process(port)?;
        process.restart()?;
        let pid = process.pid();
        if let Some(node) = self.description.redis_nodes.iter_mut().find(|n| n.port == port) {
            node.pid = pid;
        }
        self.write_description()?;
        redis::wait_ready(&self.redis_cli, port).await
    }

    fn redis_process(&mut self, port: u16) -> Result<&mut Managed> {
        let i = self.description.redis_nodes.iter().position(|n| n.port == port);
        let i = i.with_context(|| format!("no redis node on port {port}"))?;
        Ok(&mut self.redis[i])
    }

    /// Kills shard `i`'s primary outright (SIGKILL to the postmaster and
    /// every backend, as when its host dies) and waits until it is gone.
    pub async fn kill_primary(&mut self, i: usize) -> Result<()> {
        let process = self.shard_process(i)?;
        process.signal_tree(Signal::SIGKILL)?;
        process.end(Signal::SIGKILL).await
    }

    /// Promotes shard `i`'s replica to primary (`pg_promote()`, as Patroni
    /// or an operator does) and waits until it takes writes.
    pub async fn promote_replica(&mut self, i: usize) -> Result<()> {
        let shard = self.description.shards.get(i).with_context(|| format!("no shard {i}"))?;
        let replica = shard.replica.as_ref().with_context(|| format!("shard {i} has no replica"))?;
        postgres::promote(replica.port, self.security.as_ref()).await
    }

    /// Stops shard `i` (a fast shutdown: connections are closed, as when
    /// a database goes down for maintenance) and waits until it is gone.
    pub async fn stop_shard(&mut self, i: usize) -> Result<()> {
        self.shard_process(i)?.end(Signal::SIGINT).await
    }

    /// Starts shard `i` again and waits until it accepts connections.
    pub async fn start_shard(&mut self, i: usize) -> Result<()> {
        let process = self.shard_process(i)?;
        process.restart()?;
        self.description.shards[i].pid = process.pid();
        self.write_description()?;
        postgres::wait_ready(self.description.shards[i].port).await
    }

    /// Freezes shard `i` (SIGSTOP to its postmaster and every backend):
    /// connections stay open and nothing answers, as with a hung host.
    pub fn freeze_shard(&self, i: usize) -> Result<()> {
        self.signal_shard_group(i, Signal::SIGSTOP)
    }

    /// Thaws a frozen shard (SIGCONT).
    pub fn thaw_shard(&self, i: usize) -> Result<()> {
        self.signal_shard_group(i, Signal::SIGCONT)
    }

    /// Signals every process of shard `i`: the postmaster and its
    /// children (backends and background workers).
    fn signal_shard_group(&self, i: usize, signal: Signal) -> Result<()> {
        let process = self.postgres.get(i).with_context(|| format!("no shard {i}"))?;
        process.primary.signal_tree(signal)
    }

    fn shard_process(&mut self, i: usize) -> Result<&mut Managed> {
        self.postgres.get_mut(i).map(|p| &mut p.primary).with_context(|| format!("no shard {i}"))
    }

    /// Stops every process: PostgreSQL with a fast shutdown, Redis with
    /// SIGTERM; anything still running after a grace period is killed.
    pub async fn stop(self) {
        let postgres = self.postgres.into_iter().flat_map(|p| std::iter::once(p.primary).chain(p.replica));
        let all = self.redis.into_iter().chain(postgres);
        futures::future::join_all(all.map(Managed::stop)).await;
    }
}
