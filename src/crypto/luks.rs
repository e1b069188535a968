//! An unlocked LUKS volume ([`Luks`]): key slots opened with a secret, new header areas laid
//! out and filled as QEMU's `qcrypto_block_luks_create` fills them.
//!
//! Unlocking (QEMU's `qcrypto_block_luks_load_key`, slot by slot): the slot key is PBKDF2 of the
//! secret with the slot's salt and iterations; it decrypts the slot's `key_bytes * 4000` bytes
//! of key material with the volume's cipher and IV generator, sector numbers from 0 at the
//! material's start; the AF splitter merges them into a candidate master key; the candidate is
//! right when the first 20 bytes of PBKDF2 of it, with the header's salt and iterations, equal
//! the header's digest (compared in constant time).
//!
//! The secret is used as given. QEMU's secret objects refuse data that is not UTF-8 or holds a
//! NUL (QEMU hashes the password up to its first NUL), so a secret QEMU accepts means the same
//! here; checking that is the caller's part.
//!
//! Iteration counts come from the file: QEMU caps none of them, nor does this code, so a
//! hostile header can make an unlock run for as long as 2^32 PBKDF2 iterations take per active
//! slot. A caller that opens untrusted images can read them from [`LuksHeader::parse`] first.

use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::af::{af_merge, af_split, HashAlg};
use super::cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
use super::luks_header::{
    c_field, split_key_sectors, KeySlot, LuksHeader, LuksInfo, LuksParams, DIGEST_LEN,
    KEY_SLOT_DISABLED, KEY_SLOT_ENABLED, LUKS_KEY_SLOT_OFFSET, LUKS_MAGIC, LUKS_NUM_KEY_SLOTS,
    LUKS_STRIPES, LUKS_VERSION, SALT_LEN,
};
use super::CryptoError;

/// QEMU's minimum PBKDF2 iterations of a key slot.
pub const MIN_SLOT_KEY_ITERS: u64 = 1000;
/// QEMU's minimum PBKDF2 iterations of the master key digest.
pub const MIN_MASTER_KEY_ITERS: u64 = 1000;

const HEADER_SECTORS: u64 = LUKS_KEY_SLOT_OFFSET / SECTOR_SIZE;

/// How to make a new LUKS header (QEMU's `encrypt.*` creation options); [`Default`] gives
/// QEMU's defaults: aes-256, xts, plain64, sha256, 2000 ms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LuksCreateOptions {
    /// `cipher-alg`.
    pub cipher_alg: CipherAlg,
    /// `cipher-mode`.
    pub cipher_mode: CipherMode,
    /// `ivgen-alg`.
    pub ivgen_alg: IvGenAlg,
    /// `ivgen-hash-alg`: sha256 when essiv is asked for without one; written into the header
    /// (and ignored) with the other generators, as QEMU does.
    pub ivgen_hash_alg: Option<HashAlg>,
    /// `hash-alg`.
    pub hash_alg: HashAlg,
    /// `iter-time`: the milliseconds of CPU time PBKDF2 of the secret should take.
    pub iter_time_ms: u64,
}

impl Default for LuksCreateOptions {
    fn default() -> Self {
        LuksCreateOptions {
            cipher_alg: CipherAlg::Aes256,
            cipher_mode: CipherMode::Xts,
            ivgen_alg: IvGenAlg::Plain64,
            ivgen_hash_alg: None,
            hash_alg: HashAlg::Sha256,
            iter_time_ms: 2000,
        }
    }
}

impl LuksCreateOptions {
    /// The IV hash QEMU uses: sha256 for essiv when none is given.
    fn effective_ivgen_hash(&self) -> Option<HashAlg> {
        match (self.ivgen_alg, self.ivgen_hash_alg) {
            (IvGenAlg::Essiv, None) => Some(HashAlg::Sha256),
            (_, h) => h,
        }
    }

