//! Loop threads that keep the CPU, named from their stacks about the
//! threshold after they stopped sleeping, for every worker class. The
//! heartbeat rule (`cpu`) waits two heartbeat intervals: two seconds for
//! Gunicorn's own workers, the whole timeout for Uvicorn's (it beats every
//! timeout/2). Here the kernel's count of a thread's voluntary sleeps
//! (`voluntary_ctxt_switches`, read only while its stat says it runs) shows
//! a loop thread that has not slept since some look; its Python stack is
//! then read twice, half a threshold apart. Both inside the same request
//! handler's frame, reached by the same outer frames, is a CPU stall. A
//! loop serving many requests without sleeping shows changing stacks (the
//! server's own code, another handler) and is not one.
use super::Enricher;
use super::correlator::Correlator;
use super::cpu;
use super::signatures;
use super::stalls::stall_end;
use crate::model::{
    FdKind, OnCpuEvidence, Outcome, Output, PyFrame, PyThread, Role, StallReport, StallState,
    ThreadCpu,
};

const MS: u64 = 1_000_000;
/// A heartbeat's age comes from its file's change time (a coarse clock):
/// one this close to the run's start may have come before it.
const BEAT_SLACK_NS: u64 = 50 * MS;
/// How late past its interval a heartbeat is overdue: a saturated loop
/// runs its notify timer late by the requests ready before it.
const OVERDUE_SLACK_MS: u64 = 250;

/// A stack read from a loop thread for this rule.
#[derive(Debug, Clone, PartialEq)]
pub struct StackSample {
    /// Innermost frame first.
    pub frames: Vec<PyFrame>,
    /// Outer frames left out past the reader's cap.
    pub omitted: u64,
    /// With --py-stack all-threads: the other threads.
    pub others: Option<Vec<PyThread>>,
}

/// A loop thread seen running without a voluntary sleep since `since_ns`.
#[derive(Debug, Clone, Default)]
pub(crate) struct Run {
    /// The first look that saw it running with `switches` sleeps so far:
    /// the run began at or before it.
    since_ns: u64,
    switches: u64,
    cpu_ms: u64,
    /// A stack asked for and not answered yet: when it was asked.
    asked_ns: Option<u64>,
    /// The last stack read in this run, with when it was asked.
    last: Option<(u64, StackSample)>,
    /// A stack could not be read in this run: it says nothing more.
    unreadable: bool,
    /// Reported (by this rule or the heartbeat's): no more samples.
    reported: bool,
}

/// What one look found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Look {
    /// Not running, or it slept since the last look: no run (any run ended).
    Slept,
    /// Running without a sleep; `sample`: read its stack now.
    Running { sample: bool },
}

impl Run {
    /// One look at the loop thread: `cpu` is None when it is not running
    /// (or cannot be read). A stack is asked for once it has run half a
    /// threshold without sleeping, then half a threshold after the last.
    pub(crate) fn look(
        run: &mut Option<Run>,
        cpu: Option<ThreadCpu>,
        now_ns: u64,
        threshold_ns: u64,
    ) -> Look {
        let Some(cpu) = cpu.filter(|c| c.on_cpu) else {
            *run = None;
            return Look::Slept;
        };
        match run {
            Some(r) if r.switches == cpu.voluntary_switches => {
                let step = threshold_ns / 2;
                let since = r.last.as_ref().map_or(r.since_ns, |(at, _)| *at);
                let sample = !r.reported
                    && !r.unreadable
                    && r.asked_ns.is_none()
                    && now_ns.saturating_sub(since) >= step;
                if sample {
                    r.asked_ns = Some(now_ns);
                }
                Look::Running { sample }
            }
            _ => {
                // It slept since the last look (or this is the first): a
                // run begins here, at a look, so it is a lower bound.
                let slept = run.is_some();
                *run = Some(Run {
                    since_ns: now_ns,
                    switches: cpu.voluntary_switches,
                    cpu_ms: cpu.cpu_ms,
                    ..Default::default()
                });
                if slept {
                    Look::Slept
                } else {
                    Look::Running { sample: false }
                }
            }
        }
    }

