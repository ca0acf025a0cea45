//! HTTP only: routing, authentication, JSON in and out, and the one mapping
//! from domain errors to status codes and `{"error": "..."}` bodies.

mod auth;
mod better_auth;
mod edge;
mod error;
mod exec;
mod files;
mod hatch;
mod hypeman;
mod json;
mod listener;
pub(crate) mod openapi;
mod paging;
mod ssh;
mod views;

pub use auth::{hash_key, new_key, Authenticator};
pub use error::ApiError;
pub use json::JSON_BODY_LIMIT;
pub use listener::serve;

use crate::manager::Manager;
use crate::telemetry::{self, Access};
use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
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
    // Serialized once here; each request clones a reference-counted buffer.
    let doc = openapi::json(&openapi::Host::of(&state.manager));
    let mut open = Router::new().route("/health", get(health)).route(
        "/openapi.json",
        get(move || async move { openapi::openapi_json(doc) }),
    );
    if state.manager.telemetry().enabled() {
        // Its own bearer token (HATCH_METRICS_TOKEN), not an API key: it is
        // host-wide. Without the setting there is no such route at all.
        open = open.route("/metrics", get(metrics));
    }
    open.merge(authed)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // A route that takes more (an upload) lifts it with its own DefaultBodyLimit.
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        // Outermost, and run after routing, so it sees the matched route
        // template and every answer (a 401 of auth, a 404 of the id checks).
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_request,
        ))
        .with_state(state)
}

/// Counts each API request by method, route template and status.
async fn count_request(State(s): St, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let resp = next.run(req).await;
    s.manager
        .telemetry()
        .api_request(&method, route.as_ref(), resp.status().as_u16());
    resp
}

/// `GET /metrics`: Prometheus text for the holder of HATCH_METRICS_TOKEN;
/// without that setting it does not exist (404, like any unknown path).
#[utoipa::path(get, path = "/metrics", tag = "daemon", operation_id = "getDaemonMetrics",
    description = "Its own bearer token (HATCH_METRICS_TOKEN), not an API key; the route exists only when that is set.",
    responses(
        (status = 200, description = "Prometheus text format 0.0.4", content_type = "text/plain; version=0.0.4; charset=utf-8", body = String),
        (status = 401, description = "No or the wrong HATCH_METRICS_TOKEN", body = openapi::ErrorBody),
        (status = 404, description = "HATCH_METRICS_TOKEN is not set", body = openapi::ErrorBody),
        (status = 500, description = "The store could not be read", body = openapi::ErrorBody)))]
async fn metrics(State(s): St, headers: HeaderMap) -> ApiResult<Response> {
    let t = s.manager.telemetry();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match t.access(bearer) {
        Access::Off => Err(ApiError::NotFound("not found".into())),
        Access::Denied => {
            let mut resp = ApiError::Unauthorized(
                "metrics need Authorization: Bearer with the HATCH_METRICS_TOKEN".into(),
            )
            .into_response();
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"hatch metrics\""),
            );
            Ok(resp)
        }
        Access::Granted => {
            let text = t
                .render(s.manager.store())
                .await
                .map_err(|e| ApiError::Internal(e.to_string()))?;
            let content_type = HeaderValue::from_static(telemetry::CONTENT_TYPE);
            Ok(([(header::CONTENT_TYPE, content_type)], text).into_response())
        }
    }
}

#[utoipa::path(get, path = "/health", tag = "daemon", operation_id = "getHealth",
    responses((status = 200, description = "The daemon answers", body = openapi::Health)))]
async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

async fn not_found() -> ApiError {
    ApiError::NotFound("not found".into())
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed("method not allowed".into())
}
