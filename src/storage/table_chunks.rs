//! The parts of an on-disk table worth reading: where the storage holds data.
//!
//! A table of 8-byte entries that lies (partly) in a hole of a sparse file, or past its end,
//! reads as zeros there, and zero entries point at nothing. Readers that walk such tables
//! (the scan, the check) read only the chunks this iterator yields, so a table a file merely
//! claims costs no I/O and no memory.

use std::io;

use super::Storage;

/// Iterator over `(position, length)` chunks of the table at `[offset, offset + bytes)` that
/// may hold data, in order, each at most `chunk` bytes and starting and ending on an entry
/// boundary (an entry straddling the edge of a data range is included whole). See
/// [`table_data_chunks`].
#[derive(Debug)]
pub struct TableChunks<'a> {
    storage: &'a dyn Storage,
    offset: u64,
    end: u64,
    chunk: u64,
    /// Where the search for the next data range starts.
    at: u64,
    /// The data range being cut into chunks: next position and its end.
    run: Option<(u64, u64)>,
}

/// The chunks of the table at `[offset, offset + bytes)` that may hold data (see
/// [`TableChunks`]); `chunk` is rounded up to whole entries.
pub fn table_data_chunks(
    storage: &dyn Storage,
    offset: u64,
    bytes: u64,
    chunk: u64,
) -> TableChunks<'_> {
    TableChunks {
        storage,
        offset,
        end: offset.saturating_add(bytes),
        chunk: chunk.max(8).div_ceil(8) * 8,
        at: offset,
        run: None,
    }
}

impl Iterator for TableChunks<'_> {
    type Item = io::Result<(u64, u64)>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some((pos, stop)) = self.run {
                if pos < stop {
                    let n = ((stop - pos).min(self.chunk).div_ceil(8) * 8).min(self.end - pos);
                    self.run = Some((pos + n, stop));
                    self.at = pos + n;
                    return Some(Ok((pos, n)));
                }
                self.run = None;
                self.at = self.at.max(stop);
            }
            if self.at >= self.end {
                return None;
            }
            match self.storage.next_data(self.at) {
                Err(e) => {
                    self.at = self.end;
                    return Some(Err(e));
                }
                Ok(None) => {
                    self.at = self.end;
                    return None;
                }
                Ok(Some((data_start, data_end))) => {
                    // Entries are 8-aligned within the table.
                    let start = (data_start.max(self.at) - self.offset) / 8 * 8 + self.offset;
                    if start >= self.end {
                        self.at = self.end;
                        return None;
                    }
                    self.run = Some((start, data_end.min(self.end)));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::MemStorage;

    /// A storage whose data lies in the given ranges (holes elsewhere).
    #[derive(Debug)]
    struct Sparse {
        inner: MemStorage,
        data: Vec<(u64, u64)>,
    }

    impl Storage for Sparse {
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            self.inner.read_at(offset, buf)
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
            self.inner.write_at(offset, buf)
        }
        fn len(&self) -> io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> io::Result<()> {
            self.inner.set_len(len)
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn next_data(&self, offset: u64) -> io::Result<Option<(u64, u64)>> {
            Ok(self
                .data
                .iter()
                .find(|&&(_, e)| e > offset)
                .map(|&(s, e)| (s.max(offset), e)))
        }
    }

    fn chunks(
        data: &[(u64, u64)],
        len: u64,
        offset: u64,
        bytes: u64,
        chunk: u64,
    ) -> Vec<(u64, u64)> {
        let s = Sparse {
            inner: MemStorage::new(vec![0; len as usize]),
            data: data.to_vec(),
        };
        table_data_chunks(&s, offset, bytes, chunk)
            .map(Result::unwrap)
            .collect()
    }

    #[test]
    fn whole_table_in_data_is_cut_into_chunks() {
        assert_eq!(
            chunks(&[(0, 4096)], 4096, 1024, 2048, 1000),
            [(1024, 1000), (2024, 1000), (3024, 48)]
        );
    }

    #[test]
    fn holes_and_the_end_are_skipped_and_edges_keep_whole_entries() {
        // Data at [1028, 1100) and [3000, 3010); the table is [1000, 5000) in a 4 KiB file.
        let got = chunks(&[(1028, 1100), (3000, 3010)], 4096, 1000, 4000, 1 << 20);
        assert_eq!(got, [(1024, 80), (3000, 16)]);
        // A table wholly in a hole or past the end: nothing to read.
        assert!(chunks(&[(0, 512)], 4096, 1024, 1024, 1 << 20).is_empty());
        assert!(chunks(&[(0, 4096)], 4096, 8192, 1024, 1 << 20).is_empty());
    }
}
