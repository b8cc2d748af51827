//! The load generator: runs a call (a GetFeatures RPC, or a raw Redis or
//! PostgreSQL batch for the baselines) closed-loop (N callers, each sending
//! its next call when the last one answered) or open-loop (calls sent at a
//! fixed rate whatever happens; latency counted from each call's intended
//! send time, so queueing cannot hide behind a slow caller: no coordinated
//! omission). Latencies go into an HDR histogram in microseconds.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use hdrhistogram::Histogram;
use serde_json::json;
use tokio::time::Instant;

/// What one call did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Keys asked for.
    pub keys: u64,
    /// Rows answered by L1, L2, L3, and by none (unavailable, not found).
    pub sources: [u64; 4],
}

/// Why a call did not succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// RESOURCE_EXHAUSTED: refused by the server's admission.
    Shed,
    Error,
}

#[derive(Clone, Copy, Debug)]
pub enum Mode {
    Closed {
        callers: usize,
    },
    /// `rate` calls a second; at most `max_outstanding` in flight, beyond
    /// which calls are counted as dropped by the generator (never hidden).
    Open {
        rate: f64,
        max_outstanding: usize,
    },
}

impl Mode {
    pub fn label(&self) -> String {
        match self {
            Mode::Closed { callers } => format!("closed, {callers} in flight"),
            Mode::Open { rate, .. } => format!("open, {rate:.0}/s"),
        }
    }
}

/// The figures of one run.
#[derive(Clone)]
pub struct Report {
    pub name: String,
    pub mode: String,
    pub seconds: f64,
    /// Successful calls.
    pub calls: u64,
    pub keys: u64,
    pub errors: u64,
    pub shed: u64,
    /// Open loop only: calls not sent because too many were outstanding.
    pub dropped: u64,
    pub sources: [u64; 4],
    pub latency_us: Histogram<u64>,
    /// Open loop only: how late the generator sent each call, after its
    /// intended time (its own lateness on a busy machine; the latency
    /// above includes it, as it should).
    pub send_lag_us: Histogram<u64>,
}

impl Report {
    pub fn calls_per_sec(&self) -> f64 {
        self.calls as f64 / self.seconds
    }

    pub fn keys_per_sec(&self) -> f64 {
        self.keys as f64 / self.seconds
    }

    /// A percentile in milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    /// A percentile of the generator's send lag in milliseconds (open
    /// loop; 0 in closed loop).
    pub fn lag_ms(&self, quantile: f64) -> f64 {
        self.send_lag_us.value_at_quantile(quantile) as f64 / 1000.0
    }

    pub fn json(&self) -> serde_json::Value {
        json!({
            "name": self.name, "mode": self.mode, "seconds": self.seconds,
            "calls": self.calls, "calls_per_sec": self.calls_per_sec(), "keys_per_sec": self.keys_per_sec(),
            "errors": self.errors, "shed": self.shed, "dropped": self.dropped,
            "rows_by_source": { "l1": self.sources[0], "l2": self.sources[1], "l3": self.sources[2], "none": self.sources[3] },
            "p50_ms": self.ms(0.5), "p99_ms": self.ms(0.99), "p999_ms": self.ms(0.999), "max_ms": self.latency_us.max() as f64 / 1000.0,
            "send_lag_p50_ms": self.lag_ms(0.5), "send_lag_p99_ms": self.lag_ms(0.99), "send_lag_p999_ms": self.lag_ms(0.999),
        })
    }
}

/// 1 µs to 60 s, 3 significant figures.
fn micros() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid bounds")
}

/// Shared tallies of a run.
struct Tally {
    recording: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    keys: AtomicU64,
    errors: AtomicU64,
    shed: AtomicU64,
    sources: [AtomicU64; 4],
    latency_us: std::sync::Mutex<Histogram<u64>>,
    send_lag_us: std::sync::Mutex<Histogram<u64>>,
}

impl Tally {
    fn new() -> Tally {
        Tally {
            recording: false.into(),
            calls: AtomicU64::new(0),
            keys: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            shed: AtomicU64::new(0),
            sources: Default::default(),
            // 1 µs to 60 s, 3 significant figures.
            latency_us: std::sync::Mutex::new(micros()),
            send_lag_us: std::sync::Mutex::new(micros()),
        }
    }

    fn record_lag(&self, lag: Duration) {
        if self.recording.load(Ordering::Relaxed) {
            let us = u64::try_from(lag.as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000);
            let _ = self.send_lag_us.lock().expect("histogram").record(us);
        }
    }

