//! Issue 19 item 5: Python stacks are read by a helper process the tracer
//! starts and owns, with no privilege but CAP_SYS_PTRACE, so a target that
//! controls its memory map and its files cannot make the reader open a
//! FIFO (and hang) or a file outside its root, and a reader that dies is
//! replaced. Real Gunicorn, the real tracer, real BPF, as root.
use std::ffi::CString;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::*;

/// A scratch directory, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let d = std::env::temp_dir().join(format!("tracer-pystack-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
        Scratch(d)
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.0.join(rel)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Counts opens of the files it watches (inotify IN_OPEN): an open with
/// O_PATH (which runs no driver and reads nothing) is not one.
struct OpenWatch(i32);

impl OpenWatch {
    fn new(paths: &[&PathBuf]) -> OpenWatch {
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0);
        for p in paths {
            let c = CString::new(p.to_str().unwrap()).unwrap();
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) };
            assert!(wd >= 0, "watching {}", p.display());
        }
        OpenWatch(fd)
    }

    /// Open events so far.
    fn opens(&self) -> usize {
        let mut buf = [0u8; 4096];
        let mut n = 0;
        loop {
            let r = unsafe { libc::read(self.0, buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                return n;
            }
            // Each event is a 16-byte header plus its (here empty) name.
            let mut off = 0usize;
            while off + 16 <= r as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
                n += 1;
                off += 16 + len as usize;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        unsafe { libc::close(self.0) };
    }
}

/// A field of /proc/`task`/status (`task`: a pid, or "PID/task/TID").
fn status_field(task: impl std::fmt::Display, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{task}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {s}"))
        .trim()
        .to_string()
}

fn gevent_stalls(
    pids: &StallPids,
    workers: usize,
    conf: Option<(&str, &PathBuf, &PathBuf)>,
) -> GunicornProc {
    let mut g = Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .workers(workers)
        .timeout(60)
        .env("STALL_PID_FILE", pids.path());
    if let Some((file, dir, target)) = conf {
        g = g
            .config(file)
            .env("HOSTILE_LIB_DIR", dir)
            .env("HOSTILE_LIB_TARGET", target);
    }
    g.spawn()
}

fn stall_of(t: &mut Tracer, pid: u32) -> Value {
    t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == pid
    })
    .1
}

/// The map of every worker of two masters names a deleted
/// "libpython3.11.so" whose path holds a planted symlink: to a FIFO nobody
/// writes to (whose open would block for good), and to a host file. Their
/// stalls say why no stack was read, briefly; neither file is opened; and
/// a third master's stall, after them, still carries its stack.
#[test]
fn a_deleted_library_symlinked_to_a_fifo_or_a_host_file_is_not_opened_and_stacks_still_come() {
    require_root();
    let s = Scratch::new("hostile");
    let fifo = s.path("fifo");
    let c = CString::new(fifo.to_str().unwrap()).unwrap();
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o666) }, 0);
    let secret = s.path("host-secret");
    std::fs::write(&secret, "not the target's to hand out\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let watch = OpenWatch::new(&[&fifo, &secret]);

    let (fp, hp, np) = (
        StallPids::new("hostile-fifo"),
        StallPids::new("hostile-file"),
        StallPids::new("hostile-none"),
    );
    // Two workers on the FIFO: an in-process reader with two threads that
    // opens the path as each worker is found is left with none.
    let gf = gevent_stalls(&fp, 2, Some(("hostile_lib_conf.py", &s.path("f"), &fifo)));
    let gh = gevent_stalls(&hp, 1, Some(("hostile_lib_conf.py", &s.path("h"), &secret)));
    let gn = gevent_stalls(&np, 1, None);
    let (a, b, n) = (
        gf.pid().to_string(),
        gh.pid().to_string(),
        gn.pid().to_string(),
    );
    let mut t = Tracer::start_without_py_spy(&["--pid", &a, "--pid", &b, "--pid", &n]);
    // Each worker found (and its reader set up) before the stalls.
    t.wait_count("workers", 4, Duration::from_secs(10), |e| {
        e["event"] == "worker"
    });
    std::thread::sleep(Duration::from_secs(1));

    let _c1 = get_async(gf.port, "/pipe?secs=3", Duration::from_secs(30));
    let (wf, _) = fp.wait_nth(0);
    let _c2 = get_async(gh.port, "/pipe?secs=3", Duration::from_secs(30));
    let (wh, _) = hp.wait_nth(0);
    for w in [wf, wh] {
        let stall = stall_of(&mut t, w);
        assert_eq!(stall.get("py_stack"), None, "{stall}");
        let e = stall["py_stack_error"]
            .as_str()
            .unwrap_or_else(|| panic!("{stall}"));
        assert!(e.contains("deleted"), "{e}");
        assert!(e.len() <= 400, "bounded: {e}");
    }

    let _c3 = get_async(gn.port, "/pipe?secs=3", Duration::from_secs(30));
    let (wn, _) = np.wait_nth(0);
    let stall = stall_of(&mut t, wn);
    assert!(has_frame(&stall, "pipe_read", "stall_app.py"), "{stall}");
    assert_eq!(stall.get("py_stack_error"), None, "{stall}");

    assert_eq!(watch.opens(), 0, "the FIFO or the host file was opened");
    assert!(alive(t.pid()));
    t.stop();
}

