//! The stack helper: a process of its own that the tracer starts (its own
//! binary, re-executed with a hidden first argument) and owns, which reads
//! Python stacks with the `py-spy` crate as a library and answers over its
//! stdin and stdout (see pystack_proto).
//!
//! The target controls its memory and its files, and py-spy follows the
//! library path the target's memory map names through /proc/PID/root. So
//! the helper keeps nothing it does not need: it runs as uid and gid 65534
//! with no groups and no new privileges, cannot use more than 256 MiB of
//! address space, start a process, or open more than a few files, and
//! reads with CAP_SYS_PTRACE alone (process_vm_readv and /proc/PID/maps
//! of other users' processes need PTRACE_MODE_ATTACH). Its every open is
//! made by its opener thread (see sandbox): /proc files, and regular
//! files beneath the target's root reached with no symbolic link, checked
//! and opened as one descriptor; the opener alone also has
//! CAP_DAC_READ_SEARCH (see there). A deleted mapping's name is never
//! opened. The tracer kills and replaces a helper that takes too long.
//!
//! py-spy 0.4.3 opens, on Linux: /proc/PID/maps, /proc/PID/exe (the
//! kernel's link to the executable it runs, not a path the target names),
//! /proc/PID/task, the `libpython*.so` path of the map under
//! /proc/PID/root (through the opener), and reads the links
//! /proc/{self,PID}/ns/mnt. With `full_filenames` it opens nothing for the
//! code's file names.
use std::collections::HashMap;
use std::io::{BufReader, BufWriter};
use std::process::ExitCode;

use py_spy::config::{Config, LineNo, LockingStrategy};
use py_spy::{PythonSpy, StackTrace};

use super::pystack::{Captured, MAX_FRAMES, MAX_THREADS};
use super::pystack_proto::{self as proto, Reply, Request};
use super::rootfs::{self, NotRegular, Resolve};
use super::sandbox::{self, Setup};
use crate::model::{PyFrame, PyThread};

/// The first argument that makes the tracer's binary the helper.
pub const HELPER_ARG: &str = "__pystack-helper";
/// uid and gid of the helper: nobody.
const NOBODY: u32 = 65534;
const CAP_SYS_PTRACE: u32 = 19;
/// The opener's (and, without an opener, raised only while a reader is
/// set up): a Python installed under a directory only root may enter
/// (pyenv under /root, as on this project's test machine) cannot be read
/// by uid 65534 otherwise. It allows reading and searching, never
/// writing; stacks are read without it.
const CAP_DAC_READ_SEARCH: u32 = 2;
const KEPT: u32 = (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);
/// Address space the helper may map (py-spy maps the interpreter's ELF
/// files and copies the frames it reads).
pub const HELPER_AS: u64 = 256 << 20;
/// Files the helper may hold open at once (py-spy needs a handful).
const HELPER_NOFILE: u64 = 64;
/// Processes whose reader is kept; past it they are all dropped (each is
/// set up again at its next capture).
const MAX_SPIES: usize = 1024;
/// Longest error text kept from py-spy (its messages name addresses and
/// files; a hostile target can make them long).
const MAX_ERROR: usize = 300;
/// Longest part of a target's path quoted in an error.
const MAX_QUOTED_PATH: usize = 120;
/// Longest /proc/PID/maps read for the library check (65,530 mappings,
/// the kernel's default cap, at about 100 bytes each).
const MAX_MAPS: u64 = 8 << 20;

