//! Whole IPv4 packets carried for a node agent (`ftss-node`, a TUN device).
//!
//! An IP packet travels as an ordinary [`Packet`] record whose addresses have port [`IP_PORT`]
//! (0): the source is the sending node's address, the destination the packet's, and the payload is
//! the packet itself, IP header first. Port 0 is never a UDP destination (the kernel refuses to
//! send there, and so does the shim), so the two cannot be confused. The server stores, delivers,
//! receipts and redelivers these packets like datagrams, into the destination node's `in/0/` inbox.
//!
//! Only IPv4 is carried, as for datagrams. The server checks each packet with [`check_packet`]
//! before it stores it: the header must be sound and its addresses must be the record's, so a node
//! cannot send as another address (the record's source is already the node's registered one).

use std::net::Ipv4Addr;

use crate::format::Packet;

/// The port of an IP packet's record addresses.
pub const IP_PORT: u16 = 0;

/// Shortest IPv4 header.
pub const HEADER_BYTES_MIN: usize = 20;

/// An IPv4 network in CIDR notation (`10.77.0.0/16`; a bare address is a /32).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    network: u32,
    prefix: u8,
}

impl Cidr {
    pub fn parse(text: &str) -> Result<Cidr, String> {
        let text = text.trim();
        let (addr, prefix) = text.split_once('/').unwrap_or((text, "32"));
        let addr: Ipv4Addr = addr.parse().map_err(|_| format!("{text:?} is not a CIDR like 10.77.0.0/16"))?;
        let prefix: u8 = prefix.parse().ok().filter(|prefix| *prefix <= 32).ok_or(format!("bad prefix in {text:?}"))?;
        Ok(Cidr { network: u32::from(addr) & mask(prefix), prefix })
    }

    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        u32::from(addr) & mask(self.prefix) == self.network
    }

    /// The network's first address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(self.network)
    }

    /// The netmask (`/16`: 255.255.0.0).
    pub fn netmask(&self) -> Ipv4Addr {
        Ipv4Addr::from(mask(self.prefix))
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;

    fn from_str(text: &str) -> Result<Cidr, String> {
        Cidr::parse(text)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(formatter, "{}/{}", self.network(), self.prefix)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) }
}

/// Is this record a whole IP packet (rather than a UDP datagram)?
pub fn is_ip_packet(packet: &Packet) -> bool {
    packet.destination.port() == IP_PORT
}

/// The fields of an IPv4 header that routing needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub protocol: u8,
    pub total_length: usize,
}

/// Why bytes are not an IPv4 packet ftss will carry. The text is the reason counted in status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IpError {
    #[error("shorter than an IPv4 header")]
    TooShort,
    #[error("not IPv4 (version {0})")]
    NotIpv4(u8),
    #[error("IPv4 header length out of range")]
    BadHeaderLength,
    #[error("IPv4 total length differs from the packet's size")]
    LengthMismatch,
    #[error("IPv4 header checksum is wrong")]
    BadChecksum,
    #[error("IP source is not the sending node's address")]
    SourceNotSender,
    #[error("IP destination differs from the record's")]
    DestinationMismatch,
    #[error("an IP packet's record has a source port")]
    SourcePort,
}

/// Parses and checks an IPv4 header (version, lengths, checksum).
pub fn parse_ipv4(bytes: &[u8]) -> Result<Ipv4Header, IpError> {
    if bytes.len() < HEADER_BYTES_MIN {
        return Err(IpError::TooShort);
    }
    let version = bytes[0] >> 4;
    if version != 4 {
        return Err(IpError::NotIpv4(version));
    }
    let header_bytes = usize::from(bytes[0] & 0x0f) * 4;
    if header_bytes < HEADER_BYTES_MIN || header_bytes > bytes.len() {
        return Err(IpError::BadHeaderLength);
    }
    let total_length = usize::from(u16::from_be_bytes([bytes[2], bytes[3]]));
    if total_length != bytes.len() {
        return Err(IpError::LengthMismatch);
    }
    if checksum(&bytes[..header_bytes]) != 0 {
        return Err(IpError::BadChecksum);
    }
    let address = |at: usize| Ipv4Addr::new(bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]);
    Ok(Ipv4Header { source: address(12), destination: address(16), protocol: bytes[9], total_length })
}

