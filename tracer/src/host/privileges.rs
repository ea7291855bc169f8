//! Giving root up once the kernel side is set up (issue 20 item 13).
//!
//! Root is needed to load and attach the BPF programs (and to mount
//! tracefs, bind a low port, open the output file). After that the tracer
//! reads other users' /proc files and the maps it created, so it runs on
//! as uid/gid 65534 with no groups and keeps only:
//! - CAP_SYS_PTRACE: /proc/PID/fd, fdinfo, environ, ns and root of other
//!   users' processes pass the ptrace-read check only with it, and the
//!   stack helper (restarted after the drop) needs it for
//!   process_vm_readv;
//! - CAP_DAC_READ_SEARCH: /proc/PID/fd and fdinfo are mode 0500 of their
//!   owner, and a pod's files under /proc/PID/root belong to other users;
//!   the stack helper raises it while it opens an interpreter's files;
//! - CAP_BPF, only where this kernel's bpf() refuses every command
//!   (map lookups included) to a process without it while
//!   kernel.unprivileged_bpf_disabled is set (before Linux 6.5): probed,
//!   not assumed (`map_commands_need_cap_bpf`).
//!
//! CAP_PERFMON is not kept: the programs are attached, and nothing after
//! needs perf_event_open or a kernel address. CAP_SYS_ADMIN (never in the
//! DaemonSet's set) goes with root: entering another network namespace
//! for sock_diag takes it, so a tracer run as root on a host no longer
//! sees hung requests in other namespaces (`--keep-root` keeps them).
//!
//! Credentials belong to each thread in Linux; glibc's setresuid changes
//! every thread's ids, but not their capability sets, keep-caps flag,
//! bounding set or no-new-privileges, and a thread that kept root's set
//! would be node root again. So every thread applies the same steps
//! itself, from a signal handler (raw system calls only), then the
//! calling thread; a thread started after it inherits its credentials.
use std::io;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

pub const NOBODY: u32 = 65534;
pub const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SETGID: u32 = 6;
const CAP_SETUID: u32 = 7;
pub const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
pub const CAP_BPF: u32 = 39;

/// The capabilities that read other processes' /proc files.
pub const PROC_READING: u64 = (1 << CAP_SYS_PTRACE) | (1 << CAP_DAC_READ_SEARCH);

/// Threads the drop waits for at most (the tracer has a dozen or so).
const MAX_THREADS: usize = 512;
/// How long every thread has to run its handler.
const THREADS_DEADLINE: Duration = Duration::from_secs(5);

/// A capability set of one thread, as capget gives it (64 bits each).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caps {
    pub effective: u64,
    pub permitted: u64,
    pub inheritable: u64,
}

