//! Proxy routes (`{subdomain}.{base_domain}` -> a VM's port), what the proxy
//! asks of the manager for each request, and waking a VM on a request.

use super::idle::Busy;
use super::requests::{CreateRoute, UpdateVm};
use super::state::VmState;
use super::{not_found, Manager, ManagerError, Result};
use crate::ids;
use crate::store::{self, Owner, Route, Vm};
use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use tokio::sync::watch;

/// Where the proxy sends a request for one subdomain.
#[derive(Debug, Clone)]
pub struct RouteTarget {
    pub route_id: String,
    pub vm_id: String,
    /// None for a VM without networking (the proxy answers 502).
    pub guest_ip: Option<Ipv4Addr>,
    pub port: u16,
    pub auto_wake: bool,
}

/// Every route by subdomain, in memory so a request costs no database read.
/// Rebuilt from the store whenever a route or a VM with routes changes.
pub(super) type RouteTable = std::sync::RwLock<HashMap<String, RouteTarget>>;

/// How a wake went for the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Woke {
    /// It was running already (another wake got there first).
    AlreadyRunning,
    /// Restored from its standby snapshot: the guest continues, its servers listening.
    Restored,
}

/// Why a request did not wake its VM.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WakeError {
    /// The VM does not sleep: its owner stopped it (or it is in error), and
    /// only its owner starts it again.
    #[error("{0}")]
    NotAsleep(String),
    /// It sleeps, but restoring it failed. Shared (`Arc`): every request
    /// waiting on the wake gets the same result.
    #[error("{0}")]
    Failed(Arc<ManagerError>),
}

/// The outcome of a wake, shared by every request that waited for it.
pub(super) type WakeResult = Option<std::result::Result<Woke, WakeError>>;

impl Manager {
    /// Reloads the route table from the store.
    pub(super) async fn refresh_routes(&self) -> Result<()> {
        let vms: HashMap<String, Vm> = self
            .store
            .networked_vms()
            .await?
            .into_iter()
            .map(|v| (v.id.clone(), v))
            .collect();
        let table = self
            .store
            .all_routes()
            .await?
            .into_iter()
            .map(|r| {
                let ip = vms.get(&r.vm_id).and_then(|v| v.guest_ip);
                let target = RouteTarget {
                    route_id: r.id,
                    vm_id: r.vm_id,
                    guest_ip: ip,
                    port: u16::try_from(r.target_port).unwrap_or(0),
                    auto_wake: r.auto_wake,
                };
                (r.subdomain, target)
            })
            .collect();
        *self.routes.write().unwrap() = table;
        Ok(())
    }

    /// Loads the routes at start-up.
    pub async fn init_routes(&self) -> Result<()> {
        self.refresh_routes().await?;
        let n = self.routes.read().unwrap().len();
        tracing::info!(routes = n, "proxy routes loaded");
        Ok(())
    }

    pub async fn create_route(
        &self,
        owner: &Owner,
        vm_id: &str,
        req: CreateRoute,
    ) -> Result<Route> {
        let port = req.validate().map_err(ManagerError::BadRequest)?;
        let vm = self.visible_vm(owner, vm_id).await?;
        if vm.guest_ip.is_none() {
            return Err(ManagerError::BadRequest(format!(
                "vm {vm_id} has no network (enable_network is false); a route needs its guest_ip"
            )));
        }
        let mut route = Route {
            id: ids::new_id("rt"),
            vm_id: vm.id.clone(),
            owner_id: owner.id.clone(),
            subdomain: String::new(),
            target_port: port as i64,
            auto_wake: req.auto_wake.unwrap_or(true),
            created_at: store::now(),
        };
        match req.subdomain {
            Some(s) => {
                route.subdomain = s;
                self.store.insert_route(&route).await?;
            }
            // A random one: 10 characters are never a reserved name, and a clash is retried.
            None => {
                let mut tries = 0;
                loop {
                    route.subdomain = ids::random_string(10);
                    match self.store.insert_route(&route).await {
                        Err(store::StoreError::Conflict(_)) if tries < 5 => tries += 1,
                        other => break other?,
                    }
                }
            }
        }
        self.refresh_routes().await?;
        tracing::info!(vm = %vm.id, route = %route.id, subdomain = %route.subdomain, port, "route created");
        Ok(route)
    }

