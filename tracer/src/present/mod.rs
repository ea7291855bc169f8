//! Presentation: the same findings in the ecosystem's languages. JSON lines
//! (the documented schema, docs/events.md), a text view a person reads
//! first, and Prometheus metrics. Strings from traced processes are
//! untrusted: JSON escaping handles them there, and the text view
//! neutralises control characters so a process name cannot drive the
//! terminal.
mod clock;
mod exits;
mod json;
pub mod metrics;
mod pystack;
mod summary_text;
mod text;
mod verdict;

pub use clock::{Clock, monotonic_ns};
pub use json::{StartEvent, SummaryEvent, json_line};
pub use summary_text::text_summary;
pub use text::{colorize, start_line, text_line};
pub use verdict::{Verdict, verdict};

use crate::model::{Offender, Role, StallReport, StallState, WaitFd, WorkerSummary};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Replaces control characters (ESC, CR, newlines, C1 controls), and the
/// invisible characters that reorder or hide text (bidi overrides and
/// isolates, zero-width characters, line and paragraph separators), so that
/// data from traced processes can neither move the cursor nor make a line
/// read as something it is not (U+202E turns "exe.gnp" into "png.exe").
/// `most from pid 12 (pod shop/web-1): 40`: whom a loss was charged to
/// most, with its pod when the summary has the process; empty for none.
pub fn charged_to(o: Option<Offender>, workers: &[WorkerSummary]) -> String {
    let Some(o) = o else {
        return String::new();
    };
    let pod = workers
        .iter()
        .find(|w| w.pid == o.pid)
        .and_then(|w| w.container.as_ref())
        .and_then(|c| {
            let pod = c.pod.as_ref()?;
            Some(match &c.namespace {
                Some(ns) => format!("{ns}/{pod}"),
                None => pod.clone(),
            })
        });
    match pod {
        Some(p) => format!(
            "most from pid {} (pod {}): {}",
            o.pid,
            sanitize(&p),
            o.count
        ),
        None => format!("most from pid {}: {}", o.pid, o.count),
    }
}

pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if is_hidden(c) { '?' } else { c })
        .collect()
}

/// A control character, or a Unicode format character that changes how
/// the text around it is shown without being seen itself.
fn is_hidden(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061C}'
                | '\u{180E}'
                | '\u{200B}'..='\u{200F}'
                | '\u{2028}'..='\u{202E}'
                | '\u{2060}'..='\u{2069}'
                | '\u{FEFF}'
                | '\u{FFF9}'..='\u{FFFB}'
        )
}

/// `1.5s`
fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// What holds a hung request, when known: its worker's stall, else the
/// threads blocked on an fd ("thread 12 [gunicorn] blocked in read() on fd
/// 11 (pipe:[1234])"), else nothing seen.
fn holders(h: &crate::model::HungRequest) -> String {
    if h.worker_timeout {
        return match &h.timeout_stall {
            Some(s) => format!(
                "its worker is being killed by Gunicorn's WORKER TIMEOUT, blamed on {}{}",
                which_thread(s),
                describe_stall(s, "blocking")
            ),
            None => "its worker is being killed by Gunicorn's WORKER TIMEOUT (no stall of its loop thread was seen)".into(),
        };
    }
    if let Some(s) = &h.stall {
        return format!(
            "the worker is stalled {} in {}",
            secs(s.blocked_ms),
            describe_call(s)
        );
    }
    if h.blocked_threads.is_empty() {
        return "no thread was seen blocked on an fd (a greenlet or a lock?)".into();
    }
    let threads: Vec<String> = h
        .blocked_threads
        .iter()
        .map(|t| {
            let on = match (t.fd, &t.fd_target) {
                (Some(fd), Some(tg)) => format!(" on fd {fd} ({tg})"),
                (Some(fd), None) => format!(" on fd {fd}"),
                _ => String::new(),
            };
            format!(
                "thread {} [{}] blocked in {}(){on}",
                t.tid, t.comm, t.syscall
            )
        })
        .collect();
    let more = match h.blocked_threads_omitted {
        0 => String::new(),
        n => format!(" and {n} more"),
    };
    threads.join(", ") + &more
}

