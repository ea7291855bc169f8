//! Gunicorn's settings as text: a command line (the master's argv, or
//! GUNICORN_CMD_ARGS split as a shell would), and a Python config file read
//! for its literal assignments only. Nothing here executes anything; a
//! value the text does not state plainly is `Val::Unknown`, never guessed.
//! All input is written by a process that may be hostile: parsing is linear
//! in its length, and the caller caps that.
use std::collections::BTreeMap;

/// The settings the tracer reads, by Gunicorn's names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    WorkerClass,
    Timeout,
    Keepalive,
    GracefulTimeout,
    MaxRequests,
    Threads,
    WorkerConnections,
    Workers,
    Config,
    Chdir,
}

impl Key {
    pub const ALL: [Key; 10] = [
        Key::WorkerClass,
        Key::Timeout,
        Key::Keepalive,
        Key::GracefulTimeout,
        Key::MaxRequests,
        Key::Threads,
        Key::WorkerConnections,
        Key::Workers,
        Key::Config,
        Key::Chdir,
    ];

    /// The name in a config file (Gunicorn's setting name).
    pub fn name(self) -> &'static str {
        match self {
            Key::WorkerClass => "worker_class",
            Key::Timeout => "timeout",
            Key::Keepalive => "keepalive",
            Key::GracefulTimeout => "graceful_timeout",
            Key::MaxRequests => "max_requests",
            Key::Threads => "threads",
            Key::WorkerConnections => "worker_connections",
            Key::Workers => "workers",
            Key::Config => "config",
            Key::Chdir => "chdir",
        }
    }

    fn long(self) -> &'static str {
        match self {
            Key::WorkerClass => "--worker-class",
            Key::Timeout => "--timeout",
            Key::Keepalive => "--keep-alive",
            Key::GracefulTimeout => "--graceful-timeout",
            Key::MaxRequests => "--max-requests",
            Key::Threads => "--threads",
            Key::WorkerConnections => "--worker-connections",
            Key::Workers => "--workers",
            Key::Config => "--config",
            Key::Chdir => "--chdir",
        }
    }

    fn short(self) -> Option<char> {
        match self {
            Key::WorkerClass => Some('k'),
            Key::Timeout => Some('t'),
            Key::Workers => Some('w'),
            Key::Config => Some('c'),
            _ => None,
        }
    }
}

/// Gunicorn's other short options that take a value: in a cluster such as
/// `-Dk gevent`, the letters after one of these are its value.
const OTHER_SHORT_WITH_VALUE: &str = "bpugmen";

/// What one place says about one setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Val {
    /// The value as written (for a config file: a literal's contents).
    Text(String),
    /// Set here, to a value the tracer cannot know (computed, abbreviated,
    /// conditional).
    Unknown,
}

/// What one place (the command line, GUNICORN_CMD_ARGS, the config file)
/// says about the settings.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Layer {
    pub vals: BTreeMap<Key, Val>,
    /// A setting absent from `vals` is surely not set here. False for a
    /// config file that may set names the text does not show (`from x
    /// import *`, `globals()`, `exec`).
    pub complete: bool,
}

