//! `strata reshard`: adds shards to a running deployment.
//!
//! Add the new shards at the end of `postgres.shards` and run it. With jump
//! hash, growing from N to M shards moves only the keys whose shard
//! differs under the two counts, each from an old shard to a new one.
//! Reads and writes go on throughout; the steps are:
//!
//! 1. The shard map moves to a new epoch, "moving N → M": every server
//!    follows it within `postgres.map_refresh` (and a write from one that
//!    has not is refused by the shards' epoch fence and retried), writing
//!    each moving key to both its shards and reading it from both.
//! 2. Copy: each old shard's keys are scanned in order, and the moving
//!    rows (tombstones included) are put on their new shard with the
//!    event-time rule, so a copy racing a newer write is harmless. The
//!    position is saved after every batch: a reshard killed at any point
//!    resumes where it was.
//! 3. Verify: every moving key's row on its new shard is at least as new as
//!    on its old one.
//! 4. The map moves to "M stable": reads and writes use the new shards
//!    alone.
//! 5. Clean up: the moved rows are removed from the old shards.
//!
//! Caches are not touched: a key's cache entries do not depend on its
//! shard.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::future::try_join_all;
use strata_core::FeatureView;
use strata_shard_router::{Fetched, ShardMap, ShardRouter};

use crate::config::Config;
use crate::load::progress_bar;

/// Longest time one batch's reads and writes may take on a shard.
const BATCH_DEADLINE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct ReshardOptions {
    /// Count what would move, change nothing.
    pub dry_run: bool,
    /// Keys scanned per batch.
    pub batch: usize,
    /// How long to wait after each change of the map for every server to
    /// follow it.
    pub settle: Duration,
    /// The shard count the deployment routes over, when no shard map has
    /// been stored yet (no server of this version has started on it).
    pub from: Option<usize>,
    pub progress: bool,
}

/// Keys (rows and tombstones) per view, old shard and new shard.
pub type Moves = BTreeMap<(String, String, String), u64>;

#[derive(Debug, Default)]
pub struct ReshardReport {
    /// What moved (or, in a dry run, would move).
    pub moves: Moves,
    /// Keys scanned on the old shards.
    pub scanned: u64,
    /// Rows removed from the old shards at the end.
    pub removed: u64,
    /// The map's epoch at the end.
    pub epoch: u64,
    pub copy_time: Duration,
    pub elapsed: Duration,
}

impl ReshardReport {
    pub fn moved(&self) -> u64 {
        self.moves.values().sum()
    }
}

