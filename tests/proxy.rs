//! The reverse proxy end to end: routes API, Host routing to real guests
//! (busybox httpd, a shell WebSocket echo server), wake on request, and idle
//! sleep. Clients are curl (HTTP/1.1 and HTTP/2), tokio-tungstenite
//! (WebSocket) and wrk (load), all inside the daemon's namespace.

#[macro_use]
mod common;
use common::web::*;
use common::*;
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, Instant};

const PROXY: &str = "127.0.0.1:8081";

/// A curl through the proxy for `host`: returns (status, body). `args` go before the URL.
fn via_proxy(d: &Daemon, host: &str, path: &str, args: &[&str]) -> (u16, String) {
    let url = format!("http://{host}:8081{path}");
    let resolve = format!("{host}:8081:127.0.0.1");
    let out = d.in_ns(
        None,
        &[
            &["curl", "-sS", "--max-time", "120", "--resolve", &resolve][..],
            args,
            &["-w", "\n%{http_code}", &url],
        ]
        .concat(),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn id_of(v: &Value) -> String {
    v["id"].as_str().unwrap().to_string()
}

fn web_vm(d: &Daemon, extra: Value) -> String {
    let mut body = json!({ "user_data": web_user_data(None) });
    for (k, v) in extra.as_object().unwrap() {
        body[k] = v.clone();
    }
    let id = id_of(&d.create_vm(&body.to_string()));
    d.wait_console(&id, "web-guest: ready");
    id
}

fn add_route(d: &Daemon, vm: &str, body: Value) -> Value {
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/routes"),
        Some(&body.to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    r.body
}

/// Log lines of the daemon that mention `vm` and `what`.
fn log_count(d: &Daemon, vm: &str, what: &str) -> usize {
    d.daemon_log()
        .lines()
        .filter(|l| l.contains(vm) && l.contains(what))
        .count()
}

fn state(d: &Daemon, vm: &str) -> String {
    d.vm(vm)["state"].as_str().unwrap().to_string()
}

fn wait_state(d: &Daemon, vm: &str, want: &str, timeout: Duration) {
    wait_until(&format!("{vm} {want}"), timeout, || state(d, vm) == want);
}

#[test]
fn routes_api_validates_conflicts_and_goes_with_the_vm() {
    let d = Daemon::start();
    let vm = id_of(&d.create_vm("{}"));
    let other = id_of(&d.create_vm("{}"));
    let path = format!("/vms/{vm}/routes");
    let post = |p: &str, body: &str| d.req("POST", p, Some(body));

    // Validation: nothing is created by a bad request.
    for (body, needle) in [
        ("{}", "target_port is required"),
        (r#"{"target_port": 0}"#, "target_port"),
        (r#"{"target_port": 65536}"#, "target_port"),
        (r#"{"target_port": "80"}"#, "invalid JSON"),
        (r#"{"target_port": 80, "subdomain": "api"}"#, "reserved"),
        (r#"{"target_port": 80, "subdomain": "www"}"#, "reserved"),
        (r#"{"target_port": 80, "subdomain": "Shop"}"#, "lowercase"),
        (r#"{"target_port": 80, "subdomain": "my_app"}"#, "lowercase"),
        (r#"{"target_port": 80, "subdomain": "a.b"}"#, "lowercase"),
        (r#"{"target_port": 80, "subdomain": "-app"}"#, "dash"),
        (r#"{"target_port": 80, "subdomain": "app-"}"#, "dash"),
        (r#"{"target_port": 80, "subdomain": ""}"#, "1 to 63"),
        (r#"{"target_port": 80, "port": 80}"#, "unknown field"),
    ] {
        let r = post(&path, body);
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    let long = "a".repeat(64);
    let r = post(
        &path,
        &json!({"target_port": 80, "subdomain": long}).to_string(),
    );
    assert_eq!(r.status, 400, "{}", r.text);
    let r = d.req("GET", &path, None);
    assert_eq!(r.body, json!([]), "no route was created by bad requests");

    // A valid route: given subdomain, defaults filled in.
    let max = format!("x{}", "-9".repeat(31));
    assert_eq!(max.len(), 63);
    let shop = add_route(&d, &vm, json!({"target_port": 8080, "subdomain": "shop-1"}));
    assert!(shop["id"].as_str().unwrap().starts_with("rt_"), "{shop}");
    assert_eq!(shop["vm_id"], vm.as_str());
    assert_eq!(shop["subdomain"], "shop-1");
    assert_eq!(shop["host"], "shop-1.localhost");
    assert_eq!(shop["url"], "http://shop-1.localhost:8081/");
    assert_eq!(shop["target_port"], 8080);
    assert_eq!(shop["auto_wake"], true);
    let edge = add_route(
        &d,
        &vm,
        json!({"target_port": 65535, "subdomain": max, "auto_wake": false}),
    );
    assert_eq!(edge["auto_wake"], false);
    // Omitted subdomain: a random valid one, different each time.
    let r1 = add_route(&d, &vm, json!({"target_port": 1}));
    let r2 = add_route(&d, &other, json!({"target_port": 1}));
    let (s1, s2) = (
        r1["subdomain"].as_str().unwrap(),
        r2["subdomain"].as_str().unwrap(),
    );
    assert_ne!(s1, s2);
    for s in [s1, s2] {
        assert!(
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "{s}"
        );
    }

    // A taken subdomain is a conflict, on the same VM or another one.
    for target in [&vm, &other] {
        let r = post(
            &format!("/vms/{target}/routes"),
            r#"{"target_port": 80, "subdomain": "shop-1"}"#,
        );
        assert_eq!(r.status, 409, "{}", r.text);
        assert!(r.error().contains("shop-1"), "{}", r.text);
    }

    // Listing, in creation order; another owner sees nothing.
    let r = d.req("GET", &path, None);
    assert_eq!(r.status, 200);
    assert_eq!(
        r.ids(),
        [&shop, &edge, &r1].map(id_of).to_vec(),
        "{}",
        r.text
    );
    let bob = d.create_key(&["--name", "bob"]);
    for (m, p, b) in [
        ("GET", path.clone(), None),
        ("POST", path.clone(), Some(r#"{"target_port": 80}"#)),
        ("DELETE", format!("{path}/{}", id_of(&shop)), None),
    ] {
        let r = d.as_key(&bob, m, &p, b);
        assert_eq!(r.status, 404, "{m} {p} as bob: {}", r.text);
    }
    let r = d.curl("GET", &path, &[], None);
    assert_eq!(r.status, 401);

    // Delete one route; unknown ids and a route of another VM are 404.
    let r = d.req("DELETE", &format!("{path}/rt_nope"), None);
    assert_eq!(r.status, 404, "{}", r.text);
    let r = d.req("DELETE", &format!("{path}/{}", id_of(&r2)), None);
    assert_eq!(r.status, 404, "a route of another VM: {}", r.text);
    let r = d.req("DELETE", &format!("{path}/{}", id_of(&edge)), None);
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"status": "deleted"}));
    assert_eq!(d.req("GET", &path, None).ids().len(), 2);

    // A VM without networking cannot have a route.
    let offline = id_of(&d.create_vm(r#"{"enable_network": false}"#));
    let r = post(&format!("/vms/{offline}/routes"), r#"{"target_port": 80}"#);
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.error().contains("no network"), "{}", r.text);

    // Deleting the VM deletes its routes: the subdomain is free again, and the
    // proxy no longer knows the host.
    let r = d.req("DELETE", &format!("/vms/{vm}"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, body) = via_proxy(&d, "shop-1.localhost", "/", &[]);
    assert_eq!(code, 404, "{body}");
    add_route(
        &d,
        &other,
        json!({"target_port": 80, "subdomain": "shop-1"}),
    );
    let r = d.req("GET", &format!("/vms/{vm}/routes"), None);
    assert_eq!(r.status, 404, "{}", r.text);
}

#[test]
fn vm_idle_settings_at_create_and_patch() {
    let d = Daemon::start();
    let vm = d.create_vm(r#"{"enable_network": false}"#);
    assert_eq!(vm["auto_sleep"], true);
    assert_eq!(vm["idle_timeout_seconds"], Value::Null);
    assert_eq!(vm["last_sleep_at"], Value::Null);
    assert_eq!(vm["last_wake_at"], Value::Null);
    let own = d
        .create_vm(r#"{"enable_network": false, "auto_sleep": false, "idle_timeout_seconds": 90}"#);
    assert_eq!(own["auto_sleep"], false);
    assert_eq!(own["idle_timeout_seconds"], 90);
    for body in [
        r#"{"idle_timeout_seconds": 0}"#,
        r#"{"idle_timeout_seconds": -5}"#,
        r#"{"idle_timeout_seconds": 2592001}"#,
        r#"{"auto_sleep": "no"}"#,
    ] {
        let r = d.req("POST", "/vms", Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text);
    }

    let id = id_of(&vm);
    let path = format!("/vms/{id}");
    for (body, needle) in [
        ("{}", "nothing to change"),
        (r#"{"idle_timeout_seconds": 0}"#, "idle_timeout_seconds"),
        (r#"{"vcpu_count": 2}"#, "unknown field"),
        (
            r#"{"snapshot_compression": {"enabled": true, "algorithm": "zstd", "level": 30}}"#,
            "snapshot_compression",
        ),
    ] {
        let r = d.req("PATCH", &path, Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    assert_eq!(d.vm(&id)["updated_at"], vm["updated_at"], "nothing changed");

    let r = d.req(
        "PATCH",
        &path,
        Some(r#"{"auto_sleep": false, "idle_timeout_seconds": 120}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["auto_sleep"], false);
    assert_eq!(r.body["idle_timeout_seconds"], 120);
    // Fields not given stay; null clears a timeout.
    let r = d.req(
        "PATCH",
        &path,
        Some(r#"{"idle_timeout_seconds": null, "snapshot_compression": {"enabled": true, "algorithm": "lz4"}}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["auto_sleep"], false);
    assert_eq!(r.body["idle_timeout_seconds"], Value::Null);
    assert_eq!(r.body["snapshot_compression"]["algorithm"], "lz4");
    assert_eq!(d.vm(&id)["snapshot_compression"]["algorithm"], "lz4");
    let r = d.req("PATCH", "/vms/vm_nope", Some(r#"{"auto_sleep": true}"#));
    assert_eq!(r.status, 404, "{}", r.text);
}

/// sha256 of a file, with the host's sha256sum.
fn sha256_file(path: &std::path::Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

#[test]
fn proxy_routes_by_host_streams_upgrades_and_reports_errors() {
    // Long enough that no normal answer below (a 32 MiB upload's checksum
    // under TCG on a loaded machine among them) comes near it.
    let d = Daemon::start_with(&[("HATCH_PROXY_TIMEOUT", "20s")]);
    let vm = web_vm(&d, json!({}));
    let ip = d.vm(&vm)["guest_ip"].as_str().unwrap().to_string();
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "web"}));
    add_route(
        &d,
        &vm,
        json!({"target_port": HEADERS_PORT, "subdomain": "hdr"}),
    );
    add_route(&d, &vm, json!({"target_port": WS_PORT, "subdomain": "ws"}));
    add_route(&d, &vm, json!({"target_port": 81, "subdomain": "closed"}));

    // Routing by Host, HTTP/1.1: the guest's own page, as straight from it.
    let (code, body) = via_proxy(&d, "web.localhost", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello from "), "{body}");
    let direct = d.in_ns(None, &["curl", "-sS", &format!("http://{ip}/")]);
    assert_eq!(body, String::from_utf8_lossy(&direct.stdout));

    // HTTP/2 (cleartext, prior knowledge) to the proxy.
    let resolve = "web.localhost:8081:127.0.0.1";
    let out = d.in_ns(
        None,
        &[
            "curl",
            "-sS",
            "--http2-prior-knowledge",
            "--resolve",
            resolve,
            "-w",
            "\n%{http_version} %{http_code}",
            "http://web.localhost:8081/",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let (h2_body, how) = text.rsplit_once('\n').unwrap();
    assert_eq!(how, "2 200", "{text}");
    assert_eq!(h2_body, body);

    // Keep-alive: two requests on one client connection.
    let out = d.in_ns(
        None,
        &[
            "curl",
            "-sv",
            "--resolve",
            resolve,
            "http://web.localhost:8081/",
            "http://web.localhost:8081/",
        ],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Re-using existing connection"), "{err}");

    // X-Forwarded-*: what the guest's server sees.
    let (code, seen) = via_proxy(&d, "hdr.localhost", HEADERS_PATH, &[]);
    assert_eq!(code, 200, "{seen}");
    let seen = seen.to_ascii_lowercase();
    for want in [
        "host: hdr.localhost:8081",
        "x-forwarded-for: 127.0.0.1",
        "x-forwarded-proto: http",
        "x-forwarded-host: hdr.localhost:8081",
    ] {
        assert!(seen.contains(want), "{want} not in:\n{seen}");
    }
    // A client's own X-Forwarded-For is replaced: it is no proxy we trust
    // (tests/hardening.rs covers HATCH_PROXY_TRUSTED_PROXIES).
    let (_, seen) = via_proxy(
        &d,
        "hdr.localhost",
        HEADERS_PATH,
        &["-H", "X-Forwarded-For: 203.0.113.9"],
    );
    let seen = seen.to_ascii_lowercase();
    assert!(seen.contains("x-forwarded-for: 127.0.0.1\n"), "{seen}");
    assert!(!seen.contains("203.0.113.9"), "{seen}");

    // Unknown host, host outside the base domain: 404 JSON.
    for host in ["nope.localhost", "web.example.com", "a.web.localhost"] {
        let (code, body) = via_proxy(&d, host, "/", &[]);
        assert_eq!(code, 404, "{host}: {body}");
        let v: Value = serde_json::from_str(&body).expect("a JSON body");
        assert!(v["error"].as_str().unwrap().contains("no route"), "{body}");
    }
    // Nothing listens on the target port: 502 JSON.
    let (code, body) = via_proxy(&d, "closed.localhost", "/", &[]);
    assert_eq!(code, 502, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(v["error"].as_str().unwrap().contains(":81"), "{body}");
    // The guest takes longer than HATCH_PROXY_TIMEOUT (it would answer
    // after 60 s): 504 JSON naming the cause, not before the timeout.
    let started = Instant::now();
    let (code, body) = via_proxy(&d, "web.localhost", "/cgi-bin/slow?60", &[]);
    let took = started.elapsed();
    assert_eq!(code, 504, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    let why = v["error"].as_str().unwrap();
    assert!(
        why.contains("did not answer within 20 s (HATCH_PROXY_TIMEOUT)"),
        "{body}"
    );
    assert!(took >= Duration::from_secs(20), "{took:?}");

    // Large bodies both ways, streamed, checked end to end.
    let upload = d.data_dir.join("upload.bin");
    let mut f = std::fs::File::open("/dev/urandom").unwrap();
    let mut out = std::fs::File::create(&upload).unwrap();
    std::io::copy(
        &mut std::io::Read::take(&mut f, (BIG_MIB * 1024 * 1024) as u64),
        &mut out,
    )
    .unwrap();
    let at_upload = format!("@{}", upload.display());
    let (code, sum) = via_proxy(
        &d,
        "web.localhost",
        "/cgi-bin/sha256",
        &[
            "--data-binary",
            &at_upload,
            "-H",
            "Content-Type: application/octet-stream",
        ],
    );
    assert_eq!(code, 200, "{sum}");
    assert_eq!(sum.trim(), sha256_file(&upload), "upload through the proxy");
    let download = d.data_dir.join("download.bin");
    let to = download.display().to_string();
    let (code, _) = via_proxy(&d, "web.localhost", "/big.bin", &["-o", &to]);
    assert_eq!(code, 200);
    assert_eq!(
        std::fs::metadata(&download).unwrap().len(),
        (BIG_MIB * 1024 * 1024) as u64
    );
    let (_, want) = via_proxy(&d, "web.localhost", "/big.sha256", &[]);
    assert_eq!(
        sha256_file(&download),
        want.trim(),
        "download through the proxy"
    );

    // WebSocket: upgraded through the proxy, echoed by the guest.
    let replies = ws_echo(
        &d.ns,
        PROXY,
        "ws.localhost:8081",
        "/ws",
        &["hello", "second message"],
    )
    .expect("websocket through the proxy");
    assert_eq!(replies, ["hello", "second message"]);

    // Load: wrk with 8 keep-alive connections, every answer a 200.
    let out = d.in_ns(
        None,
        &[
            "wrk",
            "-t2",
            "-c8",
            "-d3s",
            "-H",
            "Host: web.localhost",
            "http://127.0.0.1:8081/",
        ],
    );
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("Non-2xx"), "{report}");
    assert!(!report.contains("Socket errors"), "{report}");
    let requests: u64 = report
        .lines()
        .find_map(|l| {
            l.trim()
                .split(" requests in")
                .next()
                .filter(|_| l.contains(" requests in"))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0);
    assert!(requests >= 10, "{report}");
}

#[test]
fn a_sleeping_vm_wakes_once_for_20_concurrent_requests_and_a_stopped_one_stays_stopped() {
    let d = Daemon::start();
    let vm = web_vm(&d, json!({}));
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "site"}));
    add_route(
        &d,
        &vm,
        json!({"target_port": 80, "subdomain": "nowake", "auto_wake": false}),
    );
    let (code, before) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 200, "{before}");

    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(state(&d, &vm), "snapshotted");
    assert!(d.vmm_pids_of(&vm).is_empty(), "no VMM while asleep");

    // A route without auto_wake does not wake it.
    let (code, body) = via_proxy(&d, "nowake.localhost", "/", &[]);
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("auto_wake"), "{body}");
    assert_eq!(state(&d, &vm), "snapshotted");

    // A wake that fails (the memory in the store is corrupt) is 502 with
    // the reason, and the VM sleeps on; with the object mended it wakes.
    let asleep_in = d.db_value(&format!(
        "SELECT standby_snapshot_id FROM vms WHERE id = '{vm}'"
    ));
    let chunks = d.read_chunk_keys(&asleep_in, "memory");
    let memory = chunks[chunks.len() / 2].clone();
    let good = d.read_object(&memory);
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    bad[mid] ^= 0xff;
    d.write_object(&memory, &bad);
    let (code, body) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 502, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    let why = v["error"].as_str().unwrap();
    assert!(why.contains(&format!("waking vm {vm} failed")), "{body}");
    assert!(why.contains("is corrupt"), "{body}");
    assert_eq!(state(&d, &vm), "snapshotted");
    assert!(d.vmm_pids_of(&vm).is_empty(), "no VMM after a failed wake");
    d.write_object(&memory, &good);

    // 20 requests at once: one restore, 20 answers.
    let mut args: Vec<String> = [
        "curl",
        "-sS",
        "--parallel",
        "--parallel-immediate",
        "--parallel-max",
        "20",
        "--max-time",
        "120",
        "--resolve",
        "site.localhost:8081:127.0.0.1",
    ]
    .map(String::from)
    .to_vec();
    for i in 0..20 {
        args.push("-w".into());
        args.push("%{http_code}\n".into());
        args.push("-o".into());
        args.push(d.data_dir.join(format!("answer-{i}")).display().to_string());
        args.push("http://site.localhost:8081/".into());
    }
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = d.in_ns(None, &argv);
    let codes = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        codes.lines().filter(|c| *c == "200").count(),
        20,
        "{codes}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..20 {
        let a = std::fs::read_to_string(d.data_dir.join(format!("answer-{i}"))).unwrap();
        assert_eq!(a, before, "answer {i}");
    }
    assert_eq!(
        log_count(&d, &vm, "vm woke on request"),
        1,
        "{}",
        d.daemon_log()
    );
    assert_eq!(log_count(&d, &vm, "restored"), 1, "{}", d.daemon_log());
    let v = d.vm(&vm);
    assert_eq!(v["state"], "running");
    assert!(v["last_wake_at"].is_string(), "{v}");
    // Resumed, not rebooted: the guest's console shows one boot.
    assert_eq!(d.logs(&vm).matches("hatch-guest: ready").count(), 1);

    // A VM its owner stopped is not started by a request: 503, still stopped.
    let r = d.req("POST", &format!("/vms/{vm}/stop"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    let (code, body) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 503, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(v["error"].as_str().unwrap().contains("stopped"), "{body}");
    assert_eq!(state(&d, &vm), "stopped");
    assert!(d.vmm_pids_of(&vm).is_empty(), "no VMM was started");
    assert_eq!(log_count(&d, &vm, "vm woke on request"), 1);
}

#[test]
fn idle_vms_sleep_and_wake_unless_they_opt_out_or_have_ssh_open() {
    // Three TCG guests on a loaded machine: a request through the proxy can
    // take seconds, so the timeout leaves room for several between checks.
    let d = Daemon::start_with(&[
        ("HATCH_IDLE_TIMEOUT", "12s"),
        ("HATCH_IDLE_CHECK_INTERVAL", "1s"),
    ]);
    let (key, public) = keypair(&d.data_dir);
    // Booting takes longer than the 12 s timeout under TCG: the VMs start
    // opted out, and two of them opt in once they serve.
    let sleepy = web_vm(&d, json!({"auto_sleep": false}));
    let awake = web_vm(&d, json!({"auto_sleep": false}));
    let ssh = web_vm(
        &d,
        json!({"auto_sleep": false, "user_data": web_user_data(Some(&public))}),
    );
    add_route(
        &d,
        &sleepy,
        json!({"target_port": 80, "subdomain": "sleepy"}),
    );
    add_route(&d, &awake, json!({"target_port": 80, "subdomain": "awake"}));

    // An SSH session held open through the VM's SSH port keeps it awake.
    let port = d.vm(&ssh)["ssh_port"].as_u64().unwrap().to_string();
    let mut session = Command::new("ip")
        .args(["netns", "exec", &d.ns, "ssh", "-i"])
        .arg(&key)
        .args(["-p", &port, "-o", "StrictHostKeyChecking=no", "-o"])
        .args(["UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes"])
        .args(["root@127.0.0.1", "echo connected; sleep 60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.take().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first.trim(), "connected");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut session = Kill(session);

    // Requests keep a VM awake while they come...
    let (code, _) = via_proxy(&d, "sleepy.localhost", "/", &[]);
    assert_eq!(code, 200);
    for vm in [&sleepy, &ssh] {
        let r = d.req(
            "PATCH",
            &format!("/vms/{vm}"),
            Some(r#"{"auto_sleep": true}"#),
        );
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // Longer than the timeout and a check more.
    let until = Instant::now() + Duration::from_secs(16);
    while Instant::now() < until {
        let (code, _) = via_proxy(&d, "sleepy.localhost", "/", &[]);
        assert_eq!(code, 200);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(state(&d, &sleepy), "running", "it had traffic");
    // ...and it sleeps once they stop.
    wait_state(&d, &sleepy, "snapshotted", Duration::from_secs(120));
    // The time and the log line are written right after the state.
    wait_until("the sleep is recorded", Duration::from_secs(10), || {
        d.vm(&sleepy)["last_sleep_at"].is_string() && log_count(&d, &sleepy, "vm put to sleep") == 1
    });
    assert!(d.vmm_pids_of(&sleepy).is_empty());
    // The opted-out VM and the one with an SSH session stayed up.
    assert_eq!(state(&d, &awake), "running");
    assert_eq!(state(&d, &ssh), "running");
    let _ = session.0.kill();
    let _ = session.0.wait();
    wait_state(&d, &ssh, "snapshotted", Duration::from_secs(120));

    // The next request wakes it and is answered.
    let (code, body) = via_proxy(&d, "sleepy.localhost", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello from"), "{body}");
    let v = d.vm(&sleepy);
    assert_eq!(v["state"], "running");
    assert!(
        v["last_wake_at"].as_str() > v["last_sleep_at"].as_str(),
        "{v}"
    );
    // The snapshot that carried it through its sleep is gone once it woke.
    let snaps = format!("/vms/{sleepy}/snapshots");
    wait_until(
        "the sleep snapshot is deleted",
        Duration::from_secs(30),
        || d.req("GET", &snaps, None).body == json!([]),
    );
    // And it goes back to sleep when idle again.
    wait_state(&d, &sleepy, "snapshotted", Duration::from_secs(120));
    let r = d.req("GET", "/snapshots?tags%5Bhatch.sleep%5D=idle", None);
    let mine: Vec<&Value> = r
        .body
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["source_instance_id"] == sleepy.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "one sleep snapshot: {}", r.text);
    assert_eq!(mine[0]["kind"], "Standby");
    wait_until(
        "the second sleep is logged",
        Duration::from_secs(10),
        || log_count(&d, &sleepy, "vm put to sleep") == 2,
    );

    // Opting back in with a PATCH (and its own timeout) puts the other one to sleep too.
    assert_eq!(state(&d, &awake), "running");
    let r = d.req(
        "PATCH",
        &format!("/vms/{awake}"),
        Some(r#"{"auto_sleep": true, "idle_timeout_seconds": 2}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_state(&d, &awake, "snapshotted", Duration::from_secs(120));
}

/// A VM put to sleep by the idle monitor wakes on a request after a daemon
/// restart, from its snapshot in the local store or in S3.
fn wake_after_restart(storage: Storage) {
    let mut d = Daemon::start_storage_with(storage, &[("HATCH_IDLE_CHECK_INTERVAL", "1s")]);
    let vm = web_vm(&d, json!({}));
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "site"}));
    let (code, before) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 200);
    // The server has no idle timeout; this VM gets its own.
    let r = d.req(
        "PATCH",
        &format!("/vms/{vm}"),
        Some(r#"{"idle_timeout_seconds": 2}"#),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    wait_state(&d, &vm, "snapshotted", Duration::from_secs(60));
    if storage == Storage::S3 {
        let keys = d.stored_objects(&format!("snapshots/{vm}/"));
        let chunks = d.stored_objects("chunks/");
        assert!(
            !keys.is_empty() && chunks.len() > 10,
            "the snapshot is in the bucket: {keys:?} and {} chunks",
            chunks.len()
        );
    }
    d.terminate();
    d.restart();
    assert_eq!(state(&d, &vm), "snapshotted");
    let (code, body) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 200, "{body}\n{}", d.daemon_log());
    assert_eq!(body, before);
    assert_eq!(state(&d, &vm), "running");
    assert_eq!(
        d.logs(&vm).matches("hatch-guest: ready").count(),
        1,
        "resumed, not rebooted"
    );
}

on_both_stores!(wake_after_restart: asleep_vm_wakes_after_restart_local, asleep_vm_wakes_after_restart_s3);

/// When the daemon wrote the log line `line` (tracing's RFC 3339 timestamp,
/// after any terminal colour codes).
fn logged_at(line: &str) -> chrono::DateTime<chrono::FixedOffset> {
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // An SGR sequence: ESC [ ... m.
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let stamp = plain.split_whitespace().next().unwrap_or_default();
    chrono::DateTime::parse_from_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("no timestamp at the start of {line:?}: {e}"))
}

/// A sleep that cannot store its snapshot (the S3 server is gone) leaves the
/// VM running and serving, says why in the log, and is not retried at every
/// check: the next attempt waits for another full timeout. Nothing reaches
/// the VM in between (a proxied request would restart its idle clock).
#[test]
fn an_idle_sleep_that_cannot_be_stored_keeps_the_vm_running() {
    const TIMEOUT_SECS: i64 = 15;
    let mut d = Daemon::start_storage_with(Storage::S3, &[("HATCH_IDLE_CHECK_INTERVAL", "1s")]);
    let vm = web_vm(&d, json!({}));
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "site"}));
    d.stop_s3();
    let r = d.req(
        "PATCH",
        &format!("/vms/{vm}"),
        Some(&json!({ "idle_timeout_seconds": TIMEOUT_SECS }).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.text);
    let failures = |d: &Daemon| -> Vec<String> {
        d.daemon_log()
            .lines()
            .filter(|l| l.contains(vm.as_str()) && l.contains("idle sleep failed"))
            .map(String::from)
            .collect()
    };
    wait_until(
        "the failed sleep is logged",
        Duration::from_secs(120),
        || !failures(&d).is_empty(),
    );
    let v = d.vm(&vm);
    assert_eq!(v["state"], "running", "{v}");
    assert_eq!(v["last_sleep_at"], Value::Null);
    assert_eq!(
        d.req("GET", &format!("/vms/{vm}/snapshots"), None).body,
        json!([])
    );
    // With checks every second and no traffic, the second attempt comes a
    // full timeout after the first failed, not at the next check.
    wait_until(
        "the failed sleep is tried again",
        Duration::from_secs(120),
        || failures(&d).len() >= 2,
    );
    let seen = failures(&d);
    let gap = logged_at(&seen[1]) - logged_at(&seen[0]);
    assert!(
        gap >= chrono::Duration::milliseconds(TIMEOUT_SECS * 1000 - 500),
        "retried {} ms after the first failure, within the {TIMEOUT_SECS} s timeout:\n{}",
        gap.num_milliseconds(),
        seen.join("\n")
    );
    // Still running, and serving.
    assert_eq!(d.vm(&vm)["state"], "running");
    let (code, body) = via_proxy(&d, "site.localhost", "/", &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("hello from"), "{body}");
}

/// A base domain of the operator's own (`HATCH_PROXY_BASE_DOMAIN`, given in
/// mixed case with a trailing dot) end to end; and a wake that outlasts
/// `HATCH_PROXY_WAKE_TIMEOUT`: 504, while the wake itself goes on.
#[test]
fn another_base_domain_end_to_end_and_a_wake_past_its_timeout_is_504() {
    // No restore finishes in 1 ms: every wake outlasts this timeout.
    let d = Daemon::start_with(&[
        ("HATCH_PROXY_BASE_DOMAIN", "Apps.Example.TEST."),
        ("HATCH_PROXY_WAKE_TIMEOUT", "1ms"),
    ]);
    let vm = web_vm(&d, json!({}));
    let route = add_route(&d, &vm, json!({"target_port": 80, "subdomain": "shop"}));
    assert_eq!(route["host"], "shop.apps.example.test", "{route}");
    assert_eq!(
        route["url"], "http://shop.apps.example.test:8081/",
        "{route}"
    );
    let (code, page) = via_proxy(&d, "shop.apps.example.test", "/", &[]);
    assert_eq!(code, 200, "{page}");
    assert!(page.starts_with("hello from "), "{page}");
    // The default domain, or another one, is no route.
    for host in ["shop.localhost", "shop.example.test"] {
        let (code, body) = via_proxy(&d, host, "/", &[]);
        assert_eq!(code, 404, "{host}: {body}");
    }

    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(state(&d, &vm), "snapshotted");
    let (code, body) = via_proxy(&d, "shop.apps.example.test", "/", &[]);
    assert_eq!(code, 504, "{body}");
    let v: Value = serde_json::from_str(&body).expect("a JSON body");
    let why = v["error"].as_str().unwrap();
    assert!(
        why.contains(&format!("vm {vm} did not wake")) && why.contains("HATCH_PROXY_WAKE_TIMEOUT"),
        "{body}"
    );
    // The request gave up, the wake did not: the VM comes back on its own
    // and then answers as before, resumed rather than rebooted.
    wait_until("the wake to finish", Duration::from_secs(120), || {
        log_count(&d, &vm, "vm woke on request") == 1
    });
    assert_eq!(state(&d, &vm), "running");
    let (code, after) = via_proxy(&d, "shop.apps.example.test", "/", &[]);
    assert_eq!((code, after), (200, page));
    assert_eq!(d.logs(&vm).matches("hatch-guest: ready").count(), 1);
}

/// A guest that closes every connection (busybox httpd answers with
/// `Connection: close`) costs the proxy no local port: the connections it
/// closes end with a reset, so none waits in TIME_WAIT towards the guest.
/// Such sockets used to pile up for 60 s each; at a few hundred requests/s
/// they filled the ephemeral port range and every connect() to the guest
/// scanned it for a free port (20 times the proxy's CPU per request).
#[test]
fn a_guest_that_closes_its_connections_leaves_no_time_wait_in_the_proxy() {
    const REQUESTS: usize = 40;
    let d = Daemon::start();
    let vm = web_vm(&d, json!({}));
    let ip = d.vm(&vm)["guest_ip"].as_str().unwrap().to_string();
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "web"}));
    // One curl on one keep-alive connection to the proxy; the guest closes
    // after each answer, so the proxy connects to it once per request.
    let url = "http://web.localhost:8081/";
    let mut cmd = vec![
        "curl",
        "-sS",
        "--max-time",
        "120",
        "--resolve",
        "web.localhost:8081:127.0.0.1",
        "-w",
        "status %{http_code}\n",
    ];
    cmd.extend(std::iter::repeat_n(url, REQUESTS));
    let out = d.in_ns(None, &cmd);
    let text = String::from_utf8_lossy(&out.stdout);
    // Every answer whole: the reset comes only after the response was read.
    assert_eq!(
        text.matches("status 200\n").count(),
        REQUESTS,
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("hello from ").count(), REQUESTS, "{text}");
    let waiting = d.in_ns(
        None,
        &[
            "ss",
            "-Htan",
            "state",
            "time-wait",
            "dst",
            &format!("{ip}:80"),
        ],
    );
    assert!(waiting.status.success(), "{waiting:?}");
    let lines = String::from_utf8_lossy(&waiting.stdout).into_owned();
    assert_eq!(
        lines.lines().count(),
        0,
        "sockets in TIME_WAIT towards the guest after {REQUESTS} proxied requests:\n{lines}"
    );
}

/// The access log's lines so far, each parsed (a line that is not JSON fails).
fn access_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

/// A file removed when this goes, a failed test's included.
struct RemovedOnDrop(std::path::PathBuf);

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[test]
fn the_access_log_has_one_json_line_per_request_with_its_outcome() {
    // Outside the data dir, which exists only once the daemon starts.
    let log = std::env::temp_dir().join(format!("hatch-access-{}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let _removed = RemovedOnDrop(log.clone());
    let d = Daemon::start_with(&[("HATCH_PROXY_ACCESS_LOG", log.to_str().unwrap())]);
    let vm = web_vm(&d, json!({}));
    add_route(&d, &vm, json!({"target_port": 80, "subdomain": "site"}));
    let wait_lines = |n: usize| {
        wait_until(
            &format!("{n} access log lines"),
            Duration::from_secs(30),
            || access_lines(&log).len() >= n,
        );
        let lines = access_lines(&log);
        assert_eq!(lines.len(), n, "{lines:#?}");
        lines
    };

    let (code, page) = via_proxy(&d, "site.localhost", "/?token=secret", &[]);
    assert_eq!(code, 200, "{page}");
    // busybox httpd has no DELETE: its 501 is what the log says.
    let (code, _) = via_proxy(&d, "site.localhost", "/missing", &["-X", "DELETE"]);
    assert_eq!(code, 501);
    let (code, body) = via_proxy(&d, "nobody.localhost", "/", &[]);
    assert_eq!(code, 404, "{body}");
    // A client that gives up before the guest answers.
    let (code, _) = via_proxy(
        &d,
        "site.localhost",
        "/cgi-bin/slow?5",
        &["--max-time", "1"],
    );
    assert_eq!(code, 0, "curl gave up");
    let lines = wait_lines(4);
    let first = &lines[0];
    assert_eq!(first["host"], "site.localhost:8081");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/", "the query is not logged");
    assert_eq!(first["version"], "HTTP/1.1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["bytes"], page.len());
    assert_eq!(first["vm_id"], vm.as_str());
    assert_eq!(first["woke"], false);
    assert!(
        first["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{first}"
    );
    assert!(first["duration_ms"].as_f64().unwrap() > 0.0, "{first}");
    let at = chrono::DateTime::parse_from_rfc3339(first["time"].as_str().unwrap()).unwrap();
    assert!(
        (chrono::Utc::now() - at.to_utc()).num_seconds().abs() < 300,
        "{first}"
    );
    assert_eq!(
        (&lines[1]["method"], &lines[1]["path"], &lines[1]["status"]),
        (&json!("DELETE"), &json!("/missing"), &json!(501))
    );
    assert_eq!(lines[1]["vm_id"], vm.as_str());
    let no_route = &lines[2];
    assert_eq!(
        (&no_route["status"], &no_route["vm_id"]),
        (&json!(404), &Value::Null)
    );
    assert_eq!(no_route["bytes"], body.len());
    assert_eq!(no_route["host"], "nobody.localhost:8081");
    let gone = &lines[3];
    assert_eq!(
        (&gone["status"], &gone["bytes"]),
        (&json!(499), &json!(0)),
        "{gone}"
    );
    assert_eq!(gone["path"], "/cgi-bin/slow");
    assert!(gone["duration_ms"].as_f64().unwrap() >= 900.0, "{gone}");

    // A request that wakes the sleeping VM says so; the next one does not.
    let r = d.req("POST", &format!("/vms/{vm}/snapshot"), None);
    assert_eq!(r.status, 201, "{}", r.text);
    for _ in 0..2 {
        let (code, body) = via_proxy(&d, "site.localhost", "/", &["--http2-prior-knowledge"]);
        assert_eq!(code, 200, "{body}");
    }
    let lines = wait_lines(6);
    assert_eq!(
        (&lines[4]["woke"], &lines[4]["status"]),
        (&json!(true), &json!(200))
    );
    assert_eq!(lines[4]["version"], "HTTP/2");
    assert_eq!(lines[4]["host"], "site.localhost:8081");
    assert_eq!(lines[5]["woke"], false);
}

/// `conn PID request N` from the keep-alive server: (PID, N).
fn keepalive_answer(d: &Daemon, host: &str) -> (String, u32) {
    let (status, body) = via_proxy(d, host, "/", &[]);
    assert_eq!(status, 200, "{body}");
    let words: Vec<&str> = body.split_whitespace().collect();
    match words[..] {
        ["conn", pid, "request", n] => (pid.to_string(), n.parse().unwrap()),
        _ => panic!("not the keep-alive server's answer: {body:?}"),
    }
}

#[test]
fn connections_to_a_guest_are_kept_for_its_next_requests_and_never_outlive_its_run() {
    // Each proxy thread keeps its own connections, and each curl below is a
    // new client connection, which the kernel may give to any thread: one
    // thread, so that every request can find the kept connection.
    let d = Daemon::start_with(&[("HATCH_PROXY_THREADS", "1")]);
    let vm = web_vm(&d, json!({}));
    add_route(
        &d,
        &vm,
        json!({"target_port": KEEPALIVE_PORT, "subdomain": "ka"}),
    );
    let host = "ka.localhost";
    // Each curl is a new client connection; the proxy's connection to the
    // guest outlives it and carries the next request.
    let (conn, n) = keepalive_answer(&d, host);
    assert_eq!(n, 1);
    for want in 2..=4 {
        assert_eq!(
            keepalive_answer(&d, host),
            (conn.clone(), want),
            "request {want} was not sent on the guest connection kept from the first"
        );
    }
    // The guest closes it once idle: the next request notices and goes on a
    // new one, with no error for the client.
    std::thread::sleep(Duration::from_secs(KEEPALIVE_IDLE_SECS + 2));
    let (second, n) = keepalive_answer(&d, host);
    assert_eq!(n, 1, "a closed connection was used");
    assert_ne!(second, conn);
    assert_eq!(keepalive_answer(&d, host), (second.clone(), 2));
    // A VMM that dies under its guest sends no FIN, so the proxy's kept
    // connection still looks open. The next run of the VM is a new guest,
    // which would answer a request on it with a reset: it is not used.
    d.kill_vmm(&vm);
    wait_state(&d, &vm, "error", Duration::from_secs(30));
    let r = d.req("POST", &format!("/vms/{vm}/start"), None);
    assert_eq!(r.status, 200, "{}", r.text);
    d.wait_console(&vm, "hatch-guest: ready boot=2");
    wait_until(
        "the web guest ready again",
        Duration::from_secs(120),
        || d.logs(&vm).matches(READY_LINE).count() >= 2,
    );
    let (_, n) = keepalive_answer(&d, host);
    assert_eq!(n, 1, "the connection to the guest's previous run was used");
}
