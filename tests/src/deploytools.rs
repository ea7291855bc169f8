//! The deployment tools the chart, alert and dashboard tests run: helm
//! (from the npm package `cargo xtask test` unpacks under target/tools),
//! promtool (Debian's `prometheus` package) and the venv's PyYAML. None is
//! optional: a missing tool fails the test and says how to install it.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::{python, workspace_root};

/// helm v3.17.1 as `cargo xtask test` installs it, or `HELM_BIN`.
pub fn helm_bin() -> PathBuf {
    let bin = std::env::var_os("HELM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/tools/helm-v3.17.1/helm"));
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask test`, which installs helm",
        bin.display()
    );
    bin
}

/// promtool from Debian's `prometheus` package.
pub fn promtool() -> Command {
    assert!(
        Path::new("/usr/bin/promtool").exists(),
        "promtool is missing: run `cargo xtask test` (apt-get install prometheus)"
    );
    Command::new("/usr/bin/promtool")
}

/// Runs `cmd`; stdout and stderr together, and whether it succeeded.
pub fn run_text(cmd: &mut Command) -> (bool, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    (
        status.success(),
        String::from_utf8_lossy(&stdout).to_string() + &String::from_utf8_lossy(&stderr),
    )
}

/// Every document of a YAML text, as JSON (PyYAML comes with
/// kubernetes-validate in the test venv); empty documents left out.
pub fn yaml_docs(text: &str) -> Vec<Value> {
    let mut child = Command::new(python())
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d is not None]))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running the venv's python (run `cargo xtask test`)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The anchors GitHub gives the README's headings (lower case, spaces to
/// dashes, punctuation other than `-` and `_` dropped).
pub fn readme_anchors() -> Vec<String> {
    let readme = std::fs::read_to_string(workspace_root().join("README.md")).unwrap();
    readme
        .lines()
        .filter(|l| l.starts_with('#'))
        .map(|l| {
            l.trim_start_matches('#')
                .trim()
                .to_lowercase()
                .chars()
                .filter_map(|c| match c {
                    ' ' => Some('-'),
                    c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Whether `series` (`gunicorn_tracer_...` with any `_total`, `_bucket`,
/// `_sum`, `_count` suffix) is a family the tracer registers, read from its
/// source (present/metrics.rs registers `"name"` under the prefix, and
/// writes the kernel histogram with its full name).
pub fn is_tracer_metric(series: &str) -> bool {
    let src =
        std::fs::read_to_string(workspace_root().join("tracer/src/present/metrics.rs")).unwrap();
    assert!(src.contains("Registry::with_prefix(\"gunicorn_tracer\")"));
    let Some(name) = series.strip_prefix("gunicorn_tracer_") else {
        return false;
    };
    let mut candidates = vec![name];
    for suffix in ["_total", "_bucket", "_sum", "_count"] {
        if let Some(n) = name.strip_suffix(suffix) {
            candidates.push(n);
        }
    }
    candidates.iter().any(|n| {
        src.contains(&format!("\"{n}\""))
            || src.contains(&format!("const NAME: &str = \"gunicorn_tracer_{n}\""))
    })
}

/// Every `gunicorn_tracer_...` name in `text`.
pub fn metric_names_in(text: &str) -> Vec<String> {
    let mut out: Vec<String> = text
        .match_indices("gunicorn_tracer_")
        .map(|(i, _)| {
            text[i..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect()
        })
        .collect();
    out.sort();
    out.dedup();
    out
}

/// A dashboard query with its variables as Grafana substitutes them when
/// every variable is on "All" (and `tracer_namespace` at its default), `$__rate_interval` as `rate_interval`.
pub fn substituted(expr: &str, rate_interval: &str) -> String {
    expr.replace("$__rate_interval", rate_interval)
        .replace("$namespace", ".*")
        .replace("$pod", ".*")
        .replace("$app", ".*")
        .replace("$fd_kind", ".*")
        .replace("$tracer_namespace", "gunicorn-tracer")
}

/// The dashboard's queries: (panel title, expression).
pub fn dashboard_queries() -> Vec<(String, String)> {
    let text =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/gunicorn-tracer.json"))
            .unwrap();
    let d: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    let mut panels: Vec<Value> = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        panels.push(p.clone());
        if let Some(inner) = p["panels"].as_array() {
            panels.extend(inner.iter().cloned());
        }
    }
    for p in panels.iter().filter(|p| p["type"] != "row") {
        for t in p["targets"].as_array().unwrap() {
            out.push((
                p["title"].as_str().unwrap().to_string(),
                t["expr"].as_str().unwrap_or_default().to_string(),
            ));
        }
    }
    out
}
