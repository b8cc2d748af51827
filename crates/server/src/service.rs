//! The `strata.v1.FeatureStore` service: validates each request once, then
//! runs it on the tiers.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use strata_core::{EventTime, Registry, Value};
use strata_proto::v1::feature_store_server::FeatureStore;
use strata_proto::{
    FeatureWrite, InvalidRequest, Limits, delete_request, entity_to_wire, event_time_to_wire, read_request,
    service_to_wire, v1, value_to_wire, vectors_request, view_to_wire, write_request,
};
use strata_shard_router::UpsertOutcome;
use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::auth::{Access, Denied, Operation};
use crate::config::Deadlines;
use strata_engine::{Served, Source, Tiers};

/// Every way a request can fail, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    /// Every shard of the write failed. `retry_may_help`: each failure was
    /// an outage, a timeout or a conflict, so the same request may succeed
    /// later (UNAVAILABLE); otherwise it would fail again (INTERNAL).
    #[error(
        "the answer would be about {bytes} bytes, over the limit of {limit} (limits.max_response_bytes); \
         ask for fewer keys or features per call"
    )]
    AnswerTooLarge { bytes: usize, limit: usize },
    #[error("none of the {total} rows was written: {}", errors.join("; "))]
    WriteFailed { total: usize, errors: Vec<String>, retry_may_help: bool },
    #[error(transparent)]
    Denied(#[from] Denied),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        match e {
            ServiceError::Invalid(e) => e.into(),
            e @ ServiceError::AnswerTooLarge { .. } => Status::resource_exhausted(e.to_string()),
            e @ ServiceError::WriteFailed { retry_may_help: true, .. } => Status::unavailable(e.to_string()),
            e @ ServiceError::WriteFailed { retry_may_help: false, .. } => Status::internal(e.to_string()),
            ServiceError::Denied(e) => Status::permission_denied(e.to_string()),
        }
    }
}

/// The FeatureStore calls. Admission (drain, rate limits, the in-flight
/// cap) happens before a call reaches it, in `AdmissionLayer`.
pub struct FeatureStoreService {
    registry: Arc<Registry>,
    limits: Limits,
    max_response_bytes: usize,
    deadlines: Deadlines,
    tiers: Tiers,
}

impl FeatureStoreService {
    pub fn new(
        registry: Arc<Registry>,
        limits: Limits,
        max_response_bytes: usize,
        deadlines: Deadlines,
        tiers: Tiers,
    ) -> FeatureStoreService {
        FeatureStoreService { registry, limits, max_response_bytes, deadlines, tiers }
    }

    /// When the tiers must have answered a request: its budget (the
    /// client's `grpc-timeout`, else the default, at most the maximum)
    /// from now, less a reserve for building and sending the answer.
    pub(crate) fn deadline_of<T>(&self, request: &Request<T>) -> Instant {
        let now = Instant::now();
        let asked = request.metadata().get("grpc-timeout").and_then(|v| v.to_str().ok()).and_then(parse_grpc_timeout);
        let budget = asked.unwrap_or(self.deadlines.default).min(self.deadlines.max);
        now + budget - reserve(budget)
    }

    /// The deadline of a call that came without a budget of its own (the
    /// Feast HTTP API's): the default budget from now, less the reserve.
    pub(crate) fn default_deadline(&self) -> Instant {
        let budget = self.deadlines.default;
        Instant::now() + budget - reserve(budget)
    }

    /// The longest deadline a client may ask for, from now: for writes
    /// from a client that sends no budget and would rather wait than fail
    /// (a Feast materialization job).
    pub(crate) fn longest_deadline(&self) -> Instant {
        let budget = self.deadlines.max;
        Instant::now() + budget - reserve(budget)
    }

    /// Rows per write call at most (`limits.max_rows_per_write`).
    pub(crate) fn max_rows_per_write(&self) -> usize {
        self.limits.max_rows_per_write
    }

