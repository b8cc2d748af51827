//! Failure tests on the real stack, each under continuous load: a Redis
//! primary killed, a PostgreSQL shard stopped, a shard frozen, three times
//! the load the server can take, and SIGTERM in the middle of it all. They
//! break the shared stack, so they take turns (`Env::exclusive`), and each
//! puts the stack back as it found it.
//!
//! Each prints its figures (requests sent, failed, shed; rows stale,
//! unavailable, wrong) as `figures <test>: …`.

use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use strata_proto::v1::{self, value::Kind};
use strata_server::RunningServer;
use strata_server::config::FileConfig;
use strata_shard_router::shard_for;
use strata_tests::load::{Known, Load, LoadOptions, Tally};
use strata_tests::wire::{self, get, row, status, ts, v, write};
use strata_tests::{Env, TEST_VIEWS, client, integration_tests, repo_root, sample, scrape, scrape_at, strata_binary};
use tokio::time::Instant;

integration_tests!(
    a_killed_redis_primary_fails_no_request,
    a_stopped_shard_degrades_only_its_own_rows,
    a_frozen_shard_cannot_hold_requests_past_their_deadline,
    three_times_the_load_is_shed_and_the_rest_answered,
    sigterm_drains_in_flight_requests_and_exits_zero,
    a_server_started_while_redis_is_unreachable_serves_from_postgres_then_takes_redis_up,
    a_bulk_load_while_redis_holds_writes_retries_its_cache_step_and_fails_loudly_if_it_cannot,
);

/// Breakers that trip and probe quickly, so a test sees them do both.
fn fast_failures(config: &mut FileConfig) {
    config.breaker.failures = 3;
    config.breaker.open_for = Duration::from_millis(300);
    config.server.default_deadline = Duration::from_millis(500);
}

/// Writes `n` keys `<prefix>-<i>` with `n = i * 7` and returns them with
/// their shards.
async fn seed(env: &Env, server: &RunningServer, view: &str, prefix: &str, n: usize) -> Result<Arc<Vec<Known>>> {
    let mut c = client(server).await?;
    let keys: Vec<Known> = (0..n)
        .map(|i| {
            let key = format!("{prefix}-{i}");
            let shard = shard_for(&key, server.tiers().shards().shard_count() as u32) as usize;
            Known { key, n: i as i64 * 7, shard }
        })
        .collect();
    for chunk in keys.chunks(500) {
        let rows = chunk.iter().map(|k| row(&k.key, ts(1_700_000_000, 0), vec![("n", v(Kind::Int64Value(k.n)))]));
        let response = c.write_features(write(view, rows.collect())).await?.into_inner();
        ensure!(response.rows_written as usize == chunk.len(), "seeding {view}: {response:?}");
    }
    ensure!((0..env.shard_count()).all(|s| keys.iter().any(|k| k.shard == s)), "keys cover every shard");
    Ok(Arc::new(keys))
}

/// Reads every key once; returns the rows' (status, source) by key order.
async fn read_all(server: &RunningServer, view: &str, keys: &[Known]) -> Result<Vec<(v1::RowStatus, v1::Source)>> {
    let mut c = client(server).await?;
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(100) {
        let names: Vec<&str> = chunk.iter().map(|k| k.key.as_str()).collect();
        let answer = c.get_features(get(view, &names, &["n"])).await?.into_inner();
        ensure!(answer.rows.len() == chunk.len(), "{} rows for {} keys", answer.rows.len(), chunk.len());
        for (known, row) in chunk.iter().zip(&answer.rows) {
            if matches!(status(row), v1::RowStatus::Found | v1::RowStatus::Stale) {
                ensure!(row.values[0].kind == Some(Kind::Int64Value(known.n)), "{} has a wrong value", known.key);
            }
            out.push((status(row), wire::source(row)));
        }
    }
    Ok(out)
}

