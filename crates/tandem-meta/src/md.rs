//! Opening, changing and closing the metadata of one device.

use crate::al::{self, ActivityLog, Plan, Replay, Transaction};
use crate::bitmap::Bitmap;
use crate::layout::{Layout, Placement, AL_EXTENT_SIZE, BLOCK_SIZE, SLOT};
use crate::superblock::{flags, Generations, SlotError, Superblock, UUID_JUST_CREATED};
use crate::{io_err, MetaError, MetaIo};
use std::ops::Range;

/// What is in the superblock slots of a device, for create-md's check.
#[derive(Debug)]
pub enum Existing {
    /// Neither slot has tandem's magic.
    None,
    /// Valid metadata.
    Valid(Superblock),
    /// Magic present but no usable slot.
    Damaged(SlotError, SlotError),
}

/// What opening found and did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OpenReport {
    /// The previous shutdown was clean.
    pub was_clean: bool,
    /// The node was Primary when it went down uncleanly.
    pub crashed_primary: bool,
    /// AL extents found active.
    pub al_active: usize,
    /// Blocks newly marked out of sync by recovery.
    pub marked_blocks: u64,
    /// The AL ring could not be replayed; the whole device was marked.
    pub al_unreadable: bool,
}

/// Open metadata: superblock, activity log and bitmap of one device.
#[derive(Debug)]
pub struct Metadata<I: MetaIo> {
    io: I,
    layout: Layout,
    sb: Superblock,
    bitmap: Bitmap,
    al: ActivityLog,
}

fn read_superblock<I: MetaIo>(io: &I) -> Result<(Superblock, u64), MetaError> {
    let size = io
        .size()
        .map_err(io_err("cannot size the metadata device"))?;
    let Some(at) = Layout::superblock_offset(size) else {
        return Err(MetaError::NotFound);
    };
    let mut b = vec![0u8; 2 * SLOT as usize];
    io.read_at(at, &mut b)
        .map_err(io_err(format!("cannot read the superblock at offset {at}")))?;
    let (a, bb) = b.split_at(SLOT as usize);
    match Superblock::pick(a, bb) {
        Ok(sb) => Ok((sb, size)),
        Err([SlotError::NoMagic, SlotError::NoMagic]) => Err(MetaError::NotFound),
        Err([SlotError::UnknownVersion(v), _]) | Err([_, SlotError::UnknownVersion(v)]) => {
            Err(MetaError::UnknownVersion(v))
        }
        Err([x, y]) => Err(MetaError::Corrupt(x, y)),
    }
}

fn read_region<I: MetaIo>(io: &I, at: u64, len: u64, what: &str) -> Result<Vec<u8>, MetaError> {
    let len = usize::try_from(len)
        .map_err(|_| MetaError::Invalid(format!("{what} of {len} bytes is too large")))?;
    let mut b = vec![0u8; len];
    io.read_at(at, &mut b)
        .map_err(io_err(format!("cannot read the {what} at offset {at}")))?;
    Ok(b)
}

/// Read the on-disk bitmap a piece at a time: reading it whole would hold
/// a second copy of it (32 MiB per TiB), which the allocator keeps
/// resident after it is freed (the daemon tunes malloc to keep buffers).
fn read_bitmap<I: MetaIo>(io: &I, layout: &Layout) -> Result<Bitmap, MetaError> {
    const PIECE: usize = 1 << 20;
    let mut bitmap = Bitmap::new(layout.bits());
    let total = u64::try_from(bitmap.disk_bytes())
        .unwrap_or(u64::MAX)
        .min(layout.bm_size);
    let mut buf = vec![0u8; PIECE.min(usize::try_from(total).unwrap_or(PIECE))];
    let mut done = 0u64;
    while done < total {
        let n = usize::try_from((total - done).min(PIECE as u64)).unwrap_or(PIECE);
        let at = layout.bm_offset + done;
        io.read_at(at, &mut buf[..n])
            .map_err(io_err(format!("cannot read the bitmap at offset {at}")))?;
        bitmap.load_at(usize::try_from(done).unwrap_or(usize::MAX), &buf[..n]);
        done += n as u64;
    }
    bitmap.loaded();
    Ok(bitmap)
}

/// Blocks touched by a byte range (rounded outwards).
fn blocks_out(bytes: &Range<u64>) -> Range<u64> {
    bytes.start / BLOCK_SIZE..bytes.end.div_ceil(BLOCK_SIZE)
}

/// Extents touched by a byte range.
fn extents_of(bytes: &Range<u64>) -> Vec<u32> {
    extent_iter(bytes).collect()
}

/// The same, without collecting (asked on every write).
fn extent_iter(bytes: &Range<u64>) -> impl Iterator<Item = u32> {
    let (first, last) = if bytes.is_empty() {
        (1, 0)
    } else {
        (
            bytes.start / AL_EXTENT_SIZE,
            (bytes.end - 1) / AL_EXTENT_SIZE,
        )
    };
    (first..=last).map(|e| e as u32)
}

