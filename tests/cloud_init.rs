//! cloud-init for real: a stock Debian guest (systemd, cloud-init, OpenSSH,
//! built by `hatch image build --kind debian`) applies the user data hatch
//! hands it as a NoCloud seed: a user with an SSH key and sudo, write_files
//! and runcmd, and the static network config. Checked over SSH through the
//! VM's forwarded port with the OpenSSH client.

mod common;
use common::ssh::*;
use common::*;
use serde_json::json;
use std::time::Duration;

#[test]
fn a_debian_guest_applies_cloud_init_user_data() {
    let (d, image_id) = debian_daemon(&debian_image_dir());

    let (key, public) = keypair(&d.data_dir);
    let user_data = format!(
        "#cloud-config\n\
         users:\n  \
           - name: dev\n    \
             sudo: ALL=(ALL) NOPASSWD:ALL\n    \
             shell: /bin/bash\n    \
             ssh_authorized_keys:\n      \
               - {public}\n\
         write_files:\n  \
           - path: /etc/hatch-test/written.txt\n    \
             content: written-by-cloud-init\n\
         runcmd:\n  \
           - [sh, -c, 'echo ran-runcmd-$(hostname) > /var/tmp/runcmd.txt']\n"
    );
    // A template carries the user data, as users would keep it.
    let t = d.req(
        "POST",
        "/templates",
        Some(&json!({"name": "debian-dev", "image_id": image_id, "mem_mib": 1024, "user_data": user_data}).to_string()),
    );
    assert_eq!(t.status, 201, "{}", t.text);
    let vm = d.create_vm(&json!({"template_id": t.body["id"]}).to_string());
    let id = vm["id"].as_str().unwrap().to_string();
    let port = vm["ssh_port"].as_u64().unwrap() as u16;
    let hostname = id.replace('_', "-");

    // A Debian boot under TCG takes about two minutes; cloud-init's final
    // stage (runcmd) comes last, so wait for it from inside.
    let out = d.ssh_within(
        Duration::from_secs(900),
        None,
        &key,
        "dev@127.0.0.1",
        port,
        "cloud-init status --wait >/dev/null; cat /etc/hatch-test/written.txt /var/tmp/runcmd.txt; \
         sudo -n id -u; hostname; ip -4 -o addr show dev eth0",
    );
    assert!(out.contains("written-by-cloud-init"), "write_files: {out}");
    assert!(
        out.contains(&format!("ran-runcmd-{hostname}")),
        "runcmd: {out}"
    );
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "passwordless sudo: {out}"
    );
    assert!(
        out.lines().any(|l| l.trim() == hostname),
        "hostname from meta-data: {out}"
    );
    assert!(
        out.contains(&format!("inet {}/24", vm["guest_ip"].as_str().unwrap())),
        "static IP: {out}"
    );
    let log = d.logs(&id);
    assert!(
        log.contains("Cloud-init v.") && log.contains("finished"),
        "cloud-init ran: {log}"
    );

    assert_eq!(d.req("DELETE", &format!("/vms/{id}"), None).status, 200);
    assert!(d.vmm_pids().is_empty());
}
