//! `cargo xtask soak`: a long run under steady load with worker churn, to
//! show that the tracer's memory and its kernel maps stay flat. Not in CI
//! (it takes minutes); its latest result is recorded in docs/soak.md.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tests::{Gunicorn, Tracer};

use crate::step;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

fn metric(text: &str, prefix: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

pub fn run(minutes: u64) -> Result<()> {
    step(&format!(
        "soak: Gunicorn -k gevent -w 4 --max-requests 200 under wrk for {minutes} min, tracer sampled every 30 s"
    ));
    let g = Gunicorn::new("bench_app:app")
        .worker_class("gevent")
        .workers(4)
        .max_requests(200)
        .spawn();
    let port = g.port;
    let mport = tests::free_port();
    let maddr = format!("127.0.0.1:{mport}");
    let mut t = Tracer::start(&["--pid", &g.pid().to_string(), "--metrics-addr", &maddr]);
    let end = Instant::now() + Duration::from_secs(minutes * 60);
    let mut rows = Vec::new();
    eprintln!(
        "  {:>6} {:>10} {:>8} {:>9} {:>6} {:>12} {:>6}",
        "min", "rss_kb", "watched", "inflight", "conns", "events", "lost"
    );
    while Instant::now() < end {
        let out = std::process::Command::new("wrk")
            .args([
                "-t1",
                "-c8",
                "-d30s",
                &format!("http://127.0.0.1:{port}/pipe"),
            ])
            .output()
            .context("running wrk")?;
        if !out.status.success() {
            anyhow::bail!("wrk failed");
        }
        let m = tests::get(mport, "/metrics");
        let row = serde_json::json!({
            "minute": (minutes * 60 - end.saturating_duration_since(Instant::now()).as_secs()) as f64 / 60.0,
            "rss_kb": rss_kb(t.pid()),
            "watched": metric(&m, "gunicorn_tracer_map_entries{map=\"watched\"}"),
            "inflight": metric(&m, "gunicorn_tracer_map_entries{map=\"inflight\"}"),
            "conns": metric(&m, "gunicorn_tracer_map_entries{map=\"conns\"}"),
            "events": metric(&m, "gunicorn_tracer_events_received_total"),
            "lost": metric(&m, "gunicorn_tracer_events_lost_total"),
        });
        eprintln!(
            "  {:>6.1} {:>10} {:>8} {:>9} {:>6} {:>12} {:>6}",
            row["minute"].as_f64().unwrap_or(0.0),
            row["rss_kb"],
            row["watched"],
            row["inflight"],
            row["conns"],
            row["events"],
            row["lost"]
        );
        rows.push(row);
    }
    let summary = t.stop();
    let respawned = t
        .of_kind("worker")
        .iter()
        .filter(|w| w["source"] == "fork")
        .count();
    eprintln!(
        "  workers respawned during the run: {respawned}; stalls: {}",
        t.of_kind("stall").len()
    );
    let report = serde_json::json!({"minutes": minutes, "samples": rows, "respawned": respawned, "summary_maps": summary["maps"]});
    let path = crate::root().join("target/soak.json");
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    step(&format!("soak results written to {}", path.display()));
    Ok(())
}
