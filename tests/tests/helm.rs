//! The Helm chart (deploy/helm/gunicorn-tracer), with the real helm v3
//! (`cargo xtask test` installs it): lint, render with the defaults and
//! with every toggle on, validate the rendered objects against the
//! Kubernetes schema (kubernetes-validate, 1.28 and 1.33), check the
//! security settings hold whatever the values, the schema rejects bad
//! values, and deploy/kubernetes/ is what the chart renders (no drift).
use std::path::PathBuf;
use std::process::Command;

use tests::deploytools::*;
use tests::*;

fn chart() -> PathBuf {
    workspace_root().join("deploy/helm/gunicorn-tracer")
}

/// Every toggle on, and a value for each thing people change.
const ALL_ON: &[&str] = &[
    "--set",
    "namespace.create=true",
    "--set",
    "serviceMonitor.enabled=true",
    "--set",
    "podMonitor.enabled=true",
    "--set",
    "prometheusRule.enabled=true",
    "--set",
    "grafanaDashboard.enabled=true",
    "--set",
    "grafanaDashboard.namespace=grafana",
    "--set",
    "controlPlane.enabled=true",
    "--set",
    "priorityClassName=node-agents",
    "--set",
    "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    "--set",
    "image.repository=registry.example/gunicorn-tracer",
    "--set",
    "threshold=2s",
    "--set",
    "requestThreshold=45s",
    "--set",
    "logFormat=text",
    "--set-json",
    r#"extraArgs=["--py-stack"]"#,
    "--set",
    "metrics.port=9100",
    "--set",
    "health.port=9101",
    "--set",
    "podsDir=/srv/kubelet/pods",
    "--set",
    "networkPolicy.prometheusNamespace=prom",
    "--set",
    "nodeSelector.kubernetes\\.io/os=linux",
    "--set",
    "prometheusRule.labels.release=kps",
];

fn helm(args: &[&str]) -> (bool, String) {
    run_text(Command::new(helm_bin()).args(args))
}

/// `helm template` of the chart into namespace `gt` with `values`: the
/// documents, or a panic with helm's words.
fn render(values: &[&str]) -> Vec<Value> {
    let chart = chart();
    let mut args = vec![
        "template",
        "gunicorn-tracer",
        chart.to_str().unwrap(),
        "--namespace",
        "gt",
    ];
    args.extend_from_slice(values);
    let out = Command::new(helm_bin()).args(&args).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_docs(&String::from_utf8_lossy(&out.stdout))
}

fn kind<'a>(docs: &'a [Value], k: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == k)
        .unwrap_or_else(|| panic!("no {k} rendered"))
}

fn kinds(docs: &[Value]) -> Vec<String> {
    let mut k: Vec<String> = docs
        .iter()
        .map(|d| d["kind"].as_str().unwrap().to_string())
        .collect();
    k.sort();
    k
}

#[test]
fn helm_lints_the_chart_with_defaults_and_every_toggle() {
    let chart = chart();
    let (ok, text) = helm(&["lint", "--strict", chart.to_str().unwrap()]);
    assert!(
        ok && text.contains("1 chart(s) linted, 0 chart(s) failed"),
        "{text}"
    );
    let mut args = vec!["lint", "--strict", chart.to_str().unwrap()];
    args.extend_from_slice(ALL_ON);
    let (ok, text) = helm(&args);
    assert!(ok && text.contains("0 chart(s) failed"), "{text}");
}

#[test]
fn the_defaults_render_the_plain_objects_and_every_toggle_adds_its_own() {
    assert_eq!(
        kinds(&render(&[])),
        ["DaemonSet", "NetworkPolicy", "Service", "ServiceAccount"]
    );
    assert_eq!(
        kinds(&render(ALL_ON)),
        [
            "ConfigMap",
            "DaemonSet",
            "Namespace",
            "NetworkPolicy",
            "PodMonitor",
            "PrometheusRule",
            "Service",
            "ServiceAccount",
            "ServiceMonitor"
        ]
    );
}

/// kubernetes-validate --strict on the documents of the built-in kinds
/// (the monitoring.coreos.com ones are CRDs it has no schema for: they are
/// checked below by what reads them).
fn validate(docs: &[Value], version: &str) {
    let core: Vec<&Value> = docs
        .iter()
        .filter(|d| {
            !d["apiVersion"]
                .as_str()
                .unwrap()
                .starts_with("monitoring.coreos.com/")
        })
        .collect();
    let dir = std::env::temp_dir().join(format!("tracer-helm-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for (i, d) in core.iter().enumerate() {
        // JSON is YAML.
        let f = dir.join(format!("{i}.yaml"));
        std::fs::write(&f, serde_json::to_string(d).unwrap()).unwrap();
        files.push(f);
    }
    let out = Command::new(venv().join("bin/kubernetes-validate"))
        .args(["--strict", "-k", version])
        .args(&files)
        .output()
        .expect("kubernetes-validate is not installed: run `cargo xtask test`");
    let _ = std::fs::remove_dir_all(&dir);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "kubernetes {version}: {text}");
    assert_eq!(text.matches("passed").count(), core.len(), "{text}");
}

