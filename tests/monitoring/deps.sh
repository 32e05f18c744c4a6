#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) for tests/monitoring.rs: the scrape goes
# through Prometheus' own exposition-format checks (`promtool check metrics`) and the alert
# rules through `promtool check rules`. Idempotent: no apt-get call when promtool is there.
set -euo pipefail
command -v promtool >/dev/null 2>&1 && exit 0
if [[ $(id -u) -ne 0 ]]; then
  echo "tidemark-monitoring deps: need root to apt-get install prometheus (promtool)" >&2
  exit 1
fi
echo "tidemark-monitoring deps: installing prometheus (for promtool; its service is not started)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# policy-rc.d keeps the package scripts from starting a Prometheus server on this machine.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod +x "$policy"
  created_policy=1
fi
apt-get install -y -q --no-install-recommends --no-remove prometheus
if ((created_policy)); then rm -f "$policy"; fi
