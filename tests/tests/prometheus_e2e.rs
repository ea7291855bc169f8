//! A real Prometheus (Debian's package) scrapes the real tracer while a
//! real Gunicorn gevent worker stalls in multiprocessing.Queue.get() and is
//! killed by WORKER TIMEOUT: every dashboard query returns a series through
//! Prometheus's HTTP API, and the alert rules (a copy evaluated every
//! second) take GunicornWorkerStalled, then GunicornWorkerTimeout, to firing.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::deploytools::*;
use tests::*;

/// `GET path` over HTTP/1.0 (no chunked encoding): the body.
fn http10(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    let (head, body) = out.split_once("\r\n\r\n")?;
    // Go answers an HTTP/1.0 request as HTTP/1.0.
    let status = head.split_whitespace().nth(1)?;
    (status == "200").then(|| body.to_string())
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus from Debian's package on a free loopback port, with its own
/// data directory; killed (with the directory removed) when dropped.
struct Prometheus {
    port: u16,
    dir: PathBuf,
    _proc: Proc,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        // _proc is killed after this; the directory goes with it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Prometheus {
    fn start(scrape_port: u16) -> Prometheus {
        assert!(
            std::path::Path::new("/usr/bin/prometheus").exists(),
            "prometheus is missing: run `cargo xtask test` (apt-get install prometheus)"
        );
        let dir = std::env::temp_dir().join(format!("tracer-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("data")).unwrap();
        // The rules as shipped, each group evaluated every second.
        let rules = std::fs::read_to_string(workspace_root().join("deploy/prometheus/alerts.yaml"))
            .unwrap();
        let mut rules = yaml_docs(&rules).remove(0);
        for g in rules["groups"].as_array_mut().unwrap() {
            g["interval"] = "1s".into();
        }
        std::fs::write(dir.join("alerts.yaml"), rules.to_string()).unwrap();
        // honor_labels, as the chart's monitors set it.
        let config = serde_json::json!({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [dir.join("alerts.yaml")],
            "scrape_configs": [{
                "job_name": "gunicorn-tracer",
                "honor_labels": true,
                "static_configs": [{"targets": [format!("127.0.0.1:{scrape_port}")]}],
            }],
        });
        std::fs::write(dir.join("prometheus.yml"), config.to_string()).unwrap();
        let port = free_port();
        let proc = Proc::spawn_captured(
            Command::new("/usr/bin/prometheus")
                .arg(format!(
                    "--config.file={}",
                    dir.join("prometheus.yml").display()
                ))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address=127.0.0.1:{port}")),
        );
        let p = Prometheus {
            port,
            dir,
            _proc: proc,
        };
        eventually("Prometheus ready", Duration::from_secs(30), || {
            http10(p.port, "/-/ready")
        });
        p
    }

    fn api(&self, path: &str) -> Value {
        let body = http10(self.port, path).unwrap_or_else(|| panic!("GET {path} failed"));
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["status"], "success", "{v}");
        v["data"].clone()
    }

    fn query(&self, q: &str) -> Vec<Value> {
        self.api(&format!("/api/v1/query?query={}", urlencode(q)))["result"]
            .as_array()
            .unwrap()
            .clone()
    }

    fn alerts(&self, name: &str) -> Vec<Value> {
        self.api("/api/v1/alerts")["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|a| a["labels"]["alertname"] == name)
            .cloned()
            .collect()
    }
}

/// Panels whose queries read the kubelet's cAdvisor metrics, which no
/// kubelet serves here: the only ones not required to return a series.
const CADVISOR_PANELS: &[&str] = &["Tracer memory (RSS)", "Tracer CPU"];

#[test]
fn prometheus_scrapes_a_worker_timeout_the_dashboard_shows_it_and_the_alerts_fire() {
    require_root();
    let pids = HangPids::new("prometheus");
    // --timeout 25: the stall alert fires at 12.5 s, before the kill.
    let g = Gunicorn::new("hang_app:app")
        .worker_class("gevent")
        .workers(2)
        .timeout(25)
        .env("HANG_PID_FILE", pids.path())
        .spawn();
    let (master, port) = (g.pid(), g.port);
    let mport = free_port();
    let mut t = Tracer::start(&[
        "--pid",
        &master.to_string(),
        "--metrics-addr",
        &format!("127.0.0.1:{mport}"),
    ]);
    // Reads that block the hub ~50 ms, for the blocking-read heatmap.
    for _ in 0..3 {
        assert!(get(port, "/blockread").ends_with("read\n"));
    }
    let prom = Prometheus::start(mport);
    eventually("the tracer scraped", Duration::from_secs(20), || {
        prom.query(r#"up{job="gunicorn-tracer"} == 1"#)
            .first()
            .cloned()
    });
    let _client = get_async(port, "/hang", Duration::from_secs(60));
    let victim = pids.wait_nth(0);
    t.wait_for("stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == victim
    });
    let w = format!(r#"worker_pid="{victim}""#);
    // Label values are strings.
    let vs = victim.to_string();
    eventually("the stall in Prometheus", Duration::from_secs(10), || {
        prom.query(&format!(
            "gunicorn_tracer_worker_blocked_seconds{{{w}}} > 2"
        ))
        .first()
        .cloned()
    });

    // Every dashboard query, variables on "All", returns a series now.
    let queries = dashboard_queries();
    let mut skipped = Vec::new();
    for (title, q) in &queries {
        if CADVISOR_PANELS.contains(&title.as_str()) {
            assert!(q.contains("container_"), "{title}: {q}");
            skipped.push(title.clone());
            continue;
        }
        let expr = substituted(q, "30s");
        let result = prom.query(&expr);
        assert!(!result.is_empty(), "{title}: no series for {expr}");
    }
    skipped.dedup();
    eprintln!("not queried (cAdvisor metrics, no kubelet here): {skipped:?}");
    assert_eq!(skipped, CADVISOR_PANELS);
    // What it is stalled in, and its timeout as read.
    let info = prom.query(&format!("gunicorn_tracer_worker_stall_info{{{w}}}"));
    assert_eq!(info[0]["metric"]["syscall"], "read", "{info:?}");
    assert_eq!(info[0]["metric"]["fd_kind"], "pipe", "{info:?}");
    let timeout = prom.query(&format!("gunicorn_tracer_worker_timeout_seconds{{{w}}}"));
    assert_eq!(
        timeout[0]["metric"]["source"], "command_line",
        "{timeout:?}"
    );
    assert_eq!(timeout[0]["value"][1], "25", "{timeout:?}");
    // The stalled-workers table names the victim.
    let table = prom.query("gunicorn_tracer_worker_blocked_seconds > 0");
    assert!(
        table
            .iter()
            .any(|s| s["metric"]["worker_pid"] == vs.as_str()),
        "{table:?}"
    );

    // The stall alert fires for the victim, its annotations rendered by
    // Prometheus from the scraped labels.
    let alert = eventually(
        "GunicornWorkerStalled firing",
        Duration::from_secs(25),
        || {
            prom.alerts("GunicornWorkerStalled")
                .into_iter()
                .find(|a| a["state"] == "firing" && a["labels"]["worker_pid"] == vs.as_str())
        },
    );
    assert_eq!(alert["labels"]["master_pid"], master.to_string());
    assert_eq!(alert["labels"]["app"], "hang_app:app");
    let desc = alert["annotations"]["description"].as_str().unwrap();
    assert!(
        desc.contains(&format!("Worker {victim} (master {master}")),
        "{desc}"
    );
    // --timeout 25 on the command line: half of it, not the 15 s default.
    assert_eq!(alert["labels"]["threshold"], "half_timeout", "{alert}");
    assert!(desc.contains("past half its 25 s --timeout"), "{desc}");
    let blocked: f64 = alert["value"].as_str().unwrap().parse().unwrap();
    assert!(blocked >= 12.5, "{alert}");
    // Only the stalled worker: the healthy one raises nothing.
    let stalled = prom.alerts("GunicornWorkerStalled");
    assert_eq!(stalled.len(), 1, "{stalled:?}");

    // Gunicorn kills it (WORKER TIMEOUT): the timeout alert fires.
    t.wait_for("worker_timeout", Duration::from_secs(20), |e| {
        e["event"] == "worker_timeout" && e["pid"] == victim
    });
    eventually(
        "GunicornWorkerTimeout firing",
        Duration::from_secs(20),
        || {
            prom.alerts("GunicornWorkerTimeout")
                .into_iter()
                .find(|a| a["state"] == "firing")
        },
    );
    for quiet in [
        "GunicornWorkerOOMKilled",
        "GunicornTracerEventsLost",
        "GunicornTracerDown",
    ] {
        assert!(
            prom.alerts(quiet).is_empty(),
            "{quiet}: {:?}",
            prom.alerts(quiet)
        );
    }
    t.stop();
}
