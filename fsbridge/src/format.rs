//! The batch file format: the bytes of every file ftss puts in a spool. Pure encode/decode, no I/O.
//!
//! ```text
//! batch   := header record* end
//! header  := magic "FTSB" | version u16 | kind u8 | flags u8 (FLAG_*) | node_len u8 | node | epoch u64
//!            | batch_seq u64 | header_crc u32            (crc32c of every header byte before it)
//! record  := tag u8 | body_len u32 | body | crc u32      (crc32c of tag, body_len and body)
//! end     := a record with tag END whose body is the count (u32) of records before it
//! ```
//!
//! Integers are little-endian. Nothing may follow the end record. Record bodies:
//! - `PACKET`: packet id, source ipv4 + port, destination ipv4 + port, sent time (µs since the Unix
//!   epoch), payload length u32, payload.
//! - `ACK`: packet id, state u8, reason length u16, reason (UTF-8).
//! - `RECEIPT`: packet id.
//!
//! A packet id is `origin node | epoch u64 | seq u64`: the node that sent it, a random epoch drawn by
//! each sending process at start, and a sequence number within that epoch. It is unique across
//! restarts without any coordination between processes.
//!
//! Decoding checks every length against the bytes that remain and against the limits below before it
//! allocates, so a hostile file can neither panic the decoder nor make it allocate more than the file.

use std::net::{Ipv4Addr, SocketAddrV4};

use thiserror::Error;

use crate::NodeName;

/// First four bytes of every batch file.
pub const MAGIC: [u8; 4] = *b"FTSB";
/// The one version this code writes and reads.
pub const VERSION: u16 = 1;
/// Largest UDP payload over IPv4; ftss carries nothing a real network could not.
pub const PAYLOAD_BYTES_MAX: usize = 65_507;
/// Largest batch file accepted; bounds reader memory per file.
pub const BATCH_BYTES_MAX: usize = 32 * 1024 * 1024;
/// Most records in one batch; bounds the work of decoding one file.
pub const BATCH_RECORDS_MAX: usize = 1 << 20;
/// Longest ack reason kept; longer reasons are cut.
pub const REASON_BYTES_MAX: usize = 512;

/// Record tag of a packet.
pub const TAG_PACKET: u8 = 1;
/// Record tag of an ack.
pub const TAG_ACK: u8 = 2;
/// Record tag of a receipt (the server's queue log uses it for "done").
pub const TAG_RECEIPT: u8 = 3;
/// Record tag of a once-ledger record (`ledger`).
pub const TAG_LEDGER: u8 = 0x4c;
/// Record tag of the end record.
pub const TAG_END: u8 = 0xEE;
/// tag + body_len + crc.
pub const RECORD_OVERHEAD_BYTES: usize = 1 + 4 + 4;

/// What a batch file holds; one kind per file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BatchKind {
    /// Datagrams (outbox, inbox).
    Packets = 1,
    /// Server → source node: the state of its packets.
    Acks = 2,
    /// Destination node → server: packets the app has received.
    Receipts = 3,
}

impl BatchKind {
    fn from_u8(value: u8) -> Option<BatchKind> {
        match value {
            1 => Some(BatchKind::Packets),
            2 => Some(BatchKind::Acks),
            3 => Some(BatchKind::Receipts),
            _ => None,
        }
    }
}

/// Identity of a packet, unique across processes and restarts.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PacketId {
    pub origin: NodeName,
    pub epoch: u64,
    pub seq: u64,
}

/// One datagram in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub id: PacketId,
    pub source: SocketAddrV4,
    pub destination: SocketAddrV4,
    pub sent_unix_us: u64,
    pub payload: Vec<u8>,
}

/// Where a packet stands, as told to its source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckState {
    /// Durable in every healthy queue mirror: delivery is guaranteed.
    Stored = 1,
    /// Written into the destination's inbox.
    Delivered = 2,
    /// The destination app received it.
    Receipted = 3,
    /// Given up (see reason).
    Rejected = 4,
    /// Accepted for the external network: delivery will be attempted but cannot be guaranteed.
    AcceptedBestEffort = 5,
}

impl AckState {
    fn from_u8(value: u8) -> Option<AckState> {
        match value {
            1 => Some(AckState::Stored),
            2 => Some(AckState::Delivered),
            3 => Some(AckState::Receipted),
            4 => Some(AckState::Rejected),
            5 => Some(AckState::AcceptedBestEffort),
            _ => None,
        }
    }
}

