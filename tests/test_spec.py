"""Golden vectors: every committed spec/*.inr must still read as its spec/*.json says.

These files were written by tools/make_golden.py. If a change makes this fail, it breaks files users
already have: either fix the change, or bump the format version (FORMAT.md, "Versioning") and keep
reading the old files. The format 2.0 files (`coded_*`) are also decoded by spec/reference_decoder.py, the
decoder written from FORMAT.md Part II alone: the library and it must both return exactly what the JSON says.
"""
import ast
import importlib.util
import json
import os
import sys

import numpy as np
import pytest

from inrfmt.reader import InrFile
from inrfmt.spec import INDEX_DTYPE, flatten_params
from tests.test_format import _set as header_edit  # set (or, value KeyError, delete) one header key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "spec")
_spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "tools", "make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

_spec = importlib.util.spec_from_file_location("reference_decoder", os.path.join(SPEC, "reference_decoder.py"))
reference_decoder = importlib.util.module_from_spec(_spec)
sys.modules["reference_decoder"] = reference_decoder  # its dataclasses look their module up
_spec.loader.exec_module(reference_decoder)

CASES = sorted(name[:-5] for name in os.listdir(SPEC) if name.endswith(".json") and name != "header.schema.json")
CODED = [case for case in CASES if case.startswith("coded_")]  # format 2.0 (FORMAT.md Part II)
FORMAT1 = [case for case in CASES if case not in CODED]


def load_expected(case):
    with open(os.path.join(SPEC, case + ".json"), encoding="utf-8") as fh:
        return json.load(fh)


def test_every_golden_file_has_its_expectations():
    inr = sorted(name[:-4] for name in os.listdir(SPEC) if name.endswith(".inr"))
    assert inr == CASES
    assert len(CASES) >= 4
    # Files of format 1.0 stay as they were written: a newer reader must keep reading them.
    versions = {case: json.load(open(os.path.join(SPEC, case + ".json")))["version"] for case in CASES}
    assert sorted(c for c, v in versions.items() if v == [1, 0]) == ["float16_dense", "int8_masks",
                                                                    "no_hidden_single"]
    assert versions["keys_1_1"] == [1, 1]
    assert sorted(CODED) == ["coded_no_hidden", "coded_small"]
    assert all(versions[case] == [2, 0] for case in CODED)
    for name in inr:
        assert os.path.getsize(os.path.join(SPEC, name + ".inr")) < 50_000
        assert os.path.getsize(os.path.join(SPEC, name + ".json")) < 50_000


@pytest.mark.parametrize("case", FORMAT1)
def test_golden_file_reads_as_expected(case):
    with open(os.path.join(SPEC, case + ".json")) as fh:
        want = json.load(fh)
    with InrFile(os.path.join(SPEC, want["file"])) as f:
        f.verify()
        assert list(f.version) == want["version"]
        assert f.file_bytes == want["file_bytes"]
        a = f.arch
        assert {"sine_layers": a.sine_layers, "width": a.width, "w0": a.w0, "first_w0": a.first_w0} \
            == want["architecture"]
        assert (f.hidden_dtype, f.float_dtype, f.has_masks) == (want["hidden_dtype"], want["float_dtype"],
                                                                want["has_masks"])
        assert (f.num_images, f.num_chunks) == (want["num_images"], want["num_chunks"])
        assert [list(f.chunk_range(k)) for k in range(f.num_chunks)] == want["chunk_ranges"]
        assert f.classes == want["classes"]
        assert f.metadata == want["metadata"]
        assert f.keys == want.get("keys")  # 1.0 files have no keys section
        assert f.index.dtype == INDEX_DTYPE
        assert len(f.index) == len(want["index"])
        for row, expected in zip(f.index, want["index"]):
            for field, value in expected.items():
                assert row[field] == np.asarray(value, INDEX_DTYPE[field]), (field, row[field], value)
        assert np.array_equal(f.scales, np.asarray(want["scales"], np.float32).reshape(f.scales.shape))

        weights = f.read_images(range(f.num_images))
        sums = [float(np.abs(weights.dequantized_hidden()[i].astype(np.float64)).sum()) for i in range(f.num_images)]
        np.testing.assert_allclose(sums, want["hidden_nonzero_sum"], rtol=1e-6)
        tol = want["pixel_atol"]
        for p in want["pixels"]:
            h, w = p["size"]
            assert (h, w) == (int(f.index["height"][p["image"]]), int(f.index["width"][p["image"]]))
            coords = make_golden.pixel_coords(h, w, [p["row"]], [p["col"]])
            got = make_golden.reference_pixels(weights, p["image"], f.arch, coords)[0]
            np.testing.assert_allclose(got, p["rgb"], atol=tol, err_msg=f"{case} pixel {p}")


