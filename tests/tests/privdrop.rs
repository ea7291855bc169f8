//! Issue 20 item 13: started as root, the tracer loads and attaches its
//! BPF programs, binds its listeners and opens its output file, then runs
//! as uid/gid 65534 with only the capabilities it still needs, on every
//! thread, so code execution in it is not node root. It still names a
//! stall with its pipe peers, heartbeat age and Python stack, and its
//! stack helper is restarted after the drop. `--keep-root` keeps uid 0.
//! Real Gunicorn, the real tracer, real BPF, as root.
use std::process::Command;
use std::time::Duration;

use tests::*;

/// CAP_DAC_READ_SEARCH (2) and CAP_SYS_PTRACE (19): reading other users'
/// /proc/PID/fd, fdinfo, environ and root, and restarting the stack
/// helper with CAP_SYS_PTRACE.
const PROC_READING: u64 = (1 << 2) | (1 << 19);
/// CAP_BPF (39): map reads, on kernels whose bpf() refuses every command
/// to a process without it while kernel.unprivileged_bpf_disabled is set.
const CAP_BPF: u64 = 1 << 39;

fn status_field(pid: u32, name: &str) -> String {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {s}"))
        .trim()
        .to_string()
}

/// A thread's status; None when the thread has ended (the tracer's /proc
/// pool threads come and go between a listing and a read).
fn task_status(pid: u32, tid: &str) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()
}

fn field(status: &str, name: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in {status}"))
        .trim()
        .to_string()
}

fn hex(s: &str) -> u64 {
    u64::from_str_radix(s, 16).unwrap()
}

/// The BPF bpf() check of this kernel: whether a map command on a bad fd
/// is refused for want of a capability (EPERM) rather than for the fd.
/// Probed here as a process without CAP_BPF and CAP_SYS_ADMIN.
fn map_commands_need_cap_bpf() -> bool {
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "/usr/bin/python3",
            "-c",
            // bpf(BPF_MAP_LOOKUP_ELEM=1, attr{map_fd=-1}, 32): the errno.
            "import ctypes,os\nl=ctypes.CDLL(None,use_errno=True)\nb=(ctypes.c_char*32)()\nb[0:4]=b'\\xff\\xff\\xff\\xff'\nr=l.syscall(321,1,b,32)\nprint(ctypes.get_errno())",
        ])
        .output()
        .unwrap();
    let errno: i32 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    errno == libc::EPERM
}

/// Every thread of the tracer: uid and gid 65534 (real, effective, saved,
/// filesystem), no groups, exactly `caps` effective and permitted, none
/// inheritable or ambient, no new privileges.
fn assert_every_thread_is_nobody_with(pid: u32, caps: u64) {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(tasks.len() > 1, "the tracer has threads: {tasks:?}");
    for tid in &tasks {
        // A thread that ended since the listing has nothing to check.
        let Some(status) = task_status(pid, tid) else {
            continue;
        };
        let f = |n| field(&status, n);
        assert_eq!(f("Uid"), "65534\t65534\t65534\t65534", "thread {tid}");
        assert_eq!(f("Gid"), "65534\t65534\t65534\t65534", "thread {tid}");
        assert_eq!(f("Groups"), "", "thread {tid}");
        assert_eq!(hex(&f("CapEff")), caps, "thread {tid}: CapEff");
        assert_eq!(hex(&f("CapPrm")), caps, "thread {tid}: CapPrm");
        assert_eq!(hex(&f("CapInh")), 0, "thread {tid}: CapInh");
        assert_eq!(hex(&f("CapAmb")), 0, "thread {tid}: CapAmb");
        assert_eq!(f("NoNewPrivs"), "1", "thread {tid}");
    }
}

fn gevent_pipe_stalls(pids: &StallPids) -> GunicornProc {
    Gunicorn::new("stall_app:app")
        .worker_class("gevent")
        .timeout(60)
        .env("STALL_PID_FILE", pids.path())
        .spawn()
}

