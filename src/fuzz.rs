//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*`), here so that the corpus regression
//! test (`tests/fuzz_corpus.rs`, stable Rust) feeds every corpus file to exactly the function
//! the fuzzer runs.
//!
//! The connection targets drive the real front ends: a target started in this process (one
//! reactor, a RAM namespace and LUN) and a loopback TCP connection to its real listener, so the
//! bytes go through `nvmf::connection`'s read loop and `iscsi::conn`'s, not a copy of them.
//! Each input is one connection: the bytes are sent, the sending side is shut, and the target
//! must answer and close it (never hang), then tear it down completely.

use crate::config::Config;
use crate::iscsi::config::{AuthGroup, ChapSecret, InitiatorGroup, Netmask, Registry, TargetNode};
use crate::iscsi::login::{Login, LoginContext, Step};
use crate::iscsi::pdu::{Bhs, BHS_LEN};
use crate::reactor::{PollMode, ReactorOptions, Reactors};
use crate::target::Target;
use serde_json::json;
use std::io::Read;
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// The NQN of the fuzz target's subsystem (namespace 1: a 128 KiB RAM bdev).
pub const NVMF_NQN: &str = "nqn.2016-06.io.tidemark:fuzz";
/// The iSCSI target name of the fuzz target (LUN 0: the same RAM bdev).
pub const ISCSI_TARGET: &str = "iqn.2016-06.io.tidemark:fuzz";
/// How long a connection may take to answer and close once its input is sent.
const CLOSE_LIMIT: Duration = Duration::from_secs(20);

/// The in-process target the connection targets talk to.
pub struct Harness {
    pub target: Arc<Target>,
    pub nvmf_addr: SocketAddr,
    pub iscsi_addr: SocketAddr,
    /// A controller kept connected for the whole process (keep-alive off), so an input can
    /// connect an I/O queue to it (its `cntlid` is in the seeds) and reach the I/O path.
    pub admin: std::sync::Mutex<crate::nvmf::initiator::Controller>,
    /// The same subsystem's secure (TLS) listener, where [`TLS_HOST`] has [`tls_key`].
    pub nvmf_tls_addr: SocketAddr,
}

/// The host with a TLS PSK on the fuzz target's subsystem.
pub const TLS_HOST: &str = "nqn.2014-08.org.nvmexpress:uuid:f0220000-0000-4000-8000-000000000001";

