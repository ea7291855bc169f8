//! Kernel side of the tracer: tracepoint programs only (no kprobes, no fentry:
//! they are not available everywhere and are not a stable interface).
//!
//! No program runs on the syscall path. Enabling any syscall tracepoint
//! sends every syscall of every process on the host through the slower
//! tracing entry; measured here that alone cost 4% of a Gunicorn
//! hello-world's throughput. So the tracer watches where the time goes
//! instead:
//! - `sched_switch`: a watched thread that goes to sleep inside a syscall is
//!   recorded in `INFLIGHT` (which syscall, since when); user space polls
//!   that map and reports a sleep that outlasts the threshold while it is
//!   still going on. When the thread runs again, a long sleep is sent as
//!   one event, and a read that blocked goes into a histogram.
//! - TCP state changes: a connection a watched process closes is judged at
//!   the close from the socket's own byte counters, and sent only when it
//!   ended badly (nothing sent back).
//! - Process lifecycle (fork, exit, signals, exec) is rare and sent as events.
//!
//! Tracepoint field offsets differ between kernels, so user space reads them
//! from tracefs, and kernel struct offsets from BTF, and patches the globals
//! below before loading.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
        bpf_probe_read_kernel, bpf_task_pt_regs,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    Conn, ConnEnd, Event, HIST_BUCKETS, Inflight, MAX_SYSCALL_NR, RET_EXITED, RET_INTERRUPTED,
    RET_WOKE, ReadHist, Watched, class, direction, ended, fdkind, kind, role, stat,
};

// ---- Configuration, patched by user space at load time. ----
#[unsafe(no_mangle)]
static THRESHOLD_NS: u64 = 500_000_000;
#[unsafe(no_mangle)]
static NR_SHUTDOWN: u64 = 48;
#[unsafe(no_mangle)]
static NR_CLOSE: u64 = 3;
#[unsafe(no_mangle)]
static OFF_NEWTASK_PID: u64 = 8;
#[unsafe(no_mangle)]
static OFF_NEWTASK_FLAGS: u64 = 32;
/// Offset of `group_dead` in sched_process_exit, or u64::MAX on kernels
/// without it (then the leader's exit stands for the process's).
#[unsafe(no_mangle)]
static OFF_EXIT_GROUP_DEAD: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_SIG_SIG: u64 = 8;
#[unsafe(no_mangle)]
static OFF_SIG_PID: u64 = 36;
// sock:inet_sock_set_state
#[unsafe(no_mangle)]
static OFF_SETSTATE_SKADDR: u64 = 8;
#[unsafe(no_mangle)]
static OFF_SETSTATE_OLDSTATE: u64 = 16;
#[unsafe(no_mangle)]
static OFF_SETSTATE_NEWSTATE: u64 = 20;
#[unsafe(no_mangle)]
static OFF_SETSTATE_SPORT: u64 = 24;
#[unsafe(no_mangle)]
static OFF_SETSTATE_DPORT: u64 = 26;
#[unsafe(no_mangle)]
static OFF_SETSTATE_FAMILY: u64 = 28;
#[unsafe(no_mangle)]
static OFF_SETSTATE_PROTOCOL: u64 = 30;
#[unsafe(no_mangle)]
static OFF_SETSTATE_DADDR: u64 = 36;
#[unsafe(no_mangle)]
static OFF_SETSTATE_DADDR_V6: u64 = 56;

