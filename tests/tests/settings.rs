//! Gunicorn's settings as real Gunicorn reads them: from a config file
//! (`-c`), from GUNICORN_CMD_ARGS, or from nowhere (its defaults, which the
//! tracer marks as assumed); the worker class inferred from what a worker
//! does when no setting the tracer can read names it; and the Gunicorn
//! version read from the virtualenv it runs from.
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use tests::*;

/// A config file in a directory of its own, removed when dropped.
struct ConfFile(PathBuf);

impl ConfFile {
    fn new(tag: &str, text: &str) -> ConfFile {
        let dir = std::env::temp_dir().join(format!("settings-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gunicorn.conf.py");
        std::fs::write(&path, text).unwrap();
        ConfFile(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for ConfFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// The Gunicorn version installed in the test virtualenv, as Python says.
fn installed_gunicorn() -> String {
    let out = Command::new(python())
        .args(["-c", "import gunicorn; print(gunicorn.__version__)"])
        .output()
        .expect("running the venv's python");
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The tracer on `g`, and its `master` event.
fn master_event(g: &GunicornProc) -> (Tracer, Value) {
    let mut t = Tracer::start(&["--pid", &g.pid().to_string()]);
    let (_, m) = t.wait_for("the master event", Duration::from_secs(10), |e| {
        e["event"] == "master"
    });
    (t, m)
}

#[test]
fn class_and_timeout_from_the_config_file() {
    require_root();
    let conf = ConfFile::new("conf", "# test\nworker_class = \"sync\"\ntimeout = 7\n");
    let g = Gunicorn::new("stall_app:app")
        .config(conf.path())
        .workers(2)
        .spawn();
    let (mut t, m) = master_event(&g);
    assert_eq!(m["worker_class"], "sync", "{m}");
    assert_eq!(m["worker_class_source"], "config_file", "{m}");
    assert_eq!(m["timeout_s"], 7.0, "{m}");
    assert_eq!(m["timeout_source"], "config_file", "{m}");
    assert_eq!(m["config_file"], conf.path(), "{m}");
    assert!(m["config_error"].is_null(), "{m}");
    // Not set anywhere: Gunicorn's default, said to be assumed.
    assert_eq!(m["keepalive_s"], 2.0, "{m}");
    assert_eq!(m["keepalive_source"], "default", "{m}");
    assert_eq!(m["workers"], 2, "{m}");
    assert_eq!(m["workers_source"], "command_line", "{m}");
    assert_eq!(m["gunicorn_version"], installed_gunicorn().as_str(), "{m}");
    // The class was read: nothing is inferred over it.
    t.wait_count("both loops", 2, Duration::from_secs(10), |e| {
        e["event"] == "loop"
    });
    t.collect_for(Duration::from_millis(500));
    assert!(
        t.of_kind("worker_class").is_empty(),
        "{:?}",
        t.of_kind("worker_class")
    );
    t.stop();
}

#[test]
fn settings_from_gunicorn_cmd_args_override_the_config_file() {
    require_root();
    let conf = ConfFile::new("env", "timeout = 7\nkeepalive = 3\n");
    let g = Gunicorn::new("stall_app:app")
        .config(conf.path())
        .env(
            "GUNICORN_CMD_ARGS",
            "--timeout 9 --worker-class 'gthread' --threads=2",
        )
        .spawn();
    let (mut t, m) = master_event(&g);
    assert_eq!(m["timeout_s"], 9.0, "{m}");
    assert_eq!(m["timeout_source"], "environment", "{m}");
    assert_eq!(m["keepalive_s"], 3.0, "{m}");
    assert_eq!(m["keepalive_source"], "config_file", "{m}");
    assert_eq!(m["worker_class"], "gthread", "{m}");
    assert_eq!(m["worker_class_source"], "environment", "{m}");
    assert_eq!(m["threads"], 2, "{m}");
    t.stop();
}

#[test]
fn nothing_sets_the_timeout_so_it_is_marked_as_the_default() {
    require_root();
    let g = Gunicorn::new("stall_app:app").workers(2).spawn();
    let (mut t, m) = master_event(&g);
    assert_eq!(m["timeout_s"], 30.0, "{m}");
    assert_eq!(m["timeout_source"], "default", "{m}");
    assert!(m["config_file"].is_null(), "{m}");
    assert_eq!(m["worker_class"], "sync", "{m}");
    assert_eq!(m["worker_class_source"], "default", "{m}");
    // The default class is confirmed by what each worker does.
    let classes = t.wait_count("both workers' classes", 2, Duration::from_secs(10), |e| {
        e["event"] == "worker_class"
    });
    for c in &classes {
        assert_eq!(c["worker_class"], "sync", "{c}");
        assert_eq!(c["worker_class_source"], "inferred", "{c}");
        assert!(
            c["worker_class_evidence"]
                .as_str()
                .unwrap()
                .contains("select()"),
            "{c}"
        );
    }
    t.stop();
}

#[test]
fn a_class_set_by_code_is_unknown_until_the_worker_shows_it() {
    require_root();
    let conf = ConfFile::new(
        "code",
        "import os\nworker_class = os.environ.get('K', 'gevent')\ntimeout = 6\n",
    );
    let g = Gunicorn::new("stall_app:app").config(conf.path()).spawn();
    let (mut t, m) = master_event(&g);
    assert!(m["worker_class"].is_null(), "not guessed: {m}");
    assert_eq!(m["timeout_s"], 6.0, "{m}");
    let (_, c) = t.wait_for("the worker's class", Duration::from_secs(10), |e| {
        e["event"] == "worker_class"
    });
    assert_eq!(c["worker_class"], "gevent", "{c}");
    assert_eq!(c["worker_class_source"], "inferred", "{c}");
    assert!(
        c["worker_class_evidence"]
            .as_str()
            .unwrap()
            .contains("gevent/lib"),
        "{c}"
    );
    t.stop();
}
