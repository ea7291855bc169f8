//! End to end, the article's second lesson: nginx (Debian's package) in
//! front of real Gunicorn 27 + gevent, running tests/apps/leak_app.py with a
//! worker that behaves like Gunicorn < 19.8 (tests/apps/old_worker.py).
//! While /rpc has a default socket timeout leaked, slow uploads accepted by
//! the same worker time out in their body read; Gunicorn closes them with
//! nothing sent and nginx answers 502.
use std::time::Duration;

use tests::*;

#[test]
fn every_502_from_nginx_is_one_dropped_request_event() {
    require_root();
    let mut g = Gunicorn::new("leak_app:app")
        .worker_class("old_worker.OldGeventWorker")
        .workers(1)
        .env("LEAKED_TIMEOUT", "0.5")
        .spawn();
    let port = g.port;
    let nginx = Nginx::start(port);
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let worker = t
        .wait_for("worker", Duration::from_secs(5), |e| e["event"] == "worker")
        .1["pid"]
        .clone();

    // Healthy traffic first: plain GETs and slow uploads with no leak.
    for _ in 0..20 {
        assert!(get(nginx.port, "/").ends_with("ok\n"));
    }
    for _ in 0..2 {
        assert!(slow_upload(nginx.port, Duration::from_millis(800)).contains("200"));
    }

    // The leak: /rpc sets socket.setdefaulttimeout(0.5) for 3 s; uploads
    // accepted meanwhile inherit it, and so do GETs (which do not wait).
    let rpc = get_async(nginx.port, "/rpc", Duration::from_secs(20));
    g.wait_line("default socket timeout 0.5 leaked", Duration::from_secs(5));
    let np = nginx.port;
    let uploads: Vec<_> = (0..4)
        .map(|_| std::thread::spawn(move || slow_upload(np, Duration::from_secs(1))))
        .collect();
    for _ in 0..10 {
        let _ = get(nginx.port, "/");
    }
    let upload_status: Vec<String> = uploads.into_iter().map(|h| h.join().unwrap()).collect();
    assert!(rpc.recv().unwrap().unwrap().contains("rpc done"));

    // nginx logs a request as it ends: wait for all of them, then for one
    // event per 502; `stop` then reads whatever else was reported.
    let expected = 20 + 2 + 1 + 4 + 10;
    let statuses = eventually("every request logged", Duration::from_secs(5), || {
        let s = nginx.statuses();
        (s.len() >= expected).then_some(s)
    });
    let n502 = statuses.iter().filter(|s| **s == 502).count();
    assert!(
        n502 >= 1,
        "the leak produced no 502 at all: {statuses:?} {upload_status:?}"
    );
    assert_eq!(statuses.len(), expected, "every request is in nginx's log");
    t.wait_count("dropped requests", n502, Duration::from_secs(5), |e| {
        e["event"] == "early_close" && e["kind"] == "dropped_request"
    });
    let summary = t.stop();
    let drops: Vec<&Value> = t
        .of_kind("early_close")
        .into_iter()
        .filter(|e| e["kind"] == "dropped_request")
        .collect();
    assert_eq!(
        drops.len(),
        n502,
        "one dropped_request per 502: {drops:#?}\n{statuses:?}"
    );
    assert_eq!(
        t.of_kind("early_close").len(),
        n502,
        "answered requests produce no early_close: {:#?}",
        t.of_kind("early_close")
    );
    let mut peers = std::collections::HashSet::new();
    for e in &drops {
        assert_eq!(e["pid"], worker);
        assert_eq!(e["direction"], "inbound");
        assert_eq!(e["local_port"], port, "{e}");
        assert_eq!(e["ended_by"], "close");
        assert_eq!(e["bytes_out"], 0);
        let peer = e["peer"].as_str().unwrap();
        assert!(
            peer.starts_with("127.0.0.1:"),
            "nginx's loopback address: {peer}"
        );
        assert!(
            peers.insert(peer.to_string()),
            "each drop is a different connection"
        );
        let wait = e["preceded_by"]["wait_ms"].as_u64().unwrap();
        assert_eq!(e["preceded_by"]["ret"], "EAGAIN");
        assert!(
            (400..1500).contains(&wait),
            "waited about the leaked 0.5 s: {e}"
        );
        assert_eq!(e["cause"]["id"], "leaked_socket_timeout", "{e}");
    }
    g.wait_line("Socket error processing request", Duration::from_secs(1));

    let text = summary["verdict"]["text"].as_str().unwrap();
    assert_eq!(
        summary["verdict"]["dropping_pids"],
        serde_json::json!([worker])
    );
    assert!(
        text.contains(&format!("dropped {n502} request(s)")),
        "{text}"
    );
    assert!(text.contains("setdefaulttimeout"), "{text}");
}
