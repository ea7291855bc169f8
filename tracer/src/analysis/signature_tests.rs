//! The signatures' unit tests: each cause said with its evidence, and not
//! said without it.
use super::signatures::*;
use crate::model::{
    Cause, CloseKind, Direction, Dying, EarlyClose, End, EndedBy, FdKind, MasterSettings, Peer,
    Preceded, Role, Setting, SettingSource, StallReport, StallState, WaitFd, WorkerClass,
};

fn peer(pid: u32, end: End) -> Peer {
    Peer {
        pid,
        comm: "x".into(),
        fd: 9,
        end,
    }
}

fn stall(syscall: &str, kind: FdKind, count: Option<u64>, peers: Vec<Peer>) -> StallReport {
    StallReport {
        pid: 10,
        tid: 10,
        syscall: Some(syscall.into()),
        fd_kind: kind,
        count,
        peers,
        role: Role::Worker,
        worker_class: Some("gevent".into()),
        ..Default::default()
    }
}

/// Stalls of a worker's loop thread of every shape a signature names,
/// with the class given (None: not known).
fn every_loop_stall(class: Option<WorkerClass>) -> Vec<StallReport> {
    let on_socket = |syscall: &str, peer: &str| StallReport {
        wait_fds: vec![WaitFd {
            fd: 7,
            kind: FdKind::Socket,
            target: None,
            peer: Some(peer.into()),
        }],
        ..stall(syscall, FdKind::Socket, Some(4096), vec![])
    };
    let mut all = vec![
        stall("recvfrom", FdKind::Socket, Some(4096), vec![]),
        stall("poll", FdKind::Unknown, None, vec![]),
        stall("epoll_wait", FdKind::Unknown, None, vec![]),
        stall("clock_nanosleep", FdKind::Unknown, None, vec![]),
        stall("futex", FdKind::Unknown, None, vec![]),
        on_socket("poll", "10.0.0.5:5432"),
        on_socket("recvfrom", "10.0.0.5:6379"),
        on_socket("poll", "10.0.0.5:443"),
    ];
    for state in [StallState::OnCpu, StallState::Busy] {
        all.push(StallReport {
            state,
            syscall: None,
            ..stall("", FdKind::Unknown, None, vec![])
        });
    }
    for s in &mut all {
        s.worker_class = class.clone();
    }
    all
}

/// gevent's advice: monkey-patching, cooperative drivers, greenlets.
fn gevent_advice(c: &Cause) -> bool {
    let text = format!("{} {}", c.cause, c.fix).to_lowercase();
    [
        "monkey-patch",
        "gevent",
        "greenlet",
        "cooperative",
        "psycogreen",
    ]
    .iter()
    .any(|w| text.contains(w))
}

#[test]
fn only_a_gevent_worker_gets_gevent_advice() {
    let gevent = |class: Option<WorkerClass>| -> Vec<String> {
        every_loop_stall(class)
            .iter()
            .filter_map(identify)
            .filter(gevent_advice)
            .map(|c| c.id.to_string())
            .collect()
    };
    // Said when the class is gevent, named or inferred.
    assert!(
        gevent(Some("gevent".into())).len() >= 8,
        "{:?}",
        gevent(Some("gevent".into()))
    );
    let inferred = WorkerClass {
        name: "gevent".into(),
        source: SettingSource::Inferred,
        evidence: Some("gevent's loop is loaded".into()),
    };
    assert!(!gevent(Some(inferred)).is_empty());
    // Not said when the class is not known, or known not to be gevent,
    // or only Gunicorn's default assumed.
    assert_eq!(gevent(None), Vec::<String>::new(), "an unknown class");
    assert_eq!(gevent(Some("sync".into())), Vec::<String>::new(), "sync");
    assert_eq!(
        gevent(Some("gthread".into())),
        Vec::<String>::new(),
        "gthread"
    );
    let assumed = WorkerClass {
        name: "gevent".into(),
        source: SettingSource::Default,
        evidence: None,
    };
    assert_eq!(gevent(Some(assumed)), Vec::<String>::new(), "assumed");
}

#[test]
fn an_unknown_class_still_names_the_server_and_the_cpu() {
    let ids: Vec<&str> = every_loop_stall(None)
        .iter()
        .filter_map(identify)
        .map(|c| c.id)
        .collect();
    for id in [
        "postgresql_wait",
        "redis_wait",
        "https_wait",
        "cpu_bound_request",
        "busy_request",
    ] {
        assert!(ids.contains(&id), "{id} in {ids:?}");
    }
    let pg = identify(&every_loop_stall(None)[5]).unwrap();
    assert!(pg.cause.contains("not known"), "{}", pg.cause);
}

