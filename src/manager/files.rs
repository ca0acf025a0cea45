//! Files inside a guest over SFTP: streamed uploads (to a temp name, then
//! renamed), streamed downloads and directory listings, as user `agent`.

use super::idle::Busy;
use super::{Manager, ManagerError, Result};
use crate::ssh::client::{ClientError, GuestSession};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use russh_sftp::client::error::Error as SftpError;
use russh_sftp::client::{RawSftpSession, SftpSession};
use russh_sftp::protocol::{FileAttributes, FileType, OpenFlags, Packet, StatusCode};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::io::ReaderStream;

/// How long the login to the guest's sshd may take (TCP, handshake, auth).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long one SFTP request may wait for its answer. Generous: a guest
/// under TCG on a loaded host answers slowly, and a dead one is caught by
/// the session's keepalives anyway.
const SFTP_REQUEST_TIMEOUT_SECS: u64 = 120;
/// Longest guest path taken (Linux's PATH_MAX).
const MAX_PATH_LEN: usize = 4096;
/// Bytes per SFTP write on upload: what OpenSSH's sftp-server takes in one
/// request (256 KiB less 1 KiB, its `limits@openssh.com` answer), as scp
/// sends. HTTP body chunks are gathered up to this, so the guest handles
/// one request and one `pwrite` per 255 KiB rather than per body chunk.
const UPLOAD_WRITE_LEN: usize = 255 * 1024;
/// SFTP requests larger than this are refused by OpenSSH's sftp-server.
const SFTP_MAX_PACKET: u32 = 256 * 1024;
/// The SFTP extension that renames over an existing file (rename(2));
/// plain SFTP rename refuses an existing target.
const POSIX_RENAME: &str = "posix-rename@openssh.com";

/// An absolute path in the guest, passed to its SFTP server as is (no shell
/// ever sees it, so quotes, spaces or `$(...)` in it are just bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestPath(String);

