//! Per-VM locks whose entries live only while someone holds or waits on them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

type Table = Arc<Mutex<HashMap<String, Arc<AsyncMutex<()>>>>>;

/// One async mutex per VM id. An entry is made by the first caller and
/// removed by the last one to let go (holder or waiter, cancelled or not),
/// so the table holds only ids in use right now, never one per id ever asked.
#[derive(Default)]
pub struct VmLocks {
    table: Table,
}

/// A claim on one entry; the entry goes when the last claim is dropped.
struct Claim {
    table: Table,
    id: String,
    lock: Arc<AsyncMutex<()>>,
}

impl Drop for Claim {
    fn drop(&mut self) {
        let mut table = self.table.lock().unwrap();
        // The table's own reference plus ours: nobody else holds or waits.
        if Arc::strong_count(&self.lock) == 2 {
            table.remove(&self.id);
        }
    }
}

/// The VM's lock, held until dropped.
pub struct VmGuard {
    // Field order matters: the guard is released before the claim checks
    // whether the entry is still needed.
    _guard: OwnedMutexGuard<()>,
    _claim: Claim,
}

impl VmLocks {
    pub async fn lock(&self, id: &str) -> VmGuard {
        let claim = {
            let mut table = self.table.lock().unwrap();
            Claim {
                table: Arc::clone(&self.table),
                id: id.to_string(),
                lock: Arc::clone(table.entry(id.to_string()).or_default()),
            }
        };
        // If this wait is cancelled, dropping `claim` still cleans up.
        let guard = Arc::clone(&claim.lock).lock_owned().await;
        VmGuard {
            _guard: guard,
            _claim: claim,
        }
    }

    /// Entries now (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn entries_live_only_while_held_or_awaited() {
        let locks = Arc::new(VmLocks::default());
        for i in 0..1000 {
            drop(locks.lock(&format!("vm_{i}")).await);
        }
        assert_eq!(locks.len(), 0);

        let held = locks.lock("vm_a").await;
        let waiter = {
            let locks = Arc::clone(&locks);
            tokio::spawn(async move {
                let _g = locks.lock("vm_a").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(locks.len(), 1);
        // A waiter that gives up leaves nothing behind either.
        let cancelled = tokio::time::timeout(Duration::from_millis(50), locks.lock("vm_a")).await;
        assert!(cancelled.is_err(), "vm_a is held");
        drop(held);
        waiter.await.unwrap();
        assert_eq!(locks.len(), 0);
    }

    #[tokio::test]
    async fn the_lock_excludes() {
        let locks = Arc::new(VmLocks::default());
        let g = locks.lock("vm_a").await;
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locks.lock("vm_a"))
                .await
                .is_err()
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(50), locks.lock("vm_b"))
                .await
                .is_ok(),
            "other VMs are not held up"
        );
        drop(g);
        let _again = locks.lock("vm_a").await;
    }
}
