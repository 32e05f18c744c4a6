#!/bin/bash
# Runs inside the test guest (tests/guest/run.sh) for csi/tests/node_guest.rs: starts the CSI
# node plugin (/share/tidemark-csi --mode node) on tcp://0.0.0.0:$CSI_PORT, which the host
# reaches through a QEMU port forward, writes the guest's host NQN to /share/ready, then runs
# the host's commands: /share/cmd.N (a bash script; "exit" ends) is answered by /share/out.N
# (its output) and then /share/rc.N (its status). The plugin's log is /share/node.log.
# /tmp/start-node.sh (re)starts the plugin: the host kills it with SIGKILL to play a crash.
set -u
. /tidemark/lib.sh
modprobe -a ext4 2>/dev/null
# Executed from the guest's RAM: 9p with cache=none pages the binary in slowly.
cp /share/tidemark-csi /tmp/tidemark-csi || exit 1
HOSTNQN=$(cat /etc/nvme/hostnqn)
{
  echo '#!/bin/bash'
  echo '. /tidemark/lib.sh'
  echo "RUST_LOG=info setsid /tmp/tidemark-csi --mode node --endpoint tcp://0.0.0.0:$CSI_PORT \\"
  echo '  --topology topology.tidemark.io/node=guest --max-volumes 8 </dev/null >>/share/node.log 2>&1 &'
  echo 'echo $! > /tmp/csi.pid'
  echo "wait_tcp 127.0.0.1 $CSI_PORT 60"
} > /tmp/start-node.sh
chmod +x /tmp/start-node.sh
if ! /tmp/start-node.sh; then
  echo "node-guest: the node plugin does not listen"; cat /share/node.log; exit 1
fi
echo "$HOSTNQN" > /share/ready.tmp && mv /share/ready.tmp /share/ready
echo "node-guest: node plugin up as $HOSTNQN"

n=1
end=$(( $(cut -d. -f1 /proc/uptime) + ${GUEST_SECS:-240} ))
rc=1
while [ "$(cut -d. -f1 /proc/uptime)" -lt "$end" ]; do
  if [ -e "/share/cmd.$n" ]; then
    if [ "$(cat "/share/cmd.$n")" = exit ]; then rc=0; break; fi
    bash "/share/cmd.$n" > "/share/out.$n.tmp" 2>&1 </dev/null
    echo $? > "/share/rc.$n.tmp"
    mv "/share/out.$n.tmp" "/share/out.$n"
    mv "/share/rc.$n.tmp" "/share/rc.$n"
    n=$((n + 1))
  else
    sleep 0.1
  fi
done
[ "$rc" -eq 0 ] || echo "node-guest: no exit command from the host in time"
kill "$(cat /tmp/csi.pid)" 2>/dev/null
echo "node-guest: done after $((n - 1)) commands"
exit "$rc"
