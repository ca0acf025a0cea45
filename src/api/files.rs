//! Files in a VM (`GET`/`PUT /vms/{vm_id}/files?path=`): the HTTP side of
//! src/manager/files.rs. The contract is docs/API.md, "Files".

use super::paging::{pairs_of, ListQuery};
use super::{ApiError, ApiResult, St};
use crate::manager::files::{parse_id, parse_mode, Download, GuestPath, UploadOptions};
use crate::store::Owner;
use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;

/// One entry of a directory listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileEntryView {
    /// The entry's name in the directory (no path).
    pub name: String,
    /// `file`, `dir`, `symlink` (not followed) or `other` (devices, sockets, fifos).
    #[schema(value_type = String)]
    pub r#type: &'static str,
    /// Bytes, as the guest reports them.
    pub size: u64,
    /// Permission bits in octal, like `0644`.
    pub mode: String,
    /// Last modification, unix seconds.
    pub mtime: u64,
}

/// The answer to an upload.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct FileWrittenView {
    pub path: String,
    /// Bytes written.
    pub size: u64,
    /// The file's permission bits in octal, like `0644`.
    pub mode: String,
    /// Its numeric owner and group in the guest.
    pub uid: u32,
    pub gid: u32,
}

/// `GET`'s query, for the document (the handler reads the pairs itself, so
/// an unknown parameter is a 400 with its name).
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct DownloadParams {
    /// An absolute path in the guest (percent-encoded; passed to the guest's SFTP server verbatim).
    #[param(pattern = "^/", max_length = 4096)]
    path: String,
}

/// `PUT`'s query, for the document.
#[derive(utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct UploadParams {
    /// An absolute path in the guest (percent-encoded; passed to the guest's SFTP server verbatim); its directory must exist.
    #[param(pattern = "^/", max_length = 4096)]
    path: String,
    /// Permission bits, one to four octal digits (`0644`); by default those of the file replaced, or the guest's default for a new one.
    #[param(pattern = "^[0-7]{1,4}$")]
    mode: Option<String>,
    /// Numeric owner; by default `agent`, the session's user. The guest decides: `agent` may give a file only its own uid (else 403).
    uid: Option<u32>,
    /// Numeric group; by default `agent`'s. `agent` may give a file only a group it is in (else 403).
    gid: Option<u32>,
}

/// The parameters of both routes: `path`, and `mode`, `uid`, `gid` on upload.
struct FilesQuery {
    path: GuestPath,
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
}

fn files_query(query: ListQuery, upload: bool) -> ApiResult<FilesQuery> {
    let mut path = None;
    let (mut mode, mut uid, mut gid) = (None, None, None);
    for (k, v) in pairs_of(query)? {
        match k.as_str() {
            "path" => path = Some(GuestPath::parse(&v)?),
            "mode" if upload => mode = Some(parse_mode(&v)?),
            "uid" if upload => uid = Some(parse_id("uid", &v)?),
            "gid" if upload => gid = Some(parse_id("gid", &v)?),
            other => {
                let takes = if upload {
                    "path, mode, uid and gid"
                } else {
                    "path"
                };
                return Err(ApiError::BadRequest(format!(
                    "unknown query parameter {other:?} (this route takes {takes})"
                )));
            }
        }
    }
    let path = path.ok_or_else(|| {
        ApiError::BadRequest("the query needs path=/absolute/path/in/the/guest".into())
    })?;
    Ok(FilesQuery {
        path,
        mode,
        uid,
        gid,
    })
}

#[utoipa::path(get, path = "/vms/{vm_id}/files", tag = "vms", operation_id = "getVmFile",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"),
        DownloadParams),
    responses((status = 200, description = "The file's bytes (Content-Length set for a regular file of known size), or for a directory its entries as JSON, sorted by name",
            content((Vec<u8> = "application/octet-stream"), (Vec<FileEntryView> = "application/json"))),
        (status = 400, description = "No path, a relative path, or an unknown query parameter", body = super::openapi::ErrorBody),
        (status = 403, description = "The guest's user `agent` may not read it", body = super::openapi::ErrorBody),
        (status = 404, description = "No such VM for this key, or no such file in the guest", body = super::openapi::ErrorBody),
        (status = 409, description = "The VM has no networking, or is stopped, starting, stopping or in error", body = super::openapi::ErrorBody),
        (status = 502, description = "The guest's SSH or SFTP server failed", body = super::openapi::ErrorBody),
        (status = 503, description = "The daemon has no SSH CA, or the host has no memory left to wake the VM", body = super::openapi::ErrorBody)))]
/// `GET /vms/{vm_id}/files?path=`: a guest file, streamed, or a directory listing.
pub async fn download(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    query: ListQuery,
) -> ApiResult<Response> {
    let q = files_query(query, false)?;
    match s.manager.download(&o, &id, &q.path).await? {
        Download::Dir(entries) => {
            let view: Vec<FileEntryView> = entries
                .into_iter()
                .map(|e| FileEntryView {
                    name: e.name,
                    r#type: e.kind.as_str(),
                    size: e.size,
                    mode: format!("{:04o}", e.mode),
                    mtime: e.mtime,
                })
                .collect();
            Ok(Json(view).into_response())
        }
        Download::File { size, body } => {
            let mut resp = Body::from_stream(body).into_response();
            let headers = resp.headers_mut();
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            if let Some(size) = size {
                headers.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            }
            Ok(resp)
        }
    }
}

#[utoipa::path(put, path = "/vms/{vm_id}/files", tag = "vms", operation_id = "putVmFile",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)"),
        UploadParams),
    request_body(description = "The file's bytes, streamed (no size limit but the guest's disk)", content((Vec<u8> = "application/octet-stream"))),
    responses((status = 201, description = "The file is in place (written under a temp name beside it, then renamed over it)", body = FileWrittenView),
        (status = 400, description = "No path, a relative path, a bad mode, uid or gid, an unknown query parameter, or the body was cut", body = super::openapi::ErrorBody),
        (status = 403, description = "The guest's user `agent` may not write there, or may not give the file that uid or gid", body = super::openapi::ErrorBody),
        (status = 404, description = "No such VM for this key, or the path's directory does not exist in the guest", body = super::openapi::ErrorBody),
        (status = 409, description = "The path is a directory; or the VM has no networking, or is stopped, starting, stopping or in error", body = super::openapi::ErrorBody),
        (status = 413, description = "More than the guest's disk has free", body = super::openapi::ErrorBody),
        (status = 502, description = "The guest's SSH or SFTP server failed", body = super::openapi::ErrorBody),
        (status = 503, description = "The daemon has no SSH CA, or the host has no memory left to wake the VM", body = super::openapi::ErrorBody)))]
/// `PUT /vms/{vm_id}/files?path=`: the body becomes the guest file, whole or not at all.
pub async fn upload(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    query: ListQuery,
    req: Request,
) -> ApiResult<Response> {
    let q = files_query(query, true)?;
    let content_length = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body = req.into_body().into_data_stream();
    let options = UploadOptions {
        mode: q.mode,
        uid: q.uid,
        gid: q.gid,
    };
    let done = s
        .manager
        .upload(&o, &id, &q.path, options, content_length, body)
        .await?;
    let view = FileWrittenView {
        path: done.path,
        size: done.size,
        mode: format!("{:04o}", done.mode),
        uid: done.uid,
        gid: done.gid,
    };
    Ok((StatusCode::CREATED, Json(view)).into_response())
}
