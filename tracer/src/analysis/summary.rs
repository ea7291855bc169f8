//! The state of every process, and the findings ranked by harm. Wording
//! them is presentation's job (`present::verdict`).
use std::cmp::Reverse;

use super::correlator::{Correlator, Proc};
use super::exits::signal_name;
use super::signatures;
use crate::model::{
    ExitCause, ExitReport, Finding, Role, StallReport, Summary, WorkerState, WorkerSummary,
};

fn state(p: &Proc, stalled_now: bool, hanging_now: bool) -> WorkerState {
    let cause = p.exit.as_ref().map(|e| e.cause);
    if stalled_now && p.alive {
        WorkerState::Stalled
    } else if hanging_now && p.alive {
        WorkerState::HangingRequests
    } else if !p.alive && cause == Some(ExitCause::OomKill) {
        WorkerState::KilledByOom
    } else if !p.alive && p.killed_by_timeout {
        WorkerState::KilledByTimeout
    } else if !p.alive {
        WorkerState::Exited
    } else if p.killed_by_timeout {
        WorkerState::TimingOut
    } else if p.closes.harmful() > 0 {
        WorkerState::DroppingRequests
    } else {
        WorkerState::Healthy
    }
}

/// The workers for which `pred` holds, ordered by `key`, largest first.
fn pick<K: Ord>(
    workers: &[WorkerSummary],
    pred: impl Fn(&WorkerSummary) -> bool,
    key: impl Fn(&WorkerSummary) -> K,
) -> Vec<usize> {
    let mut found: Vec<usize> = (0..workers.len()).filter(|&i| pred(&workers[i])).collect();
    found.sort_by_key(|&i| Reverse(key(&workers[i])));
    found
}

fn exit_is(w: &WorkerSummary, pred: impl Fn(&ExitReport) -> bool) -> bool {
    w.exit.as_ref().is_some_and(pred)
}

/// The workers found for one kind of finding, and how to name it.
type Ranked = (Vec<usize>, fn(usize) -> Finding);

/// By harm: a master halted by a worker that cannot boot (the whole server
/// is down), workers stalled now (longest first), workers holding a request
/// without an answer now, OOM kills, kills by Gunicorn's WORKER TIMEOUT,
/// dropped requests (most first), requests that hung and are over,
/// requests lost to keep-alive races (most first), then kills from outside
/// Gunicorn. Each names its worker; a worker may have several.
fn rank(w: &[WorkerSummary]) -> Vec<Finding> {
    let none = |_: &WorkerSummary| 0;
    let ranked: [Ranked; 9] = [
        (
            pick(w, |x| exit_is(x, |e| e.halts_master), none),
            Finding::Halted,
        ),
        (
            pick(
                w,
                |x| x.state == WorkerState::Stalled,
                |x| x.stall.as_ref().map(|s| s.blocked_ms),
            ),
            Finding::Stalled,
        ),
        (
            pick(w, |x| x.hanging_now > 0, |x| x.hanging_now),
            Finding::HungRequests,
        ),
        (
            pick(w, |x| exit_is(x, |e| e.cause == ExitCause::OomKill), none),
            Finding::OomKilled,
        ),
        (
            pick(
                w,
                |x| {
                    x.timeouts > 0
                        && !matches!(x.state, WorkerState::Stalled | WorkerState::KilledByOom)
                },
                none,
            ),
            Finding::KilledByTimeout,
        ),
        (
            pick(
                w,
                |x| {
                    x.early_closes
                        .harmful_beyond_exit(x.death_tells_lost_requests())
                        > 0
                },
                |x| x.early_closes.dropped_request,
            ),
            Finding::Dropping,
        ),
        (
            pick(
                w,
                |x| x.hung_requests > 0 && x.hanging_now == 0,
                |x| x.hung_requests,
            ),
            Finding::HungRequests,
        ),
        (
            pick(
                w,
                |x| x.early_closes.keepalive_race > 0,
                |x| x.early_closes.keepalive_race,
            ),
            Finding::KeepaliveRaces,
        ),
        (
            pick(
                w,
                |x| {
                    exit_is(x, |e| {
                        e.cause == ExitCause::ExternalSignal && e.is_finding()
                    })
                },
                none,
            ),
            Finding::KilledExternally,
        ),
    ];
    ranked
        .into_iter()
        .flat_map(|(found, finding)| found.into_iter().map(finding))
        .collect()
}

/// A stall in progress judged again with its figures of now: a cause
/// that needs a wait to have lasted (a deadlock since fork) is said only
/// once it has.
pub(super) fn rejudged(mut r: StallReport) -> StallReport {
    r.cause = signatures::identify(&r);
    r
}

