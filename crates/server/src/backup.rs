//! `strata backup` and `strata restore`: a logical snapshot of every shard
//! into a folder, and back into the shards, for the disaster that takes
//! the whole stack (Redis included).
//!
//! A backup holds, per shard and view, the view's table as binary COPY
//! (every column, tombstones included) taken from one repeatable-read
//! snapshot of that shard; the servers' sample of the most-read keys of
//! each view, read from Redis while it is there, so a restored stack can
//! warm them first; and `backup.json`, written last, with each file's rows,
//! size and SHA-256. A folder without `backup.json` is not a backup.
//!
//! A restore checks every file against the manifest before it writes
//! anything, creates the views' tables, and merges each copy into its shard
//! with the event-time rule: it can be run again after a crash, and a row
//! written since the backup stays. With `--warm` it then loads the most-read
//! keys into Redis. The shards must be the backup's, by name and in order:
//! each row is on the shard the routing rule names for that count.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use strata_cache_tiers::L2Cache;
use strata_core::FeatureView;
use strata_shard_router::{Column, ShardRouter};

use crate::config::Config;
use crate::load::progress_bar;
use crate::warm::{self, WarmOptions};

/// The manifest's name in a backup folder.
pub const MANIFEST: &str = "backup.json";
/// The manifest format this version writes and reads.
const FORMAT: u32 = 1;
/// Longest wait on a shard for one piece of a copy.
const IDLE: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub dir: PathBuf,
    /// Most-read keys saved per view (0: none).
    pub hot_keys: usize,
    pub progress: bool,
}

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub dir: PathBuf,
    /// Load the backup's most-read keys into Redis afterwards.
    pub warm: bool,
    pub progress: bool,
}

/// `backup.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub strata_version: String,
    pub started_at: String,
    pub finished_at: String,
    /// Shard names, in routing order.
    pub shards: Vec<String>,
    pub views: Vec<ViewBackup>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ViewBackup {
    pub name: String,
    /// The table's columns as copied: `[name, type]`.
    pub columns: Vec<(String, String)>,
    /// One per shard, in shard order.
    pub files: Vec<FileBackup>,
    /// The most-read keys, one per line, relative to the folder; `None`
    /// when Redis could not be read.
    pub hot_keys: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FileBackup {
    pub shard: String,
    /// Relative to the folder.
    pub file: String,
    pub rows: u64,
    pub tombstones: u64,
    pub bytes: u64,
    pub sha256: String,
}

impl Manifest {
    pub fn rows(&self) -> u64 {
        self.views.iter().flat_map(|v| &v.files).map(|f| f.rows).sum()
    }

    pub fn tombstones(&self) -> u64 {
        self.views.iter().flat_map(|v| &v.files).map(|f| f.tombstones).sum()
    }

    pub fn bytes(&self) -> u64 {
        self.views.iter().flat_map(|v| &v.files).map(|f| f.bytes).sum()
    }
}

#[derive(Debug)]
pub struct RestoreReport {
    pub rows: u64,
    pub tombstones: u64,
    pub applied: u64,
    pub warmed: usize,
    pub elapsed: Duration,
}

/// Backs every shard up into `options.dir`, which must not exist or be
/// empty. Shards are copied in parallel.
pub async fn backup(config: &Config, options: &BackupOptions) -> Result<Manifest> {
    let started = Instant::now();
    let started_at = now();
    let dir = &options.dir;
    if dir.exists() && std::fs::read_dir(dir)?.next().is_some() {
        bail!("{} is not empty: a backup goes into a new folder", dir.display());
    }
    let router = ShardRouter::new(&config.shards, &config.pool)?;
    let names: Vec<String> = router.names().iter().map(|n| (*n).to_owned()).collect();
    let views = config.registry.views();
    for name in &names {
        ensure!(
            !name.starts_with('.') && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)),
            "shard name {name:?} cannot name a folder: use letters, digits, '-', '_' and '.'"
        );
        std::fs::create_dir_all(dir.join(name)).with_context(|| format!("cannot create {}", dir.display()))?;
    }

    let bar = progress_bar((names.len() * views.len()) as u64, options.progress);
    bar.set_message("tables copied");
    let exports = names.iter().enumerate().map(|(shard, name)| {
        let (router, bar) = (&router, &bar);
        async move {
            let exported = router
                .export(shard, views, IDLE, |view| {
                    bar.inc(1);
                    let file = std::fs::File::create(dir.join(file_name(name, view)))?;
                    Ok(tokio::io::BufWriter::new(tokio::fs::File::from_std(file)))
                })
                .await
                .with_context(|| format!("cannot back up shard {name}"))?;
            anyhow::Ok(exported)
        }
    });
    let exported = try_join_all(exports).await?;
    bar.finish_and_clear();

    let hot = hot_keys(config, options.hot_keys).await;
    let mut manifest = Manifest {
        format: FORMAT,
        strata_version: env!("CARGO_PKG_VERSION").into(),
        started_at,
        finished_at: String::new(),
        shards: names.clone(),
        views: Vec::new(),
    };
    std::fs::create_dir_all(dir.join("hot-keys"))?;
    for (v, view) in views.iter().enumerate() {
        let mut files = Vec::new();
        for (name, per_view) in names.iter().zip(&exported) {
            let e = &per_view[v];
            let file = file_name(name, view);
            files.push(FileBackup {
                shard: name.clone(),
                sha256: sha256(&dir.join(&file)).await?,
                file,
                rows: e.rows,
                tombstones: e.tombstones,
                bytes: e.bytes,
            });
        }
        let hot_keys = match &hot {
            Some(hot) => {
                let file = format!("hot-keys/{}.txt", view.name);
                let mut text = hot[v].join("\n");
                text.push('\n');
                std::fs::write(dir.join(&file), text)?;
                Some(file)
            }
            None => None,
        };
        let columns = exported[0][v].columns.iter().map(|c| (c.name.clone(), c.ty.clone())).collect();
        manifest.views.push(ViewBackup { name: view.name.clone(), columns, files, hot_keys });
    }
    manifest.finished_at = now();
    // Written last, and in one rename: a folder without it is incomplete.
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    std::fs::write(&tmp, serde_json::to_string_pretty(&manifest)? + "\n")?;
    std::fs::rename(&tmp, dir.join(MANIFEST))?;
    tracing::info!(rows = manifest.rows(), elapsed = ?started.elapsed(), "backup written");
    Ok(manifest)
}

