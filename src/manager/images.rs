//! Images: registered by upload or from a path inside the operator's import
//! directories, listed without host paths, and deleted only when nothing uses
//! them, exclusive with the VM and template creations that read them.

use super::quotas::SnapshotQuota;
use super::requests::{check_image_meta, CreateImage};
use super::{not_found, Manager, ManagerError, Result, DEFAULT_IMAGE_ID};
use crate::ids;
use crate::image::hostpath::{self, ImportPolicy, PathRefused};
use crate::image::staging::{Part, Sealed, StageError, Staging};
use crate::image::{self, ImageSource};
use crate::store::{self, Image, Owner};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::{OwnedRwLockReadGuard, RwLock};

impl From<StageError> for ManagerError {
    fn from(e: StageError) -> Self {
        match e {
            StageError::Invalid(m) => ManagerError::BadRequest(m),
            StageError::TooLarge(m) => ManagerError::TooLarge(m),
            StageError::Io(m) => ManagerError::Internal(format!("storing image files: {m}")),
        }
    }
}

/// An upload in progress: its files stream into the image's staging directory.
/// Dropped before [`Manager::finish_image_upload`], it leaves nothing behind.
pub struct ImageUpload {
    id: String,
    staging: Staging,
}

impl ImageUpload {
    /// Starts the file of a multipart field (`kernel`, `kernel_elf`, `rootfs`, `initrd`).
    pub async fn begin(&mut self, field: &str) -> Result<()> {
        let part = Part::from_field(field).ok_or_else(|| {
            ManagerError::BadRequest(format!(
                "unknown form field {field:?}: expected kernel, kernel_elf, rootfs, initrd, name or boot_args"
            ))
        })?;
        Ok(self.staging.begin(part).await?)
    }

    pub async fn write(&mut self, chunk: &[u8]) -> Result<()> {
        Ok(self.staging.write(chunk).await?)
    }
}

fn path_error(field: &str, e: PathRefused) -> ManagerError {
    match e {
        PathRefused::Disabled => ManagerError::Forbidden(
            "path imports are not enabled on this server (HATCH_IMAGE_IMPORT_DIRS is empty): \
             upload the files as multipart/form-data instead"
                .into(),
        ),
        PathRefused::NotAbsolute => {
            ManagerError::BadRequest(format!("{field} must be an absolute path"))
        }
        // The same words whatever the reason: they must not tell what exists on the host.
        PathRefused::NotImportable => ManagerError::BadRequest(format!(
            "{field} cannot be imported: it must name a readable regular file inside \
             HATCH_IMAGE_IMPORT_DIRS (never under /proc, /sys, /dev or the data dir), \
             with no symbolic link in the path"
        )),
    }
}

impl Manager {
    pub(super) async fn visible_image(&self, owner: &Owner, id: &str) -> Result<Image> {
        match self.store.get_image(id).await? {
            Some(img) if img.owner_id.is_none() || img.owner_id.as_deref() == Some(&owner.id) => {
                Ok(img)
            }
            _ => Err(not_found("image", id)),
        }
    }

    fn image_lock(&self, id: &str) -> Arc<RwLock<()>> {
        let mut locks = self.image_locks.lock().unwrap();
        Arc::clone(locks.entry(id.to_string()).or_default())
    }

    /// The image `id`, held against deletion until the guard is dropped. The
    /// image is read again under the lock: a delete that won the race is seen.
    pub(super) async fn hold_image(
        &self,
        owner: &Owner,
        id: &str,
    ) -> Result<(Image, OwnedRwLockReadGuard<()>)> {
        // Checked first, so no lock entry is ever made for an id the caller cannot see.
        self.visible_image(owner, id).await?;
        let lock = self.image_lock(id);
        let guard = Arc::clone(&lock).read_owned().await;
        match self.visible_image(owner, id).await {
            Ok(img) => Ok((img, guard)),
            Err(e) => {
                // Deleted meanwhile: drop the entry this call made, unless others wait on it.
                drop(guard);
                let mut locks = self.image_locks.lock().unwrap();
                if Arc::strong_count(&lock) == 2 {
                    locks.remove(id);
                }
                Err(e)
            }
        }
    }

