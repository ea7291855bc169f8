//! The correlator's state: every watched process, the stalls being followed,
//! and the dispatch of kernel events to their handlers (one per kind, in
//! `lifecycle`, `stalls` and `closes`).
use std::collections::{BTreeMap, HashMap, VecDeque};

use super::Enricher;
use super::closes::{BenignCloses, ConnEnd};
use super::cpu::Beats;
use super::exits::SignalSeen;
use super::hung::HungState;
use super::requests::RequestScan;
use super::stalls::Active;
use crate::model::{
    CloseCounts, Container, EarlyClose, ExitCause, ExitReport, HungRequest, KernelEvent, LoopWait,
    MasterConfig, MasterSettings, OomKill, Output, Role, Setting, Source, StallReport, WorkerClass,
};

/// What the correlator keeps about one process.
#[derive(Debug, Clone, Default)]
pub(super) struct Proc {
    pub master: u32,
    pub role: Role,
    pub app: Option<String>,
    /// The master's timeout, with its source; None when not known.
    pub timeout_s: Option<Setting<f64>>,
    /// Gunicorn's worker class, named by a setting or inferred from what
    /// the worker does (`infer_class`); None when not known. Gunicorn's
    /// default is never put here: it is assumed, not known.
    pub worker_class: Option<WorkerClass>,
    /// The worker's event loop's own wait, once found.
    pub loop_wait: Option<LoopWait>,
    /// Its heartbeats, for loops that keep the CPU.
    pub beats: Beats,
    pub alive: bool,
    pub stalls: u32,
    pub timeouts: u32,
    pub killed_by_timeout: bool,
    pub exit_code: Option<i32>,
    pub exit_signal: Option<i32>,
    pub last_stall: Option<StallReport>,
    pub closes: CloseCounts,
    /// Benign closes reported at most once a second per kind.
    pub benign_closes: BenignCloses,
    pub last_drop: Option<EarlyClose>,
    /// The last request lost to a keep-alive race on a connection it closed.
    pub last_race: Option<EarlyClose>,
    pub container: Option<Container>,
    /// A master's settings (workers look theirs up through `master`).
    pub settings: MasterSettings,
    /// The last reported signal sent to it, and by whom.
    pub last_signal: Option<SignalSeen>,
    /// The master's last WORKER TIMEOUT signal (SIGABRT, then SIGKILL).
    pub timeout_signal: Option<SignalSeen>,
    /// A WORKER TIMEOUT begun with SIGABRT and not told yet: it is told
    /// once the worker exits, or with the SIGKILL Gunicorn sends on a later
    /// tick when it did not (one timeout, one event).
    pub pending_timeout: Option<PendingTimeout>,
    /// The stall its last WORKER TIMEOUT was blamed on (see
    /// `lifecycle::timeout_blame`); None when none was seen.
    pub timeout_stall: Option<StallReport>,
    /// When the tracer began to watch it (its fork, or the attach).
    pub watched_since_ns: u64,
    /// Its last WORKER TIMEOUT came before the tracer had watched it for a
    /// whole --timeout window (or the window is not known): how long it
    /// had. What held it before that was not seen.
    pub timeout_watched_ms: Option<u64>,
    /// The master asked it to stop (SIGTERM, SIGINT or SIGQUIT): a SIGKILL
    /// that follows is the end of a graceful stop, not a WORKER TIMEOUT.
    pub asked_to_stop: bool,
    /// That request to stop, the first one.
    pub stop_signal: Option<SignalSeen>,
    /// The kernel's OOM killer chose it.
    pub oom: Option<OomKill>,
    /// Why it exited, once it has.
    pub exit: Option<ExitReport>,
    /// Requests it held past --request-threshold without an answer.
    pub hung_requests: u32,
    pub last_hung: Option<HungRequest>,
}

/// A WORKER TIMEOUT's first signal, held until it is known whether the
/// master had to escalate to SIGKILL.
#[derive(Debug, Clone)]
pub(super) struct PendingTimeout {
    pub ts_ns: u64,
    pub signal: String,
    pub stall: Option<StallReport>,
    pub watched_ms: Option<u64>,
}

