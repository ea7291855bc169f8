//! The kernel side seen from user space: BTF (what this kernel looks
//! like), loading and attaching the BPF programs, and decoding what
//! they send. Depends on `model` only.
mod batch;
pub mod btf;
pub mod decode;
pub mod intake;
mod layout;
mod loader;
mod reset;
pub mod support;
mod watched_tgids;

pub use loader::{LoadOptions, Probes, SyscallTable, bench_floor, load, quotas};
