//! Daemon configuration, read once at start-up from `HATCH_*` environment variables.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::net::ipam::{self, BridgeNet};
use crate::net::NetConfig;

/// Which accelerator QEMU is asked to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
    Auto,
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" | "" => Ok(Accel::Auto),
            other => Err(format!(
                "HATCH_QEMU_ACCEL must be kvm, tcg or auto, not {other:?}"
            )),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub http_addr: SocketAddr,
    pub data_dir: PathBuf,
    pub default_kernel: Option<PathBuf>,
    pub default_rootfs: Option<PathBuf>,
    pub default_initrd: Option<PathBuf>,
    pub default_boot_args: Option<String>,
    pub qemu_binary: String,
    pub qemu_accel: Accel,
    /// How long a graceful (ACPI) shutdown may take before the VMM is killed.
    pub stop_timeout: Duration,
    pub net: NetConfig,
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
        Ok(Config {
            http_addr,
            data_dir: get("HATCH_DATA_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(default_data_dir),
            default_kernel: get("HATCH_DEFAULT_KERNEL_PATH").map(PathBuf::from),
            default_rootfs: get("HATCH_DEFAULT_ROOTFS_PATH").map(PathBuf::from),
            default_initrd: get("HATCH_DEFAULT_INITRD_PATH").map(PathBuf::from),
            default_boot_args: get("HATCH_DEFAULT_BOOT_ARGS"),
            qemu_binary: get("HATCH_QEMU_BINARY").unwrap_or_else(|| "qemu-system-x86_64".into()),
            qemu_accel: get("HATCH_QEMU_ACCEL").unwrap_or_default().parse()?,
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
            },
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
    fn defaults_listen_on_loopback_8080_with_auto_accel() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8080");
        assert_eq!(c.qemu_accel, Accel::Auto);
        assert_eq!(c.stop_timeout, Duration::from_secs(30));
        assert_eq!(c.net.bridge, "hatch0");
        assert_eq!(c.net.net.cidr(), "172.16.0.0/24");
        assert_eq!(c.net.ssh_ports, (16000, 16999));
        assert_eq!(c.net.ssh_allowed_sources, vec!["0.0.0.0/0"]);
    }

    #[test]
    fn rejects_bad_values_with_the_variable_name() {
        assert!(cfg(&[("HATCH_HTTP_ADDR", "nope")])
            .unwrap_err()
            .contains("HATCH_HTTP_ADDR"));
        assert!(cfg(&[("HATCH_QEMU_ACCEL", "hvf")])
            .unwrap_err()
            .contains("HATCH_QEMU_ACCEL"));
        assert!(cfg(&[("HATCH_STOP_TIMEOUT", "3x")])
            .unwrap_err()
            .contains("HATCH_STOP_TIMEOUT"));
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
