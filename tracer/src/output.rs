//! Output: JSON lines (the documented schema, docs/events.md) and a text view
//! for a person. Strings that come from traced processes are untrusted: JSON
//! escaping handles them there, and the text view neutralises control
//! characters so a process name cannot drive the terminal.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::correlate::{Output, StallReport, Summary, describe_call};
use crate::model::Role;

/// Maps the kernel's monotonic nanoseconds to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let mono = monotonic_ns() as i128;
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Clock {
            offset_ns: real - mono,
        }
    }

    #[cfg(test)]
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall(mono_ns)).to_string()
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Text,
    Json,
}

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    body: &'a T,
    ts: String,
}

/// One JSON object, with `ts` added. Never fails for our types; a failure
/// would be a bug, reported as an error event rather than a panic.
pub fn json_line<T: Serialize>(body: &T, ts: String) -> String {
    serde_json::to_string(&Line { body, ts }).unwrap_or_else(|e| {
        format!(
            r#"{{"event":"error","message":{}}}"#,
            serde_json::Value::from(e.to_string())
        )
    })
}

#[derive(Serialize)]
#[serde(tag = "event", rename = "start")]
pub struct StartEvent {
    pub version: &'static str,
    pub threshold_ms: u64,
    /// true when no --pid was given: every Gunicorn master is watched.
    pub discover: bool,
    pub pids: Vec<u32>,
}

/// Entries in the kernel's maps at the end of the run.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct MapOccupancy {
    /// Processes watched.
    pub watched: usize,
    /// Threads with an in-flight syscall record.
    pub inflight: usize,
    /// Connections being counted.
    pub conns: usize,
}

#[derive(Serialize)]
#[serde(tag = "event", rename = "summary")]
pub struct SummaryEvent<'a> {
    pub duration_ms: u64,
    pub events_lost: u64,
    pub maps: MapOccupancy,
    #[serde(flatten)]
    pub summary: &'a Summary,
}

/// Replaces control characters (ESC, CR, newlines, C1 controls) so that data
/// from traced processes cannot move the cursor or rewrite the screen.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

fn secs(ms: u64) -> String {
    format!("{:.1}s", ms as f64 / 1000.0)
}

fn hhmmss(clock: &Clock, ts_ns: u64) -> String {
    let s = clock.rfc3339(ts_ns);
    // 2026-11-27T04:18:30.123Z -> 04:18:30.123
    s.get(11..23).unwrap_or(&s).to_string()
}

fn stall_details(s: &StallReport) -> String {
    let mut d = format!(
        "{} {} [{}] (master {}) blocked {}{} in {}",
        s.role.as_str(),
        s.pid,
        sanitize(&s.comm),
        s.master_pid,
        secs(s.blocked_ms),
        if s.since_attach {
            "+ (before attach)"
        } else {
            ""
        },
        sanitize(&describe_call(s)),
    );
    if s.tid != s.pid {
        d.push_str(&format!(" [thread {}]", s.tid));
    }
    if let Some(hb) = s.heartbeat_age_ms {
        d.push_str(&format!("; heartbeat {} old", secs(hb)));
        if let Some(t) = s.gunicorn_timeout_s {
            d.push_str(&format!(" (timeout {t}s)"));
        }
    }
    if s.fd_kind == "pipe" || s.fd_kind == "fifo" {
        let writers: Vec<String> = s
            .peers
            .iter()
            .filter(|p| p.end != "read")
            .map(|p| format!("{} {}", p.pid, sanitize(&p.comm)))
            .collect();
        if s.only_self_can_wake == Some(true) {
            d.push_str(
                "; only the blocked process itself holds the write end: it can never be woken",
            );
        } else if writers.is_empty() {
            d.push_str("; no writer holds the pipe");
        } else {
            d.push_str(&format!("; writers: {}", writers.join(", ")));
        }
    }
    if let Some(c) = &s.cause {
        d.push_str(&format!(
            "\n{:>23}likely: {}\n{:>23}fix: {}",
            "", c.cause, "", c.fix
        ));
    }
    if let Some(stack) = &s.py_stack {
        d.push_str(&format!("\n{:>23}python stack (py-spy dump):", ""));
        for line in stack.lines().filter(|l| !l.trim().is_empty()) {
            d.push_str(&format!("\n{:>25}{}", "", sanitize(line)));
        }
    } else if let Some(e) = &s.py_stack_error {
        d.push_str(&format!("\n{:>23}python stack: {}", "", sanitize(e)));
    }
    d
}

