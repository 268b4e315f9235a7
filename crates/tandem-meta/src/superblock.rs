//! The superblock: identity, geometry, generation identifiers and flags.
//!
//! Two 4 KiB slots; every write goes to the slot the previous one did not use
//! (`seq % 2`) and carries a higher sequence number, so a torn write can only
//! damage the slot being written while the other still holds the last good
//! state. A slot is valid when its magic, checksum and version are right.
//!
//! Slot layout (little-endian):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `TANDEMSB` |
//! | 8 | 4 | format version (1) |
//! | 12 | 4 | placement: 0 internal, 1 external |
//! | 16 | 8 | sequence number |
//! | 24 | 8 | device UUID |
//! | 32 | 8 | data size in bytes |
//! | 40 | 8 | metadata area size in bytes |
//! | 48 | 8 | current UUID |
//! | 56 | 8 | bitmap UUID |
//! | 64 | 16 | history UUIDs (2) |
//! | 80 | 4 | flags |
//! | 84 | 4 | al-extents |
//! | 88 | 4 | bitmap block size (4096) |
//! | 92 | 4 | AL extent size (4 MiB) |
//! | 96 | 3996 | zero |
//! | 4092 | 4 | CRC-32C of bytes 0..4092 |

use crate::layout::{Placement, AL_EXTENT_SIZE, BLOCK_SIZE, SLOT};

/// Magic at the start of every superblock slot.
pub const MAGIC: [u8; 8] = *b"TANDEMSB";
/// The format version this code writes and reads.
pub const VERSION: u32 = 1;
const CRC_AT: usize = SLOT as usize - 4;

/// DRBD's "just created" current UUID: a fresh device that has never held
/// data of its own.
pub const UUID_JUST_CREATED: u64 = 4;

/// Superblock flags, DRBD's MDF_* with the same meanings.
pub mod flags {
    /// The data is consistent (not in the middle of a resync as target).
    pub const CONSISTENT: u32 = 1 << 0;
    /// Set while Primary: found set at open, the node crashed as Primary.
    pub const PRIMARY_IND: u32 = 1 << 1;
    /// Set at the first accepted connect and kept (nothing reads it).
    pub const CONNECTED_IND: u32 = 1 << 2;
    /// A full sync is pending.
    pub const FULL_SYNC: u32 = 1 << 3;
    /// The data was UpToDate when last attached.
    pub const WAS_UP_TO_DATE: u32 = 1 << 4;
    /// The peer's data is known to be Outdated (fencing).
    pub const PEER_OUT_DATED: u32 = 1 << 5;
    /// The node crashed while Primary; cleared once the AL extents are resynced.
    pub const CRASHED_PRIMARY: u32 = 1 << 6;
    /// The last shutdown was clean: the AL holds no writes in flight.
    pub const AL_CLEAN: u32 = 1 << 7;
    /// The current generation was in place at an accepted connect, so the
    /// peer may hold it (tandem's own: DRBD has no such flag). A rotation
    /// keeps such a generation in history and replaces one that is not.
    pub const CURRENT_SHARED: u32 = 1 << 8;
    /// This node was Primary when its bitmap generation stopped being its
    /// current one (DRBD keeps this in bit 0 of the bitmap UUID): after a
    /// split, set on the node that was Primary when the link went and clear
    /// on one promoted while apart. `after-sb-0pri = discard-younger-primary`
    /// and `discard-older-primary` decide by it.
    pub const BITMAP_WAS_PRIMARY: u32 = 1 << 9;
    /// All known flags.
    pub const ALL: u32 = (1 << 10) - 1;

