//! Discovery and enrichment from /proc. Only called at start-up and for rare
//! events (a stall, a new process), never per syscall.
//!
//! Everything read here comes from untrusted processes: names and command
//! lines are decoded lossily, read only up to a cap, and never trusted as
//! paths. Nothing here follows an fd into its file system with a path
//! lookup: fd kinds come from the /proc link text, and for paths from a
//! statx of the magic link with AT_STATX_DONT_SYNC (the open inode's cached
//! type, so a hung NFS or FUSE server is never asked); fd scans are capped
//! per process and timed.
use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::model::{End, FdInfo, FdKind, Peer};

/// Bytes of a command line read, at most.
const MAX_CMDLINE: u64 = 16 * 1024;
/// Bytes of a comm read (the kernel keeps 16).
const MAX_COMM: u64 = 64;
/// Fds of one process looked at in one scan, at most.
pub const MAX_FDS_SCANNED: usize = 65536;
/// Holders of a pipe listed in a report; the rest are counted.
pub const MAX_PEERS: usize = 32;
/// The pipe-holder search over the whole host stops after this long.
pub const HOLDERS_BUDGET: Duration = Duration::from_secs(2);

/// The first `cap` bytes of a file.
pub fn read_capped(path: &std::path::Path, cap: u64) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    fs::File::open(path)
        .ok()?
        .take(cap)
        .read_to_end(&mut out)
        .ok()?;
    Some(out)
}

pub(super) fn proc_path(parts: &[&str]) -> PathBuf {
    let mut p = PathBuf::from("/proc");
    for part in parts {
        p.push(part);
    }
    p
}

pub fn exists(pid: u32) -> bool {
    proc_path(&[&pid.to_string()]).is_dir()
}

/// Thread `tid` of process `tgid` exists (a zombie's threads do not).
pub fn thread_exists(tgid: u32, tid: u32) -> bool {
    proc_path(&[&tgid.to_string(), "task", &tid.to_string()]).is_dir()
}

/// The process still has an fd table with something in it. An exiting
/// process closes its files (and so its sockets) only after freeing its
/// memory, which takes a while for a large one (an OOM victim).
pub fn has_open_fds(pid: u32) -> bool {
    fs::read_dir(proc_path(&[&pid.to_string(), "fd"]))
        .map(|mut d| d.next().is_some())
        .unwrap_or(false)
}

/// The fd through which `pid` holds the socket with this inode, from its
/// /proc/PID/fd links (`socket:[inode]`); the first `MAX_FDS_SCANNED` only.
pub fn socket_fd(pid: u32, inode: u64) -> Option<i32> {
    let want = format!("socket:[{inode}]");
    fs::read_dir(proc_path(&[&pid.to_string(), "fd"]))
        .ok()?
        .filter_map(|e| e.ok())
        .take(MAX_FDS_SCANNED)
        .find(|e| fs::read_link(e.path()).is_ok_and(|t| t.as_os_str() == want.as_str()))
        .and_then(|e| e.file_name().to_str()?.parse().ok())
}

/// The inodes of the sockets `pid` holds, from its /proc/PID/fd links
/// (`socket:[inode]`); the first `MAX_FDS_SCANNED` fds only. None when its
/// fd table cannot be read.
pub fn socket_inodes(pid: u32) -> Option<HashSet<u64>> {
    let dir = fs::read_dir(proc_path(&[&pid.to_string(), "fd"])).ok()?;
    Some(
        dir.filter_map(|e| e.ok())
            .take(MAX_FDS_SCANNED)
            .filter_map(|e| socket_inode(fs::read_link(e.path()).ok()?.to_str()?))
            .collect(),
    )
}

/// How long a command line may take to read. Reading it waits for the
/// process's memory-map lock, which the process can hold (a fault on a hung
/// mount), so it is read on a helper thread (see `bounded`).
const CMDLINE_DEADLINE: Duration = Duration::from_millis(500);

/// A process's command line, empty when it cannot be read in time.
pub fn cmdline(pid: u32) -> Vec<String> {
    let path = proc_path(&[&pid.to_string(), "cmdline"]);
    super::bounded::call(CMDLINE_DEADLINE, move || read_capped(&path, MAX_CMDLINE))
        .ok()
        .flatten()
        .map(|b| parse_cmdline(&b))
        .unwrap_or_default()
}

