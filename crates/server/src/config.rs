//! Configuration in two stages: [`FileConfig`] is what the TOML file (and
//! `STRATA_*` environment variables) say, with defaults; [`FileConfig::validate`]
//! turns it into the [`Config`] the server runs with, or an error that names
//! the setting.
//!
//! Unknown settings are rejected (`deny_unknown_fields`): a misspelt setting
//! that silently fell back to its default is worse than a refusal to start.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use figment::Figment;
use figment::providers::{Env, Format, Toml};
use serde::{Deserialize, Serialize};
use strata_cache_tiers::L2Config;
use strata_core::{BreakerConfig, EntitySpec, FeatureServiceSpec, FeatureViewSpec, Registry, RetryPolicy};
use strata_proto::Limits;
use strata_shard_router::{PoolOptions, ReplicaOptions, ShardConfig};

use crate::admission::{ClientLimit, RateLimits};
use crate::auth::{Authenticator, Credential, Principal, Views};
use crate::tls::TlsFiles;
use strata_engine::{HotKeys, Protection, WritePolicy};

/// The environment variable prefix; `__` separates levels, so
/// `STRATA_SERVER__GRPC_ADDR` overrides `server.grpc_addr`.
pub const ENV_PREFIX: &str = "STRATA_";

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct FileConfig {
    pub server: ServerSection,
    pub limits: LimitsSection,
    pub l1: L1Section,
    pub redis: RedisSection,
    pub postgres: PostgresSection,
    pub stampede: StampedeSection,
    pub writes: WritesSection,
    pub hot_keys: HotKeysSection,
    pub breaker: BreakerSection,
    pub retry: RetrySection,
    pub rate_limits: RateLimitsSection,
    pub tls: TlsSection,
    pub auth: AuthSection,
    /// Documented on their own (README, CONFIGURATION.md), as are entities
    /// and feature services.
    #[serde(skip_serializing)]
    pub entities: Vec<EntitySpec>,
    #[serde(skip_serializing)]
    pub views: Vec<FeatureViewSpec>,
    #[serde(skip_serializing)]
    pub feature_services: Vec<FeatureServiceSpec>,
}

/// Circuit breakers, one for the Redis Cluster and one per PostgreSQL
/// shard: after `failures` consecutive failed (or timed-out) calls the
/// dependency is skipped for `open_for`, then one probe call decides.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct BreakerSection {
    pub failures: u32,
    #[serde(with = "humantime_serde")]
    pub open_for: Duration,
}

impl Default for BreakerSection {
    fn default() -> Self {
        let b = BreakerConfig::default();
        BreakerSection { failures: b.failures, open_for: b.open_for }
    }
}

/// Retries of failed PostgreSQL reads, within the request's deadline:
/// `attempts` tries in all, waiting a random time up to `base_delay * 2^n`
/// (at most `max_delay`) before each retry.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetrySection {
    pub attempts: u32,
    #[serde(with = "humantime_serde")]
    pub base_delay: Duration,
    #[serde(with = "humantime_serde")]
    pub max_delay: Duration,
}

impl Default for RetrySection {
    fn default() -> Self {
        let r = RetryPolicy::default();
        RetrySection { attempts: r.attempts, base_delay: r.base, max_delay: r.cap }
    }
}

/// Per-client request rate limits (token buckets). A client names itself
/// in the `x-client-id` request header; clients without an entry in
/// `clients` (and requests without the header, as one client) get
/// `per_second` and `burst`. 0 means no limit.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsSection {
    pub per_second: u32,
    pub burst: u32,
    pub clients: Vec<ClientLimitSection>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimitSection {
    pub id: String,
    pub per_second: u32,
    #[serde(default)]
    pub burst: u32,
}

/// TLS on the front ends: Strata's gRPC port (and Feast's gRPC services on
/// it), Feast's HTTP port, and, with `metrics`, the metrics endpoint. No
/// `cert_file`: plaintext.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsSection {
    /// PEM certificate chain, the server's certificate first.
    pub cert_file: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// PEM CA certificates; set, every client must present a certificate
    /// one of them signed (mutual TLS).
    pub client_ca_file: String,
    /// How often the files are checked; changed files are loaded for new
    /// handshakes, without dropping connections.
    #[serde(with = "humantime_serde")]
    pub reload_every: Duration,
    /// Serve /metrics with TLS too (Prometheus then needs the CA).
    pub metrics: bool,
}

impl Default for TlsSection {
    fn default() -> Self {
        TlsSection {
            cert_file: String::new(),
            key_file: String::new(),
            client_ca_file: String::new(),
            reload_every: Duration::from_secs(10),
            metrics: false,
        }
    }
}

/// Authentication and per-view permissions. Off, anyone who reaches the
/// ports may read, write and delete everything (Strata warns at start-up
/// unless it listens on loopback only).
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthSection {
    pub enabled: bool,
    pub principals: Vec<PrincipalSection>,
}

/// One caller. It proves who it is with a bearer token whose SHA-256 is
/// listed (`strata auth hash-token`; several allow rotation), or with a
/// client certificate carrying one of `certificate_names` (mutual TLS).
#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PrincipalSection {
    pub name: String,
    #[serde(default)]
    pub token_sha256: Vec<String>,
    #[serde(default)]
    pub certificate_names: Vec<String>,
    /// Views it may read; `["*"]`: all.
    #[serde(default)]
    pub read: Vec<String>,
    /// Views it may write and delete in; `["*"]`: all.
    #[serde(default)]
    pub write: Vec<String>,
    /// Its rate limit (token bucket; 0: none). With authentication on,
    /// this, not `x-client-id`, decides a caller's bucket.
    #[serde(default)]
    pub per_second: u32,
    #[serde(default)]
    pub burst: u32,
}

/// Token hashes are not tokens, but they are still nobody's business.
impl std::fmt::Debug for PrincipalSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrincipalSection")
            .field("name", &self.name)
            .field("token_sha256", &format_args!("<{} redacted>", self.token_sha256.len()))
            .field("certificate_names", &self.certificate_names)
            .field("read", &self.read)
            .field("write", &self.write)
            .finish()
    }
}

