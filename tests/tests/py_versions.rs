//! End to end, issue 19 item 6: for each worker class (sync, gthread,
//! gevent, Uvicorn's), a stall's `py_stack` names the app's own function,
//! read by the tracer itself, on whatever CPython the test virtualenv
//! (TRACER_VENV) runs. `cargo xtask test --pythons` runs this file once per
//! CPython 3.9-3.13 found on the machine; the default suite runs it on the
//! project's venv (3.11). On 3.9 and 3.10 the interpreter does not record a
//! thread's OS thread id, so finding the stalled thread's stack there rests
//! on the tracer's own mapping (the tid read from the thread's pthread):
//! the gthread test checks it for every thread of the worker.
use std::time::Duration;

use tests::*;

/// The venv's `major.minor.micro`, to say which Python a failure was on.
fn python_version() -> String {
    let out = std::process::Command::new(python())
        .args(["-c", "import sys; print(sys.version.split()[0])"])
        .output()
        .expect("the venv's python runs");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn start(app: &str, class: &str, pids: &StallPids) -> GunicornProc {
    let mut g = Gunicorn::new(app)
        .worker_class(class)
        .timeout(60)
        .env("STALL_PID_FILE", pids.path());
    if class == "gthread" {
        g = g.threads(2);
    }
    g.spawn()
}

/// The stall of the thread that took the `path` request, and that thread.
fn stall_of(g: &GunicornProc, t: &mut Tracer, pids: &StallPids, path: &str) -> (Value, u32, u32) {
    let _client = get_async(g.port, path, Duration::from_secs(30));
    let (w, tid) = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w && e["tid"] == tid
    });
    (stall, w, tid)
}

/// The stack was read (no error) and its innermost frame is `innermost`
/// in `file`, with a line; `caller` of the same file is on it too.
fn assert_app_frames(stall: &Value, innermost: &str, caller: &str, file: &str) {
    let v = python_version();
    assert_eq!(stall.get("py_stack_error"), None, "python {v}: {stall}");
    let frames = py_frames(stall);
    assert!(
        frames[0].starts_with(&format!("{innermost} (")) && frames[0].contains(file),
        "python {v}: innermost frame: {frames:?}"
    );
    assert!(
        stall["py_stack"][0]["line"].as_u64().is_some_and(|l| l > 0),
        "python {v}: {stall}"
    );
    assert!(has_frame(stall, caller, file), "python {v}: {frames:?}");
}

