use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn boots_and_answers() {
    let mut g = Guest::boot("smoke", GuestSpec::default());
    let out = g.sh("cat /sys/devices/system/cpu/online; cat /sys/devices/system/memory/block_size_bytes; ls /dev/virtio-ports; cat /tmp/agent.log");
    eprintln!("{out}");
    assert!(out.contains("8000000"));
}
