//! Metadata lifecycle: create, open, close, dump, wipe, and the errors an
//! operator sees for damaged or foreign metadata.

#![allow(clippy::unwrap_used)]

use tandem_meta::dump::dump;
use tandem_meta::superblock::flags;
use tandem_meta::{CrashDisk, Existing, Layout, MetaError, MetaIo, Metadata, Placement};

const MIB: u64 = 1 << 20;

fn fresh(size: u64, al_extents: u32) -> (CrashDisk, Layout) {
    let disk = CrashDisk::new(size as usize);
    let layout = Layout::internal(size, al_extents).unwrap();
    Metadata::create(&disk, &layout, 0x0123_4567_89ab_cdef).unwrap();
    (disk, layout)
}

/// Compare with `tests/golden/NAME`; `TANDEM_UPDATE_GOLDEN=1` rewrites it
/// (review the diff before committing).
fn golden(name: &str, actual: &str) {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    if std::env::var_os("TANDEM_UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, actual).unwrap();
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(
        actual, expected,
        "{name} changed; if on purpose, rerun with TANDEM_UPDATE_GOLDEN=1 and review the diff"
    );
}

#[test]
fn dump_md_golden() {
    let (disk, _) = fresh(256 * MIB, 1237);
    let text = dump(&disk).unwrap().to_text();
    golden("dump-md.txt", &text);

    // After an unclean shutdown with writes in three extents.
    let (mut md, _) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
    md.begin_io(0..4096).unwrap();
    md.begin_io(9 * MIB..9 * MIB + 1).unwrap();
    md.begin_io(100 * MIB..104 * MIB + 1).unwrap();
    md.set_out_of_sync(9 * MIB..9 * MIB + 8192).unwrap();
    md.flush_bitmap().unwrap();
    drop(md.abandon());
    let d = dump(&disk).unwrap();
    golden("dump-md-unclean.txt", &d.to_text());
    let json = serde_json::to_value(&d).unwrap();
    assert_eq!(json["al-active"], serde_json::json!([0, 2, 25, 26]));
    assert_eq!(json["clean-shutdown"], false);
    assert_eq!(json["out-of-sync-kib"], 8);
    assert_eq!(json["recovery-blocks"], 4 * 1024 - 2);
}

#[test]
fn open_after_crash_marks_al_extents_and_crashed_primary() {
    let (disk, _) = fresh(64 * MIB, 7);
    let (mut md, r) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
    assert!(r.was_clean);
    md.change_flags(flags::PRIMARY_IND | flags::CONSISTENT, 0)
        .unwrap();
    assert!(md.begin_io(5 * MIB..5 * MIB + 512).unwrap());
    drop(md.abandon());
    let (md, r) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
    assert!(!r.was_clean && r.crashed_primary);
    assert_eq!(r.marked_blocks, 1024, "one 4 MiB extent");
    assert!(md.bitmap().get(1024) && md.bitmap().get(2047) && !md.bitmap().get(2048));
    assert_ne!(md.flags() & flags::CRASHED_PRIMARY, 0);
    // A clean close and open marks nothing more.
    md.close().unwrap();
    let (md, r) = Metadata::open(disk, Placement::Internal).unwrap();
    assert!(r.was_clean);
    assert_eq!(r.marked_blocks, 0);
    assert_eq!(md.bitmap().count(), 1024);
}

#[test]
fn al_evictions_write_the_bitmap_first_and_busy_when_full() {
    let (disk, _) = fresh(128 * MIB, 7);
    let (mut md, _) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
    for e in 0..7u64 {
        assert!(md.begin_io(e * 4 * MIB..e * 4 * MIB + 1).unwrap());
    }
    // All seven slots have a write in flight: an eighth extent must wait.
    assert!(!md.begin_io(30 * 4 * MIB..30 * 4 * MIB + 1).unwrap());
    md.set_out_of_sync(0..4096).unwrap();
    md.end_io(0..1);
    assert!(md.begin_io(30 * 4 * MIB..30 * 4 * MIB + 1).unwrap());
    assert!(!md.activity_log().active().contains(&0));
    // Extent 0 left the AL: its bit must already be on disk.
    drop(md.abandon());
    let d = dump(&disk).unwrap();
    assert_eq!(d.out_of_sync_blocks, 1);
}

#[test]
fn create_probe_wipe() {
    let disk = CrashDisk::new((64 * MIB) as usize);
    assert!(matches!(Metadata::probe(&disk).unwrap(), Existing::None));
    assert!(matches!(
        Metadata::open(disk.clone(), Placement::Internal),
        Err(MetaError::NotFound)
    ));
    let layout = Layout::internal(64 * MIB, 1237).unwrap();
    Metadata::create(&disk, &layout, 9).unwrap();
    assert!(matches!(Metadata::probe(&disk).unwrap(), Existing::Valid(sb) if sb.device_uuid == 9));
    let e = Metadata::open(disk.clone(), Placement::External).unwrap_err();
    assert_eq!(
        e.to_string(),
        "the metadata here is internal, the configuration says external"
    );
    Metadata::wipe(&disk).unwrap();
    assert!(matches!(Metadata::probe(&disk).unwrap(), Existing::None));
}

#[test]
fn damaged_superblocks_are_explained() {
    let (disk, layout) = fresh(64 * MIB, 1237);
    // Corrupt the one written slot (seq 1 lives in slot B).
    disk.write_at(layout.sb_offset + 4096 + 100, &[0xff; 4])
        .unwrap();
    let e = Metadata::open(disk.clone(), Placement::Internal).unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.starts_with("corrupted superblock: slot A: no tandem magic; slot B: checksum mismatch"),
        "{msg}"
    );
    assert!(matches!(
        Metadata::probe(&disk).unwrap(),
        Existing::Damaged(..)
    ));

    // A newer format.
    let (disk, layout) = fresh(64 * MIB, 1237);
    let mut slot = vec![0u8; 4096];
    disk.read_at(layout.sb_offset + 4096, &mut slot).unwrap();
    slot[8..12].copy_from_slice(&2u32.to_le_bytes());
    let crc = crc32c::crc32c(&slot[..4092]);
    slot[4092..].copy_from_slice(&crc.to_le_bytes());
    disk.write_at(layout.sb_offset + 4096, &slot).unwrap();
    let e = Metadata::open(disk, Placement::Internal).unwrap_err();
    assert_eq!(
        e.to_string(),
        "unknown metadata format version 2 (this tandem reads version 1)"
    );
}

