//! A request to spray money, parsed once at the edge: a [`SprayCommand`] can only be made
//! by [`SprayCommand::parse`], which checks the [`Policy`]'s limits, so the service and the
//! store never see an amount or a count they would have to refuse.

use std::fmt;

use super::amount::Amount;
use super::ids::{RoomId, UserId};
use super::split::SplitMode;

/// The business limits of this deployment, checked once at start-up (see
/// `Settings::policy`).
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub receive_window: chrono::TimeDelta,
    pub lookup_window: chrono::TimeDelta,
    pub max_amount: Amount,
    pub max_recipients: u32,
    /// A pending idempotency row untouched this long (by the service clock) may be taken
    /// over by a retry of the same request.
    pub idempotency_lease: chrono::TimeDelta,
}

/// How many shares a spray has: 1 to the policy's `max_recipients`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecipientCount(u32);

impl RecipientCount {
    /// `count` when it is within the policy's limits.
    pub fn parse(count: u64, policy: &Policy) -> Option<RecipientCount> {
        u32::try_from(count)
            .ok()
            .filter(|count| (1..=policy.max_recipients).contains(count))
            .map(RecipientCount)
    }

    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for RecipientCount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A spray the policy allows: an amount within its limits, split into a count of shares
/// that each get at least 1.
#[derive(Debug, Clone)]
pub struct SprayCommand {
    owner: UserId,
    room: RoomId,
    amount: Amount,
    recipient_count: RecipientCount,
    mode: SplitMode,
}

impl SprayCommand {
    /// Checks, in this order: the amount's range, the count's range, and that the amount
    /// gives every share at least 1. The message says what to send instead.
    pub fn parse(
        owner: UserId,
        room: RoomId,
        amount: u64,
        recipient_count: u64,
        mode: SplitMode,
        policy: &Policy,
    ) -> Result<SprayCommand, String> {
        let amount = Amount::new(amount);
        if amount.units() < 1 || amount > policy.max_amount {
            return Err(format!("amount must be between 1 and {}", policy.max_amount));
        }
        let Some(count) = RecipientCount::parse(recipient_count, policy) else {
            return Err(format!(
                "recipient_count must be between 1 and {}",
                policy.max_recipients
            ));
        };
        if amount.units() < u64::from(count.get()) {
            return Err(format!(
                "amount ({amount}) must be at least recipient_count ({count}), so that every share is at least 1"
            ));
        }
        Ok(SprayCommand {
            owner,
            room,
            amount,
            recipient_count: count,
            mode,
        })
    }

    pub fn owner(&self) -> UserId {
        self.owner
    }

    pub fn room(&self) -> &RoomId {
        &self.room
    }

    pub fn amount(&self) -> Amount {
        self.amount
    }

    pub fn recipient_count(&self) -> RecipientCount {
        self.recipient_count
    }

    pub fn mode(&self) -> SplitMode {
        self.mode
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            receive_window: chrono::TimeDelta::minutes(10),
            lookup_window: chrono::TimeDelta::days(7),
            max_amount: Amount::new(1_000),
            max_recipients: 10,
            idempotency_lease: chrono::TimeDelta::seconds(10),
        }
    }

    fn parse(amount: u64, count: u64) -> Result<SprayCommand, String> {
        SprayCommand::parse(
            UserId::from_stored(1).unwrap(),
            RoomId::parse("R").unwrap(),
            amount,
            count,
            SplitMode::Even,
            &policy(),
        )
    }

    #[test]
    fn a_command_within_the_policy_is_made() {
        let command = parse(1_000, 10).unwrap();
        assert_eq!(
            (command.amount(), command.recipient_count().get()),
            (Amount::new(1_000), 10)
        );
        assert!(parse(1, 1).is_ok());
    }

    #[test]
    fn each_limit_is_refused_with_what_to_send_instead() {
        let cases = [
            (0, 1, "amount must be between 1 and 1000"),
            (1_001, 1, "amount must be between 1 and 1000"),
            (10, 0, "recipient_count must be between 1 and 10"),
            (10, 11, "recipient_count must be between 1 and 10"),
            (10, u64::MAX, "recipient_count must be between 1 and 10"),
            (
                5,
                6,
                "amount (5) must be at least recipient_count (6), so that every share is at least 1",
            ),
        ];
        for (amount, count, message) in cases {
            assert_eq!(parse(amount, count).unwrap_err(), message, "{amount} / {count}");
        }
    }
}
