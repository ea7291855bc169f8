//! The host as /proc shows it: processes, fds, heartbeats, containers, and
//! Python stacks (read by a helper process); memory cgroups and socket diagnostics.
//! Everything read here is written by a process that may be hostile.
//! Depends on `model` only.
pub mod bounded;
#[cfg(test)]
pub(crate) mod chrooted;
pub mod container;
pub mod gunicorn;
pub mod gunicorn_conf;
pub mod heartbeat;
pub mod holders;
pub mod memcg;
pub mod privileges;
pub mod proc;
pub mod pystack;
pub mod pystack_helper;
pub mod pystack_proto;
pub mod rootfs;
pub mod sandbox;
pub mod sockdiag;
pub mod threads;
pub mod waits;
