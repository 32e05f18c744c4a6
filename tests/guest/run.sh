#!/usr/bin/env bash
# Boot the tidemark test guest under QEMU (TCG), run SCRIPT inside it and exit with its code.
#
#   tests/guest/run.sh SCRIPT [extra qemu args...]
#
# SCRIPT is a host file, run in the guest as root: by the interpreter its "#!" line names if the
# guest has it (/bin/sh is busybox ash, /bin/bash is bash 5.2), else by busybox sh. It starts in
# /root with stdin at /dev/null; its output goes to the console (streamed to this stdout).
# Helpers: `. /tidemark/lib.sh` (guest-lib.sh: nvme_ns_dev NQN, wait_tcp HOST PORT).
# The guest reaches the host's 127.0.0.1 as 10.0.2.2 (QEMU user networking; no port forwards).
#
# Environment:
#   TIDEMARK_GUEST_TIMEOUT  hard limit in seconds for boot + script (default 600)
#   TIDEMARK_GUEST_SHARE    host directory shared read-write at /share in the guest (9p)
#   TIDEMARK_GUEST_VARS     names of host environment variables to export into the guest
#   TIDEMARK_GUEST_MEM      guest memory in MiB (default 1024)
#   TIDEMARK_GUEST_SMP      guest CPUs (default 2)
#   TIDEMARK_GUEST_APPEND   extra kernel command line
#   TIDEMARK_GUEST_NETDEV_OPTS  appended to "-netdev user,id=n0," e.g.
#                           hostfwd=tcp:127.0.0.1:14420-:4420 to reach a guest server from the host
#   TIDEMARK_GUEST_DEBUG=1  show all kernel messages on the console
#   TIDEMARK_GUEST_LOG      also keep the console log in this file
#   TIDEMARK_GUEST_CACHE    image cache (see build.sh)
#
# Exit status: the script's exit status; 124 on timeout; 125 if the guest stopped without
# reporting one (boot failure, kernel panic, QEMU error); 2 on bad usage or a failed build.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
say() { echo "tidemark-guest: $*" >&2; }

