//! Strata's source of truth: PostgreSQL, sharded by entity key.
//!
//! This crate owns the routing rule ([`shard_for`]), one deadpool-postgres
//! pool per shard, the per-view tables, and the queries: a batch read is one
//! `= ANY($1)` query per shard, shards queried concurrently; a batch write is
//! one transaction per shard, guarded by event time.
//!
//! Each shard sits behind a circuit breaker: a shard that keeps failing (or
//! hanging) is refused at once instead of costing every request its
//! deadline, and is probed until it answers again. Reads are cut at the
//! caller's deadline and retried with backoff while time remains; a shard
//! that cannot answer marks its keys unavailable without failing the batch.
//!
//! It knows nothing about gRPC or the cache tiers.

#![forbid(unsafe_code)]

mod map;
mod replica;
mod reshard;
mod routing;
mod schema;
mod snapshot;
mod sql;

use std::future::Future;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use futures::future::join_all;
use rand::Rng;
use strata_core::{Breaker, BreakerConfig, BreakerState, EventTime, FeatureView, Guarded, RetryPolicy, Row};
use tokio_postgres::NoTls;

pub use map::ShardMap;
pub use replica::ReplicaOptions;
pub use routing::{jump_hash, shard_for, shard_for_key};
pub use snapshot::{Column, Exported, Imported};

/// Backoff between runs of a write transaction that conflicted with another.
const CONFLICT_RETRY: RetryPolicy =
    RetryPolicy { attempts: u32::MAX, base: Duration::from_millis(2), cap: Duration::from_millis(200) };
/// Runs of a conflicting write transaction at most, deadline permitting.
const MAX_CONFLICT_RETRIES: u32 = 20;

/// One shard as configured: a name for logs and metrics, and where it is.
#[derive(Clone)]
pub struct ShardConfig {
    pub name: String,
    /// A libpq-style connection string or `postgres://` URL. Its `sslmode`
    /// is honoured: `disable`, `prefer` (the default: TLS where the server
    /// offers it, when TLS is configured) or `require`.
    pub url: String,
    /// The password, when it is not in the URL (read from a file or the
    /// environment by the configuration). The replicas use it too.
    pub password: Option<String>,
    /// Connection strings of the shard's streaming replicas, which may
    /// answer reads (see [`ReplicaOptions`]); never written to.
    pub replicas: Vec<String>,
}

/// Prints the URL without its password.
impl std::fmt::Debug for ShardConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardConfig")
            .field("name", &self.name)
            .field("url", &redact_url(&self.url))
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("replicas", &self.replicas.iter().map(|url| redact_url(url)).collect::<Vec<_>>())
            .finish()
    }
}

/// A connection string with its password replaced by `<redacted>`: in a
/// URL (`postgres://user:secret@host/db`, `?password=secret`) or in the
/// key=value form (`password=secret`, quoted or not).
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(scheme_end) = out.find("://") {
        let authority_start = scheme_end + 3;
        let authority_end = out[authority_start..].find(['/', '?']).map_or(out.len(), |i| authority_start + i);
        if let Some(at) = out[authority_start..authority_end].rfind('@')
            && let Some(colon) = out[authority_start..authority_start + at].find(':')
        {
            out.replace_range(authority_start + colon + 1..authority_start + at, "<redacted>");
        }
    }
    // `password=...` as a query parameter or a key=value pair.
    let mut from = 0;
    while let Some(i) = out[from..].find("password=").map(|i| from + i) {
        let start = i + "password=".len();
        let rest = &out[start..];
        let len = if let Some(quoted) = rest.strip_prefix('\'') {
            quoted.find('\'').map_or(rest.len(), |end| end + 2)
        } else {
            rest.find([' ', '&']).unwrap_or(rest.len())
        };
        out.replace_range(start..start + len, "<redacted>");
        from = start + "<redacted>".len();
    }
    out
}

/// Connection pool settings, shared by every shard.
#[derive(Clone, Debug)]
pub struct PoolOptions {
    /// Most connections open to one shard.
    pub max_connections: usize,
    /// Longest wait for a free connection or a new one.
    pub connect_timeout: Duration,
    /// When a shard's circuit breaker opens, and for how long.
    pub breaker: BreakerConfig,
    /// How failed reads are retried within their deadline.
    pub retry: RetryPolicy,
    /// TLS towards the shards (verifying each server's certificate and
    /// name); `None`: plaintext.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// How the shards' replicas answer reads.
    pub replicas: ReplicaOptions,
}

impl Default for PoolOptions {
    fn default() -> Self {
        PoolOptions {
            max_connections: 16,
            connect_timeout: Duration::from_secs(2),
            breaker: BreakerConfig::default(),
            retry: RetryPolicy::default(),
            tls: None,
            replicas: ReplicaOptions::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("shard {shard}: bad connection string: {source}")]
    Config { shard: String, source: tokio_postgres::Error },
    #[error("shard {shard}: cannot build pool: {message}")]
    Pool { shard: String, message: String },
    #[error("shard {shard}: {source}")]
    Connect { shard: String, source: deadpool_postgres::PoolError },
    #[error("shard {shard}: {source}")]
    Query { shard: String, source: tokio_postgres::Error },
    #[error("shard {shard}: view {view}: column {column} has type {found}, the view declares {expected}")]
    Schema { shard: String, view: String, column: String, found: String, expected: String },
    #[error("shard {shard}: view {view}: {message}")]
    Decode { shard: String, view: String, message: String },
    #[error("shard {shard}: view {view}: snapshot: {message}")]
    Snapshot { shard: String, view: String, message: String },
    #[error("shard {shard} is unavailable: its circuit breaker is open after repeated failures")]
    Open { shard: String },
    #[error("shard {shard} did not answer within the deadline")]
    Timeout { shard: String },
    #[error("no shards are configured")]
    NoShards,
    #[error("shard {shard} holds shard map epoch {epoch}, newer than this instance's")]
    StaleMap { shard: String, epoch: u64 },
    #[error("shard {shard} of the shard map is not in this instance's configuration (postgres.shards)")]
    Unrouted { shard: String },
}

impl ShardError {
    /// Whether the shard itself is failing (unreachable, hung, shutting
    /// down, out of resources), as opposed to answering with an error about
    /// the request or the data. Only these count against its breaker: one
    /// undecodable row must not take a shard offline for every view.
    fn is_outage(&self) -> bool {
        match self {
            ShardError::Connect { .. } | ShardError::Timeout { .. } => true,
            // No SQLSTATE: the connection broke. With one: connection
            // exception (08), insufficient resources (53), operator
            // intervention such as a shutdown (57), system error (58).
            ShardError::Query { source, .. } => {
                source.code().is_none_or(|state| matches!(state.code().get(..2), Some("08" | "53" | "57" | "58")))
            }
            _ => false,
        }
    }

