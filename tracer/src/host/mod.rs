//! The host as /proc shows it: processes, fds, heartbeats, containers, and
//! py-spy for Python stacks. Everything read here is written by a process
//! that may be hostile. Depends on `model` only.
pub mod container;
pub mod proc;
pub mod pystack;
pub mod waits;
