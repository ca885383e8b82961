//! Kernel uevent payloads: parsing never panics, and a message in udev's format is
//! always refused (the agent trusts only the kernel).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_guest::uevent::parse;

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        // udev's re-broadcasts are never taken for the kernel's word.
        Ok(_) if data.starts_with(b"libudev\0") => panic!("a libudev message was accepted"),
        Ok(ev) => {
            let _ = ev.resource();
        }
        Err(_) => {}
    }
});
