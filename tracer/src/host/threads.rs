//! The threads of a traced process as /proc shows them: the syscall each is
//! blocked in, whether it runs, its name and CPU time. Read for stalls
//! being judged, never per event; every value is untrusted and bounded.
use std::fs;

use super::proc::proc_path;
use crate::model::{ThreadCpu, ThreadNow};

/// The syscall a thread is blocked in, from /proc/PID/task/TID/syscall:
/// `nr arg1 .. arg6 sp pc`, or `running`, or `-1 sp pc` outside a syscall.
pub fn parse_syscall_file(s: &str) -> Option<(i64, [u64; 6])> {
    let mut it = s.split_whitespace();
    let nr: i64 = it.next()?.parse().ok()?;
    if nr < 0 {
        return None;
    }
    let hex = |v: &str| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
    let mut args = [0u64; 6];
    for a in &mut args {
        *a = hex(it.next()?)?;
    }
    Some((nr, args))
}

fn task_file(pid: u32, tid: u32, name: &str) -> Option<String> {
    fs::read_to_string(proc_path(&[
        &pid.to_string(),
        "task",
        &tid.to_string(),
        name,
    ]))
    .ok()
}

pub fn thread_syscall(pid: u32, tid: u32) -> Option<(i64, [u64; 6])> {
    parse_syscall_file(&task_file(pid, tid, "syscall")?)
}

/// What a thread is doing now, from its syscall file.
pub fn thread_now(pid: u32, tid: u32) -> ThreadNow {
    let Some(text) = task_file(pid, tid, "syscall") else {
        return ThreadNow::Gone;
    };
    if text.starts_with("running") {
        return ThreadNow::Running;
    }
    match parse_syscall_file(&text) {
        Some((nr, args)) => ThreadNow::InSyscall { nr, arg0: args[0] },
        None => ThreadNow::OutsideSyscall,
    }
}

/// The name of a thread (its comm: 15 bytes at most, from the kernel, and
/// any bytes the thread chose: decoded lossily).
pub fn thread_name(pid: u32, tid: u32) -> String {
    let path = proc_path(&[&pid.to_string(), "task", &tid.to_string(), "comm"]);
    fs::read(path)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\n')
                .chars()
                .take(64)
                .collect()
        })
        .unwrap_or_default()
}

/// State, and user plus system CPU ticks, from a stat line (parsed from the
/// last ')': the comm may hold anything).
pub fn parse_stat_cpu(stat: &str) -> Option<(char, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let state = f.first()?.chars().next()?;
    // Fields 14 and 15 of stat (utime, stime): 12 and 13 after the comm.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((state, utime + stime))
}

/// `voluntary_ctxt_switches` of a status file.
pub fn parse_voluntary_switches(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))?
        .trim()
        .parse()
        .ok()
}

fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    match unsafe { libc::sysconf(libc::_SC_CLK_TCK) } {
        t if t > 0 => t as u64,
        _ => 100,
    }
}

/// A thread's state and CPU time, from its stat and status files.
pub fn thread_cpu(pid: u32, tid: u32) -> Option<ThreadCpu> {
    let (state, ticks) = parse_stat_cpu(&task_file(pid, tid, "stat")?)?;
    let switches = parse_voluntary_switches(&task_file(pid, tid, "status")?)?;
    Some(ThreadCpu {
        on_cpu: state == 'R',
        cpu_ms: ticks * 1000 / clock_ticks(),
        voluntary_switches: switches,
    })
}

/// `thread_cpu` of a thread that runs now (state R): its stat is read
/// first, and its status (about twice as costly: measured 18 and 33 us
/// here) only when it runs. None when it is asleep or cannot be read.
pub fn running_thread_cpu(pid: u32, tid: u32) -> Option<ThreadCpu> {
    let (state, ticks) = parse_stat_cpu(&task_file(pid, tid, "stat")?)?;
    if state != 'R' {
        return None;
    }
    let switches = parse_voluntary_switches(&task_file(pid, tid, "status")?)?;
    Some(ThreadCpu {
        on_cpu: true,
        cpu_ms: ticks * 1000 / clock_ticks(),
        voluntary_switches: switches,
    })
}

/// starttime (field 22) of /proc/PID/stat: clock ticks after boot. The
/// comm before it may hold any bytes: fields are counted after the last ')'.
pub fn parse_stat_start_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

