//! The LUKS1 header (the first 592 bytes of the header area): fields, QEMU's checks in QEMU's
//! order (`qcrypto_block_luks_check_header`, then `qcrypto_block_luks_parse_header`),
//! serialization, and the typed view `qemu-img info` prints as `encrypt`.
//!
//! Layout (big-endian): magic `LUKS\xba\xbe` (6), version (u16, 1), cipher name (32), cipher
//! mode (32, `MODE-IVGEN[:HASH]`), hash spec (32), payload offset (u32, sectors), key bytes
//! (u32), master key digest (20), its salt (32) and iterations (u32), UUID (40), then 8 key
//! slots of 48 bytes: active (u32, `0x00AC71F3` or `0x0000DEAD`), iterations (u32), salt (32),
//! key material offset (u32, sectors from the area's start), stripes (u32).
//!
//! The slot checks do QEMU's 32-bit arithmetic (a material length that wraps passes them as it
//! passes QEMU's); what keeps every read in bounds is that key material must lie inside the
//! area, checked when a slot is read.

use std::fmt;

use super::af::HashAlg;
use super::cipher::{essiv_cipher, CipherAlg, CipherMode, IvGenAlg, SECTOR_SIZE};
use super::{CryptoError, HeaderString};

/// `LUKS\xba\xbe`.
pub const LUKS_MAGIC: [u8; 6] = *b"LUKS\xba\xbe";
/// The only LUKS version QEMU reads.
pub const LUKS_VERSION: u16 = 1;
/// Bytes of the header.
pub const LUKS_HEADER_LEN: usize = 592;
/// Key slots in a header.
pub const LUKS_NUM_KEY_SLOTS: usize = 8;
/// Anti-forensic stripes of every key slot (QEMU, like cryptsetup, requires 4000).
pub const LUKS_STRIPES: u32 = 4000;
/// Where the first key slot's material starts: the header's 4096 bytes come before it.
pub const LUKS_KEY_SLOT_OFFSET: u64 = 4096;
/// `active` of a slot that holds a key.
pub const KEY_SLOT_ENABLED: u32 = 0x00AC_71F3;
/// `active` of an empty slot.
pub const KEY_SLOT_DISABLED: u32 = 0x0000_DEAD;
/// Bytes of the master key digest.
pub const DIGEST_LEN: usize = 20;
/// Bytes of every salt.
pub const SALT_LEN: usize = 32;
/// Bytes of the UUID field (a 36-character UUID and NULs).
pub const UUID_LEN: usize = 40;

const HEADER_SECTORS: u64 = LUKS_KEY_SLOT_OFFSET / SECTOR_SIZE;
const SLOTS_AT: usize = 208;
const SLOT_LEN: usize = 48;

/// One key slot of the header.
#[derive(Clone, PartialEq, Eq)]
pub struct KeySlot {
    /// [`KEY_SLOT_ENABLED`] or [`KEY_SLOT_DISABLED`] (anything else is corrupt).
    pub active: u32,
    /// PBKDF2 iterations from the secret to the slot key.
    pub iterations: u32,
    /// PBKDF2 salt.
    pub salt: [u8; SALT_LEN],
    /// Start of the key material, in 512-byte sectors from the area's start.
    pub key_offset_sector: u32,
    /// AF stripes of the key material.
    pub stripes: u32,
}

impl KeySlot {
    /// Whether the slot holds a key.
    pub fn is_active(&self) -> bool {
        self.active == KEY_SLOT_ENABLED
    }

    /// Start of the key material in bytes from the area's start.
    pub fn key_offset(&self) -> u64 {
        u64::from(self.key_offset_sector) * SECTOR_SIZE
    }
}

impl fmt::Debug for KeySlot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeySlot")
            .field("active", &format_args!("{:#010x}", self.active))
            .field("iterations", &self.iterations)
            .field("key_offset_sector", &self.key_offset_sector)
            .field("stripes", &self.stripes)
            .finish_non_exhaustive()
    }
}

