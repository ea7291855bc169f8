//! The state of every process, and the findings ranked by harm. Wording
//! them is presentation's job (`present::verdict`).
use std::cmp::Reverse;

use super::correlator::{Correlator, Proc};
use crate::model::{Finding, Summary, WorkerState, WorkerSummary, signal_name};

fn state(p: &Proc, stalled_now: bool) -> WorkerState {
    if stalled_now && p.alive {
        WorkerState::Stalled
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

/// Stalled now (longest first), then killed by Gunicorn, then dropping
/// requests (most first).
fn rank(workers: &[WorkerSummary]) -> Vec<Finding> {
    let mut stalled: Vec<usize> = (0..workers.len())
        .filter(|&i| workers[i].state == WorkerState::Stalled)
        .collect();
    stalled.sort_by_key(|&i| Reverse(workers[i].stall.as_ref().map(|s| s.blocked_ms)));
    let killed = (0..workers.len())
        .filter(|&i| workers[i].timeouts > 0 && workers[i].state != WorkerState::Stalled);
    let mut dropping: Vec<usize> = (0..workers.len())
        .filter(|&i| workers[i].early_closes.harmful() > 0)
        .collect();
    dropping.sort_by_key(|&i| Reverse(workers[i].early_closes.dropped_request));
    let mut findings: Vec<Finding> = stalled.into_iter().map(Finding::Stalled).collect();
    findings.extend(killed.map(Finding::KilledByTimeout));
    findings.extend(dropping.into_iter().map(Finding::Dropping));
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
                WorkerSummary {
                    pid,
                    master_pid: p.master,
                    role: p.role,
                    app: p.app.clone(),
                    state: state(p, current.is_some()),
                    stalls: p.stalls,
                    timeouts: p.timeouts,
                    exit_code: p.exit_code,
                    exit_signal: p.exit_signal.map(signal_name),
                    stall: current.or_else(|| p.last_stall.clone()),
                    early_closes: p.closes,
                    last_early_close: p.last_drop.clone(),
                    container: p.container.clone(),
                }
            })
            .collect();
        Summary {
            findings: rank(&workers),
            workers,
            exited_quiet: self.exited_quiet,
            threshold_ms: self.threshold_ns / 1_000_000,
        }
    }
}