    fn key_bytes(&self) -> u32 {
        self.cipher_mode.key_len(self.cipher_alg) as u32
    }
}

/// An unlocked LUKS volume: its header and the sector cipher with the master key.
///
/// `Debug` shows the header's public fields and the algorithms, never key material. The master
/// key itself is not kept: only the cipher's key schedules, wiped on drop.
#[derive(Debug)]
pub struct Luks {
    header: LuksHeader,
    params: LuksParams,
    cipher: SectorCipher,
}

impl Luks {
    /// Unlocks the volume whose whole header area is `area` (as stored in the qcow2 file: the
    /// header, then the key material at offsets relative to the area's start) with `secret`.
    ///
    /// Errors: the header's own problems in QEMU's words, key material outside the area, and
    /// [`CryptoError::InvalidPassword`] when no active slot opens.
    pub fn unlock(area: &[u8], secret: &[u8]) -> Result<Luks, CryptoError> {
        let (header, params) = LuksHeader::parse(area)?;
        let master_key = find_key(&header, &params, area, secret)?;
        let cipher = volume_cipher(&params, &master_key)?;
        Ok(Luks {
            header,
            params,
            cipher,
        })
    }

    /// Bytes of the header area [`Luks::create`] makes for `opts` (the payload offset): the
    /// header's 4096 bytes and 8 key slots of `key_bytes * 4000` bytes, each rounded up to
    /// 4096. 2,068,480 bytes for QEMU's default aes-256-xts.
    pub fn area_len(opts: &LuksCreateOptions) -> u64 {
        let slot = split_key_sectors(opts.key_bytes(), LUKS_STRIPES);
        (HEADER_SECTORS + LUKS_NUM_KEY_SLOTS as u64 * slot) * SECTOR_SIZE
    }

    /// Makes a new header area for `opts`, slot 0 opened by `secret`, as QEMU makes it: a
    /// random master key, salts and UUID, PBKDF2 iterations measured on this machine for
    /// `iter_time_ms` (the master key digest gets an eighth of that time), slot `i`'s material
    /// at 4096 plus `i` slot lengths, the rest of the area zeros. Returns the area and the
    /// unlocked volume.
    pub fn create(opts: &LuksCreateOptions, secret: &[u8]) -> Result<(Vec<u8>, Luks), CryptoError> {
        let key_bytes = opts.key_bytes();
        let material_len = u64::from(key_bytes) * u64::from(LUKS_STRIPES);
        if material_len % SECTOR_SIZE != 0 {
            return Err(CryptoError::KeyMaterialUnaligned {
                cipher: opts.cipher_alg,
                mode: opts.cipher_mode,
                bytes: material_len,
            });
        }
        let ivgen_hash = opts.effective_ivgen_hash();
        let mode_spec = match ivgen_hash {
            Some(h) => format!("{}-{}:{}", opts.cipher_mode, opts.ivgen_alg, h),
            None => format!("{}-{}", opts.cipher_mode, opts.ivgen_alg),
        };
        let params = LuksParams {
            cipher_alg: opts.cipher_alg,
            cipher_mode: opts.cipher_mode,
            ivgen_alg: opts.ivgen_alg,
            ivgen_hash_alg: ivgen_hash,
            hash_alg: opts.hash_alg,
        };
        if opts.ivgen_alg == IvGenAlg::Essiv {
            if let Some(h) = ivgen_hash {
                super::cipher::essiv_cipher(opts.cipher_alg, h)?;
            }
        }
        let mut mk_digest_salt = [0u8; SALT_LEN];
        random(&mut mk_digest_salt)?;
        let mut master_key = Zeroizing::new(vec![0u8; key_bytes as usize]);
        random(&mut master_key)?;
        let cipher = volume_cipher(&params, &master_key)?;

        let hash = opts.hash_alg;
        let per_sec = count_iters(hash, &master_key, &mk_digest_salt, DIGEST_LEN)?;
        let mk_iters = scale_iters(per_sec, opts.iter_time_ms)? / 8;
        let mk_digest_iter = iters_u32(mk_iters)?.max(MIN_MASTER_KEY_ITERS as u32);
        let mut mk_digest = [0u8; DIGEST_LEN];
        hash.pbkdf2(&master_key, &mk_digest_salt, mk_digest_iter, &mut mk_digest);

        let slot_sectors = split_key_sectors(key_bytes, LUKS_STRIPES);
        let key_slots = std::array::from_fn(|i| KeySlot {
            active: KEY_SLOT_DISABLED,
            iterations: 0,
            salt: [0; SALT_LEN],
            key_offset_sector: (HEADER_SECTORS + i as u64 * slot_sectors) as u32,
            stripes: LUKS_STRIPES,
        });
        let mut header = LuksHeader {
            magic: LUKS_MAGIC,
            version: LUKS_VERSION,
            cipher_name: c_field("aes"),
            cipher_mode: c_field(&mode_spec),
            hash_spec: c_field(hash.name()),
            payload_offset_sector: (Self::area_len(opts) / SECTOR_SIZE) as u32,
            key_bytes,
            mk_digest,
            mk_digest_salt,
            mk_digest_iter,
            uuid: c_field(&new_uuid()?),
            key_slots,
        };
        let mut area = vec![0u8; Self::area_len(opts) as usize];
        store_key(
            &mut header,
            &params,
            0,
            secret,
            &master_key,
            opts.iter_time_ms,
            &mut area,
        )?;
        area[..super::luks_header::LUKS_HEADER_LEN].copy_from_slice(&header.to_bytes());
        Ok((
            area,
            Luks {
                header,
                params,
                cipher,
            },
        ))
    }