/// The LUKS header, raw: strings as their fixed-size fields. [`LuksHeader::parse`] checks it
/// and reads its strings as [`LuksParams`].
#[derive(Clone, PartialEq, Eq)]
pub struct LuksHeader {
    /// [`LUKS_MAGIC`] in a valid header.
    pub magic: [u8; 6],
    /// [`LUKS_VERSION`] in a valid header.
    pub version: u16,
    /// Cipher name, NUL-terminated (`aes`).
    pub cipher_name: [u8; 32],
    /// Cipher mode, NUL-terminated (`xts-plain64`).
    pub cipher_mode: [u8; 32],
    /// Hash of PBKDF2 and the AF splitter, NUL-terminated (`sha256`).
    pub hash_spec: [u8; 32],
    /// Start of the payload in 512-byte sectors; in a qcow2 image, the area's length.
    pub payload_offset_sector: u32,
    /// Bytes of the master key (twice the cipher's key in XTS mode).
    pub key_bytes: u32,
    /// The first 20 bytes of PBKDF2 of the master key.
    pub mk_digest: [u8; DIGEST_LEN],
    /// Salt of that PBKDF2.
    pub mk_digest_salt: [u8; SALT_LEN],
    /// Iterations of that PBKDF2.
    pub mk_digest_iter: u32,
    /// The volume's UUID as text, NUL-padded.
    pub uuid: [u8; UUID_LEN],
    /// The eight key slots.
    pub key_slots: [KeySlot; LUKS_NUM_KEY_SLOTS],
}

impl fmt::Debug for LuksHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LuksHeader")
            .field("version", &self.version)
            .field("cipher_name", &c_string(&self.cipher_name))
            .field("cipher_mode", &c_string(&self.cipher_mode))
            .field("hash_spec", &c_string(&self.hash_spec))
            .field("payload_offset_sector", &self.payload_offset_sector)
            .field("key_bytes", &self.key_bytes)
            .field("mk_digest_iter", &self.mk_digest_iter)
            .field("uuid", &c_string(&self.uuid))
            .field("key_slots", &self.key_slots)
            .finish_non_exhaustive()
    }
}

/// What the header's strings name, checked as QEMU checks them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LuksParams {
    /// The block cipher and key size.
    pub cipher_alg: CipherAlg,
    /// The cipher mode.
    pub cipher_mode: CipherMode,
    /// The IV generator.
    pub ivgen_alg: IvGenAlg,
    /// The hash after `:` in the cipher mode, when there is one (used by essiv only; QEMU
    /// ignores it with the other generators, as dm-crypt does).
    pub ivgen_hash_alg: Option<HashAlg>,
    /// The hash of PBKDF2 and the AF splitter.
    pub hash_alg: HashAlg,
}

/// One key slot as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksSlotInfo {
    /// Whether the slot holds a key.
    pub active: bool,
    /// PBKDF2 iterations, for an active slot.
    pub iters: Option<u32>,
    /// AF stripes, for an active slot.
    pub stripes: Option<u32>,
    /// Start of the key material in bytes from the area's start.
    pub key_offset: u64,
}

/// The `encrypt` object of `qemu-img info` for a LUKS header (QEMU's `QCryptoBlockInfoLUKS`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LuksInfo {
    /// `cipher-alg` (`aes-256`).
    pub cipher_alg: CipherAlg,
    /// `cipher-mode` (`xts`).
    pub cipher_mode: CipherMode,
    /// `ivgen-alg` (`plain64`).
    pub ivgen_alg: IvGenAlg,
    /// `ivgen-hash-alg`, shown for essiv only.
    pub ivgen_hash_alg: Option<HashAlg>,
    /// `hash-alg` (`sha256`).
    pub hash_alg: HashAlg,
    /// `detached-header`: always false here (a qcow2 image keeps its header inside).
    pub detached_header: bool,
    /// `payload-offset` in bytes.
    pub payload_offset: u64,
    /// `master-key-iters`.
    pub master_key_iters: u32,
    /// `uuid`.
    pub uuid: String,
    /// `slots`, all eight.
    pub slots: Vec<LuksSlotInfo>,
}

