//! Files of a traced process, read through its own root: never followed
//! out of it (openat2 RESOLVE_IN_ROOT, no magic links), only when they are
//! regular files of an ordinary filesystem (type and filesystem are checked
//! on an O_PATH descriptor before the file is opened for reading: a device,
//! a FIFO, or a file of /proc, /sys, debugfs or tracefs is never opened),
//! capped in size, and on a helper thread with a deadline (a hung mount).
//! Every file the tracer reads on a target's behalf goes through here, and
//! so does every library the stack helper's opener opens (host::sandbox).
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, SystemTime};

use super::bounded;

/// How long one read may take.
const DEADLINE: Duration = Duration::from_millis(500);

/// A regular file read inside a process's root.
#[derive(Debug)]
pub struct RootFile {
    pub bytes: Vec<u8>,
    pub mtime: Option<SystemTime>,
}

/// Why a file in a process's root was not read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootError {
    Missing,
    Other(String),
}

/// Filesystems whose "regular files" are kernel interfaces: reading one
/// can consume or change kernel state (/proc/kmsg eats the kernel log).
/// The magic numbers of statfs(2).
const PSEUDO_FILESYSTEMS: &[i64] = &[
    0x9fa0,      // proc
    0x6265_6572, // sysfs
    0x6462_6720, // debugfs
    0x7472_6163, // tracefs
    0x7363_6673, // securityfs
    0xcafe_4a11, // bpf
    0x6265_6570, // configfs
    0xde5e_81e4, // efivarfs
    0x6165_676c, // pstore
    0x2741_44f7, // cgroup (v1)
    0x6367_7270, // cgroup2
];

fn fstatfs_type(fd: i32) -> Option<i64> {
    // SAFETY: an all-zero statfs is valid to write into; fd is open (an
    // O_PATH descriptor is enough for fstatfs).
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstatfs(fd, &mut st) } == 0).then_some(st.f_type as i64)
}

fn fstat(fd: i32) -> Option<libc::stat> {
    // SAFETY: an all-zero stat is valid to write into; fd is open.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    (unsafe { libc::fstat(fd, &mut st) } == 0).then_some(st)
}

/// Reads `path` (absolute inside the root of `pid`) when it is a regular
/// file of at most `cap` bytes. The path is resolved with openat2
/// RESOLVE_IN_ROOT and O_PATH (opens nothing: no device open, no FIFO
/// wait); the file type is checked on that descriptor, and only then is the
/// same inode reopened for reading, non-blocking. Runs with a deadline.
pub fn read_in_root(pid: u32, path: &str, cap: usize) -> Result<RootFile, RootError> {
    let path = path.to_string();
    bounded::call(DEADLINE, move || read_in_root_now(pid, &path, cap))
        .map_err(|e| RootError::Other(e.to_string()))?
}

/// How a path inside a process's root is resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resolve {
    /// Symbolic links are followed, but never out of the root (an
    /// absolute one starts at the root, ".." stops there).
    InRoot,
    /// No symbolic link at all (ELOOP): only the path as named.
    NoSymlinks,
}

