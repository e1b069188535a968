//! Metadata map vs QEMU's naive overlap check, side by side, on synthetic layouts.
//!
//! Prints one JSON object per workload (see `benches/bench_map.py`, which runs this). All timing
//! loops run here in Rust; the naive checker's `all` mode reads the snapshot L1 tables from a
//! real (sparse) file on every check, as QEMU does.

use std::fs::File;
use std::hint::black_box;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use qcow2ovl::format::{ClusterCount, HostOffset};
use qcow2ovl::overlap::{MetadataMap, MetadataType as T, NaiveChecker, NaiveLayout};
use qcow2ovl::storage::{FileStorage, MemStorage, Storage};
use std::sync::Arc;

const CS: u64 = 64 * 1024;
const TIB_CLUSTERS: u64 = 1 << 24;

/// xorshift64*: deterministic, fast, good enough to scatter clusters.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        ((self.next() as u128 * n as u128) >> 64) as u64
    }
}

/// A synthetic image: its metadata extents (cluster, count, types) and the naive layout.
struct Workload {
    name: &'static str,
    host_clusters: u64,
    extents: Vec<(u64, u64, T)>,
    layout: NaiveLayout,
    /// Snapshot L1 tables to write into the sparse file: (offset, entries).
    snapshot_l1s: Vec<(u64, Vec<u64>)>,
}

/// Picks `n` distinct clusters in `lo..hi` (sparse sets only: retries on collision).
fn scatter(
    rng: &mut Rng,
    n: u64,
    lo: u64,
    hi: u64,
    taken: &mut std::collections::HashSet<u64>,
) -> Vec<u64> {
    let mut out = Vec::with_capacity(n as usize);
    while (out.len() as u64) < n {
        let c = lo + rng.below(hi - lo);
        if taken.insert(c) {
            out.push(c);
        }
    }
    out
}

fn build(
    name: &'static str,
    data_clusters: u64,
    nsnap: usize,
    tables: bool,
    seed: u64,
) -> Workload {
    let mut rng = Rng(seed);
    let l2_count = data_clusters / (CS / 8);
    let rb_count = data_clusters / (CS * 8 / 16);
    let l1_clusters = (l2_count * 8).div_ceil(CS);
    let rt_clusters = (rb_count * 8).div_ceil(CS);
    // Header, reftable, L1 at the front, then everything else scattered among the data.
    let rt_start = 1;
    let l1_start = rt_start + rt_clusters;
    let front = l1_start + l1_clusters;
    let private_per_snap = l2_count / 4;
    let extra = if tables {
        l2_count + rb_count + nsnap as u64 * (1 + private_per_snap) + 1
    } else {
        0
    };
    let host_clusters = front + data_clusters + extra;
    let mut taken = std::collections::HashSet::new();
    let mut extents = vec![
        (0, 1, T::MAIN_HEADER),
        (rt_start, rt_clusters, T::REFCOUNT_TABLE),
        (l1_start, l1_clusters, T::ACTIVE_L1),
    ];
    let mut l1_table = vec![0u64; l2_count as usize];
    let mut refcount_table = vec![0u64; (rt_clusters * CS / 8) as usize];
    let mut snapshot_l1s = Vec::new();
    let mut snapshots = Vec::new();
    let (mut snapshots_offset, mut snapshots_size) = (0, 0);
    if tables {
        let l2s = scatter(&mut rng, l2_count, front, host_clusters, &mut taken);
        for (i, &c) in l2s.iter().enumerate() {
            l1_table[i] = (1 << 63) | (c * CS);
            extents.push((c, 1, T::ACTIVE_L2));
        }
        for (i, c) in scatter(&mut rng, rb_count, front, host_clusters, &mut taken)
            .into_iter()
            .enumerate()
        {
            refcount_table[i] = c * CS;
            extents.push((c, 1, T::REFCOUNT_BLOCK));
        }
        if nsnap > 0 {
            let st = scatter(&mut rng, 1, front, host_clusters, &mut taken)[0];
            snapshots_offset = st * CS;
            snapshots_size = nsnap as u64 * 64;
            extents.push((st, 1, T::SNAPSHOT_TABLE));
        }
        for _ in 0..nsnap {
            let l1c = scatter(&mut rng, l1_clusters, front, host_clusters, &mut taken);
            // Snapshot L1 tables are single clusters here (2048 entries of 8 bytes = 16 KiB).
            extents.push((l1c[0], l1_clusters, T::INACTIVE_L1));
            let mut table: Vec<u64> = l2s.iter().map(|&c| c * CS).collect();
            for (slot, c) in scatter(&mut rng, private_per_snap, front, host_clusters, &mut taken)
                .into_iter()
                .enumerate()
            {
                let i = (slot * 4) % table.len();
                table[i] = c * CS;
                extents.push((c, 1, T::INACTIVE_L2));
            }
            extents.extend(table.iter().map(|&o| (o / CS, 1, T::INACTIVE_L2)));
            snapshots.push((l1c[0] * CS, l2_count as u32));
            snapshot_l1s.push((l1c[0] * CS, table));
        }
    }
    Workload {
        name,
        host_clusters,
        extents,
        layout: NaiveLayout {
            cluster_size: CS,
            l1_table_offset: l1_start * CS,
            l1_table,
            refcount_table_offset: rt_start * CS,
            refcount_table,
            snapshots_offset,
            snapshots_size,
            snapshots,
            ..NaiveLayout::default()
        },
        snapshot_l1s,
    }
}

