//! Stampede protection and freshness against the real stack, with three
//! server instances sharing one Redis Cluster and the PostgreSQL shards.
//! PostgreSQL's own pg_stat_statements counts the lookups.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, ensure};
use futures::StreamExt as _;
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_shard_router::shard_for;
use strata_tests::wire::{get, row, source, status, ts, v, write};
use strata_tests::{Env, client, integration_tests, sample, scrape};

integration_tests!(
    a_thousand_concurrent_reads_of_a_cold_key_cost_one_postgres_lookup,
    a_hot_key_is_refreshed_ahead_across_its_ttl,
    an_l1_copy_is_refreshed_when_its_redis_entry_turns_stale,
    unknown_keys_cost_one_postgres_lookup_each_per_negative_ttl,
    values_older_than_max_age_are_marked_and_still_returned,
);

async fn servers(env: &'static Env, n: usize, protection: bool) -> Result<Vec<RunningServer>> {
    let mut servers = Vec::with_capacity(n);
    for _ in 0..n {
        servers.push(
            env.server_with(|c| {
                c.stampede.enabled = protection;
                // Longer than the artificial PostgreSQL stall below, which
                // lasts as long as a debug build on two cores needs to get
                // 1,000 reads in flight (seconds); past the lease, waiting
                // instances read PostgreSQL themselves, by design.
                c.stampede.lease_ttl = Duration::from_secs(15);
            })
            .await?,
        );
    }
    Ok(servers)
}

/// Sends `requests` single-key reads, `concurrency` at a time, round-robin
/// over the servers; returns the answered rows.
async fn read_many(
    servers: &[RunningServer],
    view: &str,
    keys: &[String],
    requests: usize,
    concurrency: usize,
) -> Result<Vec<v1::FeatureRow>> {
    let mut clients = Vec::new();
    for server in servers {
        clients.push(client(server).await?);
    }
    let rows = futures::stream::iter(0..requests)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            let key = keys[i % keys.len()].clone();
            async move { c.get_features(get(view, &[&key], &[])).await.map(|r| r.into_inner().rows.remove(0)) }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    Ok(rows.into_iter().collect::<Result<_, _>>()?)
}

