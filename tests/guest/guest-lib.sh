# Helpers for guest test scripts: `. /tidemark/lib.sh` (run.sh puts this file there).
# POSIX sh (busybox ash) compatible.

# nvme_ns_dev NQN [TIMEOUT_S]: print the block device (/dev/nvmeXnY) of the first namespace of
# the connected subsystem NQN, waiting up to TIMEOUT_S seconds (default 10) for it to appear.
# With native multipath (the Debian kernel's default) the device hangs off the subsystem
# (nvme-subsysX/nvmeXnY); the per-controller nvmeXcYnZ entries are hidden paths, skipped.
nvme_ns_dev() {
  _nqn=$1; _tries=$(( ${2:-10} * 10 ))
  while [ "$_tries" -gt 0 ]; do
    for _s in /sys/class/nvme-subsystem/nvme-subsys* /sys/class/nvme/nvme*; do
      [ "$(cat "$_s/subsysnqn" 2>/dev/null)" = "$_nqn" ] || continue
      for _n in "$_s"/nvme*n*; do
        case ${_n##*/} in *c*n*) continue ;; esac
        [ -b "/dev/${_n##*/}" ] && { echo "/dev/${_n##*/}"; return 0; }
      done
    done
    _tries=$((_tries - 1))
    sleep 0.1
  done
  echo "nvme_ns_dev: no namespace of $_nqn appeared" >&2
  return 1
}

# wait_tcp HOST PORT [TIMEOUT_S]: wait until a TCP connect to HOST:PORT succeeds (default 30 s).
wait_tcp() {
  _tries=$(( ${3:-30} * 5 ))
  while [ "$_tries" -gt 0 ]; do
    # (busybox nc has no -z; bash's /dev/tcp connects and closes at once)
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$0/$1"' "$1" "$2" 2>/dev/null && return 0
    _tries=$((_tries - 1))
    sleep 0.2
  done
  echo "wait_tcp: $1:$2 not reachable" >&2
  return 1
}
