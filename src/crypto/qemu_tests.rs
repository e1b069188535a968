//! Tests against QEMU: bytes qemu-img and qemu-io made (under `src/crypto/testdata/`, small
//! enough to embed) read here, and the ignored tests that remake them or run QEMU on what this
//! layer makes. The fixtures keep only what a test reads: a LUKS header, one key slot's
//! material, a few payload sectors.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::Command;

use super::luks::find_key;
use super::luks_header::{c_field, c_string, KEY_SLOT_DISABLED, LUKS_HEADER_LEN};
use super::*;

/// The QEMU-made raw volume: aes-128-cbc-essiv:sha256, hash sha1, payload sectors 0 and 1.
const RAW: &str = "raw-aes128-cbc-essiv-sha1.bin";

/// The secret object every QEMU-made test volume is locked with; its password is `abc`.
const SECRET_OBJECT: &str = "secret,id=sec0,data=abc";

/// Runs `cmd` with `args`, panicking with its stderr if it fails; returns its stdout.
fn run(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("qemu-img and qemu-io on PATH");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{cmd} {args:?}: {err}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Creates a raw LUKS volume with qemu-img (`-o key-secret=sec0,iter-time=10,OPTS`).
fn qemu_luks(path: &str, opts: &str, size: &str) {
    let o = format!(
        "key-secret=sec0,iter-time=10{}{opts}",
        if opts.is_empty() { "" } else { "," }
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "luks",
            "--object",
            SECRET_OBJECT,
            "-o",
            &o,
            path,
            size,
        ],
    );
}

/// Runs qemu-io commands on the image `driver=DRIVER,file.filename=PATH` (LUKS options
/// prefixed by `key_opt`); fails on a pattern mismatch too.
fn qemu_io(driver: &str, key_opt: &str, path: &str, cmds: &[&str]) -> String {
    let spec = format!("driver={driver},{key_opt}key-secret=sec0,file.filename={path}");
    let mut args = vec!["--object", SECRET_OBJECT, "--image-opts", &spec];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let out = run("qemu-io", &args);
    assert!(!out.contains("Pattern verification failed"), "{out}");
    out
}

/// A fresh directory for one test's files.
fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("qcow2ovl-crypto-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The path of a file under `src/crypto/testdata/`.
pub(super) fn testdata(file: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/crypto/testdata")
        .join(file)
}

/// One record of `combos.bin`: a QEMU-made LUKS header, its master key (zero-padded to 64
/// bytes), and the payload sectors 1 and 2^32 + 1, which qemu-io filled with 0x5a and 0xa5.
const RECORD: usize = LUKS_HEADER_LEN + 64 + 1024;

const HIGH_SECTOR: u64 = (1 << 32) + 1;

/// The combinations qemu-img accepts (AES-192 only with XTS: in the other modes its key
/// material is no whole number of sectors and qemu-img aborts on an assertion).
fn combos() -> Vec<String> {
    let mut out = Vec::new();
    for (alg, modes) in [("aes-128", 0..4), ("aes-192", 0..1), ("aes-256", 0..4)] {
        for mode in &["xts", "cbc", "ecb", "ctr"][modes] {
            for iv in ["plain", "plain64", "essiv,ivgen-hash-alg=sha256"] {
                out.push(format!(
                    "cipher-alg={alg},cipher-mode={mode},ivgen-alg={iv}"
                ));
            }
        }
    }
    out.push("cipher-alg=aes-256,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=md5".into());
    out.push("cipher-alg=aes-128,cipher-mode=xts,ivgen-alg=essiv,ivgen-hash-alg=md5".into());
    out
}

/// Rewrites `testdata/combos.bin` from volumes qemu-img makes now (needs QEMU):
/// `cargo test --lib crypto::qemu_tests::regenerate_combos -- --ignored`.
#[test]
#[ignore]
fn regenerate_combos() {
    let dir = scratch_dir("combos");
    let mut out = Vec::new();
    for opts in combos() {
        let path = dir.join("v.luks");
        let path = path.to_str().unwrap();
        qemu_luks(path, &opts, "3T");
        let high = format!("write -P 0xa5 {} 512", HIGH_SECTOR * 512);
        qemu_io("luks", "", path, &["write -P 0x5a 512 512", &high]);
        let file = std::fs::File::open(path).unwrap();
        let read = |at: u64, len: usize| {
            let mut buf = vec![0u8; len];
            std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, at).unwrap();
            buf
        };
        let (header, params) = LuksHeader::parse(&read(0, LUKS_HEADER_LEN)).unwrap();
        let payload = header.payload_offset();
        let area = read(0, payload as usize);
        let key = find_key(&header, &params, &area, b"abc").unwrap();
        let mut rec = area[..LUKS_HEADER_LEN].to_vec();
        rec.extend_from_slice(&key);
        rec.resize(LUKS_HEADER_LEN + 64, 0);
        rec.extend(read(payload + 512, 512));
        rec.extend(read(payload + HIGH_SECTOR * 512, 512));
        out.extend_from_slice(&rec);
        std::fs::remove_file(path).unwrap();
    }
    std::fs::write(testdata("combos.bin"), out).unwrap();
}

