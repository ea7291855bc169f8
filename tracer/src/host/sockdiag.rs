//! TCP connections as the kernel's socket diagnostics (NETLINK_SOCK_DIAG,
//! what `ss -ti` uses) show them: per socket its state, inode and
//! `struct tcp_info` (when data last came in and went out, bytes each way).
//! Asked about once a second for the ports watched processes listen on,
//! with an in-kernel filter on those ports, so nothing runs per packet.
//!
//! A netlink socket sees the network namespace it was created in: one per
//! namespace, created on a short-lived thread that enters it with setns
//! (which takes CAP_SYS_ADMIN; without it only the tracer's own namespace
//! is seen).
use std::collections::BTreeSet;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use crate::model::{SockSnapshot, TcpState};

const NETLINK_SOCK_DIAG: i32 = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const INET_DIAG_INFO: u16 = 2;
const INET_DIAG_REQ_BYTECODE: u16 = 1;
/// `INET_DIAG_BC_S_EQ`: local port equal to (Linux 4.16 and later).
const INET_DIAG_BC_S_EQ: u8 = 11;
const TCP_ESTABLISHED: u8 = 1;
const TCP_CLOSE_WAIT: u8 = 8;

/// Sizes of the kernel ABI structs (linux/inet_diag.h, linux/netlink.h).
const NLMSG_HDR: usize = 16;
const REQ_V2: usize = 56;
const DIAG_MSG: usize = 72;

/// Offsets in `struct tcp_info` (linux/tcp.h; the struct only grows).
const TCPI_LAST_DATA_SENT: usize = 44;
const TCPI_LAST_DATA_RECV: usize = 52;
const TCPI_BYTES_ACKED: usize = 120;
const TCPI_BYTES_RECEIVED: usize = 128;

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// An in-kernel filter (inet_diag bytecode) that keeps sockets whose local
/// port is one of `ports`: one "equal" test per port, each jumping to the
/// end (keep) when it matches and to the next (or past the end: drop) when
/// not.
pub fn port_filter(ports: &[u16]) -> Vec<u8> {
    let len = ports.len() * 8;
    let mut bc = Vec::with_capacity(len);
    for (i, port) in ports.iter().enumerate() {
        let left = len - i * 8;
        let no = if i + 1 == ports.len() { left + 4 } else { 8 };
        bc.push(INET_DIAG_BC_S_EQ);
        bc.push(left as u8);
        bc.extend_from_slice(&(no as u16).to_ne_bytes());
        // The port operand: an op whose `no` field holds the port.
        bc.extend_from_slice(&[0, 0]);
        bc.extend_from_slice(&port.to_ne_bytes());
    }
    bc
}

/// A SOCK_DIAG_BY_FAMILY dump request for TCP sockets of `family` in
/// ESTABLISHED or CLOSE_WAIT on `ports`, with tcp_info.
pub fn request(family: u8, ports: &[u16], seq: u32) -> Vec<u8> {
    let bc = port_filter(ports);
    let attr_len = 4 + bc.len();
    let total = NLMSG_HDR + REQ_V2 + attr_len;
    let mut m = Vec::with_capacity(total);
    m.extend_from_slice(&(total as u32).to_ne_bytes());
    m.extend_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    m.extend_from_slice(&(NLM_F_REQUEST | NLM_F_DUMP).to_ne_bytes());
    m.extend_from_slice(&seq.to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes());
    // inet_diag_req_v2: family, protocol, ext, pad, states, then a zeroed
    // inet_diag_sockid (48 bytes).
    m.extend_from_slice(&[
        family,
        libc::IPPROTO_TCP as u8,
        1 << (INET_DIAG_INFO - 1),
        0,
    ]);
    let states: u32 = (1 << TCP_ESTABLISHED) | (1 << TCP_CLOSE_WAIT);
    m.extend_from_slice(&states.to_ne_bytes());
    m.extend_from_slice(&[0u8; 48]);
    m.extend_from_slice(&(attr_len as u16).to_ne_bytes());
    m.extend_from_slice(&INET_DIAG_REQ_BYTECODE.to_ne_bytes());
    m.extend_from_slice(&bc);
    m
}

/// "10.0.0.7:41000" or "[::1]:8000" from an inet_diag_sockid address.
fn endpoint(family: u8, addr: &[u8], port: u16) -> String {
    if family == libc::AF_INET as u8 {
        return format!("{}.{}.{}.{}:{port}", addr[0], addr[1], addr[2], addr[3]);
    }
    let mut b = [0u8; 16];
    b.copy_from_slice(&addr[..16]);
    let ip = std::net::Ipv6Addr::from(b);
    match ip.to_ipv4_mapped() {
        Some(v4) => format!("{v4}:{port}"),
        None => format!("[{ip}]:{port}"),
    }
}

