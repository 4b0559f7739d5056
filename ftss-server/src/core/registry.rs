//! The routing registry: which node owns which fabric address, decided from the registrations the
//! shell reads off the volume (and the fabric nodes it admits), and how long packets for an address
//! no node owns are held before they are dead-lettered. No I/O: the shell reads `node.toml` files
//! and the clock and passes what it found.
//!
//! The rules, one test each:
//! - each address belongs to one node: the node that holds it keeps it; otherwise the earliest
//!   registration (then the name) wins, and a later claimant is refused until it changes address;
//! - a registration that cannot be read (an I/O error, a file caught mid-rewrite) keeps the address
//!   last read, so that one failed read does not unregister a node; a node never read is not
//!   registered;
//! - packets for an unregistered address are held for the hold time counted from when this server
//!   found the address unregistered (after a restart, from then).

use std::net::Ipv4Addr;
use std::time::Duration;

use fsbridge::NodeName;
use fsbridge::hash::{HashMap, HashSet};

use super::Time;

/// What reading one node's registration gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Registration {
    /// Its address, and when it registered, in microseconds since the epoch (an earlier
    /// registration wins a contested address).
    Address { addr: Ipv4Addr, registered_unix_us: u64 },
    /// It has none (not yet, or withdrawn).
    Absent,
    /// It could not be read: why.
    Unreadable(String),
}

/// What the registry made of one node's registration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    Granted(Ipv4Addr),
    /// Unreadable now: the address last read stays the node's.
    Kept {
        addr: Ipv4Addr,
        reason: String,
    },
    /// Its address is another node's.
    Refused {
        addr: Ipv4Addr,
        holder: NodeName,
    },
    /// Not registered (no registration, or one never read).
    Unregistered {
        reason: Option<String>,
    },
}

/// Who owns which address.
#[derive(Debug, Default)]
pub struct Registry {
    addr_to_node: HashMap<Ipv4Addr, NodeName>,
    node_to_addr: HashMap<NodeName, Ipv4Addr>,
    refused: HashSet<NodeName>,
}

impl Registry {
    /// The node that owns `addr`.
    pub fn node(&self, addr: &Ipv4Addr) -> Option<&NodeName> {
        self.addr_to_node.get(addr)
    }

    /// The address `node` owns.
    pub fn addr(&self, node: &NodeName) -> Option<Ipv4Addr> {
        self.node_to_addr.get(node).copied()
    }

    /// Was `node` refused for claiming another node's address?
    pub fn is_refused(&self, node: &NodeName) -> bool {
        self.refused.contains(node)
    }

    /// Replaces what the registry knows with the registrations just read, one per node, and says
    /// what became of each.
    pub fn refresh(&mut self, read: Vec<(NodeName, Registration)>) -> Vec<(NodeName, Verdict)> {
        let previous = std::mem::take(&mut self.addr_to_node);
        let held: HashMap<&NodeName, Ipv4Addr> = previous.iter().map(|(addr, node)| (node, *addr)).collect();
        self.node_to_addr.clear();
        self.refused.clear();
        let mut verdicts = Vec::new();
        // (contests it, registered, node, addr, why it was kept)
        let mut claims: Vec<(bool, u64, NodeName, Ipv4Addr, Option<String>)> = Vec::new();
        for (node, registration) in read {
            match registration {
                Registration::Address { addr, registered_unix_us } => {
                    let holds = previous.get(&addr) == Some(&node);
                    claims.push((!holds, registered_unix_us, node, addr, None));
                }
                Registration::Absent => verdicts.push((node, Verdict::Unregistered { reason: None })),
                Registration::Unreadable(reason) => match held.get(&node) {
                    Some(addr) => claims.push((false, 0, node, *addr, Some(reason))),
                    None => verdicts.push((node, Verdict::Unregistered { reason: Some(reason) })),
                },
            }
        }
        claims.sort();
        for (_, _, node, addr, kept) in claims {
            if let Some(holder) = self.addr_to_node.get(&addr) {
                verdicts.push((node.clone(), Verdict::Refused { addr, holder: holder.clone() }));
                self.refused.insert(node);
                continue;
            }
            self.addr_to_node.insert(addr, node.clone());
            self.node_to_addr.insert(node.clone(), addr);
            let verdict = match kept {
                Some(reason) => Verdict::Kept { addr, reason },
                None => Verdict::Granted(addr),
            };
            verdicts.push((node, verdict));
        }
        verdicts
    }

    /// `node` (a fabric node the shell admitted) owns `addr` from now on, and no longer the
    /// address it had.
    pub fn bind(&mut self, node: &NodeName, addr: Ipv4Addr) {
        if let Some(old) = self.node_to_addr.insert(node.clone(), addr) {
            self.addr_to_node.remove(&old);
        }
        self.addr_to_node.insert(addr, node.clone());
    }
}

