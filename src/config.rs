//! Daemon configuration, read once at start-up from `HATCH_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::net::ipam::{self, BridgeNet};
use crate::net::NetConfig;
use crate::snapshot::CompressionConfig;

#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub default_kernel: Option<PathBuf>,
    pub default_rootfs: Option<PathBuf>,
    pub default_initrd: Option<PathBuf>,
    /// A second kernel for the default image: the ELF `vmlinux` of the same
    /// kernel, for backends that boot only an ELF.
    pub default_kernel_elf: Option<PathBuf>,
    pub default_boot_args: Option<String>,
    /// Each hypervisor backend's own settings (src/vmm).
    pub backends: crate::vmm::BackendsConfig,
    /// How long a graceful (ACPI) shutdown may take before the VMM is killed.
    pub stop_timeout: Duration,
    pub net: NetConfig,
    /// Where snapshots are stored: an S3 bucket when set, else `data_dir/objects`.
    pub s3: Option<S3Config>,
    /// The compression a snapshot gets when its request does not say (the Hypeman API's server default).
    pub snapshot_compression: CompressionConfig,
    /// HATCH_CHUNK_GRACE (default 1h): how long a snapshot chunk no manifest
    /// references any more stays in the store, so a VM that sleeps again
    /// soon after its last sleep snapshot went uploads only what changed.
    pub chunk_grace: Duration,
    pub proxy: ProxyConfig,
    pub idle: IdleConfig,
    pub auth: AuthConfig,
    pub images: ImageConfig,
    pub limits: LimitsConfig,
    pub api: ApiConfig,
    pub confine: ConfineConfig,
    /// HATCH_METRICS_TOKEN: who may read `GET /metrics` (src/telemetry.rs).
    pub metrics: crate::telemetry::MetricsConfig,
    pub ssh: SshConfig,
}

/// The SSH CA's certificates (src/ssh, `POST /vms/{id}/connect`).
#[derive(Debug, Clone)]
pub struct SshConfig {
    /// HATCH_SSH_CERT_TTL (default 5m, at most 24h): how long a certificate
    /// from `connect` logs in. A session that is open stays open after it.
    pub cert_ttl: Duration,
    /// HATCH_SSH_HOST: the host name `connect` tells clients to reach the
    /// SSH forwards at; unset, the host name the client used for the API.
    pub host: Option<String>,
}

/// The default of HATCH_SSH_CERT_TTL.
pub const DEFAULT_SSH_CERT_TTL: Duration = Duration::from_secs(5 * 60);
const MAX_SSH_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

impl SshConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<SshConfig, String> {
        let cert_ttl = match get("HATCH_SSH_CERT_TTL") {
            Some(v) => parse_duration(&v).map_err(|e| format!("HATCH_SSH_CERT_TTL: {e}"))?,
            None => DEFAULT_SSH_CERT_TTL,
        };
        if cert_ttl < Duration::from_secs(1) || cert_ttl > MAX_SSH_CERT_TTL {
            return Err("HATCH_SSH_CERT_TTL must be from 1s to 24h".into());
        }
        let host = match get("HATCH_SSH_HOST") {
            Some(h) => {
                let h = h.trim().to_string();
                if h.parse::<std::net::IpAddr>().is_err() {
                    check_domain(&h.to_ascii_lowercase())
                        .map_err(|e| format!("HATCH_SSH_HOST: {e}"))?;
                }
                Some(h)
            }
            None => None,
        };
        Ok(SshConfig { cert_ttl, host })
    }
}

/// How API callers may register images.
#[derive(Debug, Clone)]
pub struct ImageConfig {
    /// HATCH_IMAGE_IMPORT_DIRS: the only directories path imports may read
    /// from; empty (the default) turns path imports off.
    pub import_dirs: Vec<PathBuf>,
    /// HATCH_IMAGE_MAX_BYTES: the most an image's files may add up to.
    pub max_bytes: u64,
}

/// The default of HATCH_IMAGE_MAX_BYTES: 4 GiB, room for a Debian root disk.
pub const DEFAULT_IMAGE_MAX_BYTES: u64 = 4 << 30;

impl ImageConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<ImageConfig, String> {
        let mut import_dirs = vec![];
        for d in get("HATCH_IMAGE_IMPORT_DIRS")
            .unwrap_or_default()
            .split(',')
        {
            let d = d.trim();
            if d.is_empty() {
                continue;
            }
            let p = PathBuf::from(d);
            if !p.is_absolute() {
                return Err(format!(
                    "HATCH_IMAGE_IMPORT_DIRS: {d:?} is not an absolute path"
                ));
            }
            import_dirs.push(p);
        }
        let max_bytes = match get("HATCH_IMAGE_MAX_BYTES") {
            Some(v) => match parse_size(&v) {
                Ok(0) => return Err("HATCH_IMAGE_MAX_BYTES must be above 0".into()),
                Ok(n) => n,
                Err(e) => return Err(format!("HATCH_IMAGE_MAX_BYTES: {e}")),
            },
            None => DEFAULT_IMAGE_MAX_BYTES,
        };
        Ok(ImageConfig {
            import_dirs,
            max_bytes,
        })
    }
}

/// What one owner may hold (server-wide defaults; `hatch owners limits`
/// overrides them per owner), what the host's memory can hold, and how much
/// of each console log is kept.
#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    pub quota: Quota,
    /// Guest memory may add up to MemTotal times this (minus the reserve).
    pub memory_overcommit: f64,
    /// Memory kept for the host itself, never given to guests.
    pub host_reserve_mib: u64,
    /// Counted per VM beside its `mem_mib` (the VMM's own memory; an
    /// emulating VMM keeps translated code too), and the room a VMM's cgroup
    /// gets above its guest's RAM: one figure, so what the host promises is
    /// what the kernel enforces.
    pub vm_overhead_mib: u64,
    /// The bytes of each VM's console.log kept (its tail).
    pub console_log_max_bytes: u64,
}

