#!/bin/busybox sh
# hatch initramfs /init: load the virtio (and power-button) modules, wait for
# the root disk, mount it read-write and hand over to its /sbin/init.
# @MODULES@ and @KVER@ are filled in by `hatch image build`.
export PATH=/sbin:/bin:/usr/sbin:/usr/bin

# Never let PID 1 exit (the kernel would panic): report, then power off so the
# VMM sees the guest stop. `hatch.rescue` on the command line gives a shell.
fail() {
    echo "hatch-initrd: error: $*"
    if grep -qw hatch.rescue /proc/cmdline 2>/dev/null; then
        echo "hatch-initrd: rescue shell (exit it to power off)"
        setsid cttyhack sh
    fi
    echo "hatch-initrd: powering off"
    sync
    poweroff -f
    while :; do sleep 3600; done
}

mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount devtmpfs on /dev"

root=/dev/vda
init=/sbin/init
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        root=*) root="${arg#root=}" ;;
        init=*) init="${arg#init=}" ;;
    esac
done

# Under a virtio-mmio VMM the disks and the NIC are virtio-mmio devices, which it
# lists on the command line (virtio_mmio.device=SIZE@BASE:IRQ[:ID], one per
# device). Options on the command line reach only built-in code, and busybox
# insmod does not read them, so each becomes a device=... option of
# virtio_mmio here. Prints the options, each with a leading space.
# (src/image/build/initramfs.rs runs the lines between the markers in its tests.)
# -- begin module loading --
virtio_mmio_options() {
    set -f # split the command line into words, never expand them as globs
    for arg in $1; do
        case "$arg" in
        virtio_mmio.device=*)
            value="${arg#virtio_mmio.device=}"
            # Only what the format allows, so the option is one plain word.
            case "$value" in
            "" | *[!0-9A-Za-z@:]*) echo "hatch-initrd: warning: ignoring $arg" >&2 ;;
            *) printf ' device=%s' "$value" ;;
            esac
            ;;
        esac
    done
    set +f
}
mmio_options=$(virtio_mmio_options "$(cat /proc/cmdline)")

# Listed in dependency order by the image builder (no depmod/modprobe here).
for m in @MODULES@; do
    options=
    [ "$m" = virtio_mmio ] && options=$mmio_options
    # $options unquoted: one argument per device (checked above to be plain words).
    insmod "/lib/modules/@KVER@/$m.ko" $options || fail "cannot load kernel module $m"
done
# -- end module loading --

# LABEL=/UUID= need a lookup; plain paths are used as they are.
resolve_root() {
    case "$1" in
        LABEL=* | UUID=*) findfs "$1" 2>/dev/null ;;
        *) echo "$1" ;;
    esac
}

# devtmpfs creates the node once virtio_blk has probed; bound the wait to ~10 s.
tries=0
while :; do
    dev=$(resolve_root "$root")
    [ -n "$dev" ] && [ -b "$dev" ] && break
    tries=$((tries + 1))
    [ "$tries" -ge 100 ] && fail "root device $root did not appear within 10 s"
    usleep 100000
done

mount -t ext4 -o rw "$dev" /newroot || fail "cannot mount $dev (ext4) on /newroot"
[ -e "/newroot$init" ] || [ -L "/newroot$init" ] || fail "no $init on the root filesystem $dev"

# Keep the already-populated /dev (and proc/sys) for the real root.
for fs in dev proc sys; do
    if [ -d "/newroot/$fs" ]; then
        mount --move "/$fs" "/newroot/$fs" || fail "cannot move /$fs to the new root"
    else
        umount "/$fs"
    fi
done

exec switch_root /newroot "$init"
