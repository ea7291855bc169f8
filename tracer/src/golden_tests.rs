//! The output contract, end to end: a scripted run through the correlator,
//! every event as a JSON line and a text line, then the summary. The JSON is
//! docs/events.md's contract and the text is what a person reads: both are
//! compared byte for byte with `testdata/golden.txt`. After a deliberate
//! change, regenerate with `GOLDEN_UPDATE=1 cargo test -p tracer golden`.
use crate::analysis::{Correlator, Enricher, NewProcess, syscalls};
use crate::model::{
    AnsweredClose, BlockedThread, ClosedConn, Container, Direction, EndedBy, FdInfo, KernelEvent,
    LoopWait, Losses, MapOccupancy, MasterConfig, MasterSettings, MemoryCgroup, Output, PodSource,
    RaceReset, Role, Sample, Setting, SettingSource, SockSnapshot, Source, TcpState, ThreadCpu,
    ThreadNow, Wake, WokeBy, WorkerClass,
};
use crate::present::{self, Clock, SummaryEvent};

use crate::analysis::fixtures::{self, MASTER, MS, W};

const W2: u32 = 200;

/// Stands in for /proc; the scripted run sets what the heartbeat and the
/// loop thread look like at each step.
struct Fake {
    heartbeat_ms: u64,
    cpu: Option<ThreadCpu>,
}

impl Default for Fake {
    fn default() -> Fake {
        Fake {
            heartbeat_ms: 600,
            cpu: None,
        }
    }
}

impl Enricher for Fake {
    fn fd_info(&mut self, pid: u32, fd: i32) -> FdInfo {
        match fd {
            7 => fixtures::socket(7),
            11 => fixtures::self_pipe(pid),
            5 => fixtures::socket(5),
            _ => FdInfo::unknown(),
        }
    }
    fn heartbeat_age_ms(&mut self, _pid: u32) -> Option<u64> {
        Some(self.heartbeat_ms)
    }
    fn comm(&mut self, _pid: u32) -> String {
        "gunicorn\x1b[2J".into()
    }
    fn thread_name(&mut self, pid: u32, tid: u32) -> String {
        if tid == pid {
            "gunicorn\x1b[2J".into()
        } else {
            "ThreadPoolExec".into()
        }
    }
    fn socket_peer(&mut self, _pid: u32, fd: i32) -> Option<String> {
        (fd == 7).then(|| "10.0.3.7:5432".into())
    }
    fn multiplexer_fds(&mut self, _pid: u32, _tid: u32, _syscall: &str, _arg0: u64) -> Vec<i32> {
        vec![7]
    }
    fn thread_now(&mut self, _pid: u32, _tid: u32) -> ThreadNow {
        ThreadNow::InSyscall {
            nr: syscalls::number("futex").unwrap(),
            arg0: 0,
        }
    }
    fn thread_cpu(&mut self, _pid: u32, _tid: u32) -> Option<ThreadCpu> {
        self.cpu
    }
    fn container(&mut self, pid: u32) -> Option<Container> {
        (pid == W2).then(|| Container {
            id: "abc123".into(),
            runtime: Some("containerd"),
            pod_uid: Some("uid-1".into()),
            pod: Some("web-1".into()),
            namespace: Some("shop".into()),
            pod_source: Some(PodSource::LogDir),
        })
    }
    fn memory_cgroup(&mut self, _pid: u32, _cgroups: Option<&str>) -> Option<MemoryCgroup> {
        Some(fixtures::full_cgroup())
    }
    fn socket_owner(&mut self, inode: u64, pids: &[u32]) -> Option<(u32, i32)> {
        fixtures::owner_by_inode(inode, pids)
    }
    fn blocked_threads(&mut self, pid: u32) -> Vec<BlockedThread> {
        fixtures::pipe_reader(pid)
    }
}

fn sample(tgid: u32, tid: u32, name: &str, start_ms: u64, fd: u64, seq: u64) -> Sample {
    Sample {
        tid,
        tgid,
        nr: syscalls::number(name).unwrap(),
        start_ns: start_ms * MS,
        arg0: fd,
        arg2: 4,
        seq,
        active: true,
        seeded: false,
        woke_ns: 0,
        woke_by: WokeBy::None,
    }
}

