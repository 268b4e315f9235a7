//! Two cores wired back to back with every action executed by hand, so each
//! test controls exactly which completion arrives when.

use super::*;

const SIZE: u64 = 1 << 20;

fn attached_up_to_date(current: u64) -> Attached {
    Attached {
        gens: Generations {
            current,
            bitmap: 0,
            history: [0, 0],
        },
        flags: flags::CONSISTENT | flags::WAS_UP_TO_DATE,
    }
}

/// One node plus everything it asked for that has not been executed yet.
struct Node {
    core: Core,
    actions: Vec<Action>,
}

impl Node {
    fn new(protocol: Protocol, attached: Attached, seed: u64) -> Node {
        Node::with_policy(protocol, attached, seed, IoErrorPolicy::Detach)
    }
    fn with_policy(
        protocol: Protocol,
        attached: Attached,
        seed: u64,
        on_io_error: IoErrorPolicy,
    ) -> Node {
        let mut core = Core::new(
            Config {
                protocol,
                size: SIZE,
                resync_rate: 1 << 30,
                c_min_rate: 1 << 30,
                source_on_tie: seed % 2 == 1,
                split_brain: SplitBrainPolicy::default(),
                fencing: seed >= 100,
                csums: false,
                on_io_error,
            },
            attached,
            seed,
        );
        core.connect();
        Node {
            core,
            actions: Vec::new(),
        }
    }
    fn feed(&mut self, ev: Event) {
        self.core.handle(ev, &mut self.actions);
    }
    fn take(&mut self) -> Vec<Action> {
        std::mem::take(&mut self.actions)
    }
    /// Answer every AL request at once; return the rest.
    fn take_after_al(&mut self) -> Vec<Action> {
        loop {
            let acts = self.take();
            let mut again = false;
            let mut rest = Vec::new();
            for a in acts {
                if let Action::AlBegin { req, .. } = a {
                    self.feed(Event::AlReady { req, ok: true });
                    again = true;
                } else {
                    rest.push(a);
                }
            }
            self.actions.splice(0..0, rest);
            if !again {
                return self.take();
            }
        }
    }
}

/// The frames the actions send; `SendBitmap` is the driver's empty bitmap.
fn sends(acts: &[Action]) -> Vec<Packet> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Send(p) => Some(p.clone()),
            Action::SendBitmap => Some(Packet::BitmapDone),
            _ => None,
        })
        .collect()
}

fn completed(acts: &[Action]) -> Vec<(ReqId, Result<(), IoFailure>)> {
    acts.iter()
        .filter_map(|a| match a {
            Action::Complete { req, result } => Some((*req, *result)),
            _ => None,
        })
        .collect()
}

/// Deliver every frame each node has produced to the other, once.
fn deliver_round(a: &mut Node, b: &mut Node, link: u64) {
    let to_b = sends(&a.take());
    let to_a = sends(&b.take());
    for p in to_b {
        b.feed(Event::Packet { link, packet: p });
    }
    for p in to_a {
        a.feed(Event::Packet { link, packet: p });
    }
}

/// Connect two nodes: exchange state reports until both are Connected.
fn connect(a: &mut Node, b: &mut Node) {
    a.feed(Event::LinkUp { link: 1 });
    b.feed(Event::LinkUp { link: 1 });
    for _ in 0..4 {
        deliver_round(a, b, 1);
    }
    assert_eq!(a.core.cstate(), ConnState::Connected);
    assert_eq!(b.core.cstate(), ConnState::Connected);
}

/// Deliver frames both ways until none are left; keep the other actions.
fn exchange(a: &mut Node, b: &mut Node) -> (Vec<Action>, Vec<Action>) {
    let (mut ka, mut kb) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let (aa, ba) = (a.take(), b.take());
        let (to_b, to_a) = (sends(&aa), sends(&ba));
        ka.extend(aa.into_iter().filter(|x| !matches!(x, Action::Send(_))));
        kb.extend(ba.into_iter().filter(|x| !matches!(x, Action::Send(_))));
        if to_a.is_empty() && to_b.is_empty() {
            break;
        }
        for p in to_b {
            b.feed(Event::Packet { link: 1, packet: p });
        }
        for p in to_a {
            a.feed(Event::Packet { link: 1, packet: p });
        }
    }
    (ka, kb)
}

fn pair(protocol: Protocol) -> (Node, Node) {
    let mut a = Node::new(protocol, attached_up_to_date(0xAAA0), 1);
    let mut b = Node::new(protocol, attached_up_to_date(0xAAA0), 2);
    connect(&mut a, &mut b);
    assert_eq!(a.core.disk(), DiskState::UpToDate);
    assert_eq!(b.core.peer_disk(), DiskState::UpToDate);
    assert_eq!(
        a.core.promote(false, &mut a.actions),
        Ok(Promotion::Pending),
        "connected: the peer is asked first"
    );
    exchange(&mut a, &mut b);
    assert_eq!(a.core.role(), Role::Primary);
    assert_eq!(b.core.peer_role(), Role::Primary);
    (a, b)
}

fn write(req: ReqId, offset: u64) -> Event {
    Event::Write {
        req,
        offset,
        len: 4096,
        kind: WriteKind::Data,
        fua: false,
    }
}

