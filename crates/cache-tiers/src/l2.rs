use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fred::bytes::Bytes;
use fred::interfaces::FunctionInterface as _;
use fred::prelude::*;
use fred::types::config::TcpConfig;
use strata_core::{
    Breaker, BreakerConfig, Content, EventTime, FeatureView, Guarded, Lifetime, Row, decode_entry, encode_entry,
};
use tokio::time::Instant;

use crate::Cached;

/// Where the Redis Cluster is and how patient to be with it.
#[derive(Clone, Debug)]
pub struct L2Config {
    /// Seed nodes as `host:port`; one reachable node is enough to discover
    /// the rest of the cluster.
    pub nodes: Vec<String>,
    /// Longest time one batch may take before it counts as failed. The
    /// cache is an optimisation: a slow Redis must not slow every request.
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    /// Prefix of every key Strata writes, so one cluster can be shared.
    pub key_prefix: String,
    /// When the cluster's circuit breaker opens (every request then skips
    /// Redis), and for how long.
    pub breaker: BreakerConfig,
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("bad redis node address {0:?} (want host:port)")]
    BadAddress(String),
    #[error("no redis nodes are configured")]
    NoNodes,
    #[error("redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis answered {got} results for {want} commands")]
    ShortPipeline { got: usize, want: usize },
    #[error("redis is skipped: its circuit breaker is open after repeated failures")]
    Open,
    #[error("redis did not answer in time")]
    Timeout,
    #[error("no redis node of {0:?} answers")]
    Unreachable(Vec<String>),
}

/// A hit in Redis.
#[derive(Clone, Debug, PartialEq)]
pub struct L2Hit {
    pub value: Cached,
    /// Past its soft expiry: serve it, and reload it under a lease.
    pub stale: bool,
}

/// A Redis function library (functions are replicated to replicas and kept
/// across restarts, unlike the script cache). `strata_put_v1` stores an entry
/// unless the key holds one with a newer version (the event time at bytes
/// 2..9 of an entry of format 3, big-endian, offset so that unsigned order is
/// time order). An equal version replaces, so a reload renews an entry's
/// lifetime. Anything else at the key (another format, a foreign value) is
/// replaced. Returns 1 when stored, 0 when refused.
///
/// Every cache fill and every write goes through it: a fill that read
/// PostgreSQL before a write committed carries an older version than what
/// the write left in Redis, and loses, whatever the timing.
const LIBRARY: &str = r#"#!lua name=strata
redis.register_function('strata_put_v1', function(keys, args)
  local cur = redis.call('GET', keys[1])
  if cur and string.byte(cur, 1) == 3 and string.len(cur) >= 9 then
    local ch, cl = struct.unpack('>I4I4', cur, 2)
    local nh, nl = struct.unpack('>I4I4', args[1], 2)
    if ch > nh or (ch == nh and cl > nl) then
      return 0
    end
  end
  redis.call('SET', keys[1], args[1], 'PX', args[2])
  return 1
end)
"#;
const PUT_FUNCTION: &str = "strata_put_v1";

/// One entry for [`L2Cache::put_many`].
#[derive(Clone, Debug)]
pub struct Put<'a> {
    pub key: &'a str,
    pub content: Content<&'a Row>,
    /// The version of a missing or guard entry; a found row's is its own
    /// event time.
    pub version: EventTime,
    pub life: Lifetime,
}

/// What a cached entry of `key` says, if anything; an entry of an older
/// shape of the view, a guard, or a foreign value reads as a miss.
fn decode_hit(view: &FeatureView, key: &str, bytes: Option<&[u8]>, now_ms: i64) -> Option<L2Hit> {
    let entry = match decode_entry(view.fingerprint, bytes?) {
        Ok(entry) => entry,
        Err(error) => {
            tracing::debug!(view = %view.name, key, %error, "ignoring cached entry");
            metrics::counter!("strata_l2_undecodable_total", "view" => view.name.clone()).increment(1);
            return None;
        }
    };
    let value = match entry.content {
        Content::Found(row) => Cached::Found(Arc::new(row)),
        Content::Missing => Cached::Missing,
        // A guard holds no value: a miss.
        Content::Guard => return None,
    };
    Some(L2Hit { value, stale: entry.soft_expiry_ms <= now_ms })
}

