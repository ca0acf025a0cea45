# Shared by scripts/run and scripts/test: system packages and toolchain checks.
# shellcheck shell=bash

# Debian packages hatch needs at run time and for its tests.
HATCH_APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static e2fsprogs iproute2 curl procps coreutils nftables dnsmasq-base genisoimage openssh-client dropbear-bin wrk)

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
    # qemu-system-x86 and qemu-utils must come from the same QEMU release: installing one alone
    # can make apt remove the other (a machine image may ship a newer qemu-utils), so a missing
    # one brings both, pinned to qemu-system-x86's version, and the commands are checked after.
    local qemu=() q rest=()
    for q in "${missing[@]}"; do
        case "$q" in qemu-system-x86 | qemu-utils) qemu=(x) ;; *) rest+=("$q") ;; esac
    done
    if [ ${#rest[@]} -gt 0 ]; then
        echo "hatch: installing ${rest[*]}" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${rest[@]}" >/dev/null
    fi
    if [ ${#qemu[@]} -gt 0 ]; then
        install_qemu
    fi
    local tool
    for tool in qemu-system-x86_64 qemu-img; do
        if ! command -v "$tool" >/dev/null 2>&1; then
            echo "hatch: $tool is missing; installing qemu-system-x86 and qemu-utils together" >&2
            install_qemu
            command -v "$tool" >/dev/null 2>&1 || { echo "hatch: $tool is still missing" >&2; exit 1; }
        fi
    done
}

# Both QEMU packages at qemu-system-x86's candidate version, downgrading qemu-utils if needed.
install_qemu() {
    local ver
    ver=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    echo "hatch: installing qemu-system-x86 and qemu-utils $ver" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --allow-downgrades "qemu-system-x86=$ver" "qemu-utils=$ver" >/dev/null
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

# The S3-compatible server the snapshot store tests run against; newer releases need a newer
# rustc than Debian-era toolchains have.
S3S_FS_VERSION=0.14.1

# Finds s3s-fs on PATH or in cargo's bin directory, installing it from crates.io if it is in
# neither, and exports its path as HATCH_TEST_S3S_FS for the tests.
require_s3s_fs() {
    local bin root="${CARGO_HOME:-$HOME/.cargo}"
    bin=$(command -v s3s-fs || true)
    if [ -z "$bin" ]; then
        bin="$root/bin/s3s-fs"
        if [ ! -x "$bin" ]; then
            echo "hatch: installing s3s-fs $S3S_FS_VERSION for the snapshot store tests (a few minutes)" >&2
            cargo install "s3s-fs@$S3S_FS_VERSION" --features binary --locked --root "$root"
        fi
    fi
    export HATCH_TEST_S3S_FS="$bin"
}

# The Better Auth server the API-key tests run against (tests/better-auth): npm packages by name
# from the npm registry, pinned by its package-lock.json. `npm ci` builds better-sqlite3 from
# source (a minute or two), so it reruns only when the lock file changed.
require_better_auth() {
    local dir=tests/better-auth lock stamp
    if ! command -v npm >/dev/null 2>&1; then
        echo "hatch: installing nodejs and npm for the Better Auth tests" >&2
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
    fi
    command -v npm >/dev/null 2>&1 || {
        echo "hatch: node and npm (Node 20 or newer) are needed for the Better Auth tests" >&2
        exit 1
    }
    lock=$(sha256sum "$dir/package-lock.json" | cut -d' ' -f1)
    stamp="$dir/node_modules/.hatch-lock-sha256"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$lock" ]; then
        echo "hatch: npm ci in $dir" >&2
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error)
        echo "$lock" >"$stamp"
    fi
}
