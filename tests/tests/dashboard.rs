//! The Grafana dashboard (deploy/grafana/gunicorn-tracer.json): unique
//! panel ids, a query and a description on every panel, no hard-coded
//! datasource uid, the variables the issue names, and every query parsed
//! by the real promtool (as a recording rule, variables substituted) on the
//! tracer's own metric names.
use tests::deploytools::*;
use tests::*;

fn dashboard() -> Value {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/gunicorn-tracer.json"))
            .unwrap();
    serde_json::from_str(&text).expect("the dashboard is JSON")
}

/// Every panel, those inside collapsed rows included.
fn panels(d: &Value) -> Vec<Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        out.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner.iter().cloned());
        }
    }
    out
}

fn queries(d: &Value) -> Vec<(String, String)> {
    panels(d)
        .iter()
        .filter(|p| p["type"] != "row")
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap().to_string();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(move |t| {
                    (
                        title.clone(),
                        t["expr"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn panels_have_unique_ids_a_query_and_a_description() {
    let d = dashboard();
    let all = panels(&d);
    let mut ids: Vec<i64> = all
        .iter()
        .map(|p| p["id"].as_i64().expect("an id"))
        .collect();
    let n = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), n, "duplicate panel ids");
    let graphs: Vec<&Value> = all.iter().filter(|p| p["type"] != "row").collect();
    assert!(graphs.len() >= 10, "{}", graphs.len());
    for p in graphs {
        let title = p["title"].as_str().unwrap();
        let desc = p["description"].as_str().unwrap_or_default();
        assert!(desc.len() > 60, "{title}: no description saying what to do");
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "{title}: an empty query"
            );
        }
    }
}

/// Every `datasource` object in the JSON, wherever it is.
fn datasources(v: &Value, out: &mut Vec<Value>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                if k == "datasource" {
                    out.push(v.clone());
                }
                datasources(v, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| datasources(v, out)),
        _ => {}
    }
}

#[test]
fn no_datasource_uid_is_hard_coded() {
    let d = dashboard();
    let mut found = Vec::new();
    datasources(&d, &mut found);
    assert!(found.len() > 10, "{found:?}");
    for ds in &found {
        assert_eq!(ds["uid"], "${datasource}", "{ds}");
        assert_eq!(ds["type"], "prometheus", "{ds}");
    }
    assert!(
        d.get("__inputs").is_none(),
        "an exported dashboard's input list"
    );
    let vars = d["templating"]["list"].as_array().unwrap();
    let ds = vars.iter().find(|v| v["name"] == "datasource").unwrap();
    assert_eq!(ds["type"], "datasource");
    assert_eq!(ds["query"], "prometheus");
}

#[test]
fn the_variables_come_from_the_worker_labels() {
    let d = dashboard();
    let vars = d["templating"]["list"].as_array().unwrap();
    for name in ["namespace", "pod", "app"] {
        let v = vars
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} variable"));
        assert_eq!(v["type"], "query");
        let q = v["definition"].as_str().unwrap();
        assert!(
            q.starts_with("label_values(gunicorn_tracer_worker_")
                && q.ends_with(&format!(", {name})")),
            "{q}"
        );
        assert_eq!(
            v["allValue"], ".*",
            "workers outside any pod have an empty {name}"
        );
    }
    // Every per-worker query is filtered by all three.
    for (title, q) in queries(&d) {
        if q.contains("gunicorn_tracer_worker_") && !q.contains("worker_exits_total") {
            for f in [
                r#"namespace=~"$namespace""#,
                r#"pod=~"$pod""#,
                r#"app=~"$app""#,
            ] {
                assert!(q.contains(f), "{title}: {q} lacks {f}");
            }
        }
    }
}

#[test]
fn the_panels_cover_what_the_issue_lists() {
    let d = dashboard();
    let all: String = queries(&d).into_iter().map(|(_, q)| q + "\n").collect();
    for needle in [
        "gunicorn_tracer_worker_stalled",
        "gunicorn_tracer_worker_blocked_seconds",
        "gunicorn_tracer_worker_heartbeat_age_seconds",
        "gunicorn_tracer_worker_timeout_seconds",
        "gunicorn_tracer_worker_stall_info",
        "gunicorn_tracer_worker_stalls_total",
        r#"gunicorn_tracer_worker_exits_total{cause="worker_timeout"}"#,
        "sum by (cause) (rate(gunicorn_tracer_worker_exits_total",
        "dropped_request|keepalive_race",
        r#"gunicorn_tracer_worker_exits_total{cause="oom_kill"}"#,
        "gunicorn_tracer_worker_requests_hanging",
        "gunicorn_tracer_worker_hung_requests_total",
        "gunicorn_tracer_worker_blocking_read_seconds_bucket",
        "gunicorn_tracer_events_lost_total",
        "gunicorn_tracer_watch_full_total",
        "gunicorn_tracer_inflight_full_total",
        "gunicorn_tracer_bpf_errors_total",
        "container_memory_working_set_bytes",
        "container_cpu_usage_seconds_total",
    ] {
        assert!(all.contains(needle), "no panel queries {needle}");
    }
    let heat = panels(&d)
        .into_iter()
        .find(|p| p["type"] == "heatmap")
        .expect("a heatmap");
    assert_eq!(heat["repeat"], "fd_kind", "one heatmap per fd kind");
    assert_eq!(heat["targets"][0]["format"], "heatmap");
}

/// promtool check rules on the queries as recording rules: what it says.
fn promtool_parses(exprs: &[(String, String)]) -> (bool, String) {
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| serde_json::json!({"record": format!("dashboard:query_{i}"), "expr": substituted(e, "1m")}))
        .collect();
    let file = serde_json::json!({"groups": [{"name": "dashboard", "rules": rules}]});
    let path = std::env::temp_dir().join(format!(
        "tracer-dashboard-{}-{}.yaml",
        std::process::id(),
        exprs.len()
    ));
    std::fs::write(&path, file.to_string()).unwrap();
    let r = run_text(promtool().arg("check").arg("rules").arg(&path));
    let _ = std::fs::remove_file(&path);
    r
}

#[test]
fn every_query_parses_and_uses_the_tracers_metrics() {
    let d = dashboard();
    let qs = queries(&d);
    let (ok, text) = promtool_parses(&qs);
    assert!(ok, "{text}");
    assert!(
        text.contains(&format!("SUCCESS: {} rules found", qs.len())),
        "{text}"
    );
    // Proof promtool reads the expressions: one unbalanced bracket fails.
    let mut broken = qs.clone();
    broken[0].1.push(')');
    assert!(!promtool_parses(&broken).0);
    // The tracer's names, and the kubelet's for the tracer's own RSS/CPU.
    for (title, q) in &qs {
        for n in metric_names_in(q) {
            assert!(is_tracer_metric(&n), "{title}: {n} is not a tracer metric");
        }
        let foreign = q.contains("container_");
        assert!(
            q.contains("gunicorn_tracer_") || foreign,
            "{title}: {q} reads no tracer metric"
        );
    }
}
