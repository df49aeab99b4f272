#!/usr/bin/env bash
# prepare-file.sh PATH SIZE_MB
#
# Creates PATH as SIZE_MB MiB of random (non-zero) data unless it already
# exists with exactly that size, then reads it once so it sits in the page
# cache for the buffered-read benchmarks (bench/uring-ref.c read mode,
# bench/fio-read.sh, and the TypeScript side).
set -euo pipefail

if [ $# -ne 2 ]; then
	echo "usage: $0 PATH SIZE_MB" >&2
	exit 2
fi
path=$1
size_mb=$2
case $size_mb in
'' | *[!0-9]*) echo "$0: SIZE_MB must be a positive integer" >&2; exit 2 ;;
esac
[ "$size_mb" -gt 0 ] || { echo "$0: SIZE_MB must be > 0" >&2; exit 2; }

want=$((size_mb * 1024 * 1024))
have=$(stat -c %s "$path" 2>/dev/null || echo -1)

if [ "$have" != "$want" ]; then
	echo "creating $path ($size_mb MiB)" >&2
	tmp="$path.tmp.$$"
	trap 'rm -f "$tmp"' EXIT
	# 1 MiB blocks of random bytes; iflag=fullblock guards against short
	# reads from /dev/urandom.
	dd if=/dev/urandom of="$tmp" bs=1M count="$size_mb" iflag=fullblock status=none
	mv -f "$tmp" "$path"
	trap - EXIT
fi

# Pull the whole file into the page cache.
cat "$path" >/dev/null
echo "ready: $path ($size_mb MiB, read once into the page cache)" >&2
