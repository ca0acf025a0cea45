#!/usr/bin/env python3
"""bench/boot: how much hatch adds to a QEMU boot, and API latency with an empty and a filled store.

Run through `bench/boot` (it builds, makes the network namespace and the temp
dir, and passes them in HATCH_BENCH_*); this script runs inside that namespace
and talks to the daemon on 127.0.0.1 directly. Standard library only.

Measured, in one run, with the same image and accelerator:
  1. hatch: POST /vms {"enable_network": false} -> first console line / `hatch-guest: ready` line in
     $HATCH_DATA_DIR/vms/<id>/console.log (file polled every 2 ms), then DELETE.
  2. raw QEMU: the command line hatch used (from /proc/<pid>/cmdline) with only
     the per-VM paths moved to a temp dir, a fresh qcow2 overlay and a copy of
     the VM's cloud-init seed; process
     spawn -> first console line / ready line, then SIGKILL.
  3. API, the same requests with an empty store and then with --api-vms stopped VMs:
     GET /health and GET /vms alternating on one connection, then POST /vms
     {"enable_network": false} (each VM deleted after). The store is filled
     through the API only: POST /vms and POST /vms/{id}/stop for each VM, as a
     user would (the owner's limits raised with `hatch owners limits`).
  4. hatch boots with VMM confinement on against off (HATCH_VMM_CONFINE), one
     fresh daemon per block of boots, blocks alternating.
"""

import argparse
import datetime
import json
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    DOCS, READY, BenchError, CpuBusy, Daemon, Http, arg_after, cpu_model, kill_leftovers, log,
    ms, one_request, other_qemus, qemu_version, run_guarded, stats, write_docs,
)

POLL_S = 0.002
# Boots are compared without a NIC: a raw QEMU would need hatch's TAP and DHCP
# reservation, which go away with the VM. The cloud-init seed disk is kept.
BOOT_BODY = {"enable_network": False}
BOOT_TIMEOUT_S = 120.0
# The API part times POST /vms with the same body at both store sizes, and fills the store with
# VMs made the same way (no NIC: no address, TAP or SSH port to run out of).
POST_BODY = BOOT_BODY
FILL_BODY = BOOT_BODY
FILL_BATCH = 8
# Every stopped VM in the store costs a boot and a stop (seconds per batch under TCG), so the default
# is a count a run reaches in minutes; --api-vms 1000 works too, only slowly.
API_VMS = 200


class Console:
    """Follows a console.log that may not exist yet; records when things first show up."""

    def __init__(self, path):
        self.path = path
        self.f = None
        self.buf = bytearray()
        self.created = self.first_byte = self.first_line = self.ready = None
        self.first_line_text = None

    def poll(self, t):
        if self.f is None:
            try:
                self.f = open(self.path, "rb", buffering=0)
            except FileNotFoundError:
                return
            self.created = t
        chunk = self.f.readall()
        if not chunk:
            return
        start = len(self.buf)
        self.buf += chunk
        if self.first_byte is None:
            self.first_byte = t
        if self.first_line is None and b"\n" in chunk:
            self.first_line = t
            self.first_line_text = bytes(self.buf.split(b"\n", 1)[0]).decode(errors="replace").strip()
        if self.ready is None and self.buf.find(READY, max(0, start - len(READY))) >= 0:
            self.ready = t

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None

    def tail(self, n=1500):
        return bytes(self.buf[-n:]).decode(errors="replace")


