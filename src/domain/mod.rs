//! The domain: amounts, identities, tokens, the split and the rules. Plain Rust, no I/O.

pub mod amount;
pub mod command;
pub mod idempotency;
pub mod ids;
pub mod rules;
pub mod split;
pub mod spray;
pub mod token;

pub use amount::Amount;
pub use command::{Policy, RecipientCount, SprayCommand};
pub use idempotency::{Endpoint, Fingerprint, IdempotencyKey};
pub use ids::{RoomId, UserId};
pub use rules::{LookupRefusal, LookupScope, ReceiveFacts, ReceiveRefusal};
pub use split::{OsRandomness, SeededRandomness, SplitMode, SplitRandomness, split_evenly, split_randomly};
pub use spray::{Receipt, Settlement, SprayRecord, SprayState, SprayStatus};
pub use token::{OsTokens, ScriptedTokens, Token, TokenSource};
