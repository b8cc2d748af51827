//! Writes against the real stack, with two or more server instances sharing
//! the Redis Cluster and the PostgreSQL shards: visibility across instances,
//! event-time ordering at every tier, stale-set protection, lost
//! invalidations, bulk loads and cache warming.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use fred::prelude::KeysInterface as _;
use futures::StreamExt as _;
use strata_cache_tiers::Put;
use strata_core::{Content, EventTime, decode_entry};
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_server::load::{Format, LoadOptions, LoadReport, Rejected};
use strata_server::warm::WarmOptions;
use strata_shard_router::shard_for;
use strata_tests::wire::{get, row, source, status, ts, v, write};
use strata_tests::{Env, client, integration_tests, sample, scrape};
use tokio::sync::{Notify, oneshot};
use tonic::Code;

integration_tests!(
    a_write_through_one_instance_is_served_by_another_once_announced,
    out_of_order_writes_and_deletes_leave_the_newer_state_at_every_tier,
    a_delayed_cache_fill_carrying_an_old_value_loses_at_l2_and_l1,
    a_killed_subscription_clears_l1_and_fresh_data_is_served,
    a_quietly_ended_subscription_is_noticed_by_its_heartbeat,
    a_write_whose_cache_step_failed_is_repaired_on_every_instance,
    a_million_rows_bulk_loaded_into_two_shards_are_all_readable_and_replace_cached_copies,
    a_file_with_bad_rows_loads_the_good_ones_reports_the_bad_by_line_and_reloads_safely,
    warming_preloads_given_and_most_read_keys_into_redis,
);

fn n(value: i64) -> Vec<(&'static str, v1::Value)> {
    vec![("n", v(Kind::Int64Value(value)))]
}

/// The `n` of a found row, `None` for any other status.
fn n_of(row: &v1::FeatureRow) -> Option<i64> {
    match (status(row), row.values.first().and_then(|v| v.kind.as_ref())) {
        (v1::RowStatus::Found, Some(Kind::Int64Value(n))) => Some(*n),
        _ => None,
    }
}

async fn read(server: &RunningServer, view: &str, key: &str) -> Result<v1::FeatureRow> {
    let mut rows = client(server).await?.get_features(get(view, &[key], &["n"])).await?.into_inner().rows;
    rows.pop().context("no row answered")
}

/// What Redis holds for a key, decoded: (content, version).
async fn redis_entry(
    env: &Env,
    server: &RunningServer,
    view: &str,
    key: &str,
) -> Result<Option<(Content<i64>, EventTime)>> {
    let registry = env.registry()?;
    let fingerprint = registry.get(view).context("view")?.fingerprint;
    let l2 = server.tiers().l2();
    let bytes: Option<Vec<u8>> = l2.client().get(l2.key_of(view, key)).await?;
    let Some(bytes) = bytes else { return Ok(None) };
    let entry = decode_entry(fingerprint, &bytes)?;
    let content = match entry.content {
        Content::Found(row) => match row.values.first() {
            Some(strata_core::Value::Int64(n)) => Content::Found(*n),
            other => bail!("unexpected value {other:?}"),
        },
        Content::Missing => Content::Missing,
        Content::Guard => Content::Guard,
    };
    Ok(Some((content, entry.version)))
}

/// Reads `key` on `server` until the answer comes from its L1, and returns
/// that answer. A fill may be refused while an invalidation of the key (or
/// of another key in its bucket) is still arriving, so one read is not
/// always enough.
async fn cached_in_l1(server: &RunningServer, view: &str, key: &str) -> Result<v1::FeatureRow> {
    let started = Instant::now();
    loop {
        let answer = read(server, view, key).await?;
        if source(&answer) == v1::Source::L1 {
            return Ok(answer);
        }
        ensure!(started.elapsed() < Duration::from_secs(5), "{key} never reached the L1 cache: {answer:?}");
        tokio::task::yield_now().await;
    }
}

