//! Dropbear for the rootfs: its package, the packages it needs, the libraries it loads.

use super::apt::{control_field, depends_names, package_deb};
use super::elf::Elf;
use super::{find_tool, run};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const DROPBEAR_PACKAGE: &str = "dropbear-bin";

/// The SSH server of the rootfs: Debian's dynamically linked dropbear, with
/// the shared libraries and loader it needs (the rootfs has no libc).
pub(super) struct Dropbear {
    pub(super) version: String,
    pub(super) binary: PathBuf,
    /// (path in the guest, file to copy it from)
    pub(super) files: Vec<(PathBuf, PathBuf)>,
}

/// Always in the guest's loader search path, wherever the host keeps its libs.
pub(super) const GUEST_LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// The host's libc (and its loader) is used instead: ldd resolves libc with
/// the host's loader anyway, and the two must match.
const HOST_PACKAGES: &[&str] = &["libc6"];
/// Bound on the dependency walk, far above dropbear-bin's five libraries.
const MAX_PACKAGES: usize = 16;

impl Dropbear {
    /// Fetches dropbear-bin and the library packages it depends on (so the
    /// host needs none of them), extracts them under `root`, and asks `ldd`
    /// which libraries the binary loads.
    pub(super) fn fetch(cache: &Path, root: &Path) -> Result<Dropbear> {
        let ldd = find_tool("ldd", "libc-bin")?;
        let mut queue = vec![DROPBEAR_PACKAGE.to_string()];
        let mut seen: BTreeSet<String> = queue.iter().cloned().collect();
        let mut version = String::new();
        while let Some(package) = queue.pop() {
            let deb = package_deb(cache, &package)?;
            run(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root),
                "dpkg-deb -x",
            )?;
            let fields = run(
                Command::new("dpkg-deb").arg("-f").arg(&deb).args([
                    "Version",
                    "Pre-Depends",
                    "Depends",
                ]),
                "dpkg-deb -f",
            )?;
            let fields = String::from_utf8_lossy(&fields.stdout);
            if package == DROPBEAR_PACKAGE {
                version = control_field(&fields, "Version").unwrap_or_default();
            }
            for field in ["Pre-Depends", "Depends"] {
                for dep in depends_names(&control_field(&fields, field).unwrap_or_default()) {
                    if !HOST_PACKAGES.contains(&dep.as_str()) && seen.insert(dep.clone()) {
                        queue.push(dep);
                    }
                }
            }
            if seen.len() > MAX_PACKAGES {
                bail!("{DROPBEAR_PACKAGE} pulls in more than {MAX_PACKAGES} packages: {seen:?}");
            }
        }

        let binary = root.join("usr/sbin/dropbear");
        let data = fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
        let loader = Elf::parse(&data)
            .and_then(|elf| elf.interpreter())
            .with_context(|| format!("reading {}", binary.display()))?
            .ok_or_else(|| anyhow!("{} has no dynamic loader (PT_INTERP)", binary.display()))?;

        let lib_path = [
            "lib/x86_64-linux-gnu",
            "usr/lib/x86_64-linux-gnu",
            "lib",
            "usr/lib",
        ]
        .iter()
        .map(|d| root.join(d))
        .filter(|d| d.is_dir())
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(":");
        let output = run(
            Command::new(&ldd)
                .arg(&binary)
                .env("LD_LIBRARY_PATH", lib_path),
            "ldd dropbear",
        )?;
        let listing = String::from_utf8_lossy(&output.stdout);
        let libs = parse_ldd(&listing).with_context(|| format!("ldd {}", binary.display()))?;

        // The loader at its PT_INTERP path (the host's, as ldd used it), each
        // library under its soname in a directory on the default search path.
        let mut files = vec![(
            PathBuf::from(loader.trim_start_matches('/')),
            PathBuf::from(&loader),
        )];
        for (soname, path) in libs {
            files.push((Path::new(GUEST_LIB_DIR).join(soname), path));
        }
        Ok(Dropbear {
            version,
            binary,
            files,
        })
    }
}

/// `(soname, resolved path)` of every library in `ldd` output; the loader
/// line and the vDSO carry no `=>` and are skipped.
fn parse_ldd(listing: &str) -> Result<Vec<(String, PathBuf)>> {
    let mut libs = Vec::new();
    for line in listing.lines() {
        let Some((soname, rest)) = line.split_once("=>") else {
            continue;
        };
        let soname = soname.trim();
        let path = rest.split(" (").next().unwrap_or("").trim();
        if path.is_empty() || path == "not found" {
            bail!("shared library {soname} not found");
        }
        libs.push((soname.to_string(), PathBuf::from(path)));
    }
    if libs.is_empty() {
        bail!("ldd listed no shared libraries");
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_listing() {
        let listing = "\tlinux-vdso.so.1 (0x00007ffd)\n\
            \tlibtomcrypt.so.1 => /tmp/x/usr/lib/x86_64-linux-gnu/libtomcrypt.so.1 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs = parse_ldd(listing).unwrap();
        assert_eq!(
            libs,
            vec![
                (
                    "libtomcrypt.so.1".to_string(),
                    PathBuf::from("/tmp/x/usr/lib/x86_64-linux-gnu/libtomcrypt.so.1")
                ),
                (
                    "libc.so.6".to_string(),
                    PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6")
                ),
            ]
        );
        let missing = parse_ldd("\tlibz.so.1 => not found\n").unwrap_err();
        assert!(missing.to_string().contains("libz.so.1"));
    }
}