    /// Whether trying again soon may succeed: a broken connection or a
    /// shard that is restarting may. A refusal by the breaker, a spent
    /// deadline or an error about the data would only fail again.
    fn retryable(&self) -> bool {
        matches!(self, ShardError::Connect { .. } | ShardError::Query { .. }) && self.is_outage()
    }

    /// Whether PostgreSQL aborted the transaction because of concurrent
    /// ones (a deadlock, or a serialization failure): running it again may
    /// well succeed, and nothing of it was applied.
    fn is_conflict(&self) -> bool {
        matches!(self, ShardError::Query { source, .. }
            if source.code().is_some_and(|state| matches!(state.code(), "40P01" | "40001")))
    }

    /// Whether the same request, sent again, may succeed: the shard was
    /// unreachable, slow, shutting down or busy with conflicting writes.
    /// An error about the data or the schema would fail again.
    pub fn retry_may_help(&self) -> bool {
        match self {
            ShardError::Connect { .. }
            | ShardError::Open { .. }
            | ShardError::Timeout { .. }
            | ShardError::StaleMap { .. }
            | ShardError::Unrouted { .. } => true,
            ShardError::Query { .. } => self.is_outage() || self.is_conflict(),
            ShardError::Config { .. }
            | ShardError::Pool { .. }
            | ShardError::Schema { .. }
            | ShardError::Decode { .. }
            | ShardError::Snapshot { .. }
            | ShardError::NoShards => false,
        }
    }

    /// What a client is told: what happened, in words it can act on, with
    /// no SQL text, connection string or address (those are logged, see
    /// [`ShardError::detail`]).
    pub fn client_message(&self) -> String {
        match self {
            ShardError::Config { shard, .. } | ShardError::Pool { shard, .. } => {
                format!("shard {shard} is misconfigured on the server")
            }
            ShardError::Connect { shard, .. } => {
                format!("shard {shard} could not be reached; nothing was written there; retrying is safe")
            }
            ShardError::Query { shard, .. } if self.is_conflict() => format!(
                "shard {shard}: the rows kept conflicting with concurrent writes of the same keys; \
                 nothing was written there; retrying is safe"
            ),
            ShardError::Query { shard, .. } if self.is_outage() => {
                format!("shard {shard} failed while writing (connection lost or shutting down); retrying is safe")
            }
            ShardError::Query { shard, source } => {
                let state = source.code().map_or("unknown", |s| s.code());
                format!("shard {shard} refused the rows (SQLSTATE {state}); retrying will not help")
            }
            ShardError::Schema { shard, view, column, .. } => {
                format!("shard {shard}: the table of view {view} does not match the view (column {column})")
            }
            ShardError::Decode { shard, view, .. } => {
                format!("shard {shard}: a stored row of view {view} is unreadable")
            }
            ShardError::Snapshot { .. } => self.to_string(),
            ShardError::Open { shard } => {
                format!("shard {shard} is unavailable after repeated failures; nothing was written there; retry later")
            }
            ShardError::Timeout { shard } => {
                format!("shard {shard} did not answer within the deadline; the write may still land; retrying is safe")
            }
            ShardError::NoShards => "no shards are configured".into(),
            ShardError::StaleMap { shard, .. } => {
                format!(
                    "shard {shard}: the shard map changed while writing; nothing was written there; retrying is safe"
                )
            }
            ShardError::Unrouted { shard } => {
                format!("shard {shard} is not configured on this server; nothing was written there; retry on another")
            }
        }
    }

    /// The whole error for logs, with what PostgreSQL said (its message,
    /// detail and SQLSTATE), which `Display` of a driver error leaves out.
    pub fn detail(&self) -> String {
        match self {
            ShardError::Query { shard, source } => match source.as_db_error() {
                Some(db) => format!("shard {shard}: {} ({}): {}", db.severity(), db.code().code(), db.message()),
                None => format!("shard {shard}: {source:?}"),
            },
            other => other.to_string(),
        }
    }
}

/// What a batch read found for one key.
#[derive(Clone, Debug, PartialEq)]
pub enum Fetched {
    Found(Row),
    /// Never written.
    NotFound,
    /// Deleted at this event time (a tombstone): not found, but caches
    /// record the deletion's time, so no older copy can replace the entry.
    Deleted(EventTime),
    /// The owning shard could not be read; the error was logged and counted.
    Unavailable,
}

impl Fetched {
    /// The event time of a row or a deletion; none for the rest.
    pub fn event_time(&self) -> Option<EventTime> {
        match self {
            Fetched::Found(row) => Some(row.event_time),
            Fetched::Deleted(at) => Some(*at),
            Fetched::NotFound | Fetched::Unavailable => None,
        }
    }
}

/// What a batch write (or delete) did.
#[derive(Debug, Default)]
pub struct UpsertOutcome {
    /// Keys whose row is now the written one (or now a tombstone).
    pub written: Vec<String>,
    /// Keys not applied because a newer event time is stored.
    pub skipped_older: Vec<String>,
    /// Shards whose transaction failed, with the keys it held. Nothing of
    /// such a shard's part of the batch was applied, except after a
    /// [`ShardError::Timeout`]: the commit may still land.
    pub failed: Vec<(ShardError, Vec<String>)>,
}

impl UpsertOutcome {
    /// Keys whose write may or may not have been applied: their shard did
    /// not answer within the deadline, so a commit may still land.
    pub fn unknown(&self) -> impl Iterator<Item = &String> {
        self.failed.iter().filter(|(e, _)| matches!(e, ShardError::Timeout { .. })).flat_map(|(_, keys)| keys)
    }
}

/// Of a key's rows on its two shards during a move, the newer; either one
/// unreadable makes the key unavailable, since the other may be older.
fn newer(a: Fetched, b: Fetched) -> Fetched {
    match (a, b) {
        (Fetched::Unavailable, _) | (_, Fetched::Unavailable) => Fetched::Unavailable,
        (Fetched::NotFound, x) | (x, Fetched::NotFound) => x,
        (a, b) => {
            if b.event_time() > a.event_time() {
                b
            } else {
                a
            }
        }
    }
}

struct Shard {
    name: String,
    /// The shard index as a metrics label (`<index>-replica-<n>` for a
    /// replica).
    label: String,
    pool: Pool,
    breaker: Breaker,
    /// Its streaming replicas (none for a replica itself).
    replicas: Vec<replica::Replica>,
    /// Turns among the replicas that may answer.
    next_replica: std::sync::atomic::AtomicUsize,
}

/// The state of one shard's connection pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolUsage {
    /// Connections open.
    pub open: usize,
    /// Open connections not in use.
    pub idle: usize,
    /// The most the pool opens.
    pub max: usize,
    /// Callers waiting for a connection.
    pub waiting: usize,
}

