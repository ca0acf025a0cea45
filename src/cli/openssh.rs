//! `vm ssh --openssh`: the user's own `ssh`, with a throw-away key certified for one VM by `POST /vms/{id}/connect`.

use super::client::{CliError, Client};
use super::config;
use serde_json::json;
use ssh_key::rand_core::{OsRng, RngCore};
use ssh_key::{Algorithm, LineEnding, PrivateKey};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::PathBuf;
use std::process::Command;

/// A private directory for the key and certificate, removed when dropped
/// (after ssh ends, on an error too).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<TempDir, CliError> {
        let path = std::env::temp_dir().join(format!("hatch-ssh-{:016x}", OsRng.next_u64()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| CliError::Other(format!("making {}: {e}", path.display())))?;
        Ok(TempDir(path))
    }

    /// Writes a file only its owner can read, from its creation on.
    fn write(&self, name: &str, text: &str) -> Result<PathBuf, CliError> {
        let path = self.0.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()))
            .map_err(|e| CliError::Other(format!("writing {}: {e}", path.display())))?;
        Ok(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs `ssh` to VM `vm_id` as the certificate's user and answers its exit
/// status (ssh's own 255 for its failures, else the remote command's).
pub async fn run(
    client: &Client,
    vm_id: &str,
    tty_flag: Option<&str>,
    ssh_args: &[String],
    command: &[String],
) -> Result<i32, CliError> {
    let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
        .map_err(|e| CliError::Other(format!("making a key: {e}")))?;
    let public = key
        .public_key()
        .to_openssh()
        .map_err(|e| CliError::Other(format!("encoding the key: {e}")))?;
    let a = client
        .post(
            &format!("/vms/{vm_id}/connect"),
            &json!({ "public_key": public }),
        )
        .await?;
    let field = |k: &str| {
        a.json()[k]
            .as_str()
            .map(str::to_string)
            .or_else(|| a.json()[k].as_i64().map(|n| n.to_string()))
            .ok_or_else(|| CliError::Transport(format!("the connect answer has no {k}")))
    };
    let (cert, host, port, user) = (
        field("certificate")?,
        field("host")?,
        field("port")?,
        field("username")?,
    );

    let dir = TempDir::new()?;
    let pem = key
        .to_openssh(LineEnding::LF)
        .map_err(|e| CliError::Other(format!("encoding the key: {e}")))?;
    let key_file = dir.write("id_ed25519", &pem)?;
    let cert_file = dir.write("id_ed25519-cert.pub", &cert)?;
    let known_hosts = known_hosts()?;

    let mut ssh = Command::new("ssh");
    ssh.arg("-i")
        .arg(&key_file)
        .arg("-o")
        .arg(format!("CertificateFile={}", cert_file.display()))
        // Only this key: agent keys tried first could use up MaxAuthTries.
        .args(["-o", "IdentitiesOnly=yes"])
        // The VM's host key, pinned under its id in hatch's own file: the
        // first login records it, a changed one is refused by ssh, and the
        // user's ~/.ssh/known_hosts is neither read nor written (every VM
        // shares the daemon's address, only the port differs).
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg("-o")
        .arg(format!("HostKeyAlias={vm_id}"))
        .args(["-o", "StrictHostKeyChecking=accept-new"])
        .args(["-p", &port, "-l", &user]);
    if let Some(t) = tty_flag {
        ssh.arg(t);
    }
    ssh.args(ssh_args).arg(&host).args(command);
    // Ctrl-C belongs to ssh (and the remote side) while it runs; this
    // process only waits, so it must outlive it to remove the key.
    let _int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
        .map_err(|e| CliError::Other(format!("installing a signal handler: {e}")))?;
    let status = ssh.status().map_err(|e| {
        CliError::Other(format!(
            "running ssh (OpenSSH's client, needed by --openssh): {e}"
        ))
    })?;
    drop(dir);
    Ok(status.code().unwrap_or(255))
}

/// `<config dir>/known_hosts`, its directory made if missing.
fn known_hosts() -> Result<PathBuf, CliError> {
    let dir = config::dir().ok_or_else(|| {
        CliError::Other("no HOME or XDG_CONFIG_HOME for hatch's known_hosts file".into())
    })?;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(|e| CliError::Other(format!("making {}: {e}", dir.display())))?;
    Ok(dir.join("known_hosts"))
}
