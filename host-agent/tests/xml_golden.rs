//! Golden files for the XML vmplug writes, and round trips through the reader.

use vmplug::xml::{dimm_detach_xml, DimmSpec, DomainFacts};
use vmplug_common::{Bytes, GIB};

#[test]
fn dimm_attach_xml_matches_golden() {
    let xml = DimmSpec { size: Bytes(GIB), node: 1 }.to_xml();
    assert_eq!(xml, include_str!("golden/dimm-1g-node1.xml"));
    // What we write, libvirt's schema reads back as the same DIMM.
    let wrapped = format!("<domain><name>x</name><vcpu>1</vcpu><devices>{xml}</devices></domain>");
    let f = DomainFacts::parse(&wrapped).expect("parses");
    assert_eq!((f.dimms[0].size, f.dimms[0].node), (Bytes(GIB), Some(1)));
}

#[test]
fn dimm_detach_xml_matches_golden() {
    let f = DomainFacts::parse(include_str!("fixtures/x86-ready.xml")).expect("fixture");
    assert_eq!(dimm_detach_xml(&f.dimms[0]), include_str!("golden/dimm0-detach.xml"));
}

#[test]
fn named_dimm_carries_its_user_alias() {
    let xml = vmplug::xml::NamedDimm { spec: DimmSpec { size: Bytes(GIB), node: 1 }, alias: "ua-vmplug-r1-0".into() }
        .to_xml();
    assert_eq!(xml, include_str!("golden/dimm-1g-node1-alias.xml"));
    let f = DomainFacts::parse(&format!("<domain><name>x</name><vcpu>1</vcpu><devices>{xml}</devices></domain>"))
        .expect("parses");
    assert_eq!(f.dimms[0].alias.as_deref(), Some("ua-vmplug-r1-0"));
}

/// The device XML `resize-memory` sends is the live device verbatim (alias and
/// PCI address kept, so libvirt matches it) with only `<requested>` changed.
#[test]
fn virtio_mem_update_keeps_the_device_and_changes_requested() {
    let live = include_str!("fixtures/x86-virtio-mem.xml");
    let xml = vmplug::xml::virtio_mem_update_xml(live, 1, Bytes(GIB)).expect("device 1");
    assert!(xml.starts_with("<memory model='virtio-mem'>") && xml.ends_with("</memory>"), "{xml}");
    assert!(xml.contains("<requested unit='KiB'>1048576</requested>"), "{xml}");
    assert!(xml.contains("<alias name='virtiomem1'/>") && xml.contains("bus='0x04'"), "{xml}");
    assert!(!xml.contains("virtiomem0"), "only the one device: {xml}");
    let f = DomainFacts::parse(&format!("<domain><name>x</name><vcpu>1</vcpu><devices>{xml}</devices></domain>"))
        .expect("parses");
    let d = &f.virtio_mems[0];
    assert_eq!((d.requested, d.node, d.base), (Bytes(GIB), Some(1), Some(0x3_8000_0000)));
    assert!(f.dimms.is_empty(), "virtio-mem is not a DIMM");
    assert!(vmplug::xml::virtio_mem_update_xml(live, 2, Bytes(0)).is_err(), "no third device");
    // A new device: what add-virtio-mem attaches reads back the same.
    let new = vmplug::xml::virtio_mem_xml(Bytes(2 * GIB), Some(0), Bytes(2 << 20));
    let f = DomainFacts::parse(&format!("<domain><name>x</name><vcpu>1</vcpu><devices>{new}</devices></domain>"))
        .expect("parses");
    let d = &f.virtio_mems[0];
    assert_eq!((d.size, d.node, d.block, d.requested), (Bytes(2 * GIB), Some(0), Bytes(2 << 20), Bytes(0)));
}
