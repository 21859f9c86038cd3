//! Settings: defaults, then environment variables, then flags (clap layers the three).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use tokio::sync::Semaphore;

use crate::domain::{Amount, Policy};

pub const DEFAULT_LISTEN: &str = "127.0.0.1:8080";
pub const DEFAULT_DATABASE_URL: &str = "sqlite://spray.db";
pub const DEFAULT_MAX_AMOUNT: u64 = 1_000_000_000;
pub const DEFAULT_MAX_RECIPIENTS: u32 = 1_000;
/// The largest spray we will write in one transaction.
pub const MAX_RECIPIENTS_LIMIT: u32 = 100_000;
pub const DEFAULT_MAX_CONCURRENT_REQUESTS: usize = 1_024;
/// See `store::GuardedStore`: enough to keep one SQLite writer or a MySQL pool of 16 busy,
/// few enough that the queue behind them stays short (measured: bench/overload.sh).
pub const DEFAULT_STORE_CONCURRENCY: usize = 64;
/// A key's lease: seconds, not a minute (the contract), yet longer than a request
/// normally runs, so that a retry rarely takes over a request that is merely slow (which
/// is safe anyway: the slow one can then no longer commit, and answers 503).
pub const DEFAULT_IDEMPOTENCY_LEASE: Duration = Duration::from_secs(10);
/// The longest lease accepted: a key must never stay blocked for long.
pub const MAX_IDEMPOTENCY_LEASE: Duration = Duration::from_secs(60 * 60);

/// Every exit status of every command, shown by `--help` (and in the README).
pub const EXIT_STATUS: &str = "\
Exit status:
  serve        0 stopped by SIGTERM or SIGINT after draining; 1 could not start (the
               address is taken, the store or its migrations failed) or the server
               failed; 2 settings refused
  migrate      0 migrations applied; 1 failed; 2 settings refused
  audit        0 every check passed; 1 a money invariant is broken; 2 could not audit
               (settings refused; no store, an empty store, a store of an older or newer
               schema, unreachable)
  config       0 settings printed; 2 settings refused
  healthcheck  0 ready (/readyz answered 200); 1 not ready or no answer; 2 settings refused
  any          2 a bad flag, value or config file";

/// The `spray` command line.
#[derive(Debug, Parser)]
#[command(name = "spray", version, about = "Spray money into a chat room.", after_help = EXIT_STATUS)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub settings: Settings,
}

