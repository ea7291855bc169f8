//! What a thread blocked in a multiplexer waits on, and which wait is a
//! worker's event loop's own. An epoll fd's interest list comes from its
//! fdinfo; a poll or select set from the process's memory
//! (process_vm_readv, bounded), read while the thread is still blocked in
//! the call. Only for a stall being reported, or a worker whose loop is not
//! known yet: never per syscall.
use std::fs;

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Duration;

use super::bounded::{Missed, Pool};
use super::threads;
use crate::model::LoopWait;

/// Fds named from one multiplexer call, at most.
const MAX_FDS: usize = 64;
/// select's read set: FD_SETSIZE bits at most.
const MAX_NFDS: u64 = 1024;
/// Fds of a worker looked at for its loop's epoll fd.
const FD_SCAN: usize = 1024;
/// Epoll fds of a worker whose interest lists are read, per search.
const MAX_EPOLLS: usize = 4;
/// Bytes of an epoll's fdinfo read (about 200 registered fds; the first 64
/// are all that is parsed).
const FDINFO_CAP: u64 = 16 * 1024;
/// A worker whose fd table is larger than this is not searched: the kernel
/// renders an epoll's whole interest list (78 bytes an fd) into memory
/// charged to the reader before it returns a byte, so 1M registered fds
/// would cost the tracer about 78 MB per read, whatever it reads of it.
pub const MAX_FD_TABLE: u64 = 65_536;

/// How a multiplexer names the fds it waits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Multiplexer {
    /// epoll_wait and its kin: arg0 is the epoll fd.
    Epoll,
    /// poll/ppoll: arg0 the pollfd array, arg1 its length.
    Poll,
    /// select/pselect6: arg0 nfds, arg1 to arg3 the read, write and
    /// exception sets.
    Select,
}

/// The `tfd:` fds of an epoll fd's fdinfo: its interest list.
pub fn parse_epoll_fdinfo(text: &str) -> Vec<i32> {
    text.lines()
        .filter_map(|l| l.trim_start().strip_prefix("tfd:"))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .take(MAX_FDS)
        .collect()
}

pub fn epoll_targets(pid: u32, epfd: i32) -> Vec<i32> {
    use std::io::Read;
    let path = format!("/proc/{pid}/fdinfo/{epfd}");
    let mut buf = Vec::new();
    let read = fs::File::open(path).and_then(|f| f.take(FDINFO_CAP).read_to_end(&mut buf));
    if read.is_err() {
        return Vec::new();
    }
    // A cut last line is dropped with the rest past the cap.
    let text = String::from_utf8_lossy(&buf);
    let whole = match text.rfind('\n') {
        Some(end) => &text[..=end],
        None => "",
    };
    parse_epoll_fdinfo(whole)
}

/// The size of a process's fd table (`FDSize` in its status file): an
/// upper bound of the fds it has open.
pub fn fd_table_size(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_fd_table_size(&status)
}

fn parse_fd_table_size(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))?
        .trim()
        .parse()
        .ok()
}

/// Reads of target memory run here, apart from the /proc helpers: a page
/// the target backs with FUSE or userfaultfd can hold a read forever.
static MEMORY_POOL: Pool = Pool::new(2);
/// How long one read of target memory may take.
const MEMORY_DEADLINE: Duration = Duration::from_millis(200);
/// Processes one of whose memory reads never returned: never read again
/// (a second stuck read would only take another helper).
static QUARANTINED: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

fn quarantined(pid: u32) -> bool {
    QUARANTINED.lock().is_ok_and(|q| q.contains(&pid))
}

/// `len` bytes at `addr` in `pid`'s memory, read on a helper thread with a
/// deadline; a process whose read missed it is not read again.
fn read_memory(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    if addr == 0 || len == 0 || quarantined(pid) {
        return None;
    }
    match MEMORY_POOL.call(MEMORY_DEADLINE, move || read_memory_now(pid, addr, len)) {
        Ok(bytes) => bytes,
        Err(Missed::TimedOut) => {
            if let Ok(mut q) = QUARANTINED.lock() {
                q.insert(pid);
            }
            None
        }
        Err(Missed::Busy) => None,
    }
}

fn read_memory_now(pid: u32, addr: u64, len: usize) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; len];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: len,
    };
    // SAFETY: one local iovec over `buf`, which outlives the call; the
    // remote address is only read by the kernel, on the other process.
    let n = unsafe { libc::process_vm_readv(pid as i32, &local, 1, &remote, 1, 0) };
    (n == len as isize).then_some(buf)
}

/// The fds of a pollfd array (`int fd; short events; short revents`);
/// negative fds are ignored by poll, and here.
pub fn parse_pollfds(bytes: &[u8]) -> Vec<i32> {
    bytes
        .chunks_exact(8)
        .filter_map(|c| Some(i32::from_ne_bytes(c[..4].try_into().ok()?)))
        .filter(|fd| *fd >= 0)
        .take(MAX_FDS)
        .collect()
}