// Offsets into kernel structs, from the running kernel's BTF (user space
// reads them; u64::MAX when unknown).
#[unsafe(no_mangle)]
static OFF_TASK_STATE: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_PID: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_FLAGS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_EXIT_CODE: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_COMM: u64 = u64::MAX;
/// task_struct.pending.signal and task_struct.blocked.
#[unsafe(no_mangle)]
static OFF_TASK_PENDING_SIGNAL: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TASK_BLOCKED: u64 = u64::MAX;
/// task_struct.signal -> signal_struct.shared_pending.signal.
#[unsafe(no_mangle)]
static OFF_TASK_SIGNAL: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_SIGNAL_SHARED_PENDING: u64 = u64::MAX;
// task_struct.files -> files_struct.fdt -> fdtable.fd[fd] -> file.f_inode
// -> inode.i_mode: what kind of file a read blocks on.
#[unsafe(no_mangle)]
static OFF_TASK_FILES: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_FILES_FDT: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_FDT_MAX_FDS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_FDT_FD: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_FILE_INODE: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_INODE_MODE: u64 = u64::MAX;
// struct sock and struct tcp_sock (which starts with a struct sock).
#[unsafe(no_mangle)]
static OFF_SK_SHUTDOWN: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TCP_BYTES_RECEIVED: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TCP_BYTES_SENT: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TCP_BYTES_RETRANS: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TCP_WRITE_SEQ: u64 = u64::MAX;
#[unsafe(no_mangle)]
static OFF_TCP_SND_NXT: u64 = u64::MAX;

/// A read that took this long blocked: it goes into the latency histogram.
const BLOCKING_READ_NS: u64 = 1_000_000;

const EAGAIN: i32 = 11;
const IPPROTO_TCP: u16 = 6;
const AF_INET: u16 = 2;

const CLONE_THREAD: u64 = 0x0001_0000;
/// task_struct.flags: the task is exiting (do_exit has started).
const PF_EXITING: u32 = 0x4;
/// struct sock.sk_shutdown: this side will send no more. Set by close and
/// shutdown before the state change, never by a RST from the peer.
const SEND_SHUTDOWN: u8 = 2;
const SIGKILL_BIT: u64 = 1 << (9 - 1);

// Where the syscall number and its first and third arguments sit in a
// task's saved `struct pt_regs` while it is inside a syscall: part of each
// architecture's ABI, stable across kernels.
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_NR: usize = 120; // orig_ax
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_ARGS: [usize; 2] = [112, 96]; // di, dx
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_NR: usize = 280; // syscallno (s32)
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_ARGS: [usize; 2] = [272, 16]; // orig_x0, regs[2]
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
const PT_REGS_NR: usize = 0;
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
const PT_REGS_ARGS: [usize; 2] = [8, 16];

// ---- Maps. All bounded: LRU where an entry could be missed at cleanup. ----
#[map]
static WATCHED: HashMap<u32, Watched> = HashMap::with_max_entries(8192, 0);
#[map]
static INFLIGHT: LruHashMap<u32, Inflight> = LruHashMap::with_max_entries(32768, 0);
/// What is known of a connection before its close, keyed by socket address.
#[map]
static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(65536, 0);
/// Local ports that watched processes listen on (1 = yes), indexed by port:
/// an inbound connection is established in softirq, where the task running
/// is anyone's, so the port is all there is to go by.
#[map]
static PORTS: Array<u8> = Array::with_max_entries(65536, 0);
#[map]
static READ_HIST: LruHashMap<u32, ReadHist> = LruHashMap::with_max_entries(4096, 0);
/// One all-zero ReadHist to insert from: it is too big for the BPF stack.
#[map]
static ZERO_HIST: Array<ReadHist> = Array::with_max_entries(1, 0);
#[map]
static SYSCALL_CLASS: Array<u32> = Array::with_max_entries(MAX_SYSCALL_NR, 0);
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(512 * 1024, 0);
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[inline(always)]
fn cfg(v: &u64) -> u64 {
    // Volatile so the compiler does not fold the default value in.
    unsafe { core::ptr::read_volatile(v) }
}

#[inline(always)]
fn count(index: u32) {
    if let Some(p) = STATS.get_ptr_mut(index) {
        unsafe { *p += 1 };
    }
}

/// Sends one event, counting it as lost if the ring buffer is full. Never blocks.
#[inline(always)]
fn emit<T: 'static>(ev: &T) {
    match EVENTS.output::<T>(ev, 0) {
        Ok(()) => count(stat::EVENTS_SENT),
        Err(_) => count(stat::EVENTS_LOST),
    }
}

#[inline(always)]
fn ids() -> (u32, u32) {
    let pt = bpf_get_current_pid_tgid();
    ((pt >> 32) as u32, pt as u32)
}

