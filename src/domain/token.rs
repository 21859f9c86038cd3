//! Spray tokens: three case-sensitive characters of `[A-Za-z0-9]`.
//!
//! Tokens are drawn from the operating system's CSPRNG, so they carry no order
//! and cannot be predicted from earlier ones. Uniqueness is not decided here:
//! the store's unique indexes decide it, and the service retries a collision with
//! a fresh token.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;

use rand::TryRng;
use rand::rngs::SysRng;
use serde::Serialize;

const ALPHABET: &[u8; 62] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";

/// A syntactically valid token. Whether a spray holds it is the store's business.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct Token(String);

impl Token {
    pub const LEN: usize = 3;

    pub fn parse(text: &str) -> Option<Token> {
        let valid = text.len() == Self::LEN && text.bytes().all(|b| b.is_ascii_alphanumeric());
        valid.then(|| Token(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The operating system refused to give us random bytes.
#[derive(Debug, thiserror::Error)]
#[error("the random source failed: {0}")]
pub struct RandomnessUnavailable(pub String);

/// Where new tokens come from. Production uses [`OsTokens`]; tests script them.
pub trait TokenSource: Send + Sync + 'static {
    fn draw(&self) -> Result<Token, RandomnessUnavailable>;
}

/// Tokens from the OS CSPRNG, uniform over the 62^3 possibilities.
#[derive(Debug, Default, Clone, Copy)]
pub struct OsTokens;

/// Random bytes asked of the OS at once for one token: one system call, where a byte at a
/// time was three or more (a create's `getrandom` calls were about 3% of its CPU on
/// SQLite, by `perf`: BENCHMARKS.md). A byte is thrown away with a chance of 8 in 256, so
/// eight bytes leave fewer than three only about once in 10^8 draws; then another eight
/// are asked for.
const BYTES_PER_DRAW: usize = 8;

impl TokenSource for OsTokens {
    fn draw(&self) -> Result<Token, RandomnessUnavailable> {
        loop {
            let mut bytes = [0u8; BYTES_PER_DRAW];
            SysRng
                .try_fill_bytes(&mut bytes)
                .map_err(|e| RandomnessUnavailable(e.to_string()))?;
            if let Some(token) = token_from_bytes(&bytes) {
                return Ok(token);
            }
        }
    }
}

/// The token the first accepted bytes spell, by rejection sampling: 248 = 4 * 62, so the
/// bytes 0..248 map evenly onto the alphabet and the 8 values above are thrown away. None
/// when fewer than three bytes are accepted.
fn token_from_bytes(bytes: &[u8]) -> Option<Token> {
    let token: String = bytes
        .iter()
        .filter(|&&byte| byte < 248)
        .take(Token::LEN)
        .map(|&byte| char::from(ALPHABET[usize::from(byte % 62)]))
        .collect();
    (token.len() == Token::LEN).then_some(Token(token))
}

/// Hands out a fixed list of tokens, then falls back to the OS source. For tests that
/// need a collision or a known token.
#[derive(Debug, Default)]
pub struct ScriptedTokens {
    next: Mutex<VecDeque<Token>>,
}

impl ScriptedTokens {
    pub fn new<I: IntoIterator<Item = &'static str>>(tokens: I) -> ScriptedTokens {
        let next = tokens
            .into_iter()
            .filter_map(Token::parse)
            .collect::<VecDeque<_>>();
        ScriptedTokens {
            next: Mutex::new(next),
        }
    }

    /// Queues more tokens to be handed out before the OS source is used again.
    pub fn push(&self, token: &str) {
        if let (Some(token), Ok(mut next)) = (Token::parse(token), self.next.lock()) {
            next.push_back(token);
        }
    }
}

impl TokenSource for ScriptedTokens {
    fn draw(&self) -> Result<Token, RandomnessUnavailable> {
        let scripted = self.next.lock().ok().and_then(|mut next| next.pop_front());
        match scripted {
            Some(token) => Ok(token),
            None => OsTokens.draw(),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn tokens_are_exactly_three_ascii_alphanumerics() {
        for good in ["IEY", "a1Z", "000", "zzz"] {
            assert!(Token::parse(good).is_some(), "{good:?}");
        }
        for bad in ["", "AB", "ABCD", "AB-", "AB ", "ÄBC", "A\u{0}B", "é1"] {
            assert!(Token::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn os_tokens_are_valid_and_spread_over_the_alphabet() {
        let drawn: Vec<Token> = (0..2000).map(|_| OsTokens.draw().unwrap()).collect();
        assert!(drawn.iter().all(|t| Token::parse(t.as_str()).is_some()));
        // 2,000 draws from 238,328 tokens: a handful of repeats at most; a
        // sequence or a clock-based source would show far fewer distinct values
        // or an order.
        let distinct: HashSet<_> = drawn.iter().collect();
        assert!(distinct.len() > 1950, "only {} distinct", distinct.len());
        let chars: HashSet<char> = drawn.iter().flat_map(|t| t.as_str().chars()).collect();
        assert_eq!(chars.len(), 62, "every character of the alphabet appears");
        let sorted = drawn.windows(2).all(|w| w[0].as_str() <= w[1].as_str());
        assert!(!sorted, "tokens must not come in order");
    }

    #[test]
    fn a_token_is_spelled_by_the_first_accepted_bytes_and_the_top_eight_are_thrown_away() {
        // 0 -> 'A', 61 -> '9', 62 -> 'A' again (62 % 62), 247 -> 247 % 62 = 61 -> '9'.
        assert_eq!(token_from_bytes(&[0, 61, 62, 5]).unwrap().as_str(), "A9A");
        assert_eq!(
            token_from_bytes(&[248, 255, 0, 250, 247, 1]).unwrap().as_str(),
            "A9B"
        );
        assert!(
            token_from_bytes(&[1, 248, 2, 255]).is_none(),
            "two accepted bytes are not a token"
        );
        assert!(token_from_bytes(&[]).is_none());
    }

    #[test]
    fn every_accepted_byte_value_maps_onto_the_alphabet_evenly() {
        let mut hits = [0u32; 62];
        for byte in 0u8..248 {
            let token = token_from_bytes(&[byte, byte, byte]).unwrap();
            let c = token.as_str().as_bytes()[0];
            let index = ALPHABET.iter().position(|&a| a == c).unwrap();
            hits[index] += 1;
        }
        assert!(hits.iter().all(|&n| n == 4), "{hits:?}");
    }

    #[test]
    fn scripted_tokens_come_first_then_random_ones() {
        let tokens = ScriptedTokens::new(["AAA", "BBB"]);
        assert_eq!(tokens.draw().unwrap().as_str(), "AAA");
        assert_eq!(tokens.draw().unwrap().as_str(), "BBB");
        assert!(Token::parse(tokens.draw().unwrap().as_str()).is_some());
    }
}
