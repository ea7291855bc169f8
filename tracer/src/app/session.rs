//! One tracing session: the kernel probes, the correlator, and everything
//! that happens between a kernel event and a line of output.
use std::collections::{HashMap, VecDeque};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Result;

pub use super::enricher::{ProcEnricher, container_of};
use super::metrics_server::Shared;
use super::sink::Sink;
use super::targets::Target;
use crate::analysis::{Correlator, NewProcess, StackSample, signatures, syscalls};
use crate::host::waits;
use crate::host::{gunicorn, proc, pystack, threads};
use crate::kernel::{Probes, decode};
use crate::model::{
    KernelEvent, LoopWait, Losses, Offender, Output, Role, Sample, Source, StallReport,
    TopOffenders,
};
use crate::present::{self, metrics};

/// Attaches a stall's Python stack (or why it was not read) to its report,
/// and judges its cause again: a frame of the stack names it when it can.
fn attach_stack(report: &mut StallReport, r: Result<pystack::Captured, String>) {
    match r {
        Ok(c) => {
            report.py_stack = Some(c.frames);
            report.py_stack_omitted = Some(c.omitted).filter(|n| *n > 0);
            report.py_threads = c.others;
        }
        Err(e) => report.py_stack_error = Some(e),
    }
    report.cause = signatures::identify(report);
}

fn with_stack(o: Output, r: Result<pystack::Captured, String>) -> Output {
    let Output::Stall { ts_ns, mut report } = o else {
        return o;
    };
    attach_stack(&mut report, r);
    Output::Stall { ts_ns, report }
}

/// The stacks attached to the latest stalls, kept for the worker_timeout
/// that blames one of them (its stack is the stall's, read while the thread
/// was blocked: one read at the kill would find the signal's handler).
#[derive(Default)]
pub struct StallStacks(VecDeque<StallStack>);

struct StallStack {
    pid: u32,
    tid: u32,
    start_ns: u64,
    stack: Result<pystack::Captured, String>,
}

/// Stall stacks kept, at most: a timeout blames a stall of the last
/// --timeout seconds.
const STALL_STACKS_KEPT: usize = 256;

impl StallStacks {
    fn keep(&mut self, s: &StallReport) {
        let stack = match (&s.py_stack, &s.py_stack_error) {
            (Some(frames), _) => Ok(pystack::Captured {
                frames: frames.clone(),
                omitted: s.py_stack_omitted.unwrap_or(0),
                others: s.py_threads.clone(),
            }),
            (None, Some(e)) => Err(e.clone()),
            (None, None) => return,
        };
        self.0
            .retain(|k| (k.tid, k.start_ns) != (s.tid, s.start_ns));
        if self.0.len() >= STALL_STACKS_KEPT {
            self.0.pop_front();
        }
        self.0.push_back(StallStack {
            pid: s.pid,
            tid: s.tid,
            start_ns: s.start_ns,
            stack,
        });
    }

    /// The stack of the stall a worker_timeout blames, attached to it.
    fn attach(&self, mut o: Output) -> Output {
        if let Output::WorkerTimeout {
            stall: Some(report),
            ..
        } = &mut o
        {
            let r = self
                .0
                .iter()
                .rev()
                .find(|k| (k.tid, k.start_ns) == (report.tid, report.start_ns))
                .map(|k| k.stack.clone())
                .unwrap_or_else(|| {
                    Err("no stack was read for this stall while it was blocked".into())
                });
            attach_stack(report, r);
        }
        o
    }

    fn forget(&mut self, pid: u32) {
        self.0.retain(|k| k.pid != pid);
    }
}

/// How long an EXIT event is held: the kernel closes the process's sockets
/// within microseconds of it; this leaves room for a busy machine.
const EXIT_HOLD_NS: u64 = 20_000_000;
/// Held longer while the process still has fds: it is freeing a lot of
/// memory first (an OOM victim), and its sockets close after that.
const EXIT_HOLD_MAX_NS: u64 = 2_000_000_000;
/// How often WATCHED is checked for processes whose EXIT event was lost.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often workers' heartbeats are looked at, for loops that keep the CPU.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);

