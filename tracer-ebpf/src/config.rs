//! The configuration user space sets once, before loading: the threshold,
//! syscall numbers, tracepoint field offsets (from tracefs) and kernel
//! struct offsets (from BTF). One struct shared with user space, so both
//! sides are type-checked.
use tracer_common::Config;

#[unsafe(no_mangle)]
pub static CONFIG: Config = Config::UNSET;

/// One value of [`CONFIG`]. Volatile so the compiler does not fold in the
/// default the object file carries: the loader replaces it.
#[inline(always)]
pub fn cfg(v: &u64) -> u64 {
    unsafe { core::ptr::read_volatile(v) }
}
