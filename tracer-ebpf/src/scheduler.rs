//! `sched_switch`: a watched thread that goes to sleep inside a syscall is
//! recorded in `INFLIGHT`; when it runs again, a long sleep is sent as one
//! event and a read that blocked goes into the histogram.
use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::raw_tracepoint, programs::RawTracePointContext};
use tracer_common::{
    Event, HIST_BUCKETS, Inflight, MAX_SYSCALL_NR, class, fdkind, kind, program, signal, wake,
};

use crate::config::{CONFIG, cfg};
use crate::helpers::{
    PF_EXITING, atomic_add, class_of, current_syscall, current_task, emit, finish, ids, kread,
    syscall_arg0, syscall_arg2,
};
use crate::maps::{INFLIGHT, READ_HIST, WATCHED, ZERO_HIST};

/// A read that took this long blocked: it goes into the latency histogram.
const BLOCKING_READ_NS: u64 = 1_000_000;
const SIGKILL_BIT: u64 = 1 << (signal::SIGKILL - 1);

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

/// The current task (prev) is going to sleep: if it is a watched thread
/// inside a syscall, record which one and since when.
#[inline(always)]
fn switch_out() -> Result<(), i32> {
    let (tgid, tid) = ids();
    // tgid 0: the idle task, the most common prev on a quiet CPU.
    if tgid == 0 || unsafe { WATCHED.get(tgid) }.is_none() {
        return Ok(());
    }
    let (nr, regs) = current_syscall();
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return Ok(());
    }
    let c = class_of(nr);
    // Waiting for work is never a stall; the entry keeps saying "running".
    // Checked first: it is most of a gevent worker's sleeps.
    if c & class::WAIT != 0 {
        return Ok(());
    }
    let task = current_task();
    match kread::<u32>(task, cfg(&CONFIG.kernel.task_state)) {
        Some(state) if state != 0 => {}
        _ => return Ok(()),
    }
    // An exiting thread's last sleeps come after sched_process_exit has
    // dropped its entry; recording them would leave a dead thread behind.
    if kread::<u32>(task, cfg(&CONFIG.kernel.task_flags)).unwrap_or(0) & PF_EXITING != 0 {
        return Ok(());
    }
    let arg0 = syscall_arg0(regs).unwrap_or(0);
    let arg2 = syscall_arg2(regs).unwrap_or(0);
    let kind = if c & class::READ != 0 {
        fd_kind(arg0 as i32)
    } else {
        fdkind::UNKNOWN
    };
    record_sleep(tgid, tid, nr as i32, arg0, arg2, kind as u32)
}

/// Marks `tid` asleep in syscall `nr` from now, reusing its entry.
#[inline(always)]
fn record_sleep(tgid: u32, tid: u32, nr: i32, arg0: u64, arg2: u64, kind: u32) -> Result<(), i32> {
    let now = unsafe { bpf_ktime_get_ns() };
    if let Some(e) = INFLIGHT.get_ptr_mut(tid) {
        unsafe {
            (*e).start_ns = now;
            (*e).arg0 = arg0;
            (*e).arg2 = arg2;
            (*e).seq += 1;
            (*e).nr = nr;
            (*e).tgid = tgid;
            (*e).active = 1;
            (*e).seeded = 0;
            (*e).fd_kind = kind;
        }
        return Ok(());
    }
    let e = Inflight {
        start_ns: now,
        arg0,
        arg2,
        seq: 1,
        nr,
        tgid,
        active: 1,
        fd_kind: kind,
        ..Default::default()
    };
    INFLIGHT.insert(tid, e, 0)
}

/// `next` is about to run: if it was asleep in a recorded syscall, the
/// sleep is over. A long one is sent; a read that blocked is counted.
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
    let c = class_of(e.nr as i64);
    if c & class::READ != 0 && dur >= BLOCKING_READ_NS {
        record_read(e.tgid, e.fd_kind as usize, dur);
    }
    if dur < cfg(&CONFIG.threshold_ns) || c & class::WAIT != 0 {
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
        ts_ns: now,
        start_ns: e.start_ns,
        nr: e.nr as i64,
        aux: wake_reason(next),
        arg0: e.arg0,
        arg2: e.arg2,
        comm: kread::<[u8; 16]>(next, cfg(&CONFIG.kernel.task_comm)).unwrap_or_default(),
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