/// Sampling of reads, so `strata warm --top N` can preload the most-read
/// keys. Counts live in Redis, one sorted set per view.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct HotKeysSection {
    /// Fraction of requests whose keys are counted; 0 turns sampling off.
    pub sample_rate: f64,
    /// Keys kept per view, most read first.
    pub keep: usize,
}

impl Default for HotKeysSection {
    fn default() -> Self {
        let h = HotKeys::default();
        HotKeysSection { sample_rate: h.sample_rate, keep: h.keep }
    }
}

/// How writes reach the caches. Written keys are announced on the Redis
/// channel `<redis.key_prefix>invalidations`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct WritesSection {
    /// How long Redis remembers the event time of a write whose value it
    /// does not hold (a deletion, a bulk-loaded row), so that a cache fill
    /// that read PostgreSQL before the write cannot put the older value back.
    #[serde(with = "humantime_serde")]
    pub guard_ttl: Duration,
}

impl Default for WritesSection {
    fn default() -> Self {
        WritesSection { guard_ttl: WritePolicy::default().guard_ttl }
    }
}

/// The stampede protections: single flight, Redis leases, refresh-ahead,
/// negative caching and TTL jitter. `enabled = false` turns them all off,
/// to measure what they save.
#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct StampedeSection {
    pub enabled: bool,
    /// How long one instance holds the right to reload a key from
    /// PostgreSQL; others wait that long for its result in Redis.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
    /// Background reloads waiting at most; more are dropped and counted.
    pub refresh_queue: usize,
    /// Background reload batches running at once.
    pub refresh_concurrency: usize,
}

