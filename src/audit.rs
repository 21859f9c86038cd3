//! `spray audit`: every money invariant, checked over the whole store.
//!
//! Each check is one read-only query that counts the rows breaking an invariant, in SQL
//! that SQLite and MySQL both accept, so every backend is audited by the same text.

use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::config::redact_url;
use crate::store::mysql::MySqlStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};

/// One invariant and the query that counts its violations.
pub struct Check {
    pub name: &'static str,
    pub sql: &'static str,
}

/// Sums of money per spray from the ledger, one row per spray that has any entry.
macro_rules! ledger_per_spray {
    () => {
        "(SELECT spray_id,
                 SUM(CASE WHEN kind = 'DEBIT' THEN amount ELSE 0 END) AS debit,
                 SUM(CASE WHEN kind = 'CREDIT' THEN amount ELSE 0 END) AS credit,
                 SUM(CASE WHEN kind = 'REFUND' THEN amount ELSE 0 END) AS refund,
                 SUM(CASE WHEN kind = 'DEBIT' THEN 1 ELSE 0 END) AS debits,
                 SUM(CASE WHEN kind = 'REFUND' THEN 1 ELSE 0 END) AS refunds
          FROM ledger GROUP BY spray_id)"
    };
}

pub const CHECKS: &[Check] = &[
    Check {
        name: "the shares of each spray sum to its amount",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE s.total_amount <> (SELECT COALESCE(SUM(amount), 0) FROM shares WHERE spray_id = s.id)",
    },
    Check {
        name: "each spray has as many shares as recipient_count",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE s.recipient_count <> (SELECT COUNT(*) FROM shares WHERE spray_id = s.id)",
    },
    Check { name: "every share is at least 1", sql: "SELECT COUNT(*) FROM shares WHERE amount < 1" },
    Check {
        name: "nobody holds two shares of one spray",
        sql: "SELECT COUNT(*) FROM (SELECT spray_id, receiver_id FROM shares WHERE receiver_id IS NOT NULL
                                    GROUP BY spray_id, receiver_id HAVING COUNT(*) > 1) twice",
    },
    Check {
        name: "no sprayer receives from their own spray",
        sql: "SELECT COUNT(*) FROM shares sh JOIN sprays s ON s.id = sh.spray_id WHERE sh.receiver_id = s.owner_id",
    },
    Check {
        name: "every receipt is inside its spray's receive window",
        sql: "SELECT COUNT(*) FROM shares sh JOIN sprays s ON s.id = sh.spray_id
              WHERE sh.receiver_id IS NOT NULL
                AND (sh.received_at IS NULL OR sh.received_at < s.created_at OR sh.received_at >= s.receive_until)",
    },
    Check {
        name: "a share has a receiver exactly when it has a receipt time",
        sql: "SELECT COUNT(*) FROM shares WHERE (receiver_id IS NULL) <> (received_at IS NULL)",
    },
    Check {
        name: "each spray has exactly one DEBIT of its amount, from its sprayer",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE (SELECT COUNT(*) FROM ledger l
                     WHERE l.spray_id = s.id AND l.kind = 'DEBIT' AND l.user_id = s.owner_id
                       AND l.amount = s.total_amount) <> 1
                 OR (SELECT COUNT(*) FROM ledger l WHERE l.spray_id = s.id AND l.kind = 'DEBIT') <> 1",
    },
    Check {
        name: "each received share has one CREDIT of its amount to its receiver",
        sql: "SELECT COUNT(*) FROM shares sh
              WHERE sh.receiver_id IS NOT NULL
                AND (SELECT COUNT(*) FROM ledger l
                     WHERE l.spray_id = sh.spray_id AND l.kind = 'CREDIT'
                       AND l.user_id = sh.receiver_id AND l.amount = sh.amount) <> 1",
    },
    Check {
        name: "no CREDIT without a received share",
        sql: "SELECT COUNT(*) FROM ledger l JOIN sprays s ON s.id = l.spray_id
              WHERE l.kind = 'CREDIT'
                AND NOT EXISTS (SELECT 1 FROM shares sh
                                WHERE sh.spray_id = l.spray_id AND sh.receiver_id = l.user_id)",
    },
    Check {
        name: "no spray is refunded twice",
        sql: concat!("SELECT COUNT(*) FROM ", ledger_per_spray!(), " t WHERE t.refunds > 1"),
    },
    Check {
        name: "settled sprays balance: debit = credits + refund",
        sql: concat!(
            "SELECT COUNT(*) FROM ",
            ledger_per_spray!(),
            " t WHERE t.refunds > 0 AND t.debit <> t.credit + t.refund"
        ),
    },
    Check {
        name: "open sprays never pay out more than was debited: debit >= credits",
        sql: concat!("SELECT COUNT(*) FROM ", ledger_per_spray!(), " t WHERE t.debit < t.credit + t.refund"),
    },
    Check {
        name: "every ledger entry belongs to a debited spray",
        sql: concat!("SELECT COUNT(*) FROM ", ledger_per_spray!(), " t WHERE t.debits <> 1"),
    },
    Check {
        name: "fully received sprays balance without a refund",
        sql: concat!(
            "SELECT COUNT(*) FROM sprays s JOIN ",
            ledger_per_spray!(),
            " t ON t.spray_id = s.id
              WHERE s.recipient_count = (SELECT COUNT(*) FROM shares sh
                                         WHERE sh.spray_id = s.id AND sh.receiver_id IS NOT NULL)
                AND (t.refunds <> 0 OR t.debit <> t.credit)"
        ),
    },
    Check {
        name: "purged sprays were settled and balance",
        sql: concat!(
            "SELECT COUNT(*) FROM ",
            ledger_per_spray!(),
            " t WHERE NOT EXISTS (SELECT 1 FROM sprays s WHERE s.id = t.spray_id)
                 AND t.debit <> t.credit + t.refund"
        ),
    },
    // Settlement (the sweeper): `settled_at` and `refunded_amount` on the spray, the REFUND
    // in the ledger, and the shares must tell one story.
    Check {
        name: "every settled spray balances: debit = credits + refund",
        sql: concat!(
            "SELECT COUNT(*) FROM sprays s JOIN ",
            ledger_per_spray!(),
            " t ON t.spray_id = s.id
              WHERE s.settled_at IS NOT NULL AND t.debit <> t.credit + t.refund"
        ),
    },
    Check {
        name: "a settled spray refunded exactly its unreceived shares",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE s.settled_at IS NOT NULL
                AND s.refunded_amount <> (SELECT COALESCE(SUM(amount), 0) FROM shares
                                          WHERE spray_id = s.id AND receiver_id IS NULL)",
    },
    Check {
        name: "settled_at and refunded_amount agree with the ledger's REFUND",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE (s.settled_at IS NULL) <> (s.refunded_amount IS NULL)
                 OR (s.settled_at IS NULL
                     AND EXISTS (SELECT 1 FROM ledger l WHERE l.spray_id = s.id AND l.kind = 'REFUND'))
                 OR (s.refunded_amount = 0
                     AND EXISTS (SELECT 1 FROM ledger l WHERE l.spray_id = s.id AND l.kind = 'REFUND'))
                 OR (s.refunded_amount > 0
                     AND (SELECT COUNT(*) FROM ledger l
                          WHERE l.spray_id = s.id AND l.kind = 'REFUND' AND l.user_id = s.owner_id
                            AND l.amount = s.refunded_amount AND l.at = s.settled_at) <> 1)",
    },
    Check {
        name: "no spray is settled before its receive window closed",
        sql: "SELECT COUNT(*) FROM sprays WHERE settled_at IS NOT NULL AND settled_at < receive_until",
    },
    Check {
        name: "no REFUND is dated before its spray's receive window closed",
        sql: "SELECT COUNT(*) FROM ledger l JOIN sprays s ON s.id = l.spray_id
              WHERE l.kind = 'REFUND' AND l.at < s.receive_until",
    },
    Check {
        // Against the REFUND too, so the check still holds once the spray is purged.
        name: "no CREDIT is dated at or after its spray's settlement",
        sql: "SELECT COUNT(*) FROM ledger c
              WHERE c.kind = 'CREDIT'
                AND (EXISTS (SELECT 1 FROM sprays s
                             WHERE s.id = c.spray_id AND s.settled_at IS NOT NULL AND c.at >= s.settled_at)
                     OR EXISTS (SELECT 1 FROM ledger r
                                WHERE r.spray_id = c.spray_id AND r.kind = 'REFUND' AND c.at >= r.at))",
    },
    Check {
        name: "no REFUND on a fully received spray",
        sql: "SELECT COUNT(*) FROM sprays s
              WHERE EXISTS (SELECT 1 FROM ledger l WHERE l.spray_id = s.id AND l.kind = 'REFUND')
                AND NOT EXISTS (SELECT 1 FROM shares sh WHERE sh.spray_id = s.id AND sh.receiver_id IS NULL)",
    },
];

