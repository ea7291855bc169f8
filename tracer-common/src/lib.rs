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
    /// A syscall a watched thread slept in for at least the threshold is
    /// over (see [`Inflight`]); `ts_ns` is when the thread woke from it for
    /// the last time. `aux` is one of [`wake`].
    pub const SLEEP_END: u32 = 4;
    /// A process whose comm looks like Python or Gunicorn called exec.
    pub const EXEC: u32 = 5;
    /// A tracked connection ended badly: a [`ConnEnd`] record.
    pub const CONN_END: u32 = 6;
    /// The kernel's OOM killer chose a watched process (`oom:mark_victim`):
    /// `nr` is its oom_score_adj, `arg0` its resident memory in kB
    /// (anonymous + file + shmem; 0 when the kernel does not say).
    pub const OOM_KILL: u32 = 7;
    /// The kernel reset a connection a watched process had closed after
    /// answering on it: the client's next request was lost. A
    /// [`KeepaliveRace`] record.
    pub const KEEPALIVE_RACE: u32 = 8;
    /// Or-ed into a SLEEP_END whose start is only known to be before the
    /// attach (user space seeded the entry).
    pub const FLAG_SEEDED: u32 = 0x100;
}

/// `Event::aux` of a SLEEP_END: how the syscall ended, as far as the kernel
/// can tell. The return value itself is never known.
pub mod wake {
    /// The thread woke with nothing pending and was next seen elsewhere (in
    /// another syscall, or stopped by a tracer at a syscall boundary): the
    /// call returned.
    pub const RETURNING: i64 = 0;
    /// A signal (or a tracer's stop) woke the thread and it did not go back
    /// into the same call: the call was interrupted.
    pub const INTERRUPTED: i64 = -4;
    /// SIGKILL woke the thread; it dies inside the syscall.
    pub const KILLED: i64 = i64::MIN;
    /// The thread woke with nothing pending, then slept again in the same
    /// syscall with the same first argument: a new call, or a second sleep
    /// inside the same one. Which, the kernel cannot tell.
    pub const WOKE: i64 = 1;
}

/// `Inflight::woke_by`: how the thread last woke inside the recorded call.
pub mod woke_by {
    /// Not woken since the call started.
    pub const NONE: u32 = 0;
    /// Woken with nothing pending.
    pub const PLAIN: u32 = 1;
    /// Woken with a signal pending, and the call did not complete (it
    /// returned -EINTR or a restart code to the signal's delivery): it may
    /// be restarted. A call that completed with the signal arriving
    /// meanwhile is PLAIN once the signal is delivered.
    pub const SIGNAL: u32 = 2;
    /// Stopped inside the call (ptrace attach, SIGSTOP) and, once woken,
    /// expected back in it: py-spy, gdb and strace attach this way.
    pub const STOP: u32 = 3;
    /// Asleep again in the same call after a signal or a stop.
    pub const RESUMED: u32 = 4;
}

/// How long after a signal or a stop woke a thread its call may resume and
/// still count as the same call (both sides use it).
pub const RESTART_WINDOW_NS: u64 = 200_000_000;
/// The same after a tracer's stop (py-spy, gdb attaching): longer, because
/// a stopped thread resumes through its tracer's detach and then competes
/// for a CPU with that tracer; on a loaded 2-core VM that took more than
/// 200 ms and split one blocked call in two. The call a stopped thread
/// wakes in is the one it was stopped in: only a restart follows.
pub const STOP_RESUME_WINDOW_NS: u64 = 1_000_000_000;

/// How long a call woken this way (`woke_by` value) may take to resume.
pub const fn resume_window_ns(woke_by: u32) -> u64 {
    if woke_by == woke_by::STOP {
        STOP_RESUME_WINDOW_NS
    } else {
        RESTART_WINDOW_NS
    }
}

