#!/usr/bin/env bash
# Builds the Debian 12 root file system that tests/service.rs boots with `systemd-nspawn -b` to
# install tidemark's .deb in and run it as a service: a debootstrap minbase with systemd as
# init, adduser (the package's postinst) and nothing else. Cached: the first build takes a
# minute or two (downloads ~40 MB from the Debian mirror this machine's apt uses); later runs
# print the path at once. The test never writes into the cached tree (it boots it with
# --volatile=overlay), so one build serves every run.
#
#   tests/service/build-rootfs.sh        prints the root's path as its last line
#
# TIDEMARK_SERVICE_CACHE overrides the cache folder (default ~/.cache/tidemark-service).
set -euo pipefail
cache=${TIDEMARK_SERVICE_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/tidemark-service}
suite=bookworm
# Bump when the package list changes: a new name is a new root, built beside the old one.
name=rootfs-$suite-1
root=$cache/$name
log() { echo "tidemark-service rootfs: $*" >&2; }
if [[ -e $root/.complete ]]; then
  echo "$root"
  exit 0
fi
[[ $(id -u) -eq 0 ]] || { log "need root to debootstrap $root"; exit 1; }
command -v debootstrap >/dev/null || { log "debootstrap is missing (tests/service/deps.sh installs it)"; exit 1; }
# The mirror this machine's apt already uses (deb822 .sources or one-line sources.list).
mirror=$(
  { sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null
    sed -n 's/^deb[[:space:]]\+\(\[[^]]*\][[:space:]]\+\)\?\([^[:space:]]*\).*/\2/p' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null
  } | grep -v -- '-security' | head -n 1
) || true
[[ -n $mirror ]] || { log "no Debian mirror found in /etc/apt/sources.list*"; exit 1; }
mkdir -p "$cache"
tmp=$cache/$name.tmp
rm -rf "$tmp"
log "debootstrap $suite from $mirror into $root (a minute or two; cached afterwards)"
start=$(date +%s)
# systemd + systemd-sysv: the init nspawn boots; dbus: systemctl and the journal as on a real
# host; adduser: tidemark's postinst creates its system user with it.
debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,adduser "$suite" "$tmp" "$mirror" |
  while IFS= read -r line; do
    # One line per stage rather than one per package: progress without a wall of text.
    case $line in I:\ Retrieving* | I:\ Validating* | I:\ Unpacking* | I:\ Configuring*) ;; *) log "$line" ;; esac
  done
# A container boots faster and quieter without the units that make no sense in it.
chroot "$tmp" systemctl mask --quiet systemd-networkd-wait-online.service getty@tty1.service console-getty.service apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer e2scrub_all.timer fstrim.timer 2>/dev/null || true
echo tidemark-service >"$tmp/etc/hostname"
rm -rf "$tmp/var/cache/apt/archives"/*.deb
touch "$tmp/.complete"
mv "$tmp" "$root"
log "built in $(( $(date +%s) - start ))s: $root"
echo "$root"