/// Per-owner limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Quota {
    pub vms: u64,
    pub vcpus: u64,
    pub mem_mib: u64,
    pub snapshots_per_vm: u64,
    pub stored_bytes: u64,
}

impl Default for Quota {
    /// The Hatch product's 5 VMs per user and 10 snapshots per VM; room for
    /// those 5 VMs at up to 3 vCPUs / 3 GiB each; 20 GiB stored.
    fn default() -> Quota {
        Quota {
            vms: 5,
            vcpus: 16,
            mem_mib: 16384,
            snapshots_per_vm: 10,
            stored_bytes: 20 << 30,
        }
    }
}

impl LimitsConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<LimitsConfig, String> {
        let d = Quota::default();
        let count = |name: &str, default: u64| match get(name) {
            Some(v) => v
                .trim()
                .parse::<u64>()
                .map_err(|_| format!("{name} must be a whole number, not {v:?}")),
            None => Ok(default),
        };
        let size = |name: &str, default: u64| match get(name) {
            Some(v) => parse_size(&v).map_err(|e| format!("{name}: {e}")),
            None => Ok(default),
        };
        let memory_overcommit = match get("HATCH_MEMORY_OVERCOMMIT") {
            Some(v) => match v.trim().parse::<f64>() {
                Ok(r) if r > 0.0 && r <= 100.0 => r,
                _ => {
                    return Err(format!(
                        "HATCH_MEMORY_OVERCOMMIT must be a number above 0 (1.0: no overcommit), not {v:?}"
                    ))
                }
            },
            None => 1.0,
        };
        let console_log_max_bytes = size("HATCH_CONSOLE_LOG_MAX_BYTES", 1 << 20)?;
        if console_log_max_bytes < 64 << 10 {
            return Err("HATCH_CONSOLE_LOG_MAX_BYTES must be at least 64K".into());
        }
        Ok(LimitsConfig {
            quota: Quota {
                vms: count("HATCH_QUOTA_VMS", d.vms)?,
                vcpus: count("HATCH_QUOTA_VCPUS", d.vcpus)?,
                mem_mib: count("HATCH_QUOTA_MEM_MIB", d.mem_mib)?,
                snapshots_per_vm: count("HATCH_QUOTA_SNAPSHOTS_PER_VM", d.snapshots_per_vm)?,
                stored_bytes: size("HATCH_QUOTA_STORED_BYTES", d.stored_bytes)?,
            },
            memory_overcommit,
            host_reserve_mib: count("HATCH_HOST_MEMORY_RESERVE_MIB", 1024)?,
            vm_overhead_mib: count("HATCH_VM_MEMORY_OVERHEAD_MIB", 256)?,
            console_log_max_bytes,
        })
    }
}

/// Bounds on the API listener's connections (slow or too many clients).
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// How long a client may take to send a request's headers, the first
    /// request's and each keep-alive one's (then the connection is closed).
    pub header_timeout: Duration,
    /// Connections served at once; more wait, unserved, until one closes.
    pub max_connections: usize,
}

/// How VMM processes are confined (src/vmm/README.md, "Confinement").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfineConfig {
    /// `HATCH_VMM_CONFINE=off` runs VMMs as root without a sandbox (for benchmarks).
    pub enabled: bool,
    /// VMMs run as uid = gid = `uid_base + n`, `n < uid_count`, one per running VM.
    pub uid_base: u32,
    pub uid_count: u32,
}

impl ConfineConfig {
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<ConfineConfig, String> {
        let enabled = match get("HATCH_VMM_CONFINE").as_deref() {
            None | Some("on") => true,
            Some("off") => false,
            Some(v) => return Err(format!("HATCH_VMM_CONFINE must be on or off, not {v:?}")),
        };
        let number = |name: &str, default: u32| match get(name) {
            Some(v) => v
                .trim()
                .parse::<u32>()
                .map_err(|_| format!("{name} must be a whole number, not {v:?}")),
            None => Ok(default),
        };
        let c = ConfineConfig {
            enabled,
            uid_base: number("HATCH_VMM_UID_BASE", 1_500_000_000)?,
            uid_count: number("HATCH_VMM_UID_COUNT", 65_536)?,
        };
        // uid 0 would be root, and (uid_t)-1 means "unchanged" to setresuid.
        if c.uid_base == 0
            || c.uid_count == 0
            || c.uid_base
                .checked_add(c.uid_count)
                .is_none_or(|end| end == u32::MAX)
        {
            return Err(
                "HATCH_VMM_UID_BASE/HATCH_VMM_UID_COUNT must give a range of uids above 0 and below 4294967295"
                    .into(),
            );
        }
        Ok(c)
    }
}

/// The reverse proxy: `{subdomain}.{base_domain}` on `addr` -> a VM's port.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// None when HATCH_PROXY_ADDR is `off`.
    pub addr: Option<SocketAddr>,
    pub base_domain: String,
    /// How long the guest may take to start answering a request (then 504).
    pub request_timeout: Duration,
    /// How long a request waits for its VM to wake (restore or boot).
    pub wake_timeout: Duration,
    /// Peers whose X-Forwarded-* / Forwarded / X-Real-IP headers are kept
    /// (HATCH_PROXY_TRUSTED_PROXIES); everyone else's are replaced.
    pub trusted_proxies: Vec<crate::proxy::Cidr>,
    /// HATCH_PROXY_ACCESS_LOG: where the proxy writes one JSON line per
    /// request; None (the default) writes none.
    pub access_log: Option<AccessLogTarget>,
    /// HATCH_PROXY_THREADS: threads serving the proxy, each with its own
    /// listening socket on the address (SO_REUSEPORT) and its own
    /// connections; by default one per CPU.
    pub threads: usize,
}

