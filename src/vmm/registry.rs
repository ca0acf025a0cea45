//! The backends this daemon has, by name, and their settings.

use super::confine::{self, Confinement, UidPool};
use super::firecracker::{Firecracker, FirecrackerConfig};
use super::qemu::{Qemu, QemuConfig};
use super::{Result, Vmm, VmmError};
use crate::config::Config;
use std::sync::Arc;

/// HATCH_HYPERVISOR: the server default, the backend a new VM gets when it names none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultHypervisor {
    Qemu,
    Firecracker,
    /// Firecracker where its binaries are found and KVM runs guests at
    /// hardware speed, QEMU elsewhere.
    Auto,
}

impl std::str::FromStr for DefaultHypervisor {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "qemu" | "" => Ok(DefaultHypervisor::Qemu),
            "firecracker" => Ok(DefaultHypervisor::Firecracker),
            "auto" => Ok(DefaultHypervisor::Auto),
            other => Err(format!(
                "HATCH_HYPERVISOR must be qemu, firecracker or auto, not {other:?}"
            )),
        }
    }
}

/// Each backend's own settings, read from its own `HATCH_*` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendsConfig {
    pub default: DefaultHypervisor,
    pub qemu: QemuConfig,
    pub firecracker: FirecrackerConfig,
}

impl BackendsConfig {
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> std::result::Result<Self, String> {
        Ok(BackendsConfig {
            default: get("HATCH_HYPERVISOR").unwrap_or_default().parse()?,
            qemu: QemuConfig::from_lookup(get)?,
            firecracker: FirecrackerConfig::from_lookup(get),
        })
    }
}

/// The daemon's backends by name, the default first, from what this host
/// has: Firecracker's binaries (`Err`: why not) and a KVM that runs guests
/// at hardware speed.
pub fn backend_order(
    default: DefaultHypervisor,
    firecracker: std::result::Result<(), &str>,
    hardware_kvm: bool,
) -> std::result::Result<Vec<&'static str>, String> {
    let fc = firecracker.is_ok();
    let first_fc = match default {
        DefaultHypervisor::Qemu => false,
        DefaultHypervisor::Firecracker => match firecracker {
            Ok(()) => true,
            Err(why) => {
                return Err(format!(
                    "HATCH_HYPERVISOR=firecracker, but this host cannot run it: {why}"
                ))
            }
        },
        DefaultHypervisor::Auto => fc && hardware_kvm,
    };
    Ok(match (first_fc, fc) {
        (true, _) => vec!["firecracker", "qemu"],
        (false, true) => vec!["qemu", "firecracker"],
        (false, false) => vec!["qemu"],
    })
}

/// The backends a daemon can run VMs on, chosen per VM by its `hypervisor`.
/// The first one is the server default, what a new VM gets.
#[derive(Clone)]
pub struct Backends {
    list: Vec<Arc<dyn Vmm>>,
}

impl Backends {
    /// A registry holding `default` alone.
    pub fn new(default: Arc<dyn Vmm>) -> Backends {
        Backends {
            list: vec![default],
        }
    }

    /// Adds `backend` (replacing one of the same name).
    pub fn with(mut self, backend: Arc<dyn Vmm>) -> Backends {
        self.list.retain(|b| b.name() != backend.name());
        self.list.push(backend);
        self
    }

    /// The daemon's backends as `cfg` sets them up, every VMM confined as
    /// `HATCH_VMM_CONFINE` says, the default first (`HATCH_HYPERVISOR`).
    /// Logs what it chose; a default this host cannot run is an error.
    pub fn from_config(cfg: &Config) -> std::result::Result<Backends, String> {
        let path = std::env::var("PATH").ok();
        Backends::from_config_with(cfg, path.as_deref(), || {
            super::qemu::detect_accel(super::qemu::Accel::Auto) == super::qemu::ResolvedAccel::Kvm
        })
    }

