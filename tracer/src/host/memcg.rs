//! Memory cgroups: the limit an OOM-killed process ran into, and the usage
//! it reached. cgroup v1 (the memory controller's own hierarchy) or v2 (the
//! unified one), whichever this host mounts, found at run time from
//! /proc/self/mountinfo. Read once per OOM kill, never on a hot path.
use std::fs;
use std::path::{Path, PathBuf};

use crate::model::MemoryCgroup;

/// Which cgroup version a memory hierarchy is, and so its file names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

impl Version {
    fn limit_file(self) -> &'static str {
        match self {
            Version::V1 => "memory.limit_in_bytes",
            Version::V2 => "memory.max",
        }
    }

    /// Peak first: by the time user space reads, the victim's memory may
    /// already be freed.
    fn usage_files(self) -> [&'static str; 2] {
        match self {
            Version::V1 => ["memory.max_usage_in_bytes", "memory.usage_in_bytes"],
            Version::V2 => ["memory.peak", "memory.current"],
        }
    }
}

/// A mounted memory hierarchy: where it is, and which part of the
/// hierarchy the mount shows (not "/" inside a cgroup namespace).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    pub version: Version,
    pub mount_point: PathBuf,
    pub root: String,
}

/// The memory hierarchies of /proc/self/mountinfo: v1's memory controller
/// and the unified v2 one, in that order (a hybrid host has both, and the
/// limits are then set in v1).
pub fn parse_mountinfo(text: &str) -> Vec<Hierarchy> {
    let mut found = Vec::new();
    for line in text.lines() {
        let Some((head, tail)) = line.split_once(" - ") else {
            continue;
        };
        let head: Vec<&str> = head.split_whitespace().collect();
        let tail: Vec<&str> = tail.split_whitespace().collect();
        let (Some(root), Some(mount_point), Some(fstype)) =
            (head.get(3), head.get(4), tail.first())
        else {
            continue;
        };
        let version = match *fstype {
            "cgroup"
                if tail
                    .get(2)
                    .is_some_and(|o| o.split(',').any(|o| o == "memory")) =>
            {
                Version::V1
            }
            "cgroup2" => Version::V2,
            _ => continue,
        };
        found.push(Hierarchy {
            version,
            mount_point: PathBuf::from(mount_point),
            root: root.to_string(),
        });
    }
    found.sort_by_key(|h| h.version == Version::V2);
    found
}