/// Where the proxy's access log goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stderr,
    /// A file, appended to (created 0600 if missing).
    File(PathBuf),
}

impl AccessLogTarget {
    /// `off` (or unset), `stderr`, or an absolute file path.
    fn parse(v: Option<&str>) -> Result<Option<AccessLogTarget>, String> {
        match v.map(str::trim) {
            None | Some("" | "off") => Ok(None),
            Some("stderr") => Ok(Some(AccessLogTarget::Stderr)),
            Some(p) if p.starts_with('/') => Ok(Some(AccessLogTarget::File(PathBuf::from(p)))),
            Some(p) => Err(format!(
                "HATCH_PROXY_ACCESS_LOG must be off, stderr or an absolute file path, not {p:?}"
            )),
        }
    }
}

/// Idle sleep: running VMs without traffic are put to standby.
#[derive(Debug, Clone)]
pub struct IdleConfig {
    /// The server's idle timeout; None: only VMs with their own timeout sleep.
    pub timeout: Option<Duration>,
    pub check_interval: Duration,
    /// HATCH_HOT_SLEEP_SECONDS (default 600): how long a sleeping VM's guest
    /// RAM stays in host memory as the hot copy a wake starts from, before
    /// deep sleep drops it; zero keeps none.
    pub hot_sleep: Duration,
    /// HATCH_HOT_MEMORY_MAX (default: no limit but the host's): the most
    /// guest RAM all hot copies together may hold; the oldest go first.
    pub hot_max_bytes: Option<u64>,
    /// HATCH_HOT_MIN_AVAILABLE (a size; default a tenth of MemTotal, at
    /// least 256 MiB): while the host's MemAvailable is below it, hot copies
    /// are dropped, oldest first, until it is not (memory pressure from
    /// anything on the host, not only hatch's own VMs).
    pub hot_min_available: Option<u64>,
    /// HATCH_HOT_PRESSURE_PSI (a percentage, default 10; `off`): while the
    /// host's memory pressure (/proc/pressure/memory, `some avg10`) is above
    /// it, one hot copy is dropped per check, oldest first.
    pub hot_max_psi: Option<f64>,
}

/// Who decides whether an API key is good: the built-in `hatch keys` keys
/// (the default) or, when a verify URL is set, a Better Auth instance alone.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthConfig {
    pub better_auth: Option<BetterAuthConfig>,
}

/// A Better Auth verify endpoint: `POST {"key": KEY}` answers `{"valid", "userId"}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BetterAuthConfig {
    pub verify_url: String,
    /// The longest a verification may take (connect, request and answer).
    pub timeout: Duration,
    /// How long an accepted key is remembered; zero: ask on every request.
    /// A key revoked in Better Auth keeps working for up to this long.
    pub cache_ttl: Duration,
}

impl AuthConfig {
    /// The most a revoked key may go on working because of the cache.
    pub const MAX_CACHE_TTL: Duration = Duration::from_secs(300);

    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<AuthConfig, String> {
        let Some(url) = get("HATCH_BETTER_AUTH_VERIFY_URL") else {
            return Ok(AuthConfig::default());
        };
        let url = url.trim().to_string();
        let has_host = url
            .split_once("://")
            .is_some_and(|(_, rest)| !rest.is_empty() && !rest.starts_with('/'));
        if !(url.starts_with("http://") || url.starts_with("https://")) || !has_host {
            return Err(format!(
                "HATCH_BETTER_AUTH_VERIFY_URL must be an http:// or https:// URL, not {url:?}"
            ));
        }
        let duration = |name: &str, default: Duration| match get(name) {
            Some(v) => parse_duration(&v).map_err(|e| format!("{name}: {e}")),
            None => Ok(default),
        };
        let timeout = duration("HATCH_BETTER_AUTH_TIMEOUT", Duration::from_secs(5))?;
        if timeout.is_zero() || timeout > Duration::from_secs(60) {
            return Err("HATCH_BETTER_AUTH_TIMEOUT must be between 1ms and 60s".into());
        }
        let cache_ttl = duration("HATCH_BETTER_AUTH_CACHE_TTL", Duration::from_secs(30))?;
        if cache_ttl > Self::MAX_CACHE_TTL {
            return Err(format!(
                "HATCH_BETTER_AUTH_CACHE_TTL must be at most {}s: a revoked key works until it passes",
                Self::MAX_CACHE_TTL.as_secs()
            ));
        }
        Ok(AuthConfig {
            better_auth: Some(BetterAuthConfig {
                verify_url: url,
                timeout,
                cache_ttl,
            }),
        })
    }
}

/// An S3-compatible bucket for snapshot objects (AWS, or MinIO, s3s-fs, ... at `endpoint`).
#[derive(Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// `http(s)://host[:port]`; AWS itself when `None`.
    pub endpoint: Option<String>,
    pub access_key: String,
    pub secret_key: String,
    pub region: String,
}

// By hand so that logging a `Config` never prints the secret key.
impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("bucket", &self.bucket)
            .field("endpoint", &self.endpoint)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .field("region", &self.region)
            .finish()
    }
}

