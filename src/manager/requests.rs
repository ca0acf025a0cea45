//! Typed requests with their validation: invalid input never reaches code that acts.

use crate::snapshot::CompressionConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
use utoipa::ToSchema;

pub const VCPU_RANGE: (i64, i64) = (1, 32);
pub const MEM_RANGE: (i64, i64) = (128, 65536);
pub const DEFAULT_VCPUS: i64 = 1;
pub const DEFAULT_MEM_MIB: i64 = 512;
const MAX_BOOT_ARGS: usize = 4096;
const MAX_USER_DATA: usize = 256 * 1024;
const MAX_NAME: usize = 128;
const MAX_DESCRIPTION: usize = 4096;
/// Instance and snapshot names (Hypeman API): DNS-label-like, at most 63 characters.
const MAX_RESOURCE_NAME: usize = 63;
const MAX_TAGS: usize = 50;
const MAX_TAG_KEY: usize = 128;
const MAX_TAG_VALUE: usize = 256;

/// `POST /vms`: every field may be left out (an empty body boots the default image).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub image_id: Option<String>,
    pub template_id: Option<String>,
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu_count: Option<i64>,
    #[schema(minimum = 128, maximum = 65536)]
    pub mem_mib: Option<i64>,
    /// The kernel command line: one line, at most 4096 bytes.
    #[schema(max_length = 4096, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub boot_args: Option<String>,
    pub enable_network: Option<bool>,
    /// An address inside the bridge's network (only with networking on).
    #[schema(format = Ipv4)]
    pub guest_ip: Option<String>,
    /// A unicast, non-zero MAC (only with networking on).
    #[schema(pattern = "^(?!00(:00){5}$)[0-9A-Fa-f][02468AaCcEe](:[0-9A-Fa-f]{2}){5}$")]
    pub guest_mac: Option<String>,
    /// cloud-init user data, at most 256 KiB.
    #[schema(max_length = 262144)]
    pub user_data: Option<String>,
    /// Hypeman's instance name: lowercase letters, digits and dashes, unique per owner.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub name: Option<String>,
    /// This VM's default compression for its snapshots (overrides the server's).
    pub snapshot_compression: Option<CompressionConfig>,
    /// Idle sleep for this VM (default true: the server's HATCH_IDLE_TIMEOUT applies).
    pub auto_sleep: Option<bool>,
    /// This VM's own idle timeout, in seconds (also turns idle sleep on for it
    /// when the server has none).
    #[schema(minimum = 1, maximum = 2592000)]
    pub idle_timeout_seconds: Option<i64>,
    /// The backend it runs on (one of `vmm::HYPERVISORS`, and one this daemon
    /// has); the server's default when absent.
    #[schema(value_type = Option<crate::api::openapi::Hypervisor>)]
    pub hypervisor: Option<String>,
}

/// The longest idle timeout a VM may have: 30 days.
pub const MAX_IDLE_TIMEOUT_SECONDS: i64 = 30 * 24 * 3600;

fn check_idle_timeout(t: i64) -> Result<(), String> {
    check_range("idle_timeout_seconds", t, (1, MAX_IDLE_TIMEOUT_SECONDS))
}

/// `PATCH /vms/{id}`: the settings that can change on an existing VM. An
/// absent field is left alone; `null` clears a nullable one.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UpdateVm {
    /// Cannot be cleared: `null` is refused rather than read as "leave alone".
    #[serde(default, deserialize_with = "not_null")]
    #[schema(nullable = false)]
    pub auto_sleep: Option<bool>,
    /// `null` goes back to the server's HATCH_IDLE_TIMEOUT.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<i64>, minimum = 1, maximum = 2592000)]
    pub idle_timeout_seconds: Option<Option<i64>>,
    /// `null` goes back to the server's default.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<CompressionConfig>)]
    pub snapshot_compression: Option<Option<CompressionConfig>>,
}

/// A field that may be absent but not `null`.
fn not_null<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    T::deserialize(d).map(Some)
}

