//! Key names. All keys of one spray share one hash tag, so a script touching them runs on
//! one Redis Cluster slot.

use crate::domain::{RoomId, Token};

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct GateKeys {
    pub meta: String,
    pub free: String,
    pub receivers: String,
    /// The holds not yet confirmed as recorded in SQL: a sorted set of `slot:user`,
    /// scored by the time (ms, service clock) the slot was handed out.
    pub holds: String,
}

impl GateKeys {
    pub fn new(prefix: &str, room: &RoomId, token: &Token) -> GateKeys {
        // Rooms may contain `{` and `}`, which would end the hash tag early (or leave it
        // empty, so that Redis hashes the whole key and the keys scatter): escape them.
        let room = room
            .as_str()
            .replace('%', "%25")
            .replace('{', "%7B")
            .replace('}', "%7D");
        let tag = format!("{prefix}:{{{room}:{token}}}");
        GateKeys {
            meta: format!("{tag}:meta"),
            free: format!("{tag}:free"),
            receivers: format!("{tag}:recv"),
            holds: format!("{tag}:held"),
        }
    }

    pub fn all(&self) -> [&str; 4] {
        [&self.meta, &self.free, &self.receivers, &self.holds]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_tag(key: &str) -> &str {
        let open = key.find('{').unwrap();
        let close = open + 1 + key[open + 1..].find('}').unwrap();
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_a_spray_has_the_same_non_empty_hash_tag() {
        for room in ["TEST-ROOM-1", "}x", "{", "a{b}c", "%7B", "}}{{"] {
            let keys = GateKeys::new(
                "spray",
                &RoomId::parse(room).unwrap(),
                &Token::parse("abc").unwrap(),
            );
            let tags: Vec<&str> = keys.all().iter().map(|k| hash_tag(k)).collect();
            assert!(!tags[0].is_empty(), "{room}");
            assert!(tags.iter().all(|t| *t == tags[0]), "{room}: {tags:?}");
        }
        // Distinct rooms never share keys, even when escaping is involved.
        let a = GateKeys::new("p", &RoomId::parse("%7B").unwrap(), &Token::parse("abc").unwrap());
        let b = GateKeys::new("p", &RoomId::parse("{").unwrap(), &Token::parse("abc").unwrap());
        assert_ne!(a, b);
    }
}
