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
//! Write: PostgreSQL first, then drop the cached copies.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use rand::Rng;
use strata_cache_tiers::{Cached, L1Cache, L2Cache, RefreshQueue, RefreshTier, Reloader, SingleFlight};
use strata_core::{FeatureView, Lifetime, Row};
use strata_shard_router::{Fetched, ShardRouter, UpsertOutcome};

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
            Cached::Found(row) => Served::Found { row, source },
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
    lower: Arc<Lower>,
    flights: Arc<SingleFlight<(u32, String), Loaded>>,
    refresh: RefreshQueue,
}

/// L2 and L3: everything below L1.
struct Lower {
    l2: L2Cache,
    shards: ShardRouter,
    protection: Protection,
    /// For scheduling L2 refreshes; set once the queue exists.
    refresh: OnceLock<RefreshQueue>,
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
            (true, Cached::Found(_)) => Lifetime::jittered(ttl, view.jitter, view.refresh_ahead, sample()),
            // A negative entry is not refreshed ahead: it simply expires.
            (true, Cached::Missing) => Lifetime::jittered(view.negative_ttl, view.jitter, 1.0, sample()),
        }
    }

    /// Whether a value may be cached at all (negatives only with protection).
    fn cacheable(&self, value: &Cached) -> bool {
        self.enabled || matches!(value, Cached::Found(_))
    }
}

impl Tiers {
    pub fn new(l1: L1Cache, l2: L2Cache, shards: ShardRouter, protection: Protection) -> Tiers {
        let (capacity, concurrency) = (protection.refresh_queue, protection.refresh_concurrency);
        let lower = Arc::new(Lower { l2, shards, protection, refresh: OnceLock::new() });
        let refresh = RefreshQueue::start(l1.clone(), lower.clone(), capacity, concurrency);
        let _ = lower.refresh.set(refresh.clone());
        Tiers { l1, lower, flights: Arc::new(SingleFlight::default()), refresh }
    }

    pub fn l2(&self) -> &L2Cache {
        &self.lower.l2
    }

    pub fn shards(&self) -> &ShardRouter {
        &self.lower.shards
    }

    /// Answers distinct `keys` of `view`, aligned with `keys`.
    pub async fn read(&self, view: &Arc<FeatureView>, keys: &[&str]) -> Vec<Served> {
        let protection = &self.lower.protection;
        let mut out: Vec<Option<Served>> = vec![None; keys.len()];

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
        if misses.is_empty() {
            return out.into_iter().flatten().collect();
        }

        let loaded = if protection.enabled {
            self.load_coalesced(view, keys, &misses).await
        } else {
            let miss_keys: Vec<&str> = misses.iter().map(|&i| keys[i]).collect();
            let loaded = self.lower.load(view, &miss_keys).await;
            self.fill_l1(view, &miss_keys, &loaded).await;
            loaded
        };
        for (i, loaded) in misses.into_iter().zip(loaded) {
            out[i] = Some(match loaded {
                Loaded::Value { value, source } => Served::new(value, source),
                Loaded::Unavailable => Served::Unavailable,
            });
        }
        out.into_iter().flatten().collect()
    }

