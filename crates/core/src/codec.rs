//! The encoding of a row in a shared cache (Redis): a format version, the
//! view's fingerprint, then the row in postcard. Small and fast to decode;
//! the fingerprint makes rows of an older view shape read as misses.

use crate::Row;

const FORMAT_VERSION: u8 = 1;
const HEADER_LEN: usize = 5;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("cached row is too short")]
    Truncated,
    #[error("cached row has format version {0}, expected {FORMAT_VERSION}")]
    Version(u8),
    #[error("cached row belongs to another shape of the view")]
    Fingerprint,
    #[error("cached row is corrupt: {0}")]
    Corrupt(String),
}

/// Encodes a row of the view with the given fingerprint.
pub fn encode_row(fingerprint: u32, row: &Row) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + 16 + row.values.len() * 9);
    out.push(FORMAT_VERSION);
    out.extend_from_slice(&fingerprint.to_le_bytes());
    // Serializing plain data into a Vec cannot fail.
    postcard::to_io(row, &mut out).expect("postcard encodes rows into a Vec");
    out
}

/// Decodes a row encoded by [`encode_row`] for the same view shape.
pub fn decode_row(fingerprint: u32, bytes: &[u8]) -> Result<Row, DecodeError> {
    let header = bytes.get(..HEADER_LEN).ok_or(DecodeError::Truncated)?;
    if header[0] != FORMAT_VERSION {
        return Err(DecodeError::Version(header[0]));
    }
    if header[1..] != fingerprint.to_le_bytes() {
        return Err(DecodeError::Fingerprint);
    }
    postcard::from_bytes(&bytes[HEADER_LEN..]).map_err(|e| DecodeError::Corrupt(e.to_string()))
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
    fn rows_round_trip() {
        assert_eq!(decode_row(42, &encode_row(42, &row())).unwrap(), row());
    }

    #[test]
    fn another_view_shape_reads_as_a_fingerprint_mismatch() {
        assert_eq!(decode_row(43, &encode_row(42, &row())), Err(DecodeError::Fingerprint));
    }

    #[test]
    fn truncated_or_corrupt_bytes_are_errors_not_panics() {
        let bytes = encode_row(42, &row());
        assert_eq!(decode_row(42, &bytes[..3]), Err(DecodeError::Truncated));
        for cut in HEADER_LEN..bytes.len() {
            assert!(decode_row(42, &bytes[..cut]).is_err());
        }
        let mut other = bytes.clone();
        other[0] = 9;
        assert_eq!(decode_row(42, &other), Err(DecodeError::Version(9)));
    }
}
