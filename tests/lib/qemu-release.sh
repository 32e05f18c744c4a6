# Sourced by the deps scripts that install qemu packages. Sets QEMU_APT_RELEASE to the apt
# options that pick qemu's packages from the release of the qemu-utils already installed.
#
# Why: a Debian 12 machine may ship qemu-utils from bookworm-backports (10.x). Bookworm's own
# qemu-system-x86 and qemu-block-extra (7.2) then need qemu-utils 7.2, and apt would remove the
# installed one, which our scripts never do (--no-remove). So when the installed qemu-utils is a
# backport, install qemu from bookworm-backports too, adding that source if it is missing.
QEMU_APT_RELEASE=()
qemu_utils_version=$(dpkg-query -W -f='${Version}' qemu-utils 2>/dev/null || true)
if [[ $qemu_utils_version == *bpo12* ]]; then
  if ! apt-cache policy 2>/dev/null | grep -q 'bookworm-backports'; then
    echo "tidemark deps: qemu-utils $qemu_utils_version is from bookworm-backports;" \
      "adding /etc/apt/sources.list.d/tidemark-bookworm-backports.sources so qemu matches it" >&2
    cat >/etc/apt/sources.list.d/tidemark-bookworm-backports.sources <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  fi
  QEMU_APT_RELEASE=(-t bookworm-backports)
fi
