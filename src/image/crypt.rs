//! Encrypted guest data: the image's cipher, unlocked at open with the caller's secret, and the
//! only calls through which the read and write paths touch the bytes of a data cluster of an
//! encrypted image.
//!
//! The rules, QEMU's (checked against images it made and reads it made of ours):
//!
//! - Guest data is ciphered in 512-byte sectors. LUKS takes each sector's number from its *host*
//!   offset, so data moved to a new cluster (copy-on-write) is deciphered at the old place and
//!   ciphered again for the new one; legacy AES takes it from the guest offset.
//! - Zero clusters and unallocated clusters read zeros (or the backing file) without the cipher:
//!   there is nothing on disk to decipher.
//! - Compressed clusters are stored compressed and *not* ciphered (QEMU writes them so): they
//!   read without the cipher. This engine never writes one into an encrypted image, since that
//!   puts the guest's plaintext on disk.
//! - The engine's own writes reach the disk in whole sectors: a write that starts or ends inside
//!   a sector is widened to whole sectors with the guest's current bytes first
//!   ([`Image::widen_to_sectors`]), as QEMU's block layer widens it for an encrypted image.
//!
//! The invariant the write side keeps: a guest data byte reaches the storage only through
//! [`Image::guarded_write`] with [`super::WriteKind::GuestData`] (or the reservation path of the
//! copy threads), and both encrypt before the bytes leave memory. Nothing in plaintext is
//! written to an encrypted image's file but compressed clusters QEMU wrote there.

use std::fmt;
use std::sync::Arc;

use zeroize::Zeroizing;

use crate::crypto;
use crate::format::header::{CRYPT_AES, CRYPT_LUKS, CRYPT_NONE};
use crate::image::{Image, ImageError};
use crate::scan::ScannedImage;
use crate::storage::Storage;

/// The unit of encryption: QEMU ciphers qcow2 guest data in 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

/// Buffers at least this long are ciphered by two threads (the machine's cores are the limit
/// for long sequential reads and writes of an encrypted image).
const PARALLEL_AT: usize = 512 << 10;

/// A secret given to unlock an encrypted image (QEMU's `encrypt.key-secret`). Its bytes never
/// appear in `Debug` output or messages, and are overwritten when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<Vec<u8>>);

impl Secret {
    /// A secret holding these bytes.
    pub fn new(bytes: impl Into<Vec<u8>>) -> Self {
        Secret(Zeroizing::new(bytes.into()))
    }

    /// The secret's bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A sector cipher with its key: ciphers whole 512-byte sectors in place, the sector number
/// taken from the byte offset it is given (`offset / 512`, then one more per sector).
pub trait DataCipher: Send + Sync {
    /// Encrypts `buf` (whole sectors) as the data of the sectors starting at byte `offset`.
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
    /// Decrypts `buf` (whole sectors) as the data of the sectors starting at byte `offset`.
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError>;
}

/// Which offset gives a sector its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IvFrom {
    /// The host offset of the sector in the image (or data) file: LUKS.
    Host,
    /// The guest offset of the sector: legacy AES.
    Guest,
}

/// Whether and how an image's guest data is encrypted, as opened.
#[derive(Clone, Default)]
pub(crate) enum Encryption {
    /// Not encrypted.
    #[default]
    None,
    /// Encrypted, opened without the secret: metadata only; guest data is refused. The name of
    /// the method (`LUKS`, `AES`).
    Locked(&'static str),
    /// Encrypted and unlocked.
    Unlocked {
        /// The cipher with the volume key.
        cipher: Arc<dyn DataCipher>,
        /// Where sector numbers come from.
        iv: IvFrom,
        /// Whether this engine may write with it (not for legacy AES, which QEMU no longer
        /// writes either).
        writable: bool,
    },
}

impl fmt::Debug for Encryption {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Encryption::None => f.write_str("None"),
            Encryption::Locked(m) => write!(f, "Locked({m})"),
            Encryption::Unlocked { iv, writable, .. } => f
                .debug_struct("Unlocked")
                .field("iv", iv)
                .field("writable", writable)
                .finish_non_exhaustive(),
        }
    }
}

