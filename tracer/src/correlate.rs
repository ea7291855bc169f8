//! The correlator: pure logic that turns kernel events and in-flight syscall
//! samples into the events a person reads. It does no I/O: /proc lookups go
//! through the [`Enricher`] trait, so tests feed it synthetic input.
use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use crate::container::Container;
use crate::model::{FdInfo, Peer, Role};
use crate::net::{self, CloseKind, ConnFacts, EarlyClose};
use crate::signatures::{self, Cause};
use crate::syscalls;

/// What the kernel sent, decoded (see `intake`).
#[derive(Debug, Clone, PartialEq)]
pub enum KernelEvent {
    Fork {
        ts_ns: u64,
        parent: u32,
        child: u32,
        role: Role,
        master: u32,
    },
    Exit {
        ts_ns: u64,
        pid: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
    },
    Signal {
        ts_ns: u64,
        target: u32,
        sender: u32,
        sig: i32,
    },
    /// A thread woke up after sleeping at least the threshold in a syscall
    /// that may block.
    SlowSyscall {
        ts_ns: u64,
        tgid: u32,
        tid: u32,
        nr: i64,
        start_ns: u64,
        wake: Wake,
        arg0: u64,
        arg2: u64,
        seeded: bool,
    },
    Exec {
        ts_ns: u64,
        pid: u32,
    },
    /// A connection that ended with nothing sent back (or, outbound, nothing
    /// received). `ended_by` is one of `tracer_common::ended`.
    ConnEnd {
        ts_ns: u64,
        tgid: u32,
        tid: u32,
        fd: i32,
        conn: tracer_common::Conn,
        ended_by: u32,
    },
}

/// Why a thread that slept in a syscall woke up, as the kernel saw it then.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Nothing pending: the syscall is returning.
    Returning,
    /// A signal: the syscall is interrupted (and maybe restarted).
    Interrupted,
    /// SIGKILL: the thread dies inside the syscall.
    Killed,
}

/// One entry of the kernel's in-flight map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    pub tid: u32,
    pub tgid: u32,
    pub nr: i64,
    pub start_ns: u64,
    pub arg0: u64,
    pub arg2: u64,
    pub seq: u64,
    pub active: bool,
    pub seeded: bool,
}

/// /proc lookups, done only for a stall being reported.
pub trait Enricher {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo;
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64>;
    fn comm(&mut self, pid: u32) -> String;
    /// The container and pod of a process, if it runs in one.
    fn container(&mut self, pid: u32) -> Option<Container>;
}

/// Facts about one blocked syscall; also the body of the `stall` event.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StallReport {
    pub pid: u32,
    pub tid: u32,
    pub master_pid: u32,
    pub role: Role,
    pub comm: String,
    pub syscall: String,
    pub fd: Option<i32>,
    /// The byte count asked for, for read-like calls.
    pub count: Option<u64>,
    pub fd_kind: String,
    pub fd_target: Option<String>,
    pub peers: Vec<Peer>,
    /// For a pipe: true when only the blocked process holds a write end, so
    /// nothing else can ever wake it.
    pub only_self_can_wake: Option<bool>,
    pub blocked_ms: u64,
    /// The syscall was already in progress when the tracer attached, so
    /// `blocked_ms` is a lower bound.
    pub since_attach: bool,
    pub heartbeat_age_ms: Option<u64>,
    /// The master's --timeout, when its command line says.
    pub gunicorn_timeout_s: Option<f64>,
    pub cause: Option<Cause>,
    /// Container id, pod and namespace when the process runs in one.
    pub container: Option<Container>,
    /// With --py-stack: the Python stack of the stalled process (py-spy
    /// dump). Under gevent the blocked greenlet is the one running, so this
    /// names the application line that blocked the hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack: Option<String>,
    /// With --py-stack: why there is no stack (py-spy missing, or failed).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack_error: Option<String>,
    #[serde(skip)]
    pub start_ns: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Returned,
    Interrupted,
    Exited,
}

/// What the correlator tells the world. `ts_ns` is kernel monotonic time.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Output {
    /// A Gunicorn master now watched (found at start or started later).
    Master {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        app: Option<String>,
        timeout_s: Option<f64>,
        source: &'static str,
        container: Option<Container>,
    },
    Worker {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        role: Role,
        /// `fork` when the kernel saw it being born, `scan` when found at start.
        source: &'static str,
        app: Option<String>,
        container: Option<Container>,
    },
    Stall {
        #[serde(skip)]
        ts_ns: u64,
        #[serde(flatten)]
        report: StallReport,
    },
    StallEnd {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        tid: u32,
        master_pid: u32,
        syscall: String,
        fd: Option<i32>,
        fd_kind: String,
        blocked_ms: u64,
        outcome: Outcome,
        container: Option<Container>,
    },
    WorkerTimeout {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        signal: String,
        stall: Option<StallReport>,
        container: Option<Container>,
    },
    WorkerExit {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        role: Role,
        exit_code: Option<i32>,
        signal: Option<String>,
        container: Option<Container>,
    },
    EarlyClose {
        #[serde(skip)]
        ts_ns: u64,
        #[serde(flatten)]
        close: EarlyClose,
    },
}