impl GuestPath {
    pub fn parse(path: &str) -> Result<GuestPath> {
        if !path.starts_with('/') {
            return Err(ManagerError::BadRequest(format!(
                "path must be absolute (start with /), got {path:?}"
            )));
        }
        if path.contains('\0') {
            return Err(ManagerError::BadRequest("path contains a NUL byte".into()));
        }
        if path.len() > MAX_PATH_LEN {
            return Err(ManagerError::BadRequest(format!(
                "path is longer than {MAX_PATH_LEN} bytes"
            )));
        }
        Ok(GuestPath(path.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The directory holding this path and the last component, for the
    /// upload's temp name beside it. None for `/` (or only slashes).
    fn split(&self) -> Option<(&str, &str)> {
        let trimmed = self.0.trim_end_matches('/');
        let (dir, name) = trimmed.rsplit_once('/')?;
        if name.is_empty() {
            return None;
        }
        Some((if dir.is_empty() { "/" } else { dir }, name))
    }
}

/// Parses a permission mode: one to four octal digits (`644`, `0644`, `4755`).
pub fn parse_mode(text: &str) -> Result<u32> {
    let octal =
        !text.is_empty() && text.len() <= 4 && text.bytes().all(|b| (b'0'..=b'7').contains(&b));
    match u32::from_str_radix(text, 8) {
        Ok(mode) if octal => Ok(mode),
        _ => Err(ManagerError::BadRequest(format!(
            "mode must be one to four octal digits (like 0644), got {text:?}"
        ))),
    }
}

/// What an upload writes besides the bytes.
#[derive(Debug, Clone, Default)]
pub struct UploadOptions {
    /// Permission bits; None keeps those of the file it replaces, or the
    /// guest's default (0666 less its umask) for a new file.
    pub mode: Option<u32>,
    /// Numeric owner and group; None keeps `agent`'s (the session's user).
    /// The guest decides: `agent` may give a file its own uid and a group
    /// it is in, nothing else (403).
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// Parses a numeric uid or gid.
pub fn parse_id(name: &str, text: &str) -> Result<u32> {
    match text.parse::<u32>() {
        Ok(id) if text.bytes().all(|b| b.is_ascii_digit()) && id != u32::MAX => Ok(id),
        _ => Err(ManagerError::BadRequest(format!(
            "{name} must be a number (a uid or gid in the guest), got {text:?}"
        ))),
    }
}

/// What kind of entry a listing shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

impl EntryKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EntryKind::File => "file",
            EntryKind::Dir => "dir",
            EntryKind::Symlink => "symlink",
            EntryKind::Other => "other",
        }
    }
}

/// One entry of a directory listing (symlinks are shown, not followed).
#[derive(Debug, Clone)]
pub struct DirEntry {
    pub name: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits (07777).
    pub mode: u32,
    /// Unix seconds.
    pub mtime: u64,
}

/// What a download is: a file's bytes, or a directory's entries.
pub enum Download {
    File {
        /// The size the guest reported, when it is a regular file (files
        /// under /proc say 0 and have content: no size for those).
        size: Option<u64>,
        body: Box<GuestFileStream>,
    },
    Dir(Vec<DirEntry>),
}

/// An upload that went through.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// An open SFTP session to one guest, with what keeps it alive and counts
/// it as activity for idle sleep.
struct GuestFiles {
    sftp: SftpSession,
    session: GuestSession,
    vm_id: String,
    _busy: Busy,
}

/// The bytes of a guest file as they arrive; holds the SFTP session (and the
/// VM's `Busy`) until the body is sent or the client goes away.
pub struct GuestFileStream {
    inner: ReaderStream<tokio::io::Take<russh_sftp::client::fs::File>>,
    _files: GuestFiles,
}

impl Stream for GuestFileStream {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

/// What an SFTP failure means for the caller; `what` names the action and
/// the path ("reading /etc/shadow").
fn sftp_error(vm_id: &str, what: &str, e: SftpError) -> ManagerError {
    match &e {
        SftpError::Status(s) => match s.status_code {
            StatusCode::NoSuchFile => {
                ManagerError::NotFound(format!("{what} in vm {vm_id}: no such file or directory"))
            }
            StatusCode::PermissionDenied => ManagerError::Forbidden(format!(
                "{what} in vm {vm_id}: permission denied (the daemon acts as user agent)"
            )),
            _ => guest_failed(format!("{what} in vm {vm_id}: {}", s.error_message)),
        },
        _ => guest_failed(format!("{what} in vm {vm_id}: SFTP: {e}")),
    }
}

/// The guest's side failed (its SSH or SFTP server): a bad gateway.
fn guest_failed(why: String) -> ManagerError {
    ManagerError::BadGateway(why)
}

fn is_status(e: &SftpError, code: StatusCode) -> bool {
    matches!(e, SftpError::Status(s) if s.status_code == code)
}

fn permissions(attrs: &FileAttributes) -> u32 {
    attrs.permissions.unwrap_or(0) & 0o7777
}

fn kind_of(attrs: &FileAttributes) -> EntryKind {
    match attrs.file_type() {
        FileType::File => EntryKind::File,
        FileType::Dir => EntryKind::Dir,
        FileType::Symlink => EntryKind::Symlink,
        FileType::Other => EntryKind::Other,
    }
}

/// The body of a `posix-rename@openssh.com` request: two SSH strings.
fn rename_request(from: &str, to: &str) -> Vec<u8> {
    let mut data = Vec::with_capacity(8 + from.len() + to.len());
    for s in [from, to] {
        data.extend_from_slice(&(s.len() as u32).to_be_bytes());
        data.extend_from_slice(s.as_bytes());
    }
    data
}

/// A name beside `name` in the same directory that no upload reuses: a cut
/// upload leaves at worst this, never a half file under the real name.
fn temp_name(dir: &str, name: &str) -> Result<String> {
    let mut tag = [0u8; 6];
    getrandom::fill(&mut tag).map_err(|e| ManagerError::Internal(e.to_string()))?;
    let tag: String = tag.iter().map(|b| format!("{b:02x}")).collect();
    let sep = if dir.ends_with('/') { "" } else { "/" };
    Ok(format!("{dir}{sep}.{name}.hatch-upload-{tag}"))
}

impl Manager {
    /// Logs in to the owner's VM `id` over SFTP. A VM without networking is
    /// a 409, a sleeping one is woken first, and the session counts as
    /// activity (a `Busy`) for as long as it is open.
    async fn guest_files(
        self: &Arc<Self>,
        owner: &crate::store::Owner,
        id: &str,
    ) -> Result<GuestFiles> {
        let (vm, ca, busy) = self.busy_for_ssh(owner, id, "a file transfer").await?;
        let ip = vm
            .guest_ip
            .ok_or_else(|| ManagerError::Conflict(format!("vm {id} has no guest address")))?;
        let addr = SocketAddr::new(ip.into(), 22);
        let principal = Self::trusted_principal(&vm);
        let session = GuestSession::connect_as(&ca, id, principal, addr, LOGIN_TIMEOUT)
            .await
            .map_err(|e| guest_failed(format!("vm {id}: {e}")))?;
        let stream = session
            .sftp()
            .await
            .map_err(|e: ClientError| guest_failed(format!("vm {id}: starting SFTP: {e}")))?;
        let config = russh_sftp::client::Config {
            request_timeout_secs: SFTP_REQUEST_TIMEOUT_SECS,
            // Large writes, as scp makes them; the server's own limit, when
            // it states one, still caps each.
            max_write_packet_len: SFTP_MAX_PACKET,
            ..Default::default()
        };
        let sftp = SftpSession::new_with_config(stream, config)
            .await
            .map_err(|e| guest_failed(format!("vm {id}: starting SFTP: {e}")))?;
        Ok(GuestFiles {
            sftp,
            session,
            vm_id: id.to_string(),
            _busy: busy,
        })
    }

