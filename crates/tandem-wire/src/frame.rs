//! Frame encoding and decoding: pure code over byte buffers.
//!
//! Every frame is a 12-byte header (magic, type, flags, body length, all
//! little-endian) followed by the body. The decoder validates the header
//! before it waits for the body, so a header announcing more than its type
//! can hold is refused before a single body byte is buffered.

use crate::{
    Message, StateReport, WireDisk, WireError, WireProtocol, WireRole, MAX_DATA, NONCE_LEN,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// First four bytes of every frame: "TNDM" read as a little-endian u32.
pub const MAGIC: u32 = 0x4d44_4e54;

/// Length of the frame header.
pub const HEADER_LEN: usize = 12;

/// Largest body any frame may announce: a full `Data` payload plus room for
/// its fixed fields. Checked against the header before buffering the body.
pub const MAX_BODY: usize = MAX_DATA + 4096;

/// Longest string field, in bytes of UTF-8. [`encode`] truncates longer
/// strings (at a character boundary) so that it never emits a frame the
/// peer would reject.
pub const MAX_STRING: usize = 4096;

/// Frame type codes. Grouped by phase so a hex dump tells at a glance what
/// part of the conversation a frame belongs to.
mod kind {
    pub const HELLO: u16 = 0x0001;
    pub const AUTH_CHALLENGE: u16 = 0x0002;
    pub const AUTH_RESPONSE: u16 = 0x0003;
    pub const AUTH_OK: u16 = 0x0004;
    pub const AUTH_FAILED: u16 = 0x0005;
    pub const REPORT_STATE: u16 = 0x0010;
    pub const NEW_CURRENT_UUID: u16 = 0x0011;
    pub const PROMOTE_REQUEST: u16 = 0x0012;
    pub const PROMOTE_REPLY: u16 = 0x0013;
    pub const DATA: u16 = 0x0020;
    pub const TRIM: u16 = 0x0021;
    pub const RECV_ACK: u16 = 0x0022;
    pub const WRITE_ACK: u16 = 0x0023;
    pub const NEG_ACK: u16 = 0x0024;
    pub const BARRIER: u16 = 0x0025;
    pub const BARRIER_ACK: u16 = 0x0026;
    pub const PING: u16 = 0x0030;
    pub const PING_ACK: u16 = 0x0031;
    pub const DISCONNECT: u16 = 0x0032;
    pub const SYNC_START: u16 = 0x0040;
    pub const SYNC_UUID: u16 = 0x0041;
    pub const BITMAP: u16 = 0x0042;
    pub const BITMAP_DONE: u16 = 0x0043;
    pub const RS_REQUEST: u16 = 0x0044;
    pub const RS_DATA: u16 = 0x0045;
    pub const RS_NEG_ACK: u16 = 0x0046;
    pub const RS_IN_SYNC: u16 = 0x0047;
    pub const RS_ACK: u16 = 0x0048;
    pub const CSUM_REQUEST: u16 = 0x0049;
    pub const OV_REQUEST: u16 = 0x004A;
    pub const OV_REPLY: u16 = 0x004B;
    pub const SYNC_PAUSE: u16 = 0x004C;
    pub const OV_DONE: u16 = 0x004D;
    pub const SYNC_END: u16 = 0x004E;
}

/// Largest `Hello` body. `Hello` is the one frame whose layout must survive
/// every future version (a node has to read the peer's version before it
/// can refuse it), so it gets room for fields a later version may append.
const HELLO_LIMIT: usize = 16 * 1024;
/// A string field on the wire: u16 length, then the bytes.
const STRING_LIMIT: usize = 2 + MAX_STRING;
/// Fixed part of a `Data` body before the payload.
const DATA_FIXED: usize = 8 + 8 + 8 + 1 + 1 + 4;
const TRIM_BODY: usize = 8 * 4 + 3;
const REPORT_STATE_BODY: usize = 4 + 4 + 8 * 6;
const BITMAP_LIMIT: usize = 4 + 16 * crate::MAX_BITMAP_RUNS;
const RS_DATA_FIXED: usize = 16;
/// `id`, `offset`, digest count, then the digests.
const DIGESTS_LIMIT: usize = 8 + 8 + 4 + 4 * crate::MAX_RESYNC_BLOCKS;

/// Name and largest body of each known frame type; `None` for unknown ones.
fn kind_info(kind: u16) -> Option<(&'static str, usize)> {
    Some(match kind {
        kind::HELLO => ("Hello", HELLO_LIMIT),
        kind::AUTH_CHALLENGE => ("AuthChallenge", NONCE_LEN),
        kind::AUTH_RESPONSE => ("AuthResponse", 32),
        kind::AUTH_OK => ("AuthOk", 0),
        kind::AUTH_FAILED => ("AuthFailed", STRING_LIMIT),
        kind::REPORT_STATE => ("ReportState", REPORT_STATE_BODY),
        kind::NEW_CURRENT_UUID => ("NewCurrentUuid", 8),
        kind::PROMOTE_REQUEST => ("PromoteRequest", 8),
        kind::PROMOTE_REPLY => ("PromoteReply", 1),
        kind::DATA => ("Data", DATA_FIXED + MAX_DATA),
        kind::TRIM => ("Trim", TRIM_BODY),
        kind::RECV_ACK => ("RecvAck", 8),
        kind::WRITE_ACK => ("WriteAck", 8),
        kind::NEG_ACK => ("NegAck", 8),
        kind::BARRIER => ("Barrier", 9),
        kind::BARRIER_ACK => ("BarrierAck", 12),
        kind::PING => ("Ping", 0),
        kind::PING_ACK => ("PingAck", 0),
        kind::DISCONNECT => ("Disconnect", STRING_LIMIT),
        kind::SYNC_START => ("SyncStart", 2),
        kind::SYNC_UUID => ("SyncUuid", 8),
        kind::BITMAP => ("Bitmap", BITMAP_LIMIT),
        kind::BITMAP_DONE => ("BitmapDone", 0),
        kind::SYNC_END => ("SyncEnd", 0),
        kind::RS_REQUEST => ("RsRequest", 20),
        kind::RS_DATA => ("RsData", RS_DATA_FIXED + MAX_DATA),
        kind::RS_NEG_ACK => ("RsNegAck", 8),
        kind::RS_IN_SYNC => ("RsInSync", 20),
        kind::RS_ACK => ("RsAck", 12),
        kind::CSUM_REQUEST => ("CsumRequest", DIGESTS_LIMIT),
        kind::OV_REQUEST => ("OvRequest", 20),
        kind::OV_REPLY => ("OvReply", DIGESTS_LIMIT),
        kind::SYNC_PAUSE => ("SyncPause", 1),
        kind::OV_DONE => ("OvDone", 8),
        _ => return None,
    })
}

fn kind_of(msg: &Message) -> u16 {
    match msg {
        Message::Hello { .. } => kind::HELLO,
        Message::AuthChallenge { .. } => kind::AUTH_CHALLENGE,
        Message::AuthResponse { .. } => kind::AUTH_RESPONSE,
        Message::AuthOk => kind::AUTH_OK,
        Message::AuthFailed { .. } => kind::AUTH_FAILED,
        Message::ReportState(_) => kind::REPORT_STATE,
        Message::NewCurrentUuid { .. } => kind::NEW_CURRENT_UUID,
        Message::PromoteRequest { .. } => kind::PROMOTE_REQUEST,
        Message::PromoteReply { .. } => kind::PROMOTE_REPLY,
        Message::Data { .. } => kind::DATA,
        Message::Trim { .. } => kind::TRIM,
        Message::RecvAck { .. } => kind::RECV_ACK,
        Message::WriteAck { .. } => kind::WRITE_ACK,
        Message::NegAck { .. } => kind::NEG_ACK,
        Message::Barrier { .. } => kind::BARRIER,
        Message::BarrierAck { .. } => kind::BARRIER_ACK,
        Message::Ping => kind::PING,
        Message::PingAck => kind::PING_ACK,
        Message::Disconnect { .. } => kind::DISCONNECT,
        Message::SyncStart { .. } => kind::SYNC_START,
        Message::SyncUuid { .. } => kind::SYNC_UUID,
        Message::Bitmap { .. } => kind::BITMAP,
        Message::BitmapDone => kind::BITMAP_DONE,
        Message::SyncEnd => kind::SYNC_END,
        Message::RsRequest { .. } => kind::RS_REQUEST,
        Message::RsData { .. } => kind::RS_DATA,
        Message::RsNegAck { .. } => kind::RS_NEG_ACK,
        Message::RsInSync { .. } => kind::RS_IN_SYNC,
        Message::RsAck { .. } => kind::RS_ACK,
        Message::CsumRequest { .. } => kind::CSUM_REQUEST,
        Message::OvRequest { .. } => kind::OV_REQUEST,
        Message::OvReply { .. } => kind::OV_REPLY,
        Message::SyncPause { .. } => kind::SYNC_PAUSE,
        Message::OvDone { .. } => kind::OV_DONE,
    }
}

/// crc32c of a `Data` payload, the value to put in [`Message::Data`]'s `crc`.
pub fn data_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

// --- enum bytes: explicit values, so reordering a Rust enum can never
// change the wire format.

fn role_byte(r: WireRole) -> u8 {
    match r {
        WireRole::Primary => 1,
        WireRole::Secondary => 2,
    }
}

fn disk_byte(d: WireDisk) -> u8 {
    match d {
        WireDisk::Diskless => 1,
        WireDisk::Inconsistent => 2,
        WireDisk::Outdated => 3,
        WireDisk::Consistent => 4,
        WireDisk::UpToDate => 5,
    }
}

fn protocol_byte(p: WireProtocol) -> u8 {
    // ASCII letters, readable in a hex dump.
    match p {
        WireProtocol::A => b'A',
        WireProtocol::B => b'B',
        WireProtocol::C => b'C',
    }
}

fn role_from(b: u8) -> Option<WireRole> {
    Some(match b {
        1 => WireRole::Primary,
        2 => WireRole::Secondary,
        _ => return None,
    })
}

fn disk_from(b: u8) -> Option<WireDisk> {
    Some(match b {
        1 => WireDisk::Diskless,
        2 => WireDisk::Inconsistent,
        3 => WireDisk::Outdated,
        4 => WireDisk::Consistent,
        5 => WireDisk::UpToDate,
        _ => return None,
    })
}

fn protocol_from(b: u8) -> Option<WireProtocol> {
    Some(match b {
        b'A' => WireProtocol::A,
        b'B' => WireProtocol::B,
        b'C' => WireProtocol::C,
        _ => return None,
    })
}

// --- encoding

/// The longest prefix of `s` that fits [`MAX_STRING`] and ends on a
/// character boundary (so the peer still receives valid UTF-8).
fn clip(s: &str) -> &str {
    if s.len() <= MAX_STRING {
        return s;
    }
    let mut end = MAX_STRING;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

fn string_len(s: &str) -> usize {
    2 + clip(s).len()
}

fn put_string(out: &mut BytesMut, s: &str) {
    let s = clip(s);
    // clip() keeps it at most MAX_STRING bytes, which fits a u16.
    out.put_u16_le(s.len() as u16);
    out.put_slice(s.as_bytes());
}

/// Body length of `msg` on the wire.
fn body_len(msg: &Message) -> usize {
    match msg {
        Message::Hello { resource, node, .. } => 2 + string_len(resource) + string_len(node),
        Message::AuthChallenge { .. } => NONCE_LEN,
        Message::AuthResponse { .. } => 32,
        Message::AuthOk | Message::Ping | Message::PingAck => 0,
        Message::AuthFailed { reason } | Message::Disconnect { reason } => string_len(reason),
        Message::ReportState(_) => REPORT_STATE_BODY,
        Message::Data { data, .. } => DATA_FIXED + data.len(),
        Message::Trim { .. } => TRIM_BODY,
        Message::PromoteReply { .. } => 1,
        Message::NewCurrentUuid { .. }
        | Message::PromoteRequest { .. }
        | Message::RecvAck { .. }
        | Message::WriteAck { .. }
        | Message::NegAck { .. } => 8,
        Message::Barrier { .. } => 9,
        Message::BarrierAck { .. } => 12,
        Message::SyncStart { .. } => 2,
        Message::SyncUuid { .. } | Message::RsNegAck { .. } | Message::OvDone { .. } => 8,
        Message::Bitmap { runs } => 4 + 16 * runs.len(),
        Message::BitmapDone | Message::SyncEnd => 0,
        Message::RsRequest { .. } | Message::RsInSync { .. } | Message::OvRequest { .. } => 20,
        Message::RsData { data, .. } => RS_DATA_FIXED + data.len(),
        Message::RsAck { .. } => 12,
        Message::CsumRequest { digests, .. } | Message::OvReply { digests, .. } => {
            20 + 4 * digests.len()
        }
        Message::SyncPause { .. } => 1,
    }
}

/// Append one frame.
///
/// # Panics
/// If `msg` is a `Data` whose payload exceeds [`MAX_DATA`]: the engine
/// splits writes before they get here, and a frame the peer must reject
/// is worse than a loud failure at the source. [`crate::write_message`]
/// returns [`WireError::PayloadTooLarge`] instead.
pub fn encode(msg: &Message, out: &mut BytesMut) {
    out.reserve(HEADER_LEN + body_len(msg));
    encode_head(msg, out);
    if let Some(data) = msg.payload() {
        out.put_slice(data);
    }
}

/// Append the header and body of `msg`, except a `Data` payload, which the
/// caller appends (or writes separately, to avoid copying it).
pub fn encode_head(msg: &Message, out: &mut BytesMut) {
    if let Some(data) = msg.payload() {
        assert!(
            data.len() <= MAX_DATA,
            "Data payload of {} bytes exceeds MAX_DATA",
            data.len()
        );
    }
    if let Message::Bitmap { runs } = msg {
        assert!(runs.len() <= crate::MAX_BITMAP_RUNS, "too many bitmap runs");
    }
    if let Message::CsumRequest { digests, .. } | Message::OvReply { digests, .. } = msg {
        assert!(
            digests.len() <= crate::MAX_RESYNC_BLOCKS,
            "too many digests"
        );
    }
    let len = body_len(msg);
    out.put_u32_le(MAGIC);
    out.put_u16_le(kind_of(msg));
    out.put_u16_le(0);
    // Every body is at most MAX_DATA + DATA_FIXED (asserted above), well
    // within u32.
    out.put_u32_le(len as u32);
    match msg {
        Message::Hello {
            version,
            resource,
            node,
        } => {
            out.put_u16_le(*version);
            put_string(out, resource);
            put_string(out, node);
        }
        Message::AuthChallenge { nonce } => out.put_slice(nonce),
        Message::AuthResponse { mac } => out.put_slice(mac),
        Message::AuthOk | Message::Ping | Message::PingAck => {}
        Message::AuthFailed { reason } | Message::Disconnect { reason } => put_string(out, reason),
        Message::ReportState(s) => {
            out.put_u8(role_byte(s.role));
            out.put_u8(disk_byte(s.disk));
            out.put_u8(protocol_byte(s.protocol));
            out.put_u8(u8::from(s.discard_my_data));
            out.put_u32_le(s.flags);
            out.put_u64_le(s.size);
            out.put_u64_le(s.current_uuid);
            out.put_u64_le(s.bitmap_uuid);
            out.put_u64_le(s.history_uuids[0]);
            out.put_u64_le(s.history_uuids[1]);
            out.put_u64_le(s.out_of_sync);
        }
        Message::Data {
            seq,
            epoch,
            offset,
            fua,
            crc,
            ..
        } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*epoch);
            out.put_u64_le(*offset);
            out.put_u8(u8::from(*fua));
            out.put_u8(u8::from(crc.is_some()));
            out.put_u32_le(crc.unwrap_or(0));
        }
        Message::Trim {
            seq,
            epoch,
            offset,
            len,
            zero,
            may_trim,
            fua,
        } => {
            out.put_u64_le(*seq);
            out.put_u64_le(*epoch);
            out.put_u64_le(*offset);
            out.put_u64_le(*len);
            out.put_u8(u8::from(*zero));
            out.put_u8(u8::from(*may_trim));
            out.put_u8(u8::from(*fua));
        }
        Message::PromoteReply { granted } => out.put_u8(u8::from(*granted)),
        Message::NewCurrentUuid { uuid: seq }
        | Message::PromoteRequest { token: seq }
        | Message::RecvAck { seq }
        | Message::WriteAck { seq }
        | Message::NegAck { seq } => out.put_u64_le(*seq),
        Message::Barrier { epoch, flush } => {
            out.put_u64_le(*epoch);
            out.put_u8(u8::from(*flush));
        }
        Message::BarrierAck { epoch, writes } => {
            out.put_u64_le(*epoch);
            out.put_u32_le(*writes);
        }
        Message::SyncStart { source, full } => {
            out.put_u8(u8::from(*source));
            out.put_u8(u8::from(*full));
        }
        Message::SyncUuid { uuid: v }
        | Message::RsNegAck { id: v }
        | Message::OvDone { found: v } => out.put_u64_le(*v),
        Message::Bitmap { runs } => {
            // Bounded by MAX_BITMAP_RUNS (asserted above).
            out.put_u32_le(runs.len() as u32);
            for (start, n) in runs {
                out.put_u64_le(*start);
                out.put_u64_le(*n);
            }
        }
        Message::BitmapDone | Message::SyncEnd => {}
        Message::RsRequest { id, offset, len }
        | Message::RsInSync { id, offset, len }
        | Message::OvRequest { id, offset, len } => {
            out.put_u64_le(*id);
            out.put_u64_le(*offset);
            out.put_u32_le(*len);
        }
        Message::RsData { id, offset, .. } => {
            out.put_u64_le(*id);
            out.put_u64_le(*offset);
        }
        Message::RsAck { offset, len } => {
            out.put_u64_le(*offset);
            out.put_u32_le(*len);
        }
        Message::CsumRequest {
            id,
            offset,
            digests,
        }
        | Message::OvReply {
            id,
            offset,
            digests,
        } => {
            out.put_u64_le(*id);
            out.put_u64_le(*offset);
            // Bounded by MAX_RESYNC_BLOCKS (asserted above).
            out.put_u32_le(digests.len() as u32);
            for d in digests {
                out.put_u32_le(*d);
            }
        }
        Message::SyncPause { paused } => out.put_u8(u8::from(*paused)),
    }
}

