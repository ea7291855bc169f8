//! The verdict: the ranked findings of `analysis` in sentences, the first
//! thing a person reads.
use serde::Serialize;

use super::{
    at_least, describe_call, describe_stall, exits, holders, never_noticed, sanitize, secs,
    which_thread,
};
use crate::model::{
    Basis, Finding, Losses, NoWriterThread, Role, StallReport, Summary, WorkerState, WorkerSummary,
};

#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub stalled_pids: Vec<u32>,
    pub killed_pids: Vec<u32>,
    /// Workers that closed requests with nothing sent (or cut upstream calls).
    pub dropping_pids: Vec<u32>,
    /// Killed by the kernel's OOM killer.
    pub oom_killed_pids: Vec<u32>,
    /// Workers that failed to boot or to load the app (the master halts).
    pub boot_failed_pids: Vec<u32>,
    /// Killed by a signal from outside Gunicorn (kill -9, a crash).
    pub killed_externally_pids: Vec<u32>,
    /// Closed keep-alive connections on which a request was then lost.
    pub keepalive_race_pids: Vec<u32>,
    /// Held requests past --request-threshold without an answer.
    pub hung_request_pids: Vec<u32>,
    pub text: String,
}

fn name(w: &WorkerSummary) -> String {
    format!("{} {} (master {})", w.role.as_str(), w.pid, w.master_pid)
}

