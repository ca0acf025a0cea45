//! The Firecracker backend's own settings, read from `HATCH_FIRECRACKER_BINARY` and `HATCH_JAILER_BINARY`.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerConfig {
    /// HATCH_FIRECRACKER_BINARY: the `firecracker` to run (a name on PATH or a path).
    pub firecracker: String,
    /// HATCH_JAILER_BINARY: the `jailer` every Firecracker is launched through.
    pub jailer: String,
}

impl FirecrackerConfig {
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> FirecrackerConfig {
        FirecrackerConfig {
            firecracker: get("HATCH_FIRECRACKER_BINARY")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| "firecracker".into()),
            jailer: get("HATCH_JAILER_BINARY")
                .filter(|v| !v.trim().is_empty())
                .unwrap_or_else(|| "jailer".into()),
        }
    }

    /// Both binaries as absolute paths, or why they cannot be used.
    pub fn find(&self, path_var: Option<&str>) -> Result<Binaries, String> {
        let firecracker = find_executable(&self.firecracker, path_var).ok_or_else(|| {
            format!(
                "no firecracker binary at {:?} (HATCH_FIRECRACKER_BINARY)",
                self.firecracker
            )
        })?;
        let jailer = find_executable(&self.jailer, path_var).ok_or_else(|| {
            format!(
                "no jailer binary at {:?} (HATCH_JAILER_BINARY)",
                self.jailer
            )
        })?;
        Ok(Binaries {
            firecracker,
            jailer,
        })
    }
}

/// Where the binaries are on this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Binaries {
    pub firecracker: PathBuf,
    pub jailer: PathBuf,
}

fn is_executable_file(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// `name` itself when it holds a slash, else the first match in `path_var`
/// (PATH's syntax), made absolute: the jailer is handed absolute paths only.
pub fn find_executable(name: &str, path_var: Option<&str>) -> Option<PathBuf> {
    let found = if name.contains('/') {
        Some(PathBuf::from(name)).filter(|p| is_executable_file(p))
    } else {
        path_var?
            .split(':')
            .filter(|d| !d.is_empty())
            .map(|d| Path::new(d).join(name))
            .find(|p| is_executable_file(p))
    }?;
    std::fs::canonicalize(found).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn binaries_default_to_path_and_are_found_there() {
        let c = FirecrackerConfig::from_lookup(&|_| None);
        assert_eq!(
            (c.firecracker.as_str(), c.jailer.as_str()),
            ("firecracker", "jailer")
        );
        let dir = std::env::temp_dir().join(format!("hatch-fc-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        use std::os::unix::fs::PermissionsExt;
        for (name, mode) in [("firecracker", 0o755), ("jailer", 0o644)] {
            let p = dir.join(name);
            std::fs::write(&p, b"#!/bin/sh\n").unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        }
        let path = format!("/nonexistent:{}", dir.display());
        assert_eq!(
            find_executable("firecracker", Some(&path)),
            Some(dir.join("firecracker"))
        );
        // Not executable: not a jailer.
        let e = c.find(Some(&path)).unwrap_err();
        assert!(e.contains("HATCH_JAILER_BINARY"), "{e}");
        std::fs::set_permissions(dir.join("jailer"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let b = c.find(Some(&path)).unwrap();
        assert_eq!(b.jailer, dir.join("jailer"));
        let named = FirecrackerConfig::from_lookup(&|k| {
            (k == "HATCH_FIRECRACKER_BINARY").then(|| dir.join("firecracker").display().to_string())
        });
        assert_eq!(
            named.find(Some(&path)).unwrap().firecracker,
            dir.join("firecracker")
        );
        assert!(find_executable("/nonexistent/firecracker", None).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
