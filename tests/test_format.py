"""inrfmt.reader and inrfmt.writer: write -> read roundtrips, merge, the atomic writer, and every malformed-file case."""
import importlib.util
import json
import os
import zlib

import numpy as np
import pytest
import zstandard

from inrfmt.errors import InrFormatError, InrUsageError
from inrfmt.reader import InrFile
from inrfmt.spec import (ALIGNMENT, Architecture, CHUNK_DTYPE, FLOAT_DTYPES, HIDDEN_DTYPES, INDEX_DTYPE,
                         KEY_OFFSET_DTYPE, MAGIC, MAX_HEADER_BYTES, PREAMBLE_DTYPE, PREAMBLE_SIZE, keys_section)
from inrfmt.writer import InrWriter, merge_files

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "tools", "make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def batch_inputs(arch, n, hidden_dtype="int8", prune=0.0, float_dtype="float32", seed=0):
    rng = np.random.default_rng(seed)
    wb = make_golden.random_weights(arch, n, hidden_dtype, rng, prune=prune, float_dtype=float_dtype)
    total = arch.hidden_layers * arch.width ** 2
    nnz = wb.mask.reshape(n, -1).sum(axis=1) if wb.mask is not None else np.full(n, total)
    ratio = 1.0 - nnz / total if total else np.zeros(n)
    labels = rng.integers(-1, 3, size=n)
    heights, widths = rng.integers(1, 40, size=n), rng.integers(1, 40, size=n)
    psnr = rng.uniform(15, 45, size=n)
    return wb, dict(labels=labels, heights=heights, widths=widths, psnr=psnr, prune_ratio=ratio)


def write(path, arch, wb, meta, *, batches=(None,), **kw):
    kw.setdefault("classes", ["a", "b", "c"])
    kw.setdefault("has_masks", wb.mask is not None)
    with InrWriter(path, arch, **kw) as w:
        bounds = [0] + [b for b in batches if b is not None] + [len(wb)]
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            w.add(wb.take(slice(lo, hi)), *(np.asarray(meta[k])[lo:hi] for k in
                                              ("labels", "heights", "widths", "psnr", "prune_ratio")))
    return path


def assert_batches_equal(got, want, float_dtype="float32"):
    tol = 0 if float_dtype == "float32" else 1e-3
    for name in ("first_w", "first_b", "hidden_b", "last_w", "last_b"):
        np.testing.assert_allclose(getattr(got, name), getattr(want, name), atol=tol, rtol=tol, err_msg=name)
        assert getattr(got, name).dtype == np.float32
    assert got.hidden_w.dtype == want.hidden_w.dtype
    assert np.array_equal(got.hidden_w, want.hidden_w)
    assert np.array_equal(got.hidden_scale, want.hidden_scale)
    if want.mask is not None:
        assert np.array_equal(got.mask, want.mask)


ARCH = Architecture(3, 6)


@pytest.fixture
def valid(tmp_path):
    """A small valid file: int8, masks, 5 images in chunks of 2."""
    wb, meta = batch_inputs(ARCH, 5, prune=0.3)
    return write(str(tmp_path / "valid.inr"), ARCH, wb, meta, chunk_images=2, metadata={"k": "v"})


def read_parts(path):
    data = bytearray(open(path, "rb").read())
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE)[0]
    off, length = int(pre["header_offset"]), int(pre["header_length"])
    return data, off, json.loads(bytes(data[off:off + length]))


