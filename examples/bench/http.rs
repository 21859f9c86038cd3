//! The load generator's HTTP client: one keep-alive HTTP/1.1 connection per server, owned
//! by one connection task, and driven by that task itself.
//!
//! Why not reqwest (which the benchmark used until 2026-12-05): its pool drives each
//! connection in a task of its own, so every request crossed from the sending task to the
//! connection's task and back, waiting each time behind the other tasks of the generator's
//! runtime. On this two-core machine those waits were part of every figure: `wrk` (C,
//! epoll) drove the same SQLite server to 24,400-25,500 creates/s where reqwest reached
//! 19,000-20,000/s, with a third of the machine idle. Here the connection's I/O is
//! polled in the same task as the request (see BENCHMARKS.md for the two side by side).

use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::client::conn::http1::{self, Connection, SendRequest};
use hyper::header::{CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

/// A request not answered within this is a failed request, as reqwest's timeout was.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The sending half of a connection, and the future that does its reads and writes.
type Open = (
    SendRequest<Full<Bytes>>,
    std::pin::Pin<Box<Connection<TokioIo<TcpStream>, Full<Bytes>>>>,
);

/// One connection to one server, opened when first used and again after it fails.
struct Conn {
    base: String,
    /// `host:port` of `base`, for the `Host` header and to connect.
    authority: String,
    open: Option<Open>,
}

/// One connection task's connections: one per server it sends to.
#[derive(Default)]
pub struct Http {
    conns: Vec<Conn>,
}

/// A request to send: its method, path, headers and (JSON) body.
pub struct Call<'a> {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(&'static str, &'a str)>,
    pub body: Option<Vec<u8>>,
}

impl<'a> Call<'a> {
    pub fn get(path: String, headers: Vec<(&'static str, &'a str)>) -> Self {
        Call {
            method: Method::GET,
            path,
            headers,
            body: None,
        }
    }

    pub fn post(path: String, headers: Vec<(&'static str, &'a str)>, body: &serde_json::Value) -> Self {
        Call {
            method: Method::POST,
            path,
            headers,
            body: Some(body.to_string().into_bytes()),
        }
    }
}

impl Http {
    pub fn new() -> Self {
        Http::default()
    }

    /// Sends `call` to the server at `base` (`http://host:port`) and reads the whole answer:
    /// its status and body, or `None` on any transport error or timeout (the connection is
    /// then dropped, and opened again by the next call).
    pub async fn send(&mut self, base: &str, call: Call<'_>) -> Option<(u16, Bytes)> {
        let conn = self.conn(base);
        let answer = tokio::time::timeout(TIMEOUT, conn.exchange(call)).await;
        match answer {
            Ok(Some(answer)) => Some(answer),
            _ => {
                conn.open = None;
                None
            }
        }
    }

    fn conn(&mut self, base: &str) -> &mut Conn {
        let at = match self.conns.iter().position(|c| c.base == base) {
            Some(at) => at,
            None => {
                let authority = base.strip_prefix("http://").unwrap_or(base).to_owned();
                self.conns.push(Conn {
                    base: base.to_owned(),
                    authority,
                    open: None,
                });
                self.conns.len() - 1
            }
        };
        &mut self.conns[at]
    }
}

impl Conn {
    async fn exchange(&mut self, call: Call<'_>) -> Option<(u16, Bytes)> {
        if self.open.is_none() {
            let stream = TcpStream::connect(&self.authority).await.ok()?;
            stream.set_nodelay(true).ok()?;
            let (sender, driver) = http1::handshake(TokioIo::new(stream)).await.ok()?;
            self.open = Some((sender, Box::pin(driver)));
        }
        let (sender, driver) = self.open.as_mut()?;
        let mut request = Request::builder()
            .method(call.method)
            .uri(call.path)
            .header(HOST, HeaderValue::from_str(&self.authority).ok()?);
        for (name, value) in call.headers {
            request = request.header(name, value);
        }
        if call.body.is_some() {
            request = request.header(CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(call.body.unwrap_or_default())))
            .ok()?;
        let exchange = async {
            // Ready once the previous exchange is over on the connection's side too.
            sender.ready().await.ok()?;
            let answer = sender.send_request(request).await.ok()?;
            let status = answer.status().as_u16();
            let body = answer.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        };
        // The connection's reads and writes are polled here, in the caller's task, with
        // the exchange: no other task is woken between a request and its answer. The
        // driver ends only when the connection does.
        tokio::select! {
            biased;
            answer = exchange => answer,
            _ = driver.as_mut() => None,
        }
    }
}
