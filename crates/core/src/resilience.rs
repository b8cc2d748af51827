//! Failure handling shared by the tiers: a circuit breaker per dependency
//! (the Redis Cluster, each PostgreSQL shard) and the backoff of retried
//! reads.
//!
//! Time is tokio's clock, so tests drive the breaker with paused time.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// When a breaker opens and how long it stays open.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BreakerConfig {
    /// Consecutive failed calls that open the breaker.
    pub failures: u32,
    /// How long an open breaker refuses calls before letting one probe
    /// through (half-open).
    pub open_for: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failures: 5, open_for: Duration::from_secs(1) }
    }
}

/// A breaker's state, as exported in `strata_breaker_state` (the number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls go through; failures are counted.
    Closed = 0,
    /// One probe call is allowed; its outcome closes or reopens.
    HalfOpen = 1,
    /// Calls are refused at once until `open_for` has passed.
    Open = 2,
}

impl BreakerState {
    pub fn label(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::HalfOpen => "half_open",
            BreakerState::Open => "open",
        }
    }

    fn from_u8(n: u8) -> BreakerState {
        match n {
            0 => BreakerState::Closed,
            1 => BreakerState::HalfOpen,
            _ => BreakerState::Open,
        }
    }
}

/// A circuit breaker around one dependency. Cheap to clone; clones share
/// the state.
///
/// Closed: calls go through, and `failures` consecutive failures open it.
/// Open: calls are refused without touching the dependency, so a dead shard
/// costs nothing per request; after `open_for` the next call becomes the
/// one probe (half-open). The probe's success closes the breaker; its
/// failure opens it for another `open_for`. A call dropped without an
/// outcome (its request went away) frees the probe slot and changes
/// nothing.
#[derive(Clone)]
pub struct Breaker {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    config: BreakerConfig,
    /// The state for lock-free reads on the request path.
    state: AtomicU8,
    machine: Mutex<Machine>,
}

struct Machine {
    consecutive_failures: u32,
    opened_at: Instant,
    probing: bool,
}

impl std::fmt::Debug for Breaker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Breaker").field("name", &self.inner.name).field("state", &self.state()).finish()
    }
}

/// Permission for one call through a [`Breaker`]. Report its outcome with
/// [`Call::succeeded`] or [`Call::failed`]; dropping it reports nothing.
#[must_use = "report the call's outcome"]
pub struct Call {
    breaker: Breaker,
    probe: bool,
    done: bool,
}

