//! The session's /proc lookups (`analysis::Enricher`): what a stall, a
//! new process or a hung request needs from the host, each bounded, off
//! the session's thread where a read can block.
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::sockets::SocketWatch;
use crate::analysis::{Enricher, SAME_START_NS, syscalls};
use crate::host::holders::HolderSearch;
use crate::host::waits::{self, Multiplexer};
use crate::host::{bounded, container, heartbeat, memcg, proc, threads};
use crate::model::{
    BlockedThread, Container, FdInfo, MemoryCgroup, Role, SockSnapshot, ThreadCpu, ThreadNow,
};

/// Threads of a process whose syscall is read for a hung request, at most.
const MAX_THREADS_EXAMINED: usize = 1024;

/// How long the session waits for a /proc read that can block (see
/// `host::bounded`): a process's memory map lock, a hung mount in its root.
const PROC_DEADLINE: Duration = Duration::from_millis(500);

/// /proc lookups for stalls being reported and processes being added.
pub struct ProcEnricher {
    pub heartbeats: heartbeat::Heartbeats,
    /// Connections on watched ports: scanned for hung requests, and asked
    /// about one worker when a loop rule needs to know it served requests.
    pub sockets: SocketWatch,
    pub pods_dir: Arc<PathBuf>,
    holders: HolderSearch,
    /// When each watched process started (kernel clock): a read about a
    /// pid is kept only while the pid still has that start, so a pid freed
    /// and reused by another process never lends it its data.
    starts: HashMap<u32, u64>,
}

impl ProcEnricher {
    pub fn new(pods_dir: PathBuf, sockets: SocketWatch) -> ProcEnricher {
        ProcEnricher {
            heartbeats: Default::default(),
            sockets,
            pods_dir: Arc::new(pods_dir),
            holders: HolderSearch::new(Instant::now()),
            starts: HashMap::new(),
        }
    }

    /// Records that `pid` is the process started at `start_ns` (its fork
    /// event's time, or its start read when it was found).
    pub fn remember(&mut self, pid: u32, start_ns: u64) {
        self.starts.insert(pid, start_ns);
    }

    /// Records `pid` as the process that has it now (one found by a scan).
    pub fn remember_now(&mut self, pid: u32) {
        if let Some(start) = threads::process_start_ns(pid) {
            self.starts.insert(pid, start);
        }
    }

    pub fn forget(&mut self, pid: u32) {
        self.starts.remove(&pid);
    }

    /// Whether `pid` still belongs to the process recorded for it (true
    /// for a pid never recorded: nothing to hold it to).
    fn still(&self, pid: u32) -> bool {
        match self.starts.get(&pid) {
            None => true,
            Some(&start) => threads::process_start_ns(pid)
                .is_some_and(|now| now.abs_diff(start) <= SAME_START_NS),
        }
    }

