//! `--py-stack`: the Python stack of a stalled process, from `py-spy dump`.
//! Only run for a stall being reported, with a deadline, never per event.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Finds py-spy: on PATH, or beside the traced program (a virtualenv's
/// bin/ holds both gunicorn and py-spy when py-spy was pip-installed there).
pub fn find(pid: u32) -> Option<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for arg in super::proc::cmdline(pid).iter().take(2) {
        if let Some(dir) = Path::new(arg).parent().filter(|d| d.is_absolute()) {
            dirs.push(dir.to_path_buf());
        }
    }
    dirs.into_iter()
        .map(|d| d.join("py-spy"))
        .find(|p| p.is_file())
}

/// `py-spy dump --pid PID`, killed after `deadline`.
pub fn dump(pid: u32, deadline: Duration) -> Result<String, String> {
    let bin = find(pid).ok_or_else(|| {
        "py-spy is not installed; install it where the tracer can find it (pip install py-spy) to get Python stacks".to_string()
    })?;
    let mut child = Command::new(&bin)
        .args(["dump", "--pid", &pid.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let end = Instant::now() + deadline;
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < end => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("py-spy dump did not finish within {deadline:?}"));
            }
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "py-spy dump failed: {}",
            err.lines().next().unwrap_or("").trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
