//! The kernel's `WATCHED_TGIDS` array mapped into this process: one byte
//! per tgid, set while `WATCHED` holds it, so `sched_switch` tells an
//! unwatched task without a hash lookup. Bytes are written with single-byte
//! stores, as the kernel writes them (at fork): an update through the bpf
//! syscall would rewrite a whole 8-byte slot and could undo a byte the
//! kernel set in the meantime.
use std::os::fd::{AsFd, AsRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU8, Ordering};

use anyhow::{Result, bail};
use aya::maps::MapData;
use tracer_common::TGIDS_PER_SLOT;

/// The most pids Linux allows (PID_MAX_LIMIT on 64-bit).
const PID_MAX_LIMIT: u32 = 4 * 1024 * 1024;

/// Elements of `WATCHED_TGIDS` to cover every pid this kernel hands out
/// now, one byte each: 32 KB for the classic pid_max of 32768, 4 MB for
/// the largest (systemd sets it on big machines). Pids past it (pid_max
/// raised later) are looked up in `WATCHED`.
pub fn slots() -> u32 {
    let pid_max = std::fs::read_to_string("/proc/sys/kernel/pid_max").ok();
    slots_for(pid_max.and_then(|s| s.trim().parse().ok()))
}

fn slots_for(pid_max: Option<u32>) -> u32 {
    let pid_max = pid_max
        .unwrap_or(PID_MAX_LIMIT)
        .clamp(TGIDS_PER_SLOT, PID_MAX_LIMIT);
    pid_max.div_ceil(TGIDS_PER_SLOT)
}

pub struct WatchedTgids {
    /// Kept open: the mapping is only valid while the map exists.
    _map: MapData,
    bytes: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is owned by this value and only written through
// atomic byte stores.
unsafe impl Send for WatchedTgids {}
unsafe impl Sync for WatchedTgids {}

impl WatchedTgids {
    /// Maps the array, created with `slots` elements of 8 bytes.
    pub fn map(map: MapData, slots: u32) -> Result<WatchedTgids> {
        let len = slots as usize * TGIDS_PER_SLOT as usize;
        // SAFETY: a shared mapping of the map's fd; the kernel checks the
        // length against the array's size.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if p == libc::MAP_FAILED {
            bail!(
                "mapping the WATCHED_TGIDS array: {}",
                std::io::Error::last_os_error()
            );
        }
        let bytes = NonNull::new(p.cast()).expect("mmap returned a non-null address");
        Ok(WatchedTgids {
            _map: map,
            bytes,
            len,
        })
    }

    /// Sets or clears `tgid`'s byte. Past the array the kernel asks
    /// `WATCHED` instead, so there is nothing to write.
    pub fn set(&self, tgid: u32, watched: bool) {
        let i = tgid as usize;
        if i >= self.len {
            return;
        }
        // SAFETY: i is within the mapping; AtomicU8 has u8's layout.
        let b = unsafe { AtomicU8::from_ptr(self.bytes.as_ptr().add(i)) };
        b.store(watched as u8, Ordering::SeqCst);
    }
}

impl Drop for WatchedTgids {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `map`, unmapped once.
        unsafe { libc::munmap(self.bytes.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_array_covers_every_pid_up_to_pid_max() {
        assert_eq!(slots_for(Some(32768)), 4096, "pids 0..32767");
        assert_eq!(slots_for(Some(32769)), 4097);
        assert_eq!(slots_for(Some(4_194_304)), 524_288, "4 MB at most");
        assert_eq!(slots_for(None), 524_288, "unreadable: the largest");
        assert_eq!(slots_for(Some(u32::MAX)), 524_288);
        assert_eq!(slots_for(Some(0)), 1);
    }
}
