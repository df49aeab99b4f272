#!/usr/bin/env bash
# fio-read.sh FILE QD SECONDS
#
# fio's own io_uring engine doing the same work as `uring-ref read`:
# random 4 KiB buffered reads (direct=0) over an existing, page-cached FILE
# (prepare it with bench/prepare-file.sh) at queue depth QD, one job.
# Prints one JSON line: {"mode":"fio-read","qd":QD,"ops_per_sec":X}
#
# Settings worth knowing:
#   --invalidate=0      keep the page cache (fio drops it by default)
#   --allow_file_create=0 --size=<file size>
#                       fio must read the existing file, never create, extend
#                       or lay one out (it errors out if FILE is missing)
#   --ramp_time=1       1 s warm-up excluded from the result
#   --norandommap --randrepeat=1
#                       plain uniform random offsets (no "visit each block
#                       once" map), fixed seed
#   --iodepth_batch_submit=QD --iodepth_batch_complete_max=QD
#                       submit all re-armed reads in one io_uring_enter and
#                       reap up to QD at a time, like uring-ref. fio's default
#                       (iodepth_batch_submit=1) makes one io_uring_enter per
#                       read and measured about half the rate here (~0.5M vs
#                       ~0.95M ops/s at QD32), which is not the same work.
#   fio still keeps its per-I/O latency statistics (clock reads per I/O);
#   FIO_EXTRA="--gtod_reduce=1" turns them off.
#
# FIO_EXTRA (environment) is appended to fio's arguments, so it overrides
# any of the above, e.g. FIO_EXTRA="--iodepth_batch_submit=1" for fio's
# default submission behaviour.
set -euo pipefail

if [ $# -ne 3 ]; then
	echo "usage: $0 FILE QD SECONDS" >&2
	exit 2
fi
file=$1
qd=$2
secs=$3

if [ ! -f "$file" ]; then
	echo "$0: $file does not exist (run bench/prepare-file.sh first)" >&2
	exit 1
fi
size=$(stat -c %s "$file")

out=$(mktemp)
trap 'rm -f "$out"' EXIT

fio --name=rr --filename="$file" --size="$size" \
	--rw=randread --bs=4k --ioengine=io_uring --iodepth="$qd" \
	--direct=0 --invalidate=0 --allow_file_create=0 \
	--norandommap --randrepeat=1 \
	--time_based --runtime="$secs" --ramp_time=1 \
	--iodepth_batch_submit="$qd" --iodepth_batch_complete_max="$qd" \
	--numjobs=1 \
	${FIO_EXTRA:-} \
	--output-format=json --output="$out" >/dev/null

node -e '
const fs = require("fs");
const txt = fs.readFileSync(process.argv[1], "utf8");
const r = JSON.parse(txt.slice(txt.indexOf("{"))); // fio may print notes first
const job = r.jobs[0];
if (job.error) { console.error("fio job error " + job.error); process.exit(1); }
process.stdout.write(JSON.stringify({
	mode: "fio-read",
	qd: Number(process.argv[2]),
	ops_per_sec: Math.round(job.read.iops * 10) / 10,
}) + "\n");
' "$out" "$qd"
