//! Reading a whole hash map in a few syscalls: `BPF_MAP_LOOKUP_BATCH`
//! (Linux 5.6) copies up to a chunk of entries per call, where aya's
//! iterator makes two calls per entry (next key, then lookup). The session
//! reads `INFLIGHT` at every poll, and the metrics read three maps every
//! second: at 4,096 sleeping threads that was 8,192 syscalls per poll.
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use aya::Pod;

/// `enum bpf_cmd`'s BPF_MAP_LOOKUP_BATCH.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call. A hash bucket holding more than this at
/// once makes the kernel answer ENOSPC: the chunk is then doubled.
const CHUNK: usize = 512;

/// `union bpf_attr`'s `batch` member: the kernel reads only these bytes and
/// requires nothing past them.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `f` with every entry of the hash map `fd` (keys of `K`, values of
/// `V`, as the map was created), stopping after `max` entries. An error of
/// ENOSYS or EINVAL means this kernel has no batch reads: the caller falls
/// back to reading entry by entry.
pub fn for_each<K: Pod, V: Pod>(
    fd: BorrowedFd<'_>,
    max: usize,
    mut f: impl FnMut(&K, &V),
) -> io::Result<()> {
    let mut chunk = CHUNK;
    let mut keys: Vec<K> = zeroed(chunk);
    let mut values: Vec<V> = zeroed(chunk);
    // The kernel's cursor for a hash map: a bucket index (a u32).
    let mut cursor: u32 = 0;
    let mut next: u32 = 0;
    let mut started = false;
    let mut seen = 0;
    loop {
        let mut attr = BatchAttr {
            in_batch: if started { &raw const cursor as u64 } else { 0 },
            out_batch: &raw mut next as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd.as_raw_fd() as u32,
            ..Default::default()
        };
        // SAFETY: `attr` points at buffers of `chunk` keys and values of
        // the map's sizes, and at two u32 cursors, all alive for the call.
        let r = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &raw mut attr,
                std::mem::size_of::<BatchAttr>(),
            )
        };
        let err = (r < 0).then(io::Error::last_os_error);
        // The entries copied count even when the call ends the walk.
        let n = (attr.count as usize).min(chunk);
        for (k, v) in keys[..n].iter().zip(&values[..n]) {
            if seen == max {
                return Ok(());
            }
            f(k, v);
            seen += 1;
        }
        match err.as_ref().and_then(io::Error::raw_os_error) {
            None => {}
            // The last bucket was read.
            Some(libc::ENOENT) => return Ok(()),
            // One bucket holds more than `chunk`: ask again, larger.
            Some(libc::ENOSPC) if chunk < (1 << 20) => {
                chunk *= 2;
                keys = zeroed(chunk);
                values = zeroed(chunk);
                continue;
            }
            Some(_) => return Err(err.unwrap_or_else(|| io::Error::other("batch read"))),
        }
        cursor = next;
        started = true;
    }
}

/// `n` all-zero values of a plain-data type.
fn zeroed<T: Pod>(n: usize) -> Vec<T> {
    // SAFETY: `Pod` types are plain data, for which all-zero bytes are a
    // valid value.
    (0..n).map(|_| unsafe { std::mem::zeroed() }).collect()
}

/// Whether an error from [`for_each`] means "no batch reads here".
pub fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOSYS | libc::EINVAL | libc::ENOTSUP)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{FromRawFd, OwnedFd};

    /// `union bpf_attr` for BPF_MAP_CREATE and BPF_MAP_UPDATE_ELEM.
    #[repr(C)]
    #[derive(Default)]
    struct CreateAttr {
        map_type: u32,
        key_size: u32,
        value_size: u32,
        max_entries: u32,
        map_flags: u32,
    }

    #[repr(C)]
    #[derive(Default)]
    struct UpdateAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }

    fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> i64 {
        // SAFETY: `attr` is the union member `cmd` reads, alive for the call.
        unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut T, std::mem::size_of::<T>()) }
    }

    /// A real hash map of the running kernel, filled with `n` entries
    /// `k -> k * 3`; None without the privilege to create one.
    fn filled_map(n: u32) -> Option<OwnedFd> {
        let mut create = CreateAttr {
            map_type: 1, // BPF_MAP_TYPE_HASH
            key_size: 4,
            value_size: 8,
            max_entries: 8192,
            map_flags: 0,
        };
        let fd = bpf(0, &mut create);
        if fd < 0 {
            let e = io::Error::last_os_error();
            assert_eq!(e.raw_os_error(), Some(libc::EPERM), "creating a map: {e}");
            return None;
        }
        // SAFETY: a new fd this test owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        for k in 0..n {
            let v = u64::from(k) * 3;
            let mut up = UpdateAttr {
                map_fd: fd.as_raw_fd() as u32,
                key: &raw const k as u64,
                value: &raw const v as u64,
                ..Default::default()
            };
            assert_eq!(bpf(2, &mut up), 0, "{}", io::Error::last_os_error());
        }
        Some(fd)
    }

    #[test]
    fn a_batch_read_sees_every_entry_once_and_stops_at_its_cap() {
        use std::os::fd::AsFd;
        // More than one chunk, not a multiple of it.
        let Some(fd) = filled_map(3000) else {
            eprintln!("skipped: creating a BPF map needs root (CI runs as root)");
            return;
        };
        let mut seen = std::collections::BTreeMap::new();
        for_each::<u32, u64>(fd.as_fd(), usize::MAX, |k, v| {
            assert!(seen.insert(*k, *v).is_none(), "{k} twice");
        })
        .unwrap();
        assert_eq!(seen.len(), 3000);
        assert!(seen.iter().all(|(k, v)| u64::from(*k) * 3 == *v));
        let mut n = 0;
        for_each::<u32, u64>(fd.as_fd(), 700, |_, _| n += 1).unwrap();
        assert_eq!(n, 700);
        let empty = filled_map(0).unwrap();
        let mut none = 0;
        for_each::<u32, u64>(empty.as_fd(), usize::MAX, |_, _| none += 1).unwrap();
        assert_eq!(none, 0);
    }
}
