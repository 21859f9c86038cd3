//! Group commit of the SQL-only claims on MySQL (no Redis gate): the claims that arrive
//! together decided and written by a few statements in one transaction.
//!
//! A claim alone is eight round trips (`BEGIN`, the spray, the caller's share if any, the
//! spray's shared lock, a free share locked, the update, the CREDIT, `COMMIT`), and a
//! thousand members racing for one spray make as many transactions that each read the
//! same rows. The claims of one spray always go to the same writer (by its room and
//! token), and a batch costs the same statements whatever it holds:
//!
//! 1. `BEGIN`, in the same round trip as 2 (see `store/batch_tx.rs`);
//! 2. the newest spray under each (room, token); then, in one round trip
//!    (`multi_row::run_together`), those rows under the shared lock every claim takes
//!    (see `store/mysql.rs`: claims run side by side, a settlement waits for them) and
//! 3. the shares the callers already hold in those sprays;
//! 4. rules 1 to 4 decided for each claim, in the order of the batch, by the domain's
//!    rules on those rows (a settled spray is closed, as alone);
//! 5. per spray, as many free shares as claims passed the rules, locked with `FOR UPDATE
//!    SKIP LOCKED` from where this instance last saw a share taken (as alone: see
//!    `take_free_share_in` in `store/mysql.rs`);
//! 6. one statement per keyed claim given a share (its kept effect; a lost lease fails
//!    that claim alone, 503, and its share is not given);
//! 7. one `UPDATE` giving each share, and one `INSERT` of every CREDIT, in one round trip
//!    (those of `store/slot_batch.rs`);
//! 8. `COMMIT`.
//!
//! What the batch does not decide on its own rows is written claim by claim after its
//! commit (`OneByOne::claim_alone`), exactly as before: a second claim of one user to one
//! spray in the batch (the first one's outcome decides it), and claims left without a
//! share while committed free shares remain (other transactions hold them and may give
//! them back). Only when no free share is left are they refused as exhausted. A user
//! given a share by another instance between steps 3 and 7 fails the `UPDATE` on the
//! unique key; the batch is then rolled back and written claim by claim.
//!
//! Nobody is answered before the commit is durable; a failed `COMMIT` is read back by the
//! first share given (see `store/multi_row.rs` and `store/commit.rs`).

use std::collections::HashMap;
use std::sync::Arc;

use super::batch_tx::BatchTransaction;
use super::convert::{amount_from, time_from, user_from};
use super::idempotency::lease_lost;
use super::multi_row::{Fallback, hex, write_and_answer};
use super::mysql::{OneByOne, committed_free_shares_in, free_shares_in, landed_on};
use super::queue::{KeyedBatchQueue, Linger, Reply};
use super::slot_batch::{SlotRequest, give_and_commit};
use super::{Claim, ClaimOutcome, Effect, PendingKey, StoreError};
use crate::domain::{Amount, ReceiveFacts, ReceiveRefusal, rules};

/// The most claims one batch holds (see `store/slot_batch.rs`).
const MAX_BATCH: usize = 128;
/// Batch writers: the claims of one spray are written one batch after the other, those of
/// different sprays at once (see `WRITERS` in `store/slot_batch.rs`).
const WRITERS: usize = 2;

/// One SQL-only claim: `Store::claim_share`'s arguments.
#[derive(Debug, Clone)]
pub(super) struct ClaimRequest {
    pub(super) claim: Claim,
    pub(super) idempotency: Option<PendingKey>,
}

/// The queue in front of the batch writers.
pub(super) struct ClaimBatches(KeyedBatchQueue<ClaimRequest, ClaimOutcome>);

impl ClaimBatches {
    /// Starts [`WRITERS`] tasks, taking batches off one queue. They end when the
    /// `ClaimBatches` is dropped.
    pub(super) fn start(writer: OneByOne) -> ClaimBatches {
        let writer = Arc::new(writer);
        ClaimBatches(KeyedBatchQueue::start(
            WRITERS,
            MAX_BATCH,
            Linger::WhileBusy,
            move |batch| {
                let writer = writer.clone();
                async move { write_batch(writer.as_ref(), batch).await }
            },
        ))
    }

