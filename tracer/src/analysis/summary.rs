//! The state of every process, and the findings ranked by harm. Wording
//! them is presentation's job (`present::verdict`).
use std::cmp::Reverse;

use super::correlator::{Correlator, Proc};
use crate::model::{ExitCause, Finding, Summary, WorkerState, WorkerSummary, signal_name};

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

/// The workers whose exit matches `pred`.
fn exited(
    workers: &[WorkerSummary],
    pred: impl Fn(&crate::model::ExitReport) -> bool,
) -> Vec<usize> {
    (0..workers.len())
        .filter(|&i| workers[i].exit.as_ref().is_some_and(&pred))
        .collect()
}

/// By harm: a master halted by a worker that cannot boot (the whole server
/// is down), workers stalled now (longest first), workers holding a request
/// without an answer now, OOM kills, kills by Gunicorn's WORKER TIMEOUT,
/// dropped requests (most first), requests that hung and are over,
/// requests lost to keep-alive races (most first), then kills from outside
/// Gunicorn.
fn rank(workers: &[WorkerSummary]) -> Vec<Finding> {
    let all = 0..workers.len();
    let mut stalled: Vec<usize> = all
        .clone()
        .filter(|&i| workers[i].state == WorkerState::Stalled)
        .collect();
    stalled.sort_by_key(|&i| Reverse(workers[i].stall.as_ref().map(|s| s.blocked_ms)));
    let killed = all.clone().filter(|&i| {
        workers[i].timeouts > 0
            && workers[i].state != WorkerState::Stalled
            && workers[i].state != WorkerState::KilledByOom
    });
    let mut dropping: Vec<usize> = all
        .filter(|&i| workers[i].early_closes.harmful() > 0)
        .collect();
    dropping.sort_by_key(|&i| Reverse(workers[i].early_closes.dropped_request));
    let mut findings: Vec<Finding> = exited(workers, |e| e.halts_master)
        .into_iter()
        .map(Finding::Halted)
        .collect();
    findings.extend(stalled.into_iter().map(Finding::Stalled));
    let (hanging, held): (Vec<usize>, Vec<usize>) = (0..workers.len())
        .filter(|&i| workers[i].hung_requests > 0)
        .partition(|&i| workers[i].hanging_now > 0);
    findings.extend(hanging.into_iter().map(Finding::HungRequests));
    findings.extend(
        exited(workers, |e| e.cause == ExitCause::OomKill)
            .into_iter()
            .map(Finding::OomKilled),
    );
    findings.extend(killed.map(Finding::KilledByTimeout));
    findings.extend(dropping.into_iter().map(Finding::Dropping));
    findings.extend(held.into_iter().map(Finding::HungRequests));
    let mut racing: Vec<usize> = (0..workers.len())
        .filter(|&i| workers[i].early_closes.keepalive_race > 0)
        .collect();
    racing.sort_by_key(|&i| Reverse(workers[i].early_closes.keepalive_race));
    findings.extend(racing.into_iter().map(Finding::KeepaliveRaces));
    findings.extend(
        exited(workers, |e| {
            e.cause == ExitCause::ExternalSignal && e.is_finding()
        })
        .into_iter()
        .map(Finding::KilledExternally),
    );
    findings
}

impl Correlator {
    /// Every process known, at kernel time `now_ns`, and what is wrong.
    pub fn summary(&self, now_ns: u64) -> Summary {
        let workers: Vec<WorkerSummary> = self
            .procs
            .iter()
            .map(|(&pid, p)| {
                let current = self.current_stall(pid, now_ns);
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
                    early_closes: p.closes,
                    last_early_close: p.last_drop.clone(),
                    last_keepalive_race: p.last_race.clone(),
                    hung_requests: p.hung_requests,
                    hanging_now: hanging.len() as u32,
                    hung_request: hanging.into_iter().next().or_else(|| p.last_hung.clone()),
                    container: p.container.clone(),
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
