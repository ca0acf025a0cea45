//! Typed requests with their validation: invalid input never reaches code that acts.

use serde::Deserialize;

pub const VCPU_RANGE: (i64, i64) = (1, 32);
pub const MEM_RANGE: (i64, i64) = (128, 65536);
pub const DEFAULT_VCPUS: i64 = 1;
pub const DEFAULT_MEM_MIB: i64 = 512;
const MAX_BOOT_ARGS: usize = 4096;
const MAX_USER_DATA: usize = 256 * 1024;
const MAX_NAME: usize = 128;
const MAX_DESCRIPTION: usize = 4096;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateVm {
    pub image_id: Option<String>,
    pub template_id: Option<String>,
    pub vcpu_count: Option<i64>,
    pub mem_mib: Option<i64>,
    pub boot_args: Option<String>,
    pub enable_network: Option<bool>,
    pub guest_ip: Option<String>,
    pub guest_mac: Option<String>,
    pub user_data: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateImage {
    pub name: Option<String>,
    pub kernel_path: Option<String>,
    pub rootfs_path: Option<String>,
    pub initrd_path: Option<String>,
    pub boot_args: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateTemplate {
    pub name: Option<String>,
    pub description: Option<String>,
    pub image_id: Option<String>,
    pub user_data: Option<String>,
    pub vcpu_count: Option<i64>,
    pub mem_mib: Option<i64>,
}

/// Filters of Hypeman's `GET /snapshots`: `kind`, `name`, `source_instance_id`
/// and tags as `tags[KEY]=VALUE` (all must match).
#[derive(Debug, Default, PartialEq)]
pub struct SnapshotFilter {
    pub kind: Option<String>,
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
                "kind" if v == "Standby" || v == "Stopped" => f.kind = Some(v.clone()),
                "kind" => return Err(format!("kind must be Standby or Stopped, got {v:?}")),
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
        let tags: std::collections::HashMap<String, String> =
            serde_json::from_str(&s.tags).unwrap_or_default();
        self.kind.as_ref().is_none_or(|k| *k == s.kind)
            && self
                .name
                .as_ref()
                .is_none_or(|n| Some(n) == s.name.as_ref())
            && self
                .source_instance_id
                .as_ref()
                .is_none_or(|i| *i == s.vm_id)
            && self.tags.iter().all(|(k, v)| tags.get(k) == Some(v))
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

fn check_name(field: &str, name: &str, max: usize) -> Result<(), String> {
    if name.trim().is_empty() {
        return Err(format!("{field} must not be empty"));
    }
    if name.len() > max {
        return Err(format!("{field} must be at most {max} characters"));
    }
    if name.chars().any(|c| c.is_control()) {
        return Err(format!("{field} must not contain control characters"));
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

impl CreateImage {
    pub fn validate(&self) -> Result<(), String> {
        if let Some(n) = &self.name {
            check_name("name", n, MAX_NAME)?;
        }
        if self.kernel_path.is_none() {
            return Err("kernel_path is required".into());
        }
        if self.rootfs_path.is_none() {
            return Err("rootfs_path is required".into());
        }
        if let Some(a) = &self.boot_args {
            check_boot_args(a)?;
        }
        Ok(())
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
            tags: tags.into(),
            ..crate::snapshot::capturing_record("snap_x", vm, "o", kind, "qemu", "{}".into())
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
    fn unknown_fields_are_rejected() {
        let e = serde_json::from_str::<CreateVm>(r#"{"memory_mib": 512}"#).unwrap_err();
        assert!(e.to_string().contains("memory_mib"));
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
