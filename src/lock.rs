//! QEMU's image-locking protocol, so that qcow2ovl, qemu-img, qemu-io, qemu-nbd and running VMs
//! refuse each other exactly as QEMU processes refuse each other.
//!
//! QEMU (since 2.10) guards every file it opens with advisory byte-range locks on the open file
//! description (Linux OFD locks): each *permission* `i` it holds is a one-byte read lock at byte
//! `100 + i`, each permission it does not let others hold a one-byte read lock at `200 + i`.
//! Only read locks are ever taken, so locks never conflict with locks; conflicts are found by
//! probing: a process holding permission `i` asks whether anybody else has byte `200 + i`
//! locked (somebody refuses to share `i`), and for each permission it does not share, whether
//! anybody else has byte `100 + i` locked (somebody holds it). QEMU locks first and probes
//! second, so two processes racing for the same file both see each other and both back off;
//! never both succeed.
//!
//! The permission sets a given open uses (the [`LockSet`] constants) were read off QEMU 10 by
//! tracing its `fcntl` calls; `docs/design/locking.md` lists each with the command it came from.
//!
//! Lock lifetime: a [`FileLock`] owns a duplicate of the image's descriptor. OFD locks belong to
//! the open file description, which every duplicate shares, so they stay for as long as any
//! descriptor of it is open and are released explicitly when the lock is dropped. A `fork()`ed
//! child inherits the descriptor and so *shares* the locks (they are not copied and not lost);
//! a child dropping its copy leaves them alone, and they go when the parent drops its lock (or
//! when both have closed every descriptor of the file).

use std::borrow::Cow;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::OnceLock;

bitflags::bitflags! {
    /// QEMU's block-layer permissions, by their bit numbers (`BLK_PERM_*`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Perm: u8 {
        /// Reads return what was last written (`consistent read`).
        const CONSISTENT_READ = 1 << 0;
        /// Writes may change what the disk reads (`write`).
        const WRITE = 1 << 1;
        /// Writes that leave what the disk reads unchanged (`write unchanged`).
        const WRITE_UNCHANGED = 1 << 2;
        /// The file may change length (`resize`).
        const RESIZE = 1 << 3;
    }
}

/// Byte of the lock for the first permission held; permission `i` is at `PERM_BASE + i`.
const PERM_BASE: i64 = 100;
/// Byte of the lock for the first permission not shared; permission `i` is at `SHARED_BASE + i`.
const SHARED_BASE: i64 = 200;

impl Perm {
    /// QEMU's name of a single permission, as its lock errors print it.
    pub fn name(self) -> &'static str {
        match self {
            Perm::CONSISTENT_READ => "consistent read",
            Perm::WRITE => "write",
            Perm::WRITE_UNCHANGED => "write unchanged",
            Perm::RESIZE => "resize",
            _ => "unknown",
        }
    }

    /// The single permissions in `self`, lowest bit first, with their bit numbers.
    fn bits_set(self) -> impl Iterator<Item = (i64, Perm)> {
        (0..4)
            .map(|i| (i64::from(i), Perm::from_bits_retain(1 << i)))
            .filter(move |(_, p)| self.contains(*p))
    }
}

/// What an open holds and what it lets others hold, as QEMU computes it for the same kind of
/// open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockSet {
    /// Permissions this open uses (locked at `100 + i`).
    pub held: Perm,
    /// Permissions others may hold at the same time; the rest is locked at `200 + i`.
    pub shared: Perm,
}

