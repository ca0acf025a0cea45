//! The OpenAPI 3.1 document of both dialects (`GET /openapi.json`), derived from the handlers' own request and view types.
//!
//! Each handler carries its `#[utoipa::path]` (path, parameters, body, the
//! statuses it answers itself); `ApiDoc` lists them. `document` then adds
//! what every route shares, in one place so no route can miss it: the key
//! check's 401, the id check's 404, the body reader's 400 and 413, and 500.
//! `document_json` adds what the derives cannot say and what depends on this
//! daemon; the tests below hold the document to the router's routes.

use super::hatch::{self, MetricsView};
use super::hypeman::{self, SnapshotView};
use super::views::{HatchSnapshotView, ImageView, RouteView, TemplateView, VmView};
use crate::domain::{CompressionState, MacAddr, SnapshotKind, VmState};
use crate::manager::requests::{
    CreateImage, CreateRoute, CreateSnapshot, CreateTemplate, CreateVm, FromSnapshot, TargetState,
    UpdateVm,
};
use crate::net::ipam::BridgeNet;
use crate::snapshot::CompressionConfig;
use axum::body::Bytes;
use std::borrow::Cow;
use utoipa::openapi::path::{Operation, ParameterIn};
use utoipa::openapi::schema::{
    AdditionalProperties, KnownFormat, ObjectBuilder, SchemaFormat, Type,
};
use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{ContentBuilder, OpenApi as Document, RefOr, ResponseBuilder, Schema};
use utoipa::{IntoParams, Modify, OpenApi, PartialSchema, ToSchema};

/// The body of every error: `{"error": "..."}` (docs/API.md, "Responses and errors").
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)]
pub struct ErrorBody {
    /// What went wrong, for a person to read.
    error: String,
}

/// The answer to a delete.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Deleted {
    #[schema(inline)]
    status: DeletedStatus,
}

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum DeletedStatus {
    Deleted,
}

/// `GET /health`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct Health {
    #[schema(inline)]
    status: HealthStatus,
}

#[derive(ToSchema)]
#[schema(rename_all = "lowercase")]
#[allow(dead_code)]
enum HealthStatus {
    Ok,
}

/// `limit` and `cursor` of the four paged lists (docs/API.md, "Paging").
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct Paging {
    /// Rows on one page (1-1000; 100 when only `cursor` is given). Without
    /// `limit` and `cursor` the whole list comes back.
    #[param(minimum = 1, maximum = 1000)]
    limit: Option<u32>,
    /// Where the page starts: an `X-Next-Cursor` value, passed back as it came.
    #[param(max_length = 256, pattern = "^[0-9a-f]*$")]
    cursor: Option<String>,
}

/// The filters of Hypeman's `GET /snapshots`; every one given must match.
#[derive(IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)]
pub struct SnapshotFilters {
    kind: Option<SnapshotKind>,
    name: Option<String>,
    source_instance_id: Option<String>,
    /// `tags[KEY]=VALUE`, any number of them.
    #[param(style = DeepObject, explode, value_type = Option<Tags>)]
    tags: Option<std::collections::BTreeMap<String, String>>,
}

/// A hypervisor name (`vmm::HYPERVISORS`).
pub struct Hypervisor;

impl PartialSchema for Hypervisor {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .enum_values(Some(crate::vmm::HYPERVISORS))
            .description(Some(
                "A hypervisor; a request may name only one this daemon has a backend for",
            ))
            .into()
    }
}

impl ToSchema for Hypervisor {}

/// A snapshot's tags: at most 50, keys 1-128 and values at most 256 bytes,
/// without control or format (bidi) characters.
pub struct Tags;

impl PartialSchema for Tags {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .max_properties(Some(50))
            .additional_properties(Some(AdditionalProperties::RefOr(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .max_length(Some(256))
                    .into(),
            )))
            .description(Some("User-defined key-value tags"))
            .into()
    }
}

impl ToSchema for Tags {}

impl PartialSchema for MacAddr {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(Type::String)
            .pattern(Some("^[0-9a-f]{2}(:[0-9a-f]{2}){5}$"))
            .examples(["02:fc:00:00:00:0a"])
            .into()
    }
}

impl ToSchema for MacAddr {}

