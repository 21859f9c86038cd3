//! TLS to MySQL/MariaDB and to Redis, through the real binary: a private MariaDB that
//! requires secure transport and a private Redis that listens on TLS only, both with
//! certificates this test makes (the `openssl` command), each started on a loopback port
//! of its own and stopped by PID.
//!
//! - a spray is created and received through `spray serve` with
//!   `ssl-mode=VERIFY_CA&ssl-ca=…` and `rediss://…` (`--redis-ca`), and the gate is used;
//! - a CA that did not sign the server's certificate is refused with a message that says
//!   so: the store cannot be opened (exit 1), Redis is reported down at start (the service
//!   still serves: Redis only accelerates);
//! - the same for a Redis Cluster of three masters that speaks TLS only, to clients and
//!   on its bus (`--tls-cluster yes`): the gate is used over TLS, a wrong CA is said.

mod common;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::process::*;
use serde_json::{Value, json};
use sqlx::{ConnectOptions, Connection};

const TEST_LIMIT: Duration = Duration::from_secs(240);
const READY_LIMIT: Duration = Duration::from_secs(60);

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &Path, args: &[&str]) {
    let output = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the openssl command is needed for the TLS tests");
    assert!(
        output.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// A CA and a certificate it signed for 127.0.0.1, and a second CA that signed nothing.
struct Certificates {
    ca: PathBuf,
    wrong_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_certificates(dir: &Path) -> Certificates {
    let subject = |name: &str| format!("/CN={name}");
    for (key, pem, name) in [
        ("ca.key", "ca.pem", "spray test CA"),
        ("wrong.key", "wrong.pem", "another CA"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                pem,
                "-days",
                "2",
                "-subj",
                &subject(name),
            ],
        );
    }
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            &subject("127.0.0.1"),
        ],
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    Certificates {
        ca: dir.join("ca.pem"),
        wrong_ca: dir.join("wrong.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

fn current_user() -> String {
    let output = Command::new("id").arg("-un").output().expect("run id -un");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

/// A private MariaDB that refuses any connection without TLS.
struct TlsMariaDb {
    port: u16,
    dir: PathBuf,
    _server: ChildGuard,
}

impl TlsMariaDb {
    async fn start(dir: &Path, certs: &Certificates) -> TlsMariaDb {
        let data = dir.join("data");
        let log = File::create(dir.join("install.log")).unwrap();
        let installed = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg(format!("--user={}", current_user()))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .status()
            .expect("mariadb-install-db is needed for the TLS tests");
        assert!(
            installed.success(),
            "{}",
            std::fs::read_to_string(dir.join("install.log")).unwrap()
        );
        let port = free_port();
        let out = File::create(dir.join("mariadbd.out")).unwrap();
        let server = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--user={}", current_user()))
            .arg(format!("--datadir={}", data.display()))
            .arg(format!("--port={port}"))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", dir.join("error.log").display()))
            .arg("--skip-name-resolve")
            .arg("--innodb-buffer-pool-size=64M")
            .arg(format!("--ssl-cert={}", certs.cert.display()))
            .arg(format!("--ssl-key={}", certs.key.display()))
            .arg(format!("--ssl-ca={}", certs.ca.display()))
            .arg("--require-secure-transport=ON")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("/usr/sbin/mariadbd is needed for the TLS tests");
        let db = TlsMariaDb {
            port,
            dir: dir.to_owned(),
            _server: ChildGuard(server),
        };
        let admin = format!("{}&ssl-ca={}", db.url("mysql", "VERIFY_CA"), certs.ca.display());
        let began = Instant::now();
        loop {
            let attempt =
                tokio::time::timeout(Duration::from_secs(2), sqlx::MySqlConnection::connect(&admin)).await;
            if let Ok(Ok(mut conn)) = attempt {
                sqlx::query("CREATE DATABASE spray")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn.close().await.ok();
                return db;
            }
            assert!(
                began.elapsed() < READY_LIMIT,
                "the TLS MariaDB did not answer: {attempt:?}\n{}",
                std::fs::read_to_string(db.dir.join("error.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self, database: &str, ssl_mode: &str) -> String {
        format!(
            "mysql://root@127.0.0.1:{}/{database}?ssl-mode={ssl_mode}",
            self.port
        )
    }
}

/// A private Redis listening on TLS only (`--port 0`).
struct TlsRedis {
    port: u16,
    _server: ChildGuard,
}

impl TlsRedis {
    async fn start(dir: &Path, certs: &Certificates) -> TlsRedis {
        let port = free_port();
        let out = File::create(dir.join("redis.log")).unwrap();
        let server = Command::new("redis-server")
            .args([
                "--port",
                "0",
                "--tls-port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
            ])
            .args(["--tls-cert-file", certs.cert.to_str().unwrap()])
            .args(["--tls-key-file", certs.key.to_str().unwrap()])
            .args(["--tls-ca-cert-file", certs.ca.to_str().unwrap()])
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("redis-server is needed for the TLS tests");
        let redis = TlsRedis {
            port,
            _server: ChildGuard(server),
        };
        let ca = std::fs::read(&certs.ca).unwrap();
        let began = Instant::now();
        loop {
            let client = redis::Client::build_with_tls(
                redis.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(ca.clone()),
                },
            )
            .unwrap();
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return redis;
            }
            assert!(
                began.elapsed() < READY_LIMIT,
                "the TLS Redis did not answer:\n{}",
                std::fs::read_to_string(dir.join("redis.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

async fn post(client: &reqwest::Client, server: &Server, path: &str, user: i64, body: Value) -> (u16, Value) {
    let answer = client
        .post(server.url(path))
        .header("x-user-id", user.to_string())
        .header("x-room-id", "R")
        .json(&body)
        .send()
        .await
        .unwrap_or_else(|e| panic!("POST {path}: {e}\n{}", server.log_text()));
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// User 1 sprays 1,000 over two shares through `server`, and user 2 receives 500 of it.
async fn spray_then_receive(client: &reqwest::Client, server: &Server) {
    let (status, sprayed) = post(
        client,
        server,
        "/api/v1/spray",
        1,
        json!({"amount": 1000, "recipient_count": 2}),
    )
    .await;
    assert_eq!(status, 201, "{sprayed}\n{}", server.log_text());
    let token = sprayed["token"].as_str().unwrap().to_owned();
    let (status, received) = post(client, server, "/api/v1/receive", 2, json!({"token": token})).await;
    assert_eq!(
        (status, received["received_amount"].as_i64()),
        (200, Some(500)),
        "{received}\n{}",
        server.log_text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spray_reaches_mariadb_and_redis_over_tls_and_refuses_a_wrong_ca() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certs = make_certificates(dir.path());
        let mariadb_dir = dir.path().join("mariadb");
        std::fs::create_dir(&mariadb_dir).unwrap();
        let mariadb = TlsMariaDb::start(&mariadb_dir, &certs).await;
        let redis = TlsRedis::start(dir.path(), &certs).await;
        let ca = certs.ca.display().to_string();
        let wrong_ca = certs.wrong_ca.display().to_string();
        let database_url = format!("{}&ssl-ca={ca}", mariadb.url("spray", "VERIFY_CA"));

        // The server refuses the same user without TLS (MariaDB says "access denied" or
        // "insecure transport"): what works below works by TLS.
        let plain: sqlx::mysql::MySqlConnectOptions = mariadb.url("spray", "DISABLED").parse().unwrap();
        let refused = plain.connect().await.map(drop).unwrap_err().to_string();
        assert!(
            refused.contains("insecure transport") || refused.contains("Access denied"),
            "{refused}"
        );

        // A spray made and received through spray serve, on both over TLS.
        let mut server = Server::start(
            dir.path(),
            &database_url,
            &["--redis-url", &redis.url(), "--redis-ca", &ca],
            &[],
        )
        .await;
        assert!(
            server.log_text().contains("redis answers"),
            "{}",
            server.log_text()
        );
        let client = client();
        spray_then_receive(&client, &server).await;
        let ready: Value = client
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(
            (ready["sql"].as_str(), ready["redis"].as_str()),
            (Some("up"), Some("up")),
            "{ready}"
        );
        // The gate handed out the share: the receiver is in Redis.
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("spray_gate_events_total") && !l.ends_with(" 0")),
            "the gate was not used:\n{metrics}"
        );
        assert_eq!(server.terminate().await.code(), Some(0), "{}", server.log_text());

        // A CA that did not sign MariaDB's certificate: the store is not opened.
        let wrong = format!("{}&ssl-ca={wrong_ca}", mariadb.url("spray", "VERIFY_CA"));
        let run = run_spray(
            dir.path(),
            "wrong-ca",
            &["migrate", "--database-url", &wrong],
            &[],
            COMMAND_LIMIT,
        )
        .await;
        assert_eq!(run.status.code(), Some(1), "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("127.0.0.1:{}", mariadb.port))
                && run.stderr.contains("TLS")
                && run.stderr.contains("UnknownIssuer"),
            "{}",
            run.stderr
        );

        // A CA that did not sign Redis's certificate: said at start; SQL still serves.
        let mut server = Server::start(
            dir.path(),
            &database_url,
            &["--redis-url", &redis.url(), "--redis-ca", &wrong_ca],
            &[],
        )
        .await;
        let log = server.log_text();
        assert!(
            log.contains("redis does not answer at start") && log.contains("UnknownIssuer"),
            "{log}"
        );
        let (status, _) = post(
            &client,
            &server,
            "/api/v1/spray",
            1,
            json!({"amount": 10, "recipient_count": 2}),
        )
        .await;
        assert_eq!(status, 201);
        let ready: Value = client
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(ready["redis"].as_str(), Some("down"), "{ready}");
        assert_eq!(server.terminate().await.code(), Some(0));
    })
    .await
    .expect("the test finished in time");
}

/// A port whose cluster bus port (port + 10000) is free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port < 55_000 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// `redis-cli` over TLS to the node on `port`, trusting `ca`; its standard output. Cut
/// after 30 s (`--cluster create` waits forever for nodes that cannot meet).
fn redis_cli_tls(ca: &Path, port: u16, args: &[&str]) -> String {
    let output = Command::new("timeout")
        .args([
            "30",
            "redis-cli",
            "--tls",
            "--cacert",
            ca.to_str().unwrap(),
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is needed for the TLS tests");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Polls `ready` until it holds, for at most [`READY_LIMIT`].
async fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let began = Instant::now();
    while !ready() {
        assert!(began.elapsed() < READY_LIMIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A Redis Cluster of three masters that speaks TLS only, to clients and between its
/// nodes (`--tls-cluster yes`); each node stopped by PID when dropped.
struct TlsRedisCluster {
    ports: Vec<u16>,
    _nodes: Vec<ChildGuard>,
}

impl TlsRedisCluster {
    async fn start(dir: &Path, certs: &Certificates) -> TlsRedisCluster {
        let mut ports = Vec::new();
        while ports.len() < 3 {
            let port = free_cluster_port();
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        let mut nodes = Vec::new();
        for port in &ports {
            let out = File::create(dir.join(format!("redis-{port}.log"))).unwrap();
            let node = Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .args(["--tls-cluster", "yes", "--tls-replication", "yes"])
                .args(["--tls-cert-file", certs.cert.to_str().unwrap()])
                .args(["--tls-key-file", certs.key.to_str().unwrap()])
                .args(["--tls-ca-cert-file", certs.ca.to_str().unwrap()])
                .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")])
                .current_dir(dir)
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .expect("redis-server is needed for the TLS tests");
            nodes.push(ChildGuard(node));
        }
        for port in &ports {
            wait_until("a TLS cluster node", || {
                redis_cli_tls(&certs.ca, *port, &["ping"]).trim() == "PONG"
            })
            .await;
        }
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = vec!["--cluster", "create"];
        create.extend(addresses.iter().map(String::as_str));
        create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
        redis_cli_tls(&certs.ca, ports[0], &create);
        for port in &ports {
            wait_until("the TLS cluster to be ready", || {
                redis_cli_tls(&certs.ca, *port, &["cluster", "info"]).contains("cluster_state:ok")
            })
            .await;
        }
        TlsRedisCluster { ports, _nodes: nodes }
    }

    /// The `--redis-url` of the cluster: its nodes, comma-separated, over TLS.
    fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("rediss://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_reaches_a_redis_cluster_over_tls_and_a_wrong_ca_is_said() {
    tokio::time::timeout(TEST_LIMIT, async {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certs = make_certificates(dir.path());
        let cluster = TlsRedisCluster::start(dir.path(), &certs).await;
        let ca = certs.ca.display().to_string();
        let database_url = database_url(dir.path());

        // A spray made and received through spray serve, the gate on the cluster over TLS.
        let mut server = Server::start(
            dir.path(),
            &database_url,
            &["--redis-url", &cluster.urls(), "--redis-ca", &ca],
            &[],
        )
        .await;
        assert!(
            server.log_text().contains("redis answers"),
            "{}",
            server.log_text()
        );
        let client = client();
        spray_then_receive(&client, &server).await;
        let metrics = client
            .get(server.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let gate = |event: &str| {
            metrics
                .lines()
                .find(|l| l.starts_with(&format!("spray_gate_events_total{{event=\"{event}\"}}")))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        assert!(
            gate("hit") + gate("rebuild") >= 1.0,
            "the gate was not used:\n{metrics}"
        );
        assert_eq!(
            gate("fallback"),
            0.0,
            "a claim fell back to SQL alone:\n{metrics}"
        );
        assert_eq!(server.terminate().await.code(), Some(0), "{}", server.log_text());

        // A CA that did not sign the nodes' certificate: said at start; SQL still serves.
        let wrong_ca = certs.wrong_ca.display().to_string();
        let mut server = Server::start(
            dir.path(),
            &database_url,
            &["--redis-url", &cluster.urls(), "--redis-ca", &wrong_ca],
            &[],
        )
        .await;
        let log = server.log_text();
        assert!(log.contains("redis does not answer at start"), "{log}");
        let (status, _) = post(
            &client,
            &server,
            "/api/v1/spray",
            1,
            json!({"amount": 10, "recipient_count": 2}),
        )
        .await;
        assert_eq!(status, 201);
        assert_eq!(server.terminate().await.code(), Some(0));
    })
    .await
    .expect("the test finished in time");
}
