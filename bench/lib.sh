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

# The tidemarkd of an earlier build, for the A/B benches: $BASE_BIN if set, else revision
# $BASE_REV (default HEAD~1) built in the scratch worktree $2/base-src (the caller's cleanup
# runs remove_base_worktree) into $1/target/bench-base. $1: the repository. Prints its path.
base_tidemarkd() {
  if [[ -n ${BASE_BIN:-} ]]; then
    echo "$BASE_BIN"
    return
  fi
  local rev=${BASE_REV:-HEAD~1}
  echo "building $rev ..." >&2
  git -C "$1" worktree add -q --detach "$2/base-src" "$rev" >&2
  (cd "$2/base-src" && CARGO_TARGET_DIR="$1/target/bench-base" cargo build --release --quiet --bin tidemarkd) >&2
  echo "$1/target/bench-base/release/tidemarkd"
}

# Removes the scratch worktree of base_tidemarkd, if any ($1: the repository, $2: the work dir).
remove_base_worktree() {
  if [[ -d $2/base-src ]]; then git -C "$1" worktree remove --force "$2/base-src" 2>/dev/null || true; fi
}
