//! What the tracer reports: the events of docs/events.md. Field order and
//! serde names are the JSON contract (pinned by the golden test).
use std::borrow::Cow;

use serde::Serialize;

use super::{
    Container, FdKind, MasterConfig, Peer, PyFrame, PyThread, Role, Setting, WaitFd, WorkerClass,
};

/// A known cause and its fix, from a signature. Most are fixed sentences;
/// some name what the stall waits on (a server's address).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Cause {
    pub id: &'static str,
    pub cause: Cow<'static, str>,
    pub fix: Cow<'static, str>,
    /// What a stall's cause rests on (JSON: `basis`, `frame`,
    /// `called_from`); None for the causes of other events.
    #[serde(flatten)]
    pub evidence: Option<CauseEvidence>,
}

/// The evidence a stall's cause rests on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CauseEvidence {
    pub basis: Basis,
    /// The frame of the stalled thread's stack that names the cause (None
    /// when inferred).
    pub frame: Option<CitedFrame>,
    /// The application's own frame that called into it, the innermost
    /// outside libraries (None when inferred, or none is the app's).
    pub called_from: Option<CitedFrame>,
}

impl CauseEvidence {
    pub fn inferred() -> CauseEvidence {
        CauseEvidence {
            basis: Basis::Inferred,
            frame: None,
            called_from: None,
        }
    }
}

/// Where a stall's cause comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Basis {
    /// A frame of the stalled thread's Python stack (`frame` cites it).
    Frame,
    /// From the syscall, its fd, the peer's port, the byte count, the
    /// worker's class and state: no frame of the stack named it (none was
    /// read, or none of a known library is on it).
    Inferred,
}

/// One frame of `py_stack`, cited by a cause.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CitedFrame {
    /// Its position in `py_stack` (0: the innermost).
    pub index: usize,
    pub function: String,
    pub file: String,
    pub line: Option<u32>,
}

/// What a stalled thread is doing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StallState {
    /// Asleep in a syscall (`syscall` says which).
    #[default]
    Blocked,
    /// Running without yielding: the worker's heartbeat stopped while its
    /// loop thread kept the CPU (no syscall).
    OnCpu,
    /// Away from its loop's wait: the heartbeat stopped while the loop
    /// thread made calls each shorter than the threshold (and computed
    /// between them), never going back to the loop.
    Busy,
}

/// What showed a loop thread on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnCpuEvidence {
    /// It did not sleep (no voluntary context switch) over the window, and
    /// two stacks read some time apart were inside the same request
    /// handler's frame.
    StackSamples,
    /// Its heartbeat was two intervals old while it did not sleep (its
    /// stack was not read, or could not be).
    Heartbeat,
}

impl StallState {
    pub fn as_str(self) -> &'static str {
        match self {
            StallState::Blocked => "blocked",
            StallState::OnCpu => "on_cpu",
            StallState::Busy => "busy",
        }
    }
}

/// Gunicorn's --timeout when the command line does not set it.
const GUNICORN_DEFAULT_TIMEOUT_MS: u64 = 30_000;
/// A boot may wait on a lock (a thread it started, a connection pool) a
/// few seconds; never called a deadlock before this.
const BOOT_LOCK_GRACE_MS: u64 = 10_000;