/// Routes keys to shards and runs the batch queries.
#[derive(Clone)]
pub struct ShardRouter {
    shards: Arc<Vec<Shard>>,
    retry: RetryPolicy,
    replicas: ReplicaOptions,
    /// The shard map this instance routes by; replaced when a newer one is
    /// read from the shards.
    routing: Arc<std::sync::RwLock<Arc<map::Routing>>>,
}

impl ShardRouter {
    /// Builds one pool per shard. Connections are opened on first use, so a
    /// shard that is down does not stop start-up.
    pub fn new(configs: &[ShardConfig], options: &PoolOptions) -> Result<ShardRouter, ShardError> {
        if configs.is_empty() {
            return Err(ShardError::NoShards);
        }
        let mut shards = Vec::with_capacity(configs.len());
        for (index, config) in configs.iter().enumerate() {
            let mut shard = Shard::connect(&config.name, index.to_string(), &config.url, config, options)?;
            for (n, url) in config.replicas.iter().enumerate() {
                let name = format!("{} (replica {n})", config.name);
                let node = Shard::connect(&name, format!("{index}-replica-{n}"), url, config, options)?;
                shard.replicas.push(replica::Replica::new(node));
            }
            shards.push(shard);
        }
        let names: Vec<String> = configs.iter().map(|c| c.name.clone()).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let routing = map::Routing::new(ShardMap::of_config(&names), &refs);
        Ok(ShardRouter {
            shards: Arc::new(shards),
            retry: options.retry,
            replicas: options.replicas.clone(),
            routing: Arc::new(std::sync::RwLock::new(Arc::new(routing))),
        })
    }