fn extent_blocks(e: u32) -> Range<u64> {
    let per = AL_EXTENT_SIZE / BLOCK_SIZE;
    u64::from(e) * per..(u64::from(e) + 1) * per
}

/// Read everything without changing anything: the superblock, the replayed
/// AL and the bitmap. For dump-md and for tests.
pub(crate) struct Snapshot {
    pub sb: Superblock,
    pub layout: Layout,
    pub replay: Replay,
    pub bitmap: Bitmap,
}

pub(crate) fn snapshot<I: MetaIo>(io: &I) -> Result<Snapshot, MetaError> {
    let (sb, size) = read_superblock(io)?;
    let layout =
        Layout::from_superblock(sb.placement, sb.data_size, sb.md_size, sb.al_extents, size)
            .map_err(|why| MetaError::Invalid(format!("superblock is inconsistent: {why}")))?;
    let bitmap = read_bitmap(io, &layout)?;
    let ring = read_region(
        io,
        layout.al_offset,
        u64::from(layout.al_slots) * SLOT,
        "activity log",
    )?;
    let replay = al::replay(&ring, sb.device_uuid, sb.al_extents, layout.extents());
    Ok(Snapshot {
        sb,
        layout,
        replay,
        bitmap,
    })
}

impl<I: MetaIo> Metadata<I> {
    /// What the superblock slots of `io` hold.
    pub fn probe(io: &I) -> Result<Existing, MetaError> {
        match read_superblock(io) {
            Ok((sb, _)) => Ok(Existing::Valid(sb)),
            Err(MetaError::NotFound) => Ok(Existing::None),
            Err(MetaError::Corrupt(a, b)) => Ok(Existing::Damaged(a, b)),
            Err(MetaError::UnknownVersion(v)) => Ok(Existing::Damaged(
                SlotError::UnknownVersion(v),
                SlotError::UnknownVersion(v),
            )),
            Err(e) => Err(e),
        }
    }

    /// Write fresh metadata described by `layout`: a clean bitmap, an empty
    /// activity log and a superblock saying "just created, inconsistent".
    /// The old superblock is destroyed first, so a crash half-way leaves no
    /// metadata rather than a mix of old and new.
    pub fn create(io: &I, layout: &Layout, device_uuid: u64) -> Result<Superblock, MetaError> {
        io.write_at(layout.sb_offset, &vec![0u8; 2 * SLOT as usize])
            .map_err(io_err("cannot clear the old superblock"))?;
        io.sync()
            .map_err(io_err("cannot sync the metadata device"))?;
        let chunk = vec![0u8; 1 << 20];
        let mut at = layout.bm_offset;
        let end = layout.bm_offset + layout.bm_size;
        while at < end {
            let n = (end - at).min(chunk.len() as u64) as usize;
            io.write_at(at, &chunk[..n])
                .map_err(io_err(format!("cannot write the bitmap at offset {at}")))?;
            at += n as u64;
        }
        for tx in ActivityLog::initial_ring(device_uuid, layout.al_extents, layout.al_slots, 0) {
            write_tx(io, layout, &tx)?;
        }
        io.sync()
            .map_err(io_err("cannot sync the metadata device"))?;
        let sb = Superblock {
            placement: layout.placement,
            seq: 1,
            device_uuid,
            data_size: layout.data_size,
            md_size: layout.md_size,
            gen: Generations {
                current: UUID_JUST_CREATED,
                bitmap: 0,
                history: [0, 0],
            },
            flags: flags::AL_CLEAN,
            al_extents: layout.al_extents,
        };
        write_sb(io, layout, &sb)?;
        Ok(sb)
    }

    /// Destroy the metadata: both superblock slots are zeroed.
    pub fn wipe(io: &I) -> Result<(), MetaError> {
        let size = io
            .size()
            .map_err(io_err("cannot size the metadata device"))?;
        let at = Layout::superblock_offset(size).ok_or(MetaError::NotFound)?;
        io.write_at(at, &vec![0u8; 2 * SLOT as usize])
            .map_err(io_err("cannot clear the superblock"))?;
        io.sync().map_err(io_err("cannot sync the metadata device"))
    }

