#!/usr/bin/env python3
"""bench/memdedup: how much of a freshly booted guest's RAM another fresh guest
of the same image shares, at 4 KiB, 16 KiB and 64 KiB granularity.

This is the ceiling on what any content-addressed store (hatch's chunks
included) can save across VMs that each booted on their own: a page is stored
once only if another guest holds the very same bytes. It boots --vms guests of
the default image one after another with plain QEMU (TCG, the same kernel,
initramfs and a qcow2 overlay of the same rootfs, guest RAM a memfd as hatch
gives it, no NIC, no seed), waits until each sits idle at its shell prompt
plus --settle seconds, copies its RAM from the memfd, and stops it. Then, for
each granularity: the guest's non-zero bytes, the bytes no earlier guest (or
earlier unit of itself) held, and "all / first": what a perfect
content-addressed store would hold for all the guests against the first.

Variants (--variants) change only the kernel command line: `default`,
`nokaslr` (kernel image at a fixed address), `init_on_free` (freed pages
zeroed), and both. They show where the difference between boots comes from.
Nothing is written outside a temp dir, which is removed at the end.

    bench/memdedup.py [--vms 3] [--mem 256] [--settle 10] [--variants default,nokaslr]
"""

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_ARGS = "console=ttyS0 root=/dev/vda rw"
VARIANTS = {
    "default": "",
    "nokaslr": "nokaslr",
    "init_on_free": "init_on_free=1",
    "nokaslr+init_on_free": "nokaslr init_on_free=1",
}
UNITS = (4096, 16384, 65536)
PROMPT = b"hatch:~#"


def log(msg):
    print(f"bench/memdedup: {msg}", file=sys.stderr, flush=True)


def boot_and_copy(image, work, name, mem, extra, settle, timeout):
    """Boot one guest, wait for its prompt and `settle` seconds, copy its RAM to work/name.ram."""
    overlay = os.path.join(work, f"{name}.qcow2")
    console = os.path.join(work, f"{name}.console")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", os.path.join(image, "rootfs.ext4"),
                    "-F", "raw", overlay], check=True)
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-smp", "1", "-m", str(mem),
           "-M", "pc,accel=tcg,memory-backend=pc.ram",
           "-object", f"memory-backend-memfd,id=pc.ram,size={mem}M",
           "-kernel", os.path.join(image, "vmlinuz"), "-initrd", os.path.join(image, "initrd.img"),
           "-append", f"{BASE_ARGS} {extra}".strip(),
           "-drive", f"file={overlay},if=virtio", "-serial", f"file:{console}"]
    qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if qemu.poll() is not None:
                raise RuntimeError(f"QEMU exited with {qemu.returncode} before the prompt")
            if os.path.exists(console) and PROMPT in open(console, "rb").read():
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"no prompt within {timeout} s: {open(console, 'rb').read()[-500:]!r}")
            time.sleep(0.2)
        time.sleep(settle)
        fd = next(f for f in os.listdir(f"/proc/{qemu.pid}/fd")
                  if "memfd:memory-backend" in os.readlink(f"/proc/{qemu.pid}/fd/{f}"))
        out = os.path.join(work, f"{name}.ram")
        with open(f"/proc/{qemu.pid}/fd/{fd}", "rb") as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        return out
    finally:
        qemu.kill()
        qemu.wait()
        os.unlink(overlay)


def unit_hashes(path, size):
    """The BLAKE2b-128 of every non-zero `size` unit of a file (zero units left out)."""
    zero = bytes(size)
    out = []
    with open(path, "rb") as f:
        while True:
            b = f.read(size)
            if not b:
                return out
            if b != zero:
                out.append(hashlib.blake2b(b, digest_size=16).digest())


def analyse(rams):
    """Per unit size: [(non-zero bytes, new bytes) per guest], all / first."""
    res = {}
    for size in UNITS:
        seen, rows = set(), []
        for ram in rams:
            hs = unit_hashes(ram, size)
            new = set(hs) - seen
            seen |= new
            rows.append((len(hs) * size, len(new) * size))
        res[size] = (rows, sum(n for _, n in rows) / rows[0][1])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vms", type=int, default=3)
    ap.add_argument("--mem", type=int, default=256, help="guest RAM, MiB")
    ap.add_argument("--settle", type=float, default=10, help="seconds idle at the prompt before the copy")
    ap.add_argument("--timeout", type=float, default=120)
    ap.add_argument("--variants", default="default,nokaslr,init_on_free,nokaslr+init_on_free")
    ap.add_argument("--image", default=os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")),
                                                    "hatch-image"))
    args = ap.parse_args()
    variants = args.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            ap.error(f"unknown variant {v!r} (known: {', '.join(VARIANTS)})")
    if args.vms < 2:
        ap.error("--vms must be at least 2")
    work = tempfile.mkdtemp(prefix="hatch-memdedup-", dir="/var/tmp")
    try:
        print(f"Guests: {args.vms} x {args.mem} MiB of `{args.image}`, each idle {args.settle:g} s at its prompt; "
              f"kernel command line `{BASE_ARGS}` plus the variant's options. MiB; new = bytes no earlier guest "
              "(nor an earlier unit of the same guest) held.\n")
        print("| variant | unit | non-zero per guest | new: first, then each next | all / first |")
        print("|---|---|---|---|---|")
        for v in variants:
            rams = []
            for i in range(args.vms):
                log(f"{v}: guest {i + 1} of {args.vms}")
                rams.append(boot_and_copy(args.image, work, f"{v}-{i}", args.mem, VARIANTS[v], args.settle,
                                          args.timeout))
            for size, (rows, ratio) in analyse(rams).items():
                nz = "/".join(f"{b / 2**20:.0f}" for b, _ in rows)
                new = ", ".join(f"{n / 2**20:.1f}" for _, n in rows)
                print(f"| {v} | {size // 1024} KiB | {nz} | {new} | {ratio:.2f}x |", flush=True)
            for r in rams:
                os.unlink(r)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
