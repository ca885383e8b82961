//! Whether a udev rule that onlines hot-plugged CPUs or memory is installed.

use std::fs;
use std::path::Path;

/// Where udev reads rules from, relative to the filesystem root.
const RULE_DIRS: &[&str] = &["etc/udev/rules.d", "run/udev/rules.d", "lib/udev/rules.d", "usr/lib/udev/rules.d"];

/// True if one of the rules (not a comment) sets a cpu `online` or a memory `state`.
pub fn rule_onlines(text: &str) -> bool {
    text.lines().map(str::trim).filter(|l| !l.starts_with('#')).any(|l| {
        let cpu = l.contains("SUBSYSTEM==\"cpu\"") && l.contains("ATTR{online}=");
        let mem = l.contains("SUBSYSTEM==\"memory\"") && l.contains("ATTR{state}=");
        let agent = l.contains("vmplug-guest") && (l.contains("\"cpu\"") || l.contains("\"memory\""));
        cpu || mem || agent
    })
}

/// `sys_root` is the sysfs root; the filesystem root is its parent (`/sys` → `/`).
pub fn online_rule_installed(sys_root: &Path) -> bool {
    let root = sys_root.parent().unwrap_or(Path::new("/"));
    RULE_DIRS.iter().any(|dir| {
        fs::read_dir(root.join(dir)).into_iter().flatten().flatten().any(|e| {
            e.path().extension().is_some_and(|x| x == "rules")
                && fs::read_to_string(e.path()).is_ok_and(|t| rule_onlines(&t))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guides_broken_rule_onlines_nothing() {
        // The guide's rule: its comment swallows the rule, and `=` is not `==`.
        assert!(!rule_onlines(
            "# automatically online hot-plugged memoryACTION==\"add\", SUBSYSTEM==\"memory\", ATTR{state}=\"online\""
        ));
    }

    #[test]
    fn corrected_rules_are_recognised() {
        assert!(rule_onlines(
            "ACTION==\"add\", SUBSYSTEM==\"memory\", ATTR{state}==\"offline\", ATTR{state}=\"online\""
        ));
        assert!(rule_onlines("ACTION==\"add\", SUBSYSTEM==\"cpu\", ATTR{online}==\"0\", ATTR{online}=\"1\""));
        assert!(!rule_onlines("ACTION==\"add\", SUBSYSTEM==\"block\", RUN+=\"/bin/true\""));
    }
}
