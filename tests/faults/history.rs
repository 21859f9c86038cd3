//! The history of the run: every request the tests sent and what came back (or did not),
//! with start and end times on the system clock, which the servers use too.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;

/// Milliseconds since the Unix epoch, as the servers write `received_at`.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub fn millis(duration: Duration) -> i64 {
    i64::try_from(duration.as_millis()).expect("a duration that fits in i64 milliseconds")
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    Spray,
    Receive,
}

impl Endpoint {
    pub fn path(self) -> &'static str {
        match self {
            Endpoint::Spray => "/api/v1/spray",
            Endpoint::Receive => "/api/v1/receive",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Endpoint::Spray => "spray",
            Endpoint::Receive => "receive",
        }
    }
}

/// How a request ended, as the client saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A whole answer was read.
    Answered {
        status: u16,
        code: Option<String>,
        replayed: bool,
    },
    /// The connection was refused: the request never reached a server and changed nothing.
    NotSent,
    /// No answer: the client gave up (its own short time-out, or it dropped the request
    /// future) or the connection broke (an instance killed). The server may have acted.
    Unknown { gave_up: bool },
}

#[derive(Clone, Debug)]
pub struct Record {
    pub endpoint: Endpoint,
    pub instance: usize,
    pub user: i64,
    pub room: String,
    /// Receive: the token asked for. Spray: the token answered, if any.
    pub token: Option<String>,
    pub key: Option<String>,
    /// Spray: the amount and count asked for.
    pub asked: Option<(u64, u64)>,
    pub start: i64,
    pub end: i64,
    pub outcome: Outcome,
    /// Receive answered 200: the amount received.
    pub amount: Option<u64>,
}

impl Record {
    pub fn status(&self) -> Option<u16> {
        match &self.outcome {
            Outcome::Answered { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn code(&self) -> Option<&str> {
        match &self.outcome {
            Outcome::Answered { code, .. } => code.as_deref(),
            _ => None,
        }
    }

    pub fn replayed(&self) -> bool {
        matches!(self.outcome, Outcome::Answered { replayed: true, .. })
    }

    pub fn is_unknown(&self) -> bool {
        matches!(self.outcome, Outcome::Unknown { .. })
    }

    pub fn is_code(&self, code: &str) -> bool {
        self.code() == Some(code)
    }

    /// A short label for the summary: "receive 200", "receive 409 SPRAY_EXHAUSTED",
    /// "spray no answer (gave up)".
    pub fn label(&self) -> String {
        let what = self.endpoint.name();
        match &self.outcome {
            Outcome::Answered {
                status,
                code,
                replayed,
                ..
            } => {
                let replay = if *replayed { " (replayed)" } else { "" };
                match code {
                    Some(code) => format!("{what} {status} {code}{replay}"),
                    None => format!("{what} {status}{replay}"),
                }
            }
            Outcome::NotSent => format!("{what} connection refused"),
            Outcome::Unknown { gave_up: true } => format!("{what} no answer (client gave up)"),
            Outcome::Unknown { gave_up: false } => format!("{what} no answer (connection broke)"),
        }
    }

    /// One line naming the request, for violation messages.
    pub fn describe(&self, origin: i64) -> String {
        let key = self
            .key
            .as_deref()
            .map(|k| format!(" key {k}"))
            .unwrap_or_default();
        format!(
            "{} by user {} in {}/{}{key} on instance {} [{:.3}s..{:.3}s]: {}",
            self.endpoint.name(),
            self.user,
            self.room,
            self.token.as_deref().unwrap_or("-"),
            self.instance,
            seconds(self.start - origin),
            seconds(self.end - origin),
            self.label()
        )
    }
}

/// Milliseconds as seconds, for messages.
pub fn seconds(ms: i64) -> f64 {
    let whole = i32::try_from(ms).unwrap_or(i32::MAX);
    f64::from(whole) / 1000.0
}

#[derive(Default)]
pub struct History {
    records: Mutex<Vec<Record>>,
}

impl History {
    pub fn push(&self, record: Record) {
        self.records.lock().expect("history lock").push(record);
    }

    pub fn snapshot(&self) -> Vec<Record> {
        self.records.lock().expect("history lock").clone()
    }

    pub fn len(&self) -> usize {
        self.records.lock().expect("history lock").len()
    }
}

/// Requests by outcome, for the summary.
pub fn outcome_counts(records: &[Record]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for record in records {
        *counts.entry(record.label()).or_insert(0) += 1;
    }
    counts
}

/// One request to send.
pub struct Call<'a> {
    pub endpoint: Endpoint,
    pub instance: usize,
    pub base: &'a str,
    pub user: i64,
    pub room: &'a str,
    pub key: Option<&'a str>,
    pub body: Value,
    /// The client's own time-out for the whole exchange.
    pub timeout: Duration,
    /// Drop the request future after this long instead (a client that goes away).
    pub drop_after: Option<Duration>,
}

/// Sends one request, records it in `history` and returns the record.
pub async fn send(client: &reqwest::Client, history: &History, call: Call<'_>) -> Record {
    let mut request = client
        .post(format!("{}{}", call.base, call.endpoint.path()))
        .header("x-user-id", call.user.to_string())
        .header("x-room-id", call.room)
        .timeout(call.timeout)
        .json(&call.body);
    if let Some(key) = call.key {
        request = request.header("idempotency-key", key);
    }
    let start = now_ms();
    let exchange = async {
        let answer = request.send().await?;
        let status = answer.status().as_u16();
        let replayed = answer
            .headers()
            .get("idempotent-replayed")
            .is_some_and(|v| v.as_bytes() == b"true");
        let body = answer.bytes().await?;
        Ok::<_, reqwest::Error>((status, replayed, body))
    };
    let result = match call.drop_after {
        Some(after) => tokio::time::timeout(after, exchange).await.ok(),
        None => Some(exchange.await),
    };
    let end = now_ms();
    let mut token = match call.endpoint {
        Endpoint::Receive => call.body["token"].as_str().map(str::to_owned),
        Endpoint::Spray => None,
    };
    let asked = match call.endpoint {
        Endpoint::Spray => Some((
            call.body["amount"].as_u64().expect("a spray amount"),
            call.body["recipient_count"].as_u64().expect("a recipient count"),
        )),
        Endpoint::Receive => None,
    };
    let mut amount = None;
    let outcome = match result {
        None => Outcome::Unknown { gave_up: true },
        Some(Err(e)) if e.is_connect() => Outcome::NotSent,
        Some(Err(e)) => Outcome::Unknown {
            gave_up: e.is_timeout(),
        },
        Some(Ok((status, replayed, body))) => {
            let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if call.endpoint == Endpoint::Spray && status == 201 {
                token = body["token"].as_str().map(str::to_owned);
            }
            if call.endpoint == Endpoint::Receive && status == 200 {
                amount = body["received_amount"].as_u64();
            }
            Outcome::Answered {
                status,
                code: body["code"].as_str().map(str::to_owned),
                replayed,
            }
        }
    };
    let record = Record {
        endpoint: call.endpoint,
        instance: call.instance,
        user: call.user,
        room: call.room.to_owned(),
        token,
        key: call.key.map(str::to_owned),
        asked,
        start,
        end,
        outcome,
        amount,
    };
    history.push(record.clone());
    record
}