/// One cold key, 1,000 concurrent reads over three instances. PostgreSQL
/// is made slow for the key's table (a lock held until every read has
/// missed L1), so that all of them are in flight while the first lookup
/// runs: the window in which a stampede happens.
async fn cold_key_lookups(env: &'static Env, view: &'static str, protection: bool) -> Result<u64> {
    const READS: usize = 1_000;
    let servers = servers(env, 3, protection).await?;
    let key = format!("{view}:cold");
    client(&servers[0])
        .await?
        .write_features(write(view, vec![row(&key, ts(1, 0), vec![("n", v(Kind::Int64Value(7)))])]))
        .await?;
    // The write left the row in Redis; make the key cold there too.
    servers[0].tiers().l2().evict(view, &[&key]).await?;
    let before = env.postgres_reads(view).await?;

    let lock = env.shard(shard_for(&key, env.shard_count() as u32) as usize).await?;
    lock.batch_execute(&format!("BEGIN; LOCK TABLE strata.\"{view}\" IN ACCESS EXCLUSIVE MODE")).await?;
    let release = async {
        // The process-wide metrics count L1 misses of all three instances.
        let started = Instant::now();
        while sample(&scrape(&servers[0]).await?, "strata_cache_misses_total", &[("tier", "l1"), ("view", view)])
            < READS as f64
        {
            ensure!(started.elapsed() < Duration::from_secs(30), "the reads did not all get past L1");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lock.batch_execute("COMMIT").await?;
        println!("stampede: {view}: postgres stalled {:.1?} until all reads had missed L1", started.elapsed());
        anyhow::Ok(())
    };
    let keys = [key];
    let (rows, released) = tokio::join!(read_many(&servers, view, &keys, READS, READS), release);
    released?;
    let rows = rows?;
    for r in &rows {
        ensure!(status(r) == v1::RowStatus::Found && r.values == vec![v(Kind::Int64Value(7))], "{r:?}");
    }
    let lookups = env.postgres_reads(view).await? - before;
    if protection {
        // One page holds all three instances' counts (one recorder per process).
        let page = scrape(&servers[0]).await?;
        let coalesced = sample(&page, "strata_coalesced_waits_total", &[("view", view)]);
        let leases = (
            sample(&page, "strata_leases_total", &[("view", view), ("outcome", "acquired")]),
            sample(&page, "strata_leases_total", &[("view", view), ("outcome", "lost")]),
        );
        println!("stampede: coalesced waits {coalesced}, leases acquired {} lost {}", leases.0, leases.1);
        ensure!(coalesced > 0.0, "concurrent reads in one instance wait on one load");
    }
    for server in servers {
        server.shutdown().await;
    }
    Ok(lookups)
}

async fn a_thousand_concurrent_reads_of_a_cold_key_cost_one_postgres_lookup(env: &'static Env) -> Result<()> {
    let on = cold_key_lookups(env, "stampede_on", true).await?;
    let off = cold_key_lookups(env, "stampede_off", false).await?;
    println!(
        "stampede: 1000 concurrent reads of one cold key over 3 instances: {on} postgres lookups with protection, {off} without"
    );
    ensure!(on == 1, "with protection, postgres saw {on} lookups of the key");
    ensure!(off >= 100, "without protection postgres should see many lookups, saw {off}");
    Ok(())
}

async fn a_hot_key_is_refreshed_ahead_across_its_ttl(env: &'static Env) -> Result<()> {
    let servers = servers(env, 3, true).await?;
    let mut c = client(&servers[0]).await?;
    c.write_features(write("hot", vec![row("hot:1", ts(1, 0), vec![("n", v(Kind::Int64Value(1)))])])).await?;
    // Warm every instance once; these reads may go to PostgreSQL.
    read_many(&servers, "hot", &["hot:1".to_owned()], 3, 1).await?;
    let before = env.postgres_reads("hot").await?;

    // Read continuously for three L2 TTLs (L1 TTL 1s, L2 TTL 2s).
    let started = Instant::now();
    let mut reads = 0usize;
    let mut by_source = [0usize; 4];
    while started.elapsed() < Duration::from_secs(6) {
        for r in read_many(&servers, "hot", &["hot:1".to_owned()], 30, 6).await? {
            ensure!(status(&r) == v1::RowStatus::Found, "{r:?}");
            ensure!(source(&r) != v1::Source::L3, "read {reads} missed to postgres after {:?}", started.elapsed());
            by_source[source(&r) as usize] += 1;
            reads += 1;
        }
    }
    let elapsed = started.elapsed();
    let lookups = env.postgres_reads("hot").await? - before;
    let periods = (elapsed.as_secs_f64() / 2.0).ceil() as u64;
    println!(
        "hot key: {reads} reads in {elapsed:.1?} (L1 {}, L2 {}), {lookups} postgres lookups over {periods} L2 TTL periods",
        by_source[1], by_source[2]
    );
    ensure!(lookups >= 1, "the key was refreshed from postgres at least once");
    ensure!(lookups <= periods + 1, "{lookups} postgres lookups in {periods} TTL periods");
    let mut refreshes = 0.0;
    for server in servers {
        refreshes +=
            sample(&scrape(&server).await?, "strata_refreshes_total", &[("view", "hot"), ("outcome", "completed")]);
        server.shutdown().await;
    }
    ensure!(refreshes > 0.0, "refresh-ahead ran");
    Ok(())
}

/// An L1 copy of a Redis entry turns soft when the entry turns stale, so
/// that its refresh finds the entry stale and reloads it. Redis sees a hot
/// key only when its L1 copies are refreshed; refreshed on their own
/// schedule, they could come either side of the entry's stale window, the
/// entry expired, and the key went to PostgreSQL, in the request path
/// where the copies had expired meanwhile (the hot-key test above, on a
/// busy machine).
async fn an_l1_copy_is_refreshed_when_its_redis_entry_turns_stale(env: &'static Env) -> Result<()> {
    const VIEW: &str = "horizon";
    let servers = servers(env, 2, true).await?;
    let key = "horizon:1";
    client(&servers[0])
        .await?
        .write_features(write(VIEW, vec![row(key, ts(1, 0), vec![("n", v(Kind::Int64Value(1)))])]))
        .await?;
    // The entry the write left, replaced (same version) by one that turns
    // stale in a second, long before an L1 copy would (48 s), and expires
    // in a minute.
    let registry = env.registry()?;
    let view = registry.get(VIEW).context("view")?;
    let l2 = servers[1].tiers().l2();
    let version = strata_core::EventTime(1_000_000);
    let stored = strata_core::Row { event_time: version, values: vec![strata_core::Value::Int64(1)] };
    let life = strata_core::Lifetime { soft: Duration::from_secs(1), hard: Duration::from_secs(60) };
    let put = strata_cache_tiers::Put { key, content: strata_core::Content::Found(&stored), version, life };
    ensure!(l2.put_many(view, &[put], l2.default_deadline()).await? == [true], "the short-lived entry was stored");
    let before = env.postgres_reads(VIEW).await?;

    // The other instance has no L1 copy: it copies Redis's entry, then
    // serves the copy, until the entry's reload is seen.
    let mut reader = client(&servers[1]).await?;
    let first = reader.get_features(get(VIEW, &[key], &[])).await?.into_inner();
    ensure!(source(&first.rows[0]) == v1::Source::L2, "{:?}", first.rows[0]);
    let started = Instant::now();
    let completed = &[("tier", "l2"), ("view", VIEW), ("outcome", "completed")];
    while sample(&scrape(&servers[1]).await?, "strata_refreshes_total", completed) < 1.0 {
        ensure!(started.elapsed() < Duration::from_secs(20), "the redis entry was not reloaded ahead");
        let answer = reader.get_features(get(VIEW, &[key], &[])).await?.into_inner();
        ensure!(source(&answer.rows[0]) != v1::Source::L3, "a read went to postgres: {:?}", answer.rows[0]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let fresh_for = l2.get_many(view, &[key], l2.default_deadline()).await?[0].as_ref().context("entry")?.fresh_for;
    ensure!(fresh_for > Duration::from_secs(60), "the reload stored a whole lifetime: fresh for {fresh_for:?}");
    let lookups = env.postgres_reads(VIEW).await? - before;
    ensure!(lookups == 1, "one reload, {lookups} postgres lookups");
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}

async fn unknown_keys_cost_one_postgres_lookup_each_per_negative_ttl(env: &'static Env) -> Result<()> {
    let servers = servers(env, 3, true).await?;
    let keys: Vec<String> = (0..100).map(|i| format!("unknown:{i}")).collect();
    let before = env.postgres_reads("unknown").await?;
    let rows = read_many(&servers, "unknown", &keys, 10_000, 64).await?;
    ensure!(rows.iter().all(|r| status(r) == v1::RowStatus::NotFound), "every unknown key is NOT_FOUND");
    let lookups = env.postgres_reads("unknown").await? - before;
    println!("unknown keys: 10000 reads of 100 unknown keys over 3 instances: {lookups} postgres lookups");
    ensure!(lookups == 100, "expected one lookup per distinct key, saw {lookups}");

    // A later write replaces the negative entry.
    let mut c = client(&servers[0]).await?;
    c.write_features(write("unknown", vec![row("unknown:0", ts(5, 0), vec![("n", v(Kind::Int64Value(5)))])])).await?;
    let answer = c.get_features(get("unknown", &["unknown:0"], &[])).await?.into_inner();
    ensure!(status(&answer.rows[0]) == v1::RowStatus::Found, "{:?}", answer.rows[0]);
    for server in servers {
        server.shutdown().await;
    }
    Ok(())
}

async fn values_older_than_max_age_are_marked_and_still_returned(env: &'static Env) -> Result<()> {
    let server = env.server().await?;
    let mut c = client(&server).await?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() as i64;
    c.write_features(write(
        "aged",
        vec![
            row("aged:old", ts(now - 2 * 3600, 0), vec![("n", v(Kind::Int64Value(1)))]),
            row("aged:new", ts(now - 60, 0), vec![("n", v(Kind::Int64Value(2)))]),
        ],
    ))
    .await?;
    for _ in 0..2 {
        let rows = c.get_features(get("aged", &["aged:old", "aged:new"], &[])).await?.into_inner().rows;
        ensure!(status(&rows[0]) == v1::RowStatus::OutsideMaxAge, "{:?}", rows[0]);
        ensure!(rows[0].values == vec![v(Kind::Int64Value(1))], "the old value is still returned");
        ensure!(status(&rows[1]) == v1::RowStatus::Found, "{:?}", rows[1]);
    }
    server.shutdown().await;
    Ok(())
}
