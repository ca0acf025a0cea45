//! HTTP only: routing, authentication, JSON in and out, and the one mapping
//! from domain errors to status codes and `{"error": "..."}` bodies.

mod auth;
mod better_auth;
mod edge;
mod error;
mod handlers;
mod listener;
mod views;

pub use auth::{hash_key, new_key, Authenticator};
pub use error::ApiError;
pub use handlers::JSON_BODY_LIMIT;
pub use listener::serve;

use crate::manager::Manager;
use axum::extract::DefaultBodyLimit;
use axum::handler::Handler;
use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

pub struct AppState {
    pub manager: Arc<Manager>,
    pub auth: Authenticator,
}

pub fn router(state: Arc<AppState>) -> Router {
    let authed = Router::new()
        .route("/vms", get(handlers::list_vms).post(handlers::create_vm))
        .route(
            "/vms/{vm_id}",
            get(handlers::get_vm)
                .patch(handlers::update_vm)
                .delete(handlers::delete_vm),
        )
        .route(
            "/vms/{vm_id}/routes",
            get(handlers::list_routes).post(handlers::create_route),
        )
        .route(
            "/vms/{vm_id}/routes/{route_id}",
            axum::routing::delete(handlers::delete_route),
        )
        .route("/vms/{vm_id}/stop", post(handlers::stop_vm))
        .route("/vms/{vm_id}/start", post(handlers::start_vm))
        .route("/vms/{vm_id}/logs", get(handlers::vm_logs))
        .route("/vms/{vm_id}/snapshot", post(handlers::snapshot_vm))
        .route("/vms/{vm_id}/restore", post(handlers::restore_vm))
        .route("/vms/{vm_id}/snapshots", get(handlers::list_vm_snapshots))
        .route(
            "/instances/{vm_id}/snapshots",
            post(handlers::create_instance_snapshot),
        )
        .route(
            "/instances/{vm_id}/snapshots/{snapshot_id}/restore",
            post(handlers::restore_instance_snapshot),
        )
        .route("/snapshots", get(handlers::list_snapshots))
        .route(
            "/snapshots/{snapshot_id}/fork",
            post(handlers::fork_snapshot),
        )
        .route(
            "/snapshots/{snapshot_id}",
            get(handlers::get_snapshot).delete(handlers::delete_snapshot),
        )
        .route(
            "/images",
            // Uploads stream whole images: the manager enforces
            // HATCH_IMAGE_MAX_BYTES instead of the API's body limit.
            get(handlers::list_images)
                .post(handlers::create_image.layer(axum::extract::DefaultBodyLimit::disable())),
        )
        .route(
            "/images/{image_id}",
            get(handlers::get_image).delete(handlers::delete_image),
        )
        .route(
            "/templates",
            get(handlers::list_templates).post(handlers::create_template),
        )
        .route(
            "/templates/{template_id}",
            get(handlers::get_template).delete(handlers::delete_template),
        )
        // Ids are checked after the key: without one, every path is a 401.
        .route_layer(axum::middleware::from_fn(edge::known_ids))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_key,
        ));
    Router::new()
        .route("/health", get(handlers::health))
        .merge(authed)
        .fallback(handlers::not_found)
        .method_not_allowed_fallback(handlers::method_not_allowed)
        // A route that takes more (an upload) lifts it with its own DefaultBodyLimit.
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .with_state(state)
}
