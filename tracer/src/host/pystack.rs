//! `--py-stack`: the Python stack of a stalled process, from `py-spy dump`.
//!
//! The tracer runs as root next to processes it does not trust, so the
//! program it runs must not be one a traced process can choose: py-spy is
//! taken only from `--py-spy PATH` or the tracer's own PATH, and only when
//! the file and every directory above it are owned by root and writable by
//! nobody else. It runs off the event loop, with `--nonblocking` (memory is
//! read without stopping the process: a ptrace attach would wake a thread
//! asleep in `read()`), its output drained while it runs, killed at a
//! deadline, and killed with the tracer (PR_SET_PDEATHSIG).
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

/// Output kept from py-spy; the rest is read and discarded so it never
/// blocks on a full pipe.
const MAX_OUTPUT: usize = 1 << 20;

/// Why a candidate py-spy is not run, or None when it may be.
///
/// `meta` is (owner uid, mode) of the file and of each directory above it,
/// file first, as the path resolves (symlinks followed).
pub fn refusal(path: &Path, file: (u32, u32), dirs: &[(PathBuf, u32, u32)]) -> Option<String> {
    let (uid, mode) = file;
    if mode & libc::S_IFMT != libc::S_IFREG {
        return Some(format!("{} is not a regular file", path.display()));
    }
    if uid != 0 {
        return Some(format!(
            "{} is owned by uid {uid}, not root: the tracer runs only a py-spy that only root can change",
            path.display()
        ));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "{} is writable by group or others (mode {:o}): the tracer runs only a py-spy that only root can change",
            path.display(),
            mode & 0o7777
        ));
    }
    // A sticky directory (/tmp) lets others add entries but not rename or
    // remove root's, and the entry below it is checked in turn.
    for (dir, uid, mode) in dirs {
        if *uid != 0 || (mode & 0o022 != 0 && mode & libc::S_ISVTX == 0) {
            return Some(format!(
                "{} is in {}, which someone other than root can change (owner uid {uid}, mode {:o})",
                path.display(),
                dir.display(),
                mode & 0o7777
            ));
        }
    }
    None
}

/// Resolves `path` and checks it is safe to run as root.
pub fn check(path: &Path) -> Result<PathBuf, String> {
    let real = std::fs::canonicalize(path)
        .map_err(|e| format!("cannot use py-spy at {}: {e}", path.display()))?;
    let meta = std::fs::metadata(&real)
        .map_err(|e| format!("cannot use py-spy at {}: {e}", real.display()))?;
    let mut dirs = Vec::new();
    for dir in real.ancestors().skip(1) {
        let m =
            std::fs::metadata(dir).map_err(|e| format!("cannot check {}: {e}", dir.display()))?;
        dirs.push((dir.to_path_buf(), m.uid(), m.mode()));
    }
    match refusal(&real, (meta.uid(), meta.mode()), &dirs) {
        Some(why) => Err(format!("refused to run py-spy: {why}")),
        None => Ok(real),
    }
}

/// The py-spy to run: `explicit` (`--py-spy`), else the first `py-spy` on
/// the tracer's own PATH. Never a directory a traced process names.
pub fn locate(explicit: Option<&Path>) -> Result<PathBuf, String> {
    if let Some(p) = explicit {
        return check(p);
    }
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .filter(|d| d.is_absolute())
        .map(|d| d.join("py-spy"))
        .find(|p| p.is_file());
    match found {
        Some(p) => check(&p),
        None => Err(
            "py-spy is not installed; put it on the tracer's PATH or give --py-spy PATH (pip install py-spy) to get Python stacks"
                .to_string(),
        ),
    }
}

/// Starts `py-spy dump --nonblocking --pid PID` in its own process group,
/// killed if the thread that started it (and so the tracer) dies.
fn spawn(bin: &Path, pid: u32) -> Result<Child, String> {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    let mut cmd = Command::new(bin);
    cmd.args(["dump", "--nonblocking", "--pid", &pid.to_string()])
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls (prctl, getppid) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // The tracer died before prctl took effect: do not run orphaned.
            if libc::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    cmd.spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))
}

