//! GetFeatureVectors: many views in one call. Each view's distinct keys are
//! read as one batch through the engine (so with single flight, leases,
//! deadlines and degradation exactly as GetFeatures has them), all views at
//! once; the answer is assembled per entity row, or, when the request asks
//! for groups, per view with each distinct key's values once.

use std::collections::HashMap;
use std::time::SystemTime;

use strata_core::{EventTime, FeatureView, Value};
use strata_engine::{Served, Tiers};
use strata_proto::{VectorsRead, ViewRead, v1, value_to_wire};

use crate::service::{ServiceError, count_served, status_of};

/// Status, event time, source and framing of one value in a vector.
const VALUE_OVERHEAD: usize = 16;
/// A grouped answer's row index (a varint) and its share of framing.
const ROW_INDEX_BYTES: usize = 6;

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

    let now = SystemTime::now();
    let mut answer = v1::GetFeatureVectorsResponse::default();
    if read.grouped {
        answer.groups =
            read.views.iter().zip(&served).map(|(view_read, served)| group(view_read, served, now)).collect();
    } else {
        answer.vectors = rows(&read, &served, now);
    }
    answer.feature_names = read.names;
    Ok(answer)
}

/// One key's answer as a view's vectors carry it.
struct KeyAnswer<'a> {
    served: &'a Served,
    row_status: v1::RowStatus,
    source: v1::Source,
    /// Found, but older than the view's max_age.
    too_old: bool,
}

impl KeyAnswer<'_> {
    /// The value, status and event time of the view's `column`.
    fn cell(&self, column: usize) -> (v1::Value, v1::FeatureStatus, i64) {
        match self.served {
            Served::Found { row, stale, .. } => {
                let value = row.values.get(column).unwrap_or(&Value::Null);
                let status = if self.too_old {
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
        }
    }
}

/// Each distinct key's answer, and the view's served rows counted per
/// entity row (the unit GetFeatures counts in).
fn key_answers<'a>(view_read: &ViewRead, served: &'a [Served], now: SystemTime) -> Vec<KeyAnswer<'a>> {
    let view: &FeatureView = &view_read.view;
    let oldest_fresh = view.max_age.map(|age| EventTime::from_system_time(now - age));
    let answers: Vec<KeyAnswer<'a>> = served
        .iter()
        .map(|served| {
            let (mut row_status, source) = status_of(served);
            let too_old =
                matches!((served, oldest_fresh), (Served::Found { row, .. }, Some(oldest)) if row.event_time < oldest);
            if too_old {
                row_status = v1::RowStatus::OutsideMaxAge;
            }
            KeyAnswer { served, row_status, source, too_old }
        })
        .collect();
    let mut tally: HashMap<(v1::Source, v1::RowStatus), u64> = HashMap::new();
    for &slot in &view_read.slot_of {
        *tally.entry((answers[slot].source, answers[slot].row_status)).or_default() += 1;
    }
    count_served(&view.name, tally);
    answers
}

/// One vector per entity row, every view's features at their positions.
fn rows(read: &VectorsRead, served: &[Vec<Served>], now: SystemTime) -> Vec<v1::FeatureVector> {
    let width = read.names.len();
    let mut vectors: Vec<v1::FeatureVector> = (0..read.rows)
        .map(|_| v1::FeatureVector {
            values: vec![v1::Value::default(); width],
            statuses: vec![0; width],
            event_time_micros: vec![0; width],
            sources: vec![0; width],
        })
        .collect();
    for (view_read, served) in read.views.iter().zip(served) {
        let answers = key_answers(view_read, served, now);
        for (vector, &slot) in vectors.iter_mut().zip(&view_read.slot_of) {
            let answer = &answers[slot];
            for &(column, at) in &view_read.outputs {
                let (value, status, time) = answer.cell(column);
                vector.values[at] = value;
                vector.statuses[at] = status as i32;
                vector.event_time_micros[at] = time;
                vector.sources[at] = answer.source as i32;
            }
        }
    }
    vectors
}

/// One view's group: each distinct key's features and each row's index.
fn group(view_read: &ViewRead, served: &[Served], now: SystemTime) -> v1::FeatureGroup {
    let answers = key_answers(view_read, served, now);
    let width = view_read.outputs.len();
    let keys = answers
        .iter()
        .map(|answer| {
            let mut key = v1::KeyFeatures {
                values: Vec::with_capacity(width),
                statuses: Vec::with_capacity(width),
                event_time_micros: 0,
                source: answer.source as i32,
            };
            for &(column, _) in &view_read.outputs {
                let (value, status, time) = answer.cell(column);
                key.values.push(value);
                key.statuses.push(status as i32);
                key.event_time_micros = time;
            }
            key
        })
        .collect();
    v1::FeatureGroup {
        view: view_read.view.name.clone(),
        features: view_read.outputs.iter().map(|&(_, at)| at as u32).collect(),
        keys,
        row_keys: view_read.slot_of.iter().map(|&slot| slot as u32).collect(),
    }
}

/// An upper bound of the encoded size of the answer: every requested value
/// of every row (or, grouped, of every distinct key, plus each row's index)
/// with its status, time and source, and the names.
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
        bytes += if read.grouped {
            per_key.iter().sum::<usize>() + view_read.slot_of.len() * ROW_INDEX_BYTES + view_read.view.name.len() + 16
        } else {
            view_read.slot_of.iter().map(|&slot| per_key[slot]).sum::<usize>()
        };
    }
    bytes
}
