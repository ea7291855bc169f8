//! Integration tests: the real BPF programs, loaded as root, watching real
//! processes. No Gunicorn here; see gunicorn_e2e.rs for that.
use std::time::Duration;

use tests::*;

/// A Python process that blocks forever reading a pipe it alone can write to.
const SELF_PIPE_READ: &str = "import os\nr, w = os.pipe()\nos.read(r, 4)\n";

#[test]
fn blocked_pipe_read_is_reported_while_still_blocked() {
    require_root();
    let p = Proc::python(SELF_PIPE_READ);
    let pid = p.pid();
    let mut t = Tracer::start(&["--pid", &pid.to_string(), "--threshold", "300ms"]);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(5), |e| e["event"] == "stall");
    // Reported while the read is still blocked, not at its end.
    assert!(
        alive(pid),
        "the process must still be blocked when the stall is reported"
    );
    assert!(
        t.of_kind("stall_end").is_empty(),
        "no stall_end before the syscall ends"
    );
    assert_eq!(stall["pid"], pid);
    assert_eq!(stall["tid"], pid);
    assert_eq!(stall["syscall"], "read");
    assert_eq!(stall["fd_kind"], "pipe");
    assert_eq!(stall["count"], 4);
    assert!(
        stall["fd_target"].as_str().unwrap().starts_with("pipe:["),
        "{stall}"
    );
    assert!(stall["blocked_ms"].as_u64().unwrap() >= 300, "{stall}");
    assert_eq!(stall["only_self_can_wake"], true, "{stall}");
    let peers = stall["peers"].as_array().unwrap();
    assert!(
        peers.iter().any(|p| p["pid"] == pid && p["end"] == "write"),
        "the blocked process holds the write end: {stall}"
    );

    // Killing it ends the stall with outcome `exited`, and the exit is reported.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let (_, end) = t.wait_for("stall_end", Duration::from_secs(5), |e| {
        e["event"] == "stall_end"
    });
    assert_eq!(end["pid"], pid);
    assert_eq!(end["outcome"], "exited");
    let (_, exit) = t.wait_for("exit", Duration::from_secs(5), |e| {
        e["event"] == "worker_exit"
    });
    assert_eq!(exit["pid"], pid);
    assert_eq!(exit["signal"], "SIGKILL");
    let summary = t.stop();
    assert!(
        summary["verdict"]["text"]
            .as_str()
            .unwrap()
            .contains("read()"),
        "{summary}"
    );
}

#[test]
fn a_read_that_started_after_attach_and_returns_is_reported_with_its_end() {
    require_root();
    // Once the tracer is attached, blocks about 1.2 s in read until a forked
    // child writes to the pipe.
    let go = GoFile::new("read-returns");
    let code = format!(
        "{}r, w = os.pipe()\nif os.fork() == 0:\n    time.sleep(1.2)\n    os.write(w, b'x')\n    os._exit(0)\nos.read(r, 1)\nos.wait()\n",
        go.python_wait()
    );
    let p = Proc::python(&code);
    let pid = p.pid();
    let mut t = Tracer::start(&["--pid", &pid.to_string(), "--threshold", "300ms"]);
    go.release();
    let (_, stall) = t.wait_for("stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == pid
    });
    assert_eq!(stall["syscall"], "read");
    // Another process (the forked child) holds the write end, so it can be woken.
    assert_eq!(stall["only_self_can_wake"], false, "{stall}");
    let (_, end) = t.wait_for("stall_end", Duration::from_secs(5), |e| {
        e["event"] == "stall_end" && e["pid"] == pid
    });
    assert_eq!(end["outcome"], "returned");
    // The child writes 1.2 s after the fork; the read starts right after it.
    let ms = end["blocked_ms"].as_u64().unwrap();
    assert!((1000..2000).contains(&ms), "{end}");
    t.stop();
}

#[test]
fn a_forked_child_is_followed_from_its_first_syscall() {
    require_root();
    // The parent idles in sleep until told, then forks a child that blocks.
    let go = GoFile::new("fork");
    let code = format!(
        "{}r, w = os.pipe()\npid = os.fork()\nif pid == 0:\n    os.read(r, 4)\n    os._exit(0)\nos.waitpid(pid, 0)\n",
        go.python_wait()
    );
    let p = Proc::python(&code);
    let parent = p.pid();
    let mut t = Tracer::start(&["--pid", &parent.to_string(), "--threshold", "300ms"]);
    go.release();
    let (_, born) = t.wait_for("forked child", Duration::from_secs(5), |e| {
        e["event"] == "worker" && e["source"] == "fork"
    });
    let child = born["pid"].as_u64().unwrap() as u32;
    assert_ne!(child, parent);
    assert_eq!(born["master_pid"], parent);
    assert_eq!(born["role"], "child");
    let (_, stall) = t.wait_for("child's stall", Duration::from_secs(5), |e| {
        e["event"] == "stall"
    });
    assert_eq!(
        stall["pid"], child,
        "the stall is the child's, not the parent's: {stall}"
    );
    assert_eq!(stall["syscall"], "read");
    // The parent waiting for its child is idle, not a stall.
    t.collect_for(Duration::from_millis(500));
    assert!(
        t.of_kind("stall").iter().all(|s| s["pid"] == child),
        "only the child stalls: {:?}",
        t.of_kind("stall")
    );
    t.stop();
}

