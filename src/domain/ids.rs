//! Who is asking and where: the user id and the room id from the gateway.

use std::fmt;

use serde::Serialize;

/// A user id: a decimal integer from 1 to 2^63-1, written without sign or leading zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UserId(i64);

impl UserId {
    /// Parses the `X-USER-ID` header value. Only the canonical decimal spelling is
    /// accepted, so one user has exactly one spelling (no `+1`, `01` or ` 1`).
    pub fn parse(text: &str) -> Option<UserId> {
        let canonical =
            !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) && !text.starts_with('0');
        if !canonical {
            return None;
        }
        text.parse::<i64>().ok().and_then(UserId::from_stored)
    }

    /// A user id read back from the store.
    pub fn from_stored(id: i64) -> Option<UserId> {
        (id >= 1).then_some(UserId(id))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl fmt::Display for UserId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A chat room id: 1 to 64 visible ASCII characters (0x21 to 0x7E), case-sensitive.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RoomId(String);

impl RoomId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(text: &str) -> Option<RoomId> {
        let valid =
            (1..=Self::MAX_LEN).contains(&text.len()) && text.bytes().all(|b| (0x21..=0x7E).contains(&b));
        valid.then(|| RoomId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for RoomId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_canonical_positive_decimals() {
        for good in ["1", "42", "9223372036854775807"] {
            assert!(UserId::parse(good).is_some(), "{good:?} should parse");
        }
        for bad in [
            "",
            "0",
            "01",
            "+1",
            "-1",
            " 1",
            "1 ",
            "1.0",
            "1e3",
            "abc",
            "9223372036854775808",
            "99999999999999999999999",
            "٣",
        ] {
            assert!(UserId::parse(bad).is_none(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn room_ids_are_one_to_sixty_four_visible_ascii_characters() {
        assert!(RoomId::parse("TEST-ROOM-1").is_some());
        assert!(RoomId::parse(&"r".repeat(64)).is_some());
        assert!(RoomId::parse("!~").is_some());
        for bad in ["", " ", "a b", "tab\t", "é", "\u{7f}"] {
            assert!(RoomId::parse(bad).is_none(), "{bad:?} should be refused");
        }
        assert!(RoomId::parse(&"r".repeat(65)).is_none());
    }
}
