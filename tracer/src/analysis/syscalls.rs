//! Syscall numbers, names, and which syscalls count as "waiting for work".
use std::borrow::Cow;

use syscalls::Sysno;

use crate::model::{Role, SyscallClass};

/// The host architecture's name for a syscall number; unknown numbers print
/// as `syscall_N`.
pub fn name(nr: i64) -> Cow<'static, str> {
    match usize::try_from(nr).ok().and_then(Sysno::new) {
        Some(sysno) => Cow::Borrowed(sysno.name()),
        None => Cow::Owned(format!("syscall_{nr}")),
    }
}

/// The host architecture's number for a syscall name, if it has one there.
pub fn number(name: &str) -> Option<i64> {
    name.parse::<Sysno>()
        .ok()
        .map(|sysno| i64::from(sysno.id()))
}

/// Multiplexers and signal waits: a thread in one of these is idle, whatever
/// its role. The kernel never reports them (they are class WAIT there).
pub const ALWAYS_WAIT: &[&str] = &[
    "epoll_wait",
    "epoll_pwait",
    "epoll_pwait2",
    "poll",
    "ppoll",
    "select",
    "pselect6",
    "pause",
    "rt_sigsuspend",
    "rt_sigtimedwait",
    "io_getevents",
    "io_pgetevents",
    "io_uring_enter",
];

/// Waits that are idle for an ordinary thread but block everything when the
/// thread is a Gunicorn worker's event loop: an unpatched `time.sleep`, a
/// lock held by another thread, a blocking `waitpid` or `accept`. The futex2
/// calls (Linux 5.16 and 6.7) split `futex`'s operations, so they are classed
/// like it.
pub const IDLE_UNLESS_EVENT_LOOP: &[&str] = &[
    "futex",
    "futex_waitv",
    "futex_wait",
    "futex_wake",
    "futex_requeue",
    "nanosleep",
    "clock_nanosleep",
    "wait4",
    "waitid",
    "accept",
    "accept4",
];

/// Multiplexers by how their arguments name the fds they wait on.
pub const EPOLL_WAITS: &[&str] = &["epoll_wait", "epoll_pwait", "epoll_pwait2"];
pub const SELECTS: &[&str] = &["select", "pselect6"];
pub const POLLS: &[&str] = &["poll", "ppoll"];

/// Reads the kernel watches for a blocked pipe or socket read (class READ).
const READS: &[&str] = &[
    "read", "readv", "pread64", "recvfrom", "recvmsg", "recvmmsg",
];

/// Whether a syscall blocked past the threshold is a stall for this thread.
///
/// A worker's main thread runs its event loop (gevent's hub, asyncio's
/// loop, gthread's poller, the sync worker's request loop): anything but
/// the loop's own wait stops heartbeats and every request. `loop_wait`
/// says, for a multiplexer, whether it is that wait (None while the loop
/// is not known: then every multiplexer counts as the loop's, as the kernel
/// does). Any other thread of a worker, like any thread of another process,
/// is judged by what it waits in: idle in multiplexers, sleeps, futexes and
/// child waits, stalled in anything else (a read, a recv, a lock, a
/// connect). The master only has timed waits when healthy.
pub fn is_stall(role: Role, main_thread: bool, nr: i64, loop_wait: Option<bool>) -> bool {
    let n = name(nr);
    let multiplexer = ALWAYS_WAIT.contains(&n.as_ref());
    let idle = multiplexer || IDLE_UNLESS_EVENT_LOOP.contains(&n.as_ref());
    match role {
        Role::Worker if main_thread => !multiplexer || loop_wait == Some(false),
        Role::Master => main_thread && !idle,
        Role::Worker | Role::Plain | Role::Child => !idle,
    }
}

/// A multiplexer: the fds it waits on come from its arguments.
pub fn is_multiplexer(name: &str) -> bool {
    EPOLL_WAITS.contains(&name) || SELECTS.contains(&name) || POLLS.contains(&name)
}

/// The kernel's class table: (syscall number, class) for every syscall
/// that is not the default (may block on something it does not own).
pub fn class_table() -> Vec<(i64, SyscallClass)> {
    /// Sets one class in a syscall's.
    type Mark = fn(&mut SyscallClass);
    let groups: [(&[&str], Mark); 5] = [
        (ALWAYS_WAIT, |c| c.wait = true),
        (READS, |c| c.read = true),
        (EPOLL_WAITS, |c| c.epoll = true),
        (SELECTS, |c| c.select = true),
        (POLLS, |c| c.poll = true),
    ];
    let mut out: Vec<(i64, SyscallClass)> = Vec::new();
    for (names, set) in groups {
        for n in names.iter().filter_map(|n| number(n)) {
            match out.iter_mut().find(|(nr, _)| *nr == n) {
                Some((_, c)) => set(c),
                None => {
                    let mut c = SyscallClass::default();
                    set(&mut c);
                    out.push((n, c));
                }
            }
        }
    }
    out
}

