//! A target that makes its stack huge, or its threads many, gets a bounded
//! answer: at most 64 frames with the rest counted, a clear error past the
//! reader's own depth limit, at most 32 other threads. Real Gunicorn, the
//! real tracer, as root.
use std::time::Duration;

use serde_json::Value;
use tests::*;

fn gunicorn(class: &str, pids: &StallPids) -> GunicornProc {
    Gunicorn::new("stall_app:app")
        .worker_class(class)
        .timeout(60)
        .env("STALL_PID_FILE", pids.path())
        .spawn()
}

/// The first stall of the worker that took the request.
fn stall_of(t: &mut Tracer, pids: &StallPids) -> Value {
    let (w, _) = pids.wait_nth(0);
    t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w
    })
    .1
}

#[test]
fn a_frame_chain_a_thousand_deep_gives_64_frames_and_counts_the_rest() {
    require_root();
    let pids = StallPids::new("deep");
    let g = gunicorn("gevent", &pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    let _client = get_async(g.port, "/deep?depth=1000&secs=3", Duration::from_secs(30));
    let stall = stall_of(&mut t, &pids);
    let frames = py_frames(&stall);
    assert_eq!(frames.len(), 64, "{frames:?}");
    assert!(frames[0].starts_with("pipe_read ("), "{frames:?}");
    assert!(
        frames[1..].iter().all(|f| f.starts_with("deep (")),
        "{frames:?}"
    );
    let omitted = stall["py_stack_omitted"].as_u64().unwrap();
    assert!(omitted > 900, "the outer frames are counted: {omitted}");
    assert_eq!(stall.get("py_stack_error"), None, "{stall}");
    t.stop();
}

/// py-spy stops at 4,096 frames: past it the stall says why it has no
/// stack, in one bounded line, and is still reported in full otherwise.
#[test]
fn a_frame_chain_past_the_readers_limit_is_a_clear_error() {
    require_root();
    let pids = StallPids::new("deeper");
    let g = gunicorn("gevent", &pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    // The worker's reader is set up first, as it is when a worker is
    // found: a stall with its stack proves it. (py-spy cannot find the
    // interpreter of a process already past its depth limit, so a set-up
    // that comes after the deep call gives that error instead.)
    let _shallow = get_async(g.port, "/deep?depth=3&secs=1", Duration::from_secs(30));
    let first = stall_of(&mut t, &pids);
    assert!(first["py_stack"].is_array(), "{first}");
    let _client = get_async(g.port, "/deep?depth=6000&secs=3", Duration::from_secs(30));
    let (w, _) = pids.wait_nth(1);
    let (_, stall) = t.wait_for("the deep stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w && e["py_stack"].is_null()
    });
    assert_eq!(stall["syscall"], "read", "{stall}");
    assert_eq!(stall["fd_kind"], "pipe", "{stall}");
    assert_eq!(stall.get("py_stack"), None, "{stall}");
    let err = stall["py_stack_error"].as_str().unwrap();
    assert!(err.contains("recursion depth"), "{err}");
    assert!(err.len() <= 400, "{err}");
    t.stop();
}

/// 60 threads and `--py-stack all-threads`: the blocked thread's stack,
/// and at most 32 others.
#[test]
fn threads_past_the_cap_give_at_most_32_other_stacks() {
    require_root();
    let pids = StallPids::new("threads");
    let g = gunicorn("sync", &pids);
    let mut t =
        Tracer::start_without_py_spy(&["--pid", &g.pid().to_string(), "--py-stack", "all-threads"]);
    let _client = get_async(g.port, "/threads?n=60&secs=3", Duration::from_secs(30));
    let stall = stall_of(&mut t, &pids);
    assert!(has_frame(&stall, "pipe_read", "stall_app.py"), "{stall}");
    let others = stall["py_threads"].as_array().unwrap();
    assert_eq!(others.len(), 32, "{}", others.len());
    assert!(
        others
            .iter()
            .all(|o| o["frames"].as_array().is_some_and(|f| f.len() <= 64)),
        "{stall}"
    );
    t.stop();
}
