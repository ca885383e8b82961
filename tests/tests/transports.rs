//! Scenario 5: the same closed loop over hybrid vsock (vhost-device-vsock) and
//! over virtio-serial.

use vmplug_e2e::{Guest, GuestSpec, Transport};

fn closed_loop(transport: Transport) {
    let mut g = Guest::boot(
        if transport == Transport::Vsock { "vsock" } else { "serial" },
        GuestSpec { transport, ..GuestSpec::default() },
    );
    let name = g.name.clone();
    // No host connected yet: the agent must sleep, not spin (a virtio-serial port
    // without a host reports a level hang-up; waiting on it naively burns a CPU).
    let before = g.agent_cpu_ticks();
    std::thread::sleep(std::time::Duration::from_secs(3));
    let burnt = g.agent_cpu_ticks() - before;
    assert!(burnt < 30, "the idle agent used {burnt} ticks of CPU in 3 s: it is busy-looping");
    let r = g.vmplug_json(&["setvcpus", &name, "2", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    let r = g.vmplug_json(&["attach-memory", &name, "256M", "--live"]);
    assert_eq!(r["outcome"], "ok", "{r}");
    assert_eq!(g.online_cpus(), "0-1");
    let st = g.vmplug_json(&["status", &name]);
    assert!(st["agent_error"].is_null(), "{st}");
    assert_eq!(st["guest"]["cpus"]["online"], "0-1");
}

#[test]
fn over_hybrid_vsock() {
    closed_loop(Transport::Vsock);
}

#[test]
fn over_virtio_serial() {
    closed_loop(Transport::Serial);
}
