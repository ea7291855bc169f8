//! One tracing session: the kernel probes, the correlator, and everything
//! that happens between a kernel event and a line of output.
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;

use super::sink::Sink;
use super::targets::Target;
use crate::analysis::{Correlator, Enricher, NewProcess, syscalls};
use crate::host::waits::{self, Multiplexer};
use crate::host::{container, proc, pystack};
use crate::kernel::{Probes, intake};
use crate::model::{
    Container, FdInfo, KernelEvent, Output, Role, Sample, Source, ThreadCpu, ThreadNow, WokeBy,
};
use crate::present::{self, metrics};

/// /proc lookups for stalls being reported, calls the kernel left open,
/// and heartbeats.
#[derive(Default)]
pub struct ProcEnricher {
    pub heartbeats: proc::Heartbeats,
}

/// How a multiplexer names its fds, from its name.
fn multiplexer(name: &str) -> Option<Multiplexer> {
    if syscalls::EPOLL_WAITS.contains(&name) {
        Some(Multiplexer::Epoll)
    } else if syscalls::POLLS.contains(&name) {
        Some(Multiplexer::Poll)
    } else if syscalls::SELECTS.contains(&name) {
        Some(Multiplexer::Select)
    } else {
        None
    }
}

impl Enricher for ProcEnricher {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
        proc::fd_info(pid, fd)
    }
    fn heartbeat_age_ms(&mut self, pid: u32) -> Option<u64> {
        self.heartbeats.age_ms(pid)
    }
    fn comm(&mut self, pid: u32) -> String {
        proc::comm(pid)
    }
    fn container(&mut self, pid: u32) -> Option<Container> {
        container::of_process(pid)
    }
    fn thread_name(&mut self, pid: u32, tid: u32) -> String {
        proc::thread_name(pid, tid)
    }
    fn socket_peer(&mut self, pid: u32, fd: i32) -> Option<String> {
        proc::socket_peer(pid, fd)
    }
    fn multiplexer_fds(&mut self, pid: u32, tid: u32, syscall: &str, arg0: u64) -> Vec<i32> {
        match (multiplexer(syscall), syscalls::number(syscall)) {
            (Some(kind), Some(nr)) => waits::multiplexer_fds(pid, tid, kind, nr, arg0),
            _ => Vec::new(),
        }
    }
    fn thread_now(&mut self, pid: u32, tid: u32) -> ThreadNow {
        proc::thread_now(pid, tid)
    }
    fn thread_cpu(&mut self, pid: u32, tid: u32) -> Option<ThreadCpu> {
        proc::thread_cpu(pid, tid)
    }
    fn process_age_ms(&mut self, pid: u32) -> Option<u64> {
        proc::process_age_ms(pid)
    }
}