/// The Hypeman API's `SnapshotCompressionConfig` (its type lives with the
/// compression code; its JSON shape is written out here). One of three
/// shapes: disabled (algorithm and level ignored, whatever they are), lz4
/// with a level of 0-9, or zstd (also when no algorithm is named) with 1-19.
impl PartialSchema for CompressionConfig {
    fn schema() -> RefOr<Schema> {
        use crate::snapshot::Algorithm;
        use utoipa::openapi::schema::{OneOfBuilder, SchemaType};
        let nullable = |t: Type| SchemaType::from_iter([t, Type::Null]);
        let shape =
            |enabled: bool, algorithms: &[Option<Algorithm>], levels: Option<(i64, i64)>| {
                let algorithm = ObjectBuilder::new()
                    .schema_type(nullable(Type::String))
                    .enum_values(Some(
                        algorithms
                            .iter()
                            .map(|a| a.map_or(serde_json::Value::Null, |a| a.as_str().into())),
                    ));
                let mut level = ObjectBuilder::new()
                    .schema_type(nullable(Type::Integer))
                    .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)));
                if let Some((lo, hi)) = levels {
                    level = level.minimum(Some(lo as f64)).maximum(Some(hi as f64));
                }
                ObjectBuilder::new()
                    .schema_type(Type::Object)
                    .property(
                        "enabled",
                        ObjectBuilder::new()
                            .schema_type(Type::Boolean)
                            .enum_values(Some([enabled])),
                    )
                    .required("enabled")
                    .property("algorithm", algorithm)
                    .property("level", level)
                    .additional_properties(Some(AdditionalProperties::FreeForm(false)))
            };
        let (zstd, lz4) = (Algorithm::Zstd, Algorithm::Lz4);
        let lz4_levels = lz4.levels();
        let zstd_levels = zstd.levels();
        OneOfBuilder::new()
            .item(shape(false, &[None, Some(zstd), Some(lz4)], None))
            .item(
                shape(true, &[Some(lz4)], Some((*lz4_levels.start(), *lz4_levels.end())))
                    .required("algorithm"),
            )
            .item(shape(
                true,
                &[None, Some(zstd)],
                Some((*zstd_levels.start(), *zstd_levels.end())),
            ))
            .description(Some(
                "Snapshot memory compression: zstd (levels 1-19, default 1; also when no algorithm is named) or lz4 (0-9, default 0). Algorithm and level are ignored when enabled is false.",
            ))
            .into()
    }
}

impl ToSchema for CompressionConfig {
    fn name() -> Cow<'static, str> {
        "SnapshotCompressionConfig".into()
    }
}

