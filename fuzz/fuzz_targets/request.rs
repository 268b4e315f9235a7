//! Arbitrary bytes through the transmission decoder and validator, with the
//! replies encoded: no input may panic, and every accepted request lies
//! within the export.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tandem_nbd::codec::{encode_reply, Decoder, Frame, Outcome, Session};
use tandem_nbd::proto::{tflags, Errno};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let session = Session {
        size: 1 << 20,
        transmission_flags: tflags::HAS_FLAGS
            | tflags::SEND_FLUSH
            | tflags::SEND_FUA
            | tflags::SEND_TRIM
            | tflags::SEND_WRITE_ZEROES
            | tflags::SEND_FAST_ZERO
            | tflags::SEND_DF
            | if split & 1 != 0 { tflags::READ_ONLY } else { 0 },
        structured: split & 2 != 0,
        base_allocation: split & 4 != 0,
        max_payload: 4096,
    };
    let mut decoder = Decoder::new(session.max_payload);
    // Writes of 64 bytes or more come out as bulk frames while their
    // payload is incomplete; they are put back as the server does when it
    // has no pipe, so both paths see every input.
    decoder.set_bulk(64..=4096);
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let piece = (split as usize >> 3) + 1;
    for chunk in stream.chunks(piece) {
        input.extend_from_slice(chunk);
        loop {
            match decoder.decode(&mut input) {
                Ok(Some(Frame::Request { header, payload })) => {
                    let outcome = match session.validate(&header, payload) {
                        Ok(_) => Outcome::Done,
                        Err(e) => Outcome::Error(e),
                    };
                    encode_reply(&mut out, session.structured, header.cookie, outcome);
                }
                Ok(Some(Frame::Bulk { header, raw, head, rest })) => {
                    assert!(input.is_empty(), "a bulk frame takes the whole buffer");
                    assert_eq!(head.len() + rest, header.length as usize);
                    assert!(rest > 0, "a complete write is never bulk");
                    input.extend_from_slice(&raw);
                    input.extend_from_slice(&head);
                    decoder.skip_bulk_once();
                }
                Ok(Some(Frame::Oversized(h))) => {
                    encode_reply(&mut out, session.structured, h.cookie, Outcome::Error(Errno::Inval));
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
        out.clear();
    }
});
