//! Gunicorn's settings as the tracer knows them: each value with where it
//! came from, so that a value Gunicorn's default supplies is never printed
//! as if it had been read. JSON: a setting `x` is written as `x` (its
//! value, null when not known) and `x_source` (docs/events.md).
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};

/// Where the value of a Gunicorn setting came from. Gunicorn's own order
/// applies: the config file, then GUNICORN_CMD_ARGS, then the command line
/// (each overrides the one before); its default when none of them says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SettingSource {
    CommandLine,
    /// GUNICORN_CMD_ARGS in the master's environment.
    Environment,
    /// A literal assignment in the config file (`timeout = 60`).
    ConfigFile,
    /// Not set anywhere the tracer reads, but seen in what the worker does
    /// (the worker class only; the evidence says what).
    Inferred,
    /// Assumed: every place Gunicorn reads settings from was read and none
    /// sets it, so Gunicorn's default applies.
    Default,
}

impl SettingSource {
    /// As in JSON (`x_source`) and the metrics' `source` label.
    pub fn as_str(self) -> &'static str {
        match self {
            SettingSource::CommandLine => "command_line",
            SettingSource::Environment => "environment",
            SettingSource::ConfigFile => "config_file",
            SettingSource::Inferred => "inferred",
            SettingSource::Default => "default",
        }
    }

    /// Words for the text view: "from the config file", "Gunicorn's
    /// default, not read".
    pub fn words(self) -> &'static str {
        match self {
            SettingSource::CommandLine => "from the command line",
            SettingSource::Environment => "from GUNICORN_CMD_ARGS",
            SettingSource::ConfigFile => "from the config file",
            SettingSource::Inferred => "inferred",
            SettingSource::Default => "Gunicorn's default, not read",
        }
    }
}

/// A setting's value and where it came from. A setting whose value is not
/// known (set where the tracer cannot read it, such as a computed value in
/// the config file) is `None` wherever a `Setting` is expected.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Setting<T> {
    pub value: T,
    pub source: SettingSource,
}

impl<T> Setting<T> {
    pub fn new(value: T, source: SettingSource) -> Setting<T> {
        Setting { value, source }
    }
}

impl<T: Copy> Setting<T> {
    /// The value, when something set it (not Gunicorn's default assumed).
    pub fn read(&self) -> Option<T> {
        (self.source != SettingSource::Default).then_some(self.value)
    }
}

/// A Gunicorn worker class and how it is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerClass {
    /// `sync`, `gthread`, `gevent`, `eventlet`, `tornado`, `uvicorn`
    /// (Uvicorn's worker), or the class path as given.
    pub name: String,
    pub source: SettingSource,
    /// What the class was deduced from, when not named by a setting alone:
    /// what the worker was seen doing (`Inferred`), or `threads` above 1,
    /// which makes Gunicorn run gthread for the sync class.
    pub evidence: Option<String>,
}

/// A class named on the command line (tests name classes this way).
#[cfg(test)]
impl From<&str> for WorkerClass {
    fn from(name: &str) -> WorkerClass {
        WorkerClass {
            name: name.into(),
            source: SettingSource::CommandLine,
            evidence: None,
        }
    }
}

impl WorkerClass {
    /// Named by a setting or inferred from the worker: not Gunicorn's
    /// default assumed.
    pub fn is_known(&self) -> bool {
        self.source != SettingSource::Default
    }
}

/// A Gunicorn master's numeric settings, each with its source, and the
/// Gunicorn version it runs (see `host::gunicorn`). `None`: not known.
/// Plain values (Copy): the analysis takes them by value.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MasterSettings {
    pub timeout: Option<Setting<f64>>,
    pub keepalive: Option<Setting<f64>>,
    pub graceful_timeout: Option<Setting<f64>>,
    pub max_requests_setting: Option<Setting<u64>>,
    pub threads: Option<Setting<u64>>,
    pub worker_connections: Option<Setting<u64>>,
    pub workers: Option<Setting<u64>>,
    /// The Gunicorn installed where the master runs it from, read from its
    /// `gunicorn/__init__.py` (never executed).
    pub gunicorn_version: Option<(u32, u32, u32)>,
    /// The keep-alive a setting names (None when no setting was read, or
    /// Gunicorn's default of 2 s applies): for keep-alive races.
    pub keepalive_s: Option<f64>,
    /// max_requests when a setting names it (absent or 0: workers are never
    /// retired).
    pub max_requests: Option<u64>,
}

impl MasterSettings {
    /// Fills the shortcuts (`keepalive_s`, `max_requests`) from the
    /// settings they stand for: one place decides them.
    pub fn with_shortcuts(mut self) -> MasterSettings {
        self.keepalive_s = self.keepalive.and_then(|k| k.read());
        self.max_requests = self.max_requests_setting.and_then(|m| m.read());
        self
    }
}

