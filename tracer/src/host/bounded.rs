//! /proc work with a deadline. Reading another process's files can block
//! for as long as that process wants: its cmdline and environ wait for its
//! memory map lock, a file in its root may sit on a hung NFS or FUSE mount.
//! Each such read runs on a helper thread; the caller waits at most its
//! deadline and goes on without the answer. A helper stuck for good stays
//! stuck, so at most `MAX_HELPERS` exist at once; past that, calls fail at
//! once instead of piling up.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{RecvTimeoutError, sync_channel};
use std::time::Duration;

/// Helper threads running at once, at most.
pub const MAX_HELPERS: usize = 8;

/// A bound on helper threads: the session's own (`call`), or a test's.
pub struct Pool {
    running: AtomicUsize,
    max: usize,
}

static POOL: Pool = Pool::new(MAX_HELPERS);

/// Why a bounded call has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// It did not finish within its deadline (it may still, unseen).
    TimedOut,
    /// `MAX_HELPERS` calls are already running (stuck, most likely).
    Busy,
}

impl std::fmt::Display for Missed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Missed::TimedOut => "a /proc read did not finish in time",
            Missed::Busy => "earlier /proc reads are still stuck",
        })
    }
}

struct Slot(&'static AtomicUsize);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Pool {
    pub const fn new(max: usize) -> Pool {
        Pool {
            running: AtomicUsize::new(0),
            max,
        }
    }

    /// Runs `f` on a helper thread and waits for it at most `deadline`.
    pub fn call<T: Send + 'static>(
        &'static self,
        deadline: Duration,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Missed> {
        if self.running.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.running.fetch_sub(1, Ordering::SeqCst);
            return Err(Missed::Busy);
        }
        let slot = Slot(&self.running);
        let (tx, rx) = sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("tracer-proc".into())
            .spawn(move || {
                let _slot = slot;
                let _ = tx.send(f());
            });
        if spawned.is_err() {
            return Err(Missed::Busy);
        }
        match rx.recv_timeout(deadline) {
            Ok(v) => Ok(v),
            Err(RecvTimeoutError::Timeout) => Err(Missed::TimedOut),
            Err(RecvTimeoutError::Disconnected) => Err(Missed::TimedOut),
        }
    }
}

/// Runs `f` on one of the session's helper threads, waiting at most `deadline`.
pub fn call<T: Send + 'static>(
    deadline: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Missed> {
    POOL.call(deadline, f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_in_time_or_gives_up_and_never_piles_up() {
        // A pool of its own: filling the session's would starve the other
        // tests' /proc reads, which run at the same time.
        static TEST: Pool = Pool::new(MAX_HELPERS);
        assert_eq!(TEST.call(Duration::from_secs(5), || 7), Ok(7));
        let stuck = || std::thread::sleep(Duration::from_secs(3));
        let t = std::time::Instant::now();
        assert_eq!(
            TEST.call(Duration::from_millis(50), stuck),
            Err(Missed::TimedOut)
        );
        assert!(t.elapsed() < Duration::from_secs(1));
        let mut missed = Vec::new();
        for _ in 0..MAX_HELPERS + 2 {
            missed.push(TEST.call(Duration::from_millis(1), stuck).unwrap_err());
        }
        assert!(missed.contains(&Missed::Busy), "{missed:?}");
    }
}