/// The results of a pipeline of `want` commands, or its first error (a
/// failed command fails the batch, and counts against the breaker).
fn all_ok<T>(results: Vec<Result<T, fred::error::Error>>, want: usize) -> Result<Vec<T>, L2Error> {
    let got = results.len();
    let values = results.into_iter().collect::<Result<Vec<T>, _>>()?;
    if got == want { Ok(values) } else { Err(L2Error::ShortPipeline { got, want }) }
}

/// The budget of a call with no caller's deadline.
const NO_DEADLINE_BUDGET: Duration = Duration::from_secs(5);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX).max(1)
}

/// Commands (a pipeline counts as one) waiting for a connection at most;
/// more fail at once.
const COMMAND_QUEUE: usize = 10_000;

/// Starts `client`'s connection task and waits up to `timeout` for it to
/// connect; whether it did. If not, it goes on trying in the background
/// (the reconnect policy), and commands fail or time out until it does.
pub(crate) async fn connect_within(client: &impl ClientLike, timeout: Duration) -> bool {
    client.connect();
    matches!(tokio::time::timeout(timeout, client.wait_for_connect()).await, Ok(Ok(())))
}

/// A client builder for the cluster, with Strata's timeouts and reconnect
/// policy (reconnect forever, backing off up to 5 s).
pub(crate) fn builder(config: &L2Config) -> Result<Builder, L2Error> {
    if config.nodes.is_empty() {
        return Err(L2Error::NoNodes);
    }
    let mut hosts = Vec::with_capacity(config.nodes.len());
    for node in &config.nodes {
        let (host, port) = node.rsplit_once(':').ok_or_else(|| L2Error::BadAddress(node.clone()))?;
        let port: u16 = port.parse().map_err(|_| L2Error::BadAddress(node.clone()))?;
        hosts.push((host.to_owned(), port));
    }
    // Not fail_fast: a cluster that cannot be reached at start-up is retried
    // with the reconnect policy below, like one that went away later, so a
    // server can start (and serve from L1 and PostgreSQL) while Redis is down.
    let fred_config = Config { server: ServerConfig::new_clustered(hosts), fail_fast: false, ..Default::default() };
    let command_timeout = config.command_timeout;
    let connect_timeout = config.connect_timeout;
    let mut builder = Builder::from_config(fred_config);
    builder
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
            // Pub/sub messages waiting for the invalidation listener: a bulk
            // load announces thousands of keys a second, and a listener that
            // falls behind by more clears its whole L1.
            p.broadcast_channel_capacity = 4_096;
        })
        .with_connection_config(|c| {
            // Without it, a small command written while another is still
            // unacknowledged can wait for a delayed ACK: 40 ms spikes.
            c.tcp = TcpConfig { nodelay: Some(true), ..TcpConfig::default() };
            c.connection_timeout = connect_timeout;
            c.internal_command_timeout = connect_timeout;
            // A cache read is not worth retrying for long: the next tier
            // answers instead.
            c.max_command_attempts = 2;
            // Connections are named after the client's id, so an operator
            // (or a test) can find them in CLIENT LIST.
            c.auto_client_setname = true;
            // While the cluster cannot be reached, commands wait in this
            // queue; the breaker keeps it short (a probe a second), and this
            // bounds it whatever happens. A pipeline counts once.
            c.max_command_buffer_len = COMMAND_QUEUE;
        })
        .set_policy(ReconnectPolicy::new_exponential(0, 50, 5_000, 2));
    Ok(builder)
}

/// The Redis Cluster tier. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct L2Cache {
    client: Client,
    prefix: String,
    breaker: Breaker,
    command_timeout: Duration,
}

