//! `sched_switch`: a watched thread that goes to sleep inside a syscall is
//! recorded in `INFLIGHT`. A wake-up does not end the call: a signal, a
//! tracer's stop (py-spy, gdb, strace attaching) or a restart leaves the
//! thread in the same call. The call is judged over when the thread is next
//! seen sleeping somewhere else, and a long one is then sent as one event.
//! A read that blocked goes into the histogram at its first wake, with its
//! fd's kind, looked up then.
use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_user, bpf_task_pt_regs},
    macros::btf_tracepoint,
    programs::BtfTracePointContext,
};
use tracer_common::{
    Event, HIST_BUCKETS, Inflight, MAX_SYSCALL_NR, STOP_RESUME_WINDOW_NS, class, fdkind, kind,
    program, resume_window_ns, role, signal, stat, wake, woke_by,
};

use crate::config::{CONFIG, cfg};
use crate::helpers::{
    PF_EXITING, atomic_add, class_of, current_syscall, emit, finish, is_watched, kread,
};
use crate::maps::{INFLIGHT, READ_HIST, WATCHED, ZERO_HIST};
use crate::quota::{charge, room_for_thread, took_thread};

/// A read that took this long blocked: it goes into the latency histogram.
/// Shorter sleeps are not worth reading the pending signals for either.
const BLOCKING_READ_NS: u64 = 1_000_000;
const SIGKILL_BIT: u64 = 1 << (signal::SIGKILL - 1);
/// task_struct.__state bits of a stopped task: __TASK_STOPPED (job
/// control) and __TASK_TRACED (ptrace); the same on every kernel.
const TASK_STOPPED: u32 = 0x4;
const TASK_TRACED: u32 = 0x8;
const SIGTRAP: i32 = 5;

// sched_switch runs on every context switch of the host. As a BTF
// tracepoint it gets typed task_struct pointers, so task fields are plain
// loads (the verifier checks them against the kernel's BTF; the offsets
// from CONFIG are constants to it, .rodata being frozen) instead of
// bpf_probe_read_kernel calls.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    finish(program::SCHED_SWITCH, try_sched_switch(&ctx));
    0
}

/// A task of the kernel, as the tracepoint hands it over.
type Task = *const u8;

/// A field of `task` at an offset from CONFIG: one load.
#[inline(always)]
fn field<T: Copy>(task: Task, off: &u64) -> T {
    unsafe { core::ptr::read(task.add(cfg(off) as usize) as *const T) }
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let preempt: u64 = ctx.arg(0);
    let prev: Task = ctx.arg(1);
    let next: Task = ctx.arg(2);
    // Filled in, not returned as an Option: every field must be defined on
    // every path, or LLVM may spill an unset register the verifier refuses.
    let mut call = Call::default();
    // A preempted task is still runnable: it is not waiting for anything.
    let sleeping = preempt & 0xff == 0 && going_to_sleep(prev, &mut call);
    let woken = waking_up(next);
    if !sleeping && woken.is_none() {
        return Ok(());
    }
    // One clock read serves both halves.
    let now = unsafe { bpf_ktime_get_ns() };
    let out = if sleeping {
        sleep_in(prev, &call, now)
    } else {
        Ok(())
    };
    if let Some(e) = woken {
        wake(next, unsafe { &mut *e }, now);
    }
    out
}

/// The syscall a watched thread is going to sleep in.
#[derive(Default)]
struct Call {
    tgid: u32,
    tid: u32,
    nr: i32,
    /// task_struct.__state: how it sleeps (stopped, traced, or waiting).
    state: u32,
    arg0: u64,
    arg2: u64,
}

