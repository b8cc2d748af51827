//! The encoding of a cache entry in Redis: a format version, the entry's
//! version (the event time it stands for), the view's fingerprint, the
//! entry's soft expiry (Unix milliseconds, so every server instance reads the
//! same point in time), what kind of entry it is, then the row in postcard.
//!
//! The version sits at a fixed offset, big-endian and offset by 2^63 so that
//! unsigned order is event-time order: Redis compares it in a Lua script
//! (`struct.unpack('>I4I4', entry, 2)`) before replacing an entry, so an
//! older value never replaces a newer one. The fingerprint makes entries of
//! an older view shape read as misses.

use crate::{EventTime, Row};

const FORMAT_VERSION: u8 = 3;
/// Where the version starts, for the Lua side (1-based there: 2).
pub const VERSION_OFFSET: usize = 1;
const HEADER_LEN: usize = 22;
const MISSING: u8 = 0;
const FOUND: u8 = 1;
const GUARD: u8 = 2;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("cached entry is too short")]
    Truncated,
    #[error("cached entry has format version {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    #[error("cached entry belongs to another shape of the view")]
    Fingerprint,
    #[error("cached entry is corrupt: {0}")]
    Corrupt(String),
}

/// What an entry says about its key.
#[derive(Clone, Debug, PartialEq)]
pub enum Content<R> {
    /// The key's row.
    Found(R),
    /// The key does not exist: it was never written, or deleted at the
    /// entry's version.
    Missing,
    /// Nothing is cached, but a write at the entry's version happened: a
    /// reader treats it as a miss, and a cache fill older than it is
    /// refused. Left by bulk loads, which do not copy their rows to Redis.
    Guard,
}

/// A decoded cache entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub content: Content<Row>,
    /// The event time the entry stands for: the row's, a deletion's or a
    /// guarded write's. `EventTime::NEVER` for a key never written.
    pub version: EventTime,
    /// After this Unix time in milliseconds the entry should be reloaded.
    pub soft_expiry_ms: i64,
}

/// The version bytes of an event time: big-endian, offset by 2^63, so that
/// byte order (and unsigned order) is time order.
pub fn version_bytes(t: EventTime) -> [u8; 8] {
    ((t.0 as u64) ^ (1 << 63)).to_be_bytes()
}

/// Encodes an entry of the view with the given fingerprint. The version of a
/// found row is its event time; of the others, `version`.
pub fn encode_entry(fingerprint: u32, soft_expiry_ms: i64, content: Content<&Row>, version: EventTime) -> Vec<u8> {
    let (kind, version) = match content {
        Content::Found(row) => (FOUND, row.event_time),
        Content::Missing => (MISSING, version),
        Content::Guard => (GUARD, version),
    };
    let row_len = if let Content::Found(row) = content { 16 + row.values.len() * 9 } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + row_len);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&version_bytes(version));
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&soft_expiry_ms.to_le_bytes());
    out.push(kind);
    if let Content::Found(row) = content {
        // Serializing plain data into a Vec cannot fail.
        postcard::to_io(row, &mut out).expect("postcard encodes rows into a Vec");
    }
    out
}

