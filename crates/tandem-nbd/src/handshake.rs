//! The fixed-newstyle handshake as a sans-IO state machine.
//!
//! The server feeds whatever bytes arrived into [`Handshake::feed`] and sends
//! whatever it appended to `out`. Keeping the option parser free of sockets
//! lets the fuzzer and the unit tests drive it with arbitrary byte streams.

use crate::proto::{self, client_flags, handshake_flags, info, opt, rep, tflags};
use bytes::{Buf, BufMut, BytesMut};
use tandem_blockdev::Capabilities;

/// The export as the handshake advertises it.
#[derive(Clone, Debug)]
pub struct Export {
    /// Canonical name; the empty name always selects this export too.
    pub name: String,
    /// Free text for `NBD_INFO_DESCRIPTION` and `NBD_OPT_LIST`.
    pub description: Option<String>,
    /// Size in bytes.
    pub size: u64,
    /// What the device supports.
    pub caps: Capabilities,
    /// When set, the export exists but is refused with this reason
    /// (NBD_REP_ERR_POLICY): a replicated device on its Secondary node.
    pub unavailable: Option<String>,
}

/// Largest option payload we buffer; longer options are skipped and refused
/// with `NBD_REP_ERR_TOO_BIG`. Names are at most 4096 bytes by the spec, so
/// this leaves ample room for meta-context queries.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;

/// Most meta-context queries we look at in one option.
const MAX_QUERIES: u32 = 128;

/// What the client and server agreed on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Structured replies are in use.
    pub structured: bool,
    /// `base:allocation` was selected for this export (context id
    /// [`proto::BASE_ALLOCATION_ID`]).
    pub base_allocation: bool,
    /// Transmission flags sent to the client.
    pub transmission_flags: u16,
}

/// Progress of the handshake after a `feed`.
#[derive(Debug, PartialEq, Eq)]
pub enum Progress {
    /// More input is needed.
    NeedMore,
    /// Negotiation finished; transmission starts with the bytes left in the input.
    Done(Negotiated),
    /// The client sent NBD_OPT_ABORT; close after sending `out`.
    Aborted,
}

/// Why the handshake ended the connection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandshakeError {
    /// The client set flags we do not know or did not offer.
    #[error("client sent unknown or unoffered flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Only fixed newstyle is spoken.
    #[error("client does not speak fixed newstyle negotiation (flags {0:#x})")]
    NotFixedNewstyle(u32),
    /// An option did not start with IHAVEOPT.
    #[error("bad option magic {0:#018x}")]
    BadOptionMagic(u64),
    /// The export is refused for now (NBD_OPT_EXPORT_NAME cannot say why
    /// in the protocol, so the session ends).
    #[error("export refused: {0}")]
    Unavailable(String),
    /// NBD_OPT_EXPORT_NAME has no error reply: an unknown name ends the session.
    #[error("client asked for unknown export {0:?} with NBD_OPT_EXPORT_NAME")]
    UnknownExport(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    ClientFlags,
    Options,
    /// Discarding the rest of an over-long option.
    Skipping {
        option: u32,
        remaining: u32,
    },
    Finished,
}

/// The server side of one handshake.
#[derive(Debug)]
pub struct Handshake {
    export: Export,
    state: State,
    no_zeroes: bool,
    structured: bool,
    /// The last SET_META_CONTEXT selected `base:allocation`.
    meta_selected: bool,
    shutting_down: bool,
}

impl Handshake {
    /// A new handshake; `out` receives the server greeting.
    pub fn new(export: Export, out: &mut BytesMut) -> Self {
        out.put_u64(proto::NBD_MAGIC);
        out.put_u64(proto::IHAVEOPT);
        out.put_u16(handshake_flags::FIXED_NEWSTYLE | handshake_flags::NO_ZEROES);
        Self {
            export,
            state: State::ClientFlags,
            no_zeroes: false,
            structured: false,
            meta_selected: false,
            shutting_down: false,
        }
    }

    /// From now on, refuse options with NBD_REP_ERR_SHUTDOWN.
    pub fn set_shutting_down(&mut self) {
        self.shutting_down = true;
    }

