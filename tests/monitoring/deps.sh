#!/usr/bin/env bash
# Installs promtool (Debian's prometheus package) for tests/monitoring.rs: the scrape goes
# through Prometheus' own exposition-format checks (`promtool check metrics`) and the alert
# rules through `promtool check rules`. Idempotent: no apt-get call when promtool is there.
# The Prometheus server the package ships is not started (tests/lib/apt.sh's policy-rc.d).
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/../lib/apt.sh"
command -v promtool >/dev/null 2>&1 && exit 0
apt_install tidemark-monitoring-deps prometheus
