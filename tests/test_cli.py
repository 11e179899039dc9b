"""The command line as a user meets it: real subprocesses, exit codes, one-line errors, `info --json`."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from inrfmt.reader import InrFile

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "spec"
GOLDEN = SPEC / "int8_masks.inr"


def run(*args, check_rc=None):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "inrfmt", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    if check_rc is not None:
        assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
    return proc


def assert_one_line_error(proc, code, *needles):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("inrfmt: error: ")
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_info_json_has_the_promised_fields():
    doc = json.loads(run("info", GOLDEN, "--json", check_rc=0).stdout)
    for key in ("format_version", "num_images", "classes", "architecture", "file_bytes", "bytes_per_image",
                "psnr", "prune_ratio", "quantization"):
        assert key in doc
    with InrFile(GOLDEN) as inr:
        index = inr.index
        assert doc["num_images"] == inr.num_images == 3
        assert doc["classes"] == list(inr.classes)
        assert doc["file_bytes"] == GOLDEN.stat().st_size
        assert doc["bytes_per_image"] == pytest.approx(GOLDEN.stat().st_size / 3)
        assert doc["psnr"]["mean"] == pytest.approx(float(np.mean(index["psnr"].astype(np.float64))))
        assert doc["psnr"]["min"] == pytest.approx(float(index["psnr"].min()))
        assert doc["prune_ratio"]["mean"] == pytest.approx(float(np.mean(index["prune_ratio"].astype(np.float64))))
        assert doc["architecture"]["sine_layers"] == inr.arch.sine_layers
        assert doc["architecture"]["width"] == inr.arch.width
        assert doc["architecture"]["w0"] == inr.arch.w0
    assert doc["format_version"] == "1.0"
    assert doc["quantization"]["hidden_dtype"] == "int8"
    assert sum(h["count"] for h in doc["prune_ratio"]["histogram"]) == 3
    assert "images" not in doc


def test_info_per_image_rows_match_the_index():
    doc = json.loads(run("info", GOLDEN, "--json", "--per-image", check_rc=0).stdout)
    with InrFile(GOLDEN) as inr:
        rows = inr.index
        assert [r["index"] for r in doc["images"]] == list(range(inr.num_images))
        assert [r["height"] for r in doc["images"]] == rows["height"].tolist()
        assert [r["width"] for r in doc["images"]] == rows["width"].tolist()
        assert [r["label"] for r in doc["images"]] == rows["label"].tolist()
    table = run("info", GOLDEN, "--per-image", check_rc=0).stdout
    assert "prune ratio" in table and "PSNR" in table
    assert len([line for line in table.splitlines() if line.strip().split()[:1] == ["2"]]) == 1


def test_info_load_reports_bank_stats():
    doc = json.loads(run("info", GOLDEN, "--json", "--load", "--device", "cpu", check_rc=0).stdout)
    assert doc["load"]["file_bytes"] == GOLDEN.stat().st_size
    assert doc["load"]["bank_bytes"] > 0
    assert doc["load"]["load_seconds"] >= 0
    assert doc["load"]["bank_layout"] in ("dense", "compact")
    doc = json.loads(run("info", GOLDEN, "--json", "--load", "--device", "cpu", "--bank-layout", "compact",
                         check_rc=0).stdout)
    assert doc["load"]["bank_layout"] == "compact"
    table = run("info", GOLDEN, "--load", "--device", "cpu", "--bank-layout", "dense", check_rc=0).stdout
    assert "(dense, " in table and "x the file)" in table
    proc = run("info", GOLDEN, "--load", "--bank-layout", "sparse", check_rc=2)
    assert "sparse" in proc.stderr and "Traceback" not in proc.stderr


def test_verify_sound_file_exits_0():
    proc = run("verify", GOLDEN, check_rc=0)
    assert "OK" in proc.stdout


def test_verify_damaged_file_exits_1_with_reason(tmp_path):
    damaged = tmp_path / "damaged.inr"
    data = bytearray(GOLDEN.read_bytes())
    with InrFile(GOLDEN) as inr:
        blobs = inr.sections["blobs"]
        offset = int(blobs["offset"])
    data[offset + 5] ^= 0xFF  # inside the first compressed chunk: only its checksum can notice
    damaged.write_bytes(bytes(data))
    assert_one_line_error(run("verify", damaged), 1, str(damaged))
    assert_one_line_error(run("info", tmp_path / "missing.inr"), 2, "missing.inr")
    truncated = tmp_path / "truncated.inr"
    truncated.write_bytes(GOLDEN.read_bytes()[:100])
    assert_one_line_error(run("info", truncated), 1, "truncated")


def test_convert_user_mistakes_are_one_line_exit_2(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    assert_one_line_error(run("convert", tmp_path / "nope", tmp_path / "o.inr"), 2, "nope")
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--preset", "bogus"), 2, "bogus")
    existing = tmp_path / "exists.inr"
    existing.write_bytes(b"keep me")
    assert_one_line_error(run("convert", sample, existing), 2, "exists.inr")
    assert existing.read_bytes() == b"keep me"
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--steps", "0"), 2)
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--jitter", "1.5"), 2, "1.5")
    assert_one_line_error(run("convert", sample, tmp_path / "o.inr", "--float-dtype", "bf16"), 2, "bf16")
    assert_one_line_error(run("info"), 2)
    assert not (tmp_path / "o.inr").exists()


def test_help_lists_every_command():
    out = run("--help", check_rc=0).stdout
    for command in ("convert", "info", "verify", "merge", "export", "bench"):
        assert command in out
    convert_help = run("convert", "--help", check_rc=0).stdout
    for option in ("--preset", "--steps", "--batch-size", "--device", "--seed", "--overwrite", "--resume",
                   "--max-side", "--on-error", "--shard", "--no-prune", "--quant", "--float-dtype", "--jitter",
                   "--pixel-fraction", "--reproducible"):
        assert option in convert_help


def test_convert_cli_options_reach_the_file(tmp_path):
    sample = tmp_path / "src"
    shutil.copytree(ROOT / "data" / "sample" / "bag", sample / "bag")
    out = tmp_path / "small.inr"
    run("convert", sample, out, "--steps", "5", "--float-dtype", "float16", "--quant", "16", "--jitter", "0",
        "--no-prune", "--reproducible", "--quiet", check_rc=0)
    with InrFile(out) as inr:
        assert (inr.float_dtype, inr.hidden_dtype, inr.has_masks) == ("float16", "float16", False)
        assert inr.num_images == len(list((sample / "bag").iterdir()))
        assert float(inr.metadata["jitter"]) == 0.0
        assert "encode_seconds" not in inr.metadata
