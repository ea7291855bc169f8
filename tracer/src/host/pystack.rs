//! Python stacks, read for the tracer by a helper process it starts and
//! owns (host/pystack_helper.rs): the `py-spy` crate as a library, no
//! program of anyone else's executed.
//!
//! The target controls its memory and its files, so the reading is done
//! out of the tracer's process, by a helper with no privilege but
//! CAP_SYS_PTRACE, and the tracer bounds it from outside: one request at a
//! time (so at most one read of a process at a time), a deadline per
//! request after which the helper is killed and replaced and the process
//! it was reading is not read again (a set-up ahead of any stall gets a
//! second chance, at the first stall: one a loaded host made slow must
//! not cost every later stack), a rate per master, and answers
//! checked against every bound (pystack_proto). py-spy only reads memory
//! with `process_vm_readv` (`NonBlocking`): a blocked thread's frames
//! cannot change while it is blocked, so its stack is read exactly.
//! Setting a reader up (`PythonSpy::new`) costs milliseconds, so it is
//! done once per process, when the worker is found; the session only
//! sends requests and polls for answers.
use std::collections::{HashMap, VecDeque};
use std::io::BufReader;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::privileges;
use super::pystack_helper::HELPER_ARG;
use super::pystack_proto::{self as proto, Reply, Request};
use crate::model::{PyFrame, PyStackCost, PyThread};

/// Frames kept per thread, innermost first (the outer rest is counted).
pub const MAX_FRAMES: usize = 64;
/// Other threads kept with --py-stack all-threads.
pub const MAX_THREADS: usize = 32;
/// How long the session waits for a stack before reporting without it.
pub const CAPTURE_DEADLINE: Duration = Duration::from_secs(2);
/// How long a reader's set-up ahead of a stall may take.
const OPEN_DEADLINE: Duration = Duration::from_secs(1);
/// How long a new helper may take to answer its first request (a no-op):
/// its start is not counted against the process it is asked to read.
const HELPER_START_DEADLINE: Duration = Duration::from_secs(10);
/// Set-ups waiting at most; past it a worker is set up at its first stall.
const MAX_QUEUED_OPENS: usize = 256;
/// Stacks read per master: a burst of this many, then RATE_PER_SEC.
const RATE_BURST: f64 = 10.0;
const RATE_PER_SEC: f64 = 5.0;
/// Processes remembered as having stalled the helper (dropped at exit).
const MAX_QUARANTINED: usize = 4096;

/// The stalled thread's stack, and the others' when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub frames: Vec<PyFrame>,
    pub omitted: u64,
    /// With all threads: every other Python thread (at most MAX_THREADS).
    pub others: Option<Vec<PyThread>>,
}

enum Job {
    Open(u32),
    Forget(u32),
    Capture {
        pid: u32,
        tid: u32,
        all: bool,
        deadline: Instant,
        reply: Sender<Result<Captured, String>>,
    },
}

/// Sends requests to the stack helper from a thread of its own.
pub struct StackReader {
    jobs: Sender<Job>,
    costs: Arc<Mutex<Costs>>,
}

/// How long the helper took, as the manager timed each answered request
/// (the pipe's round trip included): for the summary and the benchmark.
#[derive(Default)]
struct Costs {
    setup_ms: Samples,
    capture_ms: Samples,
}

/// The last `MAX_SAMPLES` durations, and how many there were in all.
#[derive(Default)]
struct Samples {
    all: u64,
    last: VecDeque<f64>,
}

const MAX_SAMPLES: usize = 4096;

impl Samples {
    fn add(&mut self, ms: f64) {
        self.all += 1;
        if self.last.len() >= MAX_SAMPLES {
            self.last.pop_front();
        }
        self.last.push_back(ms);
    }

    /// (count, median, 99th percentile) of the kept durations.
    fn figures(&self) -> (u64, Option<f64>, Option<f64>) {
        let mut v: Vec<f64> = self.last.iter().copied().collect();
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
        };
        (self.all, at(0.5), at(0.99))
    }
}

impl StackReader {
    /// Starts the helper from the tracer's own binary.
    pub fn start() -> std::io::Result<StackReader> {
        StackReader::start_program("/proc/self/exe".into())
    }

