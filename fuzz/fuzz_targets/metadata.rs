//! Arbitrary bytes as superblock slots, AL transactions and a whole AL
//! ring, and as a metadata device opened and dumped: parsing must never
//! panic, and whatever opens must survive a clean close.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tandem_meta::al::{replay, Transaction};
use tandem_meta::{CrashDisk, Layout, MetaIo, Metadata, Placement, Superblock};

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    if data.len() >= 8192 {
        let _ = Superblock::pick(&data[..4096], &data[4096..8192]);
    }
    let _ = Transaction::decode(data);
    if let Some((head, ring)) = data.split_first_chunk::<8>() {
        let al = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        let _ = replay(ring, u64::from(head[4]), al, u64::from(head[5]) << 8);
    }
    // A small device whose last bytes are the input: the superblock, AL
    // and bitmap are read from fuzzed data.
    let size = 2 << 20;
    let disk = CrashDisk::new(size);
    let tail = &data[data.len().saturating_sub(size)..];
    if disk.write_at((size - tail.len()) as u64, tail).is_err() || disk.sync().is_err() {
        return;
    }
    let _ = tandem_meta::dump::dump(&disk);
    if let Ok((md, _)) = Metadata::open(disk, Placement::Internal) {
        let _ = md.close();
    }
    structured(data);
});

/// Valid metadata whose AL ring holds checksummed transactions with fuzzed
/// contents: exercises replay and recovery, which random bytes never reach.
fn structured(data: &[u8]) {
    let Some((&al_byte, rest)) = data.split_first() else { return };
    let size = 16u64 << 20;
    let al_extents = 7 + u32::from(al_byte) * 7;
    let Ok(layout) = Layout::internal(size, al_extents) else { return };
    let disk = CrashDisk::new(size as usize);
    let Ok(sb) = Metadata::create(&disk, &layout, 77) else { return };
    // Unclean: recovery runs.
    let sb = Superblock { seq: sb.seq + 1, flags: 0, ..sb };
    if disk.write_at(layout.sb_offset + (sb.seq % 2) * 4096, &sb.encode()).is_err() {
        return;
    }
    let word = |c: &[u8], i: usize| -> u32 {
        let b = |k: usize| u32::from(c.get(i * 4 + k).copied().unwrap_or(0));
        b(0) | b(1) << 8 | b(2) << 16 | b(3) << 24
    };
    for chunk in rest.chunks(64).take(64) {
        let seq = u64::from(word(chunk, 0) % 200);
        let nu = (word(chunk, 1) % 8) as usize;
        let tx = Transaction {
            seq,
            device_uuid: if word(chunk, 2) % 16 == 0 { 1 } else { 77 },
            al_extents,
            updates: (0..nu).map(|i| (word(chunk, 3 + 2 * i) % (al_extents + 1), word(chunk, 4 + 2 * i) % 20)).collect(),
            context_start: word(chunk, 2) % (al_extents + 1),
            context: (0..(word(chunk, 15) % 900) as usize).map(|i| word(chunk, i % 16) % 20).collect(),
        };
        let slot = seq % u64::from(layout.al_slots);
        if disk.write_at(layout.al_offset + slot * 4096, &tx.encode()).is_err() {
            return;
        }
    }
    if disk.sync().is_err() {
        return;
    }
    let _ = tandem_meta::dump::dump(&disk);
    if let Ok((mut md, _)) = Metadata::open(disk, Placement::Internal) {
        for e in 0..4u64 {
            let _ = md.begin_io(e * 4 << 20..(e * 4 << 20) + 1);
        }
        let _ = md.close();
    }
}
