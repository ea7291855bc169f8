//! The correlator's unit tests: synthetic kernel events and samples in,
//! reports out.
use super::lifecycle::MAX_EXITED_KEPT;
use super::{Correlator, Enricher, NewProcess, syscalls};
use crate::model::{
    BlockedThread, CloseCounts, CloseKind, ClosedConn, Container, Direction, EndedBy, FdInfo,
    FdKind, KernelEvent, MemoryCgroup, Outcome, Output, Role, Sample, Source, Wake, WokeBy,
    WorkerState,
};
use crate::model::{LoopWait, Losses, Setting, SettingSource, Summary};

/// The verdict of a run in which nothing was lost.
pub(super) fn verdict(s: &Summary) -> crate::present::Verdict {
    crate::present::verdict(s, &Losses::default())
}

use super::fixtures::{self, MASTER, MS, W};

/// Stands in for /proc: worker W's fd 11 is a pipe only W can write to.
pub(super) struct FakeProc;
impl Enricher for FakeProc {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
        if fd == 11 {
            fixtures::self_pipe(pid)
        } else {
            fixtures::socket(5)
        }
    }
    fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
        Some(600)
    }
    fn comm(&mut self, _pid: u32) -> String {
        "gunicorn".into()
    }
    fn container(&mut self, _pid: u32) -> Option<Container> {
        None
    }
    fn memory_cgroup(&mut self, _pid: u32, _cgroups: Option<&str>) -> Option<MemoryCgroup> {
        Some(fixtures::full_cgroup())
    }
    fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
        fixtures::owner_by_inode(inode, pids)
    }
    fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread> {
        fixtures::pipe_reader(pid)
    }
}

fn nr(name: &str) -> i64 {
    syscalls::number(name).unwrap()
}

pub(super) fn sample(tid: u32, name: &str, start_ms: u64, seq: u64) -> Sample {
    Sample {
        tid,
        tgid: W,
        nr: nr(name),
        start_ns: start_ms * MS,
        arg0: 11,
        arg2: 4,
        seq,
        active: true,
        seeded: false,
        woke_ns: 0,
        woke_by: WokeBy::None,
    }
}

/// A process of MASTER's found at start-up.
pub(super) fn scanned(pid: u32, role: Role) -> NewProcess {
    NewProcess {
        pid,
        master: MASTER,
        role,
        app: Some("app:app".into()),
        timeout_s: Some(Setting::new(4.0, SettingSource::CommandLine)),
        // The gevent worker's signatures are what these tests check.
        worker_class: Some("gevent".into()),
        settings: None,
        source: Source::Scan,
        container: None,
    }
}

/// The kernel's report of worker W's thread `tid` waking after sleeping in
/// `name` on `fd` from `start_ms` to `ts_ms`.
fn woke(tid: u32, name: &str, fd: u64, start_ms: u64, ts_ms: u64, wake: Wake) -> KernelEvent {
    KernelEvent::SleepEnd {
        ts_ns: ts_ms * MS,
        tgid: W,
        tid,
        nr: nr(name),
        start_ns: start_ms * MS,
        wake,
        arg0: fd,
        arg2: if fd == 11 { 4 } else { 4096 },
        seeded: false,
    }
}

/// MASTER forks a worker `child`.
fn forked(child: u32) -> KernelEvent {
    KernelEvent::Fork {
        ts_ns: 1,
        parent: MASTER,
        child,
        role: Role::Worker,
        master: MASTER,
    }
}

pub(super) fn setup() -> Correlator {
    let mut c = Correlator::new(500 * MS);
    let m = c.add_process(0, scanned(MASTER, Role::Master));
    assert!(matches!(m, Some(Output::Master { pid: MASTER, .. })));
    let w = c.add_process(0, scanned(W, Role::Worker));
    assert!(matches!(
        w,
        Some(Output::Worker {
            pid: W,
            master_pid: MASTER,
            ..
        })
    ));
    c
}