#[test]
fn rendered_objects_validate_against_kubernetes_1_28_and_1_33() {
    for values in [&[][..], ALL_ON] {
        for version in ["1.28.0", "1.33.0"] {
            let mut args = values.to_vec();
            args.extend_from_slice(&["--kube-version", version]);
            let docs = render(&args);
            validate(&docs, version);
            // AppArmor: the securityContext field where Kubernetes has it
            // (1.30+), the deprecated annotation only before.
            let ds = kind(&docs, "DaemonSet");
            let sc = &ds["spec"]["template"]["spec"]["containers"][0]["securityContext"];
            let annotation = &ds["spec"]["template"]["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/tracer"];
            if version == "1.28.0" {
                assert_eq!(annotation, "unconfined", "{ds}");
                assert!(sc.get("appArmorProfile").is_none(), "{ds}");
            } else {
                assert_eq!(sc["appArmorProfile"]["type"], "Unconfined", "{ds}");
                assert!(annotation.is_null(), "{ds}");
            }
        }
    }
}

#[test]
fn the_operator_objects_carry_the_alerts_the_dashboard_and_the_worker_labels() {
    let docs = render(ALL_ON);
    // The PrometheusRule's groups are alerts.yaml's, and promtool accepts them.
    let rule = kind(&docs, "PrometheusRule");
    assert_eq!(rule["metadata"]["labels"]["release"], "kps");
    let alerts =
        std::fs::read_to_string(workspace_root().join("deploy/prometheus/alerts.yaml")).unwrap();
    assert!(
        rule["spec"] == yaml_docs(&alerts)[0],
        "the PrometheusRule's groups are not alerts.yaml's: run `cargo xtask render-deploy`"
    );
    let file = std::env::temp_dir().join(format!("tracer-helm-rule-{}.yaml", std::process::id()));
    std::fs::write(&file, serde_json::to_string(&rule["spec"]).unwrap()).unwrap();
    let (ok, text) = run_text(promtool().arg("check").arg("rules").arg(&file));
    let _ = std::fs::remove_file(&file);
    assert!(ok, "{text}");
    // The dashboard ConfigMap: for the Grafana sidecar, the same JSON.
    let cm = kind(&docs, "ConfigMap");
    assert_eq!(cm["metadata"]["labels"]["grafana_dashboard"], "1");
    assert_eq!(cm["metadata"]["namespace"], "grafana");
    let dash =
        std::fs::read_to_string(workspace_root().join("deploy/grafana/gunicorn-tracer.json"))
            .unwrap();
    assert_eq!(
        cm["data"]["gunicorn-tracer.json"].as_str().unwrap(),
        dash.trim_end()
    );
    // Both monitors keep the worker's namespace/pod labels and add the node.
    let ds = kind(&docs, "DaemonSet");
    let pod_labels = &ds["spec"]["template"]["metadata"]["labels"];
    for (k, endpoints) in [
        ("PodMonitor", "podMetricsEndpoints"),
        ("ServiceMonitor", "endpoints"),
    ] {
        let m = kind(&docs, k);
        assert_eq!(&m["spec"]["selector"]["matchLabels"], pod_labels, "{k}");
        let e = &m["spec"][endpoints][0];
        assert_eq!(e["port"], "metrics", "{k}");
        assert_eq!(e["path"], "/metrics", "{k}");
        assert_eq!(e["honorLabels"], true, "{k}");
        assert_eq!(e["relabelings"][0]["targetLabel"], "node", "{k}");
        assert_eq!(
            e["relabelings"][0]["sourceLabels"],
            serde_json::json!(["__meta_kubernetes_pod_node_name"]),
            "{k}"
        );
    }
}