#[test]
fn decrypts_and_encrypts_what_qemu_wrote_in_every_combination() {
    let data = std::fs::read(testdata("combos.bin")).unwrap();
    assert_eq!(data.len(), combos().len() * RECORD);
    for rec in data.chunks_exact(RECORD) {
        let (header, p) = LuksHeader::parse(&rec[..LUKS_HEADER_LEN]).unwrap();
        let key = &rec[LUKS_HEADER_LEN..LUKS_HEADER_LEN + header.key_bytes as usize];
        let c = SectorCipher::new(
            p.cipher_alg,
            p.cipher_mode,
            p.ivgen_alg,
            p.ivgen_hash_alg,
            key,
        )
        .unwrap();
        let what = format!("{p:?}");
        let sectors = &rec[LUKS_HEADER_LEN + 64..];
        for (sector, fill, ct) in [
            (1, 0x5a, &sectors[..512]),
            (HIGH_SECTOR, 0xa5, &sectors[512..]),
        ] {
            let mut buf = ct.to_vec();
            c.decrypt(sector * 512, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == fill), "{what} sector {sector}");
            c.encrypt(sector * 512, &mut buf).unwrap();
            assert_eq!(buf, ct, "{what} sector {sector}");
        }
        // plain keeps 32 bits of the sector number: sector 2^32 + 1 has sector 1's IV.
        let mut high = [0x5au8; 512];
        c.encrypt(HIGH_SECTOR * 512, &mut high).unwrap();
        let same = high[..] == sectors[..512];
        let expect_same = p.ivgen_alg == IvGenAlg::Plain || p.cipher_mode == CipherMode::Ecb;
        assert_eq!(same, expect_same, "{what}");
    }
}

/// MiB/s of each mode over 256 MiB:
/// `cargo test --release --lib crypto::qemu_tests::throughput -- --ignored --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let mut buf = vec![0x5au8; 256 << 20];
    for (alg, mode, iv) in [
        (CipherAlg::Aes256, CipherMode::Xts, IvGenAlg::Plain64),
        (CipherAlg::Aes128, CipherMode::Xts, IvGenAlg::Plain64),
        (CipherAlg::Aes256, CipherMode::Cbc, IvGenAlg::Essiv),
        (CipherAlg::Aes256, CipherMode::Ctr, IvGenAlg::Plain64),
        (CipherAlg::Aes256, CipherMode::Ecb, IvGenAlg::Plain64),
    ] {
        let key = vec![7u8; mode.key_len(alg)];
        let c = SectorCipher::new(alg, mode, iv, Some(HashAlg::Sha256), &key).unwrap();
        for enc in [true, false] {
            let t = std::time::Instant::now();
            if enc {
                c.encrypt(1 << 20, &mut buf).unwrap()
            } else {
                c.decrypt(1 << 20, &mut buf).unwrap()
            }
            let mbs = 256.0 / t.elapsed().as_secs_f64();
            let what = if enc { "encrypt" } else { "decrypt" };
            println!("{alg}-{mode}-{iv} {what}: {mbs:.0} MiB/s");
        }
    }
}

