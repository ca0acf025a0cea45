//! Guest memory as a stream: the FIFO a VMM saves into while the daemon
//! uploads it, or loads from while the daemon feeds it
//! (`MemoryTransport::Stream`).

use std::path::Path;

/// A 1 MiB pipe buffer (the default is 64 KiB): fewer, larger hand-overs
/// between the VMM and the daemon. Best effort: a smaller limit still works.
pub fn grow_pipe(pipe: &impl std::os::fd::AsRawFd) {
    // SAFETY: F_SETPIPE_SZ on an open pipe fd only changes its capacity.
    unsafe {
        libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20);
    }
}

pub fn make_fifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let _ = std::fs::remove_file(path);
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A FIFO the VMM writes guest memory into while the daemon uploads it.
/// The reader is opened first (non-blocking, so a VMM that never starts
/// writing cannot hang us); `keeper` is a write end held by us, so the reader
/// sees no end of stream before the VMM's writer has come and gone.
pub struct MemoryPipe {
    pub reader: tokio::net::unix::pipe::Receiver,
    pub keeper: std::fs::File,
}

impl MemoryPipe {
    pub fn open(path: &Path) -> std::io::Result<MemoryPipe> {
        use std::os::unix::fs::OpenOptionsExt;
        make_fifo(path)?;
        let reader = tokio::net::unix::pipe::OpenOptions::new().open_receiver(path)?;
        grow_pipe(&reader);
        let keeper = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)?;
        Ok(MemoryPipe { reader, keeper })
    }
}