impl Breaker {
    /// A closed breaker for the dependency `name` (the `dependency` label
    /// of its metrics).
    pub fn new(name: impl Into<String>, config: BreakerConfig) -> Breaker {
        let breaker = Breaker {
            inner: Arc::new(Inner {
                name: name.into(),
                config,
                state: AtomicU8::new(BreakerState::Closed as u8),
                machine: Mutex::new(Machine { consecutive_failures: 0, opened_at: Instant::now(), probing: false }),
            }),
        };
        breaker.export(BreakerState::Closed);
        breaker
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn state(&self) -> BreakerState {
        BreakerState::from_u8(self.inner.state.load(Ordering::Acquire))
    }

    /// Whether calls go through normally (not open, not probing).
    pub fn is_closed(&self) -> bool {
        self.state() == BreakerState::Closed
    }

    /// Asks to make a call: `None` while the breaker is open (or half-open
    /// with its probe in flight).
    pub fn call(&self) -> Option<Call> {
        if self.is_closed() {
            return Some(Call { breaker: self.clone(), probe: false, done: false });
        }
        let mut machine = self.lock();
        match self.state() {
            BreakerState::Closed => Some(Call { breaker: self.clone(), probe: false, done: false }),
            BreakerState::Open if machine.opened_at.elapsed() >= self.inner.config.open_for => {
                machine.probing = true;
                self.set(BreakerState::HalfOpen);
                Some(Call { breaker: self.clone(), probe: true, done: false })
            }
            BreakerState::HalfOpen if !machine.probing => {
                machine.probing = true;
                Some(Call { breaker: self.clone(), probe: true, done: false })
            }
            BreakerState::Open | BreakerState::HalfOpen => None,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Machine> {
        // The state machine has no invariant a panic could break halfway.
        self.inner.machine.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn set(&self, state: BreakerState) {
        let previous = BreakerState::from_u8(self.inner.state.swap(state as u8, Ordering::AcqRel));
        if previous != state {
            match state {
                BreakerState::Open => tracing::warn!(dependency = %self.inner.name, "circuit breaker opened"),
                BreakerState::Closed => tracing::info!(dependency = %self.inner.name, "circuit breaker closed"),
                BreakerState::HalfOpen => {
                    tracing::debug!(dependency = %self.inner.name, "circuit breaker half-open: probing")
                }
            }
            metrics::counter!(
                "strata_breaker_transitions_total",
                "dependency" => self.inner.name.clone(),
                "to" => state.label()
            )
            .increment(1);
            self.export(state);
        }
    }

    fn export(&self, state: BreakerState) {
        metrics::gauge!("strata_breaker_state", "dependency" => self.inner.name.clone()).set(f64::from(state as u8));
    }

    fn record(&self, probe: bool, ok: bool) {
        let mut machine = self.lock();
        if probe {
            machine.probing = false;
        }
        if ok {
            machine.consecutive_failures = 0;
            // A success of a call let through before the breaker opened
            // says nothing about now; only the probe closes it.
            if probe || self.state() == BreakerState::Closed {
                self.set(BreakerState::Closed);
            }
            return;
        }
        machine.consecutive_failures = machine.consecutive_failures.saturating_add(1);
        let state = self.state();
        if probe || (state == BreakerState::Closed && machine.consecutive_failures >= self.inner.config.failures) {
            machine.opened_at = Instant::now();
            self.set(BreakerState::Open);
        }
    }
}

impl Call {
    pub fn succeeded(mut self) {
        self.done = true;
        self.breaker.record(self.probe, true);
    }

    pub fn failed(mut self) {
        self.done = true;
        self.breaker.record(self.probe, false);
    }
}

impl Drop for Call {
    fn drop(&mut self) {
        if !self.done && self.probe {
            self.breaker.lock().probing = false;
        }
    }
}

/// How a call made through [`Breaker::run`] ended.
#[derive(Debug)]
pub enum Guarded<T, E> {
    /// Not made: the breaker is open.
    Refused,
    /// Cut at its deadline.
    TimedOut,
    /// Made, with this result.
    Done(Result<T, E>),
}

impl Breaker {
    /// Runs `op` through the breaker, cut at `deadline` (`None`: never),
    /// and records what its outcome says about the dependency: a success
    /// or an error for which `is_outage` is false (the dependency answered)
    /// closes the count; an outage error, or a timeout after at least
    /// [`TIMEOUT_FLOOR`], counts as a failure; a timeout sooner than that
    /// says more about the caller's budget and counts for nothing.
    pub async fn run<T, E: std::fmt::Display>(
        &self,
        deadline: Option<Instant>,
        op: impl std::future::Future<Output = Result<T, E>>,
        is_outage: impl FnOnce(&E) -> bool,
    ) -> Guarded<T, E> {
        let Some(call) = self.call() else { return Guarded::Refused };
        let started = Instant::now();
        let result = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, op).await {
                Ok(result) => result,
                Err(_) => {
                    // Judged by the budget the caller gave, not by the time
                    // that passed: on a starved machine a call with no budget
                    // at all can take 50 ms to be polled, and a flood of such
                    // calls must not take a healthy dependency offline.
                    if deadline.saturating_duration_since(started) >= TIMEOUT_FLOOR {
                        tracing::debug!(dependency = %self.inner.name, waited = ?started.elapsed(), "timed out; counted against the breaker");
                        call.failed();
                    }
                    return Guarded::TimedOut;
                }
            },
            None => op.await,
        };
        match &result {
            Err(error) if is_outage(error) => {
                tracing::debug!(dependency = %self.inner.name, %error, "counted against the breaker");
                call.failed();
            }
            _ => call.succeeded(),
        }
        Guarded::Done(result)
    }
}

/// How a read is retried: up to `attempts` tries in all, waiting a random
/// time between 0 and `base * 2^n` (at most `cap`) before retry `n + 1`
/// ("full jitter"), and never past the request's deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { attempts: 3, base: Duration::from_millis(5), cap: Duration::from_millis(100) }
    }
}

