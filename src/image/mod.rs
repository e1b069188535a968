//! The open image: metadata from the scan, the metadata map, guest reads, guarded writes,
//! snapshots, persistent bitmaps, check and repair.
//!
//! Folders by lifecycle, one concern per file, each adding an `impl` block on [`Image`]:
//!
//! | place | concern |
//! |---|---|
//! | `mod.rs` | open (locks first, see [`crate::lock`]), accessors; writer state is `Option<Mutex<Writer>>` |
//! | `error.rs` | [`ImageError`] and the [`ErrorKind`] the bindings map to exceptions |
//! | `read/` | guest reads: mapping, the L2 table cache, the backing chain and data file (at open when writable, else on first use), the reader thread, the guest map |
//! | `write/` | the `Writer` and guest writes, copy-on-write, zero/discard, resize, compressed writes, allocation, ordered flush, and the guard (the one owner of the overlap policy) |
//! | `snapshot/` | internal snapshots: create, apply, delete; the references counted and dropped, COPIED flags, the tables switched |
//! | `bitmaps/` | persistent dirty bitmaps kept true: put in use before the first change, marked by every change, stored at close; dirty extents |
//! | `check/` | `check` and `check -r`: report, recomputed counts, the walk, repair, rebuild |
//! | `crash_tests.rs`, `retry_tests.rs` | the writer crashed or failing at every storage write |

mod bitmaps;
mod check;
mod crypt;
mod error;
mod read;
mod snapshot;
mod write;

#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod crypt_tests;
#[cfg(test)]
mod retry_tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};

pub use check::{
    CheckReport, Finding, FindingKind, L2EntryAt, L2Position, Overlap, Owner, Repair, Severity,
    NEED_REBUILD,
};
pub use crypt::{DataCipher, IvFrom, Secret, SECTOR_SIZE};
pub use error::{ErrorKind, ImageError};
pub(crate) use read::backing::{
    is_protocol, probe as probe_backing_format, resolve as resolve_backing,
};
pub use read::{Backing, Extent, GuestExtent, Table, TableCache};
pub use write::guard::WriteKind;
pub use write::{Note, NoteLevel, Reservation};

use crate::format::{BitmapDirectoryEntry, Geometry, Header};
use crate::lock::{FileLock, LockSet, Locking};
pub(crate) use crate::overlap::NaiveLayout;
use crate::overlap::{MetadataMap, MetadataType, NaiveChecker};
use crate::problem::Problem;
use crate::scan::{scan, ScannedImage};
use crate::storage::{CacheMode, FileStorage, Storage};

/// L2 cache size when none is given: QEMU's default maximum (32 MiB), or less when that covers
/// the whole disk.
pub const DEFAULT_L2_CACHE_BYTES: u64 = 32 << 20;

/// How to open an image.
#[derive(Debug, Clone)]
pub struct OpenOptions {
    /// Open for writing (refused for corrupt images and images with overlapping metadata,
    /// unless `repair`). A dirty image (lazy refcounts) is repaired first, unless `repair`.
    pub writable: bool,
    /// Open for [`Image::repair`] (QEMU's `BDRV_O_CHECK`): a writable open is allowed for
    /// images marked corrupt, with overlapping metadata (the map still guards every write) or
    /// left dirty (not repaired at open: the caller repairs).
    pub repair: bool,
    /// The metadata types to track in the map (and so to read at open).
    pub enabled: MetadataType,
    /// Memory limit of the map in bytes; ranges past it are checked the naive way.
    pub map_limit: Option<usize>,
    /// Bytes of L2 tables to cache; [`DEFAULT_L2_CACHE_BYTES`] (capped at what the disk needs)
    /// when `None`. At least one table is always cached.
    pub cache_size: Option<u64>,
    /// Open a read-only view of this internal snapshot's disk (by id, else by name) instead of
    /// the active one.
    pub snapshot: Option<String>,
    /// How to lock the image file, its backing files and its data file (QEMU's `locking`).
    pub locking: Locking,
    /// Let other users hold every permission, writers included (QEMU's `force-share`, `-U`):
    /// read-only opens only.
    pub force_share: bool,
    /// The open reads the header and tables, never guest data (`qemu-img info`): it holds no
    /// permission, but still refuses to open beside a writer unless `force_share`.
    pub metadata_only: bool,
    /// When writes to the image file (and a writable data file) are made durable: QEMU's
    /// `cache=` mode. A flush, and so `close`, fsyncs unless [`CacheMode::Unsafe`].
    pub cache: CacheMode,
    /// How far down the backing chain the open goes (the whole chain by default).
    pub backing: BackingChain,
    /// The secret that unlocks an encrypted image's guest data (QEMU's `encrypt.key-secret`).
    /// Without it an encrypted image still opens, for its metadata only. Backing files are
    /// opened without it.
    pub secret: Option<Secret>,
}

