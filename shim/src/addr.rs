//! Socket addresses as an app passes them in and expects them back (IPv4, and IPv6 sockets that
//! use IPv4-mapped addresses such as `::ffff:10.77.0.2`), and the header the receive thread puts
//! before each datagram it injects into an app's socket.

use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use fsbridge::{NODE_NAME_BYTES_MAX, NodeName, PacketId};
use libc::{c_int, sockaddr, sockaddr_in, sockaddr_in6, socklen_t};

/// The address family of the socket the app believes it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn domain(self) -> c_int {
        match self {
            Family::V4 => libc::AF_INET,
            Family::V6 => libc::AF_INET6,
        }
    }

    /// The wildcard address of the family with `port`.
    pub fn any(self, port: u16) -> SocketAddr {
        match self {
            Family::V4 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port)),
            Family::V6 => SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::UNSPECIFIED, port, 0, 0)),
        }
    }
}

/// An IPv4-mapped IPv6 address is the IPv4 address; everything else stays as it is.
pub fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        v4 => v4,
    }
}

/// Reads a socket address an app passed in, as the kernel would accept it on a socket of `family`
/// (an IPv6 UDP socket also takes `AF_INET` addresses). `None` for a null, short or foreign one:
/// such calls go to the kernel, which gives the app its usual error.
///
/// # Safety
/// `addr` must be null or valid for `len` bytes.
pub unsafe fn read(addr: *const sockaddr, len: socklen_t, family: Family) -> Option<SocketAddr> {
    if addr.is_null() || (len as usize) < size_of::<libc::sa_family_t>() {
        return None;
    }
    // SAFETY: at least the family field is readable.
    let domain = c_int::from(unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) });
    if domain == libc::AF_INET && len as usize >= size_of::<sockaddr_in>() {
        // SAFETY: long enough; read_unaligned tolerates any alignment.
        let raw = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in>()) };
        let ip = Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr));
        return Some(SocketAddr::V4(SocketAddrV4::new(ip, u16::from_be(raw.sin_port))));
    }
    if domain == libc::AF_INET6 && family == Family::V6 && len as usize >= size_of::<sockaddr_in6>() {
        // SAFETY: as above.
        let raw = unsafe { std::ptr::read_unaligned(addr.cast::<sockaddr_in6>()) };
        let ip = Ipv6Addr::from(raw.sin6_addr.s6_addr);
        return Some(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(raw.sin6_port),
            raw.sin6_flowinfo,
            raw.sin6_scope_id,
        )));
    }
    None
}

/// Is this an `AF_UNSPEC` address (a UDP "disconnect")?
///
/// # Safety
/// `addr` must be null or valid for `len` bytes.
pub unsafe fn is_unspecified(addr: *const sockaddr, len: socklen_t) -> bool {
    !addr.is_null()
        && len as usize >= size_of::<libc::sa_family_t>()
        // SAFETY: the family field is readable.
        && c_int::from(unsafe { std::ptr::read_unaligned(addr.cast::<libc::sa_family_t>()) }) == libc::AF_UNSPEC
}

/// A raw socket address of the family the app's socket has (IPv4 addresses are mapped on IPv6).
pub enum Raw {
    V4(sockaddr_in),
    V6(sockaddr_in6),
}

impl Raw {
    pub fn new(addr: SocketAddr, family: Family) -> Raw {
        let addr = normalize(addr);
        match (family, addr) {
            (Family::V4, SocketAddr::V4(v4)) => {
                // SAFETY: zeroed sockaddr_in is valid.
                let mut raw: sockaddr_in = unsafe { zeroed() };
                raw.sin_family = libc::AF_INET as libc::sa_family_t;
                raw.sin_port = v4.port().to_be();
                raw.sin_addr.s_addr = u32::from(*v4.ip()).to_be();
                Raw::V4(raw)
            }
            (_, addr) => {
                let (ip, port, flowinfo, scope) = match addr {
                    SocketAddr::V4(v4) => (v4.ip().to_ipv6_mapped(), v4.port(), 0, 0),
                    SocketAddr::V6(v6) => (*v6.ip(), v6.port(), v6.flowinfo(), v6.scope_id()),
                };
                // SAFETY: zeroed sockaddr_in6 is valid.
                let mut raw: sockaddr_in6 = unsafe { zeroed() };
                raw.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                raw.sin6_port = port.to_be();
                raw.sin6_addr.s6_addr = ip.octets();
                raw.sin6_flowinfo = flowinfo;
                raw.sin6_scope_id = scope;
                Raw::V6(raw)
            }
        }
    }

    pub fn as_ptr(&self) -> *const sockaddr {
        match self {
            Raw::V4(raw) => (raw as *const sockaddr_in).cast(),
            Raw::V6(raw) => (raw as *const sockaddr_in6).cast(),
        }
    }

    pub fn len(&self) -> socklen_t {
        match self {
            Raw::V4(_) => size_of::<sockaddr_in>() as socklen_t,
            Raw::V6(_) => size_of::<sockaddr_in6>() as socklen_t,
        }
    }
}

/// Writes `addr` into an app's (sockaddr, socklen) pair like the kernel: at most `*len` bytes are
/// copied and `*len` becomes the full size.
///
/// # Safety
/// `out` must be null or valid for `*len` bytes; `len` null or valid.
pub unsafe fn write(addr: SocketAddr, family: Family, out: *mut sockaddr, len: *mut socklen_t) {
    if out.is_null() || len.is_null() {
        return;
    }
    let raw = Raw::new(addr, family);
    // SAFETY: the caller guarantees out has *len bytes; at most that is copied.
    unsafe {
        let room = (*len as usize).min(raw.len() as usize);
        std::ptr::copy_nonoverlapping(raw.as_ptr().cast::<u8>(), out.cast::<u8>(), room);
        *len = raw.len();
    }
}

