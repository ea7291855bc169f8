//! Python stacks read by the tracer itself, with the `py-spy` crate as a
//! library: no program is executed.
//!
//! py-spy's defaults ptrace-seize every thread of the target (which wakes a
//! thread asleep in `read()`); here it only reads memory with
//! `process_vm_readv` (`NonBlocking`). A blocked thread's frames cannot
//! change while it is blocked, so its stack is read exactly. Setting a
//! reader up (`PythonSpy::new`: the memory map, the interpreter's symbols)
//! costs milliseconds, so it is done once per process, on the reader's own
//! threads; the session only sends requests and polls for answers.
use std::collections::HashMap;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use py_spy::config::{Config, LineNo, LockingStrategy};
use py_spy::{PythonSpy, StackTrace};

use crate::model::{PyFrame, PyThread};

/// Frames kept per thread, innermost first (the outer rest is counted).
pub const MAX_FRAMES: usize = 64;
/// Other threads kept with --py-stack all-threads.
pub const MAX_THREADS: usize = 32;
/// Threads reading stacks: a slow set-up delays at most one of them.
const READERS: usize = 2;
/// Longest error text kept from py-spy (its messages name addresses and
/// files; a hostile target can make them long).
const MAX_ERROR: usize = 300;

/// The stalled thread's stack, and the others' when asked.
#[derive(Debug, Clone, PartialEq)]
pub struct Captured {
    pub frames: Vec<PyFrame>,
    pub omitted: u64,
    /// With all threads: every other Python thread (at most MAX_THREADS).
    pub others: Option<Vec<PyThread>>,
}

enum Job {
    /// Set the reader of a process up ahead of its first stall.
    Open(u32),
    Capture {
        pid: u32,
        tid: u32,
        all: bool,
        deadline: Instant,
        reply: Sender<Result<Captured, String>>,
    },
}

/// A process's reader; None until set up (or after set-up failed: it is
/// tried again at a capture).
type Slot = Arc<Mutex<Option<PythonSpy>>>;

/// Reads Python stacks on `READERS` threads of its own.
pub struct StackReader {
    jobs: Sender<Job>,
    spies: Arc<Mutex<HashMap<u32, Slot>>>,
}

/// py-spy's settings: memory reads only, no native frames, and nothing
/// that stats or opens a path the target names (its code's file names are
/// reported as they are, never looked up).
fn config() -> Config {
    Config {
        blocking: LockingStrategy::NonBlocking,
        native: false,
        include_idle: true,
        collect_thread_names: false,
        full_filenames: true,
        dump_locals: 0,
        lineno: LineNo::LastInstruction,
        ..Config::default()
    }
}

fn bounded_error(what: &str, e: &anyhow::Error) -> String {
    let mut s = format!("{what}: {e:#}");
    if s.len() > MAX_ERROR {
        let mut end = MAX_ERROR;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push_str("...");
    }
    s
}

fn open(pid: u32) -> Result<PythonSpy, String> {
    PythonSpy::new(pid as py_spy::Pid, &config()).map_err(|e| {
        bounded_error(
            &format!("cannot read the Python interpreter of process {pid}"),
            &e,
        )
    })
}

impl StackReader {
    pub fn start() -> std::io::Result<StackReader> {
        let (jobs, rx) = channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let spies: Arc<Mutex<HashMap<u32, Slot>>> = Default::default();
        for i in 0..READERS {
            let rx = rx.clone();
            let spies = spies.clone();
            std::thread::Builder::new()
                .name(format!("pystack-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => rx.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => run(job, &spies),
                            Err(_) => return,
                        }
                    }
                })?;
        }
        Ok(StackReader { jobs, spies })
    }

    /// Sets `pid`'s reader up now, off the session's thread.
    pub fn open(&self, pid: u32) {
        let _ = self.jobs.send(Job::Open(pid));
    }

    /// Drops `pid`'s reader (the process ended; its pid may come back).
    pub fn forget(&self, pid: u32) {
        if let Ok(mut m) = self.spies.lock() {
            m.remove(&pid);
        }
    }

    /// Asks for thread `tid`'s stack; the answer arrives on the receiver.
    /// The caller gives up at `deadline`; a capture not started by then is
    /// not started.
    pub fn capture(
        &self,
        pid: u32,
        tid: u32,
        all: bool,
        deadline: Instant,
    ) -> Receiver<Result<Captured, String>> {
        let (reply, rx) = channel();
        let _ = self.jobs.send(Job::Capture {
            pid,
            tid,
            all,
            deadline,
            reply,
        });
        rx
    }
}

