//! A node file for libvirt's test driver: one host (2 cores, 8 GiB) holding the
//! domains given, each a `<domain type='test'>` document.

use std::path::Path;

/// Writes `dir/node.xml` with `domains` and returns the `test://` URI that opens it.
pub fn test_node(dir: &Path, domains: &str) -> String {
    let path = dir.join("node.xml");
    std::fs::write(
        &path,
        format!("<node><cpu><mhz>2000</mhz><model>x86_64</model><nodes>1</nodes><sockets>1</sockets><cores>2</cores><threads>1</threads></cpu><memory>8388608</memory>{domains}</node>"),
    )
    .expect("node file");
    format!("test://{}", path.display())
}
