"""Stateful property test of the writer: random write / write_zeroes / discard / resize / flush /
reopen sequences on many image configurations (LUKS-encrypted ones among them), mirrored to a
model of the guest disk. After every run `qemu-img check` must find the image clean and
`qemu-img compare` identical to the model. CI runs a few examples per configuration;
`QCOW2OVL_WRITE_EXAMPLES=500` runs more."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
import qcow2ovl
import qemu_images as qi
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

pytestmark = pytest.mark.skipif(not qi.env_has_qemu(), reason="needs qemu-img")

MiB = 1 << 20
SIZE = 4 * MiB
EXAMPLES = int(os.environ.get("QCOW2OVL_WRITE_EXAMPLES", "12"))

CONFIGS = [
    {"cluster_size": 512},
    {"cluster_size": 4096, "refcount_bits": 1},
    {"cluster_size": 65536},
    {"cluster_size": 2 * MiB},
    {"refcount_bits": 64},
    {"cluster_size": 512, "refcount_bits": 64},
    {"extended_l2": True},
    {"extended_l2": True, "backing": True},
    {"lazy_refcounts": True},
    {"version": 2},
    {"version": 2, "backing": True},
    {"backing": True},
    {"data_file": True},
    # LUKS: every data cluster ciphered, unaligned writes widened to whole sectors.
    {"encrypt": True},
    {"encrypt": True, "cluster_size": 512},
    {"encrypt": True, "extended_l2": True, "backing": True},
    {"encrypt": True, "backing": True, "version": 2},
]

#: Encrypted images made once per configuration and copied for each example: a LUKS key
#: derivation is calibrated to take its time.
_ENCRYPTED_TEMPLATES: dict[str, Path] = {}
_TEMPLATE_DIR = Path(tempfile.mkdtemp(prefix="qcow2ovl-stateful-luks-"))


def _create_encrypted(path: Path, opts: dict[str, object]) -> None:
    key = repr(sorted(opts.items()))
    if key not in _ENCRYPTED_TEMPLATES:
        template = _TEMPLATE_DIR / f"t{len(_ENCRYPTED_TEMPLATES)}.qcow2"
        encrypt = {"format": "luks", "key_secret": qi.SECRET_DATA, "iter_time": 10}
        qcow2ovl.create(template, SIZE, encrypt=encrypt, **opts)  # type: ignore[arg-type]
        _ENCRYPTED_TEMPLATES[key] = template
    shutil.copyfile(_ENCRYPTED_TEMPLATES[key], path)


class WriterMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="qcow2ovl-stateful-"))
        self.img: qcow2ovl.Image | None = None

    @initialize(config=st.sampled_from(CONFIGS), seed=st.integers(0, 2**16))
    def setup(self, config: dict[str, object], seed: int) -> None:
        opts = dict(config)
        self.path = self.dir / "img.qcow2"
        self.v3 = opts.get("version", 3) == 3
        self.backing = bool(opts.pop("backing", False))
        self.base = bytes(SIZE)
        if self.backing:
            base = self.dir / "base.raw"
            self.base = random.Random(seed).randbytes(SIZE // 2) + bytes(SIZE // 2)
            base.write_bytes(self.base[: SIZE - 12345])  # shorter than the image
            self.base = self.base[: SIZE - 12345] + bytes(12345)
            opts["backing_file"] = str(base)
            opts["backing_format"] = "raw"
        self.data_file = bool(opts.pop("data_file", False))
        if self.data_file:
            opts["data_file"] = str(self.dir / "img.data")
        self.secret = qi.SECRET_DATA if opts.pop("encrypt", False) else None
        if self.secret is not None:
            _create_encrypted(self.path, opts)
        else:
            qcow2ovl.create(self.path, SIZE, **opts)  # type: ignore[arg-type]
        self.cs = int(opts.get("cluster_size", 65536))  # type: ignore[call-overload]
        self.model = bytearray(self.base)
        self.size = SIZE
        self.img = qcow2ovl.open(self.path, writable=True, secret=self.secret)

    def _range(self, data: st.DataObject) -> tuple[int, int]:
        off = data.draw(st.integers(0, self.size - 1))
        n = data.draw(st.sampled_from([1, 512, 4096, self.cs, 3 * self.cs + 5, 200_000]))
        return off, min(n, self.size - off)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), byte=st.integers(0, 255))
    def write(self, data: st.DataObject, byte: int) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.write(off, bytes([byte]) * n)
        self.model[off : off + n] = bytes([byte]) * n

    @precondition(lambda self: self.img is not None and not self.data_file and self.secret is None)
    @rule(data=st.data(), byte=st.integers(0, 255))
    def write_compressed(self, data: st.DataObject, byte: int) -> None:
        assert self.img is not None
        cluster = data.draw(st.integers(0, (self.size - 1) // self.cs)) * self.cs
        n = min(self.cs, self.size - cluster)
        if n < self.cs and cluster + n != self.size:
            return
        payload = (bytes([byte, byte ^ 0x5A]) * (n // 2 + 1))[:n]
        self.img.write_compressed(cluster, payload)
        self.model[cluster : cluster + n] = payload

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data(), unmap=st.booleans())
    def write_zeroes(self, data: st.DataObject, unmap: bool) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.write_zeroes(off, n, unmap=unmap)
        self.model[off : off + n] = bytes(n)

    @precondition(lambda self: self.img is not None)
    @rule(data=st.data())
    def discard(self, data: st.DataObject) -> None:
        off, n = self._range(data)
        assert self.img is not None
        self.img.discard(off, n)
        start = -(-off // self.cs) * self.cs
        end = (off + n) // self.cs * self.cs
        if off + n == self.size:
            end = self.size
        if end > start:
            # v3: zeros; v2: the backing file (or zeros) shows through again.
            fill = bytes(end - start) if self.v3 else self._backing(start, end)
            self.model[start:end] = fill

    def _backing(self, start: int, end: int) -> bytes:
        return (self.base + bytes(max(0, end - len(self.base))))[start:end]

    @precondition(lambda self: self.img is not None)
    @rule()
    def flush(self) -> None:
        assert self.img is not None
        self.img.flush()

    @precondition(lambda self: self.img is not None)
    @rule()
    def reopen(self) -> None:
        assert self.img is not None
        self.img.close()
        self.img = qcow2ovl.open(self.path, writable=True, secret=self.secret)

    @precondition(lambda self: self.img is not None and self.size < 3 * SIZE)
    @rule(grow=st.sampled_from([512, 64 * 1024, MiB + 512]))
    def resize(self, grow: int) -> None:
        assert self.img is not None
        self.img.resize(self.size + grow)
        self.size += grow
        self.model += bytes(grow)

    @invariant()
    def reads_match(self) -> None:
        if self.img is not None:
            off = random.randrange(self.size)
            n = min(70_000, self.size - off)
            assert self.img.read(off, n) == bytes(self.model[off : off + n])

    def teardown(self) -> None:
        try:
            self._final_check()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _final_check(self) -> None:
        if self.img is None:
            return
        self.img.close()
        ref = qi.ImageRef(self.path, secret=self.secret is not None)
        report = qi.qemu_check(ref)
        assert qi.check_is_clean(report), report
        mirror = self.dir / "model.raw"
        mirror.write_bytes(bytes(self.model))
        if self.secret is not None:
            raw = f"driver=raw,file.filename={mirror}"
            args = ["--object", qi.SECRET_OBJECT, "--image-opts", ref.image_opts(), raw]
            out = qi.qemu_img("compare", *args).stdout
        else:
            out = qi.qemu_img("compare", "-f", "qcow2", "-F", "raw", self.path, mirror).stdout
        assert "identical" in out, out


TestWriter = WriterMachine.TestCase
TestWriter.settings = settings(
    max_examples=EXAMPLES * len(CONFIGS),
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
