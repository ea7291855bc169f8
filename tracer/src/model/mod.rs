//! Plain data shared by analysis, presentation and the app: what a process
//! is, what an fd is, what the kernel said, and what the tracer reports.
//! No I/O and no policy here; every other room depends on this one.
use serde::Serialize;

mod event;
mod pystack;
mod report;
mod settings;
mod summary;

pub use event::{
    AnsweredClose, ClosedConn, KernelEvent, RaceReset, Sample, SockSnapshot, TcpState, ThreadCpu,
    ThreadNow, Wake, WokeBy,
};
pub use pystack::{PyFrame, PyStackCost, PyThread};
pub use report::{
    Basis, BlockedThread, Cause, CauseEvidence, CitedFrame, CloseCounts, CloseKind, Direction,
    Dying, EarlyClose, EndedBy, ExitCause, ExitReport, HungOutcome, HungRequest, NoWriterThread,
    OnCpuEvidence, OomKill, Outcome, Output, Preceded, Sender, Source, StallReport, StallState,
};
pub use settings::{
    MasterConfig, MasterSettings, Setting, SettingSource, WorkerClass, version_string,
};
pub use summary::{
    FeaturesMissing, Finding, Losses, MapOccupancy, Offender, Summary, TopOffenders, WorkerState,
    WorkerSummary,
};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Master,
    Worker,
    /// A process given with --pid that is not part of Gunicorn.
    #[default]
    #[serde(rename = "process")]
    Plain,
    /// A process forked by a worker or by a plain process.
    Child,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Worker => "worker",
            Role::Plain => "process",
            Role::Child => "child",
        }
    }
}

/// How the kernel is to treat a syscall a thread sleeps in, by user
/// space's lists (`analysis::syscalls::class_table`). All false, the
/// default, means "may block on something it does not own", so a syscall
/// the table does not know is never missed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyscallClass {
    /// A multiplexer or a signal wait (epoll_wait, poll, select, pause,
    /// ...): idle, unless it is a Gunicorn worker's loop thread waiting
    /// outside its event loop's own wait.
    pub wait: bool,
    /// Reads from fd arg0 (read, recvfrom, ...): goes into the read histogram.
    pub read: bool,
    /// An epoll wait: arg0 is the epoll fd.
    pub epoll: bool,
    /// select/pselect6: arg0 is nfds, arg1 the read set.
    pub select: bool,
    /// poll/ppoll: arg0 is the pollfd array, arg1 its length.
    pub poll: bool,
}

/// What an fd is, from its /proc link target and file mode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FdKind {
    Pipe,
    Fifo,
    Socket,
    File,
    Directory,
    Tty,
    Device,
    Eventfd,
    Epoll,
    Timerfd,
    Signalfd,
    Inotify,
    AnonInode,
    #[default]
    Unknown,
}

impl FdKind {
    pub fn as_str(self) -> &'static str {
        match self {
            FdKind::Pipe => "pipe",
            FdKind::Fifo => "fifo",
            FdKind::Socket => "socket",
            FdKind::File => "file",
            FdKind::Directory => "directory",
            FdKind::Tty => "tty",
            FdKind::Device => "device",
            FdKind::Eventfd => "eventfd",
            FdKind::Epoll => "epoll",
            FdKind::Timerfd => "timerfd",
            FdKind::Signalfd => "signalfd",
            FdKind::Inotify => "inotify",
            FdKind::AnonInode => "anon_inode",
            FdKind::Unknown => "unknown",
        }
    }

    /// Pipes and named pipes: a reader blocks until some holder writes.
    pub fn is_pipe_like(self) -> bool {
        matches!(self, FdKind::Pipe | FdKind::Fifo)
    }
}

/// Which way an fd was opened (from /proc/PID/fdinfo's flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum End {
    Read,
    Write,
    Both,
    Unknown,
}

/// One process holding the other end of a pipe or socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub pid: u32,
    pub comm: String,
    pub fd: i32,
    pub end: End,
}

