//! `cargo xtask test --kernel 6.1`: the end-to-end scenarios on another
//! Debian kernel, booted under QEMU with virtme-ng. The kernel package is
//! downloaded with apt and unpacked under target/kernels (never installed);
//! the tracer and the test binaries are built on the host, and the guest
//! runs them from the host's root, shared read-only (virtme-ng's overlay
//! gives it a writable /tmp, /etc and /var). Results come back through a
//! shared directory: one line per test, per kernel.
use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::{cargo, root, run, setup, step};

const VNG_VERSION: &str = "1.42";

/// The scenario files whose tests can run in the guest. Files that need a
/// cluster's tools (helm, promtool) or measure the host's own deployment
/// stay on the host.
const GUEST_FILES: &[&str] = &[
    "gunicorn_e2e",
    "stall_model",
    "exits",
    "early_close",
    "lost_requests",
    "timeout_blame",
    "truthful",
    "pystack_helper",
    "ending",
];

/// What `--kernel 6.1` runs by default (and CI on every submission): one
/// test for every finding kind, small enough to fit CI's time under
/// emulation. `--full` runs every test of GUEST_FILES instead.
const FINDINGS: &[(&str, &str)] = &[
    // A stall on each fd kind, and the causes read from what it waits on.
    (
        "gunicorn_e2e",
        "queue_hang_is_named_before_worker_timeout_and_tied_to_the_kill",
    ),
    (
        "stall_model",
        "a_database_wait_outside_the_gevent_loop_is_a_stall_naming_the_server",
    ),
    (
        "stall_model",
        "a_gthread_pool_thread_blocked_in_a_pipe_read_is_named_and_gunicorn_never_notices",
    ),
    (
        "stall_model",
        "a_worker_deadlocked_since_its_fork_is_named_with_the_lock_cause",
    ),
    (
        "stall_model",
        "a_greenlet_that_keeps_the_cpu_is_a_stall_before_worker_timeout",
    ),
    (
        "truthful",
        "attached_to_a_worker_already_stuck_the_figures_are_current_and_a_lower_bound_says_so",
    ),
    // The Python stack, read by the tracer itself, and the DaemonSet's
    // capabilities (no perf_event_open).
    (
        "stall_model",
        "a_gevent_stall_carries_the_python_stack_read_by_the_tracer_itself",
    ),
    (
        "pystack_helper",
        "with_the_daemonsets_capabilities_the_helper_becomes_nobody",
    ),
    // Exits: WORKER TIMEOUT (one event when escalated), OOM kill, signals.
    (
        "exits",
        "a_worker_timeout_escalated_to_sigkill_is_one_timeout",
    ),
    (
        "exits",
        "an_oom_kill_is_named_with_the_cgroup_limit_and_its_dropped_request",
    ),
    ("exits", "signals_are_told_apart_by_who_sent_them"),
    // Every early-close kind, keep-alive races among them, and a hung request.
    (
        "early_close",
        "each_way_a_connection_ends_gives_exactly_the_right_event",
    ),
    (
        "early_close",
        "an_outbound_call_closed_before_any_reply_is_an_upstream_cut",
    ),
    (
        "early_close",
        "preceded_by_is_said_unseen_only_on_a_kernel_without_sock_recv_length",
    ),
    (
        "lost_requests",
        "health_checks_and_client_aborts_are_counted_never_blamed_on_a_worker",
    ),
    (
        "lost_requests",
        "a_request_sent_on_a_connection_gunicorn_closed_as_idle_is_a_keepalive_race",
    ),
    (
        "lost_requests",
        "a_kernel_that_cannot_show_keepalive_races_says_so",
    ),
    (
        "lost_requests",
        "a_request_stuck_in_a_gthread_worker_is_named_before_nginx_gives_up_with_504",
    ),
    // Ad-hoc attach to one worker already stuck: text on screen, JSON in a file.
    (
        "gunicorn_e2e",
        "ad_hoc_on_one_worker_with_text_on_screen_and_json_in_a_file",
    ),
    // The tracer always ends (50 runs in a row on a Gunicorn), and the
    // start-up check passes.
    ("ending", "the_tracer_ends_within_2s_of_its_duration"),
    (
        "ending",
        "fifty_runs_in_a_row_on_a_gunicorn_each_end_within_2s",
    ),
    (
        "ending",
        "sigterm_while_running_ends_the_tracer_within_2s_with_its_summary",
    ),
    (
        "ending",
        "the_start_up_check_refuses_a_kernel_before_5_15_and_only_such_a_kernel",
    ),
];

