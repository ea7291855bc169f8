//! tracer: names the Gunicorn worker that a blocking syscall has stalled.
mod btf;
mod cli;
mod container;
mod correlate;
#[cfg(test)]
mod golden;
mod intake;
mod loader;
mod metrics;
mod model;
mod net;
mod output;
mod proc;
mod pystack;
mod signatures;
mod syscalls;
mod tracefs;
mod watch;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Watch(args) => watch::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, with the chain of causes, so it reads well in a log.
            eprintln!("tracer: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
