//! Five shards: a million rows spread within 5% of the mean and counted by
//! every shard at once; and the disaster drill: back up every shard, lose
//! the whole stack (Redis included), restore into fresh instances, warm
//! Redis with the most-read keys and serve every row again.

use std::ffi::OsStr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use futures::StreamExt as _;
use strata_devstack::{PortPlan, Stack, StackOptions};
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_server::backup::{MANIFEST, Manifest};
use strata_server::load::{Format, LoadOptions};
use strata_tests::wire::{get, row, source, status, ts, v, write};
use strata_tests::{Env, client, config_files, config_for, integration_tests, strata};

integration_tests!(
    shards = 5;
    a_million_rows_over_five_shards_sit_where_the_rule_says_each_within_five_percent_of_the_mean,
    the_disaster_drill_restores_every_row_into_a_fresh_stack_and_serves_the_most_read_from_redis,
    a_reshard_from_two_to_three_shards_killed_and_resumed_under_load_loses_and_misses_nothing,
);

async fn a_million_rows_over_five_shards_sit_where_the_rule_says_each_within_five_percent_of_the_mean(
    env: &'static Env,
) -> Result<()> {
    let _exclusive = env.exclusive().await;
    const ROWS: usize = 1_000_000;
    ensure!(env.shard_count() == 5);
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("users.csv");
    {
        use std::io::Write as _;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&path)?);
        writeln!(out, "entity_key,event_time,n,s")?;
        for i in 0..ROWS {
            writeln!(out, "user:{i:07},2026-01-01T00:00:00Z,{i},s{i}")?;
        }
    }
    let config = env.config()?.validate()?;
    let report = strata_server::load::run(&config, &LoadOptions::new("bulk", &path, Format::Csv)).await?;
    println!("five shards: {}", report.summary());
    ensure!(report.written == ROWS as u64 && report.failed == 0 && report.cache_errors == 0, "{report:?}");

    // `strata shards`, as a user runs it.
    let files = config_files(dir.path(), env.redis_nodes(), env.shard_urls())?;
    let args = [OsStr::new("shards"), "-c".as_ref(), files[0].as_os_str(), "-c".as_ref(), files[1].as_os_str()];
    let (ok, out, err) =
        strata(&[&args[..], &["--view".as_ref(), "bulk".as_ref(), "--json".as_ref()]].concat()).await?;
    ensure!(ok, "strata shards failed: {err}");
    let counted: serde_json::Value = serde_json::from_str(&out)?;
    let counted = &counted[0];
    ensure!(counted["rows"] == ROWS as u64, "{counted}");
    let mean = ROWS as f64 / 5.0;
    let registry = env.registry()?;
    let view = registry.get("bulk").context("bulk")?;
    for i in 0..5 {
        let on_shard = counted["shards"][format!("shard-{i}")].as_u64().context("a shard's count")?;
        ensure!((on_shard as f64 - mean).abs() <= 0.05 * mean, "shard-{i} holds {on_shard} rows, the mean is {mean}");
        // Each key on the shard the rule names for five shards.
        let keys = env.keys_on_shard(i, "bulk").await?;
        ensure!(keys.len() as u64 == on_shard, "shard-{i}: {} keys, strata shards said {on_shard}", keys.len());
        let misplaced = keys
            .iter()
            .filter(|k| strata_shard_router::shard_for_key(&view.entity.routing_bytes(k), 5) as usize != i)
            .count();
        ensure!(misplaced == 0, "{misplaced} keys on shard-{i} belong elsewhere");
    }
    ensure!(counted["max_over_mean"].as_f64().is_some_and(|m| m <= 1.05), "{counted}");
    let (ok, table, _) = strata(&[&args[..], &["--view".as_ref(), "bulk".as_ref()]].concat()).await?;
    ensure!(ok && table.lines().nth(1).is_some_and(|l| l.starts_with("bulk") && l.contains("(20.")), "{table}");
    println!("five shards:\n{table}");

    // A sample through the API.
    let server = env.server().await?;
    let keys: Vec<String> = (0..ROWS).step_by(1_009).map(|i| format!("user:{i:07}")).collect();
    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
    let rows = client(&server).await?.get_features(get("bulk", &refs, &["n"])).await?.into_inner().rows;
    for (r, i) in rows.iter().zip((0..ROWS).step_by(1_009)) {
        ensure!(status(r) == v1::RowStatus::Found && r.values == [v(Kind::Int64Value(i as i64))], "row {i}: {r:?}");
    }
    server.shutdown().await;
    Ok(())
}

