//! End to end: causes named from the stalled thread's Python stack, read
//! by the tracer itself (no flag, no py-spy), with real Gunicorn, a real
//! PostgreSQL and the real tracer.
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::*;

/// Debian's PostgreSQL 15 (`apt-get install postgresql`; `cargo xtask
/// setup` installs it).
const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A throwaway PostgreSQL cluster run as the `postgres` user in a temporary
/// directory, on a free port other than 5432; stopped and removed when
/// dropped.
struct Postgres {
    dir: PathBuf,
    port: u16,
    uid: u32,
    gid: u32,
}

fn postgres_ids() -> (u32, u32) {
    let name = std::ffi::CString::new("postgres").unwrap();
    // SAFETY: getpwnam returns a pointer into static storage or null; it is
    // read at once, on this thread.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no postgres user: install Debian's postgresql (cargo xtask setup)"
    );
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

impl Postgres {
    fn start() -> Postgres {
        assert!(
            Path::new(PG_BIN).join("initdb").exists(),
            "{PG_BIN}/initdb is missing: install Debian's postgresql (cargo xtask setup)"
        );
        let (uid, gid) = postgres_ids();
        let mut port = free_port();
        while port == 5432 {
            port = free_port();
        }
        let dir = std::env::temp_dir().join(format!("tracer-pg-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        let pg = Postgres {
            dir,
            port,
            uid,
            gid,
        };
        pg.run(Command::new(Path::new(PG_BIN).join("initdb")).args([
            "-D",
            pg.data().to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync",
        ]));
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            pg.dir.display()
        );
        pg.run(Command::new(Path::new(PG_BIN).join("pg_ctl")).args([
            "-D",
            pg.data().to_str().unwrap(),
            "-l",
            pg.dir.join("log").to_str().unwrap(),
            "-o",
            &opts,
            "-w",
            "-t",
            "60",
            "start",
        ]));
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn dsn(&self) -> String {
        format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres",
            self.port
        )
    }

