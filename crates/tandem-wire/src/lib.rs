//! tandem's peer replication protocol: the frames two nodes of a resource
//! exchange, their byte encoding, bounded async framing over tokio streams,
//! and the symmetric HMAC challenge-response handshake.
//!
//! The codec ([`encode`], [`decode`]) is pure code over byte buffers so it
//! can be property-tested and fuzzed without sockets; [`FrameReader`] and
//! [`write_message`] put it on a stream; [`handshake`] runs the connection
//! set-up both nodes perform. `docs/wire-protocol.md` describes the format
//! byte by byte and the rules each message carries.
#![cfg_attr(test, allow(clippy::unwrap_used))]

mod auth;
mod frame;
mod handshake;
mod stream;

pub use auth::{auth_mac, auth_verify, keep_outgoing, new_nonce};
pub use frame::{
    data_crc, decode, encode, encode_bulk_head, encode_head, HEADER_LEN, MAGIC, MAX_BODY,
    MAX_STRING,
};
pub use handshake::{handshake, printable, HandshakeConfig, HandshakeError};
pub use stream::{write_message, Frame, FrameReader};

/// Version of this protocol. A node refuses a peer whose `Hello` carries a
/// different version: mixing versions is never silently attempted.
pub const PROTOCOL_VERSION: u16 = 5;

/// Most bitmap runs in one `Bitmap` frame.
pub const MAX_BITMAP_RUNS: usize = 4096;

/// Most 4 KiB blocks one resync or verify request covers (1 MiB), and so
/// the most digests in one `OvReply` / `CsumRequest`.
pub const MAX_RESYNC_BLOCKS: usize = 256;

/// Largest data payload in one frame (matches the NBD server's maximum payload).
pub const MAX_DATA: usize = 32 << 20;

/// Length of an authentication challenge nonce.
pub const NONCE_LEN: usize = 32;

/// A node's role as reported to its peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireRole {
    /// Serves the device and replicates writes to the peer.
    Primary,
    /// Applies the peer's writes; its device cannot be opened.
    Secondary,
}

/// A node's local disk state as reported to its peer (DRBD's names).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireDisk {
    /// No backing disk attached.
    Diskless,
    /// The data is being (or must be) overwritten by a resync.
    Inconsistent,
    /// Consistent but known to be older than the peer's.
    Outdated,
    /// Consistent, but whether it is current is not known yet.
    Consistent,
    /// Consistent and current.
    UpToDate,
}

/// Replication protocol: when a write completes to the application.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireProtocol {
    /// Local write done and the data queued for the peer.
    A,
    /// Local write done and the peer has received the data (`RecvAck`).
    B,
    /// Local write done and the peer has written the data (`WriteAck`).
    C,
}

/// What a node reports about itself right after authentication and whenever
/// its role or disk state changes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateReport {
    /// The sender's role.
    pub role: WireRole,
    /// The sender's local disk state.
    pub disk: WireDisk,
    /// The replication protocol the sender is configured with.
    pub protocol: WireProtocol,
    /// Data area size in bytes.
    pub size: u64,
    /// Current generation UUID.
    pub current_uuid: u64,
    /// Bitmap generation UUID (0 when the bitmap tracks nothing).
    pub bitmap_uuid: u64,
    /// The two history generation UUIDs, newest first.
    pub history_uuids: [u64; 2],
    /// Superblock MDF flags as stored in metadata.
    pub flags: u32,
    /// Bytes this node has marked out of sync.
    pub out_of_sync: u64,
    /// The operator asked this node to give up its changes on connect
    /// (`connect --discard-my-data`, split-brain recovery).
    pub discard_my_data: bool,
}

