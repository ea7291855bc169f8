//! Just enough of a BTF reader to find struct member offsets in the running
//! kernel's /sys/kernel/btf/vmlinux. Rust eBPF emits no CO-RE relocations,
//! so user space looks the offsets up and hands them to the programs.
const MAGIC: u16 = 0xeb9f;

// BTF kinds and the bytes that follow their 12-byte common header.
const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// A parsed BTF blob. It keeps the raw bytes and one offset per type, and
/// reads names and members on demand: no per-type allocations, so parsing
/// the kernel's 100,000+ types leaves nothing behind in the heap.
pub struct Btf {
    data: Vec<u8>,
    types_at: usize,
    strings: std::ops::Range<usize>,
    /// Byte offset (from `types_at`) of each type; type id `i` is at `i - 1`.
    type_offsets: Vec<u32>,
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl Btf {
    /// Parses a little-endian BTF blob; None if it is not one.
    pub fn parse(data: Vec<u8>) -> Option<Btf> {
        let b = &data;
        if u16_at(b, 0)? != MAGIC {
            return None;
        }
        let hdr_len = u32_at(b, 4)? as usize;
        let (type_off, type_len) = (u32_at(b, 8)? as usize, u32_at(b, 12)? as usize);
        let (str_off, str_len) = (u32_at(b, 16)? as usize, u32_at(b, 20)? as usize);
        let types_at = hdr_len + type_off;
        let types = b.get(types_at..types_at + type_len)?;
        let strings = hdr_len + str_off..hdr_len + str_off + str_len;
        b.get(strings.clone())?;
        let mut type_offsets = Vec::new();
        let mut at = 0usize;
        while at + 12 <= types.len() {
            type_offsets.push(at as u32);
            let info = u32_at(types, at + 4)?;
            let vlen = (info & 0xffff) as usize;
            at += 12
                + match (info >> 24) & 0x1f {
                    KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
                    KIND_ARRAY => 12,
                    KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => 12 * vlen,
                    KIND_ENUM | KIND_FUNC_PROTO => 8 * vlen,
                    _ => 0,
                };
        }
        if at != types.len() {
            return None; // truncated or an unknown layout
        }
        Some(Btf {
            data,
            types_at,
            strings,
            type_offsets,
        })
    }

    pub fn from_sys_fs() -> Option<Btf> {
        Btf::parse(std::fs::read("/sys/kernel/btf/vmlinux").ok()?)
    }

    fn name(&self, off: u32) -> &[u8] {
        let s = self
            .data
            .get(self.strings.start + off as usize..self.strings.end)
            .unwrap_or_default();
        &s[..s.iter().position(|b| *b == 0).unwrap_or(s.len())]
    }

    fn u32(&self, type_at: usize, field: usize) -> Option<u32> {
        u32_at(&self.data, self.types_at + type_at + field)
    }

    /// (name offset, info) of type `id`.
    fn header(&self, id: u32) -> Option<(usize, u32, u32)> {
        let at = *self.type_offsets.get(id.checked_sub(1)? as usize)? as usize;
        Some((at, self.u32(at, 0)?, self.u32(at, 4)?))
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// unions and structs, as C does.
    pub fn member_offset(&self, name: &str, member: &str) -> Option<u64> {
        let id = (1..=self.type_offsets.len() as u32).find(|id| {
            self.header(*id).is_some_and(|(_, name_off, info)| {
                (info >> 24) & 0x1f == KIND_STRUCT && self.name(name_off) == name.as_bytes()
            })
        })?;
        self.find(id, member.as_bytes(), 0, 0).map(|bits| bits / 8)
    }

    /// Whether `enum name` (ENUM or ENUM64) has a member called `member`;
    /// None when this BTF has no such enum. The kernel's own enums list
    /// what it offers: `enum bpf_func_id` its BPF helpers,
    /// `bpf_prog_type` its program types, `bpf_map_type` its map types.
    pub fn enum_has(&self, name: &str, member: &str) -> Option<bool> {
        let (at, info) = (1..=self.type_offsets.len() as u32).find_map(|id| {
            let (at, name_off, info) = self.header(id)?;
            let kind = (info >> 24) & 0x1f;
            ((kind == KIND_ENUM || kind == KIND_ENUM64) && self.name(name_off) == name.as_bytes())
                .then_some((at, info))
        })?;
        let stride = if (info >> 24) & 0x1f == KIND_ENUM64 {
            12
        } else {
            8
        };
        Some((0..(info & 0xffff) as usize).any(|i| {
            self.u32(at + 12 + stride * i, 0)
                .is_some_and(|off| self.name(off) == member.as_bytes())
        }))
    }

    /// Whether this BTF has a function called `name` (a FUNC entry: the
    /// kernel has it as a function of its own, not only inlined).
    pub fn has_func(&self, name: &str) -> bool {
        (1..=self.type_offsets.len() as u32).any(|id| {
            self.header(id).is_some_and(|(_, name_off, info)| {
                (info >> 24) & 0x1f == KIND_FUNC && self.name(name_off) == name.as_bytes()
            })
        })
    }

    /// Size in bytes of `struct name`.
    pub fn struct_size(&self, name: &str) -> Option<u64> {
        (1..=self.type_offsets.len() as u32).find_map(|id| {
            let (at, name_off, info) = self.header(id)?;
            ((info >> 24) & 0x1f == KIND_STRUCT && self.name(name_off) == name.as_bytes())
                .then(|| self.u32(at, 8))?
                .map(u64::from)
        })
    }

    /// The arguments tracepoint `name` passes a BTF-typed program, each
    /// as whether it is a pointer; None when BTF has no such tracepoint.
    /// Read from the kernel's `btf_trace_<name>` typedef, a pointer to
    /// `void (void *, args...)`: the leading context pointer is left out.
    pub fn tracepoint_args(&self, name: &str) -> Option<Vec<bool>> {
        let want = format!("btf_trace_{name}");
        let id = (1..=self.type_offsets.len() as u32).find(|id| {
            self.header(*id).is_some_and(|(_, name_off, info)| {
                (info >> 24) & 0x1f == KIND_TYPEDEF && self.name(name_off) == want.as_bytes()
            })
        })?;
        let ptr = self.target(id)?;
        let (at, _, info) = self.header(ptr)?;
        if (info >> 24) & 0x1f != KIND_PTR {
            return None;
        }
        let proto = self.u32(at, 8)?;
        let (at, _, info) = self.header(proto)?;
        if (info >> 24) & 0x1f != KIND_FUNC_PROTO {
            return None;
        }
        (1..(info & 0xffff) as usize)
            .map(|i| {
                let ty = self.u32(at + 12 + 8 * i, 4)?;
                let (_, _, info) = self.header(self.target(ty)?)?;
                Some((info >> 24) & 0x1f == KIND_PTR)
            })
            .collect()
    }

    /// Type `id` through typedefs and qualifiers (at most 16 deep).
    fn target(&self, mut id: u32) -> Option<u32> {
        for _ in 0..16 {
            let (at, _, info) = self.header(id)?;
            match (info >> 24) & 0x1f {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = self.u32(at, 8)?;
                }
                _ => return Some(id),
            }
        }
        None
    }

    fn find(&self, id: u32, member: &[u8], base_bits: u64, depth: u32) -> Option<u64> {
        let (at, _, info) = self.header(id)?;
        let kind = (info >> 24) & 0x1f;
        if (kind != KIND_STRUCT && kind != KIND_UNION) || depth > 8 {
            return None;
        }
        let kind_flag = info >> 31 == 1;
        for i in 0..(info & 0xffff) as usize {
            let m = at + 12 + 12 * i;
            let (name_off, type_id, off) = (self.u32(m, 0)?, self.u32(m, 4)?, self.u32(m, 8)?);
            // With kind_flag the top 8 bits are a bitfield size.
            let bits = base_bits + if kind_flag { off & 0x00ff_ffff } else { off } as u64;
            let name = self.name(name_off);
            if name == member {
                return Some(bits);
            }
            if name.is_empty()
                && let Some(found) = self.find(type_id, member, bits, depth + 1)
            {
                return Some(found);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny BTF blob: struct inner { int a; int b; }; and struct outer
    /// { long x; union { int y; struct inner in; }; char z; } (the union is
    /// anonymous), plus an INT type that must be skipped correctly.
    fn blob() -> Vec<u8> {
        let strings = b"\0int\0a\0b\0inner\0outer\0x\0y\0in\0z\0bpf_func_id\0BPF_FUNC_unspec\0BPF_FUNC_map_lookup_elem\0tcp_v4_send_reset\0btf_trace_demo\0task\0n\0".to_vec();
        let s = |name: &str| -> u32 {
            let pos = strings
                .windows(name.len() + 2)
                .position(|w| {
                    w[0] == 0 && &w[1..=name.len()] == name.as_bytes() && w[name.len() + 1] == 0
                })
                .unwrap();
            (pos + 1) as u32
        };
        let mut t = Vec::new();
        let mut push = |v: u32| t.extend_from_slice(&v.to_le_bytes());
        // 1: int (INT, size 4, 4 extra bytes)
        push(s("int"));
        push(KIND_INT << 24);
        push(4);
        push(32);
        // 2: struct inner { a @0, b @32 bits }
        push(s("inner"));
        push((KIND_STRUCT << 24) | 2);
        push(8);
        for (n, off) in [("a", 0), ("b", 32)] {
            push(s(n));
            push(1);
            push(off);
        }
        // 3: anonymous union { y, in }
        push(0);
        push((KIND_UNION << 24) | 2);
        push(8);
        for (n, ty) in [("y", 1), ("in", 2)] {
            push(s(n));
            push(ty);
            push(0);
        }
        // 4: struct outer { x @0, <anon union> @64, z @128 }
        push(s("outer"));
        push((KIND_STRUCT << 24) | 3);
        push(24);
        for (n, ty, off) in [("", 3, 64), ("x", 1, 0), ("z", 1, 128)] {
            push(if n.is_empty() { 0 } else { s(n) });
            push(ty);
            push(off);
        }
        // 5: enum bpf_func_id { BPF_FUNC_unspec, BPF_FUNC_map_lookup_elem }
        push(s("bpf_func_id"));
        push((KIND_ENUM << 24) | 2);
        push(4);
        for (i, n) in ["BPF_FUNC_unspec", "BPF_FUNC_map_lookup_elem"]
            .iter()
            .enumerate()
        {
            push(s(n));
            push(i as u32);
        }
        // 6: void (*)(void), then 7: FUNC tcp_v4_send_reset of that type.
        push(0);
        push(KIND_FUNC_PROTO << 24);
        push(0);
        push(s("tcp_v4_send_reset"));
        push(KIND_FUNC << 24);
        push(6);
        // A tracepoint's typedef: 8: void *, 9: const struct inner *,
        // 10: void (void *, const struct inner *task, int n), 11: a
        // pointer to it, 12: typedef btf_trace_demo.
        push(0);
        push(KIND_PTR << 24);
        push(0);
        push(0);
        push(KIND_CONST << 24);
        push(2);
        push(0);
        push((KIND_FUNC_PROTO << 24) | 3);
        push(0);
        for (n, ty) in [("", 8), ("task", 14), ("n", 1)] {
            push(if n.is_empty() { 0 } else { s(n) });
            push(ty);
        }
        push(0);
        push(KIND_PTR << 24);
        push(10);
        push(s("btf_trace_demo"));
        push(KIND_TYPEDEF << 24);
        push(11);
        // 13: unused; 14: pointer to the const struct (9).
        push(0);
        push(KIND_PTR << 24);
        push(0);
        push(0);
        push(KIND_PTR << 24);
        push(9);
        let mut b = Vec::new();
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.push(1); // version
        b.push(0); // flags
        b.extend_from_slice(&24u32.to_le_bytes()); // hdr_len
        b.extend_from_slice(&0u32.to_le_bytes()); // type_off
        b.extend_from_slice(&(t.len() as u32).to_le_bytes());
        b.extend_from_slice(&(t.len() as u32).to_le_bytes()); // str_off
        b.extend_from_slice(&(strings.len() as u32).to_le_bytes());
        b.extend_from_slice(&t);
        b.extend_from_slice(&strings);
        b
    }

    #[test]
    fn finds_direct_and_anonymous_members() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.member_offset("inner", "b"), Some(4));
        assert_eq!(btf.member_offset("outer", "x"), Some(0));
        assert_eq!(btf.member_offset("outer", "z"), Some(16));
        assert_eq!(
            btf.member_offset("outer", "y"),
            Some(8),
            "through the anonymous union"
        );
        assert_eq!(btf.member_offset("outer", "nope"), None);
        assert_eq!(btf.member_offset("missing", "x"), None);
    }

    #[test]
    fn finds_enum_members() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(
            btf.enum_has("bpf_func_id", "BPF_FUNC_map_lookup_elem"),
            Some(true)
        );
        assert_eq!(
            btf.enum_has("bpf_func_id", "BPF_FUNC_task_pt_regs"),
            Some(false)
        );
        assert_eq!(btf.enum_has("bpf_prog_type", "BPF_PROG_TYPE_TRACING"), None);
        // Members of a struct are not an enum's.
        assert_eq!(btf.enum_has("inner", "a"), None);
    }

    #[test]
    fn finds_functions_and_only_functions() {
        let btf = Btf::parse(blob()).unwrap();
        assert!(btf.has_func("tcp_v4_send_reset"));
        assert!(!btf.has_func("tcp_v6_send_reset"));
        // A struct is not a function; neither is an enum member.
        assert!(!btf.has_func("inner"));
        assert!(!btf.has_func("BPF_FUNC_unspec"));
        // The types after the function still parse (its header has no tail).
        assert_eq!(btf.member_offset("outer", "z"), Some(16));
    }

    #[test]
    fn reads_a_tracepoints_arguments_without_its_context() {
        let btf = Btf::parse(blob()).unwrap();
        assert_eq!(btf.tracepoint_args("demo"), Some(vec![true, false]));
        assert_eq!(btf.tracepoint_args("absent"), None);
        assert_eq!(btf.struct_size("outer"), Some(24));
        assert_eq!(btf.struct_size("nope"), None);
    }

    #[test]
    fn rejects_what_is_not_btf() {
        assert!(Btf::parse(b"not btf at all, no".to_vec()).is_none());
        assert!(Btf::parse(Vec::new()).is_none());
        let mut b = blob();
        b.truncate(30);
        assert!(Btf::parse(b).is_none());
    }

    /// The tracer refuses to start without BTF, so this machine must have it;
    /// the offsets are checked against layout facts of every kernel.
    #[test]
    fn reads_this_kernels_btf() {
        let btf = Btf::from_sys_fs()
            .expect("/sys/kernel/btf/vmlinux is missing or unreadable: the tracer requires it");
        let inside = |s: &str, m: &str| -> u64 {
            let off = btf
                .member_offset(s, m)
                .unwrap_or_else(|| panic!("no {s}.{m}"));
            let size = btf
                .struct_size(s)
                .unwrap_or_else(|| panic!("no struct {s}"));
            assert!(off < size, "{s}.{m} at {off} is outside its {size} bytes");
            off
        };
        let pid = inside("task_struct", "pid");
        assert!(pid > 0, "pid is not the first field of task_struct");
        // `pid_t pid; pid_t tgid;` side by side: offsets in bytes, not bits.
        assert_eq!(inside("task_struct", "tgid"), pid + 4);
        for m in ["comm", "files", "signal", "blocked", "exit_code", "flags"] {
            assert!(inside("task_struct", m) > 0, "task_struct.{m}");
        }
        // The first member of struct inode.
        assert_eq!(inside("inode", "i_mode"), 0);
        assert!(inside("file", "f_inode") > 0);
        assert!(inside("fdtable", "fd") > inside("fdtable", "max_fds"));
        // Inside the embedded inet_connection_sock, hence past its size.
        let icsk = btf.struct_size("inet_connection_sock").unwrap();
        for m in ["bytes_received", "bytes_sent", "write_seq", "snd_nxt"] {
            assert!(inside("tcp_sock", m) >= icsk, "tcp_sock.{m}");
        }
        // What the reset kprobe reads a segment's headers with.
        for m in ["head", "network_header", "transport_header"] {
            inside("sk_buff", m);
        }
        assert!(btf.has_func("tcp_v4_send_reset") && !btf.has_func("sk_buff"));
        // What the BTF-typed lifecycle and TCP programs are handed.
        assert_eq!(btf.tracepoint_args("task_newtask"), Some(vec![true, false]));
        assert_eq!(
            btf.tracepoint_args("inet_sock_set_state"),
            Some(vec![true, false, false])
        );
        let generate = btf.tracepoint_args("signal_generate").unwrap();
        assert_eq!(generate[..3], [false, true, true], "sig, info, task");
        let reset = btf.tracepoint_args("tcp_send_reset").unwrap();
        assert_eq!(reset[..2], [true, true], "sk, skb");
        assert_eq!(inside("sock_common", "skc_daddr"), 0);
        assert_eq!(inside("sock_common", "skc_rcv_saddr"), 4);
        assert_eq!(inside("sock", "__sk_common"), 0);
        assert!(inside("sock", "sk_protocol") > 0);
    }
}