pub(super) fn kinds(out: &[Output]) -> Vec<&'static str> {
    out.iter()
        .map(|o| match o {
            Output::Master { .. } => "master",
            Output::Worker { .. } => "worker",
            Output::Loop { .. } => "loop",
            Output::WorkerClass { .. } => "worker_class",
            Output::Stall { .. } => "stall",
            Output::StallEnd { .. } => "stall_end",
            Output::WorkerTimeout { .. } => "worker_timeout",
            Output::WorkerExit { .. } => "worker_exit",
            Output::EarlyClose { .. } => "early_close",
            Output::HungRequest { .. } => "hung_request",
            Output::HungRequestEnd { .. } => "hung_request_end",
        })
        .collect()
}

#[test]
fn blocked_pipe_read_reported_once_while_blocked() {
    let mut c = setup();
    c.procs.get_mut(&W).unwrap().worker_class = None;
    let s = sample(W, "read", 1000, 7);
    assert!(
        c.on_samples(&[s], 1400 * MS, &mut FakeProc).is_empty(),
        "below threshold"
    );
    let out = c.on_samples(&[s], 1550 * MS, &mut FakeProc);
    assert_eq!(kinds(&out), ["stall"]);
    let Output::Stall { report, .. } = &out[0] else {
        unreachable!()
    };
    assert_eq!((report.pid, report.tid, report.master_pid), (W, W, MASTER));
    assert_eq!(report.syscall.as_deref(), Some("read"));
    assert_eq!(report.fd, Some(11));
    assert_eq!(report.fd_kind, FdKind::Pipe);
    assert_eq!(report.only_self_can_wake, Some(true));
    assert_eq!(report.blocked_ms, 550);
    assert_eq!(report.heartbeat_age_ms, Some(600));
    // The worker class is not known and /proc gave no thread count:
    // another thread of the process may write the pipe.
    assert_eq!(report.cause.as_ref().unwrap().id, "self_pipe_wait");
    // Still blocked: no second report.
    assert!(c.on_samples(&[s], 2000 * MS, &mut FakeProc).is_empty());
    let sum = c.summary(3000 * MS);
    assert_eq!(verdict(&sum).stalled_pids, vec![W]);
    assert!(
        verdict(&sum).text.contains(
            "worker 101 (master 100) is STALLED: blocked 2.0s in read() on fd 11 (pipe:[777])"
        ),
        "{}",
        verdict(&sum).text
    );
    let text = verdict(&sum).text;
    assert!(
        !text.contains("never") && text.contains("another of its threads must write it"),
        "{text}"
    );
}

/// The same read in a gevent worker's hub: the writer is a greenlet of the
/// blocked hub, so it can never return; and in a one-thread process.
#[test]
fn a_self_pipe_read_never_returns_with_gevent_known_or_one_thread() {
    struct OneThread;
    impl Enricher for OneThread {
        fn fd_info(&mut self, pid: u32, _fd: i32) -> FdInfo {
            fixtures::self_pipe(pid)
        }
        fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
            Some(600)
        }
        fn thread_count(&mut self, _pid: u32) -> Option<u32> {
            Some(1)
        }
    }
    let mut c = Correlator::new(500 * MS);
    c.add_process(0, scanned(MASTER, Role::Master));
    c.add_process(
        0,
        NewProcess {
            worker_class: Some("gevent".into()),
            ..scanned(W, Role::Worker)
        },
    );
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let text = verdict(&c.summary(2000 * MS)).text;
    assert!(
        text.contains("so it can never return") && text.contains("multiprocessing.Queue"),
        "{text}"
    );
    let mut c = setup();
    c.procs.get_mut(&W).unwrap().worker_class = None;
    let out = c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut OneThread);
    let Output::Stall { report, .. } = &out[0] else {
        panic!("{out:?}")
    };
    assert_eq!(report.threads, Some(1));
    assert_eq!(report.cause.as_ref().unwrap().id, "self_pipe_read");
    let text = verdict(&c.summary(2000 * MS)).text;
    assert!(text.contains("so it can never return"), "{text}");
}

