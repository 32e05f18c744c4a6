# Shell helpers the benchmark scripts share (sourced, not run).

# A loopback port nobody listens on.
free_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 30000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return; fi
  done
}

# Waits up to 10 s for something to listen on loopback port $1.
wait_port() {
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on port $1" >&2
  return 1
}

# Stops the processes a script started (arguments: their PIDs; empty ones are skipped). One
# stopped with SIGSTOP (how the A/B benches idle a target) is continued first, so that it can
# act on the TERM.
stop_pids() {
  local p
  for p in "$@"; do
    if [[ -n $p ]] && kill -0 "$p" 2>/dev/null; then
      kill -CONT "$p" 2>/dev/null || true
      kill -TERM "$p" 2>/dev/null || true
      wait "$p" 2>/dev/null || true
    fi
  done
}