/// The library's path holds the mapped file at every check, but a thread
/// of the target swaps a symlink to a host file in and out of it every
/// millisecond. py-spy opens the path again after the check: before the
/// helper's opener it followed the link (this test saw the host file
/// opened). Eight workers are set up and one stalls: the host file is
/// never opened, and the stall says why it has no stack.
#[test]
fn a_library_path_swapped_after_its_check_is_never_followed() {
    require_root();
    let s = Scratch::new("swap");
    let secret = s.path("host-secret");
    std::fs::write(&secret, "not the target's to hand out\n").unwrap();
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let watch = OpenWatch::new(&[&secret]);
    let pids = StallPids::new("hostile-swap");
    let g = Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .workers(8)
        .timeout(60)
        .env("STALL_PID_FILE", pids.path())
        .config("hostile_lib_conf.py")
        .env("HOSTILE_LIB_DIR", s.path("w"))
        .env("HOSTILE_LIB_TARGET", &secret)
        .env("HOSTILE_LIB_SWAP", "1")
        .spawn();
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    t.wait_count("workers", 8, Duration::from_secs(10), |e| {
        e["event"] == "worker"
    });
    std::thread::sleep(Duration::from_secs(2));
    let _c = get_async(g.port, "/pipe?secs=3", Duration::from_secs(30));
    let (w, _) = pids.wait_nth(0);
    let stall = stall_of(&mut t, w);
    assert_eq!(stall.get("py_stack"), None, "{stall}");
    let e = stall["py_stack_error"]
        .as_str()
        .unwrap_or_else(|| panic!("{stall}"));
    assert!(e.len() <= 400, "bounded: {e}");
    assert_eq!(watch.opens(), 0, "the host file was opened");
    assert!(alive(t.pid()));
    t.stop();
}