    /// Loads the keys at `misses` with single flight: keys another request
    /// is loading are waited for; the rest are loaded here, once.
    async fn load_coalesced(&self, view: &Arc<FeatureView>, keys: &[&str], misses: &[usize]) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; misses.len()];
        let claim = self.flights.claim(misses.iter().map(|&i| (view.id, keys[i].to_owned())).collect());
        let mut leader = claim.leader;

        let lead_keys: Vec<&str> = claim.lead.iter().map(|&j| keys[misses[j]]).collect();
        let lead = async {
            let loaded = self.lower.load(view, &lead_keys).await;
            self.fill_l1(view, &lead_keys, &loaded).await;
            for (key, loaded) in lead_keys.iter().zip(&loaded) {
                leader.complete(&(view.id, (*key).to_owned()), loaded.clone());
            }
            loaded
        };
        let waits =
            futures::future::join_all(claim.wait.into_iter().map(|(j, w)| async move { (j, w.result().await) }));
        let (led, waited) = tokio::join!(lead, waits);
        for (&j, loaded) in claim.lead.iter().zip(led) {
            out[j] = Some(loaded);
        }
        let mut orphans = Vec::new();
        let mut coalesced = 0u64;
        for (j, result) in waited {
            match result {
                Some(loaded) => {
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
            // Their leader's request was cancelled: load them here.
            let orphan_keys: Vec<&str> = orphans.iter().map(|&j| keys[misses[j]]).collect();
            let loaded = self.lower.load(view, &orphan_keys).await;
            self.fill_l1(view, &orphan_keys, &loaded).await;
            for (j, loaded) in orphans.into_iter().zip(loaded) {
                out[j] = Some(loaded);
            }
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    async fn fill_l1(&self, view: &FeatureView, keys: &[&str], loaded: &[Loaded]) {
        let protection = &self.lower.protection;
        let entries = keys.iter().zip(loaded).filter_map(|(key, loaded)| match loaded {
            Loaded::Value { value, .. } if protection.cacheable(value) => {
                Some(((*key).to_owned(), value.clone(), protection.lifetime(view, value, view.l1_ttl)))
            }
            _ => None,
        });
        self.l1.insert_many(view, entries.collect::<Vec<_>>()).await;
    }

    /// Writes distinct rows to their shards, then drops every cached copy of
    /// the rows that were applied (negative entries included), so the next
    /// read sees them.
    pub async fn write(&self, view: &FeatureView, rows: &[(String, Row)]) -> UpsertOutcome {
        let outcome = self.lower.shards.upsert(view, rows).await;
        let written: Vec<&str> = outcome.written.iter().map(String::as_str).collect();
        self.l1.invalidate_many(view, &written).await;
        if let Err(error) = self.lower.l2.delete_many(view, &written).await {
            // The Redis copy stays until its TTL ends; counted so it shows.
            tracing::warn!(view = %view.name, keys = written.len(), %error, "redis invalidation failed");
            metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "delete").increment(1);
        }
        outcome
    }
}

impl Lower {
    /// Loads distinct keys from L2, then PostgreSQL; aligned with `keys`.
    async fn load(&self, view: &Arc<FeatureView>, keys: &[&str]) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        let (hits, l2_up) = match self.l2.get_many(view, keys).await {
            Ok(hits) => (hits, true),
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
            self.load_under_leases(view, &miss_keys).await
        } else {
            self.fetch_and_fill(view, &miss_keys).await
        };
        for (i, loaded) in misses.into_iter().zip(loaded) {
            out[i] = Some(loaded);
        }
        out.into_iter().flatten().collect()
    }

    /// For keys missing in Redis: where this instance takes the key's lease
    /// it reads PostgreSQL and fills Redis; elsewhere it waits for the lease
    /// holder's result in Redis, and reads PostgreSQL itself only if none
    /// comes within the lease TTL.
    async fn load_under_leases(&self, view: &Arc<FeatureView>, keys: &[&str]) -> Vec<Loaded> {
        let won = match self.l2.try_leases(view, keys, self.protection.lease_ttl).await {
            Ok(won) => won,
            Err(error) => {
                tracing::warn!(view = %view.name, %error, "redis lease failed; going to postgres");
                return self.fetch_and_fill(view, keys).await;
            }
        };
        let (mine, theirs): (Vec<usize>, Vec<usize>) = (0..keys.len()).partition(|&i| won[i]);
        count_leases(view, mine.len(), theirs.len());
        let mine_keys: Vec<&str> = mine.iter().map(|&i| keys[i]).collect();
        let theirs_keys: Vec<&str> = theirs.iter().map(|&i| keys[i]).collect();
        let load_mine = async {
            if mine_keys.is_empty() {
                return Vec::new();
            }
            // Another instance may have filled a key between our miss and
            // our lease (it reloaded and released in that window): look once
            // more before going to PostgreSQL.
            let mut loaded: Vec<Option<Loaded>> = match self.l2.get_many(view, &mine_keys).await {
                Ok(hits) => hits
                    .into_iter()
                    .map(|hit| hit.map(|hit| Loaded::Value { value: hit.value, source: Source::L2 }))
                    .collect(),
                Err(_) => vec![None; mine_keys.len()],
            };
            let cold: Vec<usize> = (0..mine_keys.len()).filter(|&i| loaded[i].is_none()).collect();
            let cold_keys: Vec<&str> = cold.iter().map(|&i| mine_keys[i]).collect();
            if !cold_keys.is_empty() {
                for (i, fetched) in cold.into_iter().zip(self.fetch_and_fill(view, &cold_keys).await) {
                    loaded[i] = Some(fetched);
                }
            }
            let loaded: Vec<Loaded> = loaded.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect();
            if let Err(error) = self.l2.release_leases(view, &mine_keys).await {
                tracing::debug!(view = %view.name, %error, "releasing leases failed; they expire by themselves");
            }
            loaded
        };
        let (mine_loaded, theirs_loaded) = tokio::join!(load_mine, self.wait_for_holders(view, &theirs_keys));
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        for (i, loaded) in mine.into_iter().zip(mine_loaded).chain(theirs.into_iter().zip(theirs_loaded)) {
            out[i] = Some(loaded);
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    /// Polls Redis for keys another instance is reloading, with backoff, up
    /// to the lease TTL; what did not arrive is read from PostgreSQL.
    async fn wait_for_holders(&self, view: &Arc<FeatureView>, keys: &[&str]) -> Vec<Loaded> {
        let mut out: Vec<Option<Loaded>> = vec![None; keys.len()];
        let deadline = tokio::time::Instant::now() + self.protection.lease_ttl;
        let mut delay = Duration::from_millis(2);
        let mut pending: Vec<usize> = (0..keys.len()).collect();
        while !pending.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_millis(50));
            let pending_keys: Vec<&str> = pending.iter().map(|&i| keys[i]).collect();
            let Ok(hits) = self.l2.get_many(view, &pending_keys).await else { break };
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
            for (i, loaded) in pending.iter().zip(self.fetch_and_fill(view, &late).await) {
                out[*i] = Some(loaded);
            }
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    /// Reads PostgreSQL and fills Redis with what it found (and, with
    /// protection, with what does not exist).
    async fn fetch_and_fill(&self, view: &Arc<FeatureView>, keys: &[&str]) -> Vec<Loaded> {
        let loaded: Vec<Loaded> = self
            .shards
            .fetch(view, keys)
            .await
            .into_iter()
            .map(|fetched| match fetched {
                Fetched::Found(row) => Loaded::Value { value: Cached::Found(Arc::new(row)), source: Source::L3 },
                Fetched::NotFound => Loaded::Value { value: Cached::Missing, source: Source::L3 },
                Fetched::Unavailable => Loaded::Unavailable,
            })
            .collect();
        let fills: Vec<(&str, Option<&Row>, Lifetime)> = keys
            .iter()
            .zip(&loaded)
            .filter_map(|(key, loaded)| match loaded {
                Loaded::Value { value, .. } if self.protection.cacheable(value) => {
                    let row = match value {
                        Cached::Found(row) => Some(row.as_ref()),
                        Cached::Missing => None,
                    };
                    Some((*key, row, self.protection.lifetime(view, value, view.l2_ttl)))
                }
                _ => None,
            })
            .collect();
        if let Err(error) = self.l2.set_many(view, &fills).await {
            tracing::warn!(view = %view.name, keys = fills.len(), %error, "redis fill failed");
            metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "set").increment(1);
        }
        loaded
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
        let loaded = match tier {
            RefreshTier::L1 => self.load(&view, &key_refs).await,
            RefreshTier::L2 => {
                // Of all instances that saw the stale entry, the lease holder
                // reloads it; the rest keep serving what they have.
                let won = self.l2.try_leases(&view, &key_refs, self.protection.lease_ttl).await.unwrap_or_default();
                let mine: Vec<&str> = key_refs.iter().zip(&won).filter(|(_, w)| **w).map(|(k, _)| *k).collect();
                count_leases(&view, mine.len(), keys.len() - mine.len());
                let mut fresh = self.fetch_and_fill(&view, &mine).await.into_iter();
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
