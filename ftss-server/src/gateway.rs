//! The external network gateway: real UDP sockets on the array's own network.
//!
//! - **Ingress**: `--ingress LISTEN=node:port` binds LISTEN; every datagram arriving there becomes a
//!   packet from the external sender's real address to that node's port, stored like any other.
//! - **Egress**: a packet for an address outside the fabric (`--fabric`) that no node registered is
//!   sent best-effort from the ingress socket mapped to the packet's source node and port (so a
//!   reply to an ingress conversation comes from the port the outside peer talks to), or else from
//!   a socket of its own for that source (created on demand, like NAT), whose replies come back in
//!   as ingress to that source.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::AsFd;
use std::time::Instant;

use fsbridge::NodeName;
use serde::Serialize;

/// Datagrams read from one gateway socket in one cycle.
const RECEIVE_PER_SOCKET_MAX: usize = 1024;
/// Sockets kept for egress sources without an ingress mapping; the least recently used is closed.
const NAT_SOCKETS_MAX: usize = 1024;

/// `--ingress 0.0.0.0:5000=b:9000`.
#[derive(Clone, Debug)]
pub struct IngressRule {
    pub listen: SocketAddrV4,
    pub node: NodeName,
    pub port: u16,
}

impl std::str::FromStr for IngressRule {
    type Err = String;

    fn from_str(text: &str) -> Result<IngressRule, String> {
        let usage = || format!("{text:?}: want LISTEN-ADDR:PORT=NODE:PORT, e.g. 0.0.0.0:5000=b:9000");
        let (listen, target) = text.split_once('=').ok_or_else(usage)?;
        let listen: SocketAddrV4 = listen.parse().map_err(|_| usage())?;
        let (node, port) = target.rsplit_once(':').ok_or_else(usage)?;
        let node = NodeName::new(node).map_err(|error| error.to_string())?;
        let port: u16 = port.parse().map_err(|_| usage())?;
        if port == fsbridge::ip::IP_PORT {
            return Err(format!("{text:?}: port 0 is no UDP port (on the volume it names a node's whole IP packets)"));
        }
        Ok(IngressRule { listen, node, port })
    }
}

pub use fsbridge::ip::Cidr;

/// A datagram that arrived from outside, and where it goes in the fabric.
pub struct Arrival {
    pub source: SocketAddrV4,
    /// Ingress: the node and port of the rule; NAT: the fabric source the socket belongs to.
    pub target: Target,
    pub payload: Vec<u8>,
}

pub enum Target {
    Node(NodeName, u16),
    Address(SocketAddrV4),
}

/// Gateway counters for status.
#[derive(Clone, Debug, Default, Serialize)]
pub struct GatewayCounters {
    pub ingress_received: u64,
    pub ingress_unroutable: u64,
    pub egress_sent: u64,
    pub egress_send_errors: u64,
    pub nat_sockets: u64,
    /// Datagrams from outside dropped because the queue was at its bounds.
    pub dropped_over_limit: u64,
}

struct Ingress {
    rule: IngressRule,
    socket: UdpSocket,
    received: u64,
}

struct Nat {
    socket: UdpSocket,
    last_used: Instant,
}

/// The gateway's sockets.
#[derive(Default)]
pub struct Gateway {
    ingress: Vec<Ingress>,
    nat: HashMap<SocketAddrV4, Nat>,
    pub counters: GatewayCounters,
    pub last_send_error: Option<String>,
}

/// One ingress rule's status.
#[derive(Debug, Serialize)]
pub struct IngressStatus {
    pub listen: String,
    pub node: String,
    pub port: u16,
    pub received: u64,
}

impl Gateway {
    /// Binds every ingress socket.
    pub fn open(rules: &[IngressRule]) -> io::Result<Gateway> {
        let mut gateway = Gateway::default();
        for rule in rules {
            let socket = UdpSocket::bind(rule.listen)
                .map_err(|error| io::Error::new(error.kind(), format!("binding ingress {}: {error}", rule.listen)))?;
            socket.set_nonblocking(true)?;
            gateway.ingress.push(Ingress { rule: rule.clone(), socket, received: 0 });
        }
        Ok(gateway)
    }

    /// Raw fds to wait on for arrivals.
    pub fn fds(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        self.ingress
            .iter()
            .map(|ingress| ingress.socket.as_fd())
            .chain(self.nat.values().map(|nat| nat.socket.as_fd()))
            .collect()
    }

