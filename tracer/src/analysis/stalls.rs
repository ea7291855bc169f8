//! Blocked syscalls: a stall is reported once, while it is still blocked,
//! and ended when the call is over. The kernel holds a call open across
//! wake-ups (a signal, a tracer's stop, a restart: the same call goes on)
//! and judges it when it next sees the thread; when the thread went back
//! to its loop's own wait, which the kernel does not look at, or has not
//! slept since, the call is judged here from /proc.
use std::collections::HashMap;

use tracer_common::{RESTART_WINDOW_NS, STOP_RESUME_WINDOW_NS};

use super::Enricher;
use super::correlator::{Correlator, Proc};
use super::cpu::Beats;
use super::{signatures, syscalls};
use crate::model::{
    FdInfo, FdKind, KernelEvent, LoopWait, Outcome, Output, Role, Sample, StallReport, StallState,
    ThreadNow, WaitFd, Wake, WokeBy,
};

/// gthread's `futures.wait(timeout=1.0)` at --worker-connections, with
/// room for a loaded machine.
const GTHREAD_FUTURES_WAIT_NS: u64 = 1_500_000_000;
/// A multiplexer's fds named in a stall, at most.
const MAX_WAIT_FDS: usize = 16;
/// New stalls reported per master between two polls of the in-flight map,
/// at most, other than a worker's loop thread (always reported at once):
/// each report costs /proc lookups on the session's thread, and a process
/// whose threads keep blocking must not hold back every other one's. The
/// rest wait for the next poll; one that ends before its turn is counted.
pub(super) const MAX_NEW_STALLS_PER_POLL: u32 = 8;
/// A worker that heartbeated within this long of its fork may still be
/// taken for one that never did (/proc's start time has 10 ms ticks).
const FORK_TOLERANCE_MS: u64 = 20;

/// A stall not reported yet because its master had its share of new
/// reports (`MAX_NEW_STALLS_PER_POLL`).
#[derive(Debug)]
pub(super) struct HeldBack;

/// A stall that was reported and has not ended yet.
#[derive(Debug, Clone)]
pub(super) struct Active {
    pub report: StallReport,
    /// The kernel's entry for the call: the same across its wake-ups.
    seq: u64,
    start_ns: u64,
    nr: i64,
    arg0: u64,
    /// When and how the thread last woke in it, as last polled.
    woke: Option<(u64, WokeBy)>,
    /// Polls in a row that did not find the call in the kernel's map.
    missing_polls: u32,
}

fn outcome_of(wake: Wake) -> Outcome {
    match wake {
        Wake::Killed => Outcome::Exited,
        Wake::Interrupted => Outcome::Interrupted,
        Wake::Returning => Outcome::Returned,
        Wake::Woke => Outcome::Woke,
    }
}

/// How long a call has been (or was) blocked at `now_ns`: until its last
/// wake when the thread is out of it.
fn blocked_ns(s: &Sample, now_ns: u64) -> u64 {
    let until = if s.is_open() { s.woke_ns } else { now_ns };
    until.saturating_sub(s.start_ns)
}

