//! Supervision: starting a VMM, watching it, and ending it.

use super::state::VmState;
use super::{Manager, ManagerError, MemoryFeed, Result, Running};
use crate::store::Vm;
use crate::vmm::{self, process, VmSpec, Vmm};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

impl Manager {
    /// Boots the VMM for `vm` and starts watching its process.
    pub(super) async fn boot(self: &Arc<Self>, vm: &Vm) -> Result<()> {
        self.boot_from(vm, None).await
    }

    /// Starts the VMM for `vm`: a fresh boot, or a restore from snapshot files
    /// (then resumed), and starts watching its process.
    pub(super) async fn boot_from(
        self: &Arc<Self>,
        vm: &Vm,
        snapshot: Option<(&vmm::SnapshotFiles, MemoryFeed)>,
    ) -> Result<()> {
        let backend = self.backend_for(vm)?;
        Self::check_kernel(backend.as_ref(), std::path::Path::new(&vm.image_dir))
            .map_err(ManagerError::BadRequest)?;
        let spec = self.spec_for(vm, backend.as_ref());
        if !spec.disk.exists() {
            return Err(ManagerError::Internal(format!(
                "the VM's disk {} is missing",
                spec.disk.display()
            )));
        }
        if let Some(nic) = &spec.nic {
            let net = self.network()?;
            match self.isolation(vm) {
                Some(iso) => net.isolate(&iso).await.map_err(ManagerError::Host)?,
                None => net.add_tap(&nic.tap).await.map_err(ManagerError::Host)?,
            }
            // The port drops everything until the firewall pins it to this
            // VM (a VM created since the last sync): pin it before the guest
            // runs. A guest is never started unfiltered.
            if let Err(e) = self.sync_firewall().await {
                self.remove_tap(vm).await;
                return Err(e.context("firewall"));
            }
        }
        let launched = match snapshot {
            None => backend.boot(&spec).await.map_err(ManagerError::from),
            Some((files, feed)) => {
                self.load_and_resume(backend.as_ref(), &spec, files, feed)
                    .await
            }
        };
        let proc = match launched {
            Ok(p) => p,
            Err(e) => {
                backend.release(&vm.id).await;
                self.remove_tap(vm).await;
                return Err(e);
            }
        };
        let boot_id = self.next_boot.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = watch::channel(false);
        self.running.lock().unwrap().insert(
            vm.id.clone(),
            Running {
                boot_id,
                pid: proc.pid,
                exited: rx,
                backend,
            },
        );
        // The console log keeps a bounded tail while this VMM runs.
        tokio::spawn(super::console::keep_tail(
            spec.console_log(),
            self.config.limits.console_log_max_bytes,
            tx.subscribe(),
        ));
        let mgr = Arc::clone(self);
        let vm_id = vm.id.clone();
        let mut child = proc.child;
        tokio::spawn(async move {
            let status = child.wait().await;
            let _ = tx.send(true);
            mgr.on_vmm_exit(&vm_id, boot_id, status).await;
        });
        tracing::info!(vm = %vm.id, pid = proc.pid, "VMM started");
        Ok(())
    }

    /// Starts a VMM that loads the snapshot memory `feed` streams into
    /// `files.memory` (a FIFO), and resumes the guest only once the feed has
    /// verified every byte it sent. For a memory file the VMM maps, the file
    /// was verified before this is called and `feed` is already finished.
    /// Whatever fails, no VMM is left behind.
    pub(super) async fn load_and_resume(
        &self,
        backend: &dyn Vmm,
        spec: &VmSpec,
        files: &vmm::SnapshotFiles,
        feed: MemoryFeed,
    ) -> Result<vmm::VmProcess> {
        let launch = backend.restore(spec, files);
        tokio::pin!(launch);
        let mut feed = feed;
        let loaded = tokio::select! {
            launched = &mut launch => match launched {
                Err(e) => Err(e.into()),
                // Loaded: the feed has sent its last bytes and is checking them.
                Ok(mut p) => match tokio::time::timeout(Duration::from_secs(60), &mut feed).await {
                    Ok(Ok(())) => Ok(p),
                    other => {
                        let _ = p.child.start_kill();
                        let _ = p.child.wait().await;
                        Err(match other {
                            Ok(Err(e)) => e,
                            _ => ManagerError::Internal(
                                "the snapshot memory did not finish streaming".into(),
                            ),
                        })
                    }
                },
            },
            fed = &mut feed => match fed {
                Ok(()) => launch.await.map_err(ManagerError::from),
                Err(e) => Err(e),
            },
        };
        if loaded.is_err() {
            // A VMM still waiting for memory that will never come goes too.
            let dir = spec.work_dir.clone();
            tokio::task::spawn_blocking(move || process::kill_all_under(&dir))
                .await
                .ok();
        }
        let mut p = loaded?;
        if let Err(e) = backend.resume(spec).await {
            let _ = p.child.start_kill();
            let _ = p.child.wait().await;
            return Err(e.into());
        }
        Ok(p)
    }

