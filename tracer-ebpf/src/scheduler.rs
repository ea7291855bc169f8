//! `sched_switch`: a watched thread that goes to sleep inside a syscall is
//! recorded in `INFLIGHT`. A wake-up does not end the call: a signal, a
//! tracer's stop (py-spy, gdb, strace attaching) or a restart leaves the
//! thread in the same call. The call is judged over when the thread is next
//! seen sleeping somewhere else, and a long one is then sent as one event.
//! A read that blocked goes into the histogram at its first wake.
use aya_ebpf::{
    helpers::{bpf_get_current_comm, bpf_ktime_get_ns, bpf_probe_read_user},
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use tracer_common::{
    Event, HIST_BUCKETS, Inflight, MAX_SYSCALL_NR, RESTART_WINDOW_NS, Watched, class, fdkind, kind,
    program, signal, wake, woke_by,
};

use crate::config::{CONFIG, cfg};
use crate::helpers::{
    PF_EXITING, atomic_add, class_of, current_syscall, current_task, emit, finish, ids, kread,
    syscall_arg0, syscall_arg1, syscall_arg2,
};
use crate::maps::{INFLIGHT, READ_HIST, WATCHED, ZERO_HIST};

/// A read that took this long blocked: it goes into the latency histogram.
/// Shorter sleeps are not worth reading the pending signals for either.
const BLOCKING_READ_NS: u64 = 1_000_000;
const SIGKILL_BIT: u64 = 1 << (signal::SIGKILL - 1);
/// task_struct.__state bits of a stopped task: __TASK_STOPPED (job
/// control) and __TASK_TRACED (ptrace); the same on every kernel.
const TASK_STOPPED: u32 = 0x4;
const TASK_TRACED: u32 = 0x8;
const SIGTRAP: i32 = 5;

// sched_switch runs on every context switch of the host: a raw tracepoint,
// so the kernel hands over (preempt, prev, next) without building a record.
// Unwatched tasks cost one hash lookup each way.
#[raw_tracepoint(tracepoint = "sched_switch")]
pub fn sched_switch(ctx: RawTracePointContext) -> i32 {
    finish(program::SCHED_SWITCH, try_sched_switch(&ctx));
    0
}

fn try_sched_switch(ctx: &RawTracePointContext) -> Result<(), i32> {
    let preempt: u64 = ctx.arg(0);
    let next: u64 = ctx.arg(2);
    // A preempted task is still runnable: it is not waiting for anything.
    let out = if preempt & 0xff == 0 {
        switch_out()
    } else {
        Ok(())
    };
    switch_in(next);
    out
}

/// The syscall a thread is going to sleep in.
struct Call {
    nr: i32,
    arg0: u64,
}

/// The current task (prev) is going to sleep: if it is a watched thread
/// inside a syscall, record which one and since when, or carry on with the
/// call it was already in.
#[inline(always)]
fn switch_out() -> Result<(), i32> {
    let (tgid, tid) = ids();
    // tgid 0: the idle task, the most common prev on a quiet CPU.
    if tgid == 0 {
        return Ok(());
    }
    let Some(w) = (unsafe { WATCHED.get(tgid) }) else {
        return Ok(());
    };
    let (nr, regs) = current_syscall();
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return Ok(());
    }
    let c = class_of(nr);
    let mut arg0 = None;
    // Checked first: it is most of a worker's sleeps. A multiplexer is idle
    // except in a worker's loop thread, once its loop's own wait is known.
    if c & class::WAIT != 0 {
        if tid != tgid || w.loop_class == 0 {
            return Ok(());
        }
        let a = syscall_arg0(regs).unwrap_or(0);
        if is_loop_wait(w, c, a, regs) {
            return Ok(());
        }
        arg0 = Some(a);
    }
    let task = current_task();
    let state = match kread::<u32>(task, cfg(&CONFIG.kernel.task_state)) {
        Some(state) if state != 0 => state,
        _ => return Ok(()),
    };
    // An exiting thread's last sleeps come after sched_process_exit has
    // dropped its entry; recording them would leave a dead thread behind.
    if kread::<u32>(task, cfg(&CONFIG.kernel.task_flags)).unwrap_or(0) & PF_EXITING != 0 {
        return Ok(());
    }
    let call = Call {
        nr: nr as i32,
        arg0: arg0.unwrap_or_else(|| syscall_arg0(regs).unwrap_or(0)),
    };
    let now = unsafe { bpf_ktime_get_ns() };
    if state & (TASK_STOPPED | TASK_TRACED) != 0 {
        let syscall_stop = state & TASK_TRACED != 0 && is_syscall_stop(task);
        if stop_in_call(tid, &call, syscall_stop, w.master, now) || syscall_stop {
            return Ok(());
        }
    }
    let fd_kind = if c & class::READ != 0 {
        fd_kind(call.arg0 as i32)
    } else {
        fdkind::UNKNOWN
    };
    record_sleep(
        tgid,
        tid,
        &call,
        syscall_arg2(regs).unwrap_or(0),
        fd_kind as u32,
        w.master,
        now,
    )
}