/// Rows of the drill: `bulk` (int64 and string) and `hostile` (with a
/// float list), some of them deleted afterwards.
const DRILL_ROWS: usize = 20_000;
const DELETED: usize = 200;
const HOT: usize = 500;

fn drill_key(view: &str, i: usize) -> String {
    format!("drill:{view}:{i:05}")
}

fn drill_values(view: &str, i: usize) -> Vec<v1::Value> {
    match view {
        "bulk" => vec![v(Kind::Int64Value(i as i64)), v(Kind::StringValue(format!("s{i}")))],
        _ => vec![
            v(Kind::Int64Value(-(i as i64))),
            v(Kind::StringValue(format!("h{i}"))),
            v(Kind::FloatListValue(v1::FloatList { values: vec![i as f32, 0.5] })),
        ],
    }
}

fn features(view: &str) -> &'static [&'static str] {
    if view == "bulk" { &["n", "s"] } else { &["n", "s", "emb"] }
}

async fn start_stack(dir: &std::path::Path) -> Result<Stack> {
    start_stack_of(dir, 5).await
}

async fn start_stack_of(dir: &std::path::Path, shards: usize) -> Result<Stack> {
    Stack::start(StackOptions {
        data_dir: dir.to_owned(),
        ports: PortPlan::Ephemeral,
        shards,
        replicas: false,
        security: None,
    })
    .await
}

async fn serve(stack: &Stack) -> Result<RunningServer> {
    let mut config = config_for(&stack.redis_nodes(), &stack.shard_urls())?;
    config.hot_keys.sample_rate = 1.0;
    RunningServer::start(config.validate()?).await
}