/// Polls `check` until it holds or `timeout` passes: for waiting on events
/// outside the process that offer nothing to await (a cluster failover).
async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<Duration>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<bool>>,
{
    let started = Instant::now();
    while started.elapsed() < timeout {
        if check().await? {
            return Ok(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

fn report(test: &str, tally: &Tally, extra: &str) {
    println!("figures {test}: {}{extra}", tally.figures());
}

fn options(view: &str, workers: usize, keys_per_request: usize, timeout: Duration) -> LoadOptions {
    LoadOptions { view: view.into(), workers, keys_per_request, timeout }
}

async fn a_killed_redis_primary_fails_no_request(env: &'static Env) -> Result<()> {
    let _turn = env.exclusive().await;
    let server = env.server_with(fast_failures).await?;
    let keys = seed(env, &server, "chaos_l2", "redis", 300).await?;
    // Keys outside the load, read once so Redis holds them: nothing keeps
    // them in L1, so reading them later shows whether Redis answers.
    let probes = seed(env, &server, "chaos_l2", "redis-probe", 100).await?;
    read_all(&server, "chaos_l2", &probes).await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    let load =
        Load::start(&endpoint, keys.clone(), env.shard_count(), options("chaos_l2", 4, 10, Duration::from_secs(1)));
    load.wait_for_requests(200).await?;

    let (nodes, _) = env.redis_cluster().await?;
    let victim = nodes.iter().find(|(_, primary, _)| *primary).context("a primary")?.0;
    env.kill_redis(victim).await?;
    // The node comes back whatever happens, or the tests after this one
    // run on a broken cluster.
    let outcome = killed_primary(env, victim, &server, &probes, load).await;
    env.restart_redis(victim).await?;
    eventually("the killed node to rejoin", Duration::from_secs(30), || async {
        let (nodes, ok) = env.redis_cluster().await?;
        Ok(ok && nodes.iter().all(|(_, _, failed)| !*failed))
    })
    .await?;
    let (tally, failover, resumed) = outcome?;
    let page = scrape(&server).await?;
    let opened = sample(&page, "strata_breaker_transitions_total", &[("dependency", "redis"), ("to", "open")]);
    report(
        "redis primary killed",
        &tally,
        &format!(
            " | failover after {failover:?}, L2 hits again {resumed:?} later, redis breaker opened {opened} times"
        ),
    );
    ensure!(tally.failed_total() == 0, "no RPC may fail: {:?}", tally.failed);
    ensure!(tally.wrong == 0, "no row may carry a wrong value");
    ensure!(tally.shed == 0 && tally.unavailable() == 0, "PostgreSQL was up: every row is answered");
    server.shutdown().await;
    Ok(())
}

/// The part of the test while a primary is dead: waits for the failover
/// and for L2 hits, then stops the load.
async fn killed_primary(
    env: &Env,
    victim: u16,
    server: &RunningServer,
    probes: &[Known],
    load: Load,
) -> Result<(Tally, Duration, Duration)> {
    let failover = eventually("the cluster to fail over", Duration::from_secs(30), || async {
        let (nodes, ok) = env.redis_cluster().await?;
        let victim_failed = nodes.iter().any(|(port, _, failed)| *port == victim && *failed);
        Ok(ok && victim_failed && nodes.iter().filter(|(_, primary, failed)| *primary && !*failed).count() == 3)
    })
    .await?;
    // L2 hits resume: the probe keys are answered from Redis again (L1
    // lives 20 ms in this view, so a pass after 30 ms cannot hit it).
    let resumed = eventually("L2 hits to resume", Duration::from_secs(30), || async {
        tokio::time::sleep(Duration::from_millis(30)).await;
        let rows = read_all(server, "chaos_l2", probes).await?;
        Ok(rows.iter().all(|(s, source)| *s == v1::RowStatus::Found && *source == v1::Source::L2))
    })
    .await;
    load.wait_for_requests(200).await?;
    let tally = load.stop().await;
    match resumed {
        Ok(resumed) => Ok((tally, failover, resumed)),
        Err(error) => Err(error.context(format!("load so far: {}", tally.figures()))),
    }
}

async fn a_stopped_shard_degrades_only_its_own_rows(env: &'static Env) -> Result<()> {
    let _turn = env.exclusive().await;
    let server = env.server_with(fast_failures).await?;
    let keys = seed(env, &server, "chaos_pg", "stop", 300).await?;
    // Half the keys are read (and cached) before the outage, half never.
    let (warm, cold): (Vec<Known>, Vec<Known>) = keys.iter().cloned().partition(|k| k.n % 2 == 0);
    read_all(&server, "chaos_pg", &warm).await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    // The load reads only the cached half; the check below reads all.
    let load = Load::start(
        &endpoint,
        Arc::new(warm.clone()),
        env.shard_count(),
        options("chaos_pg", 4, 10, Duration::from_secs(1)),
    );
    load.wait_for_requests(100).await?;

    let dead = 1;
    env.stop_shard(dead).await?;
    let outage = async {
        let before = load.tally();
        let noticed = eventually("the shard's breaker to open", Duration::from_secs(10), || async {
            Ok(!server.tiers().shards().available(dead))
        })
        .await?;
        load.wait_for_requests(300).await?;
        // While it is down: live-shard rows are found, dead-shard rows are
        // stale (cached before) or unavailable (never cached), never wrong.
        let during = read_all(&server, "chaos_pg", &keys).await?;
        for (known, (status, _)) in keys.iter().zip(&during) {
            let ok = match (known.shard == dead, known.n % 2 == 0) {
                (false, _) => *status == v1::RowStatus::Found,
                (true, true) => *status == v1::RowStatus::Stale,
                (true, false) => *status == v1::RowStatus::Unavailable,
            };
            ensure!(ok, "{} (shard {}, cached before: {}) is {status:?}", known.key, known.shard, known.n % 2 == 0);
        }
        Ok((before, load.tally(), during, noticed))
    }
    .await;
    // The shard comes back whatever happened, or the tests after this one
    // run without it.
    env.start_shard(dead).await?;
    let (before, outage, during, noticed) = outage?;
    let recovered = eventually("every row to be found again", Duration::from_secs(20), || async {
        Ok(read_all(&server, "chaos_pg", &keys).await?.iter().all(|(s, _)| *s == v1::RowStatus::Found))
    })
    .await?;
    load.wait_for_requests(100).await?;
    let tally = load.stop().await;
    report(
        "postgres shard stopped",
        &tally,
        &format!(
            " | breaker open {noticed:?} after the stop; load during the outage: {} stale, {} unavailable rows; a full read during it: {} found, {} stale, {} unavailable ({} keys never cached); recovered {recovered:?} after the restart",
            outage.stale() - before.stale(),
            outage.unavailable() - before.unavailable(),
            during.iter().filter(|(s, _)| *s == v1::RowStatus::Found).count(),
            during.iter().filter(|(s, _)| *s == v1::RowStatus::Stale).count(),
            during.iter().filter(|(s, _)| *s == v1::RowStatus::Unavailable).count(),
            cold.len()
        ),
    );
    ensure!(tally.failed_total() == 0, "no RPC may fail: {:?}", tally.failed);
    ensure!(tally.wrong == 0, "no row may carry a wrong value");
    for (shard, rows) in tally.rows.iter().enumerate().filter(|(s, _)| *s != dead) {
        ensure!(rows[1] == 0 && rows[2] == 0, "rows of live shard {shard} are never degraded: {rows:?}");
    }
    ensure!(outage.stale() > before.stale(), "the outage was seen: {}", outage.figures());
    server.shutdown().await;
    Ok(())
}

async fn a_frozen_shard_cannot_hold_requests_past_their_deadline(env: &'static Env) -> Result<()> {
    let _turn = env.exclusive().await;
    let server = env.server_with(fast_failures).await?;
    let keys = seed(env, &server, "chaos_pg", "freeze", 300).await?;
    let endpoint = format!("http://{}", server.grpc_addr());
    let deadline = Duration::from_millis(500);
    let load = Load::start(&endpoint, keys.clone(), env.shard_count(), options("chaos_pg", 4, 10, deadline));
    load.wait_for_requests(100).await?;

    let frozen = 0;
    env.freeze_shard(frozen, true).await?;
    let frozen_at = Instant::now();
    let thaw = async {
        let noticed = eventually("the frozen shard's breaker to open", Duration::from_secs(10), || async {
            Ok(!server.tiers().shards().available(frozen))
        })
        .await;
        load.wait_for_requests(300).await?;
        env.freeze_shard(frozen, false).await?;
        noticed
    };
    // Thaw even if the wait failed, or the stack stays frozen for the rest.
    let noticed = match thaw.await {
        Ok(noticed) => noticed,
        Err(error) => {
            env.freeze_shard(frozen, false).await?;
            return Err(error);
        }
    };
    let frozen_for = frozen_at.elapsed();
    let during = load.tally();
    let recovered = eventually("every row to be found again", Duration::from_secs(20), || async {
        Ok(read_all(&server, "chaos_pg", &keys).await?.iter().all(|(s, _)| *s == v1::RowStatus::Found))
    })
    .await?;
    let tally = load.stop().await;
    report(
        "postgres shard frozen",
        &tally,
        &format!(
            " | frozen for {frozen_for:?}, breaker open after {noticed:?}; deadline {deadline:?}; recovered {recovered:?} after SIGCONT"
        ),
    );
    ensure!(tally.failed_total() == 0, "no RPC may fail, DEADLINE_EXCEEDED included: {:?}", tally.failed);
    // A call past its grpc-timeout is failed by tonic (server side), so
    // the check above covers the deadline; `slowest` is in the figures.
    ensure!(tally.wrong == 0, "no row may carry a wrong value");
    ensure!(during.unavailable() + during.stale() > 0, "the freeze was seen: {}", during.figures());
    server.shutdown().await;
    Ok(())
}

/// A `strata serve` process on the test stack, with `overlay` added to its
/// configuration.
struct Served {
    child: tokio::process::Child,
    grpc: String,
    metrics: String,
    /// Set if the server said requests were cut at the end of its drain.
    cut: Arc<std::sync::atomic::AtomicBool>,
    _dir: tempfile::TempDir,
}

async fn serve(env: &Env, overlay: &str) -> Result<Served> {
    let dir = tempfile::tempdir()?;
    let base = std::fs::read_to_string(repo_root().join("config/strata.toml"))?;
    let config = env.config()?;
    let shards: String = config
        .postgres
        .shards
        .iter()
        .map(|s| format!("[[postgres.shards]]\nname = {:?}\nurl = {:?}\n\n", s.name, s.url))
        .collect();
    let stack = format!(
        "[server]\ngrpc_addr = \"127.0.0.1:0\"\nmetrics_addr = \"127.0.0.1:0\"\nfeast_http_addr = \"127.0.0.1:0\"\n{overlay}\n[redis]\nnodes = {:?}\n\n{shards}",
        config.redis.nodes
    );
    let (base_path, stack_path) = (dir.path().join("strata.toml"), dir.path().join("stack.toml"));
    std::fs::write(&base_path, format!("{base}\n{TEST_VIEWS}"))?;
    std::fs::write(&stack_path, stack)?;
    let mut child = tokio::process::Command::new(strata_binary()?)
        .args(["serve", "--config"])
        .arg(&base_path)
        .arg("--config")
        .arg(&stack_path)
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info,fred=warn,tokio_postgres=warn")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    // The "serving" line names the ports it chose.
    let stdout = child.stdout.take().context("stdout")?;
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let saw_cut = cut.clone();
    tokio::spawn(async move {
        use tokio::io::AsyncBufReadExt;
        let mut tx = Some(tx);
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(" serving ")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(line.clone());
            }
            if line.contains("did not finish within the drain timeout") {
                saw_cut.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            println!("  strata serve | {line}");
        }
    });
    let line = tokio::time::timeout(Duration::from_secs(30), rx).await.context("strata serve did not start")??;
    let field = |name: &str| {
        line.split_whitespace().find_map(|f| f.strip_prefix(name)).map(str::to_owned).context("address in log line")
    };
    Ok(Served {
        child,
        grpc: format!("http://{}", field("grpc_addr=")?),
        metrics: field("metrics_addr=")?,
        cut,
        _dir: dir,
    })
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    Ok(kb * 1024)
}

async fn three_times_the_load_is_shed_and_the_rest_answered(env: &'static Env) -> Result<()> {
    let _turn = env.exclusive().await;
    let mut served = serve(env, "max_in_flight = 8\n").await?;
    let pid = served.child.id().context("pid")?;
    let writer = env.server().await?;
    let keys = seed(env, &writer, "chaos_pg", "over", 1_000).await?;
    writer.shutdown().await;

    // Reads that go to PostgreSQL (this view's TTLs are milliseconds), so
    // each request is in flight long enough for callers to pile up.
    // Capacity: as many callers as the server admits at once.
    let timeout = Duration::from_secs(2);
    let measure = Load::start(&served.grpc, keys.clone(), env.shard_count(), options("chaos_pg", 8, 50, timeout));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm = measure.tally();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let capacity_tally = measure.stop().await;
    let capacity = (capacity_tally.ok - warm.ok) as f64 / started.elapsed().as_secs_f64();
    let rss_before = rss(pid)?;

    // Three times as many callers as the server admits at once, each
    // sending its next request as soon as the last is answered (or shed).
    let overload = Load::start(&served.grpc, keys.clone(), env.shard_count(), options("chaos_pg", 24, 50, timeout));
    let mut rss_peak = rss_before;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        rss_peak = rss_peak.max(rss(pid)?);
    }
    let tally = overload.stop().await;
    let offered = tally.sent as f64 / started.elapsed().as_secs_f64();
    let page = scrape_at(&served.metrics).await?;
    let shed_metric = sample(&page, "strata_requests_refused_total", &[("reason", "overloaded")]);
    let _ = served.child.start_kill();
    report(
        "3x overload",
        &tally,
        &format!(
            " | capacity {capacity:.0} req/s with 8 callers; 24 callers sent {offered:.0} req/s; server RSS {} MiB before, {} MiB peak; refused (server metric) {shed_metric}",
            rss_before >> 20,
            rss_peak >> 20
        ),
    );
    ensure!(tally.shed > 0, "some of the excess must be shed");
    ensure!(tally.ok > 0, "accepted requests keep being answered");
    ensure!(tally.failed_total() == 0, "nothing fails but by shedding: {:?}", tally.failed);
    ensure!(tally.wrong == 0 && tally.unavailable() == 0, "every accepted row is right");
    ensure!(rss_peak < rss_before + (64 << 20), "memory stays bounded: {} → {} MiB", rss_before >> 20, rss_peak >> 20);
    Ok(())
}

async fn sigterm_drains_in_flight_requests_and_exits_zero(env: &'static Env) -> Result<()> {
    let _turn = env.exclusive().await;
    let drain = Duration::from_secs(5);
    let mut served = serve(env, &format!("drain_timeout = \"{}s\"\n", drain.as_secs())).await?;
    let writer = env.server().await?;
    // Cold rows from PostgreSQL, so requests are in flight for a while.
    let keys = seed(env, &writer, "chaos_pg", "term", 2_000).await?;
    writer.shutdown().await;
    let load = Load::start(&served.grpc, keys, env.shard_count(), options("chaos_pg", 8, 100, Duration::from_secs(5)));
    load.wait_for_requests(100).await?;

    let pid = served.child.id().context("pid")?;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
    let signalled = Instant::now();
    let exit = tokio::time::timeout(drain + Duration::from_secs(2), served.child.wait()).await;
    let took = signalled.elapsed();
    let tally = load.stop().await;
    let exit = exit.context("the server did not exit within the drain time")??;
    // Calls the server never took: refused while draining, unable to
    // connect once the listener closed, or cancelled by the client's
    // connection before being sent (the server's GOAWAY said it would not
    // take them). The server's own word that it cut nothing is checked too.
    type Errors<'a> = Vec<(&'a String, &'a u64)>;
    let (refused, failed): (Errors, Errors) = tally.failed.iter().partition(|(error, _)| {
        matches!(
            error.as_str(),
            "Unavailable: tcp connect error"
                | "Unavailable: the server is shutting down; retry on another"
                | "Cancelled: operation was canceled"
        )
    });
    report(
        "sigterm under load",
        &tally,
        &format!(" | exit {exit} after {took:?} (drain time {drain:?}); refused before start: {refused:?}"),
    );
    ensure!(exit.success(), "exit status {exit}");
    ensure!(took < drain, "exited within the drain time: {took:?}");
    ensure!(failed.is_empty(), "no in-flight request may fail: {failed:?}");
    ensure!(!served.cut.load(std::sync::atomic::Ordering::SeqCst), "the server cut in-flight requests");
    ensure!(tally.ok > 0 && tally.wrong == 0);
    Ok(())
}

/// One read of `key` in the `chaos` view: its value and source.
async fn chaos_row(server: &RunningServer, key: &str) -> Result<(Option<i64>, v1::Source)> {
    let answer = client(server).await?.get_features(get("chaos", &[key], &["n"])).await?.into_inner();
    let row = answer.rows.first().context("no row")?;
    ensure!(status(row) == v1::RowStatus::Found, "{key}: {row:?}");
    let n = match row.values[0].kind {
        Some(Kind::Int64Value(n)) => Some(n),
        _ => None,
    };
    Ok((n, wire::source(row)))
}

async fn a_server_started_while_redis_is_unreachable_serves_from_postgres_then_takes_redis_up(
    env: &'static Env,
) -> Result<()> {
    // Breaker gauges are per process: no other test's servers meanwhile.
    let _turn = env.exclusive().await;
    // The seed node B is given is an address nothing listens on yet; later a
    // proxy there forwards to a real node, whose cluster map names the rest.
    let seed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let started = Instant::now();
    let b = env
        .server_with(|c| {
            fast_failures(c);
            c.redis.nodes = vec![seed.to_string()];
            c.redis.connect_timeout = Duration::from_millis(500);
        })
        .await
        .context("a server must start while redis is unreachable")?;
    let start_time = started.elapsed();
    let a = env.server().await?;
    let mut ca = client(&a).await?;
    let write_n = |key: &str, n: i64, seconds: i64| {
        write("chaos", vec![row(key, ts(seconds, 0), vec![("n", v(Kind::Int64Value(n)))])])
    };

    // Without Redis: reads come from PostgreSQL, then L1; writes land.
    ca.write_features(write_n("late-1", 1, 1)).await?;
    ensure!(chaos_row(&b, "late-1").await? == (Some(1), v1::Source::L3));
    ensure!(chaos_row(&b, "late-1").await? == (Some(1), v1::Source::L1));
    let written = client(&b).await?.write_features(write_n("late-2", 2, 1)).await?.into_inner();
    ensure!(written.rows_written == 1, "a write through B lands in postgres: {written:?}");
    ensure!(chaos_row(&a, "late-2").await?.0 == Some(2));
    let page = scrape(&b).await?;
    ensure!(page.contains("strata_breaker_state{dependency=\"redis\"} 2"), "B's redis breaker should be open");

    // Redis becomes reachable: B takes it up on its own.
    let listener = tokio::net::TcpListener::bind(seed).await?;
    let target = env.redis_nodes()[0].clone();
    let proxy = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            let target = target.clone();
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    ca.write_features(write_n("late-3", 3, 1)).await?;
    let took_up = eventually("B to read from redis", Duration::from_secs(30), || async {
        // Each try from below L1: a read answered by PostgreSQL fills it.
        b.tiers().l1.clear().await;
        Ok(chaos_row(&b, "late-3").await? == (Some(3), v1::Source::L2))
    })
    .await?;
    // Its invalidation subscription stands once it has cleared L1 (filled
    // while no announcement could be heard): a write through A reaches it.
    let mut clears = b.invalidations().clears();
    tokio::time::timeout(Duration::from_secs(30), clears.wait_for(|n| *n >= 1))
        .await
        .context("B never subscribed to invalidations")??;
    ensure!(chaos_row(&b, "late-1").await? == (Some(1), v1::Source::L2), "L1 was cleared on subscribing");
    ensure!(chaos_row(&b, "late-1").await? == (Some(1), v1::Source::L1));
    ca.write_features(write_n("late-1", 10, 2)).await?;
    let heard = eventually("B to hear of A's write", Duration::from_secs(10), || async {
        Ok(chaos_row(&b, "late-1").await?.0 == Some(10))
    })
    .await?;
    println!(
        "figures late redis: B started in {start_time:?} without redis, read from redis {took_up:?} after it answered, \
         heard a write {heard:?} after it"
    );
    a.shutdown().await;
    b.shutdown().await;
    proxy.abort();
    Ok(())
}

/// A bulk load while Redis holds every write for 3 s (overloaded, failing
/// over): its cache step times out, backs off and tries again, and the load
/// ends with every key made safe. While Redis holds writes for longer than
/// the load's cache timeout, the load reports every key it could not make
/// safe and is not a success.
async fn a_bulk_load_while_redis_holds_writes_retries_its_cache_step_and_fails_loudly_if_it_cannot(
    env: &'static Env,
) -> Result<()> {
    use strata_server::load::{Format, LoadOptions as Bulk};
    const ROWS: usize = 20_000;
    let _turn = env.exclusive().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("stall.csv");
    let mut text = String::from("entity_key,event_time,n\n");
    for i in 0..ROWS {
        text.push_str(&format!("stall-{i},2026-01-01T00:00:00Z,{i}\n"));
    }
    std::fs::write(&path, text)?;
    let config = env.config()?.validate()?;

    env.pause_redis_writes(Some(3_000)).await?;
    let started = Instant::now();
    let report = strata_server::load::run(&config, &Bulk::new("chaos", &path, Format::Csv)).await;
    let report = report?;
    println!("figures bulk load while redis holds writes for 3 s: {} in {:?}", report.summary(), started.elapsed());
    ensure!(report.written == ROWS as u64 && report.failed == 0, "{report:?}");
    ensure!(report.cache_errors == 0, "the cache step gave up on {} keys", report.cache_errors);
    ensure!(report.check().is_ok());

    env.pause_redis_writes(Some(60_000)).await?;
    let options = Bulk { cache_timeout: Duration::from_secs(1), ..Bulk::new("chaos", &path, Format::Csv) };
    let report = strata_server::load::run(&config, &options).await;
    env.pause_redis_writes(None).await?;
    let report = report?;
    ensure!(report.failed == 0 && report.written == ROWS as u64, "postgres took every row: {report:?}");
    ensure!(report.cache_errors == ROWS as u64, "every key is at risk: {report:?}");
    let Err(error) = report.check() else { bail!("a load that left keys at risk passed its check") };
    let error = error.to_string();
    ensure!(error.contains(&format!("{ROWS} written keys are at risk")), "{error}");

    // Redis takes writes again: the server serves the loaded rows.
    let server = env.server().await?;
    let rows =
        client(&server).await?.get_features(get("chaos", &["stall-7", "stall-19999"], &["n"])).await?.into_inner().rows;
    ensure!(rows[0].values[0].kind == Some(Kind::Int64Value(7)), "{rows:?}");
    ensure!(rows[1].values[0].kind == Some(Kind::Int64Value(19_999)), "{rows:?}");
    server.shutdown().await;
    Ok(())
}