    /// The header as read or made.
    pub fn header(&self) -> &LuksHeader {
        &self.header
    }

    /// What the header names.
    pub fn params(&self) -> &LuksParams {
        &self.params
    }

    /// The `encrypt` object of `qemu-img info`.
    pub fn info(&self) -> LuksInfo {
        self.header.info(&self.params)
    }

    /// The sector cipher with the master key.
    pub fn cipher(&self) -> &SectorCipher {
        &self.cipher
    }

    /// Encrypts whole sectors in place; see [`SectorCipher::encrypt`].
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.cipher.encrypt(offset, buf)
    }

    /// Decrypts whole sectors in place; see [`SectorCipher::decrypt`].
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        self.cipher.decrypt(offset, buf)
    }
}

fn volume_cipher(p: &LuksParams, key: &[u8]) -> Result<SectorCipher, CryptoError> {
    SectorCipher::new(
        p.cipher_alg,
        p.cipher_mode,
        p.ivgen_alg,
        p.ivgen_hash_alg,
        key,
    )
}

/// The byte range of slot `i`'s material: `key_bytes * stripes` bytes, and the whole sectors
/// that hold them (cryptsetup encrypts the last partial sector whole).
fn material_range(
    header: &LuksHeader,
    i: usize,
    area_len: usize,
) -> Result<(usize, usize, usize), CryptoError> {
    let slot = &header.key_slots[i];
    let len = u64::from(header.key_bytes) * u64::from(slot.stripes);
    let offset = slot.key_offset();
    let outside = || CryptoError::OutsideArea {
        what: format!("key slot {i} material"),
        offset,
        len,
        area_len: area_len as u64,
    };
    let end = offset
        .checked_add(len)
        .filter(|&e| e <= area_len as u64)
        .ok_or_else(outside)?;
    let padded_end = offset + len.next_multiple_of(SECTOR_SIZE);
    Ok((
        offset as usize,
        end as usize,
        padded_end.min(area_len as u64) as usize,
    ))
}

