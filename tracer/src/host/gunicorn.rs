//! A Gunicorn master's settings from every place Gunicorn reads them, in
//! Gunicorn's order (its config file, then GUNICORN_CMD_ARGS, then the
//! command line; its defaults last), each value with where it came from;
//! the Gunicorn version installed where it runs from; and a worker's class
//! inferred from what the worker does, when no setting names it.
//!
//! Files are read through the master's own root (/proc/PID/root), never
//! followed out of it (openat2 RESOLVE_IN_ROOT), only when they are regular
//! files (checked on an O_PATH descriptor before anything is opened for
//! reading: a device or a FIFO is never opened), capped in size, never
//! executed, and on a helper thread with a deadline (a hung mount).
use std::io::Read;
use std::time::{Duration, SystemTime};

use super::gunicorn_conf::{self, Key, Layer, Val};
use super::rootfs::{RootError, read_in_root};
use super::{bounded, proc, threads};
use crate::model::{LoopWait, MasterConfig, MasterSettings, Setting, SettingSource, WorkerClass};

/// How long one read of a master's files may take.
const DEADLINE: Duration = Duration::from_millis(500);
/// A config file larger than this is not read (its settings are unknown).
pub const MAX_CONFIG: usize = 256 * 1024;
/// Bytes of Gunicorn's `__init__.py` read, at most.
const MAX_INIT: usize = 64 * 1024;
/// Bytes of a process's environment read, at most.
const MAX_ENVIRON: u64 = 1024 * 1024;
/// Bytes of a worker's memory map read, at most.
const MAX_MAPS: u64 = 4 * 1024 * 1024;
/// Gunicorn's default config file, in the directory it starts in.
const DEFAULT_CONFIG: &str = "gunicorn.conf.py";

/// A place that could not be read (an environment cut by its cap, or not
/// read in time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NotRead;

/// The first value of `name` in an environment block (NUL-separated
/// `KEY=value`), as the C library's getenv finds it. Err when the block
/// was cut by the cap before any such entry: it might be further on.
pub fn environ_var(block: &[u8], name: &str, truncated: bool) -> Result<Option<String>, NotRead> {
    let want = format!("{name}=");
    let entries: Vec<&[u8]> = block.split(|b| *b == 0).collect();
    let last = entries.len().saturating_sub(1);
    for (i, e) in entries.iter().enumerate() {
        if truncated && i == last {
            break;
        }
        if let Some(v) = e.strip_prefix(want.as_bytes()) {
            return Ok(Some(String::from_utf8_lossy(v).into_owned()));
        }
    }
    if truncated { Err(NotRead) } else { Ok(None) }
}

/// The master's environment, bounded; None when not read in time.
fn environ(pid: u32) -> Option<(Vec<u8>, bool)> {
    let path = format!("/proc/{pid}/environ");
    bounded::call(DEADLINE, move || {
        let mut out = Vec::new();
        std::fs::File::open(path)
            .ok()?
            .take(MAX_ENVIRON + 1)
            .read_to_end(&mut out)
            .ok()?;
        let truncated = out.len() as u64 > MAX_ENVIRON;
        out.truncate(MAX_ENVIRON as usize);
        Some((out, truncated))
    })
    .ok()
    .flatten()
}

/// Where Gunicorn's options start in a master's argv: after `gunicorn`,
/// `python .../gunicorn` or `python -m gunicorn`. None when the command
/// line does not show them (a `gunicorn: master [...]` process title).
pub fn options_start(argv: &[String]) -> Option<usize> {
    let base = |s: &str| s.rsplit('/').next().unwrap_or(s).to_string();
    let first = argv.first()?;
    if base(first) == "gunicorn" {
        return Some(1);
    }
    if !base(first).starts_with("python") {
        return None;
    }
    let mut i = 1;
    while let Some(a) = argv.get(i) {
        if a == "-m" {
            return (argv.get(i + 1)? == "gunicorn").then_some(i + 2);
        }
        if !a.starts_with('-') {
            return (base(a) == "gunicorn").then_some(i + 1);
        }
        i += 1;
    }
    None
}