/// What a kernel too old for the tracer runs: the refusal alone.
const REFUSAL: &[(&str, &str)] = &[(
    "ending",
    "the_start_up_check_refuses_a_kernel_before_5_15_and_only_such_a_kernel",
)];

/// One test file gets at most this long in the guest (it runs 3-5x slower
/// under emulation than on the host); past it the tracer's kernel stacks
/// are dumped and the file counts as failed.
const FILE_DEADLINE: Duration = Duration::from_secs(900);
/// How much slower a guest under TCG runs than the host (measured 3-5x).
const EMULATION_SLOWDOWN: f64 = 5.0;

/// A kernel of the matrix: what `--kernel` names, how apt names it, and
/// what runs on it by default.
struct Kernel {
    short: String,
    /// Regex for `apt-cache search --names-only`.
    package_re: String,
    /// A suite outside the host's apt sources (Debian 11's kernels are in
    /// bullseye-security), reached with a private apt state.
    suite: Option<&'static str>,
    tests: &'static [(&'static str, &'static str)],
}

fn kernel(short: &str) -> Result<Kernel> {
    let (package_re, suite, tests) = match short {
        "6.1" => (
            r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
            None,
            FINDINGS,
        ),
        "6.12" => (
            r"^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$",
            None,
            FINDINGS,
        ),
        "5.10" => (
            r"^linux-image-5\.10\.0-[0-9]+-amd64-unsigned$",
            Some("bullseye-security"),
            REFUSAL,
        ),
        other => bail!(
            "--kernel {other}: the matrix knows 6.1 (Debian 12's kernel), 6.12 (Debian 12's optional one) and 5.10 (Debian 11's, which the tracer refuses)"
        ),
    };
    Ok(Kernel {
        short: short.into(),
        package_re: package_re.into(),
        suite,
        tests,
    })
}

