#!/usr/bin/env python3
"""bench/proxy: hatch's reverse proxy against the same traffic sent straight to
the guest and through a reference proxy (HAProxy), and the first request to a
snapshotted VM (wake on request) against a plain restore followed by the same
request, in one run.

Run through `bench/proxy` (it installs wrk and haproxy if missing, builds, makes the
network namespace and the temp dir, and passes them in HATCH_BENCH_*); this
script runs inside that namespace and talks to the daemon on 127.0.0.1. It
starts the daemon (proxy on 127.0.0.1:8081, base domain `localhost`), creates
one VM with hatch's defaults plus `auto_sleep: false` and the user data
`mkdir -p /srv/www && echo hello > /srv/www/index.html` (so the image's rcS
starts busybox `httpd -p 80 -h /srv/www`), adds the route `bench` -> port 80,
and checks that /index.html answers `hello` both ways. Unless --no-reference,
it also runs HAProxy (the haproxy binary in the foreground, `-db`, with a config
it writes into the temp dir; never the system service) on 127.0.0.1:8082 in
HTTP mode with one server, GUEST_IP:80, `nbthread 1` (--haproxy-threads) and
`option http-keep-alive` (--haproxy-mode), and checks that it answers `hello`
too; it stops HAProxy once the wrk runs are done. Then, each `--runs` times
(median, min-max), the paths interleaved, rotating which goes first:

  1. wrk, the same command line against http://GUEST_IP:80/index.html (direct,
     over the daemon's bridge) and http://127.0.0.1:8081/index.html with
     `Host: bench.localhost` (through the proxy), for each load: C connections
     (`--connections`, default 16, 2 threads), 1 connection, and 1 connection
     with `Connection: close` (a new client connection per request on both
     paths); the same command line against http://127.0.0.1:8082/index.html
     (HAProxy, the reference: what a proxy that is not hatch's reaches on
     this host and guest). requests/s, p50 and p99 from `wrk --latency`, socket errors and
     non-2xx, the TCP connections opened per request in the namespace (wrk's
     and the proxy's: whether the guest or the proxy keeps connections open
     shows there), SYN retransmits, and the CPU time of the daemon, HAProxy,
     QEMU (its busiest thread: the vCPU) and wrk over each run, from /proc.
  2. single GETs on an idle guest (`--requests`, fresh connection each, 20 ms
     apart, the two paths alternating): the latency of one request outside a
     load loop.
  3. first wake: `POST /vms/{id}/snapshot` (201: the VM is `snapshotted`, its
     QEMU gone), then one GET through the proxy, timed from connect() until
     the whole 200 response is read (the proxy restores the VM, then
     forwards); against: a new snapshot, then `POST /vms/{id}/restore`
     (returns once the VM runs) and the same GET straight to the guest, timed
     from the restore request until that 200. Each snapshot is deleted after
     its run. Before every timed step: `sync` and 0.5 s of quiet.

Before measuring it waits (bounded) until no QEMU but its own runs on the host,
and it records how many others it saw while measuring.

Output: plain tables on stdout; with --markdown the `## Proxy` section for
docs/BENCHMARKS.md instead, also written there unless --no-docs.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.dont_write_bytecode = True  # no bench/__pycache__ in the work tree
sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    check_own_namespace,
    DaemonBench, Qmp, check_ranges, run_meta,
    kill_namespace_leftovers, parse_wrk,
    add_heading, add_table, DOCS, READY, BenchError, CpuBusy, Daemon, arg_after, kill_leftovers, log,
    ms, one_request, other_qemu_pids, proc_cmdline, qemu_version, run_guarded,
    stats, write_docs,
)

PROXY_HOST = "127.0.0.1"
PROXY_PORT = 8081
# The reference proxy (HAProxy) listens here, beside the daemon's proxy.
REF_PORT = 8082
REF_START_TIMEOUT_S = 15.0
BASE_DOMAIN = "localhost"
# A failed run's QMP questions to its guest's QEMU.
QMP_TIMEOUT_S = 5.0
SUBDOMAIN = "bench"
VHOST = f"{SUBDOMAIN}.{BASE_DOMAIN}"
GUEST_PORT = 80
PATH = "/index.html"
BODY = b"hello\n"
USER_DATA = "#!/bin/sh\nmkdir -p /srv/www && echo hello > /srv/www/index.html\n"
BOOT_TIMEOUT_S = 180.0
HTTP_TIMEOUT_S = 120.0
GAP_S = 0.02
DOC_SECTION = "Proxy"
CLK_TCK = os.sysconf("SC_CLK_TCK")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?Z\s+(\w+)\s+([\w:]+): (.*)$")
RPS_TARGET = 0.95
# A vCPU thread busier than this (of one core) is called saturated in the reading.
VCPU_SATURATED = 0.9
# Direct runs of one load that differ by more than this are called noisy in the reading.
SPREAD_NOISY_PCT = 10
IDLE_CORES = 0.5
P99_TARGET_MS = 1.0


def now():
    return time.monotonic()


def rotate(xs, i):
    k = i % len(xs)
    return xs[k:] + xs[:k]


def cpu_split(pid):
    """(user, system) CPU seconds of a process (all its threads); None if it is gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(f[11]) / CLK_TCK, int(f[12]) / CLK_TCK


def cpu_seconds(pid):
    """user + system CPU seconds of a process; None if it is gone."""
    c = cpu_split(pid)
    return None if c is None else c[0] + c[1]


def tcp_ext(*names):
    """Counters of this network namespace's TcpExt (/proc/net/netstat): {name: value}."""
    rows = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines() if line.startswith("TcpExt:")]
    table = dict(zip(rows[0][1:], (int(x) for x in rows[1][1:]))) if len(rows) >= 2 else {}
    return {n: table.get(n) for n in names}


SYN_COUNTERS = ("TCPSynRetrans", "ListenOverflows", "ListenDrops")


def active_opens():
    """TCP connects made in this network namespace so far (Tcp ActiveOpens, /proc/net/snmp)."""
    rows = [line.split() for line in Path("/proc/net/snmp").read_text().splitlines() if line.startswith("Tcp:")]
    return int(dict(zip(rows[0][1:], rows[1][1:]))["ActiveOpens"])


def time_wait_to(ip, port):
    """Sockets of this network namespace in TIME_WAIT towards ip:port (/proc/net/tcp, state 06)."""
    a, b, c, d = (int(x) for x in ip.split("."))
    remote = f"{d:02X}{c:02X}{b:02X}{a:02X}:{port:04X}"
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if len(f) > 3 and f[2] == remote and f[3] == "06":
            n += 1
    return n


def tap_packets(tap):
    """Frames through `tap` so far, received plus sent (/sys/class/net), or None."""
    if not tap:
        return None
    try:
        base = Path("/sys/class/net") / tap / "statistics"
        return int((base / "rx_packets").read_text()) + int((base / "tx_packets").read_text())
    except (OSError, ValueError):
        return None


def per_request_us(r, cpu="daemon_s"):
    """The daemon's (or with cpu="ref_s", HAProxy's) CPU time over a wrk run / the requests wrk completed, in
    microseconds."""
    return r[cpu] / r["requests"] * 1e6 if r["requests"] and r.get(cpu) is not None else None


def thread_cpu(pid):
    """{tid: utime + stime seconds} for every thread of pid."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            f = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[tid] = (int(f[11]) + int(f[12])) / CLK_TCK
    return out


def steal_jiffies():
    """(steal, total) jiffies of all CPUs: time the hypervisor under this machine gave to others."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return f[7], sum(f[:8])


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