    /// The stack asked for at `asked_ns` arrived (or could not be read):
    /// the earlier sample and this one when both are inside the same
    /// handler.
    pub(crate) fn sampled(
        &mut self,
        asked_ns: u64,
        stack: Result<StackSample, String>,
    ) -> Option<Verdict> {
        if self.asked_ns != Some(asked_ns) {
            return None;
        }
        self.asked_ns = None;
        let Ok(stack) = stack else {
            self.unreadable = true;
            return None;
        };
        let verdict = self.last.as_ref().and_then(|(first_ns, first)| {
            same_handler(&first.frames, &stack.frames).map(|handler| Verdict {
                first_ns: *first_ns,
                second_ns: asked_ns,
                handler: handler.clone(),
            })
        });
        self.last = Some((asked_ns, stack));
        verdict
    }
}

/// Two samples inside the same handler.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Verdict {
    first_ns: u64,
    second_ns: u64,
    handler: PyFrame,
}

/// The CPU time a thread that kept the CPU used over a window: at least a
/// quarter of it (the rest may go to other runnable threads of a busy
/// machine; CPU time is counted in clock ticks of 10 ms).
pub(crate) fn keeps_the_cpu(cpu_ms: u64, window_ms: u64) -> bool {
    cpu_ms * 4 >= window_ms
}

/// Worker `pid` served its own connections within the last `window_ms`
/// (sent on one, or read a request): its loop went on from one request to
/// the next meanwhile, so no one request held it. A keep-alive client whose next request is there
/// before the loop looks elsewhere keeps one greenlet serving it, request
/// after request, without yielding: the heartbeat is late and two stacks
/// are in the same handler (seen under wrk: 5 ms requests, heartbeat 1.4 s
/// old). Connections that cannot be seen say nothing.
pub(super) fn served_meanwhile(
    enr: &mut dyn Enricher,
    pid: u32,
    master: u32,
    window_ms: u64,
) -> bool {
    enr.served_connections(pid, master)
        .is_some_and(|conns| conns.iter().any(|c| c.served_within(window_ms)))
}

/// The request handler's frame in a stack (innermost first): the outermost
/// application frame that library code called. Application frames outside
/// every library frame (the `gunicorn` script's own) are not a handler.
/// None when no application frame is inside a library one.
pub(crate) fn handler(frames: &[PyFrame]) -> Option<usize> {
    let mut in_library = false;
    for (i, f) in frames.iter().enumerate().rev() {
        if f.is_library() {
            in_library = true;
        } else if in_library {
            return Some(i);
        }
    }
    None
}

/// The package of a library frame (`uvicorn` for
/// `.../site-packages/uvicorn/protocols/http/h11_impl.py`, `asyncio`).
fn package(f: &PyFrame) -> Option<&str> {
    f.is_library()
        .then(|| f.short_file().split('/').next())
        .flatten()
}

/// The handler at `h` has called back into the server that called it (a
/// package found both inside and outside the handler: uvicorn's `send`,
/// asyncio's transport): the server's own I/O path, which a loop serving
/// one request after another runs in every request (seen under wrk: both
/// stacks in an ASGI app's `await send(...)`). Not the handler's own work.
fn in_server_code(frames: &[PyFrame], h: usize) -> bool {
    let outer: Vec<&str> = frames[h + 1..].iter().filter_map(package).collect();
    frames[..h]
        .iter()
        .filter_map(package)
        .any(|p| outer.contains(&p))
}

/// The handler frame of `b` when `a` and `b` are inside the same one, at
/// work of its own (not back in the server's code): the same function of
/// the same file, reached through the same outer frames (function, file
/// and line of each).
pub(crate) fn same_handler<'a>(a: &[PyFrame], b: &'a [PyFrame]) -> Option<&'a PyFrame> {
    let (ha, hb) = (handler(a)?, handler(b)?);
    if in_server_code(a, ha) || in_server_code(b, hb) {
        return None;
    }
    let (fa, fb) = (&a[ha], &b[hb]);
    (fa.function == fb.function && fa.file == fb.file && a[ha + 1..] == b[hb + 1..]).then_some(fb)
}