pub struct Session {
    pub probes: Probes,
    pub corr: Correlator,
    pub enricher: ProcEnricher,
    pub sink: Sink,
    pub discover: bool,
    pub events_received: u64,
    /// EXIT events held back, with when they arrived (see `flush_exits`).
    pub exits: Vec<(u64, KernelEvent)>,
    pub last_sweep: Instant,
    pub last_heartbeats: Instant,
    pub last_loop_search: Instant,
    /// --loop-search-every (hidden; 1 s).
    pub loop_search_every: Duration,
    /// Which workers without a known loop are searched each round.
    pub loop_search: super::loop_search::LoopSearch,
    /// Listening fds of each watched process with any: a master's are its
    /// workers' (inherited at the fork).
    pub listeners: HashMap<u32, Vec<i32>>,
    /// Reads stalled threads' Python stacks (None with --no-py-stack).
    pub stacks: Option<pystack::StackReader>,
    /// --py-stack all-threads: every thread's stack, not only the stalled one's.
    pub all_threads: bool,
    /// Output waiting for a Python stack ahead of it, in order.
    pub pending: VecDeque<Pending>,
    /// Stacks of recent stalls, for the worker_timeout that blames one.
    pub stall_stacks: StallStacks,
    /// Stacks of loop threads running without a sleep, asked for to tell
    /// a CPU stall (see `analysis::spin`): pid, when asked, the answer.
    pub spin_stacks: Vec<SpinStack>,
    pub durations: metrics::StallDurations,
    /// When the metrics text was last rendered (None: no metrics server).
    pub metrics: Option<Instant>,
    /// What the HTTP servers answer from: metrics text, loop heartbeat.
    pub served: Shared,
    /// --max-watched-per-master.
    pub max_per_master: usize,
    /// Forks dropped because their master was at its quota.
    pub over_quota: u64,
    /// Masters discovery watches per container (--max-masters-per-container).
    pub masters: super::tenants::MasterQuota,
}

/// A loop thread's stack asked for by the CPU-stall rule.
pub struct SpinStack {
    pid: u32,
    asked_ns: u64,
    rx: Receiver<Result<pystack::Captured, String>>,
    deadline: Instant,
}

/// Output held back behind a stall whose Python stack is being read, so
/// that events keep their order while the reader works off the event loop.
pub enum Pending {
    Ready(Output),
    Stack(Output, Receiver<Result<pystack::Captured, String>>, Instant),
}

impl Session {
    pub fn emit(&mut self, o: &Output) {
        if let Output::StallEnd {
            fd_kind,
            blocked_ms,
            ..
        } = o
        {
            self.durations.observe(*fd_kind, *blocked_ms);
        }
        // A stall named from its stack samples carries its stack already.
        if let (Some(reader), Output::Stall { report, .. }) = (&self.stacks, o)
            && report.py_stack.is_none()
        {
            let deadline = Instant::now() + pystack::CAPTURE_DEADLINE;
            let rx = reader.capture(report.pid, report.tid, self.all_threads, deadline);
            self.pending
                .push_back(Pending::Stack(o.clone(), rx, deadline));
            return;
        }
        if self.pending.is_empty() {
            self.write(o.clone());
        } else {
            self.pending.push_back(Pending::Ready(o.clone()));
        }
    }

    /// Writes an event whose stack is settled: a stall's is kept, a
    /// worker_timeout gets its stall's (with --no-py-stack, neither).
    fn write(&mut self, o: Output) {
        let o = match (&self.stacks, &o) {
            (None, _) => o,
            (Some(_), Output::Stall { report, .. }) => {
                self.stall_stacks.keep(report);
                self.corr.stack_read(report);
                o
            }
            (Some(_), _) => self.stall_stacks.attach(o),
        };
        self.sink.event(&o);
    }

