//! Helpers for the integration and end-to-end tests: they start real
//! processes (the tracer binary, Gunicorn from the test virtualenv, Python
//! scripts) and stop them when dropped.
//!
//! `cargo xtask test` builds the tracer and the virtualenv and sets
//! TRACER_BIN and TRACER_VENV; run by hand, the defaults under target/ apply.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::{Duration, Instant};

pub use serde_json::Value;

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
        let mut child = Command::new(tracer_bin())
            .arg("watch")
            .args(["--format", "json"])
            .args(args)
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

    /// Waits for the first event (already received or new) matching `pred`.
    pub fn wait_for(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> (Instant, Value) {
        if let Some(found) = self.events.iter().find(|(_, v)| pred(v)) {
            return found.clone();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    self.take(line);
                    let last = self.events.last().unwrap();
                    if pred(&last.1) {
                        return last.clone();
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    self.drain_stderr();
                    panic!(
                        "timed out after {timeout:?} waiting for {what}\nevents: {:#?}\nstderr: {:#?}",
                        self.events
                            .iter()
                            .map(|(_, v)| v.to_string())
                            .collect::<Vec<_>>(),
                        self.stderr_lines
                    );
                }
                Err(RecvTimeoutError::Disconnected) => {
                    self.drain_stderr();
                    panic!(
                        "tracer exited while waiting for {what} (status {:?})\nevents: {:#?}\nstderr: {:#?}",
                        self.child.try_wait(),
                        self.events
                            .iter()
                            .map(|(_, v)| v.to_string())
                            .collect::<Vec<_>>(),
                        self.stderr_lines
                    );
                }
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
                Err(_) => {
                    self.drain_stderr();
                    panic!(
                        "waited {timeout:?} for {n} x {what}, got {}\nevents: {:#?}\nstderr: {:#?}",
                        found.len(),
                        self.events
                            .iter()
                            .map(|(_, v)| v.to_string())
                            .collect::<Vec<_>>(),
                        self.stderr_lines
                    );
                }
            }
        }
    }

    /// Collects events for `d` without expecting anything.
    pub fn collect_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while let Ok(line) = self
            .stdout
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            self.take(line);
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

    /// Starts a Python snippet with the test virtualenv's interpreter.
    pub fn python(code: &str) -> Proc {
        Proc::spawn(Command::new(python()).args(["-c", code]))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits until `n` lines of the output contain `needle`; returns the n-th.
    pub fn wait_count(&mut self, needle: &str, n: usize, timeout: Duration) -> Line {
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

    /// Waits for a line of the output containing `needle`.
    pub fn wait_line(&mut self, needle: &str, timeout: Duration) -> Line {
        self.wait_count(needle, 1, timeout)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for the child.
        unsafe { libc::kill(-(self.child.id() as i32), libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

/// A free TCP port on loopback (bound then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding an ephemeral port")
}

/// Starts Gunicorn from the test virtualenv in tests/apps, output captured.
pub fn gunicorn(args: &[&str], env: &[(&str, &str)]) -> Proc {
    let mut cmd = Command::new(venv().join("bin/gunicorn"));
    cmd.args(args)
        .current_dir(apps_dir())
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut p = Proc::spawn(&mut cmd);
    // stdout and stderr merged, as a person reading Gunicorn's log sees them.
    let (tx, rx) = channel();
    pump_into(p.child.stdout.take().unwrap(), tx.clone());
    pump_into(p.child.stderr.take().unwrap(), tx);
    p.output = Some(rx);
    p
}

/// Sends `GET path` on a new connection in a background thread; the
/// receiver gets the raw response (possibly empty when the worker dies).
pub fn get_async(port: u16, path: &str, timeout: Duration) -> Receiver<std::io::Result<String>> {
    let (tx, rx) = channel();
    let path = path.to_string();
    std::thread::spawn(move || {
        let r = (|| {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(timeout))?;
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

/// Polls `f` until it returns Some, or panics after `timeout`.
pub fn eventually<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
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
}

impl Nginx {
    pub fn start(upstream_port: u16) -> Nginx {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("tracer-nginx-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        let conf = format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log info;\n\
             events {{ worker_connections 1024; }}\n\
             http {{\n  access_log {d}/access.log;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
               server {{\n    listen 127.0.0.1:{port};\n    location / {{\n\
                 proxy_pass http://127.0.0.1:{upstream_port};\n      proxy_next_upstream off;\n\
                 proxy_request_buffering off;\n      proxy_http_version 1.1;\n    }}\n  }}\n}}\n"
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

impl Tracer {
    /// Like [`Tracer::start`], with the tracer run through `wrapper` (say
    /// `setpriv ...`), which must exec it in place so `pid()` stays the tracer's.
    pub fn start_via(wrapper: &[&str], args: &[&str]) -> Tracer {
        let (prog, pre) = wrapper.split_first().expect("a wrapper command");
        let mut child = Command::new(prog)
            .args(pre)
            .arg(tracer_bin())
            .args(["watch", "--format", "json"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning the tracer through its wrapper");
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
}