    /// Names for dumps, in bit order.
    pub const NAMES: [(u32, &str); 10] = [
        (CONSISTENT, "consistent"),
        (PRIMARY_IND, "primary-ind"),
        (CONNECTED_IND, "connected-ind"),
        (FULL_SYNC, "full-sync"),
        (WAS_UP_TO_DATE, "was-up-to-date"),
        (PEER_OUT_DATED, "peer-outdated"),
        (CRASHED_PRIMARY, "crashed-primary"),
        (AL_CLEAN, "al-clean"),
        (CURRENT_SHARED, "current-shared"),
        (BITMAP_WAS_PRIMARY, "bitmap-was-primary"),
    ];
}

/// The generation identifiers DRBD compares on connect.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Generations {
    /// The current data generation.
    pub current: u64,
    /// The generation the bitmap tracks changes against (0 when none).
    pub bitmap: u64,
    /// Older generations, newest first.
    pub history: [u64; 2],
}

/// The decoded contents of a superblock slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Superblock {
    /// Internal or external metadata.
    pub placement: Placement,
    /// Write sequence number; the higher valid slot wins.
    pub seq: u64,
    /// Identity of this metadata (changes on every create-md).
    pub device_uuid: u64,
    /// Bytes of replicated data.
    pub data_size: u64,
    /// Bytes in the metadata area.
    pub md_size: u64,
    /// Generation identifiers.
    pub gen: Generations,
    /// [`flags`].
    pub flags: u32,
    /// AL extents.
    pub al_extents: u32,
}

/// Why a superblock slot is not usable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SlotError {
    /// No magic: never written, or not tandem metadata.
    NoMagic,
    /// The checksum does not match: a torn or corrupted write.
    BadChecksum { stored: u32, computed: u32 },
    /// A format this code does not know.
    UnknownVersion(u32),
    /// The fields contradict each other.
    Invalid(String),
}