/// What the config file says, once found (or not).
#[derive(Debug, Clone, PartialEq)]
pub enum ConfigLayer {
    /// No config file: none named and no `gunicorn.conf.py` where it starts.
    None,
    Read {
        path: String,
        layer: Layer,
    },
    /// A config file whose settings are not known, and why.
    Unknown {
        path: Option<String>,
        why: String,
    },
}

/// The places Gunicorn reads settings from, as read; None: not readable.
#[derive(Debug, Clone, PartialEq)]
pub struct Layers {
    pub cmd: Option<Layer>,
    pub env: Option<Layer>,
    pub conf: ConfigLayer,
    /// WEB_CONCURRENCY, Gunicorn's default for `workers`; Err when the
    /// environment was not read.
    pub web_concurrency: Result<Option<String>, NotRead>,
}

/// What the places say about `k`, in Gunicorn's order: the command line
/// overrides GUNICORN_CMD_ARGS, which overrides the config file. Err: not
/// known (a place that could set it was not readable, or sets it to a
/// value not known). Ok(None): no place sets it.
fn lookup(l: &Layers, k: Key) -> Result<Option<(String, SettingSource)>, ()> {
    let conf = match &l.conf {
        ConfigLayer::None => Some(Layer {
            complete: true,
            ..Default::default()
        }),
        ConfigLayer::Read { layer, .. } => Some(layer.clone()),
        ConfigLayer::Unknown { .. } => None,
    };
    let places = [
        (l.cmd.as_ref(), SettingSource::CommandLine),
        (l.env.as_ref(), SettingSource::Environment),
        (conf.as_ref(), SettingSource::ConfigFile),
    ];
    for (layer, source) in places {
        let layer = layer.ok_or(())?;
        match layer.vals.get(&k) {
            Some(Val::Text(t)) => return Ok(Some((t.clone(), source))),
            Some(Val::Unknown) => return Err(()),
            None if !layer.complete => return Err(()),
            None => {}
        }
    }
    Ok(None)
}

fn count(l: &Layers, k: Key, default: u64) -> Option<Setting<u64>> {
    match lookup(l, k).ok()? {
        Some((t, source)) => gunicorn_conf::parse_count(&t).map(|value| Setting { value, source }),
        None => Some(Setting {
            value: default,
            source: SettingSource::Default,
        }),
    }
}

fn seconds(l: &Layers, k: Key, default: u64) -> Option<Setting<f64>> {
    count(l, k, default).map(|s| Setting {
        value: s.value as f64,
        source: s.source,
    })
}

/// `gunicorn.workers.ggevent.GeventWorker` -> `gevent`, and so on.
pub fn short_class(v: &str) -> String {
    let v = v.strip_prefix("egg:gunicorn#").unwrap_or(v);
    let lower = v.to_ascii_lowercase();
    let short = match lower.as_str() {
        _ if lower.contains("uvicorn") => "uvicorn",
        "gunicorn.workers.sync.syncworker" => "sync",
        "gunicorn.workers.gthread.threadworker" => "gthread",
        "gunicorn.workers.ggevent.geventworker" => "gevent",
        "gunicorn.workers.geventlet.eventletworker" => "eventlet",
        "gunicorn.workers.gtornado.tornadoworker" => "tornado",
        _ => v,
    };
    short.to_string()
}

/// The class Gunicorn runs: the one set (or its default, sync), except
/// that Gunicorn runs gthread for the sync class with threads above 1.
fn worker_class(l: &Layers, threads: Option<Setting<u64>>) -> Option<WorkerClass> {
    let (name, source) = match lookup(l, Key::WorkerClass).ok()? {
        Some((t, source)) => (short_class(&t), source),
        None => ("sync".to_string(), SettingSource::Default),
    };
    if name != "sync" {
        return Some(WorkerClass {
            name,
            source,
            evidence: None,
        });
    }
    let threads = threads?;
    if threads.value <= 1 {
        return Some(WorkerClass {
            name,
            source,
            evidence: None,
        });
    }
    Some(WorkerClass {
        name: "gthread".into(),
        source,
        evidence: Some(format!(
            "threads {} ({}) with the sync class: Gunicorn runs gthread",
            threads.value,
            threads.source.words()
        )),
    })
}