/// One inet_diag_msg and its attributes.
pub fn parse_diag_msg(m: &[u8]) -> Option<SockSnapshot> {
    let family = *m.first()?;
    let state = match *m.get(1)? {
        TCP_ESTABLISHED => TcpState::Established,
        TCP_CLOSE_WAIT => TcpState::CloseWait,
        _ => return None,
    };
    let id = m.get(4..52)?;
    let local_port = u16::from_be_bytes([id[0], id[1]]);
    let peer_port = u16::from_be_bytes([id[2], id[3]]);
    let mut s = SockSnapshot {
        inode: u64::from(u32_at(m, 68)?),
        state,
        local_port,
        peer: endpoint(family, &id[20..36], peer_port),
        unread_bytes: u32_at(m, 56)?,
        ..Default::default()
    };
    let mut at = DIAG_MSG;
    while at + 4 <= m.len() {
        let len = u16_at(m, at)? as usize;
        let kind = u16_at(m, at + 2)?;
        if len < 4 || at + len > m.len() {
            break;
        }
        if kind == INET_DIAG_INFO {
            let info = &m[at + 4..at + len];
            s.last_data_sent_ms = u32_at(info, TCPI_LAST_DATA_SENT)?;
            s.last_data_recv_ms = u32_at(info, TCPI_LAST_DATA_RECV)?;
            s.bytes_acked = u64_at(info, TCPI_BYTES_ACKED).unwrap_or(0);
            s.bytes_received = u64_at(info, TCPI_BYTES_RECEIVED).unwrap_or(0);
            s.has_info = true;
        }
        at += (len + 3) & !3;
    }
    Some(s)
}

/// Sockets kept from one dump, at most: past that the rest are read (to
/// end the dump) and not kept.
const MAX_SOCKS: usize = 65_536;

/// The reply a dump waits for: its sequence number and the port id the
/// kernel gave our socket. Messages that carry others (left over from an
/// earlier dump, or sent by a process that guessed our port id) are
/// skipped.
#[derive(Debug, Clone, Copy)]
struct Expect {
    seq: u32,
    port_id: u32,
}

/// The messages of one netlink reply buffer; Err at an error message,
/// Ok(true) once the dump is done.
fn parse_reply(buf: &[u8], want: Expect, out: &mut Vec<SockSnapshot>) -> io::Result<bool> {
    let mut at = 0;
    while at + NLMSG_HDR <= buf.len() {
        let len = u32_at(buf, at).unwrap_or(0) as usize;
        let kind = u16_at(buf, at + 4).unwrap_or(0);
        if len < NLMSG_HDR || at + len > buf.len() {
            break;
        }
        let seq = u32_at(buf, at + 8).unwrap_or(0);
        let port_id = u32_at(buf, at + 12).unwrap_or(0);
        if seq != want.seq || port_id != want.port_id {
            at += (len + 3) & !3;
            continue;
        }
        match kind {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = u32_at(buf, at + NLMSG_HDR).unwrap_or(0) as i32;
                return Err(io::Error::from_raw_os_error(-errno));
            }
            SOCK_DIAG_BY_FAMILY if out.len() < MAX_SOCKS => {
                out.extend(parse_diag_msg(&buf[at + NLMSG_HDR..at + len]))
            }
            _ => {}
        }
        at += (len + 3) & !3;
    }
    Ok(false)
}

/// Whether namespace `ns` is owned by the user namespace the tracer runs
/// in (ioctl NS_GET_USERNS, compared by device and inode).
fn owned_by_my_user_namespace(ns: &std::fs::File) -> io::Result<bool> {
    use std::os::unix::fs::MetadataExt;
    // NS_GET_USERNS: _IO(0xb7, 0x1).
    const NS_GET_USERNS: libc::c_ulong = 0xb701;
    // SAFETY: an ioctl without argument on an fd we hold; the returned fd
    // is owned at once.
    let fd = unsafe { libc::ioctl(ns.as_raw_fd(), NS_GET_USERNS) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor nobody else owns.
    let owner = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) }).metadata()?;
    let mine = std::fs::metadata("/proc/self/ns/user")?;
    Ok(owner.dev() == mine.dev() && owner.ino() == mine.ino())
}

/// A NETLINK_SOCK_DIAG socket, bound to the network namespace it was
/// created in.
pub struct Diag {
    fd: OwnedFd,
    seq: u32,
}

impl Diag {
    /// A socket in the tracer's own network namespace.
    pub fn open() -> io::Result<Diag> {
        // SAFETY: plain socket(2); the fd is owned at once.
        let fd = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let tv = libc::timeval {
            tv_sec: 1,
            tv_usec: 0,
        };
        // SAFETY: tv is a valid timeval for SO_RCVTIMEO.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        Ok(Diag { fd, seq: 0 })
    }

