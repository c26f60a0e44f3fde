#!/usr/bin/env bash
# Builds a test guest from stock Debian packages only: the distribution kernel (the package
# bookworm's `linux-image-amd64` depends on, e.g. linux-image-6.1.0-56-amd64) and a gzip'd newc
# initramfs with a static busybox (`busybox-static`), the kernel modules for a Hyper-V synthetic
# SCSI disk and ext4, and a test /init. Prints two lines on stdout: the vmlinuz path and the
# initramfs path (everything else goes to stderr).
#
#   vmm/guest/stock.sh            build (or reuse) the cached pair, print both paths
#   vmm/guest/stock.sh --path     print the paths they would have, build nothing
#
# This guest needs a host whose KVM runs guest user space (ordinary hardware KVM). Our nested
# `kvm_pvm` test hosts do not (docs/vmm.md, "Test hosts"):
# there the kernel-only test of vmm/guest/build.sh is the one to use.
#
# The packages are fetched with `apt-get download` and unpacked with `dpkg-deb -x` into a work
# directory; nothing is installed into the host's /boot or /lib/modules. `apt-get update` runs
# (as root) only when apt has no candidate for linux-image-amd64 or a download fails.
# Host tools: apt-get, apt-cache, dpkg-deb, depmod (kmod), cpio, gzip; xz or zstd only when the
# package compresses its modules.
# Overrides: VIRIDIAN_STOCK_KERNEL_PKG=linux-image-... picks another kernel package.
# Cache: ${VIRIDIAN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/viridian-guest}/stock-<key>/
# {vmlinuz,initramfs.gz} (+ versions, modules.txt), where <key> hashes this script and the two
# package versions. Kernel and initramfs files are never written into the repository.
#
# What the guest's /init does (every line it prints starts with "VIRIDIAN-STOCK: "):
#   1. mounts devtmpfs, proc and sysfs, prints "VIRIDIAN-STOCK: init started";
#   2. insmods hv_vmbus, hv_storvsc, sd_mod and ext4 with all their dependencies (and soft
#      dependencies such as crc32c), in dependency order, as computed on the build host from the
#      package's modules (depmod's modules.dep, modules.softdep, modules.alias);
#   3. waits up to 30 s for /dev/sda (viridian.wait=SECS), then up to 5 s for /dev/sdb;
#   4. if /dev/sdb exists: writes 16 MiB of random data to its start with O_DIRECT, syncs, reads
#      it back with O_DIRECT and compares: "VIRIDIAN-STOCK: dd-direct ok md5=<hex>" or
#      "VIRIDIAN-STOCK: dd-direct FAILED <why>". THE FIRST 16 MiB OF /dev/sdb ARE OVERWRITTEN;
#   5. if /dev/sda1 holds ext2/3/4: mounts it rw, writes /viridian-stock.bin (1 MiB random),
#      unmounts, mounts it read-only, reads the file back and compares:
#      "VIRIDIAN-STOCK: ext4 ok file=/viridian-stock.bin md5=<hex>" or "... ext4 FAILED <why>".
#      The file stays on the disk, so the host can check it afterwards (debugfs -R 'cat ...');
#   6. prints "VIRIDIAN-STOCK: summary ok" or "VIRIDIAN-STOCK: summary FAILED <steps>", then
#      "VIRIDIAN-STOCK: powering off" and runs `poweroff -f` (the VMM sees ACPI S5).
# Kernel command-line switches read by /init:
#   viridian.modules=a,b,c   load these modules (with their dependencies) instead of the default
#                            hv_vmbus,hv_storvsc,sd_mod,ext4. The initramfs also carries ahci,
#                            virtio_pci, virtio_blk and virtio_scsi for checks under QEMU, e.g.
#                            viridian.modules=ahci,sd_mod,ext4 (see vmm/README.md).
#   viridian.disk0=/dev/X    the disk whose first partition is tried as ext4 (default /dev/sda)
#   viridian.disk1=/dev/Y    the scratch disk for the dd test (default /dev/sdb)
#   viridian.wait=SECS       how long to wait for disk0 (default 30)
#
# Recommended run under Viridian's VMM (disk 0 = GPT with one ext4 partition, disk 1 = scratch):
#
#   read -r K I < <(vmm/guest/stock.sh | paste -s -d' ')
#   truncate -s 128M /tmp/stock-root.img
#   printf 'label: gpt\nstart=2048, type=L\n' | sfdisk -q /tmp/stock-root.img
#   mkfs.ext4 -q -F -E offset=1048576 /tmp/stock-root.img 126M
#   truncate -s 64M /tmp/stock-scratch.img
#   viridian run --kernel "$K" --initrd "$I" --memory 512M \
#       --disk /tmp/stock-root.img --disk /tmp/stock-scratch.img \
#       --cmdline "rdinit=/init" --timeout 600
#
# which gives the guest vmm::default_cmdline("rdinit=/init"):
#   console=ttyS0 earlyprintk=ttyS0 reboot=k panic=-1 pci=off
#   clearcpuid=137,141,151,154,308 nopcid noinvpcid nofsgsbase mitigations=off rdinit=/init
# Success: viridian reports "... ended after N s: Poweroff" and the console holds
# "VIRIDIAN-STOCK: summary ok".
# Any --disk may be a VHD or VHDX as well. Checking /init under QEMU TCG (no Hyper-V there, so
# with AHCI disks and viridian.modules=ahci,sd_mod,ext4): vmm/README.md, "Stock Debian kernel +
# busybox initramfs".
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
self="$here/stock.sh"
meta_pkg=linux-image-amd64
bb_pkg=busybox-static
cache_root="${VIRIDIAN_GUEST_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/viridian-guest}"
# Loaded by default: the Hyper-V synthetic SCSI path, the SCSI disk driver and ext4.
default_modules=(hv_vmbus hv_storvsc sd_mod ext4)
# Carried as well, loaded only when named in viridian.modules= (QEMU checks).
extra_modules=(ahci virtio_pci virtio_blk virtio_scsi)

