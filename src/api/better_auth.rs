//! API keys verified by a Better Auth instance (`HATCH_BETTER_AUTH_VERIFY_URL`), with a short cache of accepted keys.

use crate::config::BetterAuthConfig;
use crate::store::Owner;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The owner rows of Better Auth users are marked with this provider name.
pub const PROVIDER: &str = "better-auth";

/// A verifier answer is two fields; anything longer is not one.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Accepted keys remembered at most; a full cache forgets the entry closest to expiry.
const CACHE_CAPACITY: usize = 10_000;

/// What the verifier said about a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 200 with `valid: true` and this (checked) user id.
    Valid(String),
    /// Any other status, `valid: false`, or no user id.
    Invalid,
}

/// The verifier could not give an answer: the request is a 500, never a 401.
/// The message goes to an unauthenticated caller, so it names no address and
/// repeats nothing the verifier said; `detail` is for the daemon's log.
#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("the Better Auth verifier did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the Better Auth verifier could not be reached")]
    Unreachable(String),
    #[error("the Better Auth verifier gave an answer that is not {{\"valid\", \"userId\"}} JSON")]
    Garbled(String),
    #[error("the Better Auth verifier answered with a userId hatch does not accept")]
    BadUserId(String),
}

impl VerifyError {
    pub fn detail(&self) -> &str {
        match self {
            VerifyError::Timeout(_) => "",
            VerifyError::Unreachable(d) | VerifyError::Garbled(d) | VerifyError::BadUserId(d) => d,
        }
    }
}

/// The client side of the verify endpoint the Hatch web app serves.
pub struct BetterAuth {
    client: reqwest::Client,
    url: String,
    timeout: Duration,
    cache: KeyCache,
}

impl BetterAuth {
    pub fn new(cfg: &BetterAuthConfig) -> Result<BetterAuth, String> {
        let client = reqwest::Client::builder()
            .timeout(cfg.timeout)
            // A redirect would turn the POST into a GET somewhere else: refuse it (a 3xx is a 401).
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("hatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("building the Better Auth HTTP client: {e}"))?;
        Ok(BetterAuth {
            client,
            url: cfg.verify_url.clone(),
            timeout: cfg.timeout,
            cache: KeyCache::new(cfg.cache_ttl, CACHE_CAPACITY),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn cache_ttl(&self) -> Duration {
        self.cache.ttl
    }

    /// The owner of a key accepted within the cache time, by the key's hash.
    pub fn cached(&self, key_hash: &str) -> Option<Owner> {
        self.cache.get(key_hash, Instant::now())
    }

    /// Remembers an accepted key (never a refusal or an error).
    pub fn remember(&self, key_hash: &str, owner: &Owner) {
        self.cache.put(key_hash, owner.clone(), Instant::now());
    }

    /// `POST {"key": KEY}` to the verify URL.
    pub async fn verify(&self, key: &str) -> Result<Verdict, VerifyError> {
        // The client's timeout covers the request; this one also covers reading the answer.
        match tokio::time::timeout(self.timeout, self.ask(key)).await {
            Ok(r) => r,
            Err(_) => Err(VerifyError::Timeout(self.timeout)),
        }
    }

    async fn ask(&self, key: &str) -> Result<Verdict, VerifyError> {
        let sent = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(reqwest::header::ACCEPT, "application/json")
            .body(serde_json::json!({ "key": key }).to_string())
            .send()
            .await;
        let mut resp = match sent {
            Ok(r) => r,
            Err(e) if e.is_timeout() => return Err(VerifyError::Timeout(self.timeout)),
            Err(e) => return Err(VerifyError::Unreachable(error_chain(&e))),
        };
        if resp.status() != reqwest::StatusCode::OK {
            return Ok(Verdict::Invalid);
        }
        let mut body = Vec::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                        return Err(VerifyError::Garbled(format!(
                            "longer than {MAX_ANSWER_BYTES} bytes"
                        )));
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if e.is_timeout() => return Err(VerifyError::Timeout(self.timeout)),
                Err(e) => return Err(VerifyError::Unreachable(error_chain(&e))),
            }
        }
        parse_answer(&body)
    }
}

/// reqwest's top-level message alone ("error sending request") hides the cause.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[derive(serde::Deserialize)]
struct Answer {
    valid: bool,
    #[serde(rename = "userId", default)]
    user_id: Option<String>,
}

/// The body of a 200: `valid` must be a boolean; a valid key needs a usable user id.
pub fn parse_answer(body: &[u8]) -> Result<Verdict, VerifyError> {
    let answer: Answer =
        serde_json::from_slice(body).map_err(|e| VerifyError::Garbled(e.to_string()))?;
    let user_id = answer.user_id.as_deref().unwrap_or_default().trim();
    if !answer.valid || user_id.is_empty() {
        return Ok(Verdict::Invalid);
    }
    check_user_id(user_id).map_err(VerifyError::BadUserId)?;
    Ok(Verdict::Valid(user_id.to_string()))
}

/// Better Auth's ids are short alphanumeric strings (UUIDs with some id
/// generators); anything else from the verifier is refused rather than stored.
fn check_user_id(id: &str) -> Result<(), String> {
    let ok = id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "userId {:?} is not 1-128 letters, digits and -_.:@",
            id.chars().take(140).collect::<String>()
        ))
    }
}

