"""Property-based fuzzing with `qcow2ovl.testing`'s strategies.

Valid images (`qcow2_images()`), three judges that must agree:
- QEMU: `qemu-img check` finds nothing (no errors, leaks or corruptions) and `qemu-img info`
  lists the same snapshots and bitmaps;
- the independent oracle (`tests/oracle.py`) reading the bytes;
- the generator's own layout (what it placed where, with which refcounts).
`qcow2ovl.open` must map exactly those extents, report no problems, and `check_overlap` must name
every metadata cluster's types and give 0 on data and free clusters.

Corrupted images (`corrupted_images()`): `qcow2ovl.open` either works or raises a
`qcow2ovl.Qcow2Error`, never anything else (a Rust panic, an OverflowError, a crash or a hang);
when it works, the image's methods raise nothing but `Qcow2Error`/`ValueError`. A sample is also
opened with `qemu-img info` and the verdicts are tallied (not asserted: QEMU checks some things
only later, when a table is used, and qcow2ovl reads every table at open).

Scale with environment variables:
- `QCOW2OVL_FUZZ_EXAMPLES` (default 300): corrupted images;
- `QCOW2OVL_FUZZ_VALID_EXAMPLES` (default 100): valid images;
- `QCOW2OVL_FUZZ_QEMU_EVERY` (default 10): compare with `qemu-img info` every N-th corrupted image
  (0: never);
- `QCOW2OVL_FUZZ_REPORT`: a path; the corrupted-image run writes its tally there as JSON.
The example being opened is always in `<tmp>/current.qcow2` with its description in
`<tmp>/current.txt`, so a crash or hang (a watchdog ends the process after 120 s in one open)
leaves its reproducer behind.
"""

from __future__ import annotations

import collections
import faulthandler
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import oracle
import pytest
import qcow2ovl
import qemu_images as qi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qcow2ovl import MetadataType
from qcow2ovl.testing import (
    CorruptedImage,
    GeneratedImage,
    ImageLayout,
    corrupted_images,
    qcow2_images,
    random_corruption,
    random_image,
)

VALID_EXAMPLES = int(os.environ.get("QCOW2OVL_FUZZ_VALID_EXAMPLES", "100"))
CORRUPT_EXAMPLES = int(os.environ.get("QCOW2OVL_FUZZ_EXAMPLES", "300"))
QEMU_EVERY = int(os.environ.get("QCOW2OVL_FUZZ_QEMU_EVERY", "10"))
WATCHDOG_SECONDS = 120

SETTINGS = settings(
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
        HealthCheck.function_scoped_fixture,
    ],
)

needs_qemu = pytest.mark.skipif(not qi.HAVE_QEMU, reason="qemu-img/qemu-io not installed")


# ---- QEMU ---------------------------------------------------------------------------------------


def _no_backing(path: Path) -> str:
    """A QEMU filename that opens `path` as qcow2 without its backing file (which the generated
    images name but do not have)."""
    spec = {"driver": "qcow2", "file": {"driver": "file", "filename": str(path)}, "backing": None}
    return "json:" + json.dumps(spec)


def qemu_check(path: Path) -> tuple[bool, str]:
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "check", "--output=json", _no_backing(path)],
        capture_output=True,
        text=True,
        errors="replace",  # names from broken images need not be UTF-8
        timeout=120,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        report = {}
    report["_exit"] = proc.returncode
    return qi.check_is_clean(report), proc.stdout + proc.stderr


def qemu_info(path: Path) -> tuple[dict[str, Any] | None, str]:
    """`qemu-img info` as JSON, or None and QEMU's error when it refuses the image."""
    assert qi.QEMU_IMG is not None
    proc = subprocess.run(
        [qi.QEMU_IMG, "info", "--output=json", _no_backing(path)],
        capture_output=True,
        text=True,
        errors="replace",  # names from broken images need not be UTF-8
        timeout=120,
    )
    if proc.returncode != 0:
        msg = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
        msg = msg.removeprefix("qemu-img: ")
        if msg.startswith("Could not open '") and "': " in msg:
            msg = msg.split("': ", 1)[1]
        return None, msg
    return dict(json.loads(proc.stdout)), ""


# ---- the generator's own claims -----------------------------------------------------------------


