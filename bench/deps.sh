#!/usr/bin/env bash
# Installs what the benchmarks need (idempotent; quick when already installed).
set -euo pipefail
need=()
command -v fio >/dev/null 2>&1 || need+=(fio)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  echo "tidemark-bench deps: installing ${need[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -q --no-install-recommends --no-remove "${need[@]}"
fi
