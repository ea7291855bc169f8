//! What the kernel tells user space, decoded (see `kernel::intake` and
//! `kernel::decode`): plain values, no kernel layout or sentinels.
use super::{Direction, EndedBy, Role};

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
        /// The sending thread's name (the signal is generated in its context).
        sender_comm: String,
        sig: i32,
    },
    /// The kernel's OOM killer chose `pid` as its victim (it is being
    /// SIGKILLed). `trigger` is the process whose allocation hit the limit.
    OomKill {
        ts_ns: u64,
        pid: u32,
        trigger: u32,
        oom_score_adj: i64,
        /// Resident memory in kB at the kill; 0 when the kernel does not say.
        rss_kb: u64,
        /// The victim's /proc/PID/cgroup, read by the intake thread as the
        /// event arrived: an exiting task is moved to the root cgroup, so a
        /// read by the session a few ms later may already say root.
        cgroups: Option<String>,
    },
    /// A syscall a thread slept in for at least the threshold is over, as
    /// the kernel judged it when it next saw the thread (see [`Sample`]);
    /// `ts_ns` is its last wake-up.
    SleepEnd {
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
    /// received).
    ConnEnd {
        ts_ns: u64,
        tgid: u32,
        tid: u32,
        /// The fd passed to close/shutdown; -1 when the process exited.
        fd: i32,
        conn: ClosedConn,
        ended_by: EndedBy,
        /// The peer closed first (its FIN is not in `conn.bytes_in`).
        peer_closed_first: bool,
    },
    KeepaliveRace(RaceReset),
}

/// The kernel reset the client's request on a connection a watched
/// process had closed after answering (see [`AnsweredClose`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaceReset {
    /// When the kernel sent the reset.
    pub ts_ns: u64,
    pub close: AnsweredClose,
}

/// A TCP connection of a watched process that has closed, with what the
/// kernel counted on it (the byte counts come from the socket at the
/// close, so one opened before the tracer attached is counted right).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClosedConn {
    /// When it started: connect() by a watched process, or established on
    /// a port one listens on; None when the tracer never saw its start.
    pub start_ns: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Last time a receive returned EAGAIN; None when none was seen.
    pub eagain_ns: Option<u64>,
    pub direction: Direction,
    /// Local TCP port; None when not known.
    pub local_port: Option<u16>,
    /// The close threw away data the peer had sent (the kernel then
    /// answers with a RST instead of a FIN).
    pub aborted: bool,
    /// A read of the socket's counters failed at the close: the byte
    /// counts are not known, and nothing may be decided from them.
    pub unreadable: bool,
    /// The other end as the process saw it: `127.0.0.1:5000`,
    /// `[::1]:5000` or `unix`; None when not known.
    pub peer: Option<String>,
}

impl ClosedConn {
    /// The rule the kernel also judges a closed connection by: inbound,
    /// nothing was sent back; outbound, a request went out and nothing came
    /// back. One whose counters could not be read is judged neither way.
    /// (`kernel::decode`'s tests hold the two rules equal.)
    pub fn ended_badly(&self) -> bool {
        !self.unreadable
            && match self.direction {
                Direction::Inbound => self.bytes_out == 0,
                Direction::Outbound => self.bytes_out > 0 && self.bytes_in == 0,
            }
    }
}

/// An inbound connection a watched process closed first after it had
/// answered on it (an idle keep-alive connection closed by Gunicorn's
/// timer, typically), as the kernel remembered it: if the client sends its
/// next request on it anyway, the kernel answers with a reset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnsweredClose {
    pub closed_ns: u64,
    /// How long nothing had been sent or received before the close; None
    /// when not known.
    pub idle_ns: Option<u64>,
    /// When the connection started; None when not seen.
    pub start_ns: Option<u64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tgid: u32,
    pub tid: u32,
    pub master: u32,
    /// The fd passed to close/shutdown; -1 when the process exited.
    pub fd: i32,
    pub ended_by: EndedBy,
    /// The close itself threw away unread data (the next request had
    /// already arrived): the reset follows at once.
    pub aborted: bool,
    /// Local TCP port; None when not known.
    pub local_port: Option<u16>,
    /// The client, as in [`ClosedConn::peer`].
    pub peer: Option<String>,
}

