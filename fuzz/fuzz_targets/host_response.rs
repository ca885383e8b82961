//! The host's side of the link: every byte a (possibly compromised) guest sends.
//! Frames are decoded as the host's link does; an accepted answer must survive a
//! re-encode unchanged (the host never acts on a value it cannot represent), and
//! once escaped (as the link does) carries no control character in any string.
//! Inputs run up to a whole 256 KiB frame; `make fuzz` sets a per-input time
//! limit, so an input that is slow to decode is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_common::frame::{encode, Decoded, FrameDecoder, MAX_FRAME_BYTES};
use vmplug_common::protocol::{Message, Response};

/// Whether no string (key or value) in `v` holds a control character.
fn no_control(v: &serde_json::Value) -> bool {
    use serde_json::Value;
    match v {
        Value::String(s) => !s.chars().any(char::is_control),
        Value::Array(a) => a.iter().all(no_control),
        Value::Object(o) => o.iter().all(|(k, v)| !k.chars().any(char::is_control) && no_control(v)),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    let mut dec = FrameDecoder::default();
    let mut out = Vec::new();
    dec.feed(data, &mut out);
    assert!(dec.pending() <= MAX_FRAME_BYTES);
    for item in out {
        let Decoded::Frame(f) = item else { continue };
        let Ok(env) = serde_json::from_slice::<Message<Response>>(&f) else { continue };
        let again = encode(&env).expect("an accepted answer re-encodes");
        let back: Message<Response> = serde_json::from_slice(&again[..again.len() - 1]).expect("and decodes");
        assert_eq!(back, env);
        let mut escaped = env.body;
        escaped.escape_text();
        let value = serde_json::to_value(&escaped).expect("encodes");
        assert!(no_control(&value), "a control character survived escaping: {value}");
    }
});
