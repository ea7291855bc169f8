//! Blocked syscalls: a stall is reported once, while it is still blocked,
//! followed across signal restarts, and ended when the thread returns,
//! gives up, or dies.
use std::collections::HashMap;

use super::Enricher;
use super::correlator::Correlator;
use super::{signatures, syscalls};
use crate::model::{FdInfo, KernelEvent, Outcome, Output, Role, Sample, StallReport, Wake};

/// How long a syscall interrupted by a signal has to be restarted to count
/// as the same stall (Python retries EINTR after running the handler).
const RESTART_GRACE_NS: u64 = 200_000_000;

/// A stall that was reported and has not ended yet.
#[derive(Debug, Clone)]
pub(super) struct Active {
    pub report: StallReport,
    /// In-flight entry currently carrying it (changes when a syscall
    /// interrupted by a signal is restarted).
    seq: u64,
    cur_start_ns: u64,
    nr: i64,
    /// Set when a signal woke the thread: the stall ends unless
    /// the thread re-enters the same call on the same fd within the grace.
    interrupted_at: Option<u64>,
    /// Polls in a row that did not find it in flight.
    missing_polls: u32,
}

fn outcome_of(wake: Wake) -> Outcome {
    match wake {
        Wake::Killed => Outcome::Exited,
        Wake::Interrupted => Outcome::Interrupted,
        Wake::Returning => Outcome::Returned,
    }
}

impl Correlator {
    /// The stall `pid` is in at `now_ns` (its main thread's first), with
    /// `blocked_ms` brought up to date.
    pub(super) fn current_stall(&self, pid: u32, now_ns: u64) -> Option<StallReport> {
        self.active
            .values()
            .filter(|a| a.report.pid == pid)
            .min_by_key(|a| (a.report.tid != pid, a.report.start_ns))
            .map(|a| {
                let mut r = a.report.clone();
                r.blocked_ms = now_ns.saturating_sub(r.start_ns) / 1_000_000;
                r
            })
    }

    /// Ends every stall of a process (it exited).
    pub(super) fn end_stalls_of(&mut self, pid: u32, ts_ns: u64, outcome: Outcome) -> Vec<Output> {
        let tids: Vec<u32> = self
            .active
            .iter()
            .filter(|(_, a)| a.report.pid == pid)
            .map(|(t, _)| *t)
            .collect();
        tids.into_iter()
            .filter_map(|tid| self.end(tid, ts_ns, outcome))
            .collect()
    }

    /// A thread woke after a long sleep in a syscall.
    pub(super) fn on_sleep_end(&mut self, ev: &KernelEvent, enr: &mut dyn Enricher) -> Vec<Output> {
        let &KernelEvent::SleepEnd {
            ts_ns,
            tgid,
            tid,
            nr,
            start_ns,
            wake,
            arg0,
            arg2,
            seeded,
        } = ev
        else {
            return Vec::new();
        };
        if let Some(a) = self.active.get_mut(&tid)
            && a.cur_start_ns == start_ns
        {
            if wake == Wake::Interrupted {
                a.interrupted_at = Some(ts_ns);
                return Vec::new();
            }
            return self.end(tid, ts_ns, outcome_of(wake)).into_iter().collect();
        }
        // A stall that came and went between two polls: report both halves.
        let s = Sample {
            tid,
            tgid,
            nr,
            start_ns,
            arg0,
            arg2,
            seq: 0,
            active: true,
            seeded,
        };
        let mut out = Vec::new();
        if let Some(stall) = self.new_stall(&s, ts_ns, enr) {
            out.push(stall);
            out.extend(self.end(tid, ts_ns, outcome_of(wake)));
        }
        out
    }

    /// One poll of the kernel's in-flight map at kernel time `now_ns`.
    pub fn on_samples(
        &mut self,
        samples: &[Sample],
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let mut out = self.follow_active(samples, now_ns);
        for s in samples {
            if !s.active
                || now_ns.saturating_sub(s.start_ns) < self.threshold_ns
                || self.active.contains_key(&s.tid)
            {
                continue;
            }
            out.extend(self.new_stall(s, now_ns, enr));
        }
        out
    }

