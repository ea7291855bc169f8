//! Every worker class end to end with the real package: Gunicorn's `sync`,
//! `gthread` and `gevent`, and Uvicorn's worker (an asyncio loop). For each,
//! its event loop's own wait is found, one real stall is named (before
//! Gunicorn's WORKER TIMEOUT where Gunicorn kills it), and a healthy run
//! under wrk has no stall at all.
use std::time::{Duration, Instant};

use tests::*;

fn start(app: &str, class: &str, timeout: u32, pids: &StallPids) -> GunicornProc {
    let mut g = Gunicorn::new(app)
        .worker_class(class)
        .workers(2)
        .timeout(timeout)
        .env("STALL_PID_FILE", pids.path());
    if class == "gthread" {
        g = g.threads(4);
    }
    g.spawn()
}

/// The tracer on `g`, once it has found every worker's loop; each loop's
/// wait must be `wait`.
fn tracer_with_loops(g: &GunicornProc, wait: &str) -> Tracer {
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let loops = t.wait_count("both workers' loops", 2, Duration::from_secs(10), |e| {
        e["event"] == "loop"
    });
    assert!(loops.iter().all(|l| l["wait"] == wait), "{loops:?}");
    t
}

/// The stall of the worker that took the `path` request: named, and (when
/// Gunicorn kills for it) before the WORKER TIMEOUT.
fn stall_named(g: &mut GunicornProc, t: &mut Tracer, pids: &StallPids, path: &str) -> Value {
    let _client = get_async(g.port, path, Duration::from_secs(40));
    let (w, _) = pids.wait_nth(0);
    let (at, stall) = t.wait_for("stall", Duration::from_secs(8), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    if stall["tid"] == w {
        let kill = g.wait_line(
            &format!("WORKER TIMEOUT (pid:{w})"),
            Duration::from_secs(20),
        );
        assert!(
            at < kill.at,
            "named before Gunicorn's WORKER TIMEOUT: {stall}"
        );
    }
    stall
}

/// wrk on `/` for 5 s: served, and not one stall.
fn healthy_under_load(g: &GunicornProc, t: &mut Tracer) {
    let began = Instant::now();
    let served = wrk(g.port, "/", 16, 5);
    assert!(served > 100, "wrk got {served} responses");
    t.collect_for(Duration::from_secs(1));
    assert!(
        t.of_kind("stall").is_empty(),
        "no stall under load ({served} requests in {:?}): {:?}; loops: {:?}",
        began.elapsed(),
        t.of_kind("stall"),
        t.of_kind("loop")
    );
}

#[test]
fn sync_worker() {
    require_root();
    let (_db, port) = tcp_server(&["silent"]);
    let pids = StallPids::new("sync");
    let mut g = start("stall_app:app", "sync", 4, &pids);
    let mut t = tracer_with_loops(&g, "select");
    healthy_under_load(&g, &mut t);
    let path = format!("/db?port={port}&secs=30");
    let stall = stall_named(&mut g, &mut t, &pids, &path);
    assert!(
        stall["syscall"] == "poll" || stall["syscall"] == "ppoll",
        "{stall}"
    );
    assert_eq!(stall["worker_class"], "sync", "{stall}");
    assert_eq!(
        stall["wait_fds"][0]["peer"],
        format!("127.0.0.1:{port}"),
        "{stall}"
    );
    t.stop();
}

#[test]
fn gthread_worker() {
    require_root();
    let pids = StallPids::new("gthread-class");
    let mut g = start("stall_app:app", "gthread", 4, &pids);
    let mut t = tracer_with_loops(&g, "epoll_wait");
    healthy_under_load(&g, &mut t);
    let stall = stall_named(&mut g, &mut t, &pids, "/forever");
    assert_ne!(stall["tid"], stall["pid"], "a pool thread: {stall}");
    assert_eq!(stall["syscall"], "read", "{stall}");
    t.stop();
}

#[test]
fn gevent_worker() {
    require_root();
    let pids = StallPids::new("gevent-class");
    let mut g = start("stall_app:app", "gevent", 4, &pids);
    let mut t = tracer_with_loops(&g, "epoll_wait");
    healthy_under_load(&g, &mut t);
    let stall = stall_named(&mut g, &mut t, &pids, "/pipe?secs=30");
    assert_eq!(stall["syscall"], "read", "{stall}");
    assert_eq!(stall["fd_kind"], "pipe", "{stall}");
    t.stop();
}

#[test]
fn uvicorn_worker() {
    require_root();
    let pids = StallPids::new("uvicorn");
    let mut g = start("asgi_app:app", "uvicorn_worker.UvicornWorker", 4, &pids);
    let mut t = tracer_with_loops(&g, "epoll_wait");
    healthy_under_load(&g, &mut t);
    let stall = stall_named(&mut g, &mut t, &pids, "/sleep?secs=30");
    assert_eq!(stall["worker_class"], "uvicorn", "{stall}");
    assert!(
        stall["syscall"].as_str().unwrap().contains("sleep"),
        "{stall}"
    );
    // The stack names the sleep's caller (time.sleep has no Python frame
    // of its own); the fix is the async one.
    assert_eq!(stall["cause"]["id"], "time_sleep", "{stall}");
    assert_eq!(stall["cause"]["basis"], "frame", "{stall}");
    assert_eq!(stall["cause"]["frame"]["function"], "app", "{stall}");
    assert!(
        stall["cause"]["fix"]
            .as_str()
            .unwrap()
            .contains("asyncio.sleep"),
        "{stall}"
    );
    t.stop();
}
