//! `spray audit` notices every way settlement can go wrong: each corruption below is
//! written behind the service's back into a store with settled sprays, and the check named
//! must fail. Portable SQL, so the same table runs on SQLite and MySQL.

use chrono::TimeDelta;
use spray::jobs::settle_expired_once;

use crate::common::{TestApp, start_time};

/// A store with, in `ROOM` by `OWNER`:
/// - 4000 over 3 shares, one received (user 2), settled with a REFUND of 2667;
/// - 10 over 2 shares, both received, settled without a refund;
/// - 500 over 4 shares, made 5 minutes later, still open and unsettled.
async fn settled_store() -> TestApp {
    let app = TestApp::new().await;
    let partly = app.spray(4000, 3).await;
    app.receive(2, &partly).await.assert_status(200);
    let full = app.spray(10, 2).await;
    app.receive(2, &full).await.assert_status(200);
    app.receive(3, &full).await.assert_status(200);
    app.advance(TimeDelta::minutes(5));
    app.spray(500, 4).await;
    let settled = settle_expired_once(app.store.as_ref(), start_time() + TimeDelta::minutes(10), 10)
        .await
        .unwrap();
    assert_eq!(settled, 2);
    app.assert_audit_clean().await;
    app
}

struct Corruption {
    what: &'static str,
    sql: &'static [&'static str],
    breaks: &'static str,
}

const CORRUPTIONS: &[Corruption] = &[
    Corruption {
        what: "the REFUND grows by 1",
        sql: &["UPDATE ledger SET amount = amount + 1 WHERE kind = 'REFUND'"],
        breaks: "every settled spray balances: debit = credits + refund",
    },
    Corruption {
        what: "the spray's refunded_amount shrinks by 1",
        sql: &["UPDATE sprays SET refunded_amount = refunded_amount - 1 WHERE total_amount = 4000"],
        breaks: "a settled spray refunded exactly its unreceived shares",
    },
    Corruption {
        what: "the spray's refunded_amount shrinks by 1",
        sql: &["UPDATE sprays SET refunded_amount = refunded_amount - 1 WHERE total_amount = 4000"],
        breaks: "settled_at and refunded_amount agree with the ledger's REFUND",
    },
    Corruption {
        what: "a refunded share is received after the settlement (a double spend)",
        sql: &[
            "UPDATE shares SET receiver_id = 9,
                    received_at = (SELECT receive_until - 1 FROM sprays WHERE total_amount = 4000)
             WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 4000) AND slot = 2",
            "INSERT INTO ledger (spray_id, kind, user_id, amount, at)
             SELECT id, 'CREDIT', 9, 1334, settled_at FROM sprays WHERE total_amount = 4000",
        ],
        breaks: "no CREDIT is dated at or after its spray's settlement",
    },
    Corruption {
        what: "a refunded share is received after the settlement (a double spend)",
        sql: &[
            "UPDATE shares SET receiver_id = 9,
                    received_at = (SELECT receive_until - 1 FROM sprays WHERE total_amount = 4000)
             WHERE spray_id = (SELECT id FROM sprays WHERE total_amount = 4000) AND slot = 2",
            "INSERT INTO ledger (spray_id, kind, user_id, amount, at)
             SELECT id, 'CREDIT', 9, 1334, settled_at - 1 FROM sprays WHERE total_amount = 4000",
        ],
        breaks: "every settled spray balances: debit = credits + refund",
    },
    Corruption {
        what: "a second REFUND, to someone else",
        sql: &["INSERT INTO ledger (spray_id, kind, user_id, amount, at)
                SELECT id, 'REFUND', 99, 1, settled_at FROM sprays WHERE total_amount = 4000"],
        breaks: "no spray is refunded twice",
    },
    Corruption {
        what: "the open spray is marked settled at its creation",
        sql: &["UPDATE sprays SET settled_at = created_at, refunded_amount = 500 WHERE total_amount = 500"],
        breaks: "no spray is settled before its receive window closed",
    },
    Corruption {
        what: "the REFUND is dated a millisecond before the window closed",
        sql: &["UPDATE ledger SET at = at - 1 WHERE kind = 'REFUND'"],
        breaks: "no REFUND is dated before its spray's receive window closed",
    },
    Corruption {
        what: "a REFUND of 1 on the fully received spray",
        sql: &["INSERT INTO ledger (spray_id, kind, user_id, amount, at)
                SELECT id, 'REFUND', owner_id, 1, settled_at FROM sprays WHERE total_amount = 10"],
        breaks: "no REFUND on a fully received spray",
    },
    Corruption {
        what: "the settlement of the partly received spray is forgotten",
        sql: &["UPDATE sprays SET settled_at = NULL, refunded_amount = NULL WHERE total_amount = 4000"],
        breaks: "settled_at and refunded_amount agree with the ledger's REFUND",
    },
];

#[tokio::test]
async fn the_audit_notices_every_broken_settlement() {
    for corruption in CORRUPTIONS {
        assert!(
            spray::audit::CHECKS
                .iter()
                .any(|check| check.name == corruption.breaks),
            "no audit check is named {:?}",
            corruption.breaks
        );
        let app = settled_store().await;
        for sql in corruption.sql {
            let changed = app
                .execute(sql)
                .await
                .unwrap_or_else(|e| panic!("{}: refused: {e}", corruption.what));
            assert!(changed >= 1, "{}: changed nothing", corruption.what);
        }
        let report = spray::audit::run(app.store.as_ref()).await.unwrap();
        let failed = report
            .results
            .iter()
            .any(|(name, violations)| *name == corruption.breaks && *violations > 0);
        assert!(
            failed,
            "{}: `{}` did not fail:\n{}",
            corruption.what,
            corruption.breaks,
            report.summary()
        );
    }
}

#[tokio::test]
async fn the_audit_stays_clean_through_settlement_and_purge() {
    let app = settled_store().await;
    let later = start_time() + TimeDelta::days(9);
    // One pass of the sweepers: the spray still open at `settled_store` is settled, then
    // all three are purged.
    settle_expired_once(app.store.as_ref(), later, 10).await.unwrap();
    spray::jobs::purge_expired_once(app.store.as_ref(), later, TimeDelta::days(1), 10)
        .await
        .unwrap();
    let left = app.store.count("SELECT COUNT(*) FROM sprays").await.unwrap();
    assert_eq!(left, 0);
    app.assert_audit_clean().await;
}

#[tokio::test]
async fn the_schema_refuses_a_half_written_settlement() {
    let app = settled_store().await;
    for sql in [
        "UPDATE sprays SET refunded_amount = NULL WHERE total_amount = 4000",
        "UPDATE sprays SET settled_at = NULL WHERE total_amount = 4000",
        "UPDATE sprays SET refunded_amount = -1 WHERE total_amount = 4000",
        "UPDATE sprays SET refunded_amount = 4001 WHERE total_amount = 4000",
    ] {
        assert!(app.execute(sql).await.is_err(), "accepted: {sql}");
    }
}
