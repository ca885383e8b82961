//! The verbs libvirt's `test:///default` driver models faithfully, through the
//! real `virt` binding: domain lookup, XML, vCPU counts in the persistent
//! definition, vCPU and emulator pinning, and capabilities. (It does not model
//! memory devices' guest-physical addresses, a guest agent, cgroups or NUMA
//! tuning of a live QEMU: those are proven by the end-to-end suite.)

use std::sync::Arc;

use vmplug::domain::{Affect, Connection, XmlView};
use vmplug::libvirt::LibvirtConnection;
use vmplug::xml::{DomainFacts, HostFacts};

fn conn() -> Arc<dyn Connection> {
    Arc::new(LibvirtConnection::open(Some("test:///default")).expect("test driver"))
}

#[test]
fn reads_the_test_domain_and_host() {
    let c = conn();
    let dom = c.lookup("test").expect("the test driver's domain");
    assert!(dom.is_active().expect("state"));
    let f = DomainFacts::parse(&dom.xml(XmlView::Live).expect("xml")).expect("parses");
    assert_eq!(f.name, "test");
    assert!(f.vcpus_max >= 1);
    let host = HostFacts::parse_capabilities(&c.capabilities().expect("caps")).expect("caps parse");
    assert!(host.cpus > 0 && !host.nodes.is_empty());
    assert!(c.lookup("no-such-domain").is_err());
}

#[test]
fn pins_round_trip_through_libvirt() {
    let c = conn();
    let dom = c.lookup("test").expect("domain");
    let host = HostFacts::parse_capabilities(&c.capabilities().expect("caps")).expect("caps parse");
    let set: vmplug_common::CpuSet = "0".parse().expect("set");
    // The test driver accepts only VIR_DOMAIN_AFFECT_CURRENT here (a documented
    // gap: it rejects explicit LIVE/CONFIG flags for vcpupin).
    dom.pin_vcpu(0, &set, host.cpus, Affect::Current).expect("vcpupin");
    let f = DomainFacts::parse(&dom.xml(XmlView::Live).expect("xml")).expect("parses");
    assert_eq!(f.vcpupins.get(&0).map(|s| s.to_string()), Some("0".into()));
    let outside: vmplug_common::CpuSet = format!("{}", host.cpus + 3).parse().expect("set");
    assert!(
        dom.pin_vcpu(0, &outside, host.cpus, Affect::Live).is_err(),
        "a CPU the host lacks is refused before libvirt"
    );
}

#[test]
fn setvcpus_in_the_persistent_definition() {
    let c = conn();
    let dom = c.lookup("test").expect("domain");
    let f = DomainFacts::parse(&dom.xml(XmlView::Inactive).expect("xml")).expect("parses");
    let target = f.vcpus_max.min(2);
    dom.set_vcpus(target, Affect::Config).expect("setvcpus --config");
    let after = DomainFacts::parse(&dom.xml(XmlView::Inactive).expect("xml")).expect("parses");
    assert_eq!(after.vcpus_current, target);
}