    fn routing(&self) -> Arc<map::Routing> {
        self.routing.read().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The shard map this instance routes by.
    pub fn map(&self) -> ShardMap {
        self.routing().map.clone()
    }

    /// Reads the map from every shard (each within `timeout`) and follows
    /// the newest, if newer than the current one. Returns whether it
    /// changed; an error only if no shard answered.
    pub async fn refresh_map(&self, timeout: Duration) -> Result<bool, ShardError> {
        let reads = self.shards.iter().map(|shard| async move {
            let read = async {
                let client = shard.client().await?;
                let row = client.query_opt(map::SELECT, &[]).await.map_err(|e| shard.query_error(e))?;
                Ok::<_, ShardError>(row.map(|r| map::decode(&r)))
            };
            tokio::time::timeout(timeout, read).await.unwrap_or(Err(ShardError::Timeout { shard: shard.name.clone() }))
        });
        let mut newest: Option<ShardMap> = None;
        let mut error = None;
        for result in join_all(reads).await {
            match result {
                Ok(Some(found)) if newest.as_ref().is_none_or(|n| found.epoch > n.epoch) => newest = Some(found),
                Ok(_) => {}
                Err(e) => error = Some(e),
            }
        }
        let Some(newest) = newest else {
            return match error {
                Some(e) => Err(e),
                None => Ok(false),
            };
        };
        Ok(self.adopt(newest))
    }

    /// Routes by `map` from now on if it is newer than the current one.
    fn adopt(&self, map: ShardMap) -> bool {
        let mut routing = self.routing.write().unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.epoch == 0 || map.epoch <= routing.map.epoch {
            return false;
        }
        let names = self.names();
        let next = map::Routing::new(map, &names);
        for (position, index) in next.index.iter().enumerate() {
            if index.is_none() {
                tracing::warn!(shard = %next.map.shards[position], epoch = next.map.epoch,
                    "the shard map names a shard this instance's configuration lacks: its keys are unavailable here");
            }
        }
        tracing::info!(epoch = next.map.epoch, shards = ?next.map.shards, from = next.map.from, to = next.map.to,
            "following the shard map");
        metrics::gauge!("strata_shard_map_epoch").set(next.map.epoch as f64);
        *routing = Arc::new(next);
        true
    }

    /// Writes `map` to every configured shard (each keeps a newer one it
    /// already has) and routes by it. Every shard must take it.
    pub async fn store_map(&self, map: &ShardMap) -> Result<(), ShardError> {
        self.store_each(map).await.into_iter().collect::<Result<Vec<()>, _>>()?;
        self.adopt(map.clone());
        Ok(())
    }

    async fn store_each(&self, map: &ShardMap) -> Vec<Result<(), ShardError>> {
        let epoch = i64::try_from(map.epoch).unwrap_or(i64::MAX);
        let (from, to) = (map.from as i32, map.to as i32);
        let writes = self.shards.iter().map(|shard| async move {
            let client = shard.client().await?;
            client.execute(map::STORE, &[&epoch, &map.shards, &from, &to]).await.map_err(|e| shard.query_error(e))?;
            Ok::<_, ShardError>(())
        });
        join_all(writes).await
    }

    /// Where no shard map is stored yet (a deployment never resharded, or
    /// one upgraded to this version), stores the configuration's as epoch
    /// 1 on every shard that answers, so later instances and `strata
    /// reshard` route by the same one. The first instance to do so wins.
    pub async fn claim_map(&self, timeout: Duration) -> Result<(), ShardError> {
        self.refresh_map(timeout).await?;
        let current = self.routing().map.clone();
        if current.epoch != 0 {
            return Ok(());
        }
        let claimed = ShardMap { epoch: 1, ..current };
        for (result, name) in self.store_each(&claimed).await.iter().zip(self.names()) {
            if let Err(error) = result {
                tracing::debug!(shard = name, %error, "cannot store the first shard map there");
            }
        }
        self.refresh_map(timeout).await?;
        Ok(())
    }

    /// Refreshes the map every `every`, until the router is dropped (the
    /// task holds no pool alive).
    pub fn follow(&self, every: Duration) -> tokio::task::JoinHandle<()> {
        let (shards, routing, retry) = (Arc::downgrade(&self.shards), Arc::downgrade(&self.routing), self.retry);
        let replicas = self.replicas.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let (Some(shards), Some(routing)) = (shards.upgrade(), routing.upgrade()) else { return };
                let router = ShardRouter { shards, retry, replicas: replicas.clone(), routing };
                if let Err(error) = router.refresh_map(every.max(Duration::from_secs(1))).await {
                    tracing::debug!(%error, "cannot read the shard map");
                }
            }
        })
    }

    /// Checks every replica's replay lag twice per
    /// [`ReplicaOptions::max_lag`], until the router is dropped; a replica
    /// answers reads only while its checks find it within the bound (or
    /// while its primary cannot answer). `None` when no shard has replicas.
    pub fn watch_replicas(&self) -> Option<tokio::task::JoinHandle<()>> {
        if self.shards.iter().all(|s| s.replicas.is_empty()) {
            return None;
        }
        let shards = Arc::downgrade(&self.shards);
        let every = self.replicas.check_every();
        Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(shards) = shards.upgrade() else { return };
                let checks = shards.iter().flat_map(|s| &s.replicas).map(|r| async move {
                    if let Err(error) = r.check(every.max(Duration::from_millis(250))).await {
                        tracing::debug!(replica = %r.node.name, %error, "replica lag check failed");
                    }
                });
                join_all(checks).await;
            }
        }))
    }

    /// The breaker state of each shard, in config order.
    pub fn states(&self) -> Vec<BreakerState> {
        self.shards.iter().map(|s| s.breaker.state()).collect()
    }

    /// Whether shard `shard` is answering normally (its breaker closed).
    pub fn available(&self, shard: usize) -> bool {
        self.shards[shard].breaker.is_closed()
    }

    /// Whether any shard is not answering normally. Cheap: for the hot
    /// path, which marks cached rows of such shards stale.
    pub fn degraded(&self) -> bool {
        self.shards.iter().any(|s| !s.breaker.is_closed())
    }

    /// Asks every shard `SELECT 1` within `timeout`, through its breaker, so
    /// a shard that died while idle is noticed and one that came back is
    /// closed again without waiting for traffic. Returns which answered.
    pub async fn probe(&self, timeout: Duration) -> Vec<bool> {
        let probes = self.shards.iter().map(|shard| async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let ping = async {
                let client = shard.client().await?;
                client.simple_query("SELECT 1").await.map_err(|e| shard.query_error(e))?;
                Ok(())
            };
            shard.guarded(Some(deadline), ping).await.is_ok()
        });
        join_all(probes).await
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The index of the shard that owns `key` (a key's text) of `view`, in
    /// config order: by the key's canonical encoding.
    /// `None`: the map routes it to a shard this instance's configuration
    /// lacks.
    pub fn shard_of(&self, view: &FeatureView, key: &str) -> Option<usize> {
        self.routing().place(view, key).0.ok()
    }

    /// Creates the schema and each view's table on every shard, adding
    /// columns for features new to the config. Idempotent; safe to run from
    /// several servers at once.
    pub async fn migrate(&self, views: &[Arc<FeatureView>]) -> Result<(), ShardError> {
        self.migrate_each(views).await.into_iter().collect()
    }

    /// [`ShardRouter::migrate`], with each shard's own result in config
    /// order, so a server can start while a shard is down and migrate it
    /// once it is back.
    pub async fn migrate_each(&self, views: &[Arc<FeatureView>]) -> Vec<Result<(), ShardError>> {
        let runs = self.shards.iter().map(|shard| async move {
            let client = shard.client().await?;
            schema::migrate(&client, &shard.name, views).await
        });
        join_all(runs).await
    }

    /// Each shard's connection pool, in config order: (connections open,
    /// of which idle, the pool's maximum, callers waiting for one).
    pub fn pool_usage(&self) -> Vec<PoolUsage> {
        self.shards
            .iter()
            .map(|shard| {
                let status = shard.pool.status();
                PoolUsage { open: status.size, idle: status.available, max: status.max_size, waiting: status.waiting }
            })
            .collect()
    }

    /// Shard names in config order.
    pub fn names(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name.as_str()).collect()
    }

    /// Reads the rows of `keys` (which must be distinct): one query per shard
    /// that owns any of them, all shards at once. The answer is aligned with
    /// `keys`. A shard that fails, or has not answered by `deadline`, marks
    /// its keys [`Fetched::Unavailable`]; a failed query is retried with
    /// backoff while the deadline allows. While a reshard moves a key, it is
    /// read from both its shards and the newer row wins.
    pub async fn fetch(&self, view: &FeatureView, keys: &[&str], deadline: tokio::time::Instant) -> Vec<Fetched> {
        self.fetch_marked(view, keys, deadline).await.into_iter().map(|(fetched, _)| fetched).collect()
    }

    /// [`ShardRouter::fetch`], telling for each key whether it was read
    /// from a replica that may be behind: its primary could not answer, and
    /// the replica's lag is unknown or over [`ReplicaOptions::max_lag`]. Such
    /// an answer is the best there is, but must not be cached as the truth.
    pub async fn fetch_marked(
        &self,
        view: &FeatureView,
        keys: &[&str],
        deadline: tokio::time::Instant,
    ) -> Vec<(Fetched, bool)> {
        let routing = self.routing();
        let places: Vec<_> = keys.iter().map(|key| routing.place(view, key)).collect();
        let mut by_shard: Vec<Vec<&str>> = vec![Vec::new(); self.shards.len()];
        for (key, (home, other)) in keys.iter().zip(&places) {
            for s in std::iter::once(home).chain(other).flatten() {
                by_shard[*s].push(key);
            }
        }
        let queries = by_shard.iter().enumerate().filter(|(_, part)| !part.is_empty()).map(|(s, part)| async move {
            let result = self.fetch_from(s, view, part, deadline).await;
            if let Err(error) = &result {
                if matches!(error, ShardError::Open { .. }) {
                    tracing::debug!(view = %view.name, keys = part.len(), %error, "shard read refused");
                } else {
                    tracing::warn!(view = %view.name, keys = part.len(), error = %error.detail(), "shard read failed");
                }
            }
            (s, result.ok())
        });
        let mut answers: Vec<Option<(std::collections::HashMap<String, sql::Selected>, bool)>> =
            (0..self.shards.len()).map(|_| None).collect();
        for (s, found) in join_all(queries).await {
            answers[s] = found;
        }
        let mut take = |slot: &map::Slot, key: &str| match slot {
            Err(_) => (Fetched::Unavailable, false),
            Ok(s) => match &mut answers[*s] {
                None => (Fetched::Unavailable, false),
                Some((found, behind)) => {
                    let fetched = match found.remove(key) {
                        Some(sql::Selected::Row(row)) => Fetched::Found(row),
                        Some(sql::Selected::Deleted(at)) => Fetched::Deleted(at),
                        Some(sql::Selected::Unreadable) => Fetched::Unavailable,
                        None => Fetched::NotFound,
                    };
                    (fetched, *behind)
                }
            },
        };
        keys.iter()
            .zip(&places)
            .map(|(key, (home, other))| {
                let (found, behind) = take(home, key);
                match other {
                    Some(other) => {
                        let (other, other_behind) = take(other, key);
                        (newer(found, other), behind || other_behind)
                    }
                    None => (found, behind),
                }
            })
            .collect()
    }

    /// One shard's part of a batch read, from a replica within the lag
    /// bound (when preferred) or the primary; when neither answers, from
    /// any replica that does, marked behind (`true`) unless its lag is
    /// within the bound. With replicas, the primary gets half the time left,
    /// so that a replica can still answer for a primary that hangs.
    async fn fetch_from(
        &self,
        s: usize,
        view: &FeatureView,
        keys: &[&str],
        deadline: tokio::time::Instant,
    ) -> Result<(std::collections::HashMap<String, sql::Selected>, bool), ShardError> {
        let shard = &self.shards[s];
        if shard.replicas.is_empty() {
            return self.fetch_primary(shard, view, keys, deadline).await.map(|found| (found, false));
        }
        let options = &self.replicas;
        let count = |from: &'static str| {
            metrics::counter!("strata_shard_reads_total", "shard" => shard.label.clone(), "from" => from).increment(1);
        };
        let mut tried = None;
        if options.prefer {
            let fresh: Vec<usize> = (0..shard.replicas.len()).filter(|&r| shard.replicas[r].fresh(options)).collect();
            if !fresh.is_empty() {
                let turn = shard.next_replica.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let r = fresh[turn % fresh.len()];
                let now = tokio::time::Instant::now();
                match shard.replicas[r].node.read(view, keys, now + deadline.saturating_duration_since(now) / 2).await {
                    Ok(found) => {
                        count("replica");
                        return Ok((found, false));
                    }
                    Err(error) => {
                        tracing::debug!(replica = %shard.replicas[r].node.name, %error, "replica read failed; asking the primary");
                        tried = Some(r);
                    }
                }
            }
        }
        let now = tokio::time::Instant::now();
        let primary_until = now + deadline.saturating_duration_since(now) / 2;
        let error = match self.fetch_primary(shard, view, keys, primary_until).await {
            Ok(found) => {
                count("primary");
                return Ok((found, false));
            }
            Err(error) => error,
        };
        // The primary could not answer: any replica that can, fresh first.
        let mut order: Vec<usize> = (0..shard.replicas.len()).filter(|&r| Some(r) != tried).collect();
        order.sort_by_key(|&r| !shard.replicas[r].fresh(options));
        for r in order {
            let replica = &shard.replicas[r];
            if let Ok(found) = replica.node.read(view, keys, deadline).await {
                let behind = !replica.fresh(options);
                count(if behind { "replica_behind" } else { "replica" });
                tracing::debug!(shard = %shard.name, %error, behind, "primary read failed; answered by a replica");
                return Ok((found, behind));
            }
        }
        Err(error)
    }

    /// One shard's part of a batch read from its primary, retried with
    /// backoff while the deadline allows.
    async fn fetch_primary(
        &self,
        shard: &Shard,
        view: &FeatureView,
        keys: &[&str],
        deadline: tokio::time::Instant,
    ) -> Result<std::collections::HashMap<String, sql::Selected>, ShardError> {
        let mut retry = 0;
        loop {
            let started = Instant::now();
            let result = shard.guarded(Some(deadline), shard.fetch(view, keys)).await;
            shard.observe("fetch", started, &result);
            match result {
                Err(error) if error.retryable() && retry + 1 < self.retry.attempts => {
                    let wait = self.retry.backoff(retry, rand::rng().random::<f64>());
                    if tokio::time::Instant::now() + wait >= deadline {
                        return Err(error);
                    }
                    tracing::debug!(shard = %shard.name, %error, ?wait, "retrying a shard read");
                    metrics::counter!("strata_shard_retries_total", "shard" => shard.label.clone()).increment(1);
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                result => return result,
            }
        }
    }

    /// Upserts rows (distinct keys): one transaction per shard, all shards at
    /// once. A row replaces the stored one only if its event time is not
    /// older. A shard that has not answered by `deadline` reports
    /// [`ShardError::Timeout`] for its keys (see [`UpsertOutcome::unknown`]).
    pub async fn upsert(
        &self,
        view: &FeatureView,
        rows: &[(String, Row)],
        deadline: tokio::time::Instant,
    ) -> UpsertOutcome {
        self.per_shard(
            view,
            rows,
            |row| &row.0,
            "upsert",
            deadline,
            |shard, rows, epoch| shard.upsert(view, rows, epoch),
        )
        .await
    }

    /// Deletes keys (distinct) at event time `at`: each becomes a tombstone,
    /// unless a newer event time is stored, so a write older than the
    /// deletion can no longer bring the row back.
    pub async fn delete(
        &self,
        view: &FeatureView,
        keys: &[String],
        at: EventTime,
        deadline: tokio::time::Instant,
    ) -> UpsertOutcome {
        self.per_shard(
            view,
            keys,
            |key| key,
            "delete",
            deadline,
            |shard, keys, epoch| shard.delete(view, keys, at, epoch),
        )
        .await
    }

    /// Runs `op` on each shard's part of `items`, all shards at once, under
    /// the current map's epoch. While a reshard moves a key, it is written to
    /// both its shards and counts as written only if both took it; its
    /// outcome is its home shard's. A shard that knows a newer map makes the
    /// router follow it and write again (writes are idempotent), while the
    /// deadline allows.
    async fn per_shard<'a, T, F, Fut>(
        &'a self,
        view: &FeatureView,
        items: &'a [T],
        key: impl Fn(&T) -> &String,
        label: &'static str,
        deadline: tokio::time::Instant,
        op: F,
    ) -> UpsertOutcome
    where
        F: Fn(&'a Shard, Vec<&'a T>, u64) -> Fut,
        Fut: Future<Output = Result<std::collections::HashSet<String>, ShardError>>,
    {
        let mut attempt = 0;
        loop {
            let routing = self.routing();
            let epoch = routing.map.epoch;
            let mut by_shard: Vec<Vec<&T>> = (0..self.shards.len()).map(|_| Vec::new()).collect();
            let mut home: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
            let mut unrouted: Vec<(String, Vec<String>)> = Vec::new();
            for item in items {
                let (first, other) = routing.place(view, key(item));
                for (i, slot) in std::iter::once(first).chain(other).enumerate() {
                    match slot {
                        Ok(s) => {
                            by_shard[s].push(item);
                            if i == 0 {
                                home.insert(key(item).as_str(), s);
                            }
                        }
                        Err(name) => match unrouted.iter_mut().find(|(n, _)| *n == name) {
                            Some((_, keys)) => keys.push(key(item).clone()),
                            None => unrouted.push((name, vec![key(item).clone()])),
                        },
                    }
                }
            }
            let (key, op) = (&key, &op);
            let runs = by_shard.into_iter().enumerate().filter(|(_, part)| !part.is_empty()).map(|(s, mut part)| {
                let shard = &self.shards[s];
                // Row locks in one order everywhere (byte order of the key,
                // which the bulk merge uses too): two writers of overlapping
                // keys then wait for each other instead of deadlocking.
                part.sort_unstable_by(|a, b| key(a).as_bytes().cmp(key(b).as_bytes()));
                let keys: Vec<String> = part.iter().map(|item| key(item).clone()).collect();
                async move {
                    let result =
                        self.with_conflict_retries(shard, label, deadline, || op(shard, part.clone(), epoch)).await;
                    (s, keys, result)
                }
            });
            let results = join_all(runs).await;
            let stale = results.iter().any(|(_, _, r)| matches!(r, Err(ShardError::StaleMap { .. })));
            if stale && attempt < 3 && tokio::time::Instant::now() < deadline {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                if let Err(error) = self.refresh_map(left.min(Duration::from_secs(1))).await {
                    tracing::debug!(%error, "cannot read the shard map");
                }
                attempt += 1;
                continue;
            }

            let mut outcome = UpsertOutcome::default();
            let mut failed: std::collections::HashSet<String> = std::collections::HashSet::new();
            let mut fail = |outcome: &mut UpsertOutcome, error: ShardError, keys: Vec<String>| {
                let keys: Vec<String> = keys.into_iter().filter(|k| failed.insert(k.clone())).collect();
                if !keys.is_empty() {
                    outcome.failed.push((error, keys));
                }
            };
            for (shard, keys) in unrouted {
                fail(&mut outcome, ShardError::Unrouted { shard }, keys);
            }
            let mut applied = Vec::new();
            for (s, keys, result) in results {
                match result {
                    Ok(set) => applied.push((s, keys, set)),
                    Err(error) => fail(&mut outcome, error, keys),
                }
            }
            for (s, keys, set) in applied {
                for key in keys {
                    if home.get(key.as_str()) != Some(&s) || failed.contains(&key) {
                        continue;
                    }
                    if set.contains(&key) {
                        outcome.written.push(key);
                    } else {
                        outcome.skipped_older.push(key);
                    }
                }
            }
            return outcome;
        }
    }

    /// Runs a write transaction on `shard` through its breaker, cut at
    /// `deadline`; one that PostgreSQL aborted because of a concurrent one
    /// (deadlock, serialization failure) is run again, with backoff, while
    /// the deadline allows. Nothing of an aborted transaction was applied.
    async fn with_conflict_retries<T, Fut>(
        &self,
        shard: &Shard,
        label: &'static str,
        deadline: tokio::time::Instant,
        run: impl Fn() -> Fut,
    ) -> Result<T, ShardError>
    where
        Fut: Future<Output = Result<T, ShardError>>,
    {
        let mut retry = 0;
        loop {
            let started = Instant::now();
            let result = shard.guarded(Some(deadline), run()).await;
            shard.observe(label, started, &result);
            match result {
                Err(error) if error.is_conflict() => {
                    // Conflicts are short-lived: a few milliseconds apart,
                    // growing, for as long as the deadline allows.
                    let wait = CONFLICT_RETRY.backoff(retry, rand::rng().random::<f64>());
                    if tokio::time::Instant::now() + wait >= deadline || retry >= MAX_CONFLICT_RETRIES {
                        tracing::warn!(error = %error.detail(), retry, "write kept conflicting; giving up");
                        return Err(error);
                    }
                    tracing::debug!(error = %error.detail(), ?wait, "write conflicted; running it again");
                    metrics::counter!("strata_shard_retries_total", "shard" => shard.label.clone()).increment(1);
                    tokio::time::sleep(wait).await;
                    retry += 1;
                }
                result => return result,
            }
        }
    }

    /// Writes a batch of rows to shard `shard` with binary COPY into a
    /// temporary table, then one guarded merge: of several rows of one key
    /// the newest counts, and it replaces the stored row only if not older.
    /// One transaction, so a failed batch leaves nothing behind (except after
    /// a [`ShardError::Timeout`]: the commit may still land). Cut at
    /// `deadline`, so a frozen shard fails the batch instead of hanging the
    /// load. Returns the keys applied with their event times. The rows must
    /// belong to `shard`.
    pub async fn copy_upsert(
        &self,
        shard: usize,
        view: &FeatureView,
        rows: &[(String, Row)],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<(String, EventTime)>, ShardError> {
        let shard = &self.shards[shard];
        let epoch = self.routing().map.epoch;
        self.with_conflict_retries(shard, "copy", deadline, || shard.copy_upsert(view, rows, epoch)).await
    }

    /// Counts the rows of a view on each shard (tombstones aside), in config
    /// order.
    pub async fn count_rows(&self, view: &FeatureView) -> Result<Vec<u64>, ShardError> {
        let counts = self.shards.iter().map(|shard| async move {
            let client = shard.client().await?;
            let sql = format!("SELECT count(*) FROM {} WHERE NOT deleted", sql::table(view));
            let row = client.query_one(&sql, &[]).await.map_err(|e| shard.query_error(e))?;
            Ok(row.get::<_, i64>(0).unsigned_abs())
        });
        join_all(counts).await.into_iter().collect()
    }
}