/// The fds set in an fd_set's first `nfds` bits (bit n is fd n, in native
/// longs).
pub fn parse_fd_set(bytes: &[u8], nfds: u64) -> Vec<i32> {
    let mut out = Vec::new();
    for (i, word) in bytes.chunks_exact(8).enumerate() {
        let w = u64::from_ne_bytes(word.try_into().expect("8 bytes"));
        for bit in 0..64 {
            let fd = i as u64 * 64 + bit;
            if fd < nfds && w & (1 << bit) != 0 && out.len() < MAX_FDS {
                out.push(fd as i32);
            }
        }
    }
    out
}

/// The bytes of an fd_set holding `nfds` bits, in whole longs.
fn fd_set_len(nfds: u64) -> usize {
    (nfds.min(MAX_NFDS).div_ceil(64) * 8) as usize
}

/// The fds thread `tid` waits on in multiplexer syscall `nr` (first
/// argument `arg0`), read while it is still blocked in that call.
pub fn multiplexer_fds(pid: u32, tid: u32, kind: Multiplexer, nr: i64, arg0: u64) -> Vec<i32> {
    if kind == Multiplexer::Epoll {
        return epoll_targets(pid, arg0 as i32);
    }
    let Some((now_nr, args)) = threads::thread_syscall(pid, tid) else {
        return Vec::new();
    };
    if now_nr != nr || args[0] != arg0 {
        return Vec::new();
    }
    let mut fds = match kind {
        Multiplexer::Poll => {
            let n = (args[1] as usize).min(MAX_FDS);
            read_memory(pid, args[0], n * 8)
                .map(|b| parse_pollfds(&b))
                .unwrap_or_default()
        }
        _ => {
            let nfds = args[0].min(MAX_NFDS);
            let mut fds = Vec::new();
            for set in [args[1], args[2], args[3]] {
                if let Some(b) = read_memory(pid, set, fd_set_len(nfds)) {
                    fds.extend(parse_fd_set(&b, nfds));
                }
            }
            fds
        }
    };
    fds.sort_unstable();
    fds.dedup();
    fds
}

/// Fds of `pid` that are epoll fds.
fn epoll_fds(pid: u32) -> Vec<i32> {
    let Ok(rd) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    rd.flatten()
        .take(FD_SCAN)
        .filter_map(|e| {
            let fd = e.file_name().to_str()?.parse().ok()?;
            let link = fs::read_link(e.path()).ok()?;
            (link.to_str()? == "anon_inode:[eventpoll]").then_some(fd)
        })
        .collect()
}

