#!/bin/bash
# Runs inside the test guest (tests/guest/run.sh): the Linux kernel NVMe/TCP initiator, nvme-cli
# and fio against tidemarkd on the host (10.0.2.2 is the host's 127.0.0.1).
#
# Variables from the host test (tests/nvmf_guest.rs): PORT, NQN (allow_any_host, nsid 1 = a
# 256 MiB malloc bdev, nsid 2 = a small one that the host removes on request), NQN_RESTRICTED
# (only HOST_ALLOWED may connect), NQN_POOL and NQN_CLONE (pool volumes, below), HOST_GUEST and
# HOST_ALLOWED (host NQNs), FIO_SECS, NQN_ANA (ana_reporting, nsid 1 a 64 MiB malloc bdev,
# listening on PORT and PORT2), NQN_MANY (MANY thin 4 MiB volumes of the pool, nsid 1..MANY).
# The host does what this script asks for by creating /share/NAME.request and answers with
# /share/NAME.done ("ok"): remove-ns (removes nsid 2 of NQN), snapshot (snapshots and clones
# the pool volume, exports the clone as NQN_CLONE), grow (grows the 64 MiB pool volume to
# 128 MiB), ana-inaccessible (sets NQN_ANA's PORT listener inaccessible), ana-swap (PORT back
# to optimized, PORT2 inaccessible), ana-remove (PORT2 optimized, the PORT listener removed).
# Prints "CHECK ok|FAIL name" per check and "nvmf-guest: N passed, N failed"; exits non-zero on
# any failure.
set -u
. /tidemark/lib.sh
T=10.0.2.2
pass=0
fail=0
check() { # check NAME COMMAND...
  local name=$1; shift
  if "$@" >/tmp/check.out 2>&1; then
    echo "CHECK ok   $name"; pass=$((pass + 1))
  else
    echo "CHECK FAIL $name"; sed 's/^/    /' /tmp/check.out | tail -n 30; fail=$((fail + 1))
  fi
}
finish() {
  echo "nvmf-guest: $pass passed, $fail failed"
  [ "$fail" -eq 0 ]
  exit $?
}