impl Proc {
    /// How long the tracer had watched it at `ts_ns`, when that is less
    /// than its master's --timeout, or the timeout is not known: a WORKER
    /// TIMEOUT then may have a cause from before the tracer came.
    pub fn watched_less_than_timeout(&self, ts_ns: u64) -> Option<u64> {
        let watched_ms = ts_ns.saturating_sub(self.watched_since_ns) / 1_000_000;
        match &self.timeout_s {
            Some(t) if watched_ms as f64 >= t.value * 1000.0 => None,
            _ => Some(watched_ms),
        }
    }

    /// Worth keeping after it exits: something happened to it.
    pub fn is_notable(&self) -> bool {
        self.stalls > 0
            || self.timeouts > 0
            || self.closes.harmful() > 0
            || self.closes.keepalive_race > 0
            || self.hung_requests > 0
            || self.exit.as_ref().is_some_and(|e| e.is_finding())
    }
}

/// A process to start watching, found at start-up or discovered later.
#[derive(Debug, Clone)]
pub struct NewProcess {
    pub pid: u32,
    pub master: u32,
    pub role: Role,
    pub app: Option<String>,
    pub timeout_s: Option<Setting<f64>>,
    pub worker_class: Option<WorkerClass>,
    /// A master's configuration (None for other processes).
    pub settings: Option<MasterConfig>,
    pub source: Source,
    pub container: Option<Container>,
}

pub struct Correlator {
    pub(super) threshold_ns: u64,
    pub(super) procs: BTreeMap<u32, Proc>,
    /// Exited processes kept for the summary because something happened to
    /// them (stalls, timeouts, dropped requests), oldest first; bounded.
    pub(super) exited_notable: VecDeque<u32>,
    /// Exited processes with nothing to report: only counted, so that worker
    /// churn (--max-requests) cannot grow the tracer's memory.
    pub(super) exited_quiet: u64,
    /// The last few quiet exits, kept a while: the kernel closes an exiting
    /// process's sockets after its exit event.
    pub(super) exited_recent: VecDeque<(u32, Proc)>,
    /// Stalls reported and not ended yet, by thread id.
    pub(super) active: HashMap<u32, Active>,
    /// Every exit seen, by cause (the processes themselves may be gone).
    pub(super) exits: BTreeMap<ExitCause, u64>,
    /// --request-threshold: a request unanswered this long is hung.
    pub(super) request_threshold_ns: u64,
    pub(super) hung: HungState,
    /// Loop threads reported on the CPU and not ended yet, by pid.
    pub(super) on_cpu: HashMap<u32, StallReport>,
    /// Each worker's loop thread's current run without a sleep (`spin`).
    pub(super) spins: HashMap<u32, Option<super::spin::Run>>,
    /// The last call of each thread whose stall ended, (pid, seq, start):
    /// the kernel may still hold it open, and it must not be reported
    /// again. Dropped with the process.
    pub(super) ended: HashMap<u32, (u32, u64, u64)>,
    /// The latest socket scan, to tie a blocked thread to a request.
    pub(super) requests: RequestScan,
    /// Reported stalls ended with outcome `unknown` (see `Losses`).
    pub(super) stall_ends_unknown: u64,
    /// New stalls reported since the last poll, per master (see
    /// `stalls::MAX_NEW_STALLS_PER_POLL`).
    pub(super) new_stalls: HashMap<u32, u32>,
    /// Stalls over before their turn came (see `Losses`).
    pub(super) stalls_held_back: u64,
}