#[test]
fn the_security_settings_do_not_move_with_the_values() {
    let container = |docs: &[Value]| {
        kind(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0].clone()
    };
    let (d, a) = (render(&[]), render(ALL_ON));
    assert_eq!(
        container(&d)["securityContext"],
        container(&a)["securityContext"]
    );
    let sc = &container(&a)["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!([
            "BPF",
            "PERFMON",
            "SYS_PTRACE",
            "DAC_READ_SEARCH",
            "SETUID",
            "SETGID"
        ])
    );
    for docs in [&d, &a] {
        let pod = &kind(docs, "DaemonSet")["spec"]["template"]["spec"];
        assert_eq!(
            pod["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        assert_eq!(pod["hostPID"], true);
        assert!(pod.get("hostNetwork").is_none() && pod.get("hostIPC").is_none());
        let mounts = pod["containers"][0]["volumeMounts"].as_array().unwrap();
        assert!(mounts.iter().all(|m| m["readOnly"] == true), "{mounts:?}");
    }
}

fn args(docs: &[Value]) -> Vec<String> {
    kind(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_values_reach_the_pod() {
    let d = render(&[]);
    let pod = &kind(&d, "DaemonSet")["spec"]["template"]["spec"];
    assert_eq!(pod["containers"][0]["image"], "gunicorn-tracer:0.1.0");
    assert!(pod.get("priorityClassName").is_none());
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    assert_eq!(
        pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
            [0]["matchExpressions"][0],
        serde_json::json!({"key": "node-role.kubernetes.io/control-plane", "operator": "DoesNotExist"})
    );
    assert_eq!(
        args(&d),
        [
            "watch",
            "--format=json",
            "--metrics-addr=$(POD_IP):9464",
            "--health-addr=127.0.0.1:9465",
            "--pods-dir=/var/log/pods"
        ]
    );
    let a = render(ALL_ON);
    let pod = &kind(&a, "DaemonSet")["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    assert_eq!(
        c["image"],
        "registry.example/gunicorn-tracer@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "the digest wins over the tag"
    );
    assert_eq!(pod["priorityClassName"], "node-agents");
    assert!(pod.get("affinity").is_none(), "controlPlane.enabled");
    assert_eq!(pod["nodeSelector"]["kubernetes.io/os"], "linux");
    assert_eq!(
        args(&a),
        [
            "watch",
            "--format=text",
            "--metrics-addr=$(POD_IP):9100",
            "--health-addr=127.0.0.1:9101",
            "--pods-dir=/srv/kubelet/pods",
            "--threshold=2s",
            "--request-threshold=45s",
            "--py-stack"
        ]
    );
    assert_eq!(c["ports"][0]["containerPort"], 9100);
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        assert_eq!(c[probe]["exec"]["command"][3], "127.0.0.1:9101", "{probe}");
    }
    assert!(
        c["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["mountPath"] == "/srv/kubelet/pods")
    );
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/srv/kubelet/pods")
    );
    let svc = kind(&a, "Service");
    assert_eq!(svc["spec"]["ports"][0]["port"], 9100);
    assert_eq!(svc["metadata"]["annotations"]["prometheus.io/port"], "9100");
    let np = kind(&a, "NetworkPolicy");
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], 9100);
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "prom"
    );
    assert_eq!(
        kind(&a, "Namespace")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"],
        "privileged"
    );
}

#[test]
fn the_values_schema_rejects_what_would_break_or_loosen_the_pod() {
    let chart = chart();
    for (bad, why) in [
        ("image.digest=latest", "image.digest"),
        ("image.digest=sha256:abc", "image.digest"),
        ("logFormat=xml", "logFormat"),
        ("metrics.port=70000", "metrics.port"),
        ("threshold=fast", "threshold"),
        ("podsDir=relative/dir", "podsDir"),
        ("privileged=true", "privileged"),
        ("securityContext.privileged=true", "securityContext"),
    ] {
        let (ok, text) = helm(&["template", "x", chart.to_str().unwrap(), "--set", bad]);
        assert!(!ok, "{bad} was accepted");
        assert!(text.contains(why), "{bad}: {text}");
    }
    for bad in [
        r#"extraArgs=["--metrics-addr=0.0.0.0:9464"]"#,
        r#"extraArgs=["--output=/tmp/x"]"#,
        r#"extraArgs=["watch"]"#,
    ] {
        let (ok, text) = helm(&["template", "x", chart.to_str().unwrap(), "--set-json", bad]);
        assert!(!ok, "{bad} was accepted");
        assert!(text.contains("extraArgs"), "{bad}: {text}");
    }
    let (ok, text) = helm(&[
        "template",
        "x",
        chart.to_str().unwrap(),
        "--set",
        "health.port=9464",
    ]);
    assert!(!ok && text.contains("must differ"), "{text}");
}

