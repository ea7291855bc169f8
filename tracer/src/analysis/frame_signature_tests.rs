//! Causes from the stack: each frame signature said when its frame is on
//! the stack and the wait agrees, and not said when the frame is not there
//! (the port or fd guess then stands, said as inferred).
use super::signatures::identify;
use crate::model::{
    Basis, Cause, End, FdKind, Peer, PyFrame, Role, StallReport, WaitFd, WorkerClass,
};

const LIB: &str = "/venv/lib/python3.11/site-packages";
const STD: &str = "/usr/lib/python3.11";
const APP: &str = "/srv/app/views.py";

fn fr(function: &str, file: &str, line: u32) -> PyFrame {
    PyFrame {
        function: function.into(),
        file: file.into(),
        line: Some(line),
    }
}

/// The app's own frames under a library call: the view, then Gunicorn.
fn app_tail() -> Vec<PyFrame> {
    vec![
        fr("fetch", APP, 42),
        fr(
            "handle_request",
            &format!("{LIB}/gunicorn/workers/base_async.py"),
            110,
        ),
    ]
}

fn with_tail(mut inner: Vec<PyFrame>) -> Vec<PyFrame> {
    inner.extend(app_tail());
    inner
}

/// A blocked loop thread of a worker of `class`.
fn blocked(class: Option<&str>, syscall: &str, kind: FdKind) -> StallReport {
    StallReport {
        pid: 10,
        tid: 10,
        role: Role::Worker,
        syscall: Some(syscall.into()),
        fd_kind: kind,
        worker_class: class.map(WorkerClass::from),
        ..Default::default()
    }
}

/// A wait on one socket to `peer`.
fn on_socket(class: Option<&str>, syscall: &str, peer: Option<&str>) -> StallReport {
    StallReport {
        wait_fds: vec![WaitFd {
            fd: 7,
            kind: FdKind::Socket,
            target: None,
            peer: peer.map(Into::into),
        }],
        ..blocked(class, syscall, FdKind::Socket)
    }
}

fn stacked(s: StallReport, frames: Vec<PyFrame>) -> StallReport {
    StallReport {
        py_stack: Some(frames),
        ..s
    }
}

fn cause(s: &StallReport) -> Cause {
    identify(s).expect("a cause")
}

fn id(s: &StallReport) -> Option<&'static str> {
    identify(s).map(|c| c.id)
}

/// The cause rests on frame `index` of the stack, and its text cites it.
fn cites(c: &Cause, index: usize, function: &str) {
    let e = c.evidence.as_ref().expect("evidence");
    assert_eq!(e.basis, Basis::Frame, "{c:?}");
    let f = e.frame.as_ref().expect("a frame");
    assert_eq!((f.index, f.function.as_str()), (index, function), "{c:?}");
    assert!(c.cause.contains(function), "{}", c.cause);
}

fn is_inferred(c: &Cause) -> bool {
    c.evidence
        .as_ref()
        .is_some_and(|e| e.basis == Basis::Inferred && e.frame.is_none())
}

fn psycopg2_stack() -> Vec<PyFrame> {
    with_tail(vec![fr(
        "RealDictCursor.execute",
        &format!("{LIB}/psycopg2/extras.py"),
        236,
    )])
}

#[test]
fn a_psycopg2_frame_names_the_driver_on_any_port() {
    let s = stacked(
        on_socket(Some("gevent"), "poll", Some("127.0.0.1:15432")),
        psycopg2_stack(),
    );
    let c = cause(&s);
    assert_eq!(c.id, "psycopg2_wait");
    cites(&c, 0, "RealDictCursor.execute");
    assert!(c.cause.contains("127.0.0.1:15432"), "{}", c.cause);
    assert!(
        c.cause
            .contains("called from the app at /srv/app/views.py:42 in fetch")
    );
    assert!(c.fix.contains("psycogreen"), "gevent's fix: {}", c.fix);
    let from = c.evidence.unwrap().called_from.unwrap();
    assert_eq!((from.index, from.line), (1, Some(42)));
    // Not said without the frame: no stack, or a stack without psycopg2.
    let bare = on_socket(Some("gevent"), "poll", Some("127.0.0.1:15432"));
    assert_ne!(id(&bare), Some("psycopg2_wait"));
    let other = stacked(bare.clone(), app_tail());
    assert_ne!(id(&other), Some("psycopg2_wait"));
    // Nor when the wait is not on a socket (a pool's lock).
    let lock = stacked(
        blocked(Some("gevent"), "futex", FdKind::Unknown),
        psycopg2_stack(),
    );
    assert_ne!(id(&lock), Some("psycopg2_wait"));
}