/// The text of a NUL-terminated field (the whole field if it has no NUL), lossy UTF-8.
pub(crate) fn c_string(field: &[u8]) -> String {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    String::from_utf8_lossy(&field[..end]).into_owned()
}

/// A string field holding `s` (shorter than the field) and NULs.
pub(crate) fn c_field<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [0u8; N];
    let n = s.len().min(N - 1);
    out[..n].copy_from_slice(&s.as_bytes()[..n]);
    out
}

/// Sectors a key slot's material occupies: `key_bytes * stripes` rounded up to whole sectors,
/// then to a multiple of the header's 8 sectors (QEMU's `qcrypto_block_luks_splitkeylen_sectors`,
/// which follows cryptsetup). The product is taken in 32 bits, as QEMU takes it.
pub fn split_key_sectors(key_bytes: u32, stripes: u32) -> u64 {
    let bytes = u64::from(key_bytes.wrapping_mul(stripes));
    bytes.div_ceil(SECTOR_SIZE).next_multiple_of(HEADER_SECTORS)
}

/// QEMU's `ranges_overlap` over `[first, first + len)` in 64-bit wrapping arithmetic.
fn ranges_overlap(first1: u64, len1: u64, first2: u64, len2: u64) -> bool {
    let last1 = first1.wrapping_add(len1).wrapping_sub(1);
    let last2 = first2.wrapping_add(len2).wrapping_sub(1);
    !(last2 < first1 || last1 < first2)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn array<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut out = [0u8; N];
    out.copy_from_slice(&b[at..at + N]);
    out
}

/// The cipher `name` with `key_bytes` of key in `mode` (QEMU's
/// `qcrypto_block_luks_cipher_name_lookup`).
fn cipher_lookup(name: &str, mode: CipherMode, key_bytes: u32) -> Result<CipherAlg, CryptoError> {
    let key_bytes = if mode == CipherMode::Xts {
        key_bytes / 2
    } else {
        key_bytes
    };
    let sizes: &[u32] = match name {
        "aes" => {
            if let Some(alg) = usize::try_from(key_bytes)
                .ok()
                .and_then(CipherAlg::from_key_len)
            {
                return Ok(alg);
            }
            &[]
        }
        "cast5" | "sm4" => &[16],
        "serpent" | "twofish" => &[16, 24, 32],
        _ => &[],
    };
    let name = name.to_owned();
    if sizes.contains(&key_bytes) {
        return Err(CryptoError::CipherNotImplemented { name, key_bytes });
    }
    Err(CryptoError::UnknownCipher { name, key_bytes })
}

impl LuksHeader {
    /// Reads the header's fields from the start of `area`, without checking them.
    pub fn decode(area: &[u8]) -> Result<LuksHeader, CryptoError> {
        if area.len() < LUKS_HEADER_LEN {
            return Err(CryptoError::OutsideArea {
                what: "LUKS header".into(),
                offset: 0,
                len: LUKS_HEADER_LEN as u64,
                area_len: area.len() as u64,
            });
        }
        let b = &area[..LUKS_HEADER_LEN];
        let key_slots = std::array::from_fn(|i| {
            let at = SLOTS_AT + i * SLOT_LEN;
            KeySlot {
                active: u32_at(b, at),
                iterations: u32_at(b, at + 4),
                salt: array(b, at + 8),
                key_offset_sector: u32_at(b, at + 40),
                stripes: u32_at(b, at + 44),
            }
        });
        Ok(LuksHeader {
            magic: array(b, 0),
            version: u16::from_be_bytes([b[6], b[7]]),
            cipher_name: array(b, 8),
            cipher_mode: array(b, 40),
            hash_spec: array(b, 72),
            payload_offset_sector: u32_at(b, 104),
            key_bytes: u32_at(b, 108),
            mk_digest: array(b, 112),
            mk_digest_salt: array(b, 132),
            mk_digest_iter: u32_at(b, 164),
            uuid: array(b, 168),
            key_slots,
        })
    }