/// How far down its backing chain an image is opened. Where the chain is cut, the image above
/// the cut reads as if it had no backing file: unallocated clusters read as zeros, and
/// copy-on-write of a partial cluster copies zeros. Only callers that never read there cut it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum BackingChain {
    /// Every backing file, as QEMU opens an image.
    #[default]
    Whole,
    /// No backing file (QEMU's `BDRV_O_NO_BACKING`): for changing the header's backing file
    /// name when that file may be missing (`qemu-img rebase -u`).
    None,
    /// The chain down to, and not including, the file at this canonical path: `qemu-img
    /// commit` reads the layers above its base while it holds the base open for writing.
    Above(PathBuf),
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            writable: false,
            repair: false,
            enabled: MetadataType::all(),
            map_limit: None,
            cache_size: None,
            snapshot: None,
            locking: Locking::Auto,
            force_share: false,
            metadata_only: false,
            cache: CacheMode::Writeback,
            backing: BackingChain::Whole,
            secret: None,
        }
    }
}

impl OpenOptions {
    /// The permissions an open with these options takes on the image file, as QEMU takes them
    /// for the same kind of open; force-share on a writable open is refused in QEMU's words.
    pub fn lock_set(&self) -> Result<LockSet, ImageError> {
        match (self.writable, self.force_share) {
            (true, true) => Err(ImageError::InvalidArgument(
                "force-share=on can only be used with read-only images".into(),
            )),
            (true, false) => Ok(LockSet::WRITABLE),
            (false, force) => Ok(LockSet::for_read(self.metadata_only, force)),
        }
    }
}

/// An open qcow2 image. `Send + Sync`: every method takes `&self`, and guest reads from several
/// threads proceed in parallel (the caches have their own short locks).
pub struct Image {
    /// The path it was opened from (`None` for in-memory storage); backing and data file names
    /// are resolved against its folder.
    path: Option<PathBuf>,
    storage: Arc<dyn Storage>,
    options: OpenOptions,
    scanned: ScannedImage,
    geometry: Geometry,
    l2_cache: TableCache,
    /// The active L1 table as it is now (the writer changes it).
    l1: RwLock<Vec<u64>>,
    /// The metadata map, kept exact through every allocation and free.
    map: RwLock<MetadataMap>,
    /// The virtual disk size (the writer changes it on resize).
    size: AtomicU64,
    /// The snapshot list as it is now (snapshot operations change it).
    snaps: RwLock<snapshot::SnapshotList>,
    /// Writer state; `None` for a read-only image, which can never write.
    writer: Option<Mutex<write::Writer>>,
    /// The backing chain and data file, opened on first use (see `read/backing.rs`).
    chain: Mutex<Option<Arc<read::backing::Chain>>>,
    /// Whether guest data is encrypted, and the cipher when it was unlocked at open.
    encryption: crypt::Encryption,
    /// The most recently decompressed cluster: `(L2 entry, bytes)`.
    last_decompressed: Mutex<Option<(u64, Arc<[u8]>)>>,
    /// Whether QEMU would call this image metadata-preallocated (`guest_map` only).
    preallocated: OnceLock<bool>,
    /// QEMU's naive checker, built only when the map's memory limit left ranges unchecked:
    /// there, and only there, checks fall back to it.
    fallback: RwLock<Option<NaiveChecker>>,
    /// QEMU's locks on the image file, held until the image is dropped (`None` for in-memory
    /// storage and `locking=off`). Declared last: fields drop in order, so the locks go only
    /// after everything else of the image.
    lock: Option<FileLock>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("writable", &self.options.writable)
            .field("virtual_size", &self.virtual_size())
            .finish_non_exhaustive()
    }
}

impl Image {
    /// Opens the image at `path`. Errors name the file.
    pub fn open(path: impl AsRef<Path>, options: OpenOptions) -> Result<Self, ImageError> {
        let path = path.as_ref();
        let name = path.display().to_string();
        Self::open_file(path, options).map_err(|e| e.in_file(&name))
    }

