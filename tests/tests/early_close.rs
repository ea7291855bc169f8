//! Integration tests of early-close detection: real BPF programs watching
//! real loopback TCP endpoints (tests/apps/tcp_server.py), one behaviour
//! each, driven by a client in the test process.
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::Duration;

use tests::*;

const REQUEST: &[u8] = b"GET / HTTP/1.0\r\n\r\n";

/// Starts `tcp_server.py MODE [ARGS]`; returns the process and its port.
fn server(mode: &str) -> (Proc, u16) {
    tcp_server(&mode.split_whitespace().collect::<Vec<_>>())
}

/// One client connection: sends the request (unless `send` is false) and
/// reads until the server closes. Returns the client's local port.
fn hit(port: u16, send: bool) -> u16 {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let local = c.local_addr().unwrap().port();
    if send {
        c.write_all(REQUEST).unwrap();
    }
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    local
}

#[test]
fn each_way_a_connection_ends_gives_exactly_the_right_event() {
    require_root();
    let (drop_srv, drop_port) = server("drop");
    let (reply_srv, reply_port) = server("reply");
    let (idle_srv, idle_port) = server("idle");
    let (shut_srv, shut_port) = server("shutdown");
    let (mut exit_srv, exit_port) = server("exit");
    let pids =
        [&drop_srv, &reply_srv, &idle_srv, &shut_srv, &exit_srv].map(|p| p.pid().to_string());
    let mut args = Vec::new();
    for p in &pids {
        args.extend(["--pid", p.as_str()]);
    }
    let mut t = Tracer::start(&args);

    let drop_client = hit(drop_port, true);
    let reply_client = hit(reply_port, true);
    let idle_client = hit(idle_port, false);
    let shut_client = hit(shut_port, true);
    let exit_client = hit(exit_port, true);
    eventually("exit server gone", Duration::from_secs(5), || {
        exit_srv.child.try_wait().ok().flatten()
    });

    t.wait_count("early closes", 4, Duration::from_secs(5), |e| {
        e["event"] == "early_close"
    });
    t.collect_for(Duration::from_millis(500));
    let closes: Vec<&Value> = t.of_kind("early_close");
    assert_eq!(
        closes.len(),
        4,
        "drop, idle, shutdown and exit; none for the reply: {closes:#?}"
    );
    let by_pid = |pid: u32| -> &Value {
        let found: Vec<&&Value> = closes.iter().filter(|e| e["pid"] == pid).collect();
        assert_eq!(
            found.len(),
            1,
            "exactly one event for pid {pid}: {closes:#?}"
        );
        found[0]
    };
    let req_len = REQUEST.len() as u64;

    let e = by_pid(drop_srv.pid());
    assert_eq!(e["direction"], "inbound");
    assert_eq!(e["kind"], "dropped_request");
    assert_eq!(e["ended_by"], "close");
    assert_eq!(e["peer"], format!("127.0.0.1:{drop_client}"));
    assert_eq!(e["local_port"], drop_port);
    assert_eq!(e["bytes_in"], req_len);
    assert_eq!(e["bytes_out"], 0);

    let e = by_pid(idle_srv.pid());
    assert_eq!(e["kind"], "idle");
    assert_eq!(e["bytes_in"], 0);
    assert_eq!(e["peer"], format!("127.0.0.1:{idle_client}"));
    assert!(e["lifetime_ms"].as_u64().unwrap() >= 250, "{e}");

    let e = by_pid(shut_srv.pid());
    assert_eq!(e["kind"], "dropped_request");
    assert_eq!(
        e["ended_by"], "shutdown",
        "reported at shutdown, not again at close"
    );
    assert_eq!(e["peer"], format!("127.0.0.1:{shut_client}"));

    let e = by_pid(exit_srv.pid());
    assert_eq!(e["kind"], "dropped_request");
    assert_eq!(e["ended_by"], "exit");
    assert_eq!(e["peer"], format!("127.0.0.1:{exit_client}"));
    assert_eq!(e["bytes_in"], req_len);
    assert_eq!(
        e["local_port"], exit_port,
        "from the listener, though the process is gone"
    );

    assert!(
        closes.iter().all(|e| e["pid"] != reply_srv.pid()),
        "the answered connection is not an early close"
    );
    assert!(
        closes
            .iter()
            .all(|e| e["peer"] != format!("127.0.0.1:{reply_client}")),
        "no event about the answered client"
    );

    let summary = t.stop();
    let mut dropping: Vec<u64> = summary["verdict"]["dropping_pids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap())
        .collect();
    dropping.sort();
    let mut expect = vec![
        drop_srv.pid() as u64,
        shut_srv.pid() as u64,
        exit_srv.pid() as u64,
    ];
    expect.sort();
    assert_eq!(dropping, expect, "{summary}");
    let rows = summary["workers"].as_array().unwrap();
    let idle_row = rows.iter().find(|w| w["pid"] == idle_srv.pid()).unwrap();
    assert_eq!(idle_row["early_closes"]["idle"], 1);
    assert_eq!(idle_row["early_closes"]["dropped_request"], 0);
}

#[test]
fn an_outbound_call_closed_before_any_reply_is_an_upstream_cut() {
    require_root();
    // A server in the test process that reads and never answers.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for c in listener.incoming().flatten() {
            held.push(c);
        }
    });
    let go = GoFile::new("upstream");
    let mut cmd = Command::new(python());
    cmd.arg(apps_dir().join("tcp_server.py"))
        .args(["client", &port.to_string(), go.path().to_str().unwrap()])
        .stdout(Stdio::null());
    // The client waits for `go`, so the tracer is attached before it connects.
    let client = Proc::spawn(&mut cmd);
    let pid = client.pid();
    let mut t = Tracer::start(&["--pid", &pid.to_string()]);
    go.release();
    let (_, e) = t.wait_for("upstream cut", Duration::from_secs(5), |e| {
        e["event"] == "early_close"
    });
    assert_eq!(e["pid"], pid);
    assert_eq!(e["direction"], "outbound");
    assert_eq!(e["kind"], "upstream_cut");
    assert_eq!(e["peer"], format!("127.0.0.1:{port}"));
    assert_eq!(e["bytes_out"], REQUEST.len() as u64);
    assert_eq!(e["bytes_in"], 0);
    assert!(
        e["local_port"].as_u64().unwrap() > 0,
        "local port seen at connect: {e}"
    );
    t.stop();
}