    /// Writes the held output whose stacks have arrived (or whose deadline
    /// passed), in order; with `stop_by` (the run is ending), waits for
    /// each until its deadline but not past `stop_by`, so that the tracer
    /// ends in time (see `ending`).
    pub fn flush_pending(&mut self, stop_by: Option<Instant>) {
        while let Some(front) = self.pending.pop_front() {
            let o = match front {
                Pending::Ready(o) => o,
                Pending::Stack(o, rx, deadline) => {
                    let r = match stop_by {
                        Some(by) => rx
                            .recv_timeout(
                                by.min(deadline).saturating_duration_since(Instant::now()),
                            )
                            .map_err(|e| match e {
                                RecvTimeoutError::Timeout => TryRecvError::Empty,
                                RecvTimeoutError::Disconnected => TryRecvError::Disconnected,
                            }),
                        None => rx.try_recv(),
                    };
                    let expired = Instant::now() >= deadline;
                    match r {
                        Err(TryRecvError::Empty) if !expired && stop_by.is_none() => {
                            self.pending.push_front(Pending::Stack(o, rx, deadline));
                            return;
                        }
                        Err(TryRecvError::Empty) if !expired => with_stack(
                            o,
                            Err("the Python stack was not read before the tracer stopped".into()),
                        ),
                        Err(TryRecvError::Empty) => with_stack(
                            o,
                            Err(format!(
                                "the Python stack was not read within {}ms",
                                pystack::CAPTURE_DEADLINE.as_millis()
                            )),
                        ),
                        Ok(r) => with_stack(o, r),
                        Err(TryRecvError::Disconnected) => {
                            with_stack(o, Err("the stack reader stopped".into()))
                        }
                    }
                }
            };
            self.write(o);
        }
    }

    /// Re-renders the metrics text, at most once a second.
    pub fn render_metrics(&mut self, force: bool) {
        let Some(last) = self.metrics.as_mut() else {
            return;
        };
        if !force && last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let text = self.served.text.clone();
        let summary = self.corr.summary(present::monotonic_ns());
        let me = metrics::SelfStats {
            events_received: self.events_received,
            losses: self.losses(),
            maps: self.probes.occupancy(),
            bpf_errors: self.probes.bpf_errors(),
        };
        let probes = &self.probes;
        let heartbeats = &mut self.enricher.heartbeats;
        let body = metrics::render(
            &summary,
            &mut |pid| heartbeats.age_ms(pid),
            &mut |pid| probes.read_hist(pid),
            &self.durations,
            &me,
        );
        if let Ok(mut t) = text.lock() {
            *t = body;
        }
    }

    /// Registers the ports `pid` listens on with the kernel. Ports are never
    /// removed: a stale one only times a few more connections.
    fn add_listeners(&mut self, pid: u32) {
        let found = proc::listening_fds(pid);
        for (_, port) in &found {
            self.probes.add_port(*port);
        }
        let ports: Vec<u16> = found.iter().map(|(_, port)| *port).collect();
        self.enricher.sockets.add_ports(pid, &ports);
        if !found.is_empty() {
            self.listeners
                .insert(pid, found.into_iter().map(|(fd, _)| fd).collect());
        }
    }

    /// Starts watching a process: kernel map first (so forks from now on
    /// are followed), then the threads already blocked, then the report.
    pub fn watch_process(&mut self, t: &Target, source: Source, now: u64) -> Result<()> {
        self.probes.watch(t.pid, t.master, t.role)?;
        self.enricher.remember_now(t.pid);
        self.add_listeners(t.pid);
        if let (Some(reader), Role::Worker) = (&self.stacks, t.role) {
            reader.open(t.pid);
        }
        for tid in proc::threads(t.pid) {
            if let Some((nr, args)) = threads::thread_syscall(t.pid, tid) {
                self.probes
                    .seed_inflight(tid, t.pid, nr, [args[0], args[1], args[2]], now);
            }
        }
        let gunicorn = matches!(t.role, Role::Master | Role::Worker);
        let cmd = proc::cmdline(t.master);
        // A master's configuration is read once; its workers found with it
        // take theirs from the correlator.
        let inherited = (t.role == Role::Worker)
            .then(|| self.corr.master_defaults(t.master))
            .flatten();
        let config = (gunicorn && inherited.is_none()).then(|| gunicorn::read_config(t.master));
        let (timeout_s, worker_class) = match (&inherited, &config) {
            (Some(inherited), _) => inherited.clone(),
            (None, Some(c)) => (c.settings.timeout, c.known_class()),
            (None, None) => (None, None),
        };
        let p = NewProcess {
            pid: t.pid,
            master: t.master,
            role: t.role,
            app: gunicorn.then(|| proc::parse_app(&cmd)).flatten(),
            timeout_s,
            worker_class,
            settings: config.filter(|_| t.role == Role::Master),
            source,
            container: container_of(t.pid, &self.enricher.pods_dir),
        };
        if let Some(o) = self.corr.add_process(now, p) {
            self.emit(&o);
        }
        Ok(())
    }

