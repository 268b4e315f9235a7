//! The out-of-sync bitmap: one bit per 4 KiB block, set when the block may
//! differ from the peer.
//!
//! In memory it is a vector of 64-bit words with a running count of set
//! bits, so set / clear / count are proportional to the range touched and
//! iteration skips clean words 64 blocks at a time. On disk it is the same
//! bits, little-endian, in 4 KiB pages; a page changed in memory is marked
//! dirty and written back lazily (when its AL extent is evicted, on request,
//! and all of it on clean shutdown). Bitmap pages carry no checksum, like
//! DRBD's: a stale or torn page can only hold bits of extents that were in
//! the AL at the crash (those are set again by AL replay) or bits that were
//! being cleared (a little more resync), never a missing bit of a write that
//! left the AL.

use crate::layout::SLOT;
use std::ops::Range;

const PAGE_BITS: u64 = SLOT * 8;
const WORDS_PER_PAGE: usize = (SLOT / 8) as usize;

/// The out-of-sync bitmap of one device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
    bits: u64,
    set: u64,
    /// One bit per on-disk page that differs from what was last written.
    dirty_pages: Vec<u64>,
}

impl Bitmap {
    /// A clean bitmap of `bits` blocks.
    pub fn new(bits: u64) -> Self {
        let words = bits.div_ceil(64) as usize;
        let pages = bits.div_ceil(PAGE_BITS) as usize;
        Self {
            words: vec![0; words],
            bits,
            set: 0,
            dirty_pages: vec![0; pages.div_ceil(64)],
        }
    }

    /// Rebuild from the on-disk pages (`bytes` may be longer than needed;
    /// bits past the end are ignored and cleared).
    pub fn from_bytes(bits: u64, bytes: &[u8]) -> Self {
        let mut bm = Self::new(bits);
        bm.load_at(0, bytes);
        bm.loaded();
        bm
    }

    /// On-disk bytes the bitmap occupies (whole words).
    pub fn disk_bytes(&self) -> usize {
        self.words.len() * 8
    }

    /// Fill in on-disk bytes starting at byte `at` (a multiple of 8), so a
    /// large bitmap is read in pieces rather than through a second copy of
    /// its whole size. Call [`Bitmap::loaded`] after the last piece.
    pub fn load_at(&mut self, at: usize, bytes: &[u8]) {
        let first = at / 8;
        let words = self.words.get_mut(first..).unwrap_or_default();
        for (w, chunk) in words.iter_mut().zip(bytes.chunks(8)) {
            let mut a = [0u8; 8];
            a[..chunk.len()].copy_from_slice(chunk);
            *w = u64::from_le_bytes(a);
        }
    }

    /// Finish loading: clear bits past the end, count what is set.
    pub fn loaded(&mut self) {
        let tail = self.bits % 64;
        if tail != 0 {
            if let Some(last) = self.words.last_mut() {
                *last &= (1u64 << tail) - 1;
            }
        }
        self.set = self.words.iter().map(|w| u64::from(w.count_ones())).sum();
    }

    /// Number of blocks tracked.
    pub fn len(&self) -> u64 {
        self.bits
    }

    /// Whether the bitmap tracks no blocks at all.
    pub fn is_empty(&self) -> bool {
        self.bits == 0
    }

    /// Number of out-of-sync blocks.
    pub fn count(&self) -> u64 {
        self.set
    }

    /// Whether block `bit` is out of sync.
    pub fn get(&self, bit: u64) -> bool {
        bit < self.bits && self.words[(bit / 64) as usize] & (1 << (bit % 64)) != 0
    }

    fn clamp(&self, r: Range<u64>) -> Range<u64> {
        r.start.min(self.bits)..r.end.min(self.bits)
    }

    /// Apply `f(word, mask) -> new word` to every word of `range`; keeps the
    /// count and the dirty pages right. Returns the change in set bits.
    fn update(&mut self, range: Range<u64>, f: impl Fn(u64, u64) -> u64) -> i64 {
        let r = self.clamp(range);
        if r.is_empty() {
            return 0;
        }
        let mut delta: i64 = 0;
        let (first, last) = (r.start / 64, (r.end - 1) / 64);
        for w in first..=last {
            let lo = if w == first { r.start % 64 } else { 0 };
            let hi = if w == last { (r.end - 1) % 64 + 1 } else { 64 };
            let mask = if hi - lo == 64 {
                u64::MAX
            } else {
                ((1u64 << (hi - lo)) - 1) << lo
            };
            let old = self.words[w as usize];
            let new = f(old, mask);
            if new != old {
                delta += i64::from(new.count_ones()) - i64::from(old.count_ones());
                self.words[w as usize] = new;
                let page = w as usize / WORDS_PER_PAGE;
                self.dirty_pages[page / 64] |= 1 << (page % 64);
            }
        }
        self.set = self.set.wrapping_add_signed(delta);
        delta
    }

