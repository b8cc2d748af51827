//! SQL text and the mapping between feature values and PostgreSQL types.
//!
//! Each view is a table `strata.<view>` with `entity_key text PRIMARY KEY`,
//! `event_time timestamptz`, `updated_at timestamptz`, `deleted boolean` and
//! one typed, nullable column per feature, so the data stays readable with
//! plain SQL. A view whose entity is not one string join key has a typed
//! column per join key too (`user_id bigint`, `item_id text`), after
//! `entity_key` (which holds the key's text, see [`strata_core::Entity::key_text`]).
//! A deleted row stays as a tombstone (`deleted`, features null,
//! the deletion's event time), so that an older write cannot bring it back.

use std::fmt::Write as _;
use std::time::SystemTime;

use strata_core::{EventTime, FeatureType, FeatureView, JoinKey, KeyType, OwnedKeyValue, Row, Value};
use tokio_postgres::types::{ToSql, Type};

/// PostgreSQL allows 65,535 bind parameters per statement.
const MAX_PARAMS: usize = 60_000;
/// Rows per INSERT statement: large enough to amortise round trips.
pub(crate) const MAX_ROWS_PER_STATEMENT: usize = 1_000;

pub(crate) fn table(view: &FeatureView) -> String {
    format!("strata.\"{}\"", view.name)
}

/// The column type of a feature, as `format_type` names it (the schema
/// check compares the two).
pub(crate) fn column_type(ty: FeatureType) -> &'static str {
    match ty {
        FeatureType::Int64 => "bigint",
        FeatureType::Double => "double precision",
        FeatureType::String => "text",
        FeatureType::Bool => "boolean",
        FeatureType::Bytes => "bytea",
        FeatureType::FloatList => "real[]",
        FeatureType::Int64List => "bigint[]",
        FeatureType::Int32 => "integer",
        FeatureType::Float => "real",
        FeatureType::Timestamp => "timestamp with time zone",
    }
}

/// The column type of a join key.
pub(crate) fn key_column_type(ty: KeyType) -> &'static str {
    match ty {
        KeyType::Int64 => "bigint",
        KeyType::String => "text",
        KeyType::Bytes => "bytea",
    }
}

/// The PostgreSQL type of a join key's column, for binary COPY.
pub(crate) fn key_pg_type(ty: KeyType) -> Type {
    match ty {
        KeyType::Int64 => Type::INT8,
        KeyType::String => Type::TEXT,
        KeyType::Bytes => Type::BYTEA,
    }
}

/// The join keys that have columns of their own: none for an entity of one
/// string join key (`entity_key` is that string).
pub(crate) fn key_columns(view: &FeatureView) -> &[JoinKey] {
    if view.entity.is_single_string() { &[] } else { view.entity.join_keys() }
}

/// `, "user_id", "item_id"`: the join key columns, after `entity_key`.
fn key_column_list(view: &FeatureView) -> String {
    let mut cols = String::new();
    for k in key_columns(view) {
        let _ = write!(cols, ", \"{}\"", k.name);
    }
    cols
}

/// The join key values of each key's text, for the join key columns (empty
/// where the view has none). A key that is not one of the entity's (which
/// the front ends refuse first) gets nulls.
pub(crate) fn key_values<'a>(view: &FeatureView, keys: impl Iterator<Item = &'a String>) -> Vec<Vec<OwnedKeyValue>> {
    if key_columns(view).is_empty() {
        return Vec::new();
    }
    keys.map(|key| view.entity.parse_key_text(key).unwrap_or_default()).collect()
}

static NULL_KEY_INT64: Option<i64> = None;
static NULL_KEY_TEXT: Option<String> = None;
static NULL_KEY_BYTES: Option<Vec<u8>> = None;