    /// Queues the claim behind the other claims of its spray and waits for its answer,
    /// given once the batch holding it is durable.
    pub(super) async fn claim(&self, request: ClaimRequest) -> Result<ClaimOutcome, StoreError> {
        use std::hash::{Hash, Hasher};
        // The spray's key: its room and token (two sprays sharing a hash only share turns).
        let mut spray = std::collections::hash_map::DefaultHasher::new();
        (request.claim.room.as_str(), request.claim.token.as_str()).hash(&mut spray);
        self.0.send(spray.finish(), request).await
    }
}

/// Writes one batch and answers every claim in it.
async fn write_batch(writer: &OneByOne, batch: Vec<(ClaimRequest, Reply<ClaimOutcome>)>) {
    let (requests, replies): (Vec<ClaimRequest>, Vec<Reply<ClaimOutcome>>) = batch.into_iter().unzip();
    write_and_answer(
        replies,
        || write_then_the_rest(writer, &requests),
        |i| writer.claim_alone(&requests[i]),
    )
    .await;
}

/// What the batch decided for one claim.
#[derive(Debug)]
enum Decided {
    /// Given the share `slot` of `spray_id`, worth `amount`.
    Give {
        spray_id: i64,
        slot: i64,
        amount: Amount,
    },
    /// Answered without a write.
    Answer(Result<ClaimOutcome, StoreError>),
    /// Written alone, after the batch commits.
    Alone,
}

/// The batch in one transaction, then the claims it left, one by one.
async fn write_then_the_rest(
    writer: &OneByOne,
    requests: &[ClaimRequest],
) -> Result<Vec<Result<ClaimOutcome, StoreError>>, Fallback> {
    let decided = write_once(writer, requests).await?;
    let mut answers = Vec::with_capacity(decided.len());
    for (request, decided) in requests.iter().zip(decided) {
        answers.push(match decided {
            Decided::Give { amount, .. } => Ok(ClaimOutcome::Received(amount)),
            Decided::Answer(answer) => answer,
            Decided::Alone => writer.claim_alone(request).await,
        });
    }
    Ok(answers)
}

/// One try at writing the batch in one transaction (see the module doc).
async fn write_once(writer: &OneByOne, requests: &[ClaimRequest]) -> Result<Vec<Decided>, Fallback> {
    let failed = |e: StoreError| Fallback::Failed(e);
    let mut tx = BatchTransaction::acquire(writer.pool()).await.map_err(failed)?;
    let decided = match decide_in(&mut tx, writer, requests).await {
        Ok(decided) => decided,
        Err(e) => {
            tx.rollback().await;
            return Err(failed(e));
        }
    };
    // The shares given, as the gate's claims of those slots: the same two statements.
    let given: Vec<(SlotRequest, Amount)> = requests
        .iter()
        .zip(&decided)
        .filter_map(|(request, decided)| match *decided {
            Decided::Give {
                spray_id,
                slot,
                amount,
            } => Some((
                SlotRequest {
                    claim: request.claim.clone(),
                    spray_id,
                    slot,
                    idempotency: None,
                },
                amount,
            )),
            _ => None,
        })
        .collect();
    let given: Vec<(&SlotRequest, Amount)> =
        given.iter().map(|(request, amount)| (request, *amount)).collect();
    give_and_commit(tx, &given, |what| landed_on(writer.pool(), what)).await?;
    for decided in &decided {
        if let Decided::Give { spray_id, slot, .. } = decided {
            writer.hints().taken(*spray_id, *slot);
        }
    }
    Ok(decided)
}

/// A spray as the batch reads it: `(id, room_id, token, owner_id, receive_until,
/// recipient_count, settled_at)`.
type SprayFacts = (i64, String, String, i64, i64, i64, Option<i64>);