    /// Starts the helper from `program` (the tracer's binary), with a
    /// first helper now so that a helper that cannot start is said at once.
    pub(crate) fn start_program(program: std::path::PathBuf) -> std::io::Result<StackReader> {
        let first = Helper::spawn(&program)?;
        let (jobs, rx) = channel::<Job>();
        let costs = Arc::new(Mutex::new(Costs::default()));
        let worker_costs = Arc::clone(&costs);
        std::thread::Builder::new()
            .name("pystack".into())
            .spawn(move || {
                let mut m = Manager {
                    costs: worker_costs,
                    program,
                    helper: Some(first),
                    captures: VecDeque::new(),
                    setups: VecDeque::new(),
                    quarantined: HashMap::new(),
                    late_setups: Default::default(),
                    rates: HashMap::new(),
                };
                m.run(rx)
            })?;
        Ok(StackReader { jobs, costs })
    }

    /// What reading stacks has cost so far (median and 99th percentile of
    /// the last 4,096 of each).
    pub fn costs(&self) -> PyStackCost {
        let c = self.costs.lock().unwrap_or_else(|e| e.into_inner());
        let (setups, setup_ms_median, setup_ms_p99) = c.setup_ms.figures();
        let (captures, capture_ms_median, capture_ms_p99) = c.capture_ms.figures();
        PyStackCost {
            setups,
            setup_ms_median,
            setup_ms_p99,
            captures,
            capture_ms_median,
            capture_ms_p99,
        }
    }

    /// Sets `pid`'s reader up now, off the session's thread.
    pub fn open(&self, pid: u32) {
        let _ = self.jobs.send(Job::Open(pid));
    }

    /// Drops `pid`'s reader (the process ended; its pid may come back).
    pub fn forget(&self, pid: u32) {
        let _ = self.jobs.send(Job::Forget(pid));
    }

    /// Asks for thread `tid`'s stack; the answer arrives on the receiver.
    /// The caller gives up at `deadline`; a capture not started by then is
    /// not started, and one still running then is stopped.
    pub fn capture(
        &self,
        pid: u32,
        tid: u32,
        all: bool,
        deadline: Instant,
    ) -> Receiver<Result<Captured, String>> {
        let (reply, rx) = channel();
        let _ = self.jobs.send(Job::Capture {
            pid,
            tid,
            all,
            deadline,
            reply,
        });
        rx
    }
}

/// A running helper: its stdin for requests, its answers from a thread
/// that reads its stdout.
struct Helper {
    child: Child,
    stdin: ChildStdin,
    answers: Receiver<std::io::Result<Vec<u8>>>,
    /// It has answered once: it is up.
    up: bool,
}

enum CallError {
    /// No answer by the deadline (the helper is then killed).
    Late,
    /// The helper ended, or its output was out of step or bounds.
    Gone(String),
    /// The request could not be written: it was not read by the helper.
    NotSent,
}

