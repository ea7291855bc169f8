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

/// The scenario files run in the guest: every finding kind (stalls on each
/// fd kind, WORKER TIMEOUT, OOM kills, early closes and keep-alive races,
/// hung requests, Python stacks). Files that need a cluster's tools (helm,
/// promtool) or measure the host's own deployment stay on the host.
const GUEST_FILES: &[&str] = &[
    "gunicorn_e2e",
    "stall_model",
    "exits",
    "early_close",
    "lost_requests",
    "timeout_blame",
    "truthful",
    "pystack_helper",
];

/// One test file gets at most this long in the guest (it runs 3-5x slower
/// under emulation than on the host); past it the tracer's kernel stacks
/// are dumped and the file counts as failed.
const FILE_DEADLINE: Duration = Duration::from_secs(900);
/// How much slower a guest under TCG runs than the host (measured 3-5x).
const EMULATION_SLOWDOWN: f64 = 5.0;

/// A kernel of the matrix: what `--kernel` names, and how apt names it.
struct Kernel {
    short: String,
    /// Regex for `apt-cache search --names-only`.
    package_re: String,
}

fn kernel(short: &str) -> Result<Kernel> {
    let package_re = match short {
        "6.1" => r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
        "6.12" => r"^linux-image-6\.12\.[0-9.]+\+deb12-amd64-unsigned$",
        other => bail!(
            "--kernel {other}: the matrix knows 6.1 (Debian 12's kernel) and 6.12 (Debian 12's optional one)"
        ),
    };
    Ok(Kernel {
        short: short.into(),
        package_re: package_re.into(),
    })
}

/// The newest package apt offers for the kernel.
fn package_name(k: &Kernel) -> Result<String> {
    let out = Command::new("apt-cache")
        .args(["search", "--names-only", &k.package_re])
        .output()
        .context("running apt-cache")?;
    let mut names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect();
    if names.is_empty() {
        run(Command::new("apt-get").args(["update", "-qq"]))?;
        let out = Command::new("apt-cache")
            .args(["search", "--names-only", &k.package_re])
            .output()?;
        names = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next().map(str::to_string))
            .collect();
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
    let pkg = package_name(k)?;
    let tree = dir.join(&pkg);
    if let Some(v) = vmlinuz(&tree) {
        return Ok(v);
    }
    step(&format!(
        "downloading {pkg} with apt (unpacked under target/kernels, not installed)"
    ));
    run(Command::new("apt-get")
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
/// output and exit status into `out`; a file past its deadline gets its
/// tracer's kernel stacks dumped before it is killed.
fn guest_script(
    bins: &BTreeMap<String, PathBuf>,
    out: &Path,
    tracer: &Path,
    venv: &Path,
    filter: Option<&str>,
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
    done
}
run_file() {
    local name=$1 bin=$2 secs=$3; shift 3
    echo "[$(date -u +%T)] $name"
    "$bin" --test-threads=1 "$@" > "$OUT/$name.log" 2>&1 &
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
    for (name, bin) in bins {
        s += &format!(
            "run_file {name} {} {}{}\n",
            bin.display(),
            FILE_DEADLINE.as_secs(),
            // Comma-separated: each a filter of its own (libtest runs a
            // test that any of them matches).
            filter
                .map(|f| f
                    .split(',')
                    .map(|one| format!(" '{}'", one.replace('\'', "")))
                    .collect::<String>())
                .unwrap_or_default()
        );
    }
    s += "echo done > \"$OUT/finished\"\n";
    s
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
        fs::write(
            &script,
            guest_script(&bins, &out, tracer, venv, filter, slowdown),
        )?;
        run(Command::new("chmod").arg("+x").arg(&script))?;
        step(&format!(
            "booting {} under QEMU ({accel}; one vCPU thread under emulation) and running {} scenario files",
            image.display(),
            bins.len()
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
        cmd.arg("--run")
            .arg(&image)
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
        for name in bins.keys() {
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
        assert!(e.contains("6.1") && e.contains("6.12"), "{e}");
    }
}
