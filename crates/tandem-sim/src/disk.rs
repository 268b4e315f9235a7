//! The data disk of one node, one `u64` per 4 KiB block: the id of the write
//! that last wrote the block (0 = never written). Ids are the sim's client
//! request ids, which grow with submission order, so "this write or a newer
//! one" is `>=`.

use crate::rng::Rng;
use std::collections::BTreeMap;
use std::ops::Range;

/// A block device with a page cache: `volatile` is what readers see (and
/// what survives a daemon crash), `durable` what survives a power loss.
#[derive(Clone, Debug, Default)]
pub struct DataDisk {
    volatile: BTreeMap<u64, u64>,
    durable: BTreeMap<u64, u64>,
}

impl DataDisk {
    /// What a reader sees at `block`.
    pub fn read(&self, block: u64) -> u64 {
        self.volatile.get(&block).copied().unwrap_or(0)
    }

    /// What a power loss would leave at `block`.
    pub fn durable(&self, block: u64) -> u64 {
        self.durable.get(&block).copied().unwrap_or(0)
    }

    /// A completed write of `value` to `blocks`; with `fua` it is stable.
    pub fn write(&mut self, blocks: Range<u64>, value: u64, fua: bool) {
        for b in blocks {
            self.volatile.insert(b, value);
            if fua {
                self.durable.insert(b, value);
            }
        }
    }

    /// One block of a write that was in progress when the daemon died.
    pub fn write_block(&mut self, block: u64, value: u64) {
        self.volatile.insert(block, value);
    }

    /// Make every completed write stable.
    pub fn flush(&mut self) {
        self.durable.clone_from(&self.volatile);
    }

    /// The page cache is gone (a sabotage: a daemon crash must not do this).
    pub fn lose_page_cache(&mut self) {
        self.volatile.clone_from(&self.durable);
    }

    /// A power loss: each block not yet stable independently made it to the
    /// platter (written back by the kernel) or not.
    pub fn power_loss(&mut self, rng: &mut Rng) {
        let unstable: Vec<(u64, u64)> = self
            .volatile
            .iter()
            .filter(|(b, v)| self.durable.get(b) != Some(v))
            .map(|(&b, &v)| (b, v))
            .collect();
        for (b, v) in unstable {
            if rng.chance(5_000) {
                self.durable.insert(b, v);
            }
        }
        self.volatile.clone_from(&self.durable);
    }

    /// Every block ever written (the others read 0 on both layers).
    pub fn blocks(&self) -> impl Iterator<Item = u64> + '_ {
        self.volatile.keys().chain(self.durable.keys()).copied()
    }

    /// An offline copy of `other` (dd + sync): both layers equal its content.
    pub fn copy_from(&mut self, other: &DataDisk) {
        self.volatile.clone_from(&other.volatile);
        self.durable.clone_from(&other.volatile);
    }
}
