//! A spray as the sprayer sees it, with the parts derived from the clock.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::amount::Amount;
use super::ids::{RoomId, UserId};
use super::rules::window_open;
use super::split::SplitMode;
use super::token::Token;

/// Where a spray stands at a given moment. Derived from the stored deadline and the
/// clock, never from when a background job last ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SprayStatus {
    /// The window is open and shares are left.
    Active,
    /// Every share has been received.
    Completed,
    /// The window closed with shares left; those go back to the sprayer.
    Expired,
}

/// One received share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Receipt {
    pub user: UserId,
    pub amount: Amount,
    pub received_at: DateTime<Utc>,
}

/// A spray as stored, with its receipts in order of receipt.
#[derive(Debug, Clone)]
pub struct SprayRecord {
    pub token: Token,
    pub room: RoomId,
    pub owner: UserId,
    pub mode: SplitMode,
    pub total_amount: Amount,
    pub recipient_count: u32,
    pub created_at: DateTime<Utc>,
    pub receive_until: DateTime<Utc>,
    pub lookup_until: DateTime<Utc>,
    pub receipts: Vec<Receipt>,
}

/// The derived state of a spray at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SprayState {
    pub status: SprayStatus,
    pub received_amount: Amount,
    pub refunded_amount: Amount,
}

/// The stored receipts add up to more than the spray: the store is corrupt.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the receipts of a spray exceed its amount")]
pub struct InconsistentSpray;

impl SprayRecord {
    pub fn state_at(&self, now: DateTime<Utc>) -> Result<SprayState, InconsistentSpray> {
        let received_amount =
            Amount::try_sum(self.receipts.iter().map(|r| r.amount)).ok_or(InconsistentSpray)?;
        let left = self
            .total_amount
            .checked_sub(received_amount)
            .ok_or(InconsistentSpray)?;
        let all_received = u32::try_from(self.receipts.len()).is_ok_and(|n| n >= self.recipient_count);
        let (status, refunded_amount) = if all_received {
            (SprayStatus::Completed, Amount::ZERO)
        } else if window_open(now, self.receive_until) {
            (SprayStatus::Active, Amount::ZERO)
        } else {
            (SprayStatus::Expired, left)
        };
        Ok(SprayState {
            status,
            received_amount,
            refunded_amount,
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;

    fn record(receipts: &[u64]) -> SprayRecord {
        let t0 = DateTime::UNIX_EPOCH;
        SprayRecord {
            token: Token::parse("abc").unwrap(),
            room: RoomId::parse("room").unwrap(),
            owner: UserId::from_stored(1).unwrap(),
            mode: SplitMode::Even,
            total_amount: Amount::new(100),
            recipient_count: 3,
            created_at: t0,
            receive_until: t0 + TimeDelta::minutes(10),
            lookup_until: t0 + TimeDelta::days(7),
            receipts: receipts
                .iter()
                .zip(2..)
                .map(|(&amount, user)| Receipt {
                    user: UserId::from_stored(user).unwrap(),
                    amount: Amount::new(amount),
                    received_at: t0,
                })
                .collect(),
        }
    }

    #[test]
    fn status_follows_the_clock_and_the_receipts() {
        let closes = DateTime::UNIX_EPOCH + TimeDelta::minutes(10);
        let before = closes - TimeDelta::milliseconds(1);
        let open = record(&[33]).state_at(before).unwrap();
        assert_eq!(
            (open.status, open.refunded_amount),
            (SprayStatus::Active, Amount::ZERO)
        );
        let expired = record(&[33]).state_at(closes).unwrap();
        assert_eq!(expired.status, SprayStatus::Expired);
        assert_eq!(expired.refunded_amount, Amount::new(67));
        let done = record(&[33, 33, 34]).state_at(closes).unwrap();
        assert_eq!(
            (done.status, done.refunded_amount),
            (SprayStatus::Completed, Amount::ZERO)
        );
        assert_eq!(done.received_amount, Amount::new(100));
    }

    #[test]
    fn receipts_over_the_amount_are_reported_not_wrapped() {
        assert!(record(&[60, 60]).state_at(DateTime::UNIX_EPOCH).is_err());
    }
}
