//! JSON lines: one object per event, with `ts` added (docs/events.md).
use std::collections::BTreeMap;

use serde::Serialize;

use super::verdict::{Verdict, verdict};
use crate::model::{
    ExitCause, FeaturesMissing, Losses, MapOccupancy, PyStackCost, Summary, WorkerSummary,
};

#[derive(Serialize)]
struct Line<'a, T: Serialize> {
    #[serde(flatten)]
    body: &'a T,
    ts: String,
}

/// One JSON object, with `ts` added. Never fails for our types; a failure
/// would be a bug, reported as an error event rather than a panic.
pub fn json_line<T: Serialize>(body: &T, ts: String) -> String {
    serde_json::to_string(&Line { body, ts }).unwrap_or_else(|e| {
        format!(
            r#"{{"event":"error","message":{}}}"#,
            serde_json::Value::from(e.to_string())
        )
    })
}

#[derive(Serialize)]
#[serde(tag = "event", rename = "start")]
pub struct StartEvent {
    pub version: &'static str,
    pub threshold_ms: u64,
    /// --request-threshold: a request unanswered this long is hung.
    pub request_threshold_ms: u64,
    /// true when no --pid was given: every Gunicorn master is watched.
    pub discover: bool,
    pub pids: Vec<u32>,
    /// What this kernel does not let the tracer see at all.
    pub features_missing: FeaturesMissing,
}

/// The closing summary, with the verdict worded.
#[derive(Serialize)]
#[serde(tag = "event", rename = "summary")]
pub struct SummaryEvent<'a> {
    pub duration_ms: u64,
    /// events_lost, watch_full, conns_untracked, inflight_full, over_quota.
    #[serde(flatten)]
    pub losses: Losses,
    pub maps: MapOccupancy,
    pub workers: &'a [WorkerSummary],
    pub verdict: Verdict,
    pub exited_quiet: u64,
    /// Every exit seen, by cause (`worker_exit.cause`).
    pub exits: &'a BTreeMap<ExitCause, u64>,
    /// What reading Python stacks cost (absent with --no-py-stack).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub py_stack_cost: Option<PyStackCost>,
}

impl<'a> SummaryEvent<'a> {
    pub fn new(
        summary: &'a Summary,
        duration_ms: u64,
        losses: Losses,
        maps: MapOccupancy,
    ) -> SummaryEvent<'a> {
        SummaryEvent {
            duration_ms,
            losses,
            maps,
            workers: &summary.workers,
            verdict: verdict(summary, &losses),
            exited_quiet: summary.exited_quiet,
            exits: &summary.exits,
            py_stack_cost: None,
        }
    }
}