    pub async fn list_routes(&self, owner: &Owner, vm_id: &str) -> Result<Vec<Route>> {
        let vm = self.visible_vm(owner, vm_id).await?;
        Ok(self.store.vm_routes(&vm.id).await?)
    }

    pub async fn delete_route(&self, owner: &Owner, vm_id: &str, route_id: &str) -> Result<()> {
        let vm = self.visible_vm(owner, vm_id).await?;
        if !self.store.delete_route(&vm.id, route_id).await? {
            return Err(not_found("route", route_id));
        }
        self.refresh_routes().await?;
        tracing::info!(vm = %vm.id, route = route_id, "route deleted");
        Ok(())
    }

    /// `DELETE /routes/{route_id}` (the Hatch product's path): the owner's
    /// route, whichever VM it is on.
    pub async fn delete_route_by_id(&self, owner: &Owner, route_id: &str) -> Result<()> {
        match self.store.route_vm(&owner.id, route_id).await? {
            Some(vm_id) => self.delete_route(owner, &vm_id, route_id).await,
            None => Err(not_found("route", route_id)),
        }
    }

    /// Removes a deleted VM's routes (Hatch API) and its activity record.
    pub(super) async fn delete_vm_routes(&self, vm_id: &str) -> Result<()> {
        self.store.delete_vm_routes(vm_id).await?;
        self.activity.forget(vm_id);
        self.refresh_routes().await
    }

    /// `PATCH /vms/{id}`: idle sleep settings and the snapshot compression default.
    pub async fn update_vm(&self, owner: &Owner, id: &str, req: UpdateVm) -> Result<Vm> {
        req.validate().map_err(ManagerError::BadRequest)?;
        let (_guard, mut vm) = self.lock_visible_vm(owner, id).await?;
        if let Some(a) = req.auto_sleep {
            vm.auto_sleep = a;
        }
        if let Some(t) = req.idle_timeout_seconds {
            vm.idle_timeout_seconds = t;
        }
        if let Some(c) = req.snapshot_compression {
            vm.snapshot_compression = c.map(|c| crate::domain::Json(c.normalized()));
        }
        vm.updated_at = self.store.set_vm_settings(&vm).await?;
        tracing::info!(vm = id, auto_sleep = vm.auto_sleep, idle_timeout_seconds = ?vm.idle_timeout_seconds, "settings changed");
        Ok(vm)
    }

    // ------------------------------------------------------------ the proxy's side

    /// The route for `subdomain`, if any.
    pub fn route_for(&self, subdomain: &str) -> Option<RouteTarget> {
        self.routes.read().unwrap().get(subdomain).cloned()
    }

    /// Counts a request for `vm_id` if its guest is running now; None when it
    /// is not (snapshotted, stopped, or being snapshotted).
    pub fn enter_vm(&self, vm_id: &str) -> Option<Busy> {
        self.enter_vm_boot(vm_id).map(|(busy, _)| busy)
    }

    /// As `enter_vm`, with the id of the VMM run the request reaches (new
    /// at every boot, restore and wake): a connection to the guest made in
    /// one run is no use in the next, whose guest knows nothing of it.
    pub fn enter_vm_boot(&self, vm_id: &str) -> Option<(Busy, u64)> {
        let boot = self.running.lock().unwrap().get(vm_id)?.boot_id;
        Some((self.activity.enter(vm_id)?, boot))
    }