fn conn(
    direction: Direction,
    bytes_in: u64,
    bytes_out: u64,
    eagain_ms: u64,
    aborted: bool,
) -> ClosedConn {
    ClosedConn {
        start_ns: Some(1000 * MS),
        bytes_in,
        bytes_out,
        eagain_ns: (eagain_ms != 0).then_some(eagain_ms * MS),
        direction,
        local_port: Some(8000),
        aborted,
        unreadable: false,
        peer: Some("127.0.0.1:40000".into()),
    }
}

fn conn_end(ts_ms: u64, pid: u32, c: ClosedConn, ended_by: EndedBy) -> KernelEvent {
    KernelEvent::ConnEnd {
        ts_ns: ts_ms * MS,
        tgid: pid,
        tid: pid,
        fd: 9,
        conn: c,
        ended_by,
        peer_closed_first: false,
    }
}

fn render(out: &mut String, events: Vec<Output>) {
    let clock = Clock::fixed(0);
    for o in events {
        out.push_str(&present::json_line(&o, clock.rfc3339(o.ts_ns())));
        out.push('\n');
        out.push_str(&present::text_line(&o, &clock));
        out.push('\n');
    }
}

fn summary(out: &mut String, c: &Correlator, now_ms: u64) {
    let s = c.summary(now_ms * MS);
    let maps = MapOccupancy {
        watched: 2,
        inflight: 1,
        conns: 0,
    };
    let losses = Losses {
        events_lost: 3,
        inflight_full: 2,
        ..Default::default()
    };
    let ev = SummaryEvent::new(&s, now_ms, losses, maps);
    out.push_str(&present::json_line(
        &ev,
        Clock::fixed(0).rfc3339(now_ms * MS),
    ));
    out.push('\n');
    out.push_str(&present::text_summary(&ev));
}

fn exit_event(ts_ms: u64, pid: u32, exit_code: Option<i32>, signal: Option<i32>) -> KernelEvent {
    KernelEvent::Exit {
        ts_ns: ts_ms * MS,
        pid,
        exit_code,
        signal,
    }
}

fn signal(ts_ms: u64, target: u32, sender: u32, comm: &str, sig: i32) -> KernelEvent {
    KernelEvent::Signal {
        ts_ns: ts_ms * MS,
        target,
        sender,
        sender_comm: comm.into(),
        sig,
    }
}

/// A master whose settings were read: its class and timeout from a config
/// file, keep-alive Gunicorn's default, its Gunicorn version read.
fn read_master() -> MasterConfig {
    let d = SettingSource::Default;
    MasterConfig {
        settings: MasterSettings {
            timeout: Some(Setting::new(4.0, SettingSource::CommandLine)),
            keepalive: Some(Setting::new(2.0, d)),
            graceful_timeout: Some(Setting::new(30.0, d)),
            max_requests_setting: Some(Setting::new(0, d)),
            threads: Some(Setting::new(1, d)),
            worker_connections: Some(Setting::new(1000, d)),
            workers: Some(Setting::new(2, SettingSource::ConfigFile)),
            gunicorn_version: Some((23, 0, 0)),
            ..Default::default()
        }
        .with_shortcuts(),
        worker_class: Some(WorkerClass {
            name: "gevent".into(),
            source: SettingSource::ConfigFile,
            evidence: None,
        }),
        config_file: Some("/srv/app/gunicorn.conf.py".into()),
        config_error: None,
    }
}

/// A master whose command line, environment and config file set nothing:
/// Gunicorn's defaults, each marked as assumed.
fn nothing_set() -> MasterConfig {
    use crate::host::gunicorn::{ConfigLayer, Layers, resolve};
    use crate::host::gunicorn_conf::parse_args;
    resolve(&Layers {
        cmd: Some(parse_args(&["app:app".to_string()])),
        env: Some(parse_args(&[])),
        conf: ConfigLayer::None,
        web_concurrency: Ok(None),
    })
}