/// Why the call cannot return, and the known cause with its fix.
fn why(s: &StallReport) -> String {
    let mut w = String::new();
    if s.only_self_can_wake == Some(true) {
        // A pipe's write end is the process's: any of its threads may write
        // it, unless none can run (a blocked gevent hub) or there is none.
        w.push_str(match s.no_other_writer_thread() {
            Some(NoWriterThread::BlockedHub) => {
                ", which only the blocked process itself can write to, through a greenlet of its blocked hub, so it can never return"
            }
            Some(NoWriterThread::OneThread) => {
                ", which only the blocked process itself can write to, and it has no other thread to write it, so it can never return"
            }
            None => {
                ", a pipe only this process writes to; another of its threads must write it"
            }
        });
    }
    match &s.cause {
        Some(c) => w.push_str(&format!(
            "; {}: {}. Fix: {}",
            match &c.evidence {
                Some(e) if e.basis == Basis::Frame => "cause, from its stack",
                _ => "likely cause",
            },
            sanitize(&c.cause),
            sanitize(&c.fix)
        )),
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

fn timed_out(w: &WorkerSummary) -> String {
    let line = match &w.timeout_stall {
        Some(s) => format!(
            "{} was killed by Gunicorn's WORKER TIMEOUT after {}{}{}",
            name(w),
            which_thread(s),
            describe_stall(s, "blocking"),
            why(s)
        ),
        None => match w.timeout_watched_ms {
            Some(ms) if w.timeout.is_none() => format!(
                "{} was killed by Gunicorn's WORKER TIMEOUT; no stall was seen in the {} the tracer watched it; its --timeout is not known: its cause was not seen",
                name(w),
                secs(ms)
            ),
            None => format!(
                "{} was killed by Gunicorn's WORKER TIMEOUT; no stall of its loop thread was seen in the timeout window: its cause was not seen",
                name(w)
            ),
            Some(ms) => format!(
                "{} was killed by Gunicorn's WORKER TIMEOUT; the tracer had watched it only {}, less than its --timeout window: its cause was not seen",
                name(w),
                secs(ms)
            ),
        },
    };
    line + &lost_with_it(w)
}

/// The requests a worker lost when it died, told with its death (one
/// story): "; 2 request(s) in flight were lost with it (last from ...)".
fn lost_with_it(w: &WorkerSummary) -> String {
    let n = w.early_closes.lost_at_exit;
    if n == 0 || !w.death_tells_lost_requests() {
        return String::new();
    }
    let last = w
        .last_early_close
        .as_ref()
        .filter(|e| e.dying.is_some())
        .and_then(|e| e.peer.as_deref())
        .map(|p| format!(" (last from {p})"))
        .unwrap_or_default();
    format!("; {n} request(s) in flight were lost with it, their clients got nothing{last}")
}

fn dropping(w: &WorkerSummary) -> String {
    let c = &w.early_closes;
    // Those lost at its death are told with the death.
    let folded = w.death_tells_lost_requests();
    let dropped = if folded {
        c.dropped_request.saturating_sub(c.lost_at_exit)
    } else {
        c.dropped_request
    };
    let mut what = Vec::new();
    if dropped > 0 {
        what.push(format!(
            "dropped {dropped} request(s) (closed the client's connection with nothing sent back)"
        ));
    }
    if c.upstream_cut > 0 {
        what.push(format!(
            "cut {} upstream call(s) short (closed before any reply)",
            c.upstream_cut
        ));
    }
    let mut line = format!("{} {}", name(w), what.join(" and "));
    let last = w
        .last_early_close
        .as_ref()
        .filter(|e| !(folded && e.dying.is_some()));
    if let Some(e) = last {
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

/// The exit of `w` in words, after its name.
fn exit_of(w: &WorkerSummary) -> String {
    match &w.exit {
        Some(why) => exits::exit_words(
            w.pid,
            w.master_pid,
            w.exit_code,
            w.exit_signal.as_deref(),
            why,
        ),
        None => "exited".into(),
    }
}

/// "worker 7 (master 1) was killed by the kernel's OOM killer: ...", or
/// by whatever killed it, with the last stall it had, if any.
fn killed(w: &WorkerSummary) -> String {
    let mut line = format!("{} was {}{}", name(w), exit_of(w), lost_with_it(w));
    if let Some(st) = w.stall.as_ref().filter(|_| w.stalls > 0) {
        line.push_str(&format!(
            "; it had stalled {} time(s), last for {}{} in {}",
            w.stalls,
            at_least(st),
            secs(st.blocked_ms),
            describe_call(st)
        ));
    }
    line
}

/// "worker 7 (master 1) exited with code 3: the worker failed to boot ..."
fn halted(w: &WorkerSummary) -> String {
    format!("{} {}", name(w), exit_of(w))
}

/// "worker 7 (master 1) is HANGING 1 request(s): ..." (or held them).
fn hung(w: &WorkerSummary) -> String {
    let Some(h) = &w.hung_request else {
        return format!(
            "{} held {} request(s) without an answer",
            name(w),
            w.hung_requests
        );
    };
    let head = if w.hanging_now > 0 {
        format!(
            "{} is HANGING {} request(s): {} has waited {} with nothing sent back",
            name(w),
            w.hanging_now,
            h.peer,
            secs(h.waiting_ms)
        )
    } else {
        format!(
            "{} held {} request(s) past --request-threshold ({}) without an answer; last from {}",
            name(w),
            w.hung_requests,
            secs(h.threshold_ms),
            h.peer
        )
    };
    let when = if w.hanging_now > 0 {
        ""
    } else {
        "at the time: "
    };
    format!("{head}; {when}{}", holders(h))
}

/// "worker 7 (master 1): 3 request(s) lost to keep-alive races: ..."
fn racing(w: &WorkerSummary) -> String {
    let last = w.last_keepalive_race.as_ref();
    let keepalive = last
        .and_then(|e| e.keepalive_s)
        .map(|k| format!(" ({k}s)"))
        .unwrap_or_default();
    let mut line = format!(
        "{}: {} request(s) lost to keep-alive races: the client or load balancer reuses connections longer than Gunicorn's keep-alive{keepalive}; set --keep-alive above the balancer's idle timeout (ALB default 60 s)",
        name(w),
        w.early_closes.keepalive_race
    );
    if let Some(e) = last {
        line.push_str(&format!("; last: {}", e.peer.as_deref().unwrap_or("?")));
        if let Some(idle) = e.idle_ms {
            line.push_str(&format!(", closed after {} idle", secs(idle)));
        }
        if let Some(after) = e.reset_after_ms {
            line.push_str(&format!(", its next request came {} later", secs(after)));
        }
    }
    line
}

/// What the tracer could not see, in words ("12 kernel event(s) were
/// lost", "worker 7's event loop was not found"); empty when it saw all.
fn unseen(s: &Summary, l: &Losses) -> Vec<String> {
    let mut out = Vec::new();
    // A lost request it cannot see at all keeps "no request dropped" away.
    if l.features_missing.keepalive_race {
        out.push(
            "requests lost to keep-alive races cannot be seen on this kernel (no usable tcp:tcp_send_reset, and no kprobe on tcp_v4_send_reset)"
                .to_string(),
        );
    }
    if l.events_lost > 0 {
        out.push(format!("{} kernel event(s) were lost", l.events_lost));
    }
    if l.inflight_full > 0 {
        out.push(format!(
            "{} thread sleep(s) were not recorded (in-flight map full)",
            l.inflight_full
        ));
    }
    if l.masters_over_quota > 0 {
        out.push(format!(
            "{} Gunicorn master(s) were not watched (their container was at --max-masters-per-container)",
            l.masters_over_quota
        ));
    }
    if l.threads_over_quota > 0 {
        out.push(format!(
            "{} thread sleep(s) were not recorded (their master was at --max-threads-per-master)",
            l.threads_over_quota
        ));
    }
    if l.events_rate_limited > 0 {
        out.push(format!(
            "{} connection-end or signal event(s) of a flooding process were not sent",
            l.events_rate_limited
        ));
    }
    if l.watch_full + l.over_quota > 0 {
        out.push(format!(
            "{} forked process(es) were not watched",
            l.watch_full + l.over_quota
        ));
    }
    if l.stalls_held_back > 0 {
        out.push(format!(
            "{} stall(s) of a flooding process went unreported",
            l.stalls_held_back
        ));
    }
    if l.conns_untracked > 0 {
        out.push(format!(
            "{} connection(s) were not tracked from their start",
            l.conns_untracked
        ));
    }
    if l.bpf_errors > 0 {
        out.push(format!(
            "{} run(s) of the kernel programs failed",
            l.bpf_errors
        ));
    }
    if l.conns_unreadable > 0 {
        out.push(format!(
            "{} closed connection(s) could not be judged",
            l.conns_unreadable
        ));
    }
    if l.ports_unscanned > 0 {
        out.push(format!(
            "{} listening port(s) were not scanned for hung requests",
            l.ports_unscanned
        ));
    }
    // Until a worker's loop is found its main thread's waits in poll,
    // select or epoll are not judged.
    let loopless: Vec<String> = s
        .workers
        .iter()
        .filter(|w| w.loop_found == Some(false))
        .map(|w| w.pid.to_string())
        .collect();
    match loopless.as_slice() {
        [] => {}
        [one] => out.push(format!("worker {one}'s event loop was not found")),
        many => out.push(format!(
            "the event loops of workers {} were not found",
            many.join(", ")
        )),
    }
    out
}

/// With nothing wrong: say what was watched, or the stalls that are over.
/// "healthy" only when nothing was lost and every loop was found.
fn all_clear(s: &Summary, healthy: usize, unseen: &[String]) -> Vec<String> {
    let past: Vec<&WorkerSummary> = s.workers.iter().filter(|w| w.stalls > 0).collect();
    if past.is_empty() {
        if !unseen.is_empty() {
            return vec![format!(
                "no stall seen, but {}: a stall or a dropped request may have been missed ({healthy} worker(s) watched)",
                unseen.join(", ")
            )];
        }
        return vec![format!(
            "healthy: {healthy} worker(s) watched, no syscall blocked an event loop for {}ms or more, no request dropped",
            s.threshold_ms
        )];
    }
    past.into_iter()
        .map(|w| {
            let st = w.stall.as_ref().expect("stalls > 0 has a stall");
            let last = match st.syscall {
                Some(_) => format!(
                    "{}{} in {}",
                    at_least(st),
                    secs(st.blocked_ms),
                    describe_call(st)
                ),
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
pub fn verdict(s: &Summary, losses: &Losses) -> Verdict {
    let mut v = Verdict {
        stalled_pids: Vec::new(),
        killed_pids: Vec::new(),
        dropping_pids: Vec::new(),
        oom_killed_pids: Vec::new(),
        boot_failed_pids: Vec::new(),
        killed_externally_pids: Vec::new(),
        keepalive_race_pids: Vec::new(),
        hung_request_pids: Vec::new(),
        text: String::new(),
    };
    let mut lines = Vec::new();
    for &f in &s.findings {
        let w = &s.workers[f.worker()];
        let (pids, line) = match f {
            Finding::Halted(_) => (&mut v.boot_failed_pids, halted(w)),
            Finding::Stalled(_) => (&mut v.stalled_pids, stalled(w)),
            Finding::HungRequests(_) => (&mut v.hung_request_pids, hung(w)),
            Finding::OomKilled(_) => (&mut v.oom_killed_pids, killed(w)),
            Finding::KilledByTimeout(_) => (&mut v.killed_pids, timed_out(w)),
            Finding::Dropping(_) => (&mut v.dropping_pids, dropping(w)),
            Finding::KilledExternally(_) => (&mut v.killed_externally_pids, killed(w)),
            Finding::KeepaliveRaces(_) => (&mut v.keepalive_race_pids, racing(w)),
        };
        pids.push(w.pid);
        lines.push(line);
    }
    let named: Vec<usize> = s.findings.iter().map(|f| f.worker()).collect();
    let healthy: Vec<String> = s
        .workers
        .iter()
        .enumerate()
        .filter(|(i, w)| {
            w.role == Role::Worker && w.state == WorkerState::Healthy && !named.contains(i)
        })
        .map(|(_, w)| w)
        .map(|w| w.pid.to_string())
        .collect();
    let unseen = unseen(s, losses);
    if lines.is_empty() {
        lines = all_clear(s, healthy.len(), &unseen);
    } else if !healthy.is_empty() {
        let word = if unseen.is_empty() {
            "healthy"
        } else {
            "nothing seen wrong with"
        };
        lines.push(format!("{word}: worker(s) {}", healthy.join(", ")));
    }
    // What could not be seen comes first, unless it is the only line.
    if !unseen.is_empty() && !lines[0].starts_with("no stall seen, but") {
        lines.insert(
            0,
            format!(
                "not everything was seen: {}: a stall or a dropped request may have been missed",
                unseen.join(", ")
            ),
        );
    }
    v.text = lines.join("\n");
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Losses;

    fn worker(pid: u32, loop_found: Option<bool>) -> WorkerSummary {
        WorkerSummary {
            loop_found,
            ..WorkerSummary::quiet(pid)
        }
    }

    fn summary(workers: Vec<WorkerSummary>) -> Summary {
        Summary {
            workers,
            exited_quiet: 0,
            findings: Vec::new(),
            threshold_ms: 500,
            exits: Default::default(),
        }
    }

    /// On a kernel that cannot show keep-alive races (6.1's
    /// tcp_send_reset), "no request dropped" is not said; the missing
    /// `preceded_by` field or OOM names change no verdict.
    #[test]
    fn a_kernel_blind_to_keepalive_races_is_never_called_healthy() {
        use crate::model::FeaturesMissing;
        let all_seen = summary(vec![worker(7, Some(true))]);
        let blind = Losses {
            features_missing: FeaturesMissing {
                keepalive_race: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = verdict(&all_seen, &blind).text;
        assert!(!text.contains("healthy"), "{text}");
        assert!(
            text.contains("requests lost to keep-alive races cannot be seen on this kernel"),
            "{text}"
        );
        let older = Losses {
            features_missing: FeaturesMissing {
                preceded_by: true,
                oom_kill: true,
                ..Default::default()
            },
            ..Default::default()
        };
        let text = verdict(&all_seen, &older).text;
        assert!(text.starts_with("healthy: 1 worker(s) watched"), "{text}");
        assert!(!text.contains("keep-alive"), "{text}");
    }

    #[test]
    fn healthy_only_when_nothing_was_lost_and_every_loop_was_found() {
        let all_seen = summary(vec![worker(7, Some(true)), worker(8, Some(true))]);
        let text = verdict(&all_seen, &Losses::default()).text;
        assert!(text.starts_with("healthy: 2 worker(s) watched"), "{text}");
        // Events lost: the same run is not called healthy, and what could
        // not be seen comes first.
        let lost = Losses {
            events_lost: 12,
            ..Default::default()
        };
        let text = verdict(&all_seen, &lost).text;
        assert!(!text.contains("healthy"), "{text}");
        assert!(
            text.starts_with("no stall seen, but 12 kernel event(s) were lost"),
            "{text}"
        );
        assert!(
            text.contains("a stall or a dropped request may have been missed"),
            "{text}"
        );
        // A worker whose loop was never found: a stall of its loop in a
        // multiplexer would not be seen.
        let no_loop = summary(vec![worker(7, Some(false)), worker(8, Some(true))]);
        let text = verdict(&no_loop, &Losses::default()).text;
        assert!(!text.contains("healthy"), "{text}");
        assert!(
            text.contains("worker 7's event loop was not found"),
            "{text}"
        );
        // Full maps and failed kernel programs are blind spots too.
        for l in [
            Losses {
                inflight_full: 2,
                ..Default::default()
            },
            Losses {
                watch_full: 1,
                ..Default::default()
            },
            Losses {
                bpf_errors: 3,
                ..Default::default()
            },
            // Closes that could not be judged, ports not scanned.
            Losses {
                conns_unreadable: 2,
                ..Default::default()
            },
            Losses {
                ports_unscanned: 3,
                ..Default::default()
            },
            // Stalls of a flood over before their turn to be reported.
            Losses {
                stalls_held_back: 1,
                ..Default::default()
            },
            // A master's threads over their quota; a process's events
            // over its rate.
            Losses {
                threads_over_quota: 5,
                ..Default::default()
            },
            Losses {
                events_rate_limited: 9,
                ..Default::default()
            },
            Losses {
                masters_over_quota: 2,
                ..Default::default()
            },
        ] {
            let text = verdict(&all_seen, &l).text;
            assert!(text.starts_with("no stall seen, but"), "{l:?}: {text}");
        }
        // Holders not searched hide no stall: the stall itself was said.
        let l = Losses {
            holders_unsearched: 4,
            ..Default::default()
        };
        let text = verdict(&all_seen, &l).text;
        assert!(!text.starts_with("no stall seen, but"), "{text}");
    }

    #[test]
    fn what_could_not_be_seen_comes_before_past_stalls_and_healthy_lists() {
        let mut past = worker(7, Some(true));
        past.stalls = 1;
        past.stall = Some(StallReport {
            pid: 7,
            tid: 7,
            syscall: Some("read".into()),
            blocked_ms: 700,
            ..Default::default()
        });
        let s = summary(vec![past, worker(8, Some(false))]);
        let text = verdict(&s, &Losses::default()).text;
        let first = text.lines().next().unwrap();
        assert!(
            first.contains("worker 8's event loop was not found"),
            "{text}"
        );
        assert!(text.contains("no worker is stalled now"), "{text}");
    }
}
