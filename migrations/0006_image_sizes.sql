-- What an image is for its users, without host paths (issue 10):
-- source: 'default' (the operator's HATCH_DEFAULT_* files), 'import' (a path
--   inside HATCH_IMAGE_IMPORT_DIRS) or 'upload' (streamed through the API).
-- size_bytes: the stored files' lengths added up, for per-owner quotas.
-- has_initrd: whether the image boots with an initramfs.
-- kernel_path/rootfs_path stay as the source paths of default and imported
-- images (the default image's change detection uses them); uploads have ''.
ALTER TABLE images ADD COLUMN source TEXT NOT NULL DEFAULT 'import';
ALTER TABLE images ADD COLUMN size_bytes INTEGER NOT NULL DEFAULT 0;
ALTER TABLE images ADD COLUMN has_initrd INTEGER NOT NULL DEFAULT 0;
UPDATE images SET source = 'default' WHERE owner_id IS NULL;
UPDATE images SET has_initrd = (initrd_path IS NOT NULL);
