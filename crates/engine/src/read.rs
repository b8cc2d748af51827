use std::sync::Arc;

use strata_cache_tiers::{Cached, RefreshTier, Stamp};
use strata_core::{EventTime, FeatureView};
use tokio::time::Instant;

use crate::{BACKGROUND_BUDGET, Loaded, Served, Source, Tiers, count_lookups, count_negative_hits, sample};

impl Tiers {
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
            let mut behind_served = 0;
            for (i, loaded) in misses.into_iter().zip(loaded) {
                out[i] = Some(match loaded {
                    Loaded::Value { value, source, behind: true, .. } => match Served::new(value, source) {
                        Served::Found { row, source, .. } => {
                            behind_served += 1;
                            Served::Found { row, source, stale: true }
                        }
                        other => other,
                    },
                    Loaded::Value { value, source, .. } => Served::new(value, source),
                    Loaded::Unavailable => {
                        unavailable.push(i);
                        Served::Unavailable
                    }
                });
            }
            if behind_served > 0 {
                metrics::counter!("strata_stale_served_total", "view" => view.name.clone()).increment(behind_served);
            }
            if !unavailable.is_empty() {
                self.serve_stale(view, keys, &unavailable, &mut out).await;
            }
        }
        let mut out: Vec<Served> = out.into_iter().flatten().collect();
        if self.lower.shards.degraded() {
            self.mark_stale(view, keys, &mut out);
        }
        record_ages(view, &out);
        out
    }

    /// Answers keys whose shard could not be read from L1 copies past
    /// their TTL, if kept (stale-if-error).
    pub(crate) async fn serve_stale(
        &self,
        view: &FeatureView,
        keys: &[&str],
        at: &[usize],
        out: &mut [Option<Served>],
    ) {
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
    pub(crate) fn mark_stale(&self, view: &FeatureView, keys: &[&str], out: &mut [Served]) {
        let shards = &self.lower.shards;
        let down: Vec<bool> = (0..shards.shard_count()).map(|s| !shards.available(s)).collect();
        let mut marked = 0;
        for (key, served) in keys.iter().zip(out) {
            if let Served::Found { stale, source, .. } = served
                && !*stale
                && *source != Source::L3
                && shards.shard_of(view, key).is_none_or(|s| down[s])
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
    pub(crate) async fn load_coalesced(
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

    pub(crate) async fn fill_l1(&self, view: &FeatureView, stamp: Stamp, keys: &[&str], loaded: &[Loaded]) {
        let protection = &self.lower.protection;
        let entries = keys.iter().zip(loaded).filter_map(|(key, loaded)| match loaded {
            Loaded::Value { value, l2_fresh_for, behind: false, .. } if protection.cacheable(value) => {
                Some(((*key).to_owned(), value.clone(), protection.l1_lifetime(view, value, *l2_fresh_for)))
            }
            _ => None,
        });
        self.l1.insert_many(view, stamp, entries.collect::<Vec<_>>()).await;
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
}

/// Records how old each served value is (now minus its event time), per
/// view: freshness as the model sees it, whichever tier answered. A value
/// stamped ahead of this server's clock counts as 0.
fn record_ages(view: &FeatureView, served: &[Served]) {
    let now = EventTime::from_system_time(std::time::SystemTime::now());
    let mut rows = served.iter().filter_map(|served| match served {
        Served::Found { row, .. } => Some(row),
        _ => None,
    });
    let Some(first) = rows.next() else { return };
    let ages = metrics::histogram!("strata_served_age_seconds", "view" => view.name.clone());
    for row in std::iter::once(first).chain(rows) {
        let micros = now.0.saturating_sub(row.event_time.0).max(0);
        ages.record(micros as f64 / 1e6);
    }
}