impl S3Config {
    /// S3 is on when `HATCH_S3_BUCKET` is set; the keys are then required.
    fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<Option<S3Config>, String> {
        let Some(bucket) = get("HATCH_S3_BUCKET") else {
            return Ok(None);
        };
        if bucket.contains('/') {
            return Err(format!(
                "HATCH_S3_BUCKET must be a bucket name, not a path: {bucket:?}"
            ));
        }
        let required = |name: &str| {
            get(name).ok_or_else(|| format!("{name} must be set when HATCH_S3_BUCKET is set"))
        };
        let endpoint = match get("HATCH_S3_ENDPOINT") {
            Some(e) if e.starts_with("http://") || e.starts_with("https://") => {
                Some(e.trim_end_matches('/').to_string())
            }
            Some(e) => {
                return Err(format!(
                    "HATCH_S3_ENDPOINT must be an http:// or https:// URL, not {e:?}"
                ))
            }
            None => None,
        };
        Ok(Some(S3Config {
            bucket,
            endpoint,
            access_key: required("HATCH_S3_ACCESS_KEY")?,
            secret_key: required("HATCH_S3_SECRET_KEY")?,
            region: get("HATCH_S3_REGION").unwrap_or_else(|| "us-east-1".into()),
        }))
    }
}

impl Config {
    /// Reads the configuration from the process environment.
    pub fn from_env() -> Result<Config, String> {
        Self::from_lookup(|k| std::env::var(k).ok().filter(|v| !v.is_empty()))
    }

