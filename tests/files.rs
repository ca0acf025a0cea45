//! The files API end to end (`PUT`/`GET /vms/{id}/files?path=`) against a
//! real busybox guest over the daemon's SFTP client: a 32 MiB file both ways
//! checked by sha256 without the daemon's memory growing by it, the mode on
//! upload, listings, 404/403/409/400 answers, paths with quotes and `$(...)`
//! reaching the guest verbatim, a cut upload leaving no file, another
//! owner's 404 and a VM without network's 409. What the guest holds is
//! checked from the guest itself, over stock OpenSSH as root.

mod common;
use common::ssh::*;
use common::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `?path=...` percent-encoded (every byte outside unreserved characters).
fn q(path: &str) -> String {
    let mut out = String::from("path=");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `curl` as the holder of `key` with extra arguments; the body goes to
/// `-o out` when given. Returns the status and, without `out`, the body.
fn curl_files(d: &Daemon, key: &str, method: &str, url_path: &str, args: &[&str]) -> Response {
    let mut cmd = d.curl_in_ns("600");
    cmd.args(["-X", method, "-H"])
        .arg(format!("Authorization: Bearer {key}"))
        .args(args)
        .arg("-w")
        .arg("\n%{http_code}")
        .arg(format!("{BASE}{url_path}"));
    Response::of_curl(&cmd.output().expect("run curl"))
}

fn put_bytes(d: &Daemon, key: &str, vm: &str, path: &str, extra: &str, bytes: &[u8]) -> Response {
    let file = d.data_dir.join("upload.bin");
    std::fs::write(&file, bytes).unwrap();
    put_file(d, key, vm, path, extra, &file)
}

fn put_file(d: &Daemon, key: &str, vm: &str, path: &str, extra: &str, file: &Path) -> Response {
    let url = format!("/vms/{vm}/files?{}{extra}", q(path));
    let data = format!("@{}", file.display());
    curl_files(
        d,
        key,
        "PUT",
        &url,
        &[
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
        ],
    )
}

fn get(d: &Daemon, key: &str, vm: &str, path: &str) -> Response {
    curl_files(d, key, "GET", &format!("/vms/{vm}/files?{}", q(path)), &[])
}

/// Downloads into `out`; returns the status and the response headers.
fn get_to(d: &Daemon, vm: &str, path: &str, out: &Path) -> (u16, String) {
    let headers = out.with_extension("headers");
    let r = curl_files(
        d,
        &d.key,
        "GET",
        &format!("/vms/{vm}/files?{}", q(path)),
        &["-o", out.to_str().unwrap(), "-D", headers.to_str().unwrap()],
    );
    let h = std::fs::read_to_string(&headers).unwrap_or_default();
    (r.status, h.to_ascii_lowercase())
}

fn sha256(file: &Path) -> String {
    let out = Command::new("sha256sum").arg(file).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// `hatch ARGS` (the CLI) as alice, in the daemon's namespace: (success, stdout + stderr).
fn cli(d: &Daemon, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &d.ns])
        .arg(bin())
        .args(args)
        .env("HATCH_URL", BASE)
        .env("HATCH_API_KEY", &d.key)
        .env("HOME", &d.data_dir)
        .env_remove("HATCH_CONFIG")
        .output()
        .expect("run hatch");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

struct Guest {
    id: String,
    port: u16,
    root_key: PathBuf,
}

/// A running VM whose guest root takes `key` (for checks from inside) and
/// whose files API answers (sshd may start a little after the console says
/// ready: a 502 until then).
fn guest(d: &Daemon) -> Guest {
    let (root_key, public) = keypair(&d.data_dir);
    let vm = d.create_vm(&json!({ "user_data": ssh_user_data("root", &public) }).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready");
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let r = get(d, &d.key, &id, "/");
        if r.status == 200 {
            break;
        }
        assert!(
            r.status == 502 && Instant::now() < deadline,
            "the files API never answered: {} {}",
            r.status,
            r.text
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    Guest {
        id,
        port: vm["ssh_port"].as_u64().unwrap() as u16,
        root_key,
    }
}

impl Guest {
    /// A command as root in the guest, over stock OpenSSH; its stdout + stderr.
    fn root(&self, d: &Daemon, cmd: &str) -> String {
        d.ssh_ok(None, &self.root_key, "root@127.0.0.1", self.port, cmd)
    }
}

#[test]
fn files_go_both_ways_whole_with_their_mode_and_clear_errors() {
    let mut d = Daemon::start();
    let bob = d.create_key(&["--name", "bob"]);
    let g = guest(&d);
    let id = g.id.as_str();
    let pid = daemon_pid(&d);

    // A small file with a mode, read back, and as the guest sees it.
    let r = put_bytes(
        &d,
        &d.key,
        id,
        "/home/agent/hello.txt",
        "&mode=0640",
        b"hello\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["size"], 6, "{}", r.text);
    assert_eq!(r.body["mode"], "0640", "{}", r.text);
    let r = get(&d, &d.key, id, "/home/agent/hello.txt");
    assert_eq!((r.status, r.text.as_str()), (200, "hello\n"));
    let seen = g.root(&d, "stat -c '%a %U %s' /home/agent/hello.txt");
    assert_eq!(seen.trim(), "640 agent 6");

    // Owner and group on upload, as far as the guest lets `agent` go: a
    // group it is in, yes; root as owner, a clear 403 that leaves nothing.
    // A group with `agent` in it, written straight into /etc/group (the
    // busybox image has no groupadd).
    let ids = g.root(
        &d,
        "grep -q '^hatchtest:' /etc/group || echo 'hatchtest:x:4242:agent' >> /etc/group; \
         echo $(id -u agent) $(grep '^hatchtest:' /etc/group | cut -d: -f3)",
    );
    let last = ids.trim().lines().last().unwrap_or_default();
    let (agent_uid, group) = last
        .split_once(' ')
        .filter(|(u, g)| u.parse::<u32>().is_ok() && g.parse::<u32>().is_ok())
        .unwrap_or_else(|| panic!("agent's uid and the group's gid: {ids:?}"));
    let r = put_bytes(
        &d,
        &d.key,
        id,
        "/home/agent/grouped.txt",
        &format!("&mode=0640&gid={group}"),
        b"shared\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["gid"].to_string(), group, "{}", r.text);
    assert_eq!(r.body["uid"].to_string(), agent_uid, "{}", r.text);
    let seen = g.root(&d, "stat -c '%a %U %G' /home/agent/grouped.txt");
    assert_eq!(seen.trim(), "640 agent hatchtest");
    let r = put_bytes(&d, &d.key, id, "/home/agent/rooted.txt", "&uid=0", b"x");
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(
        r.body["error"].as_str().unwrap().contains("owner 0"),
        "{}",
        r.text
    );
    let left = g.root(&d, "ls -a /home/agent");
    assert!(
        !left.contains("rooted.txt"),
        "a refused owner leaves no file: {left}"
    );
    let r = put_bytes(&d, &d.key, id, "/home/agent/x.txt", "&uid=-1", b"x");
    assert_eq!(r.status, 400, "{}", r.text);
    // Replacing it keeps its mode when none is given.
    let r = put_bytes(
        &d,
        &d.key,
        id,
        "/home/agent/hello.txt",
        "",
        b"hello again\n",
    );
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["mode"], "0640", "{}", r.text);
    let seen = g.root(
        &d,
        "stat -c '%a' /home/agent/hello.txt; cat /home/agent/hello.txt",
    );
    assert_eq!(seen, "640\nhello again\n");

    // 32 MiB up and down, checked by sha256 on both sides, streamed: the
    // daemon's peak memory does not grow by anything like the file.
    let big = d.data_dir.join("big.bin");
    let out = Command::new("head")
        .args(["-c", "33554432", "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&big, &out.stdout).unwrap();
    let want = sha256(&big);
    let hwm_before = status_kib(pid, "VmHWM");
    let r = put_file(&d, &d.key, id, "/home/agent/big.bin", "", &big);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["size"], 33554432, "{}", r.text);
    let inside = g.root(&d, "sha256sum /home/agent/big.bin");
    assert!(inside.starts_with(&want), "guest has {inside}, sent {want}");
    let back = d.data_dir.join("big.back");
    let (status, headers) = get_to(&d, id, "/home/agent/big.bin", &back);
    assert_eq!(status, 200, "{headers}");
    assert!(
        headers.contains("content-type: application/octet-stream"),
        "{headers}"
    );
    assert!(headers.contains("content-length: 33554432"), "{headers}");
    assert_eq!(sha256(&back), want, "the download differs from the upload");
    let grew = status_kib(pid, "VmHWM").saturating_sub(hwm_before);
    assert!(
        grew < 16 * 1024,
        "the daemon's peak RSS grew by {grew} KiB moving a 32 MiB file both ways"
    );

    // A listing of a directory: names sorted, types, sizes, modes.
    g.root(
        &d,
        "mkdir -p /home/agent/d/sub && printf abc >/home/agent/d/f && chmod 604 /home/agent/d/f \
         && ln -s f /home/agent/d/link && chown -R agent /home/agent/d",
    );
    let r = get(&d, &d.key, id, "/home/agent/d");
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.body.as_array().expect("a JSON listing");
    let names: Vec<&str> = entries
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["f", "link", "sub"], "{}", r.text);
    let f = &entries[0];
    assert_eq!(
        (f["type"].as_str(), f["size"].as_u64(), f["mode"].as_str()),
        (Some("file"), Some(3), Some("0604"))
    );
    assert_eq!(entries[1]["type"], "symlink");
    assert_eq!(entries[2]["type"], "dir");
    assert!(f["mtime"].as_u64().unwrap() > 1_600_000_000, "{f}");

    // A path with spaces, quotes and $(...) is a name, never a command.
    let odd = "/home/agent/it's a \"file\" $(touch pwned) `id`; x";
    let r = put_bytes(&d, &d.key, id, odd, "", b"odd\n");
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["path"], odd);
    let r = get(&d, &d.key, id, odd);
    assert_eq!((r.status, r.text.as_str()), (200, "odd\n"));
    let listed = g.root(&d, "ls -1a /home/agent");
    assert!(
        listed.lines().any(|l| l == &odd["/home/agent/".len()..]),
        "{listed}"
    );
    assert!(
        !listed.lines().any(|l| l == "pwned"),
        "a command in the path ran: {listed}"
    );
    assert!(
        !listed.contains("hatch-upload"),
        "a temp file was left: {listed}"
    );

    // Missing: 404 with the path; a directory that is not there: 404.
    let r = get(&d, &d.key, id, "/home/agent/no-such-file");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(r.error().contains("no such file"), "{}", r.text);
    let r = put_bytes(&d, &d.key, id, "/no/such/dir/f", "", b"x");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(
        r.error().contains("/no/such/dir does not exist"),
        "{}",
        r.text
    );
    // Permission: a file only root reads, a directory agent cannot write.
    g.root(&d, "echo secret >/root-only && chmod 600 /root-only");
    let r = get(&d, &d.key, id, "/root-only");
    assert_eq!(r.status, 403, "{}", r.text);
    assert!(r.error().contains("permission denied"), "{}", r.text);
    let r = put_bytes(&d, &d.key, id, "/etc/hatch-was-here", "", b"x");
    assert_eq!(r.status, 403, "{}", r.text);
    // A directory where a file goes: 409.
    let r = put_bytes(&d, &d.key, id, "/home/agent/d", "", b"x");
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("is a directory"), "{}", r.text);
    // Bad requests: a relative path, none, a bad mode, an unknown parameter.
    for url in [
        format!("/vms/{id}/files?path=home/agent/x"),
        format!("/vms/{id}/files"),
        format!("/vms/{id}/files?path=/tmp/x&mode=rw-r--r--"),
        format!("/vms/{id}/files?path=/tmp/x&recursive=true"),
    ] {
        let r = curl_files(&d, &d.key, "PUT", &url, &["--data-binary", "x"]);
        assert_eq!(r.status, 400, "PUT {url}: {}", r.text);
    }

    // The CLI: `hatch vm cp` both ways, the local mode going with an upload.
    let local = d.data_dir.join("script.sh");
    std::fs::write(&local, "#!/bin/sh\necho from the cli\n").unwrap();
    std::fs::set_permissions(&local, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            local.to_str().unwrap(),
            &format!("{id}:/home/agent/script.sh"),
        ],
    );
    assert!(ok, "vm cp up: {text}");
    let seen = g.root(
        &d,
        "stat -c %a /home/agent/script.sh; /home/agent/script.sh",
    );
    assert_eq!(seen, "750\nfrom the cli\n");
    // --mode and --gid instead of the local bits and agent's group; --uid
    // of root refused by the guest, with the API's message and no file.
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            "--mode",
            "0604",
            "--gid",
            group,
            local.to_str().unwrap(),
            &format!("{id}:/home/agent/script2.sh"),
        ],
    );
    assert!(ok, "vm cp --mode --gid: {text}");
    let seen = g.root(&d, "stat -c '%a %U %G' /home/agent/script2.sh");
    assert_eq!(seen.trim(), "604 agent hatchtest");
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            "--uid",
            "0",
            local.to_str().unwrap(),
            &format!("{id}:/home/agent/rooted2.sh"),
        ],
    );
    assert!(!ok && text.contains("owner 0"), "vm cp --uid 0: {text}");
    let left = g.root(&d, "ls -a /home/agent");
    assert!(
        !left.contains("rooted2"),
        "a refused owner left a file: {left}"
    );
    // A bad mode is refused before anything is sent; the options are for uploads.
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            "--mode",
            "0999",
            local.to_str().unwrap(),
            &format!("{id}:/home/agent/bad-mode.sh"),
        ],
    );
    assert!(
        !ok && text.contains("not a mode"),
        "vm cp --mode 0999: {text}"
    );
    let into = d.data_dir.join("cli-down");
    std::fs::create_dir_all(&into).unwrap();
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            &format!("{id}:/home/agent/big.bin"),
            into.to_str().unwrap(),
        ],
    );
    assert!(ok, "vm cp down: {text}");
    assert_eq!(sha256(&into.join("big.bin")), want, "vm cp down differs");
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            &format!("{id}:/home/agent/nope"),
            into.to_str().unwrap(),
        ],
    );
    assert!(!ok && text.contains("no such file"), "{text}");
    let (ok, text) = cli(
        &d,
        &[
            "vm",
            "cp",
            "--mode",
            "0600",
            &format!("{id}:/home/agent/big.bin"),
            into.to_str().unwrap(),
        ],
    );
    assert!(
        !ok && text.contains("uploaded file"),
        "vm cp --mode down: {text}"
    );
    let left: Vec<_> = std::fs::read_dir(&into)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(left.len(), 1, "a failed vm cp left a file: {left:?}");

    // Another owner: 404 both ways, and nothing written.
    let r = get(&d, &bob, id, "/home/agent/hello.txt");
    assert_eq!(r.status, 404, "{}", r.text);
    assert!(!r.text.contains("hello"), "{}", r.text);
    let r = put_bytes(&d, &bob, id, "/home/agent/from-bob", "", b"bob");
    assert_eq!(r.status, 404, "{}", r.text);
    let listed = g.root(&d, "ls -1a /home/agent");
    assert!(!listed.contains("from-bob"), "{listed}");

    // No network, no SSH: 409, whatever the VM's state.
    let offline = d.create_vm(r#"{"enable_network": false}"#);
    let off = offline["id"].as_str().unwrap();
    let r = get(&d, &d.key, off, "/etc/hostname");
    assert_eq!(r.status, 409, "{}", r.text);
    assert!(r.error().contains("no network"), "{}", r.text);
    let r = put_bytes(&d, &d.key, off, "/tmp/x", "", b"x");
    assert_eq!(r.status, 409, "{}", r.text);
    d.terminate();
}