impl Encryption {
    /// Whether guest data bytes need the cipher at all.
    pub fn is_encrypted(&self) -> bool {
        !matches!(self, Encryption::None)
    }
}

/// Work on a part of a buffer: `(offset of the part in the buffer, the part)`.
type PartJob<'a> = dyn Fn(u64, &mut [u8]) -> Result<(), ImageError> + Sync + 'a;

/// Runs `f` over `buf` in sector-aligned halves on two threads when `buf` is long and
/// `parallel`, else on this thread. `f` gets the byte offset of its part within `buf`.
fn split_work(buf: &mut [u8], parallel: bool, f: &PartJob<'_>) -> Result<(), ImageError> {
    if !parallel || buf.len() < PARALLEL_AT {
        return f(0, buf);
    }
    let half = (buf.len() / 2) & !(SECTOR_SIZE as usize - 1);
    let (first, second) = buf.split_at_mut(half);
    std::thread::scope(|s| {
        let theirs = s.spawn(|| f(half as u64, second));
        let mine = f(0, first);
        let theirs = theirs
            .join()
            .unwrap_or_else(|_| Err(ImageError::Unsupported("cipher thread failed".into())));
        mine.and(theirs)
    })
}

/// The most of a LUKS header area read at open. QEMU's own areas are about 2 MiB (aes-256-xts:
/// eight key slots of 4000 stripes); a larger extension length in a hostile file costs no more
/// than this, and key material past it is refused by the LUKS layer as lying outside the area.
const MAX_AREA_READ: u64 = 16 << 20;

/// How the image `scanned` (in `storage`) encrypts its guest data, unlocked with `secret` when
/// one is given. A wrong secret is refused in QEMU's words, before anything is written.
pub(crate) fn unlock(
    scanned: &ScannedImage,
    storage: &dyn Storage,
    secret: Option<&Secret>,
) -> Result<Encryption, ImageError> {
    let header = &scanned.header;
    let method = match header.crypt_method {
        CRYPT_NONE => return Ok(Encryption::None),
        CRYPT_AES => "AES",
        _ => "LUKS",
    };
    let Some(secret) = secret else {
        return Ok(Encryption::Locked(method));
    };
    if header.crypt_method == CRYPT_AES {
        return Ok(Encryption::Unlocked {
            cipher: Arc::new(legacy_aes(secret.bytes())?),
            iv: IvFrom::Guest,
            writable: false,
        });
    }
    // The scan refuses LUKS without the extension; this is a guard.
    let (offset, length) = header
        .crypto_header()
        .ok_or_else(|| ImageError::Encryption("Missing CRYPTO header for crypt method 2".into()))?;
    let mut area = vec![0u8; length.min(MAX_AREA_READ) as usize];
    storage.read_padded(offset, &mut area)?;
    let luks = crypto::Luks::unlock(&area, secret.bytes()).map_err(crypto_err)?;
    Ok(Encryption::Unlocked {
        cipher: Arc::new(luks),
        iv: IvFrom::Host,
        writable: true,
    })
}

impl Image {
    /// The `encrypt` object `qemu-img info` shows for a LUKS image, from its header read and
    /// checked as QEMU opens one (no secret needed, QEMU's words for a bad header); `None` for
    /// an image that is not LUKS-encrypted.
    pub fn luks_info(&self) -> Result<Option<crypto::LuksInfo>, ImageError> {
        let header = &self.scanned.header;
        let Some((offset, _)) = header.crypto_header() else {
            return Ok(None);
        };
        if header.crypt_method != CRYPT_LUKS {
            return Ok(None);
        }
        let mut area = vec![0u8; crypto::luks_header::LUKS_HEADER_LEN];
        self.storage.read_padded(offset, &mut area)?;
        let (luks, params) = crypto::LuksHeader::parse(&area).map_err(crypto_err)?;
        Ok(Some(luks.info(&params)))
    }
}

