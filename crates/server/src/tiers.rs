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

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures::future::BoxFuture;
use rand::Rng;
use strata_cache_tiers::{
    Cached, L1Cache, L2Cache, L2Error, Put, RefreshQueue, RefreshTier, Reloader, SingleFlight, Stamp,
    invalidation_messages,
};
use strata_core::{Content, EventTime, FeatureView, Lifetime, Row};
use strata_shard_router::{Fetched, ShardRouter, UpsertOutcome};
use tokio::sync::mpsc;
use tokio::time::Instant;

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
pub type FillHook = Arc<dyn Fn(&str, &[&str]) -> BoxFuture<'static, ()> + Send + Sync>;

/// What loading one key below L1 gave.
#[derive(Clone, Debug)]
enum Loaded {
    Value {
        value: Cached,
        source: Source,
    },
    /// The owning shard could not be read (shared with waiters, not cached).
    Unavailable,
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
    fill_hook: OnceLock<FillHook>,
    background: Arc<Background>,
    /// Cache steps of writes still to fail on purpose (tests only).
    failing_writes: AtomicUsize,
}

/// A uniform sample in [0, 1) for jitter.
fn sample() -> f64 {
    rand::rng().random::<f64>()
}

impl Protection {
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
            fill_hook: OnceLock::new(),
            background: Arc::default(),
            failing_writes: AtomicUsize::new(0),
        });
        let refresh = RefreshQueue::start(l1.clone(), lower.clone(), capacity, concurrency);
        let _ = lower.refresh.set(refresh.clone());
        // Never 0, which announcements from outside any server carry.
        let origin = rand::rng().random_range(1..u64::MAX);
        let (repairs, queue) = mpsc::channel(REPAIR_QUEUE);
        tokio::spawn(repair(lower.clone(), l1.clone(), origin, queue));
        let (unknown_repairs, unknown) = mpsc::channel(REPAIR_QUEUE);
        tokio::spawn(repair(lower.clone(), l1.clone(), origin, unknown));
        Tiers { l1, origin, lower, flights: Arc::new(SingleFlight::default()), refresh, repairs, unknown_repairs }
    }

    /// Makes the cache step (Redis and the announcement) of the next `n`
    /// writes fail as if Redis were down. For tests of the repair.
    #[doc(hidden)]
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
    #[doc(hidden)]
    pub fn set_fill_hook(&self, hook: FillHook) {
        let _ = self.lower.fill_hook.set(hook);
    }

    /// Answers distinct `keys` of `view`, aligned with `keys`, by
    /// `deadline`: what the tiers below have not answered by then is
    /// served stale from L1 or marked unavailable.
    pub async fn read(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Served> {
        let protection = &self.lower.protection;
        let mut out: Vec<Option<Served>> = vec![None; keys.len()];
        // Taken before L1 is read: a miss filled from below is dropped if
        // its key is invalidated meanwhile.
        let stamp = self.l1.stamp();

        let mut misses = Vec::new();
        let mut negative_hits = 0;
        for (i, hit) in self.l1.get_many(view, keys).await.into_iter().enumerate() {
            let Some(hit) = hit else {
                misses.push(i);
                continue;
            };
            if hit.refresh && protection.enabled {
                self.refresh.schedule(RefreshTier::L1, view, keys[i]).await;
            }
            negative_hits += usize::from(hit.value == Cached::Missing);
            out[i] = Some(Served::new(hit.value, Source::L1));
        }
        count_lookups(view, Source::L1, keys.len() - misses.len(), misses.len());
        count_negative_hits(view, Source::L1, negative_hits);
        if !misses.is_empty() {
            let loaded = if protection.enabled {
                self.load_coalesced(view, keys, &misses, stamp, deadline).await
            } else {
                let miss_keys: Vec<&str> = misses.iter().map(|&i| keys[i]).collect();
                let loaded = self.lower.load(view, &miss_keys, deadline).await;
                self.fill_l1(view, stamp, &miss_keys, &loaded).await;
                loaded
            };
            let mut unavailable = Vec::new();
            for (i, loaded) in misses.into_iter().zip(loaded) {
                out[i] = Some(match loaded {
                    Loaded::Value { value, source } => Served::new(value, source),
                    Loaded::Unavailable => {
                        unavailable.push(i);
                        Served::Unavailable
                    }
                });
            }
            if !unavailable.is_empty() {
                self.serve_stale(view, keys, &unavailable, &mut out).await;
            }
        }
        let mut out: Vec<Served> = out.into_iter().flatten().collect();
        if self.lower.shards.degraded() {
            self.mark_stale(view, keys, &mut out);
        }
        out
    }

    /// Answers keys whose shard could not be read from L1 copies past
    /// their TTL, if kept (stale-if-error).
    async fn serve_stale(&self, view: &FeatureView, keys: &[&str], at: &[usize], out: &mut [Option<Served>]) {
        let wanted: Vec<&str> = at.iter().map(|&i| keys[i]).collect();
        let mut served = 0;
        for (&i, stale) in at.iter().zip(self.l1.get_stale(view, &wanted).await) {
            if let Some(row) = stale {
                out[i] = Some(Served::Found { row, source: Source::L1, stale: true });
                served += 1;
            }
        }
        if served > 0 {
            metrics::counter!("strata_stale_served_total", "view" => view.name.clone()).increment(served);
        }
    }

    /// Marks rows served from a cache (L1, L2) stale where their shard's
    /// breaker is not closed: the source of truth could not have been
    /// asked. A cached "does not exist" stays NOT_FOUND.
    fn mark_stale(&self, view: &FeatureView, keys: &[&str], out: &mut [Served]) {
        let shards = &self.lower.shards;
        let down: Vec<bool> = (0..shards.shard_count()).map(|s| !shards.available(s)).collect();
        let mut marked = 0;
        for (key, served) in keys.iter().zip(out) {
            if let Served::Found { stale, source, .. } = served
                && !*stale
                && *source != Source::L3
                && down[shards.shard_of(key)]
            {
                *stale = true;
                marked += 1;
            }
        }
        if marked > 0 {
            metrics::counter!("strata_stale_served_total", "view" => view.name.clone()).increment(marked);
        }
    }

    /// Loads the keys at `misses` with single flight: keys another request
    /// is loading are waited for; the rest are loaded here, once.
    async fn load_coalesced(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        misses: &[usize],
        stamp: Stamp,
        deadline: Instant,
    ) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; misses.len()];
        let claim = self.flights.claim(misses.iter().map(|&i| (view.id, keys[i].to_owned())).collect());
        let leader = claim.leader;

        let lead_keys: Vec<&str> = claim.lead.iter().map(|&j| keys[misses[j]]).collect();
        let lead = async {
            let loaded = self.lower.load(view, &lead_keys, deadline).await;
            self.fill_l1(view, stamp, &lead_keys, &loaded).await;
            leader.complete(|| loaded.iter().map(|loaded| (loaded.clone(), stamp)).collect());
            loaded
        };
        // A waiter gives up at its own deadline: the leader's may be later.
        let waits = futures::future::join_all(claim.wait.into_iter().map(|(j, w)| async move {
            match tokio::time::timeout_at(deadline, w.result()).await {
                Ok(result) => (j, Some(result)),
                Err(_) => (j, None),
            }
        }));
        let (led, waited) = tokio::join!(lead, waits);
        for (&j, loaded) in claim.lead.iter().zip(led) {
            out[j] = Some(loaded);
        }
        let mut orphans = Vec::new();
        let mut coalesced = 0u64;
        for (j, result) in waited {
            let Some(result) = result else {
                out[j] = Some(Loaded::Unavailable);
                continue;
            };
            match result {
                // A load that began before the key was invalidated may carry
                // the old value; a request that may have begun after the
                // write loads the key itself.
                Some((_, leader_stamp)) if self.l1.outdated(leader_stamp, view.id, keys[misses[j]]) => orphans.push(j),
                // The leader ran out of its own time (its deadline may be
                // shorter than ours): try with ours.
                Some((Loaded::Unavailable, _)) if Instant::now() < deadline => orphans.push(j),
                Some((loaded, _)) => {
                    coalesced += 1;
                    out[j] = Some(loaded);
                }
                None => orphans.push(j),
            }
        }
        if coalesced > 0 {
            metrics::counter!("strata_coalesced_waits_total", "view" => view.name.clone()).increment(coalesced);
        }
        if !orphans.is_empty() {
            // Their leader's request was cancelled, or its load predates an
            // invalidation: load them here.
            let orphan_keys: Vec<&str> = orphans.iter().map(|&j| keys[misses[j]]).collect();
            let loaded = self.lower.load(view, &orphan_keys, deadline).await;
            self.fill_l1(view, stamp, &orphan_keys, &loaded).await;
            for (j, loaded) in orphans.into_iter().zip(loaded) {
                out[j] = Some(loaded);
            }
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    async fn fill_l1(&self, view: &FeatureView, stamp: Stamp, keys: &[&str], loaded: &[Loaded]) {
        let protection = &self.lower.protection;
        let entries = keys.iter().zip(loaded).filter_map(|(key, loaded)| match loaded {
            Loaded::Value { value, .. } if protection.cacheable(value) => {
                Some(((*key).to_owned(), value.clone(), protection.lifetime(view, value, view.l1_ttl)))
            }
            _ => None,
        });
        self.l1.insert_many(view, stamp, entries.collect::<Vec<_>>()).await;
    }

    /// Writes distinct rows to their shards; then, for the rows applied,
    /// replaces the Redis copy (unless Redis holds a newer one), drops this
    /// instance's L1 copy, and tells every instance to drop its own.
    ///
    /// Runs to the end even if the caller goes away (a cancelled request):
    /// once PostgreSQL may have committed, the caches must follow. A shard
    /// that has not answered by `deadline` fails its rows, whose keys are
    /// queued for repair, since its commit may still land.
    pub async fn write(&self, view: &Arc<FeatureView>, rows: &[(String, Row)], deadline: Instant) -> UpsertOutcome {
        let (this, view, rows) = (self.clone(), view.clone(), rows.to_vec());
        finish(tokio::spawn(async move { this.write_now(&view, &rows, deadline).await })).await
    }

    /// Deletes keys at event time `at`; then, for the keys applied, leaves
    /// a "missing" entry in Redis (unless Redis holds a newer version) and
    /// drops the key from every instance's L1. Runs to the end even if the
    /// caller goes away.
    pub async fn delete(
        &self,
        view: &Arc<FeatureView>,
        keys: &[String],
        at: EventTime,
        deadline: Instant,
    ) -> UpsertOutcome {
        let (this, view, keys) = (self.clone(), view.clone(), keys.to_vec());
        finish(tokio::spawn(async move { this.delete_now(&view, &keys, at, deadline).await })).await
    }

    async fn write_now(&self, view: &Arc<FeatureView>, rows: &[(String, Row)], deadline: Instant) -> UpsertOutcome {
        let outcome = self.lower.shards.upsert(view, rows, deadline).await;
        self.repair_unknown(view, &outcome, |key| {
            rows.iter().find(|(k, _)| k == key).map_or(EventTime::NEVER, |(_, row)| row.event_time)
        });
        if outcome.written.is_empty() {
            return outcome;
        }
        let by_key: std::collections::HashMap<&str, &Row> = rows.iter().map(|(k, r)| (k.as_str(), r)).collect();
        let protection = &self.lower.protection;
        let puts: Vec<Put<'_>> = outcome
            .written
            .iter()
            .filter_map(|key| {
                let row = by_key.get(key.as_str())?;
                let life = protection.row_lifetime(view, view.l2_ttl);
                Some(Put { key, content: Content::Found(row), version: row.event_time, life })
            })
            .collect();
        self.after_write(view, &puts, &outcome.written, deadline).await;
        outcome
    }

    async fn delete_now(
        &self,
        view: &Arc<FeatureView>,
        keys: &[String],
        at: EventTime,
        deadline: Instant,
    ) -> UpsertOutcome {
        let outcome = self.lower.shards.delete(view, keys, at, deadline).await;
        self.repair_unknown(view, &outcome, |_| at);
        if outcome.written.is_empty() {
            return outcome;
        }
        let life = self.lower.guard_life(view);
        let puts: Vec<Put<'_>> =
            outcome.written.iter().map(|key| Put { key, content: Content::Missing, version: at, life }).collect();
        self.after_write(view, &puts, &outcome.written, deadline).await;
        outcome
    }

    /// Queues for repair the keys of shards that did not answer a write in
    /// time: their commit may land later, and the caches must then follow.
    /// The repair waits until PostgreSQL shows the write's version
    /// (`version_of` the key), so it cannot copy the old row back while the
    /// commit is still on its way.
    fn repair_unknown(&self, view: &Arc<FeatureView>, outcome: &UpsertOutcome, version_of: impl Fn(&str) -> EventTime) {
        let unknown: Vec<(String, EventTime)> = outcome.unknown().map(|key| (key.clone(), version_of(key))).collect();
        if !unknown.is_empty() {
            self.queue_repair(&self.unknown_repairs, view, unknown);
        }
    }

    fn queue_repair(&self, queue: &mpsc::Sender<Repair>, view: &Arc<FeatureView>, keys: Vec<(String, EventTime)>) {
        let n = keys.len() as u64;
        let queued = queue.try_send((view.clone(), keys, Instant::now())).is_ok();
        let outcome = if queued { "queued" } else { "dropped" };
        metrics::counter!("strata_cache_repairs_total", "view" => view.name.clone(), "outcome" => outcome).increment(n);
    }

    /// Counts the keys of a sampled share of requests in Redis, off the
    /// request path, for `strata warm --top`.
    pub fn sample_reads(&self, view: &FeatureView, keys: &[&str]) {
        let hot = &self.lower.hot_keys;
        if hot.sample_rate <= 0.0 || sample() >= hot.sample_rate {
            return;
        }
        let (lower, view) = (self.lower.clone(), view.name.clone());
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        // Trim about once per hundred samples.
        let trim = sample() < 0.01;
        tokio::spawn(async move {
            let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
            if let Err(error) = lower.l2.record_reads(&view, &keys, lower.hot_keys.keep, trim).await {
                tracing::debug!(%view, %error, "sampling reads failed");
            }
        });
    }

    /// Reads distinct keys from PostgreSQL into Redis (an entry newer than
    /// what was read is kept), so a cold deploy does not start with a wall
    /// of misses. Returns how many keys were found, missing and unavailable.
    pub async fn warm(&self, view: &Arc<FeatureView>, keys: &[&str]) -> (usize, usize, usize) {
        let mut counts = (0, 0, 0);
        for loaded in self.lower.fetch_and_fill(view, keys, Instant::now() + BACKGROUND_BUDGET).await {
            match loaded {
                Loaded::Value { value: Cached::Found(_), .. } => counts.0 += 1,
                Loaded::Value { value: Cached::Missing, .. } => counts.1 += 1,
                Loaded::Unavailable => counts.2 += 1,
            }
        }
        counts
    }

    /// The cache step of a write: store what it left in Redis (unless
    /// Redis holds a newer version), drop the keys from this instance's L1
    /// at once, and announce them so every other instance drops them too.
    /// If Redis fails, the keys are queued for repair: otherwise Redis
    /// would keep the old copy until its TTL, and every instance would
    /// read it again.
    async fn after_write(&self, view: &Arc<FeatureView>, puts: &[Put<'_>], written: &[String], deadline: Instant) {
        let keys: Vec<&str> = written.iter().map(String::as_str).collect();
        let injected =
            self.lower.failing_writes.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
        let stored = !injected && self.lower.put_after_write(view, puts, deadline).await;
        // After Redis holds the new copy: a local read that refilled L1
        // from the old one in between is dropped here (this instance
        // ignores its own announcements).
        self.l1.invalidate_many(view.id, &keys).await;
        let announced =
            !injected && announce(&self.lower.l2, &self.lower.writes.channel, self.origin, view, &keys, deadline).await;
        if !(stored && announced) {
            self.queue_repair(&self.repairs, view, written.iter().map(|key| (key.clone(), EventTime::NEVER)).collect());
        }
    }
}

/// Puts right the caches of written keys whose cache step failed: reads
/// them from PostgreSQL, stores them in Redis (never over a newer version),
/// then drops and announces them again, since instances may have re-read
/// the old Redis copy meanwhile. A key whose write may not have landed yet
/// is repaired only once PostgreSQL holds its version. Retries with
/// backoff, a few repairs at a time; gives up once every old copy has
/// expired: the view's L2 TTL, or its L1 TTL plus the time L1 keeps stale
/// copies, since the write.
async fn repair(lower: Arc<Lower>, l1: L1Cache, origin: u64, mut queue: mpsc::Receiver<Repair>) {
    let running = Arc::new(tokio::sync::Semaphore::new(REPAIRS_AT_ONCE));
    while let Some((view, keys, queued_at)) = queue.recv().await {
        let Ok(permit) = running.clone().acquire_owned().await else { return };
        let (lower, l1) = (lower.clone(), l1.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let (keys, wanted): (Vec<&str>, Vec<EventTime>) = keys.iter().map(|(k, v)| (k.as_str(), *v)).unzip();
            let old_copies_last = view.l2_ttl.max(view.l1_ttl.saturating_add(l1.kept_stale()));
            let give_up = queued_at.checked_add(old_copies_last).unwrap_or_else(far_future);
            let mut delay = Duration::from_millis(50);
            let outcome = loop {
                let (loaded, stored) = lower.fetch_and_put(&view, &keys, Instant::now() + BACKGROUND_BUDGET).await;
                // Past UNKNOWN_SETTLES, a write that is not in PostgreSQL never
                // landed, and what is there is what the caches must show.
                let settled = queued_at.elapsed() >= UNKNOWN_SETTLES;
                let fetched = loaded.iter().zip(&wanted).all(|((loaded, version), wanted)| {
                    !matches!(loaded, Loaded::Unavailable) && (settled || version >= wanted)
                });
                if fetched && stored.is_ok() {
                    l1.invalidate_many(view.id, &keys).await;
                    let deadline = Instant::now() + BACKGROUND_BUDGET;
                    if announce(&lower.l2, &lower.writes.channel, origin, &view, &keys, deadline).await {
                        break "repaired";
                    }
                }
                if tokio::time::Instant::now() + delay > give_up {
                    break "expired";
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            };
            tracing::info!(view = %view.name, keys = keys.len(), outcome, "cache repair after a write");
            metrics::counter!("strata_cache_repairs_total", "view" => view.name.clone(), "outcome" => outcome)
                .increment(keys.len() as u64);
        });
    }
}

/// An instant later than any deadline Strata sets.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(86_400 * 365)
}

