//! The raw NVMe bdev (io_uring passthrough on /dev/ngXnY), inside the QEMU test guest with an
//! emulated NVMe drive: data integrity (write/read-back verify, transfers split at MDTS), the
//! Identify data in bdev_get_bdevs, refusal of a namespace with metadata and of a device that is
//! not NVMe, the bdev exported over NVMe/TCP on the guest's loopback with the guest's kernel
//! initiator and fio verify through it, a drive that disappears under load, and figures against fio's io_uring_cmd engine
//! in the same guest run (under TCG: functional, not a speed claim).

mod support;

use std::process::Command;

#[test]
fn nvme_passthrough_bdev_in_the_guest() {
    if std::env::var_os("TIDEMARK_SKIP_GUEST").is_some() {
        eprintln!("TIDEMARK_SKIP_GUEST set: skipped");
        return;
    }
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let run = repo.join("tests/guest/run.sh");
    assert!(support::have("qemu-system-x86_64"), "qemu-system-x86_64 is missing: run tests/guest/deps.sh (or set TIDEMARK_SKIP_GUEST=1)");
    let dir = tempfile::tempdir().unwrap();
    let share = dir.path().join("share");
    std::fs::create_dir(&share).unwrap();
    for (name, path) in [("tidemarkd", support::TIDEMARKD), ("tidemark", support::TIDEMARK), ("bdevperf", bdevperf().to_str().expect("utf-8 path"))] {
        std::fs::copy(path, share.join(name)).unwrap();
    }
    let d0 = dir.path().join("d0.img");
    let d1 = dir.path().join("d1.img");
    std::fs::File::create(&d0).unwrap().set_len(512 << 20).unwrap();
    std::fs::File::create(&d1).unwrap().set_len(64 << 20).unwrap();
    let out = Command::new(&run)
        .arg(repo.join("tests/nvme_bdev/guest.sh"))
        .args(["-drive", &format!("file={},if=none,id=d0,format=raw", d0.display())])
        .args(["-device", "nvme,serial=tm0,id=nvme0"])
        .args(["-device", "nvme-ns,drive=d0,logical_block_size=4096,physical_block_size=4096"])
        .args(["-drive", &format!("file={},if=none,id=d1,format=raw", d1.display())])
        .args(["-device", "nvme-ns,drive=d1,ms=8"])
        .env("TIDEMARK_GUEST_SHARE", &share)
        .env("TIDEMARK_GUEST_APPEND", "nvme.poll_queues=1")
        .env("TIDEMARK_GUEST_TIMEOUT", "420")
        .output()
        .expect("run the guest");
    let console = String::from_utf8_lossy(&out.stdout);
    let results: Vec<&str> = console.lines().filter(|l| l.starts_with("RESULT ")).collect();
    for r in &results {
        println!("{r}");
    }
    assert!(out.status.success(), "guest script failed ({}):\n{console}\n{}", out.status, String::from_utf8_lossy(&out.stderr));
    for key in ["verify=ok", "verify_1m=ok", "identify=ok", "refuse_metadata=ok", "refuse_not_nvme=ok", "nvmf_fio_verify=ok", "daemon_exit=ok", "hot_remove=ok"]
    {
        assert!(results.iter().any(|r| r.contains(key)), "missing {key} in:\n{console}");
    }
}

/// The benchmark crate's bdevperf (bench/), built here into this test's target directory and
/// profile: it is a program of another package of the workspace, so cargo does not build it
/// for this test by itself.
fn bdevperf() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    // target/<profile>/deps/nvme_bdev-<hash> -> target/<profile>/
    let profile_dir = exe.parent().and_then(|d| d.parent()).expect("target/<profile>");
    let mut cargo = Command::new(env!("CARGO"));
    cargo.args(["build", "--quiet", "-p", "tidemark-bench", "--bin", "bdevperf"]);
    if profile_dir.file_name().is_some_and(|n| n == "release") {
        cargo.arg("--release");
    }
    let status = cargo
        .arg("--target-dir")
        .arg(profile_dir.parent().expect("target dir"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .expect("run cargo build -p tidemark-bench --bin bdevperf");
    assert!(status.success(), "cannot build bench/'s bdevperf");
    let program = profile_dir.join("bdevperf");
    assert!(program.exists(), "{} was not built", program.display());
    program
}