impl Correlator {
    /// The stall `pid` is in at `now_ns` (its loop thread's first, then an
    /// on-CPU one, then another thread's), with `blocked_ms` up to date.
    pub(super) fn current_stall(&self, pid: u32, now_ns: u64) -> Option<StallReport> {
        let blocked = self
            .active
            .values()
            .filter(|a| a.report.pid == pid)
            .min_by_key(|a| (a.report.tid != pid, a.report.start_ns))
            .map(|a| &a.report);
        let loop_blocked = blocked.filter(|r| r.tid == pid);
        let beats = &self.procs.get(&pid)?.beats;
        loop_blocked.or(self.on_cpu.get(&pid)).or(blocked).map(|r| {
            let mut r = r.clone();
            current_figures(&mut r, beats, now_ns);
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
        let mut out: Vec<Output> = tids
            .into_iter()
            .filter_map(|tid| {
                // Woken with nothing pending, then the process ended: the
                // call had returned.
                match self.active.get(&tid).and_then(|a| a.woke) {
                    Some((at, WokeBy::Plain)) => self.end(tid, at, Outcome::Returned),
                    _ => self.end(tid, ts_ns, outcome),
                }
            })
            .collect();
        out.extend(self.end_on_cpu(pid, ts_ns, outcome));
        self.ended.retain(|_, &mut (p, _, _)| p != pid);
        out
    }

    /// The kernel judged a long call over.
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
        if let Some(a) = self.active.get(&tid)
            && a.start_ns == start_ns
        {
            return self.end(tid, ts_ns, outcome_of(wake)).into_iter().collect();
        }
        if self.ended.get(&tid).is_some_and(|&(_, _, s)| s == start_ns) {
            return Vec::new();
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
            active: false,
            seeded,
            woke_ns: ts_ns,
            woke_by: WokeBy::Plain,
        };
        let Ok(mut out) = self.new_stall(&s, ts_ns, enr) else {
            self.stalls_held_back += 1;
            return Vec::new();
        };
        if !out.is_empty() {
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
        let mut out = self.follow_active(samples, now_ns, enr);
        self.new_stalls.clear();
        for s in samples {
            if !s.in_call()
                || blocked_ns(s, now_ns) < self.threshold_ns
                || self.active.contains_key(&s.tid)
                || self.ended.get(&s.tid) == Some(&(s.tgid, s.seq, s.start_ns))
            {
                continue;
            }
            // Held back: still in the map at the next poll, it is seen then.
            out.extend(self.new_stall(s, now_ns, enr).unwrap_or_default());
        }
        out
    }

    /// Follows or ends the stalls already reported.
    fn follow_active(
        &mut self,
        samples: &[Sample],
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let mut out = Vec::new();
        let by_tid: HashMap<u32, &Sample> = samples.iter().map(|s| (s.tid, s)).collect();
        let tids: Vec<u32> = self.active.keys().copied().collect();
        for tid in tids {
            let a = self.active.get_mut(&tid).expect("key from map");
            let same_call = by_tid
                .get(&tid)
                .filter(|s| s.seq == a.seq && s.start_ns == a.start_ns && s.in_call());
            let Some(s) = same_call else {
                // The kernel ended it (its event is on the way) or the
                // thread is gone; wait one more poll for the event. With
                // no event and no wake seen, how it ended is not known.
                a.missing_polls += 1;
                if a.missing_polls >= 2 {
                    let (at, outcome) = match a.woke {
                        Some((at, _)) => (at, Outcome::Woke),
                        None => (now_ns, Outcome::Unknown),
                    };
                    if outcome == Outcome::Unknown {
                        self.stall_ends_unknown += 1;
                    }
                    out.extend(self.end(tid, at, outcome));
                }
                continue;
            };
            a.missing_polls = 0;
            if s.active {
                a.woke = None;
                continue;
            }
            a.woke = Some((s.woke_ns, s.woke_by));
            let (pid, nr, arg0) = (a.report.pid, a.nr, a.arg0);
            if let Some(outcome) = judge_open(s, nr, arg0, now_ns, || enr.thread_now(pid, tid)) {
                out.extend(self.end(tid, s.woke_ns, outcome));
            }
        }
        out
    }

    /// Reports a call past the threshold if it is a stall for its thread;
    /// nothing otherwise. `Err(HeldBack)`: it is one, and its master has
    /// had its share of new reports since the last poll.
    pub(super) fn new_stall(
        &mut self,
        s: &Sample,
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Result<Vec<Output>, HeldBack> {
        let Some(p) = self.procs.get(&s.tgid).filter(|p| p.alive) else {
            return Ok(Vec::new());
        };
        let name = syscalls::name(s.nr).into_owned();
        let loop_wait = p.loop_wait.map(|l| l.is(&name, s.arg0));
        if !syscalls::is_stall(p.role, s.tid == s.tgid, s.nr, loop_wait)
            || is_gthread_pool_wait(p, s, &name, now_ns)
        {
            return Ok(Vec::new());
        }
        if loop_wait == Some(false) && self.is_loops_own_epoll(s, &name, enr) {
            return Ok(Vec::new());
        }
        // A thread that is not the loop's, or a worker's child, may be
        // waiting for work: a stall only while a request waits with it. (A
        // plain process's children are judged like it: no request is known
        // there.)
        let p = &self.procs[&s.tgid];
        let workers_child = p.role == Role::Child
            && self
                .procs
                .get(&p.master)
                .is_none_or(|m| m.role != Role::Plain);
        let request = if (p.role == Role::Worker && s.tid != s.tgid) || workers_child {
            match self.requests.tied_to(s.tgid, s.start_ns, now_ns, enr) {
                Some(r) => Some(r),
                None => return Ok(Vec::new()),
            }
        } else {
            None
        };
        let p = &self.procs[&s.tgid];
        let loop_thread = p.role == Role::Worker && s.tid == s.tgid;
        if !loop_thread {
            let n = self.new_stalls.entry(p.master).or_default();
            if *n >= MAX_NEW_STALLS_PER_POLL {
                return Err(HeldBack);
            }
            *n += 1;
        }
        let fd = syscalls::takes_fd(&name).then_some(s.arg0 as i32);
        let info = fd
            .map(|fd| enr.fd_info(s.tgid, fd))
            .unwrap_or_else(FdInfo::unknown);
        let wait_fds = match fd {
            Some(fd) => vec![wait_fd(enr, s.tgid, fd, info.clone())],
            None if syscalls::is_multiplexer(&name) => {
                let fds = enr.multiplexer_fds(s.tgid, s.tid, &name, s.arg0);
                fds.into_iter()
                    .take(MAX_WAIT_FDS)
                    .map(|fd| {
                        let info = enr.fd_info(s.tgid, fd);
                        wait_fd(enr, s.tgid, fd, info)
                    })
                    .collect()
            }
            None => Vec::new(),
        };
        let worker = p.role == Role::Worker;
        let heartbeat = if worker {
            enr.heartbeat_age_ms(s.tgid)
        } else {
            None
        };
        let never_heartbeated = heartbeat
            .zip(worker.then(|| enr.process_age_ms(s.tgid)).flatten())
            .map(|(hb, age)| hb + FORK_TOLERANCE_MS >= age);
        let thread_name = enr.thread_name(s.tgid, s.tid);
        // A select on no fd is a sleep (CPython before 3.11's time.sleep).
        let nfds = syscalls::SELECTS
            .contains(&name.as_str())
            .then_some(s.arg0 as u32);
        let mut report = StallReport {
            pid: s.tgid,
            tid: s.tid,
            master_pid: p.master,
            role: p.role,
            comm: thread_name.clone(),
            thread_name,
            state: StallState::Blocked,
            count: syscalls::takes_count(&name).then_some(s.arg2),
            syscall: Some(name),
            fd,
            only_self_can_wake: info.only_reader_can_write(s.tgid),
            fd_kind: info.kind,
            fd_target: info.target,
            peers: info.peers,
            peers_omitted: info.peers_omitted,
            wait_fds,
            nfds,
            blocked_ms: blocked_ns(s, now_ns) / 1_000_000,
            since_attach: s.seeded,
            heartbeat_age_ms: heartbeat,
            never_heartbeated,
            threads: enr.thread_count(s.tgid),
            cpu_ms: None,
            sleeps: None,
            measured_ms: None,
            on_cpu_evidence: None,
            samples_ms: None,
            handler: None,
            gunicorn_timeout_s: p.timeout_s.filter(|_| worker),
            worker_class: p.worker_class.clone().filter(|_| worker),
            cause: None,
            container: p.container.clone(),
            request_peer: request.as_ref().map(|r| r.peer.clone()),
            request_waiting_ms: request.map(|r| r.waiting_ms),
            py_stack: None,
            py_stack_omitted: None,
            py_stack_error: None,
            py_threads: None,
            start_ns: s.start_ns,
        };
        report.cause = signatures::identify(&report);
        let p = self.procs.get_mut(&s.tgid).expect("checked above");
        if let Some(age) = heartbeat {
            p.beats.saw(now_ns.saturating_sub(age * 1_000_000));
        }
        p.stalls += 1;
        p.last_stall = Some(report.clone());
        self.active.insert(
            s.tid,
            Active {
                report: report.clone(),
                seq: s.seq,
                start_ns: s.start_ns,
                nr: s.nr,
                arg0: s.arg0,
                woke: s.is_open().then_some((s.woke_ns, s.woke_by)),
                missing_polls: 0,
            },
        );
        // The loop thread went on to block: its time on the CPU is over.
        let mut out = Vec::new();
        if s.tid == s.tgid {
            out.extend(self.end_on_cpu(s.tgid, s.start_ns, Outcome::Blocked));
        }
        out.push(Output::Stall {
            ts_ns: now_ns,
            report,
        });
        Ok(out)
    }

    /// An epoll wait of the loop thread on another epoll fd that watches
    /// nothing but what the loop's own epoll fd watches (its wake-up
    /// eventfd, say) is the loop's wait on a re-created epoll instance, not
    /// a client's: no client waits on the loop's own fds. The loop is then
    /// looked for again.
    fn is_loops_own_epoll(&mut self, s: &Sample, name: &str, enr: &mut dyn Enricher) -> bool {
        let Some(p) = self.procs.get_mut(&s.tgid) else {
            return false;
        };
        let Some(LoopWait::Epoll { epfd }) = p.loop_wait else {
            return false;
        };
        if !syscalls::EPOLL_WAITS.contains(&name) {
            return false;
        }
        let theirs = enr.multiplexer_fds(s.tgid, s.tid, name, s.arg0);
        let ours = enr.multiplexer_fds(s.tgid, s.tid, name, epfd as u64);
        let own = theirs.iter().all(|fd| ours.contains(fd));
        if own {
            p.loop_wait = None;
        }
        own
    }

    fn end(&mut self, tid: u32, ts_ns: u64, outcome: Outcome) -> Option<Output> {
        let a = self.active.remove(&tid)?;
        self.ended.insert(tid, (a.report.pid, a.seq, a.start_ns));
        let blocked_ms = ts_ns.saturating_sub(a.report.start_ns) / 1_000_000;
        if let Some(p) = self.procs.get_mut(&a.report.pid)
            && let Some(last) = p.last_stall.as_mut()
            && last.tid == tid
            && last.start_ns == a.report.start_ns
        {
            current_figures(last, &p.beats, ts_ns);
        }
        Some(stall_end(&a.report, ts_ns, blocked_ms, outcome))
    }
}

/// gthread's main thread waits on its pool's futures (a futex) in two
/// places, neither of them a blocked loop: at --worker-connections, for up
/// to 1 s at a time, heartbeating in between; and at a graceful stop, for
/// up to --graceful-timeout, once the master asked it to stop.
fn is_gthread_pool_wait(p: &Proc, s: &Sample, name: &str, now_ns: u64) -> bool {
    p.role == Role::Worker
        && s.tid == s.tgid
        && p.worker_class.as_ref().is_some_and(|c| c.name == "gthread")
        && name.starts_with("futex")
        && (p.asked_to_stop || blocked_ns(s, now_ns) < GTHREAD_FUTURES_WAIT_NS)
}

/// Brings a stall's figures to `now_ns` (its end, or the moment a report
/// is made): how long it has lasted, and how old the heartbeat is (as last
/// seen: a worker's heartbeat is looked at a few times a second).
pub(super) fn current_figures(r: &mut StallReport, beats: &Beats, now_ns: u64) {
    r.blocked_ms = now_ns.saturating_sub(r.start_ns) / 1_000_000;
    if r.heartbeat_age_ms.is_some() {
        r.heartbeat_age_ms = beats.age_ms(now_ns).or(r.heartbeat_age_ms);
    }
}

/// The `stall_end` of a reported stall.
pub(super) fn stall_end(r: &StallReport, ts_ns: u64, blocked_ms: u64, outcome: Outcome) -> Output {
    Output::StallEnd {
        ts_ns,
        pid: r.pid,
        tid: r.tid,
        master_pid: r.master_pid,
        thread_name: r.thread_name.clone(),
        state: r.state,
        syscall: r.syscall.clone(),
        fd: r.fd,
        fd_kind: r.fd_kind,
        blocked_ms,
        since_attach: r.since_attach,
        outcome,
        container: r.container.clone(),
    }
}

/// A call the thread woke from and the kernel has not judged: over, and
/// how, or None to wait. After a signal or a stop the call may resume
/// within the restart window; after a plain wake-up, /proc says where the
/// thread is now.
fn judge_open(
    s: &Sample,
    nr: i64,
    arg0: u64,
    now_ns: u64,
    now: impl FnOnce() -> ThreadNow,
) -> Option<Outcome> {
    let since_wake = now_ns.saturating_sub(s.woke_ns);
    if s.woke_by.may_resume() {
        let window = if s.woke_by == WokeBy::Stop {
            STOP_RESUME_WINDOW_NS
        } else {
            RESTART_WINDOW_NS
        };
        return (since_wake >= window).then_some(Outcome::Interrupted);
    }
    let waited = since_wake >= RESTART_WINDOW_NS;
    match now() {
        ThreadNow::InSyscall { nr: n, arg0: a } if (n, a) == (nr, arg0) => None,
        ThreadNow::InSyscall { .. } | ThreadNow::OutsideSyscall | ThreadNow::Gone => {
            Some(Outcome::Returned)
        }
        ThreadNow::Running => waited.then_some(Outcome::Woke),
    }
}

/// One fd a call waits on, with the peer of a socket.
fn wait_fd(enr: &mut dyn Enricher, pid: u32, fd: i32, info: FdInfo) -> WaitFd {
    let peer = if info.kind == FdKind::Socket {
        enr.socket_peer(pid, fd)
    } else {
        None
    };
    WaitFd {
        fd,
        kind: info.kind,
        target: info.target,
        peer,
    }
}
