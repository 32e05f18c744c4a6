//! The JSON-RPC server against hostile and unlucky clients, on the real daemon: oversized
//! requests are refused without being buffered, unbounded input is never echoed, idle and slow
//! clients are shed, and a local administrator always gets a slot.

mod support;

use serde_json::{json, Value};
use std::io::{BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::*;

/// `key` of /proc/PID/status in KiB (VmRSS, VmHWM).
fn status_kib(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_start_matches(':').trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(0)
}

/// Reads one JSON value from `s` (None: closed or timed out first).
fn read_reply(s: &UnixStream, timeout: Duration) -> Option<Value> {
    s.set_read_timeout(Some(timeout)).ok();
    serde_json::Deserializer::from_reader(BufReader::new(s)).into_iter::<Value>().next().and_then(Result::ok)
}

/// MINIMAL_CONFIG with `extra` keys added to its `[rpc]` section.
fn config_with_rpc(extra: &str) -> String {
    MINIMAL_CONFIG.replace("socket = \"{socket}\"", &format!("socket = \"{{socket}}\"\n{extra}"))
}

#[test]
fn four_concurrent_50_mb_requests_are_refused_without_growing_the_daemon() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let pid = d.pid();
    let before = status_kib(pid, "VmRSS");
    const LIMIT_KIB: u64 = 200 * 1024;
    // Stops the senders early if the daemon grows past the limit (the test then fails), so a
    // regression does not take gigabytes of a shared machine.
    let over = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicBool::new(false));
    let watch = {
        let (over, done) = (over.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                if status_kib(pid, "VmRSS") > LIMIT_KIB {
                    over.store(true, Ordering::SeqCst);
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let socket = d.socket.clone();
            let over = over.clone();
            std::thread::spawn(move || {
                let s = UnixStream::connect(&socket).expect("connect");
                let writer = s.try_clone().expect("clone");
                let over2 = over.clone();
                // 50 MB: a bdev name of 50 MB in a well-formed request, sent in 1 MiB pieces.
                let sender = std::thread::spawn(move || {
                    let mut w = writer;
                    if w.write_all(br#"{"jsonrpc":"2.0","id":1,"method":"bdev_malloc_delete","params":{"name":""#).is_err() {
                        return;
                    }
                    let piece = vec![b'A'; 1 << 20];
                    for _ in 0..50 {
                        if over2.load(Ordering::SeqCst) || w.write_all(&piece).is_err() {
                            return;
                        }
                    }
                    let _ = w.write_all(br#""}}"#);
                });
                let reply = read_reply(&s, Duration::from_secs(120));
                let _ = s.shutdown(std::net::Shutdown::Both);
                let _ = sender.join();
                reply
            })
        })
        .collect();
    let replies: Vec<Option<Value>> = clients.into_iter().map(|c| c.join().expect("client thread")).collect();
    done.store(true, Ordering::SeqCst);
    let _ = watch.join();
    let peak = status_kib(pid, "VmHWM");
    println!("daemon RSS before {before} KiB, peak {peak} KiB");
    assert!(!over.load(Ordering::SeqCst) && peak < LIMIT_KIB, "the daemon grew to {peak} KiB (before: {before} KiB)");
    for r in &replies {
        let r = r.as_ref().expect("every client gets an answer before the connection closes");
        assert_eq!(r["error"]["code"], -32600, "{r}");
        let m = r["error"]["message"].as_str().unwrap_or("");
        assert!(m.contains("4194304") && m.len() < 1024, "{m}");
    }
    // The daemon still serves.
    assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok());
}

#[test]
fn a_huge_name_is_not_echoed_in_the_error() {
    let d = Daemon::start(MINIMAL_CONFIG);
    let name = "N".repeat(3 << 20);
    let t0 = Instant::now();
    let e = d.try_rpc("bdev_malloc_delete", json!({ "name": name })).unwrap_err();
    assert_eq!(e.code, -19, "{}", &e.message[..e.message.len().min(200)]);
    assert!(e.message.len() <= 1024, "the error quotes {} bytes", e.message.len());
    assert!(e.message.contains("does not exist") && e.message.starts_with("bdev NNN"), "{}", &e.message[..e.message.len().min(200)]);
    assert!(t0.elapsed() < Duration::from_secs(10), "took {:?}", t0.elapsed());
    // A huge method name, and a wrong type for a field (serde quotes the value), alike.
    let e = d.try_rpc(&"m".repeat(1 << 20), json!(null)).unwrap_err();
    assert!(e.code == -32601 && e.message.len() <= 1024, "{} bytes", e.message.len());
    let e = d.try_rpc("bdev_malloc_create", json!({"name": "x", "num_blocks": name, "block_size": 512})).unwrap_err();
    assert!(e.code == -32602 && e.message.len() <= 1024, "{} bytes", e.message.len());
}

