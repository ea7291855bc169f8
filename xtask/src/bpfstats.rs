//! The kernel's own accounting of BPF programs: `run_cnt` and
//! `run_time_ns` per program, counted while statistics are enabled. Stable
//! to a few ns per run where wall-clock timings of a context switch move by
//! hundreds on these shared machines.
use std::collections::BTreeMap;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Command;

use anyhow::{Context, Result, bail};
use tests::Value;

/// `BPF_ENABLE_STATS` and its `BPF_STATS_RUN_TIME` type (uapi/linux/bpf.h).
const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics on while this lives. This is the switch behind
/// `kernel.bpf_stats_enabled`, taken through the bpf syscall instead of the
/// sysctl: the kernel counts its holders and turns the statistics off when
/// the last one closes, so a benchmark that is killed cannot leave them on,
/// and two running at once cannot switch them off under each other.
pub struct StatsOn(#[allow(dead_code)] OwnedFd);

impl StatsOn {
    pub fn new() -> Result<StatsOn> {
        // union bpf_attr { struct { __u32 type; } enable_stats; ... }
        let attr: [u32; 2] = [BPF_STATS_RUN_TIME, 0];
        // SAFETY: bpf(2) reads `size_of_val(&attr)` bytes of attr.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_ENABLE_STATS,
                attr.as_ptr(),
                std::mem::size_of_val(&attr),
            )
        };
        if fd < 0 {
            bail!(
                "enabling BPF run-time statistics: {}",
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new fd the kernel just returned, owned by no one else.
        Ok(StatsOn(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
    }
}

/// Ids of the BPF programs process `pid` holds open, from its fdinfo.
pub fn prog_ids(pid: u32) -> Vec<u32> {
    let Ok(rd) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return Vec::new();
    };
    let mut ids: Vec<u32> = rd
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// One program's counters at one moment.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    pub name: String,
    pub runs: u64,
    pub ns: u64,
}

/// The counters of programs `ids` now, from `bpftool -j prog show`.
pub fn snapshot(ids: &[u32]) -> Result<BTreeMap<u32, Counters>> {
    let out = Command::new("bpftool")
        .args(["-j", "prog", "show"])
        .output()
        .context("running bpftool")?;
    let all: Value = serde_json::from_slice(&out.stdout).context("bpftool's JSON")?;
    let mut map = BTreeMap::new();
    for p in all.as_array().into_iter().flatten() {
        let Some(id) = p["id"].as_u64().map(|i| i as u32) else {
            continue;
        };
        if ids.contains(&id) {
            let c = Counters {
                name: p["name"].as_str().unwrap_or("").to_string(),
                runs: p["run_cnt"].as_u64().unwrap_or(0),
                ns: p["run_time_ns"].as_u64().unwrap_or(0),
            };
            map.insert(id, c);
        }
    }
    Ok(map)
}

/// Runs and run time added between two snapshots, for the programs whose
/// name `keep` accepts.
pub fn delta(
    before: &BTreeMap<u32, Counters>,
    after: &BTreeMap<u32, Counters>,
    keep: impl Fn(&str) -> bool,
) -> (u64, u64) {
    after
        .iter()
        .filter(|(_, c)| keep(&c.name))
        .map(|(id, a)| {
            let b = before.get(id).cloned().unwrap_or_default();
            (a.runs.saturating_sub(b.runs), a.ns.saturating_sub(b.ns))
        })
        .fold((0, 0), |(r, n), (dr, dn)| (r + dr, n + dn))
}
