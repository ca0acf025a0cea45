//! The Hatch API: VMs (`/vms`), their proxy routes, logs and snapshots,
//! images and templates. Thin handlers: parse, call the manager, turn the
//! result into JSON. The contract is docs/API.md, "Hatch API".

use super::json::JsonBody;
use super::paging::{self, List, ListQuery, PageRequest};
use super::views::{HatchSnapshotView, ImageView, RouteView, TemplateView, VmView};
use super::{ApiError, ApiResult, AppState, St};
use crate::manager::requests::{CreateImage, CreateRoute, CreateTemplate, CreateVm, UpdateVm};
use crate::store::Owner;
use crate::telemetry::Operation;
use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, FromRequest, Path, RawQuery, Request, State};
use axum::handler::Handler;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Extension, Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

/// The Hatch dialect's routes; `super::router` adds auth and the id checks.
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/vms", get(list_vms).post(create_vm))
        .route(
            "/vms/{vm_id}",
            get(get_vm).patch(update_vm).delete(delete_vm),
        )
        .route("/vms/{vm_id}/routes", get(list_routes).post(create_route))
        .route("/vms/{vm_id}/routes/{route_id}", delete(delete_route))
        .route("/routes/{route_id}", delete(delete_route_by_id))
        .route("/vms/{vm_id}/stop", post(stop_vm))
        .route("/vms/{vm_id}/start", post(start_vm))
        .route("/vms/{vm_id}/logs", get(vm_logs))
        .route("/vms/{vm_id}/metrics", get(vm_metrics))
        .route("/vms/{vm_id}/snapshot", post(snapshot_vm))
        .route("/vms/{vm_id}/restore", post(restore_vm))
        .route("/vms/{vm_id}/snapshots", get(list_vm_snapshots))
        .route("/vms/{vm_id}/connect", post(super::ssh::connect))
        .route("/vms/{vm_id}/exec", post(super::exec::exec_vm))
        .route("/vms/{vm_id}/exec/ws", get(super::exec::exec_ws))
        .route(
            "/vms/{vm_id}/files",
            // Files stream both ways; the guest's disk is their only limit.
            get(super::files::download)
                .put(super::files::upload.layer(DefaultBodyLimit::disable())),
        )
        .route(
            "/images",
            // Uploads stream whole images: the manager enforces
            // HATCH_IMAGE_MAX_BYTES instead of the API's body limit.
            get(list_images).post(create_image.layer(DefaultBodyLimit::disable())),
        )
        .route("/images/{image_id}", get(get_image).delete(delete_image))
        .route("/templates", get(list_templates).post(create_template))
        .route(
            "/templates/{template_id}",
            get(get_template).delete(delete_template),
        )
}

// ---- vms ----

#[utoipa::path(get, path = "/vms", tag = "vms", operation_id = "listVms",
    params(super::openapi::Paging),
    responses((status = 200, description = "The owner's VMs, oldest first (a page of them with `limit` or `cursor`)",
        body = Vec<VmView>, headers(("X-Next-Cursor" = String, description = "The next page's cursor (only when one follows)"), ("Link" = String, description = "`<...>; rel=\"next\"` to the next page (only when one follows)"))),
        (status = 400, description = "A bad `limit`, `cursor` or an unknown query parameter", body = super::openapi::ErrorBody)))]
/// `GET /vms`: every VM of the owner, or a page of them (docs/API.md, "Paging").
pub async fn list_vms(
    State(s): St,
    Extension(o): Extension<Owner>,
    query: ListQuery,
) -> ApiResult<Response> {
    let req = paging::page_only(List::Vms, query)?;
    let page = PageRequest::store_page(req.as_ref());
    let rows = s.manager.list_vms_page(&o, &page).await?;
    Ok(paging::respond(
        List::Vms,
        req.as_ref(),
        &[],
        rows,
        VmView::from,
    ))
}

#[utoipa::path(post, path = "/vms", tag = "vms", operation_id = "createVm",
    request_body(content = CreateVm, description = "An empty body or `{}` boots the default image with defaults"),
    responses((status = 201, description = "Created and booting", body = VmView),
        (status = 400, description = "An invalid field", body = super::openapi::ErrorBody),
        (status = 403, description = "Over the owner's quota", body = super::openapi::ErrorBody),
        (status = 404, description = "No such image or template", body = super::openapi::ErrorBody),
        (status = 409, description = "The name, address or MAC is taken", body = super::openapi::ErrorBody),
        (status = 503, description = "The host has no memory left for it", body = super::openapi::ErrorBody)))]
