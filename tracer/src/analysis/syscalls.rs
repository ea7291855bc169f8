//! Syscall numbers, names, and which syscalls count as "waiting for work".
use std::borrow::Cow;

use crate::model::Role;

// Both tables are compiled; only the host architecture's is used.
#[allow(dead_code)]
#[path = "syscall_names.rs"]
mod names;

#[cfg(target_arch = "x86_64")]
static TABLE: &[&str] = &names::X86_64;
#[cfg(not(target_arch = "x86_64"))]
static TABLE: &[&str] = &names::GENERIC;

pub fn name(nr: i64) -> Cow<'static, str> {
    match usize::try_from(nr).ok().and_then(|i| TABLE.get(i)) {
        Some(n) if !n.is_empty() => Cow::Borrowed(n),
        _ => Cow::Owned(format!("syscall_{nr}")),
    }
}

pub fn number(name: &str) -> Option<i64> {
    TABLE.iter().position(|n| *n == name).map(|i| i as i64)
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
/// lock held by another thread, a blocking `waitpid` or `accept`.
pub const IDLE_UNLESS_EVENT_LOOP: &[&str] = &[
    "futex",
    "futex_waitv",
    "nanosleep",
    "clock_nanosleep",
    "wait4",
    "waitid",
    "accept",
    "accept4",
];

/// Whether a syscall blocked past the threshold is a stall for this thread.
///
/// A worker's main thread runs its event loop (gevent's hub, or the sync
/// worker's request loop): anything but the loop's own wait stops heartbeats
/// and every request. Its other threads are helpers whose waits are normal.
/// The master only has timed waits when healthy. For any other process we
/// cannot know which thread matters, so every thread counts.
pub fn is_stall(role: Role, main_thread: bool, nr: i64) -> bool {
    let n = name(nr);
    if ALWAYS_WAIT.contains(&n.as_ref()) {
        return false;
    }
    let idle = IDLE_UNLESS_EVENT_LOOP.contains(&n.as_ref());
    match role {
        Role::Worker => main_thread,
        Role::Master => main_thread && !idle,
        Role::Plain | Role::Child => !idle,
    }
}

/// The kernel's class table: (syscall number, class bits) for every
/// syscall that is not the default [`class::MAYBE`].
pub fn class_table() -> Vec<(i64, u32)> {
    use tracer_common::class;
    let groups: [(&[&str], u32); 2] = [
        (ALWAYS_WAIT, class::WAIT),
        (
            &[
                "read", "readv", "pread64", "recvfrom", "recvmsg", "recvmmsg",
            ],
            class::READ,
        ),
    ];
    let mut out: Vec<(i64, u32)> = Vec::new();
    for (names, bits) in groups {
        for n in names.iter().filter_map(|n| number(n)) {
            match out.iter_mut().find(|(nr, _)| *nr == n) {
                Some((_, b)) => *b |= bits,
                None => out.push((n, bits)),
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
        use tracer_common::class;
        let t = class_table();
        let get = |n: &str| {
            t.iter()
                .find(|(nr, _)| *nr == number(n).unwrap())
                .map(|(_, b)| *b)
        };
        assert_eq!(get("epoll_wait").or(get("epoll_pwait")), Some(class::WAIT));
        assert_eq!(get("read"), Some(class::READ));
        assert_eq!(get("recvfrom"), Some(class::READ));
        assert_eq!(get("sendto"), None);
        assert_eq!(get("futex"), None, "futex stays MAYBE");
    }

    #[test]
    fn event_loop_wait_is_never_a_stall() {
        let ew = number("epoll_wait").or(number("epoll_pwait")).unwrap();
        for role in [Role::Worker, Role::Master, Role::Plain, Role::Child] {
            assert!(!is_stall(role, true, ew));
        }
    }

    #[test]
    fn worker_main_thread_blocked_in_read_or_sleep_is_a_stall() {
        let read = number("read").unwrap();
        let sleep = number("clock_nanosleep").unwrap();
        let futex = number("futex").unwrap();
        assert!(is_stall(Role::Worker, true, read));
        assert!(is_stall(Role::Worker, true, sleep));
        assert!(is_stall(Role::Worker, true, futex));
        // A helper thread of a worker waiting is normal.
        assert!(!is_stall(Role::Worker, false, read));
        assert!(!is_stall(Role::Worker, false, futex));
    }

    #[test]
    fn master_timed_waits_and_plain_idle_threads_are_not_stalls() {
        let sleep = number("clock_nanosleep").unwrap();
        let wait4 = number("wait4").unwrap();
        let read = number("read").unwrap();
        assert!(!is_stall(Role::Master, true, sleep));
        assert!(!is_stall(Role::Master, true, wait4));
        assert!(is_stall(Role::Master, true, read));
        assert!(!is_stall(Role::Master, false, read));
        assert!(!is_stall(Role::Plain, false, number("futex").unwrap()));
        assert!(is_stall(Role::Plain, false, read));
        assert!(is_stall(Role::Child, true, read));
    }
}
