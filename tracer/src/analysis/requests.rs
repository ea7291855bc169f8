//! Whether a blocked thread that is not a worker's event loop holds up a
//! request. Such a thread (a gthread pool thread, a child process of a
//! worker, a library's helper thread) blocked in a read may be serving a
//! request, or may be waiting for work: an idle `multiprocessing.Pool` or
//! `ProcessPoolExecutor` reads its task pipe for as long as no task comes.
//! Only a request tied to it makes it a stall: a client connection that
//! the process holds, whose request came in before the thread blocked and
//! has had nothing sent back since, as the latest socket scan saw it.
use std::collections::HashMap;

use super::Enricher;
use crate::model::{SockSnapshot, TcpState};

const MS: u64 = 1_000_000;
/// Unanswered connections looked up per blocked thread, at most: each may
/// cost a walk of the process's fds.
const MAX_CANDIDATES: usize = 8;

/// A client's request held by a process while one of its threads blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TiedRequest {
    pub peer: String,
    /// How long the client had waited with nothing sent back, at `now`.
    pub waiting_ms: u64,
}

/// The latest scan of the connections on watched ports, and which process
/// holds each unanswered one (looked up once per connection).
#[derive(Debug, Default)]
pub(super) struct RequestScan {
    socks: Vec<SockSnapshot>,
    at_ns: u64,
    /// (inode, pid): whether `pid` holds the connection.
    owners: HashMap<(u64, u32), bool>,
}

impl RequestScan {
    /// Keeps a scan made at kernel time `now_ns`.
    pub fn note(&mut self, socks: &[SockSnapshot], now_ns: u64) {
        self.socks = socks
            .iter()
            .filter(|s| s.inode != 0 && s.state == TcpState::Established && s.has_info)
            .cloned()
            .collect();
        self.at_ns = now_ns;
        let live: std::collections::HashSet<u64> = self.socks.iter().map(|s| s.inode).collect();
        self.owners.retain(|(inode, _), _| live.contains(inode));
    }

    /// A request `pid` holds that has waited, unanswered, since before its
    /// thread blocked at `blocked_since_ns`. Only a scan made after the
    /// thread blocked can say: a request answered in between would
    /// otherwise be taken for one still waiting.
    pub fn tied_to(
        &mut self,
        pid: u32,
        blocked_since_ns: u64,
        now_ns: u64,
        enr: &mut dyn Enricher,
    ) -> Option<TiedRequest> {
        if self.at_ns < blocked_since_ns {
            return None;
        }
        let blocked_at_scan_ms = (self.at_ns - blocked_since_ns) / MS;
        let candidates: Vec<&SockSnapshot> = self
            .socks
            .iter()
            .filter(|s| s.unanswered_for(blocked_at_scan_ms))
            .take(MAX_CANDIDATES)
            .collect();
        for s in candidates {
            let holds = *self
                .owners
                .entry((s.inode, pid))
                .or_insert_with(|| enr.socket_owner(s.inode, &[pid]).is_some());
            if holds {
                let since_scan_ms = now_ns.saturating_sub(self.at_ns) / MS;
                return Some(TiedRequest {
                    peer: s.peer.clone(),
                    waiting_ms: u64::from(s.last_data_recv_ms) + since_scan_ms,
                });
            }
        }
        None
    }
}