impl RetryPolicy {
    /// The wait before retry number `retry` (0 for the first retry), for a
    /// uniform sample `u` in [0, 1).
    pub fn backoff(&self, retry: u32, u: f64) -> Duration {
        let ceiling = self.base.saturating_mul(2u32.saturating_pow(retry.min(31))).min(self.cap);
        ceiling.mul_f64(u.clamp(0.0, 1.0))
    }
}

/// A call cut short by its caller's deadline after less than this says
/// more about the caller's budget than about the dependency, and does not
/// count against its breaker.
pub const TIMEOUT_FLOOR: Duration = Duration::from_millis(50);

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn breaker() -> Breaker {
        Breaker::new("test", BreakerConfig { failures: 3, open_for: Duration::from_secs(1) })
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_consecutive_failures_and_refuses_calls_while_open() {
        let b = breaker();
        b.call().unwrap().failed();
        b.call().unwrap().failed();
        // A success in between starts the count again.
        b.call().unwrap().succeeded();
        b.call().unwrap().failed();
        b.call().unwrap().failed();
        assert_eq!(b.state(), BreakerState::Closed);
        b.call().unwrap().failed();
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.call().is_none());
        tokio::time::advance(Duration::from_millis(999)).await;
        assert!(b.call().is_none(), "still open before open_for has passed");
    }

    #[tokio::test(start_paused = true)]
    async fn lets_one_probe_through_after_open_for_and_closes_on_its_success() {
        let b = breaker();
        for _ in 0..3 {
            b.call().unwrap().failed();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        let probe = b.call().expect("the probe");
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.call().is_none(), "one probe at a time");
        probe.succeeded();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.call().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_opens_it_again_for_a_full_period() {
        let b = breaker();
        for _ in 0..3 {
            b.call().unwrap().failed();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        b.call().unwrap().failed();
        assert_eq!(b.state(), BreakerState::Open);
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.call().is_none());
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(b.call().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_probe_frees_the_slot_for_the_next() {
        let b = breaker();
        for _ in 0..3 {
            b.call().unwrap().failed();
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        drop(b.call().expect("the probe"));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        b.call().expect("a new probe").succeeded();
        assert!(b.is_closed());
    }

    #[tokio::test(start_paused = true)]
    async fn late_successes_of_calls_from_before_it_opened_do_not_close_it() {
        let b = breaker();
        let slow = b.call().unwrap();
        for _ in 0..3 {
            b.call().unwrap().failed();
        }
        slow.succeeded();
        assert_eq!(b.state(), BreakerState::Open);
    }

    #[tokio::test(start_paused = true)]
    async fn run_counts_outages_and_long_timeouts_but_not_answers_or_short_deadlines() {
        let b = breaker();
        let answered: Result<(), String> = Err("bad request".into());
        for _ in 0..5 {
            assert!(matches!(b.run(None, async { answered.clone() }, |_| false).await, Guarded::Done(Err(_))));
        }
        assert!(b.is_closed(), "an error that is not an outage is an answer");
        let hang = || std::future::pending::<Result<(), String>>();
        for _ in 0..5 {
            let short = Instant::now() + Duration::from_millis(10);
            assert!(matches!(b.run(Some(short), hang(), |_| true).await, Guarded::TimedOut));
        }
        assert!(b.is_closed(), "deadlines under the floor say nothing about the dependency");
        for _ in 0..3 {
            let long = Instant::now() + Duration::from_millis(100);
            assert!(matches!(b.run(Some(long), hang(), |_| true).await, Guarded::TimedOut));
        }
        assert_eq!(b.state(), BreakerState::Open);
        assert!(matches!(b.run(None, async { Ok::<(), String>(()) }, |_| true).await, Guarded::Refused));
    }

    proptest! {
        #[test]
        fn backoff_stays_under_its_cap_and_grows_no_faster_than_doubling(
            base_ms in 0u64..10_000, cap_ms in 0u64..100_000, retry in 0u32..200, u in 0.0f64..1.0
        ) {
            let policy = RetryPolicy { attempts: 3, base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms) };
            let wait = policy.backoff(retry, u);
            prop_assert!(wait <= policy.cap);
            let doubled = policy.base.saturating_mul(2u32.saturating_pow(retry.min(31)));
            prop_assert!(wait <= doubled);
        }
    }
}
