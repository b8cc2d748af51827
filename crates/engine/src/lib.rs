//! The read and write paths across the three tiers, on whole batches, with
//! the stampede protections.
//!
//! Read: L1 (moka) → misses to L2 (Redis, one pipeline) → misses to L3
//! (PostgreSQL, one query per shard, shards in parallel); every miss fills
//! the tiers above it. With protection on:
//! - concurrent misses of a key in this process wait on one load (single
//!   flight, across overlapping batches);
//! - of many instances missing a key in Redis, the one holding the key's
//!   lease (`SET NX PX`) reads PostgreSQL; the others wait for its result in
//!   Redis;
//! - a hit past its soft expiry is served and reloaded once in the
//!   background (refresh-ahead), at L1 from the tiers below and at L2 from
//!   PostgreSQL under the lease;
//! - keys that do not exist are cached too (negative caching);
//! - every TTL is jittered.
//!
//! Write: PostgreSQL first (guarded by event time), then the Redis copy is
//! replaced through a compare-on-event-time function (so neither a late
//! write nor a late cache fill can put an older value over a newer one),
//! then this instance's L1 copy is dropped and every other instance is told
//! to drop its own (Redis pub/sub). An L1 fill by a load that began before
//! an invalidation is refused ([`strata_cache_tiers::Stamp`]).
//!
//! Failures: every call below L1 is cut at the request's deadline; Redis
//! and each shard sit behind circuit breakers (in their crates). A key
//! whose shard cannot answer is served from a stale L1 copy (kept for
//! `max_stale` past its TTL) or marked unavailable, and a key served from a
//! cache while its shard's breaker is not closed is marked stale: the batch
//! never fails as a whole.
//!
//! This crate is the engine every front end calls (Strata's gRPC API today;
//! Feast's HTTP and gRPC APIs next). It knows no wire format: nothing here
//! depends on tonic, prost or axum, and a front end turns its requests into
//! these calls and the answers (and errors) back into its own shapes. Test
//! hooks (a fill hook, injected cache-step failures) exist only with the
//! `test-hooks` feature, which the `strata` binary does not enable.
//!
//! - [`read`]: the read path (L1, single flight, stale-if-error).
//! - [`lower`]: L2 and L3 under leases, and cache fills.
//! - [`write`]: writes, deletes, and the cache step after them (also the
//!   bulk loader's guards and announcements).
//! - [`repair`]: putting right the caches of writes whose cache step failed.

#![forbid(unsafe_code)]

mod lower;
mod read;
mod repair;
mod write;

pub use write::{announce, announce_until, guard};

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

#[cfg(feature = "test-hooks")]
use futures::future::BoxFuture;
use rand::Rng;
use strata_cache_tiers::{Cached, L1Cache, L2Cache, L2Hit, RefreshQueue, SingleFlight, Stamp};
use strata_core::{EventTime, FeatureView, Lifetime, Row};
use strata_shard_router::ShardRouter;
use tokio::sync::mpsc;

/// Which tier answered a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    L1,
    L2,
    L3,
}

impl Source {
    pub fn label(self) -> &'static str {
        match self {
            Source::L1 => "l1",
            Source::L2 => "l2",
            Source::L3 => "l3",
        }
    }
}

/// The answer for one key.
#[derive(Clone, Debug, PartialEq)]
pub enum Served {
    Found {
        row: Arc<Row>,
        source: Source,
        /// Served from a cache while the key's shard could not be read:
        /// past its TTL (stale-if-error), or while the shard's breaker is
        /// not closed.
        stale: bool,
    },
    NotFound {
        source: Source,
    },
    /// No cache held the key and its shard could not be read.
    Unavailable,
}

impl Served {
    fn new(value: Cached, source: Source) -> Served {
        match value {
            Cached::Found(row) => Served::Found { row, source, stale: false },
            Cached::Missing => Served::NotFound { source },
        }
    }
}

/// The stampede protections, all on or all off (to measure them).
#[derive(Clone, Debug)]
pub struct Protection {
    pub enabled: bool,
    /// How long a Redis lease on a key lasts; also how long other instances
    /// wait for the lease holder's result before reading PostgreSQL
    /// themselves.
    pub lease_ttl: Duration,
    /// Refreshes waiting at most; more are dropped (and counted).
    pub refresh_queue: usize,
    /// Refresh batches reloading at once.
    pub refresh_concurrency: usize,
}

impl Default for Protection {
    fn default() -> Self {
        Protection { enabled: true, lease_ttl: Duration::from_secs(2), refresh_queue: 10_000, refresh_concurrency: 4 }
    }
}

