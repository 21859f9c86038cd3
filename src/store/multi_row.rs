//! What the MySQL batch writers (`store/slot_batch.rs`, `store/spray_batch.rs`,
//! `store/claim_batch.rs`) share: a
//! batch is tried as one transaction of multi-row statements, again when it loses a
//! deadlock or a lock wait; if one request would fail it as a whole, each request is
//! written alone instead, as it is when it keeps losing conflicts; if nothing of it could be
//! written, every request is answered 503. And how their statements (and the batched
//! lookups', `store/lookup_batch.rs`) are written: as text, with their values in it.

use std::fmt::Write as _;
use std::future::Future;

use sqlx::MySql;

use super::StoreError;
use super::batch::unavailable;
use super::queue::Reply;

/// Why a batch was not written as one.
#[derive(Debug)]
pub(super) enum Fallback {
    /// One request would fail the batch's statements (a token taken, a share already
    /// held): write each request alone.
    OneByOne,
    /// Nothing of it was written (the commit did not land, or the database could not be
    /// reached): every request is answered with this, 503.
    Failed(StoreError),
}

/// Writes a batch of `requests` requests and answers each of `replies`: `as_one` tries
/// the whole batch (and answers each request, in order), `alone(i)` writes request `i` by
/// itself.
pub(super) async fn write_and_answer<A, One, OneFut, Alone, AloneFut>(
    replies: Vec<Reply<A>>,
    mut as_one: One,
    mut alone: Alone,
) where
    One: FnMut() -> OneFut,
    OneFut: Future<Output = Result<Vec<Result<A, StoreError>>, Fallback>>,
    Alone: FnMut(usize) -> AloneFut,
    AloneFut: Future<Output = Result<A, StoreError>>,
{
    crate::telemetry::metrics::record_batch(replies.len());
    let mut tries = 1;
    let answers = loop {
        match as_one().await {
            Ok(answers) => break answers,
            Err(Fallback::Failed(StoreError::Conflict(cause))) if tries < super::mysql::ATTEMPTS => {
                tracing::debug!(%cause, tries, "a batch lost a conflict, retrying");
                let pause = rand::random_range(1..=10u64) * u64::from(tries);
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
                tries += 1;
            }
            // A batch that keeps losing deadlocks (one spray's batches from several
            // instances, a purge) is written one by one, each with its own retries,
            // rather than answered 503 as a whole.
            Err(Fallback::OneByOne | Fallback::Failed(StoreError::Conflict(_))) => {
                let mut answers = Vec::with_capacity(replies.len());
                for request in 0..replies.len() {
                    answers.push(alone(request).await);
                }
                break answers;
            }
            Err(Fallback::Failed(e)) => break replies.iter().map(|_| Err(unavailable(&e))).collect(),
        }
    };
    for (reply, answer) in replies.into_iter().zip(answers) {
        let _ = reply.send(answer);
    }
}

/// Runs `sql` by the text protocol and reads its rows as `T`.
///
/// The statements of a batch are written with their values (integers only: ids, slots,
/// times, formatted from `i64`, so nothing can be injected) in the text, and sent
/// unprepared. Their text changes with the batch, and prepared they would churn sqlx's
/// per-connection statement cache: each eviction sends `COM_STMT_CLOSE`, which the server
/// does not answer, right before the next statement, and with Nagle's algorithm on (sqlx
/// does not set `TCP_NODELAY`) that next statement waited for the delayed ACK of the
/// close, 40 ms. Measured: every statement of a batch took 45 ms once the cache was full,
/// and winners fell from 1,545/s to 617/s over a 50,000-share spray.
pub(super) async fn fetch_text<'e, T, E>(executor: E, sql: String) -> Result<Vec<T>, StoreError>
where
    T: for<'r> sqlx::FromRow<'r, sqlx::mysql::MySqlRow>,
    E: sqlx::Executor<'e, Database = MySql>,
{
    let rows = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
        .fetch_all(executor)
        .await?;
    Ok(rows.iter().map(T::from_row).collect::<Result<Vec<T>, _>>()?)
}

/// What one statement of a multi-statement answered: its rows (none for a write) and the
/// rows it changed.
pub(super) struct Answered {
    pub(super) rows: Vec<sqlx::mysql::MySqlRow>,
    pub(super) affected: u64,
}