/// `prev` is going to sleep: true, with `call` filled in, if it is a
/// watched thread inside a syscall that may stall. Cheapest checks first.
#[inline(always)]
fn going_to_sleep(prev: Task, call: &mut Call) -> bool {
    let k = &CONFIG.kernel;
    let tgid: u32 = field(prev, &k.task_tgid);
    if !is_watched(tgid) {
        return false;
    }
    let state: u32 = field(prev, &k.task_state);
    if state == 0 {
        return false;
    }
    // An exiting thread's last sleeps come after sched_process_exit has
    // dropped its entry; recording them would leave a dead thread behind.
    if field::<u32>(prev, &k.task_flags) & PF_EXITING != 0 {
        return false;
    }
    let regs = unsafe { bpf_task_pt_regs(prev as *mut _) } as Task;
    // arm64 keeps it in an s32 (syscallno), x86_64 in a long (orig_ax).
    #[cfg(bpf_target_arch = "aarch64")]
    let nr = field::<i32>(regs, &k.pt_regs_nr) as i64;
    #[cfg(not(bpf_target_arch = "aarch64"))]
    let nr = field::<i64>(regs, &k.pt_regs_nr);
    // Negative outside a syscall (a page fault, an interrupt).
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return false;
    }
    let tid: u32 = field(prev, &k.task_pid);
    let arg0: u64 = field(regs, &k.pt_regs_arg0);
    let c = class_of(nr);
    // Most of a worker's sleeps end here. A multiplexer is idle except in
    // a worker's loop thread, once its loop's own wait is known.
    if c & class::WAIT != 0 && (tid != tgid || is_loop_wait(tgid, c, arg0, regs)) {
        return false;
    }
    call.tgid = tgid;
    call.tid = tid;
    call.nr = nr as i32;
    call.state = state;
    call.arg0 = arg0;
    call.arg2 = field(regs, &k.pt_regs_arg2);
    true
}

/// Whether a multiplexer sleep of a main thread is the event loop's own
/// wait, as user space described it in `WATCHED`: same syscall family and
/// first argument, and for select the same read set (its nfds alone could
/// be another call's). While a worker's loop is unknown none is: its
/// multiplexer sleeps are recorded, so that a `poll()` begun before user
/// space found the loop is judged, with its true start, once it does.
/// Other processes' main threads idle in theirs.
#[inline(always)]
fn is_loop_wait(tgid: u32, c: u32, arg0: u64, regs: Task) -> bool {
    let Some(w) = (unsafe { WATCHED.get(tgid) }) else {
        return true;
    };
    if w.loop_class == 0 {
        return w.role != role::WORKER;
    }
    if c & w.loop_class == 0 || arg0 != w.loop_arg0 {
        return false;
    }
    if w.loop_class != class::SELECT || w.loop_fds == 0 {
        return true;
    }
    let set: u64 = field(regs, &CONFIG.kernel.pt_regs_arg1);
    // A set that cannot be read is taken for the loop's: no false alarm.
    match unsafe { bpf_probe_read_user(set as *const u64) } {
        Ok(bits) => bits == w.loop_fds,
        Err(_) => true,
    }
}

/// The thread goes to sleep in `call` at `now`; a tracer's stop inside the
/// call it woke from is part of that call.
#[inline(always)]
fn sleep_in(prev: Task, call: &Call, now: u64) -> Result<(), i32> {
    if call.state & (TASK_STOPPED | TASK_TRACED) != 0 {
        let syscall_stop = call.state & TASK_TRACED != 0 && is_syscall_stop(prev);
        if stop_in_call(prev, call, syscall_stop, now) || syscall_stop {
            return Ok(());
        }
    }
    record_sleep(prev, call, now)
}

