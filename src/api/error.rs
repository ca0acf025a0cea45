//! The API's error type: every failure becomes a status code and `{"error": "..."}`.

use crate::manager::{ErrorKind, ManagerError};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    ServiceUnavailable(String),
    #[error("{0}")]
    Internal(String),
    /// What the manager refused or failed at; its kind gives the status.
    #[error(transparent)]
    Domain(#[from] ManagerError),
}

/// The HTTP status of each kind of domain failure: the one place the two meet.
pub fn status_of(kind: ErrorKind) -> StatusCode {
    match kind {
        ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        ErrorKind::NotFound => StatusCode::NOT_FOUND,
        ErrorKind::Conflict => StatusCode::CONFLICT,
        ErrorKind::Forbidden => StatusCode::FORBIDDEN,
        ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorKind::BadGateway => StatusCode::BAD_GATEWAY,
        ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::Domain(e) => status_of(e.kind()),
            // Failures of the HTTP layer itself.
            ApiError::BadRequest(_) => status_of(ErrorKind::BadRequest),
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => status_of(ErrorKind::NotFound),
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Conflict(_) => status_of(ErrorKind::Conflict),
            ApiError::Forbidden(_) => status_of(ErrorKind::Forbidden),
            ApiError::PayloadTooLarge(_) => status_of(ErrorKind::TooLarge),
            ApiError::ServiceUnavailable(_) => status_of(ErrorKind::Unavailable),
            ApiError::Internal(_) => status_of(ErrorKind::Internal),
        };
        if status.is_server_error() {
            tracing::error!("{self}");
        }
        (
            status,
            Json(serde_json::json!({ "error": self.to_string() })),
        )
            .into_response()
    }
}
