//! Conversions between stored columns and domain types, shared by every backend.
//!
//! Times are stored as milliseconds since the Unix epoch, money and ids as signed 64-bit
//! integers. A stored value the domain refuses is reported as corruption, never guessed.

use chrono::{DateTime, Utc};

use super::StoreError;
use crate::domain::{Amount, Receipt, RoomId, Settlement, SplitMode, SprayRecord, Token, UserId};

pub(crate) fn millis(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

pub(crate) fn time_from(ms: i64) -> Result<DateTime<Utc>, StoreError> {
    DateTime::from_timestamp_millis(ms).ok_or_else(|| StoreError::Corrupt(format!("time {ms} out of range")))
}

pub(crate) fn stored(amount: Amount) -> Result<i64, StoreError> {
    amount
        .to_stored()
        .ok_or_else(|| StoreError::Other(format!("amount {amount} does not fit the store")))
}

pub(crate) fn amount_from(units: i64) -> Result<Amount, StoreError> {
    Amount::from_stored(units).ok_or_else(|| StoreError::Corrupt(format!("negative amount {units}")))
}

pub(crate) fn user_from(id: i64) -> Result<UserId, StoreError> {
    UserId::from_stored(id).ok_or_else(|| StoreError::Corrupt(format!("bad user id {id}")))
}

/// The `(slot, amount)` rows of a new spray's shares; slot 0 is received first.
pub(crate) fn share_rows(shares: &[Amount]) -> Result<Vec<(i64, i64)>, StoreError> {
    shares
        .iter()
        .enumerate()
        .map(|(slot, amount)| {
            let slot = i64::try_from(slot).map_err(|e| StoreError::Other(e.to_string()))?;
            Ok((slot, stored(*amount)?))
        })
        .collect()
}

/// The columns every backend selects for a spray, in this order.
pub(crate) const SPRAY_COLUMNS: &str = "id, room_id, token, owner_id, mode, total_amount, recipient_count, \
                                 created_at, receive_until, lookup_until, settled_at, refunded_amount";

/// A spray row as selected with [`SPRAY_COLUMNS`].
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SprayRow {
    pub(crate) id: i64,
    pub(crate) room_id: String,
    pub(crate) token: String,
    pub(crate) owner_id: i64,
    pub(crate) mode: String,
    pub(crate) total_amount: i64,
    pub(crate) recipient_count: i64,
    pub(crate) created_at: i64,
    pub(crate) receive_until: i64,
    pub(crate) lookup_until: i64,
    pub(crate) settled_at: Option<i64>,
    pub(crate) refunded_amount: Option<i64>,
}

/// A received share as `(receiver_id, amount, received_at)`.
pub(crate) type ReceiptRow = (i64, i64, i64);

impl SprayRow {
    pub(crate) fn into_record(self, receipts: Vec<ReceiptRow>) -> Result<SprayRecord, StoreError> {
        let id = self.id;
        let corrupt = |what: &str| StoreError::Corrupt(format!("spray {id}: bad {what}"));
        let receipts = receipts
            .into_iter()
            .map(|(user, amount, at)| {
                Ok(Receipt {
                    user: user_from(user)?,
                    amount: amount_from(amount)?,
                    received_at: time_from(at)?,
                })
            })
            .collect::<Result<Vec<_>, StoreError>>()?;
        let settlement = match (self.settled_at, self.refunded_amount) {
            (None, None) => None,
            (Some(at), Some(refunded)) => Some(Settlement {
                at: time_from(at)?,
                refunded: amount_from(refunded)?,
            }),
            _ => return Err(corrupt("settlement")),
        };
        Ok(SprayRecord {
            token: Token::parse(&self.token).ok_or_else(|| corrupt("token"))?,
            room: RoomId::parse(&self.room_id).ok_or_else(|| corrupt("room"))?,
            owner: user_from(self.owner_id)?,
            mode: SplitMode::parse(&self.mode).ok_or_else(|| corrupt("mode"))?,
            total_amount: amount_from(self.total_amount)?,
            recipient_count: u32::try_from(self.recipient_count).map_err(|_| corrupt("recipient count"))?,
            created_at: time_from(self.created_at)?,
            receive_until: time_from(self.receive_until)?,
            lookup_until: time_from(self.lookup_until)?,
            receipts,
            settlement,
        })
    }
}

/// One row of a lookup: the spray, and one of its receipts if it has any (the receipt
/// columns of a `LEFT JOIN`, all NULL when nobody has received yet).
#[derive(Debug, sqlx::FromRow)]
pub(crate) struct SprayWithReceipt {
    #[sqlx(flatten)]
    pub(crate) spray: SprayRow,
    pub(crate) slot: Option<i64>,
    pub(crate) receiver_id: Option<i64>,
    pub(crate) amount: Option<i64>,
    pub(crate) received_at: Option<i64>,
}

/// The spray of a lookup's rows with its receipts in order of receipt (time, then slot);
/// `None` for no rows.
pub(crate) fn spray_with_receipts(rows: Vec<SprayWithReceipt>) -> Result<Option<SprayRecord>, StoreError> {
    let mut receipts = Vec::with_capacity(rows.len());
    for row in &rows {
        match (row.slot, row.receiver_id, row.amount, row.received_at) {
            (Some(slot), Some(user), Some(amount), Some(at)) => receipts.push((at, slot, user, amount)),
            // The one row of a spray nobody has received (LEFT JOIN).
            (None, None, None, None) => {}
            _ => {
                return Err(StoreError::Corrupt(format!(
                    "spray {}: bad receipt",
                    row.spray.id
                )));
            }
        }
    }
    let Some(first) = rows.into_iter().next() else {
        return Ok(None);
    };
    receipts.sort_unstable();
    let receipts = receipts
        .into_iter()
        .map(|(at, _slot, user, amount)| (user, amount, at))
        .collect();
    first.spray.into_record(receipts).map(Some)
}

/// The spray row of a gate snapshot:
/// `(id, owner_id, receive_until, lookup_until, recipient_count)`.
pub(crate) type ClaimSprayRow = (i64, i64, i64, i64, i64);

pub(crate) fn claim_snapshot_from(
    (spray_id, owner, receive_until, lookup_until, count): ClaimSprayRow,
    free_slots: Vec<i64>,
    receivers: Vec<(i64, i64)>,
) -> Result<crate::store::ClaimSnapshot, StoreError> {
    Ok(crate::store::ClaimSnapshot {
        spray_id,
        owner: user_from(owner)?,
        receive_until: time_from(receive_until)?,
        lookup_until: time_from(lookup_until)?,
        recipient_count: u32::try_from(count)
            .map_err(|_| StoreError::Corrupt(format!("spray {spray_id}: count")))?,
        free_slots,
        receivers: receivers
            .into_iter()
            .map(|(user, slot)| Ok((user_from(user)?, slot)))
            .collect::<Result<_, StoreError>>()?,
    })
}

/// Sums stored amounts, refusing negative values and overflow as corruption.
pub(crate) fn sum_amounts(spray_id: i64, units: Vec<i64>) -> Result<Amount, StoreError> {
    let amounts = units
        .into_iter()
        .map(amount_from)
        .collect::<Result<Vec<_>, _>>()?;
    Amount::try_sum(amounts)
        .ok_or_else(|| StoreError::Corrupt(format!("spray {spray_id}: the free shares overflow")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(receipt: Option<(i64, i64, i64)>) -> SprayWithReceipt {
        SprayWithReceipt {
            spray: SprayRow {
                id: 1,
                room_id: "room".into(),
                token: "aZ9".into(),
                owner_id: 1,
                mode: "even".into(),
                total_amount: 30,
                recipient_count: 3,
                created_at: 1_000,
                receive_until: 2_000,
                lookup_until: 3_000,
                settled_at: None,
                refunded_amount: None,
            },
            slot: receipt.map(|(slot, _, _)| slot),
            receiver_id: receipt.map(|(_, user, _)| user),
            amount: receipt.map(|_| 10),
            received_at: receipt.map(|(_, _, at)| at),
        }
    }

    /// The lookup's statement returns the receipts in no particular order (it has no
    /// `ORDER BY`, see `find_in`): they are put in order of receipt here, ties by slot.
    #[test]
    fn receipts_come_in_order_of_receipt_then_slot() {
        let rows = vec![
            row(Some((0, 7, 1_500))),
            row(Some((2, 8, 1_200))),
            row(Some((1, 9, 1_200))),
        ];
        let record = spray_with_receipts(rows).unwrap().unwrap();
        let order: Vec<i64> = record.receipts.iter().map(|r| r.user.get()).collect();
        assert_eq!(order, [9, 8, 7]);
    }

    #[test]
    fn a_spray_nobody_received_has_no_receipts_and_no_rows_is_none() {
        let record = spray_with_receipts(vec![row(None)]).unwrap().unwrap();
        assert!(record.receipts.is_empty());
        assert!(spray_with_receipts(Vec::new()).unwrap().is_none());
    }

    #[test]
    fn a_half_null_receipt_is_corrupt() {
        let mut half = row(Some((0, 7, 1_500)));
        half.received_at = None;
        assert!(matches!(
            spray_with_receipts(vec![half]),
            Err(StoreError::Corrupt(_))
        ));
    }
}
