#!/bin/bash
# Runs in the QEMU guest (tests/iscsi_guest.rs through tests/guest/run.sh): the Linux iSCSI
# initiator (open-iscsi) logs in to one tidemark LUN twice, through two ifaces with two
# initiator names, and sg3-utils' sg_persist drives persistent reservations between the two
# hosts: register, reserve, a conflicting write, preempt, and the APTPL keys and reservation
# surviving a restart of tidemarkd (asked of the host through /share).
#
# Environment (from the host): PORT, IQN (target), HOST_A, HOST_B (initiator names).
# Every check prints "CHECK ok ..." or "CHECK FAIL ..."; the last line counts them.
set -u
PORTAL=10.0.2.2:$PORT
passed=0
failed=0
ok() { echo "CHECK ok: $*"; passed=$((passed + 1)); }
bad() { echo "CHECK FAIL: $*"; failed=$((failed + 1)); }
check() { # check DESCRIPTION COMMAND...: the command succeeds
  local what=$1; shift
  if out=$("$@" 2>&1); then ok "$what"; else bad "$what: $* -> $out"; fi
}
finish() {
  echo "iscsi-guest: $passed passed, $failed failed"
  [ "$failed" -eq 0 ]
  exit $?
}

# ---- open-iscsi without systemd: configuration, iscsid, two ifaces -------------------------
modprobe -a iscsi_tcp sd_mod sg || { bad "load iscsi_tcp"; finish; }
mkdir -p /etc/iscsi/nodes /etc/iscsi/send_targets /etc/iscsi/ifaces /var/lib/iscsi /run/lock/iscsi
echo "InitiatorName=$HOST_A" >/etc/iscsi/initiatorname.iscsi
cat >/etc/iscsi/iscsid.conf <<'EOF'
node.startup = manual
node.session.timeo.replacement_timeout = 120
node.conn[0].timeo.login_timeout = 15
node.conn[0].timeo.noop_out_interval = 5
node.conn[0].timeo.noop_out_timeout = 5
node.session.initial_login_retry_max = 8
EOF
iscsid || { bad "start iscsid"; finish; }
sleep 0.5

for side in a b; do
  name=HOST_${side^^}
  check "iface $side" iscsiadm -m iface -I "if$side" -o new
  check "iface $side initiator name" iscsiadm -m iface -I "if$side" -o update -n iface.initiatorname -v "${!name}"
  # No SendTargets: the target reports its portal as the host sees it (127.0.0.1).
  check "node record through if$side" iscsiadm -m node -o new -T "$IQN" -p "$PORTAL" -I "if$side"
  check "login through if$side" iscsiadm -m node -T "$IQN" -p "$PORTAL" -I "if$side" --login
done

# The disk of the session whose initiator name is $1.
disk_of() {
  local s d
  for _ in $(seq 100); do
    for s in /sys/class/iscsi_session/session*; do
      [ "$(cat "$s/initiatorname" 2>/dev/null)" = "$1" ] || continue
      for d in "$s"/device/target*/*/block/*; do
        [ -b "/dev/${d##*/}" ] && { echo "/dev/${d##*/}"; return 0; }
      done
    done
    sleep 0.1
  done
  return 1
}
A=$(disk_of "$HOST_A") || { bad "no disk for $HOST_A"; finish; }
B=$(disk_of "$HOST_B") || { bad "no disk for $HOST_B"; finish; }
if [ "$A" != "$B" ]; then ok "two sessions, two disks: A=$A B=$B"; else bad "one disk for both sessions"; fi
iscsiadm -m session

head -c 512 /dev/zero >/tmp/block
pr() { sg_persist -n "$@"; }
# A retry loop for the first PR command of a nexus (it may report a unit attention once).
pr_retry() {
  local i out
  for i in $(seq 60); do
    out=$(sg_persist -n "$@" 2>&1) && { echo "$out"; return 0; }
    sleep 1
  done
  echo "$out"
  return 1
}
keys() { pr_retry -k "$1" | grep -Eo '0x[0-9a-f]+$' | tr '\n' ' '; }
write() { sg_raw -s 512 -i /tmp/block "$1" 2a 00 00 00 00 00 00 00 01 00 2>&1; }
read1() { sg_raw -r 512 "$1" 28 00 00 00 00 00 00 00 01 00 2>&1; }
expect_conflict() { # expect_conflict WHAT OUTPUT: the command was refused with RESERVATION CONFLICT
  case $2 in *"Reservation Conflict"*) ok "$1" ;; *) bad "$1: $2" ;; esac
}
expect_good() {
  case $2 in *"Reservation Conflict"* | *"Check Condition"* | *"error"*) bad "$1: $2" ;; *) ok "$1" ;; esac
}

