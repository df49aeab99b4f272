#!/bin/sh
# Where loop on ext4 differs from loop on tmpfs, inside the VM:
#   npm run vm -- --kernel newest sh bench/loop-iowq.sh            (MODES="--auto_zc -z" by default)
# For each data path and each backing (a 512 MiB file of random data on tmpfs, and a copy on
# ext4 on a brd RAM disk), 4 s of fio 4 KiB randread and randwrite at QD 32 on a 1-queue loop
# device, printing IOPS, the context switches of all the server's threads, and those of its
# io-wq workers (iou-wrk-*): a request io_uring could not issue without blocking (the backing
# returned EAGAIN to IOCB_NOWAIT) runs on such a worker, so their switches bound how often that
# happened. Not part of `npm run bench:ublk` (its numbers are counts, not ratios).
set -u
cd "$(dirname "$0")/.."
modprobe -d "$UBLK_VM_KROOT" brd rd_nr=1 rd_size=$((640 * 1024))
mkfs.ext4 -q /dev/ram0
mkdir -p /tmp/ext4
mount /dev/ram0 /tmp/ext4
dd if=/dev/urandom of=/tmp/loop-iowq.img bs=1M count=512 status=none
cp /tmp/loop-iowq.img /tmp/ext4/loop-iowq.img
sync
echo 3 > /proc/sys/vm/drop_caches

# The sum of voluntary and involuntary context switches of the server's threads named $2 (all: '.').
switches() {
  for t in /proc/$1/task/*; do grep -q "$2" "$t/comm" && grep -h ctxt "$t/status"; done | awk '{s += $2} END {print s + 0}'
}

for mode in ${MODES:---auto_zc -z}; do
  for dir in /tmp /tmp/ext4; do
    if ! node bin/ublk.js add -t loop -f "$dir/loop-iowq.img" "$mode" >/dev/null; then
      echo "$mode $dir: add failed"
      continue
    fi
    id=$(ls /sys/block | sed -n 's/^ublkb//p' | sort -n | tail -1)
    echo none > "/sys/block/ublkb$id/queue/scheduler" 2>/dev/null
    pid=$(node bin/ublk.js list -n "$id" --json | sed -n 's/.*"daemon_pid": *\([0-9]*\).*/\1/p' | head -1)
    for rw in randread randwrite; do
      all0=$(switches "$pid" .)
      wq0=$(switches "$pid" iou-wrk)
      fio --name=probe --filename="/dev/ublkb$id" --rw=$rw --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --runtime=4 --time_based --output-format=terse --terse-version=3 >/tmp/loop-iowq.fio
      all1=$(switches "$pid" .)
      wq1=$(switches "$pid" iou-wrk)
      iops=$(awk -F';' '{print $8 + $49}' /tmp/loop-iowq.fio)
      echo "$mode $dir $rw: $iops IOPS, server threads $((all1 - all0)) context switches, io-wq workers $((wq1 - wq0))"
    done
    node bin/ublk.js del -n "$id"
  done
done
umount /tmp/ext4