/// Reads the batch's sprays and holders, decides each claim, takes the free shares and
/// records the effect of each keyed claim given one.
async fn decide_in(
    tx: &mut BatchTransaction,
    writer: &OneByOne,
    requests: &[ClaimRequest],
) -> Result<Vec<Decided>, StoreError> {
    // 2. The newest spray under each key (a plain read, as rule 1 alone), then those rows
    //    under the shared lock, by primary key, with `settled_at` read under it (as
    //    `unsettled_in` alone). Two statements rather than one locking read of the
    //    subqueries: a server that did not resolve them first would scan and lock every
    //    spray.
    let mut newest: Vec<String> = requests
        .iter()
        .map(|r| {
            format!(
                "(SELECT MAX(id) FROM sprays WHERE room_id = {} AND token = {})",
                hex(r.claim.room.as_str()),
                hex(r.claim.token.as_str())
            )
        })
        .collect();
    newest.sort_unstable();
    newest.dedup();
    let sql = format!(
        "SELECT id, room_id, token, owner_id, receive_until, recipient_count, settled_at
         FROM sprays WHERE id IN ({})",
        newest.join(", ")
    );
    let mut rows: Vec<SprayFacts> = match tx.run(&[sql]).await?.as_slice() {
        [newest] => newest.read()?,
        _ => return Err(StoreError::Other("a batch's sprays had no answer".into())),
    };

    // Those rows under the shared lock (with `settled_at` read under it), and 3. the shares
    // the callers already hold there: both known from the rows just read, so they go in
    // one round trip.
    let mut held: HashMap<(i64, i64), i64> = HashMap::new();
    if !rows.is_empty() {
        let ids = rows
            .iter()
            .map(|row| row.0.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let lock =
            format!("SELECT id, settled_at FROM sprays WHERE id IN ({ids}) ORDER BY id LOCK IN SHARE MODE");
        let spray_of_key: HashMap<(&str, &str), i64> = rows
            .iter()
            .map(|row| ((row.1.as_str(), row.2.as_str()), row.0))
            .collect();
        let mut wanted: Vec<String> = requests
            .iter()
            .filter_map(|r| {
                spray_of_key
                    .get(&(r.claim.room.as_str(), r.claim.token.as_str()))
                    .map(|id| format!("({id}, {})", r.claim.user.get()))
            })
            .collect();
        wanted.sort_unstable();
        wanted.dedup();
        let holders = format!(
            "SELECT spray_id, receiver_id, amount FROM shares WHERE (spray_id, receiver_id) IN ({})",
            wanted.join(", ")
        );
        let answered = tx.run(&[lock, holders]).await?;
        let [locked, holders] = answered.as_slice() else {
            return Err(StoreError::Other("a batch's reads had no answer".into()));
        };
        let locked: HashMap<i64, Option<i64>> = locked.read::<(i64, Option<i64>)>()?.into_iter().collect();
        // A spray purged in between is gone: it counts as settled (see `unsettled_in`).
        for row in &mut rows {
            row.6 = locked.get(&row.0).copied().unwrap_or(Some(0));
        }
        for (spray_id, user, amount) in holders.read::<(i64, i64, i64)>()? {
            held.insert((spray_id, user), amount);
        }
    }
    let sprays: HashMap<(String, String), SprayFacts> = rows
        .into_iter()
        .map(|row| ((row.1.clone(), row.2.clone()), row))
        .collect();
    let spray_of =
        |claim: &Claim| sprays.get(&(claim.room.as_str().to_owned(), claim.token.as_str().to_owned()));

    // 4. Rules 1 to 4 (and settlement), in order.
    let mut decided = Vec::with_capacity(requests.len());
    let mut seen: HashMap<(i64, i64), usize> = HashMap::new();
    let mut want_share: HashMap<i64, Vec<usize>> = HashMap::new();
    for (i, request) in requests.iter().enumerate() {
        let claim = &request.claim;
        let Some(&(spray_id, _, _, owner, receive_until, _, settled_at)) = spray_of(claim) else {
            decided.push(Decided::Answer(Ok(ClaimOutcome::Refused(
                ReceiveRefusal::NotFound,
            ))));
            continue;
        };
        let key = (spray_id, claim.user.get());
        match seen.get(&key) {
            // A second claim of one user in the batch, after one that may get a share: that
            // outcome decides it, so it is written alone after the batch.
            Some(&first) if !matches!(decided[first], Decided::Answer(_)) => {
                decided.push(Decided::Alone);
                continue;
            }
            // After one refused by a rule (its own `now`, say), it is decided as if alone,
            // and a later one follows its outcome.
            _ => {
                seen.insert(key, i);
            }
        }
        let facts = ReceiveFacts {
            owner: user_from(owner)?,
            receive_until: time_from(receive_until)?,
            already_received: held.get(&key).copied().map(amount_from).transpose()?,
        };
        let verdict = match rules::check_receive(&facts, claim.user, claim.now) {
            Err(refusal) => Decided::Answer(Ok(ClaimOutcome::Refused(refusal))),
            // A settled spray is closed, even inside its window (see `claim_share_in`).
            Ok(()) if settled_at.is_some() => {
                Decided::Answer(Ok(ClaimOutcome::Refused(ReceiveRefusal::Expired)))
            }
            Ok(()) => {
                want_share.entry(spray_id).or_default().push(i);
                Decided::Alone
            }
        };
        decided.push(verdict);
    }

    // 5. Free shares for the claims that passed, per spray.
    for (spray_id, claims) in want_share {
        let shares = sprays
            .values()
            .find(|s| s.0 == spray_id)
            .map_or(0, |s| u32::try_from(s.5).unwrap_or(u32::MAX));
        let from = writer.hints().start(spray_id);
        let mut free = free_shares_in(tx.connection().await?, spray_id, from, claims.len()).await?;
        if free.len() < claims.len() && from > 0 {
            let more = free_shares_in(tx.connection().await?, spray_id, 0, claims.len() - free.len()).await?;
            for share in more {
                if !free.contains(&share) {
                    free.push(share);
                }
            }
        }
        let left_over = if free.len() < claims.len() {
            let still_free = committed_free_shares_in(tx.connection().await?, spray_id).await?;
            // The shares this batch locked are still counted free: it has not taken them.
            if still_free <= i64::try_from(free.len()).unwrap_or(i64::MAX) {
                Decided::Answer(Ok(ClaimOutcome::Refused(ReceiveRefusal::Exhausted { shares })))
            } else {
                Decided::Alone
            }
        } else {
            Decided::Alone
        };
        let mut free = free.into_iter();
        for i in claims {
            decided[i] = match free.next() {
                Some((slot, amount)) => Decided::Give {
                    spray_id,
                    slot,
                    amount: amount_from(amount)?,
                },
                None => match &left_over {
                    Decided::Answer(Ok(refused)) => Decided::Answer(Ok(*refused)),
                    _ => Decided::Alone,
                },
            };
        }
    }

    // 6. The kept effects, in order.
    let mut lost_lease = false;
    for (request, decided) in requests.iter().zip(decided.iter_mut()) {
        if let Decided::Give { amount, .. } = *decided {
            let effect = Effect::Received(amount);
            if !tx
                .effect_recorded(request.idempotency.as_ref(), &effect, request.claim.now)
                .await?
            {
                *decided = Decided::Answer(Err(lease_lost()));
                lost_lease = true;
            }
        }
    }
    // A claim that lost its lease leaves its share free: a claim refused as exhausted
    // might have had it alone, so it is written alone.
    if lost_lease {
        for decided in &mut decided {
            if matches!(
                decided,
                Decided::Answer(Ok(ClaimOutcome::Refused(ReceiveRefusal::Exhausted { .. })))
            ) {
                *decided = Decided::Alone;
            }
        }
    }
    Ok(decided)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::domain::{Amount, Endpoint, IdempotencyKey, Token, UserId};
    use crate::store::Store;
    use crate::store::queue::as_one_batch;
    use crate::store::slot_batch::tests::Fixture;

    fn request(claim: Claim) -> ClaimRequest {
        ClaimRequest {
            claim,
            idempotency: None,
        }
    }

    fn refused(refusal: ReceiveRefusal) -> String {
        format!("{:?}", ClaimOutcome::Refused(refusal))
    }

    #[tokio::test]
    async fn each_claim_of_a_batch_is_decided_as_alone() {
        // Three shares of 5 by user 1, in ROOM under ABC.
        let fx = Fixture::new(3).await;
        let mut lost = request(fx.claim(13));
        lost.idempotency = Some(PendingKey {
            user: UserId::from_stored(13).unwrap(),
            endpoint: Endpoint::Receive,
            key: IdempotencyKey::parse("gone").unwrap(),
            lease: 1,
        });
        let mut late = request(fx.claim(12));
        late.claim.now = fx.now + TimeDelta::minutes(10);
        let mut elsewhere = request(fx.claim(17));
        elsewhere.claim.token = Token::parse("XYZ").unwrap();
        let batch = vec![
            request(fx.claim(1)),
            request(fx.claim(11)),
            // The same user again: the first claim's outcome decides it.
            request(fx.claim(11)),
            elsewhere,
            late,
            // Its share is not given: the lease is lost.
            lost,
            request(fx.claim(14)),
            // The share user 13 could not take.
            request(fx.claim(15)),
            request(fx.claim(16)),
        ];
        let writer = fx.writer();
        let answers: Vec<String> = as_one_batch(|batch| write_batch(&writer, batch), batch)
            .await
            .into_iter()
            .map(|a| a.map_or_else(|e| format!("error {e}"), |o| format!("{o:?}")))
            .collect();
        let received = format!("{:?}", ClaimOutcome::Received(Amount::new(5)));
        assert_eq!(answers[0], refused(ReceiveRefusal::OwnSpray));
        assert_eq!(answers[1], received);
        assert_eq!(answers[2], refused(ReceiveRefusal::AlreadyReceived));
        assert_eq!(answers[3], refused(ReceiveRefusal::NotFound));
        assert_eq!(answers[4], refused(ReceiveRefusal::Expired));
        assert!(answers[5].starts_with("error"), "{answers:?}");
        assert_eq!(answers[6], received);
        assert_eq!(answers[7], received, "{answers:?}");
        assert_eq!(answers[8], refused(ReceiveRefusal::Exhausted { shares: 3 }));
        let (taken, credits) = fx.taken().await;
        let mut receivers: Vec<i64> = taken.iter().map(|(_, user)| *user).collect();
        receivers.sort_unstable();
        assert_eq!((receivers, credits), (vec![11, 14, 15], 3));
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        fx.drop_database().await;
    }

    /// A user's second claim after a first one refused by a rule (its own later `now`) is
    /// decided in its place in the batch, as alone: before the claim after it.
    #[tokio::test]
    async fn a_second_claim_after_a_refused_one_keeps_its_place() {
        let fx = Fixture::new(1).await;
        let mut late = request(fx.claim(12));
        late.claim.now = fx.now + TimeDelta::minutes(10);
        let writer = fx.writer();
        let answers = as_one_batch(
            |batch| write_batch(&writer, batch),
            vec![late, request(fx.claim(12)), request(fx.claim(13))],
        )
        .await;
        let answers: Vec<String> = answers.into_iter().map(|a| format!("{:?}", a.unwrap())).collect();
        assert_eq!(answers[0], refused(ReceiveRefusal::Expired));
        assert_eq!(
            answers[1],
            format!("{:?}", ClaimOutcome::Received(Amount::new(5)))
        );
        assert_eq!(answers[2], refused(ReceiveRefusal::Exhausted { shares: 1 }));
        fx.drop_database().await;
    }

    /// Claims sent at once through the store share batches: every share is given once, no
    /// user gets two, and whoever gets none is told the spray is exhausted.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_claims_share_batches_and_every_share_is_given_once() {
        const SHARES: i64 = 200;
        const USERS: i64 = 300;
        let fx = Arc::new(Fixture::new(SHARES.unsigned_abs()).await);
        let mut claims = tokio::task::JoinSet::new();
        // Every user claims once, and every fifth user twice.
        for user in (2..2 + USERS).chain((2..2 + USERS).step_by(5)) {
            let fx = fx.clone();
            claims.spawn(async move { (user, fx.store.claim_share(&fx.claim(user), None).await) });
        }
        let mut winners = std::collections::HashSet::new();
        while let Some(joined) = claims.join_next().await {
            match joined.unwrap() {
                (user, Ok(ClaimOutcome::Received(_))) => {
                    assert!(winners.insert(user), "user {user} paid twice")
                }
                (
                    _,
                    Ok(ClaimOutcome::Refused(
                        ReceiveRefusal::AlreadyReceived | ReceiveRefusal::Exhausted { .. },
                    )),
                ) => {}
                (user, other) => panic!("user {user}: unexpected {other:?}"),
            }
        }
        assert_eq!(i64::try_from(winners.len()).unwrap(), SHARES);
        let (taken, credits) = fx.taken().await;
        assert_eq!((i64::try_from(taken.len()).unwrap(), credits), (SHARES, SHARES));
        assert!(crate::audit::run(&fx.store).await.unwrap().is_clean());
        Arc::into_inner(fx).unwrap().drop_database().await;
    }
}
