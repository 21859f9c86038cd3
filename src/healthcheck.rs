//! `spray healthcheck`: asks a running `spray serve` whether it is ready, so that an image
//! with no shell and no curl (distroless) can still have a `HEALTHCHECK`.
//!
//! One plain-HTTP `GET` over a TCP connection: the probe talks to its own service on
//! loopback, so it needs no TLS, no redirects and no client library.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Where to ask: a `host:port` and a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub authority: String,
    pub path: String,
}

impl Target {
    /// `/readyz` on the address `spray serve` listens on. An unspecified address
    /// (`0.0.0.0`, `[::]`) accepts connections on every interface, loopback included.
    pub fn from_listen(listen: &str) -> Target {
        let authority = match listen.parse::<SocketAddr>() {
            Ok(address) if address.ip().is_unspecified() => {
                let loopback = match address.ip() {
                    IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                    IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
                };
                SocketAddr::new(loopback, address.port()).to_string()
            }
            _ => listen.to_owned(),
        };
        Target {
            authority,
            path: "/readyz".to_owned(),
        }
    }

    /// `http://HOST:PORT[/PATH]` (the path defaults to `/readyz`).
    pub fn from_url(url: &str) -> Result<Target, String> {
        let rest = url.strip_prefix("http://").ok_or_else(|| {
            format!("--url {url}: write http://HOST:PORT/readyz (plain HTTP to this service)")
        })?;
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/readyz"),
        };
        if authority.is_empty() || authority.contains(['@', ' ']) {
            return Err(format!("--url {url}: no HOST:PORT"));
        }
        let authority = if authority
            .rsplit_once(':')
            .is_some_and(|(_, port)| port.parse::<u16>().is_ok())
            && !authority.ends_with(']')
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        Ok(Target {
            authority,
            path: path.to_owned(),
        })
    }
}

/// Asks `target` once; `Ok` with the status line's code, `Err` with why there was none.
pub async fn probe(target: &Target, limit: Duration) -> Result<u16, String> {
    let ask = async {
        let mut stream = TcpStream::connect(&target.authority)
            .await
            .map_err(|e| format!("cannot connect to {}: {e}", target.authority))?;
        let request = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nUser-Agent: spray-healthcheck\r\n\r\n",
            target.path, target.authority
        );
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot ask {}: {e}", target.authority))?;
        // The status line is all we need; it comes first and is short.
        let mut head = [0; 64];
        let mut read = 0;
        while read < 12 {
            let n = stream
                .read(&mut head[read..])
                .await
                .map_err(|e| format!("no answer from {}: {e}", target.authority))?;
            if n == 0 {
                break;
            }
            read += n;
        }
        let line = String::from_utf8_lossy(&head[..read]).into_owned();
        line.strip_prefix("HTTP/1.")
            .and_then(|rest| rest.get(2..5))
            .and_then(|code| code.parse::<u16>().ok())
            .ok_or_else(|| format!("{} did not answer HTTP: {line:?}", target.authority))
    };
    tokio::time::timeout(limit, ask)
        .await
        .map_err(|_| format!("no answer from {} within {limit:?}", target.authority))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_is_the_listen_address_or_the_url() {
        assert_eq!(Target::from_listen("0.0.0.0:8080").authority, "127.0.0.1:8080");
        assert_eq!(Target::from_listen("[::]:8080").authority, "[::1]:8080");
        assert_eq!(Target::from_listen("10.0.0.5:80").authority, "10.0.0.5:80");
        assert_eq!(Target::from_listen("localhost:80").authority, "localhost:80");
        let url = Target::from_url("http://127.0.0.1:9/health").unwrap();
        assert_eq!(
            (url.authority.as_str(), url.path.as_str()),
            ("127.0.0.1:9", "/health")
        );
        let url = Target::from_url("http://spray").unwrap();
        assert_eq!(
            (url.authority.as_str(), url.path.as_str()),
            ("spray:80", "/readyz")
        );
        assert!(Target::from_url("https://spray/readyz").is_err());
        assert!(Target::from_url("http:///readyz").is_err());
    }
}
