//! A connection that is plain TCP or TLS over it, driven by the reactor like a plain one.
//!
//! TLS runs in the connection's own task on its own core, through OpenSSL on the non-blocking
//! socket: OpenSSL reads and writes the socket itself (so a record is decrypted straight from
//! the kernel's buffer) and says when it would block; the reactor then waits for readiness as
//! for a plain socket. No thread and no extra copy through a memory pipe per connection.
//!
//! Readiness is edge-triggered: a waiter only wakes for bytes that arrive after its tick. A TLS
//! read therefore returns less than asked for only once the socket said `WouldBlock` (OpenSSL
//! reads one record at a time and may leave whole records in the kernel), so that a caller that
//! waits after a short read (the receive buffer does) waits for bytes that are really not there.

use super::net::TcpStream;
use super::recv::Source;
use openssl::ssl::{ErrorCode, HandshakeError, MidHandshakeSslStream, Ssl, SslRef, SslStream};
use std::cell::RefCell;
use std::io::{self, ErrorKind, IoSlice, Read, Write};
use std::rc::Rc;

/// Plaintext gathered into one TLS record: small PDUs (completions, R2Ts) share a record
/// instead of paying a record's header, tag and system call each. 16 KiB is TLS's largest.
const RECORD: usize = 16 * 1024;

/// What TLS adds to a connection's memory: OpenSSL's read and write buffers (a record each,
/// with headroom), its state, and the gathering buffer. Counted in the connection's budget.
pub const TLS_CONNECTION_BYTES: usize = 3 * RECORD + 2 * 17 * 1024 + 8 * 1024;

/// The socket as OpenSSL sees it: a non-blocking byte pipe. Shared with the stream (which
/// waits for readiness on it) by `Rc`: one core owns both.
struct SockIo(Rc<TcpStream>);

impl Read for SockIo {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SockIo {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A TLS session over an accepted TCP connection.
pub struct TlsStream {
    tcp: Rc<TcpStream>,
    /// Borrowed only within one synchronous OpenSSL call, never across an await: the reader
    /// and the writer tasks of the connection take turns on it.
    ssl: RefCell<SslStream<SockIo>>,
    gather: RefCell<Vec<u8>>,
}

/// An OpenSSL error as an I/O error (`WouldBlock` when OpenSSL waits for the socket).
fn io_error(e: openssl::ssl::Error) -> io::Error {
    match e.code() {
        ErrorCode::WANT_READ | ErrorCode::WANT_WRITE => ErrorKind::WouldBlock.into(),
        ErrorCode::ZERO_RETURN => ErrorKind::UnexpectedEof.into(),
        _ => match e.into_io_error() {
            Ok(io) => io,
            Err(e) => io::Error::new(ErrorKind::InvalidData, format!("TLS: {e}")),
        },
    }
}

/// A failed handshake: `PermissionDenied` when the peer was refused (no shared key, a wrong
/// one, not TLS at all), `UnexpectedEof` when it left mid-way.
fn handshake_error(e: HandshakeError<SockIo>) -> io::Error {
    match e {
        HandshakeError::SetupFailure(e) => io::Error::other(format!("TLS setup: {e}")),
        HandshakeError::Failure(m) | HandshakeError::WouldBlock(m) => {
            let e = m.error();
            if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() || e.code() == ErrorCode::ZERO_RETURN {
                io::Error::new(ErrorKind::UnexpectedEof, "TLS handshake: the peer closed the connection")
            } else {
                io::Error::new(ErrorKind::PermissionDenied, format!("TLS handshake: {e}"))
            }
        }
    }
}

impl TlsStream {
    /// Runs the server side of the handshake on `tcp` with `ssl` (its context holds the
    /// keys); the caller bounds the time it may take.
    pub async fn accept(tcp: TcpStream, ssl: Ssl) -> io::Result<TlsStream> {
        let tcp = Rc::new(tcp);
        // Ticks before each attempt: a wait is for readiness after the attempt that blocked.
        let (mut rt, mut wt) = (tcp.read_tick(), tcp.write_tick());
        let mut mid: MidHandshakeSslStream<SockIo> = match ssl.accept(SockIo(tcp.clone())) {
            Ok(s) => return Ok(TlsStream::new(tcp, s)),
            Err(HandshakeError::WouldBlock(m)) => m,
            Err(e) => return Err(handshake_error(e)),
        };
        loop {
            if mid.error().code() == ErrorCode::WANT_WRITE {
                tcp.writable(wt).await;
            } else {
                tcp.readable(rt).await;
            }
            (rt, wt) = (tcp.read_tick(), tcp.write_tick());
            match mid.handshake() {
                Ok(s) => return Ok(TlsStream::new(tcp, s)),
                Err(HandshakeError::WouldBlock(m)) => mid = m,
                Err(e) => return Err(handshake_error(e)),
            }
        }
    }

    fn new(tcp: Rc<TcpStream>, s: SslStream<SockIo>) -> TlsStream {
        TlsStream { tcp, ssl: RefCell::new(s), gather: RefCell::new(Vec::with_capacity(RECORD)) }
    }

    /// The session (for what the handshake settled: the PSK identity, the cipher).
    pub fn with_ssl<R>(&self, f: impl FnOnce(&SslRef) -> R) -> R {
        f(self.ssl.borrow().ssl())
    }