/// Gunicorn's options in an argument list (argparse's rules: the last
/// occurrence wins; `--name V`, `--name=V`, `-kV`, `-k V`; `--` ends
/// options). An abbreviated long option (`--time 5`) may be one of
/// Gunicorn's many others, so the settings it might be are unknown.
pub fn parse_args(args: &[String]) -> Layer {
    let mut l = Layer {
        complete: true,
        ..Default::default()
    };
    let mut i = 0;
    let value_at = |j: usize| args.get(j).cloned();
    while i < args.len() {
        let a = &args[i];
        i += 1;
        if a == "--" {
            break;
        }
        if let Some(long) = a.strip_prefix("--") {
            let (name, inline) = match long.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (long, None),
            };
            let name = format!("--{name}");
            if let Some(k) = Key::ALL.into_iter().find(|k| k.long() == name) {
                let v = match inline {
                    Some(v) => Some(v),
                    None => {
                        i += 1;
                        value_at(i - 1)
                    }
                };
                l.vals.insert(k, v.map(Val::Text).unwrap_or(Val::Unknown));
            } else if name.len() > 3 {
                for k in Key::ALL.into_iter().filter(|k| k.long().starts_with(&name)) {
                    l.vals.insert(k, Val::Unknown);
                }
            }
            continue;
        }
        let Some(cluster) = a.strip_prefix('-').filter(|c| !c.is_empty()) else {
            continue;
        };
        for (at, c) in cluster.char_indices() {
            if let Some(k) = Key::ALL.into_iter().find(|k| k.short() == Some(c)) {
                let rest = &cluster[at + c.len_utf8()..];
                let v = if rest.is_empty() {
                    i += 1;
                    value_at(i - 1)
                } else {
                    Some(rest.strip_prefix('=').unwrap_or(rest).to_string())
                };
                l.vals.insert(k, v.map(Val::Text).unwrap_or(Val::Unknown));
                break;
            }
            if OTHER_SHORT_WITH_VALUE.contains(c) {
                if at + c.len_utf8() == cluster.len() {
                    i += 1;
                }
                break;
            }
        }
    }
    l
}

/// Splits GUNICORN_CMD_ARGS as Python's `shlex.split` does (POSIX rules,
/// no comments): whitespace separates, single quotes are literal, double
/// quotes allow `\"` and `\\`, a backslash outside quotes escapes the next
/// character. None when a quote is left open (Gunicorn would not start).
pub fn shell_split(s: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut have = false;
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        match c {
            c if c.is_whitespace() => {
                if have {
                    out.push(std::mem::take(&mut cur));
                    have = false;
                }
            }
            '\'' => {
                have = true;
                loop {
                    match it.next()? {
                        '\'' => break,
                        c => cur.push(c),
                    }
                }
            }
            '"' => {
                have = true;
                loop {
                    match it.next()? {
                        '"' => break,
                        '\\' => match it.next()? {
                            c @ ('"' | '\\') => cur.push(c),
                            c => {
                                cur.push('\\');
                                cur.push(c);
                            }
                        },
                        c => cur.push(c),
                    }
                }
            }
            '\\' => {
                have = true;
                cur.push(it.next()?);
            }
            c => {
                have = true;
                cur.push(c);
            }
        }
    }
    if have {
        out.push(cur);
    }
    Some(out)
}

/// One token of Python source.
#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Name(String),
    /// A number literal, as written.
    Num(String),
    /// A plain string literal's contents (no f-string, no escapes); None
    /// for one the tracer does not decode.
    Str(Option<String>),
    Op(String),
}

/// Operators of two or three characters, longest first.
const OPS: [&str; 24] = [
    "**=", "//=", ">>=", "<<=", "...", "==", "!=", "<=", ">=", ":=", "->", "+=", "-=", "*=", "/=",
    "%=", "&=", "|=", "^=", "@=", "**", "//", "<<", ">>",
];

/// A logical line: its indentation and its tokens.
struct Line {
    indent: usize,
    toks: Vec<Tok>,
}