/// Every setting, from what the places say (pure: tested on synthetic
/// layers).
pub fn resolve(l: &Layers) -> MasterConfig {
    let threads = count(l, Key::Threads, 1);
    let workers = match lookup(l, Key::Workers) {
        Ok(Some((t, source))) => {
            gunicorn_conf::parse_count(&t).map(|value| Setting { value, source })
        }
        Ok(None) => match &l.web_concurrency {
            Ok(Some(w)) => gunicorn_conf::parse_count(w).map(|value| Setting {
                value,
                source: SettingSource::Environment,
            }),
            Ok(None) => Some(Setting {
                value: 1,
                source: SettingSource::Default,
            }),
            Err(NotRead) => None,
        },
        Err(()) => None,
    };
    let (config_file, config_error) = match &l.conf {
        ConfigLayer::None => (None, None),
        ConfigLayer::Read { path, layer } => (
            Some(path.clone()),
            (!layer.complete).then(|| {
                "it may set settings its text does not show (import *, exec, globals()): those not assigned there are unknown".to_string()
            }),
        ),
        ConfigLayer::Unknown { path, why } => (path.clone(), Some(why.clone())),
    };
    let settings = MasterSettings {
        timeout: seconds(l, Key::Timeout, 30),
        keepalive: seconds(l, Key::Keepalive, 2),
        graceful_timeout: seconds(l, Key::GracefulTimeout, 30),
        max_requests_setting: count(l, Key::MaxRequests, 0),
        threads,
        worker_connections: count(l, Key::WorkerConnections, 1000),
        workers,
        gunicorn_version: None,
        keepalive_s: None,
        max_requests: None,
    }
    .with_shortcuts();
    MasterConfig {
        settings,
        worker_class: worker_class(l, threads),
        config_file,
        config_error,
    }
}

/// A path in the master's root: absolute, or relative to its working
/// directory. None when the working directory is not known.
fn in_cwd(pid: u32, path: &str) -> Option<String> {
    if path.starts_with('/') {
        return Some(path.to_string());
    }
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).ok()?;
    let cwd = cwd.to_str()?;
    if !cwd.starts_with('/') || cwd.ends_with(" (deleted)") {
        return None;
    }
    Some(format!("{}/{path}", cwd.trim_end_matches('/')))
}

/// When the master started, by the wall clock.
fn started_at(pid: u32) -> Option<SystemTime> {
    let age = threads::process_age_ms(pid)?;
    SystemTime::now().checked_sub(Duration::from_millis(age))
}