    /// `GET /vms/{id}/files?path=`: a file's bytes, streamed, or a
    /// directory's listing (sorted by name, without `.` and `..`).
    pub async fn download(
        self: &Arc<Self>,
        owner: &crate::store::Owner,
        id: &str,
        path: &GuestPath,
    ) -> Result<Download> {
        let files = self.guest_files(owner, id).await?;
        let p = path.as_str();
        let attrs = files
            .sftp
            .metadata(p)
            .await
            .map_err(|e| sftp_error(id, &format!("reading {p}"), e))?;
        if attrs.is_dir() {
            let dir = files
                .sftp
                .read_dir(p)
                .await
                .map_err(|e| sftp_error(id, &format!("listing {p}"), e))?;
            let mut entries: Vec<DirEntry> = dir
                .filter(|e| e.file_name() != "." && e.file_name() != "..")
                .map(|e| {
                    let m = e.metadata();
                    DirEntry {
                        name: e.file_name(),
                        kind: kind_of(&m),
                        size: m.size.unwrap_or(0),
                        mode: permissions(&m),
                        mtime: u64::from(m.mtime.unwrap_or(0)),
                    }
                })
                .collect();
            entries.sort_by(|a, b| a.name.cmp(&b.name));
            files.session_done().await;
            return Ok(Download::Dir(entries));
        }
        let file = files
            .sftp
            .open(p)
            .await
            .map_err(|e| sftp_error(id, &format!("reading {p}"), e))?;
        // A regular file's size bounds what is sent, so a file that grows
        // while it is read cannot overrun the Content-Length.
        let size = attrs.size.filter(|&n| attrs.is_regular() && n > 0);
        let limit = size.unwrap_or(u64::MAX);
        tracing::info!(vm = id, path = p, size, "file download");
        Ok(Download::File {
            size,
            body: Box::new(GuestFileStream {
                inner: ReaderStream::with_capacity(file.take(limit), 64 * 1024),
                _files: files,
            }),
        })
    }

