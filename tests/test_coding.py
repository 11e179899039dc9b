"""inrfmt.coding and coded (format 2.0) files: rANS round trips, the frequency rule, the `tables` section and
every message and table it must refuse, the coded writer (merge included), and a 1.x-only reader's refusal.

The chunk round trips also decode every message with spec/reference_decoder.py (FORMAT.md Part II alone),
so the library's coder and the specification are checked against each other."""
import json
import os
import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import inrfmt.reader
from inrfmt import coding
from inrfmt.coding import CodeTable, CodingError
from inrfmt.errors import InrFormatError, InrUsageError
from inrfmt.grid import CodeGrid
from inrfmt.prior import Prior
from inrfmt.reader import InrFile
from inrfmt.spec import CHUNK_DTYPE, PREAMBLE_DTYPE, PREAMBLE_SIZE, Architecture, align, flatten_params, param_groups
from inrfmt.writer import InrWriter, merge_files
from tests.test_format import batch_inputs, expect_error, read_parts, rewrite, section, table_editor, write
from tests.test_spec import reference_decoder as ref

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
TOTAL = 1 << 24


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def make_grid(arch, bits):
    """A plain (unwrapped) grid with the given code width per group."""
    g = len(param_groups(arch))
    return CodeGrid(arch, np.full(g, 0.01, np.float32), np.asarray(bits, np.uint8), np.zeros(g, bool))


def random_tables(grid, rng, max_symbols=3000):
    """One random table per group: a span of 2..max_symbols codes of its width, random counts (zeros and
    counts up to 2^32 - 1 included)."""
    tables = []
    for b in grid.bits:
        width = 1 << int(b)
        k = int(rng.integers(2, min(width, max_symbols) + 1))
        first = int(rng.integers(0, width - k + 1))
        kind = rng.integers(4)
        if kind == 0:
            counts = rng.integers(0, 3, size=k)                       # many zeros
        elif kind == 1:
            counts = rng.integers(0, 2 ** 32, size=k, dtype=np.int64)  # up to the largest count
        elif kind == 2:
            counts = np.zeros(k, np.int64)                             # all zero: every count 1
        else:
            counts = np.round(1000 * np.exp(-np.abs(np.arange(k) - k / 2) / max(1, k / 10))).astype(np.int64)
        tables.append(CodeTable(first, counts))
    return tables


def random_codes(grid, tables, n, rng):
    """int16 [n, P]: codes within each group's table, drawn mostly from its likely symbols."""
    codes = np.zeros((n, grid.arch.params_per_image), np.int16)
    for g, b, t in zip(param_groups(grid.arch), grid.bits, tables):
        p = t.freqs / t.freqs.sum()
        s = rng.choice(t.size, size=(n, g.size), p=p) if rng.random() < 0.8 else \
            rng.integers(0, t.size, size=(n, g.size))
        codes[:, g.offset:g.stop] = s + t.first - (1 << (int(b) - 1))
    return codes


def reference_decode(message, grid, tables, n):
    """spec/reference_decoder.py's decode of one message (tables through the `tables` section's bytes)."""
    a = grid.arch
    groups = ref.param_groups(a.sine_layers, a.width, a.w0, a.first_w0)
    bits = [int(b) for b in grid.bits]
    return ref.decode_message(message, n, groups, bits, ref.parse_tables(coding.tables_section(tables), bits))


def library_decode(message, grid, tables, n):
    out = np.empty((n, grid.arch.params_per_image), np.int16)
    coding.decode_chunk(message, coding.Decoder.build(tables, grid), out)
    return out


def check_round_trip(grid, tables, codes):
    message = coding.encode_chunk(codes, grid, tables)
    words = np.frombuffer(message, "<u4")
    assert len(message) % 4 == 0 and len(words) >= 4 and int(words[:4].astype(np.int64).sum()) == len(words) - 4
    assert np.array_equal(library_decode(message, grid, tables, len(codes)), codes)
    assert np.array_equal(reference_decode(message, grid, tables, len(codes)), codes)
    return message


# ------------------------------------------------------------------------------------------------
# rANS round trips (rules 88-92)
# ------------------------------------------------------------------------------------------------
@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2 ** 32 - 1), sine_layers=st.integers(1, 3), width=st.integers(1, 6),
       n=st.integers(0, 4))
def test_chunk_round_trip_random_tables(seed, sine_layers, width, n):
    rng = np.random.default_rng(seed)
    arch = Architecture(sine_layers, width)
    grid = make_grid(arch, rng.integers(1, 17, size=len(param_groups(arch))))
    tables = random_tables(grid, rng)
    check_round_trip(grid, tables, random_codes(grid, tables, n, rng))