impl Peer {
    /// Could write into the pipe (an unknown end counts: it might).
    pub fn may_write(&self) -> bool {
        self.end != End::Read
    }
}

/// What an fd is, learnt from /proc when a stall is reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FdInfo {
    pub kind: FdKind,
    /// The /proc/PID/fd link target, such as `pipe:[1234]`.
    pub target: Option<String>,
    /// For a pipe: other holders of the pipe, and the blocked process's own
    /// other fds on it; at most a few dozen, an outside writer always kept.
    pub peers: Vec<Peer>,
    /// Holders found beyond those listed in `peers`.
    pub peers_omitted: u64,
    /// Every other process was searched in full: no writer was missed.
    pub peers_complete: bool,
}

impl FdInfo {
    pub fn unknown() -> FdInfo {
        FdInfo::default()
    }

    /// For a pipe read by `pid`: true when no other process may write to it,
    /// so nothing outside the blocked process can ever wake the reader.
    /// None for anything that is not a pipe, and when the search for
    /// holders was cut short without finding another writer.
    pub fn only_reader_can_write(&self, pid: u32) -> Option<bool> {
        if !self.kind.is_pipe_like() {
            return None;
        }
        let alone = no_other_writer(&self.peers, pid);
        (!alone || self.peers_complete).then_some(alone)
    }
}

/// No process but `pid` holds a pipe end it may write through.
pub fn no_other_writer(peers: &[Peer], pid: u32) -> bool {
    !peers.iter().any(|p| p.pid != pid && p.may_write())
}

/// One fd a blocked call waits on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WaitFd {
    pub fd: i32,
    pub kind: FdKind,
    /// The /proc/PID/fd link target, such as `socket:[1234]`.
    pub target: Option<String>,
    /// For a socket: the other end (`10.0.3.7:5432`, `[::1]:80`, `unix`).
    pub peer: Option<String>,
}

impl WaitFd {
    /// The port of the other end, for an IP socket.
    pub fn peer_port(&self) -> Option<u16> {
        self.peer.as_deref()?.rsplit_once(':')?.1.parse().ok()
    }
}

/// A Gunicorn worker's event loop's own wait: the sleep that is never a
/// stall, however long. Found from /proc once the worker serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoopWait {
    /// An epoll wait on this epoll fd (gevent, gthread, Uvicorn/asyncio):
    /// the one whose interest list holds a listening socket.
    Epoll { epfd: i32 },
    /// select with this nfds and this read set (its first 64 fds): the sync
    /// worker's wait on its listeners and its pipe.
    Select { nfds: u32, fds: u64 },
}

impl LoopWait {
    /// Whether a multiplexer sleep of `name` with first argument `arg0` is
    /// this wait. (The kernel also compares select's read set.)
    pub fn is(&self, name: &str, arg0: u64) -> bool {
        match *self {
            LoopWait::Epoll { epfd } => name.starts_with("epoll_") && arg0 as i64 as i32 == epfd,
            LoopWait::Select { nfds, .. } => {
                matches!(name, "select" | "pselect6") && arg0 == u64::from(nfds)
            }
        }
    }
}

/// The container and pod a process runs in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Container {
    /// The full 64-hex container id.
    pub id: String,
    /// `containerd`, `cri-o`, `docker`, `podman`, or null when the path
    /// does not say.
    pub runtime: Option<&'static str>,
    pub pod_uid: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
    /// Where `pod` and `namespace` come from: `log_dir` (the kubelet's
    /// directory for the pod UID of the cgroup: authoritative) or
    /// `environment` (what the process itself claims); null when unknown.
    pub pod_source: Option<PodSource>,
}

/// See [`Container::pod_source`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PodSource {
    LogDir,
    Environment,
}

/// A memory cgroup's limit and usage, read from cgroupfs (v1 or v2).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemoryCgroup {
    /// As /proc/PID/cgroup names it.
    pub path: String,
    pub limit_bytes: Option<u64>,
    pub usage_bytes: Option<u64>,
}