/// Python source as logical lines (brackets and backslashes join physical
/// lines; strings, triple-quoted ones included, are single tokens, so
/// text inside a docstring is never taken for code). None when a string or
/// a bracket is left open: not a file Python would run.
fn logical_lines(src: &str) -> Option<Vec<Line>> {
    let c: Vec<char> = src.chars().collect();
    let mut lines = Vec::new();
    let mut toks = Vec::new();
    let mut depth = 0usize;
    let mut indent = 0usize;
    let mut at_start = true;
    let mut i = 0;
    while i < c.len() {
        let ch = c[i];
        if at_start {
            // Indentation of a new logical line.
            let mut n = 0;
            while i < c.len() && matches!(c[i], ' ' | '\t' | '\x0c') {
                n += 1;
                i += 1;
            }
            indent = n;
            at_start = false;
            continue;
        }
        match ch {
            '\n' | '\r' => {
                i += 1;
                if depth == 0 {
                    if !toks.is_empty() {
                        lines.push(Line {
                            indent,
                            toks: std::mem::take(&mut toks),
                        });
                    }
                    at_start = true;
                }
            }
            '#' => {
                while i < c.len() && c[i] != '\n' && c[i] != '\r' {
                    i += 1;
                }
            }
            '\\' if matches!(c.get(i + 1), Some('\n' | '\r')) => {
                i += 2;
                if c.get(i - 1) == Some(&'\r') && c.get(i) == Some(&'\n') {
                    i += 1;
                }
            }
            ' ' | '\t' | '\x0c' => i += 1,
            _ if ch.is_alphabetic() || ch == '_' || !ch.is_ascii() => {
                let start = i;
                while i < c.len() && (c[i].is_alphanumeric() || c[i] == '_' || !c[i].is_ascii()) {
                    i += 1;
                }
                let word: String = c[start..i].iter().collect();
                if matches!(c.get(i), Some('\'' | '"')) && is_string_prefix(&word) {
                    let (s, next) = string_at(&c, i, &word)?;
                    toks.push(Tok::Str(s));
                    i = next;
                } else {
                    toks.push(Tok::Name(word));
                }
            }
            '\'' | '"' => {
                let (s, next) = string_at(&c, i, "")?;
                toks.push(Tok::Str(s));
                i = next;
            }
            _ if ch.is_ascii_digit()
                || (ch == '.' && c.get(i + 1).is_some_and(char::is_ascii_digit)) =>
            {
                let start = i;
                while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '_' || c[i] == '.') {
                    i += 1;
                }
                toks.push(Tok::Num(c[start..i].iter().collect()));
            }
            _ => {
                let op = OPS.iter().find(|op| {
                    op.chars()
                        .enumerate()
                        .all(|(k, o)| c.get(i + k) == Some(&o))
                });
                let op = op.map(|s| s.to_string()).unwrap_or_else(|| ch.to_string());
                match op.as_str() {
                    "(" | "[" | "{" => depth += 1,
                    ")" | "]" | "}" => depth = depth.checked_sub(1)?,
                    _ => {}
                }
                i += op.chars().count();
                toks.push(Tok::Op(op));
            }
        }
    }
    if depth != 0 {
        return None;
    }
    if !toks.is_empty() {
        lines.push(Line { indent, toks });
    }
    Some(lines)
}

fn is_string_prefix(w: &str) -> bool {
    matches!(
        w.to_ascii_lowercase().as_str(),
        "r" | "u" | "b" | "f" | "br" | "rb" | "fr" | "rf"
    )
}

/// The string literal whose quote is at `c[i]`: its contents when plain
/// (no `f`/`b` prefix, no backslash), and the index after it. None when it
/// is never closed.
fn string_at(c: &[char], i: usize, prefix: &str) -> Option<(Option<String>, usize)> {
    let q = c[i];
    let triple = c.get(i + 1) == Some(&q) && c.get(i + 2) == Some(&q);
    let open = if triple { 3 } else { 1 };
    let mut j = i + open;
    let mut escaped = false;
    let start = j;
    loop {
        let ch = *c.get(j)?;
        if ch == '\\' {
            escaped = true;
            j += 2;
            continue;
        }
        if !triple && (ch == '\n' || ch == '\r') {
            return None;
        }
        if ch == q && (!triple || (c.get(j + 1) == Some(&q) && c.get(j + 2) == Some(&q))) {
            break;
        }
        j += 1;
    }
    let p = prefix.to_ascii_lowercase();
    let plain = !escaped && !p.contains('f') && !p.contains('b');
    let s = plain.then(|| c[start..j].iter().collect());
    Some((s, j + open))
}

/// Names that let a config file set settings its text does not show.
const DYNAMIC: [&str; 8] = [
    "exec",
    "eval",
    "globals",
    "locals",
    "vars",
    "setattr",
    "__dict__",
    "__import__",
];

/// Keywords that open a compound statement: what follows the header's
/// colon on the same line runs only sometimes.
const COMPOUND: [&str; 12] = [
    "if", "elif", "else", "while", "for", "try", "except", "finally", "with", "def", "class",
    "async",
];

