//! Event intake: a thread of its own that empties the ring buffer as soon
//! as it has data and decodes the records into [`KernelEvent`]s for the
//! session. It reads nothing of /proc but an OOM victim's cgroup file
//! (kernel-generated, 4 KiB at most, no lock the victim holds), so however
//! long the session's /proc work takes, the ring buffer keeps being drained (up to the queue's
//! bound; past it the kernel drops, and counts, as before).
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use aya::maps::{MapData, RingBuf};
use tokio::sync::mpsc;
use tracer_common::{ConnEnd, Event, KeepaliveRace, kind, wake};

use super::decode::{answered_close, closed_conn, ended_by, role};
use crate::model::{KernelEvent, RaceReset, Wake};

/// Events in one batch, at most.
const MAX_BATCH: usize = 1024;
/// Batches queued for the session, at most: while the session is slow, the
/// intake thread waits, the ring buffer fills and the kernel drops events
/// and counts them (`events_lost`), instead of the tracer's memory growing
/// (64 x 1,024 events is a few megabytes; 4,096 batches of any size was
/// up to gigabytes).
const QUEUE: usize = 64;

/// The intake thread: stop it with [`Intake::stop`], which drains what is
/// left in the ring buffer first.
pub struct Intake {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Intake {
    /// Starts draining `ring`; batches of decoded events arrive on the receiver.
    pub fn start(
        ring: RingBuf<MapData>,
    ) -> std::io::Result<(Intake, mpsc::Receiver<Vec<KernelEvent>>)> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("tracer-intake".into())
            .spawn(move || run(ring, tx, flag))?;
        Ok((
            Intake {
                stop,
                thread: Some(thread),
            },
            rx,
        ))
    }

