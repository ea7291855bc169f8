//! Why a process exited: the kernel's OOM killer, Gunicorn's WORKER
//! TIMEOUT, another signal and who sent it, --max-requests, or its own exit
//! code. Gunicorn's log says "Perhaps out of memory?" for every SIGKILL;
//! the kernel knows which it was.
use super::Enricher;
use super::correlator::{Correlator, Proc};
use crate::model::{ExitCause, ExitReport, MasterSettings, OomKill, Output, Role, Sender};

/// `SIGKILL` for 9; `SIG<n>` for signals without a well-known name. The
/// names are tracer-common's: the list of signals the kernel side forwards
/// is the list of those named, so one table serves both.
pub(crate) fn signal_name(sig: i32) -> String {
    match tracer_common::signal::name(sig) {
        Some(n) => n.to_string(),
        None => format!("SIG{sig}"),
    }
}

/// A reported signal sent to a watched process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SignalSeen {
    pub ts_ns: u64,
    pub sig: i32,
    pub sender: u32,
    pub sender_comm: String,
}

/// Gunicorn's worker exit codes that make the master stop the server
/// (`Arbiter.WORKER_BOOT_ERROR`, `Arbiter.APP_LOAD_ERROR`).
pub const WORKER_BOOT_ERROR: i32 = 3;
pub const APP_LOAD_ERROR: i32 = 4;

/// A signal this long before the exit still explains it: a graceful stop
/// may take Gunicorn's whole --graceful-timeout (30 s by default).
const SIGNAL_EXPLAINS_NS: u64 = 120_000_000_000;

const SIGKILL: i32 = 9;

fn sender(s: &SignalSeen) -> Sender {
    Sender {
        pid: s.sender,
        comm: s.sender_comm.clone(),
    }
}

fn report(cause: ExitCause) -> ExitReport {
    ExitReport::new(cause)
}

/// How a process ended, as the kernel's exit status says.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ended {
    pub ts_ns: u64,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
}

/// A signal explains the exit: the one that killed it, or the last one it
/// got before it exited by itself (Gunicorn's graceful stop).
fn signal_exit(p: &Proc, end: Ended) -> Option<ExitReport> {
    let seen = p
        .last_signal
        .as_ref()
        .filter(|s| end.ts_ns.saturating_sub(s.ts_ns) < SIGNAL_EXPLAINS_NS);
    let seen = match end.signal {
        Some(sig) => seen.filter(|s| s.sig == sig),
        None => seen,
    };
    let Some(s) = seen else {
        // Killed by a signal whose sender was not seen (one the kernel
        // does not forward, or an event lost).
        return end.signal.map(|sig| ExitReport {
            cause_signal: Some(signal_name(sig)),
            ..report(ExitCause::ExternalSignal)
        });
    };
    let cause = if s.sender == p.master && p.role != Role::Master {
        ExitCause::MasterSignal
    } else {
        ExitCause::ExternalSignal
    };
    Some(ExitReport {
        cause_signal: Some(signal_name(s.sig)),
        sender: Some(sender(s)),
        ..report(cause)
    })
}

/// Why `p` exited, most specific first.
pub(super) fn explain(p: &Proc, end: Ended, settings: MasterSettings) -> ExitReport {
    if let Some(oom) = p.oom.as_ref().filter(|_| end.signal == Some(SIGKILL)) {
        return ExitReport {
            cause_signal: Some(signal_name(SIGKILL)),
            oom: Some(oom.clone()),
            ..report(ExitCause::OomKill)
        };
    }
    if p.killed_by_timeout {
        let seen = p.timeout_signal.as_ref();
        return ExitReport {
            cause_signal: seen.map(|s| signal_name(s.sig)),
            sender: seen.map(sender),
            ..report(ExitCause::WorkerTimeout)
        };
    }
    if let Some(r) = signal_exit(p, end) {
        return r;
    }
    let retiring = settings.max_requests.filter(|&n| n > 0);
    if p.role == Role::Worker && end.exit_code == Some(0) && retiring.is_some() {
        return ExitReport {
            max_requests: retiring,
            ..report(ExitCause::MaxRequests)
        };
    }
    ExitReport {
        halts_master: p.role == Role::Worker
            && matches!(end.exit_code, Some(WORKER_BOOT_ERROR | APP_LOAD_ERROR)),
        ..report(ExitCause::Exit)
    }
}