    /// Mark blocks out of sync; returns how many were newly set.
    pub fn set_range(&mut self, blocks: Range<u64>) -> u64 {
        self.update(blocks, |w, m| w | m).unsigned_abs()
    }

    /// Mark blocks in sync; returns how many were newly cleared.
    pub fn clear_range(&mut self, blocks: Range<u64>) -> u64 {
        self.update(blocks, |w, m| w & !m).unsigned_abs()
    }

    /// Number of out-of-sync blocks in `blocks`.
    pub fn count_range(&self, blocks: Range<u64>) -> u64 {
        self.dirty_ranges(blocks).map(|r| r.end - r.start).sum()
    }

    /// The first out-of-sync block at or after `from`, if any.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.bits {
            return None;
        }
        let mut w = (from / 64) as usize;
        let mut word = self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return (bit < self.bits).then_some(bit);
            }
            w += 1;
            word = *self.words.get(w)?;
        }
    }

    /// The first in-sync block at or after `from` (or the end).
    fn next_clear(&self, from: u64) -> u64 {
        if from >= self.bits {
            return self.bits;
        }
        let mut w = (from / 64) as usize;
        let mut word = !self.words[w] & (u64::MAX << (from % 64));
        loop {
            if word != 0 {
                let bit = w as u64 * 64 + u64::from(word.trailing_zeros());
                return bit.min(self.bits);
            }
            w += 1;
            match self.words.get(w) {
                Some(x) => word = !x,
                None => return self.bits,
            }
        }
    }

    /// Maximal runs of out-of-sync blocks within `blocks`, in order.
    pub fn dirty_ranges(&self, blocks: Range<u64>) -> impl Iterator<Item = Range<u64>> + '_ {
        let r = self.clamp(blocks);
        let mut at = r.start;
        std::iter::from_fn(move || {
            let start = self.next_set(at).filter(|s| *s < r.end)?;
            let end = self.next_clear(start).min(r.end);
            at = end;
            Some(start..end)
        })
    }

    /// Mark every bit; returns how many were newly set.
    pub fn set_all(&mut self) -> u64 {
        self.set_range(0..self.bits)
    }

    /// Mark the on-disk page holding `bit` dirty even if no bit changed, so
    /// the next write-back includes it.
    pub fn touch(&mut self, bits: Range<u64>) {
        let r = self.clamp(bits);
        if r.is_empty() {
            return;
        }
        for page in (r.start / PAGE_BITS)..=((r.end - 1) / PAGE_BITS) {
            let page = page as usize;
            self.dirty_pages[page / 64] |= 1 << (page % 64);
        }
    }

    /// Pages (indexes) that changed since they were last written.
    pub fn dirty_pages(&self) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, &w) in self.dirty_pages.iter().enumerate() {
            let mut w = w;
            while w != 0 {
                out.push(i * 64 + w.trailing_zeros() as usize);
                w &= w - 1;
            }
        }
        out
    }

    /// Pages holding the bits of `blocks` that are dirty.
    pub fn dirty_pages_in(&self, blocks: Range<u64>) -> Vec<usize> {
        let r = self.clamp(blocks);
        if r.is_empty() {
            return Vec::new();
        }
        ((r.start / PAGE_BITS) as usize..=((r.end - 1) / PAGE_BITS) as usize)
            .filter(|p| self.dirty_pages[p / 64] & (1 << (p % 64)) != 0)
            .collect()
    }

    /// Number of on-disk pages.
    pub fn pages(&self) -> usize {
        self.bits.div_ceil(PAGE_BITS) as usize
    }

    /// The on-disk image of page `page` (4 KiB).
    pub fn page_bytes(&self, page: usize) -> Vec<u8> {
        let mut out = vec![0u8; SLOT as usize];
        let words = self
            .words
            .iter()
            .skip(page * WORDS_PER_PAGE)
            .take(WORDS_PER_PAGE);
        for (dst, w) in out.chunks_mut(8).zip(words) {
            dst.copy_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// Record that `page` was written.
    pub fn mark_clean(&mut self, page: usize) {
        if let Some(w) = self.dirty_pages.get_mut(page / 64) {
            *w &= !(1 << (page % 64));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[derive(Clone, Debug)]
    enum Op {
        Set(u64, u64),
        Clear(u64, u64),
    }

    fn op(bits: u64) -> impl Strategy<Value = Op> {
        let r = (0..bits + 70, 0..200u64);
        prop_oneof![
            r.clone().prop_map(|(s, n)| Op::Set(s, s + n)),
            r.prop_map(|(s, n)| Op::Clear(s, s + n)),
        ]
    }

    fn model_ranges(m: &BTreeSet<u64>, r: Range<u64>) -> Vec<Range<u64>> {
        let mut out: Vec<Range<u64>> = Vec::new();
        for &b in m.range(r) {
            match out.last_mut() {
                Some(last) if last.end == b => last.end += 1,
                _ => out.push(b..b + 1),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_a_btreeset_model(
            bits in 1u64..100_000,
            ops in proptest::collection::vec(op(100_000), 1..60),
            probe in (0u64..100_100, 0u64..5000),
        ) {
            let mut bm = Bitmap::new(bits);
            let mut model = BTreeSet::new();
            for o in ops {
                match o {
                    Op::Set(s, e) => {
                        let before = model.len();
                        model.extend(s.min(bits)..e.min(bits));
                        prop_assert_eq!(bm.set_range(s..e), (model.len() - before) as u64);
                    }
                    Op::Clear(s, e) => {
                        let before = model.len();
                        for b in s..e { model.remove(&b); }
                        prop_assert_eq!(bm.clear_range(s..e), (before - model.len()) as u64);
                    }
                }
                prop_assert_eq!(bm.count(), model.len() as u64);
            }
            let (ps, pn) = probe;
            let r = ps..ps + pn;
            prop_assert_eq!(bm.dirty_ranges(r.clone()).collect::<Vec<_>>(), model_ranges(&model, r.clone()));
            prop_assert_eq!(bm.count_range(r.clone()), model.range(r).count() as u64);
            prop_assert_eq!(bm.next_set(ps), model.range(ps..).next().copied());
            prop_assert_eq!(bm.get(ps), model.contains(&ps));
            // The on-disk image reproduces the same bitmap.
            let bytes: Vec<u8> = (0..bm.pages()).flat_map(|p| bm.page_bytes(p)).collect();
            let back = Bitmap::from_bytes(bits, &bytes);
            prop_assert_eq!(back.count(), bm.count());
            prop_assert_eq!(back.words, bm.words.clone());
        }
    }

    #[test]
    fn dirty_pages_follow_changes() {
        let mut bm = Bitmap::new(3 * PAGE_BITS);
        assert!(bm.dirty_pages().is_empty());
        bm.set_range(PAGE_BITS + 5..PAGE_BITS + 6);
        assert_eq!(bm.dirty_pages(), vec![1]);
        bm.mark_clean(1);
        bm.set_range(PAGE_BITS + 5..PAGE_BITS + 6);
        assert!(
            bm.dirty_pages().is_empty(),
            "setting a set bit changes nothing"
        );
        bm.clear_range(0..3 * PAGE_BITS);
        assert_eq!(bm.dirty_pages(), vec![1]);
        assert_eq!(bm.dirty_pages_in(0..PAGE_BITS), Vec::<usize>::new());
    }

    #[test]
    fn loading_in_pieces_equals_loading_at_once() {
        let bits = 64 * 1000 + 13;
        let bytes: Vec<u8> = (0..(bits as usize).div_ceil(64) * 8 + 24)
            .map(|i| (i * 37 % 251) as u8)
            .collect();
        let whole = Bitmap::from_bytes(bits, &bytes);
        let mut pieces = Bitmap::new(bits);
        for (i, piece) in bytes.chunks(8 * 7).enumerate() {
            pieces.load_at(i * 8 * 7, piece);
        }
        pieces.loaded();
        assert_eq!(whole.count(), pieces.count());
        let all = |b: &Bitmap| {
            (0..b.pages())
                .flat_map(|p| b.page_bytes(p))
                .collect::<Vec<_>>()
        };
        assert_eq!(all(&whole), all(&pieces));
        assert!(whole.count() > 0);
    }

    #[test]
    fn from_bytes_ignores_bits_past_the_end() {
        let bm = Bitmap::from_bytes(10, &[0xff; 16]);
        assert_eq!(bm.count(), 10);
        assert_eq!(bm.next_set(10), None);
    }
}