    /// Reads what has arrived on every socket (bounded per socket).
    pub fn receive(&mut self) -> Vec<Arrival> {
        let mut arrivals = Vec::new();
        let mut buffer = vec![0u8; 65_536];
        for ingress in &mut self.ingress {
            for (source, payload) in drain_socket(&ingress.socket, &mut buffer) {
                ingress.received += 1;
                let target = Target::Node(ingress.rule.node.clone(), ingress.rule.port);
                arrivals.push(Arrival { source, target, payload });
            }
        }
        for (fabric_source, nat) in &mut self.nat {
            for (source, payload) in drain_socket(&nat.socket, &mut buffer) {
                nat.last_used = Instant::now();
                arrivals.push(Arrival { source, target: Target::Address(*fabric_source), payload });
            }
        }
        self.counters.ingress_received += arrivals.len() as u64;
        arrivals
    }

    /// Sends a packet out, best effort: from the ingress socket mapped to `source_node:source_port`
    /// if there is one, else from the NAT socket of `source`.
    pub fn send(
        &mut self,
        source_node: Option<&NodeName>,
        source: SocketAddrV4,
        destination: SocketAddrV4,
        payload: &[u8],
    ) {
        let mapped = self
            .ingress
            .iter()
            .find(|ingress| Some(&ingress.rule.node) == source_node && ingress.rule.port == source.port());
        let result = match mapped {
            Some(ingress) => ingress.socket.send_to(payload, destination),
            None => self.nat_socket(source).and_then(|socket| socket.send_to(payload, destination)),
        };
        match result {
            Ok(_) => self.counters.egress_sent += 1,
            Err(error) => {
                self.counters.egress_send_errors += 1;
                self.last_send_error = Some(format!("{source} -> {destination}: {error}"));
            }
        }
    }

    fn nat_socket(&mut self, source: SocketAddrV4) -> io::Result<&UdpSocket> {
        if !self.nat.contains_key(&source) {
            if self.nat.len() >= NAT_SOCKETS_MAX
                && let Some(oldest) = self.nat.iter().min_by_key(|(_, nat)| nat.last_used).map(|(addr, _)| *addr)
            {
                self.nat.remove(&oldest);
            }
            let socket = UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))?;
            socket.set_nonblocking(true)?;
            self.nat.insert(source, Nat { socket, last_used: Instant::now() });
        }
        let nat = self.nat.get_mut(&source).expect("just inserted");
        nat.last_used = Instant::now();
        Ok(&nat.socket)
    }

    pub fn ingress_status(&self) -> Vec<IngressStatus> {
        self.ingress
            .iter()
            .map(|ingress| IngressStatus {
                listen: ingress.rule.listen.to_string(),
                node: ingress.rule.node.to_string(),
                port: ingress.rule.port,
                received: ingress.received,
            })
            .collect()
    }

    pub fn nat_count(&self) -> usize {
        self.nat.len()
    }
}

fn drain_socket(socket: &UdpSocket, buffer: &mut [u8]) -> Vec<(SocketAddrV4, Vec<u8>)> {
    let mut datagrams = Vec::new();
    while datagrams.len() < RECEIVE_PER_SOCKET_MAX {
        match socket.recv_from(buffer) {
            Ok((length, SocketAddr::V4(source))) => datagrams.push((source, buffer[..length].to_vec())),
            Ok(_) => continue,
            Err(_) => break,
        }
    }
    datagrams
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rules_and_cidrs() {
        let rule: IngressRule = "127.0.0.1:5000=b:9000".parse().unwrap();
        assert_eq!((rule.listen.port(), rule.node.as_str(), rule.port), (5000, "b", 9000));
        assert!("127.0.0.1:5000".parse::<IngressRule>().is_err());
        assert!("127.0.0.1:5000=../x:1".parse::<IngressRule>().is_err());
        assert!("127.0.0.1:5000=b:0".parse::<IngressRule>().unwrap_err().contains("port 0"));
        let fabric: Cidr = "10.77.0.0/16".parse().unwrap();
        assert!(fabric.contains("10.77.1.2".parse().unwrap()));
        assert!(!fabric.contains("127.0.0.1".parse().unwrap()));
    }
}
