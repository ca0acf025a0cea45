//! End-to-end harness: the real `hatch` binary in a network namespace of its
//! own, real QEMU guests under TCG, and curl (run inside the namespace) as the client.
#![allow(dead_code)]

pub mod better_auth;
pub mod confine;
pub mod hardening;
pub mod images;
pub mod safety;
pub mod ssh;
pub mod web;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

pub const BASE: &str = "http://127.0.0.1:8080";
/// Under TCG a guest reaches its ready line in about 2 s; this leaves room for a loaded CI machine.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

static SEQ: AtomicU32 = AtomicU32::new(0);

/// The default test image, built by `hatch image build` (the test script does it).
pub fn image_dir() -> PathBuf {
    let dir = std::env::var_os("HATCH_TEST_IMAGE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/hatch-image"));
    for f in ["vmlinuz", "initrd.img", "rootfs.ext4"] {
        assert!(
            dir.join(f).exists(),
            "test image missing {}: run `hatch image build --out {}` (scripts/test does)",
            dir.join(f).display(),
            dir.display()
        );
    }
    dir
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_hatch"))
}

pub struct Response {
    pub status: u16,
    pub body: Value,
    pub text: String,
}

impl Response {
    /// What curl printed with `-w "\n%{http_code}"`: the body, then the status.
    pub fn of_curl(out: &std::process::Output) -> Response {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
        Response {
            status: code.trim().parse().unwrap_or(0),
            body: serde_json::from_str(text).unwrap_or(Value::Null),
            text: text.to_string(),
        }
    }

    /// The `id`s of a JSON array body, in order.
    pub fn ids(&self) -> Vec<String> {
        let items = self
            .body
            .as_array()
            .unwrap_or_else(|| panic!("expected a JSON array: {}", self.text));
        items
            .iter()
            .map(|v| v["id"].as_str().unwrap().to_string())
            .collect()
    }

    pub fn error(&self) -> &str {
        self.body
            .get("error")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("expected an error body, got {} {}", self.status, self.text))
    }
}

/// One `#[test]` per storage backend for a scenario taking a `Storage`.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($scenario:ident: $local:ident, $s3:ident) => {
        #[test]
        fn $local() {
            $scenario(Storage::Local)
        }
        #[test]
        fn $s3() {
            $scenario(Storage::S3)
        }
    };
}

/// Where the daemon keeps snapshots: its local directory, or a real
/// S3-compatible server (s3s-fs) on the loopback of the daemon's namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storage {
    Local,
    S3,
}

pub const S3_BUCKET: &str = "hatch-snapshots";
const S3_ADDR: &str = "127.0.0.1:9000";
const S3_ACCESS_KEY: &str = "hatch-test-access";
const S3_SECRET_KEY: &str = "hatch-test-secret-key";

