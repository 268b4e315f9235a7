//! Role, connection and disk states, named exactly as DRBD names them so an
//! operator's knowledge (and their scripts' string matches) carry over.

use std::fmt;

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($(#[$vm:meta])* $v:ident),* $(,)? }) => {
        $(#[$m])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum $name { $($(#[$vm])* $v),* }
        impl $name {
            /// DRBD's name for the state.
            pub fn name(self) -> &'static str {
                match self { $($name::$v => stringify!($v)),* }
            }
        }
        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum!(
    /// Role of a node.
    Role {
        /// Serves the device and mirrors writes.
        Primary,
        /// Receives the Primary's writes; its device cannot be opened.
        Secondary,
        /// The peer's role while not connected.
        Unknown,
    }
);

named_enum!(
    /// Connection state (DRBD 8.4 names).
    ConnState {
        /// Not trying to connect (after `disconnect`, or a refused peer).
        StandAlone,
        /// Closing the link on request.
        Disconnecting,
        /// Link lost; about to retry.
        Unconnected,
        /// The peer stopped answering within `timeout`.
        Timeout,
        /// The link broke.
        BrokenPipe,
        /// The link failed.
        NetworkFailure,
        /// The peer sent something the protocol forbids.
        ProtocolError,
        /// Shutting down.
        TearDown,
        /// Listening and connecting, no peer yet.
        WFConnection,
        /// Authenticated; exchanging state.
        WFReportParams,
        /// Replicating.
        Connected,
        /// Resync starting, this node the source: exchanging bitmaps.
        WFBitMapS,
        /// Resync starting, this node the target: exchanging bitmaps.
        WFBitMapT,
        /// Resyncing, sending.
        SyncSource,
        /// Resyncing, receiving.
        SyncTarget,
        /// Resync paused (either node), this node the source.
        PausedSyncS,
        /// Resync paused (either node), this node the target.
        PausedSyncT,
        /// Online verify, this node comparing.
        VerifyS,
        /// Online verify, this node answering.
        VerifyT,
    }
);

named_enum!(
    /// Disk state.
    DiskState {
        /// No local disk.
        Diskless,
        /// Being attached.
        Attaching,
        /// An I/O error took the disk away.
        Failed,
        /// Being compared with the peer.
        Negotiating,
        /// Holds data that is not a consistent image (mid-sync, never synced).
        Inconsistent,
        /// Consistent, but known to be older than the peer's.
        Outdated,
        /// The peer's disk while not connected.
        DUnknown,
        /// Consistent; whether it is the newest is not known yet.
        Consistent,
        /// Consistent and the newest.
        UpToDate,
    }
);

named_enum!(
    /// Replication protocol: when a write completes to the client.
    Protocol {
        /// Local write done and the data queued to the link.
        A,
        /// Local write done and the peer received the data.
        B,
        /// Local write done and the peer wrote the data.
        C,
    }
);

impl ConnState {
    /// The link carries replication traffic in this state.
    pub fn is_connected(self) -> bool {
        matches!(
            self,
            ConnState::Connected
                | ConnState::WFBitMapS
                | ConnState::WFBitMapT
                | ConnState::SyncSource
                | ConnState::SyncTarget
                | ConnState::PausedSyncS
                | ConnState::PausedSyncT
                | ConnState::VerifyS
                | ConnState::VerifyT
        )
    }
}
