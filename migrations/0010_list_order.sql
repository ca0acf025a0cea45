-- Paged lists (issue 15): every list runs newest first by (created_at,
-- rowid) within one owner, and a page starts below the cursor's pair. These
-- indexes hold that order (an index ends in the rowid), so a page is one
-- range scan of `limit` entries however many rows the owner has. `vms`
-- has one already (vms_by_owner, migration 0001).
CREATE INDEX templates_by_owner ON templates (owner_id, created_at);
CREATE INDEX images_by_owner ON images (owner_id, created_at);
CREATE INDEX snapshots_by_owner ON snapshots (owner_id, created_at);
