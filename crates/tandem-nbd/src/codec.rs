//! Transmission phase: request decoding, validation against the export, and
//! reply encoding. Pure code over byte buffers, so it can be fuzzed and
//! property-tested without sockets.

use crate::proto::{self, cflags, chunk, cmd, tflags, Errno};
use bytes::{Buf, BufMut, Bytes, BytesMut};
use tandem_blockdev::{Extent, ZeroFlags};

/// Size of a request header on the wire.
pub const REQUEST_HEADER_LEN: usize = 28;

/// A request header as sent by the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags.
    pub flags: u16,
    /// Command type.
    pub typ: u16,
    /// Opaque cookie echoed in the reply.
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (payload length for WRITE).
    pub length: u32,
}

/// One decoded unit of the request stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// A complete request; `payload` is present for WRITE only.
    Request {
        /// The header.
        header: RequestHeader,
        /// WRITE data.
        payload: Option<Bytes>,
    },
    /// A WRITE whose payload exceeded the limit; the payload has been read
    /// and discarded so the stream stays in sync. Answer with `EINVAL`.
    Oversized(RequestHeader),
    /// A large WRITE ([`Decoder::set_bulk`]) whose payload has only begun
    /// to arrive: `head` is what the buffer held of it, and the caller
    /// takes the next `rest` bytes from the socket itself (or puts `raw`
    /// and `head` back in the buffer, calls [`Decoder::skip_bulk_once`],
    /// and decodes again).
    Bulk {
        /// The header.
        header: RequestHeader,
        /// The header as it arrived.
        raw: [u8; REQUEST_HEADER_LEN],
        /// The start of the payload.
        head: Bytes,
        /// Payload bytes still in the socket.
        rest: usize,
    },
}

/// The request stream is unusable; the connection must close.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The header did not start with the request magic.
    #[error("bad request magic {0:#010x}")]
    BadMagic(u32),
}

/// Incremental request decoder.
#[derive(Debug)]
pub struct Decoder {
    max_payload: u32,
    /// An oversized WRITE whose payload is still being discarded.
    discarding: Option<(RequestHeader, u64)>,
    /// WRITE payloads in this range come out as [`Frame::Bulk`] once their
    /// header is in; empty: never.
    bulk: std::ops::RangeInclusive<usize>,
    /// The next WRITE is decoded whole, whatever its size.
    skip_bulk: bool,
}

impl Decoder {
    /// A decoder that accepts WRITE payloads up to `max_payload` bytes.
    pub fn new(max_payload: u32) -> Self {
        Self {
            max_payload,
            discarding: None,
            #[allow(clippy::reversed_empty_ranges)]
            bulk: 1..=0,
            skip_bulk: false,
        }
    }

    /// Hand out WRITEs of `sizes` bytes as [`Frame::Bulk`] as soon as
    /// their header is in, unless their whole payload is buffered already.
    pub fn set_bulk(&mut self, sizes: std::ops::RangeInclusive<usize>) {
        self.bulk = sizes;
    }

    /// Decode the next WRITE whole: its [`Frame::Bulk`] was put back.
    pub fn skip_bulk_once(&mut self) {
        self.skip_bulk = true;
    }

    /// Bytes of `buf` needed before the next frame can be decoded (a hint
    /// for buffer sizing; 0 when a frame may already be complete).
    pub fn wanted(&self, buf: &BytesMut) -> usize {
        if self.discarding.is_some() || buf.len() < REQUEST_HEADER_LEN {
            return 0;
        }
        let typ = u16::from_be_bytes([buf[6], buf[7]]);
        let len = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
        if typ == cmd::WRITE && len <= self.max_payload {
            (REQUEST_HEADER_LEN + len as usize).saturating_sub(buf.len())
        } else {
            0
        }
    }