    pub fn watch_master_and_workers(
        &mut self,
        master: u32,
        source: Source,
        now: u64,
    ) -> Result<()> {
        self.watch_process(&Target::master(master), source, now)?;
        for child in proc::children(master) {
            let worker = Target {
                pid: child,
                master,
                role: Role::Worker,
            };
            self.watch_process(&worker, source, now)?;
        }
        Ok(())
    }

    /// Whether discovery may watch master `pid`: its container (or the
    /// host) is under --max-masters-per-container. The first refusal of a
    /// container is said on stderr, naming it.
    pub fn admit_master(&mut self, pid: u32) -> bool {
        let container = container_of(pid, &self.enricher.pods_dir);
        let tenant = container
            .as_ref()
            .map_or(super::tenants::HOST, |c| c.id.as_str());
        match self.masters.admit(pid, tenant) {
            super::tenants::Admission::Watch => true,
            super::tenants::Admission::Refuse { first } => {
                if first {
                    let pod = container
                        .as_ref()
                        .and_then(|c| Some((c.namespace.as_deref()?, c.pod.as_deref()?)))
                        .map(|(ns, pod)| format!(" (pod {ns}/{pod})"))
                        .unwrap_or_default();
                    eprintln!(
                        "tracer: warning: {}{} already has --max-masters-per-container Gunicorn masters watched; master {pid} and further ones there are not watched",
                        present::sanitize(&match &container {
                            Some(c) => format!("container {}", c.id),
                            None => "the host (outside any container)".to_string(),
                        }),
                        present::sanitize(&pod)
                    );
                }
                false
            }
        }
    }

    /// A new Gunicorn master started (discovery mode): watch it and its workers.
    fn on_exec(&mut self, pid: u32) {
        if self.discover
            && !self.corr.is_watched(pid)
            && proc::identify(pid) == proc::Identity::Master
            && self.admit_master(pid)
        {
            let now = present::monotonic_ns();
            if let Err(e) = self.watch_master_and_workers(pid, Source::Exec, now) {
                eprintln!("tracer: warning: cannot watch new Gunicorn master {pid}: {e:#}");
            }
        }
    }

    /// The kernel's loss counters and ours.
    pub fn losses(&self) -> Losses {
        let kernel = self.probes.losses();
        Losses {
            // The kernel refuses most at the fork; we let go the rest.
            over_quota: kernel.over_quota + self.over_quota,
            masters_over_quota: self.masters.refused(),
            top_offenders: TopOffenders {
                masters_over_quota: self
                    .masters
                    .last_refused()
                    .map(|(pid, count)| Offender { pid, count }),
                ..kernel.top_offenders
            },
            stall_ends_unknown: self.corr.stall_ends_unknown(),
            ports_unscanned: self.enricher.sockets.ports_unscanned,
            holders_unsearched: self.enricher.holders_unsearched(),
            stalls_held_back: self.corr.stalls_held_back(),
            ..kernel
        }
    }

    /// Whether a forked process is to be followed: the kernel has it (its
    /// watch list was not full, or it would never send its exit) and its
    /// master is under its quota (else the kernel is told to let it go).
    fn admit_fork(&mut self, child: u32, master: u32) -> bool {
        if !self.probes.is_watched(child) {
            return false;
        }
        if self.corr.alive_under(master) >= self.max_per_master {
            self.probes.forget(child);
            self.over_quota += 1;
            return false;
        }
        true
    }