/// Under each protocol, the point at which a write completes.
#[test]
fn completion_by_protocol() {
    for protocol in [Protocol::A, Protocol::B, Protocol::C] {
        let (mut a, mut b) = pair(protocol);
        a.feed(write(7, 0));
        let acts = a.take_after_al();
        let data = sends(&acts);
        assert!(
            matches!(data[..], [Packet::Data { seq: 1, .. }]),
            "{data:?}"
        );
        assert!(completed(&acts).is_empty());
        a.feed(Event::LocalDone {
            op: OpId::Client(7),
            ok: true,
        });
        let after_local = a.take();
        assert_eq!(
            !completed(&after_local).is_empty(),
            protocol == Protocol::A,
            "{protocol}: complete after local only under A"
        );
        b.feed(Event::Packet {
            link: 1,
            packet: data[0].clone(),
        });
        let peer_acts = b.take();
        let recv: Vec<Packet> = sends(&peer_acts);
        assert_eq!(
            recv.contains(&Packet::RecvAck(1)),
            protocol == Protocol::B,
            "{protocol}"
        );
        for p in recv {
            a.feed(Event::Packet { link: 1, packet: p });
        }
        let after_recv = a.take();
        assert_eq!(
            !completed(&after_recv).is_empty(),
            protocol == Protocol::B,
            "{protocol}: completes on the receive ack under B"
        );
        b.feed(Event::LocalDone {
            op: OpId::Peer { link: 1, seq: 1 },
            ok: true,
        });
        let acks = sends(&b.take());
        // Only C has a write ack (as in DRBD); A and B wait for the
        // barrier ack alone.
        if protocol == Protocol::C {
            assert_eq!(acks, vec![Packet::WriteAck(1)]);
        } else {
            assert!(acks.is_empty(), "{protocol}: no write ack, got {acks:?}");
        }
        for p in acks {
            a.feed(Event::Packet { link: 1, packet: p });
        }
        let after_write = a.take();
        assert_eq!(
            !completed(&after_write).is_empty(),
            protocol == Protocol::C,
            "{protocol}: completes on the write ack under C"
        );
        // A write ack is the peer's page cache; the write stays in the
        // transfer log (and the activity log) until its epoch is stable.
        assert!(!after_write
            .iter()
            .any(|x| matches!(x, Action::AlEnd { .. })));
        assert!(!a.core.is_idle());
        a.feed(Event::Tick);
        let barrier = sends(&a.take());
        assert_eq!(
            barrier,
            vec![Packet::Barrier {
                epoch: 1,
                flush: false
            }]
        );
        b.feed(Event::Packet {
            link: 1,
            packet: barrier[0].clone(),
        });
        b.take();
        b.feed(Event::LocalDone {
            op: OpId::PeerBarrier { link: 1, epoch: 1 },
            ok: true,
        });
        for p in sends(&b.take()) {
            a.feed(Event::Packet { link: 1, packet: p });
        }
        assert!(a.take().contains(&Action::AlEnd { range: 0..4096 }));
        assert!(a.core.is_idle());
    }
}

/// A write the peer acknowledged but has not made stable is marked out of
/// sync when the link drops: the peer may have lost power.
#[test]
fn write_acked_but_not_stable_is_marked_on_link_loss() {
    let (mut a, mut b) = pair(Protocol::C);
    a.feed(write(1, 0));
    let data = sends(&a.take_after_al());
    a.feed(Event::LocalDone {
        op: OpId::Client(1),
        ok: true,
    });
    b.feed(Event::Packet {
        link: 1,
        packet: data[0].clone(),
    });
    b.feed(Event::LocalDone {
        op: OpId::Peer { link: 1, seq: 1 },
        ok: true,
    });
    for p in sends(&b.take()) {
        a.feed(Event::Packet { link: 1, packet: p });
    }
    assert_eq!(completed(&a.take()), vec![(1, Ok(()))]);
    a.feed(Event::LinkDown {
        link: 1,
        cause: ConnState::NetworkFailure,
    });
    assert!(a.take().contains(&Action::MarkOutOfSync { range: 0..4096 }));
}

/// Invariant 3: a write the peer never confirmed is out of sync once the
/// link drops, and the waiting client gets its answer.
#[test]
fn link_loss_marks_unconfirmed_writes_and_rotates_the_generation() {
    let (mut a, _b) = pair(Protocol::C);
    let before = a.core.generations();
    a.feed(write(1, 8192));
    a.take_after_al();
    a.feed(Event::LocalDone {
        op: OpId::Client(1),
        ok: true,
    });
    assert!(completed(&a.take()).is_empty());
    a.feed(Event::LinkDown {
        link: 1,
        cause: ConnState::NetworkFailure,
    });
    let acts = a.take();
    let mark = acts
        .iter()
        .position(|x| *x == Action::MarkOutOfSync { range: 8192..12288 })
        .expect("marked");
    let done = acts
        .iter()
        .position(|x| {
            matches!(
                x,
                Action::Complete {
                    req: 1,
                    result: Ok(())
                }
            )
        })
        .expect("completed");
    assert!(mark < done, "marked before completion: {acts:?}");
    let g = a.core.generations();
    assert_ne!(g.current, before.current);
    assert_eq!(
        g.bitmap, before.current,
        "the old generation becomes the bitmap's"
    );
    assert!(acts.contains(&Action::PersistGenerations(g)));
    assert_eq!(a.core.cstate(), ConnState::WFConnection);
    assert_eq!(a.core.peer_disk(), DiskState::DUnknown);
    // Writes while disconnected are marked, not sent.
    a.feed(write(2, 0));
    let acts = a.take_after_al();
    assert!(sends(&acts).is_empty());
    assert!(acts.contains(&Action::MarkOutOfSync { range: 0..4096 }));
}

/// Invariant 4 under C: the flush waits for the peer's barrier ack, and the
/// peer acks only after its own flush.
#[test]
fn flush_waits_for_the_peer_under_c() {
    let (mut a, mut b) = pair(Protocol::C);
    a.feed(Event::Flush { req: 9 });
    let acts = a.take();
    let barrier = sends(&acts);
    assert_eq!(
        barrier,
        vec![Packet::Barrier {
            epoch: 1,
            flush: true
        }]
    );
    a.feed(Event::LocalDone {
        op: OpId::Client(9),
        ok: true,
    });
    assert!(completed(&a.take()).is_empty());
    b.feed(Event::Packet {
        link: 1,
        packet: barrier[0].clone(),
    });
    let peer = b.take();
    assert!(peer.contains(&Action::LocalFlush {
        op: OpId::PeerBarrier { link: 1, epoch: 1 }
    }));
    assert!(sends(&peer).is_empty(), "no ack before the peer's flush");
    b.feed(Event::LocalDone {
        op: OpId::PeerBarrier { link: 1, epoch: 1 },
        ok: true,
    });
    let ack = sends(&b.take());
    assert_eq!(
        ack,
        vec![Packet::BarrierAck {
            epoch: 1,
            writes: 0
        }]
    );
    a.feed(Event::Packet {
        link: 1,
        packet: ack[0].clone(),
    });
    assert_eq!(completed(&a.take()), vec![(9, Ok(()))]);
}

