//! Where events go: stdout in the chosen format, plus an optional JSON file.
use std::io::Write;

use serde::Serialize;

use super::output::OutputFile;
use crate::model::Output;
use crate::present::{self, Clock, Format, StartEvent, SummaryEvent};

pub struct Sink {
    pub format: Format,
    pub clock: Clock,
    pub stdout: std::io::Stdout,
    pub file: Option<OutputFile>,
    /// stdout was closed (piped into `head`, say): keep tracing for the file.
    pub stdout_gone: bool,
    /// Events held back until the `start` line is out (during attach).
    pub held: Option<Vec<Output>>,
    /// Colour the text view: stdout is a terminal and NO_COLOR is unset.
    pub color: bool,
}

impl Sink {
    fn write_stdout(&mut self, line: &str) {
        if self.stdout_gone {
            return;
        }
        let mut lock = self.stdout.lock();
        if writeln!(lock, "{line}").and_then(|_| lock.flush()).is_err() {
            self.stdout_gone = true;
        }
    }

    fn write_file(&mut self, line: &str) {
        if let Some(f) = self.file.as_mut()
            && let Err(e) = f.write_line(line)
        {
            eprintln!(
                "tracer: warning: cannot write to the --output file any more ({e:#}); continuing on stdout"
            );
            self.file = None;
        }
    }

    /// One record: JSON to the file, and JSON or `text()` to stdout.
    fn write(&mut self, body: &impl Serialize, ts_ns: u64, text: impl FnOnce(&Clock) -> String) {
        let json = present::json_line(body, self.clock.rfc3339(ts_ns));
        self.write_file(&json);
        let line = match self.format {
            Format::Json => json,
            Format::Text => text(&self.clock),
        };
        self.write_stdout(&line);
    }

    pub fn event(&mut self, o: &Output) {
        if let Some(h) = self.held.as_mut() {
            h.push(o.clone());
            return;
        }
        let color = self.color;
        self.write(o, o.ts_ns(), |clock| {
            let t = present::text_line(o, clock);
            if color { present::colorize(&t) } else { t }
        });
    }

    /// The `start` line, then the events held back while attaching.
    pub fn start(&mut self, s: &StartEvent, now: u64) {
        self.write(s, now, |_| present::start_line(s));
        for o in self.held.take().unwrap_or_default() {
            self.event(&o);
        }
    }

    pub fn summary(&mut self, s: &SummaryEvent, now: u64) {
        self.write(s, now, |_| present::text_summary(s).trim_end().to_string());
    }
}
