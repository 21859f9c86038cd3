//! Money: a non-negative whole number of the smallest currency unit.
//!
//! `Amount` has no arithmetic operators on purpose: every sum or difference goes
//! through a `checked_*` method, so an overflow is an error the caller must handle,
//! never a silent wrap or a panic.

use serde::Serialize;

/// A non-negative amount of money, in the smallest unit of the currency.
///
/// The store keeps amounts in signed 64-bit columns, so an `Amount` that came
/// through [`Amount::from_stored`] is at most `i64::MAX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Amount(u64);

impl Amount {
    pub const ZERO: Amount = Amount(0);

    pub const fn new(units: u64) -> Amount {
        Amount(units)
    }

    pub const fn units(self) -> u64 {
        self.0
    }

    pub fn checked_add(self, other: Amount) -> Option<Amount> {
        self.0.checked_add(other.0).map(Amount)
    }

    pub fn checked_sub(self, other: Amount) -> Option<Amount> {
        self.0.checked_sub(other.0).map(Amount)
    }

    /// Sums amounts, `None` on overflow.
    pub fn try_sum<I: IntoIterator<Item = Amount>>(amounts: I) -> Option<Amount> {
        amounts
            .into_iter()
            .try_fold(Amount::ZERO, |total, next| total.checked_add(next))
    }

    /// Reads an amount from a signed store column; negative values are refused.
    pub fn from_stored(units: i64) -> Option<Amount> {
        u64::try_from(units).ok().map(Amount)
    }

    /// The value for a signed store column, `None` if it does not fit.
    pub fn to_stored(self) -> Option<i64> {
        i64::try_from(self.0).ok()
    }
}

impl std::fmt::Display for Amount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_overflow_to_none_instead_of_wrapping() {
        assert_eq!(Amount::try_sum([Amount::new(u64::MAX), Amount::new(1)]), None);
        assert_eq!(
            Amount::try_sum([Amount::new(2), Amount::new(3)]),
            Some(Amount::new(5))
        );
        assert_eq!(Amount::try_sum([]), Some(Amount::ZERO));
    }

    #[test]
    fn subtraction_below_zero_is_none() {
        assert_eq!(Amount::new(1).checked_sub(Amount::new(2)), None);
    }

    #[test]
    fn stored_values_must_fit_a_signed_column() {
        assert_eq!(Amount::from_stored(-1), None);
        assert_eq!(Amount::new(u64::MAX).to_stored(), None);
        assert_eq!(
            Amount::from_stored(i64::MAX).and_then(Amount::to_stored),
            Some(i64::MAX)
        );
    }
}