    /// GetFeatureVectors, for every front end.
    pub(crate) async fn vectors(
        &self,
        request: v1::GetFeatureVectorsRequest,
        access: &Access,
        deadline: Instant,
    ) -> Result<v1::GetFeatureVectorsResponse, ServiceError> {
        let read = vectors_request(request, &self.registry, &self.limits)?;
        for view in &read.views {
            access.check(Operation::Read, &view.view.name)?;
        }
        crate::vectors::feature_vectors(&self.tiers, read, self.max_response_bytes, deadline).await
    }

    /// Validates a write without running it, so a front end can check every
    /// part of a large write before it stores any.
    pub(crate) fn check_write(
        &self,
        request: v1::WriteFeaturesRequest,
        access: &Access,
    ) -> Result<FeatureWrite, ServiceError> {
        let write = write_request(request, &self.registry, &self.limits)?;
        access.check(Operation::Write, &write.view.name)?;
        Ok(write)
    }

    /// Runs a validated write: per-row results, or an error if no row could
    /// be stored.
    pub(crate) async fn write(
        &self,
        write: FeatureWrite,
        deadline: Instant,
    ) -> Result<v1::WriteFeaturesResponse, ServiceError> {
        let outcome = self.tiers.write(&write.view, &write.rows, deadline).await;
        let requested = write.requested.iter().map(|&(at, kept)| (write.rows[at].0.as_str(), kept));
        write_response(&write.view.name, "write", &outcome, requested)
    }
}

/// The part of a budget kept for answering after the tiers (and for the
/// time the request spent before reaching the service): a tenth, at most
/// 50 ms.
fn reserve(budget: Duration) -> Duration {
    (budget / 10).min(Duration::from_millis(50))
}

/// Parses a `grpc-timeout` header value: up to 8 digits and a unit (H, M,
/// S, m, u, n), per the gRPC over HTTP/2 spec. `None` if malformed.
fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    let (digits, unit) = value.split_at_checked(value.len().checked_sub(1)?)?;
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// Metric label values of a row status.
fn status_label(status: v1::RowStatus) -> &'static str {
    match status {
        v1::RowStatus::Found => "found",
        v1::RowStatus::NotFound => "not_found",
        v1::RowStatus::Stale => "stale",
        v1::RowStatus::Unavailable => "unavailable",
        v1::RowStatus::OutsideMaxAge => "outside_max_age",
        v1::RowStatus::Unspecified => "unspecified",
    }
}

fn source_label(source: v1::Source) -> &'static str {
    match source {
        v1::Source::L1 => "l1",
        v1::Source::L2 => "l2",
        v1::Source::L3 => "l3",
        v1::Source::Unspecified => "none",
    }
}

/// Counts answered rows of a view by the tier that answered and status.
pub(crate) fn count_served(view: &str, tally: HashMap<(v1::Source, v1::RowStatus), u64>) {
    for ((source, status), n) in tally {
        metrics::counter!(
            "strata_rows_served_total",
            "view" => view.to_owned(),
            "source" => source_label(source),
            "status" => status_label(status)
        )
        .increment(n);
    }
}

pub(crate) fn status_of(served: &Served) -> (v1::RowStatus, v1::Source) {
    let source = |s: &Source| match s {
        Source::L1 => v1::Source::L1,
        Source::L2 => v1::Source::L2,
        Source::L3 => v1::Source::L3,
    };
    match served {
        Served::Found { source: s, stale: true, .. } => (v1::RowStatus::Stale, source(s)),
        Served::Found { source: s, stale: false, .. } => (v1::RowStatus::Found, source(s)),
        Served::NotFound { source: s } => (v1::RowStatus::NotFound, source(s)),
        Served::Unavailable => (v1::RowStatus::Unavailable, v1::Source::Unspecified),
    }
}

#[tonic::async_trait]
impl FeatureStore for FeatureStoreService {
    async fn get_features(
        &self,
        request: Request<v1::GetFeaturesRequest>,
    ) -> Result<Response<v1::GetFeaturesResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let access = Access::of(request.extensions());
        let read = read_request(request.into_inner(), &self.registry, &self.limits).map_err(ServiceError::from)?;
        let view = &read.view;
        access.check(Operation::Read, &view.name).map_err(ServiceError::from)?;

