//! The internal snapshot table.
//!
//! The table is a run of variable-length entries starting at `snapshots_offset`; each entry
//! starts 8-aligned: a 40-byte fixed part, `extra_data_size` bytes of extra data, the ID string,
//! the name, then padding. Known extra data fields are `vm_state_size_large`, `disk_size` and
//! `icount` (8 bytes each, in that order); version 3 requires at least the first two.

use super::be;
use super::error::{fit, FormatError, TableKind};
use super::limits::{
    validate_table, MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_SNAPSHOT_EXTRA_DATA, MAX_SNAPSHOT_TABLE_BYTES,
    SNAPSHOT_HEADER_SIZE,
};

/// Extra data bytes version 3 requires (`vm_state_size_large` and `disk_size`).
pub const V3_MIN_EXTRA_DATA: u32 = 16;
/// `icount` value meaning "record/replay was off".
pub const ICOUNT_DISABLED: u64 = u64::MAX;

/// One snapshot table entry.
///
/// The known extra fields are `Some` when the entry's extra data covers them; `extra_unknown`
/// holds the extra bytes after the last known field present, so that `extra_data_size` and the
/// bytes round-trip exactly.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SnapshotEntry {
    /// Cluster-aligned offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries in the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique ID string.
    pub id: String,
    /// Name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time at creation, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state size (32-bit field; superseded by `vm_state_size_large` when present).
    pub vm_state_size: u32,
    /// 64-bit VM state size (extra bytes 0–7).
    pub vm_state_size_large: Option<u64>,
    /// Virtual disk size at snapshot time (extra bytes 8–15).
    pub disk_size: Option<u64>,
    /// Record/replay instruction count (extra bytes 16–23); [`ICOUNT_DISABLED`] if off.
    pub icount: Option<u64>,
    /// Extra data bytes after the known fields, kept verbatim.
    pub extra_unknown: Vec<u8>,
}

impl SnapshotEntry {
    /// Known extra fields in on-disk order, up to the first absent one.
    fn known_extra(&self) -> impl Iterator<Item = u64> {
        [self.vm_state_size_large, self.disk_size, self.icount]
            .into_iter()
            .map_while(|f| f)
    }

    /// The entry's `extra_data_size`.
    pub fn extra_data_size(&self) -> u32 {
        u32::try_from(self.known_extra().count() * 8 + self.extra_unknown.len()).unwrap_or(u32::MAX)
    }

    /// The effective VM state size: the 64-bit field when present, else the 32-bit one.
    pub fn vm_state_bytes(&self) -> u64 {
        self.vm_state_size_large
            .unwrap_or(u64::from(self.vm_state_size))
    }

    /// Whether the entry has the extra data version 3 requires. QEMU opens version 3 images
    /// whose entries lack it; only `qemu-img check` reports them (`snapshot table entry N is
    /// incomplete`), so parsing does not fail on this.
    pub fn has_v3_extra_data(&self) -> bool {
        self.extra_data_size() >= V3_MIN_EXTRA_DATA
    }

    /// The entry as QEMU writes it back whenever it rewrites the snapshot table: all three known
    /// extra fields present, the missing ones filled in (the 64-bit VM state size from the
    /// 32-bit one, `disk_size` with the image's size when it was opened, `icount` "off").
    /// Unknown extra bytes survive only after a whole `icount`; before it they were part of a
    /// truncated field.
    pub fn completed(mut self, disk_size: u64) -> SnapshotEntry {
        self.vm_state_size_large = Some(self.vm_state_bytes());
        self.disk_size.get_or_insert(disk_size);
        if self.icount.is_none() {
            self.icount = Some(ICOUNT_DISABLED);
            self.extra_unknown.clear();
        }
        self
    }

    /// Size of the entry on disk, without trailing padding.
    pub fn unpadded_size(&self) -> u64 {
        SNAPSHOT_HEADER_SIZE
            + u64::from(self.extra_data_size())
            + self.id.len() as u64
            + self.name.len() as u64
    }

    /// Bytes of the snapshot's L1 table.
    pub fn l1_table_bytes(&self) -> u64 {
        u64::from(self.l1_size) * 8
    }

    /// QEMU's check before using a snapshot's L1 table: at most 32 MiB (`Snapshot L1 table too
    /// large`), cluster-aligned and ending below 2^63 (`Snapshot L1 table offset invalid`).
    pub fn check_l1_table(&self, cluster_size: u64) -> Result<(), FormatError> {
        validate_table(
            TableKind::SnapshotL1,
            self.l1_table_offset,
            u64::from(self.l1_size),
            8,
            MAX_L1_BYTES,
            cluster_size,
        )
    }

