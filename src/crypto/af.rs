//! The hashes a LUKS header names, PBKDF2 over them, and the anti-forensic (AF) splitter.
//!
//! LUKS stores a key slot's copy of the master key split into `stripes` blocks of the key's
//! length (QEMU's `crypto/afsplit.c`, after cryptsetup's `af.c`): all but the last are random,
//! and the last is the key XORed with the *diffusion* of the XOR of the others, chained: `d = 0;
//! for each random stripe s: d = H(d ^ s)`. Merging repeats the chain. `H` (diffusion) hashes
//! the block digest-sized piece by piece, piece `i` prefixed with `i` as a big-endian `u32`,
//! the last piece's digest cut to the piece's length.

use md5::Md5;
use ripemd::Ripemd160;
use sha1::Sha1;
use sha2::digest::{generic_array::GenericArray, Digest};
use sha2::{Sha224, Sha256, Sha384, Sha512};
use zeroize::{Zeroize, Zeroizing};

use super::CryptoError;

/// The largest digest of any [`HashAlg`] (SHA-512).
pub const MAX_DIGEST_LEN: usize = 64;

qemu_names! {
    /// A hash algorithm, as QEMU names it (`QCryptoHashAlgo`). QEMU also knows `sm3`, which this
    /// crate does not implement.
    pub enum HashAlg {
        /// `md5` (16-byte digest).
        Md5 = "md5",
        /// `sha1` (20 bytes).
        Sha1 = "sha1",
        /// `sha224` (28 bytes).
        Sha224 = "sha224",
        /// `sha256` (32 bytes), QEMU's default.
        Sha256 = "sha256",
        /// `sha384` (48 bytes).
        Sha384 = "sha384",
        /// `sha512` (64 bytes).
        Sha512 = "sha512",
        /// `ripemd160` (20 bytes).
        Ripemd160 = "ripemd160",
    }
}

impl HashAlg {
    /// Bytes of one digest.
    pub fn digest_len(self) -> usize {
        match self {
            HashAlg::Md5 => 16,
            HashAlg::Sha1 | HashAlg::Ripemd160 => 20,
            HashAlg::Sha224 => 28,
            HashAlg::Sha256 => 32,
            HashAlg::Sha384 => 48,
            HashAlg::Sha512 => 64,
        }
    }

    /// The hash QEMU calls `name`, or QEMU's refusal (or ours, for `sm3`).
    pub fn from_name(name: &str) -> Result<HashAlg, CryptoError> {
        match Self::lookup(name) {
            Some(h) => Ok(h),
            None if name == "sm3" => Err(CryptoError::HashNotImplemented(name.to_owned())),
            None => Err(CryptoError::UnknownHash(name.to_owned())),
        }
    }

    /// Hashes the concatenation of `parts` into `out[..digest_len()]`; returns the length.
    pub fn digest_into(self, parts: &[&[u8]], out: &mut [u8; MAX_DIGEST_LEN]) -> usize {
        fn run<D: Digest>(parts: &[&[u8]], out: &mut [u8]) -> usize {
            let n = <D as Digest>::output_size();
            let mut h = D::new();
            for p in parts {
                h.update(p);
            }
            h.finalize_into(GenericArray::from_mut_slice(&mut out[..n]));
            n
        }
        match self {
            HashAlg::Md5 => run::<Md5>(parts, out),
            HashAlg::Sha1 => run::<Sha1>(parts, out),
            HashAlg::Sha224 => run::<Sha224>(parts, out),
            HashAlg::Sha256 => run::<Sha256>(parts, out),
            HashAlg::Sha384 => run::<Sha384>(parts, out),
            HashAlg::Sha512 => run::<Sha512>(parts, out),
            HashAlg::Ripemd160 => run::<Ripemd160>(parts, out),
        }
    }

