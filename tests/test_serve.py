"""`qcow2ovl serve` as an NBD server, with qemu-nbd as the oracle: the same command line (the
two take the same options) is started, and NBD's own tools (`nbdinfo`, `qemu-io`, `qemu-img`,
`nbdcopy`, libnbd) talk to it; then the image is checked and compared with QEMU's tools.

The server under test is chosen by ``QCOW2OVL_SERVE_WITH``: ``ours`` (the default) runs
``python -m qcow2ovl serve``; ``qemu-nbd`` runs qemu-nbd itself, which proves that the tests
ask only what qemu-nbd does. With ``ours`` and no ``serve`` command, every test fails with one
line saying so. Both offer the ``qemu:allocation-depth`` context only with ``-A``. The
Python API, ``qcow2ovl.serve()``, is ours only (skipped with qemu-nbd).

Clients that misbehave, and stopping the server, are in ``test_serve_clients.py``; the guard
behind the server in ``test_serve_guard.py``. What qemu-nbd does that the tests pin (and ours
must match): the export flags of
`EXPECTED_FLAGS`; ``CAN_MULTI_CONN`` exactly when ``-e`` is above 1; with ``-x NAME`` only
NAME is served (a client asking for "" is refused); without ``-t`` only a client that reached
the transmission phase ends the server when it leaves (``nbdinfo --list``, ``OPT_ABORT`` or
garbage do not); unknown client flags and over-long options close that connection and nothing else;
unknown options get ``ERR_UNSUP``; reads, block status and unknown commands out of bounds get
``EINVAL`` and the connection goes on; a write whose payload never arrives is not carried out;
SIGTERM and SIGINT stop it with status 0, the socket file removed and the lock released; a
trim is offered and, by default (`--discard=ignore`), answered without being done; zero writes
free clusters only with `--discard=unmap`; `--detect-zeroes` makes writes of zeros zero writes;
one block status reply holds at most 131,072 extents per context.
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path
from typing import Any

import nbd_clients as nc
import pytest
import qemu_images as qi

KiB, MiB = 1024, 1 << 20
SIZE, CLUSTER = nc.SIZE, nc.CLUSTER

pytestmark = nc.NEEDS_CLIENTS

#: The flags `nbdinfo --json` shows for a qcow2 image on a file, as qemu-nbd exports it.
#: Writable: everything a writable export can offer (``can_cache``: NBD_CMD_CACHE; ``can_df``:
#: structured reads may be asked not to fragment); read-only: no trim and no zeroing.
EXPECTED_FLAGS: dict[str, dict[str, bool]] = {
    "writable": {
        "is_read_only": False,
        "is_rotational": False,
        "can_cache": True,
        "can_df": True,
        "can_fast_zero": True,
        "can_flush": True,
        "can_fua": True,
        "can_trim": True,
        "can_zero": True,
    },
    "read-only": {
        "is_read_only": True,
        "is_rotational": False,
        "can_cache": True,
        "can_df": True,
        "can_fast_zero": False,
        "can_flush": True,
        "can_fua": True,
        "can_trim": False,
        "can_zero": False,
    },
}


def _compare_identical(image: Path, raw: Path) -> None:
    """`qemu-img compare -f qcow2 -F raw`: the guest disk is byte for byte *raw*."""
    out = qi.qemu_img("compare", "-f", "qcow2", "-F", "raw", image, raw).stdout
    assert "Images are identical." in out, out


def _guest_bytes(image: Path, tmp_path: Path) -> bytes:
    out = tmp_path / f"{image.stem}.guest.raw"
    qi.qemu_img("convert", "-f", "qcow2", "-O", "raw", image, out)
    return out.read_bytes()


# ---- 1. what nbdinfo sees ---------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["writable", "read-only"])
def test_nbdinfo_shows_the_size_and_the_flags(
    tmp_path: Path, server_cmd: list[str], mode: str
) -> None:
    """The export is the image's virtual size, named "" by default, and carries exactly the
    flags qemu-nbd gives a qcow2 image (read-only with `-r`: no trim, no zeroing); one client at
    a time (the default `-e 1`) means no CAN_MULTI_CONN; only `base:allocation` is offered
    without `-A`; the block sizes are qemu-nbd's (1 / 4096 / 32 MiB)."""
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0x11 0 1M")
    options = ["-r"] if mode == "read-only" else []
    with nc.serving(server_cmd, image, tmp_path, *options) as server:
        info = nc.nbdinfo(server.uri(), "--no-content")
        # nbdinfo without content only negotiates options: the server goes on serving.
        assert server.running(), server.describe()
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True, info
    (export,) = info["exports"]
    assert export["export-size"] == qi.qemu_info(image)["virtual-size"] == SIZE
    assert export["export-name"] == ""
    assert "description" not in export, export
    assert {k: export.get(k) for k in EXPECTED_FLAGS[mode]} == EXPECTED_FLAGS[mode]
    assert export["can_multi_conn"] is False, export
    assert export["contexts"] == ["base:allocation"], export
    sizes = [export[f"block_size_{k}"] for k in ("minimum", "preferred", "maximum")]
    assert sizes == [1, 4096, 32 * MiB], export