fn id(s: &StallReport) -> Option<&'static str> {
    identify(s).map(|c| c.id)
}

#[test]
fn multiprocessing_queue_signature() {
    let mut s = stall("read", FdKind::Pipe, Some(4), vec![peer(10, End::Write)]);
    s.worker_class = Some("gevent".into());
    assert_eq!(id(&s), Some("multiprocessing_queue_gevent"));
    // The class not known: its feeder may be a real thread, which can
    // write; the claim needs gevent.
    let mut unknown = s.clone();
    unknown.worker_class = None;
    assert_ne!(id(&unknown), Some("multiprocessing_queue_gevent"));
    // Another process could write: not this bug.
    let mut s = stall(
        "read",
        FdKind::Pipe,
        Some(4),
        vec![peer(10, End::Write), peer(11, End::Write)],
    );
    s.worker_class = Some("gevent".into());
    assert_eq!(id(&s), None);
}

fn cause(s: &StallReport) -> String {
    identify(s)
        .map(|c| c.cause.into_owned())
        .unwrap_or_default()
}

#[test]
fn a_self_pipe_read_never_returns_only_when_no_other_thread_can_write_it() {
    let pipe = || {
        stall(
            "read",
            FdKind::Pipe,
            Some(65536),
            vec![peer(10, End::Write)],
        )
    };
    // A sync worker whose thread count is not known: another OS thread
    // of the process may hold the write end and write it.
    let mut sync = pipe();
    sync.worker_class = Some("sync".into());
    assert!(!cause(&sync).contains("never"), "{}", cause(&sync));
    assert!(
        cause(&sync)
            .contains("a pipe only this process writes to; another of its threads must write it"),
        "{}",
        cause(&sync)
    );
    // A pool thread of a gthread worker, even with gevent-like reads.
    let mut pool = pipe();
    pool.worker_class = Some("gthread".into());
    pool.tid = 11;
    assert!(!cause(&pool).contains("never"), "{}", cause(&pool));
    // The class unknown and 4 bytes asked: no "never" either.
    let mut unknown = stall("read", FdKind::Pipe, Some(4), vec![peer(10, End::Write)]);
    unknown.worker_class = None;
    assert!(!cause(&unknown).contains("never"), "{}", cause(&unknown));
    // gevent, on the hub's thread: the writer is a greenlet of the
    // blocked hub.
    let mut gevent = pipe();
    gevent.worker_class = Some("gevent".into());
    assert_eq!(id(&gevent), Some("self_pipe_read"));
    assert!(
        cause(&gevent).contains("can never return"),
        "{}",
        cause(&gevent)
    );
    // A gevent worker's other OS thread: other threads may write.
    let mut gevent_pool = gevent.clone();
    gevent_pool.tid = 11;
    assert!(
        !cause(&gevent_pool).contains("never"),
        "{}",
        cause(&gevent_pool)
    );
    // One thread in the whole process: nothing else can write it.
    let mut alone = sync.clone();
    alone.threads = Some(1);
    assert_eq!(id(&alone), Some("self_pipe_read"));
    assert!(
        cause(&alone).contains("can never return"),
        "{}",
        cause(&alone)
    );
    let mut two = sync.clone();
    two.threads = Some(2);
    assert!(!cause(&two).contains("never"), "{}", cause(&two));
}

#[test]
fn a_futex_before_the_first_heartbeat_is_a_deadlock_only_once_it_outlasts_a_boot() {
    let mut s = stall("futex", FdKind::Unknown, None, vec![]);
    s.never_heartbeated = Some(true);
    s.gunicorn_timeout_s = Some(Setting::new(30.0, SettingSource::CommandLine));
    // Reported at the threshold: a slow boot waits on locks too.
    s.blocked_ms = 500;
    assert_ne!(id(&s), Some("deadlocked_since_fork"));
    assert!(!cause(&s).contains("deadlocked"), "{}", cause(&s));
    assert!(
        cause(&s).contains("waiting on a lock since before its first heartbeat"),
        "{}",
        cause(&s)
    );
    // Still waiting past Gunicorn's --timeout: no boot is allowed that.
    s.blocked_ms = 31_000;
    assert_eq!(id(&s), Some("deadlocked_since_fork"));
    // --timeout unknown: ten seconds are not evidence enough...
    s.gunicorn_timeout_s = None;
    s.blocked_ms = 10_000;
    assert_ne!(id(&s), Some("deadlocked_since_fork"));
    // ...past Gunicorn's default of 30 s they are.
    s.blocked_ms = 30_000;
    assert_eq!(id(&s), Some("deadlocked_since_fork"));
    // A short --timeout still leaves a boot its ten seconds.
    s.gunicorn_timeout_s = Some(Setting::new(2.0, SettingSource::CommandLine));
    s.blocked_ms = 3_000;
    assert_ne!(id(&s), Some("deadlocked_since_fork"));
    // A worker that heartbeated is not in its boot.
    s.blocked_ms = 60_000;
    s.never_heartbeated = Some(false);
    assert_ne!(id(&s), Some("deadlocked_since_fork"));
}