impl Shard {
    /// A pool and breaker for one server of a shard (its primary or a
    /// replica), connecting on first use.
    fn connect(
        name: &str,
        label: String,
        url: &str,
        config: &ShardConfig,
        options: &PoolOptions,
    ) -> Result<Shard, ShardError> {
        let mut pg = tokio_postgres::Config::from_str(url)
            .map_err(|source| ShardError::Config { shard: name.to_owned(), source })?;
        if pg.get_application_name().is_none() {
            pg.application_name("strata");
        }
        pg.connect_timeout(options.connect_timeout);
        if let Some(password) = &config.password {
            pg.password(password);
        }
        let recycling = ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match &options.tls {
            Some(tls) if pg.get_ssl_mode() != tokio_postgres::config::SslMode::Disable => {
                let connect = tokio_postgres_rustls::MakeRustlsConnect::new((**tls).clone());
                Manager::from_config(pg, connect, recycling)
            }
            _ => Manager::from_config(pg, NoTls, recycling),
        };
        let pool = Pool::builder(manager)
            .max_size(options.max_connections)
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.connect_timeout))
            .create_timeout(Some(options.connect_timeout))
            .build()
            .map_err(|e| ShardError::Pool { shard: name.to_owned(), message: e.to_string() })?;
        let breaker = Breaker::new(format!("postgres:{name}"), options.breaker);
        Ok(Shard {
            name: name.to_owned(),
            label,
            pool,
            breaker,
            replicas: Vec::new(),
            next_replica: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    async fn client(&self) -> Result<deadpool_postgres::Client, ShardError> {
        self.pool.get().await.map_err(|source| ShardError::Connect { shard: self.name.clone(), source })
    }

    fn query_error(&self, source: tokio_postgres::Error) -> ShardError {
        ShardError::Query { shard: self.name.clone(), source }
    }

    /// The epoch check every write transaction starts with: the shard's map
    /// row is read `FOR SHARE` (a map change waits for the transaction), and
    /// a shard that knows a newer map than `epoch` refuses the write.
    async fn fence(&self, tx: &deadpool_postgres::Transaction<'_>, epoch: u64) -> Result<(), ShardError> {
        let row = tx.query_opt(map::FENCE, &[]).await.map_err(|e| self.query_error(e))?;
        let stored = row.map_or(0, |r| r.get::<_, i64>(0).unsigned_abs());
        if stored > epoch {
            metrics::counter!("strata_shard_map_stale_writes_total", "shard" => self.label.clone()).increment(1);
            return Err(ShardError::StaleMap { shard: self.name.clone(), epoch: stored });
        }
        Ok(())
    }

    /// Records a query's duration, and its failure by reason. Calls the
    /// breaker refused never reached the shard: only counted.
    fn observe<T>(&self, op: &'static str, started: Instant, result: &Result<T, ShardError>) {
        let reason = match result {
            Ok(_) => None,
            Err(ShardError::Open { .. }) => {
                metrics::counter!("strata_shard_refused_total", "shard" => self.label.clone(), "op" => op).increment(1);
                return;
            }
            Err(ShardError::Timeout { .. }) => Some("timeout"),
            Err(ShardError::Connect { .. }) => Some("connect"),
            Err(_) => Some("query"),
        };
        metrics::histogram!("strata_shard_query_duration_seconds", "shard" => self.label.clone(), "op" => op)
            .record(started.elapsed());
        if let Some(reason) = reason {
            metrics::counter!("strata_shard_errors_total", "shard" => self.label.clone(), "op" => op, "reason" => reason)
                .increment(1);
        }
    }

    /// Runs `op` through the shard's breaker, cut at `deadline`. A call
    /// cut by a deadline shorter than [`strata_core::TIMEOUT_FLOOR`] does not count
    /// against the shard.
    async fn guarded<T>(
        &self,
        deadline: Option<tokio::time::Instant>,
        op: impl Future<Output = Result<T, ShardError>>,
    ) -> Result<T, ShardError> {
        match self.breaker.run(deadline, op, ShardError::is_outage).await {
            Guarded::Refused => Err(ShardError::Open { shard: self.name.clone() }),
            Guarded::TimedOut => Err(ShardError::Timeout { shard: self.name.clone() }),
            Guarded::Done(result) => result,
        }
    }

    /// [`Shard::fetch`] through the breaker, cut at `until`, once.
    async fn read(
        &self,
        view: &FeatureView,
        keys: &[&str],
        until: tokio::time::Instant,
    ) -> Result<std::collections::HashMap<String, sql::Selected>, ShardError> {
        let started = Instant::now();
        let result = self.guarded(Some(until), self.fetch(view, keys)).await;
        self.observe("fetch", started, &result);
        result
    }

    async fn fetch(
        &self,
        view: &FeatureView,
        keys: &[&str],
    ) -> Result<std::collections::HashMap<String, sql::Selected>, ShardError> {
        let client = self.client().await?;
        let statement = client.prepare_cached(&sql::select(view)).await.map_err(|e| self.query_error(e))?;
        let rows = client.query(&statement, &[&keys]).await.map_err(|e| self.query_error(e))?;
        let mut found = std::collections::HashMap::with_capacity(rows.len());
        for row in &rows {
            match sql::decode_row(view, row) {
                Some((key, Ok(selected))) => {
                    found.insert(key, selected);
                }
                // One unreadable row makes its own key unavailable, not the
                // rest of the batch.
                Some((key, Err(message))) => {
                    tracing::warn!(shard = %self.name, view = %view.name, key, message, "unreadable stored row");
                    metrics::counter!("strata_shard_errors_total", "shard" => self.label.clone(), "op" => "fetch", "reason" => "decode")
                        .increment(1);
                    found.insert(key, sql::Selected::Unreadable);
                }
                None => {
                    return Err(ShardError::Decode {
                        shard: self.name.clone(),
                        view: view.name.clone(),
                        message: "a stored key is not text".into(),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Returns the keys that were applied.
    async fn upsert(
        &self,
        view: &FeatureView,
        rows: Vec<&(String, Row)>,
        epoch: u64,
    ) -> Result<std::collections::HashSet<String>, ShardError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.query_error(e))?;
        self.fence(&tx, epoch).await?;
        let mut written = std::collections::HashSet::with_capacity(rows.len());
        for chunk in rows.chunks(sql::upsert_chunk_rows(view)) {
            let times: Vec<_> = chunk.iter().map(|(_, row)| row.event_time.to_system_time()).collect();
            let keys = sql::key_values(view, chunk.iter().map(|(key, _)| key));
            let stamps = sql::timestamps(view, chunk.iter().map(|(_, row)| row));
            let params = sql::upsert_params(view, chunk, &times, &keys, &stamps);
            let applied = tx.query(&sql::upsert(view, chunk.len()), &params).await.map_err(|e| self.query_error(e))?;
            written.extend(applied.iter().map(|r| r.get::<_, String>(0)));
        }
        tx.commit().await.map_err(|e| self.query_error(e))?;
        Ok(written)
    }

    /// Returns the keys that were applied.
    async fn delete(
        &self,
        view: &FeatureView,
        keys: Vec<&String>,
        at: EventTime,
        epoch: u64,
    ) -> Result<std::collections::HashSet<String>, ShardError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.query_error(e))?;
        self.fence(&tx, epoch).await?;
        let time = at.to_system_time();
        let mut deleted = std::collections::HashSet::with_capacity(keys.len());
        for chunk in keys.chunks(sql::MAX_ROWS_PER_STATEMENT) {
            let values = sql::key_values(view, chunk.iter().copied());
            let mut params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = Vec::new();
            for (i, key) in chunk.iter().enumerate() {
                params.push(*key);
                params.extend(sql::key_params(view, values.get(i)));
                params.push(&time);
            }
            let applied = tx.query(&sql::delete(view, chunk.len()), &params).await.map_err(|e| self.query_error(e))?;
            deleted.extend(applied.iter().map(|r| r.get::<_, String>(0)));
        }
        tx.commit().await.map_err(|e| self.query_error(e))?;
        Ok(deleted)
    }

    async fn copy_upsert(
        &self,
        view: &FeatureView,
        rows: &[(String, Row)],
        epoch: u64,
    ) -> Result<Vec<(String, EventTime)>, ShardError> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::{ToSql, Type};

        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.query_error(e))?;
        self.fence(&tx, epoch).await?;
        tx.batch_execute(&sql::create_staging(view)).await.map_err(|e| self.query_error(e))?;
        let sink = tx.copy_in(&sql::copy_into_staging(view)).await.map_err(|e| self.query_error(e))?;
        let types: Vec<Type> = std::iter::once(Type::TEXT)
            .chain(sql::key_columns(view).iter().map(|k| sql::key_pg_type(k.ty)))
            .chain([Type::TIMESTAMPTZ])
            .chain(view.features.iter().map(|f| sql::pg_type(f.ty)))
            .collect();
        let join_keys = sql::key_values(view, rows.iter().map(|(key, _)| key));
        let stamps = sql::timestamps(view, rows.iter().map(|(_, row)| row));
        let mut stamps = stamps.iter();
        let writer = BinaryCopyInWriter::new(sink, &types);
        futures::pin_mut!(writer);
        for (i, (key, row)) in rows.iter().enumerate() {
            if row.values.len() != view.features.len() {
                return Err(ShardError::Decode {
                    shard: self.name.clone(),
                    view: view.name.clone(),
                    message: format!(
                        "row {key:?} has {} values for {} features",
                        row.values.len(),
                        view.features.len()
                    ),
                });
            }
            let time = row.event_time.to_system_time();
            let mut values: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(types.len());
            values.push(key);
            values.extend(sql::key_params(view, join_keys.get(i)));
            values.push(&time);
            for (feature, value) in view.features.iter().zip(&row.values) {
                values.push(sql::param(feature.ty, value, &mut stamps));
            }
            writer.as_mut().write(&values).await.map_err(|e| self.query_error(e))?;
        }
        writer.finish().await.map_err(|e| self.query_error(e))?;
        let applied = tx.query(&sql::merge_staging(view), &[]).await.map_err(|e| self.query_error(e))?;
        tx.commit().await.map_err(|e| self.query_error(e))?;
        Ok(applied
            .iter()
            .map(|r| (r.get::<_, String>(0), EventTime::from_system_time(r.get::<_, std::time::SystemTime>(1))))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn of_a_moving_key_s_two_rows_the_newer_wins_and_an_unreadable_one_wins_nothing() {
        let row = |s: i64| Fetched::Found(Row { event_time: EventTime::from_parts(s, 0).unwrap(), values: vec![] });
        let deleted = |s: i64| Fetched::Deleted(EventTime::from_parts(s, 0).unwrap());
        assert_eq!(newer(row(1), row(2)), row(2));
        assert_eq!(newer(row(3), row(2)), row(3));
        assert_eq!(newer(row(1), deleted(2)), deleted(2));
        assert_eq!(newer(deleted(3), row(2)), deleted(3));
        assert_eq!(newer(Fetched::NotFound, row(1)), row(1));
        assert_eq!(newer(row(1), Fetched::NotFound), row(1));
        assert_eq!(newer(Fetched::NotFound, Fetched::NotFound), Fetched::NotFound);
        assert_eq!(newer(row(5), Fetched::Unavailable), Fetched::Unavailable);
        assert_eq!(newer(Fetched::Unavailable, Fetched::NotFound), Fetched::Unavailable);
    }

    #[test]
    fn passwords_never_show_in_a_shard_s_debug_output() {
        for (url, shown) in [
            ("postgres://strata:s3cret@db:5432/strata", "postgres://strata:<redacted>@db:5432/strata"),
            (
                "postgres://strata@db/strata?password=s3cret&sslmode=require",
                "postgres://strata@db/strata?password=<redacted>&sslmode=require",
            ),
            (
                "host=db user=strata password=s3cret dbname=strata",
                "host=db user=strata password=<redacted> dbname=strata",
            ),
            ("host=db password='s3 cret' dbname=strata", "host=db password=<redacted> dbname=strata"),
            ("postgres://db/strata", "postgres://db/strata"),
        ] {
            assert_eq!(redact_url(url), shown);
            let printed = format!(
                "{:?}",
                ShardConfig { name: "a".into(), url: url.into(), password: Some("s3cret".into()), replicas: vec![] }
            );
            assert!(!printed.contains("s3"), "{printed}");
        }
    }
}