impl LockSet {
    /// A qcow2 image opened for writing (`qemu-io`, a VM, `qemu-img snapshot -c`, `check -r`,
    /// `resize`): holds read, write and resize; shares read and write-unchanged.
    pub const WRITABLE: LockSet = LockSet {
        held: Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE),
        shared: Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
    };
    /// A qcow2 image opened read-only for its data (`qemu-io -r`, `qemu-img check`, `map`,
    /// `compare`, `convert`'s source, `snapshot -l`), and every backing file: holds read, shares
    /// read and write-unchanged, so no writer may come while it is open.
    pub const READ_ONLY: LockSet = LockSet {
        held: Perm::CONSISTENT_READ,
        shared: Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
    };
    /// A look at the header and tables only (`qemu-img info`): holds nothing, but still refuses
    /// to open beside a writer.
    pub const METADATA_ONLY: LockSet = LockSet {
        held: Perm::empty(),
        shared: Perm::CONSISTENT_READ.union(Perm::WRITE_UNCHANGED),
    };
    /// `-U` / `force-share=on` for a read of the data: holds read, shares everything (a writer
    /// may change the image under the reader).
    pub const FORCE_SHARE: LockSet = LockSet {
        held: Perm::CONSISTENT_READ,
        shared: Perm::all(),
    };
    /// `-U` for a look at the metadata only (`qemu-img info -U`): no lock at all.
    pub const FORCE_SHARE_METADATA: LockSet = LockSet {
        held: Perm::empty(),
        shared: Perm::all(),
    };
    /// An external data file of an image opened for writing: the image's writer holds it as
    /// the image, but shares writes (the format layer above coordinates them); only resizing
    /// is refused to others.
    pub const DATA_FILE_WRITABLE: LockSet = LockSet {
        held: Perm::CONSISTENT_READ.union(Perm::WRITE).union(Perm::RESIZE),
        shared: Perm::all().difference(Perm::RESIZE),
    };
    /// An external data file of an image opened read-only.
    pub const DATA_FILE_READ_ONLY: LockSet = LockSet {
        held: Perm::CONSISTENT_READ,
        shared: Perm::all().difference(Perm::RESIZE),
    };
    /// A file being created (`qemu-img create`, `convert`'s target): holds write and resize,
    /// refuses resize to others, until the new image is complete.
    pub const CREATE: LockSet = LockSet {
        held: Perm::WRITE.union(Perm::RESIZE),
        shared: Perm::all().difference(Perm::RESIZE),
    };

    /// The set a read-only open of a qcow2 image takes for this purpose, with or without
    /// force-share.
    pub fn for_read(metadata_only: bool, force_share: bool) -> LockSet {
        match (metadata_only, force_share) {
            (false, false) => LockSet::READ_ONLY,
            (true, false) => LockSet::METADATA_ONLY,
            (false, true) => LockSet::FORCE_SHARE,
            (true, true) => LockSet::FORCE_SHARE_METADATA,
        }
    }

    /// The bytes this set locks, in the order QEMU locks them: held permissions, then those
    /// not shared.
    pub fn bytes(self) -> Vec<i64> {
        let held = self.held.bits_set().map(|(i, _)| PERM_BASE + i);
        let unshared = self
            .shared
            .complement()
            .bits_set()
            .map(|(i, _)| SHARED_BASE + i);
        held.chain(unshared).collect()
    }
}

/// QEMU's `locking` option (`file.locking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Locking {
    /// Lock where OFD locks exist; elsewhere do without (said once).
    #[default]
    Auto,
    /// Always lock: OFD locks, or process-wide POSIX locks where they are missing (said once:
    /// such locks are lost when any descriptor of the file in this process closes).
    On,
    /// Neither lock nor probe.
    Off,
}

impl std::str::FromStr for Locking {
    type Err = String;

    /// `"auto"`, `"on"` or `"off"`; anything else is QEMU's `invalid parameter value: X`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Locking::Auto),
            "on" => Ok(Locking::On),
            "off" => Ok(Locking::Off),
            other => Err(format!("invalid parameter value: {other}")),
        }
    }
}

/// How the locks are taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockOps {
    /// Linux open-file-description locks (`F_OFD_SETLK`), QEMU's choice.
    Ofd,
    /// Process-associated POSIX locks (`F_SETLK`), QEMU's fallback for `locking=on`.
    Posix,
}

/// QEMU's warning when `locking=on` has to fall back to POSIX locks.
pub const POSIX_FALLBACK_WARNING: &str = "File lock requested but OFD locking syscall is \
     unavailable, falling back to POSIX file locks\nDue to the implementation, locks can be lost \
     unexpectedly.";
/// What `locking=auto` says (once) where OFD locks are missing.
pub const NO_OFD_NOTICE: &str = "OFD locks are unavailable: images are opened without locks \
     (locking=auto); use locking=on for POSIX locks";

/// The decision for a `locking` mode: which locks (none for `None`) and what to say about it.
pub fn plan(mode: Locking, ofd_available: bool) -> (Option<LockOps>, Option<&'static str>) {
    match (mode, ofd_available) {
        (Locking::Off, _) => (None, None),
        (_, true) => (Some(LockOps::Ofd), None),
        (Locking::Auto, false) => (None, Some(NO_OFD_NOTICE)),
        (Locking::On, false) => (Some(LockOps::Posix), Some(POSIX_FALLBACK_WARNING)),
    }
}

