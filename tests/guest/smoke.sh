#!/usr/bin/env bash
# Smoke test of the test guest, in one boot:
#   - nvme-cli, fio and kmod run; nvme_tcp is loaded (/sys/module/nvme_tcp)
#   - the guest reaches the host's 127.0.0.1 as 10.0.2.2 (HTTP GET from a server started here)
#   - the 9p share works both ways, and a dynamically linked Rust binary built here runs from it
#   - extra QEMU args pass through: an emulated NVMe PCI drive shows up as a block device
#   - the NVMe/TCP initiator works end to end against the guest kernel's own nvmet-tcp target
#     on the guest loopback (discover, connect, fio write+verify, disconnect)
# Prints "smoke: N passed, N failed" and exits non-zero on any failure.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tidemark-smoke.XXXXXX")
httppid=""
cleanup() {
  if [[ -n $httppid ]] && kill -0 "$httppid" 2>/dev/null; then
    kill "$httppid" 2>/dev/null || true
    wait "$httppid" 2>/dev/null || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT

"$here/deps.sh"

# Host HTTP server on 127.0.0.1, on a port the kernel picks.
mkdir -p "$tmp/www" "$tmp/share"
token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$token" > "$tmp/www/token.txt"
python3 -u -m http.server 0 --bind 127.0.0.1 --directory "$tmp/www" >"$tmp/http.log" 2>&1 &
httppid=$!
port=""
for _ in $(seq 50); do
  port=$(sed -n 's/.*port \([0-9][0-9]*\).*/\1/p' "$tmp/http.log" | head -n 1)
  [[ -n $port ]] && break
  sleep 0.1
done
[[ -n $port ]] || { echo "smoke: http server did not start"; cat "$tmp/http.log"; exit 1; }

# A dynamically linked Rust program (std, threads, HashMap's random keys) for the share.
rust_bin=""
if command -v rustc >/dev/null 2>&1; then
  cat > "$tmp/hello.rs" <<'EOF'
use std::collections::HashMap;
fn main() {
    let h = std::thread::spawn(|| 21 * 2);
    let mut m = HashMap::new();
    m.insert("answer", h.join().unwrap());
    println!("rust-in-guest answer={}", m["answer"]);
}
EOF
  if rustc -O -o "$tmp/share/hello-rust" "$tmp/hello.rs" 2>"$tmp/rustc.log"; then
    rust_bin=1
  else
    echo "smoke: note: rustc failed, skipping the Rust binary check"; cat "$tmp/rustc.log"
  fi
fi
echo "from-host" > "$tmp/share/from-host.txt"

# Emulated NVMe PCI drive, passed as extra QEMU arguments.
truncate -s 64M "$tmp/nvme-pci.img"

cat > "$tmp/guest.sh" <<'EOF'
pass=0; fail=0
check() { # check NAME COMMAND...
  name=$1; shift
  if "$@" >/tmp/check.out 2>&1; then
    echo "CHECK ok   $name"; pass=$((pass + 1))
  else
    echo "CHECK FAIL $name"; sed 's/^/    /' /tmp/check.out | tail -n 20; fail=$((fail + 1))
  fi
}

check "nvme version" nvme version
nvme version
check "fio --version" fio --version
fio --version
check "modprobe nvme-tcp" modprobe nvme-tcp
check "/sys/module/nvme_tcp exists" test -d /sys/module/nvme_tcp
. /tidemark/lib.sh
check "wait_tcp 10.0.2.2:$HTTP_PORT" wait_tcp 10.0.2.2 "$HTTP_PORT" 10
check "wget host 10.0.2.2:$HTTP_PORT" sh -c '[ "$(timeout 20 wget -q -O - "http://10.0.2.2:$HTTP_PORT/token.txt")" = "$TOKEN" ]'
check "9p share readable" grep -q from-host /share/from-host.txt
check "9p share writable" sh -c 'echo from-guest > /share/from-guest.txt'
if [ -n "$RUST_BIN" ]; then
  check "dynamic Rust binary runs" sh -c '/share/hello-rust | grep -q "answer=42"'
fi
check "emulated NVMe PCI drive" sh -c 'for c in /sys/class/nvme/nvme*; do grep -q tm-smoke $c/serial && exit 0; done; exit 1'

# NVMe/TCP end to end: the guest kernel's nvmet-tcp target on 127.0.0.1, the initiator
# connecting to it.
NQN=nqn.2024-01.io.tidemark:smoke
setup_nvmet() (
  set -e
  modprobe brd rd_nr=1 rd_size=65536
  modprobe nvmet_tcp
  cd /sys/kernel/config/nvmet
  mkdir subsystems/$NQN
  echo 1 > subsystems/$NQN/attr_allow_any_host
  mkdir subsystems/$NQN/namespaces/1
  printf /dev/ram0 > subsystems/$NQN/namespaces/1/device_path
  echo 1 > subsystems/$NQN/namespaces/1/enable
  mkdir ports/1
  echo tcp > ports/1/addr_trtype
  echo ipv4 > ports/1/addr_adrfam
  echo 127.0.0.1 > ports/1/addr_traddr
  echo 4420 > ports/1/addr_trsvcid
  ln -s /sys/kernel/config/nvmet/subsystems/$NQN ports/1/subsystems/$NQN
)
check "nvmet-tcp target up on 127.0.0.1:4420" setup_nvmet
check "nvme discover" sh -c "nvme discover -t tcp -a 127.0.0.1 -s 4420 | tee /dev/stderr | grep -q $NQN"
nvme discover -t tcp -a 127.0.0.1 -s 4420 | grep -E 'trtype|subnqn|traddr'
check "nvme connect" nvme connect -t tcp -a 127.0.0.1 -s 4420 -n $NQN
. /tidemark/lib.sh
DEV=$(nvme_ns_dev $NQN 10) || true
echo "NVMe/TCP namespace: ${DEV:-none}"
nvme list
check "NVMe/TCP block device appeared" test -b "$DEV"
check "fio write+verify over NVMe/TCP" fio --name=smoke --filename="$DEV" --rw=randwrite --bs=4k \
  --size=16m --ioengine=libaio --iodepth=8 --direct=1 --verify=crc32c --do_verify=1 --output-format=terse
check "nvme disconnect" nvme disconnect -n $NQN
check "nvmet teardown" sh -c "cd /sys/kernel/config/nvmet && rm ports/1/subsystems/$NQN && rmdir ports/1 &&
  echo 0 > subsystems/$NQN/namespaces/1/enable && rmdir subsystems/$NQN/namespaces/1 && rmdir subsystems/$NQN"

echo "GUEST_CHECKS pass=$pass fail=$fail"
[ "$fail" -eq 0 ]
EOF

export HTTP_PORT=$port TOKEN=$token RUST_BIN=$rust_bin
rc=0
TIDEMARK_GUEST_SHARE=$tmp/share TIDEMARK_GUEST_VARS="HTTP_PORT TOKEN RUST_BIN" \
TIDEMARK_GUEST_LOG=$tmp/console.log TIDEMARK_GUEST_TIMEOUT=${TIDEMARK_GUEST_TIMEOUT:-300} \
  "$here/run.sh" "$tmp/guest.sh" \
    -drive "file=$tmp/nvme-pci.img,if=none,id=nvm0,format=raw" -device nvme,serial=tm-smoke,drive=nvm0 \
  || rc=$?

passed=$(tr -d '\r' < "$tmp/console.log" | grep -c '^CHECK ok' || true)
failed=$(tr -d '\r' < "$tmp/console.log" | grep -c '^CHECK FAIL' || true)
# Host-side checks.
if [[ -f $tmp/share/from-guest.txt ]] && grep -q from-guest "$tmp/share/from-guest.txt"; then
  passed=$((passed + 1)); echo "CHECK ok   host sees the file the guest wrote to the share"
else
  failed=$((failed + 1)); echo "CHECK FAIL host sees the file the guest wrote to the share"
fi
if grep -q 'GET /token.txt' "$tmp/http.log"; then
  passed=$((passed + 1)); echo "CHECK ok   host HTTP server saw the guest's request"
else
  failed=$((failed + 1)); echo "CHECK FAIL host HTTP server saw the guest's request"
fi
if ((rc != 0)); then
  failed=$((failed + 1)); echo "CHECK FAIL guest script exit status (run.sh exited $rc)"
fi
echo "smoke: $passed passed, $failed failed"
((failed == 0))
