//! Hostile and careless clients against the real stack: every case gets a
//! clear status naming what is wrong, nothing wrong is stored, and the
//! server goes on serving afterwards.

use std::collections::HashMap;

use anyhow::{Context, Result, ensure};
use strata_proto::v1::{self, value::Kind};
use strata_tests::wire::{get, row, status, ts, v, write};
use strata_tests::{Env, client, integration_tests};

integration_tests!(concurrent_writers_of_the_same_keys_in_opposite_orders_never_deadlock);

fn n(value: i64) -> Vec<(&'static str, v1::Value)> {
    vec![("n", v(Kind::Int64Value(value)))]
}

fn outcome(result: &v1::RowResult) -> v1::WriteOutcome {
    v1::WriteOutcome::try_from(result.outcome).unwrap_or(v1::WriteOutcome::Unspecified)
}

/// 32 concurrent writes (and deletes) of the same 200 keys, half in
/// ascending and half in descending key order: PostgreSQL would deadlock
/// if row locks were taken in request order. Every row is written or
/// skipped as older, none fails, and what is stored is the newest write.
async fn concurrent_writers_of_the_same_keys_in_opposite_orders_never_deadlock(env: &'static Env) -> Result<()> {
    const KEYS: usize = 200;
    const WRITERS: i64 = 32;
    let server = env.server().await?;
    let keys: Vec<String> = (0..KEYS).map(|i| format!("contended:{i:03}")).collect();
    let c = client(&server).await?;
    let writers = (0..WRITERS).map(|w| {
        let mut c = c.clone();
        let mut order = keys.clone();
        if w % 2 == 1 {
            order.reverse();
        }
        async move {
            // Each writer its own event time, so exactly one wins per key.
            let rows = order.iter().map(|k| row(k, ts(1_000 + w, 0), n(w))).collect();
            let answer = c.write_features(write("contended", rows)).await?.into_inner();
            let deleted = if w % 8 == 3 {
                // Some deletes too, at an older time than every write: each
                // is skipped or overwritten, and must not deadlock either.
                let request = v1::DeleteFeaturesRequest {
                    feature_view: "contended".into(),
                    entity_keys: order.clone(),
                    event_time: Some(ts(999, 0)),
                };
                Some(c.delete_features(request).await?.into_inner())
            } else {
                None
            };
            anyhow::Ok((answer, deleted))
        }
    });
    let answers = futures::future::try_join_all(writers).await?;
    let mut failed: Vec<String> = Vec::new();
    for (answer, deleted) in &answers {
        for result in answer.results.iter().chain(deleted.iter().flat_map(|d| &d.results)) {
            if outcome(result) == v1::WriteOutcome::Failed {
                failed.push(result.error.clone());
            }
        }
    }
    ensure!(failed.is_empty(), "{} rows failed, e.g. {:?}", failed.len(), failed.first());
    let written: u64 = answers.iter().map(|(a, _)| a.rows_written).sum();
    ensure!(written >= KEYS as u64, "every key written at least once: {written}");

    // The newest write of each key is what every tier now answers.
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let rows = client(&server).await?.get_features(get("contended", &refs, &["n"])).await?.into_inner().rows;
    let values: HashMap<&str, Option<&Kind>> =
        rows.iter().map(|r| (r.entity_key.as_str(), r.values.first().and_then(|v| v.kind.as_ref()))).collect();
    for key in &refs {
        let got = values.get(key).copied().flatten().context("no answer")?;
        ensure!(got == &Kind::Int64Value(WRITERS - 1), "{key}: {got:?}");
    }
    ensure!(rows.iter().all(|r| status(r) == v1::RowStatus::Found));
    server.shutdown().await;
    Ok(())
}