    /// Consume as much of `input` as forms complete messages, appending
    /// replies to `out`.
    pub fn feed(
        &mut self,
        input: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<Progress, HandshakeError> {
        loop {
            match self.state {
                State::Finished => return Ok(Progress::NeedMore),
                State::ClientFlags => {
                    if input.len() < 4 {
                        return Ok(Progress::NeedMore);
                    }
                    let flags = input.get_u32();
                    let known = client_flags::FIXED_NEWSTYLE | client_flags::NO_ZEROES;
                    if flags & !known != 0 {
                        return Err(HandshakeError::UnknownClientFlags(flags));
                    }
                    if flags & client_flags::FIXED_NEWSTYLE == 0 {
                        return Err(HandshakeError::NotFixedNewstyle(flags));
                    }
                    self.no_zeroes = flags & client_flags::NO_ZEROES != 0;
                    self.state = State::Options;
                }
                State::Skipping { option, remaining } => {
                    let n = remaining.min(input.len() as u32);
                    input.advance(n as usize);
                    if n < remaining {
                        self.state = State::Skipping {
                            option,
                            remaining: remaining - n,
                        };
                        return Ok(Progress::NeedMore);
                    }
                    self.state = State::Options;
                    reply_error(out, option, rep::ERR_TOO_BIG, "option data too long");
                }
                State::Options => {
                    if input.len() < 16 {
                        return Ok(Progress::NeedMore);
                    }
                    let magic = u64::from_be_bytes(header_bytes(input));
                    if magic != proto::IHAVEOPT {
                        return Err(HandshakeError::BadOptionMagic(magic));
                    }
                    let option = u32::from_be_bytes([input[8], input[9], input[10], input[11]]);
                    let len = u32::from_be_bytes([input[12], input[13], input[14], input[15]]);
                    if len > MAX_OPTION_LEN {
                        input.advance(16);
                        self.state = State::Skipping {
                            option,
                            remaining: len,
                        };
                        continue;
                    }
                    if input.len() < 16 + len as usize {
                        input.reserve(16 + len as usize - input.len());
                        return Ok(Progress::NeedMore);
                    }
                    input.advance(16);
                    let data = input.split_to(len as usize);
                    match self.option(option, &data, out)? {
                        Progress::NeedMore => {}
                        done => {
                            self.state = State::Finished;
                            return Ok(done);
                        }
                    }
                }
            }
        }
    }

    fn transmission_flags(&self) -> u16 {
        let c = &self.export.caps;
        let mut f = tflags::HAS_FLAGS;
        let mut set = |cond: bool, flag: u16| {
            if cond {
                f |= flag;
            }
        };
        set(c.read_only, tflags::READ_ONLY);
        set(c.flush && !c.read_only, tflags::SEND_FLUSH);
        set(c.fua && !c.read_only, tflags::SEND_FUA);
        set(c.rotational, tflags::ROTATIONAL);
        set(c.trim && !c.read_only, tflags::SEND_TRIM);
        let zeroes = c.write_zeroes && !c.read_only;
        set(zeroes, tflags::SEND_WRITE_ZEROES);
        set(zeroes && c.fast_zero, tflags::SEND_FAST_ZERO);
        // DF only means something with structured replies.
        set(self.structured, tflags::SEND_DF);
        set(c.multi_conn, tflags::CAN_MULTI_CONN);
        set(c.cache, tflags::SEND_CACHE);
        f
    }

    fn name_matches(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.export.name.as_bytes()
    }

    fn option(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<Progress, HandshakeError> {
        if self.shutting_down && option != opt::ABORT {
            reply_error(out, option, rep::ERR_SHUTDOWN, "server is shutting down");
            return Ok(Progress::NeedMore);
        }
        match option {
            opt::EXPORT_NAME => {
                if !self.name_matches(data) {
                    return Err(HandshakeError::UnknownExport(
                        String::from_utf8_lossy(data).into_owned(),
                    ));
                }
                if let Some(why) = &self.export.unavailable {
                    return Err(HandshakeError::Unavailable(why.clone()));
                }
                out.put_u64(self.export.size);
                out.put_u16(self.transmission_flags());
                if !self.no_zeroes {
                    out.put_bytes(0, 124);
                }
                Ok(Progress::Done(self.negotiated(data)))
            }
            opt::ABORT => {
                reply(out, option, rep::ACK, &[]);
                Ok(Progress::Aborted)
            }
            opt::LIST => {
                if !data.is_empty() {
                    reply_error(out, option, rep::ERR_INVALID, "NBD_OPT_LIST takes no data");
                } else {
                    let name = self.export.name.as_bytes();
                    let desc = self.export.description.as_deref().unwrap_or("").as_bytes();
                    let mut body = Vec::with_capacity(4 + name.len() + desc.len());
                    body.put_u32(name.len() as u32);
                    body.put_slice(name);
                    body.put_slice(desc);
                    reply(out, option, rep::SERVER, &body);
                    reply(out, option, rep::ACK, &[]);
                }
                Ok(Progress::NeedMore)
            }
            opt::INFO | opt::GO => self.info_or_go(option, data, out),
            opt::STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "NBD_OPT_STRUCTURED_REPLY takes no data",
                    );
                } else if self.structured {
                    reply_error(
                        out,
                        option,
                        rep::ERR_INVALID,
                        "structured replies already negotiated",
                    );
                } else {
                    self.structured = true;
                    reply(out, option, rep::ACK, &[]);
                }
                Ok(Progress::NeedMore)
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                self.meta_context(option, data, out);
                Ok(Progress::NeedMore)
            }
            opt::STARTTLS => {
                reply_error(out, option, rep::ERR_UNSUP, "TLS is not supported");
                Ok(Progress::NeedMore)
            }
            _ => {
                reply_error(out, option, rep::ERR_UNSUP, "option not supported");
                Ok(Progress::NeedMore)
            }
        }
    }

    fn negotiated(&self, name: &[u8]) -> Negotiated {
        // A selection applies only to the export it was made for; with one
        // export (reachable as "" or by name) both names are known to match.
        let base_allocation = self.structured && self.meta_selected && self.name_matches(name);
        Negotiated {
            structured: self.structured,
            base_allocation,
            transmission_flags: self.transmission_flags(),
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut BytesMut,
    ) -> Result<Progress, HandshakeError> {
        let Some((name, requests)) = parse_info_request(data) else {
            reply_error(
                out,
                option,
                rep::ERR_INVALID,
                "malformed NBD_OPT_INFO/GO data",
            );
            return Ok(Progress::NeedMore);
        };
        if !self.name_matches(name) {
            reply_error(out, option, rep::ERR_UNKNOWN, "no such export");
            return Ok(Progress::NeedMore);
        }
        if let Some(why) = &self.export.unavailable {
            reply_error(out, option, rep::ERR_POLICY, why);
            return Ok(Progress::NeedMore);
        }
        let mut body = Vec::with_capacity(16);
        body.put_u16(info::EXPORT);
        body.put_u64(self.export.size);
        body.put_u16(self.transmission_flags());
        reply(out, option, rep::INFO, &body);

        // Block sizes go out even unrequested: the spec allows it, and a
        // client that understands them does better I/O.
        let bs = self.export.caps.block_sizes;
        let mut body = Vec::with_capacity(14);
        body.put_u16(info::BLOCK_SIZE);
        body.put_u32(bs.minimum);
        body.put_u32(bs.preferred.max(bs.minimum).max(512));
        body.put_u32(bs.maximum_payload);
        reply(out, option, rep::INFO, &body);

        let mut sent_name = false;
        let mut sent_desc = false;
        for r in requests.chunks_exact(2) {
            match u16::from_be_bytes([r[0], r[1]]) {
                info::NAME if !sent_name => {
                    sent_name = true;
                    let mut body = Vec::new();
                    body.put_u16(info::NAME);
                    body.put_slice(self.export.name.as_bytes());
                    reply(out, option, rep::INFO, &body);
                }
                info::DESCRIPTION if !sent_desc => {
                    sent_desc = true;
                    if let Some(d) = &self.export.description {
                        let mut body = Vec::new();
                        body.put_u16(info::DESCRIPTION);
                        body.put_slice(d.as_bytes());
                        reply(out, option, rep::INFO, &body);
                    }
                }
                // Unknown requests are ignored, as the spec demands.
                _ => {}
            }
        }
        reply(out, option, rep::ACK, &[]);
        if option == opt::GO {
            Ok(Progress::Done(self.negotiated(name)))
        } else {
            Ok(Progress::NeedMore)
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut BytesMut) {
        let set = option == opt::SET_META_CONTEXT;
        if set {
            // A SET replaces the previous selection, even when it fails.
            self.meta_selected = false;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            reply_error(
                out,
                option,
                rep::ERR_INVALID,
                "malformed meta context request",
            );
            return;
        };
        if set && !self.structured {
            reply_error(
                out,
                option,
                rep::ERR_INVALID,
                "NBD_OPT_SET_META_CONTEXT needs structured replies first",
            );
            return;
        }
        if !self.name_matches(name) {
            reply_error(out, option, rep::ERR_UNKNOWN, "no such export");
            return;
        }
        let matched = if queries.is_empty() {
            // LIST with no queries lists everything; SET with none selects nothing.
            !set
        } else {
            queries.iter().any(|q| {
                *q == proto::BASE_ALLOCATION.as_bytes() || (!set && *q == b"base:".as_slice())
            })
        };
        if matched {
            let id = if set { proto::BASE_ALLOCATION_ID } else { 0 };
            let mut body = Vec::new();
            body.put_u32(id);
            body.put_slice(proto::BASE_ALLOCATION.as_bytes());
            reply(out, option, rep::META_CONTEXT, &body);
            if set {
                self.meta_selected = true;
            }
        }
        reply(out, option, rep::ACK, &[]);
    }
}

fn header_bytes(input: &BytesMut) -> [u8; 8] {
    let mut b = [0u8; 8];
    b.copy_from_slice(&input[..8]);
    b
}

fn reply(out: &mut BytesMut, option: u32, typ: u32, body: &[u8]) {
    out.put_u64(proto::REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(typ);
    out.put_u32(body.len() as u32);
    out.put_slice(body);
}

fn reply_error(out: &mut BytesMut, option: u32, typ: u32, message: &str) {
    reply(out, option, typ, message.as_bytes());
}

/// Split off a big-endian u32 from the front of `data`.
fn take_u32(data: &mut &[u8]) -> Option<u32> {
    let (head, rest) = data.split_first_chunk::<4>()?;
    *data = rest;
    Some(u32::from_be_bytes(*head))
}

/// Split off `n` bytes from the front of `data`.
fn take<'a>(data: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if data.len() < n {
        return None;
    }
    let (head, rest) = data.split_at(n);
    *data = rest;
    Some(head)
}

