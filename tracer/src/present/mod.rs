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
mod text;
mod verdict;

pub use clock::{Clock, monotonic_ns};
pub use json::{StartEvent, SummaryEvent, json_line};
pub use text::{colorize, start_line, text_line, text_summary};
pub use verdict::{Verdict, verdict};

use crate::model::StallReport;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

/// Replaces control characters (ESC, CR, newlines, C1 controls) so that data
/// from traced processes cannot move the cursor or rewrite the screen.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// `1.5s`
fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

/// What holds a hung request, when known: its worker's stall, else the
/// threads blocked on an fd ("thread 12 [gunicorn] blocked in read() on fd
/// 11 (pipe:[1234])"), else nothing seen.
fn holders(h: &crate::model::HungRequest) -> String {
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
    threads.join(", ")
}

/// "read() on fd 11 (pipe:[1234])"
fn describe_call(s: &StallReport) -> String {
    match (s.fd, &s.fd_target) {
        (Some(fd), Some(t)) => format!("{}() on fd {fd} ({t})", s.syscall),
        (Some(fd), None) => format!("{}() on fd {fd}", s.syscall),
        _ => format!("{}()", s.syscall),
    }
}