// --- decoding

/// A validated frame header.
struct Header {
    kind: u16,
    name: &'static str,
    body: usize,
}

/// Parse and validate the header at the front of `buf` without consuming
/// it; `Ok(None)` if fewer than [`HEADER_LEN`] bytes are there.
fn parse_header(buf: &[u8]) -> Result<Option<Header>, WireError> {
    let Some(h) = buf.first_chunk::<HEADER_LEN>() else {
        return Ok(None);
    };
    let magic = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
    if magic != MAGIC {
        return Err(WireError::BadMagic { found: magic });
    }
    let kind = u16::from_le_bytes([h[4], h[5]]);
    let Some((name, limit)) = kind_info(kind) else {
        return Err(WireError::UnknownType(kind));
    };
    let flags = u16::from_le_bytes([h[6], h[7]]);
    if flags != 0 {
        return Err(WireError::ReservedFlags { msg: name, flags });
    }
    let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]);
    // Checked here, before the body is awaited, so a hostile or corrupt
    // header cannot make the reader buffer (or allocate) beyond the limit.
    if len as usize > limit {
        return Err(WireError::FrameTooLarge {
            msg: name,
            len,
            limit,
        });
    }
    Ok(Some(Header {
        kind,
        name,
        body: len as usize,
    }))
}