/// Tells `"field": null` (Some(None)) apart from an absent field (None).
fn present<'de, T, D>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    T: Deserialize<'de>,
    D: serde::Deserializer<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl UpdateVm {
    pub fn validate(&self) -> Result<(), String> {
        if self.auto_sleep.is_none()
            && self.idle_timeout_seconds.is_none()
            && self.snapshot_compression.is_none()
        {
            return Err(
                "nothing to change: give auto_sleep, idle_timeout_seconds or snapshot_compression"
                    .into(),
            );
        }
        if let Some(Some(t)) = self.idle_timeout_seconds {
            check_idle_timeout(t)?;
        }
        if let Some(Some(c)) = &self.snapshot_compression {
            c.validate()
                .map_err(|e| format!("snapshot_compression: {e}"))?;
        }
        Ok(())
    }
}

/// `POST /vms/{id}/routes`.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRoute {
    #[schema(value_type = i64, minimum = 1, maximum = 65535)]
    pub target_port: Option<i64>,
    /// One DNS label, not a reserved name (`admin`, `api`, `www`, ...); random when absent.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub subdomain: Option<String>,
    pub auto_wake: Option<bool>,
}

/// Subdomains no route may take: names users expect to be the service's own.
pub const RESERVED_SUBDOMAINS: &[&str] = &[
    "admin",
    "api",
    "app",
    "auth",
    "dashboard",
    "docs",
    "ftp",
    "hatch",
    "localhost",
    "login",
    "mail",
    "proxy",
    "smtp",
    "static",
    "status",
    "support",
    "www",
];

/// A route's subdomain: the rules of a resource name (one DNS label), and
/// not a reserved name.
pub fn check_subdomain(s: &str) -> Result<(), String> {
    check_resource_name("subdomain", s)?;
    if RESERVED_SUBDOMAINS.contains(&s) {
        return Err(format!("subdomain {s:?} is reserved"));
    }
    Ok(())
}

impl CreateRoute {
    /// Returns the target port.
    pub fn validate(&self) -> Result<u16, String> {
        let port = self
            .target_port
            .ok_or("target_port is required (1-65535)")?;
        check_range("target_port", port, (1, 65535))?;
        if let Some(s) = &self.subdomain {
            check_subdomain(s)?;
        }
        Ok(port as u16)
    }
}

pub use crate::domain::SnapshotKind;

/// `POST /instances/{id}/snapshots` (Hypeman API).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSnapshot {
    #[schema(value_type = SnapshotKind)]
    pub kind: Option<String>,
    /// Only for a Standby snapshot (a Stopped one has no memory).
    pub compression: Option<CompressionConfig>,
    /// Unique per source instance.
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub name: Option<String>,
    #[schema(value_type = Option<crate::api::openapi::Tags>)]
    pub tags: Option<BTreeMap<String, String>>,
}

impl CreateSnapshot {
    pub fn validate(&self) -> Result<SnapshotKind, String> {
        let kind = match &self.kind {
            None => return Err("kind is required: Standby or Stopped".into()),
            Some(k) => SnapshotKind::parse(k)?,
        };
        if let Some(n) = &self.name {
            check_resource_name("name", n)?;
        }
        if let Some(c) = &self.compression {
            c.validate()?;
            if kind == SnapshotKind::Stopped && c.enabled {
                return Err(
                    "compression applies to the memory of a Standby snapshot; a Stopped snapshot has none"
                        .into(),
                );
            }
        }
        if let Some(t) = &self.tags {
            check_tags(t)?;
        }
        Ok(kind)
    }
}

/// What a restored or forked instance becomes (the Hypeman API's `target_state`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ToSchema)]
pub enum TargetState {
    Stopped,
    Standby,
    Running,
}

/// The body of a restore (`POST /instances/{id}/snapshots/{sid}/restore`) and
/// of a fork (`POST /snapshots/{id}/fork`, which also names the new instance).
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FromSnapshot {
    /// The new instance's name (fork only; a restore keeps the instance's).
    #[schema(pattern = "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$", max_length = 63)]
    pub name: Option<String>,
    /// `Running` by default for a Standby snapshot, `Stopped` for a Stopped one.
    #[schema(value_type = Option<TargetState>)]
    pub target_state: Option<String>,
    /// Only for a Stopped snapshot.
    #[schema(value_type = Option<crate::api::openapi::Hypervisor>)]
    pub target_hypervisor: Option<String>,
}

