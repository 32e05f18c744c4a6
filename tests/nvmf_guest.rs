//! The Linux kernel NVMe/TCP initiator against tidemarkd: a QEMU guest (tests/guest/run.sh)
//! runs tests/nvmf/guest.sh — nvme discover/connect/id-ctrl/id-ns, fio random read and write
//! and a 30 s write+verify at QD32, a refused host, an async event when a namespace is removed,
//! nvme disconnect; then on volumes of a pool (bdevs/lvol): a pattern, a snapshot under a
//! running writer, a clone of it written and read beside its origin, and a mounted ext4
//! volume grown online (the guest sees the new size without reconnecting, resize2fs grows the
//! file system); ANA multipath: one subsystem through two listeners is one multipath head, fio
//! write+verify on it goes on without error while the host makes a path inaccessible, swaps
//! the paths and removes a listener. The host side serves what the guest asks for (namespace removal, snapshot
//! and clone, resize) and checks what the target saw.
//!
//! Needs qemu-system-x86_64 and the guest image (tests/guest/deps.sh, build.sh: tests/run
//! installs them). Without them the test fails, unless TIDEMARK_SKIP_NVMF_GUEST=1.

mod support;

use serde_json::json;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

const NQN: &str = "nqn.2016-06.io.tidemark:guest";
const NQN_RESTRICTED: &str = "nqn.2016-06.io.tidemark:restricted";
const HOST_GUEST: &str = "nqn.2014-08.org.nvmexpress:uuid:6a7b7e1e-0000-4000-8000-000000000001";
const HOST_ALLOWED: &str = "nqn.2014-08.org.nvmexpress:uuid:6a7b7e1e-0000-4000-8000-0000000000a1";
/// nsid 1: the thin 256 MiB pool volume `gpool/gvol`; nsid 2: `gpool/fsvol`, 64 MiB, grown to
/// 128 MiB while the guest has ext4 mounted on it.
const NQN_POOL: &str = "nqn.2016-06.io.tidemark:pool";
/// The clone of gvol's snapshot, exported when the guest asks for the snapshot.
const NQN_CLONE: &str = "nqn.2016-06.io.tidemark:clone";
/// ANA multipath: one 64 MiB namespace (ana_reporting) on two listeners (port and port2),
/// whose states the guest asks the host to change while fio runs.
const NQN_ANA: &str = "nqn.2016-06.io.tidemark:ana";
/// A hundred thin 4 MiB volumes of the pool, namespaces 1..=100: a fleet-sized pool, each
/// volume written with its own pattern by the guest and read back.
const NQN_MANY: &str = "nqn.2016-06.io.tidemark:many";
const MANY: u32 = 100;

fn skip() -> bool {
    ["TIDEMARK_SKIP_NVMF_GUEST", "TIDEMARK_SKIP_NVMF"].iter().any(|v| std::env::var(v).as_deref() == Ok("1"))
}

