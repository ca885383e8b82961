//! The guest's side of the link: bytes from the host, cut into arbitrary chunks,
//! through the bounded frame decoder and the request validator. Properties: no
//! panic, the decoder's buffer never exceeds its limit, no frame is longer than the
//! limit, and the chunking does not change what is decoded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_common::frame::{Decoded, FrameDecoder};
use vmplug_common::protocol::decode_request;

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, rest)) = data.split_first() else { return };
    let cut = usize::from(cut).min(rest.len());
    let mut whole = FrameDecoder::new(LIMIT);
    let mut parts = FrameDecoder::new(LIMIT);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    whole.feed(rest, &mut a);
    parts.feed(&rest[..cut], &mut b);
    assert!(parts.pending() <= LIMIT);
    parts.feed(&rest[cut..], &mut b);
    assert_eq!(a, b, "decoding depends on chunking");
    assert!(whole.pending() <= LIMIT);
    for item in a {
        if let Decoded::Frame(f) = item {
            assert!(f.len() <= LIMIT);
            // Either a valid request or a specific error; never a panic.
            let _ = decode_request(&f);
        }
    }
});
