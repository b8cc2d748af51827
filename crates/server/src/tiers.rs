//! The read and write paths across the three tiers, on whole batches.
//!
//! Read: L1 (moka) → misses to L2 (Redis, one pipeline) → misses to L3
//! (PostgreSQL, one query per shard, shards in parallel); every miss fills
//! the tiers above it. Write: PostgreSQL first, then drop the cached copies.

use std::sync::Arc;

use strata_cache_tiers::{L1Cache, L2Cache};
use strata_core::{FeatureView, Row};
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

/// The three tiers of one server. Cheap to clone.
#[derive(Clone)]
pub struct Tiers {
    pub l1: L1Cache,
    pub l2: L2Cache,
    pub shards: ShardRouter,
}

impl Tiers {
    /// Answers distinct `keys` of `view`, aligned with `keys`.
    pub async fn read(&self, view: &FeatureView, keys: &[&str]) -> Vec<Served> {
        let mut out: Vec<Option<Served>> = vec![None; keys.len()];

        let mut misses = Vec::new();
        for (i, hit) in self.l1.get_many(view, keys).await.into_iter().enumerate() {
            match hit {
                Some(row) => out[i] = Some(Served::Found { row, source: Source::L1 }),
                None => misses.push(i),
            }
        }
        count_lookups(view, Source::L1, keys.len() - misses.len(), misses.len());
        if misses.is_empty() {
            return out.into_iter().flatten().collect();
        }

        let miss_keys: Vec<&str> = misses.iter().map(|&i| keys[i]).collect();
        let l2 = match self.l2.get_many(view, &miss_keys).await {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(view = %view.name, keys = miss_keys.len(), %error, "redis read failed; going to postgres");
                metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "get").increment(1);
                vec![None; miss_keys.len()]
            }
        };
        let mut to_l1 = Vec::new();
        let mut l3 = Vec::new();
        for (i, hit) in misses.into_iter().zip(l2) {
            match hit {
                Some(row) => {
                    let row = Arc::new(row);
                    to_l1.push((keys[i].to_owned(), row.clone()));
                    out[i] = Some(Served::Found { row, source: Source::L2 });
                }
                None => l3.push(i),
            }
        }
        count_lookups(view, Source::L2, to_l1.len(), l3.len());

        if !l3.is_empty() {
            let l3_keys: Vec<&str> = l3.iter().map(|&i| keys[i]).collect();
            let mut to_l2 = Vec::new();
            for (i, fetched) in l3.into_iter().zip(self.shards.fetch(view, &l3_keys).await) {
                out[i] = Some(match fetched {
                    Fetched::Found(row) => {
                        let row = Arc::new(row);
                        to_l2.push((keys[i], row.clone()));
                        to_l1.push((keys[i].to_owned(), row.clone()));
                        Served::Found { row, source: Source::L3 }
                    }
                    Fetched::NotFound => Served::NotFound { source: Source::L3 },
                    Fetched::Unavailable => Served::Unavailable,
                });
            }
            let to_l2: Vec<(&str, &Row)> = to_l2.iter().map(|(k, r)| (*k, r.as_ref())).collect();
            if let Err(error) = self.l2.set_many(view, &to_l2).await {
                tracing::warn!(view = %view.name, keys = to_l2.len(), %error, "redis fill failed");
                metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "set").increment(1);
            }
        }
        self.l1.insert_many(view, to_l1).await;
        out.into_iter().flatten().collect()
    }

    /// Writes distinct rows to their shards, then drops every cached copy of
    /// the rows that were applied, so the next read sees them.
    pub async fn write(&self, view: &FeatureView, rows: &[(String, Row)]) -> UpsertOutcome {
        let outcome = self.shards.upsert(view, rows).await;
        let written: Vec<&str> = outcome.written.iter().map(String::as_str).collect();
        self.l1.invalidate_many(view, &written).await;
        if let Err(error) = self.l2.delete_many(view, &written).await {
            // The Redis copy stays until its TTL ends; counted so it shows.
            tracing::warn!(view = %view.name, keys = written.len(), %error, "redis invalidation failed");
            metrics::counter!("strata_cache_errors_total", "tier" => "l2", "op" => "delete").increment(1);
        }
        outcome
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
