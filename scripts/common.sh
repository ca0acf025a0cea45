# Shared by scripts/run and scripts/test: system packages and toolchain checks.
# shellcheck shell=bash

# Debian packages hatch needs at run time and for its tests.
HATCH_APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static e2fsprogs iproute2 curl procps coreutils nftables dnsmasq-base genisoimage openssh-client dropbear-bin)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

install_packages() {
    local missing=()
    for p in "${HATCH_APT_PACKAGES[@]}" "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    # The image builder downloads the Debian cloud kernel with apt-get download, which needs package lists.
    if [ ${#missing[@]} -gt 0 ] || ! apt-cache show linux-image-cloud-amd64 >/dev/null 2>&1; then
        echo "hatch: apt-get update" >&2
        as_root apt-get update -qq
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "hatch: installing ${missing[*]}" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
}

require_cargo() {
    if ! command -v cargo >/dev/null 2>&1; then
        [ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"
    fi
    command -v cargo >/dev/null 2>&1 || {
        echo "hatch: cargo not found; install Rust with rustup (https://rustup.rs) and retry" >&2
        exit 1
    }
}
