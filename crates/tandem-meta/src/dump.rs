//! `dump-md`: everything in the metadata, read without changing anything.

use crate::layout::{Placement, BLOCK_SIZE};
use crate::md::{placement_name, snapshot};
use crate::superblock::{flags, VERSION};
use crate::{MetaError, MetaIo};
use std::fmt::Write as _;

/// The contents of a metadata area, as `dump-md` shows them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Dump {
    /// On-disk format version.
    pub format_version: u32,
    /// Internal or external.
    pub placement: Placement,
    /// Identity of the metadata, hexadecimal.
    pub device_uuid: String,
    /// Bytes of replicated data.
    pub data_size: u64,
    /// First byte of the metadata area.
    pub md_offset: u64,
    /// Bytes in the metadata area.
    pub md_size: u64,
    /// Current UUID, hexadecimal.
    pub current_uuid: String,
    /// Bitmap UUID, hexadecimal.
    pub bitmap_uuid: String,
    /// History UUIDs, hexadecimal.
    pub history_uuids: [String; 2],
    /// Names of the set flags.
    pub flags: Vec<&'static str>,
    /// Superblock write sequence number.
    pub superblock_seq: u64,
    /// AL extents.
    pub al_extents: u32,
    /// Transactions in the AL ring.
    pub al_ring_slots: u32,
    /// Newest valid AL transaction.
    pub al_last_seq: u64,
    /// Extents in the AL (4 MiB each), ascending.
    pub al_active: Vec<u32>,
    /// Whether the AL ring could be replayed.
    pub al_readable: bool,
    /// The last shutdown was clean.
    pub clean_shutdown: bool,
    /// Out-of-sync 4 KiB blocks recorded in the bitmap.
    pub out_of_sync_blocks: u64,
    /// The same in KiB (DRBD's unit for `oos`).
    pub out_of_sync_kib: u64,
    /// Blocks the next open would add to the bitmap (AL recovery after an
    /// unclean shutdown).
    pub recovery_blocks: u64,
}

fn hex(x: u64) -> String {
    format!("{x:#018x}")
}

/// Read the metadata on `io` without changing it.
pub fn dump<I: MetaIo>(io: &I) -> Result<Dump, MetaError> {
    let s = snapshot(io)?;
    let clean = s.sb.flags & flags::AL_CLEAN != 0;
    let active = s.replay.active();
    let recovery_blocks = if clean {
        0
    } else if !s.replay.complete {
        s.bitmap.len() - s.bitmap.count()
    } else {
        let per = crate::layout::AL_EXTENT_SIZE / BLOCK_SIZE;
        let mut bm = s.bitmap.clone();
        active
            .iter()
            .map(|&e| bm.set_range(u64::from(e) * per..(u64::from(e) + 1) * per))
            .sum()
    };
    let oos = s.bitmap.count();
    Ok(Dump {
        format_version: VERSION,
        placement: s.sb.placement,
        device_uuid: hex(s.sb.device_uuid),
        data_size: s.sb.data_size,
        md_offset: s.layout.md_offset,
        md_size: s.layout.md_size,
        current_uuid: hex(s.sb.gen.current),
        bitmap_uuid: hex(s.sb.gen.bitmap),
        history_uuids: [hex(s.sb.gen.history[0]), hex(s.sb.gen.history[1])],
        flags: s.sb.flag_names(),
        superblock_seq: s.sb.seq,
        al_extents: s.sb.al_extents,
        al_ring_slots: s.layout.al_slots,
        al_last_seq: s.replay.last_seq,
        al_active: if s.replay.complete {
            active
        } else {
            Vec::new()
        },
        al_readable: s.replay.complete,
        clean_shutdown: clean,
        out_of_sync_blocks: oos,
        out_of_sync_kib: oos * (BLOCK_SIZE / 1024),
        recovery_blocks,
    })
}

/// Bytes with a binary unit, e.g. `1.5 GiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["bytes", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} bytes")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Dump {
    /// The human-readable form.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let flags = if self.flags.is_empty() {
            "none".to_string()
        } else {
            self.flags.join(",")
        };
        let active = if !self.al_readable {
            "unreadable (the whole device counts as out of sync)".to_string()
        } else if self.al_active.is_empty() {
            "0 extents".to_string()
        } else {
            let shown: Vec<String> = self.al_active.iter().take(32).map(u32::to_string).collect();
            let more = if self.al_active.len() > 32 {
                " ..."
            } else {
                ""
            };
            format!(
                "{} extents: {}{more}",
                self.al_active.len(),
                shown.join(" ")
            )
        };
        // Infallible: writing to a String.
        let _ = writeln!(o, "tandem metadata, format version {}", self.format_version);
        let _ = writeln!(o, "placement:       {}", placement_name(self.placement));
        let _ = writeln!(o, "device-uuid:     {}", self.device_uuid);
        let _ = writeln!(
            o,
            "data-size:       {} bytes ({})",
            self.data_size,
            human_bytes(self.data_size)
        );
        let _ = writeln!(
            o,
            "metadata:        {} bytes ({}) at offset {}",
            self.md_size,
            human_bytes(self.md_size),
            self.md_offset
        );
        let _ = writeln!(o, "current-uuid:    {}", self.current_uuid);
        let _ = writeln!(o, "bitmap-uuid:     {}", self.bitmap_uuid);
        let _ = writeln!(
            o,
            "history-uuids:   {} {}",
            self.history_uuids[0], self.history_uuids[1]
        );
        let _ = writeln!(o, "flags:           {flags}");
        let _ = writeln!(o, "superblock-seq:  {}", self.superblock_seq);
        let _ = writeln!(
            o,
            "al-extents:      {} of 4 MiB (ring of {} transactions, last sequence {})",
            self.al_extents, self.al_ring_slots, self.al_last_seq
        );
        let _ = writeln!(o, "al-active:       {active}");
        let _ = writeln!(
            o,
            "clean-shutdown:  {}",
            if self.clean_shutdown { "yes" } else { "no" }
        );
        let _ = writeln!(
            o,
            "out-of-sync:     {} KiB ({} blocks of 4 KiB)",
            self.out_of_sync_kib, self.out_of_sync_blocks
        );
        if !self.clean_shutdown {
            let _ = writeln!(
                o,
                "recovery:        the next attach marks {} more blocks out of sync",
                self.recovery_blocks
            );
        }
        o
    }
}