/// How writes reach the caches.
#[derive(Clone, Debug)]
pub struct WritePolicy {
    /// The Redis pub/sub channel on which written keys are announced, so
    /// every instance drops its L1 copy.
    pub channel: String,
    /// How long Redis remembers the version of a write whose value it does
    /// not hold (a deletion, a bulk-loaded row), so that a cache fill that
    /// read PostgreSQL before the write cannot put the older value back.
    pub guard_ttl: Duration,
}

impl Default for WritePolicy {
    fn default() -> Self {
        WritePolicy { channel: "strata:invalidations".into(), guard_ttl: Duration::from_secs(30) }
    }
}

/// Sampling of reads, so `strata warm --top N` knows the most-read keys.
#[derive(Clone, Debug)]
pub struct HotKeys {
    /// Fraction of requests whose keys are counted (0 turns it off).
    pub sample_rate: f64,
    /// Keys kept per view, most read first.
    pub keep: usize,
}

impl Default for HotKeys {
    fn default() -> Self {
        HotKeys { sample_rate: 0.01, keep: 100_000 }
    }
}

/// Called between reading PostgreSQL and filling the caches, with the view
/// and the keys read. Only tests set one, to make a fill lose a race on
/// purpose.
#[cfg(feature = "test-hooks")]
pub type FillHook = Arc<dyn Fn(&str, &[&str]) -> BoxFuture<'static, ()> + Send + Sync>;

/// What loading one key below L1 gave.
#[derive(Clone, Debug)]
enum Loaded {
    Value {
        value: Cached,
        source: Source,
        /// How long the Redis entry it was read from stays fresh; `None`
        /// for a value read from PostgreSQL.
        l2_fresh_for: Option<Duration>,
        /// Read from a replica that may be behind (its primary could not
        /// answer): served stale, never cached.
        behind: bool,
    },
    /// The owning shard could not be read (shared with waiters, not cached).
    Unavailable,
}

impl Loaded {
    fn from_l2(hit: L2Hit) -> Loaded {
        Loaded::Value { value: hit.value, source: Source::L2, l2_fresh_for: Some(hit.fresh_for), behind: false }
    }

    /// A value PostgreSQL gave, from a replica that may be behind when
    /// `behind`.
    fn from_shard(value: Cached, behind: bool) -> Loaded {
        Loaded::Value { value, source: Source::L3, l2_fresh_for: None, behind }
    }
}

/// The three tiers of one server. Cheap to clone.
#[derive(Clone)]
pub struct Tiers {
    pub l1: L1Cache,
    /// Names this instance in its invalidation announcements.
    origin: u64,
    lower: Arc<Lower>,
    /// In-flight loads, with the stamp their leader took.
    flights: Arc<SingleFlight<(u32, String), (Loaded, Stamp)>>,
    refresh: RefreshQueue,
    /// Written keys whose cache step failed, to be put right in the
    /// background.
    repairs: mpsc::Sender<Repair>,
    /// Written keys whose shard did not answer in time (the write may or
    /// may not land): a queue of their own, so a flood of writes with tiny
    /// deadlines cannot crowd out the repairs of writes known to be in.
    unknown_repairs: mpsc::Sender<Repair>,
}

/// Written keys of a view whose Redis copy or announcement failed, each
/// with the version PostgreSQL must hold before the repair may copy it
/// (`EventTime::NEVER` when the write is known to be committed), and when.
type Repair = (Arc<FeatureView>, Vec<(String, EventTime)>, tokio::time::Instant);

/// Repairs waiting at most (batches of keys), per queue; more are dropped
/// and counted.
const REPAIR_QUEUE: usize = 1_024;
/// Repairs retrying at once, per queue, so one stuck batch does not hold up
/// the rest.
const REPAIRS_AT_ONCE: usize = 8;
/// How long a repair of a write whose shard did not answer waits for
/// PostgreSQL to show the write's version. A transaction cut off by its
/// deadline commits or rolls back within moments; after this, what
/// PostgreSQL holds is the truth, whether the write landed or not.
const UNKNOWN_SETTLES: Duration = Duration::from_secs(10);
/// The deadline of work nobody waits for (background reloads, repairs,
/// warming): long enough for a slow shard, short enough that a hung one
/// does not pile up tasks.
const BACKGROUND_BUDGET: Duration = Duration::from_secs(5);

/// Tasks the answers do not wait for (cache fills after a read), counted
/// so that a caller can wait until none is running.
#[derive(Default)]
struct Background {
    running: AtomicUsize,
    idle: tokio::sync::Notify,
}

