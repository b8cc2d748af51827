use std::collections::HashMap;

use strata_core::{FeatureSpec, FeatureViewSpec};

use super::*;

fn registry() -> Registry {
    Registry::new(vec![FeatureViewSpec::new(
        "users",
        vec![
            FeatureSpec { name: "age".into(), ty: FeatureType::Int64 },
            FeatureSpec { name: "name".into(), ty: FeatureType::String },
            FeatureSpec { name: "emb".into(), ty: FeatureType::FloatList },
        ],
    )])
    .unwrap()
}

fn get(keys: &[&str], features: &[&str]) -> v1::GetFeaturesRequest {
    v1::GetFeaturesRequest {
        feature_view: "users".into(),
        entity_keys: keys.iter().map(|k| (*k).into()).collect(),
        features: features.iter().map(|f| (*f).into()).collect(),
    }
}

fn int(v: i64) -> v1::Value {
    value_to_wire(&Value::Int64(v))
}

fn write_row(key: &str, seconds: i64, features: Vec<(&str, v1::Value)>) -> v1::WriteRow {
    v1::WriteRow {
        entity_key: key.into(),
        features: features.into_iter().map(|(n, v)| (n.to_owned(), v)).collect::<HashMap<_, _>>(),
        event_time: Some(prost_types::Timestamp { seconds, nanos: 0 }),
        join_keys: Default::default(),
    }
}

fn write(rows: Vec<v1::WriteRow>) -> v1::WriteFeaturesRequest {
    v1::WriteFeaturesRequest { feature_view: "users".into(), rows }
}

#[test]
fn empty_features_means_every_feature_in_declared_order() {
    let read = read_request(get(&["a", "a", "b"], &[]), &registry(), &Limits::default()).unwrap();
    assert_eq!(read.columns, vec![0, 1, 2]);
    assert_eq!(read.keys, vec!["a", "a", "b"], "duplicates are kept, in order");
    let read = read_request(get(&["a"], &["emb", "age"]), &registry(), &Limits::default()).unwrap();
    assert_eq!(read.columns, vec![2, 0]);
}

#[test]
fn bad_reads_name_the_problem() {
    let limits = Limits { max_keys_per_request: 2, max_key_bytes: 4, max_rows_per_write: 2, ..Limits::default() };
    let r = registry();
    let err = |req| read_request(req, &r, &limits).unwrap_err().to_string();
    let mut unknown = get(&["a"], &[]);
    unknown.feature_view = "items".into();
    assert_eq!(err(unknown), "unknown feature_view \"items\" (known: users)");
    assert_eq!(err(get(&["a"], &["height"])), "feature view \"users\" has no feature \"height\"");
    assert_eq!(err(get(&["a"], &["age", "age"])), "features lists \"age\" twice");
    assert_eq!(err(get(&[], &[])), "entity_keys is empty");
    assert_eq!(err(get(&["a", ""], &[])), "entity_keys[1] is empty");
    assert_eq!(err(get(&["abcde"], &[])), "entity_keys[0] is 5 bytes, over the limit of 4");
    assert_eq!(err(get(&["a", "b", "c"], &[])), "3 entity_keys, over the limit of 2 per request");
    assert_eq!(err(get(&["a\0"], &[])), "entity_keys[0] contains a NUL character");
    let status = tonic::Status::from(read_request(get(&[], &[]), &r, &limits).unwrap_err());
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
}

#[test]
fn writes_fill_missing_features_with_null() {
    let w =
        write_request(write(vec![write_row("a", 10, vec![("age", int(3))])]), &registry(), &Limits::default()).unwrap();
    assert_eq!(w.rows[0].1.values, vec![Value::Int64(3), Value::Null, Value::Null]);
    assert_eq!(w.rows[0].1.event_time, EventTime(10_000_000));
}

#[test]
fn a_key_repeated_in_one_write_keeps_its_newest_row() {
    let rows = vec![
        write_row("a", 20, vec![("age", int(2))]),
        write_row("b", 5, vec![]),
        write_row("a", 10, vec![("age", int(1))]),
        write_row("a", 20, vec![("age", int(3))]),
    ];
    let w = write_request(write(rows), &registry(), &Limits::default()).unwrap();
    assert_eq!(w.rows.len(), 2);
    assert_eq!(w.rows[0].0, "a");
    assert_eq!(w.rows[0].1.values[0], Value::Int64(3), "a tie goes to the later row");
    assert_eq!(w.superseded, 2);
    assert_eq!(
        w.requested,
        [(0, false), (1, true), (0, false), (0, true)],
        "each request row points at its key's row, and only the kept one carries its outcome"
    );
}

