//! The host's side of the link: every byte a (possibly compromised) guest sends.
//! Frames are decoded as the host's link does; an accepted answer must survive a
//! re-encode unchanged (the host never acts on a value it cannot represent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_common::frame::{encode, Decoded, FrameDecoder, MAX_FRAME_BYTES};
use vmplug_common::protocol::{Envelope, Response};

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    dec.feed(data, &mut out);
    assert!(dec.pending() <= MAX_FRAME_BYTES);
    for item in out {
        let Decoded::Frame(f) = item else { continue };
        let Ok(env) = serde_json::from_slice::<Envelope<Response>>(&f) else { continue };
        let again = encode(&env).expect("an accepted answer re-encodes");
        let back: Envelope<Response> = serde_json::from_slice(&again[..again.len() - 1]).expect("and decodes");
        assert_eq!(back, env);
    }
});
