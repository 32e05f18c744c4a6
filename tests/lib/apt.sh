# shellcheck shell=bash
# Installing Debian packages for the test scripts (tests/*/deps.sh source this file).
#
#   apt_install WHO PKG...      install PKG... and say so; WHO names the caller in messages
#   apt_missing PKG...          print the PKGs that are not installed, one a line
#
# What every install step promises the person running it: it prints what it installs (apt's own
# output stays visible, it is not sent to /dev/null), it never removes a package the machine
# already has (--no-remove: apt fails instead of resolving a conflict by removal), it pulls in no
# recommends, and no service a package ships is started on this machine (a policy-rc.d that
# denies every start, only for the time of the install).

apt_missing() {
  local p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || echo "$p"
  done
}

apt_install() {
  local who=$1
  shift
  (($# > 0)) || return 0
  if [[ $(id -u) -ne 0 ]]; then
    echo "$who: need root to install $* (apt-get install $*)" >&2
    return 1
  fi
  echo "$who: installing $* (apt-get install --no-install-recommends --no-remove)" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  local policy=/usr/sbin/policy-rc.d created=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# tests/lib/apt.sh: no service starts while test dependencies install\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created=1
  fi
  apt-get install -y -q --no-install-recommends --no-remove "$@" >&2 || rc=$?
  if ((created)); then rm -f "$policy"; fi
  if ((rc != 0)); then
    echo "$who: apt-get install $* failed (exit $rc); nothing was removed" >&2
  fi
  return "$rc"
}
