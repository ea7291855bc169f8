//! The tiny HTTP server for `--metrics-addr`: GET /metrics and /healthz,
//! nothing else. The text it serves is rendered by `present::metrics`.
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

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
    full.parse::<SocketAddr>().map_err(|_| {
        format!("'{s}' is not an address; write it like 127.0.0.1:9464, 0.0.0.0:9464 or :9464")
    })
}

/// Binds now, so a port in use is an error at start, not a silent gap.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(addr).await.with_context(|| {
        format!("cannot serve metrics on {addr} (in use, or not an address of this host); pick another with --metrics-addr")
    })
}

/// Serves GET /metrics and GET /healthz, nothing else; requests are small
/// and slow clients are cut off, so a scraper cannot tie the tracer up.
pub async fn serve(listener: TcpListener, text: Arc<Mutex<String>>) {
    loop {
        let Ok((conn, _)) = listener.accept().await else {
            continue;
        };
        let text = text.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), handle(conn, text)).await;
        });
    }
}

const MAX_REQUEST: usize = 8192;

async fn handle(mut conn: TcpStream, text: Arc<Mutex<String>>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut chunk).await?;
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
        ("GET", "/metrics") => {
            let body = text.lock().map(|t| t.clone()).unwrap_or_default();
            respond(
                &mut conn,
                "200 OK",
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                &body,
            )
            .await
        }
        ("GET", "/healthz") => respond(&mut conn, "200 OK", "text/plain", "ok\n").await,
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
    }
}