/// Drops every privilege but CAP_SYS_PTRACE, sets the limits and the
/// sandbox. Says how set-ups are confined, and what could not be done, if
/// anything (for the tracer's stderr): a tracer without CAP_SETUID (the
/// DaemonSet's capability set) cannot make its helper another user.
fn drop_privileges() -> (Setup, Vec<String>) {
    let mut notes = Vec::new();
    // SAFETY: prctl, setgroups, setres[ug]id, setrlimit and capset with
    // valid arguments; nothing here touches Rust-owned memory.
    unsafe {
        // Dies with the tracer, never left behind holding the capability.
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
        // No fd of the tracer's but the pipes (std sets CLOEXEC on its
        // own, but not every library may).
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        // The bounding set: no capability can come back (needs
        // CAP_SETPCAP; without it no-new-privileges below does the same).
        for cap in 0..64 {
            if cap != CAP_SYS_PTRACE && cap != CAP_DAC_READ_SEARCH {
                libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0);
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
        if libc::getgroups(0, std::ptr::null_mut()) != 0
            && libc::setgroups(0, std::ptr::null()) != 0
        {
            notes.push(format!(
                "keeps its groups ({})",
                std::io::Error::last_os_error()
            ));
        }
        if libc::getgid() != NOBODY && libc::setresgid(NOBODY, NOBODY, NOBODY) != 0 {
            notes.push(format!(
                "keeps gid {} ({})",
                libc::getgid(),
                std::io::Error::last_os_error()
            ));
        }
        // Keep the permitted set across the uid change, then narrow it.
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::getuid() != NOBODY && libc::setresuid(NOBODY, NOBODY, NOBODY) != 0 {
            notes.push(format!(
                "keeps uid {} ({})",
                libc::getuid(),
                std::io::Error::last_os_error()
            ));
        }
        if !capset(1 << CAP_SYS_PTRACE, KEPT) && !capset(1 << CAP_SYS_PTRACE, 1 << CAP_SYS_PTRACE) {
            notes.push(format!(
                "has no CAP_SYS_PTRACE ({}): it reads only its own user's processes",
                std::io::Error::last_os_error()
            ));
            capset(0, 0);
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0);
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
        let limit = |what, n: u64| {
            let l = libc::rlimit {
                rlim_cur: n,
                rlim_max: n,
            };
            libc::setrlimit(what, &l)
        };
        limit(libc::RLIMIT_AS, HELPER_AS);
        limit(libc::RLIMIT_NOFILE, HELPER_NOFILE);
        limit(libc::RLIMIT_CORE, 0);
    }
    let setup = if !sandbox::forbid_processes() {
        // No thread then either, so no opener.
        // SAFETY: setrlimit with a valid limit.
        unsafe {
            let none = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_NPROC, &none);
        }
        notes.push(
            "has no system-call filter here: a library path the target swaps right after its check is opened".into(),
        );
        Setup::Checked
    } else {
        match sandbox::trap_opens(opener_caps, opener_stopped) {
            Ok(()) => {
                // The reading thread never needs it again: the opener
                // alone keeps it.
                capset(1 << CAP_SYS_PTRACE, 1 << CAP_SYS_PTRACE);
                Setup::Trapped
            }
            Err(e) => {
                notes.push(format!(
                    "{e}: a library path the target swaps right after its check is opened"
                ));
                Setup::Checked
            }
        }
    };
    (setup, notes)
}

/// Sets the effective and permitted sets (the low 32 capabilities), the
/// inheritable one to nothing.
fn capset(effective: u32, permitted: u32) -> bool {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const VERSION_3: u32 = 0x2008_0522;
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective,
            permitted,
            inheritable: 0,
        },
        Data {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header and its two data words.
    unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) == 0 }
}

/// The helper's main: answers requests until its stdin closes.
pub fn main() -> ExitCode {
    let (setup, notes) = drop_privileges();
    for n in notes {
        eprintln!("tracer: note: the Python stack helper {n}");
    }
    let mut input = BufReader::new(std::io::stdin().lock());
    let mut output = BufWriter::new(std::io::stdout().lock());
    let mut spies: HashMap<u32, PythonSpy> = HashMap::new();
    loop {
        let Ok(frame) = proto::read_frame(&mut input, proto::MAX_REQUEST) else {
            return ExitCode::SUCCESS;
        };
        let Ok(request) = serde_json::from_slice::<Request>(&frame) else {
            return ExitCode::FAILURE;
        };
        let reply = match request {
            Request::Open { pid } => {
                if !spies.contains_key(&pid)
                    && let Ok(spy) = open(pid, setup)
                {
                    keep(&mut spies, pid, spy);
                }
                Reply::Done
            }
            Request::Forget { pid } => {
                spies.remove(&pid);
                Reply::Done
            }
            Request::Capture { pid, tid, all } => {
                proto::to_reply(capture(&mut spies, pid, tid, all, setup))
            }
        };
        let Ok(bytes) = serde_json::to_vec(&reply) else {
            return ExitCode::FAILURE;
        };
        if proto::write_frame(&mut output, &bytes).is_err() {
            return ExitCode::SUCCESS;
        }
    }
}

fn keep(spies: &mut HashMap<u32, PythonSpy>, pid: u32, spy: PythonSpy) {
    if spies.len() >= MAX_SPIES {
        spies.clear();
    }
    spies.insert(pid, spy);
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
    proto::cut(format!("{what}: {e:#}"), MAX_ERROR)
}

