//! Safe wrappers for the system calls the layers above make outside the storage engines:
//! wake-up pipes and `poll`, signal handlers, the socket-activation listener, `fork` for
//! `serve --fork`, standard descriptors, advisory locks, `fallocate`, a socket `shutdown` and
//! local time. With `uring.rs`, `direct.rs`, `sync.rs` and `lock.rs` this is where the crate's
//! `unsafe` code lives; nothing above `io/` writes `unsafe`.

use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};

/// A pipe (`O_CLOEXEC`, and `O_NONBLOCK` when asked): (read end, write end).
pub fn pipe(nonblock: bool) -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    let flags = libc::O_CLOEXEC | if nonblock { libc::O_NONBLOCK } else { 0 };
    // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), flags) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded: both are fresh descriptors nobody else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// write(2) of `buf` to `fd`, once; async-signal-safe (signal handlers call it). Returns what
/// write returned (bytes written, or -1).
pub fn write_raw(fd: RawFd, buf: &[u8]) -> isize {
    // SAFETY: `buf` is valid for reads of its length; a bad fd only makes write fail.
    unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) }
}

/// read(2) into `buf` from `fd`, once: bytes read (0 on error or end of file).
pub fn read_raw(fd: RawFd, buf: &mut [u8]) -> usize {
    // SAFETY: `buf` is valid for writes of its length; a bad fd only makes read fail.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    n.max(0) as usize
}

/// poll(2) over `fds` (`timeout_ms` < 0: no timeout): how many have events.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid, initialised slice of pollfd of the given length.
    let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// shutdown(2) both directions of the socket `fd` (it stays open; a bad fd is ignored).
pub fn shutdown_socket(fd: RawFd) {
    // SAFETY: shutdown takes integers only and neither closes nor invalidates the descriptor.
    unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
}