def test_golden_files_can_be_rebuilt(tmp_path):
    """The generator still runs and its output reads back equal to the committed expectations (bytes may
    differ with another zstd build, so only decoded content is compared)."""
    make_golden.main(["--out", str(tmp_path)])
    for case in CASES:
        with open(os.path.join(SPEC, case + ".json")) as fh:
            committed = json.load(fh)
        with open(tmp_path / (case + ".json")) as fh:
            rebuilt = json.load(fh)
        for key in ("file_bytes", "pixels", "hidden_nonzero_sum"):
            if key not in committed:  # format 2.0 files have no hidden_nonzero_sum
                assert key not in rebuilt
                continue
            a, b = committed.pop(key), rebuilt.pop(key)
            if key == "pixels":  # libm sin may differ in the last bits between machines
                assert [{**x, "rgb": None} for x in a] == [{**x, "rgb": None} for x in b]
                np.testing.assert_allclose([x["rgb"] for x in a], [x["rgb"] for x in b], atol=1e-6)
            elif key == "hidden_nonzero_sum":
                np.testing.assert_allclose(a, b, rtol=1e-9)
        assert rebuilt == committed


# ------------------------------------------------------------------------------------------------
# spec/header.schema.json agrees with the reader (checked with a small validator for the keywords the
# schema uses, so no jsonschema dependency is needed)
# ------------------------------------------------------------------------------------------------
def schema_errors(value, schema, where="header"):
    errors = []
    types = {"object": dict, "array": list, "string": str, "boolean": bool, "integer": int, "number": (int, float)}
    t = schema.get("type")
    if t and (not isinstance(value, types[t]) or (t in ("integer", "number") and isinstance(value, bool))):
        return [f"{where}: not {t}"]
    if "const" in schema and (value != schema["const"] or type(value) is not type(schema["const"])):
        errors.append(f"{where}: != {schema['const']!r}")
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: not in {schema['enum']}")
    if "minimum" in schema and value < schema["minimum"]:
        errors.append(f"{where}: < minimum")
    if "maximum" in schema and value > schema["maximum"]:
        errors.append(f"{where}: > maximum")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{where}: <= exclusiveMinimum")
    if "multipleOf" in schema and value % schema["multipleOf"]:
        errors.append(f"{where}: not a multiple of {schema['multipleOf']}")
    for key in schema.get("required", []):
        if key not in value:
            errors.append(f"{where}.{key}: missing")
    for key, sub in schema.get("properties", {}).items():
        if isinstance(value, dict) and key in value:
            errors += schema_errors(value[key], sub, f"{where}.{key}")
    if "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def _golden_header(case):
    from inrfmt.spec import PREAMBLE_DTYPE, PREAMBLE_SIZE
    data = open(os.path.join(SPEC, case + ".inr"), "rb").read()
    pre = np.frombuffer(data[:PREAMBLE_SIZE], PREAMBLE_DTYPE)[0]
    return data, json.loads(data[int(pre["header_offset"]):])


def _with_header(data, header):
    import zlib
    from inrfmt.spec import PREAMBLE_DTYPE, PREAMBLE_SIZE
    pre = np.frombuffer(data[:PREAMBLE_SIZE], PREAMBLE_DTYPE)[0].copy()
    raw = json.dumps(header).encode()
    offset = int(pre["header_offset"])
    pre["header_length"], pre["header_crc32"] = len(raw), zlib.crc32(raw)
    return pre.tobytes() + data[PREAMBLE_SIZE:offset] + raw


SCHEMA = json.load(open(os.path.join(SPEC, "header.schema.json")))


@pytest.mark.parametrize("case", FORMAT1)  # the schema is that of version 1 headers
def test_golden_headers_match_the_schema(case):
    _, header = _golden_header(case)
    assert schema_errors(header, SCHEMA) == []


def _schema_mutations(schema, path=()):
    """(path, value) edits that the schema forbids: drop each required key, break each constraint."""
    for key in schema.get("required", []):
        yield path + (key,), KeyError
    for key, sub in schema.get("properties", {}).items():
        if "const" in sub:
            yield path + (key,), (sub["const"] + 1 if isinstance(sub["const"], int) else sub["const"] + "x")
        if "enum" in sub:
            yield path + (key,), "bogus"
        if sub.get("type") in ("integer", "boolean"):
            yield path + (key,), "1"
        if "minimum" in sub and key not in ("offset",):
            yield path + (key,), sub["minimum"] - 1
        if "exclusiveMinimum" in sub:
            yield path + (key,), sub["exclusiveMinimum"]
        if "maximum" in sub:
            yield path + (key,), sub["maximum"] + 1
        if sub.get("type") == "object":
            yield from _schema_mutations(sub, path + (key,))
        if "items" in sub:
            yield from _schema_mutations(sub["items"], path + (key, 0))


