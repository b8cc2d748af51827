use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use moka::Expiry;
use moka::future::Cache;
use strata_core::{FeatureView, Lifetime, Row};
use tokio::time::Instant;

/// What a cache holds for a key: its row, or the knowledge that it does not
/// exist (negative caching).
#[derive(Clone, Debug, PartialEq)]
pub enum Cached {
    Found(Arc<Row>),
    Missing,
}

/// A cache key: the view's registry id and the entity key.
type Key = (u32, String);

#[derive(Debug)]
struct Entry {
    value: Cached,
    /// Soft and hard expiry on tokio's clock, so paused-time tests drive
    /// them; moka's own TTL (on the real clock) only reclaims memory.
    soft_at: Instant,
    hard_at: Instant,
    ttl: Duration,
    /// Set by the one hit that schedules this entry's background reload.
    refreshing: AtomicBool,
}

/// Each entry lives for the TTL it was inserted with, whether new or
/// replacing an older entry.
struct PerEntryTtl;

impl Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: std::time::Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(
        &self,
        _: &Key,
        entry: &Arc<Entry>,
        _: std::time::Instant,
        _: Option<Duration>,
    ) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// A hit in L1.
#[derive(Clone, Debug, PartialEq)]
pub struct L1Hit {
    pub value: Cached,
    /// The entry is past its soft expiry and this caller won the right to
    /// schedule its one background reload. Concurrent hits get `false`.
    pub refresh: bool,
}

/// The in-process cache. Cheap to clone; clones share the entries.
#[derive(Clone)]
pub struct L1Cache {
    cache: Cache<Key, Arc<Entry>>,
    epochs: Arc<Epochs>,
    /// How long a row stays after its hard expiry, to be served as stale
    /// when the tiers below cannot answer (stale-if-error).
    keep_stale: Duration,
    /// False when built with no room (`max_bytes == 0`): L1 is off, every
    /// lookup misses at once and nothing is stored.
    enabled: bool,
}

/// Taken before a load from the tiers below starts; a fill carrying the
/// load's values is refused for keys invalidated since (see [`Epochs`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp(u64);

/// Stale-set protection for L1. Every invalidation takes the next number of
/// a sequence and records it in its key's bucket; a clear records it for
/// all. A fill whose [`Stamp`] (the sequence when its load started) is below
/// its key's bucket may carry a value from before the invalidation, so it is
/// dropped: the reader still gets its answer, the cache does not keep it.
/// Unrelated keys sharing a bucket only cost a skipped fill.
struct Epochs {
    seq: AtomicU64,
    cleared: AtomicU64,
    buckets: Box<[AtomicU64]>,
}

/// 512 KiB of counters: a steady stream of invalidations (a bulk load
/// announces tens of thousands of keys a second) rarely touches the bucket
/// of a key being loaded.
const BUCKETS: usize = 65_536;