#[test]
fn a_cut_upload_leaves_the_old_file_and_no_temp_file() {
    let mut d = Daemon::start();
    let g = guest(&d);
    let id = g.id.as_str();
    let r = put_bytes(&d, &d.key, id, "/home/agent/target", "", b"old\n");
    assert_eq!(r.status, 201, "{}", r.text);

    // 32 MiB sent at 1 MiB/s and cut after 3 s: curl closes the connection
    // mid-body.
    let big = d.data_dir.join("cut.bin");
    let out = Command::new("head")
        .args(["-c", "33554432", "/dev/zero"])
        .output()
        .unwrap();
    std::fs::write(&big, &out.stdout).unwrap();
    let url = format!("{BASE}/vms/{id}/files?{}", q("/home/agent/target"));
    let out = d
        .curl_in_ns("3")
        .args(["-X", "PUT", "-H"])
        .arg(format!("Authorization: Bearer {}", d.key))
        .args(["--limit-rate", "1M", "--data-binary"])
        .arg(format!("@{}", big.display()))
        .arg(&url)
        .output()
        .unwrap();
    assert!(!out.status.success(), "the upload was meant to be cut");

    // The daemon notices the cut and removes its temp file; the target keeps
    // its old content all along.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = g.root(&d, "ls -1a /home/agent; cat /home/agent/target");
        assert!(listed.ends_with("\nold\n"), "{listed}");
        if !listed.contains("hatch-upload") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cut upload's temp file stayed: {listed}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let log = d.daemon_log();
    assert!(
        log.contains("was cut"),
        "the daemon never saw the cut: {log}"
    );
    let r = get(&d, &d.key, id, "/home/agent/target");
    assert_eq!((r.status, r.text.as_str()), (200, "old\n"));
    d.terminate();
}

