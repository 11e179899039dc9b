"""Property tests: a damaged .inr file either reads completely or raises InrFormatError, nothing else.

Raw byte flips and truncations mostly hit a checksum, so two more strategies repair the checksums after
damaging the header JSON or a table, to exercise the structural checks behind them. Format 2.0 files get
their own strategies, aimed at the coded sections, and spec/reference_decoder.py must agree with the library
on every damaged one.
"""
import atexit
import importlib.util
import json
import os
import shutil
import signal
import tempfile
import tracemalloc
import zlib
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from inrfmt import coding
from inrfmt.errors import InrFormatError
from inrfmt.grid import CodeGrid
from inrfmt.prior import Prior
from inrfmt.reader import InrFile
from inrfmt.spec import CHUNK_DTYPE, PREAMBLE_DTYPE, PREAMBLE_SIZE, Architecture, flatten_params, param_groups
from inrfmt.writer import InrWriter
from tests.test_coding import relaid
from tests.test_spec import reference_decoder as ref

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


# Up to four XOR flips anywhere in a file, then perhaps a truncation.
_FLIPS = st.lists(st.tuples(st.integers(0, 10 ** 6), st.integers(1, 255)), min_size=0, max_size=4)
_TRUNCATE = st.one_of(st.none(), st.integers(0, 10 ** 6))


def _damaged(data: bytes, flips, truncate) -> bytes:
    out = bytearray(data)
    for pos, xor in flips:
        out[pos % len(out)] ^= xor
    return bytes(out if truncate is None else out[:truncate % (len(out) + 1)])


@settings(max_examples=120, **SETTINGS)
@given(seed=st.sampled_from(range(len(SEEDS))), flips=_FLIPS, truncate=_TRUNCATE)
def test_random_byte_damage(seed, flips, truncate):
    _read_everything(_damaged(SEEDS[seed], flips, truncate))


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


def _damage_header(header: dict, data) -> None:
    """Replace 1 to 3 values anywhere in the header tree (in place) with drawn ones: nearby or small
    integers for integers, any JSON value otherwise."""
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


@settings(max_examples=100, **SETTINGS)
@given(seed=st.sampled_from(range(len(SEEDS))), data=st.data())
def test_header_value_damage_with_valid_checksum(seed, data):
    header = _header(SEEDS[seed])
    _damage_header(header, data)
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


# ------------------------------------------------------------------------------------------------
# format 2.0 (coded) files: damage restricted to the coded sections (quant, tables, the index frame,
# the chunk table and the rANS messages in blobs), checksums repaired so the checks behind them are reached.
# The library and spec/reference_decoder.py must agree on every damaged file: both refuse it (the library
# with InrFormatError only), or both read the same codes and parameters.
# ------------------------------------------------------------------------------------------------
CODED_SECTIONS = ["quant", "tables", "index", "chunks", "blobs"]
SECONDS_PER_FILE = 20  # a damaged file of a few hundred codes decodes in milliseconds; this is a hang


