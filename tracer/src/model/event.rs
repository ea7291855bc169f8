//! What the kernel tells user space, decoded (see `kernel::intake`).
use super::Role;

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
    },
    /// A thread woke up after sleeping at least the threshold in a syscall
    /// that may block. The kernel sees the wake-up, not the return.
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
    /// received). `ended_by` is one of `tracer_common::ended`.
    ConnEnd {
        ts_ns: u64,
        tgid: u32,
        tid: u32,
        fd: i32,
        conn: tracer_common::Conn,
        ended_by: u32,
        /// The peer closed first (its FIN is not in `conn.bytes_in`).
        peer_closed_first: bool,
    },
    KeepaliveRace(RaceReset),
}

/// The kernel reset the client's request on a connection a watched
/// process had closed after answering (see `tracer_common::AnsweredClose`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RaceReset {
    pub ts_ns: u64,
    pub close: tracer_common::AnsweredClose,
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