fn base_event(k: u32, tgid: u32, tid: u32) -> Event {
    Event {
        kind: k,
        tgid,
        tid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        ..Default::default()
    }
}

#[inline(always)]
fn kread<T>(base: u64, off: u64) -> Option<T> {
    if base == 0 || off == u64::MAX {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.ok()
}

#[inline(always)]
fn class_of(nr: i64) -> u32 {
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return class::MAYBE;
    }
    SYSCALL_CLASS
        .get(nr as u32)
        .copied()
        .unwrap_or(class::MAYBE)
}

/// The syscall the current task is inside, from its saved user registers
/// (negative when it is not in one: a page fault, an interrupt).
#[inline(always)]
fn current_syscall() -> (i64, u64) {
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task) } as u64;
    #[cfg(bpf_target_arch = "aarch64")]
    let nr = kread::<i32>(regs, PT_REGS_NR as u64).unwrap_or(-1) as i64;
    #[cfg(not(bpf_target_arch = "aarch64"))]
    let nr = kread::<i64>(regs, PT_REGS_NR as u64).unwrap_or(-1);
    (nr, regs)
}

// sched_switch runs on every context switch of the host: a raw tracepoint,
// so the kernel hands over (preempt, prev, next) without building a record.
// Unwatched tasks cost one hash lookup each way.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    let _ = try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &RawTracePointContext) -> Result<(), i32> {
    let preempt: u64 = ctx.arg(0);
    let next: u64 = ctx.arg(2);
    // A preempted task is still runnable: it is not waiting for anything.
    if preempt & 0xff == 0 {
        switch_out();
    }
    switch_in(next);
    Ok(())
}

/// The current task (prev) is going to sleep: if it is a watched thread
/// inside a syscall, record which one and since when.
#[inline(always)]
fn switch_out() {
    let (tgid, tid) = ids();
    // tgid 0: the idle task, the most common prev on a quiet CPU.
    if tgid == 0 || unsafe { WATCHED.get(tgid) }.is_none() {
        return;
    }
    let (nr, regs) = current_syscall();
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return;
    }
    let c = class_of(nr);
    // Waiting for work is never a stall; the entry keeps saying "running".
    // Checked first: it is most of a gevent worker's sleeps.
    if c & class::WAIT != 0 {
        return;
    }
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    match kread::<u32>(task, cfg(&OFF_TASK_STATE)) {
        Some(state) if state != 0 => {}
        _ => return,
    }
    // An exiting thread's last sleeps come after sched_process_exit has
    // dropped its entry; recording them would leave a dead thread behind.
    if kread::<u32>(task, cfg(&OFF_TASK_FLAGS)).unwrap_or(0) & PF_EXITING != 0 {
        return;
    }
    let arg0 = kread::<u64>(regs, PT_REGS_ARGS[0] as u64).unwrap_or(0);
    let arg2 = kread::<u64>(regs, PT_REGS_ARGS[1] as u64).unwrap_or(0);
    let kind = if c & class::READ != 0 {
        fd_kind(arg0 as i32)
    } else {
        fdkind::UNKNOWN
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = INFLIGHT.get_ptr_mut(tid) {
        unsafe {
            (*e).start_ns = now;
            (*e).arg0 = arg0;
            (*e).arg2 = arg2;
            (*e).seq += 1;
            (*e).nr = nr as i32;
            (*e).tgid = tgid;
            (*e).active = 1;
            (*e).seeded = 0;
            (*e).fd_kind = kind as u32;
        }
    } else {
        let e = Inflight {
            start_ns: now,
            arg0,
            arg2,
            seq: 1,
            nr: nr as i32,
            tgid,
            active: 1,
            fd_kind: kind as u32,
            ..Default::default()
        };
        let _ = INFLIGHT.insert(tid, e, 0);
    }
}