    /// Decode the next frame from `buf`, consuming its bytes; `Ok(None)`
    /// means more input is needed.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if let Some((header, remaining)) = self.discarding {
            let n = remaining.min(buf.len() as u64);
            buf.advance(n as usize);
            if n < remaining {
                self.discarding = Some((header, remaining - n));
                return Ok(None);
            }
            self.discarding = None;
            return Ok(Some(Frame::Oversized(header)));
        }
        if buf.len() < REQUEST_HEADER_LEN {
            return Ok(None);
        }
        let mut h = &buf[..REQUEST_HEADER_LEN];
        let magic = h.get_u32();
        if magic != proto::REQUEST_MAGIC {
            return Err(DecodeError::BadMagic(magic));
        }
        let header = RequestHeader {
            flags: h.get_u16(),
            typ: h.get_u16(),
            cookie: h.get_u64(),
            offset: h.get_u64(),
            length: h.get_u32(),
        };
        if header.typ != cmd::WRITE {
            buf.advance(REQUEST_HEADER_LEN);
            return Ok(Some(Frame::Request {
                header,
                payload: None,
            }));
        }
        if header.length > self.max_payload {
            buf.advance(REQUEST_HEADER_LEN);
            self.discarding = Some((header, header.length as u64));
            return self.decode(buf);
        }
        let total = REQUEST_HEADER_LEN + header.length as usize;
        if buf.len() < total {
            if !self.skip_bulk && self.bulk.contains(&(header.length as usize)) {
                let mut raw = [0; REQUEST_HEADER_LEN];
                raw.copy_from_slice(&buf[..REQUEST_HEADER_LEN]);
                buf.advance(REQUEST_HEADER_LEN);
                let head = buf.split().freeze();
                let rest = header.length as usize - head.len();
                return Ok(Some(Frame::Bulk {
                    header,
                    raw,
                    head,
                    rest,
                }));
            }
            buf.reserve(total - buf.len());
            return Ok(None);
        }
        self.skip_bulk = false;
        buf.advance(REQUEST_HEADER_LEN);
        let payload = buf.split_to(header.length as usize).freeze();
        Ok(Some(Frame::Request {
            header,
            payload: Some(payload),
        }))
    }
}

/// What the transmission phase negotiated that validation depends on.
#[derive(Clone, Copy, Debug)]
pub struct Session {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags advertised.
    pub transmission_flags: u16,
    /// Structured replies negotiated.
    pub structured: bool,
    /// `base:allocation` selected.
    pub base_allocation: bool,
    /// Largest READ/WRITE payload.
    pub max_payload: u32,
}

/// A request that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Read `length` bytes.
    Read { offset: u64, length: u32 },
    /// Write `data`.
    Write { offset: u64, data: Bytes, fua: bool },
    /// Flush.
    Flush,
    /// Trim.
    Trim { offset: u64, length: u32, fua: bool },
    /// Write zeroes.
    WriteZeroes {
        offset: u64,
        length: u32,
        flags: ZeroFlags,
    },
    /// Prefetch.
    Cache { offset: u64, length: u32 },
    /// Block status of `base:allocation`.
    BlockStatus {
        offset: u64,
        length: u32,
        req_one: bool,
    },
    /// Soft disconnect.
    Disconnect,
}

impl Session {
    fn has(&self, flag: u16) -> bool {
        self.transmission_flags & flag != 0
    }