async fn the_disaster_drill_restores_every_row_into_a_fresh_stack_and_serves_the_most_read_from_redis(
    env: &'static Env,
) -> Result<()> {
    let _exclusive = env.exclusive().await;
    let work = tempfile::tempdir()?;
    let backup = work.path().join("backup");

    // The stack that is lost: rows written and acknowledged, some deleted,
    // the first HOT keys of bulk read often.
    let lost = start_stack(&work.path().join("lost")).await?;
    let server = serve(&lost).await?;
    let mut c = client(&server).await?;
    for view in ["bulk", "hostile"] {
        for chunk in (0..DRILL_ROWS).collect::<Vec<_>>().chunks(1_000) {
            let rows = chunk
                .iter()
                .map(|&i| {
                    let names = features(view);
                    let mut r = row(&drill_key(view, i), ts(1_767_225_600, 0), Vec::new());
                    for (name, value) in names.iter().zip(drill_values(view, i)) {
                        r.features.insert((*name).to_owned(), value);
                    }
                    r
                })
                .collect();
            let written = c.write_features(write(view, rows)).await?.into_inner();
            ensure!(written.rows_written == chunk.len() as u64, "{view}: {} written", written.rows_written);
        }
    }
    let deleted: Vec<String> = (DRILL_ROWS - DELETED..DRILL_ROWS).map(|i| drill_key("bulk", i)).collect();
    let done = c
        .delete_features(v1::DeleteFeaturesRequest {
            feature_view: "bulk".into(),
            entity_keys: deleted.clone(),
            event_time: Some(ts(1_767_225_601, 0)),
        })
        .await?
        .into_inner();
    ensure!(done.rows_written == DELETED as u64, "{done:?}");
    let hot: Vec<String> = (0..HOT).map(|i| drill_key("bulk", i)).collect();
    let hot_refs: Vec<&str> = hot.iter().map(String::as_str).collect();
    for _ in 0..3 {
        c.get_features(get("bulk", &hot_refs, &["n"])).await?;
    }
    // The servers record their sample of reads in the background.
    let l2 = strata_cache_tiers::L2Cache::connect_now(
        &config_for(&lost.redis_nodes(), &lost.shard_urls())?.validate()?.redis,
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while l2.top_keys("bulk", 2 * HOT).await?.len() < HOT {
        ensure!(Instant::now() < deadline, "the reads of the hot keys were never recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    l2.close().await;

    let files = config_files(work.path(), &lost.redis_nodes(), &lost.shard_urls())?;
    let config_args = |files: &[std::path::PathBuf; 2]| {
        vec!["-c".into(), files[0].clone().into_os_string(), "-c".into(), files[1].clone().into_os_string()]
    };
    let mut args: Vec<std::ffi::OsString> = vec!["backup".into()];
    args.extend(config_args(&files));
    args.push(backup.clone().into_os_string());
    let (ok, out, err) = run(&args).await?;
    ensure!(ok, "strata backup failed: {err}");
    println!("drill: {}", out.lines().last().unwrap_or_default());
    let manifest: Manifest = serde_json::from_str(&std::fs::read_to_string(backup.join(MANIFEST))?)?;
    ensure!(manifest.shards.len() == 5);
    let of = |name: &str| manifest.views.iter().find(|v| v.name == name).context("a view of the backup");
    let bulk = of("bulk")?;
    ensure!(bulk.files.iter().map(|f| f.rows).sum::<u64>() == (DRILL_ROWS - DELETED) as u64, "{bulk:?}");
    ensure!(bulk.files.iter().map(|f| f.tombstones).sum::<u64>() == DELETED as u64, "{bulk:?}");
    ensure!(bulk.files.iter().all(|f| f.rows > 0), "a shard with no rows of bulk: {bulk:?}");
    let hot_file = backup.join(bulk.hot_keys.as_ref().context("no most-read keys in the backup")?);
    let saved = std::fs::read_to_string(hot_file)?;
    ensure!(hot.iter().all(|k| saved.lines().any(|l| l == k)), "the backup's most-read keys lack some read ones");
    // A second backup into the same folder is refused.
    let (ok, _, err) = run(&args).await?;
    ensure!(!ok && err.contains("is not empty"), "{err}");

    // The whole stack is lost: server, PostgreSQL and Redis, data and all.
    server.shutdown().await;
    drop(lost);
    std::fs::remove_dir_all(work.path().join("lost"))?;

    let fresh = start_stack(&work.path().join("fresh")).await?;
    std::fs::create_dir_all(work.path().join("fresh-config"))?;
    let fresh_files = config_files(&work.path().join("fresh-config"), &fresh.redis_nodes(), &fresh.shard_urls())?;
    let restore = |extra: &[&str], files: &[std::path::PathBuf; 2], dir: &std::path::Path| {
        let mut args: Vec<std::ffi::OsString> = vec!["restore".into()];
        args.extend(config_args(files));
        args.extend(extra.iter().map(|a| a.into()));
        args.push(dir.as_os_str().to_owned());
        args
    };

    // A damaged file is found before anything is written.
    let damaged = work.path().join("damaged");
    copy_dir(&backup, &damaged)?;
    let victim = damaged.join(&bulk.files[2].file);
    let mut bytes = std::fs::read(&victim)?;
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&victim, bytes)?;
    let (ok, _, err) = run(&restore(&[], &fresh_files, &damaged)).await?;
    ensure!(!ok && err.contains("is damaged") && err.contains("shard-2"), "{err}");
    let mut shard = shard_client(&fresh.shard_urls()[2]).await?;
    let tables = shard.query_one("SELECT count(*) FROM pg_tables WHERE schemaname = 'strata'", &[]).await?;
    ensure!(tables.get::<_, i64>(0) == 0, "a damaged backup wrote something");
    // So is a configuration with other shards.
    std::fs::create_dir_all(work.path().join("four"))?;
    let four = config_files(&work.path().join("four"), &fresh.redis_nodes(), &fresh.shard_urls()[..4])?;
    let (ok, _, err) = run(&restore(&[], &four, &backup)).await?;
    ensure!(!ok && err.contains("restore into the same shards"), "{err}");

    // Recovery: restore and warm, start Strata, serve every row.
    let started = Instant::now();
    let (ok, out, err) = run(&restore(&["--warm"], &fresh_files, &backup)).await?;
    ensure!(ok, "strata restore failed: {err}");
    println!("drill: {}", out.lines().last().unwrap_or_default());
    let restored = started.elapsed();
    let server = serve(&fresh).await?;
    let mut c = client(&server).await?;
    // The most-read keys come from Redis at once.
    let rows = c.get_features(get("bulk", &hot_refs, &["n", "s"])).await?.into_inner().rows;
    for (i, r) in rows.iter().enumerate() {
        ensure!(status(r) == v1::RowStatus::Found && r.values == drill_values("bulk", i), "hot row {i}: {r:?}");
        ensure!(source(r) == v1::Source::L2, "hot row {i} was not warmed into redis: {r:?}");
    }
    let mut checked = 0;
    for view in ["bulk", "hostile"] {
        let chunks: Vec<Vec<String>> = (0..DRILL_ROWS)
            .collect::<Vec<_>>()
            .chunks(1_000)
            .map(|c| c.iter().map(|&i| drill_key(view, i)).collect())
            .collect();
        let mut answers = futures::stream::iter(chunks.into_iter().enumerate())
            .map(|(chunk, keys)| {
                let mut c = c.clone();
                async move {
                    let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
                    let rows = c.get_features(get(view, &refs, features(view))).await?.into_inner().rows;
                    anyhow::Ok((chunk, rows))
                }
            })
            .buffer_unordered(4);
        while let Some(answer) = answers.next().await {
            let (chunk, rows) = answer?;
            for (j, r) in rows.iter().enumerate() {
                let i = chunk * 1_000 + j;
                if view == "bulk" && i >= DRILL_ROWS - DELETED {
                    ensure!(status(r) == v1::RowStatus::NotFound, "deleted {view} row {i} came back: {r:?}");
                } else {
                    ensure!(
                        status(r) == v1::RowStatus::Found && r.values == drill_values(view, i),
                        "{view} row {i}: {r:?}"
                    );
                }
                checked += 1;
            }
        }
    }
    ensure!(checked == 2 * DRILL_ROWS);
    println!(
        "drill: recovery time {:.1?} (restore and warm {restored:.1?}), {checked} rows checked, {} bytes restored",
        started.elapsed(),
        manifest.bytes()
    );

    // Running the restore again changes nothing, and a deletion stays one.
    let (ok, out, err) = run(&restore(&[], &fresh_files, &backup)).await?;
    ensure!(ok && out.contains("(0 applied"), "a second restore: {out} {err}");
    let tombstones =
        shard.query_one("SELECT count(*) FROM strata.bulk WHERE deleted", &[]).await?.get::<_, i64>(0).unsigned_abs();
    ensure!(tombstones == bulk.files[2].tombstones, "shard-2 has {tombstones} tombstones");
    shard = shard_client(&fresh.shard_urls()[0]).await?;
    let n: i64 = shard.query_one("SELECT count(*) FROM strata.hostile", &[]).await?.get(0);
    ensure!(n.unsigned_abs() == of("hostile")?.files[0].rows, "shard-0 has {n} rows of hostile");
    server.shutdown().await;
    fresh.stop().await;
    Ok(())
}

async fn run(args: &[std::ffi::OsString]) -> Result<(bool, String, String)> {
    let args: Vec<&OsStr> = args.iter().map(|a| a.as_os_str()).collect();
    strata(&args).await
}

async fn shard_client(url: &str) -> Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    Ok(client)
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &to.join(entry.file_name()))?;
        } else {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

const RESHARD_KEYS: usize = 3_000;

fn rs_key(i: usize) -> String {
    format!("rs:{i:05}")
}

/// What the load saw during a reshard.
#[derive(Debug, Default)]
struct Seen {
    reads: u64,
    writes: u64,
    wrong: u64,
    not_found: u64,
    failed_writes: u64,
    first_problem: Option<String>,
}

async fn a_reshard_from_two_to_three_shards_killed_and_resumed_under_load_loses_and_misses_nothing(
    env: &'static Env,
) -> Result<()> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let _exclusive = env.exclusive().await;
    let work = tempfile::tempdir()?;
    let stack = start_stack_of(&work.path().join("stack"), 3).await?;
    let urls = stack.shard_urls();

    // A: an instance of the deployment as it was, configured with two
    // shards; it stores the first shard map (two shards). B: configured
    // with the new third shard too, routing by the map all the same.
    let a = RunningServer::start(config_for(&stack.redis_nodes(), &urls[..2])?.validate()?).await?;
    let mut ca = client(&a).await?;
    let base = 1_767_225_600;
    for chunk in (0..RESHARD_KEYS).collect::<Vec<_>>().chunks(1_000) {
        let rows = chunk.iter().map(|&i| row(&rs_key(i), ts(base, 0), vec![("n", v(Kind::Int64Value(1)))])).collect();
        ensure!(ca.write_features(write("bulk", rows)).await?.into_inner().rows_written == chunk.len() as u64);
    }
    let b = RunningServer::start(config_for(&stack.redis_nodes(), &urls)?.validate()?).await?;
    let cb = client(&b).await?;

    let two = config_files(work.path(), &stack.redis_nodes(), &urls)?;
    let reshard = |extra: &[&str]| {
        let mut args: Vec<std::ffi::OsString> = vec!["reshard".into()];
        for f in &two {
            args.push("-c".into());
            args.push(f.clone().into_os_string());
        }
        args.extend(extra.iter().map(|a| a.into()));
        args
    };
    // A dry run counts about a third of the keys and changes nothing.
    let (ok, out, err) = run(&reshard(&["--dry-run"])).await?;
    ensure!(ok, "dry run failed: {err}");
    let would: u64 = out
        .lines()
        .filter(|l| l.starts_with("bulk:"))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        .sum();
    ensure!((600..=1_400).contains(&would), "the dry run would move {would} of {RESHARD_KEYS} bulk keys:\n{out}");
    let on_third = shard_client(&urls[2]).await?;
    let before: i64 = on_third.query_one("SELECT count(*) FROM strata.bulk", &[]).await?.get(0);
    ensure!(before == 0, "the dry run wrote {before} rows onto the new shard");

    // Continuous load through B: writes of newer versions, reads that check
    // every value against what was acknowledged before the read began.
    let acked: Arc<Mutex<HashMap<usize, i64>>> = Arc::new(Mutex::new((0..RESHARD_KEYS).map(|i| (i, 1)).collect()));
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for worker in 0..2u64 {
        let (acked, seen, stop, mut c) = (acked.clone(), seen.clone(), stop.clone(), cb.clone());
        load.push(tokio::spawn(async move {
            let mut round = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                round += 1;
                // Writers own disjoint keys (worker 0 even, 1 odd), so a
                // key's versions are acknowledged in order.
                let keys: Vec<usize> = (0..20)
                    .map(|j| ((round * 37 + j * 149) as usize % (RESHARD_KEYS / 2)) * 2 + worker as usize)
                    .collect();
                let mut keys = keys;
                keys.sort_unstable();
                keys.dedup();
                let next: Vec<(usize, i64)> = {
                    let acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    keys.iter().map(|&k| (k, acked[&k] + 1)).collect()
                };
                let rows = next
                    .iter()
                    .map(|&(k, version)| {
                        row(&rs_key(k), ts(base + version, 0), vec![("n", v(Kind::Int64Value(version)))])
                    })
                    .collect();
                match c.write_features(write("bulk", rows)).await {
                    Ok(done) => {
                        let done = done.into_inner();
                        let mut acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        seen.writes += 1;
                        for (result, &(k, version)) in done.results.iter().zip(&next) {
                            if result.outcome == v1::WriteOutcome::Written as i32 {
                                acked.insert(k, version);
                            } else {
                                seen.failed_writes += 1;
                                seen.first_problem.get_or_insert(format!("write of {}: {result:?}", rs_key(k)));
                            }
                        }
                    }
                    Err(status) => {
                        let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        seen.failed_writes += 1;
                        seen.first_problem.get_or_insert(format!("write call: {status}"));
                    }
                }
                let read: Vec<usize> =
                    (0..50).map(|j| (round as usize * 61 + j * 59 + worker as usize) % RESHARD_KEYS).collect();
                let floor: Vec<i64> = {
                    let acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    read.iter().map(|k| acked[k]).collect()
                };
                let names: Vec<String> = read.iter().map(|&k| rs_key(k)).collect();
                let refs: Vec<&str> = names.iter().map(String::as_str).collect();
                let answer = c.get_features(get("bulk", &refs, &["n"])).await;
                let mut seen = seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                seen.reads += 1;
                match answer {
                    Ok(answer) => {
                        for ((r, floor), name) in answer.into_inner().rows.iter().zip(&floor).zip(&names) {
                            match (status(r), r.values.first().and_then(|v| v.kind.clone())) {
                                (v1::RowStatus::Found, Some(Kind::Int64Value(n))) if n >= *floor => {}
                                (v1::RowStatus::NotFound, _) => {
                                    seen.not_found += 1;
                                    seen.first_problem.get_or_insert(format!("{name} NOT_FOUND"));
                                }
                                _ => {
                                    seen.wrong += 1;
                                    seen.first_problem.get_or_insert(format!("{name}: {r:?}, acknowledged {floor}"));
                                }
                            }
                        }
                    }
                    Err(status) => {
                        seen.wrong += 1;
                        seen.first_problem.get_or_insert(format!("read call: {status}"));
                    }
                }
            }
        }));
    }

    // The reshard, killed once it has copied part of the keys, then run
    // again to the end.
    let started = Instant::now();
    let mut first = tokio::process::Command::new(strata_tests::strata_binary()?)
        .args(reshard(&["--batch", "100", "--settle", "3s"]))
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let on_first = shard_client(&urls[0]).await?;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let copied: Option<i64> = on_first
            .query_opt("SELECT copied FROM strata.reshard_progress WHERE view = 'bulk'", &[])
            .await
            .ok()
            .flatten()
            .map(|r| r.get(0));
        if copied.is_some_and(|c| c > 0) {
            break;
        }
        ensure!(first.try_wait()?.is_none(), "the first reshard ended before it was killed");
        ensure!(Instant::now() < deadline, "the reshard copied nothing in two minutes");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().await?;
    let (ok, out, err) = run(&reshard(&["--batch", "100", "--settle", "3s"])).await?;
    ensure!(ok, "the resumed reshard failed: {err}");
    println!("reshard: {}", out.lines().last().unwrap_or_default());
    println!("reshard: 2 -> 3 under load in {:.1?}, killed once", started.elapsed());
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for task in load {
        task.await?;
    }
    let seen = std::mem::take(&mut *seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner));
    println!("reshard: load {seen:?}");
    ensure!(seen.reads > 10 && seen.writes > 10, "too little load ran: {seen:?}");
    ensure!(seen.wrong == 0 && seen.not_found == 0 && seen.failed_writes == 0, "{seen:?}");

    // Every key on the shard the rule names for three shards, once; about
    // a third on the new one; and every acknowledged value served.
    let registry = env.registry()?;
    let view = registry.get("bulk").context("bulk")?;
    let mut total = 0;
    for (i, url) in urls.iter().enumerate() {
        let shard = shard_client(url).await?;
        let keys: Vec<String> = shard
            .query("SELECT entity_key FROM strata.bulk WHERE entity_key LIKE 'rs:%'", &[])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        let misplaced = keys
            .iter()
            .filter(|k| strata_shard_router::shard_for_key(&view.entity.routing_bytes(k), 3) as usize != i)
            .count();
        ensure!(misplaced == 0, "{misplaced} keys left on shard-{i} that the rule puts elsewhere");
        if i == 2 {
            ensure!((700..=1_300).contains(&keys.len()), "{} of {RESHARD_KEYS} keys moved", keys.len());
        }
        total += keys.len();
    }
    ensure!(total == RESHARD_KEYS, "{total} keys over the three shards");
    let acked = acked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let names: Vec<String> = (0..RESHARD_KEYS).map(rs_key).collect();
    for (chunk, keys) in names.chunks(1_000).enumerate() {
        let refs: Vec<&str> = keys.iter().map(String::as_str).collect();
        let rows = cb.clone().get_features(get("bulk", &refs, &["n"])).await?.into_inner().rows;
        for (j, r) in rows.iter().enumerate() {
            let i = chunk * 1_000 + j;
            ensure!(r.values == [v(Kind::Int64Value(acked[&i]))], "{}: {r:?}, acknowledged {}", rs_key(i), acked[&i]);
        }
    }

    // A, still configured with two shards, follows the map and cannot write
    // a key of the third shard anywhere.
    let moved = (0..RESHARD_KEYS)
        .find(|&i| strata_shard_router::shard_for_key(&view.entity.routing_bytes(&rs_key(i)), 3) == 2)
        .context("a key of the third shard")?;
    let refused = ca
        .write_features(write(
            "bulk",
            vec![row(&rs_key(moved), ts(base + 1_000_000, 0), vec![("n", v(Kind::Int64Value(-7)))])],
        ))
        .await
        .err()
        .context("a write to a shard the instance lacks was accepted")?;
    ensure!(
        refused.code() == tonic::Code::Unavailable
            && refused.message().contains("shard-2")
            && refused.message().contains("not configured"),
        "{refused:?}"
    );
    for url in &urls[..2] {
        let stray: i64 = shard_client(url)
            .await?
            .query_one("SELECT count(*) FROM strata.bulk WHERE entity_key = $1", &[&rs_key(moved)])
            .await?
            .get(0);
        ensure!(stray == 0, "the out-of-date instance wrote the key onto an old shard");
    }
    a.shutdown().await;
    b.shutdown().await;
    stack.stop().await;
    Ok(())
}