impl Correlator {
    pub fn new(threshold_ns: u64) -> Correlator {
        Correlator {
            threshold_ns,
            procs: BTreeMap::new(),
            exited_notable: VecDeque::new(),
            exited_quiet: 0,
            exited_recent: VecDeque::new(),
            active: HashMap::new(),
            exits: BTreeMap::new(),
            request_threshold_ns: 30_000_000_000,
            hung: HungState::default(),
            on_cpu: HashMap::new(),
            spins: HashMap::new(),
            ended: HashMap::new(),
            requests: RequestScan::default(),
            stall_ends_unknown: 0,
            new_stalls: HashMap::new(),
            stalls_held_back: 0,
        }
    }

    /// Replaces a master's settings.
    pub fn configure(&mut self, master: u32, settings: MasterSettings) {
        if let Some(p) = self.procs.get_mut(&master) {
            p.settings = settings;
        }
    }

    /// The settings of `pid`'s master (none known when it is not known).
    pub(super) fn settings_of(&self, pid: u32) -> MasterSettings {
        self.procs
            .get(&pid)
            .and_then(|p| self.procs.get(&p.master))
            .map(|m| m.settings)
            .unwrap_or_default()
    }

    /// What a worker of a watched master starts with: the master's timeout
    /// and the class a setting names (None when the master is not watched).
    pub fn master_defaults(
        &self,
        master: u32,
    ) -> Option<(Option<Setting<f64>>, Option<WorkerClass>)> {
        self.procs
            .get(&master)
            .filter(|m| m.alive && m.role == Role::Master)
            .map(|m| (m.timeout_s, m.worker_class.clone()))
    }

    /// No setting names the class of live worker `pid`, and none was
    /// inferred yet.
    pub fn class_unknown(&self, pid: u32) -> bool {
        self.procs
            .get(&pid)
            .is_some_and(|p| p.alive && p.role == Role::Worker && p.worker_class.is_none())
    }

    /// The worker class of `pid` inferred from what it does. A class a
    /// setting names is kept (an inference never overrides what was read);
    /// the `worker_class` event says what was inferred, from what.
    pub fn infer_class(&mut self, ts_ns: u64, pid: u32, class: WorkerClass) -> Option<Output> {
        let p = self.procs.get_mut(&pid).filter(|p| p.alive)?;
        if p.worker_class.is_some() {
            return None;
        }
        p.worker_class = Some(class.clone());
        Some(Output::WorkerClass {
            ts_ns,
            pid,
            master_pid: p.master,
            class,
        })
    }

    /// The event loop's own wait of worker `pid`, found by user space.
    pub fn set_loop(&mut self, ts_ns: u64, pid: u32, wait: LoopWait) -> Option<Output> {
        let p = self.procs.get_mut(&pid).filter(|p| p.alive)?;
        p.loop_wait = Some(wait);
        let (wait, fd, nfds) = match wait {
            LoopWait::Epoll { epfd } => ("epoll_wait", Some(epfd), None),
            LoopWait::Select { nfds, .. } => ("select", None, Some(nfds)),
        };
        Some(Output::Loop {
            ts_ns,
            pid,
            master_pid: p.master,
            wait,
            fd,
            nfds,
        })
    }

    /// The Python stack read for a stall already reported (matched by its
    /// thread and start), with the cause judged from it: kept with the
    /// stall wherever the correlator holds it, so the summary, the verdict
    /// and a later worker_timeout cite the same frame as the stall event.
    pub fn stack_read(&mut self, read: &StallReport) {
        let same = |r: &StallReport| (r.tid, r.start_ns) == (read.tid, read.start_ns);
        let copy = |r: &mut StallReport| {
            if same(r) {
                r.py_stack.clone_from(&read.py_stack);
                r.py_stack_omitted = read.py_stack_omitted;
                r.py_stack_error.clone_from(&read.py_stack_error);
                r.cause.clone_from(&read.cause);
            }
        };
        if let Some(a) = self.active.get_mut(&read.tid) {
            copy(&mut a.report);
        }
        if let Some(r) = self.on_cpu.get_mut(&read.pid) {
            copy(r);
        }
        if let Some(p) = self.procs.get_mut(&read.pid) {
            for r in [p.last_stall.as_mut(), p.timeout_stall.as_mut()]
                .into_iter()
                .flatten()
            {
                copy(r);
            }
        }
    }

