//! Lookups on MySQL, many to a statement.
//!
//! A lookup is one statement (see `find_in` in `store/portable.rs`), and MariaDB's CPU was
//! the bound: about 350 µs of it per lookup on this machine, most of it the cost of a
//! statement rather than of its rows. So lookups that arrive while others are being read
//! queue up, and the next statement answers all of them (up to [`MAX_BATCH`]): the same
//! join, with the newest spray under each key picked by its own scalar subquery,
//! `s.id IN ((SELECT MAX(id) …), (SELECT MAX(id) …), …)`, each on its unique index, and
//! the sprays read by their primary key. A lone lookup is read as before, by the one
//! prepared statement.
//!
//! Each lookup is still one consistent read, made after it arrived: one statement reads
//! one snapshot, so a spray and its receipts agree, and everything committed before the
//! request came in is seen.
//!
//! The readers [`Linger`] as MySQL's batch writers do (`store/queue.rs`): a statement costs
//! MariaDB and both ends of the connection about the same whether it reads one spray or
//! many, and at half of the lookups' peak, readers taking each lookup as it came kept the
//! machine 95-99% busy. Lingering, 51-71% at the same offered rate, and with Redis 1.2× the
//! lookups at the peak (MySQL alone within the spread; BENCHMARKS.md, 2026-12-07). A
//! reader idle for longer reads at once, so a lone lookup under light load is not held
//! back.

use std::collections::HashMap;

use sqlx::MySqlPool;

use super::convert::{SPRAY_COLUMNS, SprayWithReceipt, spray_with_receipts};
use super::multi_row::{fetch_text, hex};
use super::mysql::portable::find_in;
use super::queue::{BatchQueue, Linger, Reply};
use super::{SprayLookup, StoreError};
use crate::domain::SprayRecord;

/// The most lookups one statement answers.
const MAX_BATCH: usize = 64;
/// Readers taking lookups from one queue, whichever is free: each holds one pooled
/// connection while it reads.
const READERS: usize = 4;

/// The queue in front of the readers.
pub(super) struct LookupBatches(BatchQueue<SprayLookup, Option<SprayRecord>>);

impl LookupBatches {
    /// Starts [`READERS`] tasks reading from `pool`. They end when the `LookupBatches` is
    /// dropped.
    pub(super) fn start(pool: MySqlPool) -> LookupBatches {
        LookupBatches(BatchQueue::start(
            READERS,
            MAX_BATCH,
            Linger::WhileBusy,
            move |batch| {
                let pool = pool.clone();
                async move { read_batch(&pool, batch).await }
            },
        ))
    }

    /// Queues the lookup and waits for its answer.
    pub(super) async fn find(&self, key: SprayLookup) -> Result<Option<SprayRecord>, StoreError> {
        self.0.send(key).await
    }
}

/// Reads one batch and answers every lookup in it.
async fn read_batch(pool: &MySqlPool, batch: Vec<(SprayLookup, Reply<Option<SprayRecord>>)>) {
    if let [(key, _)] = batch.as_slice() {
        let found = find_in(pool, key).await;
        if let Some((_, reply)) = batch.into_iter().next() {
            let _ = reply.send(found);
        }
        return;
    }
    let (keys, replies): (Vec<SprayLookup>, Vec<Reply<Option<SprayRecord>>>) = batch.into_iter().unzip();
    match find_many(pool, &keys).await {
        Ok(found) => {
            for (reply, answer) in replies.into_iter().zip(found) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            let cause = e.to_string();
            for reply in replies {
                let _ = reply.send(Err(StoreError::Unavailable(cause.clone())));
            }
        }
    }
}

/// The newest spray under each key with its receipts, in the order of `keys`.
async fn find_many(
    pool: &MySqlPool,
    keys: &[SprayLookup],
) -> Result<Vec<Result<Option<SprayRecord>, StoreError>>, StoreError> {
    // Integers and hexadecimal literals only: nothing in a key can be read as SQL. Each
    // key once: many lookups of one spray come together when it is popular.
    let mut subqueries: Vec<String> = keys
        .iter()
        .map(|key| match key {
            SprayLookup::Room(room, token) => format!(
                "(SELECT MAX(id) FROM sprays WHERE room_id = {} AND token = {})",
                hex(room.as_str()),
                hex(token.as_str())
            ),
            SprayLookup::Owner(owner, token) => format!(
                "(SELECT MAX(id) FROM sprays WHERE owner_id = {} AND token = {})",
                owner.get(),
                hex(token.as_str())
            ),
        })
        .collect();
    subqueries.sort_unstable();
    subqueries.dedup();
    let newest = subqueries.join(", ");
    let sql = format!(
        "SELECT {SPRAY_COLUMNS}, r.slot, r.receiver_id, r.amount, r.received_at
         FROM sprays s
         LEFT JOIN shares r ON r.spray_id = s.id AND r.receiver_id IS NOT NULL
         WHERE s.id IN ({newest})"
    );
    let rows: Vec<SprayWithReceipt> = fetch_text(pool, sql).await?;

    // The rows by spray; then, for each key, the newest spray it matches. The rows hold
    // the newest spray under every key, and perhaps older ones that match a key too (the
    // newest under another key): the highest id is the one.
    let mut by_spray: HashMap<i64, Vec<SprayWithReceipt>> = HashMap::new();
    for row in rows {
        by_spray.entry(row.spray.id).or_default().push(row);
    }
    // Each spray's key columns as stored, so that a spray whose rows are corrupt is still
    // matched to the lookups that want it, and to no other.
    struct Found {
        id: i64,
        room: String,
        token: String,
        owner: i64,
        record: Result<Option<SprayRecord>, StoreError>,
    }
    let sprays: Vec<Found> = by_spray
        .into_values()
        .filter_map(|rows| {
            let first = &rows.first()?.spray;
            let (id, room, token, owner) = (
                first.id,
                first.room_id.clone(),
                first.token.clone(),
                first.owner_id,
            );
            Some(Found {
                id,
                room,
                token,
                owner,
                record: spray_with_receipts(rows),
            })
        })
        .collect();
    let answers = keys
        .iter()
        .map(|key| {
            let newest = sprays
                .iter()
                .filter(|found| match key {
                    SprayLookup::Room(room, token) => {
                        found.room == room.as_str() && found.token == token.as_str()
                    }
                    SprayLookup::Owner(owner, token) => {
                        found.owner == owner.get() && found.token == token.as_str()
                    }
                })
                .max_by_key(|found| found.id);
            match newest {
                None => Ok(None),
                Some(Found {
                    record: Ok(record), ..
                }) => Ok(record.clone()),
                Some(Found { record: Err(e), .. }) => Err(StoreError::Corrupt(e.to_string())),
            }
        })
        .collect();
    Ok(answers)
}

