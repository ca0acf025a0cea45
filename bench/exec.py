#!/usr/bin/env python3
"""bench/exec: `POST /vms/{id}/exec` of `true` against stock OpenSSH running `true`
in the same guest, and `PUT`/`GET /vms/{id}/files` of one file against `scp` of
the same file, in one run against one running busybox guest.

Run through `bench/exec` (it builds, makes the network namespace and the temp
dir, and passes them in HATCH_BENCH_*); this script runs inside that namespace
and talks to the daemon on 127.0.0.1. It starts the daemon, creates one VM with
hatch's defaults plus `auto_sleep: false`, waits for its ready line, makes an
ed25519 key with ssh-keygen and has `POST /vms/{id}/connect` sign it (again
before every round, so the 5-minute certificate never runs out mid-run).

Exec round trips, `--runs` rounds of `--execs` calls per path, the paths of a
round one after the other in an order that rotates from round to round:

  hatch        `POST /vms/{id}/exec {"command": "true"}` on one keep-alive HTTP
               connection (Python http.client), timed from the request to the
               whole answer; exit_code 0 checked.
  hatch-argv   the same with `{"command": ["true"]}`: no second shell in the
               guest (the string form runs `$SHELL -c 'true'` inside the login
               shell's line), to show what that shell costs.
  ssh          `ssh -i KEY -o CertificateFile=CERT agent@GUEST_IP true` (port 22,
               the address the daemon's own client uses), timed from spawn to exit.
  ssh-forward  the same through the VM's `ssh_port` on 127.0.0.1 (the daemon's
               TCP forward, the `host`/`port` that `connect` answers).

Each ssh pays its own TCP connect, key exchange and certificate login, as the
daemon does for each exec (it keeps no connection to the guest between calls).

Transfers, `--runs` runs: a file of `--mib` MiB of random bytes uploaded with
`curl -T` (`PUT /vms/{id}/files?path=/tmp/...`) and with `scp` (to GUEST_IP:22,
OpenSSH's scp speaks SFTP to the guest's sftp-server, as the daemon does), then
downloaded both ways (`curl -o`, `scp`), each timed from spawn to exit, the
hatch/scp order alternating from run to run; every download is checked by
sha256 against the file uploaded. The guest's /tmp is a tmpfs. Before each
transfer: `sync` and 0.5 s of quiet.

CPU per call: the daemon's and QEMU's CPU time (/proc/PID/stat) and that of
the client processes this script waits for (ssh, scp, curl), over each batch.

Before measuring it waits (bounded by --wait-quiet) until no QEMU but its own
runs and the host keeps less than half a core busy, and records what it saw.

Output: plain tables on stdout (markdown with --markdown); the `## bench/exec`
section of docs/BENCHMARKS.md is rewritten unless --no-docs.
"""

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    check_own_namespace,
    DaemonBench, check_ranges, run_meta,
    DOCS, READY, BenchError, CpuBusy, Daemon, Http, add_heading, add_table, arg_after,
    kill_leftovers, kill_namespace_leftovers, log, ms, nearest_rank,
    other_qemu_pids, proc_cmdline, qemu_version, run_guarded, stats, write_docs,
)

HOST = "127.0.0.1"
BOOT_TIMEOUT_S = 180.0
CLIENT_TIMEOUT_S = 600.0
DOC_SECTION = "bench/exec"
CLK_TCK = os.sysconf("SC_CLK_TCK")
IDLE_CORES = 0.5
EXEC_TARGET = 1.1  # hatch exec / ssh round trip, at most
FILES_TARGET = 0.9  # hatch MB/s / scp MB/s, at least
GUEST_DIR = "/tmp"
EXEC_PATHS = ("hatch", "hatch-argv", "ssh", "ssh-forward")
FILE_OPS = ("upload", "download")


def now():
    return time.monotonic()


def rotate(xs, i):
    k = i % len(xs)
    return list(xs[k:]) + list(xs[:k])