/// Facts about one stall; also the body of the `stall` event.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StallReport {
    pub pid: u32,
    pub tid: u32,
    pub master_pid: u32,
    pub role: Role,
    /// The thread's name (kept under this name for compatibility; the same
    /// as `thread_name`).
    pub comm: String,
    /// /proc/PID/task/TID/comm of the stalled thread.
    pub thread_name: String,
    pub state: StallState,
    /// The syscall it is blocked in; None when it is on the CPU or busy.
    pub syscall: Option<String>,
    pub fd: Option<i32>,
    /// The byte count asked for, for read-like calls.
    pub count: Option<u64>,
    pub fd_kind: FdKind,
    pub fd_target: Option<String>,
    pub peers: Vec<Peer>,
    /// Holders of the pipe found beyond those listed (a process that dups
    /// its pipe end many times cannot make the report huge).
    pub peers_omitted: u64,
    /// For a pipe: true when only the blocked process holds a write end, so
    /// nothing else can ever wake it.
    pub only_self_can_wake: Option<bool>,
    /// The fds the call waits on: a multiplexer's set, or the one fd of a
    /// read, recv, connect... with the peer address of sockets.
    pub wait_fds: Vec<WaitFd>,
    /// select/pselect6's nfds (absent for other calls): 0 waits on no fd,
    /// a sleep (CPython before 3.11 implements time.sleep so).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nfds: Option<u32>,
    pub blocked_ms: u64,
    /// The syscall was already in progress when the tracer attached, so
    /// `blocked_ms` is a lower bound.
    pub since_attach: bool,
    pub heartbeat_age_ms: Option<u64>,
    /// For a worker: true when it has not touched its heartbeat since it
    /// was forked (it never reached its loop).
    pub never_heartbeated: Option<bool>,
    /// The process's thread count when the stall was reported (from
    /// /proc); None when not read. A pipe only this process writes to can
    /// still be written by another of its threads: with one thread, none is
    /// left to write it.
    pub threads: Option<u32>,
    /// On the CPU or busy: CPU time the thread used over `measured_ms`.
    pub cpu_ms: Option<u64>,
    /// On the CPU or busy: how often the thread went to sleep (its
    /// voluntary context switches) over `measured_ms`. Busy is said only
    /// when this rose: one long sleep is a blocked call, not busy.
    pub sleeps: Option<u64>,
    /// On the CPU or busy: the window `cpu_ms` and `sleeps` were counted
    /// over, from the first look that found the loop thread away from its
    /// loop while its heartbeat was overdue.
    pub measured_ms: Option<u64>,
    /// On the CPU: what showed it (None for the other states).
    pub on_cpu_evidence: Option<OnCpuEvidence>,
    /// With `stack_samples`: when each of the two stacks was asked for, in
    /// ms after the window `measured_ms` counts from (each was read within
    /// the reader's latency after that).
    pub samples_ms: Option<Vec<u64>>,
    /// With `stack_samples`: the application frame both stacks were inside
    /// (the outermost frame of the application called from library code:
    /// the request handler), as the second stack has it.
    pub handler: Option<PyFrame>,
    /// The master's timeout and where it came from (JSON:
    /// `gunicorn_timeout_s`, `gunicorn_timeout_source`); None when not known.
    #[serde(flatten, serialize_with = "super::settings::serialize_timeout")]
    pub gunicorn_timeout_s: Option<Setting<f64>>,
    /// The worker class, named by a setting or inferred from the worker
    /// (JSON: `worker_class`, `worker_class_source`,
    /// `worker_class_evidence`); None when not known.
    #[serde(flatten, serialize_with = "super::settings::serialize_class")]
    pub worker_class: Option<WorkerClass>,
    pub cause: Option<Cause>,
    /// Container id, pod and namespace when the process runs in one.
    pub container: Option<Container>,
    /// A thread other than a worker's loop thread, or a worker's child, is
    /// a stall only while a request waits with it: the client of a
    /// connection the process holds, whose request came in before the
    /// thread blocked and has had nothing sent back since. Null for a
    /// worker's loop thread, a master, a plain process.
    pub request_peer: Option<String>,
    /// How long that client had waited with nothing sent back.
    pub request_waiting_ms: Option<u64>,
    /// The stalled thread's Python stack, innermost frame first, read
    /// from the worker's memory when the stall was reported. Absent with
    /// --no-py-stack, or when it could not be read (`py_stack_error` then
    /// says why). Under gevent the blocked greenlet is the one running, so
    /// this names the application line that blocked the hub.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack: Option<Vec<PyFrame>>,
    /// Outer frames of `py_stack` left out past the cap (absent when none).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack_omitted: Option<u64>,
    /// Why there is no `py_stack` (absent when there is one, or with
    /// --no-py-stack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack_error: Option<String>,
    /// With --py-stack all-threads: every other Python thread's stack.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_threads: Option<Vec<PyThread>>,
    #[serde(skip)]
    pub start_ns: u64,
}

