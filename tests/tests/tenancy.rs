//! One tenant cannot blind another (issue 20, item 8): the kernel maps and
//! the ring buffer every watched process shares are held to a quota per
//! master and a rate per process, enforced in the kernel where the entry
//! or the event is made, and every loss names the process charged most.
//! Real processes, real BPF, as root.
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tests::*;

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a process this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The summary's top offender of `counter`: (pid, count).
fn offender(s: &Value, counter: &str) -> Option<(u64, u64)> {
    let o = &s["top_offenders"][counter];
    Some((o["pid"].as_u64()?, o["count"].as_u64()?))
}

/// Before: a burst of forks filled the kernel's watch list before user
/// space could apply --max-watched-per-master, and a fork of any other
/// master then went unwatched (`watch_full`). Now the kernel refuses the
/// burst at the quota, at the fork.
#[test]
fn a_fork_burst_stops_at_its_masters_quota_in_the_kernel_and_leaves_room_for_others() {
    require_root();
    let n = 200;
    let flood = Proc::python(&forker(n));
    let other = Proc::python(&forker(2));
    // Room for 10: both masters, the flood's quota of 5 (itself and 4
    // children), and the other's two children. Without the kernel's quota
    // the burst takes the list's free slots faster than user space lets
    // them go, and the other master forks in the middle of it.
    let mut t = Tracer::start(&[
        "--pid",
        &flood.pid().to_string(),
        "--pid",
        &other.pid().to_string(),
        "--max-watched-per-master",
        "5",
        "--watch-capacity",
        "10",
    ]);
    signal(flood.pid(), libc::SIGUSR1);
    std::thread::sleep(Duration::from_millis(20));
    signal(other.pid(), libc::SIGUSR1);
    t.wait_count(
        "the other master's children",
        2,
        Duration::from_secs(5),
        |e| e["event"] == "worker" && e["master_pid"] == other.pid() && e["source"] == "fork",
    );
    // The burst is over in well under 2 s.
    t.collect_for(Duration::from_secs(2));
    let followed = t
        .of_kind("worker")
        .iter()
        .filter(|e| e["master_pid"] == flood.pid() && e["source"] == "fork")
        .count();
    assert_eq!(followed, 4, "the master and 4 children make the quota of 5");
    let s = t.stop();
    assert_eq!(s["watch_full"], 0, "no fork found the list full: {s}");
    assert_eq!(s["over_quota"], n as u64 - 4, "{s}");
    assert_eq!(
        offender(&s, "over_quota"),
        Some((flood.pid() as u64, n as u64 - 4)),
        "the forks refused are charged to the flooding process: {s}"
    );
    assert!(
        s["top_offenders"].get("watch_full").is_none(),
        "no offender for a counter that stayed at zero: {s}"
    );
}

/// Blocks SIGUSR1 and waits for it in a thread, which then starts `n`
/// threads that sleep, prints `flooded`, and sleeps too (its own entry is
/// not freed for another process's thread to take).
fn thread_flood(n: usize) -> String {
    format!(
        "import signal, threading, time
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
def flood():
    signal.sigwait([signal.SIGUSR1])
    for _ in range({n}):
        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()
    print('flooded', flush=True)
    time.sleep(60)
threading.Thread(target=flood, daemon=True).start()
print('ready', flush=True)
time.sleep(60)
"
    )
}

/// Waits for SIGUSR1, then reads a pipe only it can write, in a new
/// thread: one that needs an in-flight entry of its own.
const VICTIM: &str = "import os, signal, threading
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print('ready', flush=True)
signal.sigwait([signal.SIGUSR1])
r, w = os.pipe()
t = threading.Thread(target=os.read, args=(r, 1))
t.start()
print('blocking', flush=True)
t.join()
";

