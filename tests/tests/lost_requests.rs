//! End to end: requests that are lost, and connections that only look
//! lost, on a real Gunicorn 27 running tests/apps/exits_app.py.
use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use tests::*;

/// A TCP health check: connect, send nothing, close (kubelet `tcpSocket`,
/// a load balancer's TCP check, a port scanner).
fn tcp_probe(port: u16) -> u16 {
    let c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.local_addr().unwrap().port()
}

/// A client that sends `request` and leaves after `wait`, before any answer.
fn leave_early(port: u16, request: &[u8], wait: Duration) -> u16 {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.write_all(request).unwrap();
    std::thread::sleep(wait);
    c.local_addr().unwrap().port()
}

fn dropped(t: &Tracer) -> Vec<&Value> {
    t.of_kind("early_close")
        .into_iter()
        .filter(|e| e["kind"] == "dropped_request")
        .collect()
}

#[test]
fn health_checks_and_client_aborts_are_counted_never_blamed_on_a_worker() {
    require_root();
    let g = Gunicorn::new("exits_app:app").workers(2).spawn();
    let port = g.port;
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    t.wait_count("workers", 2, Duration::from_secs(5), |e| {
        e["event"] == "worker"
    });

    let probes: Vec<u16> = (0..6).map(|_| tcp_probe(port)).collect();
    // Half a request, then gone: Gunicorn reads EOF and closes, nothing sent.
    let half = leave_early(port, b"GET / HTTP/1.1\r\nHost:", Duration::from_millis(200));
    // A whole request to a slow endpoint, then gone before the answer
    // (what nginx logs as 499).
    let slow = leave_early(
        port,
        b"GET /slow?s=1 HTTP/1.1\r\nHost: x\r\n\r\n",
        Duration::from_millis(200),
    );

    t.wait_count("probes", probes.len(), Duration::from_secs(5), |e| {
        e["event"] == "early_close" && e["kind"] == "probe"
    });
    let (_, abort) = t.wait_for("the half request", Duration::from_secs(5), |e| {
        e["event"] == "early_close" && e["peer"] == format!("127.0.0.1:{half}")
    });
    assert_eq!(abort["kind"], "client_abort", "{abort}");
    assert_eq!(abort["peer_closed_first"], true, "{abort}");
    assert_eq!(abort["bytes_in"], 21, "the FIN is not a byte: {abort}");
    // The slow request is answered into a closed connection: not lost by
    // the worker either way.
    assert!(get(port, "/slow?s=1").ends_with("slow\n"));
    t.collect_for(Duration::from_millis(1500));

    for p in &probes {
        let e = t
            .of_kind("early_close")
            .into_iter()
            .find(|e| e["peer"] == format!("127.0.0.1:{p}"))
            .unwrap_or_else(|| panic!("no event for probe {p}: {:#?}", t.events));
        assert_eq!(e["kind"], "probe", "{e}");
        assert_eq!(e["bytes_in"], 0, "the FIN is not a byte: {e}");
        assert_eq!(e["peer_closed_first"], true, "{e}");
        assert_eq!(e["cause"], Value::Null, "{e}");
    }
    assert!(
        t.of_kind("early_close")
            .iter()
            .all(|e| e["peer"] != format!("127.0.0.1:{slow}") || e["kind"] == "client_abort"),
        "{:#?}",
        t.of_kind("early_close")
    );
    assert!(dropped(&t).is_empty(), "{:#?}", dropped(&t));

    let summary = t.stop();
    assert_eq!(
        summary["verdict"]["dropping_pids"],
        serde_json::json!([]),
        "{summary}"
    );
    let text = summary["verdict"]["text"].as_str().unwrap();
    assert!(!text.contains("dropped"), "no worker is blamed: {text}");
    let counted: u64 = summary["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["early_closes"]["probe"].as_u64().unwrap_or(0))
        .sum();
    assert_eq!(counted, probes.len() as u64, "{summary}");
}
