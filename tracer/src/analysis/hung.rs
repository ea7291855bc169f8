//! Requests that never get an answer while their worker lives (a gthread
//! pool thread stuck, a greenlet waiting forever on a cooperative socket):
//! invisible to the heartbeat, and to everything else until the proxy gives
//! up with 504. Found from the kernel's socket diagnostics: a connection on
//! a watched port that received a request and sent nothing since, for
//! longer than --request-threshold. Reported once while it hangs, ended
//! when it is answered, the client leaves, or it is closed.
use std::collections::{HashMap, HashSet};

use super::Enricher;
use super::correlator::Correlator;
use crate::model::{HungOutcome, HungRequest, Output, Role, SockSnapshot, TcpState};

const MS: u64 = 1_000_000;
/// Threads named in a hung request, at most (the rest are counted).
const MAX_THREADS_LISTED: usize = 32;
/// New hung requests whose owner is looked up per socket scan, at most.
const MAX_LOOKUPS_PER_SCAN: usize = 8;

/// A hung request that was reported and has not ended.
#[derive(Debug, Clone)]
pub(super) struct HungActive {
    pub report: HungRequest,
    /// Kernel time of the request's last byte.
    since_ns: u64,
    /// The kernel reported its close as an early close (nothing sent).
    dropped: bool,
}

/// What the correlator keeps between socket scans.
#[derive(Debug, Default)]
pub(super) struct HungState {
    pub active: HashMap<u64, HungActive>,
    /// Hung sockets no watched worker holds (still in the listen queue, or
    /// another process's): not looked up again while they last.
    unowned: HashSet<u64>,
}

/// How a reported hang ended, from the socket's state at this scan (None:
/// still hanging). Answered only when the client acknowledged more bytes
/// than when the hang was reported. A connection gone since the last scan
/// was dropped when the kernel reported its close as an early close;
/// otherwise how it ended is not known (answered and closed between two
/// scans, a close event lost, or closed by a process not watched).
fn outcome(now: Option<&SockSnapshot>, a: &HungActive) -> Option<HungOutcome> {
    match now {
        None if a.dropped => Some(HungOutcome::Dropped),
        None => Some(HungOutcome::Unknown),
        Some(s) if s.bytes_acked > a.report.bytes_out => Some(HungOutcome::Answered),
        Some(s) if s.state == TcpState::CloseWait => Some(HungOutcome::ClientClosed),
        Some(_) => None,
    }
}

impl Correlator {
    /// Sets --request-threshold.
    pub fn set_request_threshold(&mut self, ns: u64) {
        self.request_threshold_ns = ns;
    }

    pub fn request_threshold_ms(&self) -> u64 {
        self.request_threshold_ns / MS
    }

