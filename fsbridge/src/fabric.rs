//! The fabric protocol: the same batches as on the volume, carried over a stream connection (a unix
//! socket or TCP) straight to ftss-server. Pure encode/decode plus blocking frame I/O on any
//! `Read`/`Write`; the shim and the server own the sockets.
//!
//! ```text
//! frame   := length u32 | type u8 | body | crc u32   (length = 1 + body bytes; crc32c of type and body)
//! ```
//!
//! A session, in order:
//! 1. server → `Challenge` (protocol version, 32-byte random nonce);
//! 2. node → `Hello` (version, node name, fabric address, packet-id epoch, its own nonce, and
//!    HMAC-SHA256 under the node's key of both nonces and everything it claims);
//! 3. server → `Welcome` (its own HMAC over both nonces: the node knows it reached a server holding
//!    its key) or `Refused` (reason) and the connection closes;
//! 4. from then on every frame is followed by a 16-byte MAC ([`FrameSealer`]) under a session key
//!    derived from the node's key and both nonces, over the frame, its direction and its number;
//!    either side, in any order: node → `Packets` (a batch of kind packets, exactly the bytes
//!    an outbox file would hold), `Receipts`, `Ports` (the UDP ports bound in the process, so the
//!    server knows where to deliver); server → `Acks` (stored, accepted best effort, or
//!    rejected: a node is not told of deliveries and receipts) and `Packets` (deliveries).
//!
//! Every length is checked against [`FRAME_BODY_BYTES_MAX`] before anything is allocated; a frame
//! that fails its CRC, has an unknown type or a malformed body is an error that ends the
//! connection. Batches inside frames are decoded by [`crate::format::decode_batch`], with all of its
//! checks.

use std::io::{self, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::NodeName;
use crate::format::truncate_utf8;

/// The one protocol version this code speaks.
pub const FABRIC_VERSION: u16 = 1;
/// Largest frame body: one batch of up to a quarter of [`crate::format::BATCH_BYTES_MAX`] plus slack.
pub const FRAME_BODY_BYTES_MAX: usize = crate::format::BATCH_BYTES_MAX / 2;
/// Bytes of a nonce and of an HMAC-SHA256 tag.
pub const NONCE_BYTES: usize = 32;
pub const PROOF_BYTES: usize = 32;
/// Shortest and longest accepted node key (bytes, after hex decoding).
pub const KEY_BYTES_MIN: usize = 16;
pub const KEY_BYTES_MAX: usize = 256;
/// Longest refusal reason carried.
pub const REASON_BYTES_MAX: usize = 512;
/// Most ports in one `Ports` frame (every UDP port).
pub const PORTS_MAX: usize = 65_536;

const TYPE_CHALLENGE: u8 = 1;
const TYPE_HELLO: u8 = 2;
const TYPE_WELCOME: u8 = 3;
const TYPE_REFUSED: u8 = 4;
const TYPE_PACKETS: u8 = 5;
const TYPE_ACKS: u8 = 6;
const TYPE_RECEIPTS: u8 = 7;
const TYPE_PORTS: u8 = 8;

const CLIENT_PROOF_LABEL: &[u8] = b"ftss-fabric-v1 node\0";
const SERVER_PROOF_LABEL: &[u8] = b"ftss-fabric-v1 server\0";

pub type Nonce = [u8; NONCE_BYTES];
pub type Proof = [u8; PROOF_BYTES];

/// What a node claims when it connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub node: NodeName,
    pub addr: Ipv4Addr,
    pub epoch: u64,
    pub nonce: Nonce,
    pub proof: Proof,
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    Challenge {
        version: u16,
        nonce: Nonce,
    },
    Hello(Hello),
    Welcome {
        proof: Proof,
    },
    Refused {
        reason: String,
    },
    /// An encoded batch of kind packets (node → server: sends; server → node: deliveries).
    Packets(Vec<u8>),
    /// An encoded batch of kind acks.
    Acks(Vec<u8>),
    /// An encoded batch of kind receipts.
    Receipts(Vec<u8>),
    /// Every fabric UDP port the sending process has bound, replacing the previous list.
    Ports(Vec<u16>),
}

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The peer closed the connection between frames.
    #[error("connection closed")]
    Closed,
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The length prefix is zero or over the limit.
    #[error("frame length {0} is zero or over the limit")]
    Length(u32),
    #[error("frame checksum mismatch")]
    Checksum,
    /// A frame after the handshake does not carry the session's MAC for its place in the stream.
    #[error("frame authentication failed (forged, altered, replayed or out of order)")]
    Mac,
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The body does not parse as its type says.
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