    fn handle(&mut self, ev: KernelEvent) {
        if let KernelEvent::Fork {
            child,
            master,
            ts_ns,
            ..
        } = ev
        {
            if !self.admit_fork(child, master) {
                return;
            }
            // The child started at its fork: a pid that later shows
            // another start is someone else's.
            self.enricher.remember(child, ts_ns);
        }
        match ev {
            KernelEvent::Exec { pid, .. } => return self.on_exec(pid),
            // A master found at its exec binds its sockets later, but always
            // before it forks a worker.
            KernelEvent::Fork {
                child,
                master,
                role: Role::Worker,
                ..
            } => {
                self.add_listeners(master);
                if let Some(reader) = &self.stacks {
                    reader.open(child);
                }
            }
            // The kernel closes an exiting process's sockets just after this
            // event; hold it so those closes are reported first, while the
            // process is still known and still in WATCHED.
            KernelEvent::Exit { .. } => return self.exits.push((present::monotonic_ns(), ev)),
            _ => {}
        }
        for o in self.corr.on_kernel(ev, &mut self.enricher) {
            self.emit(&o);
        }
    }

    /// Handles the exits held back for at least `EXIT_HOLD_NS` (all of them
    /// when `all`).
    pub fn flush_exits(&mut self, all: bool) {
        let now = present::monotonic_ns();
        let due_now = |(at, ev): &(u64, KernelEvent)| {
            let held = now.saturating_sub(*at);
            let closing = matches!(ev, KernelEvent::Exit { pid, .. } if proc::has_open_fds(*pid));
            all || held >= EXIT_HOLD_MAX_NS || (held >= EXIT_HOLD_NS && !closing)
        };
        let (due, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.exits)
            .into_iter()
            .partition(due_now);
        self.exits = held;
        for (_, ev) in due {
            let KernelEvent::Exit { pid, .. } = ev else {
                continue;
            };
            for o in self.corr.on_kernel(ev, &mut self.enricher) {
                self.emit(&o);
            }
            self.probes.forget(pid);
            self.masters.release(pid);
            self.enricher.forget(pid);
            if let Some(reader) = &self.stacks {
                reader.forget(pid);
            }
            self.stall_stacks.forget(pid);
        }
    }

    /// Handles a batch of kernel events from the intake thread.
    pub fn drain(&mut self, batch: Vec<KernelEvent>) {
        self.events_received += batch.len() as u64;
        for ev in batch {
            self.handle(ev);
        }
        self.flush_pending(None);
    }

    /// Processes still in WATCHED, or followed by the correlator, that no
    /// longer exist: their EXIT event was lost (ring buffer full) or never
    /// sent. Ends them as if it had arrived, so neither the kernel map, the
    /// report nor the metric series keeps a dead process.
    /// Returns whether it ran.
    fn sweep_dead(&mut self) -> bool {
        if self.last_sweep.elapsed() < SWEEP_EVERY {
            return false;
        }
        self.last_sweep = Instant::now();
        let held: Vec<u32> = self
            .exits
            .iter()
            .filter_map(|(_, e)| match e {
                KernelEvent::Exit { pid, .. } => Some(*pid),
                _ => None,
            })
            .collect();
        let mut known: Vec<u32> = self.probes.watched.keys().filter_map(|k| k.ok()).collect();
        known.extend(self.corr.alive_pids());
        known.sort_unstable();
        known.dedup();
        let dead: Vec<u32> = known
            .into_iter()
            .filter(|pid| !held.contains(pid) && !proc::exists(*pid))
            .collect();
        let alive = |pid: u32| proc::exists(pid);
        self.enricher.heartbeats.retain(alive);
        let now = present::monotonic_ns();
        self.enricher.heartbeats.retain(proc::exists);
        self.listeners.retain(|pid, _| proc::exists(*pid));
        for pid in dead {
            let ev = KernelEvent::Exit {
                ts_ns: now,
                pid,
                exit_code: None,
                signal: None,
            };
            self.exits.push((0, ev));
        }
        true
    }

