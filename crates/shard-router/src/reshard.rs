//! The steps `strata reshard` is made of, each on one shard given by its
//! config index: scanning a view's keys in order, reading rows whole
//! (tombstones included), putting them on another shard with the event-time
//! rule, removing moved rows, and the copy's resumable cursor. Every write
//! is fenced by the map's epoch like any other.

use strata_core::{EventTime, FeatureView};

use crate::sql::{self, table};
use crate::{Fetched, ShardError, ShardRouter};

impl ShardRouter {
    /// Up to `limit` keys of `view` on shard `shard` (tombstones included),
    /// in key order, after `after`.
    pub async fn scan_keys(
        &self,
        shard: usize,
        view: &FeatureView,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<String>, ShardError> {
        let shard = &self.shards[shard];
        let client = shard.client().await?;
        let sql = format!(
            "SELECT entity_key FROM {} WHERE $1::text IS NULL OR entity_key > $1 ORDER BY entity_key LIMIT $2",
            table(view)
        );
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client.query(&sql, &[&after, &limit]).await.map_err(|e| shard.query_error(e))?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The rows of `keys` on shard `shard` itself, whatever the map says,
    /// aligned with `keys`.
    pub async fn fetch_on(
        &self,
        shard: usize,
        view: &FeatureView,
        keys: &[&str],
        deadline: tokio::time::Instant,
    ) -> Result<Vec<Fetched>, ShardError> {
        let mut found = self.fetch_primary(&self.shards[shard], view, keys, deadline).await?;
        Ok(keys
            .iter()
            .map(|key| match found.remove(*key) {
                Some(sql::Selected::Row(row)) => Fetched::Found(row),
                Some(sql::Selected::Deleted(at)) => Fetched::Deleted(at),
                Some(sql::Selected::Unreadable) => Fetched::Unavailable,
                None => Fetched::NotFound,
            })
            .collect())
    }

    /// Puts rows read from another shard onto shard `shard`: each replaces
    /// the stored row only if newer, a tombstone as a deletion at its time.
    /// Rows not found or unreadable are left out (the caller checks).
    pub async fn put_on(
        &self,
        shard: usize,
        view: &FeatureView,
        rows: Vec<(String, Fetched)>,
        deadline: tokio::time::Instant,
    ) -> Result<(), ShardError> {
        let mut found = Vec::new();
        let mut deleted: Vec<(EventTime, String)> = Vec::new();
        for (key, fetched) in rows {
            match fetched {
                Fetched::Found(row) => found.push((key, row)),
                Fetched::Deleted(at) => deleted.push((at, key)),
                Fetched::NotFound | Fetched::Unavailable => {}
            }
        }
        if !found.is_empty() {
            self.copy_upsert(shard, view, &found, deadline).await?;
        }
        deleted.sort();
        let epoch = self.routing().map.epoch;
        let target = &self.shards[shard];
        for group in deleted.chunk_by(|a, b| a.0 == b.0) {
            let at = group[0].0;
            let keys: Vec<String> = group.iter().map(|(_, k)| k.clone()).collect();
            self.with_conflict_retries(target, "delete", deadline, || {
                target.delete(view, keys.iter().collect(), at, epoch)
            })
            .await?;
        }
        Ok(())
    }

    /// Removes the rows of `keys` from shard `shard` outright (no
    /// tombstone): for rows a finished reshard moved elsewhere.
    pub async fn remove_on(&self, shard: usize, view: &FeatureView, keys: &[String]) -> Result<u64, ShardError> {
        let epoch = self.routing().map.epoch;
        let shard = &self.shards[shard];
        let mut client = shard.client().await?;
        let tx = client.transaction().await.map_err(|e| shard.query_error(e))?;
        shard.fence(&tx, epoch).await?;
        let sql = format!("DELETE FROM {} WHERE entity_key = ANY($1)", table(view));
        let removed = tx.execute(&sql, &[&keys]).await.map_err(|e| shard.query_error(e))?;
        tx.commit().await.map_err(|e| shard.query_error(e))?;
        Ok(removed)
    }

    /// Where the copy of `view` from shard `shard` stopped under map
    /// `epoch`: the last key done and the rows copied so far.
    pub async fn cursor(
        &self,
        shard: usize,
        view: &FeatureView,
        epoch: u64,
    ) -> Result<Option<(String, u64)>, ShardError> {
        let shard = &self.shards[shard];
        let client = shard.client().await?;
        let epoch = i64::try_from(epoch).unwrap_or(i64::MAX);
        let row = client
            .query_opt(
                "SELECT last_key, copied FROM strata.reshard_progress WHERE view = $1 AND epoch = $2",
                &[&view.name, &epoch],
            )
            .await
            .map_err(|e| shard.query_error(e))?;
        Ok(row.map(|r| (r.get(0), r.get::<_, i64>(1).unsigned_abs())))
    }

    /// Records where the copy of `view` from shard `shard` is.
    pub async fn save_cursor(
        &self,
        shard: usize,
        view: &FeatureView,
        epoch: u64,
        last_key: &str,
        copied: u64,
    ) -> Result<(), ShardError> {
        let shard = &self.shards[shard];
        let client = shard.client().await?;
        let (epoch, copied) = (i64::try_from(epoch).unwrap_or(i64::MAX), i64::try_from(copied).unwrap_or(i64::MAX));
        client
            .execute(
                "INSERT INTO strata.reshard_progress VALUES ($1, $2, $3, $4) ON CONFLICT (view) DO UPDATE \
                 SET epoch = EXCLUDED.epoch, last_key = EXCLUDED.last_key, copied = EXCLUDED.copied",
                &[&view.name, &epoch, &last_key, &copied],
            )
            .await
            .map_err(|e| shard.query_error(e))?;
        Ok(())
    }

    /// Config indexes of the map's shards, in map order; `Err(name)` for one
    /// this instance's configuration lacks.
    pub fn map_shards(&self) -> Vec<Result<usize, String>> {
        let routing = self.routing();
        routing.index.iter().zip(&routing.map.shards).map(|(index, name)| index.ok_or_else(|| name.clone())).collect()
    }
}