/// apt's options for a kernel: none for the host's own sources; for another
/// suite, a private state under target/kernels (its own sources list, lists
/// and cache) built from the host's debian-security URI, so the host's apt
/// configuration is left alone.
fn apt_options(k: &Kernel) -> Result<Vec<String>> {
    let Some(suite) = k.suite else {
        return Ok(Vec::new());
    };
    let dir = root().join(format!("target/kernels/apt-{suite}"));
    fs::create_dir_all(dir.join("lists/partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let uri = host_security_uri().unwrap_or_else(|| "http://deb.debian.org/debian-security".into());
    let list = dir.join("sources.list");
    fs::write(
        &list,
        format!(
            "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {uri} {suite} main\n"
        ),
    )?;
    let opts = vec![
        format!("-oDir::Etc::SourceList={}", list.display()),
        "-oDir::Etc::SourceParts=/nonexistent".to_string(),
        format!("-oDir::State::Lists={}", dir.join("lists").display()),
        format!("-oDir::Cache={}", dir.join("cache").display()),
    ];
    if fs::read_dir(dir.join("lists"))?.count() <= 1 {
        step(&format!(
            "reading {suite}'s package list into a private apt state under {}",
            dir.display()
        ));
        run(Command::new("apt-get").args(&opts).args(["update", "-qq"]))?;
    }
    Ok(opts)
}

/// The debian-security URI of the host's apt sources (deb822 or one-line).
fn host_security_uri() -> Option<String> {
    let mut texts = Vec::new();
    texts.push(fs::read_to_string("/etc/apt/sources.list").unwrap_or_default());
    for e in fs::read_dir("/etc/apt/sources.list.d").ok()?.flatten() {
        texts.push(fs::read_to_string(e.path()).unwrap_or_default());
    }
    texts
        .iter()
        .flat_map(|t| t.split_whitespace())
        .find_map(|w| {
            (w.starts_with("http") && w.trim_end_matches('/').ends_with("debian-security"))
                .then(|| w.trim_end_matches('/').to_string())
        })
}

/// The newest package apt offers for the kernel.
fn package_name(k: &Kernel, apt: &[String]) -> Result<String> {
    let search = || -> Result<Vec<String>> {
        let out = Command::new("apt-cache")
            .args(apt)
            .args(["search", "--names-only", &k.package_re])
            .output()
            .context("running apt-cache")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect())
    };
    let mut names = search()?;
    if names.is_empty() {
        run(Command::new("apt-get").args(apt).args(["update", "-qq"]))?;
        names = search()?;
    }
    names.sort_by_key(|n| version_key(n));
    names
        .pop()
        .with_context(|| format!("apt offers no package matching {}", k.package_re))
}

/// Numbers in a package name, for ordering 6.1.0-9 before 6.1.0-57.
fn version_key(name: &str) -> Vec<u64> {
    name.split(|c: char| !c.is_ascii_digit())
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// The unpacked kernel: its directory and its vmlinuz (cached).
fn unpacked(k: &Kernel) -> Result<PathBuf> {
    let dir = root().join("target/kernels");
    fs::create_dir_all(&dir)?;
    let apt = apt_options(k)?;
    let pkg = package_name(k, &apt)?;
    let tree = dir.join(&pkg);
    if let Some(v) = vmlinuz(&tree) {
        return Ok(v);
    }
    step(&format!(
        "downloading {pkg} with apt (unpacked under target/kernels, not installed)"
    ));
    run(Command::new("apt-get")
        .args(&apt)
        .args(["download", "-qq", &pkg])
        .current_dir(&dir))?;
    let deb = fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&format!("{pkg}_")) && n.ends_with(".deb"))
        })
        .with_context(|| format!("apt-get download left no {pkg}_*.deb"))?;
    let tmp = dir.join(format!("{pkg}.partial"));
    let _ = fs::remove_dir_all(&tmp);
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tmp))?;
    fs::rename(&tmp, &tree)?;
    let _ = fs::remove_file(&deb);
    vmlinuz(&tree).with_context(|| format!("{pkg} holds no boot/vmlinuz-*"))
}