/// Reads `key` on `server` until it answers `want` (`None`: not found),
/// then twice more, which must answer the same. Until then only the values
/// in `before` are allowed: another instance hears of a write a moment after
/// it is acknowledged.
async fn settles(
    server: &RunningServer,
    view: &str,
    key: &str,
    before: &[Option<i64>],
    want: Option<i64>,
) -> Result<()> {
    let started = Instant::now();
    loop {
        let answer = read(server, view, key).await?;
        if n_of(&answer) == want {
            break;
        }
        ensure!(before.contains(&n_of(&answer)), "{key}: neither {want:?} nor an earlier value: {answer:?}");
        ensure!(started.elapsed() < Duration::from_secs(5), "{key} still answers {answer:?} 5s after the write");
        tokio::task::yield_now().await;
    }
    for _ in 0..2 {
        let answer = read(server, view, key).await?;
        ensure!(n_of(&answer) == want, "{key} went back to {answer:?}");
    }
    Ok(())
}

/// Two instances, A and B; `key` of `view` written through A with n = 1 at
/// t = 1s, and held in B's L1.
async fn b_caches(env: &Env, view: &str, key: &str) -> Result<(RunningServer, RunningServer, FeatureStore)> {
    let (a, b) = (env.server().await?, env.server().await?);
    let mut ca = client(&a).await?;
    ca.write_features(write(view, vec![row(key, ts(1, 0), n(1))])).await?;
    cached_in_l1(&b, view, key).await?;
    Ok((a, b, ca))
}

type FeatureStore = strata_proto::v1::feature_store_client::FeatureStoreClient<tonic::transport::Channel>;

fn micros(seconds: i64) -> EventTime {
    EventTime(seconds * 1_000_000)
}

