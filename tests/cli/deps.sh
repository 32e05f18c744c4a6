#!/usr/bin/env bash
# Installs tmux for tests/top.rs (`tidemark top` driven in a real terminal: send-keys and
# capture-pane). Idempotent: no apt-get call when tmux is there.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"
command -v tmux >/dev/null 2>&1 && exit 0
apt_install tidemark-cli-deps tmux