/// Totals shown above the checks, so an operator sees the size of what was audited.
const TOTALS: &[(&str, &str)] = &[
    ("sprays", "SELECT COUNT(*) FROM sprays"),
    ("shares", "SELECT COUNT(*) FROM shares"),
    (
        "received shares",
        "SELECT COUNT(*) FROM shares WHERE receiver_id IS NOT NULL",
    ),
    (
        "debited",
        "SELECT CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM ledger WHERE kind = 'DEBIT'",
    ),
    (
        "credited",
        "SELECT CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM ledger WHERE kind = 'CREDIT'",
    ),
    (
        "refunded",
        "SELECT CAST(COALESCE(SUM(amount), 0) AS SIGNED) FROM ledger WHERE kind = 'REFUND'",
    ),
];

/// What an audit found.
#[derive(Debug, Default)]
pub struct AuditReport {
    pub totals: Vec<(&'static str, i64)>,
    /// Each check with the number of rows that break it.
    pub results: Vec<(&'static str, i64)>,
}

impl AuditReport {
    pub fn violations(&self) -> i64 {
        self.results.iter().map(|(_, n)| *n).fold(0, i64::saturating_add)
    }

    pub fn is_clean(&self) -> bool {
        self.results.iter().all(|(_, n)| *n == 0)
    }

    /// The human-readable summary `spray audit` prints.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        for (name, value) in &self.totals {
            let _ = writeln!(out, "{name:>16}: {value}");
        }
        for (name, violations) in &self.results {
            let verdict = if *violations == 0 {
                "ok  ".to_owned()
            } else {
                format!("FAIL ({violations})")
            };
            let _ = writeln!(out, "{verdict:<12} {name}");
        }
        let _ = if self.is_clean() {
            writeln!(out, "audit clean: {} checks passed", self.results.len())
        } else {
            writeln!(out, "audit FAILED: {} violating rows", self.violations())
        };
        out
    }
}