/// The server's word on one packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ack {
    pub id: PacketId,
    pub state: AckState,
    pub reason: String,
}

/// One record of a batch.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Packet(Packet),
    Ack(Ack),
    Receipt(PacketId),
}

/// The header of a batch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BatchHeader {
    pub kind: BatchKind,
    /// The node (or server) that wrote the file. Informational: the server trusts the directory.
    pub node: NodeName,
    pub epoch: u64,
    pub batch_seq: u64,
    /// Bits of `FLAG_*`.
    pub flags: u8,
}

/// Header flag of a packets batch in an outbox: the sending process waits for "stored" acks
/// (`FTSS_ACK=guaranteed`); the server writes ack files only for such senders.
pub const FLAG_WANTS_ACKS: u8 = 1;
/// With `FLAG_WANTS_ACKS`: only the "stored" (or "rejected") ack, none when the packet is delivered
/// or receipted (ftss-node, which only needs to know what the server holds).
pub const FLAG_STORED_ACKS_ONLY: u8 = 2;

/// A decoded batch file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Batch {
    pub header: BatchHeader,
    pub records: Vec<Record>,
}

/// Why bytes are not a valid batch. Every variant names the byte offset where decoding stopped.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The file ends before a complete header or record.
    #[error("truncated at byte {offset}: needed {needed} more bytes")]
    Truncated { offset: usize, needed: usize },
    /// The first four bytes are not "FTSB".
    #[error("bad magic {found:02x?}: not an ftss batch file")]
    BadMagic { found: [u8; 4] },
    /// Written by a version of ftss this one cannot read.
    #[error("unsupported batch version {found} (this build reads version {VERSION})")]
    UnsupportedVersion { found: u16 },
    /// Header kind byte is unknown.
    #[error("unknown batch kind {found}")]
    UnknownKind { found: u8 },
    /// A checksum does not match the bytes.
    #[error("crc32c mismatch in {what} at byte {offset}: stored {stored:08x}, computed {computed:08x}")]
    CrcMismatch { what: &'static str, offset: usize, stored: u32, computed: u32 },
    /// A length field is larger than the limit or than the bytes that remain.
    #[error("length {length} at byte {offset} exceeds the limit of {limit}")]
    LengthTooLarge { offset: usize, length: u64, limit: u64 },
    /// A record tag is unknown or does not belong in this kind of batch.
    #[error("record tag {tag} at byte {offset} is not valid in a {kind:?} batch")]
    UnexpectedTag { offset: usize, tag: u8, kind: BatchKind },
    /// A field inside a record body is invalid.
    #[error("invalid {field} at byte {offset}")]
    InvalidField { offset: usize, field: &'static str },
    /// The end record's count disagrees with the records read.
    #[error("end record counts {stated} records but {found} were read")]
    CountMismatch { stated: u32, found: u32 },
    /// The file has no end record: it was cut short or is still being written.
    #[error("no end record")]
    MissingEnd,
    /// Bytes follow the end record.
    #[error("{extra} bytes after the end record")]
    TrailingBytes { extra: usize },
    /// The file is larger than any batch may be.
    #[error("batch of {bytes} bytes exceeds the limit of {BATCH_BYTES_MAX}")]
    TooLarge { bytes: usize },
}

/// Builds a batch file in memory; `finish` appends the end record.
pub struct BatchEncoder {
    bytes: Vec<u8>,
    kind: BatchKind,
    records: u32,
}

impl BatchEncoder {
    pub fn new(header: &BatchHeader) -> BatchEncoder {
        let mut bytes = Vec::with_capacity(4096);
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_le_bytes());
        bytes.push(header.kind as u8);
        bytes.push(header.flags);
        put_name(&mut bytes, &header.node);
        bytes.extend_from_slice(&header.epoch.to_le_bytes());
        bytes.extend_from_slice(&header.batch_seq.to_le_bytes());
        let crc = crc32c::crc32c(&bytes);
        bytes.extend_from_slice(&crc.to_le_bytes());
        BatchEncoder { bytes, kind: header.kind, records: 0 }
    }

    /// Bytes so far (without the end record).
    pub fn len_bytes(&self) -> usize {
        self.bytes.len()
    }

    pub fn record_count(&self) -> u32 {
        self.records
    }

    pub fn push(&mut self, record: &Record) {
        let tag = match record {
            Record::Packet(_) => TAG_PACKET,
            Record::Ack(_) => TAG_ACK,
            Record::Receipt(_) => TAG_RECEIPT,
        };
        assert_eq!(tag_kind(tag), Some(self.kind), "record does not belong in this batch kind");
        write_record(&mut self.bytes, tag, |body| encode_body(body, record));
        self.records += 1;
    }

    pub fn finish(mut self) -> Vec<u8> {
        let count = self.records;
        write_record(&mut self.bytes, TAG_END, |body| body.extend_from_slice(&count.to_le_bytes()));
        self.bytes
    }
}

