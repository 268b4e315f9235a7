//! The connect-time comparison of generation identifiers: which node holds
//! the newer data, and how much has to travel. Rules and their order follow
//! DRBD (`drbd_uuid_compare`); each carries the name the logs print.

use tandem_meta::superblock::UUID_JUST_CREATED;
use tandem_meta::Generations;

/// Which rule of the table decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// Both nodes' metadata was just created.
    BothJustCreated,
    /// Only this node's metadata was just created.
    MeJustCreated,
    /// Only the peer's metadata was just created.
    PeerJustCreated,
    /// Current generations equal.
    Equal,
    /// My current generation is the peer's bitmap generation.
    PeerBitmapIsMyCurrent,
    /// The peer's current generation is my bitmap generation.
    MyBitmapIsPeerCurrent,
    /// I was SyncSource and missed the end of the resync: the peer took my
    /// current generation, I kept my bitmap generation and rotated since.
    MissedResyncEnd,
    /// The peer was SyncSource and missed the end of the resync.
    PeerMissedResyncEnd,
    /// My current generation is in the peer's history.
    MyCurrentInPeerHistory,
    /// The peer's current generation is in my history.
    PeerCurrentInMyHistory,
    /// Both moved on from the same bitmap generation.
    BitmapsEqual,
    /// Related through history only.
    HistoryMatch,
    /// Nothing in common.
    Unrelated,
}

impl Rule {
    /// Name for logs and events.
    pub fn name(self) -> &'static str {
        match self {
            Rule::BothJustCreated => "both-just-created",
            Rule::MeJustCreated => "me-just-created",
            Rule::PeerJustCreated => "peer-just-created",
            Rule::Equal => "current-equal",
            Rule::PeerBitmapIsMyCurrent => "peer-bitmap-is-my-current",
            Rule::MyBitmapIsPeerCurrent => "my-bitmap-is-peer-current",
            Rule::MissedResyncEnd => "missed-resync-end",
            Rule::PeerMissedResyncEnd => "peer-missed-resync-end",
            Rule::MyCurrentInPeerHistory => "my-current-in-peer-history",
            Rule::PeerCurrentInMyHistory => "peer-current-in-my-history",
            Rule::BitmapsEqual => "split-brain-bitmaps-equal",
            Rule::HistoryMatch => "split-brain-history-match",
            Rule::Unrelated => "unrelated-data",
        }
    }
}

/// What the rule implies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// The replicas hold the same generation.
    NoSync,
    /// This node is ahead; `full` when the bitmap cannot describe the difference.
    Source {
        /// Every block must travel.
        full: bool,
    },
    /// The peer is ahead.
    Target {
        /// Every block must travel.
        full: bool,
    },
    /// Both changed independently.
    SplitBrain,
    /// The devices hold different data sets: never connect.
    Unrelated,
}