/// The peer never starts a write of the next epoch before the barrier's
/// flush, and never two overlapping writes at once.
#[test]
fn peer_orders_epochs_and_overlaps() {
    let (_a, mut b) = pair(Protocol::C);
    let data = |seq, epoch, offset| Packet::Data {
        req: 0,
        seq,
        epoch,
        offset,
        len: 4096,
        kind: WriteKind::Data,
        fua: false,
    };
    for p in [
        data(1, 1, 0),
        data(2, 1, 0),
        Packet::Barrier {
            epoch: 1,
            flush: true,
        },
        data(3, 2, 65536),
    ] {
        b.feed(Event::Packet { link: 1, packet: p });
    }
    let acts = b.take();
    let writes: Vec<_> = acts
        .iter()
        .filter(|a| matches!(a, Action::LocalWrite { .. }))
        .collect();
    assert_eq!(writes.len(), 1, "the overlapping write waits: {acts:?}");
    b.feed(Event::LocalDone {
        op: OpId::Peer { link: 1, seq: 1 },
        ok: true,
    });
    let acts = b.take();
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::LocalWrite {
            op: OpId::Peer { link: 1, seq: 2 },
            ..
        }
    )));
    assert!(!acts.iter().any(|a| matches!(
        a,
        Action::LocalWrite {
            op: OpId::Peer { link: 1, seq: 3 },
            ..
        }
    )));
    b.feed(Event::LocalDone {
        op: OpId::Peer { link: 1, seq: 2 },
        ok: true,
    });
    let acts = b.take();
    assert!(acts.contains(&Action::LocalFlush {
        op: OpId::PeerBarrier { link: 1, epoch: 1 }
    }));
    assert!(!acts.iter().any(|a| matches!(
        a,
        Action::LocalWrite {
            op: OpId::Peer { link: 1, seq: 3 },
            ..
        }
    )));
    b.feed(Event::LocalDone {
        op: OpId::PeerBarrier { link: 1, epoch: 1 },
        ok: true,
    });
    let acts = b.take();
    assert!(acts.iter().any(|a| matches!(
        a,
        Action::LocalWrite {
            op: OpId::Peer { link: 1, seq: 3 },
            ..
        }
    )));
}