    /// Opens, locks, then reads: nothing of the file is read (or repaired) before its locks
    /// are taken. A writable image opens its backing chain and data file at once, so that
    /// their locks are held from the start (a writer of a backing file would change what this
    /// image's unallocated clusters read).
    fn open_file(path: &Path, options: OpenOptions) -> Result<Self, ImageError> {
        options.lock_set()?;
        let storage = FileStorage::open(path, options.writable)?.with_cache(options.cache);
        Self::open_locked(storage, &path.display().to_string(), Some(path), options)
    }

    /// Opens the image in an already open file (a descriptor handed over by a caller, say),
    /// locked exactly as [`Image::open`] locks a path; `name` names it in lock errors. Without
    /// a path, relative backing and data file names resolve against the current directory.
    pub fn from_file_storage(
        storage: FileStorage,
        name: &str,
        options: OpenOptions,
    ) -> Result<Self, ImageError> {
        Self::open_locked(storage, name, None, options)
    }

    fn open_locked(
        storage: FileStorage,
        name: &str,
        path: Option<&Path>,
        options: OpenOptions,
    ) -> Result<Self, ImageError> {
        let set = options.lock_set()?;
        let lock = FileLock::for_mode(storage.file(), name, set, options.locking)?;
        let mut image = Self::from_storage(Arc::new(storage), options)?;
        image.path = path.map(Path::to_path_buf);
        image.lock = lock;
        if image.writable() {
            image.chain()?;
        }
        Ok(image)
    }

    /// Opens an image held by any storage (no path: relative backing and data file names are
    /// resolved against the current directory).
    pub fn from_storage(
        storage: Arc<dyn Storage>,
        options: OpenOptions,
    ) -> Result<Self, ImageError> {
        let scanned = scan(storage.as_ref(), options.enabled, options.map_limit)?;
        if options.writable && !options.repair && scanned.header.is_corrupt() {
            return Err(ImageError::CorruptReadWrite);
        }
        if options.writable && !options.repair && scanned.blocks_writes {
            let first = scanned
                .problems
                .iter()
                .find(|p| p.blocks_writes())
                .map_or_else(String::new, |p| p.message.clone());
            return Err(ImageError::OverlappingMetadata(first));
        }
        let geometry = scanned
            .header
            .geometry()
            .ok_or_else(|| ImageError::Unsupported("invalid cluster size".into()))?;
        let mut scanned = scanned;
        let map = std::mem::replace(
            &mut scanned.map,
            MetadataMap::new(geometry.cluster_size(), MetadataType::empty(), None)?,
        );
        let active_l1 = std::mem::take(&mut scanned.l1_table);
        let mut l1 = active_l1.clone();
        let mut size = scanned.header.size;
        if let Some(wanted) = &options.snapshot {
            if options.writable {
                return Err(ImageError::Unsupported(
                    "A snapshot's disk can only be opened read-only".into(),
                ));
            }
            (l1, size) = snapshot_view(&scanned, storage.as_ref(), wanted)?;
        }
        let fallback = if map.unchecked_ranges().is_empty() {
            None
        } else {
            Some(
                NaiveChecker::new(
                    naive_layout(&scanned, &active_l1),
                    options.enabled,
                    Arc::clone(&storage),
                )
                .map_err(|e| ImageError::Unsupported(e.to_string()))?,
            )
        };
        let encryption = crypt::unlock(&scanned, storage.as_ref(), options.secret.as_ref())?;
        let l2_cache = TableCache::new(cache_tables(&scanned.header, geometry, options.cache_size));
        let writer = if options.writable {
            Some(Mutex::new(write::Writer::new(&scanned, geometry)?))
        } else {
            None
        };
        let snaps = snapshot::SnapshotList {
            entries: scanned.snapshots.clone(),
            table_bytes: scanned.snapshot_table_bytes,
        };
        let mut image = Image {
            path: None,
            storage,
            options,
            size: AtomicU64::new(size),
            snaps: RwLock::new(snaps),
            scanned,
            geometry,
            l2_cache,
            l1: RwLock::new(l1),
            map: RwLock::new(map),
            writer,
            chain: Mutex::new(None),
            encryption,
            last_decompressed: Mutex::new(None),
            preallocated: OnceLock::new(),
            fallback: RwLock::new(fallback),
            lock: None,
        };
        image.repair_if_dirty()?;
        Ok(image)
    }

    /// Whether the image was opened for writing.
    pub fn writable(&self) -> bool {
        self.options.writable
    }

    /// The permissions this image holds on its file, when it holds locks.
    pub fn lock_set(&self) -> Option<LockSet> {
        self.lock.as_ref().map(FileLock::set)
    }

    /// The path the image was opened from.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The parsed header.
    pub fn header(&self) -> &Header {
        &self.scanned.header
    }

