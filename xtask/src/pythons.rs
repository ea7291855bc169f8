//! `cargo xtask test --pythons`: the stack end-to-end tests
//! (tests/tests/py_versions.rs: a stall's stack names the app's function,
//! for the sync, gthread, gevent and Uvicorn workers) on every CPython
//! 3.9-3.13 the machine's pyenv has, each in a virtualenv of its own under
//! target/pythons/<version> with the project's pinned packages.
//!
//! A fresh machine is only promised 3.11 (the project's venv, which CI
//! uses); the others run when present, and what did not run is said:
//! a version not installed, or a package that does not install on it (then
//! only the tests that need that package are skipped).
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, bail};

use crate::{cargo, root, setup, step};

/// The CPython minors issue 19 promises stacks for.
const MINORS: &[u32] = &[9, 10, 11, 12, 13];

/// The tests of tests/tests/py_versions.rs, each with the worker class it
/// proves (`gevent:queue`: the demo's multiprocessing.Queue cause, cited from
/// its frame) and the packages (PyPI names) it cannot run without.
const TESTS: &[(&str, &str, &[&str])] = &[
    (
        "a_sync_worker_stall_names_the_app_function",
        "sync",
        &["gunicorn"],
    ),
    (
        "a_gthread_pool_thread_stall_names_the_app_function_and_every_thread_its_tid",
        "gthread",
        &["gunicorn"],
    ),
    (
        "a_gevent_worker_stall_names_the_app_function",
        "gevent",
        // Gunicorn's gevent worker imports packaging.
        &["gunicorn", "gevent", "packaging"],
    ),
    (
        "a_gevent_queue_hang_is_caused_by_its_queue_get_frame",
        "gevent:queue",
        &["gunicorn", "gevent", "packaging"],
    ),
    (
        "a_uvicorn_worker_stall_names_the_app_function",
        "uvicorn",
        &["gunicorn", "uvicorn", "uvicorn-worker"],
    ),
];

/// A CPython found: its version and interpreter.
#[derive(Debug, Clone, PartialEq)]
struct Python {
    version: String,
    minor: u32,
    bin: PathBuf,
}

/// "3.M.P" with numbers only (no "3.13.0t", "3.12-dev", "pypy..."):
/// (minor, patch).
fn parse_version(name: &str) -> Option<(u32, u32)> {
    let mut it = name.split('.');
    let (major, minor, patch) = (it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || major != "3" {
        return None;
    }
    Some((minor.parse().ok()?, patch.parse().ok()?))
}

/// The newest patch release of each wanted minor among `names` (pyenv's
/// version directories); the minors with none.
fn pick_versions(names: &[String], wanted: &[u32]) -> (Vec<(u32, String)>, Vec<u32>) {
    let mut found = Vec::new();
    let mut missing = Vec::new();
    for &m in wanted {
        let best = names
            .iter()
            .filter_map(|n| parse_version(n).map(|(mi, p)| (mi, p, n)))
            .filter(|(mi, _, _)| *mi == m)
            .max_by_key(|(_, p, _)| *p);
        match best {
            Some((_, _, n)) => found.push((m, n.clone())),
            None => missing.push(m),
        }
    }
    (found, missing)
}

fn pyenv_versions_dir() -> PathBuf {
    std::env::var_os("PYENV_ROOT")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".pyenv")))
        .unwrap_or_else(|| PathBuf::from("/root/.pyenv"))
        .join("versions")
}

/// The CPythons to run on, and the minors skipped with why.
fn find_pythons() -> Result<(Vec<Python>, Vec<String>)> {
    let dir = pyenv_versions_dir();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default();
    let (found, missing) = pick_versions(&names, MINORS);
    let mut pythons: Vec<Python> = found
        .into_iter()
        .map(|(minor, v)| Python {
            bin: dir.join(&v).join("bin/python3"),
            version: v,
            minor,
        })
        .filter(|p| p.bin.exists())
        .collect();
    let mut skipped = Vec::new();
    for m in missing {
        if m == 11 {
            // 3.11 always: the project's own venv (Debian 12's python3).
            let venv = setup::venv()?;
            let bin = venv.join("bin/python");
            let version = version_of(&bin)?;
            pythons.push(Python {
                version,
                minor: 11,
                bin,
            });
        } else {
            skipped.push(format!(
                "3.{m}: not present (no 3.{m}.N under {})",
                dir.display()
            ));
        }
    }
    pythons.sort_by_key(|p| p.minor);
    Ok((pythons, skipped))
}