impl StallReport {
    /// Holders of the pipe that may write to it.
    pub fn writers(&self) -> impl Iterator<Item = &Peer> {
        self.peers.iter().filter(|p| p.may_write())
    }

    /// The syscall's name; empty when the thread is on the CPU.
    pub fn syscall_name(&self) -> &str {
        self.syscall.as_deref().unwrap_or("")
    }

    /// Blocked in a sleep: nanosleep or clock_nanosleep, or a select on no
    /// fd at all (CPython before 3.11 sleeps in `select(0, ...)`).
    pub fn is_sleep(&self) -> bool {
        self.state == StallState::Blocked
            && match self.syscall_name() {
                "nanosleep" | "clock_nanosleep" => true,
                "select" | "pselect6" => self.nfds == Some(0),
                _ => false,
            }
    }

    /// The thread runs the worker's event loop (its main thread).
    pub fn on_loop_thread(&self) -> bool {
        self.role == Role::Worker && self.tid == self.pid
    }

    /// A wait that began before the worker's first heartbeat and has lasted
    /// longer than a boot waits on one lock: past Gunicorn's --timeout
    /// (what it gives a request), 30 s when the timeout is not known, and
    /// 10 s at least.
    pub fn outlasts_a_boot(&self) -> bool {
        self.never_heartbeated == Some(true) && self.blocked_ms >= self.boot_wait_limit_ms()
    }

    /// How long a wait since before the first heartbeat may last in a boot.
    pub fn boot_wait_limit_ms(&self) -> u64 {
        self.gunicorn_timeout_s
            .map(|t| t.value)
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| (t * 1000.0) as u64)
            .unwrap_or(GUNICORN_DEFAULT_TIMEOUT_MS)
            .max(BOOT_LOCK_GRACE_MS)
    }

    /// A worker class whose threads are greenlets on one hub (gevent,
    /// eventlet), as the master's settings say.
    pub fn is_green(&self) -> bool {
        matches!(
            self.worker_class.as_ref().map(|c| c.name.as_str()),
            Some("gevent" | "eventlet" | "gevent_wsgi" | "gevent_pywsgi")
        )
    }

    /// Why no other thread of the process can run to write a pipe only it
    /// writes to, when that is known: a pipe's write end belongs to the
    /// process, and any of its OS threads can write it.
    pub fn no_other_writer_thread(&self) -> Option<NoWriterThread> {
        if self.on_loop_thread() && self.is_green() {
            Some(NoWriterThread::BlockedHub)
        } else if self.threads == Some(1) {
            Some(NoWriterThread::OneThread)
        } else {
            None
        }
    }
}

/// The evidence that a thread blocked on a pipe only its process writes to
/// has no other thread to write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoWriterThread {
    /// A gevent (or eventlet) worker's hub thread: the writer would be a
    /// greenlet of the blocked hub (monkey-patched threads are greenlets).
    BlockedHub,
    /// The process had one thread when the stall was reported.
    OneThread,
}

/// How a reported stall ended: only what is known.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The call returned: the thread woke with nothing pending and was then
    /// seen elsewhere.
    Returned,
    /// A signal (or a tracer's stop) broke the call and it was not resumed.
    Interrupted,
    /// The process died inside it.
    Exited,
    /// The call left the kernel's in-flight map and no event said how it
    /// ended (an event lost, the entry removed): how it ended is not known.
    Unknown,
    /// The thread woke; whether the call returned is not known (it has run
    /// since without sleeping in another call, or slept again in the same
    /// call with the same arguments, which may be a new call).
    Woke,
    /// On the CPU or busy: the loop ran again (its heartbeat is fresh).
    Resumed,
    /// On the CPU or busy: the thread went on to block in a syscall,
    /// reported as its own stall.
    Blocked,
    /// On the CPU, named from stack samples: the thread slept (a voluntary
    /// context switch), so it no longer keeps the CPU.
    Slept,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Returned => "returned",
            Outcome::Interrupted => "interrupted",
            Outcome::Exited => "exited",
            Outcome::Unknown => "unknown",
            Outcome::Woke => "woke",
            Outcome::Resumed => "resumed",
            Outcome::Blocked => "blocked",
            Outcome::Slept => "slept",
        }
    }
}

