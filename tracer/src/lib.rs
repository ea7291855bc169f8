//! tracer: names the Gunicorn worker that a blocking syscall has stalled.
//!
//! The rooms, and the one way they depend on each other
//! (model <- analysis <- present <- app; kernel and host use model only):
//! - [`model`]: plain data: processes, fds, kernel events, reports, summaries;
//! - [`kernel`]: BTF, tracefs, loading the BPF programs, decoding their events;
//! - [`host`]: /proc discovery, containers, py-spy;
//! - [`analysis`]: the pure correlator, signatures and syscall classes;
//! - [`present`]: JSON lines, the text view and its verdict, Prometheus metrics;
//! - [`app`]: the `watch` session: CLI, run loop, sinks, metrics server.
pub mod analysis;
pub mod app;
pub mod host;
pub mod kernel;
pub mod model;
pub mod present;

#[cfg(test)]
mod golden_tests;
