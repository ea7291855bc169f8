//! Python stacks as the tracer reports them: frames read from a worker's
//! memory, and which of them are the application's.
use serde::Serialize;

/// One Python frame, as the interpreter's memory holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PyFrame {
    /// The function (its qualified name, `Queue.get`, from Python 3.11).
    pub function: String,
    /// The code's file name as the interpreter has it (not opened).
    pub file: String,
    /// The line being run; None when the interpreter's table could not
    /// be read.
    pub line: Option<u32>,
}

/// Path parts that mark a file of an installed library or of the
/// standard library, not of the application.
const LIBRARY_DIRS: [&str; 2] = ["/site-packages/", "/dist-packages/"];

impl PyFrame {
    /// A frame of an installed package, of the standard library
    /// (`.../lib/pythonX.Y/...`), or of frozen or built-in code; the rest
    /// is the application's.
    pub fn is_library(&self) -> bool {
        let f = self.file.as_str();
        f.starts_with('<') || LIBRARY_DIRS.iter().any(|d| f.contains(d)) || stdlib_rest(f).is_some()
    }

    /// The file as a person reads it: a library's path from its package
    /// (`multiprocessing/queues.py`, `gevent/hub.py`), the application's in
    /// full.
    pub fn short_file(&self) -> &str {
        let f = self.file.as_str();
        if let Some(rest) = LIBRARY_DIRS
            .iter()
            .filter_map(|d| f.rfind(d).map(|i| &f[i + d.len()..]))
            .next()
        {
            return rest;
        }
        stdlib_rest(f).unwrap_or(f)
    }
}

/// What follows `/lib/pythonX.Y/` (or `lib64`) in a path, if it has that.
fn stdlib_rest(f: &str) -> Option<&str> {
    let mut from = 0;
    while let Some(i) = f[from..].find("/python") {
        let at = from + i;
        let before = &f[..at];
        let after = &f[at + "/python".len()..];
        if before.ends_with("/lib") || before.ends_with("/lib64") {
            // pythonX.Y/ (digits and one dot), then the file.
            let ver_end = after.find('/')?;
            let ver = &after[..ver_end];
            if !ver.is_empty() && ver.chars().all(|c| c.is_ascii_digit() || c == '.') {
                return Some(&after[ver_end + 1..]);
            }
        }
        from = at + 1;
    }
    None
}

/// Another Python thread's stack (--py-stack all-threads).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PyThread {
    /// Its OS thread id; None when the interpreter does not record it
    /// (3.9, 3.10) and it could not be read from its pthread.
    pub tid: Option<u32>,
    /// Innermost frame first.
    pub frames: Vec<PyFrame>,
    /// Outer frames left out past the cap.
    pub omitted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(file: &str) -> PyFrame {
        PyFrame {
            function: "f".into(),
            file: file.into(),
            line: Some(1),
        }
    }

    #[test]
    fn library_frames_are_installed_packages_the_standard_library_and_frozen_code() {
        for lib in [
            "/usr/lib/python3.11/multiprocessing/queues.py",
            "/root/.pyenv/versions/3.9.18/lib/python3.9/threading.py",
            "/usr/lib64/python3.12/socket.py",
            "/work/venv/lib/python3.11/site-packages/gevent/hub.py",
            "/usr/lib/python3/dist-packages/psycopg2/extras.py",
            "<frozen importlib._bootstrap>",
        ] {
            assert!(f(lib).is_library(), "{lib}");
        }
        for app in [
            "/work/tests/apps/stall_app.py",
            "/srv/app/python/views.py",
            "/srv/lib/pythonic/x.py",
            "/home/u/lib/python_stuff/app.py",
            "app.py",
        ] {
            assert!(!f(app).is_library(), "{app}");
        }
    }

    #[test]
    fn a_library_file_is_named_from_its_package_and_an_app_file_in_full() {
        assert_eq!(
            f("/usr/lib/python3.11/multiprocessing/queues.py").short_file(),
            "multiprocessing/queues.py"
        );
        assert_eq!(
            f("/v/lib/python3.11/site-packages/gevent/hub.py").short_file(),
            "gevent/hub.py"
        );
        assert_eq!(f("/srv/app/views.py").short_file(), "/srv/app/views.py");
        assert_eq!(
            f("<frozen importlib._bootstrap>").short_file(),
            "<frozen importlib._bootstrap>"
        );
    }
}

/// What reading Python stacks cost in this run: the helper's set-up of a
/// process's reader and its stack reads, each timed by the tracer around
/// the request (the pipe's round trip included). In the summary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PyStackCost {
    pub setups: u64,
    pub setup_ms_median: Option<f64>,
    pub setup_ms_p99: Option<f64>,
    pub captures: u64,
    pub capture_ms_median: Option<f64>,
    pub capture_ms_p99: Option<f64>,
}
