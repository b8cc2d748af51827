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

/// Where the Redis Cluster is, how to log in, and how patient to be with it.
#[derive(Clone)]
pub struct L2Config {
    /// An ACL user (`None`: the default user).
    pub username: Option<String>,
    pub password: Option<String>,
    /// TLS to every node (cache, leases and pub/sub alike).
    pub tls: Option<RedisTls>,
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

/// Never prints the password.
impl std::fmt::Debug for L2Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L2Config")
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls)
            .field("command_timeout", &self.command_timeout)
            .field("key_prefix", &self.key_prefix)
            .finish()
    }
}

/// TLS towards Redis: the nodes' certificates must chain to these roots
/// and name the address each node is reached at.
#[derive(Clone)]
pub struct RedisTls {
    pub roots: Arc<rustls::RootCertStore>,
    /// A client certificate chain and key, for nodes that demand one.
    pub identity:
        Option<(Vec<rustls::pki_types::CertificateDer<'static>>, Arc<rustls::pki_types::PrivateKeyDer<'static>>)>,
}

impl std::fmt::Debug for RedisTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisTls")
            .field("roots", &self.roots.len())
            .field("client_certificate", &self.identity.is_some())
            .finish()
    }
}

impl RedisTls {
    fn connector(&self) -> Result<fred::types::config::TlsConnector, L2Error> {
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .map_err(|e| L2Error::Tls(e.to_string()))?
            .with_root_certificates(self.roots.clone());
        let config = match &self.identity {
            Some((chain, key)) => builder
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(|e| L2Error::Tls(e.to_string()))?,
            None => builder.with_no_client_auth(),
        };
        Ok(config.into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L2Error {
    #[error("bad redis node address {0:?} (want host:port)")]
    BadAddress(String),
    #[error("no redis nodes are configured")]
    NoNodes,
    #[error("redis TLS: {0}")]
    Tls(String),
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
    /// How long until the entry turns stale (past its soft expiry: served,
    /// and reloaded under a lease); zero once it has.
    pub fresh_for: Duration,
}

impl L2Hit {
    /// Past its soft expiry.
    pub fn stale(&self) -> bool {
        self.fresh_for.is_zero()
    }
}

/// A Redis function library (functions are replicated to replicas and kept
/// across restarts, unlike the script cache).
///
/// `strata_put_v1` stores an entry unless the key holds one with a newer
/// version (the event time at bytes 2..9 of an entry of format 3,
/// big-endian, offset so that unsigned order is time order). An equal
/// version replaces, so a reload renews an entry's lifetime. Anything else
/// at the key (another format, a foreign value, even of another type) is
/// replaced. Returns 1 when stored, 0 when refused. Every cache fill and
/// every write goes through it: a fill that read PostgreSQL before a write
/// committed carries an older version than what the write left in Redis,
/// and loses, whatever the timing.
///
/// `strata_get_or_lease_v1` reads a key's entry and, unless it is a usable
/// one (format 3, the view's fingerprint, not a guard), tries to take the
/// key's lease (`SET NX PX`) in the same call: the entry and its lease share
/// a hash slot. Returns `{entry or nil, 1 if the lease was taken}`. This
/// release no longer calls it ([`L2Cache::get_or_lease`] is plain commands,
/// a quarter of the cost in Redis); it stays in the library for instances of
/// the previous release during a rolling upgrade, since the library is
/// shared and each instance loads its own over the others'.
const LIBRARY: &str = r#"#!lua name=strata
local function current(key)
  local ok, cur = pcall(redis.call, 'GET', key)
  if ok and type(cur) == 'string' then return cur end
  return false
end

redis.register_function('strata_put_v1', function(keys, args)
  local cur = current(keys[1])
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

redis.register_function('strata_get_or_lease_v1', function(keys, args)
  local cur = current(keys[1])
  if cur and string.len(cur) >= 22 and string.byte(cur, 1) == 3
      and string.sub(cur, 10, 13) == args[1] and string.byte(cur, 22) ~= 2 then
    return {cur, 0}
  end
  local won = redis.call('SET', keys[2], '1', 'PX', args[2], 'NX')
  return {cur, won and 1 or 0}
end)
"#;
const PUT_FUNCTION: &str = "strata_put_v1";

/// Whether a Redis error says the cluster (or a node) is failing, rather
/// than something about one key or reply (WRONGTYPE, an unexpected value, a
/// script error). Only outages count against the breaker: one foreign value
/// must not make every request skip Redis.
pub fn is_outage(error: &fred::error::Error) -> bool {
    use fred::error::ErrorKind;
    match error.kind() {
        ErrorKind::IO
        | ErrorKind::Timeout
        | ErrorKind::Canceled
        | ErrorKind::Cluster
        | ErrorKind::Routing
        | ErrorKind::Backpressure
        | ErrorKind::Auth
        | ErrorKind::Tls
        | ErrorKind::Config
        | ErrorKind::Url
        | ErrorKind::Sentinel => true,
        ErrorKind::InvalidCommand
        | ErrorKind::InvalidArgument
        | ErrorKind::Protocol
        | ErrorKind::Parse
        | ErrorKind::NotFound => false,
        // Server replies without a kind of their own: those of a node that
        // is loading, busy, read-only (a failover) or out of memory are
        // outages; the rest ("ERR …") are about the command.
        ErrorKind::Unknown => {
            let details = error.details();
            ["LOADING", "BUSY", "MASTERDOWN", "TRYAGAIN", "READONLY", "OOM", "CLUSTERDOWN", "No response"]
                .iter()
                .any(|prefix| details.starts_with(prefix))
        }
    }
}

impl L2Error {
    /// Whether this failure says Redis is failing (and counts against its
    /// breaker), rather than something about a key or a reply.
    pub fn is_outage(&self) -> bool {
        match self {
            L2Error::Redis(error) => is_outage(error),
            L2Error::Open | L2Error::Timeout | L2Error::Unreachable(_) => true,
            L2Error::ShortPipeline { .. } | L2Error::BadAddress(_) | L2Error::NoNodes | L2Error::Tls(_) => false,
        }
    }
}

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

/// An entry ready for Redis.
struct Encoded {
    key: String,
    bytes: Bytes,
    hard_ms: i64,
}

impl Encoded {
    /// The keys and arguments of its `strata_put_v1` call.
    fn put_call(&self) -> (Vec<String>, Vec<Value>) {
        (vec![self.key.clone()], vec![Value::Bytes(self.bytes.clone()), Value::Integer(self.hard_ms)])
    }
}

fn count_refused(view: &FeatureView, refused: usize) {
    if refused > 0 {
        metrics::counter!("strata_cache_fills_refused_total", "tier" => "l2", "view" => view.name.clone())
            .increment(refused as u64);
    }
}

/// What a cached entry of `key` says, if anything; an entry of an older
/// shape of the view, a guard, or a foreign value reads as a miss. A found
/// row must fit the view (one value per feature, each of its type or
/// null), or it is a miss too: nothing from Redis is trusted further.
fn decode_hit(view: &FeatureView, key: &str, bytes: Option<&[u8]>, now_ms: i64) -> Option<L2Hit> {
    let bytes = bytes?;
    let entry = match decode_entry(view.fingerprint, bytes) {
        Ok(entry) => entry,
        Err(error) => {
            tracing::debug!(view = %view.name, key, %error, "ignoring cached entry");
            count_undecodable(view);
            return None;
        }
    };
    let value = match entry.content {
        Content::Found(row) if !fits(view, &row) => {
            tracing::warn!(view = %view.name, key, "ignoring a cached row that does not fit the view");
            count_undecodable(view);
            return None;
        }
        Content::Found(row) => Cached::Found(Arc::new(row)),
        Content::Missing => Cached::Missing,
        // A guard holds no value: a miss.
        Content::Guard => return None,
    };
    let fresh_for = Duration::from_millis(u64::try_from(entry.soft_expiry_ms.saturating_sub(now_ms)).unwrap_or(0));
    Some(L2Hit { value, fresh_for })
}

/// Whether a row has one value per feature of the view, each of the
/// feature's type or null.
fn fits(view: &FeatureView, row: &Row) -> bool {
    row.values.len() == view.features.len()
        && row.values.iter().zip(&view.features).all(|(v, f)| v.feature_type().is_none_or(|ty| ty == f.ty))
}

fn count_undecodable(view: &FeatureView) {
    metrics::counter!("strata_l2_undecodable_total", "view" => view.name.clone()).increment(1);
}

/// A reply's bytes, if it is a string.
fn reply_bytes(value: &Value) -> Option<&[u8]> {
    match value {
        Value::Bytes(bytes) => Some(&bytes[..]),
        Value::String(text) => Some(text.as_bytes()),
        _ => None,
    }
}

/// The results of a pipeline of `want` commands: each key's reply, or
/// `None` where its command failed for a reason about that key (WRONGTYPE,
/// say), which reads as a miss. An outage fails the batch.
fn per_key<T>(results: Vec<Result<T, fred::error::Error>>, want: usize) -> Result<Vec<Option<T>>, L2Error> {
    if results.len() != want {
        // A pipeline that failed as a whole (a timeout, say) answers with
        // its one error: that error, so the breaker judges it.
        let got = results.len();
        return Err(results
            .into_iter()
            .find_map(Result::err)
            .map_or(L2Error::ShortPipeline { got, want }, L2Error::Redis));
    }
    results
        .into_iter()
        .map(|result| match result {
            Ok(value) => Ok(Some(value)),
            Err(error) if is_outage(&error) => Err(L2Error::Redis(error)),
            Err(error) => {
                tracing::debug!(%error, "a redis command failed for its key; a miss");
                Ok(None)
            }
        })
        .collect()
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

/// The hash tag of an entity's Redis keys (its entry and its lease): 16
/// bits of the xxh3 hash of the view and the key, so keys spread over the
/// slots evenly whatever their text, and a client cannot pick one.
pub fn hash_tag(view: &str, entity: &str) -> u16 {
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    hasher.update(view.as_bytes());
    hasher.update(&[0]);
    hasher.update(entity.as_bytes());
    // The low 16 bits of a 64-bit hash.
    hasher.digest() as u16
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
    let tls = config.tls.as_ref().map(RedisTls::connector).transpose()?.map(fred::types::config::TlsConfig::from);
    let fred_config = Config {
        server: ServerConfig::new_clustered(hosts),
        fail_fast: false,
        username: config.username.clone(),
        password: config.password.clone(),
        tls,
        ..Default::default()
    };
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
        match self.breaker.run(Some(deadline), timed, L2Error::is_outage).await {
            Guarded::Refused => Err(L2Error::Open),
            Guarded::TimedOut => Err(L2Error::Timeout),
            Guarded::Done(result) => result,
        }
    }

    fn key(&self, view: &FeatureView, entity: &str) -> String {
        self.key_of(&view.name, entity)
    }

    /// The Redis key of an entity of a view: `<prefix>{<tag>}e:<view>:<key>`.
    /// The hash tag is Strata's (see [`hash_tag`]), so the entity key, braces
    /// and all, cannot choose the slot; `e:` after it is a namespace that no
    /// view name or entity key reaches (the hot-key sets and the channel
    /// have no tag after the prefix, and leases are `l:`).
    pub fn key_of(&self, view: &str, entity: &str) -> String {
        format!("{}{{{:04x}}}e:{}:{}", self.prefix, hash_tag(view, entity), view, entity)
    }

    fn lease_key(&self, view: &FeatureView, entity: &str) -> String {
        self.lease_key_of(&view.name, entity)
    }

    /// The Redis key of an entity's lease: in the same slot as its entry.
    pub fn lease_key_of(&self, view: &str, entity: &str) -> String {
        format!("{}{{{:04x}}}l:{}:{}", self.prefix, hash_tag(view, entity), view, entity)
    }

    /// Looks up a batch with one pipeline; the answer is aligned with `keys`.
    /// An entry of an older shape of the view, or one Redis cannot read
    /// as a string, reads as a miss.
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
            self.guarded("get", deadline, async { per_key(pipeline.try_all::<Option<Bytes>>().await, keys.len()) });
        let now = now_ms();
        Ok(keys
            .iter()
            .zip(results.await?)
            .map(|(key, bytes)| decode_hit(view, key, bytes.flatten().as_deref(), now))
            .collect())
    }

    /// Looks up a batch and takes the lease of each key (`SET lease NX PX
    /// ttl`) in the same round trip: a GET and a SET per key, both in the
    /// key's slot, so on the same node and in that order, all in one
    /// pipeline. Plain commands, not a function call: Redis runs a `FCALL`
    /// in about 11 µs, a GET and a SET in about 3 together (BENCHMARKS.md).
    /// Aligned with `keys`: whether the lease was taken, and the hit if any.
    /// A lease taken for a key that turned out to hold a usable entry (it
    /// was filled since the caller's own lookup) is not needed: the caller
    /// gives it back. A key whose commands failed for a reason about the key
    /// reads as a miss whose lease was taken: its caller loads it, and the
    /// fill replaces what is there.
    pub async fn get_or_lease(
        &self,
        view: &FeatureView,
        keys: &[&str],
        ttl: Duration,
        deadline: Instant,
    ) -> Result<Vec<(bool, Option<L2Hit>)>, L2Error> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let ttl = millis(ttl);
        let pipeline = self.client.pipeline();
        for key in keys {
            let () = pipeline.get(self.key(view, key)).await?;
            let () = pipeline
                .set(self.lease_key(view, key), 1, Some(Expiration::PX(ttl)), Some(SetOptions::NX), false)
                .await?;
        }
        let results = self
            .guarded("get_or_lease", deadline, async { per_key(pipeline.try_all::<Value>().await, 2 * keys.len()) })
            .await?;
        let now = now_ms();
        let mut replies = results.into_iter();
        Ok(keys
            .iter()
            .map(|key| {
                let (entry, lease) = (replies.next().flatten(), replies.next().flatten());
                // A lease SET that failed for its key counts as taken: the
                // caller loads the key rather than wait for nobody.
                let won = lease.is_none_or(|reply| !matches!(reply, Value::Null));
                (won, decode_hit(view, key, entry.as_ref().and_then(reply_bytes), now))
            })
            .collect())
    }

    /// Calls a function of [`LIBRARY`] once per `(keys, args)`, in one
    /// pipeline; each call's reply, `None` where it failed for a reason
    /// about its keys. A node that lost the library (FUNCTION FLUSH, a new
    /// empty node) gets it again, and the calls are made once more.
    async fn fcall_many(
        &self,
        function: &str,
        calls: &[(Vec<String>, Vec<Value>)],
    ) -> Result<Vec<Option<Value>>, L2Error> {
        let run = || async {
            let pipeline = self.client.pipeline();
            for (keys, args) in calls {
                let () = pipeline.fcall(function, keys.clone(), args.clone()).await?;
            }
            Ok::<_, L2Error>(pipeline.try_all::<Value>().await)
        };
        let mut results = run().await?;
        if results.iter().any(|r| matches!(r, Err(e) if e.details().contains("Function not found"))) {
            self.load_functions().await?;
            results = run().await?;
        }
        per_key(results, calls.len())
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
        let calls: Vec<_> = self.encode(view, entries).iter().map(Encoded::put_call).collect();
        // A call that failed for its key (not an outage) stored nothing.
        let stored: Vec<bool> = self
            .fcall_many(PUT_FUNCTION, &calls)
            .await?
            .into_iter()
            .map(|reply| matches!(reply, Some(Value::Integer(1))))
            .collect();
        count_refused(view, stored.iter().filter(|s| !**s).count());
        Ok(stored)
    }

    /// Each entry's Redis key, bytes and hard TTL in milliseconds.
    fn encode(&self, view: &FeatureView, entries: &[Put<'_>]) -> Vec<Encoded> {
        let now = now_ms();
        entries
            .iter()
            .map(|put| Encoded {
                key: self.key(view, put.key),
                bytes: Bytes::from(encode_entry(
                    view.fingerprint,
                    now.saturating_add(millis(put.life.soft)),
                    put.content.clone(),
                    put.version,
                )),
                hard_ms: millis(put.life.hard),
            })
            .collect()
    }

    /// Fills keys that were found without an entry (cold misses) and gives
    /// back the leases of `leases`, in two pipelines and with no function
    /// call in the common case. Each entry is first stored with `SET NX`:
    /// where the key holds nothing, that is what [`L2Cache::put_many`] would
    /// do (nothing is there to be newer), for a quarter of its cost in Redis.
    /// The keys where something has appeared meanwhile (a write's entry, a
    /// bulk load's guard, another instance's fill) then go through
    /// `strata_put_v1`, which keeps the newer version, in the pipeline that
    /// releases the leases; a key's put comes before its lease's release
    /// there, both on the key's node. Aligned with `entries`: true where
    /// stored. The leases are released whether or not the fill succeeded,
    /// unless Redis failed.
    pub async fn fill_absent(
        &self,
        view: &FeatureView,
        entries: &[Put<'_>],
        leases: &[&str],
        deadline: Instant,
    ) -> Result<Vec<bool>, L2Error> {
        self.guarded("fill", deadline, self.fill_absent_now(view, entries, leases)).await
    }

    async fn fill_absent_now(
        &self,
        view: &FeatureView,
        entries: &[Put<'_>],
        leases: &[&str],
    ) -> Result<Vec<bool>, L2Error> {
        let encoded = self.encode(view, entries);
        let mut stored = vec![false; encoded.len()];
        if !encoded.is_empty() {
            let pipeline = self.client.pipeline();
            for entry in &encoded {
                let expiry = Some(Expiration::PX(entry.hard_ms));
                let () = pipeline.set(&entry.key, entry.bytes.clone(), expiry, Some(SetOptions::NX), false).await?;
            }
            for (i, reply) in per_key(pipeline.try_all::<Value>().await, encoded.len())?.into_iter().enumerate() {
                stored[i] = matches!(reply, Some(Value::String(_) | Value::Bytes(_)));
            }
        }
        // Keys that hold something by now: through the function.
        let taken: Vec<usize> = (0..encoded.len()).filter(|&i| !stored[i]).collect();
        if taken.is_empty() && leases.is_empty() {
            return Ok(stored);
        }
        let calls: Vec<_> = taken.iter().map(|&i| encoded[i].put_call()).collect();
        let pipeline = self.client.pipeline();
        for (keys, args) in &calls {
            let () = pipeline.fcall(PUT_FUNCTION, keys.clone(), args.clone()).await?;
        }
        for key in leases {
            let () = pipeline.del(self.lease_key(view, key)).await?;
        }
        let want = calls.len() + leases.len();
        let replies = pipeline.try_all::<Value>().await;
        let lost_library = replies.len() == want
            && replies[..calls.len()].iter().any(|r| matches!(r, Err(e) if e.details().contains("Function not found")));
        let mut replies = per_key(replies, want)?;
        if lost_library {
            // A node that lost the library (FUNCTION FLUSH, a new empty
            // node): [`L2Cache::fcall_many`] loads it and puts those again.
            let again = self.fcall_many(PUT_FUNCTION, &calls).await?;
            replies.splice(..calls.len(), again);
        }
        for (&i, reply) in taken.iter().zip(&replies) {
            stored[i] = matches!(reply, Some(Value::Integer(1)));
        }
        count_refused(view, taken.iter().filter(|&&i| !stored[i]).count());
        Ok(stored)
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

    /// [`L2Cache::publish`] without the breaker, for the invalidation
    /// heartbeat: while the breaker is open for another node's trouble, the
    /// channel's own node may well answer, and a refused heartbeat would make
    /// every instance clear its L1 exactly when stale copies are needed. A
    /// failed heartbeat does not count against Redis either.
    pub async fn publish_unguarded(&self, channel: &str, message: Vec<u8>, deadline: Instant) -> Result<(), L2Error> {
        let publish = async {
            let _receivers: i64 = self.client.spublish(channel, Bytes::from(message)).await?;
            Ok(())
        };
        tokio::time::timeout_at(deadline, publish).await.unwrap_or(Err(L2Error::Timeout))
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
