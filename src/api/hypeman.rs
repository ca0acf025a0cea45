//! The Hypeman API: snapshots of instances (`/instances/{id}/snapshots`),
//! restore, fork, and the snapshot model under `/snapshots`. An instance is
//! a hatch VM; the contract is docs/API.md, "Hypeman API".

use super::json::JsonBody;
use super::paging::{self, List, ListQuery, PageRequest};
use super::views::VmView;
use super::{ApiError, ApiResult, AppState, St};
use crate::domain::{CompressionState, SnapshotKind, Tags};
use crate::manager::requests::{CreateSnapshot, FromSnapshot, SnapshotFilter};
use crate::snapshot::CompressionConfig;
use crate::store::{Owner, Snapshot};
use crate::telemetry::Operation;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Serialize;
use serde_json::json;
use std::sync::Arc;

/// The Hypeman dialect's routes; `super::router` adds auth and the id checks.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/instances/{vm_id}/snapshots",
            post(create_instance_snapshot),
        )
        .route(
            "/instances/{vm_id}/snapshots/{snapshot_id}/restore",
            post(restore_instance_snapshot),
        )
        .route("/snapshots", get(list_snapshots))
        .route("/snapshots/{snapshot_id}/fork", post(fork_snapshot))
        .route(
            "/snapshots/{snapshot_id}",
            get(get_snapshot).delete(delete_snapshot),
        )
}

#[utoipa::path(get, path = "/snapshots", tag = "hypeman", operation_id = "listSnapshots",
    params(super::openapi::SnapshotFilters, super::openapi::Paging),
    responses((status = 200, description = "The owner's snapshots that pass every filter, newest first (a page of them with `limit` or `cursor`)",
        body = Vec<SnapshotView>, headers(("X-Next-Cursor" = String, description = "The next page's cursor (only when one follows)"), ("Link" = String, description = "`<...>; rel=\"next\"` to the next page, filters kept (only when one follows)"))),
        (status = 400, description = "A bad filter, `limit`, `cursor` or an unknown query parameter", body = super::openapi::ErrorBody)))]
/// `GET /snapshots`: the owner's snapshots that pass the filters, all or a
/// page (docs/API.md, "Paging"); the next page's link keeps the filters.
pub async fn list_snapshots(
    State(s): St,
    Extension(o): Extension<Owner>,
    query: ListQuery,
) -> ApiResult<Response> {
    let (req, filters) = paging::split_query(List::Snapshots, paging::pairs_of(query)?)?;
    let filter = SnapshotFilter::parse(&filters).map_err(ApiError::BadRequest)?;
    let page = PageRequest::store_page(req.as_ref());
    let rows = s.manager.list_snapshots_page(&o, &filter, &page).await?;
    Ok(paging::respond(
        List::Snapshots,
        req.as_ref(),
        &filters,
        rows,
        SnapshotView::from,
    ))
}

#[utoipa::path(post, path = "/instances/{vm_id}/snapshots", tag = "hypeman", operation_id = "createInstanceSnapshot",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")), request_body = CreateSnapshot,
    responses((status = 201, description = "The snapshot", body = SnapshotView),
        (status = 400, description = "An invalid field", body = super::openapi::ErrorBody),
        (status = 403, description = "Over the owner's quota", body = super::openapi::ErrorBody),
        (status = 409, description = "Not in a state to snapshot, or the name is taken", body = super::openapi::ErrorBody),
        (status = 503, description = "The object store cannot be reached", body = super::openapi::ErrorBody)))]
pub async fn create_instance_snapshot(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateSnapshot>,
) -> ApiResult<(StatusCode, Json<SnapshotView>)> {
    let metrics = s.manager.telemetry();
    let snap = metrics.time(Operation::Snapshot, s.manager.create_snapshot(&o, &id, req));
    let snap = snap.await?;
    Ok((StatusCode::CREATED, Json(snap.into())))
}

