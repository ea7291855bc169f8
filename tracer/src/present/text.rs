//! The text view: one line (or a few) per event, and the summary with the
//! verdict on top. Everything from a traced process goes through `sanitize`.
use super::exits::exit_words;
use super::json::StartEvent;
use super::{
    Clock, at_least, describe_call, describe_stall, holders, never_noticed, sanitize, secs,
    where_without_syscall, which_thread,
};
use crate::model::{
    Basis, CloseKind, Direction, EarlyClose, ExitReport, HungOutcome, HungRequest, MasterConfig,
    Outcome, Output, Role, Setting, SettingSource, Source, StallReport, StallState, WorkerClass,
    version_string,
};

/// `  likely: ...` (inferred from the wait) or `  cause: ...` (a frame of
/// the stack names it) and `  fix: ...` under an event line. A cause may
/// quote the traced process's frames: sanitized.
fn cause_lines(c: &crate::model::Cause) -> String {
    let label = match &c.evidence {
        Some(e) if e.basis == Basis::Frame => "cause, from the stack",
        _ => "likely",
    };
    format!(
        "\n{:>23}{label}: {}\n{:>23}fix: {}",
        "",
        sanitize(&c.cause),
        "",
        sanitize(&c.fix)
    )
}

fn stall_details(s: &StallReport) -> String {
    let what = match s.state {
        StallState::Blocked => format!(
            "blocked {}{} in {}{}",
            at_least(s),
            secs(s.blocked_ms),
            sanitize(&describe_call(s)),
            if s.since_attach {
                " (it began before the tracer attached)"
            } else {
                ""
            },
        ),
        StallState::OnCpu | StallState::Busy => describe_stall(s, "blocked"),
    };
    let who = if s.tid == s.pid {
        format!(
            "{} {} [{}] (master {})",
            s.role.as_str(),
            s.pid,
            sanitize(&s.comm),
            s.master_pid
        )
    } else {
        format!(
            "{} {} (master {}) thread {} [{}]",
            s.role.as_str(),
            s.pid,
            s.master_pid,
            s.tid,
            sanitize(&s.thread_name)
        )
    };
    let mut d = format!("{who} {what}");
    if let Some(hb) = s.heartbeat_age_ms {
        d.push_str(&format!("; heartbeat {} old", secs(hb)));
        d.push_str(&format!(" ({})", timeout_words(s.gunicorn_timeout_s)));
        if s.never_heartbeated == Some(true) {
            d.push_str(", none since it was forked");
        }
    }
    if let Some(n) = never_noticed(s) {
        d.push_str(&format!("; {}", sanitize(&n)));
    }
    if s.fd_kind.is_pipe_like() {
        let writers: Vec<String> = s
            .writers()
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
        d.push_str(&cause_lines(c));
    }
    for line in super::pystack::stall_lines(s) {
        d.push_str(&format!("\n{:>23}{line}", ""));
    }
    d
}

fn opt(a: &Option<String>) -> String {
    a.as_deref()
        .map(|a| format!(" ({})", sanitize(a)))
        .unwrap_or_default()
}

/// "timeout 7s", "timeout 30s: Gunicorn's default, not read", "timeout
/// unknown" (a stall's heartbeat note).
fn timeout_words(t: Option<Setting<f64>>) -> String {
    match t {
        None => "timeout unknown".into(),
        Some(t) if t.source == SettingSource::Default => {
            format!("timeout {}s: {}", t.value, t.source.words())
        }
        Some(t) => format!("timeout {}s", t.value),
    }
}

/// "timeout 7s (from the config file)", "keep-alive 2s (Gunicorn's
/// default, not read)", "timeout unknown".
fn setting_words<T: std::fmt::Display + Copy>(
    name: &str,
    unit: &str,
    s: Option<Setting<T>>,
) -> String {
    match s {
        Some(s) => format!("{name} {}{unit} ({})", s.value, s.source.words()),
        None => format!("{name} unknown"),
    }
}

/// "sync worker (from the config file)", "sync worker (Gunicorn's default,
/// not read)", "gthread worker (from the command line: threads 4 > 1 ...)".
fn class_words(c: &Option<WorkerClass>) -> String {
    match c {
        None => "worker class unknown".into(),
        Some(c) => {
            let why = c
                .evidence
                .as_deref()
                .map(|e| format!(": {}", sanitize(e)))
                .unwrap_or_default();
            format!("{} worker ({}{why})", sanitize(&c.name), c.source.words())
        }
    }
}

