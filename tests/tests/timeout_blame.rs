//! A WORKER TIMEOUT is blamed only on a stall of the worker's loop thread
//! (the one that heartbeats) inside the timeout window, with real Gunicorn:
//! a gthread pool thread stalled in a read cannot stop the heartbeat, so it
//! is never the cause named for the kill.
use std::time::Duration;

use tests::*;

#[test]
fn a_worker_timeout_is_not_blamed_on_a_pool_threads_stall() {
    require_root();
    let pids = StallPids::new("blame");
    let mut g = Gunicorn::new("stall_app:app")
        .worker_class("gthread")
        .threads(2)
        .workers(1)
        .timeout(5)
        .env("STALL_PID_FILE", pids.path())
        .spawn();
    let master = g.pid();
    let mut t = Tracer::start(&["--pid", &master.to_string()]);
    t.wait_for("the worker's loop", Duration::from_secs(10), |e| {
        e["event"] == "loop"
    });
    let _client = get_async(g.port, "/forever", Duration::from_secs(40));
    let (w, tid) = pids.wait_nth(0);
    assert_ne!(w, tid, "a pool thread took the request");
    let (_, stall) = t.wait_for("the pool thread's stall", Duration::from_secs(8), |e| {
        e["event"] == "stall" && e["pid"] == w && e["tid"] == tid
    });
    // The pipe's only writer is this process, whose other threads may
    // still write it: no "can never return".
    assert_eq!(stall["only_self_can_wake"], true, "{stall}");
    assert!(stall["threads"].as_u64().unwrap() >= 2, "{stall}");
    assert_eq!(stall["cause"]["id"], "self_pipe_wait", "{stall}");
    assert!(
        !stall["cause"]["cause"].as_str().unwrap().contains("never"),
        "{stall}"
    );
    // The main thread keeps the heartbeat while the pool thread is stuck
    // (Gunicorn would never kill it): stop the whole worker, so that its
    // heartbeat stops for a reason no stall of its loop thread shows.
    // SAFETY: kill(2) on the worker this test started.
    assert_eq!(unsafe { libc::kill(w as i32, libc::SIGSTOP) }, 0);
    g.wait_line(
        &format!("WORKER TIMEOUT (pid:{w})"),
        Duration::from_secs(20),
    );
    let (_, kill) = t.wait_for("worker_timeout", Duration::from_secs(10), |e| {
        e["event"] == "worker_timeout" && e["pid"] == w
    });
    assert!(
        kill["stall"].is_null(),
        "a pool thread's read cannot stop the heartbeat: {kill}"
    );
    // Gunicorn's SIGKILL ends the stopped worker.
    t.wait_for("the worker's exit", Duration::from_secs(20), |e| {
        e["event"] == "worker_exit" && e["pid"] == w
    });
    let summary = t.stop();
    let text = summary["verdict"]["text"].as_str().unwrap();
    assert!(
        text.contains(&format!(
            "worker {w} (master {master}) was killed by Gunicorn's WORKER TIMEOUT; no stall of its loop thread was seen in the timeout window"
        )),
        "{text}"
    );
    assert!(!text.contains("WORKER TIMEOUT after"), "{text}");
}