def rewrite(path, edit_header=None, edit_sections=None, fix_crc=True):
    """Re-emit a file with its header edited (JSON, CRC and preamble fixed up) and/or section bytes edited
    in place (their CRCs fixed), so that tests reach the checks behind the checksums."""
    data, off, header = read_parts(path)
    sections = {s["name"]: s for s in header["sections"]}
    for name, fn in (edit_sections or {}).items():
        s = sections[name]
        body = bytearray(data[s["offset"]:s["offset"] + s["length"]])
        fn(body)
        assert len(body) == s["length"]
        data[s["offset"]:s["offset"] + s["length"]] = body
        if fix_crc:
            s["crc32"] = zlib.crc32(bytes(body))
    if edit_header:
        edit_header(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"] = len(raw)
    pre["header_crc32"] = zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    with open(path, "wb") as fh:
        fh.write(data)
    return path


def table_editor(dtype, fn):
    def edit(body):
        arr = np.frombuffer(bytes(body), dtype).copy()
        fn(arr)
        body[:] = arr.tobytes()
    return edit


def section(header, name):
    return next(s for s in header["sections"] if s["name"] == name)


def expect_error(path, *fragments, read_all=False):
    with pytest.raises(InrFormatError) as info:
        with InrFile(path) as f:
            if read_all:
                for k in range(f.num_chunks):
                    f.read_chunk(k)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ------------------------------------------------------------------------------------------------
# roundtrips
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hidden_dtype", HIDDEN_DTYPES)
@pytest.mark.parametrize("float_dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("prune", [0.0, 0.4])
def test_roundtrip_all_dtypes(tmp_path, hidden_dtype, float_dtype, prune):
    arch = Architecture(3, 5, w0=25.0, first_w0=35.0)
    wb, meta = batch_inputs(arch, 7, hidden_dtype, prune, float_dtype)
    path = write(str(tmp_path / "x.inr"), arch, wb, meta, batches=(2, 3), chunk_images=3,
                 hidden_dtype=hidden_dtype, float_dtype=float_dtype, metadata={"preset": "fast", "ünï": "cödé"})
    with InrFile(path) as f:
        f.verify()
        assert f.version == (1, 0)
        assert f.arch == arch
        assert (f.hidden_dtype, f.float_dtype, f.has_masks) == (hidden_dtype, float_dtype, prune > 0)
        assert f.num_images == 7 and f.num_chunks == 3
        assert [f.chunk_range(k) for k in range(3)] == [(0, 3), (3, 6), (6, 7)]
        assert f.classes == ["a", "b", "c"] and f.metadata == {"preset": "fast", "ünï": "cödé"}
        assert f.index.dtype == INDEX_DTYPE and not f.index.flags.writeable
        assert np.array_equal(f.index["label"], meta["labels"])
        assert np.array_equal(f.index["height"], meta["heights"])
        assert np.array_equal(f.index["width"], meta["widths"])
        np.testing.assert_allclose(f.index["psnr"], meta["psnr"], rtol=1e-6)
        np.testing.assert_allclose(f.index["prune_ratio"], meta["prune_ratio"], atol=1e-6)
        assert np.array_equal(f.index["chunk"], [0, 0, 0, 1, 1, 1, 2])
        assert_batches_equal(f.read_images(range(7)), wb, float_dtype)
        assert_batches_equal(f.read_chunk(1), wb.take(slice(3, 6)), float_dtype)
        if prune == 0:
            assert f.read_chunk(0).mask is None
        sizes = f.section_sizes
        assert sum(sizes.values()) == f.file_bytes == os.path.getsize(path)


def test_read_images_any_order_and_bounds(valid):
    with InrFile(valid) as f:
        everything = f.read_images(np.arange(5))
        picked = f.read_images([4, 0, 2, 2])
        assert_batches_equal(picked, everything.take([4, 0, 2, 2]))
        assert len(f.read_images([])) == 0
        with pytest.raises(IndexError):
            f.read_images([5])
        with pytest.raises(IndexError):
            f.read_chunk(3)


def test_zero_hidden_layers_and_empty_file(tmp_path):
    arch = Architecture(1, 4)
    wb, meta = batch_inputs(arch, 1)
    path = write(str(tmp_path / "one.inr"), arch, wb, meta, has_masks=True)
    with InrFile(path) as f:
        f.verify()
        got = f.read_chunk(0)
        assert got.hidden_w.shape == (1, 0, 4, 4) and got.mask.shape == (1, 0, 4, 4)
        assert f.index["prune_ratio"][0] == 0 and f.index["nnz"][0] == 0
    empty = str(tmp_path / "empty.inr")
    with InrWriter(empty, ARCH, classes=["x"]):
        pass
    with InrFile(empty) as f:
        f.verify()
        assert f.num_images == 0 and f.num_chunks == 0 and len(f.index) == 0
        assert f.scales.shape == (0, 2)
        assert len(f.read_images([])) == 0


def test_writer_is_deterministic_whatever_the_batching(tmp_path):
    wb, meta = batch_inputs(ARCH, 9, prune=0.2)
    a = write(str(tmp_path / "a.inr"), ARCH, wb, meta, chunk_images=4)
    b = write(str(tmp_path / "b.inr"), ARCH, wb, meta, batches=(1, 2, 7), chunk_images=4)
    assert open(a, "rb").read() == open(b, "rb").read()


def test_file_layout_matches_spec(valid):
    """Preamble fields, 64-byte alignment, header last: the bytes FORMAT.md describes."""
    data, off, header = read_parts(valid)
    assert bytes(data[:8]) == MAGIC == b"\x89INR\r\n\x1a\n"
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE)[0]
    assert (int(pre["major"]), int(pre["minor"])) == (1, 0)
    assert off % ALIGNMENT == 0 and off + int(pre["header_length"]) == len(data)
    assert zlib.crc32(bytes(data[off:])) == int(pre["header_crc32"])
    assert not any(data[32:64])
    assert [s["name"] for s in header["sections"]] == ["blobs", "index", "scales", "chunks", "classes", "metadata"]
    for s in header["sections"]:
        assert s["offset"] % ALIGNMENT == 0
        assert zlib.crc32(bytes(data[s["offset"]:s["offset"] + s["length"]])) == s["crc32"]
    assert header["architecture"]["coordinates"] and header["architecture"]["output_layer"] == "linear"


def test_chunks_are_plain_zstd_frames(valid):
    """A chunk is one zstd frame of exactly raw_length bytes: struct-of-arrays floats, masks, values."""
    data, _, header = read_parts(valid)
    blobs = section(header, "blobs")
    chunks = np.frombuffer(bytes(data[section(header, "chunks")["offset"]:][:section(header, "chunks")["length"]]),
                           CHUNK_DTYPE)
    with InrFile(valid) as f:
        for k, row in enumerate(chunks):
            start = blobs["offset"] + int(row["offset"])
            raw = zstandard.ZstdDecompressor().decompress(bytes(data[start:start + int(row["compressed_length"])]))
            assert len(raw) == int(row["raw_length"])
            n, w, h = int(row["image_count"]), ARCH.width, ARCH.hidden_layers
            first_w = np.frombuffer(raw, "<f4", count=n * w * 2).reshape(n, w, 2)
            assert np.array_equal(first_w, f.read_chunk(k).first_w)


# ------------------------------------------------------------------------------------------------
# merge
# ------------------------------------------------------------------------------------------------
def test_merge_chunks_like_one_writer_whatever_the_parts(tmp_path):
    wb, meta = batch_inputs(ARCH, 7, prune=0.25)
    first = {k: v[:4] for k, v in meta.items()}
    second = {k: v[4:] for k, v in meta.items()}
    a = write(str(tmp_path / "a.inr"), ARCH, wb.take(slice(0, 4)), first, chunk_images=3,
              metadata={"shard": "0", "preset": "fast"})
    b = write(str(tmp_path / "b.inr"), ARCH, wb.take(slice(4, 7)), second, chunk_images=2,
              metadata={"shard": "1"})
    out = str(tmp_path / "m.inr")
    merge_files([a, b], out, metadata={"merged": "yes"}, chunk_images=3)
    with InrFile(out) as m, InrFile(a) as fa, InrFile(b) as fb:
        m.verify()
        assert m.num_images == 7 and m.num_chunks == 3
        assert [m.chunk_range(k) for k in range(3)] == [(0, 3), (3, 6), (6, 7)]
        assert np.array_equal(m.index["chunk"], [0, 0, 0, 1, 1, 1, 2])
        for field in ("label", "height", "width", "psnr", "prune_ratio", "nnz"):
            assert np.array_equal(m.index[field], np.concatenate([fa.index[field], fb.index[field]]))
        assert_batches_equal(m.read_images(range(7)), wb)
        assert m.metadata == {"shard": "1", "preset": "fast", "merged": "yes"}
        assert m.read_chunk_frame(0)[0] == fa.read_chunk_frame(0)[0]  # a chunk on the grid is copied
    # The same images written in one go give the same bytes: the split into parts leaves no trace.
    one = write(str(tmp_path / "one.inr"), ARCH, wb, meta, chunk_images=3,
                metadata={"shard": "1", "preset": "fast", "merged": "yes"})
    assert open(one, "rb").read() == open(out, "rb").read()


# ------------------------------------------------------------------------------------------------
# source keys: the optional section of format 1.1
# ------------------------------------------------------------------------------------------------
KEYS = ["cls/a.jpg", "cls/sub/é b.png", "", "shard-000.tar/000042.jpg", "data_batch_1#7"]


@pytest.fixture
def keyed(tmp_path):
    """The `valid` file's images with source keys (so version 1.1)."""
    wb, meta = batch_inputs(ARCH, 5, prune=0.3)
    path = str(tmp_path / "keyed.inr")
    with InrWriter(path, ARCH, classes=["a", "b", "c"], has_masks=True, chunk_images=2) as w:
        w.add(wb.take(slice(0, 3)), *(np.asarray(meta[k])[:3] for k in ("labels", "heights", "widths", "psnr",
                                                                          "prune_ratio")), keys=KEYS[:3])
        w.add(wb.take(slice(3, 5)), *(np.asarray(meta[k])[3:] for k in ("labels", "heights", "widths", "psnr",
                                                                          "prune_ratio")), keys=KEYS[3:])
    return path


def test_keys_make_a_1_1_file_and_read_back(keyed, valid):
    with InrFile(keyed) as f:
        assert f.version == (1, 1) and f.keys == KEYS and f.optional_sections == ["keys"]
        f.verify()
    with InrFile(valid) as f:  # without keys the writer still writes 1.0
        assert f.version == (1, 0) and f.keys is None and f.optional_sections == []
    _, _, header = read_parts(keyed)
    body = open(keyed, "rb").read()[section(header, "keys")["offset"]:][:section(header, "keys")["length"]]
    assert body == keys_section(KEYS)
    offsets = np.frombuffer(body, KEY_OFFSET_DTYPE, count=6)
    assert offsets[0] == 0 and body[48 + offsets[1]:48 + offsets[2]].decode() == KEYS[1]


def test_keys_for_some_batches_only_are_refused(tmp_path):
    wb, meta = batch_inputs(ARCH, 2)
    args = lambda lo, hi: [np.asarray(meta[k])[lo:hi] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")]
    with pytest.raises(InrUsageError, match="keys"):
        with InrWriter(str(tmp_path / "k.inr"), ARCH, classes=["a", "b", "c"]) as w:
            w.add(wb.take(slice(0, 1)), *args(0, 1), keys=["x"])
            w.add(wb.take(slice(1, 2)), *args(1, 2))
    with pytest.raises(InrUsageError, match="keys must be 2 strings"):
        with InrWriter(str(tmp_path / "k.inr"), ARCH, classes=["a", "b", "c"]) as w:
            w.add(wb, *args(0, 2), keys=["only one"])
    assert not (tmp_path / "k.inr").exists()


def test_merge_carries_keys(keyed, valid, tmp_path):
    out = str(tmp_path / "m.inr")
    merge_files([keyed, valid], out, chunk_images=4)
    with InrFile(out) as m:
        assert m.version == (1, 1) and m.keys == KEYS + [""] * 5  # a part without keys: empty keys
    merge_files([valid, valid], out + "2")
    with InrFile(out + "2") as m:
        assert m.version == (1, 0) and m.keys is None


def _keys_editor(fn):
    return {"keys": lambda body: fn(body)}


def _set_offset(i, value):
    def edit(body):
        body[8 * i:8 * i + 8] = int(value).to_bytes(8, "little")
    return edit


def _replace_text(old: bytes, new: bytes):
    def edit(body):
        start = body.index(old)
        body[start:start + len(old)] = new
    return edit


@pytest.mark.parametrize("edit, fragments", [
    (_set_offset(0, 1), ("section 'keys'", "offsets[0]")),
    (_set_offset(2, 3), ("section 'keys' offsets[2]", "less than offsets[1]")),
    (_set_offset(5, 10 ** 6), ("section 'keys'", "offsets[5]", "bytes of text")),
    (_replace_text("é".encode(), b"\xff\xfe"), ("section 'keys'", "UTF-8")),
    (_set_offset(2, 9 + 9), ("section 'keys'", "splits a UTF-8 character")),
])
def test_bad_keys_section(keyed, edit, fragments):
    rewrite(keyed, edit_sections={"keys": edit})
    expect_error(keyed, *fragments)


def test_keys_section_checksum(keyed):
    bad = rewrite(keyed, edit_sections={"keys": lambda b: b.__setitem__(-1, b[-1] ^ 1)}, fix_crc=False)
    expect_error(bad, "section 'keys'", "checksum mismatch")


def test_keys_section_shorter_than_its_table(tmp_path, monkeypatch):
    import inrfmt.writer as writer_module

    monkeypatch.setattr(writer_module, "keys_section", lambda keys: bytes(8))  # one offset for 3 images
    wb, meta = batch_inputs(ARCH, 3)
    path = str(tmp_path / "short.inr")
    with InrWriter(path, ARCH, classes=["a", "b", "c"]) as w:
        w.add(wb, *(meta[k] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")), keys=["a", "b", "c"])
    expect_error(path, "section 'keys'", "shorter than its offset table")


def test_a_keys_section_in_a_1_0_file_is_an_unknown_section(keyed):
    data = bytearray(open(keyed, "rb").read())
    data[10:12] = (0).to_bytes(2, "little")  # the same bytes labelled 1.0: `keys` is not defined there
    open(keyed, "wb").write(data)
    rewrite(keyed, edit_sections={"keys": _set_offset(0, 99)})  # even a broken one
    with InrFile(keyed) as f:
        assert f.version == (1, 0) and f.keys is None and f.optional_sections == []
        f.verify()


def test_merge_refuses_incompatible_parts(tmp_path):
    wb, meta = batch_inputs(ARCH, 2)
    a = write(str(tmp_path / "a.inr"), ARCH, wb, meta)
    b = write(str(tmp_path / "b.inr"), ARCH, wb, meta, classes=["x", "y", "z"])
    c = write(str(tmp_path / "c.inr"), ARCH, wb, meta, float_dtype="float16")
    out = tmp_path / "m.inr"
    with pytest.raises(InrUsageError, match="classes"):
        merge_files([a, b], out)
    with pytest.raises(InrUsageError, match="float_dtype"):
        merge_files([a, c], out)
    other = Architecture(3, 7)
    wb7, meta7 = batch_inputs(other, 2)
    d = write(str(tmp_path / "d.inr"), other, wb7, meta7)
    with pytest.raises(InrUsageError, match="arch"):
        merge_files([a, d], out)
    with pytest.raises(InrUsageError):
        merge_files([], out)
    assert sorted(os.listdir(tmp_path)) == ["a.inr", "b.inr", "c.inr", "d.inr"]


def test_merge_refuses_a_corrupt_chunk(valid, tmp_path):
    data, _, header = read_parts(valid)
    pos = section(header, "blobs")["offset"] + 5
    data[pos] ^= 0xFF
    open(valid, "wb").write(data)
    with pytest.raises(InrFormatError, match="crc32"):
        merge_files([valid], tmp_path / "m.inr")
    assert not os.path.exists(tmp_path / "m.inr")


# ------------------------------------------------------------------------------------------------
# the atomic writer and its input checks
# ------------------------------------------------------------------------------------------------
def test_exception_mid_write_leaves_nothing(tmp_path):
    wb, meta = batch_inputs(ARCH, 4)
    out = tmp_path / "out.inr"
    with pytest.raises(RuntimeError):
        with InrWriter(out, ARCH, chunk_images=1) as w:
            w.add(wb.take(slice(0, 3)), meta["labels"][:3], 4, 4, 30.0, 0.0)
            raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


def test_failed_write_keeps_the_existing_file(tmp_path):
    out = tmp_path / "out.inr"
    out.write_bytes(b"previous")
    wb, meta = batch_inputs(ARCH, 2)
    with pytest.raises(InrUsageError):
        with InrWriter(out, ARCH) as w:
            w.add(wb, [0, 1], 4, 4, 30.0, 0.5)  # prune ratio without a mask
    assert out.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.inr"]


def test_abort_and_unclosed_writer_leave_no_temp(tmp_path):
    wb, meta = batch_inputs(ARCH, 2)
    w = InrWriter(tmp_path / "a.inr", ARCH)
    w.add(wb, [0, 1], 4, 4, 30.0, 0.0)
    assert len(os.listdir(tmp_path)) == 1 and os.listdir(tmp_path)[0].endswith(".tmp")
    w.abort()
    assert os.listdir(tmp_path) == []
    w = InrWriter(tmp_path / "b.inr", ARCH)
    del w
    assert os.listdir(tmp_path) == []


def test_written_file_has_normal_permissions(tmp_path):
    wb, meta = batch_inputs(ARCH, 1)
    path = write(str(tmp_path / "p.inr"), ARCH, wb, meta)
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("change, message", [
    (lambda wb, m: wb.__setattr__("first_w", wb.first_w[:, :3]), "first_w must be a numpy array of shape"),
    (lambda wb, m: wb.__setattr__("hidden_w", wb.hidden_w.astype(np.float32)), "hidden_w must be int8"),
    (lambda wb, m: wb.__setattr__("hidden_scale", wb.hidden_scale * np.nan), "hidden_scale must be finite"),
    (lambda wb, m: m.__setitem__("labels", [0, 7]), "labels value 7 is outside [-1, 2]"),
    (lambda wb, m: m.__setitem__("heights", [0, 3]), "heights value 0"),
    (lambda wb, m: m.__setitem__("widths", [1, 2, 3]), "widths must have length 2"),
    (lambda wb, m: m.__setitem__("psnr", [np.inf, 3]), "psnr must be finite"),
    (lambda wb, m: m.__setitem__("prune_ratio", [0.9, 0.9]), "prune_ratio[0] = 0.9 disagrees with the mask"),
    (lambda wb, m: wb.hidden_w.__setitem__((0, 0, 0, 0), 5) if not wb.mask[0, 0, 0, 0]
     else wb.mask.__setitem__((0, 0, 0, 0), False), "zero where mask is False"),
])
def test_writer_rejects_bad_input(tmp_path, change, message):
    wb, meta = batch_inputs(ARCH, 2, prune=0.3)
    meta = {k: list(v) for k, v in meta.items()}
    change(wb, meta)
    with pytest.raises(InrUsageError) as info:
        with InrWriter(tmp_path / "bad.inr", ARCH, has_masks=True, classes=["a", "b", "c"]) as w:
            w.add(wb, *(meta[k] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")))
    assert message in str(info.value)
    assert os.listdir(tmp_path) == []


def test_writer_rejects_bad_arguments(tmp_path):
    with pytest.raises(InrUsageError, match="hidden_dtype"):
        InrWriter(tmp_path / "x.inr", ARCH, hidden_dtype="int4")
    with pytest.raises(InrUsageError, match="float_dtype"):
        InrWriter(tmp_path / "x.inr", ARCH, float_dtype="bfloat16")
    with pytest.raises(InrUsageError, match="chunk_images"):
        InrWriter(tmp_path / "x.inr", ARCH, chunk_images=0)
    with pytest.raises(InrUsageError, match="metadata"):
        InrWriter(tmp_path / "x.inr", ARCH, metadata={"n": 3})
    with pytest.raises(InrUsageError, match="sine_layers"):
        Architecture(0, 8)
    with pytest.raises(InrUsageError, match="w0"):
        Architecture(2, 8, w0=float("nan"))
    assert os.listdir(tmp_path) == []


def test_float_hidden_requires_unit_scale(tmp_path):
    wb, meta = batch_inputs(ARCH, 2, "float16")
    wb.hidden_scale = wb.hidden_scale * 2
    with pytest.raises(InrUsageError, match="hidden_scale must be 1.0"):
        write(str(tmp_path / "x.inr"), ARCH, wb, meta, hidden_dtype="float16")


# ------------------------------------------------------------------------------------------------
# malformed files: every one raises InrFormatError naming file, field and value
# ------------------------------------------------------------------------------------------------
def test_not_found_and_not_a_file(tmp_path):
    expect_error(tmp_path / "missing.inr", "cannot open")
    expect_error(tmp_path, "cannot open")


def test_bad_magic(valid):
    data = bytearray(open(valid, "rb").read())
    data[:8] = b"PK\x03\x04abcd"
    open(valid, "wb").write(data)
    expect_error(valid, "magic", "not an .inr file")


def test_empty_and_tiny_files(tmp_path):
    empty = tmp_path / "empty.inr"
    empty.write_bytes(b"")
    expect_error(empty, "truncated")
    tiny = tmp_path / "tiny.inr"
    tiny.write_bytes(MAGIC + b"\x01\x00")
    expect_error(tiny, "truncated", "preamble")
    other = tmp_path / "other.inr"
    other.write_bytes(b"hello world, not an inr")
    expect_error(other, "magic")


def test_newer_major_is_refused_naming_both_versions(valid):
    data = bytearray(open(valid, "rb").read())
    data[8:10] = (3).to_bytes(2, "little")
    data[10:12] = (3).to_bytes(2, "little")
    open(valid, "wb").write(data)
    expect_error(valid, "version", "3.3", "2.0", "newer", "upgrade")


def test_major_zero_is_refused(valid):
    data = bytearray(open(valid, "rb").read())
    data[8:10] = bytes(2)
    open(valid, "wb").write(data)
    expect_error(valid, "version", "0.0")


def test_newer_minor_is_accepted_with_unknown_keys_and_sections(valid):
    data = bytearray(open(valid, "rb").read())
    data[10:12] = (7).to_bytes(2, "little")
    data[40] = 1  # a newer minor may use reserved preamble bytes
    open(valid, "wb").write(data)

    def add_extension(header):
        header["future_field"] = {"anything": [1, 2]}
        header["architecture"]["future_arch_field"] = True
    rewrite(valid, add_extension)
    with InrFile(valid) as f:
        assert f.version == (1, 7)
        f.verify()


def test_reserved_preamble_bytes_must_be_zero_in_1_0(valid):
    data = bytearray(open(valid, "rb").read())
    data[40] = 1
    open(valid, "wb").write(data)
    expect_error(valid, "reserved")


@pytest.mark.parametrize("cut", [PREAMBLE_SIZE, 100, -300, -1])
def test_truncated_file(valid, cut):
    data = open(valid, "rb").read()
    open(valid, "wb").write(data[:cut])
    expect_error(valid, "truncated")


def test_trailing_bytes(valid):
    with open(valid, "ab") as fh:
        fh.write(b"\0" * 10)
    expect_error(valid, "unaccounted bytes after the header")


def test_header_over_cap(valid):
    data = bytearray(open(valid, "rb").read())
    data[24:32] = (MAX_HEADER_BYTES + 1).to_bytes(8, "little")
    open(valid, "wb").write(data)
    expect_error(valid, "header_length", str(MAX_HEADER_BYTES + 1), "cap")


def test_header_offset_out_of_bounds_or_misaligned(valid):
    data = bytearray(open(valid, "rb").read())
    good = bytes(data[16:24])
    data[16:24] = (10 ** 12).to_bytes(8, "little")
    open(valid, "wb").write(data)
    expect_error(valid, "truncated", "header")
    data[16:24] = (int.from_bytes(good, "little") + 3).to_bytes(8, "little")
    open(valid, "wb").write(data)
    expect_error(valid, "header_offset", "multiple of 64")


def test_header_checksum_mismatch(valid):
    data = bytearray(open(valid, "rb").read())
    data[-3] ^= 0x01
    open(valid, "wb").write(data)
    expect_error(valid, "header_crc32", "checksum mismatch")


def test_unparsable_header(valid):
    data, off, _ = read_parts(valid)
    raw = b'{"format": "inr", oops' + b" " * 3
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    open(valid, "wb").write(data)
    expect_error(valid, "header", "not valid UTF-8 JSON")


def test_header_not_utf8(valid):
    data, off, _ = read_parts(valid)
    raw = b'{"format": "\xff\xfe"}'
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    open(valid, "wb").write(data)
    expect_error(valid, "header", "UTF-8")


def _set(path, value):
    def edit(header):
        obj = header
        for key in path[:-1]:
            obj = obj[key]
        if value is KeyError:
            del obj[path[-1]]
        else:
            obj[path[-1]] = value
    return edit


@pytest.mark.parametrize("path, value, fragments", [
    (("format",), "png", ("header.format", "'png'")),
    (("num_images",), KeyError, ("header.num_images", "missing")),
    (("num_images",), True, ("header.num_images", "must be int", "True")),
    (("num_images",), "5", ("header.num_images", "must be int", "'5'")),
    (("num_images",), 6, ("section 'index'", "num_images=6")),
    (("num_images",), -1, ("header.num_images", "-1")),
    (("num_chunks",), 2, ("section 'chunks'", "length")),
    (("hidden_dtype",), "int4", ("header.hidden_dtype", "unknown dtype", "'int4'")),
    (("float_dtype",), "bfloat16", ("header.float_dtype", "'bfloat16'")),
    (("has_masks",), 1, ("header.has_masks", "must be bool")),
    (("architecture",), KeyError, ("header.architecture", "missing")),
    (("architecture", "width"), "8", ("header.architecture.width", "must be int")),
    (("architecture", "width"), 7, ("index[0].prune_ratio", "of 98")),
    (("architecture", "width"), 10 ** 6, ("header.architecture.width", "1000000")),
    (("architecture", "sine_layers"), 0, ("header.architecture.sine_layers", "0")),
    (("architecture", "sine_layers"), 4, ("section 'scales'", "length")),
    (("architecture", "w0"), -30.0, ("header.architecture.w0", "-30.0")),
    (("architecture", "out_features"), 4, ("header.architecture.out_features", "4")),
    (("architecture", "coordinates"), "corners", ("header.architecture.coordinates", "'corners'")),
    (("architecture", "output_layer"), "sine", ("header.architecture.output_layer", "'sine'")),
    (("architecture", "output_mapping"), "o", ("header.architecture.output_mapping",)),
    (("sections",), {}, ("header.sections", "must be list")),
    (("sections", 0), "blobs", ("header.sections[0]", "must be an object")),
    (("sections", 1, "offset"), KeyError, ("header.sections[1].offset", "missing")),
    (("sections", 1, "crc32"), 2 ** 32, ("section 'index'", "crc32")),
    (("sections", 1, "name"), "blobs", ("duplicate section", "'blobs'")),
    (("sections", 1, "name"), "indices", ("section 'index'", "missing")),
])
def test_bad_header_fields(valid, path, value, fragments):
    rewrite(valid, _set(path, value))
    expect_error(valid, *fragments)


def test_header_is_not_an_object(valid):
    data, off, _ = read_parts(valid)
    raw = b"[1, 2, 3]"
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    open(valid, "wb").write(data)
    expect_error(valid, "header", "must be a JSON object", "list")


def test_nan_in_header_is_refused(valid):
    data, off, header = read_parts(valid)
    raw = json.dumps(header).replace('"w0": 30.0', '"w0": NaN').encode()
    assert b"NaN" in raw
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    open(valid, "wb").write(data)
    expect_error(valid, "header", "NaN")


def test_section_out_of_bounds(valid):
    rewrite(valid, lambda h: section(h, "metadata").__setitem__("length", 10 ** 9))
    expect_error(valid, "section 'metadata'", "out of bounds", "1000000000")


def test_section_misaligned(valid):
    rewrite(valid, lambda h: section(h, "scales").__setitem__("offset", section(h, "scales")["offset"] + 4))
    expect_error(valid, "section 'scales'", "not a multiple of 64")


def test_sections_overlap(valid):
    def edit(h):
        section(h, "scales")["offset"] = section(h, "index")["offset"]
    rewrite(valid, edit)
    expect_error(valid, "overlaps")


def test_unaccounted_gap_between_sections(valid):
    rewrite(valid, lambda h: section(h, "index").__setitem__("length", section(h, "index")["length"] - 64))
    expect_error(valid, "unaccounted bytes")


def test_nonzero_padding(valid):
    data, _, header = read_parts(valid)
    blobs = section(header, "blobs")
    end = blobs["offset"] + blobs["length"]
    assert end % ALIGNMENT, "the fixture's blobs must end off a 64-byte boundary"
    data[end] = 7
    open(valid, "wb").write(data)
    expect_error(valid, "padding", "not zero")


@pytest.mark.parametrize("name", ["index", "scales", "chunks", "classes", "metadata"])
def test_section_checksum_mismatch(valid, name):
    rewrite(valid, edit_sections={name: lambda b: b.__setitem__(0, b[0] ^ 0x40)}, fix_crc=False)
    expect_error(valid, f"section '{name}'", "checksum mismatch")


def test_blob_corruption_found_at_read_and_by_verify(valid):
    data, _, header = read_parts(valid)
    data[section(header, "blobs")["offset"] + 3] ^= 0x10
    open(valid, "wb").write(data)
    with InrFile(valid) as f:  # opening reads no chunk
        with pytest.raises(InrFormatError, match=r"chunks\[0\].crc32.*checksum mismatch"):
            f.read_chunk(0)
        with pytest.raises(InrFormatError, match="blobs"):
            f.verify()
        f.read_chunk(1)


@pytest.mark.parametrize("name, value", [("classes", b'{"a": 1}'), ("metadata", b'{"a": 1}'),
                                         ("classes", b'[1, 2]'), ("metadata", b"\xff\xfe"),
                                         ("classes", b"[oops")])
def test_bad_json_sections(valid, name, value):
    def edit(body):
        body[:] = (value + b" " * len(body))[:len(body)]
    rewrite(valid, edit_sections={name: edit})
    expect_error(valid, f"section '{name}'")


def _index(fn):
    return {"index": table_editor(INDEX_DTYPE, fn)}


def _chunks(fn):
    return {"chunks": table_editor(CHUNK_DTYPE, fn)}


@pytest.mark.parametrize("edit, fragments", [
    (_index(lambda a: a["label"].__setitem__(1, 3)), ("index[1].label", "3", "3 classes")),
    (_index(lambda a: a["label"].__setitem__(0, -2)), ("index[0].label", "-2")),
    (_index(lambda a: a["height"].__setitem__(2, 0)), ("index[2].height", "0")),
    (_index(lambda a: a["psnr"].__setitem__(2, np.nan)), ("index[2].psnr", "nan")),
    (_index(lambda a: a["chunk"].__setitem__(2, 0)), ("index[2].chunk", "chunk 1")),
    (_index(lambda a: a["nnz"].__setitem__(0, 10 ** 6)), ("index[0].nnz", "1000000")),
    (_index(lambda a: a["prune_ratio"].__setitem__(3, 0.5)), ("index[3].prune_ratio", "0.5")),
    (_index(lambda a: a["value_start"].__setitem__(1, 0)), ("index[1].value_start", "expected")),
    (_index(lambda a: (a["nnz"].__setitem__(0, a["nnz"][0] - 1),
                       a["prune_ratio"].__setitem__(0, 1 - (a["nnz"][0]) / 72),
                       a["value_start"].__setitem__(1, a["value_start"][1] - 1))),
     ("chunks[0].raw_length",)),
    (_chunks(lambda a: a["image_count"].__setitem__(1, 0)), ("chunks[1].image_count", "0")),
    (_chunks(lambda a: a["first_image"].__setitem__(1, 3)), ("chunks[1].first_image", "3", "expected 2")),
    (_chunks(lambda a: a["image_count"].__setitem__(2, 2)), ("chunks", "cover 6 images", "num_images is 5")),
    (_chunks(lambda a: a["offset"].__setitem__(1, 0)), ("chunks[1].offset", "expected")),
    (_chunks(lambda a: a["compressed_length"].__setitem__(0, 10 ** 12)), ("chunks[0].compressed_length",)),
    (_chunks(lambda a: a["compressed_length"].__setitem__(2, a["compressed_length"][2] - 1)),
     ("frames total",)),
    (_chunks(lambda a: a["raw_length"].__setitem__(0, a["raw_length"][0] + 1)), ("chunks[0].raw_length",)),
    (_chunks(lambda a: a["raw_length"].__setitem__(0, 2 ** 40)), ("chunks[0].raw_length", "exceeds")),
])
def test_inconsistent_tables(valid, edit, fragments):
    rewrite(valid, edit_sections=edit)
    expect_error(valid, *fragments)


def test_scales_must_be_valid(tmp_path):
    wb, meta = batch_inputs(ARCH, 2)
    path = write(str(tmp_path / "i8.inr"), ARCH, wb, meta)
    rewrite(path, edit_sections={"scales": table_editor("<f4", lambda a: a.__setitem__(3, -1.0))})
    expect_error(path, "scales[1, 1]", "-1.0")
    wb, meta = batch_inputs(ARCH, 2, "float32")
    path = write(str(tmp_path / "f32.inr"), ARCH, wb, meta, hidden_dtype="float32")
    rewrite(path, edit_sections={"scales": table_editor("<f4", lambda a: a.__setitem__(0, 0.5))})
    expect_error(path, "scales[0, 0]", "1.0 for hidden_dtype float32")


class _TamperingCompressor:
    """Stands in for the writer's zstd compressor to produce frames the format forbids (with valid CRCs)."""

    def __init__(self, tamper):
        self.tamper = tamper

    def compress(self, raw):
        return self.tamper(raw)


@pytest.mark.parametrize("tamper, fragments", [
    (lambda raw: zstandard.ZstdCompressor().compress(raw + b"x"), ("zstd frame declares",)),
    (lambda raw: zstandard.ZstdCompressor(write_content_size=False).compress(raw), ("zstd frame declares",)),
    (lambda raw: zstandard.ZstdCompressor().compress(raw) + b"junk", ("unused data",)),
    (lambda raw: b"\x00" * 16, ("not a zstd frame",)),
    (lambda raw: zstandard.ZstdCompressor().compress(raw)[:-4], ("zstd",)),
])
def test_bad_frames_found_at_read(tmp_path, tamper, fragments):
    wb, meta = batch_inputs(ARCH, 3, prune=0.3)
    path = str(tmp_path / "t.inr")
    with InrWriter(path, ARCH, has_masks=True, classes=["a", "b", "c"]) as w:
        w._cctx = _TamperingCompressor(tamper)
        w.add(wb, *(meta[k] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")))
    with InrFile(path) as f:
        with pytest.raises(InrFormatError) as info:
            f.read_chunk(0)
        for fragment in fragments:
            assert fragment in str(info.value)
        assert path in str(info.value) and "chunks[0]" in str(info.value)


def _mask_offset(n):
    w, h = ARCH.width, ARCH.hidden_layers
    return 4 * n * (w * 2 + w + h * w + 3 * w + 3)


def test_mask_disagreeing_with_nnz(tmp_path):
    wb, meta = batch_inputs(ARCH, 2, prune=0.3)

    def flip_a_mask_bit(raw):
        raw = bytearray(raw)
        raw[_mask_offset(2)] ^= 0x80
        return zstandard.ZstdCompressor().compress(bytes(raw))
    path = str(tmp_path / "m.inr")
    with InrWriter(path, ARCH, has_masks=True, classes=["a", "b", "c"]) as w:
        w._cctx = _TamperingCompressor(flip_a_mask_bit)
        w.add(wb, *(meta[k] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")))
    with InrFile(path) as f:
        with pytest.raises(InrFormatError, match=r"index\[0\].nnz.*mask keeps"):
            f.read_chunk(0)


def test_mask_padding_bits_must_be_zero(tmp_path):
    arch = Architecture(2, 3)  # 9 hidden weights: 7 padding bits per image
    wb, meta = batch_inputs(arch, 1, prune=0.3)

    def set_padding_bit(raw):
        raw = bytearray(raw)
        w, h = 3, 1
        mask_start = 4 * (w * 2 + w + h * w + 3 * w + 3)
        raw[mask_start + 1] |= 0x01
        return zstandard.ZstdCompressor().compress(bytes(raw))
    path = str(tmp_path / "p.inr")
    with InrWriter(path, arch, has_masks=True, classes=["a", "b", "c"]) as w:
        w._cctx = _TamperingCompressor(set_padding_bit)
        w.add(wb, *(meta[k] for k in ("labels", "heights", "widths", "psnr", "prune_ratio")))
    with InrFile(path) as f:
        with pytest.raises(InrFormatError, match="padding bits"):
            f.read_chunk(0)


def test_file_without_masks_must_store_all_weights(valid):
    rewrite(valid, _set(("has_masks",), False))
    expect_error(valid, "index[0].nnz", "without masks")


def test_closed_file(valid):
    f = InrFile(valid)
    f.close()
    with pytest.raises(InrUsageError, match="closed"):
        f.read_chunk(0)


def _raw_header(path, raw):
    data, off, _ = read_parts(path)
    data = data[:off] + raw
    pre = np.frombuffer(bytes(data[:PREAMBLE_SIZE]), PREAMBLE_DTYPE).copy()
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    data[:PREAMBLE_SIZE] = pre.tobytes()
    open(path, "wb").write(data)


def test_deeply_nested_header(valid):
    _raw_header(valid, b"[" * 200_000 + b"]" * 200_000)
    expect_error(valid, "header", "not valid UTF-8 JSON")


def test_duplicate_header_keys(valid):
    _, _, header = read_parts(valid)
    raw = json.dumps(header, separators=(",", ":")).encode()
    _raw_header(valid, raw[:-1] + b',"num_images":5}')
    expect_error(valid, "header", "duplicate key 'num_images'")


def test_float_offsets_are_refused(valid):
    rewrite(valid, lambda h: section(h, "index").__setitem__("offset", float(section(h, "index")["offset"])))
    expect_error(valid, "header.sections[1].offset", "must be int")


def test_format_module_does_not_import_torch():
    import subprocess
    import sys
    code = "import sys, inrfmt.reader, inrfmt.writer; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