    /// Reads the configuration through `get`, so tests can feed variables without touching the environment.
    pub fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<Config, String> {
        let http_addr = get("HATCH_HTTP_ADDR").unwrap_or_else(|| "127.0.0.1:8080".into());
        let http_addr = http_addr
            .parse()
            .map_err(|_| format!("HATCH_HTTP_ADDR must be HOST:PORT, not {http_addr:?}"))?;
        let stop_timeout = match get("HATCH_STOP_TIMEOUT") {
            Some(v) => parse_duration(&v).map_err(|e| format!("HATCH_STOP_TIMEOUT: {e}"))?,
            None => Duration::from_secs(30),
        };
        let chunk_grace = match get("HATCH_CHUNK_GRACE") {
            Some(v) => parse_duration(&v).map_err(|e| format!("HATCH_CHUNK_GRACE: {e}"))?,
            None => Duration::from_secs(3600),
        };
        let s3 = S3Config::from_lookup(&get)?;
        let auth = AuthConfig::from_lookup(&get)?;
        let snapshot_compression = match get("HATCH_SNAPSHOT_COMPRESSION") {
            Some(v) => CompressionConfig::parse_setting(&v)
                .map_err(|e| format!("HATCH_SNAPSHOT_COMPRESSION: {e}"))?,
            None => CompressionConfig::default(),
        };
        let duration = |name: &str, default: Duration| match get(name) {
            Some(v) => parse_duration(&v).map_err(|e| format!("{name}: {e}")),
            None => Ok(default),
        };
        // A whole number from 1 to `max`.
        let count = |name: &str, max: usize, default: usize| match get(name) {
            Some(v) => v
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=max).contains(n))
                .ok_or_else(|| format!("{name} must be a number from 1 to {max}, not {v:?}")),
            None => Ok(default),
        };
        let proxy = ProxyConfig {
            addr: match get("HATCH_PROXY_ADDR").as_deref() {
                Some("off") => None,
                Some(a) => Some(a.parse().map_err(|_| {
                    format!("HATCH_PROXY_ADDR must be HOST:PORT or off, not {a:?}")
                })?),
                None => Some(SocketAddr::from(([127, 0, 0, 1], 8081))),
            },
            base_domain: {
                let d = get("HATCH_PROXY_BASE_DOMAIN")
                    .unwrap_or_else(|| "localhost".into())
                    .trim_end_matches('.')
                    .to_ascii_lowercase();
                check_domain(&d).map_err(|e| format!("HATCH_PROXY_BASE_DOMAIN: {e}"))?;
                d
            },
            request_timeout: duration("HATCH_PROXY_TIMEOUT", Duration::from_secs(60))?,
            wake_timeout: duration("HATCH_PROXY_WAKE_TIMEOUT", Duration::from_secs(60))?,
            trusted_proxies: crate::proxy::Cidr::parse_list(
                &get("HATCH_PROXY_TRUSTED_PROXIES").unwrap_or_default(),
            )
            .map_err(|e| format!("HATCH_PROXY_TRUSTED_PROXIES: {e}"))?,
            access_log: AccessLogTarget::parse(get("HATCH_PROXY_ACCESS_LOG").as_deref())?,
            threads: count(
                "HATCH_PROXY_THREADS",
                256,
                std::thread::available_parallelism().map_or(1, |n| n.get().min(256)),
            )?,
        };
        let api = ApiConfig {
            header_timeout: duration("HATCH_API_HEADER_TIMEOUT", Duration::from_secs(30))?,
            max_connections: count("HATCH_API_MAX_CONNECTIONS", 65536, 512)?,
        };
        if api.header_timeout.is_zero() {
            return Err("HATCH_API_HEADER_TIMEOUT must be more than zero".into());
        }
        let idle = IdleConfig {
            timeout: match get("HATCH_IDLE_TIMEOUT").as_deref() {
                None | Some("off") => None,
                Some(v) => Some(parse_duration(v).map_err(|e| format!("HATCH_IDLE_TIMEOUT: {e}"))?),
            }
            .filter(|d| !d.is_zero()),
            check_interval: duration("HATCH_IDLE_CHECK_INTERVAL", Duration::from_secs(30))?,
            hot_sleep: match get("HATCH_HOT_SLEEP_SECONDS") {
                None => Duration::from_secs(600),
                Some(v) => Duration::from_secs(v.trim().parse::<u64>().map_err(|_| {
                    format!("HATCH_HOT_SLEEP_SECONDS: {v:?} is not a whole number of seconds")
                })?),
            },
            hot_max_bytes: match get("HATCH_HOT_MEMORY_MAX") {
                None => None,
                Some(v) => Some(parse_size(&v).map_err(|e| format!("HATCH_HOT_MEMORY_MAX: {e}"))?),
            },
            hot_min_available: match get("HATCH_HOT_MIN_AVAILABLE") {
                None => None,
                Some(v) => Some(parse_size(&v).map_err(|e| format!("HATCH_HOT_MIN_AVAILABLE: {e}"))?),
            },
            hot_max_psi: match get("HATCH_HOT_PRESSURE_PSI").as_deref().map(str::trim) {
                None => Some(10.0),
                Some("off") => None,
                Some(v) => Some(
                    v.parse::<f64>()
                        .ok()
                        .filter(|p| (0.0..=100.0).contains(p))
                        .ok_or_else(|| {
                            format!("HATCH_HOT_PRESSURE_PSI: {v:?} is not a percentage from 0 to 100, or off")
                        })?,
                ),
            },
        };
        if idle.check_interval < Duration::from_millis(100) {
            return Err("HATCH_IDLE_CHECK_INTERVAL must be at least 100ms".into());
        }
        Ok(Config {
            images: ImageConfig::from_lookup(&get)?,
            confine: ConfineConfig::from_lookup(&get)?,
            metrics: crate::telemetry::MetricsConfig::from_lookup(&get)?,
            ssh: SshConfig::from_lookup(&get)?,
            proxy,
            idle,
            auth,
            limits: LimitsConfig::from_lookup(&get)?,
            api,
            http_addr,
            data_dir: get("HATCH_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(default_data_dir),
            default_kernel: get("HATCH_DEFAULT_KERNEL_PATH").map(PathBuf::from),
            default_rootfs: get("HATCH_DEFAULT_ROOTFS_PATH").map(PathBuf::from),
            default_initrd: get("HATCH_DEFAULT_INITRD_PATH").map(PathBuf::from),
            default_kernel_elf: get("HATCH_DEFAULT_KERNEL_ELF_PATH").map(PathBuf::from),
            default_boot_args: get("HATCH_DEFAULT_BOOT_ARGS"),
            backends: crate::vmm::BackendsConfig::from_lookup(&get)?,
            stop_timeout,
            net: NetConfig {
                bridge: {
                    let b = get("HATCH_BRIDGE_NAME").unwrap_or_else(|| "hatch0".into());
                    if b.is_empty() || b.len() > 15 || b.contains(['/', ' ']) {
                        return Err(format!(
                            "HATCH_BRIDGE_NAME {b:?} is not a valid interface name"
                        ));
                    }
                    b
                },
                net: BridgeNet::parse(
                    &get("HATCH_BRIDGE_CIDR").unwrap_or_else(|| "172.16.0.1/24".into()),
                )
                .map_err(|e| format!("HATCH_BRIDGE_CIDR: {e}"))?,
                ssh_ports: ipam::parse_port_range(
                    &get("HATCH_SSH_PORT_RANGE").unwrap_or_else(|| "16000-16999".into()),
                )
                .map_err(|e| format!("HATCH_SSH_PORT_RANGE: {e}"))?,
                ssh_allowed_sources: ipam::parse_cidr_list(
                    &get("HATCH_SSH_ALLOWED_CIDRS").unwrap_or_else(|| "0.0.0.0/0".into()),
                )
                .map_err(|e| format!("HATCH_SSH_ALLOWED_CIDRS: {e}"))?,
                guest_to_guest: get("HATCH_GUEST_TO_GUEST").unwrap_or_default().parse()?,
            },
            s3,
            snapshot_compression,
            chunk_grace,
        })
    }

    pub fn db_path(&self) -> PathBuf {
        self.data_dir.join("hatch.db")
    }
    pub fn vms_dir(&self) -> PathBuf {
        self.data_dir.join("vms")
    }
    pub fn images_dir(&self) -> PathBuf {
        self.data_dir.join("images")
    }
    pub fn net_dir(&self) -> PathBuf {
        self.data_dir.join("net")
    }
}

/// A DNS name of letters, digits, dashes and dots (no empty label).
fn check_domain(d: &str) -> Result<(), String> {
    let ok = !d.is_empty()
        && d.len() <= 253
        && d.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{d:?} is not a DNS name"))
    }
}

/// Root runs the daemon system-wide; anyone else gets a per-user directory.
fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/hatch")
    } else {
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_else(|| ".".into());
        home.join(".local/share/hatch")
    }
}

/// Parses `30`, `30s`, `500ms`, `5m` or `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 500ms, 5m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?} has an unknown unit (use ms, s, m or h)")),
    }
}

