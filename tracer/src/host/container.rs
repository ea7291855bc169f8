//! Which container and pod a process runs in, learnt from the node alone:
//! the container id from /proc/PID/cgroup, the pod name and namespace from
//! the process's own environment and service-account files. Parsers are
//! pure and tested on real cgroup layouts; the readers are best effort.
use crate::model::Container;

fn is_id(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Runtime prefixes of a container's cgroup directory name (systemd driver).
const PREFIXES: [(&str, &str); 5] = [
    ("cri-containerd-", "containerd"),
    ("crio-", "cri-o"),
    ("docker-", "docker"),
    ("libpod-", "podman"),
    ("containerd-", "containerd"),
];

/// Container id, runtime and pod uid from the text of /proc/PID/cgroup, for
/// cgroup v1 and v2 and the systemd and cgroupfs drivers.
pub fn parse_cgroup(text: &str) -> Option<Container> {
    for line in text.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        for (i, seg) in segs.iter().enumerate().rev() {
            let name = seg.strip_suffix(".scope").unwrap_or(seg);
            if name.contains("conmon") {
                continue; // CRI-O's monitor process, not the container
            }
            let (id, runtime) = match PREFIXES.iter().find(|(p, _)| name.starts_with(p)) {
                Some((p, rt)) => (&name[p.len()..], Some(*rt)),
                None => (name, None),
            };
            if !is_id(id) {
                continue;
            }
            let ancestors = &segs[..i];
            let runtime = runtime.or_else(|| {
                ancestors.iter().find_map(|a| match *a {
                    "docker" => Some("docker"),
                    "machine.slice" => Some("podman"),
                    _ => None,
                })
            });
            let pod_uid = ancestors.iter().rev().find_map(|a| pod_uid(a));
            return Some(Container {
                id: id.to_string(),
                runtime,
                pod_uid,
                ..Default::default()
            });
        }
    }
    None
}