impl Default for StampedeSection {
    fn default() -> Self {
        let p = Protection::default();
        StampedeSection {
            enabled: p.enabled,
            lease_ttl: p.lease_ttl,
            refresh_queue: p.refresh_queue,
            refresh_concurrency: p.refresh_concurrency,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerSection {
    pub grpc_addr: String,
    pub metrics_addr: String,
    /// Feast's HTTP API (`feast serve`'s endpoints); empty: not served.
    pub feast_http_addr: String,
    /// The budget of a request whose client sent no `grpc-timeout`.
    #[serde(with = "humantime_serde")]
    pub default_deadline: Duration,
    /// The longest budget honoured; a longer `grpc-timeout` is cut to it.
    #[serde(with = "humantime_serde")]
    pub max_deadline: Duration,
    /// FeatureStore requests in flight at most; more are refused at once
    /// with RESOURCE_EXHAUSTED instead of queueing.
    pub max_in_flight: usize,
    /// On SIGTERM or SIGINT: how long in-flight requests get to finish
    /// before the process exits.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// gRPC connections open at once at most; more are closed at once.
    pub max_connections: usize,
    /// Concurrent HTTP/2 streams (calls) per connection at most.
    pub max_concurrent_streams: u32,
    /// How often an idle connection is pinged, and how long a ping may go
    /// unanswered before the connection is closed: dead clients do not
    /// hold connections.
    #[serde(with = "humantime_serde")]
    pub keepalive_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Longest time a call may take from its first byte to its answer,
    /// reading its request included: a client that never finishes sending
    /// one is cut off. Longer than `max_deadline`.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Serve gRPC server reflection (what lets grpcurl work without the
    /// .proto files).
    pub reflection: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsSection {
    pub max_keys_per_request: usize,
    pub max_key_bytes: usize,
    pub max_rows_per_write: usize,
    /// Bytes of one feature value at most (a string's or bytes' length, a
    /// list's elements).
    pub max_value_bytes: usize,
    /// Bytes of one encoded request at most; larger ones are refused with
    /// RESOURCE_EXHAUSTED before they are decoded.
    pub max_request_bytes: usize,
    /// Bytes of one answer at most; a read whose answer would be larger is
    /// refused with RESOURCE_EXHAUSTED before the answer is built.
    pub max_response_bytes: usize,
    /// How far ahead of the server's clock an event time may be.
    #[serde(with = "humantime_serde")]
    pub max_future_event_time: Duration,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct L1Section {
    /// Upper bound of the in-process cache, in bytes of cached rows; 0
    /// turns L1 off (every read goes to Redis).
    pub max_bytes: u64,
    /// How long past its TTL a row is kept, to be served marked STALE when
    /// its shard cannot be read (stale-if-error); 0 turns it off.
    #[serde(with = "humantime_serde")]
    pub max_stale: Duration,
}

#[derive(Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct RedisSection {
    pub nodes: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub command_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    pub key_prefix: String,
    /// An ACL user; empty: the default user.
    pub username: String,
    /// Its password (better from `STRATA_REDIS__PASSWORD` or
    /// `password_file` than in a file of settings).
    pub password: String,
    /// A file holding the password (surrounding white space ignored).
    pub password_file: String,
    /// TLS to every node, trusting `tls_ca_file` (else the system's roots).
    pub tls: bool,
    pub tls_ca_file: String,
    /// A client certificate and key, for nodes with `tls-auth-clients yes`.
    pub tls_cert_file: String,
    pub tls_key_file: String,
}

/// Never prints the password.
impl std::fmt::Debug for RedisSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSection")
            .field("nodes", &self.nodes)
            .field("username", &self.username)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .field("password_file", &self.password_file)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresSection {
    pub max_connections_per_shard: usize,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// PEM CA certificates the shards' certificates must chain to: TLS to
    /// every shard whose `sslmode` is not `disable`. Empty: TLS only to
    /// shards with `sslmode=require`, trusting the system's roots.
    pub tls_ca_file: String,
    /// How often the shard map is read from the shards, so a reshard is
    /// followed without a restart.
    #[serde(with = "humantime_serde")]
    pub map_refresh: Duration,
    /// The most replay lag a shard's replica may have to answer reads as
    /// if it were the primary; checked twice per this long. Must be shorter
    /// than `writes.guard_ttl`.
    #[serde(with = "humantime_serde")]
    pub replica_max_lag: Duration,
    /// Whether cache fills read a replica within `replica_max_lag` before
    /// the primary. false: replicas answer only while the primary cannot.
    pub read_from_replicas: bool,
    pub shards: Vec<ShardSection>,
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ShardSection {
    pub name: String,
    pub url: String,
    /// A file holding the password, instead of putting it in `url`.
    #[serde(default)]
    pub password_file: String,
    /// An environment variable holding the password.
    #[serde(default)]
    pub password_env: String,
    /// Connection strings of the shard's streaming replicas (same user and
    /// password), which may answer reads; writes go to `url` only.
    #[serde(default)]
    pub replicas: Vec<String>,
}

impl ShardSection {
    /// A shard whose password, if any, is in its URL.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> ShardSection {
        ShardSection {
            name: name.into(),
            url: url.into(),
            password_file: String::new(),
            password_env: String::new(),
            replicas: Vec::new(),
        }
    }
}

/// Prints the URL without its password.
impl std::fmt::Debug for ShardSection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardSection")
            .field("name", &self.name)
            .field("url", &strata_shard_router::redact_url(&self.url))
            .field("replicas", &self.replicas.iter().map(|u| strata_shard_router::redact_url(u)).collect::<Vec<_>>())
            .finish()
    }
}

impl Default for ServerSection {
    fn default() -> Self {
        ServerSection {
            grpc_addr: "127.0.0.1:50051".into(),
            metrics_addr: "127.0.0.1:9090".into(),
            feast_http_addr: "127.0.0.1:6566".into(),
            default_deadline: Duration::from_secs(1),
            max_deadline: Duration::from_secs(30),
            max_in_flight: 256,
            drain_timeout: Duration::from_secs(10),
            max_connections: 1_024,
            max_concurrent_streams: 128,
            keepalive_interval: Duration::from_secs(30),
            keepalive_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(40),
            reflection: true,
        }
    }
}

impl Default for LimitsSection {
    fn default() -> Self {
        let limits = Limits::default();
        LimitsSection {
            max_keys_per_request: limits.max_keys_per_request,
            max_key_bytes: limits.max_key_bytes,
            max_rows_per_write: limits.max_rows_per_write,
            max_value_bytes: limits.max_value_bytes,
            max_request_bytes: 4 << 20,
            max_response_bytes: 4 << 20,
            max_future_event_time: limits.max_future_event_time,
        }
    }
}

impl Default for L1Section {
    fn default() -> Self {
        L1Section { max_bytes: 256 * 1024 * 1024, max_stale: Duration::from_secs(300) }
    }
}

impl Default for RedisSection {
    fn default() -> Self {
        RedisSection {
            nodes: Vec::new(),
            command_timeout: Duration::from_millis(250),
            connect_timeout: Duration::from_secs(2),
            key_prefix: "strata:".into(),
            username: String::new(),
            password: String::new(),
            password_file: String::new(),
            tls: false,
            tls_ca_file: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
        }
    }
}

impl Default for PostgresSection {
    fn default() -> Self {
        let pool = PoolOptions::default();
        PostgresSection {
            max_connections_per_shard: pool.max_connections,
            connect_timeout: pool.connect_timeout,
            tls_ca_file: String::new(),
            map_refresh: Duration::from_secs(1),
            replica_max_lag: pool.replicas.max_lag,
            read_from_replicas: pool.replicas.prefer,
            shards: Vec::new(),
        }
    }
}

/// The longest `server.max_deadline` and `server.drain_timeout` accepted:
/// a feature lookup that may take longer is a misconfiguration (and
/// far-future instants overflow).
const MAX_DEADLINE_LIMIT: Duration = Duration::from_secs(3600);
/// The largest `server.max_in_flight` accepted.
const MAX_IN_FLIGHT_LIMIT: usize = 1_000_000;
/// The longest `l1.max_stale` accepted.
const MAX_STALE_LIMIT: Duration = Duration::from_secs(7 * 86_400);

/// How long a request may take: its client's `grpc-timeout`, else
/// `default`, and never more than `max`.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    pub default: Duration,
    pub max: Duration,
}

/// HTTP/2 and connection limits of the gRPC listener (see
/// [`ServerSection`]).
#[derive(Clone, Copy, Debug)]
pub struct Transport {
    pub max_connections: usize,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub request_timeout: Duration,
}

/// The sections of the configuration file, as they appear after the
/// `STRATA_` prefix of an environment variable.
const SECTIONS: &[&str] = &[
    "server",
    "limits",
    "l1",
    "redis",
    "postgres",
    "stampede",
    "writes",
    "hot_keys",
    "breaker",
    "retry",
    "rate_limits",
    "tls",
    "auth",
];

/// Whether an environment variable (its name after `STRATA_`) is meant as
/// a setting: `SECTION__NAME`, for a section of the file. A misspelt name
/// inside a section still stops start-up, naming it.
fn is_setting_variable(key: &str) -> bool {
    key.split_once("__").is_some_and(|(section, _)| SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section)))
}

/// The validated configuration the server runs with.
#[derive(Clone, Debug)]
pub struct Config {
    pub transport: Transport,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
    pub grpc_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub feast_http_addr: Option<SocketAddr>,
    pub deadlines: Deadlines,
    pub max_in_flight: usize,
    pub drain_timeout: Duration,
    pub rate_limits: RateLimits,
    pub limits: Limits,
    pub l1_max_bytes: u64,
    pub l1_max_stale: Duration,
    pub redis: L2Config,
    pub pool: PoolOptions,
    pub shards: Vec<ShardConfig>,
    pub map_refresh: Duration,
    pub protection: Protection,
    pub writes: WritePolicy,
    pub hot_keys: HotKeys,
    pub registry: Arc<Registry>,
    pub tls: Option<TlsSettings>,
    pub auth: Arc<Authenticator>,
    pub reflection: bool,
}

