//! The Kubernetes manifests, validated against the Kubernetes schema with
//! kubernetes-validate (no cluster runs here), and checked for what the
//! tracer needs: host PIDs, its capabilities and nothing more, probes. The
//! container's arguments, probes and capabilities are tried on the real
//! binary, run as the container would run it.
use std::process::Command;
use std::time::Duration;

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
    // The plain manifests set securityContext.appArmorProfile, which
    // Kubernetes has from 1.30 (older clusters: the chart, which renders
    // the annotation for them; helm.rs).
    for version in ["1.30.0", "1.33.0"] {
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
fn the_schema_check_rejects_a_misspelt_field() {
    // The same DaemonSet with one field misspelt: proof that the check above
    // reads the manifests, not just their YAML syntax.
    let ds = std::fs::read_to_string(manifests().join("daemonset.yaml")).unwrap();
    let bad = ds.replacen("readOnlyRootFilesystem:", "readOnlyRootFileSystem:", 1);
    assert_ne!(bad, ds);
    let file = std::env::temp_dir().join(format!("tracer-bad-ds-{}.yaml", std::process::id()));
    std::fs::write(&file, bad).unwrap();
    let out = Command::new(venv().join("bin/kubernetes-validate"))
        .args(["--strict", "-k", "1.33.0"])
        .arg(&file)
        .output()
        .expect("kubernetes-validate is not installed: run `cargo xtask test`");
    let _ = std::fs::remove_file(&file);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("readOnlyRootFileSystem"), "{text}");
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
    assert_eq!(
        caps,
        [
            "BPF",
            "DAC_READ_SEARCH",
            "PERFMON",
            "SETGID",
            "SETUID",
            "SYS_PTRACE"
        ]
    );
    assert_eq!(
        pod["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    // The field, not the annotation deprecated since Kubernetes 1.30 (the
    // chart renders the annotation only for older clusters).
    assert_eq!(
        sc["appArmorProfile"]["type"], "Unconfined",
        "chosen, with the reason beside it"
    );
    assert!(
        ds["spec"]["template"]["metadata"]
            .get("annotations")
            .is_none(),
        "no deprecated AppArmor annotation: {ds}"
    );
    // Started as root to load BPF; the tracer itself then runs as 65534
    // (tests/tests/privdrop.rs), so runAsNonRoot cannot be true.
    assert_eq!(sc["runAsUser"], 0);
    assert!(
        pod.get("priorityClassName").is_none(),
        "an optional tool must not pre-empt workloads"
    );
    let args = strings(&c["args"]);
    // Metrics on the pod IP only; /healthz alone on loopback for the probes.
    assert!(
        args.contains(&"--metrics-addr=$(POD_IP):9464".to_string()),
        "{args:?}"
    );
    assert_eq!(c["env"][0]["name"], "POD_IP");
    assert_eq!(
        c["env"][0]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.podIP"
    );
    assert!(
        args.contains(&"--health-addr=127.0.0.1:9465".to_string()),
        "{args:?}"
    );
    assert!(
        args.contains(&"--pods-dir=/var/log/pods".to_string()),
        "{args:?}"
    );
    // The Service reaches the port the tracer serves metrics on.
    assert_eq!(c["ports"][0]["name"], "metrics");
    assert_eq!(c["ports"][0]["containerPort"], 9464);
    // The probes run `tracer health` against the loopback health port.
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let cmd = strings(&c[probe]["exec"]["command"]);
        assert_eq!(
            cmd,
            [
                "/usr/local/bin/tracer",
                "health",
                "--addr",
                "127.0.0.1:9465"
            ],
            "{probe}"
        );
    }
    let mounts = c["volumeMounts"].as_array().unwrap();
    assert!(mounts.iter().all(|m| m["readOnly"] == true), "{mounts:?}");
    assert!(
        mounts.iter().any(|m| m["mountPath"] == "/var/log/pods"),
        "{mounts:?}"
    );
    assert!(c["resources"]["limits"]["memory"].is_string());
    assert!(c["resources"]["requests"]["cpu"].is_string());
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

/// The DaemonSet's tracer container.
fn container() -> Value {
    load("daemonset.yaml")[0]["spec"]["template"]["spec"]["containers"][0].clone()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// `$(POD_IP)` as the kubelet expands it, here: the host's loopback.
fn expand_pod_ip(a: &str) -> String {
    a.replace("$(POD_IP)", "127.0.0.1")
}

/// `HOST:PORT` with the port moved to `port`.
fn on_port(addr: &str, port: u16) -> String {
    let host = addr.rsplit_once(':').unwrap().0;
    format!("{host}:{port}")
}

/// The container's arguments, `$(POD_IP)` expanded, with the metrics port
/// moved to `port` and the health port to `health`, so a run here does not
/// depend on 9464 and 9465 being free.
fn args_on_port(c: &Value, port: u16, health: u16) -> Vec<String> {
    strings(&c["args"])
        .into_iter()
        .map(|a| expand_pod_ip(&a))
        .map(|a| {
            if let Some(addr) = a.strip_prefix("--metrics-addr=") {
                format!("--metrics-addr={}", on_port(addr, port))
            } else if let Some(addr) = a.strip_prefix("--health-addr=") {
                format!("--health-addr={}", on_port(addr, health))
            } else {
                a
            }
        })
        .collect()
}

/// Capability numbers (linux/capability.h) of the names the manifest uses.
fn cap_number(name: &str) -> u32 {
    match name {
        "DAC_READ_SEARCH" => 2,
        "SETGID" => 6,
        "SETUID" => 7,
        "SYS_PTRACE" => 19,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => panic!("the manifest adds {name}: say here why the tracer needs it"),
    }
}

/// The capabilities the container adds that this machine can grant. This
/// sandbox has no CAP_SYS_RESOURCE to give; the tracer needs it only on
/// kernels before 5.11, which charge BPF maps to RLIMIT_MEMLOCK.
fn grantable_caps(c: &Value) -> Vec<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let bounding = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let (grantable, missing): (Vec<String>, Vec<String>) =
        strings(&c["securityContext"]["capabilities"]["add"])
            .into_iter()
            .partition(|n| bounding & (1 << cap_number(n)) != 0);
    assert!(
        missing.iter().all(|n| n == "SYS_RESOURCE"),
        "this machine cannot grant {missing:?}"
    );
    grantable
}

/// `tracer ARGS` as uid 0 with only `caps`, as in a container that drops
/// ALL and adds them: root's capabilities after exec are its bounding set.
fn tracer_with_caps(caps: &[String], args: &[String]) -> Command {
    let keep: String = caps
        .iter()
        .map(|c| format!(",+{}", c.to_lowercase()))
        .collect();
    let mut cmd = Command::new("setpriv");
    cmd.arg(format!("--bounding-set=-all{keep}"))
        .arg("--inh-caps=-all")
        .arg("--")
        .arg(tracer_bin())
        .args(args);
    cmd
}

#[test]
fn the_container_args_run_the_real_tracer_and_its_probes_answer() {
    require_root();
    let c = container();
    let (port, health) = (free_port(), free_port());
    let args = args_on_port(&c, port, health);
    // Tracer::start_command waits for the `start` event: the arguments
    // parsed and the programs attached with the container's capabilities.
    let mut t = Tracer::start_command(tracer_with_caps(&grantable_caps(&c), &args));
    // Each probe's command, with the health port moved like the args.
    for probe in ["startupProbe", "livenessProbe", "readinessProbe"] {
        let cmd = strings(&c[probe]["exec"]["command"]);
        let out = Command::new(tracer_bin())
            .args(cmd[1..].iter().map(|a| match a.rsplit_once(':') {
                Some((host, _)) if host == "127.0.0.1" => format!("{host}:{health}"),
                _ => a.clone(),
            }))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{probe}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // What the PodMonitor scrapes (the text is first rendered within a second).
    eventually("metrics rendered", Duration::from_secs(5), || {
        get(port, "/metrics")
            .contains("gunicorn_tracer_events_lost_total 0")
            .then_some(())
    });
    // SIGTERM, as the kubelet stops a pod: the summary, then exit 0.
    unsafe { libc::kill(t.pid() as i32, libc::SIGTERM) };
    t.wait_for("summary", Duration::from_secs(10), |e| {
        e["event"] == "summary"
    });
}

/// The stalls a 2-second run of a tracer with `caps` reports about a pipe
/// read that a process of another user (uid 4242: not nobody, which the
/// tracer itself becomes once its programs are attached) was already
/// blocked in.
fn stalls_of_another_user_with(caps: &[String]) -> Vec<Value> {
    let blocked = Proc::spawn(Command::new("setpriv").args([
        "--reuid=4242",
        "--regid=4242",
        "--clear-groups",
        "/usr/bin/python3",
        "-c",
        "import os\nr, w = os.pipe()\nos.read(r, 4)\n",
    ]));
    wait_blocked_in(blocked.pid(), libc::SYS_read, |s| s[3] == 4);
    let pid = blocked.pid().to_string();
    let args = [
        "watch",
        "--format=json",
        "--threshold=200ms",
        "--duration=2s",
        "--pid",
        &pid,
    ]
    .map(String::from);
    let out = tracer_with_caps(caps, &args)
        .output()
        .expect("running the tracer");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|e| e["event"] == "stall")
        .collect()
}

#[test]
fn the_container_capabilities_are_what_reading_other_users_processes_takes() {
    require_root();
    let caps = grantable_caps(&container());
    // With them: the blocked read, its fd kind and the pipe's peers, all
    // read from another user's /proc entries.
    let stalls = stalls_of_another_user_with(&caps);
    assert_eq!(stalls.len(), 1, "{stalls:?}");
    assert_eq!(stalls[0]["fd_kind"], "pipe", "{stalls:?}");
    assert_eq!(stalls[0]["only_self_can_wake"], true, "{stalls:?}");
    // Without either of the two /proc ones that is lost: both are needed.
    for dropped in ["SYS_PTRACE", "DAC_READ_SEARCH"] {
        assert!(caps.iter().any(|c| c == dropped), "{caps:?}");
        let fewer: Vec<String> = caps.iter().filter(|c| *c != dropped).cloned().collect();
        let stalls = stalls_of_another_user_with(&fewer);
        assert!(
            stalls.iter().all(|s| s["fd_kind"] != "pipe"),
            "without {dropped} the tracer still reads another user's process: is it needed? {stalls:?}"
        );
    }
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
    // A build stage and a runtime stage (py-spy's stage is gone: the
    // tracer reads stacks itself).
    assert!(
        d.matches("\nFROM ").count() + usize::from(d.starts_with("FROM ")) >= 2,
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
    // The binary the entrypoint names is the one the runtime stage copies.
    assert!(
        d.lines()
            .any(|l| l.starts_with("COPY --from=build ") && l.ends_with(" /usr/local/bin/tracer")),
        "{d}"
    );
    // The image's default command is the DaemonSet's: both run as tested above.
    let cmd = d
        .lines()
        .find_map(|l| l.strip_prefix("CMD "))
        .expect("a CMD line");
    let cmd: Value = serde_json::from_str(cmd).expect("CMD in exec (JSON) form");
    // Docker has no pod IP to give: the image binds loopback instead (run
    // with host networking outside the DaemonSet, every address would hand
    // any neighbour an inventory of the node's pods).
    let args: Vec<String> = strings(&container()["args"])
        .iter()
        .map(|a| a.replace("$(POD_IP)", "127.0.0.1"))
        .collect();
    assert_eq!(
        strings(&cmd),
        args,
        "Dockerfile CMD and DaemonSet args, $(POD_IP) read as 127.0.0.1"
    );
    assert!(!d.contains("0.0.0.0"), "no wildcard bind in the image: {d}");
    // The tracer reads Python stacks itself: the image ships no py-spy
    // and runs no program.
    assert!(
        !d.lines()
            .filter(|l| !l.trim_start().starts_with('#'))
            .any(|l| l.contains("py-spy")),
        "no py-spy in the image: {d}"
    );
}

#[test]
fn the_runtime_image_has_every_library_the_tracer_links() {
    // debian:bookworm-slim has libc6 and libgcc-s1 and the stage adds
    // nothing: the binary must need no other shared library.
    let base = [
        "linux-vdso.so.1",
        "libc.so.6",
        "libm.so.6",
        "libgcc_s.so.1",
        "libpthread.so.0",
        "libdl.so.2",
        "librt.so.1",
        "ld-linux-x86-64.so.2",
        "ld-linux-aarch64.so.1",
    ];
    let bin = tracer_bin();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask test`",
        bin.display()
    );
    let out = Command::new("ldd")
        .arg(&bin)
        .output()
        .expect("ldd (libc-bin)");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let libs: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|l| l.rsplit('/').next().unwrap())
        .collect();
    assert!(libs.contains(&"libc.so.6"), "{text}");
    let extra: Vec<&&str> = libs.iter().filter(|l| !base.contains(l)).collect();
    assert!(
        extra.is_empty(),
        "not in debian:bookworm-slim: {extra:?}\n{text}"
    );
}
