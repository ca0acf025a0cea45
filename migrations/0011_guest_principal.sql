-- The SSH principal a VM's guest trusts when it is not the VM's own id: a
-- fork resumed from another VM's memory still names that VM in
-- /etc/ssh/hatch/principals/agent until the daemon rewrites it (issue 14).
-- NULL: the guest trusts the VM's own id.
ALTER TABLE vms ADD COLUMN guest_principal TEXT;
