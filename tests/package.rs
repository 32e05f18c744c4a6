//! tidemark as a service: the systemd readiness protocol (READY=1 only once the listeners
//! answer, RELOADING=1/READY=1 around a SIGHUP reload, STOPPING=1 at SIGTERM), the unit file
//! as systemd itself reads it, and the Debian package's contents with its /etc configuration
//! accepted by the packaged daemon.

mod support;

use std::os::unix::net::{UnixDatagram, UnixStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn repo(path: &str) -> String {
    format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))
}

/// The next notification datagram, as its lines.
fn next_notice(sock: &UnixDatagram) -> Vec<String> {
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).expect("a notification from tidemarkd within the timeout");
    String::from_utf8_lossy(&buf[..n]).lines().map(str::to_string).collect()
}

#[test]
fn readiness_reload_and_stop_follow_the_systemd_notify_protocol() {
    let dir = tempfile::tempdir().expect("tempdir");
    let notify_path = dir.path().join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).expect("bind the notify socket");
    notify.set_read_timeout(Some(Duration::from_secs(30))).ok();
    let socket = dir.path().join("rpc.sock");
    let (nvmf_port, iscsi_port) = (free_port(), free_port());
    let config = |level: &str| {
        format!(
            r#"[daemon]
data_dir = "{data}"
buffer_pool_mb = 16
log_level = "{level}"
[reactor]
cores = [0]
[rpc]
socket = "{socket}"
[metrics]
listen = ""
[[bdev]]
method = "bdev_malloc_create"
params = {{ name = "m0", num_blocks = 2048, block_size = 512 }}
[[nvmf]]
method = "nvmf_create_transport"
params = {{ trtype = "TCP" }}
[[nvmf]]
method = "nvmf_create_subsystem"
params = {{ nqn = "nqn.2016-06.io.tidemark:svc", allow_any_host = true }}
[[nvmf]]
method = "nvmf_subsystem_add_listener"
params = {{ nqn = "nqn.2016-06.io.tidemark:svc", listen_address = {{ trtype = "TCP", adrfam = "IPv4", traddr = "127.0.0.1", trsvcid = "{nvmf_port}" }} }}
[[iscsi]]
method = "iscsi_create_portal_group"
params = {{ tag = 1, portals = [{{ host = "127.0.0.1", port = "{iscsi_port}" }}] }}
"#,
            data = dir.path().join("data").display(),
            socket = socket.display(),
        )
    };
    let cfg = dir.path().join("tidemark.toml");
    std::fs::write(&cfg, config("info")).expect("config");
    let log = dir.path().join("tidemarkd.log");
    let logf = std::fs::File::create(&log).expect("log");
    let mut child = Command::new(TIDEMARKD)
        .arg("--config")
        .arg(&cfg)
        .env("NOTIFY_SOCKET", &notify_path)
        .env_remove("RUST_LOG")
        .stdout(Stdio::from(logf.try_clone().expect("dup")))
        .stderr(Stdio::from(logf))
        .spawn()
        .expect("spawn tidemarkd");
    let pid = child.id() as i32;
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // READY=1 comes once, and when it does every listener already answers.
    let first = next_notice(&notify);
    assert!(first.iter().any(|l| l == "READY=1"), "{first:?}\n{}", log_text());
    assert!(UnixStream::connect(&socket).is_ok(), "RPC socket not answering at READY=1");
    for port in [nvmf_port, iscsi_port] {
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(), "port {port} not listening at READY=1");
    }

    // `systemctl reload`: the new log level applies without a restart.
    std::fs::write(&cfg, config("debug")).expect("config");
    // SAFETY: a signal to the child we spawned and have not reaped.
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let reloading = next_notice(&notify);
    assert!(reloading.iter().any(|l| l == "RELOADING=1"), "{reloading:?}");
    assert!(reloading.iter().any(|l| l.starts_with("MONOTONIC_USEC=")), "systemd 253+ needs MONOTONIC_USEC with RELOADING=1: {reloading:?}");
    let ready = next_notice(&notify);
    assert!(ready.iter().any(|l| l == "READY=1"), "{ready:?}");
    assert!(log_text().contains("reload: log level DEBUG"), "{}", log_text());
    // A broken file changes nothing and the daemon keeps serving.
    std::fs::write(&cfg, "[daemon]\nlog_level = \"loud\"\n").expect("config");
    unsafe { libc::kill(pid, libc::SIGHUP) };
    let _ = next_notice(&notify);
    let _ = next_notice(&notify);
    assert!(log_text().contains("reload: configuration not applied"), "{}", log_text());
    assert!(UnixStream::connect(&socket).is_ok());

    // `systemctl stop`: STOPPING=1, then a clean exit.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let stopping = next_notice(&notify);
    assert!(stopping.iter().any(|l| l == "STOPPING=1"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(Instant::now() < deadline, "tidemarkd did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}\n{}", log_text());
}

#[test]
fn the_unit_file_is_valid_for_systemd() {
    if !have("systemd-analyze") {
        eprintln!("SKIPPED: systemd-analyze is not installed (Debian package systemd)");
        return;
    }
    // systemd-analyze checks that ExecStart exists: point it at the binary just built.
    let dir = tempfile::tempdir().expect("tempdir");
    let unit = std::fs::read_to_string(repo("packaging/tidemark.service")).expect("unit");
    assert!(unit.contains("Type=notify") && unit.contains("Restart=on-failure") && unit.contains("ExecReload="));
    let path = dir.path().join("tidemark.service");
    std::fs::write(&path, unit.replace("/usr/bin/tidemarkd", TIDEMARKD)).expect("write unit");
    let out = Command::new("systemd-analyze").arg("verify").arg(&path).output().expect("systemd-analyze");
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && said.trim().is_empty(), "systemd-analyze verify:\n{said}");
}

