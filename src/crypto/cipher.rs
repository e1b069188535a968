//! The sector cipher: AES-128/192/256 in XTS, CBC, ECB or CTR mode over 512-byte sectors, each
//! sector with its own IV from the plain, plain64 or essiv generator (QEMU's `crypto/block.c`,
//! `crypto/ivgen-*.c`).
//!
//! - `plain`: the sector number's low 32 bits, little-endian, zero-padded to 16 bytes.
//! - `plain64`: the sector number, 64-bit little-endian, zero-padded.
//! - `essiv:HASH`: the plain64 block encrypted (AES-ECB) under `HASH(key)`. The ESSIV cipher's
//!   key size is the digest's length (dm-crypt's rule, QEMU's `qcrypto_block_luks_essiv_cipher`):
//!   AES-128 with `essiv:sha256` uses AES-256 for the IVs.
//!
//! XTS (IEEE P1619) takes a key twice the cipher's size: the first half encrypts the data, the
//! second encrypts the IV into the tweak. A sector is 32 blocks, so no ciphertext stealing. ECB
//! uses no IV; CTR counts from the IV as a big-endian 128-bit number.
//!
//! Speed: every mode hands the `aes` crate whole runs of blocks (`encrypt_blocks`), which it
//! pipelines through AES-NI when the processor has it. Sectors go in chunks of eight: their IVs
//! and XTS tweaks are computed as one batch, and CBC encryption, serial within a sector, runs
//! the eight sectors' chains side by side. The modes are written here over the block calls
//! (they are short) rather than taken from `xts-mode` and `cbc`, which work a sector at a time.

use std::fmt;

use aes::cipher::consts::U16;
use aes::cipher::{BlockDecrypt, BlockEncrypt, BlockSizeUser, KeyInit};
use aes::{Aes128, Aes192, Aes256, Block};
use zeroize::Zeroizing;

use super::af::{HashAlg, MAX_DIGEST_LEN};
use super::CryptoError;

/// The unit of encryption: every LUKS volume QEMU writes uses 512-byte sectors.
pub const SECTOR_SIZE: u64 = 512;

const SECTOR: usize = SECTOR_SIZE as usize;
const BLOCKS_PER_SECTOR: usize = SECTOR / 16;
const CHUNK_SECTORS: usize = 8;
const CHUNK_BLOCKS: usize = CHUNK_SECTORS * BLOCKS_PER_SECTOR;

qemu_names! {
    /// A block cipher with its key size, as QEMU names it (`QCryptoCipherAlgo`). Only AES is
    /// implemented.
    pub enum CipherAlg {
        /// `aes-128`.
        Aes128 = "aes-128",
        /// `aes-192`.
        Aes192 = "aes-192",
        /// `aes-256`, QEMU's default.
        Aes256 = "aes-256",
    }
}

impl CipherAlg {
    /// The algorithm QEMU calls `name` (`aes-256`).
    pub fn from_name(name: &str) -> Option<CipherAlg> {
        Self::lookup(name)
    }

    /// Bytes of one key.
    pub fn key_len(self) -> usize {
        match self {
            CipherAlg::Aes128 => 16,
            CipherAlg::Aes192 => 24,
            CipherAlg::Aes256 => 32,
        }
    }

    /// The AES variant with keys of `len` bytes.
    pub fn from_key_len(len: usize) -> Option<CipherAlg> {
        Self::ALL.iter().copied().find(|a| a.key_len() == len)
    }
}

qemu_names! {
    /// A block cipher mode, as QEMU names it (`QCryptoCipherMode`).
    pub enum CipherMode {
        /// `ecb`: no IV.
        Ecb = "ecb",
        /// `cbc`.
        Cbc = "cbc",
        /// `xts`, QEMU's default: a double-length key.
        Xts = "xts",
        /// `ctr`.
        Ctr = "ctr",
    }
}

impl CipherMode {
    /// The mode QEMU calls `name`, or QEMU's refusal.
    pub fn from_name(name: &str) -> Result<CipherMode, CryptoError> {
        Self::lookup(name).ok_or_else(|| CryptoError::UnknownCipherMode(name.to_owned()))
    }

    /// Bytes of key `alg` needs in this mode (twice the cipher's in XTS): the LUKS `key_bytes`.
    pub fn key_len(self, alg: CipherAlg) -> usize {
        alg.key_len() * if self == CipherMode::Xts { 2 } else { 1 }
    }
}