/// QEMU's `qcrypto_block_luks_find_key`: the master key from the first active slot `secret`
/// opens.
pub(super) fn find_key(
    header: &LuksHeader,
    params: &LuksParams,
    area: &[u8],
    secret: &[u8],
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let mut candidate = Zeroizing::new(vec![0u8; header.key_bytes as usize]);
    for (i, slot) in header.key_slots.iter().enumerate() {
        if slot.is_active() && load_key(header, params, i, slot, area, secret, &mut candidate)? {
            return Ok(candidate);
        }
    }
    Err(CryptoError::InvalidPassword)
}

/// QEMU's `qcrypto_block_luks_load_key` for slot `i`: whether `secret` opens it, the master key
/// then in `candidate`.
fn load_key(
    header: &LuksHeader,
    params: &LuksParams,
    i: usize,
    slot: &KeySlot,
    area: &[u8],
    secret: &[u8],
    candidate: &mut [u8],
) -> Result<bool, CryptoError> {
    let hash = params.hash_alg;
    let (start, end, padded_end) = material_range(header, i, area.len())?;
    let mut slot_key = Zeroizing::new(vec![0u8; candidate.len()]);
    hash.pbkdf2(secret, &slot.salt, slot.iterations, &mut slot_key);
    let sectors = (end - start).div_ceil(SECTOR_SIZE as usize) * SECTOR_SIZE as usize;
    let mut material = Zeroizing::new(vec![0u8; sectors]);
    material[..padded_end - start].copy_from_slice(&area[start..padded_end]);
    volume_cipher(params, &slot_key)?.decrypt(0, &mut material)?;
    af_merge(hash, &material[..end - start], slot.stripes, candidate)?;
    let mut digest = Zeroizing::new([0u8; DIGEST_LEN]);
    hash.pbkdf2(
        candidate,
        &header.mk_digest_salt,
        header.mk_digest_iter,
        &mut *digest,
    );
    Ok(bool::from(digest.ct_eq(&header.mk_digest)))
}

/// QEMU's `qcrypto_block_luks_store_key`: fills slot `i` for `secret` in `header` and `area`.
fn store_key(
    header: &mut LuksHeader,
    params: &LuksParams,
    i: usize,
    secret: &[u8],
    master_key: &[u8],
    iter_time_ms: u64,
    area: &mut [u8],
) -> Result<(), CryptoError> {
    let hash = params.hash_alg;
    let mut salt = [0u8; SALT_LEN];
    random(&mut salt)?;
    let per_sec = count_iters(hash, secret, &salt, master_key.len())?;
    let iters = iters_u32(scale_iters(per_sec, iter_time_ms)?)?.max(MIN_SLOT_KEY_ITERS as u32);
    let mut slot_key = Zeroizing::new(vec![0u8; master_key.len()]);
    hash.pbkdf2(secret, &salt, iters, &mut slot_key);
    let (start, end, _) = material_range(header, i, area.len())?;
    let material = &mut area[start..end];
    af_split(hash, master_key, header.key_slots[i].stripes, material)?;
    volume_cipher(params, &slot_key)?.encrypt(0, material)?;
    let slot = &mut header.key_slots[i];
    slot.salt = salt;
    slot.iterations = iters;
    slot.active = KEY_SLOT_ENABLED;
    Ok(())
}

/// Iterations per second of CPU time times `iter_time_ms` / 1000, with QEMU's overflow check
/// (`iter-time` 0 fails it too: QEMU divides by it).
fn scale_iters(per_sec: u64, iter_time_ms: u64) -> Result<u64, CryptoError> {
    if iter_time_ms == 0 || per_sec > u64::MAX / iter_time_ms {
        return Err(CryptoError::IterationsTooLargeToScale(per_sec));
    }
    Ok(per_sec * iter_time_ms / 1000)
}

fn iters_u32(iters: u64) -> Result<u32, CryptoError> {
    u32::try_from(iters).map_err(|_| CryptoError::IterationsTooLarge(iters))
}

