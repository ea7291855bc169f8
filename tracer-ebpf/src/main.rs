//! Kernel side of the tracer: tracepoint programs only (no kprobes, no fentry:
//! they are not available everywhere and are not a stable interface).
//!
//! The design keeps the per-syscall path cheap and silent:
//! - `sys_enter`/`sys_exit` run for every syscall on the host, so for an
//!   unwatched process they cost one hash lookup and return.
//! - For a watched thread, `sys_enter` records which syscall it is in and since
//!   when (`INFLIGHT`). User space polls that map to report a syscall that is
//!   still blocked; the kernel never sends an event per syscall.
//! - `sys_exit` sends an event only when a syscall that can block took at least
//!   the threshold.
//! - Process lifecycle (fork, exit, signals, exec) is rare and sent as events.
//!
//! Tracepoint field offsets differ between kernels, so user space reads them
//! from tracefs and patches the globals below before loading.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns, bpf_probe_read_kernel,
        bpf_probe_read_user,
    },
    macros::{map, raw_tracepoint, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{RawTracePointContext, TracePointContext},
};
use tracer_common::{
    Conn, ConnEnd, ConnKey, Event, HIST_BUCKETS, INFLIGHT_CONNS, Inflight, MAX_SYSCALL_NR,
    NOTE_PORT_MASK, NOTE_RST, RET_EXITED, ReadHist, Watched, class, direction, ended, fdkind, kind,
    role, stat,
};

// ---- Configuration, patched by user space at load time. ----
#[unsafe(no_mangle)]
static THRESHOLD_NS: u64 = 500_000_000;
#[unsafe(no_mangle)]
static NR_EXIT_GROUP: i64 = 231;
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
#[unsafe(no_mangle)]
static OFF_SETSTATE_SPORT: u64 = 24;
#[unsafe(no_mangle)]
static OFF_SETSTATE_NEWSTATE: u64 = 20;

// Offsets into kernel structs, from the running kernel's BTF (user space
// reads them; u64::MAX when unknown, and then fd kinds are "unknown"):
// task_struct.files -> files_struct.fdt -> fdtable.fd[fd] -> file.f_inode
// -> inode.i_mode.
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

/// A read that took this long blocked: it goes into the latency histogram.
const BLOCKING_READ_NS: u64 = 1_000_000;

const EAGAIN: i64 = 11;
const EINPROGRESS: i64 = 115;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

const CLONE_THREAD: u64 = 0x0001_0000;

// Where the first three syscall arguments sit in `struct pt_regs` at
// syscall exit: part of each architecture's ABI, stable across kernels.
// On arm64 x0 then holds the return value; the first argument is orig_x0.
#[cfg(bpf_target_arch = "x86_64")]
const PT_REGS_ARGS: [usize; 3] = [112, 104, 96]; // di, si, dx
#[cfg(bpf_target_arch = "aarch64")]
const PT_REGS_ARGS: [usize; 3] = [272, 8, 16]; // orig_x0, regs[1], regs[2]
#[cfg(not(any(bpf_target_arch = "x86_64", bpf_target_arch = "aarch64")))]
const PT_REGS_ARGS: [usize; 3] = [0, 8, 16];

