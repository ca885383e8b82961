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
