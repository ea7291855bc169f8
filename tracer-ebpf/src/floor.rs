//! Not part of the tracer: `cargo xtask bench`'s floor for BTF-typed
//! tracepoints. The tracer's own `sched_switch` is a BTF tracepoint, so the
//! fair floor for it is an empty program of the same kind, with the same
//! pid test the classic floor (bpftrace's) makes and never passes. It is
//! loaded only by `tracer __bench-floor`, never by a tracing session.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid, macros::btf_tracepoint, programs::BtfTracePointContext,
};

/// A tgid no process has (pid_max is at most 2^22).
const NO_TGID: u64 = 2_147_483_646;

#[btf_tracepoint(function = "sched_switch")]
pub fn floor_sched_switch(_ctx: BtfTracePointContext) -> i32 {
    match try_floor() {
        Ok(()) | Err(()) => 0,
    }
}

fn try_floor() -> Result<(), ()> {
    if bpf_get_current_pid_tgid() >> 32 == NO_TGID {
        return Err(());
    }
    Ok(())
}
