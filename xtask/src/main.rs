//! `cargo xtask`: set-up, build, tests and the demo, from a fresh machine.
//!
//! Every command first makes sure its prerequisites exist and installs what
//! is missing, saying what it does. Re-running is fast when all is there.
mod bench;
mod bpfstats;
mod demo;
mod kernels;
mod pythons;
mod render;
mod setup;
mod soak;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "cargo xtask",
    about = "Build, test and demo the Gunicorn stall tracer"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (LLVM 22, bpf-linker, rust-src, the Python virtualenv).
    Setup,
    /// Build the tracer; the binary lands at target/release/tracer.
    Build,
    /// Run every test: unit tests, then each end-to-end test file as root (all
    /// of them even when one fails), then the benchmark smoke test; lists
    /// every failure at the end.
    Test {
        /// Only run tests whose name contains this (with --kernel, several
        /// comma-separated: a test any of them matches).
        filter: Option<String>,
        /// Instead of the host's suite, run the end-to-end scenarios on these
        /// Debian kernels under QEMU (6.1, 6.12, 5.10; comma-separated):
        /// one test of every finding kind (5.10: the refusal alone).
        #[arg(long, value_delimiter = ',')]
        kernel: Vec<String>,
        /// With --kernel: every test of the scenario files, not one of
        /// every finding kind.
        #[arg(long, requires = "kernel")]
        full: bool,
        /// Instead of the host's suite, run the stack end-to-end tests (every
        /// worker class) on each CPython 3.9-3.13 of the machine's pyenv, and
        /// say which versions and tests were skipped and why.
        #[arg(long, conflicts_with = "kernel")]
        pythons: bool,
    },
    /// Measure the tracer's cost against the floor, bpftrace and strace (ratios, medians).
    Bench {
        /// A tiny run that only checks the benchmark works (used by `test`).
        #[arg(long)]
        quick: bool,
        /// Run only these parts (comma-separated), for iterating on one.
        #[arg(long, value_enum, value_delimiter = ',')]
        only: Vec<bench::Part>,
        /// Another tracer binary to measure per context switch next to this
        /// one, in the same interleaved rounds (NAME=PATH, repeatable).
        #[arg(long, value_name = "NAME=PATH")]
        variant: Vec<bench::Variant>,
    },
    /// A long run under load with worker churn: tracer memory and map sizes over time.
    Soak {
        #[arg(long, default_value_t = 10)]
        minutes: u64,
    },
    /// Render deploy/kubernetes/ from the Helm chart, and refresh the chart's
    /// copies of the alert rules and the dashboard.
    RenderDeploy,
    #[command(name = "__pipe-loop", hide = true)]
    PipeLoop {
        pairs: u64,
        go: PathBuf,
        #[arg(long)]
        switch: bool,
    },
    #[command(name = "__drop-server", hide = true)]
    DropServer,
    /// Run a bundled Gunicorn + gevent app with the bug, and the tracer pointing at it.
    Demo {
        /// stall: multiprocessing.Queue hangs a worker (lesson 1).
        /// early-close: a leaked socket timeout makes nginx answer 502 (lesson 2).
        #[arg(value_enum, default_value = "stall")]
        scenario: demo::Scenario,
        /// Gunicorn's --timeout for the stall demo, in seconds.
        #[arg(long, default_value_t = 6)]
        timeout: u32,
    },
}

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask/ has a parent")
        .to_path_buf()
}

pub fn step(msg: &str) {
    eprintln!("\x1b[1m==> {msg}\x1b[0m");
}

/// Runs a command with inherited output; fails with the command line.
pub fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {:?}", cmd.get_program()))?;
    if !status.success() {
        bail!("command failed ({status}): {cmd:?}");
    }
    Ok(())
}

pub fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

fn build() -> Result<PathBuf> {
    setup::toolchain()?;
    step("building the tracer (release; the BPF object is built by tracer/build.rs and embedded)");
    run(cargo()
        .current_dir(root())
        .args(["build", "--release", "-p", "tracer"]))?;
    // Where cargo put it: CARGO_TARGET_DIR when set (relative to the root).
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|d| root().join(d))
        .unwrap_or_else(|| root().join("target"));
    let bin = target.join("release/tracer");
    eprintln!("    {}", bin.display());
    Ok(bin)
}

