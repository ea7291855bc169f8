//! Gunicorn's heartbeat, as /proc shows it: each worker touches an unlinked
//! `wgunicorn-*` file about once a second; the file's ctime dates the last
//! beat for every Gunicorn version. The fd is found once per worker and
//! then checked with one readlink per look.
use std::collections::HashMap;
use std::fs;
use std::time::{Duration, Instant};

use super::proc::{fd_target, proc_path, statx_fd};

/// A heartbeat file's ctime, in nanoseconds since the epoch.
fn ctime_ns(pid: u32, fd: i32) -> Option<i128> {
    let st = statx_fd(pid, fd, libc::STATX_CTIME)?;
    Some(st.stx_ctime.tv_sec as i128 * 1_000_000_000 + st.stx_ctime.tv_nsec as i128)
}

/// Fds of a worker looked at to find its heartbeat file: Gunicorn opens it
/// in the master before the fork, so it has a low number.
const HEARTBEAT_SCAN: usize = 1024;
/// A process without a heartbeat file is looked at again after this long.
const NO_HEARTBEAT_RETRY: Duration = Duration::from_secs(10);

/// Where each worker's heartbeat file is: its fd, found once and checked
/// with one readlink per look, instead of reading every fd every second.
#[derive(Default)]
pub struct Heartbeats {
    fds: HashMap<u32, Result<i32, Instant>>,
}

fn is_heartbeat(link: &str) -> bool {
    link.contains("/wgunicorn-")
}

fn find_heartbeat_fd(pid: u32) -> Option<i32> {
    let rd = fs::read_dir(proc_path(&[&pid.to_string(), "fd"])).ok()?;
    rd.flatten().take(HEARTBEAT_SCAN).find_map(|e| {
        let fd = e.file_name().to_str()?.parse().ok()?;
        is_heartbeat(&fs::read_link(e.path()).ok()?.to_string_lossy()).then_some(fd)
    })
}

impl Heartbeats {
    /// Age of a worker's Gunicorn heartbeat, in milliseconds.
    ///
    /// The worker touches an unlinked `wgunicorn-*` file about once a second
    /// (`utimensat` since Gunicorn 22, `fchmod` before). Both change the
    /// inode's ctime to the wall-clock time, whatever they write into mtime,
    /// so ctime dates the last heartbeat for every version.
    pub fn age_ms(&mut self, pid: u32) -> Option<u64> {
        let cached = match self.fds.get(&pid) {
            Some(Ok(fd)) if fd_target(pid, *fd).is_some_and(|l| is_heartbeat(&l)) => Some(*fd),
            Some(Err(at)) if at.elapsed() < NO_HEARTBEAT_RETRY => return None,
            _ => None,
        };
        let fd = match cached.or_else(|| find_heartbeat_fd(pid)) {
            Some(fd) => fd,
            None => {
                self.fds.insert(pid, Err(Instant::now()));
                return None;
            }
        };
        self.fds.insert(pid, Ok(fd));
        let ctime = ctime_ns(pid, fd)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .ok()?
            .as_nanos() as i128;
        Some(((now - ctime).max(0) / 1_000_000) as u64)
    }

    /// Drops what is known of processes that are gone.
    pub fn retain(&mut self, alive: impl Fn(u32) -> bool) {
        self.fds.retain(|pid, _| alive(*pid));
    }

    pub fn len(&self) -> usize {
        self.fds.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fds.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_of_a_process_without_one_is_not_rescanned_each_time() {
        let mut h = Heartbeats::default();
        let me = std::process::id();
        assert_eq!(h.age_ms(me), None);
        assert!(matches!(h.fds.get(&me), Some(Err(_))));
        h.retain(|_| false);
        assert!(h.is_empty());
    }
}