class Bench:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.hatch = os.environ["HATCH_BENCH_BIN"]
        self.image = Path(os.environ["HATCH_BENCH_IMAGE"])
        self.hatchd = Daemon(self.tmp, self.hatch, self.image)
        self.data = self.hatchd.data
        self.vms_dir = self.hatchd.vms_dir
        self.live_vms = self.hatchd.live_vms  # hatch VMs created and not yet deleted (the same set)
        self.raw_procs = {}  # pid -> Popen
        self.cmdline = None  # the QEMU argv hatch used
        self.hatch_workdir = None  # the per-VM dir in that argv
        self.rewritten = []
        self.qemu_other_max = 0

    # ------------------------------------------------------------ daemon

    @property
    def key(self):
        return self.hatchd.key

    def daemon_tail(self, n=3000):
        return self.hatchd.tail(n)

    def start_daemon(self):
        self.hatchd.start("bench")

    def delete_vm(self, vm_id):
        self.hatchd.delete_vm(vm_id)

    # ------------------------------------------------------------ boots

    def wait_console(self, con, t0, deadline, alive, extra=None):
        """Polls `con` until the ready line; `alive()` raises if the VMM died; `extra(t)` may stop early."""
        while True:
            now = time.monotonic()
            t = now - t0
            con.poll(t)
            if extra is not None:
                extra(t)
            if con.ready is not None:
                return
            alive()
            if now > deadline:
                raise BenchError(f"no ready line within {BOOT_TIMEOUT_S:.0f}s; console tail:\n{con.tail()}")
            time.sleep(POLL_S)

    def hatch_boot(self):
        """POST /vms {} and follow the new VM's console to the ready line; returns marks in seconds."""
        before = set(os.listdir(self.vms_dir)) if self.vms_dir.exists() else set()
        result = {}
        started = threading.Event()

        def post():
            h = Http(self.key, timeout=BOOT_TIMEOUT_S)
            try:
                result["t0"] = time.monotonic()
                started.set()
                result["status"], result["body"] = h.request("POST", "/vms", BOOT_BODY)
            except Exception as e:  # reported by the polling thread
                result["error"] = e
            finally:
                result["t_resp"] = time.monotonic()
                started.set()
                h.close()

        th = threading.Thread(target=post, daemon=True)
        th.start()
        started.wait(10)
        t0 = result["t0"]
        marks = {}
        state = {"vm": None, "con": None}

        def find_vm(t):
            if state["vm"] is None:
                try:
                    new = set(os.listdir(self.vms_dir)) - before
                except FileNotFoundError:
                    new = set()
                if new:
                    state["vm"] = new.pop()
                    self.live_vms.add(state["vm"])
                    marks["workdir"] = t
                    state["con"] = Console(self.vms_dir / state["vm"] / "console.log")
            vm = state["vm"]
            if vm is not None:
                for name in ("disk.qcow2", "vmm.pid"):
                    if name not in marks and (self.vms_dir / vm / name).exists():
                        marks[name] = t
            if "t_resp" in result and "resp" not in marks:
                marks["resp"] = result["t_resp"] - t0
                if "error" in result:
                    raise BenchError(f"POST /vms failed: {result['error']!r}")
                if result["status"] != 201:
                    raise BenchError(f"POST /vms: {result['status']} {result['body'][:500]!r}\n{self.daemon_tail()}")
                vm_id = json.loads(result["body"])["id"]
                self.live_vms.add(vm_id)
                if state["vm"] not in (None, vm_id):
                    raise BenchError(f"new dir {state['vm']} is not the created VM {vm_id}")

        deadline = t0 + BOOT_TIMEOUT_S
        # Until the work dir exists there is no console to follow.
        while state["con"] is None:
            find_vm(time.monotonic() - t0)
            if state["con"] is None:
                if time.monotonic() > deadline:
                    raise BenchError("no VM work directory appeared")
                time.sleep(POLL_S)
        con = state["con"]

        def alive():
            if "resp" in marks:
                cmd = self.vmm_cmdline(state["vm"])
                if cmd is None and con.ready is None:
                    raise BenchError(f"hatch's QEMU is gone before ready; console tail:\n{con.tail()}")

        alive_every = {"n": 0}

        def alive_sometimes():
            alive_every["n"] += 1
            if alive_every["n"] % 250 == 0:  # every ~0.5 s
                alive()

        try:
            self.wait_console(con, t0, deadline, alive_sometimes, extra=find_vm)
            # The ready line can only come after the 201, but wait for it to be sure.
            while "resp" not in marks:
                find_vm(time.monotonic() - t0)
                if time.monotonic() > deadline:
                    raise BenchError("POST /vms did not return")
                time.sleep(POLL_S)
            th.join(5)
            vm_id = state["vm"]
            cmd = self.vmm_cmdline(vm_id)
        finally:
            con.close()
        marks.update(console=con.created, first_byte=con.first_byte, first_line=con.first_line, ready=con.ready)
        return vm_id, cmd, con.first_line_text, marks

    def vmm_cmdline(self, vm_id):
        return self.hatchd.vmm_cmdline(vm_id)

    def capture_cmdline(self, vm_id, cmd):
        if not cmd:
            raise BenchError(f"cannot read the QEMU command line of {vm_id}")
        self.cmdline = cmd
        self.hatch_workdir = str(self.vms_dir / vm_id)
        # The VM is deleted after the warm-up; keep its cloud-init seed for the raw runs.
        shutil.copyfile(self.vms_dir / vm_id / "seed.iso", self.tmp / "seed.iso")
        self.rewritten = [a for a in cmd if self.hatch_workdir in a]

    def raw_args(self, run_dir):
        args = [a.replace(self.hatch_workdir, str(run_dir)) for a in self.cmdline]
        # hatch passes QEMU a listening QMP socket as fd 4; by hand, QEMU binds it itself.
        args = [a.replace("socket,id=qmp,fd=4,", f"socket,id=qmp,path={run_dir}/vmm.sock,") for a in args]
        leftover = [a for a in args if str(self.vms_dir) in a]
        if leftover:
            raise BenchError(f"per-VM paths left in the raw command line: {leftover}")
        return args

    def image_rootfs(self):
        db = sqlite3.connect(self.data / "hatch.db", timeout=30)
        try:
            (d,) = db.execute("SELECT dir FROM images WHERE id = 'img_default'").fetchone()
        finally:
            db.close()
        return Path(d) / "rootfs.ext4"

    def raw_boot(self, i, rootfs):
        run_dir = self.tmp / "raw" / f"run-{i:03d}"
        run_dir.mkdir(parents=True)
        disk = run_dir / "disk.qcow2"
        t = time.monotonic()
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(rootfs), str(disk)],
            check=True, timeout=60,
        )
        overlay_s = time.monotonic() - t
        shutil.copyfile(self.tmp / "seed.iso", run_dir / "seed.iso")
        args = self.raw_args(run_dir)
        con = Console(run_dir / "console.log")
        logf = open(run_dir / "vmm.log", "wb")
        t0 = time.monotonic()
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, process_group=0)
        self.raw_procs[p.pid] = p
        logf.close()

        def alive():
            if p.poll() is not None:
                raise BenchError(
                    f"raw QEMU exited ({p.returncode}): {(run_dir / 'vmm.log').read_text(errors='replace')[-800:]}"
                )

        try:
            self.wait_console(con, t0, t0 + BOOT_TIMEOUT_S, alive)
        finally:
            con.close()
            self.kill_raw(p)
            shutil.rmtree(run_dir, ignore_errors=True)
        marks = dict(console=con.created, first_byte=con.first_byte, first_line=con.first_line,
                     ready=con.ready, overlay=overlay_s)
        return con.first_line_text, marks

    def kill_raw(self, p):
        if p.poll() is None:
            p.kill()
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            log(f"raw QEMU {p.pid} did not exit after SIGKILL")
            return
        self.raw_procs.pop(p.pid, None)

    def boots(self):
        runs = self.args.runs
        log("warm-up hatch boot (not counted; its QEMU command line is the raw one)")
        vm_id, cmd, first_text, warm = self.hatch_boot()
        self.capture_cmdline(vm_id, cmd)
        self.delete_vm(vm_id)
        log(f"  warm-up: first line {warm['first_line']:.3f}s, ready {warm['ready']:.3f}s")
        log(f"  QEMU: {' '.join(self.cmdline)}")
        log(f"  per-VM args rewritten for raw runs: {self.rewritten}")
        rootfs = self.image_rootfs()
        hatch, raw, texts = [], [], set()
        busy = CpuBusy().start()
        # Interleaved, and alternating which goes first, so drift in host load hits both alike.
        for i in range(runs):
            self.qemu_other_max = max(self.qemu_other_max, other_qemus(self.tmp))
            order = ("hatch", "raw") if i % 2 == 0 else ("raw", "hatch")
            for which in order:
                if which == "hatch":
                    vm_id, _, text, m = self.hatch_boot()
                    t = time.monotonic()
                    self.delete_vm(vm_id)
                    m["delete"] = time.monotonic() - t
                    hatch.append(m)
                else:
                    text, m = self.raw_boot(i, rootfs)
                    raw.append(m)
                texts.add(text)
                log(f"  run {i + 1}/{runs} {which:5}: console {m['console'] * 1000:6.0f} ms, "
                    f"first line {m['first_line']:.3f}s, ready {m['ready']:.3f}s"
                    + (f", 201 after {m['resp'] * 1000:.0f} ms" if which == "hatch" else ""))
        busy.stop()
        return {"warm": warm, "hatch": hatch, "raw": raw, "first_line_texts": sorted(texts), "busy": busy.cores}

    # ------------------------------------------------------------ API latency

    def interleaved_gets(self, n):
        """n x GET /health and n x GET /vms, alternating, on one keep-alive connection."""
        h = Http(self.key)
        health, vms, size, count, hsize = [], [], None, None, None
        try:
            for _ in range(n):
                for path, out in (("/health", health), ("/vms", vms)):
                    t = time.monotonic()
                    status, raw = h.request("GET", path)
                    out.append(time.monotonic() - t)
                    if status != 200:
                        raise BenchError(f"GET {path}: {status} {raw[:300]!r}")
                    if path == "/health":
                        hsize = len(raw)
                    else:
                        size = len(raw)
                        count = count if count is not None else len(json.loads(raw))
        finally:
            h.close()
        return health, vms, size, count, hsize

    def fill_vms(self, n):
        """n VMs made as a user makes them: `POST /vms` and then `POST /vms/{id}/stop`, FILL_BATCH at a
        time (the batch's stops in parallel: each waits for its guest to power off, at most the
        daemon's HATCH_STOP_TIMEOUT, then hatch kills its QEMU). Stopped VMs stay in the store."""
        t0 = time.monotonic()
        made = 0
        while made < n:
            batch = []
            for _ in range(min(FILL_BATCH, n - made)):
                status, raw = one_request(self.key, "POST", "/vms", FILL_BODY)
                if status != 201:
                    raise BenchError(f"POST /vms (filling the store, {made + len(batch)} made): {status} "
                                     f"{raw[:300]!r}\n{self.daemon_tail()}")
                vm_id = json.loads(raw)["id"]
                self.live_vms.add(vm_id)
                batch.append(vm_id)
            errors = []

            def stop(vm_id):
                try:
                    status, raw = one_request(self.key, "POST", f"/vms/{vm_id}/stop", timeout=120)
                    state = json.loads(raw).get("state") if status == 200 else None
                    if state != "stopped":
                        errors.append(f"POST /vms/{vm_id}/stop: {status} {raw[:300]!r}")
                except Exception as e:  # reported below, after every thread is done
                    errors.append(f"POST /vms/{vm_id}/stop: {e!r}")

            threads = [threading.Thread(target=stop, args=(vm_id,)) for vm_id in batch]
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            if errors:
                raise BenchError("; ".join(errors) + f"\n{self.daemon_tail()}")
            # Nothing of theirs runs any more; the cleanup need not delete them one by one.
            self.live_vms.difference_update(batch)
            made += len(batch)
            if made == n or made % max(FILL_BATCH, n // 10 // FILL_BATCH * FILL_BATCH) == 0:
                log(f"  {made}/{n} VMs created and stopped ({time.monotonic() - t0:.0f}s)")
        return time.monotonic() - t0

    def timed_posts(self, n):
        """n x POST /vms POST_BODY, each on a fresh connection and timed to its 201; each VM deleted
        after (untimed), so the store holds as many VMs after as before."""
        out = []
        for _ in range(n):
            t = time.monotonic()
            status, raw = one_request(self.key, "POST", "/vms", POST_BODY)
            out.append(time.monotonic() - t)
            if status != 201:
                raise BenchError(f"POST /vms: {status} {raw[:300]!r}\n{self.daemon_tail()}")
            vm_id = json.loads(raw)["id"]
            self.live_vms.add(vm_id)
            self.delete_vm(vm_id)
        return out

    def api_at(self, label):
        """The same requests at the store's present size: GETs, then POSTs."""
        n, posts = self.args.get_requests, self.args.post_requests
        log(f"API, {label}: {n} x GET /health + {n} x GET /vms, then {posts} x POST /vms {json.dumps(POST_BODY)}")
        with CpuBusy() as busy:
            health, vms, size, count, hsize = self.interleaved_gets(n)
        post = self.timed_posts(posts)
        return {"health": health, "vms": vms, "size": size, "count": count, "health_size": hsize,
                "posts": post, "busy": busy.cores}

    def api(self):
        n_vms = self.args.api_vms
        empty = self.api_at("empty store")
        if empty["count"] != 0:
            raise BenchError(f"GET /vms listed {empty['count']} VMs before the store was filled, expected 0")
        log(f"API: filling the store with {n_vms} VMs through the API ({FILL_BATCH} at a time)")
        fill_s = self.fill_vms(n_vms)
        full = self.api_at(f"{n_vms} stopped VMs")
        if full["count"] != n_vms:
            raise BenchError(f"GET /vms listed {full['count']} VMs, expected {n_vms}")
        return {"empty": empty, "full": full, "fill_s": fill_s}

    # ------------------------------------------------------------ confinement

    def confinement(self):
        """hatch boots with VMM confinement on and off (HATCH_VMM_CONFINE): a fresh daemon
        per block, blocks alternating on/off so drift in host load hits both alike."""
        rounds, per = self.args.confine_rounds, self.args.confine_boots
        res = {"on": [], "off": []}
        self.hatchd.stop()
        main = (self.hatchd, self.data, self.vms_dir, self.live_vms)
        try:
            for r in range(rounds):
                for mode in (("on", "off") if r % 2 == 0 else ("off", "on")):
                    d = Daemon(self.tmp / f"confine-{mode}-{r}", self.hatch, self.image)
                    self.hatchd, self.data, self.vms_dir, self.live_vms = d, d.data, d.vms_dir, d.live_vms
                    try:
                        d.start("bench", extra_env={"HATCH_VMM_CONFINE": mode})
                        # One uncounted boot per daemon: the first pays for cold caches.
                        vm_id, *_ = self.hatch_boot()
                        self.delete_vm(vm_id)
                        for i in range(per):
                            vm_id, _, _, m = self.hatch_boot()
                            self.delete_vm(vm_id)
                            res[mode].append(m)
                            log(f"  confinement {mode:3} round {r + 1}/{rounds} boot {i + 1}/{per}: "
                                f"console {m['console'] * 1000:6.0f} ms, ready {m['ready']:.3f}s")
                    finally:
                        d.stop()
        finally:
            self.hatchd, self.data, self.vms_dir, self.live_vms = main
        return res

    # ------------------------------------------------------------ cleanup

    def cleanup(self):
        for p in list(self.raw_procs.values()):
            self.kill_raw(p)
        self.hatchd.stop()
        kill_leftovers(self.tmp)


# ---------------------------------------------------------------- report


def fmt_s(st):
    return f"{st['median']:.3f} s ({st['min']:.3f}-{st['max']:.3f})"


def fmt_ms(st):
    return f"{ms(st['median']):.0f} ms ({ms(st['min']):.0f}-{ms(st['max']):.0f})"


def render(meta, boot, api):
    H, R = boot["hatch"], boot["raw"]

    def col(runs, key):
        return stats([m[key] for m in runs])

    body = json.dumps(BOOT_BODY)
    lines = []
    add = lines.append
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after, "
        f"at most {meta['other_qemus']} other QEMU(s) running on the host during the boot runs; "
        f"host CPU busy (all processes, /proc/stat): {boot['busy']:.2f} of {meta['cpus']} cores during the boot runs, "
        f"{api['full']['busy']:.2f} during the GET loop with {api['full']['count']} VMs  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{meta['accel']}`, machine `{meta['machine']}`, "
        f"{meta['smp']} vCPU, {meta['mem']} MiB (hatch's defaults; `POST /vms {body}`)  ")
    add(f"Runs: {len(H)} hatch + {len(R)} raw QEMU, interleaved, after one uncounted hatch warm-up "
        f"(warm-up: first line {boot['warm']['first_line']:.3f} s, ready {boot['warm']['ready']:.3f} s)")
    add("")
    add("### Boot: hatch vs the same QEMU command line run by hand")
    add("")
    add(f"Median (min-max). hatch: from sending `POST /vms {body}`; raw: from spawning QEMU with hatch's "
        f"command line (the per-VM paths moved, as root: without the uid, cgroup and mount namespace "
        f"hatch's confinement adds, which the last table measures).")
    add("")
    add("| to ... | hatch | raw QEMU | hatch / raw | hatch - raw (medians) |")
    add("|---|---|---|---|---|")
    for key, label in (("first_line", "first console line"), ("ready", "`hatch-guest: ready` line")):
        h, r = col(H, key), col(R, key)
        add(f"| {label} | {fmt_s(h)} | {fmt_s(r)} | {h['median'] / r['median']:.3f} | "
            f"{ms(h['median'] - r['median']):+.0f} ms |")
    add("")
    add("Where the time goes (median, min-max):")
    add("")
    add("| step | hatch | raw QEMU |")
    add("|---|---|---|")
    add(f"| VM work dir created (after the API checked the key, image, and inserted the row) | {fmt_ms(col(H, 'workdir'))} | - |")
    add(f"| `disk.qcow2` overlay exists (`qemu-img create`) | {fmt_ms(col(H, 'disk.qcow2'))} | "
        f"{fmt_ms(col(R, 'overlay'))} (run before the clock starts) |")
    add(f"| `console.log` created (QEMU opened its chardev) | {fmt_ms(col(H, 'console'))} | {fmt_ms(col(R, 'console'))} |")
    add(f"| 201 returned (QMP said `running`) | {fmt_ms(col(H, 'resp'))} | - |")
    add(f"| first console byte | {fmt_s(col(H, 'first_byte'))} | {fmt_s(col(R, 'first_byte'))} |")
    add(f"| console created -> ready line | "
        f"{fmt_s(stats([m['ready'] - m['console'] for m in H]))} | "
        f"{fmt_s(stats([m['ready'] - m['console'] for m in R]))} |")
    add(f"| `DELETE /vms/{{id}}` (not in the figures above) | {fmt_ms(col(H, 'delete'))} | - |")
    add("")
    pre_h, pre_r = col(H, "console")["median"], col(R, "console")["median"]
    spread = col(R, "ready")["max"] - col(R, "ready")["min"]
    excess = col(H, "ready")["median"] - col(R, "ready")["median"] - (pre_h - pre_r)
    add(f"QEMU opened its console {ms(pre_h):.0f} ms after the request through hatch and {ms(pre_r):.0f} ms "
        f"after a bare spawn (medians, {ms(pre_h - pre_r):+.0f} ms; hatch's figure includes the API, the SQLite "
        f"insert, the work dir and the `qemu-img create` overlay). From there both boot the same guest under "
        f"`{meta['accel']}`; the raw ready line alone spreads over {ms(spread):.0f} ms, so "
        + ("the rest of the hatch - raw difference is within that noise."
           if abs(excess) <= spread / 2 else
           f"a further {ms(excess):+.0f} ms (beyond the start-up overhead) is larger than half that "
           "spread: look at the host load figures above before trusting it."))
    add("")
    add(f"First console line: `{' | '.join(t[:100] for t in boot['first_line_texts'])}`")
    add("")
    e, f = api["empty"], api["full"]
    add(f"### API latency: an empty store against {f['count']} stopped VMs")
    add("")
    add(f"The same requests at both sizes, all VMs made through the API: {f['count']} VMs created with "
        f"`POST /vms {json.dumps(FILL_BODY)}` and stopped with `POST /vms/{{id}}/stop`, {FILL_BATCH} at a time "
        f"(the bench owner's limits raised with `hatch owners limits`, as an operator would; filling took "
        f"{api['fill_s']:.0f} s, untimed). At each size: {len(f['vms'])} x `GET /health` and `GET /vms`, "
        f"alternating on one keep-alive connection, then {len(f['posts'])} x `POST /vms {json.dumps(POST_BODY)}`, "
        f"each on a fresh connection and timed to its 201, the VM deleted after (untimed).")
    add("")
    add("| request | VMs in store | n | p50 | p99 | max | response |")
    add("|---|---|---|---|---|---|---|")
    for d in (e, f):
        hs, vs, ps = stats(d["health"]), stats(d["vms"]), stats(d["posts"])
        add(f"| `GET /health` | {d['count']} | {hs['n']} | {ms(hs['p50']):.2f} ms | {ms(hs['p99']):.2f} ms | "
            f"{ms(hs['max']):.2f} ms | {d['health_size']} B |")
        add(f"| `GET /vms` | {d['count']} | {vs['n']} | {ms(vs['p50']):.2f} ms | {ms(vs['p99']):.2f} ms | "
            f"{ms(vs['max']):.2f} ms | {d['size']:,} B ({d['count']} VMs) |")
        add(f"| `POST /vms {json.dumps(POST_BODY)}` | {d['count']} | {ps['n']} | {ms(ps['p50']):.0f} ms | "
            f"{ms(ps['p99']):.0f} ms | {ms(ps['max']):.0f} ms | 201 |")
    add("")

    def ratio(key, at):
        return stats(f[key])[at] / stats(e[key])[at]

    add(f"{f['count']} VMs against 0, same request: `GET /vms` {ratio('vms', 'p50'):.2f}x at p50 and "
        f"{ratio('vms', 'p99'):.2f}x at p99; `GET /health` {ratio('health', 'p50'):.2f}x at p50; "
        f"`POST /vms` {ratio('posts', 'p50'):.2f}x at p50. `GET /vms` / `GET /health` on the same connection: "
        f"{stats(e['vms'])['p50'] / stats(e['health'])['p50']:.1f}x at p50 with 0 VMs, "
        f"{stats(f['vms'])['p50'] / stats(f['health'])['p50']:.1f}x with {f['count']}.")
    return "\n".join(lines)


