//! JSON request bodies: lenient about Content-Type, strict about content.

use super::ApiError;
use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

/// The largest request body the API reads by default (JSON bodies; the
/// biggest legitimate one is a 256 KiB `user_data`, escaped).
pub const JSON_BODY_LIMIT: usize = 1024 * 1024;

/// A JSON request body. Content-Type is not required (curl -d sends a form
/// type by default), an empty body counts as `{}`, and every parse failure is
/// a 400 with serde's explanation, which names the offending field. A body
/// over the limit is a 413.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge(format!(
                    "the request body is larger than {JSON_BODY_LIMIT} bytes (1 MiB)"
                ))
            } else {
                ApiError::BadRequest(format!("cannot read request body: {e}"))
            }
        })?;
        let text: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(text)
            .map(JsonBody)
            .map_err(|e| ApiError::BadRequest(format!("invalid JSON body: {e}")))
    }
}