@pytest.mark.parametrize("shared", [1, 2, 4])
def test_multi_conn_is_offered_when_more_than_one_client_may_connect(
    tmp_path: Path, server_cmd: list[str], shared: int
) -> None:
    """CAN_MULTI_CONN (a flush on one connection covers writes on all of them) is advertised
    exactly when `-e` allows more than one client, writable or not, as qemu-nbd does."""
    image = nc.image(tmp_path)
    for options in (["-e", str(shared)], ["-r", "-e", str(shared)]):
        with nc.serving(server_cmd, image, tmp_path, *options) as server:
            (export,) = nc.nbdinfo(server.uri(), "--no-content")["exports"]
        assert export["can_multi_conn"] is (shared > 1), (options, export)


def test_allocation_depth_context_is_offered_with_A(tmp_path: Path, server_cmd: list[str]) -> None:
    """With `-A` the export lists `qemu:allocation-depth` beside `base:allocation`."""
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path, "-A") as server:
        (export,) = nc.nbdinfo(server.uri(), "--no-content")["exports"]
    assert sorted(export["contexts"]) == ["base:allocation", "qemu:allocation-depth"], export


def test_export_name_and_description(tmp_path: Path, server_cmd: list[str]) -> None:
    """`-x NAME -D TEXT`: the export answers to NAME (and not to the default name ""), shows
    TEXT as its description, and `nbdinfo --list` lists it with both."""
    image = nc.image(tmp_path)
    name, text = "disk-one", "the first disk: 16 MiB"
    with nc.serving(server_cmd, image, tmp_path, "-t", "-x", name, "-D", text) as server:
        (export,) = nc.nbdinfo(server.uri(name))["exports"]
        listed = nc.nbdinfo(server.uri(), "--list")["exports"]
        with pytest.raises(nc.ToolError) as refused:
            nc.nbdinfo(server.uri(""), "--no-content")
    assert (export["export-name"], export.get("description")) == (name, text), export
    assert export["export-size"] == SIZE
    assert [(e["export-name"], e.get("description")) for e in listed] == [(name, text)], listed
    assert "server replied with error" in refused.value.stderr, refused.value.stderr


def test_tcp(tmp_path: Path, server_cmd: list[str]) -> None:
    """`-p PORT -b 127.0.0.1`: the export is served over TCP; a write through it reads back
    over a second connection and is in the image afterwards."""
    image = nc.image(tmp_path)
    port = nc.free_tcp_port()
    with nc.serving(server_cmd, image, tmp_path, "-t", port=port) as server:
        uri = server.uri()
        assert uri.startswith("nbd://127.0.0.1:")
        (export,) = nc.nbdinfo(uri, "--no-content")["exports"]
        nc.qemu_io_nbd(uri, "write -P 0x3c 1M 64k")
        nc.qemu_io_nbd(uri, "read -P 0x3c 1M 64k", "read -P 0 0 1M")
        assert server.stop() == 0, server.describe()
    assert export["export-size"] == SIZE
    qi.qemu_io(image, "read -P 0x3c 1M 64k")


# ---- 2. random guest I/O through qemu-io ------------------------------------------------------


Op = tuple[str, int, int, int]