/// A tracer stopped the task at a syscall's entry or exit (strace): its
/// stop code is SIGTRAP, or SIGTRAP|0x80, with no ptrace event above it.
#[inline(always)]
fn is_syscall_stop(task: Task) -> bool {
    let code: i32 = field(task, &CONFIG.kernel.task_exit_code);
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
fn stop_in_call(prev: Task, call: &Call, syscall_stop: bool, now: u64) -> bool {
    let Some(e) = INFLIGHT.get_ptr_mut(call.tid) else {
        return false;
    };
    let e = unsafe { &mut *e };
    // The stop comes in the woken call's own way out; a loaded machine
    // may delay it past a signal's window, hence the stop's.
    if !is_open(e)
        || e.nr != call.nr
        || e.arg0 != call.arg0
        || now.saturating_sub(e.woke_ns) >= STOP_RESUME_WINDOW_NS
    {
        return false;
    }
    if syscall_stop {
        close(e, call.tid, wake::RETURNING, prev as u64);
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
fn record_sleep(prev: Task, call: &Call, now: u64) -> Result<(), i32> {
    let Some(e) = INFLIGHT.get_ptr_mut(call.tid) else {
        // A thread's first sleep: one entry more for its master's count.
        let master = unsafe { WATCHED.get(call.tgid) }.map_or(call.tgid, |w| w.master);
        let Some(load) = room_for_thread(master) else {
            charge(stat::INFLIGHT_QUOTA, call.tgid);
            return Ok(());
        };
        let e = Inflight {
            start_ns: now,
            arg0: call.arg0,
            arg2: call.arg2,
            seq: 1,
            nr: call.nr,
            tgid: call.tgid,
            active: 1,
            master,
            counted: 1,
            ..Default::default()
        };
        // Full: the thread's calls go unseen until a slot frees, counted
        // as such rather than as a failed run.
        if INFLIGHT.insert(call.tid, e, 0).is_err() {
            charge(stat::INFLIGHT_FULL, call.tgid);
        } else {
            took_thread(load);
        }
        return Ok(());
    };
    let e = unsafe { &mut *e };
    if is_open(e) {
        let same = e.nr == call.nr && e.arg0 == call.arg0;
        let restartable = e.woke_by == woke_by::SIGNAL || e.woke_by == woke_by::STOP;
        if same && restartable && now.saturating_sub(e.woke_ns) < resume_window_ns(e.woke_by) {
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
        close(e, call.tid, how, prev as u64);
    }
    e.start_ns = now;
    e.arg0 = call.arg0;
    e.arg2 = call.arg2;
    e.seq += 1;
    e.woke_ns = 0;
    e.nr = call.nr;
    e.tgid = call.tgid;
    e.active = 1;
    e.seeded = 0;
    e.fd_kind = fdkind::UNKNOWN as u32;
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
/// else the signal that woke it ended it. `task` is the exiting thread.
#[inline(always)]
pub fn end_at_exit(tid: u32, task: u64) {
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
    close(e, tid, how, task);
}

/// Judges an open call over: sends it when it lasted the threshold, ending
/// when the thread last woke from it. `task` is the thread (for its comm);
/// the master and the comm are read only for a call that is sent.
#[inline(always)]
fn close(e: &mut Inflight, tid: u32, how: i64, task: u64) {
    let woke = e.woke_ns;
    e.woke_ns = 0;
    e.woke_by = woke_by::NONE;
    if woke.saturating_sub(e.start_ns) < cfg(&CONFIG.threshold_ns) {
        return;
    }
    let master = unsafe { WATCHED.get(e.tgid) }
        .map(|w| w.master)
        .unwrap_or(0);
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
        comm: kread::<[u8; 16]>(task, cfg(&CONFIG.kernel.task_comm)).unwrap_or_default(),
    };
    if e.seeded != 0 {
        ev.kind |= kind::FLAG_SEEDED;
    }
    emit(&ev);
}

/// `next` is about to run: its entry, if it was asleep in a recorded
/// syscall.
#[inline(always)]
fn waking_up(next: Task) -> Option<*mut Inflight> {
    // Only threads of watched processes are recorded.
    if !is_watched(field(next, &CONFIG.kernel.task_tgid)) {
        return None;
    }
    let e = INFLIGHT.get_ptr_mut(field::<u32>(next, &CONFIG.kernel.task_pid))?;
    (unsafe { (*e).active } != 0).then_some(e)
}

/// `next` wakes in its recorded call: note when and why; the call stays
/// open until the thread is next seen. A thread SIGKILL woke dies in the
/// call: that ends it now.
#[inline(always)]
fn wake(next: Task, e: &mut Inflight, now: u64) {
    e.active = 0;
    let dur = now.saturating_sub(e.start_ns);
    let stopped = e.woke_by == woke_by::STOP;
    // A call's first wake: later ones (after a signal or a stop) would
    // count its time twice.
    if e.woke_by == woke_by::NONE
        && dur >= BLOCKING_READ_NS
        && class_of(e.nr as i64) & class::READ != 0
    {
        let kind = fd_kind(next as u64, e.arg0 as i32);
        e.fd_kind = kind as u32;
        record_read(e.tgid, kind, dur);
    }
    let reason = if dur >= BLOCKING_READ_NS || stopped {
        wake_reason(next as u64)
    } else {
        wake::RETURNING
    };
    e.woke_ns = now;
    if reason == wake::KILLED {
        let tid: u32 = field(next, &CONFIG.kernel.task_pid);
        close(e, tid, wake::KILLED, next as u64);
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

/// What fd `fd` of `task` is, from its inode's mode. Looked up when a
/// read first wakes after blocking 1 ms or more, not when it starts: the
/// fd stays open while a thread is asleep reading it, and most sleeps
/// never need it.
#[inline(always)]
fn fd_kind(task: u64, fd: i32) -> usize {
    if fd < 0 {
        return fdkind::UNKNOWN;
    }
    let k = &CONFIG.kernel;
    let Some(files) = kread::<u64>(task, cfg(&k.task_files)) else {
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