/// One frame of the peer protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message {
    /// First frame each side sends.
    Hello {
        /// The sender's [`PROTOCOL_VERSION`].
        version: u16,
        /// Resource name the sender's connection belongs to.
        resource: String,
        /// The sender's node name.
        node: String,
    },
    /// A fresh random nonce the receiver must answer with [`auth_mac`].
    AuthChallenge {
        /// The nonce.
        nonce: [u8; NONCE_LEN],
    },
    /// The answer to the peer's challenge.
    AuthResponse {
        /// HMAC-SHA256 from [`auth_mac`] over the peer's nonce.
        mac: [u8; 32],
    },
    /// The sender verified the receiver's response.
    AuthOk,
    /// Sent before closing when the peer's response did not verify.
    AuthFailed {
        /// Why, for the receiver's log.
        reason: String,
    },
    /// The sender's role, disk state and generation identifiers.
    ReportState(StateReport),
    /// May the sender become Primary? The lower `token` wins when both
    /// nodes ask at once.
    PromoteRequest {
        /// Random tie-breaker.
        token: u64,
    },
    /// The answer to `PromoteRequest`.
    PromoteReply {
        /// Yes: the sender now counts the requester as Primary.
        granted: bool,
    },
    /// Skip the initial sync of a brand-new pair: the receiver, if its data
    /// is still just-created, adopts `uuid` as its current generation
    /// (DRBD's `new-current-uuid --clear-bitmap`).
    NewCurrentUuid {
        /// The generation both nodes now share.
        uuid: u64,
    },
    /// A replicated write. `seq` identifies it for acks; `epoch` orders it against barriers.
    Data {
        /// Identifies the write in `RecvAck`/`WriteAck`/`NegAck`.
        seq: u64,
        /// The epoch the write belongs to.
        epoch: u64,
        /// Byte offset in the data area.
        offset: u64,
        /// The write must be stable before it is acknowledged as written.
        fua: bool,
        /// The bytes to write (at most [`MAX_DATA`]).
        data: bytes::Bytes,
        /// crc32c of `data` ([`data_crc`]) when the link carries checksums;
        /// [`decode`] verifies it.
        crc: Option<u32>,
    },
    /// Trim (`zero == false`) or write-zeroes (`zero == true`, `may_trim` = holes allowed) of `len` bytes.
    Trim {
        /// Identifies the request in acks, sharing the `Data` sequence space.
        seq: u64,
        /// The epoch the request belongs to.
        epoch: u64,
        /// Byte offset in the data area.
        offset: u64,
        /// Length in bytes.
        len: u64,
        /// Write zeroes instead of discarding.
        zero: bool,
        /// With `zero`: the zeroes may be written as holes.
        may_trim: bool,
        /// The result must be stable before it is acknowledged as written.
        fua: bool,
    },
    /// Protocol B: the peer has received write `seq`.
    RecvAck {
        /// The write's sequence number.
        seq: u64,
    },
    /// Protocol C: the peer has written write `seq`.
    WriteAck {
        /// The write's sequence number.
        seq: u64,
    },
    /// The peer's local write failed.
    NegAck {
        /// The write's sequence number.
        seq: u64,
    },
    /// Closes `epoch`: every write of it must be done (and, with `flush`, stable) before BarrierAck.
    Barrier {
        /// The epoch being closed.
        epoch: u64,
        /// The epoch must be on stable storage before the ack.
        flush: bool,
    },
    /// Every write of `epoch` is done (and stable, if the barrier asked).
    BarrierAck {
        /// The epoch closed by the barrier.
        epoch: u64,
        /// How many writes (`Data` and `Trim`) of the epoch the peer applied,
        /// for the sender to check against its own count.
        writes: u32,
    },
    /// Liveness probe; answered with `PingAck`.
    Ping,
    /// Answer to `Ping`.
    PingAck,
    /// Orderly goodbye with a reason (logged by the receiver).
    Disconnect {
        /// Why the sender is closing.
        reason: String,
    },
    /// Start a resync now (after `invalidate`, `invalidate-remote` or a
    /// forced promotion while connected).
    SyncStart {
        /// The sender becomes SyncSource (else SyncTarget).
        source: bool,
        /// Every block travels.
        full: bool,
    },
    /// The SyncSource's new bitmap generation: the SyncTarget takes it as
    /// its current generation, so an interrupted resync resumes from the
    /// bitmap instead of starting over.
    SyncUuid {
        /// The generation.
        uuid: u64,
    },
    /// Part of the sender's out-of-sync bitmap, as runs of 4 KiB blocks.
    Bitmap {
        /// `(first block, number of blocks)`, at most [`MAX_BITMAP_RUNS`].
        runs: Vec<(u64, u64)>,
    },
    /// The sender's whole bitmap has been sent.
    BitmapDone,
    /// The SyncTarget ends the resync without every block: some could not
    /// be read on the source or written here, and stay out of sync.
    SyncEnd,
    /// The SyncTarget asks for a range.
    RsRequest {
        /// Request id, echoed in the reply.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length, at most [`MAX_RESYNC_BLOCKS`] blocks.
        len: u32,
    },
    /// The SyncSource's data for a request.
    RsData {
        /// The request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// The bytes.
        data: bytes::Bytes,
    },
    /// The SyncSource could not read the range.
    RsNegAck {
        /// The request id.
        id: u64,
    },
    /// The range is identical on both nodes (checksum-based resync).
    RsInSync {
        /// The request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// The SyncTarget wrote (and flushed) a resynced range: the source may
    /// clear its bits.
    RsAck {
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// Checksum-based resync: the target's crc32c of every 4 KiB block of
    /// the range; the source sends only the blocks that differ.
    CsumRequest {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// One digest per 4 KiB block.
        digests: Vec<u32>,
    },
    /// Online verify: the VerifyS asks for the target's digests of a range.
    OvRequest {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// Byte length.
        len: u32,
    },
    /// The VerifyT's crc32c of every 4 KiB block of the requested range.
    OvReply {
        /// Request id.
        id: u64,
        /// Byte offset.
        offset: u64,
        /// One digest per block; empty when the target could not read.
        digests: Vec<u32>,
    },
    /// `pause-sync` / `resume-sync` on the sender.
    SyncPause {
        /// Paused now.
        paused: bool,
    },
    /// The VerifyS has compared the whole device.
    OvDone {
        /// Blocks found different.
        found: u64,
    },
}

impl Message {
    /// The message's type name ("Data", "Barrier", ...) for logs and errors.
    pub fn name(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "Hello",
            Message::AuthChallenge { .. } => "AuthChallenge",
            Message::AuthResponse { .. } => "AuthResponse",
            Message::AuthOk => "AuthOk",
            Message::AuthFailed { .. } => "AuthFailed",
            Message::ReportState(_) => "ReportState",
            Message::NewCurrentUuid { .. } => "NewCurrentUuid",
            Message::PromoteRequest { .. } => "PromoteRequest",
            Message::PromoteReply { .. } => "PromoteReply",
            Message::Data { .. } => "Data",
            Message::Trim { .. } => "Trim",
            Message::RecvAck { .. } => "RecvAck",
            Message::WriteAck { .. } => "WriteAck",
            Message::NegAck { .. } => "NegAck",
            Message::Barrier { .. } => "Barrier",
            Message::BarrierAck { .. } => "BarrierAck",
            Message::Ping => "Ping",
            Message::PingAck => "PingAck",
            Message::Disconnect { .. } => "Disconnect",
            Message::SyncStart { .. } => "SyncStart",
            Message::SyncUuid { .. } => "SyncUuid",
            Message::Bitmap { .. } => "Bitmap",
            Message::BitmapDone => "BitmapDone",
            Message::SyncEnd => "SyncEnd",
            Message::RsRequest { .. } => "RsRequest",
            Message::RsData { .. } => "RsData",
            Message::RsNegAck { .. } => "RsNegAck",
            Message::RsInSync { .. } => "RsInSync",
            Message::RsAck { .. } => "RsAck",
            Message::CsumRequest { .. } => "CsumRequest",
            Message::OvRequest { .. } => "OvRequest",
            Message::OvReply { .. } => "OvReply",
            Message::SyncPause { .. } => "SyncPause",
            Message::OvDone { .. } => "OvDone",
        }
    }

    /// The bulk payload written after the header (`Data`, `RsData`), which
    /// writers send without copying it into a frame buffer.
    pub fn payload(&self) -> Option<&bytes::Bytes> {
        match self {
            Message::Data { data, .. } | Message::RsData { data, .. } => Some(data),
            _ => None,
        }
    }
}

