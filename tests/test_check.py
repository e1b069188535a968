"""`check` against `qemu-img check`: clean QEMU-made images, a corpus of damaged ones, named
overlaps, the CLI, the layout picture, and corrupted input that must not crash or hang.

The damaged corpus is built the way QEMU's own tests build theirs: qemu-img/qemu-io make a
valid image, then single bytes or entries are poked (refcounts zeroed or raised, a refcount table
entry cleared, L2 entries pointed into metadata, COPIED flags flipped, unaligned entries,
reserved bits, a snapshot L1 entry pointed at guest data...), plus a writer killed with lazy
refcounts on, and random corruptions of generated images. On every image our corruption,
leak and check-error counts and the exit status equal qemu-img's.

By-design differences (tested in `test_by_design_differences`): none in the counters on this
corpus. qcow2ovl adds the overlap list, and a finding in an L2 table that several L1 tables
reference is listed once with its count ("counted 3 times"), where qemu-img prints it once per
reference.
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
from qcow2ovl.cli import main as cli_main
from qcow2ovl.testing import random_corruption, random_image

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")
MiB = qi.MiB
CS = 65536
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
COPIED = 1 << 63


# ---- helpers ------------------------------------------------------------------------------


def header(path: Path) -> dict[str, int]:
    raw = path.read_bytes()[:104]
    return {
        "l1_size": struct.unpack(">I", raw[36:40])[0],
        "l1": struct.unpack(">Q", raw[40:48])[0],
        "rt": struct.unpack(">Q", raw[48:56])[0],
        "snapshots": struct.unpack(">Q", raw[64:72])[0],
    }


def u64(path: Path, offset: int) -> int:
    return int(qi.peek(path, offset, ">Q")[0])


def put64(path: Path, offset: int, value: int) -> None:
    qi.poke(path, offset, ">Q", value)


def l2_of(path: Path, index: int = 0) -> int:
    return u64(path, header(path)["l1"] + 8 * index) & OFFSET_MASK


def refblock0(path: Path) -> int:
    return u64(path, header(path)["rt"]) & OFFSET_MASK


def snapshot_l1(path: Path) -> int:
    # First snapshot table entry: L1 offset at byte 0.
    return u64(path, header(path)["snapshots"])


def ours(path: Path) -> qcow2ovl.CheckResult:
    return qcow2ovl.check(path)


def compare(path: Path) -> tuple[qcow2ovl.CheckResult, dict[str, Any]]:
    """Check with both tools; assert the counters and exit status agree."""
    theirs = qemu_check_any(path)
    mine = ours(path)
    got = {
        "corruptions": mine.corruptions,
        "leaks": mine.leaks,
        "check-errors": mine.check_errors,
        "exit": mine.exit_code,
    }
    want = {
        "corruptions": theirs.get("corruptions", 0),
        "leaks": theirs.get("leaks", 0),
        "check-errors": theirs.get("check-errors", 0),
        "exit": theirs["_exit"],
    }
    assert got == want, (path.name, [f.message for f in mine.findings[:20]], theirs)
    if theirs["_exit"] in (0, 2, 3):
        for key, value in mine.as_qemu_dict().items():
            if key not in ("filename", "overlaps"):
                assert theirs.get(key, 0) == value, (key, theirs, mine.as_qemu_dict())
    return mine, theirs


def qemu_check_any(path: Path) -> dict[str, Any]:
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "check", "--output=json", "-f", "qcow2", str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    assert proc.returncode in (0, 1, 2, 3), proc.stderr
    try:
        report = dict(json.loads(proc.stdout))
    except json.JSONDecodeError:  # QEMU could not open the image
        report = {"check-errors": 1, "_unopened": True}
    report["_exit"] = proc.returncode
    return report


@pytest.fixture(scope="module")
def base(module_tmp_path: Path) -> Path:
    """1 GiB, 64 KiB clusters, two L2 tables: data written, one snapshot, then more writes (so
    some clusters are shared with the snapshot and some are not)."""
    if not qi.HAVE_QEMU:
        pytest.skip("qemu-img/qemu-io not installed")
    d = module_tmp_path
    ref = qi.create(d / "base.qcow2", 1024 * MiB)
    qi.write(ref, [(0, 1 * MiB, 0x11), (4 * MiB, 1 * MiB, 0x22), (600 * MiB, 1 * MiB, 0x33)])
    qi.snapshot_create(ref.path, "s1")
    qi.write(ref, [(0, 256 * 1024, 0x44), (700 * MiB, 512 * 1024, 0x55)])
    return ref.path


def damaged(base: Path, tmp: Path, name: str, poke: Callable[[Path], None]) -> Path:
    p = tmp / f"{name}.qcow2"
    shutil.copyfile(base, p)
    poke(p)
    return p


# ---- the damaged corpus ------------------------------------------------------------------


def _zero_refcount(p: Path) -> None:
    data = u64(p, l2_of(p)) & OFFSET_MASK
    qi.poke(p, refblock0(p) + 2 * (data // CS), ">H", 0)


def _raise_refcount(p: Path) -> None:
    data = u64(p, l2_of(p)) & OFFSET_MASK
    qi.poke(p, refblock0(p) + 2 * (data // CS), ">H", 5)


def _leak_free_cluster(p: Path) -> None:
    size = p.stat().st_size
    with open(p, "ab") as f:
        f.write(bytes(2 * CS))
    qi.poke(p, refblock0(p) + 2 * (size // CS), ">H", 1)


def _clear_reftable_entry(p: Path) -> None:
    put64(p, header(p)["rt"], 0)


def _l2_entry_on_refblock(p: Path) -> None:
    put64(p, l2_of(p) + 8 * 3, COPIED | refblock0(p))


def _l2_entry_on_l1(p: Path) -> None:
    put64(p, l2_of(p) + 8 * 3, COPIED | header(p)["l1"])


def _compressed_on_header(p: Path) -> None:
    # A compressed cluster whose data starts at byte 0x200 of the header cluster.
    put64(p, l2_of(p) + 8 * 3, (1 << 62) | 0x200)


def _l1_entry_on_refblock(p: Path) -> None:
    put64(p, header(p)["l1"], COPIED | refblock0(p))


def _two_l1_entries_one_l2(p: Path) -> None:
    h = header(p)
    put64(p, h["l1"] + 8 * 1, u64(p, h["l1"]))


def _flip_copied_l1(p: Path) -> None:
    h = header(p)
    put64(p, h["l1"], u64(p, h["l1"]) ^ COPIED)


def _flip_copied_l2(p: Path) -> None:
    at = l2_of(p) + 8 * 10
    put64(p, at, u64(p, at) ^ COPIED)


def _unaligned_l2_entry(p: Path) -> None:
    at = l2_of(p) + 8 * 10
    put64(p, at, u64(p, at) + 0x200)


def _unaligned_l1_entry(p: Path) -> None:
    h = header(p)
    put64(p, h["l1"], u64(p, h["l1"]) + 0x200)


def _reserved_bits_l1(p: Path) -> None:
    h = header(p)
    put64(p, h["l1"], u64(p, h["l1"]) | 0x100)


def _reserved_bits_l2(p: Path) -> None:
    at = l2_of(p) + 8 * 10
    put64(p, at, u64(p, at) | 0x2)


def _snapshot_l1_into_data(p: Path) -> None:
    data = u64(p, l2_of(p) + 8 * 8) & OFFSET_MASK
    put64(p, snapshot_l1(p), data)


def _l2_entry_past_end(p: Path) -> None:
    put64(p, l2_of(p) + 8 * 3, COPIED | (p.stat().st_size + 10 * CS))


def _unaligned_refblock(p: Path) -> None:
    h = header(p)
    put64(p, h["rt"], u64(p, h["rt"]) + 0x200)


def _reftable_reserved(p: Path) -> None:
    h = header(p)
    put64(p, h["rt"], u64(p, h["rt"]) | 0x1)


def _refblock_on_l2(p: Path) -> None:
    # A second refcount table entry pointing at an L2 table.
    put64(p, header(p)["rt"] + 8 * 1, l2_of(p))


CORPUS: dict[str, Callable[[Path], None]] = {
    "refcount_zeroed": _zero_refcount,
    "refcount_raised": _raise_refcount,
    "leaked_cluster": _leak_free_cluster,
    "reftable_entry_cleared": _clear_reftable_entry,
    "l2_entry_on_refblock": _l2_entry_on_refblock,
    "l2_entry_on_l1": _l2_entry_on_l1,
    "compressed_on_header": _compressed_on_header,
    "l1_entry_on_refblock": _l1_entry_on_refblock,
    "two_l1_entries_one_l2": _two_l1_entries_one_l2,
    "copied_flipped_l1": _flip_copied_l1,
    "copied_flipped_l2": _flip_copied_l2,
    "unaligned_l2_entry": _unaligned_l2_entry,
    "unaligned_l1_entry": _unaligned_l1_entry,
    "reserved_bits_l1": _reserved_bits_l1,
    "reserved_bits_l2": _reserved_bits_l2,
    "snapshot_l1_into_data": _snapshot_l1_into_data,
    "l2_entry_past_end": _l2_entry_past_end,
    "unaligned_refblock": _unaligned_refblock,
    "reftable_reserved_bits": _reftable_reserved,
    "refblock_on_l2_table": _refblock_on_l2,
}


@needs_qemu
def test_base_is_clean(base: Path) -> None:
    mine, theirs = compare(base)
    assert mine.clean and theirs["_exit"] == 0


@needs_qemu
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_damaged_corpus_matches_qemu(base: Path, tmp_path: Path, name: str) -> None:
    p = damaged(base, tmp_path, name, CORPUS[name])
    mine, theirs = compare(p)
    assert theirs["_exit"] != 0, f"{name}: the poke did no damage"


@needs_qemu
def test_killed_writer_matches_qemu(tmp_path: Path) -> None:
    """Lazy refcounts and a writer killed before it flushed: the image is dirty and its
    refcounts lag behind the L2 tables."""
    ref = qi.create(tmp_path / "killed.qcow2", 64 * MiB, opts={"lazy_refcounts": True})
    assert qi.QEMU_IO is not None
    proc = subprocess.run(
        [qi.QEMU_IO, "-c", "write 0 1M", "-c", "write 8M 512k", "-c", "abort", str(ref.path)],
        capture_output=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert proc.returncode != 0  # aborted
    mine, theirs = compare(ref.path)
    assert theirs["_exit"] == 2 and mine.corruptions > 0


CLEAN_KINDS = sorted(qi.KINDS)


@needs_qemu
@pytest.mark.parametrize("kind", CLEAN_KINDS)
def test_qemu_made_kinds_match_qemu(kind: str) -> None:
    built = qi.get_image(kind)
    theirs = qi.qemu_check(built.ref)
    mine = ours(built.path)
    assert (mine.corruptions, mine.leaks, mine.check_errors, mine.exit_code) == (
        theirs.get("corruptions", 0),
        theirs.get("leaks", 0),
        theirs.get("check-errors", 0),
        theirs["_exit"],
    ), (kind, [f.message for f in mine.findings[:10]], theirs)
    want = {k: v for k, v in theirs.items() if not k.startswith("_") and k != "filename"}
    got = {k: v for k, v in mine.as_qemu_dict().items() if k not in ("filename", "overlaps")}
    assert got == want
    assert mine.overlaps == ()


# ---- overlaps named by pair ------------------------------------------------------------


def overlap_pairs(r: qcow2ovl.CheckResult) -> set[tuple[str, str]]:
    return {(o.first["type"], o.second["type"]) for o in r.overlaps}


@needs_qemu
def test_l2_table_on_refcount_block_is_named(base: Path, tmp_path: Path) -> None:
    p = damaged(base, tmp_path, "l1_on_rb", _l1_entry_on_refblock)
    r = ours(p)
    rb = refblock0(p)
    msgs = [o.message for o in r.overlaps]
    assert f"L2 table of L1 index 0 at {rb:#x} overlaps refcount block 0 at {rb:#x}" in msgs
    o = next(o for o in r.overlaps if o.second["type"] == "active-l2")
    assert o.second["l1_index"] == 0 and o.first["refcount_table_index"] == 0


@needs_qemu
def test_data_cluster_on_l2_table_is_named(base: Path, tmp_path: Path) -> None:
    def poke(p: Path) -> None:
        put64(p, l2_of(p) + 8 * 3, COPIED | l2_of(p, 1))

    p = damaged(base, tmp_path, "data_on_l2", poke)
    r = ours(p)
    l2 = l2_of(p, 1)
    o = next(o for o in r.overlaps if o.second["type"] == "data")
    assert o.first["type"] == "active-l2" and o.first["l1_index"] == 1
    assert o.second["guest_offset"] == 3 * CS
    assert o.message == (
        f"data cluster of guest offset {3 * CS:#x} at {l2:#x} overlaps L2 table of L1 index 1 "
        f"at {l2:#x}"
    )


@needs_qemu
def test_two_l2_tables_sharing_a_cluster(base: Path, tmp_path: Path) -> None:
    p = damaged(base, tmp_path, "shared_l2", _two_l1_entries_one_l2)
    r = ours(p)
    assert any(
        o.first == {**o.first, "type": "active-l2", "l1_index": 0} and o.second.get("l1_index") == 1
        for o in r.overlaps
    ), [o.message for o in r.overlaps]


@needs_qemu
def test_snapshot_sharing_is_not_an_overlap(base: Path) -> None:
    # The base image's snapshot shares L2 tables and data with the active image.
    assert ours(base).overlaps == ()


@needs_qemu
def test_every_overlap_kind_is_named(base: Path, tmp_path: Path) -> None:
    cases = {
        "l2_entry_on_refblock": ("refcount-block", "data"),
        "l2_entry_on_l1": ("active-l1", "data"),
        "compressed_on_header": ("header", "data"),
        "l1_entry_on_refblock": ("refcount-block", "active-l2"),
        "two_l1_entries_one_l2": ("active-l2", "active-l2"),
        "snapshot_l1_into_data": ("inactive-l2", "data"),
        "refblock_on_l2_table": ("refcount-block", "active-l2"),
    }
    for name, pair in cases.items():
        r = ours(damaged(base, tmp_path, name, CORPUS[name]))
        assert pair in overlap_pairs(r), (name, [o.message for o in r.overlaps])


@needs_qemu
def test_by_design_differences(base: Path, tmp_path: Path) -> None:
    """A reserved bit in an L2 table that two L1 entries reference: qemu-img prints two lines,
    we print one that counts twice; the counters agree."""

    def poke(p: Path) -> None:
        _two_l1_entries_one_l2(p)  # L1 entries 0 and 1 now share one L2 table
        at = l2_of(p, 0) + 8 * 10
        put64(p, at, u64(p, at) | 0x2)

    p = damaged(base, tmp_path, "shared_reserved", poke)
    r, theirs = compare(p)
    reserved = [f for f in r.findings if f.kind == "l2-reserved-bits"]
    assert len(reserved) == 1 and reserved[0].times == 2, reserved
    assert "counted 2 times" in reserved[0].message
    proc = qi.qemu_img("check", "-f", "qcow2", p, ok=(2,))
    assert (proc.stdout + proc.stderr).count("reserved bits set") == 2


@needs_qemu
def test_reference_past_the_end(base: Path, tmp_path: Path) -> None:
    r, theirs = compare(damaged(base, tmp_path, "past_end", _l2_entry_past_end))
    assert [f.kind for f in r.findings if f.kind == "past-end-of-file"] == ["past-end-of-file"]


# ---- the CLI -----------------------------------------------------------------------------


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", *args], capture_output=True, text=True, timeout=120
    )


@needs_qemu
def test_cli_exit_codes_and_json(base: Path, tmp_path: Path) -> None:
    assert cli_main(["check", str(base)]) == 0
    leak = damaged(base, tmp_path, "cli_leak", _leak_free_cluster)
    assert cli_main(["check", str(leak)]) == 3
    bad = damaged(base, tmp_path, "cli_bad", _l1_entry_on_refblock)
    proc = run_cli("check", "--output", "json", str(bad))
    assert proc.returncode == 2
    d = json.loads(proc.stdout)
    theirs = qemu_check_any(bad)
    assert set(d) - {"overlaps"} == set(theirs) - {"_exit"}
    assert d["overlaps"] and {"first", "second", "message", "cluster-offset"} <= set(
        d["overlaps"][0]
    )
    unaligned = damaged(base, tmp_path, "cli_unaligned", _unaligned_refblock)
    assert cli_main(["check", str(unaligned)]) == 1 == qemu_check_any(unaligned)["_exit"]
    human = run_cli("check", str(bad))
    assert "OVERLAP L2 table of L1 index 0" in human.stderr
    assert "ERROR cluster" in human.stderr and "errors were found" in human.stdout
    with pytest.raises(ValueError, match="repair must be"):
        qcow2ovl.check(bad, repair="everything")


def test_cli_not_qcow2_fails(tmp_path: Path) -> None:
    p = tmp_path / "raw.img"
    p.write_bytes(bytes(4096))
    assert cli_main(["check", str(p)]) == 1


# ---- the picture -------------------------------------------------------------------------


@needs_qemu
def test_picture(base: Path, tmp_path: Path) -> None:
    p = damaged(base, tmp_path, "pic", _l1_entry_on_refblock)
    svg_path = tmp_path / "layout.svg"
    assert cli_main(["map", "--picture", str(svg_path), str(p)]) == 0
    svg = svg_path.read_text()
    root = ET.fromstring(svg)
    ns = "{http://www.w3.org/2000/svg}"
    assert root.tag == f"{ns}svg"
    rects = root.findall(f".//{ns}rect")
    fills = {r.get("fill") for r in rects}
    from qcow2ovl.picture import DATA_COLOUR, PROBLEM_COLOUR, TYPE_COLOURS

    assert {DATA_COLOUR, TYPE_COLOURS["active-l2"], TYPE_COLOURS["refcount-block"]} <= fills
    assert any(r.get("stroke") == PROBLEM_COLOUR for r in rects if r.get("class") == "problem")
    texts = " ".join(t.text or "" for t in root.iter(f"{ns}text"))
    assert "1 cell = 1 cluster" in texts and "refcount blocks" in texts
    # A big file aggregates clusters per cell.
    with qcow2ovl.open(p) as img:
        small = ET.fromstring(img.render_layout(max_cells=16, columns=4))
    scale = [t.text for t in small.iter(f"{ns}text") if t.get("class") == "scale"][0]
    assert scale is not None and "clusters" in scale.split(";")[0]
    assert len([r for r in small.iter(f"{ns}rect") if r.get("class") in ("problem", None)]) >= 16
    converter = shutil.which("rsvg-convert")
    if converter:
        png = tmp_path / "layout.png"
        subprocess.run([converter, str(svg_path), "-o", str(png)], check=True, timeout=60)
        raw = png.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = struct.unpack(">II", raw[16:24])
        assert (width, height) == (int(root.get("width", 0)), int(root.get("height", 0)))
        _assert_png_has_colours(png, [PROBLEM_COLOUR, DATA_COLOUR])


def _assert_png_has_colours(png: Path, colours: list[str]) -> None:
    """Decode the PNG (8-bit RGB/RGBA, no interlace) with zlib and look for the colours."""
    import zlib

    raw = png.read_bytes()
    pos, idat, ihdr = 8, b"", b""
    while pos < len(raw):
        (n,) = struct.unpack(">I", raw[pos : pos + 4])
        kind = raw[pos + 4 : pos + 8]
        body = raw[pos + 8 : pos + 8 + n]
        if kind == b"IHDR":
            ihdr = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + n
    width, height, depth, ctype = struct.unpack(">IIBB", ihdr[:10])
    if depth != 8 or ctype not in (2, 6):
        pytest.skip(f"PNG colour type {ctype} depth {depth} not decoded here")
    bpp = 3 if ctype == 2 else 4
    data = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    seen: set[bytes] = set()
    i = 0
    for _ in range(height):
        f = data[i]
        line = bytearray(data[i + 1 : i + 1 + stride])
        i += 1 + stride
        for x in range(stride):
            a = line[x - bpp] if x >= bpp else 0
            b = prev[x]
            c = prev[x - bpp] if x >= bpp else 0
            if f == 1:
                line[x] = (line[x] + a) & 0xFF
            elif f == 2:
                line[x] = (line[x] + b) & 0xFF
            elif f == 3:
                line[x] = (line[x] + (a + b) // 2) & 0xFF
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                line[x] = (line[x] + pred) & 0xFF
        seen.update(bytes(line[x : x + 3]) for x in range(0, stride, bpp))
        prev = line
    for colour in colours:
        assert bytes.fromhex(colour[1:]) in seen, colour


# ---- random mutations of valid images: QEMU as the oracle ----------------------------------


@needs_qemu
def test_random_corruptions_match_qemu(tmp_path: Path) -> None:
    """Random valid images (the fuzz strategies' deterministic form) with random corruptions:
    wherever both tools can open the image, the counters and exit status are equal."""
    path = tmp_path / "case.qcow2"
    deadline = time.monotonic() + 12
    compared = 0
    for seed in range(1000, 1400):
        if time.monotonic() > deadline:
            break
        case = random_corruption(random_image(seed, max_bytes=1 << 20), seed)
        case.write_to(path)
        theirs = qemu_check_any(path)
        if theirs.get("_unopened"):
            continue  # QEMU cannot open it
        try:
            mine = ours(path)
        except (qcow2ovl.Qcow2Error, ValueError):
            continue  # we refuse it at open (see docs/design/check.md)
        got = (mine.corruptions, mine.leaks, mine.check_errors, mine.exit_code)
        want = (
            theirs.get("corruptions", 0),
            theirs.get("leaks", 0),
            theirs.get("check-errors", 0),
            theirs["_exit"],
        )
        assert got == want, (seed, case.description, [f.message for f in mine.findings[:10]])
        compared += 1
    assert compared >= 20


# ---- corrupted input: no panic, no hang ---------------------------------------------------


def test_check_on_corrupted_images_fails_cleanly(tmp_path: Path) -> None:
    """Random valid images with random corruptions: check returns or raises Qcow2Error /
    ValueError, quickly."""
    path = tmp_path / "current.qcow2"
    deadline = time.monotonic() + 12
    checked = 0
    for seed in range(400):
        if time.monotonic() > deadline:
            break
        case = random_corruption(random_image(seed, max_bytes=1 << 20), seed)
        case.write_to(path)
        started = time.monotonic()
        try:
            with qcow2ovl.open(path, overlap_check="none") as img:
                r = img.check()
        except (qcow2ovl.Qcow2Error, ValueError):
            continue
        assert time.monotonic() - started < 10, case.description
        assert r.exit_code in (0, 1, 2, 3)
        assert r.finding_count >= len(r.findings)
        checked += 1
    assert checked > 20