#[test]
fn external_metadata_round_trip() {
    let data = 1 << 30;
    let need = tandem_meta::layout::md_size_for(data, 1237);
    let meta = CrashDisk::new(need as usize + 4096 * 3);
    let layout = Layout::external(data, need + 4096 * 3, 1237).unwrap();
    assert_eq!(layout.data_size, data);
    Metadata::create(&meta, &layout, 5).unwrap();
    let (mut md, _) = Metadata::open(meta.clone(), Placement::External).unwrap();
    md.set_out_of_sync(data - 1..data).unwrap();
    md.close().unwrap();
    let d = dump(&meta).unwrap();
    assert_eq!(
        (d.placement, d.data_size, d.out_of_sync_blocks),
        (Placement::External, data, 1)
    );
    assert!(Layout::external(data, need - 4096, 1237)
        .unwrap_err()
        .to_string()
        .contains("meta-disk is too small"));
}

/// `is_hot` says whether `begin_io` would need a transaction: the engine
/// runs only those off its worker.
#[test]
fn is_hot_matches_whether_a_transaction_is_needed() {
    let (disk, _) = fresh(64 * MIB, 7);
    let (mut md, _) = Metadata::open(disk, Placement::Internal).unwrap();
    let range = 5 * MIB..5 * MIB + 512;
    assert!(!md.is_hot(&range), "a cold extent needs a transaction");
    let seq = md.activity_log().seq();
    assert!(md.begin_io(range.clone()).unwrap());
    assert_eq!(md.activity_log().seq(), seq + 1);
    assert!(md.is_hot(&range));
    // Spanning into the next, cold extent is not hot.
    assert!(!md.is_hot(&(5 * MIB..8 * MIB + 1)));
    assert!(md.is_hot(&(4 * MIB..8 * MIB)), "exactly the hot extent");
    assert!(md.begin_io(4 * MIB..8 * MIB).unwrap());
    assert_eq!(md.activity_log().seq(), seq + 1, "no transaction when hot");
    assert!(md.is_hot(&(0..0)), "an empty range touches nothing");
}