#[test]
fn a_sync_worker_stall_names_the_app_function() {
    require_root();
    let pids = StallPids::new("pyver-sync");
    let g = start("stall_app:app", "sync", &pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    let (stall, w, tid) = stall_of(&g, &mut t, &pids, "/pipe?secs=4");
    assert_eq!(w, tid, "the sync worker's one thread");
    assert_eq!(stall["worker_class"], "sync", "{stall}");
    assert_app_frames(&stall, "pipe_read", "app", "stall_app.py");
    t.stop();
}

/// A pool thread's stall: its stack is found by its OS thread id among the
/// worker's threads, and with `--py-stack all-threads` every other Python
/// thread of the worker carries its own OS thread id (a thread of the
/// worker, each once): on 3.9/3.10 these are the tracer's mapping.
#[test]
fn a_gthread_pool_thread_stall_names_the_app_function_and_every_thread_its_tid() {
    require_root();
    let pids = StallPids::new("pyver-gthread");
    let g = start("stall_app:app", "gthread", &pids);
    let mut t =
        Tracer::start_without_py_spy(&["--pid", &g.pid().to_string(), "--py-stack", "all-threads"]);
    let (stall, w, tid) = stall_of(&g, &mut t, &pids, "/pipe?secs=4");
    assert_ne!(w, tid, "a pool thread took the request");
    assert_eq!(stall["worker_class"], "gthread", "{stall}");
    assert_app_frames(&stall, "pipe_read", "app", "stall_app.py");
    let tasks: Vec<u64> = std::fs::read_dir(format!("/proc/{w}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect();
    let others = stall["py_threads"].as_array().expect("py_threads");
    // The main thread (its loop) at least, beside the stalled pool thread.
    assert!(!others.is_empty(), "{stall}");
    let mut seen = vec![tid as u64];
    for o in others {
        let t = o["tid"]
            .as_u64()
            .unwrap_or_else(|| panic!("python {}: a thread with no tid: {o}", python_version()));
        assert!(tasks.contains(&t), "{t} is a thread of {w}: {tasks:?}");
        assert!(!seen.contains(&t), "{t} claimed twice: {stall}");
        seen.push(t);
    }
    assert!(
        seen.contains(&(w as u64)),
        "the main thread is among them: {stall}"
    );
    t.stop();
}

#[test]
fn a_gevent_worker_stall_names_the_app_function() {
    require_root();
    let pids = StallPids::new("pyver-gevent");
    let g = start("stall_app:app", "gevent", &pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    let (stall, w, tid) = stall_of(&g, &mut t, &pids, "/pipe?secs=4");
    assert_eq!(w, tid, "the hub's thread");
    assert_eq!(stall["worker_class"], "gevent", "{stall}");
    assert_app_frames(&stall, "pipe_read", "app", "stall_app.py");
    t.stop();
}

/// `time.sleep` has no Python frame of its own: the innermost frame is the
/// `async def` handler that called it.
#[test]
fn a_uvicorn_worker_stall_names_the_app_function() {
    require_root();
    let pids = StallPids::new("pyver-uvicorn");
    let g = start("asgi_app:app", "uvicorn_worker.UvicornWorker", &pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    let (stall, w, tid) = stall_of(&g, &mut t, &pids, "/sleep?secs=4");
    assert_eq!(w, tid, "the asyncio loop's thread");
    assert_eq!(stall["worker_class"], "uvicorn", "{stall}");
    assert_app_frames(&stall, "app", "app", "asgi_app.py");
    // The cause rests on the frame on every Python, not on the syscall.
    assert_eq!(stall["cause"]["id"], "time_sleep", "{stall}");
    assert_eq!(stall["cause"]["basis"], "frame", "{stall}");
    assert_eq!(stall["cause"]["frame"]["function"], "app", "{stall}");
    t.stop();
}

/// The demo's bug (multiprocessing.Queue.get() in a gevent worker): the
/// cause cites the queue's frame and the app's caller on every Python.
/// The frame's name is the interpreter's: `Queue.get` (its qualified name)
/// from 3.11, `get` on 3.9 and 3.10, which keep only the bare name.
#[test]
fn a_gevent_queue_hang_is_caused_by_its_queue_get_frame() {
    require_root();
    let v = python_version();
    let pids = HangPids::new("pyver-queue");
    let g = Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .timeout(60)
        .env("HANG_PID_FILE", pids.path())
        .spawn();
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    t.wait_for("worker", Duration::from_secs(5), |e| e["event"] == "worker");
    let _client = get_async(g.port, "/hang", Duration::from_secs(20));
    let w = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert_eq!(stall.get("py_stack_error"), None, "python {v}: {stall}");
    let cause = &stall["cause"];
    assert_eq!(
        cause["id"], "multiprocessing_queue_gevent",
        "python {v}: {stall}"
    );
    assert_eq!(cause["basis"], "frame", "python {v}: {stall}");
    let qualified = !(v.starts_with("3.9.") || v.starts_with("3.10."));
    let get = if qualified { "Queue.get" } else { "get" };
    assert_eq!(cause["frame"]["function"], get, "python {v}: {stall}");
    assert!(
        cause["frame"]["file"]
            .as_str()
            .unwrap()
            .ends_with("multiprocessing/queues.py"),
        "python {v}: {stall}"
    );
    assert_eq!(
        cause["called_from"]["function"], "enqueue_and_wait",
        "python {v}: {stall}"
    );
    let text = cause["cause"].as_str().unwrap();
    assert!(
        text.contains("multiprocessing/queues.py:") && text.contains(&format!("in {get}")),
        "python {v}: {text}"
    );
    t.stop();
}
