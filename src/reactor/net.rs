//! TCP sockets owned by one core. Accepted connections are plain `std` streams so that a
//! listener on one core can hand them to another core, which registers them on its own driver.
//!
//! Host connections may not use up the process's file descriptors: the RPC socket, bdev files
//! and the metrics endpoint need some too. So listeners accept at most RLIMIT_NOFILE minus a
//! reserve ([`set_fd_reserve`]) connections at once and close the rest at once; and if the
//! process runs out of descriptors anyway (EMFILE), a listener sheds the waiting connection
//! (closing a spare descriptor it keeps for that, accepting, closing) instead of leaving it in
//! the backlog, where it would make every readiness poll fail again.

use super::io::Registration;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

static FD_RESERVE: AtomicU64 = AtomicU64::new(64);
static OPEN_CONNECTIONS: AtomicUsize = AtomicUsize::new(0);
static SHED: AtomicU64 = AtomicU64::new(0);
static LAST_SHED_LOG_NS: AtomicU64 = AtomicU64::new(0);

/// Raises the soft RLIMIT_NOFILE to the hard one and keeps `reserve` descriptors free of host
/// connections; call at startup.
pub fn set_fd_reserve(reserve: u64) {
    FD_RESERVE.store(reserve, Ordering::Relaxed);
    if let Some((soft, hard)) = nofile() {
        let raised = libc::rlimit { rlim_cur: hard, rlim_max: hard };
        // SAFETY: setrlimit reads the struct we pass.
        if soft < hard && unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            log::debug!("RLIMIT_NOFILE raised from {soft} to {hard}");
        }
    }
    log::info!("host connections: at most {} at once ({reserve} descriptors reserved)", connection_cap());
}

/// Most host connections open at once: RLIMIT_NOFILE minus the reserve.
pub fn connection_cap() -> usize {
    let soft = nofile().map_or(1024, |(s, _)| s);
    soft.saturating_sub(FD_RESERVE.load(Ordering::Relaxed)) as usize
}

/// (soft, hard) RLIMIT_NOFILE.
fn nofile() -> Option<(u64, u64)> {
    let mut r = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0).then_some((r.rlim_cur, r.rlim_max))
}

/// (host connections open, connections shed since start).
pub fn connection_stats() -> (usize, u64) {
    (OPEN_CONNECTIONS.load(Ordering::Relaxed), SHED.load(Ordering::Relaxed))
}

fn shed(why: &str) {
    let n = SHED.fetch_add(1, Ordering::Relaxed) + 1;
    // At most one line a second: a flood of connections must not become a flood of logs.
    let now = super::clock::monotonic_ns();
    let last = LAST_SHED_LOG_NS.load(Ordering::Relaxed);
    if now.saturating_sub(last) > 1_000_000_000 && LAST_SHED_LOG_NS.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        log::warn!("closed a new connection at once: {why} ({n} so far)");
    }
}

/// A host connection's claim on a file descriptor, given back when the connection closes.
pub struct ConnectionSlot(());

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An accepted connection on its way to the core that will own it.
pub struct Accepted {
    pub stream: StdTcpStream,
    slot: ConnectionSlot,
}

pub struct TcpListener {
    inner: mio::net::TcpListener,
    reg: Registration,
    /// A descriptor held only to be closed when the process runs out of them, so that a
    /// waiting connection can be accepted and closed (shed).
    spare: std::cell::RefCell<Option<std::fs::File>>,
}

