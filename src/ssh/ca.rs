//! The CA key on disk (created once, 0600, refused when others can read it)
//! and the certificates it signs.

use ssh_key::certificate::{Builder, CertType};
use ssh_key::rand_core::{OsRng, RngCore};
use ssh_key::{Algorithm, LineEnding, PrivateKey, PublicKey};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The CA's private key, in the data dir's `ssh/` directory.
pub const CA_FILE: &str = "user_ca";
/// Its public half, for an operator who bakes the trust into an image.
pub const CA_PUB_FILE: &str = "user_ca.pub";
const CA_COMMENT: &str = "hatch-user-ca";

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is readable by group or others (mode {mode:o}); the SSH CA key must be 0600: fix it with `chmod 600 {path}` if nobody else could have read it, else delete it (a new CA is made, and guests started before trust the old one)")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("{path} is owned by uid {owner}, not the daemon's uid {me}")]
    Owner { path: PathBuf, owner: u32, me: u32 },
    #[error("{path} is not an unencrypted OpenSSH ed25519 private key: {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("signing the certificate: {0}")]
    Sign(String),
}

/// A certificate made for one key and one VM.
#[derive(Debug, Clone)]
pub struct SignedCert {
    /// One line, as `ssh-keygen -s` writes a `-cert.pub` file.
    pub openssh: String,
    /// Unix seconds after which OpenSSH refuses it.
    pub valid_before: u64,
}