pub async fn create_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    JsonBody(req): JsonBody<CreateVm>,
) -> ApiResult<(StatusCode, Json<VmView>)> {
    let vm = s.manager.create_vm(&o, req).await?;
    Ok((StatusCode::CREATED, Json(vm.into())))
}

#[utoipa::path(get, path = "/vms/{vm_id}", tag = "vms", operation_id = "getVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "The VM", body = VmView)))]
pub async fn get_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(s.manager.get_vm(&o, &id).await?.into()))
}

#[utoipa::path(patch, path = "/vms/{vm_id}", tag = "vms", operation_id = "updateVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    request_body = UpdateVm,
    responses((status = 200, description = "The VM with its new settings", body = VmView),
        (status = 400, description = "An invalid field, or nothing to change", body = super::openapi::ErrorBody)))]
pub async fn update_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<UpdateVm>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(s.manager.update_vm(&o, &id, req).await?.into()))
}

// ---- proxy routes ----

#[utoipa::path(post, path = "/vms/{vm_id}/routes", tag = "routes", operation_id = "createRoute", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    request_body = CreateRoute,
    responses((status = 201, description = "The route", body = RouteView),
        (status = 400, description = "An invalid field", body = super::openapi::ErrorBody),
        (status = 409, description = "The subdomain is taken", body = super::openapi::ErrorBody)))]
pub async fn create_route(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<CreateRoute>,
) -> ApiResult<(StatusCode, Json<RouteView>)> {
    let r = s.manager.create_route(&o, &id, req).await?;
    Ok((
        StatusCode::CREATED,
        Json(RouteView::new(r, s.manager.proxy_config())),
    ))
}

#[utoipa::path(get, path = "/vms/{vm_id}/routes", tag = "routes", operation_id = "listRoutes", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "The VM's routes", body = Vec<RouteView>)))]
pub async fn list_routes(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<RouteView>>> {
    let routes = s.manager.list_routes(&o, &id).await?;
    let cfg = s.manager.proxy_config();
    Ok(Json(
        routes.into_iter().map(|r| RouteView::new(r, cfg)).collect(),
    ))
}

#[utoipa::path(delete, path = "/vms/{vm_id}/routes/{route_id}", tag = "routes", operation_id = "deleteVmRoute",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"), ("route_id" = String, Path, description = "A route id (`rt_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Deleted", body = super::openapi::Deleted)))]
pub async fn delete_route(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path((id, route_id)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_route(&o, &id, &route_id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

#[utoipa::path(delete, path = "/routes/{route_id}", tag = "routes", operation_id = "deleteRoute",
    params(("route_id" = String, Path, description = "A route id (`rt_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Deleted", body = super::openapi::Deleted)))]
/// `DELETE /routes/{route_id}`: the Hatch product's path for a route delete,
/// beside `DELETE /vms/{vm_id}/routes/{route_id}`; the same answers.
pub async fn delete_route_by_id(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(route_id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_route_by_id(&o, &route_id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

#[utoipa::path(post, path = "/vms/{vm_id}/stop", tag = "vms", operation_id = "stopVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Stopped", body = VmView),
        (status = 409, description = "Not in a state that stops", body = super::openapi::ErrorBody)))]
pub async fn stop_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(s.manager.stop_vm(&o, &id).await?.into()))
}

#[utoipa::path(post, path = "/vms/{vm_id}/start", tag = "vms", operation_id = "startVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Booting", body = VmView),
        (status = 403, description = "Over the owner's quota", body = super::openapi::ErrorBody),
        (status = 409, description = "Not in a state that starts", body = super::openapi::ErrorBody),
        (status = 503, description = "The host has no memory left for it", body = super::openapi::ErrorBody)))]
pub async fn start_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(s.manager.start_vm(&o, &id).await?.into()))
}

#[utoipa::path(delete, path = "/vms/{vm_id}", tag = "vms", operation_id = "deleteVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Deleted (stopped first if it ran)", body = super::openapi::Deleted),
        (status = 409, description = "Busy with another operation", body = super::openapi::ErrorBody)))]
