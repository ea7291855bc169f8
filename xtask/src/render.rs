//! `cargo xtask render-deploy`: the plain manifests in deploy/kubernetes/
//! are rendered from the Helm chart (one source), and the chart's files/
//! get their copies of the alert rules and the dashboard (a chart cannot
//! read files outside its directory). tests/tests/helm.rs fails when any of
//! them drifts.
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::{root, setup, step};

/// What the plain manifests are rendered with: the chart's defaults, plus
/// the namespace (Helm users pass --create-namespace instead) and the
/// PodMonitor (a file of its own, applied only with the operator).
pub const RENDER_ARGS: &[&str] = &[
    "template",
    "gunicorn-tracer",
    "deploy/helm/gunicorn-tracer",
    "--namespace",
    "gunicorn-tracer",
    "--set",
    "namespace.create=true",
    "--set",
    "podMonitor.enabled=true",
];

pub const HEADER: &str = "# Rendered from deploy/helm/gunicorn-tracer by `cargo xtask render-deploy`\n# (default values, namespace.create and podMonitor.enabled on): edit the chart.\n";

/// Copies the chart keeps of files that live elsewhere: (source, copy).
pub const COPIES: &[(&str, &str)] = &[
    (
        "deploy/prometheus/alerts.yaml",
        "deploy/helm/gunicorn-tracer/files/alerts.yaml",
    ),
    (
        "deploy/grafana/gunicorn-tracer.json",
        "deploy/helm/gunicorn-tracer/files/gunicorn-tracer.json",
    ),
];

pub fn render_deploy() -> Result<()> {
    let helm = setup::helm()?;
    for (from, to) in COPIES {
        std::fs::copy(root().join(from), root().join(to))
            .with_context(|| format!("copying {from} to {to}"))?;
    }
    step("rendering deploy/kubernetes/ from the chart (helm template)");
    let out = Command::new(&helm)
        .args(RENDER_ARGS)
        .current_dir(root())
        .output()
        .context("running helm")?;
    if !out.status.success() {
        bail!("helm template: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    let dir = root().join("deploy/kubernetes");
    for (name, body) in split(&text)? {
        let path = dir.join(&name);
        std::fs::write(&path, format!("{HEADER}{body}"))?;
        eprintln!("    {}", path.display());
    }
    Ok(())
}

/// `helm template` output as (file name, document) per template.
pub fn split(text: &str) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for doc in text.split("---\n# Source: ").skip(1) {
        let (source, body) = doc.split_once('\n').context("a Source line")?;
        let name = Path::new(source)
            .file_name()
            .context("a template name")?
            .to_string_lossy()
            .to_string();
        out.push((name, body.to_string()));
    }
    Ok(out)
}
