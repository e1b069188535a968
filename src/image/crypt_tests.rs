//! The engine's encrypted paths with a toy sector cipher (see `crypt.rs`): every write of every
//! shape reads back as a plain mirror does, and every data sector on disk holds the plaintext
//! enciphered at its *host* offset — so a copy-on-write that forgot to decipher and encipher
//! again, a write that skipped the cipher, or an unaligned write that was not widened fails here.

use std::sync::Arc;

use super::crypt::test_cipher::XorCipher;
use super::crypt::{DataCipher, SECTOR_SIZE};
use crate::create::{plan, write_image, CreateOptions};
use crate::format::{GuestOffset, L2Mapping};
use crate::image::{BackingChain, ErrorKind, Image, OpenOptions};
use crate::storage::{MemStorage, Storage};

const DISK: u64 = 4 << 20;

fn new_image(cluster_size: u64, extended_l2: bool) -> Arc<MemStorage> {
    let storage = Arc::new(MemStorage::new(Vec::new()));
    let opts = CreateOptions {
        size: DISK,
        cluster_size,
        extended_l2,
        ..CreateOptions::default()
    };
    write_image(&plan(&opts).unwrap(), storage.as_ref(), None).unwrap();
    storage
}

fn open(st: &Arc<MemStorage>, writable: bool, ciphered: bool) -> Image {
    let options = OpenOptions {
        writable,
        backing: BackingChain::None,
        ..OpenOptions::default()
    };
    let img = Image::from_storage(Arc::clone(st) as Arc<dyn Storage>, options).unwrap();
    if ciphered {
        img.with_test_cipher(Arc::new(XorCipher))
    } else {
        img
    }
}

/// A small deterministic generator (no dependency for a test's random numbers).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Every data sector on disk, read without the cipher, is the mirror's plaintext enciphered at
/// its host offset.
fn assert_ciphered_on_disk(st: &Arc<MemStorage>, mirror: &[u8]) {
    let plain = open(st, false, false);
    let raw = st.snapshot();
    let mut at = 0u64;
    let mut data_sectors = 0;
    while at < DISK {
        let e = plain.mapping(GuestOffset(at), DISK - at).unwrap();
        if let L2Mapping::Data { host } = e.mapping {
            let h = host.0 as usize;
            let len = e.len as usize;
            let mut expect = mirror[at as usize..at as usize + len].to_vec();
            XorCipher.encrypt(host.0, &mut expect).unwrap();
            assert!(
                raw[h..h + len] == expect[..],
                "guest {at:#x} at host {h:#x} is not its plaintext ciphered there"
            );
            data_sectors += len as u64 / SECTOR_SIZE;
        }
        at += e.len;
    }
    assert!(data_sectors > 0, "the test wrote no data");
}

fn random_workload(cluster_size: u64, extended_l2: bool, seed: u64) {
    let st = new_image(cluster_size, extended_l2);
    let img = open(&st, true, true);
    let mut mirror = vec![0u8; DISK as usize];
    let mut rng = Lcg(seed);
    for step in 0..300u64 {
        let off = rng.below(DISK - 1);
        let len = (1 + rng.below(3 * cluster_size)).min(DISK - off);
        match rng.below(10) {
            0 => {
                img.write_zeroes(GuestOffset(off), len, rng.below(2) == 0)
                    .unwrap();
                mirror[off as usize..(off + len) as usize].fill(0);
            }
            1 if step > 100 && img.snapshots().is_empty() => {
                // From here on every write to an old cluster is a copy-on-write.
                img.create_snapshot("s", None, 0).unwrap();
            }
            _ => {
                let byte = 1 + rng.below(255) as u8;
                let data: Vec<u8> = (0..len).map(|i| byte ^ (i as u8 & 0x0f)).collect();
                img.write_at(GuestOffset(off), &data).unwrap();
                mirror[off as usize..(off + len) as usize].copy_from_slice(&data);
            }
        }
    }
    img.flush().unwrap();
    let mut back = vec![0u8; DISK as usize];
    img.read_at(GuestOffset(0), &mut back).unwrap();
    assert!(back == mirror, "the disk reads differently from its mirror");
    // Reads that start and end inside sectors.
    for _ in 0..50 {
        let off = rng.below(DISK - 1);
        let len = (1 + rng.below(5000)).min(DISK - off) as usize;
        let mut part = vec![0u8; len];
        img.read_at(GuestOffset(off), &mut part).unwrap();
        assert_eq!(part[..], mirror[off as usize..off as usize + len]);
    }
    drop(img);
    assert_ciphered_on_disk(&st, &mirror);
    let again = open(&st, false, true);
    let mut back = vec![0u8; DISK as usize];
    again.read_at(GuestOffset(0), &mut back).unwrap();
    assert!(back == mirror, "the disk reads differently after reopening");
}

#[test]
fn random_writes_read_back_and_are_ciphered_at_their_host_offsets() {
    random_workload(65536, false, 1);
}

#[test]
fn small_clusters_cross_many_clusters_per_write() {
    random_workload(4096, false, 2);
}

#[test]
fn extended_l2_subcluster_writes_are_ciphered_per_subcluster() {
    random_workload(65536, true, 3);
}

#[test]
fn snapshot_data_stays_readable_after_copy_on_write() {
    let st = new_image(65536, false);
    let img = open(&st, true, true);
    img.write_at(GuestOffset(1000), &[0x5a; 70_000]).unwrap();
    img.create_snapshot("before", None, 0).unwrap();
    img.write_at(GuestOffset(1001), &[0x33; 3]).unwrap();
    img.flush().unwrap();
    drop(img);
    let options = OpenOptions {
        snapshot: Some("before".into()),
        backing: BackingChain::None,
        ..OpenOptions::default()
    };
    let snap = Image::from_storage(Arc::clone(&st) as Arc<dyn Storage>, options)
        .unwrap()
        .with_test_cipher(Arc::new(XorCipher));
    let mut old = vec![0u8; 70_000];
    snap.read_at(GuestOffset(1000), &mut old).unwrap();
    assert!(old.iter().all(|&b| b == 0x5a));
    let now = open(&st, false, true);
    let mut three = [0u8; 5];
    now.read_at(GuestOffset(1000), &mut three).unwrap();
    assert_eq!(three, [0x5a, 0x33, 0x33, 0x33, 0x5a]);
}

#[test]
fn plaintext_never_reaches_the_disk() {
    let st = new_image(65536, false);
    let img = open(&st, true, true);
    let marker = b"PLAINTEXT-MARKER";
    let data: Vec<u8> = marker.iter().cycle().take(200_000).copied().collect();
    img.write_at(GuestOffset(12_345), &data).unwrap();
    img.flush().unwrap();
    drop(img);
    let raw = st.snapshot();
    assert!(!raw.windows(marker.len()).any(|w| w == marker));
}

#[test]
fn compressed_writes_into_encrypted_images_are_refused() {
    let st = new_image(65536, false);
    let img = open(&st, true, true);
    let before = st.snapshot();
    let err = img
        .write_compressed(GuestOffset(0), &[7u8; 65536])
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Encryption);
    assert!(err.to_string().contains("stored unencrypted"), "{err}");
    drop(img);
    assert!(st.snapshot() == before, "a refused write changed the file");
}