/// Decodes an entry encoded by [`encode_entry`] for the same view shape.
pub fn decode_entry(fingerprint: u32, bytes: &[u8]) -> Result<Entry, DecodeError> {
    let header = bytes.get(..HEADER_LEN).ok_or(DecodeError::Truncated)?;
    if header[0] != FORMAT_VERSION {
        return Err(DecodeError::Version(header[0]));
    }
    let mut word = [0u8; 8];
    word.copy_from_slice(&header[1..9]);
    let version = EventTime((u64::from_be_bytes(word) ^ (1 << 63)) as i64);
    if header[9..13] != fingerprint.to_le_bytes() {
        return Err(DecodeError::Fingerprint);
    }
    word.copy_from_slice(&header[13..21]);
    let soft_expiry_ms = i64::from_le_bytes(word);
    let content = match header[21] {
        MISSING if bytes.len() == HEADER_LEN => Content::Missing,
        GUARD if bytes.len() == HEADER_LEN => Content::Guard,
        FOUND => {
            let row: Row =
                postcard::from_bytes(&bytes[HEADER_LEN..]).map_err(|e| DecodeError::Corrupt(e.to_string()))?;
            if row.event_time != version {
                return Err(DecodeError::Corrupt("row event time differs from the entry version".into()));
            }
            Content::Found(row)
        }
        kind => return Err(DecodeError::Corrupt(format!("unknown entry kind {kind}"))),
    };
    Ok(Entry { content, version, soft_expiry_ms })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::Value;

    fn row() -> Row {
        Row {
            event_time: EventTime(1_764_000_000_123_456),
            values: vec![
                Value::Null,
                Value::Int64(-7),
                Value::Double(0.25),
                Value::String("gold".into()),
                Value::Bool(true),
                Value::Bytes(vec![0, 255]),
                Value::FloatList(vec![0.5, -1.5]),
                Value::Int64List(vec![1, i64::MIN]),
                Value::Int32(i32::MIN),
                Value::Float(0.1),
                Value::Timestamp(-1),
            ],
        }
    }

    #[test]
    fn entries_round_trip() {
        let found = decode_entry(42, &encode_entry(42, 1_700, Content::Found(&row()), EventTime::NEVER)).unwrap();
        assert_eq!(found, Entry { content: Content::Found(row()), version: row().event_time, soft_expiry_ms: 1_700 });
        let missing = decode_entry(42, &encode_entry(42, -5, Content::Missing, EventTime(9))).unwrap();
        assert_eq!(missing, Entry { content: Content::Missing, version: EventTime(9), soft_expiry_ms: -5 });
        let guard = decode_entry(42, &encode_entry(42, 0, Content::Guard, EventTime(-3))).unwrap();
        assert_eq!(guard, Entry { content: Content::Guard, version: EventTime(-3), soft_expiry_ms: 0 });
    }

    #[test]
    fn the_version_sits_where_the_lua_script_reads_it() {
        let bytes = encode_entry(42, 0, Content::Found(&row()), EventTime::NEVER);
        assert_eq!(bytes[VERSION_OFFSET..VERSION_OFFSET + 8], version_bytes(row().event_time));
    }

    proptest! {
        #[test]
        fn version_byte_order_is_event_time_order(a in any::<i64>(), b in any::<i64>()) {
            prop_assert_eq!(version_bytes(EventTime(a)).cmp(&version_bytes(EventTime(b))), a.cmp(&b));
        }
    }

    #[test]
    fn another_view_shape_reads_as_a_fingerprint_mismatch() {
        let bytes = encode_entry(42, 0, Content::Found(&row()), EventTime::NEVER);
        assert_eq!(decode_entry(43, &bytes), Err(DecodeError::Fingerprint));
    }

    #[test]
    fn truncated_or_corrupt_bytes_are_errors_not_panics() {
        let bytes = encode_entry(42, 0, Content::Found(&row()), EventTime::NEVER);
        assert_eq!(decode_entry(42, &bytes[..3]), Err(DecodeError::Truncated));
        for cut in HEADER_LEN..bytes.len() {
            assert!(decode_entry(42, &bytes[..cut]).is_err());
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(decode_entry(42, &other), Err(DecodeError::Version(9)));
        let mut missing_with_tail = encode_entry(42, 0, Content::Missing, EventTime::NEVER);
        missing_with_tail.push(1);
        assert!(decode_entry(42, &missing_with_tail).is_err());
        let mut wrong_version = bytes.clone();
        wrong_version[8] ^= 1;
        assert!(decode_entry(42, &wrong_version).is_err(), "a row must carry the version it is filed under");
    }
}