/// TLS as configured (see [`TlsSection`]).
#[derive(Clone, Debug)]
pub struct TlsSettings {
    pub files: TlsFiles,
    pub reload_every: Duration,
    pub metrics: bool,
}

impl FileConfig {
    /// Reads the files in order (a later file overrides an earlier one;
    /// a list such as `redis.nodes` is replaced whole), then the `STRATA_*`
    /// environment variables.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<FileConfig> {
        let mut figment = Figment::new();
        for path in paths {
            let path = path.as_ref();
            if !path.is_file() {
                bail!("config file {} does not exist", path.display());
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        // Only variables that name a setting: STRATA_ADDR (the CLI's) and
        // others of the prefix are not the server's business.
        figment = figment.merge(Env::prefixed(ENV_PREFIX).filter(|key| is_setting_variable(key.as_str())).split("__"));
        figment.extract().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    /// Reads a configuration from TOML text alone (tests, tools).
    pub fn from_toml(text: &str) -> Result<FileConfig> {
        Figment::new().merge(Toml::string(text)).extract().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))
    }

    pub fn validate(self) -> Result<Config> {
        let FileConfig {
            server,
            limits,
            l1,
            redis,
            postgres,
            stampede,
            writes,
            hot_keys,
            breaker,
            retry,
            rate_limits,
            tls,
            auth,
            entities,
            views,
            feature_services,
        } = self;
        let ServerSection {
            grpc_addr,
            metrics_addr,
            feast_http_addr,
            default_deadline,
            max_deadline,
            max_in_flight,
            drain_timeout,
            max_connections,
            max_concurrent_streams,
            keepalive_interval,
            keepalive_timeout,
            request_timeout,
            reflection,
        } = server;
        let grpc_addr =
            grpc_addr.parse().with_context(|| format!("server.grpc_addr: {grpc_addr:?} is not an address"))?;
        let metrics_addr =
            metrics_addr.parse().with_context(|| format!("server.metrics_addr: {metrics_addr:?} is not an address"))?;
        let feast_http_addr = match feast_http_addr.trim() {
            "" => None,
            addr => Some(
                addr.parse()
                    .with_context(|| format!("server.feast_http_addr: {feast_http_addr:?} is not an address"))?,
            ),
        };

        for (name, value) in [
            ("server.default_deadline", default_deadline),
            ("server.max_deadline", max_deadline),
            ("server.drain_timeout", drain_timeout),
        ] {
            if value.is_zero() {
                bail!("{name} must be greater than zero");
            }
        }
        for (name, value) in [("server.max_deadline", max_deadline), ("server.drain_timeout", drain_timeout)] {
            if value > MAX_DEADLINE_LIMIT {
                bail!("{name} ({value:?}) is longer than {MAX_DEADLINE_LIMIT:?}");
            }
        }
        if default_deadline > max_deadline {
            bail!(
                "server.default_deadline ({default_deadline:?}) is longer than server.max_deadline ({max_deadline:?})"
            );
        }
        if max_in_flight == 0 || max_in_flight > MAX_IN_FLIGHT_LIMIT {
            bail!("server.max_in_flight must be between 1 and {MAX_IN_FLIGHT_LIMIT}, not {max_in_flight}");
        }
        if max_connections == 0 || max_connections > MAX_IN_FLIGHT_LIMIT {
            bail!("server.max_connections must be between 1 and {MAX_IN_FLIGHT_LIMIT}, not {max_connections}");
        }
        if max_concurrent_streams == 0 {
            bail!("server.max_concurrent_streams must be greater than zero");
        }
        for (name, value) in
            [("server.keepalive_interval", keepalive_interval), ("server.keepalive_timeout", keepalive_timeout)]
        {
            if value.is_zero() || value > MAX_DEADLINE_LIMIT {
                bail!("{name} must be between 0 and {MAX_DEADLINE_LIMIT:?}, not {value:?}");
            }
        }
        if request_timeout <= max_deadline || request_timeout > MAX_DEADLINE_LIMIT * 2 {
            bail!(
                "server.request_timeout ({request_timeout:?}) must be longer than server.max_deadline ({max_deadline:?}) \
                 and at most {:?}",
                MAX_DEADLINE_LIMIT * 2
            );
        }

        let BreakerSection { failures, open_for } = breaker;
        if failures == 0 {
            bail!("breaker.failures must be greater than zero");
        }
        if open_for.is_zero() {
            bail!("breaker.open_for must be greater than zero");
        }
        let breaker = BreakerConfig { failures, open_for };

        let RetrySection { attempts, base_delay, max_delay } = retry;
        if attempts == 0 {
            bail!("retry.attempts must be at least 1 (1 means no retries)");
        }
        if base_delay > max_delay {
            bail!("retry.base_delay ({base_delay:?}) is longer than retry.max_delay ({max_delay:?})");
        }

        let RateLimitsSection { per_second, burst, clients } = rate_limits;
        let mut ids = std::collections::HashSet::new();
        let mut client_limits = Vec::with_capacity(clients.len());
        for ClientLimitSection { id, per_second, burst } in clients {
            if id.is_empty() {
                bail!("rate_limits.clients: an id must not be empty");
            }
            if !ids.insert(id.clone()) {
                bail!("rate_limits.clients: id {id:?} is listed twice");
            }
            client_limits.push(ClientLimit { id, per_second, burst });
        }
        let rate_limits = RateLimits { per_second, burst, clients: client_limits };

        let LimitsSection {
            max_keys_per_request,
            max_key_bytes,
            max_rows_per_write,
            max_value_bytes,
            max_request_bytes,
            max_response_bytes,
            max_future_event_time,
        } = limits;
        for (name, value) in [
            ("limits.max_keys_per_request", max_keys_per_request),
            ("limits.max_key_bytes", max_key_bytes),
            ("limits.max_rows_per_write", max_rows_per_write),
            ("limits.max_value_bytes", max_value_bytes),
            ("limits.max_request_bytes", max_request_bytes),
            ("limits.max_response_bytes", max_response_bytes),
        ] {
            if value == 0 {
                bail!("{name} must be greater than zero");
            }
        }
        // Beyond this, one request could not be held in memory alongside others.
        const MAX_MESSAGE_LIMIT: usize = 1 << 30;
        for (name, value) in [
            ("limits.max_request_bytes", max_request_bytes),
            ("limits.max_response_bytes", max_response_bytes),
            ("limits.max_value_bytes", max_value_bytes),
        ] {
            if value > MAX_MESSAGE_LIMIT {
                bail!("{name} ({value}) is over {MAX_MESSAGE_LIMIT}");
            }
        }
        if max_value_bytes > max_request_bytes {
            bail!("limits.max_value_bytes ({max_value_bytes}) is over limits.max_request_bytes ({max_request_bytes})");
        }
        if max_future_event_time > Duration::from_secs(366 * 86_400) {
            bail!("limits.max_future_event_time ({max_future_event_time:?}) is longer than a year");
        }

        let L1Section { max_bytes, max_stale } = l1;
        if max_stale > MAX_STALE_LIMIT {
            bail!("l1.max_stale ({max_stale:?}) is longer than {MAX_STALE_LIMIT:?}");
        }

        let RedisSection {
            nodes,
            command_timeout,
            connect_timeout,
            key_prefix,
            username,
            password,
            password_file,
            tls: redis_tls,
            tls_ca_file: redis_ca,
            tls_cert_file: redis_cert,
            tls_key_file: redis_key,
        } = redis;
        let redis_password = secret("redis.password", password, &password_file, "")?;
        let redis_tls = redis_tls_settings(redis_tls, &redis_ca, &redis_cert, &redis_key)?;
        // Strata puts its own hash tag right after the prefix; a brace in
        // the prefix would make the prefix the tag, and every key one slot.
        if key_prefix.contains(['{', '}']) {
            bail!("redis.key_prefix must not contain '{{' or '}}' (Strata chooses the hash tag), not {key_prefix:?}");
        }
        if nodes.is_empty() {
            bail!("redis.nodes: at least one node of the Redis Cluster is needed");
        }
        for node in &nodes {
            if node.rsplit_once(':').is_none_or(|(_, port)| port.parse::<u16>().is_err()) {
                bail!("redis.nodes: {node:?} is not host:port");
            }
        }

        let PostgresSection {
            max_connections_per_shard,
            connect_timeout: pg_connect_timeout,
            tls_ca_file,
            map_refresh,
            replica_max_lag,
            read_from_replicas,
            shards,
        } = postgres;
        if map_refresh.is_zero() {
            bail!("postgres.map_refresh must be greater than zero");
        }
        if replica_max_lag.is_zero() || replica_max_lag >= writes.guard_ttl {
            // A cache fill from a replica must not be able to bring back a
            // value older than a deletion whose guard has expired.
            bail!(
                "postgres.replica_max_lag ({replica_max_lag:?}) must be greater than zero and shorter than \
                 writes.guard_ttl ({:?})",
                writes.guard_ttl
            );
        }
        if shards.is_empty() {
            bail!("postgres.shards: at least one shard is needed");
        }
        if max_connections_per_shard == 0 {
            bail!("postgres.max_connections_per_shard must be greater than zero");
        }
        let mut names = std::collections::HashSet::new();
        for shard in &shards {
            if !names.insert(shard.name.as_str()) {
                bail!("postgres.shards: name {:?} is used twice", shard.name);
            }
        }
        let needs_tls = shards
            .iter()
            .flat_map(|s| std::iter::once(&s.url).chain(&s.replicas))
            .any(|url| tokio_postgres_ssl_mode(url).is_some_and(|mode| mode == "require"));
        let postgres_tls = match (tls_ca_file.trim(), needs_tls) {
            ("", false) => None,
            (ca, _) => Some(Arc::new(client_tls("postgres.tls_ca_file", (!ca.is_empty()).then_some(ca))?)),
        };
        let mut shard_configs = Vec::with_capacity(shards.len());
        for ShardSection { name, url, password_file, password_env, replicas } in shards {
            let password = secret(&format!("postgres.shards {name:?}"), String::new(), &password_file, &password_env)?;
            shard_configs.push(ShardConfig { name, url, password, replicas });
        }

        let StampedeSection { enabled, lease_ttl, refresh_queue, refresh_concurrency } = stampede;
        for (name, value) in
            [("stampede.refresh_queue", refresh_queue), ("stampede.refresh_concurrency", refresh_concurrency)]
        {
            if value == 0 {
                bail!("{name} must be greater than zero");
            }
        }
        if lease_ttl.is_zero() {
            bail!("stampede.lease_ttl must be greater than zero");
        }

        let WritesSection { guard_ttl } = writes;
        if guard_ttl.is_zero() {
            bail!("writes.guard_ttl must be greater than zero");
        }

        let HotKeysSection { sample_rate, keep } = hot_keys;
        if !(0.0..=1.0).contains(&sample_rate) {
            bail!("hot_keys.sample_rate must be between 0 and 1, not {sample_rate}");
        }
        if keep == 0 {
            bail!("hot_keys.keep must be greater than zero");
        }

        if views.is_empty() {
            bail!("views: no feature views are declared");
        }
        let registry = Registry::with(entities, views, feature_services).context("the registry")?;
        let tls = tls_settings(tls)?;
        let auth = authenticator(auth, &registry, tls.as_ref().is_some_and(|t| t.files.client_ca.is_some()))?;

        Ok(Config {
            grpc_addr,
            metrics_addr,
            feast_http_addr,
            deadlines: Deadlines { default: default_deadline, max: max_deadline },
            max_in_flight,
            drain_timeout,
            rate_limits,
            l1_max_stale: max_stale,
            limits: Limits {
                max_keys_per_request,
                max_key_bytes,
                max_rows_per_write,
                max_value_bytes,
                max_future_event_time,
            },
            max_request_bytes,
            max_response_bytes,
            transport: Transport {
                max_connections,
                max_concurrent_streams,
                keepalive_interval,
                keepalive_timeout,
                request_timeout,
            },
            l1_max_bytes: max_bytes,
            hot_keys: HotKeys { sample_rate, keep },
            writes: WritePolicy { channel: format!("{key_prefix}invalidations"), guard_ttl },
            redis: L2Config {
                nodes,
                command_timeout,
                connect_timeout,
                key_prefix,
                breaker,
                username: (!username.is_empty()).then_some(username),
                password: redis_password,
                tls: redis_tls,
            },
            pool: PoolOptions {
                max_connections: max_connections_per_shard,
                connect_timeout: pg_connect_timeout,
                breaker,
                retry: RetryPolicy { attempts, base: base_delay, cap: max_delay },
                tls: postgres_tls,
                replicas: ReplicaOptions { max_lag: replica_max_lag, prefer: read_from_replicas },
            },
            shards: shard_configs,
            map_refresh,
            protection: Protection { enabled, lease_ttl, refresh_queue, refresh_concurrency },
            registry: Arc::new(registry),
            tls,
            auth: Arc::new(auth),
            reflection,
        })
    }
}