/// The bind parameters of one key's join key columns.
pub(crate) fn key_params<'a>(
    view: &FeatureView,
    values: Option<&'a Vec<OwnedKeyValue>>,
) -> Vec<&'a (dyn ToSql + Sync)> {
    key_columns(view)
        .iter()
        .enumerate()
        .map(|(i, k)| -> &'a (dyn ToSql + Sync) {
            match (values.and_then(|v| v.get(i)), k.ty) {
                (Some(OwnedKeyValue::Int64(n)), KeyType::Int64) => n,
                (Some(OwnedKeyValue::String(s)), KeyType::String) => s,
                (Some(OwnedKeyValue::Bytes(b)), KeyType::Bytes) => b,
                (_, KeyType::Int64) => &NULL_KEY_INT64,
                (_, KeyType::String) => &NULL_KEY_TEXT,
                (_, KeyType::Bytes) => &NULL_KEY_BYTES,
            }
        })
        .collect()
}

fn feature_columns(view: &FeatureView) -> String {
    let mut cols = String::new();
    for f in &view.features {
        let _ = write!(cols, ", \"{}\"", f.name);
    }
    cols
}

pub(crate) fn select(view: &FeatureView) -> String {
    format!(
        "SELECT entity_key, event_time, deleted{} FROM {} WHERE entity_key = ANY($1)",
        feature_columns(view),
        table(view)
    )
}

/// The PostgreSQL type of a feature's column, for binary COPY.
pub(crate) fn pg_type(ty: FeatureType) -> Type {
    match ty {
        FeatureType::Int64 => Type::INT8,
        FeatureType::Double => Type::FLOAT8,
        FeatureType::String => Type::TEXT,
        FeatureType::Bool => Type::BOOL,
        FeatureType::Bytes => Type::BYTEA,
        FeatureType::FloatList => Type::FLOAT4_ARRAY,
        FeatureType::Int64List => Type::INT8_ARRAY,
        FeatureType::Int32 => Type::INT4,
        FeatureType::Float => Type::FLOAT4,
        FeatureType::Timestamp => Type::TIMESTAMPTZ,
    }
}

/// The SET list and guard of every upsert: a newer event time wins, and a
/// write revives a tombstone.
fn on_conflict(view: &FeatureView) -> String {
    let mut sql = String::from(
        " ON CONFLICT (entity_key) DO UPDATE SET event_time = EXCLUDED.event_time, updated_at = now(), deleted = false",
    );
    for f in &view.features {
        let _ = write!(sql, ", \"{0}\" = EXCLUDED.\"{0}\"", f.name);
    }
    sql.push_str(&guard(view));
    sql
}

/// Applies a row over the stored one when its event time is newer, or
/// equal with the same content (a retry, reported as written). Equal event
/// times with different content keep the stored row: one event time stands
/// for one content, so every cache copy of that version agrees with
/// PostgreSQL, whatever order writes and fills reach Redis in.
fn guard(view: &FeatureView) -> String {
    let mut stored = String::from("t.deleted");
    let mut new = String::from("EXCLUDED.deleted");
    for f in &view.features {
        let _ = write!(stored, ", t.\"{}\"", f.name);
        let _ = write!(new, ", EXCLUDED.\"{}\"", f.name);
    }
    format!(
        " WHERE t.event_time < EXCLUDED.event_time \
         OR (t.event_time = EXCLUDED.event_time AND ({stored}) IS NOT DISTINCT FROM ({new}))"
    )
}

/// The temporary table a bulk load copies a batch into.
pub(crate) const STAGING: &str = "strata_load_batch";

/// The staging table has the view's columns, and the order rows were copied
/// in, so that of two rows of one key with the same event time the later
/// one in the input wins, as in a WriteFeatures request.
pub(crate) fn create_staging(view: &FeatureView) -> String {
    format!(
        "CREATE TEMP TABLE {STAGING} (LIKE {} INCLUDING DEFAULTS, strata_ord bigint GENERATED ALWAYS AS IDENTITY) \
         ON COMMIT DROP",
        table(view)
    )
}

pub(crate) fn copy_into_staging(view: &FeatureView) -> String {
    format!(
        "COPY {STAGING} (entity_key{}, event_time{}) FROM STDIN BINARY",
        key_column_list(view),
        feature_columns(view)
    )
}