#[utoipa::path(post, path = "/instances/{vm_id}/snapshots/{snapshot_id}/restore", tag = "hypeman", operation_id = "restoreInstanceSnapshot",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"), ("snapshot_id" = String, Path, description = "A snapshot id (`snap_` and 12 of `[a-z0-9]`)")), request_body = FromSnapshot,
    responses((status = 200, description = "The instance, in its target state", body = VmView),
        (status = 400, description = "An invalid field, or a target the snapshot cannot give", body = super::openapi::ErrorBody),
        (status = 409, description = "Not in a state to restore, or the snapshot is another instance's", body = super::openapi::ErrorBody),
        (status = 503, description = "The object store or the host's memory is short", body = super::openapi::ErrorBody)))]
pub async fn restore_instance_snapshot(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path((id, snap_id)): Path<(String, String)>,
    JsonBody(req): JsonBody<FromSnapshot>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(
        s.manager
            .restore_snapshot(&o, &id, &snap_id, req)
            .await?
            .into(),
    ))
}

#[utoipa::path(post, path = "/snapshots/{snapshot_id}/fork", tag = "hypeman", operation_id = "forkSnapshot",
    params(("snapshot_id" = String, Path, description = "A snapshot id (`snap_` and 12 of `[a-z0-9]`)")), request_body = FromSnapshot,
    responses((status = 201, description = "The new instance", body = VmView),
        (status = 400, description = "An invalid field, or a target the snapshot cannot give", body = super::openapi::ErrorBody),
        (status = 403, description = "Over the owner's quota", body = super::openapi::ErrorBody),
        (status = 409, description = "The name is taken", body = super::openapi::ErrorBody),
        (status = 503, description = "The object store or the host's memory is short", body = super::openapi::ErrorBody)))]
pub async fn fork_snapshot(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<FromSnapshot>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    let vm = s.manager.fork_snapshot(&o, &id, req).await?;
    Ok((StatusCode::CREATED, Json(vm.into())))
}

#[utoipa::path(get, path = "/snapshots/{snapshot_id}", tag = "hypeman", operation_id = "getSnapshot",
    params(("snapshot_id" = String, Path, description = "A snapshot id (`snap_` and 12 of `[a-z0-9]`)")), responses((status = 200, description = "The snapshot", body = SnapshotView)))]
pub async fn get_snapshot(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<SnapshotView>> {
    Ok(Json(s.manager.get_snapshot(&o, &id).await?.into()))
}

#[utoipa::path(delete, path = "/snapshots/{snapshot_id}", tag = "hypeman", operation_id = "deleteSnapshot",
    params(("snapshot_id" = String, Path, description = "A snapshot id (`snap_` and 12 of `[a-z0-9]`)")), responses((status = 200, description = "Deleted", body = super::openapi::Deleted),
        (status = 409, description = "In use (being restored or forked)", body = super::openapi::ErrorBody)))]
pub async fn delete_snapshot(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_snapshot(&o, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

/// A snapshot as the Hypeman API shows it (docs/API.md, "The snapshot model"). An instance created
/// without a name is named by its id in `source_instance_name`.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = Snapshot)]
pub struct SnapshotView {
    pub id: String,
    pub created_at: String,
    pub kind: SnapshotKind,
    pub size_bytes: i64,
    #[schema(value_type = super::openapi::Hypervisor)]
    pub source_hypervisor: String,
    pub source_instance_id: String,
    pub source_instance_name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compressed_size_bytes: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression: Option<CompressionConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_error: Option<String>,
    pub compression_state: CompressionState,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[schema(value_type = super::openapi::Tags)]
    pub tags: Tags,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uncompressed_size_bytes: Option<i64>,
}

impl From<Snapshot> for SnapshotView {
    fn from(s: Snapshot) -> Self {
        SnapshotView {
            source_instance_name: s
                .source_instance_name
                .clone()
                .unwrap_or_else(|| s.vm_id.clone()),
            id: s.id,
            created_at: s.created_at,
            kind: s.kind,
            size_bytes: s.size_bytes,
            source_hypervisor: s.source_hypervisor,
            source_instance_id: s.vm_id,
            compressed_size_bytes: s.compressed_size_bytes,
            compression: s.compression.map(|c| c.0),
            compression_error: s.compression_error,
            compression_state: s.compression_state,
            name: s.name,
            tags: s.tags.0,
            uncompressed_size_bytes: s.memory_size,
        }
    }
}