impl TcpListener {
    /// Binds on the current core. `SO_REUSEADDR` is set so a restarted target can bind at once.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let inner = mio::net::TcpListener::bind(addr)?;
        let reg = Registration::new(inner.as_raw_fd())?;
        Ok(TcpListener { inner, reg, spare: std::cell::RefCell::new(std::fs::File::open("/dev/null").ok()) })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts one connection, waiting for it if needed. Connections over the cap, or that
    /// arrive when the process has no descriptor left, are closed at once.
    pub async fn accept(&self) -> io::Result<(Accepted, SocketAddr)> {
        loop {
            let tick = self.reg.read_tick();
            match self.inner.accept() {
                Ok((s, a)) => {
                    if OPEN_CONNECTIONS.fetch_add(1, Ordering::Relaxed) >= connection_cap() {
                        OPEN_CONNECTIONS.fetch_sub(1, Ordering::Relaxed);
                        drop(s);
                        shed("too many connections for the descriptor limit");
                        continue;
                    }
                    let slot = ConnectionSlot(());
                    // Convert to std: the stream travels to the core that will own it.
                    let fd = std::os::fd::OwnedFd::from(s);
                    return Ok((Accepted { stream: StdTcpStream::from(fd), slot }, a));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.readable(tick).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE)) => {
                    let spare = self.spare.borrow_mut().take();
                    if spare.is_none() {
                        // No spare to give up (another thread took the descriptor before
                        // we got it back): the caller backs off.
                        return Err(e);
                    }
                    drop(spare);
                    if let Ok((s, _)) = self.inner.accept() {
                        drop(s);
                    }
                    *self.spare.borrow_mut() = std::fs::File::open("/dev/null").ok();
                    shed("out of file descriptors");
                }
                Err(e) => return Err(e),
            }
        }
    }
}

pub struct TcpStream {
    inner: mio::net::TcpStream,
    reg: Registration,
    _slot: Option<ConnectionSlot>,
}

impl TcpStream {
    /// Takes ownership of a connection on the current core.
    pub fn from_std(s: StdTcpStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        let inner = mio::net::TcpStream::from_std(s);
        let reg = Registration::new(inner.as_raw_fd())?;
        Ok(TcpStream { inner, reg, _slot: None })
    }

    /// Takes ownership of an accepted connection (and its descriptor slot) on the current core.
    pub fn from_accepted(a: Accepted) -> io::Result<Self> {
        let mut s = TcpStream::from_std(a.stream)?;
        s._slot = Some(a.slot);
        Ok(s)
    }

    pub fn peer_addr(&self) -> io::Result<SocketAddr> {
        self.inner.peer_addr()
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Reads without waiting; `WouldBlock` when nothing is there.
    pub fn try_read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.inner).read(buf)
    }

    /// Reads at least one byte (0 = the peer closed).
    pub async fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            let tick = self.reg.read_tick();
            match (&self.inner).read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.readable(tick).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Reads exactly `buf.len()` bytes.
    pub async fn read_exact(&self, mut buf: &mut [u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.read(buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::UnexpectedEof.into());
            }
            buf = &mut buf[n..];
        }
        Ok(())
    }

    /// Writes without waiting; `WouldBlock` when the socket buffer is full.
    pub fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.inner).write(buf)
    }

    /// Writes without waiting; `WouldBlock` when the socket buffer is full.
    pub fn try_write_vectored(&self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        (&self.inner).write_vectored(bufs)
    }

    pub async fn write(&self, buf: &[u8]) -> io::Result<usize> {
        loop {
            let tick = self.reg.write_tick();
            match (&self.inner).write(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.writable(tick).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }

    pub async fn write_all(&self, mut buf: &[u8]) -> io::Result<()> {
        while !buf.is_empty() {
            let n = self.write(buf).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
        }
        Ok(())
    }

    /// Writes every byte of `bufs` (gathered, one syscall per socket-buffer's worth).
    pub async fn write_all_vectored(&self, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        while !bufs.is_empty() {
            let tick = self.reg.write_tick();
            match (&self.inner).write_vectored(bufs) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.writable(tick).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until the socket is readable (after a `try_read` returned `WouldBlock`).
    pub async fn readable(&self, tick: u64) {
        self.reg.readable(tick).await
    }

    pub fn read_tick(&self) -> u64 {
        self.reg.read_tick()
    }

    /// Waits until the socket is writable (after a write returned `WouldBlock`).
    pub async fn writable(&self, tick: u64) {
        self.reg.writable(tick).await
    }

    pub fn write_tick(&self) -> u64 {
        self.reg.write_tick()
    }

    pub fn shutdown(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    /// Sends FIN but keeps reading possible (a protocol error reply must reach the peer
    /// before the socket closes: closing with unread input sends a RST that can discard it).
    pub fn shutdown_write(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }
}