/// Whether a multiplexer sleep is the event loop's own wait, as user space
/// described it: same syscall family and first argument, and for select
/// the same read set (its nfds alone could be another call's).
#[inline(always)]
fn is_loop_wait(w: &Watched, c: u32, arg0: u64, regs: u64) -> bool {
    if c & w.loop_class == 0 || arg0 != w.loop_arg0 {
        return false;
    }
    if w.loop_class != class::SELECT || w.loop_fds == 0 {
        return true;
    }
    let Some(set) = syscall_arg1(regs) else {
        return true;
    };
    // A set that cannot be read is taken for the loop's: no false alarm.
    match unsafe { bpf_probe_read_user(set as *const u64) } {
        Ok(bits) => bits == w.loop_fds,
        Err(_) => true,
    }
}

/// A tracer stopped the task at a syscall's entry or exit (strace): its
/// stop code is SIGTRAP, or SIGTRAP|0x80, with no ptrace event above it.
#[inline(always)]
fn is_syscall_stop(task: u64) -> bool {
    let code = kread::<i32>(task, cfg(&CONFIG.kernel.task_exit_code)).unwrap_or(0);
    code & 0x7f == SIGTRAP && code >> 8 == 0
}

/// An entry the thread woke from and that is not judged yet.
#[inline(always)]
fn is_open(e: &Inflight) -> bool {
    e.active == 0 && e.woke_ns != 0
}

/// A stop inside the call the thread just woke from (a ptrace attach, a
/// SIGSTOP) is part of that call: py-spy, gdb and strace must not split
/// it. A stop at a syscall boundary (strace following every call) ends it.
/// Returns whether the stop was the open call's.
#[inline(always)]
fn stop_in_call(tid: u32, call: &Call, syscall_stop: bool, master: u32, now: u64) -> bool {
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return false;
    };
    let e = unsafe { &mut *e };
    if !is_open(e)
        || e.nr != call.nr
        || e.arg0 != call.arg0
        || now.saturating_sub(e.woke_ns) >= RESTART_WINDOW_NS
    {
        return false;
    }
    if syscall_stop {
        close(e, tid, wake::RETURNING, master, current_comm());
    } else {
        e.active = 1;
        e.woke_ns = 0;
        e.woke_by = woke_by::STOP;
    }
    true
}

