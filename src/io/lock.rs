//! Image locks compatible with QEMU's `file-posix` driver, so that QEMU, qemu-img, qemu-nbd and
//! qnbd each see the others' claims on a file.
//!
//! QEMU describes a user of a file by two sets of block permissions: those it holds (`perm`) and
//! those it refuses to share with anyone else (`deny`, the complement of its shared
//! permissions). Each permission bit `i` has two lock bytes in the file: a shared OFD lock on
//! byte `100 + i` says "I hold permission i", a shared OFD lock on byte `200 + i` says "nobody
//! else may hold permission i". Taking a lock is then two steps, both as QEMU does them:
//!
//! 1. lock our bytes (shared locks never conflict with each other, so this always succeeds);
//! 2. test the other side: for every permission we hold, nobody may be locking its "deny"
//!    byte; for every permission we deny, nobody may be locking its "hold" byte. A test that
//!    finds another open file description's lock is a conflict, and the caller closes the file
//!    (which drops our bytes again).
//!
//! OFD locks belong to the open file description: `dup`ed descriptors share them, closing the
//! last one releases them, and two opens of the same file in one process see each other, as two
//! processes would.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// Byte of the first "holds permission" lock (`RAW_LOCK_PERM_BASE`).
const HOLD_BASE: i64 = 100;
/// Byte of the first "denies permission" lock (`RAW_LOCK_SHARED_BASE`).
const DENY_BASE: i64 = 200;

/// A set of QEMU block permissions (`BLK_PERM_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Perm(u8);

impl Perm {
    pub const NONE: Perm = Perm(0);
    /// `BLK_PERM_CONSISTENT_READ`.
    pub const READ: Perm = Perm(1);
    /// `BLK_PERM_WRITE`.
    pub const WRITE: Perm = Perm(2);
    /// `BLK_PERM_WRITE_UNCHANGED`.
    pub const WRITE_UNCHANGED: Perm = Perm(4);
    /// `BLK_PERM_RESIZE`.
    pub const RESIZE: Perm = Perm(8);
    /// Number of permission bits QEMU locks (`BLK_PERM_MAX`).
    const BITS: u32 = 4;

    pub const fn union(self, other: Perm) -> Perm {
        Perm(self.0 | other.0)
    }

    pub const fn contains(self, other: Perm) -> bool {
        self.0 & other.0 == other.0
    }

    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// QEMU's name of one permission bit (`bdrv_perm_names`).
    fn bit_name(bit: u32) -> &'static str {
        match bit {
            0 => "consistent read",
            1 => "write",
            2 => "write unchanged",
            _ => "resize",
        }
    }

    fn bits(self) -> impl Iterator<Item = u32> {
        (0..Self::BITS).filter(move |b| self.0 & (1 << b) != 0)
    }
}

impl std::ops::BitOr for Perm {
    type Output = Perm;
    fn bitor(self, rhs: Perm) -> Perm {
        self.union(rhs)
    }
}

/// What one user of a file claims: the permissions it holds and those it lets nobody else hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LockSpec {
    pub perm: Perm,
    pub deny: Perm,
}

impl LockSpec {
    /// Takes no lock at all (`file.locking=off`, or a user that neither holds nor denies).
    pub fn is_empty(self) -> bool {
        self.perm.is_empty() && self.deny.is_empty()
    }
}

/// Why a file could not be locked.
#[derive(Debug)]
pub enum LockError {
    /// Someone else denies a permission we need (`shared == false`) or holds one we deny
    /// (`shared == true`): QEMU's `Failed to get [shared] "NAME" lock`.
    Conflict { shared: bool, perm: &'static str },
    /// The lock calls themselves failed (a file system without OFD locks, ...).
    Io { byte: i64, error: io::Error },
}

impl std::fmt::Display for LockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockError::Conflict {
                shared: false,
                perm,
            } => write!(f, "Failed to get \"{perm}\" lock"),
            LockError::Conflict { shared: true, perm } => {
                write!(f, "Failed to get shared \"{perm}\" lock")
            }
            LockError::Io { byte, error } => write!(f, "Failed to lock byte {byte}: {error}"),
        }
    }
}

fn flock(kind: libc::c_short, byte: i64) -> libc::flock {
    libc::flock {
        l_type: kind,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: byte,
        l_len: 1,
        l_pid: 0,
    }
}