    /// Reported stalls whose end nothing said (outcome `unknown`).
    pub fn stall_ends_unknown(&self) -> u64 {
        self.stall_ends_unknown
    }

    /// Stalls of a flooding master that were over before their turn to be
    /// reported came (see `Losses::stalls_held_back`).
    pub fn stalls_held_back(&self) -> u64 {
        self.stalls_held_back
    }

    /// Live workers whose loop's own wait is not known yet.
    pub fn workers_without_loop(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|(_, p)| p.alive && p.role == Role::Worker && p.loop_wait.is_none())
            .map(|(&pid, _)| pid)
            .collect()
    }

    pub fn is_watched(&self, pid: u32) -> bool {
        self.procs.get(&pid).is_some_and(|p| p.alive)
    }

    /// Every process followed as alive: checked against the host's pids so
    /// one whose exit was never seen cannot stay forever.
    pub fn alive_pids(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|(_, p)| p.alive)
            .map(|(pid, _)| *pid)
            .collect()
    }

    /// Processes of `master` followed as alive (the master included).
    pub fn alive_under(&self, master: u32) -> usize {
        self.procs
            .values()
            .filter(|p| p.alive && p.master == master)
            .count()
    }

    /// Starts following a process; None when it is already followed.
    pub fn add_process(&mut self, ts_ns: u64, p: NewProcess) -> Option<Output> {
        if self.is_watched(p.pid) {
            return None;
        }
        self.procs.insert(
            p.pid,
            Proc {
                master: p.master,
                role: p.role,
                app: p.app.clone(),
                timeout_s: p.timeout_s,
                worker_class: p.worker_class.clone(),
                alive: true,
                container: p.container.clone(),
                settings: p.settings.as_ref().map(|c| c.settings).unwrap_or_default(),
                watched_since_ns: ts_ns,
                ..Default::default()
            },
        );
        Some(if p.role == Role::Master {
            Output::Master {
                ts_ns,
                pid: p.pid,
                app: p.app,
                settings: Box::new(p.settings.unwrap_or_default()),
                source: p.source,
                container: p.container,
            }
        } else {
            Output::Worker {
                ts_ns,
                pid: p.pid,
                master_pid: p.master,
                role: p.role,
                source: p.source,
                app: p.app,
                container: p.container,
            }
        })
    }

    pub fn on_kernel(&mut self, ev: KernelEvent, enr: &mut dyn Enricher) -> Vec<Output> {
        match ev {
            KernelEvent::Fork {
                ts_ns,
                child,
                role,
                master,
                ..
            } => self.on_fork(ts_ns, child, role, master, enr),
            KernelEvent::Exit {
                ts_ns,
                pid,
                exit_code,
                signal,
            } => self.on_exit(ts_ns, pid, exit_code, signal),
            KernelEvent::Signal {
                ts_ns,
                target,
                sender,
                sender_comm,
                sig,
            } => {
                let seen = SignalSeen {
                    ts_ns,
                    sig,
                    sender,
                    sender_comm,
                };
                self.on_signal(target, seen)
            }
            KernelEvent::OomKill {
                pid,
                oom_score_adj,
                rss_kb,
                cgroups,
                ..
            } => self.on_oom_kill(pid, oom_score_adj, rss_kb, cgroups.as_deref(), enr),
            KernelEvent::SleepEnd { .. } => self.on_sleep_end(&ev, enr),
            KernelEvent::Exec { .. } => Vec::new(),
            KernelEvent::ConnEnd {
                ts_ns,
                tgid,
                tid,
                fd,
                conn,
                ended_by,
                peer_closed_first,
            } => {
                let end = ConnEnd {
                    ts_ns,
                    pid: tgid,
                    tid,
                    fd,
                    ended_by,
                    peer_closed_first,
                };
                self.on_conn_end(&end, &conn)
            }
            KernelEvent::KeepaliveRace(r) => self.on_keepalive_race(&r),
        }
    }
}