#[test]
fn the_port_rule_stays_as_the_inferred_fallback() {
    let pg = on_socket(Some("sync"), "poll", Some("10.0.0.5:5432"));
    let c = cause(&pg);
    assert_eq!(c.id, "postgresql_wait");
    assert!(is_inferred(&c), "{c:?}");
    // A stack of the app's own code alone (a C driver called from it)
    // does not contradict the port: still inferred.
    let c = cause(&stacked(pg.clone(), app_tail()));
    assert_eq!(c.id, "postgresql_wait");
    assert!(is_inferred(&c));
    // A redis frame on port 5432 is redis, not PostgreSQL.
    let redis = stacked(
        pg,
        with_tail(vec![fr(
            "Connection.read_response",
            &format!("{LIB}/redis/connection.py"),
            500,
        )]),
    );
    let c = cause(&redis);
    assert_eq!(c.id, "redis_wait");
    cites(&c, 0, "Connection.read_response");
    assert!(!c.cause.contains("PostgreSQL"), "{}", c.cause);
}

#[test]
fn getaddrinfo_is_a_dns_lookup_naming_the_resolver_when_the_peer_is_known() {
    let stack = with_tail(vec![
        fr("getaddrinfo", &format!("{STD}/socket.py"), 962),
        fr("create_connection", &format!("{STD}/socket.py"), 827),
    ]);
    let s = stacked(
        on_socket(Some("sync"), "poll", Some("10.0.0.2:53")),
        stack.clone(),
    );
    let c = cause(&s);
    assert_eq!(c.id, "dns_lookup");
    cites(&c, 0, "getaddrinfo");
    assert!(c.cause.contains("resolver 10.0.0.2:53"), "{}", c.cause);
    // The resolver is not named when the wait has no socket peer.
    let s = stacked(blocked(Some("sync"), "poll", FdKind::Unknown), stack);
    let c = cause(&s);
    assert_eq!(c.id, "dns_lookup");
    assert!(c.cause.contains("address was not read"), "{}", c.cause);
    // No getaddrinfo frame (a connect from create_connection): no DNS.
    let connect = stacked(
        on_socket(Some("sync"), "connect", Some("10.0.0.9:8080")),
        with_tail(vec![fr(
            "create_connection",
            &format!("{STD}/socket.py"),
            836,
        )]),
    );
    assert_ne!(id(&connect), Some("dns_lookup"));
}

#[test]
fn each_client_library_is_named_by_its_frame_and_not_without_it() {
    let cases = [
        (
            "redis_wait",
            "redis/connection.py",
            "Connection.read_response",
        ),
        (
            "pymysql_wait",
            "pymysql/connections.py",
            "Connection._read_packet",
        ),
        (
            "http_client_wait",
            "urllib3/connectionpool.py",
            "HTTPConnectionPool._make_request",
        ),
        ("http_client_wait", "requests/sessions.py", "Session.send"),
        (
            "grpc_wait",
            "grpc/_channel.py",
            "_UnaryUnaryMultiCallable.__call__",
        ),
    ];
    for (want, file, function) in cases {
        // Standard-library frames inside it (http.client, socket) come first.
        let stack = with_tail(vec![
            fr("SocketIO.readinto", &format!("{STD}/socket.py"), 706),
            fr("HTTPResponse.begin", &format!("{STD}/http/client.py"), 318),
            fr(function, &format!("{LIB}/{file}"), 100),
        ]);
        let s = stacked(
            on_socket(Some("gthread"), "recvfrom", Some("10.0.0.7:9999")),
            stack,
        );
        let c = cause(&s);
        assert_eq!(c.id, want, "{file}");
        cites(&c, 2, function);
        // Without the frame the port (none known) names nothing of it.
        let bare = stacked(
            on_socket(Some("gthread"), "recvfrom", Some("10.0.0.7:9999")),
            app_tail(),
        );
        assert_ne!(id(&bare), Some(want), "{file}");
    }
}