#[test]
fn the_debian_package_holds_the_service_and_its_config_is_valid() {
    let out_dir = tempfile::tempdir().expect("tempdir");
    let bin_dir = std::path::Path::new(TIDEMARKD).parent().expect("bin dir").to_path_buf();
    let out = Command::new(repo("packaging/build-deb.sh")).arg(out_dir.path()).env("TIDEMARK_BIN_DIR", &bin_dir).output().expect("run build-deb.sh");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let deb = String::from_utf8_lossy(&out.stdout).lines().last().expect("the .deb path").to_string();

    let fields = Command::new("dpkg-deb").args(["-f", &deb, "Package", "Version", "Architecture"]).output().expect("dpkg-deb -f");
    let fields = String::from_utf8_lossy(&fields.stdout);
    assert!(fields.contains("Package: tidemark") && fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))), "{fields}");

    let root = tempfile::tempdir().expect("tempdir");
    let x = Command::new("dpkg-deb").arg("-x").arg(&deb).arg(root.path()).status().expect("dpkg-deb -x");
    assert!(x.success());
    for f in [
        "usr/bin/tidemarkd",
        "usr/bin/tidemark",
        "lib/systemd/system/tidemark.service",
        "etc/tidemark/tidemark.toml",
        "usr/share/doc/tidemark/docs/design.md",
        "usr/share/doc/tidemark/docs/rpc.md",
        "usr/share/zsh/vendor-completions/_tidemark",
        "usr/share/fish/vendor_completions.d/tidemark.fish",
    ] {
        assert!(root.path().join(f).exists(), "{f} missing from the package");
    }
    // The bash completion is the CLI's own and completes a method of this build.
    let bash = std::fs::read_to_string(root.path().join("usr/share/bash-completion/completions/tidemark")).expect("bash completion in the package");
    assert!(bash.contains("_tidemark") && bash.contains("bdev_lvol_snapshot"), "bash completion without the methods");
    let control = Command::new("dpkg-deb").args(["-I", &deb, "conffiles"]).output().expect("dpkg-deb -I");
    assert!(String::from_utf8_lossy(&control.stdout).contains("/etc/tidemark/tidemark.toml"), "the /etc config is not a conffile");

    // The packaged daemon accepts the packaged configuration.
    let check = Command::new(root.path().join("usr/bin/tidemarkd"))
        .arg("--check-config")
        .arg("--config")
        .arg(root.path().join("etc/tidemark/tidemark.toml"))
        .output()
        .expect("tidemarkd --check-config");
    assert!(check.status.success(), "{}{}", String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
}