#[test]
fn a_connection_opened_before_the_tracer_attached_is_judged_in_full() {
    require_root();
    let go = GoFile::new("hold");
    let (mut srv, port) = server(&format!("hold {}", go.path().display()));
    // Connected and request sent (and read by the server) before attach.
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(REQUEST).unwrap();
    srv.wait_line("read", Duration::from_secs(5));
    let mut t = Tracer::start(&["--pid", &srv.pid().to_string()]);
    go.release();
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    let (_, e) = t.wait_for("early close", Duration::from_secs(5), |e| {
        e["event"] == "early_close"
    });
    assert_eq!(e["kind"], "dropped_request", "{e}");
    // The kernel's own counters: the bytes read before the attach count.
    assert_eq!(e["bytes_in"], REQUEST.len() as u64, "{e}");
    assert_eq!(e["bytes_out"], 0, "{e}");
    assert_eq!(e["local_port"], port, "{e}");
    assert_eq!(e["lifetime_ms"], Value::Null, "its start was not seen: {e}");
    t.stop();
}

/// `preceded_by` needs `sock:sock_recv_length` (Linux 6.3; Debian 12's 6.1
/// lacks it): a kernel without it says so at start (a note on stderr, the
/// start event, the summary, `/metrics`); a kernel with it says none of it.
/// Which kernel this is comes from its BTF, as the tracer decides.
#[test]
fn preceded_by_is_said_unseen_only_on_a_kernel_without_sock_recv_length() {
    require_root();
    let btf = std::fs::read("/sys/kernel/btf/vmlinux").expect("the kernel's BTF");
    let name = b"\0btf_trace_sock_recv_length\0";
    let has = btf.windows(name.len()).any(|w| w == name);
    let target = Proc::python("import time\ntime.sleep(60)\n");
    let mport = free_port();
    let mut t = Tracer::start(&[
        "--pid",
        &target.pid().to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    let (_, start) = t.wait_for("start", Duration::from_secs(1), |e| e["event"] == "start");
    assert_eq!(start["features_missing"]["preceded_by"], !has, "{start}");
    let metrics = eventually("metrics", Duration::from_secs(5), || {
        let m = get(mport, "/metrics");
        m.contains("feature_available").then_some(m)
    });
    let series = format!(
        r#"gunicorn_tracer_feature_available{{feature="preceded_by"}} {}"#,
        u8::from(has)
    );
    assert!(metrics.contains(&series), "{metrics}");
    let summary = t.stop();
    assert_eq!(summary["features_missing"]["preceded_by"], !has);
    let noted = t
        .stderr_lines
        .iter()
        .any(|l| l.contains("no sock:sock_recv_length tracepoint") && l.contains("preceded_by"));
    assert_eq!(noted, !has, "{:#?}", t.stderr_lines);
}
