//! How many Gunicorn masters one container may have watched. Discovery
//! watches every master it finds, and each takes entries of the kernel's
//! watch list with its workers: without a cap, one pod that starts
//! thousands of processes named `gunicorn` fills the list for every other
//! pod. Processes outside any container share one tenant, the host.
//! Masters given with --pid are the operator's choice and are not capped.
use std::collections::HashMap;

/// The tenant of processes in no container.
pub const HOST: &str = "host";

pub struct MasterQuota {
    cap: usize,
    /// Each watched master's tenant (a container id, or [`HOST`]).
    tenant_of: HashMap<u32, String>,
    /// Masters not watched, in all.
    refused: u64,
    /// The master most recently refused, and the refusals of its tenant.
    last: Option<(u32, u64)>,
    /// Refusals per tenant refused at least once (each is warned about
    /// once), for at most `MAX_TENANTS` tenants.
    refused_by: HashMap<String, u64>,
}

/// Tenants whose refusals are kept apart: past it, a new tenant's are
/// counted in `refused` only, and it is not warned about.
const MAX_TENANTS: usize = 4096;

/// What [`MasterQuota::admit`] decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Admission {
    Watch,
    /// Over the cap; `first` for the tenant's first refusal (warn then).
    Refuse {
        first: bool,
    },
}

impl MasterQuota {
    pub fn new(cap: usize) -> MasterQuota {
        MasterQuota {
            cap,
            tenant_of: HashMap::new(),
            refused: 0,
            last: None,
            refused_by: HashMap::new(),
        }
    }

    /// Whether master `pid` of `tenant` may be watched; a watched one
    /// counts until [`MasterQuota::release`].
    pub fn admit(&mut self, pid: u32, tenant: &str) -> Admission {
        if self.tenant_of.contains_key(&pid) {
            return Admission::Watch;
        }
        let held = self.tenant_of.values().filter(|t| *t == tenant).count();
        if held < self.cap {
            self.tenant_of.insert(pid, tenant.to_string());
            return Admission::Watch;
        }
        self.refused += 1;
        let first = !self.refused_by.contains_key(tenant);
        if first && self.refused_by.len() >= MAX_TENANTS {
            self.last = Some((pid, 1));
            return Admission::Refuse { first: false };
        }
        let n = self.refused_by.entry(tenant.to_string()).or_insert(0);
        *n += 1;
        self.last = Some((pid, *n));
        Admission::Refuse { first }
    }

    /// A master exited (or was never watched after all).
    pub fn release(&mut self, pid: u32) {
        self.tenant_of.remove(&pid);
    }

    pub fn refused(&self) -> u64 {
        self.refused
    }

    /// The last master refused, with its tenant's refusals so far.
    pub fn last_refused(&self) -> Option<(u32, u64)> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tenant_has_its_own_cap_and_is_warned_about_once() {
        let mut q = MasterQuota::new(2);
        assert_eq!(q.admit(1, "pod-a"), Admission::Watch);
        assert_eq!(q.admit(2, "pod-a"), Admission::Watch);
        assert_eq!(q.admit(3, "pod-a"), Admission::Refuse { first: true });
        assert_eq!(q.admit(4, "pod-a"), Admission::Refuse { first: false });
        // Another tenant is not charged for the first one's masters.
        assert_eq!(q.admit(5, "pod-b"), Admission::Watch);
        assert_eq!(q.admit(6, HOST), Admission::Watch);
        assert_eq!(q.refused(), 2);
        assert_eq!(q.last_refused(), Some((4, 2)));
        // A master seen twice (at its exec, then by a scan) counts once.
        assert_eq!(q.admit(1, "pod-a"), Admission::Watch);
        // One exits: room for one more.
        q.release(1);
        assert_eq!(q.admit(7, "pod-a"), Admission::Watch);
        assert_eq!(q.admit(8, "pod-a"), Admission::Refuse { first: false });
    }

    #[test]
    fn nothing_refused_names_no_one() {
        let mut q = MasterQuota::new(1);
        assert_eq!(q.admit(1, HOST), Admission::Watch);
        assert_eq!(q.refused(), 0);
        assert_eq!(q.last_refused(), None);
    }
}