    fn run(&self, cmd: &mut Command) {
        let out = cmd
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{cmd:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = Command::new(Path::new(PG_BIN).join("pg_ctl"))
            .args([
                "-D",
                self.data().to_str().unwrap(),
                "-m",
                "immediate",
                "-w",
                "stop",
            ])
            .uid(self.uid)
            .gid(self.gid)
            .current_dir(&self.dir)
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The frame a cause cites: `(function, file)`.
fn cited(cause: &Value, key: &str) -> (String, String) {
    let f = &cause[key];
    (
        f["function"]
            .as_str()
            .unwrap_or_else(|| panic!("no {key}: {cause}"))
            .to_string(),
        f["file"].as_str().unwrap().to_string(),
    )
}

#[test]
fn a_psycopg2_query_on_a_port_other_than_5432_is_named_as_the_drivers_wait() {
    require_root();
    let pg = Postgres::start();
    let g = Gunicorn::new("pg_app:app")
        .worker_class("gevent")
        .timeout(30)
        .env("PG_DSN", pg.dsn())
        .spawn();
    assert_eq!(get(g.port, "/").lines().last(), Some("ok"));
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    t.wait_for("worker", Duration::from_secs(5), |e| e["event"] == "worker");
    let client = get_async(g.port, "/sleep?s=3", Duration::from_secs(20));
    let (_, stall) = t.wait_for("stall", Duration::from_secs(5), |e| e["event"] == "stall");
    let cause = &stall["cause"];
    assert_eq!(cause["id"], "psycopg2_wait", "{stall}");
    assert_eq!(cause["basis"], "frame", "{stall}");
    let (function, file) = cited(cause, "frame");
    assert!(file.ends_with("psycopg2/extras.py"), "{stall}");
    assert!(function.ends_with("execute"), "{stall}");
    let (caller, caller_file) = cited(cause, "called_from");
    assert_eq!(caller, "slow_query", "{stall}");
    assert!(caller_file.ends_with("pg_app.py"), "{stall}");
    let peer = format!("127.0.0.1:{}", pg.port);
    let text = cause["cause"].as_str().unwrap();
    assert!(text.contains(&peer), "the server it waits on: {text}");
    assert!(text.contains("pg_app.py:"), "the app's line: {text}");
    assert!(has_frame(&stall, "slow_query", "pg_app.py"), "{stall}");
    // The kernel's view agrees: a poll on the socket to that server.
    assert!(
        stall["wait_fds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|w| w["peer"] == peer.as_str()),
        "{stall}"
    );
    // The query really ran: the request answers once pg_sleep returns.
    let body = client
        .recv_timeout(Duration::from_secs(15))
        .unwrap()
        .unwrap();
    assert!(body.contains("slept 3"), "{body}");
    t.stop();
}

/// `gunicorn -k gevent -w 1 -t 4 hang_app:app`.
fn hang_gunicorn(pids: &HangPids) -> GunicornProc {
    Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .timeout(4)
        .env("HANG_PID_FILE", pids.path())
        .spawn()
}

#[test]
fn the_queue_get_cause_cites_its_frame_and_the_worker_timeout_carries_the_stack() {
    require_root();
    let pids = HangPids::new("stackcause");
    let g = hang_gunicorn(&pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    t.wait_for("worker", Duration::from_secs(5), |e| e["event"] == "worker");
    let _client = get_async(g.port, "/hang", Duration::from_secs(20));
    let victim = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == victim
    });
    let cause = &stall["cause"];
    assert_eq!(cause["id"], "multiprocessing_queue_gevent", "{stall}");
    assert_eq!(cause["basis"], "frame", "confirmed by its frame: {stall}");
    let (function, file) = cited(cause, "frame");
    assert_eq!(function, "Queue.get", "{stall}");
    assert!(file.ends_with("multiprocessing/queues.py"), "{stall}");
    assert!(cause["frame"]["line"].as_u64().is_some(), "{stall}");
    let (caller, caller_file) = cited(cause, "called_from");
    assert_eq!(caller, "enqueue_and_wait");
    assert!(caller_file.ends_with("hang_app.py"));
    let text = cause["cause"].as_str().unwrap();
    assert!(text.contains("multiprocessing/queues.py:"), "{text}");
    assert!(text.contains("in Queue.get"), "{text}");
    assert!(text.contains("hang_app.py:"), "{text}");

    let (_, kill) = t.wait_for("worker_timeout", Duration::from_secs(15), |e| {
        e["event"] == "worker_timeout" && e["pid"] == victim
    });
    let blamed = &kill["stall"];
    assert_eq!(blamed["tid"], victim, "{kill}");
    assert!(
        has_frame(blamed, "Queue.get", "multiprocessing/queues.py"),
        "{kill}"
    );
    assert!(
        has_frame(blamed, "enqueue_and_wait", "hang_app.py"),
        "{kill}"
    );
    assert_eq!(
        blamed["py_stack"], stall["py_stack"],
        "the stall's own stack"
    );
    assert_eq!(blamed["cause"]["basis"], "frame", "{kill}");
    assert_eq!(blamed["cause"]["id"], "multiprocessing_queue_gevent");
    t.stop();
}

#[test]
fn the_text_view_prints_the_stack_under_the_stall_and_the_timeout() {
    require_root();
    let pids = HangPids::new("stacktext");
    let g = hang_gunicorn(&pids);
    let master = g.pid().to_string();
    // The tracer as `cargo xtask demo` runs it: text, no flag, no py-spy.
    let run = std::thread::spawn(move || {
        let out = Command::new(tracer_bin())
            .args(["watch", "--pid", &master, "--duration", "9s"])
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    });
    std::thread::sleep(Duration::from_secs(2));
    let _client = get_async(g.port, "/hang", Duration::from_secs(20));
    let text = run.join().unwrap();
    let stall = text
        .split("\n")
        .skip_while(|l| !l.contains("STALL"))
        .take(8)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        stall.contains(
            "cause, from the stack: multiprocessing.Queue.get() at multiprocessing/queues.py:"
        ),
        "{text}"
    );
    assert!(stall.contains("hang_app.py:"), "{text}");
    assert!(stall.contains("in enqueue_and_wait"), "{text}");
    // The TIMEOUT line itself (a DROPPED line's advice names the timeout
    // too, and it may come first).
    let timeout = text
        .split("\n")
        .skip_while(|l| !l.contains(" TIMEOUT  master"))
        .take(6)
        .collect::<Vec<_>>()
        .join("\n");
    assert!(timeout.contains("Gunicorn WORKER TIMEOUT"), "{text}");
    assert!(timeout.contains("in Queue.get"), "{text}");
    assert!(timeout.contains("in enqueue_and_wait"), "{text}");
    // The verdict at the end names the same frame, not the guess from a
    // 4-byte pipe read made before the stack came.
    let verdict: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("cause, from its stack: multiprocessing.Queue.get()"))
        .collect();
    assert!(!verdict.is_empty(), "{text}");
    assert!(
        !text.contains("likely cause: multiprocessing.Queue.get()"),
        "no verdict keeps the guess: {text}"
    );
}
