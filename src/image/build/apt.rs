//! Debian packages from apt, kept in a cache dir so a warm build needs no apt lists.

use super::step;
use anyhow::{anyhow, bail, Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

const KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

pub(in crate::image) fn cache_dir() -> Result<PathBuf> {
    let nonempty = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    let dir = if let Some(dir) = nonempty("HATCH_IMAGE_CACHE") {
        PathBuf::from(dir)
    } else if let Some(xdg) = nonempty("XDG_CACHE_HOME") {
        PathBuf::from(xdg).join("hatch")
    } else if let Some(home) = nonempty("HOME") {
        PathBuf::from(home).join(".cache").join("hatch")
    } else {
        bail!("no cache directory: set HATCH_IMAGE_CACHE (or XDG_CACHE_HOME / HOME)");
    };
    fs::create_dir_all(&dir).with_context(|| format!("creating cache dir {}", dir.display()))?;
    Ok(dir)
}

const APT_UPDATE_HINT: &str =
    "the apt package lists may be missing or stale: run `apt-get update` (as root) and retry";

/// The kernel .deb in the cache, downloaded with `apt-get download` if needed.
pub(super) fn kernel_deb(cache: &Path) -> Result<PathBuf> {
    let is_kernel = |name: &str| name.starts_with("linux-image-") && name.contains("-cloud-amd64_");
    let resolve = || {
        let package = resolve_kernel_package()?;
        let (version, file) = resolve_package(&package)?;
        Ok((package, version, file))
    };
    match resolve() {
        Ok(found) => download_current(cache, found, resolve),
        Err(err) => offline_deb(cache, KERNEL_METAPACKAGE, err, is_kernel),
    }
}

/// `package`'s candidate .deb in the cache, downloaded if needed.
pub(super) fn package_deb(cache: &Path, package: &str) -> Result<PathBuf> {
    let prefix = format!("{package}_");
    let resolve = || {
        let (version, file) = resolve_package(package)?;
        Ok((package.to_string(), version, file))
    };
    match resolve() {
        Ok(found) => download_current(cache, found, resolve),
        Err(err) => offline_deb(cache, package, err, |name| name.starts_with(&prefix)),
    }
}

/// Downloads `found` (package, version, pool file). Lists that are old name
/// versions the archive no longer has (a security update replaced them); so
/// when the download fails, the lists are refreshed once (as root) and the
/// package resolved and downloaded again.
fn download_current(
    cache: &Path,
    found: (String, String, String),
    resolve: impl Fn() -> Result<(String, String, String)>,
) -> Result<PathBuf> {
    let (package, version, file) = found;
    match download_deb(cache, &package, &version, &file) {
        Ok(deb) => Ok(deb),
        Err(err) if refresh_lists() => {
            let (package, version, file) = resolve().context(format!("{err:#}"))?;
            download_deb(cache, &package, &version, &file)
        }
        Err(err) => Err(err),
    }
}

/// `apt-get update`, at most once per process and only as root; true when
/// it ran and succeeded.
fn refresh_lists() -> bool {
    static TRIED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    // SAFETY: geteuid has no preconditions and cannot fail.
    if TRIED.swap(true, std::sync::atomic::Ordering::SeqCst) || unsafe { libc::geteuid() } != 0 {
        return false;
    }
    step("a package did not download: refreshing the package lists (apt-get update)");
    Command::new("apt-get")
        .args(["update", "-qq"])
        .status()
        .is_ok_and(|s| s.success())
}

/// Offline with an empty apt state but a warm cache: still buildable.
fn offline_deb(
    cache: &Path,
    package: &str,
    err: anyhow::Error,
    matches: impl Fn(&str) -> bool,
) -> Result<PathBuf> {
    let Some(deb) = newest_cached_deb(cache, matches)? else {
        return Err(err);
    };
    step(&format!(
        "warning: cannot resolve {package} ({err:#}); using cached {}",
        deb.display()
    ));
    Ok(deb)
}

fn download_deb(cache: &Path, package: &str, version: &str, file: &str) -> Result<PathBuf> {
    let cached = cache.join(file);
    if cached.is_file() {
        step(&format!("using cached {}", cached.display()));
        return Ok(cached);
    }

    // Download into a scratch dir and rename, so an interrupted download is
    // never mistaken for a cached package.
    step(&format!("downloading {package} {version}"));
    let scratch = cache.join(format!(".download.{}", std::process::id()));
    let _ = fs::remove_dir_all(&scratch);
    fs::create_dir_all(&scratch)?;
    let result = Command::new("apt-get")
        .arg("download")
        .arg(format!("{package}={version}"))
        .current_dir(&scratch)
        .output();
    let downloaded = (|| -> Result<PathBuf> {
        let output = result.context("running apt-get download")?;
        if !output.status.success() {
            bail!(
                "`apt-get download {package}={version}` failed: {}\n{APT_UPDATE_HINT}",
                String::from_utf8_lossy(&output.stderr).trim()
            );
        }
        let deb = fs::read_dir(&scratch)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| anyhow!("apt-get download of {package} produced no .deb"))?;
        fs::rename(&deb, &cached)?;
        Ok(cached)
    })();
    let _ = fs::remove_dir_all(&scratch);
    downloaded
}