fn master_line(pid: u32, app: &Option<String>, m: &MasterConfig, source: Source) -> String {
    let version = m
        .settings
        .gunicorn_version
        .map(|v| format!("Gunicorn {}", version_string(v)))
        .unwrap_or_else(|| "Gunicorn version unknown".into());
    let config = match (&m.config_file, &m.config_error) {
        (_, Some(e)) => format!("; config file: {}", sanitize(e)),
        (Some(f), None) => format!("; config file {}", sanitize(f)),
        (None, None) => String::new(),
    };
    format!(
        "watch    gunicorn master {pid}{}{}: {version}, {}, {}, {}{config}",
        opt(app),
        if source == Source::Exec {
            ", just started"
        } else {
            ""
        },
        class_words(&m.worker_class),
        setting_words("timeout", "s", m.settings.timeout),
        setting_words("keep-alive", "s", m.settings.keepalive),
    )
}

fn class_line(pid: u32, c: &WorkerClass) -> String {
    format!("class    worker {pid}: {}", class_words(&Some(c.clone())))
}

fn process_line(pid: u32, master_pid: u32, role: Role, source: Source) -> String {
    let how = match (role, source == Source::Fork) {
        (Role::Worker, true) => format!("spawned by master {master_pid}"),
        (Role::Worker, false) => format!("found, master {master_pid}"),
        (_, true) => format!("forked, under {master_pid}"),
        (_, false) if pid == master_pid => "watched".to_string(),
        (_, false) => format!("watched, under {master_pid}"),
    };
    format!("{:<8} {pid} {how}", role.as_str())
}

fn stall_end_line(
    (pid, tid): (u32, u32),
    state: StallState,
    syscall: &Option<String>,
    (blocked_ms, since_attach): (u64, bool),
    outcome: Outcome,
) -> String {
    let what = match syscall {
        Some(call) => format!("{call}()"),
        None => where_without_syscall(state).into(),
    };
    let thread = if tid != pid {
        format!(" [thread {tid}]")
    } else {
        String::new()
    };
    format!(
        "end      {pid}{thread} {what} after {}{}: {}",
        if since_attach { "at least " } else { "" },
        secs(blocked_ms),
        match outcome {
            Outcome::Returned => "returned",
            Outcome::Interrupted => "interrupted by a signal",
            Outcome::Exited => "the process died inside it",
            Outcome::Unknown => "ended; how is not known (the call left the kernel's map unseen)",
            Outcome::Woke => "woke (whether the call returned is not known)",
            Outcome::Resumed => "the loop ran again (its heartbeat is fresh)",
            Outcome::Blocked => "it went on to block in a syscall",
            Outcome::Slept => "it slept (it left the CPU)",
        },
    )
}

fn loop_line(pid: u32, wait: &str, fd: Option<i32>, nfds: Option<u32>) -> String {
    let on = match (fd, nfds) {
        (Some(fd), _) => format!(" on fd {fd}"),
        (None, Some(n)) => format!(" over {n} fds"),
        (None, None) => String::new(),
    };
    format!(
        "loop     worker {pid} waits for work in {wait}(){on}; any other wait of its main thread is a stall"
    )
}

fn timeout_line(
    (pid, master_pid): (u32, u32),
    signal: &str,
    escalated: Option<(&str, u64)>,
    stall: &Option<StallReport>,
    watched: (Option<u64>, bool),
) -> String {
    // Only said when the SIGKILL was seen: the worker did not end on the
    // first signal, so the master sent it on a later tick.
    let then = escalated
        .map(|(sig, ms)| {
            format!(
                ", then {} {} later (it did not exit on {signal})",
                sanitize(sig),
                secs(ms)
            )
        })
        .unwrap_or_default();
    let mut l = format!(
        "TIMEOUT  master {master_pid} sent {signal}{then} to worker {pid} (Gunicorn WORKER TIMEOUT){}",
        stall
            .as_ref()
            .map(|s| format!(
                ": {}it was {}",
                sanitize(&which_thread(s)),
                sanitize(&describe_stall(s, "blocked"))
            ))
            .unwrap_or_else(|| unseen_window(watched))
    );
    // The stalled thread's stack, as under its STALL line.
    for line in stall.iter().flat_map(super::pystack::stall_lines) {
        l.push_str(&format!("\n{:>23}{line}", ""));
    }
    l
}