#[cfg(test)]
mod tests {
    use chrono::TimeDelta;

    use super::*;
    use crate::domain::{Amount, RoomId, SplitMode, Token, UserId};
    use crate::store::queue::as_one_batch;
    use crate::store::slot_batch::tests::Fixture;
    use crate::store::{Claim, NewSpray, Store};

    fn room(name: &str, token: &str) -> SprayLookup {
        SprayLookup::Room(RoomId::parse(name).unwrap(), Token::parse(token).unwrap())
    }

    fn owner(id: i64, token: &str) -> SprayLookup {
        SprayLookup::Owner(UserId::from_stored(id).unwrap(), Token::parse(token).unwrap())
    }

    /// Each lookup of a batch is answered as it would be alone, by the one prepared
    /// statement: keys of one spray, of none, and a key two sprays of the batch match (the
    /// newest wins).
    #[tokio::test]
    async fn each_lookup_of_a_batch_is_answered_as_alone() {
        let fx = Fixture::new(3).await;
        let spray = |room: &str, token: &str, owner: i64, at: i64| NewSpray {
            token: Token::parse(token).unwrap(),
            room: RoomId::parse(room).unwrap(),
            owner: UserId::from_stored(owner).unwrap(),
            mode: SplitMode::Even,
            total_amount: Amount::new(10),
            shares: vec![Amount::new(5); 2],
            created_at: fx.now + TimeDelta::seconds(at),
            receive_until: fx.now + TimeDelta::seconds(at) + TimeDelta::minutes(10),
            lookup_until: fx.now + TimeDelta::seconds(at) + TimeDelta::days(7),
        };
        // X, with a receipt; then its token in room R'1 is given up and W takes it.
        let x = fx
            .store
            .insert_spray(&spray("R'1", "AAA", 1, 1), None)
            .await
            .unwrap();
        let claim = Claim {
            room: RoomId::parse("R'1").unwrap(),
            token: Token::parse("AAA").unwrap(),
            user: UserId::from_stored(9).unwrap(),
            now: fx.now + TimeDelta::seconds(2),
        };
        fx.store.claim_share(&claim, None).await.unwrap();
        sqlx::query("UPDATE sprays SET token_live = NULL WHERE id = ?")
            .bind(x)
            .execute(fx.writer().pool())
            .await
            .unwrap();
        fx.store
            .insert_spray(&spray("R'1", "AAA", 4, 3), None)
            .await
            .unwrap();
        fx.store
            .insert_spray(&spray("R2", "AAA", 2, 4), None)
            .await
            .unwrap();
        fx.store
            .insert_spray(&spray("R3", "BBB", 1, 5), None)
            .await
            .unwrap();

        let keys = vec![
            room("R'1", "AAA"),
            owner(1, "AAA"),
            owner(4, "AAA"),
            owner(2, "AAA"),
            room("R2", "AAA"),
            room("R3", "AAA"),
            owner(3, "AAA"),
            owner(1, "BBB"),
            room("ROOM", "ABC"),
            // The same key twice: read once, answered twice.
            owner(1, "AAA"),
        ];
        let pool = fx.writer().pool().clone();
        let batched = as_one_batch(|batch| read_batch(&pool, batch), keys.clone()).await;
        for (key, answer) in keys.iter().zip(batched) {
            let alone = find_in(&pool, key).await.unwrap();
            let answer = answer.unwrap();
            assert_eq!(format!("{answer:?}"), format!("{alone:?}"), "{key:?}");
        }
        // The keys found what they should, not merely the same as alone.
        let found = |key: SprayLookup| {
            let pool = pool.clone();
            async move { find_in(&pool, &key).await.unwrap() }
        };
        let by_room = found(room("R'1", "AAA")).await.unwrap();
        assert_eq!(
            (by_room.owner.get(), by_room.receipts.len()),
            (4, 0),
            "the newest in the room"
        );
        let by_owner = found(owner(1, "AAA")).await.unwrap();
        assert_eq!((by_owner.room.as_str(), by_owner.receipts.len()), ("R'1", 1));
        assert!(found(room("R3", "AAA")).await.is_none());
        fx.drop_database().await;
    }
}
