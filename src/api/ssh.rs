//! SSH into a VM (the Hatch API's `POST /vms/{vm_id}/connect`): the caller's
//! public key comes back as a short-lived certificate from the daemon's CA,
//! with where to use it. The contract is docs/API.md, "Connect over SSH".

use super::json::JsonBody;
use super::{ApiError, ApiResult, St};
use crate::store::Owner;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, Uri};
use axum::{Extension, Json};
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConnectRequest {
    /// One OpenSSH public key line (`ssh-ed25519 AAAA... comment`): ed25519,
    /// ecdsa, RSA of at least 1024 bits or a `sk-` key; at most 8 KiB.
    #[schema(max_length = 8192)]
    pub public_key: String,
}

/// The Hatch product's answer: `ssh -i KEY -o CertificateFile=CERT -p PORT USERNAME@HOST`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ConnectView {
    /// The OpenSSH user certificate (a `-cert.pub` line), principal = the VM id.
    pub certificate: String,
    /// Where the VM's SSH forward is reached.
    pub host: String,
    /// The VM's `ssh_port`.
    pub port: u16,
    /// Always `agent`.
    #[schema(value_type = String)]
    pub username: &'static str,
    /// Unix seconds after which the certificate no longer logs in.
    pub valid_until: u64,
}

#[utoipa::path(post, path = "/vms/{vm_id}/connect", tag = "vms", operation_id = "connectVm",
    params(("vm_id" = String, Path, description = "A VM id (`vm_` and 12 of `[a-z0-9]`)")),
    request_body = ConnectRequest,
    responses((status = 200, description = "A short-lived SSH certificate for this VM, and where to use it", body = ConnectView),
        (status = 400, description = "A missing, malformed, oversized, DSA or too small RSA key", body = super::openapi::ErrorBody),
        (status = 409, description = "The VM has no networking, or is stopped, starting, stopping or in error", body = super::openapi::ErrorBody),
        (status = 503, description = "The daemon has no SSH CA, or the host has no memory left to wake the VM", body = super::openapi::ErrorBody)))]
/// `POST /vms/{vm_id}/connect`: the caller's key signed for this VM (docs/API.md, "Connect over SSH").
pub async fn connect(
    State(s): St,
    Extension(o): Extension<Owner>,
    Path(id): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    JsonBody(req): JsonBody<ConnectRequest>,
) -> ApiResult<Json<ConnectView>> {
    let key = crate::ssh::parse_user_key(&req.public_key)
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let c = s.manager.connect(&o, &id, &key).await?;
    let host = s
        .manager
        .ssh_config()
        .host
        .clone()
        .unwrap_or_else(|| client_host(&uri, &headers));
    Ok(Json(ConnectView {
        certificate: c.certificate,
        host,
        port: c.port,
        username: c.username,
        valid_until: c.valid_until,
    }))
}

/// The host name the client reached the API by (HTTP/2's authority, else the
/// Host header, without its port): the SSH forwards listen on every address
/// of the same host. 127.0.0.1 when the request names none.
fn client_host(uri: &Uri, headers: &HeaderMap) -> String {
    let from_header = || {
        let value = headers.get(header::HOST)?.to_str().ok()?;
        let authority: axum::http::uri::Authority = value.parse().ok()?;
        Some(authority.host().to_string())
    };
    uri.host()
        .map(str::to_string)
        .or_else(from_header)
        .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "127.0.0.1".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn host_of(uri: &str, host: Option<&str>) -> String {
        let mut headers = HeaderMap::new();
        if let Some(h) = host {
            headers.insert(header::HOST, HeaderValue::from_str(h).unwrap());
        }
        client_host(&uri.parse().unwrap(), &headers)
    }

    #[test]
    fn host_is_what_the_client_used() {
        assert_eq!(
            host_of("/vms/x/connect", Some("api.example.com:8080")),
            "api.example.com"
        );
        assert_eq!(host_of("/vms/x/connect", Some("10.0.0.5")), "10.0.0.5");
        assert_eq!(host_of("/vms/x/connect", Some("[fd00::1]:8080")), "fd00::1");
        assert_eq!(
            host_of("https://h2.example.com/vms/x/connect", None),
            "h2.example.com"
        );
        assert_eq!(host_of("/vms/x/connect", None), "127.0.0.1");
        assert_eq!(host_of("/vms/x/connect", Some("bad host")), "127.0.0.1");
    }
}
