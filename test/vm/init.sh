#!/bin/busybox sh
# PID 1 of the test VM (see test/vm/runner.ts, which appends this file to the initramfs).
#
# Loads the 9p modules, mounts the host's root read-only, tmpfs on /tmp and /run, the project
# directory read-write at its own path and the runner's job directory at /run/ublk-vm, loads
# ublk_drv, then runs /run/ublk-vm/cmd.sh chrooted into the host root, so node, fio, mkfs and
# the project's node_modules are the host's own. The command's output goes to the second serial
# port (the runner's stdout); this script's messages and the kernel's go to the first (a log).
# The exit status is written to /run/ublk-vm/status, then the VM powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev

# fd 3 stays on the console after /dev moves into the new root.
exec 3>/dev/ttyS0
say() { echo "ublk-vm: $*" >&3; }
die() { say "FATAL: $*"; poweroff -f; }

for arg in $(cat /proc/cmdline); do
  case $arg in
    ublk.project=*) PROJECT=${arg#*=} ;;
    ublk.kroot=*) KROOT=${arg#*=} ;;
  esac
done
[ -n "$PROJECT" ] && [ -n "$KROOT" ] || die "ublk.project= and ublk.kroot= are required on the kernel command line"
echo "$KROOT" >/kroot

for m in $(cat /modules/order); do insmod "/modules/$m" || die "insmod $m"; done
opts=trans=virtio,version=9p2000.L,msize=262144
# The host root and the project never change under us during a run: let the guest cache them.
# Uncached, every stat and read of a module went to the host, and under emulation that made
# each `node bin/ublk.js` cost 4.5 s (2.3 s cached, measured on 7.3.4: resolving and loading
# the CLI's modules is mostly stat calls); the suite runs hundreds. The job directory carries
# the results back while the host watches it: no caching there.
mount -t 9p -o "$opts,ro,cache=loose" hostroot /newroot || die "mount host root"
mount -t tmpfs -o mode=1777 tmpfs /newroot/tmp || die "tmpfs /tmp"
mount -t tmpfs -o mode=755 tmpfs /newroot/run || die "tmpfs /run"
mount --move /dev /newroot/dev || die "move /dev"
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts devpts /newroot/dev/pts
mount -t tmpfs tmpfs /newroot/dev/shm
mount -t proc proc /newroot/proc
mount -t sysfs sysfs /newroot/sys
# A project under /tmp sits below the guest's own tmpfs: make its mount point there.
mkdir -p "/newroot$PROJECT" 2>/dev/null
mount -t 9p -o "$opts,cache=loose" project "/newroot$PROJECT" || die "mount project at $PROJECT"
mkdir -p /newroot/run/ublk-vm
mount -t 9p -o "$opts" job /newroot/run/ublk-vm || die "mount job directory"
[ -e /newroot/dev/fd ] || ln -s /proc/self/fd /newroot/dev/fd
ip link set lo up 2>/dev/null
chroot /newroot /sbin/modprobe -d "$KROOT" ublk_drv || die "modprobe ublk_drv"
stty -F /newroot/dev/ttyS1 raw -echo 2>/dev/null

say "READY $(uname -r)"
chroot /newroot /bin/sh /run/ublk-vm/cmd.sh </dev/null >/newroot/dev/ttyS1 2>&1
rc=$?
echo "$rc" >/newroot/run/ublk-vm/status
sync
say "EXIT $rc"
poweroff -f
