#!/usr/bin/env bash
# Builds the Debian package of tidemark with dpkg-deb: tidemarkd and the tidemark CLI, the
# systemd unit (Type=notify, hardened, restarted on failure), /etc/tidemark/tidemark.toml (a
# conffile: an upgrade keeps the operator's edits), the docs, and a postinst that creates the
# `tidemark` system user. Install with `apt install ./tidemark_VERSION_ARCH.deb`, then
# `systemctl enable --now tidemark`.
#
#   packaging/build-deb.sh [OUT_DIR]        release build first (cargo build --release)
#   TIDEMARK_BIN_DIR=DIR packaging/build-deb.sh OUT_DIR    package the binaries in DIR as they are
#
# Prints the path of the .deb as its last line.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$top/target/debian}
bin=${TIDEMARK_BIN_DIR:-}
if [[ -z $bin ]]; then
  (cd "$top" && cargo build --release --bin tidemarkd --bin tidemark >&2)
  bin=$top/target/release
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
chmod 0755 "$stage"
install -D -m 0755 "$bin/tidemarkd" "$stage/usr/bin/tidemarkd"
install -D -m 0755 "$bin/tidemark" "$stage/usr/bin/tidemark"
# Debug information stays out of the package, as dh_strip would do.
strip --strip-debug "$stage/usr/bin/tidemarkd" "$stage/usr/bin/tidemark"
install -D -m 0644 "$top/packaging/tidemark.service" "$stage/lib/systemd/system/tidemark.service"
install -D -m 0640 "$top/packaging/tidemark.toml" "$stage/etc/tidemark/tidemark.toml"
install -D -m 0644 "$top/README.md" "$stage/usr/share/doc/tidemark/README.md"
cp -r "$top/docs" "$stage/usr/share/doc/tidemark/docs"
cp -r "$top/config/monitoring" "$stage/usr/share/doc/tidemark/monitoring"
chmod -R u+rwX,go+rX,go-w "$stage/usr/share/doc/tidemark"
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: tidemark
Version: $version
Architecture: $arch
Maintainer: tidemark developers <tidemark@localhost>
Installed-Size: $size
Depends: libc6, adduser
Section: admin
Priority: optional
Description: userspace polled-mode block storage target (NVMe/TCP, iSCSI)
 Volumes built as stacks of bdevs (files, block and NVMe devices, mirrors, copy-on-write
 volumes) exported over NVMe/TCP and iSCSI, with point-in-time images taken without pausing
 host I/O, driven over JSON-RPC with SPDK's method names and reporting to Prometheus.
CONTROL
echo /etc/tidemark/tidemark.toml >"$stage/DEBIAN/conffiles"
cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  # The data directory first: adduser warns about a home it cannot access. systemd's
  # StateDirectory= keeps its owner and mode right at every start as well.
  install -d -m 0700 /var/lib/tidemark
  if ! getent passwd tidemark >/dev/null; then
    adduser --system --group --home /var/lib/tidemark --no-create-home tidemark
  fi
  chown tidemark:tidemark /var/lib/tidemark
  chgrp tidemark /etc/tidemark/tidemark.toml
  if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
  fi
fi
POSTINST
cat >"$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
fi
POSTRM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/tidemark_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$stage" "$deb" >&2
echo "$deb"
