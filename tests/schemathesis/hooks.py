"""schemathesis hooks for tests/openapi.rs: test data no schema can describe.

Some rules of the API depend on what the server holds, not on the request's
shape: a body's `image_id` and `template_id` must name an image or template
the caller has; a `cursor` must be one the list handed out; a restore or fork
may ask only for a target its snapshot's kind can give; a route needs a VM
with networking; `connect` signs only an OpenSSH public key; an uploaded
kernel and rootfs must be a kernel and a disk; `logs?follow=true` on a
running VM never ends (it streams until the VM stops); the files API needs a
path that exists (or whose directory does) in the guest, and a guest whose
sshd is up (until then it answers 502, as documented); `exec` runs what it
is given in a real guest (a fuzzed command line could run for its whole
timeout, and env names must be shell names), and needs that sshd up too.
The document says each of these answers (400 with a reason), but a JSON
Schema cannot say which values pass, so schemathesis' schema-valid data would
break them at random. Here, only in cases meant to be valid, such values are
replaced with ones that hold, read from the daemon when needed. Cases meant to
be invalid, and every other field, stay as generated.
"""

import os
import re
import time

import requests
import schemathesis

BASE = "http://127.0.0.1:8080"
KEY = os.environ["HATCH_TEST_API_KEY"]
HEADERS = {"Authorization": f"Bearer {KEY}"}


def read(path):
    with open(path, "rb") as f:
        return f.read()


# A real kernel (the test image's) and a small real ext4 disk (the test makes it).
KERNEL = read(os.environ["HATCH_TEST_KERNEL"])
ROOTFS = read(os.environ["HATCH_TEST_ROOTFS"])


# An ed25519 public key (its private half was thrown away), for `connect`.
PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGogApuADm2zDtwXHDn2pqdOmvWnS5QKGygVd204zNDY schemathesis"


def get(path):
    r = requests.get(BASE + path, headers=HEADERS, timeout=60)
    return r.json() if r.status_code == 200 else None


def template_id():
    """A template of the caller's (the fuzzer may have deleted the last one)."""
    listed = get("/templates") or []
    if listed:
        return listed[0]["id"]
    r = requests.post(BASE + "/templates", json={"name": "fuzz"}, headers=HEADERS, timeout=60)
    return r.json()["id"]


def cursor(path):
    """A cursor of the list at `path`, one past any row a test makes."""
    text = f"1|{path.strip('/')}|2099-01-01T00:00:00Z|1"
    return text.encode().hex()


def guest_answers(vm_id):
    """Waits (up to 3 minutes) until the files API of `vm_id` reaches its
    guest's sshd, or says why it cannot (no such VM, not running: a 4xx).
    A VM the fuzzer just booted runs before its sshd does."""
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        r = requests.get(f"{BASE}/vms/{vm_id}/files", params={"path": "/"}, headers=HEADERS, timeout=120)
        if r.status_code != 502:
            return
        time.sleep(1)


def positive(case):
    return case.meta is not None and case.meta.generation.mode.is_positive


@schemathesis.hook
def map_case(context, case):
    query = case.query
    if case.operation.path == "/vms/{vm_id}/logs" and isinstance(query, dict):
        # `follow=true` on a running VM streams until the VM stops, by design:
        # a request/answer fuzzer would wait on it for good (in any phase).
        if str(query.get("follow")).lower() in ("true", "1"):
            query["follow"] = "false"
    if not positive(case):
        return case
    method, path, body = case.method.upper(), case.operation.path, case.body
    if method == "GET" and isinstance(case.query, dict) and "cursor" in case.query:
        case.query["cursor"] = cursor(path)
    if method == "POST" and path in ("/vms", "/templates") and isinstance(body, dict):
        if isinstance(body.get("image_id"), str):
            body["image_id"] = "img_default"
        if isinstance(body.get("template_id"), str):
            body["template_id"] = template_id()
    if method == "POST" and path == "/images" and case.media_type == "multipart/form-data" and isinstance(body, dict):
        body["kernel"] = KERNEL
        body["rootfs"] = ROOTFS
        # A second, ELF kernel must match the first; the test has none to give.
        body.pop("kernel_elf", None)
        # boot_args is one line without control characters (the JSON form's
        # schema says so with a pattern; a form field's cannot).
        if isinstance(body.get("boot_args"), str):
            body["boot_args"] = re.sub(r"[\x00-\x1f\x7f-\x9f]", "", body["boot_args"])
    if path == "/vms/{vm_id}/files" and isinstance(case.query, dict):
        # Any absolute path fits the schema; these exist (or their directory
        # does) in every guest, and agent may read and write them.
        case.query["path"] = "/" if method == "GET" else "/tmp/schemathesis-upload"
        guest_answers(case.path_parameters.get("vm_id"))
    if method == "POST" and path == "/vms/{vm_id}/connect" and isinstance(body, dict):
        # Any string fits the schema; only an OpenSSH public key line is one.
        body["public_key"] = PUBLIC_KEY
    if method == "POST" and path == "/vms/{vm_id}/exec" and isinstance(body, dict):
        # A command that ends at once, in a directory that exists, with env
        # names a shell takes; timeout, stdin and the rest stay as generated.
        body["command"] = ["true"] if isinstance(body.get("command"), list) else "true"
        if isinstance(body.get("env"), dict):
            body["env"] = {
                k: v.replace("\0", "")
                for k, v in body["env"].items()
                if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,255}", k) and isinstance(v, str)
            }
        if isinstance(body.get("cwd"), str):
            body["cwd"] = "/"
        guest_answers(case.path_parameters.get("vm_id"))
    if method == "POST" and path.endswith(("/restore", "/fork")) and isinstance(body, dict):
        snapshot = get(f"/snapshots/{case.path_parameters.get('snapshot_id')}")
        if snapshot is not None and snapshot["kind"] == "Standby":
            # Its memory loads only where it was taken.
            body.pop("target_hypervisor", None)
        if snapshot is not None and snapshot["kind"] == "Stopped":
            # No memory to resume.
            if body.get("target_state") == "Standby":
                body.pop("target_state")
    return case


@schemathesis.hook
def filter_case(context, case):
    if positive(case) and case.method.upper() == "POST" and case.operation.path == "/vms/{vm_id}/routes":
        vm = get(f"/vms/{case.path_parameters.get('vm_id')}")
        # A VM made with enable_network false has no address to route to.
        return vm is None or vm.get("guest_ip") is not None
    return True
