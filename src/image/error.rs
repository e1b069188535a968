//! Errors of the open image, and the one classification the bindings map to exceptions.

use std::io;

use crate::format::{FormatError, MappingError};
use crate::lock::LockError;
use crate::overlap::MapError;
use crate::scan::ScanError;

/// What kind of failure an [`ImageError`] is. The bindings map each kind to one Python exception
/// class, in one place; nothing else decides how an error surfaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The image breaks the qcow2 format (`FormatError`, a `ValueError`).
    Format,
    /// The image is valid but uses something this library does not support.
    Unsupported,
    /// The image may not be opened as asked: its corrupt bit is set, or its metadata overlaps
    /// (`CorruptImageError`).
    CorruptImage,
    /// Metadata met during I/O is inconsistent (an unaligned table or cluster offset); the
    /// request fails with `EIO`.
    Corruption,
    /// A write was refused because it would have overwritten metadata (`MetadataOverlapError`).
    MetadataOverlap,
    /// A caller's argument is out of range (`ValueError`).
    InvalidArgument,
    /// Memory for a table could not be reserved (`MemoryError`).
    OutOfMemory,
    /// Another process (or another handle in this one) holds a lock that conflicts with this
    /// open (`LockError`, errno `EAGAIN`).
    Lock,
    /// A write-side operation on an image opened read-only (`ReadOnlyImageError`, an
    /// `OSError` with errno `EBADF`, as a write to a descriptor opened for reading).
    ReadOnly,
    /// No internal snapshot has the id or name asked for (`SnapshotNotFoundError`, a
    /// `LookupError`).
    SnapshotNotFound,
    /// A persistent bitmap cannot do what was asked: it is not there, it is inconsistent, its
    /// name is taken (`BitmapError`).
    Bitmap,
    /// An encrypted image's secret is wrong or missing, or its cipher cannot be used
    /// (`EncryptionError`).
    Encryption,
    /// An operating system error with this errno (`OSError` and its subclasses).
    Os(i32),
}

/// Why an image could not be opened, read or checked.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// An error about a named file; the message starts with the file name, as qemu-img's do.
    #[error("{path}: {source}")]
    File {
        /// The file the error is about, as the user (or the image's header) named it.
        path: String,
        /// What went wrong.
        source: Box<ImageError>,
    },
    /// The image is malformed, unsupported or unreadable.
    #[error(transparent)]
    Scan(#[from] ScanError),
    /// The corrupt bit is set and a read-write open was asked for.
    #[error("Image is corrupt; cannot be opened read/write")]
    CorruptReadWrite,
    /// A write-side operation on an image opened read-only; names what was asked.
    #[error("Block node is read-only: {0}() needs an image opened with writable=True")]
    ReadOnly(&'static str),
    /// No snapshot has this id or name.
    #[error("Can't find snapshot '{0}'")]
    SnapshotNotFound(String),
    /// The image was left dirty by lazy refcounts and the repair at a writable open could not
    /// make it consistent (`CorruptImageError`).
    #[error("{0}; cannot be opened read/write")]
    CannotOpenDirty(String),
    /// Metadata structures share clusters; writing would destroy one of them.
    #[error("Image has overlapping metadata ({0}); cannot be opened read/write")]
    OverlappingMetadata(String),
    /// A check's range is out of bounds.
    #[error(transparent)]
    Map(#[from] MapError),
    /// A guest request lies outside the virtual disk.
    #[error(
        "{what} out of range: offset {offset} + length {length} exceeds the virtual size {size}"
    )]
    OutOfRange {
        /// Which request.
        what: &'static str,
        /// The requested guest offset.
        offset: u64,
        /// The requested length.
        length: u64,
        /// The virtual disk size.
        size: u64,
    },
    /// An operation this image cannot do (encrypted guest data, a backing format we cannot
    /// read, ...).
    #[error("{0}")]
    Unsupported(String),
    /// The secret of an encrypted image is wrong or missing, or its encryption cannot be used
    /// as asked (QEMU's words where it has them).
    #[error("{0}")]
    Encryption(String),
    /// A persistent bitmap cannot do what was asked (QEMU's words).
    #[error("{0}")]
    Bitmap(String),
    /// Inconsistent metadata found while serving a request.
    #[error("{0}")]
    Corruption(String),
    /// A caller's argument is not acceptable (a snapshot name that is taken, too long, ...).
    #[error("{0}")]
    InvalidArgument(String),
    /// A write would have landed on metadata: refused, and the image marked corrupt.
    #[error("{message}")]
    MetadataOverlap {
        /// QEMU's words: `Preventing invalid write on metadata (overlaps with <name>)`.
        message: String,
        /// Host offset of the refused write.
        offset: u64,
        /// Its length.
        size: u64,
        /// The metadata types it would have overwritten.
        types: crate::overlap::MetadataType,
    },
    /// The backing chain leads back to an image already in it.
    #[error("Backing file chain loop: {0}")]
    BackingLoop(String),
    /// A file is locked by another user in a way that conflicts with this open.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// An allocation for a table failed.
    #[error("cannot allocate {0} bytes")]
    OutOfMemory(usize),
    /// A long operation stopped because its caller asked it to (its progress callback said
    /// so).
    #[error("cancelled")]
    Cancelled,
    /// An operating system error.
    #[error("{}", io_message(.0))]
    Io(#[from] io::Error),
}

/// The text of an I/O error without Rust's ` (os error N)` suffix (the errno travels separately).
fn io_message(e: &io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error") {
        Some(cut) => text[..cut].to_string(),
        None => text,
    }
}