/// The outcome of a spawned write. A panic in it is a bug, passed on; a
/// write cancelled by the runtime shutting down reports no result for its
/// keys (they answer FAILED, and a retry is safe).
async fn finish(task: tokio::task::JoinHandle<UpsertOutcome>) -> UpsertOutcome {
    match task.await {
        Ok(outcome) => outcome,
        Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
        Err(_) => UpsertOutcome::default(),
    }
}

/// Publishes written keys of a view on the invalidation channel, so every
/// instance drops its L1 copy. `origin` is the announcing instance (0 for
/// none). Gives up at `deadline`. A failure is logged and counted, and
/// false returned.
pub async fn announce(
    l2: &L2Cache,
    channel: &str,
    origin: u64,
    view: &FeatureView,
    keys: &[&str],
    deadline: Instant,
) -> bool {
    let mut ok = true;
    for message in invalidation_messages(origin, &view.name, keys) {
        if let Err(error) = l2.publish(channel, message, deadline).await {
            tracing::warn!(view = %view.name, %error, "publishing an invalidation failed");
            metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "publish").increment(1);
            ok = false;
        }
    }
    ok
}

/// Leaves guards in Redis for rows written without copying their values
/// there (bulk loads): a reader sees a miss, and a cache fill older than
/// the row is refused for `guard_ttl`. Pipelines of a bounded size, each
/// tried again with backoff until it is taken or `deadline` has passed (a
/// busy Redis, a failover, an open breaker). Returns how many keys Redis
/// had not taken by then.
pub async fn guard(
    l2: &L2Cache,
    view: &FeatureView,
    written: &[(String, EventTime)],
    guard_ttl: Duration,
    deadline: Instant,
) -> usize {
    let life = Lifetime { soft: guard_ttl, hard: guard_ttl };
    let mut failed = 0;
    for chunk in written.chunks(GUARD_PIPELINE) {
        let puts: Vec<Put<'_>> =
            chunk.iter().map(|(key, at)| Put { key, content: Content::Guard, version: *at, life }).collect();
        let puts = &puts;
        let taken = retry_until(deadline, |attempt_deadline| async move {
            match l2.put_many(view, puts, attempt_deadline).await {
                Ok(_) => true,
                Err(error) => {
                    tracing::debug!(view = %view.name, keys = puts.len(), %error, "redis guard after a bulk write failed; retrying");
                    metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "write").increment(1);
                    false
                }
            }
        })
        .await;
        if !taken {
            tracing::warn!(view = %view.name, keys = puts.len(), "redis did not take the guards of bulk-written keys in time");
            failed += puts.len();
        }
    }
    failed
}