impl std::fmt::Display for SlotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SlotError::NoMagic => write!(f, "no tandem magic"),
            SlotError::BadChecksum { stored, computed } => write!(
                f,
                "checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            ),
            SlotError::UnknownVersion(v) => write!(
                f,
                "unknown metadata format version {v} (this tandem reads version {VERSION})"
            ),
            SlotError::Invalid(why) => write!(f, "{why}"),
        }
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Superblock {
    /// Encode into one 4 KiB slot.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SLOT as usize];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&VERSION.to_le_bytes());
        let placement: u32 = match self.placement {
            Placement::Internal => 0,
            Placement::External => 1,
        };
        b[12..16].copy_from_slice(&placement.to_le_bytes());
        b[16..24].copy_from_slice(&self.seq.to_le_bytes());
        b[24..32].copy_from_slice(&self.device_uuid.to_le_bytes());
        b[32..40].copy_from_slice(&self.data_size.to_le_bytes());
        b[40..48].copy_from_slice(&self.md_size.to_le_bytes());
        b[48..56].copy_from_slice(&self.gen.current.to_le_bytes());
        b[56..64].copy_from_slice(&self.gen.bitmap.to_le_bytes());
        b[64..72].copy_from_slice(&self.gen.history[0].to_le_bytes());
        b[72..80].copy_from_slice(&self.gen.history[1].to_le_bytes());
        b[80..84].copy_from_slice(&self.flags.to_le_bytes());
        b[84..88].copy_from_slice(&self.al_extents.to_le_bytes());
        b[88..92].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
        b[92..96].copy_from_slice(&(AL_EXTENT_SIZE as u32).to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode one slot. Checks magic, then checksum, then version, then
    /// that the fields make sense on their own.
    pub fn decode(b: &[u8]) -> Result<Self, SlotError> {
        if b.len() < SLOT as usize {
            return Err(SlotError::Invalid(format!(
                "slot is {} bytes, expected {SLOT}",
                b.len()
            )));
        }
        if b[0..8] != MAGIC {
            return Err(SlotError::NoMagic);
        }
        let stored = u32_at(b, CRC_AT);
        let computed = crc32c::crc32c(&b[..CRC_AT]);
        if stored != computed {
            return Err(SlotError::BadChecksum { stored, computed });
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(SlotError::UnknownVersion(version));
        }
        let placement = match u32_at(b, 12) {
            0 => Placement::Internal,
            1 => Placement::External,
            p => return Err(SlotError::Invalid(format!("unknown placement {p}"))),
        };
        let flags = u32_at(b, 80);
        if flags & !flags::ALL != 0 {
            return Err(SlotError::Invalid(format!("unknown flags {flags:#x}")));
        }
        let (bs, es) = (u32_at(b, 88), u32_at(b, 92));
        if u64::from(bs) != BLOCK_SIZE || u64::from(es) != AL_EXTENT_SIZE {
            return Err(SlotError::Invalid(format!(
                "bitmap block size {bs} / AL extent size {es} (expected {BLOCK_SIZE} / {AL_EXTENT_SIZE})"
            )));
        }
        Ok(Self {
            placement,
            seq: u64_at(b, 16),
            device_uuid: u64_at(b, 24),
            data_size: u64_at(b, 32),
            md_size: u64_at(b, 40),
            gen: Generations {
                current: u64_at(b, 48),
                bitmap: u64_at(b, 56),
                history: [u64_at(b, 64), u64_at(b, 72)],
            },
            flags,
            al_extents: u32_at(b, 84),
        })
    }

    /// Which of two slots to believe: the valid one with the higher
    /// sequence number. Errors say what is wrong with each slot.
    pub fn pick(a: &[u8], b: &[u8]) -> Result<Self, [SlotError; 2]> {
        match (Self::decode(a), Self::decode(b)) {
            (Ok(x), Ok(y)) => Ok(if y.seq > x.seq { y } else { x }),
            (Ok(x), Err(_)) | (Err(_), Ok(x)) => Ok(x),
            (Err(x), Err(y)) => Err([x, y]),
        }
    }

    /// Names of the set flags.
    pub fn flag_names(&self) -> Vec<&'static str> {
        flags::NAMES
            .iter()
            .filter(|(bit, _)| self.flags & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Superblock {
        Superblock {
            placement: Placement::Internal,
            seq: 5,
            device_uuid: 0x1122_3344_5566_7788,
            data_size: 1 << 30,
            md_size: 40960,
            gen: Generations {
                current: 0xabc,
                bitmap: 0,
                history: [1, 2],
            },
            flags: flags::CONSISTENT | flags::AL_CLEAN,
            al_extents: 1237,
        }
    }

    #[test]
    fn round_trip_and_slot_choice() {
        let a = sample();
        let b = Superblock { seq: 6, ..a };
        assert_eq!(Superblock::decode(&a.encode()), Ok(a));
        assert_eq!(Superblock::pick(&a.encode(), &b.encode()), Ok(b));
        assert_eq!(Superblock::pick(&b.encode(), &a.encode()), Ok(b));
        // A torn newer slot: the older one stands.
        let mut torn = b.encode();
        torn[2048..].fill(0);
        assert_eq!(Superblock::pick(&a.encode(), &torn), Ok(a));
        let e = Superblock::pick(&torn, &vec![0; 4096]).unwrap_err();
        assert!(matches!(e[0], SlotError::BadChecksum { .. }));
        assert_eq!(e[1], SlotError::NoMagic);
    }

    #[test]
    fn unknown_version_is_named() {
        let mut b = sample().encode();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let crc = crc32c::crc32c(&b[..CRC_AT]);
        b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
        let e = Superblock::decode(&b).unwrap_err();
        assert_eq!(e, SlotError::UnknownVersion(7));
        assert!(e.to_string().contains("version 7"));
    }

    proptest! {
        #[test]
        fn any_single_byte_corruption_is_detected(at in 0usize..4096, x in 1u8..=255) {
            let mut b = sample().encode();
            b[at] ^= x;
            prop_assert!(Superblock::decode(&b).is_err());
        }

        #[test]
        fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4200)) {
            let _ = Superblock::decode(&bytes);
        }
    }
}