def render_confinement(conf):
    on, off = conf["on"], conf["off"]
    lines = ["", "### Boot with VMM confinement on vs off", "",
             f"`POST /vms {{\"enable_network\": false}}` to the ready line, {len(on)} boots each, "
             "one fresh daemon per block of boots (`HATCH_VMM_CONFINE=on` / `off`), blocks alternating, "
             "each daemon's first boot uncounted. On: own uid, no capabilities, `-sandbox`, "
             "`tb-size=64`, cgroup, mount namespace. Median (min-max).", "",
             "| to ... | confined | not confined | confined / not |", "|---|---|---|---|"]
    for key, label in (("console", "`console.log` created (QEMU started)"),
                       ("resp", "201 returned"),
                       ("first_line", "first console line"),
                       ("ready", "`hatch-guest: ready` line")):
        a, b = stats([m[key] for m in on]), stats([m[key] for m in off])
        lines.append(f"| {label} | {fmt_s(a)} | {fmt_s(b)} | {a['median'] / b['median']:.3f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10, help="boots of each kind (default 10)")
    ap.add_argument("--api-vms", type=int, default=API_VMS,
                    help=f"stopped VMs made through the API for the API part (default {API_VMS})")
    ap.add_argument("--get-requests", type=int, default=200, help="GET /vms and GET /health requests (default 200)")
    ap.add_argument("--post-requests", type=int, default=10, help="POST /vms requests with the rows (default 10)")
    ap.add_argument("--confine-rounds", type=int, default=2,
                    help="on/off block pairs for the confinement comparison (default 2)")
    ap.add_argument("--confine-boots", type=int, default=5, help="boots per confinement block (default 5)")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args()
    for name in ("runs", "api_vms", "get_requests", "post_requests", "confine_rounds", "confine_boots"):
        if not 1 <= getattr(args, name) <= 100000:
            ap.error(f"--{name.replace('_', '-')} must be between 1 and 100000")
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/boot (it makes the namespace and the temp dir)")

    bench = Bench(args)
    meta = {
        "command": os.environ.get("HATCH_BENCH_COMMAND", "bench/boot"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
        "load_before": os.getloadavg()[0],
    }
    if os.environ.get("SUDO_USER"):
        meta["command"] = "sudo " + meta["command"]

    def body():
        bench.start_daemon()
        return bench.boots(), bench.api(), bench.confinement()

    status, result = run_guarded(body, bench.cleanup)
    if status != 0:
        return status
    boot, api, conf = result
    cmd = bench.cmdline
    meta.update(
        load_after=os.getloadavg()[0],
        other_qemus=bench.qemu_other_max,
        qemu=qemu_version(cmd[0]),
        accel=arg_after(cmd, "-accel"),
        machine=arg_after(cmd, "-M"),
        smp=arg_after(cmd, "-smp"),
        mem=arg_after(cmd, "-m"),
    )
    section = render(meta, boot, api) + "\n" + render_confinement(conf)
    print("\n## bench/boot\n")
    print(section)
    if not args.no_docs:
        write_docs(DOCS, "bench/boot", section)
        log(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
