//! LUKS encryption as QEMU does it, from bytes: the LUKS1 header, its key slots unlocked with a
//! secret, new headers created, and the sector cipher that encrypts and decrypts guest data.
//!
//! A qcow2 image with `crypt_method` 2 keeps a whole LUKS header *area* in its own clusters (the
//! crypto header extension gives its offset and length): the 592-byte header at the start, then
//! the key material of eight key slots, each at an offset relative to the area's start. This
//! layer never does I/O: it takes the area as a byte slice and hands one back.
//!
//! - [`luks_header`]: the on-disk header: parse with QEMU's checks in QEMU's order and words,
//!   serialize, and the typed view `qemu-img info` prints as `encrypt`.
//! - [`af`]: the hashes the header names, PBKDF2 over them, and the anti-forensic splitter.
//! - [`cipher`]: AES in XTS, CBC, ECB and CTR over 512-byte sectors with the plain, plain64 and
//!   essiv IV generators.
//! - [`luks`]: [`Luks`], an unlocked volume, and the creation of a new area.
//!
//! Secrets, master keys and keys derived from them never appear in a message or in `Debug`
//! output, and the buffers that hold them are wiped when dropped.

use std::fmt;

use thiserror::Error;

/// Declares a `Copy` enum of names QEMU gives (algorithms, modes, generators): the variants
/// with their names, `ALL`, `name()`, `lookup()` and a `Display` that prints the name.
macro_rules! qemu_names {
    ($(#[$m:meta])* pub enum $name:ident { $($(#[$vm:meta])* $v:ident = $s:literal,)+ }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vm])* $v,)+
        }

        impl $name {
            /// Every variant, in QEMU's order.
            pub const ALL: &'static [$name] = &[$($name::$v,)+];

            /// QEMU's name, as the header holds it and `qemu-img info` prints it.
            pub fn name(self) -> &'static str {
                match self {
                    $($name::$v => $s,)+
                }
            }

            /// The variant QEMU calls `name` (exact and case-sensitive, as `qapi_enum_parse`).
            pub fn lookup(name: &str) -> Option<$name> {
                Self::ALL.iter().copied().find(|v| v.name() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

pub mod af;
pub mod cipher;
pub mod luks;
pub mod luks_header;

pub use af::HashAlg;

/// QEMU's words for an encrypted image opened, or created, without the secret of its key
/// (`qcow2ovl._core.KEY_SECRET_REQUIRED` to Python, which says it in the same words).
pub const KEY_SECRET_REQUIRED: &str = "Parameter 'encrypt.key-secret' is required for cipher";
pub use cipher::{CipherAlg, CipherMode, IvGenAlg, SectorCipher, SECTOR_SIZE};
pub use luks::{Luks, LuksCreateOptions};
pub use luks_header::{KeySlot, LuksHeader, LuksInfo, LuksParams, LuksSlotInfo};

/// One of the three strings of the LUKS header; its `Display` is QEMU's name for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HeaderString {
    /// `cipher_name` (`aes`).
    CipherName,
    /// `cipher_mode` (`xts-plain64`, `cbc-essiv:sha256`).
    CipherMode,
    /// `hash_spec` (`sha256`).
    HashSpec,
}

impl fmt::Display for HeaderString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            HeaderString::CipherName => "cipher name",
            HeaderString::CipherMode => "cipher mode",
            HeaderString::HashSpec => "hash spec",
        })
    }
}

