//! Checks at the edge: path ids that cannot be ours are a 404 before any lookup.

use super::ApiError;
use crate::ids;
use crate::manager::DEFAULT_IMAGE_ID;
use axum::extract::{rejection::RawPathParamsRejection, RawPathParams, Request};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// What a path parameter names, by its name in the router: (kind, id prefix).
fn kind_of(param: &str) -> Option<(&'static str, &'static str)> {
    Some(match param {
        "vm_id" => ("vm", "vm"),
        "image_id" => ("image", "img"),
        "template_id" => ("template", "tpl"),
        "snapshot_id" => ("snapshot", "snap"),
        "route_id" => ("route", "rt"),
        _ => return None,
    })
}

/// Could `value` be the id of a `param`? Unknown parameter names pass.
pub fn plausible_id(param: &str, value: &str) -> bool {
    match kind_of(param) {
        None => true,
        Some((_, prefix)) => {
            ids::looks_like(value, prefix) || (param == "image_id" && value == DEFAULT_IMAGE_ID)
        }
    }
}

/// Middleware: a path id of the wrong shape (a 15 KB one, another prefix,
/// bytes that are not UTF-8) is a 404 that does not repeat it, before the
/// handler, the store or the manager see it.
pub async fn known_ids(
    params: Result<RawPathParams, RawPathParamsRejection>,
    req: Request,
    next: Next,
) -> Response {
    let Ok(params) = params else {
        return ApiError::NotFound("not found".into()).into_response();
    };
    for (name, value) in &params {
        if !plausible_id(name, value) {
            let kind = kind_of(name).map_or("resource", |(k, _)| k);
            return ApiError::NotFound(format!("{kind} not found (not a {kind} id)"))
                .into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_by_parameter() {
        let vm = ids::new_id("vm");
        assert!(plausible_id("vm_id", &vm));
        assert!(!plausible_id("image_id", &vm));
        assert!(!plausible_id("vm_id", &"x".repeat(15_000)));
        assert!(!plausible_id("vm_id", "vm_nope"));
        assert!(plausible_id("image_id", "img_default"));
        assert!(!plausible_id("vm_id", "vm_default"));
        assert!(plausible_id("snapshot_id", &ids::new_id("snap")));
        assert!(plausible_id("route_id", &ids::new_id("rt")));
        assert!(plausible_id("template_id", &ids::new_id("tpl")));
        assert!(plausible_id("other", "anything"));
    }
}
