//! The `tracer` binary: parse the command line, run, and turn an error into
//! one line on stderr and a non-zero exit.
use std::process::ExitCode;

use clap::Parser;
use tracer::app::{self, cli, logging};
use tracer::host::pystack_helper;

fn main() -> ExitCode {
    // The stack helper the tracer starts (re-executing this binary): no
    // command line of the user's, so not parsed as one.
    if std::env::args_os().nth(1).as_deref() == Some(pystack_helper::HELPER_ARG.as_ref()) {
        return pystack_helper::main();
    }
    // `cargo xtask bench`'s floor for BTF tracepoints (see
    // tracer-ebpf/src/floor.rs): attached until the bench kills it.
    if std::env::args_os().nth(1).as_deref() == Some("__bench-floor".as_ref()) {
        return match tracer::kernel::bench_floor() {
            Ok(_attached) => {
                eprintln!("tracer: bench floor attached");
                loop {
                    std::thread::park();
                }
            }
            Err(e) => {
                eprintln!("tracer: error: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    logging::init_logging();
    let cli = cli::Cli::parse();
    let result = match cli.command {
        cli::Command::Watch(args) => app::run(*args),
        cli::Command::Health { addr } => app::metrics_server::probe(addr),
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
