#!/usr/bin/env bash
# Installs tmux for tests/top.rs (`tidemark top` driven in a real terminal: send-keys and
# capture-pane). Idempotent: no apt-get call when tmux is there.
set -euo pipefail
command -v tmux >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "tidemark-cli deps: need root to apt-get install tmux" >&2
  exit 1
fi
echo "tidemark-cli deps: installing tmux" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -q --no-install-recommends --no-remove tmux
