//! Process lifecycle: fork, exit, signals, exec and OOM kills. Rare, so
//! each is sent as an event; fork also extends the watch list to the child.
//!
//! BTF-typed tracepoints: their arguments are the kernel's own (a task, a
//! signal number), attached with bpf() alone. A classic tracepoint needs
//! perf_event_open, which Debian's kernel refuses without
//! CAP_SYS_ADMIN at its default perf_event_paranoid (3): the
//! DaemonSet's capabilities could not attach one there. And no record
//! layout is read, so none can move under the programs.
use aya_ebpf::{
    helpers::bpf_get_current_comm, macros::btf_tracepoint, programs::BtfTracePointContext,
};
use tracer_common::{UNSET, Watched, kind, program, role, signal, stat};

use crate::config::{CONFIG, cfg};
use crate::helpers::{base_event, current_task, emit, finish, ids, kread, mark_watched};
use crate::maps::{INFLIGHT, WATCHED};
use crate::quota::{charge, released_proc, released_thread, room_for_proc, spend_token, took_proc};
use crate::scheduler::{end_at_exit, on_signal_delivery};

const CLONE_THREAD: u64 = 0x0001_0000;

/// task_newtask(struct task_struct *task, unsigned long clone_flags)
#[btf_tracepoint(function = "task_newtask")]
pub fn task_newtask(ctx: BtfTracePointContext) -> i32 {
    finish(program::TASK_NEWTASK, try_task_newtask(&ctx));
    0
}

fn try_task_newtask(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(parent) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let flags: u64 = ctx.arg(1);
    if flags & CLONE_THREAD != 0 {
        return Ok(());
    }
    let task: u64 = ctx.arg(0);
    let child = kread::<i32>(task, cfg(&CONFIG.kernel.task_pid)).ok_or(-1)?;
    let child_role = if parent.role == role::MASTER {
        role::WORKER
    } else {
        role::CHILD
    };
    // The child runs its own event loop, not yet known: every multiplexer
    // sleep counts as the loop's until user space finds it.
    // A master's processes take at most their quota of the watch list,
    // checked here: user space's own quota comes after the fork, too late
    // for a burst of forks to leave room for other masters.
    let Some(load) = room_for_proc(parent.master) else {
        charge(stat::WATCH_QUOTA, tgid);
        return Ok(());
    };
    let w = Watched {
        master: parent.master,
        role: child_role,
        counted: 1,
        ..Default::default()
    };
    // The child cannot run before this returns, so it is watched from its
    // first syscall. When the map is full it is not watched at all, and user
    // space is not told of it either: a FORK for a process the kernel does
    // not follow would leave user space waiting for an EXIT that never comes.
    if WATCHED.insert(child as u32, w, 0).is_err() {
        charge(stat::WATCH_FULL, tgid);
        return Ok(());
    }
    took_proc(load);
    mark_watched(child as u32);
    let mut ev = base_event(kind::FORK, tgid, tid);
    ev.aux_pid = child as u32;
    ev.nr = child_role as i64;
    ev.aux = parent.master as i64;
    emit(&ev);
    Ok(())
}

/// sched_process_exit(struct task_struct *p[, bool group_dead]), in the
/// exiting task's context.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn sched_process_exit(ctx: BtfTracePointContext) -> i32 {
    finish(program::SCHED_PROCESS_EXIT, try_sched_process_exit(&ctx));
    0
}

fn try_sched_process_exit(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(w) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    end_at_exit(tid, current_task());
    if let Some(e) = unsafe { INFLIGHT.get(tid) }
        && e.counted != 0
    {
        released_thread(e.master);
    }
    let _ = INFLIGHT.remove(tid);
    let group_dead = if cfg(&CONFIG.tp.exit_group_dead) == UNSET {
        tid == tgid
    } else {
        ctx.arg::<u64>(1) & 0xff != 0
    };
    if !group_dead {
        return Ok(());
    }
    // Taken off its master's count once: whoever clears `counted` first
    // (this, or user space letting it go) releases it.
    if w.counted != 0
        && let Some(entry) = WATCHED.get_ptr_mut(tgid)
    {
        unsafe { (*entry).counted = 0 };
        released_proc(w.master);
    }
    // The wait status the parent will see: a signal number in the low 7
    // bits, or the exit code in the next 8.
    let code = kread::<i32>(current_task(), cfg(&CONFIG.kernel.task_exit_code)).unwrap_or(0);
    let mut ev = base_event(kind::EXIT, tgid, tid);
    ev.aux_pid = w.master;
    if code & 0x7f != 0 {
        ev.nr = (code & 0x7f) as i64;
        ev.aux = 0;
    } else {
        ev.nr = ((code >> 8) & 0xff) as i64;
        ev.aux = 1;
    }
    emit(&ev);
    // WATCHED keeps the process until user space has seen this event: the
    // kernel closes its sockets after this point, and they must count.
    Ok(())
}