impl Correlator {
    /// Every process known, at kernel time `now_ns`, and what is wrong.
    pub fn summary(&self, now_ns: u64) -> Summary {
        let workers: Vec<WorkerSummary> = self
            .procs
            .iter()
            .map(|(&pid, p)| {
                let current = self.current_stall(pid, now_ns).map(rejudged);
                let hanging = self.hanging(pid, now_ns);
                WorkerSummary {
                    pid,
                    master_pid: p.master,
                    role: p.role,
                    app: p.app.clone(),
                    state: state(p, current.is_some(), !hanging.is_empty()),
                    stalls: p.stalls,
                    timeouts: p.timeouts,
                    exit_code: p.exit_code,
                    exit_signal: p.exit_signal.map(signal_name),
                    exit: p.exit.clone(),
                    stall: current.or_else(|| p.last_stall.clone()),
                    timeout_stall: p.timeout_stall.clone(),
                    timeout_watched_ms: p.timeout_watched_ms.filter(|_| p.killed_by_timeout),
                    early_closes: p.closes,
                    last_early_close: p.last_drop.clone(),
                    last_keepalive_race: p.last_race.clone(),
                    hung_requests: p.hung_requests,
                    hanging_now: hanging.len() as u32,
                    hung_request: hanging.into_iter().next().or_else(|| p.last_hung.clone()),
                    loop_found: (p.alive && p.role == Role::Worker)
                        .then_some(p.loop_wait.is_some()),
                    container: p.container.clone(),
                    timeout: p.timeout_s,
                }
            })
            .collect();
        Summary {
            findings: rank(&workers),
            workers,
            exited_quiet: self.exited_quiet,
            threshold_ms: self.threshold_ns / 1_000_000,
            exits: self.exits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CloseCounts;

    fn worker(pid: u32) -> WorkerSummary {
        WorkerSummary::quiet(pid)
    }

    fn exited(pid: u32, why: ExitReport) -> WorkerSummary {
        WorkerSummary {
            state: WorkerState::Exited,
            exit: Some(why),
            ..worker(pid)
        }
    }

    #[test]
    fn every_kind_of_finding_is_ranked_by_harm_and_names_its_worker() {
        let races = WorkerSummary {
            early_closes: CloseCounts {
                keepalive_race: 3,
                ..Default::default()
            },
            ..worker(10)
        };
        let external = exited(
            11,
            ExitReport {
                cause_signal: Some("SIGKILL".into()),
                ..ExitReport::new(ExitCause::ExternalSignal)
            },
        );
        let dropping = |pid, n| WorkerSummary {
            early_closes: CloseCounts {
                dropped_request: n,
                ..Default::default()
            },
            ..worker(pid)
        };
        let timed_out = WorkerSummary {
            timeouts: 1,
            state: WorkerState::KilledByTimeout,
            ..worker(14)
        };
        let oom = WorkerSummary {
            state: WorkerState::KilledByOom,
            ..exited(15, ExitReport::new(ExitCause::OomKill))
        };
        let hanging = WorkerSummary {
            hung_requests: 1,
            hanging_now: 1,
            state: WorkerState::HangingRequests,
            ..worker(16)
        };
        let held = WorkerSummary {
            hung_requests: 2,
            ..worker(20)
        };
        let stalled = |pid, ms| WorkerSummary {
            state: WorkerState::Stalled,
            stall: Some(StallReport {
                blocked_ms: ms,
                ..Default::default()
            }),
            ..worker(pid)
        };
        let halted = exited(
            19,
            ExitReport {
                halts_master: true,
                ..ExitReport::new(ExitCause::Exit)
            },
        );
        // A graceful stop and a healthy worker are no findings.
        let graceful = exited(
            21,
            ExitReport {
                cause_signal: Some("SIGTERM".into()),
                ..ExitReport::new(ExitCause::ExternalSignal)
            },
        );
        let w = vec![
            races,
            external,
            dropping(12, 1),
            dropping(13, 5),
            timed_out,
            oom,
            hanging,
            stalled(17, 800),
            stalled(18, 4000),
            halted,
            held,
            graceful,
            worker(22),
        ];
        let order: Vec<(u32, &str)> = rank(&w)
            .into_iter()
            .map(|f| {
                let kind = match f {
                    Finding::Halted(_) => "halted",
                    Finding::Stalled(_) => "stalled",
                    Finding::HungRequests(_) => "hung",
                    Finding::OomKilled(_) => "oom",
                    Finding::KilledByTimeout(_) => "timeout",
                    Finding::Dropping(_) => "dropping",
                    Finding::KeepaliveRaces(_) => "races",
                    Finding::KilledExternally(_) => "killed",
                };
                (w[f.worker()].pid, kind)
            })
            .collect();
        assert_eq!(
            order,
            [
                (19, "halted"),
                (18, "stalled"),
                (17, "stalled"),
                (16, "hung"),
                (15, "oom"),
                (14, "timeout"),
                (13, "dropping"),
                (12, "dropping"),
                (20, "hung"),
                (10, "races"),
                (11, "killed"),
            ]
        );
    }
}
