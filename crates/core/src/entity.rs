//! Entities (what features describe: a user, an item, a user and an item)
//! with typed join keys, and the one canonical byte encoding of an entity
//! key, which is what routing hashes and what caches and shards file a row
//! under.
//!
//! The encoding:
//! - An entity of one string join key: the string's UTF-8 bytes, unchanged.
//!   Every view today is keyed that way (by `entity_key`), so no row moves
//!   and no cached entry changes name when such an entity is declared.
//! - Any other entity: the byte [`COMPOSITE`], then each join key in the
//!   byte order of the join keys' names (not the order a caller gives them
//!   in, nor the order the registry declares them in): a type tag, then an
//!   int64 as 8 bytes big-endian with the sign bit flipped (so byte order is
//!   numeric order), or a string or bytes value as its length (4 bytes
//!   big-endian) and its bytes. A number is a number however a client wrote
//!   it: `7`, `7.0` and `"7"` in JSON all reach here as the int64 7.
//!
//! A view has one entity, so the two forms never meet within a view.

use std::borrow::Cow;
use std::fmt;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The first byte of every encoding of an entity that is not one string
/// join key. No valid UTF-8 string starts with it.
pub const COMPOSITE: u8 = 0xFF;

/// The type of a join key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyType {
    Int64,
    String,
    Bytes,
}

impl KeyType {
    pub fn name(self) -> &'static str {
        match self {
            KeyType::Int64 => "int64",
            KeyType::String => "string",
            KeyType::Bytes => "bytes",
        }
    }

    /// The tag that precedes a value of this type in a composite encoding.
    fn tag(self) -> u8 {
        match self {
            KeyType::Int64 => 1,
            KeyType::String => 2,
            KeyType::Bytes => 3,
        }
    }
}

impl fmt::Display for KeyType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One join key of an entity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinKey {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: KeyType,
}

/// The value of one join key in a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyValue<'a> {
    Int64(i64),
    String(&'a str),
    Bytes(&'a [u8]),
}

impl KeyValue<'_> {
    pub fn key_type(&self) -> KeyType {
        match self {
            KeyValue::Int64(_) => KeyType::Int64,
            KeyValue::String(_) => KeyType::String,
            KeyValue::Bytes(_) => KeyType::Bytes,
        }
    }
}

/// Why a set of join key values is not a key of an entity.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EntityKeyError {
    #[error("join key {join_key} of entity {entity} is missing")]
    Missing { entity: String, join_key: String },
    #[error("entity {entity} has no join key {join_key}")]
    Unknown { entity: String, join_key: String },
    #[error("join key {join_key} is given twice")]
    Duplicate { join_key: String },
    #[error("join key {join_key} is {want}, not {got}")]
    WrongType { join_key: String, want: KeyType, got: KeyType },
    #[error("join key {join_key} is {len} bytes long, over the limit of {max}")]
    TooLong { join_key: String, len: usize, max: usize },
}

/// An entity: a name and one or more typed join keys, kept in the byte
/// order of their names (the order of the encoding).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entity {
    pub name: String,
    pub description: String,
    join_keys: Vec<JoinKey>,
}

/// Why an entity declaration is not valid.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum EntityError {
    #[error("entity {0} has no join keys")]
    NoJoinKeys(String),
    #[error("entity {entity} declares join key {join_key} twice")]
    DuplicateJoinKey { entity: String, join_key: String },
}

impl Entity {
    pub fn new(name: impl Into<String>, mut join_keys: Vec<JoinKey>) -> Result<Entity, EntityError> {
        let name = name.into();
        if join_keys.is_empty() {
            return Err(EntityError::NoJoinKeys(name));
        }
        join_keys.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
        if let Some(pair) = join_keys.windows(2).find(|pair| pair[0].name == pair[1].name) {
            return Err(EntityError::DuplicateJoinKey { entity: name, join_key: pair[0].name.clone() });
        }
        Ok(Entity { name, description: String::new(), join_keys })
    }

    /// The entity of a view that names none: one string join key,
    /// `entity_key`, as every view has been keyed so far.
    pub fn implicit() -> Entity {
        Entity {
            name: "entity_key".into(),
            description: String::new(),
            join_keys: vec![JoinKey { name: "entity_key".into(), ty: KeyType::String }],
        }
    }

    /// The join keys, in the byte order of their names.
    pub fn join_keys(&self) -> &[JoinKey] {
        &self.join_keys
    }

    /// Whether keys of this entity are encoded as the bare string.
    pub fn is_single_string(&self) -> bool {
        matches!(self.join_keys.as_slice(), [JoinKey { ty: KeyType::String, .. }])
    }

