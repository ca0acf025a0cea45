//! Each client subcommand: the API calls it makes and what it prints.

use super::client::{Answer, CliError, Client};
use super::output::{col, fields, rows, s, size, table, text, Column};
use super::progress::Spinner;
use super::{openssh, resolve, stream, Command, Global, Settings};
use super::{ImageCmd, RouteCmd, SnapshotCmd, SnapshotKind, TemplateCmd, VmCmd, VmCreate, Wait};
use reqwest::Method;
use serde_json::{json, Map, Value};
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

/// How often `--wait` asks again.
const POLL: Duration = Duration::from_millis(500);

pub async fn run(global: Global, cmd: Command) -> Result<(), CliError> {
    let client = Client::new(Settings::resolve(&global.connection)?)?;
    let out = Out { json: global.json };
    match cmd {
        Command::Vm(c) => vm(&client, out, c).await,
        Command::Snapshot(c) => snapshot(&client, out, c).await,
        Command::Image(c) => image(&client, out, c).await,
        Command::Template(c) => template(&client, out, c).await,
        Command::Route(c) => route(&client, out, c).await,
    }
}

/// Where answers go: the API's JSON as sent, or the people's view.
#[derive(Clone, Copy)]
struct Out {
    json: bool,
}

impl Out {
    /// A list: the JSON array as sent, or a table.
    fn list(self, a: &Answer, columns: &[Column]) -> Result<(), CliError> {
        if self.json {
            println!("{}", a.text);
        } else {
            let rows = rows(&a.text, columns).map_err(CliError::Transport)?;
            print!("{}", table(columns, &rows));
        }
        Ok(())
    }

    /// One object: its JSON as sent, or `field  value` lines.
    fn one(self, a: &Answer) {
        if self.json {
            println!("{}", a.text);
        } else {
            print!("{}", fields(a.json()));
        }
    }

    /// A delete: its JSON as sent, or one line saying what went.
    fn deleted(self, a: &Answer, what: &str) {
        if self.json {
            println!("{}", a.text);
        } else {
            println!("deleted {what}");
        }
    }
}

const VM_COLUMNS: &[Column] = &[
    col("ID", "id", text),
    col("NAME", "name", text),
    col("STATE", "state", text),
    col("IMAGE", "image_id", text),
    col("VCPUS", "vcpu_count", text),
    col("MEM_MIB", "mem_mib", text),
    col("IP", "guest_ip", text),
    col("SSH_PORT", "ssh_port", text),
    col("CREATED", "created_at", text),
];