/// The batch kind a record tag belongs to.
pub fn tag_kind(tag: u8) -> Option<BatchKind> {
    match tag {
        TAG_PACKET => Some(BatchKind::Packets),
        TAG_ACK => Some(BatchKind::Acks),
        TAG_RECEIPT => Some(BatchKind::Receipts),
        _ => None,
    }
}

/// Appends one framed record (tag, length, body, crc) to `out`; the body is written by `body`.
pub fn write_record(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    write_record_seeded(out, tag, 0, body);
}

/// Like [`write_record`], with the checksum started from `seed` instead of 0. A reader that does
/// not know the seed cannot make a record that verifies (the server's queue keeps a random seed
/// per segment, so that a payload imitating a record never passes for one).
pub fn write_record_seeded(out: &mut Vec<u8>, tag: u8, seed: u32, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.push(tag);
    out.extend_from_slice(&[0; 4]);
    body(out);
    let body_len = (out.len() - start - 5) as u32;
    out[start + 1..start + 5].copy_from_slice(&body_len.to_le_bytes());
    let crc = crc32c::crc32c_append(seed, &out[start..]);
    out.extend_from_slice(&crc.to_le_bytes());
}

/// Reads one framed record at `offset`. Returns (tag, body, offset after the record).
pub fn read_record(bytes: &[u8], offset: usize, body_bytes_max: usize) -> Result<(u8, &[u8], usize), DecodeError> {
    read_record_seeded(bytes, offset, body_bytes_max, 0)
}

/// Reads one framed record written by [`write_record_seeded`] with `seed`.
pub fn read_record_seeded(
    bytes: &[u8],
    offset: usize,
    body_bytes_max: usize,
    seed: u32,
) -> Result<(u8, &[u8], usize), DecodeError> {
    let mut reader = Reader { bytes, offset };
    let tag = reader.u8()?;
    let body_len = reader.u32()? as usize;
    if body_len > body_bytes_max {
        return Err(DecodeError::LengthTooLarge {
            offset: offset + 1,
            length: body_len as u64,
            limit: body_bytes_max as u64,
        });
    }
    let body = reader.take(body_len)?;
    let computed = crc32c::crc32c_append(seed, &bytes[offset..reader.offset]);
    let crc_offset = reader.offset;
    let stored = reader.u32()?;
    if stored != computed {
        return Err(DecodeError::CrcMismatch { what: "record", offset: crc_offset, stored, computed });
    }
    Ok((tag, body, reader.offset))
}

/// Encodes one record body (without framing). Also used by the server's queue log.
pub fn encode_body(out: &mut Vec<u8>, record: &Record) {
    match record {
        Record::Packet(packet) => encode_packet(out, packet),
        Record::Ack(ack) => {
            put_id(out, &ack.id);
            out.push(ack.state as u8);
            let reason = truncate_utf8(&ack.reason, REASON_BYTES_MAX);
            out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
            out.extend_from_slice(reason.as_bytes());
        }
        Record::Receipt(id) => put_id(out, id),
    }
}