/// Restores a backup into the configured shards.
pub async fn restore(config: &Config, options: &RestoreOptions) -> Result<RestoreReport> {
    let started = Instant::now();
    let dir = &options.dir;
    let manifest = read_manifest(dir)?;
    let router = ShardRouter::new(&config.shards, &config.pool)?;
    let names: Vec<&str> = router.names();
    ensure!(
        manifest.shards.iter().map(String::as_str).eq(names.iter().copied()),
        "the backup is of shards {:?} and the configuration has {:?}: restore into the same shards, in the same \
         order (each row is on the shard the routing rule names for that count)",
        manifest.shards,
        names
    );
    let mut views: Vec<(Arc<FeatureView>, &ViewBackup)> = Vec::new();
    for backed in &manifest.views {
        let view = config.registry.get(&backed.name).with_context(|| {
            format!("the backup has view {:?}, which the configuration does not define", backed.name)
        })?;
        views.push((view.clone(), backed));
    }
    // Every file is whole before anything is written.
    for (_, backed) in &views {
        for file in &backed.files {
            let path = dir.join(&file.file);
            let len = std::fs::metadata(&path).with_context(|| format!("{} is missing", path.display()))?.len();
            ensure!(len == file.bytes, "{} has {len} bytes, the backup wrote {}", path.display(), file.bytes);
            ensure!(sha256(&path).await? == file.sha256, "{} is damaged: its SHA-256 does not match", path.display());
        }
    }
    router.migrate(config.registry.views()).await.context("cannot create the views' tables")?;

    let bar = progress_bar(manifest.bytes(), options.progress);
    bar.set_message("bytes restored");
    let imports = (0..names.len()).map(|shard| {
        let (router, views, bar) = (&router, &views, &bar);
        async move {
            let mut applied = 0;
            for (view, backed) in views {
                let file = &backed.files[shard];
                let columns: Vec<Column> =
                    backed.columns.iter().map(|(name, ty)| Column { name: name.clone(), ty: ty.clone() }).collect();
                let reader = tokio::fs::File::open(dir.join(&file.file)).await?;
                let imported = router
                    .import(shard, view, &columns, tokio::io::BufReader::new(reader), IDLE)
                    .await
                    .with_context(|| format!("cannot restore {} into shard {}", view.name, file.shard))?;
                ensure!(
                    imported.copied == file.rows + file.tombstones,
                    "{}: {} rows copied, the backup has {}",
                    file.file,
                    imported.copied,
                    file.rows + file.tombstones
                );
                applied += imported.applied;
                bar.inc(file.bytes);
            }
            anyhow::Ok(applied)
        }
    });
    let applied = try_join_all(imports).await?.into_iter().sum();
    bar.finish_and_clear();

    // Every view's rows are there: as many as the backup had, or more.
    for (view, backed) in &views {
        let counts = router.count_rows(view).await?;
        for (file, count) in backed.files.iter().zip(counts) {
            ensure!(
                count + file.tombstones >= file.rows,
                "{} on shard {} has {count} rows after the restore, the backup {}",
                view.name,
                file.shard,
                file.rows
            );
        }
    }

    let mut warmed = 0;
    if options.warm {
        let (tiers, l2) = warm::tiers(config).await?;
        for (view, backed) in &views {
            let Some(file) = &backed.hot_keys else { continue };
            let keys = warm::read_keys(&dir.join(file))?;
            let report = warm::warm(&tiers, config, &WarmOptions { view: view.name.clone(), keys, top: None }).await?;
            warmed += report.found;
        }
        l2.close().await;
    }
    Ok(RestoreReport {
        rows: manifest.rows(),
        tombstones: manifest.tombstones(),
        applied,
        warmed,
        elapsed: started.elapsed(),
    })
}