    /// Cluster geometry.
    pub fn geometry(&self) -> Geometry {
        self.geometry
    }

    /// The virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// The persistent bitmaps.
    pub fn bitmaps(&self) -> &[BitmapDirectoryEntry] {
        &self.scanned.bitmaps
    }

    /// The metadata map (a read guard: hold it briefly).
    pub fn map(&self) -> RwLockReadGuard<'_, MetadataMap> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The refcount table as it is now: the writer's (it grows and moves) or the scanned one.
    pub(in crate::image) fn refcount_table(&self) -> Vec<u64> {
        match &self.writer {
            Some(w) => w
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .refcounts
                .table
                .clone(),
            None => self.scanned.refcount_table.clone(),
        }
    }

    /// A copy of the active L1 table as it is now.
    pub fn l1_table(&self) -> Vec<u64> {
        self.l1.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Problems found by the scan (at most 64 listed), and how many there were in all.
    pub fn problems(&self) -> (&[Problem], usize) {
        (&self.scanned.problems, self.scanned.problem_count)
    }

    /// The file length at open.
    pub fn file_len(&self) -> u64 {
        self.scanned.file_len
    }

    /// L2 tables the cache may hold.
    pub fn cache_tables(&self) -> usize {
        self.l2_cache.capacity()
    }
}

/// The L1 table and disk size of a view of the snapshot with id `wanted` (else the first with that name),
/// as QEMU finds snapshots.
fn snapshot_view(
    scanned: &ScannedImage,
    storage: &dyn Storage,
    wanted: &str,
) -> Result<(Vec<u64>, u64), ImageError> {
    let snap = &scanned.snapshots[snapshot::find(&scanned.snapshots, wanted)?];
    snap.check_l1_table(scanned.header.cluster_size())
        .map_err(|e| ImageError::Unsupported(format!("Failed to load snapshot: {e}")))?;
    let mut bytes = vec![0u8; snap.l1_table_bytes() as usize];
    storage.read_padded(snap.l1_table_offset, &mut bytes)?;
    // As `qemu-img convert -l` shows it: the image's current size, the snapshot's clusters
    // (past its own L1 table everything reads as zeros).
    Ok((crate::format::read_u64_table(&bytes), scanned.header.size))
}

/// L2 tables to cache: `cache_size` bytes (default [`DEFAULT_L2_CACHE_BYTES`], capped at what
/// maps the whole disk), at least one table.
fn cache_tables(header: &Header, geometry: Geometry, cache_size: Option<u64>) -> usize {
    let cs = geometry.cluster_size();
    let bytes = cache_size.unwrap_or_else(|| {
        let whole_disk = u64::from(header.l1_size).saturating_mul(cs);
        DEFAULT_L2_CACHE_BYTES.min(whole_disk)
    });
    usize::try_from(bytes / cs).unwrap_or(usize::MAX).max(1)
}

/// What QEMU would keep in memory for its naive check, from the scan and the live L1 table.
fn naive_layout(s: &ScannedImage, l1: &[u64]) -> NaiveLayout {
    let h = &s.header;
    NaiveLayout {
        cluster_size: h.cluster_size(),
        l1_table_offset: h.l1_table_offset,
        l1_table: l1.to_vec(),
        refcount_table_offset: h.refcount_table_offset,
        refcount_table: s.refcount_table.clone(),
        snapshots_offset: h.snapshots_offset,
        snapshots_size: s.snapshot_table_bytes,
        snapshots: s
            .snapshots
            .iter()
            .map(|e| (e.l1_table_offset, e.l1_size))
            .collect(),
        bitmap_directory: h.active_bitmaps_ext().map(|b| (b.dir_offset, b.dir_size)),
        bitmap_tables: s
            .bitmaps
            .iter()
            .map(|b| (b.table_offset, b.table_size))
            .collect(),
        crypto_header: h.crypto_header(),
    }
}

/// Test helpers shared by the engine's unit tests: images built in memory by the format layer.
#[cfg(test)]
pub(crate) mod testutil {
    use crate::format::entry::OFLAG_COPIED;

    /// Cluster size of the test images.
    pub const CS: u64 = 65536;

    /// An image held in memory, opened for repair (writable, corrupt and dirty images allowed).
    pub fn open_for_repair(
        bytes: Vec<u8>,
    ) -> (
        std::sync::Arc<crate::storage::MemStorage>,
        crate::image::Image,
    ) {
        let st = std::sync::Arc::new(crate::storage::MemStorage::new(bytes));
        let options = crate::image::OpenOptions {
            writable: true,
            repair: true,
            ..crate::image::OpenOptions::default()
        };
        let img = crate::image::Image::from_storage(st.clone(), options).unwrap();
        (st, img)
    }