    /// Open the metadata for use. After an unclean shutdown every extent of
    /// the activity log is marked out of sync (the whole device if the log
    /// cannot be read); a node that was Primary is flagged crashed-primary.
    /// The superblock is marked "in use" before this returns.
    pub fn open(io: I, expect: Placement) -> Result<(Self, OpenReport), MetaError> {
        let Snapshot {
            mut sb,
            layout,
            replay,
            mut bitmap,
        } = snapshot(&io)?;
        if sb.placement != expect {
            return Err(MetaError::Invalid(format!(
                "the metadata here is {}, the configuration says {}",
                placement_name(sb.placement),
                placement_name(expect)
            )));
        }
        let was_clean = sb.flags & flags::AL_CLEAN != 0;
        let mut report = OpenReport {
            was_clean,
            crashed_primary: false,
            al_active: replay.active().len(),
            marked_blocks: 0,
            al_unreadable: !replay.complete,
        };
        let al = ActivityLog::resume(sb.device_uuid, layout.al_slots, &replay);
        let mut md = Self {
            io,
            layout,
            sb,
            bitmap: Bitmap::new(0),
            al,
        };
        if !replay.complete {
            // Start a fresh ring so that leftovers cannot mix into a later replay.
            let txs = ActivityLog::initial_ring(
                sb.device_uuid,
                layout.al_extents,
                layout.al_slots,
                replay.last_seq,
            );
            for tx in &txs {
                write_tx(&md.io, &layout, tx)?;
            }
            md.al = ActivityLog::resume(
                sb.device_uuid,
                layout.al_slots,
                &Replay {
                    slots: vec![None; layout.al_extents as usize],
                    last_seq: txs.last().map_or(replay.last_seq, |t| t.seq),
                    next_context: txs
                        .last()
                        .map_or(0, |t| al::next_window(t, layout.al_extents)),
                    applied: 0,
                    complete: true,
                },
            );
        }
        if !was_clean {
            if replay.complete {
                for e in replay.active() {
                    report.marked_blocks += bitmap.set_range(extent_blocks(e));
                }
            } else {
                report.marked_blocks += bitmap.set_all();
            }
            if sb.flags & flags::PRIMARY_IND != 0 {
                sb.flags |= flags::CRASHED_PRIMARY;
            }
        }
        report.crashed_primary = sb.flags & flags::CRASHED_PRIMARY != 0;
        md.bitmap = bitmap;
        md.flush_bitmap()?;
        md.sb = sb;
        md.sb.flags &= !flags::AL_CLEAN;
        md.persist_sb()?;
        Ok((md, report))
    }

    /// Write everything back and mark the shutdown clean.
    pub fn close(mut self) -> Result<I, MetaError> {
        self.flush_bitmap()?;
        self.sb.flags |= flags::AL_CLEAN;
        self.persist_sb()?;
        Ok(self.io)
    }

    /// Give up without a clean shutdown (what a crash looks like).
    pub fn abandon(self) -> I {
        self.io
    }

    /// The geometry.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The superblock as last written.
    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    /// The out-of-sync bitmap.
    pub fn bitmap(&self) -> &Bitmap {
        &self.bitmap
    }

    /// The activity log.
    pub fn activity_log(&self) -> &ActivityLog {
        &self.al
    }

    /// Whether every extent of `bytes` is already active, so that
    /// [`Metadata::begin_io`] will not write (or wait for) the disk.
    pub fn is_hot(&self, bytes: &Range<u64>) -> bool {
        extent_iter(bytes).all(|e| self.al.is_active(e))
    }

    /// Make the extents of `bytes` active before writing there. `Ok(false)`
    /// means every AL slot is busy: retry after some writes complete. A
    /// request may span at most [`al::AL_UPDATES_PER_TX`] extents (larger
    /// trims are split by the caller).
    pub fn begin_io(&mut self, bytes: Range<u64>) -> Result<bool, MetaError> {
        self.check_range(&bytes)?;
        let extents = extents_of(&bytes);
        if extents.len() > al::AL_UPDATES_PER_TX {
            return Err(MetaError::Invalid(format!(
                "a request over {} extents; at most {} at a time",
                extents.len(),
                al::AL_UPDATES_PER_TX
            )));
        }
        match self.al.plan(&extents) {
            Plan::Hot => Ok(true),
            Plan::Busy => Ok(false),
            Plan::Commit { tx, evict } => match self.commit(&tx, &evict) {
                Ok(()) => {
                    self.al.committed(&tx, &extents);
                    Ok(true)
                }
                Err(e) => {
                    self.al.abandon();
                    Err(e)
                }
            },
        }
    }

    fn commit(&mut self, tx: &Transaction, evict: &[u32]) -> Result<(), MetaError> {
        // Bits of leaving extents must be durable before the transaction
        // that stops replay from setting them.
        let mut pages: Vec<usize> = evict
            .iter()
            .flat_map(|&e| self.bitmap.dirty_pages_in(extent_blocks(e)))
            .collect();
        pages.sort_unstable();
        pages.dedup();
        if !pages.is_empty() {
            self.write_pages(&pages)?;
            self.sync()?;
        }
        write_tx(&self.io, &self.layout, tx)?;
        self.sync()
    }

