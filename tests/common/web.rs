//! A guest that serves HTTP and WebSocket (for the proxy tests), and clients for it.
//!
//! Boot one with `d.create_vm(&json!({"user_data": web_user_data(None)}).to_string())`
//! and wait for [`READY_LINE`] on its console (`d.wait_console(id, READY_LINE)`).
//! Everything then listens on the guest's `guest_ip`:
//!
//! | port | path | what |
//! |---|---|---|
//! | 80 | `/index.html` | `hello from HOSTNAME\n` (the guest's hostname: the VM id with `_` -> `-`) |
//! | 80 | `/big.bin` | [`BIG_MIB`] MiB of random bytes, made once on the guest's root disk |
//! | 80 | `/big.sha256` | big.bin's lowercase hex sha256, 64 chars, no newline |
//! | 80 | `/cgi-bin/sha256` | POST: the lowercase hex sha256 of the `Content-Length` bytes of the body, then `\n` |
//! | 80 | `/cgi-bin/slow?N` | sleeps N seconds (an integer), then `slow done\n` |
//! | 80 | [`HEADERS_PATH`] | the request headers, `Name: value\n` each (see below) |
//! | [`WS_PORT`] | any | WebSocket echo (see below) |
//!
//! Port 80 is busybox httpd (1.35). Quirks a proxy test should know about:
//! - One request per connection, no keep-alive. Static files come with
//!   `Connection: close` and a `Content-Length`. A CGI's reply
//!   (`/cgi-bin/...`) is `HTTP/1.1 200 OK` plus only the script's own
//!   `Content-Type: text/plain`: no `Content-Length`, no `Connection` header,
//!   the body ends when httpd closes the connection.
//! - The headers endpoint is a CGI ([`HEADERS_PORT`] is 80): httpd hands every
//!   request header to a CGI as `HTTP_NAME=value` (`Connection` included;
//!   `Content-Type` and the length as `CONTENT_TYPE`/`CONTENT_LENGTH`), so the
//!   names are rebuilt from that: sorted, words capitalized and joined by `-`
//!   (`Host`, `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host`,
//!   `User-Agent`...; one sent as `x_weird-NAME` shows as `X-Weird-Name`). A
//!   header sent twice shows once, with one of its values.
//! - `Expect: 100-continue` is not answered: curl waits its 1 s before sending a
//!   big body anyway (send `-H 'Expect:'` to skip that).
//! - No body size limit: a 32 MiB POST to `/cgi-bin/sha256` works.
//!
//! The WebSocket server (busybox `nc -ll -p 8765 -e /usr/local/bin/ws-echo`,
//! a shell script per connection, connections served concurrently) accepts an
//! upgrade on any path and any `Host`; it needs only `Sec-WebSocket-Key`. It
//! answers each text, binary or continuation frame with an unmasked frame of
//! the same opcode, FIN bit and payload, a ping with a pong, and a close with
//! a close carrying the same status code, then closes the connection. Frames
//! of any length work, but it unmasks in shell arithmetic byte by byte: keep
//! messages to a few hundred bytes under TCG. It never sends pings.
//!
//! Setup: the user-data script writes the files and `/etc/hatch/rc.local`;
//! rc.local (run by the guest's rcS on every boot, after httpd started) makes
//! big.bin if it is missing, starts the WebSocket server, waits until ports 80
//! and [`WS_PORT`] listen and prints [`READY_LINE`] (before the guest's own
//! `hatch-guest: ready`). So a stopped and started VM serves again and prints
//! the ready line again; big.bin (on the root disk) keeps its content.
//! `ssh_public_key` works as with any user-data (checked: root can log in).

#![allow(dead_code)]

use futures_util::{SinkExt, StreamExt};
use std::net::SocketAddr;
use std::time::Duration;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

/// Size of `/big.bin`, in MiB.
pub const BIG_MIB: usize = 32;
/// The WebSocket echo server's port.
pub const WS_PORT: u16 = 8765;
/// The port of the headers endpoint: busybox httpd's own (it is a CGI).
pub const HEADERS_PORT: u16 = 80;
/// The headers endpoint's path.
pub const HEADERS_PATH: &str = "/cgi-bin/headers";
/// The keep-alive server's port (HTTP/1.1 that keeps connections open).
pub const KEEPALIVE_PORT: u16 = 8766;
/// How long the keep-alive server keeps an idle connection, in seconds.
pub const KEEPALIVE_IDLE_SECS: u64 = 4;
/// Printed on the guest's console once every endpoint listens.
pub const READY_LINE: &str = "web-guest: ready";
/// How long [`ws_echo`] may take in all.
pub const WS_TIMEOUT: Duration = Duration::from_secs(60);

