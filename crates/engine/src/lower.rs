use std::sync::Arc;
use std::time::Duration;

use strata_cache_tiers::{Cached, L2Cache, L2Error, Put, RefreshTier, Reloader};
use strata_core::{Content, EventTime, FeatureView, Lifetime};
use strata_shard_router::Fetched;
use tokio::time::Instant;

use crate::{BACKGROUND_BUDGET, Loaded, Lower, Protection, Source, count_leases, count_lookups, count_negative_hits};

impl Lower {
    /// Loads distinct keys from L2, then PostgreSQL; aligned with `keys`.
    /// The lookup is plain GETs: a Lua call per key, to take the lease in
    /// the same round trip, cost the L2 hit path three quarters of its
    /// throughput (BENCHMARKS.md), for a cold path that PostgreSQL and the
    /// fill bound anyway. Misses take their leases in one call per key.
    pub(crate) async fn load(&self, view: &Arc<FeatureView>, keys: &[&str], deadline: Instant) -> Vec<Loaded> {
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
                    if hit.stale()
                        && self.protection.enabled
                        && let Some(queue) = self.refresh.get()
                    {
                        queue.schedule(RefreshTier::L2, view, keys[i]).await;
                    }
                    negative_hits += usize::from(hit.value == Cached::Missing);
                    out[i] = Some(Loaded::from_l2(hit));
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
    pub(crate) async fn load_under_leases(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        deadline: Instant,
    ) -> Vec<Loaded> {
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
                    out[i] = Some(Loaded::from_l2(hit));
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
        // A key whose shard's primary is down is not waited for: its holder
        // will not fill it (a replica's answer is not cached then), and
        // waiting would hold up the rest of the batch (and every request
        // waiting on this one) for half its deadline. It is read here: a
        // replica may answer, else the refusal is immediate.
        let (theirs, down): (Vec<usize>, Vec<usize>) = theirs
            .into_iter()
            .partition(|&i| self.shards.shard_of(view, keys[i]).is_some_and(|s| self.shards.available(s)));
        let theirs_keys: Vec<&str> = theirs.iter().map(|&i| keys[i]).collect();
        let down_keys: Vec<&str> = down.iter().map(|&i| keys[i]).collect();
        let load_mine = async {
            if mine_keys.is_empty() {
                return Vec::new();
            }
            self.fetch_then_fill(view, &mine_keys, leases, deadline).await
        };
        let load_down = async {
            if down_keys.is_empty() {
                return Vec::new();
            }
            self.fetch_then_fill(view, &down_keys, Leases::none(&self.l2, view), deadline).await
        };
        let (mine_loaded, theirs_loaded, down_loaded) =
            tokio::join!(load_mine, self.wait_for_holders(view, &theirs_keys, deadline), load_down);
        let loaded = mine.into_iter().zip(mine_loaded).chain(theirs.into_iter().zip(theirs_loaded));
        for (i, loaded) in loaded.chain(down.into_iter().zip(down_loaded)) {
            out[i] = Some(loaded);
        }
        out.into_iter().map(|l| l.unwrap_or(Loaded::Unavailable)).collect()
    }

    /// Polls Redis for keys another instance is reloading, with backoff, up
    /// to the lease TTL; what did not arrive is read from PostgreSQL. Half
    /// the time left to the request at most is spent waiting, so the read
    /// of PostgreSQL still has the other half.
    pub(crate) async fn wait_for_holders(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        deadline: Instant,
    ) -> Vec<Loaded> {
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
                    Some(hit) => out[i] = Some(Loaded::from_l2(hit)),
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
    pub(crate) async fn fetch_and_fill(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        deadline: Instant,
    ) -> Vec<Loaded> {
        let (loaded, stored) = self.fetch_and_put(view, keys, deadline).await;
        count_fill_error(view, keys.len(), stored);
        loaded.into_iter().map(|(loaded, _)| loaded).collect()
    }

    /// Reads PostgreSQL and answers; Redis is filled in the background
    /// (the answer does not wait on Redis), and `leases` are released once
    /// it is, so instances waiting on them find the fill.
    pub(crate) async fn fetch_then_fill(
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
    pub(crate) async fn fetch_and_put(
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
    pub(crate) async fn fetch(
        &self,
        view: &Arc<FeatureView>,
        keys: &[&str],
        deadline: Instant,
    ) -> Vec<(Loaded, EventTime)> {
        let fetched: Vec<(Loaded, EventTime)> = self
            .shards
            .fetch_marked(view, keys, deadline)
            .await
            .into_iter()
            .map(|(fetched, behind)| match fetched {
                Fetched::Found(row) => {
                    let version = row.event_time;
                    (Loaded::from_shard(Cached::Found(Arc::new(row)), behind), version)
                }
                Fetched::NotFound => (Loaded::from_shard(Cached::Missing, behind), EventTime::NEVER),
                Fetched::Deleted(at) => (Loaded::from_shard(Cached::Missing, behind), at),
                Fetched::Unavailable => (Loaded::Unavailable, EventTime::NEVER),
            })
            .collect();
        self.fill_hook(&view.name, keys).await;
        fetched
    }
}

/// Redis leases this instance holds on keys of a view: released once
/// their keys are filled ([`Leases::release`]), or, if dropped before that
/// (the request was cancelled while reading PostgreSQL), released in the
/// background at once, so other instances and this one's waiters do not
/// stall until the leases expire.
pub(crate) struct Leases {
    l2: L2Cache,
    view: Arc<FeatureView>,
    keys: Vec<String>,
}

impl Leases {
    pub(crate) fn held(l2: &L2Cache, view: &Arc<FeatureView>, keys: &[&str]) -> Leases {
        Leases { l2: l2.clone(), view: view.clone(), keys: keys.iter().map(|k| (*k).to_owned()).collect() }
    }

    pub(crate) fn none(l2: &L2Cache, view: &Arc<FeatureView>) -> Leases {
        Leases::held(l2, view, &[])
    }

    /// The keys, for a caller that releases the leases itself.
    pub(crate) fn disarm(mut self) -> Vec<String> {
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

pub(crate) async fn release_leases(l2: &L2Cache, view: &FeatureView, keys: Vec<String>) {
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
pub(crate) async fn fill_l2(
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
pub(crate) fn fills<'a>(
    protection: &Protection,
    view: &FeatureView,
    keys: &[&'a str],
    fetched: &'a [(Loaded, EventTime)],
) -> Vec<Put<'a>> {
    keys.iter()
        .zip(fetched)
        .filter_map(|(key, (loaded, version))| match loaded {
            Loaded::Value { value, behind: false, .. } if protection.cacheable(value) => {
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

pub(crate) fn count_fill_error(view: &FeatureView, keys: usize, stored: Result<(), L2Error>) {
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
                Loaded::Value { value, l2_fresh_for, behind: false, .. } if self.protection.cacheable(&value) => {
                    let life = self.protection.l1_lifetime(&view, &value, l2_fresh_for);
                    Some((value, life))
                }
                _ => None,
            })
            .collect()
    }
}