impl From<FrameError> for io::Error {
    fn from(error: FrameError) -> io::Error {
        match error {
            FrameError::Io(error) => error,
            FrameError::Closed => io::Error::new(io::ErrorKind::UnexpectedEof, "connection closed"),
            other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
        }
    }
}

impl Frame {
    fn type_byte(&self) -> u8 {
        match self {
            Frame::Challenge { .. } => TYPE_CHALLENGE,
            Frame::Hello(_) => TYPE_HELLO,
            Frame::Welcome { .. } => TYPE_WELCOME,
            Frame::Refused { .. } => TYPE_REFUSED,
            Frame::Packets(_) => TYPE_PACKETS,
            Frame::Acks(_) => TYPE_ACKS,
            Frame::Receipts(_) => TYPE_RECEIPTS,
            Frame::Ports(_) => TYPE_PORTS,
        }
    }

    /// The frame as it goes on the wire.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; 4];
        out.push(self.type_byte());
        match self {
            Frame::Challenge { version, nonce } => {
                out.extend_from_slice(&version.to_le_bytes());
                out.extend_from_slice(nonce);
            }
            Frame::Hello(hello) => {
                out.extend_from_slice(&hello.version.to_le_bytes());
                out.push(hello.node.as_str().len() as u8);
                out.extend_from_slice(hello.node.as_str().as_bytes());
                out.extend_from_slice(&hello.addr.octets());
                out.extend_from_slice(&hello.epoch.to_le_bytes());
                out.extend_from_slice(&hello.nonce);
                out.extend_from_slice(&hello.proof);
            }
            Frame::Welcome { proof } => out.extend_from_slice(proof),
            Frame::Refused { reason } => {
                let reason = truncate_utf8(reason, REASON_BYTES_MAX);
                out.extend_from_slice(&(reason.len() as u16).to_le_bytes());
                out.extend_from_slice(reason.as_bytes());
            }
            Frame::Packets(batch) | Frame::Acks(batch) | Frame::Receipts(batch) => out.extend_from_slice(batch),
            Frame::Ports(ports) => {
                assert!(ports.len() <= PORTS_MAX, "more ports than exist");
                out.extend_from_slice(&(ports.len() as u32).to_le_bytes());
                for port in ports {
                    out.extend_from_slice(&port.to_le_bytes());
                }
            }
        }
        let length = out.len() - 4;
        assert!(length <= FRAME_BODY_BYTES_MAX + 1, "frame of {length} bytes over the limit");
        out[..4].copy_from_slice(&(length as u32).to_le_bytes());
        let crc = crc32c::crc32c(&out[4..]);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses a frame from its type byte and body (CRC already checked).
    pub fn decode(type_byte: u8, body: &[u8]) -> Result<Frame, FrameError> {
        let mut reader = Reader { bytes: body, offset: 0 };
        let frame = match type_byte {
            TYPE_CHALLENGE => {
                let version = reader.u16("challenge")?;
                Frame::Challenge { version, nonce: reader.array("challenge")? }
            }
            TYPE_HELLO => {
                let version = reader.u16("hello")?;
                let name_len = reader.take(1, "hello")?[0] as usize;
                let name =
                    std::str::from_utf8(reader.take(name_len, "hello")?).map_err(|_| FrameError::Malformed("hello"))?;
                let node = NodeName::new(name).map_err(|_| FrameError::Malformed("hello"))?;
                let octets: [u8; 4] = reader.array("hello")?;
                let epoch = u64::from_le_bytes(reader.array("hello")?);
                let nonce = reader.array("hello")?;
                let proof = reader.array("hello")?;
                Frame::Hello(Hello { version, node, addr: Ipv4Addr::from(octets), epoch, nonce, proof })
            }
            TYPE_WELCOME => Frame::Welcome { proof: reader.array("welcome")? },
            TYPE_REFUSED => {
                let length = reader.u16("refused")? as usize;
                if length > REASON_BYTES_MAX {
                    return Err(FrameError::Malformed("refused"));
                }
                let reason = std::str::from_utf8(reader.take(length, "refused")?)
                    .map_err(|_| FrameError::Malformed("refused"))?
                    .to_owned();
                Frame::Refused { reason }
            }
            TYPE_PACKETS => Frame::Packets(reader.rest()),
            TYPE_ACKS => Frame::Acks(reader.rest()),
            TYPE_RECEIPTS => Frame::Receipts(reader.rest()),
            TYPE_PORTS => {
                let count = u32::from_le_bytes(reader.array("ports")?) as usize;
                if count > PORTS_MAX || count * 2 != body.len() - 4 {
                    return Err(FrameError::Malformed("ports"));
                }
                let ports = (0..count).map(|_| reader.u16("ports")).collect::<Result<Vec<_>, _>>()?;
                Frame::Ports(ports)
            }
            other => return Err(FrameError::UnknownType(other)),
        };
        if reader.offset != body.len() {
            return Err(FrameError::Malformed("trailing bytes in a"));
        }
        Ok(frame)
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    offset: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize, what: &'static str) -> Result<&'a [u8], FrameError> {
        let end = self.offset.checked_add(count).filter(|end| *end <= self.bytes.len());
        let end = end.ok_or(FrameError::Malformed(what))?;
        let slice = &self.bytes[self.offset..end];
        self.offset = end;
        Ok(slice)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], FrameError> {
        Ok(self.take(N, what)?.try_into().expect("took N bytes"))
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, FrameError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn rest(&mut self) -> Vec<u8> {
        let rest = self.bytes[self.offset..].to_vec();
        self.offset = self.bytes.len();
        rest
    }
}

/// Reads one frame. The length is checked before the body is allocated.
pub fn read_frame(reader: &mut impl Read) -> Result<Frame, FrameError> {
    read_frame_limited(reader, FRAME_BODY_BYTES_MAX)
}

/// Reads one frame whose body may be at most `body_bytes_max` (a server reading a handshake allows
/// far less than a batch).
pub fn read_frame_limited(reader: &mut impl Read, body_bytes_max: usize) -> Result<Frame, FrameError> {
    let bytes = read_frame_bytes(reader, body_bytes_max)?;
    decode_frame_bytes(&bytes)
}

/// Decodes a frame read by [`read_frame_bytes`] (length and CRC already checked).
fn decode_frame_bytes(bytes: &[u8]) -> Result<Frame, FrameError> {
    Frame::decode(bytes[4], &bytes[5..bytes.len() - 4])
}

/// Reads one frame's bytes as they were on the wire (length prefix, type, body, CRC), checking the
/// length before allocating and the CRC.
fn read_frame_bytes(reader: &mut impl Read, body_bytes_max: usize) -> Result<Vec<u8>, FrameError> {
    let mut prefix = [0u8; 4];
    match reader.read(&mut prefix[..1]) {
        Ok(0) => return Err(FrameError::Closed),
        Ok(_) => {}
        Err(error) => return Err(FrameError::Io(error)),
    }
    reader.read_exact(&mut prefix[1..])?;
    let length = u32::from_le_bytes(prefix);
    if length == 0 || length as usize > body_bytes_max.min(FRAME_BODY_BYTES_MAX) + 1 {
        return Err(FrameError::Length(length));
    }
    let mut bytes = vec![0u8; 4 + length as usize + 4];
    bytes[..4].copy_from_slice(&prefix);
    reader.read_exact(&mut bytes[4..])?;
    let (content, crc) = bytes[4..].split_at(length as usize);
    if crc32c::crc32c(content) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(FrameError::Checksum);
    }
    Ok(bytes)
}

/// Bytes of the MAC that follows every frame once the handshake is over.
pub const FRAME_MAC_BYTES: usize = 16;
const SESSION_LABEL: &[u8] = b"ftss-fabric-v1 session\0";

/// Which end of a session wrote a frame (each direction has its own MAC input).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Node = 1,
    Server = 2,
}