pub async fn delete_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_vm(&o, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

/// `GET /vms/{id}/metrics`: the Hatch API's metrics shape, extended
/// (docs/API.md, "Metrics"). Network directions are the guest's.
#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = VmMetrics)]
pub struct MetricsView {
    vm_id: String,
    state: crate::domain::VmState,
    #[schema(value_type = super::openapi::Hypervisor)]
    hypervisor: String,
    vcpu_count: i64,
    mem_mib: i64,
    uptime_seconds: u64,
    net: crate::vmm::metrics::NetCounters,
    block: crate::vmm::metrics::BlockCounters,
    vcpu: VcpuView,
    memory: MemoryView,
    /// The backend's own counters, as it reports them.
    raw: serde_json::Value,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = VmMetricsVcpu)]
struct VcpuView {
    cpu_time_micros: u64,
    utilization_percent: f64,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
#[schema(as = VmMetricsMemory)]
struct MemoryView {
    vmm_rss_bytes: u64,
}

impl From<crate::manager::metrics::VmMetrics> for MetricsView {
    fn from(m: crate::manager::metrics::VmMetrics) -> Self {
        MetricsView {
            vm_id: m.vm.id,
            state: m.vm.state,
            hypervisor: m.vm.hypervisor,
            vcpu_count: m.vm.vcpu_count,
            mem_mib: m.vm.mem_mib,
            uptime_seconds: m.vmm.uptime_seconds,
            net: m.vmm.net,
            block: m.vmm.block,
            vcpu: VcpuView {
                cpu_time_micros: m.vmm.cpu_time_micros,
                utilization_percent: m.utilization_percent,
            },
            memory: MemoryView {
                vmm_rss_bytes: m.vmm.rss_bytes,
            },
            raw: m.vmm.raw,
        }
    }
}

#[utoipa::path(get, path = "/vms/{vm_id}/metrics", tag = "vms", operation_id = "getVmMetrics", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "The running VM's counters", body = MetricsView),
        (status = 409, description = "Not running", body = super::openapi::ErrorBody)))]
/// A running VM's counters; 409 in any other state (there is no VMM to ask).
pub async fn vm_metrics(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<MetricsView>> {
    Ok(Json(s.manager.vm_metrics(&o, &id).await?.into()))
}

fn parse_follow(query: Option<&str>) -> ApiResult<bool> {
    let mut follow = false;
    for pair in query
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty())
    {
        let (k, v) = pair.split_once('=').unwrap_or((pair, "true"));
        match (k, v) {
            ("follow", "true" | "1") => follow = true,
            ("follow", "false" | "0") => follow = false,
            ("follow", other) => {
                return Err(ApiError::BadRequest(format!(
                    "follow must be true or false, got {other:?}"
                )))
            }
            (other, _) => {
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?}"
                )))
            }
        }
    }
    Ok(follow)
}

#[utoipa::path(get, path = "/vms/{vm_id}/logs", tag = "vms", operation_id = "getVmLogs",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"), ("follow" = Option<bool>, Query, description = "Keep streaming until the VM's VMM exits")),
    responses((status = 200, description = "The serial console's text", content_type = "text/plain; charset=utf-8", body = String),
        (status = 400, description = "A bad `follow` or an unknown query parameter", body = super::openapi::ErrorBody)))]