log() { echo "stock-guest: $*" >&2; }
die() { log "error: $*"; exit 2; }

is_root() { [[ $(id -u) -eq 0 ]]; }

candidate() {
    apt-cache policy "$1" 2>/dev/null | awk '$1 == "Candidate:" && $2 != "(none)" {print $2; exit}'
}

# The versioned kernel package linux-image-amd64 depends on.
kernel_pkg_name() {
    if [[ -n "${VIRIDIAN_STOCK_KERNEL_PKG:-}" ]]; then
        echo "$VIRIDIAN_STOCK_KERNEL_PKG"
        return
    fi
    apt-cache depends "$meta_pkg" 2>/dev/null |
        awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ {print $2; exit}'
}

apt_update() {
    is_root || die "apt has stale or no package lists; run 'apt-get update' as root"
    log "apt-get update"
    apt-get update -q >&2
}

# Sets kpkg, kver, bbver from apt's candidates.
resolve_versions() {
    kpkg="$(kernel_pkg_name)"
    kver="${kpkg:+$(candidate "$kpkg")}"
    bbver="$(candidate "$bb_pkg")"
}

key_for() {
    { cat "$self"; echo "$kpkg=$kver"; echo "$bb_pkg=$bbver"; } | sha256sum | cut -c1-16
}

resolve_versions
if [[ "${1:-}" == "--path" ]]; then
    [[ -n "$kver" && -n "$bbver" ]] ||
        die "apt knows no candidate for ${kpkg:-$meta_pkg} or $bb_pkg (run 'apt-get update')"
    out="$cache_root/stock-$(key_for)"
    echo "$out/vmlinuz"
    echo "$out/initramfs.gz"
    exit 0
