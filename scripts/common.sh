# Shared by scripts/run, scripts/test and bench/*: system packages and toolchain checks.
# shellcheck shell=bash

# Debian packages hatch needs at run time and for its tests and benches.
HATCH_APT_PACKAGES=(qemu-system-x86 qemu-utils busybox-static e2fsprogs iproute2 curl procps coreutils nftables dnsmasq-base genisoimage openssh-client dropbear-bin wrk sqlite3 python3-prometheus-client python3-venv)

# Every command the daemon, the image builder, the tests and the benches run, as `command:package`.
# Checked after the install: a package can be installed and still miss a command (another package
# took it over, a diversion, a PATH without /usr/sbin), and only the command is what the code needs.
HATCH_TOOLS=(
    qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils
    ip:iproute2 nft:nftables dnsmasq:dnsmasq-base
    mkfs.ext4:e2fsprogs debugfs:e2fsprogs genisoimage:genisoimage busybox:busybox-static
    ssh:openssh-client ssh-keygen:openssh-client dropbear:dropbear-bin
    curl:curl wrk:wrk kill:procps cp:coreutils sha256sum:coreutils umount:mount
    apt-get:apt apt-cache:apt dpkg-deb:dpkg ldd:libc-bin sqlite3:sqlite3
)

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# The image builder looks in these too (mkfs.ext4, debugfs and dnsmasq live in sbin, which a
# normal user's PATH may lack); `type -P` skips shell builtins such as `kill`.
hatch_has_tool() {
    PATH="$PATH:/usr/sbin:/sbin" type -P "$1" >/dev/null 2>&1
}

hatch_pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Prints what is missing, one `package X` or `command X (from package P)` a line; nothing if all is there.
hatch_missing() {
    local p entry
    for p in "$@"; do
        hatch_pkg_installed "$p" || echo "package $p"
    done
    for entry in "${HATCH_TOOLS[@]}"; do
        hatch_has_tool "${entry%%:*}" || echo "command ${entry%%:*} (from package ${entry#*:})"
    done
}

# Prints the packages given that apt has no installable version of (lists missing or stale).
hatch_unknown_to_apt() {
    local known
    known=" $(apt-cache policy "$@" 2>/dev/null |
        awk '/^[^ ]/ {p = $1; sub(/:$/, "", p)} /^  Candidate:/ && $2 != "(none)" {printf "%s ", p}')"
    local p
    for p in "$@"; do
        [[ $known == *" $p "* ]] || echo "$p"
    done
}

# Installs HATCH_APT_PACKAGES plus the packages given, then checks every package and every command
# in HATCH_TOOLS; exits with a message naming what is missing. When everything is there already it
# installs nothing (no sudo prompt); otherwise every missing package goes to apt in one transaction.
install_packages() {
    local pkgs=() p entry tool_pkgs=()
    for entry in "${HATCH_TOOLS[@]}"; do
        tool_pkgs+=("${entry#*:}")
    done
    # The tools' packages too (most are essential ones, already there): a missing command
    # is then installed by the same transaction.
    for p in "${HATCH_APT_PACKAGES[@]}" "${tool_pkgs[@]}" "$@"; do
        [[ " ${pkgs[*]} " == *" $p "* ]] || pkgs+=("$p")
    done
    local missing
    missing=$(hatch_missing "${pkgs[@]}")
    # The image builder downloads the Debian cloud kernel with apt-get download, which needs
    # package lists even when nothing is to be installed.
    local lists=(linux-image-cloud-amd64)
    [ -z "$missing" ] || lists+=("${pkgs[@]}")
    if [ -n "$(hatch_unknown_to_apt "${lists[@]}")" ]; then
        echo "hatch: apt-get update" >&2
        as_root apt-get update -qq || echo "hatch: apt-get update failed; going on with the package lists there are" >&2
    fi
    if [ -n "$missing" ]; then
        # Packages already installed are not named: apt would upgrade them as a side effect.
        local todo=() qemu=()
        for p in "${pkgs[@]}"; do
            case "$p" in
            qemu-system-x86 | qemu-utils) ;;
            *) hatch_pkg_installed "$p" || todo+=("$p") ;;
            esac
        done
        if grep -Eq '^(package qemu-(system-x86|utils)|command qemu-(system-x86_64|img))( |$)' <<<"$missing"; then
            qemu=(qemu-system-x86 qemu-utils)
        fi
        if [ $((${#qemu[@]} + ${#todo[@]})) -gt 0 ] && ! hatch_apt_install "${qemu[@]}" "${todo[@]}"; then
            echo "hatch: apt-get install failed (its messages are above)" >&2
        fi
        missing=$(hatch_missing "${pkgs[@]}")
    fi
    if [ -n "$missing" ]; then
        {
            echo "hatch: missing after installing with apt-get:"
            sed 's/^/  /' <<<"$missing"
            echo "hatch: install these (Debian 12 or newer), then retry"
        } >&2
        exit 1
    fi
}

# One apt-get transaction for everything missing, so apt resolves it together. qemu-system-x86 and
# qemu-utils go together, pinned to qemu-system-x86's candidate version: a machine image may ship a
# newer qemu-utils (from backports) that conflicts with the qemu-system-x86 of the release, and
# asked for qemu-system-x86 alone apt removes it, which leaves no qemu-img. Named together at one
# version it downgrades qemu-utils instead. --no-remove: apt fails rather than remove anything.
hatch_apt_install() {
    local ver args=() p
    ver=$(apt-cache policy qemu-system-x86 2>/dev/null | awk '/Candidate:/ {print $2}')
    for p in "$@"; do
        case "$p" in
        qemu-system-x86 | qemu-utils)
            if [ -n "$ver" ] && [ "$ver" != "(none)" ]; then args+=("$p=$ver"); else args+=("$p"); fi
            ;;
        *) args+=("$p") ;;
        esac
    done
    echo "hatch: apt-get install ${args[*]}" >&2
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        --no-remove --allow-downgrades "${args[@]}" >/dev/null
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

# schemathesis (PyPI) fuzzes the live daemon from its OpenAPI document (tests/openapi.rs). A pinned
# version in a venv under the cargo target dir (Debian's python3 may not pip-install system-wide),
# made once and reused while it holds that version; its `st` is exported as HATCH_TEST_SCHEMATHESIS.
SCHEMATHESIS_VERSION=4.32.5

require_schemathesis() {
    local venv="${CARGO_TARGET_DIR:-$PWD/target}/schemathesis"
    local st="$venv/bin/st"
    if [ "$("$st" --version 2>/dev/null)" != "st, version $SCHEMATHESIS_VERSION" ]; then
        echo "hatch: installing schemathesis $SCHEMATHESIS_VERSION in $venv for the OpenAPI test" >&2
        rm -rf "$venv"
        /usr/bin/python3 -m venv "$venv"
        "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
    fi
    export HATCH_TEST_SCHEMATHESIS="$st"
}
