//! `cargo xtask demo`: the article's first lesson, live. A Gunicorn + gevent
//! app whose /hang endpoint uses multiprocessing.Queue in a request; the
//! tracer names the stalled worker before Gunicorn's WORKER TIMEOUT.
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use tests::{Gunicorn, Proc};

use crate::step;

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum Scenario {
    Stall,
    EarlyClose,
}

/// Gunicorn with the tests' command line, in its own process group so that
/// dropping it stops its workers too; its log goes where `stderr` says.
fn spawn_gunicorn(g: &Gunicorn, stderr: Stdio) -> Proc {
    Proc::spawn(g.command().stdout(Stdio::null()).stderr(stderr))
}

/// `tracer watch --pid MASTER`, text on the demo's terminal.
fn start_tracer(tracer: &Path, master: u32) -> Result<std::process::Child> {
    Command::new(tracer)
        .args(["watch", "--pid", &master.to_string()])
        .stdin(Stdio::null())
        .spawn()
        .context("starting the tracer")
}

/// SIGINT, as a person would press Ctrl-C: the tracer prints its summary.
fn stop_tracer(mut tr: std::process::Child) -> Result<()> {
    step("stopping the tracer (SIGINT): its summary puts the verdict first");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(tr.id() as i32, libc::SIGINT) };
    let status = tr.wait()?;
    if !status.success() {
        anyhow::bail!("the tracer exited with {status}");
    }
    Ok(())
}

pub fn run(tracer: &Path, timeout: u32) -> Result<()> {
    let g = Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .workers(3)
        .timeout(timeout);
    let port = g.port();
    step(&format!(
        "starting Gunicorn: 3 gevent workers, --timeout {timeout}, tests/apps/hang_app.py on 127.0.0.1:{port}"
    ));
    let mut gunicorn = spawn_gunicorn(&g, Stdio::piped());
    let master = gunicorn.pid();
    let (tx, rx) = channel::<String>();
    let log = gunicorn.child.stderr.take().expect("piped");
    std::thread::spawn(move || {
        for line in BufReader::new(log).lines().map_while(Result::ok) {
            eprintln!("    gunicorn | {line}");
            let _ = tx.send(line);
        }
    });
    let ready =
        |rx: &std::sync::mpsc::Receiver<String>, needle: &str, n: usize, within: Duration| {
            let deadline = Instant::now() + within;
            let mut seen = 0;
            while let Ok(l) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                if l.contains(needle) {
                    seen += 1;
                    if seen >= n {
                        return true;
                    }
                }
            }
            false
        };
    let result = (|| -> Result<()> {
        if !ready(&rx, "Booting worker", 3, Duration::from_secs(30)) {
            anyhow::bail!("gunicorn did not boot 3 workers within 30s (see its log above)");
        }
        step(&format!(
            "starting the tracer on master {master}: tracer watch --pid {master}"
        ));
        let tr = start_tracer(tracer, master)?;
        std::thread::sleep(Duration::from_secs(2));
        step("sending GET /hang: the request calls multiprocessing.Queue.get() under gevent");
        std::thread::spawn(move || {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
                let _ = write!(
                    s,
                    "GET /hang HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n"
                );
                let mut sink = Vec::new();
                let _ = s.read_to_end(&mut sink);
            }
        });
        eprintln!(
            "    watch for the tracer's STALL line, then Gunicorn's own [CRITICAL] WORKER TIMEOUT about {timeout}s later"
        );
        let respawned = ready(
            &rx,
            "WORKER TIMEOUT",
            1,
            Duration::from_secs(timeout as u64 + 20),
        ) && ready(&rx, "Booting worker", 1, Duration::from_secs(20));
        std::thread::sleep(Duration::from_secs(2));
        if !respawned {
            eprintln!("    (Gunicorn did not time the worker out as expected; stopping anyway)");
        }
        stop_tracer(tr)
    })();
    drop(gunicorn);
    step("demo done; gunicorn stopped");
    result
}

/// Lesson 2: nginx in front of a Gunicorn that behaves like < 19.8. While
/// /rpc leaks socket.setdefaulttimeout(0.5), slow uploads accepted by the
/// same worker time out; Gunicorn closes them with nothing sent and nginx
/// answers 502. The tracer names the worker, the connections and the cause.
pub fn early_close(tracer: &Path) -> Result<()> {
    let g = Gunicorn::new("leak_app:app")
        .worker_class("old_worker.OldGeventWorker")
        .workers(1);
    let port = g.port();
    step(&format!(
        "starting Gunicorn with a pre-19.8 gevent worker (tests/apps/old_worker.py), tests/apps/leak_app.py on 127.0.0.1:{port}"
    ));
    let gunicorn = spawn_gunicorn(&g, Stdio::null());
    let master = gunicorn.pid();
    let result = (|| -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                anyhow::bail!("gunicorn did not listen on {port} within 30s");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let nginx = tests::Nginx::start(port);
        step(&format!(
            "nginx on 127.0.0.1:{} in front of it; starting the tracer: tracer watch --pid {master}",
            nginx.port
        ));
        let tr = start_tracer(tracer, master)?;
        std::thread::sleep(Duration::from_secs(2));
        step("normal traffic: 5 GETs and a slow upload through nginx");
        for _ in 0..5 {
            let _ = tests::get(nginx.port, "/");
        }
        let _ = tests::slow_upload(nginx.port, Duration::from_millis(800));
        step(
            "GET /rpc: a library sets socket.setdefaulttimeout(0.5) for 3 s; 3 slow uploads arrive meanwhile",
        );
        let np = nginx.port;
        let rpc = tests::get_async(np, "/rpc", Duration::from_secs(20));
        std::thread::sleep(Duration::from_millis(300));
        let ups: Vec<_> = (0..3)
            .map(|_| std::thread::spawn(move || tests::slow_upload(np, Duration::from_secs(1))))
            .collect();
        for u in ups {
            let _ = u.join();
        }
        let _ = rpc.recv();
        std::thread::sleep(Duration::from_secs(1));
        let statuses = nginx.statuses();
        eprintln!(
            "    nginx | access log statuses: {}",
            statuses
                .iter()
                .map(|s| s.to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
        stop_tracer(tr)
    })();
    drop(gunicorn);
    step("demo done; gunicorn and nginx stopped");
    result
}