qemu_names! {
    /// An IV generator, as QEMU names it (`QCryptoIVGenAlgo`).
    pub enum IvGenAlg {
        /// `plain`: the sector number truncated to 32 bits.
        Plain = "plain",
        /// `plain64`, QEMU's default.
        Plain64 = "plain64",
        /// `essiv`: the sector number encrypted under a hash of the key.
        Essiv = "essiv",
    }
}

impl IvGenAlg {
    /// The generator QEMU calls `name`, or QEMU's refusal.
    pub fn from_name(name: &str) -> Result<IvGenAlg, CryptoError> {
        Self::lookup(name).ok_or_else(|| CryptoError::UnknownIvGen(name.to_owned()))
    }
}

/// The cipher ESSIV uses with `cipher` and `hash`: the AES variant whose key is as long as the
/// digest (QEMU's `qcrypto_block_luks_essiv_cipher`).
pub fn essiv_cipher(cipher: CipherAlg, hash: HashAlg) -> Result<CipherAlg, CryptoError> {
    let digest_len = hash.digest_len();
    if digest_len == cipher.key_len() {
        return Ok(cipher);
    }
    CipherAlg::from_key_len(digest_len).ok_or(CryptoError::NoEssivCipher(digest_len))
}

/// An AES key schedule of any size (round keys wiped on drop by the `aes` crate).
enum Aes {
    A128(Aes128),
    A192(Aes192),
    A256(Aes256),
}

impl Aes {
    /// `key` is exactly `alg.key_len()` bytes (checked by the callers).
    fn new(alg: CipherAlg, key: &[u8]) -> Result<Aes, CryptoError> {
        let bad = |_| CryptoError::KeyLength {
            found: key.len(),
            expected: alg.key_len(),
        };
        Ok(match alg {
            CipherAlg::Aes128 => Aes::A128(Aes128::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes192 => Aes::A192(Aes192::new_from_slice(key).map_err(bad)?),
            CipherAlg::Aes256 => Aes::A256(Aes256::new_from_slice(key).map_err(bad)?),
        })
    }

    fn encrypt_blocks(&self, blocks: &mut [Block]) {
        match self {
            Aes::A128(c) => c.encrypt_blocks(blocks),
            Aes::A192(c) => c.encrypt_blocks(blocks),
            Aes::A256(c) => c.encrypt_blocks(blocks),
        }
    }
}

/// One key size's keys, by mode.
enum Engine<C> {
    Ecb(C),
    Cbc(C),
    Ctr(C),
    Xts { data: C, tweak: C },
}

impl<C: KeyInit> Engine<C> {
    fn new(mode: CipherMode, key: &[u8]) -> Option<Engine<C>> {
        Some(match mode {
            CipherMode::Ecb => Engine::Ecb(C::new_from_slice(key).ok()?),
            CipherMode::Cbc => Engine::Cbc(C::new_from_slice(key).ok()?),
            CipherMode::Ctr => Engine::Ctr(C::new_from_slice(key).ok()?),
            CipherMode::Xts => {
                let (data, tweak) = key.split_at(key.len() / 2);
                Engine::Xts {
                    data: C::new_from_slice(data).ok()?,
                    tweak: C::new_from_slice(tweak).ok()?,
                }
            }
        })
    }
}

/// Boxed: the key schedules differ in size.
enum Keys {
    A128(Box<Engine<Aes128>>),
    A192(Box<Engine<Aes192>>),
    A256(Box<Engine<Aes256>>),
}

/// The IV generator with its key, if any.
enum IvGen {
    /// ECB: no IV.
    None,
    Plain,
    Plain64,
    Essiv(Box<Aes>),
}

impl IvGen {
    /// The IVs of the sectors from `sector` on, one per element of `ivs`.
    fn fill(&self, sector: u64, ivs: &mut [Block]) {
        for (k, iv) in ivs.iter_mut().enumerate() {
            let n = sector.wrapping_add(k as u64);
            let n = if matches!(self, IvGen::Plain) {
                u128::from(n as u32)
            } else {
                u128::from(n)
            };
            *iv = Block::from(n.to_le_bytes());
        }
        if let IvGen::Essiv(aes) = self {
            aes.encrypt_blocks(ivs);
        }
    }
}

/// A sector cipher with its key: encrypts and decrypts whole 512-byte sectors in place, the
/// first sector's number being the byte offset divided by 512.
///
/// `Debug` shows the algorithms only, never key material.
pub struct SectorCipher {
    alg: CipherAlg,
    mode: CipherMode,
    ivgen_alg: IvGenAlg,
    keys: Keys,
    ivgen: IvGen,
}

impl fmt::Debug for SectorCipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SectorCipher")
            .field("alg", &self.alg)
            .field("mode", &self.mode)
            .field("ivgen", &self.ivgen_alg)
            .finish_non_exhaustive()
    }
}