/// `path` inside the root of process `who` (a pid, or "self"), opened
/// with O_PATH: nothing is opened, no driver runs. Never a magic link.
pub fn resolve_in_root(who: &str, path: &str, resolve: Resolve) -> std::io::Result<OwnedFd> {
    let root = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
        .open(format!("/proc/{who}/root"))?;
    let rel = CString::new(path.trim_start_matches('/'))
        .map_err(|_| std::io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: open_how is plain integers; all-zero is valid (and required
    // for the fields not set here).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (libc::O_PATH | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_NO_MAGICLINKS
        | match resolve {
            Resolve::InRoot => libc::RESOLVE_IN_ROOT,
            Resolve::NoSymlinks => libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS,
        };
    // SAFETY: a valid dirfd, a NUL-terminated path, an open_how of the size
    // passed; the fd returned is ours.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: a new descriptor no one else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Why an O_PATH descriptor was not reopened for reading.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotRegular {
    NotAFile,
    Pseudo,
    Failed(String),
}

/// The file of `opath` reopened for reading (non-blocking), with its
/// stat, when it is a regular file of an ordinary filesystem: the same
/// inode, through this process's own fd table.
pub fn reopen_regular(opath: &OwnedFd) -> Result<(std::fs::File, libc::stat), NotRegular> {
    let failed = |what: &str| NotRegular::Failed(format!("{what} failed"));
    let st = fstat(opath.as_raw_fd()).ok_or_else(|| failed("fstat"))?;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(NotRegular::NotAFile);
    }
    match fstatfs_type(opath.as_raw_fd()) {
        Some(t) if !PSEUDO_FILESYSTEMS.contains(&t) => {}
        Some(_) => return Err(NotRegular::Pseudo),
        None => return Err(failed("fstatfs")),
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC)
        .open(format!("/proc/self/fd/{}", opath.as_raw_fd()))
        .map_err(|e| NotRegular::Failed(e.to_string()))?;
    let again = fstat(file.as_raw_fd()).ok_or_else(|| failed("fstat"))?;
    if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) {
        return Err(NotRegular::Failed("it changed while opened".into()));
    }
    Ok((file, st))
}