#[test]
fn generic_self_pipe_signature() {
    let mut s = stall("read", FdKind::Pipe, Some(65536), vec![peer(10, End::Both)]);
    s.threads = Some(1);
    assert_eq!(id(&s), Some("self_pipe_read"));
    // No writer at all: the read would return EOF, so this is not it.
    let s = stall("read", FdKind::Pipe, Some(65536), vec![]);
    assert_eq!(id(&s), None);
}

#[test]
fn socket_read_in_worker_signature() {
    let s = stall("recvfrom", FdKind::Socket, Some(4096), vec![]);
    assert_eq!(id(&s), Some("uncooperative_socket_read"));
    let mut plain = s.clone();
    plain.role = Role::Plain;
    assert_eq!(id(&plain), None);
}

fn close(kind: CloseKind, ended_by: EndedBy, wait_ms: Option<u64>) -> EarlyClose {
    EarlyClose {
        direction: if kind == CloseKind::UpstreamCut {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        pid: 1,
        tid: 1,
        master_pid: 1,
        role: Role::Worker,
        fd: Some(3),
        peer: None,
        local_port: None,
        bytes_in: if kind == CloseKind::DroppedRequest {
            80
        } else {
            0
        },
        bytes_out: if kind == CloseKind::UpstreamCut {
            80
        } else {
            0
        },
        suppressed: 0,
        lifetime_ms: Some(0),
        ended_by,
        peer_closed_first: false,
        kind,
        unread_data: false,
        preceded_by: wait_ms.map(|w| Preceded {
            syscall: "recv",
            ret: "EAGAIN",
            wait_ms: w,
        }),
        idle_ms: None,
        keepalive_s: None,
        reset_after_ms: None,
        dying: None,
        cause: None,
        container: None,
    }
}

#[test]
fn close_signatures() {
    let id = |e: &EarlyClose| identify_close(e).map(|c| c.id);
    assert_eq!(
        id(&close(CloseKind::DroppedRequest, EndedBy::Close, Some(500))),
        Some("leaked_socket_timeout")
    );
    assert_eq!(
        id(&close(CloseKind::DroppedRequest, EndedBy::Exit, Some(500))),
        Some("worker_died_mid_request")
    );
    assert_eq!(
        id(&close(CloseKind::DroppedRequest, EndedBy::Close, None)),
        None
    );
    // Closed by the worker's own teardown after Gunicorn's SIGABRT: it
    // died mid-request, even though a read had found nothing before.
    let dying = EarlyClose {
        dying: Some(Dying::WorkerTimeout {
            signal: "SIGABRT".into(),
            stall: None,
            watched_ms: None,
            timeout_known: true,
        }),
        ..close(CloseKind::DroppedRequest, EndedBy::Close, Some(5000))
    };
    assert_eq!(id(&dying), Some("worker_timeout_mid_request"));
    // Chosen by the OOM killer: its kill, not a timeout, explains it.
    let oom = EarlyClose {
        dying: Some(Dying::OomKill),
        ..close(CloseKind::DroppedRequest, EndedBy::Exit, None)
    };
    assert_eq!(id(&oom), Some("oom_killed_mid_request"));
    assert_eq!(
        id(&close(CloseKind::UpstreamCut, EndedBy::Close, Some(100))),
        Some("upstream_timeout")
    );
    // An idle keep-alive connection closed by Gunicorn's timer is normal.
    assert_eq!(
        id(&close(CloseKind::Idle, EndedBy::Close, Some(2000))),
        None
    );
}

fn leaked(e: &EarlyClose, settings: &MasterSettings) -> Option<Cause> {
    identify_close_with(e, settings).filter(|c| c.id == "leaked_socket_timeout")
}

#[test]
fn a_leaked_socket_timeout_needs_a_drop_by_the_worker_after_a_wait_no_setting_makes() {
    let unknown = MasterSettings::default();
    let timed_out = close(CloseKind::DroppedRequest, EndedBy::Close, Some(500));
    let c = leaked(&timed_out, &unknown).expect("the leak's evidence");
    // The version was not read: no claim about it, no upgrade advice.
    assert!(!c.cause.contains("older than 19.8"), "{c:?}");
    assert!(!c.fix.contains("upgrade Gunicorn"), "{c:?}");
    // An EAGAIN then the close after about --keep-alive: Gunicorn's
    // keep-alive timer on a request never completed, not a leak.
    for (keepalive, wait) in [(None, 2000), (Some(5.0), 5300), (Some(1.0), 1000)] {
        let ka = MasterSettings {
            keepalive_s: keepalive,
            ..Default::default()
        };
        let e = close(CloseKind::DroppedRequest, EndedBy::Close, Some(wait));
        assert_eq!(leaked(&e, &ka), None, "{keepalive:?} {wait}");
    }
    // The client closed first; nothing was read; the worker was dying;
    // the kernel closed it at the exit; no EAGAIN: not a leak.
    let not = [
        EarlyClose {
            peer_closed_first: true,
            ..timed_out.clone()
        },
        EarlyClose {
            bytes_in: 0,
            ..timed_out.clone()
        },
        EarlyClose {
            dying: Some(Dying::GracefulStop {
                signal: "SIGTERM".into(),
                after_ms: 30_000,
                killed: false,
            }),
            ..timed_out.clone()
        },
        close(CloseKind::DroppedRequest, EndedBy::Exit, Some(500)),
        close(CloseKind::DroppedRequest, EndedBy::Close, None),
    ];
    for e in &not {
        assert_eq!(leaked(e, &unknown), None, "{e:?}");
    }
}

#[test]
fn the_gunicorn_version_is_claimed_only_as_read() {
    let e = close(CloseKind::DroppedRequest, EndedBy::Close, Some(500));
    let old = MasterSettings {
        gunicorn_version: Some((19, 7, 1)),
        ..Default::default()
    };
    let c = leaked(&e, &old).unwrap();
    assert!(
        c.cause.contains("Gunicorn 19.7.1 is older than 19.8"),
        "{c:?}"
    );
    assert!(c.fix.contains("upgrade Gunicorn to 19.8"), "{c:?}");
    let new = MasterSettings {
        gunicorn_version: Some((23, 0, 0)),
        ..Default::default()
    };
    let c = leaked(&e, &new).unwrap();
    assert!(!c.cause.contains("older than 19.8"), "{c:?}");
    assert!(!c.fix.contains("upgrade Gunicorn"), "{c:?}");
}

#[test]
fn lock_sleep_and_futex_signatures() {
    assert_eq!(
        id(&stall("flock", FdKind::File, None, vec![])),
        Some("file_lock_wait")
    );
    assert_eq!(
        id(&stall("fcntl", FdKind::File, None, vec![])),
        Some("file_lock_wait")
    );
    assert_eq!(
        id(&stall("clock_nanosleep", FdKind::Unknown, None, vec![])),
        Some("unpatched_sleep")
    );
    assert_eq!(
        id(&stall("futex", FdKind::Unknown, None, vec![])),
        Some("os_thread_lock")
    );
}

/// A request lost at a WORKER TIMEOUT that came soon after the attach: the
/// cause does not claim the window was watched (issue 23, seen on 6.1).
#[test]
fn a_request_lost_at_a_timeout_soon_after_the_attach_does_not_claim_the_window() {
    for (watched_ms, said) in [(Some(300), true), (None, false)] {
        let e = EarlyClose {
            dying: Some(Dying::WorkerTimeout {
                signal: "SIGABRT".into(),
                stall: None,
                watched_ms,
                timeout_known: true,
            }),
            ..close(CloseKind::DroppedRequest, EndedBy::Close, None)
        };
        let c = identify_close(&e).unwrap();
        assert_eq!(c.id, "worker_timeout_mid_request");
        assert_eq!(
            c.cause.contains("no stall was seen in the 0.3s the tracer watched it before the kill, less than its --timeout window: what held it before the tracer attached was not seen"),
            said,
            "{}",
            c.cause
        );
        assert_eq!(
            c.cause.contains("no stall was seen before the kill ("),
            !said,
            "{}",
            c.cause
        );
        // The timeout is known: nothing says it is not.
        assert!(!c.cause.contains("is not known"), "{}", c.cause);
    }
}

/// A request lost at a WORKER TIMEOUT whose --timeout is not known: how
/// long the tracer watched is said, never compared with the window.
#[test]
fn a_request_lost_at_a_timeout_of_unknown_window_claims_no_comparison() {
    let e = EarlyClose {
        dying: Some(Dying::WorkerTimeout {
            signal: "SIGABRT".into(),
            stall: None,
            watched_ms: Some(9000),
            timeout_known: false,
        }),
        ..close(CloseKind::DroppedRequest, EndedBy::Close, None)
    };
    let c = identify_close(&e).unwrap();
    assert!(!c.cause.contains("less than its --timeout"), "{}", c.cause);
    assert!(
        c.cause.contains("no stall was seen in the 9.0s the tracer watched it before the kill; its --timeout is not known"),
        "{}",
        c.cause
    );
}