    /// Asks the thread to send what is left and end; the receiver then
    /// sees the channel close.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    pub fn join(&mut self) {
        self.stop();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(mut ring: RingBuf<MapData>, tx: mpsc::Sender<Vec<KernelEvent>>, stop: Arc<AtomicBool>) {
    let fd = ring.as_raw_fd();
    loop {
        let stopping = stop.load(Ordering::SeqCst);
        let mut more = true;
        while more {
            let mut batch = Vec::new();
            more = fill(&mut batch, || ring.next().map(|item| decode(&item)));
            batch.iter_mut().for_each(victims_cgroups);
            if !batch.is_empty() && tx.blocking_send(batch).is_err() {
                return;
            }
        }
        if stopping || tx.is_closed() {
            return;
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd; the ring buffer keeps its fd open.
        unsafe { libc::poll(&mut pfd, 1, 100) };
    }
}

/// An OOM victim's cgroups, read at once (rare events; a kernel-generated
/// file of 4 KiB at most, with no lock its process can hold): by the time
/// the session looks, the dying victim may have been moved to the root.
fn victims_cgroups(ev: &mut KernelEvent) {
    use std::io::Read;
    if let KernelEvent::OomKill { pid, cgroups, .. } = ev {
        let mut text = String::new();
        let read = std::fs::File::open(format!("/proc/{pid}/cgroup"))
            .and_then(|f| f.take(4096).read_to_string(&mut text));
        *cgroups = read.ok().map(|_| text);
    }
}

/// Fills `batch` from `next` (None: the ring is empty) up to `MAX_BATCH`
/// events; true when it stopped full, with more perhaps waiting.
fn fill(
    batch: &mut Vec<KernelEvent>,
    mut next: impl FnMut() -> Option<Option<KernelEvent>>,
) -> bool {
    while batch.len() < MAX_BATCH {
        match next() {
            Some(ev) => batch.extend(ev),
            None => return false,
        }
    }
    true
}

/// Decodes one ring buffer record into model types (see [`super::decode`]).
/// Returns None for a record of the wrong size, an unknown kind or an
/// unknown connection direction (a newer BPF object, say) rather than
/// guessing.
pub fn decode(bytes: &[u8]) -> Option<KernelEvent> {
    let k = u32::from_ne_bytes(bytes.get(..4)?.try_into().ok()?);
    if k == kind::KEEPALIVE_RACE {
        if bytes.len() < std::mem::size_of::<KeepaliveRace>() {
            return None;
        }
        // SAFETY: KeepaliveRace is Pod and the slice is long enough.
        let r: KeepaliveRace = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        return Some(KernelEvent::KeepaliveRace(RaceReset {
            ts_ns: r.ts_ns,
            close: answered_close(&r.close),
        }));
    }
    if k == kind::CONN_END {
        if bytes.len() < std::mem::size_of::<ConnEnd>() {
            return None;
        }
        // SAFETY: ConnEnd is Pod and the slice is long enough.
        let c: ConnEnd = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
        return Some(KernelEvent::ConnEnd {
            ts_ns: c.ts_ns,
            tgid: c.tgid,
            tid: c.tid,
            fd: c.fd,
            conn: closed_conn(&c.conn)?,
            ended_by: ended_by(c.ended_by),
            peer_closed_first: c.peer_closed_first != 0,
        });
    }
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: Event is Pod and the slice is long enough; read_unaligned
    // because ring buffer records are only 8-byte aligned by convention.
    let e: Event = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_event(&e)
}

/// A task name from the kernel: up to 16 bytes, NUL-terminated when shorter.
fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

pub fn from_event(e: &Event) -> Option<KernelEvent> {
    let seeded = e.kind & kind::FLAG_SEEDED != 0;
    Some(match e.kind & !kind::FLAG_SEEDED {
        kind::FORK => KernelEvent::Fork {
            ts_ns: e.ts_ns,
            parent: e.tgid,
            child: e.aux_pid,
            role: role(e.nr as u32),
            master: e.aux as u32,
        },
        kind::EXIT => {
            let (exit_code, signal) = if e.aux == 1 {
                (Some(e.nr as i32), None)
            } else if e.nr != 0 {
                (None, Some(e.nr as i32))
            } else {
                (None, None)
            };
            KernelEvent::Exit {
                ts_ns: e.ts_ns,
                pid: e.tgid,
                exit_code,
                signal,
            }
        }
        kind::SIGNAL => KernelEvent::Signal {
            ts_ns: e.ts_ns,
            target: e.tgid,
            sender: e.aux_pid,
            sender_comm: comm(&e.comm),
            sig: e.nr as i32,
        },
        kind::OOM_KILL => KernelEvent::OomKill {
            ts_ns: e.ts_ns,
            pid: e.tgid,
            trigger: e.aux_pid,
            oom_score_adj: e.nr,
            rss_kb: e.arg0,
            cgroups: None,
        },
        kind::SLEEP_END => KernelEvent::SleepEnd {
            ts_ns: e.ts_ns,
            tgid: e.tgid,
            tid: e.tid,
            nr: e.nr,
            start_ns: e.start_ns,
            wake: match e.aux {
                wake::KILLED => Wake::Killed,
                wake::INTERRUPTED => Wake::Interrupted,
                _ => Wake::Returning,
            },
            arg0: e.arg0,
            arg2: e.arg2,
            seeded,
        },
        kind::EXEC => KernelEvent::Exec {
            ts_ns: e.ts_ns,
            pid: e.tgid,
        },
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{EndedBy, Role};

    /// An OOM victim's cgroups are read as its event is taken in: read
    /// later (the session may lag), a dying task shows the root cgroup,
    /// and its limit was lost (a test failed so under load).
    #[test]
    fn an_oom_victims_cgroups_are_read_as_the_event_arrives() {
        let me = std::process::id();
        let mut ev = KernelEvent::OomKill {
            ts_ns: 0,
            pid: me,
            trigger: me,
            oom_score_adj: 0,
            rss_kb: 0,
            cgroups: None,
        };
        victims_cgroups(&mut ev);
        let KernelEvent::OomKill { cgroups, .. } = ev else {
            unreachable!()
        };
        assert_eq!(
            cgroups.as_deref(),
            std::fs::read_to_string("/proc/self/cgroup").ok().as_deref()
        );
    }

    /// Issue 20, item 9: the queue was bounded in batches of any size (up
    /// to about 2.8 GB while the session was slow).
    #[test]
    fn batches_are_capped_and_the_queue_is_bounded_in_events() {
        let exit = KernelEvent::Exit {
            ts_ns: 1,
            pid: 7,
            exit_code: Some(0),
            signal: None,
        };
        let mut left = 5000;
        let mut next = || {
            (left > 0).then(|| {
                left -= 1;
                Some(exit.clone())
            })
        };
        let mut sizes = Vec::new();
        loop {
            let mut batch = Vec::new();
            let more = fill(&mut batch, &mut next);
            sizes.push(batch.len());
            if !more {
                break;
            }
        }
        assert_eq!(sizes, [1024, 1024, 1024, 1024, 904]);
        let bound = QUEUE * MAX_BATCH * std::mem::size_of::<KernelEvent>();
        assert!(bound <= 32 << 20, "the queue holds {bound} bytes at most");
    }

    fn bytes(e: &Event) -> Vec<u8> {
        // SAFETY: Event is repr(C) with no implicit padding.
        unsafe {
            std::slice::from_raw_parts(
                (e as *const Event).cast::<u8>(),
                std::mem::size_of::<Event>(),
            )
        }
        .to_vec()
    }

    #[test]
    fn decodes_sleep_end_including_thread_death_and_seeded() {
        let e = Event {
            kind: kind::SLEEP_END | kind::FLAG_SEEDED,
            tgid: 10,
            tid: 11,
            ts_ns: 900,
            start_ns: 100,
            nr: 0,
            aux: wake::KILLED,
            arg0: 5,
            arg2: 4,
            ..Default::default()
        };
        let d = decode(&bytes(&e)).unwrap();
        assert_eq!(
            d,
            KernelEvent::SleepEnd {
                ts_ns: 900,
                tgid: 10,
                tid: 11,
                nr: 0,
                start_ns: 100,
                wake: Wake::Killed,
                arg0: 5,
                arg2: 4,
                seeded: true
            }
        );
        let woke = |aux| match from_event(&Event { aux, ..e }) {
            Some(KernelEvent::SleepEnd { wake, .. }) => wake,
            other => panic!("{other:?}"),
        };
        assert_eq!(woke(wake::INTERRUPTED), Wake::Interrupted);
        assert_eq!(woke(wake::RETURNING), Wake::Returning);
    }

    #[test]
    fn decodes_exit_code_versus_signal() {
        let mut e = Event {
            kind: kind::EXIT,
            tgid: 3,
            nr: 1,
            aux: 1,
            ..Default::default()
        };
        assert!(matches!(
            from_event(&e),
            Some(KernelEvent::Exit {
                exit_code: Some(1),
                signal: None,
                ..
            })
        ));
        e.aux = 0;
        e.nr = 9;
        assert!(matches!(
            from_event(&e),
            Some(KernelEvent::Exit {
                exit_code: None,
                signal: Some(9),
                ..
            })
        ));
    }

    #[test]
    fn decodes_a_signal_with_its_sender_and_an_oom_kill() {
        let mut name = [0u8; 16];
        name[..4].copy_from_slice(b"kill");
        let e = Event {
            kind: kind::SIGNAL,
            tgid: 7,
            aux_pid: 99,
            nr: 9,
            comm: name,
            ..Default::default()
        };
        assert!(matches!(
            from_event(&e),
            Some(KernelEvent::Signal { target: 7, sender: 99, sig: 9, sender_comm, .. }) if sender_comm == "kill"
        ));
        let o = Event {
            kind: kind::OOM_KILL,
            tgid: 7,
            aux_pid: 8,
            nr: -500,
            arg0: 409_600,
            ..Default::default()
        };
        assert_eq!(
            from_event(&o),
            Some(KernelEvent::OomKill {
                ts_ns: 0,
                pid: 7,
                trigger: 8,
                oom_score_adj: -500,
                rss_kb: 409_600,
                cgroups: None,
            })
        );
    }

    #[test]
    fn rejects_short_records_and_unknown_kinds() {
        assert!(decode(&[0u8; 8]).is_none());
        let e = Event {
            kind: 99,
            ..Default::default()
        };
        assert!(decode(&bytes(&e)).is_none());
    }

    #[test]
    fn decodes_conn_end_by_its_own_layout() {
        let c = ConnEnd {
            kind: kind::CONN_END,
            tgid: 4,
            tid: 5,
            fd: 11,
            ts_ns: 77,
            conn: tracer_common::Conn {
                bytes_in: 120,
                direction: tracer_common::direction::INBOUND,
                ..Default::default()
            },
            ended_by: tracer_common::ended::SHUTDOWN,
            peer_closed_first: 1,
        };
        // SAFETY: ConnEnd is repr(C) with no implicit padding.
        let b = unsafe {
            std::slice::from_raw_parts(
                (&c as *const ConnEnd).cast::<u8>(),
                std::mem::size_of::<ConnEnd>(),
            )
        };
        let Some(KernelEvent::ConnEnd {
            tgid: 4,
            tid: 5,
            fd: 11,
            conn,
            ended_by,
            ..
        }) = decode(b)
        else {
            panic!("not decoded")
        };
        assert_eq!(conn.bytes_in, 120);
        assert_eq!(ended_by, EndedBy::Shutdown);
        assert!(matches!(
            decode(b),
            Some(KernelEvent::ConnEnd {
                peer_closed_first: true,
                ..
            })
        ));
        assert!(decode(&b[..40]).is_none(), "truncated record");
        // A direction the kernel never sends: dropped, not guessed.
        let mut odd = c;
        odd.conn.direction = 0;
        // SAFETY: as above.
        let b = unsafe {
            std::slice::from_raw_parts(
                (&odd as *const ConnEnd).cast::<u8>(),
                std::mem::size_of::<ConnEnd>(),
            )
        };
        assert!(decode(b).is_none());
    }

    #[test]
    fn decodes_a_keepalive_race_by_its_own_layout() {
        let r = KeepaliveRace {
            kind: kind::KEEPALIVE_RACE,
            _pad: 0,
            ts_ns: 99,
            close: tracer_common::AnsweredClose {
                tgid: 4,
                idle_ns: 1_000_000_000,
                ..Default::default()
            },
        };
        // SAFETY: KeepaliveRace is repr(C) with no implicit padding.
        let b = unsafe {
            std::slice::from_raw_parts(
                (&r as *const KeepaliveRace).cast::<u8>(),
                std::mem::size_of::<KeepaliveRace>(),
            )
        };
        assert_eq!(
            decode(b),
            Some(KernelEvent::KeepaliveRace(RaceReset {
                ts_ns: 99,
                close: answered_close(&r.close)
            }))
        );
        assert!(decode(&b[..40]).is_none(), "truncated record");
    }

    #[test]
    fn decodes_fork_role() {
        let e = Event {
            kind: kind::FORK,
            tgid: 1,
            aux_pid: 2,
            nr: tracer_common::role::WORKER as i64,
            aux: 1,
            ..Default::default()
        };
        assert_eq!(
            from_event(&e),
            Some(KernelEvent::Fork {
                ts_ns: 0,
                parent: 1,
                child: 2,
                role: Role::Worker,
                master: 1
            })
        );
    }
}
