//! Hash maps whose order the simulator can replay.
//!
//! The standard maps hash with keys drawn at random for each map, so the order in which they are
//! walked differs from run to run. In the server that order decides the order of file calls (which
//! destination is delivered to first, say), and the simulated disk draws its faults call by call:
//! a seed would not replay. [`HashMap`] and [`HashSet`] here are the standard ones with a
//! [`Hashing`] that is exactly the standard `RandomState` everywhere, except on a thread that runs
//! the simulator, where the keys are fixed (so a walk's order depends only on what was inserted).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, DefaultHasher};

/// The standard map, hashed with [`Hashing`].
pub type HashMap<K, V> = std::collections::HashMap<K, V, Hashing>;
/// The standard set, hashed with [`Hashing`].
pub type HashSet<T> = std::collections::HashSet<T, Hashing>;

/// `RandomState`, or fixed keys on a thread running the simulator.
#[derive(Clone, Debug)]
pub struct Hashing(Option<RandomState>);

impl Default for Hashing {
    fn default() -> Hashing {
        if crate::disk::sim::current().is_some() { Hashing(None) } else { Hashing(Some(RandomState::new())) }
    }
}

impl BuildHasher for Hashing {
    type Hasher = DefaultHasher;

    fn build_hasher(&self) -> DefaultHasher {
        match &self.0 {
            Some(random) => random.build_hasher(),
            None => DefaultHasher::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::sim::{SimDisk, install};

    fn walk() -> Vec<u32> {
        let map: HashMap<u32, ()> = (0..64).map(|key| (key, ())).collect();
        map.keys().copied().collect()
    }

    #[test]
    fn under_the_simulator_a_walk_repeats_and_otherwise_it_is_the_standard_one() {
        let disk = SimDisk::new(1, 1 << 20);
        {
            let _installed = install(&disk);
            assert_eq!(walk(), walk(), "two maps with the same keys walk alike under the simulator");
        }
        // Random keys: 64 keys in the same order in 8 maps in a row would be a 1 in 64!^7 chance.
        let orders: std::collections::BTreeSet<Vec<u32>> = (0..8).map(|_| walk()).collect();
        assert!(orders.len() > 1, "the keys are random outside the simulator");
    }
}