/// The Primary never submits two overlapping writes at once either.
#[test]
fn overlapping_client_writes_are_serialised() {
    let (mut a, _b) = pair(Protocol::A);
    a.feed(write(1, 0));
    a.feed(write(2, 0));
    a.feed(write(3, 4096));
    let acts = a.take_after_al();
    let started: Vec<OpId> = acts
        .iter()
        .filter_map(|x| match x {
            Action::LocalWrite { op, .. } => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![OpId::Client(1)], "write 3 queues behind 2");
    a.feed(Event::LocalDone {
        op: OpId::Client(1),
        ok: true,
    });
    let acts = a.take_after_al();
    let started: Vec<OpId> = acts
        .iter()
        .filter_map(|x| match x {
            Action::LocalWrite { op, .. } => Some(*op),
            _ => None,
        })
        .collect();
    assert_eq!(started, vec![OpId::Client(2), OpId::Client(3)]);
}

/// The overlap test behind the serialisation above looks only at the
/// nearest write in flight below a range's end: a long write further down
/// must still hold back one inside it, neighbours that merely touch must
/// not, and a write that finished locally (but waits for its barrier ack)
/// no longer counts.
#[test]
fn overlap_with_writes_in_flight_is_exact() {
    let started = |acts: &[Action]| -> Vec<OpId> {
        acts.iter()
            .filter_map(|x| match x {
                Action::LocalWrite { op, .. } => Some(*op),
                _ => None,
            })
            .collect()
    };
    let (mut a, _b) = pair(Protocol::C);
    // 1: [0, 64 KiB); 2: [128 KiB, 132 KiB); 3: [64 KiB, 68 KiB) touches 1.
    a.feed(Event::Write {
        req: 1,
        offset: 0,
        len: 64 << 10,
        kind: WriteKind::Data,
        fua: false,
    });
    a.feed(write(2, 128 << 10));
    a.feed(write(3, 64 << 10));
    assert_eq!(
        started(&a.take_after_al()),
        vec![OpId::Client(1), OpId::Client(2), OpId::Client(3)]
    );
    // 4 lies inside 1, far below 1's end: it waits for 1 alone.
    a.feed(write(4, 32 << 10));
    // 5 overlaps nothing in flight.
    a.feed(write(5, 68 << 10));
    assert_eq!(
        started(&a.take_after_al()),
        vec![],
        "4 waits, and 5 behind it"
    );
    a.feed(Event::LocalDone {
        op: OpId::Client(2),
        ok: true,
    });
    assert_eq!(started(&a.take_after_al()), vec![], "2 was not in 4's way");
    a.feed(Event::LocalDone {
        op: OpId::Client(1),
        ok: true,
    });
    // 1 is still in the transfer log (no write ack yet) but off the disk.
    assert_eq!(
        started(&a.take_after_al()),
        vec![OpId::Client(4), OpId::Client(5)]
    );
}

#[test]
fn role_rules() {
    let (mut a, mut b) = pair(Protocol::C);
    for force in [false, true] {
        // The peer answers for its role ("--force does not make two
        // Primaries").
        assert_eq!(
            b.core.promote(force, &mut b.actions),
            Ok(Promotion::Pending)
        );
        let (_, kb) = exchange(&mut a, &mut b);
        assert!(
            kb.contains(&Action::PromotionDone(Err(Refusal::PeerIsPrimary))),
            "force {force}: {kb:?}"
        );
        assert_eq!(b.core.role(), Role::Secondary);
        assert_eq!(a.core.role(), Role::Primary);
    }
    assert_eq!(
        a.core.demote(2, &mut a.actions).map_err(|e| e.to_string()),
        Err("device is in use by 2 NBD clients".to_string())
    );
    a.core.demote(0, &mut a.actions).unwrap();
    assert!(a.core.flags() & flags::PRIMARY_IND == 0);

    // No UpToDate data: refused unless forced; forcing starts a generation.
    let mut c = Node::new(
        Protocol::C,
        Attached {
            gens: Generations {
                current: UUID_JUST_CREATED,
                ..Default::default()
            },
            flags: 0,
        },
        3,
    );
    assert_eq!(c.core.disk(), DiskState::Inconsistent);
    assert_eq!(
        c.core
            .promote(false, &mut c.actions)
            .map_err(|e| e.to_string()),
        Err("refusing to promote: no UpToDate data (use --force)".to_string())
    );
    c.core.promote(true, &mut c.actions).unwrap();
    assert_eq!(c.core.disk(), DiskState::UpToDate);
    assert_ne!(c.core.generations().current, UUID_JUST_CREATED);
}

/// Invariant 5: promoting without a peer persists a new generation before
/// the role changes, so the first write already belongs to it.
#[test]
fn promotion_without_peer_starts_a_generation_first() {
    let mut a = Node::new(Protocol::C, attached_up_to_date(0xAB00), 5);
    assert_eq!(a.core.disk(), DiskState::Consistent);
    a.core.promote(false, &mut a.actions).unwrap();
    let acts = a.take();
    assert!(
        matches!(acts[0], Action::PersistGenerations(g) if g.bitmap == 0xAB00 && g.current != 0xAB00)
    );
    assert_eq!(a.core.disk(), DiskState::UpToDate);
}

#[test]
fn fresh_pair_skips_the_initial_sync() {
    let fresh = Attached {
        gens: Generations {
            current: UUID_JUST_CREATED,
            ..Default::default()
        },
        flags: 0,
    };
    let mut a = Node::new(Protocol::C, fresh, 1);
    let mut b = Node::new(Protocol::C, fresh, 2);
    connect(&mut a, &mut b);
    assert_eq!(a.core.disk(), DiskState::Inconsistent);
    a.core
        .new_current_uuid_clear_bitmap(&mut a.actions)
        .unwrap();
    for p in sends(&a.take()) {
        b.feed(Event::Packet { link: 1, packet: p });
    }
    for p in sends(&b.take()) {
        a.feed(Event::Packet { link: 1, packet: p });
    }
    assert_eq!(a.core.disk(), DiskState::UpToDate);
    assert_eq!(b.core.disk(), DiskState::UpToDate);
    assert_eq!(a.core.peer_disk(), DiskState::UpToDate);
    assert_eq!(a.core.generations(), b.core.generations());
    assert!(
        a.core
            .new_current_uuid_clear_bitmap(&mut a.actions)
            .is_err(),
        "only on a fresh pair"
    );
}

/// Split brain is never silent: both Primary with diverged generations.
#[test]
fn diverged_generations_are_split_brain() {
    let (a, b, aa, ba) = split_then_reconnect(AfterSb0Pri::Disconnect, true);
    for (n, acts) in [(&a, &aa), (&b, &ba)] {
        assert!(
            acts.iter().any(|x| matches!(x, Action::SplitBrain { .. })),
            "{acts:?}"
        );
        assert_eq!(n.core.cstate(), ConnState::StandAlone);
    }
}

/// A pair split with `a` Primary when the link went and `b` promoted
/// while apart, both Secondary again, under `policy`; returns both nodes'
/// actions of the first report exchange on the new link.
fn split_then_reconnect(
    policy: AfterSb0Pri,
    a_older: bool,
) -> (Node, Node, Vec<Action>, Vec<Action>) {
    let (mut a, mut b) = pair(Protocol::C);
    for n in [&mut a, &mut b] {
        n.core.cfg.split_brain.zero = policy;
        n.feed(Event::LinkDown {
            link: 1,
            cause: ConnState::NetworkFailure,
        });
    }
    b.core
        .promote(false, &mut b.actions)
        .expect("an UpToDate node without a peer may be promoted");
    a.core
        .demote(0, &mut a.actions)
        .expect("no NBD clients: demotion is allowed");
    b.core
        .demote(0, &mut b.actions)
        .expect("no NBD clients: demotion is allowed");
    let bit = |n: &Node| n.core.flags() & flags::BITMAP_WAS_PRIMARY != 0;
    assert!(bit(&a), "a was Primary when the link went");
    assert!(!bit(&b), "b was promoted while apart");
    if !a_older {
        a.core.flags &= !flags::BITMAP_WAS_PRIMARY;
    }
    a.take();
    b.take();
    a.feed(Event::LinkUp { link: 2 });
    b.feed(Event::LinkUp { link: 2 });
    deliver_round(&mut a, &mut b, 2);
    let (aa, ba) = (a.take(), b.take());
    (a, b, aa, ba)
}

fn discards_own_data(acts: &[Action]) -> bool {
    acts.iter()
        .any(|x| matches!(x, Action::Log(l) if l.contains("this node's data is discarded")))
}

/// `discard-younger-primary` and `discard-older-primary` pick the node
/// promoted while apart, or the one Primary when the link went; when the
/// flag does not tell them apart they fall through to
/// `discard-zero-changes` and `discard-least-changes`, and both nodes still
/// agree on one victim.
#[test]
fn younger_and_older_primary_policies_pick_their_victim() {
    for (policy, a_loses) in [
        (AfterSb0Pri::DiscardYoungerPrimary, false),
        (AfterSb0Pri::DiscardOlderPrimary, true),
    ] {
        let (a, b, aa, ba) = split_then_reconnect(policy, true);
        for (n, acts) in [(&a, &aa), (&b, &ba)] {
            assert!(
                acts.iter().any(|x| matches!(x, Action::SplitBrain { .. })),
                "{policy:?}: split brain is reported: {acts:?}"
            );
            assert_ne!(
                n.core.cstate(),
                ConnState::StandAlone,
                "{policy:?}: {acts:?}"
            );
        }
        assert_eq!(discards_own_data(&aa), a_loses, "{policy:?}: a: {aa:?}");
        assert_eq!(discards_own_data(&ba), !a_loses, "{policy:?}: b: {ba:?}");
        let (a, b, aa, ba) = split_then_reconnect(policy, false);
        assert_ne!(
            discards_own_data(&aa),
            discards_own_data(&ba),
            "{policy:?}, neither was Primary at the split: one victim\n{aa:?}\n{ba:?}"
        );
        assert!(
            aa.iter().any(|x| matches!(x, Action::Log(l) if l.contains("discard-zero-changes, then discard-least-changes"))),
            "{aa:?}"
        );
        assert_ne!(a.core.cstate(), ConnState::StandAlone);
        assert_ne!(b.core.cstate(), ConnState::StandAlone);
    }
}

/// `new-current-uuid` without `--clear-bitmap`: refused while connected
/// and on data that is not UpToDate; otherwise a new generation that the
/// peer, still on the old one, is resynced to at the next connect (no
/// split brain).
#[test]
fn new_current_uuid_begins_a_generation_the_peer_follows() {
    let (mut a, mut b) = pair(Protocol::C);
    let err = a.core.new_current_uuid_verb(&mut a.actions).unwrap_err();
    assert!(err.to_string().contains("while connected"), "{err}");
    for n in [&mut a, &mut b] {
        n.feed(Event::LinkDown {
            link: 1,
            cause: ConnState::NetworkFailure,
        });
    }
    let before = a.core.generations();
    a.core
        .new_current_uuid_verb(&mut a.actions)
        .expect("disconnected and UpToDate: allowed");
    let after = a.core.generations();
    assert_ne!(after.current, before.current);
    assert_eq!(
        after.bitmap,
        b.core.generations().current,
        "b is on the bitmap generation"
    );
    assert!(a
        .take()
        .iter()
        .any(|x| matches!(x, Action::PersistGenerations(g) if *g == after)));
    b.take();
    a.feed(Event::LinkUp { link: 2 });
    b.feed(Event::LinkUp { link: 2 });
    for _ in 0..4 {
        deliver_round(&mut a, &mut b, 2);
    }
    assert_eq!(b.core.cstate(), ConnState::SyncTarget, "b resyncs from a");
    let mut c = Node::new(
        Protocol::C,
        Attached {
            flags: 0,
            ..attached_up_to_date(0xAAA0)
        },
        3,
    );
    let err = c.core.new_current_uuid_verb(&mut c.actions).unwrap_err();
    assert!(err.to_string().contains("not UpToDate"), "{err}");
}

#[test]
fn stale_link_events_are_ignored() {
    let (mut a, _b) = pair(Protocol::C);
    a.feed(Event::LinkDown {
        link: 0,
        cause: ConnState::NetworkFailure,
    });
    assert_eq!(a.core.cstate(), ConnState::Connected);
}

/// Found by the simulation (seed 9): a write waiting behind an overlapping
/// one must not complete when the link drops; it starts once the first is
/// done locally.
#[test]
fn a_waiting_write_survives_link_loss() {
    let (mut a, _b) = pair(Protocol::A);
    a.feed(write(1, 0));
    a.feed(write(2, 0));
    a.take_after_al();
    a.feed(Event::LinkDown {
        link: 1,
        cause: ConnState::NetworkFailure,
    });
    let acts = a.take();
    assert!(
        !completed(&acts).iter().any(|(r, _)| *r == 2),
        "write 2 never ran: {acts:?}"
    );
    a.feed(Event::LocalDone {
        op: OpId::Client(1),
        ok: true,
    });
    let acts = a.take_after_al();
    assert!(acts.iter().any(|x| matches!(
        x,
        Action::LocalWrite {
            op: OpId::Client(2),
            ..
        }
    )));
}

/// Invariant 6 under a race: both nodes are told to promote at the same
/// moment while connected. Exactly one becomes Primary, the other is
/// refused with "peer is Primary", and they never count two Primaries.
#[test]
fn racing_promotions_make_one_primary() {
    for seed in 0..20 {
        let mut a = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 1 + seed);
        let mut b = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 100 + seed);
        connect(&mut a, &mut b);
        assert_eq!(
            a.core.promote(false, &mut a.actions),
            Ok(Promotion::Pending)
        );
        assert_eq!(
            b.core.promote(false, &mut b.actions),
            Ok(Promotion::Pending)
        );
        let (ka, kb) = exchange(&mut a, &mut b);
        let done = |k: &[Action]| {
            k.iter()
                .filter_map(|x| match x {
                    Action::PromotionDone(r) => Some(r.clone()),
                    _ => None,
                })
                .collect::<Vec<_>>()
        };
        let (da, db) = (done(&ka), done(&kb));
        assert_eq!(da.len(), 1, "{da:?}");
        assert_eq!(db.len(), 1, "{db:?}");
        let winners = [&a, &b]
            .iter()
            .filter(|n| n.core.role() == Role::Primary)
            .count();
        assert_eq!(winners, 1, "seed {seed}: {da:?} {db:?}");
        let loser_refusal = if a.core.role() == Role::Primary {
            &db[0]
        } else {
            &da[0]
        };
        assert_eq!(loser_refusal, &Err(Refusal::PeerIsPrimary));
        assert_eq!(a.core.cstate(), ConnState::Connected);
        assert_eq!(b.core.cstate(), ConnState::Connected);
    }
}

