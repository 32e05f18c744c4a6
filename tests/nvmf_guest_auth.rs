//! NVMe in-band authentication (DH-HMAC-CHAP) with the Linux kernel host: a QEMU guest
//! (tests/guest/run.sh) with Debian 12's backports kernel (bookworm's 6.1 is built without
//! CONFIG_NVME_AUTH; tests/guest/kernel-backports.sh picks the package) runs
//! tests/nvmf/guest_auth.sh: `nvme connect --dhchap-secret [--dhchap-ctrl-secret]` with fio
//! verify, re-authentication of a live controller, and a wrong, a missing and a wrong controller
//! secret refused. The host side checks the refusals were counted and logged with the host's
//! NQN and that no secret reached the log.
//!
//! Needs qemu-system-x86_64 and the guest image (tests/guest/deps.sh; build.sh downloads the
//! kernel): without them the test fails, unless TIDEMARK_SKIP_NVMF_GUEST=1.

mod support;

use serde_json::json;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Instant;
use support::*;
use tidemark::nvmf::auth::{Digest, Secret};

const NQN: &str = "nqn.2016-06.io.tidemark:auth";
const HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:6a7b7e1e-0000-4000-8000-0000000000c1";

fn skip() -> bool {
    ["TIDEMARK_SKIP_NVMF_GUEST", "TIDEMARK_SKIP_NVMF"].iter().any(|v| std::env::var(v).as_deref() == Ok("1"))
}

#[test]
fn linux_host_authenticates_with_dh_hmac_chap() {
    if skip() {
        eprintln!("skipped: TIDEMARK_SKIP_NVMF_GUEST=1");
        return;
    }
    let run_sh = tests_dir().join("guest/run.sh");
    assert!(have("qemu-system-x86_64"), "qemu-system-x86_64 is not installed: run tests/guest/deps.sh (or set TIDEMARK_SKIP_NVMF_GUEST=1 to skip this test)");
    let kernel = Command::new(tests_dir().join("guest/kernel-backports.sh")).stderr(Stdio::inherit()).output().expect("run tests/guest/kernel-backports.sh");
    assert!(kernel.status.success(), "no backports kernel package for the guest");
    let kernel = String::from_utf8_lossy(&kernel.stdout).trim().to_string();

    let d = Daemon::start(MINIMAL_CONFIG);
    let port = free_port();
    let keys = tempfile::tempdir().unwrap();
    let (key, ctrl_key, wrong) =
        (Secret::encode(Some(Digest::Sha256), &[0x61; 32]), Secret::encode(None, &[0x62; 48]), Secret::encode(Some(Digest::Sha256), &[0x63; 32]));
    for (name, secret) in [("key0", &key), ("ckey0", &ctrl_key)] {
        let p = keys.path().join(name);
        std::fs::write(&p, secret).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        d.rpc("keyring_file_add_key", json!({"name": name, "path": p}));
    }
    // The guest runs under emulation (TCG): an 8192-bit group takes the kernel host minutes of
    // modular arithmetic, so the target offers the smaller groups (and every hash).
    d.rpc("nvmf_set_config", json!({"dhchap_dhgroups": ["null", "ffdhe2048", "ffdhe3072"]}));
    d.rpc("bdev_malloc_create", json!({"name": "a0", "num_blocks": 65536, "block_size": 512}));
    d.rpc("nvmf_create_transport", json!({"trtype": "TCP"}));
    d.rpc("nvmf_create_subsystem", json!({"nqn": NQN, "serial_number": "TMGUESTAUTH1", "allow_any_host": false}));
    d.rpc("nvmf_subsystem_add_ns", json!({"nqn": NQN, "namespace": {"bdev_name": "a0"}}));
    d.rpc("nvmf_subsystem_add_host", json!({"nqn": NQN, "host": HOST, "dhchap_key": "key0", "dhchap_ctrlr_key": "ckey0"}));
    d.rpc(
        "nvmf_subsystem_add_listener",
        json!({"nqn": NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": port.to_string()}}),
    );

    let t0 = Instant::now();
    let out = Command::new(&run_sh)
        .arg(tests_dir().join("nvmf/guest_auth.sh"))
        .env("TIDEMARK_GUEST_KERNEL_PKG", &kernel)
        .env("TIDEMARK_GUEST_VARS", "PORT NQN HOST KEY CTRL_KEY WRONG")
        .env("TIDEMARK_GUEST_TIMEOUT", std::env::var("TIDEMARK_GUEST_TIMEOUT").unwrap_or_else(|_| "600".into()))
        .env("PORT", port.to_string())
        .env("NQN", NQN)
        .env("HOST", HOST)
        .env("KEY", &key)
        .env("CTRL_KEY", &ctrl_key)
        .env("WRONG", &wrong)
        .stdin(Stdio::null())
        .output()
        .expect("run tests/guest/run.sh");
    let console = String::from_utf8_lossy(&out.stdout);
    eprintln!("{console}\n{}\n(guest run with {kernel} took {:?})", String::from_utf8_lossy(&out.stderr), t0.elapsed());
    let failed: Vec<&str> = console.lines().filter(|l| l.contains("CHECK FAIL")).collect();
    assert!(failed.is_empty(), "guest checks failed: {failed:#?}\n{}", d.log_text());
    assert!(out.status.success() && console.contains(" passed, 0 failed"), "the guest script failed ({}):\n{}", out.status, d.log_text());

    // Three refusals counted (wrong secret, wrong controller secret: failed transactions; the
    // host without a secret never starts one), logged with the host's NQN, no secret logged.
    assert!(d.metric("tidemark_nvmf_auth_failures_total") >= 2.0, "{}", d.log_text());
    let log = d.log_text();
    assert!(log.contains(&format!("host {HOST} (127.0.0.1:")) && log.contains("failed DH-HMAC-CHAP"), "{log}");
    for secret in [&key, &ctrl_key, &wrong] {
        assert!(!log.contains(&secret[10..30]), "a secret reached the log");
    }
    let st = d.rpc("bdev_get_iostat", json!({"name": "a0"}));
    assert!(st["bdevs"][0]["num_write_ops"].as_u64().unwrap() > 100, "{st}");
    assert!(d.rpc("nvmf_subsystem_get_controllers", json!({"nqn": NQN})).as_array().unwrap().is_empty());
}