fn quoted(path: &str) -> String {
    format!("{:?}", proto::cut(path.to_string(), MAX_QUOTED_PATH))
}

/// The file names of the maps py-spy would take for a Python library
/// (its `is_python_lib` on Linux: "/libpython" then a version, anywhere
/// in the name; here any name with "/libpython" in it, so none is missed).
fn library_paths(maps: &str) -> Vec<String> {
    let mut paths: Vec<String> = Vec::new();
    for line in maps.lines() {
        // start-end perms offset dev inode, then the name (which may hold
        // spaces; " (deleted)" is appended by the kernel).
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start();
            rest = rest.find(' ').map_or("", |i| &rest[i..]);
        }
        let name = rest.trim_start();
        if name.contains("/libpython") && !paths.iter().any(|p| p == name) {
            paths.push(name.to_string());
        }
    }
    paths
}

/// A deleted mapping's name is refused: the path no longer holds the
/// mapped file, so whatever is there now was put there after.
fn refuse_deleted(pid: u32, name: &str) -> Result<(), String> {
    if name.ends_with(" (deleted)") {
        return Err(format!(
            "the Python library of process {pid} was deleted: its memory map names {}, a path that no longer holds the mapped file, so it is not opened",
            quoted(name)
        ));
    }
    Ok(())
}

/// Without the opener (see sandbox), whether `name`, a library path from
/// the target's map, may be opened by py-spy as "/proc/PID/root" +
/// `name`: a regular file, reached with no symbolic link inside the
/// target's root, and not a deleted mapping's name. O_PATH opens run no
/// driver, so neither a FIFO nor a device is opened by the check; a swap
/// right after it is not caught (the opener closes that gap).
fn check_library(pid: u32, name: &str) -> Result<(), String> {
    refuse_deleted(pid, name)?;
    let refused = |why: String| {
        format!(
            "the Python library {} of process {pid} is not opened: {why}",
            quoted(name)
        )
    };
    let opath =
        rootfs::resolve_in_root(&pid.to_string(), name, Resolve::NoSymlinks).map_err(|e| {
            refused(if e.raw_os_error() == Some(libc::ELOOP) {
                "a symbolic link is in its path".to_string()
            } else {
                e.to_string()
            })
        })?;
    rootfs::reopen_regular(&opath).map_err(|e| {
        refused(match e {
            NotRegular::NotAFile => "it is not a regular file".into(),
            NotRegular::Pseudo => "it is a file of a kernel filesystem".into(),
            NotRegular::Failed(why) => why,
        })
    })?;
    Ok(())
}

/// The opener's capabilities (see sandbox): it makes every open of the
/// reading thread, the interpreter's files among them.
fn opener_caps() {
    capset(KEPT, KEPT);
}

/// Without its opener the reading thread can open nothing: the helper
/// exits, and the tracer starts a new one.
fn opener_stopped() {
    std::process::exit(3);
}

/// `f` with CAP_DAC_READ_SEARCH effective (when it is permitted), then
/// without it again. Capabilities are per thread: a confined set-up
/// raises it on its own thread only.
fn reading_files<T>(f: impl FnOnce() -> T) -> T {
    let raised = capset(KEPT, KEPT);
    let r = f();
    if raised {
        capset(1 << CAP_SYS_PTRACE, KEPT);
    }
    r
}

/// Sets up the reader of process `pid`. With the opener (`Trapped`),
/// py-spy's opens are checked as they are made; without it, each library
/// path is checked first, then py-spy opens it with CAP_DAC_READ_SEARCH
/// raised.
fn open(pid: u32, setup: Setup) -> Result<PythonSpy, String> {
    let maps = super::proc::read_capped(format!("/proc/{pid}/maps").as_ref(), MAX_MAPS)
        .ok_or_else(|| format!("the memory map of process {pid} cannot be read"))?;
    for name in library_paths(&String::from_utf8_lossy(&maps)) {
        match setup {
            Setup::Trapped => refuse_deleted(pid, &name)?,
            Setup::Checked => reading_files(|| check_library(pid, &name))?,
        }
    }
    let new = || PythonSpy::new(pid as py_spy::Pid, &config());
    let spy = match setup {
        Setup::Trapped => new(),
        Setup::Checked => reading_files(new),
    };
    spy.map_err(|e| {
        bounded_error(
            &format!("cannot read the Python interpreter of process {pid}"),
            &e,
        )
    })
}