pub fn parse_cmdline(bytes: &[u8]) -> Vec<String> {
    bytes
        .split(|b| *b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect()
}

pub fn comm(pid: u32) -> String {
    read_capped(&proc_path(&[&pid.to_string(), "comm"]), MAX_COMM)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .trim_end_matches('\n')
                .to_string()
        })
        .unwrap_or_default()
}

/// Parent pid from /proc/PID/stat. The comm field may hold spaces and
/// parentheses, so parse from the last ')'.
pub fn parse_stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut it = rest.split_whitespace();
    let _state = it.next()?;
    it.next()?.parse().ok()
}

pub fn ppid(pid: u32) -> Option<u32> {
    let s = read_capped(&proc_path(&[&pid.to_string(), "stat"]), 4096)?;
    parse_stat_ppid(&String::from_utf8_lossy(&s))
}

pub fn all_pids() -> Vec<u32> {
    let Ok(rd) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

pub fn threads(pid: u32) -> Vec<u32> {
    let Ok(rd) = fs::read_dir(proc_path(&[&pid.to_string(), "task"])) else {
        return Vec::new();
    };
    rd.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

pub fn children(pid: u32) -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| ppid(*p) == Some(pid))
        .collect()
}

/// Whether a command line is Gunicorn's: `gunicorn ...`, `python -m gunicorn
/// ...`, `python /venv/bin/gunicorn ...`, or a setproctitle'd `gunicorn: ...`.
pub fn is_gunicorn(cmdline: &[String], comm: &str) -> bool {
    // Exact names only: a test binary called `gunicorn_e2e-…` is not Gunicorn.
    let named = |s: &str| s == "gunicorn" || s.starts_with("gunicorn:");
    if named(comm) {
        return true;
    }
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let Some(first) = cmdline.first() else {
        return false;
    };
    if named(&base(first)) || first.starts_with("gunicorn:") {
        return true;
    }
    if !base(first).starts_with("python") {
        return false;
    }
    let mut it = cmdline.iter().skip(1).peekable();
    while let Some(arg) = it.next() {
        if arg == "-m" {
            return it.peek().is_some_and(|m| *m == "gunicorn");
        }
        if arg.starts_with('-') {
            continue;
        }
        // The first non-option argument is the script.
        return base(arg) == "gunicorn";
    }
    false
}

/// What a process is to us, judged from /proc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Identity {
    Master,
    Worker { master: u32 },
    Other,
}

pub fn identify(pid: u32) -> Identity {
    let me = is_gunicorn(&cmdline(pid), &comm(pid));
    if !me {
        return Identity::Other;
    }
    match ppid(pid) {
        Some(pp) if pp > 1 && is_gunicorn(&cmdline(pp), &comm(pp)) => {
            Identity::Worker { master: pp }
        }
        _ => Identity::Master,
    }
}

pub fn all_masters() -> Vec<u32> {
    all_pids()
        .into_iter()
        .filter(|p| identify(*p) == Identity::Master)
        .collect()
}

/// Bytes of the app argument kept: it becomes a label of every series.
pub const MAX_APP: usize = 128;

/// The WSGI app argument (`module:callable`) from a Gunicorn command line,
/// cut to `MAX_APP` bytes.
pub fn parse_app(cmdline: &[String]) -> Option<String> {
    let app = cmdline
        .iter()
        .skip(1)
        .rev()
        .find(|a| !a.starts_with('-') && a.contains(':') && !a.contains('/'))?;
    let mut end = app.len().min(MAX_APP);
    while !app.is_char_boundary(end) {
        end -= 1;
    }
    Some(app[..end].to_string())
}

