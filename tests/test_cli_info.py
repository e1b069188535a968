"""`qcow2ovl info` against `qemu-img info` 10.0: on every QEMU-made image kind, and on backing
chains with `--backing-chain`, our output is qemu-img's byte for byte (JSON: the same object
with the same key order and QEMU's JSON text; human: the same lines), followed by our own facts
under the one extra key `qcow2ovl`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qemu_images as qi
import read_images as ri
from qcow2ovl._cli_info import OWN_KEY, full_backing_filename, to_json

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

KINDS = sorted(qi.KINDS)
CHAIN_KINDS = [
    "chain3_raw_base",
    "chain3_relative",
    "data_file_backing",
    "backing_raw_odd_size",
    "v2_backing_ops",
    "compressed_backing",
]


def _run(argv: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    return proc


def both(image: str, *options: str, cwd: Path | None = None) -> tuple[str, str]:
    """(ours, qemu-img's) stdout of `info OPTIONS IMAGE`."""
    assert qi.QEMU_IMG is not None
    ours = _run([sys.executable, "-m", "qcow2ovl", "info", *options, image], cwd).stdout
    theirs = _run([qi.QEMU_IMG, "info", *options, image], cwd).stdout
    return ours, theirs


def assert_json_is_qemus(ours: str, theirs: str) -> list[dict[str, Any]]:
    """Ours is qemu-img's text with `"qcow2ovl": {...}` added as the last key of each image."""
    parsed = json.loads(ours)
    objects = parsed if isinstance(parsed, list) else [parsed]
    for obj in objects:
        own = obj.pop(OWN_KEY, None)
        if obj["format"] == "qcow2":  # (a raw file in a chain has no facts of ours)
            assert isinstance(own, dict) and "overlap-check" in own
    assert to_json(parsed) + "\n" == theirs
    # The text itself is what that serializer writes (no other spelling of the same object).
    assert ours == to_json(json.loads(ours)) + "\n"
    return objects


def assert_text_is_qemus(ours: str, theirs: str) -> None:
    """Each image's block is qemu-img's lines, then our own under `qcow2ovl:`."""
    ours_blocks, their_blocks = ours.split("\n\n"), theirs.split("\n\n")
    assert len(ours_blocks) == len(their_blocks)
    for mine, q in zip(ours_blocks, their_blocks):
        qemu_part, sep, own = mine.rstrip("\n").partition("\nqcow2ovl:\n")
        assert qemu_part == q.rstrip("\n"), "\n" + mine
        if "\nfile format: qcow2\n" in q:  # (a raw file in a chain has no facts of ours)
            assert sep and "    overlap checks: " in own


@pytest.mark.parametrize("kind", KINDS)
def test_json_is_qemu_imgs_object(kind: str) -> None:
    path = str(qi.get_image(kind).path)
    assert_json_is_qemus(*both(path, "--output=json"))


@pytest.mark.parametrize("kind", KINDS)
def test_text_is_qemu_imgs(kind: str) -> None:
    """Including `disk size:` (the allocated size), snapshots, bitmaps and the file child."""
    path = str(qi.get_image(kind).path)
    assert_text_is_qemus(*both(path))


@pytest.mark.parametrize("kind", ["backing", *CHAIN_KINDS])
@pytest.mark.parametrize("relative", [False, True], ids=["absolute", "relative"])
def test_backing_chain_is_qemu_imgs(tmp_path: Path, kind: str, relative: bool) -> None:
    built = qi.get_image(kind) if kind in qi.KINDS else ri.build_read_image(kind, tmp_path)
    path, cwd = (built.path.name, built.path.parent) if relative else (str(built.path), None)
    for options in ((), ("--output=json",)):
        ours, theirs = both(path, *options, cwd=cwd)
        if options:
            assert_json_is_qemus(ours, theirs)
        else:
            assert_text_is_qemus(ours, theirs)
        chain_ours, chain_theirs = both(path, "--backing-chain", *options, cwd=cwd)
        if options:
            objects = assert_json_is_qemus(chain_ours, chain_theirs)
            assert len(objects) >= 2 and isinstance(json.loads(chain_ours), list)
        else:
            assert_text_is_qemus(chain_ours, chain_theirs)


def test_flags_names_and_paths_as_qemu_img(tmp_path: Path) -> None:
    """The corrupt bit, an in-use bitmap, a snapshot name QEMU's JSON escapes, a path with a
    folder and a backing name with `..`."""
    (tmp_path / "sub").mkdir()
    base = tmp_path / "base.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", base, "4M")
    top = tmp_path / "sub" / "top.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-b", "../base.qcow2", "-F", "qcow2", top)
    qi.qemu_img("snapshot", "-c", 'caf\u00e9 "\U0001f600" \\ \x7f', top)
    qi.bitmap_add(top, "b0")
    (flags,) = qi.peek(top, 72, ">Q")
    qi.poke(top, 72, ">Q", flags | 2)  # corrupt
    # The bitmap directory entry's flags (offset 12 of the entry): in use and auto.
    with open(top, "rb") as f:
        data = f.read(65536)
    at = data.index(b"\x23\x85\x28\x75")  # the bitmaps extension
    directory = int.from_bytes(data[at + 24 : at + 32], "big")
    qi.poke(top, directory + 12, ">I", 3)
    for cwd, name in ((tmp_path, "sub/top.qcow2"), (tmp_path / "sub", "./top.qcow2")):
        ours, theirs = both(name, "--output=json", cwd=cwd)
        (obj,) = assert_json_is_qemus(ours, theirs)
        assert obj["format-specific"]["data"]["corrupt"] is True
        assert obj["format-specific"]["data"]["bitmaps"][0]["flags"] == ["in-use", "auto"]
        assert_text_is_qemus(*both(name, cwd=cwd))
        ours, theirs = both(name, "--backing-chain", "--output=json", cwd=cwd)
        assert_json_is_qemus(ours, theirs)


def test_full_backing_filename() -> None:
    assert full_backing_filename("top.qcow2", "base.qcow2") == "base.qcow2"
    assert full_backing_filename("a/b/top.qcow2", "../base") == "a/b/../base"
    assert full_backing_filename("a/top.qcow2", "/abs/base") == "/abs/base"


def test_json_text_escapes_like_qemu() -> None:
    assert to_json({"a": [], "b": {}, "c": [1, True, None]}) == (
        '{\n    "a": [\n    ],\n    "b": {\n    },\n    "c": [\n        1,\n        true,\n'
        "        null\n    ]\n}"
    )
    assert to_json("\u00e9\t\U0001f600/\x01") == '"\\u00E9\\t\\uD83D\\uDE00/\\u0001"'


def test_allocated_size_not_file_length(tmp_path: Path) -> None:
    """`actual-size` and `disk size:` are the blocks the file occupies (a sparse image's are
    fewer than its length), as qemu-img says."""
    path = tmp_path / "sparse.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", path, "1G")
    ours, theirs = both(str(path), "--output=json")
    (obj,) = assert_json_is_qemus(ours, theirs)
    assert obj["actual-size"] == os.stat(path).st_blocks * 512 < path.stat().st_size