    /// The text a key is filed under in the caches, in the routing and in
    /// its shard's `entity_key` column, from its canonical encoding: the
    /// string itself for an entity of one string join key (so such keys
    /// stay as they always were), else the encoding in lowercase hex.
    pub fn key_text(&self, encoded: &[u8]) -> String {
        if self.is_single_string() {
            return String::from_utf8_lossy(encoded).into_owned();
        }
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut text = String::with_capacity(encoded.len() * 2);
        for &b in encoded {
            text.push(char::from(HEX[usize::from(b >> 4)]));
            text.push(char::from(HEX[usize::from(b & 0xf)]));
        }
        text
    }

    /// The canonical encoding of a key's text ([`Entity::key_text`]): what
    /// routing hashes. Text that is not a key of this entity (which callers
    /// reject first, with [`Entity::parse_key_text`]) hashes as it is.
    pub fn routing_bytes<'a>(&self, text: &'a str) -> Cow<'a, [u8]> {
        if self.is_single_string() {
            return Cow::Borrowed(text.as_bytes());
        }
        from_hex(text).map_or(Cow::Borrowed(text.as_bytes()), Cow::Owned)
    }

    /// The join key values of a key's text, aligned with
    /// [`Entity::join_keys`]; `None` if the text is not a key of this entity.
    pub fn parse_key_text(&self, text: &str) -> Option<Vec<OwnedKeyValue>> {
        if self.is_single_string() {
            return Some(vec![OwnedKeyValue::String(text.to_owned())]);
        }
        self.decode(&from_hex(text)?)
    }

    /// The join key values of a canonical encoding, aligned with
    /// [`Entity::join_keys`]; `None` if it is not one of this entity's.
    pub fn decode(&self, encoded: &[u8]) -> Option<Vec<OwnedKeyValue>> {
        if self.is_single_string() {
            return Some(vec![OwnedKeyValue::String(String::from_utf8(encoded.to_vec()).ok()?)]);
        }
        let mut rest = encoded.strip_prefix(&[COMPOSITE])?;
        let mut values = Vec::with_capacity(self.join_keys.len());
        for key in &self.join_keys {
            let (&tag, after) = rest.split_first()?;
            if tag != key.ty.tag() {
                return None;
            }
            rest = after;
            let value = match key.ty {
                KeyType::Int64 => {
                    let (bytes, after) = rest.split_first_chunk::<8>()?;
                    rest = after;
                    OwnedKeyValue::Int64((u64::from_be_bytes(*bytes) ^ (1 << 63)) as i64)
                }
                KeyType::String | KeyType::Bytes => {
                    let (len, after) = rest.split_first_chunk::<4>()?;
                    let len = usize::try_from(u32::from_be_bytes(*len)).ok()?;
                    let (bytes, after) = after.split_at_checked(len)?;
                    rest = after;
                    match key.ty {
                        KeyType::String => OwnedKeyValue::String(String::from_utf8(bytes.to_vec()).ok()?),
                        _ => OwnedKeyValue::Bytes(bytes.to_vec()),
                    }
                }
            };
            values.push(value);
        }
        rest.is_empty().then_some(values)
    }

    /// The canonical encoding of the key given by `values` (join key name
    /// and value, in any order). Every join key must be given once, with a
    /// value of its type, each at most `max_len` bytes long.
    pub fn encode<'a>(
        &self,
        values: impl IntoIterator<Item = (&'a str, KeyValue<'a>)>,
        max_len: usize,
    ) -> Result<Vec<u8>, EntityKeyError> {
        if let [key] = self.join_keys.as_slice() {
            return self.encode_one(key, values, max_len);
        }
        let mut given: Vec<Option<KeyValue<'a>>> = vec![None; self.join_keys.len()];
        for (name, value) in values {
            let Ok(i) = self.join_keys.binary_search_by(|k| k.name.as_bytes().cmp(name.as_bytes())) else {
                return Err(EntityKeyError::Unknown { entity: self.name.clone(), join_key: name.to_owned() });
            };
            let key = &self.join_keys[i];
            check_value(key, value, max_len)?;
            if given[i].replace(value).is_some() {
                return Err(EntityKeyError::Duplicate { join_key: key.name.clone() });
            }
        }
        let mut values = Vec::with_capacity(given.len());
        for (key, value) in self.join_keys.iter().zip(given) {
            let value = value
                .ok_or_else(|| EntityKeyError::Missing { entity: self.name.clone(), join_key: key.name.clone() })?;
            values.push(value);
        }
        if let [KeyValue::String(s)] = values.as_slice()
            && self.is_single_string()
        {
            return Ok(s.as_bytes().to_vec());
        }
        let mut out = vec![COMPOSITE];
        for value in values {
            out.push(value.key_type().tag());
            match value {
                KeyValue::Int64(n) => out.extend_from_slice(&((n as u64) ^ (1 << 63)).to_be_bytes()),
                KeyValue::String(s) => push_sized(&mut out, s.as_bytes()),
                KeyValue::Bytes(b) => push_sized(&mut out, b),
            }
        }
        Ok(out)
    }
}