    /// `PUT /vms/{id}/files?path=`: writes `body` to `path` in the guest,
    /// through a temp name beside it that is renamed over it at the end. A
    /// body that fails (the client went away) removes the temp file; the
    /// transfer runs in its own task so that happens even when the HTTP
    /// handler is dropped with the connection.
    pub async fn upload<S, E>(
        self: &Arc<Self>,
        owner: &crate::store::Owner,
        id: &str,
        path: &GuestPath,
        options: UploadOptions,
        content_length: Option<u64>,
        body: S,
    ) -> Result<Uploaded>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin + 'static,
        E: std::fmt::Display + Send + 'static,
    {
        let files = self.guest_files(owner, id).await?;
        let path = path.clone();
        tokio::spawn(async move {
            let result = files.upload(&path, options, content_length, body).await;
            files.session_done().await;
            result
        })
        .await?
    }
}

impl GuestFiles {
    /// Ends the SFTP session and the SSH connection politely.
    async fn session_done(self) {
        let _ = self.sftp.close().await;
        self.session.close().await;
    }

    async fn upload<S, E>(
        &self,
        path: &GuestPath,
        options: UploadOptions,
        content_length: Option<u64>,
        mut body: S,
    ) -> Result<Uploaded>
    where
        S: Stream<Item = std::result::Result<Bytes, E>> + Send + Unpin,
        E: std::fmt::Display,
    {
        let id = self.vm_id.as_str();
        let p = path.as_str();
        let (dir, name) = path.split().ok_or_else(|| {
            ManagerError::BadRequest(format!("{p} names no file (it is the root directory)"))
        })?;
        // What is there now: a directory cannot be replaced by a file, and a
        // file replaced keeps its permissions unless new ones are given.
        let existing = match self.sftp.metadata(p).await {
            Ok(attrs) => Some(attrs),
            Err(e) if is_status(&e, StatusCode::NoSuchFile) => None,
            Err(e) => return Err(sftp_error(id, &format!("looking at {p}"), e)),
        };
        if existing.as_ref().is_some_and(|a| a.is_dir()) {
            return Err(ManagerError::Conflict(format!(
                "{p} is a directory in vm {id}; upload to a file path inside it"
            )));
        }
        let mode = options.mode.or_else(|| existing.as_ref().map(permissions));
        if let Some(len) = content_length {
            self.check_space(dir, len).await?;
        }
        let temp = temp_name(dir, name)?;
        let file = self
            .sftp
            .open_with_flags_and_attributes(
                temp.as_str(),
                OpenFlags::CREATE | OpenFlags::EXCLUDE | OpenFlags::WRITE,
                FileAttributes {
                    // Private until it is whole; its real mode is set below.
                    permissions: Some(0o600),
                    ..FileAttributes::empty()
                },
            )
            .await
            .map_err(|e| match e {
                e if is_status(&e, StatusCode::NoSuchFile) => ManagerError::NotFound(format!(
                    "writing {p} in vm {id}: directory {dir} does not exist"
                )),
                e => sftp_error(id, &format!("writing {p}"), e),
            })?;
        let mut file = tokio::io::BufWriter::with_capacity(UPLOAD_WRITE_LEN, file);
        let mut written: u64 = 0;
        let copied: Result<()> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(|e| {
                    ManagerError::BadRequest(format!(
                        "the upload of {p} was cut after {written} bytes: {e}"
                    ))
                })?;
                if let Err(e) = file.write_all(&chunk).await {
                    return Err(self.write_failed(dir, p, e).await);
                }
                written += chunk.len() as u64;
            }
            // A body that ends early without an error (a connection dropped
            // under it) is still a cut upload, not a shorter file.
            if let Some(len) = content_length.filter(|&len| len != written) {
                return Err(ManagerError::BadRequest(format!(
                    "the upload of {p} was cut after {written} of {len} bytes"
                )));
            }
            if let Err(e) = file.shutdown().await {
                return Err(self.write_failed(dir, p, e).await);
            }
            // The owner first: a chown by anyone but root clears set-id bits.
            if options.uid.is_some() || options.gid.is_some() {
                self.set_owner(&temp, p, options.uid, options.gid).await?;
            }
            if let Some(mode) = mode {
                let attrs = FileAttributes {
                    permissions: Some(mode),
                    ..FileAttributes::empty()
                };
                // By path: shutting the file down closed its handle.
                self.sftp
                    .set_metadata(temp.as_str(), attrs)
                    .await
                    .map_err(|e| sftp_error(id, &format!("setting the mode of {p}"), e))?;
            }
            Ok(())
        }
        .await;
        if let Err(e) = copied {
            tracing::warn!(
                vm = id,
                path = p,
                bytes = written,
                "upload failed, its temp file is removed: {e}"
            );
            drop(file);
            self.remove_temp(&temp).await;
            return Err(e);
        }
        let _ = file.into_inner().close().await;
        if let Err(e) = self.rename_over(&temp, p).await {
            self.remove_temp(&temp).await;
            return Err(e);
        }
        // What the file is now, as the guest says.
        let now = self.sftp.metadata(p).await.ok();
        let mode = mode.or_else(|| now.as_ref().map(permissions)).unwrap_or(0);
        let (uid, gid) = now
            .as_ref()
            .map(|a| (a.uid.unwrap_or(0), a.gid.unwrap_or(0)))
            .unwrap_or((0, 0));
        tracing::info!(
            vm = id,
            path = p,
            bytes = written,
            mode = format!("{mode:04o}"),
            uid,
            gid,
            "file uploaded"
        );
        Ok(Uploaded {
            path: p.to_string(),
            size: written,
            mode,
            uid,
            gid,
        })
    }

