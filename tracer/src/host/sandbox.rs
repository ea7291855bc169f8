//! The stack helper's sandbox, beyond its uid, capabilities and limits
//! (see pystack_helper):
//!
//! - A process filter (seccomp): no new process, no exec, no ptrace, no
//!   write into another process's memory, and no open by file handle
//!   (with CAP_DAC_READ_SEARCH it reads any file of the host, by no
//!   path). Threads stay allowed: the
//!   opener below is one. RLIMIT_NPROC could not tell them apart, and it
//!   counts every process of the helper's uid (nobody) on the host.
//! - An opener: py-spy opens the interpreter's library by the path the
//!   target's memory map names, under /proc/PID/root, where the target
//!   may swap in a symlink, a FIFO or a device after any check. So every
//!   open of the helper's reading thread is trapped (seccomp's user
//!   notification) and made instead by the opener thread, which checks
//!   and opens with one descriptor (no symbolic link beneath the target's
//!   root, a regular file, read-only) and hands it over. Nothing swapped
//!   in after the check is ever opened, and no driver's open runs.
//!
//! The opener needs Linux 5.9+; without it set-ups run with the path
//! checked first (a swap right after the check is not caught), and the
//! helper says so on stderr.
use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::rootfs::{self, Resolve};

/// How a reader's set-up opens the target's files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Setup {
    /// Every open goes through the opener.
    Trapped,
    /// The library path is checked, then opened by py-spy.
    Checked,
}

/// Installs the process filter on the calling thread and every thread it
/// starts after (the helper is one thread when it calls this). Needs
/// no-new-privileges set first. False if this architecture has no filter
/// here or the kernel refused it.
pub fn forbid_processes() -> bool {
    let Some(program) = filter() else {
        return false;
    };
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: prctl with a valid, live filter program.
    unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const libc::sock_fprog,
        ) == 0
    }
}

#[cfg(target_arch = "x86_64")]
mod arch {
    pub const AUDIT_ARCH: u32 = 0xC000_003E;
    /// x32 system calls have this bit set; none is allowed.
    pub const X32: Option<u32> = Some(0x4000_0000);
    pub const DENIED: &[libc::c_long] = &[
        libc::SYS_fork,
        libc::SYS_vfork,
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_writev,
        libc::SYS_open_by_handle_at,
    ];
}

#[cfg(target_arch = "aarch64")]
mod arch {
    pub const AUDIT_ARCH: u32 = 0xC000_00B7;
    pub const X32: Option<u32> = None;
    pub const DENIED: &[libc::c_long] = &[
        libc::SYS_execve,
        libc::SYS_execveat,
        libc::SYS_ptrace,
        libc::SYS_process_vm_writev,
        libc::SYS_open_by_handle_at,
    ];
}

/// Classic BPF for seccomp, the few instructions these filters use.
#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
mod cbpf {
    use libc::{
        BPF_ABS, BPF_JEQ, BPF_JMP, BPF_K, BPF_LD, BPF_RET, BPF_W, SECCOMP_RET_ERRNO,
        SECCOMP_RET_KILL_PROCESS, sock_filter,
    };

    // struct seccomp_data: nr at 0, arch at 4, args[0] at 16 (its low
    // word on these little-endian machines).
    pub const NR: u32 = 0;
    const ARCH: u32 = 4;
    pub const ARG0: u32 = 16;

    pub fn op(code: u32, k: u32, jt: u8, jf: u8) -> sock_filter {
        sock_filter {
            code: code as u16,
            jt,
            jf,
            k,
        }
    }

    /// Loads the word at `offset` of struct seccomp_data.
    pub fn load(offset: u32) -> sock_filter {
        op(BPF_LD | BPF_W | BPF_ABS, offset, 0, 0)
    }

    pub fn ret(action: u32) -> sock_filter {
        op(BPF_RET | BPF_K, action, 0, 0)
    }

    pub fn errno(e: i32) -> sock_filter {
        ret(SECCOMP_RET_ERRNO | e as u32)
    }

    /// `call` (the number loaded) returns `action`; anything else goes on.
    pub fn when(call: libc::c_long, action: sock_filter) -> [sock_filter; 2] {
        [op(BPF_JMP | BPF_JEQ | BPF_K, call as u32, 0, 1), action]
    }