/// Syscalls whose first argument is an fd.
pub fn takes_fd(name: &str) -> bool {
    matches!(
        name,
        "read"
            | "write"
            | "readv"
            | "writev"
            | "pread64"
            | "pwrite64"
            | "preadv"
            | "pwritev"
            | "preadv2"
            | "pwritev2"
            | "recvfrom"
            | "recvmsg"
            | "recvmmsg"
            | "sendto"
            | "sendmsg"
            | "sendmmsg"
            | "connect"
            | "accept"
            | "accept4"
            | "flock"
            | "fcntl"
            | "ioctl"
            | "fsync"
            | "fdatasync"
            | "sync_file_range"
            | "ftruncate"
            | "fallocate"
            | "sendfile"
            | "splice"
            | "tee"
            | "shutdown"
            | "close"
    )
}

/// Syscalls whose third argument is a byte count.
pub fn takes_count(name: &str) -> bool {
    matches!(
        name,
        "read" | "write" | "pread64" | "pwrite64" | "recvfrom" | "sendto"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        let read = number("read").unwrap();
        assert_eq!(name(read), "read");
        assert_eq!(name(-1), "syscall_-1");
        assert_eq!(name(100_000), "syscall_100000");
        assert!(number("exit_group").is_some());
    }

    #[test]
    fn class_table_marks_waits_and_io() {
        let t = class_table();
        let get = |n: &str| {
            t.iter()
                .find(|(nr, _)| *nr == number(n).unwrap())
                .map(|(_, c)| *c)
        };
        let none = SyscallClass::default();
        let wait = SyscallClass { wait: true, ..none };
        let read = SyscallClass { read: true, ..none };
        assert_eq!(
            get("epoll_wait").or(get("epoll_pwait")),
            Some(SyscallClass {
                epoll: true,
                ..wait
            })
        );
        assert_eq!(
            get("pselect6"),
            Some(SyscallClass {
                select: true,
                ..wait
            })
        );
        assert_eq!(get("ppoll"), Some(SyscallClass { poll: true, ..wait }));
        assert_eq!(get("pause"), Some(wait));
        assert_eq!(get("read"), Some(read));
        assert_eq!(get("recvfrom"), Some(read));
        assert_eq!(get("sendto"), None);
        assert_eq!(get("futex"), None, "futex stays MAYBE");
    }

    #[test]
    fn event_loop_wait_is_never_a_stall() {
        let ew = number("epoll_wait").or(number("epoll_pwait")).unwrap();
        for role in [Role::Worker, Role::Master, Role::Plain, Role::Child] {
            assert!(!is_stall(role, true, ew, None));
            assert!(!is_stall(role, true, ew, Some(true)));
        }
    }

    #[test]
    fn a_wait_of_the_loop_thread_outside_its_loop_is_a_stall() {
        let poll = number("poll").or(number("ppoll")).unwrap();
        let ew = number("epoll_wait").or(number("epoll_pwait")).unwrap();
        assert!(is_stall(Role::Worker, true, poll, Some(false)));
        assert!(
            is_stall(Role::Worker, true, ew, Some(false)),
            "another epoll fd"
        );
        assert!(
            !is_stall(Role::Worker, true, poll, None),
            "loop not known yet"
        );
        // Other threads and processes idle in their multiplexers.
        assert!(!is_stall(Role::Worker, false, poll, Some(false)));
        assert!(!is_stall(Role::Plain, true, poll, Some(false)));
    }

    #[test]
    fn worker_main_thread_blocked_in_read_or_sleep_is_a_stall() {
        let read = number("read").unwrap();
        let sleep = number("clock_nanosleep").unwrap();
        let futex = number("futex").unwrap();
        assert!(is_stall(Role::Worker, true, read, None));
        assert!(is_stall(Role::Worker, true, sleep, None));
        assert!(is_stall(Role::Worker, true, futex, None));
        // Another thread of a worker (a gthread pool thread) is judged like
        // any thread: idle in a futex, stalled in a read.
        assert!(is_stall(Role::Worker, false, read, None));
        assert!(!is_stall(Role::Worker, false, futex, None));
        assert!(!is_stall(Role::Worker, false, sleep, None));
    }

    #[test]
    fn master_timed_waits_and_plain_idle_threads_are_not_stalls() {
        let sleep = number("clock_nanosleep").unwrap();
        let wait4 = number("wait4").unwrap();
        let read = number("read").unwrap();
        assert!(!is_stall(Role::Master, true, sleep, None));
        assert!(!is_stall(Role::Master, true, wait4, None));
        assert!(is_stall(Role::Master, true, read, None));
        assert!(!is_stall(Role::Master, false, read, None));
        assert!(!is_stall(
            Role::Plain,
            false,
            number("futex").unwrap(),
            None
        ));
        assert!(is_stall(Role::Plain, false, read, None));
        assert!(is_stall(Role::Child, true, read, None));
    }

    /// Syscalls added since Linux 6.1, numbered alike in the x86_64 and the
    /// generic (aarch64) tables.
    const NEWER: &[(&str, i64)] = &[
        ("futex_waitv", 449),
        ("cachestat", 451),
        ("fchmodat2", 452),
        ("map_shadow_stack", 453),
        ("futex_wake", 454),
        ("futex_wait", 455),
        ("futex_requeue", 456),
        ("statmount", 457),
        ("listmount", 458),
        ("lsm_get_self_attr", 459),
        ("lsm_set_self_attr", 460),
        ("lsm_list_modules", 461),
        ("mseal", 462),
        ("setxattrat", 463),
        ("getxattrat", 464),
        ("listxattrat", 465),
        ("removexattrat", 466),
        ("open_tree_attr", 467),
    ];

    #[test]
    fn newer_syscalls_round_trip() {
        for &(n, nr) in NEWER {
            assert_eq!(number(n), Some(nr), "{n}");
            assert_eq!(name(nr), n, "{nr}");
        }
    }

    #[test]
    fn numbers_agree_with_libc() {
        assert_eq!(number("read"), Some(libc::SYS_read));
        assert_eq!(number("futex"), Some(libc::SYS_futex));
        assert_eq!(number("futex_waitv"), Some(libc::SYS_futex_waitv));
        assert_eq!(number("mseal"), Some(libc::SYS_mseal));
        assert_eq!(number("close"), Some(libc::SYS_close));
        assert_eq!(number("shutdown"), Some(libc::SYS_shutdown));
    }

    #[test]
    fn no_placeholder_is_a_name() {
        // The kernel headers' end-of-table count and arch-specific base.
        for marker in ["syscalls", "arch_specific_syscall"] {
            assert_eq!(number(marker), None, "{marker}");
        }
        for nr in 0..i64::from(tracer_common::MAX_SYSCALL_NR) {
            let n = name(nr);
            assert!(n != "syscalls" && n != "arch_specific_syscall", "{nr}: {n}");
        }
    }

    #[test]
    fn class_lists_name_real_syscalls() {
        use syscalls::{aarch64, x86_64};
        let lists = [
            ALWAYS_WAIT,
            IDLE_UNLESS_EVENT_LOOP,
            READS,
            EPOLL_WAITS,
            SELECTS,
            POLLS,
        ];
        for n in lists.into_iter().flatten() {
            let known = n.parse::<x86_64::Sysno>().is_ok() || n.parse::<aarch64::Sysno>().is_ok();
            assert!(known, "{n} is no syscall on x86_64 or aarch64");
        }
    }

    #[test]
    fn class_table_fits_the_kernel_map() {
        let max = i64::from(tracer_common::MAX_SYSCALL_NR);
        assert!(class_table().iter().all(|(nr, _)| (0..max).contains(nr)));
        assert!(NEWER.iter().all(|&(_, nr)| nr < max));
    }

    #[test]
    fn futex2_waits_are_classed_like_futex() {
        let futex = number("futex").unwrap();
        for n in ["futex_wait", "futex_waitv", "futex_wake", "futex_requeue"] {
            let nr = number(n).unwrap();
            for role in [Role::Worker, Role::Master, Role::Plain, Role::Child] {
                for main in [true, false] {
                    assert_eq!(
                        is_stall(role, main, nr, None),
                        is_stall(role, main, futex, None),
                        "{n} {role:?} main={main}"
                    );
                }
            }
        }
        let wait = number("futex_wait").unwrap();
        assert!(
            is_stall(Role::Worker, true, wait, None),
            "worker loop asleep"
        );
        assert!(
            !is_stall(Role::Worker, false, wait, None),
            "worker helper idle"
        );
    }
}
