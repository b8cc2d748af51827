//! The shard map: which shards keys are routed over, shared by every
//! instance through the shards themselves.
//!
//! Each shard holds the map in `strata.shard_map`, with an epoch; the
//! highest epoch any reachable shard holds is the map. Epoch 0 (a
//! deployment never resharded) means "the shards in config order". A map is
//! stable (`from == to`: keys are routed by jump hash over the first `from`
//! shards) or moving (`to > from`: a reshard is copying the keys whose shard
//! differs under the two counts; they are written to both and read from
//! both, the newer winning).
//!
//! Every write transaction first reads the shard's epoch (`FOR SHARE`, so a
//! map change waits for it) and rolls back if the shard knows a newer map
//! than the writer: an instance that has not yet followed a change cannot
//! write where the new map no longer routes.

use strata_core::FeatureView;

use crate::routing::shard_for_key;

/// The map as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardMap {
    pub epoch: u64,
    /// Shard names in routing order.
    pub shards: Vec<String>,
    /// Keys are routed over the first `from` shards…
    pub from: u32,
    /// …and, while a move is in progress (`to > from`), also over the first
    /// `to`.
    pub to: u32,
}

impl ShardMap {
    /// The map of a deployment never resharded: the configured shards.
    pub(crate) fn of_config(names: &[String]) -> ShardMap {
        let n = u32::try_from(names.len()).unwrap_or(u32::MAX);
        ShardMap { epoch: 0, shards: names.to_vec(), from: n, to: n }
    }

    pub fn moving(&self) -> bool {
        self.to != self.from
    }

    /// Where a key lives under this map: its shard's position in
    /// [`ShardMap::shards`] by `from`, and during a move its other one by
    /// `to`, where that differs.
    pub fn place(&self, view: &FeatureView, key: &str) -> (usize, Option<usize>) {
        let bytes = view.entity.routing_bytes(key);
        let old = shard_for_key(&bytes, self.from) as usize;
        if !self.moving() {
            return (old, None);
        }
        let new = shard_for_key(&bytes, self.to) as usize;
        (old, (new != old).then_some(new))
    }
}

/// A map and where its shards are in this instance's configuration.
#[derive(Debug)]
pub(crate) struct Routing {
    pub(crate) map: ShardMap,
    /// Map position → config index; `None`: a shard this instance's
    /// configuration lacks.
    pub(crate) index: Vec<Option<usize>>,
}

/// A key's shards, as config indexes; `Err(name)`: a shard of the map that
/// this instance's configuration lacks.
pub(crate) type Slot = Result<usize, String>;

impl Routing {
    pub(crate) fn new(map: ShardMap, config_names: &[&str]) -> Routing {
        let index = map.shards.iter().map(|name| config_names.iter().position(|n| n == name)).collect();
        Routing { map, index }
    }

    fn slot(&self, position: usize) -> Slot {
        self.index
            .get(position)
            .copied()
            .flatten()
            .ok_or_else(|| self.map.shards.get(position).cloned().unwrap_or_else(|| format!("#{position}")))
    }

    /// The key's shard, and during a move the other one it is written to.
    pub(crate) fn place(&self, view: &FeatureView, key: &str) -> (Slot, Option<Slot>) {
        let (old, new) = self.map.place(view, key);
        (self.slot(old), new.map(|p| self.slot(p)))
    }
}

pub(crate) const CREATE: &str = "CREATE TABLE IF NOT EXISTS strata.shard_map (\
     id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL, shards text[] NOT NULL, \
     route_from int NOT NULL, route_to int NOT NULL);\
     INSERT INTO strata.shard_map VALUES (1, 0, '{}', 0, 0) ON CONFLICT DO NOTHING;\
     CREATE TABLE IF NOT EXISTS strata.reshard_progress (\
     view text PRIMARY KEY, epoch bigint NOT NULL, last_key text NOT NULL, copied bigint NOT NULL);";

pub(crate) const SELECT: &str = "SELECT epoch, shards, route_from, route_to FROM strata.shard_map WHERE id = 1";

/// The epoch check of a write transaction (see the module's comment).
pub(crate) const FENCE: &str = "SELECT epoch FROM strata.shard_map WHERE id = 1 FOR SHARE";

pub(crate) const STORE: &str = "UPDATE strata.shard_map SET epoch = $1, shards = $2, route_from = $3, route_to = $4 \
     WHERE id = 1 AND epoch < $1";

pub(crate) fn decode(row: &tokio_postgres::Row) -> ShardMap {
    ShardMap {
        epoch: row.get::<_, i64>(0).unsigned_abs(),
        shards: row.get(1),
        from: row.get::<_, i32>(2).unsigned_abs(),
        to: row.get::<_, i32>(3).unsigned_abs(),
    }
}

#[cfg(test)]
mod tests {
    use strata_core::{FeatureSpec, FeatureType, FeatureViewSpec};

    use super::*;

    fn view() -> FeatureView {
        FeatureViewSpec::new("v", vec![FeatureSpec { name: "a".into(), ty: FeatureType::Int64 }]).validate().unwrap()
    }

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("shard-{i}")).collect()
    }

    #[test]
    fn a_move_from_two_to_three_shards_sends_a_third_of_the_keys_to_the_new_shard_and_no_other() {
        let view = view();
        let stable = ShardMap { epoch: 1, shards: names(3), from: 2, to: 2 };
        let moving = ShardMap { epoch: 2, shards: names(3), from: 2, to: 3 };
        let mut moved = 0;
        for i in 0..30_000 {
            let key = format!("k{i}");
            let (home, none) = stable.place(&view, &key);
            assert!(home < 2 && none.is_none());
            let (same, other) = moving.place(&view, &key);
            assert_eq!(same, home, "a move keeps every key's old shard as its home");
            if let Some(new) = other {
                assert_eq!(new, 2, "a key only ever moves to the new shard");
                moved += 1;
            }
        }
        assert!((9_000..11_000).contains(&moved), "{moved} of 30,000 keys move");
    }

    #[test]
    fn a_shard_the_configuration_lacks_is_named_not_guessed() {
        let view = view();
        let map = ShardMap { epoch: 2, shards: names(3), from: 2, to: 3 };
        let routing = Routing::new(map.clone(), &["shard-0", "shard-1"]);
        let key = (0..).map(|i| format!("k{i}")).find(|k| map.place(&view, k).1.is_some()).unwrap();
        let (home, other) = routing.place(&view, &key);
        assert!(home.is_ok());
        assert_eq!(other, Some(Err("shard-2".to_owned())));
        // Config order may differ from the map's: positions map by name.
        let reordered = Routing::new(map.clone(), &["shard-1", "shard-2", "shard-0"]);
        assert_eq!(reordered.index, vec![Some(2), Some(0), Some(1)]);
    }
}