/// QEMU's legacy qcow AES key: the passphrase's first 16 bytes, zero-padded; AES-128-CBC with
/// plain64 IVs from guest sector numbers.
fn legacy_aes(secret: &[u8]) -> Result<crypto::SectorCipher, ImageError> {
    let mut key = Zeroizing::new([0u8; 16]);
    let n = secret.len().min(16);
    key[..n].copy_from_slice(&secret[..n]);
    crypto::SectorCipher::new(
        crypto::CipherAlg::Aes128,
        crypto::CipherMode::Cbc,
        crypto::IvGenAlg::Plain64,
        None,
        key.as_slice(),
    )
    .map_err(crypto_err)
}

/// A LUKS-layer error as an image error (its message is QEMU's where QEMU has one).
fn crypto_err(e: crypto::CryptoError) -> ImageError {
    ImageError::Encryption(e.to_string())
}

impl DataCipher for crypto::Luks {
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        crypto::Luks::encrypt(self, offset, buf).map_err(crypto_err)
    }
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        crypto::Luks::decrypt(self, offset, buf).map_err(crypto_err)
    }
}

impl DataCipher for crypto::SectorCipher {
    fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        crypto::SectorCipher::encrypt(self, offset, buf).map_err(crypto_err)
    }
    fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        crypto::SectorCipher::decrypt(self, offset, buf).map_err(crypto_err)
    }
}

impl Image {
    /// Whether this image's guest data is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.encryption.is_encrypted()
    }

    /// The error for guest data of an encrypted image opened without its secret.
    fn locked_error(method: &str) -> ImageError {
        ImageError::Encryption(format!(
            "Guest data of this {method}-encrypted image needs its secret: {}",
            crate::crypto::KEY_SECRET_REQUIRED
        ))
    }

    /// The error for a write with legacy AES, which this engine only reads.
    fn legacy_error() -> ImageError {
        ImageError::Encryption(
            "Writing to images with legacy AES encryption is not supported (it is insecure): \
             convert the image to LUKS encryption"
                .into(),
        )
    }

    /// Refuses guest data I/O on an encrypted image opened without its secret, and writes
    /// (`write`) with a cipher this engine only reads.
    pub(in crate::image) fn refuse_locked(&self, write: bool) -> Result<(), ImageError> {
        match &self.encryption {
            Encryption::None => Ok(()),
            Encryption::Locked(method) => Err(Self::locked_error(method)),
            Encryption::Unlocked {
                writable: false, ..
            } if write => Err(Self::legacy_error()),
            Encryption::Unlocked { .. } => Ok(()),
        }
    }

    /// Reads `out.len()` bytes of guest data at `host` of `storage` (a data cluster, or part of
    /// one, whose guest offset is `guest`), deciphered when the image is encrypted.
    pub(in crate::image) fn read_data(
        &self,
        storage: &Arc<dyn Storage>,
        host: u64,
        guest: u64,
        out: &mut [u8],
    ) -> Result<(), ImageError> {
        let (cipher, iv) = match &self.encryption {
            Encryption::None => return Ok(super::read::reader::read_run(storage, host, out)?),
            Encryption::Locked(method) => return Err(Self::locked_error(method)),
            Encryption::Unlocked { cipher, iv, .. } => (cipher, *iv),
        };
        let base = match iv {
            IvFrom::Host => host,
            IvFrom::Guest => guest,
        };
        let sector = SECTOR_SIZE - 1;
        let head = (host & sector) as usize;
        let end = host + out.len() as u64;
        if head == 0 && end & sector == 0 {
            super::read::reader::read_run(storage, host, out)?;
            return split_work(out, true, &|at, part| cipher.decrypt(base + at, part));
        }
        // Part of a sector: the whole sectors are read and deciphered, the part copied out.
        let start = host - head as u64;
        let mut whole = vec![0u8; ((end + sector) & !sector).saturating_sub(start) as usize];
        super::read::reader::read_run(storage, start, &mut whole)?;
        split_work(&mut whole, true, &|at, part| {
            cipher.decrypt(base - head as u64 + at, part)
        })?;
        out.copy_from_slice(&whole[head..head + out.len()]);
        Ok(())
    }

    /// `bytes` as they are to be stored at `host` (guest data): enciphered into a new buffer
    /// when the image is encrypted, else `None` (store them as they are). `parallel` lets a
    /// long buffer be ciphered on two threads (not on the copy threads of a convert, which are
    /// already one per core).
    pub(in crate::image) fn cipher_for_disk(
        &self,
        host: u64,
        bytes: &[u8],
        parallel: bool,
    ) -> Result<Option<Vec<u8>>, ImageError> {
        let cipher = match &self.encryption {
            Encryption::None => return Ok(None),
            Encryption::Locked(method) => return Err(Self::locked_error(method)),
            Encryption::Unlocked {
                cipher,
                writable: true,
                ..
            } => cipher,
            Encryption::Unlocked { .. } => return Err(Self::legacy_error()),
        };
        if host % SECTOR_SIZE != 0 || bytes.len() as u64 % SECTOR_SIZE != 0 {
            // The write paths widen every write to whole sectors first; this is a bug guard.
            return Err(ImageError::InvalidArgument(format!(
                "encrypted write of {} bytes at {host:#x} is not in whole sectors",
                bytes.len()
            )));
        }
        let mut out = bytes.to_vec();
        split_work(&mut out, parallel, &|at, part| {
            cipher.encrypt(host + at, part)
        })?;
        Ok(Some(out))
    }

    /// For an encrypted image, the write of `bytes` at `at` inside the cluster at guest offset
    /// `cluster` widened to whole sectors, the bytes around it read from the guest's current
    /// view: `(new at, widened bytes)`. `None` when nothing needs widening.
    pub(in crate::image) fn widen_to_sectors(
        &self,
        cluster: u64,
        at: usize,
        bytes: &[u8],
    ) -> Result<Option<(usize, Vec<u8>)>, ImageError> {
        let s = SECTOR_SIZE as usize;
        if !self.encryption.is_encrypted() || (at % s == 0 && bytes.len() % s == 0) {
            return Ok(None);
        }
        let lo = at - at % s;
        let hi = (at + bytes.len()).div_ceil(s) * s;
        let mut buf = vec![0u8; hi - lo];
        // Only the first and last sectors keep bytes of the old view.
        self.read_old(cluster + lo as u64, &mut buf[..s])?;
        if hi - lo > s {
            let last = hi - lo - s;
            self.read_old(cluster + (lo + last) as u64, &mut buf[last..])?;
        }
        buf[at - lo..at - lo + bytes.len()].copy_from_slice(bytes);
        Ok(Some((lo, buf)))
    }
}