/// Moves a copied batch into the view's table: of several rows of one key
/// the newest is taken, and it replaces the stored row only if not older.
/// Rows are inserted (and their row locks taken) in byte order of the key
/// (`COLLATE "C"`), the order every write and delete takes them in, so a
/// load and concurrent writes of the same keys cannot deadlock. Returns the
/// keys applied with their event times.
pub(crate) fn merge_staging(view: &FeatureView) -> String {
    let cols = feature_columns(view);
    let keys = key_column_list(view);
    format!(
        "INSERT INTO {table} AS t (entity_key{keys}, event_time{cols}) \
         SELECT DISTINCT ON (entity_key COLLATE \"C\") entity_key{keys}, event_time{cols} FROM {STAGING} \
         ORDER BY entity_key COLLATE \"C\", event_time DESC, strata_ord DESC{conflict} \
         RETURNING entity_key, event_time",
        table = table(view),
        conflict = on_conflict(view),
    )
}

/// Records deletions of `rows` keys: a tombstone at the deletion's event time
/// replaces the stored row if newer (or an identical tombstone: a retry).
/// Returns the keys applied.
pub(crate) fn delete(view: &FeatureView, rows: usize) -> String {
    let mut sql =
        format!("INSERT INTO {} AS t (entity_key{}, event_time, deleted) VALUES ", table(view), key_column_list(view));
    let width = key_columns(view).len() + 2;
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            let _ = write!(sql, "${}, ", r * width + c + 1);
        }
        sql.push_str("true)");
    }
    sql.push_str(
        " ON CONFLICT (entity_key) DO UPDATE SET event_time = EXCLUDED.event_time, updated_at = now(), deleted = true",
    );
    for f in &view.features {
        let _ = write!(sql, ", \"{}\" = NULL", f.name);
    }
    sql.push_str(&guard(view));
    sql.push_str(" RETURNING entity_key");
    sql
}

pub(crate) fn upsert_chunk_rows(view: &FeatureView) -> usize {
    (MAX_PARAMS / (view.features.len() + key_columns(view).len() + 2)).clamp(1, MAX_ROWS_PER_STATEMENT)
}

/// An upsert of `rows` rows that applies a row only when its event time is
/// not older than the stored one, and returns the keys it applied.
pub(crate) fn upsert(view: &FeatureView, rows: usize) -> String {
    let width = view.features.len() + key_columns(view).len() + 2;
    let mut sql = format!(
        "INSERT INTO {} AS t (entity_key{}, event_time{}) VALUES ",
        table(view),
        key_column_list(view),
        feature_columns(view)
    );
    for r in 0..rows {
        sql.push_str(if r == 0 { "(" } else { ", (" });
        for c in 0..width {
            let _ = write!(sql, "{}${}", if c == 0 { "" } else { ", " }, r * width + c + 1);
        }
        sql.push(')');
    }
    sql.push_str(&on_conflict(view));
    sql.push_str(" RETURNING entity_key");
    sql
}

static NULL_INT64: Option<i64> = None;
static NULL_DOUBLE: Option<f64> = None;
static NULL_STRING: Option<String> = None;
static NULL_BOOL: Option<bool> = None;
static NULL_BYTES: Option<Vec<u8>> = None;
static NULL_FLOAT_LIST: Option<Vec<f32>> = None;
static NULL_INT64_LIST: Option<Vec<i64>> = None;
static NULL_INT32: Option<i32> = None;
static NULL_FLOAT: Option<f32> = None;
static NULL_TIMESTAMP: Option<SystemTime> = None;

/// The values of the timestamp features of `rows`, in row and feature
/// order, as bind parameters: [`param`] borrows every other value from its
/// row, but a timestamp is bound as a `SystemTime`, converted here once.
/// Empty for a view without timestamp features.
pub(crate) fn timestamps<'r>(view: &FeatureView, rows: impl IntoIterator<Item = &'r Row>) -> Vec<Option<SystemTime>> {
    let columns: Vec<usize> =
        view.features.iter().enumerate().filter(|(_, f)| f.ty == FeatureType::Timestamp).map(|(i, _)| i).collect();
    if columns.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::new();
    for row in rows {
        for &c in &columns {
            out.push(match row.values.get(c) {
                Some(Value::Timestamp(micros)) => Some(EventTime(*micros).to_system_time()),
                _ => None,
            });
        }
    }
    out
}