fn slot(spies: &Mutex<HashMap<u32, Slot>>, pid: u32) -> Option<Slot> {
    let mut m = spies.lock().ok()?;
    Some(m.entry(pid).or_default().clone())
}

fn run(job: Job, spies: &Mutex<HashMap<u32, Slot>>) {
    match job {
        Job::Open(pid) => {
            let Some(slot) = slot(spies, pid) else { return };
            // Busy: a capture is setting it up already.
            let Ok(mut s) = slot.try_lock() else { return };
            if s.is_none() {
                *s = open(pid).ok();
            }
        }
        Job::Capture {
            pid,
            tid,
            all,
            deadline,
            reply,
        } => {
            let r = if Instant::now() >= deadline {
                Err(format!(
                    "the Python stack was not read: the stack reader was busy past the {}ms deadline",
                    CAPTURE_DEADLINE.as_millis()
                ))
            } else {
                capture(spies, pid, tid, all)
            };
            let _ = reply.send(r);
        }
    }
}

/// How long the session waits for a stack before reporting without it.
pub const CAPTURE_DEADLINE: Duration = Duration::from_secs(2);

fn capture(
    spies: &Mutex<HashMap<u32, Slot>>,
    pid: u32,
    tid: u32,
    all: bool,
) -> Result<Captured, String> {
    let slot = slot(spies, pid).ok_or("the stack reader's state is lost")?;
    // One read of a process at a time: a second waits for none.
    let mut s = slot.try_lock().map_err(|_| {
        format!("the Python stack was not read: a read of process {pid} was still running")
    })?;
    if s.is_none() {
        *s = Some(open(pid)?);
    }
    let spy = s.as_mut().expect("set above");
    let traces = match spy.get_stack_traces() {
        Ok(t) => t,
        Err(e) => {
            // The layout may have changed (an exec): set up anew next time.
            *s = None;
            return Err(bounded_error(
                &format!("reading the Python stacks of process {pid} failed"),
                &e,
            ));
        }
    };
    let tids = os_tids(spy, &traces);
    pick(pid, tid, all, &traces, &tids)
}

/// Each trace's OS thread id. Python 3.11+ records it; 3.9 and 3.10 keep
/// only the pthread handle (the Python thread id), so the tid is read from
/// glibc's `struct pthread` there (x86_64 only), and kept only when it is
/// one of the process's threads and no other Python thread claims it.
fn os_tids(spy: &PythonSpy, traces: &[StackTrace]) -> Vec<Option<u32>> {
    let tasks: Vec<u32> = match spy.process.threads() {
        Ok(ts) => ts
            .iter()
            .filter_map(|t| t.id().ok())
            .map(|t| t as u32)
            .collect(),
        Err(_) => Vec::new(),
    };
    let read = |handle: u64| pthread_tid(spy, handle);
    map_tids(traces, &tasks, read)
}

#[cfg(all(target_arch = "x86_64", target_env = "gnu"))]
fn pthread_tid(spy: &PythonSpy, handle: u64) -> Option<u32> {
    use remoteprocess::ProcessMemory;
    /// Offset of `tid` in glibc's `struct pthread` on x86_64.
    const PTHREAD_TID: u64 = 0x2d0;
    let tid: i32 = spy
        .process
        .copy_struct(handle.checked_add(PTHREAD_TID)? as usize)
        .ok()?;
    u32::try_from(tid).ok()
}

#[cfg(not(all(target_arch = "x86_64", target_env = "gnu")))]
fn pthread_tid(_: &PythonSpy, _: u64) -> Option<u32> {
    None
}

