use vmplug_e2e::{Guest, GuestSpec};

#[test]
fn boots_and_answers() {
    let mut g = Guest::boot("smoke", GuestSpec::default());
    let out = g.vmplug(&["status", &g.name.clone()]);
    assert!(out.status.success());
    let out = g.vmplug(&["setvcpus", &g.name.clone(), "2", "--live", "--config"]);
    assert!(out.status.success());
    let out = g.vmplug(&["attach-memory", &g.name.clone(), "256M", "--live"]);
    assert!(out.status.success());
    let out = g.vmplug(&["status", &g.name.clone()]);
    assert!(out.status.success());
    eprintln!("{}", g.sh("cat /sys/devices/system/cpu/online; grep MemTotal /proc/meminfo; tail /tmp/agent.log"));
}
