"""Golden vectors: every committed spec/*.inr must still read as its spec/*.json says.

These files were written by tools/make_golden.py. If a change makes this fail, it breaks files users
already have: either fix the change, or bump the format version (FORMAT.md, "Versioning") and keep
reading the old files.
"""
import importlib.util
import json
import os

import numpy as np
import pytest

from inrfmt.reader import InrFile
from inrfmt.spec import INDEX_DTYPE
from tests.test_format import _set as header_edit  # set (or, value KeyError, delete) one header key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "spec")
_spec = importlib.util.spec_from_file_location("make_golden", os.path.join(ROOT, "tools", "make_golden.py"))
make_golden = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_golden)

CASES = sorted(name[:-5] for name in os.listdir(SPEC) if name.endswith(".json") and name != "header.schema.json")


def test_every_golden_file_has_its_expectations():
    inr = sorted(name[:-4] for name in os.listdir(SPEC) if name.endswith(".inr"))
    assert inr == CASES
    assert len(CASES) >= 4
    # Files of format 1.0 stay as they were written: a newer reader must keep reading them.
    versions = {case: json.load(open(os.path.join(SPEC, case + ".json")))["version"] for case in CASES}
    assert sorted(c for c, v in versions.items() if v == [1, 0]) == ["float16_dense", "int8_masks",
                                                                    "no_hidden_single"]
    assert versions["keys_1_1"] == [1, 1]
    for name in inr:
        assert os.path.getsize(os.path.join(SPEC, name + ".inr")) < 50_000


@pytest.mark.parametrize("case", CASES)
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


@pytest.mark.parametrize("case", CASES)
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