impl Helper {
    fn spawn(program: &std::path::Path) -> std::io::Result<Helper> {
        let mut cmd = Command::new(program);
        // A tracer no longer root (host::privileges) passes the helper the
        // capabilities it reads with; exec by a non-root process keeps
        // only ambient ones.
        // SAFETY: pass_to_exec is async-signal-safe (system calls only).
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                privileges::pass_to_exec(privileges::PROC_READING)
            });
        }
        let mut child = cmd
            .arg(HELPER_ARG)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = child.stdout.take().expect("piped");
        let (tx, answers) = channel();
        std::thread::Builder::new()
            .name("pystack-out".into())
            .spawn(move || {
                let mut r = BufReader::new(stdout);
                loop {
                    let a = proto::read_frame(&mut r, proto::MAX_REPLY);
                    let end = a.is_err();
                    if tx.send(a).is_err() || end {
                        return;
                    }
                }
            })?;
        Ok(Helper {
            child,
            stdin,
            answers,
            up: false,
        })
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn call(&mut self, req: Request, deadline: Instant) -> Result<Reply, CallError> {
        let bytes = serde_json::to_vec(&req).map_err(|e| CallError::Gone(e.to_string()))?;
        proto::write_frame(&mut self.stdin, &bytes).map_err(|_| CallError::NotSent)?;
        let left = deadline.saturating_duration_since(Instant::now());
        match self.answers.recv_timeout(left) {
            Ok(Ok(frame)) => serde_json::from_slice(&frame)
                .map_err(|e| CallError::Gone(format!("its answer is not understood: {e}"))),
            Ok(Err(e)) => Err(CallError::Gone(proto::cut(e.to_string(), 200))),
            Err(RecvTimeoutError::Timeout) => Err(CallError::Late),
            Err(RecvTimeoutError::Disconnected) => Err(CallError::Gone("it ended".into())),
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        // Our own child, by its handle: killed and reaped.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token bucket.
struct Rate {
    tokens: f64,
    at: Instant,
}

struct Manager {
    costs: Arc<Mutex<Costs>>,
    program: std::path::PathBuf,
    helper: Option<Helper>,
    captures: VecDeque<Job>,
    /// Opens and forgets, in order.
    setups: VecDeque<Job>,
    /// Processes whose read outlived its deadline, with what was said.
    quarantined: HashMap<u32, String>,
    /// Processes whose set-up ahead of a stall outlived its deadline once:
    /// set up again at their first capture, and not read again if that is
    /// late too.
    late_setups: std::collections::HashSet<u32>,
    rates: HashMap<u32, Rate>,
}

impl Manager {
    fn run(&mut self, rx: Receiver<Job>) {
        loop {
            if self.captures.is_empty() && self.setups.is_empty() {
                match rx.recv() {
                    Ok(j) => self.queue(j),
                    Err(_) => return,
                }
            }
            while let Ok(j) = rx.try_recv() {
                self.queue(j);
            }
            // A stall waits; a set-up ahead of one can wait more.
            if let Some(Job::Capture {
                pid,
                tid,
                all,
                deadline,
                reply,
            }) = self.captures.pop_front()
            {
                // The process's exit, told before the stall, comes first.
                if let Some(i) = self
                    .setups
                    .iter()
                    .position(|j| matches!(j, Job::Forget(p) if *p == pid))
                {
                    self.setups.remove(i);
                    self.forget(pid);
                }
                let r = self.capture(pid, tid, all, deadline);
                let _ = reply.send(r);
            } else if let Some(j) = self.setups.pop_front() {
                match j {
                    Job::Open(pid) if !self.quarantined.contains_key(&pid) => {
                        let began = Instant::now();
                        if self
                            .call(Request::Open { pid }, began + OPEN_DEADLINE)
                            .is_ok()
                        {
                            self.cost(|c| &mut c.setup_ms, began);
                        }
                    }
                    Job::Forget(pid) => self.forget(pid),
                    _ => {}
                }
            }
        }
    }

    fn queue(&mut self, j: Job) {
        match j {
            Job::Capture { .. } => self.captures.push_back(j),
            Job::Open(_) if self.setups.len() >= MAX_QUEUED_OPENS => {}
            j => self.setups.push_back(j),
        }
    }

    fn forget(&mut self, pid: u32) {
        self.quarantined.remove(&pid);
        self.late_setups.remove(&pid);
        if self.helper.is_some() {
            let _ = self.call(Request::Forget { pid }, Instant::now() + OPEN_DEADLINE);
        }
    }

    /// Whether master `m`'s workers may have one more stack read now.
    fn allowed(&mut self, m: u32) -> bool {
        let now = Instant::now();
        if self.rates.len() > 4096 {
            self.rates
                .retain(|_, r| now.duration_since(r.at) < Duration::from_secs(10));
        }
        let r = self.rates.entry(m).or_insert(Rate {
            tokens: RATE_BURST,
            at: now,
        });
        r.tokens =
            (r.tokens + now.duration_since(r.at).as_secs_f64() * RATE_PER_SEC).min(RATE_BURST);
        r.at = now;
        if r.tokens >= 1.0 {
            r.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn capture(
        &mut self,
        pid: u32,
        tid: u32,
        all: bool,
        deadline: Instant,
    ) -> Result<Captured, String> {
        if Instant::now() >= deadline {
            return Err(format!(
                "the Python stack was not read: the stack reader was busy past the {}ms deadline",
                CAPTURE_DEADLINE.as_millis()
            ));
        }
        if let Some(why) = self.quarantined.get(&pid) {
            return Err(why.clone());
        }
        let master = super::proc::ppid(pid).unwrap_or(pid);
        if !self.allowed(master) {
            return Err(format!(
                "the Python stack was not read: the workers of master {master} asked for more than {RATE_PER_SEC} stacks a second (after a burst of {RATE_BURST})"
            ));
        }
        let began = Instant::now();
        let r = proto::from_reply(self.call(Request::Capture { pid, tid, all }, deadline)?);
        if r.is_ok() {
            self.cost(|c| &mut c.capture_ms, began);
        }
        r
    }

    /// Records how long since `began` a request took.
    fn cost(&self, which: impl Fn(&mut Costs) -> &mut Samples, began: Instant) {
        let ms = began.elapsed().as_secs_f64() * 1000.0;
        let mut c = self.costs.lock().unwrap_or_else(|e| e.into_inner());
        which(&mut c).add(ms);
    }

    /// Sends `req` to the helper (started anew if it is not running) and
    /// waits for its answer until `deadline`. A helper late past it is
    /// killed, and the process it was reading is not read again.
    fn call(&mut self, req: Request, deadline: Instant) -> Result<Reply, String> {
        for _ in 0..2 {
            if self.helper.as_mut().is_none_or(|h| h.exited()) {
                self.helper = None;
                self.helper =
                    Some(Helper::spawn(&self.program).map_err(|e| {
                        format!("the Python stack helper could not be started: {e}")
                    })?);
            }
            // A helper's start (exec, dropping its privileges) is its own
            // cost: the request's time begins once it has answered a no-op.
            let mut deadline = deadline;
            if !self.helper.as_ref().is_some_and(|h| h.up) {
                let began = Instant::now();
                let h = self.helper.as_mut().expect("started above");
                match h.call(Request::Forget { pid: 0 }, began + HELPER_START_DEADLINE) {
                    Ok(_) => h.up = true,
                    // Not delivered: a new helper is tried.
                    Err(CallError::NotSent) => {
                        self.helper = None;
                        continue;
                    }
                    Err(CallError::Late) => {
                        self.helper = None;
                        return Err(format!(
                            "the Python stack helper did not start within {} s",
                            HELPER_START_DEADLINE.as_secs()
                        ));
                    }
                    Err(CallError::Gone(why)) => {
                        self.helper = None;
                        return Err(format!(
                            "the Python stack helper stopped as it started ({why})"
                        ));
                    }
                }
                deadline += began.elapsed();
            }
            let h = self.helper.as_mut().expect("started above");
            match h.call(req, deadline) {
                Ok(r) => return Ok(r),
                // Not delivered: a new helper gets it.
                Err(CallError::NotSent) => self.helper = None,
                Err(CallError::Gone(why)) => {
                    self.helper = None;
                    return Err(format!(
                        "the Python stack helper stopped while reading ({why}); it is restarted"
                    ));
                }
                Err(CallError::Late) => {
                    self.helper = None;
                    // A set-up ahead of any stall, late for the first time:
                    // the host may have been busy (a worker's boot, under
                    // load). Its first capture sets it up again, within its
                    // own deadline.
                    if let Request::Open { pid } = req
                        && self.late_setups.len() < MAX_QUARANTINED
                        && self.late_setups.insert(pid)
                    {
                        return Err(format!(
                            "setting up the stack reader of process {pid} outlived its deadline; the helper was restarted, and the set-up is tried again at the process's first stall"
                        ));
                    }
                    let (pid, what) = match req {
                        Request::Open { pid } => (pid, "setting up the stack reader of"),
                        Request::Capture { pid, .. } | Request::Forget { pid } => {
                            (pid, "reading the Python stack of")
                        }
                    };
                    let why = format!(
                        "the Python stack of process {pid} is not read: {what} it outlived its deadline, so the helper was stopped and restarted, and this process is not read again"
                    );
                    if self.quarantined.len() < MAX_QUARANTINED {
                        self.quarantined.insert(pid, why.clone());
                    }
                    return Err(why);
                }
            }
        }
        Err("the Python stack helper could not be sent the request".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in helper that takes 1.5 s to start (past OPEN_DEADLINE),
    /// then answers every request: Done, and an error for a capture.
    const SLOW_HELPER: &str = "#!/usr/bin/python3
import json, struct, sys, time
time.sleep(1.5)
i, o = sys.stdin.buffer, sys.stdout.buffer
while True:
    h = i.read(4)
    if len(h) < 4:
        break
    req = json.loads(i.read(struct.unpack('<I', h)[0]))
    rep = {'Error': 'no stack here'} if 'Capture' in req else 'Done'
    b = json.dumps(rep).encode()
    o.write(struct.pack('<I', len(b)) + b)
    o.flush()
";

    /// A helper slow to start does not make the first set-up late: the
    /// process is still read (here the stand-in's own error comes back),
    /// not quarantined as "not read again".
    #[test]
    fn a_helper_slow_to_start_is_not_blamed_on_the_first_process() {
        use std::os::unix::fs::PermissionsExt;
        let path = std::env::temp_dir().join(format!("slow-helper-{}.py", std::process::id()));
        std::fs::write(&path, SLOW_HELPER).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let r = StackReader::start_program(path.clone()).unwrap();
        r.open(42);
        let waited = Instant::now();
        while r.costs().setups == 0 && waited.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(r.costs().setups, 1, "the set-up was done, not late");
        let got = r
            .capture(42, 42, false, Instant::now() + Duration::from_secs(10))
            .recv_timeout(Duration::from_secs(10))
            .unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(got.map(|_| ()), Err("no stack here".to_string()));
    }

    /// A stand-in helper whose every request about process 42 takes 3 s
    /// (past OPEN_DEADLINE and CAPTURE_DEADLINE) while the file `SLOW`
    /// exists; others answer at once: Done, and an error for a capture.
    const LATE_HELPER: &str = "#!/usr/bin/python3
import json, os, struct, sys, time
i, o = sys.stdin.buffer, sys.stdout.buffer
while True:
    h = i.read(4)
    if len(h) < 4:
        break
    req = json.loads(i.read(struct.unpack('<I', h)[0]))
    body = req.get('Open') or req.get('Capture') if isinstance(req, dict) else None
    if body and body.get('pid') == 42 and os.path.exists('SLOW'):
        time.sleep(3)
    rep = {'Error': 'no stack here'} if 'Capture' in req else 'Done'
    b = json.dumps(rep).encode()
    o.write(struct.pack('<I', len(b)) + b)
    o.flush()
";

    fn late_helper(tag: &str) -> (StackReader, std::path::PathBuf, std::path::PathBuf) {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir();
        let path = dir.join(format!("late-helper-{tag}-{}.py", std::process::id()));
        let slow = dir.join(format!("late-helper-{tag}-{}.slow", std::process::id()));
        let script = LATE_HELPER.replace("'SLOW'", &format!("{:?}", slow.display().to_string()));
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::write(&slow, "").unwrap();
        (
            StackReader::start_program(path.clone()).unwrap(),
            path,
            slow,
        )
    }

    fn capture_42(r: &StackReader) -> Result<(), String> {
        r.capture(42, 42, false, Instant::now() + CAPTURE_DEADLINE)
            .recv_timeout(Duration::from_secs(10))
            .unwrap()
            .map(|_| ())
    }

    /// A set-up made late once (a busy host) is tried again at the first
    /// stall: the stack is read then, not given up for good.
    #[test]
    fn a_set_up_late_once_is_tried_again_at_the_first_stall() {
        let (r, path, slow) = late_helper("once");
        r.open(42);
        // The set-up runs into its deadline and the helper is replaced.
        std::thread::sleep(OPEN_DEADLINE + Duration::from_millis(500));
        std::fs::remove_file(&slow).unwrap();
        let got = capture_42(&r);
        let _ = std::fs::remove_file(&path);
        assert_eq!(
            got,
            Err("no stack here".to_string()),
            "read, not quarantined"
        );
    }

    /// Late at the set-up and again at the capture: not read again.
    #[test]
    fn a_process_late_twice_is_not_read_again() {
        let (r, path, slow) = late_helper("twice");
        r.open(42);
        std::thread::sleep(OPEN_DEADLINE + Duration::from_millis(500));
        let first = capture_42(&r);
        std::fs::remove_file(&slow).unwrap();
        let second = capture_42(&r);
        let _ = std::fs::remove_file(&path);
        for got in [first, second] {
            assert!(
                got.as_ref().is_err_and(|e| e.contains("not read again")),
                "{got:?}"
            );
        }
    }

    #[test]
    fn cost_figures_are_the_median_and_99th_percentile_of_the_kept() {
        let mut s = Samples::default();
        assert_eq!(s.figures(), (0, None, None));
        for ms in 1..=100 {
            s.add(ms as f64);
        }
        assert_eq!(s.figures(), (100, Some(51.0), Some(99.0)));
        for _ in 0..MAX_SAMPLES {
            s.add(7.0);
        }
        let (n, median, p99) = s.figures();
        assert_eq!(n, 100 + MAX_SAMPLES as u64, "all are counted");
        assert_eq!((median, p99), (Some(7.0), Some(7.0)), "the last are kept");
    }
}
