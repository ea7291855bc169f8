//! The tiny HTTP server for `--metrics-addr`: GET /metrics and /healthz,
//! nothing else. The text it serves is rendered by `present::metrics`.
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Parses `--metrics-addr`: `9464`, `:9464`, `0.0.0.0:9464`, `[::]:9464`.
/// A bare port binds loopback only: exposing it is an explicit choice.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    let s = s.trim();
    let full = if let Ok(port) = s.parse::<u16>() {
        format!("127.0.0.1:{port}")
    } else if let Some(port) = s.strip_prefix(':') {
        format!("127.0.0.1:{port}")
    } else {
        s.to_string()
    };
    // A bare IPv6 address and port, as the downward API's `$(POD_IP):9464`
    // gives on an IPv6 cluster.
    let bare_v6 = || {
        let (ip, port) = full.rsplit_once(':')?;
        Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?))
    };
    full.parse::<SocketAddr>()
        .ok()
        .or_else(bare_v6)
        .ok_or_else(|| {
            format!("'{s}' is not an address; write it like 127.0.0.1:9464, 0.0.0.0:9464 or :9464")
        })
}

/// Binds now, so a port in use is an error at start, not a silent gap.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve metrics on {addr} (in use, or not an address of this host); pick another with --metrics-addr")
    })
}

/// What the server answers from: the latest metrics text, and when the
/// session last went round its loop (for /healthz).
#[derive(Clone, Default)]
pub struct Shared {
    pub text: Arc<Mutex<String>>,
    pub heartbeat: Arc<Heartbeat>,
}

/// The session's loop stamps this every tick; /healthz fails when it stops.
#[derive(Default)]
pub struct Heartbeat(AtomicU64);

/// /healthz fails when the session loop has not ticked for this long.
const STUCK_AFTER: Duration = Duration::from_secs(15);

impl Heartbeat {
    pub fn beat(&self) {
        self.0.store(now_ms(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        now_ms().saturating_sub(self.0.load(Ordering::Relaxed)) < STUCK_AFTER.as_millis() as u64
    }
}

fn now_ms() -> u64 {
    crate::present::monotonic_ns() / 1_000_000
}

/// What one listener serves.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Serve {
    /// /metrics and /healthz.
    All,
    /// /healthz only (the loopback port for the liveness probe).
    Health,
}

/// Connections served at once on the metrics port; past it, new ones wait
/// in the kernel's backlog, costing the tracer nothing.
pub const MAX_CONNS: usize = 64;
/// A client must have sent its request within this.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// And be done within this.
const CONN_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves GET /metrics and GET /healthz, nothing else; requests are small,
/// slow clients are cut off and at most `max_conns` are served at once,
/// so a scraper cannot tie the tracer up. An accept error (EMFILE) backs
/// off instead of spinning.
pub async fn serve(listener: TcpListener, shared: Shared, what: Serve, max_conns: usize) {
    let slots = Arc::new(Semaphore::new(max_conns));
    let mut backoff = Duration::from_millis(10);
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                if backoff == Duration::from_millis(10) {
                    eprintln!("tracer: warning: metrics server: accept failed ({e}); backing off");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(10);
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(CONN_TIMEOUT, handle(conn, shared, what)).await;
            drop(permit);
        });
    }
}

/// `tracer health`: GET /healthz on a running tracer's --health-addr.
pub fn probe(addr: SocketAddr) -> Result<()> {
    use std::io::{Read, Write};
    let t = Duration::from_secs(3);
    let mut s = std::net::TcpStream::connect_timeout(&addr, t)
        .with_context(|| format!("no tracer answers on {addr}"))?;
    s.set_read_timeout(Some(t))?;
    s.set_write_timeout(Some(t))?;
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: tracer\r\nConnection: close\r\n\r\n")?;
    let mut reply = Vec::new();
    let _ = s.take(4096).read_to_end(&mut reply);
    let reply = String::from_utf8_lossy(&reply);
    let status = reply.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) == Some("200") {
        return Ok(());
    }
    anyhow::bail!(
        "the tracer on {addr} is not healthy: {}",
        reply.rsplit("\r\n\r\n").next().unwrap_or(status).trim()
    )
}

const MAX_REQUEST: usize = 8192;

async fn handle(mut conn: TcpStream, shared: Shared, what: Serve) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let Ok(n) = tokio::time::timeout_at(deadline, conn.read(&mut chunk)).await else {
            return Ok(());
        };
        let n = n?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.len() > MAX_REQUEST {
            return respond(
                &mut conn,
                "431 Request Header Fields Too Large",
                "text/plain",
                "request too large\n",
            )
            .await;
        }
    }
    let head = String::from_utf8_lossy(&buf);
    let mut first = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (first.next().unwrap_or(""), first.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") if what == Serve::All => {
            let body = shared.text.lock().map(|t| t.clone()).unwrap_or_default();
            respond(
                &mut conn,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        ("GET", "/healthz") if shared.heartbeat.healthy() => {
            respond(&mut conn, "200 OK", "text/plain", "ok\n").await
        }
        ("GET", "/healthz") => {
            respond(
                &mut conn,
                "503 Service Unavailable",
                "text/plain",
                "the tracer's event loop has not run for 15s\n",
            )
            .await
        }
        ("GET", _) => {
            respond(
                &mut conn,
                "404 Not Found",
                "text/plain",
                "only /metrics and /healthz\n",
            )
            .await
        }
        _ => {
            respond(
                &mut conn,
                "405 Method Not Allowed",
                "text/plain",
                "only GET\n",
            )
            .await
        }
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    ctype: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(parse_addr("9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(parse_addr(":9464").unwrap().to_string(), "127.0.0.1:9464");
        assert_eq!(parse_addr("0.0.0.0:80").unwrap().to_string(), "0.0.0.0:80");
        assert_eq!(parse_addr("[::]:80").unwrap().to_string(), "[::]:80");
        assert!(
            parse_addr("localhost")
                .unwrap_err()
                .contains("127.0.0.1:9464")
        );
        assert!(parse_addr("1.2.3.4:99999").is_err());
        assert_eq!(
            parse_addr("fd00::5:9464").unwrap().to_string(),
            "[fd00::5]:9464"
        );
    }
}