    /// A VMM exited. If no flow was expecting it (the guest powered off or the
    /// VMM crashed), record what happened.
    pub(super) async fn on_vmm_exit(
        &self,
        vm_id: &str,
        boot_id: u64,
        status: std::io::Result<std::process::ExitStatus>,
    ) {
        let _guard = self.lock_vm(vm_id).await;
        let backend = {
            let mut running = self.running.lock().unwrap();
            if running.get(vm_id).map(|r| r.boot_id) != Some(boot_id) {
                return; // a stop/delete flow already handled this process
            }
            running.remove(vm_id).map(|r| r.backend)
        };
        if let Some(b) = backend {
            b.release(vm_id).await;
        }
        let Ok(Some(mut vm)) = self.store.get_vm(vm_id).await else {
            return;
        };
        if vm.state != VmState::Running {
            return;
        }
        let result = match status {
            Ok(s) if s.success() => {
                tracing::info!(vm = vm_id, "guest powered off");
                self.transition(&mut vm, VmState::Stopped, None).await
            }
            other => {
                let how = match other {
                    Ok(s) => s.to_string(),
                    Err(e) => e.to_string(),
                };
                let msg = format!("the VMM process exited unexpectedly ({how})");
                self.transition(&mut vm, VmState::Error, Some(&msg)).await
            }
        };
        if let Err(e) = result {
            tracing::error!(vm = vm_id, "recording VMM exit: {e}");
        }
        self.remove_tap(&vm).await;
        self.refresh_forwards().await;
    }

    /// Ends the VM's VMM process: first an ACPI power-off when `graceful`,
    /// then SIGKILL after the stop timeout. Returns whether the guest shut down by itself.
    pub(super) async fn end_vmm(&self, vm: &Vm, graceful: bool) -> bool {
        let entry = {
            let running = self.running.lock().unwrap();
            running
                .get(&vm.id)
                .map(|r| (r.pid, r.exited.clone(), Arc::clone(&r.backend)))
        };
        // Whatever is left of a VMM not started by this daemon (or by a
        // backend it no longer has) is only killed.
        let backend = match &entry {
            Some((_, _, b)) => Some(Arc::clone(b)),
            None => self.backend_for(vm).ok(),
        };
        let mut clean = false;
        if let Some((pid, mut exited, backend)) = entry {
            if graceful {
                let spec = self.spec_for(vm, backend.as_ref());
                // The request is repeated: a guest still booting may not be
                // listening for the power button yet, and would miss a single press.
                let deadline = tokio::time::Instant::now() + self.config.stop_timeout;
                while !clean && tokio::time::Instant::now() < deadline {
                    if backend.request_shutdown(&spec).await.is_err() {
                        break;
                    }
                    let slice = deadline
                        .saturating_duration_since(tokio::time::Instant::now())
                        .min(Duration::from_secs(2));
                    clean = tokio::time::timeout(slice, exited.wait_for(|e| *e))
                        .await
                        .is_ok();
                }
            }
            if !clean {
                tracing::warn!(vm = %vm.id, pid, graceful, "killing VMM");
                tokio::task::spawn_blocking(move || {
                    process::kill_and_wait(pid, Duration::from_secs(10))
                })
                .await
                .ok();
                let _ =
                    tokio::time::timeout(Duration::from_secs(10), exited.wait_for(|e| *e)).await;
            }
            self.running.lock().unwrap().remove(&vm.id);
        }
        // Anything else still running from this VM's directory is ours and must go.
        let dir = self.work_dir(&vm.id);
        tokio::task::spawn_blocking(move || process::kill_all_under(&dir))
            .await
            .ok();
        if let Some(b) = backend {
            b.release(&vm.id).await;
        }
        self.remove_tap(vm).await;
        clean
    }

    /// The pid of the VMM this daemon runs for `id`, if any.
    pub(super) fn vmm_pid(&self, id: &str) -> Option<u32> {
        self.running.lock().unwrap().get(id).map(|r| r.pid)
    }

    pub fn is_running(&self, id: &str) -> bool {
        self.running.lock().unwrap().contains_key(id)
    }

    /// Daemon shutdown: every running guest is powered off gracefully and
    /// recorded `stopped`, so it can be started again after the restart.
    pub async fn shutdown_all(&self) {
        let ids: Vec<String> = self.running.lock().unwrap().keys().cloned().collect();
        let stops = ids.into_iter().map(|id| async move {
            let _guard = self.lock_vm(&id).await;
            if let Ok(Some(mut vm)) = self.store.get_vm(&id).await {
                if vm.state == VmState::Running {
                    if let Err(e) = self.stop_locked(&mut vm).await {
                        tracing::error!(vm = %id, "stopping at shutdown: {e}");
                    }
                }
            }
        });
        futures_util::future::join_all(stops).await;
        self.backends.shutdown().await;
        if let Some(net) = self.network.get() {
            net.shutdown().await;
        }
    }
}
