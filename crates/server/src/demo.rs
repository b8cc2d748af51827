//! The deterministic demo data set: `user_features` by user, `item_features`
//! by item (an int64 join key) and `user_item_features` by user and item (a
//! composite key), the same values on every machine, so the README's sample
//! lookups always answer the same. The items of a user×item row are the
//! user's `recent_item_ids`, so a ranking lookup finds all three views.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use strata_core::{EventTime, FeatureType, FeatureView, KeyValue, Row, Value};

use strata_engine::Tiers;

/// The demo data set's event time: 2026-01-01T00:00:00Z.
pub const DEMO_EPOCH_SECONDS: i64 = 1_767_225_600;

/// Rows written per batch, and batches in flight at once.
const BATCH: usize = 1_000;
const IN_FLIGHT: usize = 4;

const COUNTRIES: [&str; 10] = ["US", "DE", "FR", "GB", "JP", "BR", "IN", "CA", "AU", "ES"];

/// The key of demo entity `i` (1-based): `user_000001`, `user_000002`, ...
pub fn demo_key(i: u64) -> String {
    format!("user_{i:06}")
}

/// splitmix64: a tiny, well-mixed generator, so the data needs no RNG crate
/// whose output could change between versions.
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The row of demo entity `i` in a view shaped like `user_features`. Any
/// view with the same feature names and types can hold it.
pub fn demo_row(view: &FeatureView, i: u64) -> Row {
    let mut state = i;
    let mut next = || splitmix(&mut state);
    let values = view
        .features
        .iter()
        .map(|f| match (f.name.as_str(), f.ty) {
            ("age", FeatureType::Int64) => Value::Int64(18 + (next() % 62) as i64),
            ("lifetime_value", FeatureType::Double) => Value::Double((next() % 500_000) as f64 / 100.0),
            ("country", FeatureType::String) => Value::String(COUNTRIES[(next() % 10) as usize].into()),
            ("is_premium", FeatureType::Bool) => Value::Bool(next() % 5 == 0),
            ("purchases_30d", FeatureType::Int64) => Value::Int64((next() % 40) as i64),
            ("embedding", FeatureType::FloatList) => Value::FloatList(
                // Values in [-1, 1) with 1/1024 steps: exact in f32 and in JSON.
                (0..16).map(|_| ((next() % 2048) as f32 - 1024.0) / 1024.0).collect(),
            ),
            ("recent_item_ids", FeatureType::Int64List) => {
                let n = 1 + next() % 5;
                Value::Int64List((0..n).map(|_| 1_000 + (next() % 9_000) as i64).collect())
            }
            _ => Value::Null,
        })
        .collect();
    Row { event_time: EventTime((DEMO_EPOCH_SECONDS + i as i64) * 1_000_000), values }
}

/// The README's ranking lookup: demo user 1 and candidate items through
/// the `ranker_v1` service (the first two are among the user's recent items,
/// so the pair view has them; the third is not).
pub const RANKER_EXAMPLE: &str = concat!(
    r#"{"feature_service":"ranker_v1","entities":{"#,
    r#""user_id":{"values":[{"string_value":"user_000001"},{"string_value":"user_000001"},{"string_value":"user_000001"}]},"#,
    r#""item_id":{"values":[{"int64_value":"8485"},{"int64_value":"5676"},{"int64_value":"1234"}]}}}"#
);

/// Demo items: ids 1000 to 9999, the range of `recent_item_ids`.
pub const DEMO_ITEMS: std::ops::RangeInclusive<i64> = 1_000..=9_999;

/// Users with user×item rows at most (their recent items each).
pub const DEMO_PAIR_USERS: u64 = 2_000;

const CATEGORIES: [&str; 6] = ["books", "games", "garden", "kitchen", "music", "sports"];

/// The row of demo item `id` in a view shaped like `item_features`.
pub fn demo_item_row(view: &FeatureView, id: i64) -> Row {
    let mut state = id as u64 ^ 0x17E4;
    let mut next = || splitmix(&mut state);
    let values = view
        .features
        .iter()
        .map(|f| match (f.name.as_str(), f.ty) {
            ("price", FeatureType::Double) => Value::Double((100 + next() % 20_000) as f64 / 100.0),
            ("category", FeatureType::String) => Value::String(CATEGORIES[(next() % 6) as usize].into()),
            ("popularity", FeatureType::Double) => Value::Double((next() % 1_000) as f64 / 1_000.0),
            ("embedding", FeatureType::FloatList) => {
                Value::FloatList((0..8).map(|_| ((next() % 2048) as f32 - 1024.0) / 1024.0).collect())
            }
            _ => Value::Null,
        })
        .collect();
    Row { event_time: EventTime((DEMO_EPOCH_SECONDS + id) * 1_000_000), values }
}