impl L2Cache {
    /// Connects to the cluster, failing if it does not answer within the
    /// connect timeout: for tools whose work needs Redis (`strata load`,
    /// `strata warm`).
    pub async fn connect_now(config: &L2Config) -> Result<L2Cache, L2Error> {
        let l2 = L2Cache::connect(config).await?;
        if !l2.client.is_connected() {
            // Stops the reconnecting; not worth waiting on.
            let _ = tokio::time::timeout(Duration::from_millis(100), l2.close()).await;
            return Err(L2Error::Unreachable(config.nodes.clone()));
        }
        Ok(l2)
    }

    /// Connects to the cluster, waiting up to the connect timeout. A cluster
    /// that does not answer by then is not an error: it is connected to in
    /// the background, and until then every call fails (and the breaker
    /// opens), so reads go to L1 and PostgreSQL. Only a bad configuration
    /// fails.
    pub async fn connect(config: &L2Config) -> Result<L2Cache, L2Error> {
        let client = builder(config)?.build()?;
        let connected = connect_within(&client, config.connect_timeout).await;
        let l2 = L2Cache {
            client,
            prefix: config.key_prefix.clone(),
            breaker: Breaker::new("redis", config.breaker),
            command_timeout: config.command_timeout,
        };
        if !connected {
            tracing::warn!(
                nodes = ?config.nodes,
                "the redis cluster does not answer; serving from L1 and postgres until it does"
            );
        } else if let Err(error) = l2.load_functions().await {
            // Loaded on first use instead (see `put_now`).
            tracing::warn!(%error, "loading strata's redis functions failed");
        }
        Ok(l2)
    }

    /// Loads (or replaces) Strata's function library on every primary.
    async fn load_functions(&self) -> Result<(), L2Error> {
        let _name: Value = self.client.function_load_cluster(true, LIBRARY).await?;
        Ok(())
    }

    /// The underlying client, for publishing and for tools.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// The cluster's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// The deadline of a call made with no caller's deadline (background
    /// work, tools): a few seconds from now. Each command is still bounded
    /// by the command timeout.
    pub fn default_deadline(&self) -> Instant {
        Instant::now() + NO_DEADLINE_BUDGET.max(self.command_timeout)
    }

    /// Runs `op` through the cluster's breaker, cut at `deadline`. Each
    /// command of it is also bounded by fred's command timeout, so a hung
    /// node fails a batch within that time however large the batch. A call
    /// cut by a deadline shorter than [`strata_core::TIMEOUT_FLOOR`] does not count
    /// against Redis.
    async fn guarded<T>(
        &self,
        name: &'static str,
        deadline: Instant,
        op: impl Future<Output = Result<T, L2Error>>,
    ) -> Result<T, L2Error> {
        let started = std::time::Instant::now();
        let timed = async {
            let result = op.await;
            metrics::histogram!("strata_redis_duration_seconds", "op" => name).record(started.elapsed());
            result
        };
        // Every Redis error is Redis failing: no error here is about the data.
        match self.breaker.run(Some(deadline), timed, |_| true).await {
            Guarded::Refused => Err(L2Error::Open),
            Guarded::TimedOut => Err(L2Error::Timeout),
            Guarded::Done(result) => result,
        }
    }

    fn key(&self, view: &FeatureView, entity: &str) -> String {
        self.key_of(&view.name, entity)
    }

    /// The Redis key of an entity of a view.
    pub fn key_of(&self, view: &str, entity: &str) -> String {
        format!("{}{}:{}", self.prefix, view, entity)
    }

    fn lease_key(&self, view: &FeatureView, entity: &str) -> String {
        format!("{}lease:{}:{}", self.prefix, view.name, entity)
    }