    /// Gives the temp file `temp` (to become `p`) owner `uid` and group
    /// `gid`; one left out stays as it is (SFTP sets both at once).
    async fn set_owner(
        &self,
        temp: &str,
        p: &str,
        uid: Option<u32>,
        gid: Option<u32>,
    ) -> Result<()> {
        let id = &self.vm_id;
        let now = self
            .sftp
            .metadata(temp)
            .await
            .map_err(|e| sftp_error(id, &format!("looking at {p}"), e))?;
        let attrs = FileAttributes {
            uid: uid.or(now.uid),
            gid: gid.or(now.gid),
            ..FileAttributes::empty()
        };
        self.sftp.set_metadata(temp, attrs).await.map_err(|e| {
            if is_status(&e, StatusCode::PermissionDenied) {
                ManagerError::Forbidden(format!(
                    "giving {p} in vm {id} owner {} and group {}: permission denied (the daemon acts as user agent, \
                     which may give a file only its own uid and a group it is in)",
                    uid.map_or("unchanged".into(), |u| u.to_string()),
                    gid.map_or("unchanged".into(), |g| g.to_string()),
                ))
            } else {
                sftp_error(id, &format!("setting the owner of {p}"), e)
            }
        })
    }

    /// Refuses an upload the guest's disk cannot hold, before any byte moves.
    async fn check_space(&self, dir: &str, len: u64) -> Result<()> {
        let Ok(Some(fs)) = self.sftp.fs_info(dir).await else {
            return Ok(()); // not every SFTP server can tell; the write will say
        };
        let free = fs.blocks_avail.saturating_mul(fs.fragment_size);
        if len > free {
            return Err(ManagerError::TooLarge(format!(
                "the upload is {len} bytes but {dir} in vm {}'s disk has {free} bytes free",
                self.vm_id
            )));
        }
        Ok(())
    }

    /// A write that failed: when the disk is (nearly) full, say so.
    async fn write_failed(&self, dir: &str, p: &str, e: std::io::Error) -> ManagerError {
        let id = &self.vm_id;
        if let Ok(Some(fs)) = self.sftp.fs_info(dir).await {
            // Less than 64 KiB left: the write ran the disk out.
            if fs.blocks_avail.saturating_mul(fs.fragment_size) < 64 * 1024 {
                return ManagerError::TooLarge(format!(
                    "writing {p} in vm {id}: the guest's disk is full"
                ));
            }
        }
        guest_failed(format!("writing {p} in vm {id}: {e}"))
    }