/// `next` is about to run: if it was asleep in a recorded syscall, the
/// sleep is over. A long one is sent; a read that blocked is counted.
#[inline(always)]
fn switch_in(next: u64) {
    let tid = match kread::<u32>(next, cfg(&OFF_TASK_PID)) {
        // 0: switching to the idle task.
        Some(tid) if tid != 0 => tid,
        _ => return,
    };
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    let e = unsafe { &mut *e };
    if e.active == 0 {
        return;
    }
    e.active = 0;
    let now = unsafe { bpf_ktime_get_ns() };
    let dur = now.saturating_sub(e.start_ns);
    let c = class_of(e.nr as i64);
    if c & class::READ != 0 && dur >= BLOCKING_READ_NS {
        record_read(e.tgid, e.fd_kind as usize, dur);
    }
    if dur < cfg(&THRESHOLD_NS) || c & class::WAIT != 0 {
        return;
    }
    let master = unsafe { WATCHED.get(e.tgid) }
        .map(|w| w.master)
        .unwrap_or(0);
    let mut ev = Event {
        kind: kind::SLOW_SYSCALL,
        tgid: e.tgid,
        tid,
        aux_pid: master,
        ts_ns: now,
        start_ns: e.start_ns,
        nr: e.nr as i64,
        ret: wake_reason(next),
        arg0: e.arg0,
        arg2: e.arg2,
        comm: kread::<[u8; 16]>(next, cfg(&OFF_TASK_COMM)).unwrap_or_default(),
    };
    if e.seeded != 0 {
        ev.kind |= kind::FLAG_SEEDED;
    }
    emit(&ev);
}

/// Why a task that slept is waking: a pending SIGKILL means it dies in the
/// syscall; any other unblocked pending signal interrupts it.
#[inline(always)]
fn wake_reason(task: u64) -> i64 {
    let own = kread::<u64>(task, cfg(&OFF_TASK_PENDING_SIGNAL)).unwrap_or(0);
    let shared = kread::<u64>(task, cfg(&OFF_TASK_SIGNAL))
        .and_then(|sig| kread::<u64>(sig, cfg(&OFF_SIGNAL_SHARED_PENDING)))
        .unwrap_or(0);
    let pending = own | shared;
    if pending & SIGKILL_BIT != 0 {
        return RET_EXITED;
    }
    let blocked = kread::<u64>(task, cfg(&OFF_TASK_BLOCKED)).unwrap_or(0);
    if pending & !blocked != 0 {
        RET_INTERRUPTED
    } else {
        RET_WOKE
    }
}

/// What fd `fd` of the current task is, from its inode's mode.
#[inline(always)]
fn fd_kind(fd: i32) -> usize {
    if fd < 0 {
        return fdkind::UNKNOWN;
    }
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let Some(files) = kread::<u64>(task, cfg(&OFF_TASK_FILES)) else {
        return fdkind::UNKNOWN;
    };
    let Some(fdt) = kread::<u64>(files, cfg(&OFF_FILES_FDT)) else {
        return fdkind::UNKNOWN;
    };
    match kread::<u32>(fdt, cfg(&OFF_FDT_MAX_FDS)) {
        Some(max) if (fd as u32) < max => {}
        _ => return fdkind::UNKNOWN,
    }
    let Some(arr) = kread::<u64>(fdt, cfg(&OFF_FDT_FD)) else {
        return fdkind::UNKNOWN;
    };
    let Some(file) = kread::<u64>(arr, fd as u64 * 8) else {
        return fdkind::UNKNOWN;
    };
    let Some(inode) = kread::<u64>(file, cfg(&OFF_FILE_INODE)) else {
        return fdkind::UNKNOWN;
    };
    let Some(mode) = kread::<u16>(inode, cfg(&OFF_INODE_MODE)) else {
        return fdkind::UNKNOWN;
    };
    match mode & 0o170000 {
        0o010000 => fdkind::PIPE,
        0o140000 => fdkind::SOCKET,
        0o100000 => fdkind::FILE,
        0o020000 => fdkind::CHAR,
        _ => fdkind::OTHER,
    }
}

