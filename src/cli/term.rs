//! The local terminal for `vm exec -t` and `vm ssh`: raw mode that is always undone, and the window size.

use super::client::CliError;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use std::io::IsTerminal;
use std::os::fd::{AsFd, AsRawFd};

/// Whether standard input is a terminal (what `-t` needs unless forced).
pub fn stdin_is_terminal() -> bool {
    std::io::stdin().is_terminal()
}

/// The terminal's size as (cols, rows): standard input's, else standard
/// output's; None when neither is a terminal (or it reports 0x0).
pub fn window_size() -> Option<(u16, u16)> {
    [
        std::io::stdin().as_fd().as_raw_fd(),
        std::io::stdout().as_fd().as_raw_fd(),
    ]
    .into_iter()
    .find_map(size_of)
}

fn size_of(fd: i32) -> Option<(u16, u16)> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` through the pointer, which
    // points at a live, properly aligned local; on a non-terminal fd it
    // fails with ENOTTY and writes nothing.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_col > 0 && ws.ws_row > 0).then_some((ws.ws_col, ws.ws_row))
}

/// Standard input in raw mode while this lives: every key, Ctrl-C and
/// Ctrl-D included, becomes a byte for the remote terminal, and nothing is
/// echoed locally (the remote side echoes). Dropping it (a normal end, an
/// error, a panic's unwinding) puts the saved settings back.
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    pub fn enter() -> Result<RawMode, CliError> {
        let stdin = std::io::stdin();
        let saved = tcgetattr(stdin.as_fd())
            .map_err(|e| CliError::Other(format!("reading the terminal's settings: {e}")))?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // TCSADRAIN, not TCSAFLUSH: keys typed before the session opened are
        // kept and reach the remote side instead of being thrown away.
        tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &raw)
            .map_err(|e| CliError::Other(format!("putting the terminal in raw mode: {e}")))?;
        Ok(RawMode { saved })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(std::io::stdin().as_fd(), SetArg::TCSADRAIN, &self.saved);
    }
}