/// The text view of one event, or None for events a person does not need.
pub fn text_line(o: &Output, clock: &Clock) -> String {
    let t = hhmmss(clock, o.ts_ns());
    let opt = |a: &Option<String>| {
        a.as_deref()
            .map(|a| format!(" ({})", sanitize(a)))
            .unwrap_or_default()
    };
    match o {
        Output::Master {
            pid,
            app,
            timeout_s,
            source,
            ..
        } => format!(
            "{t}  watch    gunicorn master {pid}{}{}{}",
            opt(app),
            timeout_s
                .map(|t| format!(", timeout {t}s"))
                .unwrap_or_default(),
            if *source == "exec" {
                ", just started"
            } else {
                ""
            }
        ),
        Output::Worker {
            pid,
            master_pid,
            role,
            source,
            ..
        } => {
            let how = match (role, *source == "fork") {
                (Role::Worker, true) => format!("spawned by master {master_pid}"),
                (Role::Worker, false) => format!("found, master {master_pid}"),
                (_, true) => format!("forked, under {master_pid}"),
                (_, false) if pid == master_pid => "watched".to_string(),
                (_, false) => format!("watched, under {master_pid}"),
            };
            format!("{t}  {:<8} {pid} {how}", role.as_str())
        }
        Output::Stall { report, .. } => format!("{t}  STALL    {}", stall_details(report)),
        Output::StallEnd {
            pid,
            syscall,
            blocked_ms,
            outcome,
            ..
        } => format!(
            "{t}  end      {pid} {syscall}() after {}: {}",
            secs(*blocked_ms),
            match outcome {
                crate::correlate::Outcome::Returned => "returned",
                crate::correlate::Outcome::Interrupted => "interrupted by a signal",
                crate::correlate::Outcome::Exited => "the process died inside it",
            },
        ),
        Output::WorkerTimeout {
            pid,
            master_pid,
            signal,
            stall,
            ..
        } => format!(
            "{t}  TIMEOUT  master {master_pid} sent {signal} to worker {pid} (Gunicorn WORKER TIMEOUT){}",
            stall
                .as_ref()
                .map(|s| format!(
                    ": it was blocked {} in {}",
                    secs(s.blocked_ms),
                    sanitize(&describe_call(s))
                ))
                .unwrap_or_else(|| ": no blocking syscall seen".into())
        ),
        Output::EarlyClose { close: e, .. } => {
            let label = match e.kind {
                crate::net::CloseKind::DroppedRequest => "DROPPED ",
                crate::net::CloseKind::Idle => "idle    ",
                crate::net::CloseKind::UpstreamCut => "UPSTREAM",
            };
            let peer = e
                .peer
                .as_deref()
                .map(sanitize)
                .unwrap_or_else(|| "?".into());
            let endpoint = match (e.local_port, e.direction) {
                (Some(port), "inbound") => format!("{peer} -> :{port}"),
                _ => peer,
            };
            let fd = e.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
            let after = e
                .lifetime_ms
                .map(|ms| format!(" after {}", secs(ms)))
                .unwrap_or_default();
            let mut l = format!(
                "{t}  {label} {} {} (master {}) closed {} connection {endpoint}{fd}{after}: {} bytes in, {} out ({})",
                e.role.as_str(),
                e.pid,
                e.master_pid,
                e.direction,
                e.bytes_in,
                e.bytes_out,
                e.ended_by
            );
            if e.unread_data {
                l.push_str("; client data was left unread (the kernel answered with a RST)");
            }
            if let Some(p) = &e.preceded_by {
                l.push_str(&format!(
                    "; {} returned {}, then {}ms until the close",
                    p.syscall, p.ret, p.wait_ms
                ));
            }
            if e.kind == crate::net::CloseKind::Idle {
                l.push_str("; normal for an idle keep-alive connection");
            }
            if let Some(c) = &e.cause {
                l.push_str(&format!(
                    "\n{:>23}likely: {}\n{:>23}fix: {}",
                    "", c.cause, "", c.fix
                ));
            }
            l
        }
        Output::WorkerExit {
            pid,
            role,
            exit_code,
            signal,
            ..
        } => format!(
            "{t}  exit     {} {pid} {}",
            role.as_str(),
            match (signal, exit_code) {
                (_, Some(c)) => format!("exited with code {c}"),
                (Some(s), None) => format!("killed by {s}"),
                (None, None) => "exited".into(),
            }
        ),
    }
}