fi
[[ $# -eq 0 ]] || die "usage: $0 [--path]"

if [[ -z "$kver" || -z "$bbver" ]]; then
    apt_update
    resolve_versions
    [[ -n "$kver" && -n "$bbver" ]] || die "no candidate for ${kpkg:-$meta_pkg} or $bb_pkg in apt"
fi
for tool in apt-get dpkg-deb depmod cpio gzip sha256sum flock; do
    command -v "$tool" >/dev/null || die "$tool not found (packages: apt, dpkg, kmod, cpio, gzip, coreutils, util-linux)"
done

key="$(key_for)"
out="$cache_root/stock-$key"
if [[ -s "$out/vmlinuz" && -s "$out/initramfs.gz" ]]; then
    log "cached: $out ($kpkg $kver, $bb_pkg $bbver)"
    echo "$out/vmlinuz"
    echo "$out/initramfs.gz"
    exit 0
fi

mkdir -p "$cache_root"
exec 9>"$cache_root/.stock-$key.lock"
flock 9
if [[ -s "$out/vmlinuz" && -s "$out/initramfs.gz" ]]; then
    echo "$out/vmlinuz"
    echo "$out/initramfs.gz"
    exit 0
fi

start=$(date +%s)
work="$cache_root/.work-stock-$key"
rm -rf "$work"
mkdir -p "$work/deb" "$work/kernel" "$work/bb" "$work/root"
trap 'rm -rf "$work"' EXIT

# apt-get download as root warns that the _apt sandbox user cannot write to the directory.
apt_dl_opts=()
is_root && apt_dl_opts=(-o APT::Sandbox::User=root)
download() {
    (cd "$work/deb" && apt-get download -q "${apt_dl_opts[@]}" "$@" >&2)
}
log "downloading $kpkg=$kver and $bb_pkg=$bbver"
if ! download "$kpkg=$kver" "$bb_pkg=$bbver"; then
    # Stale lists point at files the mirror no longer has: refresh and start again (once).
    [[ -z "${VIRIDIAN_STOCK_RETRIED:-}" ]] || die "apt-get download failed after apt-get update"
    apt_update
    rm -rf "$work"
    VIRIDIAN_STOCK_RETRIED=1 exec "$self"
fi
kdeb="$(ls "$work"/deb/"${kpkg}"_*.deb)"
bbdeb="$(ls "$work"/deb/"${bb_pkg}"_*.deb)"
log "unpacking $(basename "$kdeb") and $(basename "$bbdeb")"
dpkg-deb -x "$kdeb" "$work/kernel"
dpkg-deb -x "$bbdeb" "$work/bb"

vmlinuz="$(ls "$work"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1)"
[[ -n "$vmlinuz" ]] || die "$kpkg has no /boot/vmlinuz-*"
uname_r="${vmlinuz##*/vmlinuz-}"
# Bookworm ships /lib/modules; later releases /usr/lib/modules.
moddir=""
for d in "$work/kernel/lib/modules/$uname_r" "$work/kernel/usr/lib/modules/$uname_r"; do
    [[ -d "$d" ]] && moddir="$d" && break
done
[[ -n "$moddir" ]] || die "$kpkg has no modules directory for $uname_r"
depbase="${moddir%/lib/modules/$uname_r}"
# The package ships no modules.dep (its postinst runs depmod): make one in the work copy.
if [[ ! -s "$moddir/modules.dep" ]]; then
    log "depmod for $uname_r (work copy only)"
    depmod -b "$depbase" "$uname_r"
fi

# ---- dependency resolution from modules.dep / modules.softdep / modules.alias / builtin ----
norm() { local n="${1##*/}"; n="${n%%.ko*}"; echo "${n//-/_}"; }
declare -A path_of=() deps_of=() builtin=() soft_pre=() soft_post=()
while IFS= read -r line; do
    p="${line%%:*}"
    path_of[$(norm "$p")]="$p"
    deps_of[$p]="${line#*:}"
done <"$moddir/modules.dep"
if [[ -f "$moddir/modules.builtin" ]]; then
    while IFS= read -r p; do builtin[$(norm "$p")]=1; done <"$moddir/modules.builtin"
fi
if [[ -f "$moddir/modules.softdep" ]]; then
    while read -r w name rest; do
        [[ "$w" == softdep ]] || continue
        name="$(norm "$name")"
        mode=""
        for t in $rest; do
            case "$t" in
            pre:) mode=pre ;;
            post:) mode=post ;;
            *) if [[ "$mode" == pre ]]; then soft_pre[$name]+=" $t"; else soft_post[$name]+=" $t"; fi ;;
            esac
        done
    done <"$moddir/modules.softdep"
