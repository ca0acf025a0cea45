//! The `hatch` CLI end to end: the built binary, run inside the daemon's
//! network namespace against the real daemon, drives the README's quickstart
//! on a real guest (create by name, logs, route, snapshot, wake, restore,
//! delete) and shows the API's errors, ownership and names as a user sees them.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// What one run of the CLI printed, and how it exited.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: Output) -> Run {
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Asserts success and parses stdout as JSON.
    fn json(&self) -> Value {
        assert_eq!(self.code, 0, "hatch failed: {}{}", self.stdout, self.stderr);
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("--json output does not parse ({e}): {}", self.stdout))
    }

    fn ok(&self) -> &str {
        assert_eq!(self.code, 0, "hatch failed: {}{}", self.stdout, self.stderr);
        &self.stdout
    }
}

/// The CLI in the daemon's namespace, with a home of its own (no config file
/// unless a test writes one) and the environment `env` (HATCH_URL, HATCH_API_KEY...).
fn hatch_cmd(d: &Daemon, home: &Path, env: &[(&str, &str)], args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &d.ns])
        .arg(bin())
        .args(args)
        .env_remove("HATCH_URL")
        .env_remove("HATCH_API_KEY")
        .env_remove("HATCH_CONFIG")
        .env("HOME", home)
        .env("XDG_CONFIG_HOME", home.join(".config"))
        .stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    c
}

fn home(d: &Daemon, tag: &str) -> PathBuf {
    let h = d.data_dir.join(format!("home-{tag}"));
    std::fs::create_dir_all(&h).unwrap();
    h
}

/// `hatch ARGS` as the owner of `key`, against the test daemon.
fn hatch_as(d: &Daemon, key: &str, args: &[&str]) -> Run {
    let h = home(d, "cli");
    let out = hatch_cmd(d, &h, &[("HATCH_URL", BASE), ("HATCH_API_KEY", key)], args)
        .output()
        .expect("run hatch");
    Run::of(out)
}

/// `hatch ARGS` as alice.
fn hatch(d: &Daemon, args: &[&str]) -> Run {
    hatch_as(d, &d.key, args)
}