    /// Appends the entry (8-aligned start assumed, no trailing padding) to `out`. Refuses an
    /// id or name longer than 65535 bytes and more than 1024 bytes of extra data (QEMU's limit)
    /// instead of truncating their lengths; `out` is unchanged on error.
    pub fn serialize_into(&self, out: &mut Vec<u8>) -> Result<(), FormatError> {
        let id_len = fit("snapshot id", self.id.len(), u64::from(u16::MAX))? as u16;
        let name_len = fit("snapshot name", self.name.len(), u64::from(u16::MAX))? as u16;
        let extra = self.known_extra().count() * 8 + self.extra_unknown.len();
        fit(
            "snapshot extra data",
            extra,
            u64::from(MAX_SNAPSHOT_EXTRA_DATA),
        )?;
        self.write_fields(out, id_len, name_len);
        Ok(())
    }

    /// Appends the entry with the given length fields, unchecked (tests build malformed tables
    /// with it).
    pub(crate) fn write_fields(&self, out: &mut Vec<u8>, id_len: u16, name_len: u16) {
        out.extend_from_slice(&self.l1_table_offset.to_be_bytes());
        out.extend_from_slice(&self.l1_size.to_be_bytes());
        out.extend_from_slice(&id_len.to_be_bytes());
        out.extend_from_slice(&name_len.to_be_bytes());
        out.extend_from_slice(&self.date_sec.to_be_bytes());
        out.extend_from_slice(&self.date_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_clock_nsec.to_be_bytes());
        out.extend_from_slice(&self.vm_state_size.to_be_bytes());
        out.extend_from_slice(&self.extra_data_size().to_be_bytes());
        for field in self.known_extra() {
            out.extend_from_slice(&field.to_be_bytes());
        }
        out.extend_from_slice(&self.extra_unknown);
        out.extend_from_slice(self.id.as_bytes());
        out.extend_from_slice(self.name.as_bytes());
    }
}

/// Parses `nb_snapshots` entries from `buf`, which starts at `snapshots_offset`.
///
/// Returns the entries and the table's length in bytes (up to the end of the last entry,
/// without its padding), which is the extent QEMU records and frees for the table. Checks as
/// QEMU's open does: at most 65536 entries, at most 1024 bytes of extra data per entry (`Too
/// much extra metadata in snapshot table entry N`), at most 64 MiB in total (`Snapshot table is
/// too big`). Entries whose L1 table is invalid are returned; see
/// [`SnapshotEntry::check_l1_table`]. `version` is accepted for symmetry with the header:
/// QEMU opens version 3 entries with less than 16 bytes of extra data, and so do we.
pub fn parse_snapshot_table(
    buf: &[u8],
    nb_snapshots: u32,
    version: u32,
) -> Result<(Vec<SnapshotEntry>, u64), FormatError> {
    let _ = version;
    if u64::from(nb_snapshots) > MAX_SNAPSHOTS {
        return Err(FormatError::TableTooLarge {
            table: TableKind::SnapshotTable,
            entries: u64::from(nb_snapshots),
            entry_size: SNAPSHOT_HEADER_SIZE,
            max_bytes: SNAPSHOT_HEADER_SIZE * MAX_SNAPSHOTS,
        });
    }
    let mut entries = Vec::with_capacity(nb_snapshots.min(1024) as usize);
    let mut end: u64 = 0;
    for index in 0..nb_snapshots {
        let start = be::align8(end).unwrap_or(u64::MAX);
        let what = || format!("snapshot table entry {index}");
        let at = |rel: u64| be::usize_sat(start.saturating_add(rel));
        let fixed_end = start.saturating_add(SNAPSHOT_HEADER_SIZE);
        let fixed = buf
            .get(at(0)..be::usize_sat(fixed_end))
            .ok_or_else(|| FormatError::truncated(what(), fixed_end, buf.len()))?;
        let u16_at = |o| be::u16_at(fixed, o).unwrap_or(0);
        let u32_at = |o| be::u32_at(fixed, o).unwrap_or(0);
        let u64_at = |o| be::u64_at(fixed, o).unwrap_or(0);
        let id_len = u64::from(u16_at(12));
        let name_len = u64::from(u16_at(14));
        let extra_size = u32_at(36);
        if extra_size > MAX_SNAPSHOT_EXTRA_DATA {
            return Err(FormatError::SnapshotExtraTooLarge {
                index,
                size: extra_size,
            });
        }
        let entry_end = fixed_end + u64::from(extra_size) + id_len + name_len;
        if entry_end > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(FormatError::SnapshotTableTooBig {
                bytes: entry_end,
                entries: index + 1,
            });
        }
        let rest = buf
            .get(be::usize_sat(fixed_end)..be::usize_sat(entry_end))
            .ok_or_else(|| FormatError::truncated(what(), entry_end, buf.len()))?;
        // `rest` is exactly extra + id + name bytes long, so both splits succeed.
        let (extra, strings) = rest
            .split_at_checked(extra_size as usize)
            .unwrap_or((rest, &[]));
        let (id, name) = strings
            .split_at_checked(id_len as usize)
            .unwrap_or((strings, &[]));
        let field = |i: usize| be::u64_at(extra, i * 8);
        let known = [field(0), field(1), field(2)];
        let known_count = known.iter().take_while(|f| f.is_some()).count();
        entries.push(SnapshotEntry {
            l1_table_offset: u64_at(0),
            l1_size: u32_at(8),
            id: be::string(id),
            name: be::string(name),
            date_sec: u32_at(16),
            date_nsec: u32_at(20),
            vm_clock_nsec: u64_at(24),
            vm_state_size: u32_at(32),
            vm_state_size_large: known[0],
            disk_size: known[1],
            icount: known[2],
            extra_unknown: extra.get(known_count * 8..).unwrap_or_default().to_vec(),
        });
        end = entry_end;
    }
    Ok((entries, end))
}

