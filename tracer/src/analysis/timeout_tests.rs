//! The correlator's tests of one WORKER TIMEOUT, one event (issue 23
//! item 5): Gunicorn's SIGKILL after its own SIGABRT is the same timeout,
//! on the fakes of `tests`.
use super::tests::{FakeProc, abort_from_master, kinds, sample, setup};
use crate::model::{KernelEvent, Output};

use super::fixtures::{MASTER, MS, W};

fn kill_from_master(ts_ms: u64) -> KernelEvent {
    KernelEvent::Signal {
        ts_ns: ts_ms * MS,
        target: W,
        sender: MASTER,
        sender_comm: "gunicorn".into(),
        sig: 9,
    }
}

/// Issue 23 item 5: a worker that blocks SIGABRT gets Gunicorn's SIGKILL
/// on a later tick. One WORKER TIMEOUT: one event, the escalation in it,
/// and the exit still the timeout's.
#[test]
fn a_timeout_escalated_to_sigkill_is_one_event_that_says_so() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    assert!(
        c.on_kernel(abort_from_master(4500), &mut FakeProc)
            .is_empty()
    );
    let out = c.on_kernel(kill_from_master(5520), &mut FakeProc);
    let [
        Output::WorkerTimeout {
            signal,
            escalated_to: Some(to),
            escalated_after_ms: Some(1020),
            stall: Some(s),
            ..
        },
    ] = &out[..]
    else {
        panic!("{out:?}")
    };
    assert_eq!((signal.as_str(), to.as_str()), ("SIGABRT", "SIGKILL"));
    assert_eq!(s.blocked_ms, 4500, "blamed at the SIGABRT");
    let line = crate::present::text_line(&out[0], &crate::present::Clock::now());
    assert!(
        line.contains(
            "sent SIGABRT, then SIGKILL 1.0s later (it did not exit on SIGABRT) to worker"
        ),
        "{line}"
    );
    let exit = KernelEvent::Exit {
        ts_ns: 5530 * MS,
        pid: W,
        exit_code: None,
        signal: Some(9),
    };
    let out = c.on_kernel(exit, &mut FakeProc);
    assert_eq!(
        kinds(&out),
        ["stall_end", "worker_exit"],
        "no second timeout"
    );
    let Output::WorkerExit { why, .. } = &out[1] else {
        panic!("{out:?}")
    };
    assert_eq!(why.cause, crate::model::ExitCause::WorkerTimeout);
    assert!(c.flush_timeouts().is_empty());
    let sum = c.summary(6000 * MS);
    let w = sum.workers.iter().find(|w| w.pid == W).unwrap();
    assert_eq!(w.timeouts, 1);
}

/// A worker that exits on SIGABRT: one event, no escalation said; a
/// SIGKILL from someone else afterwards is not one either.
#[test]
fn a_timeout_the_worker_obeys_is_one_event_not_escalated() {
    let mut c = setup();
    c.on_samples(&[sample(W, "read", 0, 1)], 600 * MS, &mut FakeProc);
    assert!(
        c.on_kernel(abort_from_master(4500), &mut FakeProc)
            .is_empty()
    );
    let other = KernelEvent::Signal {
        ts_ns: 4510 * MS,
        target: W,
        sender: 4242,
        sender_comm: "kill".into(),
        sig: 9,
    };
    assert!(c.on_kernel(other, &mut FakeProc).is_empty());
    let exit = KernelEvent::Exit {
        ts_ns: 4520 * MS,
        pid: W,
        exit_code: Some(1),
        signal: None,
    };
    let out = c.on_kernel(exit, &mut FakeProc);
    assert_eq!(kinds(&out), ["worker_timeout", "stall_end", "worker_exit"]);
    assert!(matches!(
        &out[0],
        Output::WorkerTimeout {
            escalated_to: None,
            escalated_after_ms: None,
            ..
        }
    ));
    let line = crate::present::text_line(&out[0], &crate::present::Clock::now());
    assert!(line.contains("sent SIGABRT to worker"), "{line}");
    assert!(!line.contains("then SIGKILL"), "{line}");
    // A SIGKILL with no SIGABRT seen before it (the tracer attached in
    // between) is told at once, as the timeout's first signal.
    let mut c = setup();
    let out = c.on_kernel(kill_from_master(5000), &mut FakeProc);
    assert!(matches!(
        &out[..],
        [Output::WorkerTimeout { signal, escalated_to: None, .. }] if signal == "SIGKILL"
    ));
}
