#!/bin/bash
# Runs inside a test guest with a kernel built with NVMe in-band authentication (Debian 12's
# backports kernel: bookworm's 6.1 is built without it): the Linux host authenticates to
# tidemarkd with DH-HMAC-CHAP through nvme-cli and moves verified data; a wrong secret, a
# missing one and a wrong controller secret are refused.
#
# Variables from the host test (tests/nvmf_guest_auth.rs): PORT, NQN (where HOST must
# authenticate with KEY; the controller holds CTRL_KEY), WRONG (a secret that is not the key).
# Prints "CHECK ok|FAIL name" per check and "nvmf-guest-auth: N passed, N failed".
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
not() { ! "$@"; }
ctrl_dev() {
  for c in /sys/class/nvme/nvme*; do
    [ "$(cat "$c/subsysnqn" 2>/dev/null)" = "$1" ] && { echo "/dev/${c##*/}"; return 0; }
  done
  return 1
}

uname -r
modprobe nvme-tcp 2>/dev/null
check "target reachable" wait_tcp $T "$PORT" 30
A="-t tcp -a $T -s $PORT -n $NQN --hostnqn=$HOST"
check "bidirectional authentication connects" nvme connect $A --dhchap-secret="$KEY" --dhchap-ctrl-secret="$CTRL_KEY"
DEV=$(nvme_ns_dev "$NQN" 30)
echo "namespace $DEV"
check "fio write+verify over the authenticated queues" fio --filename="$DEV" --ioengine=libaio --direct=1 --bs=4k \
  --iodepth=16 --name=authverify --rw=randwrite --size=16m --verify=crc32c --verify_fatal=1 --do_verify=1
grep -E 'IOPS=|err=' /tmp/check.out | head -n 4
CTRL=$(ctrl_dev "$NQN")
# Re-authentication on a live controller (the host's sysfs knob starts a new transaction on
# every queue with the same key): I/O goes on.
check "re-authentication" sh -c "echo '$KEY' > /sys/class/nvme/${CTRL##*/}/dhchap_secret"
check "I/O after re-authentication" dd if="$DEV" of=/dev/null bs=4k count=256 iflag=direct
check "disconnect" nvme disconnect -n "$NQN"
check "host key only (unidirectional) connects" nvme connect $A --dhchap-secret="$KEY"
check "its namespace appears" test -n "$(nvme_ns_dev "$NQN" 30)"
check "disconnect again" nvme disconnect -n "$NQN"
check "wrong secret refused" not nvme connect $A --dhchap-secret="$WRONG"
check "missing secret refused" not nvme connect $A
check "wrong controller secret refused" not nvme connect $A --dhchap-secret="$KEY" --dhchap-ctrl-secret="$WRONG"
check "no controller left" not ctrl_dev "$NQN"
dmesg | grep -iE 'auth|dhchap' | tail -n 12
echo "nvmf-guest-auth: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
