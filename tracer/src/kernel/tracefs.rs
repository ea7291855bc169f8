//! tracefs: mounting it when absent, and reading tracepoint field offsets
//! from the running kernel's `format` files (they differ between kernels).
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

const CANDIDATES: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Returns the tracefs root, mounting it at /sys/kernel/tracing if needed.
pub fn ensure_mounted() -> Result<PathBuf> {
    for c in CANDIDATES {
        if Path::new(c).join("events").is_dir() {
            return Ok(PathBuf::from(c));
        }
    }
    mount_at(CANDIDATES[0])?;
    Ok(PathBuf::from(CANDIDATES[0]))
}

fn mount_at(target: &str) -> Result<()> {
    let src = c"nodev";
    let dst = std::ffi::CString::new(target)?;
    let fstype = c"tracefs";
    // SAFETY: all pointers are valid NUL-terminated strings; data is null.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            0,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        let err = std::io::Error::last_os_error();
        bail!(
            "tracefs is not mounted and mounting it at {target} failed ({err}); run `mount -t tracefs nodev {target}` as root, or run the tracer with CAP_SYS_ADMIN"
        );
    }
    if !Path::new(target).join("events").is_dir() {
        bail!(
            "mounted tracefs at {target} but it has no events/ directory: this kernel lacks tracepoint support (CONFIG_TRACEPOINTS)"
        );
    }
    Ok(())
}

/// One field of a tracepoint's format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub offset: u64,
    pub size: u64,
}

/// Parses a tracepoint `format` file into field name -> offset/size.
/// Array fields like `__u8 daddr[4]` are keyed by their bare name.
pub fn parse_format(text: &str) -> HashMap<String, Field> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.trim().parse::<u64>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.trim().parse::<u64>().ok();
            } else if decl.is_none() && !part.is_empty() && !part.starts_with("signed:") {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // The name is the last identifier once array brackets are dropped:
        // `__u8 daddr[4]`, `__data_loc char[] filename`.
        let mut bare = String::with_capacity(decl.len());
        let mut depth = 0;
        for c in decl.chars() {
            match c {
                '[' => depth += 1,
                ']' => depth -= 1,
                _ if depth == 0 => bare.push(c),
                _ => {}
            }
        }
        let Some(name) = bare.split_whitespace().last() else {
            continue;
        };
        fields.insert(name.to_string(), Field { offset, size });
    }
    fields
}

/// The field offsets of one tracepoint, read from tracefs.
pub struct Format {
    pub event: String,
    fields: HashMap<String, Field>,
}

impl Format {
    pub fn read(root: &Path, category: &str, name: &str) -> Result<Format> {
        let path = root.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "tracepoint {category}:{name} is missing ({} unreadable): this kernel lacks it",
                path.display()
            )
        })?;
        Ok(Format {
            event: format!("{category}:{name}"),
            fields: parse_format(&text),
        })
    }

    /// Offset of a field that must exist, checked against the size we read.
    pub fn offset(&self, field: &str, size: u64) -> Result<u64> {
        match self.fields.get(field) {
            Some(f) if f.size == size => Ok(f.offset),
            Some(f) => bail!(
                "tracepoint {} field {field} has size {} where {size} was expected; this kernel is not supported",
                self.event,
                f.size
            ),
            None => bail!(
                "tracepoint {} has no field {field}; this kernel is not supported",
                self.event
            ),
        }
    }

    /// Offset of a field that newer kernels have and older ones lack.
    pub fn optional_offset(&self, field: &str) -> Option<u64> {
        self.fields.get(field).map(|f| f.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // sock:inet_sock_set_state on 6.x (print fmt shortened).
    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int newstate;\toffset:20;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:36;\tsize:4;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:56;\tsize:16;\tsigned:0;

print fmt: \"family=%s sport=%hu\", REC->family, REC->sport
";

    // sched_process_exec on 6.x: a __data_loc string, then pids.
    const EXEC: &str = "name: sched_process_exec
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:__data_loc char[] filename;\toffset:8;\tsize:4;\tsigned:0;
\tfield:pid_t pid;\toffset:12;\tsize:4;\tsigned:1;
\tfield:pid_t old_pid;\toffset:16;\tsize:4;\tsigned:1;
";

    // sched_process_exit on an older kernel: char[16] comm, no group_dead.
    const OLD_EXIT: &str = "format:
\tfield:char comm[16];\toffset:8;\tsize:16;\tsigned:1;
\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;
\tfield:int prio;\toffset:28;\tsize:4;\tsigned:1;
";

    fn fmt(text: &str) -> Format {
        Format {
            event: "t:t".into(),
            fields: parse_format(text),
        }
    }

    #[test]
    fn parses_scalars_and_arrays() {
        let f = fmt(SET_STATE);
        assert_eq!(f.offset("skaddr", 8).unwrap(), 8);
        assert_eq!(f.offset("newstate", 4).unwrap(), 20);
        assert_eq!(f.offset("daddr", 4).unwrap(), 36);
        assert_eq!(f.offset("daddr_v6", 16).unwrap(), 56);
        assert_eq!(f.offset("common_pid", 4).unwrap(), 4);
    }

    #[test]
    fn parses_data_loc_and_following_fields() {
        let f = fmt(EXEC);
        assert_eq!(f.offset("filename", 4).unwrap(), 8);
        assert_eq!(f.offset("pid", 4).unwrap(), 12);
        assert_eq!(f.offset("old_pid", 4).unwrap(), 16);
    }

    #[test]
    fn optional_field_absent_on_old_kernels() {
        let f = fmt(OLD_EXIT);
        assert_eq!(f.optional_offset("group_dead"), None);
        assert_eq!(f.offset("comm", 16).unwrap(), 8);
        assert_eq!(f.offset("pid", 4).unwrap(), 24);
    }

    #[test]
    fn wrong_size_or_missing_field_is_an_error() {
        let f = fmt(SET_STATE);
        let e = f.offset("skaddr", 4).unwrap_err().to_string();
        assert!(e.contains("size 8"), "{e}");
        let e = f.offset("nope", 4).unwrap_err().to_string();
        assert!(e.contains("no field nope"), "{e}");
    }

    #[test]
    fn garbage_yields_no_fields() {
        assert!(parse_format("not a format\nfield:\n;;;").is_empty());
    }
}

#[cfg(test)]
mod read_tests {
    use super::*;

    #[test]
    fn an_unmountable_tracefs_is_a_one_line_error_saying_what_to_run() {
        let e = mount_at("/nonexistent/tracer-test/tracing")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("mount -t tracefs nodev /nonexistent/tracer-test/tracing"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn a_missing_tracepoint_is_a_clear_error() {
        let dir = std::env::temp_dir().join(format!("tracer-tracefs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("events/sched/sched_process_exit")).unwrap();
        std::fs::write(
            dir.join("events/sched/sched_process_exit/format"),
            "format:\n\tfield:pid_t pid;\toffset:24;\tsize:4;\tsigned:1;\n",
        )
        .unwrap();
        let ok = Format::read(&dir, "sched", "sched_process_exit").unwrap();
        assert_eq!(ok.offset("pid", 4).unwrap(), 24);
        let e = Format::read(&dir, "sock", "sock_recv_length")
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("tracepoint sock:sock_recv_length is missing"),
            "{e}"
        );
        assert!(e.contains("this kernel lacks it"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