/// A LUKS header QEMU would refuse, a secret that unlocks nothing, or a request the cipher
/// cannot serve.
///
/// Where QEMU reports the same problem, the message is QEMU's, word for word (any detail of
/// ours follows after `: `). No variant holds a secret or key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum CryptoError {
    /// A read past the end of the header area (QEMU's qcow2 driver says so for reads past the
    /// crypto header extension's length).
    #[error(
        "Request for data outside of extension header: {what} needs bytes {offset}..{end} of a \
         {area_len}-byte header area",
        end = offset.saturating_add(*len)
    )]
    OutsideArea {
        /// What was read: `LUKS header` or `key slot 3 material`.
        what: String,
        /// Start of the read, from the start of the area.
        offset: u64,
        /// Bytes read.
        len: u64,
        /// Length of the area.
        area_len: u64,
    },

    /// The magic is not `LUKS\xba\xbe`.
    #[error("Volume is not in LUKS format")]
    NotLuks,

    /// The version is not 1.
    #[error("LUKS version {0} is not supported")]
    UnsupportedVersion(u16),

    /// One of the header's strings fills its field without a NUL.
    #[error("LUKS header {0} is not NUL terminated")]
    NotNulTerminated(HeaderString),

    /// `payload_offset` lies inside the 4096 bytes of the header.
    #[error("LUKS payload is overlapping with the header")]
    PayloadOverlapsHeader,

    /// `mk_digest_iter` is 0.
    #[error("LUKS key iteration count is zero")]
    MasterKeyIterationsZero,

    /// A key slot's stripe count is not 4000 (QEMU prints it as a signed int).
    #[error("Keyslot {slot} is corrupted (stripes {shown} != 4000)", shown = *stripes as i32)]
    SlotStripes {
        /// Key slot index, 0..8.
        slot: usize,
        /// Its `stripes` field.
        stripes: u32,
    },

    /// A key slot's `active` field is neither enabled nor disabled.
    #[error("Keyslot {0} state (active/disable) is corrupted")]
    SlotState(usize),

    /// An active key slot has 0 iterations.
    #[error("Keyslot {0} iteration count is zero")]
    SlotIterationsZero(usize),

    /// A key slot's material starts inside the 4096 bytes of the header.
    #[error("Keyslot {0} is overlapping with the LUKS header")]
    SlotOverlapsHeader(usize),

    /// A key slot's material ends past the payload offset.
    #[error("Keyslot {0} is overlapping with the encrypted payload")]
    SlotOverlapsPayload(usize),

    /// The material of two key slots overlaps.
    #[error("Keyslots {0} and {1} are overlapping in the header")]
    SlotsOverlap(usize, usize),

    /// `cipher_mode` has no `-` between the mode and the IV generator.
    #[error("Unexpected cipher mode string format '{0}'")]
    CipherModeFormat(String),

    /// A hash name QEMU does not know (in `hash_spec` or after `:` in `cipher_mode`).
    #[error("Hash algorithm '{0}' not supported")]
    UnknownHash(String),

    /// A hash QEMU knows but this crate does not implement (`sm3`).
    #[error("Hash algorithm '{0}' not supported: qcow2ovl does not implement it")]
    HashNotImplemented(String),

    /// A cipher mode QEMU does not know.
    #[error("Cipher mode '{0}' not supported")]
    UnknownCipherMode(String),

    /// A cipher name QEMU does not know, or a key size it has no variant of. `key_bytes` is the
    /// size of one key (half of `key_bytes` in XTS mode), printed signed as QEMU prints it.
    #[error("Algorithm '{name}' with key size {shown} bytes not supported", shown = *key_bytes as i32)]
    UnknownCipher {
        /// `cipher_name`.
        name: String,
        /// Bytes of one key.
        key_bytes: u32,
    },

    /// A cipher QEMU supports but this crate does not (only AES is implemented).
    #[error(
        "Algorithm '{name}' with key size {key_bytes} bytes not supported: qcow2ovl implements \
         only AES"
    )]
    CipherNotImplemented {
        /// `cipher_name` (`serpent`, `twofish`, `cast5`, `sm4`).
        name: String,
        /// Bytes of one key.
        key_bytes: u32,
    },

    /// An IV generator QEMU does not know.
    #[error("IV generator '{0}' not supported")]
    UnknownIvGen(String),

    /// `essiv` without `:HASH`.
    #[error("Missing IV generator hash specification")]
    MissingIvGenHash,

    /// The ESSIV hash's digest length is no AES key length.
    #[error("No AES cipher with key size {0} available")]
    NoEssivCipher(usize),

    /// A key of the wrong length for the cipher.
    #[error("Cipher key length {found} should be {expected}")]
    KeyLength {
        /// Bytes given.
        found: usize,
        /// Bytes the cipher and mode need.
        expected: usize,
    },

    /// The secret unlocks no active key slot.
    #[error("Invalid password, cannot unlock any keyslot")]
    InvalidPassword,

    /// A cipher request not in whole sectors (QEMU asserts instead).
    #[error(
        "Encryption request not in whole sectors: offset {offset} and length {len} must be \
         multiples of 512"
    )]
    Unaligned {
        /// Byte offset asked for.
        offset: u64,
        /// Buffer length.
        len: usize,
    },

    /// AF material of the wrong size for its key and stripes.
    #[error("AF material of {len} bytes is not {stripes} stripes of a {key_len}-byte key")]
    AfLength {
        /// Bytes given.
        len: usize,
        /// Stripes asked for (at least 1).
        stripes: u32,
        /// Key length.
        key_len: usize,
    },

    /// A cipher and mode whose key material is not a whole number of sectors: AES-192 outside
    /// XTS (qemu-img aborts on an assertion when asked to create one).
    #[error(
        "Cipher {cipher} in mode {mode} is not supported: its key material of {bytes} bytes is \
         not a whole number of 512-byte sectors (qemu-img aborts on it)"
    )]
    KeyMaterialUnaligned {
        /// The cipher.
        cipher: CipherAlg,
        /// The mode.
        mode: CipherMode,
        /// `key_bytes * 4000`.
        bytes: u64,
    },

    /// The measured iterations per second times `iter-time` overflow 64 bits (or `iter-time`
    /// is 0, which QEMU reports the same way).
    #[error("PBKDF iterations {0} too large to scale: Numerical result out of range")]
    IterationsTooLargeToScale(u64),

    /// The scaled iteration count does not fit the header's 32 bits.
    #[error("PBKDF iterations {0} larger than 4294967295: Numerical result out of range")]
    IterationsTooLarge(u64),

    /// The thread's CPU time did not move while PBKDF2 ran.
    #[error("Unable to get accurate CPU usage")]
    CpuUsage,

    /// The operating system gave no random bytes.
    #[error("Unable to read random bytes: {0}")]
    Random(String),
}

#[cfg(test)]
mod qemu_tests;