impl Correlator {
    /// A look at every worker's loop thread (its main thread): the workers
    /// whose stack is to be read now, and the ends of stalls this rule
    /// reported whose thread slept.
    pub fn spin_look(&mut self, now_ns: u64, enr: &mut dyn Enricher) -> (Vec<u32>, Vec<Output>) {
        let workers: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.role == Role::Worker)
            .map(|(&pid, _)| pid)
            .collect();
        self.spins.retain(|pid, _| workers.contains(pid));
        let mut due = Vec::new();
        let mut out = Vec::new();
        for pid in workers {
            let cpu = enr.running_thread_cpu(pid, pid);
            let run = self.spins.entry(pid).or_default();
            let look = Run::look(run, cpu, now_ns, self.threshold_ns);
            if let Some(r) = run.as_mut() {
                r.reported |= self.on_cpu.contains_key(&pid) || self.active.contains_key(&pid);
            }
            match look {
                Look::Running { sample: true } => due.push(pid),
                Look::Running { sample: false } => {}
                Look::Slept => {
                    // A stall this rule reported ends when the thread sleeps.
                    let sampled = self
                        .on_cpu
                        .get(&pid)
                        .is_some_and(|r| r.on_cpu_evidence == Some(OnCpuEvidence::StackSamples));
                    if sampled {
                        out.extend(self.end_on_cpu_sampled(pid, now_ns));
                    }
                }
            }
        }
        (due, out)
    }

    /// The stack of `pid`'s loop thread asked for at `asked_ns` arrived: a
    /// CPU stall when it and the one before are in the same handler and the
    /// thread still runs without having slept.
    pub fn spin_sampled(
        &mut self,
        pid: u32,
        asked_ns: u64,
        stack: Result<StackSample, String>,
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        let Some(Some(run)) = self.spins.get_mut(&pid) else {
            return Vec::new();
        };
        let second = stack.clone().ok();
        let Some(v) = run.sampled(asked_ns, stack) else {
            return Vec::new();
        };
        let Some(second) = second else {
            return Vec::new();
        };
        // Still running, with no sleep since the run began.
        let cpu = enr.running_thread_cpu(pid, pid);
        let run = run.clone();
        if !cpu.is_some_and(|c| c.on_cpu && c.voluntary_switches == run.switches) {
            return Vec::new();
        }
        let cpu = cpu.expect("checked above");
        if self.on_cpu.contains_key(&pid) || self.active.contains_key(&pid) {
            return Vec::new();
        }
        // Runnable without a sleep is not keeping the CPU when it hardly
        // ran: a loop starved by other work (seen under wrk on 2 cores: 20
        // ms of CPU in 750 ms, both stacks in the same ASGI app sending
        // another request's response).
        let cpu_used = cpu.cpu_ms.saturating_sub(run.cpu_ms);
        if !keeps_the_cpu(cpu_used, now_ns.saturating_sub(run.since_ns) / MS) {
            return Vec::new();
        }
        // A heartbeat since the run began: the loop ran Gunicorn's notify
        // meanwhile, so no one request has held it. A loop serving request
        // after request of one handler, never idle long enough to sleep,
        // shows that handler in both stacks too.
        let heartbeat_age_ms = enr.heartbeat_age_ms(pid);
        if heartbeat_age_ms
            .is_some_and(|age| now_ns.saturating_sub(age * MS) > run.since_ns + BEAT_SLACK_NS)
        {
            return Vec::new();
        }
        let Some(p) = self.procs.get(&pid) else {
            return Vec::new();
        };
        // Gunicorn's own classes beat about once a second even when one
        // handler's requests keep the loop from sleeping: until a beat is
        // overdue, the two stacks may be two requests. (Uvicorn's worker
        // beats every timeout/2: waiting for that would come after the
        // threshold by seconds, so there it is not waited for.)
        let class = p.worker_class.as_ref().map(|c| c.name.as_str());
        let interval = cpu::interval_ms(class, p.loop_wait, &p.beats);
        if let (Some(interval), Some(age)) = (interval, heartbeat_age_ms)
            && interval <= cpu::BUILTIN_INTERVAL_MS
            && age < interval + OVERDUE_SLACK_MS
        {
            return Vec::new();
        }
        if served_meanwhile(enr, pid, p.master, now_ns.saturating_sub(v.first_ns) / MS) {
            return Vec::new();
        }
        let p = self.procs.get(&pid).expect("checked above");
        let thread_name = enr.thread_name(pid, pid);
        let since = run.since_ns;
        let mut report = StallReport {
            pid,
            tid: pid,
            master_pid: p.master,
            role: p.role,
            comm: thread_name.clone(),
            thread_name,
            state: StallState::OnCpu,
            fd_kind: FdKind::Unknown,
            blocked_ms: now_ns.saturating_sub(since) / MS,
            heartbeat_age_ms,
            cpu_ms: Some(cpu_used),
            sleeps: Some(0),
            measured_ms: Some(now_ns.saturating_sub(since) / MS),
            on_cpu_evidence: Some(OnCpuEvidence::StackSamples),
            samples_ms: Some(vec![
                v.first_ns.saturating_sub(since) / MS,
                v.second_ns.saturating_sub(since) / MS,
            ]),
            handler: Some(v.handler),
            gunicorn_timeout_s: p.timeout_s,
            worker_class: p.worker_class.clone(),
            container: p.container.clone(),
            py_stack: Some(second.frames),
            py_stack_omitted: Some(second.omitted).filter(|n| *n > 0),
            py_threads: second.others,
            start_ns: since,
            ..Default::default()
        };
        report.cause = signatures::identify(&report);
        if let Some(Some(r)) = self.spins.get_mut(&pid) {
            r.reported = true;
        }
        let p = self.procs.get_mut(&pid).expect("checked above");
        p.stalls += 1;
        p.last_stall = Some(report.clone());
        self.on_cpu.insert(pid, report.clone());
        vec![Output::Stall {
            ts_ns: now_ns,
            report,
        }]
    }

    /// The loop thread slept: the stall this rule reported is over.
    fn end_on_cpu_sampled(&mut self, pid: u32, now_ns: u64) -> Vec<Output> {
        let Some(r) = self.on_cpu.remove(&pid) else {
            return Vec::new();
        };
        let blocked_ms = now_ns.saturating_sub(r.start_ns) / MS;
        if let Some(p) = self.procs.get_mut(&pid)
            && let Some(last) = p.last_stall.as_mut()
            && last.start_ns == r.start_ns
            && last.state == r.state
        {
            last.blocked_ms = blocked_ms;
        }
        if let Some(p) = self.procs.get_mut(&pid) {
            p.beats.restart();
        }
        vec![stall_end(&r, now_ns, blocked_ms, Outcome::Slept)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str, file: &str, line: u32) -> PyFrame {
        PyFrame {
            function: function.into(),
            file: file.into(),
            line: Some(line),
        }
    }

    const LIB: &str = "/venv/lib/python3.11/site-packages/gunicorn/workers/sync.py";

    /// A sync worker's stack inside `handler`, `inner` innermost.
    fn stack(inner: &str, line: u32, handler: &str) -> Vec<PyFrame> {
        vec![
            frame(inner, "/srv/app.py", line),
            frame(handler, "/srv/app.py", 40),
            frame("handle_request", LIB, 178),
            frame("handle", LIB, 134),
            frame("run", LIB, 125),
            frame("<module>", "/venv/bin/gunicorn", 8),
        ]
    }

    fn sample(frames: Vec<PyFrame>) -> Result<StackSample, String> {
        Ok(StackSample {
            frames,
            omitted: 0,
            others: None,
        })
    }

    fn running(switches: u64, cpu_ms: u64) -> Option<ThreadCpu> {
        Some(ThreadCpu {
            on_cpu: true,
            cpu_ms,
            voluntary_switches: switches,
        })
    }

    const T: u64 = 500 * MS;

    #[test]
    fn the_handler_is_the_outermost_application_frame_that_library_code_called() {
        let s = stack("spin", 10, "app");
        assert_eq!(handler(&s), Some(1));
        // Only the gunicorn script's own frame is the application's.
        let lib_only = vec![
            frame("run", LIB, 1),
            frame("<module>", "/venv/bin/gunicorn", 8),
        ];
        assert_eq!(handler(&lib_only), None);
    }

    #[test]
    fn the_same_handler_twice_is_a_verdict_with_both_sample_times() {
        let mut run = None;
        assert_eq!(
            Run::look(&mut run, running(7, 100), 0, T),
            Look::Running { sample: false }
        );
        assert_eq!(
            Run::look(&mut run, running(7, 300), 200 * MS, T),
            Look::Running { sample: false }
        );
        assert_eq!(
            Run::look(&mut run, running(7, 350), 250 * MS, T),
            Look::Running { sample: true }
        );
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(250 * MS, sample(stack("spin", 10, "app"))), None);
        assert_eq!(
            Run::look(&mut run, running(7, 500), 400 * MS, T),
            Look::Running { sample: false },
            "half a threshold after the first sample"
        );
        assert_eq!(
            Run::look(&mut run, running(7, 600), 500 * MS, T),
            Look::Running { sample: true }
        );
        let v = run
            .as_mut()
            .unwrap()
            .sampled(500 * MS, sample(stack("spin", 12, "app")))
            .expect("the same handler, another inner line");
        assert_eq!((v.first_ns, v.second_ns), (250 * MS, 500 * MS));
        assert_eq!(v.handler, frame("app", "/srv/app.py", 40));
    }

    #[test]
    fn changing_stacks_are_no_verdict() {
        let mut run = None;
        Run::look(&mut run, running(7, 0), 0, T);
        Run::look(&mut run, running(7, 0), 250 * MS, T);
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(250 * MS, sample(stack("spin", 10, "app"))), None);
        Run::look(&mut run, running(7, 0), 500 * MS, T);
        let r = run.as_mut().unwrap();
        // Another handler: a loop serving one request after another.
        assert_eq!(
            r.sampled(500 * MS, sample(stack("spin", 10, "other"))),
            None
        );
        // The server's own code, no handler.
        Run::look(&mut run, running(7, 0), 750 * MS, T);
        let lib_only = vec![frame("handle", LIB, 134), frame("run", LIB, 125)];
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(750 * MS, sample(lib_only)), None);
        // The same handler reached from another call site is another call.
        Run::look(&mut run, running(7, 0), 1000 * MS, T);
        let mut moved = stack("spin", 10, "app");
        moved[2].line = Some(200);
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(1000 * MS, sample(moved.clone())), None);
        Run::look(&mut run, running(7, 0), 1250 * MS, T);
        let r = run.as_mut().unwrap();
        assert!(r.sampled(1250 * MS, sample(moved)).is_some(), "now twice");
    }

    #[test]
    fn a_sleep_between_looks_restarts_the_run_and_an_asleep_thread_has_none() {
        let mut run = None;
        Run::look(&mut run, running(7, 0), 0, T);
        assert_eq!(
            Run::look(&mut run, running(8, 0), 300 * MS, T),
            Look::Slept,
            "it slept"
        );
        assert_eq!(run.as_ref().unwrap().since_ns, 300 * MS, "a new run");
        assert_eq!(Run::look(&mut run, None, 400 * MS, T), Look::Slept);
        assert!(run.is_none());
    }

    /// Seen under wrk: a saturated asyncio loop never slept, and both
    /// stacks were in the app's `await send(...)`, inside uvicorn and
    /// asyncio again: the server's path of every request, no stall. The
    /// same handler inside a library of its own (json) is its own work.
    #[test]
    fn a_handler_back_in_the_server_code_is_not_at_work_of_its_own() {
        let site = "/venv/lib/python3.11/site-packages";
        let std = "/usr/lib/python3.11";
        let asgi = |inner: Vec<PyFrame>| {
            let mut f = inner;
            f.extend([
                frame("app", "/srv/asgi_app.py", 40),
                frame(
                    "run_asgi",
                    &format!("{site}/uvicorn/protocols/http/h11_impl.py"),
                    411,
                ),
                frame("Handle._run", &format!("{std}/asyncio/events.py"), 80),
                frame("<module>", "/venv/bin/gunicorn", 8),
            ]);
            f
        };
        let sending = asgi(vec![
            frame("write", &format!("{std}/asyncio/selector_events.py"), 1057),
            frame(
                "send",
                &format!("{site}/uvicorn/protocols/http/h11_impl.py"),
                490,
            ),
        ]);
        assert_eq!(same_handler(&sending, &sending), None);
        let encoding = asgi(vec![frame(
            "encode",
            &format!("{std}/json/encoder.py"),
            200,
        )]);
        assert_eq!(
            same_handler(&encoding, &encoding).map(|f| f.function.as_str()),
            Some("app")
        );
    }

    #[test]
    fn a_runnable_thread_that_hardly_ran_does_not_keep_the_cpu() {
        assert!(keeps_the_cpu(600, 750));
        assert!(keeps_the_cpu(190, 750));
        assert!(!keeps_the_cpu(20, 750), "starved, not keeping the CPU");
    }

    #[test]
    fn an_unknown_stack_gives_no_verdict_and_stops_the_sampling() {
        let mut run = None;
        Run::look(&mut run, running(7, 0), 0, T);
        Run::look(&mut run, running(7, 0), 250 * MS, T);
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(250 * MS, Err("unreadable".into())), None);
        assert_eq!(
            Run::look(&mut run, running(7, 0), 1000 * MS, T),
            Look::Running { sample: false },
            "the heartbeat rule alone is left"
        );
        // An answer to a question not asked is ignored.
        let r = run.as_mut().unwrap();
        assert_eq!(r.sampled(5, sample(stack("spin", 1, "app"))), None);
    }
}