/// The session key both ends derive after the handshake from the node's key and both nonces.
fn session_key(node_key: &[u8], server_nonce: &Nonce, node_nonce: &Nonce) -> [u8; 32] {
    let mut mac = keyed(node_key);
    mac.update(SESSION_LABEL);
    mac.update(server_nonce);
    mac.update(node_nonce);
    mac.finalize().into_bytes().into()
}

fn frame_mac(key: &[u8; 32], writer: Role, number: u64, bytes: &[u8]) -> Hmac<Sha256> {
    let mut mac = keyed(key);
    mac.update(&[writer as u8]);
    mac.update(&number.to_le_bytes());
    mac.update(bytes);
    mac
}

/// Seals the frames one end writes: each is followed by a MAC over its bytes, the writer's role
/// and its number in this direction, so that frames cannot be forged, altered, replayed, reordered
/// or reflected by anyone without the node's key (TCP on a shared network). Not encryption.
pub struct FrameSealer {
    key: [u8; 32],
    role: Role,
    next: u64,
}

/// Opens the frames the other end writes (see [`FrameSealer`]).
pub struct FrameOpener {
    key: [u8; 32],
    peer: Role,
    next: u64,
}

/// The two halves of one end's session: what it writes and what it reads.
pub fn session(node_key: &[u8], server_nonce: &Nonce, node_nonce: &Nonce, role: Role) -> (FrameSealer, FrameOpener) {
    let key = session_key(node_key, server_nonce, node_nonce);
    let peer = if role == Role::Node { Role::Server } else { Role::Node };
    (FrameSealer { key, role, next: 0 }, FrameOpener { key, peer, next: 0 })
}

