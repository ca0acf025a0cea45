//! DHCP reservations and a DNS forwarder for the guests: one dnsmasq bound to
//! the bridge, answering only reserved MACs, re-reading its hosts file on SIGHUP.

use super::ipam::BridgeNet;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;

pub struct Dnsmasq {
    dir: PathBuf,
    pid: Mutex<Option<u32>>,
}

/// One reservation: this MAC gets this IP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    pub mac: String,
    pub ip: String,
}

/// The hosts file dnsmasq reads: `MAC,IP` per line.
pub fn hosts_file(reservations: &[Reservation]) -> String {
    reservations
        .iter()
        .map(|r| format!("{},{}\n", r.mac, r.ip))
        .collect()
}

impl Dnsmasq {
    pub fn new(dir: &Path) -> Dnsmasq {
        Dnsmasq {
            dir: dir.to_path_buf(),
            pid: Mutex::new(None),
        }
    }

    fn hosts_path(&self) -> PathBuf {
        self.dir.join("dhcp-hosts")
    }

    fn write_hosts(&self, reservations: &[Reservation]) -> Result<(), String> {
        let tmp = self.dir.join("dhcp-hosts.tmp");
        std::fs::write(&tmp, hosts_file(reservations))
            .map_err(|e| format!("writing DHCP hosts: {e}"))?;
        std::fs::rename(&tmp, self.hosts_path()).map_err(|e| format!("writing DHCP hosts: {e}"))
    }

    /// Starts dnsmasq on `bridge` (any earlier one under our directory is killed first).
    pub async fn start(
        &self,
        bridge: &str,
        net: &BridgeNet,
        reservations: &[Reservation],
    ) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir)
            .map_err(|e| format!("creating {}: {e}", self.dir.display()))?;
        crate::vmm::process::kill_all_under(&self.dir);
        self.write_hosts(reservations)?;
        let d = |name: &str| self.dir.join(name).display().to_string();
        let gw = net.bridge_ip.to_string();
        let mut cmd = tokio::process::Command::new("dnsmasq");
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-hosts",
            "--bind-interfaces",
            "--except-interface=lo",
            // Root keeps access to the files under the data dir for SIGHUP re-reads.
            "--user=root",
        ])
        .arg(format!("--interface={bridge}"))
        .arg(format!("--listen-address={gw}"))
        .arg(format!(
            "--dhcp-range={},static,{},12h",
            net.network(),
            net.netmask()
        ))
        .arg(format!("--dhcp-hostsfile={}", d("dhcp-hosts")))
        .arg(format!("--dhcp-leasefile={}", d("leases")))
        .arg(format!("--pid-file={}", d("dnsmasq.pid")))
        .arg(format!("--log-facility={}", d("dnsmasq.log")))
        .arg(format!("--dhcp-option=option:router,{gw}"))
        .arg(format!("--dhcp-option=option:dns-server,{gw}"))
        .arg("--dhcp-authoritative")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
        let mut child = cmd
            .spawn()
            .map_err(|e| format!("cannot run dnsmasq (apt-get install dnsmasq-base): {e}"))?;
        // dnsmasq fails fast on a bad option or a busy port; give it a moment to say so.
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
            let out = child.wait_with_output().await.map_err(|e| e.to_string())?;
            return Err(format!(
                "dnsmasq exited ({status}): {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        *self.pid.lock().unwrap() = child.id();
        // Reap it whenever it ends so it never lingers as a zombie.
        tokio::spawn(async move {
            let status = child.wait().await;
            tracing::info!(?status, "dnsmasq exited");
        });
        Ok(())
    }

    /// Replaces the reservations; dnsmasq re-reads them on SIGHUP.
    pub fn update(&self, reservations: &[Reservation]) -> Result<(), String> {
        self.write_hosts(reservations)?;
        if let Some(pid) = *self.pid.lock().unwrap() {
            // SAFETY: kill(2) with a pid and a signal number; no memory involved.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGHUP);
            }
        }
        Ok(())
    }

    pub fn stop(&self) {
        if let Some(pid) = self.pid.lock().unwrap().take() {
            crate::vmm::process::kill_and_wait(pid, Duration::from_secs(5));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_file_lines() {
        let r = vec![
            Reservation {
                mac: "02:fc:ac:10:00:0a".into(),
                ip: "172.16.0.10".into(),
            },
            Reservation {
                mac: "02:fc:ac:10:00:0b".into(),
                ip: "172.16.0.11".into(),
            },
        ];
        assert_eq!(
            hosts_file(&r),
            "02:fc:ac:10:00:0a,172.16.0.10\n02:fc:ac:10:00:0b,172.16.0.11\n"
        );
        assert_eq!(hosts_file(&[]), "");
    }
}