def _coded_bytes(arch, bits, n, chunk_images, *, prior=False, keys=None, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    grid = CodeGrid.from_widths(arch, bits, {"first_w": 1.0, "hidden_w": 0.1, "last_w": 0.2, "last_b": 0.5,
                                             "first_b": 0.5, "hidden_b": 0.5})
    codes = np.zeros((n, arch.params_per_image), np.int64)
    for g, b in zip(param_groups(arch), grid.bits):
        half = 1 << (int(b) - 1)
        codes[:, g.offset:g.stop] = np.clip(np.round(rng.laplace(0, min(half / 4, 20), (n, g.size))), -half, half - 1)
    theta0 = {name: rng.normal(0, 0.1, size=shape).astype(np.float32) for name, shape in arch.shapes().items()}
    path = os.path.join(_WORK, f"coded-seed-{seed}.inr")
    with InrWriter(path, arch, grid=grid, classes=["a", "b"], metadata={"k": "v"}, chunk_images=chunk_images,
                   prior=Prior(arch, theta0, name="seed") if prior else None) as w:
        w.add_codes(codes, rng.integers(-1, 2, n), rng.integers(1, 9, n), rng.integers(1, 9, n),
                    rng.uniform(20, 40, n), keys=keys)
    with open(path, "rb") as fh:
        return fh.read()


with open(os.path.join(ROOT, "spec", "coded_no_hidden.inr"), "rb") as _fh:
    CODED_SEEDS = [
        _coded_bytes(Architecture(3, 4), {"first_w": 6, "first_b": 5, "hidden_w": 3, "hidden_b": 4, "last_w": 8,
                                          "last_b": 16}, 4, 3, prior=True, keys=["a", "", "é", "x/y"], seed=1),
        _coded_bytes(Architecture(1, 3), {"first_w": 1, "first_b": 12, "hidden_w": 4, "hidden_b": 4, "last_w": 2,
                                          "last_b": 9}, 3, 8, seed=2),
        _fh.read(),
    ]


@contextmanager
def _time_limit(seconds):
    """Turn a hang into a failure (SIGALRM: the main thread, Unix)."""
    def expire(*_):
        raise TimeoutError(f"reading a damaged file took more than {seconds} s")
    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _read_coded(data: bytes):
    """Open, read every chunk (codes and weights) and verify: (codes, params, index) of an accepted file, or
    None when the library refuses it (InrFormatError only). The reference decoder must agree either way."""
    path = os.path.join(_WORK, "coded-case.inr")
    with open(path, "wb") as fh:
        fh.write(data)
    got = None
    with _time_limit(SECONDS_PER_FILE):
        try:
            with InrFile(path) as f:
                codes = [f.read_codes(k) for k in range(f.num_chunks)]
                params = [flatten_params(f.read_chunk(k), f.arch) for k in range(f.num_chunks)]
                f.read_images(range(f.num_images))
                f.verify()
                p = f.arch.params_per_image
                got = (np.concatenate(codes) if codes else np.zeros((0, p), np.int16),
                       np.concatenate(params) if params else np.zeros((0, p), np.float32), f.index.copy())
        except InrFormatError as e:
            assert path in str(e)
        try:
            want = ref.decode(data)
        except ref.FormatError as e:
            assert got is None, f"the library accepts a file the reference decoder refuses: {e}"
            return None
    assert got is not None, "the library refuses a file the reference decoder accepts"
    codes, params, index = got
    assert np.array_equal(codes, want.codes)
    assert np.array_equal(params.view(np.uint32), want.params.view(np.uint32))
    for name in ("label", "height", "width", "psnr", "chunk"):
        assert np.array_equal(index[name], want.index[name]), name
    return got


def _section(data: bytes, name: str):
    header = _header(data)
    return next((s for s in header["sections"] if s["name"] == name), None)


def _content(data: bytes, name: str) -> bytes:
    s = _section(data, name)
    return data[s["offset"]:s["offset"] + s["length"]]


def _with_message_crcs(data: bytes, blobs: bytes) -> bytes:
    """The file with `blobs` as its blobs section and every chunk row's CRC-32 recomputed from it (rows whose
    extent falls outside are left alone)."""
    rows = np.frombuffer(_content(data, "chunks"), CHUNK_DTYPE).copy()
    for row in rows:
        start, length = int(row["offset"]), int(row["compressed_length"])
        if start + length <= len(blobs):
            row["crc32"] = zlib.crc32(blobs[start:start + length])
    return relaid(data, {"blobs": blobs, "chunks": rows.tobytes()})


def test_coded_seed_files_are_valid():
    for data in CODED_SEEDS:
        got = _read_coded(data)
        assert got is not None and len(got[0]) >= 3


@settings(max_examples=60, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), flips=_FLIPS, truncate=_TRUNCATE)
def test_coded_random_byte_damage(seed, flips, truncate):
    _read_coded(_damaged(CODED_SEEDS[seed], flips, truncate))


@settings(max_examples=150, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), name=st.sampled_from(CODED_SECTIONS),
       flips=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128, 255])),
                      min_size=1, max_size=3))
def test_coded_section_damage_with_valid_checksums(seed, name, flips):
    """Bit flips in one coded section; its CRC-32 (and for blobs each message's) repaired."""
    data = CODED_SEEDS[seed]
    content = bytearray(_content(data, name))
    for pos, xor in flips:
        content[pos % len(content)] ^= xor
    if name == "blobs":
        damaged = _with_message_crcs(data, bytes(content))
    else:
        damaged = relaid(data, {name: bytes(content)})
    _read_coded(damaged)