impl FromSnapshot {
    /// Resolves `target_state` and checks `target_hypervisor` for a snapshot
    /// of `kind` on a host whose backends are `available`. A Standby snapshot
    /// holds a memory image only its own hypervisor can load, so only a
    /// Stopped one may move to another; a Stopped one has no memory to resume.
    pub fn target(&self, kind: SnapshotKind, available: &[&str]) -> Result<TargetState, String> {
        let state = match self.target_state.as_deref() {
            None => match kind {
                SnapshotKind::Standby => TargetState::Running,
                SnapshotKind::Stopped => TargetState::Stopped,
            },
            Some("Running") => TargetState::Running,
            Some("Standby") => TargetState::Standby,
            Some("Stopped") => TargetState::Stopped,
            Some(other) => {
                return Err(format!(
                    "target_state must be Stopped, Standby or Running, got {other:?}"
                ))
            }
        };
        if kind == SnapshotKind::Stopped && state == TargetState::Standby {
            return Err(
                "target_state Standby needs a Standby snapshot; a Stopped snapshot holds no memory"
                    .into(),
            );
        }
        if let Some(h) = &self.target_hypervisor {
            check_hypervisor("target_hypervisor", h)?;
            if kind == SnapshotKind::Standby {
                return Err(
                    "target_hypervisor can only be given for a Stopped snapshot: a Standby snapshot's memory loads only in the hypervisor that saved it"
                        .into(),
                );
            }
            if !available.contains(&h.as_str()) {
                return Err(format!(
                    "target_hypervisor {h} is not available on this host (it runs {})",
                    available.join(", ")
                ));
            }
        }
        Ok(state)
    }
}

/// A hypervisor name from a request: one the API knows (`vmm::HYPERVISORS`),
/// whether or not this daemon has a backend for it (the registry says that).
pub fn check_hypervisor(field: &str, name: &str) -> Result<(), String> {
    if crate::vmm::HYPERVISORS.contains(&name) {
        return Ok(());
    }
    Err(format!(
        "{field} must be one of {}, got {name:?}",
        crate::vmm::HYPERVISORS.join(", ")
    ))
}

/// Instance and snapshot names: lowercase letters, digits and dashes, not
/// starting or ending with a dash, at most 63 characters (Hypeman API).
pub fn check_resource_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > MAX_RESOURCE_NAME {
        return Err(format!(
            "{field} must be 1 to {MAX_RESOURCE_NAME} characters, got {}",
            name.len()
        ));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err(format!(
            "{field} {name:?} may contain only lowercase letters, digits and dashes"
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(format!("{field} {name:?} cannot start or end with a dash"));
    }
    Ok(())
}

fn check_tags(tags: &BTreeMap<String, String>) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "at most {MAX_TAGS} tags are allowed, got {}",
            tags.len()
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.len() > MAX_TAG_KEY || has_hidden_chars(k) {
            return Err(format!(
                "tag key {k:?} must be 1 to {MAX_TAG_KEY} characters without control or format (bidi) characters"
            ));
        }
        if v.len() > MAX_TAG_VALUE || has_hidden_chars(v) {
            return Err(format!(
                "tag {k:?}: the value must be at most {MAX_TAG_VALUE} characters without control or format (bidi) characters"
            ));
        }
    }
    Ok(())
}

/// `POST /images` with a JSON body: a path import (uploads are multipart).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    #[schema(min_length = 1, max_length = 128)]
    pub name: Option<String>,
    #[schema(value_type = String)]
    pub kernel_path: Option<String>,
    /// An ELF `vmlinux` beside a bzImage `kernel_path`.
    pub kernel_elf_path: Option<String>,
    #[schema(value_type = String)]
    pub rootfs_path: Option<String>,
    pub initrd_path: Option<String>,
    #[schema(max_length = 4096, pattern = r"^[^\u0000-\u001f\u007f-\u009f]*$")]
    pub boot_args: Option<String>,
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    #[schema(value_type = String, min_length = 1, max_length = 128)]
    pub name: Option<String>,
    #[schema(max_length = 4096)]
    pub description: Option<String>,
    pub image_id: Option<String>,
    #[schema(max_length = 262144)]
    pub user_data: Option<String>,
    #[schema(minimum = 1, maximum = 32)]
    pub vcpu_count: Option<i64>,
    #[schema(minimum = 128, maximum = 65536)]
    pub mem_mib: Option<i64>,
}

/// Filters of Hypeman's `GET /snapshots`: `kind`, `name`, `source_instance_id`
/// and tags as `tags[KEY]=VALUE` (all must match).
#[derive(Debug, Default, PartialEq)]
pub struct SnapshotFilter {
    pub kind: Option<SnapshotKind>,
    pub name: Option<String>,
    pub source_instance_id: Option<String>,
    pub tags: Vec<(String, String)>,
}