/// [`announce`], tried again with backoff until it succeeds or `deadline`
/// has passed; whether it succeeded.
pub async fn announce_until(
    l2: &L2Cache,
    channel: &str,
    origin: u64,
    view: &FeatureView,
    keys: &[&str],
    deadline: Instant,
) -> bool {
    retry_until(deadline, |attempt_deadline| announce(l2, channel, origin, view, keys, attempt_deadline)).await
}

/// Runs `attempt` until it returns true or `deadline` has passed, waiting
/// a growing, jittered time between attempts. Each attempt gets the time
/// left, at most [`ATTEMPT_BUDGET`].
async fn retry_until<F, Fut>(deadline: Instant, mut attempt: F) -> bool
where
    F: FnMut(Instant) -> Fut,
    Fut: Future<Output = bool>,
{
    let mut retry = 0;
    loop {
        let attempt_deadline = deadline.min(Instant::now() + ATTEMPT_BUDGET);
        if attempt(attempt_deadline).await {
            return true;
        }
        let wait = CACHE_STEP_RETRY.backoff(retry, sample());
        if Instant::now() + wait >= deadline {
            return false;
        }
        tokio::time::sleep(wait).await;
        retry += 1;
    }
}

/// Guards per Redis pipeline: small enough that a pipeline finishes well
/// within the command timeout on a busy machine.
const GUARD_PIPELINE: usize = 250;
/// The longest one attempt of a bulk load's cache step may take.
const ATTEMPT_BUDGET: Duration = Duration::from_secs(10);
/// Backoff between attempts of a bulk load's cache step: long enough for an
/// open Redis breaker to let a probe through.
const CACHE_STEP_RETRY: strata_core::RetryPolicy =
    strata_core::RetryPolicy { attempts: u32::MAX, base: Duration::from_millis(50), cap: Duration::from_secs(2) };

