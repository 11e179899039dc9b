"""Property tests: a damaged .inr file either reads completely or raises InrFormatError, nothing else.

Raw byte flips and truncations mostly hit a checksum, so two more strategies repair the checksums after
damaging the header JSON or a table, to exercise the structural checks behind them.
"""
import atexit
import importlib.util
import json
import os
import shutil
import tempfile
import zlib

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inrfmt.errors import InrFormatError
from inrfmt.prior import Prior
from inrfmt.reader import InrFile
from inrfmt.spec import Architecture, PREAMBLE_DTYPE, PREAMBLE_SIZE
from inrfmt.writer import InrWriter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "tools", "make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
_WORK = tempfile.mkdtemp(prefix="inr-fuzz-")
atexit.register(shutil.rmtree, _WORK, True)


def _valid_bytes(hidden_dtype, prune, float_dtype, keys=None, prior=False) -> bytes:
    arch = Architecture(3, 5)
    n = 4
    rng = np.random.default_rng(7)
    wb = make_golden.random_weights(arch, n, hidden_dtype, rng, prune=prune, float_dtype=float_dtype)
    total = arch.hidden_layers * arch.width ** 2
    nnz = wb.mask.reshape(n, -1).sum(axis=1) if wb.mask is not None else np.full(n, total)
    path = os.path.join(_WORK, f"seed-{hidden_dtype}-{prune}-{keys is not None}-{prior}.inr")
    theta0 = {name: rng.normal(size=shape).astype(np.float32) for name, shape in arch.shapes().items()}
    with InrWriter(path, arch, hidden_dtype=hidden_dtype, float_dtype=float_dtype, has_masks=prune > 0,
                   classes=["a", "b"], metadata={"k": "v"}, chunk_images=3,
                   prior=Prior(arch, theta0, name="seed") if prior else None) as w:
        w.add(wb, [0, 1, -1, 1], [3, 4, 5, 6], [6, 5, 4, 3], [30.0, 31.0, 32.0, 33.0], 1 - nnz / total, keys=keys)
    with open(path, "rb") as fh:
        return fh.read()


SEEDS = [_valid_bytes("int8", 0.3, "float32"), _valid_bytes("float16", 0.0, "float16"),
         _valid_bytes("int8", 0.3, "float32", keys=["a/1.png", "", "b/ü.jpg", "x.tar/000001.jpg"]),
         _valid_bytes("float16", 0.0, "float32", prior=True)]


def _read_everything(data: bytes) -> None:
    """Open, read every chunk and verify; only InrFormatError may escape."""
    path = os.path.join(_WORK, "case.inr")
    with open(path, "wb") as fh:
        fh.write(data)
    try:
        with InrFile(path) as f:
            for k in range(f.num_chunks):
                f.read_chunk(k)
            f.read_images(range(f.num_images))
            f.verify()
            assert f.keys is None or len(f.keys) == f.num_images
            assert f.prior is None or f.prior.arch == f.arch
    except InrFormatError as e:
        assert path in str(e)


def _with_header(data: bytes, header) -> bytes:
    pre = np.frombuffer(data[:PREAMBLE_SIZE], PREAMBLE_DTYPE)[0].copy()
    raw = json.dumps(header).encode()
    offset = int(pre["header_offset"])
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    return pre.tobytes() + data[PREAMBLE_SIZE:offset] + raw


def _header(data: bytes) -> dict:
    pre = np.frombuffer(data[:PREAMBLE_SIZE], PREAMBLE_DTYPE)[0]
    offset, length = int(pre["header_offset"]), int(pre["header_length"])
    return json.loads(data[offset:offset + length])


def test_seed_files_are_valid():
    for data in SEEDS:
        path = os.path.join(_WORK, "seed.inr")
        with open(path, "wb") as fh:
            fh.write(data)
        with InrFile(path) as f:
            f.verify()


@settings(max_examples=120, **SETTINGS)
@given(seed=st.sampled_from(range(len(SEEDS))),
       flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=0, max_size=4),
       truncate=st.one_of(st.none(), st.integers(0, 10 ** 6)))
def test_random_byte_damage(seed, flips, truncate):
    data = bytearray(SEEDS[seed])
    for pos, xor in flips:
        data[pos % len(data)] ^= xor
    if truncate is not None:
        data = data[:truncate % (len(data) + 1)]
    _read_everything(bytes(data))


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6)
_small_ints = st.integers(-3, 3) | st.sampled_from([0, 1, 63, 64, 65, 2 ** 31, 2 ** 32, 2 ** 63, 2 ** 64])


def _paths(obj, prefix=()):
    """Every (path) to a value in a JSON tree."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=100, **SETTINGS)
@given(seed=st.sampled_from(range(len(SEEDS))), data=st.data())
def test_header_value_damage_with_valid_checksum(seed, data):
    header = _header(SEEDS[seed])
    paths = [p for p in _paths(header) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        obj = header
        try:
            for key in path[:-1]:
                obj = obj[key]
            old = obj[path[-1]]
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit changed the tree's shape
        if isinstance(old, int) and not isinstance(old, bool):
            new = data.draw(st.one_of(_small_ints.map(lambda d: old + d), _small_ints, _json_values))
        else:
            new = data.draw(_json_values)
        obj[path[-1]] = new
    _read_everything(_with_header(SEEDS[seed], header))


@settings(max_examples=100, **SETTINGS)
@given(seed=st.sampled_from(range(len(SEEDS))),
       name=st.sampled_from(["index", "chunks", "scales", "classes", "metadata", "keys", "prior"]),
       flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=1, max_size=3))
def test_table_damage_with_valid_checksum(seed, name, flips):
    data = bytearray(SEEDS[seed])
    header = _header(bytes(data))
    sec = next((s for s in header["sections"] if s["name"] == name), None)
    if sec is None or sec["length"] == 0:
        return
    for pos, xor in flips:
        data[sec["offset"] + pos % sec["length"]] ^= xor
    sec["crc32"] = zlib.crc32(bytes(data[sec["offset"]:sec["offset"] + sec["length"]]))
    _read_everything(_with_header(bytes(data), header))