fn version_of(python: &Path) -> Result<String> {
    let out = Command::new(python)
        .args(["-c", "import sys; print(sys.version.split()[0])"])
        .output()
        .with_context(|| format!("running {}", python.display()))?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A pin's PyPI name ("gunicorn==27.0.1" -> "gunicorn").
fn name_of(pin: &str) -> &str {
    pin.split("==").next().unwrap_or(pin)
}

/// Whether `pin` is installed in the venv of `py` (its version when pinned).
fn installed(py: &Path, pin: &str) -> bool {
    let (name, want) = match pin.split_once("==") {
        Some((n, v)) => (n, Some(v)),
        None => (pin, None),
    };
    let check = format!(
        "import importlib.metadata as m, sys; v = m.version({name:?}); sys.exit(0 if {} else 1)",
        want.map_or("True".to_string(), |w| format!("v == {w:?}"))
    );
    Command::new(py)
        .args(["-c", &check])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// How one of the project's pins ended up in a version's venv.
#[derive(Debug, Clone, PartialEq)]
enum Install {
    /// The pinned version (or, unpinned, any).
    Pinned,
    /// The pin does not install on this Python (PyPI has no such release
    /// for it); the newest release that does is used: this version.
    Instead(String),
    /// Neither installs: pip's last words.
    Failed(String),
}

/// The installed version of `name` in the venv of `py`.
fn version_in(py: &Path, name: &str) -> Option<String> {
    let out = Command::new(py)
        .args([
            "-c",
            &format!("import importlib.metadata as m; print(m.version({name:?}))"),
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

fn pip_install(dir: &Path, what: &str) -> Result<std::result::Result<(), String>> {
    let out = Command::new(dir.join("bin/pip"))
        .args(["install", "--quiet", "--disable-pip-version-check", what])
        .output()
        .with_context(|| format!("running pip of {}", dir.display()))?;
    if out.status.success() {
        return Ok(Ok(()));
    }
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or("pip said nothing")
        .trim();
    Ok(Err(last.chars().take(200).collect()))
}

/// The venv of `p` under target/pythons/<version>, with each of the
/// project's pins installed one at a time, so one that does not install on
/// this Python is named and the others still are. A pin PyPI has no
/// release of for this Python (gunicorn 27 and gevent 26.9 need 3.10+) is
/// replaced by the newest release that installs, and said: the tests then
/// prove the tracer on that Python with that package, not with the pin.
fn venv_for(p: &Python) -> Result<(PathBuf, Vec<(String, Install)>)> {
    if p.bin.starts_with(root().join("target/venv")) {
        // The project's venv: `cargo xtask setup` made it with every pin.
        let all = setup::PY_PACKAGES
            .iter()
            .map(|pin| (pin.to_string(), Install::Pinned))
            .collect();
        return Ok((root().join("target/venv"), all));
    }
    let dir = root().join("target/pythons").join(&p.version);
    let py = dir.join("bin/python");
    if !py.exists() {
        step(&format!(
            "creating the virtualenv {} (CPython {})",
            dir.display(),
            p.version
        ));
        crate::run(Command::new(&p.bin).arg("-m").arg("venv").arg(&dir))?;
    }
    let mut got = Vec::new();
    for pin in setup::PY_PACKAGES {
        let name = name_of(pin);
        let how = if installed(&py, pin) {
            Install::Pinned
        } else {
            step(&format!("installing {pin} into {}", dir.display()));
            match pip_install(&dir, pin)? {
                Ok(()) if installed(&py, pin) => Install::Pinned,
                Ok(()) => Install::Failed(format!("pip installed something else than {pin}")),
                Err(why) => match pip_install(&dir, name)? {
                    Ok(()) => match version_in(&py, name) {
                        Some(v) => Install::Instead(v),
                        None => Install::Failed(why),
                    },
                    Err(_) => Install::Failed(why),
                },
            }
        };
        got.push((pin.to_string(), how));
    }
    Ok((dir, got))
}

/// What the venv's packages say, for the report: "name==version" of each
/// pin, with the ones not as pinned marked.
fn describe(got: &[(String, Install)]) -> Vec<String> {
    got.iter()
        .filter_map(|(pin, how)| match how {
            Install::Pinned => None,
            Install::Instead(v) => Some(format!(
                "{pin} has no release for it: {}=={v} (the newest that installs) instead",
                name_of(pin)
            )),
            Install::Failed(why) => Some(format!("{pin} could not be installed ({why})")),
        })
        .collect()
}

/// The packages of `needs` among the pins that failed.
fn missing_for<'a>(needs: &[&str], got: &'a [(String, Install)]) -> Vec<&'a str> {
    got.iter()
        .filter(|(_, how)| matches!(how, Install::Failed(_)))
        .map(|(pin, _)| name_of(pin))
        .filter(|n| needs.contains(n))
        .collect()
}

/// One test on one venv, its output kept in `log`: whether it ran and passed.
fn run_one(bin: &Path, venv: &Path, test: &str, log: &Path) -> Result<bool> {
    let file = std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let status = cargo()
        .current_dir(root())
        .args(["test", "--release", "-p", "tests", "--test", "py_versions"])
        .args(["--", "--test-threads=1", "--exact", test])
        .env("TRACER_BIN", bin)
        .env("TRACER_VENV", venv)
        .stdout(file.try_clone()?)
        .stderr(file)
        .status()
        .context("running cargo test")?;
    // A name that matched no test would pass with nothing run.
    let ran = std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains("test result: ok. 1 passed;");
    Ok(status.success() && ran)
}

fn tail(log: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

pub fn run(bin: &Path, filter: Option<&str>) -> Result<()> {
    let (pythons, mut skipped) = find_pythons()?;
    let tests: Vec<_> = TESTS
        .iter()
        .filter(|(name, class, _)| filter.is_none_or(|f| name.contains(f) || *class == f))
        .collect();
    if tests.is_empty() {
        bail!("no test of tests/tests/py_versions.rs matches {filter:?}");
    }
    // Build the test binary once, before any run is timed.
    crate::run(cargo().current_dir(root()).args([
        "test",
        "--release",
        "-p",
        "tests",
        "--test",
        "py_versions",
        "--no-run",
    ]))?;
    let mut results: Vec<(String, &str, &str)> = Vec::new();
    let mut substituted = Vec::new();
    let mut failures = Vec::new();
    for p in &pythons {
        let (venv, got) = venv_for(p)?;
        let notes = describe(&got);
        for n in &notes {
            println!("{:<8} {n}", p.version);
        }
        substituted.extend(notes.iter().map(|n| format!("{}: {n}", p.version)));
        for (name, class, needs) in &tests {
            let missing = missing_for(needs, &got);
            if !missing.is_empty() {
                let line = format!(
                    "{:<8} {class:<12} skipped: {} not installed",
                    p.version,
                    missing.join(", ")
                );
                println!("{line}");
                skipped.push(format!(
                    "{} {class}: needs {}",
                    p.version,
                    missing.join(", ")
                ));
                results.push((p.version.clone(), class, "skipped"));
                continue;
            }
            let log = venv.join(format!("{class}.log"));
            let t0 = Instant::now();
            let ok = run_one(bin, &venv, name, &log)?;
            let took = t0.elapsed().as_secs_f64();
            let verdict = if ok { "passed" } else { "FAILED" };
            println!(
                "{:<8} {class:<12} {verdict} in {took:.1}s ({name})",
                p.version
            );
            if !ok {
                println!("{}\n    (whole output: {})", tail(&log, 30), log.display());
                failures.push(format!("{} {class}", p.version));
            }
            results.push((p.version.clone(), class, verdict));
        }
    }
    println!("\nCPython  class        result");
    for (v, class, r) in &results {
        println!("{v:<8} {class:<12} {r}");
    }
    if !substituted.is_empty() {
        println!("\npackages not as pinned:");
        for s in &substituted {
            println!("    {s}");
        }
    }
    if skipped.is_empty() {
        println!("\nnothing skipped");
    } else {
        println!("\nskipped:");
        for s in &skipped {
            println!("    {s}");
        }
    }
    if !failures.is_empty() {
        bail!("{} failure(s): {}", failures.len(), failures.join("; "));
    }
    step(&format!(
        "every stack test passed on CPython {}",
        pythons
            .iter()
            .map(|p| p.version.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_patch_of_each_minor_is_run_and_the_others_are_said_missing() {
        let names: Vec<String> = [
            "2.7.18",
            "3.6.15",
            "3.9.2",
            "3.9.18",
            "3.10.13",
            "3.13.0t",
            "3.13.0",
            "3.12-dev",
            "pypy3.10-7.3.12",
            "3.9.x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (found, missing) = pick_versions(&names, MINORS);
        assert_eq!(
            found,
            vec![
                (9, "3.9.18".to_string()),
                (10, "3.10.13".to_string()),
                (13, "3.13.0".to_string())
            ]
        );
        assert_eq!(missing, vec![11, 12]);
    }

    #[test]
    fn a_test_is_skipped_only_for_a_package_it_needs() {
        let got = vec![
            (
                "gunicorn==27.0.1".to_string(),
                Install::Instead("23.0.0".into()),
            ),
            (
                "gevent==26.9.0".to_string(),
                Install::Failed("no wheel".into()),
            ),
            ("uvicorn==0.54.0".to_string(), Install::Pinned),
            (
                "psycopg2-binary==2.9.13".to_string(),
                Install::Failed("no wheel".into()),
            ),
        ];
        let needs = |class: &str| TESTS.iter().find(|t| t.1 == class).unwrap().2;
        assert_eq!(missing_for(needs("gevent"), &got), vec!["gevent"]);
        assert!(missing_for(needs("sync"), &got).is_empty());
        assert!(missing_for(needs("uvicorn"), &got).is_empty());
        let said = describe(&got);
        assert_eq!(said.len(), 3, "{said:?}");
        assert!(said[0].contains("gunicorn==23.0.0"), "{said:?}");
        assert!(
            said[1].contains("gevent==26.9.0 could not be installed (no wheel)"),
            "{said:?}"
        );
    }

    #[test]
    fn every_test_named_here_is_in_py_versions_rs() {
        let src = std::fs::read_to_string(root().join("tests/tests/py_versions.rs")).unwrap();
        for (name, _, needs) in TESTS {
            assert!(src.contains(&format!("fn {name}()")), "{name}");
            for n in *needs {
                assert!(
                    setup::PY_PACKAGES.iter().any(|p| name_of(p) == *n),
                    "{n} is one of the project's pins"
                );
            }
        }
    }
}