impl Correlator {
    /// The kernel's OOM killer chose a watched process: remember it, with
    /// what its memory cgroup says, for the exit that follows. Read now,
    /// while the victim (or at least its master) is still there.
    pub(super) fn on_oom_kill(
        &mut self,
        pid: u32,
        oom_score_adj: i64,
        rss_kb: u64,
        cgroups: Option<&str>,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let Some(master) = self.procs.get(&pid).map(|p| p.master) else {
            return Vec::new();
        };
        // A dying task is moved to the root cgroup: a victim read there
        // may have been in any cgroup (or none, in a global OOM). Its
        // limit is then not known, not the host's.
        let cgroup = enr
            .memory_cgroup(pid, cgroups)
            .or_else(|| enr.memory_cgroup(master, None))
            .filter(|c| c.path != "/");
        let oom = OomKill {
            oom_score_adj,
            rss_bytes: (rss_kb > 0).then_some(rss_kb * 1024),
            cgroup: cgroup.as_ref().map(|c| c.path.clone()),
            memory_limit_bytes: cgroup.as_ref().and_then(|c| c.limit_bytes),
            memory_usage_bytes: cgroup.as_ref().and_then(|c| c.usage_bytes),
        };
        if let Some(p) = self.procs.get_mut(&pid) {
            p.oom = Some(oom);
        }
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn worker() -> Proc {
        Proc {
            master: 1,
            role: Role::Worker,
            alive: true,
            ..Default::default()
        }
    }

    fn signalled(sig: i32, from: u32, comm: &str) -> Proc {
        Proc {
            last_signal: Some(SignalSeen {
                ts_ns: 10 * S,
                sig,
                sender: from,
                sender_comm: comm.into(),
            }),
            ..worker()
        }
    }

    fn ended(exit_code: Option<i32>, signal: Option<i32>) -> Ended {
        Ended {
            ts_ns: 11 * S,
            exit_code,
            signal,
        }
    }

    fn cause(p: &Proc, end: Ended) -> ExitCause {
        explain(p, end, MasterSettings::default()).cause
    }

    #[test]
    fn an_oom_kill_is_named_even_though_the_signal_came_from_the_victim() {
        let mut p = signalled(9, 7, "gunicorn");
        p.oom = Some(OomKill {
            oom_score_adj: 0,
            rss_bytes: None,
            cgroup: None,
            memory_limit_bytes: Some(400 << 20),
            memory_usage_bytes: Some(400 << 20),
        });
        let r = explain(&p, ended(None, Some(9)), MasterSettings::default());
        assert_eq!(r.cause, ExitCause::OomKill);
        assert_eq!(r.oom.unwrap().memory_limit_bytes, Some(400 << 20));
    }

    #[test]
    fn signals_are_told_apart_by_sender() {
        // Gunicorn's graceful stop: SIGTERM from the master, then exit 0.
        let r = explain(
            &signalled(15, 1, "gunicorn"),
            ended(Some(0), None),
            MasterSettings::default(),
        );
        assert_eq!(r.cause, ExitCause::MasterSignal);
        assert_eq!(r.cause_signal.as_deref(), Some("SIGTERM"));
        // An operator's kill -9.
        let r = explain(
            &signalled(9, 4242, "kill"),
            ended(None, Some(9)),
            MasterSettings::default(),
        );
        assert_eq!(r.cause, ExitCause::ExternalSignal);
        assert_eq!(
            r.sender,
            Some(Sender {
                pid: 4242,
                comm: "kill".into()
            })
        );
        // Killed by a signal nobody was seen sending.
        let r = explain(&worker(), ended(None, Some(10)), MasterSettings::default());
        assert_eq!(
            (r.cause, r.cause_signal.as_deref(), r.sender),
            (ExitCause::ExternalSignal, Some("SIG10"), None)
        );
        // A signal long before a later exit explains nothing.
        let late = Ended {
            ts_ns: 500 * S,
            ..ended(Some(1), None)
        };
        assert_eq!(cause(&signalled(15, 1, "gunicorn"), late), ExitCause::Exit);
    }

    #[test]
    fn clean_exits_retirement_and_boot_failures() {
        let retiring = MasterSettings {
            max_requests: Some(5),
            ..Default::default()
        };
        let r = explain(&worker(), ended(Some(0), None), retiring);
        assert_eq!((r.cause, r.max_requests), (ExitCause::MaxRequests, Some(5)));
        assert_eq!(cause(&worker(), ended(Some(0), None)), ExitCause::Exit);
        for code in [WORKER_BOOT_ERROR, APP_LOAD_ERROR] {
            let r = explain(&worker(), ended(Some(code), None), retiring);
            assert_eq!((r.cause, r.halts_master), (ExitCause::Exit, true), "{code}");
        }
        let r = explain(&worker(), ended(Some(1), None), retiring);
        assert!(!r.halts_master);
    }

    #[test]
    fn a_master_stopped_by_its_own_signal_is_an_external_one() {
        let mut m = signalled(15, 4242, "kubelet");
        m.role = Role::Master;
        m.master = 1;
        assert_eq!(cause(&m, ended(Some(0), None)), ExitCause::ExternalSignal);
    }
}
