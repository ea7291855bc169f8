//! Loops that keep the CPU, or stay away from their wait in calls too short
//! to be stalls. A greenlet that computes without a syscall blocks the hub
//! as surely as a read that never returns, but the kernel sees no sleep; a
//! greenlet that queries an unpatched database a thousand times, 10 ms
//! each, blocks it for ten seconds with no call past the threshold. What
//! shows is the worker's heartbeat: it stops while the loop thread never
//! goes back to its loop's own wait. A worker at 100% CPU serving load is
//! not one: its heartbeat stays fresh.
use super::Enricher;
use super::correlator::Correlator;
use super::signatures;
use super::spin;
use super::stalls::{current_figures, stall_end};
use super::syscalls;
use crate::model::{
    FdKind, LoopWait, OnCpuEvidence, Outcome, Output, Role, StallReport, StallState, ThreadCpu,
    ThreadNow,
};

const MS: u64 = 1_000_000;
/// Gunicorn's own workers touch their heartbeat about once a second while
/// their loop runs (an idle sync worker less often, but it is then asleep
/// in its select).
pub(super) const BUILTIN_INTERVAL_MS: u64 = 1000;
/// The session looks at heartbeats every 250 ms: the first look that found
/// one overdue (and started the busy count) may have come that late.
const LOOK_SLACK_MS: u64 = 250;
/// Heartbeat ages come from the file's wall-clock ctime: a heartbeat that
/// moved less than this between two looks is the same one.
const SAME_BEAT_NS: u64 = 100 * MS;

/// What is known of one worker's heartbeats.
#[derive(Debug, Clone, Default)]
pub(crate) struct Beats {
    /// Kernel time of the last heartbeat seen.
    last_ns: Option<u64>,
    /// The shortest interval seen between two heartbeats.
    min_interval_ns: Option<u64>,
    /// Since the heartbeat became overdue: when the loop thread was first
    /// seen away from its loop, and its voluntary context switches and CPU
    /// time then.
    busy: Option<Busy>,
}

#[derive(Debug, Clone, Copy)]
struct Busy {
    since_ns: u64,
    switches: u64,
    cpu_ms: u64,
    /// It went to sleep since (a voluntary switch): not on the CPU all along.
    slept: bool,
}

impl Beats {
    /// Restarts the busy count: the loop thread was seen asleep by another
    /// rule (`spin`), so what it does from now on is a new episode.
    pub(super) fn restart(&mut self) {
        self.busy = None;
    }

    /// How old the last heartbeat seen is at `now_ns`.
    pub(super) fn age_ms(&self, now_ns: u64) -> Option<u64> {
        self.last_ns.map(|last| now_ns.saturating_sub(last) / MS)
    }

    /// Notes the heartbeat dated `beat_ns`; true when it is a new one.
    pub(super) fn saw(&mut self, beat_ns: u64) -> bool {
        match self.last_ns {
            Some(last) if beat_ns > last + SAME_BEAT_NS => {
                let interval = beat_ns - last;
                self.min_interval_ns =
                    Some(self.min_interval_ns.map_or(interval, |m| m.min(interval)));
                self.last_ns = Some(beat_ns);
                true
            }
            Some(_) => false,
            None => {
                self.last_ns = Some(beat_ns);
                true
            }
        }
    }

    /// One look at the loop thread while its heartbeat is overdue: busy
    /// since the first look that found it away from its loop's own wait
    /// (`in_loop`, when the loop is known), or else on the CPU without
    /// sleeping. Back in the wait, the count stops.
    fn look(&mut self, cpu: ThreadCpu, in_loop: Option<bool>, now_ns: u64) -> Option<Busy> {
        let slept = self
            .busy
            .is_some_and(|b| b.switches != cpu.voluntary_switches);
        let idle = match in_loop {
            Some(in_loop) => in_loop,
            None => slept || !cpu.on_cpu,
        };
        if idle {
            self.busy = None;
            return None;
        }
        match &mut self.busy {
            Some(b) => {
                b.slept |= slept;
                Some(*b)
            }
            None => {
                self.busy = Some(Busy {
                    since_ns: now_ns,
                    switches: cpu.voluntary_switches,
                    cpu_ms: cpu.cpu_ms,
                    slept: false,
                });
                None
            }
        }
    }
}

/// What one look measured of a loop thread away from its loop.
#[derive(Debug, Clone, Copy)]
struct Measured {
    cpu_ms: u64,
    sleeps: u64,
    ms: u64,
}