/// A QEMU-made area kept small: the header, slot 0's material, then test-specific bytes.
/// The rest of the area (empty slots) is zeros.
fn area_of(fixture: &[u8]) -> (Vec<u8>, &[u8]) {
    let h = LuksHeader::decode(fixture).unwrap();
    let slot = &h.key_slots[0];
    let material = (h.key_bytes * slot.stripes) as usize;
    let mut area = vec![0u8; h.payload_offset() as usize];
    area[..LUKS_HEADER_LEN].copy_from_slice(&fixture[..LUKS_HEADER_LEN]);
    let at = slot.key_offset() as usize;
    area[at..at + material].copy_from_slice(&fixture[LUKS_HEADER_LEN..LUKS_HEADER_LEN + material]);
    (area, &fixture[LUKS_HEADER_LEN + material..])
}

fn fixture(area: &[u8], rest: &[u8]) -> Vec<u8> {
    let h = LuksHeader::decode(area).unwrap();
    let at = h.key_slots[0].key_offset() as usize;
    let mut out = area[..LUKS_HEADER_LEN].to_vec();
    out.extend_from_slice(&area[at..at + (h.key_bytes * h.key_slots[0].stripes) as usize]);
    out.extend_from_slice(rest);
    out
}

/// `qemu-img info --output=json`'s encrypt fields, as they appear with the blanks removed.
fn info_fragments(info: &LuksInfo) -> Vec<String> {
    let mut out = vec![
        format!(r#""ivgen-alg":"{}","#, info.ivgen_alg),
        format!(r#""hash-alg":"{}","#, info.hash_alg),
        format!(r#""cipher-alg":"{}","#, info.cipher_alg),
        format!(r#""uuid":"{}","#, info.uuid),
        format!(r#""cipher-mode":"{}","#, info.cipher_mode),
        format!(r#""payload-offset":{},"#, info.payload_offset),
        format!(r#""master-key-iters":{}"#, info.master_key_iters),
        format!(r#""detached-header":{},"#, info.detached_header),
    ];
    if let Some(h) = info.ivgen_hash_alg {
        out.push(format!(r#""ivgen-hash-alg":"{h}","#));
    }
    let slots: Vec<String> = info
        .slots
        .iter()
        .map(|s| match (s.iters, s.stripes) {
            (Some(i), Some(st)) => format!(
                r#"{{"active":true,"iters":{i},"key-offset":{},"stripes":{st}}}"#,
                s.key_offset
            ),
            _ => format!(r#"{{"active":{},"key-offset":{}}}"#, s.active, s.key_offset),
        })
        .collect();
    out.push(format!(r#""slots":[{}]"#, slots.join(",")));
    out
}

fn assert_info_matches(info: &LuksInfo, qemu_json: &str) {
    let json: String = qemu_json.chars().filter(|c| !c.is_whitespace()).collect();
    for f in info_fragments(info) {
        assert!(json.contains(&f), "{f} not in {json}");
    }
}

/// Rewrites the two QEMU-made fixtures (needs QEMU):
/// `cargo test --lib crypto::qemu_tests::regenerate_fixtures -- --ignored`.
#[test]
#[ignore]
fn regenerate_fixtures() {
    let dir = scratch_dir("fixtures");
    let s = |p: &std::path::Path| p.to_str().unwrap().to_owned();
    // A raw LUKS volume: aes-128-cbc-essiv:sha256, hash sha1; payload sectors 0 and 1.
    let raw = s(&dir.join("v.luks"));
    let opts =
        "cipher-alg=aes-128,cipher-mode=cbc,ivgen-alg=essiv,ivgen-hash-alg=sha256,hash-alg=sha1";
    qemu_luks(&raw, opts, "1M");
    qemu_io("luks", "", &raw, &["write -P 0x5a 0 1024"]);
    let file = std::fs::read(&raw).unwrap();
    let payload = LuksHeader::decode(&file).unwrap().payload_offset() as usize;
    let rest = &file[payload..payload + 1024];
    std::fs::write(testdata(RAW), fixture(&file[..payload], rest)).unwrap();
    let info = run("qemu-img", &["info", "--output=json", &raw]);
    std::fs::write(testdata("raw-aes128-cbc-essiv-sha1.json"), info).unwrap();
    // A qcow2 image, aes-128-xts-plain64: guest offset 1 MiB written, then found on the host.
    let q = s(&dir.join("v.qcow2"));
    let o = "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10,encrypt.cipher-alg=aes-128";
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            SECRET_OBJECT,
            "-o",
            o,
            &q,
            "16M",
        ],
    );
    qemu_io("qcow2", "encrypt.", &q, &["write -P 0x5a 1M 64k"]);
    // The host offset from the L1 and L2 tables (qemu-img map hides it for encrypted images).
    let file = std::fs::read(&q).unwrap();
    let header = crate::format::header::Header::parse(&file[..65536]).unwrap();
    let be = |at: u64| u64::from_be_bytes(file[at as usize..at as usize + 8].try_into().unwrap());
    let l2 = be(header.l1_table_offset) & 0x00ff_ffff_ffff_fe00;
    let host = be(l2 + 16 * 8) & 0x00ff_ffff_ffff_fe00;
    let (at, len) = header.crypto_header().unwrap();
    let mut rest = [1u64 << 20, host].map(u64::to_be_bytes).concat();
    rest.extend_from_slice(&file[host as usize..host as usize + 1024]);
    let area = &file[at as usize..(at + len) as usize];
    std::fs::write(
        testdata("qcow2-aes128-xts-plain64.bin"),
        fixture(area, &rest),
    )
    .unwrap();
}

#[test]
fn unlocks_a_qemu_made_volume_and_reads_its_data() {
    let bytes = std::fs::read(testdata(RAW)).unwrap();
    let (area, payload) = area_of(&bytes);
    let luks = Luks::unlock(&area, b"abc").unwrap();
    let mut data = payload.to_vec();
    luks.decrypt(0, &mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
    let p = luks.params();
    assert_eq!(
        (p.cipher_alg, p.cipher_mode, p.ivgen_alg),
        (CipherAlg::Aes128, CipherMode::Cbc, IvGenAlg::Essiv)
    );
    assert_eq!(
        (p.ivgen_hash_alg, p.hash_alg),
        (Some(HashAlg::Sha256), HashAlg::Sha1)
    );
    let json = std::fs::read_to_string(testdata("raw-aes128-cbc-essiv-sha1.json")).unwrap();
    assert_info_matches(&luks.info(), &json);

    assert_eq!(
        Luks::unlock(&area, b"abd").unwrap_err(),
        CryptoError::InvalidPassword
    );
    assert_eq!(
        Luks::unlock(&area, b"").unwrap_err().to_string(),
        "Invalid password, cannot unlock any keyslot"
    );
    // The digest decides: one flipped bit of it and the right secret fails too.
    let mut bad = area.clone();
    bad[112] ^= 1;
    assert_eq!(
        Luks::unlock(&bad, b"abc").unwrap_err(),
        CryptoError::InvalidPassword
    );
    // So does a disabled slot.
    let mut bad = area.clone();
    bad[208..212].copy_from_slice(&KEY_SLOT_DISABLED.to_be_bytes());
    assert_eq!(
        Luks::unlock(&bad, b"abc").unwrap_err(),
        CryptoError::InvalidPassword
    );
    // An area cut inside slot 0's material.
    let err = Luks::unlock(&area[..10000], b"abc").unwrap_err();
    assert_eq!(
        err.to_string(),
        "Request for data outside of extension header: key slot 0 material needs bytes \
         4096..68096 of a 10000-byte header area"
    );
    assert!(matches!(
        Luks::unlock(&area[..591], b"abc"),
        Err(CryptoError::OutsideArea { .. })
    ));
    let shown = format!("{luks:?}");
    assert!(
        shown.contains("SectorCipher { alg: Aes128, mode: Cbc, ivgen: Essiv, .. }"),
        "{shown}"
    );
}

#[test]
fn a_qcow2_data_cluster_is_ciphered_by_its_host_offset() {
    let bytes = std::fs::read(testdata("qcow2-aes128-xts-plain64.bin")).unwrap();
    let (area, rest) = area_of(&bytes);
    assert_eq!(area.len(), 1_052_672);
    let luks = Luks::unlock(&area, b"abc").unwrap();
    let guest = u64::from_be_bytes(rest[..8].try_into().unwrap());
    let host = u64::from_be_bytes(rest[8..16].try_into().unwrap());
    assert_ne!(guest, host);
    let mut data = rest[16..].to_vec();
    luks.decrypt(guest, &mut data).unwrap();
    assert!(!data.iter().all(|&b| b == 0x5a));
    let mut data = rest[16..].to_vec();
    luks.decrypt(host, &mut data).unwrap();
    assert!(data.iter().all(|&b| b == 0x5a));
}

/// Volumes made here open in QEMU, and QEMU's in every hash open here (needs QEMU):
/// `cargo test --release --lib crypto::qemu_tests::qemu_reads -- --ignored`.
#[test]
#[ignore]
fn qemu_reads_what_we_write_and_we_read_what_it_writes() {
    let dir = scratch_dir("interop");
    let path = dir.join("ours.luks");
    let p = path.to_str().unwrap();
    for opts in [
        LuksCreateOptions {
            iter_time_ms: 10,
            ..Default::default()
        },
        LuksCreateOptions {
            cipher_alg: CipherAlg::Aes128,
            cipher_mode: CipherMode::Cbc,
            ivgen_alg: IvGenAlg::Essiv,
            hash_alg: HashAlg::Sha512,
            iter_time_ms: 10,
            ..Default::default()
        },
    ] {
        let (area, luks) = Luks::create(&opts, b"abc").unwrap();
        std::fs::write(&path, &area).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(area.len() as u64 + (1 << 20)).unwrap();
        let mut ours = vec![0x33u8; 65536];
        luks.encrypt(131072, &mut ours).unwrap();
        f.write_all_at(&ours, area.len() as u64 + 131072).unwrap();
        qemu_io(
            "luks",
            "",
            p,
            &["write -P 0x5a 0 64k", "read -P 0x33 128k 64k"],
        );
        let mut theirs = std::fs::read(&path).unwrap()[area.len()..][..65536].to_vec();
        luks.decrypt(0, &mut theirs).unwrap();
        assert!(theirs.iter().all(|&b| b == 0x5a));
        assert_info_matches(
            &luks.info(),
            &run("qemu-img", &["info", "--output=json", p]),
        );
    }
    for &hash in HashAlg::ALL {
        let theirs = dir.join("theirs.luks");
        let t = theirs.to_str().unwrap();
        qemu_luks(
            t,
            &format!("hash-alg={hash},cipher-alg=aes-128,cipher-mode=cbc"),
            "1M",
        );
        qemu_io("luks", "", t, &["write -P 0x77 512 512"]);
        let file = std::fs::read(&theirs).unwrap();
        let luks = Luks::unlock(&file, b"abc").unwrap();
        let payload = luks.header().payload_offset() as usize;
        let mut s = file[payload + 512..payload + 1024].to_vec();
        luks.decrypt(512, &mut s).unwrap();
        assert!(s.iter().all(|&b| b == 0x77), "{hash}");
    }
}

#[test]
fn round_trip_and_fields() {
    let bytes = std::fs::read(testdata(RAW)).unwrap();
    let (h, p) = LuksHeader::parse(&bytes).unwrap();
    assert_eq!(h.to_bytes()[..], bytes[..LUKS_HEADER_LEN]);
    assert_eq!(
        (h.version, h.key_bytes, h.payload_offset_sector),
        (1, 16, 1032)
    );
    assert_eq!(c_string(&h.cipher_name), "aes");
    assert_eq!(c_string(&h.cipher_mode), "cbc-essiv:sha256");
    assert_eq!(c_string(&h.hash_spec), "sha1");
    let offsets: Vec<u32> = h.key_slots.iter().map(|s| s.key_offset_sector).collect();
    assert_eq!(offsets, [8, 136, 264, 392, 520, 648, 776, 904]);
    assert!(h.key_slots[0].is_active() && h.key_slots[1..].iter().all(|s| !s.is_active()));
    let info = h.info(&p);
    assert_eq!(info.ivgen_hash_alg, Some(HashAlg::Sha256));
    assert_eq!(info.payload_offset, 528_384);
    assert_eq!(
        info.slots[1],
        LuksSlotInfo {
            active: false,
            iters: None,
            stripes: None,
            key_offset: 69632
        }
    );
    // Debug shows no salt and no digest bytes.
    let shown = format!("{h:?}");
    assert!(
        shown.contains("cipher_mode: \"cbc-essiv:sha256\"") && !shown.contains("salt"),
        "{shown}"
    );
}

/// The message of parsing the QEMU-made raw fixture's header after `f` changed it.
fn with(f: impl FnOnce(&mut LuksHeader)) -> String {
    let mut h = LuksHeader::decode(&std::fs::read(testdata(RAW)).unwrap()).unwrap();
    f(&mut h);
    LuksHeader::parse(&h.to_bytes()).map_or_else(|e| e.to_string(), |_| "ok".into())
}

#[test]
fn strings_in_qemu_order_and_words() {
    let mode = |m: &str| with(|h| h.cipher_mode = c_field(m));
    assert_eq!(
        mode("cbcessiv"),
        "Unexpected cipher mode string format 'cbcessiv'"
    );
    assert_eq!(
        mode("cbc-essiv:sha257"),
        "Hash algorithm 'sha257' not supported"
    );
    assert_eq!(mode("cbd-essiv:sha256"), "Cipher mode 'cbd' not supported");
    assert_eq!(
        mode("cbc-essiv2:sha256"),
        "IV generator 'essiv2' not supported"
    );
    assert_eq!(mode("cbc-essiv"), "Missing IV generator hash specification");
    assert_eq!(
        mode("cbc-essiv:sha1"),
        "No AES cipher with key size 20 available"
    );
    assert_eq!(mode("cbc-plain:sha1"), "ok");
    assert_eq!(
        mode("cbc-plain:sm3"),
        "ok",
        "QEMU ignores the hash of plain"
    );
    assert_eq!(
        mode("cbc-essiv:sm3"),
        "Hash algorithm 'sm3' not supported: qcow2ovl does not implement it"
    );
    assert_eq!(
        mode("xts-plain64"),
        "Algorithm 'aes' with key size 8 bytes not supported"
    );
    let name = |n: &str| with(|h| h.cipher_name = c_field(n));
    assert_eq!(
        name("foo"),
        "Algorithm 'foo' with key size 16 bytes not supported"
    );
    assert_eq!(
        name("serpent"),
        "Algorithm 'serpent' with key size 16 bytes not supported: qcow2ovl implements only AES"
    );
    assert_eq!(
        with(|h| h.hash_spec = c_field("sha2566")),
        "Hash algorithm 'sha2566' not supported"
    );
    // The cipher mode's problems come before the cipher's, the cipher's before the hash's.
    assert_eq!(
        with(|h| {
            h.cipher_name = c_field("foo");
            h.hash_spec = c_field("bar");
        }),
        "Algorithm 'foo' with key size 16 bytes not supported"
    );
}