/// Every cause of `worker_exit`, one worker each (202 to 206).
fn exits(c: &mut Correlator, f: &mut Fake, ev: &mut Vec<Output>) {
    c.configure(
        MASTER,
        MasterSettings {
            keepalive: Some(Setting::new(2.0, SettingSource::CommandLine)),
            max_requests_setting: Some(Setting::new(5, SettingSource::ConfigFile)),
            ..Default::default()
        }
        .with_shortcuts(),
    );
    // 200 closed a keep-alive connection after 2 s idle; the client's next
    // request came 0.3 s later and was reset.
    let race = RaceReset {
        ts_ns: 5350 * MS,
        close: AnsweredClose {
            closed_ns: 5050 * MS,
            idle_ns: Some(2000 * MS),
            start_ns: Some(1000 * MS),
            bytes_in: 160,
            bytes_out: 400,
            tgid: W2,
            tid: W2,
            master: MASTER,
            fd: 12,
            ended_by: EndedBy::Close,
            aborted: false,
            local_port: Some(8000),
            peer: Some("10.0.0.7:41000".into()),
        },
    };
    ev.extend(c.on_kernel(KernelEvent::KeepaliveRace(race), f));
    for pid in 202..=206 {
        let fork = KernelEvent::Fork {
            ts_ns: 5400 * MS,
            parent: MASTER,
            child: pid,
            role: Role::Worker,
            master: MASTER,
        };
        ev.extend(c.on_kernel(fork, f));
    }
    // 202: the OOM killer, mid-request (the SIGKILL comes from the task
    // that hit the limit: here the victim itself).
    ev.extend(c.on_kernel(signal(5500, 202, 202, "gunicorn", 9), f));
    let oom = KernelEvent::OomKill {
        ts_ns: 5500 * MS,
        pid: 202,
        trigger: 202,
        oom_score_adj: 0,
        rss_kb: 389_120,
        cgroups: None,
    };
    ev.extend(c.on_kernel(oom, f));
    let drop = conn_end(
        5510,
        202,
        conn(Direction::Inbound, 80, 0, 0, false),
        EndedBy::Exit,
    );
    ev.extend(c.on_kernel(drop, f));
    ev.extend(c.on_kernel(exit_event(5510, 202, None, Some(9)), f));
    // 203: an operator's kill -9.
    ev.extend(c.on_kernel(signal(5600, 203, 4242, "kill", 9), f));
    ev.extend(c.on_kernel(exit_event(5600, 203, None, Some(9)), f));
    // 204: a reload: SIGTERM from the master, a clean exit.
    ev.extend(c.on_kernel(signal(5700, 204, MASTER, "gunicorn", 15), f));
    ev.extend(c.on_kernel(exit_event(5800, 204, Some(0), None), f));
    // 205: retired after --max-requests; 206: failed to boot.
    ev.extend(c.on_kernel(exit_event(5900, 205, Some(0), None), f));
    ev.extend(c.on_kernel(exit_event(5900, 206, Some(3), None), f));
}

/// Socket inode 200001 is worker W2's (see `Fake::socket_owner`).
fn hung_sock(state: TcpState) -> SockSnapshot {
    SockSnapshot {
        inode: 200_001,
        state,
        local_port: 8000,
        peer: "127.0.0.1:40100".into(),
        unread_bytes: 0,
        has_info: true,
        last_data_sent_ms: 1300,
        last_data_recv_ms: 1200,
        bytes_acked: 0,
        bytes_received: 92,
    }
}