    /// Writes to `bytes` completed (successfully or not).
    pub fn end_io(&mut self, bytes: Range<u64>) {
        self.al.release(&extents_of(&bytes));
    }

    fn check_range(&self, bytes: &Range<u64>) -> Result<(), MetaError> {
        if bytes.start > bytes.end || bytes.end > self.layout.data_size {
            return Err(MetaError::Invalid(format!(
                "range {}..{} is outside the {}-byte device",
                bytes.start, bytes.end, self.layout.data_size
            )));
        }
        Ok(())
    }

    /// Mark every block touching `bytes` out of sync; returns how many
    /// blocks were newly marked. In memory only until written back.
    pub fn set_out_of_sync(&mut self, bytes: Range<u64>) -> Result<u64, MetaError> {
        self.check_range(&bytes)?;
        Ok(self.bitmap.set_range(blocks_out(&bytes)))
    }

    /// Mark the blocks wholly inside `bytes` in sync; returns how many were
    /// cleared.
    pub fn set_in_sync(&mut self, bytes: Range<u64>) -> Result<u64, MetaError> {
        self.check_range(&bytes)?;
        let blocks = bytes.start.div_ceil(BLOCK_SIZE)..bytes.end / BLOCK_SIZE;
        Ok(self.bitmap.clear_range(blocks))
    }

    /// Mark the whole device out of sync (full sync).
    pub fn set_all_out_of_sync(&mut self) -> u64 {
        self.bitmap.set_all()
    }

    /// Write back every changed bitmap page and sync; returns pages written.
    pub fn flush_bitmap(&mut self) -> Result<usize, MetaError> {
        let pages = self.bitmap.dirty_pages();
        if pages.is_empty() {
            return Ok(0);
        }
        self.write_pages(&pages)?;
        self.sync()?;
        Ok(pages.len())
    }

    fn write_pages(&mut self, pages: &[usize]) -> Result<(), MetaError> {
        // Coalesce runs of adjacent pages into one write each.
        let mut i = 0;
        while i < pages.len() {
            let mut j = i + 1;
            while j < pages.len() && pages[j] == pages[j - 1] + 1 && j - i < 256 {
                j += 1;
            }
            let buf: Vec<u8> = pages[i..j]
                .iter()
                .flat_map(|&p| self.bitmap.page_bytes(p))
                .collect();
            let at = self.layout.bm_offset + pages[i] as u64 * SLOT;
            self.io
                .write_at(at, &buf)
                .map_err(io_err(format!("cannot write the bitmap at offset {at}")))?;
            for &p in &pages[i..j] {
                self.bitmap.mark_clean(p);
            }
            i = j;
        }
        Ok(())
    }

    fn sync(&self) -> Result<(), MetaError> {
        self.io
            .sync()
            .map_err(io_err("cannot sync the metadata device"))
    }

    fn persist_sb(&mut self) -> Result<(), MetaError> {
        self.sb.seq += 1;
        write_sb(&self.io, &self.layout, &self.sb)
    }

    /// The generation identifiers.
    pub fn generations(&self) -> Generations {
        self.sb.gen
    }

    /// Persist new generation identifiers (durable when this returns).
    pub fn set_generations(&mut self, gen: Generations) -> Result<(), MetaError> {
        self.sb.gen = gen;
        self.persist_sb()
    }

    /// The superblock flags.
    pub fn flags(&self) -> u32 {
        self.sb.flags
    }

    /// Set and clear flags and persist them (durable when this returns).
    /// `AL_CLEAN` is managed by open/close and cannot be changed here.
    pub fn change_flags(&mut self, set: u32, clear: u32) -> Result<(), MetaError> {
        let keep = flags::AL_CLEAN;
        let new = (self.sb.flags & !(clear & !keep)) | (set & !keep & flags::ALL);
        if new != self.sb.flags {
            self.sb.flags = new;
            self.persist_sb()?;
        }
        Ok(())
    }
}

fn write_tx<I: MetaIo>(io: &I, layout: &Layout, tx: &Transaction) -> Result<(), MetaError> {
    let at = layout.al_offset + (tx.seq % u64::from(layout.al_slots)) * SLOT;
    io.write_at(at, &tx.encode()).map_err(io_err(format!(
        "cannot write an activity log transaction at offset {at}"
    )))
}

fn write_sb<I: MetaIo>(io: &I, layout: &Layout, sb: &Superblock) -> Result<(), MetaError> {
    let at = layout.sb_offset + (sb.seq % 2) * SLOT;
    io.write_at(at, &sb.encode()).map_err(io_err(format!(
        "cannot write the superblock at offset {at}"
    )))?;
    io.sync().map_err(io_err("cannot sync the metadata device"))
}

pub(crate) fn placement_name(p: Placement) -> &'static str {
    match p {
        Placement::Internal => "internal",
        Placement::External => "external",
    }
}