@settings(max_examples=80, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), name=st.sampled_from(CODED_SECTIONS),
       cut=st.integers(0, 64), extra=st.binary(max_size=24), at=st.integers(0, 10 ** 6))
def test_coded_section_length_edits(seed, name, cut, extra, at):
    """A coded section cut short and/or given extra bytes at some position, the layout and checksums fixed."""
    data = CODED_SEEDS[seed]
    content = _content(data, name)
    pos = at % (len(content) + 1)
    edited = content[:pos] + extra + content[pos + min(cut, len(content) - pos):]
    if edited == content:
        return
    _read_coded(_with_message_crcs(data, edited) if name == "blobs" else relaid(data, {name: edited}))


@settings(max_examples=80, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), k=st.integers(0, 10),
       lanes=st.lists(st.lists(st.integers(0, 2 ** 32 - 1) | st.sampled_from([0, 1, 2 ** 24, 2 ** 31]),
                               max_size=6), min_size=4, max_size=4),
       counts_delta=st.sampled_from([0, 0, 0, 1, -1]), tail=st.binary(max_size=3))
def test_coded_random_messages(seed, k, lanes, counts_delta, tail):
    """A chunk's message replaced by arbitrary lanes (consistent word counts or not, whole words or not),
    the chunk table and every checksum fixed: the rANS decoders see arbitrary words."""
    data = CODED_SEEDS[seed]
    rows = np.frombuffer(_content(data, "chunks"), CHUNK_DTYPE).copy()
    k %= len(rows)
    counts = [len(lane) for lane in lanes]
    counts[0] = max(0, counts[0] + counts_delta)
    message = np.array(counts + [w for lane in lanes for w in lane], "<u4").tobytes() + tail
    blobs = _content(data, "blobs")
    old_start, old_len = int(rows[k]["offset"]), int(rows[k]["compressed_length"])
    new_blobs = blobs[:old_start] + message + blobs[old_start + old_len:]
    rows["compressed_length"][k] = len(message)
    rows["offset"] = np.concatenate([[0], np.cumsum(rows["compressed_length"].astype(np.int64))[:-1]])
    rows["crc32"][k] = zlib.crc32(message)
    _read_coded(relaid(data, {"blobs": new_blobs, "chunks": rows.tobytes()}))


def _leb_numbers(data: bytes) -> list[int]:
    numbers, pos = [], 0
    while pos < len(data):
        value, pos = coding._read_uleb128(data, pos)
        numbers.append(value)
    return numbers


@settings(max_examples=80, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))),
       edits=st.lists(st.tuples(st.integers(0, 10 ** 6),
                                st.sampled_from([0, 1, 2, 3, 7, 8, 15, 16, 255, 4094, 65534, 65535, 65536, 2 ** 31,
                                                 2 ** 32 - 1]) | st.integers(0, 2 ** 32 - 1),
                                st.sampled_from(["set", "insert", "delete"])), min_size=1, max_size=3))
def test_coded_tables_number_edits(seed, edits):
    """The tables section as its LEB128 numbers (first, K - 2, counts, ...): some set to boundary or random
    values, inserted or deleted, then written back: the rules 85-86 bounds and the group boundaries."""
    data = CODED_SEEDS[seed]
    numbers = _leb_numbers(_content(data, "tables"))
    for pos, value, op in edits:
        i = pos % (len(numbers) + (op == "insert"))
        if op == "set" and numbers:
            numbers[i % len(numbers)] = value
        elif op == "insert":
            numbers.insert(i, value)
        elif numbers:
            del numbers[i % len(numbers)]
    tables = b"".join(coding._uleb128(v) for v in numbers)
    _read_coded(relaid(data, {"tables": tables}))


@settings(max_examples=40, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), name=st.sampled_from(["quant", "tables", "index"]),
       content=st.binary(max_size=80))
def test_coded_section_replaced_by_random_bytes(seed, name, content):
    _read_coded(relaid(CODED_SEEDS[seed], {name: content}))