impl FrameSealer {
    /// The MAC to write right after `frame_bytes` (an encoded frame); frames must be written in
    /// the order they are sealed.
    pub fn seal(&mut self, frame_bytes: &[u8]) -> [u8; FRAME_MAC_BYTES] {
        let tag = frame_mac(&self.key, self.role, self.next, frame_bytes).finalize().into_bytes();
        self.next += 1;
        tag[..FRAME_MAC_BYTES].try_into().expect("a SHA-256 tag is longer")
    }
}

impl FrameOpener {
    /// Reads the next sealed frame and checks its MAC (in constant time).
    pub fn read(&mut self, reader: &mut impl Read, body_bytes_max: usize) -> Result<Frame, FrameError> {
        let bytes = read_frame_bytes(reader, body_bytes_max)?;
        let mut tag = [0u8; FRAME_MAC_BYTES];
        reader.read_exact(&mut tag)?;
        if frame_mac(&self.key, self.peer, self.next, &bytes).verify_truncated_left(&tag).is_err() {
            return Err(FrameError::Mac);
        }
        self.next += 1;
        decode_frame_bytes(&bytes)
    }
}

/// Writes one frame.
pub fn write_frame(writer: &mut impl Write, frame: &Frame) -> io::Result<()> {
    writer.write_all(&frame.encode())
}

fn keyed(key: &[u8]) -> Hmac<Sha256> {
    Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length")
}

fn client_mac(key: &[u8], server_nonce: &Nonce, hello: &Hello) -> Hmac<Sha256> {
    let mut mac = keyed(key);
    mac.update(CLIENT_PROOF_LABEL);
    mac.update(server_nonce);
    mac.update(&hello.nonce);
    mac.update(&hello.version.to_le_bytes());
    mac.update(&[hello.node.as_str().len() as u8]);
    mac.update(hello.node.as_str().as_bytes());
    mac.update(&hello.addr.octets());
    mac.update(&hello.epoch.to_le_bytes());
    mac
}

/// The node's proof for `hello` (its `proof` field is ignored) answering `server_nonce`.
pub fn client_proof(key: &[u8], server_nonce: &Nonce, hello: &Hello) -> Proof {
    client_mac(key, server_nonce, hello).finalize().into_bytes().into()
}

/// Does `hello.proof` show knowledge of `key`? Constant-time comparison.
pub fn verify_client(key: &[u8], server_nonce: &Nonce, hello: &Hello) -> bool {
    client_mac(key, server_nonce, hello).verify_slice(&hello.proof).is_ok()
}

fn server_mac(key: &[u8], server_nonce: &Nonce, client_nonce: &Nonce) -> Hmac<Sha256> {
    let mut mac = keyed(key);
    mac.update(SERVER_PROOF_LABEL);
    mac.update(client_nonce);
    mac.update(server_nonce);
    mac
}

/// The server's proof that it holds the node's key.
pub fn server_proof(key: &[u8], server_nonce: &Nonce, client_nonce: &Nonce) -> Proof {
    server_mac(key, server_nonce, client_nonce).finalize().into_bytes().into()
}

pub fn verify_server(key: &[u8], server_nonce: &Nonce, client_nonce: &Nonce, proof: &Proof) -> bool {
    server_mac(key, server_nonce, client_nonce).verify_slice(proof).is_ok()
}