/// The config file Gunicorn read, found as Gunicorn finds it: `-c` on the
/// command line, else in GUNICORN_CMD_ARGS, else `gunicorn.conf.py` in the
/// directory it started in.
fn config_layer(pid: u32, cmd: Option<&Layer>, env: Option<&Layer>) -> ConfigLayer {
    let unknown = |path: Option<&str>, why: &str| ConfigLayer::Unknown {
        path: path.map(str::to_string),
        why: why.to_string(),
    };
    let (Some(cmd), Some(env)) = (cmd, env) else {
        return unknown(
            None,
            "which config file Gunicorn read is not known (its command line or environment was not read)",
        );
    };
    let named = match (cmd.vals.get(&Key::Config), env.vals.get(&Key::Config)) {
        (Some(Val::Unknown), _) | (None, Some(Val::Unknown)) => {
            return unknown(None, "which config file Gunicorn read is not known");
        }
        (Some(Val::Text(c)), _) | (None, Some(Val::Text(c))) => Some(c.clone()),
        (None, None) => None,
    };
    if named.as_deref().is_some_and(|c| c.starts_with("python:")) {
        return unknown(named.as_deref(), "a python: module, not read");
    }
    let path = named
        .as_deref()
        .map(|c| c.strip_prefix("file:").unwrap_or(c).to_string())
        .unwrap_or_else(|| DEFAULT_CONFIG.to_string());
    let relative = !path.starts_with('/');
    // --chdir moves the master after it has read its config file: its
    // working directory is no longer the one a relative path was from.
    let moved = [cmd, env].iter().any(|l| l.vals.contains_key(&Key::Chdir));
    if relative && moved {
        return unknown(
            Some(&path),
            "a relative path, and --chdir moved the master since it read it",
        );
    }
    let Some(full) = in_cwd(pid, &path) else {
        return unknown(Some(&path), "the master's working directory is not known");
    };
    let file = match read_in_root(pid, &full, MAX_CONFIG) {
        Ok(f) => f,
        // Gunicorn reads its default file only when it exists.
        Err(RootError::Missing) if named.is_none() => return ConfigLayer::None,
        Err(RootError::Missing) => return unknown(Some(&full), "no longer there"),
        Err(RootError::Other(e)) => return unknown(Some(&full), &e),
    };
    // Slack for clocks read at different times.
    let changed = match (file.mtime, started_at(pid)) {
        (Some(m), Some(s)) => m > s + Duration::from_secs(1),
        _ => true,
    };
    if changed {
        return unknown(
            Some(&full),
            "changed since the master started (or when is not known): it may not be what Gunicorn read",
        );
    }
    let layer = gunicorn_conf::parse_config(&String::from_utf8_lossy(&file.bytes));
    if relative && layer.vals.contains_key(&Key::Chdir) {
        return unknown(
            Some(&full),
            "a relative path, and the file sets chdir: the master may have started elsewhere",
        );
    }
    ConfigLayer::Read { path: full, layer }
}

/// A master's settings, from its command line, its environment and its
/// config file, with the Gunicorn version it runs.
pub fn read_config(pid: u32) -> MasterConfig {
    let argv = proc::cmdline(pid);
    let cmd = options_start(&argv).map(|i| gunicorn_conf::parse_args(&argv[i..]));
    let environ = environ(pid);
    let var = |name: &str| match &environ {
        Some((block, cut)) => environ_var(block, name, *cut),
        None => Err(NotRead),
    };
    let env = match var("GUNICORN_CMD_ARGS") {
        Ok(None) => Some(Layer {
            complete: true,
            ..Default::default()
        }),
        Ok(Some(args)) => gunicorn_conf::shell_split(&args).map(|a| gunicorn_conf::parse_args(&a)),
        Err(NotRead) => None,
    };
    let conf = config_layer(pid, cmd.as_ref(), env.as_ref());
    let layers = Layers {
        cmd,
        env,
        conf,
        web_concurrency: var("WEB_CONCURRENCY"),
    };
    let mut s = resolve(&layers);
    // PYTHONPATH comes before site-packages: the version read there might
    // not be the one imported.
    let shadowed = match var("PYTHONPATH") {
        Ok(None) => false,
        Ok(Some(p)) => !p.is_empty(),
        Err(NotRead) => true,
    };
    if !shadowed {
        s.settings.gunicorn_version = installed_version(pid, &argv);
    }
    s
}

/// `pythonX.Y` from a venv's `pyvenv.cfg` (`version = 3.11.7`, or uv's
/// `version_info`).
pub fn python_dir_from_pyvenv(cfg: &str) -> Option<String> {
    cfg.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        if !matches!(k.trim(), "version" | "version_info") {
            return None;
        }
        let mut it = v.trim().split('.');
        let (major, minor) = (
            it.next()?.parse::<u32>().ok()?,
            it.next()?.parse::<u32>().ok()?,
        );
        Some(format!("python{major}.{minor}"))
    })
}

/// `python3.11` from an interpreter's path, when its name says.
fn python_dir_from_exe(exe: &str) -> Option<String> {
    let base = exe.rsplit('/').next()?;
    let rest = base.strip_prefix("python")?;
    let (major, minor) = rest.split_once('.')?;
    (major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok()).then(|| base.to_string())
}