/// `POST /images` as `multipart/form-data`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImageUpload {
    /// A bzImage or an ELF vmlinux (or both, as two `kernel` parts).
    #[schema(value_type = String, format = Binary)]
    kernel: Vec<u8>,
    /// An ELF vmlinux beside a bzImage `kernel` (for backends that boot ELF).
    #[schema(value_type = Option<String>, format = Binary)]
    kernel_elf: Option<Vec<u8>>,
    /// An ext4 image.
    #[schema(value_type = String, format = Binary)]
    rootfs: Vec<u8>,
    #[schema(value_type = Option<String>, format = Binary)]
    initrd: Option<Vec<u8>>,
    name: Option<String>,
    boot_args: Option<String>,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "hatch",
        description = "A self-hosted microVM control plane: the Hatch API (`/vms`, `/images`, `/templates`, `/routes`) and the Hypeman API (`/instances/{vm_id}/snapshots`, `/snapshots`) side by side. docs/API.md is the prose.",
        license(name = "Apache-2.0")
    ),
    paths(
        super::health,
        openapi_json,
        super::metrics,
        hatch::list_vms,
        hatch::create_vm,
        hatch::get_vm,
        hatch::update_vm,
        hatch::delete_vm,
        hatch::stop_vm,
        hatch::start_vm,
        hatch::vm_logs,
        hatch::vm_metrics,
        super::ssh::connect,
        super::files::download,
        super::files::upload,
        super::exec::exec_vm,
        super::exec::exec_ws,
        hatch::create_route,
        hatch::list_routes,
        hatch::delete_route,
        hatch::delete_route_by_id,
        hatch::snapshot_vm,
        hatch::restore_vm,
        hatch::list_vm_snapshots,
        hatch::list_images,
        hatch::create_image,
        hatch::get_image,
        hatch::delete_image,
        hatch::list_templates,
        hatch::create_template,
        hatch::get_template,
        hatch::delete_template,
        hypeman::create_instance_snapshot,
        hypeman::restore_instance_snapshot,
        hypeman::list_snapshots,
        hypeman::get_snapshot,
        hypeman::delete_snapshot,
        hypeman::fork_snapshot,
    ),
    components(schemas(
        ErrorBody, Deleted, Health, VmView, RouteView, ImageView, TemplateView,
        HatchSnapshotView, SnapshotView, MetricsView, VmState, SnapshotKind,
        CompressionState, TargetState, Hypervisor, Tags, MacAddr, CompressionConfig,
        CreateVm, UpdateVm, CreateRoute, CreateSnapshot, FromSnapshot, CreateImage,
        ImageUpload, CreateTemplate, super::ssh::ConnectRequest, super::ssh::ConnectView,
        super::files::FileEntryView, super::files::FileWrittenView,
        super::exec::ExecRequest, super::exec::CommandField, super::exec::ExecView,
    )),
    modifiers(&Security),
    tags(
        (name = "vms", description = "Hatch API: VMs"),
        (name = "routes", description = "Hatch API: the proxy's routes to VMs"),
        (name = "snapshots", description = "Hatch API: a VM's snapshots"),
        (name = "images", description = "Hatch API: images"),
        (name = "templates", description = "Hatch API: templates"),
        (name = "hypeman", description = "Hypeman API: snapshots of instances, restore and fork"),
        (name = "daemon", description = "The daemon itself"),
    )
)]
struct ApiDoc;

/// The two ways to give an API key; either one is enough.
struct Security;

const BEARER: &str = "bearer";
const API_KEY: &str = "apiKey";

impl Modify for Security {
    fn modify(&self, doc: &mut Document) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            BEARER,
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("Authorization: Bearer YOUR_API_KEY"))
                    .build(),
            ),
        );
        components.add_security_scheme(
            API_KEY,
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-API-Key",
                "X-API-Key: YOUR_API_KEY",
            ))),
        );
    }
}

/// Routes outside the key check (each says who may call it).
const OPEN_PATHS: &[&str] = &["/health", "/openapi.json", "/metrics"];

/// The document, with what every route shares added to each operation.
pub fn document() -> Document {
    let mut doc = ApiDoc::openapi();
    let error = || {
        ResponseBuilder::new().content(
            "application/json",
            ContentBuilder::new()
                .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                    "Error",
                ))))
                .build(),
        )
    };
    let keyed = vec![
        utoipa::openapi::security::SecurityRequirement::new(BEARER, Vec::<String>::new()),
        utoipa::openapi::security::SecurityRequirement::new(API_KEY, Vec::<String>::new()),
    ];
    for (path, item) in doc.paths.paths.iter_mut() {
        let open = OPEN_PATHS.contains(&path.as_str());
        for op in operations(item) {
            let add = |op: &mut Operation, status: &str, text: &str| {
                op.responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| RefOr::T(error().description(text).build()));
            };
            if open {
                op.security = Some(vec![Default::default()]);
                continue;
            }
            op.security = Some(keyed.clone());
            add(op, "401", "No API key, or one nobody accepts");
            let has_path_id = op
                .parameters
                .iter()
                .flatten()
                .any(|p| p.parameter_in == ParameterIn::Path);
            if has_path_id {
                add(
                    op,
                    "404",
                    "No such resource of the caller's (or an id of the wrong shape)",
                );
            }
            if op.request_body.is_some() {
                add(op, "400", "The body is not valid JSON for this operation");
                add(op, "413", "The body is over 1 MiB");
            }
            add(
                op,
                "500",
                "The daemon failed (its log has the detail); the key verifier could not answer",
            );
        }
    }
    doc
}

fn operations(item: &mut utoipa::openapi::PathItem) -> impl Iterator<Item = &mut Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
        item.options.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// What the document says about this daemon in particular: the request
/// fields whose valid values depend on how it was started.
pub struct Host {
    /// The hypervisors it has a backend for.
    pub hypervisors: Vec<&'static str>,
    /// The guests' network: where a requested `guest_ip` must be.
    pub net: BridgeNet,
    /// Whether `GET /metrics` exists (HATCH_METRICS_TOKEN is set).
    pub metrics: bool,
}