impl Epochs {
    fn new() -> Epochs {
        Epochs {
            seq: AtomicU64::new(0),
            cleared: AtomicU64::new(0),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    fn bucket(view: u32, key: &str) -> usize {
        (xxhash_rust::xxh3::xxh3_64_with_seed(key.as_bytes(), u64::from(view)) as usize) % BUCKETS
    }

    fn next(&self) -> u64 {
        self.seq.fetch_add(1, Ordering::SeqCst) + 1
    }

    fn outdated(&self, stamp: Stamp, view: u32, key: &str) -> bool {
        self.outdated_in(stamp, Self::bucket(view, key))
    }

    fn outdated_in(&self, stamp: Stamp, bucket: usize) -> bool {
        self.cleared.load(Ordering::SeqCst) > stamp.0 || self.buckets[bucket].load(Ordering::SeqCst) > stamp.0
    }
}

/// Whether an entry is worth keeping past its expiry: rows are, to be
/// served stale when their shard is down.
fn keeps_stale(value: &Cached) -> bool {
    matches!(value, Cached::Found(_))
}

/// Per-entry bookkeeping of moka and of the key, counted in the weight so
/// that many tiny rows cannot exceed the byte bound by much.
const ENTRY_OVERHEAD: usize = 128;

impl L1Cache {
    /// A cache holding at most about `max_bytes` of rows; 0 turns L1 off.
    pub fn new(max_bytes: u64) -> L1Cache {
        let cache = Cache::builder()
            .weigher(|key: &Key, entry: &Arc<Entry>| {
                let row = match &entry.value {
                    Cached::Found(row) => row.approx_bytes(),
                    Cached::Missing => 0,
                };
                u32::try_from(ENTRY_OVERHEAD + key.1.len() + row).unwrap_or(u32::MAX)
            })
            .max_capacity(max_bytes)
            .expire_after(PerEntryTtl)
            .build();
        L1Cache { cache, epochs: Arc::new(Epochs::new()), keep_stale: Duration::ZERO, enabled: max_bytes > 0 }
    }

    /// Keeps rows for `keep_stale` after their hard expiry: misses for
    /// [`L1Cache::get_many`], but [`L1Cache::get_stale`] still finds them.
    /// They count against the byte bound like any entry.
    pub fn keep_stale(mut self, keep_stale: Duration) -> L1Cache {
        self.keep_stale = keep_stale;
        self
    }

    /// How long rows are kept past their expiry (see [`L1Cache::keep_stale`]).
    pub fn kept_stale(&self) -> Duration {
        self.keep_stale
    }

    /// Rows of a batch past their hard expiry but still kept (see
    /// [`L1Cache::keep_stale`]), for answering when their shard cannot be
    /// read. Aligned with `keys`. Only rows: an expired "does not exist"
    /// is not worth serving.
    pub async fn get_stale(&self, view: &FeatureView, keys: &[&str]) -> Vec<Option<Arc<Row>>> {
        if !self.enabled {
            return vec![None; keys.len()];
        }
        let now = Instant::now();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let entry = self.cache.get(&(view.id, (*key).to_owned())).await;
            out.push(entry.and_then(|e| match &e.value {
                Cached::Found(row)
                    if now >= e.hard_at && e.hard_at.checked_add(self.keep_stale).is_none_or(|end| now < end) =>
                {
                    Some(row.clone())
                }
                _ => None,
            }));
        }
        out
    }

    /// Marks the start of a load whose values may fill this cache.
    pub fn stamp(&self) -> Stamp {
        Stamp(self.epochs.seq.load(Ordering::SeqCst))
    }

    /// Whether `key` of the view was (or may have been: keys share buckets)
    /// invalidated since `stamp`, so a value loaded since may be older than
    /// a write.
    pub fn outdated(&self, stamp: Stamp, view_id: u32, key: &str) -> bool {
        self.epochs.outdated(stamp, view_id, key)
    }

    /// Looks up a batch; the answer is aligned with `keys`. An entry past
    /// its hard expiry is a miss.
    pub async fn get_many(&self, view: &FeatureView, keys: &[&str]) -> Vec<Option<L1Hit>> {
        if !self.enabled {
            return vec![None; keys.len()];
        }
        let now = Instant::now();
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let entry = self.cache.get(&(view.id, (*key).to_owned())).await;
            out.push(entry.filter(|e| now < e.hard_at).map(|e| L1Hit {
                value: e.value.clone(),
                refresh: now >= e.soft_at
                    && e.refreshing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).is_ok(),
            }));
        }
        out
    }

    /// Caches values of a view loaded since `stamp`, each with its own
    /// lifetime from now, except for keys invalidated since `stamp` (their
    /// value may predate the invalidation). Returns how many were refused.
    pub async fn insert_many(
        &self,
        view: &FeatureView,
        stamp: Stamp,
        entries: impl IntoIterator<Item = (String, Cached, Lifetime)>,
    ) -> usize {
        if !self.enabled {
            return 0;
        }
        let now = Instant::now();
        let mut refused = 0;
        for (key, value, life) in entries {
            let bucket = Epochs::bucket(view.id, &key);
            if self.epochs.outdated_in(stamp, bucket) {
                refused += 1;
                continue;
            }
            let ttl = if keeps_stale(&value) { life.hard.saturating_add(self.keep_stale) } else { life.hard };
            let entry =
                Entry { value, soft_at: now + life.soft, hard_at: now + life.hard, ttl, refreshing: false.into() };
            let cache_key = (view.id, key);
            self.cache.insert(cache_key.clone(), Arc::new(entry)).await;
            // An invalidation between the check and the insert would have
            // missed this entry: look again, now that it is in.
            if self.epochs.outdated_in(stamp, bucket) {
                self.cache.invalidate(&cache_key).await;
                refused += 1;
            }
        }
        if refused > 0 {
            metrics::counter!("strata_cache_fills_refused_total", "tier" => "l1", "view" => view.name.clone())
                .increment(refused as u64);
        }
        refused
    }

    /// A scheduled reload of `key` did not happen: keep the old value and
    /// let a later hit schedule another.
    pub async fn refresh_failed(&self, view: &FeatureView, key: &str) {
        if let Some(entry) = self.cache.get(&(view.id, key.to_owned())).await {
            entry.refreshing.store(false, Ordering::Release);
        }
    }

    /// Drops keys of a view, and refuses fills of them by loads that started
    /// before.
    pub async fn invalidate_many(&self, view_id: u32, keys: &[&str]) {
        for key in keys {
            let seq = self.epochs.next();
            self.epochs.buckets[Epochs::bucket(view_id, key)].fetch_max(seq, Ordering::SeqCst);
            self.cache.invalidate(&(view_id, (*key).to_owned())).await;
        }
    }

    /// Drops every entry, and refuses fills by loads that started before.
    pub async fn clear(&self) {
        let seq = self.epochs.next();
        self.epochs.cleared.fetch_max(seq, Ordering::SeqCst);
        self.cache.invalidate_all();
        self.cache.run_pending_tasks().await;
    }

    /// Entries and their total weight in bytes, after pending maintenance.
    pub async fn size(&self) -> (u64, u64) {
        self.cache.run_pending_tasks().await;
        (self.cache.entry_count(), self.cache.weighted_size())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use strata_core::{EventTime, FeatureSpec, FeatureType, FeatureViewSpec, Registry, Value};

    use super::*;

    pub(crate) fn registry() -> Registry {
        let spec =
            |name: &str| FeatureViewSpec::new(name, vec![FeatureSpec { name: "s".into(), ty: FeatureType::String }]);
        Registry::new(vec![spec("a"), spec("b")]).unwrap()
    }

    pub(crate) fn row(s: &str) -> Arc<Row> {
        Arc::new(Row { event_time: EventTime(1), values: vec![Value::String(s.into())] })
    }

    const LIFE: Lifetime = Lifetime { soft: Duration::from_secs(8), hard: Duration::from_secs(10) };

    fn found(s: &str) -> Cached {
        Cached::Found(row(s))
    }

    #[tokio::test]
    async fn keys_of_different_views_do_not_collide() {
        let registry = registry();
        let (a, b) = (registry.get("a").unwrap(), registry.get("b").unwrap());
        let l1 = L1Cache::new(1 << 20);
        l1.insert_many(
            a,
            l1.stamp(),
            [("k".to_owned(), found("from a"), LIFE), ("gone".to_owned(), Cached::Missing, LIFE)],
        )
        .await;
        let hits = l1.get_many(a, &["k", "x", "gone"]).await;
        assert_eq!(hits[0].as_ref().map(|h| &h.value), Some(&found("from a")));
        assert_eq!(hits[1], None);
        assert_eq!(hits[2].as_ref().map(|h| &h.value), Some(&Cached::Missing), "a negative entry is a hit");
        assert_eq!(l1.get_many(b, &["k"]).await, vec![None]);
        l1.invalidate_many(a.id, &["k"]).await;
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None]);
    }

    #[tokio::test]
    async fn a_fill_from_a_load_older_than_an_invalidation_is_refused() {
        let registry = registry();
        let (a, b) = (registry.get("a").unwrap(), registry.get("b").unwrap());
        let l1 = L1Cache::new(1 << 20);
        let before = l1.stamp();
        l1.invalidate_many(a.id, &["k"]).await;
        let refused = l1
            .insert_many(a, before, [("k".to_owned(), found("old"), LIFE), ("other".to_owned(), found("x"), LIFE)])
            .await;
        assert_eq!(refused, 1, "only the invalidated key is refused");
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None], "the old value is not cached");
        assert!(l1.get_many(a, &["other"]).await[0].is_some());
        assert_eq!(l1.insert_many(b, before, [("k".to_owned(), found("b"), LIFE)]).await, 0, "another view's k is not");

        let after = l1.stamp();
        assert_eq!(l1.insert_many(a, after, [("k".to_owned(), found("new"), LIFE)]).await, 0);
        assert_eq!(l1.get_many(a, &["k"]).await[0].as_ref().map(|h| &h.value), Some(&found("new")));

        l1.clear().await;
        assert_eq!(
            l1.insert_many(b, after, [("z".to_owned(), found("z"), LIFE)]).await,
            1,
            "a clear refuses every older load"
        );
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(64 * 1024);
        let big = "x".repeat(1000);
        l1.insert_many(a, l1.stamp(), (0..1000).map(|i| (format!("k{i}"), found(&big), LIFE))).await;
        let (entries, bytes) = l1.size().await;
        assert!(bytes <= 64 * 1024, "{bytes} bytes");
        assert!(entries > 0 && entries < 1000, "{entries} entries");
    }

    #[tokio::test(start_paused = true)]
    async fn fresh_then_soft_then_expired() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(1 << 20);
        l1.insert_many(a, l1.stamp(), [("k".to_owned(), found("v"), LIFE)]).await;

        tokio::time::advance(Duration::from_millis(7_999)).await;
        let hit = l1.get_many(a, &["k"]).await.remove(0).unwrap();
        assert!(!hit.refresh, "before the soft expiry no refresh is due");

        tokio::time::advance(Duration::from_millis(1)).await;
        let hit = l1.get_many(a, &["k"]).await.remove(0).unwrap();
        assert_eq!(hit.value, found("v"), "past the soft expiry the old value is still served");
        assert!(hit.refresh, "and the first hit schedules the refresh");

        tokio::time::advance(Duration::from_millis(1_999)).await;
        assert!(l1.get_many(a, &["k"]).await[0].is_some(), "until the hard expiry");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None], "at the hard expiry it is a miss");
    }

    #[tokio::test]
    async fn with_no_room_l1_is_off() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(0);
        assert_eq!(l1.insert_many(a, l1.stamp(), [("k".to_owned(), found("v"), LIFE)]).await, 0);
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None]);
        assert_eq!(l1.size().await, (0, 0));
    }

    #[tokio::test(start_paused = true)]
    async fn expired_rows_stay_available_as_stale_for_the_grace_period_only() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(1 << 20).keep_stale(Duration::from_secs(60));
        l1.insert_many(a, l1.stamp(), [("k".to_owned(), found("v"), LIFE), ("no".to_owned(), Cached::Missing, LIFE)])
            .await;
        assert_eq!(l1.get_stale(a, &["k"]).await, vec![None], "a live entry is a hit, not stale");

        tokio::time::advance(LIFE.hard).await;
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None], "past its TTL a row is a miss");
        assert_eq!(l1.get_stale(a, &["k", "no"]).await, vec![Some(row("v")), None], "but is kept as stale");

        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(l1.get_stale(a, &["k"]).await, vec![None], "until the grace period ends");

        l1.insert_many(a, l1.stamp(), [("w".to_owned(), found("w"), LIFE)]).await;
        tokio::time::advance(LIFE.hard).await;
        l1.invalidate_many(a.id, &["w"]).await;
        assert_eq!(l1.get_stale(a, &["w"]).await, vec![None], "an invalidated row is never served");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresh_is_scheduled_once_and_again_after_a_failure() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(1 << 20);
        l1.insert_many(a, l1.stamp(), [("k".to_owned(), found("v"), LIFE)]).await;
        tokio::time::advance(Duration::from_secs(9)).await;
        let hits = l1.get_many(a, &["k", "k", "k"]).await;
        let winners = hits.iter().flatten().filter(|h| h.refresh).count();
        assert_eq!(winners, 1, "concurrent hits schedule one refresh");
        assert!(!l1.get_many(a, &["k"]).await[0].as_ref().unwrap().refresh);

        l1.refresh_failed(a, "k").await;
        let hit = l1.get_many(a, &["k"]).await.remove(0).unwrap();
        assert_eq!(hit.value, found("v"), "a failed refresh keeps the old value");
        assert!(hit.refresh, "and lets the next hit schedule another");

        l1.insert_many(a, l1.stamp(), [("k".to_owned(), found("new"), LIFE)]).await;
        let hit = l1.get_many(a, &["k"]).await.remove(0).unwrap();
        assert_eq!((hit.value, hit.refresh), (found("new"), false), "a completed refresh starts a fresh lifetime");
    }
}