/// The end-to-end scenarios on other kernels (see kernels.rs).
fn test_kernels(kernels: &[String], filter: Option<String>, full: bool) -> Result<()> {
    setup::require_root("cargo xtask test --kernel")?;
    let bin = build()?;
    let venv = setup::venv()?;
    let failures = kernels::run_matrix(kernels, &bin, &venv, filter.as_deref(), full)?;
    if !failures.is_empty() {
        eprintln!("failed:");
        for f in &failures {
            eprintln!("    {f}");
        }
        bail!("{} failure(s) on {}", failures.len(), kernels.join(", "));
    }
    step(&format!("every scenario passed on {}", kernels.join(", ")));
    Ok(())
}

fn test(filter: Option<String>) -> Result<()> {
    setup::require_root("cargo xtask test")?;
    let bin = build()?;
    let venv = setup::venv()?;
    setup::tools(
        &[
            ("nginx", "nginx"),
            ("bpftool", "bpftool"),
            ("nft", "nftables"),
            ("wrk", "wrk"),
            ("promtool", "prometheus"),
        ],
        "the end-to-end tests (nginx in front of Gunicorn; bpftool to check the unload; nft to hold back a FIN for the keep-alive race; wrk for the healthy-under-load checks; promtool and prometheus for the alert rules and the dashboard's queries)",
    )?;
    setup::postgresql()?;
    let helm = setup::helm()?;
    let mut steps = Steps::default();
    steps.run(
        "unit tests (pure logic: parsers, correlator, output)",
        || {
            let mut unit = cargo();
            unit.current_dir(root()).args([
                "test",
                "--release",
                "--workspace",
                "--exclude",
                "tests",
                "--exclude",
                "tracer-ebpf",
            ]);
            if let Some(f) = &filter {
                unit.args(["--", f]);
            }
            run(&mut unit)
        },
    );
    // The integration and end-to-end tests (real BPF programs, real
    // Gunicorn + gevent; one at a time): the tests crate's own unit tests,
    // then each file as its own cargo run.
    let e2e = |target: &[&str]| {
        let mut it = cargo();
        it.current_dir(root())
            .args(["test", "--release", "-p", "tests"])
            .args(target)
            .args(["--", "--test-threads=1"])
            .env("TRACER_BIN", &bin)
            .env("TRACER_VENV", &venv)
            .env("HELM_BIN", &helm);
        if let Some(f) = &filter {
            it.arg(f);
        }
        run(&mut it)
    };
    steps.run("tests crate helpers (tests/src)", || e2e(&["--lib"]));
    for name in e2e_test_files()? {
        steps.run(format!("end-to-end: tests/tests/{name}.rs"), || {
            e2e(&["--test", &name])
        });
    }
    steps.run(
        "benchmark smoke test (a tiny `cargo xtask bench`: it must run, its timings are not judged)",
        || {
            setup::tools(
                &[
                    ("wrk", "wrk"),
                    ("bpftrace", "bpftrace"),
                    ("strace", "strace"),
                ],
                "the benchmark smoke test",
            )?;
            run(cargo()
                .current_dir(root())
                .args(["xtask", "bench", "--quick"]))
        },
    );
    steps.verdict()?;
    step("all tests passed");
    Ok(())
}

/// Test steps run one after another. A failing step is recorded and the
/// next one runs anyway, so one failing file cannot hide the results of
/// the files after it; the failures are listed together at the end.
#[derive(Default)]
struct Steps {
    ran: usize,
    failed: Vec<String>,
}

impl Steps {
    fn run(&mut self, what: impl Into<String>, f: impl FnOnce() -> Result<()>) {
        let what = what.into();
        step(&what);
        self.ran += 1;
        if let Err(e) = f() {
            eprintln!("\x1b[1;31m==> FAILED: {what}\x1b[0m ({e:#})");
            self.failed.push(what);
        }
    }

    /// Ok when every step passed; else lists the failed ones and fails.
    fn verdict(self) -> Result<()> {
        if self.failed.is_empty() {
            return Ok(());
        }
        eprintln!(
            "\x1b[1;31m==> {} of {} test steps failed:\x1b[0m",
            self.failed.len(),
            self.ran
        );
        for f in &self.failed {
            eprintln!("    {f}");
        }
        bail!(
            "{} of {} test steps failed: {}",
            self.failed.len(),
            self.ran,
            self.failed.join("; ")
        );
    }
}