#[derive(Debug, Clone, PartialEq, Eq, Subcommand)]
pub enum Command {
    /// Bind the address, apply pending migrations, then serve the API (the default).
    Serve,
    /// Apply the schema migrations and exit.
    Migrate,
    /// Check every money invariant over an existing store, read-only (never creates or
    /// migrates one); exit 1 on any violation, 2 if it could not audit.
    #[command(after_help = EXIT_STATUS)]
    Audit {
        /// `text` for people, `json` (one object on stdout) for monitoring.
        #[arg(long, value_enum, default_value_t = AuditFormat::Text)]
        format: AuditFormat,
        /// The same as `--format json`.
        #[arg(long, conflicts_with = "format")]
        json: bool,
    },
    /// Print the effective settings as TOML (file, environment and flags merged, validated
    /// as serve would; secrets hidden) and exit.
    Config,
    /// Ask a running `spray serve` whether it is ready (GET /readyz): exit 0 when it
    /// answers 200, 1 otherwise. For container health checks (no curl needed).
    #[command(after_help = EXIT_STATUS)]
    Healthcheck {
        /// The URL to ask, e.g. `http://127.0.0.1:8080/readyz`; by default /readyz on the
        /// `--listen` address (an unspecified address such as 0.0.0.0 asks loopback).
        #[arg(long)]
        url: Option<String>,
        /// How long to wait for the answer.
        #[arg(long, default_value = "5s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

impl Command {
    /// `spray audit` with its default output.
    pub const AUDIT: Command = Command::Audit {
        format: AuditFormat::Text,
        json: false,
    };
}

/// How `spray audit` prints its report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum AuditFormat {
    /// A summary for people.
    #[default]
    Text,
    /// One JSON object, for monitoring.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Every setting, each a flag and an environment variable; flags win.
#[derive(Clone, Args)]
pub struct Settings {
    /// Address to listen on.
    #[arg(long, env = "SPRAY_LISTEN", default_value = DEFAULT_LISTEN, global = true)]
    pub listen: String,
    /// `sqlite://FILE` (created if missing) or `mysql://USER:PASS@HOST:PORT/DB`.
    #[arg(long, env = "SPRAY_DATABASE_URL", default_value = DEFAULT_DATABASE_URL, global = true)]
    pub database_url: String,
    /// Connections each instance opens to MySQL. Mind the server's `max_connections`
    /// (151 by default) across all instances.
    #[arg(
        long,
        env = "SPRAY_DATABASE_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub database_max_connections: u32,
    /// Redis in front of the claim; none for a single node.
    #[arg(long, env = "SPRAY_REDIS_URL", global = true)]
    pub redis_url: Option<String>,
    /// PEM file of the CA that signed Redis's certificate, for `rediss://` (a managed Redis
    /// with a private CA); without it, `rediss://` trusts the system's root certificates.
    #[arg(long, env = "SPRAY_REDIS_CA", global = true)]
    pub redis_ca: Option<std::path::PathBuf>,
    /// Prefix of every Redis key, so several deployments can share one Redis.
    #[arg(long, env = "SPRAY_REDIS_KEY_PREFIX", default_value = "spray", global = true)]
    pub redis_key_prefix: String,
    /// How long a share the Redis gate handed to a claim may stay unrecorded before
    /// another claim takes it over (the claim died: its instance was killed). Shorter
    /// than --request-timeout.
    #[arg(long, env = "SPRAY_CLAIM_LEASE", default_value = "5s", value_parser = parse_duration, global = true)]
    pub claim_lease: Duration,
    /// How long members may receive after a spray, e.g. `10m`.
    #[arg(long, env = "SPRAY_RECEIVE_WINDOW", default_value = "10m", value_parser = parse_duration, global = true)]
    pub receive_window: Duration,
    /// How long the sprayer may look a spray up, e.g. `7d`.
    #[arg(long, env = "SPRAY_LOOKUP_WINDOW", default_value = "7d", value_parser = parse_duration, global = true)]
    pub lookup_window: Duration,
    /// The largest amount of one spray.
    #[arg(long, env = "SPRAY_MAX_AMOUNT", default_value_t = DEFAULT_MAX_AMOUNT, global = true)]
    pub max_amount: u64,
    /// The most recipients of one spray.
    #[arg(long, env = "SPRAY_MAX_RECIPIENTS", default_value_t = DEFAULT_MAX_RECIPIENTS, global = true)]
    pub max_recipients: u32,
    /// When set, every /api/ request must carry `Authorization: Bearer <secret>`.
    #[arg(long, env = "SPRAY_GATEWAY_SECRET", global = true, hide_env_values = true)]
    pub gateway_secret: Option<String>,
    /// How long in-flight requests may run after SIGTERM before the process exits.
    #[arg(long, env = "SPRAY_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub shutdown_timeout: Duration,
    /// Log format.
    #[arg(long, env = "SPRAY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// A request still running after this long is answered 503 UNAVAILABLE.
    #[arg(long, env = "SPRAY_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration, global = true)]
    pub request_timeout: Duration,
    /// API requests served at once; past it, requests are answered 503 at once (not queued).
    #[arg(long, env = "SPRAY_MAX_CONCURRENT_REQUESTS", default_value_t = DEFAULT_MAX_CONCURRENT_REQUESTS, global = true)]
    pub max_concurrent_requests: usize,
    /// Store calls that begin a request's work, running or waiting at once; past it,
    /// requests are answered 503 at once rather than queued (overload is refused fast).
    #[arg(long, env = "SPRAY_STORE_CONCURRENCY", default_value_t = DEFAULT_STORE_CONCURRENCY, global = true)]
    pub store_concurrency: usize,
    /// A TOML file of settings, beneath the environment and the flags (see spray.toml.example).
    #[arg(long, env = "SPRAY_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,
    /// The pause between passes of the sweepers (settlement, retention), e.g. `10s`.
    #[arg(long, env = "SPRAY_SWEEP_INTERVAL", default_value = "10s", value_parser = parse_duration, global = true)]
    pub sweep_interval: Duration,
    /// How long a pending `Idempotency-Key` whose request ended without an answer (a 5xx,
    /// a crash) blocks a retry before the retry takes it over, e.g. `10s`.
    #[arg(long, env = "SPRAY_IDEMPOTENCY_LEASE", default_value = "10s", value_parser = parse_duration, global = true)]
    pub idempotency_lease: Duration,
    /// How long a spray is kept after its lookup window before it is purged, e.g. `1d`.
    #[arg(long, env = "SPRAY_RETENTION_GRACE", default_value = "1d", value_parser = parse_duration, global = true)]
    pub retention_grace: Duration,
    /// An OpenTelemetry collector's OTLP/HTTP address, e.g. `http://127.0.0.1:4318`, to
    /// export every request's span to; none: no export (trace ids are still logged).
    #[arg(long, env = "SPRAY_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            listen: DEFAULT_LISTEN.to_owned(),
            database_url: DEFAULT_DATABASE_URL.to_owned(),
            database_max_connections: 16,
            redis_url: None,
            redis_ca: None,
            redis_key_prefix: "spray".to_owned(),
            claim_lease: Duration::from_secs(5),
            receive_window: Duration::from_secs(10 * 60),
            lookup_window: Duration::from_secs(7 * 24 * 60 * 60),
            max_amount: DEFAULT_MAX_AMOUNT,
            max_recipients: DEFAULT_MAX_RECIPIENTS,
            gateway_secret: None,
            shutdown_timeout: Duration::from_secs(10),
            log_format: LogFormat::Text,
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: DEFAULT_MAX_CONCURRENT_REQUESTS,
            store_concurrency: DEFAULT_STORE_CONCURRENCY,
            config: None,
            sweep_interval: Duration::from_secs(10),
            retention_grace: Duration::from_secs(24 * 60 * 60),
            idempotency_lease: DEFAULT_IDEMPOTENCY_LEASE,
            otlp_endpoint: None,
        }
    }
}