class Meter:
    """CPU over an interval, in cores: the host, the daemon, HAProxy, QEMU (busiest thread, all), reaped children."""

    def __init__(self, daemon_pid, qemu_pid, guest, ref_pid=None, tap=None):
        self.dpid, self.qpid, self.guest, self.rpid, self.tap = daemon_pid, qemu_pid, guest, ref_pid, tap

    def start(self):
        self.busy = CpuBusy().start()
        self.t0 = now()
        self.d0 = cpu_split(self.dpid)
        self.r0 = cpu_split(self.rpid) if self.rpid else None
        self.q0 = thread_cpu(self.qpid)
        self.c0 = children_cpu()
        self.n0 = tcp_ext(*SYN_COUNTERS)
        self.o0 = active_opens()
        self.s0 = steal_jiffies()
        self.p0 = tap_packets(self.tap)
        return self

    def stop(self):
        """After the child being measured was reaped."""
        self.busy.stop()
        dt = now() - self.t0
        d1, q1, c1 = cpu_split(self.dpid), thread_cpu(self.qpid), children_cpu()
        r1 = cpu_split(self.rpid) if self.rpid else None
        ref = sum(r1) - sum(self.r0) if r1 is not None and self.r0 is not None else None
        n1 = tcp_ext(*SYN_COUNTERS)
        opens = active_opens() - self.o0
        s1 = steal_jiffies()
        p1 = tap_packets(self.tap)
        packets = p1 - self.p0 if p1 is not None and self.p0 is not None else None
        steal = (s1[0] - self.s0[0]) / (s1[1] - self.s0[1]) * (os.cpu_count() or 1) if s1[1] > self.s0[1] else None
        used = [sec - self.q0.get(tid, 0.0) for tid, sec in q1.items()]
        ok = d1 is not None and self.d0 is not None
        return {
            "secs": dt,
            "host": self.busy.cores,
            "steal": steal,
            "daemon_s": sum(d1) - sum(self.d0) if ok else None,
            "daemon": (sum(d1) - sum(self.d0)) / dt if ok else None,
            "daemon_user": (d1[0] - self.d0[0]) / dt if ok else None,
            "daemon_sys": (d1[1] - self.d0[1]) / dt if ok else None,
            # The reference proxy (HAProxy, all its threads), when one runs.
            "ref_s": ref,
            "ref": ref / dt if ref is not None else None,
            "ref_user": (r1[0] - self.r0[0]) / dt if ref is not None else None,
            "ref_sys": (r1[1] - self.r0[1]) / dt if ref is not None else None,
            "net": {k: (n1[k] - self.n0[k]) if n1[k] is not None and self.n0[k] is not None else None
                    for k in SYN_COUNTERS},
            "vcpu": max(used) / dt if used else None,
            "qemu": sum(used) / dt if used else None,
            "client": (c1 - self.c0) / dt,
            "opens": opens,
            # Frames through the guest's TAP, both ways: what the guest's own network stack handled.
            "tap_packets": packets,
            # Each one holds a local port towards the guest for 60 s: enough of them and every
            # connect() the proxy makes scans the ephemeral range for a free port.
            "time_wait": time_wait_to(*self.guest),
        }


# ---------------------------------------------------------------- HTTP by hand


def recv_to_eof(s):
    chunks = []
    first = None
    while True:
        d = s.recv(65536)
        if first is None:
            first = now()
        if not d:
            return b"".join(chunks), first
        chunks.append(d)


def http_get(host, port, vhost=None, timeout=HTTP_TIMEOUT_S):
    """One GET on a fresh connection, `Connection: close`, read to EOF; checks 200 + body.

    Returns (seconds from connect() to the last byte, seconds to the first byte, status line)."""
    req = (f"GET {PATH} HTTP/1.1\r\nHost: {vhost or f'{host}:{port}'}\r\nUser-Agent: hatch-bench-proxy\r\n"
           f"Connection: close\r\n\r\n").encode()
    t0 = now()
    s = socket.create_connection((host, port), timeout=timeout)
    tc = now()
    try:
        s.sendall(req)
        raw, first = recv_to_eof(s)
        t1 = now()
    finally:
        s.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    status = head.split(b"\r\n", 1)[0].decode(errors="replace")
    if not re.match(r"HTTP/1\.[01] 200\b", status) or body != BODY:
        raise BenchError(f"GET {PATH} via {host}:{port} (Host {vhost}): {status!r}, body {body[:300]!r}")
    return t1 - t0, first - t0, status, tc - t0


# ---------------------------------------------------------------- wrk


class Load:
    def __init__(self, key, threads, conns, close):
        self.key, self.threads, self.conns, self.close = key, threads, conns, close

    def label(self, seconds):
        return (f"`wrk -t{self.threads} -c{self.conns} -d{seconds}s`"
                + (" + `Connection: close`" if self.close else ""))


class Target:
    def __init__(self, key, label, url, vhost):
        self.key, self.label, self.url, self.vhost = key, label, url, vhost


# ---------------------------------------------------------------- the benchmark


