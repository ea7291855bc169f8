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

    /// Something went out since an earlier look that saw `acked` bytes
    /// acknowledged, or after the last byte that came in.
    pub fn answered_since(&self, acked: u64) -> bool {
        self.bytes_acked > acked || self.last_data_sent_ms < self.last_data_recv_ms
    }
}
