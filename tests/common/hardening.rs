//! Helpers for the hostile-client tests: the daemon's memory, and raw TCP
//! connections to the API from inside the daemon's namespace.

use super::Daemon;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

impl Daemon {
    /// The `hatch serve` process (`ip netns exec` execs it, same pid).
    pub fn daemon_pid(&self) -> u32 {
        let pid = self.child.as_ref().expect("the daemon runs").id();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_eq!(comm.trim(), "hatch", "pid {pid} is not the daemon");
        pid
    }

    /// The daemon's resident memory in KiB (`VmRSS` of /proc/PID/status).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.daemon_pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// A TCP connection to `addr` made from inside the daemon's namespace.
    pub fn connect(&self, addr: &str) -> TcpStream {
        let ns = self.ns.clone();
        let addr = addr.to_string();
        // setns changes only the calling thread's namespace: a thread of its own.
        std::thread::spawn(move || {
            enter_netns(&ns);
            TcpStream::connect(&addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"))
        })
        .join()
        .expect("connect thread")
    }
}

fn enter_netns(ns: &str) {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
    // SAFETY: `file` is an open namespace file for the whole call; setns
    // changes only this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
}

/// An HTTP/1.1 client on one kept-alive connection, for many small requests.
pub struct RawClient {
    reader: BufReader<TcpStream>,
}

impl RawClient {
    pub fn new(stream: TcpStream) -> RawClient {
        stream
            .set_read_timeout(Some(Duration::from_secs(120)))
            .unwrap();
        RawClient {
            reader: BufReader::new(stream),
        }
    }

    /// The connection itself, e.g. to watch it being closed.
    pub fn into_stream(self) -> TcpStream {
        self.reader.into_inner()
    }

    /// Sends one request with an empty body and returns (status, body).
    pub fn request(&mut self, method: &str, path: &str, key: &str) -> (u16, String) {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\nContent-Length: 0\r\n\r\n"
        );
        self.reader.get_mut().write_all(req.as_bytes()).unwrap();
        self.response()
    }

    /// Reads one response with a Content-Length body.
    pub fn response(&mut self) -> (u16, String) {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not a status line: {line:?}"));
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h).unwrap();
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                if k.eq_ignore_ascii_case("content-length") {
                    len = v.trim().parse().unwrap();
                }
            }
        }
        let mut body = vec![0u8; len];
        self.reader.read_exact(&mut body).unwrap();
        (status, String::from_utf8_lossy(&body).into_owned())
    }
}

/// Waits (up to `limit`) for the peer to close `stream`: true if it did.
pub fn closed_within(stream: &mut TcpStream, limit: Duration) -> bool {
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            // A response before the close (such as a 408) is fine.
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A random lowercase string of `len` characters (not an id of ours).
pub fn junk(len: usize) -> String {
    let mut bytes = vec![0u8; len];
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(&mut bytes)
        .unwrap();
    bytes.iter().map(|b| (b'a' + b % 26) as char).collect()
}