/// Accepted keys by SHA-256 hash, each until its expiry; bounded in size.
struct KeyCache {
    ttl: Duration,
    capacity: usize,
    entries: Mutex<HashMap<String, (Owner, Instant)>>,
}

impl KeyCache {
    fn new(ttl: Duration, capacity: usize) -> KeyCache {
        KeyCache {
            ttl,
            capacity,
            entries: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, key_hash: &str, now: Instant) -> Option<Owner> {
        let mut entries = self.entries.lock().unwrap();
        match entries.get(key_hash) {
            Some((owner, expires)) if *expires > now => Some(owner.clone()),
            Some(_) => {
                entries.remove(key_hash);
                None
            }
            None => None,
        }
    }

    fn put(&self, key_hash: &str, owner: Owner, now: Instant) {
        if self.ttl.is_zero() || self.capacity == 0 {
            return;
        }
        let mut entries = self.entries.lock().unwrap();
        if entries.len() >= self.capacity && !entries.contains_key(key_hash) {
            entries.retain(|_, (_, expires)| *expires > now);
            if entries.len() >= self.capacity {
                let soonest = entries
                    .iter()
                    .min_by_key(|(_, (_, expires))| *expires)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    entries.remove(&k);
                }
            }
        }
        entries.insert(key_hash.to_string(), (owner, now + self.ttl));
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.entries.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(id: &str) -> Owner {
        Owner {
            id: id.into(),
            name: format!("{PROVIDER}:{id}"),
            created_at: "2026-01-01T00:00:00Z".into(),
        }
    }

    #[test]
    fn answers() {
        let v = |s: &str| parse_answer(s.as_bytes()).map_err(|e| e.to_string());
        assert_eq!(
            v(r#"{"valid": true, "userId": "u1"}"#),
            Ok(Verdict::Valid("u1".into()))
        );
        assert_eq!(
            v(r#"{"valid": true, "userId": " u1 ", "extra": 1}"#),
            Ok(Verdict::Valid("u1".into()))
        );
        assert_eq!(
            v(r#"{"valid": false, "userId": "u1"}"#),
            Ok(Verdict::Invalid)
        );
        assert_eq!(v(r#"{"valid": true, "userId": ""}"#), Ok(Verdict::Invalid));
        assert_eq!(v(r#"{"valid": true}"#), Ok(Verdict::Invalid));
        assert_eq!(v(r#"{"valid": false}"#), Ok(Verdict::Invalid));
        for garbled in [
            "",
            "<html>",
            "{}",
            r#"{"valid": "yes", "userId": "u1"}"#,
            r#"{"valid": true, "userId": 7}"#,
            r#"{"valid": true, "userId": "a/../b"}"#,
            r#"{"valid": true, "userId": "line\nbreak"}"#,
        ] {
            assert!(v(garbled).is_err(), "{garbled:?} is not an answer");
        }
        let long = format!(r#"{{"valid": true, "userId": "{}"}}"#, "a".repeat(129));
        assert!(v(&long).is_err());
    }

    #[test]
    fn cache_keeps_accepted_keys_until_their_time() {
        let c = KeyCache::new(Duration::from_secs(30), 10);
        let t0 = Instant::now();
        c.put("h1", owner("a"), t0);
        assert_eq!(c.get("h1", t0 + Duration::from_secs(29)).unwrap().id, "a");
        assert!(c.get("h1", t0 + Duration::from_secs(30)).is_none());
        assert_eq!(c.len(), 0, "an expired entry is dropped when seen");
        assert!(c.get("h2", t0).is_none());
    }

    #[test]
    fn cache_off_with_zero_ttl() {
        let c = KeyCache::new(Duration::ZERO, 10);
        c.put("h1", owner("a"), Instant::now());
        assert!(c.get("h1", Instant::now()).is_none());
    }

    #[test]
    fn cache_is_bounded() {
        let c = KeyCache::new(Duration::from_secs(30), 3);
        let t0 = Instant::now();
        for (i, h) in ["h1", "h2", "h3"].iter().enumerate() {
            c.put(h, owner(h), t0 + Duration::from_secs(i as u64));
        }
        // Full: the entry that expires first makes room.
        c.put("h4", owner("h4"), t0 + Duration::from_secs(3));
        assert_eq!(c.len(), 3);
        let now = t0 + Duration::from_secs(4);
        assert!(c.get("h1", now).is_none());
        for h in ["h2", "h3", "h4"] {
            assert!(c.get(h, now).is_some(), "{h}");
        }
        // Expired entries go first.
        c.put("h5", owner("h5"), t0 + Duration::from_secs(32));
        assert_eq!(c.len(), 2, "h2 and h3 expired and were swept");
        assert!(c.get("h4", t0 + Duration::from_secs(32)).is_some());
        assert!(c.get("h5", t0 + Duration::from_secs(32)).is_some());
    }
}
