use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// The type of a feature, declared in the view's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeatureType {
    Int64,
    Double,
    String,
    Bool,
    Bytes,
    /// A list of 32-bit floats, such as an embedding.
    FloatList,
    Int64List,
    Int32,
    /// A 32-bit float.
    Float,
    /// A point in time, to the microsecond (PostgreSQL's `timestamptz`).
    Timestamp,
}

impl FeatureType {
    pub const ALL: [FeatureType; 10] = [
        FeatureType::Int64,
        FeatureType::Double,
        FeatureType::String,
        FeatureType::Bool,
        FeatureType::Bytes,
        FeatureType::FloatList,
        FeatureType::Int64List,
        FeatureType::Int32,
        FeatureType::Float,
        FeatureType::Timestamp,
    ];

    /// The name used in configuration files and error messages.
    pub fn name(self) -> &'static str {
        match self {
            FeatureType::Int64 => "int64",
            FeatureType::Double => "double",
            FeatureType::String => "string",
            FeatureType::Bool => "bool",
            FeatureType::Bytes => "bytes",
            FeatureType::FloatList => "float_list",
            FeatureType::Int64List => "int64_list",
            FeatureType::Int32 => "int32",
            FeatureType::Float => "float",
            FeatureType::Timestamp => "timestamp",
        }
    }
}

impl fmt::Display for FeatureType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One feature value. `Null` is a valid value of every feature type.
///
/// New variants go last: cache entries hold a value's variant index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Value {
    Null,
    Int64(i64),
    Double(f64),
    String(String),
    Bool(bool),
    Bytes(Vec<u8>),
    FloatList(Vec<f32>),
    Int64List(Vec<i64>),
    Int32(i32),
    Float(f32),
    /// Microseconds since the Unix epoch, within the range of a protobuf
    /// Timestamp (the same range as [`EventTime`]).
    Timestamp(i64),
}

impl Value {
    /// The type of this value, or `None` for null (which fits every type).
    pub fn feature_type(&self) -> Option<FeatureType> {
        Some(match self {
            Value::Null => return None,
            Value::Int64(_) => FeatureType::Int64,
            Value::Double(_) => FeatureType::Double,
            Value::String(_) => FeatureType::String,
            Value::Bool(_) => FeatureType::Bool,
            Value::Bytes(_) => FeatureType::Bytes,
            Value::FloatList(_) => FeatureType::FloatList,
            Value::Int64List(_) => FeatureType::Int64List,
            Value::Int32(_) => FeatureType::Int32,
            Value::Float(_) => FeatureType::Float,
            Value::Timestamp(_) => FeatureType::Timestamp,
        })
    }

    /// Whether this value may be stored in a feature of type `ty`.
    pub fn fits(&self, ty: FeatureType) -> bool {
        self.feature_type().is_none_or(|own| own == ty)
    }

    /// Approximate heap and inline size, for cache weighing.
    pub fn approx_bytes(&self) -> usize {
        let heap = match self {
            Value::Null
            | Value::Int64(_)
            | Value::Double(_)
            | Value::Bool(_)
            | Value::Int32(_)
            | Value::Float(_)
            | Value::Timestamp(_) => 0,
            _ => self.payload_bytes(),
        };
        size_of::<Value>() + heap
    }

    /// The bytes of the value itself: a string's or bytes' length, a list's
    /// elements, a number's width, 1 for a bool, 0 for null. The per-value
    /// limit is on this; an encoded value is at most this plus
    /// [`Value::MAX_WIRE_OVERHEAD`], whatever the encoding.
    pub fn payload_bytes(&self) -> usize {
        match self {
            Value::Null => 0,
            Value::Bool(_) => 1,
            Value::Int32(_) | Value::Float(_) => 4,
            Value::Int64(_) | Value::Double(_) | Value::Timestamp(_) => 8,
            Value::String(s) => s.len(),
            Value::Bytes(b) => b.len(),
            Value::FloatList(v) => v.len() * 4,
            // A varint of a negative int64 takes 10 bytes.
            Value::Int64List(v) => v.len() * 10,
        }
    }

