//! Types that cross the kernel/user boundary.
//!
//! Everything here is `#[repr(C)]` with explicit padding so that every byte is
//! defined: the verifier rejects reads of uninitialised stack, and `aya::Pod`
//! requires it.
#![no_std]

/// Role of a watched process, stored in the kernel's `WATCHED` map.
pub mod role {
    /// A process given with `--pid` that is not a Gunicorn master or worker.
    pub const PLAIN: u32 = 0;
    pub const MASTER: u32 = 1;
    pub const WORKER: u32 = 2;
    /// A descendant of a worker (or of a plain process), followed by fork.
    pub const CHILD: u32 = 3;
}

/// Kinds of [`Event`] sent through the ring buffer.
pub mod kind {
    /// A watched process forked a new process (`aux_pid` is the child).
    pub const FORK: u32 = 1;
    /// The last thread of a watched process exited.
    pub const EXIT: u32 = 2;
    /// A signal was generated for a watched process (`aux_pid` is the sender).
    pub const SIGNAL: u32 = 3;
    /// A watched thread woke up after sleeping at least the threshold in a
    /// syscall that is not a wait for work. `ret` says why it woke.
    pub const SLOW_SYSCALL: u32 = 4;
    /// A process whose comm looks like Python or Gunicorn called exec.
    pub const EXEC: u32 = 5;
    /// A tracked connection ended badly: a [`ConnEnd`] record.
    pub const CONN_END: u32 = 6;
    /// Or-ed into a SLOW_SYSCALL whose start is only known to be before the
    /// attach (user space seeded the entry).
    pub const FLAG_SEEDED: u32 = 0x100;
}

/// `Event::ret` of a SLOW_SYSCALL: the thread woke with nothing pending, so
/// the syscall is returning (its value is not known at wake-up).
pub const RET_WOKE: i64 = 0;
/// `Event::ret` of a SLOW_SYSCALL: a signal woke the thread; the syscall is
/// interrupted (-EINTR, or restarted).
pub const RET_INTERRUPTED: i64 = -4;
/// `Event::ret` of a SLOW_SYSCALL: SIGKILL woke the thread; it dies inside
/// the syscall.
pub const RET_EXITED: i64 = i64::MIN;

/// Per-syscall class bits, indexed by syscall number in the `SYSCALL_CLASS`
/// map. Zero, the default, means "may block on something it does not own",
/// so a syscall the table does not know is never missed.
pub mod class {
    pub const MAYBE: u32 = 0;
    /// Never a stall: waiting for work (epoll_wait, poll, select, pause, ...).
    pub const WAIT: u32 = 1;
    /// Reads from fd arg0 (read, recvfrom, ...): goes into the read histogram.
    pub const READ: u32 = 2;
}

/// `Conn::direction`.
pub mod direction {
    /// Accepted from a listener, or not known to be outbound.
    pub const INBOUND: u32 = 1;
    /// Opened by a watched process with connect().
    pub const OUTBOUND: u32 = 2;
}

/// `ConnEnd::ended_by`.
pub mod ended {
    pub const CLOSE: u32 = 1;
    pub const SHUTDOWN: u32 = 2;
    /// The process exited with the connection open; the kernel closed it.
    pub const EXIT: u32 = 3;
}

/// Upper bound for syscall numbers the class table covers.
pub const MAX_SYSCALL_NR: u32 = 1024;

/// Value of the `WATCHED` map, keyed by tgid. User space removes the entry
/// once it has handled the process's EXIT event: the kernel closes an
/// exiting process's sockets after that event, and they must still count.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    /// The Gunicorn master this process belongs to (itself for a master or plain process).
    pub master: u32,
    /// One of [`role`].
    pub role: u32,
}

/// Value of the `INFLIGHT` map, keyed by tid: the syscall a thread went to
/// sleep in, and since when. Written when a watched thread is switched out
/// asleep inside a syscall; `active` drops to 0 when it runs again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    /// `bpf_ktime_get_ns` when the thread went to sleep.
    pub start_ns: u64,
    /// First and third arguments (fd and count for read-like calls).
    pub arg0: u64,
    pub arg2: u64,
    /// Incremented on every sleep, so user space can tell two apart.
    pub seq: u64,
    pub nr: i32,
    pub tgid: u32,
    /// 1 while the thread is asleep in the syscall.
    pub active: u32,
    /// 1 when user space seeded the entry at attach time for a thread that was
    /// already asleep: `start_ns` is then the attach time, a lower bound.
    pub seeded: u32,
    /// One of [`fdkind`], for reads (the histogram's key).
    pub fd_kind: u32,
    pub _pad: u32,
}

