//! Problems found in an image's metadata, as values: what kind, where, how large, and a message
//! in QEMU's style. The scanner reports them at open; the engine's corruption handling reports
//! the same shape (`message, offset, size, fatal`).

use crate::format::HostOffset;
use crate::overlap::MetadataType;

/// What is wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProblemKind {
    /// A table or table pointer is not cluster-aligned.
    Unaligned,
    /// A table pointer lies beyond the end of the file.
    BeyondEnd,
    /// A structure ends past 2^56, where no host offset may lie.
    Unmappable,
    /// Two metadata structures share a cluster (`existing` was there before `new` arrived).
    MetadataOverlap {
        /// Types already in the cluster.
        existing: MetadataType,
        /// Types of the structure entered on top of them.
        new: MetadataType,
    },
    /// A snapshot's L1 table breaks QEMU's limits; QEMU opens the image and fails only when the
    /// snapshot is used. Its L2 tables cannot be located, so they cannot be protected.
    UnusableSnapshot,
}

impl ProblemKind {
    /// Whether a writer must refuse an image with a problem of this kind: writing could
    /// destroy one of two structures that share a cluster, or land on tables that cannot be
    /// located.
    pub fn blocks_writes(self) -> bool {
        matches!(
            self,
            ProblemKind::MetadataOverlap { .. } | ProblemKind::UnusableSnapshot
        )
    }
}

/// One problem: kind, host range and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// What is wrong.
    pub kind: ProblemKind,
    /// Host offset of the structure or pointer concerned.
    pub offset: HostOffset,
    /// Bytes concerned (a cluster for table pointers).
    pub size: u64,
    /// The message, naming the structure (`L2 table (L1 index 3) at 0x50200 is not
    /// cluster-aligned`).
    pub message: String,
}

impl Problem {
    /// Whether a writer must refuse the image: writing could destroy one of two structures that
    /// share a cluster, or land on tables that cannot be located.
    pub fn blocks_writes(&self) -> bool {
        self.kind.blocks_writes()
    }

    /// The kind's short name, for bindings and JSON (`unaligned`, `beyond-end`, ...).
    pub fn kind_name(&self) -> &'static str {
        match self.kind {
            ProblemKind::Unaligned => "unaligned",
            ProblemKind::BeyondEnd => "beyond-end",
            ProblemKind::Unmappable => "unmappable",
            ProblemKind::MetadataOverlap { .. } => "metadata-overlap",
            ProblemKind::UnusableSnapshot => "unusable-snapshot",
        }
    }
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}