/// How often a worker heartbeats: about once a second for Gunicorn's own
/// classes; for others (Uvicorn's worker beats every timeout/2) the
/// shortest interval seen, once two heartbeats were.
pub(super) fn interval_ms(
    class: Option<&str>,
    loop_wait: Option<LoopWait>,
    beats: &Beats,
) -> Option<u64> {
    let builtin = match class {
        Some(c) => matches!(
            c,
            "sync"
                | "gthread"
                | "gevent"
                | "eventlet"
                | "tornado"
                | "gevent_wsgi"
                | "gevent_pywsgi"
        ),
        // Gunicorn's default, unless a config file chose a class: the
        // sync worker's select shows it.
        None => matches!(loop_wait, Some(LoopWait::Select { .. })),
    };
    if builtin {
        return Some(BUILTIN_INTERVAL_MS);
    }
    beats
        .min_interval_ns
        .map(|n| (n / MS).max(BUILTIN_INTERVAL_MS))
}

impl Correlator {
    /// A look at every worker's heartbeat, a few times a second.
    pub fn on_tick(&mut self, now_ns: u64, enr: &mut dyn Enricher) -> Vec<Output> {
        let workers: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.role == Role::Worker)
            .map(|(&pid, _)| pid)
            .collect();
        workers
            .into_iter()
            .flat_map(|pid| self.check_heartbeat(pid, now_ns, enr))
            .collect()
    }

    /// A heartbeat older than the threshold and two intervals, while the
    /// loop thread has stayed away from its loop's wait since the heartbeat
    /// was overdue (one interval old), is a stall: on the CPU if it never
    /// slept meanwhile, else busy in short calls. A fresh heartbeat ends it.
    fn check_heartbeat(&mut self, pid: u32, now_ns: u64, enr: &mut dyn Enricher) -> Vec<Output> {
        let Some(age_ms) = enr.heartbeat_age_ms(pid) else {
            return Vec::new();
        };
        let threshold_ms = self.threshold_ns / MS;
        let beat_ns = now_ns.saturating_sub(age_ms * MS);
        let Some(p) = self.procs.get_mut(&pid) else {
            return Vec::new();
        };
        if p.beats.saw(beat_ns) {
            p.beats.busy = None;
        }
        let class = p.worker_class.as_ref().map(|c| c.name.as_str());
        let interval = interval_ms(class, p.loop_wait, &p.beats);
        let step = interval.unwrap_or(BUILTIN_INTERVAL_MS);
        let stale_ms = threshold_ms.max(2 * step);
        if age_ms < step {
            return self.end_on_cpu(pid, beat_ns, Outcome::Resumed);
        }
        // Overdue: follow the loop thread.
        let Some(cpu) = enr.thread_cpu(pid, pid) else {
            return Vec::new();
        };
        let in_loop = p.loop_wait.map(|l| match enr.thread_now(pid, pid) {
            ThreadNow::InSyscall { nr, arg0 } => l.is(&syscalls::name(nr), arg0),
            _ => false,
        });
        let p = self.procs.get_mut(&pid).expect("checked above");
        let busy = p.beats.look(cpu, in_loop, now_ns);
        let already = self.on_cpu.contains_key(&pid) || self.active.contains_key(&pid);
        let Some(busy) = busy.filter(|_| interval.is_some() && !already && age_ms >= stale_ms)
        else {
            return Vec::new();
        };
        if now_ns.saturating_sub(busy.since_ns) + (step + LOOK_SLACK_MS) * MS < stale_ms * MS {
            return Vec::new();
        }
        // Busy needs evidence of many calls: sleeps counted since the first
        // look. A thread asleep all along is in one long call, which the
        // kernel times (a blocked stall, with its syscall), not busy.
        let state = if busy.slept {
            StallState::Busy
        } else if cpu.on_cpu {
            StallState::OnCpu
        } else {
            return Vec::new();
        };
        let measured = Measured {
            cpu_ms: cpu.cpu_ms.saturating_sub(busy.cpu_ms),
            sleeps: cpu.voluntary_switches.saturating_sub(busy.switches),
            ms: now_ns.saturating_sub(busy.since_ns) / MS,
        };
        // A loop that served a request within the threshold kept the CPU
        // serving them, one after another: not one request that never
        // yields. (Over the last threshold only: a request that began to
        // hold the loop after the look that started the count is named
        // once it has held it that long.)
        let master = self.procs[&pid].master;
        let window_ms = measured.ms.min(threshold_ms);
        if state == StallState::OnCpu && spin::served_meanwhile(enr, pid, master, window_ms) {
            return Vec::new();
        }
        let report = self.on_cpu_report(pid, state, beat_ns, age_ms, measured, enr);
        let p = self.procs.get_mut(&pid).expect("checked above");
        p.stalls += 1;
        p.last_stall = Some(report.clone());
        self.on_cpu.insert(pid, report.clone());
        vec![Output::Stall {
            ts_ns: now_ns,
            report,
        }]
    }

    fn on_cpu_report(
        &self,
        pid: u32,
        state: StallState,
        beat_ns: u64,
        age_ms: u64,
        measured: Measured,
        enr: &mut dyn Enricher,
    ) -> StallReport {
        let p = &self.procs[&pid];
        let thread_name = enr.thread_name(pid, pid);
        let mut report = StallReport {
            pid,
            tid: pid,
            master_pid: p.master,
            role: p.role,
            comm: thread_name.clone(),
            thread_name,
            state,
            syscall: None,
            fd_kind: FdKind::Unknown,
            blocked_ms: age_ms,
            heartbeat_age_ms: Some(age_ms),
            cpu_ms: Some(measured.cpu_ms),
            sleeps: Some(measured.sleeps),
            measured_ms: Some(measured.ms),
            on_cpu_evidence: (state == StallState::OnCpu).then_some(OnCpuEvidence::Heartbeat),
            gunicorn_timeout_s: p.timeout_s,
            worker_class: p.worker_class.clone(),
            container: p.container.clone(),
            start_ns: beat_ns,
            ..Default::default()
        };
        report.cause = signatures::identify(&report);
        report
    }

    /// Ends the stall of `pid` without a syscall (on the CPU, or busy), if
    /// it has one.
    pub(super) fn end_on_cpu(&mut self, pid: u32, ts_ns: u64, outcome: Outcome) -> Vec<Output> {
        let Some(r) = self.on_cpu.remove(&pid) else {
            return Vec::new();
        };
        let ts_ns = ts_ns.max(r.start_ns);
        let blocked_ms = ts_ns.saturating_sub(r.start_ns) / MS;
        if let Some(p) = self.procs.get_mut(&pid)
            && let Some(last) = p.last_stall.as_mut()
            && last.state == r.state
            && last.start_ns == r.start_ns
        {
            current_figures(last, &p.beats, ts_ns);
        }
        vec![stall_end(&r, ts_ns, blocked_ms, outcome)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeats_teach_the_interval() {
        let mut b = Beats::default();
        assert!(b.saw(1000 * MS));
        assert!(!b.saw(1050 * MS), "the same heartbeat, read again");
        assert!(b.saw(3000 * MS));
        assert!(b.saw(5500 * MS));
        assert_eq!(b.min_interval_ns, Some(2000 * MS));
        assert_eq!(interval_ms(Some("uvicorn"), None, &b), Some(2000));
        assert_eq!(interval_ms(Some("gevent"), None, &b), Some(1000));
        assert_eq!(
            interval_ms(None, None, &Beats::default()),
            None,
            "unknown class, nothing seen yet"
        );
        let select = LoopWait::Select { nfds: 9, fds: 0 };
        assert_eq!(
            interval_ms(None, Some(select), &Beats::default()),
            Some(1000)
        );
    }

    fn cpu(on_cpu: bool, voluntary_switches: u64, cpu_ms: u64) -> ThreadCpu {
        ThreadCpu {
            on_cpu,
            cpu_ms,
            voluntary_switches,
        }
    }

    #[test]
    fn without_its_loop_known_a_sleep_restarts_the_busy_count() {
        let mut b = Beats::default();
        assert!(
            b.look(cpu(true, 5, 100), None, 1000 * MS).is_none(),
            "first look"
        );
        let busy = b.look(cpu(true, 5, 900), None, 2000 * MS).unwrap();
        assert_eq!(
            (busy.since_ns, busy.cpu_ms, busy.slept),
            (1000 * MS, 100, false)
        );
        assert!(
            b.look(cpu(true, 6, 950), None, 2250 * MS).is_none(),
            "it slept"
        );
        assert!(
            b.look(cpu(false, 6, 950), None, 2500 * MS).is_none(),
            "asleep now"
        );
    }

    #[test]
    fn with_its_loop_known_only_the_loops_wait_restarts_it() {
        let mut b = Beats::default();
        assert!(b.look(cpu(false, 5, 100), Some(false), 1000 * MS).is_none());
        let busy = b.look(cpu(false, 9, 300), Some(false), 2000 * MS).unwrap();
        assert!(
            busy.slept,
            "short sleeps outside the loop: busy, not on the CPU"
        );
        assert!(b.look(cpu(false, 10, 300), Some(true), 2250 * MS).is_none());
        assert!(b.busy.is_none(), "back in its loop's wait");
    }
}