/// The event loop's own wait of worker `pid`, whose listening sockets are
/// `listeners` (inherited from the master, same fds): the epoll fd whose
/// interest list holds one (gevent, gthread, asyncio); else the select its
/// main thread sleeps in over all of them (the sync worker), when it is
/// asleep there now. `select_nrs` are select's syscall numbers here.
///
/// A worker with an fd table past `MAX_FD_TABLE` is not searched (see
/// there), and at most `MAX_EPOLLS` interest lists are read per search.
pub fn find_loop(pid: u32, listeners: &[i32], select_nrs: &[i64]) -> Option<LoopWait> {
    if listeners.is_empty() || fd_table_size(pid).is_none_or(|n| n > MAX_FD_TABLE) {
        return None;
    }
    let epoll = epoll_fds(pid)
        .into_iter()
        .take(MAX_EPOLLS)
        .find(|&ep| epoll_targets(pid, ep).iter().any(|t| listeners.contains(t)));
    if let Some(epfd) = epoll {
        return Some(LoopWait::Epoll { epfd });
    }
    let (nr, args) = threads::thread_syscall(pid, pid)?;
    if !select_nrs.contains(&nr) {
        return None;
    }
    let nfds = args[0].min(MAX_NFDS);
    let set = read_memory(pid, args[1], fd_set_len(nfds))?;
    let fds = parse_fd_set(&set, nfds);
    // Asleep in the same call all along, or the set may be another's.
    if threads::thread_syscall(pid, pid) != Some((nr, args))
        || !listeners.iter().all(|l| fds.contains(l))
    {
        return None;
    }
    let first = u64::from_ne_bytes(set.get(..8)?.try_into().ok()?);
    Some(LoopWait::Select {
        nfds: nfds as u32,
        fds: first,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_interest_list_from_fdinfo() {
        let text = "pos:\t0\nflags:\t02000002\nmnt_id:\t15\nino:\t1057\ntfd:        5 events:       19 data:                5  pos:0 ino:7b3 sdev:8\ntfd:        9 events:       19 data:                9  pos:0 ino:7c1 sdev:8\n";
        assert_eq!(parse_epoll_fdinfo(text), vec![5, 9]);
        assert!(parse_epoll_fdinfo("pos:\t0\n").is_empty());
    }

    #[test]
    fn fd_table_size_from_status() {
        let status = "Name:\tgunicorn\nFDSize:\t1048576\nGroups:\t\n";
        assert_eq!(parse_fd_table_size(status), Some(1_048_576));
        assert_eq!(parse_fd_table_size("Name:\tx\n"), None);
        assert!(fd_table_size(std::process::id()).unwrap() >= 64);
    }

    /// Issue 20, item 2: an epoll's fdinfo was read whole, at a size the
    /// target sets. Only its first `FDINFO_CAP` bytes are read now, and a
    /// worker with a huge fd table is not searched at all.
    #[test]
    fn a_big_interest_list_is_read_only_up_to_the_cap() {
        // SAFETY: plain syscalls on fds this test creates and closes.
        let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        assert!(ep >= 0);
        let mut fds = Vec::new();
        for _ in 0..1000 {
            let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            assert!(fd >= 0);
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: fd as u64,
            };
            assert_eq!(
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
                0
            );
            fds.push(fd);
        }
        let got = epoll_targets(std::process::id(), ep);
        assert_eq!(got.len(), MAX_FDS, "the first {MAX_FDS} only");
        assert!(got.iter().all(|fd| fds.contains(fd)), "{got:?}");
        for fd in fds {
            unsafe { libc::close(fd) };
        }
        unsafe { libc::close(ep) };
    }

    #[test]
    fn pollfds_and_fd_sets() {
        let mut b = Vec::new();
        for (fd, ev) in [(7i32, 1i16), (-1, 1), (12, 4)] {
            b.extend(fd.to_ne_bytes());
            b.extend(ev.to_ne_bytes());
            b.extend(0i16.to_ne_bytes());
        }
        assert_eq!(parse_pollfds(&b), vec![7, 12]);
        let set: u64 = (1 << 3) | (1 << 5) | (1 << 9);
        assert_eq!(parse_fd_set(&set.to_ne_bytes(), 10), vec![3, 5, 9]);
        assert_eq!(
            parse_fd_set(&set.to_ne_bytes(), 6),
            vec![3, 5],
            "nfds bounds it"
        );
        assert_eq!(fd_set_len(9), 8);
        assert_eq!(fd_set_len(65), 16);
        assert_eq!(fd_set_len(1 << 20), 128, "FD_SETSIZE at most");
    }

    #[test]
    fn reads_its_own_memory() {
        let data = [1u8, 2, 3, 4, 5, 6, 7, 8];
        let got = read_memory(std::process::id(), data.as_ptr() as u64, 8);
        assert_eq!(got.as_deref(), Some(&data[..]));
        assert_eq!(read_memory(std::process::id(), 0, 8), None);
    }

    /// Issue 20, item 12: a page the target registered with userfaultfd
    /// (or backs with FUSE) and never fills held process_vm_readv, on the
    /// session thread, forever. The read gives up at its deadline now, and
    /// the process is not read again.
    #[test]
    fn a_page_that_never_faults_in_cannot_hold_the_tracer() {
        #[repr(C)]
        struct Api {
            api: u64,
            features: u64,
            ioctls: u64,
        }
        #[repr(C)]
        struct Register {
            start: u64,
            len: u64,
            mode: u64,
            ioctls: u64,
        }
        const UFFDIO_API: u64 = 0xc018_aa3f;
        const UFFDIO_REGISTER: u64 = 0xc020_aa00;
        let mut p = [0i32; 2];
        // SAFETY: a pipe into an array of two fds.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: the child makes raw syscalls only, then pauses until
        // killed.
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                let uffd = libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC) as i32;
                let mut api = Api {
                    api: 0xaa,
                    features: 0,
                    ioctls: 0,
                };
                let page = libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                    -1,
                    0,
                );
                let mut reg = Register {
                    start: page as u64,
                    len: 4096,
                    mode: 1,
                    ioctls: 0,
                };
                let addr: u64 = if uffd >= 0
                    && libc::ioctl(uffd, UFFDIO_API as _, &mut api) == 0
                    && libc::ioctl(uffd, UFFDIO_REGISTER as _, &mut reg) == 0
                {
                    page as u64
                } else {
                    0
                };
                libc::write(p[1], (&addr as *const u64).cast(), 8);
                loop {
                    libc::pause();
                }
            }
        }
        let mut addr = 0u64;
        // SAFETY: reading 8 bytes into a u64 we own.
        unsafe { libc::read(p[0], (&mut addr as *mut u64).cast(), 8) };
        let kill = || unsafe {
            libc::kill(child, libc::SIGKILL);
            libc::waitpid(child, std::ptr::null_mut(), 0);
        };
        if addr == 0 {
            kill();
            eprintln!("skipped: userfaultfd is not available here");
            return;
        }
        let t = std::time::Instant::now();
        let got = read_memory(child as u32, addr, 8);
        let took = t.elapsed();
        let again = read_memory(child as u32, addr, 8);
        let quarantined_now = quarantined(child as u32);
        // Killing the target releases the helper stuck in its page.
        kill();
        assert_eq!(got, None);
        assert!(
            took < Duration::from_secs(1),
            "gave up at its deadline: {took:?}"
        );
        assert_eq!(again, None);
        assert!(quarantined_now, "not read again");
    }
}