    pub async fn get_image(&self, owner: &Owner, id: &str) -> Result<Image> {
        self.visible_image(owner, id).await
    }

    pub async fn list_images(&self, owner: &Owner) -> Result<Vec<Image>> {
        Ok(self.store.list_images(&owner.id).await?)
    }

    /// One page of the images this owner sees, newest first.
    pub async fn list_images_page(
        &self,
        owner: &Owner,
        page: &store::Page,
    ) -> Result<Vec<store::Listed<Image>>> {
        Ok(self.store.list_images_page(&owner.id, page).await?)
    }

    /// Bytes this owner's images take in the data dir (for quotas).
    pub async fn image_bytes_of_owner(&self, owner: &Owner) -> Result<i64> {
        Ok(self.store.image_bytes_of_owner(&owner.id).await?)
    }

    /// HATCH_IMAGE_MAX_BYTES: the most one image's files may add up to.
    pub fn image_max_bytes(&self) -> u64 {
        self.config.images.max_bytes
    }

    fn import_policy(&self) -> ImportPolicy {
        let data_dir = &self.config.data_dir;
        let mut refused: Vec<PathBuf> = ["/proc", "/sys", "/dev"].map(PathBuf::from).into();
        refused.push(data_dir.clone());
        // The data dir's real location too, when it is configured through a symlink.
        refused.extend(std::fs::canonicalize(data_dir).ok());
        ImportPolicy {
            allowed: self.config.images.import_dirs.clone(),
            refused,
        }
    }

    /// `POST /images` with a JSON body: files named by path, copied in from
    /// inside HATCH_IMAGE_IMPORT_DIRS.
    pub async fn create_image(&self, owner: &Owner, req: CreateImage) -> Result<Image> {
        req.validate().map_err(ManagerError::BadRequest)?;
        let mut named = vec![
            (
                Part::Kernel,
                "kernel_path",
                req.kernel_path.clone().unwrap_or_default(),
            ),
            (
                Part::Rootfs,
                "rootfs_path",
                req.rootfs_path.clone().unwrap_or_default(),
            ),
        ];
        if let Some(p) = &req.initrd_path {
            named.push((Part::Initrd, "initrd_path", p.clone()));
        }
        if let Some(p) = &req.kernel_elf_path {
            named.push((Part::KernelElf, "kernel_elf_path", p.clone()));
        }
        self.admit_stored(&owner.id, SnapshotQuota::Enforced, 1)
            .await?;
        let policy = self.import_policy();
        let opened = tokio::task::spawn_blocking(move || {
            named
                .into_iter()
                .map(|(part, field, path)| {
                    hostpath::open_for_import(std::path::Path::new(&path), &policy)
                        .map(|f| (part, f))
                        .map_err(|e| path_error(field, e))
                })
                .collect::<Result<Vec<_>>>()
        })
        .await
        .map_err(|e| ManagerError::Internal(e.to_string()))??;
        let id = ids::new_id("img");
        let mut staging =
            Staging::new(self.config.images_dir().join(&id), self.image_max_bytes()).await?;
        for (part, file) in opened {
            staging.copy_from(part, file).await?;
        }
        let sealed = staging.seal().await?;
        let img = Image {
            kernel_path: req.kernel_path.unwrap_or_default(),
            initrd_path: req.initrd_path,
            rootfs_path: req.rootfs_path.unwrap_or_default(),
            ..self.new_image(owner, id, "import", &sealed, req.name, req.boot_args)
        };
        self.register(img).await
    }

    /// Starts a `multipart/form-data` upload for `owner`.
    pub async fn begin_image_upload(&self, owner: &Owner) -> Result<ImageUpload> {
        // An owner already at its stored-bytes limit is refused before any byte is stored.
        self.admit_stored(&owner.id, SnapshotQuota::Enforced, 1)
            .await?;
        let id = ids::new_id("img");
        let staging =
            Staging::new(self.config.images_dir().join(&id), self.image_max_bytes()).await?;
        Ok(ImageUpload { id, staging })
    }