/// The literal text of a value: a number (with its sign), a plain string,
/// True/False/None; None for anything computed.
fn literal(toks: &[Tok]) -> Option<String> {
    match toks {
        [Tok::Num(n)] => Some(n.clone()),
        [Tok::Op(sign), Tok::Num(n)] if sign == "-" || sign == "+" => Some(format!("{sign}{n}")),
        [Tok::Str(Some(s))] => Some(s.clone()),
        [Tok::Name(n)] if matches!(n.as_str(), "True" | "False" | "None") => Some(n.clone()),
        _ => None,
    }
}

fn key_of(name: &str) -> Option<Key> {
    Key::ALL
        .into_iter()
        .find(|k| k.name() == name && *k != Key::Config)
}

/// The names a statement may bind (assignment targets, `as` names, `for`
/// targets, imports, `del`, `global`, `def`, walrus), other than by a
/// plain literal assignment. One pass: linear in the statement.
fn bound_names(toks: &[Tok]) -> Vec<&str> {
    fn name(t: Option<&Tok>) -> Option<&str> {
        match t {
            Some(Tok::Name(n)) => Some(n.as_str()),
            _ => None,
        }
    }
    let mut out = Vec::new();
    match name(toks.first()) {
        // Every name in a statement that binds names by keyword.
        Some("import" | "from" | "del" | "global" | "nonlocal" | "for") => {
            return toks.iter().filter_map(|t| name(Some(t))).collect();
        }
        Some("def" | "class") => out.extend(name(toks.get(1))),
        Some("async") => out.extend(name(toks.get(2))),
        _ => {}
    }
    // Names at depth 0 since the last `=`: targets if another `=` follows.
    let mut pending = Vec::new();
    let mut depth = 0usize;
    for (k, t) in toks.iter().enumerate() {
        match t {
            Tok::Op(o) => match o.as_str() {
                "(" | "[" | "{" => depth += 1,
                ")" | "]" | "}" => depth = depth.saturating_sub(1),
                ":=" => out.extend(name(k.checked_sub(1).and_then(|j| toks.get(j)))),
                "==" | "!=" | "<=" | ">=" => {}
                o if depth == 0 && o.ends_with('=') => out.append(&mut pending),
                _ => {}
            },
            Tok::Name(n) if n == "as" => out.extend(name(toks.get(k + 1))),
            Tok::Name(n) if depth == 0 => {
                let attribute = k > 0 && toks[k - 1] == Tok::Op(".".into());
                if !attribute {
                    pending.push(n.as_str());
                }
            }
            _ => {}
        }
    }
    out
}

/// A Gunicorn config file's literal settings, parsed as text. Only a
/// top-level `name = literal` (or `name: T = literal`) is read; a setting
/// assigned any other way (computed, conditional, in a block, augmented,
/// imported) is `Val::Unknown`; the last top-level statement wins, as in
/// Python. A file Python could not parse says nothing known.
pub fn parse_config(src: &str) -> Layer {
    let Some(lines) = logical_lines(src) else {
        return Layer::default();
    };
    let mut l = Layer {
        complete: true,
        ..Default::default()
    };
    for line in lines {
        let statements = line.toks.split(|t| *t == Tok::Op(";".into()));
        for st in statements {
            if st
                .iter()
                .any(|t| matches!(t, Tok::Name(n) if DYNAMIC.contains(&n.as_str())))
                || st
                    .windows(2)
                    .any(|w| w[0] == Tok::Name("import".into()) && w[1] == Tok::Op("*".into()))
            {
                l.complete = false;
            }
            let compound =
                matches!(st.first(), Some(Tok::Name(n)) if COMPOUND.contains(&n.as_str()));
            let top = line.indent == 0 && !compound;
            if top && let Some((k, v)) = literal_assignment(st) {
                l.vals.insert(k, v);
                continue;
            }
            for name in bound_names(st) {
                if let Some(k) = key_of(name) {
                    l.vals.insert(k, Val::Unknown);
                }
            }
        }
    }
    l
}