/// The Internet checksum (RFC 1071) of `bytes`: 0 over a header whose checksum field is right.
pub fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut words = bytes.chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Checks an IP packet record as the server receives it (its source already the sending node's
/// registered address): a sound IPv4 header whose addresses are the record's.
pub fn check_packet(packet: &Packet) -> Result<Ipv4Header, IpError> {
    if packet.source.port() != IP_PORT {
        return Err(IpError::SourcePort);
    }
    let header = parse_ipv4(&packet.payload)?;
    if header.source != *packet.source.ip() {
        return Err(IpError::SourceNotSender);
    }
    if header.destination != *packet.destination.ip() {
        return Err(IpError::DestinationMismatch);
    }
    Ok(header)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeName, PacketId};
    use std::net::SocketAddrV4;

    /// A UDP-in-IPv4 packet from `source` to `destination` with a correct header checksum.
    fn ipv4_packet(source: Ipv4Addr, destination: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
        let total = HEADER_BYTES_MIN + payload.len();
        let mut bytes = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0];
        bytes[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        bytes.extend_from_slice(&source.octets());
        bytes.extend_from_slice(&destination.octets());
        let sum = checksum(&bytes);
        bytes[10..12].copy_from_slice(&sum.to_be_bytes());
        bytes.extend_from_slice(payload);
        bytes
    }

    fn record(source: Ipv4Addr, destination: Ipv4Addr, payload: Vec<u8>) -> Packet {
        Packet {
            id: PacketId { origin: NodeName::new("a").unwrap(), epoch: 1, seq: 1 },
            source: SocketAddrV4::new(source, IP_PORT),
            destination: SocketAddrV4::new(destination, IP_PORT),
            sent_unix_us: 0,
            payload,
        }
    }

    #[test]
    fn a_sound_packet_passes_and_each_fault_is_named() {
        let (a, b, c) = (Ipv4Addr::new(10, 77, 0, 1), Ipv4Addr::new(10, 77, 0, 2), Ipv4Addr::new(10, 77, 0, 3));
        let good = ipv4_packet(a, b, b"hello");
        let header = check_packet(&record(a, b, good.clone())).unwrap();
        assert_eq!((header.source, header.destination, header.protocol, header.total_length), (a, b, 17, 25));
        assert!(is_ip_packet(&record(a, b, good.clone())));

        assert_eq!(check_packet(&record(c, b, good.clone())), Err(IpError::SourceNotSender));
        assert_eq!(check_packet(&record(a, c, good.clone())), Err(IpError::DestinationMismatch));
        assert_eq!(check_packet(&record(a, b, good[..10].to_vec())), Err(IpError::TooShort));
        assert_eq!(check_packet(&record(a, b, good[..24].to_vec())), Err(IpError::LengthMismatch));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse_ipv4(&v6), Err(IpError::NotIpv4(6)));
        let mut short_header = good.clone();
        short_header[0] = 0x44;
        assert_eq!(parse_ipv4(&short_header), Err(IpError::BadHeaderLength));
        let mut flipped = good.clone();
        flipped[8] ^= 1; // the TTL, covered by the checksum
        assert_eq!(parse_ipv4(&flipped), Err(IpError::BadChecksum));
        let mut with_port = record(a, b, good);
        with_port.source.set_port(53);
        assert_eq!(check_packet(&with_port), Err(IpError::SourcePort));
    }

    #[test]
    fn networks_parse_match_and_print() {
        let net = Cidr::parse(" 10.77.3.9/16 ").unwrap();
        assert_eq!((net.network(), net.netmask()), (Ipv4Addr::new(10, 77, 0, 0), Ipv4Addr::new(255, 255, 0, 0)));
        assert_eq!(net.to_string(), "10.77.0.0/16");
        assert!(net.contains(Ipv4Addr::new(10, 77, 255, 1)) && !net.contains(Ipv4Addr::new(10, 78, 0, 1)));
        assert_eq!(Cidr::parse("10.0.0.1").unwrap().to_string(), "10.0.0.1/32");
        assert!(Cidr::parse("0.0.0.0/0").unwrap().contains(Ipv4Addr::new(1, 2, 3, 4)));
        for bad in ["10.0.0.0/33", "10.0.0/8", "x", "10.0.0.0/"] {
            assert!(Cidr::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_checksum_is_rfc_1071s() {
        // The worked example of RFC 1071 section 3: the one's complement sum is 0xddf2.
        assert_eq!(checksum(&[0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]), !0xddf2);
        // An odd length pads with a zero byte.
        assert_eq!(checksum(&[0x01]), !0x0100);
    }
}
