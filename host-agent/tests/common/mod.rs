//! A simulated guest for the host's integration tests: a fake kernel under a
//! temp dir, the real guest agent serving it on a Unix socket (as over
//! virtio-serial), and a hook through which the fake libvirt plays every plug
//! into that kernel.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmplug::fake::{FakeEvent, Hook};
use vmplug_common::protocol::ZonePolicy;
use vmplug_common::MIB;
use vmplug_guest::agent::Agent;
use vmplug_guest::online::{OnlinePolicy, Onliner};
use vmplug_guest::testing::FakeKernel;

/// A guest kernel under `dir` with `possible` CPUs (0-1 online) and `blocks`
/// boot memory blocks online, the first half on node 0, the rest on node 1.
pub fn kernel(dir: &Path, possible: u32, blocks: u64) -> FakeKernel {
    let kernel = FakeKernel::new(&dir.join("guest"), possible);
    kernel.add_cpu(1, true);
    kernel.load_virtio_mem(2);
    for i in 0..blocks {
        kernel.add_block(i, true, "Normal", if i < blocks / 2 { 0 } else { 1 });
    }
    kernel
}

/// The real agent over `kernel`, serving every connection to `dir/agent.sock`.
pub fn serve_agent(dir: &Path, kernel: &FakeKernel) -> (Arc<Agent>, PathBuf) {
    let policy = OnlinePolicy { retry_pause: Duration::from_millis(1), ..OnlinePolicy::default() };
    let agent = Agent::new(Onliner::new(kernel.sysfs(), policy, kernel.writer()), ZonePolicy::Auto, false);
    let sock = dir.join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&sock).expect("bind");
    let served = agent.clone();
    tokio::spawn(async move {
        let (_stop_tx, stop) = tokio::sync::watch::channel(false);
        while let Ok((stream, _)) = listener.accept().await {
            let limits = vmplug_guest::server::SessionLimits::VSOCK;
            tokio::spawn(vmplug_guest::server::serve_connection(served.clone(), stream, vec![], stop.clone(), limits));
        }
    });
    (agent, sock)
}

/// The fake hypervisor's side: new vCPUs and DIMM blocks appear in `kernel`
/// (offline, as a real kernel shows them), removed DIMMs disappear.
pub fn plays_hypervisor(kernel: &FakeKernel, agent: Arc<Agent>) -> Hook {
    let k = kernel.clone();
    Arc::new(move |ev: &FakeEvent| {
        match *ev {
            FakeEvent::Vcpus(n) => (2..n).for_each(|c| k.add_cpu(c, false)),
            FakeEvent::Dimm { base, size, node } => (base / (128 * MIB)..(base + size) / (128 * MIB))
                .for_each(|b| k.add_block(b, false, "Normal Movable", node)),
            FakeEvent::DimmRemoved { base, size } => {
                (base / (128 * MIB)..(base + size) / (128 * MIB)).for_each(|b| k.remove_block(b))
            }
            // The driver adds the blocks its plugged memory needs, removes the rest.
            FakeEvent::VirtioMem { base, size, current, node } => {
                let (first, held) = (base / (128 * MIB), current.div_ceil(128 * MIB));
                for b in first..first + size / (128 * MIB) {
                    if b < first + held {
                        if !k.sys().join(format!("devices/system/memory/memory{b}")).exists() {
                            k.add_block(b, false, "Normal Movable", node);
                        }
                    } else {
                        k.remove_block(b);
                    }
                }
            }
        }
        agent.notify_changed();
    }) as Hook
}
