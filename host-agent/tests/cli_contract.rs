//! The output contract of the real `vmplug` binary (README, "Exit codes" and
//! `schema/vmplug-report.schema.json`), against libvirt's `test:///default`:
//! every command prints one JSON envelope under `--json`, on success and on
//! every error, and exits with the code its outcome names. Also virsh's
//! conventions (`--current`) and a quiet libvirt (one error line, vmplug's).

use std::process::Command;

fn vmplug(args: &[&str]) -> (u8, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_vmplug"))
        .args(args)
        .env_remove("LIBVIRT_DEFAULT_URI")
        .output()
        .expect("run vmplug");
    let code = out.status.code().expect("exited") as u8;
    (code, String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

fn schema() -> jsonschema::Validator {
    let text = include_str!("../schema/vmplug-report.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema compiles")
}

/// Runs with `--json` against the test driver; checks the document against the
/// schema and the exit code against the document; returns both.
fn json(args: &[&str]) -> (u8, serde_json::Value) {
    let mut full = vec!["-c", "test:///default", "--json"];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = vmplug(&full);
    let doc: serde_json::Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{args:?}: stdout is one JSON document ({e}):\n{stdout}\nstderr: {stderr}"));
    let v = schema();
    let errors: Vec<String> = v.iter_errors(&doc).map(|e| format!("{} at {}", e, e.instance_path)).collect();
    assert!(errors.is_empty(), "{args:?}: output does not match the schema: {errors:?}\n{doc:#}");
    assert_eq!(doc["exit_code"], code, "{args:?}: exit code and envelope agree\n{doc:#}");
    assert!(!stderr.contains("libvirt:"), "{args:?}: libvirt's own error printer is silenced: {stderr}");
    (code, doc)
}

/// The test driver's domain `test` (id 1), as `virsh -c test:///default domuuid test` says.
const TEST_UUID: &str = "6695eb01-f6a4-8304-79aa-97f2502e193f";

#[test]
fn every_verb_prints_the_envelope_and_exits_with_its_outcome() {
    // (args, exit code, outcome)
    let cases: &[(&[&str], u8, &str)] = &[
        (&["schedinfo", "test"], 0, "ok"),
        (&["schedinfo", "test", "--current"], 0, "ok"),
        (&["vcpupin", "test"], 0, "ok"),
        (&["vcpupin", "test", "0", "0"], 0, "ok"),
        (&["emulatorpin", "test"], 0, "ok"),
        (&["numa", "test"], 0, "ok"),
        (&["status", "test"], 0, "ok"),
        (&["status", "no-such-domain"], 1, "error"),
        (&["setvcpus", "no-such-domain", "2"], 1, "error"),
        // Refused by preflight: nothing changed.
        (&["emulatorpin", "test", "1000"], 2, "refused"),
        (&["vcpupin", "test", "0", "1000"], 2, "refused"),
        (&["schedinfo", "test", "cpu_shares=0"], 2, "refused"),
        (&["attach-memory", "test", "1G"], 2, "refused"),
        (&["resize-memory", "test", "+1G"], 2, "refused"),
        (&["resize-memory", "test", "-1G"], 2, "refused"),
        (&["add-virtio-mem", "test", "1G", "--block", "3M"], 2, "refused"),
        // The command line is wrong: usage, 64.
        (&["vcpupin", "test", "0"], 64, "usage"),
        (&["schedinfo", "test", "cpu_shares=x"], 64, "usage"),
        (&["schedinfo", "test", "--live", "--current"], 64, "usage"),
        (&["attach-memory", "test", "1024"], 64, "usage"),
        (&["numatune", "test", "--nodeset", "^1"], 64, "usage"),
        (&["check", "test", "--node", "0"], 64, "usage"),
        (&["resize-memory", "test", "+1024"], 64, "usage"),
        (&["check", "test", "--resize", "1G1"], 64, "usage"),
        (&["no-such-verb"], 64, "usage"),
        // The domain was read to know there is no such DIMM: refused, not usage.
        (&["detach-memory", "test", "--alias", "dimm9"], 2, "refused"),
        // virsh's flag forms beside vmplug's; both forms of one value: usage.
        (&["schedinfo", "test", "--set", "cpu_shares=0"], 2, "refused"),
        (&["schedinfo", "test", "cpu_shares=100", "--set", "cpu_shares=100"], 64, "usage"),
        (&["vcpupin", "test", "--vcpu", "0", "--cpulist", "0-1"], 0, "ok"),
        (&["vcpupin", "test", "0", "--cpulist", "0"], 0, "ok"),
        (&["vcpupin", "test", "0", "--vcpu", "0", "--cpulist", "0"], 64, "usage"),
        (&["vcpupin", "test", "--vcpu", "0"], 64, "usage"),
        (&["emulatorpin", "test", "--cpulist", "0-1"], 0, "ok"),
        (&["emulatorpin", "test", "0", "--cpulist", "0"], 64, "usage"),
        (&["setvcpus", "test", "1", "--count", "1"], 64, "usage"),
        (&["setvcpus", "test"], 64, "usage"),
        (&["setvcpus", "test", "--count", "2", "--maximum", "--config"], 64, "usage"),
        (&["setvcpus", "no-such-domain", "--count", "2"], 1, "error"),
        // A domain by name, ID or UUID, as virsh takes it.
        (&["status", "1"], 0, "ok"),
        (&["status", TEST_UUID], 0, "ok"),
        (&["status", "2"], 1, "error"),
        (&["prepare", "test", "--slots", "300", "--dry-run"], 2, "refused"),
        (&["meta", "test"], 0, "ok"),
        (&["meta", "test", "--tag", "a", "--tag", "b", "--agent", "hybrid:/run/x.vsock:1024"], 0, "ok"),
        (&["meta", "test", "--no-agent", "--untag", "a", "--live"], 0, "ok"),
        (&["meta", "no-such-domain", "--tag", "a"], 1, "error"),
        (&["meta", "test", "--tag", "two words"], 64, "usage"),
        (&["meta", "test", "--agent", "hybrid:/x:1", "--no-agent"], 64, "usage"),
    ];
    let (_, doc) = json(&["prepare", "test", "--slots", "0"]);
    assert!(doc["findings"][0]["id"].as_str().is_some_and(|id| !id.is_empty()), "a refusal names its rule: {doc:#}");
    for (args, code, outcome) in cases {
        let (got, doc) = json(args);
        assert_eq!((got, doc["outcome"].as_str().unwrap_or_default()), (*code, *outcome), "{args:?}:\n{doc:#}");
        if *code == 0 {
            assert!(doc["error"].is_null(), "{args:?}: {doc:#}");
        } else {
            assert!(doc["error"].as_str().is_some_and(|e| !e.is_empty()), "{args:?}: says why: {doc:#}");
        }
    }
}

/// `meta` prints the settings as libvirt holds them after the change: tags and
/// the agent's address side by side, in the live and persistent definitions.
#[test]
fn meta_prints_the_settings_libvirt_kept() {
    let (code, doc) = json(&["meta", "test", "--tag", "autoscale", "--tag", "web", "--agent", "vsock:42:1024"]);
    assert_eq!(code, 0, "{doc:#}");
    for view in ["live", "config"] {
        assert_eq!(doc[view]["tags"], serde_json::json!(["autoscale", "web"]), "{view}: {doc:#}");
        assert_eq!(doc[view]["agent"], "vsock:42:1024", "{view}: {doc:#}");
    }
    assert_eq!(doc["applied"].as_array().map(Vec::len), Some(2), "one set-metadata per definition: {doc:#}");
    let (code, text, _) = vmplug(&["-c", "test:///default", "meta", "test", "--tag", "autoscale", "--config"]);
    assert_eq!(code, 0);
    assert!(text.contains("config") && text.contains("autoscale") && !text.contains("live"), "{text}");
}

/// Verbs whose verdict depends on the test driver's domain: whatever they say,
/// they say it in the envelope, and the exit code is the outcome's.
#[test]
fn the_other_verbs_keep_the_contract_too() {
    for args in [
        &["check", "test"][..],
        &["check", "test", "--cpus", "1", "--config"],
        &["check", "test", "--memory", "1G", "--node", "0"],
        &["check", "test", "--resize", "+1G"],
        &["prepare", "test", "--dry-run"],
        &["setvcpus", "test", "1", "--config"],
        &["setvcpus", "test", "--count", "1", "--config"],
        &["numatune", "test"],
    ] {
        let (code, doc) = json(args);
        let outcome = doc["outcome"].as_str().unwrap_or_default().to_string();
        assert!(code == 0 || !doc["error"].is_null(), "{args:?}: a non-zero exit says why: {doc:#}");
        eprintln!("{args:?}: exit {code} ({outcome})");
    }
}

#[test]
fn a_connection_failure_is_a_libvirt_error_said_once() {
    let (code, stdout, stderr) = vmplug(&["-c", "bogus:///nowhere", "status", "x"]);
    assert_eq!(code, 3, "libvirt error: {stdout}{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "one line, vmplug's own: {stderr}");
    assert!(lines[0].starts_with("vmplug: cannot connect to bogus:///nowhere"), "{stderr}");
    let (code, doc) = {
        let (code, stdout, _) = vmplug(&["-c", "bogus:///nowhere", "--json", "status", "x"]);
        (code, serde_json::from_str::<serde_json::Value>(&stdout).expect("an envelope on error too"))
    };
    assert_eq!((code, doc["outcome"].as_str()), (3, Some("libvirt_error")), "{doc:#}");
    assert!(schema().is_valid(&doc), "{doc:#}");
}

#[test]
fn help_and_version_exit_zero() {
    assert_eq!(vmplug(&["--help"]).0, 0);
    assert_eq!(vmplug(&["attach-memory", "--help"]).0, 0);
    // -v as virsh -v; -V and --version as other tools.
    let (code, version, _) = vmplug(&["--version"]);
    assert_eq!(code, 0);
    assert!(version.contains(env!("CARGO_PKG_VERSION")), "{version}");
    for flag in ["-v", "-V"] {
        assert_eq!(vmplug(&[flag]), (0, version.clone(), String::new()), "{flag}");
    }
}

/// A domain given by ID or UUID is reported by its name; a DIMM alias that
/// does not exist is refused naming the ones that do; `setvcpus --maximum`
/// names the verb that changes the maximum.
#[test]
fn reports_name_the_domain_and_refusals_say_the_way() {
    for given in ["test", "1", TEST_UUID, &TEST_UUID.to_uppercase()] {
        let (code, doc) = json(&["status", given]);
        assert_eq!((code, doc["domain"].as_str()), (0, Some("test")), "{given}: {doc:#}");
        assert!(doc["memory_given"].as_u64().is_some_and(|m| m > 0), "{doc:#}");
        assert_eq!(doc["virtio_mem_capacity"], 0, "{doc:#}");
        assert_eq!(doc["memory"], doc["memory_given"], "no virtio-mem: memory is what the guest has: {doc:#}");
    }
    // schedinfo --set is the positional pair by another name (the test driver
    // takes no cpu_shares: both forms reach libvirt and get its answer).
    assert_eq!(json(&["schedinfo", "test", "--set", "cpu_shares=100"]), json(&["schedinfo", "test", "cpu_shares=100"]));
    let (_, doc) = json(&["detach-memory", "1", "--alias", "dimm9"]);
    assert_eq!(doc["domain"], "test", "{doc:#}");
    assert_eq!(doc["findings"][0]["id"], "unplug.dimm", "{doc:#}");
    let error = doc["error"].as_str().unwrap_or_default();
    assert!(error.contains("dimm9") && error.contains("its DIMMs: none"), "{doc:#}");
    let (code, _, stderr) = vmplug(&["-c", "test:///default", "setvcpus", "test", "--count", "8", "--maximum"]);
    assert_eq!(code, 64);
    assert!(stderr.contains("vmplug prepare test --max-vcpus"), "{stderr}");
}

/// Every argument of every verb says what it is (the issue found bare ones).
#[test]
fn every_argument_has_help() {
    use clap::CommandFactory;
    let cli = vmplug::cli::Cli::command();
    let mut missing = Vec::new();
    for sub in cli.get_subcommands() {
        for arg in sub.get_arguments() {
            if arg.get_help().is_none() && !["help", "version"].contains(&arg.get_id().as_str()) {
                missing.push(format!("{} {}", sub.get_name(), arg.get_id()));
            }
        }
    }
    assert!(missing.is_empty(), "arguments without help: {missing:?}");
}

/// verify-image's errors before any guest exists (no root, no libvirtd needed):
/// the envelope under --json and --report json, a JUnit <error> under
/// --report junit, exit 1 each time; a wrong combination is a usage error.
#[test]
fn verify_image_keeps_the_contract_before_any_guest_exists() {
    for flag in [&["--json"][..], &["--report", "json"][..]] {
        let mut args = vec!["verify-image", "/no/such/image.qcow2"];
        args.extend_from_slice(flag);
        let (code, stdout, _) = vmplug(&args);
        let doc: serde_json::Value =
            serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{args:?}: {e}\n{stdout}"));
        let errors: Vec<String> = schema().iter_errors(&doc).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "{args:?}: {errors:?}");
        assert_eq!(
            (code, doc["outcome"].as_str(), doc["operation"].as_str()),
            (1, Some("error"), Some("verify-image"))
        );
        assert!(doc["error"].as_str().is_some_and(|e| e.contains("/no/such/image.qcow2")), "{doc}");
    }
    let (code, stdout, stderr) = vmplug(&["verify-image", "/no/such/image.qcow2", "--report", "junit"]);
    assert_eq!(code, 1);
    assert!(
        stdout.starts_with("<?xml") && stdout.contains("<error message=\"verify-image: /no/such/image.qcow2"),
        "{stdout}"
    );
    assert!(stderr.contains("/no/such/image.qcow2"), "and said once on stderr: {stderr}");
    let (code, _, stderr) = vmplug(&["verify-image", "/no/such/image.qcow2", "--initrd", "/boot/initrd"]);
    assert_eq!(code, 64, "--initrd without --kernel is a usage error: {stderr}");
}

/// Security finding 8 (issue #26): `[host] concurrency = 4611686018427387904`
/// panicked (exit 101, no envelope) before the policy was checked. Now the
/// policy is checked before any host is made or opened: a usage error that
/// names the key and its bound.
#[test]
fn an_autoscale_policy_out_of_bounds_is_a_usage_error_not_a_panic() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (toml, says) in [
        (
            "[host]\nconcurrency = 4611686018427387904\n",
            "host.concurrency = 4611686018427387904 is not within 1..=1024",
        ),
        ("[timing]\nsustain = 33\n", "timing.sustain = 33 is over the 32 samples"),
    ] {
        let path = dir.path().join("policy.toml");
        std::fs::write(&path, toml).expect("write the policy");
        let (code, doc) = json(&["autoscale", "--policy", &path.to_string_lossy(), "--once"]);
        assert_eq!((code, doc["outcome"].as_str()), (vmplug::report::EXIT_USAGE, Some("usage")), "{toml}: {doc:#}");
        let error = doc["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{toml}: {error}");
    }
}