    /// Another architecture's calls kill the process; then the system call
    /// number is loaded.
    pub fn prologue() -> Vec<sock_filter> {
        vec![
            load(ARCH),
            op(BPF_JMP | BPF_JEQ | BPF_K, super::arch::AUDIT_ARCH, 1, 0),
            ret(SECCOMP_RET_KILL_PROCESS),
            load(NR),
        ]
    }
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn filter() -> Option<Vec<libc::sock_filter>> {
    use cbpf::{errno, load, op, prologue, ret, when};
    use libc::{BPF_JEQ, BPF_JGE, BPF_JMP, BPF_JSET, BPF_K, SECCOMP_RET_ALLOW};
    let mut p = prologue();
    if let Some(x32) = arch::X32 {
        p.extend([op(BPF_JMP | BPF_JGE | BPF_K, x32, 0, 1), errno(libc::EPERM)]);
    }
    // clone3 passes its flags in memory, out of the filter's sight: it is
    // "not there", and the C library falls back to clone.
    p.extend(when(libc::SYS_clone3, errno(libc::ENOSYS)));
    for &call in arch::DENIED {
        p.extend(when(call, errno(libc::EPERM)));
    }
    // clone makes a thread (allowed) only with CLONE_THREAD.
    p.extend([
        op(BPF_JMP | BPF_JEQ | BPF_K, libc::SYS_clone as u32, 0, 3),
        load(cbpf::ARG0),
        op(BPF_JMP | BPF_JSET | BPF_K, libc::CLONE_THREAD as u32, 1, 0),
        errno(libc::EPERM),
        ret(SECCOMP_RET_ALLOW),
    ]);
    Some(p)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn filter() -> Option<Vec<libc::sock_filter>> {
    None
}

/// System calls that open a file by path: each is answered by the opener.
#[cfg(target_arch = "x86_64")]
const TRAPPED: &[libc::c_long] = &[libc::SYS_open, libc::SYS_openat];
#[cfg(target_arch = "aarch64")]
const TRAPPED: &[libc::c_long] = &[libc::SYS_openat];
/// Opens the opener does not answer: openat2 (its resolution flags are
/// in memory: "not there", so callers fall back to openat). Opens by file
/// handle are refused by the process filter.
const REFUSED: &[(libc::c_long, i32)] = &[(libc::SYS_openat2, libc::ENOSYS)];
/// Longest path the opener reads from a trapped call.
const MAX_PATH: usize = 4096;

/// The kernel this runs on is at least `major.minor` (uname's release:
/// the kernel's own word, not a traced process's).
fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: uname into a zeroed struct.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    // SAFETY: the kernel NUL-terminates the release.
    let release = unsafe { std::ffi::CStr::from_ptr(u.release.as_ptr()) }.to_string_lossy();
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let (ma, mi) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (ma, mi) >= (major, minor)
}

/// From now on, every open by path of the calling thread (and of threads
/// it starts) is made instead by an opener thread started here, which
/// opens only what `open_for` allows, on the terms it sets, and hands the
/// caller the descriptor (seccomp's user notification, its descriptor
/// handed over with ADDFD: Linux 5.9+). Threads started before are not
/// affected. `opener_caps` runs first on the opener's thread (to raise
/// what only it may use), `stopped` if the opener stops (all trapped
/// threads gone, or the listener broken).
pub fn trap_opens(opener_caps: fn(), stopped: fn()) -> Result<(), String> {
    if !kernel_at_least(5, 9) {
        return Err("needs Linux 5.9 or later".into());
    }
    let Some(program) = trap_filter() else {
        return Err("has no filter for this architecture".into());
    };
    let (tx, rx) = std::sync::mpsc::channel::<OwnedFd>();
    std::thread::Builder::new()
        .name("pystack-opener".into())
        .spawn(move || {
            let Ok(listener) = rx.recv() else {
                return;
            };
            opener_caps();
            serve(&listener);
            stopped();
        })
        .map_err(|e| format!("cannot start its opener thread: {e}"))?;
    let prog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp with a valid, live filter program.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_NEW_LISTENER,
            &prog as *const libc::sock_fprog,
        )
    };
    if fd < 0 {
        return Err(format!(
            "cannot trap its opens: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a new, valid descriptor.
    let _ = tx.send(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    Ok(())
}

#[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
fn trap_filter() -> Option<Vec<libc::sock_filter>> {
    use cbpf::{errno, prologue, ret, when};
    let mut p = prologue();
    for &call in TRAPPED {
        p.extend(when(call, ret(libc::SECCOMP_RET_USER_NOTIF)));
    }
    for &(call, e) in REFUSED {
        p.extend(when(call, errno(e)));
    }
    p.push(ret(libc::SECCOMP_RET_ALLOW));
    Some(p)
}

#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
fn trap_filter() -> Option<Vec<libc::sock_filter>> {
    None
}

/// The opener's loop: each trapped open is answered with a descriptor
/// `open_for` made, or its error. Returns when the listener fails.
fn serve(listener: &OwnedFd) {
    loop {
        // SAFETY: RECV fills a zeroed notification (the kernel wants it
        // zeroed).
        let mut req: libc::seccomp_notif = unsafe { std::mem::zeroed() };
        if unsafe {
            libc::ioctl(
                listener.as_raw_fd(),
                libc::SECCOMP_IOCTL_NOTIF_RECV,
                &mut req,
            )
        } != 0
        {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            return;
        }
        let a = req.data.args;
        let (dirfd, path, flags) = if is_plain_open(req.data.nr) {
            (libc::AT_FDCWD, a[0], a[1] as i32)
        } else {
            (a[0] as i32, a[1], a[2] as i32)
        };
        // The caller is this process's own thread, stopped in the call:
        // its path is in this address space and cannot change meanwhile.
        let path = read_path(path as usize);
        let opened = match path {
            Some(p) if p.starts_with('/') || dirfd == libc::AT_FDCWD => open_for(&p, flags),
            _ => Err(libc::EACCES),
        };
        let mut resp = libc::seccomp_notif_resp {
            id: req.id,
            val: 0,
            error: 0,
            flags: 0,
        };
        match opened {
            Ok(fd) => {
                let add = libc::seccomp_notif_addfd {
                    id: req.id,
                    flags: 0,
                    srcfd: fd.as_raw_fd() as u32,
                    newfd: 0,
                    newfd_flags: (flags & libc::O_CLOEXEC) as u32,
                };
                // SAFETY: ADDFD with a valid request; the caller gets a
                // copy of `fd` (closed here when dropped).
                let n = unsafe {
                    libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_ADDFD, &add)
                };
                if n < 0 {
                    resp.error = -std::io::Error::last_os_error()
                        .raw_os_error()
                        .unwrap_or(libc::EIO);
                } else {
                    resp.val = i64::from(n);
                }
            }
            Err(errno) => resp.error = -errno,
        }
        // SAFETY: SEND with the answer to a received id. A caller gone
        // meanwhile makes it fail, which is fine.
        unsafe { libc::ioctl(listener.as_raw_fd(), libc::SECCOMP_IOCTL_NOTIF_SEND, &resp) };
    }
}

/// open(path, flags) has no directory argument; openat(dirfd, path,
/// flags) has.
#[cfg(target_arch = "x86_64")]
fn is_plain_open(nr: i32) -> bool {
    i64::from(nr) == libc::SYS_open
}

#[cfg(not(target_arch = "x86_64"))]
fn is_plain_open(_: i32) -> bool {
    false
}

/// A NUL-terminated path at `addr` in this process, at most MAX_PATH.
fn read_path(addr: usize) -> Option<String> {
    if addr == 0 {
        return None;
    }
    let mut bytes = Vec::new();
    for i in 0..MAX_PATH {
        // SAFETY: the address is a path argument this process's own code
        // passed to open, readable up to its NUL.
        let b = unsafe { *((addr + i) as *const u8) };
        if b == 0 {
            return String::from_utf8(bytes).ok();
        }
        bytes.push(b);
    }
    None
}

/// Files of /proc/PID (and /proc/PID/task/TID) the stack reader opens.
const PROC_FILES: &[&str] = &["maps", "exe", "stat", "status", "cmdline", "comm"];

/// What the opener opens for the stack reader, read-only and never a
/// FIFO or a device: files of /proc/PID, its task directory, and a
/// regular file of an ordinary filesystem beneath the process's root
/// (/proc/PID/root/...), reached with no symbolic link (host::rootfs). The check and the open are one descriptor, so
/// nothing swapped in after the check is opened. Anything else: EACCES.
pub fn open_for(path: &str, flags: i32) -> Result<OwnedFd, i32> {
    let writes = libc::O_WRONLY | libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND;
    if flags & writes != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
        return Err(libc::EACCES);
    }
    let rest = path.strip_prefix("/proc/").ok_or(libc::EACCES)?;
    let (who, rest) = rest.split_once('/').ok_or(libc::EACCES)?;
    if who != "self" && (who.is_empty() || !who.bytes().all(|b| b.is_ascii_digit())) {
        return Err(libc::EACCES);
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let found = match parts.as_slice() {
        // A library: a regular file of an ordinary filesystem, reached
        // with no symbolic link (the name a memory map gives is the
        // mapped file's own path; a link there was put there after).
        ["root", inner @ ..] if !inner.is_empty() => {
            let opath = rootfs::resolve_in_root(who, &inner.join("/"), Resolve::NoSymlinks)
                .map_err(|e| e.raw_os_error().unwrap_or(libc::EACCES))?;
            return rootfs::reopen_regular(&opath)
                .map(|(file, _)| file.into())
                .map_err(|_| libc::EACCES);
        }
        [leaf] if PROC_FILES.contains(leaf) => o_path(path),
        ["task"] => o_path(path),
        ["task", tid, leaf]
            if tid.bytes().all(|b| b.is_ascii_digit()) && PROC_FILES.contains(leaf) =>
        {
            o_path(path)
        }
        _ => Err(libc::EACCES),
    }?;
    // SAFETY: fstat into a zeroed stat.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(found.as_raw_fd(), &mut st) } != 0 {
        return Err(libc::EACCES);
    }
    let kind = st.st_mode & libc::S_IFMT;
    if kind != libc::S_IFREG && kind != libc::S_IFDIR {
        return Err(libc::EACCES);
    }
    // The O_PATH descriptor reopened for reading: the very file checked.
    let again = libc::O_RDONLY | libc::O_CLOEXEC | (flags & libc::O_DIRECTORY);
    let via =
        CString::new(format!("/proc/self/fd/{}", found.as_raw_fd())).map_err(|_| libc::EACCES)?;
    // SAFETY: open with a valid C string.
    let fd = unsafe { libc::open(via.as_ptr(), again) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a new, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `path` opened with O_PATH (which runs no driver and reads nothing).
fn o_path(path: &str) -> Result<OwnedFd, i32> {
    let c = CString::new(path).map_err(|_| libc::EACCES)?;
    // SAFETY: open with a valid C string.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_PATH | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: a new, valid descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    struct Dir(PathBuf);

    impl Dir {
        fn new(tag: &str) -> Dir {
            let d = std::env::temp_dir().join(format!("sandbox-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn fifo(p: &Path) {
        let c = CString::new(p.to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    }

    /// This process's own path to `p` through /proc/self/root.
    fn via_root(p: &Path) -> String {
        format!("/proc/self/root{}", p.display())
    }

    fn read(fd: OwnedFd) -> Vec<u8> {
        use std::io::Read;
        let mut v = Vec::new();
        std::fs::File::from(fd).read_to_end(&mut v).unwrap();
        v
    }

    /// Real files: what the opener opens, and what it refuses without
    /// blocking (a FIFO) or following (a symlink to a host file).
    #[test]
    fn the_opener_opens_proc_files_and_regular_files_beneath_a_root_only() {
        let d = Dir::new("open");
        let lib = d.0.join("libpython3.11.so");
        std::fs::write(&lib, b"\x7fELF").unwrap();
        assert_eq!(
            read(open_for(&via_root(&lib), libc::O_RDONLY).unwrap()),
            b"\x7fELF"
        );
        let me = std::process::id();
        for ok in ["maps", "status", "task", "exe"] {
            let flags = if ok == "task" { libc::O_DIRECTORY } else { 0 };
            assert!(open_for(&format!("/proc/{me}/{ok}"), flags).is_ok(), "{ok}");
        }
        let f = d.0.join("fifo");
        fifo(&f);
        assert_eq!(
            open_for(&via_root(&f), libc::O_RDONLY).unwrap_err(),
            libc::EACCES
        );
        let link = d.0.join("libpython3.12.so");
        std::os::unix::fs::symlink("/etc/passwd", &link).unwrap();
        assert_eq!(open_for(&via_root(&link), 0).unwrap_err(), libc::ELOOP);
        let sub = d.0.join("sub");
        std::os::unix::fs::symlink("/etc", &sub).unwrap();
        let through = via_root(&sub.join("passwd"));
        assert_eq!(open_for(&through, 0).unwrap_err(), libc::ELOOP);
        for refused in [
            "/etc/passwd".to_string(),
            format!("/proc/{me}/cwd/etc/passwd"),
            format!("/proc/{me}/fd/0"),
            format!("/proc/{me}/root"),
            format!("/proc/{me}/root/../etc/passwd"),
            "/proc/1/root/../../etc/passwd".to_string(),
            "/proc/sys/kernel/hostname".to_string(),
            // A kernel filesystem's file beneath the root (host::rootfs).
            format!("/proc/{me}/root/proc/{me}/status"),
        ] {
            assert!(open_for(&refused, 0).is_err(), "{refused}");
        }
        assert_eq!(
            open_for(&via_root(&lib), libc::O_RDWR).unwrap_err(),
            libc::EACCES,
            "read-only"
        );
        assert_eq!(
            open_for(&via_root(&d.0.join("new")), libc::O_CREAT).unwrap_err(),
            libc::EACCES
        );
    }

    /// The real kernel: a thread whose opens are trapped gets what the
    /// opener allows through std's ordinary File::open, and the refusals
    /// (a FIFO returns at once); a thread started before is not trapped.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn a_trapped_thread_opens_only_through_the_opener() {
        let d = Dir::new("trap");
        let lib = d.0.join("libpython3.11.so");
        std::fs::write(&lib, b"\x7fELF").unwrap();
        let f = d.0.join("fifo");
        fifo(&f);
        let secret = d.0.join("secret");
        std::fs::write(&secret, b"host").unwrap();
        let (lib2, f2, secret2) = (lib.clone(), f.clone(), secret.clone());
        let r = std::thread::spawn(move || {
            // SAFETY: prctl on this thread alone.
            assert_eq!(
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
                0
            );
            trap_opens(|| (), || ()).unwrap();
            let err = |p: &str| std::fs::File::open(p).err().and_then(|e| e.raw_os_error());
            (
                std::fs::read(via_root(&lib2)).map_err(|e| e.to_string()),
                std::fs::read_to_string("/proc/self/status").is_ok(),
                err(&via_root(&f2)),
                err(secret2.to_str().unwrap()),
                std::thread::spawn(move || std::fs::read(secret2).is_err())
                    .join()
                    .unwrap(),
            )
        })
        .join()
        .unwrap();
        assert_eq!(r.0, Ok(b"\x7fELF".to_vec()));
        assert!(r.1, "/proc is readable");
        assert_eq!(r.2, Some(libc::EACCES), "the FIFO");
        assert_eq!(r.3, Some(libc::EACCES), "a file outside /proc");
        assert!(r.4, "threads it starts are trapped too");
        assert_eq!(std::fs::read(&secret).unwrap(), b"host", "others are not");
    }

    /// The real kernel: under the filter, fork and exec fail with EPERM,
    /// a process's memory cannot be written, and a thread still starts.
    #[test]
    #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
    fn the_filter_stops_new_processes_and_memory_writes_but_not_threads() {
        let r = std::thread::spawn(|| {
            // SAFETY: prctl on this thread alone.
            assert_eq!(
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
                0
            );
            assert!(forbid_processes());
            let errno = || std::io::Error::last_os_error().raw_os_error();
            // SAFETY: a fork that should fail; a child, if any, exits at once.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                unsafe { libc::_exit(0) };
            }
            let fork = (pid, errno());
            let spawn = std::process::Command::new("/bin/true").status().is_err();
            let mut byte = 0u8;
            let local = libc::iovec {
                iov_base: (&mut byte as *mut u8).cast(),
                iov_len: 1,
            };
            let remote = local;
            // SAFETY: a write into this very process, which should be refused.
            let write =
                unsafe { libc::process_vm_writev(libc::getpid(), &local, 1, &remote, 1, 0) };
            let write = (write, errno());
            // SAFETY: a handle-based open that should be refused before
            // its arguments are looked at.
            let by_handle = unsafe {
                libc::syscall(libc::SYS_open_by_handle_at, -1, std::ptr::null::<u8>(), 0)
            };
            let by_handle = (by_handle, errno());
            let thread = std::thread::spawn(|| 7).join().unwrap();
            (fork, spawn, write, thread, by_handle)
        })
        .join()
        .unwrap();
        assert_eq!(r.0, (-1, Some(libc::EPERM)));
        assert!(r.1, "a program was started");
        assert_eq!(r.2, (-1, Some(libc::EPERM)));
        assert_eq!(r.3, 7);
        assert_eq!(r.4, (-1, Some(libc::EPERM)));
    }
}
