//! Where the `log` records of our dependencies (aya above all) go: stderr,
//! one line each, at `warn` and above unless `RUST_LOG` says otherwise.
use std::io::Write;

/// Installs the logger; call once, before anything that may log.
pub fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn"))
        .format(|out, record| {
            let source = source(record.target());
            let level = record.level().as_str().to_ascii_lowercase();
            let text = one_line(&record.args().to_string());
            writeln!(out, "tracer: {source}: {level}: {text}")
        })
        .init();
}

/// The crate a record comes from; aya's own crates (aya, aya_obj) are one
/// source to the user.
fn source(target: &str) -> &str {
    let krate = target.split("::").next().unwrap_or(target);
    if krate.starts_with("aya") {
        "aya"
    } else {
        krate
    }
}

/// aya pretty-prints some values over many lines; a log line stays one line
/// so that it can be grepped and prefixed.
fn one_line(text: &str) -> String {
    let parts: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    parts.join(" ")
}

#[cfg(test)]
mod tests {
    use super::{one_line, source};

    #[test]
    fn a_record_is_one_line() {
        assert_eq!(
            one_line("Features {\n    btf: true,\n}\n"),
            "Features { btf: true, }"
        );
        assert_eq!(one_line("plain"), "plain");
    }

    #[test]
    fn aya_crates_are_one_source() {
        assert_eq!(source("aya::programs::trace_point"), "aya");
        assert_eq!(source("aya_obj::btf::btf"), "aya");
        assert_eq!(source("tokio::runtime"), "tokio");
        assert_eq!(source("mio"), "mio");
    }
}