#[cfg(test)]
impl Image {
    /// The image with `cipher` as its unlocked LUKS cipher (engine tests with a toy cipher).
    pub(crate) fn with_test_cipher(mut self, cipher: Arc<dyn DataCipher>) -> Self {
        self.encryption = Encryption::Unlocked {
            cipher,
            iv: IvFrom::Host,
            writable: true,
        };
        self
    }
}

#[cfg(test)]
pub(crate) mod test_cipher {
    //! A toy sector cipher for the engine's tests: each byte XORed with its sector number and
    //! position. Not cryptography; it only makes every misplaced offset show.

    use super::*;

    /// XORs each byte with a function of its sector number and its index in the sector.
    #[derive(Debug, Default)]
    pub struct XorCipher;

    fn apply(offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
        if offset % SECTOR_SIZE != 0 || buf.len() as u64 % SECTOR_SIZE != 0 {
            return Err(ImageError::InvalidArgument("unaligned".into()));
        }
        for (k, sector) in buf.chunks_mut(SECTOR_SIZE as usize).enumerate() {
            let n = offset / SECTOR_SIZE + k as u64;
            for (i, b) in sector.iter_mut().enumerate() {
                *b ^= (n.wrapping_mul(131) as u8) ^ (i as u8) ^ 0xA5;
            }
        }
        Ok(())
    }

    impl DataCipher for XorCipher {
        fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            apply(offset, buf)
        }
        fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), ImageError> {
            apply(offset, buf)
        }
    }
}
