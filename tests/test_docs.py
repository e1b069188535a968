"""The documentation stands on its own and says what a new user needs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import qemu_images as qi

ROOT = Path(__file__).resolve().parent.parent


def repo_files() -> list[Path]:
    out = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0:  # not a git checkout: every text file under the usual directories
        return [
            p
            for d in ("docs", "python", "src", "tests", "benches", ".ci")
            for p in (ROOT / d).rglob("*")
            if p.is_file()
        ] + [ROOT / "README.md"]
    return [ROOT / line for line in out.stdout.splitlines() if (ROOT / line).is_file()]


# Words that point outside the repository, at things a reader cannot resolve.
UNRESOLVABLE = [
    re.compile(r"DESIGN\.md", re.I),
    re.compile(r"\bissues? #?\d+", re.I),
    re.compile(r"final submission", re.I),
    re.compile(r"\bthe seed\b", re.I),
    re.compile(r"\bseed's\b", re.I),
]

# Lines in code owned by the Rust core that still carry such a reference; they are to be
# reworded there (each entry: path, the exact text). Nothing may be added to this list except
# uses of the words in their ordinary sense (a hash seed).
PENDING = {
    # A hash seed, not a reference: "`h` is a seeded 64-bit mixer: the seed ..."
    ("src/overlap/table.rs", "a seeded 64-bit mixer: the seed"),
}


def test_no_references_outside_the_repository() -> None:
    found = []
    for path in repo_files():
        rel = path.relative_to(ROOT).as_posix()
        if rel == "tests/test_docs.py":
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(p.search(line) for p in UNRESOLVABLE):
                if not any(rel == f and s in line for f, s in PENDING):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert not found, "\n".join(found)


def test_architecture_page_covers_what_the_code_cites() -> None:
    text = (ROOT / "docs/design/architecture.md").read_text(encoding="utf-8")
    for heading in (
        "## Layers and data flow",
        "## Where each concern lives",
        "## Metadata types",
        "## The check",
        "## The `overlap-check` option",
        "## Corrupt images",
        "## On-disk facts used throughout",
    ):
        assert heading in text
    # Every file the concern table names exists.
    for name in re.findall(r"`((?:src|python|tests|benches|docs)/[\w/.-]+)`", text):
        assert (ROOT / name).exists(), name


def test_design_pages_quote_no_measured_times() -> None:
    """Measured numbers live in docs/benchmarks.md only, so they cannot disagree."""
    timing = re.compile(r"\d[\d.,]*\s*(?:–\s*\d[\d.,]*\s*)?(?:ns|µs|us|ms)\b")
    for page in (ROOT / "docs/design").glob("*.md"):
        hits = timing.findall(page.read_text(encoding="utf-8"))
        assert not hits, f"{page.name}: {hits}"


def test_benchmarks_say_how_long_preparation_takes() -> None:
    text = (ROOT / "docs/benchmarks.md").read_text(encoding="utf-8")
    for bench in ("bench_map.py", "bench_open.py", "bench_startup.py"):
        assert f"python benches/{bench}" in text
    assert text.count("Preparation:") >= 3
    source = (ROOT / "benches/bench_open.py").read_text(encoding="utf-8")
    assert "--cache-dir" in source and "image_reused" in source


def test_install_wording() -> None:
    for path in ("docs/testing.md", "python/qcow2ovl/testing/__init__.py"):
        text = (ROOT / path).read_text(encoding="utf-8")
        assert "pip install '.[test]'" in text, path
        assert "pip install 'qcow2ovl[test]'" in text, path


def test_testing_without_hypothesis_says_what_to_install() -> None:
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'hypothesis' or name.startswith('hypothesis.'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "try:\n"
        "    import qcow2ovl.testing\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert "pip install hypothesis" in out
    assert "pip install '.[test]'" in out


def test_readme_states_prerequisites() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    for needle in ("rustfmt", "clippy", "Python ≥ 3.9", "qemu-utils", "venv", "cp39-abi3"):
        assert needle in text, needle


def test_readme_examples_run_and_print_names(tmp_path: Path) -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    image = tmp_path / "disk.qcow2"
    qi.qemu_img("create", "-q", "-f", "qcow2", image, "64M")
    qi.qemu_io(image, "write 0 64k")
    out = subprocess.run(
        [sys.executable, "-c", "\n".join(blocks)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "['ACTIVE_L1']" in out
    assert "['ACTIVE_L2']" in out
    assert "['active-l1']" in out
    # No metadata type printed as a bare number (Python 3.11's str() of an IntFlag).
    for line in out.splitlines()[1:]:
        assert not re.fullmatch(r"\d+", line.split()[-1]), line


@pytest.mark.parametrize("page", ["README.md", "docs/cli.md", "docs/testing.md"])
def test_pages_mention_no_removed_names(page: str) -> None:
    text = (ROOT / page).read_text(encoding="utf-8")
    assert "`deflate`" not in text


def test_every_source_file_is_in_the_architecture_table() -> None:
    """`docs/design/architecture.md` names every source file of the package (its table of
    concerns); a file added or moved without a line there fails here."""
    text = (ROOT / "docs/design/architecture.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`([\w/.]+\.(?:rs|py|pyi))`", text))
    missing = [
        rel
        for path in repo_files()
        if (rel := path.relative_to(ROOT).as_posix()).startswith(("src/", "python/qcow2ovl/"))
        and rel.endswith((".rs", ".py", ".pyi"))
        and rel not in named
    ]
    assert missing == [], missing