impl SectorCipher {
    /// The cipher for `key` (`mode.key_len(alg)` bytes). `ivgen_hash` is needed with
    /// [`IvGenAlg::Essiv`] and ignored otherwise.
    pub fn new(
        alg: CipherAlg,
        mode: CipherMode,
        ivgen_alg: IvGenAlg,
        ivgen_hash: Option<HashAlg>,
        key: &[u8],
    ) -> Result<SectorCipher, CryptoError> {
        let expected = mode.key_len(alg);
        let wrong = || CryptoError::KeyLength {
            found: key.len(),
            expected,
        };
        if key.len() != expected {
            return Err(wrong());
        }
        let ivgen = match (mode, ivgen_alg) {
            (CipherMode::Ecb, _) => IvGen::None,
            (_, IvGenAlg::Plain) => IvGen::Plain,
            (_, IvGenAlg::Plain64) => IvGen::Plain64,
            (_, IvGenAlg::Essiv) => {
                let hash = ivgen_hash.ok_or(CryptoError::MissingIvGenHash)?;
                let essiv_alg = essiv_cipher(alg, hash)?;
                let mut salt = Zeroizing::new([0u8; MAX_DIGEST_LEN]);
                hash.digest_into(&[key], &mut salt);
                IvGen::Essiv(Box::new(Aes::new(essiv_alg, &salt[..essiv_alg.key_len()])?))
            }
        };
        let keys = match alg {
            CipherAlg::Aes128 => Keys::A128(Box::new(Engine::new(mode, key).ok_or_else(wrong)?)),
            CipherAlg::Aes192 => Keys::A192(Box::new(Engine::new(mode, key).ok_or_else(wrong)?)),
            CipherAlg::Aes256 => Keys::A256(Box::new(Engine::new(mode, key).ok_or_else(wrong)?)),
        };
        Ok(SectorCipher {
            alg,
            mode,
            ivgen_alg,
            keys,
            ivgen,
        })
    }

    /// The block cipher.
    pub fn alg(&self) -> CipherAlg {
        self.alg
    }

    /// The mode.
    pub fn mode(&self) -> CipherMode {
        self.mode
    }

    /// The IV generator.
    pub fn ivgen_alg(&self) -> IvGenAlg {
        self.ivgen_alg
    }

    /// Encrypts `buf` in place as the sectors starting at byte `offset`. Both the offset and
    /// the length must be multiples of 512.
    pub fn encrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        let sector = Self::first_sector(offset, buf.len())?;
        self.apply(sector, buf, true);
        Ok(())
    }

    /// Decrypts `buf` in place as the sectors starting at byte `offset`. Both the offset and
    /// the length must be multiples of 512.
    pub fn decrypt(&self, offset: u64, buf: &mut [u8]) -> Result<(), CryptoError> {
        let sector = Self::first_sector(offset, buf.len())?;
        self.apply(sector, buf, false);
        Ok(())
    }

    fn first_sector(offset: u64, len: usize) -> Result<u64, CryptoError> {
        if offset % SECTOR_SIZE != 0 || len % SECTOR != 0 {
            return Err(CryptoError::Unaligned { offset, len });
        }
        Ok(offset / SECTOR_SIZE)
    }

    fn apply(&self, sector: u64, buf: &mut [u8], encrypt: bool) {
        match &self.keys {
            Keys::A128(e) => run(e, &self.ivgen, sector, buf, encrypt),
            Keys::A192(e) => run(e, &self.ivgen, sector, buf, encrypt),
            Keys::A256(e) => run(e, &self.ivgen, sector, buf, encrypt),
        }
    }
}

fn le(bytes: &[u8]) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(bytes);
    u128::from_le_bytes(a)
}

fn block_le(b: &Block) -> u128 {
    u128::from_le_bytes((*b).into())
}