/// One running background task; counted off when dropped, so a task that
/// panics is counted off too.
struct Running(Arc<Background>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Background {
    fn spawn(self: &Arc<Self>, task: impl Future<Output = ()> + Send + 'static) {
        self.running.fetch_add(1, Ordering::SeqCst);
        let running = Running(self.clone());
        tokio::spawn(async move {
            let _running = running;
            task.await;
        });
    }

    async fn idle(&self) {
        loop {
            let idle = self.idle.notified();
            tokio::pin!(idle);
            idle.as_mut().enable();
            if self.running.load(Ordering::SeqCst) == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// L2 and L3: everything below L1.
struct Lower {
    l2: L2Cache,
    shards: ShardRouter,
    protection: Protection,
    writes: WritePolicy,
    hot_keys: HotKeys,
    /// For scheduling L2 refreshes; set once the queue exists.
    refresh: OnceLock<RefreshQueue>,
    #[cfg(feature = "test-hooks")]
    fill_hook: OnceLock<FillHook>,
    background: Arc<Background>,
    /// Cache steps of writes still to fail on purpose (tests only).
    #[cfg(feature = "test-hooks")]
    failing_writes: AtomicUsize,
}

impl Lower {
    /// Whether this write's cache step is to fail on purpose (tests only).
    fn injected_failure(&self) -> bool {
        #[cfg(feature = "test-hooks")]
        return self.failing_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        #[cfg(not(feature = "test-hooks"))]
        false
    }

    /// Runs the fill hook, if a test set one.
    async fn fill_hook(&self, _view: &str, _keys: &[&str]) {
        #[cfg(feature = "test-hooks")]
        if let Some(hook) = self.fill_hook.get() {
            hook(_view, _keys).await;
        }
    }
}

/// A uniform sample in [0, 1) for jitter.
fn sample() -> f64 {
    rand::rng().random::<f64>()
}

impl Protection {
    /// The lifetime of an L1 copy of `loaded`. A copy of a Redis entry
    /// turns soft no later than the entry turns stale. Redis sees a hot key
    /// only when its L1 copies are refreshed, and reloads an entry only when
    /// a reader finds it stale: copies refreshed on their own schedule could
    /// come either side of the entry's stale window, the entry would expire,
    /// and the key would go to PostgreSQL, in the request path when the
    /// copies had expired meanwhile.
    fn l1_lifetime(&self, view: &FeatureView, value: &Cached, l2_fresh_for: Option<Duration>) -> Lifetime {
        let mut life = self.lifetime(view, value, view.l1_ttl);
        if let (Cached::Found(_), Some(fresh_for)) = (value, l2_fresh_for)
            && self.enabled
            // Stale already: this read has scheduled the entry's reload.
            && !fresh_for.is_zero()
        {
            life.soft = life.soft.min(fresh_for);
        }
        life
    }

    /// The lifetime of a value in a tier whose TTL for rows is `ttl`.
    fn lifetime(&self, view: &FeatureView, value: &Cached, ttl: Duration) -> Lifetime {
        match (self.enabled, value) {
            (false, _) => Lifetime::fixed(ttl),
            (true, Cached::Found(_)) => self.row_lifetime(view, ttl),
            // A negative entry is not refreshed ahead: it simply expires.
            (true, Cached::Missing) => Lifetime::jittered(view.negative_ttl, view.jitter, 1.0, sample()),
        }
    }

    /// The lifetime of a row in a tier whose TTL is `ttl`.
    fn row_lifetime(&self, view: &FeatureView, ttl: Duration) -> Lifetime {
        if self.enabled {
            Lifetime::jittered(ttl, view.jitter, view.refresh_ahead, sample())
        } else {
            Lifetime::fixed(ttl)
        }
    }

    /// Whether a value may be cached at all (negatives only with protection).
    fn cacheable(&self, value: &Cached) -> bool {
        self.enabled || matches!(value, Cached::Found(_))
    }
}

impl Tiers {
    pub fn new(
        l1: L1Cache,
        l2: L2Cache,
        shards: ShardRouter,
        protection: Protection,
        writes: WritePolicy,
        hot_keys: HotKeys,
    ) -> Tiers {
        let (capacity, concurrency) = (protection.refresh_queue, protection.refresh_concurrency);
        let lower = Arc::new(Lower {
            l2,
            shards,
            protection,
            writes,
            hot_keys,
            refresh: OnceLock::new(),
            #[cfg(feature = "test-hooks")]
            fill_hook: OnceLock::new(),
            background: Arc::default(),
            #[cfg(feature = "test-hooks")]
            failing_writes: AtomicUsize::new(0),
        });
        let refresh = RefreshQueue::start(l1.clone(), lower.clone(), capacity, concurrency);
        let _ = lower.refresh.set(refresh.clone());
        // Never 0, which announcements from outside any server carry.
        let origin = rand::rng().random_range(1..u64::MAX);
        let (repairs, queue) = mpsc::channel(REPAIR_QUEUE);
        tokio::spawn(repair::repair(lower.clone(), l1.clone(), origin, queue));
        let (unknown_repairs, unknown) = mpsc::channel(REPAIR_QUEUE);
        tokio::spawn(repair::repair(lower.clone(), l1.clone(), origin, unknown));
        Tiers { l1, origin, lower, flights: Arc::new(SingleFlight::default()), refresh, repairs, unknown_repairs }
    }

    /// Makes the cache step (Redis and the announcement) of the next `n`
    /// writes fail as if Redis were down. For tests of the repair.
    #[cfg(feature = "test-hooks")]
    pub fn fail_next_cache_steps(&self, n: usize) {
        self.lower.failing_writes.store(n, Ordering::SeqCst);
    }

    /// This instance's name in invalidation announcements.
    pub fn origin(&self) -> u64 {
        self.origin
    }

    pub fn l2(&self) -> &L2Cache {
        &self.lower.l2
    }

    pub fn shards(&self) -> &ShardRouter {
        &self.lower.shards
    }

    /// Returns once no cache fill started by a read is running: Redis then
    /// holds what every answered read loaded (unless it refused an older
    /// version or failed).
    pub async fn settle(&self) {
        self.lower.background.idle().await;
    }

    /// Sets the hook called between reading PostgreSQL and answering (the
    /// caches are filled after it; once, later calls are ignored). For
    /// tests only.
    #[cfg(feature = "test-hooks")]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.lower.fill_hook.set(hook);
    }
}

fn count_lookups(view: &FeatureView, tier: Source, hits: usize, misses: usize) {
    if hits > 0 {
        metrics::counter!("strata_cache_hits_total", "tier" => tier.label(), "view" => view.name.clone())
            .increment(hits as u64);
    }
    if misses > 0 {
        metrics::counter!("strata_cache_misses_total", "tier" => tier.label(), "view" => view.name.clone())
            .increment(misses as u64);
    }
}

fn count_negative_hits(view: &FeatureView, tier: Source, n: usize) {
    if n > 0 {
        metrics::counter!("strata_negative_hits_total", "view" => view.name.clone(), "tier" => tier.label())
            .increment(n as u64);
    }
}

fn count_leases(view: &FeatureView, acquired: usize, lost: usize) {
    for (outcome, n) in [("acquired", acquired), ("lost", lost)] {
        if n > 0 {
            metrics::counter!("strata_leases_total", "view" => view.name.clone(), "outcome" => outcome)
                .increment(n as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use strata_core::{FeatureSpec, FeatureType, FeatureViewSpec, Registry, Row};

    use super::*;

    /// An L1 copy of a Redis entry turns soft when the entry turns stale,
    /// if that comes first; nothing else changes its lifetime.
    #[test]
    fn an_l1_copy_turns_soft_no_later_than_its_redis_entry() {
        let mut spec = FeatureViewSpec::new("v", vec![FeatureSpec { name: "n".into(), ty: FeatureType::Int64 }]);
        spec.l1_ttl = Duration::from_secs(60);
        let registry = Registry::new(vec![spec]).unwrap();
        let view = registry.get("v").unwrap();
        let found =
            Cached::Found(Arc::new(Row { event_time: EventTime(1), values: vec![strata_core::Value::Int64(1)] }));
        let on = Protection::default();
        let soft = |p: &Protection, value: &Cached, fresh_for: Option<u64>| {
            p.l1_lifetime(view, value, fresh_for.map(Duration::from_secs)).soft.as_secs_f64()
        };
        // 60 s ± 10%, soft at 80% of it: 43.2–52.8 s.
        assert_eq!(soft(&on, &found, Some(5)), 5.0);
        let own = soft(&on, &found, None);
        assert!((43.2..=52.8).contains(&own), "{own}");
        let later = soft(&on, &found, Some(600));
        assert!((43.2..=52.8).contains(&later), "{later}");
        let stale = soft(&on, &found, Some(0));
        assert!((43.2..=52.8).contains(&stale), "an entry already stale is being reloaded: {stale}");
        // A negative entry is never refreshed ahead (soft is hard, 4.5–5.5 s
        // here), whatever its Redis entry says; nothing is without protection.
        let negative = on.l1_lifetime(view, &Cached::Missing, Some(Duration::from_secs(1)));
        assert!(negative.soft == negative.hard && negative.soft > Duration::from_secs(4), "{negative:?}");
        let off = Protection { enabled: false, ..Protection::default() };
        assert_eq!(soft(&off, &found, Some(5)), 60.0);
    }
}
