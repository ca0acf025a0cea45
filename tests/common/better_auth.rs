//! A real Better Auth server for the API-key tests: `tests/better-auth/server.mjs`
//! (npm `better-auth` with its API-key plugin on SQLite) run by Node on the
//! loopback of a daemon's namespace, and a client for Better Auth's own HTTP
//! API (sign-up, sign-in, api-key create/update/delete) driven with curl.

use super::{wait_until, Daemon};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Where the server listens, inside the daemon's namespace.
pub const ADDR: &str = "127.0.0.1:3000";

/// The verify route the daemon is pointed at (the Hatch web app's path).
pub fn verify_url() -> String {
    format!("http://{ADDR}/api/auth/api-key/verify")
}

fn server_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/better-auth")
}

/// A signed-in Better Auth user: its id and the cookie jar holding its session.
pub struct User {
    pub id: String,
    jar: PathBuf,
}

/// An API key made through Better Auth: the secret and Better Auth's id for it.
pub struct Key {
    pub key: String,
    pub id: String,
}

pub struct BetterAuthServer {
    ns: String,
    dir: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl BetterAuthServer {
    /// Starts the server in `d`'s namespace with a fresh SQLite file and waits until it answers.
    pub fn start(d: &Daemon) -> BetterAuthServer {
        let dir = d.data_dir.join("better-auth");
        std::fs::create_dir_all(&dir).unwrap();
        assert!(
            server_dir().join("node_modules/better-auth").exists(),
            "tests/better-auth/node_modules is missing: scripts/test runs `npm ci` there"
        );
        let log = dir.join("server.log");
        let out = std::fs::File::create(&log).unwrap();
        let (host, port) = ADDR.split_once(':').unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &d.ns, "node"])
            .arg(server_dir().join("server.mjs"))
            .args(["--host", host, "--port", port, "--db"])
            .arg(dir.join("auth.db"))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start node tests/better-auth/server.mjs");
        let mut s = BetterAuthServer {
            ns: d.ns.clone(),
            dir,
            log,
            child: Some(child),
        };
        wait_until(
            "the Better Auth server answers",
            Duration::from_secs(60),
            || {
                if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                    panic!("better-auth server exited ({st}): {}", s.log());
                }
                s.request(None, "GET", "/__test/health", None).0 == 200
            },
        );
        s
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Stops the server: the verifier becomes unreachable.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // `ip netns exec` execs node, so this pid is the server itself.
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Test-only switch of the verify route's behaviour (see server.mjs).
    pub fn set_verify_mode(&self, mode: &str) {
        let (status, body) = self.request(
            None,
            "POST",
            "/__test/verify-mode",
            Some(json!({ "mode": mode })),
        );
        assert_eq!(status, 200, "verify mode {mode}: {body}");
    }

    /// One request with curl inside the namespace; `jar` carries a session cookie.
    /// Browsers send Origin, and Better Auth checks it on cookie requests.
    fn request(
        &self,
        jar: Option<&Path>,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let origin = format!("Origin: http://{ADDR}");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, "curl", "-sS", "--max-time", "30"])
            .args(["-X", method, "-H", &origin]);
        if let Some(jar) = jar {
            cmd.arg("-b").arg(jar).arg("-c").arg(jar);
        }
        if let Some(b) = body {
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        cmd.args(["-w", "\n%{http_code}"])
            .arg(format!("http://{ADDR}{path}"));
        let out = cmd.output().expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let (text, code) = stdout.rsplit_once('\n').unwrap_or(("", "000"));
        (
            code.trim().parse().unwrap_or(0),
            serde_json::from_str(text).unwrap_or(Value::String(text.to_string())),
        )
    }

    /// `POST /api/auth/sign-up/email`: a new user with email and password.
    pub fn sign_up(&self, email: &str, password: &str, name: &str) -> User {
        let jar = self.dir.join(format!("signup-{email}.jar"));
        let (status, body) = self.request(
            Some(&jar),
            "POST",
            "/api/auth/sign-up/email",
            Some(json!({ "email": email, "password": password, "name": name })),
        );
        assert_eq!(status, 200, "sign up {email}: {body}");
        User {
            id: body["user"]["id"].as_str().expect("user id").to_string(),
            jar,
        }
    }

    /// `POST /api/auth/sign-in/email`: a fresh session in a fresh cookie jar.
    pub fn sign_in(&self, email: &str, password: &str) -> User {
        let jar = self.dir.join(format!("signin-{email}.jar"));
        let _ = std::fs::remove_file(&jar);
        let (status, body) = self.request(
            Some(&jar),
            "POST",
            "/api/auth/sign-in/email",
            Some(json!({ "email": email, "password": password })),
        );
        assert_eq!(status, 200, "sign in {email}: {body}");
        let (status, session) = self.request(Some(&jar), "GET", "/api/auth/get-session", None);
        assert_eq!(status, 200, "get-session: {session}");
        assert_eq!(session["user"]["email"], email, "{session}");
        User {
            id: body["user"]["id"].as_str().expect("user id").to_string(),
            jar,
        }
    }

    /// `POST /api/auth/api-key/create` with the user's session.
    pub fn create_key(&self, user: &User, name: &str) -> Key {
        let (status, body) = self.request(
            Some(&user.jar),
            "POST",
            "/api/auth/api-key/create",
            Some(json!({ "name": name })),
        );
        assert_eq!(status, 200, "create key: {body}");
        assert_eq!(body["referenceId"], user.id.as_str(), "{body}");
        Key {
            key: body["key"].as_str().expect("key").to_string(),
            id: body["id"].as_str().expect("key id").to_string(),
        }
    }

    /// `POST /api/auth/api-key/delete`.
    pub fn delete_key(&self, user: &User, key: &Key) {
        let (status, body) = self.request(
            Some(&user.jar),
            "POST",
            "/api/auth/api-key/delete",
            Some(json!({ "keyId": key.id })),
        );
        assert_eq!(status, 200, "delete key: {body}");
    }

    /// `POST /api/auth/api-key/update` with `enabled: false`.
    pub fn disable_key(&self, user: &User, key: &Key) {
        let (status, body) = self.request(
            Some(&user.jar),
            "POST",
            "/api/auth/api-key/update",
            Some(json!({ "keyId": key.id, "enabled": false })),
        );
        assert_eq!(status, 200, "disable key: {body}");
        assert_eq!(body["enabled"], false, "{body}");
    }
}

impl Drop for BetterAuthServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- better-auth server log ----\n{}", self.log());
        }
    }
}