pub fn fd_target(pid: u32, fd: i32) -> Option<String> {
    fs::read_link(proc_path(&[&pid.to_string(), "fd", &fd.to_string()]))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// Classifies an fd from its /proc link target and, for paths, its file mode.
pub fn classify_target(target: &str, mode: Option<u32>) -> FdKind {
    if target.starts_with("pipe:") {
        return FdKind::Pipe;
    }
    if target.starts_with("socket:") {
        return FdKind::Socket;
    }
    if let Some(anon) = target.strip_prefix("anon_inode:") {
        return match anon.trim_matches(|c| c == '[' || c == ']') {
            "eventfd" => FdKind::Eventfd,
            "eventpoll" => FdKind::Epoll,
            "timerfd" => FdKind::Timerfd,
            "signalfd" => FdKind::Signalfd,
            "inotify" => FdKind::Inotify,
            _ => FdKind::AnonInode,
        };
    }
    if target.starts_with("/dev/pts/") || target.starts_with("/dev/tty") || target == "/dev/console"
    {
        return FdKind::Tty;
    }
    match mode.map(|m| m & libc::S_IFMT) {
        Some(libc::S_IFIFO) => FdKind::Fifo,
        Some(libc::S_IFSOCK) => FdKind::Socket,
        Some(libc::S_IFCHR) | Some(libc::S_IFBLK) => FdKind::Device,
        Some(libc::S_IFDIR) => FdKind::Directory,
        Some(libc::S_IFREG) => FdKind::File,
        _ if target.starts_with('/') => FdKind::File,
        _ => FdKind::Unknown,
    }
}

/// The access mode of an fd from /proc/PID/fdinfo/FD's `flags:` line (octal).
pub fn parse_fdinfo_end(fdinfo: &str) -> Option<End> {
    let line = fdinfo.lines().find(|l| l.starts_with("flags:"))?;
    let flags = u32::from_str_radix(line["flags:".len()..].trim(), 8).ok()?;
    Some(match flags & 0o3 {
        0 => End::Read,
        1 => End::Write,
        _ => End::Both,
    })
}

fn fd_end(pid: u32, fd: i32) -> End {
    read_capped(
        &proc_path(&[&pid.to_string(), "fdinfo", &fd.to_string()]),
        4096,
    )
    .and_then(|s| parse_fdinfo_end(&String::from_utf8_lossy(&s)))
    .unwrap_or(End::Unknown)
}

/// The fds of a process, at most `MAX_FDS_SCANNED`: (fd, link text).
/// Reading the link text asks no file system: the kernel prints the path
/// it already holds. The bool is false when the cap cut the list short.
fn fd_links(pid: u32) -> (Vec<(i32, String)>, bool) {
    let Ok(rd) = fs::read_dir(proc_path(&[&pid.to_string(), "fd"])) else {
        return (Vec::new(), true);
    };
    let mut out = Vec::new();
    for e in rd.flatten() {
        if out.len() >= MAX_FDS_SCANNED {
            return (out, false);
        }
        let Some(fd) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if let Ok(link) = fs::read_link(e.path()) {
            out.push((fd, link.to_string_lossy().into_owned()));
        }
    }
    (out, true)
}

/// The holders of a pipe found on the host: at most `MAX_PEERS` listed.
#[derive(Debug, Default, Clone)]
pub struct Holders {
    pub peers: Vec<Peer>,
    /// Holders found beyond `MAX_PEERS`.
    pub omitted: u64,
    /// Every process other than the reader was searched in full (no fd cap
    /// hit, within the time budget).
    pub complete: bool,
}

impl Holders {
    /// Keeps `p`, or counts it. A writer from another process is what
    /// decides whether the reader can ever wake, so one is always kept.
    pub fn add(&mut self, p: Peer, reader: u32) {
        if self.peers.len() < MAX_PEERS {
            self.peers.push(p);
            return;
        }
        self.omitted += 1;
        let other_writer = |q: &Peer| q.pid != reader && q.may_write();
        if other_writer(&p) && !self.peers.iter().any(other_writer) {
            self.peers[MAX_PEERS - 1] = p;
        }
    }
}

/// Every fd on the host, other than `skip`, whose link target is `target`.
/// Costly on a big host, so only called for a reported stall on a pipe,
/// and bounded: `MAX_FDS_SCANNED` fds per process, `budget` in all.
pub fn holders(target: &str, skip: (u32, i32), budget: Duration) -> Holders {
    let start = Instant::now();
    let mut h = Holders {
        complete: true,
        ..Default::default()
    };
    for pid in all_pids() {
        if start.elapsed() > budget {
            h.complete = false;
            break;
        }
        let (links, whole) = fd_links(pid);
        if !whole && pid != skip.0 {
            h.complete = false;
        }
        for (fd, link) in links {
            if (pid, fd) == skip || link != target {
                continue;
            }
            let p = Peer {
                pid,
                comm: comm(pid),
                fd,
                end: fd_end(pid, fd),
            };
            h.add(p, skip.0);
        }
    }
    h
}

/// statx of /proc/PID/fd/N with AT_STATX_DONT_SYNC: the magic link leads
/// straight to the open file (no lookup), and DONT_SYNC lets NFS and FUSE
/// answer from the inode they hold instead of asking their server.
pub(super) fn statx_fd(pid: u32, fd: i32, mask: u32) -> Option<libc::statx> {
    let path = CString::new(format!("/proc/{pid}/fd/{fd}")).ok()?;
    // SAFETY: statx is plain old data; all-zero is a valid value.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: valid NUL-terminated path and a statx buffer we own.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_STATX_DONT_SYNC,
            mask,
            &mut st,
        )
    };
    (r == 0).then_some(st)
}

