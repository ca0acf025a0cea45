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
        let bad = |e: serde_json::Error| ApiError::BadRequest(format!("invalid JSON body: {e}"));
        let mut value: serde_json::Value = serde_json::from_slice(text).map_err(bad)?;
        // Every body is an object: serde would read a struct from an array
        // too (`[null, null]` as its fields in order).
        if !value.is_object() {
            return Err(ApiError::BadRequest(
                "invalid JSON body: expected an object".into(),
            ));
        }
        whole_numbers(&mut value);
        serde_json::from_value(value).map(JsonBody).map_err(bad)
    }
}

/// Writes a whole number spelled as a float (`6.0`, `1e2`) as the integer
/// it is: JSON has one number type, and JSON Schema's `integer` is any
/// number without a fraction, which some encoders write with `.0`.
fn whole_numbers(value: &mut serde_json::Value) {
    use serde_json::Value;
    match value {
        Value::Number(n) if !n.is_i64() && !n.is_u64() => {
            if let Some(f) = n.as_f64() {
                // Only where a float is exact: past 2^53 the text may have
                // named another integer (-9223372036854775809 reads as -2^63).
                if f.fract() == 0.0 && f.abs() <= 2f64.powi(53) {
                    *value = Value::from(f as i64);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(whole_numbers),
        Value::Object(fields) => fields.values_mut().for_each(whole_numbers),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(body: &str) -> Result<serde_json::Value, ApiError> {
        let req = Request::new(axum::body::Body::from(body.to_string()));
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(JsonBody::<serde_json::Value>::from_request(req, &()))
            .map(|JsonBody(v)| v)
    }

    #[test]
    fn bodies_are_objects() {
        assert_eq!(parse("").unwrap(), serde_json::json!({}));
        for bad in ["[]", "[null, null]", "1", "\"x\"", "null"] {
            let e = parse(bad).unwrap_err();
            assert!(matches!(e, ApiError::BadRequest(_)), "{bad}: {e}");
        }
    }

    #[test]
    fn whole_floats_are_integers() {
        #[derive(serde::Deserialize, Debug)]
        struct N {
            n: i64,
        }
        let n = |body: &str| {
            let req = Request::new(axum::body::Body::from(body.to_string()));
            let rt = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            rt.block_on(JsonBody::<N>::from_request(req, &()))
                .map(|JsonBody(v)| v.n)
        };
        assert_eq!(n(r#"{"n": 6.0}"#).unwrap(), 6);
        assert_eq!(n(r#"{"n": 1e2}"#).unwrap(), 100);
        assert_eq!(n(r#"{"n": -3.0}"#).unwrap(), -3);
        for bad in [
            r#"{"n": 1.5}"#,
            r#"{"n": 1e30}"#,
            r#"{"n": 9223372036854775808.0}"#,
            r#"{"n": -9223372036854775809}"#,
        ] {
            assert!(n(bad).is_err(), "{bad}");
        }
    }
}