/// The end-to-end test files (tests/tests/NAME.rs), by name, sorted.
fn e2e_test_files() -> Result<Vec<String>> {
    let dir = root().join("tests/tests");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_string());
        }
    }
    names.sort();
    Ok(names)
}

fn bench(quick: bool, only: &[bench::Part], variants: &[bench::Variant]) -> Result<()> {
    setup::require_root("cargo xtask bench")?;
    let bin = build()?;
    let venv = setup::venv()?;
    setup::tools(
        &[
            ("wrk", "wrk"),
            ("bpftrace", "bpftrace"),
            ("strace", "strace"),
        ],
        "the benchmark compares against them",
    )?;
    // SAFETY: set before any thread is spawned.
    unsafe {
        std::env::set_var("TRACER_BIN", &bin);
        std::env::set_var("TRACER_VENV", &venv);
    }
    bench::run(quick, only, variants)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.cmd {
        Cmd::Setup => setup::toolchain().and_then(|_| setup::venv().map(|_| ())),
        Cmd::Build => build().map(|_| ()),
        Cmd::Test {
            filter,
            kernel,
            full,
            ..
        } if !kernel.is_empty() => test_kernels(&kernel, filter, full),
        Cmd::Test {
            filter,
            pythons: true,
            ..
        } => setup::require_root("cargo xtask test --pythons")
            .and_then(|_| build())
            .and_then(|bin| pythons::run(&bin, filter.as_deref())),
        Cmd::Test { filter, .. } => test(filter),
        Cmd::RenderDeploy => render::render_deploy(),
        Cmd::Bench {
            quick,
            only,
            variant,
        } => bench(quick, &only, &variant),
        Cmd::PipeLoop { pairs, go, switch } => bench::pipe_loop(pairs, &go, switch),
        Cmd::Soak { minutes } => (|| {
            setup::require_root("cargo xtask soak")?;
            let bin = build()?;
            let venv = setup::venv()?;
            setup::tools(&[("wrk", "wrk")], "the soak drives load with wrk")?;
            // SAFETY: set before any thread is spawned.
            unsafe {
                std::env::set_var("TRACER_BIN", &bin);
                std::env::set_var("TRACER_VENV", &venv);
            }
            soak::run(minutes)
        })(),
        Cmd::DropServer => bench::drop_server(),
        Cmd::Demo { scenario, timeout } => (|| {
            setup::require_root("cargo xtask demo")?;
            let bin = build()?;
            let venv = setup::venv()?;
            // SAFETY: set before any thread is spawned.
            unsafe { std::env::set_var("TRACER_VENV", &venv) };
            match scenario {
                demo::Scenario::Stall => demo::run(&bin, timeout),
                demo::Scenario::EarlyClose => {
                    setup::tools(
                        &[("nginx", "nginx")],
                        "the early-close demo (nginx in front of Gunicorn)",
                    )?;
                    demo::early_close(&bin)
                }
            }
        })(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_step_does_not_stop_the_ones_after_it() {
        let mut steps = Steps::default();
        let mut after = false;
        steps.run("first", || Ok(()));
        steps.run("second", || bail!("off by 2"));
        steps.run("third", || {
            after = true;
            Ok(())
        });
        steps.run("fourth", || bail!("also"));
        assert!(after, "the step after a failure ran");
        assert_eq!(steps.failed, ["second", "fourth"]);
        let e = steps.verdict().unwrap_err().to_string();
        assert_eq!(e, "2 of 4 test steps failed: second; fourth");
    }

    #[test]
    fn all_steps_passing_is_a_pass() {
        let mut steps = Steps::default();
        steps.run("only", || Ok(()));
        assert!(steps.verdict().is_ok());
    }

    #[test]
    fn every_e2e_file_is_found() {
        let files = e2e_test_files().unwrap();
        assert!(files.iter().any(|f| f == "exits"), "{files:?}");
        assert!(files.iter().all(|f| !f.ends_with(".rs")), "{files:?}");
        let mut sorted = files.clone();
        sorted.sort();
        assert_eq!(files, sorted);
    }
}