/// Signals that end or restart a Gunicorn worker: the only ones the kernel
/// reports. SIGCHLD, SIGWINCH and the like are frequent and say nothing
/// about a stall.
pub mod signal {
    pub const SIGHUP: i32 = 1;
    pub const SIGINT: i32 = 2;
    pub const SIGQUIT: i32 = 3;
    pub const SIGABRT: i32 = 6;
    pub const SIGBUS: i32 = 7;
    pub const SIGKILL: i32 = 9;
    pub const SIGSEGV: i32 = 11;
    pub const SIGTERM: i32 = 15;

    /// The name of a reported signal; None for the others.
    pub const fn name(sig: i32) -> Option<&'static str> {
        Some(match sig {
            SIGHUP => "SIGHUP",
            SIGINT => "SIGINT",
            SIGQUIT => "SIGQUIT",
            SIGABRT => "SIGABRT",
            SIGBUS => "SIGBUS",
            SIGKILL => "SIGKILL",
            SIGSEGV => "SIGSEGV",
            SIGTERM => "SIGTERM",
            _ => return None,
        })
    }

    pub const fn is_reported(sig: i32) -> bool {
        name(sig).is_some()
    }
}

/// Per-syscall class bits, indexed by syscall number in the `SYSCALL_CLASS`
/// map. Zero, the default, means "may block on something it does not own",
/// so a syscall the table does not know is never missed.
pub mod class {
    pub const MAYBE: u32 = 0;
    /// A multiplexer or a signal wait (epoll_wait, poll, select, pause,
    /// ...): idle, unless it is a Gunicorn worker's loop thread waiting
    /// outside its event loop's own wait.
    pub const WAIT: u32 = 1;
    /// Reads from fd arg0 (read, recvfrom, ...): goes into the read histogram.
    pub const READ: u32 = 2;
    /// An epoll wait: arg0 is the epoll fd.
    pub const EPOLL: u32 = 4;
    /// select/pselect6: arg0 is nfds, arg1 the read set.
    pub const SELECT: u32 = 8;
    /// poll/ppoll: arg0 is the pollfd array, arg1 its length.
    pub const POLL: u32 = 16;
}

/// `Conn::direction`.
pub mod direction {
    /// Accepted from a listener: seen being established on a port a
    /// watched process listens on, or (opened before the tracer attached)
    /// its local port is one of those.
    pub const INBOUND: u32 = 1;
    /// Opened by a watched process with connect(), or (opened before the
    /// tracer attached) its local port is none a watched process listens on.
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

/// Tgids per element of the `WATCHED_TGIDS` array: one byte each, in
/// elements of 8 bytes (an array map's smallest element).
pub const TGIDS_PER_SLOT: u32 = 8;

/// Value of the `WATCHED` map, keyed by tgid. User space removes the entry
/// once it has handled the process's EXIT event: the kernel closes an
/// exiting process's sockets after that event, and they must still count.
/// Only user space writes an entry after the fork that created it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Watched {
    /// The Gunicorn master this process belongs to (itself for a master or plain process).
    pub master: u32,
    /// One of [`role`].
    pub role: u32,
    /// The event loop's own wait, once user space has found it: the
    /// [`class`] bit of its syscalls ([`class::EPOLL`] or [`class::SELECT`]),
    /// 0 while unknown (then a worker's main thread's multiplexer sleeps are
    /// all recorded, and another process's main thread idles in them).
    pub loop_class: u32,
    /// 1 while the process counts against its master's `procs` in
    /// `MASTER_LOAD` (the kernel added it at its fork, or user space at
    /// attach): whoever removes it or sees it exit takes it off, once.
    pub counted: u32,
    /// Their first argument: the loop's epoll fd, or select's nfds.
    pub loop_arg0: u64,
    /// For select: the first 64 bits of the read set it waits on (0: not
    /// checked).
    pub loop_fds: u64,
}

