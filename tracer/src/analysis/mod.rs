//! The pure analysis: kernel events and in-flight samples in, reports and
//! ranked findings out. No I/O: /proc lookups go through [`Enricher`], so
//! tests feed it synthetic input.
//!
//! - `correlator`: the per-process state and the dispatch of kernel events;
//! - `lifecycle`: forks, exits, and Gunicorn's WORKER TIMEOUT signals;
//! - `exits`: why a process exited (OOM kill, whose signal, --max-requests);
//! - `stalls`: blocked syscalls, from first report to their end;
//! - `closes`: connections that ended badly;
//! - `races`: requests lost to keep-alive races;
//! - `hung`: requests unanswered while their worker lives;
//! - `signatures`: known causes, as data;
//! - `syscalls`: names and classes of syscalls;
//! - `summary`: the state of every process and the findings ranked by harm.
mod closes;
mod correlator;
mod exits;
mod hung;
mod lifecycle;
mod races;
pub mod signatures;
mod stalls;
mod summary;
pub mod syscalls;

#[cfg(test)]
mod tests;

pub use closes::format_sockaddr;
pub use correlator::{Correlator, NewProcess};

use crate::model::{BlockedThread, Container, FdInfo, MemoryCgroup};

/// /proc lookups, done only for a stall being reported.
pub trait Enricher {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo;
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64>;
    fn comm(&mut self, pid: u32) -> String;
    /// The container and pod of a process, if it runs in one.
    fn container(&mut self, pid: u32) -> Option<Container>;
    /// The memory cgroup whose limit applies to a process, with its usage
    /// (read when the OOM killer chose it).
    fn memory_cgroup(&mut self, pid: u32) -> Option<MemoryCgroup>;
    /// Which of `pids` holds the socket with this inode, and as which fd
    /// (read for a hung request only).
    fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)>;
    /// The threads of `pid` blocked in a syscall on an fd, other than an
    /// event loop's wait.
    fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread>;
}