/// Total length (header + body) of the frame at the front of `buf`, once
/// its header has arrived and validated; `Ok(None)` before that.
pub(crate) fn frame_len(buf: &[u8]) -> Result<Option<usize>, WireError> {
    Ok(parse_header(buf)?.map(|h| HEADER_LEN + h.body))
}

/// How far to read the frame at the front of `buf` when a payload of at
/// least `min` bytes is to be left in the stream for the caller to splice:
/// the end of the fixed fields of a `Data` (without checksum) or `RsData`
/// frame with such a payload; while no header is in, the end of the
/// shorter of those two heads if `expect_bulk`; `None` (no limit) for any
/// other frame.
pub(crate) fn bulk_head_end(
    buf: &[u8],
    min: usize,
    expect_bulk: bool,
) -> Result<Option<usize>, WireError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(expect_bulk.then_some(HEADER_LEN + DATA_FIXED.min(RS_DATA_FIXED)));
    };
    let fixed = match h.kind {
        kind::DATA if buf.get(HAS_CRC).map_or(true, |&c| c == 0) => DATA_FIXED,
        kind::RS_DATA => RS_DATA_FIXED,
        _ => return Ok(None),
    };
    Ok((h.body >= fixed && h.body - fixed >= min).then_some(HEADER_LEN + fixed))
}

