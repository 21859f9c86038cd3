//! A TCP proxy between the service and MariaDB that a test arms to make one network fault
//! happen at an exact point of the MySQL protocol:
//! - [`Fault::LoseCommitAck`]: the next `COMMIT` reaches the server, which executes it (with
//!   any statements sent before it in the same packet), and both sides are cut before the
//!   answer reaches the service ("acknowledgement lost");
//! - [`Fault::DropCommit`]: the next `COMMIT` never reaches the server (nor the statements
//!   sent with it); both sides are cut;
//! - [`Fault::DropCommitAfter`]: as [`Fault::DropCommit`], after letting that many `COMMIT`s
//!   through;
//! - [`Fault::DownAtBegin`]: at the next `BEGIN` every connection is cut and new ones are
//!   refused (accepted and closed at once, as a restarting server's port does) until
//!   [`DbProxy::up`].
//!
//! sqlx sends `BEGIN`, `COMMIT` and `ROLLBACK` as text queries: a `COM_QUERY` packet (command
//! byte 0x03) whose payload is exactly the statement. The batch writers send `BEGIN` at the
//! head of a multi-statement and `COMMIT` at its tail (`src/store/batch_tx.rs`), so a
//! `COM_QUERY` whose first statement is `BEGIN`, or whose last is `COMMIT`, counts too (the
//! batches' statements hold no `;` of their own: their strings are hexadecimal literals).
//! Every other packet passes untouched.
//! Only the client-to-server stream is parsed (3-byte little-endian length, sequence byte,
//! payload); the server's answers are forwarded as they come, unless muted.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// MySQL's `COM_QUERY` command byte.
const COM_QUERY: u8 = 0x03;
/// How long a forwarded `COMMIT` is given to execute before the connection is cut anyway,
/// should the server's answer not come back first.
const COMMIT_GRACE: Duration = Duration::from_millis(500);

/// A fault to make happen once, at the next statement it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    LoseCommitAck,
    DropCommit,
    DropCommitAfter(u32),
    DownAtBegin,
}

/// What to do with one client packet.
enum Action {
    Forward,
    /// Forward it, then cut before the answer comes back.
    ForwardThenCut,
    /// Cut without forwarding it.
    Cut,
    /// Cut every connection and refuse new ones.
    GoDown,
}

struct Shared {
    upstream: String,
    armed: Mutex<Option<Fault>>,
    fired: AtomicU32,
    down: AtomicBool,
    /// Bumped to cut every open connection.
    cuts: watch::Sender<u64>,
}

impl Shared {
    fn on_packet(&self, payload: &[u8]) -> Action {
        let Some((&COM_QUERY, text)) = payload.split_first() else {
            return Action::Forward;
        };
        let mut armed = self.armed.lock().unwrap();
        let statements: Vec<&[u8]> = text.split(|&b| b == b';').map(<[u8]>::trim_ascii).collect();
        let commits = statements
            .last()
            .is_some_and(|s| s.eq_ignore_ascii_case(b"COMMIT"));
        let begins = statements
            .first()
            .is_some_and(|s| s.eq_ignore_ascii_case(b"BEGIN"));
        let action = match *armed {
            Some(Fault::LoseCommitAck) if commits => Action::ForwardThenCut,
            Some(Fault::DropCommit | Fault::DropCommitAfter(0)) if commits => Action::Cut,
            Some(Fault::DropCommitAfter(pass)) if commits => {
                *armed = Some(Fault::DropCommitAfter(pass - 1));
                return Action::Forward;
            }
            Some(Fault::DownAtBegin) if begins => Action::GoDown,
            _ => return Action::Forward,
        };
        *armed = None;
        self.fired.fetch_add(1, Ordering::SeqCst);
        action
    }

    fn cut_everything(&self) {
        self.cuts.send_modify(|generation| *generation += 1);
    }
}

/// The proxy, listening on a port of its own; stops when dropped.
pub struct DbProxy {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl DbProxy {
    /// A proxy to `upstream` (`host:port`).
    pub async fn start(upstream: &str) -> DbProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared {
            upstream: upstream.to_owned(),
            armed: Mutex::new(None),
            fired: AtomicU32::new(0),
            down: AtomicBool::new(false),
            cuts: watch::channel(0).0,
        });
        let accept = {
            let shared = shared.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    if shared.down.load(Ordering::SeqCst) {
                        drop(client);
                        continue;
                    }
                    tokio::spawn(relay(client, shared.clone()));
                }
            })
        };
        DbProxy { addr, shared, accept }
    }

    /// Makes `fault` happen at the next statement it names (once).
    pub fn arm(&self, fault: Fault) {
        *self.shared.armed.lock().unwrap() = Some(fault);
    }

    /// How many armed faults have happened.
    pub fn fired(&self) -> u32 {
        self.shared.fired.load(Ordering::SeqCst)
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.shared.down.store(true, Ordering::SeqCst);
        self.shared.cut_everything();
    }

    /// Accepts connections again.
    pub fn up(&self) {
        self.shared.down.store(false, Ordering::SeqCst);
    }
}

impl Drop for DbProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.shared.cut_everything();
    }
}

/// Relays one connection until either side closes, a fault cuts it, or everything is cut.
/// Returning drops both sockets: both sides see the connection end.
async fn relay(client: TcpStream, shared: Arc<Shared>) {
    let Ok(server) = TcpStream::connect(&shared.upstream).await else {
        return;
    };
    let mut cuts = shared.cuts.subscribe();
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    // Set before a COMMIT is forwarded whose answer must never reach the client.
    let mute = AtomicBool::new(false);

    let downstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match from_server.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            if mute.load(Ordering::SeqCst) || to_client.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    };
    let upstream = async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut pending: Vec<u8> = Vec::new();
        loop {
            let n = match from_client.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            pending.extend_from_slice(&buf[..n]);
            // Whole packets only: a header is 3 bytes of length and 1 of sequence.
            while pending.len() >= 4 {
                let len =
                    usize::from(pending[0]) | usize::from(pending[1]) << 8 | usize::from(pending[2]) << 16;
                if pending.len() < 4 + len {
                    break;
                }
                let packet: Vec<u8> = pending.drain(..4 + len).collect();
                match shared.on_packet(&packet[4..]) {
                    Action::Forward => {
                        if to_server.write_all(&packet).await.is_err() {
                            return;
                        }
                    }
                    Action::ForwardThenCut => {
                        mute.store(true, Ordering::SeqCst);
                        let _ = to_server.write_all(&packet).await;
                        // The server's answer ends the relay (muted) as soon as it comes.
                        tokio::time::sleep(COMMIT_GRACE).await;
                        return;
                    }
                    Action::Cut => return,
                    Action::GoDown => {
                        shared.down.store(true, Ordering::SeqCst);
                        shared.cut_everything();
                        return;
                    }
                }
            }
        }
    };
    tokio::select! {
        () = downstream => {}
        () = upstream => {}
        _ = cuts.changed() => {}
    }
}