impl Settings {
    /// Checks the settings that can be wrong together and turns them into a [`Policy`].
    pub fn policy(&self) -> Result<Policy, String> {
        let window = |name: &str, d: Duration| {
            chrono::TimeDelta::from_std(d)
                .ok()
                .filter(|w| *w >= chrono::TimeDelta::milliseconds(1) && *w <= chrono::TimeDelta::days(36_500))
                .ok_or_else(|| format!("{name} must be between 1ms and 100 years"))
        };
        let receive_window = window("--receive-window", self.receive_window)?;
        let lookup_window = window("--lookup-window", self.lookup_window)?;
        if lookup_window < receive_window {
            return Err("--lookup-window must not be shorter than --receive-window".into());
        }
        // Amounts are stored in signed 64-bit columns.
        if self.max_amount == 0 || i64::try_from(self.max_amount).is_err() {
            return Err(format!("--max-amount must be between 1 and {}", i64::MAX));
        }
        if self.request_timeout.is_zero() {
            return Err("--request-timeout must be more than 0".into());
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.max_concurrent_requests) {
            return Err(format!(
                "--max-concurrent-requests must be between 1 and {}",
                Semaphore::MAX_PERMITS
            ));
        }
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.store_concurrency) {
            return Err(format!(
                "--store-concurrency must be between 1 and {}",
                Semaphore::MAX_PERMITS
            ));
        }
        if !(1..=MAX_RECIPIENTS_LIMIT).contains(&self.max_recipients) {
            return Err(format!(
                "--max-recipients must be between 1 and {MAX_RECIPIENTS_LIMIT}"
            ));
        }
        // Zero would let a retry take over a request that is still running, every time.
        let idempotency_lease = chrono::TimeDelta::from_std(self.idempotency_lease)
            .ok()
            .filter(|_| (Duration::from_millis(1)..=MAX_IDEMPOTENCY_LEASE).contains(&self.idempotency_lease))
            .ok_or("--idempotency-lease must be between 1ms and 1h (the default is 10s)")?;
        Ok(Policy {
            receive_window,
            lookup_window,
            max_amount: Amount::new(self.max_amount),
            max_recipients: self.max_recipients,
            idempotency_lease,
        })
    }
}