fn clock_ns(clock: libc::clockid_t) -> Option<u64> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    if unsafe { libc::clock_gettime(clock, &mut ts) } != 0 {
        return None;
    }
    Some(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

fn start_ticks(pid: u32) -> Option<u64> {
    let stat = super::proc::read_capped(&proc_path(&[&pid.to_string(), "stat"]), 4096)?;
    parse_stat_start_ticks(&String::from_utf8_lossy(&stat))
}

/// How long ago a process was started (forked), from its stat's start time
/// (clock ticks after boot) and the boot-time clock.
pub fn process_age_ms(pid: u32) -> Option<u64> {
    let start_ms = start_ticks(pid)? * 1000 / clock_ticks();
    Some((clock_ns(libc::CLOCK_BOOTTIME)? / 1_000_000).saturating_sub(start_ms))
}

/// When the process that has `pid` now started, in the monotonic clock
/// of the kernel's event times, to a clock tick (10 ms): a pid reused
/// since an event about it shows a later start.
pub fn process_start_ns(pid: u32) -> Option<u64> {
    let start_boot_ns = start_ticks(pid)? * (1_000_000_000 / clock_ticks());
    let (boot, mono) = (
        clock_ns(libc::CLOCK_BOOTTIME)?,
        clock_ns(libc::CLOCK_MONOTONIC)?,
    );
    // The boot-time clock runs ahead of the monotonic one by the time the
    // machine spent suspended.
    Some(start_boot_ns.saturating_sub(boot.saturating_sub(mono)))
}

/// num_threads (field 20) of /proc/PID/stat. The comm before it may hold
/// any bytes, ')' and spaces included: fields are counted after the last ')'.
pub fn parse_stat_threads(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(17)?.parse().ok()
}

/// How many threads a process has now (a stat file is a few hundred
/// bytes; read no more than a page).
pub fn thread_count(pid: u32) -> Option<u32> {
    let bytes = super::proc::read_capped(&proc_path(&[&pid.to_string(), "stat"]), 4096)?;
    parse_stat_threads(&String::from_utf8_lossy(&bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_start_time_is_read_after_a_hostile_comm() {
        let stat = "42 (a) b) 1 2 3) S 1 42 42 0 -1 4194560 1 0 0 0 3 4 0 0 20 0 1 0 98765 1000 50";
        assert_eq!(parse_stat_start_ticks(stat), Some(98765));
        assert_eq!(parse_stat_start_ticks("42 (x"), None);
        assert_eq!(parse_stat_start_ticks("42 (x) S 1 2"), None);
    }

    /// The real kernel: a child started now has a start time within a
    /// few clock ticks of the monotonic clock read around its spawn.
    #[test]
    fn a_new_process_starts_at_the_monotonic_time_of_its_fork() {
        let before = clock_ns(libc::CLOCK_MONOTONIC).unwrap();
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let after = clock_ns(libc::CLOCK_MONOTONIC).unwrap();
        let start = process_start_ns(child.id()).unwrap();
        let _ = child.kill();
        let _ = child.wait();
        let tick = 1_000_000_000 / clock_ticks();
        assert!(
            start + 2 * tick >= before && start <= after + 2 * tick,
            "{before} <= {start} <= {after}"
        );
    }

    #[test]
    fn thread_count_from_stat_whatever_the_comm() {
        let stat = "4242 (a) b) 3 4) S 1 4242 4242 0 -1 4194560 1000 0 0 0 12 3 0 0 20 0 7 0 123456 1000000 500 18446744073709551615";
        assert_eq!(parse_stat_threads(stat), Some(7));
        assert_eq!(parse_stat_threads("4242 (x) S 1"), None);
        assert_eq!(parse_stat_threads("no paren"), None);
        // This test's own process: at least this thread.
        assert!(thread_count(std::process::id()).is_some_and(|n| n >= 1));
    }

    #[test]
    fn syscall_file_forms() {
        assert_eq!(
            parse_syscall_file("0 0xb 0x7ffd1234 0x4 0x0 0x0 0x9 0x7ffd0000 0x7f0000001234\n"),
            Some((0, [11, 0x7ffd1234, 4, 0, 0, 9]))
        );
        assert_eq!(parse_syscall_file("running\n"), None);
        assert_eq!(parse_syscall_file("-1 0x7ffd0000 0x7f0000001234\n"), None);
    }

    #[test]
    fn thread_cpu_from_stat_and_status() {
        let stat =
            "4242 (a) b) R 1 4242 4242 0 -1 4194560 900 0 0 0 250 37 0 0 20 0 3 0 123456 0 0";
        assert_eq!(parse_stat_cpu(stat), Some(('R', 287)));
        assert_eq!(parse_stat_cpu("garbage"), None);
        let status =
            "Name:\tgunicorn\nvoluntary_ctxt_switches:\t1500\nnonvoluntary_ctxt_switches:\t7\n";
        assert_eq!(parse_voluntary_switches(status), Some(1500));
        let me = std::process::id();
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() } as u32;
        let cpu = thread_cpu(me, tid).expect("this thread's stat");
        assert!(cpu.on_cpu, "it is running this test");
        assert!(running_thread_cpu(me, tid).is_some(), "and runs");
        assert_eq!(running_thread_cpu(me, u32::MAX), None);
        assert!(process_age_ms(me).is_some());
        // Reading its own syscall file, the thread is in a syscall (read).
        assert!(matches!(thread_now(me, tid), ThreadNow::InSyscall { .. }));
        assert_eq!(thread_now(me, u32::MAX), ThreadNow::Gone);
        assert!(!thread_name(me, tid).is_empty());
    }
}
