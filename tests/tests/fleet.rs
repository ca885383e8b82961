//! The fleet's monitoring drives a host's autoscale: Debian's real Prometheus
//! scrapes `vmplug autoscale`, an alerting rule on the guest-verified memory
//! series fires, Alertmanager delivers it to autoscale's webhook, and the guest
//! grows through the closed loop — verified inside the guest. Everything on
//! loopback, every process started here and stopped by PID.

use std::process::{Command, Stdio};
use std::time::Duration;

use vmplug_e2e::procs::{free_port, http, query_path, start, wait_for, Procs};
use vmplug_e2e::{Env, Guest, GuestSpec};

const MIB: u64 = 1024 * 1024;

#[test]
fn prometheus_alert_through_alertmanager_grows_the_guest() {
    let mut g = Guest::boot("fleet", GuestSpec { cells_mib: vec![512], max_vcpus: 2, ..GuestSpec::default() });
    let name = g.name.clone();
    let dir = g.dir.clone();
    let (metrics, webhook, prom, am) = (free_port(), free_port(), free_port(), free_port());

    // Autoscale: pressure alone would never act here (thresholds out of reach);
    // only the alert can.
    let policy = format!(
        "metrics_listen = '127.0.0.1:{metrics}'\nwebhook_listen = '127.0.0.1:{webhook}'\n\
         [select]\nnames = ['{name}']\n[timing]\ninterval_s = 1\nsustain = 1\ncooldown_s = 600\n\
         [cpu]\npsi_some_avg10 = 100.0\n[memory]\nstep = '256M'\nmax = '2G'\navailable_below = '1M'\n\
         psi_some_avg10 = 100.0\npsi_full_avg10 = 100.0\n"
    );
    std::fs::write(dir.join("policy.toml"), policy).expect("policy");
    std::fs::write(
        dir.join("rules.yml"),
        format!(
            "groups:\n- name: vmplug\n  rules:\n  - alert: GuestLowMemory\n    expr: vmplug_guest_memory_available_bytes{{domain=\"{name}\"}} < 4294967296\n    labels:\n      resource: memory\n"
        ),
    )
    .expect("rules");
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files: ['{}']\n\
             alerting:\n  alertmanagers:\n  - static_configs:\n    - targets: ['127.0.0.1:{am}']\n\
             scrape_configs:\n- job_name: vmplug\n  static_configs:\n  - targets: ['127.0.0.1:{metrics}']\n",
            dir.join("rules.yml").display()
        ),
    )
    .expect("prometheus config");
    std::fs::write(
        dir.join("alertmanager.yml"),
        format!(
            "route:\n  receiver: vmplug\n  group_by: [alertname, domain]\n  group_wait: 1s\n  group_interval: 1s\n  repeat_interval: 1h\n\
             receivers:\n- name: vmplug\n  webhook_configs:\n  - url: http://127.0.0.1:{webhook}/alerts\n    send_resolved: false\n"
        ),
    )
    .expect("alertmanager config");

    let before = g.mem_total_kib();
    let events = dir.join("events.jsonl");
    let out = std::fs::File::create(&events).expect("events");
    let mut procs = Procs(vec![]);
    procs.0.push(
        Command::new(&Env::get().vmplug)
            .args(["-c", &g.daemon.uri, "autoscale", "--policy"])
            .arg(dir.join("policy.toml"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(std::fs::File::create(dir.join("autoscale.log")).expect("log"))
            .spawn()
            .expect("autoscale"),
    );
    wait_for("the webhook receiver listening", Duration::from_secs(30), || http(webhook, "GET", "/", ""));

    // The receiver's refusals: nothing is done for them. A payload that is
    // not Alertmanager's is a 400; an alert for a domain it does not run is
    // judged alone, and the 200 says so.
    assert_eq!(http(webhook, "POST", "/alerts", "{not json").map(|r| r.0), Some(400));
    let unknown =
        r#"{"version":"4","alerts":[{"status":"firing","labels":{"alertname":"X","domain":"no-such-domain"}}]}"#;
    let (code, body) = http(webhook, "POST", "/alerts", unknown).expect("answer");
    assert_eq!(code, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("a JSON answer");
    assert_eq!(answer["alerts"][0]["result"], "rejected", "{body}");
    assert_eq!(http(webhook, "GET", "/alerts", "").map(|r| r.0), Some(405));

    procs.0.push(start(
        &dir,
        "prometheus",
        Command::new("prometheus")
            .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("prom-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{prom}")),
    ));
    procs.0.push(start(
        &dir,
        "alertmanager",
        Command::new("prometheus-alertmanager")
            .arg(format!("--config.file={}", dir.join("alertmanager.yml").display()))
            .arg(format!("--storage.path={}", dir.join("am-data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{am}"))
            .arg("--cluster.listen-address="),
    ));

    // Prometheus has scraped the guest-verified series: the guest's own CPU count.
    let online = g.online_cpus().trim().to_string();
    let q = query_path(&format!("vmplug_guest_cpus_online{{domain=\"{name}\"}}"));
    let value = wait_for("Prometheus to have the guest's CPUs", Duration::from_secs(90), || {
        let (code, body) = http(prom, "GET", &q, "")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 200).then_some(())?;
        v["data"]["result"][0]["value"][1].as_str().map(str::to_string)
    });
    assert_eq!(value, online.split(',').count().to_string(), "Prometheus reads what the agent read ({online})");

    // The alert fires, Alertmanager delivers it, autoscale grows the guest.
    let ev = wait_for("an alert-driven action", Duration::from_secs(180), || {
        std::fs::read_to_string(&events)
            .ok()?
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["rule"] == "alert.memory" && !e["outcome"].is_null())
    });
    assert_eq!(ev["outcome"], "ok", "{ev}");
    assert_eq!(ev["domain"], name.as_str(), "{ev}");
    assert!(ev["reason"].as_str().is_some_and(|r| r.contains("GuestLowMemory")), "{ev}");
    assert_eq!(ev["action"]["kind"], "add_memory", "{ev}");
    assert_eq!(g.mem_total_kib() - before, 256 * MIB / 1024, "the guest has exactly one step more");
    let (_, m) = http(metrics, "GET", "/metrics", "").expect("metrics");
    assert!(m.contains("vmplug_alerts_total{result=\"accepted\"}"), "{m}");
    assert!(m.contains("vmplug_alerts_total{result=\"malformed\"} 1"), "{m}");
    assert!(m.contains("vmplug_alerts_total{result=\"rejected\"} 1"), "{m}");
    drop(procs);
}