impl SnapshotFilter {
    /// Parses an already percent-decoded query.
    pub fn parse(pairs: &[(String, String)]) -> Result<SnapshotFilter, String> {
        let mut f = SnapshotFilter::default();
        for (k, v) in pairs {
            match k.as_str() {
                "kind" => f.kind = Some(SnapshotKind::parse(v)?),
                "name" => f.name = Some(v.clone()),
                "source_instance_id" => f.source_instance_id = Some(v.clone()),
                _ => match k.strip_prefix("tags[").and_then(|t| t.strip_suffix(']')) {
                    Some(tag) if !tag.is_empty() => f.tags.push((tag.to_string(), v.clone())),
                    _ => return Err(format!("unknown query parameter {k:?}")),
                },
            }
        }
        Ok(f)
    }

    pub fn matches(&self, s: &crate::store::Snapshot) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == s.kind)
            && self
                .name
                .as_ref()
                .is_none_or(|n| Some(n) == s.name.as_ref())
            && self
                .source_instance_id
                .as_ref()
                .is_none_or(|i| *i == s.vm_id)
            && self.tags.iter().all(|(k, v)| s.tags.get(k) == Some(v))
    }
}

pub fn check_range(field: &str, value: i64, (lo, hi): (i64, i64)) -> Result<(), String> {
    if value < lo || value > hi {
        return Err(format!(
            "{field} must be between {lo} and {hi}, got {value}"
        ));
    }
    Ok(())
}

pub fn check_boot_args(args: &str) -> Result<(), String> {
    if args.len() > MAX_BOOT_ARGS {
        return Err(format!("boot_args must be at most {MAX_BOOT_ARGS} bytes"));
    }
    if args.chars().any(|c| c.is_control()) {
        return Err("boot_args must be a single line without control characters".into());
    }
    Ok(())
}

pub fn check_user_data(data: &str) -> Result<(), String> {
    if data.len() > MAX_USER_DATA {
        return Err(format!("user_data must be at most {MAX_USER_DATA} bytes"));
    }
    Ok(())
}

/// Characters that change how text around them shows without showing
/// themselves: controls (Cc), format characters (Cf: the bidi embeddings,
/// overrides and isolates U+202A-U+202E and U+2066-U+2069, the marks U+200E,
/// U+200F and U+061C, zero-width ones), and line/paragraph separators. A name
/// holding one can pass for another name in a list (CVE-2021-42574).
pub fn is_hidden_char(c: char) -> bool {
    matches!(
        c.general_category(),
        GeneralCategory::Control
            | GeneralCategory::Format
            | GeneralCategory::LineSeparator
            | GeneralCategory::ParagraphSeparator
    )
}

fn has_hidden_chars(s: &str) -> bool {
    s.chars().any(is_hidden_char)
}

fn check_name(field: &str, name: &str, max: usize) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if name.len() > max {
        return Err(format!("{field} must be at most {max} characters"));
    }
    if has_hidden_chars(name) {
        return Err(format!(
            "{field} must not contain control or format (bidi) characters"
        ));
    }
    Ok(())
}

