//! The decoder of invalidation messages (anyone who can publish on the
//! channel can send one): never a panic, and what decodes encodes back to
//! the same announcement.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_cache_tiers::{KEYS_PER_MESSAGE, decode_invalidation, invalidation_messages};

fuzz_target!(|data: &[u8]| {
    let Some(message) = decode_invalidation(data) else { return };
    if message.keys.len() > KEYS_PER_MESSAGE || message.keys.is_empty() {
        return;
    }
    let keys: Vec<&str> = message.keys.iter().map(String::as_str).collect();
    let encoded = invalidation_messages(message.origin, &message.view, &keys);
    assert_eq!(encoded.len(), 1);
    assert_eq!(decode_invalidation(&encoded[0]), Some(message));
});