/// How the tracer found a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// Running when the tracer started.
    Scan,
    /// The kernel saw it being forked.
    Fork,
    /// A new Gunicorn master, seen at its exec.
    Exec,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Direction {
    Inbound,
    Outbound,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Inbound => "inbound",
            Direction::Outbound => "outbound",
        }
    }
}

/// What ended a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndedBy {
    Close,
    Shutdown,
    /// The process exited with the connection open.
    Exit,
}

impl EndedBy {
    pub fn as_str(self) -> &'static str {
        match self {
            EndedBy::Close => "close",
            EndedBy::Shutdown => "shutdown",
            EndedBy::Exit => "exit",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CloseKind {
    /// The client sent a request and got nothing back: the proxy's 502/504.
    DroppedRequest,
    /// The client sent nothing: an idle keep-alive connection closed by
    /// Gunicorn's keepalive timer. Normal; counted, not alarmed.
    Idle,
    /// An outbound call that sent a request and was closed before any reply.
    UpstreamCut,
    /// The client connected and closed without sending a byte: a TCP health
    /// check (kubelet `tcpSocket`, a load balancer), a port scan. Counted.
    Probe,
    /// The client sent (part of) a request and closed before the answer
    /// (nginx's 499): not the worker's doing. Counted.
    ClientAbort,
    /// The worker closed a keep-alive connection after answering on it, and
    /// the client's next request on it was answered by the kernel with a
    /// reset: a lost request (a proxy's 502).
    KeepaliveRace,
}

impl CloseKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CloseKind::DroppedRequest => "dropped_request",
            CloseKind::Idle => "idle",
            CloseKind::UpstreamCut => "upstream_cut",
            CloseKind::Probe => "probe",
            CloseKind::ClientAbort => "client_abort",
            CloseKind::KeepaliveRace => "keepalive_race",
        }
    }
}

/// The syscall that preceded the close, when it explains it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Preceded {
    pub syscall: &'static str,
    pub ret: &'static str,
    /// From that syscall to the close.
    pub wait_ms: u64,
}

/// The body of the `early_close` event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EarlyClose {
    pub direction: Direction,
    pub pid: u32,
    pub tid: u32,
    pub master_pid: u32,
    #[serde(skip)]
    pub role: Role,
    /// The fd closed; None when the process exited with it open.
    pub fd: Option<i32>,
    pub peer: Option<String>,
    pub local_port: Option<u16>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// For the benign kinds (`idle`, `probe`, `client_abort`), at most one
    /// a second is reported per process and kind: how many of this kind
    /// were counted and not reported since the last one reported.
    pub suppressed: u64,
    /// From the connect, or the connection being established, to the close;
    /// None when the tracer did not see the start (opened before it attached).
    pub lifetime_ms: Option<u64>,
    pub ended_by: EndedBy,
    /// The peer closed its side first (a FIN came before our close).
    pub peer_closed_first: bool,
    pub kind: CloseKind,
    /// The kernel answered the close with a RST: the peer's data was never read.
    pub unread_data: bool,
    pub preceded_by: Option<Preceded>,
    /// keepalive_race: how long the connection had been idle (nothing sent
    /// or received) when the worker closed it, when known.
    pub idle_ms: Option<u64>,
    /// keepalive_race: the master's keep-alive when a setting names it
    /// (None when none was read: Gunicorn's default of 2 s is not claimed).
    pub keepalive_s: Option<f64>,
    /// keepalive_race: from the close to the reset of the client's request.
    pub reset_after_ms: Option<u64>,
    /// What was known at the close of why the process was ending (its
    /// cause then names it); None while nothing said it was.
    #[serde(skip)]
    pub dying: Option<Dying>,
    pub cause: Option<Cause>,
    pub container: Option<Container>,
}