/// When each unregistered address with packets queued was found so.
#[derive(Debug, Default)]
pub struct Holds {
    since: HashMap<Ipv4Addr, Time>,
}

impl Holds {
    /// Of `unregistered` (every address with packets queued and no owner now), those unregistered
    /// for `hold` or longer at `now`. Addresses not in the list are forgotten (registered again, or
    /// nothing queued for them).
    pub fn due(&mut self, unregistered: &[Ipv4Addr], now: Time, hold: Duration) -> Vec<Ipv4Addr> {
        self.since.retain(|addr, _| unregistered.contains(addr));
        let mut due = Vec::new();
        for addr in unregistered {
            let since = *self.since.entry(*addr).or_insert(now);
            if now.duration_since(since) >= hold {
                due.push(*addr);
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> NodeName {
        NodeName::new(name).unwrap()
    }

    fn address(last: u8, registered_seconds: u64) -> Registration {
        Registration::Address {
            addr: Ipv4Addr::new(10, 0, 0, last),
            registered_unix_us: registered_seconds * 1_000_000,
        }
    }

    #[test]
    fn the_earliest_registration_wins_a_contested_address_and_then_keeps_it() {
        let mut registry = Registry::default();
        let verdicts = registry.refresh(vec![(node("late"), address(1, 20)), (node("early"), address(1, 10))]);
        assert_eq!(registry.node(&Ipv4Addr::new(10, 0, 0, 1)), Some(&node("early")));
        assert!(registry.is_refused(&node("late")));
        assert!(
            verdicts.contains(&(
                node("late"),
                Verdict::Refused { addr: Ipv4Addr::new(10, 0, 0, 1), holder: node("early") }
            ))
        );
        // The holder keeps it even against a claim that looks earlier (a clock stepped back).
        registry.refresh(vec![(node("late"), address(1, 1)), (node("early"), address(1, 10))]);
        assert_eq!(registry.node(&Ipv4Addr::new(10, 0, 0, 1)), Some(&node("early")));
        // Once the holder moves, the other gets it.
        registry.refresh(vec![(node("late"), address(1, 1)), (node("early"), address(2, 10))]);
        assert_eq!(registry.node(&Ipv4Addr::new(10, 0, 0, 1)), Some(&node("late")));
        assert_eq!(registry.addr(&node("early")), Some(Ipv4Addr::new(10, 0, 0, 2)));
    }

    #[test]
    fn a_registration_that_cannot_be_read_keeps_the_address_last_read() {
        let mut registry = Registry::default();
        registry.refresh(vec![(node("a"), address(1, 10))]);
        let verdicts = registry.refresh(vec![(node("a"), Registration::Unreadable("EIO".into()))]);
        assert_eq!(registry.addr(&node("a")), Some(Ipv4Addr::new(10, 0, 0, 1)));
        assert_eq!(verdicts, [(node("a"), Verdict::Kept { addr: Ipv4Addr::new(10, 0, 0, 1), reason: "EIO".into() })]);
        // Withdrawn: gone.
        registry.refresh(vec![(node("a"), Registration::Absent)]);
        assert_eq!(registry.addr(&node("a")), None);
    }

    #[test]
    fn a_node_whose_registration_was_never_read_is_not_registered() {
        let mut registry = Registry::default();
        let verdicts = registry.refresh(vec![(node("a"), Registration::Unreadable("bad toml".into()))]);
        assert_eq!(registry.addr(&node("a")), None);
        assert_eq!(verdicts, [(node("a"), Verdict::Unregistered { reason: Some("bad toml".into()) })]);
    }

    #[test]
    fn a_bound_fabric_node_moves_its_address() {
        let mut registry = Registry::default();
        registry.bind(&node("f"), Ipv4Addr::new(10, 0, 0, 5));
        registry.bind(&node("f"), Ipv4Addr::new(10, 0, 0, 6));
        assert_eq!(registry.node(&Ipv4Addr::new(10, 0, 0, 5)), None);
        assert_eq!(registry.node(&Ipv4Addr::new(10, 0, 0, 6)), Some(&node("f")));
    }

    #[test]
    fn the_hold_counts_from_when_the_address_was_found_unregistered() {
        let (addr, hold) = (Ipv4Addr::new(10, 0, 0, 9), Duration::from_secs(60));
        let mut holds = Holds::default();
        assert!(holds.due(&[addr], Time(5_000_000), hold).is_empty());
        assert!(holds.due(&[addr], Time(64_000_000), hold).is_empty());
        assert_eq!(holds.due(&[addr], Time(65_000_000), hold), [addr]);
        // Registered for a while: the count starts again.
        assert!(holds.due(&[], Time(66_000_000), hold).is_empty());
        assert!(holds.due(&[addr], Time(70_000_000), hold).is_empty());
    }
}
