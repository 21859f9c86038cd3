//! Splitting an amount into shares, fixed at creation in the order they will be received.

use std::sync::atomic::{AtomicU64, Ordering};

use rand::rngs::{StdRng, SysRng};
use rand::{Rng, RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::amount::Amount;

/// How a spray's amount is divided.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SplitMode {
    /// `amount / n` each; the remainder goes one unit at a time to the last shares.
    #[default]
    Even,
    /// The "double mean" rule: each share is drawn uniformly from 1 to twice the mean
    /// of what is still undrawn, always leaving at least 1 for each later share.
    Random,
}

impl SplitMode {
    pub fn as_str(self) -> &'static str {
        match self {
            SplitMode::Even => "even",
            SplitMode::Random => "random",
        }
    }

    pub fn parse(text: &str) -> Option<SplitMode> {
        match text {
            "even" => Some(SplitMode::Even),
            "random" => Some(SplitMode::Random),
            _ => None,
        }
    }
}

/// Where the random split draws from, injected like the clock and the token source: the
/// operating system's CSPRNG in production ([`OsRandomness`]), a fixed seed in tests
/// ([`SeededRandomness`]). One generator per random spray; an even split draws nothing
/// and asks for none.
pub trait SplitRandomness: Send + Sync {
    fn generator(&self) -> Result<StdRng, String>;
}

/// One OS-seeded CSPRNG per random spray: one system call, then fast draws.
#[derive(Debug, Clone, Copy, Default)]
pub struct OsRandomness;

impl SplitRandomness for OsRandomness {
    fn generator(&self) -> Result<StdRng, String> {
        StdRng::try_from_rng(&mut SysRng).map_err(|e| e.to_string())
    }
}

/// Reproducible splits: the n-th random spray draws from a generator seeded with `seed + n`.
#[derive(Debug, Default)]
pub struct SeededRandomness {
    seed: u64,
    sprays: AtomicU64,
}

impl SeededRandomness {
    pub fn new(seed: u64) -> SeededRandomness {
        SeededRandomness {
            seed,
            sprays: AtomicU64::new(0),
        }
    }
}

impl SplitRandomness for SeededRandomness {
    fn generator(&self) -> Result<StdRng, String> {
        let n = self.sprays.fetch_add(1, Ordering::Relaxed);
        Ok(StdRng::seed_from_u64(self.seed.wrapping_add(n)))
    }
}

/// `amount` cannot give every one of `count` shares at least 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cannot split {amount} into {count} shares of at least 1")]
pub struct SplitError {
    pub amount: Amount,
    pub count: u32,
}

// Each split gives `count` shares in the order they will be received; they always sum
// to `amount` and each is at least 1. The service picks one by the spray's mode, and
// makes a generator for the random one only.

/// The random split, drawing from `rng`.
pub fn split_randomly<R: Rng + ?Sized>(
    amount: Amount,
    count: u32,
    rng: &mut R,
) -> Result<Vec<Amount>, SplitError> {
    check(amount, count)?;
    Ok(split_double_mean(amount.units(), count, rng))
}

/// The even split, which draws nothing: the service makes no generator for it, and so
/// asks the operating system for no seed.
pub fn split_evenly(amount: Amount, count: u32) -> Result<Vec<Amount>, SplitError> {
    check(amount, count)?;
    Ok(split_even(amount.units(), count))
}

/// Every share at least 1: `1 <= count <= amount`.
fn check(amount: Amount, count: u32) -> Result<(), SplitError> {
    if count == 0 || amount.units() < u64::from(count) {
        return Err(SplitError { amount, count });
    }
    Ok(())
}

/// Precondition: `1 <= count <= total`.
fn split_even(total: u64, count: u32) -> Vec<Amount> {
    let n = u64::from(count);
    let base = total / n;
    let remainder = total % n;
    // The first `n - remainder` shares get `base`, the last `remainder` get one more:
    // 4000 / 3 gives 1333, 1333, 1334.
    (0..n)
        .map(|i| {
            let extra = u64::from(i >= n - remainder);
            Amount::new(base + extra)
        })
        .collect()
}

