//! Helpers for the integration and end-to-end tests: they start real
//! processes (the tracer binary, Gunicorn from the test virtualenv, Python
//! scripts) and stop them when dropped.
//!
//! `cargo xtask test` builds the tracer and the virtualenv and sets
//! TRACER_BIN and TRACER_VENV; run by hand, the defaults under target/ apply.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

pub use serde_json::Value;

pub mod deploytools;

pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

pub fn tracer_bin() -> PathBuf {
    std::env::var_os("TRACER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/release/tracer"))
}

pub fn venv() -> PathBuf {
    std::env::var_os("TRACER_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/venv"))
}

pub fn python() -> PathBuf {
    venv().join("bin/python")
}

pub fn apps_dir() -> PathBuf {
    workspace_root().join("tests/apps")
}

/// These tests load BPF programs: they need root, and say so instead of
/// passing vacuously.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "integration tests load BPF programs and must run as root (cargo xtask test)"
    );
    assert!(
        tracer_bin().exists(),
        "{} is missing: run `cargo xtask test`, which builds it",
        tracer_bin().display()
    );
}

pub fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    unsafe { libc::kill(pid as i32, 0) == 0 }
}

/// A line read from a child's output, with when the test received it.
#[derive(Debug, Clone)]
pub struct Line {
    pub at: Instant,
    pub text: String,
}

/// Forwards the lines of `r` to `tx`, stamped with their arrival time.
fn pump_into<R: Read + Send + 'static>(r: R, tx: Sender<Line>) {
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines() {
            let Ok(text) = line else { break };
            if tx
                .send(Line {
                    at: Instant::now(),
                    text,
                })
                .is_err()
            {
                break;
            }
        }
    });
}

fn pump<R: Read + Send + 'static>(r: R) -> Receiver<Line> {
    let (tx, rx) = channel();
    pump_into(r, tx);
    rx
}

/// A running `tracer watch --format json`, its events parsed as they come.
pub struct Tracer {
    child: Child,
    stdout: Receiver<Line>,
    stderr: Receiver<Line>,
    /// Every event received so far, with its arrival time.
    pub events: Vec<(Instant, Value)>,
    pub stderr_lines: Vec<String>,
}

impl Tracer {
    /// Starts the tracer and waits for its `start` event (programs attached).
    pub fn start(args: &[&str]) -> Tracer {
        let mut cmd = Command::new(tracer_bin());
        cmd.arg("watch").args(["--format", "json"]).args(args);
        Tracer::start_command(cmd)
    }

    /// Like `start`, with a PATH of system directories that hold no
    /// py-spy (checked): the tracer reads Python stacks itself.
    pub fn start_without_py_spy(args: &[&str]) -> Tracer {
        let path = "/usr/sbin:/usr/bin:/sbin:/bin";
        for d in std::env::split_paths(path) {
            assert!(!d.join("py-spy").exists(), "{} has a py-spy", d.display());
        }
        let mut cmd = Command::new(tracer_bin());
        cmd.arg("watch")
            .args(["--format", "json"])
            .args(args)
            .env("PATH", path);
        Tracer::start_command(cmd)
    }

    /// Like `start`, for a command line the caller wrote (JSON output, such
    /// as the DaemonSet's arguments, or the tracer run through setpriv).
    pub fn start_command(mut cmd: Command) -> Tracer {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the tracer");
        let stdout = pump(child.stdout.take().unwrap());
        let stderr = pump(child.stderr.take().unwrap());
        let mut t = Tracer {
            child,
            stdout,
            stderr,
            events: Vec::new(),
            stderr_lines: Vec::new(),
        };
        t.wait_for("start event", Duration::from_secs(20), |e| {
            e["event"] == "start"
        });
        t
    }

    fn take(&mut self, line: Line) {
        let v: Value = serde_json::from_str(&line.text).unwrap_or_else(|e| {
            panic!(
                "tracer printed a line that is not JSON ({e}): {:?}",
                line.text
            )
        });
        assert!(
            v["event"].is_string(),
            "event without an `event` field: {v}"
        );
        assert!(v["ts"].is_string(), "event without a `ts` field: {v}");
        self.events.push((line.at, v));
    }

