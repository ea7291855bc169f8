//! The text view of a stall's Python stack: where the thread is (its
//! innermost frame) and the application code that called it, innermost
//! first; the library frames between are in the JSON.
use super::sanitize;
use crate::model::{PyFrame, PyThread, StallReport};

/// App frames shown under a stall.
const APP_FRAMES: usize = 3;

/// `file:line in function`, the file shortened for a library.
fn at(f: &PyFrame) -> String {
    let line = match f.line {
        Some(l) => format!(":{l}"),
        None => " (line unknown)".into(),
    };
    sanitize(&format!("{}{line} in {}", f.short_file(), f.function))
}

/// The lines under a stall: a heading naming the innermost frame, then
/// the innermost frames of the application's own code.
pub fn stack_lines(frames: &[PyFrame], omitted: u64) -> Vec<String> {
    let Some(inner) = frames.first() else {
        return vec!["python: no Python frame on this thread (it runs no Python code now)".into()];
    };
    let apps: Vec<&PyFrame> = frames
        .iter()
        .filter(|f| !f.is_library())
        .take(APP_FRAMES)
        .collect();
    let mut out = Vec::new();
    if !inner.is_library() {
        out.push("python, the app's innermost frames:".to_string());
    } else if apps.is_empty() {
        let more = if omitted > 0 {
            format!(
                " (nor in the innermost {} frames; {omitted} more not read)",
                frames.len()
            )
        } else {
            String::new()
        };
        out.push(format!(
            "python: in {}; no frame of the app's own code{more}",
            at(inner)
        ));
    } else {
        // The library call the app made, when it is not the innermost frame.
        let first_app = frames.iter().position(|f| !f.is_library()).unwrap_or(0);
        let via = match first_app {
            0 | 1 => String::new(),
            k => format!(", via {}", at(&frames[k - 1])),
        };
        out.push(format!(
            "python: in {}{via}, called from the app at:",
            at(inner)
        ));
    }
    out.extend(apps.into_iter().map(|f| format!("  {}", at(f))));
    out
}

/// One line per other thread: where it is, and its innermost app frame.
pub fn thread_lines(threads: &[PyThread]) -> Vec<String> {
    let mut out = vec![format!("python, the {} other threads:", threads.len())];
    for t in threads {
        let who = match t.tid {
            Some(tid) => format!("thread {tid}"),
            None => "thread (OS id unknown)".into(),
        };
        let Some(inner) = t.frames.first() else {
            out.push(format!("  {who}: no Python frame"));
            continue;
        };
        let app = t
            .frames
            .iter()
            .find(|f| !f.is_library())
            .filter(|f| !std::ptr::eq(*f, inner))
            .map(|f| format!(", from {}", at(f)))
            .unwrap_or_default();
        out.push(format!("  {who}: in {}{app}", at(inner)));
    }
    out
}

/// Every stack line of a stall (none with --no-py-stack).
pub fn stall_lines(s: &StallReport) -> Vec<String> {
    let mut out = match (&s.py_stack, &s.py_stack_error) {
        (Some(frames), _) => stack_lines(frames, s.py_stack_omitted.unwrap_or(0)),
        (None, Some(e)) => vec![format!("python stack: not read: {}", sanitize(e))],
        (None, None) => Vec::new(),
    };
    if let Some(threads) = &s.py_threads {
        out.extend(thread_lines(threads));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(function: &str, file: &str, line: Option<u32>) -> PyFrame {
        PyFrame {
            function: function.into(),
            file: file.into(),
            line,
        }
    }

    fn hang() -> Vec<PyFrame> {
        vec![
            f(
                "Connection._recv",
                "/usr/lib/python3.11/multiprocessing/connection.py",
                Some(395),
            ),
            f(
                "Queue.get",
                "/usr/lib/python3.11/multiprocessing/queues.py",
                Some(103),
            ),
            f("enqueue_and_wait", "/srv/hang_app.py", Some(22)),
            f("app", "/srv/hang_app.py", Some(33)),
            f(
                "WSGIHandler.run_application",
                "/v/lib/python3.11/site-packages/gevent/pywsgi.py",
                None,
            ),
        ]
    }

    #[test]
    fn the_innermost_frame_and_the_apps_frames_under_it_are_shown_not_the_library_between() {
        let l = stack_lines(&hang(), 0);
        assert_eq!(
            l,
            vec![
                "python: in multiprocessing/connection.py:395 in Connection._recv, via multiprocessing/queues.py:103 in Queue.get, called from the app at:",
                "  /srv/hang_app.py:22 in enqueue_and_wait",
                "  /srv/hang_app.py:33 in app",
            ]
        );
        assert!(
            !l.join("\n").contains("pywsgi"),
            "library frames outside the app's are in the JSON only"
        );
        let mut two = hang();
        two.remove(0);
        assert_eq!(
            stack_lines(&two, 0)[0],
            "python: in multiprocessing/queues.py:103 in Queue.get, called from the app at:",
            "no 'via' when the app called the innermost frame"
        );
    }

    #[test]
    fn an_app_frame_innermost_is_said_as_such_and_at_most_three_are_shown() {
        let frames: Vec<_> = (1..=5)
            .map(|i| f(&format!("f{i}"), "/srv/app.py", Some(i)))
            .collect();
        let l = stack_lines(&frames, 0);
        assert_eq!(l[0], "python, the app's innermost frames:");
        assert_eq!(l.len(), 1 + APP_FRAMES);
        assert_eq!(l[1], "  /srv/app.py:1 in f1");
    }

    #[test]
    fn no_app_frame_is_said_and_frames_not_read_are_not_claimed_to_be_library() {
        let frames = vec![f(
            "Hub.run",
            "/v/lib/python3.11/site-packages/gevent/hub.py",
            None,
        )];
        let l = stack_lines(&frames, 0);
        assert_eq!(
            l,
            vec![
                "python: in gevent/hub.py (line unknown) in Hub.run; no frame of the app's own code"
            ]
        );
        let l = stack_lines(&frames, 40);
        assert!(
            l[0].contains("nor in the innermost 1 frames; 40 more not read"),
            "{l:?}"
        );
        let l = stack_lines(&[], 0);
        assert!(l[0].contains("no Python frame"), "{l:?}");
    }

    #[test]
    fn errors_and_other_threads() {
        let mut s = StallReport::default();
        assert!(stall_lines(&s).is_empty(), "--no-py-stack says nothing");
        s.py_stack_error = Some("thread 9 runs no Python code\u{1b}[2J".into());
        let l = stall_lines(&s);
        assert_eq!(
            l,
            vec!["python stack: not read: thread 9 runs no Python code?[2J"]
        );
        s.py_stack_error = None;
        s.py_stack = Some(hang());
        s.py_threads = Some(vec![
            PyThread {
                tid: Some(12),
                frames: hang()[1..].to_vec(),
                omitted: 0,
            },
            PyThread {
                tid: None,
                frames: vec![],
                omitted: 0,
            },
        ]);
        let l = stall_lines(&s);
        assert!(
            l.contains(&"python, the 2 other threads:".to_string()),
            "{l:?}"
        );
        assert!(
            l.contains(&"  thread 12: in multiprocessing/queues.py:103 in Queue.get, from /srv/hang_app.py:22 in enqueue_and_wait".to_string()),
            "{l:?}"
        );
        assert!(
            l.contains(&"  thread (OS id unknown): no Python frame".to_string()),
            "{l:?}"
        );
    }
}
