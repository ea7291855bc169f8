//! For tests: a child process whose root is a directory the test made, as
//! a container's process would be seen from the host.
use std::ffi::CString;
use std::path::Path;
use std::time::{Duration, Instant};

/// Killed and reaped when dropped.
pub struct Chrooted {
    pub pid: u32,
}

impl Chrooted {
    /// Forks a child that chroots into `dir` and waits; returns once its
    /// /proc/PID/root shows `dir`.
    pub fn spawn(dir: &Path) -> Chrooted {
        let root = CString::new(dir.to_str().expect("a UTF-8 path")).expect("no NUL");
        // SAFETY: the child calls only async-signal-safe functions (chroot,
        // pause, _exit) until it is killed.
        let child = unsafe { libc::fork() };
        if child == 0 {
            unsafe {
                if libc::chroot(root.as_ptr()) != 0 {
                    libc::_exit(1);
                }
                loop {
                    libc::pause();
                }
            }
        }
        assert!(child > 0, "fork failed");
        let t = Instant::now();
        while std::fs::read_link(format!("/proc/{child}/root")).map_or(true, |r| r != dir)
            && t.elapsed() < Duration::from_secs(2)
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        Chrooted { pid: child as u32 }
    }
}

impl Drop for Chrooted {
    fn drop(&mut self) {
        // SAFETY: our own child.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGKILL);
            libc::waitpid(self.pid as i32, std::ptr::null_mut(), 0);
        }
    }
}