class Bench(DaemonBench):
    def __init__(self, args):
        self.args = args
        self.tmp = Path(os.environ["HATCH_BENCH_TMP"])
        self.ns = os.environ.get("HATCH_BENCH_NS", "")
        self.hatchd = Daemon(self.tmp, os.environ["HATCH_BENCH_BIN"], os.environ["HATCH_BENCH_IMAGE"])
        self.procs = []
        # Set once every measurement is done: a run that ends before keeps its evidence.
        self.finished = False
        self.ref = None  # HAProxy's Popen while it runs
        self.vm = None
        self.vm_id = None
        self.ip = None
        self.qemu_pid = None
        self.cmdline = None
        self.facts = {}
        self.loads = [Load("many", min(2, args.connections), args.connections, False),
                      Load("one", 1, 1, False)]
        if not args.no_close:
            self.loads.append(Load("one-close", 1, 1, True))
        self.wrk = {}  # (load key, path key) -> [parsed wrk + cpu]
        self.single = {"direct": [], "proxy": []}
        self.wake = []
        self.plain = []
        self.snaps = []
        self.others_seen = set()
        self.others_max = 0
        self.gated = []
        self.quiet = {}
        self.load_before = None
        self.busy = None
        self.measure_s = None

    def spawn(self, argv, **kw):
        kw.setdefault("stdin", subprocess.DEVNULL)
        p = subprocess.Popen(argv, process_group=0, **kw)
        self.procs.append(p)
        return p

    def reap(self, p, timeout):
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            out, _ = p.communicate(timeout=10)
        if p in self.procs:
            self.procs.remove(p)
        return out

    # ------------------------------------------------------------ setup

    def check_namespace(self):
        check_own_namespace(self.ns, "proxy")

    def start_daemon(self):
        # Daemon.start passes our environment on: pin the proxy settings this script relies on,
        # and keep the idle monitor from putting the VM to sleep between the steps.
        os.environ.update(HATCH_PROXY_ADDR=f"{PROXY_HOST}:{PROXY_PORT}", HATCH_PROXY_BASE_DOMAIN=BASE_DOMAIN,
                          HATCH_IDLE_TIMEOUT="off")
        for k in ("HATCH_PROXY_TIMEOUT", "HATCH_PROXY_WAKE_TIMEOUT"):
            os.environ.pop(k, None)
        self.hatchd.start("bench-proxy")

    def create_vm(self):
        self.vm = self.api("POST", "/vms", {"user_data": USER_DATA, "auto_sleep": False,
                                            "mem_mib": self.args.mem_mib}, expect=(201,))
        self.vm_id = self.vm["id"]
        self.hatchd.live_vms.add(self.vm_id)
        self.ip = self.vm.get("guest_ip")
        if not self.ip:
            raise BenchError(f"the VM has no guest_ip: {self.vm}")
        log(f"VM {self.vm_id}: guest_ip {self.ip}")
        text, waited = self.wait_ready(self.vm_id, BOOT_TIMEOUT_S)
        ready = next((line for line in text.decode(errors="replace").splitlines()
                      if READY.decode() in line), "").strip()
        if "warning" in text.decode(errors="replace"):
            self.facts["warnings"] = [line.strip() for line in text.decode(errors="replace").splitlines()
                                      if "hatch-guest: warning" in line]
        self.facts["ready"] = ready
        log(f"guest ready after {waited:.1f}s")
        self.refresh_qemu()
        deadline = now() + 30
        while True:
            try:
                self.facts["direct_status"] = http_get(self.ip, GUEST_PORT, timeout=5)[2]
                break
            except (OSError, BenchError) as e:
                if now() > deadline:
                    raise BenchError(f"the guest's httpd does not serve {PATH}: {e}")
                time.sleep(0.2)

    def refresh_qemu(self):
        """The VM's QEMU changes with every restore."""
        self.qemu_pid = self.hatchd.vmm_pid(self.vm_id)
        cmd = proc_cmdline(self.qemu_pid) if self.qemu_pid else None
        if not cmd:
            raise BenchError(f"cannot read the QEMU command line of {self.vm_id}")
        self.cmdline = self.cmdline or cmd

    def create_route(self):
        r = self.api("POST", f"/vms/{self.vm_id}/routes", {"target_port": GUEST_PORT, "subdomain": SUBDOMAIN},
                     expect=(201,))
        self.facts["route"] = r
        self.facts["proxy_status"] = http_get(PROXY_HOST, PROXY_PORT, VHOST, timeout=10)[2]
        log(f"route {r.get('id')}: http://{VHOST}:{PROXY_PORT}{PATH} -> {self.ip}:{GUEST_PORT} answers")

    def gather_facts(self):
        w = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        self.facts["wrk"] = (w.stdout + w.stderr).strip().splitlines()[0].split(" Copyright")[0]
        for dev in ("lo", "hatch0"):
            try:
                self.facts[f"mtu_{dev}"] = Path(f"/sys/class/net/{dev}/mtu").read_text().strip()
            except OSError:
                self.facts[f"mtu_{dev}"] = "?"
        # The guest's response headers, as wrk sees them on the direct path.
        s = socket.create_connection((self.ip, GUEST_PORT), timeout=10)
        try:
            s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: {self.ip}\r\n\r\n".encode())
            raw, _ = recv_to_eof(s)
        finally:
            s.close()
        head = raw.partition(b"\r\n\r\n")[0].decode(errors="replace").splitlines()
        self.facts["guest_connection"] = next((h.split(":", 1)[1].strip() for h in head
                                               if h.lower().startswith("connection:")), "-")
        self.facts["guest_status"] = head[0] if head else "?"

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
        if others:
            log(f"still {len(others)} other QEMU(s) after {limit}s; measuring anyway (recorded)")
        else:
            log(f"no other QEMU running (waited {self.quiet['waited']:.0f}s)")
        # Builds and tests of other users share the 2 cores too: wait (same limit) until the host,
        # our idle guest included, keeps less than IDLE_CORES busy over 5 s.
        t1 = now()
        while True:
            with CpuBusy() as busy:
                time.sleep(5)
            if busy.cores is None or busy.cores < IDLE_CORES or now() - t0 >= limit:
                break
            log(f"host CPU busy {busy.cores:.2f} cores (other work); waiting for < {IDLE_CORES}")
        self.quiet.update(idle_waited=now() - t1, idle_cores=busy.cores)
        log(f"host CPU busy {busy.cores:.2f} cores over 5 s before measuring (waited {now() - t1:.0f}s)")

    def gate(self):
        """Before each interleaved pair: waits (at most --pair-wait s) until no other QEMU runs."""
        t0 = now()
        others = other_qemu_pids(self.tmp)
        self.others_seen |= others
        while others and now() - t0 < self.args.pair_wait:
            time.sleep(1)
            others = other_qemu_pids(self.tmp)
            self.others_seen |= others
        waited = now() - t0
        self.gated.append(waited)
        if waited >= 1:
            log(f"waited {waited:.0f}s for other QEMUs to finish" + (f"; still {len(others)}" if others else ""))

    # ------------------------------------------------------------ the reference proxy

    def haproxy_config(self):
        """HAProxy in HTTP mode on its own loopback port, forwarding to the guest as hatch's proxy does."""
        threads = self.args.haproxy_threads or os.cpu_count() or 1
        # The guest's httpd closes after every answer: keep-alive towards it is never reused, so the
        # choice only decides whether HAProxy itself asks for the close or waits for the guest's. Both
        # keep the client's connection alive, as hatch's proxy does. Keep-alive is HAProxy's default; the
        # two measured alike.
        server_side = "http-server-close" if self.args.haproxy_mode == "server-close" else "http-keep-alive"
        self.facts["haproxy_threads"] = threads
        self.facts["haproxy_option"] = server_side
        return "\n".join([
            "global",
            f"    nbthread {threads}",
            "    maxconn 4096",
            "",
            "defaults",
            "    mode http",
            f"    option {server_side}",
            "    timeout connect 5s",
            "    timeout client 30s",
            "    timeout server 30s",
            "",
            "frontend bench",
            f"    bind {PROXY_HOST}:{REF_PORT}",
            "    default_backend guest",
            "",
            "backend guest",
            f"    server guest {self.ip}:{GUEST_PORT}",
            "",
        ])

    def start_haproxy(self):
        """Runs the haproxy binary in the foreground (`-db`) with a config in the temp dir: no service."""
        v = subprocess.run(["haproxy", "-v"], capture_output=True, text=True)
        self.facts["haproxy"] = (v.stdout.splitlines() or ["?"])[0].split(" - ")[0]
        cfg = self.tmp / "haproxy.cfg"
        cfg.write_text(self.haproxy_config())
        check = subprocess.run(["haproxy", "-c", "-q", "-f", str(cfg)], capture_output=True, text=True)
        if check.returncode != 0:
            raise BenchError(f"haproxy -c -f {cfg}: {check.stdout}{check.stderr}")
        self.ref_log = self.tmp / "haproxy.log"
        with open(self.ref_log, "wb") as out:
            self.ref = self.spawn(["haproxy", "-db", "-f", str(cfg)], stdout=out, stderr=subprocess.STDOUT)
        deadline = now() + REF_START_TIMEOUT_S
        while True:
            if self.ref.poll() is not None:
                raise BenchError(f"haproxy exited {self.ref.returncode}: {self.ref_log.read_text(errors='replace')}")
            try:
                self.facts["haproxy_status"] = http_get(PROXY_HOST, REF_PORT, VHOST, timeout=5)[2]
                break
            except (OSError, BenchError) as e:
                if now() > deadline:
                    raise BenchError(f"haproxy on {PROXY_HOST}:{REF_PORT} does not answer: {e}\n"
                                     f"{self.ref_log.read_text(errors='replace')}")
                time.sleep(0.1)
        log(f"HAProxy (pid {self.ref.pid}, nbthread {self.facts['haproxy_threads']}, "
            f"option {self.facts['haproxy_option']}) on {PROXY_HOST}:{REF_PORT} -> {self.ip}:{GUEST_PORT} answers")

    def stop_haproxy(self):
        """Once the wrk runs are done: the later steps run without it, as before."""
        if self.ref is None:
            return
        self.ref.terminate()
        self.reap(self.ref, 10)
        self.ref = None

    # ------------------------------------------------------------ 1. wrk

    def paths(self):
        paths = [Target("direct", f"direct `{self.ip}:{GUEST_PORT}`", f"http://{self.ip}:{GUEST_PORT}{PATH}", None),
                 Target("proxy", f"proxy `{PROXY_HOST}:{PROXY_PORT}`, Host `{VHOST}`",
                        f"http://{PROXY_HOST}:{PROXY_PORT}{PATH}", VHOST)]
        if self.ref is not None:
            # The same command line as through hatch's proxy, Host header included.
            paths.append(Target("haproxy", f"HAProxy `{PROXY_HOST}:{REF_PORT}`, Host `{VHOST}`",
                                f"http://{PROXY_HOST}:{REF_PORT}{PATH}", VHOST))
        return paths

    def wrk_once(self, load, path, seconds):
        argv = ["wrk", f"-t{load.threads}", f"-c{load.conns}", f"-d{seconds}s", "--timeout", "5s", "--latency"]
        if path.vhost:
            argv += ["-H", f"Host: {path.vhost}"]
        if load.close:
            argv += ["-H", "Connection: close"]
        argv.append(path.url)
        others = other_qemu_pids(self.tmp)
        meter = Meter(self.hatchd.proc.pid, self.qemu_pid, (self.ip, GUEST_PORT),
                      self.ref.pid if self.ref is not None else None, self.vm.get("tap_name")).start()
        p = self.spawn(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        text = self.reap(p, seconds + 60).decode(errors="replace")
        cpu = meter.stop()
        others |= other_qemu_pids(self.tmp)
        self.others_seen |= others
        self.others_max = max(self.others_max, len(others))
        if p.returncode != 0:
            raise BenchError(f"{' '.join(argv)} exited {p.returncode}: {text}")
        r = parse_wrk(text)
        r.update(cpu)
        r["argv"] = argv
        r["others"] = len(others)
        return r

    def wrk_runs(self):
        paths = self.paths()
        log("warm-up: 2 s of wrk per path and load (not counted)")
        for load in self.loads:
            for p in paths:
                self.wrk_once(load, p, 2)
        for i in range(self.args.runs):
            for load in self.loads:
                self.gate()
                for p in rotate(paths, i):
                    time.sleep(1)  # the guest finishes the connections of the run before
                    r = self.wrk_once(load, p, self.args.duration)
                    self.wrk.setdefault((load.key, p.key), []).append(r)
                    log(f"run {i + 1}/{self.args.runs} -c{load.conns}{' close' if load.close else ''} "
                        f"{p.key:7}: {r['rps']:7.1f} req/s, p50 {r['lat'].get('50%', float('nan')):.2f} ms, "
                        f"p99 {r['lat'].get('99%', float('nan')):.2f} ms, errors {r['errors']}, non-2xx "
                        f"{r['non2xx']}; daemon {fnum(per_request_us(r), '{:.0f}')} us CPU per request, "
                        + (f"HAProxy {fnum(per_request_us(r, 'ref_s'), '{:.0f}')} us, " if p.key == "haproxy" else "")
                        + f"{r['time_wait']} TIME_WAIT to the guest, "
                        + f"{fnum(r['tap_packets'] / r['requests'] if r['tap_packets'] is not None and r['requests'] else None, '{:.1f}')} "
                        + f"guest TAP frames per request; cores: daemon {r['daemon'] or 0:.2f}, "
                        + (f"HAProxy {r['ref'] or 0:.2f}, " if r["ref"] is not None else "")
                        + f"vCPU {r['vcpu'] or 0:.2f}, wrk {r['client']:.2f}, host {r['host'] or 0:.2f}, "
                        f"steal {r['steal'] or 0:.2f}, other QEMUs {r['others']}")

    # ------------------------------------------------------------ 2. single GETs on an idle guest

    def single_gets(self):
        paths = [("direct", self.ip, GUEST_PORT, None), ("proxy", PROXY_HOST, PROXY_PORT, VHOST)]
        for _ in range(5):
            for _, host, port, vhost in paths:
                http_get(host, port, vhost)
        for i in range(self.args.requests):
            for key, host, port, vhost in rotate(paths, i):
                time.sleep(GAP_S)
                total, first, _, conn = http_get(host, port, vhost)
                self.single[key].append((total, first, conn))
        for key in ("direct", "proxy"):
            st = stats([t[0] for t in self.single[key]])
            log(f"single GETs {key:6}: p50 {ms(st['p50']):.2f} ms, p99 {ms(st['p99']):.2f} ms")

    # ------------------------------------------------------------ 3. first wake

    def settle(self):
        os.sync()
        time.sleep(0.5)

    def state(self):
        return self.api("GET", f"/vms/{self.vm_id}")["state"]

    def snapshot(self):
        self.settle()
        t0 = now()
        snap = self.api("POST", f"/vms/{self.vm_id}/snapshot", expect=(201,))
        t = now() - t0
        st = self.state()
        if st != "snapshotted":
            raise BenchError(f"after the snapshot the VM is {st!r}, expected snapshotted")
        if self.hatchd.vmm_pid(self.vm_id) is not None:
            raise BenchError("the VM's QEMU still runs after the snapshot")
        self.snaps.append({"secs": t, "size": snap.get("size_bytes")})
        return snap, t

    def log_since(self, offset):
        try:
            with open(self.hatchd.log_path, "rb") as f:
                f.seek(offset)
                return ANSI.sub("", f.read().decode(errors="replace"))
        except OSError:
            return ""

    def woke_ms(self, text):
        """`ms` of the daemon's `vm woke on request` line."""
        m = re.search(r"vm woke on request.*?\bms=(\d+)", text)
        return int(m.group(1)) / 1000 if m else None

    def log_events(self, text, wall0):
        """[(message, seconds after wall0)] of the daemon's log lines."""
        out = []
        for line in text.splitlines():
            m = LOG_LINE.match(line)
            if not m:
                continue
            frac = (m.group(2) or ".0")[:7]
            ts = datetime.datetime.fromisoformat(m.group(1) + frac + "+00:00").timestamp()
            msg = re.split(r" \w+=", m.group(5), maxsplit=1)[0].strip()
            to = re.search(r"\bto=(\w+)", m.group(5))
            out.append((f"{msg} -> {to.group(1)}" if to else msg, ts - wall0))
        return out

    def after(self, snap):
        st = self.state()
        if st != "running":
            raise BenchError(f"the VM is {st!r} after the wake/restore, expected running")
        self.refresh_qemu()
        http_get(PROXY_HOST, PROXY_PORT, VHOST)
        self.api("DELETE", f"/snapshots/{snap['id']}")

    def wake_once(self):
        snap, snap_s = self.snapshot()
        self.settle()
        off = os.stat(self.hatchd.log_path).st_size
        d0 = cpu_seconds(self.hatchd.proc.pid)
        wall0 = time.time()
        o0 = active_opens()
        total, first, status, conn = http_get(PROXY_HOST, PROXY_PORT, VHOST)
        d1 = cpu_seconds(self.hatchd.proc.pid)
        opens = active_opens() - o0
        time.sleep(0.2)
        text = self.log_since(off)
        r = {"total": total, "first_byte": first, "connect": conn, "status": status, "snapshot": snap_s,
             "daemon_ms": self.woke_ms(text), "log": self.log_events(text, wall0), "daemon_cpu": d1 - d0,
             "opens": opens,
             "size": snap.get("size_bytes")}
        # The same request to the VM now running: what the wake added.
        self.settle()
        r["running"] = http_get(PROXY_HOST, PROXY_PORT, VHOST)[0]
        self.after(snap)
        return r

    def plain_once(self):
        snap, snap_s = self.snapshot()
        self.settle()
        off = os.stat(self.hatchd.log_path).st_size
        d0 = cpu_seconds(self.hatchd.proc.pid)
        wall0 = time.time()
        o0 = active_opens()
        t0 = now()
        status, raw = one_request(self.key, "POST", f"/vms/{self.vm_id}/restore", None, timeout=300)
        t_api = now() - t0
        if status != 200:
            raise BenchError(f"POST /vms/{self.vm_id}/restore: {status} {raw[:500]!r}\n{self.hatchd.tail()}")
        retries = 0
        while True:
            try:
                get, _, st, conn = http_get(self.ip, GUEST_PORT)
                break
            except (OSError, BenchError) as e:
                retries += 1
                if now() - t0 > HTTP_TIMEOUT_S:
                    raise BenchError(f"the restored guest does not answer: {e}")
                time.sleep(0.01)
        total = now() - t0
        d1 = cpu_seconds(self.hatchd.proc.pid)
        opens = active_opens() - o0
        time.sleep(0.2)
        r = {"total": total, "restore": t_api, "get": get, "connect": conn, "retries": retries, "status": st,
             "snapshot": snap_s, "daemon_cpu": d1 - d0, "size": snap.get("size_bytes"), "opens": opens,
             "log": self.log_events(self.log_since(off), wall0)}
        self.after(snap)
        return r

    def wake_runs(self):
        for i in range(self.args.runs):
            self.gate()
            for which in rotate(["wake", "plain"], i):
                if which == "wake":
                    r = self.wake_once()
                    self.wake.append(r)
                    log(f"run {i + 1}/{self.args.runs} wake : GET through the proxy {r['total']:.3f}s "
                        f"(first byte {r['first_byte']:.3f}s, daemon's wake {r['daemon_ms'] or 0:.3f}s); "
                        f"snapshot before {r['snapshot']:.3f}s")
                else:
                    r = self.plain_once()
                    self.plain.append(r)
                    log(f"run {i + 1}/{self.args.runs} plain: restore {r['restore']:.3f}s + GET {ms(r['get']):.1f} ms "
                        f"= {r['total']:.3f}s ({r['retries']} retries); snapshot before {r['snapshot']:.3f}s")

    # ------------------------------------------------------------ all of it

    def run(self):
        self.check_namespace()
        self.start_daemon()
        self.create_vm()
        self.create_route()
        if not self.args.no_reference:
            self.start_haproxy()
        self.gather_facts()
        self.wait_quiet()
        self.sample_others()
        self.load_before = os.getloadavg()[0]
        t0 = now()
        busy = CpuBusy().start()
        log(f"wrk: {len(self.loads)} loads x {'/'.join(p.key for p in self.paths())}, "
            f"{self.args.runs} runs of {self.args.duration}s")
        self.wrk_runs()
        self.stop_haproxy()
        log(f"single GETs on an idle guest: {self.args.requests} per path")
        self.single_gets()
        log(f"first wake vs restore + GET: {self.args.runs} runs each")
        self.wake_runs()
        busy.stop()
        self.busy = busy.cores
        self.sample_others()
        self.measure_s = now() - t0
        self.finished = True

    def cleanup(self):
        for p in list(self.procs):
            if p.poll() is None:
                p.kill()
            self.reap(p, 10)
        if not self.finished:
            self.keep_evidence()
        self.hatchd.stop()
        kill_leftovers(self.tmp)
        kill_namespace_leftovers(self.check_namespace)

    def keep_evidence(self):
        """Copies what explains a failed run into TMP/kept before the daemon deletes the VMs:
        each guest's console.log, what its QEMU says (and whether a relink revives it), and the
        namespace's links (TAP counters), neighbours (did the guest still answer ARP) and sockets.
        bench/proxy keeps that directory; the temp dir goes either way."""
        kept = self.tmp / "kept"
        try:
            kept.mkdir(exist_ok=True)
            for con in self.hatchd.vms_dir.glob("*/console.log"):
                shutil.copyfile(con, kept / f"{con.parent.name}-console.log")
            for sock in self.hatchd.vms_dir.glob("*/vmm.sock"):
                with open(kept / f"{sock.parent.name}-qemu.txt", "w") as out:
                    out.write(qemu_state(sock))
                    ip = getattr(self, "ip", None)
                    if ip:
                        out.write(relink_probe(sock, ip))
            with open(kept / "net.txt", "w") as out:
                for cmd in (["ip", "-s", "link"], ["ip", "neigh"], ["ss", "-s"]):
                    out.write(f"$ {' '.join(cmd)}\n")
                    out.flush()
                    subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError) as e:
            log(f"cleanup: keeping the logs: {e}")