/// How long an EXIT event is held: the kernel closes the process's sockets
/// within microseconds of it; this leaves room for a busy machine.
const EXIT_HOLD_NS: u64 = 20_000_000;
/// How often WATCHED is checked for processes whose EXIT event was lost.
const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// How often workers' heartbeats are looked at, for loops that keep the CPU.
const HEARTBEAT_EVERY: Duration = Duration::from_millis(250);
/// How often workers whose event loop is not known yet are looked at.
const LOOP_SEARCH_EVERY: Duration = Duration::from_secs(1);

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
    /// Listening fds of each watched process with any: a master's are its
    /// workers' (inherited at the fork).
    pub listeners: HashMap<u32, Vec<i32>>,
    pub py_stack: bool,
    pub durations: metrics::StallDurations,
    /// Latest metrics text, shared with the HTTP server (when enabled).
    pub metrics: Option<(Arc<Mutex<String>>, Instant)>,
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
        if self.py_stack
            && let Output::Stall { ts_ns, report } = o
        {
            // Rare (once per stall) and bounded: worth a short pause here.
            let mut report = report.clone();
            match pystack::dump(report.pid, Duration::from_secs(5)) {
                Ok(stack) => report.py_stack = Some(stack),
                Err(e) => report.py_stack_error = Some(e),
            }
            self.sink.event(&Output::Stall {
                ts_ns: *ts_ns,
                report,
            });
            return;
        }
        self.sink.event(o);
    }

    /// Re-renders the metrics text, at most once a second.
    pub fn render_metrics(&mut self, force: bool) {
        let Some((text, last)) = self.metrics.as_mut() else {
            return;
        };
        if !force && last.elapsed() < Duration::from_secs(1) {
            return;
        }
        *last = Instant::now();
        let text = text.clone();
        let summary = self.corr.summary(present::monotonic_ns());
        let me = metrics::SelfStats {
            events_received: self.events_received,
            events_lost: self.probes.events_lost(),
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
        if !found.is_empty() {
            self.listeners
                .insert(pid, found.into_iter().map(|(fd, _)| fd).collect());
        }
    }

    /// Starts watching a process: kernel map first (so forks from now on
    /// are followed), then the threads already blocked, then the report.
    pub fn watch_process(&mut self, t: &Target, source: Source, now: u64) -> Result<()> {
        self.probes.watch(t.pid, t.master, t.role)?;
        self.add_listeners(t.pid);
        for tid in proc::threads(t.pid) {
            if let Some((nr, args)) = proc::thread_syscall(t.pid, tid) {
                self.probes
                    .seed_inflight(tid, t.pid, nr, [args[0], args[1], args[2]], now);
            }
        }
        let gunicorn = matches!(t.role, Role::Master | Role::Worker);
        let cmd = proc::cmdline(t.master);
        let p = NewProcess {
            pid: t.pid,
            master: t.master,
            role: t.role,
            app: gunicorn.then(|| proc::parse_app(&cmd)).flatten(),
            timeout_s: gunicorn.then(|| proc::parse_timeout(&cmd).unwrap_or(30.0)),
            worker_class: gunicorn.then(|| proc::parse_worker_class(&cmd)).flatten(),
            source,
            container: container::of_process(t.pid),
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

    /// A new Gunicorn master started (discovery mode): watch it and its workers.
    fn on_exec(&mut self, pid: u32) {
        if self.discover
            && !self.corr.is_watched(pid)
            && proc::identify(pid) == proc::Identity::Master
        {
            let now = present::monotonic_ns();
            if let Err(e) = self.watch_master_and_workers(pid, Source::Exec, now) {
                eprintln!("tracer: warning: cannot watch new Gunicorn master {pid}: {e:#}");
            }
        }
    }

    fn handle(&mut self, ev: KernelEvent) {
        match ev {
            KernelEvent::Exec { pid, .. } => return self.on_exec(pid),
            // A master found at its exec binds its sockets later, but always
            // before it forks a worker.
            KernelEvent::Fork {
                master,
                role: Role::Worker,
                ..
            } => self.add_listeners(master),
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
        let (due, held): (Vec<_>, Vec<_>) = std::mem::take(&mut self.exits)
            .into_iter()
            .partition(|(at, _)| all || now.saturating_sub(*at) >= EXIT_HOLD_NS);
        self.exits = held;
        for (_, ev) in due {
            let KernelEvent::Exit { pid, .. } = ev else {
                continue;
            };
            for o in self.corr.on_kernel(ev, &mut self.enricher) {
                self.emit(&o);
            }
            self.probes.forget(pid);
        }
    }

    pub fn drain(&mut self, rb: &mut aya::maps::RingBuf<aya::maps::MapData>) {
        let mut batch = Vec::new();
        while let Some(item) = rb.next() {
            if let Some(ev) = intake::decode(&item) {
                batch.push(ev);
            }
        }
        self.events_received += batch.len() as u64;
        for ev in batch {
            self.handle(ev);
        }
    }

    /// Processes still in WATCHED that no longer exist: their EXIT event was
    /// lost (ring buffer full). Ends them as if it had arrived, so neither
    /// the kernel map nor the report keeps a dead process.
    fn sweep_dead(&mut self) {
        if self.last_sweep.elapsed() < SWEEP_EVERY {
            return;
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
        let dead: Vec<u32> = self
            .probes
            .watched
            .keys()
            .filter_map(|k| k.ok())
            .filter(|pid| !held.contains(pid) && !proc::exists(*pid))
            .collect();
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
    }

    /// Workers whose event loop's own wait is not known yet: look for it
    /// (once they serve, their listeners show in it), and tell the kernel.
    fn search_loops(&mut self) {
        if self.last_loop_search.elapsed() < LOOP_SEARCH_EVERY {
            return;
        }
        self.last_loop_search = Instant::now();
        let selects: Vec<i64> = syscalls::SELECTS
            .iter()
            .filter_map(|n| syscalls::number(n))
            .collect();
        for pid in self.corr.workers_without_loop() {
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

    /// One tick: lost exits, held exits, the loops and heartbeats of
    /// workers, then the in-flight map.
    pub fn poll(&mut self) {
        self.sweep_dead();
        self.flush_exits(false);
        self.search_loops();
        self.check_heartbeats();
        let now = present::monotonic_ns();
        let samples: Vec<Sample> = self
            .probes
            .inflight_samples()
            .into_iter()
            .map(|(tid, e)| Sample {
                tid,
                tgid: e.tgid,
                nr: e.nr as i64,
                start_ns: e.start_ns,
                arg0: e.arg0,
                arg2: e.arg2,
                seq: e.seq,
                active: e.active != 0,
                seeded: e.seeded != 0,
                woke_ns: e.woke_ns,
                woke_by: WokeBy::from_kernel(e.woke_by),
            })
            .collect();
        for o in self.corr.on_samples(&samples, now, &mut self.enricher) {
            self.emit(&o);
        }
    }
}