/// The guest's serial console. With `follow=true` the response stays open and
/// streams new output until the VM's VMM exits or the client goes away.
pub async fn vm_logs(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    RawQuery(query): RawQuery,
) -> ApiResult<Response> {
    use crate::manager::console;
    let follow = parse_follow(query.as_deref())?;
    let (path, _) = s.manager.console_log(&o, &id).await?;
    let file = match tokio::fs::File::open(&path).await {
        Ok(f) => Some(f),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(ApiError::Internal(format!("reading console log: {e}"))),
    };
    // Only the last HATCH_CONSOLE_LOG_MAX_BYTES are kept; start there.
    let start = match &file {
        Some(f) => {
            let size = f
                .metadata()
                .await
                .map_err(|e| ApiError::Internal(format!("reading console log: {e}")))?
                .len();
            console::tail_start(f, size, s.manager.console_log_max_bytes())
        }
        None => 0,
    };
    let manager = s.manager.clone();
    // `cut`: the next chunk starts mid-line (after a trimmed head); its partial line is dropped.
    let state = (file, path, start, start > 0);
    let stream =
        futures_util::stream::unfold(state, move |(mut file, path, mut offset, mut cut)| {
            let manager = manager.clone();
            let id = id.clone();
            async move {
                loop {
                    if file.is_none() {
                        file = tokio::fs::File::open(&path).await.ok();
                    }
                    if let Some(f) = file.as_mut() {
                        // A reader that fell behind the trimmed head skips the hole.
                        let data = console::next_data(f, offset);
                        if let Some(d) = data.filter(|d| *d > offset) {
                            offset = d;
                            cut = true;
                        }
                        let mut buf = vec![0u8; 64 * 1024];
                        let read = match data {
                            None => 0,
                            Some(_) => match f.seek(std::io::SeekFrom::Start(offset)).await {
                                Ok(_) => f.read(&mut buf).await.unwrap_or(0),
                                Err(_) => 0,
                            },
                        };
                        if read > 0 {
                            buf.truncate(read);
                            // Punched while being read: those bytes read as zeros; drop them.
                            let mut skip = match console::next_data(f, offset) {
                                Some(d) => d.saturating_sub(offset).min(read as u64) as usize,
                                None => read,
                            };
                            offset += read as u64;
                            if cut && skip < read {
                                if let Some(nl) = buf[skip..].iter().position(|b| *b == b'\n') {
                                    skip += nl + 1;
                                }
                            }
                            cut = false;
                            if skip < read {
                                buf.drain(..skip);
                                return Some((
                                    Ok::<_, std::io::Error>(Bytes::from(buf)),
                                    (file, path, offset, cut),
                                ));
                            }
                            continue;
                        }
                    }
                    // At the end of what is written: done, unless following a live VM.
                    if !follow || !manager.is_running(&id) {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(stream),
    )
        .into_response())
}

// ---- snapshots: one VM's, newest restored ----

#[utoipa::path(post, path = "/vms/{vm_id}/snapshot", tag = "snapshots", operation_id = "snapshotVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 201, description = "The snapshot (the VM is now snapshotted)", body = HatchSnapshotView),
        (status = 403, description = "Over the owner's quota", body = super::openapi::ErrorBody),
        (status = 409, description = "Not running", body = super::openapi::ErrorBody),
        (status = 503, description = "The object store cannot be reached", body = super::openapi::ErrorBody)))]
pub async fn snapshot_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<(StatusCode, Json<HatchSnapshotView>)> {
    let metrics = s.manager.telemetry();
    let snap = metrics.time(Operation::Snapshot, s.manager.snapshot_vm(&o, &id));
    let snap = snap.await?;
    Ok((StatusCode::CREATED, Json(snap.into())))
}

#[utoipa::path(post, path = "/vms/{vm_id}/restore", tag = "snapshots", operation_id = "restoreVm", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Running again from its newest snapshot", body = VmView),
        (status = 409, description = "Not snapshotted", body = super::openapi::ErrorBody),
        (status = 503, description = "The object store or the host's memory is short", body = super::openapi::ErrorBody)))]
pub async fn restore_vm(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<VmView>> {
    Ok(Json(s.manager.restore_vm(&o, &id).await?.into()))
}

#[utoipa::path(get, path = "/vms/{vm_id}/snapshots", tag = "snapshots", operation_id = "listVmSnapshots", params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "The VM's snapshots, newest first", body = Vec<HatchSnapshotView>)))]
pub async fn list_vm_snapshots(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<Vec<HatchSnapshotView>>> {
    let snaps = s.manager.list_vm_snapshots(&o, &id).await?;
    Ok(Json(
        snaps.into_iter().map(HatchSnapshotView::from).collect(),
    ))
}

// ---- images ----

#[utoipa::path(get, path = "/images", tag = "images", operation_id = "listImages",
    params(super::openapi::Paging),
    responses((status = 200, description = "The default image and the owner's, oldest first (a page of them with `limit` or `cursor`)",
        body = Vec<ImageView>, headers(("X-Next-Cursor" = String, description = "The next page's cursor (only when one follows)"), ("Link" = String, description = "`<...>; rel=\"next\"` to the next page (only when one follows)"))),
        (status = 400, description = "A bad `limit`, `cursor` or an unknown query parameter", body = super::openapi::ErrorBody)))]
pub async fn list_images(
    State(s): St,
    Extension(o): Extension<Owner>,
    query: ListQuery,
) -> ApiResult<Response> {
    let req = paging::page_only(List::Images, query)?;
    let page = PageRequest::store_page(req.as_ref());
    let rows = s.manager.list_images_page(&o, &page).await?;
    Ok(paging::respond(
        List::Images,
        req.as_ref(),
        &[],
        rows,
        ImageView::from,
    ))
}