/// `/cgi-bin/sha256`: the hash of exactly CONTENT_LENGTH body bytes.
const CGI_SHA256: &str = r#"#!/bin/sh
n=${CONTENT_LENGTH:-0}
case "$n" in '' | *[!0-9]*) n=0 ;; esac
sum=$(head -c "$n" | sha256sum)
printf 'Content-Type: text/plain\r\n\r\n%s\n' "${sum%% *}"
"#;

/// `/cgi-bin/slow?N`: sleeps N seconds.
const CGI_SLOW: &str = r#"#!/bin/sh
n=${QUERY_STRING%%&*}
case "$n" in '' | *[!0-9]*) n=0 ;; esac
sleep "$n"
printf 'Content-Type: text/plain\r\n\r\nslow done\n'
"#;

/// `/cgi-bin/headers`: the request headers httpd passed as HTTP_* variables.
const CGI_HEADERS: &str = r#"#!/bin/sh
printf 'Content-Type: text/plain\r\n\r\n'
[ -n "$CONTENT_TYPE" ] && printf 'Content-Type: %s\n' "$CONTENT_TYPE"
[ -n "$CONTENT_LENGTH" ] && printf 'Content-Length: %s\n' "$CONTENT_LENGTH"
env | sort | awk '
    /^HTTP_[A-Z0-9_]*=/ {
        eq = index($0, "=")
        k = split(tolower(substr($0, 6, eq - 6)), w, "_")
        name = ""
        for (i = 1; i <= k; i++)
            name = name (i > 1 ? "-" : "") toupper(substr(w[i], 1, 1)) substr(w[i], 2)
        print name ": " substr($0, eq + 1)
    }'
"#;

/// One HTTP/1.1 connection on stdin/stdout (nc -e) kept open: every
/// request (headers only) is answered `conn PID request N`, PID naming the
/// connection (this shell) and N counting requests on it, until the client
/// closes or sends nothing for KEEPALIVE_IDLE_SECS.
fn keepalive_sh() -> String {
    format!(
        r#"#!/bin/sh
cr=$(printf '\r')
n=0
while IFS= read -r -t {KEEPALIVE_IDLE_SECS} line; do
    while IFS= read -r -t {KEEPALIVE_IDLE_SECS} h; do
        h=${{h%"$cr"}}
        [ -n "$h" ] || break
    done
    n=$((n + 1))
    body="conn $$ request $n"
    printf 'HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s' "${{#body}}" "$body"
done
"#
    )
}