/// Reads and checks a backup's manifest.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("{} has no {MANIFEST}: not a backup, or one that did not finish", dir.display()))?;
    let manifest: Manifest =
        serde_json::from_str(&text).with_context(|| format!("{} is unreadable", path.display()))?;
    ensure!(
        manifest.format == FORMAT,
        "{} is of format {}, this strata reads {FORMAT}",
        path.display(),
        manifest.format
    );
    for view in &manifest.views {
        ensure!(
            view.files.len() == manifest.shards.len(),
            "{}: view {} has {} files for {} shards",
            path.display(),
            view.name,
            view.files.len(),
            manifest.shards.len()
        );
        // Names inside the folder only.
        for file in view.files.iter().map(|f| &f.file).chain(&view.hot_keys) {
            ensure!(
                Path::new(file).components().all(|c| matches!(c, std::path::Component::Normal(_))),
                "{}: {file:?} is outside the backup folder",
                path.display()
            );
        }
    }
    Ok(manifest)
}

/// The most-read keys of every view, in registry order; `None` (logged)
/// when Redis cannot be read: the backup of the shards goes on without.
async fn hot_keys(config: &Config, n: usize) -> Option<Vec<Vec<String>>> {
    if n == 0 {
        return None;
    }
    let l2 = match L2Cache::connect_now(&config.redis).await {
        Ok(l2) => l2,
        Err(error) => {
            tracing::warn!(%error, "redis is unreachable: the backup has no most-read keys");
            eprintln!("warning: redis is unreachable, so the backup has no most-read keys to warm");
            return None;
        }
    };
    let mut out = Vec::new();
    for view in config.registry.views() {
        match l2.top_keys(&view.name, n).await {
            Ok(keys) => out.push(keys),
            Err(error) => {
                tracing::warn!(%error, "cannot read the most-read keys: the backup has none");
                eprintln!("warning: cannot read the most-read keys from redis, so the backup has none");
                l2.close().await;
                return None;
            }
        }
    }
    l2.close().await;
    Some(out)
}

fn file_name(shard: &str, view: &FeatureView) -> String {
    format!("{shard}/{}.copy", view.name)
}

async fn sha256(path: &Path) -> Result<String> {
    let path = path.to_owned();
    tokio::task::spawn_blocking(move || {
        use std::io::Read as _;
        let mut file = std::fs::File::open(&path).with_context(|| format!("cannot open {}", path.display()))?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0; 1 << 20];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
    })
    .await?
}

fn now() -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