/// The file type bits of an fd whose link text is a path.
fn fd_mode(pid: u32, fd: i32) -> Option<u32> {
    statx_fd(pid, fd, libc::STATX_TYPE).map(|s| s.stx_mode as u32)
}

/// What an fd is: its link text and kind, without its holders.
pub fn fd_target_kind(pid: u32, fd: i32) -> Option<(String, FdKind)> {
    let target = fd_target(pid, fd)?;
    // Pipes, sockets and anonymous inodes say what they are in the link.
    let mode = target.starts_with('/').then(|| fd_mode(pid, fd)).flatten();
    let kind = classify_target(&target, mode);
    Some((target, kind))
}

/// An fd's kind, target and, for a pipe, its holders searched for up to
/// `HOLDERS_BUDGET`.
pub fn fd_info(pid: u32, fd: i32) -> FdInfo {
    let Some((target, kind)) = fd_target_kind(pid, fd) else {
        return FdInfo::unknown();
    };
    let h = kind
        .is_pipe_like()
        .then(|| holders(&target, (pid, fd), HOLDERS_BUDGET));
    with_holders(kind, target, h)
}

/// An fd's facts with the holders found; `None`: they were not searched
/// (the search is not complete, so no claim rests on it).
pub fn with_holders(kind: FdKind, target: String, h: Option<Holders>) -> FdInfo {
    let (peers, peers_omitted, peers_complete) = match h {
        Some(h) => (h.peers, h.omitted, h.complete),
        None if kind.is_pipe_like() => (Vec::new(), 0, false),
        None => (Vec::new(), 0, true),
    };
    FdInfo {
        kind,
        target: Some(target),
        peers,
        peers_omitted,
        peers_complete,
    }
}

/// One TCP socket of /proc/PID/net/tcp or tcp6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpSocket {
    pub inode: u64,
    pub local_port: u16,
    pub listening: bool,
    /// The other end; None for a listening or unconnected socket.
    pub remote: Option<SocketAddr>,
}

