#!/usr/bin/env bash
# `npm run setup`: the Debian packages the host tests and benchmarks need, installed if missing.
# `npm run setup:vm` (this script with --vm): also the VM tooling and the four test kernels.
#   gcc, libc6-dev   the ABI conformance test compiles C against real kernel headers
#   dpkg, apt        fetch and unpack Debian sid's linux-libc-dev (scripts/debian-fetch.sh)
#   liburing-dev     the C reference of the ring benchmark (bench/uring-ref.c)
#   fio              the fio reference of the ring benchmark
# With --vm, for the test VM (test/vm/runner.ts):
#   qemu-system-x86  the VM (software emulation where KVM cannot run the kernels)
#   busybox-static, cpio, kmod, xz-utils  the initramfs and module handling
#   e2fsprogs        mkfs/fsck for the file-system tests run in the guest
#   python3-minimal  the loop tests' SEEK_DATA/SEEK_HOLE maps and edge-case pread/pwrite in the guest
#   nbdkit           the NBD server the nbd target's host tests talk to (and the VM tests)
#   nbd-server, nbd-client  (VM) another NBD server to test against, and the kernel's own NBD
#                    client the nbd target is benchmarked against
#   qemu-utils       qemu-img (qcow2 images, check, compare), qemu-nbd, qemu-io for the qcow2 target
#                    (qemu-storage-daemon comes with qemu-system-x86's qemu-system-common)
# Then it warms the caches (sid headers; with --vm the kernels: 6.12 LTS and the newest for the VM
# suite, 6.16 and 7.2 too for the conformance matrix).
set -euo pipefail
cd "$(dirname "$0")/.."
vm=0
[ "${1:-}" = --vm ] && vm=1
pkgs=(gcc libc6-dev liburing-dev fio ca-certificates qemu-utils nbdkit)
[ $vm = 0 ] || pkgs+=(qemu-system-x86 busybox-static cpio kmod xz-utils e2fsprogs python3-minimal nbd-server nbd-client)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "setup: need root to install: ${missing[*]} (sudo npm run setup, or apt-get install them)" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
cache=${UBLK_CACHE:-$HOME/.cache/ublk}
scripts/debian-fetch.sh sid "$cache/debs/sid" linux-libc-dev >/dev/null
if [ $vm = 1 ]; then
  # lts and newest run the VM suite; 6.16 and 7.2 join them for the conformance matrix, which
  # reports a kernel Debian's archive has dropped as not run (backports and sid prune).
  for k in lts newest; do
    dir=$(scripts/vm-kernel.sh "$k")
    echo "setup: kernel $k: $(cat "$dir/package")" >&2
  done
  for k in 6.16 7.2; do
    if dir=$(scripts/vm-kernel.sh "$k"); then
      echo "setup: kernel $k: $(cat "$dir/package")" >&2
    else
      echo "setup: kernel $k is not in Debian's archive: the conformance matrix will say so" >&2
    fi
  done
fi
echo "setup: done" >&2