/// Offset of a `Data` frame's checksum flag: after the header, `seq`,
/// `epoch` and `offset`.
const HAS_CRC: usize = HEADER_LEN + 8 + 8 + 8 + 1;

/// The header and fixed fields of a `Data` or `RsData` frame whose payload
/// of `len` bytes the caller writes itself after them (from a file, say);
/// `msg`'s own payload must be empty.
pub fn encode_bulk_head(msg: &Message, len: usize, out: &mut BytesMut) {
    assert!(len <= MAX_DATA, "payload of {len} bytes exceeds MAX_DATA");
    assert!(
        msg.payload().is_some_and(|d| d.is_empty()),
        "encode_bulk_head needs a Data or RsData message with an empty payload"
    );
    let start = out.len();
    encode_head(msg, out);
    let field = start + 8..start + 12;
    let body = u32::from_le_bytes([
        out[field.start],
        out[field.start + 1],
        out[field.start + 2],
        out[field.start + 3],
    ]);
    // MAX_DATA plus the fixed fields fits u32 (see encode_head).
    out[field].copy_from_slice(&(body + len as u32).to_le_bytes());
}

/// Take one whole frame from the front of `buf` if it holds one. Ok(None) = need more bytes.
/// Rejects a header announcing more than MAX_DATA + 4096 body bytes before buffering it.
///
/// Each type has its own, usually much smaller, limit (a `Ping` has no body
/// at all), also checked at the header. Nothing is consumed until a whole
/// frame is present, so calling again after more bytes arrive is correct.
/// A `Data` payload is handed out without copying: it shares `buf`'s
/// allocation.
pub fn decode(buf: &mut BytesMut) -> Result<Option<Message>, WireError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(None);
    };
    let total = HEADER_LEN + h.body;
    if buf.len() < total {
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    frame.advance(HEADER_LEN);
    let mut body = Body {
        msg: h.name,
        buf: frame.freeze(),
    };
    let msg = decode_body(h.kind, &mut body)?;
    // Hello may grow in later versions (see HELLO_LIMIT): a node must be
    // able to read an newer peer's Hello to refuse its version cleanly.
    if h.kind != kind::HELLO && !body.buf.is_empty() {
        return Err(WireError::TrailingBytes {
            msg: h.name,
            extra: body.buf.len(),
        });
    }
    Ok(Some(msg))
}

/// If `buf` starts with a `Data` frame (without a checksum) or an `RsData`
/// frame whose payload is at least `min` bytes and not yet all buffered,
/// take everything buffered of it: the message (its `data` holding the
/// payload bytes that arrived so far) and how many payload bytes are still
/// in the stream. Lets a receiver move the rest of a large payload from the
/// socket without copying it through user space.
///
/// Only called while the buffer holds less than one whole frame, so
/// everything in it belongs to this frame.
pub(crate) fn decode_bulk_head(
    buf: &mut BytesMut,
    min: usize,
) -> Result<Option<(Message, usize)>, WireError> {
    let Some(h) = parse_header(buf)? else {
        return Ok(None);
    };
    let fixed = match h.kind {
        kind::DATA => DATA_FIXED,
        kind::RS_DATA => RS_DATA_FIXED,
        _ => return Ok(None),
    };
    let total = HEADER_LEN + h.body;
    if h.body < fixed
        || h.body - fixed < min
        || buf.len() < HEADER_LEN + fixed
        || buf.len() >= total
    {
        return Ok(None);
    }
    // A checksummed payload must pass through user space to be verified.
    if h.kind == kind::DATA && buf[HAS_CRC] != 0 {
        return Ok(None);
    }
    let rest = total - buf.len();
    let mut frame = buf.split();
    frame.advance(HEADER_LEN);
    let mut body = Body {
        msg: h.name,
        buf: frame.freeze(),
    };
    let msg = decode_body(h.kind, &mut body)?;
    Ok(Some((msg, rest)))
}

/// Cursor over a frame body; every read checks the remaining length first,
/// so malformed input becomes an error, never a panic.
struct Body {
    msg: &'static str,
    buf: Bytes,
}

impl Body {
    fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], WireError> {
        let Some(bytes) = self.buf.first_chunk::<N>() else {
            return Err(WireError::Truncated {
                msg: self.msg,
                field,
            });
        };
        let out = *bytes;
        self.buf.advance(N);
        Ok(out)
    }

    fn u8(&mut self, field: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(field)?[0])
    }

    fn u16(&mut self, field: &'static str) -> Result<u16, WireError> {
        Ok(u16::from_le_bytes(self.array(field)?))
    }

    fn u32(&mut self, field: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(field)?))
    }

    fn u64(&mut self, field: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(field)?))
    }

    /// A byte that must be 0 or 1: anything else means the peer and we
    /// disagree about the layout, which is better caught than guessed at.
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(self.invalid(field, v.into())),
        }
    }

    fn string(&mut self, field: &'static str) -> Result<String, WireError> {
        let len = usize::from(self.u16(field)?);
        if len > MAX_STRING {
            return Err(WireError::StringTooLong {
                msg: self.msg,
                field,
                len,
            });
        }
        if self.buf.len() < len {
            return Err(WireError::Truncated {
                msg: self.msg,
                field,
            });
        }
        let bytes = self.buf.split_to(len);
        String::from_utf8(bytes.to_vec()).map_err(|_| WireError::StringNotUtf8 {
            msg: self.msg,
            field,
        })
    }

    fn invalid(&self, field: &'static str, value: u64) -> WireError {
        WireError::InvalidField {
            msg: self.msg,
            field,
            value,
        }
    }
}

