//! Plain data shared by the correlator, enrichment and output.
use serde::Serialize;

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
    pub fn from_kernel(v: u32) -> Role {
        match v {
            tracer_common::role::MASTER => Role::Master,
            tracer_common::role::WORKER => Role::Worker,
            tracer_common::role::CHILD => Role::Child,
            _ => Role::Plain,
        }
    }

    pub fn to_kernel(self) -> u32 {
        match self {
            Role::Master => tracer_common::role::MASTER,
            Role::Worker => tracer_common::role::WORKER,
            Role::Child => tracer_common::role::CHILD,
            Role::Plain => tracer_common::role::PLAIN,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Master => "master",
            Role::Worker => "worker",
            Role::Plain => "process",
            Role::Child => "child",
        }
    }
}

/// One process holding the other end of a pipe or socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub pid: u32,
    pub comm: String,
    pub fd: i32,
    /// `read`, `write` or `both`.
    pub end: &'static str,
}

/// What an fd is, learnt from /proc when a stall is reported.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct FdInfo {
    /// `pipe`, `socket`, `file`, `tty`, `device`, `eventfd`, `epoll`, ... or `unknown`.
    pub kind: String,
    /// The /proc/PID/fd link target, such as `pipe:[1234]`.
    pub target: Option<String>,
    /// For a pipe: every other holder of the pipe, and the blocked process's
    /// own other fds on it.
    pub peers: Vec<Peer>,
}

impl FdInfo {
    pub fn unknown() -> FdInfo {
        FdInfo {
            kind: "unknown".into(),
            ..Default::default()
        }
    }
}