/// The OS thread id of each trace: the recorded one, else `read` from its
/// Python thread id, kept only if it is in `tasks` and unique.
fn map_tids(
    traces: &[StackTrace],
    tasks: &[u32],
    read: impl Fn(u64) -> Option<u32>,
) -> Vec<Option<u32>> {
    let found: Vec<Option<u32>> = traces
        .iter()
        .map(|t| match t.os_thread_id {
            Some(id) => u32::try_from(id).ok(),
            None => read(t.thread_id).filter(|tid| tasks.contains(tid)),
        })
        .collect();
    found
        .iter()
        .map(|t| t.filter(|t| found.iter().filter(|o| **o == Some(*t)).count() == 1))
        .collect()
}

fn frames_of(t: &StackTrace) -> (Vec<PyFrame>, u64) {
    let frames: Vec<PyFrame> = t
        .frames
        .iter()
        .take(MAX_FRAMES)
        .map(|f| PyFrame {
            function: f.name.clone(),
            file: f.filename.clone(),
            line: u32::try_from(f.line).ok().filter(|l| *l > 0),
        })
        .collect();
    (frames, t.frames.len().saturating_sub(MAX_FRAMES) as u64)
}

/// The stack of OS thread `tid` among `traces` (`tids[i]` is trace i's
/// OS thread), and the others' with `all`.
fn pick(
    pid: u32,
    tid: u32,
    all: bool,
    traces: &[StackTrace],
    tids: &[Option<u32>],
) -> Result<Captured, String> {
    let Some(i) = tids.iter().position(|t| *t == Some(tid)) else {
        let unknown = tids.iter().filter(|t| t.is_none()).count();
        return Err(if unknown > 0 {
            format!(
                "thread {tid}'s Python stack is not known: {unknown} of the {} Python threads of process {pid} have no known OS thread id (Python before 3.11 does not record it, and it could not be read from the thread's pthread)",
                traces.len()
            )
        } else {
            format!(
                "thread {tid} runs no Python code: it is not one of the {} Python threads of process {pid}",
                traces.len()
            )
        });
    };
    let (frames, omitted) = frames_of(&traces[i]);
    let others = all.then(|| {
        traces
            .iter()
            .zip(tids)
            .enumerate()
            .filter(|(j, _)| *j != i)
            .take(MAX_THREADS)
            .map(|(_, (t, tid))| {
                let (frames, omitted) = frames_of(t);
                PyThread {
                    tid: *tid,
                    frames,
                    omitted,
                }
            })
            .collect()
    });
    Ok(Captured {
        frames,
        omitted,
        others,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn trace(thread_id: u64, os: Option<u64>, depth: usize) -> StackTrace {
        StackTrace {
            pid: 1,
            thread_id,
            thread_name: None,
            os_thread_id: os,
            active: true,
            owns_gil: false,
            frames: (0..depth)
                .map(|i| py_spy::Frame {
                    name: format!("f{i}"),
                    filename: "/srv/app.py".into(),
                    module: None,
                    short_filename: None,
                    line: i as i32,
                    locals: None,
                    is_entry: false,
                    is_shim_entry: false,
                })
                .collect(),
            process_info: None,
        }
    }

    #[test]
    fn the_stalled_thread_is_picked_by_os_thread_id_and_bounded() {
        let traces = [trace(7, Some(100), 3), trace(8, Some(101), 200)];
        let tids = map_tids(&traces, &[], |_| None);
        let c = pick(100, 101, false, &traces, &tids).unwrap();
        assert_eq!(c.frames.len(), MAX_FRAMES);
        assert_eq!(c.omitted, 200 - MAX_FRAMES as u64);
        assert_eq!(c.frames[0].function, "f0", "innermost first");
        assert_eq!(c.frames[0].line, None, "line 0 is unknown");
        assert_eq!(c.frames[1].line, Some(1));
        assert_eq!(c.others, None);
        let c = pick(100, 100, true, &traces, &tids).unwrap();
        assert_eq!(c.frames.len(), 3);
        let others = c.others.unwrap();
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].tid, Some(101));
    }

    #[test]
    fn all_threads_are_capped() {
        let traces: Vec<_> = (0..100).map(|i| trace(i, Some(1000 + i), 1)).collect();
        let tids = map_tids(&traces, &[], |_| None);
        let c = pick(1000, 1000, true, &traces, &tids).unwrap();
        assert_eq!(c.others.unwrap().len(), MAX_THREADS);
    }

    #[test]
    fn a_thread_without_python_is_said_so_and_an_unmapped_one_is_unknown() {
        let traces = [trace(7, Some(100), 3)];
        let tids = map_tids(&traces, &[], |_| None);
        let e = pick(100, 102, false, &traces, &tids).unwrap_err();
        assert!(e.contains("thread 102 runs no Python code"), "{e}");
        // 3.10: no recorded id, and its pthread gave none.
        let traces = [trace(7, None, 3)];
        let tids = map_tids(&traces, &[100], |_| None);
        let e = pick(100, 100, false, &traces, &tids).unwrap_err();
        assert!(e.contains("not known"), "{e}");
        assert!(!e.contains("runs no Python code"), "{e}");
    }

    #[test]
    fn before_3_11_the_tid_read_from_the_pthread_is_kept_only_if_it_is_a_unique_thread_of_the_process()
     {
        let traces = [trace(0x7f00, None, 1), trace(0x7f10, None, 1)];
        let read = |h: u64| Some(if h == 0x7f00 { 100 } else { 101 });
        assert_eq!(
            map_tids(&traces, &[100, 101], read),
            vec![Some(100), Some(101)]
        );
        // 101 is not a thread of the process: not trusted.
        assert_eq!(map_tids(&traces, &[100], read), vec![Some(100), None]);
        // Both claim 100: neither is trusted.
        assert_eq!(map_tids(&traces, &[100], |_| Some(100)), vec![None, None]);
    }

    #[test]
    fn long_errors_are_cut() {
        let e = anyhow::anyhow!("x".repeat(5000));
        let s = bounded_error("reading failed", &e);
        assert!(s.len() <= MAX_ERROR + 3, "{}", s.len());
        assert!(s.starts_with("reading failed: x"));
    }

    /// Real interpreters (not the tracer): each Python thread's stack is
    /// found under the OS thread id it reports itself, on every CPython
    /// given in PYSTACK_PYTHONS (default: /usr/bin/python3), and prints
    /// what set-up and a capture cost. Run with `--ignored --nocapture`.
    #[test]
    #[ignore]
    fn real_pythons_map_every_thread_to_its_os_thread_id() {
        use std::io::{BufRead, BufReader};
        let pythons = std::env::var("PYSTACK_PYTHONS").unwrap_or("/usr/bin/python3".into());
        let script = "import os, sys, threading\n\
            def block(r):\n    os.read(r, 1)\n\
            pipes = [os.pipe() for _ in range(3)]\n\
            for r, w in pipes[1:]:\n    threading.Thread(target=block, args=(r,), daemon=True).start()\n\
            import time; time.sleep(0.2)\n\
            print(sys.version.split()[0], *[t.native_id for t in threading.enumerate()], flush=True)\n\
            block(pipes[0][0])\n";
        for py in pythons.split(',') {
            let mut child = std::process::Command::new(py)
                .args(["-c", script])
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut line = String::new();
            BufReader::new(child.stdout.take().unwrap())
                .read_line(&mut line)
                .unwrap();
            let mut words = line.split_whitespace();
            let version = words.next().unwrap().to_string();
            let mut native: Vec<u32> = words.map(|w| w.parse().unwrap()).collect();
            native.sort();
            let pid = child.id();
            let t0 = Instant::now();
            let mut spy = open(pid).unwrap();
            let setup = t0.elapsed();
            let mut times = Vec::new();
            let mut tids = Vec::new();
            let mut traces = Vec::new();
            for _ in 0..20 {
                let t0 = Instant::now();
                traces = spy.get_stack_traces().unwrap();
                tids = os_tids(&spy, &traces);
                times.push(t0.elapsed());
            }
            times.sort();
            let _ = child.kill();
            let _ = child.wait();
            let mut got: Vec<u32> = tids.iter().map(|t| t.unwrap()).collect();
            got.sort();
            assert_eq!(got, native, "python {version}");
            for (t, tid) in traces.iter().zip(&tids) {
                let c = pick(pid, tid.unwrap(), false, &traces, &tids).unwrap();
                assert_eq!(c.frames[0].function, "block", "python {version}: {t:?}");
            }
            println!(
                "python {version}: set-up {setup:?}, capture of {} threads median {:?} max {:?}",
                traces.len(),
                times[times.len() / 2],
                times[times.len() - 1]
            );
        }
    }
}
