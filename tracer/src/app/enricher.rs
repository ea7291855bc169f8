//! The session's /proc lookups (`analysis::Enricher`): what a stall, a
//! new process or a hung request needs from the host, each bounded, off
//! the session's thread where a read can block.
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::analysis::{Enricher, syscalls};
use crate::host::holders::HolderSearch;
use crate::host::waits::{self, Multiplexer};
use crate::host::{bounded, container, heartbeat, memcg, proc, threads};
use crate::model::{BlockedThread, Container, FdInfo, MemoryCgroup, Role, ThreadCpu, ThreadNow};

/// Threads of a process whose syscall is read for a hung request, at most.
const MAX_THREADS_EXAMINED: usize = 1024;

/// How long the session waits for a /proc read that can block (see
/// `host::bounded`): a process's memory map lock, a hung mount in its root.
const PROC_DEADLINE: Duration = Duration::from_millis(500);

/// /proc lookups for stalls being reported and processes being added.
pub struct ProcEnricher {
    pub heartbeats: heartbeat::Heartbeats,
    pub pods_dir: Arc<PathBuf>,
    holders: HolderSearch,
}

impl ProcEnricher {
    pub fn new(pods_dir: PathBuf) -> ProcEnricher {
        ProcEnricher {
            heartbeats: Default::default(),
            pods_dir: Arc::new(pods_dir),
            holders: HolderSearch::new(Instant::now()),
        }
    }

    /// Pipe-holder searches skipped because their budget was spent.
    pub fn holders_unsearched(&self) -> u64 {
        self.holders.skipped()
    }
}

/// The container of `pid`, read off the session's thread with a deadline.
pub fn container_of(pid: u32, pods_dir: &Arc<PathBuf>) -> Option<Container> {
    let dir = pods_dir.clone();
    bounded::call(PROC_DEADLINE, move || container::of_process(pid, &dir))
        .ok()
        .flatten()
}

/// How a multiplexer names its fds, from its name.
fn multiplexer(name: &str) -> Option<Multiplexer> {
    if syscalls::EPOLL_WAITS.contains(&name) {
        Some(Multiplexer::Epoll)
    } else if syscalls::POLLS.contains(&name) {
        Some(Multiplexer::Poll)
    } else if syscalls::SELECTS.contains(&name) {
        Some(Multiplexer::Select)
    } else {
        None
    }
}

impl Enricher for ProcEnricher {
    /// The holder search is paced (see `host::holders`): a process that
    /// keeps blocking on pipes cannot make the session walk the host's fds
    /// for each of its stalls.
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
        let what = bounded::call(PROC_DEADLINE, move || proc::fd_target_kind(pid, fd));
        let Ok(Some((target, kind))) = what else {
            return FdInfo::unknown();
        };
        if !kind.is_pipe_like() {
            return proc::with_holders(kind, target, None);
        }
        let search = |budget: Duration| {
            let t = target.clone();
            bounded::call(budget + PROC_DEADLINE, move || {
                proc::holders(&t, (pid, fd), budget)
            })
            .unwrap_or_default()
        };
        let found = self.holders.find(Instant::now(), pid, fd, &target, search);
        proc::with_holders(kind, target, found)
    }
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64> {
        // A readlink and a statx without sync: neither waits on the file.
        self.heartbeats.age_ms(pid)
    }
    fn comm(&mut self, pid: u32) -> String {
        proc::comm(pid)
    }
    fn container(&mut self, pid: u32) -> Option<Container> {
        container_of(pid, &self.pods_dir)
    }
    fn thread_name(&mut self, pid: u32, tid: u32) -> String {
        threads::thread_name(pid, tid)
    }
    fn socket_peer(&mut self, pid: u32, fd: i32) -> Option<String> {
        proc::socket_peer(pid, fd)
    }
    fn multiplexer_fds(&mut self, pid: u32, tid: u32, syscall: &str, arg0: u64) -> Vec<i32> {
        match (multiplexer(syscall), syscalls::number(syscall)) {
            (Some(kind), Some(nr)) => waits::multiplexer_fds(pid, tid, kind, nr, arg0),
            _ => Vec::new(),
        }
    }
    fn thread_now(&mut self, pid: u32, tid: u32) -> ThreadNow {
        threads::thread_now(pid, tid)
    }
    fn thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        threads::thread_cpu(pid, tid)
    }
    fn running_thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        threads::running_thread_cpu(pid, tid)
    }
    fn process_age_ms(&mut self, pid: u32) -> Option<u64> {
        threads::process_age_ms(pid)
    }
    fn process_start_ns(&mut self, pid: u32) -> Option<u64> {
        threads::process_start_ns(pid)
    }
    fn thread_count(&mut self, pid: u32) -> Option<u32> {
        threads::thread_count(pid)
    }
    fn memory_cgroup(&mut self, pid: u32, cgroups: Option<&str>) -> Option<MemoryCgroup> {
        match cgroups {
            Some(text) => memcg::of_cgroups(text),
            None => memcg::of_process(pid),
        }
    }
    /// Walks the candidates' fd tables, which their owners size: on a
    /// helper thread, so a huge one delays only this answer.
    fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
        let pids = pids.to_vec();
        bounded::call(PROC_DEADLINE, move || {
            pids.iter()
                .find_map(|&pid| proc::socket_fd(pid, inode).map(|fd| (pid, fd)))
        })
        .ok()
        .flatten()
    }
    /// Of the first `MAX_THREADS_EXAMINED` threads: a process sizes its
    /// thread count, and each costs a read of /proc.
    fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread> {
        proc::threads(pid)
            .into_iter()
            .take(MAX_THREADS_EXAMINED)
            .filter_map(|tid| {
                let (nr, args) = threads::thread_syscall(pid, tid)?;
                let name = syscalls::name(nr).into_owned();
                // On an fd, and not a wait for work (what a plain process's
                // stall would be).
                if !syscalls::takes_fd(&name) || !syscalls::is_stall(Role::Plain, true, nr, None) {
                    return None;
                }
                let fd = args[0] as i32;
                Some(BlockedThread {
                    tid,
                    comm: proc::comm(tid),
                    syscall: name,
                    fd: Some(fd),
                    fd_target: proc::fd_target(pid, fd),
                })
            })
            .collect()
    }
}