impl Lower {
    /// The lifetime of an entry that stands for a write without its value
    /// (a deletion): a negative entry's, but at least the guard TTL.
    fn guard_life(&self, view: &FeatureView) -> Lifetime {
        let life = self.protection.lifetime(view, &Cached::Missing, view.negative_ttl);
        Lifetime { soft: life.soft, hard: life.hard.max(self.writes.guard_ttl) }
    }

    /// Stores what writes left in Redis; a failure is logged, counted, and
    /// false returned.
    async fn put_after_write(&self, view: &FeatureView, puts: &[Put<'_>], deadline: Instant) -> bool {
        match self.l2.put_many(view, puts, deadline).await {
            Ok(_) => true,
            Err(error) => {
                tracing::warn!(view = %view.name, keys = puts.len(), %error, "redis update after a write failed");
                metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "write").increment(1);
                false
            }
        }
    }

    /// Loads distinct keys from L2, then PostgreSQL; aligned with `keys`.
    /// The lookup is plain GETs: a Lua call per key, to take the lease in
    /// the same round trip, cost the L2 hit path three quarters of its
    /// throughput (BENCHMARKS.md), for a cold path that PostgreSQL and the
    /// fill bound anyway. Misses take their leases in one call per key.
    async fn load(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        let (hits, l2_up) = match self.l2.get_many(view, keys, deadline).await {
            Ok(hits) => (hits, true),
            // Skipped while the breaker is open: not worth a warning each.
            Err(L2Error::Open) => (vec![None; keys.len()], false),
            Err(error) => {
                tracing::warn!(view = %view.name, keys = keys.len(), %error, "redis read failed; going to postgres");
                metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "get").increment(1);
                (vec![None; keys.len()], false)
            }
        };
        let mut misses = Vec::new();
        let mut negative_hits = 0;
        for (i, hit) in hits.into_iter().enumerate() {
            match hit {
                Some(hit) => {
                    if hit.stale
                        && self.protection.enabled
                        && let Some(queue) = self.refresh.get()
                    {
                        queue.schedule(RefreshTier::L2, view, keys[i]).await;
                    }
                    negative_hits += usize::from(hit.value == Cached::Missing);
                    out[i] = Some(Loaded::Value { value: hit.value, source: Source::L2 });
                }
                None => misses.push(i),
            }
        }
        count_lookups(view, Source::L2, keys.len() - misses.len(), misses.len());
        count_negative_hits(view, Source::L2, negative_hits);
        if misses.is_empty() {
            return out.into_iter().flatten().collect();
        }

