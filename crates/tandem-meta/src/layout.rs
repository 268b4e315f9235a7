//! Where the metadata lives and how big it is.
//!
//! The metadata area always ends at the (4 KiB-aligned) end of its device:
//! the backing device itself for internal metadata, the meta-disk for
//! external metadata. Inside the area, from low to high addresses:
//!
//! ```text
//! | bitmap (1 bit per 4 KiB) | AL ring (4 KiB slots) | superblock A | superblock B |
//! ```
//!
//! Putting the superblock last means it can be found from the device size
//! alone, before anything about the data size is known.

use crate::MetaError;

/// Granularity of the out-of-sync bitmap.
pub const BLOCK_SIZE: u64 = 4096;
/// Size of an activity-log extent.
pub const AL_EXTENT_SIZE: u64 = 4 << 20;
/// One superblock slot, one AL transaction, one bitmap page.
pub const SLOT: u64 = 4096;
/// Default number of AL extents (DRBD's).
pub const DEFAULT_AL_EXTENTS: u32 = 1237;
/// DRBD's limits for al-extents.
pub const AL_EXTENTS_MIN: u32 = 7;
/// See [`AL_EXTENTS_MIN`].
pub const AL_EXTENTS_MAX: u32 = 65534;
/// The smallest data area worth replicating.
pub const MIN_DATA_SIZE: u64 = 1 << 20;

/// Internal (end of the backing device) or external (own device) metadata.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Placement {
    /// At the end of the backing device; the exported size shrinks.
    Internal,
    /// On a separate meta-disk.
    External,
}

/// The computed geometry of one metadata area. All offsets are absolute
/// positions on the metadata device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Internal or external.
    pub placement: Placement,
    /// Bytes of replicated data (a multiple of [`BLOCK_SIZE`]).
    pub data_size: u64,
    /// First byte of the metadata area.
    pub md_offset: u64,
    /// Bytes in the metadata area.
    pub md_size: u64,
    /// The bitmap.
    pub bm_offset: u64,
    /// Bytes reserved for the bitmap (whole 4 KiB pages).
    pub bm_size: u64,
    /// The AL ring.
    pub al_offset: u64,
    /// Transactions in the AL ring.
    pub al_slots: u32,
    /// AL extents.
    pub al_extents: u32,
    /// Superblock slot A; slot B follows.
    pub sb_offset: u64,
}

/// Context entries per AL transaction (see `al.rs`).
pub(crate) const AL_CONTEXT_PER_TX: u32 = 880;

/// Ring slots for `al_extents`: the context windows of all but the newest
/// transaction (which a crash may tear) must cover every slot of the table.
pub fn al_ring_slots(al_extents: u32) -> u32 {
    al_extents.div_ceil(AL_CONTEXT_PER_TX).max(1) + 2
}

/// Bitmap bytes for `data_size`, in whole pages.
pub fn bitmap_bytes(data_size: u64) -> u64 {
    data_size.div_ceil(BLOCK_SIZE).div_ceil(8).div_ceil(SLOT) * SLOT
}

/// Bytes of metadata for `data_size` bytes of data:
/// 8 KiB superblocks + 4 KiB per AL ring slot + 1 bit per 4 KiB of data,
/// rounded up to 4 KiB — about `data_size / 32768 + 20 KiB`.
pub fn md_size_for(data_size: u64, al_extents: u32) -> u64 {
    2 * SLOT + u64::from(al_ring_slots(al_extents)) * SLOT + bitmap_bytes(data_size)
}

fn check_al_extents(al_extents: u32) -> Result<(), MetaError> {
    if (AL_EXTENTS_MIN..=AL_EXTENTS_MAX).contains(&al_extents) {
        Ok(())
    } else {
        Err(MetaError::Invalid(format!(
            "al-extents {al_extents} is out of range ({AL_EXTENTS_MIN}..={AL_EXTENTS_MAX})"
        )))
    }
}

impl Layout {
    /// Internal metadata on a backing device of `device_size` bytes.
    ///
    /// The bitmap covers the whole device rather than only the data before
    /// it (which depends on the metadata size): a few bytes more, no
    /// circular sizing.
    pub fn internal(device_size: u64, al_extents: u32) -> Result<Self, MetaError> {
        check_al_extents(al_extents)?;
        let end = device_size / BLOCK_SIZE * BLOCK_SIZE;
        let md_size = md_size_for(end, al_extents);
        let need = md_size + MIN_DATA_SIZE;
        if end < need {
            return Err(MetaError::TooSmall {
                what: "backing device",
                size: device_size,
                need,
            });
        }
        let bm_size = bitmap_bytes(end);
        Ok(Self::place(
            Placement::Internal,
            end - md_size,
            bm_size,
            end,
            al_extents,
        ))
    }

    /// External metadata for a data device of `data_device_size` bytes on a
    /// meta-disk of `meta_size` bytes.
    pub fn external(
        data_device_size: u64,
        meta_size: u64,
        al_extents: u32,
    ) -> Result<Self, MetaError> {
        check_al_extents(al_extents)?;
        let data_size = data_device_size / BLOCK_SIZE * BLOCK_SIZE;
        if data_size < MIN_DATA_SIZE {
            return Err(MetaError::TooSmall {
                what: "backing device",
                size: data_device_size,
                need: MIN_DATA_SIZE,
            });
        }
        let md_size = md_size_for(data_size, al_extents);
        let end = meta_size / BLOCK_SIZE * BLOCK_SIZE;
        if end < md_size {
            return Err(MetaError::TooSmall {
                what: "meta-disk",
                size: meta_size,
                need: md_size,
            });
        }
        let bm_size = bitmap_bytes(data_size);
        Ok(Self::place(
            Placement::External,
            data_size,
            bm_size,
            end,
            al_extents,
        ))
    }