    /// `from_config` with PATH and the hardware-KVM check given.
    pub fn from_config_with(
        cfg: &Config,
        path_var: Option<&str>,
        hardware_kvm: impl FnOnce() -> bool,
    ) -> std::result::Result<Backends, String> {
        let mut qemu = Qemu::from_config(&cfg.backends.qemu);
        let found = cfg.backends.firecracker.find(path_var);
        let firecracker = match found {
            Ok(bins) => {
                tracing::info!(
                    firecracker = %bins.firecracker.display(),
                    jailer = %bins.jailer.display(),
                    "Firecracker found"
                );
                Firecracker::new(bins, &cfg.data_dir)
            }
            Err(why) => Err(why),
        };
        let order = backend_order(
            cfg.backends.default,
            firecracker.as_ref().map(drop).map_err(|e| e.as_str()),
            cfg.backends.default == DefaultHypervisor::Auto && hardware_kvm(),
        )?;
        let mut firecracker = match firecracker {
            Ok(fc) => Some(fc),
            Err(why) => {
                tracing::info!("no Firecracker backend: {why}");
                None
            }
        };
        if cfg.confine.enabled {
            let c = Arc::new(confinement(cfg));
            tracing::info!(
                cgroups = c.cgroups.as_ref().map(|g| g.version()),
                uid_base = cfg.confine.uid_base,
                "VMMs run confined"
            );
            // One confinement for every backend: uids and cgroups are per VM.
            qemu = qemu.confined(Arc::clone(&c));
            firecracker = firecracker.map(|f| f.confined(c));
        } else {
            tracing::warn!(
                "HATCH_VMM_CONFINE=off: VMMs run as root, without sandbox, cgroup or mount namespace"
            );
        }
        let mut qemu: Option<Arc<dyn Vmm>> = Some(Arc::new(qemu));
        let mut firecracker: Option<Arc<dyn Vmm>> =
            firecracker.map(|f| Arc::new(f) as Arc<dyn Vmm>);
        let mut list = vec![];
        for name in &order {
            let b = match *name {
                "firecracker" => firecracker.take(),
                _ => qemu.take(),
            };
            list.extend(b);
        }
        tracing::info!(backends = ?order, default = order[0], "hypervisor backends");
        Ok(Backends { list })
    }

    /// The backend named `name`; never another one in its place.
    pub fn get(&self, name: &str) -> Result<Arc<dyn Vmm>> {
        self.list
            .iter()
            .find(|b| b.name() == name)
            .cloned()
            .ok_or_else(|| VmmError::Unavailable {
                name: name.to_string(),
                available: self.names().join(", "),
            })
    }

    /// The server default: the backend a new VM runs on.
    pub fn default_backend(&self) -> &Arc<dyn Vmm> {
        &self.list[0]
    }

    /// The names of the backends this daemon has, the default first.
    pub fn names(&self) -> Vec<&'static str> {
        self.list.iter().map(|b| b.name()).collect()
    }

    /// Start-up, after the VMMs of an earlier daemon were killed.
    pub async fn recover(&self) {
        for b in &self.list {
            b.recover().await;
        }
    }

    /// Daemon shutdown, after every VMM ended.
    pub async fn shutdown(&self) {
        for b in &self.list {
            b.shutdown().await;
        }
    }
}

/// VMM confinement for this daemon: its cgroups are named after the data dir,
/// so daemons sharing a cgroup (tests) keep to their own.
fn confinement(cfg: &Config) -> Confinement {
    use sha2::Digest;
    let tag = hex::encode(&sha2::Sha256::digest(cfg.data_dir.as_os_str().as_encoded_bytes())[..4]);
    let cgroups = match super::cgroup::Cgroups::setup(&tag) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("VMMs run without cgroup limits: {e}");
            None
        }
    };
    Confinement {
        uids: UidPool::new(cfg.confine.uid_base, cfg.confine.uid_count),
        cgroups,
        hidden: vec![confine::hiding_root(&cfg.data_dir)],
        mem_overhead_mib: u32::try_from(cfg.limits.vm_overhead_mib).unwrap_or(u32::MAX),
    }
}

#[cfg(test)]
mod tests {
    use super::super::testing::FakeBackend;
    use super::super::DiskFormat;
    use super::*;

    #[test]
    fn a_vm_gets_its_own_backend_or_a_clear_error_never_another() {
        let b = Backends::new(Arc::new(FakeBackend::new("one")))
            .with(Arc::new(FakeBackend::new("two")))
            .with(Arc::new(FakeBackend::new("two").disk(DiskFormat::Raw)));
        assert_eq!(b.names(), vec!["one", "two"]);
        assert_eq!(b.default_backend().name(), "one");
        assert_eq!(b.get("two").unwrap().name(), "two");
        assert_eq!(
            b.get("two").unwrap().disk_path("/w".as_ref()),
            std::path::Path::new("/w/disk.raw")
        );
        let e = b.get("three").err().unwrap().to_string();
        assert_eq!(
            e,
            "hypervisor three is not available on this host (it has one, two)"
        );
    }