/// "pipe:[1234]", "socket:[99] to 10.0.3.7:5432"
fn describe_fd(target: Option<&str>, peer: Option<&str>) -> Option<String> {
    match (target, peer) {
        (Some(t), Some(p)) => Some(format!("{t} to {p}")),
        (Some(t), None) => Some(t.to_string()),
        (None, Some(p)) => Some(format!("to {p}")),
        (None, None) => None,
    }
}

/// "read() on fd 11 (pipe:[1234])", "poll() on fd 7 (socket:[99] to
/// 10.0.3.7:5432)", "select() on fds 3, 5, 9"; "the CPU, without a syscall"
fn describe_call(s: &StallReport) -> String {
    let Some(call) = &s.syscall else {
        return where_without_syscall(s.state).into();
    };
    let peer = |fd: i32| {
        s.wait_fds
            .iter()
            .find(|w| w.fd == fd)
            .and_then(|w| w.peer.as_deref())
    };
    match (s.fd, s.wait_fds.as_slice()) {
        (Some(fd), _) => match describe_fd(s.fd_target.as_deref(), peer(fd)) {
            Some(d) => format!("{call}() on fd {fd} ({d})"),
            None => format!("{call}() on fd {fd}"),
        },
        (None, [one]) => match describe_fd(one.target.as_deref(), one.peer.as_deref()) {
            Some(d) => format!("{call}() on fd {} ({d})", one.fd),
            None => format!("{call}() on fd {}", one.fd),
        },
        (None, []) => format!("{call}()"),
        (None, many) => format!("{call}() on fds {}", fd_list(many)),
    }
}