    fn place(
        placement: Placement,
        data_size: u64,
        bm_size: u64,
        end: u64,
        al_extents: u32,
    ) -> Self {
        let al_slots = al_ring_slots(al_extents);
        let md_size = 2 * SLOT + u64::from(al_slots) * SLOT + bm_size;
        let md_offset = end - md_size;
        Self {
            placement,
            data_size,
            md_offset,
            md_size,
            bm_offset: md_offset,
            bm_size,
            al_offset: md_offset + bm_size,
            al_slots,
            al_extents,
            sb_offset: end - 2 * SLOT,
        }
    }

    /// Where the superblock slots of a metadata device of `size` bytes are.
    pub fn superblock_offset(size: u64) -> Option<u64> {
        (size / BLOCK_SIZE * BLOCK_SIZE).checked_sub(2 * SLOT)
    }

    /// Rebuild the layout a superblock describes, checking that it is
    /// self-consistent and fits a metadata device of `meta_size` bytes.
    pub(crate) fn from_superblock(
        placement: Placement,
        data_size: u64,
        md_size: u64,
        al_extents: u32,
        meta_size: u64,
    ) -> Result<Self, String> {
        check_al_extents(al_extents).map_err(|e| e.to_string())?;
        if data_size % BLOCK_SIZE != 0 || data_size == 0 {
            return Err(format!(
                "data size {data_size} is not a positive multiple of 4096"
            ));
        }
        let fixed = 2 * SLOT + u64::from(al_ring_slots(al_extents)) * SLOT;
        let bm_size = md_size.saturating_sub(fixed);
        if md_size % SLOT != 0 || bm_size < bitmap_bytes(data_size) {
            return Err(format!(
                "metadata size {md_size} cannot hold the bitmap of {data_size} bytes of data"
            ));
        }
        let end = meta_size / BLOCK_SIZE * BLOCK_SIZE;
        if end < md_size {
            return Err(format!(
                "metadata of {md_size} bytes does not fit a {meta_size}-byte device"
            ));
        }
        let layout = Self::place(placement, data_size, bm_size, end, al_extents);
        if placement == Placement::Internal && layout.md_offset < data_size {
            return Err(format!(
                "data size {data_size} overlaps the metadata at offset {}",
                layout.md_offset
            ));
        }
        Ok(layout)
    }

    /// Bits in the bitmap: one per 4 KiB block of data.
    pub fn bits(&self) -> u64 {
        self.data_size.div_ceil(BLOCK_SIZE)
    }

    /// AL extents covering the data.
    pub fn extents(&self) -> u64 {
        self.data_size.div_ceil(AL_EXTENT_SIZE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_layout_fits_and_is_aligned() {
        for size in [
            MIN_DATA_SIZE + md_size_for(MIN_DATA_SIZE + (64 << 10), 1237),
            1 << 30,
            (1 << 40) + 12345,
        ] {
            let l = Layout::internal(size, 1237).unwrap();
            assert_eq!(l.md_offset, l.data_size, "{l:?}");
            assert_eq!(l.sb_offset + 2 * SLOT, size / 4096 * 4096);
            assert_eq!(l.al_offset + u64::from(l.al_slots) * SLOT, l.sb_offset);
            assert!(l.bm_size * 8 * BLOCK_SIZE >= l.data_size);
            assert_eq!(Layout::superblock_offset(size), Some(l.sb_offset));
            for o in [
                l.md_offset,
                l.bm_offset,
                l.al_offset,
                l.sb_offset,
                l.data_size,
            ] {
                assert_eq!(o % 4096, 0);
            }
            let back =
                Layout::from_superblock(Placement::Internal, l.data_size, l.md_size, 1237, size);
            assert_eq!(back, Ok(l));
        }
        // 1 TiB: 32 MiB of bitmap plus the AL ring and superblocks.
        let l = Layout::internal(1 << 40, DEFAULT_AL_EXTENTS).unwrap();
        assert_eq!(l.md_size, (32 << 20) + 4 * 4096 + 2 * 4096);
    }

    #[test]
    fn too_small_devices_are_refused() {
        let e = Layout::internal(1 << 20, 1237).unwrap_err();
        assert!(e.to_string().contains("too small"), "{e}");
        assert!(Layout::external(1 << 30, 4096, 1237).is_err());
        assert!(Layout::internal(1 << 30, 6).is_err());
        assert!(Layout::internal(1 << 30, 65535).is_err());
    }

    #[test]
    fn ring_covers_the_table() {
        for n in [AL_EXTENTS_MIN, 880, 881, DEFAULT_AL_EXTENTS, AL_EXTENTS_MAX] {
            let r = al_ring_slots(n);
            assert!((r - 1) * AL_CONTEXT_PER_TX >= n, "{n}: {r}");
        }
    }
}