    /// A socket in the network namespace of `pid`, created on a thread
    /// that enters it (the tracer itself stays where it is). Only a
    /// namespace owned by the tracer's own user namespace is entered: one
    /// a process created with a user namespace of its own (rootless
    /// containers, `unshare -Urn`) is that process's to configure, and is
    /// refused like one the tracer may not enter.
    pub fn open_in_netns_of(pid: u32) -> io::Result<Diag> {
        let ns = std::fs::File::open(format!("/proc/{pid}/ns/net"))?;
        if !owned_by_my_user_namespace(&ns)? {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the network namespace of process {pid} belongs to another user namespace"),
            ));
        }
        std::thread::spawn(move || {
            // SAFETY: setns on this thread only, with an fd we hold.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
            Diag::open()
        })
        .join()
        .map_err(|_| io::Error::other("the netns thread panicked"))?
    }

    /// Every TCP socket in ESTABLISHED or CLOSE_WAIT on one of `ports`.
    pub fn dump(&mut self, ports: &BTreeSet<u16>) -> io::Result<Vec<SockSnapshot>> {
        let ports: Vec<u16> = ports.iter().copied().collect();
        let mut out = Vec::new();
        // The filter's jumps are one byte: at most 31 ports per request.
        for chunk in ports.chunks(31) {
            for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
                self.seq = self.seq.wrapping_add(1);
                self.send(&request(family, chunk, self.seq))?;
                self.receive(self.seq, &mut out)?;
            }
        }
        Ok(out)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: a zeroed sockaddr_nl with the family set addresses the kernel.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        // SAFETY: msg and to are valid for the lengths given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// The port id the kernel bound this socket to (at its first send).
    fn port_id(&self) -> io::Result<u32> {
        // SAFETY: a zeroed sockaddr_nl is valid to fill; len is its size.
        let mut me: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
        let r = unsafe {
            libc::getsockname(
                self.fd.as_raw_fd(),
                (&mut me as *mut libc::sockaddr_nl).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(me.nl_pid)
    }

    /// Reads the reply to request `seq`: only datagrams the kernel sent
    /// (sender port id 0), only messages for this request and socket.
    fn receive(&self, seq: u32, out: &mut Vec<SockSnapshot>) -> io::Result<()> {
        let want = Expect {
            seq,
            port_id: self.port_id()?,
        };
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: a zeroed sockaddr_nl is valid to fill.
            let mut from: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_nl>() as u32;
            // SAFETY: buf and from are valid for the lengths given.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&mut from as *mut libc::sockaddr_nl).cast(),
                    &mut len,
                )
            };
            if n < 0 {
                return Err(io::Error::last_os_error());
            }
            if n == 0 {
                return Ok(());
            }
            // A process on the host (or in the namespace) may send to our
            // port id: only the kernel's replies are read.
            if from.nl_pid != 0 {
                continue;
            }
            if parse_reply(&buf[..n as usize], want, out)? {
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracers_own_network_namespace_is_owned_by_its_user_namespace() {
        let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
        assert!(owned_by_my_user_namespace(&ns).unwrap());
    }

    #[test]
    fn the_port_filter_keeps_a_match_and_drops_the_rest() {
        let bc = port_filter(&[8000, 9000]);
        assert_eq!(bc.len(), 16);
        // First: equal to 8000 -> jump to the end (16 bytes on); else next.
        assert_eq!(&bc[..4], &[INET_DIAG_BC_S_EQ, 16, 8, 0]);
        assert_eq!(u16::from_ne_bytes([bc[6], bc[7]]), 8000);
        // Last: equal -> the end; else past it (drop).
        assert_eq!(bc[9], 8);
        assert_eq!(u16::from_ne_bytes([bc[10], bc[11]]), 12);
    }

    #[test]
    fn a_diag_message_gives_ports_peer_inode_and_timing() {
        let mut m = vec![0u8; DIAG_MSG];
        m[0] = libc::AF_INET as u8;
        m[1] = TCP_ESTABLISHED;
        m[4..6].copy_from_slice(&8000u16.to_be_bytes());
        m[6..8].copy_from_slice(&41000u16.to_be_bytes());
        m[24..28].copy_from_slice(&[10, 0, 0, 7]);
        m[56..60].copy_from_slice(&0u32.to_ne_bytes());
        m[68..72].copy_from_slice(&4242u32.to_ne_bytes());
        let mut info = vec![0u8; 232];
        info[TCPI_LAST_DATA_SENT..TCPI_LAST_DATA_SENT + 4].copy_from_slice(&9000u32.to_ne_bytes());
        info[TCPI_LAST_DATA_RECV..TCPI_LAST_DATA_RECV + 4].copy_from_slice(&3000u32.to_ne_bytes());
        info[TCPI_BYTES_RECEIVED..TCPI_BYTES_RECEIVED + 8].copy_from_slice(&80u64.to_ne_bytes());
        m.extend_from_slice(&((4 + info.len()) as u16).to_ne_bytes());
        m.extend_from_slice(&INET_DIAG_INFO.to_ne_bytes());
        m.extend_from_slice(&info);
        let s = parse_diag_msg(&m).unwrap();
        assert_eq!(
            (s.local_port, s.peer.as_str(), s.inode),
            (8000, "10.0.0.7:41000", 4242)
        );
        assert_eq!((s.last_data_sent_ms, s.last_data_recv_ms), (9000, 3000));
        assert_eq!((s.bytes_received, s.bytes_acked, s.has_info), (80, 0, true));
        assert_eq!(s.state, TcpState::Established);
    }

    /// A netlink header: length, type, flags, seq, port id.
    fn header(len: usize, kind: u16, seq: u32, port_id: u32) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&(len as u32).to_ne_bytes());
        m.extend_from_slice(&kind.to_ne_bytes());
        m.extend_from_slice(&0u16.to_ne_bytes());
        m.extend_from_slice(&seq.to_ne_bytes());
        m.extend_from_slice(&port_id.to_ne_bytes());
        m
    }

    fn diag_msg(seq: u32, port_id: u32, inode: u32) -> Vec<u8> {
        let mut body = vec![0u8; DIAG_MSG];
        body[0] = libc::AF_INET as u8;
        body[1] = TCP_ESTABLISHED;
        body[4..6].copy_from_slice(&8000u16.to_be_bytes());
        body[68..72].copy_from_slice(&inode.to_ne_bytes());
        let mut m = header(NLMSG_HDR + body.len(), SOCK_DIAG_BY_FAMILY, seq, port_id);
        m.extend_from_slice(&body);
        m
    }

    /// Issue 20, item 6: a reply's messages were taken whatever their
    /// sequence number and port id.
    #[test]
    fn only_messages_of_this_request_and_socket_are_read() {
        let want = Expect {
            seq: 7,
            port_id: 4242,
        };
        let mut buf = diag_msg(6, 4242, 1); // an earlier dump's
        buf.extend(diag_msg(7, 999, 2)); // another socket's
        buf.extend(diag_msg(7, 4242, 3)); // ours
        buf.extend(header(NLMSG_HDR, NLMSG_DONE, 6, 4242)); // not our end
        let mut out = Vec::new();
        assert!(!parse_reply(&buf, want, &mut out).unwrap());
        assert_eq!(out.iter().map(|s| s.inode).collect::<Vec<_>>(), [3]);
        let done = header(NLMSG_HDR, NLMSG_DONE, 7, 4242);
        assert!(parse_reply(&done, want, &mut out).unwrap());
    }

    /// Issue 20, item 6: another process that sends our socket a forged
    /// reply (right sequence number and port id) is not believed: only the
    /// kernel's datagrams are read.
    #[test]
    fn a_forged_reply_from_another_socket_is_dropped() {
        let mut d = Diag::open().expect("NETLINK_SOCK_DIAG");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        // A first dump binds the socket's port id.
        d.dump(&BTreeSet::from([port])).unwrap();
        let me = d.port_id().unwrap();
        // SAFETY: plain socket(2) and sendto(2) on a socket this test owns.
        let forger = unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                NETLINK_SOCK_DIAG,
            )
        };
        assert!(forger >= 0);
        let next = d.seq.wrapping_add(1);
        let mut forged = diag_msg(next, me, 777);
        forged.extend(header(NLMSG_HDR, NLMSG_DONE, next, me));
        // SAFETY: a zeroed sockaddr_nl addressed to our port id.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as u16;
        to.nl_pid = me;
        let sent = unsafe {
            libc::sendto(
                forger,
                forged.as_ptr().cast(),
                forged.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as u32,
            )
        };
        let found = d.dump(&BTreeSet::from([port])).unwrap();
        unsafe { libc::close(forger) };
        if sent < 0 {
            eprintln!("skipped: this kernel refused the forged datagram");
            return;
        }
        assert!(
            found.iter().all(|s| s.inode != 777),
            "the forged socket was believed: {found:?}"
        );
    }

    #[test]
    fn this_namespace_can_be_asked() {
        let mut d = Diag::open().expect("NETLINK_SOCK_DIAG");
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, _) = l.accept().unwrap();
        let found = d.dump(&BTreeSet::from([port])).unwrap();
        assert_eq!(found.len(), 1, "the accepted side only: {found:?}");
        assert_eq!(found[0].local_port, port);
        assert!(found[0].has_info && found[0].inode > 0, "{found:?}");
    }
}