/// Average nanoseconds per call of `f` over `offsets`, repeated until `budget` is spent.
fn time_per_check(offsets: &[u64], budget: Duration, mut f: impl FnMut(u64) -> u16) -> f64 {
    let start = Instant::now();
    let mut calls = 0u64;
    let mut acc = 0u16;
    'outer: loop {
        for &o in offsets {
            acc |= f(o);
            calls += 1;
            if calls % 64 == 0 && start.elapsed() > budget {
                break 'outer;
            }
        }
        if start.elapsed() > budget {
            break;
        }
    }
    black_box(acc);
    start.elapsed().as_nanos() as f64 / calls as f64
}

fn run(w: &Workload, tmp: &std::path::Path, quick: bool) -> String {
    let mut rng = Rng(0x5eed);
    // Build the map from the extents in random order, timed.
    let mut order: Vec<usize> = (0..w.extents.len()).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let metadata_clusters: u64 = {
        let mut m = MetadataMap::new(CS, T::all(), None).expect("valid cluster size");
        for &(c, n, t) in &w.extents {
            m.enter(HostOffset(c * CS), ClusterCount(n), t)
                .expect("in range");
        }
        m.metadata_clusters() as u64
    };
    let t0 = Instant::now();
    let mut map = MetadataMap::new(CS, T::all(), None).expect("valid cluster size");
    for &i in &order {
        let (c, n, t) = w.extents[i];
        map.enter(HostOffset(c * CS), ClusterCount(n), t)
            .expect("in range");
    }
    let build_s = t0.elapsed().as_secs_f64();
    let map_bytes = map.memory_usage();

    // The naive checker's snapshot L1 tables live in a sparse file, read on every check.
    let path = tmp.join(format!("{}.img", w.name));
    let file = File::create(&path).expect("create bench file");
    for (ofs, table) in &w.snapshot_l1s {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        file.write_all_at(&bytes, *ofs).expect("write snapshot L1");
    }
    // Only the snapshot L1 tables are ever read; the file need not span the whole host range
    // (ext4 stops at 16 TiB).
    let file_end = w
        .snapshot_l1s
        .iter()
        .map(|(o, t)| o + t.len() as u64 * 8)
        .max()
        .unwrap_or(0);
    file.set_len(file_end).expect("sparse size");
    drop(file);
    let reader: Arc<dyn Storage> =
        Arc::new(FileStorage::open_read_only(&path).expect("open bench file"));
    let naive_all = NaiveChecker::new(w.layout.clone(), T::all(), reader).expect("valid layout");
    let naive_cached = NaiveChecker::new(
        w.layout.clone(),
        T::TEMPLATE_CACHED,
        Arc::new(MemStorage::default()),
    )
    .expect("valid layout");

    let host_bytes = w.host_clusters * CS;
    let n = if quick { 1 << 16 } else { 1 << 20 };
    let offsets: Vec<u64> = (0..n)
        .map(|_| rng.below(host_bytes / 4096) * 4096)
        .collect();
    // Agreement on a sample, including every metadata cluster's first byte.
    let mut mismatches = 0u64;
    let sample: Vec<u64> = offsets
        .iter()
        .take(200)
        .copied()
        .chain(
            w.extents
                .iter()
                .step_by((w.extents.len() / 300).max(1))
                .map(|e| e.0 * CS),
        )
        .collect();
    for &o in &sample {
        let a = map
            .check(HostOffset(o), 4096, T::empty())
            .expect("in range");
        let b = naive_all.check(o, 4096, T::empty()).expect("read");
        if a != b {
            mismatches += 1;
        }
    }
    let budget = Duration::from_millis(if quick { 150 } else { 1000 });
    let nbudget = Duration::from_millis(if quick { 150 } else { 700 });
    let mut result = String::new();
    let mut per_size = Vec::new();
    for size in [4096u64, 65536] {
        let m = time_per_check(&offsets, budget, |o| {
            map.check(HostOffset(o), size, T::empty())
                .map(|t| t.bits())
                .unwrap_or(0)
        });
        let nc = time_per_check(&offsets, nbudget, |o| {
            naive_cached
                .check(o, size, T::empty())
                .map(|t| t.bits())
                .unwrap_or(0)
        });
        let na = time_per_check(&offsets, nbudget, |o| {
            naive_all
                .check(o, size, T::empty())
                .map(|t| t.bits())
                .unwrap_or(0)
        });
        per_size.push((m, nc, na));
    }
    // Remove everything again, timed.
    let t1 = Instant::now();
    for &i in &order {
        let (c, n, t) = w.extents[i];
        map.remove(HostOffset(c * CS), ClusterCount(n), t)
            .expect("in range");
    }
    let remove_s = t1.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    let fmt = |(m, nc, na): (f64, f64, f64)| {
        format!("{{\"map\": {m:.1}, \"naive_cached\": {nc:.1}, \"naive_all\": {na:.1}}}")
    };
    let (m4, nc4, na4) = per_size[0];
    result.push_str(&format!(
        "{{\"workload\": \"{}\", \"host_bytes\": {}, \"metadata_clusters\": {}, \"extents_entered\": {}, \
\"ns_per_check\": {}, \"ns_per_check_64k\": {}, \"speedup_vs_naive_cached\": {:.0}, \"speedup_vs_naive_all\": {:.0}, \
\"map_bytes\": {}, \"map_bytes_per_metadata_cluster\": {:.2}, \"build_s\": {:.3}, \"remove_s\": {:.3}, \"sample_checks\": {}, \"mismatches_vs_naive\": {}}}",
        w.name,
        host_bytes,
        metadata_clusters,
        w.extents.len(),
        fmt(per_size[0]),
        fmt(per_size[1]),
        nc4 / m4,
        na4 / m4,
        map_bytes,
        map_bytes as f64 / metadata_clusters as f64,
        build_s,
        remove_s,
        sample.len(),
        mismatches,
    ));
    result
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Option<&String> = args.iter().skip(1).find(|a| !a.starts_with("--"));
    let tmp = std::env::var_os("QCOW2OVL_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let specs: [(&'static str, u64, usize, bool); 4] = [
        ("plain-1TiB", TIB_CLUSTERS, 0, true),
        ("snap16-1TiB", TIB_CLUSTERS, 16, true),
        ("plain-1PiB", TIB_CLUSTERS << 10, 0, true),
        ("empty-1PiB", TIB_CLUSTERS << 10, 0, false),
    ];
    for (name, data, snaps, tables) in specs {
        if only.is_some_and(|o| o != name) {
            continue;
        }
        let w = build(name, data, snaps, tables, 0xc0ffee ^ data);
        let line = run(&w, &tmp, quick);
        println!("{line}");
        std::io::stdout().flush().expect("stdout");
    }
}
