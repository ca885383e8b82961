//! `vmplug verify-image` on three images, each giving the verdicts its kernel and
//! userland deserve: the Debian systemd image with the vmplug-guest package, as
//! a qcow2 that boots through its own loader, passes every case; the image with only the udev rules passes what a console
//! can prove and skips the rest with the reason; Debian's stock arm64 kernel
//! (no ACPI memory hot-plug) fails the DIMM cases, naming the kernel option.
//! The command is the real binary; its harness is the one this suite uses.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::SystemTime;

use vmplug_e2e::guest::Arch;
use vmplug_e2e::images::{bootable_image, systemd_image};
use vmplug_e2e::initramfs::initramfs;
use vmplug_e2e::Env;

/// Runs `vmplug verify-image` with `args`; (exit code, stdout). Its run
/// directory (the one whose owner record names its PID) must be gone when it
/// has exited.
fn verify(args: &[&str]) -> (i32, String) {
    let env = Env::get();
    let work = env.work.join("verify");
    let child = Command::new(&env.vmplug)
        .arg("verify-image")
        .args(args)
        .arg("--work-dir")
        .arg(&work)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmplug verify-image");
    let pid = child.id();
    let out = child.wait_with_output().expect("vmplug verify-image finished");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!(
        "$ vmplug verify-image {}\n[exit {:?}]\n{stdout}{}",
        args.join(" "),
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        vmplug_e2e::verify::run_dirs_of(&work, pid),
        Vec::<PathBuf>::new(),
        "the run's work directory is removed"
    );
    (out.status.code().unwrap_or(-1), stdout)
}

/// (length, mtime) of a file: the image must be exactly as it was.
fn stamp(p: &Path) -> (u64, SystemTime) {
    let m = std::fs::metadata(p).expect("image");
    (m.len(), m.modified().expect("mtime"))
}

fn bookworm_boot() -> (PathBuf, PathBuf) {
    let env = Env::get();
    let kernel = vmplug_e2e::env::Kernel { image: env.kernel.clone(), modules: env.modules.clone() };
    (env.kernel.clone(), initramfs(env, &kernel, Arch::X86_64))
}