    /// Workers whose event loop's own wait is not known yet: look for it
    /// (once they serve, their listeners show in it), and tell the kernel.
    fn search_loops(&mut self) {
        if self.last_loop_search.elapsed() < self.loop_search_every {
            return;
        }
        self.last_loop_search = Instant::now();
        let selects: Vec<i64> = syscalls::SELECTS
            .iter()
            .filter_map(|n| syscalls::number(n))
            .collect();
        let due = self.loop_search.due(&self.corr.workers_without_loop());
        for pid in due {
            let master = self.probes.master_of(pid).unwrap_or(pid);
            let Some(listeners) = self.listeners.get(&master).or(self.listeners.get(&pid)) else {
                continue;
            };
            if let Some(wait) = waits::find_loop(pid, listeners, &selects) {
                self.probes.set_loop(pid, wait);
                let now = present::monotonic_ns();
                if let Some(o) = self.corr.set_loop(now, pid, wait) {
                    self.emit(&o);
                }
                self.infer_class(pid, wait);
            }
        }
    }

    /// The class of a worker no setting names, from its loop's wait (and
    /// what it has loaded), once the loop is found.
    fn infer_class(&mut self, pid: u32, wait: LoopWait) {
        if !self.corr.class_unknown(pid) {
            return;
        }
        if let Some(class) = gunicorn::infer_class(pid, wait) {
            let now = present::monotonic_ns();
            if let Some(o) = self.corr.infer_class(now, pid, class) {
                self.emit(&o);
            }
        }
    }

    /// A few times a second: every worker's heartbeat, for loops that keep
    /// the CPU.
    fn check_heartbeats(&mut self) {
        if self.last_heartbeats.elapsed() < HEARTBEAT_EVERY {
            return;
        }
        self.last_heartbeats = Instant::now();
        let now = present::monotonic_ns();
        for o in self.corr.on_tick(now, &mut self.enricher) {
            self.emit(&o);
        }
    }

    /// Every poll, with stacks on: each worker's loop thread that keeps
    /// running without a sleep has its stack read (see `analysis::spin`);
    /// the answers that arrived are judged. Without stacks the heartbeat
    /// rule alone names loops on the CPU, and nothing is read here.
    fn sample_loops(&mut self) {
        let Some(reader) = &self.stacks else {
            return;
        };
        let now = present::monotonic_ns();
        let (due, ended) = self.corr.spin_look(now, &mut self.enricher);
        for pid in due {
            let deadline = Instant::now() + pystack::CAPTURE_DEADLINE;
            let rx = reader.capture(pid, pid, self.all_threads, deadline);
            self.spin_stacks.push(SpinStack {
                pid,
                asked_ns: now,
                rx,
                deadline,
            });
        }
        for o in &ended {
            self.emit(o);
        }
        let mut answered = Vec::new();
        self.spin_stacks.retain(|s| {
            let r = match s.rx.try_recv() {
                Ok(r) => r,
                Err(TryRecvError::Empty) if Instant::now() < s.deadline => return true,
                Err(_) => Err("the Python stack was not read in time".into()),
            };
            answered.push((s.pid, s.asked_ns, r));
            false
        });
        for (pid, asked_ns, r) in answered {
            let sample = r.map(|c| StackSample {
                frames: c.frames,
                omitted: c.omitted,
                others: c.others,
            });
            let now = present::monotonic_ns();
            for o in self
                .corr
                .spin_sampled(pid, asked_ns, sample, now, &mut self.enricher)
            {
                self.emit(&o);
            }
        }
    }

    /// One tick: lost exits, held exits, the loops and heartbeats of
    /// workers, then the in-flight map.
    pub fn poll(&mut self) {
        let sweep = self.sweep_dead();
        self.flush_exits(false);
        self.search_loops();
        self.check_heartbeats();
        self.sample_loops();
        let now = present::monotonic_ns();
        let mut entries = self.probes.inflight_samples();
        if sweep {
            let removed = self.probes.sweep_inflight(&entries, proc::thread_exists);
            entries.retain(|(tid, _)| !removed.contains(tid));
        }
        let samples: Vec<Sample> = entries
            .into_iter()
            .map(|(tid, e)| decode::sample(tid, &e))
            .collect();
        for o in self.corr.on_samples(&samples, now, &mut self.enricher) {
            self.emit(&o);
        }
        self.scan_sockets(now);
        self.flush_pending(None);
    }