/// Parses a byte count: `1048576`, or with a binary suffix `512K`, `1M`,
/// `20G`, `1T` (`KiB`, `MiB`, ... too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size like 1048576, 512K, 1M or 20G"))?;
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => return Err(format!("{s:?} has an unknown unit (use K, M, G or T)")),
    };
    n.checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_listen_on_loopback_8080() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        // Each backend's defaults are tested beside it (src/vmm).
        assert_eq!(
            c.backends,
            crate::vmm::BackendsConfig::from_lookup(&|_| None).unwrap()
        );
        assert_eq!(c.stop_timeout, Duration::from_secs(30));
        assert_eq!(c.net.bridge, "hatch0");
        assert_eq!(c.net.net.cidr(), "172.16.0.0/24");
        assert_eq!(c.net.ssh_ports, (16000, 16999));
        assert_eq!(c.net.ssh_allowed_sources, vec!["0.0.0.0/0"]);
    }

    #[test]
    fn ssh_certificate_settings() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.ssh.cert_ttl, DEFAULT_SSH_CERT_TTL);
        assert_eq!(c.ssh.host, None);
        let c = cfg(&[
            ("HATCH_SSH_CERT_TTL", "2s"),
            ("HATCH_SSH_HOST", "vm.example.com"),
        ])
        .unwrap();
        assert_eq!(c.ssh.cert_ttl, Duration::from_secs(2));
        assert_eq!(c.ssh.host.as_deref(), Some("vm.example.com"));
        assert!(cfg(&[("HATCH_SSH_HOST", "10.1.2.3")]).is_ok());
        for bad in ["0s", "25h", "soon"] {
            let e = cfg(&[("HATCH_SSH_CERT_TTL", bad)]).unwrap_err();
            assert!(e.contains("HATCH_SSH_CERT_TTL"), "{bad}: {e}");
        }
        assert!(cfg(&[("HATCH_SSH_HOST", "a b")])
            .unwrap_err()
            .contains("HATCH_SSH_HOST"));
    }

    #[test]
    fn rejects_bad_values_with_the_variable_name() {
        assert!(cfg(&[("HATCH_HTTP_ADDR", "nope")])
            .unwrap_err()
            .contains("HATCH_HTTP_ADDR"));
        assert!(cfg(&[("HATCH_STOP_TIMEOUT", "3x")])
            .unwrap_err()
            .contains("HATCH_STOP_TIMEOUT"));
        assert!(cfg(&[("HATCH_CHUNK_GRACE", "soon")])
            .unwrap_err()
            .contains("HATCH_CHUNK_GRACE"));
        assert!(cfg(&[("HATCH_VMM_CONFINE", "no")])
            .unwrap_err()
            .contains("HATCH_VMM_CONFINE"));
        assert!(cfg(&[("HATCH_VMM_UID_BASE", "0")])
            .unwrap_err()
            .contains("HATCH_VMM_UID_BASE"));
    }

    #[test]
    fn s3_is_off_unless_a_bucket_is_named() {
        assert_eq!(cfg(&[]).unwrap().s3, None);
        // Keys alone do not turn it on.
        let c = cfg(&[("HATCH_S3_ACCESS_KEY", "a"), ("HATCH_S3_SECRET_KEY", "s")]).unwrap();
        assert_eq!(c.s3, None);
    }

    #[test]
    fn s3_settings() {
        let keys = [
            ("HATCH_S3_BUCKET", "snaps"),
            ("HATCH_S3_ACCESS_KEY", "AK"),
            ("HATCH_S3_SECRET_KEY", "SK"),
        ];
        let s3 = cfg(&keys).unwrap().s3.unwrap();
        assert_eq!(
            s3,
            S3Config {
                bucket: "snaps".into(),
                endpoint: None,
                access_key: "AK".into(),
                secret_key: "SK".into(),
                region: "us-east-1".into(),
            }
        );
        assert!(!format!("{s3:?}").contains("SK"), "{s3:?}");
        let mut vars = keys.to_vec();
        vars.push(("HATCH_S3_ENDPOINT", "http://127.0.0.1:9000/"));
        vars.push(("HATCH_S3_REGION", "eu-west-3"));
        let s3 = cfg(&vars).unwrap().s3.unwrap();
        assert_eq!(s3.endpoint.as_deref(), Some("http://127.0.0.1:9000"));
        assert_eq!(s3.region, "eu-west-3");
    }

    #[test]
    fn s3_errors_name_the_variable() {
        let only_bucket = cfg(&[("HATCH_S3_BUCKET", "b")]).unwrap_err();
        assert!(only_bucket.contains("HATCH_S3_ACCESS_KEY"), "{only_bucket}");
        let no_secret = cfg(&[("HATCH_S3_BUCKET", "b"), ("HATCH_S3_ACCESS_KEY", "a")]).unwrap_err();
        assert!(no_secret.contains("HATCH_S3_SECRET_KEY"), "{no_secret}");
        let no_access = cfg(&[("HATCH_S3_BUCKET", "b"), ("HATCH_S3_SECRET_KEY", "s")]).unwrap_err();
        assert!(no_access.contains("HATCH_S3_ACCESS_KEY"), "{no_access}");
        let keys = [
            ("HATCH_S3_BUCKET", "b"),
            ("HATCH_S3_ACCESS_KEY", "a"),
            ("HATCH_S3_SECRET_KEY", "s"),
        ];
        let mut vars = keys.to_vec();
        vars.push(("HATCH_S3_ENDPOINT", "127.0.0.1:9000"));
        assert!(cfg(&vars).unwrap_err().contains("HATCH_S3_ENDPOINT"));
        let mut vars = keys.to_vec();
        vars[0] = ("HATCH_S3_BUCKET", "b/prefix");
        assert!(cfg(&vars).unwrap_err().contains("HATCH_S3_BUCKET"));
    }

    #[test]
    fn snapshot_compression_default() {
        use crate::snapshot::Algorithm;
        assert_eq!(
            cfg(&[]).unwrap().snapshot_compression,
            CompressionConfig::default()
        );
        let c = cfg(&[("HATCH_SNAPSHOT_COMPRESSION", "lz4:3")]).unwrap();
        assert_eq!(
            c.snapshot_compression,
            CompressionConfig {
                enabled: true,
                algorithm: Some(Algorithm::Lz4),
                level: Some(3),
            }
        );
        let c = cfg(&[("HATCH_SNAPSHOT_COMPRESSION", "zstd")]).unwrap();
        assert_eq!(
            c.snapshot_compression.effective(),
            Some((Algorithm::Zstd, 1))
        );
        for bad in ["zstd:0", "lz4:12", "brotli", "zstd:x"] {
            let e = cfg(&[("HATCH_SNAPSHOT_COMPRESSION", bad)]).unwrap_err();
            assert!(e.starts_with("HATCH_SNAPSHOT_COMPRESSION: "), "{bad}: {e}");
        }
    }

    #[test]
    fn proxy_and_idle_settings() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.proxy.addr.unwrap().to_string(), "127.0.0.1:8081");
        assert_eq!(c.proxy.base_domain, "localhost");
        assert_eq!(c.proxy.wake_timeout, Duration::from_secs(60));
        assert_eq!(c.idle.timeout, None, "idle sleep is off unless asked for");
        assert_eq!(c.idle.check_interval, Duration::from_secs(30));
        assert_eq!(c.proxy.access_log, None, "no access log unless asked for");
        for (v, want) in [
            ("off", None),
            ("stderr", Some(AccessLogTarget::Stderr)),
            (
                "/var/log/hatch/access.log",
                Some(AccessLogTarget::File("/var/log/hatch/access.log".into())),
            ),
        ] {
            let c = cfg(&[("HATCH_PROXY_ACCESS_LOG", v)]).unwrap();
            assert_eq!(c.proxy.access_log, want, "{v}");
        }
        let e = cfg(&[("HATCH_PROXY_ACCESS_LOG", "access.log")]).unwrap_err();
        assert!(e.starts_with("HATCH_PROXY_ACCESS_LOG must be"), "{e}");
        let c = cfg(&[
            ("HATCH_PROXY_ADDR", "0.0.0.0:80"),
            ("HATCH_PROXY_BASE_DOMAIN", "VMs.Example.com."),
            ("HATCH_PROXY_WAKE_TIMEOUT", "5s"),
            ("HATCH_IDLE_TIMEOUT", "10m"),
            ("HATCH_IDLE_CHECK_INTERVAL", "500ms"),
        ])
        .unwrap();
        assert_eq!(c.proxy.addr.unwrap().port(), 80);
        assert_eq!(c.proxy.base_domain, "vms.example.com");
        assert_eq!(c.proxy.wake_timeout, Duration::from_secs(5));
        assert_eq!(c.idle.timeout, Some(Duration::from_secs(600)));
        assert_eq!(c.idle.check_interval, Duration::from_millis(500));
        assert!(cfg(&[("HATCH_PROXY_ADDR", "off")])
            .unwrap()
            .proxy
            .addr
            .is_none());
        assert_eq!(
            cfg(&[("HATCH_IDLE_TIMEOUT", "0")]).unwrap().idle.timeout,
            None
        );
        let idle = cfg(&[]).unwrap().idle;
        assert_eq!(
            (idle.hot_sleep, idle.hot_max_bytes),
            (Duration::from_secs(600), None)
        );
        let idle = cfg(&[
            ("HATCH_HOT_SLEEP_SECONDS", "0"),
            ("HATCH_HOT_MEMORY_MAX", "2G"),
        ])
        .unwrap()
        .idle;
        assert_eq!(
            (idle.hot_sleep, idle.hot_max_bytes),
            (Duration::ZERO, Some(2 << 30))
        );
        assert_eq!(
            cfg(&[("HATCH_PROXY_THREADS", "3")]).unwrap().proxy.threads,
            3
        );
        assert!(cfg(&[]).unwrap().proxy.threads >= 1);
        for (k, v) in [
            ("HATCH_PROXY_ADDR", "8081"),
            ("HATCH_PROXY_BASE_DOMAIN", "a..b"),
            ("HATCH_PROXY_BASE_DOMAIN", "bad_domain"),
            ("HATCH_PROXY_TIMEOUT", "x"),
            ("HATCH_PROXY_THREADS", "0"),
            ("HATCH_PROXY_THREADS", "257"),
            ("HATCH_PROXY_THREADS", "two"),
            ("HATCH_IDLE_TIMEOUT", "soon"),
            ("HATCH_IDLE_CHECK_INTERVAL", "10ms"),
            ("HATCH_HOT_SLEEP_SECONDS", "10m"),
            ("HATCH_HOT_SLEEP_SECONDS", "-1"),
            ("HATCH_HOT_MEMORY_MAX", "lots"),
        ] {
            assert!(cfg(&[(k, v)]).unwrap_err().contains(k), "{k}={v}");
        }
    }

    #[test]
    fn better_auth_settings() {
        assert_eq!(
            cfg(&[]).unwrap().auth.better_auth,
            None,
            "built-in keys by default"
        );
        let url = "http://127.0.0.1:3000/api/auth/api-key/verify";
        let ba = cfg(&[("HATCH_BETTER_AUTH_VERIFY_URL", url)])
            .unwrap()
            .auth
            .better_auth
            .unwrap();
        assert_eq!(
            ba,
            BetterAuthConfig {
                verify_url: url.into(),
                timeout: Duration::from_secs(5),
                cache_ttl: Duration::from_secs(30),
            }
        );
        let ba = cfg(&[
            (
                "HATCH_BETTER_AUTH_VERIFY_URL",
                "https://auth.example.com/verify",
            ),
            ("HATCH_BETTER_AUTH_TIMEOUT", "1500ms"),
            ("HATCH_BETTER_AUTH_CACHE_TTL", "0"),
        ])
        .unwrap()
        .auth
        .better_auth
        .unwrap();
        assert_eq!(ba.timeout, Duration::from_millis(1500));
        assert!(ba.cache_ttl.is_zero());
        for (k, v) in [
            ("HATCH_BETTER_AUTH_VERIFY_URL", "auth.example.com/verify"),
            ("HATCH_BETTER_AUTH_VERIFY_URL", "ftp://auth.example.com/"),
            ("HATCH_BETTER_AUTH_VERIFY_URL", "http:///verify"),
            ("HATCH_BETTER_AUTH_TIMEOUT", "0"),
            ("HATCH_BETTER_AUTH_TIMEOUT", "2m"),
            ("HATCH_BETTER_AUTH_CACHE_TTL", "1h"),
            ("HATCH_BETTER_AUTH_CACHE_TTL", "soon"),
        ] {
            let mut vars = vec![(k, v)];
            if k != "HATCH_BETTER_AUTH_VERIFY_URL" {
                vars.push(("HATCH_BETTER_AUTH_VERIFY_URL", url));
            }
            assert!(cfg(&vars).unwrap_err().contains(k), "{k}={v}");
        }
    }

    #[test]
    fn image_settings() {
        let c = cfg(&[]).unwrap();
        assert!(
            c.images.import_dirs.is_empty(),
            "path imports are off by default"
        );
        assert_eq!(c.images.max_bytes, 4 << 30);
        let c = cfg(&[
            ("HATCH_IMAGE_IMPORT_DIRS", "/srv/images, /opt/kernels,"),
            ("HATCH_IMAGE_MAX_BYTES", "512M"),
        ])
        .unwrap();
        assert_eq!(
            c.images.import_dirs,
            vec![PathBuf::from("/srv/images"), PathBuf::from("/opt/kernels")]
        );
        assert_eq!(c.images.max_bytes, 512 << 20);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("1048576").unwrap(), 1 << 20);
        for (k, v) in [
            ("HATCH_IMAGE_IMPORT_DIRS", "images"),
            ("HATCH_IMAGE_MAX_BYTES", "0"),
            ("HATCH_IMAGE_MAX_BYTES", "4X"),
            ("HATCH_IMAGE_MAX_BYTES", "99999999999T"),
        ] {
            assert!(cfg(&[(k, v)]).unwrap_err().contains(k), "{k}={v}");
        }
    }

    #[test]
    fn api_listener_and_proxy_trust_settings() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.api.header_timeout, Duration::from_secs(30));
        assert_eq!(c.api.max_connections, 512);
        assert!(
            c.proxy.trusted_proxies.is_empty(),
            "no peer is trusted by default"
        );
        let c = cfg(&[
            ("HATCH_API_HEADER_TIMEOUT", "2s"),
            ("HATCH_API_MAX_CONNECTIONS", "8"),
            (
                "HATCH_PROXY_TRUSTED_PROXIES",
                "10.0.0.0/8, 127.0.0.1,::1/128",
            ),
        ])
        .unwrap();
        assert_eq!(c.api.header_timeout, Duration::from_secs(2));
        assert_eq!(c.api.max_connections, 8);
        assert_eq!(c.proxy.trusted_proxies.len(), 3);
        for (k, v) in [
            ("HATCH_API_HEADER_TIMEOUT", "0"),
            ("HATCH_API_HEADER_TIMEOUT", "soon"),
            ("HATCH_API_MAX_CONNECTIONS", "0"),
            ("HATCH_API_MAX_CONNECTIONS", "many"),
            ("HATCH_PROXY_TRUSTED_PROXIES", "10.0.0.0/33"),
            ("HATCH_PROXY_TRUSTED_PROXIES", "proxy.example.com"),
        ] {
            assert!(cfg(&[(k, v)]).unwrap_err().contains(k), "{k}={v}");
        }
    }

    #[test]
    fn limits_defaults_and_overrides() {
        let c = cfg(&[]).unwrap().limits;
        assert_eq!(c.quota.vms, 5, "the Hatch product's 5 VMs per user");
        assert_eq!(c.quota.snapshots_per_vm, 10, "and 10 snapshots per VM");
        assert_eq!(c.memory_overcommit, 1.0);
        assert_eq!(c.console_log_max_bytes, 1 << 20);
        let c = cfg(&[
            ("HATCH_QUOTA_VMS", "50"),
            ("HATCH_QUOTA_STORED_BYTES", "2G"),
            ("HATCH_MEMORY_OVERCOMMIT", "1.5"),
            ("HATCH_CONSOLE_LOG_MAX_BYTES", "256K"),
        ])
        .unwrap()
        .limits;
        assert_eq!(c.quota.vms, 50);
        assert_eq!(c.quota.stored_bytes, 2 << 30);
        assert_eq!(c.memory_overcommit, 1.5);
        assert_eq!(c.console_log_max_bytes, 256 << 10);
        for (k, v) in [
            ("HATCH_QUOTA_VMS", "-1"),
            ("HATCH_QUOTA_MEM_MIB", "lots"),
            ("HATCH_QUOTA_STORED_BYTES", "3X"),
            ("HATCH_MEMORY_OVERCOMMIT", "0"),
            ("HATCH_MEMORY_OVERCOMMIT", "NaN"),
            ("HATCH_CONSOLE_LOG_MAX_BYTES", "4K"),
        ] {
            assert!(cfg(&[(k, v)]).unwrap_err().contains(k), "{k}={v}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("1M").unwrap(), 1 << 20);
        assert_eq!(parse_size("3GiB").unwrap(), 3 << 30);
        assert!(parse_size("").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("45").unwrap(), Duration::from_secs(45));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("s").is_err());
    }
}