    #[test]
    fn the_daemon_has_a_backend_for_every_name_it_defaults_to() {
        let cfg = Config::from_lookup(|k| match k {
            "HATCH_VMM_CONFINE" => Some("off".into()),
            _ => None,
        })
        .unwrap();
        let b = Backends::from_config(&cfg).unwrap();
        let default = b.default_backend().name();
        assert!(super::super::HYPERVISORS.contains(&default), "{default}");
        assert_eq!(b.get(default).unwrap().name(), default);
    }

    #[test]
    fn the_default_is_what_hatch_hypervisor_asks_where_the_host_can_run_it() {
        use DefaultHypervisor::*;
        let found: std::result::Result<(), &str> = Ok(());
        let missing: std::result::Result<(), &str> = Err("no jailer binary at \"jailer\"");
        assert_eq!(
            backend_order(Qemu, found, true).unwrap(),
            ["qemu", "firecracker"]
        );
        assert_eq!(backend_order(Qemu, missing, true).unwrap(), ["qemu"]);
        assert_eq!(
            backend_order(Firecracker, found, false).unwrap(),
            ["firecracker", "qemu"]
        );
        let e = backend_order(Firecracker, missing, true).unwrap_err();
        assert!(
            e.contains("HATCH_HYPERVISOR=firecracker") && e.contains("no jailer"),
            "{e}"
        );
        assert_eq!(
            backend_order(Auto, found, true).unwrap(),
            ["firecracker", "qemu"]
        );
        // A software KVM (this project's machines) runs Firecracker guests too slowly.
        assert_eq!(
            backend_order(Auto, found, false).unwrap(),
            ["qemu", "firecracker"]
        );
        assert_eq!(backend_order(Auto, missing, true).unwrap(), ["qemu"]);
        assert_eq!("AUTO".parse::<DefaultHypervisor>(), Ok(Auto));
        assert_eq!("".parse::<DefaultHypervisor>(), Ok(Qemu));
        assert!("vz"
            .parse::<DefaultHypervisor>()
            .unwrap_err()
            .contains("HATCH_HYPERVISOR"));
    }

    /// Registration only looks for the binaries (and reads the ELF header of
    /// firecracker's, for the libraries its jail needs): copies of `true`
    /// stand in for them here.
    #[test]
    fn firecracker_is_registered_where_its_binaries_are_found() {
        let dir = std::env::temp_dir().join(format!("hatch-registry-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let truth =
            crate::vmm::firecracker::find_executable("true", Some("/usr/bin:/bin")).unwrap();
        for name in ["firecracker", "jailer"] {
            std::fs::copy(&truth, dir.join(name)).unwrap();
        }
        let cfg = |vars: &[(&str, String)]| {
            let vars = vars.to_vec();
            Config::from_lookup(move |k| {
                vars.iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.clone())
                    .or_else(|| (k == "HATCH_VMM_CONFINE").then(|| "off".into()))
            })
            .unwrap()
        };
        let path = dir.display().to_string();
        let names = |c: &Config, kvm: bool| {
            Backends::from_config_with(c, Some(&path), || kvm).map(|b| b.names())
        };
        assert_eq!(names(&cfg(&[]), true).unwrap(), ["qemu", "firecracker"]);
        let auto = cfg(&[("HATCH_HYPERVISOR", "auto".into())]);
        assert_eq!(names(&auto, true).unwrap(), ["firecracker", "qemu"]);
        assert_eq!(names(&auto, false).unwrap(), ["qemu", "firecracker"]);
        let fc = cfg(&[("HATCH_HYPERVISOR", "firecracker".into())]);
        assert_eq!(names(&fc, false).unwrap(), ["firecracker", "qemu"]);
        let b = Backends::from_config_with(&fc, Some(&path), || false).unwrap();
        assert_eq!(b.default_backend().name(), "firecracker");
        assert_eq!(
            b.get("firecracker").unwrap().capabilities().disk_format,
            DiskFormat::Raw
        );
        let gone = cfg(&[
            ("HATCH_HYPERVISOR", "firecracker".into()),
            ("HATCH_JAILER_BINARY", "/nonexistent/jailer".into()),
        ]);
        let e = names(&gone, true).unwrap_err();
        assert!(
            e.contains("HATCH_JAILER_BINARY") && e.contains("/nonexistent/jailer"),
            "{e}"
        );
        let unasked = cfg(&[("HATCH_JAILER_BINARY", "/nonexistent/jailer".into())]);
        assert_eq!(names(&unasked, true).unwrap(), ["qemu"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
