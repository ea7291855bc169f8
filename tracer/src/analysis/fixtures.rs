//! What the correlator's tests share: the ids of a scripted Gunicorn and
//! the /proc answers more than one fake enricher gives. Each test file
//! keeps its own fake, for what its script needs the host to look like.
use crate::model::{
    BlockedThread, End, FdInfo, FdKind, MemoryCgroup, Peer, SockSnapshot, TcpState,
};

pub const MS: u64 = 1_000_000;
pub const MASTER: u32 = 100;
/// The first worker.
pub const W: u32 = 101;

/// A pipe `pid` holds the only write end of (fd 12): a read on it can
/// never return.
pub fn self_pipe(pid: u32) -> FdInfo {
    FdInfo {
        kind: FdKind::Pipe,
        target: Some("pipe:[777]".into()),
        peers: vec![Peer {
            pid,
            comm: "gunicorn".into(),
            fd: 12,
            end: End::Write,
        }],
        peers_omitted: 0,
        peers_complete: true,
    }
}

/// A socket, its peer not looked up.
pub fn socket(inode: u64) -> FdInfo {
    FdInfo {
        kind: FdKind::Socket,
        target: Some(format!("socket:[{inode}]")),
        peers: vec![],
        peers_omitted: 0,
        peers_complete: true,
    }
}

/// A memory cgroup at its limit: /web, 400 MiB of 400.
pub fn full_cgroup() -> MemoryCgroup {
    MemoryCgroup {
        path: "/web".into(),
        limit_bytes: Some(400 << 20),
        usage_bytes: Some(400 << 20),
    }
}

/// Socket inode N belongs to the worker whose pid is N / 1000, as fd 9.
pub fn owner_by_inode(inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
    let pid = (inode / 1000) as u32;
    pids.contains(&pid).then_some((pid, 9))
}

/// Thread pid + 1 of `pid`, blocked reading `self_pipe` (fd 11).
pub fn pipe_reader(pid: u32) -> Vec<BlockedThread> {
    vec![BlockedThread {
        tid: pid + 1,
        comm: "gunicorn".into(),
        syscall: "read".into(),
        fd: Some(11),
        fd_target: Some("pipe:[777]".into()),
    }]
}

/// A client connection to port 8000 whose request came in `recv_ms` ago
/// and got nothing back.
pub fn unanswered(inode: u64, recv_ms: u32) -> SockSnapshot {
    SockSnapshot {
        inode,
        state: TcpState::Established,
        local_port: 8000,
        peer: "10.0.0.9:40000".into(),
        unread_bytes: 0,
        has_info: true,
        last_data_sent_ms: recv_ms,
        last_data_recv_ms: recv_ms,
        bytes_acked: 0,
        bytes_received: 92,
    }
}
