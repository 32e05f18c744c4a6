//! A small raw iSCSI initiator for tests: it logs in by hand and sends whatever PDUs a test
//! wants, well-formed or not, and reads what the target answers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const BHS: usize = 48;

pub fn crc(parts: &[&[u8]]) -> [u8; 4] {
    let mut c = 0u32;
    for p in parts {
        c = crc32c::crc32c_append(c, p);
    }
    c.to_le_bytes()
}

fn pad(n: usize) -> usize {
    (4 - n % 4) % 4
}

pub fn kv(keys: &[(&str, &str)]) -> Vec<u8> {
    let mut d = Vec::new();
    for (k, v) in keys {
        d.extend_from_slice(k.as_bytes());
        d.push(b'=');
        d.extend_from_slice(v.as_bytes());
        d.push(0);
    }
    d
}

pub fn parse_kv(d: &[u8]) -> Vec<(String, String)> {
    d.split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .filter_map(|s| {
            let s = String::from_utf8_lossy(s).to_string();
            let (k, v) = s.split_once('=')?;
            Some((k.to_string(), v.to_string()))
        })
        .collect()
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// One PDU as received.
#[derive(Debug, Clone)]
pub struct Pdu {
    pub bhs: [u8; BHS],
    pub data: Vec<u8>,
}

impl Pdu {
    pub fn opcode(&self) -> u8 {
        self.bhs[0] & 0x3F
    }
    pub fn itt(&self) -> u32 {
        be32(&self.bhs, 16)
    }
    pub fn u32(&self, at: usize) -> u32 {
        be32(&self.bhs, at)
    }
}

/// The result of a SCSI command: status, sense key/ASC/ASCQ (if CHECK CONDITION), Data-In.
#[derive(Debug, Clone)]
pub struct ScsiResult {
    pub status: u8,
    pub sense: Option<(u8, u8, u8)>,
    pub data: Vec<u8>,
}

pub struct Session {
    pub s: TcpStream,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub itt: u32,
    pub header_digest: bool,
    pub data_digest: bool,
    pub target_mrdsl: usize,
    pub login_keys: Vec<(String, String)>,
    pub tsih: u16,
}

pub struct LoginOptions<'a> {
    pub initiator: &'a str,
    pub target: Option<&'a str>,
    pub isid: [u8; 6],
    pub digests: bool,
    pub extra: Vec<(&'a str, &'a str)>,
}

impl<'a> LoginOptions<'a> {
    pub fn normal(initiator: &'a str, target: &'a str) -> Self {
        LoginOptions { initiator, target: Some(target), isid: [0x80, 0, 0x12, 0x34, 0, 1], digests: false, extra: vec![] }
    }
}

impl Session {
    pub fn connect(addr: SocketAddr) -> TcpStream {
        let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the portal");
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        s
    }

    /// Logs in with one operational-stage PDU; Err(status class, detail) if refused.
    pub fn login(addr: SocketAddr, o: &LoginOptions) -> Result<Session, (u8, u8)> {
        let s = Self::connect(addr);
        Self::login_on(s, o)
    }