/// The thread goes to sleep in `call`: the same call it woke from carries
/// on when a signal or a stop woke it; anything else ends that call and
/// starts a new entry.
#[inline(always)]
fn record_sleep(
    tgid: u32,
    tid: u32,
    call: &Call,
    arg2: u64,
    fd_kind: u32,
    master: u32,
    now: u64,
) -> Result<(), i32> {
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        let e = Inflight {
            start_ns: now,
            arg0: call.arg0,
            arg2,
            seq: 1,
            nr: call.nr,
            tgid,
            active: 1,
            fd_kind,
            ..Default::default()
        };
        return INFLIGHT.insert(tid, e, 0);
    };
    let e = unsafe { &mut *e };
    if is_open(e) {
        let same = e.nr == call.nr && e.arg0 == call.arg0;
        let restartable = e.woke_by == woke_by::SIGNAL || e.woke_by == woke_by::STOP;
        if same && restartable && now.saturating_sub(e.woke_ns) < RESTART_WINDOW_NS {
            e.active = 1;
            e.woke_ns = 0;
            e.woke_by = woke_by::RESUMED;
            return Ok(());
        }
        let how = match (e.woke_by, same) {
            (woke_by::PLAIN, true) => wake::WOKE,
            (woke_by::PLAIN, false) => wake::RETURNING,
            _ => wake::INTERRUPTED,
        };
        close(e, tid, how, master, current_comm());
    }
    e.start_ns = now;
    e.arg0 = call.arg0;
    e.arg2 = arg2;
    e.seq += 1;
    e.woke_ns = 0;
    e.nr = call.nr;
    e.tgid = tgid;
    e.active = 1;
    e.seeded = 0;
    e.fd_kind = fd_kind;
    e.woke_by = woke_by::NONE;
    Ok(())
}

/// Return values of a syscall a signal broke: -EINTR, and the restart codes
/// the kernel turns into a restart or -EINTR at the signal's delivery.
const EINTR: i64 = -4;
const ERESTARTSYS: i64 = -512;
const ERESTART_RESTARTBLOCK: i64 = -516;

/// A signal is being delivered to the current thread: if it woke the
/// thread from a recorded call, the call's return value says whether the
/// signal broke it or only came while it completed (gevent's SIGCHLD as a
/// forked child writes the pipe and exits, say).
#[inline(always)]
pub fn on_signal_delivery(tid: u32) {
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    let e = unsafe { &mut *e };
    if !is_open(e) || e.woke_by != woke_by::SIGNAL {
        return;
    }
    let (nr, regs) = current_syscall();
    // Out of the call already (in user code, or another call): it completed.
    let broken = nr == e.nr as i64
        && match kread::<i64>(regs, cfg(&CONFIG.kernel.pt_regs_ret)) {
            Some(ret) => ret == EINTR || (ERESTART_RESTARTBLOCK..=ERESTARTSYS).contains(&ret),
            None => true,
        };
    if !broken {
        e.woke_by = woke_by::PLAIN;
    }
}

/// A thread exits with a call it woke from still open: the call returned
/// if nothing was pending at the wake (the thread then ran to its exit),
/// else the signal that woke it ended it.
#[inline(always)]
pub fn end_at_exit(tid: u32, master: u32) {
    let Some(e) = INFLIGHT.get_ptr_mut(tid) else {
        return;
    };
    let e = unsafe { &mut *e };
    if !is_open(e) {
        return;
    }
    let how = if e.woke_by == woke_by::PLAIN {
        wake::RETURNING
    } else {
        wake::INTERRUPTED
    };
    close(e, tid, how, master, current_comm());
}

#[inline(always)]
fn current_comm() -> [u8; 16] {
    bpf_get_current_comm().unwrap_or_default()
}

/// Judges an open call over: sends it when it lasted the threshold, ending
/// when the thread last woke from it.
#[inline(always)]
fn close(e: &mut Inflight, tid: u32, how: i64, master: u32, comm: [u8; 16]) {
    let woke = e.woke_ns;
    e.woke_ns = 0;
    e.woke_by = woke_by::NONE;
    if woke.saturating_sub(e.start_ns) < cfg(&CONFIG.threshold_ns) {
        return;
    }
    let mut ev = Event {
        kind: kind::SLEEP_END,
        tgid: e.tgid,
        tid,
        aux_pid: master,
        ts_ns: woke,
        start_ns: e.start_ns,
        nr: e.nr as i64,
        aux: how,
        arg0: e.arg0,
        arg2: e.arg2,
        comm,
    };
    if e.seeded != 0 {
        ev.kind |= kind::FLAG_SEEDED;
    }
    emit(&ev);
}

