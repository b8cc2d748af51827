use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;
use moka::future::Cache;
use strata_core::{FeatureView, Row};

/// A cache key: the view's registry id and the entity key.
type Key = (u32, String);

#[derive(Debug)]
struct Entry {
    row: Arc<Row>,
    ttl: Duration,
}

/// Each entry lives for the TTL it was inserted with, whether new or
/// replacing an older entry.
struct PerEntryTtl;

impl Expiry<Key, Arc<Entry>> for PerEntryTtl {
    fn expire_after_create(&self, _: &Key, entry: &Arc<Entry>, _: Instant) -> Option<Duration> {
        Some(entry.ttl)
    }

    fn expire_after_update(&self, _: &Key, entry: &Arc<Entry>, _: Instant, _: Option<Duration>) -> Option<Duration> {
        Some(entry.ttl)
    }
}

/// The in-process cache. Cheap to clone; clones share the entries.
#[derive(Clone)]
pub struct L1Cache {
    cache: Cache<Key, Arc<Entry>>,
}

/// Per-entry bookkeeping of moka and of the key, counted in the weight so
/// that many tiny rows cannot exceed the byte bound by much.
const ENTRY_OVERHEAD: usize = 96;

impl L1Cache {
    /// A cache holding at most about `max_bytes` of rows.
    pub fn new(max_bytes: u64) -> L1Cache {
        let cache = Cache::builder()
            .weigher(|key: &Key, entry: &Arc<Entry>| {
                let bytes = ENTRY_OVERHEAD + key.1.len() + entry.row.approx_bytes();
                u32::try_from(bytes).unwrap_or(u32::MAX)
            })
            .max_capacity(max_bytes)
            .expire_after(PerEntryTtl)
            .build();
        L1Cache { cache }
    }

    /// Looks up a batch; the answer is aligned with `keys`.
    pub async fn get_many(&self, view: &FeatureView, keys: &[&str]) -> Vec<Option<Arc<Row>>> {
        let mut out = Vec::with_capacity(keys.len());
        for key in keys {
            let entry = self.cache.get(&(view.id, (*key).to_owned())).await;
            out.push(entry.map(|e| e.row.clone()));
        }
        out
    }

    /// Caches rows of a view for the view's L1 TTL.
    pub async fn insert_many(&self, view: &FeatureView, rows: impl IntoIterator<Item = (String, Arc<Row>)>) {
        for (key, row) in rows {
            self.cache.insert((view.id, key), Arc::new(Entry { row, ttl: view.l1_ttl })).await;
        }
    }

    pub async fn invalidate_many(&self, view: &FeatureView, keys: &[&str]) {
        for key in keys {
            self.cache.invalidate(&(view.id, (*key).to_owned())).await;
        }
    }

    /// Drops every entry.
    pub async fn clear(&self) {
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
mod tests {
    use strata_core::{EventTime, FeatureSpec, FeatureType, FeatureViewSpec, Registry, Value};

    use super::*;

    fn registry() -> Registry {
        let spec = |name: &str| FeatureViewSpec {
            name: name.into(),
            description: String::new(),
            features: vec![FeatureSpec { name: "s".into(), ty: FeatureType::String }],
            l1_ttl: Duration::from_secs(60),
            l2_ttl: Duration::from_secs(60),
        };
        Registry::new(vec![spec("a"), spec("b")]).unwrap()
    }

    fn row(s: &str) -> Arc<Row> {
        Arc::new(Row { event_time: EventTime(1), values: vec![Value::String(s.into())] })
    }

    #[tokio::test]
    async fn keys_of_different_views_do_not_collide() {
        let registry = registry();
        let (a, b) = (registry.get("a").unwrap(), registry.get("b").unwrap());
        let l1 = L1Cache::new(1 << 20);
        l1.insert_many(a, [("k".to_owned(), row("from a"))]).await;
        assert_eq!(l1.get_many(a, &["k", "x"]).await, vec![Some(row("from a")), None]);
        assert_eq!(l1.get_many(b, &["k"]).await, vec![None]);
        l1.invalidate_many(a, &["k"]).await;
        assert_eq!(l1.get_many(a, &["k"]).await, vec![None]);
    }

    #[tokio::test]
    async fn the_byte_bound_holds() {
        let registry = registry();
        let a = registry.get("a").unwrap();
        let l1 = L1Cache::new(64 * 1024);
        let big = "x".repeat(1000);
        l1.insert_many(a, (0..1000).map(|i| (format!("k{i}"), row(&big)))).await;
        let (entries, bytes) = l1.size().await;
        assert!(bytes <= 64 * 1024, "{bytes} bytes");
        assert!(entries > 0 && entries < 1000, "{entries} entries");
    }
}