impl Answered {
    /// The rows, read as `T`.
    pub(super) fn read<T>(&self) -> Result<Vec<T>, StoreError>
    where
        T: for<'r> sqlx::FromRow<'r, sqlx::mysql::MySqlRow>,
    {
        Ok(self.rows.iter().map(T::from_row).collect::<Result<Vec<T>, _>>()?)
    }
}

/// Runs `statements` in one round trip (a multi-statement, by the text protocol), and what
/// each answered, in order: statements whose texts depend only on what the batch already
/// knows cost one round trip together instead of one each. MySQL runs them in order and
/// stops at the first that fails (InnoDB undoes that one statement, not the transaction);
/// its error is returned, as sqlx's, so that the caller can tell a unique key's refusal,
/// with the number of statements answered before it: the statement at that index is the
/// one that failed, or was being answered when the round trip broke.
/// Every result is read before returning, so the connection is left with none pending.
/// Values go into the text as in [`fetch_text`].
pub(super) async fn run_together<'e, E>(
    executor: E,
    statements: &[String],
) -> Result<Vec<Answered>, (usize, sqlx::Error)>
where
    E: sqlx::Executor<'e, Database = MySql>,
{
    use futures_util::StreamExt;
    let items: Vec<_> = sqlx::raw_sql(sqlx::AssertSqlSafe(statements.join(";\n")))
        .fetch_many(executor)
        .collect()
        .await;
    // Each statement's rows come first, then its result.
    let mut answered = Vec::with_capacity(statements.len());
    let mut rows = Vec::new();
    for item in items {
        match item {
            Ok(sqlx::Either::Right(row)) => rows.push(row),
            Ok(sqlx::Either::Left(done)) => answered.push(Answered {
                rows: std::mem::take(&mut rows),
                affected: done.rows_affected(),
            }),
            Err(e) => return Err((answered.len(), e)),
        }
    }
    if answered.len() != statements.len() {
        let count = answered.len();
        return Err((
            count,
            sqlx::Error::Protocol(format!(
                "{} statements sent together gave {count} results",
                statements.len()
            )),
        ));
    }
    Ok(answered)
}