def cpu_seconds(pid):
    """user + system CPU seconds of a process (all its threads); None if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return None
    return (int(f[11]) + int(f[12])) / CLK_TCK


def children_cpu():
    """CPU seconds of the child processes this script has waited for."""
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return h.hexdigest()
            h.update(b)


class Cpu:
    """CPU seconds of the daemon, QEMU and waited-for children over a batch."""

    def __init__(self, daemon_pid, qemu_pid):
        self.pids = {"daemon": daemon_pid, "qemu": qemu_pid}
        self.t0 = {}

    def sample(self):
        s = {k: cpu_seconds(p) for k, p in self.pids.items()}
        s["client"] = children_cpu()
        return s

    def start(self):
        self.t0 = self.sample()

    def stop(self):
        t1 = self.sample()
        return {k: (t1[k] - self.t0[k]) if t1[k] is not None and self.t0[k] is not None else None
                for k in t1}


class Bench(DaemonBench):
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.ns = os.environ.get("HATCH_BENCH_NS", "")
        self.hatchd = Daemon(self.tmp, os.environ["HATCH_BENCH_BIN"], os.environ["HATCH_BENCH_IMAGE"])
        self.procs = []
        self.vm = None
        self.vm_id = None
        self.ip = None
        self.ssh_port = None
        self.qemu_pid = None
        self.cmdline = None
        self.key_path = self.tmp / "id_ed25519"
        self.cert_path = self.tmp / "id_ed25519-cert.pub"
        self.src = self.tmp / "payload.bin"
        self.src_sha = None
        self.facts = {}
        # path -> list of per-round {"lat": [s...], "cpu": {...}}
        self.execs = {p: [] for p in EXEC_PATHS}
        # (op, tool) -> list of {"s": seconds, "cpu": {...}}
        self.files = {(op, tool): [] for op in FILE_OPS for tool in ("hatch", "scp")}
        self.others_seen = set()
        self.others_max = 0
        self.quiet = {}
        self.load_before = None
        self.busy = None
        self.measure_s = None

    def run_client(self, argv, what):
        """Runs a client process to its end (bounded); returns (seconds, stdout+stderr text)."""
        t0 = now()
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             process_group=0)
        self.procs.append(p)
        try:
            out, _ = p.communicate(timeout=CLIENT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate(timeout=10)
            raise BenchError(f"{what}: no end within {CLIENT_TIMEOUT_S:.0f}s")
        finally:
            if p in self.procs and p.poll() is not None:
                self.procs.remove(p)
        took = now() - t0
        text = out.decode(errors="replace")
        if p.returncode != 0:
            raise BenchError(f"{what}: exit {p.returncode}: {text[-1500:]}\n{self.hatchd.tail()}")
        return took, text

    # ------------------------------------------------------------ setup

    def check_namespace(self):
        check_own_namespace(self.ns, "exec")

    def start_daemon(self):
        # The idle monitor must not put the VM to sleep between the steps.
        os.environ.update(HATCH_IDLE_TIMEOUT="off")
        os.environ.pop("HATCH_SSH_CERT_TTL", None)
        self.hatchd.start("bench-exec")

    def create_vm(self):
        self.vm = self.api("POST", "/vms", {"auto_sleep": False, "mem_mib": self.args.mem_mib}, expect=(201,))
        self.vm_id = self.vm["id"]
        self.hatchd.live_vms.add(self.vm_id)
        self.ip = self.vm.get("guest_ip")
        self.ssh_port = self.vm.get("ssh_port")
        if not self.ip or not self.ssh_port:
            raise BenchError(f"the VM has no guest_ip or ssh_port: {self.vm}")
        log(f"VM {self.vm_id}: guest_ip {self.ip}, ssh_port {self.ssh_port}")
        text, waited = self.wait_ready(self.vm_id, BOOT_TIMEOUT_S)
        self.facts["ready"] = next((line for line in text.decode(errors="replace").splitlines()
                                    if READY.decode() in line), "").strip()
        log(f"guest ready after {waited:.1f}s")
        self.qemu_pid = self.hatchd.vmm_pid(self.vm_id)
        self.cmdline = proc_cmdline(self.qemu_pid) if self.qemu_pid else None
        if not self.cmdline:
            raise BenchError(f"cannot read the QEMU command line of {self.vm_id}")

    def make_key(self):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bench-exec", "-f",
                        str(self.key_path)], check=True, capture_output=True, timeout=60)

    def certify(self):
        """A fresh certificate from `POST /vms/{id}/connect`, where `-o CertificateFile` finds it."""
        public = (self.key_path.with_suffix(".pub")).read_text().strip()
        r = self.api("POST", f"/vms/{self.vm_id}/connect", {"public_key": public})
        self.cert_path.write_text(r["certificate"].strip() + "\n")
        self.facts["connect"] = {k: r[k] for k in ("host", "port", "username")}

    def ssh_opts(self):
        return ["-F", "/dev/null", "-i", str(self.key_path), "-o", f"CertificateFile={self.cert_path}",
                "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", "-o", "ConnectTimeout=30"]

    def ssh_argv(self, forward, *extra):
        host, port = (HOST, self.ssh_port) if forward else (self.ip, 22)
        return ["ssh", *self.ssh_opts(), *extra, "-p", str(port), f"agent@{host}", "true"]

    def scp_argv(self, src, dst):
        return ["scp", "-q", *self.ssh_opts(), src, dst]

    def wait_ssh(self):
        """sshd answers a stock login (it may start a moment after the ready line)."""
        deadline = now() + 60
        while True:
            try:
                self.run_client(self.ssh_argv(False), "ssh agent@GUEST_IP true")
                return
            except BenchError:
                if now() > deadline:
                    raise
                time.sleep(0.5)

    def gather_facts(self):
        v = subprocess.run(["ssh", "-V"], capture_output=True, text=True)
        self.facts["ssh"] = (v.stderr or v.stdout).strip()
        c = subprocess.run(["curl", "--version"], capture_output=True, text=True)
        self.facts["curl"] = " ".join(c.stdout.split()[:2])
        # What stock ssh negotiates with the guest's sshd (the key exchange dominates a login).
        # -v after `-o LogLevel=ERROR` (ssh keeps an option's first value, but -v sets the level outright).
        _, text = self.run_client(self.ssh_argv(False, "-v"), "ssh -v")
        for line in text.splitlines():
            if "kex: algorithm:" in line:
                self.facts["kex"] = line.split("kex: algorithm:", 1)[1].strip()
            elif "kex: server->client cipher:" in line:
                self.facts["cipher"] = line.split("cipher:", 1)[1].split()[0]
            elif "Remote protocol version" in line:
                self.facts["sshd"] = line.split("remote software version", 1)[-1].strip()
        # The daemon's side of the same exchange, from the guest's point of view: what exec runs.
        r = self.exec_once({"command": "true"})
        if r.get("exit_code") != 0:
            raise BenchError(f"exec true: {r}")

    def make_payload(self):
        n = self.args.mib * 1024 * 1024
        with open(self.src, "wb") as f:
            left = n
            while left:
                b = os.urandom(min(left, 1 << 20))
                f.write(b)
                left -= len(b)
        self.src_sha = sha256_file(self.src)

    def wait_quiet(self):
        limit = self.args.wait_quiet
        t0 = now()
        others = other_qemu_pids(self.tmp)
        last_log = -30.0
        while others and now() - t0 < limit:
            if now() - t0 - last_log >= 30:
                last_log = now() - t0
                log(f"waiting for {len(others)} other QEMU(s) to finish (pids {sorted(others)}), "
                    f"{limit - last_log:.0f}s left")
            time.sleep(5)
            others = other_qemu_pids(self.tmp)
        self.quiet = {"waited": now() - t0, "left": len(others), "limit": limit}
        t1 = now()
        while True:
            with CpuBusy() as busy:
                time.sleep(5)
            if busy.cores is None or busy.cores < IDLE_CORES or now() - t0 >= limit:
                break
            log(f"host CPU busy {busy.cores:.2f} cores (other work); waiting for < {IDLE_CORES}")
        self.quiet.update(idle_waited=now() - t1, idle_cores=busy.cores)
        log(f"host CPU busy {busy.cores:.2f} cores over 5 s before measuring ({len(others)} other QEMU(s))")

    # ------------------------------------------------------------ exec

    def exec_once(self, body, http=None):
        h = http or Http(self.key, timeout=CLIENT_TIMEOUT_S)
        try:
            status, raw = h.request("POST", f"/vms/{self.vm_id}/exec", body)
        finally:
            if http is None:
                h.close()
        if status != 200:
            raise BenchError(f"POST /vms/{self.vm_id}/exec: {status} {raw[:500]!r}\n{self.hatchd.tail()}")
        return json.loads(raw)

    def exec_batch(self, path, n):
        lat = []
        cpu = Cpu(self.hatchd.proc.pid, self.qemu_pid)
        if path.startswith("hatch"):
            body = {"command": "true"} if path == "hatch" else {"command": ["true"]}
            http = Http(self.key, timeout=CLIENT_TIMEOUT_S)
            try:
                self.exec_once({"command": "true"}, http)  # the keep-alive connection is open: not timed
                cpu.start()
                for _ in range(n):
                    t0 = now()
                    r = self.exec_once(body, http)
                    lat.append(now() - t0)
                    if r.get("exit_code") != 0 or r.get("timed_out"):
                        raise BenchError(f"exec {body}: {r}")
                c = cpu.stop()
            finally:
                http.close()
        else:
            argv = self.ssh_argv(path == "ssh-forward")
            cpu.start()
            for _ in range(n):
                took, _ = self.run_client(argv, f"{path}: {' '.join(argv)}")
                lat.append(took)
            c = cpu.stop()
        return {"lat": lat, "cpu": {k: (v / n if v is not None else None) for k, v in c.items()}}

    def exec_rounds(self):
        for i in range(self.args.runs):
            self.certify()
            self.sample_others()
            order = rotate(EXEC_PATHS, i)
            for path in order:
                r = self.exec_batch(path, self.args.execs)
                r["others"] = len(other_qemu_pids(self.tmp))
                self.execs[path].append(r)
            log(f"exec round {i + 1}/{self.args.runs} ({' '.join(order)}): " + ", ".join(
                f"{p} p50 {ms(nearest_rank(self.execs[p][-1]['lat'], 50)):.0f} ms" for p in EXEC_PATHS))

    # ------------------------------------------------------------ files

    def settle(self):
        subprocess.run(["sync"], check=False, timeout=120)
        time.sleep(0.5)

    def files_url(self, name):
        return f"http://{HOST}:8080/vms/{self.vm_id}/files?path={GUEST_DIR}/{name}"

    def transfer(self, op, tool, run):
        name = f"bench-{tool}.bin"
        dst = self.tmp / f"down-{tool}.bin"
        dst.unlink(missing_ok=True)
        auth = ["-H", f"Authorization: Bearer {self.key}"]
        if (op, tool) == ("upload", "hatch"):
            # No `Expect: 100-continue`: curl would wait for the interim answer before the body.
            argv = ["curl", "-sS", "--fail-with-body", "-o", "/dev/null", *auth, "-H", "Expect:",
                    "-T", str(self.src), self.files_url(name)]
        elif (op, tool) == ("download", "hatch"):
            argv = ["curl", "-sS", "--fail-with-body", "-o", str(dst), *auth, self.files_url(name)]
        elif op == "upload":
            argv = self.scp_argv(str(self.src), f"agent@{self.ip}:{GUEST_DIR}/{name}")
        else:
            argv = self.scp_argv(f"agent@{self.ip}:{GUEST_DIR}/{name}", str(dst))
        self.settle()
        cpu = Cpu(self.hatchd.proc.pid, self.qemu_pid)
        cpu.start()
        took, _ = self.run_client(argv, f"{op} {tool}")
        c = cpu.stop()
        if op == "download":
            got = sha256_file(dst)
            if got != self.src_sha:
                raise BenchError(f"{tool} download of run {run + 1}: sha256 {got} is not the upload's {self.src_sha}")
            dst.unlink()
        self.files[(op, tool)].append({"s": took, "cpu": c, "others": len(other_qemu_pids(self.tmp))})

    def file_runs(self):
        for i in range(self.args.runs):
            self.certify()
            self.sample_others()
            tools = rotate(("hatch", "scp"), i)
            for op in FILE_OPS:
                for tool in tools:
                    self.transfer(op, tool, i)
            mb = self.args.mib * 1024 * 1024 / 1e6
            log(f"files run {i + 1}/{self.args.runs}: " + ", ".join(
                f"{op} {tool} {mb / self.files[(op, tool)][-1]['s']:.1f} MB/s"
                for op in FILE_OPS for tool in ("hatch", "scp")))

    # ------------------------------------------------------------ run

    def run(self):
        self.check_namespace()
        self.start_daemon()
        self.create_vm()
        self.make_key()
        self.certify()
        self.wait_ssh()
        self.gather_facts()
        self.make_payload()
        self.wait_quiet()
        self.sample_others()
        self.load_before = os.getloadavg()[0]
        t0 = now()
        busy = CpuBusy().start()
        log(f"exec: {self.args.runs} rounds of {self.args.execs} calls per path ({', '.join(EXEC_PATHS)})")
        self.exec_rounds()
        log(f"files: {self.args.runs} runs of a {self.args.mib} MiB upload and download, hatch and scp")
        self.file_runs()
        busy.stop()
        self.busy = busy.cores
        self.sample_others()
        self.measure_s = now() - t0

    def cleanup(self):
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
            try:
                p.communicate(timeout=10)
            except (subprocess.TimeoutExpired, ValueError):
                pass
        self.hatchd.stop()
        kill_leftovers(self.tmp)
        kill_namespace_leftovers(self.check_namespace)


# ---------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return stats(xs)["median"] if xs else None


def rng(xs, f):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f.format(xs[0])
    return f"{f.format(med(xs))} ({f.format(min(xs))}-{f.format(max(xs))})"


def render(meta, b, markdown):
    lines = []
    add = lines.append
    args = b.args

    def table(header, rows):
        add_table(add, markdown, header, rows)

    def head(text):
        add_heading(add, markdown, text)

    f, q = b.facts, b.quiet
    cmd = b.cmdline
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements "
        f"({b.measure_s:.0f} s); host CPU busy (all processes, /proc/stat) {b.busy:.2f} of {meta['cpus']} cores "
        f"while measuring  ")
    add(f"Other work: waited {q['waited']:.0f} s (limit {q['limit']} s) for other QEMUs to finish "
        f"({q['left']} still running), then {q['idle_waited']:.0f} s for the host to keep less than {IDLE_CORES} "
        f"cores busy over 5 s ({q['idle_cores']:.2f} then, our idle guest included); while measuring, "
        f"{len(b.others_seen)} other QEMU process(es) seen, at most {b.others_max} at once  ")
    add(f"hatch: release build of {meta['source']}  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{arg_after(cmd, '-accel')}`, machine `{arg_after(cmd, '-M')}`, "
        f"{arg_after(cmd, '-smp')} vCPU, {arg_after(cmd, '-m')} MiB (`--mem-mib`), virtio-net on a TAP in the "
        f"daemon's bridge  ")
    add(f"Guest: the default image (OpenSSH sshd, `{f.get('sshd', '?')}`), ready line `{f['ready']}`  ")
    add(f"Clients: {f['ssh']} (`-F /dev/null`, key exchange `{f.get('kex', '?')}`, cipher "
        f"`{f.get('cipher', '?')}` with this guest), {f['curl']}, Python http.client for exec; all on this host, "
        f"all traffic inside the bench's namespace  ")
    add(f"Runs: {meta['runs']} rounds; each round {args.execs} calls per exec path back to back, the paths in an "
        f"order rotating from round to round; {meta['runs']} transfer runs of {args.mib} MiB each way, hatch and "
        f"scp alternating which goes first")
    add("")

    add("What is compared: hatch's exec opens a new SSH connection to the guest for every call and keeps none "
        "between calls (src/manager/exec.rs, src/ssh/client.rs): a fresh ed25519 key, a one-minute certificate "
        "from the daemon's CA, TCP connect, key exchange (russh 0.65 offers mlkem768x25519-sha256 first, which "
        "OpenSSH 9.2 lacks, then curve25519-sha256), certificate login, one channel running the command line, "
        "disconnect. Its line for a string command also writes the login shell's pid to a file in /tmp (for "
        "killing on timeout), runs the command through a second `$SHELL -c` and removes the file; the argv form "
        "skips the second shell. Stock ssh pays TCP, key exchange and login on every call too.")
    add("")
    head("exec of `true`: hatch against stock ssh (round trip per call)")
    ex = b.execs
    pooled = {p: [x for r in ex[p] for x in r["lat"]] for p in EXEC_PATHS}
    labels = {
        "hatch": "hatch `POST /vms/{id}/exec` `\"true\"`",
        "hatch-argv": "hatch `POST /vms/{id}/exec` `[\"true\"]`",
        "ssh": "ssh `agent@GUEST_IP` (port 22)",
        "ssh-forward": "ssh `-p ssh_port agent@127.0.0.1` (the daemon's forward)",
    }
    rows = []
    for p in EXEC_PATHS:
        xs = pooled[p]
        per_round = [med(r["lat"]) for r in ex[p]]
        rows.append([labels[p], len(xs), f"{ms(nearest_rank(xs, 50)):.0f}", f"{ms(nearest_rank(xs, 90)):.0f}",
                     f"{ms(nearest_rank(xs, 99)):.0f}", rng([ms(x) for x in per_round], "{:.0f}")])
    table(["path", "calls", "p50 ms", "p90 ms", "p99 ms", "round medians ms (median, min-max)"], rows)

    def round_ratios(a, c):
        return [med(ra["lat"]) / med(rc["lat"]) for ra, rc in zip(ex[a], ex[c])]

    ratio = round_ratios("hatch", "ssh")
    rows = [
        ["hatch / ssh", rng(ratio, "{:.2f}"), f"{nearest_rank(pooled['hatch'], 50) / nearest_rank(pooled['ssh'], 50):.2f}",
         f"<= {EXEC_TARGET}", "met" if med(ratio) <= EXEC_TARGET else "missed"],
        ["hatch-argv / ssh", rng(round_ratios("hatch-argv", "ssh"), "{:.2f}"),
         f"{nearest_rank(pooled['hatch-argv'], 50) / nearest_rank(pooled['ssh'], 50):.2f}", "", ""],
        ["ssh-forward / ssh", rng(round_ratios("ssh-forward", "ssh"), "{:.2f}"),
         f"{nearest_rank(pooled['ssh-forward'], 50) / nearest_rank(pooled['ssh'], 50):.2f}", "", ""],
    ]
    table(["ratio", "per round (median, min-max)", "of pooled p50s", "target", ""], rows)

    head("CPU per exec call (median of the rounds)")
    rows = []
    for p in EXEC_PATHS:
        def cpu(k):
            return rng([ms(r["cpu"][k]) if r["cpu"][k] is not None else None for r in ex[p]], "{:.1f}")
        rows.append([labels[p], cpu("daemon"), cpu("qemu"), cpu("client") if not p.startswith("hatch") else "-"])
    table(["path", "daemon ms", "QEMU ms (the guest)", "ssh client ms"], rows)

    head(f"Files: {args.mib} MiB, hatch `PUT`/`GET /vms/{{id}}/files` (curl) against scp")
    mb = args.mib * 1024 * 1024 / 1e6
    rows = []
    for op in FILE_OPS:
        h = [mb / r["s"] for r in b.files[(op, "hatch")]]
        s = [mb / r["s"] for r in b.files[(op, "scp")]]
        ratios = [x / y for x, y in zip(h, s)]
        target = "met" if med(ratios) >= FILES_TARGET else "missed"
        rows.append([op, rng(h, "{:.1f}"), rng(s, "{:.1f}"), rng(ratios, "{:.2f}"), f">= {FILES_TARGET}", target])
    table(["direction", "hatch MB/s", "scp MB/s", "hatch / scp (per run)", "target", ""], rows)
    rows = []
    for op in FILE_OPS:
        for tool in ("hatch", "scp"):
            rs = b.files[(op, tool)]
            rows.append([op, tool, rng([r["s"] for r in rs], "{:.2f}"),
                         rng([r["cpu"]["daemon"] for r in rs], "{:.2f}"),
                         rng([r["cpu"]["qemu"] for r in rs], "{:.2f}"),
                         rng([r["cpu"]["client"] for r in rs], "{:.2f}")])
    table(["direction", "tool", "wall s", "daemon CPU s", "QEMU CPU s", "client CPU s (curl / scp)"], rows)
    add(f"Every download matched the upload's sha256. Guest path `{GUEST_DIR}/bench-hatch.bin` and "
        f"`{GUEST_DIR}/bench-scp.bin` (tmpfs); host side in the bench's temp dir.")
    add("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5, help="exec rounds and transfer runs (default 5)")
    ap.add_argument("--execs", type=int, default=20, help="exec calls per path in each round (default 20)")
    ap.add_argument("--mib", type=int, default=64, help="size of the transferred file in MiB (default 64)")
    ap.add_argument("--mem-mib", type=int, default=1024,
                    help="the VM's memory; its /tmp (a tmpfs) holds two copies of the file (default 1024)")
    ap.add_argument("--wait-quiet", type=int, default=600,
                    help="seconds to wait for other QEMUs and a quiet host before measuring (default 600, 0: none)")
    ap.add_argument("--markdown", action="store_true",
                    help=f"print the `## {DOC_SECTION}` section as markdown instead of plain tables")
    ap.add_argument("--no-docs", action="store_true",
                    help=f"do not write the `## {DOC_SECTION}` section into docs/BENCHMARKS.md")
    args = ap.parse_args()
    check_ranges(ap, args, (("runs", 1, 100), ("execs", 1, 10000), ("mib", 1, 4096), ("mem_mib", 256, 65536),
                         ("wait_quiet", 0, 3600)))
    if 2 * args.mib + 128 > args.mem_mib:
        ap.error("--mem-mib must hold two copies of the file in the guest's /tmp plus 128 MiB")
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/exec (it makes the namespace and the temp dir)")

    bench = Bench(args)
    meta = run_meta("bench/exec", args.runs)
    status, _ = run_guarded(bench.run, bench.cleanup)
    if status != 0:
        return status
    meta.update(load_before=bench.load_before, load_after=os.getloadavg()[0], qemu=qemu_version(bench.cmdline[0]))
    print(f"\n## {DOC_SECTION}\n" if args.markdown else "")
    print(render(meta, bench, args.markdown))
    if not args.no_docs:
        write_docs(DOCS, DOC_SECTION, render(meta, bench, True))
        log(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