    /// A new empty image of `size` bytes made by the create layer, in memory.
    pub fn created(size: u64) -> std::sync::Arc<crate::storage::MemStorage> {
        use crate::create::{plan, write_image, CreateOptions};
        let storage = std::sync::Arc::new(crate::storage::MemStorage::new(Vec::new()));
        let opts = CreateOptions {
            size,
            ..CreateOptions::default()
        };
        write_image(&plan(&opts).unwrap(), storage.as_ref(), None).unwrap();
        storage
    }

    /// `storage` opened alone (no backing chain), writable or not.
    pub fn open_alone(
        writable: bool,
        storage: &std::sync::Arc<crate::storage::MemStorage>,
    ) -> crate::image::Image {
        let options = crate::image::OpenOptions {
            writable,
            backing: crate::image::BackingChain::None,
            ..crate::image::OpenOptions::default()
        };
        let storage = std::sync::Arc::clone(storage) as std::sync::Arc<dyn crate::storage::Storage>;
        crate::image::Image::from_storage(storage, options).unwrap()
    }

    /// A v3 image of `size` bytes: header, reftable at cluster 1, refblock at 2, L1 at 3, and
    /// the L2 table of L1 index 0 at cluster 4 (with `l2` entries), data clusters after that.
    pub fn image(size: u64, l2: &[u64], data: &[(u64, u8)]) -> Vec<u8> {
        let clusters = 5 + data.len() as u64;
        let mut img = vec![0u8; (clusters * CS) as usize];
        let put32 = |img: &mut Vec<u8>, o: u64, v: u32| {
            img[o as usize..o as usize + 4].copy_from_slice(&v.to_be_bytes())
        };
        let put64 = |img: &mut Vec<u8>, o: u64, v: u64| {
            img[o as usize..o as usize + 8].copy_from_slice(&v.to_be_bytes())
        };
        img[0..4].copy_from_slice(b"QFI\xfb");
        put32(&mut img, 4, 3);
        put32(&mut img, 20, 16);
        put64(&mut img, 24, size);
        let l1_entries = size.div_ceil(CS * (CS / 8)).max(1);
        put32(&mut img, 36, l1_entries as u32);
        put64(&mut img, 40, 3 * CS);
        put64(&mut img, 48, CS);
        put32(&mut img, 56, 1);
        put32(&mut img, 96, 4);
        put32(&mut img, 100, 112);
        put64(&mut img, CS, 2 * CS);
        for c in 0..clusters {
            img[(2 * CS + c * 2 + 1) as usize] = 1;
        }
        put64(&mut img, 3 * CS, OFLAG_COPIED | (4 * CS));
        for (i, &e) in l2.iter().enumerate() {
            put64(&mut img, 4 * CS + 8 * i as u64, e);
        }
        for (k, &(_, byte)) in data.iter().enumerate() {
            let at = ((5 + k as u64) * CS) as usize;
            img[at..at + CS as usize].fill(byte);
        }
        img
    }
}

#[cfg(test)]
mod tests {
    use super::testutil::*;
    use super::*;
    use crate::storage::MemStorage;

    #[test]
    fn default_cache_covers_the_disk_up_to_32_mib() {
        let st = Arc::new(MemStorage::new(image(1 << 30, &[], &[])));
        let img = Image::from_storage(st, OpenOptions::default()).unwrap();
        // 1 GiB at 64 KiB clusters: 2 L2 tables map it all.
        assert_eq!(img.cache_tables(), 2);
        let st = Arc::new(MemStorage::new(image(1 << 30, &[], &[])));
        let small = OpenOptions {
            cache_size: Some(1),
            ..OpenOptions::default()
        };
        assert_eq!(Image::from_storage(st, small).unwrap().cache_tables(), 1);
    }

    #[test]
    fn writable_open_refuses_overlapping_metadata() {
        // L2 table pointer onto the refcount block (cluster 2).
        let mut bytes = image(1 << 30, &[], &[]);
        bytes[3 * CS as usize + 8..3 * CS as usize + 16].copy_from_slice(&(2 * CS).to_be_bytes());
        let rw = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        let err = Image::from_storage(Arc::new(MemStorage::new(bytes.clone())), rw).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::CorruptImage);
        assert!(err.to_string().contains("refcount block"), "{err}");
        let ro = Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default());
        assert_eq!(ro.unwrap().problems().1, 1);
    }
}