/// QEMU's `qcrypto_pbkdf2_count_iters`: PBKDF2 iterations (for `out_len` bytes of output) per
/// second of this thread's CPU time, measured from 2^15 iterations up until a run takes more
/// than half a second.
pub fn count_iters(
    hash: HashAlg,
    key: &[u8],
    salt: &[u8],
    out_len: usize,
) -> Result<u64, CryptoError> {
    let mut out = Zeroizing::new(vec![0u8; out_len]);
    let mut iterations: u64 = 1 << 15;
    let mut scaled = 0;
    let delta_ms = loop {
        let start = thread_cpu_ms()?;
        hash.pbkdf2(
            key,
            salt,
            u32::try_from(iterations).unwrap_or(u32::MAX),
            &mut out,
        );
        let delta_ms = thread_cpu_ms()?.saturating_sub(start);
        if scaled > 5 && delta_ms == 0 {
            return Err(CryptoError::CpuUsage);
        } else if delta_ms > 500 {
            break delta_ms;
        } else if delta_ms < 100 {
            iterations *= 10;
        } else {
            iterations = iterations * 1000 / delta_ms;
        }
        scaled += 1;
    };
    Ok(iterations * 1000 / delta_ms)
}

/// User CPU time of this thread in milliseconds (QEMU: `getrusage(RUSAGE_THREAD)`).
#[cfg(target_os = "linux")]
fn thread_cpu_ms() -> Result<u64, CryptoError> {
    // SAFETY: `rusage` is plain data; getrusage only writes into the struct it is given.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid pointer to a live `rusage`.
    if unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) } != 0 {
        return Err(CryptoError::CpuUsage);
    }
    Ok(ru.ru_utime.tv_sec as u64 * 1000 + ru.ru_utime.tv_usec as u64 / 1000)
}

/// Elsewhere, wall-clock time stands in for the thread's CPU time.
#[cfg(not(target_os = "linux"))]
fn thread_cpu_ms() -> Result<u64, CryptoError> {
    use std::sync::OnceLock;
    use std::time::Instant;
    static START: OnceLock<Instant> = OnceLock::new();
    Ok(START.get_or_init(Instant::now).elapsed().as_millis() as u64)
}

