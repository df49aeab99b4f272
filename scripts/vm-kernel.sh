#!/usr/bin/env bash
# Prepares a Debian kernel for the test VM and prints the directory that holds it:
#
#   scripts/vm-kernel.sh lts|newest|VERSION
#
#   lts      the newest linux-image-6.12.*+debNN-amd64 in bookworm-security (Linux 6.12 LTS)
#   newest   the newest linux-image-*+debNN-amd64 in sid or trixie-backports, by upstream
#            version (sort -V; on a tie, the higher +debNN); backports often runs ahead of sid
#   VERSION  e.g. 6.12.117, 7.2.13 or 7.3.4: that version from the first of bookworm-security,
#            sid, trixie-backports that has it
#   SERIES   e.g. 6.16 or 7.2: the newest release of that series in any of the three
#
# The directory ($UBLK_CACHE/kernels/<kernel release>, default ~/.cache/ublk) holds
#   vmlinuz      the kernel
#   modules.cpio.gz  the initramfs base: static busybox and the 9p modules, decompressed; the
#                VM runner appends /init (test/vm/init.sh) at boot, so editing it needs no rebuild
#   root/        the package's modules with a modules.dep (depmod), for modprobe inside the VM
#   package      the Debian package name, version and suite, for test output:
#                "linux-image-7.3.4+deb13-amd64 7.3.4-1~bpo13+1 (trixie-backports)"
# Packages come through scripts/debian-fetch.sh's private apt configuration; nothing is
# installed on the host. A prepared kernel is reused until the cache is removed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${UBLK_CACHE:-$HOME/.cache/ublk}
spec=${1:?usage: vm-kernel.sh lts|newest|VERSION}

for tool in busybox cpio depmod modprobe xz dpkg-deb flock; do
  command -v "$tool" >/dev/null || { echo "vm-kernel: $tool is missing: run npm run setup:vm" >&2; exit 1; }
done
[ -x /bin/busybox ] && file_bb=/bin/busybox || file_bb=$(command -v busybox)

# collect SUITE REGEX: adds SUITE's kernel packages whose names match REGEX to $found, one
# "UPSTREAM-VERSION PACKAGE SUITE" line each; pick prints the newest line (sort -V on the
# upstream version, then on the name, so 7.3.4+deb14 beats 7.3.4+deb13).
found=
collect() {
  local names name v
  names=$("$here/debian-fetch.sh" "$1" --apt-cache search --names-only "$2" | cut -d' ' -f1)
  for name in $names; do
    v=${name#linux-image-}; v=${v%%[+-]*}
    found+="$v $name $1"$'\n'
  done
}
pick() { printf '%s' "$found" | sort -k1,1V -k2,2V | tail -n 1; }
case $spec in
  lts) collect bookworm-security '^linux-image-6\.12\.[0-9]+\+deb[0-9]+-amd64$' ;;
  newest)
    for s in sid trixie-backports; do collect "$s" '^linux-image-[0-9][0-9.]*\+deb[0-9]+-amd64$'; done ;;
  [0-9]*.[0-9]*.[0-9]*)
    re="^linux-image-${spec//./\\.}(\\+deb[0-9]+)?-amd64\$"
    for s in bookworm-security sid trixie-backports; do collect "$s" "$re"; [ -z "$found" ] || break; done ;;
  [0-9]*.[0-9]*)
    # A series (6.16): its newest release in any of the three suites.
    re="^linux-image-${spec//./\\.}\\.[0-9]+\\+deb[0-9]+-amd64\$"
    for s in bookworm-security sid trixie-backports; do collect "$s" "$re"; done ;;
  *) echo "vm-kernel: unknown kernel '$spec' (lts, newest, a version like 6.12.117 or a series like 6.16)" >&2; exit 2 ;;