/// `pod<uid>` (cgroupfs) or `kubepods-burstable-pod<uid_with_underscores>.slice`.
fn pod_uid(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let at = seg.rfind("pod")?;
    let uid = seg[at + 3..].replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// Pod name and namespace from a process's environment (NUL-separated):
/// the downward API's POD_NAME/POD_NAMESPACE when set, else HOSTNAME,
/// which Kubernetes sets to the pod name.
pub fn parse_environ(environ: &[u8]) -> (Option<String>, Option<String>) {
    let mut pod = None;
    let mut hostname = None;
    let mut ns = None;
    let mut in_k8s = false;
    for kv in environ.split(|b| *b == 0) {
        let kv = String::from_utf8_lossy(kv);
        let Some((k, v)) = kv.split_once('=') else {
            continue;
        };
        match k {
            "POD_NAME" => pod = Some(v.to_string()),
            "POD_NAMESPACE" => ns = Some(v.to_string()),
            "HOSTNAME" => hostname = Some(v.to_string()),
            "KUBERNETES_SERVICE_HOST" => in_k8s = true,
            _ => {}
        }
    }
    let pod = pod.or(if in_k8s { hostname } else { None });
    (pod, ns)
}

/// Best effort: None for a process that is not in a container.
pub fn of_process(pid: u32) -> Option<Container> {
    let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mut c = parse_cgroup(&cg)?;
    if let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) {
        let (pod, ns) = parse_environ(&env);
        c.pod = pod;
        c.namespace = ns;
    }
    if c.namespace.is_none() {
        // The mounted service-account token, seen through the process's root.
        let path =
            format!("/proc/{pid}/root/var/run/secrets/kubernetes.io/serviceaccount/namespace");
        c.namespace = std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty() && s.len() < 254);
    }
    Some(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "9f5fd6e12a0b4c1b8b1e5c0c9d2a7e3f4b6a8c0d2e4f6a8b0c2d4e6f8a0b2c4d";

    #[test]
    fn containerd_systemd_driver_cgroup_v2() {
        let t = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod0d2c3b5e_1f2a_4b6c_8d9e_0a1b2c3d4e5f.slice/cri-containerd-{ID}.scope\n"
        );
        let c = parse_cgroup(&t).unwrap();
        assert_eq!(c.id, ID);
        assert_eq!(c.runtime, Some("containerd"));
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f")
        );
    }

    #[test]
    fn cgroupfs_driver_and_cgroup_v1() {
        let t = format!(
            "12:pids:/kubepods/besteffort/pod0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f/{ID}\n11:memory:/kubepods/besteffort/pod0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f/{ID}\n0::/\n"
        );
        let c = parse_cgroup(&t).unwrap();
        assert_eq!(c.id, ID);
        assert_eq!(c.runtime, None);
        assert_eq!(
            c.pod_uid.as_deref(),
            Some("0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f")
        );
    }

    #[test]
    fn crio_skips_conmon() {
        let t = format!(
            "0::/kubepods.slice/kubepods-pod0d2c3b5e_1f2a_4b6c_8d9e_0a1b2c3d4e5f.slice/crio-{ID}.scope/container\n"
        );
        let c = parse_cgroup(&t).unwrap();
        assert_eq!((c.id.as_str(), c.runtime), (ID, Some("cri-o")));
        let conmon = format!("0::/kubepods.slice/crio-conmon-{ID}.scope\n");
        assert_eq!(parse_cgroup(&conmon), None);
    }

    #[test]
    fn plain_docker_v1_and_v2() {
        let v2 = format!("0::/system.slice/docker-{ID}.scope\n");
        assert_eq!(parse_cgroup(&v2).unwrap().runtime, Some("docker"));
        let v1 = format!("4:cpu,cpuacct:/docker/{ID}\n");
        let c = parse_cgroup(&v1).unwrap();
        assert_eq!(
            (c.id.as_str(), c.runtime, c.pod_uid),
            (ID, Some("docker"), None)
        );
    }

    #[test]
    fn host_processes_are_not_containers() {
        assert_eq!(
            parse_cgroup("0::/user.slice/user-0.slice/session-3.scope\n"),
            None
        );
        assert_eq!(parse_cgroup("0::/init.scope\n"), None);
        assert_eq!(parse_cgroup("garbage"), None);
        assert_eq!(parse_cgroup(""), None);
    }

    #[test]
    fn pod_and_namespace_from_environment() {
        let env = b"PATH=/usr/bin\0HOSTNAME=web-7d9f8-abcde\0KUBERNETES_SERVICE_HOST=10.0.0.1\0";
        assert_eq!(parse_environ(env), (Some("web-7d9f8-abcde".into()), None));
        let env = b"HOSTNAME=x\0POD_NAME=web-1\0POD_NAMESPACE=shop\0";
        assert_eq!(
            parse_environ(env),
            (Some("web-1".into()), Some("shop".into()))
        );
        // Outside Kubernetes HOSTNAME is just a host name.
        assert_eq!(parse_environ(b"HOSTNAME=laptop\0"), (None, None));
        assert_eq!(parse_environ(b"\xff\xfe\0=\0"), (None, None));
    }

    /// The reader gives what the parser makes of the real file: a container
    /// exactly when this process's own cgroup path names one (host or CI
    /// container alike), with the same id, runtime and pod uid.
    #[test]
    fn this_process_is_read_as_its_cgroup_file_says() {
        let me = std::process::id();
        let text = std::fs::read_to_string(format!("/proc/{me}/cgroup")).unwrap();
        assert!(
            text.lines().any(|l| l.splitn(3, ':').nth(2).is_some()),
            "not a cgroup file: {text:?}"
        );
        let parsed = parse_cgroup(&text);
        let read = of_process(me);
        assert_eq!(read.is_some(), parsed.is_some(), "{text}");
        if let (Some(read), Some(parsed)) = (read, parsed) {
            assert_eq!(
                (read.id, read.runtime, read.pod_uid),
                (parsed.id, parsed.runtime, parsed.pod_uid)
            );
        }
    }

    #[test]
    fn a_process_that_does_not_exist_is_none() {
        // Above pid_max (at most 2^22), so never a live process.
        assert_eq!(of_process(u32::MAX), None);
    }
}