/// The daemon's SSH user CA.
pub struct Ca {
    key: PrivateKey,
    public_line: String,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the private key.
        f.debug_struct("Ca")
            .field("public", &self.public_line)
            .finish()
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Ca {
    /// Loads `dir/user_ca`, creating the key (and `dir`) on first start.
    /// Returns the CA and whether it was made now.
    pub fn load_or_create(dir: &Path) -> Result<(Ca, bool), CaError> {
        fs::create_dir_all(dir).map_err(io(dir))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(io(dir))?;
        let path = dir.join(CA_FILE);
        match Self::load(&path) {
            Ok(ca) => {
                ca.write_public(dir)?;
                Ok((ca, false))
            }
            Err(CaError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                let ca = Self::create(&path)?;
                ca.write_public(dir)?;
                Ok((ca, true))
            }
            Err(e) => Err(e),
        }
    }

    fn load(path: &Path) -> Result<Ca, CaError> {
        // O_NOFOLLOW: the key is ours, never a link to some other file.
        let file = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(io(path))?;
        let meta = file.metadata().map_err(io(path))?;
        let mode = meta.mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CaError::Exposed {
                path: path.to_path_buf(),
                mode,
            });
        }
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me {
            return Err(CaError::Owner {
                path: path.to_path_buf(),
                owner: meta.uid(),
                me,
            });
        }
        let mut pem = String::new();
        std::io::Read::read_to_string(&mut &file, &mut pem).map_err(io(path))?;
        let bad = |reason: String| CaError::BadKey {
            path: path.to_path_buf(),
            reason,
        };
        let key = PrivateKey::from_openssh(&pem).map_err(|e| bad(e.to_string()))?;
        if key.is_encrypted() || key.algorithm() != Algorithm::Ed25519 {
            return Err(bad(format!(
                "found a{} {} key",
                if key.is_encrypted() {
                    "n encrypted"
                } else {
                    ""
                },
                key.algorithm()
            )));
        }
        Self::from_key(key)
    }

    /// Writes a new key to a temporary file (0600 from the start) and
    /// renames it into place, so a crash never leaves half a key behind.
    fn create(path: &Path) -> Result<Ca, CaError> {
        let mut key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        key.set_comment(CA_COMMENT);
        let pem = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        let tmp = path.with_extension("new");
        let _ = fs::remove_file(&tmp);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&tmp)
            .map_err(io(&tmp))?;
        f.write_all(pem.as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))?;
        if let Some(dir) = path.parent() {
            fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io(dir))?;
        }
        Self::from_key(key)
    }

    fn from_key(key: PrivateKey) -> Result<Ca, CaError> {
        let public_line = key
            .public_key()
            .to_openssh()
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok(Ca { key, public_line })
    }

    fn write_public(&self, dir: &Path) -> Result<(), CaError> {
        let path = dir.join(CA_PUB_FILE);
        if fs::read_to_string(&path).ok().as_deref() == Some(&format!("{}\n", self.public_line)) {
            return Ok(());
        }
        fs::write(&path, format!("{}\n", self.public_line)).map_err(io(&path))?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).map_err(io(&path))
    }

    /// The CA's public key as one `ssh-ed25519 AAAA... hatch-user-ca` line:
    /// what a guest's `TrustedUserCAKeys` file holds.
    pub fn public_key(&self) -> &str {
        &self.public_line
    }

    /// A user certificate for `key`: login name `principal` only (the VM id:
    /// the guest maps it to its user in `AuthorizedPrincipalsFile`), valid
    /// from now for `ttl`, with the usual interactive permissions.
    pub fn sign(
        &self,
        key: &PublicKey,
        principal: &str,
        ttl: Duration,
    ) -> Result<SignedCert, CaError> {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| CaError::Sign(e.to_string()))?
            .as_secs();
        let valid_before = now.saturating_add(ttl.as_secs().max(1));
        // No lower bound (ssh-keygen's `-V always:...`): a guest woken from
        // a snapshot keeps the clock it slept with until it resyncs, and a
        // certificate "not yet valid" there would lock its owner out. The
        // upper bound is what limits a leaked certificate.
        let valid_after = 0;
        let sign_err = |e: ssh_key::Error| CaError::Sign(e.to_string());
        let mut b = Builder::new_with_random_nonce(
            &mut OsRng,
            key.key_data().clone(),
            valid_after,
            valid_before,
        )
        .map_err(sign_err)?;
        b.serial(OsRng.next_u64())
            .and_then(|b| b.cert_type(CertType::User))
            .and_then(|b| b.key_id(format!("hatch:{principal}")))
            .and_then(|b| b.valid_principal(principal))
            .and_then(|b| b.extension("permit-pty", ""))
            .and_then(|b| b.extension("permit-port-forwarding", ""))
            .and_then(|b| b.extension("permit-agent-forwarding", ""))
            .and_then(|b| b.extension("permit-X11-forwarding", ""))
            .and_then(|b| b.extension("permit-user-rc", ""))
            .map_err(sign_err)?;
        let cert = b.sign(&self.key).map_err(sign_err)?;
        let openssh = cert.to_openssh().map_err(sign_err)?;
        Ok(SignedCert {
            openssh,
            valid_before,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hatch-ca-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn created_once_0600_then_loaded() {
        let dir = tmp("create");
        let (a, made) = Ca::load_or_create(&dir).unwrap();
        assert!(made);
        let meta = fs::metadata(dir.join(CA_FILE)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        assert_eq!(fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        assert!(a.public_key().starts_with("ssh-ed25519 "));
        assert_eq!(
            fs::read_to_string(dir.join(CA_PUB_FILE)).unwrap().trim(),
            a.public_key()
        );
        let (b, made) = Ca::load_or_create(&dir).unwrap();
        assert!(!made);
        assert_eq!(a.public_key(), b.public_key());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn refuses_a_key_others_can_read() {
        let dir = tmp("exposed");
        Ca::load_or_create(&dir).unwrap();
        let key = dir.join(CA_FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o640)).unwrap();
        let err = Ca::load_or_create(&dir).unwrap_err();
        assert!(matches!(err, CaError::Exposed { mode: 0o640, .. }), "{err}");
        // A link in its place is not followed.
        fs::remove_file(&key).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &key).unwrap();
        assert!(matches!(Ca::load_or_create(&dir), Err(CaError::Io { .. })));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn signs_for_one_principal_until_the_ttl() {
        let dir = tmp("sign");
        let (ca, _) = Ca::load_or_create(&dir).unwrap();
        let user = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let before = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let signed = ca
            .sign(user.public_key(), "vm_abc123", Duration::from_secs(300))
            .unwrap();
        assert!(signed
            .openssh
            .starts_with("ssh-ed25519-cert-v01@openssh.com "));
        let cert = ssh_key::Certificate::from_openssh(&signed.openssh).unwrap();
        assert_eq!(cert.cert_type(), CertType::User);
        assert_eq!(cert.valid_principals(), ["vm_abc123".to_string()]);
        assert_eq!(cert.valid_before(), signed.valid_before);
        assert!((before + 300..=before + 302).contains(&signed.valid_before));
        assert_eq!(cert.public_key(), user.public_key().key_data());
        // Signed by this CA and no other.
        let fp = ca.key.public_key().fingerprint(Default::default());
        let now = before + 1;
        assert!(cert.validate_at(now, [&fp]).is_ok());
        assert!(cert.validate_at(signed.valid_before + 1, [&fp]).is_err());
        let other = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).unwrap();
        let other_fp = other.public_key().fingerprint(Default::default());
        assert!(cert.validate_at(now, [&other_fp]).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }
}
