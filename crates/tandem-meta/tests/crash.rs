//! Crash tests: the metadata over a disk that loses or tears every write
//! not yet synced, crashed at random points of random workloads.

#![allow(clippy::unwrap_used)]

use proptest::prelude::*;
use std::collections::BTreeSet;
use std::ops::Range;
use tandem_meta::{
    CrashDisk, CrashMode, Generations, Layout, MetaIo, Metadata, Placement, Superblock,
};

const MIB: u64 = 1 << 20;
const EXTENT: u64 = 4 * MIB;
const DATA: u64 = 64 * MIB;

#[derive(Clone, Debug)]
enum Op {
    /// Begin a write of `len` bytes at `off`, optionally recording it as
    /// out of sync (as when the peer does not have it).
    Write { off: u64, len: u64, oos: bool },
    /// Complete the oldest write in flight.
    Complete,
    /// Resync cleared a range.
    InSync { off: u64, len: u64 },
    /// Write the dirty bitmap back.
    Flush,
    /// New generation identifiers.
    Gen(u64),
    /// Clean shutdown and reopen.
    Restart,
    /// Crash: the next `fail_after` writes succeed, the rest fail, then the
    /// unsynced writes are dropped, kept or torn.
    Crash {
        fail_after: Option<usize>,
        mode: u8,
        seed: u64,
        during: Box<Op>,
    },
}

fn simple_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..DATA, 1..2 * EXTENT, any::<bool>())
            .prop_map(|(off, len, oos)| Op::Write { off, len: len.min(DATA - off).max(1), oos }),
        4 => Just(Op::Complete),
        1 => (0..DATA, 1..8 * EXTENT).prop_map(|(off, len)| Op::InSync { off, len: len.min(DATA - off) }),
        1 => Just(Op::Flush),
        1 => any::<u64>().prop_map(Op::Gen),
        1 => Just(Op::Restart),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => simple_op(),
        1 => (proptest::option::of(0usize..6), 0u8..3, any::<u64>(), simple_op())
            .prop_map(|(fail_after, mode, seed, during)| Op::Crash { fail_after, mode, seed, during: Box::new(during) }),
    ]
}

fn blocks(r: &Range<u64>) -> Range<u64> {
    r.start / 4096..r.end.div_ceil(4096)
}

fn extent_blocks(r: &Range<u64>) -> Range<u64> {
    (r.start / EXTENT) * 1024..(r.end.div_ceil(EXTENT)) * 1024
}

struct Model {
    in_flight: Vec<Range<u64>>,
    must_be_set: BTreeSet<u64>,
    gen: Generations,
}

fn apply(
    md: &mut Metadata<CrashDisk>,
    m: &mut Model,
    op: &Op,
) -> Result<(), tandem_meta::MetaError> {
    match op {
        Op::Write { off, len, oos } => {
            let r = *off..off + len;
            if md.begin_io(r.clone())? {
                if *oos {
                    md.set_out_of_sync(r.clone())?;
                    m.must_be_set.extend(blocks(&r));
                }
                m.in_flight.push(r);
            }
        }
        Op::Complete => {
            if !m.in_flight.is_empty() {
                let r = m.in_flight.remove(0);
                md.end_io(r);
            }
        }
        Op::InSync { off, len } => {
            let r = *off..off + len;
            md.set_in_sync(r.clone())?;
            for b in r.start.div_ceil(4096)..r.end / 4096 {
                m.must_be_set.remove(&b);
            }
        }
        Op::Flush => {
            md.flush_bitmap()?;
        }
        Op::Gen(x) => {
            let g = Generations {
                current: *x,
                bitmap: x.rotate_left(7),
                history: [1, 2],
            };
            md.set_generations(g)?;
            m.gen = g;
        }
        Op::Restart | Op::Crash { .. } => {}
    }
    Ok(())
}

