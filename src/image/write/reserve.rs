//! Runs of new clusters for guest data, written outside the writer's lock, so that several
//! threads copy data into the file at once (the conversion pipeline's workers).
//!
//! Three steps. [`Image::reserve_run`], under the lock: the clusters must hold no data of
//! their own (unallocated or plain zero: they are written whole), new host clusters are
//! allocated for them and the bitmaps marked. [`Image::write_reserved`], without the lock: the
//! overlap check against the map (the reserved clusters are allocated, so nothing else can be
//! placed there meanwhile) and the data written. [`Image::commit_reserved`], under the lock:
//! the L2 entries point at the new clusters.
//!
//! The write order is the engine's: data reaches the file before any L2 entry points at it. A
//! crash between the steps leaks the reserved clusters (allocated, never referenced), which a
//! check reports as leaks and a repair frees; nothing reads them. When another writer changed
//! the clusters' entries between the steps, the commit frees the reservation and writes the
//! data the ordinary way instead, so concurrent writes still end as one of them, whole.

use super::guard::WriteKind;
use super::l2::Slot;
use super::Writer;
use crate::format::entry::L2Entry;
use crate::format::{GuestOffset, HostOffset};
use crate::image::{Image, ImageError};

/// New host clusters reserved for whole guest clusters, not yet written or referenced.
#[derive(Debug)]
#[must_use = "a reservation is committed or released, or its clusters leak"]
pub struct Reservation {
    guest: u64,
    host: u64,
    clusters: u64,
}

impl Reservation {
    /// Guest bytes the reservation covers.
    pub fn len(&self, cluster_size: u64) -> u64 {
        self.clusters * cluster_size
    }
}

impl Image {
    /// Reserves new host clusters for the whole guest clusters from `guest` (cluster-aligned)
    /// for at most `len` bytes, as many as qualify in one run: standard L2 entries, data in
    /// the image file, entries with no data of their own, in one L2 table. `None` when none
    /// qualifies (the caller writes the ordinary way).
    pub fn reserve_run(
        &self,
        guest: GuestOffset,
        len: u64,
    ) -> Result<Option<Reservation>, ImageError> {
        self.check_range("write", guest.0, len)?;
        let g = self.geometry;
        let cs = g.cluster_size();
        let mut w = self.writer("write")?;
        if g.is_extended_l2() || w.external_data || guest.0 % cs != 0 {
            return Ok(None);
        }
        let first = g.l2_index(guest) as usize;
        let max = ((len / cs) as usize)
            .min(g.l2_entries() as usize - first)
            .min((w.refcounts.per_block() / 4) as usize);
        if max < 1 {
            return Ok(None);
        }
        let r = (|| {
            self.open_for_guest_change(&mut w, guest.0, max as u64 * cs)?;
            let l2 = self.l2_for_write(&mut w, g.l1_index(guest))?;
            let entries = self.l2_entries(l2, first, max)?;
            let k = entries.iter().take_while(|e| e.has_no_data()).count();
            if k < 1 {
                return Ok(None);
            }
            let host = self.allocate_run(&mut w, k as u64)?;
            self.bound_pending_writes(&mut w)?;
            Ok(Some(Reservation {
                guest: guest.0,
                host: host.0,
                clusters: k as u64,
            }))
        })();
        r.map_err(|e| self.poison_if_inconsistent(&mut w, e))
    }

    /// Writes the reservation's data (`data` is exactly its length), checked against the map
    /// first, without the writer's lock.
    pub fn write_reserved(&self, r: &Reservation, data: &[u8]) -> Result<(), ImageError> {
        let cs = self.geometry.cluster_size();
        if data.len() as u64 != r.len(cs) {
            return Err(ImageError::InvalidArgument(format!(
                "write_reserved: {} bytes for a reservation of {}",
                data.len(),
                r.len(cs)
            )));
        }
        let hit = self.check_overlap(
            HostOffset(r.host),
            data.len() as u64,
            WriteKind::GuestData.ignore(),
        )?;
        if !hit.is_empty() {
            // Cannot happen while the clusters stay allocated; refused as any overlap is.
            let mut w = self.writer("write")?;
            let name = hit.message_name().unwrap_or("metadata");
            let message = format!("Preventing invalid write on metadata (overlaps with {name})");
            return Err(self.refuse_overlap(&mut w, message, r.host, data.len() as u64, hit));
        }
        // Enciphered here, on the calling copy thread (one per core already).
        let ciphered = self.cipher_for_disk(r.host, data, false)?;
        self.storage
            .write_at(r.host, ciphered.as_deref().unwrap_or(data))?;
        Ok(())
    }