/// `detach` on the Secondary: the Primary marks what it writes from then
/// on and starts a new generation; after `attach` the renegotiated link
/// finds the reattached disk behind and resyncs it (Inconsistent
/// SyncTarget), never silently UpToDate.
#[test]
fn detach_and_attach_on_the_secondary() {
    let (mut a, mut b) = pair(Protocol::C);
    let old = b.core.generations();
    assert!(a.core.detach(&mut a.actions).is_err(), "not on the Primary");
    b.core.detach(&mut b.actions).unwrap();
    assert_eq!(b.core.disk(), DiskState::Diskless);
    exchange(&mut a, &mut b);
    assert_eq!(a.core.peer_disk(), DiskState::Diskless);
    assert_ne!(a.core.generations().current, old.current);
    a.feed(write(1, 0));
    let acts = a.take_after_al();
    assert!(acts.contains(&Action::MarkOutOfSync { range: 0..4096 }));
    assert!(
        sends(&acts).is_empty(),
        "nothing is sent to a diskless peer"
    );
    b.core
        .attach(
            Attached {
                gens: old,
                flags: flags::CONSISTENT | flags::WAS_UP_TO_DATE,
            },
            &mut b.actions,
        )
        .unwrap();
    assert!(b
        .take()
        .iter()
        .any(|x| matches!(x, Action::Disconnect { .. })));
    a.feed(Event::LinkDown {
        link: 1,
        cause: ConnState::BrokenPipe,
    });
    a.take();
    a.feed(Event::LinkUp { link: 2 });
    b.feed(Event::LinkUp { link: 2 });
    for _ in 0..4 {
        let (to_b, to_a) = (sends(&a.take()), sends(&b.take()));
        for p in to_b {
            b.feed(Event::Packet { link: 2, packet: p });
        }
        for p in to_a {
            a.feed(Event::Packet { link: 2, packet: p });
        }
    }
    assert_eq!(b.core.cstate(), ConnState::SyncTarget);
    assert_eq!(a.core.cstate(), ConnState::SyncSource);
    assert_eq!(b.core.disk(), DiskState::Inconsistent);
    assert_eq!(a.core.peer_disk(), DiskState::Inconsistent);
}