/// Before: one process's sleeping threads took every entry of the
/// kernel's in-flight map, and another process's stall was never seen.
/// Now a master's threads hold at most --max-threads-per-master entries.
#[test]
fn a_thread_flood_is_held_to_its_masters_quota_and_another_processs_stall_is_still_seen() {
    require_root();
    let n = 60;
    let mut flood = Proc::python_captured(&thread_flood(n));
    let mut victim = Proc::python_captured(VICTIM);
    flood.wait_count("ready", 1, Duration::from_secs(10));
    victim.wait_count("ready", 1, Duration::from_secs(10));
    let mut t = Tracer::start(&[
        "--pid",
        &flood.pid().to_string(),
        "--pid",
        &victim.pid().to_string(),
        "--threshold",
        "200ms",
        "--inflight-capacity",
        "48",
        "--max-threads-per-master",
        "16",
    ]);
    signal(flood.pid(), libc::SIGUSR1);
    flood.wait_count("flooded", 1, Duration::from_secs(10));
    t.collect_for(Duration::from_secs(1));
    signal(victim.pid(), libc::SIGUSR1);
    victim.wait_count("blocking", 1, Duration::from_secs(10));
    let (_, stall) = t.wait_for("the victim's stall", Duration::from_secs(5), |e| {
        e["event"] == "stall" && e["pid"] == victim.pid()
    });
    assert_eq!(stall["syscall"], "read", "{stall}");
    let s = t.stop();
    // The flood's threads past its 16 were refused, each at least once.
    let refused = s["threads_over_quota"].as_u64().unwrap();
    assert!(refused >= (n - 16) as u64, "{refused} refused: {s}");
    assert_eq!(s["inflight_full"], 0, "the map never filled: {s}");
    let (pid, count) = offender(&s, "threads_over_quota").expect("an offender");
    assert_eq!(pid, flood.pid() as u64, "{s}");
    assert_eq!(count, refused, "one process was charged it all: {s}");
    let text = s["verdict"]["text"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert!(
        text.contains("--max-threads-per-master"),
        "the verdict says what it did not record: {text}"
    );
}

/// Waits for SIGUSR1, then makes `n` calls to `port` that send a byte and
/// close before any reply (each an upstream cut), and sends itself `n`
/// SIGHUPs it handles; prints `done`.
fn event_flood(port: u16, n: usize) -> String {
    format!(
        "import os, signal, socket
signal.signal(signal.SIGHUP, lambda *a: None)
signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
print('ready', flush=True)
signal.sigwait([signal.SIGUSR1])
for _ in range({n}):
    s = socket.create_connection(('127.0.0.1', {port}))
    s.sendall(b'x')
    s.close()
for _ in range({n}):
    os.kill(os.getpid(), signal.SIGHUP)
print('done', flush=True)
signal.sigwait([signal.SIGUSR1])
"
    )
}

/// Before: every connection end and signal of a flooding process went to
/// the ring buffer every tenant shares. Now each process has its own
/// bucket; what it spends past it is counted and charged to it, and
/// another process's event still comes.
#[test]
fn a_process_flooding_events_spends_its_own_bucket_and_another_processs_event_still_comes() {
    require_root();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        // Reads each call's byte, never answers, and holds the connection
        // so that the caller closes first.
        let mut held = Vec::new();
        for mut c in listener.incoming().flatten() {
            let mut b = [0u8; 1];
            let _ = c.read(&mut b);
            held.push(c);
        }
    });
    let n = 300;
    let mut flood = Proc::python_captured(&event_flood(port, n));
    let mut victim = Proc::python_captured(&event_flood(port, 1));
    flood.wait_count("ready", 1, Duration::from_secs(10));
    victim.wait_count("ready", 1, Duration::from_secs(10));
    let mut t = Tracer::start(&[
        "--pid",
        &flood.pid().to_string(),
        "--pid",
        &victim.pid().to_string(),
        "--event-rate",
        "20",
    ]);
    signal(flood.pid(), libc::SIGUSR1);
    flood.wait_count("done", 1, Duration::from_secs(20));
    signal(victim.pid(), libc::SIGUSR1);
    victim.wait_count("done", 1, Duration::from_secs(10));
    t.wait_for("the victim's upstream cut", Duration::from_secs(5), |e| {
        e["event"] == "early_close" && e["pid"] == victim.pid()
    });
    t.collect_for(Duration::from_secs(1));
    let flooded = t
        .of_kind("early_close")
        .iter()
        .filter(|e| e["pid"] == flood.pid())
        .count();
    assert!(flooded > 0, "the bucket's first events are sent");
    assert!(
        flooded < n / 2,
        "{flooded} of {n} early closes sent: the rest were held back"
    );
    let s = t.stop();
    let limited = s["events_rate_limited"].as_u64().unwrap();
    assert!(limited as usize >= n, "{limited} held back: {s}");
    assert_eq!(
        offender(&s, "events_rate_limited").map(|o| o.0),
        Some(flood.pid() as u64),
        "{s}"
    );
    assert_eq!(s["events_lost"], 0, "{s}");
    let row = s["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["pid"] == victim.pid())
        .cloned()
        .unwrap();
    assert_eq!(row["early_closes"]["upstream_cut"], 1, "{row}");
}

/// With nothing lost, no offender is named and no quota is said.
#[test]
fn a_quiet_process_is_charged_nothing() {
    require_root();
    let quiet = Proc::python(&forker(2));
    let mut t = Tracer::start(&["--pid", &quiet.pid().to_string()]);
    signal(quiet.pid(), libc::SIGUSR1);
    t.wait_count("its children", 2, Duration::from_secs(5), |e| {
        e["event"] == "worker" && e["source"] == "fork"
    });
    let s = t.stop();
    assert!(s.get("top_offenders").is_none(), "{s}");
    assert_eq!(s["over_quota"], 0, "{s}");
    assert_eq!(s["threads_over_quota"], 0, "{s}");
    assert_eq!(s["events_rate_limited"], 0, "{s}");
    assert_eq!(s["masters_over_quota"], 0, "{s}");
    assert!(
        t.stderr_lines
            .iter()
            .all(|l| !l.contains("--max-masters-per-container")),
        "{:?}",
        t.stderr_lines
    );
}