/// Whether this system has OFD locks (asked once per process, as QEMU does, on `/dev/null`).
pub fn ofd_available() -> bool {
    static AVAILABLE: OnceLock<bool> = OnceLock::new();
    *AVAILABLE.get_or_init(|| match File::open("/dev/null") {
        Ok(f) => {
            let mut fl = flock(libc::F_UNLCK, 0, 0);
            // SAFETY: `fl` is a valid `struct flock` for the duration of the call.
            let rc = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
            rc == 0 || io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL)
        }
        // No /dev/null (a bare container): assume a current Linux kernel.
        Err(_) => true,
    })
}

/// Why a lock could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another open does not share a permission this one holds.
    #[error(
        "{context}Failed to get \"{perm}\" lock\nIs another process using the image [{path}]?"
    )]
    NotShared {
        /// QEMU's name of the permission.
        perm: &'static str,
        /// The locked file, as opened.
        path: String,
        /// Where in an open it happened (`Could not open backing file: `), or empty.
        context: Cow<'static, str>,
    },
    /// Another open holds a permission this one does not share.
    #[error(
        "{context}Failed to get shared \"{perm}\" lock\nIs another process using the image [{path}]?"
    )]
    Held {
        /// QEMU's name of the permission.
        perm: &'static str,
        /// The locked file, as opened.
        path: String,
        /// Where in an open it happened, or empty.
        context: Cow<'static, str>,
    },
    /// The system call itself failed.
    #[error("Failed to lock byte {byte}: {source}")]
    Syscall {
        /// The byte being locked or probed.
        byte: i64,
        /// The error from `fcntl`.
        source: io::Error,
    },
}

impl LockError {
    /// The locked file, for a conflict.
    pub fn path(&self) -> Option<&str> {
        match self {
            LockError::NotShared { path, .. } | LockError::Held { path, .. } => Some(path),
            LockError::Syscall { .. } => None,
        }
    }

    /// Whether another process's lock was the reason (not a failing system call).
    pub fn is_conflict(&self) -> bool {
        !matches!(self, LockError::Syscall { .. })
    }

    /// The same error, said of a backing file (QEMU's `Could not open backing file: `).
    pub fn in_backing_file(self) -> LockError {
        self.in_context("Could not open backing file: ".into())
    }

    /// The same error, after `context` (which says where in a command it happened, as QEMU
    /// words it: `Could not open new backing file 'X': `).
    pub fn in_context(self, context: Cow<'static, str>) -> LockError {
        match self {
            LockError::NotShared { perm, path, .. } => LockError::NotShared {
                perm,
                path,
                context,
            },
            LockError::Held { perm, path, .. } => LockError::Held {
                perm,
                path,
                context,
            },
            other => other,
        }
    }
}

/// A `struct flock` for one byte (or, with `len == 0`, to the end) at `start`. `l_pid` must be
/// 0 for OFD locks.
fn flock(kind: i32, start: i64, len: i64) -> libc::flock {
    // SAFETY: `struct flock` is plain old data; all zeros is a valid value.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = start as libc::off_t;
    fl.l_len = len as libc::off_t;
    fl
}

impl LockOps {
    fn set_cmd(self) -> i32 {
        match self {
            LockOps::Ofd => libc::F_OFD_SETLK,
            LockOps::Posix => libc::F_SETLK,
        }
    }

    fn get_cmd(self) -> i32 {
        match self {
            LockOps::Ofd => libc::F_OFD_GETLK,
            LockOps::Posix => libc::F_GETLK,
        }
    }

