//! The verdict: the ranked findings of `analysis` in sentences, the first
//! thing a person reads.
use serde::Serialize;

use super::{describe_call, describe_stall, never_noticed, secs, which_thread};
use crate::model::{Finding, Role, StallReport, Summary, WorkerState, WorkerSummary};

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub stalled_pids: Vec<u32>,
    pub killed_pids: Vec<u32>,
    /// Workers that closed requests with nothing sent (or cut upstream calls).
    pub dropping_pids: Vec<u32>,
    pub text: String,
}

fn name(w: &WorkerSummary) -> String {
    format!("{} {} (master {})", w.role.as_str(), w.pid, w.master_pid)
}

/// Why the call cannot return, and the known cause with its fix.
fn why(s: &StallReport) -> String {
    let mut w = String::new();
    if s.only_self_can_wake == Some(true) {
        w.push_str(", which only the blocked process itself can write to, so it can never return");
    }
    match &s.cause {
        Some(c) => w.push_str(&format!("; likely cause: {}. Fix: {}", c.cause, c.fix)),
        None => w.push_str("; cause: unknown"),
    }
    if let Some(n) = never_noticed(s) {
        w.push_str(&format!(". {n}"));
    }
    w
}

fn stalled(w: &WorkerSummary) -> String {
    let s = w.stall.as_ref().expect("a stalled worker has a stall");
    format!(
        "{} is STALLED: {}{}{}",
        name(w),
        which_thread(s),
        describe_stall(s, "blocked"),
        why(s)
    )
}

fn killed(w: &WorkerSummary) -> String {
    match &w.stall {
        Some(s) => format!(
            "{} was killed by Gunicorn's WORKER TIMEOUT after {}{}{}",
            name(w),
            which_thread(s),
            describe_stall(s, "blocking"),
            why(s)
        ),
        None => format!(
            "{} was killed by Gunicorn's WORKER TIMEOUT; no blocking syscall was seen (CPU-bound code?)",
            name(w)
        ),
    }
}

fn dropping(w: &WorkerSummary) -> String {
    let c = &w.early_closes;
    let mut what = Vec::new();
    if c.dropped_request > 0 {
        what.push(format!(
            "dropped {} request(s) (closed the client's connection with nothing sent back)",
            c.dropped_request
        ));
    }
    if c.upstream_cut > 0 {
        what.push(format!(
            "cut {} upstream call(s) short (closed before any reply)",
            c.upstream_cut
        ));
    }
    let mut line = format!("{} {}", name(w), what.join(" and "));
    if let Some(e) = &w.last_early_close {
        line.push_str(&format!(
            "; last: {} {}",
            e.direction.as_str(),
            e.peer.as_deref().unwrap_or("?"),
        ));
        if let Some(ms) = e.lifetime_ms {
            line.push_str(&format!(" after {}", secs(ms)));
        }
        match &e.cause {
            Some(cause) => line.push_str(&format!(
                "; likely cause: {}. Fix: {}",
                cause.cause, cause.fix
            )),
            None => line.push_str("; cause: unknown"),
        }
    }
    line
}

/// With nothing wrong: say what was watched, or the stalls that are over.
fn all_clear(s: &Summary, healthy: usize) -> Vec<String> {
    let past: Vec<&WorkerSummary> = s.workers.iter().filter(|w| w.stalls > 0).collect();
    if past.is_empty() {
        return vec![format!(
            "healthy: {healthy} worker(s) watched, no syscall blocked an event loop for {}ms or more, no request dropped",
            s.threshold_ms
        )];
    }
    past.into_iter()
        .map(|w| {
            let st = w.stall.as_ref().expect("stalls > 0 has a stall");
            let last = match st.syscall {
                Some(_) => format!("{} in {}", secs(st.blocked_ms), describe_call(st)),
                None => format!("{} {}", secs(st.blocked_ms), describe_call(st)),
            };
            format!(
                "no worker is stalled now; {} stalled {} time(s), last for {last}",
                name(w),
                w.stalls,
            )
        })
        .collect()
}

/// Words the summary's findings, most harmful first.
pub fn verdict(s: &Summary) -> Verdict {
    let mut v = Verdict {
        stalled_pids: Vec::new(),
        killed_pids: Vec::new(),
        dropping_pids: Vec::new(),
        text: String::new(),
    };
    let mut lines = Vec::new();
    for &f in &s.findings {
        let w = &s.workers[f.worker()];
        let (pids, line) = match f {
            Finding::Stalled(_) => (&mut v.stalled_pids, stalled(w)),
            Finding::KilledByTimeout(_) => (&mut v.killed_pids, killed(w)),
            Finding::Dropping(_) => (&mut v.dropping_pids, dropping(w)),
        };
        pids.push(w.pid);
        lines.push(line);
    }
    let healthy: Vec<String> = s
        .workers
        .iter()
        .filter(|w| w.role == Role::Worker && w.state == WorkerState::Healthy)
        .map(|w| w.pid.to_string())
        .collect();
    if lines.is_empty() {
        lines = all_clear(s, healthy.len());
    } else if !healthy.is_empty() {
        lines.push(format!("healthy: worker(s) {}", healthy.join(", ")));
    }
    v.text = lines.join("\n");
    v
}
