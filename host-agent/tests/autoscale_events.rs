//! `vmplug --json autoscale` is JSON Lines throughout: every decision event the
//! writer emits is one line that matches `schema/vmplug-autoscale-event.schema.json`,
//! and the real binary's run ends with its envelope on one line too.

use std::process::Command;

use vmplug::autoscale::decision::{Action, DecisionEvent, Sample};
use vmplug::autoscale::events::write_event;
use vmplug::report::Outcome;
use vmplug_common::Bytes;

fn validator(text: &str) -> jsonschema::Validator {
    let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

fn events_schema() -> jsonschema::Validator {
    validator(include_str!("../schema/vmplug-autoscale-event.schema.json"))
}

fn check(v: &jsonschema::Validator, line: &str) -> serde_json::Value {
    let doc: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("not one JSON object ({e}): {line}"));
    let errors: Vec<String> = v.iter_errors(&doc).map(|e| format!("{e} at {}", e.instance_path)).collect();
    assert!(errors.is_empty(), "{line}: {errors:?}");
    doc
}

fn event(rule: &'static str, action: Action, inputs: Option<Sample>, outcome: Option<Outcome>) -> DecisionEvent {
    DecisionEvent {
        ts: 1_796_400_000,
        uri: "qemu:///system".into(),
        domain: "web \"1\"\n".into(),
        inputs,
        vcpus: 2,
        memory: Bytes(1 << 30),
        rule,
        reason: "memory PSI some avg10 25.0 ≥ 20.0 for 3 samples".into(),
        action,
        dry_run: false,
        outcome,
        message: outcome.map(|o| format!("{o:?}")),
        duration_ms: 812,
    }
}

#[test]
fn every_event_the_writer_emits_is_one_line_that_matches_the_schema() {
    let sample = Sample { cpu_some: 0.0, mem_some: 31.5, mem_full: 100.0, available: Bytes(96 << 20) };
    let events = [
        event("agent.silent", Action::None, None, None),
        event("cpu.psi", Action::AddVcpus { to: 3 }, Some(sample), Some(Outcome::Ok)),
        event(
            "memory.pressure",
            Action::AddMemory { size: Bytes(512 << 20), ceiling: Bytes(1 << 30) },
            Some(sample),
            Some(Outcome::GuestTimeout),
        ),
        event("alert.memory", Action::GrowVirtioMem { size: Bytes(256 << 20) }, None, Some(Outcome::Partial)),
        event("memory.idle", Action::ShrinkVirtioMem { size: Bytes(128 << 20) }, Some(sample), Some(Outcome::Refused)),
        event("memory.at-max", Action::None, Some(sample), None),
    ];
    let mut out = Vec::new();
    for ev in &events {
        write_event(&mut out, ev).expect("write to a Vec");
    }
    let text = String::from_utf8(out).expect("UTF-8");
    assert!(text.ends_with('\n'));
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), events.len(), "one line per event:\n{text}");
    let v = events_schema();
    for (line, ev) in lines.iter().zip(&events) {
        let doc = check(&v, line);
        assert_eq!((doc["rule"].as_str(), doc["domain"].as_str()), (Some(ev.rule), Some(ev.domain.as_str())));
    }
}

#[test]
fn the_schema_refuses_what_is_not_an_event() {
    let v = events_schema();
    let good: serde_json::Value =
        serde_json::to_value(event("cpu.psi", Action::AddVcpus { to: 3 }, None, Some(Outcome::Ok))).expect("JSON");
    assert!(v.is_valid(&good));
    for (key, bad) in [
        ("action", serde_json::json!({ "kind": "add_vcpus" })),
        ("outcome", serde_json::json!("fine")),
        ("rule", serde_json::json!("Pressure")),
        ("memory", serde_json::json!(-1)),
    ] {
        let mut doc = good.clone();
        doc[key] = bad;
        assert!(!v.is_valid(&doc), "{key}: {doc}");
    }
}

/// The real binary against libvirt's test driver: a domain whose agent cannot be
/// reached gets its event, and the run's envelope ends the stream, each on a line.
#[test]
fn the_binary_prints_json_lines_from_the_first_event_to_the_envelope() {
    let dir = tempfile::tempdir().expect("tempdir");
    let policy = dir.path().join("policy.toml");
    std::fs::write(&policy, "[select]\nnames = [\"test\"]\n[timing]\ninterval_s = 1\n").expect("write the policy");
    let out = Command::new(env!("CARGO_BIN_EXE_vmplug"))
        .args(["-c", "test:///default", "--json", "autoscale", "--once", "--policy"])
        .arg(&policy)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .output()
        .expect("run vmplug");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let (last, events) =
        lines.split_last().unwrap_or_else(|| panic!("no output; stderr: {}", String::from_utf8_lossy(&out.stderr)));
    assert!(!events.is_empty(), "the silent agent's event: {stdout}");
    let v = events_schema();
    for line in events {
        check(&v, line);
    }
    let envelope = check(&validator(include_str!("../schema/vmplug-report.schema.json")), last);
    assert_eq!(envelope["operation"], "autoscale", "{stdout}");
    assert_eq!(envelope["exit_code"], out.status.code().expect("exited"), "{stdout}");
}