/// Reads a pipe to its end on a thread, keeping the first `MAX_OUTPUT` bytes.
fn drain(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut kept = Vec::new();
        let mut buf = [0u8; 16384];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let room = MAX_OUTPUT.saturating_sub(kept.len());
                    kept.extend_from_slice(&buf[..n.min(room)]);
                }
            }
        }
        kept
    })
}

/// Runs py-spy on `pid` and waits for it, at most `deadline`. Blocks: call
/// it off the event loop (see [`dump_async`]).
pub fn dump(bin: &Path, pid: u32, deadline: Duration) -> Result<String, String> {
    let mut child = spawn(bin, pid)?;
    let out = drain(child.stdout.take().expect("piped"));
    let err = drain(child.stderr.take().expect("piped"));
    let end = Instant::now() + deadline;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    if status.is_none() {
        // SAFETY: kill(2) on the process group py-spy leads.
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let _ = child.wait();
    }
    let (out, err) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    match status {
        None => Err(format!("py-spy dump did not finish within {deadline:?}")),
        Some(s) if !s.success() => Err(format!(
            "py-spy dump failed: {}",
            String::from_utf8_lossy(&err)
                .lines()
                .next()
                .unwrap_or("")
                .trim()
        )),
        Some(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
    }
}

/// [`dump`] on a thread of its own; the answer arrives on the receiver by
/// the deadline. py-spy is re-checked first: the file may have changed.
pub fn dump_async(
    explicit: Option<PathBuf>,
    pid: u32,
    deadline: Duration,
) -> Receiver<Result<String, String>> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        let r = locate(explicit.as_deref()).and_then(|bin| dump(&bin, pid, deadline));
        let _ = tx.send(r);
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: u32 = libc::S_IFREG;
    const DIR: u32 = libc::S_IFDIR;

    fn root_dirs() -> Vec<(PathBuf, u32, u32)> {
        vec![
            ("/usr/bin".into(), 0, DIR | 0o755),
            ("/usr".into(), 0, DIR | 0o755),
        ]
    }

    #[test]
    fn only_a_root_owned_file_in_root_owned_directories_is_run() {
        let p = Path::new("/usr/bin/py-spy");
        assert_eq!(refusal(p, (0, REG | 0o755), &root_dirs()), None);
        let e = refusal(p, (1000, REG | 0o755), &root_dirs()).unwrap();
        assert!(e.contains("owned by uid 1000"), "{e}");
        let e = refusal(p, (0, REG | 0o775), &root_dirs()).unwrap();
        assert!(e.contains("writable by group or others"), "{e}");
        let e = refusal(p, (0, REG | 0o757), &root_dirs()).unwrap();
        assert!(e.contains("mode 757"), "{e}");
        let e = refusal(p, (0, DIR | 0o755), &root_dirs()).unwrap();
        assert!(e.contains("not a regular file"), "{e}");
        let mut dirs = root_dirs();
        dirs[0] = ("/tmp/x".into(), 1000, DIR | 0o755);
        let e = refusal(Path::new("/tmp/x/py-spy"), (0, REG | 0o755), &dirs).unwrap();
        assert!(e.contains("in /tmp/x"), "{e}");
        dirs[0] = ("/tmp".into(), 0, DIR | 0o777);
        assert!(refusal(Path::new("/tmp/py-spy"), (0, REG | 0o755), &dirs).is_some());
        dirs[0] = ("/tmp".into(), 0, DIR | 0o1777);
        assert_eq!(
            refusal(Path::new("/tmp/py-spy"), (0, REG | 0o755), &dirs),
            None,
            "root's entry in a sticky directory cannot be replaced by others"
        );
    }

    #[test]
    fn a_missing_explicit_py_spy_is_named() {
        let e = locate(Some(Path::new("/nonexistent/py-spy"))).unwrap_err();
        assert!(e.contains("/nonexistent/py-spy"), "{e}");
    }
}
