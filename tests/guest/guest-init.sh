#!/bin/sh
# /init of the tidemark test guest (busybox sh). Installed into the initramfs by build.sh.
#
# Boot sequence: mount pseudo filesystems, load modules, bring up QEMU user-mode networking
# (10.0.2.15/24, gateway 10.0.2.2 = the host's 127.0.0.1), mount the optional 9p share at
# /share, run /tidemark/test.sh (appended to the initramfs by run.sh), print
# TIDEMARK_GUEST_EXIT=<code> on the console and power off.

export PATH=/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export TERM=dumb
umask 022

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# The kernel may not have found /dev/console in the archive; make sure stdio is the console.
exec </dev/console >/dev/console 2>&1
mkdir -p /dev/pts /dev/shm /run /tmp /var/tmp /share /root
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=0755 tmpfs /run
# The rootfs is already RAM-backed; /tmp stays on it (no size cap beyond guest memory).
chmod 1777 /tmp /var/tmp
[ -d /sys/kernel/debug ] && mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ln -sf /proc/self/fd /dev/fd 2>/dev/null
ln -sf /proc/self/fd/0 /dev/stdin 2>/dev/null
ln -sf /proc/self/fd/1 /dev/stdout 2>/dev/null
ln -sf /proc/self/fd/2 /dev/stderr 2>/dev/null
hostname tidemark-guest

# Kernel messages below warnings would interleave with the test's output; keep them quiet
# unless asked for (tidemark.debug on the kernel command line).
CMDLINE=" $(cat /proc/cmdline) "
case "$CMDLINE" in
  *" tidemark.debug "*) ;;
  *) echo 4 > /proc/sys/kernel/printk ;;
esac

tm_log() { echo "tidemark-guest: $*"; }

# Modules. Cold-plug first: load the driver of every device QEMU was given (virtio-net,
# virtio-rng, NVMe PCI, virtio-blk, e1000, ...); then what tests use without a device.
# Few, batched kmod calls: every process start is slow under TCG.
# Two passes: the first loads bus drivers (virtio_pci), whose devices appear for the second.
for pass in 1 2; do
  cat /sys/bus/*/devices/*/modalias 2>/dev/null | sort -u | xargs -r modprobe -qab 2>/dev/null
done
modprobe -a configfs nvme_tcp crc32c_intel crc32c_generic || tm_log "warning: module load failed"
mount -t configfs configfs /sys/kernel/config 2>/dev/null

# Networking: QEMU user mode (slirp). No DHCP needed; addresses are fixed by QEMU.
ip link set lo up
IFACE=
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do
  for d in /sys/class/net/*; do
    n=${d##*/}
    [ "$n" = lo ] && continue
    [ -e "$d/device" ] || continue
    IFACE=$n; break
  done
  [ -n "$IFACE" ] && break
  sleep 0.1
done
if [ -n "$IFACE" ]; then
  ip link set "$IFACE" up
  ip addr add 10.0.2.15/24 dev "$IFACE"
  ip route add default via 10.0.2.2 dev "$IFACE"
else
  tm_log "warning: no network interface found"
fi
printf '127.0.0.1\tlocalhost\n10.0.2.2\thost\n10.0.2.15\ttidemark-guest\n' > /etc/hosts
echo 'nameserver 10.0.2.3' > /etc/resolv.conf

# NVMe host identity (nvme-cli reads these; the target side sees them on connect).
mkdir -p /etc/nvme
if [ ! -s /etc/nvme/hostid ]; then
  uuid=$(cat /proc/sys/kernel/random/uuid)
  echo "$uuid" > /etc/nvme/hostid
  echo "nqn.2014-08.org.nvmexpress:uuid:$uuid" > /etc/nvme/hostnqn
fi

# Optional host directory shared over 9p (run.sh: TIDEMARK_GUEST_SHARE).
case "$CMDLINE" in
  *" tidemark.share "*)
    if ! mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,cache=none share /share; then
      tm_log "error: could not mount the 9p share at /share"
    fi ;;
esac

[ -f /tidemark/env ] && . /tidemark/env

uptime_s=$(cut -d' ' -f1 /proc/uptime)
tm_log "booted in ${uptime_s}s (kernel $(uname -r)); running test script"
echo "TIDEMARK_GUEST_READY"

rc=0
if [ -f /tidemark/test.sh ]; then
  cd /root
  # A "#!" line naming an interpreter the guest has (/bin/sh, /bin/bash) is honoured;
  # anything else runs under busybox sh.
  interp=$(head -n 1 /tidemark/test.sh | sed -n 's/^#![[:space:]]*\([^[:space:]]*\).*/\1/p')
  if [ -n "$interp" ] && [ -x "$interp" ]; then
    /tidemark/test.sh </dev/null
  else
    /bin/sh /tidemark/test.sh </dev/null
  fi
  rc=$?
  cd /
else
  tm_log "error: no /tidemark/test.sh in the initramfs"
  rc=127
fi

# Make the marker line impossible to interleave with kernel messages, then leave.
echo 1 > /proc/sys/kernel/printk
sync
echo
echo "TIDEMARK_GUEST_EXIT=$rc"
umount /share 2>/dev/null
poweroff -f
# poweroff -f should not return; if it does, make the kernel panic (QEMU runs with -no-reboot).
sleep 5
echo o > /proc/sysrq-trigger 2>/dev/null
exit "$rc"
