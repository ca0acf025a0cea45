//! A minimal QMP (QEMU Machine Protocol) client: one connection per operation.

use serde_json::{json, Value};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Interest};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub async fn connect(path: &Path) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|e| format!("connect {}: {e}", path.display()))?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(format!("unexpected greeting: {greeting}"));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    async fn read_message(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        let n = tokio::time::timeout(REPLY_TIMEOUT, self.reader.read_line(&mut line))
            .await
            .map_err(|_| "no reply from QEMU".to_string())?
            .map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("QEMU closed the control socket".into());
        }
        serde_json::from_str(&line).map_err(|e| format!("bad QMP message {line:?}: {e}"))
    }

    /// Runs one command and returns its `return` value; events in between are skipped.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, String> {
        self.execute_inner(command, arguments, None).await
    }

    /// Like `execute`, passing `fd` along with the command (SCM_RIGHTS), as
    /// QMP's `getfd` wants: QEMU then holds its own copy of the file.
    pub async fn execute_with_fd(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: RawFd,
    ) -> Result<Value, String> {
        self.execute_inner(command, arguments, Some(fd)).await
    }

    /// One `sendmsg` carrying all of `bytes` and `fd` (a QMP command is small).
    async fn send_with_fd(&mut self, bytes: &[u8], fd: RawFd) -> Result<(), String> {
        let stream = self.writer.as_ref();
        let sock = stream.as_raw_fd();
        loop {
            stream.writable().await.map_err(|e| e.to_string())?;
            let sent = stream.try_io(Interest::WRITABLE, || {
                // SAFETY: the msghdr points at locals (the iovec over `bytes`,
                // a control buffer sized by CMSG_SPACE for one int) that live
                // across the call; CMSG_FIRSTHDR of that buffer is non-null.
                unsafe {
                    let mut iov = libc::iovec {
                        iov_base: bytes.as_ptr() as *mut libc::c_void,
                        iov_len: bytes.len(),
                    };
                    let space = libc::CMSG_SPACE(std::mem::size_of::<RawFd>() as u32) as usize;
                    let mut control = vec![0u8; space];
                    let mut msg: libc::msghdr = std::mem::zeroed();
                    msg.msg_iov = &mut iov;
                    msg.msg_iovlen = 1;
                    msg.msg_control = control.as_mut_ptr().cast();
                    msg.msg_controllen = space as _;
                    let cmsg = libc::CMSG_FIRSTHDR(&msg);
                    (*cmsg).cmsg_level = libc::SOL_SOCKET;
                    (*cmsg).cmsg_type = libc::SCM_RIGHTS;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<RawFd>() as u32) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<RawFd>(), fd);
                    let n = libc::sendmsg(sock, &msg, libc::MSG_NOSIGNAL);
                    if n < 0 {
                        Err(std::io::Error::last_os_error())
                    } else {
                        Ok(n as usize)
                    }
                }
            });
            match sent {
                Ok(n) if n == bytes.len() => return Ok(()),
                Ok(n) => {
                    return Err(format!(
                        "QMP command cut short ({n} of {} bytes)",
                        bytes.len()
                    ))
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    async fn execute_inner(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<RawFd>,
    ) -> Result<Value, String> {
        let mut msg = json!({ "execute": command });
        if let Some(args) = arguments {
            msg["arguments"] = args;
        }
        let mut line = msg.to_string();
        line.push('\n');
        match fd {
            None => self
                .writer
                .write_all(line.as_bytes())
                .await
                .map_err(|e| e.to_string())?,
            Some(fd) => self.send_with_fd(line.as_bytes(), fd).await?,
        }
        loop {
            let reply = self.read_message().await?;
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let desc = err
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error");
                return Err(format!("{command}: {desc}"));
            }
        }
    }
}