impl Settings {
    /// Every check of the settings, the same for every command, before anything is opened
    /// or written: first those that would give a service unable to keep money (an SQLite
    /// store that is no file, no database connection, a gateway check turned off by an
    /// empty secret), then the policy, the claim lease and the sweepers. The message names
    /// the setting and says what to write instead.
    pub fn validate(&self) -> Result<(), String> {
        check_database_url(&self.database_url)?;
        if let Some(url) = &self.redis_url {
            check_redis_url(url)?;
        }
        if let Some(ca) = &self.redis_ca {
            let all_tls = self
                .redis_url
                .as_deref()
                .is_some_and(|url| url.split(',').all(|node| node.trim().starts_with("rediss://")));
            if !all_tls {
                return Err("--redis-ca is set but --redis-url is not rediss:// (every node, for a cluster): the CA only serves TLS".into());
            }
            if !ca.is_file() {
                return Err(format!("--redis-ca {} is not a readable file", ca.display()));
            }
        }
        if self.database_max_connections == 0 {
            return Err(
                "--database-max-connections is 0, so no request could reach the database: write at least 1 (the default is 16)"
                    .into(),
            );
        }
        if self
            .gateway_secret
            .as_deref()
            .is_some_and(|secret| secret.trim().is_empty())
        {
            return Err("--gateway-secret is empty, which would turn the gateway check off: set the secret the gateway sends, or leave the setting out to trust the identity headers as they come".into());
        }
        self.policy()?;
        self.claim_lease()?;
        self.sweep()?;
        self.otlp_traces_url()?;
        Ok(())
    }

    /// The URL spans are posted to: `--otlp-endpoint` as given when it has a path, else
    /// with the OTLP/HTTP traces path `/v1/traces` (so `http://collector:4318` works, as
    /// the collector's base address). Plain `http` only: no TLS client is built in (send
    /// to a collector agent beside the instance).
    pub fn otlp_traces_url(&self) -> Result<Option<String>, String> {
        let Some(endpoint) = self.otlp_endpoint.as_deref() else {
            return Ok(None);
        };
        let refused = |why: &str| {
            format!(
                "--otlp-endpoint {}: {why}; write the collector's OTLP/HTTP address, e.g. http://127.0.0.1:4318",
                redact_url(endpoint)
            )
        };
        let uri: axum::http::Uri = endpoint.parse().map_err(|_| refused("not a URL"))?;
        if uri.scheme_str() != Some("http") {
            return Err(refused(
                "only http:// is supported (no TLS client is built in: send to a collector agent beside the instance)",
            ));
        }
        let Some(authority) = uri.authority().filter(|a| !a.host().is_empty()) else {
            return Err(refused("no host"));
        };
        match (uri.path(), uri.query()) {
            ("" | "/", None) => Ok(Some(format!("http://{authority}/v1/traces"))),
            _ => Ok(Some(endpoint.to_owned())),
        }
    }

    /// Checks the claim lease: long enough for a claim to record its share (a few
    /// round trips), and, with Redis, shorter than the request time-out, so that a share
    /// held by a claim that died is back before its member's retry would time out.
    pub fn claim_lease(&self) -> Result<chrono::TimeDelta, String> {
        chrono::TimeDelta::from_std(self.claim_lease)
            .ok()
            .filter(|lease| *lease >= chrono::TimeDelta::milliseconds(100))
            // Only the Redis gate hands out shares with a lease.
            .filter(|_| self.redis_url.is_none() || self.claim_lease < self.request_timeout)
            .ok_or_else(|| "--claim-lease must be at least 100ms and shorter than --request-timeout".into())
    }

