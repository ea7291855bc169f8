//! Kernel timestamps (CLOCK_MONOTONIC) as wall-clock time.
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Maps the kernel's monotonic nanoseconds to wall-clock time.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    /// realtime - monotonic, in ns.
    offset_ns: i128,
}

impl Clock {
    pub fn now() -> Clock {
        let mono = monotonic_ns() as i128;
        let real = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Clock {
            offset_ns: real - mono,
        }
    }

    #[cfg(test)]
    pub fn fixed(offset_ns: i128) -> Clock {
        Clock { offset_ns }
    }

    pub fn wall(&self, mono_ns: u64) -> SystemTime {
        let ns = (mono_ns as i128 + self.offset_ns).max(0) as u128;
        UNIX_EPOCH + Duration::from_nanos(ns as u64)
    }

    pub fn rfc3339(&self, mono_ns: u64) -> String {
        humantime::format_rfc3339_millis(self.wall(mono_ns)).to_string()
    }

    /// `04:18:30.123`
    pub fn hhmmss(&self, mono_ns: u64) -> String {
        let s = self.rfc3339(mono_ns);
        // 2026-11-27T04:18:30.123Z -> 04:18:30.123
        s.get(11..23).unwrap_or(&s).to_string()
    }
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
