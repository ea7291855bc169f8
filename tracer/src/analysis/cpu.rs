//! Loops that keep the CPU. A greenlet that computes without a syscall
//! blocks the hub as surely as a read that never returns, but the kernel
//! sees no sleep. What shows is the worker's heartbeat: it stops while the
//! loop thread keeps running without sleeping. A worker at 100% CPU
//! serving load is not one: its heartbeat stays fresh.
use super::Enricher;
use super::correlator::Correlator;
use super::signatures;
use super::stalls::stall_end;
use crate::model::{FdKind, LoopWait, Outcome, Output, Role, StallReport, StallState, ThreadCpu};

const MS: u64 = 1_000_000;
/// Gunicorn's own workers touch their heartbeat about once a second while
/// their loop runs (an idle sync worker less often, but it is then asleep
/// in its select).
const BUILTIN_INTERVAL_MS: u64 = 1000;
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
    /// Since the heartbeat became overdue: the loop thread's voluntary
    /// context switches and CPU time when it was first seen busy, and when.
    busy: Option<Busy>,
}

#[derive(Debug, Clone, Copy)]
struct Busy {
    since_ns: u64,
    switches: u64,
    cpu_ms: u64,
}

impl Beats {
    /// Notes the heartbeat dated `beat_ns`; true when it is a new one.
    fn saw(&mut self, beat_ns: u64) -> bool {
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

    /// How long the thread has run without sleeping, from `cpu` now; a
    /// sleep (a new voluntary switch) starts the count again.
    fn busy_for(&mut self, cpu: ThreadCpu, now_ns: u64) -> Option<Busy> {
        match self.busy {
            Some(b) if b.switches == cpu.voluntary_switches && cpu.on_cpu => Some(b),
            _ => {
                self.busy = cpu.on_cpu.then_some(Busy {
                    since_ns: now_ns,
                    switches: cpu.voluntary_switches,
                    cpu_ms: cpu.cpu_ms,
                });
                None
            }
        }
    }
}

/// How often a worker heartbeats: about once a second for Gunicorn's own
/// classes; for others (Uvicorn's worker beats every timeout/2) the
/// shortest interval seen, once two heartbeats were.
fn interval_ms(class: Option<&str>, loop_wait: Option<LoopWait>, beats: &Beats) -> Option<u64> {
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
    /// loop thread has kept the CPU without sleeping for all but one
    /// interval of it, is a stall; a fresh heartbeat ends it.
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
        let interval = interval_ms(p.worker_class.as_deref(), p.loop_wait, &p.beats);
        let step = interval.unwrap_or(BUILTIN_INTERVAL_MS);
        let stale_ms = threshold_ms.max(2 * step);
        if age_ms < step {
            return self.end_on_cpu(pid, beat_ns, Outcome::Resumed);
        }
        // Overdue: follow the loop thread.
        let Some(cpu) = enr.thread_cpu(pid, pid) else {
            return Vec::new();
        };
        let p = self.procs.get_mut(&pid).expect("checked above");
        let busy = p.beats.busy_for(cpu, now_ns);
        let already = self.on_cpu.contains_key(&pid) || self.active.contains_key(&pid);
        let Some(busy) = busy.filter(|_| interval.is_some() && !already && age_ms >= stale_ms)
        else {
            return Vec::new();
        };
        if now_ns.saturating_sub(busy.since_ns) + step * MS < stale_ms * MS {
            return Vec::new();
        }
        let report = self.on_cpu_report(pid, beat_ns, age_ms, cpu.cpu_ms - busy.cpu_ms, enr);
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
        beat_ns: u64,
        age_ms: u64,
        cpu_ms: u64,
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
            state: StallState::OnCpu,
            syscall: None,
            fd_kind: FdKind::Unknown,
            blocked_ms: age_ms,
            heartbeat_age_ms: Some(age_ms),
            cpu_ms: Some(cpu_ms),
            gunicorn_timeout_s: p.timeout_s,
            worker_class: p.worker_class.clone(),
            container: p.container.clone(),
            start_ns: beat_ns,
            ..Default::default()
        };
        report.cause = signatures::identify(&report);
        report
    }

    /// Ends the on-CPU stall of `pid`, if it has one.
    pub(super) fn end_on_cpu(&mut self, pid: u32, ts_ns: u64, outcome: Outcome) -> Vec<Output> {
        let Some(r) = self.on_cpu.remove(&pid) else {
            return Vec::new();
        };
        let ts_ns = ts_ns.max(r.start_ns);
        let blocked_ms = ts_ns.saturating_sub(r.start_ns) / MS;
        if let Some(p) = self.procs.get_mut(&pid)
            && let Some(last) = p.last_stall.as_mut()
            && last.state == StallState::OnCpu
            && last.start_ns == r.start_ns
        {
            last.blocked_ms = blocked_ms;
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

    #[test]
    fn a_sleep_restarts_the_busy_count() {
        let mut b = Beats::default();
        let cpu = |on_cpu, voluntary_switches, cpu_ms| ThreadCpu {
            on_cpu,
            cpu_ms,
            voluntary_switches,
        };
        assert!(
            b.busy_for(cpu(true, 5, 100), 1000 * MS).is_none(),
            "first look"
        );
        let busy = b.busy_for(cpu(true, 5, 900), 2000 * MS).unwrap();
        assert_eq!((busy.since_ns, busy.cpu_ms), (1000 * MS, 100));
        assert!(
            b.busy_for(cpu(true, 6, 950), 2250 * MS).is_none(),
            "it slept"
        );
        assert!(
            b.busy_for(cpu(false, 6, 950), 2500 * MS).is_none(),
            "asleep now"
        );
    }
}