/// The bind parameters of [`upsert`], borrowing from the rows. `times` holds
/// each row's event time, converted once by the caller, `keys` each row's
/// join key values ([`key_values`]) and `stamps` its timestamp features'
/// values ([`timestamps`]).
pub(crate) fn upsert_params<'a>(
    view: &FeatureView,
    rows: &'a [&'a (String, Row)],
    times: &'a [SystemTime],
    keys: &'a [Vec<OwnedKeyValue>],
    stamps: &'a [Option<SystemTime>],
) -> Vec<&'a (dyn ToSql + Sync)> {
    let width = view.features.len() + key_columns(view).len() + 2;
    let mut params: Vec<&(dyn ToSql + Sync)> = Vec::with_capacity(rows.len() * width);
    let mut stamps = stamps.iter();
    for (i, ((key, row), time)) in rows.iter().map(|r| (&r.0, &r.1)).zip(times).enumerate() {
        params.push(key);
        params.extend(key_params(view, keys.get(i)));
        params.push(time);
        for (feature, value) in view.features.iter().zip(&row.values) {
            params.push(param(feature.ty, value, &mut stamps));
        }
    }
    params
}

/// A value as a bind parameter of its feature's column type. Values were
/// checked against the view before they got here; a mismatch binds null.
/// A timestamp feature takes the next of `stamps` ([`timestamps`]).
pub(crate) fn param<'a>(
    ty: FeatureType,
    value: &'a Value,
    stamps: &mut std::slice::Iter<'a, Option<SystemTime>>,
) -> &'a (dyn ToSql + Sync) {
    match (ty, value) {
        (FeatureType::Timestamp, _) => stamps.next().unwrap_or(&NULL_TIMESTAMP),
        (FeatureType::Int64, Value::Int64(v)) => v,
        (FeatureType::Double, Value::Double(v)) => v,
        (FeatureType::String, Value::String(v)) => v,
        (FeatureType::Bool, Value::Bool(v)) => v,
        (FeatureType::Bytes, Value::Bytes(v)) => v,
        (FeatureType::FloatList, Value::FloatList(v)) => v,
        (FeatureType::Int64List, Value::Int64List(v)) => v,
        (FeatureType::Int32, Value::Int32(v)) => v,
        (FeatureType::Float, Value::Float(v)) => v,
        (FeatureType::Int64, _) => &NULL_INT64,
        (FeatureType::Double, _) => &NULL_DOUBLE,
        (FeatureType::String, _) => &NULL_STRING,
        (FeatureType::Bool, _) => &NULL_BOOL,
        (FeatureType::Bytes, _) => &NULL_BYTES,
        (FeatureType::FloatList, _) => &NULL_FLOAT_LIST,
        (FeatureType::Int64List, _) => &NULL_INT64_LIST,
        (FeatureType::Int32, _) => &NULL_INT32,
        (FeatureType::Float, _) => &NULL_FLOAT,
    }
}

/// A row of [`select`]: a live row, a tombstone with its deletion time, or
/// a row that cannot be decoded into the view (logged and counted).
pub(crate) enum Selected {
    Row(Row),
    Deleted(EventTime),
    Unreadable,
}

/// Decodes a row of [`select`] into its key and row, or the key and why
/// its row cannot be read (only that key is then unavailable). `None` if
/// not even the key can be read.
pub(crate) fn decode_row(view: &FeatureView, row: &tokio_postgres::Row) -> Option<(String, Result<Selected, String>)> {
    let key: String = row.try_get(0).ok()?;
    let selected = decode_selected(view, &key, row);
    Some((key, selected))
}