/// Adds a read that blocked `dur` ns to the process's histogram.
#[inline(always)]
fn record_read(tgid: u32, kind: usize, dur: u64) {
    let ms = dur / 1_000_000;
    let bucket = if ms == 0 {
        0
    } else {
        ((63 - ms.leading_zeros()) as usize).min(HIST_BUCKETS - 1)
    };
    if unsafe { READ_HIST.get(tgid) }.is_none() {
        let Some(zero) = ZERO_HIST.get(0) else {
            return;
        };
        let _ = READ_HIST.insert(tgid, zero, 1 /* BPF_NOEXIST */);
    }
    let Some(h) = READ_HIST.get_ptr_mut(tgid) else {
        return;
    };
    let idx = kind * HIST_BUCKETS + bucket;
    if idx >= fdkind::COUNT * HIST_BUCKETS || kind >= fdkind::COUNT {
        return;
    }
    // Plain adds: the BPF target has no atomic fetch-add in stable Rust.
    // Two threads of one process finishing a blocking read on two CPUs at
    // the same instant may lose one count; a histogram can afford that.
    unsafe {
        (*h).counts[idx] += 1;
        (*h).sum_ns[kind] += dur;
    }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

/// The peer's address from inet_sock_set_state, as a sockaddr head.
#[inline(always)]
fn peer_addr(ctx: &TracePointContext, family: u16) -> Result<[u8; 32], i32> {
    let mut a = [0u8; 32];
    a[..2].copy_from_slice(&family.to_ne_bytes());
    let dport: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_DPORT) as usize)? };
    a[2..4].copy_from_slice(&dport.to_be_bytes());
    if family == AF_INET {
        let ip: [u8; 4] = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_DADDR) as usize)? };
        a[4..8].copy_from_slice(&ip);
    } else {
        let ip: [u8; 16] = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_DADDR_V6) as usize)? };
        a[8..24].copy_from_slice(&ip);
    }
    Ok(a)
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    const TCP_ESTABLISHED: i32 = 1;
    const TCP_SYN_SENT: i32 = 2;
    const TCP_SYN_RECV: i32 = 3;
    const TCP_FIN_WAIT1: i32 = 4;
    const TCP_CLOSE: i32 = 7;
    const TCP_CLOSE_WAIT: i32 = 8;
    const TCP_LAST_ACK: i32 = 9;
    let protocol: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_PROTOCOL) as usize)? };
    if protocol != IPPROTO_TCP {
        return Ok(());
    }
    let new: i32 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_NEWSTATE) as usize)? };
    let old: i32 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_OLDSTATE) as usize)? };
    if old == TCP_SYN_RECV && new == TCP_ESTABLISHED {
        return accepted(ctx);
    }
    let opening = new == TCP_SYN_SENT;
    let closing = matches!(old, TCP_ESTABLISHED | TCP_CLOSE_WAIT)
        && matches!(new, TCP_FIN_WAIT1 | TCP_LAST_ACK | TCP_CLOSE);
    if !opening && !closing {
        return Ok(());
    }
    let (tgid, tid) = ids();
    if unsafe { WATCHED.get(tgid) }.is_none() {
        return Ok(());
    }
    let sk: u64 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_SKADDR) as usize)? };
    let family: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_FAMILY) as usize)? };
    let now = unsafe { bpf_ktime_get_ns() };
    if opening {
        // connect() in a watched process: an outbound connection.
        let conn = Conn {
            start_ns: now,
            direction: direction::OUTBOUND,
            addr: peer_addr(ctx, family)?,
            ..Default::default()
        };
        if CONNS.insert(sk, conn, 0).is_err() {
            count(stat::CONNS_UNTRACKED);
        }
        return Ok(());
    }
    // Only a close or shutdown by this side sets SEND_SHUTDOWN before the
    // state change. A RST from the peer, handled in softirq on top of
    // whatever task was running (maybe a watched one), does not.
    match kread::<u8>(sk, cfg(&OFF_SK_SHUTDOWN)) {
        Some(v) if v & SEND_SHUTDOWN != 0 => {}
        _ => return Ok(()),
    }
    let mut conn = match unsafe { CONNS.get(sk) } {
        Some(c) => *c,
        None => Conn {
            direction: direction::INBOUND,
            ..Default::default()
        },
    };
    let _ = CONNS.remove(sk);
    conn.bytes_in = kread::<u64>(sk, cfg(&OFF_TCP_BYTES_RECEIVED)).unwrap_or(0);
    // What the process wrote: what went out once, plus what is still queued.
    let sent = kread::<u64>(sk, cfg(&OFF_TCP_BYTES_SENT)).unwrap_or(0);
    let retrans = kread::<u64>(sk, cfg(&OFF_TCP_BYTES_RETRANS)).unwrap_or(0);
    let write_seq = kread::<u32>(sk, cfg(&OFF_TCP_WRITE_SEQ)).unwrap_or(0);
    let snd_nxt = kread::<u32>(sk, cfg(&OFF_TCP_SND_NXT)).unwrap_or(0);
    conn.bytes_out = sent.saturating_sub(retrans) + write_seq.wrapping_sub(snd_nxt) as u64;
    let bad = match conn.direction {
        direction::OUTBOUND => conn.bytes_out > 0 && conn.bytes_in == 0,
        _ => conn.bytes_out == 0,
    };
    if !bad {
        count(stat::CONNS_OK);
        return Ok(());
    }
    let sport: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_SPORT) as usize)? };
    conn.local_port = sport as u32;
    if conn.addr[0] == 0 && conn.addr[1] == 0 {
        conn.addr = peer_addr(ctx, family)?;
    }
    // Closing straight to CLOSE means the kernel threw unread data away
    // and answers with a RST.
    conn.aborted = (new == TCP_CLOSE) as u32;
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let exiting = kread::<u32>(task, cfg(&OFF_TASK_FLAGS)).unwrap_or(0) & PF_EXITING != 0;
    let (nr, regs) = current_syscall();
    let (ended_by, fd) = if exiting {
        (ended::EXIT, -1)
    } else if nr as u64 == cfg(&NR_SHUTDOWN) {
        let fd = kread::<u64>(regs, PT_REGS_ARGS[0] as u64).unwrap_or(u64::MAX);
        (ended::SHUTDOWN, fd as i32)
    } else if nr as u64 == cfg(&NR_CLOSE) {
        let fd = kread::<u64>(regs, PT_REGS_ARGS[0] as u64).unwrap_or(u64::MAX);
        (ended::CLOSE, fd as i32)
    } else {
        (ended::CLOSE, -1)
    };
    let ev = ConnEnd {
        kind: kind::CONN_END,
        tgid,
        tid,
        fd,
        ts_ns: now,
        conn,
        ended_by,
        _pad: 0,
    };
    emit(&ev);
    Ok(())
}