fn scripted_run() -> String {
    let mut out = String::new();
    let mut c = Correlator::new(500 * MS);
    c.set_request_threshold(1000 * MS);
    let f = &mut Fake::default();
    let mut ev = Vec::new();
    ev.extend(c.add_process(
        0,
        NewProcess {
            pid: MASTER,
            master: MASTER,
            role: Role::Master,
            app: Some("app:app".into()),
            timeout_s: Some(Setting::new(4.0, SettingSource::CommandLine)),
            // The seed's class, known: its pipe read can never return.
            worker_class: Some("gevent".into()),
            settings: Some(read_master()),
            source: Source::Scan,
            container: None,
        },
    ));
    ev.extend(c.add_process(
        0,
        NewProcess {
            pid: W,
            master: MASTER,
            role: Role::Worker,
            app: Some("app:app".into()),
            timeout_s: Some(Setting::new(4.0, SettingSource::CommandLine)),
            // The seed's class, known: its pipe read can never return.
            worker_class: Some("gevent".into()),
            settings: None,
            source: Source::Scan,
            container: None,
        },
    ));
    ev.extend(c.add_process(
        0,
        NewProcess {
            pid: 300,
            master: 300,
            role: Role::Plain,
            app: None,
            timeout_s: None,
            worker_class: None,
            settings: None,
            source: Source::Scan,
            container: None,
        },
    ));
    ev.extend(c.on_kernel(
        KernelEvent::Fork {
            ts_ns: MS,
            parent: MASTER,
            child: W2,
            role: Role::Worker,
            master: MASTER,
        },
        f,
    ));
    ev.extend(c.on_kernel(
        KernelEvent::Fork {
            ts_ns: MS,
            parent: W2,
            child: 201,
            role: Role::Child,
            master: MASTER,
        },
        f,
    ));
    render(&mut out, std::mem::take(&mut ev));
    // Worker W2: a socket read that stalls, then returns.
    ev.extend(c.on_samples(&[sample(W2, W2, "recvfrom", 0, 5, 1)], 600 * MS, f));
    ev.extend(c.on_kernel(
        KernelEvent::SleepEnd {
            ts_ns: 900 * MS,
            tgid: W2,
            tid: W2,
            nr: syscalls::number("recvfrom").unwrap(),
            start_ns: 0,
            wake: Wake::Returning,
            arg0: 5,
            arg2: 4,
            seeded: false,
        },
        f,
    ));
    // Worker W: the seed's pipe read, interrupted then restarted, then killed.
    ev.extend(c.on_samples(&[sample(W, W, "read", 1000, 11, 2)], 1600 * MS, f));
    // Worker W2 holds a request 1.2 s with nothing sent back (threshold 1 s).
    ev.extend(c.on_sockets(&[hung_sock(TcpState::Established)], &[], 1650 * MS, f));
    render(&mut out, std::mem::take(&mut ev));
    summary(&mut out, &c, 1700);
    // The proxy gives up on it.
    ev.extend(c.on_sockets(&[hung_sock(TcpState::CloseWait)], &[], 2500 * MS, f));
    ev.extend(c.on_kernel(
        KernelEvent::Signal {
            ts_ns: 5000 * MS,
            target: W,
            sender: MASTER,
            sender_comm: "gunicorn".into(),
            sig: 6,
        },
        f,
    ));
    // Early closes: a dropped request after EAGAIN, an idle close, an outbound cut,
    // a request dropped with unread data, a plain process's close.
    ev.extend(c.on_kernel(
        conn_end(
            2000,
            W2,
            conn(Direction::Inbound, 92, 0, 1500, false),
            EndedBy::Close,
        ),
        f,
    ));
    ev.extend(c.on_kernel(
        conn_end(
            2100,
            W2,
            conn(Direction::Inbound, 0, 0, 0, false),
            EndedBy::Close,
        ),
        f,
    ));
    ev.extend(c.on_kernel(
        conn_end(
            2200,
            W2,
            conn(Direction::Outbound, 0, 50, 1700, false),
            EndedBy::Shutdown,
        ),
        f,
    ));
    ev.extend(c.on_kernel(
        conn_end(
            2300,
            W2,
            conn(Direction::Inbound, 0, 0, 0, true),
            EndedBy::Close,
        ),
        f,
    ));
    // A TCP health check and a client that left before the answer: both
    // closed first, both counted, neither a drop.
    for bytes_in in [0, 21] {
        let mut e = conn_end(
            2400,
            W2,
            conn(Direction::Inbound, bytes_in, 0, 0, false),
            EndedBy::Shutdown,
        );
        if let KernelEvent::ConnEnd {
            peer_closed_first, ..
        } = &mut e
        {
            *peer_closed_first = true;
        }
        ev.extend(c.on_kernel(e, f));
    }
    ev.extend(c.on_kernel(
        conn_end(
            5100,
            W,
            conn(Direction::Inbound, 80, 0, 0, false),
            EndedBy::Exit,
        ),
        f,
    ));
    ev.extend(c.on_kernel(
        KernelEvent::Exit {
            ts_ns: 5200 * MS,
            pid: W,
            exit_code: None,
            signal: Some(9),
        },
        f,
    ));
    ev.extend(c.on_kernel(
        KernelEvent::Exit {
            ts_ns: 5300 * MS,
            pid: 201,
            exit_code: Some(0),
            signal: None,
        },
        f,
    ));
    render(&mut out, std::mem::take(&mut ev));
    exits(&mut c, f, &mut ev);
    render(&mut out, std::mem::take(&mut ev));
    summary(&mut out, &c, 6000);
    // A run with nothing wrong.
    let mut h = Correlator::new(500 * MS);
    ev.extend(h.add_process(
        0,
        NewProcess {
            pid: MASTER,
            master: MASTER,
            role: Role::Master,
            app: None,
            timeout_s: Some(Setting::new(30.0, SettingSource::Default)),
            worker_class: None,
            settings: Some(nothing_set()),
            source: Source::Exec,
            container: None,
        },
    ));
    ev.extend(h.add_process(
        0,
        NewProcess {
            pid: W,
            master: MASTER,
            role: Role::Worker,
            app: None,
            timeout_s: Some(Setting::new(30.0, SettingSource::Default)),
            worker_class: None,
            settings: None,
            source: Source::Scan,
            container: None,
        },
    ));
    render(&mut out, std::mem::take(&mut ev));
    summary(&mut out, &h, 100);
    // A stall that is over: the verdict names the past stall. The thread
    // woke and went back to waiting elsewhere: the call returned.
    let slept = sample(W, W, "nanosleep", 0, 0, 1);
    ev.extend(h.on_samples(&[slept], 600 * MS, f));
    let woke = Sample {
        active: false,
        woke_ns: 700 * MS,
        woke_by: WokeBy::Plain,
        ..slept
    };
    ev.extend(h.on_samples(&[woke], 800 * MS, f));
    render(&mut out, std::mem::take(&mut ev));
    summary(&mut out, &h, 900);
    stalls_of_every_kind(&mut out, f);
    out
}