/// Value of the `INFLIGHT` map, keyed by tid: the syscall a thread is
/// blocked in, and since when. Written when a watched thread is switched
/// out asleep inside a syscall. A wake-up does not end the call: the entry
/// stays open (`woke_ns` set) until the thread is next seen, either back
/// in the same call (after a signal or a stop: the call goes on, same
/// start, same `seq`) or elsewhere (the call is over: a SLEEP_END is sent
/// if it lasted the threshold).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    /// `bpf_ktime_get_ns` when the call first went to sleep.
    pub start_ns: u64,
    /// First and third arguments (fd and count for read-like calls).
    pub arg0: u64,
    pub arg2: u64,
    /// Incremented on every new call, so user space can tell two apart.
    pub seq: u64,
    /// When the thread last woke in this call; 0 while it sleeps, or once
    /// the call is over.
    pub woke_ns: u64,
    pub nr: i32,
    pub tgid: u32,
    /// 1 while the thread is asleep (or stopped) in the call.
    pub active: u32,
    /// 1 when user space seeded the entry at attach time for a thread that was
    /// already asleep: `start_ns` is then the attach time, a lower bound.
    pub seeded: u32,
    /// One of [`fdkind`], for reads that blocked 1 ms or more (the
    /// histogram's key): set at its first wake, UNKNOWN until then.
    pub fd_kind: u32,
    /// One of [`woke_by`].
    pub woke_by: u32,
    /// The master of `tgid`, whose `threads` in `MASTER_LOAD` count this
    /// entry while `counted` is 1 (entries the kernel created; not the
    /// ones user space seeded at attach).
    pub master: u32,
    pub counted: u32,
}

/// Value of the `MASTER_LOAD` map, keyed by master pid: what one Gunicorn
/// (or `--pid` process) and its descendants hold of the shared kernel
/// maps, so that one tenant cannot fill them for every other. Changed by
/// atomic adds in the kernel and read-modify-write in user space, so a
/// race can leave a count one off, either way: read them as `i64`, and
/// below zero as zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MasterLoad {
    /// Processes in `WATCHED` that count against the master (the master
    /// itself does not).
    pub procs: u64,
    /// Entries in `INFLIGHT` that count against it.
    pub threads: u64,
}

/// Value of the `BUCKETS` map, keyed by tgid: a token bucket for the
/// events a process can cause in numbers (connection ends, signals). Held
/// as time: each event spends `Quotas::event_cost_ns` of credit, credit
/// grows with the clock up to `Quotas::event_burst_ns`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bucket {
    pub credit_ns: u64,
    pub last_ns: u64,
}

/// Key of the `OFFENDERS` map: which process a loss counter (one of
/// [`stat`]) was charged to.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OffenderKey {
    pub stat: u32,
    pub tgid: u32,
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
    /// 1 when a read of the socket's counters failed at the close: the
    /// byte counts are not known, and nothing may be decided from them
    /// (counted in [`stat::CONNS_UNREADABLE`]).
    pub unreadable: u32,
    /// The peer's address, laid out as a sockaddr_in/in6 head.
    pub addr: [u8; 32],
}

impl Conn {
    /// The rule both sides judge a closed connection by: inbound, nothing
    /// was sent back; outbound, a request went out and nothing came back.
    /// One whose counters could not be read is judged neither way.
    pub const fn ended_badly(&self) -> bool {
        self.unreadable == 0 && Conn::ends_badly(self.direction, self.bytes_in, self.bytes_out)
    }

    /// [`Conn::ended_badly`] from the three values it depends on.
    pub const fn ends_badly(direction: u32, bytes_in: u64, bytes_out: u64) -> bool {
        match direction {
            direction::OUTBOUND => bytes_out > 0 && bytes_in == 0,
            _ => bytes_out == 0,
        }
    }
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
    /// 1 when the peer closed first (the socket was in CLOSE_WAIT): its FIN
    /// is already taken out of `conn.bytes_in`.
    pub peer_closed_first: u32,
}

/// Key of the `ANSWERED` map: a connection's four-tuple as both the close
/// and the reset see it. IPv4 addresses are stored v4-mapped
/// (`::ffff:a.b.c.d`), so a dual-stack socket and its IPv4 packets agree.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnKey {
    pub local: [u8; 16],
    pub peer: [u8; 16],
    /// Host byte order.
    pub local_port: u16,
    pub peer_port: u16,
}