/// An exec that must answer 200 (the guest is up by then); its stdout.
fn exec_stdout(d: &Daemon, vm: &str, command: &str) -> String {
    let r = d.req(
        "POST",
        &format!("/vms/{vm}/exec"),
        Some(&json!({ "command": command }).to_string()),
    );
    assert_eq!(r.status, 200, "exec {command}: {}", r.text);
    assert_eq!(r.body["exit_code"], 0, "exec {command}: {}", r.text);
    r.body["stdout"].as_str().unwrap().to_string()
}

/// The files API on the Debian cloud-init image (OpenSSH's own sftp-server,
/// the CA's trust from cloud-init's vendor-data): a file up and down checked
/// by sha256 on both sides, its mode on upload, a listing, 404 and 403.
#[test]
fn files_on_the_debian_cloud_init_image() {
    let Some(img) = debian_image_dir_if_built() else {
        return;
    };
    let (d, image) = debian_daemon(&img);
    let vm = d.create_vm(&json!({"image_id": image, "mem_mib": 1024}).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    // A Debian boot under TCG takes minutes, and cloud-init installs the
    // CA's trust in its last stage: until then the guest refuses (502).
    let home = until_guest_ssh(Duration::from_secs(900), || {
        get(&d, &d.key, &id, "/home/agent")
    });
    assert!(
        home.body.is_array(),
        "a listing of agent's home: {}",
        home.text
    );

    let file = d.data_dir.join("debian.bin");
    let out = Command::new("head")
        .args(["-c", "4194304", "/dev/urandom"])
        .output()
        .unwrap();
    std::fs::write(&file, &out.stdout).unwrap();
    let want = sha256(&file);
    let r = put_file(&d, &d.key, &id, "/home/agent/up.bin", "&mode=0640", &file);
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.body["size"], 4194304, "{}", r.text);
    assert_eq!(r.body["mode"], "0640", "{}", r.text);
    // What the guest itself holds.
    let seen = exec_stdout(
        &d,
        &id,
        "stat -c '%a %U %s' /home/agent/up.bin; sha256sum /home/agent/up.bin",
    );
    assert_eq!(
        seen,
        format!("640 agent 4194304\n{want}  /home/agent/up.bin\n")
    );
    let back = d.data_dir.join("debian.back");
    let (status, headers) = get_to(&d, &id, "/home/agent/up.bin", &back);
    assert_eq!(status, 200, "{headers}");
    assert!(headers.contains("content-length: 4194304"), "{headers}");
    assert_eq!(sha256(&back), want, "the download differs from the upload");

    // A listing: names sorted, types, sizes, modes.
    exec_stdout(
        &d,
        &id,
        "mkdir -p /home/agent/d/sub && printf abc >/home/agent/d/f && chmod 604 /home/agent/d/f \
         && ln -s f /home/agent/d/link",
    );
    let r = get(&d, &d.key, &id, "/home/agent/d");
    assert_eq!(r.status, 200, "{}", r.text);
    let entries = r.body.as_array().expect("a JSON listing");
    let listed: Vec<(&str, &str)> = entries
        .iter()
        .map(|e| (e["name"].as_str().unwrap(), e["type"].as_str().unwrap()))
        .collect();
    assert_eq!(
        listed,
        [("f", "file"), ("link", "symlink"), ("sub", "dir")],
        "{}",
        r.text
    );
    assert_eq!(
        (entries[0]["size"].as_u64(), entries[0]["mode"].as_str()),
        (Some(3), Some("0604")),
        "{}",
        r.text
    );

    // Missing: 404; a file only root reads and a directory agent cannot
    // write: 403.
    let r = get(&d, &d.key, &id, "/home/agent/no-such-file");
    assert_eq!(r.status, 404, "{}", r.text);
    let r = get(&d, &d.key, &id, "/etc/shadow");
    assert_eq!(r.status, 403, "{}", r.text);
    let r = put_bytes(&d, &d.key, &id, "/etc/hatch-was-here", "", b"x");
    assert_eq!(r.status, 403, "{}", r.text);
}
