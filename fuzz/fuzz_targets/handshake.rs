//! Arbitrary client bytes, delivered in arbitrary pieces, through the
//! handshake state machine: it must never panic, and it must never produce
//! output after it has finished.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tandem_blockdev::{BlockSizes, Capabilities};
use tandem_nbd::handshake::{Export, Handshake, Progress};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let caps = Capabilities {
        read_only: split & 1 != 0,
        flush: true,
        fua: true,
        trim: true,
        write_zeroes: true,
        fast_zero: true,
        cache: true,
        block_status: true,
        rotational: false,
        multi_conn: true,
        block_sizes: BlockSizes { minimum: 1, preferred: 4096, maximum_payload: 32 << 20 },
    };
    let export = Export { name: "disk".into(), description: Some("fuzz".into()), size: 1 << 30, caps, unavailable: None };
    let mut out = BytesMut::new();
    let mut hs = Handshake::new(export, &mut out);
    let mut input = BytesMut::new();
    let piece = (split as usize % 31) + 1;
    for chunk in stream.chunks(piece) {
        input.extend_from_slice(chunk);
        match hs.feed(&mut input, &mut out) {
            Ok(Progress::NeedMore) => {}
            Ok(Progress::Done(_)) | Ok(Progress::Aborted) | Err(_) => return,
        }
    }
});