/// Multiplies an XTS tweak by x in GF(2^128) (little-endian, IEEE P1619).
fn mul_x(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

fn run<C>(engine: &Engine<C>, ivgen: &IvGen, first_sector: u64, buf: &mut [u8], encrypt: bool)
where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let mut ivs = [Block::default(); CHUNK_SECTORS];
    let mut scratch = [Block::default(); CHUNK_BLOCKS];
    let mut sector = first_sector;
    for chunk in buf.chunks_mut(CHUNK_SECTORS * SECTOR) {
        let n = chunk.len() / SECTOR;
        let nb = n * BLOCKS_PER_SECTOR;
        let ivs = &mut ivs[..n];
        let scratch = &mut scratch[..nb];
        ivgen.fill(sector, ivs);
        match engine {
            Engine::Ecb(c) => {
                for (s, b) in scratch.iter_mut().zip(chunk.chunks_exact(16)) {
                    s.copy_from_slice(b);
                }
                if encrypt {
                    c.encrypt_blocks(scratch);
                } else {
                    c.decrypt_blocks(scratch);
                }
                for (s, b) in scratch.iter().zip(chunk.chunks_exact_mut(16)) {
                    b.copy_from_slice(s);
                }
            }
            Engine::Xts { data, tweak } => xts(data, tweak, ivs, chunk, scratch, encrypt),
            Engine::Cbc(c) if encrypt => cbc_encrypt(c, ivs, chunk),
            Engine::Cbc(c) => cbc_decrypt(c, ivs, chunk, scratch),
            Engine::Ctr(c) => ctr(c, ivs, chunk, scratch),
        }
        sector = sector.wrapping_add(n as u64);
    }
}

fn xts<C>(
    data: &C,
    tweak: &C,
    ivs: &mut [Block],
    chunk: &mut [u8],
    scratch: &mut [Block],
    enc: bool,
) where
    C: BlockEncrypt + BlockDecrypt + BlockSizeUser<BlockSize = U16>,
{
    let mut tweaks = [0u128; CHUNK_BLOCKS];
    tweak.encrypt_blocks(ivs);
    for (iv, ts) in ivs.iter().zip(tweaks.chunks_exact_mut(BLOCKS_PER_SECTOR)) {
        let mut t = block_le(iv);
        for slot in ts {
            *slot = t;
            t = mul_x(t);
        }
    }
    for ((s, b), t) in scratch.iter_mut().zip(chunk.chunks_exact(16)).zip(&tweaks) {
        *s = Block::from((le(b) ^ t).to_le_bytes());
    }
    if enc {
        data.encrypt_blocks(scratch);
    } else {
        data.decrypt_blocks(scratch);
    }
    for ((s, b), t) in scratch.iter().zip(chunk.chunks_exact_mut(16)).zip(&tweaks) {
        b.copy_from_slice(&(block_le(s) ^ t).to_le_bytes());
    }
}

/// CBC encryption: serial within a sector, so the chunk's sectors advance side by side, one
/// block of each per call.
fn cbc_encrypt<C>(c: &C, ivs: &[Block], chunk: &mut [u8])
where
    C: BlockEncrypt + BlockSizeUser<BlockSize = U16>,
{
    let n = ivs.len();
    let mut prev = [0u128; CHUNK_SECTORS];
    for (p, iv) in prev.iter_mut().zip(ivs) {
        *p = block_le(iv);
    }
    let mut lane = [Block::default(); CHUNK_SECTORS];
    for j in 0..BLOCKS_PER_SECTOR {
        for k in 0..n {
            let at = k * SECTOR + j * 16;
            lane[k] = Block::from((le(&chunk[at..at + 16]) ^ prev[k]).to_le_bytes());
        }
        c.encrypt_blocks(&mut lane[..n]);
        for k in 0..n {
            let at = k * SECTOR + j * 16;
            chunk[at..at + 16].copy_from_slice(&lane[k]);
            prev[k] = block_le(&lane[k]);
        }
    }
}

fn cbc_decrypt<C>(c: &C, ivs: &[Block], chunk: &mut [u8], scratch: &mut [Block])
where
    C: BlockDecrypt + BlockSizeUser<BlockSize = U16>,
{
    for (s, b) in scratch.iter_mut().zip(chunk.chunks_exact(16)) {
        s.copy_from_slice(b);
    }
    c.decrypt_blocks(scratch);
    for (k, iv) in ivs.iter().enumerate() {
        let sector = &mut chunk[k * SECTOR..(k + 1) * SECTOR];
        let plain = &scratch[k * BLOCKS_PER_SECTOR..(k + 1) * BLOCKS_PER_SECTOR];
        // Backwards, so that each block's ciphertext predecessor is still in place.
        for j in (0..BLOCKS_PER_SECTOR).rev() {
            let prev = if j == 0 {
                block_le(iv)
            } else {
                le(&sector[(j - 1) * 16..j * 16])
            };
            sector[j * 16..(j + 1) * 16]
                .copy_from_slice(&(block_le(&plain[j]) ^ prev).to_le_bytes());
        }
    }
}