fn hang_stack() -> Vec<PyFrame> {
    let conn = format!("{STD}/multiprocessing/connection.py");
    vec![
        fr("_recv", &conn, 395),
        fr("_recv_bytes", &conn, 430),
        fr("Connection.recv_bytes", &conn, 216),
        fr(
            "Queue.get",
            &format!("{STD}/multiprocessing/queues.py"),
            103,
        ),
        fr("enqueue_and_wait", "/work/tests/apps/hang_app.py", 22),
        fr("app", "/work/tests/apps/hang_app.py", 31),
    ]
}

/// The seed's hang: a 4-byte read on a pipe only this gevent worker writes.
fn hang_read() -> StallReport {
    StallReport {
        count: Some(4),
        peers: vec![Peer {
            pid: 10,
            comm: "gunicorn".into(),
            fd: 12,
            end: End::Write,
        }],
        ..blocked(Some("gevent"), "read", FdKind::Pipe)
    }
}

#[test]
fn the_queue_get_hang_is_confirmed_by_its_frame() {
    let c = cause(&stacked(hang_read(), hang_stack()));
    assert_eq!(c.id, "multiprocessing_queue_gevent");
    cites(&c, 3, "Queue.get");
    assert!(
        c.cause
            .contains("multiprocessing/queues.py:103 in Queue.get"),
        "{}",
        c.cause
    );
    assert!(
        c.cause.contains("hang_app.py:22 in enqueue_and_wait"),
        "{}",
        c.cause
    );
    // No stack: the guess from the read's shape, said as inferred.
    let c = cause(&hang_read());
    assert_eq!(c.id, "multiprocessing_queue_gevent");
    assert!(is_inferred(&c));
    // A stack without Queue.get contradicts the guess: the pipe is still
    // one only this process writes, but no queue is named.
    let os_read = vec![fr("read_pipe", APP, 7)];
    let c = cause(&stacked(hang_read(), os_read));
    assert_ne!(c.id, "multiprocessing_queue_gevent");
    assert!(!c.cause.contains("Queue"), "{}", c.cause);
    // Another process holds the write end: the get may return.
    let mut shared = hang_read();
    shared.peers[0].pid = 11;
    let c = cause(&stacked(shared, hang_stack()));
    assert_eq!(c.id, "multiprocessing_queue_wait");
    assert!(!c.cause.contains("never"), "{}", c.cause);
}

#[test]
fn threading_waits_cite_the_lock_frame_or_the_caller_of_a_c_lock() {
    let cond = with_tail(vec![
        fr("Condition.wait", &format!("{STD}/threading.py"), 320),
        fr("Event.wait", &format!("{STD}/threading.py"), 622),
    ]);
    let c = cause(&stacked(
        blocked(Some("sync"), "futex", FdKind::Unknown),
        cond,
    ));
    assert_eq!(c.id, "thread_lock_wait");
    cites(&c, 0, "Condition.wait");
    // Lock.acquire is C: the frame that called it is cited.
    let c = cause(&stacked(
        blocked(Some("sync"), "futex", FdKind::Unknown),
        app_tail(),
    ));
    assert_eq!(c.id, "thread_lock_wait");
    cites(&c, 0, "fetch");
    assert!(c.cause.contains("threading.Lock.acquire"), "{}", c.cause);
    // No stack: no lock cause on a sync worker's futex.
    assert_eq!(id(&blocked(Some("sync"), "futex", FdKind::Unknown)), None);
    // A threading frame over a socket read is not a lock wait.
    let s = stacked(
        on_socket(Some("sync"), "recvfrom", None),
        vec![fr("Thread.run", &format!("{STD}/threading.py"), 982)],
    );
    assert_ne!(id(&s), Some("thread_lock_wait"));
}