/// The process's path in a hierarchy, from /proc/PID/cgroup: the
/// `N:memory:/path` line for v1, `0::/path` for v2.
pub fn parse_cgroup_path(text: &str, version: Version) -> Option<String> {
    text.lines().find_map(|l| {
        let mut parts = l.splitn(3, ':');
        let (id, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let hit = match version {
            Version::V1 => controllers.split(',').any(|c| c == "memory"),
            Version::V2 => id == "0" && controllers.is_empty(),
        };
        hit.then(|| path.to_string())
    })
}

/// A limit file's value: None for "no limit" (v2's `max`, v1's page
/// counter maximum, anything from 2^62 up).
pub fn parse_limit(text: &str) -> Option<u64> {
    let v: u64 = text.trim().parse().ok()?;
    (v < 1 << 62).then_some(v)
}

fn read_u64(dir: &Path, file: &str) -> Option<u64> {
    fs::read_to_string(dir.join(file)).ok()?.trim().parse().ok()
}

/// The directory of `path` under the hierarchy's mount (a path outside
/// the mount's root cannot be read).
fn dir_of(h: &Hierarchy, path: &str) -> Option<PathBuf> {
    let rel = if h.root == "/" {
        path
    } else {
        path.strip_prefix(h.root.as_str())?
    };
    Some(h.mount_point.join(rel.trim_start_matches('/')))
}

/// From the process's cgroup up to the hierarchy's root, the first with a
/// limit: the one an OOM kill ran into. Without any, the process's own.
pub fn nearest_limited(h: &Hierarchy, path: &str) -> Option<MemoryCgroup> {
    let usage = |dir: &Path| {
        h.version
            .usage_files()
            .iter()
            .find_map(|f| read_u64(dir, f))
    };
    let mut at = path.to_string();
    loop {
        let dir = dir_of(h, &at)?;
        if let Some(limit) = fs::read_to_string(dir.join(h.version.limit_file()))
            .ok()
            .and_then(|t| parse_limit(&t))
        {
            return Some(MemoryCgroup {
                path: at,
                limit_bytes: Some(limit),
                usage_bytes: usage(&dir),
            });
        }
        match at.rfind('/') {
            Some(0) if at.len() > 1 => at = "/".into(),
            Some(i) if i > 0 => at.truncate(i),
            _ => break,
        }
    }
    let dir = dir_of(h, path)?;
    dir.is_dir().then(|| MemoryCgroup {
        path: path.to_string(),
        limit_bytes: None,
        usage_bytes: usage(&dir),
    })
}

/// The memory cgroup whose limit applies to `pid`, with its usage; None
/// when the process is gone or no memory hierarchy is readable.
pub fn of_process(pid: u32) -> Option<MemoryCgroup> {
    of_cgroups(&fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?)
}

/// The memory cgroup a /proc/PID/cgroup text names, with its limit.
pub fn of_cgroups(cgroups: &str) -> Option<MemoryCgroup> {
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    parse_mountinfo(&mounts).iter().find_map(|h| {
        let path = parse_cgroup_path(cgroups, h.version)?;
        nearest_limited(h, &path)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
33 25 0:29 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
34 25 0:30 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw";

    #[test]
    fn finds_the_memory_hierarchies_v1_first() {
        let h = parse_mountinfo(HYBRID);
        assert_eq!(h.len(), 2);
        assert_eq!(h[0].version, Version::V1);
        assert_eq!(h[0].mount_point, PathBuf::from("/sys/fs/cgroup/memory"));
        assert_eq!(h[1].version, Version::V2);
        let pure = "29 23 0:26 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw";
        assert_eq!(parse_mountinfo(pure)[0].version, Version::V2);
    }

    #[test]
    fn reads_the_path_for_each_version() {
        let text = "9:name=systemd:/\n4:memory:/pods/web\n1:cpu,cpuacct:/x\n0::/unified/web\n";
        assert_eq!(
            parse_cgroup_path(text, Version::V1).as_deref(),
            Some("/pods/web")
        );
        assert_eq!(
            parse_cgroup_path(text, Version::V2).as_deref(),
            Some("/unified/web")
        );
        assert_eq!(parse_cgroup_path("0::/\n", Version::V1), None);
    }

    #[test]
    fn unlimited_is_none() {
        assert_eq!(parse_limit("419430400\n"), Some(400 << 20));
        assert_eq!(parse_limit("9223372036854771712\n"), None);
        assert_eq!(parse_limit("max\n"), None);
    }

    #[test]
    fn walks_up_to_the_cgroup_that_has_the_limit() {
        let base = std::env::temp_dir().join(format!("tracer-memcg-{}", std::process::id()));
        let leaf = base.join("pod/container");
        fs::create_dir_all(&leaf).unwrap();
        fs::write(base.join("pod/memory.max"), "419430400\n").unwrap();
        fs::write(base.join("pod/memory.peak"), "419430400\n").unwrap();
        fs::write(leaf.join("memory.max"), "max\n").unwrap();
        fs::write(leaf.join("memory.current"), "1000\n").unwrap();
        let h = Hierarchy {
            version: Version::V2,
            mount_point: base.clone(),
            root: "/".into(),
        };
        let m = nearest_limited(&h, "/pod/container").unwrap();
        assert_eq!(m.path, "/pod");
        assert_eq!(
            (m.limit_bytes, m.usage_bytes),
            (Some(400 << 20), Some(400 << 20))
        );
        fs::remove_file(base.join("pod/memory.max")).unwrap();
        let m = nearest_limited(&h, "/pod/container").unwrap();
        assert_eq!(
            (m.path.as_str(), m.limit_bytes, m.usage_bytes),
            ("/pod/container", None, Some(1000))
        );
        fs::remove_dir_all(&base).unwrap();
    }
}