fn tls_settings(tls: TlsSection) -> Result<Option<TlsSettings>> {
    let TlsSection { cert_file, key_file, client_ca_file, reload_every, metrics } = tls;
    let set = |s: &str| !s.trim().is_empty();
    match (set(&cert_file), set(&key_file)) {
        (false, false) => {
            if set(&client_ca_file) || metrics {
                bail!("tls.client_ca_file and tls.metrics need tls.cert_file and tls.key_file");
            }
            return Ok(None);
        }
        (true, false) | (false, true) => bail!("tls.cert_file and tls.key_file are set together or not at all"),
        (true, true) => {}
    }
    if reload_every < Duration::from_millis(10) || reload_every > MAX_DEADLINE_LIMIT {
        bail!("tls.reload_every must be between 10ms and {MAX_DEADLINE_LIMIT:?}, not {reload_every:?}");
    }
    let client_ca = set(&client_ca_file).then(|| client_ca_file.into());
    Ok(Some(TlsSettings {
        files: TlsFiles { cert: cert_file.into(), key: key_file.into(), client_ca },
        reload_every,
        metrics,
    }))
}

fn authenticator(auth: AuthSection, registry: &Registry, mutual_tls: bool) -> Result<Authenticator> {
    let AuthSection { enabled, principals } = auth;
    if !enabled {
        return Ok(Authenticator::open());
    }
    if principals.is_empty() {
        bail!("auth.principals: authentication is on, so at least one principal is needed");
    }
    let mut names = std::collections::HashSet::new();
    let mut credentials = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(principals.len());
    for p in principals {
        let PrincipalSection { name, token_sha256, certificate_names, read, write, per_second, burst } = p;
        if name.is_empty() || !names.insert(name.clone()) {
            bail!("auth.principals: every principal needs a name of its own ({name:?})");
        }
        let mut creds = Vec::new();
        for hash in &token_sha256 {
            let bytes = parse_sha256(hash).with_context(|| {
                format!(
                    "auth.principals {name:?}: token_sha256 must be 64 hex digits, the SHA-256 of a token \
                     (strata auth hash-token)"
                )
            })?;
            if !credentials.insert(bytes.to_vec()) {
                bail!("auth.principals {name:?}: a token hash is listed twice");
            }
            creds.push(Credential::TokenHash(bytes));
        }
        if !certificate_names.is_empty() && !mutual_tls {
            bail!("auth.principals {name:?}: certificate_names need mutual TLS (tls.client_ca_file)");
        }
        for cert in &certificate_names {
            if !credentials.insert(format!("cert:{cert}").into_bytes()) {
                bail!("auth.principals {name:?}: certificate name {cert:?} is listed twice");
            }
            creds.push(Credential::CertificateName(cert.clone()));
        }
        if creds.is_empty() {
            bail!("auth.principals {name:?}: needs a token_sha256 or a certificate name");
        }
        for (field, views) in [("read", &read), ("write", &write)] {
            if let Some(unknown) = views.iter().find(|v| *v != "*" && registry.get(v).is_none()) {
                bail!("auth.principals {name:?}: {field} names view {unknown:?}, which is not declared");
            }
        }
        let principal =
            Principal { name, read: Views::from_list(&read), write: Views::from_list(&write), per_second, burst };
        out.push((principal, creds));
    }
    Ok(Authenticator::new(out))
}

