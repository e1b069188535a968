//! The scan state: the map being filled, the problems found on the way, and the budgets that
//! bound what a file can make the scan enter and read; entering one structure (a range or a
//! single cluster) into the map, a structure the map cannot hold or one that lands on another
//! becoming a problem.

use crate::format::{ClusterCount, HostOffset};
use crate::overlap::{MetadataMap, MetadataType};
use crate::problem::{Problem, ProblemKind};
use crate::storage::Storage;

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
    /// Snapshot L1 bytes (holding data) that may still be read (see
    /// [`Scanner::read_snapshot_l1`]).
    pub(super) l1_read_budget: u64,
}

impl Scanner<'_> {
    pub(super) fn read(
        &self,
        offset: u64,
        len: u64,
        what: &'static str,
    ) -> Result<Vec<u8>, ScanError> {
        read_table(self.storage, offset, len, what)
    }

    pub(super) fn problem(&mut self, kind: ProblemKind, offset: u64, size: u64, message: String) {
        let problem = Problem {
            kind,
            offset: HostOffset(offset),
            size,
            message,
        };
        self.problem_count += 1;
        self.blocks_writes |= problem.blocks_writes();
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
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
                let message = format!(
                    "{} at {offset:#x} overlaps {} at {:#x}",
                    what(),
                    existing.message_name().unwrap_or("metadata"),
                    at.0
                );
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
                let message = format!("{} at {offset:#x} cannot be mapped: {e}", what());
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
            self.problem(
                ProblemKind::Unaligned,
                offset,
                len,
                format!("{what} at {offset:#x} is not cluster-aligned"),
            );
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
            let message = format!("{} offset {offset:#x} is not cluster-aligned", what());
            self.problem(ProblemKind::Unaligned, offset, self.cs, message);
            return;
        }
        if offset >= self.file_len {
            let message = format!(
                "{} at {offset:#x} lies beyond the end of the file ({:#x})",
                what(),
                self.file_len
            );
            self.problem(ProblemKind::BeyondEnd, offset, self.cs, message);
        }
        self.enter(offset, 1, types, &what);
    }
}