fn read_in_root_now(pid: u32, path: &str, cap: usize) -> Result<RootFile, RootError> {
    let other = |e: String| RootError::Other(e);
    let opath = resolve_in_root(&pid.to_string(), path, Resolve::InRoot).map_err(|e| {
        match e.raw_os_error() {
            Some(libc::ENOENT) | Some(libc::ENOTDIR) => RootError::Missing,
            _ => other(format!("{path}: {e}")),
        }
    })?;
    let (file, st) = reopen_regular(&opath).map_err(|e| {
        other(match e {
            NotRegular::NotAFile => format!("{path} is not a regular file"),
            NotRegular::Pseudo => format!("{path} is on a pseudo filesystem"),
            NotRegular::Failed(why) => format!("{path}: {why}"),
        })
    })?;
    if st.st_size as u64 > cap as u64 {
        return Err(other(format!("{path} is larger than {} KiB", cap / 1024)));
    }
    let mut bytes = Vec::new();
    file.take(cap as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| other(format!("{path}: {e}")))?;
    if bytes.len() > cap {
        return Err(other(format!("{path} is larger than {} KiB", cap / 1024)));
    }
    let mtime = SystemTime::UNIX_EPOCH
        .checked_add(Duration::new(st.st_mtime as u64, st.st_mtime_nsec as u32));
    Ok(RootFile { bytes, mtime })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The config file cap (`host::gunicorn`).
    const MAX_CONFIG: usize = 256 * 1024;

    fn tempdir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("tracer-root-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn files_in_a_root_regular_and_capped_only() {
        let d = tempdir("files");
        let me = std::process::id();
        let p = |n: &str| d.join(n).to_str().unwrap().to_string();
        std::fs::write(d.join("conf.py"), "timeout = 7\n").unwrap();
        let f = read_in_root(me, &p("conf.py"), MAX_CONFIG).unwrap();
        assert_eq!(f.bytes, b"timeout = 7\n");
        assert!(f.mtime.is_some());
        assert_eq!(
            read_in_root(me, &p("none.py"), MAX_CONFIG).unwrap_err(),
            RootError::Missing
        );
        std::fs::write(d.join("big.py"), vec![b'#'; 300 * 1024]).unwrap();
        assert!(
            matches!(read_in_root(me, &p("big.py"), MAX_CONFIG), Err(RootError::Other(e)) if e.contains("larger"))
        );
        assert!(
            read_in_root(me, d.to_str().unwrap(), MAX_CONFIG).is_err(),
            "a directory"
        );
        // A FIFO with no writer: never opened, so nothing waits.
        let fifo = CString::new(p("fifo.py")).unwrap();
        // SAFETY: a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        assert!(read_in_root(me, &p("fifo.py"), MAX_CONFIG).is_err());
        assert!(t.elapsed() < Duration::from_millis(400));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn magic_links_and_directories_are_refused() {
        let me = std::process::id();
        let got = read_in_root(me, "/proc/self/exe", 10);
        assert!(got.is_err(), "a magic link: {got:?}");
        let got = read_in_root(me, "/dev/zero", 10);
        assert!(
            matches!(&got, Err(RootError::Other(e)) if e.contains("not a regular file")),
            "{got:?}"
        );
        let got = read_in_root(me, "/tmp", 10);
        assert!(
            matches!(&got, Err(RootError::Other(e)) if e.contains("not a regular file")),
            "{got:?}"
        );
    }

    /// Issue 20, item 3: a regular-looking file of a pseudo filesystem
    /// (a symlink in a container's root to its /proc/kmsg eats the host's
    /// kernel log when read) is refused before it is opened.
    #[test]
    fn files_of_pseudo_filesystems_are_refused() {
        let me = std::process::id();
        for path in [
            "/proc/self/status",
            "/sys/kernel/mm/transparent_hugepage/enabled",
        ] {
            if !std::path::Path::new(path).exists() {
                continue;
            }
            let got = read_in_root(me, path, MAX_CONFIG);
            assert!(
                matches!(&got, Err(RootError::Other(e)) if e.contains("pseudo")),
                "{path}: {got:?}"
            );
        }
    }

    #[test]
    fn a_device_node_is_never_opened() {
        let d = tempdir("dev");
        let dev = d.join("gunicorn.conf.py");
        let c = CString::new(dev.to_str().unwrap()).unwrap();
        // SAFETY: a NUL-terminated path; /dev/null's numbers (1, 3).
        if unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) } != 0 {
            eprintln!("skipped: mknod needs CAP_MKNOD");
            return;
        }
        // SAFETY: plain syscalls on fds this test owns.
        let ino = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(ino >= 0);
        let wd = unsafe { libc::inotify_add_watch(ino, c.as_ptr(), libc::IN_OPEN) };
        assert!(wd >= 0);
        let got = read_in_root(std::process::id(), dev.to_str().unwrap(), MAX_CONFIG);
        assert!(
            matches!(&got, Err(RootError::Other(e)) if e.contains("not a regular file")),
            "{got:?}"
        );
        let mut buf = [0u8; 4096];
        let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n < 0, "IN_OPEN seen: the device was opened");
        // The watch works: an open is seen.
        drop(std::fs::File::open(&dev));
        let n = unsafe { libc::read(ino, buf.as_mut_ptr().cast(), buf.len()) };
        assert!(n > 0, "inotify did not see a real open");
        unsafe { libc::close(ino) };
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_symlink_never_leads_out_of_the_processs_root() {
        let d = tempdir("chroot");
        std::fs::write(d.join("inside.py"), "timeout = 1\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", d.join("abs.py")).unwrap();
        std::os::unix::fs::symlink("../../../../../etc/hostname", d.join("rel.py")).unwrap();
        std::os::unix::fs::symlink("/inside.py", d.join("ok.py")).unwrap();
        let child = super::super::chrooted::Chrooted::spawn(&d);
        let pid = child.pid;
        let inside = read_in_root(pid, "/inside.py", MAX_CONFIG).map(|f| f.bytes);
        let abs = read_in_root(pid, "/abs.py", MAX_CONFIG).map(|f| f.bytes);
        let rel = read_in_root(pid, "/rel.py", MAX_CONFIG).map(|f| f.bytes);
        let ok = read_in_root(pid, "/ok.py", MAX_CONFIG).map(|f| f.bytes);
        let dotdot = read_in_root(pid, "/../../etc/hostname", MAX_CONFIG).map(|f| f.bytes);
        drop(child);
        let _ = std::fs::remove_dir_all(&d);
        assert_eq!(inside.unwrap(), b"timeout = 1\n");
        assert_eq!(ok.unwrap(), b"timeout = 1\n", "a symlink inside the root");
        assert_eq!(
            abs.unwrap_err(),
            RootError::Missing,
            "an absolute symlink stays inside"
        );
        assert_eq!(
            rel.unwrap_err(),
            RootError::Missing,
            "../ stops at the root"
        );
        assert_eq!(dotdot.unwrap_err(), RootError::Missing);
    }
}