impl Entity {
    /// [`Entity::encode`] for an entity of one join key, without the
    /// bookkeeping of several (a batch of 500 item ids encodes 500 keys).
    fn encode_one<'a>(
        &self,
        key: &JoinKey,
        values: impl IntoIterator<Item = (&'a str, KeyValue<'a>)>,
        max_len: usize,
    ) -> Result<Vec<u8>, EntityKeyError> {
        let mut values = values.into_iter();
        let Some((name, value)) = values.next() else {
            return Err(EntityKeyError::Missing { entity: self.name.clone(), join_key: key.name.clone() });
        };
        if name != key.name {
            return Err(EntityKeyError::Unknown { entity: self.name.clone(), join_key: name.to_owned() });
        }
        if let Some((name, _)) = values.next() {
            return Err(if name == key.name {
                EntityKeyError::Duplicate { join_key: key.name.clone() }
            } else {
                EntityKeyError::Unknown { entity: self.name.clone(), join_key: name.to_owned() }
            });
        }
        check_value(key, value, max_len)?;
        Ok(match value {
            KeyValue::String(s) if self.is_single_string() => s.as_bytes().to_vec(),
            KeyValue::Int64(n) => {
                let mut out = Vec::with_capacity(10);
                out.extend_from_slice(&[COMPOSITE, value.key_type().tag()]);
                out.extend_from_slice(&((n as u64) ^ (1 << 63)).to_be_bytes());
                out
            }
            KeyValue::String(s) => {
                let mut out = vec![COMPOSITE, value.key_type().tag()];
                push_sized(&mut out, s.as_bytes());
                out
            }
            KeyValue::Bytes(b) => {
                let mut out = vec![COMPOSITE, value.key_type().tag()];
                push_sized(&mut out, b);
                out
            }
        })
    }
}

/// A join key's value is of its type and at most `max_len` bytes.
fn check_value(key: &JoinKey, value: KeyValue<'_>, max_len: usize) -> Result<(), EntityKeyError> {
    if value.key_type() != key.ty {
        return Err(EntityKeyError::WrongType { join_key: key.name.clone(), want: key.ty, got: value.key_type() });
    }
    let len = match value {
        KeyValue::Int64(_) => 8,
        KeyValue::String(s) => s.len(),
        KeyValue::Bytes(b) => b.len(),
    };
    if len > max_len {
        return Err(EntityKeyError::TooLong { join_key: key.name.clone(), len, max: max_len });
    }
    Ok(())
}

/// The value of one join key, owned (decoded from a key).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OwnedKeyValue {
    Int64(i64),
    String(String),
    Bytes(Vec<u8>),
}

impl OwnedKeyValue {
    pub fn as_key_value(&self) -> KeyValue<'_> {
        match self {
            OwnedKeyValue::Int64(n) => KeyValue::Int64(*n),
            OwnedKeyValue::String(s) => KeyValue::String(s),
            OwnedKeyValue::Bytes(b) => KeyValue::Bytes(b),
        }
    }
}

fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