/// `u32 name length, name, u16 count, count × u16` — exactly, nothing after.
fn parse_info_request(mut data: &[u8]) -> Option<(&[u8], &[u8])> {
    let name_len = take_u32(&mut data)? as usize;
    let name = take(&mut data, name_len)?;
    let count = take(&mut data, 2)?;
    let count = u16::from_be_bytes([count[0], count[1]]) as usize;
    let requests = take(&mut data, count * 2)?;
    data.is_empty().then_some((name, requests))
}

/// `u32 name length, name, u32 count, count × (u32 length, query)` — exactly.
fn parse_meta_request(mut data: &[u8]) -> Option<(&[u8], Vec<&[u8]>)> {
    let name_len = take_u32(&mut data)? as usize;
    let name = take(&mut data, name_len)?;
    let count = take_u32(&mut data)?;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = take_u32(&mut data)? as usize;
        let q = take(&mut data, len)?;
        // Past the cap we still validate the framing but keep nothing.
        if queries.len() < MAX_QUERIES as usize {
            queries.push(q);
        }
    }
    data.is_empty().then_some((name, queries))
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tandem_blockdev::BlockSizes;

    fn export() -> Export {
        Export {
            name: "disk".into(),
            description: Some("test disk".into()),
            size: 1 << 20,
            unavailable: None,
            caps: Capabilities {
                read_only: false,
                flush: true,
                fua: true,
                trim: true,
                write_zeroes: true,
                fast_zero: true,
                cache: true,
                block_status: true,
                rotational: false,
                multi_conn: true,
                block_sizes: BlockSizes {
                    minimum: 1,
                    preferred: 4096,
                    maximum_payload: 32 << 20,
                },
            },
        }
    }

    fn option(opt: u32, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u64(proto::IHAVEOPT);
        v.put_u32(opt);
        v.put_u32(data.len() as u32);
        v.put_slice(data);
        v
    }

    fn info_data(name: &str, reqs: &[u16]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.put_slice(name.as_bytes());
        v.put_u16(reqs.len() as u16);
        for r in reqs {
            v.put_u16(*r);
        }
        v
    }

    fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut v = Vec::new();
        v.put_u32(name.len() as u32);
        v.put_slice(name.as_bytes());
        v.put_u32(queries.len() as u32);
        for q in queries {
            v.put_u32(q.len() as u32);
            v.put_slice(q.as_bytes());
        }
        v
    }

    /// Option replies as (option, type, body).
    type Replies = Vec<(u32, u32, Bytes)>;

    fn replies(mut out: Bytes) -> Replies {
        let mut v = Vec::new();
        while out.has_remaining() {
            assert_eq!(out.get_u64(), proto::REPLY_MAGIC);
            let o = out.get_u32();
            let t = out.get_u32();
            let l = out.get_u32() as usize;
            v.push((o, t, out.split_to(l)));
        }
        v
    }

    fn start(client_flags: u32) -> (Handshake, BytesMut) {
        let mut out = BytesMut::new();
        let mut hs = Handshake::new(export(), &mut out);
        assert_eq!(out.len(), 18);
        assert_eq!(&out[..8], &proto::NBD_MAGIC.to_be_bytes());
        let mut input = BytesMut::from(&client_flags.to_be_bytes()[..]);
        out.clear();
        assert_eq!(hs.feed(&mut input, &mut out), Ok(Progress::NeedMore));
        (hs, out)
    }

    fn feed(hs: &mut Handshake, bytes: &[u8]) -> (Result<Progress, HandshakeError>, Replies) {
        let mut input = BytesMut::from(bytes);
        let mut out = BytesMut::new();
        let r = hs.feed(&mut input, &mut out);
        (r, replies(out.freeze()))
    }

    #[test]
    fn unknown_client_flags_close() {
        let mut out = BytesMut::new();
        let mut hs = Handshake::new(export(), &mut out);
        let mut input = BytesMut::from(&4u32.to_be_bytes()[..]);
        assert_eq!(
            hs.feed(&mut input, &mut out),
            Err(HandshakeError::UnknownClientFlags(4))
        );
    }

    #[test]
    fn unknown_option_is_unsup_and_session_continues() {
        let (mut hs, _) = start(1);
        let mut bytes = option(0x7654321, b"junk");
        bytes.extend(option(opt::LIST, &[]));
        let (r, reps) = feed(&mut hs, &bytes);
        assert_eq!(r, Ok(Progress::NeedMore));
        assert_eq!(reps[0].1, rep::ERR_UNSUP);
        assert_eq!(reps[1].1, rep::SERVER);
        assert_eq!(&reps[1].2[4..8], b"disk");
        assert_eq!(reps[2].1, rep::ACK);
    }

    #[test]
    fn go_sends_export_info_and_ack() {
        let (mut hs, _) = start(3);
        let (r, reps) = feed(
            &mut hs,
            &option(opt::GO, &info_data("", &[info::NAME, info::DESCRIPTION])),
        );
        let Ok(Progress::Done(n)) = r else {
            panic!("{r:?}")
        };
        assert!(!n.structured);
        assert_eq!(n.transmission_flags & tflags::SEND_DF, 0);
        let types: Vec<_> = reps.iter().map(|r| r.1).collect();
        assert_eq!(
            types,
            [rep::INFO, rep::INFO, rep::INFO, rep::INFO, rep::ACK]
        );
        let mut exp = reps[0].2.clone();
        assert_eq!(exp.get_u16(), info::EXPORT);
        assert_eq!(exp.get_u64(), 1 << 20);
        assert_eq!(&reps[2].2[2..], b"disk");
        assert_eq!(&reps[3].2[2..], b"test disk");
    }

    #[test]
    fn go_unknown_export_is_err_unknown_and_continues() {
        let (mut hs, _) = start(1);
        let (r, reps) = feed(&mut hs, &option(opt::GO, &info_data("nope", &[])));
        assert_eq!(r, Ok(Progress::NeedMore));
        assert_eq!(reps[0].1, rep::ERR_UNKNOWN);
    }

    #[test]
    fn malformed_info_is_invalid() {
        let (mut hs, _) = start(1);
        let mut data = info_data("disk", &[1]);
        data.push(0); // trailing garbage
        let (r, reps) = feed(&mut hs, &option(opt::INFO, &data));
        assert_eq!(r, Ok(Progress::NeedMore));
        assert_eq!(reps[0].1, rep::ERR_INVALID);
        // Name length larger than the option.
        let (_, reps) = feed(&mut hs, &option(opt::INFO, &[0, 0, 1, 0, 0, 0]));
        assert_eq!(reps[0].1, rep::ERR_INVALID);
    }

    #[test]
    fn export_name_unknown_disconnects_known_finishes_with_zeroes() {
        let (mut hs, _) = start(1);
        let (r, _) = feed(&mut hs, &option(opt::EXPORT_NAME, b"nope"));
        assert!(matches!(r, Err(HandshakeError::UnknownExport(_))));

        let (mut hs, _) = start(1);
        let mut input = BytesMut::from(&option(opt::EXPORT_NAME, b"disk")[..]);
        let mut out = BytesMut::new();
        assert!(matches!(
            hs.feed(&mut input, &mut out),
            Ok(Progress::Done(_))
        ));
        assert_eq!(out.len(), 8 + 2 + 124);

        let (mut hs, _) = start(3);
        let mut input = BytesMut::from(&option(opt::EXPORT_NAME, b"")[..]);
        let mut out = BytesMut::new();
        assert!(matches!(
            hs.feed(&mut input, &mut out),
            Ok(Progress::Done(_))
        ));
        assert_eq!(out.len(), 8 + 2);
    }

    #[test]
    fn structured_and_meta_context() {
        let (mut hs, _) = start(1);
        // SET before structured replies: invalid.
        let (_, reps) = feed(
            &mut hs,
            &option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
        );
        assert_eq!(reps[0].1, rep::ERR_INVALID);
        let (_, reps) = feed(&mut hs, &option(opt::STRUCTURED_REPLY, &[]));
        assert_eq!(reps[0].1, rep::ACK);
        let (_, reps) = feed(&mut hs, &option(opt::STRUCTURED_REPLY, &[]));
        assert_eq!(reps[0].1, rep::ERR_INVALID);
        // LIST with a namespace wildcard.
        let (_, reps) = feed(
            &mut hs,
            &option(opt::LIST_META_CONTEXT, &meta_data("disk", &["base:"])),
        );
        assert_eq!(reps[0].1, rep::META_CONTEXT);
        assert_eq!(&reps[0].2[4..], b"base:allocation");
        // Unknown namespace: just ACK.
        let (_, reps) = feed(
            &mut hs,
            &option(
                opt::SET_META_CONTEXT,
                &meta_data("", &["qemu:dirty-bitmap:x"]),
            ),
        );
        assert_eq!(reps.len(), 1);
        assert_eq!(reps[0].1, rep::ACK);
        let (_, reps) = feed(
            &mut hs,
            &option(opt::SET_META_CONTEXT, &meta_data("", &["base:allocation"])),
        );
        assert_eq!(reps[0].1, rep::META_CONTEXT);
        assert_eq!(&reps[0].2[..4], &proto::BASE_ALLOCATION_ID.to_be_bytes());
        let (r, _) = feed(&mut hs, &option(opt::GO, &info_data("disk", &[])));
        let Ok(Progress::Done(n)) = r else { panic!() };
        assert!(n.structured && n.base_allocation);
        assert_ne!(n.transmission_flags & tflags::SEND_DF, 0);
    }

    #[test]
    fn oversized_option_is_skipped_with_too_big() {
        let (mut hs, _) = start(1);
        let mut bytes = Vec::new();
        bytes.put_u64(proto::IHAVEOPT);
        bytes.put_u32(opt::GO);
        bytes.put_u32(MAX_OPTION_LEN + 10);
        bytes.extend(vec![7u8; MAX_OPTION_LEN as usize + 10]);
        bytes.extend(option(opt::ABORT, &[]));
        // Deliver in small pieces to exercise the skipping state.
        let mut out = BytesMut::new();
        let mut input = BytesMut::new();
        let mut last = Ok(Progress::NeedMore);
        for piece in bytes.chunks(1000) {
            input.extend_from_slice(piece);
            last = hs.feed(&mut input, &mut out);
        }
        assert_eq!(last, Ok(Progress::Aborted));
        let reps = replies(out.freeze());
        assert_eq!(reps[0].1, rep::ERR_TOO_BIG);
        assert_eq!(reps[1].1, rep::ACK);
    }

    #[test]
    fn shutdown_refuses_options() {
        let (mut hs, _) = start(1);
        hs.set_shutting_down();
        let (r, reps) = feed(&mut hs, &option(opt::GO, &info_data("", &[])));
        assert_eq!(r, Ok(Progress::NeedMore));
        assert_eq!(reps[0].1, rep::ERR_SHUTDOWN);
    }

    #[test]
    fn bad_option_magic_closes() {
        let (mut hs, _) = start(1);
        let (r, _) = feed(&mut hs, &[0u8; 16]);
        assert_eq!(r, Err(HandshakeError::BadOptionMagic(0)));
    }
}