/// `name = literal` or `name: T = literal` for a setting the tracer reads:
/// its value (Unknown when the value is not a literal).
fn literal_assignment(st: &[Tok]) -> Option<(Key, Val)> {
    let (Tok::Name(name), rest) = st.split_first()? else {
        return None;
    };
    let k = key_of(name)?;
    let value = match rest {
        [Tok::Op(eq), v @ ..] if eq == "=" => v,
        [Tok::Op(colon), Tok::Name(_), Tok::Op(eq), v @ ..] if colon == ":" && eq == "=" => v,
        _ => return None,
    };
    // Chained (`a = b = 1`) or any other assignment in the value: let the
    // general rule judge every name bound.
    if value
        .iter()
        .any(|t| matches!(t, Tok::Op(o) if o == "=" || o == ":="))
    {
        return None;
    }
    Some((k, literal(value).map(Val::Text).unwrap_or(Val::Unknown)))
}

/// A non-negative integer as Gunicorn's validator takes it (`int(v, 0)`
/// for text): decimal digits, with `_` between them.
pub fn parse_count(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || v.starts_with('_') || v.ends_with('_') || v.contains("__") {
        return None;
    }
    if !v.chars().all(|c| c.is_ascii_digit() || c == '_') {
        return None;
    }
    // Python rejects leading zeros in a non-zero decimal literal.
    let digits: String = v.chars().filter(|c| *c != '_').collect();
    if digits.len() > 1 && digits.starts_with('0') && digits.chars().any(|c| c != '0') {
        return None;
    }
    digits.parse().ok()
}