#[test]
fn notes_say_how_to_see_a_verdict() {
    // `helm install --dry-run` needs a cluster here, and `helm template`
    // leaves NOTES.txt out: render the chart's own NOTES.txt through a copy
    // of the chart whose one extra template passes it to `tpl`.
    let dir = std::env::temp_dir().join(format!("tracer-helm-notes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ok = Command::new("cp")
        .arg("-r")
        .arg(chart())
        .arg(&dir)
        .status()
        .unwrap()
        .success();
    assert!(ok);
    std::fs::rename(dir.join("templates/NOTES.txt"), dir.join("files/NOTES.txt")).unwrap();
    std::fs::write(
        dir.join("templates/zz-notes.yaml"),
        r#"notes: {{ tpl (.Files.Get "files/NOTES.txt") . | toJson }}"#,
    )
    .unwrap();
    let notes = |extra: &[&str]| {
        let mut a = vec![
            "template",
            "x",
            dir.to_str().unwrap(),
            "-n",
            "gt",
            "--show-only",
            "templates/zz-notes.yaml",
        ];
        a.extend_from_slice(extra);
        let (ok, text) = helm(&a);
        assert!(ok, "{text}");
        yaml_docs(&text)[0]["notes"].as_str().unwrap().to_string()
    };
    let n = notes(&[]);
    let m = notes(&[
        "--set",
        "metrics.port=9100",
        "--set",
        "image.digest=sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "--set",
        "podMonitor.enabled=true",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    assert!(n.contains("kubectl -n gt logs"), "{n}");
    assert!(n.contains(r#""event":"(stall|"#), "{n}");
    assert!(n.contains(":9464/metrics"), "{n}");
    assert!(n.contains("pulled by tag (0.1.0)"), "{n}");
    assert!(
        n.contains("pod-security.kubernetes.io/enforce=privileged"),
        "{n}"
    );
    assert!(m.contains(":9100/metrics"), "{m}");
    assert!(!m.contains("pulled by tag"), "{m}");
    assert!(!m.contains("No PodMonitor"), "{m}");
}

/// What `cargo xtask render-deploy` runs (xtask/src/render.rs).
const RENDER_ARGS: &[&str] = &[
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
const HEADER: &str = "# Rendered from deploy/helm/gunicorn-tracer by `cargo xtask render-deploy`\n# (default values, namespace.create and podMonitor.enabled on): edit the chart.\n";

#[test]
fn deploy_kubernetes_is_what_the_chart_renders() {
    let out = Command::new(helm_bin())
        .args(RENDER_ARGS)
        .current_dir(workspace_root())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let dir = workspace_root().join("deploy/kubernetes");
    let mut rendered = Vec::new();
    for doc in text.split("---\n# Source: ").skip(1) {
        let (source, body) = doc.split_once('\n').unwrap();
        let name = source.rsplit('/').next().unwrap().to_string();
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
        assert_eq!(
            on_disk,
            format!("{HEADER}{body}"),
            "deploy/kubernetes/{name} differs from the chart: run `cargo xtask render-deploy`"
        );
        rendered.push(name);
    }
    let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    on_disk.sort();
    rendered.sort();
    assert_eq!(
        on_disk, rendered,
        "files in deploy/kubernetes/ the chart does not render"
    );
    // The chart's copies of the alert rules and the dashboard.
    for (from, to) in [
        (
            "deploy/prometheus/alerts.yaml",
            "deploy/helm/gunicorn-tracer/files/alerts.yaml",
        ),
        (
            "deploy/grafana/gunicorn-tracer.json",
            "deploy/helm/gunicorn-tracer/files/gunicorn-tracer.json",
        ),
    ] {
        let same = std::fs::read(workspace_root().join(from)).unwrap()
            == std::fs::read(workspace_root().join(to)).unwrap();
        assert!(
            same,
            "{to} differs from {from}: run `cargo xtask render-deploy`"
        );
    }
}

#[test]
fn the_drift_check_sees_a_hand_edit() {
    // Proof the comparison above reads the files: the rendered DaemonSet
    // with one value changed is not what is on disk.
    let ds =
        std::fs::read_to_string(workspace_root().join("deploy/kubernetes/daemonset.yaml")).unwrap();
    assert!(ds.starts_with(HEADER));
    let out = Command::new(helm_bin())
        .args(RENDER_ARGS)
        .args([
            "--set",
            "resources.limits.memory=256Mi",
            "--show-only",
            "templates/daemonset.yaml",
        ])
        .current_dir(workspace_root())
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let body = text
        .split_once("# Source: gunicorn-tracer/templates/daemonset.yaml\n")
        .unwrap()
        .1;
    assert_ne!(format!("{HEADER}{body}"), ds);
}
