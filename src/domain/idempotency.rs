//! Idempotent retries: the key a client sends, the endpoint it is scoped to, and the
//! fingerprint that tells "the same request again" from "a different request under the
//! same key". Plain Rust, no I/O.

use std::fmt;

use serde_json::Value;
use sha2::{Digest, Sha256};

/// An `Idempotency-Key`: 1 to 255 visible ASCII characters (0x21 to 0x7E).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub const MAX_LEN: usize = 255;

    pub fn parse(text: &str) -> Option<IdempotencyKey> {
        let valid =
            (1..=Self::MAX_LEN).contains(&text.len()) && text.bytes().all(|b| (0x21..=0x7E).contains(&b));
        valid.then(|| IdempotencyKey(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The endpoints that honour `Idempotency-Key`. A key is scoped to (user, endpoint): the
/// same key sent to both endpoints names two independent requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// `POST /api/v1/spray`.
    Spray,
    /// `POST /api/v1/receive`.
    Receive,
}

impl Endpoint {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::Spray => "spray",
            Endpoint::Receive => "receive",
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What makes two requests "the same" for the contract: their JSON bodies are equal as
/// values, and their effective rooms are equal. Kept as a SHA-256 digest, so that a row
/// stays small whatever the body's size (up to 16 KiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// The fingerprint of a request whose body parsed as `body` and whose effective room
    /// is `room` (the header's room, else the body's; `None` when neither gives one).
    ///
    /// The body is hashed in a canonical form (object keys sorted, no insignificant
    /// whitespace, strings re-escaped one way), so bodies that are equal as JSON values
    /// hash alike however they were spelled. The room comes first, on its own line: a
    /// room is visible ASCII, so it cannot contain the newline that ends it.
    pub fn of(body: &Value, room: Option<&str>) -> Fingerprint {
        let mut text = match room {
            Some(room) => format!("room:{room}\n"),
            None => "no room\n".to_owned(),
        };
        write_canonical(body, &mut text);
        Fingerprint(Sha256::digest(text.as_bytes()).into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A fingerprint read back from the store; `None` unless it is 32 bytes.
    pub fn from_stored(bytes: &[u8]) -> Option<Fingerprint> {
        <[u8; 32]>::try_from(bytes).ok().map(Fingerprint)
    }
}

/// Writes `value` as JSON with every object's keys in sorted order. Sorting here, rather
/// than relying on serde_json's default sorted map, keeps the fingerprint stable even if
/// some dependency turns on serde_json's `preserve_order` feature.
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (index, (key, item)) in entries.into_iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(item, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (index, item) in items.iter().enumerate() {
                if index > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn keys_are_one_to_255_visible_ascii_characters() {
        let longest = "k".repeat(255);
        for good in ["a", "retry-1", "~!#$%&'*+-.^_`|", longest.as_str()] {
            assert!(IdempotencyKey::parse(good).is_some(), "{good:?}");
        }
        let too_long = "k".repeat(256);
        for bad in [
            "",
            " ",
            "a b",
            "tab\there",
            "ключ",
            "nul\0",
            "del\u{7f}",
            too_long.as_str(),
        ] {
            assert!(IdempotencyKey::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn bodies_equal_as_values_have_one_fingerprint() {
        let a: Value = serde_json::from_str(r#"{"amount": 10, "recipient_count": 2}"#).unwrap();
        let b: Value = serde_json::from_str("{\"recipient_count\":2,\n \"amount\":10}").unwrap();
        let c: Value = serde_json::from_str(r#"{"amount": 10, "recipient_count": "\u0032"}"#).unwrap();
        assert_eq!(Fingerprint::of(&a, Some("R")), Fingerprint::of(&b, Some("R")));
        assert_ne!(Fingerprint::of(&a, Some("R")), Fingerprint::of(&c, Some("R")));
        // Nested objects are sorted too.
        let nested_a = json!({"x": {"b": 1, "a": [1, {"d": 2, "c": 3}]}});
        let nested_b: Value = serde_json::from_str(r#"{"x":{"a":[1,{"c":3,"d":2}],"b":1}}"#).unwrap();
        assert_eq!(Fingerprint::of(&nested_a, None), Fingerprint::of(&nested_b, None));
    }

    #[test]
    fn the_effective_room_is_part_of_the_fingerprint() {
        let body = json!({"token": "abc"});
        assert_ne!(
            Fingerprint::of(&body, Some("R1")),
            Fingerprint::of(&body, Some("R2"))
        );
        assert_ne!(Fingerprint::of(&body, Some("R1")), Fingerprint::of(&body, None));
        // A room cannot be smuggled into the body's part, or the other way round.
        let tricky = json!("x");
        assert_ne!(
            Fingerprint::of(&tricky, Some("R")),
            Fingerprint::of(&json!("R\nx"), None)
        );
    }

    #[test]
    fn a_stored_fingerprint_must_be_32_bytes() {
        let f = Fingerprint::of(&json!({}), None);
        assert_eq!(Fingerprint::from_stored(f.as_bytes()), Some(f));
        assert_eq!(Fingerprint::from_stored(&[0; 31]), None);
    }
}