/// `text` as an ASCII string written in hexadecimal, `_ascii X'…'`: a room id or a token
/// goes into a batch's text this way, so no character of it (a quote, a backslash) can be
/// read as SQL. (Room ids and tokens are printable ASCII, checked when parsed.)
pub(super) fn hex(text: &str) -> String {
    let mut literal = String::with_capacity(10 + 2 * text.len());
    literal.push_str("_ascii X'");
    for byte in text.bytes() {
        let _ = write!(literal, "{byte:02x}");
    }
    literal.push('\'');
    literal
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use tokio::sync::oneshot;

    use super::*;

    /// Runs `write_and_answer` over three requests with `as_one` failing as `fails(try)`
    /// says (`None`: the batch is written, each request answered with its index); each
    /// request alone is answered 100 + its index. The answers, how many times the batch
    /// was tried and which requests were written alone.
    async fn run(
        fails: impl Fn(u32) -> Option<Fallback>,
    ) -> (Vec<Result<usize, StoreError>>, u32, Vec<usize>) {
        let (mut replies, mut answers) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            let (reply, answer) = oneshot::channel();
            replies.push(reply);
            answers.push(answer);
        }
        let tries = AtomicU32::new(0);
        let alone = std::sync::Mutex::new(Vec::new());
        write_and_answer(
            replies,
            || {
                let attempt = tries.fetch_add(1, Ordering::Relaxed) + 1;
                let outcome = match fails(attempt) {
                    Some(fallback) => Err(fallback),
                    None => Ok((0..3).map(Ok).collect()),
                };
                async move { outcome }
            },
            |request| {
                alone.lock().unwrap().push(request);
                async move { Ok(100 + request) }
            },
        )
        .await;
        let mut got = Vec::new();
        for answer in answers {
            got.push(answer.await.expect("every request is answered"));
        }
        let alone = alone.into_inner().unwrap();
        (got, tries.load(Ordering::Relaxed), alone)
    }

    fn values(answers: &[Result<usize, StoreError>]) -> Vec<usize> {
        answers.iter().map(|a| *a.as_ref().expect("an answer")).collect()
    }

    fn deadlock() -> Fallback {
        Fallback::Failed(StoreError::Conflict(
            "Deadlock found when trying to get lock".into(),
        ))
    }

    // Paused time: the pauses between tries pass at once.
    #[tokio::test(start_paused = true)]
    async fn a_batch_that_loses_a_deadlock_is_tried_again_whole() {
        let (answers, tries, alone) = run(|attempt| (attempt < 3).then(deadlock)).await;
        assert_eq!((values(&answers), tries, alone), (vec![0, 1, 2], 3, vec![]));
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_keeps_losing_deadlocks_is_written_one_by_one_not_answered_503() {
        let (answers, tries, alone) = run(|_| Some(deadlock())).await;
        assert_eq!(tries, super::super::mysql::ATTEMPTS);
        assert_eq!((values(&answers), alone), (vec![100, 101, 102], vec![0, 1, 2]));
    }

    #[tokio::test(start_paused = true)]
    async fn one_request_that_would_fail_the_batch_sends_it_one_by_one_at_once() {
        let (answers, tries, alone) = run(|_| Some(Fallback::OneByOne)).await;
        assert_eq!(
            (values(&answers), tries, alone),
            (vec![100, 101, 102], 1, vec![0, 1, 2])
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_that_could_not_be_written_answers_every_request_503_and_writes_none_alone() {
        let (answers, tries, alone) = run(|_| {
            Some(Fallback::Failed(StoreError::Unavailable(
                "the database went away".into(),
            )))
        })
        .await;
        assert_eq!((tries, alone), (1, vec![]));
        assert!(
            answers
                .iter()
                .all(|a| matches!(a, Err(StoreError::Unavailable(_)))),
            "{answers:?}"
        );
    }

    async fn mysql() -> sqlx::MySqlConnection {
        use sqlx::Connection;
        let url = std::env::var("SPRAY_TEST_MYSQL_URL")
            .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".to_owned());
        sqlx::MySqlConnection::connect(&url)
            .await
            .expect("MariaDB at SPRAY_TEST_MYSQL_URL")
    }

    #[tokio::test]
    async fn statements_run_together_answer_each_apart_in_order() {
        let mut conn = mysql().await;
        let statements = [
            "SELECT 1 UNION ALL SELECT 2".to_owned(),
            "DO 0".to_owned(),
            "SELECT 3, 'x'".to_owned(),
        ];
        let answered = run_together(&mut conn, &statements).await.unwrap();
        assert_eq!(answered.len(), 3);
        assert_eq!(answered[0].read::<(i64,)>().unwrap(), vec![(1,), (2,)]);
        assert!(answered[1].rows.is_empty());
        assert_eq!(
            answered[2].read::<(i64, String)>().unwrap(),
            vec![(3, "x".to_owned())]
        );
    }

    #[tokio::test]
    async fn a_failing_statement_stops_the_rest_and_leaves_the_connection_usable() {
        let mut conn = mysql().await;
        let table = format!("test.run_together_{:016x}", rand::random::<u64>());
        let statements = [
            format!("CREATE TEMPORARY TABLE {table} (v INT PRIMARY KEY)"),
            format!("INSERT INTO {table} VALUES (1)"),
            format!("INSERT INTO {table} VALUES (1)"),
            format!("INSERT INTO {table} VALUES (2)"),
        ];
        let failed = run_together(&mut conn, &statements).await;
        assert!(
            matches!(&failed, Err((2, sqlx::Error::Database(e))) if e.is_unique_violation()),
            "two statements answered, then the third refused: {:?}",
            failed.err()
        );
        // The statement after the failing one never ran, and the connection answers the
        // next one.
        let rows = run_together(&mut conn, &[format!("SELECT v FROM {table} ORDER BY v")])
            .await
            .unwrap();
        assert_eq!(rows[0].read::<(i32,)>().unwrap(), vec![(1,)]);
    }

    #[test]
    fn a_hex_literal_carries_every_byte_and_nothing_else() {
        assert_eq!(hex("R'1\\"), "_ascii X'5227315c'");
        assert_eq!(hex("AbC"), "_ascii X'416243'");
    }
}