#[test]
fn an_unwatched_process_produces_nothing() {
    require_root();
    let watched = Proc::python(SELF_PIPE_READ);
    let other = Proc::python(SELF_PIPE_READ);
    let mut t = Tracer::start(&["--pid", &watched.pid().to_string(), "--threshold", "200ms"]);
    t.wait_for("stall", Duration::from_secs(5), |e| e["event"] == "stall");
    t.collect_for(Duration::from_secs(1));
    let summary = t.stop();
    let other_pid = other.pid();
    for (_, e) in &t.events {
        if e["event"] == "start" {
            continue;
        }
        assert_ne!(e["pid"], other_pid, "event about an unwatched process: {e}");
    }
    assert_eq!(
        summary["verdict"]["stalled_pids"],
        serde_json::json!([watched.pid()])
    );
    assert!(alive(other_pid));
}

#[test]
fn an_idle_sleeping_process_is_not_a_stall() {
    require_root();
    let p = Proc::python(
        "import time, threading\nthreading.Thread(target=lambda: time.sleep(60), daemon=True).start()\ntime.sleep(60)\n",
    );
    // Watched once asleep, so the second below is all idle time.
    wait_blocked_in(p.pid(), libc::SYS_clock_nanosleep, |_| true);
    let mut t = Tracer::start(&["--pid", &p.pid().to_string(), "--threshold", "200ms"]);
    t.collect_for(Duration::from_secs(1));
    let summary = t.stop();
    assert!(
        t.of_kind("stall").is_empty(),
        "sleep and futex waits are idle: {:?}",
        t.of_kind("stall")
    );
    assert_eq!(summary["verdict"]["stalled_pids"], serde_json::json!([]));
}

#[test]
fn bad_input_gets_one_line_errors_and_nonzero_exit() {
    require_root();
    let (code, out, err) = run_tracer(&["watch", "--pid", "4000000"]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(err.contains("no process with pid 4000000"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");

    let (code, _, err) = run_tracer(&["watch", "--threshold", "0"]);
    assert_ne!(code, 0);
    assert!(err.contains("too small"), "{err}");

    let (code, _, err) = run_tracer(&["watch", "--duration", "soon"]);
    assert_ne!(code, 0);
    assert!(err.contains("500ms, 2s or 1m"), "{err}");
}

#[test]
fn duration_ends_the_run_with_a_summary() {
    require_root();
    let (code, out, err) = run_tracer(&[
        "watch",
        "--format",
        "json",
        "--duration",
        "1s",
        "--pid",
        "1",
    ]);
    assert_eq!(code, 0, "{err}");
    let last: Value = serde_json::from_str(out.lines().last().unwrap()).unwrap();
    assert_eq!(last["event"], "summary");
    assert!(last["duration_ms"].as_u64().unwrap() >= 1000);
    assert_eq!(last["events_lost"], 0);
}

#[test]
fn a_signal_that_breaks_a_blocked_read_ends_the_stall_as_interrupted() {
    require_root();
    // The handler raises, so Python does not retry the read.
    let code = "import os, signal, time\ndef stop(*_):\n    raise InterruptedError\nsignal.signal(signal.SIGUSR1, stop)\nr, w = os.pipe()\ntry:\n    os.read(r, 4)\nexcept InterruptedError:\n    pass\ntime.sleep(30)\n";
    let p = Proc::python(code);
    let pid = p.pid();
    let mut t = Tracer::start(&["--pid", &pid.to_string(), "--threshold", "300ms"]);
    t.wait_for("stall", Duration::from_secs(5), |e| e["event"] == "stall");
    unsafe { libc::kill(pid as i32, libc::SIGUSR1) };
    let (_, end) = t.wait_for("stall_end", Duration::from_secs(5), |e| {
        e["event"] == "stall_end"
    });
    assert_eq!(end["outcome"], "interrupted", "{end}");
    assert!(alive(pid), "the process lives on after the read");
    t.stop();
}

#[test]
fn exit_codes_and_fatal_signals_come_from_the_kernel() {
    require_root();
    let go = GoFile::new("exit");
    let coded = Proc::python(&format!("{}os._exit(3)\n", go.python_wait()));
    let termed = Proc::python(&format!("{}time.sleep(60)\n", go.python_wait()));
    let (a, b) = (coded.pid(), termed.pid());
    let mut t = Tracer::start(&["--pid", &a.to_string(), "--pid", &b.to_string()]);
    go.release();
    unsafe { libc::kill(b as i32, libc::SIGTERM) };
    t.wait_count("exits", 2, Duration::from_secs(5), |e| {
        e["event"] == "worker_exit"
    });
    let exits = t.of_kind("worker_exit");
    let of = |pid: u32| *exits.iter().find(|e| e["pid"] == pid).unwrap();
    assert_eq!(of(a)["exit_code"], 3, "{exits:?}");
    assert_eq!(of(a)["signal"], Value::Null, "{exits:?}");
    assert_eq!(of(b)["signal"], "SIGTERM", "{exits:?}");
    assert_eq!(of(b)["exit_code"], Value::Null, "{exits:?}");
    t.stop();
}