/// `version_info = (23, 0, 0)` or `__version__ = "23.0.0"` in Gunicorn's
/// `__init__.py`, read as text.
pub fn parse_version(src: &str) -> Option<(u32, u32, u32)> {
    let lines = logical_lines(src)?;
    let num = |t: &Tok| match t {
        Tok::Num(n) => n.parse::<u32>().ok(),
        _ => None,
    };
    for line in lines.iter().filter(|l| l.indent == 0) {
        match line.toks.as_slice() {
            [
                Tok::Name(n),
                Tok::Op(eq),
                Tok::Op(open),
                a,
                Tok::Op(c1),
                b,
                Tok::Op(c2),
                c,
                rest @ ..,
            ] if n == "version_info"
                && eq == "="
                && open == "("
                && c1 == ","
                && c2 == ","
                && matches!(rest.last(), Some(Tok::Op(close)) if close == ")") =>
            {
                return Some((num(a)?, num(b)?, num(c)?));
            }
            [Tok::Name(n), Tok::Op(eq), Tok::Str(Some(v))] if n == "__version__" && eq == "=" => {
                let mut it = v.split('.').map(|p| p.parse::<u32>().ok());
                return Some((it.next()??, it.next()??, it.next().flatten().unwrap_or(0)));
            }
            _ => {}
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    fn text(l: &Layer, k: Key) -> Option<&str> {
        match l.vals.get(&k) {
            Some(Val::Text(t)) => Some(t),
            _ => None,
        }
    }

    #[test]
    fn command_line_options_last_one_wins() {
        let l = parse_args(&v(&[
            "-t",
            "4",
            "--timeout=9",
            "-kgevent",
            "--keep-alive",
            "5",
            "-w3",
            "app:app",
        ]));
        assert_eq!(text(&l, Key::Timeout), Some("9"), "argparse keeps the last");
        assert_eq!(text(&l, Key::WorkerClass), Some("gevent"));
        assert_eq!(text(&l, Key::Keepalive), Some("5"));
        assert_eq!(text(&l, Key::Workers), Some("3"));
        assert_eq!(l.vals.get(&Key::MaxRequests), None);
        assert!(l.complete);
        let l = parse_args(&v(&["-c", "conf.py", "--max-requests-jitter", "3"]));
        assert_eq!(text(&l, Key::Config), Some("conf.py"));
        assert_eq!(l.vals.get(&Key::MaxRequests), None, "another option");
    }

    #[test]
    fn abbreviations_and_clusters_are_not_guessed() {
        let l = parse_args(&v(&["--time", "5", "--keep", "3"]));
        assert_eq!(l.vals.get(&Key::Timeout), Some(&Val::Unknown));
        assert_eq!(l.vals.get(&Key::Keepalive), Some(&Val::Unknown));
        // -D (daemon) takes no value: -t's value follows.
        let l = parse_args(&v(&["-Dt", "6"]));
        assert_eq!(text(&l, Key::Timeout), Some("6"));
        // -b takes one: the rest of the cluster is the address, not -k.
        let l = parse_args(&v(&["-bunix:/k.sock", "-b", "-k"]));
        assert_eq!(l.vals.get(&Key::WorkerClass), None);
        // A flag at the end with no value.
        let l = parse_args(&v(&["--timeout"]));
        assert_eq!(l.vals.get(&Key::Timeout), Some(&Val::Unknown));
        let l = parse_args(&v(&["--", "-t", "5"]));
        assert!(l.vals.is_empty());
    }

    #[test]
    fn gunicorn_cmd_args_split_like_shlex() {
        assert_eq!(
            shell_split(r#"--timeout 7  -k 'gevent' --name "a \"b\"" x\ y"#),
            Some(v(&[
                "--timeout",
                "7",
                "-k",
                "gevent",
                "--name",
                "a \"b\"",
                "x y"
            ]))
        );
        assert_eq!(shell_split("''"), Some(v(&[""])));
        assert_eq!(shell_split("   "), Some(vec![]));
        assert_eq!(shell_split("-t 'open"), None);
        assert_eq!(shell_split("trailing\\"), None);
    }

    #[test]
    fn config_literals_are_read() {
        let l = parse_config(
            "# settings\nimport multiprocessing\n\nworker_class = \"sync\"\ntimeout = 60  # seconds\nkeepalive: int = 5\ngraceful_timeout = 1_0\nmax_requests = 1000; threads = 2\nworkers = multiprocessing.cpu_count() * 2\n",
        );
        assert!(l.complete);
        assert_eq!(text(&l, Key::WorkerClass), Some("sync"));
        assert_eq!(text(&l, Key::Timeout), Some("60"));
        assert_eq!(text(&l, Key::Keepalive), Some("5"));
        assert_eq!(text(&l, Key::GracefulTimeout), Some("1_0"));
        assert_eq!(text(&l, Key::MaxRequests), Some("1000"));
        assert_eq!(text(&l, Key::Threads), Some("2"));
        assert_eq!(l.vals.get(&Key::Workers), Some(&Val::Unknown), "computed");
        assert_eq!(l.vals.get(&Key::WorkerConnections), None);
    }

    #[test]
    fn config_values_not_stated_plainly_are_unknown() {
        let unknown = |src: &str, k: Key| {
            let l = parse_config(src);
            assert_eq!(l.vals.get(&k), Some(&Val::Unknown), "{src:?}: {l:?}");
        };
        unknown("import os\ntimeout = int(os.environ['T'])\n", Key::Timeout);
        unknown("timeout = 30\nif DEBUG:\n    timeout = 600\n", Key::Timeout);
        unknown("timeout = 30\nif DEBUG: timeout = 600\n", Key::Timeout);
        unknown("timeout = 30\ntimeout += 5\n", Key::Timeout);
        unknown("timeout, keepalive = 5, 2\n", Key::Keepalive);
        unknown("timeout = keepalive = 5\n", Key::Timeout);
        unknown("from settings import timeout\n", Key::Timeout);
        unknown("worker_class = f\"{X}\"\n", Key::WorkerClass);
        unknown("worker_class = \"ge\\x76ent\"\n", Key::WorkerClass);
        unknown(
            "timeout = 5\ntry:\n    import x\nexcept ImportError as timeout:\n    pass\n",
            Key::Timeout,
        );
        unknown("timeout = (\n   60\n)\n", Key::Timeout);
        unknown("def timeout():\n    pass\n", Key::Timeout);
        unknown("if (timeout := 5):\n    pass\n", Key::Timeout);
        // The last top-level statement wins.
        let l = parse_config("timeout = int(x)\ntimeout = 45\n");
        assert_eq!(text(&l, Key::Timeout), Some("45"));
        // Code that can set anything: an absent name is not a default.
        for src in [
            "from base_conf import *\n",
            "globals()['timeout'] = 5\n",
            "exec(open('x').read())\n",
        ] {
            assert!(!parse_config(src).complete, "{src}");
        }
    }

    #[test]
    fn config_text_that_only_looks_like_settings() {
        let l = parse_config(
            "\"\"\"Docs.\ntimeout = 99\n\"\"\"\n# timeout = 98\nx = 'timeout = 97'\ndef post_fork(server, worker):\n    timeout = 1\nlog.timeout = 3\nd = dict(timeout=4)\nok = timeout == 5\n",
        );
        // The function's local is still marked (conservative), but no
        // docstring, comment, string, attribute, keyword argument or
        // comparison is taken for a value.
        assert_eq!(l.vals.get(&Key::Timeout), Some(&Val::Unknown));
        let l = parse_config(
            "\"\"\"\ntimeout = 99\n\"\"\"\n# timeout = 98\nx = 'timeout = 97'\nlog.timeout = 3\nd = dict(timeout=4)\nok = timeout == 5\n",
        );
        assert_eq!(l.vals.get(&Key::Timeout), None, "{l:?}");
        assert!(l.complete);
    }

    #[test]
    fn hostile_config_text() {
        // Unclosed strings and brackets: nothing Python would run.
        for src in [
            "timeout = 5\nx = '''never closed\n",
            "timeout = 5\nx = (\n",
            "x = )\ntimeout = 5\n",
            "timeout = 'a\n",
        ] {
            let l = parse_config(src);
            assert!(l.vals.is_empty() && !l.complete, "{src:?}: {l:?}");
        }
        // Deep nesting, long lines, NULs and invalid text stay linear.
        let deep = format!(
            "timeout = 7\nx = {}{}\n",
            "(".repeat(100_000),
            ")".repeat(100_000)
        );
        assert_eq!(text(&parse_config(&deep), Key::Timeout), Some("7"));
        let junk: String = (0..200_000u32)
            .map(|i| char::from_u32(i % 0x2000).unwrap_or('?'))
            .collect();
        let _ = parse_config(&junk);
        assert_eq!(
            text(&parse_config("\u{feff}\r\ntimeout = 8\r\n"), Key::Timeout),
            Some("8")
        );
        let many = format!("timeout = 9\nx = {}1\n", "y = ".repeat(100_000));
        assert_eq!(text(&parse_config(&many), Key::Timeout), Some("9"));
        let many = format!("x = {}1\n", "timeout = ".repeat(100_000));
        assert_eq!(
            parse_config(&many).vals.get(&Key::Timeout),
            Some(&Val::Unknown)
        );
        assert_eq!(
            text(
                &parse_config("timeout = 8\r\nkeepalive = 3\r\n"),
                Key::Keepalive
            ),
            Some("3")
        );
    }

    #[test]
    fn counts_as_gunicorn_takes_them() {
        assert_eq!(parse_count("60"), Some(60));
        assert_eq!(parse_count("1_000"), Some(1000));
        assert_eq!(parse_count("0"), Some(0));
        for bad in [
            "",
            "-1",
            "7.5",
            "1__0",
            "_1",
            "010",
            "0x10",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_count(bad), None, "{bad}");
        }
    }

    #[test]
    fn gunicorn_version_from_its_init() {
        assert_eq!(
            parse_version(
                "#\n# part of gunicorn\n\nversion_info = (27, 0, 1)\n__version__ = \".\".join([str(v) for v in version_info])\n"
            ),
            Some((27, 0, 1))
        );
        assert_eq!(
            parse_version("__version__ = \"19.9.0\"\n"),
            Some((19, 9, 0))
        );
        assert_eq!(
            parse_version("version_info = (23, 0, 0, 'beta')\n"),
            Some((23, 0, 0))
        );
        assert_eq!(parse_version("version_info = get()\n"), None);
        assert_eq!(parse_version("if x:\n    version_info = (1, 2, 3)\n"), None);
        assert_eq!(parse_version("version_info = (99999999999, 0, 0)\n"), None);
    }
}
