//! The encoding of a cache entry in Redis: a format version, the view's
//! fingerprint, the entry's soft expiry (Unix milliseconds, so every server
//! instance reads the same point in time), whether the key exists, then the
//! row in postcard. The fingerprint makes entries of an older view shape
//! read as misses.

use crate::Row;

const FORMAT_VERSION: u8 = 2;
const HEADER_LEN: usize = 14;
const MISSING: u8 = 0;
const FOUND: u8 = 1;

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

/// A decoded cache entry: the row, or `None` for a key known not to exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub row: Option<Row>,
    /// After this Unix time in milliseconds the entry should be reloaded.
    pub soft_expiry_ms: i64,
}

/// Encodes an entry of the view with the given fingerprint.
pub fn encode_entry(fingerprint: u32, soft_expiry_ms: i64, row: Option<&Row>) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + row.map_or(0, |r| 16 + r.values.len() * 9));
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    out.extend_from_slice(&soft_expiry_ms.to_le_bytes());
    match row {
        None => out.push(MISSING),
        Some(row) => {
            out.push(FOUND);
            // Serializing plain data into a Vec cannot fail.
            postcard::to_io(row, &mut out).expect("postcard encodes rows into a Vec");
        }
    }
    out
}

/// Decodes an entry encoded by [`encode_entry`] for the same view shape.
pub fn decode_entry(fingerprint: u32, bytes: &[u8]) -> Result<Entry, DecodeError> {
    let header = bytes.get(..HEADER_LEN).ok_or(DecodeError::Truncated)?;
    if header[0] != FORMAT_VERSION {
        return Err(DecodeError::Version(header[0]));
    }
    if header[1..5] != fingerprint.to_le_bytes() {
        return Err(DecodeError::Fingerprint);
    }
    let mut soft = [0u8; 8];
    soft.copy_from_slice(&header[5..13]);
    let soft_expiry_ms = i64::from_le_bytes(soft);
    let row = match header[13] {
        MISSING if bytes.len() == HEADER_LEN => None,
        FOUND => Some(postcard::from_bytes(&bytes[HEADER_LEN..]).map_err(|e| DecodeError::Corrupt(e.to_string()))?),
        kind => return Err(DecodeError::Corrupt(format!("unknown entry kind {kind}"))),
    };
    Ok(Entry { row, soft_expiry_ms })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EventTime, Value};

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
            ],
        }
    }

    #[test]
    fn entries_round_trip() {
        let found = decode_entry(42, &encode_entry(42, 1_700, Some(&row()))).unwrap();
        assert_eq!(found, Entry { row: Some(row()), soft_expiry_ms: 1_700 });
        let missing = decode_entry(42, &encode_entry(42, -5, None)).unwrap();
        assert_eq!(missing, Entry { row: None, soft_expiry_ms: -5 });
    }

    #[test]
    fn another_view_shape_reads_as_a_fingerprint_mismatch() {
        assert_eq!(decode_entry(43, &encode_entry(42, 0, Some(&row()))), Err(DecodeError::Fingerprint));
    }

    #[test]
    fn truncated_or_corrupt_bytes_are_errors_not_panics() {
        let bytes = encode_entry(42, 0, Some(&row()));
        assert_eq!(decode_entry(42, &bytes[..3]), Err(DecodeError::Truncated));
        for cut in HEADER_LEN..bytes.len() {
            assert!(decode_entry(42, &bytes[..cut]).is_err());
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(decode_entry(42, &other), Err(DecodeError::Version(9)));
        let mut missing_with_tail = encode_entry(42, 0, None);
        missing_with_tail.push(1);
        assert!(decode_entry(42, &missing_with_tail).is_err());
    }
}