fi
aliases_for() {
    [[ -f "$moddir/modules.alias" ]] || return 0
    awk -v a="$1" '$1 == "alias" && $2 == a {print $3}' "$moddir/modules.alias"
}

# resolve NAME OPTIONAL: appends to `order` every module NAME needs, dependencies first.
# Soft dependencies (and what they need) are optional: /init tolerates their failure (e.g.
# crc32c-intel on a CPU without SSE4.2, where crc32c_generic serves).
declare -A seen=()
order=()
resolve() {
    local name opt="$2" p d s m found=0
    name="$(norm "$1")"
    [[ -n "${builtin[$name]:-}" ]] && return 0
    p="${path_of[$name]:-}"
    if [[ -z "$p" ]]; then
        for m in $(aliases_for "$1"); do
            resolve "$m" "$opt"
            found=1
        done
        ((found)) || [[ "$opt" == 1 ]] || die "module $1 is neither in modules.dep, builtin nor an alias"
        return 0
    fi
    if [[ -n "${seen[$p]:-}" ]]; then
        # Reached as a soft dependency first and as a hard one now: it, and what it needs,
        # become required.
        if [[ "$opt" == 0 && "${seen[$p]}" != pending && "${order[${seen[$p]}]}" == \?* ]]; then
            order[${seen[$p]}]="$p"
            for d in ${deps_of[$p]}; do resolve "$d" 0; done
        fi
        return 0
    fi
    seen[$p]=pending
    for s in ${soft_pre[$name]:-}; do resolve "$s" 1; done
    for d in ${deps_of[$p]}; do resolve "$d" "$opt"; done
    seen[$p]=${#order[@]}
    if [[ "$opt" == 1 ]]; then order+=("?$p"); else order+=("$p"); fi
    for s in ${soft_post[$name]:-}; do resolve "$s" 1; done
}

root="$work/root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,tmp,mnt,etc/viridian,root}
chmod 1777 "$root/tmp"
modlist="$root/etc/viridian/modules"
: >"$modlist"
declare -A copied=()
stripped() { local p="$1"; p="${p%.xz}"; p="${p%.zst}"; echo "${p%.gz}"; }
for top in "${default_modules[@]}" "${extra_modules[@]}"; do
    seen=()
    order=()
    resolve "$top" 0
    line="$(norm "$top")"
    for e in "${order[@]}"; do
        opt=""
        [[ "$e" == \?* ]] && opt="?" && e="${e#\?}"
        dst="/lib/modules/$uname_r/$(stripped "$e")"
        line+=" $opt$dst"
        [[ -n "${copied[$e]:-}" ]] && continue
        copied[$e]=1
        mkdir -p "$(dirname "$root$dst")"
        # Decompress on the host: busybox insmod may not read compressed modules.
        case "$e" in
        *.ko.xz) xz -dc "$moddir/$e" >"$root$dst" ;;
        *.ko.zst) zstd -q -dc "$moddir/$e" >"$root$dst" ;;
        *.ko.gz) gzip -dc "$moddir/$e" >"$root$dst" ;;
        *) cp "$moddir/$e" "$root$dst" ;;
        esac
    done
    echo "$line" >>"$modlist"
done
log "modules: ${#copied[@]} files; load order per module:"
sed 's/^/stock-guest:   /' "$modlist" >&2

# ---- busybox with applet links ----
cp "$work/bb/bin/busybox" "$root/bin/busybox"
chmod 755 "$root/bin/busybox"
"$root/bin/busybox" --list-full | while IFS= read -r applet; do
    [[ "$applet" == bin/busybox ]] && continue
    mkdir -p "$root/$(dirname "$applet")"
    ln -sf /bin/busybox "$root/$applet"
done
[[ -L "$root/bin/sh" ]] || ln -sf /bin/busybox "$root/bin/sh"
# The kernel's built-in initramfs already has /dev/console; add it where we may (root).
is_root && mknod -m 600 "$root/dev/console" c 5 1

printf '%s\n' "VIRIDIAN_DEFAULT_MODULES=\"${default_modules[*]}\"" "VIRIDIAN_KERNEL=\"$kpkg $kver\"" \
    "VIRIDIAN_BUSYBOX=\"$bb_pkg $bbver\"" >"$root/etc/viridian/build"

