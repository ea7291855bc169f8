//! What several program families share: counters, the ring buffer, reads
//! of kernel memory, and the syscall a task is sleeping in.
use core::intrinsics::{AtomicOrdering, atomic_xadd};

use aya_ebpf::helpers::{
    bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task_btf, bpf_ktime_get_ns,
    bpf_probe_read_kernel, bpf_task_pt_regs,
};
use tracer_common::{Event, MAX_SYSCALL_NR, TGIDS_PER_SLOT, UNSET, class, stat};

use crate::config::{CONFIG, cfg};
use crate::maps::{ERRORS, EVENTS, STATS, SYSCALL_CLASS, WATCHED, WATCHED_TGIDS};

/// task_struct.flags: the task is exiting (do_exit has started).
pub const PF_EXITING: u32 = 0x4;

#[inline(always)]
fn add_one(map: &aya_ebpf::maps::PerCpuArray<u64>, index: u32) {
    if let Some(p) = map.get_ptr_mut(index) {
        unsafe { *p += 1 };
    }
}

#[inline(always)]
pub fn count(index: u32) {
    add_one(&STATS, index);
}

/// Ends a program's run: a failed one is counted under `program` (an id
/// from tracer-common) for user space to export, not thrown away.
#[inline(always)]
pub fn finish(program: u32, run: Result<(), i32>) {
    if run.is_err() {
        add_one(&ERRORS, program);
    }
}

/// Sends one event, counting it as lost (charged to its process) if the
/// ring buffer is full. Never blocks.
#[inline(always)]
pub fn emit(ev: &Event) {
    match EVENTS.output::<Event>(ev, 0) {
        Ok(()) => count(stat::EVENTS_SENT),
        Err(_) => crate::quota::charge(stat::EVENTS_LOST, ev.tgid),
    }
}

/// `*dst += v` in one atomic instruction. core's `AtomicU64` has no
/// `fetch_add` on the BPF target (it lacks compare-and-swap), hence the
/// intrinsic. The old value is discarded, so LLVM emits the non-fetching
/// atomic add that every BPF CPU version and the verifier accept. `dst`
/// must be 8-byte aligned, as map values are.
#[inline(always)]
pub unsafe fn atomic_add(dst: *mut u64, v: u64) {
    unsafe { atomic_xadd::<u64, u64, { AtomicOrdering::Relaxed }>(dst, v) };
}

/// (tgid, tid) of the current task.
#[inline(always)]
pub fn ids() -> (u32, u32) {
    let pt = bpf_get_current_pid_tgid();
    ((pt >> 32) as u32, pt as u32)
}

pub fn base_event(k: u32, tgid: u32, tid: u32) -> Event {
    Event {
        kind: k,
        tgid,
        tid,
        ts_ns: unsafe { bpf_ktime_get_ns() },
        comm: bpf_get_current_comm().unwrap_or_default(),
        ..Default::default()
    }
}

/// Reads a `T` at `base + off` in kernel memory; None for a null base, an
/// offset the loader did not set, or a refused read.
#[inline(always)]
pub fn kread<T>(base: u64, off: u64) -> Option<T> {
    if base == 0 || off == UNSET {
        return None;
    }
    unsafe { bpf_probe_read_kernel((base + off) as *const T) }.ok()
}

#[inline(always)]
pub fn current_task() -> u64 {
    unsafe { aya_ebpf::helpers::bpf_get_current_task() }
}

#[inline(always)]
pub fn class_of(nr: i64) -> u32 {
    if nr < 0 || nr >= MAX_SYSCALL_NR as i64 {
        return class::MAYBE;
    }
    SYSCALL_CLASS
        .get(nr as u32)
        .copied()
        .unwrap_or(class::MAYBE)
}

/// The syscall the current task is inside, from its saved user registers
/// (negative when it is not in one: a page fault, an interrupt), and the
/// address of those registers.
#[inline(always)]
pub fn current_syscall() -> (i64, u64) {
    let task = unsafe { bpf_get_current_task_btf() };
    let regs = unsafe { bpf_task_pt_regs(task) } as u64;
    let off = cfg(&CONFIG.kernel.pt_regs_nr);
    // arm64 keeps it in an s32 (syscallno), x86_64 in a long (orig_ax).
    #[cfg(bpf_target_arch = "aarch64")]
    let nr = kread::<i32>(regs, off).unwrap_or(-1) as i64;
    #[cfg(not(bpf_target_arch = "aarch64"))]
    let nr = kread::<i64>(regs, off).unwrap_or(-1);
    (nr, regs)
}

/// The first syscall argument from saved registers (see [`current_syscall`]).
#[inline(always)]
pub fn syscall_arg0(regs: u64) -> Option<u64> {
    kread::<u64>(regs, cfg(&CONFIG.kernel.pt_regs_arg0))
}

/// Whether `WATCHED` holds `tgid`, from its byte in `WATCHED_TGIDS`: two
/// loads. A tgid past the array (pid_max raised since the start) asks the
/// hash.
#[inline(always)]
pub fn is_watched(tgid: u32) -> bool {
    match WATCHED_TGIDS.get(tgid / TGIDS_PER_SLOT) {
        Some(slot) => slot[(tgid % TGIDS_PER_SLOT) as usize] != 0,
        None => unsafe { WATCHED.get(tgid) }.is_some(),
    }
}

/// Sets `tgid`'s byte in `WATCHED_TGIDS`, after its `WATCHED` insert.
#[inline(always)]
pub fn mark_watched(tgid: u32) {
    if let Some(slot) = WATCHED_TGIDS.get_ptr_mut(tgid / TGIDS_PER_SLOT) {
        unsafe { (*slot)[(tgid % TGIDS_PER_SLOT) as usize] = 1 };
    }
}
