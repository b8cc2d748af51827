//! The decoder of cache entries read from Redis (anything may be at a key):
//! never a panic, and what decodes encodes back to the same entry.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use strata_core::{Content, decode_entry, encode_entry};

fuzz_target!(|data: &[u8]| {
    let fingerprint = common::view().fingerprint;
    let Ok(entry) = decode_entry(fingerprint, data) else { return };
    let content = match &entry.content {
        Content::Found(row) => Content::Found(row),
        Content::Missing => Content::Missing,
        Content::Guard => Content::Guard,
    };
    let again = encode_entry(fingerprint, entry.soft_expiry_ms, content, entry.version);
    assert_eq!(decode_entry(fingerprint, &again).as_ref(), Ok(&entry));
});