fn capture(
    spies: &mut HashMap<u32, PythonSpy>,
    pid: u32,
    tid: u32,
    all: bool,
    setup: Setup,
) -> Result<Captured, String> {
    if !spies.contains_key(&pid) {
        let spy = open(pid, setup)?;
        keep(spies, pid, spy);
    }
    let spy = spies.get_mut(&pid).expect("kept above");
    let traces = match spy.get_stack_traces() {
        Ok(t) => t,
        Err(e) => {
            // The layout may have changed (an exec): set up anew next time.
            spies.remove(&pid);
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
    // The task list (an open of /proc/PID/task, through the opener) only
    // when some thread has no recorded id: never on 3.11+.
    let tasks: Vec<u32> = match traces.iter().any(|t| t.os_thread_id.is_none()) {
        true => spy.process.threads().map_or(Vec::new(), |ts| {
            ts.iter()
                .filter_map(|t| t.id().ok())
                .map(|t| t as u32)
                .collect()
        }),
        false => Vec::new(),
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
    use std::time::{Duration, Instant};

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
    fn every_libpython_map_name_is_found_with_its_spaces() {
        let maps = "00400000-00401000 r-xp 00000000 08:01 12 /usr/bin/python3.11\n\
            7f00-7f01 r-xp 00000000 08:01 13                         /tmp/x/libpython3.11.so (deleted)\n\
            7f01-7f02 r--p 00001000 08:01 13                         /tmp/x/libpython3.11.so (deleted)\n\
            7f02-7f03 r-xp 00000000 08:01 14 /usr/lib/libpython3.9.so.1.0\n\
            7f03-7f04 rw-p 00000000 00:00 0 \n";
        assert_eq!(
            library_paths(maps),
            vec![
                "/tmp/x/libpython3.11.so (deleted)".to_string(),
                "/usr/lib/libpython3.9.so.1.0".to_string()
            ]
        );
    }

    /// Real files, read through this process's own /proc/PID/root: a
    /// regular file passes; a symlink (to a host file or a FIFO), a FIFO
    /// itself and a deleted mapping's name do not, and nothing blocks.
    #[test]
    fn a_library_path_is_opened_only_when_it_is_a_regular_file_with_no_symlink() {
        let d = std::env::temp_dir().join(format!("pystack-check-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        let me = std::process::id();
        let lib = d.join("libpython3.11.so");
        std::fs::write(&lib, b"\x7fELF").unwrap();
        assert_eq!(check_library(me, lib.to_str().unwrap()), Ok(()));
        let fifo = d.join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let e = check_library(me, fifo.to_str().unwrap()).unwrap_err();
        assert!(e.contains("not a regular file"), "{e}");
        let link = d.join("libpython3.12.so");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        let e = check_library(me, link.to_str().unwrap()).unwrap_err();
        assert!(e.contains("symbolic link"), "{e}");
        let e = check_library(me, &format!("{} (deleted)", lib.display())).unwrap_err();
        assert!(e.contains("was deleted"), "{e}");
        let long = format!("/{} (deleted)", "a".repeat(5000));
        assert!(check_library(me, &long).unwrap_err().len() < MAX_ERROR);
        let _ = std::fs::remove_dir_all(&d);
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
            let mut spy = open(pid, Setup::Checked).unwrap();
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
            // The same capture through the helper process, when the
            // tracer's binary is given (PYSTACK_HELPER_BIN).
            let helper = std::env::var("PYSTACK_HELPER_BIN").ok().map(|bin| {
                let r = super::super::pystack::StackReader::start_program(bin.into()).unwrap();
                let mut t = Vec::new();
                for _ in 0..21 {
                    let t0 = Instant::now();
                    let rx = r.capture(pid, native[0], false, t0 + Duration::from_secs(2));
                    rx.recv().unwrap().unwrap();
                    t.push(t0.elapsed());
                    std::thread::sleep(Duration::from_millis(250));
                }
                // The first sets the reader up.
                let setup = t.remove(0);
                t.sort();
                (setup, t[t.len() / 2], t[t.len() - 1])
            });
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
            if let Some((setup, median, max)) = helper {
                println!(
                    "python {version}: via the helper: first (with set-up) {setup:?}, capture median {median:?} max {max:?}"
                );
            }
        }
    }
}
