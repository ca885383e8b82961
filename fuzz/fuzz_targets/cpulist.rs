//! CPU lists, as the guest's sysfs, libvirt and the operator write them. Whatever
//! parses prints back to a list that parses to the same set.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmplug_common::CpuSet;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(set) = text.parse::<CpuSet>() {
        let printed = set.to_string();
        let back: CpuSet = printed.parse().expect("printed form parses");
        assert_eq!(back, set);
    }
});