fn random(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::fill(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// A random (version 4) UUID as text, as `qemu_uuid_generate` and `qemu_uuid_unparse` make it.
fn new_uuid() -> Result<String, CryptoError> {
    let mut u = [0u8; 16];
    random(&mut u)?;
    u[6] = (u[6] & 0x0f) | 0x40;
    u[8] = (u[8] & 0x3f) | 0x80;
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!(
        "{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..16].concat()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlocked_volume_can_be_shared_between_threads() {
        fn shared<T: Send + Sync>() {}
        shared::<Luks>();
        shared::<SectorCipher>();
    }

    #[test]
    fn area_lengths_match_qemu() {
        // The payload offsets qemu-img info shows for volumes it made with these options.
        let with = |cipher_alg, cipher_mode| LuksCreateOptions {
            cipher_alg,
            cipher_mode,
            ..Default::default()
        };
        assert_eq!(Luks::area_len(&LuksCreateOptions::default()), 2_068_480);
        assert_eq!(
            Luks::area_len(&with(CipherAlg::Aes128, CipherMode::Cbc)),
            528_384
        );
        assert_eq!(
            Luks::area_len(&with(CipherAlg::Aes128, CipherMode::Xts)),
            1_052_672
        );
        assert_eq!(
            Luks::area_len(&with(CipherAlg::Aes192, CipherMode::Xts)),
            1_544_192
        );
        assert_eq!(
            Luks::area_len(&with(CipherAlg::Aes256, CipherMode::Cbc)),
            1_052_672
        );
    }

    #[test]
    fn created_areas_unlock_and_are_laid_out_as_qemu_lays_them_out() {
        let opts = LuksCreateOptions {
            iter_time_ms: 10,
            ..Default::default()
        };
        let (area, made) = Luks::create(&opts, b"s3cret").unwrap();
        assert_eq!(area.len(), 2_068_480);
        let info = made.info();
        let offsets: Vec<u64> = info.slots.iter().map(|s| s.key_offset).collect();
        assert_eq!(
            offsets,
            [4096, 262144, 520192, 778240, 1036288, 1294336, 1552384, 1810432]
        );
        assert_eq!(info.payload_offset, 2_068_480);
        assert!(info.slots[0].active && info.slots[1..].iter().all(|s| !s.active));
        assert!(info.slots[0].iters.unwrap() >= 1000 && info.master_key_iters >= 1000);
        assert_eq!(info.slots[0].stripes, Some(4000));
        assert_eq!((info.uuid.len(), &info.uuid[14..15]), (36, "4"));
        assert_eq!(c_string_of(&made.header().cipher_mode), "xts-plain64");
        // Empty slots' material is zeros.
        assert!(area[262144..].iter().all(|&b| b == 0));

        let opened = Luks::unlock(&area, b"s3cret").unwrap();
        assert_eq!(opened.header(), made.header());
        let mut buf = vec![0x42u8; 4096];
        made.encrypt(1 << 20, &mut buf).unwrap();
        opened.decrypt(1 << 20, &mut buf).unwrap();
        assert_eq!(buf, vec![0x42u8; 4096]);
        assert_eq!(
            Luks::unlock(&area, b"s3cret!").unwrap_err(),
            CryptoError::InvalidPassword
        );
        let shown = format!("{made:?}");
        assert!(
            !shown.contains("s3cret") && !shown.contains("salt"),
            "{shown}"
        );

        let essiv = LuksCreateOptions {
            cipher_alg: CipherAlg::Aes128,
            cipher_mode: CipherMode::Cbc,
            ivgen_alg: IvGenAlg::Essiv,
            hash_alg: HashAlg::Sha1,
            iter_time_ms: 10,
            ..Default::default()
        };
        let (area, made) = Luks::create(&essiv, b"").unwrap();
        assert_eq!(c_string_of(&made.header().cipher_mode), "cbc-essiv:sha256");
        Luks::unlock(&area, b"").unwrap();
    }

    fn c_string_of(field: &[u8]) -> String {
        super::super::luks_header::c_string(field)
    }

    #[test]
    fn creation_refusals() {
        let cbc192 = LuksCreateOptions {
            cipher_alg: CipherAlg::Aes192,
            cipher_mode: CipherMode::Cbc,
            ..Default::default()
        };
        assert_eq!(
            Luks::create(&cbc192, b"x").unwrap_err().to_string(),
            "Cipher aes-192 in mode cbc is not supported: its key material of 96000 bytes is not a \
             whole number of 512-byte sectors (qemu-img aborts on it)"
        );
        let sha1 = LuksCreateOptions {
            ivgen_alg: IvGenAlg::Essiv,
            ivgen_hash_alg: Some(HashAlg::Sha1),
            ..Default::default()
        };
        assert_eq!(
            Luks::create(&sha1, b"x").unwrap_err(),
            CryptoError::NoEssivCipher(20)
        );
        assert_eq!(
            scale_iters(5, 0),
            Err(CryptoError::IterationsTooLargeToScale(5))
        );
        assert_eq!(
            scale_iters(u64::MAX / 3, 4).unwrap_err().to_string(),
            format!(
                "PBKDF iterations {} too large to scale: Numerical result out of range",
                u64::MAX / 3
            )
        );
        assert_eq!(scale_iters(1_000_000, 2000), Ok(2_000_000));
        assert_eq!(
            iters_u32(1 << 32).unwrap_err().to_string(),
            "PBKDF iterations 4294967296 larger than 4294967295: Numerical result out of range"
        );
    }
}
