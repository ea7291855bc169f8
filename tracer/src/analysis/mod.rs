//! The pure analysis: kernel events and in-flight samples in, reports and
//! ranked findings out. No I/O: /proc lookups go through [`Enricher`], so
//! tests feed it synthetic input.
//!
//! - `correlator`: the per-process state and the dispatch of kernel events;
//! - `lifecycle`: forks, exits, and Gunicorn's WORKER TIMEOUT signals;
//! - `exits`: why a process exited (OOM kill, whose signal, --max-requests);
//! - `stalls`: blocked syscalls, from first report to their end;
//! - `cpu`: loops that keep the CPU: a worker's heartbeat stops while its
//!   loop thread runs;
//! - `spin`: loops that keep the CPU, from two stack samples in the same
//!   request handler while the loop thread never sleeps;
//! - `closes`: connections that ended badly;
//! - `races`: requests lost to keep-alive races;
//! - `hung`: requests unanswered while their worker lives;
//! - `requests`: whether a blocked thread other than the loop's holds one;
//! - `signatures`: known causes, as data;
//! - `syscalls`: names and classes of syscalls;
//! - `summary`: the state of every process and the findings ranked by harm.
mod closes;
mod correlator;
mod cpu;
mod exits;
pub mod frames;
mod hung;
mod lifecycle;
mod races;
mod requests;
pub mod signatures;
mod spin;
mod stalls;
mod summary;
pub mod syscalls;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod frame_signature_tests;
#[cfg(test)]
mod request_tests;
#[cfg(test)]
mod signature_tests;
#[cfg(test)]
mod stall_model_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod timeout_tests;

pub use correlator::{Correlator, NewProcess};
pub use lifecycle::SAME_START_NS;
pub use spin::StackSample;

use crate::model::{
    BlockedThread, Container, FdInfo, MemoryCgroup, SockSnapshot, ThreadCpu, ThreadNow,
};

/// /proc lookups: for a stall being reported, for a call the kernel left
/// open, and a worker's heartbeat a few times a second. The defaults say
/// "not known", for fakes that do not need them.
pub trait Enricher {
    fn fd_info(&mut self, _pid: u32, _fd: i32) -> FdInfo {
        FdInfo::unknown()
    }
    fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
        None
    }
    fn comm(&mut self, _pid: u32) -> String {
        String::new()
    }
    /// The container and pod of a process, if it runs in one.
    fn container(&mut self, _pid: u32) -> Option<Container> {
        None
    }
    /// The memory cgroup whose limit applies to a process, with its usage
    /// (read when the OOM killer chose it).
    /// `cgroups`: the process's /proc/PID/cgroup as read earlier (an OOM
    /// victim's, as its event arrived), else it is read now.
    fn memory_cgroup(&mut self, _pid: u32, _cgroups: Option<&str>) -> Option<MemoryCgroup> {
        None
    }
    /// Which of `pids` holds the socket with this inode, and as which fd
    /// (read for a hung request only).
    fn socket_owner(&mut self, _inode: u64, _pids: &[u32]) -> Option<(u32, i32)> {
        None
    }
    /// The connections worker `pid` (of `master`) holds on the ports they
    /// listen on, as the kernel's socket diagnostics show them now; None
    /// when they cannot be seen.
    fn served_connections(&mut self, _pid: u32, _master: u32) -> Option<Vec<SockSnapshot>> {
        None
    }
    /// The threads of `pid` blocked in a syscall on an fd, other than an
    /// event loop's wait.
    fn blocked_threads(&mut self, _pid: u32) -> Vec<BlockedThread> {
        Vec::new()
    }
    /// The name of thread `tid` of `pid`.
    fn thread_name(&mut self, _pid: u32, tid: u32) -> String {
        self.comm(tid)
    }
    /// The other end of a socket fd (`10.0.3.7:5432`, `unix`).
    fn socket_peer(&mut self, _pid: u32, _fd: i32) -> Option<String> {
        None
    }
    /// The fds a multiplexer call (`poll`, `select`, `epoll_wait`...) of a
    /// blocked thread waits on.
    fn multiplexer_fds(&mut self, _pid: u32, _tid: u32, _syscall: &str, _arg0: u64) -> Vec<i32> {
        Vec::new()
    }
    fn thread_now(&mut self, _pid: u32, _tid: u32) -> ThreadNow {
        ThreadNow::Running
    }
    fn thread_cpu(&mut self, _pid: u32, _tid: u32) -> Option<ThreadCpu> {
        None
    }
    /// `thread_cpu` of a thread running now (state R); None when it is
    /// asleep or cannot be read. Looked up for every worker's loop thread
    /// a few times a second: an asleep thread costs one read of its stat.
    fn running_thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        self.thread_cpu(pid, tid).filter(|c| c.on_cpu)
    }
    /// How many threads the process has now.
    fn thread_count(&mut self, _pid: u32) -> Option<u32> {
        None
    }
    /// How long ago the process was forked.
    fn process_age_ms(&mut self, _pid: u32) -> Option<u64> {
        None
    }
    /// When the process that has this pid now started, in the kernel's
    /// event clock (to a clock tick).
    fn process_start_ns(&mut self, _pid: u32) -> Option<u64> {
        None
    }
}