/// The helper runs as nobody, with no new privileges, an address-space
/// limit of 256 MiB and two system-call filters (no new process; every
/// open made by its opener). Its reading thread has CAP_SYS_PTRACE alone
/// (bit 19); its opener thread also CAP_DAC_READ_SEARCH (bit 2), to open
/// a Python installed where only root may look.
#[test]
fn the_stack_helper_runs_as_nobody_with_only_cap_sys_ptrace_effective() {
    require_root();
    let t = Tracer::start_without_py_spy(&[]);
    let h = stack_helper_of(t.pid());
    assert_eq!(status_field(h, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(h, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(h, "Groups"), "");
    for caps in ["CapEff", "CapPrm"] {
        assert_eq!(status_field(h, caps), "0000000000080000", "{caps}");
    }
    assert_eq!(status_field(h, "CapBnd"), "0000000000080004");
    assert_eq!(status_field(h, "CapInh"), "0000000000000000");
    assert_eq!(status_field(h, "CapAmb"), "0000000000000000");
    assert_eq!(status_field(h, "NoNewPrivs"), "1");
    assert_eq!(status_field(h, "Seccomp"), "2");
    assert_eq!(status_field(h, "Seccomp_filters"), "2");
    let threads: Vec<u32> = std::fs::read_dir(format!("/proc/{h}/task"))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
        .filter(|t| *t != h)
        .collect();
    assert_eq!(threads.len(), 1, "one opener thread: {threads:?}");
    let opener = format!("{h}/task/{}", threads[0]);
    assert_eq!(status_field(&opener, "CapEff"), "0000000000080004");
    assert_eq!(
        status_field(&opener, "Seccomp_filters"),
        "1",
        "the opener is not trapped"
    );
    let limits = std::fs::read_to_string(format!("/proc/{h}/limits")).unwrap();
    let limit = |name: &str| {
        let l = limits.lines().find(|l| l.starts_with(name)).unwrap();
        l[name.len()..]
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert_eq!(
        limit("Max address space"),
        "268435456 268435456",
        "{limits}"
    );
}

/// Killing the helper: a new one is started, and a stall after that
/// carries its stack.
#[test]
fn a_killed_stack_helper_is_restarted_and_later_stalls_still_get_stacks() {
    require_root();
    let pids = StallPids::new("helperkill");
    let g = gevent_stalls(&pids, 1, None);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    let first = stack_helper_of(t.pid());
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let _client = get_async(g.port, "/pipe?secs=3", Duration::from_secs(30));
    let (w, _) = pids.wait_nth(0);
    let stall = stall_of(&mut t, w);
    assert!(has_frame(&stall, "pipe_read", "stall_app.py"), "{stall}");
    let second = stack_helper_of(t.pid());
    assert_ne!(first, second);
    assert!(alive(t.pid()));
    t.stop();
}

/// The DaemonSet's capabilities (deploy/kubernetes/daemonset.yaml), as
/// setpriv names them: uid 0 without the rest of root's.
const DAEMONSET_CAPS: &str = "-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search,+setuid,+setgid";

/// The tracer as the DaemonSet runs it: uid 0 with only its capabilities.
fn tracer_with_caps(caps: &str) -> Tracer {
    let mut cmd = Command::new("setpriv");
    cmd.args([
        &format!("--inh-caps={caps}"),
        &format!("--ambient-caps={caps}"),
        &format!("--bounding-set={caps}"),
    ])
    .arg(tracer_bin())
    .args(["watch", "--format", "json"])
    .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    Tracer::start_command(cmd)
}

/// In the DaemonSet's pod the tracer is uid 0 with a few capabilities: its
/// SETUID and SETGID are there so the helper still becomes nobody. Without
/// them the helper stays uid 0 (with CAP_SYS_PTRACE alone) and says so.
#[test]
fn with_the_daemonsets_capabilities_the_helper_becomes_nobody() {
    require_root();
    let t = tracer_with_caps(DAEMONSET_CAPS);
    let h = stack_helper_of(t.pid());
    assert_eq!(status_field(h, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(h, "Gid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(h, "CapEff"), "0000000000080000");
    drop(t);
    let mut t = tracer_with_caps("-all,+bpf,+perfmon,+sys_ptrace,+dac_read_search");
    let h = stack_helper_of(t.pid());
    assert_eq!(status_field(h, "Uid"), "0\t0\t0\t0");
    assert_eq!(status_field(h, "CapEff"), "0000000000080000");
    t.collect_for(Duration::from_millis(300));
    t.stop();
    assert!(
        t.stderr_lines
            .iter()
            .any(|l| l.contains("Python stack helper")),
        "{:?}",
        t.stderr_lines
    );
}
