//! Firecracker's API: one short HTTP/1.1 request per call over its Unix socket, with typed bodies.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use serde::{Deserialize, Serialize};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket is not there yet, or not what it must be (a planted symlink, another owner).
    #[error("API socket {path}: {why}")]
    Socket { path: PathBuf, why: String },
    #[error("{method} {uri}: {why}")]
    Transport {
        method: &'static str,
        uri: String,
        why: String,
    },
    /// Firecracker answered with an error: its `fault_message`, as given.
    #[error("{method} {uri}: {status}: {fault}")]
    Fault {
        method: &'static str,
        uri: String,
        status: u16,
        fault: String,
    },
    #[error("{method} {uri}: no answer within {}s", .timeout.as_secs())]
    Timeout {
        method: &'static str,
        uri: String,
        timeout: Duration,
    },
}

/// An API socket checked to be a socket owned by the VM's uid, reached
/// through `/proc/self/fd/N` of an `O_PATH` fd: the name cannot be swapped
/// for a symlink between the check and the connect (the chroot is the VMM's
/// own to write), and sun_path's 108 bytes never limit the data directory.
pub struct Api {
    socket: PathBuf,
    owner: u32,
}

/// Ordinary calls; snapshot create/load pass their own, longer timeout.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl Api {
    pub fn new(socket: PathBuf, owner: u32) -> Api {
        Api { socket, owner }
    }

    fn open_checked(&self) -> Result<OwnedFd, ApiError> {
        use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
        let err = |why: String| ApiError::Socket {
            path: self.socket.clone(),
            why,
        };
        let f = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.socket)
            .map_err(|e| err(e.to_string()))?;
        let meta = f.metadata().map_err(|e| err(e.to_string()))?;
        if !meta.file_type().is_socket() {
            return Err(err("not a socket (refused)".into()));
        }
        if meta.uid() != self.owner {
            return Err(err(format!(
                "owned by uid {}, not the VMM's {} (refused)",
                meta.uid(),
                self.owner
            )));
        }
        Ok(f.into())
    }

    /// True once the socket exists as it must.
    pub fn ready(&self) -> bool {
        self.open_checked().is_ok()
    }

    /// Sends one request; returns the response body (empty on 204).
    pub async fn call<B: Serialize>(
        &self,
        method: &'static str,
        uri: &str,
        body: Option<&B>,
        timeout: Duration,
    ) -> Result<Bytes, ApiError> {
        let fut = self.call_inner(method, uri, body);
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                method,
                uri: uri.to_string(),
                timeout,
            }),
        }
    }

    async fn call_inner<B: Serialize>(
        &self,
        method: &'static str,
        uri: &str,
        body: Option<&B>,
    ) -> Result<Bytes, ApiError> {
        let transport = |why: String| ApiError::Transport {
            method,
            uri: uri.to_string(),
            why,
        };
        let fd = self.open_checked()?;
        let via = format!("/proc/self/fd/{}", fd.as_raw_fd());
        let stream = tokio::net::UnixStream::connect(&via)
            .await
            .map_err(|e| ApiError::Socket {
                path: self.socket.clone(),
                why: e.to_string(),
            })?;
        drop(fd);
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| transport(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let payload = match body {
            Some(b) => Bytes::from(serde_json::to_vec(b).map_err(|e| transport(e.to_string()))?),
            None => Bytes::new(),
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(uri)
            .header(hyper::header::HOST, "localhost")
            .header(hyper::header::ACCEPT, "application/json");
        if body.is_some() {
            req = req.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let req = req
            .body(Full::new(payload))
            .map_err(|e| transport(e.to_string()))?;
        let sent = sender.send_request(req).await;
        let result = async {
            let resp = sent.map_err(|e| transport(e.to_string()))?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(e.to_string()))?
                .to_bytes();
            if status.is_success() {
                return Ok(body);
            }
            Err(ApiError::Fault {
                method,
                uri: uri.to_string(),
                status: status.as_u16(),
                fault: fault_message(&body),
            })
        }
        .await;
        // One request per connection: closing ours ends the connection task.
        drop(sender);
        conn.abort();
        result
    }

    pub async fn put<B: Serialize>(&self, uri: &str, body: &B) -> Result<(), ApiError> {
        self.call("PUT", uri, Some(body), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    pub async fn patch<B: Serialize>(&self, uri: &str, body: &B) -> Result<(), ApiError> {
        self.call("PATCH", uri, Some(body), CALL_TIMEOUT)
            .await
            .map(drop)
    }

    pub async fn action(&self, action: ActionType) -> Result<(), ApiError> {
        self.put(
            "/actions",
            &Action {
                action_type: action,
            },
        )
        .await
    }

    /// What `GET /` says the instance is doing.
    pub async fn state(&self) -> Result<InstanceState, ApiError> {
        let body = self.call::<()>("GET", "/", None, CALL_TIMEOUT).await?;
        let info: InstanceInfo =
            serde_json::from_slice(&body).map_err(|e| ApiError::Transport {
                method: "GET",
                uri: "/".into(),
                why: format!("unexpected answer: {e}"),
            })?;
        Ok(info.state)
    }
}

/// Firecracker's error body is `{"fault_message": "..."}`; anything else is shown as it came.
fn fault_message(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Fault {
        fault_message: String,
    }
    match serde_json::from_slice::<Fault>(body) {
        Ok(f) => f.fault_message,
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum InstanceState {
    #[serde(rename = "Not started")]
    NotStarted,
    Running,
    Paused,
}

#[derive(Debug, Deserialize)]
struct InstanceInfo {
    state: InstanceState,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

#[derive(Debug, Serialize)]
struct Action {
    action_type: ActionType,
}

/// Paths below are as Firecracker sees them: inside its chroot.
#[derive(Debug, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub boot_args: String,
}

#[derive(Debug, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
}

#[derive(Debug, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
}

#[derive(Debug, Serialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    pub guest_mac: String,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

#[derive(Debug, Serialize)]
pub struct VmStateChange {
    pub state: VmState,
}

#[derive(Debug, Serialize)]
pub enum SnapshotType {
    Full,
}

#[derive(Debug, Serialize)]
pub struct SnapshotCreate {
    pub snapshot_type: SnapshotType,
    pub snapshot_path: String,
    pub mem_file_path: String,
}

#[derive(Debug, Serialize)]
pub enum MemBackendType {
    File,
}

#[derive(Debug, Serialize)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

#[derive(Debug, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Debug, Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemBackend,
    pub resume_vm: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_are_what_the_swagger_names() {
        let j = |v: &dyn erased::Ser| v.json();
        assert_eq!(
            j(&Action {
                action_type: ActionType::InstanceStart
            }),
            r#"{"action_type":"InstanceStart"}"#
        );
        assert_eq!(
            j(&VmStateChange {
                state: VmState::Paused
            }),
            r#"{"state":"Paused"}"#
        );
        assert_eq!(
            j(&SnapshotLoad {
                snapshot_path: "/vmstate".into(),
                mem_backend: MemBackend {
                    backend_type: MemBackendType::File,
                    backend_path: "/memory".into()
                },
                resume_vm: false,
                network_overrides: vec![NetworkOverride {
                    iface_id: "eth0".into(),
                    host_dev_name: "htx".into()
                }],
            }),
            r#"{"snapshot_path":"/vmstate","mem_backend":{"backend_type":"File","backend_path":"/memory"},"resume_vm":false,"network_overrides":[{"iface_id":"eth0","host_dev_name":"htx"}]}"#
        );
        let s: InstanceInfo = serde_json::from_str(
            r#"{"id":"a","state":"Not started","vmm_version":"1","app_name":"Firecracker"}"#,
        )
        .unwrap();
        assert_eq!(s.state, InstanceState::NotStarted);
        assert_eq!(
            fault_message(br#"{"fault_message":"The requested operation is not supported after starting the microVM."}"#),
            "The requested operation is not supported after starting the microVM."
        );
        assert_eq!(fault_message(b"oops"), "oops");
    }

    /// A socket reached through a symlink, or owned by another uid, is
    /// refused before anything is sent; the real one is used, and a fault
    /// comes back with Firecracker's own words. The server is a fake (a
    /// few lines of HTTP), as the point is the client's checks.
    #[tokio::test]
    async fn a_planted_socket_is_refused_and_faults_pass_through() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("hatch-fc-api-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move {
            for (status, body) in [
                ("200 OK", r#"{"state":"Paused"}"#),
                ("400 Bad Request", r#"{"fault_message":"no, sir"}"#),
            ] {
                let answer = format!(
                    "HTTP/1.1 {status}\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                );
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await.unwrap();
                s.write_all(answer.as_bytes()).await.unwrap();
            }
        });
        let link = dir.join("planted.sock");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        let e = Api::new(link, me).state().await.unwrap_err().to_string();
        assert!(e.contains("not a socket (refused)"), "{e}");
        let e = Api::new(sock.clone(), me + 1)
            .state()
            .await
            .unwrap_err()
            .to_string();
        assert!(e.contains("owned by uid"), "{e}");
        let api = Api::new(sock, me);
        assert_eq!(api.state().await.unwrap(), InstanceState::Paused);
        let e = api
            .action(ActionType::InstanceStart)
            .await
            .unwrap_err()
            .to_string();
        assert_eq!(e, "PUT /actions: 400: no, sir");
        server.await.unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    mod erased {
        pub trait Ser {
            fn json(&self) -> String;
        }
        impl<T: serde::Serialize> Ser for T {
            fn json(&self) -> String {
                serde_json::to_string(self).unwrap()
            }
        }
    }
}
