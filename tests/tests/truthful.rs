//! End to end, issue 18 (say only what you know), with real Gunicorn from
//! the test virtualenv running tests/apps/stall_app.py: a stall is called
//! what the evidence shows, and every figure in a report is current, with a
//! lower bound written as one.
use std::time::Duration;

use tests::*;

fn gevent(pids: &StallPids, timeout: u32) -> GunicornProc {
    Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .timeout(timeout)
        .env("STALL_PID_FILE", pids.path())
        .spawn()
}

fn stalls_of(t: &Tracer, pid: u32) -> Vec<Value> {
    t.of_kind("stall")
        .into_iter()
        .filter(|e| e["pid"] == pid)
        .cloned()
        .collect()
}

/// Item 1: a `poll()` the loop thread began before the tracer found the
/// worker's loop was called busy ("many short blocking calls"), with no
/// syscall, once the loop was found. It is one long sleep: blocked in
/// poll(), with its fd and peer, timed from its true start.
#[test]
fn a_poll_begun_before_the_loop_is_found_is_blocked_in_poll_not_busy() {
    require_root();
    let (_db, port) = tcp_server(&["silent"]);
    let pids = StallPids::new("early-poll");
    let g = gevent(&pids, 60);
    // The first search for the loop comes 6 s after the attach.
    let mut t = Tracer::start(&["--pid", &g.pid().to_string(), "--loop-search-every", "6s"]);
    let _client = get_async(
        g.port,
        &format!("/db?host=127.0.0.1&port={port}&secs=40"),
        Duration::from_secs(45),
    );
    let (w, _) = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(15), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert!(
        t.of_kind("loop").iter().any(|e| e["pid"] == w),
        "judged once the loop was known"
    );
    assert_eq!(stall["state"], "blocked", "{stall}");
    assert!(
        stall["syscall"] == "poll" || stall["syscall"] == "ppoll",
        "{stall}"
    );
    assert_eq!(stall["tid"], w, "{stall}");
    assert_eq!(
        stall["since_attach"], false,
        "timed from its start: {stall}"
    );
    assert!(
        stall["blocked_ms"].as_u64().unwrap() >= 3000,
        "from the call's start, before the loop was found: {stall}"
    );
    let fds = stall["wait_fds"].as_array().unwrap();
    assert_eq!(fds.len(), 1, "{stall}");
    assert_eq!(fds[0]["peer"], format!("127.0.0.1:{port}"), "{stall}");
    t.collect_for(Duration::from_secs(3));
    assert!(
        stalls_of(&t, w).iter().all(|s| s["state"] == "blocked"),
        "never busy: {:?}",
        stalls_of(&t, w)
    );
    t.stop();
}

