//! `strata load`: bulk-loads rows of one feature view from CSV or JSON
//! Lines, straight into the PostgreSQL shards.
//!
//! A blocking reader parses the file record by record, turns each into a
//! typed row of the view (or a rejection naming its line and the reason),
//! and routes it to its shard's batch. Each shard has its own writer tasks
//! (`concurrency` batches in flight per shard) that COPY a batch into a
//! temporary table and merge it with the event-time rule: a row older than
//! the stored one (or than a deletion) is skipped, never applied. Each batch
//! is one transaction, so a crashed load can simply be run again.
//!
//! After each batch, Redis gets a guard for every key written (a reader
//! sees a miss, a cache fill older than the row is refused) and every
//! server instance is told to drop the keys from its L1, so no cache keeps
//! an older copy of a loaded key.

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine as _;
use futures::StreamExt as _;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use strata_cache_tiers::L2Cache;
use strata_core::{EventTime, FeatureType, FeatureView, KeyType, OwnedKeyValue, Row, Value};
use strata_proto::{Limits, echo};
use strata_shard_router::ShardRouter;
use tokio::sync::mpsc;

use crate::config::Config;
use strata_engine::{announce_until, guard};

/// The input formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// A header line naming the columns: `entity_key`, `event_time`, and
    /// features of the view.
    Csv,
    /// One JSON object per line with the same names as keys.
    Jsonl,
}

impl Format {
    /// Guesses the format from a file name: `.jsonl`/`.ndjson` or CSV.
    pub fn from_path(path: &Path) -> Format {
        match path.extension().and_then(|e| e.to_str()) {
            Some("jsonl" | "ndjson" | "json") => Format::Jsonl,
            _ => Format::Csv,
        }
    }
}

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub view: String,
    pub file: PathBuf,
    pub format: Format,
    /// Rows per COPY batch (one transaction each).
    pub batch_rows: usize,
    /// Batches in flight per shard.
    pub concurrency: usize,
    /// Draw a progress bar on stderr (when it is a terminal).
    pub progress: bool,
    /// Longest time one batch may take in PostgreSQL (COPY and merge); a
    /// shard that does not answer by then fails the batch.
    pub batch_timeout: Duration,
    /// Longest time the cache step of one batch (Redis guards and the
    /// announcement) is tried for before its keys count as at risk.
    pub cache_timeout: Duration,
}

impl LoadOptions {
    /// Options for loading `file` into `view`, with the defaults of the
    /// `strata load` command.
    pub fn new(view: impl Into<String>, file: impl Into<PathBuf>, format: Format) -> LoadOptions {
        LoadOptions {
            view: view.into(),
            file: file.into(),
            format,
            batch_rows: 20_000,
            concurrency: 2,
            progress: false,
            batch_timeout: Duration::from_secs(120),
            cache_timeout: Duration::from_secs(60),
        }
    }
}

/// The per-command timeout of the loader's Redis connection, at least:
/// pipelines of guards on a busy machine take longer than a cache read may.
const LOAD_COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A row that was not loaded because it could not be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    /// 1-based line of the input file (for CSV, the line the record starts on).
    pub line: u64,
    pub reason: String,
}

/// What a load did.
#[derive(Debug, Default)]
pub struct LoadReport {
    /// Records read from the file (rejected ones included).
    pub rows_read: u64,
    pub written: u64,
    /// Not applied: a newer event time is stored, or the same key came
    /// again in the batch with a newer event time.
    pub skipped_older: u64,
    pub rejected: Vec<Rejected>,
    /// Rows of batches a shard failed to take; the load can be run again.
    pub failed: u64,
    pub failures: Vec<String>,
    /// Written keys whose caches could not be made safe within the cache
    /// timeout (Redis kept failing): an older cached copy of them may still
    /// be served until its TTL ends. A load with any is not a success.
    pub cache_errors: u64,
    pub elapsed: Duration,
    /// Time the reader spent reading and parsing (not waiting for writers).
    pub parse_time: Duration,
    /// Time spent in PostgreSQL (COPY and merge), summed over batches,
    /// which overlap.
    pub postgres_time: Duration,
    /// Time spent guarding and announcing keys in Redis, summed over batches.
    pub cache_time: Duration,
}

