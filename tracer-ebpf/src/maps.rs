//! Every map of the object. All bounded: LRU where an entry could be missed
//! at cleanup.
use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
};
use tracer_common::{
    AnsweredClose, Bucket, Conn, ConnKey, Inflight, MAX_SYSCALL_NR, MasterLoad, OffenderKey,
    ReadHist, TGIDS_PER_SLOT, Watched, program, stat,
};

#[map]
pub static WATCHED: HashMap<u32, Watched> = HashMap::with_max_entries(8192, 0);

/// The map can be mapped into user space's memory.
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// One byte per tgid, 1 while `WATCHED` holds it: sched_switch tells an
/// unwatched task by an array read the verifier inlines, not a hash
/// lookup. Sized to cover pid_max by the loader (the default here is for
/// pid_max 32768). User space writes it through a mapping, byte by byte as
/// the kernel does, so neither side overwrites the other's bytes of a slot.
#[map]
pub static WATCHED_TGIDS: Array<[u8; TGIDS_PER_SLOT as usize]> =
    Array::with_max_entries(32768 / TGIDS_PER_SLOT, BPF_F_MMAPABLE);
/// The call each thread of a watched process sleeps in, keyed by tid;
/// removed at the thread's exit. Not an LRU: an LRU evicts the entry
/// untouched longest, which is the longest sleep, the one that matters. A
/// full map refuses the newest thread instead, counted in
/// `stat::INFLIGHT_FULL`; user space removes entries of threads that are
/// gone or no longer watched, so a missed exit cannot fill it for good.
#[map]
pub static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(32768, 0);
/// What is known of a connection before its close, keyed by socket address.
#[map]
pub static CONNS: LruHashMap<u64, Conn> = LruHashMap::with_max_entries(65536, 0);
/// Inbound connections a watched process closed first after answering,
/// keyed by four-tuple: a reset the kernel sends on one means the client's
/// next request was lost (a keep-alive race). An LRU: most are never
/// reused, and the oldest go first.
#[map]
pub static ANSWERED: LruHashMap<ConnKey, AnsweredClose> = LruHashMap::with_max_entries(16384, 0);
/// Local ports that watched processes listen on (1 = yes), indexed by port:
/// an inbound connection is established in softirq, where the task running
/// is anyone's, so the port is all there is to go by.
#[map]
pub static PORTS: Array<u8> = Array::with_max_entries(65536, 0);
#[map]
pub static READ_HIST: LruHashMap<u32, ReadHist> = LruHashMap::with_max_entries(4096, 0);
/// One all-zero ReadHist to insert from: it is too big for the BPF stack.
#[map]
pub static ZERO_HIST: Array<ReadHist> = Array::with_max_entries(1, 0);
#[map]
pub static SYSCALL_CLASS: Array<u32> = Array::with_max_entries(MAX_SYSCALL_NR, 0);
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(512 * 1024, 0);
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);
/// Failed runs, indexed by the `program` ids of tracer-common.
#[map]
pub static ERRORS: PerCpuArray<u64> = PerCpuArray::with_max_entries(program::COUNT, 0);
/// What each master's processes hold of `WATCHED` and `INFLIGHT` (see
/// `quota`). An LRU sized like `WATCHED`: a master gone without cleanup
/// is evicted, not kept for good.
#[map]
pub static MASTER_LOAD: LruHashMap<u32, MasterLoad> = LruHashMap::with_max_entries(8192, 0);
/// Each process's token bucket for connection-end and signal events.
#[map]
pub static BUCKETS: LruHashMap<u32, Bucket> = LruHashMap::with_max_entries(8192, 0);
/// Losses per counter and process, for the top offender of each.
#[map]
pub static OFFENDERS: LruHashMap<OffenderKey, u64> = LruHashMap::with_max_entries(1024, 0);