    /// PBKDF2 with HMAC over this hash: fills `out` from `password`, `salt` and `iterations`.
    pub fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32, out: &mut [u8]) {
        use pbkdf2::pbkdf2_hmac;
        match self {
            HashAlg::Md5 => pbkdf2_hmac::<Md5>(password, salt, iterations, out),
            HashAlg::Sha1 => pbkdf2_hmac::<Sha1>(password, salt, iterations, out),
            HashAlg::Sha224 => pbkdf2_hmac::<Sha224>(password, salt, iterations, out),
            HashAlg::Sha256 => pbkdf2_hmac::<Sha256>(password, salt, iterations, out),
            HashAlg::Sha384 => pbkdf2_hmac::<Sha384>(password, salt, iterations, out),
            HashAlg::Sha512 => pbkdf2_hmac::<Sha512>(password, salt, iterations, out),
            HashAlg::Ripemd160 => pbkdf2_hmac::<Ripemd160>(password, salt, iterations, out),
        }
    }
}

/// QEMU's `qcrypto_afsplit_hash`: replaces `block` with its diffusion.
fn diffuse(hash: HashAlg, block: &mut [u8]) {
    let digest_len = hash.digest_len();
    let mut out = Zeroizing::new([0u8; MAX_DIGEST_LEN]);
    for (i, piece) in block.chunks_mut(digest_len).enumerate() {
        let counter = (i as u32).to_be_bytes();
        hash.digest_into(&[&counter, piece], &mut out);
        let n = piece.len();
        piece.copy_from_slice(&out[..n]);
    }
}

fn xor_into(dst: &mut [u8], src: &[u8]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d ^= s;
    }
}

fn check_lengths(len: usize, stripes: u32, key_len: usize) -> Result<(), CryptoError> {
    let needed = (stripes as usize).checked_mul(key_len);
    if stripes == 0 || key_len == 0 || needed != Some(len) {
        return Err(CryptoError::AfLength {
            len,
            stripes,
            key_len,
        });
    }
    Ok(())
}

/// Splits `key` into `material` (`stripes * key.len()` bytes): QEMU's
/// `qcrypto_afsplit_encode`, the random stripes from the operating system.
pub fn af_split(
    hash: HashAlg,
    key: &[u8],
    stripes: u32,
    material: &mut [u8],
) -> Result<(), CryptoError> {
    check_lengths(material.len(), stripes, key.len())?;
    let key_len = key.len();
    let (random, last) = material.split_at_mut(key_len * (stripes as usize - 1));
    getrandom::fill(random).map_err(|e| CryptoError::Random(e.to_string()))?;
    let mut block = Zeroizing::new(vec![0u8; key_len]);
    for stripe in random.chunks_exact(key_len) {
        xor_into(&mut block, stripe);
        diffuse(hash, &mut block);
    }
    last.copy_from_slice(key);
    xor_into(last, &block);
    Ok(())
}

