//! Read replicas and primary failover, on a stack of its own: two shards,
//! each with a streaming replica that its primary waits for on every
//! commit (as `strata dev --replicas` starts them).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use strata_devstack::{PortPlan, Stack, StackOptions};
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_server::config::FileConfig;
use strata_server::load::{Format, LoadOptions};
use strata_tests::wire::{get, row, status, ts, v, write};
use strata_tests::{Env, client, config_for, integration_tests, sample, scrape};

integration_tests!(
    reads_go_to_a_replica_within_the_lag_bound_to_it_stale_when_the_primary_dies_and_writes_resume_on_promotion,
);

/// Keys bulk-loaded (so no cache holds them): the first half read while
/// all is well, the second once a primary is dead.
const LOADED: usize = 2_000;
/// Keys the writer keeps writing newer versions of.
const WRITTEN: usize = 200;

fn loaded_key(i: usize) -> String {
    format!("rep:{i:05}")
}

fn written_key(i: usize) -> String {
    format!("w:{i:04}")
}

fn with_replicas(stack: &Stack) -> Result<FileConfig> {
    let mut config = config_for(&stack.redis_nodes(), &stack.shard_urls())?;
    for (shard, replica) in config.postgres.shards.iter_mut().zip(stack.replica_urls()) {
        shard.replicas = replica.into_iter().collect();
    }
    Ok(config)
}

/// The lag the server last measured for shard `shard`'s replica (NaN:
/// unknown), once it has measured one.
async fn replica_lag(server: &RunningServer, shard: usize) -> Result<Option<f64>> {
    let page = scrape(server).await?;
    let label = format!("{shard}-replica-0");
    let line = format!("strata_replica_lag_seconds{{shard=\"{label}\"}}");
    Ok(page.lines().find(|l| l.starts_with(&line)).and_then(|l| l.rsplit(' ').next()?.parse().ok()))
}