#[test]
fn deletes_are_validated_and_deduplicated() {
    let r = registry();
    let limits = Limits::default();
    let delete = |keys: &[&str], seconds: Option<i64>| v1::DeleteFeaturesRequest {
        feature_view: "users".into(),
        entity_keys: keys.iter().map(|k| (*k).into()).collect(),
        event_time: seconds.map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
    };
    let d = delete_request(delete(&["a", "b", "a"], Some(7)), &r, &limits).unwrap();
    assert_eq!(
        (d.keys, d.requested, d.at),
        (vec!["a".to_owned(), "b".to_owned()], vec![0, 1, 0], EventTime(7_000_000))
    );
    let err = |request| delete_request(request, &r, &limits).unwrap_err().to_string();
    assert_eq!(err(delete(&["a"], None)), "event_time is required");
    assert_eq!(err(delete(&[], Some(1))), "entity_keys is empty");
    assert_eq!(err(delete(&["a", ""], Some(1))), "entity_keys[1] is empty");
    assert_eq!(err(delete(&["a"], Some(i64::MAX))), "event_time is out of range (years 1 to 9999)");
}

#[test]
fn bad_writes_name_the_problem() {
    let r = registry();
    let limits = Limits::default();
    let err = |rows| write_request(write(rows), &r, &limits).unwrap_err().to_string();
    let name = value_to_wire(&Value::String("x".into()));
    assert_eq!(
        err(vec![write_row("a", 1, vec![("age", name.clone())])]),
        "rows[0].features[\"age\"]: expected int64, got string"
    );
    assert_eq!(
        err(vec![write_row("a", 1, vec![("height", int(1))])]),
        "feature view \"users\" has no feature \"height\""
    );
    assert_eq!(err(vec![write_row("a", 1, vec![]), write_row("", 1, vec![])]), "rows[1].entity_key is empty");
    let mut no_time = write_row("a", 1, vec![]);
    no_time.event_time = None;
    assert_eq!(err(vec![no_time]), "rows[0].event_time is required");
    assert_eq!(err(vec![write_row("a", i64::MAX, vec![])]), "rows[0].event_time is out of range (years 1 to 9999)");
    assert_eq!(err(vec![]), "rows is empty");
    let nul = value_to_wire(&Value::String("a\0b".into()));
    assert_eq!(
        err(vec![write_row("a", 1, vec![("name", nul)])]),
        "rows[0].features[\"name\"] contains a NUL character"
    );
}

#[test]
fn null_is_accepted_for_any_feature_and_an_unset_value_reads_as_null() {
    let rows = vec![write_row("a", 1, vec![("age", v1::Value { kind: None }), ("emb", value_to_wire(&Value::Null))])];
    let w = write_request(write(rows), &registry(), &Limits::default()).unwrap();
    assert_eq!(w.rows[0].1.values, vec![Value::Null; 3]);
}

#[test]
fn values_round_trip_through_the_wire() {
    for v in [
        Value::Null,
        Value::Int64(-1),
        Value::Double(1.5),
        Value::String("s".into()),
        Value::Bool(false),
        Value::Bytes(vec![1, 2]),
        Value::FloatList(vec![0.25]),
        Value::Int64List(vec![7]),
        Value::Int32(i32::MIN),
        Value::Float(0.1),
        Value::Timestamp(-1),
        Value::Timestamp(1_700_000_000_123_456),
    ] {
        assert_eq!(value_from_wire(value_to_wire(&v)), Some(v));
    }
}

#[test]
fn a_timestamp_feature_outside_protobufs_range_is_refused_by_field() {
    let r = Registry::new(vec![FeatureViewSpec::new(
        "users",
        vec![FeatureSpec { name: "seen".into(), ty: FeatureType::Timestamp }],
    )])
    .unwrap();
    let late = prost_types::Timestamp { seconds: i64::MAX, nanos: 0 };
    let late = v1::Value { kind: Some(v1::value::Kind::TimestampValue(late)) };
    let err = write_request(write(vec![write_row("a", 1, vec![("seen", late)])]), &r, &Limits::default()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "rows[0].features[\"seen\"]: timestamp out of range (years 1 to 9999, nanos 0 to 999999999)"
    );
}
