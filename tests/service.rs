//! The Debian package installed and run as a service under a real systemd: a Debian 12 root
//! (tests/service/build-rootfs.sh, cached) booted with `systemd-nspawn -b` in its own network
//! namespace (loopback only) over a throw-away overlay, the .deb of this build installed with
//! dpkg as an operator would, then `systemctl start / reload / restart / stop` and the journal.
//!
//! Needs root, systemd-nspawn and debootstrap (tests/service/deps.sh); says SKIPPED when it
//! cannot run, and TIDEMARK_SKIP_SERVICE=1 skips it on purpose. Warm (root cached) it takes
//! about ten seconds.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use support::*;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// A booted container; powered off (then killed if it must be) when dropped.
struct Container {
    nspawn: Child,
    init: u32,
    log: PathBuf,
}

impl Container {
    fn boot(root: &Path, deb_dir: &Path, log: PathBuf) -> Container {
        let name = format!("tidemark-svc-{}", std::process::id());
        let logf = std::fs::File::create(&log).expect("console log");
        let nspawn = Command::new("systemd-nspawn")
            .arg("-D")
            .arg(root)
            // The cached root is never written: every change lives in a tmpfs over it.
            .arg("--volatile=overlay")
            // Loopback only: the service's ports cannot collide with anything on the host.
            .arg("--private-network")
            // No systemd on the host to register with (and none needed).
            .args(["--register=no", "--keep-unit", "--console=read-only", "-M", &name])
            .arg(format!("--bind-ro={}:/mnt/tidemark", deb_dir.display()))
            .arg("-b")
            .stdin(Stdio::null())
            .stdout(Stdio::from(logf.try_clone().expect("dup")))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn systemd-nspawn");
        let mut c = Container { nspawn, init: 0, log };
        // The container's init is nspawn's child named systemd.
        let deadline = Instant::now() + Duration::from_secs(20);
        while c.init == 0 {
            if let Ok(Some(status)) = c.nspawn.try_wait() {
                panic!("systemd-nspawn exited ({status}) before booting:\n{}", c.console());
            }
            assert!(Instant::now() < deadline, "no systemd in the container after 20 s:\n{}", c.console());
            let children = std::fs::read_dir(format!("/proc/{}/task", c.nspawn.id()))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| std::fs::read_to_string(t.path().join("children")).ok())
                .collect::<String>();
            c.init = children
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
                .find(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|comm| comm.trim() == "systemd"))
                .unwrap_or(0);
            std::thread::sleep(Duration::from_millis(50));
        }
        c
    }

    fn console(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs a command inside the container (all its namespaces), as root.
    fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter").args(["-t", &self.init.to_string(), "-a", "--"]).args(args).stdin(Stdio::null()).output().expect("nsenter")
    }

    /// Runs a command inside; it must succeed. Returns its output.
    fn ok(&self, args: &[&str]) -> String {
        let o = self.run(args);
        assert!(o.status.success(), "{args:?} failed ({}):\n{}\njournal:\n{}", o.status, text(&o), self.journal());
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn sh(&self, script: &str) -> Output {
        self.run(&["/bin/bash", "-c", script])
    }

    fn journal(&self) -> String {
        text(&self.run(&["journalctl", "-u", "tidemark", "--no-pager", "-o", "cat"]))
    }

    fn show(&self, prop: &str) -> String {
        self.ok(&["systemctl", "show", "-p", prop, "--value", "tidemark"]).trim().to_string()
    }

    /// Whether every listener of the packaged configuration answers right now.
    fn listeners_answer(&self) -> Result<(), String> {
        // bash's /dev/tcp: the minimal root has no other client.
        for port in [4420, 3260, 9464] {
            let o = self.sh(&format!("exec 3<>/dev/tcp/127.0.0.1/{port}"));
            if !o.status.success() {
                return Err(format!("port {port}: {}", text(&o)));
            }
        }
        let o = self.run(&["test", "-S", "/run/tidemark/tidemark.sock"]);
        if !o.status.success() {
            return Err("no RPC socket /run/tidemark/tidemark.sock".into());
        }
        Ok(())
    }

    fn wait_journal(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(15);
        while !self.journal().contains(needle) {
            assert!(Instant::now() < deadline, "{needle:?} not in the journal:\n{}", self.journal());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        // SIGTERM asks nspawn to power the container off cleanly.
        // SAFETY: a signal to the child we spawned and have not reaped.
        unsafe { libc::kill(self.nspawn.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.nspawn.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.nspawn.kill();
        let _ = self.nspawn.wait();
    }
}

/// Why the test cannot run here, if it cannot.
fn cannot_run() -> Option<String> {
    if std::env::var("TIDEMARK_SKIP_SERVICE").is_ok_and(|v| v == "1") {
        return Some("TIDEMARK_SKIP_SERVICE=1".into());
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (systemd-nspawn)".into());
    }
    for cmd in ["systemd-nspawn", "nsenter", "debootstrap", "dpkg-deb"] {
        if !have(cmd) {
            return Some(format!("{cmd} is not installed (tests/service/deps.sh installs it)"));
        }
    }
    None
}

#[test]
fn the_package_runs_as_a_systemd_service() {
    if let Some(why) = cannot_run() {
        eprintln!("SKIPPED: the service test: {why}");
        return;
    }
    let started = Instant::now();
    // The root: cached after the first build (tests/run builds it before cargo test, where its
    // progress shows).
    let o = Command::new(repo("tests/service/build-rootfs.sh")).output().expect("run build-rootfs.sh");
    if !o.status.success() {
        eprintln!("SKIPPED: the service test: no Debian 12 root (tests/service/build-rootfs.sh failed):\n{}", text(&o));
        return;
    }
    let root = PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().last().expect("the root's path").trim());
    let dir = tempfile::tempdir().expect("tempdir");
    let deb_dir = dir.path().join("deb");
    let bin_dir = Path::new(TIDEMARKD).parent().expect("bin dir");
    let o = Command::new(repo("packaging/build-deb.sh")).arg(&deb_dir).env("TIDEMARK_BIN_DIR", bin_dir).output().expect("run build-deb.sh");
    assert!(o.status.success(), "build-deb.sh:\n{}", text(&o));
    let deb = PathBuf::from(String::from_utf8_lossy(&o.stdout).lines().last().expect("the .deb path").trim());
    let deb_name = deb.file_name().expect("file name").to_string_lossy().into_owned();

    let c = Container::boot(&root, &deb_dir, dir.path().join("console.log"));
    // Until systemd has its control socket, systemctl answers nothing: ask again.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let booted = c.run(&["systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&booted.stdout).trim().to_string();
        if state == "running" || state == "degraded" {
            break;
        }
        assert!(Instant::now() < deadline, "the container did not boot: {state:?}\n{}", c.console());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Installed as an operator would; the postinst makes the system user.
    let installed = c.run(&["dpkg", "-i", &format!("/mnt/tidemark/{deb_name}")]);
    assert!(installed.status.success() && !text(&installed).contains("Warning"), "dpkg -i:\n{}", text(&installed));
    let passwd = c.ok(&["getent", "passwd", "tidemark"]);
    let uid: u32 = passwd.split(':').nth(2).and_then(|u| u.parse().ok()).expect("uid in getent output");
    assert!(uid < 1000, "tidemark is a system user: {passwd}");
    assert_eq!(c.show("UnitFileState"), "disabled", "installing does not enable the service");

    // Start: systemctl returns once the unit is active, which (Type=notify) is when the
    // daemon has sent READY=1: every listener must answer at that moment.
    c.ok(&["systemctl", "start", "tidemark"]);
    assert_eq!(c.show("ActiveState"), "active");
    assert_eq!(c.show("Type"), "notify");
    if let Err(e) = c.listeners_answer() {
        panic!("active but a listener does not answer: {e}\n{}", c.journal());
    }
    let pid = c.show("MainPID");
    assert_ne!(pid, "0");
    let owner = c.ok(&["stat", "-c", "%U", &format!("/proc/{pid}")]);
    assert_eq!(owner.trim(), "tidemark", "the daemon runs as the tidemark user");

    // The data directory and what the packaged configuration made in it.
    let data = c.ok(&["stat", "-c", "%U %a", "/var/lib/tidemark"]);
    assert_eq!(data.trim(), "tidemark 700");
    let vol = c.ok(&["stat", "-c", "%U %s", "/var/lib/tidemark/pool0.img"]);
    assert_eq!(vol.trim(), format!("tidemark {}", 4u64 << 30));

    // RPC over the socket, with the CLI as installed (it finds /run/tidemark/tidemark.sock).
    let bdevs = c.ok(&["tidemark", "bdev_get_bdevs"]);
    assert!(bdevs.contains("\"pool0/vol0\"") && bdevs.contains("\"pool0_base\""), "{bdevs}");
    c.ok(&["tidemark", "bdev_snapshot_create", "--bdev_name", "pool0/vol0", "--snapshot_name", "svc1"]);

    // Reload: the new log level applies in the same process.
    c.ok(&["sed", "-i", "s/^log_level = \"info\"/log_level = \"debug\"/", "/etc/tidemark/tidemark.toml"]);
    c.ok(&["systemctl", "reload", "tidemark"]);
    c.wait_journal("reload: log level DEBUG");
    assert_eq!(c.show("MainPID"), pid, "reload must not restart the daemon");
    assert_eq!(c.show("ActiveState"), "active");

    // Restart: a new process, active again only with its listeners up.
    c.ok(&["systemctl", "restart", "tidemark"]);
    let pid2 = c.show("MainPID");
    assert!(pid2 != pid && pid2 != "0", "restart: {pid} -> {pid2}");
    if let Err(e) = c.listeners_answer() {
        panic!("active after restart but a listener does not answer: {e}\n{}", c.journal());
    }
    // The packaged configuration is replayed on the pool the first start made.
    c.ok(&["tidemark", "bdev_get_bdevs", "--name", "pool0/svc1"]);

    // Stop: SIGTERM drains and exits 0; systemd records a clean stop.
    c.ok(&["systemctl", "stop", "tidemark"]);
    assert_eq!(c.show("ActiveState"), "inactive");
    assert_eq!(c.show("Result"), "success", "{}", c.journal());
    assert_eq!(c.show("ExecMainStatus"), "0", "{}", c.journal());
    // The journal holds the daemon's own log lines, two runs of them.
    let journal = c.journal();
    assert_eq!(journal.matches("tidemarkd ready: RPC on /run/tidemark/tidemark.sock").count(), 2, "{journal}");
    assert!(journal.contains("signal 15: shutting down") && journal.contains("tidemarkd stopped"), "{journal}");

    // Active only when the listeners are up: a portal that cannot bind (an address on no
    // interface of the container) keeps the unit from ever becoming active.
    c.ok(&["sed", "-i", "s/traddr = \"127.0.0.1\"/traddr = \"192.0.2.1\"/", "/etc/tidemark/tidemark.toml"]);
    let failed = c.run(&["systemctl", "start", "tidemark"]);
    assert!(!failed.status.success(), "a daemon whose listener cannot bind must not start:\n{}", c.journal());
    assert_ne!(c.show("ActiveState"), "active");
    c.wait_journal("192.0.2.1");
    c.ok(&["systemctl", "stop", "tidemark"]);

    eprintln!("service test: {:.1}s", started.elapsed().as_secs_f64());
}