# ---- /init ----
cat >"$root/init" <<'INIT'
#!/bin/sh
# Viridian stock-kernel test init, written by vmm/guest/stock.sh. Never exits: ends with
# poweroff -f (an exiting init would panic the kernel).
PATH=/bin:/sbin:/usr/bin:/usr/sbin
export PATH
mount -t devtmpfs devtmpfs /dev 2>/dev/null
exec </dev/console >/dev/console 2>&1
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo "VIRIDIAN-STOCK: init started"
. /etc/viridian/build

say() { echo "VIRIDIAN-STOCK: $*"; }
uptime_s() { read -r up _ </proc/uptime; echo "${up%.*}"; }
step() { read -r up _ </proc/uptime; say "[${up}s] $*"; }
FAILS=""
fail() { FAILS="$FAILS $1"; say "$1 FAILED $2"; }

# Ends the run whatever happened before.
finish() {
    if [ -z "$FAILS" ]; then say "summary ok"; else say "summary FAILED$FAILS"; fi
    sync
    step "powering off"
    poweroff -f
    sleep 5
    echo o >/proc/sysrq-trigger
    while :; do sleep 60; done
}

step "kernel $(uname -r); $VIRIDIAN_KERNEL; $VIRIDIAN_BUSYBOX"
say "cmdline: $(cat /proc/cmdline)"
MODULES="$VIRIDIAN_DEFAULT_MODULES"
DISK0=/dev/sda
DISK1=/dev/sdb
WAIT=30
for w in $(cat /proc/cmdline); do
    case "$w" in
    viridian.modules=*) MODULES="$(echo "${w#*=}" | tr ',' ' ')" ;;
    viridian.disk0=*) DISK0="${w#*=}" ;;
    viridian.disk1=*) DISK1="${w#*=}" ;;
    viridian.wait=*) WAIT="${w#*=}" ;;
    esac
done

# ---- modules, dependencies first (lists made on the build host) ----
step "loading modules: $MODULES"
LOADED=" "
for top in $MODULES; do
    top="$(echo "$top" | tr '-' '_')"
    line="$(grep "^$top " /etc/viridian/modules)"
    if [ -z "$line" ]; then
        fail "module-$top" "(not in this initramfs; have: $(cut -d' ' -f1 /etc/viridian/modules | tr '\n' ' '))"
        continue
    fi
    for p in ${line#* }; do
        opt=""
        case "$p" in \?*) opt=1; p="${p#?}" ;; esac
        case "$LOADED" in *" $p "*) continue ;; esac
        LOADED="$LOADED$p "
        name="$(basename "$p" .ko)"
        if msg="$(insmod "$p" 2>&1)"; then
            say "insmod $name ok"
        elif echo "$msg" | grep -q 'File exists'; then
            say "insmod $name: already loaded"
        elif [ -n "$opt" ]; then
            say "insmod $name: optional soft dependency not loaded ($msg)"
        else
            fail "insmod-$name" "($msg)"
        fi
    done
done

# ---- disks ----
wait_block() { # DEV SECS
    deadline=$(($(uptime_s) + $2))
    while [ ! -b "$1" ]; do
        [ "$(uptime_s)" -ge "$deadline" ] && return 1
        sleep 0.2
    done
    return 0
}
step "waiting up to ${WAIT}s for $DISK0"
if wait_block "$DISK0" "$WAIT"; then
    step "$DISK0 present ($(cat /sys/class/block/${DISK0#/dev/}/size) sectors)"
else
    fail "disk0" "($DISK0 did not appear within ${WAIT}s)"
    say "block devices: $(ls /sys/class/block 2>/dev/null | tr '\n' ' ')"
    finish
fi
if wait_block "$DISK1" 5; then
    step "$DISK1 present ($(cat /sys/class/block/${DISK1#/dev/}/size) sectors)"
fi