def guest_answers(ip, timeout=3.0):
    """Does the guest's port 80 accept a connection within `timeout`?"""
    try:
        with socket.create_connection((ip, 80), timeout=timeout):
            return True
    except OSError:
        return False


def relink_probe(sock_path, ip):
    """Whether a guest that stopped answering answers again after its NIC's link goes down and up
    (QMP `set_link`), which makes QEMU drop the packets queued for the device and take the TAP's
    again: a guest that answers only after it had a stuck receive path in QEMU, not in the guest."""
    if guest_answers(ip):
        return f"$ relink probe\nthe guest answered on {ip}:80 before any set_link\n"
    lines = [f"$ relink probe\nno answer from {ip}:80 before set_link"]
    try:
        # Closed before qemu_state opens its own: QEMU takes one QMP connection at a time.
        with Qmp(sock_path, QMP_TIMEOUT_S) as qmp:
            for up in (False, True):
                qmp.execute("set_link", {"name": "net0", "up": up})
                lines.append(f"set_link net0 up={up}: done")
    except (OSError, ValueError, BenchError) as e:
        lines.append(f"QMP: {e}")
        return "\n".join(lines) + "\n"
    after = guest_answers(ip, timeout=10.0)
    lines.append(f"after set_link off/on: {'the guest answered' if after else 'still no answer'} on {ip}:80")
    lines.append(qemu_state(sock_path))
    return "\n".join(lines) + "\n"