#[test]
fn linux_initiator_in_a_guest() {
    if skip() {
        eprintln!("skipped: TIDEMARK_SKIP_NVMF_GUEST=1");
        return;
    }
    let run_sh = tests_dir().join("guest/run.sh");
    assert!(run_sh.exists(), "{} is missing", run_sh.display());
    assert!(have("qemu-system-x86_64"), "qemu-system-x86_64 is not installed: run tests/guest/deps.sh (or set TIDEMARK_SKIP_NVMF_GUEST=1 to skip this test)");

    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    d.rpc("bdev_malloc_create", json!({"name": "g0", "num_blocks": 524288, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "g1", "num_blocks": 8192, "block_size": 512}));
    d.rpc("bdev_malloc_create", json!({"name": "r0", "num_blocks": 8192, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    let listen = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()});
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "TMGUEST0001", "model_number": "tidemark guest test", "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "g0", "nsid": 1}}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "g1", "nsid": 2}}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN, "listen_address": listen}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN_RESTRICTED, "serial_number": "TMGUEST0002", "allow_any_host": false}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_RESTRICTED, "namespace": {"bdev_name": "r0"}}));
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN_RESTRICTED, "host": HOST_ALLOWED}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_RESTRICTED, "listen_address": listen}));
    // A pool on a sparse file, two thin volumes of it.
    d.rpc("bdev_uring_create", json!({"name": "gbase", "filename": "gpool.img", "size_mb": 1024, "block_size": 512}));
    d.rpc("bdev_lvol_create_lvstore", json!({"bdev_name": "gbase", "lvs_name": "gpool"}));
    d.rpc("bdev_lvol_create", json!({"lvs_name": "gpool", "lvol_name": "gvol", "size_in_mib": 256, "thin_provision": true}));
    d.rpc("bdev_lvol_create", json!({"lvs_name": "gpool", "lvol_name": "fsvol", "size_in_mib": 64, "thin_provision": true}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN_POOL, "serial_number": "TMGUEST0003", "allow_any_host": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_POOL, "namespace": {"bdev_name": "gpool/gvol", "nsid": 1}}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_POOL, "namespace": {"bdev_name": "gpool/fsvol", "nsid": 2}}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_POOL, "listen_address": listen}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN_MANY, "serial_number": "TMGUEST0006", "allow_any_host": true, "max_namespaces": 128}));
    for i in 1..=MANY {
        d.rpc("bdev_lvol_create", json!({"lvs_name": "gpool", "lvol_name": format!("many{i}"), "size_in_mib": 4, "thin_provision": true}));
        d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_MANY, "namespace": {"bdev_name": format!("gpool/many{i}"), "nsid": i}}));
    }
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_MANY, "listen_address": listen}));
    let port2 = free_port();
    let listen2 = json!({"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port2.to_string()});
    d.rpc("bdev_malloc_create", json!({"name": "a0", "num_blocks": 131072, "block_size": 512}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN_ANA, "serial_number": "TMGUEST0005", "allow_any_host": true, "ana_reporting": true}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN_ANA, "namespace": {"bdev_name": "a0", "nsid": 1}}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_ANA, "listen_address": listen}));
    d.rpc("nvmf_subsystem_add_listener", json!({"nqn": NQN_ANA, "listen_address": listen2}));

    // The guest asks (through the share: NAME.request, answered by NAME.done) for what only
    // the host can do while it is connected.
    let share = tempfile::Builder::new().prefix("tidemark-nvmf-guest").tempdir().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let socket = d.socket.clone();
    let share_path = share.path().to_path_buf();
    let st = stop.clone();
    let listen_clone = listen.clone();
    let (ana1, ana2) = (listen.clone(), listen2.clone());
    let helper = std::thread::spawn(move || {
        let serve = |name: &str| -> bool {
            let s = &socket;
            match name {
                // Namespace 2 removed while connected: the guest sees the async event.
                "remove-ns" => rpc_on(s, "nvmf_subsystem_remove_ns", json!({"nqn": NQN, "nsid": 2})),
                // While the guest's writer runs: snapshot, clone, and export the clone.
                "snapshot" => {
                    let t = Instant::now();
                    let ok = rpc_on(s, "bdev_lvol_snapshot", json!({"lvol_name": "gpool/gvol", "snapshot_name": "gsnap"}));
                    eprintln!("bdev_lvol_snapshot under the guest's writer took {:?}", t.elapsed());
                    ok && rpc_on(s, "bdev_lvol_clone", json!({"snapshot_name": "gpool/gsnap", "clone_name": "gclone"}))
                        && rpc_on(s, "nvmf_create_subsystem", json!({"nqn": NQN_CLONE, "serial_number": "TMGUEST0004", "allow_any_host": true}))
                        && rpc_on(s, "nvmf_subsystem_add_ns", json!({"nqn": NQN_CLONE, "namespace": {"bdev_name": "gpool/gclone", "nsid": 1}}))
                        && rpc_on(s, "nvmf_subsystem_add_listener", json!({"nqn": NQN_CLONE, "listen_address": listen_clone}))
                }
                // Grown while mounted: the guest sees the new size without reconnecting.
                "grow" => rpc_on(s, "bdev_lvol_resize", json!({"name": "gpool/fsvol", "size_in_mib": 128})),
                // ANA: the guest's fio runs on the multipath head meanwhile.
                "ana-inaccessible" => set_ana(s, &ana1, "inaccessible"),
                "ana-swap" => set_ana(s, &ana1, "optimized") && set_ana(s, &ana2, "inaccessible"),
                "ana-remove" => set_ana(s, &ana2, "optimized") && rpc_on(s, "nvmf_subsystem_remove_listener", json!({"nqn": NQN_ANA, "listen_address": ana1})),
                _ => false,
            }
        };
        let mut served = Vec::new();
        while !st.load(Ordering::SeqCst) {
            for name in ["remove-ns", "snapshot", "grow", "ana-inaccessible", "ana-swap", "ana-remove"] {
                if !served.iter().any(|(n, _)| *n == name) && share_path.join(format!("{name}.request")).exists() {
                    let ok = serve(name);
                    std::fs::write(share_path.join(format!("{name}.done")), if ok { "ok" } else { "failed" }).unwrap();
                    served.push((name, ok));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        served
    });

    let script = tests_dir().join("nvmf/guest.sh");
    let t0 = Instant::now();
    let out = Command::new(&run_sh)
        .arg(&script)
        .env("TIDEMARK_GUEST_SHARE", share.path())
        .env("TIDEMARK_GUEST_VARS", "PORT PORT2 NQN NQN_RESTRICTED NQN_POOL NQN_CLONE NQN_ANA NQN_MANY MANY HOST_GUEST HOST_ALLOWED FIO_SECS")
        .env("TIDEMARK_GUEST_TIMEOUT", std::env::var("TIDEMARK_GUEST_TIMEOUT").unwrap_or_else(|_| "600".into()))
        .env("PORT", port.to_string())
        .env("PORT2", port2.to_string())
        .env("NQN_ANA", NQN_ANA)
        .env("NQN_MANY", NQN_MANY)
        .env("MANY", MANY.to_string())
        .env("NQN", NQN)
        .env("NQN_RESTRICTED", NQN_RESTRICTED)
        .env("NQN_POOL", NQN_POOL)
        .env("NQN_CLONE", NQN_CLONE)
        .env("HOST_GUEST", HOST_GUEST)
        .env("HOST_ALLOWED", HOST_ALLOWED)
        .env("FIO_SECS", "10")
        .stdin(Stdio::null())
        .output()
        .expect("run tests/guest/run.sh");
    stop.store(true, Ordering::SeqCst);
    let served = helper.join().unwrap();
    let console = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!("{console}\n{stderr}\n(guest run took {:?})", t0.elapsed());
    let failed: Vec<&str> = console.lines().filter(|l| l.contains("CHECK FAIL")).collect();
    assert!(failed.is_empty(), "guest checks failed: {failed:#?}\n{}", d.log_text());
    assert!(out.status.success(), "guest script failed ({}); daemon log:\n{}", out.status, d.log_text());
    assert!(console.contains("nvmf-guest: ") && console.contains(" passed, 0 failed"), "the guest script did not finish");
    assert_eq!(
        served,
        [("remove-ns", true), ("snapshot", true), ("grow", true), ("ana-inaccessible", true), ("ana-swap", true), ("ana-remove", true)],
        "what the guest asked the host for, in order, and whether it worked"
    );

    // What the target saw: the hosts are gone, their I/O was counted, the refused host was
    // logged, and the removed namespace's bdev is free again.
    for nqn in [NQN, NQN_RESTRICTED, NQN_POOL, NQN_CLONE, NQN_ANA, NQN_MANY] {
        assert!(d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": nqn})).as_array().unwrap().is_empty(), "{nqn} still has controllers");
    }
    let st = d.rpc("bdev_get_iostat", json!({"name": "g0"}));
    assert!(st["bdevs"][0]["num_write_ops"].as_u64().unwrap() > 1000, "{st}");
    assert!(st["bdevs"][0]["num_read_ops"].as_u64().unwrap() > 1000, "{st}");
    assert!(d.log_text().contains(&format!("host {HOST_GUEST}")), "the refused connect is logged");
    d.rpc("bdev_malloc_delete", json!({"name": "g1"}));
    // The pool: the snapshot has its clone, the grown volume its new size, and the writes
    // took space (thin volumes allocate on first write).
    let lvols = d.rpc("bdev_lvol_get_lvols", json!({"lvs_name": "gpool"}));
    let lvol = |name: &str| lvols.as_array().and_then(|a| a.iter().find(|l| l["name"] == name)).cloned().unwrap_or_else(|| panic!("no lvol {name}: {lvols}"));
    assert!(lvol("gsnap")["clones"].as_array().is_some_and(|c| c.contains(&json!("gclone"))), "{lvols}");
    assert_eq!(lvol("gclone")["base_snapshot"], "gsnap", "{lvols}");
    assert_eq!(lvol("fsvol")["num_clusters"], 128, "{lvols}");
    assert!(lvol("gvol")["num_allocated_clusters"].as_u64() > Some(4), "{lvols}");
    // Each of the hundred volumes took exactly the one cluster its pattern went to.
    for i in 1..=MANY {
        assert_eq!(lvol(&format!("many{i}"))["num_allocated_clusters"], 1, "many{i}: {lvols}");
    }
    // ANA: the guest's I/O went through the multipath head to the namespace, the first
    // listener is gone and the second one ended optimized.
    let st = d.rpc("bdev_get_iostat", json!({"name": "a0"}));
    assert!(st["bdevs"][0]["num_write_ops"].as_u64().unwrap() > 500, "{st}");
    let ls = d.rpc("nvmf_subsystem_get_listeners", json!({"nqn": NQN_ANA}));
    assert_eq!(ls.as_array().map(|a| a.len()), Some(1), "{ls}");
    assert_eq!(ls[0]["address"]["trsvcid"], port2.to_string(), "{ls}");
    assert_eq!(ls[0]["ana_states"][0]["ana_state"], "optimized", "{ls}");
}

/// Sets the ANA state of every group of `NQN_ANA` on `listen`; true on success.
fn set_ana(socket: &Path, listen: &serde_json::Value, state: &str) -> bool {
    rpc_on(socket, "nvmf_subsystem_listener_set_ana_state", json!({"nqn": NQN_ANA, "listen_address": listen, "ana_state": state}))
}

/// One RPC on `socket`; true on success.
fn rpc_on(socket: &Path, method: &str, params: serde_json::Value) -> bool {
    use std::io::{BufReader, Write};
    let Ok(s) = std::os::unix::net::UnixStream::connect(socket) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let req = json!({"jsonrpc": "2.0", "id": 1, "method": method, "params": params});
    if (&s).write_all(req.to_string().as_bytes()).is_err() {
        return false;
    }
    let resp = serde_json::Deserializer::from_reader(BufReader::new(&s)).into_iter::<serde_json::Value>().next();
    matches!(resp, Some(Ok(v)) if v.get("result").is_some())
}