    /// `read` about `pid`, or `unknown` when the pid has been another
    /// process's since it was recorded: checked before (no read is made
    /// for a stranger) and after (a reuse during the read is caught; the
    /// start time of a pid only changes when it is reused).
    fn of_same<T>(&mut self, pid: u32, unknown: T, read: impl FnOnce(&mut Self) -> T) -> T {
        if !self.still(pid) {
            return unknown;
        }
        let found = read(self);
        if self.still(pid) { found } else { unknown }
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
        self.of_same(pid, FdInfo::unknown(), |s| s.fd_info_now(pid, fd))
    }
    /// Asked for every worker a few times a second: checked after the read
    /// only, as `running_thread_cpu` is. A readlink and a statx without
    /// sync: neither waits on the file.
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64> {
        self.heartbeats.age_ms(pid).filter(|_| self.still(pid))
    }
    fn comm(&mut self, pid: u32) -> String {
        self.of_same(pid, String::new(), |_| proc::comm(pid))
    }
    fn container(&mut self, pid: u32) -> Option<Container> {
        self.of_same(pid, None, |s| container_of(pid, &s.pods_dir))
    }
    fn thread_name(&mut self, pid: u32, tid: u32) -> String {
        self.of_same(pid, String::new(), |_| threads::thread_name(pid, tid))
    }
    fn socket_peer(&mut self, pid: u32, fd: i32) -> Option<String> {
        self.of_same(pid, None, |_| proc::socket_peer(pid, fd))
    }
    fn multiplexer_fds(&mut self, pid: u32, tid: u32, syscall: &str, arg0: u64) -> Vec<i32> {
        let read = |_: &mut Self| match (multiplexer(syscall), syscalls::number(syscall)) {
            (Some(kind), Some(nr)) => waits::multiplexer_fds(pid, tid, kind, nr, arg0),
            _ => Vec::new(),
        };
        self.of_same(pid, Vec::new(), read)
    }
    fn thread_now(&mut self, pid: u32, tid: u32) -> ThreadNow {
        self.of_same(pid, ThreadNow::Gone, |_| threads::thread_now(pid, tid))
    }
    fn thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        self.of_same(pid, None, |_| threads::thread_cpu(pid, tid))
    }
    /// Asked for every worker's loop thread a few times a second: checked
    /// after the read only, which is enough (see `of_same`), and costs one
    /// stat read more, not two.
    fn running_thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        threads::running_thread_cpu(pid, tid).filter(|_| self.still(pid))
    }
    fn process_age_ms(&mut self, pid: u32) -> Option<u64> {
        threads::process_age_ms(pid)
    }
    fn process_start_ns(&mut self, pid: u32) -> Option<u64> {
        threads::process_start_ns(pid)
    }
    fn thread_count(&mut self, pid: u32) -> Option<u32> {
        self.of_same(pid, None, |_| threads::thread_count(pid))
    }
    fn memory_cgroup(&mut self, pid: u32, cgroups: Option<&str>) -> Option<MemoryCgroup> {
        match cgroups {
            Some(text) => memcg::of_cgroups(text),
            None => self.of_same(pid, None, |_| memcg::of_process(pid)),
        }
    }
    /// Walks the candidates' fd tables, which their owners size: on a
    /// helper thread, so a huge one delays only this answer.
    fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
        let pids = pids.to_vec();
        let found = bounded::call(PROC_DEADLINE, move || {
            pids.iter()
                .find_map(|&pid| proc::socket_fd(pid, inode).map(|fd| (pid, fd)))
        })
        .ok()
        .flatten();
        found.filter(|(pid, _)| self.still(*pid))
    }
    fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread> {
        self.of_same(pid, Vec::new(), |_| blocked_threads_now(pid))
    }
    /// The worker's fd table (its owner sizes it) is read on a helper
    /// thread, as for `socket_owner`.
    fn served_connections(&mut self, pid: u32, master: u32) -> Option<Vec<SockSnapshot>> {
        let inodes = bounded::call(PROC_DEADLINE, move || proc::socket_inodes(pid))
            .ok()
            .flatten()?;
        let conns = self.sockets.of_worker(pid, master, &inodes)?;
        self.still(pid).then_some(conns)
    }
}

impl ProcEnricher {
    /// The holder search is paced (see `host::holders`): a process that
    /// keeps blocking on pipes cannot make the session walk the host's fds
    /// for each of its stalls.
    fn fd_info_now(&mut self, pid: u32, fd: i32) -> FdInfo {
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
}

/// Of the first `MAX_THREADS_EXAMINED` threads: a process sizes its
/// thread count, and each costs a read of /proc.
fn blocked_threads_now(pid: u32) -> Vec<BlockedThread> {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// This test's own process stands for a watched one; recording another
    /// start for its pid is what a reuse of the pid looks like from here.
    #[test]
    fn a_pid_that_is_no_longer_the_recorded_process_lends_nothing() {
        let me = std::process::id();
        let mut e = ProcEnricher::new(
            PathBuf::from("/nonexistent"),
            SocketWatch::new(Duration::from_secs(30)),
        );
        let start = threads::process_start_ns(me).expect("own start time");

        e.remember(me, start);
        assert!(!e.comm(me).is_empty(), "the same process is read");
        assert!(e.thread_count(me).is_some());
        assert_ne!(e.thread_now(me, me), ThreadNow::Gone);

        // Recorded as a process that started a second earlier: the pid is
        // someone else's now.
        e.remember(me, start - 1_000_000_000);
        assert_eq!(e.comm(me), "", "another process's name is not lent");
        assert_eq!(e.heartbeat_age_ms(me), None);
        assert_eq!(e.thread_name(me, me), "");
        assert_eq!(e.thread_count(me), None);
        assert_eq!(e.thread_now(me, me), ThreadNow::Gone);
        assert_eq!(e.thread_cpu(me, me), None);
        assert_eq!(e.running_thread_cpu(me, me), None);
        assert!(e.blocked_threads(me).is_empty());
        assert_eq!(e.fd_info(me, 0), FdInfo::unknown());

        // Within a clock tick or so of the fork: the same process.
        e.remember(me, start + 20_000_000);
        assert!(!e.comm(me).is_empty());
        // Never recorded (or forgotten): read as before.
        e.forget(me);
        assert!(!e.comm(me).is_empty());
    }
}
