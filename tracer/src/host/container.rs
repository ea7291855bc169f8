//! Which container and pod a process runs in, learnt from the node alone:
//! the container id and pod UID from /proc/PID/cgroup; the pod name and
//! namespace from the kubelet's log directories (`<namespace>_<pod>_<uid>`
//! under --pods-dir, which a pod cannot forge), else as the process claims
//! them in its environment and service-account file. Parsers are pure and
//! tested on real layouts; the readers are best effort and bounded.
//!
//! Files inside the container are read through `host::rootfs` (never out
//! of its root, never a device, FIFO or pseudo-filesystem file, capped at
//! `MAX_FILE` bytes).
use std::io::Read;
use std::path::{Path, PathBuf};

use crate::model::{Container, PodSource};

/// Bytes read from a file inside a container, at most.
pub const MAX_FILE: usize = 4096;
/// Bytes of /proc/PID/environ read, at most.
const MAX_ENVIRON: u64 = 64 * 1024;

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
///
/// Read from the root down: a container may create cgroups below its own
/// (cgroup v2 delegation), so anything under the first container id is its
/// own doing. Under a pod's cgroup the container is the first id below it;
/// a second pod segment makes the pod unknown (a process claiming another
/// pod's uid), and the container stays the first one found.
pub fn parse_cgroup(text: &str) -> Option<Container> {
    for line in text.lines() {
        // hierarchy-id:controllers:path
        let Some(path) = line.splitn(3, ':').nth(2) else {
            continue;
        };
        let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let pods: Vec<usize> = (0..segs.len())
            .filter(|&i| pod_uid(segs[i]).is_some())
            .collect();
        let below = pods.first().map_or(0, |&p| p + 1);
        let found = segs
            .iter()
            .enumerate()
            .skip(below)
            .find_map(|(i, seg)| container_id(seg).map(|c| (i, c)));
        // Outside Kubernetes no pod name is claimed: the deepest id is the
        // container (as nested runtimes name it).
        let found = match (found, pods.is_empty()) {
            (Some(f), false) => Some(f),
            (_, true) => segs
                .iter()
                .enumerate()
                .rev()
                .find_map(|(i, seg)| container_id(seg).map(|c| (i, c))),
            (None, false) => None,
        };
        let Some((i, (id, runtime))) = found else {
            continue;
        };
        let ancestors = &segs[..i];
        let runtime = runtime.or_else(|| {
            ancestors.iter().find_map(|a| match *a {
                "docker" => Some("docker"),
                "machine.slice" => Some("podman"),
                _ => None,
            })
        });
        let pod_uid = match pods.as_slice() {
            [one] => pod_uid(segs[*one]),
            _ => None,
        };
        return Some(Container {
            id: id.to_string(),
            runtime,
            pod_uid,
            ..Default::default()
        });
    }
    None
}

/// A container's id (and its runtime, when the name says) from one cgroup
/// directory name.
fn container_id(seg: &str) -> Option<(&str, Option<&'static str>)> {
    let name = seg.strip_suffix(".scope").unwrap_or(seg);
    if name.contains("conmon") {
        return None; // CRI-O's monitor process, not the container
    }
    let (id, runtime) = match PREFIXES.iter().find(|(p, _)| name.starts_with(p)) {
        Some((p, rt)) => (&name[p.len()..], Some(*rt)),
        None => (name, None),
    };
    is_id(id).then_some((id, runtime))
}

/// `pod<uid>` (cgroupfs) or `kubepods-burstable-pod<uid_with_underscores>.slice`.
fn pod_uid(seg: &str) -> Option<String> {
    let seg = seg.strip_suffix(".slice").unwrap_or(seg);
    let at = seg.rfind("pod")?;
    let uid = seg[at + 3..].replace('_', "-");
    (uid.len() == 36 && uid.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')).then_some(uid)
}

/// A DNS-1123 label (a namespace): 1-63 of [a-z0-9-], alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A DNS-1123 subdomain (a pod name): up to 253, dot-separated labels.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// Namespace and pod name of the pod with `uid`, from the names of the
/// kubelet's log directories, `<namespace>_<pod>_<uid>`.
pub fn pod_from_log_dirs<'a>(
    names: impl IntoIterator<Item = &'a str>,
    uid: &str,
) -> Option<(String, String)> {
    names.into_iter().find_map(|name| {
        let rest = name.strip_suffix(uid)?.strip_suffix('_')?;
        let (ns, pod) = rest.split_once('_')?;
        (is_dns_label(ns) && is_dns_subdomain(pod)).then(|| (ns.to_string(), pod.to_string()))
    })
}