/// A gevent worker whose loop is known: a wait outside its loop on a
/// PostgreSQL server, a helper thread blocked in a read, then its loop on
/// the CPU until the heartbeat comes back.
fn stalls_of_every_kind(out: &mut String, f: &mut Fake) {
    let mut ev = Vec::new();
    let mut g = Correlator::new(500 * MS);
    ev.extend(g.add_process(
        0,
        NewProcess {
            pid: W,
            master: MASTER,
            role: Role::Worker,
            app: Some("app:app".into()),
            timeout_s: Some(Setting::new(5.0, SettingSource::CommandLine)),
            worker_class: Some("gevent".into()),
            settings: None,
            source: Source::Scan,
            container: None,
        },
    ));
    ev.extend(g.set_loop(800 * MS, W, LoopWait::Epoll { epfd: 4 }));
    // The loop's own wait is idle; a poll outside it is the stall.
    ev.extend(g.on_samples(&[sample(W, W, "epoll_wait", 0, 4, 1)], 900 * MS, f));
    let poll = sample(W, W, "poll", 1000, 0x7ffd_0000, 2);
    ev.extend(g.on_samples(&[poll], 1600 * MS, f));
    ev.extend(g.on_kernel(
        KernelEvent::SleepEnd {
            ts_ns: 1800 * MS,
            tgid: W,
            tid: W,
            nr: poll.nr,
            start_ns: poll.start_ns,
            wake: Wake::Returning,
            arg0: poll.arg0,
            arg2: 4,
            seeded: false,
        },
        f,
    ));
    // A helper thread blocked in a read while a client's request waits in
    // the worker (a scan since it blocked); it woke and waits elsewhere now.
    ev.extend(g.on_sockets(&[fixtures::unanswered(101_001, 600)], &[], 2500 * MS, f));
    let helper = sample(W, W + 1, "read", 2000, 5, 1);
    ev.extend(g.on_samples(&[helper], 2600 * MS, f));
    let woke = Sample {
        active: false,
        woke_ns: 2700 * MS,
        woke_by: WokeBy::Plain,
        ..helper
    };
    ev.extend(g.on_samples(&[woke], 2750 * MS, f));
    render(out, std::mem::take(&mut ev));
    // The loop keeps the CPU: the heartbeat ages with no sleep in between.
    let cpu = |cpu_ms| ThreadCpu {
        on_cpu: true,
        cpu_ms,
        voluntary_switches: 10,
    };
    for (now_ms, heartbeat_ms, cpu_ms) in [(3000, 1200, 100), (4000, 2200, 1050)] {
        f.heartbeat_ms = heartbeat_ms;
        f.cpu = Some(cpu(cpu_ms));
        ev.extend(g.on_tick(now_ms * MS, f));
    }
    render(out, std::mem::take(&mut ev));
    summary(out, &g, 4200);
    f.heartbeat_ms = 100;
    ev.extend(g.on_tick(4500 * MS, f));
    render(out, std::mem::take(&mut ev));
    summary(out, &g, 4600);
}

#[test]
fn golden_output_is_unchanged() {
    let got = scripted_run();
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/src/testdata/golden.txt");
    if std::env::var_os("GOLDEN_UPDATE").is_some() {
        std::fs::write(path, &got).unwrap();
    }
    let want = std::fs::read_to_string(path).unwrap_or_default();
    if got != want {
        for (i, (g, w)) in got.lines().zip(want.lines()).enumerate() {
            assert_eq!(g, w, "first difference at line {}", i + 1);
        }
        assert_eq!(
            got.lines().count(),
            want.lines().count(),
            "line counts differ"
        );
    }
}