/// Value of the `ANSWERED` map: an inbound connection a watched process
/// closed first after it had answered on it (an idle keep-alive connection
/// closed by Gunicorn's timer, typically). If the client sends its next
/// request on it anyway, the kernel answers with a reset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AnsweredClose {
    pub closed_ns: u64,
    /// How long nothing had been sent or received before the close
    /// (from `tcp_sock.tcp_mstamp`); [`UNSET`] when not known.
    pub idle_ns: u64,
    /// When the connection started (0: not seen).
    pub start_ns: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub tgid: u32,
    pub tid: u32,
    pub master: u32,
    /// The fd passed to close/shutdown; -1 when the process exited.
    pub fd: i32,
    /// One of [`ended`].
    pub ended_by: u32,
    /// 1 when the close itself threw away unread data (the next request had
    /// already arrived): the reset follows at once.
    pub aborted: u32,
    pub local_port: u32,
    pub _pad: u32,
    /// The peer's address, laid out as a sockaddr_in/in6 head (as in [`Conn`]).
    pub addr: [u8; 32],
}

/// A request lost to a keep-alive race, sent through the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepaliveRace {
    /// Always [`kind::KEEPALIVE_RACE`].
    pub kind: u32,
    pub _pad: u32,
    /// When the kernel sent the reset.
    pub ts_ns: u64,
    pub close: AnsweredClose,
}

/// One record of the ring buffer. A single fixed layout keeps decoding trivial.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Event {
    /// One of [`kind`].
    pub kind: u32,
    pub tgid: u32,
    pub tid: u32,
    /// Child pid (FORK), sender tgid (SIGNAL), master (EXIT/SLEEP_END).
    pub aux_pid: u32,
    /// `bpf_ktime_get_ns` when the event happened.
    pub ts_ns: u64,
    /// When the call first went to sleep (SLEEP_END).
    pub start_ns: u64,
    /// Syscall number (SLEEP_END), signal number (SIGNAL), exit code or
    /// signal (EXIT), the child's [`role`] (FORK).
    pub nr: i64,
    /// Second kind-specific value: one of [`wake`] (SLEEP_END); 1 if `nr`
    /// is an exit code, 0 if a signal (EXIT); the master (FORK); the
    /// sending thread (SIGNAL).
    pub aux: i64,
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
    /// `INFLIGHT` full: a thread's sleep could not be recorded, so a stall
    /// in it would not be seen.
    pub const INFLIGHT_FULL: u32 = 5;
    /// Connections closed whose byte counters could not be read from the
    /// socket: how they ended is not known.
    pub const CONNS_UNREADABLE: u32 = 6;
    /// Connection-end and signal events not sent: their process had spent
    /// its token bucket (`Quotas::event_cost_ns`).
    pub const RATE_LIMITED: u32 = 7;
    /// Forks not followed: their master already had
    /// `Quotas::procs_per_master` processes counted in `MASTER_LOAD`.
    pub const WATCH_QUOTA: u32 = 8;
    /// Thread sleeps not recorded: their master's processes already held
    /// `Quotas::threads_per_master` entries of `INFLIGHT`.
    pub const INFLIGHT_QUOTA: u32 = 9;
    pub const COUNT: u32 = 10;
}