/// One WebSocket connection on stdin/stdout (nc -e). Bytes are read with
/// `dd bs=1` (one read() each, so nothing past a frame is consumed), turned
/// into numbers by od and written back as printf octal escapes.
pub const WS_ECHO_SH: &str = r#"#!/bin/sh
cr=$(printf '\r')
key=
while IFS= read -r line; do
    line=${line%"$cr"}
    [ -n "$line" ] || break
    case "$line" in
        [Ss][Ee][Cc]-[Ww][Ee][Bb][Ss][Oo][Cc][Kk][Ee][Tt]-[Kk][Ee][Yy]:*)
            key=$(echo ${line#*:})
            ;;
    esac
done
if [ -z "$key" ]; then
    printf 'HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
    exit 0
fi
accept=$(printf '%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11' "$key" | sha1sum | cut -c1-40 | xxd -r -p | base64)
printf 'HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n' "$accept"

# N bytes from the client, as decimal numbers.
bytes() { dd bs=1 count="$1" 2>/dev/null | od -An -tu1 -v; }
# $o = the printf escape of byte $1.
oct() { o="\\$(($1 >> 6))$((($1 >> 3) & 7))$(($1 & 7))"; }
# A frame with first byte $1, length $len and the escaped payload $out.
send() {
    oct "$1"
    hdr=$o
    if [ "$len" -lt 126 ]; then
        oct "$len"
        hdr=$hdr$o
    elif [ "$len" -lt 65536 ]; then
        oct 126
        hdr=$hdr$o
        oct $((len >> 8))
        hdr=$hdr$o
        oct $((len & 255))
        hdr=$hdr$o
    else
        oct 127
        hdr=$hdr$o
        for s in 56 48 40 32 24 16 8 0; do
            oct $(((len >> s) & 255))
            hdr=$hdr$o
        done
    fi
    printf "$hdr$out"
}

while :; do
    set -- $(bytes 2)
    [ $# -eq 2 ] || exit 0
    first=$(($1 & 143))
    op=$(($1 & 15))
    masked=$(($2 >> 7))
    len=$(($2 & 127))
    if [ "$len" -eq 126 ]; then
        set -- $(bytes 2)
        [ $# -eq 2 ] || exit 0
        len=$(($1 * 256 + $2))
    elif [ "$len" -eq 127 ]; then
        set -- $(bytes 8)
        [ $# -eq 8 ] || exit 0
        len=0
        for b; do len=$((len * 256 + b)); done
    fi
    set -- 0 0 0 0
    if [ "$masked" -eq 1 ]; then
        set -- $(bytes 4)
        [ $# -eq 4 ] || exit 0
    fi
    out=
    i=0
    for b in $(bytes "$len"); do
        case $((i & 3)) in
            0) m=$1 ;;
            1) m=$2 ;;
            2) m=$3 ;;
            *) m=$4 ;;
        esac
        oct $((b ^ m))
        out=$out$o
        i=$((i + 1))
    done
    [ "$i" -eq "$len" ] || exit 0
    case "$op" in
        0 | 1 | 2) send "$first" ;;
        8)
            send 136
            exit 0
            ;;
        9) send 138 ;;
    esac
done
"#;

/// Run on every boot by rcS (after httpd): big.bin, the WebSocket server, the ready line.
fn rc_local() -> String {
    let bytes = BIG_MIB * 1024 * 1024;
    format!(
        r#"#!/bin/sh
if [ ! -s /srv/www/big.sha256 ]; then
    head -c {bytes} /dev/urandom >/srv/www/big.bin.new &&
        mv /srv/www/big.bin.new /srv/www/big.bin &&
        sum=$(sha256sum /srv/www/big.bin) &&
        printf %s "${{sum%% *}}" >/srv/www/big.sha256.new &&
        mv /srv/www/big.sha256.new /srv/www/big.sha256 && sync
fi
(while true; do nc -ll -p {WS_PORT} -e /usr/local/bin/ws-echo; sleep 1; done) </dev/null >/dev/null 2>&1 &
(while true; do nc -ll -p {KEEPALIVE_PORT} -e /usr/local/bin/keepalive; sleep 1; done) </dev/null >/dev/null 2>&1 &
listening() {{ netstat -ltn 2>/dev/null | grep -q ":$1 "; }}
i=0
while ! listening 80 || ! listening {WS_PORT} || ! listening {KEEPALIVE_PORT}; do
    i=$((i + 1))
    if [ "$i" -gt 300 ]; then
        echo "web-guest: error: ports 80, {WS_PORT} and {KEEPALIVE_PORT} not listening" >/dev/console
        exit 1
    fi
    usleep 100000
done
if [ "$(wc -c </srv/www/big.bin)" -ne {bytes} ] || [ ! -s /srv/www/big.sha256 ]; then
    echo "web-guest: error: big.bin missing" >/dev/console
    exit 1
fi
echo "{READY_LINE}" >/dev/console
"#
    )
}

/// A `#!/bin/sh` user-data script that makes the guest described in this
/// module's docs. `ssh_public_key` (an OpenSSH public key line), if given, is
/// authorized for root: the guest takes keys from anywhere in user-data, here
/// from a heredoc the script throws away.
pub fn web_user_data(ssh_public_key: Option<&str>) -> String {
    let mut s =
        String::from("#!/bin/sh\n# hatch test fixture: the web guest (tests/common/web.rs)\n");
    if let Some(key) = ssh_public_key {
        let key = key.trim();
        assert!(
            !key.contains('\n') && key != "HATCH_WEB_EOF",
            "one SSH key line expected: {key:?}"
        );
        s += &format!(": <<'HATCH_WEB_EOF'\n{key}\nHATCH_WEB_EOF\n");
    }
    s += "mkdir -p /srv/www/cgi-bin /usr/local/bin /etc/hatch\n";
    s += "printf 'hello from %s\\n' \"$(hostname)\" >/srv/www/index.html\n";
    for (path, body) in [
        ("/srv/www/cgi-bin/sha256", CGI_SHA256.to_string()),
        ("/srv/www/cgi-bin/slow", CGI_SLOW.to_string()),
        ("/srv/www/cgi-bin/headers", CGI_HEADERS.to_string()),
        ("/usr/local/bin/ws-echo", WS_ECHO_SH.to_string()),
        ("/usr/local/bin/keepalive", keepalive_sh()),
        ("/etc/hatch/rc.local", rc_local()),
    ] {
        assert!(!body.contains("\nHATCH_WEB_EOF\n"));
        s += &format!("cat >{path} <<'HATCH_WEB_EOF'\n{body}HATCH_WEB_EOF\nchmod 755 {path}\n");
    }
    s
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(bytes))
}