    /// The header's 592 bytes.
    pub fn to_bytes(&self) -> [u8; LUKS_HEADER_LEN] {
        let mut b = [0u8; LUKS_HEADER_LEN];
        b[0..6].copy_from_slice(&self.magic);
        b[6..8].copy_from_slice(&self.version.to_be_bytes());
        b[8..40].copy_from_slice(&self.cipher_name);
        b[40..72].copy_from_slice(&self.cipher_mode);
        b[72..104].copy_from_slice(&self.hash_spec);
        b[104..108].copy_from_slice(&self.payload_offset_sector.to_be_bytes());
        b[108..112].copy_from_slice(&self.key_bytes.to_be_bytes());
        b[112..132].copy_from_slice(&self.mk_digest);
        b[132..164].copy_from_slice(&self.mk_digest_salt);
        b[164..168].copy_from_slice(&self.mk_digest_iter.to_be_bytes());
        b[168..208].copy_from_slice(&self.uuid);
        for (i, s) in self.key_slots.iter().enumerate() {
            let at = SLOTS_AT + i * SLOT_LEN;
            b[at..at + 4].copy_from_slice(&s.active.to_be_bytes());
            b[at + 4..at + 8].copy_from_slice(&s.iterations.to_be_bytes());
            b[at + 8..at + 40].copy_from_slice(&s.salt);
            b[at + 40..at + 44].copy_from_slice(&s.key_offset_sector.to_be_bytes());
            b[at + 44..at + 48].copy_from_slice(&s.stripes.to_be_bytes());
        }
        b
    }

    /// Reads the header at the start of `area`, checks it and reads its strings, as QEMU opens
    /// a LUKS volume (before any secret is used).
    pub fn parse(area: &[u8]) -> Result<(LuksHeader, LuksParams), CryptoError> {
        let header = LuksHeader::decode(area)?;
        header.check()?;
        let params = header.params()?;
        Ok((header, params))
    }

    /// QEMU's `qcrypto_block_luks_check_header`: the magic, the version, the strings'
    /// terminators, the payload offset, the iteration counts and every key slot's state and
    /// place, in QEMU's order.
    pub fn check(&self) -> Result<(), CryptoError> {
        if self.magic != LUKS_MAGIC {
            return Err(CryptoError::NotLuks);
        }
        if self.version != LUKS_VERSION {
            return Err(CryptoError::UnsupportedVersion(self.version));
        }
        for (field, which) in [
            (&self.cipher_name, HeaderString::CipherName),
            (&self.cipher_mode, HeaderString::CipherMode),
            (&self.hash_spec, HeaderString::HashSpec),
        ] {
            if !field.contains(&0) {
                return Err(CryptoError::NotNulTerminated(which));
            }
        }
        if u64::from(self.payload_offset_sector) < HEADER_SECTORS {
            return Err(CryptoError::PayloadOverlapsHeader);
        }
        if self.mk_digest_iter == 0 {
            return Err(CryptoError::MasterKeyIterationsZero);
        }
        let len = |s: &KeySlot| split_key_sectors(self.key_bytes, s.stripes);
        for (i, s1) in self.key_slots.iter().enumerate() {
            let start1 = u64::from(s1.key_offset_sector);
            let len1 = len(s1);
            if s1.stripes != LUKS_STRIPES {
                return Err(CryptoError::SlotStripes {
                    slot: i,
                    stripes: s1.stripes,
                });
            }
            if s1.active != KEY_SLOT_DISABLED && s1.active != KEY_SLOT_ENABLED {
                return Err(CryptoError::SlotState(i));
            }
            if s1.active == KEY_SLOT_ENABLED && s1.iterations == 0 {
                return Err(CryptoError::SlotIterationsZero(i));
            }
            if start1 < HEADER_SECTORS {
                return Err(CryptoError::SlotOverlapsHeader(i));
            }
            // `unsigned int` in QEMU: the sum wraps.
            if s1.key_offset_sector.wrapping_add(len1 as u32) > self.payload_offset_sector {
                return Err(CryptoError::SlotOverlapsPayload(i));
            }
            for (j, s2) in self.key_slots.iter().enumerate().skip(i + 1) {
                if ranges_overlap(start1, len1, u64::from(s2.key_offset_sector), len(s2)) {
                    return Err(CryptoError::SlotsOverlap(i, j));
                }
            }
        }
        Ok(())
    }