@pytest.mark.parametrize("bits, k", [(1, 2), (2, 3), (8, 256), (12, 3000), (16, 65536)])
def test_chunk_round_trip_alphabet_sizes(bits, k):
    """K from 2 to the largest alphabet, every symbol used, one image and several."""
    rng = np.random.default_rng(k)
    arch = Architecture(2, 3)
    grid = make_grid(arch, [bits] * len(param_groups(arch)))
    first = (1 << bits) - k
    tables = [CodeTable(first, rng.integers(0, 50, size=k)) for _ in grid.bits]
    for n in (1, 5):
        codes = random_codes(grid, tables, n, rng)
        check_round_trip(grid, tables, codes)
    # every symbol of the first table's alphabet, spread over enough images to hold them
    per_image = param_groups(arch)[0].size
    n = -(-k // per_image)
    codes = random_codes(grid, tables, n, rng)
    s = np.arange(n * per_image) % k
    codes[:, :per_image] = (s + first - (1 << (bits - 1))).reshape(n, per_image)
    check_round_trip(grid, tables, codes)


def test_empty_chunk_and_first_symbols_code_to_empty_lanes():
    """No images: four zero word counts. Codes that are all the first symbol of their table leave every
    lane in state 0 (rule 93: a coder starts there), so the message is again just the counts."""
    arch = Architecture(2, 4)
    grid = make_grid(arch, [5] * len(param_groups(arch)))
    tables = [CodeTable(3, [1, 5, 9]) for _ in grid.bits]
    empty = check_round_trip(grid, tables, np.zeros((0, arch.params_per_image), np.int16))
    assert empty == bytes(16)
    first = np.full((3, arch.params_per_image), 3 - 16, np.int16)
    assert check_round_trip(grid, tables, first) == bytes(16)


def test_single_image_single_parameter_groups():
    """n = 1 with the smallest network (P = 9: groups of 2, 1, 3 and 3 parameters), so lanes hold 1-3 codes."""
    arch = Architecture(1, 1)
    grid = make_grid(arch, [1, 16, 3, 9])
    rng = np.random.default_rng(5)
    for _ in range(20):
        tables = random_tables(grid, rng)
        check_round_trip(grid, tables, random_codes(grid, tables, 1, rng))


def test_encode_refuses_codes_outside_the_table():
    arch = Architecture(1, 2)
    grid = make_grid(arch, [4] * 4)
    tables = [CodeTable(4, [1, 1, 1]) for _ in grid.bits]  # unsigned codes 4..6: q = -4..-2
    codes = np.full((1, arch.params_per_image), -3, np.int16)
    check_round_trip(grid, tables, codes)
    codes[0, 0] = -1
    with pytest.raises(ValueError, match="first_w"):
        coding.encode_chunk(codes, grid, tables)


# ------------------------------------------------------------------------------------------------
# rule 87: frequencies
# ------------------------------------------------------------------------------------------------
def rule_87(counts):
    """FORMAT.md rule 87 in Python integers, as written."""
    k, c = len(counts), [int(x) for x in counts]
    if sum(c) == 0:
        c = [1] * k
    total = sum(c)
    f = [1 + x * (TOTAL - k) // total for x in c]
    f[c.index(max(c))] += TOTAL - sum(f)
    return f


@settings(max_examples=60, **SETTINGS)
@given(counts=st.lists(st.integers(0, 2 ** 32 - 1) | st.integers(0, 3), min_size=2, max_size=300))
def test_normalize_counts_follows_rule_87(counts):
    f = coding.normalize_counts(counts)
    assert f.tolist() == rule_87(counts) == ref.frequencies(counts)
    assert int(f.sum()) == TOTAL and f.min() >= 1


@pytest.mark.parametrize("counts", [
    [0, 0], [0, 1], [7, 7, 7], [2 ** 32 - 1] * 3 + [0], [1] * 65536, [2 ** 32 - 1] * 65536,
    [0] * 65535 + [2 ** 32 - 1], [5, 1, 5], list(range(1000)),
])
def test_normalize_counts_edge_cases(counts):
    f = coding.normalize_counts(counts)
    assert len(f) == len(counts) and int(f.sum()) == TOTAL and f.min() >= 1
    assert f.tolist() == rule_87(counts)


def test_normalize_counts_remainder_goes_to_the_first_largest_count():
    f = coding.normalize_counts([5, 1, 5])
    base = [1 + c * (TOTAL - 3) // 11 for c in (5, 1, 5)]
    assert f.tolist() == [base[0] + TOTAL - sum(base), base[1], base[2]]
    assert coding.normalize_counts([0, 0, 0]).tolist() == [TOTAL - 2 * (TOTAL // 3), TOTAL // 3, TOTAL // 3]


# ------------------------------------------------------------------------------------------------
# rules 85-86: the tables section
# ------------------------------------------------------------------------------------------------
def leb(value):
    return coding._uleb128(value)


@settings(max_examples=30, **SETTINGS)
@given(seed=st.integers(0, 2 ** 32 - 1), sine_layers=st.integers(1, 3))
def test_tables_section_round_trip(seed, sine_layers):
    rng = np.random.default_rng(seed)
    arch = Architecture(sine_layers, 3)
    grid = make_grid(arch, rng.integers(1, 17, size=len(param_groups(arch))))
    tables = random_tables(grid, rng)
    data = coding.tables_section(tables)
    assert coding.parse_tables_section(data, grid.bits) == tables
    parsed = ref.parse_tables(data, [int(b) for b in grid.bits])
    assert [(t.first, t.counts) for t in parsed] == [(t.first, t.counts.tolist()) for t in tables]


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02"), (2 ** 32 - 1, b"\xff\xff\xff\xff\x0f"),
])
def test_leb128_encoding(value, encoded):
    assert leb(value) == encoded
    assert coding._read_uleb128(encoded + b"\x05", 0) == (value, len(encoded))
    assert ref.read_leb128(encoded + b"\x05", 0) == (value, len(encoded))


def test_largest_tables_are_accepted():
    """The bounds themselves: K = 2^16 symbols ending at 2^16 - 1, a 1-bit table, counts of 2^32 - 1."""
    data = leb(0) + leb(65534) + leb(2 ** 32 - 1) * 65536 + leb(0) + leb(0) + leb(3) + leb(0)
    tables = coding.parse_tables_section(data, [16, 1])
    assert [t.size for t in tables] == [65536, 2] and tables[1].counts.tolist() == [3, 0]
    assert coding.parse_tables_section(leb(14) + leb(0) + leb(1) * 2, [4])[0].first == 14  # 14 + 2 = 2^4


@pytest.mark.parametrize("data, bits, fragment", [
    (b"", [4], "table 0: truncated"),
    (b"\x80", [4], "table 0: truncated"),
    (leb(0) + leb(0) + leb(1), [4], "table 0: truncated"),                       # one count of two
    (leb(0) + leb(0) + leb(1) + leb(1), [4, 4], "table 1: truncated"),           # a group without a table
    (b"\x80\x00" + leb(0) + leb(1) * 2, [4], "table 0: non-minimal"),
    (leb(0) + leb(0) + b"\x81\x80\x00" + leb(1), [4], "table 0: non-minimal"),
    (leb(0) + leb(0) + b"\x80\x80\x80\x80\x10" + leb(1), [4], r"not below 2\^32"),  # 2^32
    (leb(0) + leb(0) + b"\x80\x80\x80\x80\x80\x01" + leb(1), [4], "longer than 5 bytes"),
    (leb(0) + leb(65535) + leb(1) * 65537, [16], "exceed"),                      # K = 65537
    (leb(0) + leb(15) + leb(1) * 17, [4], "exceed"),                             # K = 17 > 2^4
    (leb(15) + leb(0) + leb(1) * 2, [4], "exceed"),                              # 15 + 2 > 2^4
    (leb(1) + leb(0) + leb(1) * 2, [1], "exceed"),                               # a 1-bit group has 2 codes
    (leb(2 ** 32 - 1) + leb(0) + leb(1) * 2, [16], "exceed"),
    (leb(0) + leb(0) + leb(1) * 2 + b"\x00", [4], "1 bytes after the last table"),
])
def test_parse_tables_section_rejects(data, bits, fragment):
    with pytest.raises(CodingError, match=fragment):
        coding.parse_tables_section(data, bits)
    with pytest.raises(ref.FormatError, match="rule 8[56]"):
        ref.parse_tables(data, bits)


def test_a_huge_claimed_alphabet_is_refused_before_reading_its_counts():
    """K - 2 = 2^32 - 1 for a 4-bit group: refused from the two numbers alone (no counts follow)."""
    with pytest.raises(CodingError, match="exceed the group's 4-bit codes"):
        coding.parse_tables_section(leb(0) + leb(2 ** 32 - 1), [4])


# ------------------------------------------------------------------------------------------------
# messages a decoder must refuse (rules 88, 89, 92)
# ------------------------------------------------------------------------------------------------
ARCH = Architecture(2, 5)


@pytest.fixture(scope="module")
def coded_chunk():
    """(grid, tables, codes, message) of a chunk whose lanes all hold several words."""
    rng = np.random.default_rng(3)
    grid = make_grid(ARCH, [8] * len(param_groups(ARCH)))
    tables = [CodeTable(0, rng.integers(1, 100, size=256)) for _ in grid.bits]
    codes = random_codes(grid, tables, 4, rng)
    message = coding.encode_chunk(codes, grid, tables)
    assert (np.frombuffer(message[:16], "<u4") >= 3).all()
    return grid, tables, codes, message


def lanes_of(message):
    words = np.frombuffer(message, "<u4")
    counts = words[:4].astype(np.int64)
    bounds = np.concatenate([[0], np.cumsum(counts)]) + 4
    return [words[bounds[i]:bounds[i + 1]].tolist() for i in range(4)]


def message_of(lanes):
    return np.array([len(l) for l in lanes] + [w for l in lanes for w in l], "<u4").tobytes()


def expect_refused(message, grid, tables, n, fragment, rule):
    with pytest.raises(CodingError, match=fragment):
        library_decode(message, grid, tables, n)
    with pytest.raises(ref.FormatError, match=rule):
        reference_decode(message, grid, tables, n)


def test_lane_helpers_rebuild_the_message(coded_chunk):
    message = coded_chunk[3]
    assert message_of(lanes_of(message)) == message


def test_decode_refuses_a_trailing_zero_word(coded_chunk):
    grid, tables, codes, message = coded_chunk
    lanes = lanes_of(message)
    lanes[2] = lanes[2] + [0]  # the top of lane 2's stack
    expect_refused(message_of(lanes), grid, tables, len(codes), "ends in a zero word", "rule 89")


def test_decode_refuses_words_left_over(coded_chunk):
    """Decoding fewer images than were coded leaves words in the lanes."""
    grid, tables, codes, message = coded_chunk
    expect_refused(message, grid, tables, len(codes) - 2, "words are left", "rule 92")


def test_decode_refuses_a_nonzero_final_state(coded_chunk):
    grid, tables, codes, message = coded_chunk
    # One word 5 in lane 0: its first symbols hold quantile 5, so it stays 5 to the end.
    lonely = message_of([[5], [], [], []])
    expect_refused(lonely, grid, tables, 1, "final state is not 0", "rule 92")
    # The right words decoded with other tables: the chain does not come back to 0.
    other = [CodeTable(0, np.arange(256) + 1) for _ in grid.bits]
    expect_refused(message, grid, other, len(codes), "final state is not 0|words are left", "rule 92")


@pytest.mark.parametrize("cut", [1, 2, 3])
def test_decode_refuses_a_length_not_a_multiple_of_4(coded_chunk, cut):
    grid, tables, codes, message = coded_chunk
    expect_refused(message[:-cut], grid, tables, len(codes), "not 4 word counts and whole 4-byte words", "rule 88")


@pytest.mark.parametrize("message", [b"", bytes(4), bytes(12)])
def test_decode_refuses_a_message_shorter_than_its_word_counts(coded_chunk, message):
    grid, tables, _, _ = coded_chunk
    expect_refused(message, grid, tables, 1, "not 4 word counts", "rule 88")


def test_decode_refuses_word_counts_that_do_not_add_up(coded_chunk):
    grid, tables, codes, message = coded_chunk
    words = np.frombuffer(message, "<u4").copy()
    for delta in (1, -1):
        bad = words.copy()
        bad[1] = int(bad[1]) + delta
        expect_refused(bad.tobytes(), grid, tables, len(codes), "do not add up", "rule 89")
    bad = words.copy()
    bad[0] = 2 ** 32 - 1  # a huge count cannot reach past the message
    expect_refused(bad.tobytes(), grid, tables, len(codes), "do not add up", "rule 89")


def test_decode_checks_its_output_array(coded_chunk):
    grid, tables, codes, message = coded_chunk
    decoder = coding.Decoder.build(tables, grid)
    for out in (np.empty((4, ARCH.params_per_image), np.int32), np.empty((4, ARCH.params_per_image + 1), np.int16),
                np.empty((ARCH.params_per_image, 8), np.int16).T):
        with pytest.raises(ValueError, match="out must be"):
            coding.decode_chunk(message, decoder, out)


def test_any_single_bit_flip_of_a_message_is_refused_or_decodes_in_range(coded_chunk):
    """Every one-bit change of the message: a CodingError, or codes that are still symbols of the tables
    (the decoder never reads past the words nor writes outside its output)."""
    grid, tables, codes, message = coded_chunk
    rng = np.random.default_rng(0)
    refused = 0
    for pos in rng.choice(len(message) * 8, size=200, replace=False):
        data = bytearray(message)
        data[pos // 8] ^= 1 << (pos % 8)
        try:
            out = library_decode(bytes(data), grid, tables, len(codes))
        except CodingError:
            refused += 1
            continue
        assert out.min() >= -128 and out.max() < 128
    assert refused >= 190  # rule 92's final check catches nearly every change


# ------------------------------------------------------------------------------------------------
# the coded writer and reader (format 2.0)
# ------------------------------------------------------------------------------------------------
CODED_ARCH = Architecture(3, 6, w0=25.0, first_w0=35.0)
CLASS_BITS = {"first_w": 8, "first_b": 6, "hidden_w": 4, "hidden_b": 5, "last_w": 10, "last_b": 12}
RANGES = {"first_w": 1.0, "hidden_w": 0.1, "last_w": 0.2, "last_b": 0.5}


def coded_inputs(n, seed=0):
    rng = np.random.default_rng(seed)
    grid = CodeGrid.from_widths(CODED_ARCH, CLASS_BITS, RANGES)
    codes = np.zeros((n, CODED_ARCH.params_per_image), np.int64)
    for g, b in zip(param_groups(CODED_ARCH), grid.bits):
        half = 1 << (int(b) - 1)
        codes[:, g.offset:g.stop] = np.clip(np.round(rng.laplace(0, half / 6, (n, g.size))), -half, half - 1)
    meta = dict(labels=rng.integers(-1, 2, n), heights=rng.integers(1, 30, n), widths=rng.integers(1, 30, n),
                psnr=rng.uniform(20, 40, n))
    return grid, codes, meta


def write_coded(path, grid, codes, meta, *, batches=(), keys=None, **kw):
    kw.setdefault("classes", ["a", "b"])
    with InrWriter(path, grid.arch, grid=grid, **kw) as w:
        bounds = [0, *batches, len(codes)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            w.add_codes(codes[lo:hi], *(np.asarray(meta[k])[lo:hi] for k in ("labels", "heights", "widths", "psnr")),
                        keys=None if keys is None else keys[lo:hi])
    return str(path)


def test_coded_writer_round_trip(tmp_path):
    grid, codes, meta = coded_inputs(7)
    rng = np.random.default_rng(1)
    prior = Prior(CODED_ARCH, {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in CODED_ARCH.shapes().items()})
    keys = ["a/1.png", "", "é.jpg", "x", "y", "z", "w"]
    path = write_coded(tmp_path / "c.inr", grid, codes, meta, batches=(2, 3), chunk_images=3, keys=keys,
                       prior=prior, metadata={"k": "v"})
    with InrFile(path) as f:
        f.verify()
        assert f.version == (2, 0) and f.coded and f.grid == grid and f.prior == prior and f.keys == keys
        assert f.num_chunks == 3 and [f.chunk_range(k) for k in range(3)] == [(0, 3), (3, 6), (6, 7)]
        assert np.array_equal(np.concatenate([f.read_codes(k) for k in range(3)]), codes)
        for field, name in (("label", "labels"), ("height", "heights"), ("width", "widths")):
            assert np.array_equal(f.index[field], meta[name])
        assert np.array_equal(f.index["psnr"], meta["psnr"].astype(np.float32))
        assert (f.index["nnz"] == CODED_ARCH.hidden_total).all() and (f.index["prune_ratio"] == 0).all()
        theta0 = f.theta0()
        values = flatten_params(f.read_images(range(7)), CODED_ARCH)
        want = grid.values_numpy(codes, theta0)
        assert np.array_equal(values.view(np.uint32), want.view(np.uint32))
        # each table spans exactly the group's used codes (FORMAT.md rule 97)
        for g, b, t in zip(param_groups(CODED_ARCH), grid.bits, f.tables):
            used = codes[:, g.offset:g.stop] + (1 << (int(b) - 1))
            assert (t.first, t.first + t.size - 1) == (used.min(), used.max())
    d = ref.decode(open(path, "rb").read())
    assert np.array_equal(d.codes, codes) and np.array_equal(d.params.view(np.uint32), want.view(np.uint32))
    # The batching leaves no trace.
    again = write_coded(tmp_path / "d.inr", grid, codes, meta, batches=(5,), chunk_images=3, keys=keys, prior=prior,
                        metadata={"k": "v"})
    assert open(again, "rb").read() == open(path, "rb").read()


def test_empty_coded_file_is_valid(tmp_path):
    """A coded file without images is valid (rules 23, 94): the reference decoder reads it."""
    grid, codes, meta = coded_inputs(0)
    path = write_coded(tmp_path / "e.inr", grid, codes, meta)
    d = ref.decode(open(path, "rb").read())
    assert d.codes.shape == (0, CODED_ARCH.params_per_image) and d.chunks == []


def test_empty_coded_file_reads_back(tmp_path):
    grid, codes, meta = coded_inputs(0)
    path = write_coded(tmp_path / "e.inr", grid, codes, meta)
    with InrFile(path) as f:
        f.verify()
        assert (f.version, f.num_images, f.num_chunks) == ((2, 0), 0, 0)
        assert len(f.read_images([]).first_w) == 0


def test_coded_writer_refuses_bad_codes_and_mixing(tmp_path):
    grid, codes, meta = coded_inputs(2)
    bad = codes.copy()
    bad[0, param_groups(CODED_ARCH)[2].offset] = 8  # 4-bit hidden_w.0: -8..7
    with pytest.raises(InrUsageError, match="hidden_w.0 is outside its 4-bit range"):
        write_coded(tmp_path / "x.inr", grid, bad, meta)
    with pytest.raises(InrUsageError, match="shape"):
        write_coded(tmp_path / "x.inr", grid, codes[:, :-1], meta)
    with InrWriter(tmp_path / "y.inr", CODED_ARCH, grid=grid) as w:
        with pytest.raises(InrUsageError, match="add_codes"):
            w.add(None, [0], [1], [1], [30.0], [0.0])
    with pytest.raises(InrUsageError, match="masks"):
        InrWriter(tmp_path / "z.inr", CODED_ARCH, grid=grid, has_masks=True)
    assert sorted(os.listdir(tmp_path)) == ["y.inr"]  # the refused calls left no file behind


def test_merge_of_two_coded_parts(tmp_path):
    grid, codes, meta = coded_inputs(7, seed=4)
    first = {k: v[:4] for k, v in meta.items()}
    second = {k: v[4:] for k, v in meta.items()}
    a = write_coded(tmp_path / "a.inr", grid, codes[:4], first, chunk_images=3, metadata={"shard": "0", "p": "x"},
                    keys=["k0", "k1", "k2", "k3"])
    b = write_coded(tmp_path / "b.inr", grid, codes[4:], second, chunk_images=2, metadata={"shard": "1"})
    out = str(tmp_path / "m.inr")
    merge_files([a, b], out, metadata={"merged": "yes"}, chunk_images=3)
    with InrFile(out) as m:
        m.verify()
        assert m.version == (2, 0) and m.grid == grid and m.num_chunks == 3
        assert np.array_equal(np.concatenate([m.read_codes(k) for k in range(3)]), codes)
        assert m.keys == ["k0", "k1", "k2", "k3", "", "", ""]
        assert m.metadata == {"shard": "1", "p": "x", "merged": "yes"}
        assert np.array_equal(m.index["label"], meta["labels"])
    # tables fitted over all the images: the same bytes as one writer given every image
    one = write_coded(tmp_path / "one.inr", grid, codes, meta, chunk_images=3,
                      metadata={"shard": "1", "p": "x", "merged": "yes"}, keys=["k0", "k1", "k2", "k3", "", "", ""])
    assert open(one, "rb").read() == open(out, "rb").read()


def test_merge_refuses_coded_parts_on_other_grids_or_formats(tmp_path):
    grid, codes, meta = coded_inputs(2)
    a = write_coded(tmp_path / "a.inr", grid, codes, meta)
    other = CodeGrid.from_widths(CODED_ARCH, {**CLASS_BITS, "hidden_w": 5}, RANGES)
    b = write_coded(tmp_path / "b.inr", other, np.clip(codes, -16, 15), meta)
    with pytest.raises(InrUsageError, match="grid"):
        merge_files([a, b], tmp_path / "m.inr")
    wb, meta1 = batch_inputs(CODED_ARCH, 2)
    c = write(str(tmp_path / "c.inr"), CODED_ARCH, wb, meta1)  # format 1.0
    with pytest.raises(InrUsageError, match="major"):
        merge_files([a, c], tmp_path / "m.inr")
    assert not os.path.exists(tmp_path / "m.inr")


def test_a_1x_only_reader_refuses_format_2(tmp_path, monkeypatch):
    """A reader that implements only major 1 refuses a 2.0 file in one line naming both versions (rule 56)."""
    grid, codes, meta = coded_inputs(2)
    path = write_coded(tmp_path / "c.inr", grid, codes, meta)
    monkeypatch.setattr(inrfmt.reader, "FORMAT_VERSIONS", {1: 1})
    monkeypatch.setattr(inrfmt.reader, "VERSION_MAJOR", 1)
    monkeypatch.setattr(inrfmt.reader, "VERSION_MINOR", 1)
    message = expect_error(path, "version", "file is format version 2.0, newer than this reader's 1.1",
                           "upgrade inrfmt")
    assert "\n" not in message


# ------------------------------------------------------------------------------------------------
# coded files the reader must refuse (rules 83, 86, 88, 94), with every checksum repaired
# ------------------------------------------------------------------------------------------------
def relaid(data: bytes, replace=None, edit_header=None) -> bytes:
    """A file's bytes with some sections' contents replaced ({name: bytes}) and every section laid out again
    in its order (aligned, zero padding), its length and CRC-32 fixed, the header (after edit_header) and the
    preamble to match: a test then reaches the checks behind the layout and the checksums."""
    pre = np.frombuffer(data[:PREAMBLE_SIZE], PREAMBLE_DTYPE)[0].copy()
    off = int(pre["header_offset"])
    header = json.loads(data[off:off + int(pre["header_length"])])
    body = bytearray(data[:PREAMBLE_SIZE])
    for s in sorted(header["sections"], key=lambda s: s["offset"]):
        content = (replace or {}).get(s["name"], data[s["offset"]:s["offset"] + s["length"]])
        body += bytes(align(len(body)) - len(body))
        s["offset"], s["length"], s["crc32"] = len(body), len(content), zlib.crc32(content)
        body += content
    body += bytes(align(len(body)) - len(body))
    if edit_header:
        edit_header(header)
    raw = json.dumps(header).encode()
    pre["header_offset"], pre["header_length"], pre["header_crc32"] = len(body), len(raw), zlib.crc32(raw)
    body[:PREAMBLE_SIZE] = pre.tobytes()
    return bytes(body) + raw


def relayout(path, replace=None, edit_header=None) -> str:
    """relaid() on the file at `path`, in place."""
    with open(path, "rb") as fh:
        data = fh.read()
    with open(path, "wb") as fh:
        fh.write(relaid(data, replace, edit_header))
    return path


def section_bytes(path, name) -> bytes:
    data, _, header = read_parts(path)
    s = section(header, name)
    return bytes(data[s["offset"]:s["offset"] + s["length"]])


def expect_refused_file(path, *fragments, read_all=False):
    """The library (InrFormatError naming the file) and the reference decoder both refuse the file."""
    expect_error(path, *fragments, read_all=read_all)
    with pytest.raises(ref.FormatError):
        ref.decode(open(path, "rb").read())


@pytest.fixture
def coded(tmp_path):
    grid, codes, meta = coded_inputs(5, seed=2)
    return write_coded(tmp_path / "c.inr", grid, codes, meta, chunk_images=3)


def _quant(i, field, value):
    def fn(rows):
        rows[field][i] = value
    return table_editor(np.dtype([("step", "<f4"), ("bits", "u1"), ("wrapped", "u1"), ("reserved", "<u2")]), fn)


@pytest.mark.parametrize("edit, fragments", [
    (_quant(0, "step", 0.0), ["quant[0]", "step"]),
    (_quant(0, "step", np.inf), ["quant[0]", "step"]),
    (_quant(2, "bits", 0), ["quant[2]", "code width 0"]),
    (_quant(2, "bits", 17), ["quant[2]", "code width 17"]),
    (_quant(0, "wrapped", 1), ["quant[0]", "only the bias of a sine layer may be wrapped"]),
    (_quant(1, "wrapped", 2), ["quant[1]", "wrapped is not 0/1"]),
    (_quant(1, "step", 0.1), ["quant[1]", "wrapped step"]),
    (_quant(3, "step", float(np.float32(2 * np.pi / (35.0 * 32)))), ["quant[3]", "wrapped step"]),  # first_w0's
    (_quant(4, "reserved", 1), ["quant[4]", "reserved"]),
])
def test_bad_quant_rows(coded, edit, fragments):
    rewrite(coded, edit_sections={"quant": edit})
    expect_refused_file(coded, *fragments)


def test_relayout_without_changes_keeps_the_file_valid(coded):
    before = open(coded, "rb").read()
    relayout(coded)
    with InrFile(coded) as f:
        f.verify()
    ref.decode(open(coded, "rb").read())
    assert len(open(coded, "rb").read()) >= len(before) - 64


@pytest.mark.parametrize("name, delta", [("quant", 8), ("quant", -8), ("chunks", 40), ("chunks", -40)])
def test_quant_and_chunks_sizes(coded, name, delta):
    content = section_bytes(coded, name)
    content = content + bytes(delta) if delta > 0 else content[:delta]
    relayout(coded, {name: content})
    expect_refused_file(coded, f"section '{name}'", "length")


def _chunks(fn):
    return table_editor(CHUNK_DTYPE, fn)


def _set_row(k, field, value):
    def fn(c):
        c[field][k] = value
    return _chunks(fn)


def _move_two_bytes(c):
    """Chunk 0 two bytes shorter, chunk 1 two longer: still back to back, but not whole words."""
    c["compressed_length"][0] -= 2
    c["compressed_length"][1] += 2
    c["offset"][1] -= 2


@pytest.mark.parametrize("edit, fragments, at_open", [
    (_set_row(0, "raw_length", 3 * CODED_ARCH.params_per_image * 2 + 2), ["chunks[0].raw_length"], True),
    (_set_row(0, "raw_length", 2 ** 31), ["chunks[0].raw_length", "exceeds"], True),
    (_set_row(1, "image_count", 3), ["chunks"], True),
    (_set_row(1, "first_image", 2), ["chunks[1].first_image"], True),
    (_set_row(1, "offset", 0), ["chunks[1].offset"], True),
    (_chunks(_move_two_bytes), ["chunks[0].compressed_length", "4-byte words"], True),
    (_set_row(1, "crc32", 12345), ["chunks[1].crc32", "checksum"], False),
])
def test_bad_chunk_table(coded, edit, fragments, at_open):
    rewrite(coded, edit_sections={"chunks": edit})
    expect_refused_file(coded, *fragments, read_all=not at_open)
    if not at_open:
        InrFile(coded).close()  # the structure is fine: a message is checked when its chunk is read


def test_tables_wider_than_their_group_are_refused(coded):
    """Rule 86 against the file's grid: hidden_w.0 (4 bits) given a table of 17 symbols."""
    with InrFile(coded) as f:
        tables, bits = list(f.tables), f.grid.bits
    tables[2] = CodeTable(0, np.ones(17, np.int64))
    assert int(bits[2]) == 4
    relayout(coded, {"tables": coding.tables_section(tables)})
    expect_refused_file(coded, "section 'tables'", "table 2", "exceed the group's 4-bit codes")


@pytest.mark.parametrize("tail, fragments", [
    (b"\x80", ["section 'tables'", "truncated"]),
    (b"\x00", ["section 'tables'", "1 bytes after the last table"]),
])
def test_tables_section_cut_or_extended(coded, tail, fragments):
    content = section_bytes(coded, "tables")
    relayout(coded, {"tables": content + tail if tail == b"\x00" else content[:-1] + tail})
    expect_refused_file(coded, *fragments)


def test_a_message_shorter_than_its_word_counts_is_refused(coded):
    """Rule 88: a message holds at least its four word counts. The library refuses an 8-byte message when
    it reads the chunk; FORMAT.md rule 95 has readers check it at open already."""
    with InrFile(coded) as f:
        rows = f.chunks.copy()
    blobs = section_bytes(coded, "blobs")
    short, rest = bytes(8), blobs[int(rows[0]["compressed_length"]):]
    rows[0]["compressed_length"], rows[0]["crc32"] = len(short), zlib.crc32(short)
    rows[1]["offset"] = len(short)
    relayout(coded, {"blobs": short + rest, "chunks": rows.tobytes()})
    expect_refused_file(coded, "chunks[0]", read_all=True)


def test_a_changed_message_is_refused_when_read(coded):
    """A message changed and its CRC-32 repaired: the file opens, reading the chunk refuses it."""
    with InrFile(coded) as f:
        rows = f.chunks.copy()
    blobs = bytearray(section_bytes(coded, "blobs"))
    blobs[20] ^= 0x10
    rows[0]["crc32"] = zlib.crc32(bytes(blobs[:int(rows[0]["compressed_length"])]))
    relayout(coded, {"blobs": bytes(blobs), "chunks": rows.tobytes()})
    with InrFile(coded) as f:
        f.read_codes(1)
        with pytest.raises(InrFormatError, match=r"chunks\[0\]: (a lane|words are left)"):
            f.read_codes(0)
        with pytest.raises(InrFormatError, match=r"chunks\[0\]"):
            f.verify()
    with pytest.raises(ref.FormatError, match="rule 9[12]"):
        ref.decode(open(coded, "rb").read())


def _index_columns(path):
    import zstandard
    return zstandard.ZstdDecompressor().decompress(section_bytes(path, "index"))


def _frame(columns, **kw):
    import zstandard
    return zstandard.ZstdCompressor(level=3, **kw).compress(columns)


def test_index_frame_round_trip_through_relayout(coded):
    relayout(coded, {"index": _frame(_index_columns(coded))})
    with InrFile(coded) as f:
        f.verify()


@pytest.mark.parametrize("make, fragments", [
    (lambda raw: _frame(raw[:-4]), ["section 'index'", "declares 56 bytes"]),
    (lambda raw: _frame(raw + bytes(4)), ["section 'index'", "declares 64 bytes"]),
    (lambda raw: _frame(raw, write_content_size=False), ["section 'index'"]),
    (lambda raw: _frame(raw) + b"\0", ["section 'index'"]),
    (lambda raw: _frame(raw) + _frame(b""), ["section 'index'"]),
    (lambda raw: raw, ["section 'index'", "zstd"]),
    (lambda raw: _frame(raw[:20] + bytes(4) + raw[24:]), ["index[0].height", "must be >= 1"]),
    (lambda raw: _frame(raw[:40] + bytes(4) + raw[44:]), ["index[0].width", "must be >= 1"]),
    (lambda raw: _frame((5).to_bytes(4, "little") + raw[4:]), ["index[0].label", "outside [-1, 1]"]),
    (lambda raw: _frame((-2).to_bytes(4, "little", signed=True) + raw[4:]), ["index[0].label"]),
])
def test_bad_index_frame(coded, make, fragments):
    relayout(coded, {"index": make(_index_columns(coded))})
    expect_refused_file(coded, *fragments)


@pytest.mark.parametrize("make, fragments", [
    (lambda raw: np.float32(np.nan).tobytes() + raw[4:], ["index[0].psnr", "not finite"]),
    (lambda raw: raw[:-4], ["section 'psnr'", "length 16"]),
    (lambda raw: raw + bytes(4), ["section 'psnr'", "length 24"]),
])
def test_bad_psnr_section(coded, make, fragments):
    """Rule 94: f32 [N], checked in size before the index frame is decompressed."""
    relayout(coded, {"psnr": make(section_bytes(coded, "psnr"))})
    expect_refused_file(coded, *fragments)


def test_missing_coded_section_and_unknown_coding(coded):
    def drop(name):
        def edit(header):
            header["sections"] = [s for s in header["sections"] if s["name"] != name]
        return edit
    for name in ("quant", "tables", "psnr"):
        path = coded + f".{name}.inr"
        open(path, "wb").write(open(coded, "rb").read())
        relayout(path, {name: b""}, drop(name))
        expect_refused_file(path, f"section '{name}'", "missing")
    rewrite(coded, lambda h: h.__setitem__("weight_coding", "rans32-p24-x1"))
    expect_refused_file(coded, "header.weight_coding", "unknown coding")


def _prior_with_header_text(prior_bytes: bytes, edit) -> bytes:
    """A prior file with its JSON header text edited (padding and CRC-32 fixed, FORMAT.md section 15)."""
    length = int.from_bytes(prior_bytes[12:16], "little")
    text = edit(prior_bytes[24:24 + length].decode("utf-8").rstrip()).encode("utf-8")
    text += b" " * (-len(text) % 4)
    pre = bytearray(prior_bytes[:24])
    pre[12:16], pre[16:20] = len(text).to_bytes(4, "little"), bytes(4)
    body = text + prior_bytes[24 + length:]
    pre[16:20] = zlib.crc32(body, zlib.crc32(bytes(pre))).to_bytes(4, "little")
    return bytes(pre) + body


PRIOR_HEADER_EDITS = {
    "repeated key": lambda text: text[:-1] + ',"name":"other"}',
    "NaN": lambda text: text[:-1] + ',"extra":NaN}',
    "no name": lambda text: text.replace('"name":"p",', "").replace(',"name":"p"', ""),
}


@pytest.fixture
def with_prior(tmp_path):
    grid, codes, meta = coded_inputs(2)
    rng = np.random.default_rng(0)
    prior = Prior(CODED_ARCH, {k: rng.normal(0, 0.1, s).astype(np.float32) for k, s in CODED_ARCH.shapes().items()},
                  name="p")
    return write_coded(tmp_path / "p.inr", grid, codes, meta, prior=prior)


@pytest.mark.parametrize("edit", list(PRIOR_HEADER_EDITS))
def test_reference_decoder_refuses_a_prior_header_breaking_rule_74(with_prior, edit):
    """Section 15 rule 74: the prior's header is JSON by rule 3 (no repeated key, no NaN) and has a `name`."""
    edited = _prior_with_header_text(section_bytes(with_prior, "prior"), PRIOR_HEADER_EDITS[edit])
    relayout(with_prior, {"prior": edited})
    with pytest.raises(ref.FormatError, match="rule (3|74)"):
        ref.decode(open(with_prior, "rb").read())


@pytest.mark.parametrize("edit", list(PRIOR_HEADER_EDITS))
def test_library_refuses_a_prior_header_breaking_rule_74(with_prior, edit):
    edited = _prior_with_header_text(section_bytes(with_prior, "prior"), PRIOR_HEADER_EDITS[edit])
    relayout(with_prior, {"prior": edited})
    expect_error(with_prior, "section 'prior'")


def test_coded_keys_are_one_bounded_zstd_frame(tmp_path):
    """Section 16, rule 81: in 2.0 `keys` is a zstd frame of the 1.1 bytes, its declared size capped by N."""
    import zstandard

    from inrfmt.spec import keys_section
    grid, codes, meta = coded_inputs(3)
    keys = ["a/x.png", "", "b/\u00e9.png"]
    path = write_coded(tmp_path / "k.inr", grid, codes, meta, keys=keys)
    with InrFile(path) as f:
        assert f.keys == keys
    assert ref.decode(open(path, "rb").read()).keys == keys
    raw = keys_section(keys)
    assert zstandard.ZstdDecompressor().decompress(section_bytes(path, "keys")) == raw
    for data, fragments in (
            (raw, ["section 'keys'", "zstd"]),  # the 1.1 bytes without a frame
            (zstandard.ZstdCompressor(write_content_size=False).compress(raw), ["section 'keys'", "declares -1"]),
            (zstandard.ZstdCompressor().compress(raw + bytes(3 * 4096 + 40)), ["section 'keys'", "at most"])):
        bad = str(tmp_path / f"bad{len(data)}.inr")
        open(bad, "wb").write(open(path, "rb").read())
        relayout(bad, {"keys": data})
        expect_refused_file(bad, *fragments)
        with pytest.raises(ref.FormatError):
            ref.decode(open(bad, "rb").read())