/// [`TLS_HOST`]'s PSK, interchange form with the configured key used as is (hash field 00).
pub fn tls_key() -> String {
    use base64::Engine as _;
    let key = [0x7eu8; 32];
    let mut raw = key.to_vec();
    raw.extend_from_slice(&crc32fast::hash(&key).to_le_bytes());
    format!("NVMeTLSkey-1:00:{}:", base64::engine::general_purpose::STANDARD.encode(raw))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

/// The process's fuzz target, started on first use (its reactor thread lives as long as the
/// process).
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("tidemark-fuzz-{}", std::process::id()));
        let config = Config::parse(&format!("[daemon]\ndata_dir = {:?}\nbuffer_pool_mb = 8\n", dir.display().to_string())).expect("fuzz config");
        let reactors = Reactors::start(&ReactorOptions { cpus: vec![0], poll_mode: PollMode::Adaptive, idle_us: 200, pin: false }).expect("reactors");
        let target = Arc::new(Target::new(reactors.handle(), config));
        // Never stopped: the harness serves every input of the process.
        std::mem::forget(reactors);
        let (nport, iport, tport) = (free_port(), free_port(), free_port());
        std::fs::create_dir_all(&dir).expect("fuzz data dir");
        let key_path = dir.join("tls.key");
        std::fs::write(&key_path, tls_key()).expect("the fuzz TLS key");
        std::fs::set_permissions(&key_path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("key file mode");
        let calls = [
            ("bdev_malloc_create", json!({"name": "fz0", "num_blocks": 256, "block_size": 512})),
            ("nvmf_create_transport", json!({"trtype": "TCP"})),
            ("nvmf_create_subsystem", json!({"nqn": NVMF_NQN, "allow_any_host": true})),
            ("nvmf_subsystem_add_ns", json!({"nqn": NVMF_NQN, "namespace": {"bdev_name": "fz0", "nsid": 1}})),
            (
                "nvmf_subsystem_add_listener",
                json!({"nqn": NVMF_NQN, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": nport.to_string()}}),
            ),
            (
                "nvmf_subsystem_add_listener",
                json!({"nqn": NVMF_NQN, "secure_channel": true, "listen_address": {"trtype": "TCP", "adrfam": "IPv4", "traddr": "127.0.0.1", "trsvcid": tport.to_string()}}),
            ),
            ("keyring_file_add_key", json!({"name": "fuzz-psk", "path": key_path})),
            ("nvmf_subsystem_add_host", json!({"nqn": NVMF_NQN, "host": TLS_HOST, "psk": "fuzz-psk"})),
            ("iscsi_create_portal_group", json!({"tag": 1, "portals": [{"host": "127.0.0.1", "port": iport.to_string()}]})),
            ("iscsi_create_initiator_group", json!({"tag": 1, "initiators": ["ANY"], "netmasks": ["127.0.0.1/32"]})),
            (
                "iscsi_create_target_node",
                json!({"name": ISCSI_TARGET, "luns": [{"bdev_name": "fz0", "lun_id": 0}], "pg_ig_maps": [{"pg_tag": 1, "ig_tag": 1}], "queue_depth": 32}),
            ),
        ];
        for (m, p) in calls {
            if let Err(e) = target.call(m, Some(p)) {
                panic!("fuzz harness: {m}: {}", e.message);
            }
        }
        let nvmf_addr = SocketAddr::from(([127, 0, 0, 1], nport));
        let iscsi_addr = SocketAddr::from(([127, 0, 0, 1], iport));
        let opts = crate::nvmf::initiator::QpairOptions { kato_ms: 0, ..Default::default() };
        let admin = crate::nvmf::initiator::Controller::connect(nvmf_addr, NVMF_NQN, &opts).expect("the harness's admin controller");
        let nvmf_tls_addr = SocketAddr::from(([127, 0, 0, 1], tport));
        Harness { target, nvmf_addr, iscsi_addr, admin: std::sync::Mutex::new(admin), nvmf_tls_addr }
    })
}

