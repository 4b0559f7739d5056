//! Packets as a classic pcap file (what tcpdump, Wireshark and tshark read): each packet becomes an
//! IPv4/UDP frame with its fabric addresses and ports and its original timestamp. Link type RAW
//! (101): frames start at the IPv4 header. Used by `ftss-server dump --pcap` and the shim's
//! `FTSS_PCAP`.

use std::io::{self, Write};
use std::net::SocketAddrV4;

const MAGIC_MICROSECONDS: u32 = 0xA1B2_C3D4;
const LINKTYPE_RAW: u32 = 101;
/// Longest frame captured: an IPv4 header, a UDP header and the largest UDP payload.
const SNAPLEN: u32 = 65_535;

/// Writes pcap records to any writer.
pub struct PcapWriter<W: Write> {
    out: W,
    ip_id: u16,
}

impl<W: Write> PcapWriter<W> {
    /// Writes the file header.
    pub fn new(mut out: W) -> io::Result<PcapWriter<W>> {
        let mut header = Vec::with_capacity(24);
        header.extend_from_slice(&MAGIC_MICROSECONDS.to_le_bytes());
        header.extend_from_slice(&2u16.to_le_bytes());
        header.extend_from_slice(&4u16.to_le_bytes());
        header.extend_from_slice(&0i32.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&SNAPLEN.to_le_bytes());
        header.extend_from_slice(&LINKTYPE_RAW.to_le_bytes());
        out.write_all(&header)?;
        Ok(PcapWriter { out, ip_id: 0 })
    }

    /// Writes one datagram from `source` to `destination`, sent at `unix_us`.
    pub fn write_datagram(
        &mut self,
        unix_us: u64,
        source: SocketAddrV4,
        destination: SocketAddrV4,
        payload: &[u8],
    ) -> io::Result<()> {
        self.ip_id = self.ip_id.wrapping_add(1);
        let frame = frame(source, destination, payload, self.ip_id);
        let captured = frame.len().min(SNAPLEN as usize);
        let mut record = Vec::with_capacity(16 + captured);
        record.extend_from_slice(&((unix_us / 1_000_000) as u32).to_le_bytes());
        record.extend_from_slice(&((unix_us % 1_000_000) as u32).to_le_bytes());
        record.extend_from_slice(&(captured as u32).to_le_bytes());
        record.extend_from_slice(&(frame.len() as u32).to_le_bytes());
        record.extend_from_slice(&frame[..captured]);
        self.out.write_all(&record)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

/// An IPv4 header (checksummed) + UDP header (checksummed) + payload.
fn frame(source: SocketAddrV4, destination: SocketAddrV4, payload: &[u8], ip_id: u16) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let total_len = 20 + udp_len;
    let mut frame = Vec::with_capacity(total_len);
    frame.push(0x45); // version 4, header length 5 words
    frame.push(0);
    frame.extend_from_slice(&(total_len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    frame.extend_from_slice(&ip_id.to_be_bytes());
    frame.extend_from_slice(&0x4000u16.to_be_bytes()); // don't fragment
    frame.push(64); // TTL
    frame.push(17); // UDP
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(&source.ip().octets());
    frame.extend_from_slice(&destination.ip().octets());
    let checksum = internet_checksum(&frame[..20], 0);
    frame[10..12].copy_from_slice(&checksum.to_be_bytes());
    let udp_start = frame.len();
    frame.extend_from_slice(&source.port().to_be_bytes());
    frame.extend_from_slice(&destination.port().to_be_bytes());
    frame.extend_from_slice(&(udp_len.min(usize::from(u16::MAX)) as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    // The UDP checksum covers a pseudo-header of addresses, protocol and length.
    let mut pseudo = 0u32;
    for pair in source.ip().octets().chunks(2).chain(destination.ip().octets().chunks(2)) {
        pseudo += u32::from(u16::from_be_bytes([pair[0], pair[1]]));
    }
    pseudo += 17 + udp_len as u32;
    let udp_checksum = match internet_checksum(&frame[udp_start..], pseudo) {
        0 => 0xFFFF,
        sum => sum,
    };
    frame[udp_start + 6..udp_start + 8].copy_from_slice(&udp_checksum.to_be_bytes());
    frame
}

/// The ones' complement sum of 16-bit words (RFC 1071), starting from `initial`.
fn internet_checksum(bytes: &[u8], initial: u32) -> u16 {
    let mut sum = u64::from(initial);
    for pair in bytes.chunks(2) {
        let word =
            if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from_be_bytes([pair[0], 0]) };
        sum += u64::from(word);
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_checksums() {
        let mut writer = PcapWriter::new(Vec::new()).unwrap();
        let source: SocketAddrV4 = "10.77.0.1:4000".parse().unwrap();
        let destination: SocketAddrV4 = "10.77.0.2:9000".parse().unwrap();
        writer.write_datagram(1_700_000_000_123_456, source, destination, b"hello").unwrap();
        let bytes = writer.into_inner();
        assert_eq!(&bytes[..4], &MAGIC_MICROSECONDS.to_le_bytes());
        assert_eq!(bytes.len(), 24 + 16 + 20 + 8 + 5);
        let frame = &bytes[40..];
        // A correct IPv4 header sums to zero (all ones) including its checksum.
        assert_eq!(internet_checksum(&frame[..20], 0), 0);
        assert_eq!(u32::from_le_bytes(bytes[24..28].try_into().unwrap()), 1_700_000_000);
        assert_eq!(u32::from_le_bytes(bytes[28..32].try_into().unwrap()), 123_456);
        assert_eq!(&frame[28..], b"hello");
    }
}