/// The installation prefix Gunicorn runs from: the directory above the
/// `gunicorn` script's (a venv's `bin/gunicorn`), or above the interpreter
/// of `python -m gunicorn` when given by absolute path. None otherwise.
pub fn install_prefix(argv: &[String]) -> Option<String> {
    let start = options_start(argv)?;
    let launcher = argv.get(start.checked_sub(1)?)?;
    let path = if launcher == "gunicorn" && start >= 2 && argv[start - 2] == "-m" {
        argv.first()?
    } else {
        launcher
    };
    if !path.starts_with('/') {
        return None;
    }
    let bin = path.rsplit_once('/')?.0;
    let prefix = bin.rsplit_once('/')?.0;
    (!prefix.is_empty() && !prefix.contains("/../") && !prefix.ends_with("/.."))
        .then(|| prefix.to_string())
}

/// The Gunicorn version installed in the master's prefix, from its
/// `gunicorn/__init__.py`; never imported.
fn installed_version(pid: u32, argv: &[String]) -> Option<(u32, u32, u32)> {
    let prefix = install_prefix(argv)?;
    let pyvenv = read_in_root(pid, &format!("{prefix}/pyvenv.cfg"), 4096).ok();
    let py = match &pyvenv {
        Some(f) => python_dir_from_pyvenv(&String::from_utf8_lossy(&f.bytes))?,
        None => {
            let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok()?;
            python_dir_from_exe(exe.to_str()?)?
        }
    };
    let mut dirs = vec![format!("{prefix}/lib/{py}/site-packages")];
    if pyvenv.is_none() {
        // Debian's layout: pip's and the packages'.
        dirs.push(format!("{prefix}/local/lib/{py}/dist-packages"));
        dirs.push(format!("{prefix}/lib/{py}/dist-packages"));
        dirs.push(format!("{prefix}/lib/python3/dist-packages"));
    }
    for d in dirs {
        match read_in_root(pid, &format!("{d}/gunicorn/__init__.py"), MAX_INIT) {
            Ok(f) => return gunicorn_conf::parse_version(&String::from_utf8_lossy(&f.bytes)),
            Err(RootError::Missing) => continue,
            Err(RootError::Other(_)) => return None,
        }
    }
    None
}

/// Whether a memory map holds gevent's event loop (its libev or libuv
/// extension).
pub fn maps_show_gevent_loop(maps: &str) -> Option<String> {
    maps.lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.contains("/gevent/libev/") || p.contains("/gevent/libuv/"))
        .map(str::to_string)
}

