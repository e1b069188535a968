//! Guest reads: every kind of mapping, one host read per run of contiguous data.

use std::sync::Arc;

use crate::format::header::{COMPRESSION_DEFLATE, COMPRESSION_ZSTD};
use crate::format::{CompressedDescriptor, GuestOffset, L2Mapping};
use crate::image::{Image, ImageError};

impl Image {
    /// Reads `buf.len()` guest bytes at `guest`. The whole range must lie inside the virtual
    /// disk. Unallocated ranges read from the backing chain (zeros past its end, or without
    /// one); zero clusters and subclusters read as zeros; data comes from the image file or the
    /// external data file; compressed clusters are decompressed.
    pub fn read_at(&self, guest: GuestOffset, buf: &mut [u8]) -> Result<(), ImageError> {
        self.check_range("read", guest.0, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.refuse_locked(false)?;
        let chain = self.chain()?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = GuestOffset(guest.0 + done as u64);
            let extent = self.mapping(at, (buf.len() - done) as u64)?;
            let n = extent.len as usize;
            let out = &mut buf[done..done + n];
            match extent.mapping {
                L2Mapping::Data { host } => self.read_data(&chain.data, host.0, at.0, out)?,
                L2Mapping::Zero { .. } => out.fill(0),
                L2Mapping::Unallocated { .. } => match &chain.backing {
                    Some(backing) => backing.read(at.0, out)?,
                    None => out.fill(0),
                },
                L2Mapping::Compressed(d) => {
                    let cluster = self.decompressed(d)?;
                    let from = self.geometry.in_cluster_offset(at.0) as usize;
                    out.copy_from_slice(&cluster[from..from + n]);
                }
            }
            done += n;
        }
        Ok(())
    }

    /// The decompressed bytes of the compressed cluster `d` (one cluster), from a one-entry
    /// cache so that small sequential reads decompress each cluster once.
    fn decompressed(&self, d: CompressedDescriptor) -> Result<Arc<[u8]>, ImageError> {
        let key = d.host_offset.0 ^ (d.nb_sectors << 56);
        if let Some((k, bytes)) = self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
        {
            if *k == key {
                return Ok(Arc::clone(bytes));
            }
        }
        let (start, end) = d.data_range().ok_or_else(|| {
            ImageError::Corruption(format!(
                "Compressed cluster at {:#x} runs past the largest offset",
                d.host_offset.0
            ))
        })?;
        let mut input = vec![0u8; (end - start) as usize];
        // Compressed clusters live in the image file itself (never in a data file).
        self.storage.read_padded(start, &mut input)?;
        let mut output = vec![0u8; self.geometry.cluster_size() as usize];
        let ok = match self.scanned.header.compression_type {
            COMPRESSION_DEFLATE => inflate_raw(&input, &mut output),
            COMPRESSION_ZSTD => zstd_decompress(&input, &mut output),
            _ => false,
        };
        if !ok {
            return Err(ImageError::Corruption(format!(
                "Compressed cluster at {start:#x} ({} bytes) does not decompress to a cluster",
                end - start
            )));
        }
        let bytes: Arc<[u8]> = output.into();
        *self
            .last_decompressed
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = Some((key, Arc::clone(&bytes)));
        Ok(bytes)
    }
}

/// Inflates a raw deflate stream (no zlib header, as QEMU writes them) into `out`, which must
/// be filled exactly; the input may carry padding after the stream's end.
fn inflate_raw(input: &[u8], out: &mut [u8]) -> bool {
    let mut z = flate2::Decompress::new(false);
    match z.decompress(input, out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) | Ok(flate2::Status::BufError) | Ok(flate2::Status::Ok) => {
            z.total_out() == out.len() as u64
        }
        Err(_) => false,
    }
}

