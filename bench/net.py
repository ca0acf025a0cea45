#!/usr/bin/env python3
"""bench/net: host -> guest TCP throughput and request latency, over the bridge
and through the SSH forward, against the same traffic to the same programs on
the host's loopback, in one run.

Run through `bench/net` (it installs what is missing, builds, makes the network
namespace and the temp dir, and passes them in HATCH_BENCH_*); this script runs
inside that namespace. It starts the daemon, creates one VM (hatch's defaults,
with user data authorizing an ed25519 key made here), waits until SSH to it
works, and then measures, each guest path interleaved with its baseline:

  1. TCP bulk: N MiB from a Python socket (sendall, 1 MiB buffer) into
     `busybox nc -l -p 5001 > /dev/null` in the guest, over the bridge
     (guest_ip:5001), vs the same busybox nc on 127.0.0.1:5001. The clock stops
     when the sink closed the connection, which nc does only after it read EOF,
     so after every byte; one uncounted first run per path pipes nc into
     `wc -c` and checks the count.
  2. SSH: (a) connect -> `SSH-2.0-...` banner line, via the forward
     (127.0.0.1:ssh_port, DNAT in the nat output chain), direct to
     guest_ip:22 (the guest's OpenSSH), and to a dropbear on 127.0.0.1:2222
     (the guest had dropbear before its SSH CA; `-s`; its host key and root's authorized_keys
     in the temp dir, bind-mounted over /root in a private mount namespace);
     (b) a session running `true`, and M MiB through
     `ssh ... 'busybox cat > /dev/null' < FILE` over the same three, with the
     same OpenSSH client, cipher, kex and host key type.
  3. HTTP: GET of the same small file from busybox httpd in the guest
     (guest_ip:8080, /srv/www) and on 127.0.0.1:8091: p50/p99 on fresh
     connections from Python, then requests/s with wrk (1 thread, C
     connections, `Connection: close`, fixed duration).
  4. The guest filter: TCP bulk (1.) and wrk (3., the first C) into the
     guest with the daemon's guest filter and with it taken out (the
     `bridge hatch` table and the `input`/`forward` chains of `ip hatch`),
     switched by one atomic `nft -f` before each run and put back at the end.

Connects and GETs rotate over the paths with an idle gap before each, so
every one starts with the guest idle (without it, one that follows another
guest connection waits for the guest to finish tearing the last one down).

Before measuring it waits (bounded) until no QEMU but its own runs on the host,
and it records how many others it saw while measuring.
"""

import argparse
import datetime
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    check_own_namespace,
    kill_namespace_leftovers, parse_wrk,
    DOCS, BenchError, CpuBusy, Daemon, arg_after, cpu_model, kill_leftovers, log,
    ms, one_request, other_qemu_pids, proc_cmdline, qemu_version,
    run_guarded, stats, wait_ready, write_docs,
)

SINK_PORT = 5001
GUEST_HTTP_PORT = 8080  # the guest's own 8080; the daemon's API is on the host's
HOST_HTTP_PORT = 8091  # 8081 is the daemon's proxy
HOST_SSH_PORT = 2222
BOOT_TIMEOUT_S = 120.0
SSH_READY_TIMEOUT_S = 120.0
LISTEN_TIMEOUT_S = 30.0
CHUNK = 1 << 20
WWW_FILE = "small.txt"
WWW_SIZE = 1024
SSH_CIPHER = "chacha20-poly1305@openssh.com"
SSH_KEX = "curve25519-sha256"
SSH_HOSTKEY = "ssh-ed25519"
MB = 1e6


def now():
    return time.perf_counter()


def mbps(nbytes, seconds):
    return nbytes / seconds / MB


def connect_retry(host, port, deadline):
    """Connects, retrying while nothing listens yet (the sink may still be starting)."""
    while True:
        try:
            return socket.create_connection((host, port), timeout=10)
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout) as e:
            if time.monotonic() > deadline:
                raise BenchError(f"nothing accepted on {host}:{port} within {LISTEN_TIMEOUT_S:.0f}s: {e}")
            time.sleep(0.02)


def recv_to_eof(s):
    chunks = []
    while True:
        d = s.recv(65536)
        if not d:
            return b"".join(chunks)
        chunks.append(d)


def rotate(xs, i):
    """xs rotated by i: over len(xs) rounds each item takes each position once."""
    k = i % len(xs)
    return xs[k:] + xs[:k]


