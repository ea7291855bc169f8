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

/// The tracer attached 0.2 s before Gunicorn's SIGABRT (seen on 6.1 under
/// emulation, where the attach takes seconds): it did not watch the timeout
/// window, so "no stall was seen in the timeout window" would be false. The
/// event, its line, the early close and the verdict say how long it
/// watched; a worker watched for the whole window keeps the plain wording.
#[test]
fn a_timeout_soon_after_the_attach_says_the_window_was_not_watched() {
    let told = |abort_ms: u64| {
        let mut c = setup();
        assert!(
            c.on_kernel(abort_from_master(abort_ms), &mut FakeProc)
                .is_empty()
        );
        let exit = KernelEvent::Exit {
            ts_ns: (abort_ms + 10) * MS,
            pid: W,
            exit_code: Some(1),
            signal: None,
        };
        let out = c.on_kernel(exit, &mut FakeProc);
        let line = crate::present::text_line(&out[0], &crate::present::Clock::now());
        let watched = match &out[0] {
            Output::WorkerTimeout {
                watched_ms, stall, ..
            } => {
                assert!(stall.is_none());
                *watched_ms
            }
            o => panic!("{o:?}"),
        };
        let verdict = super::tests::verdict(&c.summary((abort_ms + 20) * MS)).text;
        (watched, line, verdict)
    };
    let (watched, line, verdict) = told(200);
    assert_eq!(watched, Some(200));
    assert!(
        line.contains("the tracer had watched it only 0.2s, less than its --timeout window; no stall was seen then, and what held it before was not seen"),
        "{line}"
    );
    assert!(!line.contains("in the timeout window"), "{line}");
    assert!(
        verdict.contains("the tracer had watched it only 0.2s, less than its --timeout window: its cause was not seen"),
        "{verdict}"
    );
    // Its --timeout is known (4 s): nothing says it is not.
    assert!(
        !line.contains("is not known") && !verdict.contains("is not known"),
        "{line} {verdict}"
    );
    // Watched for more than its 4 s --timeout: the whole window was seen.
    let (watched, line, verdict) = told(4500);
    assert_eq!(watched, None);
    assert!(
        line.contains("no stall of its loop thread was seen in the timeout window"),
        "{line}"
    );
    assert!(
        !line.contains("only") && !verdict.contains("only"),
        "{line} {verdict}"
    );
}

/// The master's --timeout could not be read (its settings unreadable): how
/// long the tracer watched is all it knows, so nothing may compare it with
/// the timeout window. The event carries no timeout, and the line, the
/// verdict and a request lost at the kill say the comparison is unknown.
#[test]
fn a_timeout_whose_window_is_not_known_claims_no_comparison() {
    use super::tests::scanned;
    use crate::model::Role;
    let mut c = super::Correlator::new(500 * MS);
    c.add_process(0, scanned(MASTER, Role::Master));
    c.add_process(
        0,
        super::NewProcess {
            timeout_s: None,
            ..scanned(W, Role::Worker)
        },
    );
    assert!(
        c.on_kernel(abort_from_master(9000), &mut FakeProc)
            .is_empty()
    );
    let exit = KernelEvent::Exit {
        ts_ns: 9010 * MS,
        pid: W,
        exit_code: Some(1),
        signal: None,
    };
    let out = c.on_kernel(exit, &mut FakeProc);
    let Output::WorkerTimeout {
        watched_ms,
        gunicorn_timeout_s,
        ..
    } = &out[0]
    else {
        panic!("{out:?}")
    };
    assert_eq!((*watched_ms, *gunicorn_timeout_s), (Some(9000), None));
    let line = crate::present::text_line(&out[0], &crate::present::Clock::now());
    let verdict = super::tests::verdict(&c.summary(9020 * MS)).text;
    for said in [&line, &verdict] {
        assert!(!said.contains("less than its --timeout"), "{said}");
        assert!(!said.contains("in the timeout window"), "{said}");
        assert!(
            said.contains(
                "no stall was seen in the 9.0s the tracer watched it; its --timeout is not known"
            ),
            "{said}"
        );
    }
}