/// Runs every check against the store.
pub async fn run(store: &dyn Store) -> Result<AuditReport, StoreError> {
    let mut report = AuditReport::default();
    for (name, sql) in TOTALS {
        report.totals.push((name, store.count(sql).await?));
    }
    for check in CHECKS {
        report.results.push((check.name, store.count(check.sql).await?));
    }
    Ok(report)
}

/// Why `spray audit` could not audit the store (exit status 2): it never creates,
/// migrates or repairs one, so each of these is said rather than worked around.
#[derive(Debug, thiserror::Error)]
pub enum CannotAudit {
    #[error(
        "there is no store at {0}: spray audit never creates one (check --database-url; spray migrate creates a store)"
    )]
    Missing(String),
    #[error("cannot open the store at {place}: {source}")]
    Open { place: String, source: StoreError },
    #[error("the store at {0} is empty (no tables): it was never migrated (run spray migrate)")]
    Empty(String),
    #[error("the store at {0} has tables but no spray migrations: it is not a spray store")]
    NotSpray(String),
    #[error(
        "the store at {place} is of an older schema: {applied} of this binary's {expected} migrations applied (latest {applied_latest}, this binary's {expected_latest}); run spray migrate first"
    )]
    Older {
        place: String,
        applied: i64,
        expected: i64,
        applied_latest: i64,
        expected_latest: i64,
    },
    #[error(
        "the store at {place} is of a newer schema than this binary ({applied} migrations applied, latest {applied_latest}; this binary knows {expected}, latest {expected_latest}): audit it with the spray that migrated it"
    )]
    Newer {
        place: String,
        applied: i64,
        expected: i64,
        applied_latest: i64,
        expected_latest: i64,
    },
    #[error("the audit could not run: {0}")]
    Query(#[from] StoreError),
}

/// The queries that tell what schema a store has, in its dialect.
struct SchemaQueries {
    tables: &'static str,
    migrations_table: &'static str,
}

