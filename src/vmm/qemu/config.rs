//! The QEMU backend's own settings, read from `HATCH_QEMU_*` variables.

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

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuConfig {
    /// HATCH_QEMU_BINARY: the `qemu-system-x86_64` to run (a name on PATH or a path).
    pub binary: String,
    /// HATCH_QEMU_ACCEL: kvm, tcg or auto (the default).
    pub accel: Accel,
}

impl QemuConfig {
    pub fn from_lookup(get: &impl Fn(&str) -> Option<String>) -> Result<QemuConfig, String> {
        Ok(QemuConfig {
            binary: get("HATCH_QEMU_BINARY").unwrap_or_else(|| "qemu-system-x86_64".into()),
            accel: get("HATCH_QEMU_ACCEL").unwrap_or_default().parse()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)]) -> Result<QemuConfig, String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        QemuConfig::from_lookup(&|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_to_auto_accel_and_the_binary_on_path() {
        let c = cfg(&[]).unwrap();
        assert_eq!(c.accel, Accel::Auto);
        assert_eq!(c.binary, "qemu-system-x86_64");
        let c = cfg(&[
            ("HATCH_QEMU_ACCEL", " TCG "),
            ("HATCH_QEMU_BINARY", "/opt/q"),
        ])
        .unwrap();
        assert_eq!((c.accel, c.binary.as_str()), (Accel::Tcg, "/opt/q"));
    }

    #[test]
    fn rejects_an_unknown_accel_with_the_variable_name() {
        assert!(cfg(&[("HATCH_QEMU_ACCEL", "hvf")])
            .unwrap_err()
            .contains("HATCH_QEMU_ACCEL"));
    }
}
