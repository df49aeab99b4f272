#!/usr/bin/env bash
# Builds the C reference server (ublksrv's `ublk`, `ublk.null`, `ublk.loop`, `ublk.nbd`) for
# `npm run bench:ublk -- --suite cost|nbd --c-ublk PATH`, without autotools and against Debian's
# newest liburing (fetched with scripts/debian-fetch.sh, linked statically, so the binaries run
# unchanged in the test VM, which shares this machine's root file system).
#
#   bench/build-c-ublksrv.sh UBLKSRV_SOURCE_DIR [OUT_DIR]
#
# UBLKSRV_SOURCE_DIR is a checkout of https://github.com/ublk-org/ublksrv (measured at abbfea2);
# OUT_DIR defaults to ~/.cache/ublk/c-ublksrv. Needs gcc and g++ (C++20). Prints OUT_DIR/ublk.
set -euo pipefail
src=$(cd "$1" && pwd)
out=${2:-${UBLK_CACHE:-$HOME/.cache/ublk}/c-ublksrv}
here=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

# liburing: ublksrv needs >= 2.4 (buffer rings); Debian 12's own is 2.3, and sid's needs uapi headers newer than Debian 12's.
# Its headers include uapi headers Debian 12 lacks (linux/blkdev.h): those come from the same
# suite's linux-libc-dev, searched after the system's own (-idirafter), so only missing ones do.
"$here/scripts/debian-fetch.sh" trixie "$work/debs" liburing-dev linux-libc-dev >/dev/null
dpkg-deb -x "$work"/debs/liburing-dev_*.deb "$work/uring"
dpkg-deb -x "$work"/debs/linux-libc-dev_*.deb "$work/uapi"
uring_inc=$work/uring/usr/include
uring_lib=$(dirname "$(find "$work/uring" -name liburing.a | head -1)")

# What configure would have written (configure.ac's defaults).
cat >"$work/config.h" <<'H'
#define UBLK_CONTROL "/dev/ublk-control"
#define UBLKC_PREFIX "/dev"
#define PACKAGE_VERSION "bench"
#define PACKAGE_STRING "ublksrv bench"
#define VERSION "bench"
H
flags=(-O2 -g -D_GNU_SOURCE -pthread -I"$work" -I"$uring_inc" -idirafter "$work/uapi/usr/include" -I"$src/include" -I"$src/targets/include")
objs=()
for f in lib/ublksrv.c lib/ublksrv_cmd.c lib/utils.c lib/ublksrv_aio.c lib/ublksrv_batch.c; do
  [ -f "$src/$f" ] || continue
  gcc "${flags[@]}" -DUBLKSRV_INTERNAL_H_ -c "$src/$f" -o "$work/$(basename "$f").o"
  objs+=("$work/$(basename "$f").o")
done
g++ -std=c++20 "${flags[@]}" -DUBLKSRV_INTERNAL_H_ -c "$src/lib/ublksrv_json.cpp" -o "$work/json.o"
objs+=("$work/json.o")
g++ -std=c++20 "${flags[@]}" -c "$src/targets/ublksrv_tgt.cpp" -o "$work/tgt.o"
mkdir -p "$out"
for prog in ublk ublk.null ublk.loop; do
  g++ -std=c++20 "${flags[@]}" -c "$src/targets/$prog.cpp" -o "$work/$prog.o"
  g++ -o "$out/$prog" "$work/$prog.o" "$work/tgt.o" "${objs[@]}" "$uring_lib/liburing.a" -pthread
done
# The nbd target (`--suite nbd --c-ublk PATH`): its NBD handshake comes from nbd's own client (C).
if [ -f "$src/targets/nbd/ublk.nbd.cpp" ]; then
  nbd_objs=()
  for f in cliserv nbd-client; do
    gcc "${flags[@]}" -I"$src/targets/nbd" -c "$src/targets/nbd/$f.c" -o "$work/nbd-$f.o"
    nbd_objs+=("$work/nbd-$f.o")
  done
  # configure finds send_zc in Debian's liburing, and defines this.
  g++ -std=c++20 -fcoroutines "${flags[@]}" -DHAVE_LIBURING_SEND_ZC=1 -I"$src/targets/nbd" -c "$src/targets/nbd/ublk.nbd.cpp" -o "$work/ublk.nbd.o"
  g++ -o "$out/ublk.nbd" "$work/ublk.nbd.o" "${nbd_objs[@]}" "$work/tgt.o" "${objs[@]}" "$uring_lib/liburing.a" -pthread
fi
echo "$out/ublk"