const SQLITE_SCHEMA: SchemaQueries = SchemaQueries {
    tables: "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table'",
    migrations_table: "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
};

const MYSQL_SCHEMA: SchemaQueries = SchemaQueries {
    tables: "SELECT COUNT(*) FROM information_schema.tables WHERE table_schema = DATABASE()",
    migrations_table: "SELECT COUNT(*) FROM information_schema.tables
                       WHERE table_schema = DATABASE() AND table_name = '_sqlx_migrations'",
};

const APPLIED_COUNT: &str = "SELECT COUNT(*) FROM _sqlx_migrations WHERE success = 1";
const APPLIED_LATEST: &str =
    "SELECT CAST(COALESCE(MAX(version), 0) AS SIGNED) FROM _sqlx_migrations WHERE success = 1";

/// Opens the store named by `url` for an audit: an existing one, read-only on SQLite
/// (MySQL is only read: the audit runs nothing but `SELECT`), never created or migrated;
/// and only when its schema is exactly the one this binary migrates to.
pub async fn open_existing(url: &str, max_connections: u32) -> Result<Arc<dyn Store>, CannotAudit> {
    let place = redact_url(url);
    let open_error = |source: StoreError| CannotAudit::Open {
        place: place.clone(),
        source,
    };
    let (store, schema, migrator): (Arc<dyn Store>, _, _) = if url.starts_with("sqlite:") {
        let options =
            sqlx::sqlite::SqliteConnectOptions::from_str(url).map_err(|e| open_error(StoreError::from(e)))?;
        let file = options.get_filename();
        if !file.is_file() {
            return Err(CannotAudit::Missing(file.display().to_string()));
        }
        let store = SqliteStore::connect_read_only(url).await.map_err(open_error)?;
        (Arc::new(store), SQLITE_SCHEMA, SqliteStore::migrator())
    } else if url.starts_with("mysql:") {
        let store = MySqlStore::connect(url, max_connections)
            .await
            .map_err(open_error)?;
        (Arc::new(store), MYSQL_SCHEMA, MySqlStore::migrator())
    } else {
        return Err(open_error(StoreError::Config(format!(
            "unsupported database URL scheme in {place}; use sqlite:// or mysql://"
        ))));
    };
    let expected: Vec<i64> = migrator
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    let checked = check_schema(store.as_ref(), &schema, &expected, &place).await;
    if let Err(error) = checked {
        store.close().await;
        return Err(error);
    }
    Ok(store)
}

async fn check_schema(
    store: &dyn Store,
    schema: &SchemaQueries,
    expected: &[i64],
    place: &str,
) -> Result<(), CannotAudit> {
    if store.count(schema.tables).await? == 0 {
        return Err(CannotAudit::Empty(place.to_owned()));
    }
    if store.count(schema.migrations_table).await? == 0 {
        return Err(CannotAudit::NotSpray(place.to_owned()));
    }
    let applied = store.count(APPLIED_COUNT).await?;
    let applied_latest = store.count(APPLIED_LATEST).await?;
    let expected_count = i64::try_from(expected.len()).unwrap_or(i64::MAX);
    let expected_latest = expected.iter().copied().max().unwrap_or(0);
    if applied_latest > expected_latest || applied > expected_count {
        return Err(CannotAudit::Newer {
            place: place.to_owned(),
            applied,
            expected: expected_count,
            applied_latest,
            expected_latest,
        });
    }
    if applied != expected_count || applied_latest != expected_latest {
        return Err(CannotAudit::Older {
            place: place.to_owned(),
            applied,
            expected: expected_count,
            applied_latest,
            expected_latest,
        });
    }
    Ok(())
}

impl AuditReport {
    /// The report for monitoring (`spray audit --format json`): one JSON object.
    pub fn to_json(&self) -> Value {
        let totals: serde_json::Map<String, Value> = self
            .totals
            .iter()
            .map(|(name, value)| ((*name).to_owned(), json!(value)))
            .collect();
        let checks: Vec<Value> = self
            .results
            .iter()
            .map(|(name, violations)| json!({"name": name, "violations": violations, "ok": *violations == 0}))
            .collect();
        json!({
            "clean": self.is_clean(),
            "violations": self.violations(),
            "totals": totals,
            "checks": checks,
        })
    }
}