@settings(max_examples=60, **SETTINGS)
@given(seed=st.sampled_from(range(len(CODED_SEEDS))), data=st.data())
def test_coded_header_value_damage_with_valid_checksum(seed, data):
    header = _header(CODED_SEEDS[seed])
    _damage_header(header, data)
    _read_coded(_with_header(CODED_SEEDS[seed], header))


# ------------------------------------------------------------------------------------------------
# claims of size cannot make a reader allocate: they are checked against the bytes first
# ------------------------------------------------------------------------------------------------
def _peak_bytes(data: bytes, fragment: str | None, *, read: bool = False) -> int:
    """Peak bytes traced while opening the file (and with read=True decoding every chunk); with a fragment
    the file must be refused with it, without one accepted."""
    path = os.path.join(_WORK, "claim.inr")
    with open(path, "wb") as fh:
        fh.write(data)
    tracemalloc.start()
    try:
        try:
            with InrFile(path) as f:
                if read:
                    for k in range(f.num_chunks):
                        f.read_codes(k)
            assert fragment is None, "the file was accepted"
        except InrFormatError as e:
            assert fragment is not None and fragment in str(e), str(e)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _tables_claiming(data: bytes, group: int, first: int, k: int, counts=()) -> bytes:
    """The seed's tables section with group `group`'s table replaced by (first, K, counts) as given."""
    with open(os.path.join(_WORK, "claim-src.inr"), "wb") as fh:
        fh.write(data)
    with InrFile(os.path.join(_WORK, "claim-src.inr")) as f:
        tables = list(f.tables)
    head = coding.tables_section(tables[:group])
    claim = coding._uleb128(first) + coding._uleb128(k - 2) + b"".join(coding._uleb128(c) for c in counts)
    return head + claim + coding.tables_section(tables[group + 1:])


@pytest.mark.parametrize("first, k, counts", [
    (0, 65536, ()),               # rule 86: K = 2^16 for a 4-bit group (no counts follow)
    (0, 2 ** 32 + 1, ()),         # K - 2 = 2^32 - 1
    (0, 65536, [2 ** 32 - 1] * 8),
    (15, 2, [1, 1]),              # 15 + 2 > 2^4
])
def test_a_huge_claimed_alphabet_allocates_nothing(first, k, counts):
    data = CODED_SEEDS[0]
    bits = [int(q) for q in np.frombuffer(_content(data, "quant"), "<f4, u1, u1, <u2")["f1"]]
    group = bits.index(4)  # hidden_b.0
    damaged = relaid(data, {"tables": _tables_claiming(data, group, first, k, counts)})
    assert _peak_bytes(damaged, f"table {group}") < 1 << 17  # np.empty(65536) alone would be 512 KiB
    with pytest.raises(ref.FormatError, match="rule 86"):
        ref.decode(damaged)


def test_huge_counts_and_lane_claims_allocate_nothing():
    """Counts of 2^32 - 1 are plain integers (rule 87 in exact arithmetic); a message whose lanes claim
    2^32 - 1 words is refused from its length before anything is decoded."""
    data = CODED_SEEDS[0]
    with open(os.path.join(_WORK, "claim-src.inr"), "wb") as fh:
        fh.write(data)
    with InrFile(os.path.join(_WORK, "claim-src.inr")) as f:
        tables = [coding.CodeTable(t.first, np.full(t.size, 2 ** 32 - 1)) for t in f.tables]
    assert _read_coded(relaid(data, {"tables": coding.tables_section(tables)})) is None  # codes no longer fit
    rows = np.frombuffer(_content(data, "chunks"), CHUNK_DTYPE).copy()
    blobs = bytearray(_content(data, "blobs"))
    blobs[0:4] = (2 ** 32 - 1).to_bytes(4, "little")
    rows["crc32"][0] = zlib.crc32(bytes(blobs[:int(rows["compressed_length"][0])]))
    damaged = relaid(data, {"blobs": bytes(blobs), "chunks": rows.tobytes()})
    assert _read_coded(data) is not None  # the decoder compiled and loaded before memory is traced
    valid = _peak_bytes(data, None, read=True)  # the tables' lookup arrays, built at open
    assert _peak_bytes(damaged, "do not add up", read=True) < valid + (1 << 16)
