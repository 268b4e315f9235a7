//! Arbitrary peer bytes, delivered in arbitrary pieces, through the frame
//! decoder: it must never panic, must consume only whole frames, and every
//! frame it accepts must re-encode to a frame that decodes to the same
//! message.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tandem_wire::{decode, encode};

fuzz_target!(|data: &[u8]| {
    let Some((&split, stream)) = data.split_first() else { return };
    let piece = (split as usize % 61) + 1;
    let mut input = BytesMut::new();
    for chunk in stream.chunks(piece) {
        input.extend_from_slice(chunk);
        loop {
            let before = input.len();
            match decode(&mut input) {
                Ok(Some(msg)) => {
                    assert!(input.len() < before, "a decoded frame consumed no bytes");
                    let mut again = BytesMut::new();
                    encode(&msg, &mut again);
                    match decode(&mut again) {
                        Ok(Some(back)) => assert_eq!(back, msg, "re-encoded frame decodes differently"),
                        other => panic!("re-encoded {} does not decode: {other:?}", msg.name()),
                    }
                    assert!(again.is_empty(), "re-encoded frame left bytes behind");
                }
                Ok(None) => {
                    assert_eq!(input.len(), before, "Ok(None) consumed bytes");
                    break;
                }
                // The connection would close here.
                Err(_) => return,
            }
        }
    }
});