/// Install `handler` for each of `signals` (`SA_RESTART`, empty mask). The handler must be
/// async-signal-safe ([`write_raw`] is).
pub fn install_signal_handler(signals: &[libc::c_int], handler: extern "C" fn(libc::c_int)) {
    for &sig in signals {
        // SAFETY: a zeroed sigaction with a valid handler and an empty mask is well-formed.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = handler as *const () as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The listening socket a socket activator passed as fd 3.
#[derive(Debug)]
pub enum Activated {
    Unix(UnixListener),
    Tcp(TcpListener),
}

static ACTIVATION_TAKEN: AtomicBool = AtomicBool::new(false);

/// Take fd 3, the socket of systemd-style socket activation (the caller has checked
/// `LISTEN_PID` and `LISTEN_FDS`): marked close-on-exec and owned from then on. Only the first
/// call takes it; later calls fail, so the descriptor never has two owners.
pub fn take_activation_socket() -> io::Result<Activated> {
    const FD: RawFd = 3;
    if ACTIVATION_TAKEN.swap(true, Ordering::SeqCst) {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: sockaddr_storage is plain old data; all-zero is a valid value.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: `ss` and `len` are valid for writes of the sizes given.
    let rc = unsafe { libc::getsockname(FD, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) };
    if rc != 0 {
        ACTIVATION_TAKEN.store(false, Ordering::SeqCst);
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fcntl on an fd just checked to be an open socket; FD_CLOEXEC is a valid flag.
    unsafe { libc::fcntl(FD, libc::F_SETFD, libc::FD_CLOEXEC) };
    // SAFETY: fd 3 is the activator's socket, handed to this process alone (the activation
    // protocol), and taken here once.
    let owned = unsafe { OwnedFd::from_raw_fd(FD) };
    Ok(if i32::from(ss.ss_family) == libc::AF_UNIX {
        Activated::Unix(UnixListener::from(owned))
    } else {
        Activated::Tcp(TcpListener::from(owned))
    })
}

/// Which side of [`fork`] this is.
#[derive(Debug, PartialEq, Eq)]
pub enum Forked {
    Parent,
    Child,
}

/// The number of threads of this process (`/proc/self/status`), if it can be read.
fn thread_count() -> Option<usize> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|v| v.trim().parse().ok())
}

/// fork(2), refused unless this process runs a single thread (a child forked from a threaded
/// process may inherit locks held by threads that no longer exist).
pub fn fork() -> io::Result<Forked> {
    if thread_count() != Some(1) {
        return Err(io::Error::other(
            "fork refused: the process already runs threads",
        ));
    }
    // SAFETY: the process is single-threaded (checked above), so the child starts with a
    // consistent copy of every lock and allocator state.
    match unsafe { libc::fork() } {
        n if n < 0 => Err(io::Error::last_os_error()),
        0 => Ok(Forked::Child),
        _ => Ok(Forked::Parent),
    }
}

/// setsid(2): a new session without a controlling terminal (for a daemon).
pub fn setsid() {
    // SAFETY: setsid takes no arguments and has no memory-safety preconditions.
    unsafe { libc::setsid() };
}

/// Point standard input, output and error at `/dev/null` (a daemon that logs nothing).
pub fn stdio_to_null() -> io::Result<()> {
    let null = File::options().read(true).write(true).open("/dev/null")?;
    for target in 0..3 {
        // SAFETY: dup2 takes integers only; `null` is open, and 0–2 are this process's own
        // standard descriptors, which dup2 replaces atomically.
        if unsafe { libc::dup2(null.as_raw_fd(), target) } < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// An exclusive advisory lock on `file` (`flock`), failing at once if another holds it.
pub fn flock_exclusive_nb(file: &File) -> io::Result<()> {
    // SAFETY: flock takes integers only; the descriptor is owned by `file`.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// fallocate(2) mode 0 (allocate) of `len` bytes at `off` of the open file `fd` (a storage's
/// `raw_fd`, or a `File`'s).
pub fn fallocate(fd: RawFd, off: i64, len: i64) -> io::Result<()> {
    // SAFETY: fallocate takes integers only; a descriptor that is not open only makes it fail.
    if unsafe { libc::fallocate(fd, 0, off, len) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Broken-down local time of the Unix time `t`: (year, month 1–12, day, hour, minute, second).
pub fn local_time(t: i64) -> Option<(i32, i32, i32, i32, i32, i32)> {
    // SAFETY: libc::tm is a plain C struct of integers (and a pointer that may be null), for
    // which all-zero bytes are a valid value.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let tt: libc::time_t = t as libc::time_t;
    // SAFETY: localtime_r writes only into `tm`, which we own; `tt` is a valid time_t.
    if unsafe { libc::localtime_r(&tt, &mut tm) }.is_null() {
        return None;
    }
    Some((
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pipe_carries_bytes_and_poll_sees_them() {
        let (r, w) = pipe(true).unwrap();
        assert_eq!(write_raw(w.as_raw_fd(), b"xy"), 2);
        let mut p = [libc::pollfd {
            fd: r.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        assert_eq!(poll(&mut p, 1000).unwrap(), 1);
        let mut b = [0u8; 4];
        assert_eq!(read_raw(r.as_raw_fd(), &mut b), 2);
        assert_eq!(&b[..2], b"xy");
        // non-blocking and empty: nothing, no hang
        assert_eq!(read_raw(r.as_raw_fd(), &mut b), 0);
    }

    #[test]
    fn fork_is_refused_in_a_threaded_process() {
        // the test harness runs tests on threads
        let t = std::thread::spawn(|| std::thread::sleep(std::time::Duration::from_millis(200)));
        assert!(fork().is_err());
        t.join().unwrap();
    }

    #[test]
    fn local_time_of_a_known_instant_is_plausible() {
        let (y, mo, d, h, mi, s) = local_time(86_400 * 365).unwrap();
        assert!((1970..=1971).contains(&y));
        assert!((1..=12).contains(&mo) && (1..=31).contains(&d));
        assert!(h < 24 && mi < 60 && s < 61);
    }
}
