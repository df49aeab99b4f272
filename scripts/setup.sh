#!/usr/bin/env bash
# `npm run setup`: the Debian packages the tests and benchmarks need, installed if missing.
#   gcc, libc6-dev   the ABI conformance test compiles C against real kernel headers
#   dpkg, apt        fetch and unpack Debian sid's linux-libc-dev (scripts/debian-fetch.sh)
#   liburing-dev     the C reference of the ring benchmark (bench/uring-ref.c)
#   fio              the fio reference of the ring benchmark
# Then it warms the cache of sid headers so the first test run does not wait for the download.
set -euo pipefail
cd "$(dirname "$0")/.."
pkgs=(gcc libc6-dev liburing-dev fio ca-certificates)
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
echo "setup: done (Debian packages present; sid linux-libc-dev in $cache/debs/sid)" >&2