    fn drain_stderr(&mut self) {
        while let Ok(l) = self.stderr.try_recv() {
            self.stderr_lines.push(l.text);
        }
    }

    /// Fails the test with `why`, every event so far and the tracer's stderr.
    fn give_up(&mut self, why: String) -> ! {
        self.drain_stderr();
        panic!(
            "{why}\nevents: {:#?}\nstderr: {:#?}",
            self.events
                .iter()
                .map(|(_, v)| v.to_string())
                .collect::<Vec<_>>(),
            self.stderr_lines
        );
    }

    /// Waits for the first event (already received or new) matching `pred`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        match self.next_matching(timeout, pred) {
            Ok(found) => found,
            Err(RecvTimeoutError::Timeout) => {
                self.give_up(format!("timed out after {timeout:?} waiting for {what}"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.child.try_wait();
                self.give_up(format!(
                    "tracer exited while waiting for {what} (status {status:?})"
                ))
            }
        }
    }

    /// Like `wait_for`, for an event that may not come: None after `timeout`.
    pub fn try_wait_for(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Option<(Instant, Value)> {
        self.next_matching(timeout, pred).ok()
    }

    fn next_matching(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<(Instant, Value), RecvTimeoutError> {
        if let Some(found) = self.events.iter().find(|(_, v)| pred(v)) {
            return Ok(found.clone());
        }
        let deadline = Instant::now() + slow(timeout);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            self.take(self.stdout.recv_timeout(left)?);
            let last = self.events.last().unwrap();
            if pred(&last.1) {
                return Ok(last.clone());
            }
        }
    }

    /// Waits until `n` events match `pred`; returns them all.
    pub fn wait_count(
        &mut self,
        what: &str,
        n: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let timeout = slow(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            let found: Vec<Value> = self
                .events
                .iter()
                .map(|(_, v)| v)
                .filter(|v| pred(v))
                .cloned()
                .collect();
            if found.len() >= n {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => self.take(line),
                Err(_) => self.give_up(format!(
                    "waited {timeout:?} for {n} x {what}, got {}",
                    found.len()
                )),
            }
        }
    }

    /// Collects events for `d` without expecting anything.
    pub fn collect_for(&mut self, d: Duration) {
        let deadline = Instant::now() + slow(d);
        while let Ok(line) = self
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.take(line);
        }
    }

