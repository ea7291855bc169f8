//! Prometheus metrics (`--metrics-addr`), rendered from the correlator's
//! summary about once a second, so label sets follow the live workers: a
//! worker that exited disappears from every per-worker series. The HTTP
//! server that serves the text is `app::metrics_server`.
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::model::{
    ExitCause, FdKind, Losses, MapOccupancy, Role, Summary, TopOffenders, WorkerState,
    WorkerSummary,
};
use tracer_common::{HIST_BUCKETS, ReadHist, fdkind, program};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    master_pid: String,
    worker_pid: String,
    app: String,
    namespace: String,
    pod: String,
    container: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    kind: String,
}

/// A worker's --timeout, with where it came from (`default`: every place
/// Gunicorn reads it was read and none sets it).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TimeoutLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    source: String,
}

/// What a stalled worker is stalled in: `syscall` and `fd_kind` are empty
/// for a loop on the CPU.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StallLabels {
    #[prometheus(flatten)]
    worker: WorkerLabels,
    state: String,
    syscall: String,
    fd_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FdKindLabels {
    fd_kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FeatureLabels {
    feature: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OffenderLabels {
    counter: String,
    pid: String,
    namespace: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
}

fn stall_histogram() -> Histogram {
    // From the lowest useful threshold to past Gunicorn's default timeout.
    Histogram::new([0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0])
}

/// Durations of blocking syscalls that crossed the threshold, by fd kind.
/// Kept across renders (a histogram accumulates); its labels are bounded.
#[derive(Clone)]
pub struct StallDurations(Family<FdKindLabels, Histogram, fn() -> Histogram>);

impl Default for StallDurations {
    fn default() -> Self {
        StallDurations(Family::new_with_constructor(stall_histogram))
    }
}

impl StallDurations {
    pub fn observe(&self, fd_kind: FdKind, blocked_ms: u64) {
        self.0
            .get_or_create(&FdKindLabels {
                fd_kind: fd_kind.as_str().to_string(),
            })
            .observe(blocked_ms as f64 / 1000.0);
    }
}

/// The tracer's view of itself.
#[derive(Debug, Clone, Copy, Default)]
pub struct SelfStats {
    pub events_received: u64,
    pub losses: Losses,
    pub maps: MapOccupancy,
    /// Failed runs per kernel program, indexed by `program` id.
    pub bpf_errors: [u64; program::COUNT as usize],
}

fn labels(w: &WorkerSummary) -> WorkerLabels {
    let c = w.container.as_ref();
    WorkerLabels {
        master_pid: w.master_pid.to_string(),
        worker_pid: w.pid.to_string(),
        // The app argument is the traced process's: no control or hidden
        // characters in a label (ESC, CR, TAB, bidi overrides).
        app: w.app.as_deref().map(super::sanitize).unwrap_or_default(),
        namespace: c.and_then(|c| c.namespace.clone()).unwrap_or_default(),
        pod: c.and_then(|c| c.pod.clone()).unwrap_or_default(),
        container: c.map(|c| c.id.clone()).unwrap_or_default(),
    }
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The kernel's per-process histograms of reads that blocked at least 1 ms,
/// as OpenMetrics text. prometheus-client cannot take pre-aggregated
/// buckets, so this family is written by hand, in the same format.
fn read_histograms(rows: &[(WorkerLabels, ReadHist)]) -> String {
    const NAME: &str = "gunicorn_tracer_worker_blocking_read_seconds";
    let mut out = format!(
        "# HELP {NAME} Reads that blocked 1 ms or more, by fd kind, aggregated in the kernel.\n# TYPE {NAME} histogram\n"
    );
    for (l, h) in rows {
        for (kind, kind_name) in fdkind::NAMES.iter().enumerate() {
            let counts = &h.counts[kind * HIST_BUCKETS..(kind + 1) * HIST_BUCKETS];
            let total: u64 = counts.iter().sum();
            if total == 0 {
                continue;
            }
            let labels = format!(
                "master_pid=\"{}\",worker_pid=\"{}\",app=\"{}\",namespace=\"{}\",pod=\"{}\",container=\"{}\",fd_kind=\"{kind_name}\"",
                l.master_pid,
                l.worker_pid,
                escape(&l.app),
                escape(&l.namespace),
                escape(&l.pod),
                escape(&l.container)
            );
            let mut cum = 0;
            // Bucket i holds [2^i, 2^(i+1)) ms; the last one is open-ended.
            for (i, c) in counts.iter().enumerate().take(HIST_BUCKETS - 1) {
                cum += c;
                let le = (1u64 << (i + 1)) as f64 / 1000.0;
                out.push_str(&format!("{NAME}_bucket{{{labels},le=\"{le}\"}} {cum}\n"));
            }
            out.push_str(&format!("{NAME}_bucket{{{labels},le=\"+Inf\"}} {total}\n"));
            out.push_str(&format!(
                "{NAME}_sum{{{labels}}} {}\n",
                h.sum_ns[kind] as f64 / 1e9
            ));
            out.push_str(&format!("{NAME}_count{{{labels}}} {total}\n"));
        }
    }
    out
}

/// Live workers with per-worker series, at most: each adds about 20
/// series, and a node of fake workers (8,000 made the text 70-90 MB,
/// rendered every second) must not make /metrics the tracer's cost.
const MAX_WORKER_SERIES: usize = 1000;

/// The live workers given per-worker series (those with something to show
/// first, then by pid), and how many were left out.
fn listed_workers(summary: &Summary) -> (Vec<&WorkerSummary>, usize) {
    let mut live: Vec<&WorkerSummary> = summary
        .workers
        .iter()
        .filter(|w| w.role != Role::Master && w.state.is_alive())
        .collect();
    live.sort_by_key(|w| (w.state == WorkerState::Healthy && w.stalls == 0, w.pid));
    let unlisted = live.len().saturating_sub(MAX_WORKER_SERIES);
    live.truncate(MAX_WORKER_SERIES);
    (live, unlisted)
}

/// Renders the metrics text. `heartbeat_ms` reads a live worker's
/// heartbeat age and `read_hist` its kernel read histogram (from /proc and
/// the BPF map in production, stubs in tests).
pub fn render(
    summary: &Summary,
    heartbeat_ms: &mut dyn FnMut(u32) -> Option<u64>,
    read_hist: &mut dyn FnMut(u32) -> Option<ReadHist>,
    durations: &StallDurations,
    me: &SelfStats,
) -> String {
    let mut reg = Registry::with_prefix("gunicorn_tracer");
    let heartbeat = Family::<WorkerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let stalled = Family::<WorkerLabels, Gauge>::default();
    let blocked = Family::<WorkerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let stalls = Family::<WorkerLabels, Counter>::default();
    let timeouts = Family::<WorkerLabels, Counter>::default();
    let closes = Family::<KindLabels, Counter>::default();
    let hung = Family::<WorkerLabels, Counter>::default();
    let hanging = Family::<WorkerLabels, Gauge>::default();
    let timeout = Family::<TimeoutLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    let stall_info = Family::<StallLabels, Gauge>::default();
    reg.register(
        "worker_heartbeat_age_seconds",
        "Time since the worker's last Gunicorn heartbeat",
        heartbeat.clone(),
    );
    reg.register(
        "worker_stalled",
        "1 while the worker is stalled: a thread blocked in a syscall past the threshold, or its loop away from its wait past two heartbeats",
        stalled.clone(),
    );
    reg.register(
        "worker_blocked_seconds",
        "How long the current stall has lasted (0 when not stalled)",
        blocked.clone(),
    );
    reg.register(
        "worker_stall_info",
        "1 for a stalled worker, labelled with what it is stalled in (state, syscall, fd_kind); no series when it is not stalled",
        stall_info.clone(),
    );
    reg.register(
        "worker_timeout_seconds",
        "The worker's Gunicorn --timeout and where it came from (source); no series when the tracer could not read it",
        timeout.clone(),
    );
    reg.register("worker_stalls", "Stalls seen", stalls.clone());
    reg.register(
        "worker_timeouts",
        "SIGABRT/SIGKILL sent by the master (WORKER TIMEOUT)",
        timeouts.clone(),
    );
    reg.register(
        "worker_early_closes",
        "Connections ended with nothing sent back, by kind (dropped_request, idle, upstream_cut, probe, client_abort)",
        closes.clone(),
    );
    reg.register(
        "worker_hung_requests",
        "Requests held past --request-threshold with nothing sent back",
        hung.clone(),
    );
    reg.register(
        "worker_requests_hanging",
        "Requests held past --request-threshold with nothing sent back, now",
        hanging.clone(),
    );
    reg.register(
        "stall_duration_seconds",
        "Duration of blocking syscalls that crossed the threshold, by fd kind",
        durations.0.clone(),
    );
    let mut hist_rows = Vec::new();
    let (listed, unlisted) = listed_workers(summary);
    for w in listed {
        let l = labels(w);
        if let Some(h) = read_hist(w.pid) {
            hist_rows.push((l.clone(), h));
        }
        if let Some(hb) = heartbeat_ms(w.pid) {
            heartbeat.get_or_create(&l).set(hb as f64 / 1000.0);
        }
        let now_stalled = w.state == WorkerState::Stalled;
        stalled.get_or_create(&l).set(now_stalled as i64);
        let b = if now_stalled {
            w.stall.as_ref().map(|s| s.blocked_ms).unwrap_or(0)
        } else {
            0
        };
        blocked.get_or_create(&l).set(b as f64 / 1000.0);
        if let Some(st) = w.stall.as_ref().filter(|_| now_stalled) {
            let on_fd = st.syscall.is_some();
            stall_info
                .get_or_create(&StallLabels {
                    worker: l.clone(),
                    state: st.state.as_str().to_string(),
                    syscall: st.syscall_name().to_string(),
                    fd_kind: if on_fd { st.fd_kind.as_str() } else { "" }.to_string(),
                })
                .set(1);
        }
        if let Some(t) = w.timeout {
            timeout
                .get_or_create(&TimeoutLabels {
                    worker: l.clone(),
                    source: t.source.as_str().to_string(),
                })
                .set(t.value);
        }
        stalls.get_or_create(&l).inc_by(w.stalls as u64);
        timeouts.get_or_create(&l).inc_by(w.timeouts as u64);
        hung.get_or_create(&l).inc_by(w.hung_requests as u64);
        hanging.get_or_create(&l).set(w.hanging_now as i64);
        for (kind, n) in w.early_closes.by_kind() {
            let kl = KindLabels {
                worker: l.clone(),
                kind: kind.as_str().to_string(),
            };
            closes.get_or_create(&kl).inc_by(n as u64);
        }
    }
    let unlisted_gauge = Gauge::<i64>::default();
    unlisted_gauge.set(unlisted as i64);
    reg.register(
        "workers_unlisted",
        "Live workers given no per-worker series: past the cap of 1000, those without a finding are left out (the summary still has them)",
        unlisted_gauge,
    );
    let received = Counter::<u64>::default();
    received.inc_by(me.events_received);
    let counter = |n: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        c
    };
    let features = Family::<FeatureLabels, Gauge>::default();
    for (feature, missing) in me.losses.features_missing.each() {
        features
            .get_or_create(&FeatureLabels {
                feature: feature.into(),
            })
            .set(i64::from(!missing));
    }
    reg.register(
        "feature_available",
        "1 when this kernel lets the tracer see the feature (oom_kill, keepalive_race, preceded_by), 0 when it cannot: such findings are never reported here",
        features,
    );
    let maps = Family::<MapLabels, Gauge>::default();
    for (m, n) in [
        ("watched", me.maps.watched),
        ("inflight", me.maps.inflight),
        ("conns", me.maps.conns),
    ] {
        maps.get_or_create(&MapLabels { map: m.into() })
            .set(n as i64);
    }
    reg.register(
        "events_received",
        "Events received from the kernel",
        received,
    );
    // What the tracer could not see, each counted where it was lost.
    let l = &me.losses;
    for (name, help, n) in [
        (
            "events_lost",
            "Kernel events dropped because the ring buffer was full",
            l.events_lost,
        ),
        (
            "watch_full",
            "Forked processes not watched because the kernel's watch list was full",
            l.watch_full,
        ),
        (
            "conns_untracked",
            "Connections whose start could not be recorded (the connection map refused it)",
            l.conns_untracked,
        ),
        (
            "inflight_full",
            "Thread sleeps not recorded because the kernel's in-flight map was full",
            l.inflight_full,
        ),
        (
            "conns_unreadable",
            "Closed connections whose byte counters could not be read (how they ended is not known)",
            l.conns_unreadable,
        ),
        (
            "stall_ends_unknown",
            "Reported stalls whose call vanished from the kernel's map with no word on how it ended",
            l.stall_ends_unknown,
        ),
        (
            "ports_unscanned",
            "Listening ports past the 64 scanned per network namespace (a request hung on one is not seen)",
            l.ports_unscanned,
        ),
        (
            "stalls_held_back",
            "Stalls not reported: their master had more new stalls at once than are reported per poll, and they ended before their turn",
            l.stalls_held_back,
        ),
        (
            "holders_unsearched",
            "Stalls on a pipe reported without a search for the pipe's holders (the search's time budget was spent)",
            l.holders_unsearched,
        ),
        (
            "over_quota",
            "Forked processes not watched because their master had --max-watched-per-master",
            l.over_quota,
        ),
        (
            "masters_over_quota",
            "Gunicorn masters discovery did not watch because their container had --max-masters-per-container",
            l.masters_over_quota,
        ),
        (
            "threads_over_quota",
            "Thread sleeps not recorded because their master's threads held --max-threads-per-master in-flight entries",
            l.threads_over_quota,
        ),
        (
            "events_rate_limited",
            "Connection-end and signal events not sent because their process was over its rate",
            l.events_rate_limited,
        ),
    ] {
        reg.register(name, help, counter(n));
    }
    register_offenders(&mut reg, &l.top_offenders, &summary.workers);
    reg.register("map_entries", "Entries in the tracer's kernel maps", maps);
    register_bpf_errors(&mut reg, &me.bpf_errors);
    register_exits(&mut reg, summary);
    let mut out = String::new();
    if encode(&mut out, &reg).is_err() {
        out = "# encoding failed\n".into();
    }
    // Splice the hand-written family in before the end marker.
    let hist = read_histograms(&hist_rows);
    match out.rfind("# EOF") {
        Some(at) => out.insert_str(at, &hist),
        None => out.push_str(&hist),
    }
    out
}

/// Runs of each kernel program that failed and were skipped (a refused
/// read, a full map): every program has a series, zero included.
/// One series per kernel loss counter that has an offender: the process
/// charged most, with its pod when known. At most seven series.
fn register_offenders(reg: &mut Registry, top: &TopOffenders, workers: &[WorkerSummary]) {
    let family = Family::<OffenderLabels, Gauge>::default();
    for (name, o) in top.each() {
        let Some(o) = o else { continue };
        let c = workers
            .iter()
            .find(|w| w.pid == o.pid)
            .and_then(|w| w.container.as_ref());
        let l = OffenderLabels {
            counter: name.to_string(),
            pid: o.pid.to_string(),
            namespace: c.and_then(|c| c.namespace.clone()).unwrap_or_default(),
            pod: c.and_then(|c| c.pod.clone()).unwrap_or_default(),
        };
        family
            .get_or_create(&l)
            .set(i64::try_from(o.count).unwrap_or(i64::MAX));
    }
    reg.register(
        "loss_top_offender",
        "For each loss counter, the process it was charged to most (pid as the host sees it, pod when known) and how many times",
        family,
    );
}

fn register_bpf_errors(reg: &mut Registry, errors: &[u64]) {
    let family = Family::<ProgramLabels, Counter>::default();
    for (name, n) in program::NAMES.iter().zip(errors) {
        let l = ProgramLabels {
            program: name.to_string(),
        };
        family.get_or_create(&l).inc_by(*n);
    }
    reg.register(
        "bpf_errors",
        "Runs of a kernel program that failed and were skipped, by program",
        family,
    );
}

/// Exits of watched processes by cause, since the start (the processes
/// themselves leave the per-worker series): every cause has a series.
fn register_exits(reg: &mut Registry, summary: &Summary) {
    let family = Family::<CauseLabels, Counter>::default();
    for cause in ExitCause::ALL {
        let n = summary.exits.get(&cause).copied().unwrap_or(0);
        let l = CauseLabels {
            cause: cause.as_str().to_string(),
        };
        family.get_or_create(&l).inc_by(n);
    }
    reg.register(
        "worker_exits",
        "Exits of watched processes by cause: worker_timeout, oom_kill, master_signal, external_signal, max_requests, exit",
        family,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CloseCounts, Container};

    fn worker(pid: u32, state: WorkerState) -> WorkerSummary {
        WorkerSummary {
            app: Some("app:app".into()),
            state,
            stalls: 2,
            timeouts: 1,
            early_closes: CloseCounts {
                dropped_request: 3,
                idle: 4,
                ..Default::default()
            },
            container: Some(Container {
                id: "abc".into(),
                pod: Some("web-1".into()),
                namespace: Some("shop".into()),
                ..Default::default()
            }),
            ..WorkerSummary::quiet(pid)
        }
    }

    fn summary(workers: Vec<WorkerSummary>) -> Summary {
        Summary {
            workers,
            exited_quiet: 0,
            findings: vec![],
            threshold_ms: 500,
            exits: Default::default(),
        }
    }

    #[test]
    fn renders_per_worker_series_with_container_labels() {
        let d = StallDurations::default();
        d.observe(FdKind::Pipe, 1500);
        let me = SelfStats {
            events_received: 9,
            losses: Losses {
                events_lost: 1,
                watch_full: 4,
                conns_untracked: 5,
                inflight_full: 7,
                conns_unreadable: 8,
                stall_ends_unknown: 9,
                ports_unscanned: 2,
                stalls_held_back: 3,
                holders_unsearched: 11,
                over_quota: 6,
                threads_over_quota: 12,
                events_rate_limited: 13,
                masters_over_quota: 14,
                top_offenders: TopOffenders {
                    inflight_full: Some(crate::model::Offender { pid: 7, count: 6 }),
                    events_rate_limited: Some(crate::model::Offender { pid: 99, count: 13 }),
                    ..Default::default()
                },
                bpf_errors: 0,
                features_missing: Default::default(),
            },
            maps: MapOccupancy {
                watched: 3,
                inflight: 5,
                conns: 0,
            },
            ..Default::default()
        };
        let mut h = ReadHist::default();
        h.counts[fdkind::PIPE * HIST_BUCKETS] = 2; // two reads of 1-2 ms
        h.counts[fdkind::PIPE * HIST_BUCKETS + 3] = 1; // one of 8-16 ms
        h.sum_ns[fdkind::PIPE] = 13_000_000;
        let t = render(
            &summary(vec![worker(7, WorkerState::Healthy)]),
            &mut |_| Some(1200),
            &mut |_| Some(h),
            &d,
            &me,
        );
        let r = r#"gunicorn_tracer_worker_blocking_read_seconds_bucket{master_pid="1",worker_pid="7",app="app:app",namespace="shop",pod="web-1",container="abc",fd_kind="pipe""#;
        assert!(t.contains(&format!(r#"{r},le="0.002"}} 2"#)), "{t}");
        assert!(t.contains(&format!(r#"{r},le="0.008"}} 2"#)), "{t}");
        assert!(t.contains(&format!(r#"{r},le="0.016"}} 3"#)), "{t}");
        assert!(t.contains(&format!(r#"{r},le="+Inf"}} 3"#)), "{t}");
        assert!(t.contains(r#"gunicorn_tracer_worker_blocking_read_seconds_sum{master_pid="1",worker_pid="7",app="app:app",namespace="shop",pod="web-1",container="abc",fd_kind="pipe"} 0.013"#), "{t}");
        assert!(
            !t.contains(r#"fd_kind="socket",le"#),
            "empty kinds are left out"
        );
        let l = r#"app="app:app",namespace="shop",pod="web-1",container="abc""#;
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_heartbeat_age_seconds{{master_pid="1",worker_pid="7",{l}}} 1.2"#)), "{t}");
        assert!(
            t.contains(&format!(
                r#"gunicorn_tracer_worker_stalled{{master_pid="1",worker_pid="7",{l}}} 0"#
            )),
            "{t}"
        );
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_early_closes_total{{master_pid="1",worker_pid="7",{l},kind="dropped_request"}} 3"#)), "{t}");
        assert!(
            t.contains(&format!(
                r#"gunicorn_tracer_worker_timeouts_total{{master_pid="1",worker_pid="7",{l}}} 1"#
            )),
            "{t}"
        );
        assert!(
            t.contains(
                r#"gunicorn_tracer_stall_duration_seconds_bucket{le="2.5",fd_kind="pipe"} 1"#
            ),
            "{t}"
        );
        assert!(t.contains("gunicorn_tracer_events_lost_total 1"), "{t}");
        assert!(t.contains("gunicorn_tracer_watch_full_total 4"), "{t}");
        assert!(t.contains("gunicorn_tracer_conns_untracked_total 5"), "{t}");
        assert!(t.contains("gunicorn_tracer_over_quota_total 6"), "{t}");
        assert!(
            t.contains("gunicorn_tracer_threads_over_quota_total 12")
                && t.contains("gunicorn_tracer_masters_over_quota_total 14")
                && t.contains("gunicorn_tracer_events_rate_limited_total 13"),
            "{t}"
        );
        // The offender's pod when the summary has the process; the pid
        // alone when it does not.
        assert!(t.contains(r#"gunicorn_tracer_loss_top_offender{counter="inflight_full",pid="7",namespace="shop",pod="web-1"} 6"#), "{t}");
        assert!(t.contains(r#"gunicorn_tracer_loss_top_offender{counter="events_rate_limited",pid="99",namespace="",pod=""} 13"#), "{t}");
        assert!(
            !t.contains(r#"counter="watch_full""#),
            "no offender for a counter with none: {t}"
        );
        assert!(t.contains("gunicorn_tracer_inflight_full_total 7"), "{t}");
        assert!(
            t.contains("gunicorn_tracer_conns_unreadable_total 8"),
            "{t}"
        );
        assert!(
            t.contains("gunicorn_tracer_stall_ends_unknown_total 9")
                && t.contains("gunicorn_tracer_stalls_held_back_total 3")
                && t.contains("gunicorn_tracer_holders_unsearched_total 11")
                && t.contains("gunicorn_tracer_ports_unscanned_total 2"),
            "{t}"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_map_entries{map="watched"} 3"#),
            "{t}"
        );
        assert!(t.ends_with("# EOF\n"));
    }

    #[test]
    fn kernel_program_errors_have_one_series_per_program() {
        let mut me = SelfStats::default();
        me.bpf_errors[program::INET_SOCK_SET_STATE as usize] = 4;
        let t = render(
            &summary(vec![]),
            &mut |_| None,
            &mut |_| None,
            &StallDurations::default(),
            &me,
        );
        assert!(
            t.contains(r#"gunicorn_tracer_bpf_errors_total{program="inet_sock_set_state"} 4"#),
            "{t}"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_bpf_errors_total{program="sched_switch"} 0"#),
            "{t}"
        );
        assert_eq!(
            t.matches("gunicorn_tracer_bpf_errors_total{").count(),
            program::COUNT as usize
        );
        assert!(
            t.contains("# TYPE gunicorn_tracer_bpf_errors counter"),
            "{t}"
        );
    }

    #[test]
    fn exits_are_counted_by_cause_with_every_cause_present() {
        let mut s = summary(vec![]);
        s.exits.insert(ExitCause::OomKill, 2);
        let t = render(
            &s,
            &mut |_| None,
            &mut |_| None,
            &StallDurations::default(),
            &SelfStats::default(),
        );
        assert!(
            t.contains(r#"gunicorn_tracer_worker_exits_total{cause="oom_kill"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_worker_exits_total{cause="max_requests"} 0"#),
            "{t}"
        );
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    /// Issue 20, item 14: the app label kept ESC, CR, TAB and bidi
    /// overrides from the traced process's command line.
    #[test]
    fn the_app_label_carries_no_control_or_hidden_characters() {
        let w = WorkerSummary {
            app: Some("app\x1b[2J\r\t\u{202E}:app".into()),
            ..worker(7, WorkerState::Healthy)
        };
        assert_eq!(labels(&w).app, "app?[2J???:app");
    }

    #[test]
    fn exited_workers_leave_the_series() {
        let t = render(
            &summary(vec![
                worker(7, WorkerState::Healthy),
                worker(8, WorkerState::Exited),
                worker(9, WorkerState::KilledByTimeout),
            ]),
            &mut |_| None,
            &mut |_| {
                Some(ReadHist {
                    counts: [1; fdkind::COUNT * HIST_BUCKETS],
                    sum_ns: [1; fdkind::COUNT],
                })
            },
            &StallDurations::default(),
            &SelfStats::default(),
        );
        assert!(t.contains(r#"worker_pid="7""#));
        assert!(!t.contains(r#"worker_pid="8""#), "{t}");
        assert!(!t.contains(r#"worker_pid="9""#), "{t}");
    }

    /// A stalled worker's series name what it is stalled in, and its
    /// --timeout with where it came from, so an alert can compare the two;
    /// a healthy worker has no stall series, and an unread timeout none.
    #[test]
    fn stall_info_and_timeout_are_said_only_when_known() {
        use crate::model::{Setting, SettingSource, StallReport, StallState};
        let stalled = WorkerSummary {
            stall: Some(StallReport {
                state: StallState::Blocked,
                syscall: Some("read".into()),
                fd_kind: FdKind::Pipe,
                blocked_ms: 16_000,
                ..Default::default()
            }),
            timeout: Some(Setting::new(30.0, SettingSource::Default)),
            ..worker(7, WorkerState::Stalled)
        };
        let on_cpu = WorkerSummary {
            stall: Some(StallReport {
                state: StallState::OnCpu,
                blocked_ms: 2_000,
                ..Default::default()
            }),
            timeout: Some(Setting::new(8.0, SettingSource::CommandLine)),
            ..worker(8, WorkerState::Stalled)
        };
        // Healthy now, with its last stall kept: no stall series.
        let healthy = WorkerSummary {
            stall: stalled.stall.clone(),
            ..worker(9, WorkerState::Healthy)
        };
        let t = render(
            &summary(vec![stalled, on_cpu, healthy]),
            &mut |_| None,
            &mut |_| None,
            &StallDurations::default(),
            &SelfStats::default(),
        );
        let l = r#"app="app:app",namespace="shop",pod="web-1",container="abc""#;
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_stall_info{{master_pid="1",worker_pid="7",{l},state="blocked",syscall="read",fd_kind="pipe"}} 1"#)), "{t}");
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_stall_info{{master_pid="1",worker_pid="8",{l},state="on_cpu",syscall="",fd_kind=""}} 1"#)), "{t}");
        assert!(
            !t.contains(r#"gunicorn_tracer_worker_stall_info{master_pid="1",worker_pid="9""#),
            "{t}"
        );
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_timeout_seconds{{master_pid="1",worker_pid="7",{l},source="default"}} 30"#)), "{t}");
        assert!(t.contains(&format!(r#"gunicorn_tracer_worker_timeout_seconds{{master_pid="1",worker_pid="8",{l},source="command_line"}} 8"#)), "{t}");
        assert!(
            !t.contains(r#"gunicorn_tracer_worker_timeout_seconds{master_pid="1",worker_pid="9""#),
            "not read: no series: {t}"
        );
    }

    /// Each feature the kernel may lack is a series: 1 seen, 0 not.
    #[test]
    fn feature_availability_is_said_for_each_feature() {
        use crate::model::FeaturesMissing;
        let me = SelfStats {
            losses: Losses {
                features_missing: FeaturesMissing {
                    keepalive_race: true,
                    ..Default::default()
                },
                ..Default::default()
            },
            ..Default::default()
        };
        let t = render(
            &summary(vec![]),
            &mut |_| None,
            &mut |_| None,
            &StallDurations::default(),
            &me,
        );
        assert!(
            t.contains(r#"gunicorn_tracer_feature_available{feature="keepalive_race"} 0"#),
            "{t}"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_feature_available{feature="oom_kill"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_feature_available{feature="preceded_by"} 1"#),
            "{t}"
        );
    }

    /// Issue 20, item 10: every watched worker got its series, so 8,000
    /// fake workers made a 70-90 MB text rendered every second.
    #[test]
    fn per_worker_series_are_capped_findings_first_and_the_rest_counted() {
        let mut workers: Vec<WorkerSummary> = (0..1500)
            .map(|pid| worker(10_000 + pid, WorkerState::Healthy))
            .map(|w| WorkerSummary { stalls: 0, ..w })
            .collect();
        workers.push(WorkerSummary {
            stalls: 1,
            ..worker(99_999, WorkerState::Stalled)
        });
        let t = render(
            &summary(workers),
            &mut |_| None,
            &mut |_| None,
            &StallDurations::default(),
            &SelfStats::default(),
        );
        let listed = t
            .lines()
            .filter(|l| l.starts_with("gunicorn_tracer_worker_stalled{"))
            .count();
        assert_eq!(listed, MAX_WORKER_SERIES);
        assert!(
            t.contains("gunicorn_tracer_workers_unlisted 501"),
            "counted"
        );
        assert!(
            t.contains(r#"gunicorn_tracer_worker_stalled{master_pid="1",worker_pid="99999""#),
            "the stalled worker is listed"
        );
    }
}
