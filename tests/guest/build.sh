#!/usr/bin/env bash
# Build (or reuse from cache) the tidemark test guest: a Debian 12 kernel plus a small
# initramfs with busybox, bash, nvme-cli, fio, kmod, open-iscsi, sg3-utils, glibc/libgcc_s and
# the kernel modules for the NVMe/TCP and iSCSI initiators, the kernel nvmet target, NVMe PCI,
# virtio and 9p.
#
# Nothing is installed on the host: packages are fetched with `apt-get download` and unpacked
# with dpkg-deb. The result lives in $TIDEMARK_GUEST_CACHE/<key>/ (default
# ~/.cache/tidemark-guest), where <key> hashes this script, guest-init.sh and the exact
# package versions; a second run with the same inputs only computes the key.
#
# Prints the image directory (containing kernel, initramfs.cpio, kver) as the last line
# on stdout; everything else goes to stderr.
#
# Environment:
#   TIDEMARK_GUEST_CACHE       cache directory (default ~/.cache/tidemark-guest)
#   TIDEMARK_GUEST_KERNEL_PKG  kernel package to use (default: what linux-image-amd64 depends on)
#   TIDEMARK_GUEST_EXTRA_PKGS  extra Debian packages whose executables (in bin/ and sbin/) go
#                              into the guest, with their libraries
#   TIDEMARK_GUEST_REBUILD=1   ignore the cache
set -euo pipefail

BUILD_FORMAT=1   # bump to invalidate every cached image
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TIDEMARK_GUEST_CACHE:-${HOME:-/root}/.cache/tidemark-guest}
log() { echo "tidemark-guest build: $*" >&2; }
die() { log "error: $*"; exit 1; }

"$here/deps.sh" >&2

export LC_ALL=C
# Packages whose programs go into the guest, and the modules loaded from it.
TOOL_PKGS=(busybox-static nvme-cli fio kmod bash)
BASE_LIB_PKGS=(libc6 libgcc-s1)
# Every executable of these goes in: the iSCSI initiator (iscsid, iscsiadm) and sg3-utils
# (sg_persist) for the persistent reservation test (tests/iscsi_guest.rs), e2fsprogs (mke2fs,
# resize2fs) for the online grow of a mounted ext4 pool volume (tests/nvmf_guest.rs), and
# whatever the caller adds.
read -r -a EXTRA_PKGS <<<"open-iscsi sg3-utils e2fsprogs ${TIDEMARK_GUEST_EXTRA_PKGS:-}"
# Module roots; modules.dep adds their dependencies. A trailing '?' marks optional ones.
MODULES=(
  nvme_tcp nvme_fabrics nvme_core nvme nvmet nvmet_tcp nvme_loop? configfs
  crc32c_generic crc32c_intel libcrc32c crc32_generic crc32_pclmul
  crct10dif_generic crct10dif_pclmul crc64_rocksoft_generic crc64_rocksoft
  virtio_pci virtio_net virtio_blk virtio_scsi virtio_rng virtio_console e1000 e1000e
  9p 9pnet_virtio
  loop null_blk brd sd_mod sg scsi_mod iscsi_tcp ext4 veth tun
  vfio vfio_pci vfio_iommu_type1 uio_pci_generic
  # NVMe in-band authentication (kernels built with it): the hashes and Diffie-Hellman groups
  # the host asks the crypto API for by name, which modules.dep does not list.
  nvme_auth? hmac? sha256_generic? sha512_generic? dh_generic? kpp?
)

