//! What the benchmarks share: the real `spray` binary beside them, started on a free
//! loopback port and polled until healthy, killed and reaped when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `spray serve`, killed and reaped when dropped.
pub struct Server(Child);

impl Server {
    /// The process id, to read its memory from `/proc`.
    #[allow(dead_code, reason = "used by the bench example only; this file is shared")]
    pub fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A binary of this build, beside the example's own directory:
/// `target/release/examples/NAME` -> `target/release/<binary>`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    exe.parent()
        .and_then(|p| p.parent())
        .expect("target dir")
        .join(name)
}

/// Starts `spray serve` on `database_url` with `flags` (logging at `log`) and waits for
/// `/healthz`; the server and its base URL.
pub async fn start(database_url: &str, flags: &[&str], log: &str) -> (Server, String) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let listen = listener.local_addr().expect("its address").to_string();
    drop(listener);
    let child = Command::new(binary("spray"))
        .args(["serve", "--listen", &listen, "--database-url", database_url])
        .args(flags)
        .env("RUST_LOG", log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("run the bench/ script, which builds target/release/spray first");
    let server = Server(child);
    let base = format!("http://{listen}");
    let client = reqwest::Client::new();
    for _ in 0..400 {
        if client
            .get(format!("{base}/healthz"))
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
        {
            return (server, base);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("spray serve did not start");
}