/// What a worker's class is, from what it does: its loop's own wait, and
/// for an epoll loop the libraries it has loaded. None when that does not
/// tell (gthread, Uvicorn and others all wait in epoll).
pub fn infer_class(pid: u32, wait: LoopWait) -> Option<WorkerClass> {
    let inferred = |name: &str, evidence: String| WorkerClass {
        name: name.to_string(),
        source: SettingSource::Inferred,
        evidence: Some(evidence),
    };
    match wait {
        LoopWait::Select { nfds, .. } => Some(inferred(
            "sync",
            format!(
                "its main thread waits in select() over all its listening sockets ({nfds} fds), as Gunicorn's sync worker does"
            ),
        )),
        LoopWait::Epoll { epfd } => {
            let path = format!("/proc/{pid}/maps");
            let maps = bounded::call(DEADLINE, move || {
                proc::read_capped(std::path::Path::new(&path), MAX_MAPS)
            })
            .ok()
            .flatten()?;
            let lib = maps_show_gevent_loop(&String::from_utf8_lossy(&maps))?;
            let lib = lib.rsplit('/').take(3).collect::<Vec<_>>();
            let lib: Vec<&str> = lib.into_iter().rev().collect();
            Some(inferred(
                "gevent",
                format!(
                    "its loop waits in epoll_wait() on fd {epfd} and gevent's event loop ({}) is loaded",
                    lib.join("/")
                ),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::gunicorn_conf::{parse_args, parse_config};

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn layers(cmd: &[&str], env: &[&str], conf: Option<&str>) -> Layers {
        Layers {
            cmd: Some(parse_args(&v(cmd))),
            env: Some(parse_args(&v(env))),
            conf: match conf {
                Some(text) => ConfigLayer::Read {
                    path: "/app/gunicorn.conf.py".into(),
                    layer: parse_config(text),
                },
                None => ConfigLayer::None,
            },
            web_concurrency: Ok(None),
        }
    }

    fn timeout(c: &MasterConfig) -> Option<(f64, SettingSource)> {
        c.settings.timeout.map(|t| (t.value, t.source))
    }

    #[test]
    fn gunicorns_order_config_file_then_environment_then_command_line() {
        let conf = "timeout = 60\nkeepalive = 5\nworker_class = 'gevent'\n";
        let c = resolve(&layers(&["app:app"], &[], Some(conf)));
        assert_eq!(timeout(&c), Some((60.0, SettingSource::ConfigFile)));
        assert_eq!(c.settings.keepalive_s, Some(5.0));
        assert_eq!(c.worker_class.as_ref().unwrap().name, "gevent");
        let c = resolve(&layers(&["app:app"], &["-t", "7"], Some(conf)));
        assert_eq!(timeout(&c), Some((7.0, SettingSource::Environment)));
        let c = resolve(&layers(&["-t", "9", "app:app"], &["-t", "7"], Some(conf)));
        assert_eq!(timeout(&c), Some((9.0, SettingSource::CommandLine)));
        // Nothing sets it: Gunicorn's default, marked as assumed.
        let c = resolve(&layers(&["app:app"], &[], None));
        assert_eq!(timeout(&c), Some((30.0, SettingSource::Default)));
        assert_eq!(
            c.settings.keepalive_s, None,
            "the default is not a read keep-alive"
        );
        let class = c.worker_class.clone().unwrap();
        assert_eq!(
            (class.name.as_str(), class.source),
            ("sync", SettingSource::Default)
        );
        assert!(c.known_class().is_none(), "an assumed class is not known");
    }

    #[test]
    fn a_place_not_read_makes_what_it_could_set_unknown() {
        // A computed timeout in the config file: unknown, not 30.
        let c = resolve(&layers(&["app:app"], &[], Some("timeout = int(T)\n")));
        assert_eq!(timeout(&c), None);
        // ... unless a place read later sets it.
        let c = resolve(&layers(&["-t", "3"], &[], Some("timeout = int(T)\n")));
        assert_eq!(timeout(&c), Some((3.0, SettingSource::CommandLine)));
        // A config file that may set anything: only what it assigns is known.
        let c = resolve(&layers(
            &["a:b"],
            &[],
            Some("from base import *\nkeepalive = 4\n"),
        ));
        assert_eq!(timeout(&c), None);
        assert_eq!(c.settings.keepalive_s, Some(4.0));
        assert!(c.config_error.is_some());
        // A config file not read, an environment not read, a command line
        // hidden behind a process title.
        let mut l = layers(&["a:b"], &[], None);
        l.conf = ConfigLayer::Unknown {
            path: None,
            why: "a python: module, not read".into(),
        };
        let c = resolve(&l);
        assert_eq!((timeout(&c), c.worker_class.clone()), (None, None));
        assert_eq!(
            c.config_error.as_deref(),
            Some("a python: module, not read")
        );
        let mut l = layers(&["a:b"], &[], None);
        l.env = None;
        l.web_concurrency = Err(NotRead);
        let c = resolve(&l);
        assert_eq!((timeout(&c), c.settings.workers), (None, None));
        let mut l = layers(&[], &[], None);
        l.cmd = None;
        assert_eq!(timeout(&resolve(&l)), None);
    }

    #[test]
    fn threads_turn_the_sync_class_into_gthread() {
        let c = resolve(&layers(&["--threads", "4", "a:b"], &[], None));
        let class = c.worker_class.unwrap();
        assert_eq!(class.name, "gthread");
        assert!(class.evidence.unwrap().contains("threads 4"));
        let c = resolve(&layers(&["-k", "sync", "a:b"], &[], Some("threads = n\n")));
        assert_eq!(c.worker_class, None, "threads unknown: sync or gthread");
        let c = resolve(&layers(&["-k", "gevent", "--threads", "4"], &[], None));
        assert_eq!(c.worker_class.unwrap().name, "gevent");
        let mut l = layers(&["a:b"], &[], None);
        l.web_concurrency = Ok(Some("3".into()));
        let w = resolve(&l).settings.workers.unwrap();
        assert_eq!((w.value, w.source), (3, SettingSource::Environment));
    }

    #[test]
    fn where_gunicorns_options_start_and_where_it_is_installed() {
        let script = v(&[
            "/venv/bin/python3",
            "/venv/bin/gunicorn",
            "-c",
            "x.py",
            "a:b",
        ]);
        assert_eq!(options_start(&script), Some(2));
        assert_eq!(install_prefix(&script).as_deref(), Some("/venv"));
        let module = v(&["/opt/py/bin/python3.12", "-u", "-m", "gunicorn", "a:b"]);
        assert_eq!(options_start(&module), Some(4));
        assert_eq!(install_prefix(&module).as_deref(), Some("/opt/py"));
        assert_eq!(
            install_prefix(&v(&["python3", "-m", "gunicorn"])),
            None,
            "PATH lookup"
        );
        assert_eq!(
            options_start(&v(&["gunicorn: master [a:b]"])),
            None,
            "a process title"
        );
        assert_eq!(options_start(&v(&["python3", "-m", "http.server"])), None);
        assert_eq!(
            install_prefix(&v(&["/x/../bin/python", "/a/../bin/gunicorn"])),
            None
        );
        assert_eq!(
            python_dir_from_pyvenv("home = /usr/bin\nversion = 3.11.7\n").as_deref(),
            Some("python3.11")
        );
        assert_eq!(
            python_dir_from_pyvenv("version_info = 3.13.0.final.0\n").as_deref(),
            Some("python3.13")
        );
        assert_eq!(python_dir_from_pyvenv("version = three\n"), None);
        assert_eq!(
            python_dir_from_exe("/usr/bin/python3.11").as_deref(),
            Some("python3.11")
        );
        assert_eq!(python_dir_from_exe("/usr/bin/python3"), None);
        assert_eq!(
            short_class("gunicorn.workers.ggevent.GeventWorker"),
            "gevent"
        );
        assert_eq!(short_class("egg:gunicorn#sync"), "sync");
        assert_eq!(short_class("uvicorn_worker.UvicornWorker"), "uvicorn");
        assert_eq!(short_class("my.Worker"), "my.Worker");
    }

    #[test]
    fn environment_entries_as_getenv_finds_them() {
        let block = b"A=1\0GUNICORN_CMD_ARGS=-t 7\0GUNICORN_CMD_ARGS=-t 9\0B=";
        assert_eq!(
            environ_var(block, "GUNICORN_CMD_ARGS", false),
            Ok(Some("-t 7".into()))
        );
        assert_eq!(environ_var(block, "GUNICORN", false), Ok(None));
        // Cut by the cap: the last entry may be partial, and a later one unseen.
        assert_eq!(
            environ_var(b"A=1\0GUNICORN_CMD_AR", "GUNICORN_CMD_ARGS", true),
            Err(NotRead)
        );
        assert_eq!(
            environ_var(b"GUNICORN_CMD_ARGS=-t 7\0B=2", "GUNICORN_CMD_ARGS", true),
            Ok(Some("-t 7".into()))
        );
    }

    #[test]
    fn gevents_loop_in_a_memory_map() {
        let maps = "7f00-7f10 r-xp 0 08:01 12 /venv/lib/python3.11/site-packages/gevent/libev/corecext.cpython-311-x86_64-linux-gnu.so\n";
        assert!(maps_show_gevent_loop(maps).is_some());
        let other = "7f00-7f10 r-xp 0 08:01 12 /venv/lib/python3.11/site-packages/greenlet/_greenlet.so\n7f00-7f10 r-xp 0 08:01 12 /home/gevent/libevent.so\n";
        assert_eq!(maps_show_gevent_loop(other), None);
        assert_eq!(maps_show_gevent_loop(""), None);
    }
}
