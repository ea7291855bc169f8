//! Kernel side of the tracer: tracepoint programs only, none on the syscall
//! path. What each program watches and why: docs/design.md. Layout: maps,
//! config (set by the loader), helpers, then one module per program family.
#![no_std]
#![no_main]
// For an atomic add: see helpers::atomic_add.
#![feature(core_intrinsics)]
#![allow(internal_features)]

mod config;
mod floor;
mod helpers;
mod lifecycle;
mod maps;
mod quota;
mod scheduler;
mod tcp;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