/// `fencing = "resource-only"`: a Primary that loses its peer starts no new
/// write until fence-peer answers; exit code 4 outdates the peer.
#[test]
fn resource_only_fencing_holds_writes_until_fence_peer_answers() {
    // Seeds of 100 and more turn fencing on (see Node::new).
    let mut a = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 101);
    let mut b = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 102);
    connect(&mut a, &mut b);
    a.core.promote(false, &mut a.actions).unwrap();
    exchange(&mut a, &mut b);
    assert_eq!(a.core.role(), Role::Primary);
    a.feed(Event::LinkDown {
        link: 1,
        cause: ConnState::BrokenPipe,
    });
    let acts = a.take();
    assert!(acts.contains(&Action::FencePeer), "{acts:?}");
    a.feed(write(9, 0));
    let acts = a.take();
    assert!(
        !acts.iter().any(|x| matches!(x, Action::AlBegin { .. })),
        "a write started before fence-peer answered: {acts:?}"
    );
    a.feed(Event::FenceDone { code: Some(4) });
    let acts = a.take();
    assert!(
        acts.iter()
            .any(|x| matches!(x, Action::AlBegin { req: 9, .. })),
        "{acts:?}"
    );
    assert!(acts.contains(&Action::PersistFlags {
        set: flags::PEER_OUT_DATED,
        clear: 0
    }));
    assert_eq!(a.core.peer_disk(), DiskState::Outdated);
}

/// A bitmap with nothing set, for `pump`.
struct Clean;

impl OutOfSync for Clean {
    fn dirty_bytes(&self) -> u64 {
        0
    }
    fn next_dirty(&self, _from: u64, _max: u64) -> Option<Range<u64>> {
        None
    }
}

/// `on-io-error` on the Secondary. Whatever the policy, a peer write that
/// fails is negatively acknowledged and marked out of sync on both nodes.
/// `detach` makes the disk Failed, drops the link (so the Primary marks
/// every write not yet stable there) and, with nothing in flight, detaches
/// it: Diskless. `pass_on` and `call-local-io-error` keep the disk but make
/// it Inconsistent, so it is neither promoted nor trusted before a resync;
/// the handler runs once per disk, not per failed write.
#[test]
fn a_disk_error_on_the_secondary_follows_on_io_error() {
    for policy in [
        IoErrorPolicy::Detach,
        IoErrorPolicy::PassOn,
        IoErrorPolicy::CallLocalIoError,
    ] {
        let mut a = Node::with_policy(Protocol::C, attached_up_to_date(0xAAA0), 1, policy);
        let mut b = Node::with_policy(Protocol::C, attached_up_to_date(0xAAA0), 2, policy);
        connect(&mut a, &mut b);
        a.core.promote(false, &mut a.actions).unwrap();
        exchange(&mut a, &mut b);
        let mut b_acts = Vec::new();
        for (req, offset) in [(1, 0), (2, 8192)] {
            if policy == IoErrorPolicy::Detach && req == 2 {
                // The link is dropped at the first error.
                break;
            }
            a.feed(write(req, offset));
            for p in sends(&a.take_after_al()) {
                b.feed(Event::Packet { link: 1, packet: p });
            }
            let peer_op = b
                .take()
                .iter()
                .find_map(|x| match x {
                    Action::LocalWrite { op, .. } if matches!(op, OpId::Peer { .. }) => Some(*op),
                    _ => None,
                })
                .unwrap_or_else(|| panic!("{policy:?}: no peer write on b"));
            b.feed(Event::LocalDone {
                op: peer_op,
                ok: false,
            });
            let acts = b.take();
            let OpId::Peer { seq, .. } = peer_op else {
                unreachable!()
            };
            assert!(
                sends(&acts).contains(&Packet::NegAck(seq)),
                "{policy:?}: {acts:?}"
            );
            assert!(
                acts.contains(&Action::MarkOutOfSync {
                    range: offset..offset + 4096
                }),
                "{policy:?}: {acts:?}"
            );
            for p in sends(&acts) {
                a.feed(Event::Packet { link: 1, packet: p });
            }
            b_acts.extend(acts);
        }
        let handlers = b_acts
            .iter()
            .filter(|x| **x == Action::RunHandler("local-io-error"))
            .count();
        let dropped = b_acts
            .iter()
            .any(|x| matches!(x, Action::Disconnect { .. }));
        match policy {
            IoErrorPolicy::Detach => {
                assert_eq!(b.core.disk(), DiskState::Failed);
                assert!(dropped, "{b_acts:?}");
                b.feed(Event::LinkDown {
                    link: 1,
                    cause: ConnState::NetworkFailure,
                });
                let mut out = Vec::new();
                b.core.pump(&Clean, &mut out);
                assert!(out.contains(&Action::DetachDisk), "{out:?}");
                assert_eq!(b.core.disk(), DiskState::Diskless);
                assert_eq!(handlers, 0);
            }
            IoErrorPolicy::PassOn | IoErrorPolicy::CallLocalIoError => {
                assert_eq!(b.core.disk(), DiskState::Inconsistent, "{policy:?}");
                assert!(!dropped, "{policy:?}: {b_acts:?}");
                exchange(&mut a, &mut b);
                assert_eq!(a.core.peer_disk(), DiskState::Inconsistent);
                let want = usize::from(policy == IoErrorPolicy::CallLocalIoError);
                assert_eq!(handlers, want, "{policy:?}: {b_acts:?}");
            }
        }
    }
}

/// A Primary cannot detach (it would have to read through its peer): its
/// failed write gets EIO and is marked out of sync, the disk stays
/// UpToDate and the link up; a log line says why it did not detach.
#[test]
fn a_disk_error_on_the_primary_is_passed_on() {
    let (mut a, mut b) = pair(Protocol::C);
    a.core.promote(false, &mut a.actions).unwrap();
    exchange(&mut a, &mut b);
    a.feed(write(1, 0));
    let acts = a.take_after_al();
    let op = OpId::Client(1);
    assert!(acts
        .iter()
        .any(|x| matches!(x, Action::LocalWrite { op: o, .. } if *o == op)));
    a.actions.extend(acts);
    a.feed(Event::LocalDone { op, ok: false });
    let (ka, _) = exchange(&mut a, &mut b);
    assert!(
        ka.contains(&Action::MarkOutOfSync { range: 0..4096 }),
        "{ka:?}"
    );
    assert_eq!(completed(&ka), vec![(1, Err(IoFailure::Io))]);
    assert!(ka
        .iter()
        .any(|x| matches!(x, Action::Log(l) if l.contains("a Primary cannot detach"))));
    assert!(!ka.iter().any(|x| matches!(x, Action::Disconnect { .. })));
    assert_eq!(a.core.disk(), DiskState::UpToDate);
    assert_eq!(a.core.cstate(), ConnState::Connected);
}

/// Every block out of sync, for `pump`.
struct AllDirty;