    pub fn login_on(mut s: TcpStream, o: &LoginOptions) -> Result<Session, (u8, u8)> {
        let digest = if o.digests { "CRC32C" } else { "None" };
        let mut keys = vec![
            ("InitiatorName", o.initiator),
            ("SessionType", if o.target.is_some() { "Normal" } else { "Discovery" }),
            ("HeaderDigest", digest),
            ("DataDigest", digest),
            ("MaxRecvDataSegmentLength", "262144"),
            ("ImmediateData", "Yes"),
            ("InitialR2T", "Yes"),
            ("FirstBurstLength", "65536"),
            ("MaxBurstLength", "262144"),
        ];
        if let Some(t) = o.target {
            keys.push(("TargetName", t));
        }
        keys.extend(o.extra.iter().cloned());
        let data = kv(&keys);
        let mut h = [0u8; BHS];
        h[0] = 0x43;
        h[1] = 0x80 | (1 << 2) | 3;
        h[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        h[8..14].copy_from_slice(&o.isid);
        h[16..20].copy_from_slice(&1u32.to_be_bytes());
        h[24..28].copy_from_slice(&1u32.to_be_bytes());
        let mut out = h.to_vec();
        out.extend_from_slice(&data);
        out.resize(out.len() + pad(data.len()), 0);
        s.write_all(&out).expect("send login");
        let mut rh = [0u8; BHS];
        s.read_exact(&mut rh).expect("login response header");
        let dsl = u32::from_be_bytes([0, rh[5], rh[6], rh[7]]) as usize;
        let mut rd = vec![0u8; dsl + pad(dsl)];
        s.read_exact(&mut rd).expect("login response data");
        if rh[36] != 0 {
            return Err((rh[36], rh[37]));
        }
        assert_eq!(rh[1] & 0x83, 0x83, "the target must move to full feature phase");
        let keys = parse_kv(&rd[..dsl]);
        let mrdsl = keys.iter().find(|(k, _)| k == "MaxRecvDataSegmentLength").map(|(_, v)| v.parse().unwrap()).unwrap_or(8192);
        let hd = keys.iter().any(|(k, v)| k == "HeaderDigest" && v == "CRC32C");
        let dd = keys.iter().any(|(k, v)| k == "DataDigest" && v == "CRC32C");
        Ok(Session {
            s,
            cmd_sn: 1,
            exp_stat_sn: be32(&rh, 24).wrapping_add(1),
            itt: 100,
            header_digest: hd,
            data_digest: dd,
            target_mrdsl: mrdsl,
            login_keys: keys,
            tsih: u16::from_be_bytes([rh[14], rh[15]]),
        })
    }

    /// Sends a PDU with the session's digests (the header's DSL is set from `data`).
    pub fn send(&mut self, mut h: [u8; BHS], data: &[u8]) -> std::io::Result<()> {
        h[5..8].copy_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        let mut out = h.to_vec();
        if self.header_digest {
            out.extend_from_slice(&crc(&[&h]));
        }
        if !data.is_empty() {
            out.extend_from_slice(data);
            let p = pad(data.len());
            out.extend(std::iter::repeat_n(0u8, p));
            if self.data_digest {
                out.extend_from_slice(&crc(&[data, &[0u8; 3][..p]]));
            }
        }
        self.s.write_all(&out)
    }

    pub fn recv(&mut self) -> std::io::Result<Pdu> {
        let mut h = [0u8; BHS];
        self.s.read_exact(&mut h)?;
        let ahs = h[4] as usize * 4;
        let mut skip = vec![0u8; ahs + if self.header_digest { 4 } else { 0 }];
        self.s.read_exact(&mut skip)?;
        let dsl = u32::from_be_bytes([0, h[5], h[6], h[7]]) as usize;
        let mut d = vec![0u8; dsl + pad(dsl) + if self.data_digest && dsl > 0 { 4 } else { 0 }];
        self.s.read_exact(&mut d)?;
        d.truncate(dsl);
        let op = h[0] & 0x3F;
        if op != 0x31 && op != 0x25 && op != 0x20 {
            self.exp_stat_sn = be32(&h, 24).wrapping_add(1);
        }
        if op == 0x25 && h[1] & 0x01 != 0 {
            self.exp_stat_sn = be32(&h, 24).wrapping_add(1);
        }
        Ok(Pdu { bhs: h, data: d })
    }

    /// A SCSI Command header.
    pub fn command_header(&mut self, lun: u8, cdb: &[u8], edtl: u32, read: bool, write: bool) -> [u8; BHS] {
        let mut h = [0u8; BHS];
        h[0] = 0x01;
        h[1] = 0x80 | if read { 0x40 } else { 0 } | if write { 0x20 } else { 0 } | 0x01;
        h[9] = lun;
        self.itt += 1;
        h[16..20].copy_from_slice(&self.itt.to_be_bytes());
        h[20..24].copy_from_slice(&edtl.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        self.cmd_sn = self.cmd_sn.wrapping_add(1);
        h[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        h[32..32 + cdb.len()].copy_from_slice(cdb);
        h
    }

    /// Runs one SCSI command; write data goes as immediate data (it must fit), reads collect
    /// Data-In until the status.
    pub fn scsi(&mut self, lun: u8, cdb: &[u8], edtl: u32, write_data: Option<&[u8]>) -> std::io::Result<ScsiResult> {
        let h = self.command_header(lun, cdb, edtl, write_data.is_none() && edtl > 0, write_data.is_some());
        let itt = self.itt;
        self.send(h, write_data.unwrap_or(&[]))?;
        let mut data = Vec::new();
        loop {
            let p = self.recv()?;
            match p.opcode() {
                0x25 if p.itt() == itt => {
                    data.extend_from_slice(&p.data);
                    if p.bhs[1] & 0x01 != 0 {
                        return Ok(ScsiResult { status: p.bhs[3], sense: None, data });
                    }
                }
                0x21 if p.itt() == itt => {
                    let sense = if p.data.len() >= 2 + 14 { Some((p.data[2 + 2] & 0x0F, p.data[2 + 12], p.data[2 + 13])) } else { None };
                    return Ok(ScsiResult { status: p.bhs[3], sense, data });
                }
                0x20 => {} // a ping from the target; tests that care read it themselves
                0x3F => return Err(std::io::Error::other(format!("reject reason {:#x}", p.bhs[2]))),
                other => return Err(std::io::Error::other(format!("unexpected PDU {other:#x}"))),
            }
        }
    }

    /// Runs a write command (`cdb`) whose data the target solicits: the command goes without
    /// immediate data and each R2T is answered with one Data-Out of the range it asks for.
    /// Returns the SCSI status.
    pub fn write_solicited(&mut self, lun: u8, cdb: &[u8], data: &[u8]) -> std::io::Result<u8> {
        let h = self.command_header(lun, cdb, data.len() as u32, false, true);
        let itt = self.itt;
        self.send(h, &[])?;
        loop {
            let p = self.recv()?;
            match p.opcode() {
                0x31 if p.itt() == itt => {
                    let (ttt, off, len) = (p.u32(20), p.u32(40) as usize, p.u32(44) as usize);
                    let mut d = [0u8; BHS];
                    d[0] = 0x05;
                    d[1] = 0x80;
                    d[9] = lun;
                    d[16..20].copy_from_slice(&itt.to_be_bytes());
                    d[20..24].copy_from_slice(&ttt.to_be_bytes());
                    d[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
                    d[40..44].copy_from_slice(&(off as u32).to_be_bytes());
                    self.send(d, &data[off..off + len])?;
                }
                0x21 if p.itt() == itt => return Ok(p.bhs[3]),
                0x20 => {} // a ping from the target
                other => return Err(std::io::Error::other(format!("unexpected PDU {other:#x} during a solicited write"))),
            }
        }
    }

    /// NOP-Out ping with data; returns the echoed data.
    pub fn ping(&mut self, data: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut h = [0u8; BHS];
        h[0] = 0x40;
        h[1] = 0x80;
        self.itt += 1;
        h[16..20].copy_from_slice(&self.itt.to_be_bytes());
        h[20..24].copy_from_slice(&u32::MAX.to_be_bytes());
        h[24..28].copy_from_slice(&self.cmd_sn.to_be_bytes());
        h[28..32].copy_from_slice(&self.exp_stat_sn.to_be_bytes());
        let itt = self.itt;
        self.send(h, data)?;
        loop {
            let p = self.recv()?;
            if p.opcode() == 0x20 && p.itt() == itt {
                return Ok(p.data);
            }
            if p.opcode() == 0x3F {
                return Err(std::io::Error::other(format!("reject reason {:#x}", p.bhs[2])));
            }
        }
    }

    /// Whether the target closed the connection (EOF within `wait`).
    pub fn closed_within(&mut self, wait: Duration) -> bool {
        self.s.set_read_timeout(Some(wait)).unwrap();
        let mut b = [0u8; 4096];
        let deadline = std::time::Instant::now() + wait;
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => {
                    if std::time::Instant::now() > deadline {
                        return false;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }
}

/// READ(10) / WRITE(10) CDBs.
pub fn read10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = [0u8; 10];
    c[0] = 0x28;
    c[2..6].copy_from_slice(&lba.to_be_bytes());
    c[7..9].copy_from_slice(&blocks.to_be_bytes());
    c
}

pub fn write10(lba: u32, blocks: u16) -> [u8; 10] {
    let mut c = read10(lba, blocks);
    c[0] = 0x2A;
    c
}
