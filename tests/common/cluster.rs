//! A Redis Cluster of three masters on loopback ports, started once per test binary.
//!
//! Each node runs under a small shell watchdog that stops the node by PID as soon as
//! the test process is gone, so no node outlives the tests, even after a panic.

use std::net::TcpListener;
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
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

/// Three ports whose cluster bus ports (port + 10000) are free too.
fn free_ports() -> Vec<u16> {
    let mut ports = Vec::new();
    let seed = u16::try_from(std::process::id() % 9000).unwrap_or(0);
    let mut candidate = 21000 + seed * 3;
    while ports.len() < 3 {
        if port_is_free(candidate) && port_is_free(candidate + 10000) {
            ports.push(candidate);
        }
        candidate += 1;
        assert!(candidate < 55000, "no free ports for the Redis Cluster");
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
    let test_pid = std::process::id();
    for port in &ports {
        let node = format!(
            "redis-server --port {port} --bind 127.0.0.1 --cluster-enabled yes \
             --cluster-config-file nodes-{port}.conf --cluster-node-timeout 2000 \
             --dir {dir} --save '' --appendonly no --daemonize no --loglevel warning",
            dir = dir.path().display()
        );
        let watchdog =
            format!("{node} & node=$!; while kill -0 {test_pid} 2>/dev/null; do sleep 0.5; done; kill $node");
        Command::new("sh")
            .args(["-c", &watchdog])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is needed for the Redis Cluster tests");
    }
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
    RedisCluster { ports, _dir: dir }
}