    /// Points the L2 entries at the written reservation. If another writer gave any of those
    /// clusters data meanwhile (or shrank the disk), the reservation is freed and `data`
    /// written the ordinary way.
    pub fn commit_reserved(&self, r: Reservation, data: &[u8]) -> Result<(), ImageError> {
        let g = self.geometry;
        let cs = g.cluster_size();
        let guest = GuestOffset(r.guest);
        let mut w = self.writer("write")?;
        w.refuse_if_poisoned()?;
        let committed = (|| {
            if self.check_range("write", r.guest, r.len(cs)).is_err() {
                return Ok(false);
            }
            let l2 = self.l2_for_write(&mut w, g.l1_index(guest))?;
            let first = g.l2_index(guest) as usize;
            let entries = self.l2_entries(l2, first, r.clusters as usize)?;
            if !entries.iter().all(|e| e.has_no_data()) {
                return Ok(false);
            }
            for j in 0..r.clusters {
                let new = Slot::plain(L2Entry::owned(HostOffset(r.host + j * cs)));
                // The old entries hold no data: nothing is released.
                self.l2_replace(&mut w, l2, first + j as usize, new)?
                    .release(&mut w);
            }
            self.bound_pending_writes(&mut w).map(|()| true)
        })();
        match committed {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.release_reservation(&mut w, &r);
                drop(w);
                self.write_at(guest, data)
            }
            Err(e) => Err(self.poison_if_inconsistent(&mut w, e)),
        }
    }

    /// Frees a reservation that will not be committed (its data could not be written).
    pub fn release_reserved(&self, r: Reservation) -> Result<(), ImageError> {
        let mut w = self.writer("write")?;
        self.release_reservation(&mut w, &r);
        Ok(())
    }

    fn release_reservation(&self, w: &mut Writer, r: &Reservation) {
        let first = r.host >> self.geometry.cluster_bits();
        for c in first..first + r.clusters {
            w.refcounts.free_later(c);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use crate::create::{plan, write_image, CreateOptions};
    use crate::format::GuestOffset;
    use crate::image::{Image, OpenOptions};
    use crate::storage::MemStorage;

    fn image() -> Image {
        let storage = Arc::new(MemStorage::new(Vec::new()));
        let opts = CreateOptions {
            size: 4 << 20,
            cluster_size: 65536,
            ..CreateOptions::default()
        };
        write_image(&plan(&opts).unwrap(), storage.as_ref(), None).unwrap();
        let options = OpenOptions {
            writable: true,
            ..OpenOptions::default()
        };
        Image::from_storage(storage, options).unwrap()
    }

    fn read(img: &Image, at: u64, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        img.read_at(GuestOffset(at), &mut buf).unwrap();
        buf
    }

    #[test]
    fn a_reserved_run_reads_back_once_committed() {
        let img = image();
        let data = vec![7u8; 4 * 65536];
        let r = img
            .reserve_run(GuestOffset(65536), data.len() as u64)
            .unwrap()
            .unwrap();
        img.write_reserved(&r, &data).unwrap();
        // Not referenced before the commit: the guest still reads zeros.
        assert_eq!(read(&img, 65536, 16), vec![0u8; 16]);
        img.commit_reserved(r, &data).unwrap();
        assert_eq!(read(&img, 65536, data.len()), data);
        let report = img.check().unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
    }

    #[test]
    fn a_write_between_the_steps_wins_nothing_and_leaks_nothing() {
        let img = image();
        let data = vec![9u8; 2 * 65536];
        let r = img
            .reserve_run(GuestOffset(0), data.len() as u64)
            .unwrap()
            .unwrap();
        img.write_reserved(&r, &data).unwrap();
        img.write_at(GuestOffset(100), b"meanwhile").unwrap();
        // The commit sees data there now: it frees its clusters and writes the ordinary way.
        img.commit_reserved(r, &data).unwrap();
        assert_eq!(read(&img, 0, data.len()), data);
        // A reservation given up is freed too.
        let r = img
            .reserve_run(GuestOffset(1 << 20), 2 * 65536)
            .unwrap()
            .unwrap();
        img.release_reserved(r).unwrap();
        img.flush().unwrap();
        let report = img.check().unwrap();
        assert_eq!((report.corruptions, report.leaks), (0, 0), "{report:?}");
        // Clusters that hold data are not reserved.
        assert!(img
            .reserve_run(GuestOffset(0), 2 * 65536)
            .unwrap()
            .is_none());
    }
}
