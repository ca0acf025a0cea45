//! OpenSSH for the rootfs: `sshd` and `ssh-keygen` from Debian's packages,
//! the library packages they need, and the libraries they load.
//!
//! OpenSSH rather than dropbear because dropbear has no certificates, and
//! the daemon's SSH CA (src/ssh) logs users in with certificates.

use super::apt::{control_field, depends_names, package_deb};
use super::elf::Elf;
use super::{find_tool, run};
use anyhow::{anyhow, bail, Context, Result};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The server; its library dependencies are followed.
const SERVER_PACKAGE: &str = "openssh-server";
/// Only for `ssh-keygen` (the guest makes its host key on first boot); it
/// loads a subset of the server's libraries, which `ldd` checks.
const KEYGEN_PACKAGE: &str = "openssh-client";
/// (path in the package and in the guest)
const BINARIES: &[&str] = &["usr/sbin/sshd", "usr/bin/ssh-keygen"];

/// The SSH server of the rootfs: Debian's dynamically linked OpenSSH, with
/// the shared libraries and loader it needs (the rootfs has no libc).
pub(super) struct OpenSsh {
    pub(super) version: String,
    /// (path in the guest, file to copy it from): the binaries, each library
    /// under its soname, and the loader.
    pub(super) files: Vec<(PathBuf, PathBuf)>,
}

/// Always in the guest's loader search path, wherever the host keeps its libs.
pub(super) const GUEST_LIB_DIR: &str = "lib/x86_64-linux-gnu";
/// The host's libc (and its loader) is used instead: ldd resolves libc with
/// the host's loader, and the two must match.
const HOST_PACKAGES: &[&str] = &["libc6"];
/// Bound on the dependency walk, above openssh-server's two dozen libraries.
const MAX_PACKAGES: usize = 48;

/// A package of shared libraries (Debian names them `lib*`, and zlib
/// `zlib1g`). Its data, modules, tools and headers packages are not needed
/// to load a library; neither is anything else a server package depends on
/// (maintainer-script tools, PAM modules: the guest runs sshd without PAM).
fn is_library_package(name: &str) -> bool {
    (name.starts_with("lib") || name.starts_with("zlib"))
        && !["-modules", "-runtime", "-common", "-bin", "-dev", "-data"]
            .iter()
            .any(|s| name.ends_with(s))
}

impl OpenSsh {
    /// Fetches openssh-server and the library packages it depends on (so the
    /// host needs none of them) and openssh-client, extracts them under
    /// `root`, and asks `ldd` which libraries the binaries load.
    pub(super) fn fetch(cache: &Path, root: &Path) -> Result<OpenSsh> {
        let ldd = find_tool("ldd", "libc-bin")?;
        let extract = |package: &str| -> Result<String> {
            let deb = package_deb(cache, package)?;
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
            Ok(String::from_utf8_lossy(&fields.stdout).into_owned())
        };
        let mut queue = vec![SERVER_PACKAGE.to_string()];
        let mut seen: BTreeSet<String> = queue.iter().cloned().collect();
        let mut version = String::new();
        while let Some(package) = queue.pop() {
            let fields = extract(&package)?;
            if package == SERVER_PACKAGE {
                version = control_field(&fields, "Version").unwrap_or_default();
            }
            for field in ["Pre-Depends", "Depends"] {
                for dep in depends_names(&control_field(&fields, field).unwrap_or_default()) {
                    if is_library_package(&dep)
                        && !HOST_PACKAGES.contains(&dep.as_str())
                        && seen.insert(dep.clone())
                    {
                        queue.push(dep);
                    }
                }
            }
            if seen.len() > MAX_PACKAGES {
                bail!("{SERVER_PACKAGE} pulls in more than {MAX_PACKAGES} packages: {seen:?}");
            }
        }
        extract(KEYGEN_PACKAGE)?;

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

        let mut files = Vec::new();
        let mut loaders = BTreeSet::new();
        let mut libs = BTreeMap::new();
        for guest in BINARIES {
            let binary = root.join(guest);
            let data =
                fs::read(&binary).with_context(|| format!("reading {}", binary.display()))?;
            let loader = Elf::parse(&data)
                .and_then(|elf| elf.interpreter())
                .with_context(|| format!("reading {}", binary.display()))?
                .ok_or_else(|| anyhow!("{} has no dynamic loader (PT_INTERP)", binary.display()))?;
            loaders.insert(loader);
            let output = run(
                Command::new(&ldd)
                    .arg(&binary)
                    .env("LD_LIBRARY_PATH", &lib_path),
                "ldd",
            )?;
            let listing = String::from_utf8_lossy(&output.stdout);
            for (soname, path) in
                parse_ldd(&listing).with_context(|| format!("ldd {}", binary.display()))?
            {
                libs.entry(soname).or_insert(path);
            }
            files.push((PathBuf::from(guest), binary));
        }
        // The loader at its PT_INTERP path (the host's, as ldd used it), each
        // library under its soname in a directory on the default search path.
        for loader in loaders {
            files.push((
                PathBuf::from(loader.trim_start_matches('/')),
                PathBuf::from(&loader),
            ));
        }
        for (soname, path) in libs {
            files.push((Path::new(GUEST_LIB_DIR).join(soname), path));
        }
        Ok(OpenSsh { version, files })
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
            \tlibwrap.so.0 => /tmp/x/lib/x86_64-linux-gnu/libwrap.so.0 (0x00007f1)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f2)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f3)\n";
        let libs = parse_ldd(listing).unwrap();
        assert_eq!(
            libs,
            vec![
                (
                    "libwrap.so.0".to_string(),
                    PathBuf::from("/tmp/x/lib/x86_64-linux-gnu/libwrap.so.0")
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

    #[test]
    fn library_packages() {
        for lib in ["libssl3", "libkrb5-3", "zlib1g", "libpam0g", "libwrap0"] {
            assert!(is_library_package(lib), "{lib}");
        }
        for other in [
            "adduser",
            "debconf",
            "libpam-modules",
            "libpam-runtime",
            "libaudit-common",
            "openssh-client",
            "procps",
        ] {
            assert!(!is_library_package(other), "{other}");
        }
    }
}
