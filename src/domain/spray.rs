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
    /// Set once the sweeper has settled the spray after its receive window.
    pub settlement: Option<Settlement>,
}

/// A settled spray: when the sweeper settled it, and what it refunded (0 when every share
/// had been received).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settlement {
    pub at: DateTime<Utc>,
    pub refunded: Amount,
}

/// The derived state of a spray at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SprayState {
    pub status: SprayStatus,
    pub received_amount: Amount,
    pub refunded_amount: Amount,
}

/// The stored receipts add up to more than the spray, or disagree with its stored
/// settlement: the store is corrupt.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("the receipts of a spray exceed its amount or disagree with its settlement")]
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
        // A settled spray's window is closed whatever `now` says (the instance answering may
        // run a clock a little behind the sweeper's), and the refund it shows is the one
        // stored, which must be what the receipts leave.
        let settled = self.settlement.is_some();
        let (status, refunded_amount) = if all_received {
            (SprayStatus::Completed, Amount::ZERO)
        } else if window_open(now, self.receive_until) && !settled {
            (SprayStatus::Active, Amount::ZERO)
        } else {
            (SprayStatus::Expired, left)
        };
        if self.settlement.is_some_and(|s| s.refunded != refunded_amount) {
            return Err(InconsistentSpray);
        }
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
            settlement: None,
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

    #[test]
    fn a_settled_spray_shows_its_stored_refund_and_is_closed_whatever_the_clock() {
        let closes = DateTime::UNIX_EPOCH + TimeDelta::minutes(10);
        let mut settled = record(&[33]);
        settled.settlement = Some(Settlement {
            at: closes,
            refunded: Amount::new(67),
        });
        let state = settled.state_at(closes).unwrap();
        assert_eq!(
            (state.status, state.refunded_amount),
            (SprayStatus::Expired, Amount::new(67))
        );
        // An instance whose clock lags the sweeper's still shows it closed.
        let lagging = settled.state_at(closes - TimeDelta::milliseconds(1)).unwrap();
        assert_eq!(lagging, state);
        let mut completed = record(&[33, 33, 34]);
        completed.settlement = Some(Settlement {
            at: closes,
            refunded: Amount::ZERO,
        });
        assert_eq!(completed.state_at(closes).unwrap().status, SprayStatus::Completed);
    }

    #[test]
    fn a_stored_refund_that_disagrees_with_the_receipts_is_reported() {
        let closes = DateTime::UNIX_EPOCH + TimeDelta::minutes(10);
        let mut wrong = record(&[33]);
        wrong.settlement = Some(Settlement {
            at: closes,
            refunded: Amount::new(66),
        });
        assert!(wrong.state_at(closes).is_err());
        let mut refunded_though_complete = record(&[33, 33, 34]);
        refunded_though_complete.settlement = Some(Settlement {
            at: closes,
            refunded: Amount::new(1),
        });
        assert!(refunded_though_complete.state_at(closes).is_err());
    }
}
