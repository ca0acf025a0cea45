//! `GET /metrics` end to end: a real daemon, a real guest serving HTTP behind
//! the proxy, snapshots in a real S3-compatible server (s3s-fs), and every
//! scrape read by the Prometheus project's own text parser (Debian's
//! python3-prometheus-client, `prometheus_client.parser`). The series move
//! as a VM is created, called, proxied, snapshotted, restored, forked,
//! stopped, started, put to sleep, woken and deleted; the API is counted by
//! route template; no label names a VM, an owner or a route; and only the
//! holder of HATCH_METRICS_TOKEN reads any of it.

#[macro_use]
mod common;
use common::web::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

const TOKEN: &str = "metrics-test-token-0123456789abcdef";

/// Reads Prometheus text on stdin with the reference parser and prints its
/// families as JSON. A line it cannot parse is an exception: exit 1.
const PARSER: &str = r#"
import json, sys
from prometheus_client.parser import text_string_to_metric_families
out = []
for f in text_string_to_metric_families(sys.stdin.read()):
    out.append({
        "name": f.name, "type": f.type, "help": f.documentation,
        "samples": [{"name": s.name, "labels": s.labels, "value": s.value} for s in f.samples],
    })
print(json.dumps(out))
"#;

/// One scrape: each sample by name and labels, and each family's type and help.
struct Metrics {
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
    families: Vec<Value>,
    text: String,
}

