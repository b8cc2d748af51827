//! Streaming replicas of a shard, and which of them may answer a read.
//!
//! Every replica's replay lag is checked in the background
//! ([`crate::ShardRouter::watch_replicas`]). A read of a shard goes to a
//! replica whose last check, recent enough, found it within
//! [`ReplicaOptions::max_lag`] (when replicas are preferred), else to the
//! primary; when the primary cannot answer, to any replica that can, and
//! then its rows are marked behind unless its lag is known to be within the
//! bound. Writes never go to a replica.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::{Shard, ShardError};

/// How replicas are used, shared by every shard.
#[derive(Clone, Debug)]
pub struct ReplicaOptions {
    /// The most replay lag a replica may have to answer reads as if it were
    /// the primary.
    pub max_lag: Duration,
    /// Whether reads go to a replica within `max_lag` before the primary
    /// (taking load off it); otherwise replicas answer only when the
    /// primary cannot.
    pub prefer: bool,
}

impl Default for ReplicaOptions {
    fn default() -> Self {
        ReplicaOptions { max_lag: Duration::from_secs(1), prefer: true }
    }
}

impl ReplicaOptions {
    /// How often each replica's lag is checked: twice per `max_lag`, within
    /// 100 ms and 1 s.
    pub fn check_every(&self) -> Duration {
        (self.max_lag / 2).clamp(Duration::from_millis(100), Duration::from_secs(1))
    }

    /// How old a check may be and still count: a replica that stopped
    /// answering its checks is not trusted on the strength of an old one.
    fn trust_for(&self) -> Duration {
        3 * self.check_every()
    }
}

/// The lag check, on a replica: whether it is still in recovery (a
/// promoted replica is a primary itself), whether its WAL receiver is
/// streaming from a primary, and how far its replay is behind: 0 when it
/// has replayed all it received, else the time since the last transaction
/// it replayed committed on the primary. Not streaming means the lag is
/// unknown: the primary may have committed anything since.
pub(crate) const LAG: &str = "SELECT pg_is_in_recovery(), \
    COALESCE((SELECT status = 'streaming' FROM pg_stat_wal_receiver LIMIT 1), false), \
    CASE WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0::float8 \
         ELSE EXTRACT(EPOCH FROM now() - pg_last_xact_replay_timestamp())::float8 END";

/// What [`LAG`] answered, as a lag: `None` when unknown.
pub(crate) fn lag_of(in_recovery: bool, streaming: bool, behind_secs: Option<f64>) -> Option<Duration> {
    if !in_recovery {
        return Some(Duration::ZERO);
    }
    if !streaming {
        return None;
    }
    behind_secs.map(|secs| Duration::try_from_secs_f64(secs.max(0.0)).unwrap_or(Duration::MAX))
}

/// One replica of a shard: its own pool and breaker, and its last check.
pub(crate) struct Replica {
    pub(crate) node: Shard,
    last: Mutex<Option<Check>>,
}

#[derive(Clone, Copy)]
struct Check {
    at: Instant,
    /// `None`: unknown (not streaming, or the check failed).
    lag: Option<Duration>,
}

impl Replica {
    pub(crate) fn new(node: Shard) -> Replica {
        Replica { node, last: Mutex::new(None) }
    }

    /// Whether its last check, recent enough, found it within the bound
    /// (or promoted).
    pub(crate) fn fresh(&self, options: &ReplicaOptions) -> bool {
        let last = *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        last.is_some_and(|c| c.at.elapsed() <= options.trust_for() && c.lag.is_some_and(|lag| lag <= options.max_lag))
    }

    /// Asks the replica for its lag within `timeout`, through its breaker,
    /// and keeps the answer (unknown if it did not give one).
    pub(crate) async fn check(&self, timeout: Duration) -> Result<Option<Duration>, ShardError> {
        let node = &self.node;
        let started = Instant::now();
        let ask = async {
            let client = node.client().await?;
            let row = client.query_one(LAG, &[]).await.map_err(|e| node.query_error(e))?;
            Ok(lag_of(row.get(0), row.get(1), row.get(2)))
        };
        let result = node.guarded(Some(tokio::time::Instant::now() + timeout), ask).await;
        let lag = result.as_ref().ok().copied().flatten();
        *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(Check { at: started, lag });
        metrics::gauge!("strata_replica_lag_seconds", "shard" => node.label.clone())
            .set(lag.map_or(f64::NAN, |lag| lag.as_secs_f64()));
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_promoted_replica_has_no_lag_and_one_not_streaming_an_unknown_one() {
        assert_eq!(lag_of(false, false, None), Some(Duration::ZERO));
        assert_eq!(lag_of(true, false, Some(0.0)), None, "a replica cut off from its primary may be any way behind");
        assert_eq!(lag_of(true, true, Some(0.25)), Some(Duration::from_millis(250)));
        assert_eq!(lag_of(true, true, Some(-0.5)), Some(Duration::ZERO), "clock skew is not negative lag");
        assert_eq!(lag_of(true, true, None), None);
    }

    #[test]
    fn checks_run_twice_per_bound_and_old_ones_are_not_trusted() {
        let options = ReplicaOptions { max_lag: Duration::from_secs(1), prefer: true };
        assert_eq!(options.check_every(), Duration::from_millis(500));
        assert_eq!(
            ReplicaOptions { max_lag: Duration::from_millis(10), prefer: true }.check_every(),
            Duration::from_millis(100)
        );
        assert_eq!(
            ReplicaOptions { max_lag: Duration::from_secs(60), prefer: true }.check_every(),
            Duration::from_secs(1)
        );
        assert_eq!(options.trust_for(), Duration::from_millis(1500));
    }
}