/// A connection to a port a watched process listens on was established:
/// remember when, for its lifetime at close.
#[inline(always)]
fn accepted(ctx: &TracePointContext) -> Result<(), i32> {
    let sport: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_SPORT) as usize)? };
    if PORTS.get(sport as u32).copied().unwrap_or(0) == 0 {
        return Ok(());
    }
    let sk: u64 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_SKADDR) as usize)? };
    let family: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_FAMILY) as usize)? };
    let conn = Conn {
        start_ns: unsafe { bpf_ktime_get_ns() },
        direction: direction::INBOUND,
        local_port: sport as u32,
        addr: peer_addr(ctx, family)?,
        ..Default::default()
    };
    if CONNS.insert(sk, conn, 0).is_err() {
        count(stat::CONNS_UNTRACKED);
    }
    Ok(())
}

/// Every socket receive on the host, so a raw tracepoint (no record is
/// built) that leaves at once unless the receive found nothing: EAGAIN on a
/// connection being tracked is when a socket timeout starts to run.
#[raw_tracepoint(tracepoint = "sock_recv_length")]
pub fn sock_recv_length(ctx: RawTracePointContext) -> i32 {
    let ret: u64 = ctx.arg(1);
    if ret as i32 != -EAGAIN {
        return 0;
    }
    let sk: u64 = ctx.arg(0);
    if let Some(c) = CONNS.get_ptr_mut(sk) {
        unsafe { (*c).eagain_ns = bpf_ktime_get_ns() };
    }
    0
}

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    let _ = try_task_newtask(&ctx);
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(parent) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let flags: u64 = unsafe { ctx.read_at(cfg(&OFF_NEWTASK_FLAGS) as usize)? };
    if flags & CLONE_THREAD != 0 {
        return Ok(());
    }
    let child: i32 = unsafe { ctx.read_at(cfg(&OFF_NEWTASK_PID) as usize)? };
    let child_role = if parent.role == role::MASTER {
        role::WORKER
    } else {
        role::CHILD
    };
    let w = Watched {
        master: parent.master,
        role: child_role,
    };
    // The child cannot run before this returns, so it is watched from its
    // first syscall.
    if WATCHED.insert(child as u32, w, 0).is_err() {
        count(stat::WATCH_FULL);
    }
    let mut ev = base_event(kind::FORK, tgid, tid);
    ev.aux_pid = child as u32;
    ev.nr = child_role as i64;
    ev.ret = parent.master as i64;
    emit(&ev);
    Ok(())
}

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exit(&ctx);
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(w) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let _ = INFLIGHT.remove(tid);
    let off = cfg(&OFF_EXIT_GROUP_DEAD);
    let group_dead = if off == u64::MAX {
        tid == tgid
    } else {
        let v: u8 = unsafe { ctx.read_at(off as usize)? };
        v != 0
    };
    if !group_dead {
        return Ok(());
    }
    // The wait status the parent will see: a signal number in the low 7
    // bits, or the exit code in the next 8.
    let task = unsafe { aya_ebpf::helpers::bpf_get_current_task() };
    let code = kread::<i32>(task, cfg(&OFF_TASK_EXIT_CODE)).unwrap_or(0);
    let mut ev = base_event(kind::EXIT, tgid, tid);
    ev.aux_pid = w.master;
    if code & 0x7f != 0 {
        ev.nr = (code & 0x7f) as i64;
        ev.ret = 0;
    } else {
        ev.nr = ((code >> 8) & 0xff) as i64;
        ev.ret = 1;
    }
    emit(&ev);
    // WATCHED keeps the process until user space has seen this event: the
    // kernel closes its sockets after this point, and they must count.
    Ok(())
}

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let _ = try_signal_generate(&ctx);
    0
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i32> {
    let target: i32 = unsafe { ctx.read_at(cfg(&OFF_SIG_PID) as usize)? };
    if unsafe { WATCHED.get(target as u32) }.is_none() {
        return Ok(());
    }
    let sig: i32 = unsafe { ctx.read_at(cfg(&OFF_SIG_SIG) as usize)? };
    // Signals that end or restart a Gunicorn worker. SIGCHLD, SIGWINCH and
    // the like are frequent and say nothing about a stall.
    const SIGHUP: i32 = 1;
    const SIGINT: i32 = 2;
    const SIGQUIT: i32 = 3;
    const SIGABRT: i32 = 6;
    const SIGBUS: i32 = 7;
    const SIGKILL: i32 = 9;
    const SIGSEGV: i32 = 11;
    const SIGTERM: i32 = 15;
    if !matches!(
        sig,
        SIGHUP | SIGINT | SIGQUIT | SIGABRT | SIGBUS | SIGKILL | SIGSEGV | SIGTERM
    ) {
        return Ok(());
    }
    let (tgid, tid) = ids();
    let mut ev = base_event(kind::SIGNAL, target as u32, target as u32);
    ev.aux_pid = tgid;
    ev.nr = sig as i64;
    ev.ret = tid as i64;
    emit(&ev);
    Ok(())
}

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

fn try_sched_process_exec(_ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let comm = bpf_get_current_comm()?;
    // Only what could be a Gunicorn master (gunicorn, python3 -m gunicorn)
    // or a watched process that execs goes to user space.
    let interesting = comm.starts_with(b"gunicorn")
        || comm.starts_with(b"python")
        || unsafe { WATCHED.get(tgid) }.is_some();
    if !interesting {
        return Ok(());
    }
    let ev = base_event(kind::EXEC, tgid, tid);
    emit(&ev);
    Ok(())
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
