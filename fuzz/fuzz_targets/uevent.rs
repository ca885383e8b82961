//! Kernel uevent payloads (the agent trusts only the kernel, but parses defensively).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_guest::uevent::parse;

fuzz_target!(|data: &[u8]| {
    if let Ok(ev) = parse(data) {
        let _ = ev.resource();
        assert_eq!(ev.env.get("DEVPATH"), Some(&ev.devpath));
    }
});