# ---- raw O_DIRECT write / read-back on disk 1 ----
dd_test() {
    d="$DISK1"
    if [ ! -b "$d" ]; then
        say "dd-direct skipped (no $d)"
        return
    fi
    sectors="$(cat /sys/class/block/${d#/dev/}/size)"
    if [ "$sectors" -lt 32768 ]; then
        fail dd-direct "($d has $sectors sectors, fewer than 16 MiB)"
        return
    fi
    step "dd: 16 MiB random pattern"
    if ! dd if=/dev/urandom of=/tmp/pattern bs=1M count=16 iflag=fullblock; then
        fail dd-direct "(cannot make the pattern in /tmp)"
        return
    fi
    step "dd: pattern -> $d (oflag=direct)"
    if ! dd if=/tmp/pattern of="$d" bs=1M oflag=direct; then
        fail dd-direct "(write to $d)"
        return
    fi
    sync
    step "dd: $d -> readback (iflag=direct)"
    if ! dd if="$d" of=/tmp/readback bs=1M count=16 iflag=direct; then
        fail dd-direct "(read from $d)"
        return
    fi
    want="$(md5sum </tmp/pattern)"; want="${want%% *}"
    got="$(md5sum </tmp/readback)"; got="${got%% *}"
    if cmp -s /tmp/pattern /tmp/readback; then
        say "dd-direct ok md5=$want"
    else
        fail dd-direct "(read back differs: wrote md5=$want, read md5=$got; $(cmp /tmp/pattern /tmp/readback 2>&1 | head -n1))"
    fi
    rm -f /tmp/pattern /tmp/readback
}

# ---- ext4 on disk 0 partition 1 ----
ext4_test() {
    p="${DISK0}1"
    case "$DISK0" in *[0-9]) p="${DISK0}p1" ;; esac
    if ! wait_block "$p" 5; then
        say "ext4 skipped (no $p)"
        return
    fi
    magic="$(dd if="$p" bs=1 skip=1080 count=2 2>/dev/null | od -An -tx1 | tr -d ' \n')"
    if [ "$magic" != "53ef" ]; then
        say "ext4 skipped ($p holds no ext2/3/4 superblock: magic '$magic')"
        return
    fi
    mkdir -p /mnt
    step "ext4: mount $p rw"
    if ! mount -t ext4 -o rw "$p" /mnt; then
        fail ext4 "(mount -t ext4 $p rw)"
        return
    fi
    dd if=/dev/urandom of=/tmp/ext4ref bs=64k count=16 2>/dev/null
    want="$(md5sum </tmp/ext4ref)"; want="${want%% *}"
    step "ext4: write /viridian-stock.bin (1 MiB)"
    if ! cp /tmp/ext4ref /mnt/viridian-stock.bin || ! sync; then
        fail ext4 "(write /viridian-stock.bin)"
        umount /mnt
        return
    fi
    if ! umount /mnt; then
        fail ext4 "(umount after writing)"
        return
    fi
    step "ext4: remount read-only and read back"
    if ! mount -t ext4 -o ro "$p" /mnt; then
        fail ext4 "(mount -t ext4 $p ro)"
        return
    fi
    got="$(md5sum </mnt/viridian-stock.bin)"; got="${got%% *}"
    if cmp -s /tmp/ext4ref /mnt/viridian-stock.bin; then
        say "ext4 ok file=/viridian-stock.bin md5=$want"
    else
        fail ext4 "(read back differs: wrote md5=$want, read md5=$got)"
    fi
    umount /mnt || fail ext4 "(umount after reading)"
    rm -f /tmp/ext4ref
}

dd_test
ext4_test
finish
INIT
chmod 755 "$root/init"

log "packing the initramfs"
mkdir -p "$out.tmp"
(cd "$root" && find . -print0 | LC_ALL=C sort -z |
    cpio --null -o -H newc -R 0:0 --reproducible --quiet) | gzip -9n >"$out.tmp/initramfs.gz"
cp "$vmlinuz" "$out.tmp/vmlinuz"
printf '%s\n' "$kpkg $kver" "$bb_pkg $bbver" "uname -r $uname_r" >"$out.tmp/versions"
cp "$modlist" "$out.tmp/modules.txt"
rm -rf "$out"
mv "$out.tmp" "$out"
log "built in $(($(date +%s) - start)) s: $out (initramfs $(du -k "$out/initramfs.gz" | cut -f1) KiB)"
echo "$out/vmlinuz"
echo "$out/initramfs.gz"