/// signal_generate(int sig, struct kernel_siginfo *info, struct
/// task_struct *task, int group, int result)
#[btf_tracepoint(function = "signal_generate")]
pub fn signal_generate(ctx: BtfTracePointContext) -> i32 {
    finish(program::SIGNAL_GENERATE, try_signal_generate(&ctx));
    0
}

fn try_signal_generate(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let task: u64 = ctx.arg(2);
    // The record's `pid` was the task's pid: the thread signalled.
    let target = kread::<i32>(task, cfg(&CONFIG.kernel.task_pid)).ok_or(-1)?;
    if unsafe { WATCHED.get(target as u32) }.is_none() {
        return Ok(());
    }
    let sig = ctx.arg::<u64>(0) as i32;
    if !signal::is_reported(sig) {
        return Ok(());
    }
    // A flood of signals at one process spends its own bucket only. A
    // SIGKILL ends the process: never held back.
    if sig != signal::SIGKILL && !spend_token(target as u32) {
        return Ok(());
    }
    let (tgid, tid) = ids();
    let mut ev = base_event(kind::SIGNAL, target as u32, target as u32);
    ev.aux_pid = tgid;
    ev.nr = sig as i64;
    ev.aux = tid as i64;
    emit(&ev);
    Ok(())
}

/// A signal about to be handled: rare, and only a watched thread's open
/// call is looked at (see `scheduler::on_signal_delivery`).
#[btf_tracepoint(function = "signal_deliver")]
pub fn signal_deliver(_ctx: BtfTracePointContext) -> i32 {
    finish(program::SIGNAL_DELIVER, try_signal_deliver());
    0
}

fn try_signal_deliver() -> Result<(), i32> {
    let (tgid, tid) = ids();
    if unsafe { WATCHED.get(tgid) }.is_some() {
        on_signal_delivery(tid);
    }
    Ok(())
}

#[btf_tracepoint(function = "sched_process_exec")]
pub fn sched_process_exec(_ctx: BtfTracePointContext) -> i32 {
    finish(program::SCHED_PROCESS_EXEC, try_sched_process_exec());
    0
}

fn try_sched_process_exec() -> Result<(), i32> {
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

/// The kernel's OOM killer chose a victim. It runs in the context of
/// whichever task hit the limit, so the victim comes from the arguments:
/// mark_victim(int pid) before Linux 6.8, mark_victim(struct task_struct
/// *task, uid_t uid) since, whose record also gave the victim's
/// oom_score_adj and resident memory: read here from the task itself.
#[btf_tracepoint(function = "mark_victim")]
pub fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    finish(program::MARK_VICTIM, try_mark_victim(&ctx));
    0
}

fn try_mark_victim(ctx: &BtfTracePointContext) -> Result<(), i32> {
    let k = &CONFIG.kernel;
    let (victim, task) = if cfg(&CONFIG.tp.victim_task) == UNSET {
        (ctx.arg::<u64>(0) as i32, 0)
    } else {
        let task: u64 = ctx.arg(0);
        (kread::<i32>(task, cfg(&k.task_pid)).ok_or(-1)?, task)
    };
    if unsafe { WATCHED.get(victim as u32) }.is_none() {
        return Ok(());
    }
    let (tgid, tid) = ids();
    let mut ev = base_event(kind::OOM_KILL, victim as u32, tid);
    ev.aux_pid = tgid;
    if task != 0 {
        let signal = kread::<u64>(task, cfg(&k.task_signal)).unwrap_or(0);
        ev.nr = kread::<i16>(signal, cfg(&k.signal_oom_score_adj)).unwrap_or(0) as i64;
        ev.arg0 = rss_kb(kread::<u64>(task, cfg(&k.task_mm)).unwrap_or(0));
    }
    emit(&ev);
    Ok(())
}

/// The resident memory of `mm` in KiB, as mark_victim's record gave it:
/// anonymous, file and shared pages (counters 1, 0 and 3 of rss_stat). 0
/// when it cannot be read: user space takes 0 as unknown.
#[inline(always)]
fn rss_kb(mm: u64) -> u64 {
    let k = &CONFIG.kernel;
    let (size, count, shift) = (
        cfg(&k.rss_counter_size),
        cfg(&k.rss_counter_count),
        cfg(&k.page_kb_shift),
    );
    let base = cfg(&k.mm_rss_stat);
    if mm == 0 || [base, size, count, shift].contains(&UNSET) {
        return 0;
    }
    let mut pages: i64 = 0;
    for i in [0u64, 1, 3] {
        pages += kread::<i64>(mm, base + i * size + count)
            .unwrap_or(0)
            .max(0);
    }
    (pages as u64) << shift
}