/// A password from the setting itself, a file or an environment variable
/// (at most one of them); `None` if none is set. Errors name the setting,
/// the file or the variable, never the value.
fn secret(setting: &str, value: String, file: &str, env: &str) -> Result<Option<String>> {
    let given = [!value.is_empty(), !file.trim().is_empty(), !env.trim().is_empty()];
    if given.iter().filter(|g| **g).count() > 1 {
        bail!("{setting}: give the password one way (the setting, a file or a variable), not several");
    }
    if !value.is_empty() {
        return Ok(Some(value));
    }
    if !file.trim().is_empty() {
        let text = std::fs::read_to_string(file.trim())
            .with_context(|| format!("{setting}: cannot read the password file {}", file.trim()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    if !env.trim().is_empty() {
        let text =
            std::env::var(env.trim()).with_context(|| format!("{setting}: the variable {} is not set", env.trim()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(None)
}

/// The `sslmode` of a connection string, if it names one.
fn tokio_postgres_ssl_mode(url: &str) -> Option<String> {
    url.split([' ', '?', '&'])
        .find_map(|part| part.strip_prefix("sslmode="))
        .map(|mode| mode.trim_matches('\'').to_owned())
}

/// Roots from `ca` (PEM), else the system's.
fn roots(setting: &str, ca: Option<&str>) -> Result<rustls::RootCertStore> {
    match ca {
        Some(path) => crate::tls::roots(Path::new(path)).with_context(|| format!("{setting}: {path}")),
        None => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
            Ok(roots)
        }
    }
}

/// A TLS client configuration trusting `ca`, else the system's roots.
fn client_tls(setting: &str, ca: Option<&str>) -> Result<rustls::ClientConfig> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .context("no TLS protocol version available")?
        .with_root_certificates(roots(setting, ca)?)
        .with_no_client_auth())
}

fn redis_tls_settings(on: bool, ca: &str, cert: &str, key: &str) -> Result<Option<strata_cache_tiers::RedisTls>> {
    use rustls::pki_types::pem::PemObject as _;
    let set = |s: &str| !s.trim().is_empty();
    if !on {
        if set(ca) || set(cert) || set(key) {
            bail!("redis.tls_ca_file, tls_cert_file and tls_key_file need redis.tls = true");
        }
        return Ok(None);
    }
    if set(cert) != set(key) {
        bail!("redis.tls_cert_file and redis.tls_key_file are set together or not at all");
    }
    let roots = roots("redis.tls_ca_file", set(ca).then_some(ca.trim()))?;
    let identity = if set(cert) {
        let chain = crate::tls::certificates(Path::new(cert.trim())).context("redis.tls_cert_file")?;
        let key = rustls::pki_types::PrivateKeyDer::from_pem_file(key.trim())
            .with_context(|| format!("redis.tls_key_file: {} holds no PEM private key", key.trim()))?;
        Some((chain, Arc::new(key)))
    } else {
        None
    };
    Ok(Some(strata_cache_tiers::RedisTls { roots: Arc::new(roots), identity }))
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 || !hex.is_ascii() {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_variables_that_name_a_section_are_read_as_settings() {
        use super::is_setting_variable;
        assert!(is_setting_variable("SERVER__GRPC_ADDR"));
        assert!(is_setting_variable("limits__max_key_bytes"));
        assert!(is_setting_variable("SERVER__GRPC_ADR"), "a typo inside a section still fails start-up");
        for other in ["ADDR", "LOG", "PG_BIN", "SERVERX__A", "__A"] {
            assert!(!is_setting_variable(other), "{other}");
        }
    }

    use super::*;

    const SHIPPED: &str = include_str!("../../../config/strata.toml");

    #[test]
    fn the_shipped_config_is_valid() {
        let config = FileConfig::from_toml(SHIPPED).unwrap().validate().unwrap();
        assert!(config.registry.get("user_features").is_some());
        assert_eq!(config.grpc_addr.port(), 50051);
    }

    #[test]
    fn a_later_file_overrides_an_earlier_one_and_replaces_lists_whole() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let config = FileConfig::load(&[dir.join("strata.toml"), dir.join("docker.toml")]).unwrap().validate().unwrap();
        assert_eq!(config.redis.nodes, ["redis-1:6379", "redis-2:6379", "redis-3:6379"]);
        let shards: Vec<&str> = config.shards.iter().map(|s| s.url.as_str()).collect();
        assert_eq!(
            shards,
            [
                "host=postgres-0 port=5432 user=strata dbname=strata",
                "host=postgres-1 port=5432 user=strata dbname=strata"
            ]
        );
        assert_eq!(config.grpc_addr.to_string(), "0.0.0.0:50051");
        assert!(config.registry.get("user_features").is_some(), "views come from the base file");
    }

    /// Every setting (a dotted path) with its default as TOML writes it.
    fn settings() -> Vec<(String, String)> {
        fn walk(prefix: &str, value: &serde_json::Value, out: &mut Vec<(String, String)>) {
            match value {
                serde_json::Value::Object(fields) => {
                    for (name, value) in fields {
                        let path = if prefix.is_empty() { name.clone() } else { format!("{prefix}.{name}") };
                        walk(&path, value, out);
                    }
                }
                other => out.push((prefix.to_owned(), other.to_string())),
            }
        }
        let mut out = Vec::new();
        walk("", &serde_json::to_value(FileConfig::default()).unwrap(), &mut out);
        out
    }

    /// Settings documented apart from the defaults: list entries.
    const LIST_ENTRIES: &[&str] = &[
        "rate_limits.clients[].id",
        "rate_limits.clients[].per_second",
        "rate_limits.clients[].burst",
        "postgres.shards[].name",
        "postgres.shards[].url",
        "postgres.shards[].password_file",
        "postgres.shards[].password_env",
        "postgres.shards[].replicas",
        "auth.principals[].name",
        "auth.principals[].token_sha256",
        "auth.principals[].certificate_names",
        "auth.principals[].read",
        "auth.principals[].write",
        "auth.principals[].per_second",
        "auth.principals[].burst",
    ];

    #[test]
    fn the_configuration_reference_lists_every_setting_with_its_default_and_variable() {
        const REFERENCE: &str = include_str!("../../../CONFIGURATION.md");
        let settings = settings();
        for (path, default) in &settings {
            let variable = format!("{ENV_PREFIX}{}", path.to_uppercase().replace('.', "__"));
            let row = format!("| `{path}` | `{default}` | `{variable}` |");
            assert!(REFERENCE.contains(&row), "CONFIGURATION.md has no row beginning {row}");
        }
        for line in REFERENCE.lines().filter(|l| l.starts_with("| `")) {
            let path = line.split('`').nth(1).unwrap();
            assert!(
                settings.iter().any(|(p, _)| p == path)
                    || LIST_ENTRIES.contains(&path)
                    || ["views", "entities", "feature_services"].iter().any(|list| path.starts_with(list)),
                "CONFIGURATION.md documents {path}, which is not a setting"
            );
        }
        for entry in LIST_ENTRIES {
            assert!(REFERENCE.contains(&format!("| `{entry}` |")), "CONFIGURATION.md lacks {entry}");
        }
    }

    #[test]
    fn every_section_of_the_file_can_be_set_from_the_environment() {
        let sections: Vec<String> = settings().iter().map(|(p, _)| p.split('.').next().unwrap().to_owned()).collect();
        for section in &sections {
            assert!(SECTIONS.contains(&section.as_str()), "{section} is missing from SECTIONS");
        }
        for section in SECTIONS {
            assert!(sections.iter().any(|s| s == section), "{section} is not a section");
        }
    }

    const TOKEN_HASH: &str = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08";

    fn with(extra: &str) -> Result<Config> {
        FileConfig::from_toml(&format!("{SHIPPED}\n{extra}"))?.validate()
    }

    #[test]
    fn principals_are_checked_and_name_what_is_wrong() {
        let principal =
            |fields: &str| format!("[auth]\nenabled = true\n[[auth.principals]]\nname = \"ranker\"\n{fields}\n");
        let config =
            with(&principal(&format!("token_sha256 = [\"{TOKEN_HASH}\"]\nread = [\"user_features\"]\nper_second = 5")))
                .unwrap();
        assert!(config.auth.required());
        let access = config.auth.authenticate(Some(b"Bearer test"), None).unwrap();
        assert!(access.may(crate::auth::Operation::Read, "user_features"));
        assert!(!access.may(crate::auth::Operation::Write, "user_features"));
        for (fields, error) in [
            ("token_sha256 = [\"abc\"]", "token_sha256 must be 64 hex digits"),
            ("", "needs a token_sha256 or a certificate name"),
            (&format!("token_sha256 = [\"{TOKEN_HASH}\"]\nread = [\"nope\"]"), "read names view \"nope\""),
            ("certificate_names = [\"ranker.svc\"]", "certificate_names need mutual TLS"),
        ] {
            let err = format!("{:#}", with(&principal(fields)).unwrap_err());
            assert!(err.contains(error), "{fields}: {err}");
        }
        let err = with("[auth]\nenabled = true\n").unwrap_err().to_string();
        assert!(err.contains("at least one principal"), "{err}");
        assert!(!with("").unwrap().auth.required(), "off by default");
    }

    #[test]
    fn tls_files_come_in_pairs() {
        assert!(with("").unwrap().tls.is_none());
        let err = with("[tls]\ncert_file = \"c.pem\"\n").unwrap_err().to_string();
        assert!(err.contains("tls.cert_file and tls.key_file"), "{err}");
        let err = with("[tls]\nclient_ca_file = \"ca.pem\"\n").unwrap_err().to_string();
        assert!(err.contains("need tls.cert_file"), "{err}");
        let tls = with("[tls]\ncert_file = \"c.pem\"\nkey_file = \"k.pem\"\nclient_ca_file = \"ca.pem\"\n")
            .unwrap()
            .tls
            .unwrap();
        assert_eq!(tls.files.client_ca.as_deref(), Some(std::path::Path::new("ca.pem")));
    }

    #[test]
    fn no_secret_shows_in_the_configuration_s_debug_output() {
        let config = with(&format!(
            "[auth]\nenabled = true\n[[auth.principals]]\nname = \"ranker\"\ntoken_sha256 = [\"{TOKEN_HASH}\"]\nread = [\"*\"]\n"
        ))
        .unwrap();
        let mut file = FileConfig::from_toml(SHIPPED).unwrap();
        file.postgres.shards[0].url = "postgres://strata:pl4nted@db/strata".into();
        let file_printed = format!("{file:?}");
        let printed = format!("{config:?} {file_printed} {:?}", file.validate().unwrap());
        assert!(!printed.contains("pl4nted") && !printed.contains(TOKEN_HASH), "{printed}");
    }

    #[test]
    fn a_missing_config_file_is_named() {
        let err = FileConfig::load(&["/nonexistent/strata.toml"]).unwrap_err().to_string();
        assert_eq!(err, "config file /nonexistent/strata.toml does not exist");
    }

    #[test]
    fn a_misspelt_setting_is_refused_with_its_name() {
        let err = FileConfig::from_toml("[server]\ngrpc_adr = \"127.0.0.1:1\"\n").unwrap_err().to_string();
        assert!(err.contains("grpc_adr"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_setting() {
        let err = FileConfig::from_toml(&SHIPPED.replace("max_key_bytes = 256", "max_key_bytes = 0"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert_eq!(err, "limits.max_key_bytes must be greater than zero");
        let err = FileConfig::from_toml("[redis]\ncommand_timeout = \"soon\"\n").unwrap_err().to_string();
        assert!(err.contains("command_timeout"), "{err}");
    }

    #[test]
    fn failure_settings_are_checked_and_named() {
        let with = |extra: &str| {
            let text = SHIPPED.replacen("[server]\n", &format!("[server]\n{extra}\n"), 1);
            let text = text.replace("default_deadline = \"1s\"\n", "").replace("max_in_flight = 256\n", "");
            FileConfig::from_toml(&text).and_then(FileConfig::validate).map(drop).map_err(|e| e.to_string())
        };
        assert_eq!(with(""), Ok(()));
        let err = with("max_in_flight = 0").unwrap_err();
        assert_eq!(err, "server.max_in_flight must be between 1 and 1000000, not 0");
        let err = with("default_deadline = \"1m\"").unwrap_err();
        assert!(err.starts_with("server.default_deadline (60s) is longer than server.max_deadline"), "{err}");
        let config = FileConfig::from_toml(&SHIPPED.replace("failures = 5", "failures = 0")).unwrap();
        assert_eq!(config.validate().unwrap_err().to_string(), "breaker.failures must be greater than zero");
        let config =
            FileConfig::from_toml(&SHIPPED.replace("max_deadline = \"30s\"", "max_deadline = \"1000h\"")).unwrap();
        assert!(config.validate().unwrap_err().to_string().starts_with("server.max_deadline"));
        let config = FileConfig::from_toml(&SHIPPED.replace(
            "per_second = 0\nburst = 0",
            "per_second = 0\nburst = 0\nclients = [{ id = \"a\", per_second = 1 }, { id = \"a\", per_second = 2 }]",
        ))
        .unwrap();
        assert_eq!(config.validate().unwrap_err().to_string(), "rate_limits.clients: id \"a\" is listed twice");
    }
}
