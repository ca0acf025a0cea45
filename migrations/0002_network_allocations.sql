-- Network allocations are host-wide: no two VMs may ever hold the same
-- address, MAC, TAP or SSH port, whatever the daemon's memory says.
CREATE UNIQUE INDEX vms_guest_ip ON vms (guest_ip) WHERE guest_ip IS NOT NULL;
CREATE UNIQUE INDEX vms_guest_mac ON vms (guest_mac) WHERE guest_mac IS NOT NULL;
CREATE UNIQUE INDEX vms_tap_name ON vms (tap_name) WHERE tap_name IS NOT NULL;
CREATE UNIQUE INDEX vms_ssh_port ON vms (ssh_port) WHERE ssh_port IS NOT NULL;