/// One input at a time (tests share the harness): the teardown checks count connections.
static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Waits until the target has torn its side down (`open` back to `base`); panics after
/// [`CLOSE_LIMIT`].
fn torn_down(open: impl Fn() -> usize, base: usize) {
    let deadline = Instant::now() + CLOSE_LIMIT;
    while open() > base {
        assert!(Instant::now() < deadline, "the target closed the socket but did not tear the connection down");
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// Sends `data` on a fresh connection to `addr`, shuts the sending side and returns what the
/// target answered (at most 1 MiB kept) once it closed. Panics if it neither closes within
/// [`CLOSE_LIMIT`] nor tears the connection down (`open` back to `base`) afterwards.
fn one_connection(addr: SocketAddr, data: &[u8], open: impl Fn() -> usize, base: usize) -> Vec<u8> {
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let s = TcpStream::connect(addr).expect("connect to the fuzz target");
    s.set_read_timeout(Some(CLOSE_LIMIT)).ok();
    let answer = std::thread::scope(|sc| {
        sc.spawn(|| {
            let mut rest = data;
            while !rest.is_empty() {
                // MSG_NOSIGNAL: the target may close first; libFuzzer's main does not ignore
                // SIGPIPE as a Rust main does.
                // SAFETY: sends from a live slice on a socket we own.
                let n = unsafe { libc::send(s.as_raw_fd(), rest.as_ptr().cast(), rest.len(), libc::MSG_NOSIGNAL) };
                if n <= 0 {
                    break;
                }
                rest = &rest[n as usize..];
            }
            let _ = s.shutdown(Shutdown::Write);
        });
        let mut answer = Vec::new();
        let mut chunk = [0u8; 64 * 1024];
        loop {
            match (&s).read(&mut chunk) {
                Ok(0) => return answer,
                Ok(n) => {
                    if answer.len() < 1 << 20 {
                        answer.extend_from_slice(&chunk[..n]);
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    panic!(
                        "the target neither answered nor closed the connection within {CLOSE_LIMIT:?} ({} bytes of answer so far: {:02x?})",
                        answer.len(),
                        &answer[..answer.len().min(400)]
                    )
                }
                // A reset is a close too (the target may close with unread input).
                Err(_) => return answer,
            }
        }
    });
    torn_down(open, base);
    answer
}

/// `nvmf_pdu`: a host's byte stream on one NVMe/TCP connection, through the real connection
/// (`nvmf::connection::serve` and its read loop). Returns the target's answer.
pub fn nvmf_pdu(data: &[u8]) -> Vec<u8> {
    let h = harness();
    let nvmf = h.target.module::<crate::nvmf::NvmfTarget>().expect("the NVMe-oF subsystem").nvmf.clone();
    // The harness's own admin queue stays open.
    one_connection(h.nvmf_addr, data, || nvmf.open_connections.load(Ordering::SeqCst), 1)
}

/// `nvmf_tls`: a connection to the secure (TLS) listener. The first byte picks the form: odd,
/// the rest is sent raw (what a host that is not TLS, or a broken handshake, sends); even, a
/// TLS client holding [`TLS_HOST`]'s key completes the handshake and sends the rest as an
/// NVMe/TCP stream, in TLS records whose sizes cycle through a list read from the input
/// (byte 1: how many, up to 8; then each a little-endian u16, at least 1), so records end
/// anywhere in PDUs and PDUs anywhere in records. Returns the decrypted answer (raw: the bytes
/// answered, which must be none: a secure listener says nothing in the clear).
pub fn nvmf_tls(data: &[u8]) -> Vec<u8> {
    let h = harness();
    let nvmf = h.target.module::<crate::nvmf::NvmfTarget>().expect("the NVMe-oF subsystem").nvmf.clone();
    let open = || nvmf.open_connections.load(Ordering::SeqCst);
    let Some((&mode, rest)) = data.split_first() else { return Vec::new() };
    if mode % 2 == 1 {
        let answer = one_connection(h.nvmf_tls_addr, rest, open, 1);
        // A TLS alert at most (a refusal in TLS's own words), never an NVMe/TCP PDU.
        assert!(answer.is_empty() || answer[0] == 0x15, "the secure listener answered in the clear: {:02x?}", &answer[..answer.len().min(16)]);
        return answer;
    }
    let (n, mut rest) = rest.split_first().map(|(n, r)| ((*n as usize % 8) + 1, r)).unwrap_or((1, &[]));
    let mut sizes = Vec::with_capacity(n);
    for _ in 0..n {
        if rest.len() < 2 {
            break;
        }
        sizes.push((u16::from_le_bytes([rest[0], rest[1]]) as usize).clamp(1, 16384));
        rest = &rest[2..];
    }
    if sizes.is_empty() {
        sizes.push(16384);
    }
    let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
    let answer = tls_session(h.nvmf_tls_addr, rest, &sizes);
    torn_down(open, 1);
    answer
}

/// A TLS client session with [`TLS_HOST`]'s key: sends `stream` in records of `sizes`
/// (cycling), closes its sending side (close_notify, FIN) and returns the decrypted answer.
fn tls_session(addr: SocketAddr, stream: &[u8], sizes: &[usize]) -> Vec<u8> {
    use crate::nvmf::tls::{ConfiguredPsk, PskIdentity, Suite};
    use openssl::ssl::{SslConnector, SslMethod, SslVerifyMode, SslVersion};
    use std::io::Write;
    let identity = PskIdentity { suite: Suite::Aes128GcmSha256, hostnqn: TLS_HOST.into(), subnqn: NVMF_NQN.into() }.text();
    let key = ConfiguredPsk::parse(tls_key().as_bytes()).expect("the fuzz key").tls_psk(TLS_HOST, &identity).expect("a short identity");
    let mut b = SslConnector::builder(SslMethod::tls_client()).expect("TLS client");
    b.set_min_proto_version(Some(SslVersion::TLS1_3)).expect("TLS 1.3");
    b.set_ciphersuites(Suite::Aes128GcmSha256.name()).expect("suite");
    b.set_psk_client_callback(move |_, _, id, k| {
        id[..identity.len()].copy_from_slice(identity.as_bytes());
        id[identity.len()] = 0;
        k[..key.len()].copy_from_slice(&key);
        Ok(key.len())
    });
    let c = b.build();
    let s = TcpStream::connect(addr).expect("connect to the fuzz target's secure listener");
    s.set_read_timeout(Some(CLOSE_LIMIT)).ok();
    let mut conf = c.configure().expect("TLS client session");
    conf.set_verify_hostname(false);
    conf.set_verify(SslVerifyMode::NONE);
    let mut t = conf.connect("tidemark", s).expect("the handshake with the fuzz key");
    // One writer and one reader on one session: the answer is read after everything is sent
    // (the target's answers wait in the socket; a stream larger than the socket buffers with
    // unread answers could stall both sides, so inputs are capped).
    let mut rest = &stream[..stream.len().min(256 * 1024)];
    let mut i = 0;
    while !rest.is_empty() {
        let n = sizes[i % sizes.len()].min(rest.len());
        if t.write_all(&rest[..n]).is_err() {
            break;
        }
        rest = &rest[n..];
        i += 1;
    }
    let _ = t.shutdown();
    let _ = t.get_ref().shutdown(Shutdown::Write);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    loop {
        match t.read(&mut chunk) {
            Ok(0) => return answer,
            Ok(n) => {
                if answer.len() < 1 << 20 {
                    answer.extend_from_slice(&chunk[..n]);
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the secure listener neither answered nor closed within {CLOSE_LIMIT:?} ({} bytes of answer so far)", answer.len())
            }
            Err(_) => return answer,
        }
    }
}

/// `iscsi_conn`: an initiator's byte stream on one iSCSI connection, through the real
/// connection (`iscsi::conn`: login, full feature phase, SCSI on the RAM LUN).
pub fn iscsi_conn(data: &[u8]) -> Vec<u8> {
    let h = harness();
    // Connections past login, as `iscsi_get_connections` lists them.
    let open = || h.target.call("iscsi_get_connections", None).ok().and_then(|v| v.as_array().map(Vec::len)).unwrap_or(0);
    one_connection(h.iscsi_addr, data, open, 0)
}

/// `nvmf_capsule`: one command capsule's SQE and in-capsule data through the checks a command
/// meets before it runs.
pub fn nvmf_capsule(data: &[u8]) {
    crate::nvmf::pdu::fuzz_capsule(data);
}

fn login_registry() -> Registry {
    let mut r = Registry::default();
    r.initiator_groups.insert(
        1,
        InitiatorGroup { tag: 1, initiators: vec!["ANY".into(), "!iqn.deny".into()], netmasks: vec!["ANY".into()], parsed_netmasks: vec![Netmask::Any] },
    );
    r.auth_groups.insert(
        1,
        AuthGroup { tag: 1, secrets: vec![ChapSecret { user: "u".into(), secret: "secret".into(), muser: Some("m".into()), msecret: Some("msecret".into()) }] },
    );
    r.nodes
        .insert("iqn.t:open".into(), Arc::new(TargetNode::new("iqn.t:open".into(), None, 32, (false, false, false, 0), (false, false), vec![(1, 1)], vec![])));
    r.nodes.insert(
        "iqn.t:chap".into(),
        Arc::new(TargetNode::new("iqn.t:chap".into(), Some("a".into()), 8, (false, true, true, 1), (true, true), vec![(1, 1)], vec![])),
    );
    r
}

/// `iscsi_login`: the login state machine over a sequence of PDUs (48-byte headers, each
/// followed by the data segment its length announces, cut short at the end of the input);
/// every step must answer without panicking.
pub fn iscsi_login(data: &[u8]) {
    let reg = login_registry();
    let ctx = LoginContext { pg_tag: 1, peer: SocketAddr::from(([127, 0, 0, 1], 1)), local: SocketAddr::from(([127, 0, 0, 1], 3260)) };
    let mut login = Login::new(ctx, 7);
    let mut rest = data;
    while rest.len() >= BHS_LEN {
        let Some(bhs) = Bhs::from_slice(rest) else { return };
        rest = &rest[BHS_LEN..];
        let n = (bhs.data_len() as usize).min(rest.len()).min(64 * 1024);
        let seg = &rest[..n];
        rest = &rest[n..];
        match login.step(&reg, &bhs, seg) {
            Step::Continue(r) => assert!(r.len() >= BHS_LEN),
            Step::Complete(r, _) | Step::Fail(r) => {
                assert!(r.len() >= BHS_LEN);
                return;
            }
        }
    }
}

/// `iscsi_text`: text keys and operational negotiation over arbitrary key=value data, plus
/// CHAP binary decoding of every value.
pub fn iscsi_text(data: &[u8]) {
    use crate::iscsi::params::Negotiation;
    let Ok(keys) = crate::iscsi::text::parse(data) else { return };
    let limits = crate::iscsi::config::Options::default().limits(None);
    let mut n = Negotiation::new(data.first().is_some_and(|b| b & 1 == 1));
    let mut out = Vec::new();
    for (k, v) in &keys {
        let _ = crate::iscsi::chap::decode_binary(v);
        if Negotiation::handles(k) {
            let _ = n.offer(k, v, &limits, &mut out);
        }
    }
    n.declarations(&limits, &mut out);
    n.finish();
    let p = &n.params;
    assert!(p.first_burst <= p.max_burst);
    assert!(p.max_send_dsl >= 512 && p.max_connections == 1);
}

/// `scsi_cdb`: an arbitrary CDB (first 16 bytes) and Data-Out (the rest), parsed against a
/// small RAM logical unit and, when it parses, executed on a simulated core: every command
/// ends with data or sense, never a panic, never outside the device.
pub fn scsi_cdb(data: &[u8]) {
    use crate::reactor::{spawn_detached, ManualCores};
    use crate::scsi::{cdb, Context, LogicalUnit, PortIdentity};
    use std::cell::RefCell;
    use std::rc::Rc;
    if data.len() < 16 {
        return;
    }
    let (c, out) = data.split_at(16);
    let cores = ManualCores::new(1);
    let reg = crate::bdev::BdevRegistry::new(1);
    let bs = if c[15] & 1 == 0 { 512 } else { 4096 };
    let entry = reg.register(Arc::new(crate::bdevs::malloc::MallocBdev::new("f", 64, bs, None).expect("malloc"))).expect("register");
    let lu = Arc::new(LogicalUnit::new(entry, 1));
    let g = lu.geometry();
    let Ok(cmd) = cdb::parse(c, &g) else { return };
    let din_len = cmd.data_in_len(&g).min(1 << 20) as usize;
    let out = out.to_vec();
    let done = Rc::new(RefCell::new(false));
    let d = done.clone();
    cores.enter(0, || {
        spawn_detached(async move {
            let nx = lu.nexus(crate::scsi::pr::ItNexus::iscsi("iqn.f-host", [0x40, 0, 0, 0, 0, 1], "iqn.f", 1)).expect("nexus");
            let port = PortIdentity { target_name: "iqn.f".into(), portal_group_tag: 1 };
            let ctx = Context { port: &port, luns: &[0, 1], data_out_expected: out.len() as u64, peers: None };
            let mut din = vec![0u8; din_len];
            let r = lu.execute(&nx, &cmd, &out, &mut din, &ctx).await;
            if let Ok(done) = r {
                assert!(done.data_len <= din.len());
            }
            *d.borrow_mut() = true;
        })
    });
    cores.run_until_idle();
    assert!(*done.borrow(), "a command never finished");
}

/// `nvmf_auth`: a DH-HMAC-CHAP transaction on the controller side over arbitrary AUTH_Send
/// payloads (each a 2-byte little-endian length then that many bytes, cut short at the end of
/// the input), each followed by an AUTH_Receive: no panic, every answer decodes.
pub fn nvmf_auth(data: &[u8]) {
    use crate::nvmf::auth::{msg::Message, Policy, QueueAuth, Secret};
    let _ = Message::decode(data);
    let key = Secret::parse(Secret::encode(None, &[7; 32]).as_bytes()).expect("a valid secret");
    let mut q = QueueAuth::new("nqn.2014-08.org.nvmexpress:uuid:fuzz", NVMF_NQN, &key, Some(&key), Policy::default());
    let mut rest = data;
    while rest.len() >= 2 {
        let n = (u16::from_le_bytes([rest[0], rest[1]]) as usize).min(rest.len() - 2);
        let _ = q.send(&rest[2..2 + n]);
        rest = &rest[2 + n..];
        if let Ok((m, _)) = q.receive() {
            assert!(Message::decode(&m).is_ok(), "the controller sent what it cannot decode");
        }
    }
}