/// CTR: the keystream is the IV, then the IV plus 1, 2, … (big-endian), encrypted.
fn ctr<C>(c: &C, ivs: &[Block], chunk: &mut [u8], scratch: &mut [Block])
where
    C: BlockEncrypt + BlockSizeUser<BlockSize = U16>,
{
    for (iv, ks) in ivs.iter().zip(scratch.chunks_exact_mut(BLOCKS_PER_SECTOR)) {
        let base = u128::from_be_bytes((*iv).into());
        for (j, s) in ks.iter_mut().enumerate() {
            *s = Block::from(base.wrapping_add(j as u128).to_be_bytes());
        }
    }
    c.encrypt_blocks(scratch);
    for (s, b) in scratch.iter().zip(chunk.chunks_exact_mut(16)) {
        for (x, k) in b.iter_mut().zip(s.iter()) {
            *x ^= k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_ciphers() -> Vec<SectorCipher> {
        let mut out = Vec::new();
        for alg in [CipherAlg::Aes128, CipherAlg::Aes192, CipherAlg::Aes256] {
            for mode in [
                CipherMode::Ecb,
                CipherMode::Cbc,
                CipherMode::Xts,
                CipherMode::Ctr,
            ] {
                for iv in [IvGenAlg::Plain, IvGenAlg::Plain64, IvGenAlg::Essiv] {
                    let key: Vec<u8> = (0..mode.key_len(alg) as u8).collect();
                    let hash = Some(HashAlg::Sha256);
                    out.push(SectorCipher::new(alg, mode, iv, hash, &key).unwrap());
                }
            }
        }
        out
    }

    #[test]
    fn round_trips_and_chunking_do_not_change_the_result() {
        let plain: Vec<u8> = (0..512 * 19).map(|i| (i * 7 + i / 512) as u8).collect();
        for c in all_ciphers() {
            let mut whole = plain.clone();
            c.encrypt(512 * 3, &mut whole).unwrap();
            assert_ne!(whole, plain);
            // Sector by sector gives the same bytes as one call over 19 sectors.
            let mut pieces = plain.clone();
            for (i, s) in pieces.chunks_mut(512).enumerate() {
                c.encrypt(512 * (3 + i as u64), s).unwrap();
            }
            assert_eq!(pieces, whole, "{c:?}");
            c.decrypt(512 * 3, &mut whole).unwrap();
            assert_eq!(whole, plain, "{c:?}");
        }
    }

    #[test]
    fn xts_matches_ieee_1619_vector_10() {
        let key: Vec<u8> = [
            "2718281828459045235360287471352662497757247093699959574966967627",
            "3141592653589793238462643383279502884197169399375105820974944592",
        ]
        .iter()
        .flat_map(|h| {
            (0..h.len())
                .step_by(2)
                .map(move |i| u8::from_str_radix(&h[i..i + 2], 16).unwrap())
        })
        .collect();
        let c = SectorCipher::new(
            CipherAlg::Aes256,
            CipherMode::Xts,
            IvGenAlg::Plain64,
            None,
            &key,
        )
        .unwrap();
        let mut buf: Vec<u8> = (0..512).map(|i| i as u8).collect();
        c.encrypt(0xff * 512, &mut buf).unwrap();
        let hex: String = buf[..16].iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "1c3b3a102f770386e4836c99e370cf9b");
    }

    #[test]
    fn refusals() {
        let c = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Cbc,
            IvGenAlg::Plain64,
            None,
            &[0; 16],
        )
        .unwrap();
        let err = c.encrypt(100, &mut [0; 512]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Encryption request not in whole sectors: offset 100 and length 512 must be multiples \
             of 512"
        );
        assert!(c.decrypt(0, &mut [0; 500]).is_err());
        c.decrypt(0, &mut []).unwrap();
        let err = SectorCipher::new(
            CipherAlg::Aes128,
            CipherMode::Xts,
            IvGenAlg::Plain,
            None,
            &[0; 16],
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "Cipher key length 16 should be 32");
        let essiv = |h| {
            SectorCipher::new(
                CipherAlg::Aes128,
                CipherMode::Cbc,
                IvGenAlg::Essiv,
                h,
                &[0; 16],
            )
        };
        assert_eq!(essiv(None).unwrap_err(), CryptoError::MissingIvGenHash);
        assert_eq!(
            essiv(Some(HashAlg::Sha1)).unwrap_err().to_string(),
            "No AES cipher with key size 20 available"
        );
        assert_eq!(
            essiv_cipher(CipherAlg::Aes128, HashAlg::Sha256),
            Ok(CipherAlg::Aes256)
        );
        assert_eq!(
            essiv_cipher(CipherAlg::Aes256, HashAlg::Md5),
            Ok(CipherAlg::Aes128)
        );
        let shown = format!("{c:?}");
        assert_eq!(
            shown,
            "SectorCipher { alg: Aes128, mode: Cbc, ivgen: Plain64, .. }"
        );
    }
}