#[test]
fn idle_event_loop_and_idle_helper_threads_are_not_stalls() {
    let mut c = setup();
    // The loop's own wait, found: an idle loop is then known idle.
    c.set_loop(0, W, LoopWait::Epoll { epfd: 11 });
    let idle = sample(W, "epoll_wait", 0, 1);
    let helper_futex = sample(W + 2, "futex", 0, 1);
    let helper_sleep = sample(W + 3, "clock_nanosleep", 0, 1);
    let out = c.on_samples(
        &[idle, helper_futex, helper_sleep],
        10_000 * MS,
        &mut FakeProc,
    );
    assert!(out.is_empty(), "{out:?}");
    // The master in its timed select/sleep is idle too.
    let mut m = sample(MASTER, "clock_nanosleep", 0, 1);
    m.tgid = MASTER;
    assert!(c.on_samples(&[m], 10_000 * MS, &mut FakeProc).is_empty());
    assert!(verdict(&c.summary(10_000 * MS)).text.starts_with("healthy"));
}

#[test]
fn unwatched_process_is_ignored() {
    let mut c = setup();
    let mut s = sample(999, "read", 0, 1);
    s.tgid = 999;
    assert!(c.on_samples(&[s], 10_000 * MS, &mut FakeProc).is_empty());
}

#[test]
fn returned_stall_ends_with_returned() {
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    let s = sample(W, "read", 0, 3);
    c.on_samples(&[s], 600 * MS, &mut FakeProc);
    let end = woke(W, "read", 11, 0, 900, Wake::Returning);
    let out = c.on_kernel(end, &mut FakeProc);
    assert_eq!(kinds(&out), ["stall_end"]);
    assert!(matches!(
        out[0],
        Output::StallEnd {
            blocked_ms: 900,
            outcome: Outcome::Returned,
            ..
        }
    ));
    assert!(
        verdict(&c.summary(1000 * MS))
            .text
            .starts_with("no worker is stalled now")
    );
}

#[test]
fn short_stall_between_polls_reports_both_halves() {
    let mut c = setup();
    let ev = woke(W, "recvfrom", 5, 100, 700, Wake::Returning);
    let out = c.on_kernel(ev, &mut FakeProc);
    assert_eq!(kinds(&out), ["stall", "stall_end"]);
    let Output::Stall { report, .. } = &out[0] else {
        unreachable!()
    };
    assert_eq!(report.fd_kind, FdKind::Socket);
    assert_eq!(
        report.cause.as_ref().unwrap().id,
        "uncooperative_socket_read"
    );
}

/// The kernel's entry for a call the thread woke from, not judged yet.
fn woken(mut s: Sample, at_ms: u64, by: WokeBy) -> Sample {
    s.active = false;
    s.woke_ns = at_ms * MS;
    s.woke_by = by;
    s
}