/// Serializes entries as a snapshot table (each entry 8-aligned). The result's length is the
/// table size `parse_snapshot_table` reports for it. Refuses what QEMU could not open: more than
/// 65536 entries, a table over 64 MiB, or an entry whose fields do not fit.
pub fn serialize_snapshot_table(entries: &[SnapshotEntry]) -> Result<Vec<u8>, FormatError> {
    fit("snapshot table entry count", entries.len(), MAX_SNAPSHOTS)?;
    let mut out = Vec::new();
    for e in entries {
        be::pad8(&mut out);
        e.serialize_into(&mut out)?;
    }
    fit("snapshot table", out.len(), MAX_SNAPSHOT_TABLE_BYTES)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testdata::{self, hex};

    fn entry(id: &str, name: &str) -> SnapshotEntry {
        SnapshotEntry {
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: id.into(),
            name: name.into(),
            date_sec: 1_700_000_000,
            date_nsec: 123,
            vm_clock_nsec: 456,
            vm_state_size: 0,
            vm_state_size_large: Some(0),
            disk_size: Some(1 << 30),
            icount: Some(ICOUNT_DISABLED),
            extra_unknown: Vec::new(),
        }
    }

    #[test]
    fn round_trip_with_varied_extra_data() {
        let mut a = entry("1", "first");
        a.extra_unknown = b"very important data".to_vec();
        let mut b = entry("2", "odd");
        b.icount = None;
        let mut c = entry("10", "");
        c.vm_state_size_large = None;
        c.disk_size = None;
        c.icount = None;
        c.vm_state_size = 77;
        let mut d = entry("11", "partial");
        d.icount = None;
        d.extra_unknown = vec![1, 2, 3];
        let all = vec![a, b, c, d];
        let bytes = serialize_snapshot_table(&all).unwrap();
        let (parsed, len) = parse_snapshot_table(&bytes, 4, 3).unwrap();
        assert_eq!(parsed, all);
        assert_eq!(len, bytes.len() as u64);
        assert_eq!(parsed[0].extra_data_size(), 24 + 19);
        assert_eq!(parsed[2].vm_state_bytes(), 77);
        assert!(!parsed[2].has_v3_extra_data());
        assert_eq!(parsed[3].extra_data_size(), 19);
    }

    #[test]
    fn completing_fills_what_is_missing_as_qemu_does() {
        let mut bare = entry("1", "bare");
        bare.vm_state_size_large = None;
        bare.disk_size = None;
        bare.icount = None;
        bare.vm_state_size = 4096;
        let done = bare.completed(128 << 20);
        assert_eq!(done.extra_data_size(), 24);
        assert_eq!(done.vm_state_size_large, Some(4096));
        assert_eq!(done.disk_size, Some(128 << 20));
        assert_eq!(done.icount, Some(ICOUNT_DISABLED));
        let mut cut = entry("2", "cut");
        cut.icount = None;
        cut.extra_unknown = vec![1, 2, 3];
        assert_eq!(cut.completed(1).extra_data_size(), 24);
        let mut whole = entry("3", "whole");
        whole.extra_unknown = vec![9; 5];
        assert_eq!(whole.clone().completed(1), whole);
    }

    #[test]
    fn entries_start_8_aligned() {
        let all = vec![entry("1", "abc"), entry("2", "x")];
        let bytes = serialize_snapshot_table(&all).unwrap();
        let first = all[0].unpadded_size();
        assert_eq!(first, 40 + 24 + 1 + 3);
        // Second entry starts at the next multiple of 8.
        assert_eq!(&bytes[72..80], &0x50000u64.to_be_bytes());
        assert_eq!(bytes.len() as u64, 72 + all[1].unpadded_size());
    }

    #[test]
    fn errors() {
        let mut big = entry("1", "x");
        big.extra_unknown = vec![0; 1001];
        // The serializer refuses this entry; write it unchecked to test the parser.
        assert!(serialize_snapshot_table(std::slice::from_ref(&big)).is_err());
        let long = entry("2", &"n".repeat(65536));
        assert!(matches!(
            serialize_snapshot_table(&[long]),
            Err(FormatError::FieldTooLarge {
                field: "snapshot name",
                len: 65536,
                max: 65535
            })
        ));
        let mut bytes = serialize_snapshot_table(&[entry("0", "ok")]).unwrap();
        be::pad8(&mut bytes);
        big.write_fields(&mut bytes, 1, 1);
        let err = parse_snapshot_table(&bytes, 2, 3).unwrap_err();
        assert!(err
            .to_string()
            .starts_with("Too much extra metadata in snapshot table entry 1"));

        let bytes = serialize_snapshot_table(&[entry("1", "x")]).unwrap();
        let err = parse_snapshot_table(&bytes[..bytes.len() - 1], 1, 3).unwrap_err();
        assert!(matches!(err, FormatError::Truncated { .. }), "{err}");
        let err = parse_snapshot_table(&bytes, 2, 3).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("snapshot table entry 1 truncated"),
            "{err}"
        );
        let err = parse_snapshot_table(&[], 65537, 3).unwrap_err();
        assert!(err.to_string().starts_with("Snapshot table too large"));
        assert_eq!(parse_snapshot_table(&[], 0, 3).unwrap(), (vec![], 0));
    }

    #[test]
    fn table_too_big() {
        // 65536 entries of 40 + 1024 + 65535 + 65535 bytes would exceed 64 MiB quickly; a
        // buffer that big is not needed because the size check comes before the read.
        let mut e = entry("1", "x");
        e.extra_unknown = vec![0; 1000];
        e.name = "n".repeat(65535);
        e.id = "i".repeat(65535);
        let one = serialize_snapshot_table(std::slice::from_ref(&e)).unwrap();
        let mut buf = Vec::new();
        for _ in 0..600 {
            be::pad8(&mut buf);
            buf.extend_from_slice(&one);
        }
        let err = parse_snapshot_table(&buf, 600, 3).unwrap_err();
        assert!(
            err.to_string().starts_with("Snapshot table is too big"),
            "{err}"
        );
    }

    #[test]
    fn snapshot_l1_checks() {
        let mut e = entry("1", "x");
        assert!(e.check_l1_table(65536).is_ok());
        e.l1_size = (4 << 20) + 1;
        assert!(e
            .check_l1_table(65536)
            .unwrap_err()
            .to_string()
            .starts_with("Snapshot L1 table too large"));
        e.l1_size = 1;
        e.l1_table_offset = 0x50200;
        assert!(e
            .check_l1_table(65536)
            .unwrap_err()
            .to_string()
            .starts_with("Snapshot L1 table offset invalid"));
    }

    #[test]
    fn real_table_from_qemu_img() {
        let bytes = hex(testdata::SNAP_BITMAP_SNAPSHOT_TABLE);
        let (entries, len) = parse_snapshot_table(&bytes, 2, 3).unwrap();
        assert_eq!(len, bytes.len() as u64);
        assert_eq!(entries.len(), 2);
        assert_eq!(
            (entries[0].id.as_str(), entries[0].name.as_str()),
            ("1", "s1")
        );
        assert_eq!(
            (entries[1].id.as_str(), entries[1].name.as_str()),
            ("2", "second")
        );
        for e in &entries {
            assert_eq!(e.disk_size, Some(16 << 20));
            assert_eq!(e.extra_data_size(), 24);
            assert!(e.icount.is_some());
            assert!(e.check_l1_table(65536).is_ok());
        }
        assert_eq!(serialize_snapshot_table(&entries).unwrap(), bytes);
    }
}
