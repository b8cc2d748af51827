//! The `strata.v1.FeatureStore` service: validates each request once, then
//! runs it on the tiers.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;
use std::time::SystemTime;

use strata_core::{EventTime, Registry, Value};
use strata_proto::v1::feature_store_server::FeatureStore;
use strata_proto::{
    InvalidRequest, Limits, event_time_to_wire, read_request, v1, value_to_wire, view_to_wire, write_request,
};
use strata_shard_router::ShardError;
use tonic::{Request, Response, Status};

use crate::tiers::{Served, Source, Tiers};

/// Every way a request can fail, mapped to a gRPC status in one place.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Invalid(#[from] InvalidRequest),
    #[error("{} of {total} rows were not written: {}; {written} rows on other shards were written", not_written, errors.join("; "))]
    WriteFailed { total: usize, written: usize, not_written: usize, errors: Vec<String> },
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        match e {
            ServiceError::Invalid(e) => e.into(),
            e @ ServiceError::WriteFailed { .. } => Status::unavailable(e.to_string()),
        }
    }
}

pub struct FeatureStoreService {
    registry: Arc<Registry>,
    limits: Limits,
    tiers: Tiers,
}

impl FeatureStoreService {
    pub fn new(registry: Arc<Registry>, limits: Limits, tiers: Tiers) -> FeatureStoreService {
        FeatureStoreService { registry, limits, tiers }
    }
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

fn status_of(served: &Served) -> (v1::RowStatus, v1::Source) {
    let source = |s: &Source| match s {
        Source::L1 => v1::Source::L1,
        Source::L2 => v1::Source::L2,
        Source::L3 => v1::Source::L3,
    };
    match served {
        Served::Found { source: s, .. } => (v1::RowStatus::Found, source(s)),
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
        let read = read_request(request.into_inner(), &self.registry, &self.limits).map_err(ServiceError::from)?;
        let view = &read.view;

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
        let served = self.tiers.read(view, &distinct).await;
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
                if let (Served::Found { row, .. }, Some(oldest)) = (answer, oldest_fresh)
                    && row.event_time < oldest
                {
                    status = v1::RowStatus::OutsideMaxAge;
                }
                *tally.entry((source, status)).or_default() += 1;
                let (values, event_time) = match answer {
                    Served::Found { row, .. } => {
                        let values = read.columns.iter().map(|&c| value_to_wire(&row.values[c])).collect();
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
        for ((source, status), n) in tally {
            metrics::counter!(
                "strata_rows_served_total",
                "view" => view.name.clone(),
                "source" => source_label(source),
                "status" => status_label(status)
            )
            .increment(n);
        }

        Ok(Response::new(v1::GetFeaturesResponse {
            features: read.columns.iter().map(|&c| view.features[c].name.clone()).collect(),
            rows,
        }))
    }

    async fn write_features(
        &self,
        request: Request<v1::WriteFeaturesRequest>,
    ) -> Result<Response<v1::WriteFeaturesResponse>, Status> {
        let write = write_request(request.into_inner(), &self.registry, &self.limits).map_err(ServiceError::from)?;
        let outcome = self.tiers.write(&write.view, &write.rows).await;
        let view = write.view.name.clone();
        metrics::counter!("strata_rows_written_total", "view" => view.clone()).increment(outcome.written.len() as u64);
        let skipped = outcome.skipped_older.len() + write.superseded;
        metrics::counter!("strata_rows_skipped_older_total", "view" => view).increment(skipped as u64);
        if !outcome.failed.is_empty() {
            let errors: Vec<String> = outcome.failed.iter().map(|(e, _): &(ShardError, _)| e.to_string()).collect();
            let not_written = outcome.failed.iter().map(|(_, keys)| keys.len()).sum();
            return Err(ServiceError::WriteFailed {
                total: write.rows.len(),
                written: outcome.written.len(),
                not_written,
                errors,
            }
            .into());
        }
        Ok(Response::new(v1::WriteFeaturesResponse {
            rows_written: outcome.written.len() as u64,
            rows_skipped_older: skipped as u64,
        }))
    }

    async fn list_feature_views(
        &self,
        _: Request<v1::ListFeatureViewsRequest>,
    ) -> Result<Response<v1::ListFeatureViewsResponse>, Status> {
        Ok(Response::new(v1::ListFeatureViewsResponse {
            views: self.registry.views().iter().map(|v| view_to_wire(v)).collect(),
        }))
    }
}