    /// Checks the sweepers' settings and turns them into [`SweepSettings`].
    pub fn sweep(&self) -> Result<SweepSettings, String> {
        if !(Duration::from_millis(1)..=Duration::from_secs(24 * 60 * 60)).contains(&self.sweep_interval) {
            return Err("--sweep-interval must be between 1ms and 1 day".into());
        }
        let retention_grace = chrono::TimeDelta::from_std(self.retention_grace)
            .ok()
            .filter(|grace| *grace <= chrono::TimeDelta::days(36_500))
            .ok_or("--retention-grace must be at most 100 years")?;
        Ok(SweepSettings {
            interval: self.sweep_interval,
            retention_grace,
        })
    }
}

/// How the sweepers run (see `crate::jobs`), checked by [`Settings::sweep`]. Defined here,
/// with the settings it comes from, so that the settings depend on no other module.
#[derive(Debug, Clone, Copy)]
pub struct SweepSettings {
    /// The pause between passes that found nothing more to do.
    pub interval: Duration,
    /// How long after its lookup window a spray is kept before it is purged.
    pub retention_grace: chrono::TimeDelta,
}

/// Settings print without secrets: URLs lose their passwords, the gateway secret is hidden.
impl fmt::Debug for Settings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Settings")
            .field("listen", &self.listen)
            .field("database_url", &redact_url(&self.database_url))
            .field("database_max_connections", &self.database_max_connections)
            .field("redis_url", &self.redis_url.as_deref().map(redact_url))
            .field("redis_ca", &self.redis_ca)
            .field("redis_key_prefix", &self.redis_key_prefix)
            .field("claim_lease", &self.claim_lease)
            .field("receive_window", &self.receive_window)
            .field("lookup_window", &self.lookup_window)
            .field("max_amount", &self.max_amount)
            .field("max_recipients", &self.max_recipients)
            .field(
                "gateway_secret",
                &self.gateway_secret.as_ref().map(|_| "<hidden>"),
            )
            .field("shutdown_timeout", &self.shutdown_timeout)
            .field("log_format", &self.log_format)
            .field("request_timeout", &self.request_timeout)
            .field("max_concurrent_requests", &self.max_concurrent_requests)
            .field("store_concurrency", &self.store_concurrency)
            .field("config", &self.config)
            .field("sweep_interval", &self.sweep_interval)
            .field("retention_grace", &self.retention_grace)
            .field("idempotency_lease", &self.idempotency_lease)
            .field("otlp_endpoint", &self.otlp_endpoint.as_deref().map(redact_url))
            .finish()
    }
}

impl Settings {
    /// The settings as a TOML file that `--config` reads back to the same settings, every
    /// key written (the defaults too), secrets excepted: a password in a URL prints as
    /// `***` and the gateway secret as `<hidden>`, each with a comment saying so. Pasted back
    /// unchanged, those fail closed (a refused login, every API request refused), never
    /// open.
    pub fn to_toml(&self) -> String {
        use std::fmt::Write as _;
        let text = |value: &str| toml::Value::String(value.to_owned()).to_string();
        let duration = |value: Duration| text(&humantime::format_duration(value).to_string());
        let mut out = String::from(
            "# The effective settings of spray (defaults < config file < environment < flags),\n\
             # validated as `spray serve` would. Use it as a config file: spray --config FILE\n",
        );
        let mut line = |key: &str, value: String| {
            let _ = writeln!(out, "{key} = {value}");
        };
        line("listen", text(&self.listen));
        line("database_url", text(&redact_url(&self.database_url)));
        line(
            "database_max_connections",
            self.database_max_connections.to_string(),
        );
        if let Some(url) = &self.redis_url {
            line("redis_url", text(&redact_url(url)));
        }
        if let Some(ca) = &self.redis_ca {
            line("redis_ca", text(&ca.display().to_string()));
        }
        line("redis_key_prefix", text(&self.redis_key_prefix));
        line("claim_lease", duration(self.claim_lease));
        line("receive_window", duration(self.receive_window));
        line("lookup_window", duration(self.lookup_window));
        line("max_amount", self.max_amount.to_string());
        line("max_recipients", self.max_recipients.to_string());
        if self.gateway_secret.is_some() {
            line("gateway_secret", text("<hidden>"));
        }
        line("shutdown_timeout", duration(self.shutdown_timeout));
        let log_format = match self.log_format {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        };
        line("log_format", text(log_format));
        if let Some(endpoint) = &self.otlp_endpoint {
            line("otlp_endpoint", text(&redact_url(endpoint)));
        }
        line("request_timeout", duration(self.request_timeout));
        line(
            "max_concurrent_requests",
            self.max_concurrent_requests.to_string(),
        );
        line("store_concurrency", self.store_concurrency.to_string());
        line("sweep_interval", duration(self.sweep_interval));
        line("idempotency_lease", duration(self.idempotency_lease));
        line("retention_grace", duration(self.retention_grace));
        let hidden_password = |url: &str| redact_url(url) != url;
        if hidden_password(&self.database_url) || self.redis_url.as_deref().is_some_and(hidden_password) {
            out.push_str("# A password in a URL is printed as ***: write the real one back before use.\n");
        }
        if self.gateway_secret.is_some() {
            out.push_str(
                "# gateway_secret is set and printed as <hidden>: write the real one back before use.\n",
            );
        }
        if self.redis_url.is_none() {
            out.push_str("# redis_url is not set: no Redis, claims take the SQL path alone.\n");
        }
        if self.gateway_secret.is_none() {
            out.push_str("# gateway_secret is not set: the identity headers are trusted as they come.\n");
        }
        if self.otlp_endpoint.is_none() {
            out.push_str("# otlp_endpoint is not set: no spans are exported.\n");
        }
        out
    }
}