    /// Checks and registers an upload whose files have all arrived.
    pub async fn finish_image_upload(
        &self,
        owner: &Owner,
        upload: ImageUpload,
        name: Option<String>,
        boot_args: Option<String>,
    ) -> Result<Image> {
        check_image_meta(name.as_deref(), boot_args.as_deref())
            .map_err(ManagerError::BadRequest)?;
        let ImageUpload { id, staging } = upload;
        let sealed = staging.seal().await?;
        let img = self.new_image(owner, id, "upload", &sealed, name, boot_args);
        self.register(img).await
    }

    fn new_image(
        &self,
        owner: &Owner,
        id: String,
        source: &str,
        sealed: &Sealed,
        name: Option<String>,
        boot_args: Option<String>,
    ) -> Image {
        let now = store::now();
        Image {
            id,
            owner_id: Some(owner.id.clone()),
            name,
            kernel_path: String::new(),
            initrd_path: None,
            rootfs_path: String::new(),
            boot_args,
            dir: sealed.dir.display().to_string(),
            fingerprint: sealed
                .dir
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            created_at: now.clone(),
            updated_at: now,
            source: source.into(),
            size_bytes: sealed.size_bytes as i64,
            has_initrd: sealed.has_initrd,
        }
    }

    /// Inserts the row of an image whose files are in place; without the row,
    /// no files. The image's bytes count in its owner's stored-bytes quota,
    /// checked under the admission lock with the insert.
    async fn register(&self, img: Image) -> Result<Image> {
        let inserted = async {
            let _admission = self.alloc_lock.lock().await;
            if let Some(owner) = &img.owner_id {
                self.admit_stored(owner, SnapshotQuota::Enforced, img.size_bytes.max(0) as u64)
                    .await?;
            }
            self.store
                .insert_image(&img)
                .await
                .map_err(ManagerError::from)
        }
        .await;
        if let Err(e) = inserted {
            let _ = tokio::fs::remove_dir_all(self.config.images_dir().join(&img.id)).await;
            return Err(e);
        }
        tracing::info!(image = %img.id, source = %img.source, size = img.size_bytes, "image registered");
        Ok(img)
    }

    /// Deletes an image nothing uses. Holds the image's lock exclusively, so no
    /// VM or template creation is between its image check and its insert.
    pub async fn delete_image(&self, owner: &Owner, id: &str) -> Result<()> {
        self.visible_image(owner, id).await?;
        if id == DEFAULT_IMAGE_ID {
            return Err(ManagerError::Conflict(format!(
                "{id} is the system default image and cannot be deleted through the API"
            )));
        }
        let lock = self.image_lock(id);
        let guard = lock.write().await;
        let img = self.visible_image(owner, id).await?;
        if img.owner_id.is_none() {
            return Err(ManagerError::Conflict(format!(
                "{id} is a system image and cannot be deleted through the API"
            )));
        }
        let (vms, templates) = self.store.image_users(id).await?;
        if vms > 0 || templates > 0 {
            return Err(ManagerError::Conflict(format!(
                "image {id} is in use by {vms} VM(s) and {templates} template(s); delete those first"
            )));
        }
        self.store.delete_image(id).await?;
        drop(guard);
        self.image_locks.lock().unwrap().remove(id);
        let _ = tokio::fs::remove_dir_all(self.config.images_dir().join(id)).await;
        tracing::info!(image = id, "image deleted");
        Ok(())
    }
}