// ---- Maps. All bounded: WATCHED and INFLIGHT are cleaned on exit, and
// INFLIGHT is an LRU so a missed exit can never fill it. ----
#[map]
static WATCHED: HashMap<u32, Watched> = HashMap::with_max_entries(8192, 0);
#[map]
static INFLIGHT: LruHashMap<u32, Inflight> = LruHashMap::with_max_entries(32768, 0);
/// Per-connection byte counts, so a connection closed with nothing sent
/// back is one event, never one event per read or write.
#[map]
static CONNS: LruHashMap<ConnKey, Conn> = LruHashMap::with_max_entries(65536, 0);
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
fn emit(ev: &Event) {
    match EVENTS.output::<Event>(ev, 0) {
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

// raw_syscalls:sys_enter and sys_exit run on every syscall of the host, so
// they are raw tracepoints: the kernel hands over (regs, id) and (regs, ret)
// without first building a trace record, which a classic tracepoint program
// pays for even when its filter rejects the process at once.
#[raw_tracepoint(tracepoint = "sys_enter")]
pub fn sys_enter(ctx: RawTracePointContext) -> i32 {
    let _ = try_sys_enter(&ctx);
    0
}

#[inline(always)]
fn reg(regs: *const u8, off: usize) -> u64 {
    unsafe { bpf_probe_read_kernel(regs.add(off) as *const u64) }.unwrap_or(0)
}

fn try_sys_enter(ctx: &RawTracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(w) = WATCHED.get_ptr_mut(tgid) else {
        return Ok(());
    };
    let nr: i64 = ctx.arg(1);
    if nr == unsafe { core::ptr::read_volatile(&NR_EXIT_GROUP) } {
        let regs: *const u8 = ctx.arg(0);
        unsafe {
            (*w).exit_code = reg(regs, PT_REGS_ARGS[0]) as i32;
            (*w).exited = 1;
        }
    }
    // Arguments are not read here: the exit reads them for the few calls
    // that need them, and user space reads a stalled thread's from /proc.
    let flags = if unsafe { (*w).open_conns } > 0 {
        INFLIGHT_CONNS
    } else {
        0
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = INFLIGHT.get_ptr_mut(tid) {
        unsafe {
            (*e).start_ns = now;
            (*e).seq += 1;
            (*e).nr = nr as i32;
            (*e).tgid = tgid;
            (*e).active = 1;
            (*e).seeded = 0;
            (*e).note = 0;
            (*e).flags = flags;
        }
    } else {
        let e = Inflight {
            start_ns: now,
            seq: 1,
            nr: nr as i32,
            tgid,
            active: 1,
            flags,
            ..Default::default()
        };
        INFLIGHT.insert(tid, e, 0)?;
    }
    Ok(())
}

#[raw_tracepoint(tracepoint = "sys_exit")]
pub fn sys_exit(ctx: RawTracePointContext) -> i32 {
    let _ = try_sys_exit(&ctx);
    0
}

fn try_sys_exit(ctx: &RawTracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return Ok(());
    };
    let e = unsafe { &mut *e };
    if e.active == 0 {
        return Ok(());
    }
    e.active = 0;
    let nr = e.nr;
    if nr < 0 || nr as u32 >= MAX_SYSCALL_NR {
        return Ok(());
    }
    let c = SYSCALL_CLASS
        .get(nr as u32)
        .copied()
        .unwrap_or(class::MAYBE);
    let now = unsafe { bpf_ktime_get_ns() };
    let dur = now.saturating_sub(e.start_ns);
    let slow = dur >= cfg(&THRESHOLD_NS) && c & class::WAIT == 0;
    if c & class::IO == 0 && !slow {
        return Ok(());
    }
    let ret: i64 = ctx.arg(1);
    let regs: *const u8 = ctx.arg(0);
    // Reads, writes and closes of a process with no tracked connection
    // cannot touch one: skip the CONNS lookup and the argument reads.
    let creates = c & (class::ACCEPT | class::CONNECT) != 0;
    let conn_io = c & class::IO != 0 && (creates || e.flags & INFLIGHT_CONNS != 0);
    let blocking_read = c & class::READ != 0 && dur >= BLOCKING_READ_NS;
    if !conn_io && !slow && !blocking_read {
        return Ok(());
    }
    // A seeded entry (blocked before we attached) carries its arguments.
    let (arg0, arg2) = if e.seeded != 0 {
        (e.arg0, e.arg2)
    } else {
        (
            reg(regs, PT_REGS_ARGS[0]),
            if slow { reg(regs, PT_REGS_ARGS[2]) } else { 0 },
        )
    };
    if conn_io {
        let arg1 = if creates {
            reg(regs, PT_REGS_ARGS[1])
        } else {
            0
        };
        track_conn(tgid, tid, e, c, ret, now, [arg0, arg1]);
    }
    if blocking_read {
        record_read(tgid, arg0 as i32, dur);
    }
    if slow {
        let master = unsafe { WATCHED.get(tgid) }.map(|w| w.master).unwrap_or(0);
        let mut ev = base_event(kind::SLOW_SYSCALL, tgid, tid);
        ev.aux_pid = master;
        ev.ts_ns = now;
        ev.start_ns = e.start_ns;
        ev.nr = nr as i64;
        ev.ret = ret;
        ev.arg0 = arg0;
        ev.arg2 = arg2;
        if e.seeded != 0 {
            ev.kind |= kind::FLAG_SEEDED;
        }
        emit(&ev);
    }
    Ok(())
}

#[inline(always)]
fn kread<T>(base: u64, off: u64) -> Option<T> {
    if base == 0 || off == u64::MAX {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.ok()
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
fn record_read(tgid: u32, fd: i32, dur: u64) {
    let kind = fd_kind(fd);
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

/// Copies the peer's sockaddr from the process's memory (accept's output
/// buffer, connect's input). Zeros if it cannot be read.
#[inline(always)]
fn read_sockaddr(ptr: u64) -> [u8; 32] {
    let mut out = [0u8; 32];
    if ptr != 0 {
        // sockaddr_in6 is 28 bytes; read what a sockaddr_in needs if that fails.
        if let Ok(v) = unsafe { bpf_probe_read_user(ptr as *const [u8; 28]) } {
            out[..28].copy_from_slice(&v);
        } else if let Ok(v) = unsafe { bpf_probe_read_user(ptr as *const [u8; 16]) } {
            out[..16].copy_from_slice(&v);
        }
    }
    out
}

/// Connection bookkeeping on the exit of an I/O syscall of a watched thread.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn track_conn(tgid: u32, tid: u32, e: &Inflight, c: u32, ret: i64, now: u64, args: [u64; 2]) {
    if c & class::ACCEPT != 0 {
        if ret >= 0 {
            let conn = Conn {
                start_ns: now,
                listen_fd: args[0] as i32,
                direction: direction::INBOUND,
                addr: read_sockaddr(args[1]),
                ..Default::default()
            };
            insert_conn(
                ConnKey {
                    tgid,
                    fd: ret as i32,
                },
                &conn,
            );
        }
        return;
    }
    if c & class::CONNECT != 0 {
        if ret == 0 || ret == -EINPROGRESS {
            let addr = read_sockaddr(args[1]);
            let family = u16::from_ne_bytes([addr[0], addr[1]]);
            // Only network peers: a connect to a unix socket (syslog, say)
            // is not an upstream call.
            if family == AF_INET || family == AF_INET6 {
                let conn = Conn {
                    start_ns: now,
                    listen_fd: -1,
                    direction: direction::OUTBOUND,
                    local_port: e.note & NOTE_PORT_MASK,
                    addr,
                    ..Default::default()
                };
                insert_conn(
                    ConnKey {
                        tgid,
                        fd: args[0] as i32,
                    },
                    &conn,
                );
            }
        }
        return;
    }
    let key = ConnKey {
        tgid,
        fd: args[0] as i32,
    };
    let Some(conn) = CONNS.get_ptr_mut(key) else {
        return;
    };
    let conn = unsafe { &mut *conn };
    if c & class::READ != 0 {
        if ret > 0 {
            conn.bytes_in += ret as u64;
        } else if ret == -EAGAIN {
            conn.eagain_ns = now;
        }
    } else if c & class::WRITE != 0 {
        if ret > 0 {
            conn.bytes_out += ret as u64;
        }
    } else if c & (class::CLOSE | class::SHUTDOWN) != 0 {
        let port = e.note & NOTE_PORT_MASK;
        if port != 0 {
            conn.local_port = port;
        }
        let bad = match conn.direction {
            direction::INBOUND => conn.bytes_out == 0,
            _ => conn.bytes_out > 0 && conn.bytes_in == 0,
        };
        let closing = c & class::CLOSE != 0;
        if bad && conn.reported == 0 {
            let ev = ConnEnd {
                kind: kind::CONN_END,
                tgid,
                tid,
                fd: key.fd,
                ts_ns: now,
                conn: *conn,
                ended_by: if closing {
                    ended::CLOSE
                } else {
                    ended::SHUTDOWN
                },
                note: e.note,
            };
            match EVENTS.output::<ConnEnd>(&ev, 0) {
                Ok(()) => count(stat::EVENTS_SENT),
                Err(_) => count(stat::EVENTS_LOST),
            }
            conn.reported = 1;
        } else if !bad && closing {
            count(stat::CONNS_OK);
        }
        if closing
            && CONNS.remove(key).is_ok()
            && let Some(w) = WATCHED.get_ptr_mut(tgid)
        {
            unsafe { (*w).open_conns = (*w).open_conns.saturating_sub(1) };
        }
    }
}

#[inline(always)]
fn insert_conn(key: ConnKey, conn: &Conn) {
    if CONNS.insert(key, *conn, 0).is_err() {
        count(stat::CONNS_UNTRACKED);
        return;
    }
    if let Some(w) = WATCHED.get_ptr_mut(key.tgid) {
        unsafe { (*w).open_conns += 1 };
    }
}

/// While a watched thread is inside connect/close/shutdown, note the local
/// port and whether the kernel answered with a RST (unread data at close).
#[inline(always)]
fn note_inflight(extra: u32, port: u32) {
    let (tgid, tid) = ids();
    if unsafe { WATCHED.get(tgid) }.is_none() {
        return;
    }
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    let e = unsafe { &mut *e };
    if e.active == 0 || e.nr < 0 || e.nr as u32 >= MAX_SYSCALL_NR {
        return;
    }
    let c = SYSCALL_CLASS.get(e.nr as u32).copied().unwrap_or(0);
    if c & (class::CONNECT | class::CLOSE | class::SHUTDOWN) == 0 {
        return;
    }
    e.note |= extra;
    // First one wins: on loopback the peer's half of the connection changes
    // state in this same task right after ours, and must not overwrite it.
    if port != 0 && e.note & NOTE_PORT_MASK == 0 {
        e.note |= port & NOTE_PORT_MASK;
    }
}

#[tracepoint]
pub fn inet_sock_set_state(ctx: TracePointContext) -> u32 {
    let _ = try_inet_sock_set_state(&ctx);
    0
}

fn try_inet_sock_set_state(ctx: &TracePointContext) -> Result<(), i32> {
    // Only transitions a local connect or close starts.
    const TCP_SYN_SENT: i32 = 2;
    const TCP_FIN_WAIT1: i32 = 4;
    const TCP_CLOSE: i32 = 7;
    const TCP_LAST_ACK: i32 = 9;
    let state: i32 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_NEWSTATE) as usize)? };
    if !matches!(
        state,
        TCP_SYN_SENT | TCP_FIN_WAIT1 | TCP_CLOSE | TCP_LAST_ACK
    ) {
        return Ok(());
    }
    let sport: u16 = unsafe { ctx.read_at(cfg(&OFF_SETSTATE_SPORT) as usize)? };
    note_inflight(0, sport as u32);
    Ok(())
}

#[tracepoint]
pub fn tcp_send_reset(_ctx: TracePointContext) -> u32 {
    note_inflight(NOTE_RST, 0);
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
        ..Default::default()
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
    let inflight = unsafe { INFLIGHT.get(tid) }.copied();
    let _ = INFLIGHT.remove(tid);
    let off = cfg(&OFF_EXIT_GROUP_DEAD);
    let group_dead = if off == u64::MAX {
        tid == tgid
    } else {
        let v: u8 = unsafe { ctx.read_at(off as usize)? };
        v != 0
    };
    // A thread that dies inside a reported syscall ends that syscall too.
    if let Some(e) = inflight
        && e.active != 0
    {
        let now = unsafe { bpf_ktime_get_ns() };
        if now.saturating_sub(e.start_ns) >= cfg(&THRESHOLD_NS) {
            let mut ev = base_event(kind::SLOW_SYSCALL, tgid, tid);
            ev.aux_pid = w.master;
            ev.start_ns = e.start_ns;
            ev.nr = e.nr as i64;
            ev.ret = RET_EXITED;
            ev.arg0 = e.arg0;
            ev.arg2 = e.arg2;
            if e.seeded != 0 {
                ev.kind |= kind::FLAG_SEEDED;
            }
            emit(&ev);
        }
    }
    if !group_dead {
        return Ok(());
    }
    let mut ev = base_event(kind::EXIT, tgid, tid);
    ev.aux_pid = w.master;
    if w.exited != 0 {
        ev.nr = w.exit_code as i64;
        ev.ret = 1;
    } else {
        ev.nr = w.last_signal as i64;
        ev.ret = 0;
    }
    emit(&ev);
    let _ = WATCHED.remove(tgid);
    Ok(())
}

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    let _ = try_signal_generate(&ctx);
    0
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i32> {
    let target: i32 = unsafe { ctx.read_at(cfg(&OFF_SIG_PID) as usize)? };
    let Some(w) = WATCHED.get_ptr_mut(target as u32) else {
        return Ok(());
    };
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
    unsafe { (*w).last_signal = sig as u32 };
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