# ---- register, reserve, conflict ---------------------------------------------------------
pr_retry -k "$A" >/dev/null
pr_retry -k "$B" >/dev/null
check "A registers 0xa1 (APTPL)" pr --out --register --param-sark=0xa1 --param-aptpl "$A"
check "B registers 0xb1 (APTPL)" pr --out --register --param-sark=0xb1 --param-aptpl "$B"
k=$(keys "$A")
[ "$k" = "0xa1 0xb1 " ] && ok "both keys seen: $k" || bad "keys after registering: '$k'"
check "A reserves write exclusive" pr --out --reserve --param-rk=0xa1 --prout-type=1 "$A"
r=$(pr -r "$B")
case $r in *"Key=0xa1"*"Write Exclusive"*) ok "B reads A's reservation" ;; *) bad "READ RESERVATION: $r" ;; esac
expect_conflict "B's write conflicts" "$(write "$B")"
expect_good "B still reads (write exclusive)" "$(read1 "$B")"
expect_good "A writes" "$(write "$A")"
out=$(pr --out --reserve --param-rk=0xb1 --prout-type=1 "$B" 2>&1)
[ $? -ne 0 ] && ok "B cannot reserve too" || bad "B reserved over A: $out"
out=$(pr --out --register --param-rk=0xbad --param-sark=0xb2 "$B" 2>&1)
[ $? -ne 0 ] && ok "a wrong key is refused" || bad "REGISTER with a wrong key: $out"

# ---- preempt ------------------------------------------------------------------------------
check "B preempts A" pr --out --preempt --param-rk=0xb1 --param-sark=0xa1 --prout-type=1 "$B"
r=$(pr_retry -r "$A")
case $r in *"Key=0xb1"*) ok "the reservation is B's" ;; *) bad "after PREEMPT: $r" ;; esac
expect_conflict "A (preempted) cannot write" "$(write "$A")"
expect_good "B writes" "$(write "$B")"
check "A registers again as 0xa2 (APTPL)" pr_retry --out --register --param-sark=0xa2 --param-aptpl "$A"
k=$(keys "$B")
[ "$k" = "0xb1 0xa2 " ] && ok "keys before the restart: $k" || bad "keys before the restart: '$k'"

# ---- the target restarts: APTPL state comes back -------------------------------------------
echo "asking the host to restart tidemarkd"
: >/share/restart.request
for _ in $(seq 600); do [ -e /share/restart.done ] && break; sleep 0.1; done
[ "$(cat /share/restart.done 2>/dev/null)" = ok ] && ok "tidemarkd restarted" || { bad "the host did not restart tidemarkd"; finish; }
# The sessions reconnect by themselves (same ISIDs: the same I_T nexuses).
k=$(keys "$B")
[ "$k" = "0xb1 0xa2 " ] && ok "keys after the restart: $k" || bad "keys after the restart: '$k'"
r=$(pr_retry -r "$A")
case $r in *"Key=0xb1"*"Write Exclusive"*) ok "B's reservation survived the restart" ;; *) bad "reservation after the restart: $r" ;; esac
out=$(write "$A")
for _ in $(seq 10); do case $out in *"Unit Attention"*) out=$(write "$A") ;; *) break ;; esac; done
expect_conflict "A still cannot write" "$out"
out=$(write "$B")
for _ in $(seq 10); do case $out in *"Unit Attention"*) out=$(write "$B") ;; *) break ;; esac; done
expect_good "B (the holder, same initiator port) writes" "$out"

# ---- release and clear --------------------------------------------------------------------
check "B releases" pr --out --release --param-rk=0xb1 --prout-type=1 "$B"
expect_good "A writes once released" "$(write "$A")"
check "B clears" pr --out --clear --param-rk=0xb1 "$B"
k=$(keys "$A")
[ -z "$k" ] && ok "no keys left" || bad "keys after CLEAR: '$k'"

for side in a b; do
  check "logout through if$side" iscsiadm -m node -T "$IQN" -p "$PORTAL" -I "if$side" --logout
done
finish