def thread_cpu(pid):
    """{tid: (thread name, utime + stime in seconds)} for every thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    tick = os.sysconf("SC_CLK_TCK")
    for tid in tids:
        try:
            raw = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        f = raw.rsplit(")", 1)[1].split()
        out[tid] = (raw[raw.index("(") + 1: raw.rindex(")")], (int(f[11]) + int(f[12])) / tick)
    return out


class QemuCpu:
    """CPU QEMU used between start() and stop(), in cores: its busiest thread and all threads together.

    QEMU names its threads only with `-name ...,debug-threads=on`, which hatch does not pass, so the vCPU
    thread cannot be told by name; with one vCPU under TCG it is normally the busiest one."""

    def __init__(self, pid):
        self.pid = pid
        self.vcpu = self.total = None

    def start(self):
        self.t0, self.s0 = now(), thread_cpu(self.pid)
        return self

    def stop(self):
        dt, s1 = now() - self.t0, thread_cpu(self.pid)
        if dt <= 0 or not s1:
            return self
        used = {tid: (name, sec - self.s0.get(tid, (name, 0.0))[1]) for tid, (name, sec) in s1.items()}
        self.total = sum(sec for _, sec in used.values()) / dt
        self.vcpu = max(sec for _, sec in used.values()) / dt
        return self


class Route:
    """One way to a service: a key, a label and an address."""

    def __init__(self, key, label, host, port):
        self.key, self.label, self.host, self.port = key, label, host, port

    @property
    def addr(self):
        return f"{self.host}:{self.port}"


class Net:
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.hatchd = Daemon(self.tmp, os.environ["HATCH_BENCH_BIN"], os.environ["HATCH_BENCH_IMAGE"])
        self.ns = os.environ.get("HATCH_BENCH_NS", "")
        self.procs = []  # host-side Popens: servers, sinks, ssh clients
        self.vm = None
        self.vm_id = None
        self.qemu_pid = None
        self.cmdline = None
        self.sshkey = self.tmp / "id_ed25519"
        self.payload = secrets.token_bytes(CHUNK)
        self.ssh_file = self.tmp / "ssh-payload.bin"
        self.www = self.tmp / "www"
        self.www_body = None
        self.dropbear = None
        self.httpd = None
        self.meta_load_before = None
        self.measure_s = None
        self.others_seen = set()
        self.others_max = 0
        self.busy = {}
        self.quiet = {}
        self.facts = {}

    # ------------------------------------------------------------ processes

    def spawn(self, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)
        # Own process group: a Ctrl-C reaches only this script, which then stops things in order.
        p = subprocess.Popen(argv, process_group=0, **kw)
        self.procs.append(p)
        return p

    def reap(self, p, timeout=5):
        """Waits for p (killing it after `timeout`); returns its stdout/stderr if piped."""
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate(timeout=10)
        if p in self.procs:
            self.procs.remove(p)
        return out, err

    def stop(self, p):
        if p.poll() is None:
            p.terminate()
        self.reap(p, 5)

    def sample_others(self):
        pids = other_qemu_pids(self.tmp)
        self.others_seen |= pids
        self.others_max = max(self.others_max, len(pids))

    # ------------------------------------------------------------ ssh

    def ssh_argv(self, host, port, cmd):
        return [
            "ssh", "-F", "/dev/null", "-T", "-i", str(self.sshkey), "-p", str(port),
            "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none", "-o", "BatchMode=yes",
            "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "UpdateHostKeys=no",
            "-o", "ConnectTimeout=10", "-o", "ConnectionAttempts=1", "-o", "LogLevel=ERROR",
            "-o", "ControlMaster=no", "-o", "ControlPath=none", "-o", "Compression=no",
            "-o", f"Ciphers={SSH_CIPHER}", "-o", f"KexAlgorithms={SSH_KEX}",
            "-o", f"HostKeyAlgorithms={SSH_HOSTKEY}", f"root@{host}", cmd,
        ]

    def ssh_env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SSH_", "HATCH_BENCH_"))}
        return env

    def ssh(self, host, port, cmd, input=None, stdin=None, timeout=60):
        kw = {"input": input} if input is not None else {"stdin": stdin if stdin is not None else subprocess.DEVNULL}
        try:
            return subprocess.run(self.ssh_argv(host, port, cmd), capture_output=True, timeout=timeout,
                                  env=self.ssh_env(), **kw)
        except subprocess.TimeoutExpired:
            raise BenchError(f"ssh {host}:{port} {cmd!r} took over {timeout}s")

    def ssh_ok(self, host, port, cmd, **kw):
        r = self.ssh(host, port, cmd, **kw)
        if r.returncode != 0:
            raise BenchError(f"ssh {host}:{port} {cmd!r} exited {r.returncode}: {r.stderr.decode(errors='replace')}")
        return r.stdout.decode(errors="replace")

    def ssh_spawn(self, host, port, cmd):
        """A long-running remote command; its stdin is a pipe we never write to (nc's never sees EOF)."""
        return self.spawn(self.ssh_argv(host, port, cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, env=self.ssh_env())

    # ------------------------------------------------------------ setup

    def check_namespace(self):
        check_own_namespace(self.ns, "net")

    def make_key(self):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hatch-bench-net", "-f",
                        str(self.sshkey)], check=True, timeout=30, capture_output=True)
        return self.sshkey.with_suffix(".pub").read_text().strip()

    def create_vm(self, public):
        user_data = f"#cloud-config\nusers:\n  - name: root\n    ssh_authorized_keys:\n      - {public}\n"
        status, raw = one_request(self.hatchd.key, "POST", "/vms", {"user_data": user_data}, timeout=120)
        if status != 201:
            raise BenchError(f"POST /vms: {status} {raw[:300]!r}\n{self.hatchd.tail()}")
        self.vm = json.loads(raw)
        self.vm_id = self.vm["id"]
        self.hatchd.live_vms.add(self.vm_id)
        for field in ("guest_ip", "ssh_port"):
            if not self.vm.get(field):
                raise BenchError(f"the VM has no {field}: {self.vm}")
        log(f"VM {self.vm_id}: guest_ip {self.vm['guest_ip']}, ssh_port {self.vm['ssh_port']}")

    def wait_ready(self):
        _, waited = wait_ready(self.hatchd, self.vm_id, BOOT_TIMEOUT_S)
        log(f"guest ready after {waited:.1f}s")
        self.qemu_pid = self.hatchd.vmm_pid(self.vm_id)
        self.cmdline = proc_cmdline(self.qemu_pid) if self.qemu_pid else None
        if not self.cmdline:
            raise BenchError("cannot read the VM's QEMU command line")
        ip, port = self.vm["guest_ip"], self.vm["ssh_port"]
        t0 = time.monotonic()
        while True:
            r = self.ssh(ip, 22, "true")
            if r.returncode == 0:
                break
            if time.monotonic() - t0 > SSH_READY_TIMEOUT_S:
                raise BenchError(f"ssh root@{ip} never worked: {r.stderr.decode(errors='replace')}")
            time.sleep(0.5)
        self.ssh_ok("127.0.0.1", port, "true")
        log(f"ssh to the guest works, directly and through 127.0.0.1:{port}")

    def start_host_dropbear(self):
        """dropbear on 127.0.0.1:2222; root's home is a temp dir bind-mounted over /root in a private
        mount namespace, so authorized_keys lives there and nothing on the host is touched."""
        d = self.tmp / "dropbear"
        home = d / "home"
        (home / ".ssh").mkdir(parents=True)
        for p in (d, home, home / ".ssh"):
            p.chmod(0o700)
        auth = home / ".ssh" / "authorized_keys"
        auth.write_text(self.sshkey.with_suffix(".pub").read_text())
        auth.chmod(0o600)
        hostkey = d / "ed25519_host_key"
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", str(hostkey)], check=True, timeout=30,
                       capture_output=True)
        script = 'mount --bind "$1" /root && shift && exec "$@"'
        # Same options as the guest's rcS (`dropbear -R -s -p 22`) but a given host key, the loopback
        # address, the foreground, log to stderr and a pid file of our own.
        argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", str(home),
                "dropbear", "-F", "-E", "-s", "-p", f"127.0.0.1:{HOST_SSH_PORT}", "-r", str(hostkey),
                "-P", str(d / "dropbear.pid")]
        logf = open(d / "dropbear.log", "wb")
        self.dropbear = self.spawn(argv, stdout=logf, stderr=logf)
        logf.close()
        deadline = time.monotonic() + LISTEN_TIMEOUT_S
        s = connect_retry("127.0.0.1", HOST_SSH_PORT, deadline)
        s.close()
        self.ssh_ok("127.0.0.1", HOST_SSH_PORT, "true")
        log(f"host dropbear (pid {self.dropbear.pid}) on 127.0.0.1:{HOST_SSH_PORT}")

    def start_httpds(self):
        body = (b"hatch bench/net " * (WWW_SIZE // 16 + 1))[: WWW_SIZE - 1] + b"\n"
        self.www_body = body
        self.www.mkdir()
        (self.www / WWW_FILE).write_bytes(body)
        self.httpd = self.spawn(["busybox", "httpd", "-f", "-p", f"127.0.0.1:{HOST_HTTP_PORT}", "-h", str(self.www)])
        ip = self.vm["guest_ip"]
        self.ssh_ok(ip, 22, f"mkdir -p /srv/www && busybox cat > /srv/www/{WWW_FILE} && "
                    f"busybox httpd -p {GUEST_HTTP_PORT} -h /srv/www", input=body)
        for host, port in ((ip, GUEST_HTTP_PORT), ("127.0.0.1", HOST_HTTP_PORT)):
            deadline = time.monotonic() + LISTEN_TIMEOUT_S
            while True:
                try:
                    self.http_get(host, port)
                    break
                except (OSError, BenchError) as e:
                    if time.monotonic() > deadline:
                        raise BenchError(f"httpd on {host}:{port} does not serve {WWW_FILE}: {e}")
                    time.sleep(0.1)
        log(f"busybox httpd serves /{WWW_FILE} ({WWW_SIZE} B) on {ip}:{GUEST_HTTP_PORT} and 127.0.0.1:{HOST_HTTP_PORT}")

    def gather_facts(self):
        ip = self.vm["guest_ip"]
        out = self.ssh_ok(ip, 22, "uname -r; grep -m1 'model name' /proc/cpuinfo; cat /sys/class/net/eth0/mtu; "
                                  "busybox | head -1")
        lines = out.splitlines() + ["?"] * 4
        self.facts.update(guest_kernel=lines[0].strip(), guest_cpu=lines[1].split(":", 1)[-1].strip(),
                          guest_mtu=lines[2].strip(), guest_busybox=lines[3].replace(" multi-call binary.", "").strip())
        host_bb = subprocess.run(["busybox"], capture_output=True, text=True).stdout.splitlines()
        self.facts["host_busybox"] = host_bb[0].replace(" multi-call binary.", "").strip() if host_bb else "?"
        for dev in ("lo", "hatch0"):
            try:
                self.facts[f"mtu_{dev}"] = Path(f"/sys/class/net/{dev}/mtu").read_text().strip()
            except OSError:
                self.facts[f"mtu_{dev}"] = "?"
        db = subprocess.run(["dropbear", "-V"], capture_output=True, text=True)
        self.facts["dropbear"] = (db.stdout + db.stderr).strip().splitlines()[0] if (db.stdout + db.stderr) else "?"
        self.facts["ssh"] = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
        wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        self.facts["wrk"] = (wrk.stdout + wrk.stderr).strip().splitlines()[0].split(" Copyright")[0]
        self.facts["guest_dropbear_args"] = self.ssh_ok(ip, 22, "tr '\\0' ' ' < /proc/$(cat /run/dropbear.pid)/cmdline").strip()

    def wait_quiet(self):
        """Waits (bounded, polling) until no QEMU but ours runs on the host."""
        limit = self.args.wait_quiet
        t0 = time.monotonic()
        others = other_qemu_pids(self.tmp)
        last_log = -30.0
        while others and time.monotonic() - t0 < limit:
            if time.monotonic() - t0 - last_log >= 30:
                last_log = time.monotonic() - t0
                log(f"waiting for {len(others)} other QEMU(s) to finish (pids {sorted(others)}), "
                    f"{limit - last_log:.0f}s left")
            time.sleep(5)
            others = other_qemu_pids(self.tmp)
        self.quiet = {"waited": time.monotonic() - t0, "left": len(others), "limit": limit}
        if others:
            log(f"still {len(others)} other QEMU(s) after {limit}s; measuring anyway (recorded)")
        else:
            log(f"no other QEMU running (waited {self.quiet['waited']:.0f}s)")

    # ------------------------------------------------------------ 1. TCP bulk into nc

    def start_sink(self, where, count):
        """`busybox nc -l -p 5001` into /dev/null (or `wc -c` when count) in the guest or on the host."""
        cmd = f"busybox nc -l -p {SINK_PORT}" + (" | busybox wc -c" if count else " > /dev/null")
        if where == "guest":
            return self.ssh_spawn(self.vm["guest_ip"], 22, ("" if count else "exec ") + cmd)
        if count:
            return self.spawn(["sh", "-c", cmd], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
        return self.spawn(["busybox", "nc", "-l", "-p", str(SINK_PORT)], stdin=subprocess.PIPE,
                          stderr=subprocess.PIPE)

    def push(self, host, port, total, qemu=False):
        """Sends `total` bytes, half-closes, and waits for the sink to close.

        Returns (seconds, QemuCpu or None, this client's CPU in cores: the sends, and the kernel work
        done in its context)."""
        s = connect_retry(host, port, time.monotonic() + LISTEN_TIMEOUT_S)
        try:
            s.settimeout(300)
            buf = memoryview(self.payload)
            qcpu = QemuCpu(self.qemu_pid).start() if qemu else None
            cl0 = time.process_time()
            t0 = now()
            left = total
            while left:
                n = min(left, CHUNK)
                s.sendall(buf[:n])
                left -= n
            s.shutdown(socket.SHUT_WR)
            extra = recv_to_eof(s)
            dt = now() - t0
            client = (time.process_time() - cl0) / dt
            if qcpu is not None:
                qcpu.stop()
        finally:
            s.close()
        if extra:
            raise BenchError(f"the sink on {host}:{port} sent {len(extra)} bytes back")
        return dt, qcpu, client

    def tcp_run(self, where, total, count):
        sink = self.start_sink(where, count)
        host = self.vm["guest_ip"] if where == "guest" else "127.0.0.1"
        try:
            dt, qcpu, client = self.push(host, SINK_PORT, total, qemu=(where == "guest"))
            out, err = self.reap(sink, 30)
        except BaseException:
            self.stop(sink)
            raise
        if sink.returncode != 0:
            raise BenchError(f"{where} sink exited {sink.returncode}: {(err or b'').decode(errors='replace')}")
        if count:
            got = int((out or b"0").split()[0])
            if got != total:
                raise BenchError(f"{where} sink counted {got} bytes, {total} were sent")
        return dt, qcpu, client

    def tcp(self):
        total = self.args.tcp_mib << 20
        res = {"guest": [], "host": [], "vcpu": [], "qemu": [], "client_guest": [], "client_host": [],
               "total": total}
        for where in ("guest", "host"):
            dt, _, _ = self.tcp_run(where, total, count=True)
            log(f"TCP {where}: check run piped into wc -c: all {total} bytes arrived "
                f"({mbps(total, dt):.0f} MB/s, not counted)")
        with CpuBusy() as busy:
            for i in range(self.args.reps):
                self.sample_others()
                for where in (("guest", "host") if i % 2 == 0 else ("host", "guest")):
                    dt, qc, client = self.tcp_run(where, total, count=False)
                    res[where].append(mbps(total, dt))
                    res[f"client_{where}"].append(client)
                    if qc is not None and qc.total is not None:
                        res["vcpu"].append(qc.vcpu)
                        res["qemu"].append(qc.total)
                    log(f"TCP {i + 1}/{self.args.reps} {where:5}: {mbps(total, dt):8.1f} MB/s ({dt:.2f}s), "
                        f"client {client:.2f} cores"
                        + (f", QEMU busiest thread {qc.vcpu:.2f} / all threads {qc.total:.2f} cores"
                           if qc is not None and qc.total is not None else ""))
        self.busy["tcp"] = busy.cores
        return res

    # ------------------------------------------------------------ 2. SSH

    def ssh_paths(self):
        ip, port = self.vm["guest_ip"], self.vm["ssh_port"]
        return [
            Route("forward", "forward", "127.0.0.1", port),
            Route("direct", "direct (bridge)", ip, 22),
            Route("host", "host loopback", "127.0.0.1", HOST_SSH_PORT),
        ]

    def banner(self, p):
        """(connect() returned, banner line read) in seconds from the start, and the line."""
        t0 = now()
        s = socket.create_connection((p.host, p.port), timeout=10)
        tc = now() - t0
        try:
            buf = b""
            while b"\n" not in buf and len(buf) < 1024:
                d = s.recv(1024)
                if not d:
                    break
                buf += d
            dt = now() - t0
        finally:
            s.close()
        return dt, tc, buf.split(b"\n", 1)[0].strip().decode(errors="replace")

    def ssh_connects(self):
        paths = self.ssh_paths()
        res = {p.key: [] for p in paths}
        handshake = {p.key: [] for p in paths}
        fails = {p.key: 0 for p in paths}
        banners = {}
        for p in paths:  # warm-up, not counted
            for _ in range(10):
                self.banner(p)
        with CpuBusy() as busy:
            for i in range(self.args.connects):
                if i % 50 == 0:
                    self.sample_others()
                for p in rotate(paths, i):
                    time.sleep(self.args.gap_ms / 1000)
                    try:
                        dt, tc, line = self.banner(p)
                    except OSError as e:
                        fails[p.key] += 1
                        log(f"SSH connect {p.label} {p.addr}: {e}")
                        continue
                    # The guest runs OpenSSH since the SSH CA (src/ssh), the host dropbear.
                    if not line.startswith("SSH-2.0-"):
                        fails[p.key] += 1
                        log(f"SSH connect {p.label} {p.addr}: banner {line!r}")
                        continue
                    banners[p.key] = line
                    res[p.key].append(dt)
                    handshake[p.key].append(tc)
        self.busy["connect"] = busy.cores
        for p in paths:
            if not res[p.key]:
                raise BenchError(f"no SSH banner from {p.label} {p.addr}")
            st = stats(res[p.key])
            log(f"SSH banner {p.label:16} {p.addr:22}: p50 {ms(st['p50']):.2f} ms, p99 {ms(st['p99']):.2f} ms, "
                f"{fails[p.key]} failed")
        return {"times": res, "handshake": handshake, "fails": fails, "banners": banners}

    def ssh_bulk(self):
        size = self.args.ssh_mib << 20
        with open(self.ssh_file, "wb") as f:
            for _ in range(self.args.ssh_mib):
                f.write(secrets.token_bytes(1 << 20))
        paths = self.ssh_paths()
        res = {p.key: [] for p in paths}
        setup = {p.key: [] for p in paths}
        vcpu = {p.key: [] for p in paths}
        timeout = max(120, self.args.ssh_mib * 10)
        for p in paths:  # check run, not counted: every byte reaches the remote command
            with open(self.ssh_file, "rb") as f:
                t0 = now()
                out = self.ssh_ok(p.host, p.port, "busybox wc -c", stdin=f, timeout=timeout)
                dt = now() - t0
            if int(out.split()[0]) != size:
                raise BenchError(f"ssh {p.label}: remote wc -c counted {out.strip()}, {size} were sent")
            log(f"SSH {p.label}: check run into wc -c: all {size} bytes arrived ({mbps(size, dt):.1f} MB/s, not counted)")
        with CpuBusy() as busy_setup:
            for i in range(self.args.setup_reps):
                for p in rotate(paths, i):
                    t0 = now()
                    self.ssh_ok(p.host, p.port, "true")
                    setup[p.key].append(now() - t0)
        self.sample_others()
        with CpuBusy() as busy:
            for i in range(self.args.ssh_reps):
                self.sample_others()
                for p in rotate(paths, i):
                    qc = QemuCpu(self.qemu_pid) if p.key != "host" else None
                    with open(self.ssh_file, "rb") as f:
                        if qc:
                            qc.start()
                        t0 = now()
                        self.ssh_ok(p.host, p.port, "busybox cat > /dev/null", stdin=f, timeout=timeout)
                        dt = now() - t0
                        if qc:
                            qc.stop()
                    res[p.key].append(dt)
                    if qc and qc.total is not None:
                        vcpu[p.key].append(qc.vcpu)
                    log(f"SSH bulk {i + 1}/{self.args.ssh_reps} {p.label:16}: {dt:.2f}s, {mbps(size, dt):.1f} MB/s"
                        + (f", QEMU busiest thread {qc.vcpu:.2f} cores" if qc and qc.vcpu is not None else ""))
        self.busy["ssh_setup"] = busy_setup.cores
        self.busy["ssh_bulk"] = busy.cores
        self.ssh_file.unlink()
        return {"size": size, "times": res, "setup": setup, "vcpu": vcpu}

    # ------------------------------------------------------------ 3. HTTP

    def http_get(self, host, port):
        req = f"GET /{WWW_FILE} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: hatch-bench-net\r\n\r\n".encode()
        t0 = now()
        s = socket.create_connection((host, port), timeout=10)
        try:
            s.sendall(req)
            raw = recv_to_eof(s)
            dt = now() - t0
        finally:
            s.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0]
        if not re.match(rb"HTTP/1\.[01] 200\b", status) or body != self.www_body:
            raise BenchError(f"GET http://{host}:{port}/{WWW_FILE}: {status!r}, {len(body)} B body")
        return dt, status.decode()

    def http_paths(self):
        return [Route("guest", "guest (bridge)", self.vm["guest_ip"], GUEST_HTTP_PORT),
                Route("host", "host loopback", "127.0.0.1", HOST_HTTP_PORT)]

    def http_latency(self):
        paths = self.http_paths()
        res = {p.key: [] for p in paths}
        for p in paths:
            for _ in range(10):
                _, self.facts[f"http_status_{p.key}"] = self.http_get(p.host, p.port)
        with CpuBusy() as busy:
            for i in range(self.args.requests):
                if i % 100 == 0:
                    self.sample_others()
                for p in rotate(paths, i):
                    time.sleep(self.args.gap_ms / 1000)
                    res[p.key].append(self.http_get(p.host, p.port)[0])
        self.busy["http"] = busy.cores
        for p in paths:
            st = stats(res[p.key])
            log(f"HTTP GET {p.label:16}: p50 {ms(st['p50']):.2f} ms, p99 {ms(st['p99']):.2f} ms")
        return res

    def wrk_run(self, c, p):
        url = f"http://{p.host}:{p.port}/{WWW_FILE}"
        argv = ["wrk", "-t1", f"-c{c}", f"-d{self.args.wrk_seconds}s", "--timeout", "5s", "--latency",
                "-H", "Connection: close", url]
        wp = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        busy = CpuBusy().start()
        qc = QemuCpu(self.qemu_pid).start() if p.key == "guest" else None
        text, _ = self.reap(wp, self.args.wrk_seconds + 60)
        busy.stop()
        if qc:
            qc.stop()
        text = text.decode(errors="replace")
        if wp.returncode != 0:
            raise BenchError(f"wrk {url} exited {wp.returncode}: {text}")
        r = parse_wrk(text)
        r["busy"] = busy.cores
        r["vcpu"] = qc.vcpu if qc else None
        return r

    def wrk(self):
        out = {}
        for c in self.args.wrk_conns:
            for p in self.http_paths():
                self.sample_others()
                r = self.wrk_run(c, p)
                out[(c, p.key)] = r
                log(f"wrk -c{c} {p.label:16}: {r['rps']:.0f} req/s, p50 {r['lat'].get('50%', float('nan')):.2f} ms, "
                    f"p99 {r['lat'].get('99%', float('nan')):.2f} ms, errors {r['errors']}, non-2xx {r['non2xx']}")
        self.sample_others()
        return out

    # ------------------------------------------------------------ 4. the guest filter

    def nft(self, *args, script=None):
        argv = ["nft", *args] if script is None else ["nft", "-f", "-"]
        p = subprocess.run(argv, input=script, capture_output=True, text=True, timeout=30)
        if p.returncode != 0:
            raise BenchError(f"nft {' '.join(args) or '-f -'}: {p.stderr.strip()}")
        return p.stdout

    def filter_prepare(self):
        """Scripts that take the guest filter (issue 10: the `bridge hatch`
        table, the `input` and `forward` chains of `ip hatch`) out and put the
        daemon's own rules back, each one atomic nft transaction. NAT and the
        SSH forwards stay, as before the filter existed."""
        ip_table = self.nft("list", "table", "ip", "hatch")
        chains = [c for c in ("input", "forward") if f"chain {c} {{" in ip_table]
        if "input" not in chains:
            raise BenchError(f"no guest filter in the daemon's ip table:\n{ip_table}")
        bridge = self.nft("list", "table", "bridge", "hatch")
        flush = "".join(f"flush chain ip hatch {c}\n" for c in chains)
        self.filter_off = "table bridge hatch\ndelete table bridge hatch\n" + flush
        self.filter_on = (flush + "".join(self.nft("list", "chain", "ip", "hatch", c) for c in chains)
                          + "table bridge hatch\ndelete table bridge hatch\n" + bridge)
        rules = [line for text in [bridge] + [self.nft("list", "chain", "ip", "hatch", c) for c in chains]
                 for line in text.splitlines() if line.startswith("\t\t") and not line.startswith("\t\ttype ")]
        self.facts["filter_rules"] = len(rules)

    def set_filter(self, on):
        self.nft(script=self.filter_on if on else self.filter_off)
        tables = self.nft("list", "tables")
        if ("table bridge hatch" in tables) != on:
            raise BenchError(f"the filter should be {'on' if on else 'off'}; tables:\n{tables}")

    def filter_ab(self):
        """TCP bulk and wrk into the guest with the filter and without,
        alternating (which goes first swaps every round)."""
        self.filter_prepare()
        total = self.args.tcp_mib << 20
        c = self.args.wrk_conns[0]
        guest = self.http_paths()[0]
        res = {"tcp": {"on": [], "off": []}, "wrk": {"on": [], "off": []}, "conns": c}
        try:
            for i in range(self.args.filter_reps):
                self.sample_others()
                order = ("on", "off") if i % 2 == 0 else ("off", "on")
                for mode in order:
                    self.set_filter(mode == "on")
                    dt, _, _ = self.tcp_run("guest", total, count=False)
                    res["tcp"][mode].append(mbps(total, dt))
                    log(f"filter {i + 1}/{self.args.filter_reps} {mode:3}: TCP {mbps(total, dt):8.1f} MB/s")
                for mode in order:
                    self.set_filter(mode == "on")
                    r = self.wrk_run(c, guest)
                    if r["errors"] or r["non2xx"]:
                        raise BenchError(f"wrk with the filter {mode}: errors {r['errors']}, non-2xx {r['non2xx']}")
                    res["wrk"][mode].append(r["rps"])
                    log(f"filter {i + 1}/{self.args.filter_reps} {mode:3}: wrk -c{c} {r['rps']:.0f} req/s")
        finally:
            self.set_filter(True)
        return res

    # ------------------------------------------------------------ all of it

    def run(self):
        self.check_namespace()
        self.hatchd.start("bench-net")
        public = self.make_key()
        self.create_vm(public)
        self.wait_ready()
        self.start_host_dropbear()
        self.start_httpds()
        self.gather_facts()
        self.wait_quiet()
        self.sample_others()
        self.meta_load_before = os.getloadavg()[0]
        t0 = time.monotonic()
        if self.args.filter_only:
            filt = self.filter_ab()
            self.sample_others()
            self.measure_s = time.monotonic() - t0
            return {"filter": filt}
        tcp = self.tcp()
        connects = self.ssh_connects()
        bulk = self.ssh_bulk()
        http = self.http_latency()
        wrk = self.wrk()
        filt = self.filter_ab()
        self.sample_others()
        self.measure_s = time.monotonic() - t0
        return {"tcp": tcp, "connects": connects, "bulk": bulk, "http": http, "wrk": wrk, "filter": filt}

    def cleanup(self):
        for p in list(self.procs):
            self.stop(p)
        self.hatchd.stop()
        kill_leftovers(self.tmp)
        kill_namespace_leftovers(self.check_namespace)


# ---------------------------------------------------------------- wrk output




# ---------------------------------------------------------------- report


def fmt_mbps(xs):
    st = stats(xs)
    return f"{st['median']:.1f} MB/s ({st['min']:.1f}-{st['max']:.1f})"


def fmt_lat(xs):
    st = stats(xs)
    return f"{ms(st['p50']):.2f} ms / {ms(st['p99']):.2f} ms"


def render_filter(args, f, fl):
    """The guest filter's table: each figure with the filter and without."""
    lines = ["### The guest filter: with against without", ""]
    add = lines.append
    add(f"The same guest paths with the daemon's guest filter (issue 10; {f['filter_rules']} rules: the "
        "`bridge hatch` table pinning the TAP to the VM's MAC and address, the `input` and `forward` chains "
        "of `ip hatch`) and with it taken out (NAT and the SSH forward kept), switched with one atomic `nft -f` "
        f"before each run; {args.filter_reps} rounds, the order swapping every round. Median (min-max) of the "
        "runs; ratio = without / with (above 1 is what the filter costs), of the medians and, less sensitive "
        "to a busy host, the median of each round's own ratio.")
    add("")
    add("| measurement | with the filter | without | ratio of medians | median of per-round ratios |")
    add("|---|---|---|---|---|")

    def row(label, on, off, fmt):
        a, b = stats(on), stats(off)
        paired = stats([y / x for x, y in zip(on, off)])["median"]
        add(f"| {label} | {fmt(a)} | {fmt(b)} | {b['median'] / a['median']:.3f} | {paired:.3f} |")

    row(f"TCP bulk, {args.tcp_mib} MiB into `busybox nc -l` over the bridge", fl["tcp"]["on"], fl["tcp"]["off"],
        lambda st: f"{st['median']:.1f} MB/s ({st['min']:.1f}-{st['max']:.1f})")
    row(f"HTTP requests/s, `wrk -t1 -c{fl['conns']} -d{args.wrk_seconds}s` into busybox httpd (bridge)",
        fl["wrk"]["on"], fl["wrk"]["off"], lambda st: f"{st['median']:.0f} req/s ({st['min']:.0f}-{st['max']:.0f})")
    add("")
    add("Every run (with / without): TCP MB/s " + ", ".join(
        f"{x:.1f}/{y:.1f}" for x, y in zip(fl["tcp"]["on"], fl["tcp"]["off"])) + "; wrk req/s " + ", ".join(
        f"{x:.0f}/{y:.0f}" for x, y in zip(fl["wrk"]["on"], fl["wrk"]["off"])) + ".")
    add("")
    return lines


def render(meta, bench, r):
    args = bench.args
    f = bench.facts
    vm = bench.vm
    ip, sport = vm["guest_ip"], vm["ssh_port"]
    tcp, con, bulk, http, wrk = r["tcp"], r["connects"], r["bulk"], r["http"], r["wrk"]
    lines = []
    add = lines.append
    q = bench.quiet
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements ({bench.measure_s:.0f} s)  ")
    add(f"Other QEMUs: waited {q['waited']:.0f} s (limit {q['limit']} s) until "
        + ("none other than ours ran" if q["left"] == 0 else f"the limit, {q['left']} still running")
        + f"; while measuring, {len(bench.others_seen)} other QEMU process(es) seen, at most {bench.others_max} "
        "at once (sampled between steps)  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{meta['accel']}`, machine `{meta['machine']}`, {meta['smp']} vCPU, "
        f"{meta['mem']} MiB (hatch's defaults), NIC `{meta['netdev']}` + `{meta['nic']}` (no vhost)  ")
    add(f"Guest: kernel {f['guest_kernel']}, CPU \"{f['guest_cpu']}\", {f['guest_busybox']}, "
        f"`{f['guest_dropbear_args']}` (from the image's rcS); eth0 MTU {f['guest_mtu']}, bridge `hatch0` "
        f"MTU {f['mtu_hatch0']}, host `lo` MTU {f['mtu_lo']}  ")
    add(f"Host side: {f['host_busybox']}, {f['dropbear']}, {f['ssh']}, {f['wrk']}  ")
    add(f"Network: the namespace `{bench.ns.rsplit('-', 1)[0]}-<pid>` has only `lo` and the daemon's bridge "
        f"`hatch0`; all traffic goes to 127.0.0.1 or to the guest's {ip} on that bridge.")
    add("")
    add(f"**The guest's CPU is emulated ({meta['accel'].upper()})**: every guest-side figure is bound by "
        "emulation — the guest kernel's TCP stack, virtio-net, dropbear's crypto and busybox all run as "
        "translated code in one QEMU vCPU thread — so the guest / loopback ratios below say how far an "
        "emulated guest is from native, not what the bridge or the DNAT cost. With hardware KVM the guest "
        "paths get much closer to the baseline. The forward vs direct comparison is the one that isolates "
        "hatch's own part (the nftables DNAT in the `output` chain plus masquerade).")
    add("")
    add("### Each path against its host-loopback baseline")
    add("")
    add("Same client, same server program and options on both sides; the baseline runs on the host's "
        "loopback inside the same namespace, interleaved with the guest runs. Throughput: median (min-max) "
        "of the timed runs, MB = 10^6 bytes. Latency: p50 / p99. Ratio = guest path / baseline.")
    add("")
    add("| measurement | path through hatch | figure | host-loopback baseline | figure | ratio |")
    add("|---|---|---|---|---|---|")
    g, h = stats(tcp["guest"]), stats(tcp["host"])
    add(f"| TCP bulk, {args.tcp_mib} MiB into `busybox nc -l`, {args.reps} runs | bridge `{ip}:{SINK_PORT}` | "
        f"{fmt_mbps(tcp['guest'])} | `127.0.0.1:{SINK_PORT}` | {fmt_mbps(tcp['host'])} | "
        f"{g['median'] / h['median']:.3f} |")
    ct = con["times"]
    hb = stats(ct["host"])
    for key, label in (("forward", f"forward `127.0.0.1:{sport}` -> `:22`"), ("direct", f"direct `{ip}:22`")):
        st = stats(ct[key])
        add(f"| SSH connect -> banner line, {len(ct[key])} connects | {label} | {fmt_lat(ct[key])} | "
            f"dropbear `127.0.0.1:{HOST_SSH_PORT}` | {fmt_lat(ct['host'])} | {st['p50'] / hb['p50']:.1f} (p50) |")
    su = bulk["setup"]
    hs = stats(su["host"])
    for key, label in (("forward", "forward"), ("direct", "direct")):
        st = stats(su[key])
        add(f"| SSH session `ssh ... true` (connect, kex, auth, exec), median (min-max), {len(su[key])} runs | "
            f"{label} | {ms(st['median']):.0f} ms ({ms(st['min']):.0f}-{ms(st['max']):.0f}) | dropbear loopback | "
            f"{ms(hs['median']):.0f} ms ({ms(hs['min']):.0f}-{ms(hs['max']):.0f}) | {st['median'] / hs['median']:.1f} |")
    size = bulk["size"]
    bt = {k: [mbps(size, t) for t in v] for k, v in bulk["times"].items()}
    hbk = stats(bt["host"])
    for key, label in (("forward", "forward"), ("direct", "direct")):
        st = stats(bt[key])
        add(f"| SSH bulk, `ssh ... 'busybox cat > /dev/null' < {args.ssh_mib} MiB`, whole command, "
            f"{len(bt[key])} runs | {label} | {fmt_mbps(bt[key])} | dropbear loopback | {fmt_mbps(bt['host'])} | "
            f"{st['median'] / hbk['median']:.3f} |")
    hh = stats(http["host"])
    gh = stats(http["guest"])
    add(f"| HTTP GET `/{WWW_FILE}` ({WWW_SIZE} B), fresh connection each, {len(http['guest'])} requests | "
        f"busybox httpd `{ip}:{GUEST_HTTP_PORT}` | {fmt_lat(http['guest'])} | busybox httpd "
        f"`127.0.0.1:{HOST_HTTP_PORT}` | {fmt_lat(http['host'])} | {gh['p50'] / hh['p50']:.1f} (p50) |")
    for c in args.wrk_conns:
        wg, wh = wrk[(c, "guest")], wrk[(c, "host")]
        add(f"| HTTP requests/s, `wrk -t1 -c{c} -d{args.wrk_seconds}s` | busybox httpd (bridge) | "
            f"{wg['rps']:.0f} req/s | busybox httpd loopback | {wh['rps']:.0f} req/s | {wg['rps'] / wh['rps']:.3f} |")
    add("")
    lines += render_filter(args, f, r["filter"])
    add("### Forward vs direct: what the SSH forward itself costs")
    add("")
    add("| measurement | forward | direct | forward / direct |")
    add("|---|---|---|---|")
    fw, di = stats(ct["forward"]), stats(ct["direct"])
    add(f"| connect -> banner p50 | {ms(fw['p50']):.2f} ms | {ms(di['p50']):.2f} ms | {fw['p50'] / di['p50']:.2f} |")
    add(f"| connect -> banner p99 | {ms(fw['p99']):.2f} ms | {ms(di['p99']):.2f} ms | {fw['p99'] / di['p99']:.2f} |")
    hf, hd = stats(con["handshake"]["forward"]), stats(con["handshake"]["direct"])
    add(f"| of which `connect()` (TCP handshake) p50 | {ms(hf['p50']):.3f} ms | {ms(hd['p50']):.3f} ms | "
        f"{hf['p50'] / hd['p50']:.2f} |")
    fs, ds = stats(su["forward"]), stats(su["direct"])
    add(f"| `ssh ... true` median | {ms(fs['median']):.0f} ms | {ms(ds['median']):.0f} ms | "
        f"{fs['median'] / ds['median']:.2f} |")
    fb, db = stats(bt["forward"]), stats(bt["direct"])
    add(f"| SSH bulk {args.ssh_mib} MiB median | {fb['median']:.1f} MB/s | {db['median']:.1f} MB/s | "
        f"{fb['median'] / db['median']:.2f} |")
    add("")
    add("### Details")
    add("")
    vc, qt = stats(tcp["vcpu"])["median"], stats(tcp["qemu"])["median"]
    clg, clh = stats(tcp["client_guest"])["median"], stats(tcp["client_host"])["median"]
    add(f"- TCP bulk, every run (MB/s): bridge {', '.join(f'{x:.1f}' for x in tcp['guest'])}; loopback "
        f"{', '.join(f'{x:.0f}' for x in tcp['host'])}. CPU during the bridge runs (medians, in cores of "
        f"{meta['cpus']}): QEMU's busiest thread (with one vCPU under TCG, normally the vCPU thread) {vc:.2f}, "
        f"all QEMU threads {qt:.2f}, the sending client (user + system time of this script) {clg:.2f}; "
        f"during the loopback runs the client used {clh:.2f}. One uncounted first run per path "
        f"piped nc into `wc -c`: all {tcp['total']:,} bytes arrived both ways.")
    setup_ms = {k: stats(v)["median"] for k, v in su.items()}
    net = {}
    for key in bt:
        per = [t - setup_ms[key] for t in bulk["times"][key]]
        net[key] = stats([mbps(size, t) for t in per if t > 0])["median"] if any(t > 0 for t in per) else float("nan")
    add(f"- SSH bulk, every run (s for {args.ssh_mib} MiB): "
        + "; ".join(f"{k} {', '.join(f'{t:.2f}' for t in bulk['times'][k])}" for k in ("forward", "direct", "host"))
        + f". QEMU's busiest thread during the guest runs: {stats(bulk['vcpu']['forward'] + bulk['vcpu']['direct'])['median']:.2f} "
        f"cores (median). Minus the median session set-up (`true`) of each path: forward {net['forward']:.1f}, direct "
        f"{net['direct']:.1f}, loopback {net['host']:.1f} MB/s. Client options: `-c {SSH_CIPHER} "
        f"-o KexAlgorithms={SSH_KEX} -o HostKeyAlgorithms={SSH_HOSTKEY} -o Compression=no`, no multiplexing; "
        f"dropbear's default receive window (24 KiB) on both servers. An uncounted first run per path ran "
        f"`busybox wc -c` remotely: all {size:,} bytes arrived.")
    fails = con["fails"]
    add(f"- SSH connect: {args.connects} rounds over the three paths (order rotating, {args.gap_ms} ms idle "
        f"before each connect so the guest has finished tearing down the previous one), after 10 uncounted "
        f"connects each; failed connects (no banner): forward {fails['forward']}, direct {fails['direct']}, "
        f"loopback {fails['host']}. Banners: guest `{con['banners'].get('direct', '?')}`, host "
        f"`{con['banners'].get('host', '?')}`. max: " + ", ".join(
            f"{k} {ms(stats(ct[k])['max']):.2f} ms" for k in ("forward", "direct", "host"))
        + ". `connect()` alone (SYN to established), p50: " + ", ".join(
            f"{k} {ms(stats(con['handshake'][k])['p50']):.3f} ms" for k in ("forward", "direct", "host"))
        + "; the rest is dropbear accepting, forking and writing its banner.")
    add(f"- HTTP GET (Python socket, HTTP/1.0, body checked, the two paths alternating with {args.gap_ms} ms "
        f"idle before each request): max guest {ms(gh['max']):.2f} ms, loopback "
        f"{ms(hh['max']):.2f} ms; status lines `{f.get('http_status_guest', '?')}` / `{f.get('http_status_host', '?')}`.")
    for c in args.wrk_conns:
        for key, label in (("guest", "guest"), ("host", "loopback")):
            w = wrk[(c, key)]
            lat = w["lat"]
            add(f"- wrk -c{c} {label}: {w['requests']} requests, {w['rps']:.0f} req/s, latency p50 "
                f"{lat.get('50%', float('nan')):.2f} ms / p90 {lat.get('90%', float('nan')):.2f} ms / p99 "
                f"{lat.get('99%', float('nan')):.2f} ms, socket errors {w['errors']}, non-2xx {w['non2xx']}, "
                f"host CPU busy {w['busy']:.2f} cores"
                + (f", QEMU's busiest thread {w['vcpu']:.2f} cores" if w.get("vcpu") is not None else ""))
    b = bench.busy
    add(f"- Host CPU busy (all processes, /proc/stat, of {meta['cpus']} cores): TCP runs {b['tcp']:.2f}, SSH "
        f"connects {b['connect']:.2f}, SSH set-ups {b['ssh_setup']:.2f}, SSH bulk {b['ssh_bulk']:.2f}, HTTP GETs "
        f"{b['http']:.2f}. The client, the loopback servers and QEMU share these cores.")
    add("")
    tg, th = stats(tcp["guest"])["median"], stats(tcp["host"])["median"]
    if vc >= 0.85:
        limit = (f"During the bridge transfers QEMU's busiest thread (the vCPU, normally) was busy {vc:.2f} of a "
                 "core: the emulated guest is what limits that path, not the bridge or the TAP")
    elif b["tcp"] >= 0.9 * meta["cpus"]:
        limit = (f"During the bridge transfers QEMU's busiest thread was busy only {vc:.2f} of a core, with all "
                 f"QEMU threads at {qt:.2f} and the client at {clg:.2f}, while the host's {meta['cpus']} cores "
                 f"were {b['tcp'] / meta['cpus'] * 100:.0f}% busy: the path is CPU-bound on this small host as a "
                 "whole (guest emulation, QEMU's packet copying, the client and the host's TCP stack share two "
                 "cores), not limited by the bridge")
    else:
        limit = (f"During the bridge transfers QEMU's busiest thread was busy only {vc:.2f} of a core and the host "
                 "was not saturated, so something besides CPU held that path back")
    setup_r = fs["median"] / ds["median"]
    bulk_r = fb["median"] / db["median"]
    small = abs(setup_r - 1) < 0.15 and abs(bulk_r - 1) < 0.15
    add(f"Reading it: the loopback baseline moves {th / tg:.1f}x the bytes per second of the bridge path "
        f"and answers a GET {gh['p50'] / hh['p50']:.1f}x sooner (p50). {limit}. `lo` also has a "
        f"{f['mtu_lo']}-byte MTU against {f['guest_mtu']} on the guest's link. The forward adds "
        f"{ms(fw['p50'] - di['p50']):+.2f} ms to a connect at p50 ({fw['p50'] / di['p50']:.2f}x direct), "
        f"{(setup_r - 1) * 100:+.0f}% to an SSH session set-up and {(bulk_r - 1) * 100:+.0f}% to bulk SSH "
        "throughput" + (": the DNAT costs little next to the emulated guest." if small else
                        "; differences that large need a second run before they are believed."))
    w1 = wrk.get((args.wrk_conns[0], "guest"), {}).get("lat", {}).get("50%")
    if w1 is not None:
        add("")
        add(f"A GET that reaches an idle guest ({args.gap_ms} ms after the last one) takes {ms(gh['p50']):.2f} ms "
            f"at p50, against {w1:.2f} ms inside wrk's back-to-back loop with {args.wrk_conns[0]} connection(s): "
            "the emulated guest answers faster while it is kept busy than from idle, so both figures are given.")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tcp-mib", type=int, default=256, help="MiB per TCP bulk run (default 256)")
    ap.add_argument("--reps", type=int, default=5, help="timed TCP bulk runs per path (default 5)")
    ap.add_argument("--connects", type=int, default=200, help="SSH banner connects per path (default 200)")
    ap.add_argument("--ssh-mib", type=int, default=64, help="MiB per SSH bulk run (default 64)")
    ap.add_argument("--ssh-reps", type=int, default=3, help="timed SSH bulk runs per path (default 3)")
    ap.add_argument("--setup-reps", type=int, default=5, help="`ssh ... true` runs per path (default 5)")
    ap.add_argument("--requests", type=int, default=500, help="HTTP GETs per path (default 500)")
    ap.add_argument("--gap-ms", type=int, default=20,
                    help="idle time before each SSH connect and HTTP GET, so the guest has finished the "
                         "previous one (default 20)")
    ap.add_argument("--wrk-seconds", type=int, default=10, help="duration of each wrk run (default 10)")
    ap.add_argument("--wrk-conns", default="1,4", help="wrk connection counts, comma-separated (default 1,4)")
    ap.add_argument("--filter-reps", type=int, default=4,
                    help="rounds of TCP bulk and wrk with the guest filter and without (default 4)")
    ap.add_argument("--filter-only", action="store_true",
                    help="measure only the guest filter (4.); prints its table, never updates the docs")
    ap.add_argument("--wait-quiet", type=int, default=600,
                    help="seconds to wait for other QEMUs to finish before measuring (default 600, 0: no wait)")
    ap.add_argument("--no-docs", action="store_true", help="do not update docs/BENCHMARKS.md")
    args = ap.parse_args()
    for name, lo, hi in (("tcp_mib", 1, 16384), ("reps", 1, 100), ("connects", 1, 100000), ("ssh_mib", 1, 4096),
                         ("ssh_reps", 1, 100), ("setup_reps", 1, 100), ("requests", 1, 100000), ("gap_ms", 0, 1000),
                         ("wrk_seconds", 1, 600), ("filter_reps", 1, 100), ("wait_quiet", 0, 3600)):
        if not lo <= getattr(args, name) <= hi:
            ap.error(f"--{name.replace('_', '-')} must be between {lo} and {hi}")
    try:
        args.wrk_conns = [int(x) for x in args.wrk_conns.split(",") if x.strip()]
    except ValueError:
        ap.error("--wrk-conns must be numbers separated by commas")
    if not args.wrk_conns or not all(1 <= c <= 1000 for c in args.wrk_conns):
        ap.error("--wrk-conns must be between 1 and 1000 each")
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/net (it makes the namespace and the temp dir)")

    bench = Net(args)
    meta = {
        "command": os.environ.get("HATCH_BENCH_COMMAND", "bench/net"),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": os.uname().release,
    }
    if os.environ.get("SUDO_USER"):
        meta["command"] = "sudo " + meta["command"]
    status, result = run_guarded(bench.run, bench.cleanup)
    if status != 0:
        return status
    cmd = bench.cmdline
    netdev = arg_after(cmd, "-netdev")
    nic = next((a for a in cmd if a.startswith("virtio-net")), "?")
    meta.update(
        load_before=bench.meta_load_before,
        load_after=os.getloadavg()[0],
        qemu=qemu_version(cmd[0]),
        accel=arg_after(cmd, "-accel"),
        machine=arg_after(cmd, "-M"),
        smp=arg_after(cmd, "-smp"),
        mem=arg_after(cmd, "-m"),
        netdev=re.sub(r"ifname=[^,]+", "ifname=ht...", netdev),
        nic=re.sub(r"mac=[^,]+", "mac=...", nic),
    )
    if args.filter_only:
        print("\n### bench/net --filter-only\n")
        print(f"Command: `{meta['command']}`  \nDate: {meta['date']}  \nHost: {meta['cpus']} cores, load average "
              f"{bench.meta_load_before:.2f} before / {meta['load_after']:.2f} after ({bench.measure_s:.0f} s); "
              f"{len(bench.others_seen)} other QEMU process(es) seen while measuring, at most {bench.others_max} "
              "at once\n")
        print("\n".join(render_filter(args, bench.facts, result["filter"])))
        return 0
    section = render(meta, bench, result)
    print("\n## bench/net\n")
    print(section)
    if not args.no_docs:
        write_docs(DOCS, "bench/net", section)
        log(f"updated {DOCS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