    fn record(&self, took: Duration, result: Result<Sample, Failure>) {
        if !self.recording.load(Ordering::Relaxed) {
            return;
        }
        match result {
            Ok(sample) => {
                self.calls.fetch_add(1, Ordering::Relaxed);
                self.keys.fetch_add(sample.keys, Ordering::Relaxed);
                for (total, n) in self.sources.iter().zip(sample.sources) {
                    total.fetch_add(n, Ordering::Relaxed);
                }
                let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000);
                let _ = self.latency_us.lock().expect("histogram").record(us);
            }
            Err(Failure::Shed) => {
                self.shed.fetch_add(1, Ordering::Relaxed);
            }
            Err(Failure::Error) => {
                self.errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Runs `call` (given the call's number) in `mode` for `warmup` (not
/// counted) then `duration`, showing progress on stderr.
pub async fn run<F, Fut>(name: &str, mode: Mode, warmup: Duration, duration: Duration, call: F) -> Report
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Sample, Failure>> + Send + 'static,
{
    let call = Arc::new(call);
    let tally = Arc::new(Tally::new());
    let begin = Instant::now();
    let measure_from = begin + warmup;
    let end = measure_from + duration;
    let progress = indicatif::ProgressBar::new_spinner();
    progress.set_style(indicatif::ProgressStyle::with_template("{spinner} {msg}").expect("template"));
    progress.enable_steady_tick(Duration::from_millis(200));
    let ticker = {
        let (tally, progress, name) = (tally.clone(), progress.clone(), name.to_owned());
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_millis(500));
            loop {
                every.tick().await;
                let now = Instant::now();
                let phase = if now < measure_from { "warming up" } else { "measuring" };
                let secs = now.saturating_duration_since(measure_from).as_secs_f64().max(1e-9);
                let calls = tally.calls.load(Ordering::Relaxed);
                progress.set_message(format!("{name}: {phase}, {calls} calls, {:.0}/s", calls as f64 / secs));
            }
        })
    };
    let recorder = {
        let tally = tally.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until(measure_from).await;
            tally.recording.store(true, Ordering::Relaxed);
            tokio::time::sleep_until(end).await;
            tally.recording.store(false, Ordering::Relaxed);
        })
    };
    let mut dropped = 0;
    match mode {
        Mode::Closed { callers } => {
            let next = Arc::new(AtomicU64::new(0));
            let workers: Vec<_> = (0..callers)
                .map(|_| {
                    let (call, tally, next) = (call.clone(), tally.clone(), next.clone());
                    tokio::spawn(async move {
                        while Instant::now() < end {
                            let n = next.fetch_add(1, Ordering::Relaxed);
                            let started = Instant::now();
                            let result = call(n).await;
                            tally.record(started.elapsed(), result);
                        }
                    })
                })
                .collect();
            for worker in workers {
                let _ = worker.await;
            }
        }
        Mode::Open { rate, max_outstanding } => {
            // Paced by an OS thread, not tokio's timer: its 1 ms ticks would
            // send calls up to a millisecond late, in bursts, and count that
            // lateness as latency. A thread's sleep wakes within tens of µs.
            let outstanding = Arc::new(AtomicU64::new(0));
            let period = Duration::from_secs_f64(1.0 / rate);
            let runtime = tokio::runtime::Handle::current();
            // Tracks the calls without holding on to finished ones.
            let calls = tokio_util::task::TaskTracker::new();
            let (call, tally, sent) = (call.clone(), tally.clone(), calls.clone());
            let pacer = std::thread::spawn(move || {
                let (mut dropped, mut n) = (0u64, 0u64);
                loop {
                    let intended = begin + period.mul_f64(n as f64);
                    if intended >= end {
                        break;
                    }
                    let now = Instant::now();
                    if intended > now {
                        std::thread::sleep(intended - now);
                    }
                    n += 1;
                    if outstanding.load(Ordering::Relaxed) >= max_outstanding as u64 {
                        if intended >= measure_from {
                            dropped += 1;
                        }
                        continue;
                    }
                    outstanding.fetch_add(1, Ordering::Relaxed);
                    tally.record_lag(intended.elapsed());
                    let (call, tally, outstanding) = (call.clone(), tally.clone(), outstanding.clone());
                    sent.spawn_on(
                        async move {
                            let result = call(n).await;
                            // From when it should have been sent, not when it was.
                            tally.record(intended.elapsed(), result);
                            outstanding.fetch_sub(1, Ordering::Relaxed);
                        },
                        &runtime,
                    );
                }
                dropped
            });
            dropped =
                tokio::task::spawn_blocking(move || pacer.join().expect("pacer thread")).await.expect("pacer thread");
            calls.close();
            calls.wait().await;
        }
    }
    let _ = recorder.await;
    ticker.abort();
    progress.finish_and_clear();
    let latency_us = tally.latency_us.lock().expect("histogram").clone();
    let send_lag_us = tally.send_lag_us.lock().expect("histogram").clone();
    Report {
        name: name.to_owned(),
        mode: mode.label(),
        seconds: duration.as_secs_f64(),
        calls: tally.calls.load(Ordering::Relaxed),
        keys: tally.keys.load(Ordering::Relaxed),
        errors: tally.errors.load(Ordering::Relaxed),
        shed: tally.shed.load(Ordering::Relaxed),
        dropped,
        sources: std::array::from_fn(|i| tally.sources[i].load(Ordering::Relaxed)),
        latency_us,
        send_lag_us,
    }
}