/// Decompresses zstd frames into `out` until it is full; the input may carry padding after the
/// data (QEMU stores whole sectors), so decoding stops as soon as the cluster is complete.
fn zstd_decompress(input: &[u8], out: &mut [u8]) -> bool {
    use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
    let Ok(mut decoder) = Decoder::new() else {
        return false;
    };
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    loop {
        let before = (src.pos(), dst.pos());
        if decoder.run(&mut src, &mut dst).is_err() {
            return false;
        }
        if dst.pos() == dst.capacity() {
            return true;
        }
        if src.pos() == input.len() || (src.pos(), dst.pos()) == before {
            return false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::entry::{OFLAG_COMPRESSED, OFLAG_COPIED, OFLAG_ZERO};
    use crate::image::testutil::*;
    use crate::image::OpenOptions;
    use crate::storage::MemStorage;
    use std::io::Write;

    fn open(bytes: Vec<u8>) -> Image {
        Image::from_storage(Arc::new(MemStorage::new(bytes)), OpenOptions::default()).unwrap()
    }

    #[test]
    fn reads_data_zeros_and_holes_across_clusters() {
        let l2 = [
            OFLAG_COPIED | (5 * CS),
            OFLAG_ZERO | (6 * CS),
            0,
            OFLAG_COPIED | (7 * CS),
        ];
        let img = open(image(1 << 30, &l2, &[(0, 0xaa), (1, 0xbb), (3, 0xcc)]));
        let mut buf = vec![0xffu8; (4 * CS) as usize];
        img.read_at(GuestOffset(0), &mut buf).unwrap();
        let cs = CS as usize;
        assert!(buf[..cs].iter().all(|&b| b == 0xaa));
        assert!(buf[cs..3 * cs].iter().all(|&b| b == 0));
        assert!(buf[3 * cs..].iter().all(|&b| b == 0xcc));
        let mut small = [0u8; 3];
        img.read_at(GuestOffset(CS - 1), &mut small).unwrap();
        assert_eq!(small, [0xaa, 0, 0]);
        let err = img
            .read_at(GuestOffset((1 << 30) - 1), &mut [0u8; 2])
            .unwrap_err();
        assert_eq!(err.kind(), crate::image::ErrorKind::InvalidArgument);
        img.read_at(GuestOffset(1 << 30), &mut []).unwrap();
    }

    #[test]
    fn reads_deflate_compressed_clusters() {
        let plain: Vec<u8> = (0..CS).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&plain).unwrap();
        let packed = enc.finish().unwrap();
        let at = 5 * CS + 1000;
        let sectors = (1000 % 512 + packed.len() as u64).div_ceil(512);
        let entry = CompressedDescriptor {
            host_offset: crate::format::HostOffset(at),
            nb_sectors: sectors,
        }
        .to_entry(16)
        .unwrap();
        assert!(entry & OFLAG_COMPRESSED != 0);
        let mut bytes = image(1 << 30, &[entry], &[(0, 0)]);
        bytes[at as usize..at as usize + packed.len()].copy_from_slice(&packed);
        let img = open(bytes);
        let mut buf = vec![0u8; 300];
        img.read_at(GuestOffset(7000), &mut buf).unwrap();
        assert_eq!(&buf[..], &plain[7000..7300]);
        let mut whole = vec![0u8; CS as usize];
        img.read_at(GuestOffset(0), &mut whole).unwrap();
        assert_eq!(whole, plain);
    }

    #[test]
    fn zstd_stops_at_a_full_cluster_despite_padding() {
        let plain = vec![7u8; 4096];
        let mut packed = zstd::bulk::compress(&plain, 3).unwrap();
        packed.extend_from_slice(&[0xde, 0xad, 0, 0, 0]);
        let mut out = vec![0u8; 4096];
        assert!(zstd_decompress(&packed, &mut out));
        assert_eq!(out, plain);
        let mut too_big = vec![0u8; 8192];
        assert!(!zstd_decompress(&packed[..packed.len() - 5], &mut too_big));
        assert!(!inflate_raw(b"garbage", &mut out));
    }

    #[test]
    fn encrypted_images_opened_without_a_secret_refuse_guest_reads() {
        let mut bytes = image(1 << 30, &[], &[]);
        bytes[35] = 1; // crypt_method = AES
        let img = open(bytes);
        let err = img.read_at(GuestOffset(0), &mut [0u8; 1]).unwrap_err();
        assert_eq!(err.kind(), crate::image::ErrorKind::Encryption);
        assert!(err.to_string().contains("AES-encrypted"), "{err}");
        assert!(
            err.to_string().contains("'encrypt.key-secret' is required"),
            "{err}"
        );
    }
}