fn vmlinuz(tree: &Path) -> Option<PathBuf> {
    fs::read_dir(tree.join("boot"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
}

/// virtme-ng in its own virtualenv under target/tools, and what it needs.
fn vng() -> Result<PathBuf> {
    setup::tools(
        &[
            ("qemu-system-x86_64", "qemu-system-x86"),
            ("busybox", "busybox-static"),
            ("depmod", "kmod"),
            ("udevadm", "udev"),
        ],
        "booting other kernels (QEMU, and what virtme-ng's guest needs)",
    )?;
    let dir = root().join("target/tools/vng");
    let bin = dir.join("bin/vng");
    let ok = Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(VNG_VERSION))
        .unwrap_or(false);
    if ok {
        return Ok(bin);
    }
    step(&format!(
        "installing virtme-ng {VNG_VERSION} into {}",
        dir.display()
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .arg(format!("virtme-ng=={VNG_VERSION}")))?;
    Ok(bin)
}

/// KVM only where it can run a stock kernel: this machine's /dev/kvm is
/// PVM, which runs PVM guests only (QEMU aborts or hangs silently on a
/// stock kernel), so it is decided up front, never by waiting for a hang.
fn use_kvm() -> (bool, &'static str) {
    if Path::new("/sys/module/kvm_pvm").exists() {
        return (false, "/dev/kvm is PVM (kvm_pvm loaded): TCG emulation");
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return (false, "no usable /dev/kvm: TCG emulation");
    }
    (true, "KVM")
}

/// The test binaries of the scenario files, built on the host.
fn test_binaries() -> Result<BTreeMap<String, PathBuf>> {
    step("building the end-to-end test binaries (run inside the guest)");
    let out = cargo()
        .current_dir(root())
        .args([
            "test",
            "--release",
            "-p",
            "tests",
            "--no-run",
            "--message-format=json",
        ])
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!(
            "building the test binaries failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut bins = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(name), Some(exe)) = (v["target"]["name"].as_str(), v["executable"].as_str())
        else {
            continue;
        };
        if GUEST_FILES.contains(&name) {
            bins.insert(name.to_string(), PathBuf::from(exe));
        }
    }
    for f in GUEST_FILES {
        if !bins.contains_key(*f) {
            bail!("no test binary for {f}");
        }
    }
    Ok(bins)
}

/// The script the guest runs: each file's binary, one test at a time, its
/// output (with what passing tests printed: their figures) and exit status
/// into `out`; a file past its deadline gets its
/// tracer's kernel stacks dumped before it is killed.
fn guest_script(
    runs: &[(String, PathBuf, Vec<String>)],
    out: &Path,
    tracer: &Path,
    venv: &Path,
    slowdown: f64,
) -> String {
    let mut s = String::from(
        r#"#!/bin/bash
# Written by `cargo xtask test --kernel`; runs inside the guest.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PYTHONDONTWRITEBYTECODE=1
"#,
    );
    s += &format!(
        "OUT={}\nexport TRACER_BIN={}\nexport TRACER_VENV={}\nexport TRACER_TEST_SLOWDOWN={slowdown}\n",
        out.display(),
        tracer.display(),
        venv.display()
    );
    s += r#"exec > "$OUT/guest.log" 2>&1
uname -a
ip link set lo up
mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing
mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf
echo +memory > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null
dump_stacks() {
    for p in $(pgrep -f "$TRACER_BIN"); do
        echo "== tracer $p"
        for t in /proc/$p/task/*; do echo "-- $t $(cat $t/comm)"; cat $t/stack; done
        # The guest sees the host's files: its gdb, when it has one.
        if command -v gdb > /dev/null; then
            echo "== tracer $p, user space"
            timeout 120 gdb -p $p -batch -ex "thread apply all bt" 2>&1 | head -400
        else
            echo "(no gdb on this host: the tracer's user-space stacks are not read)"
        fi
    done
}
run_file() {
    local name=$1 bin=$2 secs=$3; shift 3
    echo "[$(date -u +%T)] $name"
    "$bin" --test-threads=1 --show-output "$@" > "$OUT/$name.log" 2>&1 &
    local pid=$! n=0
    while kill -0 $pid 2>/dev/null; do
        sleep 1; n=$((n + 1))
        if [ $n -ge $secs ]; then
            echo "deadline: $name ran past ${secs}s" >> "$OUT/$name.log"
            dump_stacks >> "$OUT/$name.log" 2>&1
            pkill -KILL -P $pid; kill -KILL $pid
            echo 124 > "$OUT/$name.rc"; return
        fi
    done
    wait $pid; echo $? > "$OUT/$name.rc"
}
"#;
    for (name, bin, args) in runs {
        s += &format!(
            "run_file {name} {} {}{}\n",
            bin.display(),
            FILE_DEADLINE.as_secs(),
            args.iter()
                .map(|a| format!(" '{}'", a.replace('\'', "")))
                .collect::<String>()
        );
    }
    s += "echo done > \"$OUT/finished\"\n";
    s
}

/// Which files run in the guest, each with its libtest arguments: the
/// user's filters (comma-separated, each its own: libtest runs a test that
/// any of them matches) in every file; else every test (`--full`); else
/// the kernel's own set, by exact name, and only the files it names.
fn selection(
    k: &Kernel,
    bins: &BTreeMap<String, PathBuf>,
    filter: Option<&str>,
    full: bool,
) -> Vec<(String, PathBuf, Vec<String>)> {
    bins.iter()
        .filter_map(|(name, bin)| {
            let args: Vec<String> = match filter {
                Some(f) => f.split(',').map(str::to_string).collect(),
                None if full => Vec::new(),
                None => {
                    let mine: Vec<String> = k
                        .tests
                        .iter()
                        .filter(|(file, _)| file == name)
                        .map(|(_, test)| test.to_string())
                        .collect();
                    if mine.is_empty() {
                        return None;
                    }
                    std::iter::once("--exact".to_string()).chain(mine).collect()
                }
            };
            Some((name.clone(), bin.clone(), args))
        })
        .collect()
}

/// `test NAME ... ok|FAILED|ignored` lines of a libtest output.
fn results(log: &str) -> Vec<(String, String)> {
    log.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("test ")?;
            let (name, verdict) = rest.rsplit_once(" ... ")?;
            Some((name.to_string(), verdict.trim().to_string()))
        })
        .collect()
}

/// Runs the scenario files on each kernel; returns the failures.
pub fn run_matrix(
    kernels: &[String],
    tracer: &Path,
    venv: &Path,
    filter: Option<&str>,
    full: bool,
) -> Result<Vec<String>> {
    let vng = vng()?;
    let bins = test_binaries()?;
    let (kvm, accel) = use_kvm();
    let mut failures = Vec::new();
    for short in kernels {
        let k = kernel(short)?;
        let image = unpacked(&k)?;
        let out = root().join(format!("target/kernels/run-{}", k.short));
        let _ = fs::remove_dir_all(&out);
        fs::create_dir_all(&out)?;
        let script = out.join("guest.sh");
        // The tests' waits stretch by this much (tests/src/lib.rs `slow`).
        let slowdown = if kvm { 1.5 } else { EMULATION_SLOWDOWN };
        let runs = selection(&k, &bins, filter, full);
        fs::write(&script, guest_script(&runs, &out, tracer, venv, slowdown))?;
        run(Command::new("chmod").arg("+x").arg(&script))?;
        step(&format!(
            "booting {} under QEMU ({accel}; one vCPU thread under emulation) and running {} scenario files",
            image.display(),
            runs.len()
        ));
        let console = out.join("console.log");
        let started = Instant::now();
        let mut cmd = Command::new(&vng);
        // vng starts virtme-run, from its own virtualenv.
        let path = format!(
            "{}:{}",
            vng.parent().expect("bin/vng").display(),
            std::env::var("PATH").unwrap_or_default()
        );
        cmd.env("PATH", &path);
        // --verbose: the guest kernel's console (an oops, a hung task)
        // goes to QEMU's stdout, kept in console.log.
        cmd.arg("--run")
            .arg(&image)
            .arg("--verbose")
            .args(["--cpus", "2", "--memory", "3G", "--user", "root"])
            .arg(format!("--rwdir={}", out.display()))
            .arg("--exec")
            .arg(script.display().to_string());
        if !kvm {
            // Multi-threaded emulation oopsed a guest while the tracer
            // attached: the vCPUs run in one thread.
            // (With `=`: the value starts with a dash.)
            cmd.arg("--disable-kvm")
                .arg("--qemu-opts=-accel tcg,thread=single");
        }
        // QEMU reopens a redirected stdout and truncates it: a pipe it is.
        let status = Command::new("sh")
            .env("PATH", &path)
            .arg("-c")
            .arg(format!("\"$@\" 2>&1 | cat > '{}'", console.display()))
            .arg("sh")
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .status()
            .context("starting virtme-ng")?;
        eprintln!(
            "    the guest ran {:.0}s (vng: {status}); console log: {}",
            started.elapsed().as_secs_f64(),
            console.display()
        );
        if !out.join("finished").exists() {
            failures.push(format!(
                "{}: the guest did not finish its scenarios (see {} and {})",
                k.short,
                console.display(),
                out.join("guest.log").display()
            ));
        }
        let mut ran = 0;
        for (name, _, _) in &runs {
            let log = fs::read_to_string(out.join(format!("{name}.log"))).unwrap_or_default();
            let rc = fs::read_to_string(out.join(format!("{name}.rc")))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            let lines = results(&log);
            ran += lines.len();
            for (test, verdict) in &lines {
                println!("{:<6} {name}::{test} ... {verdict}", k.short);
                if verdict != "ok" && verdict != "ignored" {
                    failures.push(format!("{} {name}::{test}", k.short));
                }
            }
            match rc {
                Some(0) => {}
                Some(rc) if lines.iter().all(|(_, v)| v == "ok" || v == "ignored") => failures
                    .push(format!(
                        "{} {name}: exit {rc} (see {})",
                        k.short,
                        out.join(format!("{name}.log")).display()
                    )),
                Some(_) => {}
                None => failures.push(format!("{} {name}: did not run", k.short)),
            }
        }
        // A test of the kernel's own set that printed no verdict did not
        // run (renamed, or its file died before it): not a pass.
        if filter.is_none() && !full {
            for (file, test) in k.tests {
                let log = fs::read_to_string(out.join(format!("{file}.log"))).unwrap_or_default();
                if !results(&log).iter().any(|(t, _)| t == test) {
                    failures.push(format!("{} {file}::{test}: did not run", k.short));
                }
            }
        }
        // A filter that matches nothing proves nothing: not a pass.
        if ran == 0 {
            failures.push(format!(
                "{}: no test ran{}",
                k.short,
                filter.map_or(String::new(), |f| format!(" (none matched '{f}')"))
            ));
        }
    }
    Ok(failures)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_package_wins_by_number_not_text() {
        let mut v = [
            "linux-image-6.1.0-9-amd64-unsigned".to_string(),
            "linux-image-6.1.0-57-amd64-unsigned".to_string(),
            "linux-image-6.1.0-10-amd64-unsigned".to_string(),
        ];
        v.sort_by_key(|n| version_key(n));
        assert_eq!(v.last().unwrap(), "linux-image-6.1.0-57-amd64-unsigned");
    }

    #[test]
    fn libtest_lines_are_read_with_their_verdicts() {
        let log = "running 2 tests\ntest a_b ... ok\ntest c ... FAILED\n\nfailures:\n";
        assert_eq!(
            results(log),
            [
                ("a_b".to_string(), "ok".to_string()),
                ("c".to_string(), "FAILED".to_string())
            ]
        );
    }

    #[test]
    fn an_unknown_kernel_is_refused_with_the_ones_known() {
        let e = kernel("5.4").err().unwrap().to_string();
        assert!(
            e.contains("6.1") && e.contains("6.12") && e.contains("5.10"),
            "{e}"
        );
    }

    /// A renamed test would drop out of the kernels' sets unseen.
    #[test]
    fn every_test_of_the_kernel_sets_is_a_test_of_a_guest_file() {
        for (file, test) in FINDINGS.iter().chain(REFUSAL) {
            assert!(GUEST_FILES.contains(file), "{file} is not a guest file");
            let src = fs::read_to_string(root().join(format!("tests/tests/{file}.rs"))).unwrap();
            assert!(
                src.contains(&format!("#[test]\nfn {test}()")),
                "tests/tests/{file}.rs has no test {test}"
            );
        }
    }

    #[test]
    fn the_default_set_runs_only_its_files_by_exact_name() {
        let k = kernel("5.10").unwrap();
        let bins: BTreeMap<String, PathBuf> = GUEST_FILES
            .iter()
            .map(|f| (f.to_string(), PathBuf::from(format!("/b/{f}"))))
            .collect();
        let runs = selection(&k, &bins, None, false);
        assert_eq!(runs.len(), 1);
        assert_eq!(runs[0].0, "ending");
        assert_eq!(runs[0].2[0], "--exact");
        assert_eq!(selection(&k, &bins, None, true).len(), GUEST_FILES.len());
        let filtered = selection(&k, &bins, Some("a,b"), false);
        assert_eq!(filtered.len(), GUEST_FILES.len());
        assert_eq!(filtered[0].2, ["a", "b"]);
    }
}