impl OutOfSync for AllDirty {
    fn dirty_bytes(&self) -> u64 {
        SIZE
    }
    fn next_dirty(&self, from: u64, max: u64) -> Option<Range<u64>> {
        (from < SIZE).then(|| from..SIZE.min(from + max))
    }
}

/// Deliver what each node has sent to the other, once, on `link`.
fn deliver(a: &mut Node, b: &mut Node, link: u64) {
    let (to_b, to_a) = (sends(&a.take()), sends(&b.take()));
    for p in to_b {
        b.feed(Event::Packet { link, packet: p });
    }
    for p in to_a {
        a.feed(Event::Packet { link, packet: p });
    }
}

/// Connect `a` and `b` on `link`, `invalidate-remote` on `a` and run the
/// resync until `a` reads for it: that read's op.
fn first_resync_read(a: &mut Node, b: &mut Node, link: u64) -> OpId {
    a.feed(Event::LinkUp { link });
    b.feed(Event::LinkUp { link });
    for _ in 0..4 {
        deliver(a, b, link);
    }
    // After a reconnect the interrupted resync resumes by itself.
    if a.core.cstate() == ConnState::Connected {
        a.core.invalidate_remote(&mut a.actions).unwrap();
    }
    let mut acts = Vec::new();
    for _ in 0..8 {
        deliver(a, b, link);
        // The target asks for blocks, the source reads them.
        b.core.pump(&AllDirty, &mut b.actions);
        for p in sends(&b.take()) {
            a.feed(Event::Packet { link, packet: p });
        }
        a.core.pump(&AllDirty, &mut a.actions);
        acts = a.take();
        if let Some(op) = acts.iter().find_map(|x| match x {
            Action::LocalRead { op, .. } if matches!(op, OpId::ResyncRead { .. }) => Some(*op),
            _ => None,
        }) {
            a.actions = acts;
            return op;
        }
        for p in sends(&acts) {
            b.feed(Event::Packet { link, packet: p });
        }
    }
    panic!("no resync read on link {link}: {acts:?}");
}

/// Resync ids start again with every resync. A read that completes for a
/// link that is gone must not stand in for the new resync's read of the
/// same id: that one's data would never be sent and the resync would stall.
#[test]
fn a_late_resync_read_of_an_old_link_leaves_the_new_resync_alone() {
    let mut a = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 1);
    let mut b = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 2);
    let old = first_resync_read(&mut a, &mut b, 1);
    for n in [&mut a, &mut b] {
        n.feed(Event::LinkDown {
            link: 1,
            cause: ConnState::BrokenPipe,
        });
        n.take();
    }
    let new = first_resync_read(&mut a, &mut b, 2);
    let (OpId::ResyncRead { id: old_id, .. }, OpId::ResyncRead { id: new_id, .. }) = (old, new)
    else {
        unreachable!()
    };
    assert_eq!(old_id, new_id, "the ids start again");
    a.take();
    a.feed(Event::LocalDone { op: old, ok: true });
    assert!(
        sends(&a.take()).is_empty(),
        "the old link's read sent something"
    );
    a.feed(Event::LocalDone { op: new, ok: true });
    let sent = sends(&a.take());
    assert!(
        sent.iter()
            .any(|p| matches!(p, Packet::RsData { id, .. } if *id == new_id)),
        "the new resync's read was not answered: {sent:?}"
    );
}

/// A Secondary that is SyncSource reads for the peer; the driver sends a
/// large read straight from the disk, and a frame dropped with its link
/// never reaches the peer. That is not a disk error: with
/// `on-io-error = "detach"` it used to make the source's good disk Failed,
/// then Diskless. A read that does fail on the disk still counts as one.
#[test]
fn a_resync_read_dropped_with_its_link_is_no_disk_error() {
    for unsent in [true, false] {
        let mut a = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 1);
        let mut b = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 2);
        let op = first_resync_read(&mut a, &mut b, 1);
        assert_eq!(a.core.cstate(), ConnState::SyncSource);
        assert_eq!(a.core.role(), Role::Secondary);
        a.feed(Event::LinkDown {
            link: 1,
            cause: ConnState::BrokenPipe,
        });
        a.take();
        if unsent {
            a.feed(Event::ReadUnsent { op });
        } else {
            a.feed(Event::LocalDone { op, ok: false });
        }
        let acts = a.take();
        let mut later = Vec::new();
        a.core.pump(&AllDirty, &mut later);
        if unsent {
            assert_eq!(a.core.disk(), DiskState::UpToDate, "{acts:?}");
            assert!(
                !acts
                    .iter()
                    .chain(&later)
                    .any(|x| matches!(x, Action::Disconnect { .. } | Action::DetachDisk)),
                "{acts:?} {later:?}"
            );
        } else {
            assert_ne!(a.core.disk(), DiskState::UpToDate, "a real read error");
        }
    }
}

/// `invalidate-remote` onto a Diskless peer is refused; a `SyncStart` that
/// crossed the peer's `detach` drops the link instead of making a node
/// without a disk "Inconsistent", then "UpToDate" (found by the chaos
/// soak: `attach` was then refused with "a disk is attached already").
#[test]
fn no_resync_onto_a_node_without_a_disk() {
    let (mut a, mut b) = pair(Protocol::C);
    b.core.detach(&mut b.actions).unwrap();
    exchange(&mut a, &mut b);
    assert_eq!(a.core.peer_disk(), DiskState::Diskless);
    let refused = a.core.invalidate_remote(&mut a.actions).unwrap_err();
    assert!(refused.to_string().contains("Diskless"), "{refused}");
    assert!(sends(&a.take()).is_empty());
    // The SyncStart was already on its way when beta detached.
    b.feed(Event::Packet {
        link: 1,
        packet: Packet::SyncStart {
            source: true,
            full: true,
        },
    });
    let acts = b.take();
    assert!(
        acts.iter().any(|x| matches!(x, Action::Disconnect { .. })),
        "{acts:?}"
    );
    assert_eq!(b.core.disk(), DiskState::Diskless);
    assert!(b.core.sync_progress().is_none());
}