fn decode_body(kind: u16, b: &mut Body) -> Result<Message, WireError> {
    Ok(match kind {
        kind::HELLO => Message::Hello {
            version: b.u16("version")?,
            resource: b.string("resource")?,
            node: b.string("node")?,
        },
        kind::AUTH_CHALLENGE => Message::AuthChallenge {
            nonce: b.array("nonce")?,
        },
        kind::AUTH_RESPONSE => Message::AuthResponse {
            mac: b.array("mac")?,
        },
        kind::AUTH_OK => Message::AuthOk,
        kind::AUTH_FAILED => Message::AuthFailed {
            reason: b.string("reason")?,
        },
        kind::REPORT_STATE => {
            let role = b.u8("role")?;
            let role = role_from(role).ok_or_else(|| b.invalid("role", role.into()))?;
            let disk = b.u8("disk")?;
            let disk = disk_from(disk).ok_or_else(|| b.invalid("disk", disk.into()))?;
            let protocol = b.u8("protocol")?;
            let protocol =
                protocol_from(protocol).ok_or_else(|| b.invalid("protocol", protocol.into()))?;
            let discard_my_data = b.bool("discard_my_data")?;
            Message::ReportState(StateReport {
                role,
                disk,
                protocol,
                discard_my_data,
                flags: b.u32("flags")?,
                size: b.u64("size")?,
                current_uuid: b.u64("current_uuid")?,
                bitmap_uuid: b.u64("bitmap_uuid")?,
                history_uuids: [b.u64("history_uuids[0]")?, b.u64("history_uuids[1]")?],
                out_of_sync: b.u64("out_of_sync")?,
            })
        }
        kind::DATA => {
            let seq = b.u64("seq")?;
            let epoch = b.u64("epoch")?;
            let offset = b.u64("offset")?;
            let fua = b.bool("fua")?;
            let has_crc = b.bool("has_crc")?;
            let sent = b.u32("crc")?;
            // The payload is the rest of the body; its size was bounded by
            // the header check.
            let data = std::mem::take(&mut b.buf);
            let crc = if has_crc {
                let computed = data_crc(&data);
                if computed != sent {
                    return Err(WireError::CrcMismatch {
                        seq,
                        offset,
                        sent,
                        computed,
                    });
                }
                Some(sent)
            } else if sent != 0 {
                // A crc the receiver is told to ignore is a sign of a
                // sender bug; keeping the field zero keeps frames canonical.
                return Err(b.invalid("crc (must be 0 without has_crc)", sent.into()));
            } else {
                None
            };
            Message::Data {
                seq,
                epoch,
                offset,
                fua,
                data,
                crc,
            }
        }
        kind::TRIM => Message::Trim {
            seq: b.u64("seq")?,
            epoch: b.u64("epoch")?,
            offset: b.u64("offset")?,
            len: b.u64("len")?,
            zero: b.bool("zero")?,
            may_trim: b.bool("may_trim")?,
            fua: b.bool("fua")?,
        },
        kind::NEW_CURRENT_UUID => Message::NewCurrentUuid {
            uuid: b.u64("uuid")?,
        },
        kind::PROMOTE_REQUEST => Message::PromoteRequest {
            token: b.u64("token")?,
        },
        kind::PROMOTE_REPLY => Message::PromoteReply {
            granted: b.bool("granted")?,
        },
        kind::RECV_ACK => Message::RecvAck { seq: b.u64("seq")? },
        kind::WRITE_ACK => Message::WriteAck { seq: b.u64("seq")? },
        kind::NEG_ACK => Message::NegAck { seq: b.u64("seq")? },
        kind::BARRIER => Message::Barrier {
            epoch: b.u64("epoch")?,
            flush: b.bool("flush")?,
        },
        kind::BARRIER_ACK => Message::BarrierAck {
            epoch: b.u64("epoch")?,
            writes: b.u32("writes")?,
        },
        kind::PING => Message::Ping,
        kind::PING_ACK => Message::PingAck,
        kind::DISCONNECT => Message::Disconnect {
            reason: b.string("reason")?,
        },
        kind::SYNC_START => Message::SyncStart {
            source: b.bool("source")?,
            full: b.bool("full")?,
        },
        kind::SYNC_UUID => Message::SyncUuid {
            uuid: b.u64("uuid")?,
        },
        kind::BITMAP => {
            let n = b.u32("runs")?;
            // The header limit bounds the body, so a count beyond what it
            // can hold is refused before anything is allocated.
            if n as usize > crate::MAX_BITMAP_RUNS || b.buf.len() != 16 * n as usize {
                return Err(b.invalid("runs", n.into()));
            }
            let mut runs = Vec::with_capacity(n as usize);
            for _ in 0..n {
                runs.push((b.u64("run start")?, b.u64("run length")?));
            }
            Message::Bitmap { runs }
        }
        kind::BITMAP_DONE => Message::BitmapDone,
        kind::SYNC_END => Message::SyncEnd,
        kind::RS_REQUEST => Message::RsRequest {
            id: b.u64("id")?,
            offset: b.u64("offset")?,
            len: b.u32("len")?,
        },
        kind::RS_DATA => Message::RsData {
            id: b.u64("id")?,
            offset: b.u64("offset")?,
            data: std::mem::take(&mut b.buf),
        },
        kind::RS_NEG_ACK => Message::RsNegAck { id: b.u64("id")? },
        kind::RS_IN_SYNC => Message::RsInSync {
            id: b.u64("id")?,
            offset: b.u64("offset")?,
            len: b.u32("len")?,
        },
        kind::RS_ACK => Message::RsAck {
            offset: b.u64("offset")?,
            len: b.u32("len")?,
        },
        kind::CSUM_REQUEST => {
            let (id, offset, digests) = digests(b)?;
            Message::CsumRequest {
                id,
                offset,
                digests,
            }
        }
        kind::OV_REQUEST => Message::OvRequest {
            id: b.u64("id")?,
            offset: b.u64("offset")?,
            len: b.u32("len")?,
        },
        kind::OV_REPLY => {
            let (id, offset, digests) = digests(b)?;
            Message::OvReply {
                id,
                offset,
                digests,
            }
        }
        kind::SYNC_PAUSE => Message::SyncPause {
            paused: b.bool("paused")?,
        },
        kind::OV_DONE => Message::OvDone {
            found: b.u64("found")?,
        },
        // parse_header only lets known kinds through.
        other => return Err(WireError::UnknownType(other)),
    })
}

/// `id`, `offset` and a counted list of crc32c digests.
fn digests(b: &mut Body) -> Result<(u64, u64, Vec<u32>), WireError> {
    let id = b.u64("id")?;
    let offset = b.u64("offset")?;
    let n = b.u32("digests")?;
    if n as usize > crate::MAX_RESYNC_BLOCKS || b.buf.len() != 4 * n as usize {
        return Err(b.invalid("digests", n.into()));
    }
    let mut v = Vec::with_capacity(n as usize);
    for _ in 0..n {
        v.push(b.u32("digest")?);
    }
    Ok((id, offset, v))
}

