#!/usr/bin/env bash
# Download Debian packages (without installing them) through a private apt configuration,
# so the host's own sources, lists and cache are never touched.
#
#   scripts/debian-fetch.sh SUITE DEST PACKAGE...     download .debs into DEST
#   scripts/debian-fetch.sh SUITE --apt-cache ARGS...  run apt-cache on that suite's lists
#
# SUITE is a Debian suite name (sid, bookworm, bookworm-security, trixie-backports), main only.
# The .deb files land in DEST.
# The apt lists live in ${UBLK_CACHE:-~/.cache/ublk}/apt/SUITE and are refreshed at most once an hour.
set -euo pipefail
suite=$1 dest=$2; shift 2
cache=${UBLK_CACHE:-$HOME/.cache/ublk}/apt/$suite
mkdir -p "$cache/lists/partial" "$cache/archives/partial"
[ "$dest" = --apt-cache ] || mkdir -p "$dest"
case $suite in
  *-security) uri=http://deb.debian.org/debian-security ;;
  *) uri=http://deb.debian.org/debian ;;
esac
cat >"$cache/sources.list" <<SRC
deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $uri $suite main
SRC
: >"$cache/status"
opts=(-o "Dir::Etc::SourceList=$cache/sources.list" -o "Dir::Etc::SourceParts=/dev/null"
      -o "Dir::State=$cache" -o "Dir::State::Lists=$cache/lists" -o "Dir::State::status=$cache/status"
      -o "Dir::Cache=$cache" -o "Dir::Cache::archives=$cache/archives" -o "APT::Architecture=amd64"
      -o "Debug::NoLocking=1" -o "APT::Sandbox::User=root")
if [ -z "$(find "$cache/lists" -name '*Packages*' -mmin -60 2>/dev/null | head -1)" ]; then
  apt-get "${opts[@]}" -qq update >&2
fi
if [ "$dest" = --apt-cache ]; then
  exec apt-cache "${opts[@]}" "$@"
fi
cd "$dest"
apt-get "${opts[@]}" -qq download "$@" >&2
ls -1 "$dest"