/// `0100007F:1F90` (IPv4) or 32 hex digits then `:port` (IPv6), as
/// /proc/net/tcp prints them: each 32-bit word in host byte order.
fn parse_net_addr(s: &str) -> Option<SocketAddr> {
    let (addr, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> = (0..addr.len() / 8)
        .map(|i| u32::from_str_radix(addr.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect::<Option<_>>()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_ne_bytes()).collect();
    let ip = match bytes.len() {
        4 => Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]).into(),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            let v6 = Ipv6Addr::from(b);
            v6.to_ipv4_mapped().map(Into::into).unwrap_or(v6.into())
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

/// One line of /proc/PID/net/tcp or tcp6 (`sl local_address rem_address
/// st ... inode`), and udp alike; None when it does not parse.
fn parse_net_line(line: &str) -> Option<TcpSocket> {
    let cols: Vec<&str> = line.split_whitespace().collect();
    let port = cols.get(1)?.rsplit(':').next()?;
    let remote = cols.get(2).and_then(|r| parse_net_addr(r));
    Some(TcpSocket {
        inode: cols.get(9)?.parse().ok()?,
        local_port: u16::from_str_radix(port, 16).ok()?,
        // st 0A is TCP_LISTEN.
        listening: *cols.get(3)? == "0A",
        remote: remote.filter(|r| r.port() != 0),
    })
}

/// Parses a whole /proc/PID/net/tcp text; lines that do not parse are
/// skipped.
pub fn parse_net_tcp(text: &str) -> Vec<TcpSocket> {
    text.lines().skip(1).filter_map(parse_net_line).collect()
}

/// Lines of a /proc/PID/net table read, at most: a namespace holds as many
/// sockets as its processes open (262k TIME_WAIT sockets make tcp about
/// 39 MB), so the table is streamed, never held whole, and cut here.
const MAX_NET_LINES: usize = 1 << 20;

/// Streams the data lines of /proc/PID/net/`file` to `f` until it returns
/// true (found) or the table ends; returns whether it did.
fn scan_net_table(pid: u32, file: &str, mut f: impl FnMut(&str) -> bool) -> bool {
    use std::io::BufRead;
    let Ok(file) = fs::File::open(proc_path(&[&pid.to_string(), "net", file])) else {
        return false;
    };
    std::io::BufReader::new(file)
        .lines()
        .skip(1)
        .take(MAX_NET_LINES)
        .map_while(Result::ok)
        .any(|l| f(&l))
}

/// The other end of socket fd `fd` of `pid`: `10.0.3.7:5432`, `[::1]:80`,
/// or `unix`; None for a listening or unconnected socket. The tables are
/// streamed and read only up to the socket's line.
pub fn socket_peer(pid: u32, fd: i32) -> Option<String> {
    let inode = socket_inode(&fd_target(pid, fd)?)?;
    let mut peer = None;
    for f in ["tcp", "tcp6", "udp", "udp6"] {
        let found = scan_net_table(pid, f, |l| match parse_net_line(l) {
            Some(s) if s.inode == inode => {
                peer = Some(s.remote.map(|r| r.to_string()));
                true
            }
            _ => false,
        });
        if found {
            return peer.flatten();
        }
    }
    let listed = scan_net_table(pid, "unix", |l| {
        l.split_whitespace().nth(6).and_then(|i| i.parse().ok()) == Some(inode)
    });
    listed.then(|| "unix".to_string())
}

/// The inode of a `socket:[N]` fd link target.
fn socket_inode(target: &str) -> Option<u64> {
    target
        .strip_prefix("socket:[")?
        .strip_suffix(']')?
        .parse()
        .ok()
}

/// Every listening TCP socket of a process: (fd, port).
pub fn listening_fds(pid: u32) -> Vec<(i32, u16)> {
    let mut listen_inodes = std::collections::HashMap::new();
    for f in ["tcp", "tcp6"] {
        scan_net_table(pid, f, |l| {
            // Listening sockets are few; connections are skipped unkept.
            if let Some(s) = parse_net_line(l).filter(|s| s.listening) {
                listen_inodes.insert(s.inode, s.local_port);
            }
            false
        });
    }
    if listen_inodes.is_empty() {
        return Vec::new();
    }
    fd_links(pid)
        .0
        .into_iter()
        .filter_map(|(fd, link)| Some((fd, *listen_inodes.get(&socket_inode(&link)?)?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn cmdline_splits_on_nul_and_tolerates_bad_utf8() {
        let c = parse_cmdline(b"python3\0-m\0gunicorn\0\xff\xfe\0");
        assert_eq!(c[..3], v(&["python3", "-m", "gunicorn"]));
        assert_eq!(c[3], "\u{fffd}\u{fffd}");
        assert!(parse_cmdline(b"").is_empty());
    }

    #[test]
    fn stat_ppid_survives_hostile_comm() {
        let s = "1234 (evil) 1 2 (x) S 99 1234 1234 0 -1";
        assert_eq!(parse_stat_ppid(s), Some(99));
        assert_eq!(parse_stat_ppid("1 (init) S 0 1 1"), Some(0));
        assert_eq!(parse_stat_ppid("garbage"), None);
    }

    #[test]
    fn recognises_gunicorn_command_lines() {
        assert!(is_gunicorn(
            &v(&[
                "/venv/bin/python3",
                "/venv/bin/gunicorn",
                "-k",
                "gevent",
                "app:app"
            ]),
            "gunicorn"
        ));
        assert!(is_gunicorn(
            &v(&["/venv/bin/python3", "/venv/bin/gunicorn", "app:app"]),
            "python3"
        ));
        assert!(is_gunicorn(
            &v(&["python3", "-u", "-m", "gunicorn", "app:app"]),
            "python3"
        ));
        assert!(is_gunicorn(
            &v(&["gunicorn: master [app:app]"]),
            "gunicorn: maste"
        ));
        assert!(!is_gunicorn(
            &v(&["python3", "-m", "http.server"]),
            "python3"
        ));
        assert!(!is_gunicorn(
            &v(&["python3", "myscript.py", "gunicorn"]),
            "python3"
        ));
        assert!(!is_gunicorn(&v(&["nginx: worker process"]), "nginx"));
        assert!(!is_gunicorn(&[], ""));
        // Prefixes are not enough: this is a Rust test binary.
        assert!(!is_gunicorn(
            &v(&["/x/target/release/deps/gunicorn_e2e-1f2e"]),
            "gunicorn_e2e-1f2"
        ));
        assert!(!is_gunicorn(
            &v(&["/usr/bin/gunicorn-exporter"]),
            "gunicorn-export"
        ));
    }

    #[test]
    fn finds_the_fd_of_a_socket_by_inode_and_the_sockets_held() {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let inode = fs::metadata(format!("/proc/self/fd/{}", l.as_raw_fd()))
            .unwrap()
            .ino();
        assert_eq!(socket_fd(std::process::id(), inode), Some(l.as_raw_fd()));
        assert_eq!(socket_fd(std::process::id(), 1), None);
        let held = socket_inodes(std::process::id()).expect("own fd table");
        assert!(held.contains(&inode), "{held:?}");
        drop(l);
        let held = socket_inodes(std::process::id()).expect("own fd table");
        assert!(!held.contains(&inode), "closed, not held: {held:?}");
        assert_eq!(socket_inodes(u32::MAX), None);
    }

    #[test]
    fn app_from_command_line() {
        assert_eq!(
            parse_app(&v(&["gunicorn", "-b", "127.0.0.1:8000", "app:app"])),
            Some("app:app".into())
        );
        assert_eq!(
            parse_app(&v(&["gunicorn", "--bind=unix:/tmp/x.sock"])),
            None
        );
        let huge = format!("app:{}", "é".repeat(100_000));
        let app = parse_app(&v(&["gunicorn", &huge])).unwrap();
        assert!(
            app.len() <= MAX_APP && app.starts_with("app:"),
            "{}",
            app.len()
        );
    }

    #[test]
    fn classifies_fd_targets() {
        assert_eq!(classify_target("pipe:[1234]", None), FdKind::Pipe);
        assert_eq!(classify_target("socket:[99]", None), FdKind::Socket);
        assert_eq!(
            classify_target("anon_inode:[eventpoll]", None),
            FdKind::Epoll
        );
        assert_eq!(
            classify_target("anon_inode:[eventfd]", None),
            FdKind::Eventfd
        );
        assert_eq!(
            classify_target("anon_inode:bpf-map", None),
            FdKind::AnonInode
        );
        assert_eq!(
            classify_target("/dev/pts/3", Some(libc::S_IFCHR)),
            FdKind::Tty
        );
        assert_eq!(
            classify_target("/dev/null", Some(libc::S_IFCHR | 0o666)),
            FdKind::Device
        );
        assert_eq!(
            classify_target("/tmp/fifo", Some(libc::S_IFIFO | 0o600)),
            FdKind::Fifo
        );
        assert_eq!(
            classify_target("/var/log/x.log", Some(libc::S_IFREG | 0o644)),
            FdKind::File
        );
        assert_eq!(classify_target("/gone (deleted)", None), FdKind::File);
        assert_eq!(classify_target("", None), FdKind::Unknown);
    }

    #[test]
    fn fdinfo_access_mode() {
        assert_eq!(
            parse_fdinfo_end("pos:\t0\nflags:\t02000000\nmnt_id:\t15\n"),
            Some(End::Read)
        );
        assert_eq!(
            parse_fdinfo_end("pos:\t0\nflags:\t02000001\n"),
            Some(End::Write)
        );
        assert_eq!(parse_fdinfo_end("flags:\t0100002\n"), Some(End::Both));
        assert_eq!(parse_fdinfo_end("flags:\tzz\n"), None);
        assert_eq!(parse_fdinfo_end(""), None);
    }

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(exists(me));
        assert!(!cmdline(me).is_empty());
        assert!(ppid(me).is_some());
        assert!(threads(me).contains(&me));
    }

    fn peer(pid: u32, end: End) -> Peer {
        Peer {
            pid,
            comm: "x".into(),
            fd: 3,
            end,
        }
    }

    #[test]
    fn holders_are_capped_and_keep_an_outside_writer() {
        let mut h = Holders::default();
        for _ in 0..1000 {
            h.add(peer(7, End::Write), 7);
        }
        assert_eq!(
            (h.peers.len(), h.omitted),
            (MAX_PEERS, 1000 - MAX_PEERS as u64)
        );
        h.add(peer(8, End::Read), 7);
        assert!(h.peers.iter().all(|p| p.pid == 7));
        h.add(peer(9, End::Write), 7);
        assert_eq!(h.peers.len(), MAX_PEERS);
        assert!(
            h.peers.iter().any(|p| p.pid == 9),
            "the outside writer is kept"
        );
        assert_eq!(h.omitted, 1000 - MAX_PEERS as u64 + 2);
    }

    #[test]
    fn fd_kinds_of_this_process_without_following_into_files() {
        let f = fs::File::open("/proc/self/status").unwrap();
        use std::os::fd::AsRawFd;
        let info = fd_info(std::process::id(), f.as_raw_fd());
        assert_eq!(info.kind, FdKind::File);
        assert!(info.peers_complete);
    }

    #[test]
    fn net_tcp_port_by_inode() {
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 45678 1 0000000000000000 100 0 0 10 0
   1: 0100007F:D2F2 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 45679 1 0000000000000000 20 4 30 10 -1
";
        let socks = parse_net_tcp(text);
        let port = |inode| {
            socks
                .iter()
                .find(|s| s.inode == inode)
                .map(|s| s.local_port)
        };
        assert_eq!(port(45678), Some(8080));
        assert_eq!(port(45679), Some(0xD2F2));
        assert_eq!(port(1), None);
        assert!(parse_net_tcp("garbage").is_empty());
        assert!(socks[0].listening && !socks[1].listening);
        assert_eq!(socket_inode("socket:[45678]"), Some(45678));
        assert_eq!(socket_inode("pipe:[45678]"), None);
    }

    #[test]
    fn peers_from_net_tables() {
        assert_eq!(
            parse_net_addr("0700000A:1538"),
            Some("10.0.0.7:5432".parse().unwrap())
        );
        assert_eq!(
            parse_net_addr("00000000000000000000000001000000:0050"),
            Some("[::1]:80".parse().unwrap())
        );
        assert_eq!(
            parse_net_addr("0000000000000000FFFF00000200007F:1538"),
            Some("127.0.0.2:5432".parse().unwrap()),
            "an IPv4-mapped peer prints as IPv4"
        );
        assert_eq!(parse_net_addr("zz:1"), None);
        let text = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:D2F2 0200007F:1538 01 00000000:00000000 00:00000000 00000000     0        0 777 1 0000000000000000 20 4 30 10 -1
   1: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 778 1 0000000000000000 100 0 0 10 0
";
        let socks = parse_net_tcp(text);
        assert_eq!(socks[0].remote, Some("127.0.0.2:5432".parse().unwrap()));
        assert_eq!(socks[1].remote, None, "a listener has no peer");
    }

    /// Issue 20, item 4: /proc/PID/net/tcp was read whole (39 MB with 262k
    /// TIME_WAIT sockets). It is streamed now, up to the socket sought.
    #[test]
    fn peers_and_listeners_come_from_streamed_tables() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let me = std::process::id();
        use std::os::fd::AsRawFd;
        assert_eq!(
            socket_peer(me, c.as_raw_fd()),
            Some(format!("127.0.0.1:{port}"))
        );
        assert!(
            listening_fds(me).contains(&(l.as_raw_fd(), port)),
            "{:?}",
            listening_fds(me)
        );
        let mut lines = 0;
        assert!(!scan_net_table(me, "tcp", |_| {
            lines += 1;
            false
        }));
        assert!((2..=MAX_NET_LINES).contains(&lines));
    }
}