@pytest.mark.parametrize("edit", list(_schema_mutations(SCHEMA)), ids=str)
def test_reader_refuses_what_the_schema_forbids(tmp_path, edit):
    from inrfmt.errors import InrFormatError
    path, value = edit
    data, header = _golden_header("int8_masks")
    header_edit(path, value)(header)
    assert schema_errors(header, SCHEMA) != []
    target = tmp_path / "edited.inr"
    target.write_bytes(_with_header(data, header))
    with pytest.raises(InrFormatError):
        InrFile(target)


@pytest.mark.parametrize("case", CASES)
def test_library_decoder_matches_golden_pixels(case):
    """The library's own decoder (inrfmt.open -> ds[i], torch, CPU) returns the golden pixels."""
    import inrfmt
    with open(os.path.join(SPEC, case + ".json")) as fh:
        want = json.load(fh)
    ds = inrfmt.open(os.path.join(SPEC, want["file"]), device="cpu")
    for p in want["pixels"]:
        image, label = ds[p["image"]]
        assert tuple(image.shape) == (3, *p["size"])
        assert label == want["index"][p["image"]]["label"]
        np.testing.assert_allclose(image[:, p["row"], p["col"]].numpy(), p["rgb"], atol=want["pixel_atol"])


# ------------------------------------------------------------------------------------------------
# format 2.0: the library and spec/reference_decoder.py against spec/coded_*.json
# ------------------------------------------------------------------------------------------------
def _group_offsets(want):
    a = want["architecture"]
    sizes = make_golden.group_sizes(make_golden.Architecture(a["sine_layers"], a["width"], a["w0"], a["first_w0"]))
    names = [q["group"] for q in want["quant"]]
    return dict(zip(names, np.concatenate([[0], np.cumsum(sizes)[:-1]]).tolist()))


def _check_params(case, want, theta0, params):
    """Dequantized float32 parameters [N, P] and the prior's theta0 [P] against the JSON, bit for bit."""
    assert params.dtype == np.float32 and theta0.dtype == np.float32
    assert make_golden.params_sha256(params) == want["params_sha256"], case
    if want["prior"] is None:
        assert not theta0.any()
    else:
        assert make_golden.params_sha256(theta0[None]) == want["prior"]["theta0_sha256"]
    offsets = _group_offsets(want)
    for s in want["param_samples"]:
        j = offsets[s["group"]] + s["element"]
        assert theta0[j] == np.float32(s["theta0"]), s
        assert params[s["image"], j].view(np.uint32) == np.float32(s["value"]).view(np.uint32), s


def _check_pixels(case, want, weights, arch):
    for p in want["pixels"]:
        h, w = p["size"]
        assert (h, w) == (want["index"][p["image"]]["height"], want["index"][p["image"]]["width"])
        coords = make_golden.pixel_coords(h, w, [p["row"]], [p["col"]])
        got = make_golden.reference_pixels(weights, p["image"], arch, coords)[0]
        np.testing.assert_allclose(got, p["rgb"], atol=want["pixel_atol"], err_msg=f"{case} pixel {p}")


@pytest.mark.parametrize("case", CODED)
def test_coded_golden_file_reads_as_expected(case):
    """The library: structure, grid, tables, index, every code and every dequantized parameter exactly."""
    want = load_expected(case)
    with InrFile(os.path.join(SPEC, want["file"])) as f:
        f.verify()
        assert f.coded and list(f.version) == want["version"] == [2, 0]
        assert f.file_bytes == want["file_bytes"]
        a = f.arch
        assert {"sine_layers": a.sine_layers, "width": a.width, "w0": a.w0, "first_w0": a.first_w0} \
            == want["architecture"]
        assert f.header["weight_coding"] == want["weight_coding"]
        assert (f.hidden_dtype, f.float_dtype, f.has_masks, f.scales) == (None, None, False, None)
        assert (f.num_images, f.num_chunks) == (want["num_images"], want["num_chunks"])
        assert [list(f.chunk_range(k)) for k in range(f.num_chunks)] == want["chunk_ranges"]
        assert [{name: int(c[name]) for name in ("compressed_length", "raw_length", "crc32")} for c in f.chunks] \
            == want["chunks"]
        assert (f.classes, f.metadata, f.keys) == (want["classes"], want["metadata"], want["keys"])
        assert (f.prior is None) == (want["prior"] is None)
        if f.prior is not None:
            assert f.prior.name == want["prior"]["name"]
        assert [{"group": g, "step": float(f.grid.steps[i]), "bits": int(f.grid.bits[i]),
                 "wrapped": bool(f.grid.wrapped[i])} for i, g in enumerate(_group_offsets(want))] == want["quant"]
        assert [{"first": t.first, "counts": t.counts.tolist()} for t in f.tables] == want["tables"]
        assert f.index.dtype == INDEX_DTYPE and len(f.index) == len(want["index"])
        for row, expected in zip(f.index, want["index"]):
            for field, value in expected.items():
                assert row[field] == np.asarray(value, INDEX_DTYPE[field]), (field, row[field], value)

        codes = np.concatenate([f.read_codes(k) for k in range(f.num_chunks)])
        assert codes.dtype == np.int16 and np.array_equal(codes, np.asarray(want["codes"]))
        weights = f.read_images(range(f.num_images))
        _check_params(case, want, f.theta0(), flatten_params(weights, f.arch))
        by_chunk = np.concatenate([flatten_params(f.read_chunk(k), f.arch) for k in range(f.num_chunks)])
        assert np.array_equal(by_chunk.view(np.uint32), flatten_params(weights, f.arch).view(np.uint32))
        _check_pixels(case, want, weights, f.arch)