    /// Follows or ends the stalls already reported.
    fn follow_active(&mut self, samples: &[Sample], now_ns: u64) -> Vec<Output> {
        let mut out = Vec::new();
        let by_tid: HashMap<u32, &Sample> = samples.iter().map(|s| (s.tid, s)).collect();
        let tids: Vec<u32> = self.active.keys().copied().collect();
        for tid in tids {
            let a = self.active.get_mut(&tid).expect("key from map");
            let cur = by_tid.get(&tid).filter(|s| s.active);
            if let Some(at) = a.interrupted_at {
                match cur {
                    Some(s) if s.nr == a.nr && s.start_ns >= at => {
                        a.seq = s.seq;
                        a.cur_start_ns = s.start_ns;
                        a.interrupted_at = None;
                        a.missing_polls = 0;
                    }
                    _ if now_ns >= at + RESTART_GRACE_NS => {
                        out.extend(self.end(tid, at, Outcome::Interrupted));
                    }
                    _ => {}
                }
                continue;
            }
            match cur {
                Some(s) if s.seq == a.seq || (s.seeded && s.start_ns == a.cur_start_ns) => {
                    a.missing_polls = 0
                }
                _ => {
                    // Ended without a kernel event (restarted call that was
                    // short, or lost event). Wait one more poll for the event.
                    a.missing_polls += 1;
                    if a.missing_polls >= 2 {
                        out.extend(self.end(tid, now_ns, Outcome::Returned));
                    }
                }
            }
        }
        out
    }

    fn new_stall(&mut self, s: &Sample, now_ns: u64, enr: &mut dyn Enricher) -> Option<Output> {
        let p = self.procs.get(&s.tgid).filter(|p| p.alive)?;
        if !syscalls::is_stall(p.role, s.tid == s.tgid, s.nr) {
            return None;
        }
        let name = syscalls::name(s.nr).into_owned();
        let fd = syscalls::takes_fd(&name).then_some(s.arg0 as i32);
        let info = fd
            .map(|fd| enr.fd_info(s.tgid, fd))
            .unwrap_or_else(FdInfo::unknown);
        let heartbeat = if p.role == Role::Worker {
            enr.heartbeat_age_ms(s.tgid)
        } else {
            None
        };
        let mut report = StallReport {
            pid: s.tgid,
            tid: s.tid,
            master_pid: p.master,
            role: p.role,
            comm: enr.comm(s.tid),
            count: syscalls::takes_count(&name).then_some(s.arg2),
            syscall: name,
            fd,
            only_self_can_wake: info.only_reader_can_write(s.tgid),
            fd_kind: info.kind,
            fd_target: info.target,
            peers: info.peers,
            peers_omitted: info.peers_omitted,
            blocked_ms: now_ns.saturating_sub(s.start_ns) / 1_000_000,
            since_attach: s.seeded,
            heartbeat_age_ms: heartbeat,
            gunicorn_timeout_s: p.timeout_s.filter(|_| p.role == Role::Worker),
            cause: None,
            container: p.container.clone(),
            py_stack: None,
            py_stack_error: None,
            start_ns: s.start_ns,
        };
        report.cause = signatures::identify(&report);
        let p = self.procs.get_mut(&s.tgid).expect("checked above");
        p.stalls += 1;
        p.last_stall = Some(report.clone());
        self.active.insert(
            s.tid,
            Active {
                report: report.clone(),
                seq: s.seq,
                cur_start_ns: s.start_ns,
                nr: s.nr,
                interrupted_at: None,
                missing_polls: 0,
            },
        );
        Some(Output::Stall {
            ts_ns: now_ns,
            report,
        })
    }

    fn end(&mut self, tid: u32, ts_ns: u64, outcome: Outcome) -> Option<Output> {
        let a = self.active.remove(&tid)?;
        let blocked_ms = ts_ns.saturating_sub(a.report.start_ns) / 1_000_000;
        if let Some(p) = self.procs.get_mut(&a.report.pid)
            && let Some(last) = p.last_stall.as_mut()
        {
            last.blocked_ms = blocked_ms;
        }
        Some(Output::StallEnd {
            ts_ns,
            pid: a.report.pid,
            tid,
            master_pid: a.report.master_pid,
            syscall: a.report.syscall,
            fd: a.report.fd,
            fd_kind: a.report.fd_kind,
            blocked_ms,
            outcome,
            container: a.report.container,
        })
    }
}