    /// Decrypts into `buf` without waiting: `WouldBlock` when nothing is there. Short only
    /// once the socket is drained (see the module's note).
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        let mut ssl = self.ssl.borrow_mut();
        let mut n = 0;
        while n < buf.len() {
            match ssl.ssl_read(&mut buf[n..]) {
                Ok(k) => n += k,
                Err(e) if n > 0 && matches!(e.code(), ErrorCode::WANT_READ | ErrorCode::WANT_WRITE) => break,
                // The peer closed without a close_notify: end of stream for us too (the
                // NVMe/TCP layer decides whether that cut a PDU).
                Err(e) if e.code() == ErrorCode::SYSCALL && e.io_error().is_none() => return Ok(n),
                Err(e) if e.code() == ErrorCode::ZERO_RETURN => return Ok(n),
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(n)
    }

    pub fn read_tick(&self) -> u64 {
        self.tcp.read_tick()
    }

    pub async fn readable(&self, tick: u64) {
        self.tcp.readable(tick).await
    }

    /// Encrypts and sends every byte of `bufs`: small pieces gathered into records of up to
    /// 16 KiB, large ones encrypted in place.
    pub async fn write_all_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        for b in bufs {
            let b: &[u8] = b;
            if self.gather.borrow().len() + b.len() <= RECORD {
                self.gather.borrow_mut().extend_from_slice(b);
                continue;
            }
            self.flush_gathered().await?;
            if b.len() < RECORD {
                self.gather.borrow_mut().extend_from_slice(b);
            } else {
                self.write_all(b).await?;
            }
        }
        self.flush_gathered().await
    }

    async fn flush_gathered(&self) -> io::Result<()> {
        if self.gather.borrow().is_empty() {
            return Ok(());
        }
        // Taken out while it is written: the writer is the connection's only sender.
        let g = std::mem::take(&mut *self.gather.borrow_mut());
        let r = self.write_all(&g).await;
        let mut g = g;
        g.clear();
        *self.gather.borrow_mut() = g;
        r
    }

    async fn write_all(&self, mut b: &[u8]) -> io::Result<()> {
        while !b.is_empty() {
            let tick = self.tcp.write_tick();
            let r = self.ssl.borrow_mut().ssl_write(&b[..b.len().min(RECORD)]);
            match r {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => b = &b[n..],
                // OpenSSL keeps the record it began; the retry (same bytes first) finishes it.
                Err(e) if e.code() == ErrorCode::WANT_WRITE => self.tcp.writable(tick).await,
                Err(e) if e.code() == ErrorCode::WANT_READ => self.tcp.readable(self.tcp.read_tick()).await,
                Err(e) => return Err(io_error(e)),
            }
        }
        Ok(())
    }

    /// Sends the TLS close_notify (if the socket takes it now) and closes both directions.
    pub fn shutdown(&self) {
        if let Ok(mut s) = self.ssl.try_borrow_mut() {
            let _ = s.shutdown();
        }
        self.tcp.shutdown();
    }

    pub fn shutdown_write(&self) {
        if let Ok(mut s) = self.ssl.try_borrow_mut() {
            let _ = s.shutdown();
        }
        self.tcp.shutdown_write();
    }
}

/// A host connection: plain TCP, or TLS on a listener marked secure. The front end reads and
/// writes it the same way either way.
pub enum Channel {
    Plain(TcpStream),
    Tls(TlsStream),
}

impl Channel {
    pub fn is_tls(&self) -> bool {
        matches!(self, Channel::Tls(_))
    }

    pub fn tls(&self) -> Option<&TlsStream> {
        match self {
            Channel::Tls(t) => Some(t),
            Channel::Plain(_) => None,
        }
    }

    pub async fn write_all_vectored(&self, bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        match self {
            Channel::Plain(s) => s.write_all_vectored(bufs).await,
            Channel::Tls(t) => t.write_all_vectored(bufs).await,
        }
    }

    /// Reads at least one byte (0 = the peer closed).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let tick = self.read_tick();
            match Source::try_read(self, buf) {
                Err(e) if e.kind() == ErrorKind::WouldBlock => Source::readable(self, tick).await,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                r => return r,
            }
        }
    }

    pub fn shutdown(&self) {
        match self {
            Channel::Plain(s) => s.shutdown(),
            Channel::Tls(t) => t.shutdown(),
        }
    }

    pub fn shutdown_write(&self) {
        match self {
            Channel::Plain(s) => s.shutdown_write(),
            Channel::Tls(t) => t.shutdown_write(),
        }
    }

    fn read_tick(&self) -> u64 {
        match self {
            Channel::Plain(s) => s.read_tick(),
            Channel::Tls(t) => t.read_tick(),
        }
    }
}

impl super::recv::Source for Channel {
    fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Channel::Plain(s) => s.try_read(buf),
            Channel::Tls(t) => t.try_read(buf),
        }
    }

    fn read_tick(&self) -> u64 {
        Channel::read_tick(self)
    }

    async fn readable(&self, tick: u64) {
        match self {
            Channel::Plain(s) => s.readable(tick).await,
            Channel::Tls(t) => t.readable(tick).await,
        }
    }
}