@pytest.mark.parametrize("case", CODED)
def test_reference_decoder_reads_coded_golden_file(case):
    """spec/reference_decoder.py (FORMAT.md Part II alone) returns exactly what the JSON says."""
    want = load_expected(case)
    with open(os.path.join(SPEC, want["file"]), "rb") as fh:
        d = reference_decoder.decode(fh.read())
    assert list(d.version) == want["version"]
    s, w, w0, first_w0 = d.architecture
    assert {"sine_layers": s, "width": w, "w0": w0, "first_w0": first_w0} == want["architecture"]
    assert d.header["weight_coding"] == want["weight_coding"]
    assert [[c[0], c[0] + c[1]] for c in d.chunks] == want["chunk_ranges"]
    assert [c[3] for c in d.chunks] == [c["compressed_length"] for c in want["chunks"]]
    assert [c[4] for c in d.chunks] == [c["crc32"] for c in want["chunks"]]
    assert (d.classes, d.metadata, d.keys) == (want["classes"], want["metadata"], want["keys"])
    assert [{"group": g.name, **q} for g, q in zip(d.groups, d.quant)] == \
        [{**q, "wrapped": int(q["wrapped"])} for q in want["quant"]]
    assert [{"first": t.first, "counts": t.counts} for t in d.tables] == want["tables"]
    for name in ("label", "height", "width", "psnr", "chunk"):
        column = np.asarray([row[name] for row in want["index"]], INDEX_DTYPE[name])
        assert np.array_equal(d.index[name], column), name
    assert np.array_equal(d.codes, np.asarray(want["codes"]))
    _check_params(case, want, d.theta0, d.params)
    arch = make_golden.Architecture(s, w, w0, first_w0)
    _check_pixels(case, want, make_golden.flat_to_weights(d.params, arch), arch)


def test_reference_decoder_is_independent_of_the_library():
    """It imports only the standard library, numpy and zstandard (FORMAT.md rule 96)."""
    with open(os.path.join(SPEC, "reference_decoder.py"), encoding="utf-8") as fh:
        tree = ast.parse(fh.read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "bisect", "dataclasses", "json", "math", "struct", "sys", "zlib", "numpy",
                        "zstandard"}, imported


def test_reference_decoder_command_line(capsys):
    assert reference_decoder.main([os.path.join(SPEC, "coded_small.inr")]) == 0
    out = capsys.readouterr().out
    assert "format 2.0, 5 images, 2 chunks, 3x16" in out and "last_b       16 bits" in out
    assert reference_decoder.main([os.path.join(SPEC, "int8_masks.inr")]) == 1
    assert "rule 56" in capsys.readouterr().err


@pytest.mark.parametrize("case", FORMAT1)
def test_reference_decoder_refuses_format_1(case):
    with open(os.path.join(SPEC, case + ".inr"), "rb") as fh:
        data = fh.read()
    with pytest.raises(reference_decoder.FormatError, match=r"rule 56: file is format version 1\.[01]"):
        reference_decoder.decode(data)


def test_reference_decoder_checks_what_a_reader_must():
    """A few damaged copies of a golden file: the reference decoder names the rule each one breaks."""
    with open(os.path.join(SPEC, "coded_small.inr"), "rb") as fh:
        good = fh.read()
    _, header = _golden_header("coded_small")
    blobs = next(s for s in header["sections"] if s["name"] == "blobs")

    def flipped(pos):
        data = bytearray(good)
        data[pos] ^= 1
        return bytes(data)

    with pytest.raises(reference_decoder.FormatError, match="rule 13"):  # the header checksum
        reference_decoder.decode(flipped(len(good) - 5))
    with pytest.raises(reference_decoder.FormatError, match="rule 81: section 'blobs'"):
        reference_decoder.decode(flipped(blobs["offset"] + 20))
    with pytest.raises(reference_decoder.FormatError, match="rule 10"):
        reference_decoder.decode(good[:63])
    with pytest.raises(reference_decoder.FormatError, match="rule 17"):
        reference_decoder.decode(good + b" ")