/// Runs (or resumes) a reshard to the configured shards.
pub async fn run(config: &Config, options: &ReshardOptions) -> Result<ReshardReport> {
    let started = Instant::now();
    let router = ShardRouter::new(&config.shards, &config.pool)?;
    let views = config.registry.views();
    if !options.dry_run {
        router.migrate(views).await.context("cannot create the views' tables on every shard")?;
    }
    router
        .refresh_map(config.pool.connect_timeout.max(Duration::from_secs(5)))
        .await
        .context("cannot read the shard map")?;
    let names: Vec<String> = router.names().iter().map(|n| (*n).to_owned()).collect();
    let mut map = router.map();
    if map.epoch == 0 {
        let from = options.from.context(
            "no shard map is stored yet: start a server on the current shards first, or say how many of the configured \
             shards are in use now with --from N",
        )?;
        ensure!((1..=names.len()).contains(&from), "--from {from}: there are {} configured shards", names.len());
        map = ShardMap { epoch: 0, shards: names[..from].to_vec(), from: from as u32, to: from as u32 };
    }
    let target = if map.moving() {
        ensure!(
            map.shards == names,
            "a reshard to {:?} is in progress: run it with exactly those shards in postgres.shards, in that order",
            map.shards
        );
        map.clone()
    } else {
        ensure!(
            names.len() >= map.shards.len() && names[..map.shards.len()] == map.shards[..],
            "postgres.shards must list the shards in use ({:?}) first, in that order, and new ones after them",
            map.shards
        );
        let n = map.shards.len() as u32;
        ShardMap { epoch: map.epoch + 1, shards: names.clone(), from: n, to: names.len() as u32 }
    };
    let mut report = ReshardReport { epoch: map.epoch, ..ReshardReport::default() };

    if options.dry_run {
        let (moves, scanned) = scan(&router, views, &target, options, Pass::Count).await?;
        report.moves = moves;
        report.scanned = scanned;
        report.elapsed = started.elapsed();
        return Ok(report);
    }

    if target.moving() {
        if !map.moving() {
            router.store_map(&target).await.context("cannot store the new shard map on every shard")?;
            println!(
                "shard map epoch {}: moving from {} to {} shards; waiting {:?} for every server to follow",
                target.epoch, target.from, target.to, options.settle
            );
            tokio::time::sleep(options.settle).await;
        } else {
            // Shards a killed run did not reach get the map now.
            router.store_map(&target).await.context("cannot store the shard map on every shard")?;
            println!("resuming the move from {} to {} shards (epoch {})", target.from, target.to, target.epoch);
        }
        let copying = Instant::now();
        let (moves, scanned) = scan(&router, views, &target, options, Pass::Copy).await?;
        report.copy_time = copying.elapsed();
        report.scanned = scanned;
        report.moves = moves;
        let (_, _) = scan(&router, views, &target, options, Pass::Verify).await?;
        println!("verified: every moving key is on its new shard");
        let stable =
            ShardMap { epoch: target.epoch + 1, shards: target.shards.clone(), from: target.to, to: target.to };
        router.store_map(&stable).await.context("cannot store the final shard map on every shard")?;
        println!(
            "shard map epoch {}: {} shards; waiting {:?} before removing moved rows",
            stable.epoch, stable.to, options.settle
        );
        tokio::time::sleep(options.settle).await;
        report.epoch = stable.epoch;
        report.removed = cleanup(&router, views, target.from as usize, &stable, options).await?;
    } else {
        // Nothing to move; rows a killed reshard left behind are removed,
        // and shards it did not reach get the final map.
        if map.epoch > 0 {
            router.store_map(&map).await.context("cannot store the shard map on every shard")?;
        }
        report.removed = cleanup(&router, views, map.shards.len(), &map, options).await?;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Count,
    Copy,
    Verify,
}

/// Scans every old shard (all at once) for the keys `map` moves, and
/// counts, copies or verifies them.
async fn scan(
    router: &ShardRouter,
    views: &[std::sync::Arc<FeatureView>],
    map: &ShardMap,
    options: &ReshardOptions,
    pass: Pass,
) -> Result<(Moves, u64)> {
    let index = configured(router, map)?;
    let total: u64 = {
        let mut total = 0;
        for view in views {
            total += router.count_rows(view).await?.iter().take(map.from as usize).sum::<u64>();
        }
        total
    };
    let bar = progress_bar(total, options.progress);
    bar.set_message(match pass {
        Pass::Count => "keys counted",
        Pass::Copy => "keys copied",
        Pass::Verify => "keys verified",
    });
    let shards = (0..map.from as usize).map(|old| {
        let (index, bar) = (&index, &bar);
        async move {
            let mut moves = Moves::new();
            let mut scanned = 0u64;
            for view in views {
                let source = index[old];
                let mut after: Option<String> = None;
                let mut copied = 0;
                if pass == Pass::Copy
                    && let Some((last, done)) = router.cursor(source, view, map.epoch).await?
                {
                    after = Some(last);
                    copied = done;
                }
                loop {
                    let keys = router.scan_keys(source, view, after.as_deref(), options.batch).await?;
                    let Some(last) = keys.last().cloned() else { break };
                    scanned += keys.len() as u64;
                    bar.inc(keys.len() as u64);
                    let mut by_target: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
                    for key in &keys {
                        if let (home, Some(new)) = map.place(view, key)
                            && home == old
                        {
                            by_target.entry(new).or_default().push(key);
                        }
                    }
                    for (new, keys) in by_target {
                        let deadline = tokio::time::Instant::now() + BATCH_DEADLINE;
                        match pass {
                            Pass::Count => {}
                            Pass::Copy => {
                                copy(router, view, source, index[new], &keys, deadline).await?;
                                copied += keys.len() as u64;
                            }
                            Pass::Verify => verify(router, view, source, index[new], &keys, deadline).await?,
                        }
                        let entry = (view.name.clone(), map.shards[old].clone(), map.shards[new].clone());
                        *moves.entry(entry).or_default() += keys.len() as u64;
                    }
                    if pass == Pass::Copy {
                        router.save_cursor(source, view, map.epoch, &last, copied).await?;
                    }
                    after = Some(last);
                }
            }
            anyhow::Ok((moves, scanned))
        }
    });
    let mut all = Moves::new();
    let mut scanned = 0;
    for (moves, n) in try_join_all(shards).await? {
        scanned += n;
        for (k, v) in moves {
            *all.entry(k).or_default() += v;
        }
    }
    bar.finish_and_clear();
    Ok((all, scanned))
}

/// Config indexes of the map's shards; every one must be configured.
fn configured(router: &ShardRouter, map: &ShardMap) -> Result<Vec<usize>> {
    let names = router.names();
    map.shards
        .iter()
        .map(|name| names.iter().position(|n| n == name).with_context(|| format!("shard {name} is not configured")))
        .collect()
}

async fn copy(
    router: &ShardRouter,
    view: &FeatureView,
    from: usize,
    to: usize,
    keys: &[&str],
    deadline: tokio::time::Instant,
) -> Result<()> {
    let rows = router.fetch_on(from, view, keys, deadline).await?;
    if let Some(i) = rows.iter().position(|r| matches!(r, Fetched::Unavailable)) {
        bail!("view {}: key {:?} is unreadable on its old shard", view.name, keys[i]);
    }
    let rows = keys.iter().map(|k| (*k).to_owned()).zip(rows).collect();
    router.put_on(to, view, rows, deadline).await?;
    Ok(())
}

/// Every key's row on `to` is at least as new as on `from`; a key that is
/// not is copied again once, then checked again.
async fn verify(
    router: &ShardRouter,
    view: &FeatureView,
    from: usize,
    to: usize,
    keys: &[&str],
    deadline: tokio::time::Instant,
) -> Result<()> {
    let behind = |old: &[Fetched], new: &[Fetched]| -> Vec<usize> {
        old.iter().zip(new).enumerate().filter(|(_, (o, n))| o.event_time() > n.event_time()).map(|(i, _)| i).collect()
    };
    let old = router.fetch_on(from, view, keys, deadline).await?;
    let new = router.fetch_on(to, view, keys, deadline).await?;
    let lagging = behind(&old, &new);
    if lagging.is_empty() {
        return Ok(());
    }
    let again: Vec<&str> = lagging.iter().map(|&i| keys[i]).collect();
    tracing::warn!(view = %view.name, keys = again.len(), "keys behind on their new shard; copying them again");
    copy(router, view, from, to, &again, deadline).await?;
    let old = router.fetch_on(from, view, &again, deadline).await?;
    let new = router.fetch_on(to, view, &again, deadline).await?;
    let still = behind(&old, &new);
    ensure!(
        still.is_empty(),
        "view {}: {} keys are still behind on their new shard, e.g. {:?}",
        view.name,
        still.len(),
        again[still[0]]
    );
    Ok(())
}

/// Removes from the first `old` shards the rows `map` routes elsewhere.
async fn cleanup(
    router: &ShardRouter,
    views: &[std::sync::Arc<FeatureView>],
    old: usize,
    map: &ShardMap,
    options: &ReshardOptions,
) -> Result<u64> {
    let index = configured(router, map)?;
    let shards = (0..old).map(|s| {
        let index = &index;
        async move {
            let mut removed = 0;
            for view in views {
                let mut after: Option<String> = None;
                loop {
                    let keys = router.scan_keys(index[s], view, after.as_deref(), options.batch).await?;
                    let Some(last) = keys.last().cloned() else { break };
                    let elsewhere: Vec<String> = keys.into_iter().filter(|k| map.place(view, k).0 != s).collect();
                    if !elsewhere.is_empty() {
                        removed += router.remove_on(index[s], view, &elsewhere).await?;
                    }
                    after = Some(last);
                }
            }
            anyhow::Ok(removed)
        }
    });
    Ok(try_join_all(shards).await?.into_iter().sum())
}

/// The report as a table: view, from, to, keys.
pub fn print_report(report: &ReshardReport, dry_run: bool) {
    let verb = if dry_run { "would move" } else { "moved" };
    for ((view, from, to), n) in &report.moves {
        println!("{view}: {n} keys {verb} from {from} to {to}");
    }
    let rate = report.moved() as f64 / report.copy_time.as_secs_f64().max(1e-9);
    if dry_run {
        println!("{} of {} keys {verb} ({:.1?})", report.moved(), report.scanned, report.elapsed);
    } else {
        println!(
            "{} of {} keys moved ({rate:.0} keys/s while copying), {} rows removed from the old shards; shard map epoch {}; \
             {:.1?} in all",
            report.moved(),
            report.scanned,
            report.removed,
            report.epoch,
            report.elapsed
        );
    }
}