/// Indexes of the kernel's `ERRORS` per-CPU counters: runs of each program
/// that failed (a read of the record or of kernel memory was refused, a map
/// was full) and were skipped.
pub mod program {
    pub const SCHED_SWITCH: u32 = 0;
    pub const INET_SOCK_SET_STATE: u32 = 1;
    pub const SOCK_RECV_LENGTH: u32 = 2;
    pub const TASK_NEWTASK: u32 = 3;
    pub const SCHED_PROCESS_EXIT: u32 = 4;
    pub const SIGNAL_GENERATE: u32 = 5;
    pub const SCHED_PROCESS_EXEC: u32 = 6;
    pub const MARK_VICTIM: u32 = 7;
    pub const TCP_SEND_RESET: u32 = 8;
    pub const SIGNAL_DELIVER: u32 = 9;
    /// The kprobe on tcp_v4_send_reset/tcp_v6_send_reset that stands in
    /// for tcp:tcp_send_reset where that tracepoint misses the reset.
    pub const TCP_RST_KPROBE: u32 = 10;
    pub const COUNT: u32 = 11;
    /// Indexed by the ids above: the programs' own names.
    pub const NAMES: [&str; COUNT as usize] = [
        "sched_switch",
        "inet_sock_set_state",
        "sock_recv_length",
        "task_newtask",
        "sched_process_exit",
        "signal_generate",
        "sched_process_exec",
        "mark_victim",
        "tcp_send_reset",
        "signal_deliver",
        "tcp_rst_kprobe",
    ];
}

/// An offset or value the loader did not set: reads through it fail.
pub const UNSET: u64 = u64::MAX;

/// What the BTF-typed tracepoints' arguments are on this kernel: some
/// prototypes changed across versions. Read from BTF by the loader; each
/// is 1 when true, [`UNSET`] when not.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TracepointArgs {
    /// sched_process_exit passes `bool group_dead` second (Linux 6.16 and
    /// later); otherwise the leader's exit stands for the process's.
    pub exit_group_dead: u64,
    /// oom:mark_victim passes the task (Linux 6.8 and later), not its pid.
    pub victim_task: u64,
}

/// Offsets of kernel struct members, read from the running kernel's BTF:
/// Rust eBPF emits no CO-RE relocations.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_state: u64,
    pub task_pid: u64,
    pub task_tgid: u64,
    pub task_flags: u64,
    pub task_exit_code: u64,
    pub task_comm: u64,
    /// task_struct.pending.signal.
    pub task_pending_signal: u64,
    pub task_blocked: u64,
    /// task_struct.signal -> signal_struct.shared_pending.signal.
    pub task_signal: u64,
    pub signal_shared_pending: u64,
    // task_struct.files -> files_struct.fdt -> fdtable.fd[fd] -> file.f_inode
    // -> inode.i_mode: what kind of file a read blocks on.
    pub task_files: u64,
    pub files_fdt: u64,
    pub fdt_max_fds: u64,
    pub fdt_fd: u64,
    pub file_inode: u64,
    pub inode_mode: u64,
    // struct sock and struct tcp_sock (which starts with a struct sock).
    pub sk_shutdown: u64,
    pub tcp_bytes_received: u64,
    pub tcp_bytes_sent: u64,
    pub tcp_bytes_retrans: u64,
    pub tcp_write_seq: u64,
    pub tcp_snd_nxt: u64,
    /// tcp_sock.tcp_mstamp: the last time (µs of CLOCK_MONOTONIC) the
    /// socket sent or received; [`UNSET`] where BTF lacks it.
    pub tcp_mstamp: u64,
    // Where a task inside a syscall keeps its number and first three
    // arguments in its saved user registers (struct pt_regs).
    pub pt_regs_nr: u64,
    pub pt_regs_arg0: u64,
    pub pt_regs_arg1: u64,
    pub pt_regs_arg2: u64,
    /// Where a syscall's return value is, once it has one.
    pub pt_regs_ret: u64,
    // struct sk_buff: where a received segment's IP and TCP headers are
    // (head + network_header, head + transport_header). [`UNSET`] where
    // BTF lacks them: then the reset kprobe is not attached.
    pub skb_head: u64,
    pub skb_network_header: u64,
    pub skb_transport_header: u64,
    // struct sock (its sock_common first): what inet_sock_set_state and
    // tcp_send_reset's records held, read from the socket itself.
    pub sk_protocol: u64,
    pub skc_family: u64,
    /// The local port, host order.
    pub skc_num: u64,
    /// The peer's port, network order.
    pub skc_dport: u64,
    pub skc_daddr: u64,
    pub skc_rcv_saddr: u64,
    pub skc_v6_daddr: u64,
    pub skc_v6_rcv_saddr: u64,
    // The OOM victim's figures mark_victim's record held (Linux 6.8+):
    // task->signal->oom_score_adj, and task->mm->rss_stat[i].count of
    // each percpu_counter ([`UNSET`] where the layout is another).
    pub signal_oom_score_adj: u64,
    pub task_mm: u64,
    pub mm_rss_stat: u64,
    pub rss_counter_size: u64,
    pub rss_counter_count: u64,
    /// log2 of the page size in KiB (2 for 4 KiB pages).
    pub page_kb_shift: u64,
}

