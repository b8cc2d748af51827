//! GetFeatureVectors: many views in one call. Each view's distinct keys are
//! read as one batch through the engine (so with single flight, leases,
//! deadlines and degradation exactly as GetFeatures has them), all views at
//! once; the answer is assembled per entity row.

use std::collections::HashMap;
use std::time::SystemTime;

use strata_core::{EventTime, Value};
use strata_engine::{Served, Tiers};
use strata_proto::{VectorsRead, v1, value_to_wire};

use crate::service::{ServiceError, count_served, status_of};

/// Status, event time, source and framing of one value in a vector.
const VALUE_OVERHEAD: usize = 16;

/// Reads every view of `read` and builds the answer, refusing it before it
/// is built if it would exceed `max_response_bytes`.
pub(crate) async fn feature_vectors(
    tiers: &Tiers,
    read: VectorsRead,
    max_response_bytes: usize,
    deadline: tokio::time::Instant,
) -> Result<v1::GetFeatureVectorsResponse, ServiceError> {
    let reads = read.views.iter().map(|view_read| {
        let keys: Vec<&str> = view_read.keys.iter().map(String::as_str).collect();
        async move {
            let served = tiers.read(&view_read.view, &keys, deadline).await;
            tiers.sample_reads(&view_read.view, &keys);
            served
        }
    });
    let served: Vec<Vec<Served>> = futures::future::join_all(reads).await;

    let bytes = answer_bytes(&read, &served);
    if bytes > max_response_bytes {
        return Err(ServiceError::AnswerTooLarge { bytes, limit: max_response_bytes });
    }

    let width = read.names.len();
    let mut vectors: Vec<v1::FeatureVector> = (0..read.rows)
        .map(|_| v1::FeatureVector {
            values: vec![v1::Value::default(); width],
            statuses: vec![0; width],
            event_time_micros: vec![0; width],
            sources: vec![0; width],
        })
        .collect();
    let now = SystemTime::now();
    for (view_read, served) in read.views.iter().zip(&served) {
        let view = &view_read.view;
        let oldest_fresh = view.max_age.map(|age| EventTime::from_system_time(now - age));
        let mut tally: HashMap<(v1::Source, v1::RowStatus), u64> = HashMap::new();
        for (row, &slot) in view_read.slot_of.iter().enumerate() {
            let answer = &served[slot];
            let (mut row_status, source) = status_of(answer);
            let too_old =
                matches!((answer, oldest_fresh), (Served::Found { row, .. }, Some(oldest)) if row.event_time < oldest);
            if too_old {
                row_status = v1::RowStatus::OutsideMaxAge;
            }
            *tally.entry((source, row_status)).or_default() += 1;
            let vector = &mut vectors[row];
            for &(column, at) in &view_read.outputs {
                let (value, status, time) = match answer {
                    Served::Found { row, stale, .. } => {
                        let value = row.values.get(column).unwrap_or(&Value::Null);
                        let status = if too_old {
                            v1::FeatureStatus::ValueOutsideMaxAge
                        } else if *stale {
                            v1::FeatureStatus::StaleValue
                        } else if *value == Value::Null {
                            v1::FeatureStatus::NullValue
                        } else {
                            v1::FeatureStatus::Present
                        };
                        (value_to_wire(value), status, row.event_time.0)
                    }
                    Served::NotFound { .. } => (value_to_wire(&Value::Null), v1::FeatureStatus::EntityNotFound, 0),
                    Served::Unavailable => (value_to_wire(&Value::Null), v1::FeatureStatus::ValueUnavailable, 0),
                };
                vector.values[at] = value;
                vector.statuses[at] = status as i32;
                vector.event_time_micros[at] = time;
                vector.sources[at] = source as i32;
            }
        }
        count_served(&view.name, tally);
    }
    Ok(v1::GetFeatureVectorsResponse { feature_names: read.names, vectors })
}

/// An upper bound of the encoded size of the answer: every requested value
/// of every row with its status, time and source, and the names.
fn answer_bytes(read: &VectorsRead, served: &[Vec<Served>]) -> usize {
    let names: usize = read.names.iter().map(|n| n.len() + 8).sum();
    let mut bytes = names;
    for (view_read, served) in read.views.iter().zip(served) {
        let per_key: Vec<usize> = served
            .iter()
            .map(|answer| {
                let payload: usize = match answer {
                    Served::Found { row, .. } => {
                        view_read.outputs.iter().map(|&(c, _)| row.values.get(c).map_or(0, Value::payload_bytes)).sum()
                    }
                    Served::NotFound { .. } | Served::Unavailable => 0,
                };
                payload + view_read.outputs.len() * (Value::MAX_WIRE_OVERHEAD + VALUE_OVERHEAD)
            })
            .collect();
        bytes += view_read.slot_of.iter().map(|&slot| per_key[slot]).sum::<usize>();
    }
    bytes
}