#[test]
fn read_restarted_after_signal_is_the_same_stall() {
    let mut c = setup();
    let s = sample(W, "read", 0, 1);
    c.on_samples(&[s], 600 * MS, &mut FakeProc);
    // A signal woke it: the kernel holds the call open.
    let open = woken(s, 4000, WokeBy::Signal);
    assert!(
        c.on_samples(&[open], 4050 * MS, &mut FakeProc).is_empty(),
        "held while it may resume"
    );
    // Python retried the read: the kernel carries on the same entry.
    let mut again = s;
    again.woke_by = WokeBy::Resumed;
    assert!(
        c.on_samples(&[again], 4700 * MS, &mut FakeProc).is_empty(),
        "no second stall"
    );
    // SIGKILL: the thread dies inside the restarted read.
    let died = woke(W, "read", 11, 0, 5000, Wake::Killed);
    let out = c.on_kernel(died, &mut FakeProc);
    assert!(
        matches!(
            out[..],
            [Output::StallEnd {
                blocked_ms: 5000,
                outcome: Outcome::Exited,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn interrupted_and_not_restarted_ends_after_grace() {
    let mut c = setup();
    let s = sample(W, "read", 0, 1);
    c.on_samples(&[s], 600 * MS, &mut FakeProc);
    let open = woken(s, 1000, WokeBy::Signal);
    assert!(c.on_samples(&[open], 1100 * MS, &mut FakeProc).is_empty());
    let out = c.on_samples(&[open], 1300 * MS, &mut FakeProc);
    assert!(
        matches!(
            out[..],
            [Output::StallEnd {
                blocked_ms: 1000,
                outcome: Outcome::Interrupted,
                ..
            }]
        ),
        "{out:?}"
    );
    // The entry the kernel still holds is not a new stall.
    assert!(c.on_samples(&[open], 1400 * MS, &mut FakeProc).is_empty());
}

#[test]
fn the_kernel_judging_a_call_interrupted_ends_it_at_once() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let intr = woke(W, "read", 11, 0, 1000, Wake::Interrupted);
    let out = c.on_kernel(intr, &mut FakeProc);
    assert!(
        matches!(
            out[..],
            [Output::StallEnd {
                blocked_ms: 1000,
                outcome: Outcome::Interrupted,
                ..
            }]
        ),
        "{out:?}"
    );
}

#[test]
fn master_kill_is_tied_to_the_stall_then_exit_ends_it() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let abrt = KernelEvent::Signal {
        ts_ns: 4500 * MS,
        target: W,
        sender: MASTER,
        sender_comm: "gunicorn".into(),
        sig: 6,
    };
    // Held until it is known whether the master escalates to SIGKILL.
    assert!(c.on_kernel(abrt, &mut FakeProc).is_empty());
    // A signal from someone else is not a Gunicorn timeout.
    let other = KernelEvent::Signal {
        ts_ns: 4600 * MS,
        target: W,
        sender: 4242,
        sender_comm: "kill".into(),
        sig: 9,
    };
    assert!(c.on_kernel(other, &mut FakeProc).is_empty());
    let exit = KernelEvent::Exit {
        ts_ns: 5500 * MS,
        pid: W,
        exit_code: None,
        signal: Some(9),
    };
    let out = c.on_kernel(exit, &mut FakeProc);
    assert_eq!(kinds(&out), ["worker_timeout", "stall_end", "worker_exit"]);
    let Output::WorkerTimeout {
        pid: W,
        master_pid: MASTER,
        signal,
        escalated_to: None,
        escalated_after_ms: None,
        stall: Some(s),
        ..
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!(signal, "SIGABRT");
    assert_eq!(
        (s.syscall_name(), s.fd, s.blocked_ms),
        ("read", Some(11), 4500)
    );
    // Issue 18 item 2: every figure is current at the kill, not the first
    // report's (the heartbeat was 600 ms old at 600 ms, and never moved).
    assert_eq!(s.heartbeat_age_ms, Some(4500));
    assert!(matches!(&out[2], Output::WorkerExit { signal: Some(s), .. } if s == "SIGKILL"));
    let sum = c.summary(6000 * MS);
    assert_eq!(verdict(&sum).killed_pids, vec![W]);
    assert!(
        verdict(&sum)
            .text
            .contains("killed by Gunicorn's WORKER TIMEOUT after blocking 4.5s in read()"),
        "{}",
        verdict(&sum).text
    );
    let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
    assert_eq!(w.state, WorkerState::KilledByTimeout);
    let st = w.stall.as_ref().unwrap();
    assert_eq!((st.blocked_ms, st.heartbeat_age_ms), (5500, Some(5500)));
}

pub(super) fn abort_from_master(ts_ms: u64) -> KernelEvent {
    KernelEvent::Signal {
        ts_ns: ts_ms * MS,
        target: W,
        sender: MASTER,
        sender_comm: "gunicorn".into(),
        sig: 6,
    }
}

fn blamed(out: &[Output]) -> Option<&crate::model::StallReport> {
    match out {
        [Output::WorkerTimeout { stall, .. }] => stall.as_ref(),
        _ => panic!("{out:?}"),
    }
}

/// The master's SIGABRT at `ts_ms`, then the end of the run: the timeout
/// it begins, as told then.
fn timed_out_at(c: &mut Correlator, ts_ms: u64) -> Vec<Output> {
    let held = c.on_kernel(abort_from_master(ts_ms), &mut FakeProc);
    assert!(held.is_empty(), "{held:?}");
    c.flush_timeouts()
}

/// A pool thread's stall cannot stop the heartbeat, which the loop thread
/// keeps: the WORKER TIMEOUT is not blamed on it.
#[test]
fn a_worker_timeout_is_not_blamed_on_a_pool_threads_stall() {
    let mut c = setup();
    c.on_samples(&[sample(W + 1, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let out = timed_out_at(&mut c, 10_000);
    assert_eq!(blamed(&out), None);
    let exit = KernelEvent::Exit {
        ts_ns: 10_100 * MS,
        pid: W,
        exit_code: Some(1),
        signal: None,
    };
    c.on_kernel(exit, &mut FakeProc);
    let text = verdict(&c.summary(11_000 * MS)).text;
    assert!(
        text.contains("killed by Gunicorn's WORKER TIMEOUT; no stall of its loop thread was seen in the timeout window"),
        "{text}"
    );
    assert!(!text.contains("WORKER TIMEOUT after"), "{text}");
}

/// A stall of the loop thread that was over long before the kill (the
/// timeout is 4 s) did not stop the heartbeat Gunicorn timed out on; one
/// that ended inside the window may have.
#[test]
fn a_worker_timeout_is_blamed_only_on_a_loop_stall_inside_the_timeout_window() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    c.on_kernel(woke(W, "read", 11, 0, 1000, Wake::Returning), &mut FakeProc);
    let out = timed_out_at(&mut c, 30_000);
    assert_eq!(blamed(&out), None);
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 20_000, 1)], 20_600 * MS, &mut FakeProc);
    c.on_kernel(
        woke(W, "read", 11, 20_000, 27_000, Wake::Returning),
        &mut FakeProc,
    );
    let out = timed_out_at(&mut c, 30_000);
    let s = blamed(&out).expect("ended 3 s before the kill, inside the 4 s window");
    assert_eq!((s.tid, s.blocked_ms), (W, 7000));
}

#[test]
fn forked_worker_is_announced_and_watched() {
    let mut c = setup();
    let fork = forked(200);
    let out = c.on_kernel(fork, &mut FakeProc);
    assert!(matches!(
        &out[..],
        [Output::Worker {
            pid: 200,
            master_pid: MASTER,
            source: Source::Fork,
            ..
        }]
    ));
    let mut s = sample(200, "read", 0, 1);
    s.tgid = 200;
    assert_eq!(
        kinds(&c.on_samples(&[s], 700 * MS, &mut FakeProc)),
        ["stall"]
    );
}

#[test]
fn stall_end_missing_from_kernel_is_inferred_after_two_polls() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let moved_on = sample(W, "epoll_wait", 650, 2);
    assert!(
        c.on_samples(&[moved_on], 700 * MS, &mut FakeProc)
            .is_empty()
    );
    let out = c.on_samples(&[moved_on], 800 * MS, &mut FakeProc);
    assert_eq!(kinds(&out), ["stall_end"]);
    // Nothing said how the call ended: not "the process died inside it".
    assert!(
        matches!(
            &out[0],
            Output::StallEnd {
                outcome: Outcome::Unknown,
                ..
            }
        ),
        "{out:?}"
    );
    assert_eq!(c.stall_ends_unknown(), 1);
}

#[test]
fn a_stall_that_vanished_after_waking_is_not_counted_unknown() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let woke = woken(sample(W, "read", 0, 1), 650, WokeBy::Plain);
    c.on_samples(&[woke], 660 * MS, &mut FakeProc);
    c.on_samples(&[], 700 * MS, &mut FakeProc);
    let out = c.on_samples(&[], 800 * MS, &mut FakeProc);
    assert!(
        out.iter().all(|o| !matches!(
            o,
            Output::StallEnd {
                outcome: Outcome::Unknown,
                ..
            }
        )),
        "{out:?}"
    );
    assert_eq!(c.stall_ends_unknown(), 0);
}

pub(super) fn conn_end(pid: u32, bytes_in: u64, bytes_out: u64, ended_by: EndedBy) -> KernelEvent {
    KernelEvent::ConnEnd {
        ts_ns: 2000 * MS,
        tgid: pid,
        tid: pid,
        fd: 11,
        conn: ClosedConn {
            start_ns: Some(1000 * MS),
            bytes_in,
            bytes_out,
            eagain_ns: Some(1500 * MS),
            direction: Direction::Inbound,
            local_port: Some(8000),
            aborted: false,
            unreadable: false,
            peer: Some("127.0.0.1:40000".into()),
        },
        ended_by,
        peer_closed_first: false,
    }
}

#[test]
fn early_closes_are_counted_and_rank_after_stalls() {
    let mut c = setup();
    let fork = forked(102);
    c.on_kernel(fork, &mut FakeProc);
    // Both loops found: nothing is unseen, so a worker can be healthy.
    for pid in [W, 102] {
        c.set_loop(0, pid, LoopWait::Epoll { epfd: 4 });
    }
    let out = c.on_kernel(conn_end(W, 120, 0, EndedBy::Close), &mut FakeProc);
    let [Output::EarlyClose { close, .. }] = &out[..] else {
        panic!("{out:?}")
    };
    assert_eq!(close.kind, CloseKind::DroppedRequest);
    assert_eq!(close.peer.as_deref(), Some("127.0.0.1:40000"));
    assert_eq!(close.local_port, Some(8000));
    assert_eq!(close.cause.as_ref().unwrap().id, "leaked_socket_timeout");
    c.on_kernel(conn_end(W, 0, 0, EndedBy::Close), &mut FakeProc);
    // A connection that got a reply is not reported at all.
    assert!(
        c.on_kernel(conn_end(W, 120, 300, EndedBy::Close), &mut FakeProc)
            .is_empty()
    );
    // An unknown process's connection is ignored.
    assert!(
        c.on_kernel(conn_end(999, 120, 0, EndedBy::Close), &mut FakeProc)
            .is_empty()
    );

    let sum = c.summary(3000 * MS);
    let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
    assert_eq!(
        w.early_closes,
        CloseCounts {
            dropped_request: 1,
            idle: 1,
            ..Default::default()
        }
    );
    assert_eq!(verdict(&sum).dropping_pids, vec![W]);
    let text = &verdict(&sum).text;
    assert!(
        text.starts_with("worker 101 (master 100) dropped 1 request(s)"),
        "{text}"
    );
    assert!(text.contains("setdefaulttimeout"), "{text}");
    assert!(
        text.lines()
            .last()
            .unwrap()
            .starts_with("healthy: worker(s) 102"),
        "{text}"
    );

    // A stalled worker still comes first.
    c.on_samples(&[sample(W, "read", 0, 1)], 3000 * MS, &mut FakeProc);
    let text = verdict(&c.summary(3500 * MS)).text;
    assert!(
        text.starts_with("worker 101 (master 100) is STALLED"),
        "{text}"
    );
}

#[test]
fn idle_closes_alone_keep_the_verdict_healthy() {
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    c.on_kernel(conn_end(W, 0, 0, EndedBy::Close), &mut FakeProc);
    let sum = c.summary(3000 * MS);
    assert!(
        verdict(&sum).text.starts_with("healthy"),
        "{}",
        verdict(&sum).text
    );
    assert!(verdict(&sum).dropping_pids.is_empty());
}

#[test]
fn quiet_exits_are_counted_not_kept_and_notable_ones_are_bounded() {
    let mut c = setup();
    for pid in 1000..1000 + 3 * MAX_EXITED_KEPT as u32 {
        let fork = forked(pid);
        c.on_kernel(fork, &mut FakeProc);
        if pid % 2 == 0 {
            // Something to report: a dropped request.
            c.on_kernel(conn_end(pid, 10, 0, EndedBy::Close), &mut FakeProc);
        }
        c.on_kernel(
            KernelEvent::Exit {
                ts_ns: 2,
                pid,
                exit_code: Some(0),
                signal: None,
            },
            &mut FakeProc,
        );
    }
    let sum = c.summary(3);
    assert_eq!(sum.exited_quiet, 3 * MAX_EXITED_KEPT as u64 / 2);
    let exited = sum
        .workers
        .iter()
        .filter(|w| w.state != WorkerState::Healthy && w.pid >= 1000)
        .count();
    assert_eq!(
        exited, MAX_EXITED_KEPT,
        "only the last notable exits are kept"
    );
    assert!(
        sum.workers
            .iter()
            .any(|w| w.pid == 1000 + 3 * MAX_EXITED_KEPT as u32 - 2)
    );
    assert!(
        !sum.workers.iter().any(|w| w.pid == 1000),
        "the oldest were dropped"
    );
}

/// Worker W's connection from 127.0.0.1:40000 closed at `ts_ms` with a
/// request read and nothing sent (a read found nothing 500 ms before).
fn dropped_at(ts_ms: u64, ended_by: EndedBy) -> KernelEvent {
    let KernelEvent::ConnEnd {
        tgid,
        tid,
        fd,
        mut conn,
        peer_closed_first,
        ..
    } = conn_end(W, 120, 0, ended_by)
    else {
        unreachable!()
    };
    conn.start_ns = Some((ts_ms - 1000) * MS);
    conn.eagain_ns = Some((ts_ms - 500) * MS);
    KernelEvent::ConnEnd {
        ts_ns: ts_ms * MS,
        tgid,
        tid,
        fd: if ended_by == EndedBy::Exit { -1 } else { fd },
        conn,
        ended_by,
        peer_closed_first,
    }
}

fn signal(ts_ms: u64, sender: u32, comm: &str, sig: i32) -> KernelEvent {
    KernelEvent::Signal {
        ts_ns: ts_ms * MS,
        target: W,
        sender,
        sender_comm: comm.into(),
        sig,
    }
}

fn exited(ts_ms: u64, exit_code: Option<i32>, sig: Option<i32>) -> KernelEvent {
    KernelEvent::Exit {
        ts_ns: ts_ms * MS,
        pid: W,
        exit_code,
        signal: sig,
    }
}

/// The cause of the one early close in `out`.
fn close_cause(out: &[Output]) -> crate::model::Cause {
    let [Output::EarlyClose { close, .. }] = out else {
        panic!("{out:?}")
    };
    close.cause.clone().expect("a cause")
}

#[test]
fn a_request_lost_when_the_graceful_timeout_ran_out_names_the_stop() {
    // The master's SIGTERM (a shutdown), then the worker closes the request
    // it still holds 30 s later, itself, before exiting.
    let mut c = setup();
    c.on_kernel(signal(1000, MASTER, "gunicorn", 15), &mut FakeProc);
    let out = c.on_kernel(dropped_at(31_000, EndedBy::Close), &mut FakeProc);
    let cause = close_cause(&out);
    assert_eq!(cause.id, "graceful_stop_mid_request", "{cause:?}");
    assert!(cause.cause.contains("SIGTERM from its master"), "{cause:?}");
    assert!(cause.cause.contains("30.0s"), "{cause:?}");
    for wrong in ["WORKER TIMEOUT", "crash", "setdefaulttimeout", "OOM"] {
        assert!(!cause.cause.contains(wrong), "{wrong}: {cause:?}");
    }
    // The master killed it when the graceful timeout ran out; the kernel
    // closed the request at the exit, after the exit event.
    let mut c = setup();
    c.on_kernel(signal(1000, MASTER, "gunicorn", 15), &mut FakeProc);
    c.on_kernel(signal(31_000, MASTER, "gunicorn", 9), &mut FakeProc);
    c.on_kernel(exited(31_001, None, Some(9)), &mut FakeProc);
    let out = c.on_kernel(dropped_at(31_002, EndedBy::Exit), &mut FakeProc);
    let cause = close_cause(&out);
    assert_eq!(cause.id, "graceful_stop_mid_request", "{cause:?}");
    assert!(cause.cause.contains("SIGKILL"), "{cause:?}");
    // Counted against the worker, which the summary keeps.
    let sum = c.summary(32_000 * MS);
    let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
    assert_eq!(w.early_closes.dropped_request, 1);
}

#[test]
fn a_request_lost_to_a_worker_timeout_names_the_stall() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    c.on_kernel(signal(4500, MASTER, "gunicorn", 6), &mut FakeProc);
    let out = c.on_kernel(dropped_at(4600, EndedBy::Close), &mut FakeProc);
    let cause = close_cause(&out);
    assert_eq!(cause.id, "worker_timeout_mid_request", "{cause:?}");
    assert!(cause.cause.contains("WORKER TIMEOUT"), "{cause:?}");
    assert!(cause.cause.contains("read()"), "{cause:?}");
    assert!(!cause.cause.contains("OOM"), "{cause:?}");
    // No stall seen before the kill: said so, nothing invented.
    let mut c = setup();
    c.on_kernel(signal(4500, MASTER, "gunicorn", 6), &mut FakeProc);
    let cause = close_cause(&c.on_kernel(dropped_at(4600, EndedBy::Close), &mut FakeProc));
    assert_eq!(cause.id, "worker_timeout_mid_request", "{cause:?}");
    assert!(cause.cause.contains("no stall was seen"), "{cause:?}");
}