impl Host {
    pub fn of(manager: &crate::manager::Manager) -> Host {
        Host {
            hypervisors: manager.hypervisor_names(),
            net: manager.guest_network(),
            metrics: manager.telemetry().enabled(),
        }
    }
}

/// Control (Cc), format (Cf: bidi controls, zero-width characters) and
/// line/paragraph separator characters of the Basic Multilingual Plane:
/// `requests::is_hidden_char` refuses them in names, descriptions and tags
/// (it also refuses the few astral format characters, which a JSON Schema
/// pattern cannot name portably).
const HIDDEN: &str = r"\u0000-\u001f\u007f-\u009f\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffb";

/// Text without hidden characters.
fn visible() -> String {
    format!("^[^{HIDDEN}]*$")
}

/// Text without hidden characters and not only white space (`check_name`).
fn visible_name() -> String {
    format!(r"^(?=[\s\S]*\S)[^{HIDDEN}]*$")
}

/// The document as JSON, with what the derive attributes cannot say: rules
/// between fields, the text patterns above, and this daemon's hypervisors
/// and guest network.
pub fn document_json(host: &Host) -> serde_json::Value {
    use serde_json::{json, Value};
    let mut doc = serde_json::to_value(document()).expect("the OpenAPI document serializes");
    if !host.metrics {
        // Not served at all (see `super::router`).
        doc["paths"]
            .as_object_mut()
            .expect("paths")
            .remove("/metrics");
    }
    let schemas = &mut doc["components"]["schemas"];
    let set = |schemas: &mut Value, schema: &str, property: &str, key: &str, value: Value| {
        let target = &mut schemas[schema]["properties"][property];
        assert!(target.is_object(), "{schema}.{property} is in the document");
        target[key] = value;
    };
    let requested_hypervisor = json!({
        "type": ["string", "null"],
        "enum": host.hypervisors.iter().map(|h| json!(h)).chain([Value::Null]).collect::<Vec<_>>(),
        "description": "A hypervisor this daemon has a backend for; its default when absent",
    });
    for (schema, property) in [
        ("CreateVm", "hypervisor"),
        ("FromSnapshot", "target_hypervisor"),
    ] {
        schemas[schema]["properties"][property] = requested_hypervisor.clone();
    }
    set(
        schemas,
        "CreateVm",
        "guest_ip",
        "pattern",
        json!(guest_ip_pattern(host.net)),
    );
    set(
        schemas,
        "CreateVm",
        "guest_ip",
        "description",
        json!(format!(
            "A guest address of {} (not its network, broadcast or bridge address); only with networking on",
            host.net.cidr()
        )),
    );
    // Networking off: no address or MAC may be asked for.
    schemas["CreateVm"]["if"] = json!({
        "properties": {"enable_network": {"const": false}},
        "required": ["enable_network"],
    });
    schemas["CreateVm"]["then"] = json!({
        "properties": {"guest_ip": {"type": "null"}, "guest_mac": {"type": "null"}},
    });
    // At least one setting to change (utoipa 5.5 writes a container's
    // min_properties as maxProperties).
    let update = schemas["UpdateVm"].as_object_mut().expect("UpdateVm");
    update.remove("maxProperties");
    update.insert("minProperties".into(), json!(1));
    for (schema, property, pattern) in [
        ("CreateTemplate", "name", visible_name()),
        (
            "CreateTemplate",
            "description",
            // Line breaks and tabs are fine in a description.
            format!(
                "^[^{}]*$",
                HIDDEN.replacen(
                    r"\u0000-\u001f",
                    r"\u0000-\u0008\u000b\u000c\u000e-\u001f",
                    1
                )
            ),
        ),
        ("CreateImage", "name", visible_name()),
        ("ImageUpload", "name", visible_name()),
    ] {
        set(schemas, schema, property, "pattern", json!(pattern));
    }
    // Any other part is refused.
    schemas["ImageUpload"]["additionalProperties"] = json!(false);
    let tags = &mut schemas["Tags"];
    tags["propertyNames"] = json!({"minLength": 1, "maxLength": 128, "pattern": visible()});
    tags["additionalProperties"]["pattern"] = json!(visible());
    // One request type, two bodies: a restore keeps the instance's name, a
    // fork must name its new instance.
    let from = schemas["FromSnapshot"].clone();
    let mut restore = from.clone();
    restore["properties"]
        .as_object_mut()
        .expect("properties")
        .remove("name");
    restore["description"] = json!("The body of a restore: what the instance becomes");
    let mut fork = from;
    fork["required"] = json!(["name"]);
    fork["properties"]["name"]["type"] = json!("string");
    fork["description"] = json!("The body of a fork: the new instance's name and what it becomes");
    let obj = schemas.as_object_mut().expect("schemas");
    obj.remove("FromSnapshot");
    obj.insert("RestoreSnapshot".into(), restore);
    obj.insert("ForkSnapshot".into(), fork);
    for (path, name) in [
        (
            "/instances/{vm_id}/snapshots/{snapshot_id}/restore",
            "RestoreSnapshot",
        ),
        ("/snapshots/{snapshot_id}/fork", "ForkSnapshot"),
    ] {
        let body =
            &mut doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"];
        assert_eq!(body["$ref"], "#/components/schemas/FromSnapshot", "{path}");
        *body = json!({"$ref": format!("#/components/schemas/{name}")});
    }
    doc
}