    /// Receives events until `done` holds for the tracer and what it has
    /// printed so far; `done` is asked again at least every 100 ms, for
    /// conditions that also look outside the events (such as /proc).
    pub fn wait_until(
        &mut self,
        what: &str,
        timeout: Duration,
        mut done: impl FnMut(&Tracer) -> bool,
    ) {
        let timeout = slow(timeout);
        let deadline = Instant::now() + timeout;
        while !done(self) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                self.give_up(format!("timed out after {timeout:?} waiting for {what}"));
            }
            if let Ok(line) = self
                .stdout
                .recv_timeout(left.min(Duration::from_millis(100)))
            {
                self.take(line);
            }
        }
    }

    /// SIGINT, then the summary event, then the exit status.
    pub fn stop(&mut self) -> Value {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGINT) };
        let (_, s) = self.wait_for("summary event", Duration::from_secs(10), |e| {
            e["event"] == "summary"
        });
        let status = self.child.wait().expect("waiting for the tracer");
        self.drain_stderr();
        assert!(
            status.success(),
            "tracer exited with {status}; stderr: {:#?}",
            self.stderr_lines
        );
        s
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn of_kind(&self, kind: &str) -> Vec<&Value> {
        self.events
            .iter()
            .map(|(_, v)| v)
            .filter(|v| v["event"] == kind)
            .collect()
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the tracer to completion (for error cases): (exit code, stdout, stderr).
pub fn run_tracer(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(tracer_bin())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running the tracer");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A process started for a test and killed (with its group) when dropped.
pub struct Proc {
    pub child: Child,
    pub output: Option<Receiver<Line>>,
    pub lines: Vec<Line>,
}

impl Proc {
    pub fn spawn(cmd: &mut Command) -> Proc {
        use std::os::unix::process::CommandExt;
        cmd.stdin(Stdio::null()).process_group(0);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Proc {
            child,
            output: None,
            lines: Vec::new(),
        }
    }

    /// Like `spawn`, with stdout and stderr captured and merged, as a
    /// person reading the process's log sees them.
    pub fn spawn_captured(cmd: &mut Command) -> Proc {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut p = Proc::spawn(cmd);
        let (tx, rx) = channel();
        pump_into(p.child.stdout.take().unwrap(), tx.clone());
        pump_into(p.child.stderr.take().unwrap(), tx);
        p.output = Some(rx);
        p
    }

    /// Starts a Python snippet with the test virtualenv's interpreter.
    pub fn python(code: &str) -> Proc {
        Proc::spawn(Command::new(python()).args(["-c", code]))
    }

    /// A Python snippet whose output the test reads.
    pub fn python_captured(code: &str) -> Proc {
        Proc::spawn_captured(Command::new(python()).args(["-c", code]))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `n` lines of the output contain `needle`; returns the n-th.
    pub fn wait_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Line {
        let timeout = slow(timeout);
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(l) = self
                .lines
                .iter()
                .filter(|l| l.text.contains(needle))
                .nth(n - 1)
            {
                return l.clone();
            }
            let rx = self
                .output
                .as_ref()
                .expect("process output is not captured");
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => self.lines.push(l),
                Err(_) => panic!(
                    "fewer than {n} line(s) containing {needle:?} within {timeout:?}; output so far:\n{}",
                    self.lines
                        .iter()
                        .map(|l| l.text.as_str())
                        .collect::<Vec<_>>()
                        .join("\n")
                ),
            }
        }
    }

    /// Collects the output for `d`; returns the lines containing `needle`
    /// (seen before or during that time).
    pub fn lines_within(&mut self, needle: &str, d: Duration) -> Vec<Line> {
        let deadline = Instant::now() + slow(d);
        let rx = self
            .output
            .as_ref()
            .expect("process output is not captured");
        while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
            self.lines.push(l);
        }
        self.lines
            .iter()
            .filter(|l| l.text.contains(needle))
            .cloned()
            .collect()
    }

    /// Waits for a line of the output containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_count(needle, 1, timeout)
    }

    /// The first line of the output, waiting for it.
    pub fn first_line(&mut self, timeout: Duration) -> String {
        self.wait_line("", timeout).text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for the child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// The kernel's range of ports for outgoing connections (autobind).
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|n| n.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A pseudo-random port below the kernel's ephemeral range (or above it
/// when the range starts low): a port there is never handed to an outgoing
/// connection, so the clients, nginx's upstream connections and wrk of
/// other tests cannot take it in the gap before its server binds.
fn candidate_port(attempt: u32) -> u16 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u32(attempt);
    h.write_u32(std::process::id());
    let r = h.finish();
    let (lo, hi) = ephemeral_range();
    if lo > 12000 {
        10000 + (r % u64::from(lo - 10000)) as u16
    } else {
        hi.saturating_add(1) + (r % u64::from(65535 - hi.max(lo))) as u16
    }
}

/// A TCP socket bound (never listening) to 127.0.0.1:`port` with
/// SO_REUSEADDR, or None if the port is taken.
fn reserve(port: u16) -> Option<std::os::fd::OwnedFd> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain socket calls on a descriptor we own.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return None;
        }
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let addr = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: port.to_be(),
            sin_addr: libc::in_addr {
                s_addr: u32::from(std::net::Ipv4Addr::LOCALHOST).to_be(),
            },
            sin_zero: [0; 8],
        };
        let rc = libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&addr as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        );
        (rc == 0).then_some(fd)
    }
}

/// A loopback port held for a server that binds it with SO_REUSEADDR (as
/// Gunicorn and nginx always do): Linux lets sockets that all set it share
/// a port as long as none of them listens but one, so the held socket,
/// bound and never listening, keeps every other server off the port (a
/// plain bind, or a second listener) and takes no connection, and the
/// server binds and listens beside it. Dropping it releases the port.
///
/// Not SO_REUSEPORT: with Gunicorn's --reuse-port (which that needed) each
/// worker listens on a socket of its own, and the kernel hashes a new
/// connection to one of them; a request hashed to a worker that a test has
/// blocked waits there until that worker dies, and is reset, while another
/// worker sits idle (CI saw a test's request lost that way).
pub struct ReservedPort {
    pub port: u16,
    _fd: std::os::fd::OwnedFd,
}

