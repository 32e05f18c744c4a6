# shellcheck shell=bash
# Installing Debian packages for the test scripts (tests/*/deps.sh source this file).
#
#   apt_install WHO PKG...      install PKG... and say so; WHO names the caller in messages
#   apt_missing PKG...          print the PKGs that are not installed, one a line
#   ensure_backports WHY        make apt know bookworm-backports (low priority), saying WHY
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

# Sets QEMU_APT_RELEASE to the apt options that take qemu's packages from the release of the
# qemu-utils already installed. Why: a Debian 12 machine may ship qemu-utils from
# bookworm-backports (10.x); bookworm's own qemu-system-x86 and qemu-block-extra (7.2) then need
# qemu-utils 7.2 and apt would remove the installed one, which --no-remove turns into a failed
# install. So when the installed qemu-utils is a backport, qemu comes from bookworm-backports too,
# and that source is added (and said so) when the machine does not list it.
qemu_release() {
  QEMU_APT_RELEASE=()
  local v
  v=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
  [[ $v == *bpo12* ]] || return 0
  ensure_backports "qemu-utils $v is from bookworm-backports; qemu's packages must match it"
  QEMU_APT_RELEASE=(-t bookworm-backports)
}

# Makes apt know bookworm-backports (adding tidemark-bookworm-backports.sources and refreshing
# the lists, and saying why, when the machine does not list it). Backports have a low priority:
# nothing installed or upgraded comes from them unless asked for by name or with -t.
ensure_backports() {
  local why=$1
  apt-cache policy 2>/dev/null | grep -q 'bookworm-backports' && return 0
  echo "tests/lib/apt.sh: $why; adding /etc/apt/sources.list.d/tidemark-bookworm-backports.sources" >&2
  cat >/etc/apt/sources.list.d/tidemark-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  apt-get update -qq >&2
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
  local release=()
  if [[ " $* " == *" qemu-"* || " $* " == *" seabios "* ]]; then
    qemu_release
    release=("${QEMU_APT_RELEASE[@]}")
  fi
  apt-get update -qq
  local policy=/usr/sbin/policy-rc.d created=0 rc=0
  if [[ ! -e $policy ]]; then
    printf '#!/bin/sh\n# tests/lib/apt.sh: no service starts while test dependencies install\nexit 101\n' >"$policy"
    chmod +x "$policy"
    created=1
  fi
  apt-get install -y -q --no-install-recommends --no-remove "${release[@]}" "$@" >&2 || rc=$?
  if ((created)); then rm -f "$policy"; fi
  if ((rc != 0)); then
    echo "$who: apt-get install $* failed (exit $rc); nothing was removed" >&2
  fi
  return "$rc"
}
