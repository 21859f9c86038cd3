//! Redis servers the tests start themselves: a Redis Cluster of three masters (started
//! once per test binary) and single servers that a test may stop and restart.
//!
//! Each server runs under a small shell watchdog that stops it by PID as soon as the
//! test process is gone, so no server outlives the tests, even after a panic.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    /// The watchdogs, which stop the nodes when the test process ends.
    _watchdogs: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// The `--redis-url` for this cluster: its nodes, comma-separated.
    pub fn urls(&self) -> String {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The cluster of this test binary, started on first use.
pub fn shared() -> &'static RedisCluster {
    static CLUSTER: OnceLock<RedisCluster> = OnceLock::new();
    CLUSTER.get_or_init(start)
}

fn port_is_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// Three ports whose cluster bus ports (port + 10000) are free too. Candidates come from
/// a per-process counter, so two calls in one test binary never pick the same port.
fn free_ports() -> Vec<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 21000 + u16::try_from(std::process::id() % 3000).unwrap_or(0) * 10;
    let mut ports = Vec::new();
    while ports.len() < 3 {
        let candidate = base + NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(candidate < 55000, "no free ports for Redis");
        if port_is_free(candidate) && port_is_free(candidate + 10000) {
            ports.push(candidate);
        }
    }
    ports
}

fn redis_cli(port: u16, args: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("redis-cli is needed for the Redis Cluster tests");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !ready() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start() -> RedisCluster {
    let dir = tempfile::tempdir().unwrap();
    let ports = free_ports();
    let watchdogs = ports
        .iter()
        .map(|port| {
            let dir = dir.path().display();
            let cluster = format!(
                "--cluster-enabled yes --cluster-config-file nodes-{port}.conf --cluster-node-timeout 2000 --dir {dir}"
            );
            spawn_redis(*port, &cluster)
        })
        .collect();
    for port in &ports {
        wait_for("a cluster node", || redis_cli(*port, &["ping"]).trim() == "PONG");
    }
    let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(nodes.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    redis_cli(ports[0], &create);
    for port in &ports {
        wait_for("the cluster to be ready", || {
            redis_cli(*port, &["cluster", "info"]).contains("cluster_state:ok")
        });
    }
    RedisCluster {
        ports,
        _watchdogs: watchdogs,
        _dir: dir,
    }
}

fn redis_server(port: u16, extra: &str) -> String {
    format!(
        "redis-server --port {port} --bind 127.0.0.1 --save '' --appendonly no --daemonize no \
         --loglevel warning {extra}"
    )
}

/// Starts `redis-server` on `port` (no persistence) under a shell watchdog that stops it
/// by PID once the test process is gone (for servers that live as long as the process).
fn spawn_redis(port: u16, extra: &str) -> Child {
    let test_pid = std::process::id();
    let server = redis_server(port, extra);
    let watchdog = format!(
        "{server} & node=$!; while kill -0 {test_pid} 2>/dev/null; do sleep 0.5; done; kill $node; wait $node"
    );
    Command::new("sh")
        .args(["-c", &watchdog])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server is needed for these tests")
}

/// A Redis server of one test's own, which the test may stop and start again. Stopped by
/// PID when dropped (also when the test panics).
pub struct OwnRedis {
    pub port: u16,
    server: Mutex<Option<Child>>,
}

impl OwnRedis {
    pub fn start() -> OwnRedis {
        let redis = OwnRedis {
            port: free_ports()[0],
            server: Mutex::new(None),
        };
        redis.restart();
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on the same port, empty.
    pub fn restart(&self) {
        let child = Command::new("sh")
            .args(["-c", &format!("exec {}", redis_server(self.port, ""))])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for these tests");
        *self.server.lock().unwrap() = Some(child);
        wait_for("redis to start", || {
            redis_cli(self.port, &["ping"]).trim() == "PONG"
        });
    }

    /// Stops the server at once, by PID, as a crash would.
    pub fn stop(&self) {
        if let Some(mut child) = self.server.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_for("redis to stop", || port_is_free(self.port));
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        if let Ok(mut server) = self.server.lock()
            && let Some(mut child) = server.take()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