# ---- resolve exact package versions (this is what the cache key is made of) ----------------
# apt-cache takes ~0.5 s a call here, so the answer is remembered per state of the apt lists.
shopt -s nullglob
lists=(/var/lib/apt/lists/*_Packages*)
if ((${#lists[@]} == 0)); then
  log "apt lists are empty; running apt-get update"
  apt-get update -qq >&2
  lists=(/var/lib/apt/lists/*_Packages*)
fi
shopt -u nullglob
resolve_sig=$( { stat -c '%n %s %Y' "${lists[@]}"; echo "k=${TIDEMARK_GUEST_KERNEL_PKG:-}";
                 echo "p=${TOOL_PKGS[*]} ${BASE_LIB_PKGS[*]} ${EXTRA_PKGS[*]}"; } | sha256sum | cut -c1-16)
resolved=$cache/.resolved/$resolve_sig
if [[ -s $resolved ]]; then
  versions=$(cat "$resolved")
else
  kpkg=${TIDEMARK_GUEST_KERNEL_PKG:-}
  if [[ -z $kpkg ]]; then
    kpkg=$(apt-cache depends linux-image-amd64 2>/dev/null |
           awk '$1=="Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ {print $2; exit}')
    [[ -n $kpkg ]] || die "cannot resolve the kernel package behind linux-image-amd64"
  fi
  top_pkgs=("$kpkg" "${TOOL_PKGS[@]}" "${BASE_LIB_PKGS[@]}" "${EXTRA_PKGS[@]}")
  versions=$(apt-cache policy "${top_pkgs[@]}" 2>/dev/null |
             awk '/^[^ ]/ { p = $1; sub(/:$/, "", p) } $1 == "Candidate:" && $2 != "(none)" { print p "=" $2 }')
  for p in "${top_pkgs[@]}"; do
    grep -q "^$p=" <<<"$versions" || die "package $p has no installable version (apt-get update?)"
  done
  mkdir -p "${resolved%/*}"
  echo "$versions" > "$resolved.$$" && mv "$resolved.$$" "$resolved"
fi
kpkg=$(sed -n '1s/=.*//p' <<<"$versions")
key=$( { echo "format=$BUILD_FORMAT"; cat "${BASH_SOURCE[0]}" "$here/guest-init.sh";
         echo "$versions"; printf 'module %s\n' "${MODULES[@]}"; } |
       sha256sum | cut -c1-16)
out="$cache/$key"

if [[ ${TIDEMARK_GUEST_REBUILD:-0} != 1 && -f $out/ok ]]; then
  log "cached image $out"
  echo "$out"
  exit 0
fi

mkdir -p "$cache"
# One builder at a time per cache dir; the loser of the race reuses the winner's image.
exec 9>"$cache/.lock"
flock 9
if [[ ${TIDEMARK_GUEST_REBUILD:-0} != 1 && -f $out/ok ]]; then
  log "cached image $out"; echo "$out"; exit 0
fi

t0=$SECONDS
work=$(mktemp -d "$cache/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
log "building image $key in $work"
sed 's/^/  /' <<<"$versions" >&2

# ---- download -------------------------------------------------------------------------------
# The tools plus every library package they (recursively) depend on. Only the libraries that
# the dynamic loader actually resolves end up in the image.
mkdir -p "$work/debs"
# apt's own resolver picks the package set (first alternatives, Pre-Depends included) by
# simulating an install onto an empty system.
mapfile -t lib_pkgs < <(
  apt-get install -s -qq --no-install-recommends -o Dir::State::status=/dev/null \
    "${TOOL_PKGS[@]}" "${BASE_LIB_PKGS[@]}" "${EXTRA_PKGS[@]}" 2>/dev/null |
  awk '$1 == "Inst" {print $2}' | grep -E '^(lib[a-z0-9].*|zlib1g)$' | sort -u)
((${#lib_pkgs[@]} > 10)) || die "could not resolve the library packages (apt-get install -s)"
if ! (cd "$work/debs" &&
      apt-get -q -o APT::Sandbox::User=root download \
        "$kpkg" "${TOOL_PKGS[@]}" "${BASE_LIB_PKGS[@]}" "${EXTRA_PKGS[@]}" "${lib_pkgs[@]}" >/dev/null); then
  # Stale apt lists name versions the mirror no longer has: refresh once and start over.
  [[ -z ${TIDEMARK_GUEST_BUILD_RETRY:-} ]] || die "apt-get download failed"
  log "apt-get download failed; refreshing the apt lists and retrying"
  apt-get update -qq >&2
  rm -rf "$work"
  exec env TIDEMARK_GUEST_BUILD_RETRY=1 "${BASH_SOURCE[0]}"
fi
log "downloaded $(ls "$work/debs" | wc -l) packages ($(du -sh "$work/debs" | cut -f1)) in $((SECONDS - t0))s"

# ---- unpack ---------------------------------------------------------------------------------
pool=$work/pool      # all user-space packages, unpacked on top of each other
kroot=$work/kernel   # the kernel package
mkdir -p "$pool" "$kroot"
for deb in "$work"/debs/*.deb; do
  case ${deb##*/} in
    linux-image-*) dpkg-deb -x "$deb" "$kroot" ;;
    *) dpkg-deb -x "$deb" "$pool" ;;
  esac
done
kver=$(ls "$kroot/lib/modules")
[[ -n $kver && -f $kroot/boot/vmlinuz-$kver ]] || die "kernel package has no vmlinuz"
# Remember which shared libraries the base library packages ship (glibc, libgcc_s).
for p in "${BASE_LIB_PKGS[@]}"; do
  dpkg-deb --fsys-tarfile "$work"/debs/"${p}"_*.deb | tar -t | sed 's|^\./||' |
    grep -E '^(usr/)?lib/x86_64-linux-gnu/[^/]+\.so[.0-9]*$' || true
done >"$work/base-libs"
[[ -s $work/base-libs ]] || die "no libraries found in ${BASE_LIB_PKGS[*]}"
# ... and which executables the extra packages ship.
for p in "${EXTRA_PKGS[@]}"; do
  dpkg-deb -c "$work"/debs/"${p}"_*.deb |
    awk '$1 ~ /^-..x/ { sub(/^\.\//, "", $6); print $6 }' | grep -E '^(usr/)?s?bin/' >"$work/exes-$p" ||
    die "package $p has no executables in bin/ or sbin/"
done
rm -rf "$work/debs"

# ---- guest root (merged /usr) ---------------------------------------------------------------
root=$work/root
mkdir -p "$root"/{usr/bin,usr/sbin,usr/lib/x86_64-linux-gnu,usr/lib64,etc,proc,sys,dev,run,tmp,var/tmp,root,share,tidemark,mnt}
ln -s usr/bin "$root/bin"; ln -s usr/sbin "$root/sbin"
ln -s usr/lib "$root/lib"; ln -s usr/lib64 "$root/lib64"

# Map a path inside the pool (e.g. lib/x86_64-linux-gnu/libc.so.6) to the merged-/usr root.
dest_of() {
  local rel=${1#/}
  case $rel in bin/*|sbin/*|lib/*|lib64/*) rel=usr/$rel ;; esac
  echo "$root/$rel"
}
# Copy a file from the pool into the root, following symlinks (the copy is a regular file).
install_file() {
  local rel=${1#"$pool"/} d
  d=$(dest_of "$rel")
  [[ -e $d ]] && return 0
  mkdir -p "${d%/*}"
  cp -L --preserve=mode "$pool/$rel" "$d"
}

# glibc and libgcc_s in full, so that any ordinary dynamically linked (Rust) binary runs.
while read -r f; do install_file "$f"; done <"$work/base-libs"
ln -sf ../lib/x86_64-linux-gnu/ld-linux-x86-64.so.2 "$root/usr/lib64/ld-linux-x86-64.so.2"
[[ -f $root/usr/lib/x86_64-linux-gnu/libc.so.6 ]] || die "glibc missing from the image"

# Executables: the tools, plus every executable of the extra packages.
exes=(usr/sbin/nvme usr/bin/fio bin/kmod bin/bash)
for p in "${EXTRA_PKGS[@]}"; do
  while read -r f; do exes+=("$f"); done <"$work/exes-$p"
done
for e in "${exes[@]}"; do
  [[ -f $pool/$e ]] || die "$e not found in the unpacked packages"
  install_file "$e"
done
for n in modprobe insmod rmmod lsmod modinfo depmod; do
  ln -sf ../bin/kmod "$root/usr/sbin/$n"
done
# busybox: itself and every applet that no real tool above provides.
install -m 0755 "$pool/bin/busybox" "$root/usr/bin/busybox"
while read -r a; do
  d=$(dest_of "$a")
  [[ -e $d || -L $d ]] && continue
  mkdir -p "${d%/*}"
  ln -s /usr/bin/busybox "$d"
done < <("$pool/bin/busybox" --list-full)
[[ -L $root/usr/bin/sh ]] || die "busybox did not provide /bin/sh"

# Shared libraries: ask the (unpacked) dynamic loader to resolve each executable against the
# pool only. Anything resolved outside the pool, or not at all, is an error.
ldso=$pool/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
mapfile -t libdirs < <(cd "$pool" && find . -name '*.so*' \( -type f -o -type l \) -printf '%h\n' |
                       sed 's|^\./||' | grep -E '(^|/)lib(64)?(/|$)' | sort -u)
libpath=$(printf "$pool/%s:" "${libdirs[@]}"); libpath=${libpath%:}
for e in "${exes[@]}"; do
  readelf -d "$pool/$e" 2>/dev/null | grep -q NEEDED || continue
  listing=$("$ldso" --library-path "$libpath" --list "$pool/$e") || die "ld.so cannot resolve $e"
  while read -r line; do
    case $line in
      *"not found"*) die "$e: unresolved library: $line" ;;
      linux-vdso*) continue ;;
    esac
    path=$(awk '{ for (i = 1; i <= NF; i++) if ($i == "=>") { print $(i+1); exit } }
                NF > 0 && $0 !~ /=>/ { print $1 }' <<<"$line")
    [[ -z $path ]] && continue
    case $path in
      "$pool"/*) install_file "$path" ;;
      /lib64/ld-linux-x86-64.so.2) ;;
      *) die "$e: library resolved outside the unpacked packages: $line" ;;
    esac
  done <<<"$listing"
done

# ld.so.cache for the guest (every library directory we populated).
mkdir -p "$root/etc/ld.so.conf.d"
(cd "$root" && find usr/lib -name '*.so*' -printf '/%h\n' | sort -u) > "$root/etc/ld.so.conf"
ldconfig -r "$root"

# ---- kernel modules -------------------------------------------------------------------------
depmod -b "$kroot" "$kver"
moddir=lib/modules/$kver
declare -A modpath=()
while IFS=: read -r path _; do
  name=${path##*/}; name=${name%%.ko*}; name=${name//-/_}
  modpath[$name]=$path
done < "$kroot/$moddir/modules.dep"
declare -A want=()
for m in "${MODULES[@]}"; do
  opt=0; [[ $m == *\? ]] && { opt=1; m=${m%\?}; }
  m=${m//-/_}
  if [[ -z ${modpath[$m]:-} ]]; then
    if grep -qE "/${m//_/[-_]}\.ko" "$kroot/$moddir/modules.builtin" 2>/dev/null; then continue; fi
    ((opt)) && { log "note: optional module $m not in this kernel"; continue; }
    die "module $m not found in $kver"
  fi
  p=${modpath[$m]}
  want[$p]=1
  for dep in $(awk -v p="$p:" '$1 == p { $1 = ""; print; exit }' "$kroot/$moddir/modules.dep"); do
    want[$dep]=1
  done
done
for p in "${!want[@]}"; do
  mkdir -p "$root/usr/$moddir/${p%/*}"
  cp "$kroot/$moddir/$p" "$root/usr/$moddir/$p"
done
cp "$kroot/$moddir"/modules.{builtin,builtin.modinfo,order} "$root/usr/$moddir/"
depmod -b "$root" "$kver"
[[ -s $root/usr/$moddir/modules.dep ]] || die "depmod produced no modules.dep for the guest"
log "kernel $kver with ${#want[@]} modules"

# ---- /etc, /init, device nodes ---------------------------------------------------------------
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'passwd: files\ngroup: files\nhosts: files dns\n' > "$root/etc/nsswitch.conf"
printf 'tidemark-guest\n' > "$root/etc/hostname"
: > "$root/etc/fstab"
install -m 0755 "$here/guest-init.sh" "$root/init"
# The kernel opens /dev/console before /init runs; the archive needs the node itself.
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || log "note: mknod not permitted; init redirects to the console itself"
mknod -m 666 "$root/dev/null" c 1 3 2>/dev/null || true

# Drop what a test guest never needs.
rm -rf "${root:?}/usr/share" "${root:?}/usr/lib/x86_64-linux-gnu/gconv"

# ---- archive --------------------------------------------------------------------------------
# Uncompressed: under TCG, inflating ~100 MB in the guest costs ~2 s a boot; disk is cheap.
mkdir -p "$work/out"
(cd "$root" && find . -mindepth 1 | sort | cpio -o -H newc -R 0:0 --quiet) > "$work/out/initramfs.cpio"
# Kernel: QEMU can start the uncompressed vmlinux directly through its PVH entry point, which
# skips ~3 s of in-guest decompression under TCG. Fall back to the bzImage if that fails.
vmlinuz=$kroot/boot/vmlinuz-$kver
extract_vmlinux() {
  local magic=$1 cmd=$2 off
  for off in $(grep -abo "$magic" "$vmlinuz" 2>/dev/null | cut -d: -f1 | head -n 5); do
    tail -c +$((off + 1)) "$vmlinuz" | $cmd > "$work/vmlinux" 2>/dev/null || true
    if readelf -n "$work/vmlinux" 2>/dev/null | grep -q 'note type: (0x00000012)'; then
      return 0
    fi
  done
  return 1
}
if extract_vmlinux $'\xfd7zXZ\x00' 'xz -dc --single-stream' ||
   extract_vmlinux $'\x28\xb5\x2f\xfd' 'zstd -dcq' ||
   extract_vmlinux $'\x1f\x8b\x08' 'gzip -dc'; then
  mv "$work/vmlinux" "$work/out/kernel"
  log "kernel: uncompressed vmlinux with PVH entry"
else
  cp "$vmlinuz" "$work/out/kernel"
  log "note: could not extract a PVH vmlinux; booting the compressed bzImage (slower)"
fi
echo "$kver" > "$work/out/kver"
echo "$versions" > "$work/out/versions"
touch "$work/out/ok"

rm -rf "$out"
mv "$work/out" "$out"
# Keep the three most recent images.
ls -1dt "$cache"/*/ 2>/dev/null | tail -n +4 | while read -r old; do
  [[ -f $old/ok && ${old%/} != "$out" ]] && rm -rf "$old"
done
log "built $out in $((SECONDS - t0))s: initramfs $(( $(stat -c %s "$out/initramfs.cpio") / 1048576 )) MiB, kernel $(( $(stat -c %s "$out/kernel") / 1048576 )) MiB"
echo "$out"