    /// Check a request against the export and the negotiated features.
    /// The errors are the spec's: EINVAL for bad flags, unknown commands and
    /// out-of-range reads, ENOSPC for writes past the end, EPERM for
    /// modifications of a read-only export.
    pub fn validate(&self, header: &RequestHeader, payload: Option<Bytes>) -> Result<Op, Errno> {
        let RequestHeader {
            flags,
            typ,
            offset,
            length,
            ..
        } = *header;
        // Modifying a read-only export is EPERM whatever else is wrong with
        // the request, so clients see the one error that explains it.
        let modifying = matches!(typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
        if modifying && self.has(tflags::READ_ONLY) {
            return Err(Errno::Perm);
        }
        // The spec makes FUA valid on every command, advertised or not (a
        // read-only export has nothing to make durable, yet clients may still
        // set it); other flags only where the spec lists them.
        let allowed = cflags::FUA
            | match typ {
                cmd::READ if self.structured && self.has(tflags::SEND_DF) => cflags::DF,
                cmd::WRITE_ZEROES if self.has(tflags::SEND_FAST_ZERO) => {
                    cflags::NO_HOLE | cflags::FAST_ZERO
                }
                cmd::WRITE_ZEROES => cflags::NO_HOLE,
                cmd::BLOCK_STATUS => cflags::REQ_ONE,
                _ => 0,
            };
        if flags & !allowed != 0 {
            return Err(Errno::Inval);
        }
        let fua = flags & cflags::FUA != 0;
        let in_range = offset
            .checked_add(length as u64)
            .is_some_and(|end| end <= self.size);
        let range = |past_end: Errno| if in_range { Ok(()) } else { Err(past_end) };
        match typ {
            cmd::READ => {
                range(Errno::Inval)?;
                if length > self.max_payload {
                    return Err(Errno::Inval);
                }
                Ok(Op::Read { offset, length })
            }
            cmd::WRITE => {
                range(Errno::NoSpc)?;
                Ok(Op::Write {
                    offset,
                    data: payload.unwrap_or_default(),
                    fua,
                })
            }
            cmd::DISC => Ok(Op::Disconnect),
            cmd::FLUSH => Ok(Op::Flush),
            cmd::TRIM if self.has(tflags::SEND_TRIM) => {
                range(Errno::Inval)?;
                Ok(Op::Trim {
                    offset,
                    length,
                    fua,
                })
            }
            cmd::WRITE_ZEROES if self.has(tflags::SEND_WRITE_ZEROES) => {
                range(Errno::NoSpc)?;
                Ok(Op::WriteZeroes {
                    offset,
                    length,
                    flags: ZeroFlags {
                        may_trim: flags & cflags::NO_HOLE == 0,
                        fast_only: flags & cflags::FAST_ZERO != 0,
                        fua,
                    },
                })
            }
            // Some clients send CACHE without it being advertised; it is only
            // a hint, so serve it whenever the range is valid.
            cmd::CACHE => {
                range(Errno::Inval)?;
                Ok(Op::Cache { offset, length })
            }
            cmd::BLOCK_STATUS if self.base_allocation => {
                range(Errno::Inval)?;
                if length == 0 {
                    return Err(Errno::Inval);
                }
                Ok(Op::BlockStatus {
                    offset,
                    length,
                    req_one: flags & cflags::REQ_ONE != 0,
                })
            }
            _ => Err(Errno::Inval),
        }
    }
}

/// Outcome of one operation, ready to be encoded.
#[derive(Debug)]
pub enum Outcome {
    /// Success without data.
    Done,
    /// READ data.
    Data { offset: u64, data: Bytes },
    /// BLOCK_STATUS descriptors.
    Extents(Vec<Extent>),
    /// Failure.
    Error(Errno),
}

/// Encode the reply to the request with `cookie`.
pub fn encode_reply(
    buf: &mut BytesMut,
    structured: bool,
    cookie: u64,
    outcome: Outcome,
) -> Option<Bytes> {
    if !structured {
        let (error, data) = match outcome {
            Outcome::Done | Outcome::Extents(_) => (0, None),
            Outcome::Data { data, .. } => (0, Some(data)),
            Outcome::Error(e) => (e as u32, None),
        };
        buf.put_u32(proto::SIMPLE_REPLY_MAGIC);
        buf.put_u32(error);
        buf.put_u64(cookie);
        return data;
    }
    let chunk_header = |buf: &mut BytesMut, flags: u16, typ: u16, len: u32| {
        buf.put_u32(proto::STRUCTURED_REPLY_MAGIC);
        buf.put_u16(flags);
        buf.put_u16(typ);
        buf.put_u64(cookie);
        buf.put_u32(len);
    };
    match outcome {
        Outcome::Done => chunk_header(buf, chunk::FLAG_DONE, chunk::NONE, 0),
        // A content chunk must describe at least one byte: an empty read
        // is answered with NONE.
        Outcome::Data { data, .. } if data.is_empty() => {
            chunk_header(buf, chunk::FLAG_DONE, chunk::NONE, 0)
        }
        Outcome::Data { offset, data } => {
            // The chunk length field is 32 bits; payloads are capped far below.
            chunk_header(
                buf,
                chunk::FLAG_DONE,
                chunk::OFFSET_DATA,
                8 + data.len() as u32,
            );
            buf.put_u64(offset);
            return Some(data);
        }
        Outcome::Extents(extents) => {
            chunk_header(
                buf,
                chunk::FLAG_DONE,
                chunk::BLOCK_STATUS,
                4 + 8 * extents.len() as u32,
            );
            buf.put_u32(proto::BASE_ALLOCATION_ID);
            for e in extents {
                // Callers cap each extent at the request length (a u32).
                buf.put_u32(e.length.min(u32::MAX as u64) as u32);
                let mut flags = 0;
                if e.hole {
                    flags |= proto::state::HOLE;
                }
                if e.zero {
                    flags |= proto::state::ZERO;
                }
                buf.put_u32(flags);
            }
        }
        Outcome::Error(e) => {
            chunk_header(buf, chunk::FLAG_DONE, chunk::ERROR, 6);
            buf.put_u32(e as u32);
            buf.put_u16(0);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn header_bytes(h: &RequestHeader) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(proto::REQUEST_MAGIC);
        v.put_u16(h.flags);
        v.put_u16(h.typ);
        v.put_u64(h.cookie);
        v.put_u64(h.offset);
        v.put_u32(h.length);
        v
    }

    fn session() -> Session {
        Session {
            size: 1 << 20,
            transmission_flags: tflags::HAS_FLAGS
                | tflags::SEND_FLUSH
                | tflags::SEND_FUA
                | tflags::SEND_TRIM
                | tflags::SEND_WRITE_ZEROES
                | tflags::SEND_FAST_ZERO
                | tflags::SEND_DF
                | tflags::SEND_CACHE,
            structured: true,
            base_allocation: true,
            max_payload: 4096,
        }
    }

    fn hdr(typ: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader {
            flags,
            typ,
            cookie: 9,
            offset,
            length,
        }
    }

    #[test]
    fn validation_errors_follow_the_spec() {
        let s = session();
        let v = |h: RequestHeader| s.validate(&h, None);
        assert_eq!(v(hdr(cmd::READ, 0, (1 << 20) - 1, 2)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::READ, 0, u64::MAX, 2)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::WRITE, 0, 1 << 20, 1)), Err(Errno::NoSpc));
        assert_eq!(v(hdr(cmd::TRIM, 0, 1 << 20, 1)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::WRITE_ZEROES, 0, 1 << 20, 1)), Err(Errno::NoSpc));
        assert_eq!(v(hdr(cmd::BLOCK_STATUS, 0, 0, 0)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::READ, cflags::NO_HOLE, 0, 1)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::WRITE, cflags::REQ_ONE, 0, 1)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::READ, 1 << 15, 0, 1)), Err(Errno::Inval));
        assert_eq!(v(hdr(99, 0, 0, 0)), Err(Errno::Inval));
        assert_eq!(v(hdr(cmd::READ, 0, 0, 4097)), Err(Errno::Inval));
        assert_eq!(
            v(hdr(cmd::READ, cflags::FUA, 0, 0)),
            Ok(Op::Read {
                offset: 0,
                length: 0
            })
        );
        assert!(v(hdr(cmd::READ, cflags::DF, 0, 1)).is_ok());
        assert!(v(hdr(cmd::TRIM, 0, 0, 0)).is_ok());
        assert_eq!(
            v(hdr(
                cmd::WRITE_ZEROES,
                cflags::NO_HOLE | cflags::FAST_ZERO,
                0,
                8
            )),
            Ok(Op::WriteZeroes {
                offset: 0,
                length: 8,
                flags: ZeroFlags {
                    may_trim: false,
                    fast_only: true,
                    fua: false
                }
            })
        );
        let ro = Session {
            transmission_flags: tflags::HAS_FLAGS | tflags::READ_ONLY,
            structured: false,
            base_allocation: false,
            ..s
        };
        assert_eq!(
            ro.validate(&hdr(cmd::WRITE, 0, 0, 1), None),
            Err(Errno::Perm)
        );
        assert_eq!(
            ro.validate(&hdr(cmd::TRIM, 0, 0, 1), None),
            Err(Errno::Perm)
        );
        assert_eq!(
            ro.validate(&hdr(cmd::WRITE, cflags::FUA, 0, 1), None),
            Err(Errno::Perm)
        );
        assert_eq!(
            ro.validate(&hdr(cmd::READ, cflags::FUA, 0, 1), None),
            Ok(Op::Read {
                offset: 0,
                length: 1
            })
        );
        // DF without structured replies, block status without a context.
        assert_eq!(
            ro.validate(&hdr(cmd::READ, cflags::DF, 0, 1), None),
            Err(Errno::Inval)
        );
        assert_eq!(
            ro.validate(&hdr(cmd::BLOCK_STATUS, 0, 0, 1), None),
            Err(Errno::Inval)
        );
    }

    #[test]
    fn decoder_waits_for_payload_and_discards_oversized() {
        let mut d = Decoder::new(16);
        let mut buf = BytesMut::new();
        let w = hdr(cmd::WRITE, 0, 0, 8);
        buf.extend_from_slice(&header_bytes(&w));
        assert_eq!(d.decode(&mut buf), Ok(None));
        assert_eq!(d.wanted(&buf), 8);
        buf.extend_from_slice(b"abcdefgh");
        assert_eq!(
            d.decode(&mut buf),
            Ok(Some(Frame::Request {
                header: w,
                payload: Some(Bytes::from_static(b"abcdefgh"))
            }))
        );
        let big = hdr(cmd::WRITE, 0, 0, 40);
        buf.extend_from_slice(&header_bytes(&big));
        buf.extend_from_slice(&[1; 30]);
        assert_eq!(d.decode(&mut buf), Ok(None));
        buf.extend_from_slice(&[1; 10]);
        let r = hdr(cmd::READ, 0, 0, 1);
        buf.extend_from_slice(&header_bytes(&r));
        assert_eq!(d.decode(&mut buf), Ok(Some(Frame::Oversized(big))));
        assert_eq!(
            d.decode(&mut buf),
            Ok(Some(Frame::Request {
                header: r,
                payload: None
            }))
        );
        assert!(buf.is_empty());
        buf.extend_from_slice(&[0u8; 28]);
        assert_eq!(d.decode(&mut buf), Err(DecodeError::BadMagic(0)));
    }

    #[test]
    fn structured_reply_layouts() {
        let mut buf = BytesMut::new();
        let data = encode_reply(
            &mut buf,
            true,
            7,
            Outcome::Data {
                offset: 512,
                data: Bytes::from_static(b"xy"),
            },
        );
        assert_eq!(data.as_deref(), Some(&b"xy"[..]));
        let mut b = buf.split().freeze();
        assert_eq!(b.get_u32(), proto::STRUCTURED_REPLY_MAGIC);
        assert_eq!(b.get_u16(), chunk::FLAG_DONE);
        assert_eq!(b.get_u16(), chunk::OFFSET_DATA);
        assert_eq!(b.get_u64(), 7);
        assert_eq!(b.get_u32(), 10);
        assert_eq!(b.get_u64(), 512);

        encode_reply(&mut buf, true, 8, Outcome::Error(Errno::NoSpc));
        let mut b = buf.split().freeze();
        b.advance(4 + 2);
        assert_eq!(b.get_u16(), chunk::ERROR);
        b.advance(8);
        assert_eq!(b.get_u32(), 6);
        assert_eq!(b.get_u32(), 28);

        encode_reply(
            &mut buf,
            true,
            9,
            Outcome::Extents(vec![Extent {
                length: 4096,
                hole: true,
                zero: true,
            }]),
        );
        let mut b = buf.split().freeze();
        b.advance(6);
        assert_eq!(b.get_u16(), chunk::BLOCK_STATUS);
        b.advance(8);
        assert_eq!(b.get_u32(), 12);
        assert_eq!(b.get_u32(), proto::BASE_ALLOCATION_ID);
        assert_eq!(b.get_u32(), 4096);
        assert_eq!(b.get_u32(), 3);

        let data = encode_reply(&mut buf, false, 10, Outcome::Error(Errno::Inval));
        assert!(data.is_none());
        assert_eq!(
            &buf[..],
            &[0x67, 0x44, 0x66, 0x98, 0, 0, 0, 22, 0, 0, 0, 0, 0, 0, 0, 10]
        );
    }

    proptest! {
        /// Any header round-trips through the decoder, whatever the split
        /// points of the byte stream.
        #[test]
        fn decode_round_trip(
            reqs in proptest::collection::vec((any::<u16>(), 0u16..10, any::<u64>(), any::<u64>(), 0u32..64), 1..20),
            split in 1usize..64,
        ) {
            let mut stream = Vec::new();
            let mut expected = Vec::new();
            for (flags, typ, cookie, offset, length) in reqs {
                let h = RequestHeader { flags, typ, cookie, offset, length };
                stream.extend(header_bytes(&h));
                if typ == cmd::WRITE {
                    let payload: Vec<u8> = (0..length).map(|i| i as u8).collect();
                    stream.extend(&payload);
                    if length > 32 {
                        expected.push(Frame::Oversized(h));
                    } else {
                        expected.push(Frame::Request { header: h, payload: Some(Bytes::from(payload)) });
                    }
                } else {
                    expected.push(Frame::Request { header: h, payload: None });
                }
            }
            let mut d = Decoder::new(32);
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            for piece in stream.chunks(split) {
                buf.extend_from_slice(piece);
                while let Some(f) = d.decode(&mut buf).unwrap() {
                    got.push(f);
                }
            }
            prop_assert_eq!(got, expected);
            prop_assert!(buf.is_empty());
        }

        /// Validation never panics and never accepts an out-of-range request.
        #[test]
        fn validate_total(flags in any::<u16>(), typ in any::<u16>(), offset in any::<u64>(), length in any::<u32>()) {
            let s = session();
            let h = RequestHeader { flags, typ, cookie: 0, offset, length };
            if let Ok(op) = s.validate(&h, None) {
                let range = match op {
                    Op::Read { offset, length } | Op::Trim { offset, length, .. }
                    | Op::WriteZeroes { offset, length, .. } | Op::Cache { offset, length }
                    | Op::BlockStatus { offset, length, .. } => Some((offset, length as u64)),
                    Op::Write { offset, .. } => Some((offset, length as u64)),
                    Op::Flush | Op::Disconnect => None,
                };
                if let Some((o, l)) = range {
                    prop_assert!(o.checked_add(l).is_some_and(|e| e <= s.size));
                }
            }
        }
    }
}
