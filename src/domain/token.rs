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

impl TokenSource for OsTokens {
    fn draw(&self) -> Result<Token, RandomnessUnavailable> {
        let mut token = String::with_capacity(Token::LEN);
        while token.len() < Token::LEN {
            let mut byte = [0u8; 1];
            SysRng
                .try_fill_bytes(&mut byte)
                .map_err(|e| RandomnessUnavailable(e.to_string()))?;
            // Rejection sampling: 248 = 4 * 62, so the bytes 0..248 map evenly
            // onto the alphabet and the 8 values above are thrown away.
            if byte[0] < 248 {
                token.push(char::from(ALPHABET[usize::from(byte[0] % 62)]));
            }
        }
        Ok(Token(token))
    }
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
    fn scripted_tokens_come_first_then_random_ones() {
        let tokens = ScriptedTokens::new(["AAA", "BBB"]);
        assert_eq!(tokens.draw().unwrap().as_str(), "AAA");
        assert_eq!(tokens.draw().unwrap().as_str(), "BBB");
        assert!(Token::parse(tokens.draw().unwrap().as_str()).is_some());
    }
}