/// `next` is about to run: if it was asleep in a recorded syscall, note
/// when and why it woke; the call stays open until the thread is next
/// seen. A thread SIGKILL woke dies in the call: that ends it now.
#[inline(always)]
fn switch_in(next: u64) {
    let tid = match kread::<u32>(next, cfg(&CONFIG.kernel.task_pid)) {
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
    let stopped = e.woke_by == woke_by::STOP;
    // A call's first wake: later ones (after a signal or a stop) would
    // count its time twice.
    if e.woke_by == woke_by::NONE
        && dur >= BLOCKING_READ_NS
        && class_of(e.nr as i64) & class::READ != 0
    {
        record_read(e.tgid, e.fd_kind as usize, dur);
    }
    let reason = if dur >= BLOCKING_READ_NS || stopped {
        wake_reason(next)
    } else {
        wake::RETURNING
    };
    e.woke_ns = now;
    if reason == wake::KILLED {
        let master = unsafe { WATCHED.get(e.tgid) }
            .map(|w| w.master)
            .unwrap_or(0);
        let comm = kread::<[u8; 16]>(next, cfg(&CONFIG.kernel.task_comm)).unwrap_or_default();
        close(e, tid, wake::KILLED, master, comm);
        return;
    }
    e.woke_by = if stopped {
        woke_by::STOP
    } else if reason == wake::INTERRUPTED {
        woke_by::SIGNAL
    } else {
        woke_by::PLAIN
    };
}

/// Why a task that slept is waking: a pending SIGKILL means it dies in the
/// syscall; any other unblocked pending signal interrupts it.
#[inline(always)]
fn wake_reason(task: u64) -> i64 {
    let k = &CONFIG.kernel;
    let own = kread::<u64>(task, cfg(&k.task_pending_signal)).unwrap_or(0);
    let shared = kread::<u64>(task, cfg(&k.task_signal))
        .and_then(|sig| kread::<u64>(sig, cfg(&k.signal_shared_pending)))
        .unwrap_or(0);
    let pending = own | shared;
    if pending & SIGKILL_BIT != 0 {
        return wake::KILLED;
    }
    let blocked = kread::<u64>(task, cfg(&k.task_blocked)).unwrap_or(0);
    if pending & !blocked != 0 {
        wake::INTERRUPTED
    } else {
        wake::RETURNING
    }
}

/// What fd `fd` of the current task is, from its inode's mode.
#[inline(always)]
fn fd_kind(fd: i32) -> usize {
    if fd < 0 {
        return fdkind::UNKNOWN;
    }
    let k = &CONFIG.kernel;
    let Some(files) = kread::<u64>(current_task(), cfg(&k.task_files)) else {
        return fdkind::UNKNOWN;
    };
    let Some(fdt) = kread::<u64>(files, cfg(&k.files_fdt)) else {
        return fdkind::UNKNOWN;
    };
    match kread::<u32>(fdt, cfg(&k.fdt_max_fds)) {
        Some(max) if (fd as u32) < max => {}
        _ => return fdkind::UNKNOWN,
    }
    let Some(arr) = kread::<u64>(fdt, cfg(&k.fdt_fd)) else {
        return fdkind::UNKNOWN;
    };
    let Some(file) = kread::<u64>(arr, fd as u64 * 8) else {
        return fdkind::UNKNOWN;
    };
    let Some(inode) = kread::<u64>(file, cfg(&k.file_inode)) else {
        return fdkind::UNKNOWN;
    };
    let Some(mode) = kread::<u16>(inode, cfg(&k.inode_mode)) else {
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
    // Two threads of one process may finish a blocking read on two CPUs at
    // once: both adds must count.
    unsafe {
        atomic_add(&raw mut (*h).counts[idx], 1);
        atomic_add(&raw mut (*h).sum_ns[kind], dur);
    }
}