/// The s3s-fs binary scripts/test installs.
fn s3s_fs() -> PathBuf {
    if let Some(p) = std::env::var_os("HATCH_TEST_S3S_FS") {
        return p.into();
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let candidates = [
        home.join(".cargo/bin/s3s-fs"),
        "/usr/local/bin/s3s-fs".into(),
    ];
    candidates
        .into_iter()
        .find(|p| p.exists())
        .expect("s3s-fs not found: scripts/test installs it (cargo install s3s-fs)")
}

pub struct Daemon {
    pub storage: Storage,
    /// Namespaces made besides the daemon's own (client, upstream), removed on drop.
    extra_ns: Vec<String>,
    /// Processes started in those namespaces (DNS and HTTP servers), killed on drop.
    helpers: Vec<Child>,
    pub ns: String,
    pub data_dir: PathBuf,
    /// The S3 server (index into `helpers`), when the storage is S3.
    s3_server: Option<usize>,
    child: Option<Child>,
    extra_env: Vec<(String, String)>,
    /// Key of the owner `alice`, created before the daemon starts.
    pub key: String,
    log: PathBuf,
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Daemon {
    pub fn start() -> Daemon {
        Self::start_with(&[])
    }

    /// Starts a daemon with extra HATCH_* variables, in a fresh namespace and data dir.
    pub fn start_with(env: &[(&str, &str)]) -> Daemon {
        Self::start_full(env, false)
    }

    /// A daemon whose host has an upstream network (see `add_upstream`).
    pub fn start_with_upstream() -> Daemon {
        Self::start_full(&[], true)
    }

    /// A daemon whose snapshots go to `storage`.
    pub fn start_storage(storage: Storage, upstream: bool) -> Daemon {
        Self::start_inner(&[], upstream, storage)
    }

    /// A daemon whose snapshots go to `storage`, with extra HATCH_* variables.
    pub fn start_storage_with(storage: Storage, env: &[(&str, &str)]) -> Daemon {
        Self::start_inner(env, false, storage)
    }

    pub fn start_full(env: &[(&str, &str)], upstream: bool) -> Daemon {
        Self::start_inner(env, upstream, Storage::Local)
    }

    fn start_inner(env: &[(&str, &str)], upstream: bool, storage: Storage) -> Daemon {
        let id = format!(
            "{}-{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::SeqCst)
        );
        let ns = format!("hatch-e2e-{id}");
        let data_dir = PathBuf::from(format!("/tmp/hatch-e2e-{id}"));
        let _ = std::fs::remove_dir_all(&data_dir);
        std::fs::create_dir_all(&data_dir).unwrap();
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        run_ok(Command::new("ip").args(["netns", "add", &ns]));
        run_ok(Command::new("ip").args(["-n", &ns, "link", "set", "lo", "up"]));
        let mut d = Daemon {
            storage,
            extra_ns: vec![],
            helpers: vec![],
            ns,
            log: data_dir.join("daemon.log"),
            data_dir,
            s3_server: None,
            child: None,
            extra_env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            key: String::new(),
        };
        d.key = d.create_key(&["--name", "alice"]);
        if upstream {
            d.add_upstream();
        }
        if storage == Storage::S3 {
            d.add_s3();
        }
        d.spawn();
        d
    }

    /// A real S3-compatible server (s3s-fs) on the loopback of the daemon's
    /// namespace, with one bucket, and the daemon configured to use it.
    fn add_s3(&mut self) {
        let root = self.data_dir.join("s3");
        std::fs::create_dir_all(root.join(S3_BUCKET)).unwrap();
        let (host, port) = S3_ADDR.split_once(':').unwrap();
        let server = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .arg(s3s_fs())
            .args(["--host", host, "--port", port])
            .args(["--access-key", S3_ACCESS_KEY, "--secret-key", S3_SECRET_KEY])
            .arg(&root)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start s3s-fs");
        self.s3_server = Some(self.helpers.len());
        self.helpers.push(server);
        wait_until("s3s-fs answers", Duration::from_secs(30), || {
            self.s3(&["-o", "/dev/null", "-w", "%{http_code}"], "GET", "")
                .starts_with('2')
        });
        for (k, v) in [
            ("HATCH_S3_BUCKET", S3_BUCKET),
            ("HATCH_S3_ENDPOINT", &format!("http://{S3_ADDR}")),
            ("HATCH_S3_ACCESS_KEY", S3_ACCESS_KEY),
            ("HATCH_S3_SECRET_KEY", S3_SECRET_KEY),
            ("HATCH_S3_REGION", "us-east-1"),
        ] {
            self.extra_env.push((k.to_string(), v.to_string()));
        }
    }

    /// Stops the S3 server: the store becomes unreachable for the daemon.
    pub fn stop_s3(&mut self) {
        let i = self.s3_server.expect("a daemon with S3 storage");
        let _ = self.helpers[i].kill();
        let _ = self.helpers[i].wait();
    }

    /// A signed (SigV4) request to the bucket with curl, a real S3 client.
    fn s3(&self, args: &[&str], method: &str, path_and_query: &str) -> String {
        let out = self.in_ns(
            None,
            &[
                // curl 7.88 does not add the payload hash header S3 wants; it signs the one given.
                &["curl", "-sS", "--aws-sigv4", "aws:amz:us-east-1:s3"][..],
                &["-H", "x-amz-content-sha256: UNSIGNED-PAYLOAD"],
                &["--user", &format!("{S3_ACCESS_KEY}:{S3_SECRET_KEY}")],
                &["-X", method],
                args,
                &[&format!("http://{S3_ADDR}/{S3_BUCKET}{path_and_query}")],
            ]
            .concat(),
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Keys and sizes of the stored objects under `prefix`, from the store itself.
    pub fn stored_objects(&self, prefix: &str) -> Vec<(String, u64)> {
        let mut out = vec![];
        match self.storage {
            Storage::Local => {
                fn walk(dir: &Path, base: &Path, out: &mut Vec<(String, u64)>) {
                    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
                        let p = e.path();
                        if p.is_dir() {
                            walk(&p, base, out);
                        } else {
                            let key = p.strip_prefix(base).unwrap().to_string_lossy().to_string();
                            // The daemon may remove (collect) it meanwhile.
                            if let Ok(m) = e.metadata() {
                                out.push((key, m.len()));
                            }
                        }
                    }
                }
                let base = self.data_dir.join("objects");
                walk(&base, &base, &mut out);
                out.retain(|(k, _)| k.starts_with(prefix));
            }
            Storage::S3 => {
                let field = |xml: &str, name: &str| {
                    xml.split(&format!("<{name}>"))
                        .nth(1)
                        .and_then(|r| r.split(&format!("</{name}>")).next())
                        .unwrap_or_default()
                        .to_string()
                };
                // Our keys are [A-Za-z0-9_.-] and `/`: only `/` needs escaping.
                let encode = |v: &str| v.replace('/', "%2F");
                // Pages of at most 1000 keys: go on after the last one seen.
                let mut after: Option<String> = None;
                loop {
                    let mut query = format!("?list-type=2&prefix={}", encode(prefix));
                    if let Some(a) = &after {
                        query.push_str(&format!("&start-after={}", encode(a)));
                    }
                    // s3s-fs walks its directory: a file the daemon deletes
                    // meanwhile makes that walk fail. Ask again.
                    let mut xml = self.s3(&[], "GET", &query);
                    for _ in 0..20 {
                        if xml.contains("ListBucketResult") {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(100));
                        xml = self.s3(&[], "GET", &query);
                    }
                    assert!(
                        xml.contains("ListBucketResult"),
                        "listing the bucket: {xml}"
                    );
                    let before = out.len();
                    for item in xml.split("<Contents>").skip(1) {
                        out.push((field(item, "Key"), field(item, "Size").parse().unwrap_or(0)));
                    }
                    if field(&xml, "IsTruncated") != "true" || out.len() == before {
                        break;
                    }
                    after = out.last().map(|(k, _)| k.clone());
                }
            }
        }
        out.sort();
        out
    }

    pub fn read_object(&self, key: &str) -> Vec<u8> {
        match self.storage {
            Storage::Local => std::fs::read(self.data_dir.join("objects").join(key)).unwrap(),
            Storage::S3 => {
                let tmp = self.data_dir.join("object.download");
                let code = self.s3(
                    &["-o", tmp.to_str().unwrap(), "-w", "%{http_code}"],
                    "GET",
                    &format!("/{key}"),
                );
                assert_eq!(code, "200", "GET {key}");
                let bytes = std::fs::read(&tmp).unwrap();
                let _ = std::fs::remove_file(&tmp);
                bytes
            }
        }
    }

    /// Replaces an object's bytes behind the daemon's back (to corrupt it).
    pub fn write_object(&self, key: &str, bytes: &[u8]) {
        match self.storage {
            Storage::Local => {
                std::fs::write(self.data_dir.join("objects").join(key), bytes).unwrap()
            }
            Storage::S3 => {
                let tmp = self.data_dir.join("object.upload");
                std::fs::write(&tmp, bytes).unwrap();
                let code = self.s3(
                    &[
                        "-T",
                        tmp.to_str().unwrap(),
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                    ],
                    "PUT",
                    &format!("/{key}"),
                );
                let _ = std::fs::remove_file(&tmp);
                assert_eq!(code, "200", "PUT {key}");
            }
        }
    }

    pub fn remove_object(&self, key: &str) {
        match self.storage {
            Storage::Local => {
                std::fs::remove_file(self.data_dir.join("objects").join(key)).unwrap()
            }
            Storage::S3 => {
                let code = self.s3(
                    &["-o", "/dev/null", "-w", "%{http_code}"],
                    "DELETE",
                    &format!("/{key}"),
                );
                assert!(code.starts_with('2'), "DELETE {key}: {code}");
            }
        }
    }

    /// An "internet" for the daemon's host: another namespace behind a veth,
    /// the default route, a DNS server that knows `upstream.test` and an HTTP
    /// server there. The daemon's resolver points at it (`ip netns exec`
    /// bind-mounts /etc/netns/NS/resolv.conf), so dnsmasq forwards to it.
    fn add_upstream(&mut self) {
        let up = self.add_peer_ns("up", "10.88.0");
        run_ok(Command::new("ip").args([
            "-n",
            &self.ns,
            "route",
            "add",
            "default",
            "via",
            "10.88.0.2",
        ]));
        let etc = PathBuf::from(format!("/etc/netns/{}", self.ns));
        std::fs::create_dir_all(&etc).unwrap();
        std::fs::write(etc.join("resolv.conf"), "nameserver 10.88.0.2\n").unwrap();
        let www = self.data_dir.join("upstream-www");
        std::fs::create_dir_all(&www).unwrap();
        std::fs::write(www.join("hello.txt"), "hello from upstream\n").unwrap();
        let dns = Command::new("ip")
            .args([
                "netns",
                "exec",
                &up,
                "dnsmasq",
                "--keep-in-foreground",
                "--conf-file=/dev/null",
                "--no-hosts",
                "--no-resolv",
                "--listen-address=10.88.0.2",
                "--bind-interfaces",
                "--address=/upstream.test/10.88.0.2",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start upstream DNS");
        self.helpers.push(dns);
        let http = Command::new("ip")
            .args([
                "netns",
                "exec",
                &up,
                "busybox",
                "httpd",
                "-f",
                "-p",
                "10.88.0.2:8000",
                "-h",
            ])
            .arg(&www)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start upstream HTTP");
        self.helpers.push(http);
    }

    /// A client host: a namespace joined to the daemon's host by a veth
    /// (client 10.77.0.2, daemon host 10.77.0.1). Returns its name.
    pub fn add_client(&mut self) -> String {
        self.add_peer_ns("cl", "10.77.0")
    }

    /// A namespace `{ns}-{tag}` joined to the daemon's host by a veth:
    /// `{tag}0` = `{net}.1/24` on the daemon's side, `{tag}1` = `{net}.2/24` on the peer's.
    fn add_peer_ns(&mut self, tag: &str, net: &str) -> String {
        let peer = format!("{}-{tag}", self.ns);
        let (host_if, peer_if) = (format!("{tag}0"), format!("{tag}1"));
        let ip = |ns: &str, args: &[&str]| run_ok(Command::new("ip").arg("-n").arg(ns).args(args));
        let _ = Command::new("ip").args(["netns", "del", &peer]).output();
        run_ok(Command::new("ip").args(["netns", "add", &peer]));
        self.extra_ns.push(peer.clone());
        ip(&peer, &["link", "set", "lo", "up"]);
        ip(
            &self.ns,
            &[
                "link", "add", &host_if, "type", "veth", "peer", "name", &peer_if, "netns", &peer,
            ],
        );
        ip(
            &self.ns,
            &["addr", "add", &format!("{net}.1/24"), "dev", &host_if],
        );
        ip(&self.ns, &["link", "set", &host_if, "up"]);
        ip(
            &peer,
            &["addr", "add", &format!("{net}.2/24"), "dev", &peer_if],
        );
        ip(&peer, &["link", "set", &peer_if, "up"]);
        peer
    }

    /// Runs `cmd` in namespace `ns` (the daemon's host when None).
    pub fn in_ns(&self, ns: Option<&str>, cmd: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", ns.unwrap_or(&self.ns)])
            .args(cmd)
            .output()
            .expect("ip netns exec")
    }

    /// Runs `hatch keys create ARGS` and returns the key (the last line of stdout).
    pub fn create_key(&self, args: &[&str]) -> String {
        let out = run_ok(self.hatch_cmd().args(["keys", "create"]).args(args));
        out.lines().last().expect("a key line").trim().to_string()
    }

    pub fn hatch_cmd(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("HATCH_DATA_DIR", &self.data_dir);
        c
    }

    fn spawn(&mut self) {
        let img = image_dir();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(bin())
            .arg("serve")
            .env("HATCH_DATA_DIR", &self.data_dir)
            .env("HATCH_HTTP_ADDR", "127.0.0.1:8080")
            .env("HATCH_DEFAULT_KERNEL_PATH", img.join("vmlinuz"))
            .env("HATCH_DEFAULT_INITRD_PATH", img.join("initrd.img"))
            .env("HATCH_DEFAULT_ROOTFS_PATH", img.join("rootfs.ext4"))
            .env("HATCH_LOG", "info,sqlx=warn")
            // Wakes from the store, which most tests are about; tests/hot.rs
            // turns hot copies (the default) back on.
            .env("HATCH_HOT_SLEEP_SECONDS", "0")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in &self.extra_env {
            cmd.env(k, v);
        }
        self.child = Some(cmd.spawn().expect("spawn hatch serve"));
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("hatch serve exited ({status}): {}", self.daemon_log());
            }
            if self.curl("GET", "/health", &[], None).status == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "daemon did not answer /health: {}",
                self.daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn daemon_log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `curl -sS --max-time SECS`, run inside the daemon's namespace.
    pub fn curl_in_ns(&self, max_time_secs: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time"])
            .arg(max_time_secs);
        cmd
    }

    /// Any request, with explicit headers, through curl inside the namespace.
    pub fn curl(
        &self,
        method: &str,
        path: &str,
        headers: &[String],
        body: Option<&str>,
    ) -> Response {
        let mut cmd = self.curl_in_ns("300");
        cmd.args(["-X", method]);
        for h in headers {
            cmd.arg("-H").arg(h);
        }
        if let Some(b) = body {
            cmd.arg("--data-binary").arg(b);
        }
        cmd.arg("-w")
            .arg("\n%{http_code}")
            .arg(format!("{BASE}{path}"));
        Response::of_curl(&cmd.output().expect("run curl"))
    }

    pub fn as_key(&self, key: &str, method: &str, path: &str, body: Option<&str>) -> Response {
        let h = [
            format!("Authorization: Bearer {key}"),
            "Content-Type: application/json".into(),
        ];
        self.curl(method, path, &h, body)
    }

    /// A request as alice.
    /// One sample of `GET /metrics` read with `token`: `series` is the name
    /// with its labels as the text has it (`hatch_wakes_total{result="ok"}`);
    /// None when the series is not there.
    pub fn metric_sample(&self, token: &str, series: &str) -> Option<f64> {
        let r = self.curl(
            "GET",
            "/metrics",
            &[format!("Authorization: Bearer {token}")],
            None,
        );
        assert_eq!(r.status, 200, "{}", r.text);
        r.text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{series} ")))
            .and_then(|v| v.trim().parse().ok())
    }

    pub fn req(&self, method: &str, path: &str, body: Option<&str>) -> Response {
        self.as_key(&self.key, method, path, body)
    }

    /// Creates a VM as alice and asserts the 201.
    pub fn create_vm(&self, body: &str) -> Value {
        let r = self.req("POST", "/vms", Some(body));
        assert_eq!(
            r.status,
            201,
            "create VM: {}\n{}",
            r.text,
            self.daemon_log()
        );
        r.body
    }

    pub fn vm(&self, id: &str) -> Value {
        let r = self.req("GET", &format!("/vms/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.text);
        r.body
    }

    pub fn logs(&self, id: &str) -> String {
        self.req("GET", &format!("/vms/{id}/logs"), None).text
    }

    /// Polls the console log through the API until it contains `needle`.
    pub fn wait_console(&self, id: &str, needle: &str) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let text = self.logs(id);
            if text.contains(needle) {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "console of {id} never showed {needle:?}:\n{text}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn work_dir(&self, vm_id: &str) -> PathBuf {
        self.data_dir.join("vms").join(vm_id)
    }

    /// Processes (VMMs) whose command line names this daemon's VM directory.
    pub fn vmm_pids(&self) -> Vec<u32> {
        pids_mentioning(&format!("{}/vms/", self.data_dir.display()))
    }

    pub fn vmm_pids_of(&self, vm_id: &str) -> Vec<u32> {
        pids_mentioning(&format!("{}/", self.work_dir(vm_id).display()))
    }

    /// Kills the VM's one VMM process with SIGKILL, as a crash would: its
    /// guest gets no chance to close anything.
    pub fn kill_vmm(&self, vm_id: &str) {
        let pids = self.vmm_pids_of(vm_id);
        assert_eq!(pids.len(), 1, "VMM processes of {vm_id}: {pids:?}");
        let killed = Command::new("kill")
            .args(["-KILL", &pids[0].to_string()])
            .status()
            .unwrap();
        assert!(killed.success());
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs the daemon, so this pid is the daemon itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: the daemon's graceful shutdown.
    pub fn terminate(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "-TERM");
            // Room for each guest's graceful stop under a loaded machine (a
            // test may give the daemon a long HATCH_STOP_TIMEOUT).
            let deadline = Instant::now() + Duration::from_secs(300);
            while c.try_wait().unwrap().is_none() {
                if Instant::now() > deadline {
                    let _ = c.kill();
                    panic!("daemon did not exit within 300s of SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Sets (or with None removes) a HATCH_* variable for the next `restart`.
    pub fn set_env(&mut self, key: &str, value: Option<&str>) {
        self.extra_env.retain(|(k, _)| k != key);
        if let Some(v) = value {
            self.extra_env.push((key.to_string(), v.to_string()));
        }
    }

    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "stop the daemon first");
        self.spawn();
    }
}

fn signal(pid: u32, sig: &str) {
    let _ = Command::new("kill").arg(sig).arg(pid.to_string()).output();
}

pub fn pids_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let mut out = vec![];
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let line: Vec<u8> = raw
            .iter()
            .map(|b| if *b == 0 { b' ' } else { *b })
            .collect();
        let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            })
            .unwrap_or(false);
        if alive && String::from_utf8_lossy(&line).contains(needle) {
            out.push(pid);
        }
    }
    out
}

/// Waits until `cond` holds, or panics with `what`.
pub fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(c.id(), "-TERM");
            let deadline = Instant::now() + Duration::from_secs(60);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.vmm_pids() {
            signal(pid, "-KILL");
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).output();
        for h in &mut self.helpers {
            let _ = h.kill();
            let _ = h.wait();
        }
        for ns in &self.extra_ns {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", self.ns));
        if std::thread::panicking() {
            eprintln!(
                "---- daemon log ({}) ----\n{}",
                self.log.display(),
                self.daemon_log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.data_dir);
    }
}

/// An ed25519 key pair for the tests' SSH logins: (private key path, public key line).
pub fn keypair(dir: &Path) -> (PathBuf, String) {
    let key = dir.join("id_ed25519");
    let _ = std::fs::remove_file(&key);
    run_ok(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "hatch-test", "-f"])
            .arg(&key),
    );
    let public = std::fs::read_to_string(key.with_extension("pub"))
        .unwrap()
        .trim()
        .to_string();
    (key, public)
}

/// cloud-config user data that authorizes `public` for `user`.
pub fn ssh_user_data(user: &str, public: &str) -> String {
    format!("#cloud-config\nusers:\n  - name: {user}\n    ssh_authorized_keys:\n      - {public}\n")
}

/// The OpenSSH client options of every test login: no host key question,
/// nothing read from or written to the host's known hosts, no prompt, a
/// bounded connect, only errors printed.
pub fn ssh_options(connect_timeout_secs: u64) -> Vec<String> {
    [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        &format!("ConnectTimeout={connect_timeout_secs}"),
        "-o",
        "LogLevel=ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

impl Daemon {
    /// Runs `args` (an `ssh ...` command line) in namespace `ns` (the
    /// daemon's host when None). Returns (success, stdout + stderr).
    pub fn run_ssh(&self, ns: Option<&str>, args: &[String]) -> (bool, String) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.in_ns(ns, &args);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// `ssh -p PORT USER@HOST CMD` with the OpenSSH client, from namespace `ns`
    /// (the daemon's host when None). Returns (success, stdout + stderr).
    pub fn ssh(
        &self,
        ns: Option<&str>,
        key: &Path,
        target: &str,
        port: u16,
        cmd: &str,
    ) -> (bool, String) {
        let mut args: Vec<String> = [
            "ssh",
            "-i",
            &key.display().to_string(),
            "-p",
            &port.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(ssh_options(5));
        args.extend([target.to_string(), cmd.to_string()]);
        self.run_ssh(ns, &args)
    }

    /// Retries `ssh` until it succeeds (the guest may still be booting).
    pub fn ssh_ok(
        &self,
        ns: Option<&str>,
        key: &Path,
        target: &str,
        port: u16,
        cmd: &str,
    ) -> String {
        self.ssh_within(BOOT_TIMEOUT, ns, key, target, port, cmd)
    }

    pub fn ssh_within(
        &self,
        timeout: Duration,
        ns: Option<&str>,
        key: &Path,
        target: &str,
        port: u16,
        cmd: &str,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let (ok, text) = self.ssh(ns, key, target, port, cmd);
            if ok {
                return text;
            }
            assert!(
                Instant::now() < deadline,
                "ssh {target} -p {port} {cmd:?} never worked: {text}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Links in the daemon's namespace whose name starts with `prefix`.
    /// Panics if `ip` fails: an empty list must mean "no such link", never
    /// "could not look".
    pub fn links(&self, prefix: &str) -> Vec<String> {
        let out = self.in_ns(None, &["ip", "-o", "link", "show"]);
        assert!(
            out.status.success(),
            "ip -o link show in {}: {}",
            self.ns,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap_or(n).to_string())
            .filter(|n| n.starts_with(prefix))
            .collect()
    }

    /// The daemon's nftables table `ip hatch` as text, None when it does not
    /// exist. Any other failure of `nft` panics.
    pub fn nft_table_opt(&self) -> Option<String> {
        let out = self.in_ns(None, &["nft", "list", "table", "ip", "hatch"]);
        if out.status.success() {
            return Some(String::from_utf8_lossy(&out.stdout).into_owned());
        }
        let err = String::from_utf8_lossy(&out.stderr);
        // nft's words for a table that is not there (ENOENT).
        assert!(
            err.contains("No such file or directory"),
            "nft list table ip hatch in {}: {err}",
            self.ns
        );
        None
    }

    /// The daemon's nftables table `ip hatch` as text. The daemon makes it
    /// when its networking starts, so a missing table panics, as does any
    /// failure of `nft`.
    pub fn nft_table(&self) -> String {
        self.nft_table_opt()
            .unwrap_or_else(|| panic!("no nftables table ip hatch in {}", self.ns))
    }

    /// Asserts that the VM `vm` (a body from the API) is plugged in: its TAP
    /// exists, and when `forward` its SSH port forward is in the firewall.
    /// A later "nothing left" check means something only after this held.
    pub fn assert_plugged_in(&self, vm: &Value, forward: bool) {
        let tap = vm["tap_name"]
            .as_str()
            .unwrap_or_else(|| panic!("a VM with a TAP: {vm}"));
        let links = self.links("ht");
        assert!(
            links.iter().any(|l| l == tap),
            "TAP {tap} of a running VM is missing: {links:?}"
        );
        if forward {
            let rule = format!(
                "dport {} dnat to {}:22",
                vm["ssh_port"],
                vm["guest_ip"].as_str().unwrap()
            );
            let table = self.nft_table();
            assert!(table.contains(&rule), "{rule:?} not in:\n{table}");
        }
    }
}

/// A guest that counts in memory (a shell loop, nothing on disk) and prints each tick.
pub fn counting_guest(d: &Daemon, public: &str) -> Value {
    let script = format!(
        "#!/bin/sh\nmkdir -p /root/.ssh && echo '{public}' >> /root/.ssh/authorized_keys\n\
         (i=0; while true; do i=$((i+1)); echo \"tick $i\" > /dev/console; sleep 1; done) &\n"
    );
    d.create_vm(&serde_json::json!({ "user_data": script }).to_string())
}

pub fn last_tick(log: &str) -> u64 {
    log.lines()
        .filter_map(|l| l.split("tick ").nth(1))
        .filter_map(|n| n.trim().parse().ok())
        .max()
        .unwrap_or(0)
}