#[test]
fn a_sleep_cites_its_caller_and_a_library_frame_does_not_make_it_that_library() {
    let c = cause(&stacked(
        blocked(Some("sync"), "clock_nanosleep", FdKind::Unknown),
        app_tail(),
    ));
    assert_eq!(c.id, "time_sleep");
    cites(&c, 0, "fetch");
    // A sleep inside redis' retry: a sleep called from redis, not a wait
    // for Redis.
    let retry = with_tail(vec![fr(
        "Retry.call_with_retry",
        &format!("{LIB}/redis/retry.py"),
        62,
    )]);
    let c = cause(&stacked(
        blocked(Some("sync"), "clock_nanosleep", FdKind::Unknown),
        retry,
    ));
    assert_eq!(c.id, "time_sleep");
    cites(&c, 0, "Retry.call_with_retry");
    assert!(
        c.cause
            .contains("called from the app at /srv/app/views.py:42")
    );
    // A library function named sleep over a socket read is no sleep.
    let s = stacked(
        on_socket(Some("sync"), "recvfrom", None),
        vec![fr("sleep", &format!("{LIB}/mylib/util.py"), 9)],
    );
    assert_ne!(id(&s), Some("time_sleep"));
    // Under gevent, an unpatched sleep: gevent's advice, from the stack.
    let c = cause(&stacked(
        blocked(Some("gevent"), "nanosleep", FdKind::Unknown),
        app_tail(),
    ));
    assert_eq!(c.id, "time_sleep");
    assert!(c.fix.contains("gevent.sleep"), "{}", c.fix);
    // No stack: the kernel's guess (gevent's unpatched sleep), inferred.
    let c = cause(&blocked(Some("gevent"), "nanosleep", FdKind::Unknown));
    assert_eq!(c.id, "unpatched_sleep");
    assert!(is_inferred(&c));
}

/// Python before 3.11 sleeps in `select(0, NULL, NULL, NULL, &t)` (glibc:
/// pselect6 with no fd), not clock_nanosleep: a select with no fd is the
/// sleep; a select with fds (the sync worker's own wait, a client's) is not.
#[test]
fn a_select_with_no_fd_is_the_sleep_of_python_before_3_11() {
    for call in ["select", "pselect6"] {
        let s = StallReport {
            nfds: Some(0),
            worker_class: Some(WorkerClass::from("uvicorn")),
            ..stacked(blocked(Some("uvicorn"), call, FdKind::Unknown), app_tail())
        };
        let c = cause(&s);
        assert_eq!(c.id, "time_sleep", "{call}");
        cites(&c, 0, "fetch");
        assert!(c.fix.contains("asyncio.sleep"), "{}", c.fix);
        // Under gevent, with no stack: the unpatched sleep, inferred.
        let s = StallReport {
            nfds: Some(0),
            ..blocked(Some("gevent"), call, FdKind::Unknown)
        };
        assert_eq!(id(&s), Some("unpatched_sleep"), "{call}");
        // A select on fds is no sleep, with or without a stack.
        let s = StallReport {
            nfds: Some(8),
            ..stacked(blocked(Some("sync"), call, FdKind::Unknown), app_tail())
        };
        assert_ne!(id(&s), Some("time_sleep"), "{call}");
        // nfds not known: not a sleep.
        let s = stacked(blocked(Some("sync"), call, FdKind::Unknown), app_tail());
        assert_ne!(id(&s), Some("time_sleep"), "{call}");
    }
}

#[test]
fn a_grpc_frame_names_a_wait_in_its_c_core() {
    let stack = with_tail(vec![fr(
        "_UnaryUnaryMultiCallable._blocking",
        &format!("{LIB}/grpc/_channel.py"),
        1150,
    )]);
    let c = cause(&stacked(
        blocked(Some("gthread"), "futex", FdKind::Unknown),
        stack.clone(),
    ));
    assert_eq!(c.id, "grpc_wait");
    cites(&c, 0, "_UnaryUnaryMultiCallable._blocking");
    // A sleep under a grpc frame is a sleep.
    let s = stacked(
        blocked(Some("gthread"), "clock_nanosleep", FdKind::Unknown),
        stack,
    );
    assert_eq!(id(&s), Some("time_sleep"));
}

#[test]
fn a_wait_since_before_the_first_heartbeat_is_judged_by_its_timing_first() {
    let s = StallReport {
        never_heartbeated: Some(true),
        blocked_ms: 40_000,
        ..stacked(blocked(Some("sync"), "futex", FdKind::Unknown), app_tail())
    };
    let c = cause(&s);
    assert_eq!(c.id, "deadlocked_since_fork");
    assert!(is_inferred(&c));
}

#[test]
fn an_empty_stack_is_no_stack() {
    let s = stacked(hang_read(), Vec::new());
    let c = cause(&s);
    assert_eq!(c.id, "multiprocessing_queue_gevent");
    assert!(is_inferred(&c));
}