/// Reads a socket address the kernel wrote into a `sockaddr_storage`.
pub fn from_storage(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    let pointer = (storage as *const libc::sockaddr_storage).cast::<sockaddr>();
    // SAFETY: a sockaddr_storage holds any address.
    unsafe { read(pointer, size_of::<libc::sockaddr_storage>() as socklen_t, Family::V6) }
}

/// Bytes of the header the receive thread puts before each datagram it injects.
pub const INJECT_HEADER_BYTES: usize = 128;
const INJECT_MAGIC: u32 = 0x4654_5349; // "FTSI"
const ORIGIN_OFFSET: usize = 49;

/// Encodes the injection header: magic | family u16 | port u16 | address 16 | flowinfo u32 |
/// scope u32 | packet epoch u64 | packet seq u64 | origin length u8 | origin (up to 64 bytes),
/// zero-padded. The packet id travels with the datagram so that whichever process reads it (a
/// forked child shares the socket) writes its receipt; `None` for datagrams relayed from the real
/// network.
pub fn inject_header(source: SocketAddr, id: Option<&PacketId>) -> [u8; INJECT_HEADER_BYTES] {
    let mut header = [0u8; INJECT_HEADER_BYTES];
    header[0..4].copy_from_slice(&INJECT_MAGIC.to_le_bytes());
    header[6..8].copy_from_slice(&source.port().to_le_bytes());
    match normalize(source) {
        SocketAddr::V4(v4) => {
            header[4..6].copy_from_slice(&4u16.to_le_bytes());
            header[8..12].copy_from_slice(&v4.ip().octets());
        }
        SocketAddr::V6(v6) => {
            header[4..6].copy_from_slice(&6u16.to_le_bytes());
            header[8..24].copy_from_slice(&v6.ip().octets());
            header[24..28].copy_from_slice(&v6.flowinfo().to_le_bytes());
            header[28..32].copy_from_slice(&v6.scope_id().to_le_bytes());
        }
    }
    if let Some(id) = id {
        let origin = id.origin.as_str().as_bytes();
        assert!(origin.len() <= NODE_NAME_BYTES_MAX, "node names are at most 64 bytes");
        header[32..40].copy_from_slice(&id.epoch.to_le_bytes());
        header[40..48].copy_from_slice(&id.seq.to_le_bytes());
        header[48] = origin.len() as u8;
        header[ORIGIN_OFFSET..ORIGIN_OFFSET + origin.len()].copy_from_slice(origin);
    }
    header
}

/// Decodes an injection header: (source, packet id). `None` if it is not one.
pub fn parse_header(header: &[u8; INJECT_HEADER_BYTES]) -> Option<(SocketAddr, Option<PacketId>)> {
    let word = |range: std::ops::Range<usize>| u32::from_le_bytes(header[range].try_into().expect("4 bytes"));
    let long = |range: std::ops::Range<usize>| u64::from_le_bytes(header[range].try_into().expect("8 bytes"));
    if word(0..4) != INJECT_MAGIC {
        return None;
    }
    let port = u16::from_le_bytes([header[6], header[7]]);
    let source = match u16::from_le_bytes([header[4], header[5]]) {
        4 => SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(header[8], header[9], header[10], header[11]), port)),
        6 => {
            let ip: [u8; 16] = header[8..24].try_into().expect("16 bytes");
            SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), port, word(24..28), word(28..32)))
        }
        _ => return None,
    };
    let origin_len = usize::from(header[48]).min(NODE_NAME_BYTES_MAX);
    let id = match origin_len {
        0 => None,
        _ => {
            let origin = std::str::from_utf8(&header[ORIGIN_OFFSET..ORIGIN_OFFSET + origin_len]).ok()?;
            let origin = NodeName::new(origin).ok()?;
            Some(PacketId { origin, epoch: long(32..40), seq: long(40..48) })
        }
    };
    Some((source, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_both_families() {
        let id = PacketId { origin: NodeName::new(&"n".repeat(NODE_NAME_BYTES_MAX)).unwrap(), epoch: 7, seq: 9 };
        for source in ["10.77.0.1:5555", "[2001:db8::1]:9", "[fe80::1%3]:7"] {
            let source: SocketAddr = source.parse().unwrap();
            assert_eq!(parse_header(&inject_header(source, Some(&id))), Some((source, Some(id.clone()))));
            assert_eq!(parse_header(&inject_header(source, None)), Some((source, None)));
        }
        let mapped: SocketAddr = "[::ffff:10.77.0.2]:53".parse().unwrap();
        assert_eq!(parse_header(&inject_header(mapped, None)).unwrap().0, "10.77.0.2:53".parse().unwrap());
        assert_eq!(parse_header(&[0u8; INJECT_HEADER_BYTES]), None);
    }

    #[test]
    fn addresses_round_trip_through_raw_forms() {
        let v4: SocketAddr = "10.77.0.2:9000".parse().unwrap();
        for family in [Family::V4, Family::V6] {
            let raw = Raw::new(v4, family);
            let back = unsafe { read(raw.as_ptr(), raw.len(), family) }.unwrap();
            assert_eq!(normalize(back), v4);
        }
        let raw = Raw::new(v4, Family::V6);
        assert_eq!(raw.len() as usize, size_of::<sockaddr_in6>());
        // An IPv4 socket does not take an IPv6 address; the kernel answers those.
        assert_eq!(unsafe { read(raw.as_ptr(), raw.len(), Family::V4) }, None);
    }
}
