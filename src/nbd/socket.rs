//! A client's connection: the accepted socket ([`Socket`], TCP or Unix) and the stream NBD is
//! spoken over on it ([`Stream`]: the socket itself, or TLS over it after `NBD_OPT_STARTTLS`).
//!
//! The threaded driver reads, writes, sets timeouts and shuts down through a [`Stream`]; the
//! TLS layer runs over a [`Socket`]; a data plane takes the [`Socket`] of a plain connection
//! and drives its descriptor on its ring. No other type stands for a connection.

use super::tls::TlsStream;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

/// An accepted (or paired) client socket.
#[derive(Debug)]
pub enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    /// Another handle on the same socket (both ends share the descriptor's state).
    pub fn try_clone(&self) -> io::Result<Socket> {
        Ok(match self {
            Socket::Tcp(s) => Socket::Tcp(s.try_clone()?),
            Socket::Unix(s) => Socket::Unix(s.try_clone()?),
        })
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(on),
            Socket::Unix(s) => s.set_nonblocking(on),
        }
    }

    /// Read and write timeouts (`None`: wait for ever).
    pub fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => {
                s.set_read_timeout(d)?;
                s.set_write_timeout(d)
            }
            Socket::Unix(s) => {
                s.set_read_timeout(d)?;
                s.set_write_timeout(d)
            }
        }
    }

    /// Shut both directions down: blocked reads and writes on every handle return.
    pub fn shutdown(&self) {
        let _ = match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl AsRawFd for Socket {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Socket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.read(buf),
            Socket::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Socket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write(buf),
            Socket::Unix(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => s.write_vectored(bufs),
            Socket::Unix(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The stream a connection speaks NBD over.
#[derive(Debug)]
pub enum Stream {
    Plain(Socket),
    Tls(TlsStream),
}

impl Stream {
    /// Another handle on the same stream (a reader, a writer and a control handle share one
    /// connection).
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Plain(s) => Stream::Plain(s.try_clone()?),
            Stream::Tls(t) => Stream::Tls(t.clone()),
        })
    }

    pub fn set_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.set_timeout(d),
            Stream::Tls(t) => {
                t.set_timeout(d);
                Ok(())
            }
        }
    }

    pub fn shutdown(&self) {
        match self {
            Stream::Plain(s) => s.shutdown(),
            Stream::Tls(t) => t.shutdown(),
        }
    }

    /// The plain socket, for a TLS upgrade or a data plane (`None` once TLS runs over it).
    pub fn socket(&self) -> Option<io::Result<Socket>> {
        match self {
            Stream::Plain(s) => Some(s.try_clone()),
            Stream::Tls(_) => None,
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write_vectored(bufs),
            Stream::Tls(t) => t.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(t) => t.flush(),
        }
    }
}

impl From<UnixStream> for Stream {
    fn from(s: UnixStream) -> Stream {
        Stream::Plain(Socket::Unix(s))
    }
}

impl From<TcpStream> for Stream {
    fn from(s: TcpStream) -> Stream {
        Stream::Plain(Socket::Tcp(s))
    }
}
