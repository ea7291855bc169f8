//! A tracer that always ends. The run stops with its summary on the first
//! SIGINT or SIGTERM (tokio's handlers, in `Stop`), and on `--duration`.
//! Whatever then holds it up (a load or attach still under way, a blocking
//! /proc read of a process stuck in the kernel, teardown) cannot keep it
//! alive: from the first signal, or from the end of the run, it has
//! `GRACE` to finish, then it exits anyway; a second signal exits at once.
//! A signal in start-up (before the start event) gets `START_UP_GRACE`:
//! nothing has been traced, so no summary is worth waiting for, and a load
//! the kernel's verifier makes slow (seconds under emulation) plus the
//! teardown after the forced exit must still fit in 2 s.
//! tokio's handlers stay installed to the end, so without this a signal
//! after the summary would be swallowed and the process could not be
//! stopped at all.
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};

/// From the first signal (or the end of the run) to the forced exit: well
/// inside the 2 s a supervisor (or `timeout`) may give.
pub const GRACE: Duration = Duration::from_millis(1500);
/// From a signal (or an error) before the start event to the forced exit.
pub const START_UP_GRACE: Duration = Duration::from_millis(500);

static SIGNALS: AtomicU32 = AtomicU32::new(0);
/// The write end of the pipe the watchdog thread waits on.
static ARM_FD: OnceLock<OwnedFd> = OnceLock::new();
static SUMMARY_WRITTEN: AtomicBool = AtomicBool::new(false);
static RUNNING: AtomicBool = AtomicBool::new(false);

/// Async-signal-safe: writes one byte to the watchdog's pipe.
fn arm_raw() {
    if let Some(fd) = ARM_FD.get() {
        let b = 1u8;
        // SAFETY: write(2) of one byte from a valid buffer; the fd lives
        // for the whole process (a static).
        unsafe { libc::write(fd.as_raw_fd(), (&b as *const u8).cast(), 1) };
    }
}

/// Installs the watchdog and the signal actions. Call once, first thing,
/// before the runtime installs its own handlers (both run).
pub fn install() -> Result<()> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error()).context("creating the watchdog's pipe");
    }
    // SAFETY: both fds were just created and are owned here only.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    let _ = ARM_FD.set(write);
    std::thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || watchdog(read))
        .context("starting the watchdog thread")?;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the action only uses atomics, write(2) and _exit(2),
        // which are async-signal-safe.
        unsafe {
            signal_hook_registry::register(sig, move || {
                if SIGNALS.fetch_add(1, Ordering::SeqCst) >= 1 {
                    // The second signal: the user means it.
                    libc::_exit(128 + sig);
                }
                arm_raw();
            })
        }
        .context("installing the signal watchdog")?;
    }
    Ok(())
}

/// The run is over (its end, a signal, or an error): from now on the
/// process has `GRACE` to exit.
pub fn arm() {
    arm_raw();
}

/// The start event was written: from now on a stop waits `GRACE` for the
/// summary.
pub fn running() {
    RUNNING.store(true, Ordering::SeqCst);
}

/// The summary was written: a forced exit after it loses nothing.
pub fn summary_written() {
    SUMMARY_WRITTEN.store(true, Ordering::SeqCst);
}

fn watchdog(read: OwnedFd) {
    let mut b = 0u8;
    loop {
        // SAFETY: read(2) into a one-byte buffer.
        let n = unsafe { libc::read(read.as_raw_fd(), (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            break;
        }
        if n == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
    if RUNNING.load(Ordering::SeqCst) {
        std::thread::sleep(GRACE);
    } else {
        std::thread::sleep(START_UP_GRACE);
        if RUNNING.load(Ordering::SeqCst) {
            // The run began meanwhile: its summary gets the whole grace.
            std::thread::sleep(GRACE - START_UP_GRACE);
        }
    }
    let running = RUNNING.load(Ordering::SeqCst);
    let done = SUMMARY_WRITTEN.load(Ordering::SeqCst);
    let msg: &[u8] = if done {
        b"tracer: warning: still running 1.5 s after the summary; exiting\n"
    } else if running {
        b"tracer: error: still running 1.5 s after the signal or the end of the run (a load, an attach or a read that would not finish); exiting without the summary\n"
    } else {
        b"tracer: error: stopped in start-up, before anything was traced (the load or attach was still under way 0.5 s later); exiting without the summary\n"
    };
    // SAFETY: write(2) of a static buffer, then _exit(2): nothing of the
    // stuck process is touched.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::_exit(if done { 0 } else { 1 });
    }
}
