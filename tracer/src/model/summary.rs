//! The state of every watched process at a point in time, and the findings
//! ranked by harm. Presentation words them; metrics count them.
use serde::Serialize;

use std::collections::BTreeMap;

use super::{
    CloseCounts, Container, EarlyClose, ExitCause, ExitReport, HungRequest, Role, Setting,
    StallReport,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    Stalled,
    /// Holding a request past --request-threshold without an answer.
    HangingRequests,
    TimingOut,
    KilledByTimeout,
    /// Killed by the kernel's OOM killer.
    KilledByOom,
    Exited,
    DroppingRequests,
    Healthy,
}

impl WorkerState {
    pub fn as_str(self) -> &'static str {
        match self {
            WorkerState::Stalled => "stalled",
            WorkerState::HangingRequests => "hanging_requests",
            WorkerState::TimingOut => "timing_out",
            WorkerState::KilledByTimeout => "killed_by_timeout",
            WorkerState::KilledByOom => "killed_by_oom",
            WorkerState::Exited => "exited",
            WorkerState::DroppingRequests => "dropping_requests",
            WorkerState::Healthy => "healthy",
        }
    }

    /// Still running (metrics keep series only for these).
    pub fn is_alive(self) -> bool {
        !matches!(
            self,
            WorkerState::Exited | WorkerState::KilledByTimeout | WorkerState::KilledByOom
        )
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct WorkerSummary {
    pub pid: u32,
    pub master_pid: u32,
    pub role: Role,
    pub app: Option<String>,
    pub state: WorkerState,
    pub stalls: u32,
    pub timeouts: u32,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<String>,
    /// Why it exited (as in `worker_exit`), once it has.
    pub exit: Option<ExitReport>,
    /// The current stall, or the last one.
    pub stall: Option<StallReport>,
    /// The stall its last WORKER TIMEOUT was blamed on: one of its loop
    /// thread in the timeout window; None when none was seen (or no
    /// timeout).
    pub timeout_stall: Option<StallReport>,
    /// As `worker_timeout`'s `watched_ms`, for its last WORKER TIMEOUT.
    pub timeout_watched_ms: Option<u64>,
    pub early_closes: CloseCounts,
    /// The last dropped request or cut upstream call.
    pub last_early_close: Option<EarlyClose>,
    /// The last request lost to a keep-alive race on a connection it closed.
    pub last_keepalive_race: Option<EarlyClose>,
    /// Requests it held past --request-threshold without an answer.
    pub hung_requests: u32,
    /// The longest still hanging, else the last.
    pub hung_request: Option<HungRequest>,
    /// How many are hanging now.
    pub hanging_now: u32,
    /// For a live worker: its event loop's own wait was found. Until it is,
    /// a wait of its main thread in a multiplexer (poll, select, epoll) is
    /// not judged, so such a stall would not be seen. None for other
    /// processes and exited ones.
    pub loop_found: Option<bool>,
    pub container: Option<Container>,
    /// Its master's --timeout, when the tracer knows it (and from where):
    /// for the metrics. JSON gives it once per master, in `settings`.
    #[serde(skip)]
    pub timeout: Option<Setting<f64>>,
}

impl WorkerSummary {
    /// Its death is a finding of its own (a WORKER TIMEOUT, the OOM
    /// killer, a kill from outside): the requests it lost with it are told
    /// there, one story, rather than as drops of their own.
    pub fn death_tells_lost_requests(&self) -> bool {
        self.timeouts > 0
            || self.exit.as_ref().is_some_and(|e| {
                e.cause == crate::model::ExitCause::OomKill
                    || (e.cause == crate::model::ExitCause::ExternalSignal && e.is_finding())
            })
    }
}

/// One thing wrong, naming the process (an index into `Summary::workers`).
/// Findings come ranked by harm (see `analysis::summary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finding {
    /// A worker failed to boot or to load the app: the master halts.
    Halted(usize),
    /// Blocked right now (longest first).
    Stalled(usize),
    /// Held requests past --request-threshold without an answer (those
    /// hanging now first).
    HungRequests(usize),
    /// Killed by the kernel's OOM killer.
    OomKilled(usize),
    /// Killed by Gunicorn's WORKER TIMEOUT.
    KilledByTimeout(usize),
    /// Closed requests with nothing sent, or cut upstream calls (most first).
    Dropping(usize),
    /// Requests lost to keep-alive races on connections it closed.
    KeepaliveRaces(usize),
    /// Killed by a signal from outside Gunicorn (kill -9, a crash).
    KilledExternally(usize),
}