/// Colours the label of a text line (`HH:MM:SS.mmm  LABEL    ...`) for a
/// terminal. Only our own labels are coloured; data never carries escapes.
pub fn colorize(line: &str) -> String {
    let Some(label) = line.get(14..22) else {
        return line.to_string();
    };
    let code = match label.trim() {
        "STALL" | "TIMEOUT" | "DROPPED" => "1;31",
        "UPSTREAM" => "1;33",
        "end" | "exit" => "2",
        "idle" => "2",
        _ => return line.to_string(),
    };
    format!("{}\x1b[{code}m{label}\x1b[0m{}", &line[..14], &line[22..])
}

/// The summary for a person: the verdict first, then one row per process.
pub fn text_summary(s: &Summary, events_lost: u64) -> String {
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
    for w in &s.workers {
        let last = w
            .stall
            .as_ref()
            .map(|st| format!("{} {}", secs(st.blocked_ms), sanitize(&describe_call(st))))
            .unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<8} {:<8} {:<8} {:<18} {:>6} {:>8} {:>7} {:>5} {:>8}  {}\n",
            w.pid,
            w.master_pid,
            w.role.as_str(),
            w.state,
            w.stalls,
            w.timeouts,
            w.early_closes.dropped_request,
            w.early_closes.idle,
            w.early_closes.upstream_cut,
            last
        ));
    }
    if events_lost > 0 {
        out.push_str(&format!(
            "WARNING: {events_lost} kernel event(s) were lost (ring buffer full); the picture above may be incomplete\n"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::correlate::Outcome;
    use crate::model::{Peer, Role};

    fn report() -> StallReport {
        StallReport {
            pid: 7,
            tid: 7,
            master_pid: 1,
            role: Role::Worker,
            comm: "gunicorn".into(),
            syscall: "read".into(),
            fd: Some(11),
            count: Some(4),
            fd_kind: "pipe".into(),
            fd_target: Some("pipe:[42]".into()),
            peers: vec![Peer {
                pid: 7,
                comm: "evil\x1b[2J\n\"name".into(),
                fd: 12,
                end: "write",
            }],
            only_self_can_wake: Some(true),
            blocked_ms: 512,
            heartbeat_age_ms: Some(700),
            start_ns: 1,
            ..Default::default()
        }
    }

    #[test]
    fn json_line_has_event_ts_and_contract_fields() {
        let o = Output::Stall {
            ts_ns: 0,
            report: report(),
        };
        let line = json_line(&o, "2026-01-01T00:00:00.000Z".into());
        assert!(!line.contains('\n'));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["event"], "stall");
        assert_eq!(v["ts"], "2026-01-01T00:00:00.000Z");
        assert_eq!(v["pid"], 7);
        assert_eq!(v["tid"], 7);
        assert_eq!(v["master_pid"], 1);
        assert_eq!(v["syscall"], "read");
        assert_eq!(v["fd"], 11);
        assert_eq!(v["fd_kind"], "pipe");
        assert_eq!(v["fd_target"], "pipe:[42]");
        assert_eq!(v["blocked_ms"], 512);
        assert_eq!(v["heartbeat_age_ms"], 700);
        assert_eq!(v["peers"][0]["end"], "write");
        // Hostile bytes survive as data.
        assert_eq!(v["peers"][0]["comm"], "evil\x1b[2J\n\"name");
        assert!(v.get("start_ns").is_none());
    }

    #[test]
    fn json_stall_end_and_exit_shapes() {
        let e = Output::StallEnd {
            ts_ns: 0,
            pid: 7,
            tid: 7,
            master_pid: 1,
            syscall: "read".into(),
            fd: Some(11),
            fd_kind: "pipe".into(),
            blocked_ms: 4000,
            outcome: Outcome::Exited,
            container: None,
        };
        let v: serde_json::Value = serde_json::from_str(&json_line(&e, "t".into())).unwrap();
        assert_eq!(v["event"], "stall_end");
        assert_eq!(v["outcome"], "exited");
        let x = Output::WorkerExit {
            ts_ns: 0,
            pid: 7,
            master_pid: 1,
            role: Role::Worker,
            exit_code: None,
            signal: Some("SIGKILL".into()),
            container: None,
        };
        let v: serde_json::Value = serde_json::from_str(&json_line(&x, "t".into())).unwrap();
        assert_eq!(v["event"], "worker_exit");
        assert_eq!(v["exit_code"], serde_json::Value::Null);
        assert_eq!(v["signal"], "SIGKILL");
    }

    #[test]
    fn text_neutralises_escape_sequences() {
        let o = Output::Stall {
            ts_ns: 0,
            report: report(),
        };
        let t = text_line(&o, &Clock::fixed(0));
        assert!(!t.contains('\x1b'), "{t:?}");
        assert!(
            t.contains("STALL    worker 7 [gunicorn] (master 1) blocked 0.5s in read() on fd 11 (pipe:[42])"),
            "{t}"
        );
        assert!(t.contains("can never be woken"));
        assert_eq!(
            sanitize("a\x1b]0;title\x07b\r\nc\u{9b}"),
            "a?]0;title?b??c?"
        );
    }

    #[test]
    fn process_lines_say_how_each_was_found() {
        let c = Clock::fixed(0);
        let line = |pid, master_pid, role, source| {
            text_line(
                &Output::Worker {
                    ts_ns: 0,
                    pid,
                    master_pid,
                    role,
                    source,
                    app: None,
                    container: None,
                },
                &c,
            )
        };
        assert!(line(7, 1, Role::Worker, "fork").ends_with("worker   7 spawned by master 1"));
        assert!(line(7, 1, Role::Worker, "scan").ends_with("worker   7 found, master 1"));
        assert!(line(5, 5, Role::Plain, "scan").ends_with("process  5 watched"));
        assert!(line(9, 5, Role::Child, "fork").ends_with("child    9 forked, under 5"));
    }

    #[test]
    fn colour_only_touches_the_label() {
        let l = "04:37:06.413  STALL    worker 1 [x] blocked";
        assert_eq!(
            colorize(l),
            "04:37:06.413  \x1b[1;31mSTALL   \x1b[0m worker 1 [x] blocked"
        );
        assert_eq!(
            colorize("04:37:06.413  watch    gunicorn"),
            "04:37:06.413  watch    gunicorn"
        );
        assert_eq!(colorize("short"), "short");
    }

    #[test]
    fn clock_maps_monotonic_to_wall_time() {
        let c = Clock::fixed(1_700_000_000_000_000_000);
        assert_eq!(c.rfc3339(5_000_000), "2023-11-14T22:13:20.005Z");
        assert_eq!(
            text_line(
                &Output::WorkerExit {
                    ts_ns: 5_000_000,
                    pid: 3,
                    master_pid: 1,
                    role: Role::Worker,
                    exit_code: Some(0),
                    signal: None,
                    container: None,
                },
                &c
            ),
            "22:13:20.005  exit     worker 3 exited with code 0"
        );
    }
}
