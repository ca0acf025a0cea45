//! The Hatch API's contract (docs/API.md): auth, owners, validation, images, templates,
//! error bodies and status codes. Bad input must change nothing.

mod common;
use common::*;
use serde_json::json;

#[test]
fn auth_headers_owners_and_revocation() {
    let d = Daemon::start();
    // /health needs no key; everything else does.
    let h = d.curl("GET", "/health", &[], None);
    assert_eq!((h.status, h.body.clone()), (200, json!({"status": "ok"})));
    for (method, path) in [
        ("GET", "/vms"),
        ("POST", "/vms"),
        ("GET", "/images"),
        ("GET", "/templates"),
        ("GET", "/vms/vm_x/logs"),
        ("POST", "/instances/vm_x/snapshots"),
        ("POST", "/instances/vm_x/snapshots/snap_x/restore"),
        ("POST", "/snapshots/snap_x/fork"),
        ("GET", "/snapshots"),
    ] {
        let r = d.curl(method, path, &[], Some("{}"));
        assert_eq!(r.status, 401, "{method} {path}: {}", r.text);
        assert!(r.error().contains("missing API key"));
    }
    let wrong = d.as_key("hk_not_a_real_key", "GET", "/vms", None);
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error(), "invalid API key");
    let basic = d.curl("GET", "/vms", &["Authorization: Basic abc".into()], None);
    assert_eq!(basic.status, 401, "{}", basic.text);

    // Both header forms work with the same key.
    assert_eq!(
        d.curl(
            "GET",
            "/vms",
            &[format!("Authorization: Bearer {}", d.key)],
            None
        )
        .status,
        200
    );
    assert_eq!(
        d.curl("GET", "/vms", &[format!("X-API-Key: {}", d.key)], None)
            .status,
        200
    );

    // Another owner sees none of alice's things.
    let bob = d.create_key(&["--name", "bob"]);
    let vm = d.create_vm("{}");
    let id = vm["id"].as_str().unwrap();
    let tpl = d.req("POST", "/templates", Some(r#"{"name": "t1"}"#));
    assert_eq!(tpl.status, 201, "{}", tpl.text);
    let tpl_id = tpl.body["id"].as_str().unwrap();
    assert_eq!(d.as_key(&bob, "GET", "/vms", None).body, json!([]));
    for (m, p) in [
        ("GET", format!("/vms/{id}")),
        ("POST", format!("/vms/{id}/stop")),
        ("POST", format!("/vms/{id}/start")),
        ("GET", format!("/vms/{id}/logs")),
        ("DELETE", format!("/vms/{id}")),
        ("GET", format!("/templates/{tpl_id}")),
        ("DELETE", format!("/templates/{tpl_id}")),
    ] {
        let r = d.as_key(&bob, m, &p, None);
        assert_eq!(r.status, 404, "bob {m} {p}: {}", r.text);
    }
    let r = d.as_key(
        &bob,
        "POST",
        "/vms",
        Some(&format!(r#"{{"template_id": "{tpl_id}"}}"#)),
    );
    assert_eq!(r.status, 400, "bob cannot use alice's template: {}", r.text);
    assert_eq!(
        d.vm(id)["state"],
        "running",
        "bob's attempts changed nothing"
    );
    // The default image is shared by every owner.
    assert!(d
        .as_key(&bob, "GET", "/images", None)
        .ids()
        .contains(&"img_default".to_string()));

    // A second key for alice (--owner) sees her VM; a new --name that exists is refused.
    let alice2 = d.create_key(&["--owner", "alice"]);
    assert_eq!(
        d.as_key(&alice2, "GET", "/vms", None).ids(),
        vec![id.to_string()]
    );
    let dup = d
        .hatch_cmd()
        .args(["keys", "create", "--name", "alice"])
        .output()
        .unwrap();
    assert!(!dup.status.success());
    assert!(String::from_utf8_lossy(&dup.stderr).contains("already exists"));

    // Keys are stored hashed: the database file never holds the key itself.
    let db = std::fs::read(d.data_dir.join("hatch.db")).unwrap();
    let wal = std::fs::read(d.data_dir.join("hatch.db-wal")).unwrap_or_default();
    for blob in [&db, &wal] {
        assert!(
            !blob.windows(alice2.len()).any(|w| w == alice2.as_bytes()),
            "plaintext key on disk"
        );
    }

    // Listing shows prefixes; revoking a key locks it out and leaves the other.
    let list = d.hatch_cmd().args(["keys", "list"]).output().unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.contains("alice") && list.contains("bob") && list.contains(&alice2[..7]),
        "{list}"
    );
    assert!(!list.contains(&alice2), "keys list must not print keys");
    let key_id = list
        .lines()
        .filter(|l| l.contains(&alice2[..7]))
        .find_map(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let revoke = d
        .hatch_cmd()
        .args(["keys", "revoke", &key_id])
        .output()
        .unwrap();
    assert!(
        revoke.status.success(),
        "{}",
        String::from_utf8_lossy(&revoke.stderr)
    );
    assert_eq!(d.as_key(&alice2, "GET", "/vms", None).status, 401);
    assert_eq!(d.req("GET", "/vms", None).status, 200);

    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
}

#[test]
fn invalid_requests_are_refused_and_change_nothing() {
    let d = Daemon::start();
    let cases: &[(&str, &str, &str)] = &[
        (r#"{"vcpu_count": 0}"#, "vcpu_count", "between 1 and 32"),
        (r#"{"vcpu_count": 33}"#, "vcpu_count", "between 1 and 32"),
        (r#"{"vcpu_count": -1}"#, "vcpu_count", "between 1 and 32"),
        (r#"{"mem_mib": 127}"#, "mem_mib", "between 128 and 65536"),
        (r#"{"mem_mib": 65537}"#, "mem_mib", "between 128 and 65536"),
        (
            r#"{"vcpu_count": "two"}"#,
            "invalid JSON body",
            "invalid type",
        ),
        (
            r#"{"vcpu_count": 1.5}"#,
            "invalid JSON body",
            "invalid type",
        ),
        (
            r#"{"enable_network": "yes"}"#,
            "invalid JSON body",
            "invalid type",
        ),
        (
            r#"{"memory": 512}"#,
            "invalid JSON body",
            "unknown field `memory`",
        ),
        (r#"{"vcpu_count": 1"#, "invalid JSON body", "EOF"),
        ("not json", "invalid JSON body", "expected"),
        ("[]", "invalid JSON body", "expected"),
        (
            r#"{"image_id": "img_nope"}"#,
            "image_id",
            "img_nope not found",
        ),
        (
            r#"{"template_id": "tpl_nope"}"#,
            "template_id",
            "tpl_nope not found",
        ),
        (
            r#"{"guest_ip": "172.16.0.300"}"#,
            "guest_ip",
            "not an IPv4 address",
        ),
        (
            r#"{"guest_ip": "192.168.241.50"}"#,
            "guest_ip",
            "outside the bridge network 172.16.0.0/24",
        ),
        (
            r#"{"guest_ip": "172.16.0.0"}"#,
            "guest_ip",
            "network address",
        ),
        (r#"{"guest_ip": "172.16.0.255"}"#, "guest_ip", "broadcast"),
        (r#"{"guest_ip": "172.16.0.1"}"#, "guest_ip", "bridge"),
        (
            r#"{"guest_mac": "02:fc:00:00:32"}"#,
            "guest_mac",
            "not a MAC address",
        ),
        (
            r#"{"guest_mac": "03:fc:00:00:00:32"}"#,
            "guest_mac",
            "multicast",
        ),
        (
            r#"{"enable_network": false, "guest_ip": "172.16.0.20"}"#,
            "guest_ip",
            "enable_network is false",
        ),
        ("{\"boot_args\": \"a\\nb\"}", "boot_args", "single line"),
    ];
    for (body, field, detail) in cases {
        let r = d.req("POST", "/vms", Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        let e = r.error();
        assert!(
            e.contains(field) && e.contains(detail),
            "{body}: error {e:?} should name {field:?} / {detail:?}"
        );
    }
    // Nothing was created, nothing runs.
    assert_eq!(d.req("GET", "/vms", None).body, json!([]));
    assert!(d.vmm_pids().is_empty());
    assert!(
        std::fs::read_dir(d.data_dir.join("vms"))
            .map(|r| r.count())
            .unwrap_or(0)
            == 0
    );

    // Templates validate the same ranges and names.
    for (body, needle) in [
        (r#"{}"#, "name is required"),
        (r#"{"name": ""}"#, "name must not be empty"),
        (r#"{"name": "x", "vcpu_count": 64}"#, "vcpu_count"),
        (r#"{"name": "x", "mem_mib": 64}"#, "mem_mib"),
        (r#"{"name": "x", "image_id": "img_nope"}"#, "image_id"),
        (r#"{"name": "x", "disk": 1}"#, "unknown field"),
    ] {
        let r = d.req("POST", "/templates", Some(body));
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    assert_eq!(d.req("GET", "/templates", None).body, json!([]));

    // Images: both files are required; path imports are off on a server that
    // allows no import directory (tests/images.rs covers them in depth).
    let img = image_dir();
    let kernel = img.join("vmlinuz").display().to_string();
    let rootfs = img.join("rootfs.ext4").display().to_string();
    for (body, status, needle) in [
        (
            json!({"rootfs_path": rootfs}),
            400,
            "kernel_path is required",
        ),
        (
            json!({"kernel_path": kernel}),
            400,
            "rootfs_path is required",
        ),
        (
            json!({"kernel_path": kernel, "rootfs_path": rootfs, "disk": 1}),
            400,
            "unknown field",
        ),
        (
            json!({"kernel_path": kernel, "rootfs_path": rootfs}),
            403,
            "HATCH_IMAGE_IMPORT_DIRS",
        ),
    ] {
        let r = d.req("POST", "/images", Some(&body.to_string()));
        assert_eq!(r.status, status, "{body}: {}", r.text);
        assert!(r.error().contains(needle), "{body}: {}", r.text);
    }
    assert_eq!(d.req("GET", "/images", None).ids(), vec!["img_default"]);

    // Unknown ids are 404 with a JSON error; unknown paths too; wrong methods 405.
    for (m, p) in [
        ("GET", "/vms/vm_nope"),
        ("POST", "/vms/vm_nope/stop"),
        ("POST", "/vms/vm_nope/start"),
        ("DELETE", "/vms/vm_nope"),
        ("GET", "/vms/vm_nope/logs"),
        ("GET", "/images/img_nope"),
        ("DELETE", "/images/img_nope"),
        ("GET", "/templates/tpl_nope"),
        ("DELETE", "/templates/tpl_nope"),
        ("GET", "/nothing/here"),
    ] {
        let r = d.req(m, p, None);
        assert_eq!(r.status, 404, "{m} {p}: {}", r.text);
        r.error();
    }
    for (p, body) in [
        ("/instances/vm_nope/snapshots", r#"{"kind": "Standby"}"#),
        ("/instances/vm_nope/snapshots/snap_nope/restore", "{}"),
        ("/snapshots/snap_nope/fork", r#"{"name": "x"}"#),
    ] {
        let r = d.req("POST", p, Some(body));
        assert_eq!(r.status, 404, "POST {p}: {}", r.text);
        r.error();
    }
    for (m, p) in [
        ("PUT", "/vms"),
        ("PUT", "/vms/vm_x"),
        ("PATCH", "/vms/vm_x/routes"),
        ("GET", "/vms/vm_x/stop"),
        ("DELETE", "/images"),
        ("POST", "/health"),
        ("GET", "/instances/vm_x/snapshots"),
        ("GET", "/snapshots/snap_x/fork"),
        ("PUT", "/snapshots/snap_x"),
    ] {
        let r = d.req(m, p, None);
        assert_eq!(r.status, 405, "{m} {p}: {}", r.text);
        assert_eq!(r.error(), "method not allowed");
    }
    // An id of our shape (a junk one like vm_x is a 404 before the query is read).
    let r = d.req("GET", "/vms/vm_xxxxxxxxxxxx/logs?follow=maybe", None);
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.error().contains("follow must be true or false"));
}

#[test]
fn images_and_templates_feed_vm_creation() {
    let img = image_dir();
    // Registered by path: the operator allows the test image's directory and
    // one for a copy made outside the data dir.
    let copy_dir = std::env::temp_dir().join(format!("hatch-src-copy-{}", std::process::id()));
    std::fs::create_dir_all(&copy_dir).unwrap();
    let dirs = format!("{},{}", img.display(), copy_dir.display());
    let d = Daemon::start_with(&[("HATCH_IMAGE_IMPORT_DIRS", &dirs)]);
    let body = json!({
        "name": "busybox",
        "kernel_path": img.join("vmlinuz"),
        "initrd_path": img.join("initrd.img"),
        "rootfs_path": img.join("rootfs.ext4"),
        "boot_args": "console=ttyS0 root=/dev/vda rw hatch.test=1",
    });
    let r = d.req("POST", "/images", Some(&body.to_string()));
    assert_eq!(r.status, 201, "{}", r.text);
    let img_id = r.body["id"].as_str().unwrap().to_string();
    assert!(img_id.starts_with("img_"));
    // The view tells what the image is, never the host paths it came from.
    assert_eq!(r.body["source"], "import");
    assert_eq!(r.body["has_initrd"], true);
    assert!(r.body.get("kernel_path").is_none(), "{}", r.text);
    assert_eq!(
        d.req("GET", &format!("/images/{img_id}"), None).body["name"],
        "busybox"
    );
    assert_eq!(
        d.req("GET", "/images", None).ids(),
        vec![img_id.clone(), "img_default".into()]
    );

    let t = d.req(
        "POST",
        "/templates",
        Some(&json!({"name": "small", "description": "two cpus", "image_id": img_id, "vcpu_count": 2,
                      "mem_mib": 256, "user_data": "#cloud-config\n"}).to_string()),
    );
    assert_eq!(t.status, 201, "{}", t.text);
    let tpl_id = t.body["id"].as_str().unwrap().to_string();
    assert!(tpl_id.starts_with("tpl_"));
    assert_eq!(
        d.req("POST", "/templates", Some(r#"{"name": "small"}"#))
            .status,
        409
    );
    assert_eq!(d.req("GET", "/templates", None).ids(), vec![tpl_id.clone()]);
    assert_eq!(
        d.req("GET", &format!("/templates/{tpl_id}"), None).body["vcpu_count"],
        2
    );

    // Template values fill what the request leaves out; the request wins where it speaks.
    let vm = d.create_vm(&json!({"template_id": tpl_id, "mem_mib": 384}).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["template_id"], tpl_id.as_str());
    assert_eq!(vm["image_id"], img_id.as_str());
    assert_eq!(vm["vcpu_count"], 2);
    assert_eq!(vm["mem_mib"], 384);
    assert_eq!(
        vm["boot_args"], "console=ttyS0 root=/dev/vda rw hatch.test=1",
        "the image's boot args"
    );
    d.wait_console(&id, "hatch-guest: ready boot=1");

    // The registered image is a copy: removing the source files harms nothing
    // (a guest boots from it afterwards, below).
    for f in ["vmlinuz", "initrd.img", "rootfs.ext4"] {
        std::fs::copy(img.join(f), copy_dir.join(f)).unwrap();
    }
    let r = d.req(
        "POST",
        "/images",
        Some(&json!({"kernel_path": copy_dir.join("vmlinuz"), "initrd_path": copy_dir.join("initrd.img"),
                     "rootfs_path": copy_dir.join("rootfs.ext4")}).to_string()),
    );
    assert_eq!(r.status, 201, "{}", r.text);
    let img2 = r.body["id"].as_str().unwrap().to_string();
    std::fs::remove_dir_all(&copy_dir).unwrap();

    // In use: 409, and the image stays.
    let r = d.req("DELETE", &format!("/images/{img_id}"), None);
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("in use"));
    let r = d.req("DELETE", "/images/img_default", None);
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(
        d.req("DELETE", &format!("/templates/{tpl_id}"), None).body,
        json!({"status": "deleted"})
    );
    assert_eq!(
        d.req("DELETE", &format!("/images/{img_id}"), None).status,
        409,
        "the VM still uses it"
    );
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_eq!(
        d.req("DELETE", &format!("/images/{img_id}"), None).body,
        json!({"status": "deleted"})
    );
    assert_eq!(d.req("GET", &format!("/images/{img_id}"), None).status, 404);
    assert!(
        !d.data_dir.join("images").join(&img_id).exists(),
        "imported files removed"
    );
    // The copy boots a guest although its source files are long gone.
    assert!(!copy_dir.exists());
    let vm = d
        .create_vm(&json!({"image_id": img2, "enable_network": false, "mem_mib": 128}).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["image_id"], img2.as_str());
    d.wait_console(&id, "hatch-guest: ready boot=1");
    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert_eq!(
        d.req("DELETE", &format!("/images/{img2}"), None).status,
        200
    );
}

/// VM names are unique per owner (a taken one is 409 and creates nothing),
/// another owner may use the same name, and `GET /vms` lists newest first.
#[test]
fn vm_names_are_unique_per_owner_and_lists_are_newest_first() {
    let d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let small =
        |name: &str| json!({"name": name, "enable_network": false, "mem_mib": 128}).to_string();
    let id_of = |v: &serde_json::Value| v["id"].as_str().unwrap().to_string();

    let web = d.create_vm(&small("web"));
    assert_eq!(web["name"], "web");
    let web = id_of(&web);
    let r = d.req("POST", "/vms", Some(&small("web")));
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("\"web\""), "{}", r.text);
    assert_eq!(d.req("GET", "/vms", None).ids(), vec![web.clone()]);
    assert_eq!(d.vmm_pids().len(), 1, "no VMM started for the refused VM");

    // The same name is free for another owner.
    let r = d.as_key(&bob, "POST", "/vms", Some(&small("web")));
    assert_eq!(r.status, 201, "{}", r.text);
    let bobs = id_of(&r.body);
    assert_eq!(r.body["name"], "web");
    assert_eq!(
        d.as_key(&bob, "GET", "/vms", None).ids(),
        vec![bobs.clone()]
    );
    assert_eq!(
        d.as_key(&bob, "DELETE", &format!("/vms/{bobs}"), None)
            .status,
        200
    );

    // Alice's later VM lists before her earlier one.
    let db = id_of(&d.create_vm(&small("db")));
    assert_eq!(
        d.req("GET", "/vms", None).ids(),
        vec![db.clone(), web.clone()]
    );

    for v in [&web, &db] {
        assert_eq!(d.req("DELETE", &format!("/vms/{v}"), None).status, 200);
    }
    assert!(d.vmm_pids().is_empty());
}
