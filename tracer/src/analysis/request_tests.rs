//! The correlator's tests of which blocked threads hold up a request (a
//! thread other than the loop's, a worker's child), and of what is said of
//! requests a dying or crowded worker holds: synthetic events in, reports
//! out, on the fakes of `tests`.
use super::tests::{FakeProc, conn_end, kinds, sample, scanned, setup, verdict};
use super::{Correlator, NewProcess};
use super::{Enricher, fixtures};
use crate::model::{BlockedThread, EndedBy, KernelEvent, LoopWait, Output, Role, Sample};

use super::fixtures::{MASTER, MS, W};

/// Issue 18, item 3: a thread other than the loop's (here blocked in a
/// read since 1 ms) holds up a request only when one waits with it.
#[test]
fn a_helper_thread_blocked_in_read_is_a_stall_only_with_a_request_waiting() {
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    let helper = sample(W + 1, "read", 0, 1);
    // No scan yet: nothing ties a request to it (a thread waiting for work).
    assert!(c.on_samples(&[helper], 1000 * MS, &mut FakeProc).is_empty());
    assert!(verdict(&c.summary(1000 * MS)).text.starts_with("healthy"));
    // A scan made before it blocked cannot say; one from after, with a
    // request to another worker only, neither.
    c.on_sockets(
        &[fixtures::unanswered(202_001, 5000)],
        &[],
        1100 * MS,
        &mut FakeProc,
    );
    assert!(c.on_samples(&[helper], 1200 * MS, &mut FakeProc).is_empty());
    // A request worker W holds that has waited since before the thread
    // blocked, with nothing sent back: a stall Gunicorn never notices.
    c.on_sockets(
        &[fixtures::unanswered(101_001, 1300)],
        &[],
        1300 * MS,
        &mut FakeProc,
    );
    let out = c.on_samples(&[helper], 10_000 * MS, &mut FakeProc);
    assert_eq!(kinds(&out), ["stall"]);
    let Output::Stall { report, .. } = &out[0] else {
        unreachable!()
    };
    assert_eq!((report.pid, report.tid), (W, W + 1));
    assert_eq!(report.request_peer.as_deref(), Some("10.0.0.9:40000"));
    assert_eq!(report.request_waiting_ms, Some(10_000));
    let text = verdict(&c.summary(10_000 * MS)).text;
    assert!(
        text.contains("thread 102 (gunicorn) blocked 10.0s in read()")
            && text.contains("10.0.0.9:40000")
            && text.contains("Gunicorn will never notice"),
        "{text}"
    );
}

/// A plain process's child (`--pid` of a process that is not Gunicorn) is
/// judged like it: no request is known there, a blocked read is a stall.
#[test]
fn a_plain_processs_child_blocked_in_read_is_a_stall() {
    let mut c = Correlator::new(500 * MS);
    let plain = NewProcess {
        master: 400,
        ..scanned(400, Role::Plain)
    };
    c.add_process(0, plain);
    let child = NewProcess {
        master: 400,
        ..scanned(401, Role::Child)
    };
    c.add_process(0, child);
    let read = Sample {
        tgid: 401,
        ..sample(401, "read", 0, 1)
    };
    assert_eq!(
        kinds(&c.on_samples(&[read], 1000 * MS, &mut FakeProc)),
        ["stall"]
    );
}

/// Issue 18, item 3: an idle `multiprocessing.Pool` child of a worker
/// reads its task pipe for as long as no task comes: idle, not stalled.
#[test]
fn a_workers_child_waiting_for_work_is_not_stalled() {
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    let child = scanned(300, Role::Child);
    c.add_process(0, child);
    let read = Sample {
        tgid: 300,
        ..sample(300, "read", 0, 1)
    };
    c.on_sockets(
        &[fixtures::unanswered(101_001, 900)],
        &[],
        1000 * MS,
        &mut FakeProc,
    );
    assert!(c.on_samples(&[read], 5000 * MS, &mut FakeProc).is_empty());
    assert!(verdict(&c.summary(5000 * MS)).text.starts_with("healthy"));
    // One holding a client's request it has not answered is a stall.
    c.on_sockets(
        &[fixtures::unanswered(300_001, 2000)],
        &[],
        2000 * MS,
        &mut FakeProc,
    );
    assert_eq!(
        kinds(&c.on_samples(&[read], 5000 * MS, &mut FakeProc)),
        ["stall"]
    );
}