/// A pattern matching exactly the addresses a guest of `net` may ask for:
/// the network's hosts but the bridge's own address, as CIDR blocks.
fn guest_ip_pattern(net: BridgeNet) -> String {
    let first = u32::from(net.network()) + 1;
    let last = u32::from(net.broadcast()).saturating_sub(1);
    let bridge = u32::from(net.bridge_ip);
    let mut ranges = vec![];
    if first <= last {
        if (first..=last).contains(&bridge) {
            if bridge > first {
                ranges.push((first, bridge - 1));
            }
            if bridge < last {
                ranges.push((bridge + 1, last));
            }
        } else {
            ranges.push((first, last));
        }
    }
    let mut alternatives = vec![];
    for (mut lo, hi) in ranges {
        while lo <= hi {
            // The largest aligned block at `lo` that ends within the range.
            let mut size = if lo == 0 {
                1u64 << 32
            } else {
                1u64 << lo.trailing_zeros()
            };
            while lo as u64 + size - 1 > hi as u64 {
                size >>= 1;
            }
            alternatives.push(block_pattern(lo, size));
            match lo.checked_add(size as u32) {
                Some(next) => lo = next,
                None => break,
            }
        }
    }
    if alternatives.is_empty() {
        // A network without room for a guest: nothing matches.
        return "^$.".into();
    }
    format!("^({})$", alternatives.join("|"))
}

/// `size` (a power of two) addresses from `start`, octet by octet.
fn block_pattern(start: u32, size: u64) -> String {
    const ANY: &str = "(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])";
    let octets = start.to_be_bytes();
    let host_bits = size.trailing_zeros();
    (0..4)
        .map(|i| {
            // Bits of this octet that vary inside the block.
            let low_bit = 8 * (3 - i);
            let varying = host_bits.saturating_sub(low_bit).min(8);
            let first = octets[i as usize];
            match varying {
                0 => first.to_string(),
                8 => ANY.to_string(),
                v => {
                    let last = first as u32 + (1 << v) - 1;
                    let all: Vec<String> = (first as u32..=last).map(|n| n.to_string()).collect();
                    format!("({})", all.join("|"))
                }
            }
        })
        .collect::<Vec<_>>()
        .join(r"\.")
}

/// The document as the bytes `GET /openapi.json` serves: made once, at start-up.
pub fn json(host: &Host) -> Bytes {
    Bytes::from(serde_json::to_vec(&document_json(host)).expect("JSON serializes"))
}