        let miss_keys: Vec<&str> = misses.iter().map(|&i| keys[i]).collect();
        let loaded = if self.protection.enabled && l2_up {
            self.load_under_leases(view, &miss_keys, deadline).await
        } else {
            self.fetch_then_fill(view, &miss_keys, Leases::none(&self.l2, view), deadline).await
        };
        for (i, loaded) in misses.into_iter().zip(loaded) {
            out[i] = Some(loaded);
        }
        out.into_iter().flatten().collect()
    }

    /// For keys missing in Redis: one call per key looks at the entry
    /// again and, if there is still none, takes the key's lease (entry and
    /// lease share a slot). A key another instance filled meanwhile is
    /// answered from Redis; where this instance took the lease it reads
    /// PostgreSQL and fills Redis; elsewhere it waits for the lease
    /// holder's result in Redis, and reads PostgreSQL itself only if none
    /// comes within the lease TTL.
    async fn load_under_leases(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Loaded> {
        let answers = match self.l2.get_or_lease(view, keys, self.protection.lease_ttl, deadline).await {
            Ok(answers) => answers,
            Err(error) => {
                tracing::warn!(view = %view.name, %error, "redis lease failed; going to postgres");
                return self.fetch_then_fill(view, keys, Leases::none(&self.l2, view), deadline).await;
            }
        };
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        // Keys whose lease this instance took, keys another holds, and
        // leases taken for keys filled meanwhile (given back at once).
        let (mut mine, mut theirs, mut needless) = (Vec::new(), Vec::new(), Vec::new());
        for (i, (won, hit)) in answers.into_iter().enumerate() {
            match hit {
                Some(hit) => {
                    if won {
                        needless.push(keys[i]);
                    }
                    out[i] = Some(Loaded::Value { value: hit.value, source: Source::L2 });
                }
                None if won => mine.push(i),
                None => theirs.push(i),
            }
        }
        drop(Leases::held(&self.l2, view, &needless));
        count_leases(view, mine.len(), theirs.len());
        let mine_keys: Vec<&str> = mine.iter().map(|&i| keys[i]).collect();
        // Released after the fill, or when this request is dropped first
        // (its client went away): never left to expire while others wait.
        let leases = Leases::held(&self.l2, view, &mine_keys);
        // A key whose shard is down is not waited for: its holder will not
        // fill it, and waiting would hold up the rest of the batch (and
        // every request waiting on this one) for half its deadline.
        let (theirs, down): (Vec<usize>, Vec<usize>) =
            theirs.into_iter().partition(|&i| self.shards.available(self.shards.shard_of(keys[i])));
        for i in down {
            out[i] = Some(Loaded::Unavailable);
        }
        let theirs_keys: Vec<&str> = theirs.iter().map(|&i| keys[i]).collect();
        let load_mine = async {
            if mine_keys.is_empty() {
                return Vec::new();
            }
            self.fetch_then_fill(view, &mine_keys, leases, deadline).await
        };
        let (mine_loaded, theirs_loaded) = tokio::join!(load_mine, self.wait_for_holders(view, &theirs_keys, deadline));
        for (i, loaded) in mine.into_iter().zip(mine_loaded).chain(theirs.into_iter().zip(theirs_loaded)) {
            out[i] = Some(loaded);
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    /// Polls Redis for keys another instance is reloading, with backoff, up
    /// to the lease TTL; what did not arrive is read from PostgreSQL. Half
    /// the time left to the request at most is spent waiting, so the read
    /// of PostgreSQL still has the other half.
    async fn wait_for_holders(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        let now = Instant::now();
        let patience = self.protection.lease_ttl.min(deadline.saturating_duration_since(now) / 2);
        let give_up = now + patience;
        let mut delay = Duration::from_millis(2);
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        while !pending.is_empty() && Instant::now() < give_up {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
            let pending_keys: Vec<&str> = pending.iter().map(|&i| keys[i]).collect();
            let Ok(hits) = self.l2.get_many(view, &pending_keys, deadline).await else { break };
            let mut still = Vec::new();
            for (i, hit) in pending.into_iter().zip(hits) {
                match hit {
                    Some(hit) => out[i] = Some(Loaded::Value { value: hit.value, source: Source::L2 }),
                    None => still.push(i),
                }
            }
            pending = still;
        }
        if !pending.is_empty() {
            let late: Vec<&str> = pending.iter().map(|&i| keys[i]).collect();
            let no_leases = Leases::none(&self.l2, view);
            for (i, loaded) in pending.iter().zip(self.fetch_then_fill(view, &late, no_leases, deadline).await) {
                out[*i] = Some(loaded);
            }
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    /// Reads PostgreSQL and fills Redis with what it found (and, with
    /// protection, with what does not exist), then answers.
    async fn fetch_and_fill(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Loaded> {
        let (loaded, stored) = self.fetch_and_put(view, keys, deadline).await;
        count_fill_error(view, keys.len(), stored);
        loaded.into_iter().map(|(loaded, _)| loaded).collect()
    }

    /// Reads PostgreSQL and answers; Redis is filled in the background
    /// (the answer does not wait on Redis), and `leases` are released once
    /// it is, so instances waiting on them find the fill.
    async fn fetch_then_fill(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        leases: Leases,
        deadline: Instant,
    ) -> Vec<Loaded> {
        let fetched = if keys.is_empty() { Vec::new() } else { self.fetch(view, keys, deadline).await };
        let loaded = fetched.iter().map(|(loaded, _)| loaded.clone()).collect();
        let (l2, protection, view) = (self.l2.clone(), self.protection.clone(), view.clone());
        let keys: Vec<String> = keys.iter().map(|k| (*k).to_owned()).collect();
        self.background.spawn(async move {
            let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            let fills = fills(&protection, &view, &key_refs, &fetched);
            // The fill gives the leases back, after their keys' entries.
            let held = leases.disarm();
            let held_refs: Vec<&str> = held.iter().map(String::as_str).collect();
            if fills.is_empty() && held.is_empty() {
                return;
            }
            let stored = l2.fill_absent(&view, &fills, &held_refs, deadline).await.map(drop);
            if stored.is_err() {
                release_leases(&l2, &view, held).await;
            }
            count_fill_error(&view, keys.len(), stored);
        });
        loaded
    }

    /// [`Lower::fetch_and_fill`], with the version of each value (a row's
    /// event time, a deletion's, or `EventTime::NEVER`), telling whether
    /// Redis took the values.
    async fn fetch_and_put(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        deadline: Instant,
    ) -> (Vec<(Loaded, EventTime)>, Result<(), L2Error>) {
        let fetched = self.fetch(view, keys, deadline).await;
        let stored = fill_l2(&self.l2, &self.protection, view, keys, &fetched, deadline).await;
        (fetched, stored)
    }

    /// Reads PostgreSQL: each value with the version it is filed under in
    /// Redis (a row's event time, a deletion's, or "never written").
    async fn fetch(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<(Loaded, EventTime)> {
        let fetched: Vec<(Loaded, EventTime)> = self
            .shards
            .fetch(view, keys, deadline)
            .await
            .into_iter()
            .map(|fetched| match fetched {
                Fetched::Found(row) => {
                    let version = row.event_time;
                    (Loaded::Value { value: Cached::Found(Arc::new(row)), source: Source::L3 }, version)
                }
                Fetched::NotFound => (Loaded::Value { value: Cached::Missing, source: Source::L3 }, EventTime::NEVER),
                Fetched::Deleted(at) => (Loaded::Value { value: Cached::Missing, source: Source::L3 }, at),
                Fetched::Unavailable => (Loaded::Unavailable, EventTime::NEVER),
            })
            .collect();
        if let Some(hook) = self.fill_hook.get() {
            hook(&view.name, keys).await;
        }
        fetched
    }
}

/// Redis leases this instance holds on keys of a view: released once
/// their keys are filled ([`Leases::release`]), or, if dropped before that
/// (the request was cancelled while reading PostgreSQL), released in the
/// background at once, so other instances and this one's waiters do not
/// stall until the leases expire.
struct Leases {
    l2: L2Cache,
    view: Arc<FeatureView>,
    keys: Vec<String>,
}

impl Leases {
    fn held(l2: &L2Cache, view: &Arc<FeatureView>, keys: &[&str]) -> Leases {
        Leases { l2: l2.clone(), view: view.clone(), keys: keys.iter().map(|k| (*k).to_owned()).collect() }
    }

    fn none(l2: &L2Cache, view: &Arc<FeatureView>) -> Leases {
        Leases::held(l2, view, &[])
    }

    /// The keys, for a caller that releases the leases itself.
    fn disarm(mut self) -> Vec<String> {
        std::mem::take(&mut self.keys)
    }
}

impl Drop for Leases {
    fn drop(&mut self) {
        if self.keys.is_empty() {
            return;
        }
        let (l2, view, keys) = (self.l2.clone(), self.view.clone(), std::mem::take(&mut self.keys));
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move { release_leases(&l2, &view, keys).await });
        }
    }
}

async fn release_leases(l2: &L2Cache, view: &FeatureView, keys: Vec<String>) {
    if keys.is_empty() {
        return;
    }
    let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
    if let Err(error) = l2.release_leases(view, &keys).await {
        tracing::debug!(view = %view.name, %error, "releasing leases failed; they expire by themselves");
    }
}

/// Stores what PostgreSQL gave in Redis, each value unless Redis holds a
/// newer version of its key; whether Redis took them.
async fn fill_l2(
    l2: &L2Cache,
    protection: &Protection,
    view: &FeatureView,
    keys: &[&str],
    fetched: &[(Loaded, EventTime)],
    deadline: Instant,
) -> Result<(), L2Error> {
    l2.put_many(view, &fills(protection, view, keys, fetched), deadline).await.map(drop)
}

/// The Redis entries of what PostgreSQL gave, with their lifetimes.
fn fills<'a>(
    protection: &Protection,
    view: &FeatureView,
    keys: &[&'a str],
    fetched: &'a [(Loaded, EventTime)],
) -> Vec<Put<'a>> {
    keys.iter()
        .zip(fetched)
        .filter_map(|(key, (loaded, version))| match loaded {
            Loaded::Value { value, .. } if protection.cacheable(value) => {
                let life = protection.lifetime(view, value, view.l2_ttl);
                let content = match value {
                    Cached::Found(row) => Content::Found(row.as_ref()),
                    Cached::Missing => Content::Missing,
                };
                Some(Put { key, content, version: *version, life })
            }
            _ => None,
        })
        .collect()
}

fn count_fill_error(view: &FeatureView, keys: usize, stored: Result<(), L2Error>) {
    if let Err(error) = stored {
        if !matches!(error, L2Error::Open) {
            tracing::warn!(view = %view.name, keys, %error, "redis fill failed");
        }
        metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "set").increment(1);
    }
}

impl Reloader for Lower {
    async fn reload(
        &self,
        tier: RefreshTier,
        view: Arc<FeatureView>,
        keys: Vec<String>,
    ) -> Vec<Option<(Cached, Lifetime)>> {
        let key_refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let deadline = Instant::now() + BACKGROUND_BUDGET;
        let loaded = match tier {
            RefreshTier::L1 => self.load(&view, &key_refs, deadline).await,
            RefreshTier::L2 => {
                // Of all instances that saw the stale entry, the lease holder
                // reloads it; the rest keep serving what they have.
                let won =
                    self.l2.try_leases(&view, &key_refs, self.protection.lease_ttl, deadline).await.unwrap_or_default();
                let mine: Vec<&str> = key_refs.iter().zip(&won).filter(|(_, w)| **w).map(|(k, _)| *k).collect();
                count_leases(&view, mine.len(), keys.len() - mine.len());
                let mut fresh = self.fetch_and_fill(&view, &mine, deadline).await.into_iter();
                let _ = self.l2.release_leases(&view, &mine).await;
                won.iter()
                    .chain(std::iter::repeat(&false))
                    .take(keys.len())
                    .map(|w| if *w { fresh.next().unwrap_or(Loaded::Unavailable) } else { Loaded::Unavailable })
                    .collect()
            }
        };
        loaded
            .into_iter()
            .map(|loaded| match loaded {
                Loaded::Value { value, .. } if self.protection.cacheable(&value) => {
                    let life = self.protection.lifetime(&view, &value, view.l1_ttl);
                    Some((value, life))
                }
                _ => None,
            })
            .collect()
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