#[repr(C)]
struct Header {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Data {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const VERSION_3: u32 = 0x2008_0522;

/// This thread's capabilities. Async-signal-safe.
pub fn get() -> io::Result<Caps> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let mut d = [Data {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget with a v3 header and room for its two data words.
    if unsafe { libc::syscall(libc::SYS_capget, &mut h as *mut Header, d.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let join = |lo: u32, hi: u32| lo as u64 | ((hi as u64) << 32);
    Ok(Caps {
        effective: join(d[0].effective, d[1].effective),
        permitted: join(d[0].permitted, d[1].permitted),
        inheritable: join(d[0].inheritable, d[1].inheritable),
    })
}

/// Sets this thread's capabilities. Async-signal-safe.
pub fn set(c: Caps) -> io::Result<()> {
    let mut h = Header {
        version: VERSION_3,
        pid: 0,
    };
    let d = [
        Data {
            effective: c.effective as u32,
            permitted: c.permitted as u32,
            inheritable: c.inheritable as u32,
        },
        Data {
            effective: (c.effective >> 32) as u32,
            permitted: (c.permitted >> 32) as u32,
            inheritable: (c.inheritable >> 32) as u32,
        },
    ];
    // SAFETY: capset with a v3 header and its two data words.
    if unsafe { libc::syscall(libc::SYS_capset, &mut h as *mut Header, d.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether this kernel refuses a bpf() map command to a process without
/// CAP_BPF (and CAP_SYS_ADMIN): before Linux 6.5 every command is refused
/// while kernel.unprivileged_bpf_disabled is set; since, only creating
/// maps and loading programs are. Asked of the kernel: a lookup on fd -1
/// with both capabilities lowered on this thread fails with EPERM in the
/// first case and EBADF in the second. Both are raised again after.
pub fn map_commands_need_cap_bpf() -> bool {
    let Ok(before) = get() else {
        return true;
    };
    let lowered = Caps {
        effective: before.effective & !((1 << CAP_BPF) | (1 << CAP_SYS_ADMIN)),
        ..before
    };
    if set(lowered).is_err() {
        return true;
    }
    // The first members of union bpf_attr for BPF_MAP_*_ELEM: map_fd,
    // then key, value, flags.
    let mut attr = [0u64; 4];
    attr[0] = u32::MAX as u64;
    // SAFETY: bpf(BPF_MAP_LOOKUP_ELEM) with an attr of the size given;
    // fd -1 makes it fail before anything is read or written.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            1, // BPF_MAP_LOOKUP_ELEM
            attr.as_mut_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    let errno = io::Error::last_os_error().raw_os_error();
    let _ = set(before);
    r != 0 && errno == Some(libc::EPERM)
}

/// What the tracer runs as after `drop_to_nobody`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Effective and permitted on every thread.
    pub kept: u64,
    /// The bounding set was cleared of the rest (needs CAP_SETPCAP, which
    /// the DaemonSet does not give; no-new-privileges is set either way,
    /// so no exec can raise a capability again).
    pub bounding_cleared: bool,
}

// The plan every thread applies, and what each did (read by the handler,
// which may use nothing but atomics and system calls).
static PLAN_KEEP: AtomicU64 = AtomicU64::new(0);
static LAST_CAP: AtomicU32 = AtomicU32::new(40);
static DONE: [AtomicU32; MAX_THREADS] = [const { AtomicU32::new(0) }; MAX_THREADS];
static DONE_N: AtomicUsize = AtomicUsize::new(0);
/// The first failure: step number * 1000 + errno (0: none).
static FAILED: AtomicI32 = AtomicI32::new(0);
static BOUNDING_FAILED: AtomicU32 = AtomicU32::new(0);

fn errno() -> i32 {
    io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Steps of the drop, in order, numbered for the error.
const STEPS: [&str; 6] = [
    "",
    "setting no-new-privileges",
    "dropping the supplementary groups",
    "setting gid 65534",
    "setting uid 65534",
    "setting the kept capabilities",
];

/// The drop on the calling thread. Raw system calls only (glibc's set*id
/// wrappers signal every thread themselves): async-signal-safe.
fn apply_here() -> Result<(), i32> {
    let keep = PLAN_KEEP.load(Ordering::SeqCst);
    // SAFETY: raw system calls with valid arguments; nothing here touches
    // memory but the capability structures on this stack.
    unsafe {
        // A thread started by one that already dropped has its creds.
        if libc::syscall(libc::SYS_geteuid) as u32 == NOBODY {
            return Ok(());
        }
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return Err(1000 + errno());
        }
        for cap in 0..=LAST_CAP.load(Ordering::SeqCst) {
            if keep & (1u64 << cap) == 0
                && libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
            {
                BOUNDING_FAILED.store(1, Ordering::SeqCst);
            }
        }
        // Keep the permitted set across the uid change; narrowed below.
        libc::prctl(libc::PR_SET_KEEPCAPS, 1, 0, 0, 0);
        if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0 {
            return Err(2000 + errno());
        }
        if libc::syscall(libc::SYS_setresgid, NOBODY, NOBODY, NOBODY) != 0 {
            return Err(3000 + errno());
        }
        if libc::syscall(libc::SYS_setresuid, NOBODY, NOBODY, NOBODY) != 0 {
            return Err(4000 + errno());
        }
        if set(Caps {
            effective: keep,
            permitted: keep,
            inheritable: 0,
        })
        .is_err()
        {
            return Err(5000 + errno());
        }
        libc::prctl(libc::PR_SET_KEEPCAPS, 0, 0, 0, 0);
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
    Ok(())
}

extern "C" fn on_signal(_: libc::c_int) {
    let saved = errno();
    if let Err(e) = apply_here() {
        let _ = FAILED.compare_exchange(0, e, Ordering::SeqCst, Ordering::SeqCst);
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
    let i = DONE_N.fetch_add(1, Ordering::SeqCst);
    if i < MAX_THREADS {
        DONE[i].store(tid, Ordering::SeqCst);
    }
    // SAFETY: restores the interrupted code's errno.
    unsafe { *libc::__errno_location() = saved };
}

fn done(tid: u32) -> bool {
    let n = DONE_N.load(Ordering::SeqCst).min(MAX_THREADS);
    DONE[..n].iter().any(|d| d.load(Ordering::SeqCst) == tid)
}

fn threads() -> io::Result<Vec<u32>> {
    Ok(std::fs::read_dir("/proc/self/task")?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect())
}

fn alive(tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/self/task/{tid}")).exists()
}

/// Whether this thread can drop to nobody: CAP_SETUID and CAP_SETGID.
pub fn can_drop() -> Result<(), String> {
    let c = get().map_err(|e| format!("its capabilities cannot be read ({e})"))?;
    let need = (1u64 << CAP_SETUID) | (1u64 << CAP_SETGID);
    if c.effective & need != need {
        return Err("it lacks CAP_SETUID or CAP_SETGID".into());
    }
    Ok(())
}

/// Every thread of the process becomes uid/gid 65534 with no groups,
/// `keep` (those of it this thread has) effective and permitted, nothing
/// inheritable or ambient, no-new-privileges, and (with CAP_SETPCAP) a
/// bounding set of `keep` alone. Call once. An error after some thread
/// changed leaves threads with different credentials: the caller must
/// then end the process.
pub fn drop_to_nobody(keep: u64) -> io::Result<Dropped> {
    let keep = keep & get()?.permitted;
    PLAN_KEEP.store(keep, Ordering::SeqCst);
    if let Ok(s) = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
        && let Ok(n) = s.trim().parse::<u32>()
    {
        LAST_CAP.store(n.min(63), Ordering::SeqCst);
    }
    let sig = libc::SIGRTMIN() + 7;
    // SAFETY: a handler that uses only atomics and system calls.
    unsafe {
        let mut act: libc::sigaction = std::mem::zeroed();
        act.sa_sigaction = on_signal as *const () as usize;
        act.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut act.sa_mask);
        if libc::sigaction(sig, &act, std::ptr::null_mut()) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    // SAFETY: getpid and gettid have no preconditions.
    let (pid, me) = unsafe { (libc::getpid(), libc::syscall(libc::SYS_gettid) as u32) };
    let mut signalled: Vec<u32> = Vec::new();
    let result = (|| {
        // Until a listing shows no thread not yet signalled (one may start
        // while the others are being signalled).
        loop {
            let new: Vec<u32> = threads()?
                .into_iter()
                .filter(|t| *t != me && !signalled.contains(t))
                .collect();
            if new.is_empty() {
                break;
            }
            for tid in new {
                if signalled.len() >= MAX_THREADS {
                    return Err(io::Error::other("too many threads"));
                }
                // SAFETY: a signal to a thread of this process.
                if unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, sig) } == 0 {
                    signalled.push(tid);
                }
            }
            let deadline = Instant::now() + THREADS_DEADLINE;
            while !signalled.iter().all(|t| done(*t) || !alive(*t)) {
                if Instant::now() > deadline {
                    return Err(io::Error::other("a thread did not run the drop in 5 s"));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        if let Err(e) = apply_here() {
            let _ = FAILED.compare_exchange(0, e, Ordering::SeqCst, Ordering::SeqCst);
        }
        match FAILED.load(Ordering::SeqCst) {
            0 => Ok(()),
            e => Err(io::Error::other(format!(
                "{}: {}",
                STEPS[(e / 1000) as usize % STEPS.len()],
                io::Error::from_raw_os_error(e % 1000)
            ))),
        }
    })();
    // SAFETY: a late copy of the signal now does nothing.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
    // Not dumpable: no other process of uid 65534 may ptrace the tracer
    // or open its /proc files (the kernel resets it on a uid change to
    // fs.suid_dumpable, which may be 1).
    // SAFETY: prctl with valid arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    result?;
    Ok(Dropped {
        kept: keep,
        bounding_cleared: BOUNDING_FAILED.load(Ordering::SeqCst) == 0,
    })
}

/// For a child about to exec (in `pre_exec`): makes `caps` (those of it
/// this thread permits) ambient, so a process that is not root passes them
/// to the program it runs (without file capabilities an exec by a non-root
/// process keeps only ambient ones). Does nothing as root, whose exec
/// keeps every capability. Async-signal-safe.
pub fn pass_to_exec(caps: u64) -> io::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return Ok(());
    }
    let c = get()?;
    let caps = caps & c.permitted;
    if caps == 0 {
        return Ok(());
    }
    set(Caps {
        inheritable: c.inheritable | caps,
        ..c
    })?;
    for cap in 0..64u32 {
        if caps & (1u64 << cap) != 0 {
            // SAFETY: prctl with valid arguments.
            let r = unsafe {
                libc::prctl(
                    libc::PR_CAP_AMBIENT,
                    libc::PR_CAP_AMBIENT_RAISE as libc::c_ulong,
                    cap as libc::c_ulong,
                    0,
                    0,
                )
            };
            if r != 0 {
                return Err(io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// Names of the capabilities in `caps`, for the note on stderr.
pub fn names(caps: u64) -> String {
    let known = [
        (CAP_DAC_READ_SEARCH, "CAP_DAC_READ_SEARCH"),
        (CAP_SYS_PTRACE, "CAP_SYS_PTRACE"),
        (CAP_BPF, "CAP_BPF"),
    ];
    let mut out: Vec<String> = Vec::new();
    for cap in 0..64u32 {
        if caps & (1u64 << cap) != 0 {
            out.push(
                known
                    .iter()
                    .find(|(c, _)| *c == cap)
                    .map_or(format!("capability {cap}"), |(_, n)| n.to_string()),
            );
        }
    }
    if out.is_empty() {
        "no capability".into()
    } else {
        out.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_say_each_kept_capability() {
        assert_eq!(names(0), "no capability");
        assert_eq!(
            names(PROC_READING | (1 << CAP_BPF)),
            "CAP_DAC_READ_SEARCH, CAP_SYS_PTRACE, CAP_BPF"
        );
        assert_eq!(names(1 << 38), "capability 38");
    }

    #[test]
    fn caps_read_back_as_set() {
        let c = get().unwrap();
        set(c).unwrap();
        assert_eq!(get().unwrap(), c);
    }
}