    /// Takes (`F_RDLCK`) or drops (`F_UNLCK`) the one-byte lock at `byte`.
    fn set(self, fd: RawFd, kind: i32, byte: i64) -> Result<(), LockError> {
        let fl = flock(kind, byte, 1);
        // SAFETY: `fl` is a valid `struct flock`; the descriptor is open.
        let rc = unsafe { libc::fcntl(fd, self.set_cmd(), &fl) };
        if rc == -1 {
            return Err(LockError::Syscall {
                byte,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Whether another open file description (or process, for POSIX locks) holds a lock on
    /// `byte`: would a write lock there conflict?
    fn taken_by_other(self, fd: RawFd, byte: i64) -> Result<bool, LockError> {
        let mut fl = flock(libc::F_WRLCK, byte, 1);
        // SAFETY: as in `set`; the kernel writes the answer into `fl`.
        let rc = unsafe { libc::fcntl(fd, self.get_cmd(), &mut fl) };
        if rc == -1 {
            return Err(LockError::Syscall {
                byte,
                source: io::Error::last_os_error(),
            });
        }
        Ok(i32::from(fl.l_type) != libc::F_UNLCK)
    }
}

/// Locks held on one file for as long as this value lives.
#[derive(Debug)]
pub struct FileLock {
    /// A duplicate of the file's descriptor (same open file description, same locks).
    file: File,
    ops: LockOps,
    set: LockSet,
    /// The process that took the locks. A `fork()`ed child shares the open file description,
    /// and with it the parent's locks: only the process that took them may drop them.
    owner: u32,
}

impl FileLock {
    /// Takes `set`'s locks on `file` (named `path` in errors) with `ops`: lock every byte of
    /// the set, then probe for conflicts; on a conflict every lock taken here is dropped again
    /// and the error names the first permission in conflict, as QEMU reports it.
    pub fn acquire(file: &File, path: &str, set: LockSet, ops: LockOps) -> Result<Self, LockError> {
        let file = file.try_clone().map_err(|source| LockError::Syscall {
            byte: PERM_BASE,
            source,
        })?;
        let lock = FileLock {
            file,
            ops,
            set,
            owner: std::process::id(),
        };
        // Dropping `lock` on an error path releases whatever was taken.
        lock.lock_all()?;
        lock.probe(path)?;
        Ok(lock)
    }

    /// Takes the lock for `mode` (nothing for `Off`, or where `auto` finds no OFD locks).
    pub fn for_mode(
        file: &File,
        path: &str,
        set: LockSet,
        mode: Locking,
    ) -> Result<Option<Self>, LockError> {
        match plan(mode, ofd_available()).0 {
            None => Ok(None),
            Some(ops) => Self::acquire(file, path, set, ops).map(Some),
        }
    }

    /// The permission set held.
    pub fn set(&self) -> LockSet {
        self.set
    }

    /// How the locks were taken.
    pub fn ops(&self) -> LockOps {
        self.ops
    }

    fn lock_all(&self) -> Result<(), LockError> {
        let fd = self.file.as_raw_fd();
        for byte in self.set.bytes() {
            self.ops.set(fd, libc::F_RDLCK, byte)?;
        }
        Ok(())
    }

    fn probe(&self, path: &str) -> Result<(), LockError> {
        let fd = self.file.as_raw_fd();
        for (i, perm) in self.set.held.bits_set() {
            if self.ops.taken_by_other(fd, SHARED_BASE + i)? {
                return Err(LockError::NotShared {
                    perm: perm.name(),
                    path: path.to_string(),
                    context: "".into(),
                });
            }
        }
        for (i, perm) in self.set.shared.complement().bits_set() {
            if self.ops.taken_by_other(fd, PERM_BASE + i)? {
                return Err(LockError::Held {
                    perm: perm.name(),
                    path: path.to_string(),
                    context: "".into(),
                });
            }
        }
        Ok(())
    }
}

impl Drop for FileLock {
    fn drop(&mut self) {
        if std::process::id() != self.owner {
            // A forked child letting go of its copy: the locks are its parent's too.
            return;
        }
        let fd = self.file.as_raw_fd();
        for byte in self.set.bytes() {
            // Nothing to do about a failure here: closing the last descriptor drops them too.
            let _ = self.ops.set(fd, libc::F_UNLCK, byte);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn temp_file(name: &str) -> (std::path::PathBuf, File) {
        let dir = std::env::temp_dir().join(format!("qcow2ovl-lock-{}-{name}", std::process::id()));
        let _ = std::fs::remove_file(&dir);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&dir)
            .unwrap();
        f.write_all(&[0u8; 512]).unwrap();
        (dir, f)
    }

    /// The bytes another open file description sees locked.
    fn locked_bytes(path: &std::path::Path) -> Vec<i64> {
        let f = File::open(path).unwrap();
        (100..105)
            .chain(200..205)
            .filter(|&b| LockOps::Ofd.taken_by_other(f.as_raw_fd(), b).unwrap())
            .collect()
    }

    #[test]
    fn sets_lock_qemus_bytes() {
        assert_eq!(LockSet::WRITABLE.bytes(), [100, 101, 103, 201, 203]);
        assert_eq!(LockSet::READ_ONLY.bytes(), [100, 201, 203]);
        assert_eq!(LockSet::METADATA_ONLY.bytes(), [201, 203]);
        assert_eq!(LockSet::FORCE_SHARE.bytes(), [100]);
        assert!(LockSet::FORCE_SHARE_METADATA.bytes().is_empty());
        assert_eq!(LockSet::DATA_FILE_WRITABLE.bytes(), [100, 101, 103, 203]);
        assert_eq!(LockSet::DATA_FILE_READ_ONLY.bytes(), [100, 203]);
        assert_eq!(LockSet::CREATE.bytes(), [101, 103, 203]);
    }

    #[test]
    fn two_writers_refuse_each_other_and_readers_share() {
        let (path, file) = temp_file("writers");
        let name = path.display().to_string();
        let first = FileLock::acquire(&file, &name, LockSet::WRITABLE, LockOps::Ofd).unwrap();
        assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);
        // A second open of the same file in this process is another open file description.
        let other = File::open(&path).unwrap();
        let err = FileLock::acquire(&other, &name, LockSet::WRITABLE, LockOps::Ofd).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!("Failed to get \"write\" lock\nIs another process using the image [{name}]?")
        );
        assert!(err.is_conflict());
        let err = FileLock::acquire(&other, &name, LockSet::READ_ONLY, LockOps::Ofd).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Failed to get shared \"write\" lock"));
        // The refused attempts left nothing behind.
        assert_eq!(locked_bytes(&path), [100, 101, 103, 201, 203]);
        // Force-share reads beside a writer.
        let shared = FileLock::acquire(&other, &name, LockSet::FORCE_SHARE, LockOps::Ofd).unwrap();
        drop(shared);
        drop(first);
        assert!(locked_bytes(&path).is_empty());
        let a = FileLock::acquire(&file, &name, LockSet::READ_ONLY, LockOps::Ofd).unwrap();
        let b = FileLock::acquire(&other, &name, LockSet::READ_ONLY, LockOps::Ofd).unwrap();
        let err = FileLock::acquire(
            &File::open(&path).unwrap(),
            &name,
            LockSet::WRITABLE,
            LockOps::Ofd,
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("Failed to get \"write\" lock"),
            "{err}"
        );
        drop((a, b));
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn posix_fallback_takes_the_same_bytes() {
        let (path, file) = temp_file("posix");
        let name = path.display().to_string();
        let lock = FileLock::acquire(&file, &name, LockSet::READ_ONLY, LockOps::Posix).unwrap();
        // OFD probes see POSIX locks of this process as locks of another owner.
        assert_eq!(locked_bytes(&path), [100, 201, 203]);
        drop(lock);
        assert!(locked_bytes(&path).is_empty());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn modes_and_their_words() {
        assert_eq!("auto".parse::<Locking>(), Ok(Locking::Auto));
        assert_eq!("on".parse::<Locking>(), Ok(Locking::On));
        assert_eq!("off".parse::<Locking>(), Ok(Locking::Off));
        assert_eq!(
            "maybe".parse::<Locking>(),
            Err("invalid parameter value: maybe".to_string())
        );
        assert_eq!(plan(Locking::Auto, true), (Some(LockOps::Ofd), None));
        assert_eq!(plan(Locking::On, true), (Some(LockOps::Ofd), None));
        assert_eq!(plan(Locking::Off, true), (None, None));
        assert_eq!(plan(Locking::Auto, false), (None, Some(NO_OFD_NOTICE)));
        assert_eq!(
            plan(Locking::On, false),
            (Some(LockOps::Posix), Some(POSIX_FALLBACK_WARNING))
        );
        assert!(ofd_available());
    }

    #[test]
    fn backing_file_errors_say_so() {
        let e = LockError::Held {
            perm: "write",
            path: "base.qcow2".into(),
            context: "".into(),
        }
        .in_backing_file();
        assert_eq!(
            e.to_string(),
            "Could not open backing file: Failed to get shared \"write\" lock\nIs another \
             process using the image [base.qcow2]?"
        );
    }
}
