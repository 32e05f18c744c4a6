//! TCP sockets owned by one core. Accepted connections are plain `std` streams so that a
//! listener on one core can hand them to another core, which registers them on its own driver.

use super::io::Registration;
use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::fd::AsRawFd;

pub struct TcpListener {
    inner: mio::net::TcpListener,
    reg: Registration,
}

impl TcpListener {
    /// Binds on the current core. `SO_REUSEADDR` is set so a restarted target can bind at once.
    pub fn bind(addr: SocketAddr) -> io::Result<Self> {
        let inner = mio::net::TcpListener::bind(addr)?;
        let reg = Registration::new(inner.as_raw_fd())?;
        Ok(TcpListener { inner, reg })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    /// Accepts one connection, waiting for it if needed.
    pub async fn accept(&self) -> io::Result<(StdTcpStream, SocketAddr)> {
        loop {
            let tick = self.reg.read_tick();
            match self.inner.accept() {
                Ok((s, a)) => {
                    // Convert to std: the stream travels to the core that will own it.
                    let fd = std::os::fd::OwnedFd::from(s);
                    return Ok((StdTcpStream::from(fd), a));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.reg.readable(tick).await,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
    }
}

pub struct TcpStream {
    inner: mio::net::TcpStream,
    reg: Registration,
}

impl TcpStream {
    /// Takes ownership of a connection on the current core.
    pub fn from_std(s: StdTcpStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        s.set_nodelay(true)?;
        let inner = mio::net::TcpStream::from_std(s);
        let reg = Registration::new(inner.as_raw_fd())?;
        Ok(TcpStream { inner, reg })
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

    pub fn shutdown(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Both);
    }

    /// Sends FIN but keeps reading possible (a protocol error reply must reach the peer
    /// before the socket closes: closing with unread input sends a RST that can discard it).
    pub fn shutdown_write(&self) {
        let _ = self.inner.shutdown(std::net::Shutdown::Write);
    }
}
