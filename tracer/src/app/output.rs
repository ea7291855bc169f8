//! The `--output` file. The tracer runs as root and the file holds stacks,
//! paths, peers and pod names, often in a shared directory such as /tmp:
//! it is opened without following a symlink planted at its path, only as
//! a regular file of our own, with mode 0600 (an existing one is made so),
//! and appended to. Past `--output-max-size` its lines move to `FILE.1`.
//!
//! Both files are opened at start, before the tracer gives up root: a
//! rotation by rename needs write access to the directory, which uid
//! 65534 does not have in /var/log or in a sticky /tmp beside root's file.
//! So a rotation copies FILE into the `FILE.1` it holds open and empties
//! FILE, touching no directory.
use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

pub struct OutputFile {
    path: PathBuf,
    file: File,
    /// `FILE.1`, where a rotation moves the lines.
    old: File,
    size: u64,
    max_size: u64,
}

/// Opens `path` read-write, appending or not: no symlink, no FIFO or
/// device, no file of another user or with other names (hard links); a
/// file that was there keeps no access for others (mode 0600, as a new
/// one gets).
fn open_private(path: &Path, append: bool) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .append(append)
        .create(true)
        .mode(0o600)
        // O_NONBLOCK: a FIFO planted at the path fails (ENXIO) instead of
        // blocking the open; it means nothing for a regular file.
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .with_context(|| {
            format!(
                "cannot open --output file {} (a symlink there is refused)",
                path.display()
            )
        })?;
    let m = file.metadata()?;
    if !m.file_type().is_file() {
        bail!("--output {} is not a regular file", path.display());
    }
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if m.uid() != me {
        bail!(
            "--output {} belongs to uid {}, not to the tracer's uid {me}; remove it or pick another path",
            path.display(),
            m.uid()
        );
    }
    if m.nlink() > 1 {
        bail!(
            "--output {} has other hard links; remove it or pick another path",
            path.display()
        );
    }
    if m.mode() & 0o077 != 0 {
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making --output {} private (0600)", path.display()))?;
    }
    Ok(file)
}

impl OutputFile {
    pub fn open(path: &Path, max_size: u64) -> Result<OutputFile> {
        let file = open_private(path, true)?;
        let mut old = path.to_path_buf().into_os_string();
        old.push(".1");
        let old = open_private(Path::new(&old), false)?;
        let size = file.metadata()?.len();
        Ok(OutputFile {
            path: path.to_path_buf(),
            file,
            old,
            size,
            max_size,
        })
    }

    /// Appends one line, rotating first when it would pass the size cap.
    pub fn write_line(&mut self, line: &str) -> Result<()> {
        let len = line.len() as u64 + 1;
        if self.size > 0 && self.size + len > self.max_size {
            self.rotate()
                .with_context(|| format!("rotating {}", self.path.display()))?;
        }
        let mut buf = Vec::with_capacity(line.len() + 1);
        buf.extend_from_slice(line.as_bytes());
        buf.push(b'\n');
        self.file.write_all(&buf)?;
        self.size += len;
        Ok(())
    }

    /// FILE's lines replace FILE.1's, then FILE is emptied (appends go on
    /// at its start).
    fn rotate(&mut self) -> Result<()> {
        self.old.set_len(0)?;
        self.old.seek(SeekFrom::Start(0))?;
        let mut buf = vec![0u8; 64 * 1024];
        let mut at = 0u64;
        loop {
            let n = self.file.read_at(&mut buf, at)?;
            if n == 0 {
                break;
            }
            self.old.write_all(&buf[..n])?;
            at += n as u64;
        }
        self.file.set_len(0)?;
        self.size = 0;
        Ok(())
    }
}

/// Parses `--output-max-size`: bytes, or with K, M or G (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => 0,
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    match num.trim().parse::<u64>() {
        Ok(n) if mult > 0 && n > 0 => Ok(n.saturating_mul(mult)),
        _ => Err(format!(
            "'{s}' is not a size; write it like 100M, 1G or 65536 (bytes)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20, item 14: an existing --output file kept its old mode, so
    /// a 0644 file left others reading stacks, peers and pod names.
    #[test]
    fn an_existing_output_file_is_made_private() {
        use std::os::unix::fs::PermissionsExt;
        let d = dir("private");
        let p = d.join("out.jsonl");
        std::fs::write(&p, "old\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut f = OutputFile::open(&p, 1 << 20).unwrap();
        f.write_line("new").unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old\nnew\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tracer-out-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("100M"), Ok(100 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("10X").unwrap_err().contains("100M"));
        assert!(parse_size("").is_err());
    }

    #[test]
    fn created_0600_appended_never_truncated() {
        let d = dir("mode");
        let p = d.join("out.jsonl");
        std::fs::write(&p, "old\n").unwrap();
        let mut o = OutputFile::open(&p, 1 << 20).unwrap();
        o.write_line("new").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "old\nnew\n");
        let fresh = d.join("fresh.jsonl");
        OutputFile::open(&fresh, 1 << 20).unwrap();
        let mode = std::fs::metadata(&fresh).unwrap().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_planted_symlink_is_refused_and_its_target_untouched() {
        let d = dir("link");
        let target = d.join("victim");
        std::fs::write(&target, "precious\n").unwrap();
        let p = d.join("out.jsonl");
        std::os::unix::fs::symlink(&target, &p).unwrap();
        assert!(OutputFile::open(&p, 1 << 20).is_err());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "precious\n");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rotates_past_the_cap() {
        let d = dir("rotate");
        let p = d.join("out.jsonl");
        let mut o = OutputFile::open(&p, 10).unwrap();
        o.write_line("aaaa").unwrap();
        o.write_line("bbbb").unwrap();
        o.write_line("cccc").unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "cccc\n");
        assert_eq!(
            std::fs::read_to_string(d.join("out.jsonl.1")).unwrap(),
            "aaaa\nbbbb\n"
        );
        let _ = std::fs::remove_dir_all(&d);
    }
}
