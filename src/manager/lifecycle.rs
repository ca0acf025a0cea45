//! VM lifecycle as the API asks for it: create, read, stop, start, delete, console.

use super::requests::CreateVm;
use super::state::VmState;
use super::{not_found, Context, Manager, ManagerError, Result, DEFAULT_IMAGE_ID};
use crate::domain::Json;
use crate::image::{self};
use crate::store::{NewVm, Owner, Vm};
use crate::telemetry::Operation;
use crate::vmm;
use std::path::{Path, PathBuf};
use std::sync::Arc;

impl Manager {
    pub(super) async fn visible_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        match self.store.get_vm(id).await? {
            Some(vm) if vm.owner_id == owner.id => Ok(vm),
            _ => Err(not_found("vm", id)),
        }
    }

    pub async fn get_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        self.visible_vm(owner, id).await
    }

    pub async fn list_vms(&self, owner: &Owner) -> Result<Vec<Vm>> {
        Ok(self.store.list_vms(&owner.id).await?)
    }

    /// One page of the owner's VMs, newest first (`GET /vms?limit=`).
    pub async fn list_vms_page(
        &self,
        owner: &Owner,
        page: &crate::store::Page,
    ) -> Result<Vec<crate::store::Listed<Vm>>> {
        Ok(self.store.list_vms_page(&owner.id, page).await?)
    }

    /// Creates and boots a VM. A failure after the row exists leaves the VM in
    /// `error` with the reason, its console log kept for diagnosis.
    pub async fn create_vm(self: &Arc<Self>, owner: &Owner, req: CreateVm) -> Result<Vm> {
        req.validate().map_err(ManagerError::BadRequest)?;
        let template = match &req.template_id {
            Some(t) => Some(
                self.store
                    .get_template(&owner.id, t)
                    .await?
                    .ok_or_else(|| {
                        ManagerError::BadRequest(format!("template_id: template {t} not found"))
                    })?,
            ),
            None => None,
        };
        let tpl = template.as_ref();
        // Explicit request values win over the template's (Hatch API).
        let image_id = req
            .image_id
            .clone()
            .or_else(|| tpl.and_then(|t| t.image_id.clone()))
            .unwrap_or_else(|| DEFAULT_IMAGE_ID.to_string());
        let vcpu_count = req
            .vcpu_count
            .or_else(|| tpl.and_then(|t| t.vcpu_count))
            .unwrap_or(super::requests::DEFAULT_VCPUS);
        let mem_mib = req
            .mem_mib
            .or_else(|| tpl.and_then(|t| t.mem_mib))
            .unwrap_or(super::requests::DEFAULT_MEM_MIB);
        let user_data = req
            .user_data
            .clone()
            .or_else(|| tpl.and_then(|t| t.user_data.clone()));
        // Held from this check until the VM row is in, so a delete of the image
        // either happens before (and this create fails) or sees the VM.
        let (image, image_hold) = match self.hold_image(owner, &image_id).await {
            Ok(i) => i,
            Err(_) if image_id == DEFAULT_IMAGE_ID => {
                return Err(ManagerError::BadRequest(
                    "no image_id given and no default image is configured \
                     (set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH)"
                        .into(),
                ))
            }
            Err(_) => {
                return Err(ManagerError::BadRequest(format!(
                    "image_id: image {image_id} not found"
                )))
            }
        };
        // The backend asked for (else the server's default) must be one this
        // daemon has, and must boot the image's kernel.
        let backend = match &req.hypervisor {
            Some(h) => self
                .backends
                .get(h)
                .map_err(|e| ManagerError::BadRequest(format!("hypervisor: {e}")))?,
            None => Arc::clone(self.backends.default_backend()),
        };
        Self::check_kernel(backend.as_ref(), Path::new(&image.dir))
            .map_err(|e| ManagerError::BadRequest(format!("image_id: {e}")))?;
        let mut vm = Vm::new(NewVm {
            owner_id: owner.id.clone(),
            image_id: image.id.clone(),
            image_dir: image.dir.clone(),
            template_id: tpl.map(|t| t.id.clone()),
            vcpu_count,
            mem_mib,
            boot_args: super::requests::effective_boot_args(
                req.boot_args.as_deref(),
                image.boot_args.as_deref(),
            ),
            enable_network: req.enable_network.unwrap_or(true),
            user_data,
            hypervisor: backend.name().into(),
            name: req.name.clone(),
            snapshot_compression: req
                .snapshot_compression
                .as_ref()
                .map(|c| Json(c.normalized())),
            auto_sleep: req.auto_sleep.unwrap_or(true),
            idle_timeout_seconds: req.idle_timeout_seconds,
        });
        let _guard = self.lock_vm(&vm.id).await;
        self.insert_with_network(&mut vm, &req, true, 0).await?;
        drop(image_hold);
        let boot_timer = self.telemetry.timer(Operation::Boot);
        let work_dir = self.work_dir(&vm.id);
        let prepared = async {
            tokio::fs::create_dir_all(&work_dir)
                .await
                .context(|| "creating work directory".into())?;
            let rootfs = image::rootfs_in(Path::new(&vm.image_dir));
            backend
                .prepare_disk(&rootfs, image::rootfs_format(&rootfs), &work_dir)
                .await
                .map_err(ManagerError::from)
                .context(|| "creating VM disk".into())?;
            self.write_seed(&vm, &work_dir).await
        }
        .await;
        let booted = match prepared {
            Ok(_) => self.boot(&vm).await,
            Err(e) => Err(e),
        };
        match booted {
            Ok(()) => {
                self.transition(&mut vm, VmState::Running, None).await?;
                boot_timer.succeeded();
                self.refresh_forwards().await;
                Ok(vm)
            }
            Err(e) => {
                let e = e.context(format!("failed to start vm {}", vm.id));
                self.transition(&mut vm, VmState::Error, Some(&e.to_string()))
                    .await?;
                Err(e)
            }
        }
    }

    /// Admits the VM (its owner's quotas; the host's memory when it `boots`;
    /// `copies` stored bytes it gets), chooses its network allocations (when
    /// it has networking) and inserts its row; the row is what holds them.
    pub(super) async fn insert_with_network(
        &self,
        vm: &mut Vm,
        req: &CreateVm,
        boots: bool,
        copies: u64,
    ) -> Result<()> {
        {
            let _alloc = self.alloc_lock.lock().await;
            self.admit_vm(vm, boots, copies).await?;
            if vm.enable_network {
                self.allocate_network(vm, req).await?;
            }
            self.store.insert_vm(vm).await?;
        }
        if vm.enable_network {
            self.refresh_reservations().await;
        }
        Ok(())
    }

    pub async fn stop_vm(&self, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.stop_locked(&mut vm).await?;
        Ok(vm)
    }

    pub(super) async fn stop_locked(&self, vm: &mut Vm) -> Result<()> {
        let st = vm.state;
        if st != VmState::Running {
            return Err(ManagerError::Conflict(format!(
                "vm {} is {st}; only a running VM can be stopped",
                vm.id
            )));
        }
        let timer = self.telemetry.timer(Operation::Stop);
        self.transition(vm, VmState::Stopping, None).await?;
        let clean = self.end_vmm(vm, true).await;
        tracing::info!(vm = %vm.id, clean, "stopped");
        self.transition(vm, VmState::Stopped, None).await?;
        timer.succeeded();
        // Hatch API: stopping removes SSH forwarding and keeps the IP allocation.
        self.refresh_forwards().await;
        Ok(())
    }

    pub async fn start_vm(self: &Arc<Self>, owner: &Owner, id: &str) -> Result<Vm> {
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        self.start_locked(&mut vm).await?;
        Ok(vm)
    }

    /// Boots a stopped VM (or one in error) afresh from its disk.
    pub(super) async fn start_locked(self: &Arc<Self>, vm: &mut Vm) -> Result<()> {
        let id = vm.id.clone();
        let st = vm.state;
        if !matches!(st, VmState::Stopped | VmState::Error) {
            return Err(ManagerError::Conflict(format!(
                "vm {id} is {st}; only a stopped VM (or one in error) can be started"
            )));
        }
        // A VM whose backend this daemon lacks is refused before anything changes.
        self.backend_or_reject(vm)?;
        {
            let _admission = self.alloc_lock.lock().await;
            self.check_host_memory(vm).await?;
            self.transition(vm, VmState::Starting, None).await?;
        }
        self.end_vmm(vm, false).await;
        // A fresh boot asks DHCP for the VM's own address: no isolation any more.
        let resumed_another = vm.inner_ip.is_some() || vm.inner_mac.is_some();
        if resumed_another {
            self.store.set_vm_inner_address(&id, None, None).await?;
            vm.inner_ip = None;
            vm.inner_mac = None;
        }
        if resumed_another || vm.guest_principal.is_some() {
            // Its seed may still say what that memory believed.
            if let Err(e) = self.own_seed(vm).await {
                let e = e.context(format!("failed to start vm {id}"));
                self.transition(vm, VmState::Error, Some(&e.to_string()))
                    .await?;
                return Err(e);
            }
        }
        self.forget_memory_principal(vm).await?;
        let boot_timer = self.telemetry.timer(Operation::Boot);
        match self.boot(vm).await {
            Ok(()) => {
                self.transition(vm, VmState::Running, None).await?;
                boot_timer.succeeded();
                self.refresh_forwards().await;
                Ok(())
            }
            Err(e) => {
                let e = e.context(format!("failed to start vm {id}"));
                self.transition(vm, VmState::Error, Some(&e.to_string()))
                    .await?;
                Err(e)
            }
        }
    }

    /// Deletes a VM: VMM killed, work directory removed, row deleted.
    pub async fn delete_vm(&self, owner: &Owner, id: &str) -> Result<()> {
        let (guard, vm) = self.lock_visible_vm(owner, id).await?;
        self.end_vmm(&vm, false).await;
        if self.hot.drop_vm(id) {
            self.telemetry.hot_copies(self.hot.total());
        }
        let dir = self.work_dir(id);
        if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                let e = ManagerError::from(e)
                    .context(format!("deleting vm {id}: removing {}", dir.display()));
                if vm.state.is_transient() {
                    self.store
                        .set_vm_state(id, VmState::Error, Some(&e.to_string()))
                        .await?;
                }
                return Err(e);
            }
        }
        // Hatch API: deleting a VM deletes all its snapshots from storage and its proxy routes.
        self.delete_vm_snapshots(id).await?;
        self.delete_vm_routes(id).await?;
        self.store.delete_vm(id).await?;
        // The row held the IP, MAC and port; with it gone they are free again.
        self.refresh_reservations().await;
        self.refresh_forwards().await;
        drop(guard);
        tracing::info!(vm = id, "deleted");
        Ok(())
    }

    /// Where the VM's console output is kept, and whether it may still grow.
    pub async fn console_log(&self, owner: &Owner, id: &str) -> Result<(PathBuf, bool)> {
        let vm = self.visible_vm(owner, id).await?;
        Ok((
            vmm::console_log_path(&self.work_dir(&vm.id)),
            self.is_running(id),
        ))
    }

    /// How much of each console log is kept (HATCH_CONSOLE_LOG_MAX_BYTES).
    pub fn console_log_max_bytes(&self) -> u64 {
        self.config.limits.console_log_max_bytes
    }
}