def test_importing_qcow2ovl_does_not_import_hypothesis() -> None:
    code = "import sys, qcow2ovl; assert 'hypothesis' not in sys.modules, 'hypothesis imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_seeded_images_are_deterministic() -> None:
    a, b = random_image(1234), random_image(1234)
    assert a.data == b.data and a.layout == b.layout
    assert random_corruption(a, 5).data == random_corruption(b, 5).data
    assert random_corruption(a, 5).operations == random_corruption(b, 5).operations


def test_options_are_validated() -> None:
    with pytest.raises(ValueError):
        random_image(0, versions=(4,))
    with pytest.raises(ValueError):
        random_image(0, min_cluster_bits=8)
    with pytest.raises(ValueError):
        random_image(0, refcount_orders=(7,))


def _copied_flags_exact(image: GeneratedImage) -> list[str]:
    """COPIED (bit 63) must be set exactly on L1 and standard L2 entries whose cluster has
    refcount 1, in every table (snapshot tables too: the generator promises exactness)."""
    layout, data = image.layout, image.data
    o = oracle.Oracle.from_bytes(data)
    refs = o.refcounts()
    cs = layout.cluster_size
    bad = []
    for t in layout.tables:
        if t.kind not in ("active L1", "snapshot L1", "L2"):
            continue
        for i in range(t.entries):
            at = t.offset + i * t.entry_size
            word = int.from_bytes(data[at : at + 8].ljust(8, b"\0"), "big")
            offset = word & oracle.L1E_OFFSET_MASK
            if t.kind == "L2" and word & oracle.L2E_COMPRESSED:
                if word >> 63:
                    bad.append(f"{t.name}[{i}]: COPIED on a compressed cluster")
                continue
            if not offset:
                if word >> 63:
                    bad.append(f"{t.name}[{i}]: COPIED on an unallocated entry")
                continue
            if bool(word >> 63) != (refs.get(offset // cs, 0) == 1):
                bad.append(f"{t.name}[{i}]: COPIED={word >> 63}, refcount={refs.get(offset // cs)}")
    return bad


def _check_info(img: qcow2ovl.Image, layout: ImageLayout, size: int) -> None:
    info = img.info
    assert info.version == layout.version
    assert info.cluster_size == layout.cluster_size
    assert info.refcount_bits == layout.refcount_bits
    assert info.virtual_size == layout.virtual_size
    assert info.extended_l2 == layout.extended_l2
    assert info.compression_type == ("zstd" if layout.compression_type else "zlib")
    assert info.lazy_refcounts == bool(layout.compatible_features & 1)
    assert not info.dirty and not info.corrupt and info.crypt_method == 0
    assert info.backing_file == layout.backing_file
    assert info.backing_format == layout.backing_format
    assert info.l1_size == layout.l1_size
    assert info.l1_table_offset == layout.l1_table_offset
    assert info.refcount_table_offset == layout.refcount_table_offset
    assert info.refcount_table_clusters == layout.refcount_table_clusters
    assert info.snapshots_offset == layout.snapshots_offset
    assert info.file_size == size
    got_snaps = [(s.id, s.name, s.l1_table_offset, s.l1_size) for s in img.snapshots]
    want_snaps = [(s.id, s.name, s.l1_table_offset, s.l1_size) for s in layout.snapshots]
    assert got_snaps == want_snaps
    assert [s.disk_size for s in img.snapshots] == [s.disk_size for s in layout.snapshots]
    got_bms = [(b.name, b.granularity, b.flags, b.table_offset, b.table_size) for b in img.bitmaps]
    want_bms = [
        (b.name, 1 << b.granularity_bits, b.flags, b.table_offset, b.table_size)
        for b in layout.bitmaps
    ]
    assert got_bms == want_bms


def _check_valid(image: GeneratedImage, path: Path) -> None:
    layout = image.layout
    image.write_to(path)
    why = image.layout.summary()

    # QEMU: clean, and it sees the same snapshots and bitmaps
    if qi.HAVE_QEMU:
        clean, out = qemu_check(path)
        assert clean, f"qemu-img check is not clean for {why}:\n{out}"
        info, err = qemu_info(path)
        assert info is not None, err
        assert info["virtual-size"] == layout.virtual_size
        assert info["cluster-size"] == layout.cluster_size
        snaps = [(s["id"], s["name"]) for s in info.get("snapshots", [])]
        assert snaps == [(s.id, s.name) for s in layout.snapshots]
        data = info.get("format-specific", {}).get("data", {})
        assert [b["name"] for b in data.get("bitmaps", [])] == [b.name for b in layout.bitmaps]

    # the oracle and the layout agree on extents and refcounts, and COPIED flags are exact
    o = oracle.Oracle.from_bytes(image.data)
    want = o.metadata_extents()
    mine = oracle.normalize_extents(layout.metadata_extents())
    assert mine == want, (
        f"{why}\nlayout:\n{oracle.describe(mine)}\noracle:\n{oracle.describe(want)}"
    )
    assert o.refcounts() == dict(layout.refcounts), why
    assert _copied_flags_exact(image) == [], why

    # qcow2ovl agrees with both
    with qcow2ovl.open(path) as img:
        got = img.metadata_extents()
        assert all(isinstance(t, MetadataType) for _, _, t in got)
        got_n = oracle.normalize_extents(got)
        assert got_n == want, f"{why}\nqcow2ovl:\n{oracle.describe(got_n)}\n{oracle.describe(want)}"
        assert img.problems == [], why
        _check_info(img, layout, len(image.data))

        cs = layout.cluster_size
        types = layout.cluster_types()
        for s in layout.structures:
            if s.types:  # the whole extent, and every cluster of it
                assert img.check_overlap(s.offset, max(s.length, 1)) & s.types == s.types, s
        for c, t in types.items():
            assert int(img.check_overlap(c * cs, cs)) == int(t), (c, t)
            assert int(img.check_overlap(c * cs + cs - 1, 1)) == int(t), (c, t)
        for c in layout.data_clusters():
            assert int(img.check_overlap(c * cs, cs)) == 0, f"data cluster {c}"
        for c in layout.free_clusters():
            assert int(img.check_overlap(c * cs, cs)) == 0, f"free cluster {c}"
        # a write spanning everything sees every type placed
        everything = MetadataType(0)
        for t in types.values():
            everything |= t
        assert img.check_overlap(0, max(len(image.data), cs)) == everything
    # other templates map exactly their types; under a tiny memory limit the fallback (QEMU's
    # naive check) still answers exactly
    for template in ("cached", "constant", "none"):
        with qcow2ovl.open(path, overlap_check=template) as img:
            got_n = oracle.normalize_extents(img.metadata_extents())
            assert got_n == o.metadata_extents(oracle.TEMPLATES[template]), (template, why)
    with qcow2ovl.open(path, map_memory_limit=256) as img:
        assert img.map_memory_usage() <= 256
        for c, t in types.items():
            assert int(img.check_overlap(c * cs, cs)) == int(t), (c, t, "memory limit")
        for c in layout.data_clusters():
            assert int(img.check_overlap(c * cs, cs)) == 0, (c, "memory limit")
    assert path.read_bytes() == image.data, "opening changed the file"


def test_generated_images_are_valid(tmp_path: Path) -> None:
    """Three-way agreement on generated valid images: QEMU, the oracle and the layout."""
    path = tmp_path / "image.qcow2"

    @settings(SETTINGS, max_examples=VALID_EXAMPLES)
    @given(qcow2_images())
    def run(image: GeneratedImage) -> None:
        _check_valid(image, path)

    run()


def test_generated_images_small_clusters_v2(tmp_path: Path) -> None:
    """Options narrow the generator (and the narrow corners stay valid)."""
    path = tmp_path / "image.qcow2"

    @settings(SETTINGS, max_examples=15)
    @given(qcow2_images(versions=(2,), max_cluster_bits=10))
    def run(image: GeneratedImage) -> None:
        assert image.layout.version == 2 and image.layout.cluster_size <= 1024
        _check_valid(image, path)

    run()


def test_generated_images_narrow_refcounts(tmp_path: Path) -> None:
    """1- and 2-bit refcounts: sharing must stay within the largest refcount."""
    path = tmp_path / "image.qcow2"

    @settings(SETTINGS, max_examples=15)
    @given(qcow2_images(versions=(3,), refcount_orders=(0, 1), max_cluster_bits=12))
    def run(image: GeneratedImage) -> None:
        assert image.layout.refcount_order in (0, 1)
        _check_valid(image, path)

    run()


def test_generated_images_large_clusters(tmp_path: Path) -> None:
    """128 KiB to 2 MiB clusters (files of a few megabytes)."""
    path = tmp_path / "image.qcow2"

    @settings(SETTINGS, max_examples=5)
    @given(qcow2_images(min_cluster_bits=17, max_cluster_bits=21, max_snapshots=1))
    def run(image: GeneratedImage) -> None:
        assert image.layout.cluster_size >= 128 << 10
        _check_valid(image, path)

    run()


# ---- corrupted images ---------------------------------------------------------------------------


class Tally:
    """What the corrupted-image run saw."""

    def __init__(self) -> None:
        self.examples = 0
        self.opened = 0
        self.refused: collections.Counter[str] = collections.Counter()
        self.qemu_compared = 0
        self.verdicts: collections.Counter[str] = collections.Counter()
        self.disagreements: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        self.max_open_seconds = 0.0
        self.started = time.monotonic()

    def as_dict(self) -> dict[str, Any]:
        return {
            "examples": self.examples,
            "opened": self.opened,
            "refused": dict(self.refused.most_common()),
            "qemu_compared": self.qemu_compared,
            "verdicts": dict(self.verdicts),
            "disagreements": {k: v[:5] for k, v in self.disagreements.items()},
            "disagreement_counts": {k: len(v) for k, v in self.disagreements.items()},
            "max_open_seconds": round(self.max_open_seconds, 3),
            "seconds": round(time.monotonic() - self.started, 1),
        }


def _phrase(message: str) -> str:
    """The leading words of an error message without numbers, offsets and names, to group
    messages (`FormatError: Snapshot L1 table offset invalid: offset 0x5bf9 ...` becomes
    `Snapshot L1 table offset invalid`)."""
    if message.split(":")[0] in ("FormatError", "UnsupportedError", "CorruptImageError"):
        message = message.split(": ", 1)[1]
    head = message.split(": ")[0] if not message.startswith(("ERROR", "qcow2:")) else message
    words = []
    for w in head.replace(",", " ").split()[:8]:
        if w.strip("()'=").isdigit() or w.startswith(("0x", "'", "len=", "(")) or "=" in w:
            break
        words.append(w)
    return " ".join(words)


def _exercise(img: qcow2ovl.Image, size: int) -> None:
    """Every read-only method of an opened (possibly broken) image: nothing but Qcow2Error or
    ValueError may come out, and the answers must be well-formed."""
    allowed = (qcow2ovl.Qcow2Error, ValueError)
    info = img.info
    cs = info.cluster_size
    assert cs & (cs - 1) == 0 and 512 <= cs <= 2 << 20
    _ = (img.snapshots, img.bitmaps, img.problems, img.map_memory_usage(), repr(img))
    _ = [s.date for s in img.snapshots]
    _ = [(b.in_use, b.auto) for b in img.bitmaps]
    extents = img.metadata_extents()
    end = -1
    for offset, length, types in extents:
        assert isinstance(types, MetadataType) and types
        assert offset % cs == 0 and length % cs == 0 and length > 0 and offset >= end
        end = offset + length
    probes = [(0, 1), (0, cs), (cs, cs), (size, cs), (max(size - 1, 0), 2), (2**56 - cs, cs)]
    probes += [(2**63, cs), (2**64 - cs, cs), (2**64 - 1, 1), (0, 2**63), (12345, 0)]
    probes += [(o, n) for o, n, _ in extents[:32]]
    for offset, length in probes:
        try:
            got = img.check_overlap(offset, length)
        except allowed:
            continue
        assert isinstance(got, MetadataType)
    for offset, length, types in extents[:32]:
        assert img.check_overlap(offset, length) & types == types


def _open_and_exercise(path: Path, size: int, **options: Any) -> tuple[bool, str]:
    """(opened, error message). Anything but a Qcow2Error at open, or anything but
    Qcow2Error/ValueError afterwards, fails the test (a Rust panic included)."""
    try:
        try:
            img = qcow2ovl.open(path, **options)
        except qcow2ovl.Qcow2Error as e:
            return False, f"{type(e).__name__}: {e}"
        except OSError as e:
            # A writable open opens the backing chain and data file at once (as QEMU does): a
            # file the header names that is missing or unreadable is an OSError naming it.
            if not options.get("writable") or e.filename in (None, str(path)):
                raise
            return False, f"{type(e).__name__}: {e}"
        with img:
            try:
                _exercise(img, size)
            except (qcow2ovl.Qcow2Error, ValueError):
                pass  # allowed (the well-formedness checks raise AssertionError, not these)
        return True, ""
    except AssertionError:
        raise
    except BaseException as e:  # a Rust panic is a BaseException (pyo3_runtime.PanicException)
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        raise AssertionError(f"unexpected {type(e).__module__}.{type(e).__name__}: {e}") from e


def _compare_with_qemu(tally: Tally, case: CorruptedImage, path: Path, ours: str | None) -> None:
    info, theirs = qemu_info(path)
    qemu_ok = info is not None
    tally.qemu_compared += 1
    key = "qcow2ovl " + ("opens" if ours is None else "refuses")
    key += ", QEMU " + ("opens" if qemu_ok else "refuses")
    tally.verdicts[key] += 1
    if (ours is None) != qemu_ok:
        group = f"{key}: {_phrase(ours or theirs)}"
        tally.disagreements[group].append(
            {"qcow2ovl": ours or "", "qemu": theirs, "case": case.description}
        )


def test_corrupted_images_fail_cleanly(tmp_path: Path) -> None:
    """Broken images: open works or raises Qcow2Error; nothing crashes, panics or hangs."""
    path = tmp_path / "current.qcow2"
    note = tmp_path / "current.txt"
    tally = Tally()

    @settings(SETTINGS, max_examples=CORRUPT_EXAMPLES)
    @given(
        corrupted_images(),
        st.sampled_from(["all", "cached", "constant", "none"]),
        st.sampled_from([None, None, 256, 4096]),
        st.sampled_from([False, False, False, True]),
    )
    def run(case: CorruptedImage, template: str, limit: int | None, writable: bool) -> None:
        tally.examples += 1
        options = {"overlap_check": template, "map_memory_limit": limit, "writable": writable}
        note.write_text(f"example {tally.examples}\n{case.description}\nopen options: {options}\n")
        case.write_to(path)
        faulthandler.dump_traceback_later(WATCHDOG_SECONDS, exit=True)
        started = time.monotonic()
        try:
            opened, error = _open_and_exercise(path, len(case.data), **options)
        finally:
            faulthandler.cancel_dump_traceback_later()
        tally.max_open_seconds = max(tally.max_open_seconds, time.monotonic() - started)
        # Opening changes nothing, except that a writable open of an image left dirty by lazy
        # refcounts repairs it first (as QEMU does): then the repaired image checks clean.
        data = case.data
        dirty = (
            writable
            and data[:4] == b"QFI\xfb"
            and len(data) >= 80
            and int.from_bytes(data[4:8], "big") >= 3
            and data[79] & 1
        )
        if not dirty:
            assert path.read_bytes() == data, "opening changed the file"
        elif opened:
            after = qcow2ovl.check(path)
            assert (after.corruptions, after.check_errors) == (0, 0), "opened unrepaired"
        if opened:
            tally.opened += 1
        else:
            tally.refused[_phrase(error)] += 1
        # QEMU's verdict is qemu-img info's, a read-only open
        if qi.HAVE_QEMU and QEMU_EVERY and tally.examples % QEMU_EVERY == 0 and not writable:
            _compare_with_qemu(tally, case, path, None if opened else error)

    try:
        run()
    finally:
        report = tally.as_dict()
        text = json.dumps(report, indent=2)
        print(text)
        target = os.environ.get("QCOW2OVL_FUZZ_REPORT")
        if target:
            Path(target).write_text(text + "\n")
    assert tally.examples > 0


@needs_qemu
def test_qemu_agrees_on_a_seeded_sample(tmp_path: Path) -> None:
    """Without hypothesis: seeded corruptions of seeded images open (or not) in both readers
    without either crashing; the verdicts are only counted."""
    path = tmp_path / "x.qcow2"
    tally = Tally()
    for seed in range(20):
        case = random_corruption(random_image(seed), seed)
        case.write_to(path)
        opened, error = _open_and_exercise(path, len(case.data))
        _compare_with_qemu(tally, case, path, None if opened else error)
    assert tally.qemu_compared == 20