    /// `rename(2)` of `from` over `to` in the guest, through OpenSSH's
    /// `posix-rename` extension on a second SFTP channel (the session's
    /// plain rename refuses an existing target).
    async fn rename_over(&self, from: &str, to: &str) -> Result<()> {
        let id = &self.vm_id;
        let stream = self
            .session
            .sftp()
            .await
            .map_err(|e| guest_failed(format!("vm {id}: starting SFTP: {e}")))?;
        let raw = RawSftpSession::new(stream);
        raw.set_timeout(SFTP_REQUEST_TIMEOUT_SECS);
        let version = raw
            .init()
            .await
            .map_err(|e| guest_failed(format!("vm {id}: starting SFTP: {e}")))?;
        if !version.extensions.contains_key(POSIX_RENAME) {
            let _ = raw.close_session();
            return Err(guest_failed(format!(
                "vm {id}: the guest's SFTP server has no {POSIX_RENAME} (OpenSSH's sftp-server has)"
            )));
        }
        let answer = raw.extended(POSIX_RENAME, rename_request(from, to)).await;
        let _ = raw.close_session();
        let what = format!("renaming the upload into {to}");
        match answer {
            Ok(Packet::Status(s)) if s.status_code == StatusCode::Ok => Ok(()),
            Ok(Packet::Status(s)) => Err(sftp_error(id, &what, SftpError::Status(s))),
            Ok(_) => Err(guest_failed(format!("vm {id}: {what}: unexpected answer"))),
            Err(e) => Err(sftp_error(id, &what, e)),
        }
    }

    async fn remove_temp(&self, temp: &str) {
        if let Err(e) = self.sftp.remove_file(temp).await {
            tracing::warn!(vm = %self.vm_id, temp, "removing a cut upload's temp file: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_be_absolute_and_are_kept_verbatim() {
        assert!(GuestPath::parse("etc/passwd").is_err());
        assert!(GuestPath::parse("").is_err());
        assert!(GuestPath::parse("/a\0b").is_err());
        let odd = "/tmp/it's a $(touch x) \"file\"";
        assert_eq!(GuestPath::parse(odd).unwrap().as_str(), odd);
        assert_eq!(GuestPath::parse("/a/b").unwrap().split(), Some(("/a", "b")));
        assert_eq!(GuestPath::parse("/b").unwrap().split(), Some(("/", "b")));
        assert_eq!(
            GuestPath::parse("/a/b/").unwrap().split(),
            Some(("/a", "b"))
        );
        assert_eq!(GuestPath::parse("/").unwrap().split(), None);
    }

    #[test]
    fn ids_are_plain_numbers() {
        assert_eq!(parse_id("uid", "0").unwrap(), 0);
        assert_eq!(parse_id("gid", "1000").unwrap(), 1000);
        for bad in [
            "",
            "-1",
            "+5",
            "1e3",
            "agent",
            "4294967295",
            "99999999999",
            " 1",
        ] {
            assert!(parse_id("uid", bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn modes_are_octal_permission_bits() {
        assert_eq!(parse_mode("0644").unwrap(), 0o644);
        assert_eq!(parse_mode("755").unwrap(), 0o755);
        assert_eq!(parse_mode("4755").unwrap(), 0o4755);
        assert_eq!(parse_mode("0").unwrap(), 0);
        for bad in [
            "",
            "0o644",
            "0999",
            "rw-r--r--",
            "17777",
            "00644",
            "-1",
            "+644",
        ] {
            assert!(parse_mode(bad).is_err(), "{bad:?} was taken");
        }
    }

    #[test]
    fn temp_names_sit_beside_the_target_and_differ() {
        let a = temp_name("/srv", "app.bin").unwrap();
        let b = temp_name("/srv", "app.bin").unwrap();
        assert!(a.starts_with("/srv/.app.bin.hatch-upload-"), "{a}");
        assert_ne!(a, b);
        assert!(temp_name("/", "x")
            .unwrap()
            .starts_with("/.x.hatch-upload-"));
    }

    #[test]
    fn rename_request_is_two_ssh_strings() {
        assert_eq!(
            rename_request("/a", "/bc"),
            [0, 0, 0, 2, b'/', b'a', 0, 0, 0, 3, b'/', b'b', b'c']
        );
    }
}