impl LoadReport {
    pub fn rows_per_second(&self) -> f64 {
        self.rows_read as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line: rows read, time, speed, and the counts.
    pub fn summary(&self) -> String {
        format!(
            "{} rows read in {:.1?} ({:.0} rows/s): {} written, {} skipped as older, {} rejected, {} failed",
            self.rows_read,
            self.elapsed,
            self.rows_per_second(),
            self.written,
            self.skipped_older,
            self.rejected.len(),
            self.failed,
        )
    }
}

/// What the reader sends a shard writer.
type Batch = Vec<(String, Row)>;

/// One record of the input: a keyed row, or why it was rejected.
type Parsed = Result<(String, Row), String>;

/// Loads a file into the view's shards, as configured.
pub async fn run(config: &Config, options: &LoadOptions) -> Result<LoadReport> {
    let view = config
        .registry
        .get(&options.view)
        .with_context(|| {
            let known: Vec<&str> = config.registry.views().iter().map(|v| v.name.as_str()).collect();
            format!("unknown view {:?} (known: {})", options.view, known.join(", "))
        })?
        .clone();
    let shards = ShardRouter::new(&config.shards, &config.pool)?;
    shards.migrate(config.registry.views()).await.context("cannot create the feature view tables")?;
    shards.refresh_map(Duration::from_secs(5)).await.context("cannot read the shard map")?;
    let map = shards.map();
    if map.moving() {
        bail!("a reshard is in progress (shard map epoch {}): load once `strata reshard` has finished", map.epoch);
    }
    if let Some(missing) = shards.map_shards().into_iter().find_map(Result::err) {
        bail!("the shard map names shard {missing}, which postgres.shards lacks: add it, then load");
    }
    let mut redis = config.redis.clone();
    redis.command_timeout = redis.command_timeout.max(LOAD_COMMAND_TIMEOUT);
    let l2 = L2Cache::connect_now(&redis).await.context("cannot connect to the redis cluster")?;
    let report = load(&shards, &l2, config, view, options).await;
    l2.close().await;
    report
}

/// Loads a file through existing connections.
pub async fn load(
    shards: &ShardRouter,
    l2: &L2Cache,
    config: &Config,
    view: Arc<FeatureView>,
    options: &LoadOptions,
) -> Result<LoadReport> {
    let started = Instant::now();
    let file = File::open(&options.file).with_context(|| format!("cannot open {}", options.file.display()))?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    let bar = progress_bar(size, options.progress);
    // Rows committed so far, over all shards, for the progress line.
    let committed = Arc::new(AtomicU64::new(0));
    let batch_rows = options.batch_rows.max(1);
    let concurrency = options.concurrency.max(1);

    let mut senders = Vec::new();
    let mut writers = Vec::new();
    for shard in 0..shards.shard_count() {
        let (tx, rx) = mpsc::channel::<Batch>(concurrency);
        senders.push(tx);
        let (shards, l2, view, committed) = (shards.clone(), l2.clone(), view.clone(), committed.clone());
        let (channel, guard_ttl) = (config.writes.channel.clone(), config.writes.guard_ttl);
        let (batch_timeout, cache_timeout) = (options.batch_timeout, options.cache_timeout);
        writers.push(tokio::spawn(async move {
            let mut tally = LoadReport::default();
            let mut batches = tokio_stream::wrappers::ReceiverStream::new(rx)
                .map(|batch| {
                    let (shards, l2, view, channel) = (&shards, &l2, &view, &channel);
                    async move {
                        let started = Instant::now();
                        let deadline = tokio::time::Instant::now() + batch_timeout;
                        let result = shards.copy_upsert(shard, view, &batch, deadline).await;
                        let postgres = started.elapsed();
                        let cache_errors = match &result {
                            Ok(written) => {
                                let deadline = tokio::time::Instant::now() + cache_timeout;
                                let keys: Vec<&str> = written.iter().map(|(k, _)| k.as_str()).collect();
                                let mut failed = guard(l2, view, written, guard_ttl, deadline).await;
                                if !announce_until(l2, channel, 0, view, &keys, deadline).await {
                                    failed = keys.len();
                                }
                                failed
                            }
                            Err(_) => 0,
                        };
                        (batch.len(), result, cache_errors, postgres, started.elapsed() - postgres)
                    }
                })
                .buffer_unordered(concurrency);
            while let Some((rows, result, cache_errors, postgres, cache)) = batches.next().await {
                tally.postgres_time += postgres;
                tally.cache_time += cache;
                match result {
                    Ok(written) => {
                        tally.written += written.len() as u64;
                        tally.skipped_older += (rows - written.len()) as u64;
                        tally.cache_errors += cache_errors as u64;
                    }
                    Err(error) => {
                        tally.failed += rows as u64;
                        tally.failures.push(error.detail());
                    }
                }
                committed.fetch_add(rows as u64, Ordering::Relaxed);
            }
            tally
        }));
    }

    let reader = {
        let (view, bar, format) = (view.clone(), bar.clone(), options.format);
        let limits = config.limits.clone();
        let router = shards.clone();
        tokio::task::spawn_blocking(move || -> Result<(u64, Vec<Rejected>, Duration)> {
            let started = Instant::now();
            let mut waited = Duration::ZERO;
            let mut batches: Vec<Batch> = (0..senders.len()).map(|_| Vec::with_capacity(batch_rows)).collect();
            let mut read = 0u64;
            let mut rejected = Vec::new();
            let counted = CountingReader { inner: file, bar: bar.clone() };
            let mut on_row = |line: u64, parsed: Parsed| -> Result<()> {
                read += 1;
                if read.is_multiple_of(10_000) {
                    let rate = read as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    let done = committed.load(Ordering::Relaxed);
                    bar.set_message(format!("{read} rows read ({rate:.0} rows/s), {done} through postgres"));
                }
                match parsed {
                    Ok((key, row)) => {
                        // Every shard of the map is configured (checked above).
                        let shard = router.shard_of(&view, &key).context("a key routed to no configured shard")?;
                        batches[shard].push((key, row));
                        if batches[shard].len() >= batch_rows {
                            let full = std::mem::replace(&mut batches[shard], Vec::with_capacity(batch_rows));
                            let blocked = Instant::now();
                            senders[shard].blocking_send(full).context("a shard writer stopped")?;
                            waited += blocked.elapsed();
                        }
                    }
                    Err(reason) => rejected.push(Rejected { line, reason }),
                }
                Ok(())
            };
            match format {
                Format::Csv => read_csv(counted, &view, &limits, &mut on_row)?,
                Format::Jsonl => read_jsonl(counted, &view, &limits, &mut on_row)?,
            }
            let parsing = started.elapsed() - waited;
            for (shard, batch) in batches.into_iter().enumerate() {
                if !batch.is_empty() {
                    senders[shard].blocking_send(batch).context("a shard writer stopped")?;
                }
            }
            Ok((read, rejected, parsing))
        })
    };
    // The reader's end drops its senders, so the writers finish what was
    // sent; their rows are committed, guarded and announced before this
    // returns, whether the reader succeeded or not.
    let read = reader.await.context("the reader panicked");
    let mut report = LoadReport::default();
    // Every writer is awaited before anything is reported, so none is left
    // committing batches after the load returns.
    let tallies = futures::future::join_all(writers).await;
    for tally in tallies {
        let tally = tally.context("a shard writer panicked")?;
        report.written += tally.written;
        report.skipped_older += tally.skipped_older;
        report.failed += tally.failed;
        report.failures.extend(tally.failures);
        report.cache_errors += tally.cache_errors;
        report.postgres_time += tally.postgres_time;
        report.cache_time += tally.cache_time;
    }
    let (rows_read, rejected, parse_time) = read?.with_context(|| {
        format!("the load stopped early; {} rows were written before; run it again", report.written)
    })?;
    report.rows_read = rows_read;
    report.rejected = rejected;
    report.parse_time = parse_time;
    report.elapsed = started.elapsed();
    bar.finish_and_clear();
    Ok(report)
}

/// Prints what a load did: counts, speed, and every rejected row by line.
pub fn print_report(report: &LoadReport, file: &Path) {
    for rejected in &report.rejected {
        println!("rejected {}:{}: {}", file.display(), rejected.line, rejected.reason);
    }
    for failure in &report.failures {
        println!("failed batch: {failure}");
    }
    println!("{}", report.summary());
}

impl LoadReport {
    /// Whether the load fully succeeded: every row read was written or
    /// skipped as older, and no cache may still serve an older copy of a
    /// written key. Otherwise an error saying what to do.
    pub fn check(&self) -> Result<()> {
        if self.failed > 0 {
            bail!("{} rows were not written (see above); run the load again", self.failed);
        }
        if self.cache_errors > 0 {
            bail!(
                "{} written keys are at risk: redis could not be updated for them, so older cached copies may be \
                 served until their TTLs end; run the load again once redis answers (it rewrites nothing that is \
                 already stored, and makes the caches safe)",
                self.cache_errors
            );
        }
        Ok(())
    }
}

pub(crate) fn progress_bar(size: u64, enabled: bool) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(
        Some(size),
        if enabled { ProgressDrawTarget::stderr() } else { ProgressDrawTarget::hidden() },
    );
    bar.set_style(
        ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {percent:>3}% {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Reports bytes read to the progress bar.
struct CountingReader {
    inner: File,
    bar: ProgressBar,
}

impl Read for CountingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Parses `input` as the loader does, calling `on_row` with each record's
/// line and its row or the reason it is rejected; an error stops the
/// parse (a header that does not fit the view, an I/O failure). For tools
/// and the fuzz targets.
pub fn parse(
    format: Format,
    input: impl Read,
    view: &FeatureView,
    limits: &Limits,
    on_row: &mut dyn FnMut(u64, Result<(String, Row), String>) -> Result<()>,
) -> Result<()> {
    match format {
        Format::Csv => read_csv(input, view, limits, on_row),
        Format::Jsonl => read_jsonl(input, view, limits, on_row),
    }
}

/// Where each input column goes.
#[derive(Clone, Copy, Debug)]
enum Column {
    Key,
    /// A join key of the view's entity, by its index in `join_keys()`.
    JoinKey(usize),
    Time,
    Feature(usize),
}

/// A record's key: given as `entity_key` (the key's text), or join key by
/// join key (`user_id`, `item_id`), in the entity's join key order.
#[derive(Default)]
struct KeyParts {
    text: Option<String>,
    join_keys: Vec<Option<OwnedKeyValue>>,
}

impl KeyParts {
    fn new(view: &FeatureView) -> KeyParts {
        KeyParts { text: None, join_keys: vec![None; view.entity.join_keys().len()] }
    }

    /// The key's text, checked against the view's entity.
    fn finish(self, view: &FeatureView) -> Result<Option<String>, String> {
        let entity = &view.entity;
        if self.join_keys.iter().all(Option::is_none) {
            return match self.text {
                Some(text) if !entity.is_single_string() && entity.parse_key_text(&text).is_none() => {
                    Err(format!("entity_key is not a key of entity {}", entity.name))
                }
                text => Ok(text),
            };
        }
        if self.text.is_some() {
            return Err("give entity_key or the join keys, not both".into());
        }
        let mut values = Vec::with_capacity(self.join_keys.len());
        for (key, value) in entity.join_keys().iter().zip(&self.join_keys) {
            let value = value.as_ref().ok_or_else(|| format!("join key {} is missing", key.name))?;
            values.push((key.name.as_str(), value.as_key_value()));
        }
        let encoded = entity.encode(values, usize::MAX).map_err(|e| e.to_string())?;
        Ok(Some(entity.key_text(&encoded)))
    }
}

/// The index of join key `name` of the view's entity, if it is one (the
/// implicit entity's `entity_key` is read as the key's text instead).
fn join_key_index(view: &FeatureView, name: &str) -> Option<usize> {
    if view.entity.name == "entity_key" && name == "entity_key" {
        return None;
    }
    view.entity.join_keys().iter().position(|k| k.name == name)
}

fn parse_join_key(cell: &str, ty: KeyType) -> Result<OwnedKeyValue, String> {
    let bad = || format!("{cell:?} is not a valid {ty}");
    Ok(match ty {
        KeyType::Int64 => OwnedKeyValue::Int64(cell.trim().parse().map_err(|_| bad())?),
        KeyType::String => OwnedKeyValue::String(cell.to_owned()),
        KeyType::Bytes => {
            OwnedKeyValue::Bytes(base64::engine::general_purpose::STANDARD.decode(cell).map_err(|_| bad())?)
        }
    })
}

pub(crate) fn json_join_key(value: serde_json::Value, ty: KeyType) -> Result<OwnedKeyValue, String> {
    use serde_json::Value as J;
    match (ty, value) {
        (KeyType::Int64, J::Number(n)) => {
            n.as_i64().map(OwnedKeyValue::Int64).ok_or_else(|| format!("{n} is not an int64"))
        }
        (_, J::String(s)) => parse_join_key(&s, ty),
        (_, other) => Err(format!("{other} is not a valid {ty}")),
    }
}

fn read_csv(
    input: impl Read,
    view: &FeatureView,
    limits: &Limits,
    on_row: &mut dyn FnMut(u64, Parsed) -> Result<()>,
) -> Result<()> {
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(input);
    let headers = reader.headers().context("cannot read the CSV header")?.clone();
    let mut columns = Vec::with_capacity(headers.len());
    for name in headers.iter() {
        let name = name.trim();
        columns.push(match (name, join_key_index(view, name)) {
            (_, Some(i)) => Column::JoinKey(i),
            ("entity_key", None) => Column::Key,
            ("event_time", None) => Column::Time,
            (feature, None) => Column::Feature(view.position(feature).with_context(|| {
                format!("column {feature:?} is neither a feature nor a join key of view {:?}", view.name)
            })?),
        });
    }
    let keyed_by_join_keys = view
        .entity
        .join_keys()
        .iter()
        .all(|k| headers.iter().any(|h| h.trim() == k.name && join_key_index(view, &k.name).is_some()));
    if !keyed_by_join_keys && !headers.iter().any(|h| h.trim() == "entity_key") {
        let keys: Vec<&str> = view.entity.join_keys().iter().map(|k| k.name.as_str()).collect();
        bail!("the CSV header has no entity_key column, nor every join key ({})", keys.join(", "));
    }
    if !headers.iter().any(|h| h.trim() == "event_time") {
        bail!("the CSV header has no event_time column");
    }
    let mut record = csv::StringRecord::new();
    loop {
        match reader.read_record(&mut record) {
            Ok(false) => return Ok(()),
            Ok(true) => {
                let line = record.position().map_or(0, csv::Position::line);
                on_row(line, csv_row(&record, &columns, view, limits))?;
            }
            // A malformed record (invalid UTF-8, say): reject it and go on
            // with the next one.
            Err(error) if !matches!(error.kind(), csv::ErrorKind::Io(_)) => {
                let line = error.position().map_or(0, csv::Position::line);
                on_row(line, Err(error.to_string()))?;
            }
            Err(error) => return Err(error).context("cannot read the CSV file"),
        }
    }
}

fn csv_row(record: &csv::StringRecord, columns: &[Column], view: &FeatureView, limits: &Limits) -> Parsed {
    if record.len() != columns.len() {
        return Err(format!("{} fields, the header has {}", record.len(), columns.len()));
    }
    let mut key = KeyParts::new(view);
    let mut time = None;
    let mut values = vec![Value::Null; view.features.len()];
    for (cell, column) in record.iter().zip(columns) {
        match *column {
            Column::Key => key.text = Some(cell.to_owned()),
            Column::JoinKey(i) => {
                let join_key = &view.entity.join_keys()[i];
                key.join_keys[i] =
                    Some(parse_join_key(cell, join_key.ty).map_err(|e| format!("{}: {e}", join_key.name))?);
            }
            Column::Time => time = Some(parse_time(cell)?),
            Column::Feature(i) => {
                let feature = &view.features[i];
                values[i] = parse_cell(cell, feature.ty).map_err(|e| format!("{}: {e}", feature.name))?;
            }
        }
    }
    finish_row(key.finish(view)?, time, values, limits)
}

fn read_jsonl(
    input: impl Read,
    view: &FeatureView,
    limits: &Limits,
    on_row: &mut dyn FnMut(u64, Parsed) -> Result<()>,
) -> Result<()> {
    let reader = BufReader::with_capacity(1 << 20, input);
    for (i, line) in reader.split(b'\n').enumerate() {
        let line = line.context("cannot read the JSON Lines file")?;
        let number = i as u64 + 1;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        on_row(number, json_row(&line, view, limits))?;
    }
    Ok(())
}

fn json_row(line: &[u8], view: &FeatureView, limits: &Limits) -> Parsed {
    let object: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(line).map_err(|e| format!("not a JSON object: {e}"))?;
    let mut key = KeyParts::new(view);
    let mut time = None;
    let mut values = vec![Value::Null; view.features.len()];
    for (name, value) in object {
        if let Some(i) = join_key_index(view, &name) {
            let join_key = &view.entity.join_keys()[i];
            key.join_keys[i] = Some(json_join_key(value, join_key.ty).map_err(|e| format!("{name}: {e}"))?);
            continue;
        }
        match name.as_str() {
            "entity_key" => match value {
                serde_json::Value::String(s) => key.text = Some(s),
                other => return Err(format!("entity_key: expected a string, got {other}")),
            },
            "event_time" => {
                time = Some(match value {
                    serde_json::Value::String(s) => parse_time(&s)?,
                    serde_json::Value::Number(n) => parse_time(&n.to_string())?,
                    other => return Err(format!("event_time: expected a string or a number, got {other}")),
                })
            }
            feature => {
                let i = view.position(feature).ok_or_else(|| format!("{feature:?} is not a feature of the view"))?;
                let ty = view.features[i].ty;
                values[i] = json_value(value, ty).map_err(|e| format!("{feature}: {e}"))?;
            }
        }
    }
    finish_row(key.finish(view)?, time, values, limits)
}

/// Checks the row as the API would (`limits`: key and value sizes, event
/// times not too far ahead), so every loaded row can be read back and
/// none blocks later writes of its key.
fn finish_row(key: Option<String>, time: Option<EventTime>, values: Vec<Value>, limits: &Limits) -> Parsed {
    let key = key.ok_or("entity_key (or the join keys) is missing")?;
    if key.is_empty() {
        return Err("entity_key is empty".into());
    }
    let max_key = limits.max_key_bytes;
    if key.len() > max_key {
        return Err(format!("entity_key is {} bytes, over the limit of {max_key}", key.len()));
    }
    if key.contains('\0') {
        return Err("entity_key contains a NUL character".into());
    }
    let event_time = time.ok_or("event_time is missing")?;
    if let Err(limit) = strata_proto::check_not_future(event_time, limits) {
        return Err(format!("event_time is more than {limit:?} ahead of the clock (limits.max_future_event_time)"));
    }
    if let Some(len) = values.iter().map(Value::payload_bytes).find(|&len| len > limits.max_value_bytes) {
        return Err(format!(
            "a value is {len} bytes, over the limit of {} (limits.max_value_bytes)",
            limits.max_value_bytes
        ));
    }
    Ok((key, Row { event_time, values }))
}

/// An event time: RFC 3339 (`2026-01-01T00:00:00Z`, any offset), ISO 8601
/// without an offset read as UTC (`2026-01-01T00:00:00`, as pandas writes
/// times), or Unix seconds with an optional fraction (`1767225600.25`).
pub fn parse_time(text: &str) -> Result<EventTime, String> {
    parse_instant(text).map_err(|e| format!("event_time {e}"))
}

/// A point in time written as [`parse_time`] reads it; the error names
/// only the text.
pub(crate) fn parse_instant(text: &str) -> Result<EventTime, String> {
    let text = text.trim();
    let bad = || format!("{} is neither RFC 3339 nor Unix seconds", echo(text));
    let time = if let Ok(t) = chrono::DateTime::parse_from_rfc3339(text) {
        EventTime::from_parts(t.timestamp(), t.timestamp_subsec_nanos() as i32)
    } else if let Ok(naive) = chrono::NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S%.f") {
        let utc = naive.and_utc();
        EventTime::from_parts(utc.timestamp(), utc.timestamp_subsec_nanos() as i32)
    } else if let Ok(seconds) = text.parse::<i64>() {
        EventTime::from_parts(seconds, 0)
    } else if let Ok(seconds) =
        text.parse::<f64>().map_err(drop).and_then(|s| if s.is_finite() { Ok(s) } else { Err(()) })
    {
        let whole = seconds.floor();
        EventTime::from_parts(whole as i64, ((seconds - whole) * 1e9).round().min(999_999_999.0) as i32)
    } else {
        return Err(bad());
    };
    time.ok_or_else(|| format!("{} is out of range (years 1 to 9999)", echo(text)))
}

/// A CSV cell as a value of `ty`; an empty cell is null. Lists are JSON
/// arrays (`[0.5, 1.5]`), bytes are base64, timestamps as [`parse_time`]
/// reads them.
fn parse_cell(cell: &str, ty: FeatureType) -> Result<Value, String> {
    if cell.is_empty() {
        return Ok(Value::Null);
    }
    let bad = || format!("{cell:?} is not a valid {ty}");
    Ok(match ty {
        FeatureType::Int64 => Value::Int64(cell.trim().parse().map_err(|_| bad())?),
        FeatureType::Int32 => Value::Int32(cell.trim().parse().map_err(|_| bad())?),
        FeatureType::Double => Value::Double(cell.trim().parse().map_err(|_| bad())?),
        FeatureType::Float => Value::Float(cell.trim().parse().map_err(|_| bad())?),
        FeatureType::Timestamp => Value::Timestamp(parse_instant(cell)?.0),
        FeatureType::String => {
            if cell.contains('\0') {
                return Err("contains a NUL character".into());
            }
            Value::String(cell.to_owned())
        }
        FeatureType::Bool => match cell.trim().to_ascii_lowercase().as_str() {
            "true" | "t" | "1" => Value::Bool(true),
            "false" | "f" | "0" => Value::Bool(false),
            _ => return Err(bad()),
        },
        FeatureType::Bytes => Value::Bytes(base64::engine::general_purpose::STANDARD.decode(cell).map_err(|_| bad())?),
        FeatureType::FloatList | FeatureType::Int64List => {
            json_value(serde_json::from_str(cell).map_err(|_| bad())?, ty)?
        }
    })
}

/// A JSON value as a value of `ty`: numbers for numbers (a 32-bit float is
/// the nearest to the number), base64 for bytes, arrays for lists, and a
/// timestamp as text [`parse_time`] reads or a number of Unix seconds.
pub(crate) fn json_value(value: serde_json::Value, ty: FeatureType) -> Result<Value, String> {
    use serde_json::Value as J;
    let bad = |v: &J| {
        // JSON text quotes itself; only a long one is cut (and quoted).
        let text = v.to_string();
        let text = if text.len() <= 64 { text } else { echo(&text) };
        format!("{text} is not a valid {ty}")
    };
    Ok(match (ty, value) {
        (_, J::Null) => Value::Null,
        (FeatureType::Int64, J::Number(n)) => Value::Int64(n.as_i64().ok_or_else(|| bad(&J::Number(n.clone())))?),
        (FeatureType::Int32, J::Number(n)) => {
            Value::Int32(n.as_i64().and_then(|n| i32::try_from(n).ok()).ok_or_else(|| bad(&J::Number(n.clone())))?)
        }
        (FeatureType::Double, J::Number(n)) => Value::Double(n.as_f64().ok_or_else(|| bad(&J::Number(n.clone())))?),
        (FeatureType::Float, J::Number(n)) => {
            Value::Float(n.as_f64().map(|f| f as f32).ok_or_else(|| bad(&J::Number(n.clone())))?)
        }
        (FeatureType::Timestamp, J::String(s)) => Value::Timestamp(parse_instant(&s)?.0),
        (FeatureType::Timestamp, J::Number(n)) => Value::Timestamp(parse_instant(&n.to_string())?.0),
        (FeatureType::String, J::String(s)) => {
            if s.contains('\0') {
                return Err("contains a NUL character".into());
            }
            Value::String(s)
        }
        (FeatureType::Bool, J::Bool(b)) => Value::Bool(b),
        (FeatureType::Bytes, J::String(s)) => {
            Value::Bytes(base64::engine::general_purpose::STANDARD.decode(&s).map_err(|_| bad(&J::String(s.clone())))?)
        }
        (FeatureType::FloatList, J::Array(items)) => Value::FloatList(
            items.iter().map(|v| v.as_f64().map(|f| f as f32).ok_or_else(|| bad(v))).collect::<Result<_, _>>()?,
        ),
        (FeatureType::Int64List, J::Array(items)) => {
            Value::Int64List(items.iter().map(|v| v.as_i64().ok_or_else(|| bad(v))).collect::<Result<_, _>>()?)
        }
        (_, other) => return Err(bad(&other)),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use strata_core::{FeatureSpec, FeatureViewSpec, Registry};

    use super::*;

    fn view() -> Arc<FeatureView> {
        let spec = FeatureViewSpec::new(
            "v",
            vec![
                FeatureSpec { name: "n".into(), ty: FeatureType::Int64 },
                FeatureSpec { name: "s".into(), ty: FeatureType::String },
                FeatureSpec { name: "b".into(), ty: FeatureType::Bool },
                FeatureSpec { name: "emb".into(), ty: FeatureType::FloatList },
                FeatureSpec { name: "raw".into(), ty: FeatureType::Bytes },
            ],
        );
        Registry::new(vec![spec]).unwrap().get("v").unwrap().clone()
    }

    fn collect(format: Format, text: &str) -> Result<Vec<(u64, Parsed)>> {
        let mut out = Vec::new();
        let mut on_row = |line, row| {
            out.push((line, row));
            Ok(())
        };
        match format {
            Format::Csv => read_csv(text.as_bytes(), &view(), &Limits::default(), &mut on_row)?,
            Format::Jsonl => read_jsonl(text.as_bytes(), &view(), &Limits::default(), &mut on_row)?,
        }
        Ok(out)
    }

    #[test]
    fn csv_cells_become_typed_values_and_bad_rows_are_rejected_by_line() {
        let text = "entity_key,event_time,n,s,b,emb,raw\n\
                    a,2026-01-01T00:00:00Z,7,\"hi, there\",true,\"[0.5, -1]\",AAH/\n\
                    b,1767225600.5,,,,,\n\
                    c,yesterday,1,x,true,[],\n\
                    d,1,one,x,true,[],\n\
                    e,1,1\n\
                    ,1,1,x,true,[],\n";
        let rows = collect(Format::Csv, text).unwrap();
        let (line, a) = &rows[0];
        let (key, row) = a.as_ref().unwrap();
        assert_eq!((*line, key.as_str(), row.event_time), (2, "a", EventTime(1_767_225_600_000_000)));
        assert_eq!(
            row.values,
            [
                Value::Int64(7),
                Value::String("hi, there".into()),
                Value::Bool(true),
                Value::FloatList(vec![0.5, -1.0]),
                Value::Bytes(vec![0, 1, 255])
            ]
        );
        let (_, row) = rows[1].1.as_ref().unwrap();
        assert_eq!(row.event_time, EventTime(1_767_225_600_500_000), "fractional Unix seconds");
        assert_eq!(row.values, vec![Value::Null; 5], "empty cells are null");
        assert!(parse_time("NaN").is_err() && parse_time("inf").is_err());
        let rejected: Vec<(u64, &str)> =
            rows[2..].iter().map(|(line, r)| (*line, r.as_ref().unwrap_err().as_str())).collect();
        assert_eq!(
            rejected,
            [
                (4, "event_time \"yesterday\" is neither RFC 3339 nor Unix seconds"),
                (5, "n: \"one\" is not a valid int64"),
                (6, "3 fields, the header has 7"),
                (7, "entity_key is empty"),
            ]
        );
    }

    #[test]
    fn int32_float_and_timestamp_values_parse_at_their_width() {
        assert_eq!(parse_cell("-7", FeatureType::Int32), Ok(Value::Int32(-7)));
        assert_eq!(parse_cell("0.1", FeatureType::Float), Ok(Value::Float(0.1)));
        assert_eq!(
            parse_cell("2026-01-01T00:00:00.25Z", FeatureType::Timestamp),
            Ok(Value::Timestamp(1_767_225_600_250_000))
        );
        assert_eq!(
            parse_cell("2026-01-01T00:00:00", FeatureType::Timestamp),
            Ok(Value::Timestamp(1_767_225_600_000_000)),
            "no offset is UTC"
        );
        assert_eq!(parse_cell("-1", FeatureType::Timestamp), Ok(Value::Timestamp(-1_000_000)), "Unix seconds");
        assert_eq!(parse_cell("3000000000", FeatureType::Int32), Err("\"3000000000\" is not a valid int32".into()));
        assert_eq!(json_value(json!(-7), FeatureType::Int32), Ok(Value::Int32(-7)));
        assert_eq!(
            json_value(json!(3_000_000_000_i64), FeatureType::Int32),
            Err("3000000000 is not a valid int32".into())
        );
        assert_eq!(json_value(json!(0.1), FeatureType::Float), Ok(Value::Float(0.1)));
        assert_eq!(
            json_value(json!(1_700_000_000), FeatureType::Timestamp),
            Ok(Value::Timestamp(1_700_000_000_000_000))
        );
        assert_eq!(json_value(json!("1970-01-01T00:00:01Z"), FeatureType::Timestamp), Ok(Value::Timestamp(1_000_000)));
        assert!(json_value(json!(1e300), FeatureType::Timestamp).unwrap_err().contains("out of range"));
        assert!(json_value(json!(true), FeatureType::Timestamp).is_err());
    }

    #[test]
    fn a_csv_column_that_is_not_a_feature_stops_the_load_before_anything_is_written() {
        let err = collect(Format::Csv, "entity_key,event_time,height\n").unwrap_err().to_string();
        assert_eq!(err, "column \"height\" is neither a feature nor a join key of view \"v\"");
        let err = collect(Format::Csv, "entity_key,n\n").unwrap_err().to_string();
        assert_eq!(err, "the CSV header has no event_time column");
    }

    #[test]
    fn json_lines_map_by_name_and_reject_by_line() {
        let text = "{\"entity_key\": \"a\", \"event_time\": \"2026-01-01T01:00:00+01:00\", \"n\": 3, \"emb\": [1.5]}\n\
                    \n\
                    {\"entity_key\": \"b\", \"event_time\": 5, \"n\": \"3\"}\n\
                    not json\n\
                    {\"entity_key\": \"c\", \"event_time\": 5, \"height\": 1}\n";
        let rows = collect(Format::Jsonl, text).unwrap();
        let (key, row) = rows[0].1.as_ref().unwrap();
        assert_eq!((key.as_str(), row.event_time), ("a", EventTime(1_767_225_600_000_000)), "offsets are honoured");
        assert_eq!(row.values[0], Value::Int64(3));
        assert_eq!(row.values[3], Value::FloatList(vec![1.5]));
        let lines: Vec<u64> = rows.iter().map(|(line, _)| *line).collect();
        assert_eq!(lines, [1, 3, 4, 5], "blank lines are skipped, numbering is the file's");
        assert_eq!(rows[1].1.as_ref().unwrap_err(), "n: \"3\" is not a valid int64");
        assert!(rows[2].1.as_ref().unwrap_err().starts_with("not a JSON object"));
        assert_eq!(rows[3].1.as_ref().unwrap_err(), "\"height\" is not a feature of the view");
    }
}