/// The row of demo user `user` (1-based) and item `item` in a view shaped
/// like `user_item_features`.
pub fn demo_pair_row(view: &FeatureView, user: u64, item: i64) -> Row {
    let mut state = user.wrapping_mul(10_007) ^ item as u64;
    let mut next = || splitmix(&mut state);
    let values = view
        .features
        .iter()
        .map(|f| match (f.name.as_str(), f.ty) {
            ("clicks_30d", FeatureType::Int64) => Value::Int64((next() % 25) as i64),
            ("affinity", FeatureType::Double) => Value::Double((next() % 1_000) as f64 / 1_000.0),
            _ => Value::Null,
        })
        .collect();
    Row { event_time: EventTime((DEMO_EPOCH_SECONDS + user as i64) * 1_000_000), values }
}

/// The recent items of demo user `i`, as `user_features` has them.
fn recent_items(users: &FeatureView, i: u64) -> Vec<i64> {
    let row = demo_row(users, i);
    let column = users.position("recent_item_ids");
    match column.map(|c| &row.values[c]) {
        Some(Value::Int64List(ids)) => ids.clone(),
        _ => Vec::new(),
    }
}

/// The key text of a demo row of `view`, from its join keys.
fn key_of(view: &FeatureView, values: &[(&str, KeyValue<'_>)]) -> Result<String> {
    let encoded = view.entity.encode(values.iter().copied(), usize::MAX)?;
    Ok(view.entity.key_text(&encoded))
}

/// Writes the demo items into `items` and, for the first
/// [`DEMO_PAIR_USERS`] users of `count`, a user×item row per recent item into
/// `pairs`. Returns the rows written to each.
pub async fn load_items(
    tiers: &Tiers,
    users: &FeatureView,
    items: &Arc<FeatureView>,
    pairs: &Arc<FeatureView>,
    count: u64,
) -> Result<(u64, u64)> {
    let mut item_rows = Vec::with_capacity(DEMO_ITEMS.count());
    for id in DEMO_ITEMS {
        item_rows.push((key_of(items, &[("item_id", KeyValue::Int64(id))])?, demo_item_row(items, id)));
    }
    let mut pair_rows = Vec::new();
    for user in 1..=count.min(DEMO_PAIR_USERS) {
        let user_key = demo_key(user);
        let mut seen = Vec::new();
        for item in recent_items(users, user) {
            if seen.contains(&item) {
                continue;
            }
            seen.push(item);
            let key = key_of(pairs, &[("user_id", KeyValue::String(&user_key)), ("item_id", KeyValue::Int64(item))])?;
            pair_rows.push((key, demo_pair_row(pairs, user, item)));
        }
    }
    Ok((write_all(tiers, items, item_rows).await?, write_all(tiers, pairs, pair_rows).await?))
}

/// Writes demo entities `1..=count` through the server's write path.
/// Returns how many rows were written (rows already there are skipped).
pub async fn load(tiers: &Tiers, view: &Arc<FeatureView>, count: u64) -> Result<u64> {
    let rows = (1..=count).map(|i| (demo_key(i), demo_row(view, i))).collect();
    write_all(tiers, view, rows).await
}

/// Writes rows in batches, a few at once; how many were written.
async fn write_all(tiers: &Tiers, view: &Arc<FeatureView>, rows: Vec<(String, Row)>) -> Result<u64> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let count = rows.len() as u64;
    let mut written = 0u64;
    let mut done = 0u64;
    let mut stream = futures::stream::iter(rows.chunks(BATCH).map(|rows| async move {
        (rows.len(), tiers.write(view, rows, tokio::time::Instant::now() + std::time::Duration::from_secs(60)).await)
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some((n, outcome)) = stream.next().await {
        if let Some((error, _)) = outcome.failed.first() {
            bail!("loading demo data failed: {error}");
        }
        written += outcome.written.len() as u64;
        done += n as u64;
        if done.is_multiple_of(20_000) || done == count {
            tracing::info!(
                view = %view.name,
                rows = done,
                of = count,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "demo data"
            );
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped() -> strata_core::Registry {
        let file = crate::config::FileConfig::from_toml(include_str!("../../../config/strata.toml"))
            .unwrap_or_else(|e| panic!("{e}"));
        let config = file.validate().unwrap_or_else(|e| panic!("{e}"));
        Arc::try_unwrap(config.registry).unwrap_or_else(|_| panic!("shared registry"))
    }

    /// The README's lookup finds the pair rows it says it finds.
    #[test]
    fn the_ranking_example_asks_for_two_recent_items_of_user_1_and_one_other() {
        let registry = shipped();
        let users = registry.get("user_features").unwrap_or_else(|| panic!("no view"));
        let recent = recent_items(users, 1);
        assert!(recent.contains(&8485) && recent.contains(&5676) && !recent.contains(&1234), "{recent:?}");
        assert!(DEMO_ITEMS.contains(&1234));
        let readme = include_str!("../../../README.md");
        assert!(readme.contains(RANKER_EXAMPLE), "README.md shows another ranking lookup");
        assert!(registry.service("ranker_v1").is_some());
    }
}