impl ReservedPort {
    pub fn new() -> ReservedPort {
        for attempt in 0..1000 {
            let port = candidate_port(attempt);
            // Free for a plain bind (no one's socket there), then held.
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
                continue;
            }
            if let Some(fd) = reserve(port) {
                return ReservedPort { port, _fd: fd };
            }
        }
        panic!("no free loopback port outside the ephemeral range in 1000 tries");
    }
}

impl Default for ReservedPort {
    fn default() -> Self {
        ReservedPort::new()
    }
}

/// A free TCP port on loopback for a server the test cannot hand a held
/// port to (the tracer's metrics port): bound then released, but outside
/// the kernel's ephemeral range, so no outgoing connection takes it in the
/// gap before the server binds; only another explicit bind could.
/// Whether some socket listens on TCP `port` (IPv4, from /proc/net/tcp).
pub fn is_listening(port: u16) -> bool {
    let hex = format!(":{port:04X} ");
    std::fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].ends_with(hex.trim_end()) && f[3] == "0A"
        })
}

pub fn free_port() -> u16 {
    for attempt in 0..1000 {
        let port = candidate_port(attempt);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port outside the ephemeral range in 1000 tries");
}

/// Gunicorn from the test virtualenv, serving an app of tests/apps on a
/// free loopback port: the one command line the tests, the benchmark, the
/// soak and the demo start it with.
pub struct Gunicorn {
    app: String,
    port: u16,
    /// Held until the Gunicorn value is dropped (Gunicorn binds beside it).
    _held: std::sync::Arc<ReservedPort>,
    workers: usize,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Gunicorn {
    pub fn new(app: &str) -> Gunicorn {
        let held = ReservedPort::new();
        Gunicorn {
            app: app.to_string(),
            port: held.port,
            _held: std::sync::Arc::new(held),
            workers: 1,
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    fn arg(mut self, flag: &str, value: impl ToString) -> Gunicorn {
        self.args.extend([flag.to_string(), value.to_string()]);
        self
    }

    /// `-k`: `gevent`, or a class of tests/apps such as `old_worker.OldGeventWorker`.
    pub fn worker_class(self, class: &str) -> Gunicorn {
        self.arg("-k", class)
    }

    /// Gunicorn's --reuse-port: each worker then listens on a socket of
    /// its own (Gunicorn 27), the master on none.
    pub fn reuse_port(mut self) -> Gunicorn {
        self.args.push("--reuse-port".to_string());
        self
    }

    pub fn workers(mut self, n: usize) -> Gunicorn {
        self.workers = n;
        self
    }

    /// `-t`: seconds without a heartbeat before the master kills a worker.
    pub fn timeout(self, secs: u32) -> Gunicorn {
        self.arg("-t", secs)
    }

    /// `--threads`: the gthread worker's pool size.
    pub fn threads(self, n: u32) -> Gunicorn {
        self.arg("--threads", n)
    }

    /// `-c`: a config file of tests/apps (hooks such as post_fork).
    pub fn config(self, file: &str) -> Gunicorn {
        self.arg("-c", file)
    }

    /// `--max-requests`: a worker retires after serving this many.
    pub fn max_requests(self, n: u32) -> Gunicorn {
        self.arg("--max-requests", n)
    }

    /// `--worker-connections`: connections a gthread worker holds at most.
    pub fn worker_connections(self, n: u32) -> Gunicorn {
        self.arg("--worker-connections", n)
    }

    /// `--graceful-timeout`: seconds a stopping worker may finish its requests.
    pub fn graceful_timeout(self, secs: u32) -> Gunicorn {
        self.arg("--graceful-timeout", secs)
    }

    /// `--keep-alive`: seconds an idle keep-alive connection is kept open.
    pub fn keep_alive(self, secs: u32) -> Gunicorn {
        self.arg("--keep-alive", secs)
    }

    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Gunicorn {
        let value = value.as_ref().to_string_lossy().into_owned();
        self.env.push((key.to_string(), value));
        self
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The command line, for callers that handle the output themselves.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(venv().join("bin/gunicorn"));
        // Gunicorn binds beside the socket that holds the port for it
        // (ReservedPort, SO_REUSEADDR), so no one can take it before.
        cmd.args(&self.args)
            .args(["-w", &self.workers.to_string()])
            .args(["-b", &format!("127.0.0.1:{}", self.port), &self.app])
            .current_dir(apps_dir())
            .env("PYTHONUNBUFFERED", "1");
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd
    }

    /// Starts it, output captured, and returns once it listens and every
    /// worker has booted. Dropping the result kills the master and workers.
    pub fn spawn(self) -> GunicornProc {
        let mut proc = Proc::spawn_captured(&mut self.command());
        proc.wait_line("Listening at", Duration::from_secs(30));
        proc.wait_count("Booting worker", self.workers, Duration::from_secs(30));
        // Listening, not only announced: a test's first request must not
        // race the master (CI once saw one refused right after the boot).
        // Read from /proc, not by connecting: a tracer already attached
        // would count a connection.
        let port = self.port;
        let deadline = Instant::now() + slow(Duration::from_secs(10));
        while !is_listening(port) {
            if Instant::now() > deadline {
                let out = proc.lines_within("", Duration::from_millis(100));
                let text: Vec<&str> = out.iter().map(|l| l.text.as_str()).collect();
                panic!(
                    "Gunicorn announced port {port} but does not accept on it; its output:\n{}",
                    text.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        GunicornProc {
            proc,
            port: self.port,
        }
    }
}

/// A running Gunicorn master (its pid is the Proc's); its process group is
/// killed when dropped.
pub struct GunicornProc {
    proc: Proc,
    pub port: u16,
}

impl std::ops::Deref for GunicornProc {
    type Target = Proc;
    fn deref(&self) -> &Proc {
        &self.proc
    }
}

impl std::ops::DerefMut for GunicornProc {
    fn deref_mut(&mut self) -> &mut Proc {
        &mut self.proc
    }
}

/// The file tests/apps/hang_app.py appends a worker's pid to when a /hang
/// request starts (pass `path()` as HANG_PID_FILE); removed when dropped.
pub struct HangPids(PathBuf);

impl HangPids {
    pub fn new(tag: &str) -> HangPids {
        let p = std::env::temp_dir().join(format!("tracer-hang-{tag}-{}.pids", std::process::id()));
        let _ = std::fs::remove_file(&p);
        HangPids(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The pids written so far, in request order.
    pub fn all(&self) -> Vec<u32> {
        std::fs::read_to_string(&self.0)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// The worker that took the `n`-th /hang request (from 0), once it has.
    pub fn wait_nth(&self, n: usize) -> u32 {
        eventually("hang pid", Duration::from_secs(15), || {
            self.all().get(n).copied()
        })
    }

    /// Like `wait_nth`, for a request sent with `get_async` to `server`:
    /// when the request ends first, or the wait runs out, the failure
    /// says what the client got and what the server logged.
    pub fn wait_nth_of(
        &self,
        n: usize,
        client: &Receiver<std::io::Result<String>>,
        server: &mut Proc,
    ) -> u32 {
        let deadline = Instant::now() + slow(Duration::from_secs(15));
        let mut answer = None;
        while Instant::now() < deadline {
            if let Some(&pid) = self.all().get(n) {
                return pid;
            }
            if answer.is_none()
                && let Ok(r) = client.try_recv()
            {
                answer = Some(r);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let log: Vec<String> = server
            .lines_within("", Duration::ZERO)
            .into_iter()
            .map(|l| l.text)
            .collect();
        let workers: Vec<String> = std::fs::read_to_string(format!(
            "/proc/{}/task/{}/children",
            server.pid(),
            server.pid()
        ))
        .unwrap_or_default()
        .split_whitespace()
        .map(|w| {
            let state = std::fs::read_to_string(format!("/proc/{w}/stat")).unwrap_or_default();
            let wchan = std::fs::read_to_string(format!("/proc/{w}/wchan")).unwrap_or_default();
            let syscall = std::fs::read_to_string(format!("/proc/{w}/syscall")).unwrap_or_default();
            format!(
                "{w}: state {} wchan {wchan} syscall {}",
                state.split_whitespace().nth(2).unwrap_or("?"),
                syscall.trim()
            )
        })
        .collect();
        panic!(
            "no worker said it took /hang request {n} within 15 s; the client got {answer:?}; workers now: {workers:?}; the server logged:\n{}",
            log.join("\n")
        );
    }
}

impl Drop for HangPids {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The file tests/apps/stall_app.py and asgi_app.py append "pid tid" to
/// when a stall endpoint starts (pass `path()` as STALL_PID_FILE); removed
/// when dropped.
pub struct StallPids(PathBuf);

impl StallPids {
    pub fn new(tag: &str) -> StallPids {
        let p =
            std::env::temp_dir().join(format!("tracer-stall-{tag}-{}.pids", std::process::id()));
        let _ = std::fs::remove_file(&p);
        StallPids(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The (pid, tid) that took the `n`-th stall request (from 0), once it has.
    pub fn wait_nth(&self, n: usize) -> (u32, u32) {
        eventually("stall pid", Duration::from_secs(10), || {
            let text = std::fs::read_to_string(&self.0).unwrap_or_default();
            let line = text.lines().nth(n)?;
            let mut it = line.split_whitespace().map(|v| v.parse::<u32>().ok());
            Some((it.next()??, it.next()??))
        })
    }
}

impl Drop for StallPids {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The value of the first sample of metric `name` whose labels contain
/// every one of `labels`, in Prometheus text.
pub fn metric(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| labels.iter().all(|lb| l.contains(lb)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// `wrk` (Debian's) against `path` on a loopback port: `conns` connections
/// on two threads for `secs`; returns the requests it completed.
pub fn wrk(port: u16, path: &str, conns: u32, secs: u32) -> u64 {
    let out = Command::new("wrk")
        .args(["-t2", &format!("-c{conns}"), &format!("-d{secs}s")])
        .arg(format!("http://127.0.0.1:{port}{path}"))
        .output()
        .expect("wrk is not installed: run `cargo xtask test`, which installs it");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().split(" requests in ").next()?.parse().ok())
        .unwrap_or_else(|| panic!("wrk printed no request count: {text}"))
}

/// A file whose creation lets a waiting child go on: the child polls for it,
/// so the tracer attaches before the child does what the test watches, and
/// no sleep decides which comes first. Removed when dropped.
pub struct GoFile(PathBuf);

impl GoFile {
    pub fn new(tag: &str) -> GoFile {
        let p = std::env::temp_dir().join(format!("tracer-go-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        GoFile(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Python lines that import os and time and wait for the file.
    pub fn python_wait(&self) -> String {
        format!(
            "import os, time\nwhile not os.path.exists({:?}):\n    time.sleep(0.01)\n",
            self.0.to_str().expect("a UTF-8 temp dir")
        )
    }

    pub fn release(&self) {
        std::fs::write(&self.0, b"").expect("creating the go file");
    }
}

impl Drop for GoFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The syscall a process's main thread is blocked in, as /proc/PID/syscall
/// gives it: the number, then the six arguments. None while it runs.
pub fn blocked_syscall(pid: u32) -> Option<Vec<u64>> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?;
    let fields: Vec<u64> = text
        .split_whitespace()
        .take(7)
        .map(|f| match f.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16).ok(),
            None => f.parse().ok(),
        })
        .collect::<Option<_>>()?;
    (fields.len() == 7).then_some(fields)
}

/// Waits until `pid`'s main thread is blocked in syscall `nr` and `also`
/// holds for its (number, arguments); returns when that was first seen.
pub fn wait_blocked_in(pid: u32, nr: i64, also: impl Fn(&[u64]) -> bool) -> Instant {
    eventually(
        &format!("pid {pid} blocked in syscall {nr}"),
        Duration::from_secs(10),
        || {
            blocked_syscall(pid)
                .filter(|s| s[0] == nr as u64 && also(s))
                .map(|_| Instant::now())
        },
    )
}

/// tests/apps/tcp_server.py with `args`, its output captured: the process
/// and the port it printed first.
pub fn tcp_server(args: &[&str]) -> (Proc, u16) {
    let mut p = Proc::spawn_captured(
        Command::new(python())
            .arg(apps_dir().join("tcp_server.py"))
            .args(args),
    );
    let line = p.first_line(Duration::from_secs(10));
    let port = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("tcp_server.py printed {line:?}, not its port"));
    (p, port)
}

/// `clients` threads open connections to `port` for `d`, each sending one
/// byte and reading until the server closes; returns how many were opened.
pub fn connection_storm(port: u16, clients: usize, d: Duration) -> u64 {
    let deadline = Instant::now() + d;
    let threads: Vec<_> = (0..clients)
        .map(|_| {
            std::thread::spawn(move || {
                let mut n = 0u64;
                while Instant::now() < deadline {
                    if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)) {
                        let _ = c.write_all(b"x");
                        let mut sink = [0u8; 8];
                        let _ = c.read(&mut sink);
                        n += 1;
                    }
                }
                n
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
}

/// Sends `GET path` on a new connection in a background thread; the
/// receiver gets the raw response (possibly empty when the worker dies).
pub fn get_async(port: u16, path: &str, timeout: Duration) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = channel();
    let path = path.to_string();
    std::thread::spawn(move || {
        let r = (|| {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(slow(timeout)))?;
            write!(
                s,
                "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        let _ = tx.send(r);
    });
    rx
}

/// Blocking GET; the response body.
pub fn get(port: u16, path: &str) -> String {
    get_async(port, path, Duration::from_secs(10))
        .recv()
        .expect("request thread")
        .unwrap_or_else(|e| panic!("GET {path} on port {port}: {e}"))
}

/// How much slower than this machine the tests run: `TRACER_TEST_SLOWDOWN`
/// (a factor, 1 when unset). A kernel under emulation (`cargo xtask test
/// --kernel`) runs everything 3-5x slower; every wait and window of these
/// helpers is stretched by it, so a test waits for its event rather than
/// failing on a clock.
pub fn slowdown() -> f64 {
    std::env::var("TRACER_TEST_SLOWDOWN")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| *f >= 1.0 && *f <= 100.0)
        .unwrap_or(1.0)
}

/// `d` stretched by the slowdown.
pub fn slow(d: Duration) -> Duration {
    d.mul_f64(slowdown())
}

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let timeout = slow(timeout);
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// nginx from Debian's package, on loopback, in front of `upstream_port`.
/// Request buffering is off so a slow upload reaches Gunicorn as it comes.
pub struct Nginx {
    pub port: u16,
    pub dir: PathBuf,
    proc: Option<Proc>,
    /// The port, held until nginx is gone (it listens beside it).
    _held: ReservedPort,
}

/// What a test changes in nginx's proxying; the default is `Nginx::start`'s.
#[derive(Debug, Clone, Default)]
pub struct NginxConf {
    /// Keep up to this many idle connections to Gunicorn open for reuse
    /// (`keepalive` in the upstream block), for this long.
    pub upstream_keepalive: Option<(u32, Duration)>,
    /// `proxy_read_timeout`: nginx answers 504 after this long without a
    /// response byte.
    pub read_timeout: Option<Duration>,
}

impl Nginx {
    pub fn start(upstream_port: u16) -> Nginx {
        Nginx::start_with(upstream_port, &NginxConf::default())
    }

    pub fn start_with(upstream_port: u16, c: &NginxConf) -> Nginx {
        let held = ReservedPort::new();
        let port = held.port;
        let dir = std::env::temp_dir().join(format!("tracer-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let keepalive = c
            .upstream_keepalive
            .map(|(n, t)| format!(" keepalive {n}; keepalive_timeout {}s;", t.as_secs()))
            .unwrap_or_default();
        let mut location = String::new();
        if c.upstream_keepalive.is_some() {
            location.push_str("      proxy_set_header Connection \"\";\n");
        }
        if let Some(t) = c.read_timeout {
            location.push_str(&format!("      proxy_read_timeout {}s;\n", t.as_secs()));
        }
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               upstream gunicorn {{ server 127.0.0.1:{upstream_port};{keepalive} }}\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass http://gunicorn;\n      proxy_next_upstream off;\n\
                 proxy_request_buffering off;\n      proxy_http_version 1.1;\n{location}    }}\n  }}\n}}\n"
        );
        std::fs::write(dir.join("nginx.conf"), conf).unwrap();
        let bin = ["/usr/sbin/nginx", "/usr/bin/nginx"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .expect("nginx is not installed: run `cargo xtask test`, which installs it");
        let p = Proc::spawn(
            Command::new(bin)
                .arg("-c")
                .arg(dir.join("nginx.conf"))
                .arg("-p")
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::inherit()),
        );
        eventually("nginx listening", Duration::from_secs(10), || {
            TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Nginx {
            port,
            dir,
            proc: Some(p),
            _held: held,
        }
    }

    /// HTTP status codes of the access log, in order.
    pub fn statuses(&self) -> Vec<u16> {
        std::fs::read_to_string(self.dir.join("access.log"))
            .unwrap_or_default()
            .lines()
            // combined format: ... "GET / HTTP/1.1" 200 3 "-" "-"
            .filter_map(|l| l.split('"').nth(2)?.split_whitespace().next()?.parse().ok())
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        drop(self.proc.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A POST whose body arrives in two parts `gap` apart, like a slow upload.
/// Returns the HTTP status line (empty if the connection died).
pub fn slow_upload(port: u16, gap: Duration) -> String {
    let run = || -> std::io::Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_read_timeout(Some(Duration::from_secs(20)))?;
        s.write_all(b"POST /upload HTTP/1.1\r\nHost: test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n12345")?;
        std::thread::sleep(gap);
        let _ = s.write_all(b"67890");
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .next()
            .unwrap_or("")
            .to_string())
    };
    run().unwrap_or_default()
}

/// The frames of a stall's `py_stack` (innermost first), as
/// "function (file:line)"; panics, showing the stall, when it has none.
pub fn py_frames(stall: &Value) -> Vec<String> {
    stall["py_stack"]
        .as_array()
        .unwrap_or_else(|| panic!("no py_stack: {stall}"))
        .iter()
        .map(|f| {
            format!(
                "{} ({}:{})",
                f["function"].as_str().unwrap(),
                f["file"].as_str().unwrap(),
                f["line"]
            )
        })
        .collect()
}

/// Whether a stall's stack has a frame of `function` in a file whose name
/// ends with `file`.
pub fn has_frame(stall: &Value, function: &str, file: &str) -> bool {
    stall["py_stack"].as_array().is_some_and(|fs| {
        fs.iter().any(|f| {
            f["function"] == function && f["file"].as_str().is_some_and(|p| p.ends_with(file))
        })
    })
}

/// The tracer's child that reads Python stacks, once it has dropped its
/// privileges: its resource limits are the last step of the drop (its
/// cmdline shows before; a test that read its credentials then saw
/// root's), and only it may open no more than 64 files.
pub fn stack_helper_of(tracer: u32) -> u32 {
    eventually("the stack helper", Duration::from_secs(10), || {
        let tasks = std::fs::read_dir(format!("/proc/{tracer}/task")).ok()?;
        tasks
            .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("children")).ok())
            .flat_map(|c| {
                c.split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    .collect::<Vec<_>>()
            })
            .find(|c| {
                let helper = std::fs::read(format!("/proc/{c}/cmdline"))
                    .is_ok_and(|b| String::from_utf8_lossy(&b).contains("__pystack-helper"));
                let dropped = std::fs::read_to_string(format!("/proc/{c}/limits")).is_ok_and(|s| {
                    s.lines().any(|l| {
                        l.starts_with("Max open files") && l.split_whitespace().nth(3) == Some("64")
                    })
                });
                helper && dropped
            })
    })
}

/// Python code that waits for SIGUSR1, forks `n` children that sleep 20 s,
/// then sleeps itself: a fork burst that starts when the test says.
pub fn forker(n: usize) -> String {
    format!(
        "import os, signal, time\nsignal.signal(signal.SIGUSR1, lambda *a: None)\nsignal.pause()\nfor _ in range({n}):\n    if os.fork() == 0:\n        time.sleep(20)\n        os._exit(0)\ntime.sleep(60)\n"
    )
}