/// The programs' configuration: the `CONFIG` global of the BPF object,
/// set once by the loader before the programs load.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// A sleep at least this long is sent when it ends.
    pub threshold_ns: u64,
    /// Syscall numbers on this architecture.
    pub nr_close: u64,
    pub nr_shutdown: u64,
    pub tp: TracepointArgs,
    pub kernel: KernelOffsets,
    pub quotas: Quotas,
}

/// What one tenant may hold of the kernel's shared maps and ring buffer.
/// [`UNSET`] is no limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Quotas {
    /// Processes of one master (not counting itself) the kernel follows.
    pub procs_per_master: u64,
    /// `INFLIGHT` entries the threads of one master's processes hold.
    pub threads_per_master: u64,
    /// Credit one connection-end or signal event spends (1 s / rate).
    pub event_cost_ns: u64,
    /// Credit a process's bucket holds at most (burst x cost).
    pub event_burst_ns: u64,
}

impl Config {
    /// What the object file carries until the loader sets it: every read
    /// through it fails rather than reading the wrong place.
    pub const UNSET: Config = Config {
        threshold_ns: UNSET,
        nr_close: UNSET,
        nr_shutdown: UNSET,
        tp: TracepointArgs {
            exit_group_dead: UNSET,
            victim_task: UNSET,
        },
        kernel: KernelOffsets {
            task_state: UNSET,
            task_pid: UNSET,
            task_tgid: UNSET,
            task_flags: UNSET,
            task_exit_code: UNSET,
            task_comm: UNSET,
            task_pending_signal: UNSET,
            task_blocked: UNSET,
            task_signal: UNSET,
            signal_shared_pending: UNSET,
            task_files: UNSET,
            files_fdt: UNSET,
            fdt_max_fds: UNSET,
            fdt_fd: UNSET,
            file_inode: UNSET,
            inode_mode: UNSET,
            sk_shutdown: UNSET,
            tcp_bytes_received: UNSET,
            tcp_bytes_sent: UNSET,
            tcp_bytes_retrans: UNSET,
            tcp_write_seq: UNSET,
            tcp_snd_nxt: UNSET,
            tcp_mstamp: UNSET,
            pt_regs_nr: UNSET,
            pt_regs_arg0: UNSET,
            pt_regs_arg1: UNSET,
            pt_regs_arg2: UNSET,
            pt_regs_ret: UNSET,
            skb_head: UNSET,
            skb_network_header: UNSET,
            skb_transport_header: UNSET,
            sk_protocol: UNSET,
            skc_family: UNSET,
            skc_num: UNSET,
            skc_dport: UNSET,
            skc_daddr: UNSET,
            skc_rcv_saddr: UNSET,
            skc_v6_daddr: UNSET,
            skc_v6_rcv_saddr: UNSET,
            signal_oom_score_adj: UNSET,
            task_mm: UNSET,
            mm_rss_stat: UNSET,
            rss_counter_size: UNSET,
            rss_counter_count: UNSET,
            page_kb_shift: UNSET,
        },
        quotas: Quotas {
            procs_per_master: UNSET,
            threads_per_master: UNSET,
            event_cost_ns: UNSET,
            event_burst_ns: UNSET,
        },
    };
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all are repr(C), contain only integers, and have explicit
    // padding fields, so every bit pattern is valid and no byte is undefined.
    unsafe impl aya::Pod for super::Watched {}
    unsafe impl aya::Pod for super::Inflight {}
    unsafe impl aya::Pod for super::Event {}
    unsafe impl aya::Pod for super::Conn {}
    unsafe impl aya::Pod for super::ConnEnd {}
    unsafe impl aya::Pod for super::ConnKey {}
    unsafe impl aya::Pod for super::AnsweredClose {}
    unsafe impl aya::Pod for super::KeepaliveRace {}
    unsafe impl aya::Pod for super::ReadHist {}
    unsafe impl aya::Pod for super::Config {}
    unsafe impl aya::Pod for super::MasterLoad {}
    unsafe impl aya::Pod for super::OffenderKey {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::mem::size_of;

