//! The extracted kernel package and the modules the initramfs loads, deps first.

use super::elf::Elf;
use super::step;
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// Modules needed to mount a virtio-blk root (on PCI or MMIO) and, later, for virtio-net.
const BASE_MODULES: &[&str] = &[
    "virtio",
    "virtio_ring",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    // A virtio-mmio machine's devices: found through ACPI (LNRO0005) or the
    // `device=` options /init passes on from the command line.
    "virtio_mmio",
    "virtio_blk",
    "failover",
    "net_failover",
    "virtio_net",
    // The cloud-init NoCloud seed is an iso9660 volume labelled `cidata`.
    "cdrom",
    "isofs",
];

/// Kernel options (and their module) that carry the ACPI power button to
/// userspace: `button` turns the ACPI event into an input event, `evdev`
/// exposes it as /dev/input/event* for busybox acpid.
const POWER_BUTTON_MODULES: &[(&str, &str)] = &[
    ("CONFIG_ACPI_BUTTON", "button"),
    ("CONFIG_INPUT_EVDEV", "evdev"),
];

/// The parts of an extracted kernel package the image needs.
pub(super) struct Kernel {
    pub(super) version: String,
    pub(super) vmlinuz: PathBuf,
    config: PathBuf,
    modules_dir: PathBuf,
}

impl Kernel {
    pub(super) fn open(root: &Path) -> Result<Kernel> {
        let boot = root.join("boot");
        let vmlinuz = fs::read_dir(&boot)
            .with_context(|| format!("kernel package has no {}", boot.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("vmlinuz-"))
            })
            .ok_or_else(|| anyhow!("kernel package has no /boot/vmlinuz-*"))?;
        let name = vmlinuz.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let version = name.trim_start_matches("vmlinuz-").to_string();
        let config = boot.join(format!("config-{version}"));
        if !config.is_file() {
            bail!("kernel package has no /boot/config-{version}");
        }
        // Debian still ships /lib/modules; a merged-/usr package would use usr/lib.
        let modules_dir = ["lib/modules", "usr/lib/modules"]
            .iter()
            .map(|d| root.join(d).join(&version))
            .find(|d| d.is_dir())
            .ok_or_else(|| anyhow!("kernel package has no lib/modules/{version}"))?;
        Ok(Kernel {
            version,
            vmlinuz,
            config,
            modules_dir,
        })
    }

    /// The modules /init must insmod, with their dependencies, deps first.
    pub(super) fn initramfs_modules(&self) -> Result<Vec<(String, PathBuf)>> {
        let config = fs::read_to_string(&self.config)?;
        let mut wanted: Vec<&str> = BASE_MODULES.to_vec();
        for (option, module) in POWER_BUTTON_MODULES {
            match config_value(&config, option).as_deref() {
                Some("m") => wanted.push(module),
                Some("y") => {} // built in: nothing to load
                _ => step(&format!(
                    "warning: {option} is not enabled in this kernel; the ACPI power button will not reach userspace"
                )),
            }
        }

        let index = ModuleIndex::scan(&self.modules_dir)?;
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        for name in wanted {
            index.visit(&normalize(name), &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }
}

/// Kernel module names use `_` and `-` interchangeably.
fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

fn config_value(config: &str, option: &str) -> Option<String> {
    config.lines().find_map(|l| {
        l.strip_prefix(option)
            .and_then(|rest| rest.strip_prefix('='))
            .map(str::to_string)
    })
}

/// Module files of one kernel, found by walking the tree (the package ships
/// no modules.dep; depmod runs at install time).
struct ModuleIndex {
    files: BTreeMap<String, PathBuf>,
    compressed: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    fn scan(dir: &Path) -> Result<ModuleIndex> {
        let mut index = ModuleIndex {
            files: BTreeMap::new(),
            compressed: BTreeMap::new(),
            builtin: BTreeSet::new(),
        };
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            for entry in fs::read_dir(&d)? {
                let entry = entry?;
                let path = entry.path();
                if entry.file_type()?.is_dir() {
                    stack.push(path);
                    continue;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(stem) = name.strip_suffix(".ko") {
                    index.files.insert(normalize(stem), path);
                } else if let Some((stem, _)) = name.split_once(".ko.") {
                    index.compressed.insert(normalize(stem), path);
                }
            }
        }
        if let Ok(list) = fs::read_to_string(dir.join("modules.builtin")) {
            for line in list.lines() {
                let file = line.rsplit('/').next().unwrap_or(line);
                let stem = file.split(".ko").next().unwrap_or(file);
                index.builtin.insert(normalize(stem));
            }
        }
        Ok(index)
    }

    /// Depth-first: dependencies are pushed to `order` before the module.
    fn visit(
        &self,
        name: &str,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<(String, PathBuf)>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            bail!("module dependency cycle: {} -> {name}", path.join(" -> "));
        }
        let Some(file) = self.files.get(name) else {
            if self.builtin.contains(name) {
                done.insert(name.to_string());
                return Ok(());
            }
            if let Some(c) = self.compressed.get(name) {
                bail!(
                    "kernel module {name} is compressed ({}); only uncompressed .ko modules are supported (busybox insmod cannot load them)",
                    c.display()
                );
            }
            bail!("kernel module {name} is neither a .ko in the kernel package nor built in");
        };
        let data = fs::read(file).with_context(|| format!("reading {}", file.display()))?;
        let deps = Elf::parse(&data)
            .and_then(|elf| elf.modinfo_depends())
            .with_context(|| format!("reading .modinfo of {}", file.display()))?;
        path.push(name.to_string());
        for dep in deps {
            self.visit(&normalize(&dep), done, path, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push((name.to_string(), file.clone()));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_values() {
        let cfg = "CONFIG_A=m\n# CONFIG_B is not set\nCONFIG_AB=y\n";
        assert_eq!(config_value(cfg, "CONFIG_A").as_deref(), Some("m"));
        assert_eq!(config_value(cfg, "CONFIG_B"), None);
        assert_eq!(config_value(cfg, "CONFIG_AB").as_deref(), Some("y"));
    }
}
