//! The text view's closing summary: the verdict on top, one row per
//! process, then what could not be seen, each loss with the process it was
//! charged to most.
use super::json::SummaryEvent;
use super::{charged_to, describe_call, sanitize, secs, where_without_syscall};
use crate::model::StallState;

/// The summary for a person: the verdict first, then one row per process.
pub fn text_summary(s: &SummaryEvent) -> String {
    let mut out = String::new();
    out.push_str("\n== VERDICT ==\n");
    for line in s.verdict.text.lines() {
        out.push_str(&sanitize(line));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&format!(
        "{:<8} {:<8} {:<8} {:<18} {:>6} {:>8} {:>7} {:>5} {:>8}  {}\n",
        "PID",
        "MASTER",
        "ROLE",
        "STATE",
        "STALLS",
        "TIMEOUTS",
        "DROPPED",
        "IDLE",
        "UPSTREAM",
        "LAST STALL"
    ));
    for w in s.workers {
        let last = w
            .stall
            .as_ref()
            .map(|st| match st.state {
                StallState::Blocked => {
                    format!(
                        "{}{} {}",
                        if st.since_attach { ">=" } else { "" },
                        secs(st.blocked_ms),
                        sanitize(&describe_call(st))
                    )
                }
                state => format!("{} {}", secs(st.blocked_ms), where_without_syscall(state)),
            })
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<8} {:<8} {:<8} {:<18} {:>6} {:>8} {:>7} {:>5} {:>8}  {}\n",
            w.pid,
            w.master_pid,
            w.role.as_str(),
            w.state.as_str(),
            w.stalls,
            w.timeouts,
            w.early_closes.dropped_request,
            w.early_closes.idle,
            w.early_closes.upstream_cut,
            last
        ));
    }
    let l = &s.losses;
    let top = &l.top_offenders;
    // `sep` and whom the loss was charged to most, or nothing.
    let charged = |sep: &str, o| {
        let c = charged_to(o, s.workers);
        if c.is_empty() { c } else { format!("{sep}{c}") }
    };
    if l.events_lost > 0 {
        out.push_str(&format!(
            "WARNING: {} kernel event(s) were lost (ring buffer full{}); the picture above may be incomplete\n",
            l.events_lost,
            charged(", ", top.events_lost)
        ));
    }
    if l.watch_full + l.over_quota > 0 {
        out.push_str(&format!(
            "WARNING: {} forked process(es) were not watched ({} with the kernel's watch list full{}; {} past --max-watched-per-master{})\n",
            l.watch_full + l.over_quota,
            l.watch_full,
            charged(", ", top.watch_full),
            l.over_quota,
            charged(", ", top.over_quota)
        ));
    }
    // Each count with what it means it did not see.
    let counted: [(u64, &str, String); 10] = [
        (
            l.masters_over_quota,
            "Gunicorn master(s) were not watched: their container already had --max-masters-per-container watched; a stall in one would not be seen",
            top.masters_over_quota
                .map(|o| format!(" (the last: pid {}", o.pid))
                .unwrap_or_default(),
        ),
        (
            l.inflight_full,
            "thread sleep(s) could not be recorded (in-flight map full); a stall in one would not be seen",
            charged(" (", top.inflight_full),
        ),
        (
            l.threads_over_quota,
            "thread sleep(s) were not recorded: their master's threads held --max-threads-per-master entries of the in-flight map; a stall in one would not be seen",
            charged(" (", top.threads_over_quota),
        ),
        (
            l.events_rate_limited,
            "connection-end or signal event(s) were not sent: their process was over its rate (a flood); its early closes and signals are undercounted",
            charged(" (", top.events_rate_limited),
        ),
        (
            l.conns_unreadable,
            "closed connection(s) could not be judged (the kernel could not read their byte counters); a request dropped on one would not be seen",
            charged(" (", top.conns_unreadable),
        ),
        (
            l.stall_ends_unknown,
            "stall(s) ended in a way not known (the call left the kernel's map with no word on how)",
            String::new(),
        ),
        (
            l.ports_unscanned,
            "listening port(s) past the 64 scanned per network namespace; a request hung on one would not be seen",
            String::new(),
        ),
        (
            l.conns_untracked,
            "connection start(s) could not be recorded (the connection map refused them); their lifetimes are unknown",
            String::new(),
        ),
        (
            l.stalls_held_back,
            "stall(s) were not reported: their master had more new stalls at once than are reported per poll, and they ended before their turn",
            String::new(),
        ),
        (
            l.holders_unsearched,
            "stall(s) on a pipe were reported without searching the pipe's holders (the search's time budget was spent); who could write to it is unknown for them",
            String::new(),
        ),
    ];
    for (n, what, by) in counted.into_iter().filter(|(n, ..)| *n > 0) {
        let by = if by.is_empty() { by } else { format!("{by})") };
        out.push_str(&format!("WARNING: {n} {what}{by}\n"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_loss_names_the_process_charged_most_and_only_when_there_is_one() {
        use crate::model::{
            Container, Losses, MapOccupancy, Offender, Summary, TopOffenders, WorkerSummary,
        };
        let mut w = WorkerSummary::quiet(7);
        w.container = Some(Container {
            pod: Some("web-1".into()),
            namespace: Some("shop".into()),
            ..Default::default()
        });
        let summary = Summary {
            workers: vec![w],
            exited_quiet: 0,
            findings: vec![],
            threshold_ms: 500,
            exits: Default::default(),
        };
        let losses = Losses {
            events_lost: 3,
            threads_over_quota: 40,
            inflight_full: 2,
            top_offenders: TopOffenders {
                threads_over_quota: Some(Offender { pid: 7, count: 40 }),
                events_lost: Some(Offender { pid: 99, count: 3 }),
                ..Default::default()
            },
            ..Default::default()
        };
        let ev = SummaryEvent::new(&summary, 1000, losses, MapOccupancy::default());
        let t = text_summary(&ev);
        assert!(
            t.contains("WARNING: 40 thread sleep(s) were not recorded: their master's threads held --max-threads-per-master entries of the in-flight map; a stall in one would not be seen (most from pid 7 (pod shop/web-1): 40)\n"),
            "{t}"
        );
        assert!(
            t.contains("WARNING: 3 kernel event(s) were lost (ring buffer full, most from pid 99: 3); the picture"),
            "{t}"
        );
        // A count the kernel charged to no one is said without a name.
        assert!(
            t.contains("WARNING: 2 thread sleep(s) could not be recorded (in-flight map full); a stall in one would not be seen\n"),
            "{t}"
        );
        assert!(!t.contains("rate"), "no flood, no word of one: {t}");
        assert!(!t.contains("master(s) were not watched"), "{t}");
        // A master refused: the last one is named, not as a "most from".
        let refused = Losses {
            masters_over_quota: 2,
            events_rate_limited: 7,
            top_offenders: TopOffenders {
                masters_over_quota: Some(Offender { pid: 31, count: 2 }),
                ..Default::default()
            },
            ..Default::default()
        };
        let t = text_summary(&SummaryEvent::new(
            &summary,
            1000,
            refused,
            MapOccupancy::default(),
        ));
        assert!(
            t.contains("WARNING: 2 Gunicorn master(s) were not watched: their container already had --max-masters-per-container watched; a stall in one would not be seen (the last: pid 31)\n"),
            "{t}"
        );
        // A count with no offender recorded is said without a name.
        assert!(
            t.contains("WARNING: 7 connection-end or signal event(s) were not sent: their process was over its rate (a flood); its early closes and signals are undercounted\n"),
            "{t}"
        );
        let quiet = SummaryEvent::new(&summary, 1000, Losses::default(), MapOccupancy::default());
        assert!(!text_summary(&quiet).contains("most from"));
    }
}