    /// One scan of the connections on watched ports, at kernel time `now_ns`.
    /// `unscanned`: processes whose network namespace could not be scanned
    /// this time; their connections' absence says nothing.
    pub fn on_sockets(
        &mut self,
        socks: &[SockSnapshot],
        unscanned: &[u32],
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Vec<Output> {
        self.requests.note(socks, now_ns);
        let by_inode: HashMap<u64, &SockSnapshot> = socks.iter().map(|s| (s.inode, s)).collect();
        let mut out = self.end_hung(&by_inode, unscanned, now_ns);
        self.hung.unowned.retain(|i| by_inode.contains_key(i));
        let threshold_ms = self.request_threshold_ms();
        // Inode 0: still in the listen queue, held by no process yet.
        let unanswered = socks
            .iter()
            .filter(|s| s.inode != 0 && s.unanswered_for(threshold_ms));
        // Each lookup walks fd tables the workers size: a few per scan, the
        // rest at the next (they stay unanswered meanwhile).
        let new = unanswered
            .filter(|s| {
                !self.hung.active.contains_key(&s.inode) && !self.hung.unowned.contains(&s.inode)
            })
            .take(MAX_LOOKUPS_PER_SCAN)
            .collect::<Vec<_>>();
        for s in new {
            match self.new_hung(s, now_ns, enr) {
                Some(o) => out.push(o),
                None => {
                    self.hung.unowned.insert(s.inode);
                }
            }
        }
        out
    }

    /// Ends the reported hangs whose connection was answered, left, or
    /// closed; those of a process whose namespace was not scanned wait.
    fn end_hung(
        &mut self,
        by_inode: &HashMap<u64, &SockSnapshot>,
        unscanned: &[u32],
        now_ns: u64,
    ) -> Vec<Output> {
        let ended: Vec<(u64, HungOutcome)> = self
            .hung
            .active
            .iter()
            .filter(|(_, a)| !unscanned.contains(&a.report.pid))
            .filter_map(|(i, a)| outcome(by_inode.get(i).copied(), a).map(|o| (*i, o)))
            .collect();
        ended
            .into_iter()
            .filter_map(|(inode, outcome)| {
                let a = self.hung.active.remove(&inode)?;
                let r = a.report;
                Some(Output::HungRequestEnd {
                    ts_ns: now_ns,
                    pid: r.pid,
                    master_pid: r.master_pid,
                    fd: r.fd,
                    peer: r.peer,
                    local_port: r.local_port,
                    waited_ms: now_ns.saturating_sub(a.since_ns) / MS,
                    outcome,
                    container: r.container,
                })
            })
            .collect()
    }

    /// Reports a hung request, naming the worker that holds the connection
    /// and what holds the worker; None when no live watched worker has it.
    fn new_hung(
        &mut self,
        s: &SockSnapshot,
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Option<Output> {
        let workers: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| p.alive && p.role != Role::Master)
            .map(|(pid, _)| *pid)
            .collect();
        let (pid, fd) = enr.socket_owner(s.inode, &workers)?;
        let stall = self.current_stall(pid, now_ns);
        let threshold_ms = self.request_threshold_ms();
        let mut listed = enr.blocked_threads(pid);
        let omitted = listed.len().saturating_sub(MAX_THREADS_LISTED) as u64;
        listed.truncate(MAX_THREADS_LISTED);
        let p = self.procs.get_mut(&pid)?;
        let report = HungRequest {
            pid,
            master_pid: p.master,
            role: p.role,
            fd: Some(fd),
            peer: s.peer.clone(),
            local_port: s.local_port,
            waiting_ms: u64::from(s.last_data_recv_ms),
            bytes_in: s.bytes_received,
            bytes_out: s.bytes_acked,
            unread_bytes: s.unread_bytes,
            threshold_ms,
            stall,
            blocked_threads: listed,
            blocked_threads_omitted: omitted,
            worker_timeout: p.killed_by_timeout,
            timeout_stall: p
                .timeout_stall
                .clone()
                .filter(|_| p.killed_by_timeout)
                .map(Box::new),
            container: p.container.clone(),
            inode: s.inode,
        };
        p.hung_requests += 1;
        p.last_hung = Some(report.clone());
        let since_ns = now_ns.saturating_sub(u64::from(s.last_data_recv_ms) * MS);
        self.hung.active.insert(
            s.inode,
            HungActive {
                report: report.clone(),
                since_ns,
                dropped: false,
            },
        );
        Some(Output::HungRequest {
            ts_ns: now_ns,
            hung: report,
        })
    }

    /// A connection of `pid` with `peer` ended badly: if it was a hung
    /// request, it was dropped rather than answered.
    pub(super) fn hung_closed_badly(&mut self, pid: u32, peer: Option<&str>) {
        for a in self.hung.active.values_mut() {
            if a.report.pid == pid && Some(a.report.peer.as_str()) == peer {
                a.dropped = true;
            }
        }
    }

    /// The hung requests of `pid` still hanging at `now_ns` (waiting times
    /// brought up to date), longest first.
    pub(super) fn hanging(&self, pid: u32, now_ns: u64) -> Vec<HungRequest> {
        let mut v: Vec<HungRequest> = self
            .hung
            .active
            .values()
            .filter(|a| a.report.pid == pid)
            .map(|a| {
                let mut r = a.report.clone();
                r.waiting_ms = now_ns.saturating_sub(a.since_ns) / MS;
                r
            })
            .collect();
        v.sort_by_key(|r| std::cmp::Reverse(r.waiting_ms));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sock(inode: u64, recv_ms: u32, sent_ms: u32) -> SockSnapshot {
        SockSnapshot {
            inode,
            local_port: 8000,
            peer: "127.0.0.1:41000".into(),
            has_info: true,
            last_data_recv_ms: recv_ms,
            last_data_sent_ms: sent_ms,
            bytes_received: 80,
            ..Default::default()
        }
    }

    #[test]
    fn only_a_request_with_nothing_sent_since_is_unanswered() {
        assert!(sock(1, 3000, 3001).unanswered_for(2000));
        // Connected and asked within the same millisecond, never answered.
        assert!(sock(1, 3000, 3000).unanswered_for(2000));
        // Answered after it came in.
        let answered = SockSnapshot {
            bytes_acked: 200,
            ..sock(1, 3000, 100)
        };
        assert!(!answered.unanswered_for(2000));
        // An idle keep-alive connection answered within the millisecond.
        let kept = SockSnapshot {
            bytes_acked: 200,
            ..sock(1, 3000, 3000)
        };
        assert!(!kept.unanswered_for(2000));
        // Not long enough.
        assert!(!sock(1, 1000, 5000).unanswered_for(2000));
        // Nothing asked: an idle keep-alive connection.
        let idle = SockSnapshot {
            bytes_received: 0,
            ..sock(1, 9000, 9000)
        };
        assert!(!idle.unanswered_for(2000));
        let gone = SockSnapshot {
            state: TcpState::CloseWait,
            ..sock(1, 3000, 3001)
        };
        assert!(!gone.unanswered_for(2000));
    }

    #[test]
    fn a_hang_ends_by_answer_departure_or_close() {
        let active = |dropped| HungActive {
            report: HungRequest {
                pid: 7,
                master_pid: 1,
                role: Role::Worker,
                fd: Some(9),
                peer: "127.0.0.1:41000".into(),
                local_port: 8000,
                waiting_ms: 3000,
                bytes_in: 80,
                bytes_out: 0,
                unread_bytes: 0,
                threshold_ms: 2000,
                stall: None,
                blocked_threads: vec![],
                blocked_threads_omitted: 0,
                worker_timeout: false,
                timeout_stall: None,
                container: None,
                inode: 1,
            },
            since_ns: 0,
            dropped,
        };
        let a = active(false);
        // Gone, and its close was not an early close: how it ended is not
        // known (no scan saw an answer acknowledged).
        assert_eq!(outcome(None, &a), Some(HungOutcome::Unknown));
        assert_eq!(outcome(None, &active(true)), Some(HungOutcome::Dropped));
        let left = SockSnapshot {
            state: TcpState::CloseWait,
            ..sock(1, 3000, 3001)
        };
        assert_eq!(outcome(Some(&left), &a), Some(HungOutcome::ClientClosed));
        // Data went out after the request, but the client has not
        // acknowledged any of it yet: still hanging, not answered.
        assert_eq!(outcome(Some(&sock(1, 3000, 10)), &a), None);
        let acked = SockSnapshot {
            bytes_acked: 150,
            ..sock(1, 3000, 3000)
        };
        assert_eq!(outcome(Some(&acked), &a), Some(HungOutcome::Answered));
        assert_eq!(outcome(Some(&sock(1, 3000, 3001)), &a), None);
        assert_eq!(outcome(Some(&sock(1, 3000, 3000)), &a), None);
    }
}