    // The BPF side and user space must agree on sizes; any implicit padding
    // would show up as a size that is not the sum of the fields.
    #[test]
    fn layouts_have_no_implicit_padding() {
        assert_eq!(size_of::<Watched>(), 4 * 4 + 2 * 8);
        assert_eq!(size_of::<Inflight>(), 5 * 8 + 8 * 4);
        assert_eq!(size_of::<MasterLoad>(), 2 * 8);
        assert_eq!(size_of::<Bucket>(), 2 * 8);
        assert_eq!(size_of::<OffenderKey>(), 2 * 4);
        assert_eq!(size_of::<Quotas>(), 4 * 8);
        assert_eq!(size_of::<Event>(), 4 * 4 + 6 * 8 + 16);
        assert_eq!(size_of::<Conn>(), 4 * 8 + 4 * 4 + 32);
        assert_eq!(size_of::<ConnEnd>(), 4 * 4 + 8 + size_of::<Conn>() + 8);
        assert_eq!(size_of::<TracepointArgs>(), 2 * 8);
        assert_eq!(size_of::<ConnKey>(), 2 * 16 + 2 * 2);
        assert_eq!(size_of::<AnsweredClose>(), 5 * 8 + 8 * 4 + 32);
        assert_eq!(
            size_of::<KeepaliveRace>(),
            2 * 4 + 8 + size_of::<AnsweredClose>()
        );
        assert_eq!(size_of::<KernelOffsets>(), 45 * 8);
        assert_eq!(
            size_of::<Config>(),
            3 * 8 + size_of::<TracepointArgs>() + size_of::<KernelOffsets>() + size_of::<Quotas>()
        );
    }

    #[test]
    fn program_names_follow_their_ids() {
        assert_eq!(
            program::NAMES[program::SCHED_SWITCH as usize],
            "sched_switch"
        );
        assert_eq!(
            program::NAMES[program::SCHED_PROCESS_EXEC as usize],
            "sched_process_exec"
        );
        assert_eq!(program::NAMES.len(), program::COUNT as usize);
    }

    #[test]
    fn only_signals_that_end_or_restart_a_worker_are_reported() {
        let reported: [i32; 8] = [1, 2, 3, 6, 7, 9, 11, 15];
        for sig in 0..65 {
            assert_eq!(signal::is_reported(sig), reported.contains(&sig), "{sig}");
        }
        assert_eq!(signal::name(signal::SIGABRT), Some("SIGABRT"));
        assert_eq!(signal::name(17), None, "SIGCHLD");
    }

    #[test]
    fn a_connection_ends_badly_when_nothing_came_back() {
        let c = |direction, bytes_in, bytes_out| Conn {
            direction,
            bytes_in,
            bytes_out,
            ..Default::default()
        };
        assert!(c(direction::INBOUND, 120, 0).ended_badly());
        assert!(c(direction::INBOUND, 0, 0).ended_badly());
        assert!(!c(direction::INBOUND, 120, 300).ended_badly());
        assert!(c(direction::OUTBOUND, 0, 80).ended_badly());
        assert!(!c(direction::OUTBOUND, 10, 80).ended_badly());
        assert!(!c(direction::OUTBOUND, 0, 0).ended_badly());
    }
}