/// The largest JSON body `POST /images` reads (its route has no default body
/// limit, for uploads): four paths, a name and boot arguments fit easily.
const IMAGE_JSON_LIMIT: usize = 64 << 10;
/// Room for the multipart boundaries and headers around an upload's files.
const MULTIPART_OVERHEAD: u64 = 1 << 20;
/// The longest text field (`name`, `boot_args`) an upload may carry.
const UPLOAD_TEXT_LIMIT: usize = 8 << 10;

#[utoipa::path(post, path = "/images", tag = "images", operation_id = "createImage",
    request_body(description = "A JSON path import (paths inside HATCH_IMAGE_IMPORT_DIRS), or the files themselves as `multipart/form-data`",
        content((CreateImage = "application/json"), (super::openapi::ImageUpload = "multipart/form-data"))),
    responses((status = 201, description = "The image", body = ImageView),
        (status = 400, description = "An invalid field or file", body = super::openapi::ErrorBody),
        (status = 403, description = "Path imports are off, the path is outside HATCH_IMAGE_IMPORT_DIRS, or over the owner's quota", body = super::openapi::ErrorBody),
        (status = 404, description = "A named file does not exist", body = super::openapi::ErrorBody),
        (status = 413, description = "Larger than HATCH_IMAGE_MAX_BYTES", body = super::openapi::ErrorBody)))]
/// `POST /images`: a `multipart/form-data` body uploads the files (parts
/// `kernel`, `rootfs`, optional `initrd`, text parts `name`, `boot_args`);
/// any other body is JSON naming files inside HATCH_IMAGE_IMPORT_DIRS.
pub async fn create_image(
    State(s): St,
    Extension(o): Extension<Owner>,
    req: Request,
) -> ApiResult<(StatusCode, Json<ImageView>)> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| {
            t.trim_start()
                .to_ascii_lowercase()
                .starts_with("multipart/form-data")
        });
    let img = if multipart {
        upload_image(&s, &o, req).await?
    } else {
        let bytes = axum::body::to_bytes(req.into_body(), IMAGE_JSON_LIMIT)
            .await
            .map_err(|_| {
                ApiError::PayloadTooLarge(format!(
                    "a JSON image request must be at most {} KiB; upload files as multipart/form-data",
                    IMAGE_JSON_LIMIT >> 10
                ))
            })?;
        // Bounded above; parsed exactly as every other JSON body.
        let JsonBody(req) =
            JsonBody::<CreateImage>::from_request(Request::new(Body::from(bytes)), &()).await?;
        s.manager.create_image(&o, req).await?
    };
    Ok((StatusCode::CREATED, Json(img.into())))
}

/// Streams an upload's parts to the manager; any error drops the upload,
/// which removes what was received.
async fn upload_image(s: &AppState, o: &Owner, req: Request) -> ApiResult<crate::store::Image> {
    let max = s.manager.image_max_bytes();
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "the image is larger than this server's limit of {max} bytes (HATCH_IMAGE_MAX_BYTES)"
        ))
    };
    // A declared length over the limit is refused before a byte is stored.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max.saturating_add(MULTIPART_OVERHEAD)) {
        return Err(too_large());
    }
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text()))
    };
    let mut form = axum::extract::Multipart::from_request(req, &())
        .await
        .map_err(|e| ApiError::BadRequest(format!("invalid multipart body: {}", e.body_text())))?;
    let mut upload = s.manager.begin_image_upload(o).await?;
    let (mut name, mut boot_args) = (None, None);
    while let Some(mut field) = form.next_field().await.map_err(bad)? {
        let field_name = field.name().unwrap_or_default().to_string();
        let text = match field_name.as_str() {
            "name" => &mut name,
            "boot_args" => &mut boot_args,
            _ => {
                upload.begin(&field_name).await?;
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    upload.write(&chunk).await?;
                }
                continue;
            }
        };
        if text.is_some() {
            return Err(ApiError::BadRequest(format!(
                "{field_name} was given more than once"
            )));
        }
        let mut value = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            if value.len() + chunk.len() > UPLOAD_TEXT_LIMIT {
                return Err(ApiError::BadRequest(format!(
                    "{field_name} must be at most {UPLOAD_TEXT_LIMIT} bytes"
                )));
            }
            value.extend_from_slice(&chunk);
        }
        *text = Some(
            String::from_utf8(value)
                .map_err(|_| ApiError::BadRequest(format!("{field_name} must be UTF-8 text")))?,
        );
    }
    Ok(s.manager
        .finish_image_upload(o, upload, name, boot_args)
        .await?)
}

