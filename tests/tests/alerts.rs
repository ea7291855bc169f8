//! The Prometheus alert rules (deploy/prometheus/alerts.yaml), checked and
//! unit-tested with the real promtool (Debian's `prometheus` package): each
//! alert fires on its series and stays silent on a healthy worker and on one
//! recycled by --max-requests (deploy/prometheus/alerts_test.yaml).
use tests::deploytools::*;
use tests::*;

fn dir() -> std::path::PathBuf {
    workspace_root().join("deploy/prometheus")
}

fn rules() -> Vec<Value> {
    let text = std::fs::read_to_string(dir().join("alerts.yaml")).unwrap();
    let doc = &yaml_docs(&text)[0];
    doc["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().clone())
        .collect()
}

#[test]
fn promtool_checks_the_rules() {
    let (ok, text) = run_text(
        promtool()
            .arg("check")
            .arg("rules")
            .arg(dir().join("alerts.yaml")),
    );
    assert!(ok, "{text}");
    let n = rules().len();
    assert!(n >= 12, "{n} rules");
    assert!(
        text.contains(&format!("SUCCESS: {n} rules found")),
        "{text}"
    );
}

#[test]
fn promtool_unit_tests_pass() {
    let (ok, text) = run_text(
        promtool()
            .args(["test", "rules", "alerts_test.yaml"])
            .current_dir(dir()),
    );
    assert!(ok, "{text}");
    assert!(text.contains("SUCCESS"), "{text}");
}

/// Runs the unit tests against a copy of the rules with `from` replaced by
/// `to`: what promtool says.
fn unit_tests_with(from: &str, to: &str) -> (bool, String) {
    let rules = std::fs::read_to_string(dir().join("alerts.yaml")).unwrap();
    let changed = rules.replacen(from, to, 1);
    assert_ne!(rules, changed, "{from} is not in alerts.yaml");
    let tmp =
        std::env::temp_dir().join(format!("tracer-alerts-{}-{}", std::process::id(), to.len()));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join("alerts.yaml"), changed).unwrap();
    std::fs::copy(dir().join("alerts_test.yaml"), tmp.join("alerts_test.yaml")).unwrap();
    let r = run_text(
        promtool()
            .args(["test", "rules", "alerts_test.yaml"])
            .current_dir(&tmp),
    );
    let _ = std::fs::remove_dir_all(&tmp);
    r
}

#[test]
fn the_unit_tests_catch_an_alert_on_a_recycled_or_healthy_worker() {
    // Proof the silent cases are evaluated: a timeout rule that also counts
    // --max-requests exits fires on the recycled worker...
    let (ok, text) = unit_tests_with(
        r#"cause="worker_timeout""#,
        r#"cause=~"worker_timeout|max_requests""#,
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains("a worker recycled by --max-requests raises nothing"),
        "{text}"
    );
    assert!(text.contains("GunicornWorkerTimeout"), "{text}");
    // ...and a stall rule that ignores the threshold fires on a healthy one.
    let (ok, text) = unit_tests_with(
        "0.5 * (gunicorn_tracer_worker_timeout_seconds > 0)",
        "0 * (gunicorn_tracer_worker_timeout_seconds > 0)",
    );
    assert!(!ok, "{text}");
    assert!(text.contains("a healthy worker raises nothing"), "{text}");
    // And one that never fires is caught by the firing case.
    let (ok, text) = unit_tests_with(
        "gunicorn_tracer_worker_requests_hanging > 0",
        "gunicorn_tracer_worker_requests_hanging > 1",
    );
    assert!(!ok, "{text}");
    assert!(text.contains("each alert fires on its series"), "{text}");
}

#[test]
fn every_alert_says_what_where_and_what_to_do_and_is_tested_both_ways() {
    let tests_text = std::fs::read_to_string(dir().join("alerts_test.yaml")).unwrap();
    let tests = &yaml_docs(&tests_text)[0]["tests"];
    let anchors = readme_anchors();
    for rule in rules() {
        let name = rule["alert"].as_str().expect("only alerting rules");
        let a = &rule["annotations"];
        assert!(
            a["summary"].as_str().is_some_and(|s| !s.is_empty()),
            "{name}"
        );
        let description = a["description"].as_str().unwrap_or_default();
        // Located: the worker's labels, or the tracer target's. An alert on
        // absent() has no series, so nothing to locate: every node is blind.
        let absent = rule["expr"].as_str().unwrap().starts_with("absent(");
        assert!(
            description.contains("$labels.") || absent,
            "{name}: the description names no label: {description}"
        );
        let url = a["runbook_url"].as_str().unwrap_or_default();
        let anchor = url
            .strip_prefix("README.md#")
            .unwrap_or_else(|| panic!("{name}: runbook_url {url} is not a README section"));
        assert_eq!(anchor, format!("runbook-{}", name.to_lowercase()), "{name}");
        assert!(
            anchors.iter().any(|h| h == anchor),
            "{name}: README has no heading for #{anchor}"
        );
        // Fires in some test case, and is asserted silent in the healthy
        // and recycled cases.
        let cases = tests.as_array().unwrap();
        let fires = cases.iter().any(|t| {
            t["alert_rule_test"].as_array().unwrap().iter().any(|c| {
                c["alertname"] == name && c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty())
            })
        });
        assert!(fires, "{name}: no unit test sees it fire");
        for silent in [
            "a healthy worker raises nothing",
            "a worker recycled by --max-requests raises nothing",
        ] {
            let case = cases.iter().find(|t| t["name"] == silent).unwrap();
            assert!(
                case["alert_rule_test"].as_array().unwrap().iter().any(|c| {
                    c["alertname"] == name && c["exp_alerts"] == serde_json::json!([])
                }),
                "{name}: not asserted silent in '{silent}'"
            );
        }
    }
}

#[test]
fn the_rules_use_the_tracers_metric_names() {
    let text = std::fs::read_to_string(dir().join("alerts.yaml")).unwrap();
    let names = metric_names_in(&text);
    assert!(names.len() >= 9, "{names:?}");
    for n in &names {
        assert!(
            is_tracer_metric(n),
            "{n} is not a metric the tracer exports"
        );
    }
    assert!(!is_tracer_metric("gunicorn_tracer_worker_stall_seconds"));
    // The test series use them too, or the tests would prove nothing.
    let tests = std::fs::read_to_string(dir().join("alerts_test.yaml")).unwrap();
    for n in metric_names_in(&tests) {
        assert!(is_tracer_metric(&n), "alerts_test.yaml: {n}");
    }
}
