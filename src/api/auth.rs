//! API keys, in `Authorization: Bearer KEY` or `X-API-Key: KEY` (docs/API.md, "Authentication").
//! Built-in keys are random, shown once, and stored only as SHA-256 hashes;
//! with `HATCH_BETTER_AUTH_VERIFY_URL` set, a Better Auth instance decides instead.

use super::better_auth::{self, BetterAuth, Verdict};
use super::{ApiError, AppState};
use crate::config::AuthConfig;
use crate::store::{Owner, Store, StoreError};
use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::Response;
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// A fresh API key: `hk_` and 40 random characters.
pub fn new_key() -> String {
    format!("hk_{}", crate::ids::random_string(40))
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// No real key is longer; a longer one is refused before any lookup or verifier call.
const MAX_KEY_LEN: usize = 512;

/// Decides who a key belongs to.
pub struct Authenticator {
    /// None: the built-in keys (`hatch keys`). Some: Better Auth alone decides;
    /// built-in keys are then not accepted, so there is one source of truth.
    better_auth: Option<BetterAuth>,
}

impl Authenticator {
    pub fn new(cfg: &AuthConfig) -> Result<Authenticator, String> {
        Ok(Authenticator {
            better_auth: cfg.better_auth.as_ref().map(BetterAuth::new).transpose()?,
        })
    }

    /// One line for the start-up log.
    pub fn describe(&self) -> String {
        match &self.better_auth {
            None => "built-in keys (hatch keys)".into(),
            Some(ba) => format!(
                "Better Auth at {} (accepted keys cached {}s; built-in keys are not accepted)",
                ba.url(),
                ba.cache_ttl().as_secs_f64()
            ),
        }
    }

    /// The owner of `key`: 401 for a key nobody accepts, 500 when the verifier cannot answer.
    pub async fn owner_of(&self, store: &Store, key: &str) -> Result<Owner, ApiError> {
        if key.is_empty() || key.len() > MAX_KEY_LEN || !key.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(invalid_key());
        }
        let hash = hash_key(key);
        let Some(ba) = &self.better_auth else {
            return store
                .owner_by_key_hash(&hash)
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?
                .ok_or_else(invalid_key);
        };
        if let Some(owner) = ba.cached(&hash) {
            return Ok(owner);
        }
        let user_id = match ba.verify(key).await {
            Ok(Verdict::Valid(user_id)) => user_id,
            Ok(Verdict::Invalid) => return Err(invalid_key()),
            Err(e) => {
                tracing::warn!(
                    url = ba.url(),
                    detail = e.detail(),
                    "API key verification failed: {e}"
                );
                return Err(ApiError::Internal(format!(
                    "could not verify the API key: {e}"
                )));
            }
        };
        let owner = store
            .external_owner(
                better_auth::PROVIDER,
                &user_id,
                &crate::ids::new_id("own"),
                &format!("{}:{user_id}", better_auth::PROVIDER),
            )
            .await
            .map_err(|e| match e {
                StoreError::Conflict(m) => ApiError::Internal(m),
                e => ApiError::Internal(e.to_string()),
            })?;
        ba.remember(&hash, &owner);
        Ok(owner)
    }
}

fn invalid_key() -> ApiError {
    ApiError::Unauthorized("invalid API key".into())
}

fn key_from_headers(headers: &HeaderMap) -> Option<Result<String, ApiError>> {
    if let Some(v) = headers.get(axum::http::header::AUTHORIZATION) {
        let v = v.to_str().unwrap_or_default().trim();
        return Some(match v.split_once(' ') {
            Some((scheme, key))
                if scheme.eq_ignore_ascii_case("bearer") && !key.trim().is_empty() =>
            {
                Ok(key.trim().to_string())
            }
            _ => Err(ApiError::Unauthorized(
                "the Authorization header must be \"Bearer YOUR_API_KEY\"".into(),
            )),
        });
    }
    headers
        .get("x-api-key")
        .map(|v| Ok(v.to_str().unwrap_or_default().trim().to_string()))
}

pub async fn require_key(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let key = match key_from_headers(req.headers()) {
        None => {
            return Err(ApiError::Unauthorized(
                "missing API key: send Authorization: Bearer KEY or X-API-Key: KEY".into(),
            ))
        }
        Some(k) => k?,
    };
    let owner = state.auth.owner_of(state.manager.store(), &key).await?;
    req.extensions_mut().insert(owner);
    Ok(next.run(req).await)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn reads_either_header() {
        let k = |h: HeaderMap| key_from_headers(&h).map(|r| r.map_err(|e| e.to_string()));
        assert_eq!(
            k(headers(&[("authorization", "Bearer abc")])),
            Some(Ok("abc".into()))
        );
        assert_eq!(
            k(headers(&[("authorization", "bearer  abc ")])),
            Some(Ok("abc".into()))
        );
        assert_eq!(k(headers(&[("x-api-key", "xyz")])), Some(Ok("xyz".into())));
        assert!(matches!(
            k(headers(&[("authorization", "Basic abc")])),
            Some(Err(_))
        ));
        assert_eq!(k(headers(&[])), None);
    }

    #[test]
    fn keys_are_random_and_hashes_stable() {
        let a = new_key();
        assert!(a.starts_with("hk_") && a.len() == 43);
        assert_ne!(a, new_key());
        assert_eq!(hash_key("x"), hash_key("x"));
        assert_ne!(hash_key("x"), hash_key("y"));
    }
}