/// Refuses an SQLite URL that names no file (`sqlite://`, as an unset variable in a script
/// leaves it) or an in-memory database: either would accept money and lose it.
fn check_database_url(url: &str) -> Result<(), String> {
    if url.starts_with("mysql:") {
        return check_mysql_url(url);
    }
    let Some(rest) = url.strip_prefix("sqlite:") else {
        return Err(format!(
            "--database-url {} is neither sqlite://FILE nor mysql://USER:PASSWORD@HOST:PORT/DATABASE",
            redact_url(url)
        ));
    };
    if let Err(e) = sqlx::sqlite::SqliteConnectOptions::from_str(url) {
        return Err(format!("--database-url {}: {e}", redact_url(url)));
    }
    let rest = rest.strip_prefix("//").unwrap_or(rest);
    let (path, options) = rest.split_once('?').unwrap_or((rest, ""));
    if path.trim().is_empty() {
        return Err("--database-url sqlite:// names no file (an unset variable?): write sqlite://spray.db, or the path of the file to keep the money in".into());
    }
    let in_memory = path.starts_with(":memory:") || options.split('&').any(|option| option == "mode=memory");
    if in_memory {
        return Err("--database-url names an in-memory SQLite database, which loses every record when the process stops: write sqlite://FILE, for example sqlite://spray.db".into());
    }
    Ok(())
}

/// The options a `mysql://` URL may carry (sqlx ignores any other without a word, so a
/// misspelt `ssl-mode` would silently connect without TLS).
const MYSQL_URL_OPTIONS: &[&str] = &[
    "ssl-mode",
    "sslmode",
    "ssl-ca",
    "sslca",
    "ssl-cert",
    "sslcert",
    "ssl-key",
    "sslkey",
    "charset",
    "collation",
    "statement-cache-capacity",
    "socket",
    "timezone",
    "time-zone",
];

/// A `mysql://` URL that sqlx reads, names a database, carries only options it knows,
/// and names certificate files that exist.
fn check_mysql_url(url: &str) -> Result<(), String> {
    let shown = redact_url(url);
    let options = sqlx::mysql::MySqlConnectOptions::from_str(url).map_err(|e| {
        format!("--database-url {shown}: {e} (write mysql://USER:PASSWORD@HOST:PORT/DATABASE)")
    })?;
    if options.get_database().is_none_or(str::is_empty) {
        return Err(format!(
            "--database-url {shown} names no database: write mysql://USER:PASSWORD@HOST:PORT/DATABASE (spray keeps its tables in that database)"
        ));
    }
    let query = url.split_once('?').map_or("", |(_, query)| query);
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        if !MYSQL_URL_OPTIONS.contains(&key) {
            return Err(format!(
                "--database-url {shown}: unknown option `{key}` (known: {})",
                MYSQL_URL_OPTIONS.join(", ")
            ));
        }
        let is_file = matches!(
            key,
            "ssl-ca" | "sslca" | "ssl-cert" | "sslcert" | "ssl-key" | "sslkey"
        );
        if is_file && !std::path::Path::new(value).is_file() {
            return Err(format!(
                "--database-url {shown}: {key}={value} is not a readable file"
            ));
        }
    }
    Ok(())
}