/// Moves the calling thread into network namespace `ns` (made by `ip netns add`).
fn enter_netns(ns: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let path = format!("/var/run/netns/{ns}");
    let file = std::fs::File::open(&path).map_err(|e| format!("open {path}: {e}"))?;
    // SAFETY: `file` is an open namespace file and stays open for the call;
    // setns only changes this thread's network namespace.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

/// A WebSocket client from inside network namespace `ns`: connects to `addr`
/// (`IP:PORT`), upgrades on `path` with `Host: host`, sends each message as a
/// text frame and reads one text reply for each, then closes cleanly (close
/// frame out, close frame back). Returns the replies, or an error saying which
/// step failed; everything must be done within [`WS_TIMEOUT`].
pub fn ws_echo(
    ns: &str,
    addr: &str,
    host: &str,
    path: &str,
    messages: &[&str],
) -> Result<Vec<String>, String> {
    let addr: SocketAddr = addr
        .parse()
        .map_err(|e| format!("bad address {addr:?} (IP:PORT expected): {e}"))?;
    let url = format!("ws://{host}{path}");
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| format!("bad request {url:?}: {e}"))?;
    let host_value = HeaderValue::from_str(host).map_err(|e| format!("bad host {host:?}: {e}"))?;
    request.headers_mut().insert("Host", host_value);
    let ns = ns.to_string();
    let messages: Vec<String> = messages.iter().map(|m| m.to_string()).collect();
    // A thread of its own: setns moves only the calling thread, and the
    // current-thread runtime makes its sockets on this thread.
    std::thread::spawn(move || {
        enter_netns(&ns)?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("tokio runtime: {e}"))?;
        rt.block_on(async {
            tokio::time::timeout(WS_TIMEOUT, ws_session(addr, request, &messages))
                .await
                .map_err(|_| format!("ws_echo to {addr}: timed out after {WS_TIMEOUT:?}"))?
        })
    })
    .join()
    .map_err(|_| "ws_echo thread panicked".to_string())?
}

async fn ws_session(
    addr: SocketAddr,
    request: tokio_tungstenite::tungstenite::handshake::client::Request,
    messages: &[String],
) -> Result<Vec<String>, String> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let (mut ws, _response) = tokio_tungstenite::client_async(request, stream)
        .await
        .map_err(|e| format!("WebSocket handshake with {addr}: {e}"))?;
    let mut replies = vec![];
    for m in messages {
        ws.send(Message::text(m.as_str()))
            .await
            .map_err(|e| format!("send {m:?}: {e}"))?;
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(t))) => {
                    replies.push(t.to_string());
                    break;
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Ok(other)) => {
                    return Err(format!(
                        "reply to {m:?}: expected a text frame, got {other:?} (replies so far {replies:?})"
                    ))
                }
                Some(Err(e)) => {
                    return Err(format!(
                        "reply to {m:?}: {e} (replies so far {replies:?})"
                    ))
                }
                None => {
                    return Err(format!(
                        "reply to {m:?}: connection ended (replies so far {replies:?})"
                    ))
                }
            }
        }
    }
    ws.close(None)
        .await
        .map_err(|e| format!("send close: {e}"))?;
    // The server's close frame completes the handshake; then the stream ends.
    let mut closed = false;
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(_))) => closed = true,
            Some(Ok(_)) => {}
            Some(Err(WsError::ConnectionClosed)) | None => break,
            Some(Err(e)) => return Err(format!("closing: {e}")),
        }
    }
    if !closed {
        return Err("the server did not answer the close frame".into());
    }
    Ok(replies)
}