async fn a_write_through_one_instance_is_served_by_another_once_announced(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    const ROUNDS: usize = 50;
    let (a, b) = (env.server().await?, env.server().await?);
    let mut ca = client(&a).await?;
    let mut delays = Vec::with_capacity(ROUNDS);
    for i in 0..ROUNDS {
        let key = format!("vis:{i}");
        ca.write_features(write("visibility", vec![row(&key, ts(1, 0), n(0))])).await?;
        // B holds the value in its L1.
        let cached = cached_in_l1(&b, "visibility", &key).await?;
        ensure!(n_of(&cached) == Some(0), "{cached:?}");

        let written = ca.write_features(write("visibility", vec![row(&key, ts(2, 0), n(1))])).await?.into_inner();
        let acked = Instant::now();
        ensure!(written.rows_written == 1, "{written:?}");
        loop {
            let answer = read(&b, "visibility", &key).await?;
            match n_of(&answer) {
                Some(1) => break,
                Some(0) => {}
                _ => bail!("B answered neither the old nor the new value: {answer:?}"),
            }
            ensure!(acked.elapsed() < Duration::from_secs(5), "B still serves the old value 5s after the write");
            tokio::task::yield_now().await;
        }
        delays.push(acked.elapsed());
    }
    delays.sort();
    println!(
        "visibility: write acknowledged on A -> new value served by B: p50 {:.2?}, p99 {:.2?}, max {:.2?} over {ROUNDS} writes",
        delays[ROUNDS / 2],
        delays[ROUNDS * 99 / 100],
        delays[ROUNDS - 1]
    );
    let applied = sample(&scrape(&b).await?, "strata_invalidations_received_total", &[]);
    ensure!(applied >= ROUNDS as f64, "B applied {applied} invalidation messages");
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn out_of_order_writes_and_deletes_leave_the_newer_state_at_every_tier(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let (a, b) = (env.server().await?, env.server().await?);
    let mut ca = client(&a).await?;
    let key = "ord:1";
    let shard = env.shard(shard_for(key, env.shard_count() as u32) as usize).await?;
    let stored = || async {
        let row = shard
            .query_one(
                "SELECT n, extract(epoch FROM event_time)::bigint, deleted FROM strata.ordering WHERE entity_key = $1",
                &[&key],
            )
            .await?;
        anyhow::Ok((row.get::<_, Option<i64>>(0), row.get::<_, i64>(1), row.get::<_, bool>(2)))
    };
    // Both instances cache the first version.
    ca.write_features(write("ordering", vec![row(key, ts(10, 0), n(10))])).await?;
    for server in [&a, &b] {
        cached_in_l1(server, "ordering", key).await?;
    }

    // Newer first, older second.
    let newer = ca.write_features(write("ordering", vec![row(key, ts(30, 0), n(30))])).await?.into_inner();
    let older = ca.write_features(write("ordering", vec![row(key, ts(20, 0), n(20))])).await?.into_inner();
    ensure!(newer.rows_written == 1 && newer.results[0].outcome == v1::WriteOutcome::Written as i32, "{newer:?}");
    ensure!(
        older.rows_skipped_older == 1 && older.results[0].outcome == v1::WriteOutcome::SkippedOlder as i32,
        "{older:?}"
    );
    ensure!(stored().await? == (Some(30), 30, false), "postgres holds {:?}", stored().await?);
    ensure!(
        redis_entry(env, &a, "ordering", key).await? == Some((Content::Found(30), micros(30))),
        "redis holds {:?}",
        redis_entry(env, &a, "ordering", key).await?
    );
    for server in [&a, &b] {
        settles(server, "ordering", key, &[Some(10)], Some(30)).await?;
    }

    // One event time stands for one content: a retry of the stored row is
    // written again, another row with the same event time is skipped.
    let retry = ca.write_features(write("ordering", vec![row(key, ts(30, 0), n(30))])).await?.into_inner();
    ensure!(retry.rows_written == 1, "a retry is written: {retry:?}");
    let tie = ca.write_features(write("ordering", vec![row(key, ts(30, 0), n(31))])).await?.into_inner();
    ensure!(tie.rows_skipped_older == 1, "a different row at the same event time is skipped: {tie:?}");
    ensure!(stored().await? == (Some(30), 30, false));

    // One request with two rows of the key: the newer counts, the other is
    // reported as skipped, at its own position.
    let both = ca
        .write_features(write("ordering", vec![row(key, ts(50, 0), n(50)), row(key, ts(40, 0), n(40))]))
        .await?
        .into_inner();
    let outcomes: Vec<i32> = both.results.iter().map(|r| r.outcome).collect();
    ensure!(outcomes == [v1::WriteOutcome::Written as i32, v1::WriteOutcome::SkippedOlder as i32], "{both:?}");

    // A delete is recorded: an older write cannot bring the row back, a newer one can.
    let delete = |seconds| v1::DeleteFeaturesRequest {
        feature_view: "ordering".into(),
        entity_keys: vec![key.into()],
        event_time: Some(ts(seconds, 0)),
    };
    let deleted = ca.delete_features(delete(60)).await?.into_inner();
    ensure!(deleted.rows_written == 1, "{deleted:?}");
    let stale_delete = ca.delete_features(delete(55)).await?.into_inner();
    ensure!(stale_delete.rows_skipped_older == 1, "an older delete does not apply: {stale_delete:?}");
    let resurrect = ca.write_features(write("ordering", vec![row(key, ts(59, 0), n(59))])).await?.into_inner();
    ensure!(resurrect.rows_skipped_older == 1, "a write older than the delete is skipped: {resurrect:?}");
    ensure!(stored().await? == (None, 60, true), "postgres holds a tombstone: {:?}", stored().await?);
    ensure!(redis_entry(env, &a, "ordering", key).await? == Some((Content::Missing, micros(60))));
    for server in [&a, &b] {
        settles(server, "ordering", key, &[Some(30), Some(50)], None).await?;
    }
    // Reloaded from PostgreSQL, the deletion keeps its event time in Redis,
    // so no older copy can replace it there.
    a.tiers().l2().evict("ordering", &[key]).await?;
    a.tiers().l1.clear().await;
    ensure!(status(&read(&a, "ordering", key).await?) == v1::RowStatus::NotFound);
    // The read answered before filling Redis.
    a.tiers().settle().await;
    ensure!(
        redis_entry(env, &a, "ordering", key).await? == Some((Content::Missing, micros(60))),
        "redis holds {:?}",
        redis_entry(env, &a, "ordering", key).await?
    );
    let revived = ca.write_features(write("ordering", vec![row(key, ts(70, 0), n(70))])).await?.into_inner();
    ensure!(revived.rows_written == 1, "{revived:?}");
    for server in [&a, &b] {
        settles(server, "ordering", key, &[None], Some(70)).await?;
    }

    let missing_time = v1::DeleteFeaturesRequest { event_time: None, ..delete(1) };
    let refused = ca.delete_features(missing_time).await.expect_err("a delete needs an event time");
    ensure!(refused.code() == Code::InvalidArgument && refused.message().contains("event_time is required"));
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn a_delayed_cache_fill_carrying_an_old_value_loses_at_l2_and_l1(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let (a, b) = (env.server().await?, env.server().await?);
    let mut ca = client(&a).await?;
    let key = "race:1";
    // Version 1 is in PostgreSQL only: B has never read it, Redis does not hold it.
    ca.write_features(write("race", vec![row(key, ts(1, 0), n(1))])).await?;
    a.tiers().l2().evict("race", &[key]).await?;

    // B's next fill of the key stops between reading PostgreSQL and
    // filling the caches, until released.
    let (reached_tx, reached) = oneshot::channel::<()>();
    let reached_tx = Arc::new(Mutex::new(Some(reached_tx)));
    let release = Arc::new(Notify::new());
    let gate = release.clone();
    b.tiers().set_fill_hook(Arc::new(move |view: &str, keys: &[&str]| {
        let first = (view == "race" && keys.contains(&key)).then(|| reached_tx.lock().ok()?.take()).flatten();
        let gate = gate.clone();
        Box::pin(async move {
            if let Some(reached) = first {
                let _ = reached.send(());
                gate.notified().await;
            }
        })
    }));
    let slow = tokio::spawn({
        let mut cb = client(&b).await?;
        async move { cb.get_features(get("race", &[key], &["n"])).await }
    });
    tokio::time::timeout(Duration::from_secs(10), reached).await.context("B's read never reached its fill")??;

    // A newer write commits, replaces Redis and is announced while B holds version 1.
    let view_id = env.registry()?.get("race").context("view")?.id;
    let mut applied = b.invalidations().applied();
    let before = b.tiers().l1.stamp();
    let written = ca.write_features(write("race", vec![row(key, ts(2, 0), n(2))])).await?.into_inner();
    ensure!(written.rows_written == 1);
    // B has applied the announcement once its L1 counts the key as
    // invalidated since before the write.
    tokio::time::timeout(Duration::from_secs(10), async {
        while !b.tiers().l1.outdated(before, view_id, key) {
            applied.changed().await?;
        }
        anyhow::Ok(())
    })
    .await
    .context("B never heard of the write")??;
    release.notify_one();
    let slow = slow.await??.into_inner().rows.remove(0);
    ensure!(n_of(&slow) == Some(1), "the delayed read answers what it read before the write: {slow:?}");
    // Its Redis fill runs after the answer.
    b.tiers().settle().await;

    ensure!(
        redis_entry(env, &a, "race", key).await? == Some((Content::Found(2), micros(2))),
        "the late fill must not replace the newer value in redis: {:?}",
        redis_entry(env, &a, "race", key).await?
    );
    let page = scrape(&b).await?;
    for tier in ["l2", "l1"] {
        let refused = sample(&page, "strata_cache_fills_refused_total", &[("tier", tier), ("view", "race")]);
        ensure!(refused >= 1.0, "the late fill was not refused at {tier}");
    }
    for _ in 0..2 {
        let answer = read(&b, "race", key).await?;
        ensure!(n_of(&answer) == Some(2) && answer.event_time == Some(ts(2, 0)), "B serves {answer:?}");
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn a_killed_subscription_clears_l1_and_fresh_data_is_served(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let key = "resub:1";
    let (a, b, mut ca) = b_caches(env, "resubscribe", key).await?;

    // A change B is never told about: straight into PostgreSQL, Redis
    // evicted, nothing published; as if B had missed the announcement.
    let shard = env.shard(shard_for(key, env.shard_count() as u32) as usize).await?;
    shard
        .execute("UPDATE strata.resubscribe SET n = 2, event_time = to_timestamp(2) WHERE entity_key = $1", &[&key])
        .await?;
    a.tiers().l2().evict("resubscribe", &[key]).await?;
    let stale = read(&b, "resubscribe", key).await?;
    ensure!(n_of(&stale) == Some(1) && source(&stale) == v1::Source::L1, "B cannot know yet: {stale:?}");

    let mut clears = b.invalidations().clears();
    let before = *clears.borrow_and_update();
    let killed = env.kill_redis_connections(&b.invalidations().client_name()).await?;
    ensure!(killed >= 1, "no connection of B's subscriber was found");
    tokio::time::timeout(Duration::from_secs(20), clears.wait_for(|n| *n > before))
        .await
        .context("B did not clear its L1 after its subscription dropped")??;
    let fresh = read(&b, "resubscribe", key).await?;
    ensure!(n_of(&fresh) == Some(2), "after the reconnection B serves fresh data: {fresh:?}");
    let page = scrape(&b).await?;
    ensure!(sample(&page, "strata_l1_clears_total", &[("reason", "reconnected")]) >= 1.0);
    println!("resubscribe: {killed} subscriber connections killed; B cleared its L1 and served the fresh value");

    // The subscription stands again: a write through A reaches B's L1.
    cached_in_l1(&b, "resubscribe", key).await?;
    ca.write_features(write("resubscribe", vec![row(key, ts(3, 0), n(3))])).await?;
    settles(&b, "resubscribe", key, &[Some(2)], Some(3)).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn a_quietly_ended_subscription_is_noticed_by_its_heartbeat(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let key = "quiet:1";
    let (a, b, mut ca) = b_caches(env, "resubscribe", key).await?;

    // The server ends B's subscription, the connection stays up: what a
    // slot move does to a sharded subscription. B hears no more writes.
    let channel = env.config()?.validate()?.writes.channel;
    let mut clears = b.invalidations().clears();
    let before = *clears.borrow_and_update();
    b.invalidations().unsubscribe_quietly(&channel).await?;
    ca.write_features(write("resubscribe", vec![row(key, ts(2, 0), n(2))])).await?;
    let stale = read(&b, "resubscribe", key).await?;
    ensure!(n_of(&stale) == Some(1) && source(&stale) == v1::Source::L1, "B cannot know yet: {stale:?}");

    // Its heartbeats stop coming back: B renews the subscription and clears L1.
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(10), clears.wait_for(|n| *n > before))
        .await
        .context("B did not notice that its subscription had ended")??;
    println!("heartbeat: B noticed its silent subscription after {:.1?}", started.elapsed());
    settles(&b, "resubscribe", key, &[Some(1)], Some(2)).await?;
    ensure!(sample(&scrape(&b).await?, "strata_l1_clears_total", &[("reason", "silent")]) >= 1.0);

    // And hears writes again.
    cached_in_l1(&b, "resubscribe", key).await?;
    ca.write_features(write("resubscribe", vec![row(key, ts(3, 0), n(3))])).await?;
    settles(&b, "resubscribe", key, &[Some(2)], Some(3)).await?;
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn a_write_whose_cache_step_failed_is_repaired_on_every_instance(env: &'static Env) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let key = "repair:1";
    let (a, b, mut ca) = b_caches(env, "repair", key).await?;

    // Redis "fails" for the next write's cache step: the old copy stays in
    // Redis and nobody is told. The write is committed all the same.
    a.tiers().fail_next_cache_steps(1);
    let written = ca.write_features(write("repair", vec![row(key, ts(2, 0), n(2))])).await?.into_inner();
    ensure!(written.rows_written == 1, "{written:?}");

    // The repair puts Redis right and announces the key again.
    for server in [&a, &b] {
        settles(server, "repair", key, &[Some(1)], Some(2)).await?;
    }
    ensure!(redis_entry(env, &a, "repair", key).await? == Some((Content::Found(2), micros(2))));
    let page = scrape(&a).await?;
    for outcome in ["queued", "repaired"] {
        let n = sample(&page, "strata_cache_repairs_total", &[("view", "repair"), ("outcome", outcome)]);
        ensure!(n == 1.0, "repairs {outcome}: {n}");
    }
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

fn load_options(view: &str, file: &std::path::Path, format: Format) -> LoadOptions {
    LoadOptions::new(view, file, format)
}

async fn load(env: &Env, options: &LoadOptions) -> Result<LoadReport> {
    strata_server::load::run(&env.config()?.validate()?, options).await
}

async fn a_million_rows_bulk_loaded_into_two_shards_are_all_readable_and_replace_cached_copies(
    env: &'static Env,
) -> Result<()> {
    // Announces a million keys: a listener that falls behind clears its
    // whole L1, which the tests that hold this too rely on keeping.
    let _exclusive = env.exclusive().await;
    const ROWS: usize = 1_000_000;
    const CACHED: usize = 1_000;
    let (a, b) = (env.server().await?, env.server().await?);
    let key = |i: usize| format!("bulk:{i:07}");

    // Some keys are cached with older values first: in Redis and in both
    // instances' L1.
    let old: Vec<v1::WriteRow> = (0..CACHED).map(|i| row(&key(i), ts(1, 0), n(-1))).collect();
    client(&a).await?.write_features(write("bulk", old)).await?;
    let cached: Vec<String> = (0..CACHED).map(key).collect();
    let cached: Vec<&str> = cached.iter().map(String::as_str).collect();
    for server in [&a, &b] {
        let rows = client(server).await?.get_features(get("bulk", &cached, &["n"])).await?.into_inner().rows;
        ensure!(rows.iter().all(|r| n_of(r) == Some(-1)));
    }

    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bulk.csv");
    {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(out, "entity_key,event_time,n,s")?;
        for i in 0..ROWS {
            writeln!(out, "{},2026-01-01T00:00:02Z,{i},s{i}", key(i))?;
        }
    }
    let report = load(env, &load_options("bulk", &path, Format::Csv)).await?;
    println!("bulk load: {}", report.summary());
    ensure!(report.rows_read == ROWS as u64 && report.written == ROWS as u64, "{report:?}");
    ensure!(report.rejected.is_empty() && report.failed == 0 && report.cache_errors == 0, "{report:?}");

    let mut per_shard = Vec::new();
    for i in 0..env.shard_count() {
        let row = env.shard(i).await?.query_one("SELECT count(*) FROM strata.bulk", &[]).await?;
        per_shard.push(row.get::<_, i64>(0));
    }
    ensure!(per_shard.iter().sum::<i64>() == ROWS as i64, "rows per shard {per_shard:?}");
    ensure!(per_shard.iter().all(|&c| c > (ROWS as i64) * 45 / 100), "uneven spread {per_shard:?}");

    // The keys cached before hold no older copy anywhere (once the
    // announcements have arrived).
    for server in [&a, &b] {
        for (i, key) in cached.iter().enumerate() {
            settles(server, "bulk", key, &[Some(-1)], Some(i as i64)).await?;
        }
    }

    // Every row, through the API, 1,000 keys a request.
    let started = Instant::now();
    let cb = client(&b).await?;
    let chunks: Vec<Vec<String>> =
        (0..ROWS).collect::<Vec<_>>().chunks(1_000).map(|c| c.iter().map(|&i| key(i)).collect()).collect();
    let mut answers = futures::stream::iter(chunks.into_iter().enumerate())
        .map(|(chunk, keys)| {
            let mut cb = cb.clone();
            async move {
                let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                let rows = cb.get_features(get("bulk", &refs, &["n", "s"])).await?.into_inner().rows;
                anyhow::Ok((chunk, rows))
            }
        })
        .buffer_unordered(4);
    let mut checked = 0;
    while let Some(answer) = answers.next().await {
        let (chunk, rows) = answer?;
        for (j, r) in rows.iter().enumerate() {
            let i = chunk * 1_000 + j;
            let expected = vec![v(Kind::Int64Value(i as i64)), v(Kind::StringValue(format!("s{i}")))];
            ensure!(status(r) == v1::RowStatus::Found && r.values == expected, "row {i}: {r:?}");
            checked += 1;
        }
    }
    ensure!(checked == ROWS);
    println!("bulk load: all {checked} rows read back through the API in {:.1?}", started.elapsed());
    a.shutdown().await;
    b.shutdown().await;
    Ok(())
}

async fn a_file_with_bad_rows_loads_the_good_ones_reports_the_bad_by_line_and_reloads_safely(
    env: &'static Env,
) -> Result<()> {
    let server = env.server().await?;
    let dir = tempfile::tempdir()?;
    let csv = dir.path().join("mixed.csv");
    std::fs::write(
        &csv,
        "entity_key,event_time,n,b,emb\n\
         bad:1,2026-01-01T00:00:00Z,1,true,[0.5]\n\
         bad:2,2026-01-01T00:00:00Z,two,true,[]\n\
         bad:3,2026-01-01T00:00:00Z,3\n\
         bad:4,not a time,4,false,[]\n\
         ,2026-01-01T00:00:00Z,5,false,[]\n\
         bad:6,1767225600,6,maybe,[]\n\
         bad:7,1767225600,7,f,\"[1, 2.5]\"\n\
         bad:8,1767225600,8,,[x]\n",
    )?;
    let expected_rejects = [
        (3, "n: \"two\" is not a valid int64"),
        (4, "3 fields, the header has 5"),
        (5, "event_time \"not a time\" is neither RFC 3339 nor Unix seconds"),
        (6, "entity_key is empty"),
        (7, "b: \"maybe\" is not a valid bool"),
        (9, "emb: \"[x]\" is not a valid float_list"),
    ];
    let rejects = |report: &LoadReport| -> Vec<(u64, String)> {
        report.rejected.iter().map(|Rejected { line, reason }| (*line, reason.clone())).collect()
    };
    let want: Vec<(u64, String)> = expected_rejects.iter().map(|(l, r)| (*l, (*r).to_owned())).collect();
    let first = load(env, &load_options("bulk_bad", &csv, Format::Csv)).await?;
    ensure!(first.rows_read == 8 && first.written == 2 && first.failed == 0, "{first:?}");
    ensure!(rejects(&first) == want, "rejected {:?}", rejects(&first));

    // Run again, as after a crash: same result, same data.
    let again = load(env, &load_options("bulk_bad", &csv, Format::Csv)).await?;
    ensure!(again.written == 2 && rejects(&again) == want, "{again:?}");

    // Redis holds a guard for each loaded key: a reader misses, and a fill
    // carrying an older row (read before the load committed) is refused.
    let loaded_at = micros(1_767_225_600);
    ensure!(redis_entry(env, &server, "bulk_bad", "bad:7").await? == Some((Content::Guard, loaded_at)));
    let registry = env.registry()?;
    let view = registry.get("bulk_bad").context("view")?;
    let older = strata_core::Row { event_time: micros(1), values: vec![strata_core::Value::Int64(-1); 3] };
    let life = strata_core::Lifetime { soft: Duration::from_secs(60), hard: Duration::from_secs(60) };
    let late_fill = Put { key: "bad:7", content: Content::Found(&older), version: older.event_time, life };
    ensure!(
        server
            .tiers()
            .l2()
            .put_many(view, std::slice::from_ref(&late_fill), server.tiers().l2().default_deadline())
            .await?
            == [false],
        "the guard refuses an older fill"
    );
    // A cold fill stores with SET NX first; it finds the guard there and goes
    // through the same comparison: refused as well.
    let l2 = server.tiers().l2();
    ensure!(
        l2.fill_absent(view, std::slice::from_ref(&late_fill), &[], l2.default_deadline()).await? == [false],
        "the guard refuses an older cold fill"
    );
    ensure!(redis_entry(env, &server, "bulk_bad", "bad:7").await? == Some((Content::Guard, loaded_at)));

    // JSON Lines, with one row older than what is stored.
    let jsonl = dir.path().join("more.jsonl");
    std::fs::write(
        &jsonl,
        "{\"entity_key\": \"bad:1\", \"event_time\": \"2025-01-01T00:00:00Z\", \"n\": 100}\n\
         {\"entity_key\": \"bad:9\", \"event_time\": 1767225600, \"n\": 9, \"emb\": [0.25]}\n\
         {\"entity_key\": \"bad:10\", \"event_time\": 1767225600, \"n\": \"ten\"}\n\
         {oops\n\
         {\"entity_key\": \"bad:11\", \"event_time\": 1767225600, \"n\": 1}\n\
         {\"entity_key\": \"bad:11\", \"event_time\": 1767225600, \"n\": 2}\n",
    )?;
    let json = load(env, &load_options("bulk_bad", &jsonl, Format::Jsonl)).await?;
    ensure!(json.written == 2 && json.skipped_older == 2, "{json:?}");
    let lines: Vec<u64> = json.rejected.iter().map(|r| r.line).collect();
    ensure!(lines == [3, 4], "{:?}", json.rejected);

    let mut c = client(&server).await?;
    let keys = ["bad:1", "bad:7", "bad:9", "bad:2", "bad:11"];
    let rows = c.get_features(get("bulk_bad", &keys, &[])).await?.into_inner().rows;
    ensure!(rows[0].values[0] == v(Kind::Int64Value(1)), "the older JSON row did not replace bad:1: {:?}", rows[0]);
    ensure!(rows[0].values[2] == v(Kind::FloatListValue(v1::FloatList { values: vec![0.5] })));
    ensure!(
        rows[1].values
            == vec![
                v(Kind::Int64Value(7)),
                v(Kind::BoolValue(false)),
                v(Kind::FloatListValue(v1::FloatList { values: vec![1.0, 2.5] })),
            ],
        "{:?}",
        rows[1]
    );
    ensure!(rows[2].values[0] == v(Kind::Int64Value(9)));
    ensure!(status(&rows[3]) == v1::RowStatus::NotFound, "a rejected row is not stored: {:?}", rows[3]);
    ensure!(
        rows[4].values[0] == v(Kind::Int64Value(2)),
        "of two rows with one event time the later wins: {:?}",
        rows[4]
    );

    let err = load(env, &load_options("no_such_view", &csv, Format::Csv)).await.expect_err("unknown view");
    ensure!(err.to_string().contains("unknown view \"no_such_view\""), "{err}");
    server.shutdown().await;
    Ok(())
}

async fn warming_preloads_given_and_most_read_keys_into_redis(env: &'static Env) -> Result<()> {
    let server = env.server_with(|c| c.hot_keys.sample_rate = 1.0).await?;
    let mut c = client(&server).await?;
    let rows = (0..10).map(|i| row(&format!("warm:{i}"), ts(1, 0), n(i))).collect();
    c.write_features(write("warming", rows)).await?;
    // warm:3 is read most, then warm:7.
    for (key, times) in [("warm:3", 5), ("warm:7", 3), ("warm:5", 1)] {
        for _ in 0..times {
            read(&server, "warming", key).await?;
        }
    }
    let started = Instant::now();
    loop {
        let top = server.tiers().l2().top_keys("warming", 2).await?;
        if top == ["warm:3", "warm:7"] {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(10), "most-read keys: {top:?}");
        tokio::task::yield_now().await;
    }

    let all: Vec<String> = (0..10).map(|i| format!("warm:{i}")).collect();
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    server.tiers().l2().evict("warming", &all).await?;
    let config = env.config()?.validate()?;
    let options = WarmOptions {
        view: "warming".into(),
        keys: vec!["warm:0".into(), "warm:1".into(), "warm:none".into()],
        top: Some(2),
    };
    let report = strata_server::warm::warm(server.tiers(), &config, &options).await?;
    ensure!((report.found, report.missing, report.unavailable) == (4, 1, 0), "{report:?}");

    // A fresh instance finds the warmed keys in Redis, the others in PostgreSQL.
    let fresh = env.server().await?;
    for (key, expected) in
        [("warm:0", v1::Source::L2), ("warm:3", v1::Source::L2), ("warm:7", v1::Source::L2), ("warm:5", v1::Source::L3)]
    {
        let answer = read(&fresh, "warming", key).await?;
        ensure!(source(&answer) == expected, "{key}: {answer:?}");
    }
    server.shutdown().await;
    fresh.shutdown().await;
    Ok(())
}