    /// Wakes `vm_id` for a request: a snapshotted (sleeping) VM is restored.
    /// A stopped one stays stopped: a request from anyone must not undo its
    /// owner's stop. Concurrent callers share one wake, which runs to its end
    /// in its own task even if every caller gives up waiting.
    pub async fn wake(self: &Arc<Self>, vm_id: &str) -> std::result::Result<Woke, WakeError> {
        let mut rx = {
            let mut wakes = self.wakes.lock().unwrap();
            match wakes.get(vm_id) {
                Some(rx) => rx.clone(),
                None => {
                    let (tx, rx) = watch::channel::<WakeResult>(None);
                    wakes.insert(vm_id.to_string(), rx.clone());
                    let mgr = Arc::clone(self);
                    let id = vm_id.to_string();
                    tokio::spawn(async move {
                        let result = mgr.wake_now(&id).await;
                        mgr.wakes.lock().unwrap().remove(&id);
                        let _ = tx.send(Some(result));
                    });
                    rx
                }
            }
        };
        let abandoned = || {
            WakeError::Failed(Arc::new(ManagerError::Internal(
                "the wake was abandoned".into(),
            )))
        };
        let done = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| abandoned())?;
        done.clone().unwrap_or(Err(abandoned()))
    }

    /// A snapshot idle sleep took is deleted once the VM resumed from it, in
    /// the background: the waiting requests need not wait for the store.
    pub(super) fn drop_sleep_snapshot(self: &Arc<Self>, snap: crate::store::Snapshot) {
        if !super::idle::is_sleep_snapshot(&snap) {
            return;
        }
        let mgr = Arc::clone(self);
        tokio::spawn(async move {
            match mgr.remove_snapshot(&snap).await {
                Ok(()) => {
                    tracing::info!(vm = %snap.vm_id, snapshot = %snap.id, "sleep snapshot deleted after the wake")
                }
                Err(e) => {
                    tracing::warn!(vm = %snap.vm_id, snapshot = %snap.id, "deleting the sleep snapshot: {e}")
                }
            }
        });
    }

    async fn wake_now(self: &Arc<Self>, vm_id: &str) -> std::result::Result<Woke, WakeError> {
        let started = std::time::Instant::now();
        let failed = |e: ManagerError| WakeError::Failed(Arc::new(e));
        let _guard = self.lock_vm(vm_id).await;
        let mut vm = self
            .store
            .get_vm(vm_id)
            .await
            .map_err(|e| failed(e.into()))?
            .ok_or_else(|| WakeError::NotAsleep(format!("vm {vm_id} no longer exists")))?;
        let st = vm.state;
        let (how, woke) = match st {
            VmState::Running => return Ok(Woke::AlreadyRunning),
            VmState::Snapshotted => {
                let snap = self
                    .standby_snapshot(&vm)
                    .await
                    .map_err(failed)?
                    .ok_or_else(|| {
                        failed(ManagerError::Internal(format!(
                            "vm {vm_id} has no snapshot to wake from"
                        )))
                    })?;
                let resumed = self.resume_from(&mut vm, &snap).await;
                if resumed.is_ok() {
                    self.drop_sleep_snapshot(snap);
                }
                (Woke::Restored, resumed)
            }
            VmState::Stopped => {
                return Err(WakeError::NotAsleep(format!(
                    "vm {vm_id} is stopped; its owner starts it with POST /vms/{vm_id}/start"
                )))
            }
            other => {
                return Err(WakeError::NotAsleep(format!(
                    "vm {vm_id} is {other}, not asleep; a request does not wake it"
                )))
            }
        };
        self.telemetry.woke(started.elapsed(), woke.is_ok());
        woke.map_err(failed)?;
        let at = self
            .store
            .mark_vm_sleep_or_wake(vm_id, false)
            .await
            .map_err(|e| failed(e.into()))?;
        tracing::info!(
            vm = vm_id,
            was = %st,
            ms = started.elapsed().as_millis() as u64,
            %at,
            "vm woke on request"
        );
        Ok(how)
    }
}
