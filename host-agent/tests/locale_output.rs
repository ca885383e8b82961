//! Text output follows the locale's character set (LC_ALL, then LC_CTYPE, then
//! LANG, as the C library decides): UTF-8 as written under a UTF-8 locale,
//! ASCII stand-ins (`--`, `...`) under C, POSIX or a locale without UTF-8.
//! JSON stays UTF-8 whatever the locale.

use std::process::Command;

fn run(env: &[(&str, &str)], args: &[&str]) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vmplug"));
    cmd.args(["-c", "test:///default"]).args(args).env_remove("LIBVIRT_DEFAULT_URI");
    for k in ["LC_ALL", "LC_CTYPE", "LANG"] {
        cmd.env_remove(k);
    }
    let out = cmd.envs(env.iter().copied()).output().expect("run vmplug");
    String::from_utf8(out.stdout).expect("stdout is UTF-8 (and ASCII in the C locale)")
}

/// Refused by preflight: the report says "REFUSED — …" and "slots='…'".
const REFUSED: &[&str] = &["attach-memory", "test", "1G"];

#[test]
fn a_utf8_locale_gets_the_text_as_written() {
    for env in [&[("LANG", "C.UTF-8")][..], &[("LC_ALL", "en_US.UTF-8"), ("LANG", "C")], &[("LC_CTYPE", "de_DE.utf8")]]
    {
        let text = run(env, REFUSED);
        assert!(text.contains("REFUSED —") && text.contains('…'), "{env:?}: {text}");
    }
}

#[test]
fn a_locale_that_is_not_utf8_gets_ascii() {
    for env in [
        &[][..],
        &[("LC_ALL", "C")],
        &[("LC_ALL", "POSIX"), ("LANG", "C.UTF-8")],
        &[("LC_CTYPE", "C"), ("LANG", "en_US.UTF-8")],
        &[("LANG", "en_US")],
        &[("LANG", "de_DE.ISO-8859-1")],
    ] {
        let text = run(env, REFUSED);
        assert!(text.is_ascii(), "{env:?}: {text}");
        assert!(text.contains("REFUSED --") && text.contains("slots='...'"), "{env:?}: {text}");
    }
}

#[test]
fn json_stays_utf8_under_the_c_locale() {
    let mut args = vec!["--json"];
    args.extend_from_slice(REFUSED);
    let doc: serde_json::Value = serde_json::from_str(&run(&[("LC_ALL", "C")], &args)).expect("one JSON document");
    assert!(doc.to_string().contains('…'), "{doc}");
}