fn fd_list(fds: &[WaitFd]) -> String {
    fds.iter()
        .map(|w| match &w.peer {
            Some(p) => format!("{} ({p})", w.fd),
            None => w.fd.to_string(),
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// "blocked 2.0s in read() on fd 11 (pipe:[1234])", "on the CPU 2.5s
/// without sleeping (2.4s of CPU)", "busy 3.0s away from its loop, in
/// calls each under the threshold (0.4s of CPU)"
fn describe_stall(s: &StallReport, blocked: &str) -> String {
    let measured = |what: String| match s.measured_ms {
        Some(ms) => format!(" ({what} in the last {})", secs(ms)),
        None => format!(" ({what})"),
    };
    let cpu = s
        .cpu_ms
        .map(|c| measured(format!("{} of CPU", secs(c))))
        .unwrap_or_default();
    match s.state {
        StallState::Blocked => format!(
            "{blocked} {}{} in {}",
            at_least(s),
            secs(s.blocked_ms),
            describe_call(s)
        ),
        // The kernel counted no sleep: whether it made syscalls that did
        // not sleep is not known.
        StallState::OnCpu => match (&s.samples_ms, &s.handler) {
            (Some(at), Some(h)) if at.len() == 2 => format!(
                "on the CPU at least {} without sleeping{cpu}; two stacks read {} apart were both inside {}() ({}:{})",
                secs(s.blocked_ms),
                secs(at[1].saturating_sub(at[0])),
                // Read from the target's memory: may hold anything.
                sanitize(&h.function),
                sanitize(h.short_file()),
                h.line.map_or("?".to_string(), |l| l.to_string())
            ),
            _ => format!("on the CPU {} without sleeping{cpu}", secs(s.blocked_ms)),
        },
        StallState::Busy => {
            let what = match (s.sleeps, s.cpu_ms) {
                (Some(n), Some(c)) => measured(format!("{n} sleeps, {} of CPU", secs(c))),
                _ => cpu,
            };
            format!(
                "busy {} away from its loop, in calls each under the threshold{what}",
                secs(s.blocked_ms)
            )
        }
    }
}

/// "at least " when `blocked_ms` counts from the attach, not from the
/// call's start.
fn at_least(s: &StallReport) -> &'static str {
    if s.since_attach { "at least " } else { "" }
}

/// Where a stall without a syscall was: "on the CPU", "away from its loop".
fn where_without_syscall(state: StallState) -> &'static str {
    match state {
        StallState::Busy => "away from its loop",
        _ => "on the CPU",
    }
}

/// "thread 102 (ThreadPoolExecu) " for a thread other than the main one.
fn which_thread(s: &StallReport) -> String {
    if s.tid == s.pid {
        return String::new();
    }
    format!("thread {} ({}) ", s.tid, s.thread_name)
}

/// Said when Gunicorn's timeout cannot catch the stall: a thread other
/// than the loop thread (which keeps the heartbeat), or a worker that never
/// heartbeated (Gunicorn 22 and later compare the heartbeat file's mtime,
/// which only a heartbeat makes a monotonic time, with their monotonic
/// clock: an untouched file never looks stale).
fn never_noticed(s: &StallReport) -> Option<String> {
    let request = s.request_peer.as_deref().map(|peer| {
        let waited = s
            .request_waiting_ms
            .map(|ms| format!(" {}", secs(ms)))
            .unwrap_or_default();
        format!("a request from {peer} has waited{waited} in this process with nothing sent back")
    });
    if s.role != Role::Worker {
        return request;
    }
    if s.tid == s.pid {
        if s.never_heartbeated != Some(true) {
            return None;
        }
        let head = "it has not heartbeated since its fork, so Gunicorn 22 and later will not kill it (they compare the untouched heartbeat file's wall-clock mtime with their monotonic clock)";
        // Hanging for good is said only once the wait has outlasted a boot.
        return Some(if s.outlasts_a_boot() {
            format!("{head}: it hangs until restarted")
        } else {
            format!("{head} while it waits")
        });
    }
    let class = s
        .worker_class
        .as_ref()
        .map(|c| match c.source {
            crate::model::SettingSource::Inferred => format!("{} worker (inferred): ", c.name),
            _ => format!("{} worker: ", c.name),
        })
        .unwrap_or_default();
    let mut line =
        format!("{class}the main thread keeps the heartbeat, so Gunicorn will never notice");
    if let Some(r) = request {
        line.push_str(&format!("; {r}"));
    }
    Some(line)
}

#[cfg(test)]
mod tests {
    use super::{describe_stall, sanitize};
    use crate::model::{OnCpuEvidence, PyFrame, StallReport, StallState};

    /// The stack samples are said only when the report holds them; the
    /// heartbeat rule's report says no stack decided it by saying none.
    #[test]
    fn on_the_cpu_says_the_two_stacks_only_when_it_holds_them() {
        let mut s = StallReport {
            state: StallState::OnCpu,
            blocked_ms: 600,
            cpu_ms: Some(550),
            measured_ms: Some(600),
            on_cpu_evidence: Some(OnCpuEvidence::StackSamples),
            samples_ms: Some(vec![250, 500]),
            handler: Some(PyFrame {
                function: "app\u{202E}".into(),
                file: "/srv/app.py".into(),
                line: Some(40),
            }),
            ..Default::default()
        };
        assert_eq!(
            describe_stall(&s, "blocked"),
            "on the CPU at least 0.6s without sleeping (0.6s of CPU in the last 0.6s); two stacks read 0.2s apart were both inside app?() (/srv/app.py:40)"
        );
        s.on_cpu_evidence = Some(OnCpuEvidence::Heartbeat);
        s.samples_ms = None;
        s.handler = None;
        let words = describe_stall(&s, "blocked");
        assert_eq!(
            words,
            "on the CPU 0.6s without sleeping (0.6s of CPU in the last 0.6s)"
        );
    }

    /// Issue 20, item 14: bidi overrides and isolates, zero-width and line
    /// separator characters went through into the text view.
    #[test]
    fn hidden_characters_are_replaced_and_ordinary_text_kept() {
        let evil = "app\u{202E}exe.gnp\u{2066}x\u{2069}\u{200B}\u{2028}\u{2029}\x1b[2J\r\t";
        let out = sanitize(evil);
        assert_eq!(out, "app?exe.gnp?x?????[2J??");
        assert_eq!(
            sanitize("café: wsgi:app — ünïcode 名前"),
            "café: wsgi:app — ünïcode 名前"
        );
    }
}