#[test]
fn a_request_lost_to_an_outside_kill_names_the_sender() {
    let mut c = setup();
    c.on_kernel(signal(1000, 4242, "kill", 9), &mut FakeProc);
    c.on_kernel(exited(1001, None, Some(9)), &mut FakeProc);
    let cause = close_cause(&c.on_kernel(dropped_at(1002, EndedBy::Exit), &mut FakeProc));
    assert_eq!(cause.id, "killed_mid_request", "{cause:?}");
    assert!(
        cause.cause.contains("SIGKILL from pid 4242 (kill)"),
        "{cause:?}"
    );
    for wrong in ["WORKER TIMEOUT", "crash", "OOM"] {
        assert!(!cause.cause.contains(wrong), "{wrong}: {cause:?}");
    }
    // An exit nothing explains: the request died with the worker, cause
    // not seen; no guess among timeouts, OOM kills and crashes.
    let mut c = setup();
    c.on_kernel(exited(1001, Some(1), None), &mut FakeProc);
    let cause = close_cause(&c.on_kernel(dropped_at(1002, EndedBy::Exit), &mut FakeProc));
    assert_eq!(cause.id, "worker_died_mid_request", "{cause:?}");
    assert!(cause.cause.contains("exited with code 1"), "{cause:?}");
    for wrong in ["WORKER TIMEOUT", "crash", "OOM"] {
        assert!(!cause.cause.contains(wrong), "{wrong}: {cause:?}");
    }
}