/// Started as root: once `start` is out, every thread runs as nobody with
/// only CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH (and CAP_BPF where this
/// kernel's bpf() needs it for map reads), and a gevent worker's stall on
/// a pipe is still named with its peers, heartbeat age and Python stack;
/// stderr says what the tracer runs as.
#[test]
fn started_as_root_the_tracer_runs_as_nobody_and_still_names_a_stall_fully() {
    require_root();
    let pids = StallPids::new("privdrop");
    let g = gevent_pipe_stalls(&pids);
    let mut t =
        Tracer::start_without_py_spy(&["--pid", &g.pid().to_string(), "--threshold", "300ms"]);
    let want = PROC_READING
        | if map_commands_need_cap_bpf() {
            CAP_BPF
        } else {
            0
        };
    assert_every_thread_is_nobody_with(t.pid(), want);
    let _client = get_async(g.port, "/pipe?secs=4", Duration::from_secs(30));
    let (w, _) = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert_eq!(stall["fd_kind"], "pipe", "{stall}");
    assert!(
        !stall["peers"].as_array().unwrap().is_empty(),
        "pipe peers are read: {stall}"
    );
    assert!(
        stall["heartbeat_age_ms"].as_u64().is_some(),
        "heartbeat age is read: {stall}"
    );
    assert!(has_frame(&stall, "pipe_read", "stall_app.py"), "{stall}");
    // Threads started after the drop (the /proc pool's) are nobody too.
    assert_every_thread_is_nobody_with(t.pid(), want);
    t.stop();
    assert!(
        t.stderr_lines
            .iter()
            .any(|l| l.contains("runs as uid 65534") && l.contains("--keep-root")),
        "{:?}",
        t.stderr_lines
    );
}