/// Pod name and namespace from a process's environment (NUL-separated):
/// the downward API's POD_NAME/POD_NAMESPACE when set, else HOSTNAME,
/// which Kubernetes sets to the pod name. Values that are not valid names
/// are dropped: they are the process's own claim, and end up in labels.
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
    (
        pod.filter(|p| is_dns_subdomain(p)),
        ns.filter(|n| is_dns_label(n)),
    )
}

/// The first `cap` bytes of a /proc file.
fn read_proc(path: &str, cap: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(cap)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

/// The namespace a pod's service-account file claims.
fn namespace_file(pid: u32) -> Option<String> {
    let f = super::rootfs::read_in_root(
        pid,
        "/var/run/secrets/kubernetes.io/serviceaccount/namespace",
        MAX_FILE,
    )
    .ok()?;
    let ns = String::from_utf8(f.bytes).ok()?.trim().to_string();
    is_dns_label(&ns).then_some(ns)
}

/// Where the kubelet keeps pod log directories (`--pods-dir`).
pub const DEFAULT_PODS_DIR: &str = "/var/log/pods";

/// The names in the pods directory, at most this many read.
const MAX_POD_DIRS: usize = 65536;

fn log_dir_names(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .take(MAX_POD_DIRS)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Best effort: None for a process that is not in a container. The pod's
/// name comes from `pods_dir` when the kubelet's directory for its UID is
/// there (`pod_source: log_dir`), else from what the process claims
/// (`pod_source: environment`).
pub fn of_process(pid: u32, pods_dir: &Path) -> Option<Container> {
    let cg = read_proc(&format!("/proc/{pid}/cgroup"), 64 * 1024)?;
    let mut c = parse_cgroup(&String::from_utf8_lossy(&cg))?;
    if let Some(uid) = c.pod_uid.as_deref()
        && let Some((ns, pod)) =
            pod_from_log_dirs(log_dir_names(pods_dir).iter().map(|s| s.as_str()), uid)
    {
        c.namespace = Some(ns);
        c.pod = Some(pod);
        c.pod_source = Some(PodSource::LogDir);
        return Some(c);
    }
    if let Some(env) = read_proc(&format!("/proc/{pid}/environ"), MAX_ENVIRON) {
        let (pod, ns) = parse_environ(&env);
        c.pod = pod;
        c.namespace = ns;
    }
    if c.namespace.is_none() {
        c.namespace = namespace_file(pid);
    }
    if c.pod.is_some() || c.namespace.is_some() {
        c.pod_source = Some(PodSource::Environment);
    }
    Some(c)
}

/// The pods directory to use, when it exists.
pub fn pods_dir(arg: Option<PathBuf>) -> PathBuf {
    arg.unwrap_or_else(|| PathBuf::from(DEFAULT_PODS_DIR))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::CString;

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

    /// Issue 20, item 14: a container that creates cgroups below its own
    /// could claim another pod: the deepest id and the nearest pod above it
    /// were taken.
    #[test]
    fn cgroups_a_container_made_below_its_own_claim_nothing() {
        const FAKE: &str = "1111111111111111111111111111111111111111111111111111111111111111";
        let a = "0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f";
        let b = "99999999-8888-7777-6666-555555555555";
        let t = format!("0::/kubepods/besteffort/pod{a}/{ID}/pod{b}/{FAKE}\n");
        let c = parse_cgroup(&t).unwrap();
        assert_eq!(c.id, ID, "the first container below the pod");
        assert_eq!(c.pod_uid, None, "two pod segments: which pod is unknown");
        // One pod segment, fake ids below the container: the real one.
        let t = format!("0::/kubepods/besteffort/pod{a}/{ID}/{FAKE}\n");
        let c = parse_cgroup(&t).unwrap();
        assert_eq!((c.id.as_str(), c.pod_uid.as_deref()), (ID, Some(a)));
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
        let read = of_process(me, Path::new(DEFAULT_PODS_DIR));
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
        assert_eq!(of_process(u32::MAX, Path::new(DEFAULT_PODS_DIR)), None);
    }

    #[test]
    fn dns_names() {
        assert!(is_dns_label("shop") && is_dns_label("a-1") && is_dns_label("0"));
        assert!(!is_dns_label("") && !is_dns_label("-a") && !is_dns_label("a-"));
        assert!(!is_dns_label("Shop") && !is_dns_label("a_b") && !is_dns_label("a.b"));
        assert!(!is_dns_label(&"a".repeat(64)));
        assert!(is_dns_subdomain("web-7d9f8-abcde") && is_dns_subdomain("a.b-c"));
        assert!(!is_dns_subdomain("a..b") && !is_dns_subdomain(&"a".repeat(254)));
        assert!(!is_dns_subdomain("x\u{1b}[2J"));
    }

    #[test]
    fn pod_identity_from_the_kubelet_log_directories() {
        let uid = "0d2c3b5e-1f2a-4b6c-8d9e-0a1b2c3d4e5f";
        let names = [
            "kube-system_coredns-1_11111111-1f2a-4b6c-8d9e-0a1b2c3d4e5f".to_string(),
            format!("shop_web-7d9f8-abcde_{uid}"),
        ];
        assert_eq!(
            pod_from_log_dirs(names.iter().map(|s| s.as_str()), uid),
            Some(("shop".into(), "web-7d9f8-abcde".into()))
        );
        let bad = [
            format!("Shop_web_{uid}"),
            format!("_web_{uid}"),
            format!("shop__{uid}"),
        ];
        assert_eq!(pod_from_log_dirs(bad.iter().map(|s| s.as_str()), uid), None);
    }

    #[test]
    fn claimed_names_are_validated() {
        let long = format!("POD_NAME={}\0POD_NAMESPACE=shop\0", "a".repeat(300));
        assert_eq!(parse_environ(long.as_bytes()), (None, Some("shop".into())));
        let evil = b"POD_NAME=web\x1b[2J\0POD_NAMESPACE=Kube_System\0";
        assert_eq!(parse_environ(evil), (None, None));
    }

    /// Issue 20, item 3: the service-account namespace file was opened,
    /// and only then checked: a device node there ran its driver's open (a
    /// `c 10 130` node arms /dev/watchdog). It is never opened now.
    #[test]
    fn a_device_node_as_the_namespace_file_is_never_opened() {
        let d = std::env::temp_dir().join(format!("tracer-sa-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let dir = d.join("var/run/secrets/kubernetes.io/serviceaccount");
        std::fs::create_dir_all(&dir).unwrap();
        let node = CString::new(dir.join("namespace").to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; /dev/null's numbers (1, 3).
        if unsafe { libc::mknod(node.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } != 0 {
            eprintln!("skipped: mknod needs CAP_MKNOD");
            return;
        }
        // SAFETY: plain syscalls on fds this test owns.
        let ino = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(ino >= 0);
        assert!(unsafe { libc::inotify_add_watch(ino, node.as_ptr(), libc::IN_OPEN) } >= 0);
        let child = super::super::chrooted::Chrooted::spawn(&d);
        let ns = namespace_file(child.pid);
        let mut buf = [0u8; 4096];
        // SAFETY: reading our own inotify fd into a buffer we own.
        let opened = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) } > 0;
        drop(child);
        // SAFETY: our own fd.
        unsafe { libc::close(ino) };
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(ns, None);
        assert!(!opened, "the device node was opened");
    }
}