/// A cgroup named as a container runtime names one (a 64-hex id), under
/// this process's own: the tracer takes what runs in it for a container.
/// Removed when dropped.
struct FakeContainer {
    dir: PathBuf,
    id: String,
}

impl FakeContainer {
    fn new(n: u32) -> FakeContainer {
        let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
        // cgroup v1's memory hierarchy where there is one (these machines),
        // else v2's.
        let v1 = own
            .lines()
            .find_map(|l| l.split_once(":memory:").map(|(_, p)| p.to_string()))
            .filter(|_| Path::new("/sys/fs/cgroup/memory").is_dir());
        let (root, path) = match v1 {
            Some(p) => ("/sys/fs/cgroup/memory", p),
            None => (
                "/sys/fs/cgroup",
                own.lines()
                    .find_map(|l| l.strip_prefix("0::").map(str::to_string))
                    .expect("a cgroup v2 path"),
            ),
        };
        let id = format!("{:08x}{:056x}", std::process::id(), n);
        let dir = PathBuf::from(root)
            .join(path.trim_start_matches('/'))
            .join(&id);
        std::fs::create_dir_all(&dir).unwrap();
        FakeContainer { dir, id }
    }

    /// `python3 <dir>/gunicorn` started inside: it moves itself in, then
    /// execs, so it is in the container from its exec on.
    fn spawn_master(&self, script: &Path) -> Proc {
        let sh = format!(
            "echo $$ > {}/cgroup.procs && exec {} {}",
            self.dir.display(),
            python().display(),
            script.display()
        );
        Proc::spawn(Command::new("sh").args(["-c", &sh]))
    }
}

impl Drop for FakeContainer {
    fn drop(&mut self) {
        // Its processes were killed just before: wait for them to be gone.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Before: discovery watched every process named `gunicorn` it saw start,
/// so one pod starting thousands filled the kernel's watch list for every
/// other pod. Now a container has at most --max-masters-per-container
/// masters watched, the first refusal names it once, and another
/// container's master is still watched.
#[test]
fn discovery_watches_at_most_a_containers_quota_of_masters_and_says_so_once() {
    require_root();
    let (flood, other) = (FakeContainer::new(1), FakeContainer::new(2));
    let dir = std::env::temp_dir().join(format!("tracer-masters-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // `python3 .../gunicorn` is a Gunicorn master to discovery.
    let script = dir.join("gunicorn");
    std::fs::write(&script, "import time\ntime.sleep(30)\n").unwrap();
    let mut t = Tracer::start(&["--max-masters-per-container", "2"]);
    let mut fakes: Vec<Proc> = (0..4)
        .map(|_| {
            let p = flood.spawn_master(&script);
            // One at a time: which two are watched is then known.
            std::thread::sleep(Duration::from_millis(300));
            p
        })
        .collect();
    fakes.push(other.spawn_master(&script));
    let pids: Vec<u64> = fakes.iter().map(|p| p.pid() as u64).collect();
    t.wait_count("three masters watched", 3, Duration::from_secs(5), |e| {
        e["event"] == "master" && pids.contains(&e["pid"].as_u64().unwrap_or(0))
    });
    t.collect_for(Duration::from_secs(1));
    let watched: Vec<u64> = t
        .of_kind("master")
        .iter()
        .filter_map(|e| e["pid"].as_u64())
        .filter(|p| pids.contains(p))
        .collect();
    assert_eq!(
        watched,
        [pids[0], pids[1], pids[4]],
        "the first two of the full container, and the other's"
    );
    let master = t
        .of_kind("master")
        .into_iter()
        .find(|e| e["pid"] == pids[0])
        .cloned()
        .unwrap();
    assert_eq!(master["container"]["id"], flood.id, "{master}");
    let s = t.stop();
    drop(fakes);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(s["masters_over_quota"], 2, "{s}");
    assert_eq!(
        offender(&s, "masters_over_quota"),
        Some((pids[3], 2)),
        "the last refused, with its container's count: {s}"
    );
    let warned: Vec<&String> = t
        .stderr_lines
        .iter()
        .filter(|l| l.contains("--max-masters-per-container"))
        .collect();
    assert_eq!(warned.len(), 1, "said once: {:?}", t.stderr_lines);
    assert!(
        warned[0].contains(&format!("container {}", flood.id))
            && warned[0].contains(&pids[2].to_string()),
        "{}",
        warned[0]
    );
}
