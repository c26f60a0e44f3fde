#!/usr/bin/env bash
# Builds Viridian's test-guest kernel from Debian packages only and prints the path of the
# uncompressed ELF vmlinux on stdout (everything else goes to stderr). The same kernel as an
# LZ4 bzImage lies beside it as `bzImage`.
#
#   vmm/guest/build.sh            build (or reuse) the cached kernel, print its path
#   vmm/guest/build.sh --path     print the path the kernel would have, build nothing
#
# Needs (installed with apt-get when missing and running as root): linux-source-6.1, bc, flex,
# bison, libelf-dev, libssl-dev, xz-utils, make, gcc, cpio.
# Cache: ${VIRIDIAN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/viridian-guest}/<key>/vmlinux,
# where <key> hashes this script, kernel.fragment and the linux-source package version.
# Kernel binaries are never written into the repository.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
fragment="$here/kernel.fragment"
pkg=linux-source-6.1
cache_root="${VIRIDIAN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/viridian-guest}"
jobs="${VIRIDIAN_GUEST_JOBS:-$(nproc)}"

log() { echo "guest-build: $*" >&2; }

pkg_version() {
    dpkg-query -W -f='${Status} ${Version}\n' "$pkg" 2>/dev/null | awk '/install ok installed/ {print $4}'
}

install_deps() {
    local need=()
    for p in "$pkg" bc flex bison libelf-dev libssl-dev xz-utils lz4 make gcc cpio; do
        dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
    done
    if ((${#need[@]})); then
        if [[ $(id -u) -ne 0 ]]; then
            log "missing packages: ${need[*]} (install them with apt-get as root)"
            exit 2
        fi
        log "installing ${need[*]}"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2 ||
            { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >&2; }
    fi
}

key_for() {
    local ver="$1"
    { cat "$fragment" "$here/build.sh"; echo "$pkg=$ver"; } | sha256sum | cut -c1-16
}

if [[ "${1:-}" == "--path" ]]; then
    ver="$(pkg_version)"
    [[ -n "$ver" ]] || { log "$pkg not installed"; exit 2; }
    echo "$cache_root/$(key_for "$ver")/vmlinux"
    exit 0
fi

install_deps
ver="$(pkg_version)"
key="$(key_for "$ver")"
out="$cache_root/$key"
if [[ -s "$out/vmlinux" && -s "$out/bzImage" ]]; then
    log "cached: $out/vmlinux"
    echo "$out/vmlinux"
    exit 0
fi

mkdir -p "$cache_root"
# One build at a time per cache key (tests may call this concurrently).
exec 9>"$cache_root/.$key.lock"
flock 9
if [[ -s "$out/vmlinux" && -s "$out/bzImage" ]]; then
    echo "$out/vmlinux"
    exit 0
fi

work="$cache_root/.work-$key"
rm -rf "$work"
mkdir -p "$work"
tarball="$(ls /usr/src/linux-source-6.1.tar.* 2>/dev/null | head -n1)"
[[ -n "$tarball" ]] || { log "no /usr/src/linux-source-6.1.tar.* from $pkg"; exit 2; }
log "unpacking $tarball ($pkg $ver)"
tar -C "$work" -xf "$tarball"
src="$(find "$work" -mindepth 1 -maxdepth 1 -type d | head -n1)"

start=$(date +%s)
log "configuring (tinyconfig + kernel.fragment)"
make -C "$src" -s tinyconfig >&2
"$src/scripts/kconfig/merge_config.sh" -m -O "$src" "$src/.config" "$fragment" >&2
make -C "$src" -s olddefconfig >&2
# Report fragment options that did not stick (a typo or an unmet dependency).
missing=0
while IFS= read -r line; do
    [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]] || continue
    opt="${BASH_REMATCH[1]}" val="${BASH_REMATCH[2]}"
    if [[ "$val" == n ]]; then
        grep -q "^$opt=" "$src/.config" && { log "warning: $opt should be off"; missing=1; }
    else
        grep -qx "$opt=$val" "$src/.config" || { log "warning: $opt=$val did not stick"; missing=1; }
    fi
done <"$fragment"

log "building vmlinux and bzImage with -j$jobs (about 6 minutes on 2 idle cores)"
make -C "$src" -s -j"$jobs" vmlinux bzImage >&2
mkdir -p "$out.tmp"
cp "$src/vmlinux" "$out.tmp/vmlinux"
cp "$src/arch/x86/boot/bzImage" "$out.tmp/bzImage"
cp "$src/.config" "$out.tmp/config"
echo "$pkg $ver" >"$out.tmp/version"
rm -rf "$out"
mv "$out.tmp" "$out"
rm -rf "$work"
log "built in $(($(date +%s) - start)) s: $out/vmlinux"
echo "$out/vmlinux"
