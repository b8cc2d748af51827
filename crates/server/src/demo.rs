//! The deterministic demo data set of `user_features`: the same values on
//! every machine, so the README's sample lookups always answer the same.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, bail};
use strata_core::{EventTime, FeatureType, FeatureView, Row, Value};

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

/// Writes demo entities `1..=count` through the server's write path.
/// Returns how many rows were written (rows already there are skipped).
pub async fn load(tiers: &Tiers, view: &Arc<FeatureView>, count: u64) -> Result<u64> {
    use futures::StreamExt as _;
    let started = Instant::now();
    let batches = (1..=count).collect::<Vec<_>>();
    let mut written = 0u64;
    let mut done = 0u64;
    let mut stream = futures::stream::iter(batches.chunks(BATCH).map(|ids| {
        let rows: Vec<(String, Row)> = ids.iter().map(|&i| (demo_key(i), demo_row(view, i))).collect();
        async move {
            (
                rows.len(),
                tiers.write(view, &rows, tokio::time::Instant::now() + std::time::Duration::from_secs(60)).await,
            )
        }
    }))
    .buffer_unordered(IN_FLIGHT);
    while let Some((n, outcome)) = stream.next().await {
        if let Some((error, _)) = outcome.failed.first() {
            bail!("loading demo data failed: {error}");
        }
        written += outcome.written.len() as u64;
        done += n as u64;
        if done.is_multiple_of(20_000) || done == count {
            tracing::info!(rows = done, of = count, elapsed_ms = started.elapsed().as_millis() as u64, "demo data");
        }
    }
    Ok(written)
}