def _random_ops(rng: random.Random, count: int) -> list[Op]:
    """(kind, offset, length, pattern): writes (some with FUA) of unaligned and aligned sizes,
    zeroes with and without unmapping, and discards of whole 64 KiB clusters."""
    ops: list[Op] = []
    for _ in range(count):
        kind = rng.choice(["write"] * 4 + ["fua", "zero", "unmap", "discard"])
        if kind == "discard":
            n = rng.randint(1, 4)
            offset = rng.randrange(SIZE // CLUSTER - n + 1) * CLUSTER
            ops.append((kind, offset, n * CLUSTER, 0))
            continue
        length = rng.choice(
            [rng.randint(1, 4 * KiB), rng.randint(1, 256 * KiB), 64 * KiB, 512 * rng.randint(1, 64)]
        )
        offset = rng.randrange(SIZE - length + 1)
        if rng.random() < 0.5:
            offset -= offset % 512
        ops.append((kind, offset, length, rng.randrange(1, 256)))
    return ops


def _io_commands(ops: list[Op]) -> list[str]:
    """qemu-io commands for *ops*, each write or zero read back at once (`read -P`)."""
    cmds: list[str] = []
    for kind, offset, length, pattern in ops:
        if kind == "discard":
            cmds.append(f"discard {offset} {length}")
            continue
        head = {
            "write": f"write -P {pattern:#x}",
            "fua": f"write -f -P {pattern:#x}",
            "zero": "write -z",
            "unmap": "write -z -u",
        }[kind]
        cmds.append(f"{head} {offset} {length}")
        expect = pattern if kind in ("write", "fua") else 0
        cmds.append(f"read -P {expect:#x} {offset} {length}")
    return cmds


def _expected_disk(keep: bytes, zero: bytes, guest: bytes, discarded: set[int]) -> bytes:
    """The guest disk the image must hold: the mirror's bytes, except in the clusters a discard
    touched, where NBD leaves the content unspecified: there the image may hold what a server
    that ignores discards (qemu-nbd's default) holds, or what one that zeroes them holds, and
    nothing else."""
    out = bytearray(keep)
    for c in sorted(discarded):
        lo, hi = c * CLUSTER, (c + 1) * CLUSTER
        if guest[lo:hi] == zero[lo:hi]:
            out[lo:hi] = zero[lo:hi]
        else:
            assert guest[lo:hi] == keep[lo:hi], f"cluster at {lo:#x}: neither kept nor zeroed"
    return bytes(out)


@pytest.mark.parametrize("seed", [1, 2])
def test_random_writes_zeroes_and_discards_as_a_mirror(
    tmp_path: Path, server_cmd: list[str], seed: int
) -> None:
    """Random writes (unaligned too, some FUA), zeroes (with and without unmapping) and
    discards through two qemu-io connections, each read back at once; a raw mirror file gets
    the same. After the server stops the image checks clean and `qemu-img compare` finds it
    identical to the mirror (discarded clusters may read as before or as zeros)."""
    rng = random.Random(seed)
    keep = bytearray(rng.randbytes(4 * MiB) + bytes(SIZE - 4 * MiB))
    image = tmp_path / "disk.qcow2"
    qi.qemu_img("convert", "-f", "raw", "-O", "qcow2", _raw(tmp_path, bytes(keep)), image)
    zero = bytearray(keep)
    discarded: set[int] = set()
    ops = _random_ops(rng, 60)
    for kind, offset, length, pattern in ops:
        if kind == "discard":
            zero[offset : offset + length] = bytes(length)
            discarded.update(range(offset // CLUSTER, (offset + length) // CLUSTER))
            continue
        data = bytes([pattern]) * length if kind in ("write", "fua") else bytes(length)
        keep[offset : offset + length] = data
        zero[offset : offset + length] = data
    with nc.serving(server_cmd, image, tmp_path, "-t") as server:
        cmds = _io_commands(ops)
        half = len(cmds) // 2
        nc.qemu_io_nbd(server.uri(), *cmds[:half], "flush")
        nc.qemu_io_nbd(server.uri(), *cmds[half:])
        assert server.stop() == 0, server.describe()
    report = qi.qemu_check(image)
    assert qi.check_is_clean(report), report
    expected = _expected_disk(bytes(keep), bytes(zero), _guest_bytes(image, tmp_path), discarded)
    _compare_identical(image, _raw(tmp_path, expected, "mirror.raw"))


def _raw(tmp_path: Path, data: bytes, name: str = "in.raw") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- 3. block status against qemu-nbd ---------------------------------------------------------


def _chain(d: Path) -> Path:
    """A base with data; an overlay with its own data, zero clusters over the base's data
    (allocated and not), a discard, a 4 KiB write into an empty cluster, and holes."""
    base = d / "base.qcow2"
    qi.create(base, SIZE)
    qi.qemu_io(base, "write -P 0x01 0 4M", "write -P 0x02 8M 1M")
    top = d / "top.qcow2"
    qi.create(top, SIZE, backing="base.qcow2")
    qi.qemu_io(
        top,
        "write -P 0x03 1M 64k",
        "write -z 2M 128k",
        "write -z -u 8M 64k",
        "discard 3M 64k",
        "write -P 0x04 12M 4k",
    )
    return top


def _compressed(d: Path) -> Path:
    """Compressed clusters beside a plain one and a zero cluster."""
    src = d / "src.qcow2"
    qi.create(src, SIZE)
    qi.qemu_io(src, "write -P 0x05 0 1M", "write -P 0x06 5M 256k")
    dst = d / "compressed.qcow2"
    qi.convert(src, dst, compress=True)
    qi.qemu_io(dst, "write -P 0x07 9M 64k", "write -z 5M 64k")
    return dst


def _extended_l2(d: Path) -> Path:
    """Extended L2 entries (64 KiB clusters of 2 KiB subclusters) over a backing file: 4 KiB
    writes and zeroes, so allocation changes inside clusters."""
    base = d / "ebase.qcow2"
    qi.create(base, SIZE)
    qi.qemu_io(base, "write -P 0x08 0 1M")
    top = d / "ext.qcow2"
    qi.create(top, SIZE, opts={"extended_l2": True, "cluster_size": 64 * KiB}, backing=base.name)
    qi.qemu_io(
        top,
        "write -P 0x09 4k 4k",
        "write -z 12k 4k",
        "write -P 0x0a 1M 4k",
        "write -P 0x0a 1028k 4k",
        "write -z -u 2M 8k",
    )
    return top


MAP_IMAGES = {"chain": _chain, "compressed": _compressed, "extended-l2": _extended_l2}


@pytest.mark.parametrize("kind", list(MAP_IMAGES))
def test_block_status_maps_as_qemu_nbd(tmp_path: Path, server_cmd: list[str], kind: str) -> None:
    """`nbdinfo --map` of `base:allocation` and `qemu:allocation-depth` from the server under
    test equals qemu-nbd's on the same image (both serving it read-only with `-A` at once),
    adjacent extents of one type merged; each map covers the disk."""
    image = MAP_IMAGES[kind](tmp_path)
    maps: dict[str, dict[str, list[dict[str, Any]]]] = {}
    with nc.serving(server_cmd, image, tmp_path, "-t", "-r", "-A", name="sut") as sut:
        with nc.serving(
            [nc.QEMU_NBD or "qemu-nbd"], image, tmp_path, "-t", "-r", "-A", name="ref"
        ) as ref:
            for who, server in (("sut", sut), ("ref", ref)):
                maps[who] = {
                    ctx: nc.nbdinfo_map(server.uri(), ctx)
                    for ctx in ("base:allocation", "qemu:allocation-depth")
                }
    for ctx, extents in maps["sut"].items():
        assert extents == maps["ref"][ctx], ctx
        assert extents[0]["offset"] == 0 and sum(e["length"] for e in extents) == SIZE
    depth_types = {e["type"] for e in maps["sut"]["qemu:allocation-depth"]}
    assert depth_types == ({0, 1} if kind == "compressed" else {0, 1, 2}), maps["sut"]


@pytest.mark.parametrize("granularity", [None, 512, 1 << 20], ids=["default", "512", "1M"])
def test_dirty_bitmap_context_as_qemu_nbd(
    tmp_path: Path, server_cmd: list[str], granularity: int | None
) -> None:
    """`-B NAME` offers `qemu:dirty-bitmap:NAME`, whose map equals qemu-nbd's on the same image
    (writes after the bitmap was added, some unaligned to its granularity); an unknown bitmap
    is refused in qemu-nbd's words."""
    image = nc.image(tmp_path)
    qi.bitmap_add(image, "b0", granularity)
    qi.qemu_io(image, "write 1M 64k", "write 5M 4k", "write 9437700 100", "write 15M 1M")
    maps = {}
    with nc.serving(server_cmd, image, tmp_path, "-t", "-r", "-B", "b0", name="sut") as sut:
        with nc.serving(
            [nc.QEMU_NBD or "qemu-nbd"], image, tmp_path, "-t", "-r", "-B", "b0", name="ref"
        ) as ref:
            for who, server in (("sut", sut), ("ref", ref)):
                maps[who] = nc.nbdinfo_map(server.uri(), "qemu:dirty-bitmap:b0")
    assert maps["sut"] == maps["ref"]
    assert {e["type"] for e in maps["sut"]} == {0, 1}
    assert sum(e["length"] for e in maps["sut"]) == SIZE
    refused = subprocess.run(
        [*server_cmd, "-f", "qcow2", "-B", "nope", "-k", str(tmp_path / "x.sock"), str(image)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert refused.returncode == 1 and "Bitmap 'nope' is not found" in refused.stderr, refused


#: One BLOCK_STATUS for the whole disk, then more from where each reply ended, until the end;
#: prints per request the number of extents and bytes each context's reply covered.
BLOCK_STATUS_SCRIPT = r"""
import json, sys
import nbd
h = nbd.NBD()
for ctx in ("base:allocation", "qemu:allocation-depth"):
    h.add_meta_context(ctx)
h.connect_uri(sys.argv[1])
size = h.get_size()
requests = []
offset = 0
while offset < size:
    got = {}
    def cb(ctx, off, entries, err):
        got[ctx] = (len(entries) // 2, sum(entries[0::2]))
        return 0
    h.block_status(size - offset, offset, cb)
    requests.append(got)
    offset += min(length for _, length in got.values())
print(json.dumps({"size": size, "requests": requests}))
"""

#: qemu-nbd's limit on the extents of one block status reply, per context (1 MiB of 8-byte
#: extents), which ours takes too.
MAX_REPLY_EXTENTS = (1 << 20) // 8


def _fragmented(d: Path) -> Path:
    """80 MiB of 512-byte clusters, every other one allocated: 163,840 extents, more than one
    reply holds (built with the Python API, the quickest way to allocate 81,920 clusters)."""
    import qcow2ovl

    path = d / "fragmented.qcow2"
    size = 80 * MiB
    qi.create(path, size, opts={"cluster_size": 512})
    with qcow2ovl.open(path, writable=True) as img:
        block = b"\xab" * 512
        for offset in range(0, size, 1024):
            img.write(offset, block)
    return path


@pytest.mark.skipif(not nc.have_libnbd_python(), reason="needs python3-libnbd (system Python)")
def test_block_status_over_more_extents_than_one_reply(
    tmp_path: Path, server_cmd: list[str]
) -> None:
    """163,840 extents: one BLOCK_STATUS over the whole disk is answered with at most 131,072
    extents per context (qemu-nbd's cap), covering less than the disk; a second request from
    where it ended reaches the end, the two together every extent. `nbdinfo --map` (which
    asks until it has the whole disk) equals qemu-nbd's for both contexts."""
    image = _fragmented(tmp_path)
    assert qi.check_is_clean(qi.qemu_check(image))
    size = 80 * MiB
    with nc.serving(server_cmd, image, tmp_path, "-t", "-r", "-A", name="sut") as sut:
        out = json.loads(nc.run_libnbd(BLOCK_STATUS_SCRIPT, sut.uri()))
        with nc.serving(
            [nc.QEMU_NBD or "qemu-nbd"], image, tmp_path, "-t", "-r", "-A", name="ref"
        ) as ref:
            maps = {
                who: {
                    ctx: nc.nbdinfo_map(server.uri(), ctx)
                    for ctx in ("base:allocation", "qemu:allocation-depth")
                }
                for who, server in (("sut", sut), ("ref", ref))
            }
    first, *rest = out["requests"]
    for ctx in ("base:allocation", "qemu:allocation-depth"):
        count, length = first[ctx]
        assert (count, length) == (MAX_REPLY_EXTENTS, MAX_REPLY_EXTENTS * 512), (ctx, first)
        assert sum(r[ctx][0] for r in out["requests"]) == size // 512, (ctx, out)
    assert len(rest) == 1, out
    assert maps["sut"] == maps["ref"]
    assert len(maps["sut"]["base:allocation"]) == size // 512
    assert {e["type"] for e in maps["sut"]["base:allocation"]} == {0, 3}


# ---- 3b. --discard and --detect-zeroes ------------------------------------------------------

#: Through NBD onto 2 MiB of 0x11 (64 KiB clusters): a trim of data, zeroes that may unmap and
#: that may not (NO_HOLE), writes of zeros over data and over nothing (aligned, and unaligned
#: over data), one with FUA, a write of data. Not here, because the engine differs from QEMU
#: there whatever the server does: a trim of unallocated clusters (QEMU leaves them unallocated,
#: the engine marks them zero) and an unaligned write of zeros into an unallocated cluster with
#: zero detection (QEMU zeroes the whole cluster, the engine writes the zeros).
MODE_COMMANDS = [
    "discard 0 128k",
    "write -z -u 256k 128k",
    "write -z 512k 64k",
    "write -P 0 768k 64k",
    "write -f -P 0 896k 128k",
    "write -P 0 2560k 64k",
    "write -P 0 1M 100",
    "write -P 0x22 1536k 64k",
]

MODES = {
    "default": [],
    "discard-unmap": ["--discard=unmap"],
    "detect-on": ["--detect-zeroes=on"],
    "unmap-detect-on": ["--discard=unmap", "--detect-zeroes=on"],
    "unmap-detect-unmap": ["--discard=unmap", "--detect-zeroes=unmap"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_discard_and_detect_zeroes_as_qemu_nbd(
    tmp_path: Path, server_cmd: list[str], mode: str
) -> None:
    """The same trims, zeroes and writes of zeros sent to the server under test and to qemu-nbd
    with the same `--discard`/`--detect-zeroes`, each on its copy of one image: afterwards the
    two images have the same `qemu-img map` (which clusters stay allocated, which are zero or
    freed), the same holes in the file (freed clusters punched out with `--discard=unmap`) and
    the same disk, and check clean; both export the flags of a writable image (a trim is
    offered even when it is ignored). By default (`--discard=ignore`) the trimmed data is still
    there."""
    maps, flags, held = {}, {}, {}
    for who in ("sut", "ref"):
        image = nc.image(tmp_path, f"{who}.qcow2", "write -P 0x11 0 2M")
        cmd = server_cmd if who == "sut" else [nc.QEMU_NBD or "qemu-nbd"]
        with nc.serving(cmd, image, tmp_path, "-t", *MODES[mode], name=who) as server:
            (export,) = nc.nbdinfo(server.uri(), "--no-content")["exports"]
            flags[who] = {k: export.get(k) for k in EXPECTED_FLAGS["writable"]}
            nc.qemu_io_nbd(server.uri(), *MODE_COMMANDS)
            if mode == "default":
                nc.qemu_io_nbd(server.uri(), "read -P 0x11 0 128k")
            assert server.stop() == 0, server.describe()
        assert qi.check_is_clean(qi.qemu_check(image))
        maps[who] = json.loads(qi.qemu_img("map", "--output=json", image).stdout)
        held[who] = qi.allocated_clusters(image)
    assert maps["sut"] == maps["ref"]
    assert held["sut"] == held["ref"]
    assert flags["sut"] == flags["ref"] == EXPECTED_FLAGS["writable"]
    _compare_identical_qcow2(tmp_path / "sut.qcow2", tmp_path / "ref.qcow2")


def _compare_identical_qcow2(a: Path, b: Path) -> None:
    out = qi.qemu_img("compare", "-f", "qcow2", "-F", "qcow2", a, b).stdout
    assert "Images are identical." in out, out


@pytest.mark.parametrize(
    ("options", "refusal"),
    [
        (["--discard=maybe"], "Invalid discard mode `maybe'"),
        (["--discard=unmap", "--discard=ignore"], "--discard can only be specified once"),
        (
            ["--detect-zeroes=sometimes"],
            "Failed to parse detect_zeroes mode: invalid parameter value: sometimes",
        ),
        (
            ["--detect-zeroes=unmap"],
            "setting detect-zeroes to unmap is not allowed without setting discard operation "
            "to unmap",
        ),
        (
            ["--detect-zeroes=unmap", "--discard=unmap"],
            "setting detect-zeroes to unmap is not allowed without setting discard operation "
            "to unmap",
        ),
    ],
    ids=["bad-discard", "discard-twice", "bad-detect", "unmap-alone", "unmap-before-discard"],
)
def test_discard_and_detect_zeroes_refusals(
    tmp_path: Path, server_cmd: list[str], options: list[str], refusal: str
) -> None:
    """Bad `--discard`/`--detect-zeroes` values and combinations are refused with status 1 in
    qemu-nbd's words, judged in command-line order (`--detect-zeroes=unmap` needs an earlier
    `--discard=unmap`)."""
    proc = nc.run_server(
        server_cmd, "-f", "qcow2", *options, "-k", tmp_path / "x.sock", nc.image(tmp_path)
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc
    assert lines[0].split(": ", 1)[1] == refusal


# ---- 4. copies in and out -------------------------------------------------------------------


def _disk_content(seed: int) -> bytes:
    """16 MiB of random data with zero MiBs between, so copies meet both."""
    rng = random.Random(seed)
    return b"".join(rng.randbytes(MiB) if i % 3 else bytes(MiB) for i in range(SIZE // MiB))


def test_nbdcopy_in_with_four_connections(tmp_path: Path, server_cmd: list[str]) -> None:
    """`-e 4` lets nbdcopy use four connections at once (it does so only when the export
    offers CAN_MULTI_CONN); what it copies in is then the guest disk, and the image checks
    clean."""
    src = _raw(tmp_path, _disk_content(3))
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0xee 0 16M")
    with nc.serving(server_cmd, image, tmp_path, "-t", "-e", "4") as server:
        proc = nc.tool([nc.NBDCOPY or "nbdcopy", "-v", "-C", "4", "-T", "4", src, server.uri()])
        assert server.stop() == 0, server.describe()
    assert "nbdcopy: connections=4 " in proc.stderr, proc.stderr[-2000:]
    _compare_identical(image, src)
    assert qi.check_is_clean(qi.qemu_check(image))


def test_qemu_img_convert_out_of_and_into_the_export(tmp_path: Path, server_cmd: list[str]) -> None:
    """`qemu-img convert` from the export gives the guest disk; `qemu-img convert -n` into it
    writes a new one, which reads back through NBD and is the image's disk after the stop."""
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0x21 0 3M", "write -z 1M 64k")
    before = _guest_bytes(image, tmp_path)
    new = _raw(tmp_path, _disk_content(4))
    out = tmp_path / "out.raw"
    back = tmp_path / "back.raw"
    with nc.serving(server_cmd, image, tmp_path, "-t") as server:
        qi.qemu_img("convert", "-f", "raw", "-O", "raw", server.uri(), out)
        qi.qemu_img("convert", "-n", "-f", "raw", "-O", "raw", new, server.uri())
        qi.qemu_img("convert", "-f", "raw", "-O", "raw", server.uri(), back)
        assert server.stop() == 0, server.describe()
    assert out.read_bytes() == before
    assert back.read_bytes() == new.read_bytes()
    _compare_identical(image, new)
    assert qi.check_is_clean(qi.qemu_check(image))


# ---- 5. locks -------------------------------------------------------------------------------


def test_a_writable_export_holds_the_image_lock(tmp_path: Path, server_cmd: list[str]) -> None:
    """While the image is served writable QEMU can neither write it nor read it (qemu-nbd
    shares no write permission), `qemu-img info -U` still reads it; after the stop it opens
    for writing again."""
    image = nc.image(tmp_path)
    with nc.serving(server_cmd, image, tmp_path) as server:
        writer = qi.run([qi.QEMU_IO or "qemu-io", "-c", "write 0 512", image], ok=(1,))
        reader = qi.run([qi.QEMU_IO or "qemu-io", "-r", "-c", "read 0 512", image], ok=(1,))
        info = json.loads(qi.qemu_img("info", "-U", "--output=json", image).stdout)
        assert server.running(), server.describe()
        assert server.stop() == 0, server.describe()
    assert 'Failed to get "write" lock' in writer.stderr, writer.stderr
    assert 'Failed to get shared "write" lock' in reader.stderr, reader.stderr
    assert info["virtual-size"] == SIZE
    qi.qemu_io(image, "write -P 0x01 0 512")


def test_a_read_only_export_shares_with_readers_only(tmp_path: Path, server_cmd: list[str]) -> None:
    """Served with `-r`, the image still refuses a writer but lets readers in."""
    image = nc.image(tmp_path, "disk.qcow2", "write -P 0x42 0 64k")
    with nc.serving(server_cmd, image, tmp_path, "-r") as server:
        writer = qi.run([qi.QEMU_IO or "qemu-io", "-c", "write 0 512", image], ok=(1,))
        reader = qi.run([qi.QEMU_IO or "qemu-io", "-r", "-c", "read -P 0x42 0 64k", image])
        assert server.running(), server.describe()
    assert 'Failed to get "write" lock' in writer.stderr, writer.stderr
    assert "read 65536/65536 bytes" in reader.stdout, reader.stdout


# ---- the Python API ---------------------------------------------------------------------------


def test_python_api_discard_modes(tmp_path: Path) -> None:
    """`qcow2ovl.serve()` takes qemu-nbd's modes with its defaults: a trim is ignored unless
    `discard="unmap"`, which makes the clusters zero; `detect_zeroes="unmap"` without it is a
    ValueError in qemu-nbd's words, raised before the block runs."""
    if nc.server_kind() != "ours":
        pytest.skip("qcow2ovl.serve() is our Python API; qemu-nbd has none")
    import qcow2ovl

    kept = nc.image(tmp_path, "kept.qcow2", "write -P 0x33 0 1M")
    freed = nc.image(tmp_path, "freed.qcow2", "write -P 0x33 0 1M")
    with qcow2ovl.serve(kept, socket=tmp_path / "k.sock") as uri:
        nc.qemu_io_nbd(uri, "discard 0 1M", "read -P 0x33 0 1M")
    with qcow2ovl.serve(freed, socket=tmp_path / "f.sock", discard="unmap") as uri:
        nc.qemu_io_nbd(uri, "discard 0 1M", "read -P 0 0 1M")
    first = {
        name: json.loads(qi.qemu_img("map", "--output=json", path).stdout)[0]
        for name, path in (("kept", kept), ("freed", freed))
    }
    assert (first["kept"]["data"], first["kept"]["length"]) == (True, MiB), first
    assert (first["freed"]["data"], first["freed"]["zero"]) == (False, True), first
    with pytest.raises(ValueError, match="not allowed without setting discard operation"):
        with qcow2ovl.serve(kept, socket=tmp_path / "x.sock", detect_zeroes="unmap"):
            pass


@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_python_api_serves_while_the_block_runs(
    tmp_path: Path, server_cmd: list[str], where: str
) -> None:
    """`qcow2ovl.serve(path, socket=...)` (or on TCP with port 0, a free port) yields a URI
    that clients use while the block runs, with the image locked against other writers; when
    the block ends the server is gone (no socket file), the image checks clean, holds what was
    written, and opens for writing."""
    if nc.server_kind() != "ours":
        pytest.skip("qcow2ovl.serve() is our Python API; qemu-nbd has none")
    import qcow2ovl

    image = nc.image(tmp_path)
    sock = tmp_path / "api.sock"
    place: dict[str, Any] = {"socket": sock} if where == "unix" else {"port": 0}
    with qcow2ovl.serve(image, **place) as uri:
        (export,) = nc.nbdinfo(uri, "--no-content")["exports"]
        nc.qemu_io_nbd(uri, "write -P 0x44 0 1M", "write -z 64k 64k")
        nc.qemu_io_nbd(uri, "read -P 0x44 0 64k", "read -P 0 64k 64k")
        writer = qi.run([qi.QEMU_IO or "qemu-io", "-c", "write 0 512", image], ok=(1,))
    assert export["export-size"] == SIZE and export["is_read_only"] is False, export
    assert 'Failed to get "write" lock' in writer.stderr, writer.stderr
    assert not sock.exists()
    with pytest.raises(nc.ToolError):
        nc.nbdinfo(uri, "--no-content")
    assert qi.check_is_clean(qi.qemu_check(image))
    qi.qemu_io(image, "read -P 0x44 0 64k", "read -P 0 64k 64k", "write -P 0x45 2M 4k")