    /// Field tags, lengths and wrappers around a value on the wire, at most.
    pub const MAX_WIRE_OVERHEAD: usize = 24;
}

/// When a row's values were produced, in microseconds since the Unix epoch
/// (PostgreSQL's `timestamptz` precision). Decides which of two writes wins.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EventTime(pub i64);

impl EventTime {
    /// Older than any real event: the version of "this key was never
    /// written" in a cache.
    pub const NEVER: EventTime = EventTime(i64::MIN);

    /// 0001-01-01T00:00:00Z, the earliest time a protobuf Timestamp may carry.
    pub const MIN_SECONDS: i64 = -62_135_596_800;
    /// 9999-12-31T23:59:59Z, the latest.
    pub const MAX_SECONDS: i64 = 253_402_300_799;

    /// Builds an event time from protobuf-style seconds and nanoseconds,
    /// truncating to microseconds. `None` when out of the supported range.
    pub fn from_parts(seconds: i64, nanos: i32) -> Option<EventTime> {
        if !(Self::MIN_SECONDS..=Self::MAX_SECONDS).contains(&seconds) || !(0..1_000_000_000).contains(&nanos) {
            return None;
        }
        Some(EventTime(seconds * 1_000_000 + i64::from(nanos / 1_000)))
    }

    /// Splits into protobuf-style seconds and non-negative nanoseconds.
    pub fn to_parts(self) -> (i64, i32) {
        let seconds = self.0.div_euclid(1_000_000);
        let micros = self.0.rem_euclid(1_000_000);
        // `micros` is below 1_000_000, so the product fits an i32.
        (seconds, (micros * 1_000) as i32)
    }

    pub fn to_system_time(self) -> SystemTime {
        if self.0 >= 0 {
            UNIX_EPOCH + Duration::from_micros(self.0.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_micros(self.0.unsigned_abs())
        }
    }

    pub fn from_system_time(t: SystemTime) -> EventTime {
        match t.duration_since(UNIX_EPOCH) {
            Ok(after) => EventTime(i64::try_from(after.as_micros()).unwrap_or(i64::MAX)),
            Err(before) => EventTime(-i64::try_from(before.duration().as_micros()).unwrap_or(i64::MAX)),
        }
    }
}

/// A stored entity row: one value per feature of its view, in the view's
/// declared order, and the event time of the write that produced them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub event_time: EventTime,
    pub values: Vec<Value>,
}

impl Row {
    /// Approximate in-memory size, for cache weighing.
    pub fn approx_bytes(&self) -> usize {
        size_of::<Row>() + self.values.iter().map(Value::approx_bytes).sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_time_round_trips_through_parts_before_and_after_the_epoch() {
        for (s, n) in [(0, 0), (1_700_000_000, 123_456_000), (-1, 999_999_000), (-62_135_596_800, 0)] {
            let t = EventTime::from_parts(s, n).unwrap();
            assert_eq!(t.to_parts(), (s, n));
            assert_eq!(EventTime::from_system_time(t.to_system_time()), t);
        }
    }

    #[test]
    fn event_time_truncates_nanoseconds_to_microseconds() {
        assert_eq!(EventTime::from_parts(1, 1_999).unwrap(), EventTime(1_000_001));
    }

    #[test]
    fn event_time_rejects_out_of_range_parts() {
        assert_eq!(EventTime::from_parts(EventTime::MAX_SECONDS + 1, 0), None);
        assert_eq!(EventTime::from_parts(0, -1), None);
        assert_eq!(EventTime::from_parts(0, 1_000_000_000), None);
    }

    #[test]
    fn null_fits_every_type_and_other_values_only_their_own() {
        for ty in FeatureType::ALL {
            assert!(Value::Null.fits(ty));
        }
        assert!(Value::Int64(1).fits(FeatureType::Int64));
        assert!(!Value::Int64(1).fits(FeatureType::Double));
        assert!(!Value::FloatList(vec![]).fits(FeatureType::Int64List));
    }
}