/// The stack helper killed after the drop is restarted by a tracer that
/// is no longer root: it still runs as nobody with CAP_SYS_PTRACE alone
/// effective, and a later stall still carries its stack.
#[test]
fn after_the_drop_a_killed_stack_helper_is_restarted_with_its_capability_and_reads_stacks() {
    require_root();
    let pids = StallPids::new("privdrop-helper");
    let g = gevent_pipe_stalls(&pids);
    let mut t = Tracer::start_without_py_spy(&["--pid", &g.pid().to_string()]);
    assert_eq!(status_field(t.pid(), "Uid"), "65534\t65534\t65534\t65534");
    let first = stack_helper_of(t.pid());
    assert_eq!(unsafe { libc::kill(first as i32, libc::SIGKILL) }, 0);
    let _client = get_async(g.port, "/pipe?secs=3", Duration::from_secs(30));
    let (w, _) = pids.wait_nth(0);
    let (_, stall) = t.wait_for("stall", Duration::from_secs(10), |e| {
        e["event"] == "stall" && e["pid"] == w
    });
    assert!(has_frame(&stall, "pipe_read", "stall_app.py"), "{stall}");
    let second = stack_helper_of(t.pid());
    assert_ne!(first, second);
    assert_eq!(status_field(second, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(status_field(second, "CapEff"), "0000000000080000");
    assert_eq!(hex(&status_field(second, "CapAmb")), 0);
    assert!(alive(t.pid()));
    t.stop();
}

/// `--keep-root`: the tracer stays uid 0 with root's capabilities, and
/// says so.
#[test]
fn with_keep_root_the_tracer_stays_root_and_says_so() {
    require_root();
    let mut t = Tracer::start(&["--keep-root"]);
    assert_eq!(status_field(t.pid(), "Uid"), "0\t0\t0\t0");
    assert_ne!(hex(&status_field(t.pid(), "CapEff")) & (1 << 21), 0);
    t.stop();
    assert!(
        t.stderr_lines
            .iter()
            .any(|l| l.contains("runs as uid 0") && l.contains("--keep-root")),
        "{:?}",
        t.stderr_lines
    );
}

/// A Gunicorn in a network namespace of its own, as in a container on the
/// host: after the drop the tracer cannot enter it (setns takes
/// CAP_SYS_ADMIN) to scan for hung requests. Its ports are counted as
/// unscanned and the run is never called healthy; with --keep-root they
/// are scanned.
#[test]
fn a_network_namespace_it_cannot_enter_is_counted_as_unscanned() {
    require_root();
    let g = gunicorn_in_a_netns_of_its_own(&["--net"]);
    let master = g.pid().to_string();
    let summary_with = |extra: &[&str]| {
        let mut args = vec!["--pid", master.as_str(), "--request-threshold", "1s"];
        args.extend_from_slice(extra);
        let mut t = Tracer::start(&args);
        t.collect_for(Duration::from_secs(3));
        t.stop()
    };
    let dropped = summary_with(&[]);
    assert!(
        dropped["ports_unscanned"].as_u64().unwrap() >= 1,
        "{dropped}"
    );
    let text = dropped["verdict"]["text"].as_str().unwrap();
    assert!(
        text.contains("listening port(s) were not scanned for hung requests"),
        "{text}"
    );
    assert!(!text.contains("healthy"), "{text}");
    let root = summary_with(&["--keep-root"]);
    assert_eq!(root["ports_unscanned"], 0, "{root}");
}

/// A one-worker Gunicorn started by `unshare ARGS` (a network namespace of
/// its own, with its loopback up), once its worker boots.
fn gunicorn_in_a_netns_of_its_own(unshare: &[&str]) -> Proc {
    let port = free_port();
    let gunicorn = venv().join("bin/gunicorn");
    let mut cmd = Command::new("unshare");
    cmd.args(unshare)
        .args(["--", "sh", "-c"])
        .arg(format!(
            "ip link set lo up && exec {} -w 1 -b 127.0.0.1:{port} stall_app:app",
            gunicorn.display()
        ))
        .current_dir(apps_dir())
        .env("PYTHONUNBUFFERED", "1");
    let mut g = Proc::spawn_captured(&mut cmd);
    g.wait_line("Booting worker", Duration::from_secs(30));
    g
}

/// A network namespace created with a user namespace of its own (rootless
/// containers, `unshare -Urn`) is the process's to configure: the tracer
/// never enters it, even as root, and counts its ports as unscanned
/// (issue 20 item 6).
#[test]
fn a_network_namespace_of_another_user_namespace_is_never_entered() {
    require_root();
    let g = gunicorn_in_a_netns_of_its_own(&["--user", "--map-root-user", "--net"]);
    let master = g.pid().to_string();
    let mut t = Tracer::start(&[
        "--pid",
        master.as_str(),
        "--request-threshold",
        "1s",
        "--keep-root",
    ]);
    t.collect_for(Duration::from_secs(3));
    let s = t.stop();
    assert!(s["ports_unscanned"].as_u64().unwrap() >= 1, "{s}");
    let text = s["verdict"]["text"].as_str().unwrap();
    assert!(!text.contains("healthy"), "{text}");
}

/// `--output` in a directory only root may write (as /var/log is): after
/// the drop to nobody a rotation cannot rename there, so it moves the
/// lines into the FILE.1 opened before the drop. Both files keep their
/// lines and the run keeps the file (it used to go on without it).
#[test]
fn output_rotation_works_after_the_drop_in_a_directory_only_root_writes() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    require_root();
    let dir = std::env::temp_dir().join(format!("tracer-privdrop-out-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join("tracer.jsonl");
    let blocked = Proc::python("import os\nr, w = os.pipe()\nos.read(r, 1)\n");
    let mut t = Tracer::start(&[
        "--pid",
        &blocked.pid().to_string(),
        "--threshold",
        "200ms",
        "--output",
        out.to_str().unwrap(),
        "--output-max-size",
        "2K",
    ]);
    assert_every_thread_is_nobody_with(t.pid(), {
        PROC_READING
            | if map_commands_need_cap_bpf() {
                CAP_BPF
            } else {
                0
            }
    });
    t.wait_for("stall", Duration::from_secs(10), |e| e["event"] == "stall");
    let s = t.stop();
    assert!(
        !t.stderr_lines.iter().any(|l| l.contains("--output")),
        "{:?}",
        t.stderr_lines
    );
    let now = std::fs::read_to_string(&out).unwrap();
    let old = std::fs::read_to_string(dir.join("tracer.jsonl.1")).unwrap();
    // FILE.1 exists from the start, empty: lines in it came by a rotation.
    assert!(!old.is_empty(), "no rotation into FILE.1");
    for l in old.lines().chain(now.lines()) {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
        assert!(v["event"].is_string(), "{l}");
    }
    assert!(now.len() <= 2048 || now.lines().count() == 1, "{now}");
    let last = now
        .lines()
        .last()
        .expect("the file goes on after a rotation");
    assert!(last.starts_with("{\"event\":\"summary\""), "{last}");
    assert_eq!(s["event"], "summary");
    for f in [&out, &dir.join("tracer.jsonl.1")] {
        assert_eq!(std::fs::metadata(f).unwrap().mode() & 0o777, 0o600);
    }
    let _ = std::fs::remove_dir_all(&dir);
}
