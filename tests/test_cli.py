"""The command line: QEMU-true output (JSON keys, sizes, names), --version, usage, the demo, and
what `qcow2ovl info` imports (startup time is measured by benches/bench_startup.py; here only the
structure that keeps it low is checked, never a time)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import qcow2ovl
import qemu_images as qi
from qcow2ovl._format import compression_type_code, size_text
from qcow2ovl.cli import main

KINDS = sorted(qi.KINDS)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "qcow2ovl", *args], capture_output=True, text=True, check=False
    )


def ours_json(path: Path | str) -> dict[str, Any]:
    proc = run_cli("info", "--output", "json", str(path))
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


# ---- JSON against qemu-img info (the whole object: tests/test_cli_info.py) ----------------------


def test_vm_clock_split_like_qemu(tmp_path: Path) -> None:
    """A VM clock of 3.5 s: QEMU says vm-clock-sec 3, vm-clock-nsec 500000000."""
    built = qi.build_image("snapshots", tmp_path)
    path = built.ref.path
    # Snapshot table entry: vm_clock_nsec (u64) is at offset 24 of the first entry.
    (snapshots_offset,) = qi.peek(path, 64, ">Q")
    qi.poke(path, snapshots_offset + 24, ">Q", 3_500_000_000)
    theirs = qi.qemu_info(path)["snapshots"][0]
    ours = ours_json(path)["snapshots"][0]
    assert (theirs["vm-clock-sec"], theirs["vm-clock-nsec"]) == (3, 500_000_000)
    assert (ours["vm-clock-sec"], ours["vm-clock-nsec"]) == (3, 500_000_000)


# ---- sizes and names as qemu-img prints them ----------------------------------------------------


@pytest.mark.parametrize(
    "size",
    [512, 999 * 512, 1000 * 1024, 1023 * 1024, 1000 * 1024**2, 1 << 30, 1000 * 1024**3, 1 << 40,
     1023 * 1024**4 + 512, 3 * 1024**4 + 7 * 512],
)  # fmt: skip
def test_virtual_size_text_matches_qemu_img(tmp_path: Path, size: int) -> None:
    path = tmp_path / "s.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", path, str(size))
    theirs = [
        line for line in qi.qemu_img("info", path).stdout.splitlines() if "virtual size" in line
    ]
    proc = run_cli("info", str(path))
    ours = [line for line in proc.stdout.splitlines() if "virtual size" in line]
    assert ours == theirs


def test_size_text_unit_boundaries() -> None:
    assert size_text(0) == "0 B"
    assert size_text(999) == "999 B"
    assert size_text(1000) == "0.977 KiB"
    assert size_text(1000 * 1024**3) == "0.977 TiB"
    assert size_text(1023 * 1024**2) == "0.999 GiB"
    assert size_text(1 << 30) == "1 GiB"
    assert size_text(2**64 - 1) == "16 EiB"


def test_compression_type_named_zlib() -> None:
    built = qi.get_image("v3")
    with qcow2ovl.open(built.ref.path) as img:
        assert img.info.compression_type == "zlib"
    assert "compression type: zlib" in run_cli("info", str(built.ref.path)).stdout
    assert compression_type_code("zlib") == compression_type_code("deflate") == 0
    assert compression_type_code("zstd") == 1
    with pytest.raises(ValueError, match="zlib, zstd"):
        compression_type_code("lz4")


# ---- invocations ----------------------------------------------------------------------------


def test_version() -> None:
    proc = run_cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.strip() == f"qcow2ovl {qcow2ovl.__version__}"


def test_no_arguments_prints_usage_with_commands(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out = capsys.readouterr().out
    for command in ("info", "map", "demo", "bitmap", "commit", "rebase", "--version"):
        assert command in out
    # One line per command, and five more: it fits a 24-line terminal with the prompt.
    commands = out.split("commands:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert len(out.splitlines()) == len(commands) + 5 <= 22


def test_demo_help_says_what_it_does() -> None:
    out = run_cli("demo", "--help").stdout
    for phrase in ("QEMU", "snapshots", "bitmap", "synthetic 1 TiB", "naive"):
        assert phrase in out.replace("\n", " ")


def test_demo_names_types_one_way() -> None:
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stderr
    keys = ("main-header", "active-l1", "active-l2", "refcount-block")
    assert all(k in proc.stdout for k in keys)
    member_names = ("MAIN_HEADER", "ACTIVE_L1", "ACTIVE_L2", "REFCOUNT_BLOCK", "INACTIVE_L2")
    assert not [n for n in member_names if n in proc.stdout]
    # QEMU's own messages, quoted whole, are the one place its names for the types appear.
    quoted = ("Preventing invalid write on metadata (overlaps with",)
    prose = "\n".join(
        line for line in proc.stdout.splitlines() if not any(q in line for q in quoted)
    )
    message_names = ("active L1 table", "active L2 table", "refcount block")
    assert not [n for n in message_names if n in prose]


def test_demo_shows_the_guarded_write_next_to_qemu() -> None:
    proc = run_cli("demo")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    part = out[: out.index("2. The metadata map")]
    assert "raised MetadataOverlapError" in part
    assert "Preventing invalid write on metadata (overlaps with active L1 table)" in part
    assert "on_corruption called 1x" in part
    assert "refused before a byte reached the disk" in part
    assert "set; writable opens refused" in part
    assert re.search(r"\nmetadata +0 of 5 ", part)
    assert "reads back 0x2b x 64 KiB" in part
    if qi.env_has_qemu():
        # QEMU without checks: the write lands on the L1 table and qemu-img check finds damage.
        assert "1 of 5: active-l1 at 0x30000" in part
        assert "0xffffffffffffffff" in part
        assert re.search(r"qemu-img check +1 error, 1 leaked cluster .* [2-9] errors", part)


# ---- startup: what is imported ----------------------------------------------------------------

# (In an interpreter whose site already imports some of these, the check is weaker; CI also runs
# it in a fresh venv, where site imports almost nothing.)
HEAVY = (
    "dataclasses",
    "inspect",
    "typing",
    "argparse",
    "json",
    "datetime",
    "random",
    "subprocess",
    "enum",
)

PROBE = """
import sys
before = set(sys.modules)
{code}
print(" ".join(sorted(set(sys.modules) - before)))
"""


def _new_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(code=code)], capture_output=True, text=True, check=True
    ).stdout
    return set(out.split())


def test_import_qcow2ovl_builds_no_heavy_machinery() -> None:
    new = _new_modules("import qcow2ovl")
    # enum is allowed (MetadataType is an IntFlag) but nothing that exists only for convenience.
    assert not (new & (set(HEAVY) - {"enum"})), new & set(HEAVY)


def test_info_imports_only_what_it_needs() -> None:
    path = qi.get_image("snapshots").ref.path
    new = _new_modules(
        "import re\n"  # the console script imports re (and with it enum) before anything else
        f"from qcow2ovl.cli import main\nmain(['info', {str(path)!r}])"
    )
    unwanted = {"argparse", "dataclasses", "inspect", "typing", "json", "subprocess", "shutil"}
    assert not (new & unwanted)


def test_metadata_type_values_made_on_demand() -> None:
    """The first extents/check creates only the MetadataType values it returns (building all
    2048 up front cost ~20 ms)."""
    path = qi.get_image("snapshots").ref.path
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import qcow2ovl\nfrom qcow2ovl import MetadataType\n"
            f"img = qcow2ovl.open({str(path)!r})\nimg.metadata_extents()\nimg.check_overlap(0, 1)\n"
            "print(len(MetadataType._value2member_map_))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert int(out) < 64


FAST_FORMS = [
    ["info", "a.qcow2"],
    ["map", "a.qcow2"],
    ["info", "--output", "json", "a.qcow2"],
    ["info", "a.qcow2", "--output=json"],
    ["map", "--overlap-check", "cached", "--output", "human", "x"],
    ["map", "--overlap-check=overlap-check=all,overlap-check.inactive-l2=off", "x"],
    ["info", "x", "--output", "human", "--output", "json"],
]
SLOW_FORMS = [
    ["info"],
    ["info", "-h"],
    ["info", "a", "b"],
    ["info", "--out", "json", "a"],
    ["info", "--output", "xml", "a"],
    ["info", "--", "-a"],
    ["demo"],
    ["map", "--output"],
]


@pytest.mark.parametrize("argv", FAST_FORMS, ids=" ".join)
def test_fast_parse_agrees_with_argparse(argv: list[str]) -> None:
    from qcow2ovl.cli import build_parser, fast_parse

    fast = fast_parse(argv)
    assert fast is not None
    assert vars(fast) == vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("argv", SLOW_FORMS, ids=" ".join)
def test_fast_parse_leaves_the_rest_to_argparse(argv: list[str]) -> None:
    from qcow2ovl.cli import fast_parse

    assert fast_parse(argv) is None


# ---- subcommand usage and help ------------------------------------------------------------------

SUBCOMMANDS = ("info", "map", "check", "demo", "create", "convert", "io", "snapshot")


@pytest.mark.parametrize(
    "argv",
    [
        ["convert", "--no-such-option", "in.qcow2", "out.raw"],
        ["convert", "--no-such-option", "x", "in.qcow2", "out.raw"],
        ["io", "-c", "read 0 1", "--no-such-option", "in.qcow2"],
        ["snapshot", "-l", "--no-such-option", "in.qcow2"],
        ["create", "--no-such-option", "new.qcow2", "1M"],
        ["info", "--no-such-option", "in.qcow2"],
    ],
    ids=lambda argv: argv[0],
)
def test_unknown_option_names_the_subcommand(tmp_path: Path, argv: list[str]) -> None:
    """An unknown option gets the subcommand's usage and touches no file, as a subparser's own
    error would (not the top-level usage with the next word taken as a file)."""
    proc = subprocess.run(
        [sys.executable, "-m", "qcow2ovl", *argv],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: qcow2ovl {argv[0]} ")
    assert f"qcow2ovl {argv[0]}: error: unrecognized arguments: --no-such-option" in proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_is_plain_text(command: str) -> None:
    """No reStructuredText markup (``literal``, :func:`x`) in any --help."""
    proc = run_cli(command, "--help")
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: qcow2ovl {command}")
    assert not re.search(r"``|:(func|class|meth|mod|attr):`", proc.stdout), proc.stdout
