//! What one tenant may take of the maps and the ring buffer every tenant
//! shares: a master's processes and sleeping threads (`MASTER_LOAD`), a
//! process's events (`BUCKETS`), and whom each loss was charged to
//! (`OFFENDERS`). The limits are `CONFIG.quotas`; UNSET is none.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use tracer_common::{Bucket, MasterLoad, OffenderKey, UNSET, stat};

use crate::config::{CONFIG, cfg};
use crate::helpers::{atomic_add, count};
use crate::maps::{BUCKETS, MASTER_LOAD, OFFENDERS};

const BPF_NOEXIST: u64 = 1;

/// Counts a loss under `stat` and charges it to `tgid`: user space names
/// the process (and its pod) that lost the most. `OFFENDERS` is an LRU, so
/// the process charged most often is the last one it would evict.
#[inline(always)]
pub fn charge(stat: u32, tgid: u32) {
    count(stat);
    let key = OffenderKey { stat, tgid };
    if OFFENDERS.get_ptr_mut(&key).is_none() {
        let _ = OFFENDERS.insert(&key, &0u64, BPF_NOEXIST);
    }
    if let Some(n) = OFFENDERS.get_ptr_mut(&key) {
        unsafe { atomic_add(n, 1) };
    }
}

/// The load of `master`, created empty on first use. None only if the
/// map refused both the insert and the lookup; the caller then lets the
/// process through, as it did before quotas.
#[inline(always)]
fn load_of(master: u32) -> Option<*mut MasterLoad> {
    if let Some(l) = MASTER_LOAD.get_ptr_mut(&master) {
        return Some(l);
    }
    let _ = MASTER_LOAD.insert(&master, &MasterLoad::default(), BPF_NOEXIST);
    MASTER_LOAD.get_ptr_mut(&master)
}

/// Whether a count has reached its limit. Counts are read signed: a race
/// between the kernel's add and user space's rewrite can take one below
/// zero, and that must not read as "full".
#[inline(always)]
fn at_limit(n: u64, limit: u64) -> bool {
    limit != UNSET && n as i64 >= limit as i64
}

/// Room for one more process of `master`: the caller counts it with
/// [`took_proc`] once its `WATCHED` insert succeeded.
#[inline(always)]
pub fn room_for_proc(master: u32) -> Option<*mut MasterLoad> {
    let l = load_of(master)?;
    if at_limit(unsafe { (*l).procs }, cfg(&CONFIG.quotas.procs_per_master)) {
        return None;
    }
    Some(l)
}

#[inline(always)]
pub fn took_proc(l: *mut MasterLoad) {
    unsafe { atomic_add(&raw mut (*l).procs, 1) };
}

/// A counted process of `master` is gone.
#[inline(always)]
pub fn released_proc(master: u32) {
    if let Some(l) = MASTER_LOAD.get_ptr_mut(&master) {
        unsafe { atomic_add(&raw mut (*l).procs, u64::MAX) };
    }
}

/// Room for one more `INFLIGHT` entry of `master`'s threads.
#[inline(always)]
pub fn room_for_thread(master: u32) -> Option<*mut MasterLoad> {
    let l = load_of(master)?;
    if at_limit(
        unsafe { (*l).threads },
        cfg(&CONFIG.quotas.threads_per_master),
    ) {
        return None;
    }
    Some(l)
}

#[inline(always)]
pub fn took_thread(l: *mut MasterLoad) {
    unsafe { atomic_add(&raw mut (*l).threads, 1) };
}

/// A counted `INFLIGHT` entry of `master` was removed.
#[inline(always)]
pub fn released_thread(master: u32) {
    if let Some(l) = MASTER_LOAD.get_ptr_mut(&master) {
        unsafe { atomic_add(&raw mut (*l).threads, u64::MAX) };
    }
}

/// Spends one event of `tgid`'s bucket: false, counted as
/// `stat::RATE_LIMITED` and charged to it, when the bucket is empty. Two
/// CPUs refilling one bucket at once can grant an event or two more than
/// the rate: it bounds a flood, it does not meter.
#[inline(always)]
pub fn spend_token(tgid: u32) -> bool {
    let cost = cfg(&CONFIG.quotas.event_cost_ns);
    if cost == UNSET {
        return true;
    }
    let burst = cfg(&CONFIG.quotas.event_burst_ns);
    let now = unsafe { bpf_ktime_get_ns() };
    if BUCKETS.get_ptr_mut(&tgid).is_none() {
        let full = Bucket {
            credit_ns: burst,
            last_ns: now,
        };
        let _ = BUCKETS.insert(&tgid, &full, BPF_NOEXIST);
    }
    let Some(b) = BUCKETS.get_ptr_mut(&tgid) else {
        return true;
    };
    let b = unsafe { &mut *b };
    let credit = b
        .credit_ns
        .saturating_add(now.saturating_sub(b.last_ns))
        .min(burst);
    b.last_ns = now;
    if credit < cost {
        b.credit_ns = credit;
        charge(stat::RATE_LIMITED, tgid);
        return false;
    }
    b.credit_ns = credit - cost;
    true
}