    /// Looks up a batch with one pipeline; the answer is aligned with `keys`.
    /// An entry of an older shape of the view reads as a miss.
    pub async fn get_many(
        &self,
        view: &FeatureView,
        keys: &[&str],
        deadline: Instant,
    ) -> Result<Vec<Option<L2Hit>>, L2Error> {
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.get(self.key(view, key)).await?;
        }
        let results =
            self.guarded("get", deadline, async { all_ok(pipeline.try_all::<Option<Bytes>>().await, keys.len()) });
        let now = now_ms();
        Ok(keys.iter().zip(results.await?).map(|(key, bytes)| decode_hit(view, key, bytes.as_deref(), now)).collect())
    }

    /// [`L2Cache::try_leases`] and a look at each key, in one pipeline (`SET
    /// lease NX PX ttl`, `GET key`): a key another instance filled between
    /// our miss and our lease is found here instead of costing a read of
    /// PostgreSQL. Aligned with `keys`: whether the lease was taken, and
    /// the hit if any.
    pub async fn lease_and_get(
        &self,
        view: &FeatureView,
        keys: &[&str],
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Vec<(bool, Option<L2Hit>)>, L2Error> {
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline
                .set(self.lease_key(view, key), 1, Some(Expiration::PX(millis(ttl))), Some(SetOptions::NX), false)
                .await?;
            let () = pipeline.get(self.key(view, key)).await?;
        }
        let results =
            self.guarded("lease_get", deadline, async { all_ok(pipeline.try_all::<Value>().await, keys.len() * 2) });
        let results = results.await?;
        let now = now_ms();
        Ok(keys
            .iter()
            .zip(results.chunks_exact(2))
            .map(|(key, pair)| {
                let won = !pair[0].is_null();
                let bytes = match &pair[1] {
                    Value::Bytes(bytes) => Some(&bytes[..]),
                    Value::String(text) => Some(text.as_bytes()),
                    _ => None,
                };
                (won, decode_hit(view, key, bytes, now))
            })
            .collect())
    }

    /// Stores entries of a view, each unless Redis holds a newer version of
    /// its key (see [`LIBRARY`]), with one pipeline. Each expires
    /// after its lifetime's hard TTL and turns stale after its soft one.
    /// Aligned with `entries`: true where stored, false where refused
    /// because a newer version is there.
    pub async fn put_many(
        &self,
        view: &FeatureView,
        entries: &[Put<'_>],
        deadline: Instant,
    ) -> Result<Vec<bool>, L2Error> {
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.guarded("put", deadline, self.put_now(view, entries)).await
    }

    async fn put_now(&self, view: &FeatureView, entries: &[Put<'_>]) -> Result<Vec<bool>, L2Error> {
        let now = now_ms();
        let commands: Vec<(String, Value, Value)> = entries
            .iter()
            .map(|put| {
                let bytes = encode_entry(
                    view.fingerprint,
                    now.saturating_add(millis(put.life.soft)),
                    put.content.clone(),
                    put.version,
                );
                (self.key(view, put.key), Value::Bytes(Bytes::from(bytes)), Value::Integer(millis(put.life.hard)))
            })
            .collect();
        let mut results = self.eval_puts(&commands).await?;
        if results.iter().any(|r| matches!(r, Err(e) if e.details().contains("Function not found"))) {
            // A node lost its functions (FUNCTION FLUSH, a new empty node):
            // load them everywhere, and once more.
            self.load_functions().await?;
            results = self.eval_puts(&commands).await?;
        }
        let stored: Vec<bool> = results.into_iter().map(|r| r.map(|n| n == 1)).collect::<Result<_, _>>()?;
        let refused = stored.iter().filter(|s| !**s).count();
        if refused > 0 {
            metrics::counter!("strata_cache_fills_refused_total", "tier" => "l2", "view" => view.name.clone())
                .increment(refused as u64);
        }
        Ok(stored)
    }

    async fn eval_puts(
        &self,
        commands: &[(String, Value, Value)],
    ) -> Result<Vec<Result<i64, fred::error::Error>>, L2Error> {
        let pipeline = self.client.pipeline();
        for (key, entry, ttl) in commands {
            let () = pipeline.fcall(PUT_FUNCTION, key.as_str(), vec![entry.clone(), ttl.clone()]).await?;
        }
        let results = pipeline.try_all::<i64>().await;
        if results.len() != commands.len() {
            return Err(L2Error::ShortPipeline { got: results.len(), want: commands.len() });
        }
        Ok(results)
    }

    /// Tries to take a short lease on each key (`SET lease NX PX ttl`): the
    /// holder reloads the key from PostgreSQL, other instances wait for its
    /// result in Redis. Aligned with `keys`: true where the lease was taken.
    pub async fn try_leases(
        &self,
        view: &FeatureView,
        keys: &[&str],
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Vec<bool>, L2Error> {
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline
                .set(self.lease_key(view, key), 1, Some(Expiration::PX(millis(ttl))), Some(SetOptions::NX), false)
                .await?;
        }
        let results =
            self.guarded("lease", deadline, async { all_ok(pipeline.try_all::<Option<String>>().await, keys.len()) });
        Ok(results.await?.into_iter().map(|r| r.is_some()).collect())
    }

    /// Gives leases back once their keys are reloaded.
    pub async fn release_leases(&self, view: &FeatureView, keys: &[&str]) -> Result<(), L2Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.del(self.lease_key(view, key)).await?;
        }
        let results = self.guarded("release", self.default_deadline(), async {
            all_ok(pipeline.try_all::<Value>().await, keys.len())
        });
        results.await.map(drop)
    }

    /// Counts reads of keys of a view in a sorted set (one per view, so one
    /// node), for `strata warm --top`; now and then trims it to the `keep`
    /// most-read keys so it stays bounded.
    pub async fn record_reads(&self, view: &str, keys: &[&str], keep: usize, trim: bool) -> Result<(), L2Error> {
        let set = self.hot_key(view);
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.zincrby(&set, 1.0, *key).await?;
        }
        if trim {
            let keep = i64::try_from(keep).unwrap_or(i64::MAX);
            let () = pipeline.zremrangebyrank(&set, 0, -keep - 1).await?;
        }
        let results = pipeline.try_all::<Value>().await;
        results.into_iter().try_for_each(|r| r.map(drop))?;
        Ok(())
    }

    /// The `n` most-read keys of a view, as [`L2Cache::record_reads`] counted.
    pub async fn top_keys(&self, view: &str, n: usize) -> Result<Vec<String>, L2Error> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let stop = i64::try_from(n).unwrap_or(i64::MAX) - 1;
        Ok(self.client.zrevrange(self.hot_key(view), 0, stop, false).await?)
    }

    fn hot_key(&self, view: &str) -> String {
        format!("{}hot:{}", self.prefix, view)
    }

    /// Removes cached entries of a view outright, leaving no guard (unlike
    /// a write). For operators starting a key over, and for tests.
    pub async fn evict(&self, view: &str, keys: &[&str]) -> Result<(), L2Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.del(self.key_of(view, key)).await?;
        }
        all_ok(pipeline.try_all::<Value>().await, keys.len()).map(drop)
    }

    /// Publishes `message` on the sharded channel `channel` (SPUBLISH): it
    /// goes to the shard that owns the channel's slot and straight to the
    /// subscribers there, not over the cluster bus to every node (which
    /// showed 40 ms stalls here).
    pub async fn publish(&self, channel: &str, message: Vec<u8>, deadline: Instant) -> Result<(), L2Error> {
        self.guarded("publish", deadline, async {
            let _receivers: i64 = self.client.spublish(channel, Bytes::from(message)).await?;
            Ok(())
        })
        .await
    }

    /// Removes every key from every primary of the cluster (all of Strata's
    /// and anyone else's). For tests and operators starting over.
    pub async fn flush_all(&self) -> Result<(), L2Error> {
        self.client.flushall_cluster().await?;
        Ok(())
    }

    /// Closes the connections.
    pub async fn close(&self) {
        let _ = self.client.quit().await;
    }
}