/// The byte stream from the peer is unusable; the connection must close.
///
/// After an error the decode buffer's contents are unspecified: the stream
/// has lost sync and nothing more can be read from it.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The frame did not start with [`MAGIC`].
    #[error("bad frame magic {found:#010x} (expected {:#010x} \"TNDM\"): the peer does not speak the tandem protocol, or the stream lost sync", MAGIC)]
    BadMagic {
        /// The four bytes found, as a little-endian u32.
        found: u32,
    },
    /// The header names a message type this version does not know.
    #[error("unknown frame type {0:#06x}")]
    UnknownType(u16),
    /// The header sets flag bits this version reserves (all of them).
    #[error("{msg} frame sets reserved header flags {flags:#06x}")]
    ReservedFlags {
        /// The frame's type name.
        msg: &'static str,
        /// The flags found.
        flags: u16,
    },
    /// The header announces more body bytes than its type can have; the
    /// body is not buffered.
    #[error("{msg} frame too large: header announces {len} body bytes, limit {limit}")]
    FrameTooLarge {
        /// The frame's type name.
        msg: &'static str,
        /// Announced body length.
        len: u32,
        /// Largest body this type may have.
        limit: usize,
    },
    /// The body ended before a field.
    #[error("truncated body of {msg} frame: it ends before {field}")]
    Truncated {
        /// The frame's type name.
        msg: &'static str,
        /// The first field that did not fit.
        field: &'static str,
    },
    /// The body continues after the last field.
    #[error("{msg} frame has {extra} unexpected bytes after its last field")]
    TrailingBytes {
        /// The frame's type name.
        msg: &'static str,
        /// How many bytes were left over.
        extra: usize,
    },
    /// A field holds a value that is not allowed (an unknown enum value, a
    /// boolean other than 0 or 1, a crc without `has_crc`).
    #[error("invalid {field} in {msg} frame: {value}")]
    InvalidField {
        /// The frame's type name.
        msg: &'static str,
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// A `Data` payload does not match the crc32c its frame carries.
    #[error("crc mismatch in Data seq {seq} at offset {offset}: frame carries {sent:#010x}, payload hashes to {computed:#010x}")]
    CrcMismatch {
        /// The write's sequence number.
        seq: u64,
        /// The write's byte offset.
        offset: u64,
        /// The crc in the frame.
        sent: u32,
        /// The crc of the payload as received.
        computed: u32,
    },
    /// A string field is not UTF-8.
    #[error("{field} in {msg} frame is not valid UTF-8")]
    StringNotUtf8 {
        /// The frame's type name.
        msg: &'static str,
        /// The field.
        field: &'static str,
    },
    /// A string field is longer than [`MAX_STRING`].
    #[error(
        "{field} in {msg} frame is {len} bytes long (limit {} bytes)",
        MAX_STRING
    )]
    StringTooLong {
        /// The frame's type name.
        msg: &'static str,
        /// The field.
        field: &'static str,
        /// Its announced length.
        len: usize,
    },
    /// A `Data` payload given to [`write_message`] exceeds [`MAX_DATA`].
    #[error(
        "Data payload of {len} bytes exceeds the {} byte limit; split the write",
        MAX_DATA
    )]
    PayloadTooLarge {
        /// The payload length.
        len: usize,
    },
    /// The peer closed the connection part-way through a frame.
    #[error(
        "peer closed the connection in the middle of a frame ({buffered} bytes of it received)"
    )]
    ClosedMidFrame {
        /// Bytes of the incomplete frame that had arrived.
        buffered: usize,
    },
    /// Reading from or writing to the connection failed.
    #[error("peer connection I/O failed: {0}")]
    Io(#[from] std::io::Error),
}