/// Precondition: `1 <= count <= total`.
fn split_double_mean<R: Rng + ?Sized>(total: u64, count: u32, rng: &mut R) -> Vec<Amount> {
    let mut left_amount = total;
    let mut shares = Vec::with_capacity(usize::try_from(count).unwrap_or_default());
    for left_shares in (1..=u64::from(count)).rev() {
        if left_shares == 1 {
            shares.push(Amount::new(left_amount));
            break;
        }
        // Twice the mean of what is left, computed in u128 so that `2 * left` cannot
        // overflow; `left_amount >= left_shares` holds throughout, so both bounds are >= 1.
        let double_mean = u128::from(left_amount) * 2 / u128::from(left_shares);
        let keep_one_for_each_later_share = left_amount - (left_shares - 1);
        let max = u64::try_from(double_mean)
            .unwrap_or(u64::MAX)
            .min(keep_one_for_each_later_share);
        let share = rng.random_range(1..=max);
        shares.push(Amount::new(share));
        left_amount -= share;
    }
    shares
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// Either split, by mode, as the service picks it.
    fn split<R: Rng + ?Sized>(
        mode: SplitMode,
        amount: Amount,
        count: u32,
        rng: &mut R,
    ) -> Result<Vec<Amount>, SplitError> {
        match mode {
            SplitMode::Even => split_evenly(amount, count),
            SplitMode::Random => split_randomly(amount, count, rng),
        }
    }

    fn units(shares: &[Amount]) -> Vec<u64> {
        shares.iter().map(|a| a.units()).collect()
    }

    #[test]
    fn even_split_gives_the_remainder_to_the_last_shares() {
        let mut rng = StdRng::seed_from_u64(1);
        let shares = split(SplitMode::Even, Amount::new(4000), 3, &mut rng).unwrap();
        assert_eq!(units(&shares), vec![1333, 1333, 1334]);
        let shares = split(SplitMode::Even, Amount::new(10), 4, &mut rng).unwrap();
        assert_eq!(units(&shares), vec![2, 2, 3, 3]);
    }

    #[test]
    fn an_amount_smaller_than_the_count_cannot_be_split() {
        let mut rng = StdRng::seed_from_u64(1);
        for mode in [SplitMode::Even, SplitMode::Random] {
            assert!(split(mode, Amount::new(2), 3, &mut rng).is_err());
            assert!(split(mode, Amount::new(5), 0, &mut rng).is_err());
        }
    }

    #[test]
    fn extremes_split_exactly() {
        let mut rng = StdRng::seed_from_u64(7);
        for mode in [SplitMode::Even, SplitMode::Random] {
            // amount == count: every share is exactly 1.
            let shares = split(mode, Amount::new(1000), 1000, &mut rng).unwrap();
            assert!(shares.iter().all(|s| s.units() == 1));
            // The largest amount the store can hold, over many shares.
            let max = Amount::new(u64::try_from(i64::MAX).unwrap());
            let shares = split(mode, max, 100_000, &mut rng).unwrap();
            assert_eq!(Amount::try_sum(shares.iter().copied()), Some(max));
            // The largest u64, which the domain never refuses to split.
            let shares = split(mode, Amount::new(u64::MAX), 3, &mut rng).unwrap();
            assert_eq!(
                Amount::try_sum(shares.iter().copied()),
                Some(Amount::new(u64::MAX))
            );
        }
    }

    #[test]
    fn random_shares_have_the_same_expected_value_whatever_their_turn() {
        // 20,000 sprays of 1,000 over 5 shares: each turn's mean is 200 within a
        // few percent. A rule that favoured early or late receivers would show here.
        let mut rng = StdRng::seed_from_u64(42);
        let mut sums = [0u64; 5];
        let rounds = 20_000u64;
        for _ in 0..rounds {
            let shares = split(SplitMode::Random, Amount::new(1000), 5, &mut rng).unwrap();
            for (sum, share) in sums.iter_mut().zip(&shares) {
                *sum += share.units();
            }
        }
        for (turn, sum) in sums.iter().enumerate() {
            let mean = sum / rounds;
            assert!((190..=210).contains(&mean), "turn {turn} has mean {mean}");
        }
    }

    proptest! {
        #[test]
        fn shares_sum_to_the_amount_and_each_is_at_least_one(
            amount in 1u64..=1_000_000_000_000,
            count in 1u32..=1000,
            seed: u64,
            random: bool,
        ) {
            prop_assume!(amount >= u64::from(count));
            let mode = if random { SplitMode::Random } else { SplitMode::Even };
            let mut rng = StdRng::seed_from_u64(seed);
            let shares = split(mode, Amount::new(amount), count, &mut rng).unwrap();
            prop_assert_eq!(shares.len(), usize::try_from(count).unwrap());
            prop_assert!(shares.iter().all(|s| s.units() >= 1));
            prop_assert_eq!(Amount::try_sum(shares.iter().copied()), Some(Amount::new(amount)));
        }

        #[test]
        fn even_shares_differ_by_at_most_one_and_never_decrease(
            amount in 1u64..=u64::MAX,
            count in 1u32..=1000,
        ) {
            prop_assume!(amount >= u64::from(count));
            let mut rng = StdRng::seed_from_u64(0);
            let shares = units(&split(SplitMode::Even, Amount::new(amount), count, &mut rng).unwrap());
            prop_assert!(shares.windows(2).all(|w| w[0] <= w[1]));
            prop_assert!(shares[shares.len() - 1] - shares[0] <= 1);
        }

        #[test]
        fn each_random_share_respects_the_double_mean_bound(
            amount in 1u64..=u64::MAX,
            count in 1u32..=300,
            seed: u64,
        ) {
            prop_assume!(amount >= u64::from(count));
            let mut rng = StdRng::seed_from_u64(seed);
            let shares = units(&split(SplitMode::Random, Amount::new(amount), count, &mut rng).unwrap());
            let mut left_amount = u128::from(amount);
            let mut left_shares = u128::from(count);
            for (i, share) in shares.iter().enumerate() {
                let share = u128::from(*share);
                if i + 1 < shares.len() {
                    prop_assert!(share <= 2 * left_amount / left_shares, "share {} over the double mean", i);
                    prop_assert!(left_amount - share >= left_shares - 1, "share {} leaves too little", i);
                } else {
                    prop_assert_eq!(share, left_amount);
                }
                left_amount -= share;
                left_shares -= 1;
            }
        }
    }
}