async fn vm(client: &Client, out: Out, cmd: VmCmd) -> Result<(), CliError> {
    match cmd {
        VmCmd::Create(c) => {
            let wait = c.wait;
            let body = create_body(client, c).await?;
            let spinner = Spinner::start(wait.wait, "creating and booting the VM");
            let a = client.post("/vms", &body).await?;
            let a = settle_vm(client, a, wait, &spinner).await?;
            spinner.finish();
            out.one(&a);
        }
        VmCmd::Ls => out.list(&client.get("/vms").await?, VM_COLUMNS)?,
        VmCmd::Show { vm } => {
            let id = resolve::vm(client, &vm).await?;
            out.one(&client.get(&format!("/vms/{id}")).await?);
        }
        VmCmd::Stop { vm, wait } => power(client, out, &vm, "stop", wait).await?,
        VmCmd::Start { vm, wait } => power(client, out, &vm, "start", wait).await?,
        VmCmd::Rm { vms } => {
            for vm in vms {
                let id = resolve::vm(client, &vm).await?;
                let a = client.delete(&format!("/vms/{id}")).await?;
                out.deleted(&a, &id);
            }
        }
        VmCmd::Cp {
            src,
            dst,
            mode,
            uid,
            gid,
        } => copy(client, out, &src, &dst, Upload { mode, uid, gid }).await?,
        VmCmd::Exec {
            vm,
            timeout,
            env,
            cwd,
            stdin,
            tty,
            command,
        } if stdin || tty > 0 => {
            if out.json {
                return Err(CliError::Other(
                    "--json is for the one-shot exec: -i and -t stream the output as it comes"
                        .into(),
                ));
            }
            let tty = tty_asked(tty)?.unwrap_or(false);
            let id = resolve::vm(client, &vm).await?;
            let mut query: Vec<(String, String)> =
                command.into_iter().map(|w| ("argv".into(), w)).collect();
            query.extend(
                env.into_iter()
                    .map(|(k, v)| ("env".into(), format!("{k}={v}"))),
            );
            query.extend(cwd.map(|c| ("cwd".into(), c)));
            let spec = stream::Spec {
                query,
                tty,
                timeout: timeout.map(Duration::from_secs),
            };
            finish(stream::run(client, &id, spec).await?);
        }
        VmCmd::Exec {
            vm,
            timeout,
            env,
            cwd,
            stdin: _,
            tty: _,
            command,
        } => {
            let id = resolve::vm(client, &vm).await?;
            let mut body = json!({ "command": command });
            if let Some(t) = timeout {
                body["timeout_seconds"] = json!(t);
            }
            if !env.is_empty() {
                body["env"] = Value::Object(
                    env.into_iter()
                        .map(|(k, v)| (k, Value::String(v)))
                        .collect(),
                );
            }
            if let Some(c) = cwd {
                body["cwd"] = json!(c);
            }
            let a = client.post(&format!("/vms/{id}/exec"), &body).await?;
            if out.json {
                println!("{}", a.text);
                return Ok(());
            }
            let stream = |k: &str| a.json()[k].as_str().unwrap_or("").to_string();
            let _ = std::io::stdout().write_all(stream("stdout").as_bytes());
            let _ = std::io::stdout().flush();
            let _ = std::io::stderr().write_all(stream("stderr").as_bytes());
            for (flag, what) in [
                ("stdout_truncated", "stdout"),
                ("stderr_truncated", "stderr"),
            ] {
                if a.json()[flag] == true {
                    eprintln!("hatch: {what} was cut at the server's cap");
                }
            }
            if a.json()["timed_out"] == true {
                eprintln!("hatch: the command timed out and was killed");
            }
            // The command's own exit code is this program's, as with ssh.
            let code = a.json()["exit_code"].as_i64().unwrap_or(255);
            if code != 0 {
                std::process::exit(code.clamp(0, 255) as i32);
            }
        }
        VmCmd::Ssh {
            vm,
            tty,
            no_tty,
            openssh: true,
            ssh_args,
            command,
        } => {
            let id = resolve::vm(client, &vm).await?;
            let tty_flag = match (no_tty, tty) {
                (true, _) => Some("-T"),
                (false, 0) => None,
                (false, 1) => Some("-t"),
                (false, _) => Some("-tt"),
            };
            let code = openssh::run(client, &id, tty_flag, &ssh_args, &command).await?;
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
        VmCmd::Ssh {
            vm,
            tty,
            no_tty,
            openssh: false,
            ssh_args: _,
            command,
        } => {
            if out.json {
                return Err(CliError::Other(
                    "--json is not for ssh: the output is streamed as it comes".into(),
                ));
            }
            // As ssh: a terminal for the login shell when this is one, none
            // for a command, -t / -tt / -T to say otherwise.
            let tty = match tty_asked(tty)? {
                _ if no_tty => false,
                Some(t) => t,
                None => command.is_empty() && std::io::stdin().is_terminal(),
            };
            let line = if command.is_empty() {
                LOGIN_SHELL.to_string()
            } else {
                command.join(" ")
            };
            let id = resolve::vm(client, &vm).await?;
            let spec = stream::Spec {
                query: vec![("command".into(), line)],
                tty,
                timeout: None,
            };
            finish(stream::run(client, &id, spec).await?);
        }
        VmCmd::Logs { vm, follow } => {
            let id = resolve::vm(client, &vm).await?;
            let path = if follow {
                format!("/vms/{id}/logs?follow=true")
            } else {
                format!("/vms/{id}/logs")
            };
            let mut resp = client.start(client.request(Method::GET, &path)).await?;
            let mut stdout = std::io::stdout().lock();
            // Chunk by chunk: with --follow the answer lasts as long as the VMM.
            while let Some(chunk) = resp
                .chunk()
                .await
                .map_err(|e| CliError::Transport(format!("reading the log: {e}")))?
            {
                if stdout
                    .write_all(&chunk)
                    .and_then(|_| stdout.flush())
                    .is_err()
                {
                    // The reader went away (`| head`): that is the end, not a failure.
                    return Ok(());
                }
            }
        }
    }
    Ok(())
}

/// What `vm ssh` runs without a command: the user's shell as a login shell
/// (the exec API runs a line with `$SHELL -c`, which is not one).
const LOGIN_SHELL: &str = r#"exec "${SHELL:-/bin/sh}" -l"#;

/// `-t` given `count` times: None when not given, Some(true) when a terminal
/// is to be made in the VM. Once needs one here (stdin) to mirror, which is
/// refused otherwise rather than making a terminal nobody types into; twice
/// forces it, as `ssh -tt` does.
fn tty_asked(count: u8) -> Result<Option<bool>, CliError> {
    match count {
        0 => Ok(None),
        1 if !std::io::stdin().is_terminal() => Err(CliError::Other(
            "-t needs a terminal on standard input, and this one is not; \
             use -tt to force a terminal in the VM anyway, or -i to stream a pipe"
                .into(),
        )),
        _ => Ok(Some(true)),
    }
}

/// Exits with a streamed command's status, after saying what there is to say.
fn finish(ending: stream::Ending) -> ! {
    if let Some(note) = ending.note {
        eprintln!("hatch: {note}");
    }
    let _ = std::io::stdout().flush();
    // Not a return: the thread reading stdin may be blocked in read(2), and
    // only the process's exit ends it.
    std::process::exit(ending.code)
}

/// `VM:/path` split into the VM and the path; None for a local path. Like
/// scp, a colon after a slash is part of a local name (`./a:b`).
fn remote_of(arg: &str) -> Option<(&str, &str)> {
    let (vm, path) = arg.split_once(':')?;
    (!vm.is_empty() && !vm.contains('/')).then_some((vm, path))
}

/// A query string with each value form-encoded (a guest path may hold any byte).
fn encode_query(pairs: &[(&str, &str)]) -> String {
    let mut url = reqwest::Url::parse("http://query.invalid/").expect("a fixed URL");
    url.query_pairs_mut().extend_pairs(pairs);
    url.query().unwrap_or_default().to_string()
}

/// What `vm cp` sets on a file it uploads, beyond its bytes.
struct Upload {
    /// Octal permission bits; by default the local file's.
    mode: Option<String>,
    uid: Option<u32>,
    gid: Option<u32>,
}

/// `vm cp`: one side local, the other `VM:/path`; the bytes stream both ways.
async fn copy(
    client: &Client,
    out: Out,
    src: &str,
    dst: &str,
    upload: Upload,
) -> Result<(), CliError> {
    use tokio::io::AsyncWriteExt;
    let usage = || {
        CliError::Other(format!(
            "vm cp copies between a local file and VM:/path; got {src:?} and {dst:?}"
        ))
    };
    match (remote_of(src), remote_of(dst)) {
        (None, Some((vm, path))) => {
            let id = resolve::vm(client, vm).await?;
            let file = tokio::fs::File::open(src)
                .await
                .map_err(|e| CliError::Other(format!("opening {src}: {e}")))?;
            let meta = file
                .metadata()
                .await
                .map_err(|e| CliError::Other(format!("reading {src}: {e}")))?;
            if !meta.is_file() {
                return Err(CliError::Other(format!("{src} is not a file")));
            }
            // Unless told otherwise, the guest file gets the local permission
            // bits (scp gives a new file those).
            let mode = upload.mode.unwrap_or_else(|| {
                format!(
                    "{:04o}",
                    std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o7777
                )
            });
            let (uid, gid) = (
                upload.uid.map(|u| u.to_string()),
                upload.gid.map(|g| g.to_string()),
            );
            let mut params = vec![("path", path), ("mode", mode.as_str())];
            params.extend(uid.as_deref().map(|u| ("uid", u)));
            params.extend(gid.as_deref().map(|g| ("gid", g)));
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            let query = encode_query(&params);
            let req = client
                .request(Method::PUT, &format!("/vms/{id}/files?{query}"))
                .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
                .header(reqwest::header::CONTENT_LENGTH, meta.len())
                .body(body);
            let a = client.send(req).await?;
            if out.json {
                println!("{}", a.text);
            }
        }
        (Some((vm, path)), None) => {
            if upload.mode.is_some() || upload.uid.is_some() || upload.gid.is_some() {
                return Err(CliError::Other(
                    "--mode, --uid and --gid set an uploaded file's; a download keeps the local defaults".into(),
                ));
            }
            let id = resolve::vm(client, vm).await?;
            let query = encode_query(&[("path", path)]);
            let req = client.request(Method::GET, &format!("/vms/{id}/files?{query}"));
            let mut resp = client.start(req).await?;
            let is_listing = resp
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            if is_listing {
                return Err(CliError::Other(format!(
                    "{src} is a directory; vm cp copies files"
                )));
            }
            // Into a directory: under the remote file's name, as cp does.
            let mut target = std::path::PathBuf::from(dst);
            if target.is_dir() {
                let name = path
                    .trim_end_matches('/')
                    .rsplit('/')
                    .next()
                    .unwrap_or_default();
                target.push(name);
            }
            // Written beside the target and renamed: a cut copy leaves no half file.
            let temp = target.with_file_name(format!(
                ".{}.hatch-cp-{}",
                target
                    .file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("file"),
                std::process::id()
            ));
            let mut file = tokio::fs::File::create(&temp)
                .await
                .map_err(|e| CliError::Other(format!("creating {}: {e}", temp.display())))?;
            let copied = async {
                while let Some(chunk) = resp
                    .chunk()
                    .await
                    .map_err(|e| CliError::Transport(format!("reading {src}: {e}")))?
                {
                    file.write_all(&chunk)
                        .await
                        .map_err(|e| CliError::Other(format!("writing {}: {e}", temp.display())))?;
                }
                file.flush()
                    .await
                    .map_err(|e| CliError::Other(format!("writing {}: {e}", temp.display())))?;
                tokio::fs::rename(&temp, &target).await.map_err(|e| {
                    CliError::Other(format!("renaming into {}: {e}", target.display()))
                })
            }
            .await;
            if copied.is_err() {
                let _ = tokio::fs::remove_file(&temp).await;
            }
            copied?;
        }
        _ => return Err(usage()),
    }
    Ok(())
}

/// `vm stop` and `vm start`: one POST, then (with --wait) until the VM settles.
async fn power(
    client: &Client,
    out: Out,
    vm: &str,
    verb: &str,
    wait: Wait,
) -> Result<(), CliError> {
    let id = resolve::vm(client, vm).await?;
    let spinner = Spinner::start(wait.wait, &format!("{verb} {id}"));
    let a = client
        .post(&format!("/vms/{id}/{verb}"), &json!({}))
        .await?;
    let a = settle_vm(client, a, wait, &spinner).await?;
    spinner.finish();
    out.one(&a);
    Ok(())
}

/// The `POST /vms` body from the flags; names of images and templates resolved.
async fn create_body(client: &Client, c: VmCreate) -> Result<Value, CliError> {
    let mut body = Map::new();
    let mut put = |k: &str, v: Value| {
        body.insert(k.to_string(), v);
    };
    if let Some(n) = c.name {
        put("name", n.into());
    }
    if let Some(i) = c.image {
        put("image_id", resolve::image(client, &i).await?.into());
    }
    if let Some(t) = c.template {
        put("template_id", resolve::template(client, &t).await?.into());
    }
    if let Some(n) = c.vcpus {
        put("vcpu_count", n.into());
    }
    if let Some(n) = c.mem_mib {
        put("mem_mib", n.into());
    }
    if let Some(b) = c.boot_args {
        put("boot_args", b.into());
    }
    if c.no_network {
        put("enable_network", false.into());
    }
    if let Some(u) = user_data(c.user_data, c.user_data_file.as_deref())? {
        put("user_data", u.into());
    }
    if let Some(h) = c.hypervisor {
        put("hypervisor", h.into());
    }
    if let Some(t) = c.idle_timeout {
        put("idle_timeout_seconds", t.into());
    }
    if c.no_auto_sleep {
        put("auto_sleep", false.into());
    }
    Ok(Value::Object(body))
}

/// `--user-data TEXT` or `--user-data-file PATH` (`-` reads standard input).
fn user_data(text: Option<String>, file: Option<&Path>) -> Result<Option<String>, CliError> {
    let Some(path) = file else {
        return Ok(text);
    };
    let read = if path == Path::new("-") {
        std::io::read_to_string(std::io::stdin())
    } else {
        std::fs::read_to_string(path)
    };
    read.map(Some)
        .map_err(|e| CliError::Other(format!("reading {}: {e}", path.display())))
}

/// With --wait, asks again until the VM is no longer `starting` or
/// `stopping`; a VM that ends in `error` fails the command with its `last_error`.
async fn settle_vm(
    client: &Client,
    mut a: Answer,
    wait: Wait,
    spinner: &Spinner,
) -> Result<Answer, CliError> {
    if !wait.wait {
        return Ok(a);
    }
    let id = s(a.json(), "id");
    loop {
        let state = s(a.json(), "state");
        match state.as_str() {
            "starting" | "stopping" => spinner.set_message(&format!("{id} is {state}")),
            "error" => {
                return Err(CliError::Other(format!(
                    "VM {id} is in error: {}",
                    s(a.json(), "last_error")
                )))
            }
            _ => return Ok(a),
        }
        tokio::time::sleep(POLL).await;
        a = client.get(&format!("/vms/{id}")).await?;
    }
}

const SNAPSHOT_COLUMNS: &[Column] = &[
    col("ID", "id", text),
    col("NAME", "name", text),
    col("KIND", "kind", text),
    col("VM", "source_instance_id", text),
    col("SIZE", "size_bytes", size),
    col("COMPRESSION", "compression_state", text),
    col("CREATED", "created_at", text),
];

async fn snapshot(client: &Client, out: Out, cmd: SnapshotCmd) -> Result<(), CliError> {
    match cmd {
        SnapshotCmd::Create {
            vm,
            kind,
            name,
            tags,
            compression,
            wait,
        } => {
            let id = resolve::vm(client, &vm).await?;
            let a = match kind {
                SnapshotKind::Sleep => {
                    if name.is_some() || !tags.is_empty() || compression.is_some() {
                        return Err(CliError::Other(
                            "--name, --tag and --compression need --kind standby or stopped (a sleep snapshot has none)".into(),
                        ));
                    }
                    let spinner = Spinner::start(wait.wait, &format!("putting {id} to sleep"));
                    let a = client
                        .post(&format!("/vms/{id}/snapshot"), &json!({}))
                        .await?;
                    spinner.finish();
                    a
                }
                SnapshotKind::Standby | SnapshotKind::Stopped => {
                    let mut body = Map::new();
                    let api_kind = if kind == SnapshotKind::Standby {
                        "Standby"
                    } else {
                        "Stopped"
                    };
                    body.insert("kind".into(), api_kind.into());
                    if let Some(n) = name {
                        body.insert("name".into(), n.into());
                    }
                    if !tags.is_empty() {
                        let tags: Map<String, Value> =
                            tags.into_iter().map(|(k, v)| (k, v.into())).collect();
                        body.insert("tags".into(), tags.into());
                    }
                    if let Some(c) = compression {
                        body.insert("compression".into(), parse_compression(&c)?);
                    }
                    let spinner = Spinner::start(wait.wait, &format!("snapshotting {id}"));
                    let a = client
                        .post(&format!("/instances/{id}/snapshots"), &Value::Object(body))
                        .await?;
                    let a = settle_snapshot(client, a, wait, &spinner).await?;
                    spinner.finish();
                    a
                }
            };
            out.one(&a);
        }
        SnapshotCmd::Ls {
            vm,
            kind,
            name,
            tags,
        } => {
            let mut query: Vec<(String, String)> = vec![];
            if let Some(vm) = vm {
                query.push(("source_instance_id".into(), resolve::vm(client, &vm).await?));
            }
            if let Some(k) = kind {
                query.push(("kind".into(), k));
            }
            if let Some(n) = name {
                query.push(("name".into(), n));
            }
            for (k, v) in tags {
                query.push((format!("tags[{k}]"), v));
            }
            let a = client.get_query("/snapshots", &query).await?;
            out.list(&a, SNAPSHOT_COLUMNS)?;
        }
        SnapshotCmd::Show { snapshot } => {
            let id = resolve::snapshot(client, &snapshot).await?;
            out.one(&client.get(&format!("/snapshots/{id}")).await?);
        }
        SnapshotCmd::Rm { snapshots } => {
            for snap in snapshots {
                let id = resolve::snapshot(client, &snap).await?;
                let a = client.delete(&format!("/snapshots/{id}")).await?;
                out.deleted(&a, &id);
            }
        }
        SnapshotCmd::Restore {
            vm,
            snapshot,
            target_state,
            target_hypervisor,
            wait,
        } => {
            let id = resolve::vm(client, &vm).await?;
            let (path, body) = match snapshot {
                None => {
                    if target_state.is_some() || target_hypervisor.is_some() {
                        return Err(CliError::Other(
                            "--target-state and --target-hypervisor need a SNAPSHOT to restore"
                                .into(),
                        ));
                    }
                    (format!("/vms/{id}/restore"), json!({}))
                }
                Some(snap) => {
                    // A name means one of this VM's own snapshots.
                    let sid = resolve::resolve(
                        client,
                        &resolve::SNAPSHOT,
                        &snap,
                        &format!("/snapshots?source_instance_id={id}"), // an id: nothing to encode
                    )
                    .await?;
                    (
                        format!("/instances/{id}/snapshots/{sid}/restore"),
                        target_body(None, target_state, target_hypervisor),
                    )
                }
            };
            let spinner = Spinner::start(wait.wait, &format!("restoring {id}"));
            let a = client.post(&path, &body).await?;
            let a = settle_vm(client, a, wait, &spinner).await?;
            spinner.finish();
            out.one(&a);
        }
        SnapshotCmd::Fork {
            snapshot,
            name,
            target_state,
            target_hypervisor,
            wait,
        } => {
            let sid = resolve::snapshot(client, &snapshot).await?;
            let spinner = Spinner::start(wait.wait, &format!("forking {sid} as {name}"));
            let body = target_body(Some(name), target_state, target_hypervisor);
            let a = client
                .post(&format!("/snapshots/{sid}/fork"), &body)
                .await?;
            let a = settle_vm(client, a, wait, &spinner).await?;
            spinner.finish();
            out.one(&a);
        }
    }
    Ok(())
}

/// The body of a Hypeman restore or fork.
fn target_body(
    name: Option<String>,
    state: Option<super::TargetState>,
    hypervisor: Option<String>,
) -> Value {
    let mut body = Map::new();
    if let Some(n) = name {
        body.insert("name".into(), n.into());
    }
    if let Some(t) = state {
        body.insert("target_state".into(), t.api_name().into());
    }
    if let Some(h) = hypervisor {
        body.insert("target_hypervisor".into(), h.into());
    }
    Value::Object(body)
}

/// `none`, `zstd`, `zstd:LEVEL`, `lz4`, `lz4:LEVEL` as the API's compression object.
fn parse_compression(s: &str) -> Result<Value, CliError> {
    if s == "none" {
        return Ok(json!({"enabled": false}));
    }
    let (algorithm, level) = match s.split_once(':') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    if !matches!(algorithm, "zstd" | "lz4") {
        return Err(CliError::Other(format!(
            "--compression {s:?}: use none, zstd, zstd:LEVEL, lz4 or lz4:LEVEL"
        )));
    }
    let mut c = json!({"enabled": true, "algorithm": algorithm});
    if let Some(l) = level {
        let l: u32 = l
            .parse()
            .map_err(|_| CliError::Other(format!("--compression {s:?}: the level is a number")))?;
        c["level"] = l.into();
    }
    Ok(c)
}

/// With --wait, asks again until the snapshot's memory is no longer being
/// compressed. A compression that failed leaves a snapshot that still
/// restores (its memory raw): a warning, not a failure.
async fn settle_snapshot(
    client: &Client,
    mut a: Answer,
    wait: Wait,
    spinner: &Spinner,
) -> Result<Answer, CliError> {
    if !wait.wait {
        return Ok(a);
    }
    let id = s(a.json(), "id");
    while s(a.json(), "compression_state") == "compressing" {
        spinner.set_message(&format!("compressing {id}"));
        tokio::time::sleep(POLL).await;
        a = client.get(&format!("/snapshots/{id}")).await?;
    }
    if s(a.json(), "compression_state") == "error" {
        eprintln!(
            "warning: {id} was not compressed ({}); it restores from its raw memory",
            s(a.json(), "compression_error")
        );
    }
    Ok(a)
}

const IMAGE_COLUMNS: &[Column] = &[
    col("ID", "id", text),
    col("NAME", "name", text),
    col("SOURCE", "source", text),
    col("SIZE", "size_bytes", size),
    col("KERNELS", "kernels", |v| {
        v.as_array()
            .map(|k| {
                k.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_else(|| "-".into())
    }),
    col("INITRD", "has_initrd", text),
    col("CREATED", "created_at", text),
];

async fn image(client: &Client, out: Out, cmd: ImageCmd) -> Result<(), CliError> {
    match cmd {
        ImageCmd::Build { .. } => unreachable!("`image build` is local: main runs it"),
        ImageCmd::Ls => out.list(&client.get("/images").await?, IMAGE_COLUMNS)?,
        ImageCmd::Show { image } => {
            let id = resolve::image(client, &image).await?;
            out.one(&client.get(&format!("/images/{id}")).await?);
        }
        ImageCmd::Rm { images } => {
            for image in images {
                let id = resolve::image(client, &image).await?;
                let a = client.delete(&format!("/images/{id}")).await?;
                out.deleted(&a, &id);
            }
        }
        ImageCmd::Create {
            kernel,
            rootfs,
            kernel_elf,
            initrd,
            name,
            boot_args,
            import,
            wait,
        } => {
            let files = [
                ("kernel", Some(kernel)),
                ("rootfs", Some(rootfs)),
                ("kernel_elf", kernel_elf),
                ("initrd", initrd),
            ];
            let a = if import {
                let mut body = Map::new();
                for (field, path) in files {
                    if let Some(p) = path {
                        body.insert(format!("{field}_path"), p.display().to_string().into());
                    }
                }
                if let Some(n) = name {
                    body.insert("name".into(), n.into());
                }
                if let Some(b) = boot_args {
                    body.insert("boot_args".into(), b.into());
                }
                let spinner = Spinner::start(wait.wait, "importing the image");
                let a = client.post("/images", &Value::Object(body)).await?;
                spinner.finish();
                a
            } else {
                let mut form = reqwest::multipart::Form::new();
                for (field, path) in files {
                    if let Some(p) = path {
                        // Streamed from the file, never read into memory whole.
                        let part = reqwest::multipart::Part::file(&p).await.map_err(|e| {
                            CliError::Other(format!("reading {}: {e}", p.display()))
                        })?;
                        form = form.part(field, part);
                    }
                }
                if let Some(n) = name {
                    form = form.text("name", n);
                }
                if let Some(b) = boot_args {
                    form = form.text("boot_args", b);
                }
                let spinner = Spinner::start(wait.wait, "uploading the image");
                let a = client
                    .send(client.request(Method::POST, "/images").multipart(form))
                    .await?;
                spinner.finish();
                a
            };
            out.one(&a);
        }
    }
    Ok(())
}

const TEMPLATE_COLUMNS: &[Column] = &[
    col("ID", "id", text),
    col("NAME", "name", text),
    col("IMAGE", "image_id", text),
    col("VCPUS", "vcpu_count", text),
    col("MEM_MIB", "mem_mib", text),
    col("CREATED", "created_at", text),
];

async fn template(client: &Client, out: Out, cmd: TemplateCmd) -> Result<(), CliError> {
    match cmd {
        TemplateCmd::Create {
            name,
            description,
            image,
            user_data: text,
            user_data_file,
            vcpus,
            mem_mib,
        } => {
            let mut body = Map::new();
            body.insert("name".into(), name.into());
            if let Some(d) = description {
                body.insert("description".into(), d.into());
            }
            if let Some(i) = image {
                body.insert("image_id".into(), resolve::image(client, &i).await?.into());
            }
            if let Some(u) = user_data(text, user_data_file.as_deref())? {
                body.insert("user_data".into(), u.into());
            }
            if let Some(n) = vcpus {
                body.insert("vcpu_count".into(), n.into());
            }
            if let Some(n) = mem_mib {
                body.insert("mem_mib".into(), n.into());
            }
            out.one(&client.post("/templates", &Value::Object(body)).await?);
        }
        TemplateCmd::Ls => out.list(&client.get("/templates").await?, TEMPLATE_COLUMNS)?,
        TemplateCmd::Show { template } => {
            let id = resolve::template(client, &template).await?;
            out.one(&client.get(&format!("/templates/{id}")).await?);
        }
        TemplateCmd::Rm { templates } => {
            for t in templates {
                let id = resolve::template(client, &t).await?;
                let a = client.delete(&format!("/templates/{id}")).await?;
                out.deleted(&a, &id);
            }
        }
    }
    Ok(())
}

const ROUTE_COLUMNS: &[Column] = &[
    col("ID", "id", text),
    col("SUBDOMAIN", "subdomain", text),
    col("PORT", "target_port", text),
    col("AUTO_WAKE", "auto_wake", text),
    col("URL", "url", text),
];

async fn route(client: &Client, out: Out, cmd: RouteCmd) -> Result<(), CliError> {
    match cmd {
        RouteCmd::Ls { vm } => {
            let id = resolve::vm(client, &vm).await?;
            out.list(
                &client.get(&format!("/vms/{id}/routes")).await?,
                ROUTE_COLUMNS,
            )?;
        }
        RouteCmd::Add {
            vm,
            port,
            subdomain,
            no_auto_wake,
        } => {
            let id = resolve::vm(client, &vm).await?;
            let mut body = json!({"target_port": port});
            if let Some(sd) = subdomain {
                body["subdomain"] = sd.into();
            }
            if no_auto_wake {
                body["auto_wake"] = false.into();
            }
            out.one(&client.post(&format!("/vms/{id}/routes"), &body).await?);
        }
        RouteCmd::Rm { vm, route } => {
            let id = resolve::vm(client, &vm).await?;
            let rid = resolve::route(client, &id, &route).await?;
            let a = client.delete(&format!("/vms/{id}/routes/{rid}")).await?;
            out.deleted(&a, &rid);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compression_flags_become_the_apis_object() {
        assert_eq!(
            parse_compression("none").unwrap(),
            json!({"enabled": false})
        );
        assert_eq!(
            parse_compression("zstd").unwrap(),
            json!({"enabled": true, "algorithm": "zstd"})
        );
        assert_eq!(
            parse_compression("lz4:3").unwrap(),
            json!({"enabled": true, "algorithm": "lz4", "level": 3})
        );
        assert!(parse_compression("gzip").is_err());
        assert!(parse_compression("zstd:x").is_err());
    }
}