/// `GET /openapi.json`: this document, serialized once (`json`). No key
/// needed: it describes the API and holds nothing of anyone's.
#[utoipa::path(get, path = "/openapi.json", tag = "daemon", operation_id = "getOpenApi",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json", body = Object)))]
pub fn openapi_json(doc: Bytes) -> axum::response::Response {
    use axum::response::IntoResponse;
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        doc,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn host() -> Host {
        Host {
            hypervisors: vec![crate::vmm::HYPERVISORS[0]],
            net: BridgeNet::parse("172.16.0.1/24").unwrap(),
            metrics: true,
        }
    }

    /// Every `.route(PATH, METHODS)` of the router's source files, as
    /// (METHOD, PATH): the list the document must match.
    fn served() -> BTreeSet<(String, String)> {
        let sources = [
            include_str!("mod.rs"),
            include_str!("hatch.rs"),
            include_str!("hypeman.rs"),
        ];
        let mut out = BTreeSet::new();
        for src in sources {
            for call in src.split(".route(").skip(1) {
                let Some(rest) = call.trim_start().strip_prefix('"') else {
                    continue;
                };
                let (path, rest) = rest.split_once('"').unwrap();
                // The method router runs to the `)` closing `.route(`.
                let mut depth = 1;
                let end = rest
                    .char_indices()
                    .find(|&(_, c)| {
                        match c {
                            '(' => depth += 1,
                            ')' => depth -= 1,
                            _ => {}
                        }
                        depth == 0
                    })
                    .map(|(i, _)| i)
                    .unwrap();
                let methods = &rest[..end];
                let mut found = 0;
                for m in ["get", "post", "put", "patch", "delete"] {
                    let is_call = |(i, _): &(usize, &str)| {
                        !methods[..*i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_')
                    };
                    for _ in methods.match_indices(&format!("{m}(")).filter(is_call) {
                        out.insert((m.to_uppercase(), path.to_string()));
                        found += 1;
                    }
                }
                assert!(
                    found > 0,
                    "no method read from .route(\"{path}\", {methods})"
                );
            }
        }
        out
    }

    fn documented(doc: &serde_json::Value) -> BTreeSet<(String, String)> {
        let mut out = BTreeSet::new();
        for (path, item) in doc["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys() {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let served = served();
        assert!(served.len() >= 30, "the source scan found {served:?}");
        assert!(served.contains(&("DELETE".into(), "/routes/{route_id}".into())));
        let doc = documented(&document_json(&host()));
        let missing: Vec<_> = served.difference(&doc).collect();
        assert!(
            missing.is_empty(),
            "served but not in the document: {missing:?}"
        );
        let extra: Vec<_> = doc.difference(&served).collect();
        assert!(
            extra.is_empty(),
            "in the document but not served: {extra:?}"
        );
    }

    #[test]
    fn metrics_is_documented_only_when_served() {
        let off = Host {
            metrics: false,
            ..host()
        };
        assert!(document_json(&off)["paths"].get("/metrics").is_none());
        assert!(document_json(&host())["paths"].get("/metrics").is_some());
    }

    #[test]
    fn every_keyed_operation_answers_401_and_500_with_the_error_body() {
        let doc = document_json(&host());
        for (path, item) in doc["paths"].as_object().unwrap() {
            for (method, op) in item.as_object().unwrap() {
                let open = OPEN_PATHS.contains(&path.as_str());
                let security = op["security"].as_array().unwrap();
                if open {
                    assert_eq!(security, &vec![serde_json::json!({})], "{method} {path}");
                    continue;
                }
                assert_eq!(security.len(), 2, "{method} {path}: bearer or X-API-Key");
                for status in ["401", "500"] {
                    assert_eq!(
                        op["responses"][status]["content"]["application/json"]["schema"]["$ref"],
                        "#/components/schemas/Error",
                        "{method} {path} {status}"
                    );
                }
                if path.contains('{') {
                    assert!(op["responses"].get("404").is_some(), "{method} {path}");
                }
                if op.get("requestBody").is_some() {
                    for status in ["400", "413"] {
                        assert!(
                            op["responses"].get(status).is_some(),
                            "{method} {path} {status}"
                        );
                    }
                }
            }
        }
        for list in ["/vms", "/images", "/templates", "/snapshots"] {
            let ok = &doc["paths"][list]["get"]["responses"]["200"];
            for header in ["X-Next-Cursor", "Link"] {
                assert!(ok["headers"].get(header).is_some(), "{list} {header}");
            }
            let params: Vec<&str> = doc["paths"][list]["get"]["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["name"].as_str().unwrap())
                .collect();
            assert!(
                params.contains(&"limit") && params.contains(&"cursor"),
                "{list}: {params:?}"
            );
        }
    }

    /// The enums the document lists are the strings the API writes.
    #[test]
    fn enums_are_the_serialized_names() {
        let doc = document_json(&host());
        let names = |schema: &str| -> Vec<String> {
            doc["components"]["schemas"][schema]["enum"]
                .as_array()
                .unwrap_or_else(|| panic!("{schema} is an enum"))
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect()
        };
        assert_eq!(
            names("VmState"),
            VmState::all()
                .iter()
                .map(|s| serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            names("CompressionState"),
            CompressionState::all()
                .iter()
                .map(|s| serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(
            names("SnapshotKind"),
            SnapshotKind::all()
                .iter()
                .map(|s| serde_json::to_value(s)
                    .unwrap()
                    .as_str()
                    .unwrap()
                    .to_string())
                .collect::<Vec<_>>()
        );
        assert_eq!(names("Hypervisor"), crate::vmm::HYPERVISORS.to_vec());
    }

    #[test]
    fn guest_ip_pattern_is_the_guest_addresses() {
        let check = |cidr: &str, inside: &[&str], outside: &[&str]| {
            let net = BridgeNet::parse(cidr).unwrap();
            let pattern = guest_ip_pattern(net);
            // The pattern is alternatives of exact octets: match by hand.
            let re = |ip: &str| matches(&pattern, ip);
            for ip in inside {
                assert!(re(ip), "{cidr}: {ip} should match {pattern}");
                assert!(net.check_guest_ip(ip.parse().unwrap()).is_ok(), "{ip}");
            }
            for ip in outside {
                assert!(!re(ip), "{cidr}: {ip} should not match {pattern}");
            }
        };
        check(
            "172.16.0.1/24",
            &["172.16.0.2", "172.16.0.10", "172.16.0.254"],
            &[
                "172.16.0.0",
                "172.16.0.1",
                "172.16.0.255",
                "172.16.1.2",
                "10.0.0.2",
                "172.16.0.2x",
            ],
        );
        check(
            "10.20.0.1/16",
            &["10.20.0.2", "10.20.5.7", "10.20.255.254"],
            &["10.20.0.1", "10.20.0.0", "10.20.255.255", "10.21.0.2"],
        );
        check(
            "192.168.7.130/26",
            &["192.168.7.129", "192.168.7.131", "192.168.7.190"],
            &[
                "192.168.7.128",
                "192.168.7.130",
                "192.168.7.191",
                "192.168.7.192",
            ],
        );
    }

    /// Whether `ip` is one of the addresses the alternatives of `pattern`
    /// spell out: each alternative is four dot-separated octet choices.
    fn matches(pattern: &str, ip: &str) -> bool {
        let body = pattern
            .strip_prefix("^(")
            .unwrap()
            .strip_suffix(")$")
            .unwrap();
        let octets: Vec<&str> = ip.split('.').collect();
        if octets.len() != 4 {
            return false;
        }
        split_top(body, '|').into_iter().any(|alt| {
            let parts = split_top(alt, '.');
            let parts: Vec<&str> = parts.iter().map(|p| p.trim_end_matches('\\')).collect();
            parts.len() == 4
                && parts
                    .iter()
                    .zip(&octets)
                    .all(|(choice, octet)| octet_matches(choice, octet))
        })
    }

    fn octet_matches(choice: &str, octet: &str) -> bool {
        let Ok(n) = octet.parse::<u16>() else {
            return false;
        };
        if n.to_string() != octet {
            return false;
        }
        if choice.starts_with("(25[0-5]") {
            return n <= 255;
        }
        let inner = choice.trim_start_matches('(').trim_end_matches(')');
        inner.split('|').any(|c| c == octet)
    }

    /// Splits on `sep` outside parentheses.
    fn split_top(s: &str, sep: char) -> Vec<&str> {
        let (mut depth, mut start, mut out) = (0, 0, vec![]);
        for (i, c) in s.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth -= 1,
                c if c == sep && depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + c.len_utf8();
                }
                _ => {}
            }
        }
        out.push(&s[start..]);
        out
    }

    #[test]
    fn the_document_is_valid_json_once_serialized() {
        let bytes = json(&host());
        let back: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(back["openapi"], "3.1.0");
        assert_eq!(back, document_json(&host()));
    }
}