/// Issue 18, item 6: one story per incident. The request a worker lost
/// when Gunicorn's WORKER TIMEOUT killed it is told with the kill, not as a
/// drop of its own; a drop by a live worker stays a drop.
#[test]
fn requests_lost_with_a_killed_worker_are_told_with_its_death() {
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    let abrt = KernelEvent::Signal {
        ts_ns: 1900 * MS,
        target: W,
        sender: MASTER,
        sender_comm: "gunicorn".into(),
        sig: 6,
    };
    c.on_kernel(abrt, &mut FakeProc);
    let exit = KernelEvent::Exit {
        ts_ns: 1950 * MS,
        pid: W,
        exit_code: None,
        signal: Some(6),
    };
    c.on_kernel(exit, &mut FakeProc);
    c.on_kernel(conn_end(W, 92, 0, EndedBy::Exit), &mut FakeProc);
    let sum = c.summary(3000 * MS);
    let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
    assert_eq!(
        (w.early_closes.dropped_request, w.early_closes.lost_at_exit),
        (1, 1)
    );
    let text = verdict(&sum).text;
    assert!(
        text.contains("WORKER TIMEOUT")
            && text.contains("1 request(s) in flight were lost with it")
            && text.contains("(last from 127.0.0.1:40000)"),
        "{text}"
    );
    assert!(!text.contains("dropped 1 request"), "one story: {text}");
    // A live worker's drop is not a death's.
    let mut c = setup();
    c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
    c.on_kernel(conn_end(W, 92, 0, EndedBy::Close), &mut FakeProc);
    let text = verdict(&c.summary(3000 * MS)).text;
    assert!(text.contains("dropped 1 request"), "{text}");
    assert!(!text.contains("lost with it"), "{text}");
}

/// A request found hung just after Gunicorn's WORKER TIMEOUT signal (its
/// stall already ended by the SIGABRT) said "no thread was seen blocked on
/// an fd (a greenlet or a lock?)": the worker is being killed, and the
/// stall the timeout was blamed on is named.
#[test]
fn a_request_hung_in_a_worker_being_killed_names_the_kill() {
    let hung_text = |abrt: bool| {
        let mut c = setup();
        c.set_loop(0, W, LoopWait::Epoll { epfd: 4 });
        c.set_request_threshold(1000 * MS);
        c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
        if abrt {
            let sig = KernelEvent::Signal {
                ts_ns: 1900 * MS,
                target: W,
                sender: MASTER,
                sender_comm: "gunicorn".into(),
                sig: 6,
            };
            c.on_kernel(sig, &mut FakeProc);
        }
        let out = c.on_sockets(
            &[fixtures::unanswered(101_001, 1500)],
            &[],
            2000 * MS,
            &mut FakeProc,
        );
        let hung = out
            .iter()
            .find(|o| matches!(o, Output::HungRequest { .. }))
            .expect("a hung request");
        crate::present::text_line(hung, &crate::present::Clock::now())
    };
    let killed = hung_text(true);
    assert!(
        killed.contains("being killed by Gunicorn's WORKER TIMEOUT") && killed.contains("read()"),
        "{killed}"
    );
    let alive = hung_text(false);
    assert!(!alive.contains("WORKER TIMEOUT"), "{alive}");
}