#[cfg(test)]
mod tests {
    /// A head written for a payload sent separately, followed by that
    /// payload, is the same frame `encode` makes.
    #[test]
    fn bulk_head_and_payload_equal_the_whole_frame() {
        let data = Bytes::from((0..70_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        for (whole, empty) in [
            (
                Message::RsData {
                    id: 3,
                    offset: 1 << 30,
                    data: data.clone(),
                },
                Message::RsData {
                    id: 3,
                    offset: 1 << 30,
                    data: Bytes::new(),
                },
            ),
            (
                Message::Data {
                    seq: 9,
                    epoch: 2,
                    offset: 4096,
                    fua: true,
                    crc: None,
                    data: data.clone(),
                },
                Message::Data {
                    seq: 9,
                    epoch: 2,
                    offset: 4096,
                    fua: true,
                    crc: None,
                    data: Bytes::new(),
                },
            ),
        ] {
            let mut a = BytesMut::new();
            encode(&whole, &mut a);
            let mut b = BytesMut::new();
            encode_bulk_head(&empty, data.len(), &mut b);
            b.extend_from_slice(&data);
            assert_eq!(a, b);
            assert_eq!(decode(&mut b).unwrap(), Some(whole));
        }
    }

    use super::*;
    use proptest::prelude::*;

    fn report() -> StateReport {
        StateReport {
            role: WireRole::Primary,
            disk: WireDisk::UpToDate,
            protocol: WireProtocol::C,
            size: 1 << 30,
            current_uuid: 0x1111_2222_3333_4445,
            bitmap_uuid: 0,
            history_uuids: [0xaaaa, 0xbbbb],
            flags: 0x41,
            out_of_sync: 4096 * 3,
            discard_my_data: false,
        }
    }

    /// One of every message, with non-trivial field values.
    fn samples() -> Vec<Message> {
        let data = Bytes::from((0..10_000u32).map(|i| i as u8).collect::<Vec<u8>>());
        vec![
            Message::Hello {
                version: 1,
                resource: "r0".into(),
                node: "alpha".into(),
            },
            Message::AuthChallenge {
                nonce: [7; NONCE_LEN],
            },
            Message::AuthResponse { mac: [9; 32] },
            Message::AuthOk,
            Message::AuthFailed {
                reason: "shared-secret differs".into(),
            },
            Message::ReportState(report()),
            Message::ReportState(StateReport {
                role: WireRole::Secondary,
                disk: WireDisk::Diskless,
                protocol: WireProtocol::A,
                discard_my_data: true,
                ..report()
            }),
            Message::NewCurrentUuid {
                uuid: 0x0123_4567_89ab_cdef,
            },
            Message::PromoteRequest { token: 77 },
            Message::PromoteReply { granted: true },
            Message::PromoteReply { granted: false },
            Message::Data {
                seq: 1,
                epoch: 2,
                offset: 4096,
                fua: true,
                crc: Some(data_crc(&data)),
                data: data.clone(),
            },
            Message::Data {
                seq: u64::MAX,
                epoch: 0,
                offset: 0,
                fua: false,
                data,
                crc: None,
            },
            Message::Data {
                seq: 3,
                epoch: 3,
                offset: 3,
                fua: false,
                data: Bytes::new(),
                crc: None,
            },
            Message::Trim {
                seq: 5,
                epoch: 6,
                offset: 1 << 20,
                len: 1 << 21,
                zero: true,
                may_trim: true,
                fua: false,
            },
            Message::Trim {
                seq: 5,
                epoch: 6,
                offset: 0,
                len: 512,
                zero: false,
                may_trim: false,
                fua: true,
            },
            Message::RecvAck { seq: 10 },
            Message::SyncStart {
                source: true,
                full: false,
            },
            Message::SyncUuid { uuid: 0xfeed },
            Message::Bitmap {
                runs: vec![(0, 1), (7, 1 << 40)],
            },
            Message::Bitmap { runs: vec![] },
            Message::BitmapDone,
            Message::SyncEnd,
            Message::RsRequest {
                id: 9,
                offset: 1 << 20,
                len: 1 << 20,
            },
            Message::RsData {
                id: 9,
                offset: 1 << 20,
                data: Bytes::from(vec![3u8; 8192]),
            },
            Message::RsNegAck { id: 4 },
            Message::RsInSync {
                id: 5,
                offset: 4096,
                len: 8192,
            },
            Message::RsAck {
                offset: 8192,
                len: 4096,
            },
            Message::CsumRequest {
                id: 6,
                offset: 0,
                digests: vec![1, 2, 3],
            },
            Message::OvRequest {
                id: 7,
                offset: 0,
                len: 4096,
            },
            Message::OvReply {
                id: 7,
                offset: 0,
                digests: vec![],
            },
            Message::SyncPause { paused: true },
            Message::OvDone { found: 3 },
            Message::WriteAck { seq: 11 },
            Message::NegAck { seq: 12 },
            Message::Barrier {
                epoch: 13,
                flush: true,
            },
            Message::Barrier {
                epoch: 14,
                flush: false,
            },
            Message::BarrierAck {
                epoch: 13,
                writes: 77,
            },
            Message::Ping,
            Message::PingAck,
            Message::Disconnect {
                reason: "admin requested disconnect ✓".into(),
            },
        ]
    }

    fn roundtrip(msg: &Message) -> Message {
        let mut buf = BytesMut::new();
        encode(msg, &mut buf);
        assert_eq!(buf.len(), HEADER_LEN + body_len(msg));
        let out = decode(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty(), "{} left bytes behind", msg.name());
        out
    }

    #[test]
    fn every_message_round_trips() {
        for msg in samples() {
            assert_eq!(roundtrip(&msg), msg, "{}", msg.name());
        }
    }

    #[test]
    fn every_type_has_a_distinct_code_within_the_global_limit() {
        let mut seen = std::collections::HashSet::new();
        for msg in samples() {
            let k = kind_of(&msg);
            let (name, limit) = kind_info(k).unwrap();
            assert_eq!(name, msg.name());
            assert!(limit <= MAX_BODY);
            seen.insert(k);
        }
        assert_eq!(seen.len(), 34, "samples cover every type");
    }

    #[test]
    fn header_layout_is_little_endian_tndm() {
        let mut buf = BytesMut::new();
        encode(&Message::RecvAck { seq: 0x0102 }, &mut buf);
        assert_eq!(&buf[..4], b"TNDM");
        assert_eq!(
            &buf[..],
            &[b'T', b'N', b'D', b'M', 0x22, 0, 0, 0, 8, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0][..]
        );
    }

    #[test]
    fn several_frames_in_one_buffer_decode_in_order() {
        let mut buf = BytesMut::new();
        for msg in samples() {
            encode(&msg, &mut buf);
        }
        for msg in samples() {
            assert_eq!(decode(&mut buf).unwrap().unwrap(), msg);
        }
        assert!(decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn every_truncated_prefix_needs_more() {
        for msg in samples() {
            let mut full = BytesMut::new();
            encode(&msg, &mut full);
            for cut in 0..full.len() {
                let mut buf = BytesMut::from(&full[..cut]);
                assert!(
                    decode(&mut buf).unwrap().is_none(),
                    "{} cut at {cut}",
                    msg.name()
                );
                assert_eq!(buf.len(), cut, "nothing consumed");
            }
        }
    }

    #[test]
    fn oversized_header_is_rejected_without_allocating() {
        for (kind, len) in [
            (kind::DATA, u32::MAX),
            (kind::DATA, (MAX_BODY + 1) as u32),
            (kind::PING, 1),
        ] {
            let mut buf = BytesMut::with_capacity(HEADER_LEN);
            buf.put_u32_le(MAGIC);
            buf.put_u16_le(kind);
            buf.put_u16_le(0);
            buf.put_u32_le(len);
            let cap = buf.capacity();
            let err = decode(&mut buf).unwrap_err();
            assert!(matches!(err, WireError::FrameTooLarge { .. }), "{err}");
            assert!(err.to_string().contains("too large"), "{err}");
            assert_eq!(buf.capacity(), cap, "no allocation for the announced body");
        }
        // The largest legal Data body passes the header check.
        let mut buf = BytesMut::new();
        buf.put_u32_le(MAGIC);
        buf.put_u16_le(kind::DATA);
        buf.put_u16_le(0);
        buf.put_u32_le((DATA_FIXED + MAX_DATA) as u32);
        assert!(decode(&mut buf).unwrap().is_none());
    }

    #[test]
    fn crc_mismatch_is_detected() {
        let data = Bytes::from_static(b"replicated block contents");
        let msg = Message::Data {
            seq: 42,
            epoch: 1,
            offset: 8192,
            fua: false,
            crc: Some(data_crc(&data)),
            data,
        };
        let mut buf = BytesMut::new();
        encode(&msg, &mut buf);
        let last = buf.len() - 1;
        buf[last] ^= 0x01;
        let err = decode(&mut buf).unwrap_err();
        match err {
            WireError::CrcMismatch {
                seq: 42,
                offset: 8192,
                ..
            } => {}
            other => panic!("expected CrcMismatch, got {other}"),
        }
    }

    #[test]
    fn header_errors_name_the_problem() {
        let frame = |magic: u32, kind: u16, flags: u16, len: u32| {
            let mut b = BytesMut::new();
            b.put_u32_le(magic);
            b.put_u16_le(kind);
            b.put_u16_le(flags);
            b.put_u32_le(len);
            b
        };
        let err = decode(&mut frame(0xdead_beef, kind::PING, 0, 0)).unwrap_err();
        assert!(
            matches!(err, WireError::BadMagic { found: 0xdead_beef }),
            "{err}"
        );
        let err = decode(&mut frame(MAGIC, 0x7777, 0, 0)).unwrap_err();
        assert!(matches!(err, WireError::UnknownType(0x7777)), "{err}");
        assert_eq!(err.to_string(), "unknown frame type 0x7777");
        let err = decode(&mut frame(MAGIC, kind::PING, 0x8000, 0)).unwrap_err();
        assert!(
            matches!(err, WireError::ReservedFlags { flags: 0x8000, .. }),
            "{err}"
        );
    }

    #[test]
    fn body_errors_name_the_field() {
        let with_body = |kind: u16, body: &[u8]| {
            let mut b = BytesMut::new();
            b.put_u32_le(MAGIC);
            b.put_u16_le(kind);
            b.put_u16_le(0);
            b.put_u32_le(body.len() as u32);
            b.put_slice(body);
            b
        };
        // A body shorter than its fields.
        let err = decode(&mut with_body(kind::BARRIER_ACK, &[0; 8])).unwrap_err();
        assert_eq!(
            err.to_string(),
            "truncated body of BarrierAck frame: it ends before writes"
        );
        // A boolean that is neither 0 nor 1.
        let mut body = vec![0; 8];
        body.push(2);
        let err = decode(&mut with_body(kind::BARRIER, &body)).unwrap_err();
        assert_eq!(err.to_string(), "invalid flush in Barrier frame: 2");
        // Unknown enum values in a state report.
        let mut good = BytesMut::new();
        encode(&Message::ReportState(report()), &mut good);
        for (at, field) in [
            (HEADER_LEN, "role"),
            (HEADER_LEN + 1, "disk"),
            (HEADER_LEN + 2, "protocol"),
        ] {
            let mut bad = good.clone();
            bad[at] = 0;
            let err = decode(&mut bad).unwrap_err();
            assert!(
                matches!(err, WireError::InvalidField { field: f, value: 0, .. } if f == field),
                "{err}"
            );
        }
        // Strings: too long, not UTF-8, longer than the body, trailing bytes.
        let err = decode(&mut with_body(kind::DISCONNECT, &5000u16.to_le_bytes())).unwrap_err();
        assert!(
            matches!(err, WireError::StringTooLong { len: 5000, .. }),
            "{err}"
        );
        let err = decode(&mut with_body(kind::DISCONNECT, &[2, 0, 0xff, 0xfe])).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::StringNotUtf8 {
                    field: "reason",
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(&mut with_body(kind::DISCONNECT, &[3, 0, b'a'])).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::Truncated {
                    field: "reason",
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(&mut with_body(kind::DISCONNECT, &[1, 0, b'a', b'b'])).unwrap_err();
        assert!(
            matches!(err, WireError::TrailingBytes { extra: 1, .. }),
            "{err}"
        );
        // A crc without has_crc.
        let mut body = vec![0; 26];
        body.extend_from_slice(&[1, 0, 0, 0]);
        let err = decode(&mut with_body(kind::DATA, &body)).unwrap_err();
        assert!(
            matches!(
                err,
                WireError::InvalidField {
                    msg: "Data",
                    value: 1,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn a_newer_hello_with_extra_fields_still_decodes() {
        // A later version may append to Hello; this one must still read the
        // version so it can refuse the peer with a clear message.
        let mut body = Vec::new();
        body.extend_from_slice(&2u16.to_le_bytes());
        body.extend_from_slice(&[2, 0, b'r', b'0', 4, 0, b'b', b'e', b't', b'a']);
        body.extend_from_slice(b"future fields");
        let mut b = BytesMut::new();
        b.put_u32_le(MAGIC);
        b.put_u16_le(kind::HELLO);
        b.put_u16_le(0);
        b.put_u32_le(body.len() as u32);
        b.put_slice(&body);
        let msg = decode(&mut b).unwrap().unwrap();
        assert_eq!(
            msg,
            Message::Hello {
                version: 2,
                resource: "r0".into(),
                node: "beta".into()
            }
        );
        assert!(b.is_empty());
    }

    #[test]
    fn long_strings_are_clipped_at_a_char_boundary() {
        // 'é' is two bytes, so 4097 bytes of "xé..." must clip to 4095.
        let long = format!("x{}", "é".repeat(2048));
        assert_eq!(long.len(), 4097);
        let out = roundtrip(&Message::Disconnect {
            reason: long.clone(),
        });
        let Message::Disconnect { reason } = out else {
            panic!("wrong type")
        };
        assert_eq!(reason.len(), 4095);
        assert!(long.starts_with(&reason));
    }

    #[test]
    #[should_panic(expected = "exceeds MAX_DATA")]
    fn encoding_an_oversized_payload_panics_at_the_source() {
        let data = Bytes::from(vec![0; MAX_DATA + 1]);
        encode(
            &Message::Data {
                seq: 0,
                epoch: 0,
                offset: 0,
                fua: false,
                data,
                crc: None,
            },
            &mut BytesMut::new(),
        );
    }

    // --- properties

    fn arb_string() -> impl Strategy<Value = String> {
        prop_oneof![
            ".{0,24}",
            "[a-z0-9-]{0,64}",
            ".{4090,4100}".prop_map(|s| clip(&s).to_owned())
        ]
    }

    fn arb_report() -> impl Strategy<Value = StateReport> {
        (
            prop_oneof![Just(WireRole::Primary), Just(WireRole::Secondary)],
            prop_oneof![
                Just(WireDisk::Diskless),
                Just(WireDisk::Inconsistent),
                Just(WireDisk::Outdated),
                Just(WireDisk::Consistent),
                Just(WireDisk::UpToDate)
            ],
            prop_oneof![
                Just(WireProtocol::A),
                Just(WireProtocol::B),
                Just(WireProtocol::C)
            ],
            any::<[u64; 6]>(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(
                |(role, disk, protocol, n, flags, discard_my_data)| StateReport {
                    role,
                    disk,
                    protocol,
                    size: n[0],
                    current_uuid: n[1],
                    bitmap_uuid: n[2],
                    history_uuids: [n[3], n[4]],
                    flags,
                    out_of_sync: n[5],
                    discard_my_data,
                },
            )
    }

    pub(crate) fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            (any::<u16>(), arb_string(), arb_string()).prop_map(|(version, resource, node)| {
                Message::Hello {
                    version,
                    resource,
                    node,
                }
            }),
            any::<[u8; NONCE_LEN]>().prop_map(|nonce| Message::AuthChallenge { nonce }),
            any::<[u8; 32]>().prop_map(|mac| Message::AuthResponse { mac }),
            Just(Message::AuthOk),
            arb_string().prop_map(|reason| Message::AuthFailed { reason }),
            arb_report().prop_map(Message::ReportState),
            any::<u64>().prop_map(|uuid| Message::NewCurrentUuid { uuid }),
            any::<u64>().prop_map(|token| Message::PromoteRequest { token }),
            any::<bool>().prop_map(|granted| Message::PromoteReply { granted }),
            (
                any::<[u64; 3]>(),
                any::<bool>(),
                proptest::collection::vec(any::<u8>(), 0..2048),
                any::<bool>()
            )
                .prop_map(|(n, fua, data, with_crc)| {
                    let crc = with_crc.then(|| data_crc(&data));
                    Message::Data {
                        seq: n[0],
                        epoch: n[1],
                        offset: n[2],
                        fua,
                        data: data.into(),
                        crc,
                    }
                }),
            (any::<[u64; 4]>(), any::<[bool; 3]>()).prop_map(|(n, b)| Message::Trim {
                seq: n[0],
                epoch: n[1],
                offset: n[2],
                len: n[3],
                zero: b[0],
                may_trim: b[1],
                fua: b[2]
            }),
            any::<u64>().prop_map(|seq| Message::RecvAck { seq }),
            any::<u64>().prop_map(|seq| Message::WriteAck { seq }),
            any::<u64>().prop_map(|seq| Message::NegAck { seq }),
            (any::<u64>(), any::<bool>())
                .prop_map(|(epoch, flush)| Message::Barrier { epoch, flush }),
            (any::<u64>(), any::<u32>())
                .prop_map(|(epoch, writes)| Message::BarrierAck { epoch, writes }),
            Just(Message::Ping),
            Just(Message::PingAck),
            arb_string().prop_map(|reason| Message::Disconnect { reason }),
        ]
    }

    /// Bytes that mostly start like a frame, so the fuzzing reaches the
    /// body decoders instead of dying at the magic check.
    fn arb_garbage() -> impl Strategy<Value = Vec<u8>> {
        let framed = (
            prop_oneof![(0u16..0x40), any::<u16>()],
            prop_oneof![Just(0u16), any::<u16>()],
            proptest::collection::vec(any::<u8>(), 0..300),
            prop_oneof![Just(None), Just(Some(u32::MAX)), (0u32..400).prop_map(Some)],
        )
            .prop_map(|(kind, flags, body, len)| {
                let mut v = Vec::new();
                v.extend_from_slice(&MAGIC.to_le_bytes());
                v.extend_from_slice(&kind.to_le_bytes());
                v.extend_from_slice(&flags.to_le_bytes());
                v.extend_from_slice(&len.unwrap_or(body.len() as u32).to_le_bytes());
                v.extend_from_slice(&body);
                v
            });
        prop_oneof![proptest::collection::vec(any::<u8>(), 0..300), framed]
    }

    proptest! {
        #[test]
        fn arbitrary_messages_round_trip(msgs in proptest::collection::vec(arb_message(), 1..6)) {
            let mut buf = BytesMut::new();
            for m in &msgs {
                encode(m, &mut buf);
            }
            for m in &msgs {
                prop_assert_eq!(&decode(&mut buf).unwrap().unwrap(), m);
            }
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn truncated_arbitrary_messages_need_more(msg in arb_message(), cut in any::<prop::sample::Index>()) {
            let mut full = BytesMut::new();
            encode(&msg, &mut full);
            let cut = cut.index(full.len());
            let mut buf = BytesMut::from(&full[..cut]);
            prop_assert!(decode(&mut buf).unwrap().is_none());
            prop_assert_eq!(buf.len(), cut);
        }

        #[test]
        fn garbage_never_panics(bytes in arb_garbage()) {
            let mut buf = BytesMut::from(&bytes[..]);
            // Each Ok(Some) consumes at least a header, so this ends.
            while let Ok(Some(_)) = decode(&mut buf) {}
        }

        #[test]
        fn corrupted_frames_never_panic(msg in arb_message(), at in any::<prop::sample::Index>(), xor in 1u8..) {
            let mut buf = BytesMut::new();
            encode(&msg, &mut buf);
            let at = at.index(buf.len());
            buf[at] ^= xor;
            while let Ok(Some(_)) = decode(&mut buf) {}
        }
    }
}
