//! Snapshot storage: files a VMM wrote become objects in a store and come
//! back, streamed in chunks (never a whole memory image in RAM) and
//! checksummed (SHA-256, verified on every read).
//!
//! The store is the `object_store` abstraction; the default is a directory
//! under the data dir. Keys follow seed 000: `snapshots/{vm_id}/{snap_id}/{vmstate|memory|disk}`.

use futures_util::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, WriteMultipart};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const CHUNK: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    #[error("object {0} is missing from the snapshot store")]
    Missing(String),
    #[error("object {key} is corrupt: checksum {actual} does not match the recorded {expected}")]
    Corrupt {
        key: String,
        expected: String,
        actual: String,
    },
    #[error("snapshot store: {0}")]
    Store(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub type Result<T> = std::result::Result<T, ObjectError>;

/// What a stored object is: its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub size: u64,
    pub sha256: String,
}

pub fn key(vm_id: &str, snap_id: &str, part: &str) -> String {
    format!("snapshots/{vm_id}/{snap_id}/{part}")
}

pub fn prefix_of_vm(vm_id: &str) -> String {
    format!("snapshots/{vm_id}/")
}

/// The record of a snapshot being captured: keys laid out as seed 000 says,
/// nothing stored yet, not usable until marked ready.
pub fn capturing_record(
    id: &str,
    vm_id: &str,
    owner_id: &str,
    kind: &str,
    hypervisor: &str,
    vm_config: String,
) -> crate::store::Snapshot {
    crate::store::Snapshot {
        id: id.to_string(),
        vm_id: vm_id.to_string(),
        owner_id: owner_id.to_string(),
        kind: kind.to_string(),
        name: None,
        tags: "{}".into(),
        status: "capturing".into(),
        source_hypervisor: hypervisor.to_string(),
        source_instance_name: None,
        vm_config,
        state_key: key(vm_id, id, "vmstate"),
        memory_key: key(vm_id, id, "memory"),
        disk_key: key(vm_id, id, "disk"),
        state_sha256: None,
        state_size: None,
        memory_sha256: None,
        memory_size: None,
        disk_sha256: None,
        disk_size: None,
        size_bytes: 0,
        compression: None,
        compression_state: "none".into(),
        compressed_size_bytes: None,
        compression_error: None,
        created_at: crate::store::now(),
    }
}

#[derive(Clone)]
pub struct Objects {
    store: Arc<dyn ObjectStore>,
}

fn store_err(e: object_store::Error) -> ObjectError {
    ObjectError::Store(e.to_string())
}

impl Objects {
    /// A store in a local directory (created if missing).
    pub fn local(dir: &Path) -> Result<Objects> {
        std::fs::create_dir_all(dir)?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir).map_err(store_err)?;
        Ok(Objects {
            store: Arc::new(fs),
        })
    }

    /// Streams `file` into `key`, hashing as it goes.
    pub async fn put_file(&self, key: &str, file: &Path) -> Result<Stored> {
        let mut f = tokio::fs::File::open(file).await?;
        let upload = self
            .store
            .put_multipart(&ObjPath::from(key))
            .await
            .map_err(store_err)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, CHUNK);
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = f.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            hash.update(&buf[..n]);
            size += n as u64;
            // Bounded in-flight parts: memory use stays a few chunks whatever the file size.
            writer.wait_for_capacity(4).await.map_err(store_err)?;
            writer.write(&buf[..n]);
        }
        writer.finish().await.map_err(store_err)?;
        Ok(Stored {
            size,
            sha256: hex::encode(hash.finalize()),
        })
    }

    /// Streams `key` into `dest` and checks it against `expected`. `dest`
    /// appears only once the whole object arrived intact.
    pub async fn get_file(&self, key: &str, dest: &Path, expected: &Stored) -> Result<()> {
        let got = match self.store.get(&ObjPath::from(key)).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => {
                return Err(ObjectError::Missing(key.to_string()))
            }
            Err(e) => return Err(store_err(e)),
        };
        let tmp = dest.with_extension("partial");
        let mut out = tokio::fs::File::create(&tmp).await?;
        let mut hash = Sha256::new();
        let mut size = 0u64;
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(store_err)?;
            hash.update(&chunk);
            size += chunk.len() as u64;
            out.write_all(&chunk).await?;
        }
        out.flush().await?;
        drop(out);
        let actual = hex::encode(hash.finalize());
        if actual != expected.sha256 || size != expected.size {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(ObjectError::Corrupt {
                key: key.to_string(),
                expected: format!("{} ({} bytes)", expected.sha256, expected.size),
                actual: format!("{actual} ({size} bytes)"),
            });
        }
        tokio::fs::rename(&tmp, dest).await?;
        Ok(())
    }

    pub async fn delete(&self, key: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(store_err(e)),
        }
    }

    /// Keys under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<String>> {
        let p = ObjPath::from(prefix.trim_end_matches('/'));
        let mut out = vec![];
        let mut items = self.store.list(Some(&p));
        while let Some(meta) = items.next().await {
            out.push(meta.map_err(store_err)?.location.to_string());
        }
        Ok(out)
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<usize> {
        let keys = self.list(prefix).await?;
        for k in &keys {
            self.delete(k).await?;
        }
        Ok(keys.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn round_trip_verifies_and_detects_corruption() {
        let dir = std::env::temp_dir().join(format!("hatch-objects-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let objects = Objects::local(&dir.join("store")).unwrap();
        let src = dir.join("src.bin");
        // Larger than one chunk, not a multiple of it.
        let data: Vec<u8> = (0..(CHUNK * 2 + 12345)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&src, &data).unwrap();
        let k = key("vm_a", "snap_b", "memory");
        let stored = objects.put_file(&k, &src).await.unwrap();
        assert_eq!(stored.size, data.len() as u64);
        assert_eq!(stored.sha256, hex::encode(Sha256::digest(&data)));
        assert_eq!(
            objects.list("snapshots/vm_a/").await.unwrap(),
            vec![k.clone()]
        );

        let back = dir.join("back.bin");
        objects.get_file(&k, &back, &stored).await.unwrap();
        assert_eq!(std::fs::read(&back).unwrap(), data);

        // Flip one byte in the stored object: the read fails and writes nothing.
        let on_disk = dir.join("store").join(&k);
        let mut bytes = std::fs::read(&on_disk).unwrap();
        bytes[1000] ^= 1;
        std::fs::write(&on_disk, bytes).unwrap();
        let again = dir.join("again.bin");
        let e = objects.get_file(&k, &again, &stored).await.unwrap_err();
        assert!(matches!(e, ObjectError::Corrupt { .. }), "{e}");
        assert!(!again.exists() && !again.with_extension("partial").exists());

        assert_eq!(objects.delete_prefix("snapshots/vm_a/").await.unwrap(), 1);
        let e = objects.get_file(&k, &again, &stored).await.unwrap_err();
        assert!(matches!(e, ObjectError::Missing(_)), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