/// A fresh random nonce from the kernel. Panics if the kernel has no randomness to give: a
/// predictable challenge would let a fake server collect proofs to replay, so there is no fallback
/// (the caller's connection fails; the server and the shim catch panics per connection thread).
pub fn nonce() -> Nonce {
    let mut nonce = [0u8; NONCE_BYTES];
    let mut filled = 0;
    while filled < NONCE_BYTES {
        // SAFETY: the buffer is valid for the remaining bytes.
        let got = unsafe { libc::getrandom(nonce[filled..].as_mut_ptr().cast(), NONCE_BYTES - filled, 0) };
        match got {
            got if got > 0 => filled += got as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => panic!("getrandom failed: {}", io::Error::last_os_error()),
        }
    }
    nonce
}

/// A new node key as the text of a key file (64 hex digits and a newline).
pub fn generate_key_text() -> String {
    let mut text: String = nonce().iter().map(|byte| format!("{byte:02x}")).collect();
    text.push('\n');
    text
}

/// Reads a key file: hex digits (whitespace ignored), 16 to 256 bytes.
pub fn read_key_file(path: &Path) -> Result<Vec<u8>, String> {
    let text = std::fs::read_to_string(path).map_err(|error| format!("key file {}: {error}", path.display()))?;
    parse_key(&text).map_err(|reason| format!("key file {}: {reason}", path.display()))
}

/// Parses the text of a key file.
pub fn parse_key(text: &str) -> Result<Vec<u8>, String> {
    let digits: Vec<u8> = text.bytes().filter(|byte| !byte.is_ascii_whitespace()).collect();
    if !digits.len().is_multiple_of(2) || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err("not an even number of hex digits".into());
    }
    let key: Vec<u8> = digits
        .chunks(2)
        .map(|pair| u8::from_str_radix(std::str::from_utf8(pair).expect("hex is ASCII"), 16).expect("hex digits"))
        .collect();
    if !(KEY_BYTES_MIN..=KEY_BYTES_MAX).contains(&key.len()) {
        return Err(format!("{} bytes; a key has {KEY_BYTES_MIN} to {KEY_BYTES_MAX}", key.len()));
    }
    Ok(key)
}