esac
read -r _ pkg suite <<<"$(pick)" || true
[ -n "${pkg:-}" ] || { echo "vm-kernel: no Debian package found for kernel '$spec'" >&2; exit 1; }
release=${pkg#linux-image-}
kdir=$cache/kernels/$release
if [ -f "$kdir/ready" ]; then echo "$kdir"; exit 0; fi
# One preparation per kernel at a time (parallel test runs): wait for the other, then reuse it.
mkdir -p "$cache/kernels"
exec 9>"$cache/kernels/.lock-$release"
flock 9
if [ -f "$kdir/ready" ]; then echo "$kdir"; exit 0; fi

echo "vm-kernel: preparing $pkg from $suite ($spec)" >&2
work=$(mktemp -d "$cache/kernels/.work.XXXXXX")
trap 'rm -rf "$work"' EXIT
"$here/debian-fetch.sh" "$suite" "$work/debs" "$pkg" >/dev/null
main=$(ls "$work"/debs/"$pkg"_*.deb)
version=$(dpkg-deb -f "$main" Version)
# Newer packages (sid's; trixie-backports' since 6.19) split the kernel into linux-binary-*
# (vmlinuz), linux-modules-* and linux-base-* (modules.builtin, modules.order, config) and leave
# the image package empty but for Depends: fetch the ones it names. Older ones hold it all.
extra=$(dpkg-deb -f "$main" Depends | tr ',' '\n' | sed -n "s/^ *\(linux-\(binary\|modules\|base\)-$(printf '%s' "$release" | sed 's/[.]/\\&/g')\).*/\1/p" | sort -u)
[ -z "$extra" ] || "$here/debian-fetch.sh" "$suite" "$work/debs" $extra >/dev/null
mkdir -p "$work/root"
for deb in "$work"/debs/*.deb; do dpkg-deb -x "$deb" "$work/root"; done

# Merged-/usr packages put modules under usr/lib; depmod and modprobe -d look under lib/.
if [ ! -d "$work/root/lib/modules/$release" ] && [ -d "$work/root/usr/lib/modules/$release" ]; then
  mkdir -p "$work/root/lib/modules"
  ln -s "../../usr/lib/modules/$release" "$work/root/lib/modules/$release"
fi
moddir=$work/root/lib/modules/$release
vmlinuz=
for f in "$work/root/boot/vmlinuz-$release" "$moddir/vmlinuz"; do [ -f "$f" ] && { vmlinuz=$f; break; }; done
[ -n "$vmlinuz" ] || { echo "vm-kernel: no vmlinuz in $pkg" >&2; exit 1; }
depmod -b "$work/root" "$release"
for m in ublk_drv null_blk 9p; do
  modprobe -d "$work/root" -S "$release" --show-depends "$m" >/dev/null ||
    { echo "vm-kernel: $pkg has no $m module" >&2; exit 1; }
done

# The initramfs base: static busybox and the 9p stack, decompressed (busybox insmod cannot read
# .ko.xz), in dependency order. test/vm/runner.ts appends /init and /sbin/modprobe.
ird=$work/initramfs
mkdir -p "$ird/bin" "$ird/sbin" "$ird/modules" "$ird/proc" "$ird/sys" "$ird/dev" "$ird/newroot"
cp "$file_bb" "$ird/bin/busybox"
: >"$ird/modules/order"
for m in 9pnet_virtio 9p; do
  modprobe -d "$work/root" -S "$release" --show-depends "$m" | while read -r kind path _; do
    [ "$kind" = insmod ] || continue
    name=$(basename "$path"); name=${name%.xz}; name=${name%.zst}
    grep -qx "$name" "$ird/modules/order" && continue
    case $path in
      *.xz) xz -dc "$path" >"$ird/modules/$name" ;;
      *.zst) zstd -dc "$path" >"$ird/modules/$name" ;;
      *) cp "$path" "$ird/modules/$name" ;;
    esac
    echo "$name" >>"$ird/modules/order"
  done
done
(cd "$ird" && find . | cpio -o -H newc --quiet | gzip -1) >"$work/modules.cpio.gz"

cp "$vmlinuz" "$work/vmlinuz"
echo "$pkg $version ($suite)" >"$work/package"
rm -rf "$work/debs" "$work/initramfs"
touch "$work/ready"
rm -rf "$kdir"
mv "$work" "$kdir"
trap - EXIT
echo "$kdir"