fn decode_selected(view: &FeatureView, key: &str, row: &tokio_postgres::Row) -> Result<Selected, String> {
    let time: SystemTime = row.try_get(1).map_err(|e| e.to_string())?;
    let event_time = EventTime::from_system_time(time);
    let deleted: bool = row.try_get(2).map_err(|e| e.to_string())?;
    if deleted {
        return Ok(Selected::Deleted(event_time));
    }
    let mut values = Vec::with_capacity(view.features.len());
    for (i, feature) in view.features.iter().enumerate() {
        let col = i + 3;
        let value = match feature.ty {
            FeatureType::Int64 => row.try_get::<_, Option<i64>>(col).map(|v| v.map(Value::Int64)),
            FeatureType::Double => row.try_get::<_, Option<f64>>(col).map(|v| v.map(Value::Double)),
            FeatureType::String => row.try_get::<_, Option<String>>(col).map(|v| v.map(Value::String)),
            FeatureType::Bool => row.try_get::<_, Option<bool>>(col).map(|v| v.map(Value::Bool)),
            FeatureType::Bytes => row.try_get::<_, Option<Vec<u8>>>(col).map(|v| v.map(Value::Bytes)),
            FeatureType::FloatList => row.try_get::<_, Option<Vec<f32>>>(col).map(|v| v.map(Value::FloatList)),
            FeatureType::Int64List => row.try_get::<_, Option<Vec<i64>>>(col).map(|v| v.map(Value::Int64List)),
            FeatureType::Int32 => row.try_get::<_, Option<i32>>(col).map(|v| v.map(Value::Int32)),
            FeatureType::Float => row.try_get::<_, Option<f32>>(col).map(|v| v.map(Value::Float)),
            FeatureType::Timestamp => row
                .try_get::<_, Option<SystemTime>>(col)
                .map(|v| v.map(|t| Value::Timestamp(EventTime::from_system_time(t).0))),
        }
        .map_err(|e| format!("key {key:?}, feature {}: {e}", feature.name))?;
        values.push(value.unwrap_or(Value::Null));
    }
    Ok(Selected::Row(Row { event_time, values }))
}

#[cfg(test)]
mod tests {

    use strata_core::{FeatureSpec, FeatureViewSpec};

    use super::*;

    fn view() -> FeatureView {
        FeatureViewSpec::new(
            "v",
            vec![
                FeatureSpec { name: "a".into(), ty: FeatureType::Int64 },
                FeatureSpec { name: "b".into(), ty: FeatureType::FloatList },
            ],
        )
        .validate()
        .unwrap()
    }

    #[test]
    fn upsert_numbers_parameters_row_by_row_and_guards_on_event_time() {
        let sql = upsert(&view(), 2);
        assert!(sql.starts_with("INSERT INTO strata.\"v\" AS t (entity_key, event_time, \"a\", \"b\") VALUES ($1, $2, $3, $4), ($5, $6, $7, $8) ON CONFLICT"), "{sql}");
        assert!(
            sql.ends_with(
                "WHERE t.event_time < EXCLUDED.event_time OR (t.event_time = EXCLUDED.event_time \
                 AND (t.deleted, t.\"a\", t.\"b\") IS NOT DISTINCT FROM (EXCLUDED.deleted, EXCLUDED.\"a\", EXCLUDED.\"b\")) \
                 RETURNING entity_key"
            ),
            "{sql}"
        );
        assert!(sql.contains("deleted = false"), "a write revives a tombstone: {sql}");
    }

    #[test]
    fn a_delete_leaves_a_tombstone_guarded_on_event_time() {
        let sql = delete(&view(), 2);
        assert!(sql.contains("VALUES ($1, $2, true), ($3, $4, true) ON CONFLICT"), "{sql}");
        assert!(
            sql.contains("deleted = true, \"a\" = NULL, \"b\" = NULL WHERE t.event_time < EXCLUDED.event_time"),
            "{sql}"
        );
    }

    #[test]
    fn a_bulk_merge_keeps_the_newest_row_of_a_key_and_the_later_of_a_tie() {
        let sql = merge_staging(&view());
        assert!(sql.contains("SELECT DISTINCT ON (entity_key COLLATE \"C\")"), "{sql}");
        assert!(
            sql.contains("ORDER BY entity_key COLLATE \"C\", event_time DESC, strata_ord DESC ON CONFLICT"),
            "rows are merged in the byte order of their keys, as writes lock them: {sql}"
        );
        assert!(create_staging(&view()).contains("strata_ord bigint GENERATED ALWAYS AS IDENTITY"));
    }

    #[test]
    fn reads_see_tombstones() {
        assert!(select(&view()).starts_with("SELECT entity_key, event_time, deleted, \"a\", \"b\" FROM"));
    }

    #[test]
    fn chunks_stay_under_the_parameter_limit() {
        let view = view();
        assert!(upsert_chunk_rows(&view) * (view.features.len() + 2) <= MAX_PARAMS);
    }
}