/// A WORKER TIMEOUT with no stall to blame: what the tracer could see of
/// its window (all of it, or only the part after it attached), from how
/// long it watched the worker and whether the master's --timeout is known.
fn unseen_window((watched_ms, timeout_known): (Option<u64>, bool)) -> String {
    match watched_ms {
        None => ": no stall of its loop thread was seen in the timeout window".into(),
        Some(ms) if !timeout_known => format!(
            ": no stall was seen in the {} the tracer watched it; its --timeout is not known, so whether that was the whole timeout window is not known either",
            secs(ms)
        ),
        Some(ms) => format!(
            ": the tracer had watched it only {}, less than its --timeout window; no stall was seen then, and what held it before was not seen",
            secs(ms)
        ),
    }
}

fn early_close_line(e: &EarlyClose) -> String {
    let label = match e.kind {
        CloseKind::DroppedRequest => "DROPPED ",
        CloseKind::Idle => "idle    ",
        CloseKind::UpstreamCut => "UPSTREAM",
        CloseKind::Probe => "probe   ",
        CloseKind::ClientAbort => "abort   ",
        CloseKind::KeepaliveRace => "RACE    ",
    };
    let peer = e
        .peer
        .as_deref()
        .map(sanitize)
        .unwrap_or_else(|| "?".into());
    let endpoint = match (e.local_port, e.direction) {
        (Some(port), Direction::Inbound) => format!("{peer} -> :{port}"),
        _ => peer,
    };
    let fd = e.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
    let after = e
        .lifetime_ms
        .map(|ms| format!(" after {}", secs(ms)))
        .unwrap_or_default();
    let mut l = format!(
        "{label} {} {} (master {}) closed {} connection {endpoint}{fd}{after}: {} bytes in, {} out ({})",
        e.role.as_str(),
        e.pid,
        e.master_pid,
        e.direction.as_str(),
        e.bytes_in,
        e.bytes_out,
        e.ended_by.as_str()
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
    match e.kind {
        CloseKind::Idle => l.push_str("; normal for an idle keep-alive connection"),
        CloseKind::Probe => {
            l.push_str("; the client closed first without sending a byte: a TCP health check")
        }
        CloseKind::ClientAbort => {
            l.push_str("; the client closed first, before the answer (nginx logs 499)")
        }
        CloseKind::KeepaliveRace => l.push_str(&race_details(e)),
        _ => {}
    }
    if let Some(c) = &e.cause {
        l.push_str(&cause_lines(c));
    }
    l
}

/// "; idle 1.0s before the close (--keep-alive 1s); the client's next
/// request came 0.5s after it and the kernel reset it: a lost request"
fn race_details(e: &EarlyClose) -> String {
    let mut d = String::new();
    if let Some(idle) = e.idle_ms {
        d.push_str(&format!("; idle {} before the close", secs(idle)));
    }
    match e.keepalive_s {
        Some(k) => d.push_str(&format!(" (keep-alive {k}s)")),
        None => d.push_str(" (keep-alive setting not read)"),
    }
    let after = e
        .reset_after_ms
        .map(|ms| format!(" {} after it", secs(ms)))
        .unwrap_or_default();
    d.push_str(&format!(
        "; the client's next request came{after} and the kernel reset it: a lost request (a proxy's 502)"
    ));
    d
}

fn hung_line(h: &HungRequest) -> String {
    let fd = h.fd.map(|fd| format!(" fd {fd}")).unwrap_or_default();
    format!(
        "HUNG     {} {} (master {}) has sent nothing back to {} -> :{}{fd} for {} (--request-threshold {}): {} bytes in{}; {}",
        h.role.as_str(),
        h.pid,
        h.master_pid,
        sanitize(&h.peer),
        h.local_port,
        secs(h.waiting_ms),
        secs(h.threshold_ms),
        h.bytes_in,
        if h.unread_bytes > 0 {
            format!(" ({} not read yet)", h.unread_bytes)
        } else {
            String::new()
        },
        sanitize(&holders(h))
    )
}

fn hung_end_line(pid: u32, peer: &str, waited_ms: u64, outcome: HungOutcome) -> String {
    format!(
        "end      {pid} request from {} after {}: {}",
        sanitize(peer),
        secs(waited_ms),
        match outcome {
            HungOutcome::Answered => "answered",
            HungOutcome::ClientClosed =>
                "the client closed its side (a proxy that gave up: its 504)",
            HungOutcome::Dropped => "dropped by the worker with nothing sent (see the early close)",
            HungOutcome::Unknown =>
                "ended; whether it was answered is not known (the connection was gone at the next scan)",
        }
    )
}

fn exit_line(
    pid: u32,
    master: u32,
    role: Role,
    exit_code: Option<i32>,
    signal: &Option<String>,
    why: &ExitReport,
) -> String {
    let label = match why.is_finding() {
        true => "EXIT    ",
        false => "exit    ",
    };
    format!(
        "{label} {} {pid} {}",
        role.as_str(),
        exit_words(pid, master, exit_code, signal.as_deref(), why)
    )
}

/// The text view of one event: the time, a label, and what happened.
pub fn text_line(o: &Output, clock: &Clock) -> String {
    let body = match o {
        Output::Master {
            pid,
            app,
            settings,
            source,
            ..
        } => master_line(*pid, app, settings, *source),
        Output::WorkerClass { pid, class, .. } => class_line(*pid, class),
        Output::Worker {
            pid,
            master_pid,
            role,
            source,
            ..
        } => process_line(*pid, *master_pid, *role, *source),
        Output::Loop {
            pid,
            wait,
            fd,
            nfds,
            ..
        } => loop_line(*pid, wait, *fd, *nfds),
        Output::Stall { report, .. } => format!("STALL    {}", stall_details(report)),
        Output::StallEnd {
            pid,
            tid,
            state,
            syscall,
            blocked_ms,
            since_attach,
            outcome,
            ..
        } => stall_end_line(
            (*pid, *tid),
            *state,
            syscall,
            (*blocked_ms, *since_attach),
            *outcome,
        ),
        Output::WorkerTimeout {
            pid,
            master_pid,
            signal,
            escalated_to,
            escalated_after_ms,
            stall,
            watched_ms,
            gunicorn_timeout_s,
            ..
        } => timeout_line(
            (*pid, *master_pid),
            signal,
            escalated_to.as_deref().zip(*escalated_after_ms),
            stall,
            (*watched_ms, gunicorn_timeout_s.is_some()),
        ),
        Output::EarlyClose { close, .. } => early_close_line(close),
        Output::HungRequest { hung, .. } => hung_line(hung),
        Output::HungRequestEnd {
            pid,
            peer,
            waited_ms,
            outcome,
            ..
        } => hung_end_line(*pid, peer, *waited_ms, *outcome),
        Output::WorkerExit {
            pid,
            master_pid,
            role,
            exit_code,
            signal,
            why,
            ..
        } => exit_line(*pid, *master_pid, *role, *exit_code, signal, why),
    };
    format!("{}  {body}", clock.hhmmss(o.ts_ns()))
}

/// The first line of the text view: what is watched, and how.
pub fn start_line(s: &StartEvent) -> String {
    let what = if s.discover {
        "every Gunicorn master on this host".to_string()
    } else {
        let pids: Vec<String> = s.pids.iter().map(|p| p.to_string()).collect();
        format!("pid {}", pids.join(", "))
    };
    format!(
        "tracer {}: watching {what}; reporting syscalls blocked {}ms or more. Ctrl-C for the summary.",
        s.version, s.threshold_ms
    )
}

/// Colours the label of a text line (`HH:MM:SS.mmm  LABEL    ...`) for a
/// terminal. Only our own labels are coloured; data never carries escapes.
pub fn colorize(line: &str) -> String {
    let Some(label) = line.get(14..22) else {
        return line.to_string();
    };
    let code = match label.trim() {
        "STALL" | "TIMEOUT" | "DROPPED" | "EXIT" | "RACE" | "HUNG" => "1;31",
        "UPSTREAM" => "1;33",
        "end" | "exit" => "2",
        "idle" | "probe" | "abort" => "2",
        _ => return line.to_string(),
    };
    format!("{}\x1b[{code}m{label}\x1b[0m{}", &line[..14], &line[22..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{End, FdKind, Peer};
    use crate::present::json_line;

    fn report() -> StallReport {
        StallReport {
            pid: 7,
            tid: 7,
            master_pid: 1,
            role: Role::Worker,
            comm: "gunicorn".into(),
            thread_name: "gunicorn".into(),
            syscall: Some("read".into()),
            fd: Some(11),
            count: Some(4),
            fd_kind: FdKind::Pipe,
            fd_target: Some("pipe:[42]".into()),
            peers: vec![Peer {
                pid: 7,
                comm: "evil\x1b[2J\n\"name".into(),
                fd: 12,
                end: End::Write,
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
            thread_name: "gunicorn".into(),
            state: StallState::Blocked,
            syscall: Some("read".into()),
            fd: Some(11),
            fd_kind: FdKind::Pipe,
            blocked_ms: 4000,
            since_attach: false,
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
            why: ExitReport::new(crate::model::ExitCause::ExternalSignal),
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
    fn the_timeout_line_prints_its_stalls_stack_and_a_cause_says_its_basis() {
        let frames = vec![
            crate::model::PyFrame {
                function: "Queue.get".into(),
                file: "/usr/lib/python3.11/multiprocessing/queues.py".into(),
                line: Some(103),
            },
            crate::model::PyFrame {
                function: "enqueue_and_wait\x1b[2J".into(),
                file: "/srv/hang_app.py".into(),
                line: Some(22),
            },
        ];
        let mut s = StallReport {
            worker_class: Some("gevent".into()),
            ..report()
        };
        let kill = |s: &StallReport| {
            text_line(
                &Output::WorkerTimeout {
                    ts_ns: 0,
                    pid: 7,
                    master_pid: 1,
                    signal: "SIGABRT".into(),
                    escalated_to: None,
                    escalated_after_ms: None,
                    stall: Some(s.clone()),
                    watched_ms: None,
                    gunicorn_timeout_s: Some(30.0),
                    container: None,
                },
                &Clock::fixed(0),
            )
        };
        // No stack read (--no-py-stack): no python line.
        assert!(!kill(&s).contains("python"), "{}", kill(&s));
        s.py_stack = Some(frames);
        let t = kill(&s);
        assert!(
            t.contains(
                "python: in multiprocessing/queues.py:103 in Queue.get, called from the app at:"
            ),
            "{t}"
        );
        assert!(
            t.contains("/srv/hang_app.py:22 in enqueue_and_wait?[2J"),
            "{t}"
        );
        // A cause from a frame is labelled so; an inferred one is "likely".
        s.cause = crate::analysis::signatures::identify(&s);
        let stall = |s: &StallReport| {
            text_line(
                &Output::Stall {
                    ts_ns: 0,
                    report: s.clone(),
                },
                &Clock::fixed(0),
            )
        };
        let t = stall(&s);
        assert!(t.contains("cause, from the stack: multiprocessing.Queue.get() at multiprocessing/queues.py:103 in Queue.get"), "{t}");
        assert!(!t.contains('\x1b'), "frames are sanitized: {t:?}");
        s.py_stack = None;
        s.cause = crate::analysis::signatures::identify(&s);
        let t = stall(&s);
        assert!(
            t.contains("likely: multiprocessing.Queue.get() in a gevent worker"),
            "{t}"
        );
        assert!(!t.contains("from the stack"), "{t}");
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
        assert!(line(7, 1, Role::Worker, Source::Fork).ends_with("worker   7 spawned by master 1"));
        assert!(line(7, 1, Role::Worker, Source::Scan).ends_with("worker   7 found, master 1"));
        assert!(line(5, 5, Role::Plain, Source::Scan).ends_with("process  5 watched"));
        assert!(line(9, 5, Role::Child, Source::Fork).ends_with("child    9 forked, under 5"));
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
                    why: ExitReport::new(crate::model::ExitCause::Exit),
                    container: None,
                },
                &c
            ),
            "22:13:20.005  exit     worker 3 exited with code 0"
        );
    }
}