/// Item 2: attached to a worker already blocked, the verdict said
/// "blocked 8.0s" for a call blocked longer (the figure counts from the
/// attach), and the summary kept the heartbeat age of the first report
/// next to a blocked time that kept growing. Both are current and a lower
/// bound is written as one.
#[test]
fn attached_to_a_worker_already_stuck_the_figures_are_current_and_a_lower_bound_says_so() {
    require_root();
    let pids = StallPids::new("stuck-before");
    let g = gevent(&pids, 60);
    let _client = get_async(g.port, "/forever", Duration::from_secs(60));
    let (w, _) = pids.wait_nth(0);
    std::thread::sleep(Duration::from_secs(3));
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert_eq!(stall["since_attach"], true, "{stall}");
    assert_eq!(stall["syscall"], "read", "{stall}");
    t.collect_for(Duration::from_secs(4));
    let summary = t.stop();
    let worker = summary["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["pid"] == w)
        .expect("the worker in the summary");
    let st = &worker["stall"];
    let blocked = st["blocked_ms"].as_u64().unwrap();
    let heartbeat = st["heartbeat_age_ms"].as_u64().unwrap();
    assert!(blocked >= 4000, "current, not the first report's: {st}");
    // The heartbeat stopped when the hub blocked, 3 s before the attach.
    assert!(
        heartbeat >= blocked + 2000,
        "the heartbeat age is current too: {st}"
    );
    let text = summary["verdict"]["text"].as_str().unwrap();
    assert!(text.contains("blocked at least "), "{text}");
}

/// Item 3: a worker's idle `ProcessPoolExecutor` child waits in read() on
/// its call queue's pipe for the next task. It was called STALLED; a wait
/// for work is idle.
#[test]
fn an_idle_process_pool_child_of_a_worker_is_not_stalled() {
    require_root();
    let g = Gunicorn::new("stall_app:app").worker_class("sync").spawn();
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let body = get(g.port, "/pool");
    assert!(body.contains("pool child"), "{body}");
    let child: u32 = body.trim().rsplit(' ').next().unwrap().parse().unwrap();
    let (_, c) = t.wait_for("the pool's child", Duration::from_secs(5), |e| {
        e["event"] == "worker" && e["pid"] == child
    });
    assert_eq!(c["role"], "child", "{c}");
    // Idle well past the threshold.
    t.collect_for(Duration::from_secs(3));
    let stalls = t.of_kind("stall");
    assert!(stalls.is_empty(), "nothing is stalled: {stalls:?}");
    let summary = t.stop();
    let text = summary["verdict"]["text"].as_str().unwrap();
    assert!(!text.contains("STALLED"), "{text}");
}

/// Item 7: a gthread worker at --worker-connections waits on its pool's
/// futures in its main thread, 1 s at a time, heartbeating in between: not
/// a blocked loop. The pool thread that holds the request is the stall.
#[test]
fn a_gthread_worker_at_worker_connections_is_not_a_loop_stall() {
    require_root();
    let pids = StallPids::new("connections");
    let g = Gunicorn::new("stall_app:app")
        .worker_class("gthread")
        .threads(2)
        .worker_connections(1)
        .timeout(30)
        .env("STALL_PID_FILE", pids.path())
        .spawn();
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let slow = get_async(g.port, "/pipe?secs=5", Duration::from_secs(20));
    let (w, tid) = pids.wait_nth(0);
    assert_ne!(w, tid, "a pool thread took the request");
    let (_, stall) = t.wait_for("the pool thread's stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert_eq!(stall["tid"], tid, "{stall}");
    assert!(stall["request_peer"].is_string(), "{stall}");
    let reply = slow.recv_timeout(Duration::from_secs(15)).unwrap().unwrap();
    assert!(reply.contains("read"), "{reply}");
    t.collect_for(Duration::from_millis(500));
    let main: Vec<_> = stalls_of(&t, w)
        .into_iter()
        .filter(|s| s["tid"] == w)
        .collect();
    assert!(main.is_empty(), "the main thread never stalled: {main:?}");
    t.stop();
}

/// Item 7: a connection the worker opened to an upstream before the attach
/// was taken for a client's (inbound by default): closed after being idle,
/// and answered by the upstream afterwards, it was called a keep-alive race
/// ("the client or load balancer sent its next request..."). Its direction
/// comes from the listening ports now.
#[test]
fn an_upstream_connection_opened_before_the_attach_is_no_keepalive_race() {
    require_root();
    let (_upstream, port) = tcp_server(&["late"]);
    let g = Gunicorn::new("stall_app:app").worker_class("sync").spawn();
    let held = get(g.port, &format!("/hold?port={port}"));
    assert!(held.contains("held 1"), "{held}");
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    t.wait_for("the worker", Duration::from_secs(5), |e| {
        e["event"] == "worker" && e["role"] == "worker"
    });
    // Idle past Gunicorn's keep-alive, as a race's connection would be.
    std::thread::sleep(Duration::from_millis(2500));
    let released = get(g.port, "/release");
    assert!(released.contains("released"), "{released}");
    t.collect_for(Duration::from_secs(2));
    let races: Vec<_> = t
        .of_kind("early_close")
        .into_iter()
        .filter(|e| e["kind"] == "keepalive_race")
        .collect();
    assert!(races.is_empty(), "no client lost a request: {races:?}");
    t.stop();
}
