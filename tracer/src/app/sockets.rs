//! The periodic scan of connections on watched ports, for hung requests:
//! one NETLINK_SOCK_DIAG socket per network namespace the watched
//! processes live in. A namespace the tracer cannot enter (setns needs
//! CAP_SYS_ADMIN) is said once on stderr and skipped.
use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::host::sockdiag::Diag;
use crate::model::SockSnapshot;

pub struct SocketWatch {
    every: Duration,
    last: Instant,
    ports: BTreeSet<u16>,
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
            ports: BTreeSet::new(),
            diags: HashMap::new(),
            own_ns: netns_of("self"),
        }
    }

    pub fn add_port(&mut self, port: u16) {
        self.ports.insert(port);
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

    /// A scan is due (and there is something to scan).
    pub fn due(&self) -> bool {
        self.last.elapsed() >= self.every && !self.ports.is_empty()
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
        let ports = self.ports.clone();
        let mut out = Vec::new();
        for (ns, pid) in namespaces {
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
                unscanned.extend(members.remove(&ns).unwrap_or_default());
            }
        }
        (out, unscanned)
    }
}
