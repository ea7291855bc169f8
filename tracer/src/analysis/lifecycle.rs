//! Processes coming and going: forks, exits, and the master's signals that
//! are Gunicorn's WORKER TIMEOUT.
use super::Enricher;
use super::correlator::{Correlator, NewProcess, PendingTimeout, Proc};
use super::exits::signal_name;
use super::exits::{self, Ended, SignalSeen};
use super::summary::rejudged;
use crate::model::{Outcome, Output, Role, Source, StallReport};

/// Exited processes with findings kept for the summary, at most.
pub(super) const MAX_EXITED_KEPT: usize = 256;
/// Quiet exits kept in case a close of theirs comes after the exit event.
const MAX_EXITED_RECENT: usize = 64;

/// How far a process's start time (a clock tick, 10 ms) may be from its
/// fork event's time, or from the start read earlier, and still be that
/// process.
pub const SAME_START_NS: u64 = 50_000_000;

/// `read` of the child forked at `fork_ns`, or None when the pid now
/// belongs to another process: the child ended and its pid was reused
/// before the session got to its fork (checked before and after the read,
/// when the start time can be read at all).
fn read_as_child<T>(
    enr: &mut dyn Enricher,
    child: u32,
    fork_ns: u64,
    read: impl FnOnce(&mut dyn Enricher) -> Option<T>,
) -> Option<T> {
    let other = |e: &mut dyn Enricher| {
        e.process_start_ns(child)
            .is_some_and(|s| s.abs_diff(fork_ns) > SAME_START_NS)
    };
    if other(enr) {
        return None;
    }
    let found = read(enr);
    if other(enr) { None } else { found }
}

impl Correlator {
    /// The stall a WORKER TIMEOUT at `ts_ns` is blamed on. Gunicorn kills a
    /// worker whose heartbeat is older than --timeout, and only the loop
    /// thread heartbeats: a pool thread's stall cannot stop it. So: a stall
    /// of the loop thread (a blocked call, or on the CPU, or busy) that
    /// overlaps the window the heartbeat went stale in, from the kill minus
    /// --timeout to the kill. One in progress at the kill does; one that
    /// ended earlier must have ended inside the window, which needs the
    /// timeout: when it is not known, only a stall in progress is blamed.
    /// None when no such stall was seen.
    fn timeout_blame(&self, pid: u32, ts_ns: u64) -> Option<StallReport> {
        let of_loop = |r: &StallReport| r.tid == pid;
        if let Some(now) = self.current_stall(pid, ts_ns).filter(of_loop) {
            return Some(rejudged(now));
        }
        let p = self.procs.get(&pid)?;
        let window_ns = p
            .timeout_s
            .map(|t| t.value)
            .filter(|t| t.is_finite() && *t > 0.0)
            .map(|t| (t * 1e9) as u64)?;
        let last = p.last_stall.clone().filter(of_loop)?;
        let ended_ns = last.start_ns + last.blocked_ms * 1_000_000;
        (ended_ns + window_ns >= ts_ns && last.start_ns <= ts_ns).then_some(last)
    }

    pub(super) fn on_fork(
        &mut self,
        ts_ns: u64,
        child: u32,
        role: Role,
        master: u32,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let (app, timeout_s, worker_class) = self
            .procs
            .get(&master)
            .map(|m| (m.app.clone(), m.timeout_s, m.worker_class.clone()))
            .unwrap_or_default();
        let p = NewProcess {
            pid: child,
            master,
            role,
            app,
            timeout_s,
            worker_class,
            settings: None,
            source: Source::Fork,
            container: read_as_child(enr, child, ts_ns, |e| e.container(child)),
        };
        self.add_process(ts_ns, p).into_iter().collect()
    }

    pub(super) fn on_exit(
        &mut self,
        ts_ns: u64,
        pid: u32,
        exit_code: Option<i32>,
        signal: Option<i32>,
    ) -> Vec<Output> {
        // A WORKER TIMEOUT held for its escalation is told first: the
        // worker ended without the SIGKILL (or its SIGKILL ends it now).
        let mut out: Vec<Output> = self
            .procs
            .get_mut(&pid)
            .and_then(|p| Some((p.pending_timeout.take()?, &*p)))
            .map(|(first, p)| timeout_output(pid, p, first, None))
            .into_iter()
            .collect();
        out.extend(self.end_stalls_of(pid, ts_ns, Outcome::Exited));
        let settings = self.settings_of(pid);
        let Some(p) = self.procs.get_mut(&pid) else {
            return out;
        };
        let end = Ended {
            ts_ns,
            exit_code,
            signal,
        };
        let why = exits::explain(p, end, settings);
        *self.exits.entry(why.cause).or_default() += 1;
        p.alive = false;
        p.exit_code = exit_code;
        p.exit_signal = signal;
        p.exit = Some(why.clone());
        out.push(Output::WorkerExit {
            ts_ns,
            pid,
            master_pid: p.master,
            role: p.role,
            exit_code,
            signal: signal.map(signal_name),
            why,
            container: p.container.clone(),
        });
        if p.is_notable() {
            self.keep_exited(pid);
        } else if let Some(p) = self.procs.remove(&pid) {
            self.exited_quiet += 1;
            self.exited_recent.push_back((pid, p));
            if self.exited_recent.len() > MAX_EXITED_RECENT {
                self.exited_recent.pop_front();
            }
        }
        out
    }