/// Encodes a packet body.
pub fn encode_packet(out: &mut Vec<u8>, packet: &Packet) {
    assert!(packet.payload.len() <= PAYLOAD_BYTES_MAX, "payload over the UDP limit");
    put_id(out, &packet.id);
    put_addr(out, packet.source);
    put_addr(out, packet.destination);
    out.extend_from_slice(&packet.sent_unix_us.to_le_bytes());
    out.extend_from_slice(&(packet.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&packet.payload);
}

/// Decodes a packet body as written by [`encode_packet`]. `base` is the body's offset in its file,
/// for error messages.
pub fn decode_packet(body: &[u8], base: usize) -> Result<Packet, DecodeError> {
    let mut reader = Reader { bytes: body, offset: 0 };
    let packet = read_packet(&mut reader).map_err(|error| shift(error, base))?;
    reader.finish().map_err(|error| shift(error, base))?;
    Ok(packet)
}

fn read_packet(reader: &mut Reader) -> Result<Packet, DecodeError> {
    let id = reader.id()?;
    let source = reader.addr()?;
    let destination = reader.addr()?;
    let sent_unix_us = reader.u64()?;
    let payload_len = reader.length(PAYLOAD_BYTES_MAX)?;
    let payload = reader.take(payload_len)?.to_vec();
    Ok(Packet { id, source, destination, sent_unix_us, payload })
}

/// Decodes one record body by its tag (`base` is its offset in the file, for errors).
pub fn decode_body(tag: u8, body: &[u8], base: usize) -> Result<Record, DecodeError> {
    let mut reader = Reader { bytes: body, offset: 0 };
    let record = match tag {
        TAG_PACKET => read_packet(&mut reader).map(Record::Packet),
        TAG_ACK => read_ack(&mut reader).map(Record::Ack),
        TAG_RECEIPT => reader.id().map(Record::Receipt),
        _ => Err(DecodeError::InvalidField { offset: 0, field: "record tag" }),
    }
    .map_err(|error| shift(error, base))?;
    reader.finish().map_err(|error| shift(error, base))?;
    Ok(record)
}

fn read_ack(reader: &mut Reader) -> Result<Ack, DecodeError> {
    let id = reader.id()?;
    let state_offset = reader.offset;
    let state = AckState::from_u8(reader.u8()?)
        .ok_or(DecodeError::InvalidField { offset: state_offset, field: "ack state" })?;
    let reason_len = reader.u16()? as usize;
    if reason_len > REASON_BYTES_MAX {
        return Err(DecodeError::LengthTooLarge {
            offset: reader.offset - 2,
            length: reason_len as u64,
            limit: REASON_BYTES_MAX as u64,
        });
    }
    let reason_offset = reader.offset;
    let reason = std::str::from_utf8(reader.take(reason_len)?)
        .map_err(|_| DecodeError::InvalidField { offset: reason_offset, field: "ack reason" })?
        .to_owned();
    Ok(Ack { id, state, reason })
}

/// Decodes a whole batch file.
pub fn decode_batch(bytes: &[u8]) -> Result<Batch, DecodeError> {
    if bytes.len() > BATCH_BYTES_MAX {
        return Err(DecodeError::TooLarge { bytes: bytes.len() });
    }
    let mut reader = Reader { bytes, offset: 0 };
    let header = read_header(&mut reader)?;
    let mut records = Vec::new();
    let mut offset = reader.offset;
    loop {
        if offset == bytes.len() {
            return Err(DecodeError::MissingEnd);
        }
        let (tag, body, next) = read_record(bytes, offset, BATCH_BYTES_MAX)?;
        let body_offset = offset + 5;
        if tag == TAG_END {
            let stated = decode_end(body, body_offset)?;
            if stated as usize != records.len() {
                return Err(DecodeError::CountMismatch { stated, found: records.len() as u32 });
            }
            if next != bytes.len() {
                return Err(DecodeError::TrailingBytes { extra: bytes.len() - next });
            }
            return Ok(Batch { header, records });
        }
        if tag_kind(tag) != Some(header.kind) {
            return Err(DecodeError::UnexpectedTag { offset, tag, kind: header.kind });
        }
        if records.len() >= BATCH_RECORDS_MAX {
            return Err(DecodeError::LengthTooLarge {
                offset,
                length: records.len() as u64 + 1,
                limit: BATCH_RECORDS_MAX as u64,
            });
        }
        records.push(decode_body(tag, body, body_offset)?);
        offset = next;
    }
}

fn decode_end(body: &[u8], base: usize) -> Result<u32, DecodeError> {
    let mut reader = Reader { bytes: body, offset: 0 };
    let count = reader.u32().map_err(|e| shift(e, base))?;
    reader.finish().map_err(|e| shift(e, base))?;
    Ok(count)
}

fn read_header(reader: &mut Reader) -> Result<BatchHeader, DecodeError> {
    let magic: [u8; 4] = reader.take(4)?.try_into().expect("took 4 bytes");
    if magic != MAGIC {
        return Err(DecodeError::BadMagic { found: magic });
    }
    let version = reader.u16()?;
    if version != VERSION {
        return Err(DecodeError::UnsupportedVersion { found: version });
    }
    let kind_byte = reader.u8()?;
    let kind = BatchKind::from_u8(kind_byte).ok_or(DecodeError::UnknownKind { found: kind_byte })?;
    let flags = reader.u8()?;
    let node = reader.name()?;
    let epoch = reader.u64()?;
    let batch_seq = reader.u64()?;
    let computed = crc32c::crc32c(&reader.bytes[..reader.offset]);
    let crc_offset = reader.offset;
    let stored = reader.u32()?;
    if stored != computed {
        return Err(DecodeError::CrcMismatch { what: "header", offset: crc_offset, stored, computed });
    }
    Ok(BatchHeader { kind, node, epoch, batch_seq, flags })
}

fn shift(error: DecodeError, base: usize) -> DecodeError {
    match error {
        DecodeError::Truncated { offset, needed } => DecodeError::Truncated { offset: offset + base, needed },
        DecodeError::LengthTooLarge { offset, length, limit } => {
            DecodeError::LengthTooLarge { offset: offset + base, length, limit }
        }
        DecodeError::InvalidField { offset, field } => DecodeError::InvalidField { offset: offset + base, field },
        DecodeError::TrailingBytes { extra } => DecodeError::TrailingBytes { extra },
        other => other,
    }
}

fn put_name(out: &mut Vec<u8>, name: &NodeName) {
    out.push(name.as_str().len() as u8);
    out.extend_from_slice(name.as_str().as_bytes());
}

/// Encodes a packet id (origin, epoch, seq) as records do. Also used by the server's queue log.
pub fn encode_packet_id(out: &mut Vec<u8>, id: &PacketId) {
    put_id(out, id);
}

/// Decodes a packet id at the start of `bytes`; returns it and how many bytes it took.
pub fn decode_packet_id_prefix(bytes: &[u8]) -> Result<(PacketId, usize), DecodeError> {
    let mut reader = Reader { bytes, offset: 0 };
    let id = reader.id()?;
    Ok((id, reader.offset))
}

fn put_id(out: &mut Vec<u8>, id: &PacketId) {
    put_name(out, &id.origin);
    out.extend_from_slice(&id.epoch.to_le_bytes());
    out.extend_from_slice(&id.seq.to_le_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: SocketAddrV4) {
    out.extend_from_slice(&addr.ip().octets());
    out.extend_from_slice(&addr.port().to_le_bytes());
}

/// The longest prefix of `text` of at most `bytes_max` bytes that ends on a character boundary.
pub(crate) fn truncate_utf8(text: &str, bytes_max: usize) -> &str {
    if text.len() <= bytes_max {
        return text;
    }
    let mut end = bytes_max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// A bounds-checked cursor; every read fails with `Truncated` instead of panicking.
struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Result<&'a [u8], DecodeError> {
        let remaining = self.bytes.len() - self.offset;
        if count > remaining {
            return Err(DecodeError::Truncated { offset: self.offset, needed: count - remaining });
        }
        let slice = &self.bytes[self.offset..self.offset + count];
        self.offset += count;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], DecodeError> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, DecodeError> {
        Ok(u16::from_le_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    /// A u32 length that must not exceed `limit` nor the bytes that remain.
    fn length(&mut self, limit: usize) -> Result<usize, DecodeError> {
        let offset = self.offset;
        let length = self.u32()? as usize;
        let remaining = self.bytes.len() - self.offset;
        if length > limit || length > remaining {
            return Err(DecodeError::LengthTooLarge {
                offset,
                length: length as u64,
                limit: limit.min(remaining) as u64,
            });
        }
        Ok(length)
    }

    fn name(&mut self) -> Result<NodeName, DecodeError> {
        let offset = self.offset;
        let length = self.u8()? as usize;
        let bytes = self.take(length)?;
        let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidField { offset, field: "node name" })?;
        NodeName::new(text).map_err(|_| DecodeError::InvalidField { offset, field: "node name" })
    }

    fn id(&mut self) -> Result<PacketId, DecodeError> {
        Ok(PacketId { origin: self.name()?, epoch: self.u64()?, seq: self.u64()? })
    }

    fn addr(&mut self) -> Result<SocketAddrV4, DecodeError> {
        let ip = Ipv4Addr::from(self.array::<4>()?);
        Ok(SocketAddrV4::new(ip, self.u16()?))
    }

    fn finish(&self) -> Result<(), DecodeError> {
        if self.offset != self.bytes.len() {
            return Err(DecodeError::TrailingBytes { extra: self.bytes.len() - self.offset });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn packet(seq: u64, payload: &[u8]) -> Packet {
        Packet {
            id: PacketId { origin: node("a"), epoch: 7, seq },
            source: "10.77.0.1:4000".parse().unwrap(),
            destination: "10.77.0.2:9000".parse().unwrap(),
            sent_unix_us: 1_700_000_000_000_000 + seq,
            payload: payload.to_vec(),
        }
    }

    fn header(kind: BatchKind) -> BatchHeader {
        BatchHeader { kind, node: node("a"), epoch: 7, batch_seq: 3, flags: 0 }
    }

    fn sample() -> Vec<u8> {
        let mut encoder = BatchEncoder::new(&header(BatchKind::Packets));
        encoder.push(&Record::Packet(packet(1, b"hello")));
        encoder.push(&Record::Packet(packet(2, b"")));
        encoder.push(&Record::Packet(packet(3, &[0xAB; 9000])));
        encoder.finish()
    }

    #[test]
    fn round_trip_every_kind() {
        let bytes = sample();
        let batch = decode_batch(&bytes).unwrap();
        assert_eq!(batch.header, header(BatchKind::Packets));
        assert_eq!(batch.records.len(), 3);
        assert_eq!(batch.records[2], Record::Packet(packet(3, &[0xAB; 9000])));

        let ack = Ack { id: packet(1, b"").id, state: AckState::Stored, reason: "ok".into() };
        let mut encoder = BatchEncoder::new(&header(BatchKind::Acks));
        encoder.push(&Record::Ack(ack.clone()));
        assert_eq!(decode_batch(&encoder.finish()).unwrap().records, vec![Record::Ack(ack)]);

        let mut encoder = BatchEncoder::new(&header(BatchKind::Receipts));
        encoder.push(&Record::Receipt(packet(9, b"").id));
        assert_eq!(decode_batch(&encoder.finish()).unwrap().records, vec![Record::Receipt(packet(9, b"").id)]);
    }

    #[test]
    fn every_truncation_is_rejected() {
        let bytes = sample();
        for cut in 0..bytes.len() {
            assert!(decode_batch(&bytes[..cut]).is_err(), "prefix of {cut} bytes accepted");
        }
    }

    #[test]
    fn every_single_bit_flip_is_rejected() {
        let bytes = sample();
        // Every byte of a small batch, one bit each; CRC32C detects all single-bit errors.
        let mut encoder = BatchEncoder::new(&header(BatchKind::Packets));
        encoder.push(&Record::Packet(packet(1, b"xy")));
        let small = encoder.finish();
        for index in 0..small.len() {
            let mut flipped = small.clone();
            flipped[index] ^= 0x10;
            assert!(decode_batch(&flipped).is_err(), "flip at byte {index} accepted");
        }
        assert!(decode_batch(&bytes).is_ok());
    }

    #[test]
    fn huge_length_is_rejected_without_allocating() {
        let mut bytes = sample();
        let header_len = BatchEncoder::new(&header(BatchKind::Packets)).len_bytes();
        bytes[header_len + 1..header_len + 5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_batch(&bytes), Err(DecodeError::LengthTooLarge { .. })));
    }

    #[test]
    fn wrong_version_magic_trailing_and_count() {
        let mut bytes = sample();
        bytes[4] = 9;
        assert!(matches!(decode_batch(&bytes), Err(DecodeError::UnsupportedVersion { found: 9 })));
        let mut bytes = sample();
        bytes[0] = b'X';
        assert!(matches!(decode_batch(&bytes), Err(DecodeError::BadMagic { .. })));
        let mut bytes = sample();
        bytes.push(0);
        assert!(matches!(decode_batch(&bytes), Err(DecodeError::TrailingBytes { extra: 1 })));
        assert!(matches!(decode_batch(&[]), Err(DecodeError::Truncated { .. })));
    }

    #[test]
    fn random_bytes_never_panic() {
        // A small deterministic generator: xorshift.
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let good = sample();
        for round in 0..20_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut bytes = good.clone();
            let edits = (state % 8) as usize + 1;
            for edit in 0..edits {
                let position = ((state >> (edit * 5)) as usize + round) % bytes.len();
                bytes[position] = (state >> (edit * 3)) as u8;
            }
            bytes.truncate((state as usize >> 3) % (good.len() + 1));
            let _ = decode_batch(&bytes);
        }
    }
}
