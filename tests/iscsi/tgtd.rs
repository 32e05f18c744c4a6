//! tgtd (Linux SCSI target framework, Debian `tgt`) as a peer: started by the test on a free
//! port with its own control socket and a RAM-backed LUN, stopped by PID when dropped.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TGT_IQN: &str = "iqn.2001-04.com.example:tidemark-peer";

pub struct Tgtd {
    child: Option<Child>,
    pub control_port: u16,
    pub addr: SocketAddr,
    backing: PathBuf,
    /// Backing files of LUNs added after the start.
    more_backing: Vec<PathBuf>,
    pub log: PathBuf,
}

fn tgtadm(control: u16, args: &[&str]) -> Result<(), String> {
    let out = Command::new("tgtadm").arg("-C").arg(control.to_string()).args(["--lld", "iscsi"]).args(args).output().map_err(|e| e.to_string())?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("tgtadm {args:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// A control port no other tgtd uses (tgtd takes at most 32767; the port only names its
/// control socket /var/run/tgtd/socket.N).
pub fn free_control_port() -> u16 {
    let mut p = 1000 + (std::process::id() % 30000) as u16;
    while Path::new(&format!("/var/run/tgtd/socket.{p}")).exists() {
        p = if p >= 31999 { 1000 } else { p + 1 };
    }
    p
}

impl Tgtd {
    /// Starts tgtd on `port` (control socket `control_port`) with a `size_mb` RAM-backed LUN 1
    /// (a file on /dev/shm, or in `dir` when there is no /dev/shm).
    pub fn start(port: u16, control_port: u16, size_mb: u64, dir: &std::path::Path) -> Tgtd {
        let shm = std::path::Path::new("/dev/shm");
        let backing = if shm.is_dir() { shm.join(format!("tidemark-tgtd-{}-{port}.img", std::process::id())) } else { dir.join("tgtd.img") };
        let f = std::fs::File::create(&backing).expect("create the tgtd backing file");
        f.set_len(size_mb << 20).expect("size the backing file");
        let log = dir.join("tgtd.log");
        let logf = std::fs::File::create(&log).expect("tgtd log");
        let child = Command::new("tgtd")
            .args(["-f", "-C", &control_port.to_string(), "--iscsi", &format!("portal=127.0.0.1:{port}")])
            .stdout(Stdio::from(logf.try_clone().expect("dup")))
            .stderr(Stdio::from(logf))
            .spawn()
            .expect("spawn tgtd");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut t = Tgtd { child: Some(child), control_port, addr, backing, more_backing: Vec::new(), log };
        let deadline = Instant::now() + Duration::from_secs(20);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            if let Some(Ok(Some(st))) = t.child.as_mut().map(|c| c.try_wait()) {
                panic!("tgtd exited ({st}): {}", std::fs::read_to_string(&t.log).unwrap_or_default());
            }
            assert!(Instant::now() < deadline, "tgtd did not listen on {addr}");
            std::thread::sleep(Duration::from_millis(50));
        }
        let b = t.backing.display().to_string();
        let setup = tgtadm(control_port, &["--op", "new", "--mode", "target", "--tid", "1", "-T", TGT_IQN])
            .and_then(|_| tgtadm(control_port, &["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", "1", "-b", &b]))
            .and_then(|_| tgtadm(control_port, &["--op", "bind", "--mode", "target", "--tid", "1", "-I", "ALL"]));
        if let Err(e) = setup {
            t.stop();
            panic!("configuring tgtd: {e}");
        }
        t
    }

    /// The URL of the RAM-backed LUN (tgtd's LUN 0 is its controller).
    pub fn url(&self) -> String {
        format!("iscsi://{}/{TGT_IQN}/1", self.addr)
    }

    /// Adds LUN `lun`, read-only (tgtadm's `readonly=1`), over a new `size_mb` backing file
    /// beside the first; returns its URL.
    pub fn add_readonly_lun(&mut self, lun: u32, size_mb: u64) -> String {
        let path = self.backing.with_extension(format!("ro{lun}.img"));
        let f = std::fs::File::create(&path).expect("create a tgtd backing file");
        f.set_len(size_mb << 20).expect("size the backing file");
        self.more_backing.push(path.clone());
        let (l, b) = (lun.to_string(), path.display().to_string());
        tgtadm(self.control_port, &["--op", "new", "--mode", "logicalunit", "--tid", "1", "--lun", &l, "-b", &b])
            .and_then(|_| tgtadm(self.control_port, &["--op", "update", "--mode", "logicalunit", "--tid", "1", "--lun", &l, "--params", "readonly=1"]))
            .unwrap_or_else(|e| panic!("configuring tgtd: {e}"));
        format!("iscsi://{}/{TGT_IQN}/{lun}", self.addr)
    }

    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        // tgtd ignores SIGTERM while it has targets: remove them, then the system.
        let _ = tgtadm(self.control_port, &["--op", "delete", "--force", "--mode", "target", "--tid", "1"]);
        let _ = Command::new("tgtadm").args(["-C", &self.control_port.to_string(), "--op", "delete", "--mode", "system"]).output();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = std::fs::remove_file(&self.backing);
        for b in self.more_backing.drain(..) {
            let _ = std::fs::remove_file(b);
        }
        for suffix in ["", ".lock"] {
            let _ = std::fs::remove_file(format!("/var/run/tgtd/socket.{}{suffix}", self.control_port));
        }
    }
}

impl Drop for Tgtd {
    fn drop(&mut self) {
        self.stop();
    }
}