impl Finding {
    /// The index of the process it names in `Summary::workers`.
    pub fn worker(self) -> usize {
        match self {
            Finding::Halted(i)
            | Finding::Stalled(i)
            | Finding::HungRequests(i)
            | Finding::OomKilled(i)
            | Finding::KilledByTimeout(i)
            | Finding::Dropping(i)
            | Finding::KeepaliveRaces(i)
            | Finding::KilledExternally(i) => i,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Summary {
    pub workers: Vec<WorkerSummary>,
    /// Processes that exited with nothing to report (not listed in `workers`).
    pub exited_quiet: u64,
    pub findings: Vec<Finding>,
    /// The stall threshold, for saying what "healthy" was measured against.
    pub threshold_ms: u64,
    /// Every exit seen, by cause, including processes no longer listed.
    pub exits: BTreeMap<ExitCause, u64>,
}

/// Entries in the kernel's maps.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MapOccupancy {
    /// Processes watched.
    pub watched: usize,
    /// Threads with an in-flight syscall record.
    pub inflight: usize,
    /// Connections being counted.
    pub conns: usize,
}

/// What this kernel does not let the tracer see, decided when its programs
/// were attached: each true is a kind of finding (or a field) never
/// reported on this host, said rather than left silent.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct FeaturesMissing {
    /// No usable `oom:mark_victim`: an OOM kill is told as a plain SIGKILL.
    pub oom_kill: bool,
    /// Neither a usable `tcp:tcp_send_reset` nor a kprobe on
    /// `tcp_v4_send_reset` to stand in for it (Linux 6.1's tracepoint has
    /// an older record and never fires for the reset a keep-alive race
    /// gets; the kprobe sees it): requests lost to keep-alive races are not
    /// seen.
    pub keepalive_race: bool,
    /// No `sock:sock_recv_length` (before Linux 6.3): `early_close`'s
    /// `preceded_by` is always null.
    pub preceded_by: bool,
}

impl FeaturesMissing {
    /// (feature, missing) for each, in a fixed order: the metric's labels.
    pub fn each(&self) -> [(&'static str, bool); 3] {
        [
            ("oom_kill", self.oom_kill),
            ("keepalive_race", self.keepalive_race),
            ("preceded_by", self.preceded_by),
        ]
    }
}

/// What the tracer could not see, counted since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Losses {
    /// What this kernel does not show at all (JSON: `features_missing`).
    pub features_missing: FeaturesMissing,
    /// Kernel events dropped because the ring buffer was full.
    pub events_lost: u64,
    /// Forks not followed because the kernel's `WATCHED` map was full.
    pub watch_full: u64,
    /// Connections whose start could not be recorded (`CONNS` insert failed).
    pub conns_untracked: u64,
    /// Thread sleeps not recorded because the kernel's `INFLIGHT` map was
    /// full: a stall in one would not be seen.
    pub inflight_full: u64,
    /// Connections closed whose byte counters the kernel could not read:
    /// whether a request was dropped on one is not known.
    pub conns_unreadable: u64,
    /// Reported stalls whose call vanished from the kernel's in-flight map
    /// with no event saying how it ended (`stall_end` outcome `unknown`).
    pub stall_ends_unknown: u64,
    /// Listening ports past the 64 scanned per network namespace at the
    /// last socket scan: a request hung on one is not seen.
    pub ports_unscanned: u64,
    /// Stalls not reported: their master had more new stalls between two
    /// polls than the session reports at once (8, other than its workers'
    /// loop threads), and they were over before their turn came.
    pub stalls_held_back: u64,
    /// Stalls on a pipe reported without the pipe's holders: the search's
    /// time budget was spent (a flood of such stalls), so who could write
    /// to it is not known for them.
    pub holders_unsearched: u64,
    /// Forks not followed because their master already had
    /// `--max-watched-per-master` processes watched (refused by the kernel
    /// at the fork, or let go by user space after it).
    pub over_quota: u64,
    /// Gunicorn masters discovery did not watch: their container (or the
    /// host) already had --max-masters-per-container watched.
    pub masters_over_quota: u64,
    /// Thread sleeps not recorded because their master's threads already
    /// held `--max-threads-per-master` entries of the in-flight map.
    pub threads_over_quota: u64,
    /// Connection-end and signal events the kernel did not send: their
    /// process was over its rate (a flood), so its early closes and
    /// signals are undercounted.
    pub events_rate_limited: u64,
    /// For each kernel loss counter above zero, the process charged most.
    #[serde(skip_serializing_if = "TopOffenders::is_empty")]
    pub top_offenders: TopOffenders,
    /// Runs of the kernel programs that failed and were skipped (a read
    /// refused, a map full): what they would have recorded is missing.
    pub bpf_errors: u64,
}

/// The process a loss counter was charged to most, and how many times.
/// Its pid is as the kernel saw it (the host's pid namespace), and may
/// have exited since.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Offender {
    pub pid: u32,
    pub count: u64,
}

/// The top offender of each kernel loss counter that can name one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TopOffenders {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_lost: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub watch_full: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inflight_full: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conns_unreadable: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub over_quota: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub threads_over_quota: Option<Offender>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub events_rate_limited: Option<Offender>,
    /// The last master refused, with its container's refusals.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub masters_over_quota: Option<Offender>,
}

impl TopOffenders {
    pub fn is_empty(&self) -> bool {
        self.each().iter().all(|(_, o)| o.is_none())
    }

    /// (counter, offender) in a fixed order: the metric's labels.
    pub fn each(&self) -> [(&'static str, Option<Offender>); 8] {
        [
            ("events_lost", self.events_lost),
            ("watch_full", self.watch_full),
            ("inflight_full", self.inflight_full),
            ("conns_unreadable", self.conns_unreadable),
            ("over_quota", self.over_quota),
            ("threads_over_quota", self.threads_over_quota),
            ("events_rate_limited", self.events_rate_limited),
            ("masters_over_quota", self.masters_over_quota),
        ]
    }

    /// Keeps the larger of two offenders of one counter.
    pub fn keep_top(slot: &mut Option<Offender>, o: Offender) {
        if slot.is_none_or(|cur| o.count > cur.count) {
            *slot = Some(o);
        }
    }
}

/// A live, healthy worker with nothing seen, for tests to vary.
#[cfg(test)]
impl WorkerSummary {
    pub fn quiet(pid: u32) -> WorkerSummary {
        WorkerSummary {
            pid,
            master_pid: 1,
            role: Role::Worker,
            app: None,
            state: WorkerState::Healthy,
            stalls: 0,
            timeouts: 0,
            exit_code: None,
            exit_signal: None,
            exit: None,
            stall: None,
            timeout_stall: None,
            timeout_watched_ms: None,
            early_closes: CloseCounts::default(),
            last_early_close: None,
            last_keepalive_race: None,
            hung_requests: 0,
            hung_request: None,
            hanging_now: 0,
            loop_found: None,
            container: None,
            timeout: None,
        }
    }
}
