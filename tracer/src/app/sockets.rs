//! The periodic scan of connections on watched ports, for hung requests:
//! one NETLINK_SOCK_DIAG socket per network namespace the watched
//! processes live in. A namespace the tracer cannot enter (setns needs
//! CAP_SYS_ADMIN) is said once on stderr, skipped, and its ports counted
//! in `ports_unscanned`.
use std::collections::{BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use crate::host::sockdiag::Diag;
use crate::model::SockSnapshot;

/// Ports scanned per network namespace, at most: a pod chooses how many
/// ports it listens on, and each costs the scan a filter entry.
const MAX_PORTS_PER_NS: usize = 64;

pub struct SocketWatch {
    every: Duration,
    last: Instant,
    /// The listening ports of each process that has some, by pid: a
    /// namespace's scan asks for its own watched processes' ports only,
    /// and a process's ports leave with it.
    ports: HashMap<u32, Vec<u16>>,
    /// Ports past `MAX_PORTS_PER_NS` of a namespace at the last scan.
    pub ports_unscanned: u64,
    /// By namespace (`net:[4026531840]`); None once it failed.
    diags: HashMap<String, Option<Diag>>,
    own_ns: Option<String>,
}

fn netns_of(pid: &str) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/ns/net"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

impl SocketWatch {
    /// Scans often enough to report a hung request well within a quarter
    /// of the threshold after it crosses it, and at most once a second.
    pub fn new(request_threshold: Duration) -> SocketWatch {
        let every =
            (request_threshold / 4).clamp(Duration::from_millis(250), Duration::from_secs(1));
        SocketWatch {
            every,
            last: Instant::now(),
            ports: HashMap::new(),
            ports_unscanned: 0,
            diags: HashMap::new(),
            own_ns: netns_of("self"),
        }
    }

    /// `pid` listens on `ports`.
    pub fn add_ports(&mut self, pid: u32, ports: &[u16]) {
        if !ports.is_empty() {
            self.ports.insert(pid, ports.to_vec());
        }
    }

    /// A socket for the namespace `ns` that `pid` is in, made once.
    fn diag_for(&mut self, ns: &str, pid: u32) -> Option<&mut Diag> {
        if !self.diags.contains_key(ns) {
            let made = if self.own_ns.as_deref() == Some(ns) {
                Diag::open()
            } else {
                Diag::open_in_netns_of(pid)
            };
            let diag = match made {
                Ok(d) => Some(d),
                Err(e) => {
                    eprintln!(
                        "tracer: note: cannot ask about connections in network namespace {ns} (pid {pid}): {e}; hung requests there are not seen (entering it takes CAP_SYS_ADMIN)"
                    );
                    None
                }
            };
            self.diags.insert(ns.to_string(), diag);
        }
        self.diags.get_mut(ns)?.as_mut()
    }

    /// The connections on its listening ports (or its master's) that
    /// worker `pid` holds (`inodes`: its sockets), asked now in its network
    /// namespace; None when they cannot be seen.
    pub fn of_worker(
        &mut self,
        pid: u32,
        master: u32,
        inodes: &HashSet<u64>,
    ) -> Option<Vec<SockSnapshot>> {
        let ports: BTreeSet<u16> = [pid, master]
            .iter()
            .filter_map(|p| self.ports.get(p))
            .flatten()
            .copied()
            .take(MAX_PORTS_PER_NS)
            .collect();
        if ports.is_empty() {
            return None;
        }
        let ns = netns_of(&pid.to_string())?;
        let socks = self.diag_for(&ns, pid)?.dump(&ports).ok()?;
        Some(
            socks
                .into_iter()
                .filter(|s| inodes.contains(&s.inode))
                .collect(),
        )
    }

    /// A scan is due (and there is something to scan).
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every && !self.ports.is_empty()
    }

    /// The ports to ask about in each namespace: those its watched
    /// processes listen on, the lowest `MAX_PORTS_PER_NS`; the rest are
    /// counted in `ports_unscanned`.
    fn ports_by_ns(
        &mut self,
        members: &HashMap<String, Vec<u32>>,
    ) -> HashMap<String, BTreeSet<u16>> {
        let live: std::collections::HashSet<u32> = members.values().flatten().copied().collect();
        self.ports.retain(|pid, _| live.contains(pid));
        self.ports_unscanned = 0;
        let mut out = HashMap::new();
        for (ns, pids) in members {
            let mut set: BTreeSet<u16> = pids
                .iter()
                .filter_map(|p| self.ports.get(p))
                .flatten()
                .copied()
                .collect();
            if set.len() > MAX_PORTS_PER_NS {
                self.ports_unscanned += (set.len() - MAX_PORTS_PER_NS) as u64;
                set = set.into_iter().take(MAX_PORTS_PER_NS).collect();
            }
            out.insert(ns.clone(), set);
        }
        out
    }

    /// The connections on watched ports in every network namespace of
    /// `pids`, and the pids whose namespace could not be scanned this time
    /// (a connection of theirs missing from the list says nothing).
    pub fn scan(&mut self, pids: &[u32]) -> (Vec<SockSnapshot>, Vec<u32>) {
        self.last = Instant::now();
        let mut namespaces: HashMap<String, u32> = HashMap::new();
        let mut members: HashMap<String, Vec<u32>> = HashMap::new();
        let mut unscanned = Vec::new();
        for &pid in pids {
            match netns_of(&pid.to_string()) {
                Some(ns) => {
                    namespaces.entry(ns.clone()).or_insert(pid);
                    members.entry(ns).or_default().push(pid);
                }
                // Gone, or its namespace unreadable: nothing seen of it.
                None => unscanned.push(pid),
            }
        }
        // A namespace no watched process is in any more (a pod gone).
        self.diags.retain(|ns, _| namespaces.contains_key(ns));
        let mut ports = self.ports_by_ns(&members);
        let mut out = Vec::new();
        for (ns, pid) in namespaces {
            let ports = ports.remove(&ns).unwrap_or_default();
            if ports.is_empty() {
                continue;
            }
            let scanned = match self.diag_for(&ns, pid) {
                Some(d) => match d.dump(&ports) {
                    Ok(socks) => {
                        out.extend(socks);
                        true
                    }
                    Err(e) => {
                        eprintln!("tracer: warning: socket scan in {ns} failed: {e}");
                        false
                    }
                },
                None => false,
            };
            if !scanned {
                // Its ports go unscanned: counted, so no verdict calls the
                // run clear of hung requests there.
                self.ports_unscanned += ports.len() as u64;
                unscanned.extend(members.remove(&ns).unwrap_or_default());
            }
        }
        (out, unscanned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, item 7: one set of ports, only growing, was asked about in
    /// every namespace. Each namespace's scan asks for its own processes'
    /// ports now, 64 at most (the rest counted), and a process's ports
    /// leave with it.
    #[test]
    fn each_namespace_is_asked_about_its_own_ports_capped() {
        let mut w = SocketWatch::new(Duration::from_secs(30));
        w.add_ports(10, &[8000]);
        w.add_ports(20, &(9000..9100).collect::<Vec<u16>>());
        w.add_ports(30, &[7000]);
        let members = HashMap::from([
            ("net:[1]".to_string(), vec![10]),
            ("net:[2]".to_string(), vec![20, 21]),
        ]);
        let by_ns = w.ports_by_ns(&members);
        assert_eq!(by_ns["net:[1]"], BTreeSet::from([8000]));
        assert_eq!(by_ns["net:[2]"].len(), MAX_PORTS_PER_NS);
        assert!(!by_ns["net:[2]"].contains(&8000));
        assert_eq!(w.ports_unscanned, 100 - MAX_PORTS_PER_NS as u64);
        assert!(!w.ports.contains_key(&30), "pid 30 is no longer watched");
    }
}