    /// Keeps an exited process for the summary (the oldest goes past the bound).
    pub(super) fn keep_exited(&mut self, pid: u32) {
        self.exited_notable.push_back(pid);
        if self.exited_notable.len() > MAX_EXITED_KEPT
            && let Some(old) = self.exited_notable.pop_front()
        {
            self.procs.remove(&old);
        }
    }

    /// Remembers who signalled a process (its exit will say), and ties
    /// Gunicorn's WORKER TIMEOUT to the stall that caused it: the arbiter
    /// sends SIGABRT, then SIGKILL, to a worker whose heartbeat is older
    /// than --timeout. A SIGKILL after the master asked the worker to stop
    /// (SIGTERM, SIGINT, SIGQUIT) ends a graceful stop instead.
    pub(super) fn on_signal(&mut self, target: u32, seen: SignalSeen) -> Vec<Output> {
        let Some(p) = self.procs.get_mut(&target) else {
            return Vec::new();
        };
        let (ts_ns, sender, sig) = (seen.ts_ns, seen.sender, seen.sig);
        let from_master = p.role == Role::Worker && sender == p.master;
        if from_master && matches!(sig, 2 | 3 | 15) {
            p.asked_to_stop = true;
            if p.stop_signal.is_none() {
                p.stop_signal = Some(seen.clone());
            }
        }
        let timeout = from_master && (sig == SIGABRT || (sig == SIGKILL && !p.asked_to_stop));
        // Gunicorn's SIGKILL on a later tick, to a worker its SIGABRT did
        // not end: the same WORKER TIMEOUT, escalated.
        let escalated = timeout && sig == SIGKILL && p.pending_timeout.is_some();
        if timeout {
            p.timeout_signal = Some(seen.clone());
        }
        p.last_signal = Some(seen);
        if !timeout {
            return Vec::new();
        }
        if escalated {
            let first = p.pending_timeout.take().expect("checked above");
            return vec![timeout_output(target, p, first, Some((sig, ts_ns)))];
        }
        let stall = self.timeout_blame(target, ts_ns);
        let p = self.procs.get_mut(&target).expect("checked above");
        p.timeouts += 1;
        p.killed_by_timeout = true;
        if p.timeout_stall.is_none() {
            p.timeout_stall = stall.clone();
        }
        let watched_ms = p.watched_less_than_timeout(ts_ns);
        p.timeout_watched_ms = watched_ms;
        let first = PendingTimeout {
            ts_ns,
            signal: signal_name(sig),
            stall,
            watched_ms,
        };
        if sig == SIGABRT {
            // Told at the exit, or with the SIGKILL that may follow.
            p.pending_timeout = Some(first);
            return Vec::new();
        }
        vec![timeout_output(target, p, first, None)]
    }

    /// WORKER TIMEOUTs still held (their workers neither exited nor were
    /// killed before the run ended): told now, not escalated so far.
    pub fn flush_timeouts(&mut self) -> Vec<Output> {
        let mut out = Vec::new();
        for (pid, p) in self.procs.iter_mut() {
            if let Some(first) = p.pending_timeout.take() {
                out.push(timeout_output(*pid, p, first, None));
            }
        }
        out
    }
}

const SIGABRT: i32 = 6;
const SIGKILL: i32 = 9;

/// The one worker_timeout event of a WORKER TIMEOUT: its first signal, and
/// the SIGKILL it was escalated to (with when), if one followed.
fn timeout_output(
    pid: u32,
    p: &Proc,
    first: PendingTimeout,
    escalation: Option<(i32, u64)>,
) -> Output {
    Output::WorkerTimeout {
        ts_ns: first.ts_ns,
        pid,
        master_pid: p.master,
        signal: first.signal,
        escalated_to: escalation.map(|(sig, _)| signal_name(sig)),
        escalated_after_ms: escalation.map(|(_, at)| at.saturating_sub(first.ts_ns) / 1_000_000),
        stall: first.stall,
        watched_ms: first.watched_ms,
        gunicorn_timeout_s: p.timeout_s.as_ref().map(|t| t.value),
        container: p.container.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::FdInfo;

    /// A pid whose process started at `starts` (one per read, the last
    /// repeated), in a pod named "pod".
    struct Reused {
        starts: Vec<Option<u64>>,
    }

    impl Enricher for Reused {
        fn fd_info(&mut self, _pid: u32, _fd: i32) -> FdInfo {
            unreachable!()
        }
        fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
            None
        }
        fn comm(&mut self, _pid: u32) -> String {
            String::new()
        }
        fn process_start_ns(&mut self, _pid: u32) -> Option<u64> {
            if self.starts.len() > 1 {
                self.starts.remove(0)
            } else {
                self.starts[0]
            }
        }
    }

    fn pod(e: &mut dyn Enricher) -> Option<&'static str> {
        let _ = e.container(7);
        Some("pod")
    }

    /// The child's pod is kept when the pid's process started at the fork
    /// (or its start cannot be read), and not when the pid belongs to a
    /// later process, before or after the read.
    #[test]
    fn a_pid_reused_before_its_fork_was_read_gives_nothing_of_the_new_process() {
        const MS: u64 = 1_000_000;
        let fork = 5_000 * MS;
        for (starts, kept) in [
            (vec![Some(fork + 10 * MS)], true),
            (vec![Some(fork - 10 * MS)], true),
            (vec![None], true),
            (vec![Some(fork + 900 * MS)], false),
            (vec![Some(fork), Some(fork + 900 * MS)], false),
        ] {
            let e = &mut Reused {
                starts: starts.clone(),
            };
            assert_eq!(read_as_child(e, 7, fork, pod).is_some(), kept, "{starts:?}");
        }
    }
}