impl ImageError {
    /// The kind the bindings map to an exception class.
    pub fn kind(&self) -> ErrorKind {
        match self {
            ImageError::File { source, .. } => source.kind(),
            ImageError::Scan(ScanError::Format(f)) if f.is_unsupported() => ErrorKind::Unsupported,
            ImageError::Scan(ScanError::Format(_) | ScanError::Inconsistent(_)) => {
                ErrorKind::Format
            }
            ImageError::Scan(ScanError::Io { source, .. }) => io_kind(source),
            ImageError::Scan(ScanError::Map(_)) | ImageError::Map(_) => ErrorKind::InvalidArgument,
            ImageError::Scan(ScanError::OutOfMemory(_)) | ImageError::OutOfMemory(_) => {
                ErrorKind::OutOfMemory
            }
            ImageError::ReadOnly(_) => ErrorKind::ReadOnly,
            ImageError::SnapshotNotFound(_) => ErrorKind::SnapshotNotFound,
            ImageError::CorruptReadWrite
            | ImageError::OverlappingMetadata(_)
            | ImageError::CannotOpenDirty(_) => ErrorKind::CorruptImage,
            ImageError::OutOfRange { .. }
            | ImageError::InvalidArgument(_)
            | ImageError::Cancelled => ErrorKind::InvalidArgument,
            ImageError::Unsupported(_) => ErrorKind::Unsupported,
            ImageError::Bitmap(_) => ErrorKind::Bitmap,
            ImageError::Encryption(_) => ErrorKind::Encryption,
            ImageError::Corruption(_) => ErrorKind::Corruption,
            ImageError::MetadataOverlap { .. } => ErrorKind::MetadataOverlap,
            ImageError::BackingLoop(_) => ErrorKind::Format,
            ImageError::Lock(LockError::Syscall { source, .. }) => io_kind(source),
            ImageError::Lock(_) => ErrorKind::Lock,
            ImageError::Io(e) => io_kind(e),
        }
    }

    /// The lock conflict behind this error, if it is one.
    pub fn lock_error(&self) -> Option<&LockError> {
        match self {
            ImageError::File { source, .. } => source.lock_error(),
            ImageError::Lock(e) => Some(e),
            _ => None,
        }
    }

    /// The file this error names, if any (the outermost one).
    pub fn path(&self) -> Option<&str> {
        match self {
            ImageError::File { path, .. } => Some(path),
            _ => None,
        }
    }

    /// The message without the file name prefix.
    pub fn message(&self) -> String {
        match self {
            ImageError::File { source, .. } => source.to_string(),
            other => other.to_string(),
        }
    }

    /// Wraps `self` with the file it is about, unless it already names one.
    pub fn in_file(self, path: &str) -> ImageError {
        match self {
            e @ ImageError::File { .. } => e,
            e => ImageError::File {
                path: path.to_string(),
                source: Box::new(e),
            },
        }
    }
}

/// The errno of an I/O error (`EIO` when it carries none).
fn io_kind(e: &io::Error) -> ErrorKind {
    ErrorKind::Os(e.raw_os_error().unwrap_or(match e.kind() {
        io::ErrorKind::NotFound => libc::ENOENT,
        io::ErrorKind::PermissionDenied => libc::EACCES,
        io::ErrorKind::InvalidInput => libc::EINVAL,
        io::ErrorKind::AlreadyExists => libc::EEXIST,
        _ => libc::EIO,
    }))
}

impl From<FormatError> for ImageError {
    fn from(e: FormatError) -> Self {
        ImageError::Scan(ScanError::Format(e))
    }
}

impl From<MappingError> for ImageError {
    fn from(e: MappingError) -> Self {
        ImageError::Corruption(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_file_names() {
        let e = ImageError::Io(io::Error::from_raw_os_error(libc::EISDIR)).in_file("d");
        assert_eq!(e.kind(), ErrorKind::Os(libc::EISDIR));
        assert_eq!(e.to_string(), "d: Is a directory");
        assert_eq!(e.path(), Some("d"));
        assert_eq!(e.message(), "Is a directory");
        let twice = e.in_file("other");
        assert_eq!(twice.path(), Some("d"));
        assert_eq!(
            ImageError::Unsupported("x".into()).kind(),
            ErrorKind::Unsupported
        );
        assert_eq!(ImageError::ReadOnly("write").kind(), ErrorKind::ReadOnly);
        assert!(ImageError::ReadOnly("write")
            .to_string()
            .starts_with("Block node is read-only"));
        assert_eq!(
            ImageError::SnapshotNotFound("x".into()).kind(),
            ErrorKind::SnapshotNotFound
        );
        let custom = ImageError::Io(io::Error::new(io::ErrorKind::NotFound, "gone"));
        assert_eq!(custom.kind(), ErrorKind::Os(libc::ENOENT));
    }
}