#[test]
fn two_hundred_idle_clients_do_not_lock_out_a_normal_call() {
    // The default limits: 64 clients, a 30 s idle timeout. The test runs as the daemon's user,
    // so its call is an administrator's.
    let d = Daemon::start(MINIMAL_CONFIG);
    let idle: Vec<UnixStream> = (0..200).filter_map(|_| UnixStream::connect(&d.socket).ok()).collect();
    assert!(idle.len() >= 64, "only {} connections were accepted", idle.len());
    std::thread::sleep(Duration::from_millis(300));
    let t0 = Instant::now();
    let r = d.try_rpc("bdev_get_bdevs", json!(null));
    assert!(r.is_ok(), "{r:?}");
    assert!(t0.elapsed() < Duration::from_secs(5), "took {:?}", t0.elapsed());
    // And again, the idle ones still connected.
    assert!(d.try_rpc("rpc_get_methods", json!(null)).is_ok());
    drop(idle);
}

#[test]
fn idle_and_slow_clients_are_disconnected() {
    let d = Daemon::start(&config_with_rpc("idle_timeout_ms = 1000\nrequest_timeout_ms = 1500"));
    // Idle: nothing sent (or whitespace only, which begins no request).
    let quiet = UnixStream::connect(&d.socket).unwrap();
    let spaces = UnixStream::connect(&d.socket).unwrap();
    let t0 = Instant::now();
    let sp = spaces.try_clone().unwrap();
    let spacer = std::thread::spawn(move || {
        let mut w = sp;
        while t0.elapsed() < Duration::from_secs(6) && w.write_all(b" ").is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    for s in [&quiet, &spaces] {
        let mut b = [0u8; 64];
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let n = (&*s).read(&mut b);
        assert!(matches!(n, Ok(0)), "an idle client is disconnected: {n:?}");
    }
    let shed = t0.elapsed();
    assert!(shed >= Duration::from_millis(900) && shed < Duration::from_secs(4), "idle clients shed after {shed:?}");
    let _ = spacer.join();

    // Slow: a request trickling in a byte every 100 ms gets an error when its time is up.
    let slow = UnixStream::connect(&d.socket).unwrap();
    let w = slow.try_clone().unwrap();
    let t0 = Instant::now();
    let trickler = std::thread::spawn(move || {
        let mut w = w;
        for b in br#"{"jsonrpc":"2.0","id":1,"method":"bdev_get_bdevs","params":{"name":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}}"# {
            if w.write_all(&[*b]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let r = read_reply(&slow, Duration::from_secs(10)).expect("an error before the connection closes");
    assert_eq!(r["error"]["code"], -32600, "{r}");
    assert!(r["error"]["message"].as_str().unwrap_or("").contains("request_timeout_ms"), "{r}");
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(1400) && took < Duration::from_secs(5), "slow request cut after {took:?}");
    let _ = trickler.join();
    assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok());
}

/// A client process of uid `nobody` that connects to `socket`, then prints what it reads
/// within `secs` seconds ("timeout" if nothing, "closed" on EOF).
fn nobody_client(socket: &std::path::Path, secs: u32) -> std::process::Child {
    use std::os::unix::process::CommandExt;
    let script = r#"use IO::Socket::UNIX; $| = 1;
        my $s = IO::Socket::UNIX->new(Type => SOCK_STREAM(), Peer => $ARGV[0]) or die "connect: $!";
        print "connected\n";
        $SIG{ALRM} = sub { print "timeout\n"; exit 0 }; alarm($ARGV[1]);
        my $n = sysread($s, my $buf, 4096); print((defined $n && $n > 0) ? $buf : "closed\n");"#;
    std::process::Command::new("perl")
        .args(["-e", script, &socket.display().to_string(), &secs.to_string()])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn perl")
}

#[test]
fn other_users_cannot_take_the_administrators_slots() {
    // SO_PEERCRED tells the daemon who connects; this needs clients of another uid, so root.
    if !nix::unistd::geteuid().is_root() || !have("perl") {
        eprintln!("skipping: needs root (to run clients as nobody) and perl");
        return;
    }
    let d = Daemon::start(&config_with_rpc("max_clients = 2\nadmin_clients = 1"));
    // The operator opened the socket to others (the daemon makes it 0600).
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(d.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let mut holders: Vec<std::process::Child> = Vec::new();
    for _ in 0..2 {
        let mut c = nobody_client(&d.socket, 20);
        let mut line = [0u8; 10];
        c.stdout.as_mut().unwrap().read_exact(&mut line).expect("the client connected");
        holders.push(c);
    }
    std::thread::sleep(Duration::from_millis(300));
    // A third user client finds the user slots taken, and cannot have the administrator's.
    let third = nobody_client(&d.socket, 5).wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&third.stdout);
    assert!(out.contains("too many RPC clients") && out.contains("-16"), "{out} {}", String::from_utf8_lossy(&third.stderr));
    // The administrator gets in, several times over.
    for _ in 0..3 {
        assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok());
    }
    let admin_idle: Vec<UnixStream> = (0..3).map(|_| UnixStream::connect(&d.socket).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(300));
    assert!(d.try_rpc("bdev_get_bdevs", json!(null)).is_ok(), "an administrator displaces an idle client");
    drop(admin_idle);
    for mut c in holders {
        let _ = c.kill();
        let _ = c.wait();
    }
}
