//! Exits in words: why a process ended, as the text view and the verdict
//! say it. Gunicorn's own log guesses ("Perhaps out of memory?"); these
//! sentences say what the kernel saw.
use super::sanitize;
use crate::model::{ExitCause, ExitReport, OomKill};

/// `400 MiB`
pub fn mib(bytes: u64) -> String {
    format!("{} MiB", (bytes + (1 << 19)) >> 20)
}

fn opt_mib(b: Option<u64>) -> String {
    b.map(mib).unwrap_or_else(|| "unknown".into())
}

/// How the kernel's exit status reads: "exited with code 0", "killed by SIGKILL".
fn status(exit_code: Option<i32>, signal: Option<&str>) -> String {
    match (signal, exit_code) {
        (_, Some(c)) => format!("exited with code {c}"),
        (Some(s), None) => format!("killed by {s}"),
        (None, None) => "exited".into(),
    }
}

/// "killed by the kernel's OOM killer: cgroup limit 400 MiB, usage 400 MiB; ..."
pub fn oom_words(o: &OomKill) -> String {
    let mut w = format!(
        "killed by the kernel's OOM killer: cgroup limit {}, usage {}; Gunicorn's 'Perhaps out of memory?' is right this time",
        opt_mib(o.memory_limit_bytes),
        opt_mib(o.memory_usage_bytes)
    );
    let mut details = Vec::new();
    if let Some(c) = &o.cgroup {
        details.push(format!("cgroup {}", sanitize(c)));
    }
    if let Some(rss) = o.rss_bytes {
        details.push(format!("its own rss {}", mib(rss)));
    }
    details.push(format!("oom_score_adj {}", o.oom_score_adj));
    w.push_str(&format!(" ({})", details.join(", ")));
    w
}

/// Why a worker whose exit code is 3 or 4 stopped the server.
fn halt_words(code: Option<i32>) -> &'static str {
    match code {
        Some(3) => {
            "the worker failed to boot (Gunicorn's WORKER_BOOT_ERROR), so the master halts the whole server; Gunicorn's log has the traceback after 'Exception in worker process'"
        }
        _ => {
            "the app failed to load (Gunicorn's APP_LOAD_ERROR: is the module:callable right?), so the master halts the whole server"
        }
    }
}

/// The whole exit in words, after the process's name.
pub fn exit_words(
    pid: u32,
    master: u32,
    exit_code: Option<i32>,
    signal: Option<&str>,
    why: &ExitReport,
) -> String {
    let how = status(exit_code, signal);
    let sent = why.cause_signal.as_deref().unwrap_or("a signal");
    // "killed by SIGKILL from ..." when the signal sent is the one it died
    // of; "exited with code 0 after SIGTERM from ..." when it stopped itself.
    let by = if signal.is_some() && signal == why.cause_signal.as_deref() {
        format!("killed by {sent}")
    } else {
        format!("{how} after {sent}")
    };
    match why.cause {
        ExitCause::OomKill => match &why.oom {
            Some(o) => oom_words(o),
            None => "killed by the kernel's OOM killer".into(),
        },
        ExitCause::WorkerTimeout => {
            format!("{how}: Gunicorn's WORKER TIMEOUT (master {master} sent {sent})")
        }
        ExitCause::MasterSignal => {
            format!("{by} from its master {master} (a reload, scale-down or shutdown)")
        }
        ExitCause::ExternalSignal => match &why.sender {
            // The kernel signals a fault from the faulting task's own
            // context, as abort() and kill(getpid()) do: the sender alone
            // does not tell a crash from the process signalling itself.
            Some(s) if s.pid == pid => format!(
                "{how}: {sent} came from the process's own context (a fault the kernel signalled, abort(), or its own kill(); which one was not recorded)"
            ),
            Some(s) => format!(
                "{by} from pid {} ({}): not Gunicorn, not the OOM killer",
                s.pid,
                sanitize(&s.comm)
            ),
            None => format!("{how} (who sent {sent} was not seen)"),
        },
        ExitCause::MaxRequests => format!(
            "{how}: retired after --max-requests {} (normal: the master starts a new one)",
            why.max_requests.unwrap_or(0)
        ),
        ExitCause::Exit if why.halts_master => format!("{how}: {}", halt_words(exit_code)),
        ExitCause::Exit if exit_code.is_none() && signal.is_none() => {
            "exited (its exit status was not seen)".into()
        }
        ExitCause::Exit => how,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Sender;

    fn why(cause: ExitCause) -> ExitReport {
        ExitReport::new(cause)
    }

    #[test]
    fn an_oom_kill_says_limit_and_usage() {
        let r = ExitReport {
            oom: Some(OomKill {
                oom_score_adj: 0,
                rss_bytes: Some(380 << 20),
                cgroup: Some("/web".into()),
                memory_limit_bytes: Some(400 << 20),
                memory_usage_bytes: Some(400 << 20),
            }),
            ..why(ExitCause::OomKill)
        };
        assert_eq!(
            exit_words(7, 1, None, Some("SIGKILL"), &r),
            "killed by the kernel's OOM killer: cgroup limit 400 MiB, usage 400 MiB; Gunicorn's 'Perhaps out of memory?' is right this time (cgroup /web, its own rss 380 MiB, oom_score_adj 0)"
        );
    }

    #[test]
    fn signals_name_their_sender() {
        let kill = ExitReport {
            cause_signal: Some("SIGKILL".into()),
            sender: Some(Sender {
                pid: 4242,
                comm: "kill".into(),
            }),
            ..why(ExitCause::ExternalSignal)
        };
        assert_eq!(
            exit_words(7, 1, None, Some("SIGKILL"), &kill),
            "killed by SIGKILL from pid 4242 (kill): not Gunicorn, not the OOM killer"
        );
        let term = ExitReport {
            cause_signal: Some("SIGTERM".into()),
            ..why(ExitCause::MasterSignal)
        };
        assert_eq!(
            exit_words(7, 1, Some(0), None, &term),
            "exited with code 0 after SIGTERM from its master 1 (a reload, scale-down or shutdown)"
        );
        // Sent from its own context: a fault, abort() or its own kill();
        // the kernel's signal code was not recorded, so no crash is claimed.
        let own = ExitReport {
            cause_signal: Some("SIGSEGV".into()),
            sender: Some(Sender {
                pid: 7,
                comm: "gunicorn".into(),
            }),
            ..why(ExitCause::ExternalSignal)
        };
        let w = exit_words(7, 1, None, Some("SIGSEGV"), &own);
        assert!(!w.contains("a crash in native code, or abort()"), "{w}");
        assert!(w.contains("which one was not recorded"), "{w}");
        let boot = ExitReport {
            halts_master: true,
            ..why(ExitCause::Exit)
        };
        assert!(exit_words(7, 1, Some(3), None, &boot).contains("failed to boot"));
        assert_eq!(mib(1 << 19), "1 MiB");
    }
}
