//! API keys: `Authorization: Bearer KEY` or `X-API-Key: KEY` (seed 004).
//! Keys are random, shown once, and stored only as SHA-256 hashes.

use super::{ApiError, AppState};
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
    let owner = state
        .manager
        .store()
        .owner_by_key_hash(&hash_key(&key))
        .await
        .map_err(|e| ApiError::Internal(e.to_string()))?
        .ok_or_else(|| ApiError::Unauthorized("invalid API key".into()))?;
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