#[utoipa::path(get, path = "/images/{image_id}", tag = "images", operation_id = "getImage",
    params(("image_id" = String, Path, description = "An image id (`img_` and 12 of `[a-z0-9]`, or `img_default`)")),
    responses((status = 200, description = "The image", body = ImageView)))]
pub async fn get_image(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<ImageView>> {
    Ok(Json(s.manager.get_image(&o, &id).await?.into()))
}

#[utoipa::path(delete, path = "/images/{image_id}", tag = "images", operation_id = "deleteImage",
    params(("image_id" = String, Path, description = "An image id (`img_` and 12 of `[a-z0-9]`, or `img_default`)")),
    responses((status = 200, description = "Deleted", body = super::openapi::Deleted),
        (status = 403, description = "The default image is the operator's", body = super::openapi::ErrorBody),
        (status = 409, description = "A VM or template still uses it", body = super::openapi::ErrorBody)))]
pub async fn delete_image(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_image(&o, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

// ---- templates ----

#[utoipa::path(get, path = "/templates", tag = "templates", operation_id = "listTemplates",
    params(super::openapi::Paging),
    responses((status = 200, description = "The owner's templates, oldest first (a page of them with `limit` or `cursor`)",
        body = Vec<TemplateView>, headers(("X-Next-Cursor" = String, description = "The next page's cursor (only when one follows)"), ("Link" = String, description = "`<...>; rel=\"next\"` to the next page (only when one follows)"))),
        (status = 400, description = "A bad `limit`, `cursor` or an unknown query parameter", body = super::openapi::ErrorBody)))]
pub async fn list_templates(
    State(s): St,
    Extension(o): Extension<Owner>,
    query: ListQuery,
) -> ApiResult<Response> {
    let req = paging::page_only(List::Templates, query)?;
    let page = PageRequest::store_page(req.as_ref());
    let rows = s.manager.list_templates_page(&o, &page).await?;
    Ok(paging::respond(
        List::Templates,
        req.as_ref(),
        &[],
        rows,
        TemplateView::from,
    ))
}

#[utoipa::path(post, path = "/templates", tag = "templates", operation_id = "createTemplate",
    request_body = CreateTemplate,
    responses((status = 201, description = "The template", body = TemplateView),
        (status = 400, description = "An invalid field", body = super::openapi::ErrorBody),
        (status = 404, description = "No such image", body = super::openapi::ErrorBody),
        (status = 409, description = "The name is taken", body = super::openapi::ErrorBody)))]
pub async fn create_template(
    State(s): St,
    Extension(o): Extension<Owner>,
    JsonBody(req): JsonBody<CreateTemplate>,
) -> ApiResult<(StatusCode, Json<TemplateView>)> {
    let t = s.manager.create_template(&o, req).await?;
    Ok((StatusCode::CREATED, Json(t.into())))
}

#[utoipa::path(get, path = "/templates/{template_id}", tag = "templates", operation_id = "getTemplate",
    params(("template_id" = String, Path, description = "A template id (`tpl_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "The template", body = TemplateView)))]
pub async fn get_template(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<TemplateView>> {
    Ok(Json(s.manager.get_template(&o, &id).await?.into()))
}

#[utoipa::path(delete, path = "/templates/{template_id}", tag = "templates", operation_id = "deleteTemplate",
    params(("template_id" = String, Path, description = "A template id (`tpl_` and 12 of `[a-z0-9]`)")),
    responses((status = 200, description = "Deleted", body = super::openapi::Deleted)))]
pub async fn delete_template(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    s.manager.delete_template(&o, &id).await?;
    Ok(Json(json!({ "status": "deleted" })))
}

#[cfg(test)]
mod tests {
    use super::parse_follow;

    #[test]
    fn follow_parameter() {
        assert!(!parse_follow(None).unwrap());
        assert!(parse_follow(Some("follow=true")).unwrap());
        assert!(parse_follow(Some("follow=1")).unwrap());
        assert!(!parse_follow(Some("follow=false")).unwrap());
        assert!(parse_follow(Some("follow=yes")).is_err());
        assert!(parse_follow(Some("tail=3")).is_err());
    }
}