/// Take a shared OFD lock on one byte.
fn lock_byte(file: &File, byte: i64) -> io::Result<()> {
    let mut fl = flock(libc::F_RDLCK as libc::c_short, byte);
    // SAFETY: `fd` is open for the lifetime of `file`; F_OFD_SETLK reads the `flock` we pass,
    // which lives on this stack frame for the duration of the call.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte` that an exclusive lock would
/// conflict with (`qemu_lock_fd_test(fd, byte, 1, true)`).
fn byte_taken(file: &File, byte: i64) -> io::Result<bool> {
    let mut fl = flock(libc::F_WRLCK as libc::c_short, byte);
    // SAFETY: as in `lock_byte`; F_OFD_GETLK writes the answer into our `flock`.
    let r = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
}

/// Drop every OFD lock of `file`'s open file description now. Closing the descriptor does
/// the same only once the kernel lets go of its last reference to the description, and
/// io_uring can hold one past `close` (a ring is torn down by a kernel worker, later): an
/// image closed and opened again at once by the same process would then meet its own old
/// locks. The engines call this when they close a file.
pub fn release_all(file: &File) {
    let mut fl = libc::flock {
        l_type: libc::F_UNLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: 0,
        l_len: 0,
        l_pid: 0,
    };
    // SAFETY: as in `lock_byte`; unlocking ranges nobody locked is not an error.
    let _ = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
}

/// Claim `spec` on `file` the way QEMU does (see the module documentation). On a conflict the
/// bytes already locked stay locked until the caller closes the file, which it must then do.
pub fn claim(file: &File, spec: LockSpec) -> Result<(), LockError> {
    let io_err = |byte| move |error| LockError::Io { byte, error };
    for b in spec.perm.bits() {
        let byte = HOLD_BASE + i64::from(b);
        lock_byte(file, byte).map_err(io_err(byte))?;
    }
    for b in spec.deny.bits() {
        let byte = DENY_BASE + i64::from(b);
        lock_byte(file, byte).map_err(io_err(byte))?;
    }
    for b in spec.perm.bits() {
        let byte = DENY_BASE + i64::from(b);
        if byte_taken(file, byte).map_err(io_err(byte))? {
            return Err(LockError::Conflict {
                shared: false,
                perm: Perm::bit_name(b),
            });
        }
    }
    for b in spec.deny.bits() {
        let byte = HOLD_BASE + i64::from(b);
        if byte_taken(file, byte).map_err(io_err(byte))? {
            return Err(LockError::Conflict {
                shared: true,
                perm: Perm::bit_name(b),
            });
        }
    }
    Ok(())
}

impl LockError {
    /// The error a command reports for `path`, worded as QEMU words it (callers add the
    /// "Could not open" of their tool).
    pub fn into_error(self, path: &str) -> crate::Error {
        use crate::error::{Error, ErrorKind};
        match self {
            LockError::Conflict { .. } => Error::new(
                ErrorKind::Busy,
                format!(
                    "{self}\nIs another process using the image [{path}]?{}",
                    crate::error::hint(
                        "stop the other user of the image, or open it read-only and shared with \
                         -U/--force-share (info, map, measure, check, compare, convert, snapshot -l, bench, bitmap --list/--dump)"
                    )
                ),
            ),
            LockError::Io { byte, error } => {
                Error::io(format!("Failed to lock byte {byte}"), error)
            }
        }
    }
}

/// [`claim`] on the file opened as `path`, failing with the library's error.
pub fn claim_file(file: &File, spec: LockSpec, path: &str) -> crate::Result<()> {
    claim(file, spec).map_err(|e| e.into_error(path))
}

/// The locks `create` and a `convert` target hold on a file they are about to empty and
/// write from scratch: write and resize held, and read, write and resize denied, so that a
/// file anyone else has open (even only reading it) is refused before it is truncated.
/// qemu-img denies only resize at this point, truncates, and fails later when it reopens
/// the file, which by then has lost its contents.
pub const CREATE: LockSpec = LockSpec {
    perm: Perm(Perm::WRITE.0 | Perm::RESIZE.0),
    deny: Perm(Perm::READ.0 | Perm::WRITE.0 | Perm::RESIZE.0),
};

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    const READER: LockSpec = LockSpec {
        perm: Perm::READ,
        deny: Perm(Perm::WRITE.0 | Perm::RESIZE.0),
    };
    const WRITER: LockSpec = LockSpec {
        perm: Perm(Perm::READ.0 | Perm::WRITE.0 | Perm::RESIZE.0),
        deny: Perm(Perm::WRITE.0 | Perm::RESIZE.0),
    };

    #[test]
    fn readers_share_and_a_writer_is_refused_both_ways() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let (a, b) = (open(&p), open(&p));
        claim(&a, READER).unwrap();
        claim(&b, READER).unwrap();
        let w = open(&p);
        let e = claim(&w, WRITER).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get \"write\" lock");
        drop((a, b, w));
        let w = open(&p);
        claim(&w, WRITER).unwrap();
        let r = open(&p);
        let e = claim(&r, READER).unwrap_err();
        assert_eq!(e.to_string(), "Failed to get shared \"write\" lock");
        // closing the writer releases its bytes
        drop((w, r));
        claim(&open(&p), WRITER).unwrap();
    }

    #[test]
    fn a_dup_shares_the_locks_of_its_description() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let w = open(&p);
        claim(&w, WRITER).unwrap();
        let d = w.try_clone().unwrap();
        drop(w);
        assert!(
            claim(&open(&p), READER).is_err(),
            "the dup still holds the locks"
        );
        drop(d);
        claim(&open(&p), READER).unwrap();
    }

    /// The engines release their locks when they close, even while something else (here a
    /// dup, for io_uring a ring being torn down) keeps the description alive.
    #[test]
    fn an_engine_closing_releases_the_locks_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let w = open(&p);
        claim(&w, WRITER).unwrap();
        let lingering = w.try_clone().unwrap();
        drop(crate::io::sync::SyncFile::new(w));
        claim(&open(&p), WRITER).expect("the closed engine's locks are gone");
        drop(lingering);
        #[cfg(feature = "uring")]
        if let Ok(u) = {
            let w = open(&p);
            claim(&w, WRITER).unwrap();
            crate::io::uring::UringFile::new(w)
        } {
            assert!(
                claim(&open(&p), READER).is_err(),
                "the ring's file holds them"
            );
            drop(u);
            claim(&open(&p), WRITER).expect("the closed ring's locks are gone");
        }
    }

    #[test]
    fn an_empty_spec_conflicts_with_nobody() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, vec![0u8; 4096]).unwrap();
        let w = open(&p);
        claim(&w, WRITER).unwrap();
        claim(&open(&p), LockSpec::default()).unwrap();
        claim(
            &open(&p),
            LockSpec {
                perm: Perm::READ,
                deny: Perm::NONE,
            },
        )
        .unwrap();
    }
}