/// Where a fabric endpoint is: `unix:/path` or `tcp:HOST:PORT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Unix(PathBuf),
    Tcp(String),
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(text: &str) -> Result<Endpoint, String> {
        if let Some(path) = text.strip_prefix("unix:")
            && !path.is_empty()
        {
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        if let Some(address) = text.strip_prefix("tcp:")
            && let Some((host, port)) = address.rsplit_once(':')
            && !host.is_empty()
            && port.parse::<u16>().is_ok()
        {
            return Ok(Endpoint::Tcp(address.to_owned()));
        }
        Err(format!("fabric endpoint {text:?} is not unix:/PATH or tcp:HOST:PORT"))
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, formatter: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(formatter, "unix:{}", path.display()),
            Endpoint::Tcp(address) => write!(formatter, "tcp:{address}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            version: FABRIC_VERSION,
            node: NodeName::new("b").unwrap(),
            addr: "10.77.0.2".parse().unwrap(),
            epoch: 7,
            nonce: [3; NONCE_BYTES],
            proof: [0; PROOF_BYTES],
        }
    }

    fn round_trip(frame: Frame) {
        let bytes = frame.encode();
        assert_eq!(read_frame(&mut &bytes[..]).unwrap(), frame);
    }

    #[test]
    fn every_frame_type_round_trips() {
        round_trip(Frame::Challenge { version: FABRIC_VERSION, nonce: [9; NONCE_BYTES] });
        round_trip(Frame::Hello(hello()));
        round_trip(Frame::Welcome { proof: [1; PROOF_BYTES] });
        round_trip(Frame::Refused { reason: "bad key".into() });
        round_trip(Frame::Packets(vec![1, 2, 3]));
        round_trip(Frame::Acks(Vec::new()));
        round_trip(Frame::Receipts(vec![7; 100]));
        round_trip(Frame::Ports(vec![9000, 1, 65535]));
    }

    #[test]
    fn damaged_frames_are_errors() {
        let bytes = Frame::Ports(vec![1, 2]).encode();
        for index in 0..bytes.len() {
            let mut damaged = bytes.clone();
            damaged[index] ^= 0x40;
            assert!(read_frame(&mut &damaged[..]).is_err(), "flip at {index} accepted");
        }
        for cut in 1..bytes.len() {
            assert!(read_frame(&mut &bytes[..cut]).is_err(), "cut at {cut} accepted");
        }
        assert!(matches!(read_frame(&mut &[][..]), Err(FrameError::Closed)));
        let huge = u32::MAX.to_le_bytes();
        assert!(matches!(read_frame(&mut &huge[..]), Err(FrameError::Length(u32::MAX))));
    }

    #[test]
    fn proofs_bind_the_key_the_nonces_and_the_claims() {
        let key = parse_key(&generate_key_text()).unwrap();
        let server_nonce = nonce();
        let mut claim = hello();
        claim.proof = client_proof(&key, &server_nonce, &claim);
        assert!(verify_client(&key, &server_nonce, &claim));
        assert!(!verify_client(&[0; 32], &server_nonce, &claim), "wrong key");
        assert!(!verify_client(&key, &nonce(), &claim), "replayed to another challenge");
        let mut other = claim.clone();
        other.node = NodeName::new("a").unwrap();
        assert!(!verify_client(&key, &server_nonce, &other), "another node's name");
        let proof = server_proof(&key, &server_nonce, &claim.nonce);
        assert!(verify_server(&key, &server_nonce, &claim.nonce, &proof));
        assert!(!verify_server(&[1; 32], &server_nonce, &claim.nonce, &proof));
    }

    #[test]
    fn sealed_frames_open_once_in_order_and_only_in_their_direction() {
        let key = parse_key(&generate_key_text()).unwrap();
        let (server_nonce, node_nonce) = (nonce(), nonce());
        let (mut node_sealer, _) = session(&key, &server_nonce, &node_nonce, Role::Node);
        let (_, mut server_opener) = session(&key, &server_nonce, &node_nonce, Role::Server);
        let seal = |sealer: &mut FrameSealer, frame: &Frame| {
            let mut bytes = frame.encode();
            let tag = sealer.seal(&bytes);
            bytes.extend_from_slice(&tag);
            bytes
        };
        let first = seal(&mut node_sealer, &Frame::Ports(vec![1]));
        let second = seal(&mut node_sealer, &Frame::Ports(vec![2]));
        // Out of order: the second frame in the first place.
        let (_, mut opener) = session(&key, &server_nonce, &node_nonce, Role::Server);
        assert!(matches!(opener.read(&mut &second[..], 64), Err(FrameError::Mac)));
        assert_eq!(server_opener.read(&mut &first[..], 64).unwrap(), Frame::Ports(vec![1]));
        // Replayed.
        assert!(matches!(server_opener.read(&mut &first[..], 64), Err(FrameError::Mac)));
        // Altered (the CRC fixed up, as a forger would).
        let (mut sealer, _) = session(&key, &server_nonce, &node_nonce, Role::Node);
        let (_, mut opener) = session(&key, &server_nonce, &node_nonce, Role::Server);
        let mut forged = Frame::Ports(vec![7]).encode();
        let tag = sealer.seal(&Frame::Ports(vec![6]).encode());
        forged.extend_from_slice(&tag);
        assert!(matches!(opener.read(&mut &forged[..], 64), Err(FrameError::Mac)));
        // Reflected: a frame the server sealed is not accepted by the server as the node's.
        let (mut server_sealer, _) = session(&key, &server_nonce, &node_nonce, Role::Server);
        let (_, mut opener) = session(&key, &server_nonce, &node_nonce, Role::Server);
        let reflected = seal(&mut server_sealer, &Frame::Ports(vec![1]));
        assert!(matches!(opener.read(&mut &reflected[..], 64), Err(FrameError::Mac)));
        // Another session's key.
        let (_, mut other) = session(&key, &nonce(), &node_nonce, Role::Server);
        assert!(matches!(other.read(&mut &first[..], 64), Err(FrameError::Mac)));
    }

    #[test]
    fn keys_and_endpoints_parse() {
        assert_eq!(parse_key("00112233445566778899aabbccddeeff\n").unwrap().len(), 16);
        assert!(parse_key("0011").is_err(), "too short");
        assert!(parse_key("zz112233445566778899aabbccddeeff").is_err());
        assert_eq!("unix:/run/ftss.sock".parse(), Ok(Endpoint::Unix("/run/ftss.sock".into())));
        assert_eq!("tcp:127.0.0.1:7000".parse(), Ok(Endpoint::Tcp("127.0.0.1:7000".into())));
        assert_eq!("tcp:[::1]:7000".parse(), Ok(Endpoint::Tcp("[::1]:7000".into())));
        for bad in ["unix:", "tcp:7000", "tcp:host:99999", "udp:x:1", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
    }
}