/// Polls `check` (a metric that has no event to wait on) every 50 ms
/// until it holds, for at most `limit`.
async fn until<F, Fut>(what: &str, limit: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let give_up = tokio::time::Instant::now() + limit;
    while !check().await? {
        ensure!(tokio::time::Instant::now() < give_up, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

async fn reads_go_to_a_replica_within_the_lag_bound_to_it_stale_when_the_primary_dies_and_writes_resume_on_promotion(
    env: &'static Env,
) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let work = tempfile::tempdir()?;
    let mut stack = Stack::start(StackOptions {
        data_dir: work.path().join("stack"),
        ports: PortPlan::Ephemeral,
        shards: 2,
        replicas: true,
        security: None,
    })
    .await?;
    let config = with_replicas(&stack)?.validate()?;
    let view = config.registry.get("bulk").context("bulk")?.clone();
    let shard_of = |key: &str| strata_shard_router::shard_for_key(&view.entity.routing_bytes(key), 2) as usize;

    // Rows no cache holds: bulk-loaded.
    let csv = work.path().join("rows.csv");
    let text: String = std::iter::once("entity_key,event_time,n,s\n".to_owned())
        .chain((0..LOADED).map(|i| format!("{},2026-01-01T00:00:00Z,{i},s{i}\n", loaded_key(i))))
        .collect();
    std::fs::write(&csv, text)?;
    let report = strata_server::load::run(&config, &LoadOptions::new("bulk", &csv, Format::Csv)).await?;
    ensure!(report.written == LOADED as u64 && report.failed == 0, "{report:?}");

    let server = RunningServer::start(config).await?;
    let mut c = client(&server).await?;
    let server = &server;
    for shard in 0..2 {
        until("a first lag check of each replica", Duration::from_secs(30), || async move {
            Ok(replica_lag(server, shard).await? == Some(0.0))
        })
        .await?;
    }
    let read = |c: &mut strata_proto::v1::feature_store_client::FeatureStoreClient<tonic::transport::Channel>,
                keys: Vec<String>| {
        let mut c = c.clone();
        async move {
            let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
            Ok::<_, anyhow::Error>(c.get_features(get("bulk", &refs, &["n"])).await?.into_inner().rows)
        }
    };

    // 1. All well: cold reads are answered by the replicas, correct and
    // fresh, and the primaries are not asked.
    for start in (0..LOADED / 2).step_by(100) {
        let rows = read(&mut c, (start..start + 100).map(loaded_key).collect()).await?;
        for (r, i) in rows.iter().zip(start..) {
            ensure!(status(r) == v1::RowStatus::Found && r.values == [v(Kind::Int64Value(i as i64))], "{i}: {r:?}");
        }
    }
    let page = scrape(server).await?;
    let (from_replicas, from_primaries) = (
        sample(&page, "strata_shard_reads_total", &[("from", "replica")]),
        sample(&page, "strata_shard_reads_total", &[("from", "primary")]),
    );
    ensure!(from_replicas >= 10.0 && from_primaries == 0.0, "replica reads {from_replicas}, primary {from_primaries}");

    // A writer that never stops: newer versions of its keys, each
    // acknowledged version recorded.
    let base = 1_767_225_600;
    let acked: Arc<Mutex<HashMap<usize, i64>>> = Arc::new(Mutex::new(HashMap::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (acked, stop, mut c) = (acked.clone(), stop.clone(), c.clone());
        tokio::spawn(async move {
            let (mut version, mut failed) = (1i64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                version += 1;
                let keys: Vec<usize> = (0..10).map(|j| (version as usize * 7 + j * 20) % WRITTEN).collect();
                let rows = keys
                    .iter()
                    .map(|&k| row(&written_key(k), ts(base + version, 0), vec![("n", v(Kind::Int64Value(version)))]))
                    .collect();
                match c.write_features(write("bulk", rows)).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        let mut acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        for (&k, result) in keys.iter().zip(&answer.results) {
                            if result.outcome == v1::WriteOutcome::Written as i32 {
                                acked.insert(k, version);
                            } else {
                                failed += 1;
                            }
                        }
                    }
                    Err(_) => failed += 10,
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            failed
        })
    };

    // 2. Shard 0's primary dies. Once the server sees its replica cut off
    // (lag unknown), reads of shard 0 come from the replica, marked STALE,
    // with the right values; shard 1 answers as before.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stack.kill_primary(0).await?;
    until("the replica of shard 0 to be seen cut off", Duration::from_secs(30), || async {
        Ok(replica_lag(server, 0).await?.is_some_and(f64::is_nan))
    })
    .await?;
    let (mut stale, mut fresh) = (0, 0);
    for start in (LOADED / 2..LOADED).step_by(100) {
        let rows = read(&mut c, (start..start + 100).map(loaded_key).collect()).await?;
        for (r, i) in rows.iter().zip(start..) {
            ensure!(r.values == [v(Kind::Int64Value(i as i64))], "{i}: {r:?}");
            let expected = if shard_of(&loaded_key(i)) == 0 { v1::RowStatus::Stale } else { v1::RowStatus::Found };
            ensure!(status(r) == expected, "{i} (shard {}): {r:?}", shard_of(&loaded_key(i)));
            if expected == v1::RowStatus::Stale { stale += 1 } else { fresh += 1 }
        }
    }
    ensure!(stale > 300 && fresh > 300, "stale {stale}, fresh {fresh}");

    // 3. The replica is promoted: writes to shard 0 resume without a
    // restart (its URL lists both hosts, read-write wanted).
    stack.promote_replica(0).await?;
    let promoted_key = (0..WRITTEN).map(written_key).find(|k| shard_of(k) == 0).context("a key of shard 0")?;
    let mut probe_version = 1_000_000;
    let mut c2 = c.clone();
    until("a write to shard 0 after the promotion", Duration::from_secs(60), || {
        probe_version += 1;
        let rows = vec![row(&promoted_key, ts(base - 1, 0), vec![("n", v(Kind::Int64Value(probe_version)))])];
        let mut c = c2.clone();
        async move {
            Ok(c.write_features(write("bulk", rows))
                .await
                .is_ok_and(|a| a.into_inner().results.iter().all(|r| r.outcome != v1::WriteOutcome::Failed as i32)))
        }
    })
    .await?;
    let written_before = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len();
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failed_writes = writer.await?;

    // 4. Nothing acknowledged is lost: every acknowledged version (or a
    // newer one) is in the shards, and served.
    let acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let on_zero = acked.keys().filter(|&&k| shard_of(&written_key(k)) == 0).count();
    ensure!(on_zero > 10 && written_before > 0, "acknowledged writes of shard 0: {on_zero}");
    let promoted = stack.replica_urls()[0].clone().context("shard 0's replica")?;
    let (pg, connection) = tokio_postgres::connect(&promoted, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let keys: Vec<usize> = acked.keys().copied().collect();
    let names: Vec<String> = keys.iter().map(|&k| written_key(k)).collect();
    let stored: HashMap<String, i64> = pg
        .query("SELECT entity_key, n FROM strata.bulk WHERE entity_key = ANY($1)", &[&names])
        .await?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let rows = read(&mut c2, names.clone()).await?;
    for ((k, name), r) in keys.iter().zip(&names).zip(&rows) {
        let want = acked[k];
        if shard_of(name) == 0 {
            ensure!(
                stored.get(name).is_some_and(|&n| n >= want),
                "{name}: acknowledged {want}, stored {:?}",
                stored.get(name)
            );
        }
        let Some(Kind::Int64Value(served)) = r.values.first().and_then(|v| v.kind.clone()) else {
            anyhow::bail!("{name}: {r:?}");
        };
        ensure!(served >= want, "{name}: acknowledged {want}, served {served}");
    }
    println!(
        "replicas: {from_replicas} replica reads before the failure; {stale} stale and {fresh} fresh rows while \
         shard 0's primary was dead; {} acknowledged keys ({on_zero} on shard 0) all kept; {failed_writes} row \
         writes refused during the failover",
        acked.len()
    );
    drop(c);
    stack.stop().await;
    Ok(())
}