fn check_after_crash(md: &Metadata<CrashDisk>, m: &Model) -> Result<(), TestCaseError> {
    for r in &m.in_flight {
        for b in extent_blocks(r) {
            prop_assert!(
                md.bitmap().get(b),
                "block {} of in-flight write {:?} not out of sync",
                b,
                r
            );
        }
    }
    for &b in &m.must_be_set {
        prop_assert!(md.bitmap().get(b), "out-of-sync block {} lost", b);
    }
    prop_assert_eq!(md.generations(), m.gen);
    Ok(())
}

fn run(al_extents: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let disk = CrashDisk::new((DATA + 2 * MIB) as usize);
    let layout = Layout::internal(disk.size().unwrap(), al_extents).unwrap();
    prop_assert!(layout.data_size >= DATA);
    Metadata::create(&disk, &layout, 42).unwrap();
    let (mut md, report) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
    prop_assert!(report.was_clean);
    let mut m = Model {
        in_flight: Vec::new(),
        must_be_set: BTreeSet::new(),
        gen: md.generations(),
    };
    for op in ops {
        match &op {
            Op::Restart => {
                for r in m.in_flight.drain(..) {
                    md.end_io(r);
                }
                md.close().unwrap();
                let (md2, report) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
                prop_assert!(report.was_clean);
                prop_assert_eq!(report.marked_blocks, 0);
                md = md2;
                check_after_crash(&md, &m)?;
            }
            Op::Crash {
                fail_after,
                mode,
                seed,
                during,
            } => {
                if let Some(n) = fail_after {
                    disk.fail_writes_after(*n);
                }
                // The operation in progress at the crash: if it fails, the
                // caller never saw success, so the model is not updated.
                let mut trial = Model {
                    in_flight: m.in_flight.clone(),
                    must_be_set: m.must_be_set.clone(),
                    gen: m.gen,
                };
                if apply(&mut md, &mut trial, during).is_ok() {
                    m = trial;
                }
                drop(md.abandon());
                disk.crash(match mode {
                    0 => CrashMode::DropAll,
                    1 => CrashMode::KeepAll,
                    _ => CrashMode::Tear(*seed),
                });
                disk.stop_failing();
                let (md2, report) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
                prop_assert!(!report.was_clean);
                prop_assert!(
                    !report.al_unreadable,
                    "a crash must never make the AL unreadable"
                );
                md = md2;
                check_after_crash(&md, &m)?;
                m.in_flight.clear();
            }
            other => apply(&mut md, &mut m, other).unwrap(),
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn nothing_out_of_sync_is_forgotten_across_crashes(
        al_extents in 7u32..12,
        ops in proptest::collection::vec(op(), 1..120),
    ) {
        run(al_extents, ops)?;
    }
}

#[test]
fn a_torn_superblock_write_keeps_the_previous_state() {
    let mut seen_old = 0;
    for seed in 0..32 {
        let disk = CrashDisk::new((DATA + 2 * MIB) as usize);
        let layout = Layout::internal(disk.size().unwrap(), 7).unwrap();
        Metadata::create(&disk, &layout, 1).unwrap();
        let (mut md, _) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
        let g1 = Generations {
            current: 10,
            bitmap: 0,
            history: [4, 0],
        };
        md.set_generations(g1).unwrap();
        let sb = *md.superblock();
        drop(md.abandon());
        // The next superblock write is under way when the power fails.
        let g2 = Generations {
            current: 11,
            bitmap: 10,
            history: [4, 0],
        };
        let next = Superblock {
            seq: sb.seq + 1,
            gen: g2,
            ..sb
        };
        disk.write_at(layout.sb_offset + (next.seq % 2) * 4096, &next.encode())
            .unwrap();
        disk.crash(CrashMode::Tear(seed));
        let (md, _) = Metadata::open(disk.clone(), Placement::Internal).unwrap();
        let g = md.generations();
        assert!(g == g1 || g == g2, "seed {seed}: {g:?}");
        seen_old += usize::from(g == g1);
    }
    assert!(seen_old > 0, "no write was torn in 32 tries");
}