/// Why a process was ending when it closed a connection (or the kernel
/// closed it at the exit): each variant only from what the tracer saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Dying {
    /// The kernel's OOM killer had chosen it.
    OomKill,
    /// Gunicorn's WORKER TIMEOUT: the master sent `signal` (SIGABRT, then
    /// SIGKILL); `stall` is the stall the worker_timeout event blamed, if any.
    WorkerTimeout {
        signal: String,
        stall: Option<Box<StallReport>>,
        /// As `worker_timeout`'s `watched_ms`.
        watched_ms: Option<u64>,
        /// The master's --timeout was known: `watched_ms` is less than it.
        timeout_known: bool,
    },
    /// The master asked it to stop (`signal`: SIGTERM, SIGINT or SIGQUIT)
    /// `after_ms` before the close; `killed`: the master's SIGKILL that
    /// ends a graceful stop whose --graceful-timeout ran out came too.
    GracefulStop {
        signal: String,
        after_ms: u64,
        killed: bool,
    },
    /// It exited for another reason, as its `worker_exit` says.
    Exited {
        why: ExitReport,
        pid: u32,
        exit_code: Option<i32>,
        signal: Option<String>,
    },
}

/// Early closes of one process, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct CloseCounts {
    pub dropped_request: u32,
    /// Of `dropped_request`: lost because the worker died (or was stopped)
    /// with them in flight; their cause names the death.
    pub lost_at_exit: u32,
    pub idle: u32,
    pub upstream_cut: u32,
    pub probe: u32,
    pub client_abort: u32,
    pub keepalive_race: u32,
}

impl CloseCounts {
    /// Closes that hurt someone: dropped requests and cut upstream calls.
    pub fn harmful(&self) -> u32 {
        self.dropped_request + self.upstream_cut
    }

    /// Dropped requests and cut upstream calls that the worker's own
    /// death does not explain (`folded`: whether the requests lost at its
    /// exit are told with the death instead).
    pub fn harmful_beyond_exit(&self, folded: bool) -> u32 {
        let lost = if folded { self.lost_at_exit } else { 0 };
        self.harmful().saturating_sub(lost)
    }

    pub fn count(&mut self, kind: CloseKind) {
        let n = match kind {
            CloseKind::DroppedRequest => &mut self.dropped_request,
            CloseKind::Idle => &mut self.idle,
            CloseKind::UpstreamCut => &mut self.upstream_cut,
            CloseKind::Probe => &mut self.probe,
            CloseKind::ClientAbort => &mut self.client_abort,
            CloseKind::KeepaliveRace => &mut self.keepalive_race,
        };
        *n += 1;
    }

    /// Every kind with its count, in a fixed order (metrics labels).
    pub fn by_kind(&self) -> [(CloseKind, u32); 6] {
        [
            (CloseKind::DroppedRequest, self.dropped_request),
            (CloseKind::Idle, self.idle),
            (CloseKind::UpstreamCut, self.upstream_cut),
            (CloseKind::Probe, self.probe),
            (CloseKind::ClientAbort, self.client_abort),
            (CloseKind::KeepaliveRace, self.keepalive_race),
        ]
    }
}

/// Why a watched process exited: `worker_exit.cause`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitCause {
    /// The master's SIGABRT/SIGKILL after the heartbeat went stale.
    WorkerTimeout,
    /// The kernel's OOM killer.
    OomKill,
    /// Another signal from the master: reload, scale-down, shutdown.
    MasterSignal,
    /// A signal from any other process (or raised by the process itself).
    ExternalSignal,
    /// A clean exit after --max-requests.
    MaxRequests,
    /// Any other exit.
    Exit,
}

impl ExitCause {
    pub const ALL: [ExitCause; 6] = [
        ExitCause::WorkerTimeout,
        ExitCause::OomKill,
        ExitCause::MasterSignal,
        ExitCause::ExternalSignal,
        ExitCause::MaxRequests,
        ExitCause::Exit,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ExitCause::WorkerTimeout => "worker_timeout",
            ExitCause::OomKill => "oom_kill",
            ExitCause::MasterSignal => "master_signal",
            ExitCause::ExternalSignal => "external_signal",
            ExitCause::MaxRequests => "max_requests",
            ExitCause::Exit => "exit",
        }
    }
}