/// Issue 20, item 5: a hung request listed every blocked thread of its
/// worker, and each new unanswered socket was looked up at once.
#[test]
fn hung_requests_list_32_threads_and_look_up_8_sockets_a_scan() {
    struct ManyThreads;
    impl Enricher for ManyThreads {
        fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
            fixtures::owner_by_inode(inode, pids)
        }
        fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread> {
            (0..40)
                .flat_map(|i| fixtures::pipe_reader(pid + i))
                .collect()
        }
    }
    let mut c = setup();
    c.set_request_threshold(1000 * MS);
    let socks: Vec<_> = (0..20)
        .map(|i| fixtures::unanswered(101_000 + i, 1500))
        .collect();
    let out = c.on_sockets(&socks, &[], 2000 * MS, &mut ManyThreads);
    let hung: Vec<_> = out
        .iter()
        .filter_map(|o| match o {
            Output::HungRequest { hung, .. } => Some(hung),
            _ => None,
        })
        .collect();
    assert_eq!(hung.len(), 8, "8 looked up this scan");
    assert_eq!(hung[0].blocked_threads.len(), 32);
    assert_eq!(hung[0].blocked_threads_omitted, 8);
    let line = crate::present::text_line(&out[0], &crate::present::Clock::now());
    assert!(line.contains("and 8 more"), "{line}");
    // The rest at the next scans.
    let out = c.on_sockets(&socks, &[], 2500 * MS, &mut ManyThreads);
    assert_eq!(out.len(), 8);
    let out = c.on_sockets(&socks, &[], 3000 * MS, &mut ManyThreads);
    assert_eq!(out.len(), 4);
}

/// A request on worker W's socket (inode W * 1000), unanswered 3 s.
fn hung_sock() -> crate::model::SockSnapshot {
    crate::model::SockSnapshot {
        inode: u64::from(W) * 1000,
        local_port: 8000,
        peer: "127.0.0.1:41000".into(),
        has_info: true,
        last_data_recv_ms: 3000,
        last_data_sent_ms: 3001,
        bytes_received: 80,
        ..Default::default()
    }
}

fn hung_ends(out: &[Output]) -> Vec<crate::model::HungOutcome> {
    out.iter()
        .filter_map(|o| match o {
            Output::HungRequestEnd { outcome, .. } => Some(*outcome),
            _ => None,
        })
        .collect()
}

#[test]
fn a_failed_scan_ends_no_hung_request_and_a_vanished_one_is_not_called_answered() {
    use crate::model::HungOutcome;
    let mut c = setup();
    c.set_request_threshold(2000 * MS);
    let out = c.on_sockets(&[hung_sock()], &[], 5000 * MS, &mut FakeProc);
    assert_eq!(kinds(&out), ["hung_request"]);
    // W's namespace could not be scanned: its socket's absence says nothing.
    let out = c.on_sockets(&[], &[W], 5500 * MS, &mut FakeProc);
    assert!(out.is_empty(), "{out:?}");
    // Scanned, and gone with no early close and no acknowledged answer
    // seen: the ending is not known.
    let out = c.on_sockets(&[], &[], 6000 * MS, &mut FakeProc);
    assert_eq!(hung_ends(&out), [HungOutcome::Unknown]);
    assert!(
        !verdict(&c.summary(6000 * MS)).text.contains("answered"),
        "{}",
        verdict(&c.summary(6000 * MS)).text
    );
}

#[test]
fn a_hung_request_is_answered_when_the_client_acknowledged_bytes() {
    use crate::model::HungOutcome;
    let mut c = setup();
    c.set_request_threshold(2000 * MS);
    c.on_sockets(&[hung_sock()], &[], 5000 * MS, &mut FakeProc);
    let answered = crate::model::SockSnapshot {
        bytes_acked: 150,
        last_data_sent_ms: 10,
        ..hung_sock()
    };
    let out = c.on_sockets(&[answered], &[], 5500 * MS, &mut FakeProc);
    assert_eq!(hung_ends(&out), [HungOutcome::Answered]);
}