/// Merges `material` (`stripes * key.len()` bytes) back into `key`: QEMU's
/// `qcrypto_afsplit_decode`.
pub fn af_merge(
    hash: HashAlg,
    material: &[u8],
    stripes: u32,
    key: &mut [u8],
) -> Result<(), CryptoError> {
    check_lengths(material.len(), stripes, key.len())?;
    let key_len = key.len();
    let (chained, last) = material.split_at(key_len * (stripes as usize - 1));
    key.zeroize();
    for stripe in chained.chunks_exact(key_len) {
        xor_into(key, stripe);
        diffuse(hash, key);
    }
    xor_into(key, last);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn names_and_lengths() {
        for &h in HashAlg::ALL {
            assert_eq!(HashAlg::from_name(h.name()), Ok(h));
            let mut out = [0u8; MAX_DIGEST_LEN];
            assert_eq!(h.digest_into(&[b"abc"], &mut out), h.digest_len());
        }
        assert_eq!(
            HashAlg::from_name("sha2566").unwrap_err().to_string(),
            "Hash algorithm 'sha2566' not supported"
        );
        assert_eq!(
            HashAlg::from_name("SHA256"),
            Err(CryptoError::UnknownHash("SHA256".into()))
        );
        assert!(matches!(
            HashAlg::from_name("sm3"),
            Err(CryptoError::HashNotImplemented(_))
        ));
    }

    #[test]
    fn digests_of_abc() {
        let cases = [
            (HashAlg::Md5, "900150983cd24fb0d6963f7d28e17f72"),
            (HashAlg::Sha1, "a9993e364706816aba3e25717850c26c9cd0d89d"),
            (
                HashAlg::Ripemd160,
                "8eb208f7e05d987a9b044a8e98c6b087f15a0bfc",
            ),
            (
                HashAlg::Sha256,
                "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad",
            ),
        ];
        for (h, want) in cases {
            let mut out = [0u8; MAX_DIGEST_LEN];
            let n = h.digest_into(&[b"a", b"bc"], &mut out);
            assert_eq!(hex(&out[..n]), want, "{h}");
        }
    }

    #[test]
    fn pbkdf2_rfc6070() {
        let mut out = [0u8; 20];
        HashAlg::Sha1.pbkdf2(b"password", b"salt", 2, &mut out);
        assert_eq!(hex(&out), "ea6c014dc72d6f8ccd1ed92ace1d41f0d8de8957");
        let mut out = [0u8; 25];
        HashAlg::Sha1.pbkdf2(
            b"passwordPASSWORDpassword",
            b"saltSALTsaltSALTsaltSALTsaltSALTsalt",
            4096,
            &mut out,
        );
        assert_eq!(
            hex(&out),
            "3d2eec4fe41c849b80c8d83662c0e44a8b291a964cf2f07038"
        );
    }

    #[test]
    fn split_then_merge_every_hash_and_key_length() {
        for &h in HashAlg::ALL {
            for key_len in [16usize, 24, 32, 48, 64] {
                let key: Vec<u8> = (0..key_len as u8).map(|b| b.wrapping_mul(37)).collect();
                let mut material = vec![0u8; key_len * 40];
                af_split(h, &key, 40, &mut material).unwrap();
                let mut back = vec![0u8; key_len];
                af_merge(h, &material, 40, &mut back).unwrap();
                assert_eq!(back, key, "{h} {key_len}");
                // Each stripe matters.
                material[3] ^= 1;
                af_merge(h, &material, 40, &mut back).unwrap();
                assert_ne!(back, key);
            }
        }
    }

    #[test]
    fn one_stripe_is_the_key() {
        let key = [7u8; 16];
        let mut material = [0u8; 16];
        af_split(HashAlg::Sha256, &key, 1, &mut material).unwrap();
        assert_eq!(material, key);
    }

    #[test]
    fn diffusion_matches_the_definition() {
        // 20-byte block, 16-byte digest: two pieces, the second cut to 4 bytes.
        let mut block: Vec<u8> = (0..20).collect();
        let orig = block.clone();
        diffuse(HashAlg::Md5, &mut block);
        let mut d = [0u8; MAX_DIGEST_LEN];
        HashAlg::Md5.digest_into(&[&0u32.to_be_bytes(), &orig[..16]], &mut d);
        assert_eq!(block[..16], d[..16]);
        HashAlg::Md5.digest_into(&[&1u32.to_be_bytes(), &orig[16..]], &mut d);
        assert_eq!(block[16..], d[..4]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut key = [0u8; 16];
        let err = af_merge(HashAlg::Sha1, &[0u8; 100], 4000, &mut key).unwrap_err();
        assert_eq!(
            err.to_string(),
            "AF material of 100 bytes is not 4000 stripes of a 16-byte key"
        );
        assert!(af_merge(HashAlg::Sha1, &[], 0, &mut key).is_err());
        assert!(af_split(HashAlg::Sha1, &[], 1, &mut []).is_err());
    }
}
