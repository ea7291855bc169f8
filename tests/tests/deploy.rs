//! The Kubernetes manifests, validated against the Kubernetes schema with
//! kubernetes-validate (no cluster runs here), and checked for what the
//! tracer needs: host PIDs, its capabilities and nothing more, probes.
use std::process::Command;

use tests::*;

fn manifests() -> std::path::PathBuf {
    workspace_root().join("deploy/kubernetes")
}

/// Every document of a YAML file, as JSON (PyYAML comes with kubernetes-validate).
fn load(file: &str) -> Vec<Value> {
    let out = Command::new(python())
        .args(["-c", "import json, sys, yaml; print(json.dumps(list(yaml.safe_load_all(open(sys.argv[1])))))"])
        .arg(manifests().join(file))
        .output()
        .expect("running the venv's python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn manifests_validate_against_the_kubernetes_schema() {
    for version in ["1.28.0", "1.33.0"] {
        let out = Command::new(venv().join("bin/kubernetes-validate"))
            .args(["--strict", "-k", version])
            .args([
                "namespace.yaml",
                "serviceaccount.yaml",
                "daemonset.yaml",
                "service.yaml",
                "networkpolicy.yaml",
            ])
            .current_dir(manifests())
            .output()
            .expect("kubernetes-validate is not installed: run `cargo xtask test`");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "kubernetes {version}: {text}");
        assert_eq!(text.matches("passed").count(), 5, "{text}");
    }
}

#[test]
fn daemonset_has_what_the_tracer_needs_and_no_more() {
    let ds = &load("daemonset.yaml")[0];
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "workers of every pod must be visible");
    assert!(pod.get("hostNetwork").is_none() && pod.get("hostIPC").is_none());
    let c = &pod["containers"][0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let mut caps: Vec<&str> = sc["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    caps.sort();
    // No SYS_RESOURCE: BPF memory is charged to the memory cgroup since
    // Linux 5.11, and the tracer needs 5.15.
    assert_eq!(caps, ["BPF", "DAC_READ_SEARCH", "PERFMON", "SYS_PTRACE"]);
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let apparmor = &ds["spec"]["template"]["metadata"]["annotations"]["container.apparmor.security.beta.kubernetes.io/tracer"];
    assert_eq!(apparmor, "unconfined", "chosen, with the reason beside it");
    assert!(
        pod.get("priorityClassName").is_none(),
        "an optional tool must not pre-empt workloads"
    );
    let args: Vec<&str> = c["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    // Metrics on the pod IP only; /healthz alone on loopback for the probes.
    assert!(args.contains(&"--metrics-addr=$(POD_IP):9464"), "{args:?}");
    assert_eq!(c["env"][0]["name"], "POD_IP");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert!(args.contains(&"--health-addr=127.0.0.1:9465"), "{args:?}");
    assert!(args.contains(&"--pods-dir=/var/log/pods"), "{args:?}");
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let cmd = &c[probe]["exec"]["command"];
        assert_eq!(cmd[1], "health", "{probe}: {cmd}");
        assert_eq!(cmd[3], "127.0.0.1:9465", "{probe}: {cmd}");
    }
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().all(|m| m["readOnly"] == true), "{mounts:?}");
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/var/log/pods"),
        "{mounts:?}"
    );
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["cpu"].is_string());
    // The CLI accepts exactly what the manifest passes.
    let (code, help, err) = run_tracer(&["watch", "--help"]);
    assert_eq!(code, 0, "{err}");
    for flag in ["--metrics-addr", "--health-addr", "--pods-dir"] {
        assert!(help.contains(flag), "{flag} missing from: {help}");
    }
    let (code, _, err) = run_tracer(&["health", "--help"]);
    assert_eq!(code, 0, "{err}");
}

#[test]
fn metrics_reach_the_monitoring_namespace_only() {
    let np = &load("networkpolicy.yaml")[0];
    let ds = &load("daemonset.yaml")[0];
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"],
        ds["spec"]["template"]["metadata"]["labels"]
    );
    let rule = &np["spec"]["ingress"][0];
    assert_eq!(
        rule["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "monitoring"
    );
    assert_eq!(rule["ports"][0]["port"], 9464);
    assert_eq!(np["spec"]["ingress"].as_array().unwrap().len(), 1);
    assert_eq!(np["spec"]["egress"], serde_json::json!([]));
}

#[test]
fn service_and_podmonitor_select_the_daemonset_pods() {
    let ds = &load("daemonset.yaml")[0];
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    let svc = &load("service.yaml")[0];
    assert_eq!(&svc["spec"]["selector"], labels);
    assert_eq!(svc["spec"]["clusterIP"], "None");
    assert_eq!(svc["spec"]["ports"][0]["targetPort"], "metrics");
    let pm = &load("podmonitor.yaml")[0];
    assert_eq!(pm["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(pm["kind"], "PodMonitor");
    assert_eq!(&pm["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["port"], "metrics");
    assert_eq!(pm["spec"]["podMetricsEndpoints"][0]["path"], "/metrics");
    let ports = &ds["spec"]["template"]["spec"]["containers"][0]["ports"];
    assert_eq!(ports[0]["name"], "metrics");
}

#[test]
fn dockerfile_builds_in_stages_and_runs_the_tracer() {
    let d = std::fs::read_to_string(workspace_root().join("Dockerfile")).unwrap();
    assert!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")) >= 3,
        "multi-stage"
    );
    assert!(
        d.contains("cargo xtask build"),
        "built with the project's recipe"
    );
    assert!(
        d.contains("FROM debian:bookworm-slim"),
        "a minimal runtime image"
    );
    assert!(d.contains(r#"ENTRYPOINT ["/usr/local/bin/tracer"]"#));
}