fn cases(doc: &serde_json::Value) -> Vec<(String, String, String)> {
    doc["cases"]
        .as_array()
        .expect("cases")
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default().to_string(),
                c["verdict"].as_str().unwrap_or_default().to_string(),
                c["reason"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

#[test]
fn the_packaged_systemd_image_boots_by_itself_and_passes_the_matrix() {
    // A qcow2 with its own boot loader: no --kernel, libvirt's default firmware.
    let image = bootable_image("agent");
    let before = stamp(&image);
    let (code, out) = verify(&[&image.to_string_lossy(), "--report", "json"]);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("--report json prints the envelope");
    vmplug_e2e::schema::assert_valid(&doc, &["verify-image", "--report", "json"]);
    let all = cases(&doc);
    let ids: Vec<&str> = all.iter().map(|(id, _, _)| id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "boot",
            "cpu-plug",
            "dimm-plug-node0",
            "dimm-plug-node1",
            "dimm-misaligned",
            "dimm-unplug",
            "virtio-mem-grow",
            "virtio-mem-shrink",
            "agent-restart"
        ]
    );
    for (id, verdict, reason) in &all {
        assert_eq!(verdict, "pass", "{id}: {reason}");
    }
    assert_eq!((code, doc["outcome"].as_str()), (0, Some("ok")));
    assert_eq!(doc["accel"]["kind"], "tcg", "this machine's /dev/kvm is PVM-based: TCG, and said so");
    assert!(doc["accel"]["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(doc["guest"]["agent"]["kernel"].as_str().map(|k| k.starts_with("6.1.")), Some(true));
    assert!(doc["guest"]["console_shell"].as_bool().unwrap_or(false));
    let restart = &doc["cases"][8];
    assert!(
        restart["evidence"]
            .as_array()
            .expect("evidence")
            .iter()
            .any(|e| e.as_str().is_some_and(|e| e.starts_with("agent pid"))),
        "{restart}"
    );
    assert_eq!(doc["image"]["format"], "qcow2");
    let config: Vec<&str> =
        doc["guest"]["kernel_config"].as_array().expect("kernel_config").iter().filter_map(|l| l.as_str()).collect();
    assert!(config.contains(&"CONFIG_ACPI_HOTPLUG_MEMORY=y"), "the image's /boot/config is read: {config:?}");
    assert_eq!(stamp(&image), before, "the image is never written");
}

#[test]
fn the_udev_only_image_passes_what_it_can_and_says_why_the_rest_is_skipped() {
    let image = systemd_image("udev");
    let before = stamp(&image);
    let (kernel, initrd) = bookworm_boot();
    let (code, out) = verify(&[
        &image.to_string_lossy(),
        "--kernel",
        &kernel.to_string_lossy(),
        "--initrd",
        &initrd.to_string_lossy(),
        "--append",
        "vmplug.root=/dev/vda quiet",
        "--report",
        "junit",
        "--cells",
        "1",
        "--max-vcpus",
        "2",
    ]);
    let doc = roxmltree::Document::parse(&out).unwrap_or_else(|e| panic!("--report junit prints XML: {e}\n{out}"));
    let verdict = |id: &str| {
        let case = doc
            .descendants()
            .find(|n| n.has_tag_name("testcase") && n.attribute("name") == Some(id))
            .unwrap_or_else(|| panic!("no testcase {id}"));
        let skipped = case.children().find(|n| n.has_tag_name("skipped")).and_then(|n| n.attribute("message"));
        let failed = case.children().find(|n| n.has_tag_name("failure")).and_then(|n| n.attribute("message"));
        match (skipped, failed) {
            (Some(why), _) => ("skip", why.to_string()),
            (_, Some(why)) => ("fail", why.to_string()),
            _ => ("pass", String::new()),
        }
    };
    for id in ["boot", "cpu-plug", "dimm-plug-node0"] {
        assert_eq!(verdict(id).0, "pass", "{id}: {}", verdict(id).1);
    }
    let why = |id: &str| {
        let (v, why) = verdict(id);
        assert_eq!(v, "skip", "{id}: {why}");
        why
    };
    assert!(why("dimm-misaligned").contains("without an agent"));
    assert!(why("dimm-unplug").contains("no agent"));
    assert!(why("virtio-mem-grow").contains("without an agent"));
    assert!(why("agent-restart").contains("no agent"));
    let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).expect("testsuite");
    assert_eq!(suite.attribute("failures"), Some("0"));
    assert_eq!(code, 0, "no case failed");
    assert_eq!(stamp(&image), before, "the image is never written");
}

#[test]
fn a_kernel_without_acpi_memory_hotplug_fails_the_dimm_cases_naming_the_option() {
    let env = Env::get();
    let initrd = initramfs(env, env.arm64(), Arch::Aarch64);
    // The image here is the kernel and initramfs; the disk is a blank raw file.
    let dir = env.work.join(format!("verify-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let disk = dir.join("blank.img");
    std::fs::File::create(&disk).and_then(|f| f.set_len(16 << 20)).expect("blank disk");
    let (code, out) = verify(&[
        &disk.to_string_lossy(),
        "--arch",
        "aarch64",
        "--kernel",
        &env.arm64().image.to_string_lossy(),
        "--initrd",
        &initrd.to_string_lossy(),
        "--append",
        "console=ttyAMA0 acpi=force quiet",
        "--json",
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    let doc: serde_json::Value = serde_json::from_str(&out).expect("--json prints the envelope");
    vmplug_e2e::schema::assert_valid(&doc, &["verify-image", "--json"]);
    assert_eq!((code, doc["outcome"].as_str()), (5, Some("guest_failed")), "a failed case is the guest's failure");
    for c in doc["cases"].as_array().expect("cases") {
        let id = c["id"].as_str().unwrap_or_default();
        if id.starts_with("dimm-plug-node") {
            assert_eq!(c["verdict"], "fail", "{c}");
            assert_eq!(c["kernel_option"], "CONFIG_ACPI_HOTPLUG_MEMORY", "{c}");
        }
    }
    let by_id = |id: &str| doc["cases"].as_array().expect("cases").iter().find(|c| c["id"] == id).cloned().expect(id);
    assert_eq!(by_id("virtio-mem-grow")["verdict"], "pass", "virtio-mem needs no ACPI");
    assert_eq!(by_id("virtio-mem-shrink")["verdict"], "pass");
    let cpu = by_id("cpu-plug");
    assert_eq!(cpu["verdict"], "skip", "QEMU's limit is the host's, not the image's: {cpu}");
    assert_eq!(by_id("dimm-unplug")["verdict"], "skip");
    assert!(doc["machine"].as_str().is_some_and(|m| m.starts_with("virt-")));
}