impl Output {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Output::Master { ts_ns, .. }
            | Output::Worker { ts_ns, .. }
            | Output::Stall { ts_ns, .. }
            | Output::StallEnd { ts_ns, .. }
            | Output::WorkerTimeout { ts_ns, .. }
            | Output::WorkerExit { ts_ns, .. }
            | Output::EarlyClose { ts_ns, .. } => *ts_ns,
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Proc {
    master: u32,
    role: Role,
    app: Option<String>,
    timeout_s: Option<f64>,
    alive: bool,
    stalls: u32,
    timeouts: u32,
    killed_by_timeout: bool,
    exit_code: Option<i32>,
    exit_signal: Option<i32>,
    last_stall: Option<StallReport>,
    closes: CloseCounts,
    last_drop: Option<EarlyClose>,
    container: Option<Container>,
}

/// Early closes of one process, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CloseCounts {
    pub dropped_request: u32,
    pub idle: u32,
    pub upstream_cut: u32,
}

/// A stall that was reported and has not ended yet.
#[derive(Debug, Clone)]
struct Active {
    report: StallReport,
    /// In-flight entry currently carrying it (changes when a syscall
    /// interrupted by a signal is restarted).
    seq: u64,
    cur_start_ns: u64,
    nr: i64,
    /// Set when a signal woke the thread: the stall ends unless
    /// the thread re-enters the same call on the same fd within the grace.
    interrupted_at: Option<u64>,
    /// Polls in a row that did not find it in flight.
    missing_polls: u32,
}

/// How long a syscall interrupted by a signal has to be restarted to count
/// as the same stall (Python retries EINTR after running the handler).
const RESTART_GRACE_NS: u64 = 200_000_000;
/// Exited processes with findings kept for the summary, at most.
const MAX_EXITED_KEPT: usize = 256;
/// How long after a stall ends a kill by the master is still blamed on it.
const TIMEOUT_BLAME_NS: u64 = 60_000_000_000;

pub fn signal_name(sig: i32) -> String {
    let n = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        6 => "SIGABRT",
        7 => "SIGBUS",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        _ => return format!("SIG{sig}"),
    };
    n.to_string()
}

/// Syscalls whose first argument is an fd.
fn takes_fd(name: &str) -> bool {
    matches!(
        name,
        "read"
            | "write"
            | "readv"
            | "writev"
            | "pread64"
            | "pwrite64"
            | "preadv"
            | "pwritev"
            | "preadv2"
            | "pwritev2"
            | "recvfrom"
            | "recvmsg"
            | "recvmmsg"
            | "sendto"
            | "sendmsg"
            | "sendmmsg"
            | "connect"
            | "accept"
            | "accept4"
            | "flock"
            | "fcntl"
            | "ioctl"
            | "fsync"
            | "fdatasync"
            | "sync_file_range"
            | "ftruncate"
            | "fallocate"
            | "sendfile"
            | "splice"
            | "tee"
            | "shutdown"
            | "close"
    )
}

fn takes_count(name: &str) -> bool {
    matches!(
        name,
        "read" | "write" | "pread64" | "pwrite64" | "recvfrom" | "sendto"
    )
}

pub struct Correlator {
    threshold_ns: u64,
    procs: BTreeMap<u32, Proc>,
    /// Exited processes kept for the summary because something happened to
    /// them (stalls, timeouts, dropped requests), oldest first; bounded.
    exited_notable: VecDeque<u32>,
    /// Exited processes with nothing to report: only counted, so that worker
    /// churn (--max-requests) cannot grow the tracer's memory.
    exited_quiet: u64,
    active: HashMap<u32, Active>,
}

impl Correlator {
    pub fn new(threshold_ns: u64) -> Correlator {
        Correlator {
            threshold_ns,
            procs: BTreeMap::new(),
            exited_notable: VecDeque::new(),
            exited_quiet: 0,
            active: HashMap::new(),
        }
    }

