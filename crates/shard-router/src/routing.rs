//! The routing rule, pinned so anyone can check where a key lives:
//! shard index = jump consistent hash (Lamping & Veach, 2014) of
//! `xxh3_64(entity key bytes, seed 0)` over the shards in config order. The
//! key bytes are the entity key's canonical encoding
//! (`strata_core::Entity::encode`): for a key of one string join key, as
//! every view has so far, its UTF-8 bytes.
//!
//! Growing from N to N+1 shards moves about 1/(N+1) of the keys, where
//! `hash % N` would move nearly all of them.

use xxhash_rust::xxh3::xxh3_64;

/// The shard, in `0..shards`, that owns `key`. `shards` must be at least 1.
pub fn shard_for(key: &str, shards: u32) -> u32 {
    shard_for_key(key.as_bytes(), shards)
}

/// The shard, in `0..shards`, that owns the entity key encoded as `key`.
pub fn shard_for_key(key: &[u8], shards: u32) -> u32 {
    jump_hash(xxh3_64(key), shards)
}

/// Jump consistent hash: maps a 64-bit key to a bucket in `0..buckets`.
/// Returns 0 when `buckets` is 0 or 1.
pub fn jump_hash(mut key: u64, buckets: u32) -> u32 {
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < i64::from(buckets) {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b + 1) as f64 * ((1u64 << 31) as f64 / ((key >> 33) + 1) as f64)) as i64;
    }
    // `b` is in `-1..buckets`; -1 only when there are no buckets.
    b.max(0) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The reference vectors of the Go implementations (dgryski/go-jump's
    /// `jump_test.go`), so our arithmetic matches the paper's.
    #[test]
    fn jump_hash_matches_the_reference_vectors() {
        assert_eq!(jump_hash(1, 1), 0);
        assert_eq!(jump_hash(42, 57), 43);
        assert_eq!(jump_hash(0xDEAD_10CC, 1), 0);
        assert_eq!(jump_hash(0xDEAD_10CC, 666), 361);
        assert_eq!(jump_hash(256, 1024), 520);
        assert_eq!(jump_hash(7, 0), 0);
    }

    /// xxh3_64 with seed 0, pinned for explicit bytes: a dependency bump that
    /// changed these would silently move every key to another shard.
    #[test]
    fn xxh3_of_explicit_bytes_is_pinned() {
        assert_eq!(xxh3_64(b""), 0x2D06_8005_38D3_94C2);
        assert_eq!(xxh3_64(b"user_000001"), GOLDEN_USER_1);
        assert_eq!(xxh3_64("größe".as_bytes()), GOLDEN_UNICODE);
    }

    /// An entity of one string join key routes by the bare string, as every
    /// key did before entities: no row moves. A composite key routes by its
    /// encoding, pinned here.
    #[test]
    fn entity_keys_route_by_their_canonical_encoding() {
        use strata_core::{Entity, JoinKey, KeyType, KeyValue};
        let implicit = Entity::implicit().encode([("entity_key", KeyValue::String("user_000001"))], 1024);
        let implicit = implicit.unwrap_or_default();
        assert_eq!(xxh3_64(&implicit), GOLDEN_USER_1);
        for shards in 1..=5 {
            assert_eq!(shard_for_key(&implicit, shards), shard_for("user_000001", shards));
        }
        let user_item = Entity::new(
            "user_item",
            vec![
                JoinKey { name: "user_id".into(), ty: KeyType::Int64 },
                JoinKey { name: "item_id".into(), ty: KeyType::String },
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let key = user_item.encode([("user_id", KeyValue::Int64(7)), ("item_id", KeyValue::String("a"))], 1024);
        let key = key.unwrap_or_default();
        assert_eq!(xxh3_64(&key), GOLDEN_USER_ITEM, "{:#018x}", xxh3_64(&key));
        assert_eq!([2, 3, 5, 8, 16, 64].map(|n| shard_for_key(&key, n)), GOLDEN_USER_ITEM_SHARDS);
    }

    const GOLDEN_USER_ITEM: u64 = 0x02FB_2185_B9C7_620B;
    const GOLDEN_USER_ITEM_SHARDS: [u32; 6] = [0, 0, 0, 5, 8, 21];
    const GOLDEN_USER_1: u64 = 0x4BCB_2E29_9314_E05B;
    const GOLDEN_UNICODE: u64 = 0xA6D7_BBEA_01D4_872C;

    /// Where named keys live with 2 and 3 shards; pinned. The values were
    /// cross-checked with Python's `xxhash` package and a transcription of
    /// the paper's jump hash.
    #[test]
    fn shard_of_named_keys_is_pinned() {
        let keys = ["user_000001", "user_000002", "user_000003", "user_042000", "merchant:77", "größe"];
        let two: Vec<u32> = keys.iter().map(|k| shard_for(k, 2)).collect();
        let three: Vec<u32> = keys.iter().map(|k| shard_for(k, 3)).collect();
        assert_eq!(two, GOLDEN_TWO);
        assert_eq!(three, GOLDEN_THREE);
    }

    const GOLDEN_TWO: [u32; 6] = [1, 1, 1, 0, 1, 0];
    const GOLDEN_THREE: [u32; 6] = [2, 2, 1, 2, 1, 0];

    #[test]
    fn growing_by_one_shard_moves_about_one_in_n_plus_one_keys() {
        let n = 20_000;
        let moved = (0..n).filter(|i| {
            let key = format!("user_{i:06}");
            shard_for(&key, 4) != shard_for(&key, 5)
        });
        let moved = moved.count() as f64 / f64::from(n);
        assert!((moved - 0.2).abs() < 0.02, "moved {moved}");
        // And the keys that move go only to the new shard.
        for i in 0..n {
            let key = format!("user_{i:06}");
            let (before, after) = (shard_for(&key, 4), shard_for(&key, 5));
            assert!(before == after || after == 4, "{key} moved from {before} to {after}");
        }
    }

    #[test]
    fn keys_spread_evenly() {
        let mut counts = [0u32; 3];
        for i in 0..30_000 {
            counts[shard_for(&format!("k{i}"), 3) as usize] += 1;
        }
        for c in counts {
            assert!((9_500..=10_500).contains(&c), "{counts:?}");
        }
    }
}
