//! A MariaDB server of the fault tests' own: installed into a temporary directory,
//! listening on a loopback port of its own, with durable commits, so that it can be
//! killed with -9, restarted (crash recovery) and frozen with SIGSTOP without touching
//! the machine's MariaDB.
//!
//! The server is stopped by PID when the guard is dropped (also when a test panics), and
//! a small shell watchdog kills it if the test process itself dies first.

use std::fs::File;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;

use crate::common::process::free_port;

/// How long a (re)started server may take to answer: crash recovery included.
const READY_LIMIT: Duration = Duration::from_secs(60);
/// The database the service instances use.
pub const DATABASE: &str = "spray";

pub struct OwnMariaDb {
    pub port: u16,
    dir: tempfile::TempDir,
    server: Option<Child>,
    watchdog: Option<Child>,
    starts: u32,
}

/// The OS user to run as: `mariadbd` refuses to run as root unless told `--user=root`.
fn current_user() -> String {
    let output = Command::new("id")
        .arg("-un")
        .stdin(Stdio::null())
        .output()
        .expect("run id -un");
    String::from_utf8_lossy(&output.stdout).trim().to_owned()
}

fn run_signal(signal: &str, pid: u32) {
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(sent.success(), "kill {signal} {pid} failed");
}

impl OwnMariaDb {
    /// Installs a fresh data directory, starts the server and creates the database.
    pub async fn start() -> OwnMariaDb {
        let dir = tempfile::tempdir().expect("a directory for MariaDB");
        let data = dir.path().join("data");
        let install_log = dir.path().join("install.log");
        let out = File::create(&install_log).expect("create the install log");
        let installed = Command::new("mariadb-install-db")
            .arg("--no-defaults")
            .arg(format!("--datadir={}", data.display()))
            .arg("--auth-root-authentication-method=normal")
            .arg("--skip-test-db")
            .arg(format!("--user={}", current_user()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("share the install log"))
            .stderr(out)
            .status()
            .expect("mariadb-install-db is needed for the fault tests");
        assert!(
            installed.success(),
            "mariadb-install-db failed:\n{}",
            std::fs::read_to_string(&install_log).unwrap_or_default()
        );
        let mut db = OwnMariaDb {
            port: free_port(),
            dir,
            server: None,
            watchdog: None,
            starts: 0,
        };
        db.restart().await;
        let mut conn = sqlx::MySqlConnection::connect(&db.admin_url())
            .await
            .expect("connect to the own MariaDB");
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {DATABASE}")))
            .execute(&mut conn)
            .await
            .expect("create the database");
        conn.close().await.ok();
        db
    }

    pub fn admin_url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/mysql", self.port)
    }

    pub fn url(&self) -> String {
        format!("mysql://root@127.0.0.1:{}/{DATABASE}", self.port)
    }

    fn error_log(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    pub fn error_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.error_log()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    /// Starts the server on the same directory and port (crash recovery after a kill)
    /// and waits until it answers a query.
    pub async fn restart(&mut self) {
        assert!(self.server.is_none(), "MariaDB is already running");
        self.starts += 1;
        let dir = self.dir.path();
        let out =
            File::create(dir.join(format!("mariadbd-{}.out", self.starts))).expect("create the output file");
        let child = Command::new("/usr/sbin/mariadbd")
            .arg("--no-defaults")
            .arg(format!("--user={}", current_user()))
            .arg(format!("--datadir={}", dir.join("data").display()))
            .arg(format!("--port={}", self.port))
            .arg("--bind-address=127.0.0.1")
            .arg(format!("--socket={}", dir.join("mariadb.sock").display()))
            .arg(format!("--pid-file={}", dir.join("mariadb.pid").display()))
            .arg(format!("--log-error={}", self.error_log().display()))
            // Durable commits (DESIGN.md section 5): an acknowledged write survives kill -9.
            .arg("--innodb-flush-log-at-trx-commit=1")
            .arg("--innodb-doublewrite=1")
            .arg("--sync-binlog=1")
            .arg("--innodb-buffer-pool-size=128M")
            .arg("--skip-name-resolve")
            .arg("--max-connections=300")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("share the output file"))
            .stderr(out)
            .spawn()
            .expect("/usr/sbin/mariadbd is needed for the fault tests");
        let pid = child.id();
        self.server = Some(child);
        // Kills the server if the test process dies before it could (a panic is handled
        // by Drop; a SIGKILL of the test is not).
        let test_pid = std::process::id();
        let watchdog = format!(
            "while kill -0 {test_pid} 2>/dev/null; do kill -0 {pid} 2>/dev/null || exit 0; sleep 1; done; kill -9 {pid}"
        );
        self.watchdog = Command::new("sh")
            .args(["-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        self.wait_ready().await;
    }

    async fn wait_ready(&mut self) {
        let began = Instant::now();
        loop {
            if let Some(server) = &mut self.server
                && let Ok(Some(status)) = server.try_wait()
            {
                panic!("mariadbd exited with {status}:\n{}", self.error_log_tail());
            }
            let attempt = tokio::time::timeout(Duration::from_secs(2), async {
                let mut conn = sqlx::MySqlConnection::connect(&self.admin_url()).await?;
                sqlx::query("SELECT 1").execute(&mut conn).await?;
                conn.close().await
            })
            .await;
            if let Ok(Ok(())) = attempt {
                return;
            }
            assert!(
                began.elapsed() < READY_LIMIT,
                "MariaDB did not answer within {READY_LIMIT:?}:\n{}",
                self.error_log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.server.as_ref().expect("MariaDB is running").id()
    }

    /// SIGKILL: the server dies mid-write; the next start runs InnoDB crash recovery.
    pub fn kill_9(&mut self) {
        if let Some(mut server) = self.server.take() {
            let _ = server.kill();
            let _ = server.wait();
        }
        self.stop_watchdog();
    }

    /// SIGSTOP: the server freezes; its connections stay open but nothing answers.
    pub fn freeze(&self) {
        run_signal("-STOP", self.pid());
    }

    pub fn thaw(&self) {
        run_signal("-CONT", self.pid());
    }

    fn stop_watchdog(&mut self) {
        if let Some(mut watchdog) = self.watchdog.take() {
            let _ = watchdog.kill();
            let _ = watchdog.wait();
        }
    }
}

impl Drop for OwnMariaDb {
    fn drop(&mut self) {
        // SIGKILL works on a stopped process too.
        self.kill_9();
    }
}