/// A resync frame sent straight from the disk is on the wire before the
/// driver reports its read done, so the target's ack of the range can
/// arrive first. The bits must clear all the same (found by the chaos
/// soak: a finished resync left 1 MiB out of sync on the source).
#[test]
fn a_resync_ack_that_overtakes_the_read_report_still_clears_the_bits() {
    let mut a = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 1);
    let mut b = Node::new(Protocol::C, attached_up_to_date(0xAAA0), 2);
    let op = first_resync_read(&mut a, &mut b, 1);
    let range = a
        .actions
        .iter()
        .find_map(|x| match x {
            Action::LocalRead { op: o, offset, len } if *o == op => Some(*offset..offset + len),
            _ => None,
        })
        .unwrap();
    a.take();
    a.feed(Event::Packet {
        link: 1,
        packet: Packet::RsAck {
            offset: range.start,
            len: range.end - range.start,
        },
    });
    a.feed(Event::LocalDone { op, ok: true });
    let acts = a.take();
    assert!(
        acts.contains(&Action::MarkInSync {
            range: range.clone()
        }),
        "{acts:?}"
    );
    // A later ack of the same range has nothing left to clear.
    a.feed(Event::Packet {
        link: 1,
        packet: Packet::RsAck {
            offset: range.start,
            len: range.end - range.start,
        },
    });
    assert!(!a
        .take()
        .iter()
        .any(|x| matches!(x, Action::MarkInSync { .. })));
}

/// Connect `a` (UpToDate) to `b` whose generations share only an old
/// history entry with `a`'s, as after a Primary's repeated rotations; `b`'s
/// flags choose its disk state. The actions of both after the handshake.
fn connect_related_by_history(b_flags: u32) -> (Node, Node, Vec<Action>, Vec<Action>) {
    let mut a = Node::new(
        Protocol::C,
        Attached {
            gens: Generations {
                current: 0xA400,
                bitmap: 0xA000,
                history: [0xA300, 0xA200],
            },
            flags: flags::CONSISTENT | flags::WAS_UP_TO_DATE,
        },
        1,
    );
    let mut b = Node::new(
        Protocol::C,
        Attached {
            gens: Generations {
                current: 0xB000,
                bitmap: 0,
                history: [0xA200, 0],
            },
            flags: b_flags,
        },
        2,
    );
    a.feed(Event::LinkUp { link: 1 });
    b.feed(Event::LinkUp { link: 1 });
    let (mut ka, mut kb) = (Vec::new(), Vec::new());
    for _ in 0..4 {
        let (aa, ba) = (a.take(), b.take());
        for p in sends(&aa) {
            b.feed(Event::Packet { link: 1, packet: p });
        }
        for p in sends(&ba) {
            a.feed(Event::Packet { link: 1, packet: p });
        }
        ka.extend(aa);
        kb.extend(ba);
    }
    (a, b, ka, kb)
}

/// A resync's target cut short holds nothing worth keeping: it becomes the
/// target of a full sync however far the source's generations moved on,
/// where the same generations on a consistent disk are split brain.
#[test]
fn an_inconsistent_node_is_the_sync_target_whatever_the_generations_say() {
    let (a, b, ka, kb) = connect_related_by_history(0);
    for acts in [&ka, &kb] {
        assert!(
            !acts.iter().any(|x| matches!(x, Action::SplitBrain { .. })),
            "{acts:?}"
        );
    }
    assert!(
        matches!(
            a.core.cstate(),
            ConnState::SyncSource | ConnState::WFBitMapS
        ),
        "{}",
        a.core.cstate()
    );
    assert!(
        matches!(
            b.core.cstate(),
            ConnState::SyncTarget | ConnState::WFBitMapT
        ),
        "{}",
        b.core.cstate()
    );
    assert!(
        ka.iter()
            .any(|x| matches!(x, Action::MarkOutOfSync { range } if *range == (0..SIZE))),
        "a full sync marks the whole device on the source: {ka:?}"
    );
    assert!(ka
        .iter()
        .any(|x| matches!(x, Action::Log(l) if l.contains("due to disk states"))));

    let (a, b, ka, kb) = connect_related_by_history(flags::CONSISTENT | flags::WAS_UP_TO_DATE);
    for (n, acts) in [(&a, &ka), (&b, &kb)] {
        assert!(
            acts.iter().any(|x| matches!(x, Action::SplitBrain { .. })),
            "{acts:?}"
        );
        assert_eq!(n.core.cstate(), ConnState::StandAlone);
    }
}

/// A promotion while apart keeps the old current generation in history only
/// when a peer may hold it (it was in place at an accepted connect): one
/// begun while apart is replaced, so the generations a peer does share stay
/// in the two history slots however often the node is promoted again.
#[test]
fn a_rotation_keeps_only_generations_a_peer_may_hold() {
    for shared in [false, true] {
        let mut n = Node::new(
            Protocol::C,
            Attached {
                gens: Generations {
                    current: 0xC000,
                    bitmap: 0xB000,
                    history: [0xA000, 0],
                },
                flags: flags::CONSISTENT
                    | flags::WAS_UP_TO_DATE
                    | if shared { flags::CURRENT_SHARED } else { 0 },
            },
            3,
        );
        n.core.promote(false, &mut n.actions).unwrap();
        let g = n.core.generations();
        assert_ne!(g.current, 0xC000, "a new generation before new writes");
        assert_eq!(g.bitmap, 0xB000);
        let expected = if shared {
            [0xC000, 0xA000]
        } else {
            [0xA000, 0]
        };
        assert_eq!(g.history, expected, "shared: {shared}");
        // The new generation is not shared either: the next promotion
        // replaces it too.
        n.core.demote(0, &mut n.actions).unwrap();
        n.core.promote(false, &mut n.actions).unwrap();
        assert_eq!(n.core.generations().history, expected, "shared: {shared}");
    }
}

/// An HA manager demotes the Primary and promotes the other node the moment
/// the demotion returned, before the demoted node's state report arrived:
/// the peer is asked, and it is no longer Primary.
#[test]
fn promotion_right_after_the_peer_demoted_is_granted() {
    let (mut a, mut b) = pair(Protocol::C);
    a.core.demote(0, &mut a.actions).unwrap();
    // a's report (Secondary) is still on its way to b.
    assert_eq!(b.core.peer_role(), Role::Primary);
    assert_eq!(
        b.core.promote(false, &mut b.actions),
        Ok(Promotion::Pending)
    );
    let (_, kb) = exchange(&mut a, &mut b);
    assert!(kb.contains(&Action::PromotionDone(Ok(()))), "{kb:?}");
    assert_eq!(b.core.role(), Role::Primary);
    assert_eq!(a.core.peer_role(), Role::Primary);
    assert_eq!(b.core.peer_role(), Role::Secondary);
}