        // Each distinct key is looked up once; duplicates share its answer.
        let mut distinct: Vec<&str> = Vec::with_capacity(read.keys.len());
        let mut slot_of: Vec<usize> = Vec::with_capacity(read.keys.len());
        let mut seen: HashMap<&str, usize> = HashMap::with_capacity(read.keys.len());
        for key in &read.keys {
            let slot = match seen.entry(key.as_str()) {
                Entry::Occupied(e) => *e.get(),
                Entry::Vacant(e) => {
                    distinct.push(key);
                    *e.insert(distinct.len() - 1)
                }
            };
            slot_of.push(slot);
        }
        let served = self.tiers.read(view, &distinct, deadline).await;
        self.tiers.sample_reads(view, &distinct);
        // Measured before anything of the answer is built: a read of one
        // large value a thousand times must not make the server build a
        // gigabyte the client would refuse anyway.
        let bytes = answer_bytes(&read.keys, &slot_of, &served, &read.columns);
        if bytes > self.max_response_bytes {
            return Err(ServiceError::AnswerTooLarge { bytes, limit: self.max_response_bytes }.into());
        }
        // Values older than this are marked OUTSIDE_MAX_AGE.
        let oldest_fresh = view.max_age.map(|age| EventTime::from_system_time(SystemTime::now() - age));

        let nulls: Vec<v1::Value> = read.columns.iter().map(|_| value_to_wire(&Value::Null)).collect();
        let mut tally: HashMap<(v1::Source, v1::RowStatus), u64> = HashMap::new();
        let rows = read
            .keys
            .iter()
            .zip(slot_of)
            .map(|(key, slot)| {
                let answer = &served[slot];
                let (mut status, source) = status_of(answer);
                // Too old to use outweighs stale: a client that checks ages
                // must see it.
                if let (Served::Found { row, .. }, Some(oldest)) = (answer, oldest_fresh)
                    && row.event_time < oldest
                {
                    status = v1::RowStatus::OutsideMaxAge;
                }
                *tally.entry((source, status)).or_default() += 1;
                let (values, event_time) = match answer {
                    Served::Found { row, .. } => {
                        // Rows from every tier were checked against the view;
                        // a missing value would still answer null, not panic.
                        let values = read
                            .columns
                            .iter()
                            .map(|&c| value_to_wire(row.values.get(c).unwrap_or(&Value::Null)))
                            .collect();
                        (values, Some(event_time_to_wire(row.event_time)))
                    }
                    Served::NotFound { .. } | Served::Unavailable => (nulls.clone(), None),
                };
                v1::FeatureRow {
                    entity_key: key.clone(),
                    values,
                    status: status as i32,
                    event_time,
                    source: source as i32,
                }
            })
            .collect();
        count_served(&view.name, tally);

        Ok(Response::new(v1::GetFeaturesResponse {
            features: read.columns.iter().map(|&c| view.features[c].name.clone()).collect(),
            rows,
        }))
    }

    async fn write_features(
        &self,
        request: Request<v1::WriteFeaturesRequest>,
    ) -> Result<Response<v1::WriteFeaturesResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let access = Access::of(request.extensions());
        let write = self.check_write(request.into_inner(), &access)?;
        Ok(Response::new(self.write(write, deadline).await?))
    }

    async fn delete_features(
        &self,
        request: Request<v1::DeleteFeaturesRequest>,
    ) -> Result<Response<v1::WriteFeaturesResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let access = Access::of(request.extensions());
        let delete = delete_request(request.into_inner(), &self.registry, &self.limits).map_err(ServiceError::from)?;
        access.check(Operation::Write, &delete.view.name).map_err(ServiceError::from)?;
        let outcome = self.tiers.delete(&delete.view, &delete.keys, delete.at, deadline).await;
        let requested = delete.requested.iter().map(|&at| (delete.keys[at].as_str(), true));
        Ok(Response::new(write_response(&delete.view.name, "delete", &outcome, requested)?))
    }

    /// The views the caller may read (all of them without authentication).
    async fn list_feature_views(
        &self,
        request: Request<v1::ListFeatureViewsRequest>,
    ) -> Result<Response<v1::ListFeatureViewsResponse>, Status> {
        let access = Access::of(request.extensions());
        Ok(Response::new(v1::ListFeatureViewsResponse {
            views: self
                .registry
                .views()
                .iter()
                .filter(|v| access.may(Operation::Read, &v.name))
                .map(|v| view_to_wire(v))
                .collect(),
            entities: self.registry.entities().iter().map(|e| entity_to_wire(e)).collect(),
            feature_services: self.registry.services().iter().map(|s| service_to_wire(s)).collect(),
        }))
    }

    async fn get_feature_vectors(
        &self,
        request: Request<v1::GetFeatureVectorsRequest>,
    ) -> Result<Response<v1::GetFeatureVectorsResponse>, Status> {
        let deadline = self.deadline_of(&request);
        let access = Access::of(request.extensions());
        Ok(Response::new(self.vectors(request.into_inner(), &access, deadline).await?))
    }
}