/// Compare this node's generations with the peer's.
pub fn compare(me: &Generations, peer: &Generations) -> (Rule, Decision) {
    let just = |g: &Generations| g.current == UUID_JUST_CREATED;
    let in_history = |u: u64, g: &Generations| u != 0 && g.history.contains(&u);
    if just(me) && just(peer) {
        return (Rule::BothJustCreated, Decision::NoSync);
    }
    if just(me) {
        return (Rule::MeJustCreated, Decision::Target { full: true });
    }
    if just(peer) {
        return (Rule::PeerJustCreated, Decision::Source { full: true });
    }
    if me.current == peer.current {
        return (Rule::Equal, Decision::NoSync);
    }
    if peer.bitmap != 0 && me.current == peer.bitmap {
        return (
            Rule::PeerBitmapIsMyCurrent,
            Decision::Target { full: false },
        );
    }
    if me.bitmap != 0 && peer.current == me.bitmap {
        return (
            Rule::MyBitmapIsPeerCurrent,
            Decision::Source { full: false },
        );
    }
    // A finished SyncTarget holds the source's current generation, with the
    // sync generation (the source's bitmap generation) first in its history
    // and no bitmap generation. A source that never heard the end kept that
    // bitmap generation and, losing the link as Primary, started a new
    // current one (keeping the old one in history or not: it did not know
    // the target had taken it). Its bitmap still holds every block the
    // target lacks (bits clear only on the target's acks), so it names the
    // difference; a target that wrote on its own since has a bitmap
    // generation and does not match. DRBD's rule 34 corrects the same miss
    // when the current generations are still equal.
    let missed_end = |src: &Generations, tgt: &Generations| {
        src.bitmap != 0 && tgt.bitmap == 0 && tgt.history[0] == src.bitmap
    };
    if missed_end(me, peer) {
        return (Rule::MissedResyncEnd, Decision::Source { full: false });
    }
    if missed_end(peer, me) {
        return (Rule::PeerMissedResyncEnd, Decision::Target { full: false });
    }
    if in_history(me.current, peer) {
        return (
            Rule::MyCurrentInPeerHistory,
            Decision::Target { full: true },
        );
    }
    if in_history(peer.current, me) {
        return (
            Rule::PeerCurrentInMyHistory,
            Decision::Source { full: true },
        );
    }
    if me.bitmap != 0 && me.bitmap == peer.bitmap {
        return (Rule::BitmapsEqual, Decision::SplitBrain);
    }
    let mine = [me.bitmap, me.history[0], me.history[1]];
    let theirs = [peer.bitmap, peer.history[0], peer.history[1]];
    if mine.iter().any(|&u| u != 0 && theirs.contains(&u)) {
        return (Rule::HistoryMatch, Decision::SplitBrain);
    }
    (Rule::Unrelated, Decision::Unrelated)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn g(current: u64, bitmap: u64, h0: u64, h1: u64) -> Generations {
        Generations {
            current,
            bitmap,
            history: [h0, h1],
        }
    }

    /// The table, row by row, and its mirror: swapping the nodes swaps
    /// source and target and never changes whether it is split brain.
    #[test]
    fn decision_table() {
        let j = UUID_JUST_CREATED;
        #[rustfmt::skip]
        let rows: &[(Generations, Generations, Rule, Decision)] = &[
            (g(j, 0, 0, 0), g(j, 0, 0, 0), Rule::BothJustCreated, Decision::NoSync),
            (g(j, 0, 0, 0), g(0xA0, 0, 0, 0), Rule::MeJustCreated, Decision::Target { full: true }),
            (g(0xA0, 0, 0, 0), g(j, 0, 0, 0), Rule::PeerJustCreated, Decision::Source { full: true }),
            (g(0xA0, 0, 0, 0), g(0xA0, 0, 0, 0), Rule::Equal, Decision::NoSync),
            (g(0xA0, 0xB0, 0, 0), g(0xA0, 0, 0, 0), Rule::Equal, Decision::NoSync),
            (g(0xA0, 0, 0, 0), g(0xB0, 0xA0, 0, 0), Rule::PeerBitmapIsMyCurrent, Decision::Target { full: false }),
            (g(0xB0, 0xA0, 0, 0), g(0xA0, 0, 0, 0), Rule::MyBitmapIsPeerCurrent, Decision::Source { full: false }),
            (g(0xA0, 0, 0, 0), g(0xC0, 0, 0xA0, 0), Rule::MyCurrentInPeerHistory, Decision::Target { full: true }),
            (g(0xC0, 0, 0, 0xA0), g(0xA0, 0, 0, 0), Rule::PeerCurrentInMyHistory, Decision::Source { full: true }),
            (g(0xC0, 0xA0, 0xB0, 0), g(0xB0, 0, 0xA0, 0), Rule::MissedResyncEnd, Decision::Source { full: false }),
            (g(0xB0, 0, 0xA0, 0), g(0xD0, 0xA0, 0xC0, 0xB0), Rule::PeerMissedResyncEnd, Decision::Target { full: false }),
            // ... also when the source no longer remembers the generation
            // the target took from it.
            (g(0xC0, 0xA0, 0x90, 0), g(0xB0, 0, 0xA0, 0), Rule::MissedResyncEnd, Decision::Source { full: false }),
            // The target wrote on its own since (it has a bitmap generation):
            // split brain, not a missed end.
            (g(0xC0, 0xA0, 0xB0, 0), g(0xE0, 0xB0, 0xA0, 0), Rule::HistoryMatch, Decision::SplitBrain),
            (g(0xB0, 0xA0, 0, 0), g(0xC0, 0xA0, 0, 0), Rule::BitmapsEqual, Decision::SplitBrain),
            (g(0xB0, 0xD0, 0xA0, 0), g(0xC0, 0xE0, 0, 0xA0), Rule::HistoryMatch, Decision::SplitBrain),
            (g(0xB0, 0, 0, 0), g(0xC0, 0, 0, 0), Rule::Unrelated, Decision::Unrelated),
        ];
        for (me, peer, rule, decision) in rows {
            assert_eq!(compare(me, peer), (*rule, *decision), "{me:?} vs {peer:?}");
            let (_, mirrored) = compare(peer, me);
            let expected = match decision {
                Decision::Source { full } => Decision::Target { full: *full },
                Decision::Target { full } => Decision::Source { full: *full },
                d => *d,
            };
            assert_eq!(mirrored, expected, "mirror of {me:?} vs {peer:?}");
        }
    }
}
