#!/usr/bin/env bash
# Installs everything the build and the tests need on a fresh Debian (bookworm) machine of this
# project's kind. Idempotent: skips what is already there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have qemu-img || need+=(qemu-utils)
have nbdinfo || need+=(libnbd-bin)
have fusermount3 || need+=(fuse3)
have mkfs.ext4 || need+=(e2fsprogs)
have mkfs.vfat || need+=(dosfstools)
have sfdisk || need+=(fdisk)
have mcopy || need+=(mtools)
have debugfs || need+=(e2fsprogs)
have python3 || need+=(python3)
# libnbd's Python bindings: the NBD concurrency stress tests drive many connections with them
/usr/bin/python3 -c 'import nbd' 2>/dev/null || need+=(python3-libnbd)
# a static busybox for the VMM's guest /init script (vmm/tests/boot_e2e.rs)
dpkg-query -W -f='${Status}\n' busybox-static 2>/dev/null | grep -q 'install ok installed' || need+=(busybox-static)
# ISO 9660 images for the DVD-drive boot test (tools/tests/vm_control.rs)
have genisoimage || need+=(genisoimage)
have md5sum || need+=(coreutils)
[ -e /usr/include/fuse3/fuse.h ] || need+=(libfuse3-dev)
have pkg-config || need+=(pkg-config)
# Independent readers the tests compare against: nbdsh (guest-style NBD writes), libvhdi's
# vhdiinfo/vhdimount (VHD and VHDX chains), losetup for block-device tests.
have nbdsh || need+=(python3-libnbd)
have nbdcopy || need+=(libnbd-bin)
have vhdimount || need+=(libvhdi-utils)
have losetup || need+=(mount)
have strace || need+=(strace)

if [ ${#need[@]} -gt 0 ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO=sudo
    echo "setup: installing ${need[*]}" >&2
    $SUDO apt-get update -qq
    # qemu-utils must come from backports (qemu 10); plain bookworm would give 7.2.
    if printf '%s\n' "${need[@]}" | grep -qx qemu-utils; then
        if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
            echo "deb http://deb.debian.org/debian bookworm-backports main" |
                $SUDO tee /etc/apt/sources.list.d/backports.list >/dev/null
            $SUDO apt-get update -qq
        fi
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq -t bookworm-backports qemu-utils
    fi
    rest=()
    for p in "${need[@]}"; do [ "$p" = qemu-utils ] || rest+=("$p"); done
    if [ ${#rest[@]} -gt 0 ]; then
        DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${rest[@]}"
    fi
fi

# Python peers (dissect.hypervisor reads VHDX chains; libvhdi-python is libvhdi's own binding;
# qemu.qmp is QEMU's own QMP client, driving `viridian run --qmp` in tools/tests/vm_control.rs)
# go into a venv inside the project's target/ directory: it works the same whether python3 is
# Debian's (which refuses system-wide pip installs, PEP 668) or another one, needs no
# --break-system-packages, and is removed with the build output.
venv="$(dirname "$0")/../target/peer-venv"
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import dissect.hypervisor, pyvhdi, qemu.qmp' 2>/dev/null; then
    echo "setup: installing dissect.hypervisor, libvhdi-python and qemu.qmp into $venv" >&2
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install -q dissect.hypervisor libvhdi-python qemu.qmp
fi

qemu-img --version | head -1 >&2