/// Each node of a `--redis-url` is a URL the Redis client reads.
fn check_redis_url(url: &str) -> Result<(), String> {
    use redis::IntoConnectionInfo;
    let nodes: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|node| !node.is_empty())
        .collect();
    if nodes.is_empty() {
        return Err("--redis-url is empty: write redis://HOST:PORT (or rediss:// for TLS), or leave it out for no Redis".into());
    }
    for node in nodes {
        if let Err(e) = node.into_connection_info() {
            return Err(format!(
                "--redis-url {}: {e} (write redis://[:PASSWORD@]HOST:PORT, rediss:// for TLS)",
                redact_url(node)
            ));
        }
    }
    Ok(())
}

/// Parses `500ms`, `10s`, `10m`, `2h`, `7d` (and combinations such as `1h 30m`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{e} (write durations like 500ms, 10s, 10m, 7d)"))
}

/// Hides the password of every `scheme://user:password@host` in `url` (a comma-separated
/// list of URLs included).
pub fn redact_url(url: &str) -> String {
    url.split(',')
        .map(|one| match (one.find("://"), one.rfind('@')) {
            (Some(scheme_end), Some(at)) if at > scheme_end => {
                let credentials = &one[scheme_end + 3..at];
                match credentials.find(':') {
                    Some(colon) => format!(
                        "{}{}:***{}",
                        &one[..scheme_end + 3],
                        &credentials[..colon],
                        &one[at..]
                    ),
                    None => one.to_owned(),
                }
            }
            _ => one.to_owned(),
        })
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_like_the_contract_writes_them() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn passwords_never_print() {
        assert_eq!(
            redact_url("mysql://root:hunter2@db:3306/spray"),
            "mysql://root:***@db:3306/spray"
        );
        assert_eq!(redact_url("sqlite://spray.db"), "sqlite://spray.db");
        assert_eq!(
            redact_url("redis://:pw@a:1,redis://u:pw@b:2"),
            "redis://:***@a:1,redis://u:***@b:2"
        );
        let settings = Settings {
            database_url: "mysql://u:topsecret@h/db".into(),
            gateway_secret: Some("alsosecret".into()),
            ..Settings::default()
        };
        let printed = format!("{settings:?}");
        assert!(
            !printed.contains("topsecret") && !printed.contains("alsosecret"),
            "{printed}"
        );
    }

    #[test]
    fn the_printed_toml_has_a_key_for_every_setting() {
        use clap::CommandFactory;
        let settings = Settings {
            redis_url: Some("rediss://127.0.0.1:6379".into()),
            redis_ca: Some("/etc/ssl/redis-ca.pem".into()),
            gateway_secret: Some("s".into()),
            otlp_endpoint: Some("http://127.0.0.1:4318".into()),
            ..Settings::default()
        };
        let printed: toml::Table = settings.to_toml().parse().unwrap();
        let command = Cli::command();
        for long in command
            .get_arguments()
            .filter_map(|arg| arg.get_long())
            .filter(|long| !matches!(*long, "config" | "help" | "version"))
        {
            let key = long.replace('-', "_");
            assert!(printed.contains_key(&key), "`spray config` does not print {key}");
        }
    }

    #[test]
    fn flags_win_over_defaults_and_bad_limits_are_refused() {
        let cli = Cli::try_parse_from([
            "spray",
            "serve",
            "--receive-window",
            "30s",
            "--max-recipients",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.command, Some(Command::Serve));
        assert_eq!(cli.settings.receive_window, Duration::from_secs(30));
        assert_eq!(cli.settings.max_recipients, 5);
        let bad = Settings {
            lookup_window: Duration::from_secs(1),
            ..Settings::default()
        };
        assert!(bad.policy().is_err());
        let bad = Settings {
            max_amount: u64::MAX,
            ..Settings::default()
        };
        assert!(bad.policy().is_err());
        assert!(Settings::default().policy().is_ok());
    }

    #[test]
    fn the_idempotency_lease_defaults_to_ten_seconds_and_zero_is_refused() {
        let policy = Settings::default().policy().unwrap();
        assert_eq!(policy.idempotency_lease, chrono::TimeDelta::seconds(10));
        let cli = Cli::try_parse_from(["spray", "--idempotency-lease", "3s"]).unwrap();
        assert_eq!(
            cli.settings.policy().unwrap().idempotency_lease,
            chrono::TimeDelta::seconds(3)
        );
        let zero = Cli::try_parse_from(["spray", "--idempotency-lease", "0s"]).unwrap();
        let refused = zero.settings.policy().unwrap_err();
        assert!(refused.contains("--idempotency-lease"), "{refused}");
        let long = Settings {
            idempotency_lease: Duration::from_secs(2 * 60 * 60),
            ..Settings::default()
        };
        assert!(long.policy().is_err());
    }

    #[test]
    fn the_otlp_endpoint_is_off_by_default_and_gets_the_traces_path_when_it_has_none() {
        assert_eq!(Settings::default().otlp_traces_url(), Ok(None));
        let url = |endpoint: &str| {
            Settings {
                otlp_endpoint: Some(endpoint.to_owned()),
                ..Settings::default()
            }
            .otlp_traces_url()
        };
        assert_eq!(
            url("http://127.0.0.1:4318"),
            Ok(Some("http://127.0.0.1:4318/v1/traces".into()))
        );
        assert_eq!(
            url("http://collector:4318/"),
            Ok(Some("http://collector:4318/v1/traces".into()))
        );
        assert_eq!(
            url("http://collector:4318/otlp/v1/traces"),
            Ok(Some("http://collector:4318/otlp/v1/traces".into()))
        );
        for bad in [
            "",
            "collector:4318",
            "https://collector:4318",
            "grpc://c:4317",
            "http://",
            "not a url",
        ] {
            let refused = url(bad).unwrap_err();
            assert!(refused.starts_with("--otlp-endpoint"), "{bad}: {refused}");
            let settings = Settings {
                otlp_endpoint: Some(bad.to_owned()),
                ..Settings::default()
            };
            assert!(settings.validate().is_err(), "{bad}");
        }
        let cli = Cli::try_parse_from(["spray", "--otlp-endpoint", "http://c:4318"]).unwrap();
        assert_eq!(cli.settings.otlp_endpoint.as_deref(), Some("http://c:4318"));
    }

    #[test]
    fn the_sweepers_settings_have_defaults_flags_and_bounds() {
        let sweep = Settings::default().sweep().unwrap();
        assert_eq!(sweep.interval, Duration::from_secs(10));
        assert_eq!(sweep.retention_grace, chrono::TimeDelta::days(1));
        let cli =
            Cli::try_parse_from(["spray", "--sweep-interval", "500ms", "--retention-grace", "2h"]).unwrap();
        let sweep = cli.settings.sweep().unwrap();
        assert_eq!(sweep.interval, Duration::from_millis(500));
        assert_eq!(sweep.retention_grace, chrono::TimeDelta::hours(2));
        let never = Settings {
            sweep_interval: Duration::ZERO,
            ..Settings::default()
        };
        assert!(never.sweep().is_err());
        let forever = Settings {
            retention_grace: Duration::from_secs(200 * 365 * 86_400),
            ..Settings::default()
        };
        assert!(forever.sweep().is_err());
        // No grace at all is allowed: purge as soon as the lookup window closes.
        let none = Settings {
            retention_grace: Duration::ZERO,
            ..Settings::default()
        };
        assert_eq!(none.sweep().unwrap().retention_grace, chrono::TimeDelta::zero());
    }
}