/// A value's length (4 bytes, big-endian) and bytes. Callers bound the
/// length (`max_len`) far below 4 GiB.
fn push_sized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&u32::try_from(bytes.len()).unwrap_or(u32::MAX).to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024;

    fn key(name: &str, ty: KeyType) -> JoinKey {
        JoinKey { name: name.into(), ty }
    }

    fn user_item() -> Entity {
        Entity::new("user_item", vec![key("user_id", KeyType::Int64), key("item_id", KeyType::String)])
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn a_single_string_key_is_its_own_bytes_so_nothing_moves() {
        let implicit = Entity::implicit();
        assert_eq!(implicit.encode([("entity_key", KeyValue::String("user:42"))], MAX), Ok(b"user:42".to_vec()));
        let item = Entity::new("item", vec![key("item_id", KeyType::String)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(item.encode([("item_id", KeyValue::String("grüße"))], MAX), Ok("grüße".as_bytes().to_vec()));
    }

    /// Golden values: a change here moves every composite key to another
    /// shard and another Redis slot.
    #[test]
    fn composite_keys_have_one_pinned_encoding() {
        let entity = user_item();
        let encoded = entity.encode([("user_id", KeyValue::Int64(7)), ("item_id", KeyValue::String("a"))], MAX);
        // 0xff, item_id (string "a"), then user_id (int64 7): names in byte order.
        assert_eq!(encoded.map(|e| hex(&e)), Ok("ff020000000161018000000000000007".to_owned()));
        let user = Entity::new("user", vec![key("user_id", KeyType::Int64)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            user.encode([("user_id", KeyValue::Int64(-1))], MAX).map(|e| hex(&e)),
            Ok("ff017fffffffffffffff".into())
        );
        assert_eq!(
            user.encode([("user_id", KeyValue::Int64(i64::MIN))], MAX).map(|e| hex(&e)),
            Ok("ff010000000000000000".into())
        );
        let blob = Entity::new("blob", vec![key("b", KeyType::Bytes)]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            blob.encode([("b", KeyValue::Bytes(&[0, 255]))], MAX).map(|e| hex(&e)),
            Ok("ff030000000200ff".into())
        );
    }

    #[test]
    fn the_order_join_keys_are_given_or_declared_in_does_not_matter() {
        let a = user_item();
        let b = Entity::new("user_item", vec![key("item_id", KeyType::String), key("user_id", KeyType::Int64)])
            .unwrap_or_else(|e| panic!("{e}"));
        let one = a.encode([("user_id", KeyValue::Int64(7)), ("item_id", KeyValue::String("a"))], MAX);
        let two = b.encode([("item_id", KeyValue::String("a")), ("user_id", KeyValue::Int64(7))], MAX);
        assert_eq!(one, two);
    }

    #[test]
    fn int64_keys_sort_as_numbers() {
        let user = Entity::new("user", vec![key("id", KeyType::Int64)]).unwrap_or_else(|e| panic!("{e}"));
        let encoded: Vec<Vec<u8>> = [i64::MIN, -2, -1, 0, 1, i64::MAX]
            .iter()
            .map(|&n| user.encode([("id", KeyValue::Int64(n))], MAX).unwrap_or_default())
            .collect();
        assert!(encoded.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn a_bad_key_names_what_is_wrong() {
        let entity = user_item();
        let only_user = entity.encode([("user_id", KeyValue::Int64(1))], MAX);
        assert_eq!(only_user, Err(EntityKeyError::Missing { entity: "user_item".into(), join_key: "item_id".into() }));
        let typo = entity.encode([("user", KeyValue::Int64(1))], MAX);
        assert_eq!(typo, Err(EntityKeyError::Unknown { entity: "user_item".into(), join_key: "user".into() }));
        let wrong = entity.encode([("user_id", KeyValue::String("7")), ("item_id", KeyValue::String("a"))], MAX);
        assert_eq!(wrong.map_err(|e| e.to_string()), Err("join key user_id is int64, not string".to_owned()));
        let twice = entity.encode(
            [("item_id", KeyValue::String("a")), ("item_id", KeyValue::String("b")), ("user_id", KeyValue::Int64(1))],
            MAX,
        );
        assert_eq!(twice, Err(EntityKeyError::Duplicate { join_key: "item_id".into() }));
        let long = "x".repeat(MAX + 1);
        let too_long = entity.encode([("item_id", KeyValue::String(&long)), ("user_id", KeyValue::Int64(1))], MAX);
        assert!(matches!(too_long, Err(EntityKeyError::TooLong { len, .. }) if len == MAX + 1));
    }

    #[test]
    fn a_key_reads_back_from_its_encoding_and_its_text() {
        let entity = user_item();
        let encoded = entity
            .encode([("user_id", KeyValue::Int64(-7)), ("item_id", KeyValue::String("ä,b"))], MAX)
            .unwrap_or_default();
        let values = vec![OwnedKeyValue::String("ä,b".into()), OwnedKeyValue::Int64(-7)];
        assert_eq!(entity.decode(&encoded), Some(values.clone()));
        let text = entity.key_text(&encoded);
        assert_eq!(text, hex(&encoded));
        assert_eq!(entity.parse_key_text(&text), Some(values));
        assert_eq!(entity.routing_bytes(&text).as_ref(), encoded.as_slice());
        // Not keys of this entity: truncated, trailing bytes, bad hex, a
        // bare string.
        assert_eq!(entity.decode(&encoded[..encoded.len() - 1]), None);
        assert_eq!(entity.decode(&[encoded.as_slice(), &[0]].concat()), None);
        assert_eq!(entity.parse_key_text("ff0g"), None);
        assert_eq!(entity.parse_key_text("user_1"), None);
        // One string join key: the text is the string, routed as it is.
        let implicit = Entity::implicit();
        assert_eq!(implicit.key_text(b"user_1"), "user_1");
        assert_eq!(implicit.routing_bytes("user_1").as_ref(), b"user_1");
        assert_eq!(implicit.parse_key_text("ff00"), Some(vec![OwnedKeyValue::String("ff00".into())]));
    }

    #[test]
    fn an_entity_needs_distinct_join_keys() {
        assert_eq!(Entity::new("none", vec![]), Err(EntityError::NoJoinKeys("none".into())));
        let twice = Entity::new("twice", vec![key("id", KeyType::Int64), key("id", KeyType::String)]);
        assert_eq!(twice, Err(EntityError::DuplicateJoinKey { entity: "twice".into(), join_key: "id".into() }));
    }
}