    /// QEMU's `qcrypto_block_luks_parse_header`: the cipher mode string split into mode, IV
    /// generator and IV hash, then the mode, the cipher and key size, the hash, the generator
    /// and the ESSIV cipher looked up, in QEMU's order.
    pub fn params(&self) -> Result<LuksParams, CryptoError> {
        let mode_spec = c_string(&self.cipher_mode);
        let (mode_name, ivgen_spec) = mode_spec
            .split_once('-')
            .ok_or_else(|| CryptoError::CipherModeFormat(mode_spec.clone()))?;
        let (ivgen_name, ivgen_hash) = match ivgen_spec.split_once(':') {
            None => (ivgen_spec, None),
            Some((g, h)) => match HashAlg::from_name(h) {
                Err(e @ CryptoError::UnknownHash(_)) => return Err(e),
                other => (g, Some(other)),
            },
        };
        let cipher_mode = CipherMode::from_name(mode_name)?;
        let cipher_alg = cipher_lookup(&c_string(&self.cipher_name), cipher_mode, self.key_bytes)?;
        let hash_alg = HashAlg::from_name(&c_string(&self.hash_spec))?;
        let ivgen_alg = IvGenAlg::from_name(ivgen_name)?;
        let ivgen_hash_alg = match (ivgen_alg, ivgen_hash) {
            (IvGenAlg::Essiv, None) => return Err(CryptoError::MissingIvGenHash),
            (IvGenAlg::Essiv, Some(h)) => {
                let h = h?;
                essiv_cipher(cipher_alg, h)?;
                Some(h)
            }
            // A hash QEMU knows but we do not is ignored with these generators, as QEMU does.
            (_, h) => h.and_then(Result::ok),
        };
        Ok(LuksParams {
            cipher_alg,
            cipher_mode,
            ivgen_alg,
            ivgen_hash_alg,
            hash_alg,
        })
    }

    /// Start of the payload in bytes; in a qcow2 image, the area's length.
    pub fn payload_offset(&self) -> u64 {
        u64::from(self.payload_offset_sector) * SECTOR_SIZE
    }