/// Metapackage -> the real kernel package it depends on.
fn resolve_kernel_package() -> Result<String> {
    let missing = || anyhow!("apt knows no package {KERNEL_METAPACKAGE}; {APT_UPDATE_HINT}");
    let output = Command::new("apt-cache")
        .args(["depends", KERNEL_METAPACKAGE])
        .output()
        .context("running apt-cache (is apt installed?)")?;
    if !output.status.success() {
        return Err(missing());
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    let package = stdout
        .lines()
        .filter_map(|l| l.trim().trim_start_matches('|').strip_prefix("Depends:"))
        .map(|p| p.trim().trim_matches(|c| c == '<' || c == '>'))
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(missing)?
        .to_string();
    Ok(package)
}

/// Package -> (candidate version, pool file name).
fn resolve_package(package: &str) -> Result<(String, String)> {
    let output = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .output()
        .context("running apt-cache show (is apt installed?)")?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    // apt-cache show exits 0 with no output for a package only named by others.
    if !output.status.success() || stdout.trim().is_empty() {
        bail!("apt-cache show {package} failed; {APT_UPDATE_HINT}");
    }
    let field = |name: &str| {
        stdout
            .lines()
            .find_map(|l| l.strip_prefix(name).map(|v| v.trim().to_string()))
    };
    let version = field("Version:").ok_or_else(|| anyhow!("no Version for {package}"))?;
    let file = field("Filename:")
        .and_then(|f| f.rsplit('/').next().map(str::to_string))
        // apt-get download's own naming, in case the index has no Filename.
        .unwrap_or_else(|| format!("{package}_{}_amd64.deb", version.replace(':', "%3a")));
    Ok((version, file))
}

fn newest_cached_deb(cache: &Path, matches: impl Fn(&str) -> bool) -> Result<Option<PathBuf>> {
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for entry in fs::read_dir(cache)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if matches(name) && name.ends_with(".deb") {
            let mtime = fs::metadata(&path)?.modified()?;
            if best.as_ref().is_none_or(|(t, _)| mtime > *t) {
                best = Some((mtime, path));
            }
        }
    }
    Ok(best.map(|(_, p)| p))
}

/// One field of `dpkg-deb -f` output (continuation lines are not needed here).
pub(super) fn control_field(fields: &str, name: &str) -> Option<String> {
    fields.lines().find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_string())
    })
}

/// Package names of a Depends field: the first of each `a | b` alternative,
/// without version constraints or architecture qualifiers.
pub(super) fn depends_names(depends: &str) -> Vec<String> {
    depends
        .split(',')
        .filter_map(|dep| {
            let first = dep.split('|').next()?.trim();
            let name = first.split([' ', '(', ':']).next()?.trim();
            (!name.is_empty()).then(|| name.to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_depends() {
        let fields = "Version: 2022.83-1\nPre-Depends: libc6 (>= 2.34)\n\
            Depends: libc6 (>= 2.34), libcrypt1 (>= 1:4.1.0), zlib1g:amd64 | zlib-alt, libx\n";
        assert_eq!(
            control_field(fields, "Version").as_deref(),
            Some("2022.83-1")
        );
        assert_eq!(control_field(fields, "Conflicts"), None);
        let deps = depends_names(&control_field(fields, "Depends").unwrap());
        assert_eq!(deps, ["libc6", "libcrypt1", "zlib1g", "libx"]);
        assert!(depends_names("").is_empty());
    }
}