    /// Hung requests: the connections on watched ports, when a scan is due.
    fn scan_sockets(&mut self, now: u64) {
        if !self.enricher.sockets.due() {
            return;
        }
        let pids: Vec<u32> = self.probes.watched.keys().filter_map(|k| k.ok()).collect();
        let (socks, unscanned) = self.enricher.sockets.scan(&pids);
        for o in self
            .corr
            .on_sockets(&socks, &unscanned, now, &mut self.enricher)
        {
            self.emit(&o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{End, FdKind, Peer, PyFrame, Role};

    fn frame(function: &str, file: &str, line: u32) -> PyFrame {
        PyFrame {
            function: function.into(),
            file: file.into(),
            line: Some(line),
        }
    }

    /// The seed's hang as the correlator reports it, before its stack.
    fn hang(start_ns: u64) -> StallReport {
        let mut s = StallReport {
            pid: 7,
            tid: 7,
            role: Role::Worker,
            syscall: Some("read".into()),
            fd_kind: FdKind::Pipe,
            count: Some(4),
            peers: vec![Peer {
                pid: 7,
                comm: "gunicorn".into(),
                fd: 12,
                end: End::Write,
            }],
            worker_class: Some("gevent".into()),
            start_ns,
            ..Default::default()
        };
        s.cause = signatures::identify(&s);
        s
    }

    fn captured() -> pystack::Captured {
        pystack::Captured {
            frames: vec![
                frame(
                    "Queue.get",
                    "/usr/lib/python3.11/multiprocessing/queues.py",
                    103,
                ),
                frame("enqueue_and_wait", "/srv/hang_app.py", 22),
            ],
            omitted: 0,
            others: None,
        }
    }

    fn timeout(stall: StallReport) -> Output {
        Output::WorkerTimeout {
            ts_ns: 1,
            pid: 7,
            master_pid: 1,
            signal: "SIGABRT".into(),
            escalated_to: None,
            escalated_after_ms: None,
            stall: Some(stall),
            watched_ms: None,
            gunicorn_timeout_s: Some(30.0),
            container: None,
        }
    }

    fn timeout_stall(o: Output) -> StallReport {
        match o {
            Output::WorkerTimeout { stall: Some(s), .. } => s,
            o => panic!("{o:?}"),
        }
    }

    #[test]
    fn a_stack_attached_later_judges_the_cause_again_from_its_frame() {
        let before = hang(5);
        let basis = |s: &StallReport| s.cause.as_ref().unwrap().evidence.clone().unwrap().basis;
        assert_eq!(basis(&before), crate::model::Basis::Inferred);
        let Output::Stall { report, .. } = with_stack(
            Output::Stall {
                ts_ns: 1,
                report: before.clone(),
            },
            Ok(captured()),
        ) else {
            panic!()
        };
        assert_eq!(basis(&report), crate::model::Basis::Frame);
        assert!(report.cause.unwrap().cause.contains("in Queue.get"));
        // A stack that could not be read leaves the inferred cause.
        let Output::Stall { report, .. } = with_stack(
            Output::Stall {
                ts_ns: 1,
                report: before,
            },
            Err("gone".into()),
        ) else {
            panic!()
        };
        assert_eq!(basis(&report), crate::model::Basis::Inferred);
        assert_eq!(report.py_stack_error.as_deref(), Some("gone"));
    }

    #[test]
    fn a_worker_timeout_carries_the_stack_of_the_stall_it_blames_and_no_other() {
        let mut kept = StallStacks::default();
        let mut seen = hang(5);
        attach_stack(&mut seen, Ok(captured()));
        kept.keep(&seen);
        // The correlator's copy of the stall (no stack), judged at the kill.
        let s = timeout_stall(kept.attach(timeout(hang(5))));
        assert_eq!(s.py_stack, Some(captured().frames));
        let e = s.cause.unwrap().evidence.unwrap();
        assert_eq!(e.frame.unwrap().function, "Queue.get");
        // Another stall of the same thread (a later call) has no stack kept:
        // said, not borrowed from the earlier one.
        let s = timeout_stall(kept.attach(timeout(hang(9))));
        assert_eq!(s.py_stack, None);
        assert!(s.py_stack_error.unwrap().contains("no stack was read"));
        // Forgotten with its process.
        kept.forget(7);
        let s = timeout_stall(kept.attach(timeout(hang(5))));
        assert_eq!(s.py_stack, None);
    }
}