/// Value of the `CONNS` map, keyed by the kernel's socket address: what the
/// TCP tracepoints learnt about a connection before it closed. The byte
/// counts come from the socket itself at close, so a connection opened
/// before the tracer attached is still counted right.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Conn {
    /// When it started: connect() by a watched process, or established on
    /// a port one listens on; 0 when the tracer never saw its start.
    pub start_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Last time a receive returned EAGAIN (0: never seen).
    pub eagain_ns: u64,
    /// One of [`direction`].
    pub direction: u32,
    /// Local TCP port.
    pub local_port: u32,
    /// 1 when the close threw away data the peer had sent (the kernel then
    /// answers with a RST instead of a FIN).
    pub aborted: u32,
    pub _pad: u32,
    /// The peer's address, laid out as a sockaddr_in/in6 head.
    pub addr: [u8; 32],
}

/// A connection that ended badly, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnEnd {
    /// Always [`kind::CONN_END`]; first, like `Event::kind`.
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// The fd passed to close/shutdown; -1 when the process exited.
    pub fd: i32,
    pub ts_ns: u64,
    pub conn: Conn,
    /// One of [`ended`].
    pub ended_by: u32,
    pub _pad: u32,
}

/// One record of the ring buffer. A single fixed layout keeps decoding trivial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`kind`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Child pid (FORK), sender tgid (SIGNAL), master (EXIT/SLOW_SYSCALL).
    pub aux_pid: u32,
    /// `bpf_ktime_get_ns` when the event happened.
    pub ts_ns: u64,
    /// Syscall start (SLOW_SYSCALL).
    pub start_ns: u64,
    /// Syscall number (SLOW_SYSCALL), signal number (SIGNAL), exit code (EXIT).
    pub nr: i64,
    /// [`RET_WOKE`], [`RET_INTERRUPTED`] or [`RET_EXITED`] (SLOW_SYSCALL); for
    /// EXIT, 1 if `nr` is an exit code, 0 if a signal.
    pub ret: i64,
    pub arg0: u64,
    pub arg2: u64,
    pub comm: [u8; 16],
}

/// What an fd is, as the kernel's read histograms tell them apart (from the
/// inode mode of the file behind the fd).
pub mod fdkind {
    pub const UNKNOWN: usize = 0;
    pub const PIPE: usize = 1;
    pub const SOCKET: usize = 2;
    pub const FILE: usize = 3;
    pub const CHAR: usize = 4;
    pub const OTHER: usize = 5;
    pub const COUNT: usize = 6;
    pub const NAMES: [&str; COUNT] = ["unknown", "pipe", "socket", "file", "char_device", "other"];
}

/// Buckets of the read-latency histograms: bucket `i` counts reads that
/// blocked `[2^i, 2^(i+1))` ms; the last one everything longer.
pub const HIST_BUCKETS: usize = 16;

/// Value of the `READ_HIST` map, keyed by tgid: reads that blocked at least
/// 1 ms, by fd kind, aggregated in the kernel.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadHist {
    /// `counts[kind * HIST_BUCKETS + bucket]`.
    pub counts: [u64; fdkind::COUNT * HIST_BUCKETS],
    /// Total blocked time per kind, in ns.
    pub sum_ns: [u64; fdkind::COUNT],
}

impl Default for ReadHist {
    fn default() -> Self {
        ReadHist {
            counts: [0; fdkind::COUNT * HIST_BUCKETS],
            sum_ns: [0; fdkind::COUNT],
        }
    }
}

/// Indexes of the kernel's `STATS` per-CPU counters.
pub mod stat {
    /// Ring buffer full: an event was dropped.
    pub const EVENTS_LOST: u32 = 0;
    /// `WATCHED` full: a forked process could not be followed.
    pub const WATCH_FULL: u32 = 1;
    /// Events written to the ring buffer.
    pub const EVENTS_SENT: u32 = 2;
    /// Connections that ended normally (a reply was sent / received).
    pub const CONNS_OK: u32 = 3;
    /// Connections whose start could not be recorded (map insert failed).
    pub const CONNS_UNTRACKED: u32 = 4;
    pub const COUNT: u32 = 5;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), contain only integers, and have explicit
    // padding fields, so every bit pattern is valid and no byte is undefined.
    unsafe impl aya::Pod for super::Watched {}
    unsafe impl aya::Pod for super::Inflight {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::ConnEnd {}
    unsafe impl aya::Pod for super::ReadHist {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The BPF side and user space must agree on sizes; any implicit padding
    // would show up as a size that is not the sum of the fields.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Watched>(), 2 * 4);
        assert_eq!(size_of::<Inflight>(), 4 * 8 + 6 * 4);
        assert_eq!(size_of::<Event>(), 4 * 4 + 6 * 8 + 16);
        assert_eq!(size_of::<Conn>(), 4 * 8 + 4 * 4 + 32);
        assert_eq!(size_of::<ConnEnd>(), 4 * 4 + 8 + size_of::<Conn>() + 8);
    }
}
