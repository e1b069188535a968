//! The snapshot table and, when inactive L2 tables are tracked, every snapshot's L1 table: read
//! only where the file holds data, in bounded chunks, within the scan's read budget.

use std::collections::HashSet;

use crate::format::entry::L1Entry;
use crate::format::limits::MAX_SNAPSHOT_TABLE_BYTES;
use crate::format::{parse_snapshot_table, Header, SnapshotEntry};
use crate::overlap::MetadataType;
use crate::problem::ProblemKind;

use super::{ScanError, Scanner};

/// Upper bound of one snapshot table entry: fixed part, extra data, id and name, padding.
const MAX_SNAPSHOT_ENTRY: u64 = 40 + 1024 + 2 * 65535 + 7;

impl Scanner<'_> {
    /// Reads the snapshot table and, when inactive L2 tables are tracked, every snapshot L1 table.
    pub(super) fn scan_snapshots(
        &mut self,
        header: &Header,
        enabled: MetadataType,
    ) -> Result<(Vec<SnapshotEntry>, u64), ScanError> {
        if header.nb_snapshots == 0 {
            return Ok((Vec::new(), 0));
        }
        // Entries have variable length; read the most the table can span (at most 64 MiB).
        // Past the end of the file every entry is zeros: 40 bytes each. So the buffer needs the
        // part in the file, one entry running out of it, and 40 bytes per remaining entry.
        let nb = u64::from(header.nb_snapshots);
        let in_file = self.file_len.saturating_sub(header.snapshots_offset);
        let bound = (nb * MAX_SNAPSHOT_ENTRY)
            .min(in_file + MAX_SNAPSHOT_ENTRY + nb * 40)
            .min(MAX_SNAPSHOT_TABLE_BYTES);
        let buf = self.read(header.snapshots_offset, bound, "the snapshot table")?;
        let (snapshots, table_bytes) =
            parse_snapshot_table(&buf, header.nb_snapshots, header.version)?;
        drop(buf);
        self.put(
            header.snapshots_offset,
            table_bytes,
            MetadataType::SNAPSHOT_TABLE,
            "the snapshot table",
        )?;

        let mut seen: HashSet<(u64, u32)> = HashSet::new();
        for (i, snap) in snapshots.iter().enumerate() {
            // QEMU opens an image whose snapshot L1 table breaks its limits and refuses only to
            // use that snapshot; so do we, with a problem that keeps writers away (its L2 tables
            // cannot be located, so they cannot be protected).
            if let Err(e) = snap.check_l1_table(self.cs) {
                self.problem(
                    ProblemKind::UnusableSnapshot,
                    snap.l1_table_offset,
                    snap.l1_table_bytes(),
                    || format!("Snapshot {i} ('{}'): {e}", snap.id),
                );
                continue;
            }
            let bytes = snap.l1_table_bytes();
            let what = format!("the L1 table of snapshot {i} ('{}')", snap.id);
            self.put(
                snap.l1_table_offset,
                bytes,
                MetadataType::INACTIVE_L1,
                &what,
            )?;
            if enabled.contains(MetadataType::INACTIVE_L2)
                && seen.insert((snap.l1_table_offset, snap.l1_size))
            {
                self.read_snapshot_l1(i, snap.l1_table_offset, bytes)?;
            }
        }
        Ok((snapshots, table_bytes))
    }

    /// Enters the L2 tables that the snapshot L1 table at `[offset, offset + bytes)` references,
    /// reading only where the file holds data ([`Scanner::for_each_table_entry`]).
    fn read_snapshot_l1(&mut self, index: usize, offset: u64, bytes: u64) -> Result<(), ScanError> {
        let overlap = || format!("Snapshot L1 tables overlap: snapshot {index}");
        self.for_each_table_entry(offset, bytes, "a snapshot L1 table", &overlap, |s, j, e| {
            let ofs = L1Entry(e).l2_offset().0;
            if ofs != 0 {
                s.put_cluster(ofs, MetadataType::INACTIVE_L2, || {
                    format!("L2 table of snapshot {index} (L1 index {j})")
                });
            }
            Ok(())
        })
    }
}
