//! JSON shapes of the Hatch API's objects; the VM is also the Hypeman API's instance (docs/API.md).

use crate::config::ProxyConfig;
use crate::domain::{CompressionState, MacAddr, VmState};
use crate::snapshot::CompressionConfig;
use crate::store::{Image, Route, Snapshot, Template, Vm};
use serde::Serialize;
use std::net::Ipv4Addr;
use utoipa::ToSchema;

/// A VM (the Hypeman API's instance).
#[derive(Serialize, ToSchema)]
#[schema(as = Vm)]
pub struct VmView {
    pub id: String,
    /// Hypeman's instance name (null when none was given).
    pub name: Option<String>,
    pub image_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub template_id: Option<String>,
    pub state: VmState,
    pub vcpu_count: i64,
    pub mem_mib: i64,
    pub boot_args: String,
    #[schema(value_type = Option<String>, format = Ipv4)]
    pub guest_ip: Option<Ipv4Addr>,
    pub guest_mac: Option<MacAddr>,
    pub tap_name: Option<String>,
    pub ssh_port: Option<i64>,
    pub enable_network: bool,
    #[schema(value_type = super::openapi::Hypervisor)]
    pub hypervisor: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The VM's own default for snapshot compression, when it has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_compression: Option<CompressionConfig>,
    /// Idle sleep: false when this VM opted out.
    pub auto_sleep: bool,
    /// Its own idle timeout (null: the server's HATCH_IDLE_TIMEOUT).
    pub idle_timeout_seconds: Option<i64>,
    /// When the idle monitor last put it to sleep, and a request last woke it.
    pub last_sleep_at: Option<String>,
    pub last_wake_at: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Vm> for VmView {
    fn from(v: Vm) -> Self {
        VmView {
            id: v.id,
            name: v.name,
            snapshot_compression: v.snapshot_compression.map(|c| c.0),
            image_id: v.image_id,
            template_id: v.template_id,
            state: v.state,
            vcpu_count: v.vcpu_count,
            mem_mib: v.mem_mib,
            boot_args: v.boot_args,
            guest_ip: v.guest_ip,
            guest_mac: v.guest_mac,
            tap_name: v.tap_name,
            ssh_port: v.ssh_port,
            enable_network: v.enable_network,
            hypervisor: v.hypervisor,
            last_error: v.last_error,
            auto_sleep: v.auto_sleep,
            idle_timeout_seconds: v.idle_timeout_seconds,
            last_sleep_at: v.last_sleep_at,
            last_wake_at: v.last_wake_at,
            created_at: v.created_at,
            updated_at: v.updated_at,
        }
    }
}

/// A proxy route: `{subdomain}.{HATCH_PROXY_BASE_DOMAIN}` to a port of a VM.
#[derive(Serialize, ToSchema)]
#[schema(as = Route)]
pub struct RouteView {
    pub id: String,
    pub vm_id: String,
    pub subdomain: String,
    /// The host name the proxy serves this route under.
    pub host: String,
    /// Where to reach it: the proxy's own address (null when the proxy is off).
    pub url: Option<String>,
    pub target_port: i64,
    pub auto_wake: bool,
    pub created_at: String,
}

impl RouteView {
    pub fn new(r: Route, proxy: &ProxyConfig) -> RouteView {
        let host = format!("{}.{}", r.subdomain, proxy.base_domain);
        RouteView {
            url: proxy.addr.map(|a| match a.port() {
                80 => format!("http://{host}/"),
                p => format!("http://{host}:{p}/"),
            }),
            host,
            id: r.id,
            vm_id: r.vm_id,
            subdomain: r.subdomain,
            target_port: r.target_port,
            auto_wake: r.auto_wake,
            created_at: r.created_at,
        }
    }
}

/// An image as its users see it: what it is and how it boots, never the host
/// paths it came from.
#[derive(Serialize, ToSchema)]
#[schema(as = Image)]
pub struct ImageView {
    pub id: String,
    pub name: Option<String>,
    /// `upload`, `import` (from HATCH_IMAGE_IMPORT_DIRS) or `default` (the operator's).
    pub source: String,
    /// The stored files' lengths added up.
    pub size_bytes: i64,
    pub has_initrd: bool,
    /// The kernel formats it carries (`bzImage`, `elf`), read from its files.
    #[schema(value_type = Vec<String>)]
    pub kernels: Vec<&'static str>,
    pub boot_args: Option<String>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Image> for ImageView {
    fn from(i: Image) -> Self {
        let kernels = crate::image::kernels_in(std::path::Path::new(&i.dir))
            .into_iter()
            .map(|(kind, _)| kind.api_name())
            .collect();
        ImageView {
            kernels,
            id: i.id,
            name: i.name,
            source: i.source,
            size_bytes: i.size_bytes,
            has_initrd: i.has_initrd,
            boot_args: i.boot_args,
            created_at: i.created_at,
            updated_at: i.updated_at,
        }
    }
}

/// Defaults for new VMs (`template_id` of `POST /vms`).
#[derive(Serialize, ToSchema)]
#[schema(as = Template)]
pub struct TemplateView {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub image_id: Option<String>,
    pub user_data: Option<String>,
    pub vcpu_count: Option<i64>,
    pub mem_mib: Option<i64>,
    pub created_at: String,
    pub updated_at: String,
}

impl From<Template> for TemplateView {
    fn from(t: Template) -> Self {
        TemplateView {
            id: t.id,
            name: t.name,
            description: t.description,
            image_id: t.image_id,
            user_data: t.user_data,
            vcpu_count: t.vcpu_count,
            mem_mib: t.mem_mib,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

/// A snapshot as the Hatch API shows it (docs/API.md, "Hatch snapshots").
#[derive(Serialize, ToSchema)]
#[schema(as = HatchSnapshot)]
pub struct HatchSnapshotView {
    pub id: String,
    pub vm_id: String,
    pub state_key: String,
    pub memory_key: String,
    pub disk_key: String,
    pub vm_config: String,
    pub size_bytes: i64,
    pub created_at: String,
}

impl From<Snapshot> for HatchSnapshotView {
    fn from(s: Snapshot) -> Self {
        HatchSnapshotView {
            id: s.id,
            vm_id: s.vm_id,
            state_key: s.state_key,
            // Once compressed, the memory lives in the compressed object.
            memory_key: match (s.compression_state, s.compressed_key) {
                (CompressionState::Compressed, Some(k)) => k,
                _ => s.memory_key,
            },
            disk_key: s.disk_key,
            // The Hatch API shows the config as a JSON string.
            vm_config: serde_json::to_string(&s.vm_config.0).unwrap_or_default(),
            size_bytes: s.size_bytes,
            created_at: s.created_at,
        }
    }
}