/// How a syscall ended, as far as the kernel could tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Woke with nothing pending, next seen elsewhere: it returned.
    Returning,
    /// A signal or a stop woke it and it did not go back into the call.
    Interrupted,
    /// SIGKILL: the thread dies inside the syscall.
    Killed,
    /// Woke with nothing pending, then slept in the same call again: a new
    /// call or a second sleep inside this one; which is not known.
    Woke,
}

/// How a thread last woke inside a call the kernel still holds open.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum WokeBy {
    /// Not woken since the call started.
    #[default]
    None,
    /// With nothing pending.
    Plain,
    /// By a signal: the call may be restarted.
    Signal,
    /// From a stop inside the call (a tracer attaching, SIGSTOP).
    Stop,
    /// Asleep again in the same call after a signal or a stop.
    Resumed,
}

impl WokeBy {
    /// A signal or a stop: the call may still resume.
    pub fn may_resume(self) -> bool {
        matches!(self, WokeBy::Signal | WokeBy::Stop)
    }
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
    /// Asleep (or stopped) in the call now.
    pub active: bool,
    pub seeded: bool,
    /// When the thread last woke in the call; 0 while it sleeps, or once
    /// the kernel has judged the call over.
    pub woke_ns: u64,
    pub woke_by: WokeBy,
}

impl Sample {
    /// The thread woke from the call, and the kernel has not judged it yet:
    /// it may resume, or be over.
    pub fn is_open(&self) -> bool {
        !self.active && self.woke_ns != 0
    }

    /// Asleep in the call, or woken and not judged yet.
    pub fn in_call(&self) -> bool {
        self.active || self.is_open()
    }
}

/// What a thread is doing now, from /proc: used to judge a call the kernel
/// left open because the thread went back to its loop's own wait (which the
/// kernel does not look at) or has not slept since.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadNow {
    /// Asleep in syscall `nr` with this first argument.
    InSyscall { nr: i64, arg0: u64 },
    /// Asleep outside any syscall (a page fault, a stop in user code).
    OutsideSyscall,
    /// On a CPU, or about to be: what it is doing is not known.
    Running,
    /// The thread is gone.
    Gone,
}

/// A thread's CPU state, from /proc/PID/task/TID/stat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCpu {
    /// Runnable or running (state R).
    pub on_cpu: bool,
    /// User plus system CPU time used so far.
    pub cpu_ms: u64,
    /// Times it went to sleep so far (a thread that keeps the CPU adds none).
    pub voluntary_switches: u64,
}

/// A TCP connection's state, among those the socket scan asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcpState {
    #[default]
    Established,
    /// The peer closed its side (a proxy that gave up, say).
    CloseWait,
}

/// One inbound TCP connection on a watched port, as the kernel's socket
/// diagnostics showed it at one scan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SockSnapshot {
    pub inode: u64,
    pub state: TcpState,
    pub local_port: u16,
    /// The other end, `10.0.0.7:41000`.
    pub peer: String,
    /// Received, not yet read by the process.
    pub unread_bytes: u32,
    /// tcp_info came with it (the fields below are meaningful).
    pub has_info: bool,
    /// Since data last went out, and last came in, in ms.
    pub last_data_sent_ms: u32,
    pub last_data_recv_ms: u32,
    pub bytes_acked: u64,
    pub bytes_received: u64,
}

impl SockSnapshot {
    /// A request came in and nothing went out since, for `threshold_ms`.
    /// A connection that never sent a byte counts its age as the time since
    /// it last sent, which may equal the request's to the millisecond: then
    /// nothing acknowledged says it.
    pub fn unanswered_for(&self, threshold_ms: u64) -> bool {
        self.state == TcpState::Established
            && self.has_info
            && self.bytes_received > 0
            && u64::from(self.last_data_recv_ms) >= threshold_ms
            && (self.bytes_acked == 0 || self.last_data_sent_ms > self.last_data_recv_ms)
    }

    /// The process served this connection within the last `ms`: it sent
    /// on it, or read a request that came in then. A connection that never
    /// had a byte acknowledged has its send time set at its creation, which
    /// says nothing sent.
    pub fn served_within(&self, ms: u64) -> bool {
        let sent = self.bytes_acked > 0 && u64::from(self.last_data_sent_ms) < ms;
        let read = self.bytes_received > 0
            && self.unread_bytes == 0
            && u64::from(self.last_data_recv_ms) < ms;
        self.has_info && (sent || read)
    }
}
