//! Every `--json` document the end-to-end tests read is checked against the
//! envelope's schema (`host-agent/schema/vmplug-report.schema.json`): the
//! contract holds on real guests, not only against libvirt's test driver.

use std::sync::OnceLock;

fn validator() -> &'static jsonschema::Validator {
    static V: OnceLock<jsonschema::Validator> = OnceLock::new();
    V.get_or_init(|| {
        let text = include_str!("../../host-agent/schema/vmplug-report.schema.json");
        let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema compiles")
    })
}

/// Panics, naming every violation, unless `doc` is a valid envelope.
pub fn assert_valid(doc: &serde_json::Value, args: &[&str]) {
    let errors: Vec<String> = validator().iter_errors(doc).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "vmplug {}: --json output breaks the schema: {errors:?}\n{doc:#}", args.join(" "));
}