    pub fn is_watched(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.alive)
    }

    /// A process found at start-up, or when a new master was discovered.
    #[allow(clippy::too_many_arguments)]
    pub fn add_process(
        &mut self,
        ts_ns: u64,
        pid: u32,
        master: u32,
        role: Role,
        app: Option<String>,
        timeout_s: Option<f64>,
        source: &'static str,
        container: Option<Container>,
    ) -> Option<Output> {
        if self.procs.get(&pid).is_some_and(|p| p.alive) {
            return None;
        }
        self.procs.insert(
            pid,
            Proc {
                master,
                role,
                app: app.clone(),
                timeout_s,
                alive: true,
                container: container.clone(),
                ..Default::default()
            },
        );
        Some(if role == Role::Master {
            Output::Master {
                ts_ns,
                pid,
                app,
                timeout_s,
                source,
                container,
            }
        } else {
            Output::Worker {
                ts_ns,
                pid,
                master_pid: master,
                role,
                source,
                app,
                container,
            }
        })
    }

    pub fn on_kernel(&mut self, ev: KernelEvent, enr: &mut dyn Enricher) -> Vec<Output> {
        let mut out = Vec::new();
        match ev {
            KernelEvent::Fork {
                ts_ns,
                child,
                role,
                master,
                ..
            } => {
                let (app, timeout) = self
                    .procs
                    .get(&master)
                    .map(|m| (m.app.clone(), m.timeout_s))
                    .unwrap_or_default();
                let container = enr.container(child);
                out.extend(
                    self.add_process(ts_ns, child, master, role, app, timeout, "fork", container),
                );
            }
            KernelEvent::Exit {
                ts_ns,
                pid,
                exit_code,
                signal,
            } => {
                let tids: Vec<u32> = self
                    .active
                    .iter()
                    .filter(|(_, a)| a.report.pid == pid)
                    .map(|(t, _)| *t)
                    .collect();
                for tid in tids {
                    out.extend(self.end(tid, ts_ns, Outcome::Exited));
                }
                if let Some(p) = self.procs.get_mut(&pid) {
                    p.alive = false;
                    p.exit_code = exit_code;
                    p.exit_signal = signal;
                    out.push(Output::WorkerExit {
                        ts_ns,
                        pid,
                        master_pid: p.master,
                        role: p.role,
                        exit_code,
                        signal: signal.map(signal_name),
                        container: p.container.clone(),
                    });
                    let notable = p.stalls > 0
                        || p.timeouts > 0
                        || p.closes.dropped_request + p.closes.upstream_cut > 0;
                    if notable {
                        self.exited_notable.push_back(pid);
                        if self.exited_notable.len() > MAX_EXITED_KEPT
                            && let Some(old) = self.exited_notable.pop_front()
                        {
                            self.procs.remove(&old);
                        }
                    } else {
                        self.procs.remove(&pid);
                        self.exited_quiet += 1;
                    }
                }
            }
            KernelEvent::Signal {
                ts_ns,
                target,
                sender,
                sig,
            } => {
                let Some(p) = self.procs.get(&target) else {
                    return out;
                };
                // Gunicorn's arbiter sends SIGABRT, then SIGKILL, to a worker
                // whose heartbeat is older than --timeout.
                if p.role != Role::Worker || sender != p.master || !matches!(sig, 6 | 9) {
                    return out;
                }
                let stall = self
                    .active
                    .values()
                    .filter(|a| a.report.pid == target)
                    .min_by_key(|a| (a.report.tid != target, a.report.start_ns))
                    .map(|a| {
                        let mut r = a.report.clone();
                        r.blocked_ms = ts_ns.saturating_sub(r.start_ns) / 1_000_000;
                        r
                    })
                    .or_else(|| {
                        p.last_stall
                            .clone()
                            .filter(|s| ts_ns.saturating_sub(s.start_ns) < TIMEOUT_BLAME_NS)
                    });
                let p = self.procs.get_mut(&target).expect("checked above");
                p.timeouts += 1;
                p.killed_by_timeout = true;
                out.push(Output::WorkerTimeout {
                    ts_ns,
                    pid: target,
                    master_pid: p.master,
                    signal: signal_name(sig),
                    stall,
                    container: p.container.clone(),
                });
            }
            KernelEvent::SlowSyscall {
                ts_ns,
                tgid,
                tid,
                nr,
                start_ns,
                wake,
                arg0,
                arg2,
                seeded,
            } => {
                if let Some(a) = self.active.get_mut(&tid)
                    && a.cur_start_ns == start_ns
                {
                    match wake {
                        Wake::Killed => out.extend(self.end(tid, ts_ns, Outcome::Exited)),
                        Wake::Interrupted => a.interrupted_at = Some(ts_ns),
                        Wake::Returning => out.extend(self.end(tid, ts_ns, Outcome::Returned)),
                    }
                    return out;
                }
                // A stall that came and went between two polls: report both halves.
                let s = Sample {
                    tid,
                    tgid,
                    nr,
                    start_ns,
                    arg0,
                    arg2,
                    seq: 0,
                    active: true,
                    seeded,
                };
                if let Some(stall) = self.new_stall(&s, ts_ns, enr) {
                    out.push(stall);
                    let outcome = match wake {
                        Wake::Killed => Outcome::Exited,
                        Wake::Interrupted => Outcome::Interrupted,
                        Wake::Returning => Outcome::Returned,
                    };
                    out.extend(self.end(tid, ts_ns, outcome));
                }
            }
            KernelEvent::Exec { .. } => {}
            KernelEvent::ConnEnd {
                ts_ns,
                tgid,
                tid,
                fd,
                conn,
                ended_by,
            } => {
                let Some(p) = self.procs.get(&tgid) else {
                    return out;
                };
                let facts = ConnFacts {
                    pid: tgid,
                    tid,
                    master: p.master,
                    role: p.role,
                    fd,
                    conn: &conn,
                    ended_by,
                    ts_ns,
                    while_killed: p.killed_by_timeout,
                };
                let container = p.container.clone();
                if let Some(mut close) = net::early_close(facts) {
                    close.container = container;
                    let p = self.procs.get_mut(&tgid).expect("checked above");
                    match close.kind {
                        CloseKind::DroppedRequest => {
                            p.closes.dropped_request += 1;
                            p.last_drop = Some(close.clone());
                        }
                        CloseKind::Idle => p.closes.idle += 1,
                        CloseKind::UpstreamCut => {
                            p.closes.upstream_cut += 1;
                            p.last_drop = Some(close.clone());
                        }
                    }
                    out.push(Output::EarlyClose { ts_ns, close });
                }
            }
        }
        out
    }

    /// One poll of the kernel's in-flight map at kernel time `now_ns`.
    pub fn on_samples(
        &mut self,
        samples: &[Sample],
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let by_tid: HashMap<u32, &Sample> = samples.iter().map(|s| (s.tid, s)).collect();

        // Follow or end the stalls already reported.
        let tids: Vec<u32> = self.active.keys().copied().collect();
        for tid in tids {
            let a = self.active.get_mut(&tid).expect("key from map");
            let cur = by_tid.get(&tid).filter(|s| s.active);
            if let Some(at) = a.interrupted_at {
                match cur {
                    Some(s) if s.nr == a.nr && s.start_ns >= at => {
                        a.seq = s.seq;
                        a.cur_start_ns = s.start_ns;
                        a.interrupted_at = None;
                        a.missing_polls = 0;
                    }
                    _ if now_ns >= at + RESTART_GRACE_NS => {
                        out.extend(self.end(tid, at, Outcome::Interrupted));
                    }
                    _ => {}
                }
                continue;
            }
            match cur {
                Some(s) if s.seq == a.seq || (s.seeded && s.start_ns == a.cur_start_ns) => {
                    a.missing_polls = 0
                }
                _ => {
                    // Ended without a kernel event (restarted call that was
                    // short, or lost event). Wait one more poll for the event.
                    a.missing_polls += 1;
                    if a.missing_polls >= 2 {
                        out.extend(self.end(tid, now_ns, Outcome::Returned));
                    }
                }
            }
        }

        for s in samples {
            if !s.active || now_ns.saturating_sub(s.start_ns) < self.threshold_ns {
                continue;
            }
            if self.active.contains_key(&s.tid) {
                continue;
            }
            out.extend(self.new_stall(s, now_ns, enr));
        }
        out
    }

    fn new_stall(&mut self, s: &Sample, now_ns: u64, enr: &mut dyn Enricher) -> Option<Output> {
        let p = self.procs.get(&s.tgid).filter(|p| p.alive)?;
        if !syscalls::is_stall(p.role, s.tid == s.tgid, s.nr) {
            return None;
        }
        let name = syscalls::name(s.nr).into_owned();
        let fd = takes_fd(&name).then_some(s.arg0 as i32);
        let info = fd
            .map(|fd| enr.fd_info(s.tgid, fd))
            .unwrap_or_else(FdInfo::unknown);
        let only_self = (info.kind == "pipe" || info.kind == "fifo").then(|| {
            !info
                .peers
                .iter()
                .any(|p| p.pid != s.tgid && p.end != "read")
        });
        let heartbeat = if p.role == Role::Worker {
            enr.heartbeat_age_ms(s.tgid)
        } else {
            None
        };
        let mut report = StallReport {
            pid: s.tgid,
            tid: s.tid,
            master_pid: p.master,
            role: p.role,
            comm: enr.comm(s.tid),
            count: takes_count(&name).then_some(s.arg2),
            syscall: name,
            fd,
            fd_kind: info.kind,
            fd_target: info.target,
            peers: info.peers,
            only_self_can_wake: only_self,
            blocked_ms: now_ns.saturating_sub(s.start_ns) / 1_000_000,
            since_attach: s.seeded,
            heartbeat_age_ms: heartbeat,
            gunicorn_timeout_s: p.timeout_s.filter(|_| p.role == Role::Worker),
            cause: None,
            container: p.container.clone(),
            py_stack: None,
            py_stack_error: None,
            start_ns: s.start_ns,
        };
        report.cause = signatures::identify(&report);
        let p = self.procs.get_mut(&s.tgid).expect("checked above");
        p.stalls += 1;
        p.last_stall = Some(report.clone());
        self.active.insert(
            s.tid,
            Active {
                report: report.clone(),
                seq: s.seq,
                cur_start_ns: s.start_ns,
                nr: s.nr,
                interrupted_at: None,
                missing_polls: 0,
            },
        );
        Some(Output::Stall {
            ts_ns: now_ns,
            report,
        })
    }

    fn end(&mut self, tid: u32, ts_ns: u64, outcome: Outcome) -> Option<Output> {
        let a = self.active.remove(&tid)?;
        let blocked_ms = ts_ns.saturating_sub(a.report.start_ns) / 1_000_000;
        if let Some(p) = self.procs.get_mut(&a.report.pid)
            && let Some(last) = p.last_stall.as_mut()
        {
            last.blocked_ms = blocked_ms;
        }
        Some(Output::StallEnd {
            ts_ns,
            pid: a.report.pid,
            tid,
            master_pid: a.report.master_pid,
            syscall: a.report.syscall,
            fd: a.report.fd,
            fd_kind: a.report.fd_kind,
            blocked_ms,
            outcome,
            container: a.report.container,
        })
    }

    /// The closing summary, with the verdict a person reads first.
    pub fn summary(&self, now_ns: u64) -> Summary {
        let mut workers = Vec::new();
        for (pid, p) in &self.procs {
            let current = self
                .active
                .values()
                .filter(|a| a.report.pid == *pid)
                .min_by_key(|a| (a.report.tid != *pid, a.report.start_ns))
                .map(|a| {
                    let mut r = a.report.clone();
                    r.blocked_ms = now_ns.saturating_sub(r.start_ns) / 1_000_000;
                    r
                });
            let state = if current.is_some() && p.alive {
                "stalled"
            } else if !p.alive && p.killed_by_timeout {
                "killed_by_timeout"
            } else if !p.alive {
                "exited"
            } else if p.killed_by_timeout {
                "timing_out"
            } else if p.closes.dropped_request + p.closes.upstream_cut > 0 {
                "dropping_requests"
            } else {
                "healthy"
            };
            workers.push(WorkerSummary {
                pid: *pid,
                master_pid: p.master,
                role: p.role,
                app: p.app.clone(),
                state,
                stalls: p.stalls,
                timeouts: p.timeouts,
                exit_code: p.exit_code,
                exit_signal: p.exit_signal.map(signal_name),
                stall: current.or_else(|| p.last_stall.clone()),
                early_closes: p.closes,
                last_early_close: p.last_drop.clone(),
                container: p.container.clone(),
            });
        }
        let verdict = verdict(&workers, self.threshold_ns);
        Summary {
            workers,
            verdict,
            exited_quiet: self.exited_quiet,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerSummary {
    pub pid: u32,
    pub master_pid: u32,
    pub role: Role,
    pub app: Option<String>,
    /// stalled | timing_out | killed_by_timeout | exited | dropping_requests | healthy
    pub state: &'static str,
    pub stalls: u32,
    pub timeouts: u32,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<String>,
    /// The current stall, or the last one.
    pub stall: Option<StallReport>,
    pub early_closes: CloseCounts,
    /// The last dropped request or cut upstream call.
    pub last_early_close: Option<EarlyClose>,
    pub container: Option<Container>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub stalled_pids: Vec<u32>,
    pub killed_pids: Vec<u32>,
    /// Workers that closed requests with nothing sent (or cut upstream calls).
    pub dropping_pids: Vec<u32>,
    pub text: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub workers: Vec<WorkerSummary>,
    pub verdict: Verdict,
    /// Processes that exited with nothing to report (not listed in `workers`).
    pub exited_quiet: u64,
}

/// "read() on fd 11 (pipe:[1234])"
pub fn describe_call(s: &StallReport) -> String {
    match (s.fd, &s.fd_target) {
        (Some(fd), Some(t)) => format!("{}() on fd {fd} ({t})", s.syscall),
        (Some(fd), None) => format!("{}() on fd {fd}", s.syscall),
        _ => format!("{}()", s.syscall),
    }
}

fn why(s: &StallReport) -> String {
    let mut w = String::new();
    if s.only_self_can_wake == Some(true) {
        w.push_str(", which only the blocked process itself can write to, so it can never return");
    }
    match &s.cause {
        Some(c) => w.push_str(&format!("; likely cause: {}. Fix: {}", c.cause, c.fix)),
        None => w.push_str("; cause: unknown"),
    }
    w
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn verdict(workers: &[WorkerSummary], threshold_ns: u64) -> Verdict {
    let name =
        |w: &WorkerSummary| format!("{} {} (master {})", w.role.as_str(), w.pid, w.master_pid);
    let mut stalled: Vec<&WorkerSummary> =
        workers.iter().filter(|w| w.state == "stalled").collect();
    stalled.sort_by_key(|w| std::cmp::Reverse(w.stall.as_ref().map(|s| s.blocked_ms)));
    let killed: Vec<&WorkerSummary> = workers
        .iter()
        .filter(|w| w.timeouts > 0 && w.state != "stalled")
        .collect();
    let mut lines = Vec::new();
    for w in &stalled {
        let s = w.stall.as_ref().expect("stalled has a stall");
        lines.push(format!(
            "{} is STALLED: blocked {} in {}{}",
            name(w),
            secs(s.blocked_ms),
            describe_call(s),
            why(s)
        ));
    }
    for w in &killed {
        match &w.stall {
            Some(s) => lines.push(format!(
                "{} was killed by Gunicorn's WORKER TIMEOUT after blocking {} in {}{}",
                name(w),
                secs(s.blocked_ms),
                describe_call(s),
                why(s)
            )),
            None => lines.push(format!(
                "{} was killed by Gunicorn's WORKER TIMEOUT; no blocking syscall was seen (CPU-bound code?)",
                name(w)
            )),
        }
    }
    let mut dropping: Vec<&WorkerSummary> = workers
        .iter()
        .filter(|w| w.early_closes.dropped_request + w.early_closes.upstream_cut > 0)
        .collect();
    dropping.sort_by_key(|w| std::cmp::Reverse(w.early_closes.dropped_request));
    for w in &dropping {
        let c = &w.early_closes;
        let mut what = Vec::new();
        if c.dropped_request > 0 {
            what.push(format!(
                "dropped {} request(s) (closed the client's connection with nothing sent back)",
                c.dropped_request
            ));
        }
        if c.upstream_cut > 0 {
            what.push(format!(
                "cut {} upstream call(s) short (closed before any reply)",
                c.upstream_cut
            ));
        }
        let mut line = format!("{} {}", name(w), what.join(" and "));
        if let Some(e) = &w.last_early_close {
            line.push_str(&format!(
                "; last: {} {}",
                e.direction,
                e.peer.as_deref().unwrap_or("?"),
            ));
            if let Some(ms) = e.lifetime_ms {
                line.push_str(&format!(" after {}", secs(ms)));
            }
            match &e.cause {
                Some(cause) => line.push_str(&format!(
                    "; likely cause: {}. Fix: {}",
                    cause.cause, cause.fix
                )),
                None => line.push_str("; cause: unknown"),
            }
        }
        lines.push(line);
    }
    let troubled = !lines.is_empty();
    let healthy: Vec<String> = workers
        .iter()
        .filter(|w| {
            w.role == Role::Worker
                && w.state == "healthy"
                && w.early_closes.dropped_request + w.early_closes.upstream_cut == 0
        })
        .map(|w| w.pid.to_string())
        .collect();
    if !troubled {
        let past: Vec<&WorkerSummary> = workers.iter().filter(|w| w.stalls > 0).collect();
        if past.is_empty() {
            lines.push(format!(
                "healthy: {} worker(s) watched, no syscall blocked an event loop for {}ms or more, no request dropped",
                healthy.len(),
                threshold_ns / 1_000_000
            ));
        } else {
            for w in past {
                let s = w.stall.as_ref().expect("stalls > 0 has a stall");
                lines.push(format!(
                    "no worker is stalled now; {} stalled {} time(s), last for {} in {}",
                    name(w),
                    w.stalls,
                    secs(s.blocked_ms),
                    describe_call(s)
                ));
            }
        }
    } else if !healthy.is_empty() {
        lines.push(format!("healthy: worker(s) {}", healthy.join(", ")));
    }
    Verdict {
        stalled_pids: stalled.iter().map(|w| w.pid).collect(),
        killed_pids: killed.iter().map(|w| w.pid).collect(),
        dropping_pids: dropping.iter().map(|w| w.pid).collect(),
        text: lines.join("\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const MASTER: u32 = 100;
    const W: u32 = 101;

    /// Stands in for /proc: worker W's fd 11 is a pipe only W can write to.
    struct FakeProc;
    impl Enricher for FakeProc {
        fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
            if fd == 11 {
                FdInfo {
                    kind: "pipe".into(),
                    target: Some("pipe:[777]".into()),
                    peers: vec![Peer {
                        pid,
                        comm: "gunicorn".into(),
                        fd: 12,
                        end: "write",
                    }],
                }
            } else {
                FdInfo {
                    kind: "socket".into(),
                    target: Some("socket:[5]".into()),
                    peers: vec![],
                }
            }
        }
        fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
            Some(600)
        }
        fn comm(&mut self, _pid: u32) -> String {
            "gunicorn".into()
        }
        fn container(&mut self, _pid: u32) -> Option<Container> {
            None
        }
    }

    fn nr(name: &str) -> i64 {
        syscalls::number(name).unwrap()
    }

    fn sample(tid: u32, name: &str, start_ms: u64, seq: u64) -> Sample {
        Sample {
            tid,
            tgid: W,
            nr: nr(name),
            start_ns: start_ms * MS,
            arg0: 11,
            arg2: 4,
            seq,
            active: true,
            seeded: false,
        }
    }

    fn setup() -> Correlator {
        let mut c = Correlator::new(500 * MS);
        let m = c.add_process(
            0,
            MASTER,
            MASTER,
            Role::Master,
            Some("app:app".into()),
            Some(4.0),
            "scan",
            None,
        );
        assert!(matches!(m, Some(Output::Master { pid: MASTER, .. })));
        let w = c.add_process(
            0,
            W,
            MASTER,
            Role::Worker,
            Some("app:app".into()),
            Some(4.0),
            "scan",
            None,
        );
        assert!(matches!(
            w,
            Some(Output::Worker {
                pid: W,
                master_pid: MASTER,
                ..
            })
        ));
        c
    }

    fn kinds(out: &[Output]) -> Vec<&'static str> {
        out.iter()
            .map(|o| match o {
                Output::Master { .. } => "master",
                Output::Worker { .. } => "worker",
                Output::Stall { .. } => "stall",
                Output::StallEnd { .. } => "stall_end",
                Output::WorkerTimeout { .. } => "worker_timeout",
                Output::WorkerExit { .. } => "worker_exit",
                Output::EarlyClose { .. } => "early_close",
            })
            .collect()
    }

    #[test]
    fn blocked_pipe_read_reported_once_while_blocked() {
        let mut c = setup();
        let s = sample(W, "read", 1000, 7);
        assert!(
            c.on_samples(&[s], 1400 * MS, &mut FakeProc).is_empty(),
            "below threshold"
        );
        let out = c.on_samples(&[s], 1550 * MS, &mut FakeProc);
        assert_eq!(kinds(&out), ["stall"]);
        let Output::Stall { report, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!((report.pid, report.tid, report.master_pid), (W, W, MASTER));
        assert_eq!(report.syscall, "read");
        assert_eq!(report.fd, Some(11));
        assert_eq!(report.fd_kind, "pipe");
        assert_eq!(report.only_self_can_wake, Some(true));
        assert_eq!(report.blocked_ms, 550);
        assert_eq!(report.heartbeat_age_ms, Some(600));
        assert_eq!(
            report.cause.as_ref().unwrap().id,
            "multiprocessing_queue_gevent"
        );
        // Still blocked: no second report.
        assert!(c.on_samples(&[s], 2000 * MS, &mut FakeProc).is_empty());
        let sum = c.summary(3000 * MS);
        assert_eq!(sum.verdict.stalled_pids, vec![W]);
        assert!(
            sum.verdict.text.contains(
                "worker 101 (master 100) is STALLED: blocked 2.0s in read() on fd 11 (pipe:[777])"
            ),
            "{}",
            sum.verdict.text
        );
        assert!(sum.verdict.text.contains("multiprocessing.Queue"));
    }

    #[test]
    fn idle_event_loop_and_helper_threads_are_not_stalls() {
        let mut c = setup();
        let idle = sample(W, "epoll_wait", 0, 1);
        let helper = sample(W + 1, "read", 0, 1);
        let helper_futex = sample(W + 2, "futex", 0, 1);
        let out = c.on_samples(&[idle, helper, helper_futex], 10_000 * MS, &mut FakeProc);
        assert!(out.is_empty(), "{out:?}");
        // The master in its timed select/sleep is idle too.
        let mut m = sample(MASTER, "clock_nanosleep", 0, 1);
        m.tgid = MASTER;
        assert!(c.on_samples(&[m], 10_000 * MS, &mut FakeProc).is_empty());
        assert!(c.summary(10_000 * MS).verdict.text.starts_with("healthy"));
    }

    #[test]
    fn unwatched_process_is_ignored() {
        let mut c = setup();
        let mut s = sample(999, "read", 0, 1);
        s.tgid = 999;
        assert!(c.on_samples(&[s], 10_000 * MS, &mut FakeProc).is_empty());
    }

    #[test]
    fn returned_stall_ends_with_returned() {
        let mut c = setup();
        let s = sample(W, "read", 0, 3);
        c.on_samples(&[s], 600 * MS, &mut FakeProc);
        let end = KernelEvent::SlowSyscall {
            ts_ns: 900 * MS,
            tgid: W,
            tid: W,
            nr: nr("read"),
            start_ns: 0,
            wake: Wake::Returning,
            arg0: 11,
            arg2: 4,
            seeded: false,
        };
        let out = c.on_kernel(end, &mut FakeProc);
        assert_eq!(kinds(&out), ["stall_end"]);
        assert!(matches!(
            out[0],
            Output::StallEnd {
                blocked_ms: 900,
                outcome: Outcome::Returned,
                ..
            }
        ));
        assert!(
            c.summary(1000 * MS)
                .verdict
                .text
                .starts_with("no worker is stalled now")
        );
    }

    #[test]
    fn short_stall_between_polls_reports_both_halves() {
        let mut c = setup();
        let ev = KernelEvent::SlowSyscall {
            ts_ns: 700 * MS,
            tgid: W,
            tid: W,
            nr: nr("recvfrom"),
            start_ns: 100 * MS,
            wake: Wake::Returning,
            arg0: 5,
            arg2: 4096,
            seeded: false,
        };
        let out = c.on_kernel(ev, &mut FakeProc);
        assert_eq!(kinds(&out), ["stall", "stall_end"]);
        let Output::Stall { report, .. } = &out[0] else {
            unreachable!()
        };
        assert_eq!(report.fd_kind, "socket");
        assert_eq!(
            report.cause.as_ref().unwrap().id,
            "uncooperative_socket_read"
        );
    }

    #[test]
    fn read_restarted_after_signal_is_the_same_stall() {
        let mut c = setup();
        c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
        let intr = KernelEvent::SlowSyscall {
            ts_ns: 4000 * MS,
            tgid: W,
            tid: W,
            nr: nr("read"),
            start_ns: 0,
            wake: Wake::Interrupted,
            arg0: 11,
            arg2: 4,
            seeded: false,
        };
        assert!(
            c.on_kernel(intr, &mut FakeProc).is_empty(),
            "held for the grace period"
        );
        // Python retried the read: same call, same fd, new entry.
        let again = sample(W, "read", 4001, 5);
        assert!(c.on_samples(&[again], 4050 * MS, &mut FakeProc).is_empty());
        assert!(
            c.on_samples(&[again], 4700 * MS, &mut FakeProc).is_empty(),
            "no second stall"
        );
        // SIGKILL: the thread dies inside the restarted read.
        let died = KernelEvent::SlowSyscall {
            ts_ns: 5000 * MS,
            tgid: W,
            tid: W,
            nr: nr("read"),
            start_ns: 4001 * MS,
            wake: Wake::Killed,
            arg0: 11,
            arg2: 4,
            seeded: false,
        };
        let out = c.on_kernel(died, &mut FakeProc);
        assert!(
            matches!(
                out[..],
                [Output::StallEnd {
                    blocked_ms: 5000,
                    outcome: Outcome::Exited,
                    ..
                }]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn interrupted_and_not_restarted_ends_after_grace() {
        let mut c = setup();
        c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
        let intr = KernelEvent::SlowSyscall {
            ts_ns: 1000 * MS,
            tgid: W,
            tid: W,
            nr: nr("read"),
            start_ns: 0,
            wake: Wake::Interrupted,
            arg0: 11,
            arg2: 4,
            seeded: false,
        };
        c.on_kernel(intr, &mut FakeProc);
        let out = c.on_samples(&[], 1300 * MS, &mut FakeProc);
        assert!(
            matches!(
                out[..],
                [Output::StallEnd {
                    blocked_ms: 1000,
                    outcome: Outcome::Interrupted,
                    ..
                }]
            ),
            "{out:?}"
        );
    }

    #[test]
    fn master_kill_is_tied_to_the_stall_then_exit_ends_it() {
        let mut c = setup();
        c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
        let abrt = KernelEvent::Signal {
            ts_ns: 4500 * MS,
            target: W,
            sender: MASTER,
            sig: 6,
        };
        let out = c.on_kernel(abrt, &mut FakeProc);
        let [
            Output::WorkerTimeout {
                pid: W,
                master_pid: MASTER,
                signal,
                stall: Some(s),
                ..
            },
        ] = &out[..]
        else {
            panic!("{out:?}")
        };
        assert_eq!(signal, "SIGABRT");
        assert_eq!(
            (s.syscall.as_str(), s.fd, s.blocked_ms),
            ("read", Some(11), 4500)
        );
        // A signal from someone else is not a Gunicorn timeout.
        let other = KernelEvent::Signal {
            ts_ns: 4600 * MS,
            target: W,
            sender: 4242,
            sig: 9,
        };
        assert!(c.on_kernel(other, &mut FakeProc).is_empty());
        let exit = KernelEvent::Exit {
            ts_ns: 5500 * MS,
            pid: W,
            exit_code: None,
            signal: Some(9),
        };
        let out = c.on_kernel(exit, &mut FakeProc);
        assert_eq!(kinds(&out), ["stall_end", "worker_exit"]);
        assert!(matches!(&out[1], Output::WorkerExit { signal: Some(s), .. } if s == "SIGKILL"));
        let sum = c.summary(6000 * MS);
        assert_eq!(sum.verdict.killed_pids, vec![W]);
        assert!(
            sum.verdict
                .text
                .contains("killed by Gunicorn's WORKER TIMEOUT after blocking 5.5s in read()"),
            "{}",
            sum.verdict.text
        );
        let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
        assert_eq!(w.state, "killed_by_timeout");
    }

    #[test]
    fn forked_worker_is_announced_and_watched() {
        let mut c = setup();
        let fork = KernelEvent::Fork {
            ts_ns: 1,
            parent: MASTER,
            child: 200,
            role: Role::Worker,
            master: MASTER,
        };
        let out = c.on_kernel(fork, &mut FakeProc);
        assert!(matches!(
            &out[..],
            [Output::Worker {
                pid: 200,
                master_pid: MASTER,
                source: "fork",
                ..
            }]
        ));
        let mut s = sample(200, "read", 0, 1);
        s.tgid = 200;
        assert_eq!(
            kinds(&c.on_samples(&[s], 700 * MS, &mut FakeProc)),
            ["stall"]
        );
    }

    #[test]
    fn stall_end_missing_from_kernel_is_inferred_after_two_polls() {
        let mut c = setup();
        c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
        let moved_on = sample(W, "epoll_wait", 650, 2);
        assert!(
            c.on_samples(&[moved_on], 700 * MS, &mut FakeProc)
                .is_empty()
        );
        let out = c.on_samples(&[moved_on], 800 * MS, &mut FakeProc);
        assert_eq!(kinds(&out), ["stall_end"]);
    }

    fn conn_end(pid: u32, bytes_in: u64, bytes_out: u64, ended_by: u32) -> KernelEvent {
        let mut addr = [0u8; 32];
        addr[..2].copy_from_slice(&2u16.to_ne_bytes());
        addr[2..4].copy_from_slice(&40000u16.to_be_bytes());
        addr[4..8].copy_from_slice(&[127, 0, 0, 1]);
        KernelEvent::ConnEnd {
            ts_ns: 2000 * MS,
            tgid: pid,
            tid: pid,
            fd: 11,
            conn: tracer_common::Conn {
                start_ns: 1000 * MS,
                bytes_in,
                bytes_out,
                eagain_ns: 1500 * MS,
                direction: tracer_common::direction::INBOUND,
                local_port: 8000,
                addr,
                ..Default::default()
            },
            ended_by,
        }
    }

    #[test]
    fn early_closes_are_counted_and_rank_after_stalls() {
        let mut c = setup();
        let fork = KernelEvent::Fork {
            ts_ns: 1,
            parent: MASTER,
            child: 102,
            role: Role::Worker,
            master: MASTER,
        };
        c.on_kernel(fork, &mut FakeProc);
        let out = c.on_kernel(
            conn_end(W, 120, 0, tracer_common::ended::CLOSE),
            &mut FakeProc,
        );
        let [Output::EarlyClose { close, .. }] = &out[..] else {
            panic!("{out:?}")
        };
        assert_eq!(close.kind, CloseKind::DroppedRequest);
        assert_eq!(close.peer.as_deref(), Some("127.0.0.1:40000"));
        assert_eq!(close.local_port, Some(8000));
        assert_eq!(close.cause.as_ref().unwrap().id, "leaked_socket_timeout");
        c.on_kernel(
            conn_end(W, 0, 0, tracer_common::ended::CLOSE),
            &mut FakeProc,
        );
        // A connection that got a reply is not reported at all.
        assert!(
            c.on_kernel(
                conn_end(W, 120, 300, tracer_common::ended::CLOSE),
                &mut FakeProc
            )
            .is_empty()
        );
        // An unknown process's connection is ignored.
        assert!(
            c.on_kernel(
                conn_end(999, 120, 0, tracer_common::ended::CLOSE),
                &mut FakeProc
            )
            .is_empty()
        );

        let sum = c.summary(3000 * MS);
        let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
        assert_eq!(
            w.early_closes,
            CloseCounts {
                dropped_request: 1,
                idle: 1,
                upstream_cut: 0
            }
        );
        assert_eq!(sum.verdict.dropping_pids, vec![W]);
        let text = &sum.verdict.text;
        assert!(
            text.starts_with("worker 101 (master 100) dropped 1 request(s)"),
            "{text}"
        );
        assert!(text.contains("setdefaulttimeout"), "{text}");
        assert!(
            text.lines()
                .last()
                .unwrap()
                .starts_with("healthy: worker(s) 102"),
            "{text}"
        );

        // A stalled worker still comes first.
        c.on_samples(&[sample(W, "read", 0, 1)], 3000 * MS, &mut FakeProc);
        let text = c.summary(3500 * MS).verdict.text;
        assert!(
            text.starts_with("worker 101 (master 100) is STALLED"),
            "{text}"
        );
    }

    #[test]
    fn idle_closes_alone_keep_the_verdict_healthy() {
        let mut c = setup();
        c.on_kernel(
            conn_end(W, 0, 0, tracer_common::ended::CLOSE),
            &mut FakeProc,
        );
        let sum = c.summary(3000 * MS);
        assert!(
            sum.verdict.text.starts_with("healthy"),
            "{}",
            sum.verdict.text
        );
        assert!(sum.verdict.dropping_pids.is_empty());
    }

    #[test]
    fn quiet_exits_are_counted_not_kept_and_notable_ones_are_bounded() {
        let mut c = setup();
        for pid in 1000..1000 + 3 * MAX_EXITED_KEPT as u32 {
            let fork = KernelEvent::Fork {
                ts_ns: 1,
                parent: MASTER,
                child: pid,
                role: Role::Worker,
                master: MASTER,
            };
            c.on_kernel(fork, &mut FakeProc);
            if pid % 2 == 0 {
                // Something to report: a dropped request.
                c.on_kernel(
                    conn_end(pid, 10, 0, tracer_common::ended::CLOSE),
                    &mut FakeProc,
                );
            }
            c.on_kernel(
                KernelEvent::Exit {
                    ts_ns: 2,
                    pid,
                    exit_code: Some(0),
                    signal: None,
                },
                &mut FakeProc,
            );
        }
        let sum = c.summary(3);
        assert_eq!(sum.exited_quiet, 3 * MAX_EXITED_KEPT as u64 / 2);
        let exited = sum
            .workers
            .iter()
            .filter(|w| w.state != "healthy" && w.pid >= 1000)
            .count();
        assert_eq!(
            exited, MAX_EXITED_KEPT,
            "only the last notable exits are kept"
        );
        assert!(
            sum.workers
                .iter()
                .any(|w| w.pid == 1000 + 3 * MAX_EXITED_KEPT as u32 - 2)
        );
        assert!(
            !sum.workers.iter().any(|w| w.pid == 1000),
            "the oldest were dropped"
        );
    }
}
