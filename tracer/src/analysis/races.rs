//! Requests lost to keep-alive races: a worker closed an idle keep-alive
//! connection after answering on it, the client (a load balancer, usually)
//! sent its next request on it anyway, and the kernel answered with a
//! reset. The proxy returns 502; Gunicorn never saw the request. The fix is
//! configuration: --keep-alive above the balancer's idle timeout.
use super::correlator::Correlator;
use crate::model::{AnsweredClose, CloseKind, Direction, EarlyClose, Output, RaceReset, Role};

const MS: u64 = 1_000_000;

/// The `early_close` of a lost request, from what the kernel remembered of
/// the close and when the reset came.
pub(super) fn race_report(r: &RaceReset, role: Role, keepalive_s: Option<f64>) -> EarlyClose {
    let c: &AnsweredClose = &r.close;
    EarlyClose {
        direction: Direction::Inbound,
        pid: c.tgid,
        tid: c.tid,
        master_pid: c.master,
        role,
        fd: (c.fd >= 0).then_some(c.fd),
        peer: c.peer.clone(),
        local_port: c.local_port,
        bytes_in: c.bytes_in,
        bytes_out: c.bytes_out,
        suppressed: 0,
        lifetime_ms: c
            .start_ns
            .filter(|ns| *ns <= c.closed_ns)
            .map(|ns| (c.closed_ns - ns) / MS),
        ended_by: c.ended_by,
        peer_closed_first: false,
        kind: CloseKind::KeepaliveRace,
        unread_data: c.aborted,
        preceded_by: None,
        idle_ms: c.idle_ns.map(|ns| ns / MS),
        keepalive_s,
        reset_after_ms: Some(r.ts_ns.saturating_sub(c.closed_ns) / MS),
        dying: None,
        cause: None,
        container: None,
    }
}

impl Correlator {
    /// A request lost to a keep-alive race: reported and counted against
    /// the worker that closed the connection (which may have exited since).
    pub(super) fn on_keepalive_race(&mut self, r: &RaceReset) -> Vec<Output> {
        let keepalive_s = self
            .procs
            .get(&r.close.master)
            .and_then(|m| m.settings.keepalive_s);
        let p = self.procs.get_mut(&r.close.tgid);
        let role = p.as_ref().map(|p| p.role).unwrap_or(Role::Worker);
        let mut close = race_report(r, role, keepalive_s);
        close.cause = super::signatures::identify_close(&close);
        if let Some(p) = p {
            close.container = p.container.clone();
            p.closes.count(CloseKind::KeepaliveRace);
            p.last_race = Some(close.clone());
        }
        vec![Output::EarlyClose {
            ts_ns: r.ts_ns,
            close,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::EndedBy;

    fn reset(idle_ns: Option<u64>, aborted: bool) -> RaceReset {
        RaceReset {
            ts_ns: 3_500 * MS,
            close: AnsweredClose {
                closed_ns: 2_000 * MS,
                idle_ns,
                start_ns: Some(500 * MS),
                bytes_in: 80,
                bytes_out: 200,
                tgid: 7,
                tid: 7,
                master: 1,
                fd: 9,
                ended_by: EndedBy::Close,
                aborted,
                local_port: Some(8000),
                peer: Some("10.0.0.7:41000".into()),
            },
        }
    }

    #[test]
    fn a_race_names_the_closer_the_peer_and_the_timing() {
        let e = race_report(&reset(Some(1_000 * MS), false), Role::Worker, Some(1.0));
        assert_eq!(e.kind, CloseKind::KeepaliveRace);
        assert_eq!((e.pid, e.master_pid, e.fd), (7, 1, Some(9)));
        assert_eq!(e.peer.as_deref(), Some("10.0.0.7:41000"));
        assert_eq!(e.local_port, Some(8000));
        assert_eq!(
            (e.idle_ms, e.keepalive_s, e.reset_after_ms, e.lifetime_ms),
            (Some(1000), Some(1.0), Some(1500), Some(1500))
        );
        assert!(!e.unread_data);
        // Idle time unknown; the request already queued at the close.
        let e = race_report(&reset(None, true), Role::Worker, None);
        assert_eq!((e.idle_ms, e.unread_data), (None, true));
    }
}
