//! What to watch: the processes given with --pid, or every Gunicorn master.
use anyhow::{Result, bail};

use crate::host::proc;
use crate::model::Role;
use crate::present::sanitize;

/// A target resolved from --pid or from discovery.
pub struct Target {
    pub pid: u32,
    pub master: u32,
    pub role: Role,
}

impl Target {
    pub fn master(pid: u32) -> Target {
        Target {
            pid,
            master: pid,
            role: Role::Master,
        }
    }
}

pub fn resolve(pids: &[u32]) -> Result<Vec<Target>> {
    let mut out = Vec::new();
    if pids.is_empty() {
        out.extend(proc::all_masters().into_iter().map(Target::master));
    }
    for &pid in pids {
        if !proc::exists(pid) {
            bail!("no process with pid {pid}; check it with `ps -p {pid}` (it may have exited)");
        }
        out.push(match proc::identify(pid) {
            proc::Identity::Master => Target::master(pid),
            proc::Identity::Worker { master } => Target {
                pid,
                master,
                role: Role::Worker,
            },
            proc::Identity::Other => {
                eprintln!(
                    "tracer: pid {pid} ({}) is not a Gunicorn master or worker; watching it as a plain process",
                    sanitize(&proc::comm(pid))
                );
                Target {
                    pid,
                    master: pid,
                    role: Role::Plain,
                }
            }
        });
    }
    Ok(out)
}