impl CreateVm {
    /// Checks what can be checked without the store.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(v) = self.vcpu_count {
            check_range("vcpu_count", v, VCPU_RANGE)?;
        }
        if let Some(m) = self.mem_mib {
            check_range("mem_mib", m, MEM_RANGE)?;
        }
        if let Some(a) = &self.boot_args {
            check_boot_args(a)?;
        }
        if let Some(u) = &self.user_data {
            check_user_data(u)?;
        }
        if let Some(ip) = &self.guest_ip {
            ip.parse::<std::net::Ipv4Addr>()
                .map_err(|_| format!("guest_ip {ip:?} is not an IPv4 address"))?;
        }
        if let Some(mac) = &self.guest_mac {
            crate::net::ipam::parse_mac(mac)?;
        }
        if let Some(n) = &self.name {
            check_resource_name("name", n)?;
        }
        if let Some(c) = &self.snapshot_compression {
            c.validate()
                .map_err(|e| format!("snapshot_compression: {e}"))?;
        }
        if let Some(t) = self.idle_timeout_seconds {
            check_idle_timeout(t)?;
        }
        if let Some(h) = &self.hypervisor {
            check_hypervisor("hypervisor", h)?;
        }
        if self.enable_network == Some(false) {
            for (field, value) in [("guest_ip", &self.guest_ip), ("guest_mac", &self.guest_mac)] {
                if value.is_some() {
                    return Err(format!(
                        "{field} cannot be set when enable_network is false"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The fields an image has besides its files, for imports and uploads alike.
pub fn check_image_meta(name: Option<&str>, boot_args: Option<&str>) -> Result<(), String> {
    if let Some(n) = name {
        check_name("name", n, MAX_NAME)?;
    }
    if let Some(a) = boot_args {
        check_boot_args(a)?;
    }
    Ok(())
}

impl CreateImage {
    pub fn validate(&self) -> Result<(), String> {
        check_image_meta(self.name.as_deref(), None)?;
        if self.kernel_path.is_none() {
            return Err("kernel_path is required".into());
        }
        if self.rootfs_path.is_none() {
            return Err("rootfs_path is required".into());
        }
        check_image_meta(None, self.boot_args.as_deref())
    }
}

impl CreateTemplate {
    pub fn validate(&self) -> Result<(), String> {
        match &self.name {
            None => return Err("name is required".into()),
            Some(n) => check_name("name", n, MAX_NAME)?,
        }
        if let Some(d) = &self.description {
            if d.len() > MAX_DESCRIPTION {
                return Err(format!(
                    "description must be at most {MAX_DESCRIPTION} characters"
                ));
            }
            // Line breaks and tabs are fine in a description; hidden characters are not.
            if d.chars()
                .any(|c| is_hidden_char(c) && !matches!(c, '\n' | '\r' | '\t'))
            {
                return Err(
                    "description must not contain control or format (bidi) characters other than line breaks and tabs".into(),
                );
            }
        }
        if let Some(v) = self.vcpu_count {
            check_range("vcpu_count", v, VCPU_RANGE)?;
        }
        if let Some(m) = self.mem_mib {
            check_range("mem_mib", m, MEM_RANGE)?;
        }
        if let Some(u) = &self.user_data {
            check_user_data(u)?;
        }
        Ok(())
    }
}

/// The kernel command line a VM boots with: the request's, else the image's,
/// else ours; a serial console is added when none is named so logs work.
pub fn effective_boot_args(requested: Option<&str>, image_default: Option<&str>) -> String {
    let base = requested
        .or(image_default)
        .unwrap_or("console=ttyS0 root=/dev/vda rw")
        .trim()
        .to_string();
    if base.split_whitespace().any(|w| w.starts_with("console=")) {
        base
    } else if base.is_empty() {
        "console=ttyS0".into()
    } else {
        format!("{base} console=ttyS0")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_name_the_field() {
        let r = CreateVm {
            vcpu_count: Some(33),
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().starts_with("vcpu_count"));
        let r = CreateVm {
            vcpu_count: Some(0),
            ..Default::default()
        };
        assert!(r.validate().is_err());
        let r = CreateVm {
            mem_mib: Some(127),
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().starts_with("mem_mib"));
        let r = CreateVm {
            mem_mib: Some(65537),
            ..Default::default()
        };
        assert!(r.validate().is_err());
        let ok = CreateVm {
            vcpu_count: Some(32),
            mem_mib: Some(128),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
        let ok = CreateVm {
            vcpu_count: Some(1),
            mem_mib: Some(65536),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn snapshot_filters() {
        let p = |q: &[(&str, &str)]| {
            SnapshotFilter::parse(
                &q.iter()
                    .map(|(a, b)| (a.to_string(), b.to_string()))
                    .collect::<Vec<_>>(),
            )
        };
        let f = p(&[
            ("kind", "Standby"),
            ("tags[team]", "backend"),
            ("source_instance_id", "vm_a"),
        ])
        .unwrap();
        assert_eq!(f.tags, vec![("team".to_string(), "backend".to_string())]);
        assert!(p(&[("kind", "Paused")])
            .unwrap_err()
            .contains("Standby or Stopped"));
        assert!(p(&[("colour", "red")])
            .unwrap_err()
            .contains("unknown query parameter"));
        assert!(p(&[("tags[]", "x")]).is_err());
        let snap = |kind: &str, vm: &str, tags: &str| crate::store::Snapshot {
            name: Some("pre-upgrade".into()),
            tags: crate::domain::Json(serde_json::from_str(tags).unwrap()),
            ..crate::snapshot::capturing_record(
                "snap_x",
                vm,
                "o",
                SnapshotKind::parse(kind).unwrap(),
                "vz",
                Default::default(),
            )
        };
        assert!(f.matches(&snap("Standby", "vm_a", r#"{"team":"backend","env":"x"}"#)));
        assert!(!f.matches(&snap("Stopped", "vm_a", r#"{"team":"backend"}"#)));
        assert!(!f.matches(&snap("Standby", "vm_b", r#"{"team":"backend"}"#)));
        assert!(!f.matches(&snap("Standby", "vm_a", r#"{"team":"frontend"}"#)));
        assert!(p(&[("name", "pre-upgrade")])
            .unwrap()
            .matches(&snap("Standby", "vm_z", "{}")));
        assert!(!p(&[("name", "other")])
            .unwrap()
            .matches(&snap("Standby", "vm_z", "{}")));
    }

    #[test]
    fn a_hypervisor_is_one_the_api_knows() {
        for h in crate::vmm::HYPERVISORS {
            let r = CreateVm {
                hypervisor: Some(h.into()),
                ..Default::default()
            };
            assert_eq!(r.validate(), Ok(()), "{h}");
        }
        for bad in ["", "VZ", "xen", "vz ", "../vz"] {
            let r = CreateVm {
                hypervisor: Some(bad.into()),
                ..Default::default()
            };
            assert_eq!(
                r.validate().unwrap_err(),
                format!(
                    "hypervisor must be one of {}, got {bad:?}",
                    crate::vmm::HYPERVISORS.join(", ")
                )
            );
        }
    }

    #[test]
    fn network_fields_are_checked() {
        let r = CreateVm {
            guest_ip: Some("172.16.0.300".into()),
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().contains("not an IPv4 address"));
        let r = CreateVm {
            guest_mac: Some("zz".into()),
            ..Default::default()
        };
        assert!(r.validate().unwrap_err().starts_with("guest_mac"));
        let r = CreateVm {
            enable_network: Some(false),
            guest_ip: Some("172.16.0.5".into()),
            ..Default::default()
        };
        assert!(r
            .validate()
            .unwrap_err()
            .contains("enable_network is false"));
        let ok = CreateVm {
            guest_ip: Some("172.16.0.5".into()),
            guest_mac: Some("02:fc:00:00:00:05".into()),
            ..Default::default()
        };
        assert!(ok.validate().is_ok());
    }

    #[test]
    fn boot_args_get_a_console() {
        assert_eq!(
            effective_boot_args(None, None),
            "console=ttyS0 root=/dev/vda rw"
        );
        assert_eq!(
            effective_boot_args(Some("root=/dev/vda quiet"), None),
            "root=/dev/vda quiet console=ttyS0"
        );
        assert_eq!(
            effective_boot_args(None, Some("console=hvc0")),
            "console=hvc0"
        );
        assert_eq!(
            effective_boot_args(Some("a=1"), Some("b=2")),
            "a=1 console=ttyS0"
        );
        assert!(check_boot_args("a\nb").is_err());
    }

    #[test]
    fn auto_sleep_cannot_be_null() {
        let u = |j: &str| serde_json::from_str::<UpdateVm>(j);
        assert!(u(r#"{"auto_sleep": null, "idle_timeout_seconds": 1}"#).is_err());
        assert_eq!(
            u(r#"{"auto_sleep": false}"#).unwrap().auto_sleep,
            Some(false)
        );
        assert_eq!(
            u(r#"{"idle_timeout_seconds": null}"#).unwrap().auto_sleep,
            None
        );
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<CreateVm>(r#"{"memory_mib": 512}"#).unwrap_err();
        assert!(e.to_string().contains("memory_mib"));
    }

    #[test]
    fn resource_names_follow_the_hypeman_api() {
        for ok in ["a", "pre-upgrade", "web1", "0-0", &"x".repeat(63)] {
            assert!(check_resource_name("name", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a.b",
            "a b",
            "é",
            &"x".repeat(64),
        ] {
            assert!(check_resource_name("name", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn snapshot_requests() {
        let req = |j: &str| {
            serde_json::from_str::<CreateSnapshot>(j)
                .unwrap()
                .validate()
        };
        assert_eq!(req(r#"{"kind":"Standby"}"#), Ok(SnapshotKind::Standby));
        assert_eq!(
            req(r#"{"kind":"Stopped","tags":{"a":"b"}}"#),
            Ok(SnapshotKind::Stopped)
        );
        assert!(req("{}").unwrap_err().contains("kind is required"));
        assert!(req(r#"{"kind":"standby"}"#)
            .unwrap_err()
            .contains("Standby or Stopped"));
        assert!(req(r#"{"kind":"Standby","name":"Bad"}"#).is_err());
        assert!(req(r#"{"kind":"Stopped","compression":{"enabled":true}}"#)
            .unwrap_err()
            .contains("Stopped snapshot has none"));
        // Disabled compression is ignored whatever else it says (Hypeman API).
        assert!(req(r#"{"kind":"Stopped","compression":{"enabled":false,"level":99}}"#).is_ok());
        assert!(req(
            r#"{"kind":"Standby","compression":{"enabled":true,"algorithm":"lz4","level":10}}"#
        )
        .is_err());
        let many: BTreeMap<String, String> =
            (0..51).map(|i| (format!("k{i}"), "v".into())).collect();
        assert!(check_tags(&many).unwrap_err().contains("at most 50"));
        assert!(
            serde_json::from_str::<CreateSnapshot>(r#"{"kind":"Standby","colour":1}"#).is_err()
        );
    }

    #[test]
    fn restore_and_fork_targets() {
        let t = |state: Option<&str>, hv: Option<&str>, kind| {
            FromSnapshot {
                name: None,
                target_state: state.map(str::to_string),
                target_hypervisor: hv.map(str::to_string),
            }
            .target(kind, &["vz"])
        };
        use SnapshotKind::*;
        assert_eq!(t(None, None, Standby), Ok(TargetState::Running));
        assert_eq!(t(None, None, Stopped), Ok(TargetState::Stopped));
        assert_eq!(t(Some("Standby"), None, Standby), Ok(TargetState::Standby));
        assert_eq!(
            t(Some("Running"), Some("vz"), Stopped),
            Ok(TargetState::Running)
        );
        assert!(t(Some("Standby"), None, Stopped).is_err());
        assert!(t(Some("Paused"), None, Standby).is_err());
        assert!(t(None, Some("vz"), Standby)
            .unwrap_err()
            .contains("only be given for a Stopped snapshot"));
        assert!(t(None, Some("cloud-hypervisor"), Stopped)
            .unwrap_err()
            .contains("not available"));
        assert!(t(None, Some("xen"), Stopped)
            .unwrap_err()
            .contains("one of"));
    }

    #[test]
    fn names_refuse_control_and_bidi_characters() {
        for bad in [
            "evil\u{202E}gpj.exe",
            "a\u{2066}b",
            "a\u{2069}",
            "\u{200E}name",
            "name\u{200F}",
            "a\u{061C}b",
            "zero\u{200B}width",
            "bom\u{FEFF}",
            "soft\u{AD}hyphen",
            "tab\there",
            "line\u{2028}sep",
            "nul\u{0}",
        ] {
            assert!(check_name("name", bad, MAX_NAME).is_err(), "{bad:?}");
            let tags = BTreeMap::from([(bad.to_string(), "v".to_string())]);
            assert!(check_tags(&tags).is_err(), "key {bad:?}");
            let tags = BTreeMap::from([("k".to_string(), bad.to_string())]);
            assert!(check_tags(&tags).is_err(), "value {bad:?}");
        }
        for ok in ["web server", "Überprüfung", "日本語", "emoji 🚀", "a-b_c.d"] {
            assert!(check_name("name", ok, MAX_NAME).is_ok(), "{ok:?}");
        }
        let t = |d: &str| {
            serde_json::from_value::<CreateTemplate>(
                serde_json::json!({"name": "t", "description": d}),
            )
            .unwrap()
        };
        assert!(t("two\nlines\tand a tab").validate().is_ok());
        assert!(t("a \u{202E}reversed").validate().is_err());
    }

    #[test]
    fn template_needs_a_name() {
        let t = CreateTemplate {
            name: None,
            description: None,
            image_id: None,
            user_data: None,
            vcpu_count: None,
            mem_mib: None,
        };
        assert_eq!(t.validate().unwrap_err(), "name is required");
    }
}
