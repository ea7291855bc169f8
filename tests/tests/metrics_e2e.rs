//! The Prometheus endpoint during a real stall: scraped while a Gunicorn
//! gevent worker is hung in multiprocessing.Queue.get().
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use tests::*;

/// The value of the first sample line starting with `series` (name and
/// the labels that must appear in it).
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with('{'))
        .find(|l| labels.iter().all(|lb| l.contains(lb)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn raw(port: u16, request: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(request).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn metrics_show_the_stalled_worker_and_forget_it_when_it_dies() {
    require_root();
    let pids = HangPids::new("metrics");
    let g = Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .workers(2)
        .timeout(60)
        .env("HANG_PID_FILE", pids.path())
        .spawn();
    let (master, port) = (g.pid(), g.port);
    let mport = free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let mut t = Tracer::start(&["--pid", &master.to_string(), "--metrics-addr", &maddr]);

    assert!(raw(mport, b"GET /healthz HTTP/1.0\r\n\r\n").ends_with("ok\n"));
    assert!(raw(mport, b"POST /metrics HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 405"));
    assert!(raw(mport, b"GET /other HTTP/1.0\r\n\r\n").starts_with("HTTP/1.1 404"));
    let huge = format!("GET /metrics HTTP/1.0\r\nX: {}\r\n\r\n", "a".repeat(10_000));
    assert!(raw(mport, huge.as_bytes()).starts_with("HTTP/1.1 431"));

    // Reads that block the hub ~50 ms land in the kernel's histograms.
    for _ in 0..3 {
        assert!(get(port, "/blockread").ends_with("read\n"));
    }
    let text = eventually("blocking reads in /metrics", Duration::from_secs(5), || {
        let t = get(mport, "/metrics");
        let n: f64 = t
            .lines()
            .filter(|l| {
                l.starts_with("gunicorn_tracer_worker_blocking_read_seconds_count{")
                    && l.contains(r#"fd_kind="pipe""#)
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum();
        (n >= 3.0).then_some(t)
    });
    let b32 = text
        .lines()
        .filter(|l| {
            l.starts_with("gunicorn_tracer_worker_blocking_read_seconds_bucket{")
                && l.contains(r#"fd_kind="pipe",le="0.032""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    let binf = text
        .lines()
        .filter(|l| {
            l.starts_with("gunicorn_tracer_worker_blocking_read_seconds_bucket{")
                && l.contains(r#"fd_kind="pipe",le="+Inf""#)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>();
    assert!(
        binf >= 3.0 && b32 < binf,
        "the ~50 ms reads sit above the 32 ms bound: {text}"
    );

    let _client = get_async(port, "/hang", Duration::from_secs(30));
    let victim = pids.wait_nth(0);
    t.wait_for("stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == victim
    });
    let w = format!("worker_pid=\"{victim}\"");
    let m = format!("master_pid=\"{master}\"");
    // The text is re-rendered every second; wait until it shows the stall
    // for at least 1.5 s.
    let text = eventually("stalled in /metrics", Duration::from_secs(5), || {
        let t = get(mport, "/metrics");
        (sample(&t, "gunicorn_tracer_worker_blocked_seconds", &[&w])? >= 1.5).then_some(t)
    });
    assert_eq!(
        sample(&text, "gunicorn_tracer_worker_stalled", &[&w, &m]),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gunicorn_tracer_worker_stalls_total", &[&w]),
        Some(1.0),
        "{text}"
    );
    let hb = sample(&text, "gunicorn_tracer_worker_heartbeat_age_seconds", &[&w]).unwrap();
    assert!(hb >= 1.0, "the hung worker's heartbeat is old: {hb}");
    assert!(text.contains(r#"app="hang_app:app""#), "{text}");
    // The other worker is healthy, with a fresh heartbeat.
    let other = text
        .lines()
        .find(|l| l.starts_with("gunicorn_tracer_worker_stalled{") && !l.contains(&w))
        .expect("a second worker");
    assert!(other.ends_with(" 0"), "{other}");
    assert!(
        text.contains("gunicorn_tracer_events_lost_total 0"),
        "{text}"
    );
    assert_eq!(
        sample(&text, "gunicorn_tracer_map_entries", &[r#"map="watched""#]),
        Some(3.0),
        "{text}"
    );

    // The worker dies: its series leave the endpoint.
    unsafe { libc::kill(victim as i32, libc::SIGKILL) };
    t.wait_for("worker_exit", Duration::from_secs(5), |e| {
        e["event"] == "worker_exit" && e["pid"] == victim
    });
    let text = eventually("victim gone from /metrics", Duration::from_secs(5), || {
        let t = get(mport, "/metrics");
        (!t.contains(&w)).then_some(t)
    });
    assert!(
        text.contains("gunicorn_tracer_stall_duration_seconds_count{fd_kind=\"pipe\"} 1"),
        "{text}"
    );
    t.stop();
}

#[test]
fn a_metrics_address_in_use_is_a_one_line_error() {
    require_root();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = busy.local_addr().unwrap().to_string();
    let (code, out, err) = run_tracer(&["watch", "--pid", "1", "--metrics-addr", &addr]);
    assert_ne!(code, 0);
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("cannot serve metrics") && err.contains(&addr),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
}