    /// The `encrypt` object of `qemu-img info` (QEMU's `qcrypto_block_luks_get_info`).
    pub fn info(&self, params: &LuksParams) -> LuksInfo {
        let essiv = params.ivgen_alg == IvGenAlg::Essiv;
        LuksInfo {
            cipher_alg: params.cipher_alg,
            cipher_mode: params.cipher_mode,
            ivgen_alg: params.ivgen_alg,
            ivgen_hash_alg: if essiv { params.ivgen_hash_alg } else { None },
            hash_alg: params.hash_alg,
            detached_header: false,
            payload_offset: self.payload_offset(),
            master_key_iters: self.mk_digest_iter,
            uuid: c_string(&self.uuid),
            slots: self
                .key_slots
                .iter()
                .map(|s| LuksSlotInfo {
                    active: s.is_active(),
                    iters: s.is_active().then_some(s.iterations),
                    stripes: s.is_active().then_some(s.stripes),
                    key_offset: s.key_offset(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::qemu_tests::testdata;
    use super::*;

    /// The header of a volume qemu-img made: aes-128-cbc-essiv:sha256, hash sha1.
    fn qemu_header() -> LuksHeader {
        let bytes = std::fs::read(testdata("raw-aes128-cbc-essiv-sha1.bin")).unwrap();
        LuksHeader::decode(&bytes).unwrap()
    }

    fn message(h: &LuksHeader) -> String {
        match LuksHeader::parse(&h.to_bytes()) {
            Ok(_) => "ok".into(),
            Err(e) => e.to_string(),
        }
    }

    fn with(f: impl FnOnce(&mut LuksHeader)) -> String {
        let mut h = qemu_header();
        f(&mut h);
        message(&h)
    }

    #[test]
    fn checks_in_qemu_order_and_words() {
        // Each message as QEMU 10 prints it for the same change to a header it made.
        assert_eq!(with(|h| h.magic[0] = b'X'), "Volume is not in LUKS format");
        assert_eq!(with(|h| h.version = 2), "LUKS version 2 is not supported");
        assert_eq!(
            with(|h| h.cipher_name = [b'a'; 32]),
            "LUKS header cipher name is not NUL terminated"
        );
        assert_eq!(
            with(|h| h.cipher_mode = [b'a'; 32]),
            "LUKS header cipher mode is not NUL terminated"
        );
        assert_eq!(
            with(|h| h.hash_spec = [b'a'; 32]),
            "LUKS header hash spec is not NUL terminated"
        );
        assert_eq!(
            with(|h| h.payload_offset_sector = 7),
            "LUKS payload is overlapping with the header"
        );
        assert_eq!(
            with(|h| h.mk_digest_iter = 0),
            "LUKS key iteration count is zero"
        );
        assert_eq!(
            with(|h| h.key_slots[3].stripes = u32::MAX),
            "Keyslot 3 is corrupted (stripes -1 != 4000)"
        );
        assert_eq!(
            with(|h| h.key_slots[2].active = 1),
            "Keyslot 2 state (active/disable) is corrupted"
        );
        assert_eq!(
            with(|h| h.key_slots[0].iterations = 0),
            "Keyslot 0 iteration count is zero"
        );
        assert_eq!(
            with(|h| h.key_slots[1].iterations = 0),
            "ok",
            "an empty slot's count is not checked"
        );
        assert_eq!(
            with(|h| h.key_slots[0].key_offset_sector = 7),
            "Keyslot 0 is overlapping with the LUKS header"
        );
        assert_eq!(
            with(|h| h.key_slots[7].key_offset_sector = 4000),
            "Keyslot 7 is overlapping with the encrypted payload"
        );
        assert_eq!(
            with(|h| h.key_slots[5].key_offset_sector = h.key_slots[4].key_offset_sector),
            "Keyslots 4 and 5 are overlapping in the header"
        );
        // A longer key makes slot 0's material run into slot 1's.
        assert_eq!(
            with(|h| h.key_bytes = 17),
            "Keyslots 0 and 1 are overlapping in the header"
        );
        // Earlier checks win: a bad magic hides everything after it.
        assert_eq!(
            with(|h| {
                h.magic[0] = 0;
                h.version = 9
            }),
            "Volume is not in LUKS format"
        );
        // QEMU's 32-bit sum wraps: a slot placed near 2^32 sectors passes these checks (and is
        // then refused as outside the area when read).
        assert_eq!(
            with(|h| h.key_slots[1].key_offset_sector = u32::MAX - 60),
            "ok"
        );
    }

    #[test]
    fn short_areas_are_refused() {
        let err = LuksHeader::decode(&[0; 100]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Request for data outside of extension header: LUKS header needs bytes 0..592 of a \
             100-byte header area"
        );
    }

    #[test]
    fn split_key_sectors_follows_cryptsetup() {
        assert_eq!(split_key_sectors(64, 4000), 504);
        assert_eq!(split_key_sectors(32, 4000), 256);
        assert_eq!(split_key_sectors(16, 4000), 128);
        assert_eq!(split_key_sectors(48, 4000), 376);
        assert_eq!(split_key_sectors(0, 4000), 0);
        assert!(ranges_overlap(8, 8, 15, 1) && !ranges_overlap(8, 8, 16, 8));
    }
}
