//! HTTP only: routing, authentication, JSON in and out, and the one mapping
//! from domain errors to status codes and `{"error": "..."}` bodies.

mod auth;
mod better_auth;
mod edge;
mod error;
mod hatch;
mod hypeman;
mod json;
mod listener;
mod paging;
mod views;

pub use auth::{hash_key, new_key, Authenticator};
pub use error::ApiError;
pub use json::JSON_BODY_LIMIT;
pub use listener::serve;

use crate::manager::Manager;
use axum::extract::{DefaultBodyLimit, State};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub struct AppState {
    pub manager: Arc<Manager>,
    pub auth: Authenticator,
}

type St = State<Arc<AppState>>;
type ApiResult<T> = Result<T, ApiError>;

/// Both dialects on one router: the Hatch API (`/vms`, `/images`,
/// `/templates`) and the Hypeman API (`/instances`, `/snapshots`), behind
/// one key check; docs/API.md is their contract.
pub fn router(state: Arc<AppState>) -> Router {
    let authed = hatch::routes()
        .merge(hypeman::routes())
        // Ids are checked after the key: without one, every path is a 401.
        .route_layer(axum::middleware::from_fn(edge::known_ids))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .route("/health", get(health))
        .merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // A route that takes more (an upload) lifts it with its own DefaultBodyLimit.
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(state)
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("not found".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed".into())
}