/// An upper bound of the encoded size of a GetFeatures answer: each row's
/// key, the requested values of what was served for it, and the framing.
fn answer_bytes(keys: &[String], slot_of: &[usize], served: &[Served], columns: &[usize]) -> usize {
    /// Status, source, event time and field framing of a row.
    const ROW_OVERHEAD: usize = 48;
    let row_values: Vec<usize> = served
        .iter()
        .map(|answer| match answer {
            Served::Found { row, .. } => columns
                .iter()
                .map(|&c| row.values.get(c).map_or(0, Value::payload_bytes) + Value::MAX_WIRE_OVERHEAD)
                .sum(),
            Served::NotFound { .. } | Served::Unavailable => columns.len() * Value::MAX_WIRE_OVERHEAD,
        })
        .collect();
    keys.iter().zip(slot_of).map(|(key, &slot)| key.len() + ROW_OVERHEAD + row_values[slot]).sum()
}

/// The per-row answer to a write or delete, in request order. `requested`
/// gives each request row's key, and false where the row was superseded by
/// a newer row of the same key in the request. Fails only if no row could
/// be written because every shard involved failed.
fn write_response<'a>(
    view: &str,
    op: &'static str,
    outcome: &UpsertOutcome,
    requested: impl Iterator<Item = (&'a str, bool)>,
) -> Result<v1::WriteFeaturesResponse, ServiceError> {
    let mut by_key: HashMap<&str, (v1::WriteOutcome, String)> = HashMap::new();
    for key in &outcome.written {
        by_key.insert(key, (v1::WriteOutcome::Written, String::new()));
    }
    for key in &outcome.skipped_older {
        by_key.insert(key, (v1::WriteOutcome::SkippedOlder, String::new()));
    }
    for (error, keys) in &outcome.failed {
        tracing::warn!(view, op, keys = keys.len(), error = %error.detail(), "rows not written");
        let message = error.client_message();
        for key in keys {
            by_key.insert(key, (v1::WriteOutcome::Failed, message.clone()));
        }
    }
    let mut response = v1::WriteFeaturesResponse::default();
    for (key, kept) in requested {
        let (outcome, error) = match by_key.get(key) {
            Some(result) if kept => result.clone(),
            Some(_) => (v1::WriteOutcome::SkippedOlder, String::new()),
            // Every key was handed to a shard, so this cannot happen; if it
            // did, claiming success would be the one wrong answer.
            None => (v1::WriteOutcome::Failed, "no result for this key".into()),
        };
        match outcome {
            v1::WriteOutcome::Written => response.rows_written += 1,
            v1::WriteOutcome::SkippedOlder => response.rows_skipped_older += 1,
            v1::WriteOutcome::Failed | v1::WriteOutcome::Unspecified => response.rows_failed += 1,
        }
        response.results.push(v1::RowResult { entity_key: key.to_owned(), outcome: outcome as i32, error });
    }
    let labels = [("view", view.to_owned()), ("op", op.to_owned())];
    if response.rows_written > 0 {
        metrics::counter!("strata_rows_written_total", &labels).increment(response.rows_written);
    }
    if response.rows_skipped_older > 0 {
        metrics::counter!("strata_rows_skipped_older_total", &labels).increment(response.rows_skipped_older);
    }
    if response.rows_failed > 0 {
        metrics::counter!("strata_rows_failed_total", &labels).increment(response.rows_failed);
    }
    if response.rows_failed > 0 && response.rows_written == 0 && response.rows_skipped_older == 0 {
        return Err(ServiceError::WriteFailed {
            total: response.results.len(),
            errors: outcome.failed.iter().map(|(e, _)| e.client_message()).collect(),
            retry_may_help: outcome.failed.iter().all(|(e, _)| e.retry_may_help()),
        });
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use strata_shard_router::ShardError;

    use super::*;

    fn outcome(written: &[&str], skipped: &[&str], failed: &[&str]) -> UpsertOutcome {
        let owned = |keys: &[&str]| keys.iter().map(|k| (*k).to_owned()).collect::<Vec<_>>();
        UpsertOutcome {
            written: owned(written),
            skipped_older: owned(skipped),
            failed: if failed.is_empty() { Vec::new() } else { vec![(ShardError::NoShards, owned(failed))] },
        }
    }

    fn outcomes(response: &v1::WriteFeaturesResponse) -> Vec<(&str, v1::WriteOutcome, &str)> {
        response
            .results
            .iter()
            .map(|r| {
                let outcome = v1::WriteOutcome::try_from(r.outcome).unwrap_or(v1::WriteOutcome::Unspecified);
                (r.entity_key.as_str(), outcome, r.error.as_str())
            })
            .collect()
    }

    #[test]
    fn grpc_timeouts_parse_in_every_unit_and_malformed_ones_are_ignored() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_grpc_timeout("3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout("250u"), Some(Duration::from_micros(250)));
        assert_eq!(parse_grpc_timeout("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "100", "100x", "123456789m", "-1m", "1.5S", "é"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_reserve_for_answering_is_a_tenth_of_the_budget_at_most_50_ms() {
        assert_eq!(reserve(Duration::from_millis(50)), Duration::from_millis(5));
        assert_eq!(reserve(Duration::from_secs(1)), Duration::from_millis(50));
    }

    #[test]
    fn every_request_row_gets_its_own_result_in_request_order() {
        use v1::WriteOutcome::{Failed, SkippedOlder, Written};
        let done = outcome(&["a"], &["b"], &["c"]);
        // "a" twice: the first row was superseded by the second.
        let requested = [("a", false), ("b", true), ("c", true), ("a", true)];
        let response = write_response("v", "write", &done, requested.into_iter()).unwrap();
        assert_eq!(
            outcomes(&response),
            [
                ("a", SkippedOlder, ""),
                ("b", SkippedOlder, ""),
                ("c", Failed, "no shards are configured"),
                ("a", Written, "")
            ]
        );
        assert_eq!((response.rows_written, response.rows_skipped_older, response.rows_failed), (1, 2, 1));
    }

    #[test]
    fn a_write_of_which_nothing_could_be_stored_fails_as_unavailable_only_if_retrying_may_help() {
        // A misconfiguration fails again: not UNAVAILABLE.
        let done = outcome(&[], &[], &["a", "b"]);
        let error = write_response("v", "write", &done, [("a", true), ("b", true)].into_iter()).unwrap_err();
        assert_eq!(Status::from(error).code(), tonic::Code::Internal);
        let timed_out = UpsertOutcome {
            failed: vec![(ShardError::Timeout { shard: "shard-0".into() }, vec!["a".into()])],
            ..UpsertOutcome::default()
        };
        let error = write_response("v", "write", &timed_out, [("a", true)].into_iter()).unwrap_err();
        let status = Status::from(error);
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(status.message().contains("retrying is safe"), "{}", status.message());
        // A key the shards never answered for is never reported as written.
        let response = write_response("v", "write", &outcome(&["a"], &[], &[]), [("a", true), ("z", true)].into_iter());
        assert_eq!(response.unwrap().rows_failed, 1);
    }
}
