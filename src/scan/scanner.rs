//! The scan state: the map being filled, the problems found on the way, and the budgets that
//! bound what a file can make the scan enter and read; entering one structure (a range or a
//! single cluster) into the map, a structure the map cannot hold or one that lands on another
//! becoming a problem.

use crate::format::{read_u64_table, ClusterCount, HostOffset};
use crate::overlap::{MetadataMap, MetadataType};
use crate::problem::{Problem, ProblemKind};
use crate::storage::{table_data_chunks, Storage};

use super::{read_table, ScanError, MAX_PROBLEMS};

/// Scan state: the map being filled and the problems found.
pub(super) struct Scanner<'a> {
    pub(super) storage: &'a dyn Storage,
    pub(super) file_len: u64,
    pub(super) cs: u64,
    pub(super) map: MetadataMap,
    pub(super) problems: Vec<Problem>,
    pub(super) problem_count: usize,
    pub(super) blocks_writes: bool,
    /// Clusters that multi-cluster structures may still claim (see [`Scanner::put`]).
    pub(super) range_budget: u64,
    /// Bytes of sparse tables (snapshot L1 tables, bitmap tables) holding data that may still
    /// be read (see [`Scanner::for_each_table_entry`]).
    pub(super) table_read_budget: u64,
}

/// Bytes of a sparse table read at a time.
const TABLE_READ_CHUNK: u64 = 1 << 20;

impl Scanner<'_> {
    /// Calls `f` with the index and value of every entry of the table of 8-byte entries at
    /// `[offset, offset + bytes)` that lies where the file holds data; entries in holes and
    /// past the end of the file are zeros and are skipped.
    ///
    /// The table is read in bounded chunks, and every byte read is charged to the scan's table
    /// read budget: distinct tables occupy distinct clusters of a valid file, so the data read
    /// for all of them together cannot exceed what the file has allocated. More means tables
    /// overlap (reading them would cost without bound), reported after `overlap()`'s words.
    pub(super) fn for_each_table_entry(
        &mut self,
        offset: u64,
        bytes: u64,
        what: &'static str,
        overlap: &dyn Fn() -> String,
        mut f: impl FnMut(&mut Self, u64, u64) -> Result<(), ScanError>,
    ) -> Result<(), ScanError> {
        let end = offset.saturating_add(bytes).min(self.file_len);
        let storage = self.storage;
        let mut buf = Vec::new();
        for chunk in table_data_chunks(
            storage,
            offset,
            end.saturating_sub(offset),
            TABLE_READ_CHUNK,
        ) {
            let (pos, n) = chunk.map_err(|source| ScanError::Io { what, source })?;
            self.table_read_budget = self.table_read_budget.checked_sub(n).ok_or_else(|| {
                ScanError::Inconsistent(format!(
                    "{} brings the data read from tables past the {} bytes the file holds",
                    overlap(),
                    storage.allocated_bytes().unwrap_or(self.file_len)
                ))
            })?;
            buf.clear();
            buf.resize(n as usize, 0);
            storage
                .read_padded(pos, &mut buf)
                .map_err(|source| ScanError::Io { what, source })?;
            for (k, e) in read_u64_table(&buf).into_iter().enumerate() {
                f(self, (pos - offset) / 8 + k as u64, e)?;
            }
        }
        Ok(())
    }

    pub(super) fn read(
        &self,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, ScanError> {
        read_table(self.storage, offset, len, what)
    }

    /// Counts a problem, and keeps it while fewer than [`MAX_PROBLEMS`] are kept; `message` is
    /// made only then (a file can hold millions of the same problem).
    pub(super) fn problem(
        &mut self,
        kind: ProblemKind,
        offset: u64,
        size: u64,
        message: impl FnOnce() -> String,
    ) {
        self.problem_count += 1;
        self.blocks_writes |= kind.blocks_writes();
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(Problem {
                kind,
                offset: HostOffset(offset),
                size,
                message: message(),
            });
        }
    }

    /// Enters `clusters` clusters at `offset` into the map, reporting a structure that lands on
    /// another one it may not share clusters with.
    pub(super) fn enter(
        &mut self,
        offset: u64,
        clusters: u64,
        types: MetadataType,
        what: &dyn Fn() -> String,
    ) {
        match self
            .map
            .enter(HostOffset(offset), ClusterCount(clusters), types)
        {
            Ok(None) => {}
            Ok(Some((at, existing))) => {
                let message = || {
                    format!(
                        "{} at {offset:#x} overlaps {} at {:#x}",
                        what(),
                        existing.message_name().unwrap_or("metadata"),
                        at.0
                    )
                };
                self.problem(
                    ProblemKind::MetadataOverlap {
                        existing,
                        new: types,
                    },
                    at.0,
                    self.cs,
                    message,
                );
            }
            Err(e) => {
                let message = || format!("{} at {offset:#x} cannot be mapped: {e}", what());
                self.problem(ProblemKind::Unmappable, offset, clusters * self.cs, message);
            }
        }
    }

    /// Enters `[offset, offset + len)`, rounded out to clusters, as `types`. A structure the map
    /// cannot hold (unaligned or past 2^56) becomes a problem instead.
    ///
    /// The clusters entered this way are charged to [`Scanner::range_budget`]: in a valid image
    /// the tables, snapshot L1 tables and bitmap tables are distinct clusters of the file, so
    /// together they cannot span (much) more than the file. Without the budget, a header could
    /// declare 65536 snapshots with 32 MiB L1 tables each and make the scan enter billions of
    /// clusters.
    pub(super) fn put(
        &mut self,
        offset: u64,
        len: u64,
        types: MetadataType,
        what: &str,
    ) -> Result<(), ScanError> {
        if len == 0 {
            return Ok(());
        }
        if offset % self.cs != 0 {
            self.problem(ProblemKind::Unaligned, offset, len, || {
                format!("{what} at {offset:#x} is not cluster-aligned")
            });
            return Ok(());
        }
        let clusters = len.div_ceil(self.cs);
        self.range_budget = self.range_budget.checked_sub(clusters).ok_or_else(|| {
            ScanError::Inconsistent(format!(
                "Metadata structures span more clusters than the file holds: {what} at \
                 {offset:#x} ({clusters} clusters) overlaps others or lies far beyond the end \
                 of the file ({} bytes)",
                self.file_len
            ))
        })?;
        let name = || what.to_string();
        self.enter(offset, clusters, types, &name);
        Ok(())
    }

    /// Enters the single cluster at `offset` (a table pointer from an L1, snapshot L1 or refcount
    /// table entry), noting pointers that are unaligned or beyond the end of the file.
    pub(super) fn put_cluster(
        &mut self,
        offset: u64,
        types: MetadataType,
        what: impl Fn() -> String,
    ) {
        if offset % self.cs != 0 {
            let message = || format!("{} offset {offset:#x} is not cluster-aligned", what());
            self.problem(ProblemKind::Unaligned, offset, self.cs, message);
            return;
        }
        if offset >= self.file_len {
            let file_len = self.file_len;
            let message = || {
                format!(
                    "{} at {offset:#x} lies beyond the end of the file ({file_len:#x})",
                    what()
                )
            };
            self.problem(ProblemKind::BeyondEnd, offset, self.cs, message);
        }
        self.enter(offset, 1, types, &what);
    }
}