/// Everything read of a master's configuration: its settings, its worker
/// class, and the config file they came from. The body of the `master`
/// event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MasterConfig {
    pub settings: MasterSettings,
    /// The class Gunicorn runs, named by a setting or Gunicorn's default
    /// (`source: default`); None when not known.
    pub worker_class: Option<WorkerClass>,
    /// The config file Gunicorn read, as found in the master's root (`-c`,
    /// or `gunicorn.conf.py` in its working directory); None when it uses
    /// none, or when which one is not known (`config_error` says).
    pub config_file: Option<String>,
    /// Why the config file's settings are not all known, when they are not
    /// (a `python:` module, a file not readable, code that can set any
    /// setting).
    pub config_error: Option<String>,
}

impl MasterConfig {
    /// The worker class workers start with: one a setting names; Gunicorn's
    /// default is left for the worker to show (inferred later).
    pub fn known_class(&self) -> Option<WorkerClass> {
        self.worker_class.clone().filter(WorkerClass::is_known)
    }
}

/// `"1.2.3"`.
pub fn version_string(v: (u32, u32, u32)) -> String {
    format!("{}.{}.{}", v.0, v.1, v.2)
}

/// Writes `name` and `name_source` for a setting.
fn entry<M: SerializeMap, T: Serialize + Copy>(
    m: &mut M,
    name: &str,
    source: &str,
    s: &Option<Setting<T>>,
) -> Result<(), M::Error> {
    m.serialize_entry(name, &s.map(|s| s.value))?;
    m.serialize_entry(source, &s.map(|s| s.source))
}

/// The class as three keys: `worker_class`, `worker_class_source`,
/// `worker_class_evidence`.
fn class_entries<M: SerializeMap>(m: &mut M, c: &Option<WorkerClass>) -> Result<(), M::Error> {
    m.serialize_entry("worker_class", &c.as_ref().map(|c| &c.name))?;
    m.serialize_entry("worker_class_source", &c.as_ref().map(|c| c.source))?;
    m.serialize_entry(
        "worker_class_evidence",
        &c.as_ref().and_then(|c| c.evidence.as_ref()),
    )
}

/// For a stall's `worker_class` (flattened).
pub fn serialize_class<S: Serializer>(c: &Option<WorkerClass>, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(3))?;
    class_entries(&mut m, c)?;
    m.end()
}

/// For the `worker_class` event (flattened).
pub fn serialize_one_class<S: Serializer>(c: &WorkerClass, s: S) -> Result<S::Ok, S::Error> {
    serialize_class(&Some(c.clone()), s)
}

/// For a stall's `gunicorn_timeout_s` (flattened).
pub fn serialize_timeout<S: Serializer>(t: &Option<Setting<f64>>, s: S) -> Result<S::Ok, S::Error> {
    let mut m = s.serialize_map(Some(2))?;
    entry(&mut m, "gunicorn_timeout_s", "gunicorn_timeout_source", t)?;
    m.end()
}

/// The `master` event's settings (flattened into it).
impl Serialize for MasterConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        class_entries(&mut m, &self.worker_class)?;
        let c = &self.settings;
        entry(&mut m, "timeout_s", "timeout_source", &c.timeout)?;
        entry(&mut m, "keepalive_s", "keepalive_source", &c.keepalive)?;
        entry(
            &mut m,
            "graceful_timeout_s",
            "graceful_timeout_source",
            &c.graceful_timeout,
        )?;
        entry(
            &mut m,
            "max_requests",
            "max_requests_source",
            &c.max_requests_setting,
        )?;
        entry(&mut m, "threads", "threads_source", &c.threads)?;
        entry(
            &mut m,
            "worker_connections",
            "worker_connections_source",
            &c.worker_connections,
        )?;
        entry(&mut m, "workers", "workers_source", &c.workers)?;
        m.serialize_entry("config_file", &self.config_file)?;
        m.serialize_entry("config_error", &self.config_error)?;
        m.serialize_entry("gunicorn_version", &c.gunicorn_version.map(version_string))?;
        m.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_setting_says_where_it_came_from() {
        let settings = MasterSettings {
            timeout: Some(Setting::new(30.0, SettingSource::Default)),
            keepalive: Some(Setting::new(5.0, SettingSource::ConfigFile)),
            gunicorn_version: Some((23, 0, 0)),
            ..Default::default()
        }
        .with_shortcuts();
        let s = MasterConfig {
            settings,
            worker_class: Some(WorkerClass {
                name: "sync".into(),
                source: SettingSource::Environment,
                evidence: None,
            }),
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["timeout_s"], 30.0);
        assert_eq!(v["timeout_source"], "default");
        assert_eq!(v["keepalive_s"], 5.0);
        assert_eq!(v["keepalive_source"], "config_file");
        assert_eq!(v["worker_class_source"], "environment");
        assert!(v["max_requests"].is_null() && v["max_requests_source"].is_null());
        assert_eq!(v["gunicorn_version"], "23.0.0");
        assert_eq!(settings.keepalive_s, Some(5.0), "read: a race may name it");
        let assumed = MasterSettings {
            keepalive: Some(Setting {
                value: 2.0,
                source: SettingSource::Default,
            }),
            ..Default::default()
        }
        .with_shortcuts();
        assert_eq!(assumed.keepalive_s, None, "assumed: never named as read");
    }
}