if (($# < 1)) || [[ ! -f $1 ]]; then
  echo "usage: $0 SCRIPT [extra qemu args...]  (SCRIPT: a shell script file on the host)" >&2
  exit 2
fi
script=$1; shift
timeout_s=${TIDEMARK_GUEST_TIMEOUT:-600}
[[ $timeout_s =~ ^[0-9]+$ ]] || { say "TIDEMARK_GUEST_TIMEOUT must be a number of seconds"; exit 2; }
share=${TIDEMARK_GUEST_SHARE:-}
if [[ -n $share ]]; then
  [[ -d $share ]] || { say "TIDEMARK_GUEST_SHARE=$share is not a directory"; exit 2; }
  share=$(cd "$share" && pwd)
  [[ $share != *,* ]] || { say "TIDEMARK_GUEST_SHARE must not contain a comma"; exit 2; }
fi

t_start=$SECONDS
img=$("$here/build.sh" | tail -n 1) || { say "guest image build failed"; exit 2; }
[[ -f $img/ok ]] || { say "guest image build failed"; exit 2; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-guest.XXXXXX")
qpid=""
tailpid=""
cleanup() {
  local rc=$?
  if [[ -n $qpid ]] && kill -0 "$qpid" 2>/dev/null; then
    kill -TERM "$qpid" 2>/dev/null || true
    for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "$qpid" 2>/dev/null || true
    wait "$qpid" 2>/dev/null || true
  fi
  if [[ -n $tailpid ]] && kill -0 "$tailpid" 2>/dev/null; then
    kill -TERM "$tailpid" 2>/dev/null || true
    wait "$tailpid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
  return "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM HUP

# Per-run part of the initramfs: the script and its environment, appended as a second
# cpio archive to the cached image; the kernel unpacks both.
mkdir -p "$tmp/rd/tidemark"
install -m 0755 "$script" "$tmp/rd/tidemark/test.sh"
install -m 0644 "$here/guest-lib.sh" "$tmp/rd/tidemark/lib.sh"
{
  echo "export TIDEMARK_GUEST=1"
  for name in ${TIDEMARK_GUEST_VARS:-}; do
    [[ $name =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || { say "bad variable name in TIDEMARK_GUEST_VARS: $name"; exit 2; }
    val=${!name-}
    printf "export %s='%s'\n" "$name" "${val//\'/\'\\\'\'}"
  done
} > "$tmp/rd/tidemark/env"
(cd "$tmp/rd" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) > "$tmp/run.cpio"
# The kernel only looks for the next archive at a 4-byte aligned offset (zeros are skipped).
base_size=$(stat -c %s "$img/initramfs.cpio")
{ cat "$img/initramfs.cpio"; head -c $(((4 - base_size % 4) % 4)) /dev/zero; cat "$tmp/run.cpio"; } > "$tmp/initrd"

append="console=ttyS0,115200 panic=-1 tsc=reliable no_timer_check mitigations=off"
if [[ ${TIDEMARK_GUEST_DEBUG:-0} == 1 ]]; then append+=" tidemark.debug"; else append+=" quiet"; fi
qemu_args=(
  -machine q35 -accel tcg -cpu max
  -m "${TIDEMARK_GUEST_MEM:-1024}" -smp "${TIDEMARK_GUEST_SMP:-2}"
  -nodefaults -no-user-config -display none -no-reboot
  -kernel "$img/kernel" -initrd "$tmp/initrd"
  -chardev "file,id=con,path=$tmp/console.log" -serial chardev:con
  -netdev "user,id=n0${TIDEMARK_GUEST_NETDEV_OPTS:+,$TIDEMARK_GUEST_NETDEV_OPTS}" -device virtio-net-pci,netdev=n0,romfile=
  -device virtio-rng-pci
)
if [[ -n $share ]]; then
  qemu_args+=(-virtfs "local,path=$share,mount_tag=share,security_model=none,id=share")
  append+=" tidemark.share"
fi
append+=" ${TIDEMARK_GUEST_APPEND:-}"

: > "$tmp/console.log"
say "booting $(cat "$img/kver") (timeout ${timeout_s}s) to run $script"
t_boot=$SECONDS
qemu-system-x86_64 "${qemu_args[@]}" -append "$append" "$@" \
  </dev/null >"$tmp/qemu.out" 2>&1 &
qpid=$!
# Stream the console while it is written; tail stops by itself once QEMU is gone.
tail -n +1 -s 0.2 -f --pid="$qpid" "$tmp/console.log" &
tailpid=$!

marker() { tr -d '\r' < "$tmp/console.log" | grep -a -E "^$1" | tail -n 1 || true; }
# While the guest runs, only the part of the console written since the last look is scanned
# (with some overlap for a line split between two looks): logs of long tests get large.
seen_upto=0
new_marker() { # new_marker REGEX -> true if it appears in what was written since the last look
  local from=$((seen_upto > 256 ? seen_upto - 256 : 0))
  tail -c +$((from + 1)) "$tmp/console.log" | tr -d '\r' | grep -a -q -E "^$1"
}
status=""
t_ready=""
t_marker=""
deadline=$((t_boot + timeout_s))
while kill -0 "$qpid" 2>/dev/null; do
  size=$(stat -c %s "$tmp/console.log")
  if ((size != seen_upto)); then
    if [[ -z $t_ready ]] && new_marker 'TIDEMARK_GUEST_READY$'; then t_ready=$SECONDS; fi
    if [[ -z $t_marker ]] && new_marker 'TIDEMARK_GUEST_EXIT=[0-9]+$'; then t_marker=$SECONDS; fi
    seen_upto=$size
  fi
  if [[ -n $t_marker ]] && ((SECONDS - t_marker > 20)); then
    say "guest reported its exit status but did not power off; killing QEMU"
    break
  fi
  if ((SECONDS >= deadline)); then
    status=timeout
    break
  fi
  sleep 0.25
done
# Stop QEMU (if still running) and let tail print the rest of the console.
if kill -0 "$qpid" 2>/dev/null; then
  kill -TERM "$qpid" 2>/dev/null || true
  for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$qpid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL "$qpid" 2>/dev/null || true
fi
qrc=0
wait "$qpid" 2>/dev/null || qrc=$?
qpid=""
for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$tailpid" 2>/dev/null || break; sleep 0.2; done
kill -TERM "$tailpid" 2>/dev/null || true
wait "$tailpid" 2>/dev/null || true
tailpid=""
echo >&2

[[ -n ${TIDEMARK_GUEST_LOG:-} ]] && cp "$tmp/console.log" "$TIDEMARK_GUEST_LOG"
if [[ -s $tmp/qemu.out ]]; then
  say "QEMU said:"; sed 's/^/  qemu: /' "$tmp/qemu.out" >&2
fi

line=$(marker 'TIDEMARK_GUEST_EXIT=[0-9]+$' || true)
t_end=$SECONDS
# (a short script can finish between two polls: then the end time bounds the boot time)
[[ -z $t_ready && -n $(marker 'TIDEMARK_GUEST_READY$') ]] && t_ready=$t_end
boot_s=n/a; [[ -n $t_ready ]] && boot_s="$((t_ready - t_boot))s"
guest_boot=$(tr -d '\r' < "$tmp/console.log" | sed -n 's/^tidemark-guest: booted in \([0-9.]*s\).*/\1/p' | head -n 1)
[[ -n $guest_boot ]] && boot_s+=" (guest uptime at script start $guest_boot)"
timing="image ready in $((t_boot - t_start))s, boot $boot_s, total $((t_end - t_start))s"
if [[ $status == timeout ]]; then
  say "TIMEOUT: the guest did not finish within ${timeout_s}s ($timing)"
  exit 124
fi
if [[ -z $line ]]; then
  if [[ -z $t_ready ]]; then
    say "BOOT FAILURE: the guest stopped before running the script (QEMU exit $qrc; $timing)"
  else
    say "GUEST FAILURE: the guest stopped without reporting an exit status (QEMU exit $qrc; $timing)"
  fi
  exit 125
fi
rc=${line#TIDEMARK_GUEST_EXIT=}
say "script exited with $rc ($timing)"
exit "$rc"