/// The process that sent a signal: signals are generated in its context.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Sender {
    pub pid: u32,
    pub comm: String,
}

/// What the kernel's OOM killer and the victim's memory cgroup said.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OomKill {
    pub oom_score_adj: i64,
    /// Resident memory of the victim at the kill, when the kernel says.
    pub rss_bytes: Option<u64>,
    /// The memory cgroup whose limit was reached (the nearest one, from the
    /// victim's, with a limit), when readable.
    pub cgroup: Option<String>,
    pub memory_limit_bytes: Option<u64>,
    /// The cgroup's peak usage (memory.max_usage_in_bytes, memory.peak),
    /// else its usage when read just after the kill.
    pub memory_usage_bytes: Option<u64>,
}

/// Why a process exited, in full: the body `worker_exit` adds to the exit
/// code and the signal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExitReport {
    pub cause: ExitCause,
    /// The signal that caused the exit (sent by `sender`): for
    /// worker_timeout, master_signal and external_signal.
    pub cause_signal: Option<String>,
    pub sender: Option<Sender>,
    pub oom: Option<OomKill>,
    /// --max-requests of the master, for max_requests.
    pub max_requests: Option<u64>,
    /// Exit code 3 (a worker failed to boot) or 4 (the app failed to
    /// load): Gunicorn's master stops the whole server.
    pub halts_master: bool,
}

impl ExitReport {
    /// A cause with nothing more to say.
    pub fn new(cause: ExitCause) -> ExitReport {
        ExitReport {
            cause,
            cause_signal: None,
            sender: None,
            oom: None,
            max_requests: None,
            halts_master: false,
        }
    }

    /// An exit worth a line in the verdict: an OOM kill, a forced kill from
    /// outside Gunicorn, or a failure that stops the whole server. (Kills
    /// by WORKER TIMEOUT are findings of their own.)
    pub fn is_finding(&self) -> bool {
        let forced = matches!(
            self.cause_signal.as_deref(),
            Some("SIGKILL" | "SIGSEGV" | "SIGBUS" | "SIGABRT")
        );
        self.cause == ExitCause::OomKill
            || self.halts_master
            || (self.cause == ExitCause::ExternalSignal && forced)
    }
}

/// A thread of a process blocked in a syscall on an fd (not its event
/// loop's wait): what may be holding a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlockedThread {
    pub tid: u32,
    pub comm: String,
    pub syscall: String,
    pub fd: Option<i32>,
    pub fd_target: Option<String>,
}

/// The body of `hung_request`: a request read and not answered for longer
/// than --request-threshold, while the worker lives.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HungRequest {
    pub pid: u32,
    pub master_pid: u32,
    pub role: Role,
    /// The worker's fd for the connection.
    pub fd: Option<i32>,
    pub peer: String,
    pub local_port: u16,
    /// Since the last byte of the request came in, with nothing sent since.
    pub waiting_ms: u64,
    pub bytes_in: u64,
    /// Bytes of earlier answers on the connection the client acknowledged.
    pub bytes_out: u64,
    /// Received and not yet read by the worker.
    pub unread_bytes: u32,
    pub threshold_ms: u64,
    /// The worker's stall in progress, when one was reported.
    pub stall: Option<StallReport>,
    /// The worker's threads blocked on an fd, from /proc (32 at most).
    pub blocked_threads: Vec<BlockedThread>,
    /// Blocked threads found beyond those listed.
    pub blocked_threads_omitted: u64,
    /// The worker's master had already sent it Gunicorn's WORKER TIMEOUT
    /// signal: the worker is being killed, with the stall the timeout was
    /// blamed on (null when none was seen).
    pub worker_timeout: bool,
    pub timeout_stall: Option<Box<StallReport>>,
    pub container: Option<Container>,
    #[serde(skip)]
    pub inode: u64,
}