def qemu_state(sock_path):
    """What a running QEMU says of its vCPU and its virtio devices' queues, over its QMP socket
    (hatch connects per command, so the socket is free): whether a guest that stopped answering
    is halted, and whether its network device's rings are empty (the guest gave no buffers) or
    full (QEMU stopped taking them)."""
    lines = []
    try:
        with Qmp(sock_path, QMP_TIMEOUT_S) as qmp:
            for hmp in ("info status", "info registers", "info network", "info irq"):
                lines.append(f"$ {hmp}\n{qmp.execute('human-monitor-command', {'command-line': hmp})}")
            for dev in qmp.execute("x-query-virtio"):
                path = dev.get("path")
                status = qmp.execute("x-query-virtio-status", {"path": path})
                lines.append(f"$ x-query-virtio-status {path}\n{json.dumps(status, indent=1)}")
                for q in range(3):
                    try:
                        st = qmp.execute("x-query-virtio-queue-status", {"path": path, "queue": q})
                    except BenchError:
                        break  # no such queue
                    lines.append(f"$ x-query-virtio-queue-status {path} {q}\n{json.dumps(st, indent=1)}")
    except (OSError, ValueError, BenchError) as e:
        lines.append(f"QMP: {e}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- report


def med(xs):
    xs = [x for x in xs if x is not None]
    return stats(xs)["median"] if xs else None


def fmt(xs, f="{:.2f}", unit=""):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    st = stats(xs)
    if len(xs) == 1:
        return f.format(st["median"]) + unit
    return f"{f.format(st['median'])}{unit} ({f.format(st['min'])}-{f.format(st['max'])})"


def fnum(x, f="{:.2f}"):
    return "?" if x is None else f.format(x)


def f0(x):
    return "?" if x is None else f"{ms(x):.0f}"


def fmt_ms_signed(xs):
    return fmt([ms(x) for x in xs if x is not None], "{:+.2f}", " ms")


def fmt_s(xs):
    return fmt(xs, "{:.3f}", " s")


def fmt_ms(xs):
    return fmt([ms(x) for x in xs if x is not None], "{:.1f}", " ms")



def load_words(load):
    """A load in a sentence."""
    return ("with `Connection: close`" if load.close
            else f"with {load.conns} connections" if load.conns > 1 else "with one connection")


def tap_packets_per_request(rs):
    """Frames through the guest's TAP during the runs / requests wrk completed in them."""
    done = sum(r["requests"] for r in rs)
    counted = [r["tap_packets"] for r in rs if r.get("tap_packets") is not None]
    return sum(counted) / done if done and len(counted) == len(rs) else float("nan")


def connects_per_request(rs):
    """TCP connects made in the namespace during the runs / requests wrk completed in them."""
    done = sum(r["requests"] for r in rs)
    return sum(r["opens"] for r in rs) / done if done else float("nan")


def render(meta, b, markdown):
    lines = []
    add = lines.append
    args = b.args

    def table(header, rows):
        add_table(add, markdown, header, rows)

    def head(text):
        add_heading(add, markdown, text)

    f, q = b.facts, b.quiet
    has_ref = any(k == "haproxy" for _, k in b.wrk)
    affected = sum(1 for rs in b.wrk.values() for r in rs if r["others"])
    total_runs = sum(len(rs) for rs in b.wrk.values())
    cmd = b.cmdline
    add(f"Command: `{meta['command']}` (from the repository root, as root)  ")
    add(f"Date: {meta['date']}  ")
    add(f"Host: {meta['cpus']} cores ({meta['cpu']}), kernel {meta['kernel']}, load average "
        f"{meta['load_before']:.2f} before / {meta['load_after']:.2f} after the measurements "
        f"({b.measure_s:.0f} s); host CPU busy (all processes, /proc/stat) {b.busy:.2f} of {meta['cpus']} cores "
        f"while measuring  ")
    add(f"Other work: waited {q['waited']:.0f} s (limit {q['limit']} s) until no QEMU other than ours ran, then "
        f"{q['idle_waited']:.0f} s until the host kept less than {IDLE_CORES} cores busy over 5 s "
        f"({q['idle_cores']:.2f} then, our idle guest included); before each interleaved pair up to "
        f"{args.pair_wait} s more until no other QEMU ran ({sum(b.gated):.0f} s in all); while measuring, "
        f"{len(b.others_seen)} other QEMU process(es) seen, {affected} of {total_runs} wrk runs with one running at "
        f"their start or end, at most {b.others_max} at once  ")
    add(f"hatch: release build of {meta['source']}  ")
    add(f"QEMU: {meta['qemu']}, accelerator `{arg_after(cmd, '-accel')}`, machine `{arg_after(cmd, '-M')}`, "
        f"{arg_after(cmd, '-smp')} vCPU, {arg_after(cmd, '-m')} MiB (`--mem-mib`), virtio-net on a TAP in the "
        f"daemon's bridge `hatch0` (MTU {f['mtu_hatch0']}; `lo` MTU {f['mtu_lo']})  ")
    add(f"Guest: the default image, user data `{USER_DATA.strip().splitlines()[-1]}`, so its rcS starts busybox "
        f"`httpd -p 80 -h /srv/www`; `GET {PATH}` answers `{f['guest_status']}` with a {len(BODY)}-byte body and "
        f"`Connection: {f['guest_connection']}`; ready line `{f['ready']}`  ")
    add(f"Proxy: the daemon's, on `{PROXY_HOST}:{PROXY_PORT}` (`HATCH_PROXY_ADDR`), base domain `{BASE_DOMAIN}`; "
        f"route `{SUBDOMAIN}` -> port {GUEST_PORT} (`POST /vms/{{id}}/routes`), the VM `auto_sleep: false`  ")
    if has_ref:
        add(f"Reference: {f['haproxy']} (Debian's `haproxy`, not the system service: the binary in the foreground "
            f"in the bench's namespace, `haproxy -db -f` a config in the temp dir), on `{PROXY_HOST}:{REF_PORT}`, "
            f"`mode http`, `option {f['haproxy_option']}`, `nbthread {f['haproxy_threads']}`, one server "
            f"`GUEST_IP:{GUEST_PORT}` (no health checks); it answers `{f['haproxy_status']}`; it runs only during "
            f"the wrk runs  ")
    add(f"Client: {f['wrk']}, `--timeout 5s --latency`, on the same host; all traffic stays in the bench's "
        f"namespace (`lo` and `hatch0`)  ")
    add(f"Runs: {meta['runs']} of each measurement (median, min-max), "
        + ("direct, proxy and HAProxy interleaved in the wrk runs, rotating which goes first (direct and proxy "
           "alternating in the others)" if has_ref else "direct and proxy interleaved, alternating which goes first")
        + f"; wrk runs of {args.duration} s after an uncounted 2 s warm-up per path and load, "
        f"1 s idle before each")
    add("")

    paths = [("direct", f"direct `GUEST_IP:{GUEST_PORT}`"), ("proxy", f"proxy `127.0.0.1:{PROXY_PORT}`")]
    # The single GETs and the wake compare direct and proxy only; the wrk tables add the reference.
    single_paths = list(paths)
    if has_ref:
        paths.append(("haproxy", f"HAProxy `127.0.0.1:{REF_PORT}`"))

    def runs(load, path):
        return b.wrk[(load.key, path)]

    def lat(rs, pct):
        return [r["lat"].get(pct) for r in rs]

    head("Throughput and latency: through the proxy vs straight to the guest")
    add(f"The same wrk command line on both paths; through the proxy with `-H \"Host: {VHOST}\"`. "
        + ("Through HAProxy (the reference) the same command line, Host header included. " if has_ref else "")
        + "requests/s, and the p50 / p99 wrk reports for each run (median of the runs, min-max). "
        "errors = wrk's socket errors (connect, read, write, timeout) + non-2xx responses, summed over the runs.")
    add("")
    rows = []
    for load in b.loads:
        for key, label in paths:
            rs = runs(load, key)
            rows.append([load.label(args.duration), label, fmt([r["rps"] for r in rs], "{:.0f}"),
                         fmt(lat(rs, "50%"), "{:.2f}", " ms"), fmt(lat(rs, "99%"), "{:.2f}", " ms"),
                         f"{sum(r['errors'] for r in rs)} / {sum(r['non2xx'] for r in rs)}",
                         f"{sum(r['requests'] for r in rs):,}"])
    table(["load", "path", "requests/s", "p50", "p99", "errors / non-2xx", "requests (all runs)"], rows)

    add(f"proxy against direct. requests/s: all runs pooled (requests / seconds), and in brackets the range of "
        f"the per-run-pair ratios (proxy run i / direct run i). p50 / p99 added: the difference of the medians in "
        f"the table above, in brackets the range of the per-run-pair differences. Targets: requests/s ratio >= "
        f"{RPS_TARGET}, p99 added < {P99_TARGET_MS:g} ms. wrk starts a request's clock when it writes the "
        f"request, once its connection is up: a connect wrk makes is outside its latency, a connect the proxy "
        f"makes to the guest inside it (the TCP connects per request of each path are in the CPU table below). "
        f"The last columns count everything on both paths: the mean time per request by Little's law, "
        f"connections x seconds / requests, all runs pooled.")
    add("")

    def pooled_rps(rs):
        return sum(r["requests"] for r in rs) / sum(r["secs"] for r in rs)

    def rng(xs, f):
        return f"({f.format(min(xs))} to {f.format(max(xs))})" if len(xs) > 1 else ""

    rows = []
    verdicts = {}
    for load in b.loads:
        d, p = runs(load, "direct"), runs(load, "proxy")
        ratio = pooled_rps(p) / pooled_rps(d)
        pair_ratio = [pp["rps"] / dd["rps"] for dd, pp in zip(d, p)]
        add50 = med(lat(p, "50%")) - med(lat(d, "50%"))
        add99 = med(lat(p, "99%")) - med(lat(d, "99%"))
        pair50 = [pp["lat"]["50%"] - dd["lat"]["50%"] for dd, pp in zip(d, p)]
        pair99 = [pp["lat"]["99%"] - dd["lat"]["99%"] for dd, pp in zip(d, p)]
        wd, wp = load.conns / pooled_rps(d), load.conns / pooled_rps(p)
        r_ok, p_ok = ratio >= RPS_TARGET, add99 < P99_TARGET_MS
        verdicts[load.key] = {"ratio": ratio, "add50": add50, "add99": add99, "r_ok": r_ok, "p_ok": p_ok,
                              "wd": wd, "wp": wp, "wadd": wp - wd, "pair99": pair99, "pair_ratio": pair_ratio}
        rows.append([load.label(args.duration), f"{ratio:.3f} {rng(pair_ratio, '{:.3f}')}",
                     "met" if r_ok else "MISSED",
                     f"{add50:+.2f} ms {rng(pair50, '{:+.2f}')}", f"{add99:+.2f} ms {rng(pair99, '{:+.2f}')}",
                     "met" if p_ok else "MISSED", f"{ms(wd):.2f} / {ms(wp):.2f} ms", f"{ms(wp - wd):+.2f} ms"])
    table(["load", "proxy / direct requests/s", f">= {RPS_TARGET}", "wrk p50 added", "wrk p99 added",
           f"< {P99_TARGET_MS:g} ms", "mean time per request, direct / proxy", "added"], rows)

    ref = {}
    if has_ref:
        add(f"The reference: HAProxy against direct, and hatch's proxy against HAProxy, computed as above "
            f"(pooled requests/s, in brackets the per-run ranges; runs i of the three paths belong together). "
            f"HAProxy / direct is what a proxy that is not hatch's reaches on this host and guest: the distance "
            f"from it to {RPS_TARGET} is not hatch's code. hatch / HAProxy is hatch's proxy against that "
            f"reference (1 = as fast), and the last column hatch's p99 minus HAProxy's.")
        add("")
        rows = []
        for load in b.loads:
            d, p, h = runs(load, "direct"), runs(load, "proxy"), runs(load, "haproxy")
            h_ratio, hp_ratio = pooled_rps(h) / pooled_rps(d), pooled_rps(p) / pooled_rps(h)
            pair_h = [hh["rps"] / dd["rps"] for dd, hh in zip(d, h)]
            pair_hp = [pp["rps"] / hh["rps"] for hh, pp in zip(h, p)]
            h50 = med(lat(h, "50%")) - med(lat(d, "50%"))
            h99 = med(lat(h, "99%")) - med(lat(d, "99%"))
            pair50 = [hh["lat"]["50%"] - dd["lat"]["50%"] for dd, hh in zip(d, h)]
            pair99 = [hh["lat"]["99%"] - dd["lat"]["99%"] for dd, hh in zip(d, h)]
            hp99 = med(lat(p, "99%")) - med(lat(h, "99%"))
            ref[load.key] = {"ratio": h_ratio, "hatch": hp_ratio, "add50": h50, "add99": h99}
            rows.append([load.label(args.duration), f"{h_ratio:.3f} {rng(pair_h, '{:.3f}')}",
                         "met" if h_ratio >= RPS_TARGET else "MISSED",
                         f"{h50:+.2f} ms {rng(pair50, '{:+.2f}')}", f"{h99:+.2f} ms {rng(pair99, '{:+.2f}')}",
                         f"{hp_ratio:.3f} {rng(pair_hp, '{:.3f}')}", f"{hp99:+.2f} ms"])
        table(["load", "HAProxy / direct requests/s", f">= {RPS_TARGET}", "wrk p50 added", "wrk p99 added",
               "hatch / HAProxy requests/s", "hatch p99 - HAProxy p99"], rows)

    head("CPU during the wrk runs")
    add("Cores (CPU seconds per second of the run, median of the runs) from /proc: the daemon (`hatch serve`, "
        "all threads: the proxy is in it), QEMU's busiest thread (with one vCPU under TCG, the vCPU), all of "
        "QEMU, wrk, and the whole host (/proc/stat); everything else = host - the daemon, QEMU and wrk (other users' builds and "
        "tests, this script, the kernel's softirq work not charged to a process); steal = CPU time the hypervisor "
        "under this (virtual) machine gave to others (/proc/stat). Daemon per request = its CPU time / requests "
        "served."
        + (" HAProxy: the reference's process (all threads, /proc/PID/stat) the same way, and HAProxy per "
           "request its CPU time / the requests it served; everything else leaves it out too." if has_ref else ""))
    add("")
    rows = []
    for load in b.loads:
        for key, label in paths:
            rs = runs(load, key)
            per_req = [per_request_us(r) for r in rs]
            ref_cols = []
            if has_ref:
                ref_cols = ([fmt([r["ref"] for r in rs]),
                             f"{med([r['ref_user'] for r in rs]):.2f} / {med([r['ref_sys'] for r in rs]):.2f}",
                             fmt([per_request_us(r, "ref_s") for r in rs], "{:.0f}", " us")]
                            if key == "haproxy" else ["-", "-", "-"])
            rows.append([load.label(args.duration), label, fmt([r["daemon"] for r in rs]),
                         f"{med([r['daemon_user'] for r in rs]):.2f} / {med([r['daemon_sys'] for r in rs]):.2f}",
                         fmt(per_req, "{:.0f}", " us") if key == "proxy" else "-", *ref_cols,
                         fmt([r["vcpu"] for r in rs]), fmt([r["qemu"] for r in rs]),
                         fmt([r["client"] for r in rs]), fmt([r["host"] for r in rs]),
                         fmt([max(0.0, r["host"] - (r["daemon"] or 0) - (r.get("ref") or 0) - (r["qemu"] or 0)
                                  - r["client"])
                              if r["host"] is not None else None for r in rs]),
                         fmt([r["steal"] for r in rs]),
                         f"{sum(r['net']['TCPSynRetrans'] or 0 for r in rs)}",
                         f"{connects_per_request(rs):.2f}", f"{tap_packets_per_request(rs):.1f}",
                         fmt([r["time_wait"] for r in rs], "{:.0f}")])
    ref_heads = ["HAProxy", "HAProxy user / sys", "HAProxy per request"] if has_ref else []
    table(["load", "path", "daemon", "daemon user / sys", "daemon per request", *ref_heads, "QEMU vCPU thread",
           "QEMU all",
           "wrk", "host busy", "everything else", "steal", "SYN retransmits (all runs)",
           "TCP connects per request", "guest TAP frames per request", "TIME_WAIT to the guest after a run"],
          rows)
    add("SYN retransmits: `TCPSynRetrans` of the namespace (/proc/net/netstat) over the runs: connects from "
        "wrk or from the proxy that got no SYN-ACK within 1 s (Linux's initial RTO), so each one is a request "
        "that took over a second; the host-side `ListenOverflows` (the proxy's own accept queue) stayed at "
        f"{sum((r['net']['ListenOverflows'] or 0) for rs in b.wrk.values() for r in rs)}. TCP connects per "
        "request: connections opened in the namespace (`ActiveOpens`, /proc/net/snmp: wrk's and the proxy's) "
        "over the runs / requests wrk completed. Guest TAP frames per request: frames through the VM's TAP, "
        "both ways (its rx_packets + tx_packets), over the runs / requests wrk completed: the packets the "
        "guest's own network stack handled for each request. TIME_WAIT to the guest: sockets of the namespace in TIME_WAIT "
        f"towards `GUEST_IP:{GUEST_PORT}` when the run ended (/proc/net/tcp), wrk's of this and earlier runs "
        "and the proxy's together; each holds a local port towards the guest for 60 s, and once they fill "
        "much of the ephemeral range every connect() to the guest scans it for a free port.")
    add("")

    head("Single requests on an idle guest")
    add(f"{args.requests} GETs per path, each on a fresh connection with `Connection: close`, read to EOF and "
        f"checked, {int(GAP_S * 1000)} ms idle before each, the paths alternating (Python sockets). Timed from "
        f"connect() to the last byte, so the connection set-up counts on both paths (through the proxy: to the "
        f"proxy, then the proxy's to the guest).")
    add("")
    rows = []
    single = {}
    for key, label in single_paths:
        xs = b.single[key]
        st = stats([t for t, _, _ in xs])
        single[key] = st
        rows.append([label, f"{ms(st['p50']):.2f} ms", f"{ms(st['p99']):.2f} ms", f"{ms(st['max']):.2f} ms",
                     f"{ms(stats([c for _, _, c in xs])['p50']):.2f} ms",
                     f"{ms(stats([f for _, f, _ in xs])['p50']):.2f} ms"])
    rows.append(["proxy - direct", f"{ms(single['proxy']['p50'] - single['direct']['p50']):+.2f} ms",
                 f"{ms(single['proxy']['p99'] - single['direct']['p99']):+.2f} ms", "-", "-", "-"])
    table(["path", "p50", "p99", "max", "connect() p50", "first byte p50"], rows)

    head(f"First request to a snapshotted {args.mem_mib} MiB VM: wake on request vs restore + GET")
    add(f"Each run starts with `POST /vms/{{id}}/snapshot` (201, the VM `snapshotted`, its QEMU gone; "
        f"{fmt_s([s['secs'] for s in b.snaps])}, {fmt([s['size'] / 2**20 for s in b.snaps if s['size']], '{:.0f}', ' MiB')} "
        f"stored), then `sync` and 0.5 s of quiet. wake: one GET through the proxy, from connect() to the last "
        f"byte of the 200. plain: `POST /vms/{{id}}/restore` (on a fresh API connection, returns once the VM "
        f"runs), then the same GET straight to the guest, from the restore request to the last byte. "
        f"running: after each wake, `sync`, 0.5 s, and the same GET through the proxy again. The daemon runs "
        f"with its defaults, so hot copies are on: each wake and restore maps the RAM the snapshot left "
        f"(README, \"Hot copies\").")
    add("")
    wt = [r["total"] for r in b.wake]
    pt = [r["total"] for r in b.plain]
    ratio = med(wt) / med(pt)
    pairs = [w / p for w, p in zip(wt, pt)]
    rows = [
        ["**wake**: GET through the proxy -> 200 (snapshotted VM)", fmt_s(wt)],
        ["  of which the daemon's wake (`vm woke on request ms=`: lock, restore, state written)",
         fmt_s([r["daemon_ms"] for r in b.wake])],
        ["  from the end of the wake to the last byte (the proxy's forward and the guest's answer)",
         fmt_ms([r["total"] - r["daemon_ms"] for r in b.wake if r["daemon_ms"] is not None])],
        ["  TCP connects made (ActiveOpens): client -> proxy, then the daemon's to the guest",
         fmt([r["opens"] for r in b.wake], "{:.0f}")],
        ["**running**: the same GET through the proxy right after, the VM running",
         fmt_ms([r["running"] for r in b.wake])],
        ["wake - running (medians): what a user waits for the wake",
         f"{ms(med(wt) - med([r['running'] for r in b.wake])):+.0f} ms"],
        ["**plain**: `POST /vms/{id}/restore` + direct GET -> 200", fmt_s(pt)],
        ["  of which `POST /vms/{id}/restore` (200)", fmt_s([r["restore"] for r in b.plain])],
        ["  of which the GET after it", fmt_ms([r["get"] for r in b.plain])],
        ["    of which its connect() (SYN -> SYN-ACK)", fmt_ms([r["connect"] for r in b.plain])],
        ["  TCP connects made (ActiveOpens): client -> API, client -> guest",
         fmt([r["opens"] for r in b.plain], "{:.0f}")],
        ["wake - plain (medians)", f"{ms(med(wt) - med(pt)):+.0f} ms"],
        ["**wake / plain**", f"{ratio:.2f} (per run pair {fmt(pairs, '{:.2f}')})"],
    ]
    table(["step", "time"], rows)

    head("Details")
    for load in b.loads:
        for key, label in paths:
            rs = runs(load, key)
            add(f"- {load.label(args.duration)}, {label}: requests/s per run "
                + ", ".join(f"{r['rps']:.0f}" for r in rs)
                + "; p50 " + ", ".join(f"{r['lat'].get('50%', 0):.2f}" for r in rs)
                + " ms; p90 " + ", ".join(f"{r['lat'].get('90%', 0):.2f}" for r in rs)
                + " ms; p99 " + ", ".join(f"{r['lat'].get('99%', 0):.2f}" for r in rs)
                + " ms; max " + ", ".join(f"{r.get('max') or 0:.2f}" for r in rs) + " ms"
                + "".join(f"; run {i + 1}: {r['error_text']}" for i, r in enumerate(rs) if r["errors"])
                + "".join(f"; run {i + 1}: {r['others']} other QEMU(s) running" for i, r in enumerate(rs)
                          if r["others"]))
    add("- wake, every run: " + "; ".join(
        f"GET {r['total']:.3f} s (daemon's wake {r['daemon_ms'] or 0:.3f} s, daemon CPU {ms(r['daemon_cpu']):.0f} ms)"
        for r in b.wake) + ".")
    add("- plain, every run: " + "; ".join(
        f"restore {r['restore']:.3f} s + GET {ms(r['get']):.1f} ms = {r['total']:.3f} s"
        + (f" ({r['retries']} failed GETs first)" if r["retries"] else "")
        + f", daemon CPU {ms(r['daemon_cpu']):.0f} ms" for r in b.plain) + ".")
    for label, rs in (("wake", b.wake), ("plain", b.plain)):
        firsts = []
        for r in rs:
            d = {}
            for name, t in r.get("log", []):
                d.setdefault(name, t)
            firsts.append(d)
        names = list(dict.fromkeys(n for d in firsts for n in d))
        if names:
            add(f"- {label}, the daemon's log (`HATCH_LOG=info,sqlx=warn`), median ms from the request to each "
                "line: " + ", ".join(f"`{n}` {ms(med([d.get(n) for d in firsts])):.0f}" for n in names) + ".")
    add(f"- Status lines: direct `{f['direct_status']}`, through the proxy `{f['proxy_status']}`."
        + (f" Guest warnings: {'; '.join(f['warnings'])}" if f.get("warnings") else ""))
    add("")

    # Reading it: every figure and every conclusion below is computed from this run.
    many = b.loads[0]
    dm, pm = runs(many, "direct"), runs(many, "proxy")
    vcpu_d, vcpu_p = med([r["vcpu"] for r in dm]), med([r["vcpu"] for r in pm])
    dmn = med([r["daemon"] for r in pm])
    host_p = med([r["host"] for r in pm])
    vm_, v1 = verdicts[many.key], verdicts["one"]
    syn_d = sum(r["net"]["TCPSynRetrans"] or 0 for r in dm)
    syn_p = sum(r["net"]["TCPSynRetrans"] or 0 for r in pm)
    spread = [(max(x) / min(x) - 1) * 100 for x in
              ([r["rps"] for r in runs(load, "direct")] for load in b.loads) if len(x) > 1 and min(x) > 0]
    vcpu_1 = med([r["vcpu"] for r in runs(b.loads[1], "direct")])
    saturated = all(v is not None and v >= VCPU_SATURATED for v in (vcpu_d, vcpu_p))
    add(f"Reading it: with {many.conns} connections the proxy serves {vm_['ratio']:.2f}x the direct requests/s "
        f"(target >= {RPS_TARGET}: {'met' if vm_['r_ok'] else 'missed'}); QEMU's busiest thread was busy "
        f"{fnum(vcpu_d)} of a core straight and {fnum(vcpu_p)} through the proxy ({fnum(vcpu_1)} straight with "
        f"one connection)"
        + (f", at least {VCPU_SATURATED} on both paths: the guest's one vCPU is the limit, so requests/s "
           f"measures the guest more than the path" if saturated else "")
        + f"; the daemon used {fnum(dmn)} cores and the host {fnum(host_p)} of {meta['cpus']}."
        + (f" The direct path alone spreads by up to {max(spread):.0f}% between its fastest and slowest run of "
           f"a load, so single run pairs are noisy and the pooled ratios are the better figure."
           if spread and max(spread) >= SPREAD_NOISY_PCT else ""))
    add("")
    if ref:
        def each(key, f):
            return ", ".join(f"{f.format(ref[load.key][key])} {load_words(load)}" for load in b.loads)

        missed = [load_words(load) for load in b.loads if ref[load.key]["ratio"] < RPS_TARGET]
        cpu_h = {load.key: med([per_request_us(r, "ref_s") for r in runs(load, "haproxy")]) for load in b.loads}
        cpu_p = {load.key: med([per_request_us(r) for r in runs(load, "proxy")]) for load in b.loads}
        add(f"Against the direct requests/s the reference, HAProxy, serves {each('ratio', '{:.2f}x')}: "
            + (f"below {RPS_TARGET} {' and '.join(missed)}: in these runs a proxy that is not hatch's missed the "
               f"target there too" if missed else f"at least {RPS_TARGET} for every load")
            + f". Against HAProxy's, hatch's proxy serves {each('hatch', '{:.2f}x')}. CPU per request, "
            + "; ".join(f"{load_words(load)}: HAProxy {fnum(cpu_h[load.key], '{:.0f}')} us, the daemon "
                        f"{fnum(cpu_p[load.key], '{:.0f}')} us" for load in b.loads)
            + ".")
        add("")
    if syn_d or syn_p:
        req_d, req_p = sum(r["requests"] for r in dm), sum(r["requests"] for r in pm)
        share_d, share_p = syn_d / max(req_d, 1), syn_p / max(req_p, 1)
        p99_p = med(lat(pm, "99%"))
        overflows = sum((r["net"]["ListenOverflows"] or 0) for r in pm)
        judged = share_p >= 0.01 and p99_p is not None and p99_p >= 1000
        add(f"At {many.conns} connections {syn_d} SYNs were retransmitted during the direct runs and {syn_p} "
            f"during the proxied ones ({100 * share_d:.1f}% and {100 * share_p:.1f}% of the requests; each waited "
            f"at least Linux's initial 1 s retransmission timeout); the host's `ListenOverflows` (the proxy's "
            f"accept queue) rose by {overflows} in the proxied runs. wrk's p99 through the proxy is "
            f"{vm_['add99']:+.0f} ms from the direct one, and the mean time per request, everything counted, "
            f"{ms(vm_['wd']):.1f} ms straight and {ms(vm_['wp']):.1f} ms through the proxy "
            f"({ms(vm_['wadd']):+.1f} ms)."
            + (f" With {100 * share_p:.1f}% of the proxied requests behind a retransmitted SYN and wrk's p99 "
               f"through the proxy at {p99_p:.0f} ms, that p99 measures the retransmits, not the proxy: the "
               f"p99 target is not judged at this load." if judged else ""))
        add("")
    vc = verdicts.get("one-close")
    one_p = runs(b.loads[1], "proxy")
    sys_share = med([100 * r["daemon_sys"] / r["daemon"] for r in one_p if r["daemon"]])
    cpr = connects_per_request(one_p)
    per_req = med([per_request_us(r) for r in one_p])
    add(f"With one connection the proxy adds {v1['add50']:+.2f} ms at p50 and {v1['add99']:+.2f} ms at p99 of "
        f"wrk's latency (p99 target: {'met' if v1['p_ok'] else 'missed'}; per run pair "
        f"{min(v1['pair99']):+.2f} to {max(v1['pair99']):+.2f} ms) and {ms(v1['wadd']):+.2f} ms to the mean "
        f"time per request ({v1['ratio']:.2f}x the requests/s)"
        + (f"; with `Connection: close` {vc['add50']:+.2f} ms at p50 and {vc['add99']:+.2f} ms at p99 (per run "
           f"pair {min(vc['pair99']):+.2f} to {max(vc['pair99']):+.2f} ms), {ms(vc['wadd']):+.2f} ms to the mean"
           if vc else "")
        + (". Per run pair the p99 differences at one connection straddle zero: they are within the runs' own "
           "spread" if all(min(v["pair99"]) < 0 < max(v["pair99"]) for v in (v1, vc) if v) else "")
        + f". To a single request on an idle guest, connection set-up included, the proxy adds "
        f"{ms(single['proxy']['p50'] - single['direct']['p50']):+.2f} ms at p50 and "
        f"{ms(single['proxy']['p99'] - single['direct']['p99']):+.2f} ms at p99. Through the proxy with one "
        f"keep-alive connection from wrk, the daemon spent {fnum(per_req, '{:.0f}')} us of CPU per request "
        f"({fnum(sys_share, '{:.0f}')}% of it in the kernel) and {cpr:.2f} TCP connections were opened per "
        f"request.")
    add("")
    add("The daemon's CPU per proxied request (median of the runs, min-max): "
        + "; ".join(f"{load.label(args.duration)} {fmt([per_request_us(r) for r in runs(load, 'proxy')], '{:.0f}', ' us')}"
                    for load in b.loads)
        + ". Sockets in TIME_WAIT towards the guest when a proxied run ended: "
        + "; ".join(f"{fmt([r['time_wait'] for r in runs(load, 'proxy')], '{:.0f}')}" for load in b.loads)
        + " (wrk's from the direct runs of the last 60 s included).")
    add("")
    wk = [r["daemon_ms"] for r in b.wake if r["daemon_ms"] is not None]
    pr = [r["restore"] for r in b.plain]
    ranges = (f"ranges {f0(min(wk)) if wk else '?'}-{f0(max(wk)) if wk else '?'} and "
              f"{f0(min(pr))}-{f0(max(pr))} ms")
    if wk and min(wk) <= max(pr) and min(pr) <= max(wk):
        ranges += ", which overlap"
    wake_after = med([r["total"] - r["daemon_ms"] for r in b.wake if r["daemon_ms"] is not None])
    get_after = med([r["get"] for r in b.plain])
    idle_get = single["direct"]["p50"]
    add(f"The first request to a snapshotted VM takes {med(wt):.3f} s through the proxy against {med(pt):.3f} s "
        f"for `POST /vms/{{id}}/restore` plus the same GET ({ratio:.2f}x). The daemon's wake took "
        f"{f0(med([r['daemon_ms'] for r in b.wake]))} ms against {f0(med(pr))} ms for the API's restore "
        f"({ranges}). From the end of the wake to the last byte the proxy took {f0(wake_after)} ms (connections "
        f"to the guest: {med([r['opens'] for r in b.wake]) - 1:.0f}); on the plain path the GET right after the "
        f"restore took {f0(get_after)} ms, against {ms(idle_get):.1f} ms at p50 for a GET on a guest that had "
        f"been running"
        + (f" ({get_after / idle_get:.1f}x: the first request to a just-restored guest is slower on both paths)"
           if get_after and wake_after and min(get_after, wake_after) > 2 * idle_get else "")
        + ".")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="runs of each measurement (default 3)")
    ap.add_argument("--mem-mib", type=int, default=1024,
                    help="the bench VM's memory, which each wake restores (default 1024)")
    ap.add_argument("--duration", type=int, default=10, help="seconds of each wrk run (default 10)")
    ap.add_argument("--connections", type=int, default=16,
                    help="wrk connections of the main load (default 16, 2 threads); a 1-connection load runs too")
    ap.add_argument("--no-close", action="store_true",
                    help="skip the 1-connection load with `Connection: close`")
    ap.add_argument("--no-reference", action="store_true",
                    help="skip the reference proxy (HAProxy) beside hatch's in the wrk runs")
    ap.add_argument("--haproxy-threads", type=int, default=1,
                    help="the reference HAProxy's nbthread (default 1, which used less CPU per request at "
                         "16 connections than one thread per core; 0: one per core)")
    ap.add_argument("--haproxy-mode", choices=("keep-alive", "server-close"), default="keep-alive",
                    help="the reference HAProxy's connection mode towards the guest: `option http-keep-alive` "
                         "(default) or `option http-server-close`")
    ap.add_argument("--requests", type=int, default=200,
                    help="single GETs per path on an idle guest (default 200)")
    ap.add_argument("--wait-quiet", type=int, default=600,
                    help="seconds to wait for other QEMUs to finish before measuring (default 600, 0: no wait)")
    ap.add_argument("--pair-wait", type=int, default=120,
                    help="before each interleaved pair, seconds to wait at most for other QEMUs to finish "
                         "(default 120, 0: no wait)")
    ap.add_argument("--markdown", action="store_true",
                    help=f"print the `## {DOC_SECTION}` section for docs/BENCHMARKS.md instead of plain tables, "
                         "and write it there (unless --no-docs)")
    ap.add_argument("--no-docs", action="store_true", help="with --markdown: only print, do not update the docs")
    args = ap.parse_args()
    check_ranges(ap, args, (("runs", 1, 100), ("duration", 1, 600), ("connections", 1, 1000),
                         ("requests", 1, 10000), ("wait_quiet", 0, 3600),
                         ("pair_wait", 0, 3600), ("haproxy_threads", 0, 64)))
    if "HATCH_BENCH_TMP" not in os.environ:
        ap.error("run this through bench/proxy (it makes the namespace and the temp dir)")

    bench = Bench(args)
    meta = run_meta("bench/proxy", args.runs)
    status, _ = run_guarded(bench.run, bench.cleanup)
    if status != 0:
        return status
    meta.update(load_before=bench.load_before, load_after=os.getloadavg()[0], qemu=qemu_version(bench.cmdline[0]))
    section = render(meta, bench, args.markdown)
    if args.markdown:
        print(f"\n## {DOC_SECTION}\n")
        print(section)
        if not args.no_docs:
            write_docs(DOCS, DOC_SECTION, section)
            log(f"updated {DOCS}")
    else:
        print()
        print(section)
    return 0


if __name__ == "__main__":
    sys.exit(main())