/// A GET through the proxy for `host` (curl resolves it to the loopback): (status, body).
fn via_proxy(d: &Daemon, host: &str) -> (u16, String) {
    let resolve = format!("{host}:8081:127.0.0.1");
    let url = format!("http://{host}:8081/");
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
            &url,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "000"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

fn state_of(d: &Daemon, vm: &str) -> String {
    hatch(d, &["vm", "show", vm, "--json"]).json()["state"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits for `logs -f` to end by itself; kills it (and fails) if it does not.
fn wait_exit(child: &mut Child, what: &str) -> std::process::ExitStatus {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} did not end");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_cli_drives_the_quickstart_on_a_real_guest() {
    let d = Daemon::start();
    // The README's user data, from a file as there: the guest's httpd serves /srv/www.
    let script = d.data_dir.join("web.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nmkdir -p /srv/www && echo hi > /srv/www/index.html\n",
    )
    .unwrap();
    let vm = hatch(
        &d,
        &[
            "vm",
            "create",
            "--name",
            "demo",
            "--user-data-file",
            script.to_str().unwrap(),
            "--wait",
            "--json",
        ],
    )
    .json();
    let id = vm["id"].as_str().unwrap().to_string();
    assert_eq!(vm["name"], "demo");
    assert_eq!(vm["state"], "running", "--wait returns a running VM: {vm}");

    // People get a table with the name and state; scripts get the API's array.
    let table = hatch(&d, &["vm", "ls"]).ok().to_string();
    let header = table.lines().next().unwrap();
    assert!(
        header.starts_with("ID") && header.contains("STATE"),
        "{table}"
    );
    let row = table
        .lines()
        .find(|l| l.starts_with(&id))
        .unwrap_or_else(|| panic!("{id} not in:\n{table}"));
    assert!(row.contains("demo") && row.contains("running"), "{row}");
    let listed = hatch(&d, &["vm", "ls", "--json"]).json();
    assert_eq!(
        listed,
        d.req("GET", "/vms", None).body,
        "--json is the API's own answer"
    );

    // Logs by name, until the guest is up; then follow them.
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let logs = hatch(&d, &["vm", "logs", "demo"]);
        if logs.ok().contains("hatch-guest: ready") {
            break;
        }
        assert!(Instant::now() < deadline, "never ready:\n{}", logs.stdout);
        std::thread::sleep(Duration::from_millis(500));
    }
    let h = home(&d, "follow");
    let mut follow = hatch_cmd(
        &d,
        &h,
        &[("HATCH_URL", BASE), ("HATCH_API_KEY", &d.key)],
        &["vm", "logs", "-f", "demo"],
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .expect("spawn hatch vm logs -f");

    // A route through the proxy, by the VM's name.
    let route = hatch(
        &d,
        &[
            "route",
            "add",
            "demo",
            "--port",
            "80",
            "--subdomain",
            "demo",
            "--json",
        ],
    )
    .json();
    assert_eq!(route["host"], "demo.localhost", "{route}");
    assert_eq!(route["vm_id"], id.as_str());
    let routes = hatch(&d, &["route", "ls", "demo"]).ok().to_string();
    assert!(routes.contains("demo") && routes.contains("80"), "{routes}");
    let (status, body) = via_proxy(&d, "demo.localhost");
    assert_eq!((status, body.trim()), (200, "hi"));

    // `logs -f` is still following the running guest.
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f ended while the VM runs"
    );

    // Snapshot: the VM sleeps (its VMM ends, so `logs -f` ends, having printed the console).
    let snap = hatch(&d, &["snapshot", "create", "demo", "--wait", "--json"]).json();
    assert_eq!(snap["vm_id"], id.as_str(), "{snap}");
    assert!(snap["id"].as_str().unwrap().starts_with("snap_"), "{snap}");
    assert_eq!(state_of(&d, "demo"), "snapshotted");
    let status = wait_exit(&mut follow, "hatch vm logs -f");
    let mut followed = String::new();
    std::io::Read::read_to_string(follow.stdout.as_mut().unwrap(), &mut followed).unwrap();
    assert!(status.success(), "logs -f: {status}");
    assert!(followed.contains("hatch-guest: ready"), "{followed}");
    let listed = hatch(&d, &["snapshot", "ls", "--vm", "demo", "--json"]).json();
    assert_eq!(listed[0]["id"], snap["id"], "{listed}");

    // Wake: a request through the proxy restores it.
    let (status, body) = via_proxy(&d, "demo.localhost");
    assert_eq!((status, body.trim()), (200, "hi"));
    assert_eq!(state_of(&d, "demo"), "running");

    // Sleep again, then restore with the CLI.
    hatch(&d, &["snapshot", "create", "demo", "--wait"]).ok();
    assert_eq!(state_of(&d, "demo"), "snapshotted");
    let restored = hatch(&d, &["snapshot", "restore", "demo", "--wait", "--json"]).json();
    assert_eq!(restored["state"], "running", "{restored}");
    let (status, body) = via_proxy(&d, "demo.localhost");
    assert_eq!((status, body.trim()), (200, "hi"));

    // Delete by name: gone, and its name is then a clear error.
    let out = hatch(&d, &["vm", "rm", "demo"]);
    assert_eq!(out.ok().trim(), format!("deleted {id}"));
    assert_eq!(d.req("GET", &format!("/vms/{id}"), None).status, 404);
    let gone = hatch(&d, &["vm", "show", "demo"]);
    assert_eq!(
        gone.code, 3,
        "not found has its own exit code: {}",
        gone.stderr
    );
    assert!(
        gone.stderr.contains("no VM named \"demo\""),
        "{}",
        gone.stderr
    );
}

#[test]
fn errors_owners_and_names_as_the_cli_shows_them() {
    let d = Daemon::start();

    // A bad request: the API's own error on stderr, non-zero, nothing on stdout.
    let api = d.req("POST", "/vms", Some(r#"{"vcpu_count": 99}"#));
    assert_eq!(api.status, 400);
    let bad = hatch(&d, &["vm", "create", "--vcpus", "99"]);
    assert_eq!(bad.code, 1, "{}", bad.stderr);
    assert_eq!(bad.stderr.trim(), format!("error: {}", api.error()));
    assert_eq!(bad.stdout, "");
    assert_eq!(d.req("GET", "/vms", None).body, serde_json::json!([]));

    // A name that does not exist.
    let none = hatch(&d, &["vm", "stop", "nosuch"]);
    assert_eq!(none.code, 3, "{}", none.stderr);
    assert!(
        none.stderr.contains("no VM named \"nosuch\""),
        "{}",
        none.stderr
    );

    // Templates and the default image, by name.
    let images = hatch(&d, &["image", "ls"]).ok().to_string();
    assert!(images.contains("img_default"), "{images}");
    let tpl = hatch(
        &d,
        &[
            "template",
            "create",
            "--name",
            "small",
            "--mem-mib",
            "256",
            "--user-data",
            "#!/bin/sh\necho from-template",
            "--json",
        ],
    )
    .json();
    assert_eq!(tpl["mem_mib"], 256);
    assert_eq!(tpl["user_data"], "#!/bin/sh\necho from-template");
    let a = hatch(
        &d,
        &[
            "vm",
            "create",
            "--name",
            "one",
            "--template",
            "small",
            "--json",
        ],
    )
    .json();
    assert_eq!(a["template_id"], tpl["id"], "{a}");
    assert_eq!(a["mem_mib"], 256, "{a}");
    let b = hatch(&d, &["vm", "create", "--name", "two", "--json"]).json();
    let (a_id, b_id) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());

    // Another owner's key: alice's VM does not exist for bob, by id or by name.
    let bob = d.create_key(&["--name", "bob"]);
    for arg in [a_id, "one"] {
        let r = hatch_as(&d, &bob, &["vm", "rm", arg]);
        assert_eq!(r.code, 3, "bob rm {arg}: {}{}", r.stdout, r.stderr);
    }
    let r = hatch_as(&d, &bob, &["vm", "show", a_id]);
    let api = d.as_key(&bob, "GET", &format!("/vms/{a_id}"), None);
    assert_eq!(api.status, 404);
    assert_eq!(
        r.stderr.trim(),
        format!("error: {}", api.error()),
        "the API's text"
    );
    assert_eq!(
        hatch(&d, &["vm", "show", "one", "--json"]).json()["id"],
        a_id
    );

    // The same snapshot name on two VMs: a name that means two is an error naming both.
    for vm in ["one", "two"] {
        hatch(
            &d,
            &[
                "snapshot", "create", vm, "--kind", "standby", "--name", "pre", "--wait",
            ],
        )
        .ok();
    }
    let amb = hatch(&d, &["snapshot", "show", "pre"]);
    assert_eq!(amb.code, 1, "{}{}", amb.stdout, amb.stderr);
    assert!(
        amb.stderr.contains("ambiguous") && amb.stderr.contains(a_id) && amb.stderr.contains(b_id),
        "{}",
        amb.stderr
    );
    // Within one VM the name is unique: restore and fork by it.
    let snaps = hatch(&d, &["snapshot", "ls", "--vm", "one", "--json"]).json();
    assert_eq!(snaps.as_array().unwrap().len(), 1, "{snaps}");
    let snap_id = snaps[0]["id"].as_str().unwrap();
    let shown = hatch(&d, &["snapshot", "show", snap_id, "--json"]).json();
    assert_eq!(shown["source_instance_id"], a_id);
    assert_eq!(shown["kind"], "Standby");
    let fork = hatch(
        &d,
        &[
            "snapshot", "fork", snap_id, "--name", "three", "--wait", "--json",
        ],
    )
    .json();
    assert_eq!(fork["name"], "three");
    assert_eq!(fork["state"], "running", "{fork}");
    hatch(&d, &["vm", "stop", "one", "--wait"]).ok();
    assert_eq!(d.vm(a_id)["state"], "stopped");
    let back = hatch(
        &d,
        &["snapshot", "restore", "one", "pre", "--wait", "--json"],
    )
    .json();
    assert_eq!(back["state"], "running", "{back}");

    // Stop and start by name.
    let stopped = hatch(&d, &["vm", "stop", "two", "--wait", "--json"]).json();
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    let started = hatch(&d, &["vm", "start", "two", "--wait", "--json"]).json();
    assert_eq!(started["state"], "running", "{started}");

    // --wait on a compressed snapshot stays until its memory is compressed
    // (the API answers `compressing` at once).
    let z = hatch(
        &d,
        &[
            "snapshot",
            "create",
            "two",
            "--kind",
            "standby",
            "--compression",
            "zstd",
            "--wait",
            "--json",
        ],
    )
    .json();
    assert_eq!(z["compression_state"], "compressed", "{z}");
    assert_eq!(z["compression"]["algorithm"], "zstd", "{z}");

    // Deletes by name, several at once.
    let out = hatch(&d, &["vm", "rm", "two", "three"]);
    assert_eq!(out.ok().lines().count(), 2, "{}", out.stdout);
    let left = d.req("GET", "/vms", None);
    assert_eq!(left.ids(), vec![a_id.to_string()]);
    let out = hatch(&d, &["template", "rm", "small"]).ok().to_string();
    assert!(out.contains(tpl["id"].as_str().unwrap()), "{out}");
}

#[test]
fn where_the_cli_finds_the_daemon_and_its_key() {
    let d = Daemon::start();
    let h = home(&d, "config");
    let run = |env: &[(&str, &str)], args: &[&str]| {
        Run::of(hatch_cmd(&d, &h, env, args).output().expect("run hatch"))
    };

    // No key anywhere: the API's 401, with where a key goes.
    let r = run(&[], &["vm", "ls"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(
        r.stderr.contains("missing API key") && r.stderr.contains("HATCH_API_KEY"),
        "{}",
        r.stderr
    );

    // The config file alone (its default place under XDG_CONFIG_HOME).
    let dir = h.join(".config/hatch");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("config.toml"),
        format!("url = \"{BASE}\"\napi_key = \"{}\"\n", d.key),
    )
    .unwrap();
    assert_eq!(
        run(&[], &["vm", "ls", "--json"]).json(),
        serde_json::json!([])
    );

    // The environment over the file, a flag over the environment.
    let r = run(&[("HATCH_API_KEY", "hk_not_a_key")], &["vm", "ls"]);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.trim(), "error: invalid API key");
    let r = run(
        &[("HATCH_API_KEY", "hk_not_a_key")],
        &["vm", "ls", "--json", "--api-key", &d.key],
    );
    assert_eq!(r.json(), serde_json::json!([]));
    let r = run(&[("HATCH_URL", "http://127.0.0.1:9")], &["vm", "ls"]);
    assert_eq!(r.code, 1);
    assert!(
        r.stderr
            .contains("cannot reach the hatch API at http://127.0.0.1:9"),
        "{}",
        r.stderr
    );

    // --wait shows a spinner on a terminal (script(1) gives it one), never in a pipe.
    let unreachable = [("HATCH_URL", "http://127.0.0.1:9"), ("HATCH_API_KEY", "k")];
    let piped = run(&unreachable, &["vm", "create", "--wait"]);
    assert_eq!(piped.code, 1);
    assert!(!piped.stderr.contains("booting"), "{}", piped.stderr);
    let line = format!("{} vm create --wait", bin().display());
    let out = d.in_ns(
        None,
        &[
            "env",
            "HATCH_URL=http://127.0.0.1:9",
            "HATCH_API_KEY=k",
            "TERM=xterm",
            "script",
            "-qec",
            &line,
            "/dev/null",
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("creating and booting the VM"),
        "no spinner on a terminal: {text:?}"
    );
    assert!(
        text.contains("error: cannot reach the hatch API"),
        "{text:?}"
    );

    // A broken config file is an error naming it, not a silent default.
    std::fs::write(dir.join("config.toml"), "key = \"x\"\n").unwrap();
    let r = run(&[], &["vm", "ls"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("config.toml"), "{}", r.stderr);

    // Shell completions know the client commands.
    let r = run(&[], &["completions", "bash"]);
    assert!(
        r.ok().contains("snapshot") && r.stdout.contains("route"),
        "{}",
        r.stdout
    );
}

#[test]
fn images_upload_show_and_delete_by_name() {
    let d = Daemon::start();
    let img = image_dir();
    let path = |f: &str| img.join(f).display().to_string();
    let up = hatch(
        &d,
        &[
            "image",
            "create",
            "--kernel",
            &path("vmlinuz"),
            "--rootfs",
            &path("rootfs.ext4"),
            "--initrd",
            &path("initrd.img"),
            "--name",
            "up",
            "--wait",
            "--json",
        ],
    )
    .json();
    assert_eq!(up["source"], "upload", "{up}");
    assert_eq!(up["has_initrd"], true, "{up}");
    let id = up["id"].as_str().unwrap();
    let size = ["vmlinuz", "rootfs.ext4", "initrd.img"]
        .iter()
        .map(|f| std::fs::metadata(img.join(f)).unwrap().len())
        .sum::<u64>();
    assert_eq!(up["size_bytes"], size, "every byte arrived");
    let table = hatch(&d, &["image", "ls"]).ok().to_string();
    let row = table
        .lines()
        .find(|l| l.starts_with(id))
        .unwrap_or_else(|| panic!("{table}"));
    assert!(row.contains("up") && row.contains("upload"), "{row}");
    assert_eq!(
        hatch(&d, &["image", "show", "up", "--json"]).json()["id"],
        id
    );
    assert_eq!(
        hatch(&d, &["image", "rm", "up"]).ok().trim(),
        format!("deleted {id}")
    );
    assert_eq!(d.req("GET", &format!("/images/{id}"), None).status, 404);
    // The shared default image is not the CLI's to delete: the API's 409 text.
    let r = hatch(&d, &["image", "rm", "img_default"]);
    let api = d.req("DELETE", "/images/img_default", None);
    assert_eq!(r.code, 1);
    assert_eq!(r.stderr.trim(), format!("error: {}", api.error()));
}

/// `hatch ARGS` on a terminal of its own: `script` (util-linux) runs a shell
/// on a new pseudo-terminal, which first gets a known size and a saved
/// `stty -g`, then runs hatch, then prints `[rc=N]` and the `stty -g` after.
/// The test types into the terminal through `script`'s stdin, each string
/// once the output so far holds its cue.
struct OnTerminal {
    out: String,
    before: String,
    after: String,
}

fn on_terminal(d: &Daemon, args: &[&str], keys: &[(&str, &str)]) -> OnTerminal {
    use std::io::{Read, Write};
    use std::sync::{Arc, Mutex};
    let dir = home(d, "tty");
    let quoted: Vec<String> = args
        .iter()
        .map(|a| format!("'{}'", a.replace('\'', r"'\''")))
        .collect();
    let (before, after) = (dir.join("stty-before"), dir.join("stty-after"));
    let line = format!(
        "stty rows 30 cols 100; stty -g > {}; {} {}; echo \"[rc=$?]\"; stty -g > {}",
        before.display(),
        bin().display(),
        quoted.join(" "),
        after.display()
    );
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &d.ns, "script", "-qec", &line, "/dev/null"])
        .env_remove("HATCH_CONFIG")
        .env("HOME", &dir)
        .env("XDG_CONFIG_HOME", dir.join(".config"))
        .env("HATCH_URL", BASE)
        .env("HATCH_API_KEY", &d.key)
        .env("SHELL", "/bin/sh")
        .env("TERM", "xterm")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut proc = cmd.spawn().expect("run script");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let mut stdout = proc.stdout.take().unwrap();
    let sink = seen.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            sink.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    let text = |s: &Arc<Mutex<Vec<u8>>>| String::from_utf8_lossy(&s.lock().unwrap()).into_owned();
    let mut stdin = proc.stdin.take().unwrap();
    let deadline = Instant::now() + BOOT_TIMEOUT;
    for (cue, typed) in keys {
        while !text(&seen).contains(cue) {
            if Instant::now() > deadline || proc.try_wait().unwrap().is_some() {
                let _ = proc.kill();
                let _ = proc.wait();
                panic!("no {cue:?} on the terminal:\n{}", text(&seen));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        stdin.write_all(typed.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }
    let status = wait_exit(&mut proc, "hatch on a terminal");
    drop(stdin);
    reader.join().unwrap();
    let out = text(&seen);
    assert!(status.success(), "script failed ({status}):\n{out}");
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    OnTerminal {
        out,
        before: read(&before),
        after: read(&after),
    }
}

#[test]
fn exec_t_ssh_and_streamed_stdin_on_a_real_guest() {
    let d = Daemon::start();
    let vm = d.create_vm(r#"{"name": "term"}"#);
    let id = vm["id"].as_str().unwrap().to_string();
    d.wait_console(&id, "hatch-guest: ready");

    // -t: a terminal in the guest of this terminal's size; a typed line
    // reaches cat and comes back, Ctrl-D (a byte, in raw mode) ends cat, the
    // exit code is the CLI's, and the terminal is as it was before.
    let t = on_terminal(
        &d,
        &[
            "vm",
            "exec",
            "-t",
            "term",
            "--",
            "sh",
            "-c",
            "tty; stty size; echo ready; cat; echo cat-done; exit 7",
        ],
        &[
            ("ready", "hello there\n"),
            ("hello there\r\nhello there", "\x04"),
        ],
    );
    assert!(t.out.contains("/dev/pts/"), "tty in the guest:\n{}", t.out);
    assert!(
        t.out.contains("30 100"),
        "stty size in the guest:\n{}",
        t.out
    );
    assert!(t.out.contains("cat-done"), "{}", t.out);
    assert!(t.out.contains("[rc=7]"), "the exit code:\n{}", t.out);
    assert!(!t.before.is_empty(), "{}", t.out);
    assert_eq!(t.before, t.after, "the terminal is restored:\n{}", t.out);

    // Ctrl-C goes to the guest as a byte: it interrupts the remote command
    // (128 + SIGINT), and the CLI lives to report it.
    let t = on_terminal(
        &d,
        &[
            "vm",
            "exec",
            "-t",
            &id,
            "--",
            "sh",
            "-c",
            "echo ready; sleep 1000",
        ],
        &[("ready", "\x03")],
    );
    assert!(t.out.contains("[rc=130]"), "Ctrl-C:\n{}", t.out);
    assert_eq!(t.before, t.after, "the terminal is restored:\n{}", t.out);

    // ssh without a command: a login shell on a terminal, typed into.
    let t = on_terminal(
        &d,
        &["vm", "ssh", "term"],
        &[("", "tty; echo \"user=$(id -un)\"; exit 3\n")],
    );
    assert!(t.out.contains("/dev/pts/"), "{}", t.out);
    assert!(t.out.contains("user=agent"), "{}", t.out);
    assert!(t.out.contains("[rc=3]"), "{}", t.out);
    assert_eq!(t.before, t.after, "the terminal is restored:\n{}", t.out);

    // ssh with a command, no terminal: like ssh, no pty; the code comes back.
    let r = hatch(
        &d,
        &["vm", "ssh", "term", "--", "uname", "-s;", "exit", "4"],
    );
    assert_eq!(r.code, 4, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "Linux\n");

    // -t with no terminal here is refused, before anything runs; -tt forces it.
    let r = hatch(&d, &["vm", "exec", "-t", "term", "--", "true"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains("-tt"), "{}", r.stderr);
    let r = hatch(&d, &["vm", "exec", "-tt", "term", "--", "tty"]);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert!(r.stdout.starts_with("/dev/pts/"), "{}", r.stdout);

    // -i streams: 8 MiB in, the guest's sha256 of what it read is ours.
    use sha2::Digest;
    let mut big = vec![0u8; 8 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in big.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
    let file = d.data_dir.join("big.bin");
    std::fs::write(&file, &big).unwrap();
    let out = hatch_cmd(
        &d,
        &home(&d, "cli"),
        &[("HATCH_URL", BASE), ("HATCH_API_KEY", &d.key)],
        &["vm", "exec", "-i", "term", "--", "sha256sum"],
    )
    .stdin(std::fs::File::open(&file).unwrap())
    .output()
    .unwrap();
    let r = Run::of(out);
    assert_eq!(r.code, 0, "{}{}", r.stdout, r.stderr);
    assert_eq!(
        r.stdout,
        format!("{}  -\n", hex::encode(sha2::Sha256::digest(&big)))
    );

    // --openssh: the user's own ssh with a throw-away certified key, the
    // VM's host key pinned in hatch's file under the VM id, never in the
    // user's known_hosts; the key is gone afterwards.
    let h = home(&d, "openssh");
    let tmp = h.join("tmp");
    std::fs::create_dir_all(&tmp).unwrap();
    let tmp_s = tmp.to_str().unwrap().to_string();
    let openssh = |args: &[&str]| {
        let env = [
            ("HATCH_URL", BASE),
            ("HATCH_API_KEY", d.key.as_str()),
            ("TMPDIR", tmp_s.as_str()),
        ];
        let mut all = vec!["vm", "ssh", "--openssh", "term"];
        all.extend_from_slice(args);
        Run::of(hatch_cmd(&d, &h, &env, &all).output().unwrap())
    };
    let r = openssh(&["--", "uname -s; exit 5"]);
    assert_eq!(r.code, 5, "{}{}", r.stdout, r.stderr);
    assert_eq!(r.stdout, "Linux\n");
    assert!(r.stderr.contains("Permanently added"), "{}", r.stderr);
    let pinned = h.join(".config/hatch/known_hosts");
    let known = std::fs::read_to_string(&pinned).unwrap();
    // ssh may hash the names (Debian's HashKnownHosts): ask ssh-keygen.
    let found = Command::new("ssh-keygen")
        .args(["-F", &id, "-f"])
        .arg(&pinned)
        .output()
        .unwrap();
    assert!(found.status.success(), "{id} not in {known}");
    assert!(
        String::from_utf8_lossy(&found.stdout).contains("ssh-ed25519"),
        "{known}"
    );
    assert!(!h.join(".ssh/known_hosts").exists());
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the key is removed"
    );
    // Known now: no new entry, no question; extra ssh arguments pass through.
    let r = openssh(&["--ssh-arg=-oLogLevel=ERROR", "--", "id -un"]);
    assert_eq!((r.code, r.stdout.as_str()), (0, "agent\n"), "{}", r.stderr);
    assert_eq!(std::fs::read_to_string(&pinned).unwrap(), known);
    // A changed host key is refused, not trusted.
    let other =
        ssh_key::PrivateKey::random(&mut ssh_key::rand_core::OsRng, ssh_key::Algorithm::Ed25519)
            .unwrap()
            .public_key()
            .to_openssh()
            .unwrap();
    std::fs::write(&pinned, format!("{id} {other}\n")).unwrap();
    let r = openssh(&["--", "echo in"]);
    assert_eq!(r.code, 255, "{}{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("in"), "{}", r.stdout);
    assert!(
        r.stderr.contains("Host key verification failed"),
        "{}",
        r.stderr
    );
    assert_eq!(
        std::fs::read_dir(&tmp).unwrap().count(),
        0,
        "the key is removed"
    );

    // Another owner's key: the API's 404 message, exit 3, for all three.
    let bob = d.create_key(&["--name", "bob"]);
    let api = d.as_key(
        &bob,
        "POST",
        &format!("/vms/{id}/exec"),
        Some(r#"{"command": "true"}"#),
    );
    assert_eq!(api.status, 404);
    let says = api.body["error"].as_str().unwrap().to_string();
    for args in [
        &["vm", "exec", "-i", &id, "--", "true"][..],
        &["vm", "ssh", &id, "--", "true"][..],
        &["vm", "ssh", "--openssh", &id, "--", "true"][..],
    ] {
        let r = hatch_as(&d, &bob, args);
        assert_eq!(r.code, 3, "{args:?}: {}{}", r.stdout, r.stderr);
        assert_eq!(r.stderr.trim(), format!("error: {says}"), "{args:?}");
    }
}
