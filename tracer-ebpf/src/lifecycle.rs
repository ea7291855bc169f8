//! Process lifecycle: fork, exit, signals, exec and OOM kills. Rare, so
//! each is sent as an event; fork also extends the watch list to the child.
use aya_ebpf::{helpers::bpf_get_current_comm, macros::tracepoint, programs::TracePointContext};
use tracer_common::{UNSET, Watched, kind, program, role, signal, stat};

use crate::config::{CONFIG, cfg};
use crate::helpers::{
    base_event, count, current_task, emit, field, finish, ids, kread, mark_watched,
};
use crate::maps::{INFLIGHT, WATCHED};
use crate::quota::{charge, released_proc, released_thread, room_for_proc, spend_token, took_proc};
use crate::scheduler::{end_at_exit, on_signal_delivery};

const CLONE_THREAD: u64 = 0x0001_0000;

#[tracepoint]
pub fn task_newtask(ctx: TracePointContext) -> u32 {
    finish(program::TASK_NEWTASK, try_task_newtask(&ctx));
    0
}

fn try_task_newtask(ctx: &TracePointContext) -> Result<(), i32> {
    let (tgid, tid) = ids();
    let Some(parent) = (unsafe { WATCHED.get(tgid) }).copied() else {
        return Ok(());
    };
    let flags: u64 = field(ctx, &CONFIG.tp.newtask_flags)?;
    if flags & CLONE_THREAD != 0 {
        return Ok(());
    }
    let child: i32 = field(ctx, &CONFIG.tp.newtask_pid)?;
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

#[tracepoint]
pub fn sched_process_exit(ctx: TracePointContext) -> u32 {
    finish(program::SCHED_PROCESS_EXIT, try_sched_process_exit(&ctx));
    0
}

fn try_sched_process_exit(ctx: &TracePointContext) -> Result<(), i32> {
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
    let off = &CONFIG.tp.exit_group_dead;
    let group_dead = if cfg(off) == UNSET {
        tid == tgid
    } else {
        field::<u8>(ctx, off)? != 0
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

#[tracepoint]
pub fn signal_generate(ctx: TracePointContext) -> u32 {
    finish(program::SIGNAL_GENERATE, try_signal_generate(&ctx));
    0
}

fn try_signal_generate(ctx: &TracePointContext) -> Result<(), i32> {
    let target: i32 = field(ctx, &CONFIG.tp.signal_pid)?;
    if unsafe { WATCHED.get(target as u32) }.is_none() {
        return Ok(());
    }
    let sig: i32 = field(ctx, &CONFIG.tp.signal_sig)?;
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
#[tracepoint]
pub fn signal_deliver(_ctx: TracePointContext) -> u32 {
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

#[tracepoint]
pub fn sched_process_exec(ctx: TracePointContext) -> u32 {
    finish(program::SCHED_PROCESS_EXEC, try_sched_process_exec(&ctx));
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

/// The kernel's OOM killer chose a victim. It runs in the context of
/// whichever task hit the limit, so the victim comes from the record.
#[tracepoint]
pub fn mark_victim(ctx: TracePointContext) -> u32 {
    finish(program::MARK_VICTIM, try_mark_victim(&ctx));
    0
}

fn try_mark_victim(ctx: &TracePointContext) -> Result<(), i32> {
    let tp = &CONFIG.tp;
    let victim: i32 = field(ctx, &tp.victim_pid)?;
    if unsafe { WATCHED.get(victim as u32) }.is_none() {
        return Ok(());
    }
    let optional = |off: &u64| -> u64 {
        if cfg(off) == UNSET {
            0
        } else {
            field::<u64>(ctx, off).unwrap_or(0)
        }
    };
    let (tgid, tid) = ids();
    let mut ev = base_event(kind::OOM_KILL, victim as u32, tid);
    ev.aux_pid = tgid;
    ev.nr = if cfg(&tp.victim_oom_score_adj) == UNSET {
        0
    } else {
        field::<i16>(ctx, &tp.victim_oom_score_adj).unwrap_or(0) as i64
    };
    ev.arg0 = optional(&tp.victim_anon_rss)
        + optional(&tp.victim_file_rss)
        + optional(&tp.victim_shmem_rss);
    emit(&ev);
    Ok(())
}