# All namespace block devices of a connected subsystem (multipath heads, not hidden paths).
ns_devs() {
  for s in /sys/class/nvme-subsystem/nvme-subsys*; do
    [ "$(cat "$s/subsysnqn" 2>/dev/null)" = "$1" ] || continue
    for n in "$s"/nvme*n*; do
      case ${n##*/} in *c*n*) continue ;; esac
      [ -b "/dev/${n##*/}" ] && echo "/dev/${n##*/}"
    done
  done
}
# The controller character device (/dev/nvmeX) of a connected subsystem.
ctrl_dev() {
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && { echo "/dev/${c##*/}"; return 0; }
  done
  return 1
}
not() { ! "$@"; }
count_ns_is() { [ "$(ns_devs "$1" | wc -l)" -eq "$2" ]; }
wait_for() { # wait_for SECONDS COMMAND...: until COMMAND succeeds
  local tries=$(( $1 * 5 )); shift
  while [ "$tries" -gt 0 ]; do
    "$@" && return 0
    tries=$((tries - 1)); sleep 0.2
  done
  return 1
}

H="--hostnqn=$HOST_GUEST"
check "nvme-tcp module" test -d /sys/module/nvme_tcp
check "target reachable" wait_tcp $T "$PORT" 30

# Discovery: the open subsystem is listed; the restricted one only for its allowed host.
nvme discover -t tcp -a $T -s "$PORT" $H > /tmp/disc.txt 2>&1
cat /tmp/disc.txt
check "discover lists $NQN" grep -q "subnqn: *$NQN\$" /tmp/disc.txt
check "discover hides the restricted subsystem from other hosts" not grep -q "$NQN_RESTRICTED" /tmp/disc.txt
check "discover shows the restricted subsystem to its host" sh -c \
  "nvme discover -t tcp -a $T -s $PORT --hostnqn=$HOST_ALLOWED | grep -q 'subnqn: *$NQN_RESTRICTED\$'"

# Access control: a host NQN not on the allow-list is refused; the allowed one gets in.
check "host not on the allow-list is refused" not nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_RESTRICTED" $H
check "no device from the refused connect" not ctrl_dev "$NQN_RESTRICTED"
check "allowed host connects" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_RESTRICTED" --hostnqn="$HOST_ALLOWED"
check "allowed host disconnects" nvme disconnect -n "$NQN_RESTRICTED"

# The open subsystem: connect, identify, fio.
check "nvme connect" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN" $H
DEV=$(nvme_ns_dev "$NQN" 30)
CTRL=$(ctrl_dev "$NQN")
echo "controller $CTRL, namespace $DEV"
nvme list
check "block device" test -b "$DEV"
nvme id-ctrl "$CTRL" > /tmp/idctrl.txt 2>&1
grep -E '^(vid|sn|mn|fr|mdts|cntlid|ver|oncs|vwc|sgls|subnqn|ioccsz|iorcsz|icdoff|maxcmd|nn) ' /tmp/idctrl.txt
check "id-ctrl model" grep -q '^mn *: tidemark' /tmp/idctrl.txt
check "id-ctrl subnqn" grep -q "^subnqn *: $NQN\$" /tmp/idctrl.txt
check "id-ctrl version 1.4" grep -q '^ver *: 0x10400' /tmp/idctrl.txt
nvme id-ns "$DEV" > /tmp/idns.txt 2>&1
grep -E '^(nsze|ncap|nuse|nmic|nguid|eui64|lbaf  0)' /tmp/idns.txt
check "id-ns size (256 MiB of 512-byte blocks)" grep -q '^nsze *: 0x80000$' /tmp/idns.txt
check "id-ns LBA format 512 bytes in use" grep -q 'lbads:9.*in use' /tmp/idns.txt
check "two namespaces" wait_for 20 count_ns_is "$NQN" 2
check "size seen by the block layer" test "$(cat /sys/block/${DEV##*/}/size)" -eq 524288

FIO="fio --filename=$DEV --ioengine=libaio --direct=1 --bs=4k --iodepth=32 --group_reporting --output-format=normal"
check "fio randread QD32" $FIO --name=randread --rw=randread --time_based --runtime="$FIO_SECS"
grep -E 'IOPS=|err=' /tmp/check.out
check "fio randwrite QD32" $FIO --name=randwrite --rw=randwrite --time_based --runtime="$FIO_SECS"
grep -E 'IOPS=|err=' /tmp/check.out
# Write and verify (crc32c) for 30 s at depth 32: verify_backlog reads back and checks every
# batch of written blocks while the job runs; a mismatch fails fio (verify_fatal). The block
# layer's counters prove that the verification reads happened.
stat_of() { # stat_of /dev/nvmeXnY FIELD: summed over the namespace's paths (nvmeXcZnY), whose
  # counters the multipath head does not have
  local b=${1##*/} f
  set -- "$2" /sys/block/${b%n*}c*n${b##*n}/stat
  [ -e "$2" ] || set -- "$1" "/sys/block/$b/stat"
  f=$1; shift
  cat "$@" | awk -v f="$f" '{s += $f} END {print s + 0}'
}
r0=$(stat_of "$DEV" 1); w0=$(stat_of "$DEV" 5)
check "fio write+verify crc32c QD32 30s" $FIO --name=verify --rw=randwrite --size=128m \
  --verify=crc32c --verify_backlog=256 --verify_fatal=1 --do_verify=1 --time_based --runtime=30
grep -E 'IOPS=|err=|verify' /tmp/check.out | head -n 8
r1=$(stat_of "$DEV" 1); w1=$(stat_of "$DEV" 5)
echo "write+verify: $((w1 - w0)) writes, $((r1 - r0)) verification reads"
check "verification read back what was written" test $((r1 - r0)) -ge $(( (w1 - w0) / 2 )) -a $((w1 - w0)) -ge 1000
# Data written through one path reads back through another (a second controller).
check "pattern written reads back" sh -c "
  dd if=/dev/urandom of=/tmp/pat bs=64k count=16 2>/dev/null &&
  dd if=/tmp/pat of=$DEV bs=64k seek=100 oflag=direct 2>/dev/null &&
  dd if=$DEV of=/tmp/back bs=64k skip=100 count=16 iflag=direct 2>/dev/null &&
  cmp /tmp/pat /tmp/back"
check "flush" nvme flush "$DEV"
# A read past the end fails with the NVMe status, and the controller's Error Information log
# names the command's first LBA for `nvme error-log`.
check "nvme read past the end fails" not nvme read "$DEV" --start-block=524288 --block-count=0 --data-size=512 --data=/tmp/beyond
nvme error-log "$CTRL" --log-entries=1 > /tmp/errlog.txt 2>&1
grep -E '^(error_count|sqid|status_field|lba|nsid|opcode)' /tmp/errlog.txt
check "error-log names the LBA" grep -qE '^lba[[:space:]]*:[[:space:]]*(0x80000|524288)$' /tmp/errlog.txt

# Removing a namespace while connected raises the async event: the host rescans and the
# namespace's block device disappears.
DEV2=$(ns_devs "$NQN" | grep -v "^$DEV\$" | head -n 1)
echo "second namespace: $DEV2"
check "second namespace present" test -b "$DEV2"
touch /share/remove-ns.request
check "host removed the namespace" wait_for 60 test -e /share/remove-ns.done
check "namespace device gone after the async event" wait_for 60 not test -b "$DEV2"
check "first namespace still serves I/O" dd if="$DEV" of=/dev/null bs=4k count=256 iflag=direct
# NVMe reservations through nvme-cli: register, report (extended: 128-bit host id), acquire
# Write Exclusive, the holder still writes, release, unregister.
check "resv-register" nvme resv-register "$DEV" --nrkey=0xa1 --rrega=0
nvme resv-report "$DEV" --eds > /tmp/resv.txt 2>&1; cat /tmp/resv.txt
check "resv-report shows the key and a host id" sh -c "grep -qiE 'rkey *: *(0x)?a1\$' /tmp/resv.txt && grep -qiE 'hostid *: *[0-9a-f]{32}\$' /tmp/resv.txt"
check "resv-acquire write exclusive" nvme resv-acquire "$DEV" --crkey=0xa1 --rtype=1 --racqa=0
check "holder writes" dd if=/dev/zero of="$DEV" bs=4k count=1 oflag=direct
check "resv-release" nvme resv-release "$DEV" --crkey=0xa1 --rtype=1 --rrela=0
check "resv-register unregister" nvme resv-register "$DEV" --crkey=0xa1 --rrega=1
dmesg | grep -iE 'nvme|tidemark' | tail -n 15

check "nvme disconnect" nvme disconnect -n "$NQN"
check "controller gone" wait_for 10 not ctrl_dev "$NQN"

# Volumes of a pool (bdevs/lvol). NQN_POOL: nsid 1 a thin 256 MiB volume, nsid 2 a thin 64 MiB
# one. A pattern, then a snapshot and a clone taken by the host while a writer runs; the clone
# (NQN_CLONE) holds the pattern and takes its own writes, the volume keeps its own.
wait_fio() { # wait_fio PID OUTPUT: fio's exit status; on failure its output and the kernel's last words
  local rc=0
  wait "$1" || rc=$?
  [ "$rc" -eq 0 ] || { echo "fio exited $rc at $(date +%T)"; tail -n 14 "$2"; dmesg | tail -n 14; }
  return "$rc"
}
request() { # request NAME: ask the host for NAME and wait for its answer
  touch "/share/$1.request"
  wait_for 60 test -e "/share/$1.done" && [ "$(cat "/share/$1.done")" = ok ]
}
size_is() { [ "$(cat "/sys/block/${1##*/}/size")" -eq "$2" ]; }
dev_of_size() { # dev_of_size NQN SECTORS: the namespace device of that size
  for d in $(ns_devs "$1"); do size_is "$d" "$2" && { echo "$d"; return 0; }; done
  return 1
}
same() { # same FILE DEV: DEV starts with FILE's bytes
  dd if="$2" of=/tmp/same bs=64k count=$(( $(stat -c %s "$1") / 65536 )) iflag=direct 2>/dev/null && cmp "$1" /tmp/same
}
check "pool: nvme connect" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_POOL" $H
check "pool: two namespaces" wait_for 20 count_ns_is "$NQN_POOL" 2
PDEV=$(dev_of_size "$NQN_POOL" 524288)
FDEV=$(dev_of_size "$NQN_POOL" 131072)
echo "pool volume $PDEV, file system volume $FDEV"
for p in p1 p3 p4; do dd if=/dev/urandom of=/tmp/$p bs=64k count=64 2>/dev/null; done
check "pool: pattern written" dd if=/tmp/p1 of="$PDEV" bs=64k oflag=direct conv=fsync
# The writer covers 64 MiB past the pattern for a few seconds; the snapshot lands inside.
fio --filename="$PDEV" --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --name=writer --rw=randwrite \
  --offset=16m --size=64m --time_based --runtime=6 >/tmp/writer.out 2>&1 &
writer=$!
sleep 1
check "pool: snapshot and clone taken under the writer" request snapshot
check "pool: the writer saw no error" wait $writer
grep -E 'IOPS=|err=' /tmp/writer.out
check "pool: the volume written after the snapshot" dd if=/tmp/p3 of="$PDEV" bs=64k oflag=direct conv=fsync
check "pool: clone connect" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_CLONE" $H
CDEV=$(nvme_ns_dev "$NQN_CLONE" 30)
echo "clone $CDEV"
check "pool: the clone holds the pattern of the snapshot" same /tmp/p1 "$CDEV"
check "pool: the clone written" dd if=/tmp/p4 of="$CDEV" bs=64k oflag=direct conv=fsync
check "pool: the clone reads its own write" same /tmp/p4 "$CDEV"
check "pool: the volume reads its own write, not the clone's" same /tmp/p3 "$PDEV"
check "pool: clone disconnect" nvme disconnect -n "$NQN_CLONE"

# A mounted ext4 volume grown online: the host resizes it, the target's Namespace Attribute
# Changed event makes the kernel see the new size on the same connection, resize2fs grows the
# mounted file system.
modprobe ext4 2>/dev/null
mkdir -p /mnt/fs
check "pool: mkfs.ext4" mke2fs -q -t ext4 -F "$FDEV"
check "pool: mount" mount -t ext4 "$FDEV" /mnt/fs
check "pool: a file on it" sh -c "dd if=/tmp/p1 of=/mnt/fs/f bs=64k 2>/dev/null && sync && md5sum /mnt/fs/f > /tmp/f.md5"
kib0=$(df -k /mnt/fs | awk 'NR == 2 {print $2}')
check "pool: grown by the host while mounted" request grow
check "pool: the new size seen without reconnecting" wait_for 30 size_is "$FDEV" 262144
check "pool: resize2fs grows the mounted file system" resize2fs "$FDEV"
kib1=$(df -k /mnt/fs | awk 'NR == 2 {print $2}')
echo "ext4 on $FDEV: $kib0 KiB, then $kib1 KiB"
check "pool: the file system is larger" test "$kib1" -gt $(( kib0 * 3 / 2 ))
check "pool: the file is intact" md5sum -c /tmp/f.md5
check "pool: umount" umount /mnt/fs
check "pool: nvme disconnect" nvme disconnect -n "$NQN_POOL"

# A hundred thin volumes of the same pool, one namespace each: every one gets its own 64 KiB
# pattern (its nsid in it) at its own offset, then all are read back.
check "many: nvme connect" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_MANY" $H
check "many: $MANY namespaces" wait_for 60 count_ns_is "$NQN_MANY" "$MANY"
many_pattern() { yes "tidemark volume $1 of $MANY" | head -c 65536; }
many_each() { # many_each write|verify: over every namespace of NQN_MANY
  for d in $(ns_devs "$NQN_MANY"); do
    n=$(cat "/sys/block/${d##*/}/nsid") || return 1
    off=$(( n % 64 ))  # in 64 KiB blocks: within the volume's first cluster
    if [ "$1" = write ]; then
      many_pattern "$n" | dd of="$d" bs=64k seek="$off" oflag=direct 2>/dev/null || return 1
    else
      dd if="$d" bs=64k skip="$off" count=1 iflag=direct 2>/dev/null | cmp -s - <(many_pattern "$n") || { echo "volume $n ($d) differs"; return 1; }
    fi
  done
}
check "many: a pattern written to each volume" many_each write
check "many: each volume reads its own pattern back" many_each verify
check "many: nvme disconnect" nvme disconnect -n "$NQN_MANY"

# ANA multipath: the subsystem through two listeners is one multipath head with two paths;
# fio write+verify runs on the head while the host makes the first path inaccessible, then
# swaps, then removes the first listener: the kernel follows the ANA change events and fails
# I/O over, fio sees no error.
check "ana: native multipath on" grep -qx Y /sys/module/nvme_core/parameters/multipath
check "ana: connect through $PORT" nvme connect -t tcp -a $T -s "$PORT" -n "$NQN_ANA" $H
check "ana: connect through $PORT2" nvme connect -t tcp -a $T -s "$PORT2" -n "$NQN_ANA" $H
ADEV=$(nvme_ns_dev "$NQN_ANA" 30)
path_of() { # path_of PORT: the hidden path device (nvmeXcYnZ) of the controller on PORT
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$NQN_ANA" ] || continue
    case "$(cat "$c/address" 2>/dev/null)" in *"trsvcid=$1,"* | *"trsvcid=$1") ;; *) continue ;; esac
    for n in "$c"/nvme*c*n*; do [ -e "$n/ana_state" ] && { echo "${n##*/}"; return 0; }; done
  done
  return 1
}
ana_is() { [ "$(cat "/sys/block/$(path_of "$1")/ana_state" 2>/dev/null)" = "$2" ]; }
ana_are() { ana_is "$PORT" "$1" && ana_is "$PORT2" "$2"; } # ana_are STATE1 STATE2
wait_for 20 path_of "$PORT2" >/dev/null
echo "ana: head $ADEV, paths $(path_of "$PORT") ($PORT) and $(path_of "$PORT2") ($PORT2)"
nvme list-subsys "$ADEV" 2>&1 | tee /tmp/lsubsys.txt
check "ana: one head" count_ns_is "$NQN_ANA" 1
check "ana: two paths listed" sh -c "grep -q 'trsvcid=$PORT' /tmp/lsubsys.txt && grep -q 'trsvcid=$PORT2' /tmp/lsubsys.txt"
check "ana: both paths optimized" wait_for 10 ana_are optimized optimized
AFIO="fio --filename=$ADEV --ioengine=libaio --direct=1 --bs=4k --iodepth=16 --rw=randwrite --size=48m \
  --verify=crc32c --verify_backlog=64 --verify_fatal=1 --do_verify=1 --time_based"
$AFIO --name=ana-verify --runtime=12 >/tmp/anafio.out 2>&1 &
afio=$!
sleep 2
check "ana: first path set inaccessible by the host" request ana-inaccessible
check "ana: the kernel sees the first path inaccessible" wait_for 10 ana_is "$PORT" inaccessible
check "ana: the second path still optimized" ana_is "$PORT2" optimized
nvme list-subsys "$ADEV" 2>&1
sleep 3
check "ana: paths swapped by the host" request ana-swap
check "ana: the kernel sees the swap" wait_for 10 ana_are optimized inaccessible
check "ana: fio write+verify saw no error through both changes" wait_fio $afio /tmp/anafio.out
grep -E 'IOPS=|err=|verify' /tmp/anafio.out | head -n 6
# The first listener goes away under I/O: its controller loses the connection, the I/O goes
# on through the second path (optimized again first).
$AFIO --name=ana-remove --runtime=6 >/tmp/anafio2.out 2>&1 &
afio=$!
sleep 1
check "ana: first listener removed by the host" request ana-remove
check "ana: fio write+verify saw no error when the listener went away" wait_fio $afio /tmp/anafio2.out
grep -E 'IOPS=|err=' /tmp/anafio2.out | head -n 3
nvme list-subsys "$ADEV" 2>&1
check "ana: the second path carries the I/O" ana_is "$PORT2" optimized
check "ana: nvme disconnect" nvme disconnect -n "$NQN_ANA"
finish
