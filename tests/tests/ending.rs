//! End to end: the tracer always ends (issue 23 item 4). It exits within
//! 2 s of SIGTERM or SIGINT at any point, start-up included (its programs
//! being loaded), within 2 s of its --duration, and a second signal ends
//! it at once. Each test measures the real process's exit by waiting for
//! it, never by sleeping.
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tests::*;

const BOUND: Duration = Duration::from_secs(2);

/// The tracer on a sleeping Python process, its output in files.
struct Run {
    child: Child,
    out: PathBuf,
    err: PathBuf,
    _target: Option<Proc>,
}

impl Run {
    fn start(extra: &[&str]) -> Run {
        let target = Proc::python("import time\ntime.sleep(120)\n");
        let mut r = Run::on(target.pid(), extra);
        r._target = Some(target);
        r
    }

    /// The tracer on `pid`, which the caller keeps alive.
    fn on(pid: u32, extra: &[&str]) -> Run {
        let dir = std::env::temp_dir();
        let tag = format!("tracer-ending-{}-{pid}", std::process::id());
        let (out, err) = (
            dir.join(format!("{tag}.out")),
            dir.join(format!("{tag}.err")),
        );
        let child = Command::new(tracer_bin())
            .args(["watch", "--format", "json", "--pid"])
            .arg(pid.to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .expect("spawning the tracer");
        Run {
            child,
            out,
            err,
            _target: None,
        }
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// It finished with its summary, or, stopped in start-up, said that it
    /// stopped before anything was traced (exit 1, no summary).
    fn ended_well(&self, status: std::process::ExitStatus, in_start_up: bool) -> bool {
        let summary = self.stdout().contains(r#""event":"summary""#);
        let said = self.stderr().contains(
            "stopped in start-up, before anything was traced (the load or attach was still under way 0.5 s later); exiting without the summary",
        );
        (status.success() && summary) || (in_start_up && status.code() == Some(1) && said)
    }

    fn started(&self) -> bool {
        self.stdout().contains(r#""event":"start""#)
    }

    /// Waits until the tracer is loading its BPF programs: it holds a BPF
    /// object (map or program) and has not attached yet.
    fn wait_loading(&self) {
        let fd_dir = format!("/proc/{}/fd", self.pid());
        eventually(
            "the tracer loading BPF objects",
            Duration::from_secs(20),
            || {
                std::fs::read_dir(&fd_dir).ok()?.flatten().find(|e| {
                    std::fs::read_link(e.path())
                        .is_ok_and(|l| l.to_string_lossy().starts_with("anon_inode:bpf"))
                })
            },
        );
    }

    fn signal(&self, sig: i32) -> Instant {
        // SAFETY: kill(2) on the tracer this test started.
        unsafe { libc::kill(self.pid(), sig) };
        Instant::now()
    }

    /// Waits until `sig` is no longer pending for the tracer.
    fn wait_delivered(&self, sig: i32) {
        let status = format!("/proc/{}/status", self.pid());
        let bit = 1u64 << (sig - 1);
        eventually("the signal delivered", Duration::from_secs(5), || {
            let s = std::fs::read_to_string(&status).ok()?;
            let pending = s
                .lines()
                .filter(|l| l.starts_with("SigPnd:") || l.starts_with("ShdPnd:"))
                .filter_map(|l| u64::from_str_radix(l.split_whitespace().nth(1)?, 16).ok())
                .any(|m| m & bit != 0);
            (!pending).then_some(())
        });
    }

    /// Waits (polling every 5 ms, up to 15 s) for the exit; its status and
    /// how long after `since` it came.
    fn wait_exit(&mut self, since: Instant) -> (std::process::ExitStatus, Duration) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return (status, since.elapsed());
            }
            assert!(
                Instant::now() < deadline,
                "the tracer did not exit within 15 s; stderr: {}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.out);
        let _ = std::fs::remove_file(&self.err);
    }
}

#[test]
fn sigterm_during_start_up_ends_the_tracer_within_2s() {
    require_root();
    let mut r = Run::start(&[]);
    r.wait_loading();
    let sent = r.signal(libc::SIGTERM);
    let during_start_up = !r.started();
    let (status, took) = r.wait_exit(sent);
    assert!(during_start_up, "the start event came before the signal");
    assert!(
        took < BOUND,
        "exited {took:?} after SIGTERM during start-up; stderr: {}",
        r.stderr()
    );
    assert!(
        r.ended_well(status, true),
        "{status}; stdout: {}; stderr: {}",
        r.stdout(),
        r.stderr()
    );
}

#[test]
fn sigterm_while_running_ends_the_tracer_within_2s_with_its_summary() {
    require_root();
    let mut r = Run::start(&[]);
    eventually("the start event", Duration::from_secs(20), || {
        r.started().then_some(())
    });
    let sent = r.signal(libc::SIGTERM);
    let (status, took) = r.wait_exit(sent);
    assert!(took < BOUND, "exited {took:?} after SIGTERM");
    assert!(status.success(), "{status}; stderr: {}", r.stderr());
    assert!(
        r.stdout().contains(r#""event":"summary""#),
        "{}",
        r.stdout()
    );
}

#[test]
fn the_tracer_ends_within_2s_of_its_duration() {
    require_root();
    let mut r = Run::start(&["--duration", "1s"]);
    eventually("the start event", Duration::from_secs(20), || {
        r.started().then_some(())
    });
    // The duration runs from the start event (at most this late).
    let started = Instant::now();
    let (status, took) = r.wait_exit(started);
    assert!(
        took < Duration::from_secs(1) + BOUND,
        "exited {took:?} after the start of a 1 s run"
    );
    assert!(status.success(), "{status}; stderr: {}", r.stderr());
    assert!(
        r.stdout().contains(r#""event":"summary""#),
        "{}",
        r.stdout()
    );
}

/// Issue 23's "done when": 50 runs in a row on a Gunicorn serving requests
/// (where the once-seen hang on 6.1 happened), each ending within 2 s of its
/// --duration, or of a SIGTERM sent during start-up or while it runs, in
/// turn. The kernel matrix runs it too.
#[test]
fn fifty_runs_in_a_row_on_a_gunicorn_each_end_within_2s() {
    require_root();
    let g = Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .workers(2)
        .spawn();
    let master = g.pid();
    let mut worst = [Duration::ZERO; 3];
    for i in 0..50 {
        let way = i % 3;
        let mut r = Run::on(master, &["--duration", "1s"]);
        let _ = get(g.port, "/");
        let (from, what) = match way {
            0 => {
                eventually("the start event", Duration::from_secs(20), || {
                    r.started().then_some(())
                });
                // The duration runs from the start event: 1 s of it is the
                // run's own, the bound is on top.
                (
                    Instant::now() + Duration::from_secs(1),
                    "its 1 s --duration",
                )
            }
            1 => {
                r.wait_loading();
                (r.signal(libc::SIGTERM), "SIGTERM during start-up")
            }
            _ => {
                eventually("the start event", Duration::from_secs(20), || {
                    r.started().then_some(())
                });
                std::thread::sleep(Duration::from_millis(300));
                (r.signal(libc::SIGTERM), "SIGTERM while running")
            }
        };
        let (status, took) = r.wait_exit(from);
        worst[way] = worst[way].max(took);
        assert!(
            took < BOUND,
            "run {i}: exited {took:?} after {what}; stderr: {}",
            r.stderr()
        );
        assert!(
            r.ended_well(status, way == 1),
            "run {i}, after {what}: {status}; stderr: {}",
            r.stderr()
        );
    }
    eprintln!(
        "slowest exit after the duration {:?}, after SIGTERM in start-up {:?}, while running {:?}",
        worst[0], worst[1], worst[2]
    );
}

#[test]
fn a_second_signal_ends_the_tracer_at_once() {
    require_root();
    // Both signals must come in start-up; a host that loads the programs
    // faster than the test sends them gets another try.
    let mut tries = 0;
    let (r, status, took) = loop {
        tries += 1;
        let mut r = Run::start(&[]);
        r.wait_loading();
        r.signal(libc::SIGINT);
        // Signals of one kind do not queue: the second is sent once the
        // first has been delivered (no longer pending), as a user's second
        // Ctrl-C.
        r.wait_delivered(libc::SIGINT);
        let second = r.signal(libc::SIGINT);
        let during_start_up = !r.started();
        let (status, took) = r.wait_exit(second);
        if during_start_up {
            break (r, status, took);
        }
        assert!(tries < 5, "the start event came before the signals 5 times");
    };
    // At once: the exit status says the second signal ended it (not the
    // run's own end, which exits 0 after its summary), with no summary.
    // The bound is not zero: the kernel detaches the attached programs as
    // the process exits, about 290 ms here even for a SIGKILL.
    assert_eq!(status.code(), Some(128 + libc::SIGINT), "{status}");
    assert!(
        !r.stdout().contains(r#""event":"summary""#),
        "{}",
        r.stdout()
    );
    assert!(
        took < Duration::from_secs(1),
        "exited {took:?} after the second SIGINT; stderr: {}",
        r.stderr()
    );
}

/// Issue 23 item 3: the kernel check runs before anything is loaded. On a
/// kernel before 5.15 (Debian 11's 5.10 in `cargo xtask test --kernel
/// 5.10`) it refuses in one line that names the kernel and what it lacks,
/// exits 1, prints no verifier dump and no event; on any later kernel (this
/// host's, 6.1, 6.12) it passes and says nothing.
#[test]
fn the_start_up_check_refuses_a_kernel_before_5_15_and_only_such_a_kernel() {
    require_root();
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let release = release.trim();
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse::<u32>().ok());
    let version = (numbers.next().unwrap(), numbers.next().unwrap());
    let target = Proc::python("import time\ntime.sleep(30)\n");
    let pid = target.pid().to_string();
    let (code, out, err) = run_tracer(&[
        "watch",
        "--format",
        "json",
        "--pid",
        &pid,
        "--duration",
        "1s",
    ]);
    if version < (5, 15) {
        assert_eq!(code, 1, "{err}");
        let lines: Vec<&str> = err.lines().collect();
        assert_eq!(lines.len(), 1, "one line: {err}");
        let expected = format!(
            "tracer: error: Linux {release} is too old: the tracer needs 5.15 or later (no "
        );
        assert!(lines[0].starts_with(&expected), "{err}");
        assert!(!err.contains("verifier"), "{err}");
        assert!(out.trim().is_empty(), "nothing announced: {out}");
    } else {
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("too old") && !err.contains("lacks"), "{err}");
        assert!(out.contains(r#""event":"summary""#), "{out}");
    }
}