/// How a hung request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HungOutcome {
    /// The client acknowledged bytes sent after the request (a scan saw
    /// `bytes_acked` grow).
    Answered,
    /// The client (a proxy that timed out, say) closed its side.
    ClientClosed,
    /// The worker closed it (or died) with nothing sent: an `early_close`
    /// says how.
    Dropped,
    /// The connection was gone at a scan and nothing said how it ended
    /// (answered and closed between two scans, or closed by someone else):
    /// not known.
    Unknown,
}

impl HungOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            HungOutcome::Answered => "answered",
            HungOutcome::ClientClosed => "client_closed",
            HungOutcome::Dropped => "dropped",
            HungOutcome::Unknown => "unknown",
        }
    }
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
        /// Each setting with its source (`timeout_s`, `timeout_source`...).
        #[serde(flatten)]
        settings: Box<MasterConfig>,
        source: Source,
        container: Option<Container>,
    },
    Worker {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        role: Role,
        source: Source,
        app: Option<String>,
        container: Option<Container>,
    },
    /// A worker's event loop's own wait was found: from now on any other
    /// wait of its loop thread is judged a stall.
    Loop {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        /// `epoll_wait` (and its kin) or `select`.
        wait: &'static str,
        /// The epoll fd.
        fd: Option<i32>,
        /// select's nfds.
        nfds: Option<u32>,
    },
    /// A worker's class inferred from what it does (no setting the tracer
    /// read names it): from now on its stalls are judged for that class.
    WorkerClass {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        /// `worker_class`, `worker_class_source` (`inferred`),
        /// `worker_class_evidence`.
        #[serde(flatten, serialize_with = "super::settings::serialize_one_class")]
        class: WorkerClass,
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
        thread_name: String,
        state: StallState,
        syscall: Option<String>,
        fd: Option<i32>,
        fd_kind: FdKind,
        blocked_ms: u64,
        /// The call began before the tracer attached: `blocked_ms` is a
        /// lower bound.
        since_attach: bool,
        outcome: Outcome,
        container: Option<Container>,
    },
    WorkerTimeout {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        /// The timeout's first signal (SIGABRT; SIGKILL when the tracer
        /// saw no SIGABRT before it).
        signal: String,
        /// SIGKILL when the worker did not exit on SIGABRT and the master
        /// sent it on a later tick; None when no such SIGKILL was seen
        /// before the worker exited or the run ended.
        escalated_to: Option<String>,
        escalated_after_ms: Option<u64>,
        stall: Option<StallReport>,
        /// How long the tracer had watched the worker when the first
        /// signal came, when that is less than the master's --timeout (or
        /// the timeout is not known); null when it watched the whole
        /// window. A stall before that was not seen.
        watched_ms: Option<u64>,
        /// The master's --timeout in seconds, when the tracer knows it.
        gunicorn_timeout_s: Option<f64>,
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
        #[serde(flatten)]
        why: ExitReport,
        container: Option<Container>,
    },
    EarlyClose {
        #[serde(skip)]
        ts_ns: u64,
        #[serde(flatten)]
        close: EarlyClose,
    },
    HungRequest {
        #[serde(skip)]
        ts_ns: u64,
        #[serde(flatten)]
        hung: HungRequest,
    },
    HungRequestEnd {
        #[serde(skip)]
        ts_ns: u64,
        pid: u32,
        master_pid: u32,
        fd: Option<i32>,
        peer: String,
        local_port: u16,
        /// From the request's last byte to the end.
        waited_ms: u64,
        outcome: HungOutcome,
        container: Option<Container>,
    },
}

impl Output {
    pub fn ts_ns(&self) -> u64 {
        match self {
            Output::Master { ts_ns, .. }
            | Output::Worker { ts_ns, .. }
            | Output::Loop { ts_ns, .. }
            | Output::WorkerClass { ts_ns, .. }
            | Output::Stall { ts_ns, .. }
            | Output::StallEnd { ts_ns, .. }
            | Output::WorkerTimeout { ts_ns, .. }
            | Output::WorkerExit { ts_ns, .. }
            | Output::EarlyClose { ts_ns, .. }
            | Output::HungRequest { ts_ns, .. }
            | Output::HungRequestEnd { ts_ns, .. } => *ts_ns,
        }
    }
}