impl Manager {
    /// Seeds (or refreshes) `img_default` from HATCH_DEFAULT_* and removes
    /// imported image versions nothing uses any more.
    pub async fn seed_default_image(&self) -> Result<()> {
        let (Some(kernel), Some(rootfs)) =
            (&self.config.default_kernel, &self.config.default_rootfs)
        else {
            if self.store.get_image(DEFAULT_IMAGE_ID).await?.is_none() {
                tracing::warn!(
                    "no default image: set HATCH_DEFAULT_KERNEL_PATH and HATCH_DEFAULT_ROOTFS_PATH"
                );
            }
            return Ok(());
        };
        let bad = |e: String| ManagerError::BadRequest(format!("default image: {e}"));
        let src = ImageSource {
            kernel: image::check_source_path(
                "HATCH_DEFAULT_KERNEL_PATH",
                &kernel.to_string_lossy(),
            )
            .map_err(bad)?,
            rootfs: image::check_source_path(
                "HATCH_DEFAULT_ROOTFS_PATH",
                &rootfs.to_string_lossy(),
            )
            .map_err(bad)?,
            initrd: match &self.config.default_initrd {
                Some(p) => Some(
                    image::check_source_path("HATCH_DEFAULT_INITRD_PATH", &p.to_string_lossy())
                        .map_err(bad)?,
                ),
                None => None,
            },
            kernel_elf: match &self.config.default_kernel_elf {
                Some(p) => Some(
                    image::check_source_path("HATCH_DEFAULT_KERNEL_ELF_PATH", &p.to_string_lossy())
                        .map_err(bad)?,
                ),
                None => None,
            },
        };
        let fp = src.fingerprint().map_err(|e| bad(e.to_string()))?;
        let existing = self.store.get_image(DEFAULT_IMAGE_ID).await?;
        if existing
            .as_ref()
            .is_some_and(|i| i.fingerprint == fp && Path::new(&i.dir).exists())
        {
            return self.collect_unused_image_versions().await;
        }
        let dir = self.config.images_dir().join(DEFAULT_IMAGE_ID).join(&fp);
        if !dir.exists() {
            tokio::fs::create_dir_all(dir.parent().unwrap())
                .await
                .map_err(|e| bad(e.to_string()))?;
            image::import(&src, &dir).await.map_err(bad)?;
        }
        let now = store::now();
        let img = Image {
            id: DEFAULT_IMAGE_ID.into(),
            owner_id: None,
            name: Some("default".into()),
            kernel_path: src.kernel.display().to_string(),
            initrd_path: src.initrd.as_ref().map(|p| p.display().to_string()),
            rootfs_path: src.rootfs.display().to_string(),
            boot_args: self.config.default_boot_args.clone(),
            dir: dir.display().to_string(),
            fingerprint: fp,
            source: "default".into(),
            size_bytes: image::stored_size(&dir) as i64,
            has_initrd: src.initrd.is_some(),
            created_at: existing
                .as_ref()
                .map(|i| i.created_at.clone())
                .unwrap_or_else(|| now.clone()),
            updated_at: now,
        };
        if existing.is_some() {
            self.store.update_image(&img).await?;
            tracing::info!(dir = %img.dir, "default image refreshed from changed source files");
        } else {
            self.store.insert_image(&img).await?;
            tracing::info!(dir = %img.dir, "default image seeded");
        }
        self.collect_unused_image_versions().await
    }

    pub(super) async fn collect_unused_image_versions(&self) -> Result<()> {
        // Sizes of images registered before they were recorded (migration 0006).
        for img in self.store.images_without_size().await? {
            let size = image::stored_size(Path::new(&img.dir)) as i64;
            if size > 0 {
                self.store.set_image_size(&img.id, size).await?;
            }
        }
        let in_use = self.store.image_dirs_in_use().await?;
        let Ok(mut images) = tokio::fs::read_dir(self.config.images_dir()).await else {
            return Ok(());
        };
        while let Ok(Some(img_dir)) = images.next_entry().await {
            let id = img_dir.file_name().to_string_lossy().to_string();
            let current = self.store.get_image(&id).await?.map(|i| i.dir);
            let Ok(mut versions) = tokio::fs::read_dir(img_dir.path()).await else {
                continue;
            };
            while let Ok(Some(v)) = versions.next_entry().await {
                let path = v.path().display().to_string();
                if current.as_deref() != Some(path.as_str()) && !in_use.contains(&path) {
                    tracing::info!(%path, "removing unused image version");
                    let _ = tokio::fs::remove_dir_all(v.path()).await;
                }
            }
            if current.is_none() {
                // An upload a crash cut short left only its directory: gone if empty.
                let _ = tokio::fs::remove_dir(img_dir.path()).await;
            }
        }
        Ok(())
    }
}