impl Metrics {
    /// The sample `name{labels}`; a missing series is a failure, not a zero.
    fn get(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (name.to_string(), labels_of(labels));
        *self
            .samples
            .get(&key)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// `get`, or 0 when the series does not exist (yet).
    fn get_or_zero(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let key = (name.to_string(), labels_of(labels));
        self.samples.get(&key).copied().unwrap_or(0.0)
    }

    /// How many times `operation` ended as `result` (the histogram's count).
    fn ops(&self, operation: &str, result: &str) -> f64 {
        let labels = [("operation", operation), ("result", result)];
        let count = self.get("hatch_operation_duration_seconds_count", &labels);
        let inf = self.get(
            "hatch_operation_duration_seconds_bucket",
            &[("operation", operation), ("result", result), ("le", "+Inf")],
        );
        assert_eq!(
            count, inf,
            "{operation}/{result}: _count is the +Inf bucket"
        );
        count
    }

    fn vms(&self, state: &str) -> f64 {
        self.get("hatch_vms", &[("state", state)])
    }

    fn bytes(&self, direction: &str) -> f64 {
        self.get(
            "hatch_object_store_bytes_total",
            &[("direction", direction)],
        )
    }

    fn api(&self, method: &str, route: &str, status: &str) -> f64 {
        self.get_or_zero(
            "hatch_api_requests_total",
            &[("method", method), ("route", route), ("status", status)],
        )
    }

    fn proxied(&self, class: &str) -> f64 {
        self.get_or_zero(
            "hatch_proxy_request_duration_seconds_count",
            &[("status_class", class)],
        )
    }

    /// Every VM state at `want` (running etc. named, the rest 0).
    fn assert_states(&self, want: &[(&str, f64)]) {
        for state in [
            "starting",
            "running",
            "stopping",
            "stopped",
            "snapshotted",
            "error",
        ] {
            let n = want.iter().find(|(s, _)| *s == state).map_or(0.0, |w| w.1);
            assert_eq!(self.vms(state), n, "VMs {state}:\n{}", self.text);
        }
    }

    /// No label value anywhere contains `needle` (an id, a name, a subdomain).
    fn assert_names_nothing(&self, needle: &str) {
        assert!(
            !self.text.contains(needle),
            "{needle:?} is in:\n{}",
            self.text
        );
        for (name, labels) in self.samples.keys() {
            assert!(
                labels.values().all(|v| !v.contains(needle)),
                "{name}{labels:?} names {needle}"
            );
        }
    }
}

fn labels_of(labels: &[(&str, &str)]) -> BTreeMap<String, String> {
    labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// Parses Prometheus text with the reference parser (Debian's, run by
/// Debian's python3: the package installs for that interpreter).
fn parse(text: &str) -> Vec<Value> {
    let mut child = Command::new("/usr/bin/python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run /usr/bin/python3 (scripts/test installs python3-prometheus-client)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused the text: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn scrape(d: &Daemon) -> Metrics {
    let r = d.curl(
        "GET",
        "/metrics",
        &[format!("Authorization: Bearer {TOKEN}")],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let families = parse(&r.text);
    let mut samples = BTreeMap::new();
    for f in &families {
        for s in f["samples"].as_array().unwrap() {
            let labels = s["labels"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            let key = (s["name"].as_str().unwrap().to_string(), labels);
            let old = samples.insert(key, s["value"].as_f64().unwrap());
            assert!(old.is_none(), "a sample twice in one scrape: {s}");
        }
    }
    Metrics {
        samples,
        families,
        text: r.text,
    }
}

/// A curl through the proxy for `host`: (status, body).
fn via_proxy(d: &Daemon, host: &str) -> (u16, String) {
    let resolve = format!("{host}:8081:127.0.0.1");
    let out = d.in_ns(
        None,
        &[
            "curl",
            "-sS",
            "--max-time",
            "120",
            "--resolve",
            &resolve,
            "-w",
            "\n%{http_code}",
            &format!("http://{host}:8081/"),
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn state(d: &Daemon, vm: &str) -> String {
    d.vm(vm)["state"].as_str().unwrap().to_string()
}

/// Only the token opens `/metrics`: not an API key, not another token, not
/// another header. Returns the Content-Type of an accepted scrape.
fn check_protection(d: &Daemon) -> String {
    let denied = [
        vec![],
        vec![format!("Authorization: Bearer {}", d.key)],
        vec![format!("Authorization: Bearer {TOKEN}x")],
        vec![format!("Authorization: Basic {TOKEN}")],
        vec![format!("X-API-Key: {TOKEN}")],
    ];
    for headers in denied {
        let r = d.curl("GET", "/metrics", &headers, None);
        assert_eq!(r.status, 401, "{headers:?}: {}", r.text);
        assert!(r.error().contains("HATCH_METRICS_TOKEN"), "{}", r.text);
    }
    let out = d
        .curl_in_ns("30")
        .args(["-o", "/dev/null", "-w", "%{http_code} %{content_type}"])
        .args(["-H", &format!("Authorization: Bearer {TOKEN}")])
        .arg(format!("{BASE}/metrics"))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn metrics_follow_a_vm_through_its_life_and_name_no_one() {
    let d = Daemon::start_storage_with(
        Storage::S3,
        &[
            ("HATCH_METRICS_TOKEN", TOKEN),
            ("HATCH_IDLE_CHECK_INTERVAL", "1s"),
        ],
    );
    let answer = check_protection(&d);
    assert_eq!(
        answer, "200 text/plain; version=0.0.4; charset=utf-8",
        "the Prometheus text format"
    );

    let m = scrape(&d);
    for f in &m.families {
        let t = f["type"].as_str().unwrap();
        assert!(
            ["counter", "gauge", "histogram"].contains(&t),
            "{}: {t}",
            f["name"]
        );
        assert!(
            !f["help"].as_str().unwrap().is_empty(),
            "{} has no help",
            f["name"]
        );
    }
    m.assert_states(&[]);
    for op in ["boot", "stop", "snapshot", "restore", "fork", "wake"] {
        assert_eq!(m.ops(op, "ok") + m.ops(op, "error"), 0.0, "{op}");
    }
    assert_eq!(m.get("hatch_idle_sleeps_total", &[("result", "ok")]), 0.0);
    assert_eq!(m.get("hatch_wakes_total", &[("result", "ok")]), 0.0);
    assert_eq!((m.bytes("up"), m.bytes("down")), (0.0, 0.0));

    // Create: a boot, a running VM, one POST /vms counted.
    let vm = id_of(&d.create_vm(&json!({ "user_data": web_user_data(None) }).to_string()));
    d.wait_console(&vm, READY_LINE);
    let m = scrape(&d);
    m.assert_states(&[("running", 1.0)]);
    assert_eq!(m.ops("boot", "ok"), 1.0);
    assert!(
        m.get(
            "hatch_operation_duration_seconds_sum",
            &[("operation", "boot"), ("result", "ok")]
        ) > 0.0
    );
    assert_eq!(m.api("POST", "/vms", "201"), 1.0);

    // The API is counted by route template and status, whatever the id,
    // the key or the path.
    let before = scrape(&d);
    for _ in 0..3 {
        assert_eq!(d.req("GET", &format!("/vms/{vm}"), None).status, 200);
    }
    assert_eq!(d.req("GET", "/vms/vm_000000000000", None).status, 404);
    assert_eq!(d.curl("GET", &format!("/vms/{vm}"), &[], None).status, 401);
    assert_eq!(d.req("GET", &format!("/nowhere/{vm}"), None).status, 404);
    let after = scrape(&d);
    for (method, route, status, n) in [
        ("GET", "/vms/{vm_id}", "200", 3.0),
        ("GET", "/vms/{vm_id}", "404", 1.0),
        ("GET", "/vms/{vm_id}", "401", 1.0),
        ("GET", "unmatched", "404", 1.0),
        ("GET", "/metrics", "200", 1.0),
    ] {
        assert_eq!(
            after.api(method, route, status) - before.api(method, route, status),
            n,
            "{method} {route} {status}"
        );
    }

    // The proxy: answers by status class.
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/routes"),
        Some(r#"{"target_port": 80, "subdomain": "site"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let before = scrape(&d);
    assert_eq!(via_proxy(&d, "site.localhost").0, 200);
    assert_eq!(via_proxy(&d, "nope.localhost").0, 404);
    let after = scrape(&d);
    assert_eq!(after.proxied("2xx") - before.proxied("2xx"), 1.0);
    assert_eq!(after.proxied("4xx") - before.proxied("4xx"), 1.0);

    // Snapshot (Hatch API): the VM sleeps in the store.
    let before = scrape(&d);
    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    let stored = r.body["size_bytes"].as_f64().unwrap();
    let m = scrape(&d);
    m.assert_states(&[("snapshotted", 1.0)]);
    assert_eq!(m.ops("snapshot", "ok"), 1.0);
    // This owner's first snapshot: every byte it stores is new, and sent once.
    let up = m.bytes("up") - before.bytes("up");
    assert!(stored > f64::from(1 << 20), "{stored}");
    assert_eq!(up, stored, "bytes sent up for a snapshot of {stored} bytes");

    // Restore: the VM runs again, its memory came down from the store.
    let r = d.req("POST", &format!("/vms/{vm}/restore"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let after = scrape(&d);
    after.assert_states(&[("running", 1.0)]);
    assert_eq!(after.ops("restore", "ok"), 1.0);
    let down = after.bytes("down") - m.bytes("down");
    assert!(
        down > f64::from(1 << 20),
        "{down} bytes came down for a restore"
    );

    // A refused operation is not an operation: nothing to restore now.
    assert_eq!(
        d.req("POST", &format!("/vms/{vm}/restore"), None).status,
        409
    );
    let m = scrape(&d);
    assert_eq!(
        (m.ops("restore", "ok"), m.ops("restore", "error")),
        (1.0, 0.0)
    );

    // A checkpoint (Hypeman) and a fork of it, running beside its source.
    let r = d.req(
        "POST",
        &format!("/instances/{vm}/snapshots"),
        Some(r#"{"kind": "Standby"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let snap = id_of(&r.body);
    let r = d.req(
        "POST",
        &format!("/snapshots/{snap}/fork"),
        Some(r#"{"name": "twin"}"#),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let twin = id_of(&r.body);
    let m = scrape(&d);
    m.assert_states(&[("running", 2.0)]);
    assert_eq!(m.ops("snapshot", "ok"), 2.0);
    assert_eq!(m.ops("fork", "ok"), 1.0);
    assert_eq!(m.api("POST", "/snapshots/{snapshot_id}/fork", "201"), 1.0);
    let r = d.req("DELETE", &format!("/vms/{twin}"), None);
    assert_eq!(r.status, 200, "{}", r.text);

    // Stop, then start: a stop and a second boot.
    assert_eq!(d.req("POST", &format!("/vms/{vm}/stop"), None).status, 200);
    let m = scrape(&d);
    m.assert_states(&[("stopped", 1.0)]);
    assert_eq!(m.ops("stop", "ok"), 1.0);
    // A snapshot refused (a stopped VM cannot sleep) is not a snapshot.
    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 409, "{}", r.text);
    let after = scrape(&d);
    assert_eq!(after.ops("snapshot", "ok"), 2.0);
    assert_eq!(after.ops("snapshot", "error"), 0.0);
    assert_eq!(d.req("POST", &format!("/vms/{vm}/start"), None).status, 200);
    wait_until("the web guest's second boot", BOOT_TIMEOUT, || {
        d.logs(&vm).matches(READY_LINE).count() >= 2
    });
    let m = scrape(&d);
    m.assert_states(&[("running", 1.0)]);
    assert_eq!(m.ops("boot", "ok"), 2.0);

    // Idle sleep, then a proxied request wakes it.
    let r = d.req(
        "PATCH",
        &format!("/vms/{vm}"),
        Some(r#"{"idle_timeout_seconds": 2}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_until("the idle VM to sleep", Duration::from_secs(120), || {
        state(&d, &vm) == "snapshotted"
    });
    // The VM shows `snapshotted` as its sleep ends; the sleep is counted just after.
    wait_until("the sleep counted", Duration::from_secs(30), || {
        scrape(&d).get("hatch_idle_sleeps_total", &[("result", "ok")]) >= 1.0
    });
    let asleep = scrape(&d);
    assert_eq!(
        asleep.get("hatch_idle_sleeps_total", &[("result", "ok")]),
        1.0
    );
    assert_eq!(asleep.ops("snapshot", "ok"), 3.0);
    asleep.assert_states(&[("snapshotted", 1.0)]);
    let (code, body) = via_proxy(&d, "site.localhost");
    assert_eq!(code, 200, "{body}");
    let awake = scrape(&d);
    assert_eq!(awake.get("hatch_wakes_total", &[("result", "ok")]), 1.0);
    assert_eq!(awake.ops("wake", "ok"), 1.0);
    assert!(
        awake.bytes("down") > asleep.bytes("down"),
        "the wake read the store"
    );
    assert_eq!(awake.proxied("2xx") - asleep.proxied("2xx"), 1.0);

    // Nothing names a tenant: not the VMs, the snapshot, the route, the owner.
    let owner_id = d.db_value("SELECT id FROM owners WHERE name = 'alice'");
    assert!(owner_id.starts_with("own_"), "{owner_id}");
    for needle in [&vm, &twin, &snap, "site", "twin", "alice", &owner_id] {
        awake.assert_names_nothing(needle);
    }

    // Delete: no VM in any state.
    let r = d.req("DELETE", &format!("/vms/{vm}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    scrape(&d).assert_states(&[]);
}

/// Without HATCH_METRICS_TOKEN, `/metrics` does not exist, for any key.
#[test]
fn metrics_do_not_exist_without_a_token() {
    let d = Daemon::start();
    let unknown = d.req("GET", "/no-such-path", None);
    assert_eq!(unknown.status, 404);
    for headers in [
        vec![],
        vec![format!("Authorization: Bearer {}", d.key)],
        vec![format!("Authorization: Bearer {TOKEN}")],
    ] {
        for method in ["GET", "POST"] {
            let r = d.curl(method, "/metrics", &headers, None);
            assert_eq!(r.status, 404, "{method} {headers:?}: {}", r.text);
            assert_eq!(r.body, unknown.body, "the same 404 as any unknown path");
        }
    }
}
